//! `llm`: talks to an OpenAI-compatible Chat Completions server (OpenAI, vLLM, llama.cpp,
//! Ollama, OpenRouter) and lets the model call the server's tools (PROTOCOL.md §14).
//!
//! Input is a string (one user message) or `{messages: [{role, content}], system?}`. Each step
//! is one streaming model call: reasoning becomes `agent_thinking`, text `partial_result`, and
//! tool calls run through the server's tool actors like any agent's, their results going back
//! to the model as `tool` messages for the next step. The run ends at a `finish_reason` other
//! than `tool_calls`, or after `max_steps` model calls; its result is the last call's text and
//! its usage adds up the model's tokens.
//!
//! Tool trouble (an unknown tool, arguments that are not JSON, a failing tool, a denied
//! approval) is the model's to handle: it gets an error as the tool's result. Trouble with the
//! model server (an HTTP error, a malformed chunk, a stream without `finish_reason`, no
//! connection) ends the run `failed` with code `llm_error`.

mod chunks;
mod client;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::future::join_all;
use serde_json::{json, Value};

use crate::agent::{Agent, AgentError, AgentRun};
use crate::catalog::Toolbox;
use crate::interrupt::Approval;

pub use chunks::{MAX_ARGUMENTS_BYTES, MAX_TOOL_CALLS};
pub use client::{CONNECT_TIMEOUT, MAX_LINE_BYTES, MAX_RESPONSE_BYTES};

use chunks::{parse_chunk, Response, ToolCall, Usage};
use client::{Endpoint, StreamError};

/// The tools offered to the model when the settings name none: all but these, which exist
/// only to test faults (PROTOCOL.md §8).
pub const FAULT_TOOLS: [&str; 2] = ["fail", "panic"];

/// How the `llm` agent reaches its model, and what it lets the model do.
#[derive(Clone)]
pub struct LlmSettings {
    /// E.g. `http://127.0.0.1:11434/v1`; requests go to `{base_url}/chat/completions`.
    pub base_url: String,
    pub model: String,
    /// Sent as `Authorization: Bearer`; never logged.
    pub api_key: Option<String>,
    /// The tools the model may call; `None` is every tool but [`FAULT_TOOLS`].
    pub tools: Option<Vec<String>>,
    /// Model calls per run at most.
    pub max_steps: u32,
    /// Tools the user must approve (PROTOCOL.md §12) before each call.
    pub approve_tools: Vec<String>,
    /// A model call that sends nothing for this long fails.
    pub idle_timeout: Duration,
}

/// The key is shown as `[hidden]`: settings may end up in a log.
impl std::fmt::Debug for LlmSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlmSettings")
            .field("base_url", &self.base_url)
            .field("model", &self.model)
            .field("api_key", &self.api_key.as_ref().map(|_| "[hidden]"))
            .field("tools", &self.tools)
            .field("max_steps", &self.max_steps)
            .field("approve_tools", &self.approve_tools)
            .field("idle_timeout", &self.idle_timeout)
            .finish()
    }
}

impl LlmSettings {
    /// True when the model may call `tool` (it must exist too).
    fn offers(&self, tool: &str) -> bool {
        match &self.tools {
            Some(names) => names.iter().any(|n| n == tool),
            None => !FAULT_TOOLS.contains(&tool),
        }
    }
}

pub struct Llm {
    settings: LlmSettings,
    endpoint: Endpoint,
}

impl Llm {
    pub fn new(settings: LlmSettings) -> Self {
        let endpoint = Endpoint {
            url: format!(
                "{}/chat/completions",
                settings.base_url.trim_end_matches('/')
            ),
            api_key: settings.api_key.clone(),
            idle_timeout: settings.idle_timeout,
        };
        Llm { settings, endpoint }
    }

    /// The `tools` of a request: the offered tools with their JSON Schemas.
    fn offered_tools(&self, toolbox: &Toolbox) -> Vec<Value> {
        toolbox
            .list()
            .filter(|(name, _, _)| self.settings.offers(name))
            .map(|(name, description, schema)| {
                // A tool that takes anything (schema `true`) still needs an object schema here.
                let parameters = if schema.is_object() {
                    schema.clone()
                } else {
                    json!({"type": "object"})
                };
                json!({"type": "function", "function": {
                    "name": name, "description": description, "parameters": parameters,
                }})
            })
            .collect()
    }

