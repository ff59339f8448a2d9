//! The Vercel AI SDK's UI message stream (`POST /v1/ai-sdk/{agent}`, PROTOCOL.md section 13)
//! for one run: what `useChat` and `readUIMessageStream` read, as one assistant message.
//!
//! The SDK's 5.x and early 6.x schemas refuse unknown keys, so every part carries only fields
//! those schemas name. Text and reasoning parts are opened before their first delta and closed
//! before anything else; tools are dynamic (`dynamic: true`: agentcast's tools are not typed
//! on the client); the stream ends exactly once, with `finish`, `error` or `abort`, and then
//! `[DONE]`. Part ids are the run id plus an ordinal: a replay gives the same ids.

use std::collections::HashMap;

use serde_json::{json, Value};

use super::{tool_call_id, Ending, RunEncoder, RunEvent};

#[derive(Debug, Clone, PartialEq)]
enum Open {
    Text(String),
    Reasoning(String),
}

#[derive(Debug, Default)]
pub struct AiSdkEncoder {
    started: bool,
    finished: bool,
    run_id: String,
    open: Option<Open>,
    /// Text and reasoning parts given an id so far.
    parts: u32,
    /// Approvals asked, by interrupt id: the tool call each is about.
    approvals: HashMap<String, String>,
}

impl AiSdkEncoder {
    fn next_id(&mut self, what: &str) -> String {
        self.parts += 1;
        format!("{}-{what}-{}", self.run_id, self.parts)
    }

    fn close(&mut self, out: &mut Vec<Value>) {
        match self.open.take() {
            Some(Open::Text(id)) => out.push(json!({"type": "text-end", "id": id})),
            Some(Open::Reasoning(id)) => out.push(json!({"type": "reasoning-end", "id": id})),
            None => {}
        }
    }

    /// A piece of text or reasoning, opening its part first when another kind is open.
    fn piece(&mut self, reasoning: bool, delta: &str, out: &mut Vec<Value>) {
        if delta.is_empty() {
            return;
        }
        let what = if reasoning { "reasoning" } else { "text" };
        let open = match (&self.open, reasoning) {
            (Some(Open::Reasoning(id)), true) | (Some(Open::Text(id)), false) => Some(id.clone()),
            _ => None,
        };
        let id = match open {
            Some(id) => id,
            None => {
                self.close(out);
                let id = self.next_id(what);
                out.push(json!({"type": format!("{what}-start"), "id": id}));
                self.open = Some(if reasoning {
                    Open::Reasoning(id.clone())
                } else {
                    Open::Text(id.clone())
                });
                id
            }
        };
        out.push(json!({"type": format!("{what}-delta"), "id": id, "delta": delta}));
    }

    /// The tool call's part, in state `input-available`.
    fn tool_input(&mut self, call: &str, tool: &str, input: &Value, out: &mut Vec<Value>) {
        self.close(out);
        out.push(
            json!({"type": "tool-input-available", "toolCallId": call, "toolName": tool,
                        "input": input, "dynamic": true}),
        );
    }

    fn tool_output(&mut self, event: &RunEvent<'_>, out: &mut Vec<Value>) {
        self.close(out);
        let call = tool_call_id(&self.run_id, event.str("tool_call_id"));
        if event.field("ok").as_bool() == Some(true) {
            out.push(json!({"type": "tool-output-available", "toolCallId": call,
                            "output": event.field("result"), "dynamic": true}));
        } else {
            let error = event.field("error");
            let text = error
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("the tool failed");
            out.push(json!({"type": "tool-output-error", "toolCallId": call,
                            "errorText": text, "dynamic": true}));
        }
    }

    /// An approval becomes the tool's part (its input, as asked) and the SDK's approval
    /// request on it. Questions for free input have no AI SDK part: they are not shown.
    fn question(&mut self, event: &RunEvent<'_>, out: &mut Vec<Value>) {
        if event.str("kind") != "approval" {
            return;
        }
        let interrupt = event.str("interrupt_id");
        let call = match event.data.get("tool_call_id").and_then(Value::as_str) {
            Some(call) => tool_call_id(&self.run_id, call),
            None => tool_call_id(&self.run_id, interrupt),
        };
        self.tool_input(&call, event.str("tool"), event.field("args"), out);
        out.push(
            json!({"type": "tool-approval-request", "approvalId": interrupt, "toolCallId": call}),
        );
        self.approvals.insert(interrupt.to_owned(), call);
    }

    /// A denied or expired approval: the call will not run.
    fn answer(&mut self, event: &RunEvent<'_>, out: &mut Vec<Value>) {
        let Some(call) = self.approvals.remove(event.str("interrupt_id")) else {
            return;
        };
        let approved = event.field("expired").as_bool() != Some(true)
            && event
                .field("response")
                .get("approved")
                .and_then(Value::as_bool)
                == Some(true);
        if !approved {
            self.close(out);
            out.push(json!({"type": "tool-output-denied", "toolCallId": call}));
        }
    }

