//! One model response, as OpenAI-compatible Chat Completions streaming sends it: the pure part
//! of the `llm` agent (no I/O), so every wire quirk is tested here without a socket.
//!
//! [`parse_chunk`] reads one `data:` payload into what the agent shows at once (reasoning,
//! text); [`Response`] gathers what it needs at the end (the text, tool calls joined by
//! `index`, the `finish_reason`, the usage). Sizes are bounded: a model server is not trusted
//! to keep its answer small.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{json, Value};

/// Tool calls one response may ask for; more is a model server gone wrong.
pub const MAX_TOOL_CALLS: usize = 32;

/// Bytes of one tool call's arguments kept. A longer call is not run: the model is told its
/// arguments were too long.
pub const MAX_ARGUMENTS_BYTES: usize = 64 * 1024;

/// What one chunk says, in the order the agent acts on it.
#[derive(Debug, Default, PartialEq)]
pub struct Delta {
    /// `delta.reasoning_content` (DeepSeek, llama.cpp) or `delta.reasoning` (vLLM, Ollama,
    /// OpenRouter).
    pub reasoning: Option<String>,
    /// `delta.content`; `null` and `""` are none.
    pub content: Option<String>,
    pub tool_calls: Vec<ToolCallFragment>,
    pub finish_reason: Option<String>,
    pub usage: Option<Usage>,
}

/// A piece of a tool call: the first carries `id` and `function.name`, later ones only a piece
/// of `function.arguments`; `index` says which call it belongs to.
#[derive(Debug, Default, PartialEq, Deserialize)]
pub struct ToolCallFragment {
    /// Missing on some old servers (Ollama once): then it is call 0.
    #[serde(default)]
    pub index: u64,
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub function: Option<FunctionFragment>,
}

#[derive(Debug, Default, PartialEq, Deserialize)]
pub struct FunctionFragment {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub arguments: Option<String>,
}

/// Token counts of one model call.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Usage {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
    #[serde(default)]
    pub total_tokens: u64,
}

/// The wire shape; only what the agent reads.
#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Vec<Choice>,
    #[serde(default)]
    usage: Option<Usage>,
    /// Some servers (vLLM, OpenRouter) report a failure mid-stream as a chunk with `error`.
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Deserialize)]
struct Choice {
    #[serde(default)]
    delta: Option<WireDelta>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct WireDelta {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    reasoning_content: Option<String>,
    #[serde(default)]
    reasoning: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<ToolCallFragment>>,
}

/// Reads one chunk (the JSON of a `data:` line other than `[DONE]`). Only the first choice is
/// read: the agent never asks for more than one (`n` is not sent).
pub fn parse_chunk(data: &str) -> Result<Delta, String> {
    let chunk: Chunk = serde_json::from_str(data)
        .map_err(|e| format!("a malformed chunk from the model ({e})"))?;
    if let Some(error) = chunk.error {
        let message = error
            .get("message")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| error.to_string());
        return Err(format!("the model server reported an error: {message}"));
    }
    let mut out = Delta {
        usage: chunk.usage,
        ..Delta::default()
    };
    if let Some(choice) = chunk.choices.into_iter().next() {
        out.finish_reason = choice.finish_reason.filter(|r| !r.is_empty());
        if let Some(delta) = choice.delta {
            out.reasoning = delta
                .reasoning_content
                .or(delta.reasoning)
                .filter(|t| !t.is_empty());
            out.content = delta.content.filter(|t| !t.is_empty());
            out.tool_calls = delta.tool_calls.unwrap_or_default();
        }
    }
    Ok(out)
}

/// A tool call once the response is complete.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    /// The model's id for it, sent back with its result as `tool_call_id`.
    pub id: String,
    pub name: String,
    /// As the model wrote them; parsed only when the call is run.
    pub arguments: String,
    /// The arguments went over [`MAX_ARGUMENTS_BYTES`] (and were cut there).
    pub too_long: bool,
}