    /// One streaming model call: shows reasoning and text as they come, returns the whole
    /// response.
    async fn call_model(
        &self,
        run: &AgentRun,
        messages: &[Value],
        tools: &[Value],
    ) -> Result<Response, AgentError> {
        let mut body = json!({
            "model": self.settings.model,
            "messages": messages,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        if !tools.is_empty() {
            body["tools"] = json!(tools);
        }
        let mut stream = client::open(&self.endpoint, body);
        let mut response = Response::default();
        loop {
            match stream.next().await {
                // The body ended (some servers send no `[DONE]`).
                None => break,
                Some(Ok(data)) if data.trim() == "[DONE]" => break,
                Some(Ok(data)) => {
                    let mut delta = parse_chunk(&data).map_err(llm_error)?;
                    if let Some(reasoning) = delta.reasoning.take() {
                        run.think(reasoning).await;
                    }
                    if let Some(text) = &delta.content {
                        run.partial(text.clone()).await;
                    }
                    response.add(&mut delta).map_err(llm_error)?;
                }
                // Finished, but the connection was kept open without `[DONE]`.
                Some(Err(StreamError::Idle(_))) if response.finish_reason.is_some() => break,
                Some(Err(e)) => return Err(llm_error(e.to_string())),
            }
        }
        if response.finish_reason.is_none() {
            return Err(llm_error(
                "the model's stream ended without a finish_reason",
            ));
        }
        Ok(response)
    }

    /// Runs one of the model's tool calls and words its outcome for the model (the `content`
    /// of its `tool` message). Never fails: trouble goes back to the model.
    async fn run_call(&self, run: &AgentRun, call: &ToolCall) -> String {
        let args = match call.parsed_arguments() {
            Ok(args) => args,
            Err(why) => return tool_error("invalid_args", &why),
        };
        if !self.settings.offers(&call.name) || !run.toolbox().contains(&call.name) {
            return tool_error("unknown_tool", &format!("no tool named {:?}", call.name));
        }
        let outcome = if self.settings.approve_tools.contains(&call.name) {
            match run.approve(&call.name, args, None).await {
                Approval::Approved(approved) => run.call_approved(approved).await,
                Approval::Denied => return tool_error("denied", "the user denied this call"),
                Approval::Expired => {
                    return tool_error("denied", "the user did not approve this call in time")
                }
            }
        } else {
            run.tool(&call.name, args).await
        };
        match outcome {
            Ok(Value::String(text)) => text,
            Ok(result) => result.to_string(),
            Err(e) => tool_error(&e.code, &e.message),
        }
    }
}

#[async_trait]
impl Agent for Llm {
    fn name(&self) -> &str {
        "llm"
    }

    fn description(&self) -> &str {
        "Asks the configured language model, which may call the server's tools: a string (one user message) or {\"messages\":[{\"role\":..,\"content\":..}],\"system\"?:..}; answers with the model's final text."
    }

    fn input_schema(&self) -> Value {
        json!({"oneOf": [
            {"type": "string", "minLength": 1},
            {"type": "object", "required": ["messages"], "additionalProperties": false, "properties": {
                "system": {"type": "string"},
                "messages": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["role", "content"], "additionalProperties": false,
                    "properties": {
                        "role": {"enum": ["system", "user", "assistant"]},
                        "content": {"type": "string"},
                    },
                }},
            }},
        ]})
    }

    fn check_input(&self, input: &Value, _tools: &Toolbox) -> Result<(), String> {
        conversation(input).map(|_| ())
    }

    async fn run(self: Arc<Self>, run: AgentRun, input: Value) -> Result<Value, AgentError> {
        let mut messages = conversation(&input).map_err(AgentError::failed)?;
        let tools = self.offered_tools(run.toolbox());
        // Present from the start, so a run that fails still says what it used.
        add_usage(&run, Usage::default());
        let mut text = String::new();
        for step in 1..=self.settings.max_steps {
            let response = self.call_model(&run, &messages, &tools).await?;
            if let Some(usage) = response.usage {
                add_usage(&run, usage);
            }
            text.clone_from(&response.text);
            let calls = response.tool_calls();
            if response.finish_reason.as_deref() != Some("tool_calls") || calls.is_empty() {
                break;
            }
            if step == self.settings.max_steps {
                // No model call is left to read the results: the calls are not run.
                log::info!(
                    "run {}: llm stopped after {step} model calls (--llm-max-steps)",
                    run.run_id()
                );
                break;
            }
            messages.push(json!({
                "role": "assistant",
                "content": if response.text.is_empty() { Value::Null } else { json!(response.text) },
                "tool_calls": calls.iter().map(ToolCall::to_message).collect::<Vec<_>>(),
            }));
            // The calls run at once, as the model asked for them together.
            let results = join_all(calls.iter().map(|call| self.run_call(&run, call))).await;
            for (call, content) in calls.iter().zip(results) {
                messages.push(json!({"role": "tool", "tool_call_id": call.id, "content": content}));
            }
        }
        Ok(Value::String(text))
    }
}

