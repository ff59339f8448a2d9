//! The frontends' own wire protocols (PROTOCOL.md section 13): one run's agentcast events,
//! re-encoded for chat frontends that speak AG-UI ([`agui`]) or the Vercel AI SDK's UI
//! message stream ([`ai_sdk`]).
//!
//! Each encoder is a pure state machine over one run: it is fed that run's events in order
//! (as the JSON the registry encoded, so it reads exactly what a WebSocket tab reads) and
//! answers each with zero or more events of its format. Its ids are derived from the run id
//! and ordinals only, so replaying the same run gives the same ids. The SSE session
//! ([`crate::sse`]) writes what they answer.

pub mod agui;
pub mod ai_sdk;

use serde_json::Value;

/// One agentcast run event as the encoders read it: the fields of its wire JSON.
#[derive(Debug, Clone, Copy)]
pub struct RunEvent<'a> {
    pub kind: &'a str,
    pub run_id: &'a str,
    pub thread_id: Option<&'a str>,
    pub data: &'a Value,
}

impl<'a> RunEvent<'a> {
    /// Reads an event frame's JSON (`{type, seq, run_id, thread_id, ts, data}`); `None` if it
    /// is not one.
    pub fn from_json(frame: &'a Value) -> Option<RunEvent<'a>> {
        Some(RunEvent {
            kind: frame.get("type")?.as_str()?,
            run_id: frame.get("run_id")?.as_str()?,
            thread_id: frame.get("thread_id").and_then(Value::as_str),
            data: frame.get("data")?,
        })
    }

    /// A string field of `data`, or "".
    fn str(&self, field: &str) -> &'a str {
        self.data.get(field).and_then(Value::as_str).unwrap_or("")
    }

    /// A field of `data`, or null.
    fn field(&self, field: &str) -> &'a Value {
        self.data.get(field).unwrap_or(&Value::Null)
    }
}

/// Turns one run's agentcast events into one frontend format's events.
pub trait RunEncoder: Send {
    /// The events of this format for `event`, in order. Nothing once [`finished`](Self::finished).
    fn encode(&mut self, event: &RunEvent<'_>) -> Vec<Value>;

    /// The stream has said its last event: the response ends (after [`trailer`](Self::trailer)).
    fn finished(&self) -> bool;

    /// A last `data:` line that is not an event (the AI SDK's `[DONE]`).
    fn trailer(&self) -> Option<&'static str> {
        None
    }
}

/// Which of the frontends' encodings a stream speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    AgUi,
    AiSdk,
}

impl Encoding {
    /// A fresh encoder for one run.
    pub fn encoder(self) -> Box<dyn RunEncoder> {
        match self {
            Encoding::AgUi => Box::<agui::AgUiEncoder>::default(),
            Encoding::AiSdk => Box::<ai_sdk::AiSdkEncoder>::default(),
        }
    }
}

/// How a run ended, from its `agent_completed`: the status and, for a failure, the error's
/// code and message (a stock message when the event carries none).
pub(crate) struct Ending<'a> {
    pub status: &'a str,
    pub code: Option<&'a str>,
    pub message: String,
}

impl<'a> Ending<'a> {
    pub fn of(event: &RunEvent<'a>) -> Ending<'a> {
        let status = event.str("status");
        let error = event.field("error");
        let code = error.get("code").and_then(Value::as_str);
        let message = match error.get("message").and_then(Value::as_str) {
            Some(message) => message.to_owned(),
            None if status == "timed_out" => "the run timed out".to_owned(),
            None => format!("the run ended {status}"),
        };
        Ending {
            status,
            code,
            message,
        }
    }
}

/// The id both encoders give an agentcast tool call: unique across the runs of a thread
/// (agentcast numbers calls per run: `tc_1`, `tc_2`...), and the same on every replay.
pub(crate) fn tool_call_id(run_id: &str, call: &str) -> String {
    format!("{run_id}-{call}")
}

#[cfg(test)]
pub(crate) mod test_events {
    //! Agentcast events as the registry encodes them, for the encoders' tests.
    use serde_json::{json, Value};

    pub const RUN: &str = "run_T";

    pub fn event(kind: &str, data: Value) -> Value {
        json!({"type": kind, "seq": 1, "run_id": RUN, "thread_id": "th_1",
               "ts": "2026-01-01T00:00:00.000000Z", "data": data})
    }
    pub fn started() -> Value {
        event("agent_started", json!({"agent": "scripted", "input": {}}))
    }
    pub fn thinking(text: &str) -> Value {
        event("agent_thinking", json!({ "text": text }))
    }
    pub fn partial(text: &str) -> Value {
        event("partial_result", json!({ "text": text }))
    }
    pub fn executing(call: &str) -> Value {
        event(
            "tool_executing",
            json!({"tool_call_id": call, "tool": "calculator", "args": {"expr": "2+2"}}),
        )
    }
    pub fn progress(call: &str) -> Value {
        event(
            "tool_progress",
            json!({"tool_call_id": call, "tool": "sleep", "message": "half", "fraction": 0.5}),
        )
    }
    pub fn completed_ok(call: &str) -> Value {
        event(
            "tool_completed",
            json!({"tool_call_id": call, "tool": "calculator", "ok": true, "result": 4,
                   "error": null, "duration_ms": 1}),
        )
    }
    pub fn completed_err(call: &str) -> Value {
        event(
            "tool_completed",
            json!({"tool_call_id": call, "tool": "fail", "ok": false, "result": null,
                   "error": {"code": "tool_failed", "message": "no luck"}, "duration_ms": 1}),
        )
    }
    pub fn ended(status: &str) -> Value {
        let error = match status {
            "succeeded" => Value::Null,
            "timed_out" => json!({"code": "timed_out", "message": "the run took too long"}),
            "cancelled" => json!({"code": "cancelled", "message": "cancelled by its user"}),
            _ => json!({"code": "agent_failed", "message": "boom"}),
        };
        event(
            "agent_completed",
            json!({"status": status, "result": if status == "succeeded" { json!("4") } else { Value::Null },
                   "error": error, "duration_ms": 5, "usage": null}),
        )
    }
    pub fn approval(id: &str, call: &str) -> Value {
        event(
            "input_requested",
            json!({"interrupt_id": id, "kind": "approval", "message": "run calculator?",
                   "tool_call_id": call, "tool": "calculator", "args": {"expr": "2+2"},
                   "expires_at": "2026-01-01T00:10:00.000000Z"}),
        )
    }
    pub fn question(id: &str) -> Value {
        event(
            "input_requested",
            json!({"interrupt_id": id, "kind": "input", "message": "which city?",
                   "schema": {"type": "string"}, "expires_at": "2026-01-01T00:10:00.000000Z"}),
        )
    }
    pub fn received(id: &str, response: Value, expired: bool) -> Value {
        event(
            "input_received",
            json!({"interrupt_id": id, "response": response, "expired": expired}),
        )
    }

    /// Feeds events to an encoder, returning everything it said.
    pub fn feed(encoder: &mut dyn super::RunEncoder, events: &[Value]) -> Vec<Value> {
        events
            .iter()
            .flat_map(|e| {
                let event = super::RunEvent::from_json(e).expect("a run event");
                encoder.encode(&event)
            })
            .collect()
    }
}