impl ToolCall {
    /// The arguments as JSON, or why they are not. No arguments at all (`""`, which servers
    /// send for tools without parameters) are `{}`.
    pub fn parsed_arguments(&self) -> Result<Value, String> {
        if self.too_long {
            return Err(format!(
                "the arguments are longer than {MAX_ARGUMENTS_BYTES} bytes"
            ));
        }
        if self.arguments.trim().is_empty() {
            return Ok(json!({}));
        }
        serde_json::from_str(&self.arguments)
            .map_err(|e| format!("the arguments are not JSON ({e})"))
    }

    /// The call as it goes back to the model in the assistant message.
    pub fn to_message(&self) -> Value {
        json!({
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        })
    }
}

/// One model response, gathered chunk by chunk.
#[derive(Debug, Default)]
pub struct Response {
    pub text: String,
    calls: BTreeMap<u64, ToolCall>,
    pub finish_reason: Option<String>,
    pub usage: Option<Usage>,
}

impl Response {
    /// Adds a chunk's content, calls, finish reason and usage. Errors when the response asks
    /// for more than [`MAX_TOOL_CALLS`] calls.
    pub fn add(&mut self, delta: &mut Delta) -> Result<(), String> {
        if let Some(text) = &delta.content {
            self.text.push_str(text);
        }
        for fragment in delta.tool_calls.drain(..) {
            if !self.calls.contains_key(&fragment.index) && self.calls.len() >= MAX_TOOL_CALLS {
                return Err(format!(
                    "the model asked for more than {MAX_TOOL_CALLS} tool calls at once"
                ));
            }
            let call = self
                .calls
                .entry(fragment.index)
                .or_insert_with(|| ToolCall {
                    id: String::new(),
                    name: String::new(),
                    arguments: String::new(),
                    too_long: false,
                });
            if let Some(id) = fragment.id.filter(|id| !id.is_empty()) {
                call.id = id;
            }
            if let Some(function) = fragment.function {
                if let Some(name) = function.name.filter(|n| !n.is_empty()) {
                    call.name = name;
                }
                if let Some(piece) = function.arguments {
                    if call.arguments.len() + piece.len() > MAX_ARGUMENTS_BYTES {
                        call.too_long = true;
                    } else if !call.too_long {
                        call.arguments.push_str(&piece);
                    }
                }
            }
        }
        if delta.finish_reason.is_some() {
            self.finish_reason = delta.finish_reason.take();
        }
        if let Some(usage) = delta.usage.take() {
            // Servers send it once; if one sends it twice, the last is the total.
            self.usage = Some(usage);
        }
        Ok(())
    }