    fn end(&mut self, event: &RunEvent<'_>, out: &mut Vec<Value>) {
        self.close(out);
        let ending = Ending::of(event);
        out.push(match ending.status {
            "succeeded" => json!({"type": "finish"}),
            "cancelled" => json!({"type": "abort"}),
            _ => json!({"type": "error", "errorText": ending.message}),
        });
        self.finished = true;
    }
}

impl RunEncoder for AiSdkEncoder {
    fn encode(&mut self, event: &RunEvent<'_>) -> Vec<Value> {
        let mut out = Vec::new();
        if self.finished {
            return out;
        }
        if !self.started {
            self.started = true;
            self.run_id = event.run_id.to_owned();
            out.push(json!({"type": "start", "messageId": self.run_id}));
        }
        match event.kind {
            "agent_started" => {}
            "agent_thinking" => self.piece(true, event.str("text"), &mut out),
            "partial_result" => self.piece(false, event.str("text"), &mut out),
            "tool_executing" => {
                let call = tool_call_id(&self.run_id, event.str("tool_call_id"));
                self.tool_input(&call, event.str("tool"), event.field("args"), &mut out);
            }
            // Keyed by the call: each update replaces the last in the message.
            "tool_progress" => out.push(json!({"type": "data-tool-progress",
            "id": tool_call_id(&self.run_id, event.str("tool_call_id")),
            "data": {
                "toolCallId": tool_call_id(&self.run_id, event.str("tool_call_id")),
                "tool": event.str("tool"),
                "message": event.str("message"),
                "fraction": event.field("fraction"),
            }})),
            "tool_completed" => self.tool_output(event, &mut out),
            "input_requested" => self.question(event, &mut out),
            "input_received" => self.answer(event, &mut out),
            "agent_completed" => self.end(event, &mut out),
            _ => {}
        }
        out
    }

    fn finished(&self) -> bool {
        self.finished
    }

    fn trailer(&self) -> Option<&'static str> {
        Some("[DONE]")
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

