//! AG-UI's event stream (`POST /v1/agui/{agent}`, PROTOCOL.md section 13) for one run: what
//! CopilotKit and other AG-UI clients read.
//!
//! AG-UI's client verifier refuses content without its `*_START`, a `RUN_FINISHED` while a
//! message or tool call is open, and anything after the run's end; so this state machine
//! opens a text or reasoning message when its first piece arrives, closes it before anything
//! else is said, sends each tool call's start, arguments and end at once, and ends exactly
//! once. Message ids are the run id plus an ordinal: a replay gives the same ids.

use serde_json::{json, Map, Value};

use super::{tool_call_id, Ending, RunEncoder, RunEvent};

/// The message open right now: AG-UI content must sit between its start and end.
#[derive(Debug, Clone, PartialEq)]
enum Open {
    Text(String),
    Reasoning(String),
}

#[derive(Debug, Default)]
pub struct AgUiEncoder {
    started: bool,
    finished: bool,
    run_id: String,
    thread_id: String,
    open: Option<Open>,
    /// Messages (text, reasoning, tool results) given an id so far.
    messages: u32,
    /// The latest assistant text message: the parent of the tool calls that follow it.
    last_text: Option<String>,
}

impl AgUiEncoder {
    fn next_id(&mut self, what: &str) -> String {
        self.messages += 1;
        format!("{}-{what}-{}", self.run_id, self.messages)
    }

    fn close(&mut self, out: &mut Vec<Value>) {
        match self.open.take() {
            Some(Open::Text(id)) => out.push(json!({"type": "TEXT_MESSAGE_END", "messageId": id})),
            Some(Open::Reasoning(id)) => {
                out.push(json!({"type": "REASONING_MESSAGE_END", "messageId": id}));
                out.push(json!({"type": "REASONING_END", "messageId": id}));
            }
            None => {}
        }
    }

    fn text(&mut self, delta: &str, out: &mut Vec<Value>) {
        if delta.is_empty() {
            return;
        }
        let id = match &self.open {
            Some(Open::Text(id)) => id.clone(),
            _ => {
                self.close(out);
                let id = self.next_id("text");
                out.push(
                    json!({"type": "TEXT_MESSAGE_START", "messageId": id, "role": "assistant"}),
                );
                self.open = Some(Open::Text(id.clone()));
                self.last_text = Some(id.clone());
                id
            }
        };
        out.push(json!({"type": "TEXT_MESSAGE_CONTENT", "messageId": id, "delta": delta}));
    }

    fn reasoning(&mut self, delta: &str, out: &mut Vec<Value>) {
        if delta.is_empty() {
            return;
        }
        let id = match &self.open {
            Some(Open::Reasoning(id)) => id.clone(),
            _ => {
                self.close(out);
                let id = self.next_id("reasoning");
                out.push(json!({"type": "REASONING_START", "messageId": id}));
                out.push(
                    json!({"type": "REASONING_MESSAGE_START", "messageId": id, "role": "reasoning"}),
                );
                self.open = Some(Open::Reasoning(id.clone()));
                id
            }
        };
        out.push(json!({"type": "REASONING_MESSAGE_CONTENT", "messageId": id, "delta": delta}));
    }

    fn tool_call(&mut self, event: &RunEvent<'_>, out: &mut Vec<Value>) {
        self.close(out);
        let id = tool_call_id(&self.run_id, event.str("tool_call_id"));
        let mut start = json!({"type": "TOOL_CALL_START", "toolCallId": id,
                               "toolCallName": event.str("tool")});
        if let Some(parent) = &self.last_text {
            start["parentMessageId"] = json!(parent);
        }
        out.push(start);
        // The arguments are complete when the call begins: one piece.
        out.push(json!({"type": "TOOL_CALL_ARGS", "toolCallId": id,
                        "delta": event.field("args").to_string()}));
        out.push(json!({"type": "TOOL_CALL_END", "toolCallId": id}));
    }

    fn tool_result(&mut self, event: &RunEvent<'_>, out: &mut Vec<Value>) {
        self.close(out);
        let call = tool_call_id(&self.run_id, event.str("tool_call_id"));
        // AG-UI's content is a string: the result's JSON, or the error's.
        let content = if event.field("ok").as_bool() == Some(true) {
            event.field("result").to_string()
        } else {
            json!({ "error": event.field("error") }).to_string()
        };
        let id = self.next_id("result");
        out.push(
            json!({"type": "TOOL_CALL_RESULT", "messageId": id, "toolCallId": call,
                        "content": content, "role": "tool"}),
        );
    }