fn add_usage(run: &AgentRun, usage: Usage) {
    run.add_usage("prompt_tokens", usage.prompt_tokens);
    run.add_usage("completion_tokens", usage.completion_tokens);
    run.add_usage("total_tokens", usage.total_tokens);
}

fn llm_error(message: impl Into<String>) -> AgentError {
    AgentError {
        code: "llm_error".into(),
        message: message.into(),
    }
}

/// A tool's failure as the model reads it.
fn tool_error(code: &str, message: &str) -> String {
    json!({"error": {"code": code, "message": message}}).to_string()
}

const INPUT_FORMS: &str =
    "llm takes a string, or {\"messages\":[{\"role\":\"user\",\"content\":\"...\"}],\"system\"?:\"...\"}";

/// The run's input as the first messages of the conversation, or why it is not one.
fn conversation(input: &Value) -> Result<Vec<Value>, String> {
    let fields = match input {
        Value::String(text) if text.is_empty() => return Err("the message is empty".into()),
        Value::String(text) => return Ok(vec![json!({"role": "user", "content": text})]),
        Value::Object(fields) => fields,
        _ => return Err(INPUT_FORMS.into()),
    };
    if let Some(other) = fields.keys().find(|k| *k != "messages" && *k != "system") {
        return Err(format!("unknown field {other:?}: {INPUT_FORMS}"));
    }
    let mut messages = Vec::new();
    match fields.get("system") {
        None => {}
        Some(Value::String(system)) => messages.push(json!({"role": "system", "content": system})),
        Some(_) => return Err("system must be a string".into()),
    }
    let given = fields
        .get("messages")
        .and_then(Value::as_array)
        .filter(|m| !m.is_empty())
        .ok_or_else(|| format!("messages must be a non-empty array: {INPUT_FORMS}"))?;
    for (i, message) in given.iter().enumerate() {
        let ok = message.as_object().is_some_and(|m| {
            m.len() == 2
                && matches!(
                    m.get("role").and_then(Value::as_str),
                    Some("system" | "user" | "assistant")
                )
                && m.get("content").is_some_and(Value::is_string)
        });
        if !ok {
            return Err(format!(
                "messages[{i}] must be {{\"role\": \"system\"|\"user\"|\"assistant\", \"content\": string}}"
            ));
        }
        messages.push(message.clone());
    }
    Ok(messages)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_input_forms_become_messages() {
        assert_eq!(
            conversation(&json!("hi")).unwrap(),
            vec![json!({"role": "user", "content": "hi"})]
        );
        let input = json!({"system": "be brief", "messages": [
            {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}]});
        let m = conversation(&input).unwrap();
        assert_eq!(m.len(), 4);
        assert_eq!(m[0], json!({"role": "system", "content": "be brief"}));
        assert_eq!(m[3], json!({"role": "user", "content": "c"}));
    }

    #[test]
    fn other_inputs_are_refused_with_the_forms() {
        for bad in [
            json!(5),
            json!(null),
            json!([]),
            json!(""),
            json!({}),
            json!({"messages": []}),
            json!({"messages": "hi"}),
            json!({"messages": [{"role": "tool", "content": "x"}]}),
            json!({"messages": [{"role": "user", "content": 1}]}),
            json!({"messages": [{"role": "user", "content": "x", "extra": 1}]}),
            json!({"messages": [{"role": "user", "content": "x"}], "system": 1}),
            json!({"messages": [{"role": "user", "content": "x"}], "temperature": 1}),
        ] {
            assert!(conversation(&bad).is_err(), "{bad}");
        }
        assert!(conversation(&json!(5)).unwrap_err().contains("messages"));
    }

    #[test]
    fn the_key_is_not_in_debug_output() {
        let s = LlmSettings {
            base_url: "http://x".into(),
            model: "m".into(),
            api_key: Some("sk-very-secret".into()),
            tools: None,
            max_steps: 8,
            approve_tools: vec![],
            idle_timeout: Duration::from_secs(1),
        };
        assert!(!format!("{s:?}").contains("sk-very-secret"));
        assert!(s.offers("calculator") && !s.offers("fail") && !s.offers("panic"));
    }
}