    /// The fields the SDK's strict (5.x) schemas allow, per part type.
    fn allowed(kind: &str) -> &'static [&'static str] {
        match kind {
            "start" => &["type", "messageId"],
            "text-start" | "text-end" | "reasoning-start" | "reasoning-end" => &["type", "id"],
            "text-delta" | "reasoning-delta" => &["type", "id", "delta"],
            "tool-input-available" => &["type", "toolCallId", "toolName", "input", "dynamic"],
            "tool-output-available" => &["type", "toolCallId", "output", "dynamic"],
            "tool-output-error" => &["type", "toolCallId", "errorText", "dynamic"],
            "tool-approval-request" => &["type", "approvalId", "toolCallId"],
            "tool-output-denied" => &["type", "toolCallId"],
            "data-tool-progress" => &["type", "id", "data"],
            "finish" | "abort" => &["type"],
            "error" => &["type", "errorText"],
            _ => &[],
        }
    }

    /// Checks what the SDK's stream processing relies on: `start` first, deltas inside their
    /// part, tool outputs after their input, no unknown keys, exactly one ending, last.
    fn verify(out: &[Value]) {
        assert_eq!(out[0]["type"], "start");
        let mut open = std::collections::HashSet::new();
        let mut tools = std::collections::HashSet::new();
        for (i, part) in out.iter().enumerate() {
            let kind = part["type"].as_str().unwrap_or("");
            for key in part
                .as_object()
                .map(|o| o.keys().collect())
                .unwrap_or(Vec::new())
            {
                assert!(allowed(kind).contains(&key.as_str()), "{kind} has {key}");
            }
            let id = part["id"].as_str().unwrap_or("").to_owned();
            let call = part["toolCallId"].as_str().unwrap_or("").to_owned();
            match kind {
                "text-start" | "reasoning-start" => assert!(open.insert(id)),
                "text-delta" | "reasoning-delta" => assert!(open.contains(&id), "{part}"),
                "text-end" | "reasoning-end" => assert!(open.remove(&id)),
                "tool-input-available" => {
                    tools.insert(call);
                }
                "tool-output-available"
                | "tool-output-error"
                | "tool-approval-request"
                | "tool-output-denied" => assert!(tools.contains(&call), "{part}"),
                "finish" | "error" | "abort" => {
                    assert_eq!(i, out.len() - 1, "the ending is not last: {out:#?}");
                    assert!(open.is_empty());
                }
                _ => {}
            }
        }
        let endings = out
            .iter()
            .filter(|p| ["finish", "error", "abort"].contains(&p["type"].as_str().unwrap_or("")))
            .count();
        assert_eq!(endings, 1, "{out:#?}");
    }

    fn run(events: &[Value]) -> Vec<Value> {
        let mut encoder = AiSdkEncoder::default();
        let out = feed(&mut encoder, events);
        assert!(encoder.finished());
        assert_eq!(encoder.trailer(), Some("[DONE]"));
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
                "start",
                "reasoning-start",
                "reasoning-delta",
                "reasoning-delta",
                "reasoning-end",
                "text-start",
                "text-delta",
                "text-end",
                "tool-input-available",
                "data-tool-progress",
                "tool-output-available",
                "text-start",
                "text-delta",
                "text-end",
                "finish",
            ]
        );
        assert_eq!(out[0], json!({"type": "start", "messageId": RUN}));
        assert_eq!(
            out[2],
            json!({"type": "reasoning-delta", "id": "run_T-reasoning-1", "delta": "let me "})
        );
        assert_eq!(out[5]["id"], "run_T-text-2");
        assert_eq!(
            out[8],
            json!({"type": "tool-input-available", "toolCallId": "run_T-tc_1",
                   "toolName": "calculator", "input": {"expr": "2+2"}, "dynamic": true})
        );
        assert_eq!(out[9]["id"], "run_T-tc_1");
        assert_eq!(out[9]["data"]["fraction"], 0.5);
        assert_eq!(
            out[10],
            json!({"type": "tool-output-available", "toolCallId": "run_T-tc_1", "output": 4, "dynamic": true})
        );
        assert_eq!(out[11]["id"], "run_T-text-3");
    }

    #[test]
    fn a_replay_gives_the_same_ids() {
        let events = [
            started(),
            thinking("a"),
            partial("b"),
            executing("tc_1"),
            completed_ok("tc_1"),
            ended("succeeded"),
        ];
        assert_eq!(run(&events), run(&events));
    }

    #[test]
    fn a_failed_tool_call_is_an_output_error() {
        let out = run(&[
            started(),
            executing("tc_1"),
            completed_err("tc_1"),
            ended("succeeded"),
        ]);
        assert_eq!(
            out[2],
            json!({"type": "tool-output-error", "toolCallId": "run_T-tc_1", "errorText": "no luck", "dynamic": true})
        );
    }

    #[test]
    fn failed_and_timed_out_runs_end_with_an_error_carrying_its_message() {
        for (status, message) in [("failed", "boom"), ("timed_out", "the run took too long")] {
            let out = run(&[started(), partial("half"), ended(status)]);
            assert_eq!(
                types(&out),
                ["start", "text-start", "text-delta", "text-end", "error"]
            );
            assert_eq!(out[4], json!({"type": "error", "errorText": message}));
        }
    }

    #[test]
    fn a_cancelled_run_ends_with_abort() {
        let out = run(&[started(), thinking("hm"), ended("cancelled")]);
        assert_eq!(
            types(&out),
            [
                "start",
                "reasoning-start",
                "reasoning-delta",
                "reasoning-end",
                "abort"
            ]
        );
    }

    #[test]
    fn an_approval_is_the_tools_approval_request() {
        let out = run(&[
            started(),
            partial("may I?"),
            approval("int_1", "tc_1"),
            received("int_1", json!({"approved": true}), false),
            executing("tc_1"),
            completed_ok("tc_1"),
            ended("succeeded"),
        ]);
        assert_eq!(
            types(&out),
            [
                "start",
                "text-start",
                "text-delta",
                "text-end",
                "tool-input-available",
                "tool-approval-request",
                "tool-input-available",
                "tool-output-available",
                "finish"
            ]
        );
        assert_eq!(out[4]["toolCallId"], "run_T-tc_1");
        assert_eq!(out[4]["input"], json!({"expr": "2+2"}));
        assert_eq!(
            out[5],
            json!({"type": "tool-approval-request", "approvalId": "int_1", "toolCallId": "run_T-tc_1"})
        );
    }

    #[test]
    fn a_denied_or_expired_approval_is_output_denied() {
        for (response, expired) in [(json!({"approved": false}), false), (Value::Null, true)] {
            let out = run(&[
                started(),
                approval("int_1", "tc_1"),
                received("int_1", response, expired),
                ended("succeeded"),
            ]);
            assert_eq!(
                types(&out),
                [
                    "start",
                    "tool-input-available",
                    "tool-approval-request",
                    "tool-output-denied",
                    "finish"
                ]
            );
        }
    }

    #[test]
    fn a_question_for_input_is_not_shown() {
        let out = run(&[
            started(),
            question("int_2"),
            received("int_2", json!("Paris"), false),
            ended("succeeded"),
        ]);
        assert_eq!(types(&out), ["start", "finish"]);
    }

    #[test]
    fn nothing_follows_the_end_and_unknown_events_say_nothing() {
        let mut encoder = AiSdkEncoder::default();
        let out = feed(
            &mut encoder,
            &[started(), event("something_new", json!({})), thinking("")],
        );
        assert_eq!(types(&out), ["start"]);
        feed(&mut encoder, &[ended("failed")]);
        assert!(feed(&mut encoder, &[partial("late"), ended("succeeded")]).is_empty());
    }
}