    /// A question to the user pauses the AG-UI run: it finishes with the interrupt outcome
    /// (the agentcast run waits for the answer, which comes through agentcast's `respond`).
    fn interrupt(&mut self, event: &RunEvent<'_>, out: &mut Vec<Value>) {
        self.close(out);
        let kind = event.str("kind");
        let mut interrupt = Map::new();
        interrupt.insert("id".into(), json!(event.str("interrupt_id")));
        interrupt.insert(
            "reason".into(),
            json!(if kind == "approval" {
                "tool_approval"
            } else {
                "input"
            }),
        );
        interrupt.insert("message".into(), json!(event.str("message")));
        if let Some(call) = event.data.get("tool_call_id").and_then(Value::as_str) {
            interrupt.insert("toolCallId".into(), json!(tool_call_id(&self.run_id, call)));
        }
        if let Some(schema) = event.data.get("schema").filter(|s| s.is_object()) {
            interrupt.insert("responseSchema".into(), schema.clone());
        }
        if let Some(at) = event.data.get("expires_at").and_then(Value::as_str) {
            interrupt.insert("expiresAt".into(), json!(at));
        }
        if kind == "approval" {
            interrupt.insert(
                "metadata".into(),
                json!({"tool": event.field("tool"), "args": event.field("args")}),
            );
        }
        out.push(
            json!({"type": "RUN_FINISHED", "threadId": self.thread_id, "runId": self.run_id,
                        "outcome": {"type": "interrupt", "interrupts": [interrupt]}}),
        );
        self.finished = true;
    }

    fn end(&mut self, event: &RunEvent<'_>, out: &mut Vec<Value>) {
        self.close(out);
        let ending = Ending::of(event);
        let (thread, run) = (&self.thread_id, &self.run_id);
        out.push(match ending.status {
            "succeeded" => {
                let mut finished = json!({"type": "RUN_FINISHED", "threadId": thread, "runId": run,
                                          "outcome": {"type": "success"}});
                // AG-UI refuses a null result: leave it out instead.
                let result = event.field("result");
                if !result.is_null() {
                    finished["result"] = result.clone();
                }
                finished
            }
            "cancelled" => json!({"type": "RUN_FINISHED", "threadId": thread, "runId": run,
                                  "outcome": {"type": "cancelled"}}),
            _ => {
                let mut error = json!({"type": "RUN_ERROR", "message": ending.message});
                if let Some(code) = ending.code {
                    error["code"] = json!(code);
                }
                error
            }
        });
        self.finished = true;
    }
}

impl RunEncoder for AgUiEncoder {
    fn encode(&mut self, event: &RunEvent<'_>) -> Vec<Value> {
        let mut out = Vec::new();
        if self.finished {
            return out;
        }
        if !self.started {
            self.started = true;
            self.run_id = event.run_id.to_owned();
            // AG-UI needs a thread: a run started without one is its own.
            self.thread_id = event.thread_id.unwrap_or(event.run_id).to_owned();
            out.push(
                json!({"type": "RUN_STARTED", "threadId": self.thread_id, "runId": self.run_id}),
            );
        }
        match event.kind {
            "agent_started" => {}
            "agent_thinking" => self.reasoning(event.str("text"), &mut out),
            "partial_result" => self.text(event.str("text"), &mut out),
            "tool_executing" => self.tool_call(event, &mut out),
            "tool_progress" => {
                out.push(json!({"type": "CUSTOM", "name": "tool_progress", "value": {
                    "toolCallId": tool_call_id(&self.run_id, event.str("tool_call_id")),
                    "tool": event.str("tool"),
                    "message": event.str("message"),
                    "fraction": event.field("fraction"),
                }}))
            }
            "tool_completed" => self.tool_result(event, &mut out),
            "input_requested" => self.interrupt(event, &mut out),
            "agent_completed" => self.end(event, &mut out),
            // `input_received` settles a question the AG-UI stream already ended on; newer
            // event types have no AG-UI form yet.
            _ => {}
        }
        out
    }