    /// The calls in `index` order. A call whose first fragment gave no id gets one made up,
    /// so its result can still be matched to it.
    pub fn tool_calls(&self) -> Vec<ToolCall> {
        self.calls
            .iter()
            .map(|(index, call)| {
                let mut call = call.clone();
                if call.id.is_empty() {
                    call.id = format!("call_{index}");
                }
                call
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delta(data: Value) -> Delta {
        parse_chunk(&data.to_string()).unwrap()
    }

    fn choice(delta: Value, finish: Value) -> Value {
        json!({"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":delta,"finish_reason":finish}],"usage":null})
    }

    #[test]
    fn first_delta_with_role_and_empty_or_null_content_says_nothing() {
        for content in [json!(null), json!("")] {
            let d = delta(choice(
                json!({"role":"assistant","content":content}),
                json!(null),
            ));
            assert_eq!(d, Delta::default());
        }
    }

    #[test]
    fn both_reasoning_fields_are_reasoning() {
        let a = delta(choice(json!({"reasoning_content":"hmm"}), json!(null)));
        let b = delta(choice(json!({"reasoning":"hmm"}), json!(null)));
        assert_eq!(a.reasoning.as_deref(), Some("hmm"));
        assert_eq!(b.reasoning.as_deref(), Some("hmm"));
        assert!(a.content.is_none() && b.content.is_none());
    }

    #[test]
    fn parallel_calls_are_joined_by_index() {
        let mut r = Response::default();
        let chunks = [
            json!({"tool_calls":[{"index":0,"id":"call_a","type":"function","function":{"name":"calculator","arguments":""}}]}),
            json!({"tool_calls":[{"index":1,"id":"call_b","type":"function","function":{"name":"clock","arguments":""}}]}),
            json!({"tool_calls":[{"index":0,"function":{"arguments":"{\"ex"}}]}),
            json!({"tool_calls":[{"index":1,"function":{"arguments":"{}"}}]}),
            json!({"tool_calls":[{"index":0,"function":{"arguments":"pr\":\"1+1\"}"}}]}),
        ];
        for c in chunks {
            r.add(&mut delta(choice(c, json!(null)))).unwrap();
        }
        r.add(&mut delta(choice(json!({}), json!("tool_calls"))))
            .unwrap();
        let calls = r.tool_calls();
        assert_eq!(calls.len(), 2);
        assert_eq!(
            (calls[0].id.as_str(), calls[0].name.as_str()),
            ("call_a", "calculator")
        );
        assert_eq!(calls[0].parsed_arguments().unwrap(), json!({"expr":"1+1"}));
        assert_eq!(
            (calls[1].id.as_str(), calls[1].name.as_str()),
            ("call_b", "clock")
        );
        assert_eq!(r.finish_reason.as_deref(), Some("tool_calls"));
    }

    #[test]
    fn usage_chunk_has_no_choices() {
        let mut r = Response::default();
        let mut d = delta(
            json!({"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}),
        );
        r.add(&mut d).unwrap();
        assert_eq!(
            r.usage,
            Some(Usage {
                prompt_tokens: 3,
                completion_tokens: 4,
                total_tokens: 7
            })
        );
    }

    #[test]
    fn malformed_chunks_and_error_chunks_are_errors() {
        assert!(parse_chunk("{\"choices\":")
            .unwrap_err()
            .contains("malformed"));
        assert!(parse_chunk("[1,2]").unwrap_err().contains("malformed"));
        let e = parse_chunk(r#"{"error":{"message":"overloaded"}}"#).unwrap_err();
        assert!(e.contains("overloaded"), "{e}");
    }

    #[test]
    fn arguments_that_are_not_json_or_too_long_are_refused_when_run() {
        let mut r = Response::default();
        let piece = "x".repeat(MAX_ARGUMENTS_BYTES / 2 + 1);
        for args in ["{oops", piece.as_str(), piece.as_str()] {
            let i = if args == "{oops" { 0 } else { 1 };
            r.add(&mut delta(choice(
                json!({"tool_calls":[{"index":i,"id":format!("c{i}"),"function":{"name":"clock","arguments":args}}]}),
                json!(null),
            )))
            .unwrap();
        }
        let calls = r.tool_calls();
        assert!(calls[0]
            .parsed_arguments()
            .unwrap_err()
            .contains("not JSON"));
        assert!(calls[1].too_long);
        assert!(calls[1].arguments.len() <= MAX_ARGUMENTS_BYTES);
        assert!(calls[1].parsed_arguments().unwrap_err().contains("longer"));
    }

    #[test]
    fn empty_arguments_are_an_empty_object_and_missing_ids_are_made_up() {
        let mut r = Response::default();
        r.add(&mut delta(choice(
            json!({"tool_calls":[{"function":{"name":"clock"}}]}),
            json!(null),
        )))
        .unwrap();
        let calls = r.tool_calls();
        assert_eq!(calls[0].id, "call_0");
        assert_eq!(calls[0].parsed_arguments().unwrap(), json!({}));
    }

    #[test]
    fn too_many_calls_is_an_error() {
        let mut r = Response::default();
        for i in 0..MAX_TOOL_CALLS as u64 {
            r.add(&mut delta(choice(
                json!({"tool_calls":[{"index":i,"id":"x","function":{"name":"clock"}}]}),
                json!(null),
            )))
            .unwrap();
        }
        let mut one_more = delta(choice(
            json!({"tool_calls":[{"index":999_999_999_u64,"function":{"name":"clock"}}]}),
            json!(null),
        ));
        assert!(r.add(&mut one_more).is_err());
    }
}