    fn finished(&self) -> bool {
        self.finished
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::super::test_events::*;
    use super::*;

    fn types(out: &[Value]) -> Vec<&str> {
        out.iter()
            .map(|e| e["type"].as_str().unwrap_or("?"))
            .collect()
    }

    /// What AG-UI's client verifier checks, for the streams these tests make: the first event
    /// is RUN_STARTED, content sits inside its start and end, nothing is open at the end, and
    /// nothing follows the end.
    fn verify(out: &[Value]) {
        let mut open_text = std::collections::HashSet::new();
        let mut open_reasoning = std::collections::HashSet::new();
        let mut open_spans = std::collections::HashSet::new();
        let mut ended = false;
        assert_eq!(out[0]["type"], "RUN_STARTED", "{out:#?}");
        for e in &out[1..] {
            assert!(!ended, "an event after the end: {e}");
            let id = e["messageId"].as_str().unwrap_or("").to_owned();
            match e["type"].as_str().unwrap_or("") {
                "TEXT_MESSAGE_START" => assert!(open_text.insert(id)),
                "TEXT_MESSAGE_CONTENT" => assert!(open_text.contains(&id), "{e}"),
                "TEXT_MESSAGE_END" => assert!(open_text.remove(&id), "{e}"),
                "REASONING_START" => assert!(open_spans.insert(id)),
                "REASONING_MESSAGE_START" => assert!(open_reasoning.insert(id)),
                "REASONING_MESSAGE_CONTENT" => assert!(open_reasoning.contains(&id), "{e}"),
                "REASONING_MESSAGE_END" => assert!(open_reasoning.remove(&id), "{e}"),
                "REASONING_END" => assert!(open_spans.remove(&id), "{e}"),
                "RUN_FINISHED" | "RUN_ERROR" => {
                    assert!(
                        open_text.is_empty() && open_reasoning.is_empty() && open_spans.is_empty()
                    );
                    ended = true;
                }
                _ => {}
            }
        }
        assert!(ended, "the stream never ended: {out:#?}");
    }

    fn run(events: &[Value]) -> Vec<Value> {
        let mut encoder = AgUiEncoder::default();
        let out = feed(&mut encoder, events);
        assert!(encoder.finished());
        assert!(encoder.trailer().is_none());
        verify(&out);
        out
    }

    #[test]
    fn every_event_of_a_successful_run_in_order() {
        let out = run(&[
            started(),
            thinking("let me "),
            thinking("see"),
            partial("it is "),
            executing("tc_1"),
            progress("tc_1"),
            completed_ok("tc_1"),
            partial("4"),
            ended("succeeded"),
        ]);
        assert_eq!(
            types(&out),
            [
                "RUN_STARTED",
                "REASONING_START",
                "REASONING_MESSAGE_START",
                "REASONING_MESSAGE_CONTENT",
                "REASONING_MESSAGE_CONTENT",
                "REASONING_MESSAGE_END",
                "REASONING_END",
                "TEXT_MESSAGE_START",
                "TEXT_MESSAGE_CONTENT",
                "TEXT_MESSAGE_END",
                "TOOL_CALL_START",
                "TOOL_CALL_ARGS",
                "TOOL_CALL_END",
                "CUSTOM",
                "TOOL_CALL_RESULT",
                "TEXT_MESSAGE_START",
                "TEXT_MESSAGE_CONTENT",
                "TEXT_MESSAGE_END",
                "RUN_FINISHED",
            ]
        );
        assert_eq!(
            out[0],
            json!({"type": "RUN_STARTED", "threadId": "th_1", "runId": RUN})
        );
        assert_eq!(out[3]["delta"], "let me ");
        assert_eq!(out[3]["messageId"], "run_T-reasoning-1");
        assert_eq!(out[7]["messageId"], "run_T-text-2");
        assert_eq!(
            out[10],
            json!({"type": "TOOL_CALL_START", "toolCallId": "run_T-tc_1",
                   "toolCallName": "calculator", "parentMessageId": "run_T-text-2"})
        );
        assert_eq!(out[11]["delta"], r#"{"expr":"2+2"}"#);
        assert_eq!(out[13]["name"], "tool_progress");
        assert_eq!(out[13]["value"]["fraction"], 0.5);
        assert_eq!(out[13]["value"]["message"], "half");
        assert_eq!(
            out[14],
            json!({"type": "TOOL_CALL_RESULT", "messageId": "run_T-result-3",
                   "toolCallId": "run_T-tc_1", "content": "4", "role": "tool"})
        );
        assert_eq!(out[15]["messageId"], "run_T-text-4");
        assert_eq!(
            out[18],
            json!({"type": "RUN_FINISHED", "threadId": "th_1", "runId": RUN,
                   "outcome": {"type": "success"}, "result": "4"})
        );
    }

    #[test]
    fn a_replay_gives_the_same_ids() {
        let events = [
            started(),
            partial("a"),
            executing("tc_1"),
            completed_ok("tc_1"),
            ended("succeeded"),
        ];
        assert_eq!(run(&events), run(&events));
    }

    #[test]
    fn a_failed_tool_call_carries_its_error() {
        let out = run(&[
            started(),
            executing("tc_1"),
            completed_err("tc_1"),
            ended("succeeded"),
        ]);
        let result = out
            .iter()
            .find(|e| e["type"] == "TOOL_CALL_RESULT")
            .expect("a result");
        let content: Value =
            serde_json::from_str(result["content"].as_str().unwrap_or("")).unwrap_or_default();
        assert_eq!(content["error"]["message"], "no luck");
        // No text came first: no parent message.
        assert!(out[1].get("parentMessageId").is_none());
    }

    #[test]
    fn failed_and_timed_out_runs_end_with_run_error_and_its_message() {
        for (status, message, code) in [
            ("failed", "boom", "agent_failed"),
            ("timed_out", "the run took too long", "timed_out"),
        ] {
            let out = run(&[started(), thinking("hm"), ended(status)]);
            let last = out.last().cloned().unwrap_or_default();
            assert_eq!(
                last,
                json!({"type": "RUN_ERROR", "message": message, "code": code})
            );
            assert_eq!(out[out.len() - 2]["type"], "REASONING_END");
        }
    }

    #[test]
    fn a_failure_without_an_error_body_still_has_a_message() {
        let mut ended = ended("timed_out");
        ended["data"]["error"] = Value::Null;
        let out = run(&[started(), ended]);
        assert_eq!(out[1]["message"], "the run timed out");
        assert!(out[1].get("code").is_none());
    }

    #[test]
    fn a_cancelled_run_finishes_with_the_cancelled_outcome() {
        let out = run(&[started(), partial("par"), ended("cancelled")]);
        assert_eq!(types(&out)[3..], ["TEXT_MESSAGE_END", "RUN_FINISHED"]);
        assert_eq!(out[4]["outcome"], json!({"type": "cancelled"}));
        assert!(out[4].get("result").is_none());
    }

    #[test]
    fn an_approval_finishes_the_stream_with_the_interrupt_outcome() {
        let out = run(&[
            started(),
            partial("may I?"),
            approval("int_1", "tc_1"),
            received("int_1", json!({"approved": true}), false),
            executing("tc_1"),
            ended("succeeded"),
        ]);
        assert_eq!(
            types(&out),
            [
                "RUN_STARTED",
                "TEXT_MESSAGE_START",
                "TEXT_MESSAGE_CONTENT",
                "TEXT_MESSAGE_END",
                "RUN_FINISHED"
            ]
        );
        assert_eq!(
            out[4]["outcome"],
            json!({"type": "interrupt", "interrupts": [{
                "id": "int_1", "reason": "tool_approval", "message": "run calculator?",
                "toolCallId": "run_T-tc_1", "expiresAt": "2026-01-01T00:10:00.000000Z",
                "metadata": {"tool": "calculator", "args": {"expr": "2+2"}}}]})
        );
    }

    #[test]
    fn a_question_is_an_interrupt_with_its_schema() {
        let out = run(&[started(), question("int_2")]);
        let interrupt = &out[1]["outcome"]["interrupts"][0];
        assert_eq!(interrupt["reason"], "input");
        assert_eq!(interrupt["responseSchema"], json!({"type": "string"}));
        assert!(interrupt.get("toolCallId").is_none());
    }

    #[test]
    fn nothing_follows_the_end_and_unknown_events_say_nothing() {
        let mut encoder = AgUiEncoder::default();
        let out = feed(
            &mut encoder,
            &[started(), event("something_new", json!({})), partial("")],
        );
        assert_eq!(types(&out), ["RUN_STARTED"]);
        feed(&mut encoder, &[ended("succeeded")]);
        assert!(feed(&mut encoder, &[partial("late"), ended("failed")]).is_empty());
    }

    #[test]
    fn a_run_without_a_thread_is_its_own_thread() {
        let mut first = started();
        first["thread_id"] = Value::Null;
        let out = feed(&mut AgUiEncoder::default(), &[first]);
        assert_eq!(out[0]["threadId"], RUN);
    }
}
