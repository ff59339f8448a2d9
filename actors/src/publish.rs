//! What a publisher sends (PROTOCOL.md section 11): a batch `{events: [{n, type, data}, ...]}`
//! read into run events, with the data of section 2 checked field by field.
//!
//! Pure functions: the rules of the run (order, open calls, the end) are not checked here but
//! by the run's [`RunLedger`](crate::ledger::RunLedger) in the registry, the one place that
//! checks every run's events; `n` (exactly once) is the registry's too, since it depends on
//! what was accepted before.

use serde_json::{Map, Value};

use crate::event::{ErrorBody, EventData, RunStatus};

/// Most events in one batch.
pub const MAX_BATCH_EVENTS: usize = 1000;
/// Highest `n`: the largest integer every JSON reader keeps exactly.
pub const MAX_N: u64 = 1 << 53;
/// Longest agent name a publisher may give its run.
pub const MAX_AGENT_NAME: usize = 64;

/// One event of a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct PublishedEvent {
    /// The publisher's number for it: 1, 2, 3, ... over the run.
    pub n: u64,
    pub data: EventData,
    /// `duration_ms` was left out: the server fills it in.
    pub untimed: bool,
}

impl PublishedEvent {
    /// The event as a publisher sends it (to forward a batch to the run's node, which reads
    /// it again with [`parse_batch`]).
    pub fn to_wire(&self) -> Value {
        let mut data = serde_json::to_value(&self.data).unwrap_or(Value::Null);
        if let Value::Object(data) = &mut data {
            if self.untimed {
                data.remove("duration_ms");
            }
        }
        serde_json::json!({"n": self.n, "type": self.data.kind(), "data": data})
    }
}

/// Why a batch was refused before the run was looked at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchFault {
    /// Not the shape of section 11 or of an event's data (400 `invalid_field`).
    Shape {
        index: Option<usize>,
        message: String,
    },
    /// A type a publisher may not send (409 `invalid_field`: it breaks a rule of the run).
    Type { index: usize, message: String },
}

/// Reads a batch's body.
pub fn parse_batch(body: &Value) -> Result<Vec<PublishedEvent>, BatchFault> {
    let shape = |index, message: String| BatchFault::Shape { index, message };
    let events = body
        .get("events")
        .and_then(Value::as_array)
        .ok_or_else(|| {
            shape(
                None,
                "the body is {\"events\": [{n, type, data}, ...]}".into(),
            )
        })?;
    if events.len() > MAX_BATCH_EVENTS {
        return Err(shape(
            None,
            format!(
                "{} events in one batch; at most {MAX_BATCH_EVENTS}",
                events.len()
            ),
        ));
    }
    events
        .iter()
        .enumerate()
        .map(|(i, event)| parse_event(event).map_err(|fault| fault.at(i)))
        .collect()
}

/// A fault in one event, before its index is known.
enum Fault {
    Shape(String),
    Type(String),
}

impl Fault {
    fn at(self, index: usize) -> BatchFault {
        match self {
            Fault::Shape(message) => BatchFault::Shape {
                index: Some(index),
                message: format!("event {index}: {message}"),
            },
            Fault::Type(message) => BatchFault::Type {
                index,
                message: format!("event {index}: {message}"),
            },
        }
    }
}

fn parse_event(event: &Value) -> Result<PublishedEvent, Fault> {
    let obj = event
        .as_object()
        .ok_or_else(|| Fault::Shape("an event is {n, type, data}".into()))?;
    let n = obj
        .get("n")
        .and_then(Value::as_u64)
        .filter(|n| (1..=MAX_N).contains(n))
        .ok_or_else(|| Fault::Shape("n must be a whole number from 1 to 2^53".into()))?;
    let kind = obj
        .get("type")
        .and_then(Value::as_str)
        .ok_or_else(|| Fault::Shape("type must be a string".into()))?;
    let empty = Map::new();
    let data = match obj.get("data") {
        None | Some(Value::Null) => &empty,
        Some(Value::Object(data)) => data,
        Some(_) => return Err(Fault::Shape("data must be an object".into())),
    };
    let d = Data(data);
    let mut untimed = false;
    let data = match kind {
        "agent_thinking" => EventData::AgentThinking {
            text: d.string("text")?,
        },
        "partial_result" => EventData::PartialResult {
            text: d.string("text")?,
        },
        "tool_executing" => EventData::ToolExecuting {
            tool_call_id: d.id("tool_call_id")?,
            tool: d.id("tool")?,
            args: d.value_or("args", Value::Object(Map::new())),
        },
        "tool_progress" => EventData::ToolProgress {
            tool_call_id: d.id("tool_call_id")?,
            tool: d.id("tool")?,
            message: d.string("message")?,
            fraction: d.fraction()?,
        },
        "tool_completed" => {
            let ok = d.bool("ok")?;
            let (duration_ms, missing) = d.duration()?;
            untimed = missing;
            EventData::ToolCompleted {
                tool_call_id: d.id("tool_call_id")?,
                tool: d.id("tool")?,
                ok,
                result: d.value_or("result", Value::Null),
                error: d.error(!ok)?,
                duration_ms,
            }
        }
        "agent_completed" => {
            let status = d.status()?;
            let (duration_ms, missing) = d.duration()?;
            untimed = missing;
            let usage = match data.get("usage") {
                None | Some(Value::Null) => Value::Null,
                Some(usage @ Value::Object(_)) => usage.clone(),
                Some(_) => return Err(Fault::Shape("usage must be an object".into())),
            };
            EventData::AgentCompleted {
                status,
                result: d.value_or("result", Value::Null),
                error: d.error(status != RunStatus::Succeeded)?,
                duration_ms,
                usage,
            }
        }
        other => {
            let shown: String = other.chars().take(64).collect();
            return Err(Fault::Type(format!(
                "a publisher cannot send {shown:?}: the types are agent_thinking, partial_result, tool_executing, tool_progress, tool_completed and agent_completed (agent_started is the server's)"
            )));
        }
    };
    Ok(PublishedEvent { n, data, untimed })
}

/// An event's `data`, read field by field with a message naming the field.
struct Data<'a>(&'a Map<String, Value>);

impl Data<'_> {
    fn string(&self, key: &str) -> Result<String, Fault> {
        match self.0.get(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            _ => Err(Fault::Shape(format!("data.{key} must be a string"))),
        }
    }

    /// An id or a name: a non-empty string of at most 128 characters.
    fn id(&self, key: &str) -> Result<String, Fault> {
        match self.0.get(key) {
            Some(Value::String(s)) if (1..=128).contains(&s.chars().count()) => Ok(s.clone()),
            _ => Err(Fault::Shape(format!(
                "data.{key} must be a string of 1 to 128 characters"
            ))),
        }
    }

    fn bool(&self, key: &str) -> Result<bool, Fault> {
        self.0
            .get(key)
            .and_then(Value::as_bool)
            .ok_or_else(|| Fault::Shape(format!("data.{key} must be true or false")))
    }

    fn value_or(&self, key: &str, default: Value) -> Value {
        self.0.get(key).cloned().unwrap_or(default)
    }

    fn fraction(&self) -> Result<Option<f64>, Fault> {
        match self.0.get("fraction") {
            None | Some(Value::Null) => Ok(None),
            Some(v) => match v.as_f64() {
                Some(f) if (0.0..=1.0).contains(&f) => Ok(Some(f)),
                _ => Err(Fault::Shape(
                    "data.fraction must be a number from 0 to 1, or null".into(),
                )),
            },
        }
    }

    /// `duration_ms`, and whether it was left out (for the server to fill in).
    fn duration(&self) -> Result<(u64, bool), Fault> {
        match self.0.get("duration_ms") {
            None | Some(Value::Null) => Ok((0, true)),
            Some(v) => v.as_u64().map(|ms| (ms, false)).ok_or_else(|| {
                Fault::Shape("data.duration_ms must be a whole number of milliseconds".into())
            }),
        }
    }

    /// `error`: `{code, message}` when `required`, else null or absent.
    fn error(&self, required: bool) -> Result<Option<ErrorBody>, Fault> {
        match (self.0.get("error"), required) {
            (None | Some(Value::Null), false) => Ok(None),
            (Some(Value::Object(e)), true) => match (e.get("code"), e.get("message")) {
                (Some(Value::String(code)), Some(Value::String(message))) => {
                    Ok(Some(ErrorBody::new(code.clone(), message.clone())))
                }
                _ => Err(Fault::Shape(
                    "data.error must be {code, message}, both strings".into(),
                )),
            },
            (_, true) => Err(Fault::Shape(
                "data.error must be {code, message} when the call or run did not succeed".into(),
            )),
            (_, false) => Err(Fault::Shape(
                "data.error must be null when the call or run succeeded".into(),
            )),
        }
    }

    fn status(&self) -> Result<RunStatus, Fault> {
        match self.0.get("status").and_then(Value::as_str) {
            Some("succeeded") => Ok(RunStatus::Succeeded),
            Some("failed") => Ok(RunStatus::Failed),
            Some("cancelled") => Ok(RunStatus::Cancelled),
            Some("timed_out") => Ok(RunStatus::TimedOut),
            _ => Err(Fault::Shape(
                "data.status must be succeeded, failed, cancelled or timed_out".into(),
            )),
        }
    }
}

/// Checks the agent name a publisher gives its run: 1 to 64 characters, printable.
pub fn check_agent_name(agent: &str) -> Result<(), String> {
    let n = agent.chars().count();
    if n == 0 || n > MAX_AGENT_NAME || agent.chars().any(char::is_control) {
        return Err(format!(
            "agent must be a name of 1 to {MAX_AGENT_NAME} printable characters"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn one(event: Value) -> Result<PublishedEvent, BatchFault> {
        parse_batch(&json!({ "events": [event] })).map(|mut v| v.remove(0))
    }

    #[test]
    fn reads_each_type() {
        let batch = json!({"events": [
            {"n": 1, "type": "agent_thinking", "data": {"text": "hm"}},
            {"n": 2, "type": "partial_result", "data": {"text": "a"}},
            {"n": 3, "type": "tool_executing", "data": {"tool_call_id": "c1", "tool": "search", "args": {"q": 1}}},
            {"n": 4, "type": "tool_progress", "data": {"tool_call_id": "c1", "tool": "search", "message": "half", "fraction": 0.5}},
            {"n": 5, "type": "tool_completed", "data": {"tool_call_id": "c1", "tool": "search", "ok": true, "result": [1]}},
            {"n": 6, "type": "agent_completed", "data": {"status": "failed", "error": {"code": "x", "message": "y"}, "duration_ms": 7}}
        ]});
        let events = parse_batch(&batch).unwrap();
        assert_eq!(events.len(), 6);
        assert_eq!(events[2].data.kind(), "tool_executing");
        assert!(events[4].untimed, "duration_ms left out is filled in later");
        assert!(!events[5].untimed);
        assert_eq!(
            events[5].data,
            EventData::AgentCompleted {
                status: RunStatus::Failed,
                result: Value::Null,
                error: Some(ErrorBody::new("x", "y")),
                duration_ms: 7,
                usage: Value::Null
            }
        );
    }

    #[test]
    fn wrong_shapes_are_400_with_their_index() {
        let bad = [
            json!({"n": 0, "type": "agent_thinking", "data": {"text": "a"}}),
            json!({"n": u64::MAX, "type": "agent_thinking", "data": {"text": "a"}}),
            json!({"n": 1, "type": 5, "data": {}}),
            json!({"n": 1, "type": "agent_thinking", "data": {"text": 1}}),
            json!({"n": 1, "type": "agent_thinking", "data": []}),
            json!({"n": 1, "type": "tool_executing", "data": {"tool": "t"}}),
            json!({"n": 1, "type": "tool_progress", "data": {"tool_call_id": "c", "tool": "t", "message": "m", "fraction": 2}}),
            json!({"n": 1, "type": "tool_completed", "data": {"tool_call_id": "c", "tool": "t", "ok": false}}),
            json!({"n": 1, "type": "tool_completed", "data": {"tool_call_id": "c", "tool": "t", "ok": true, "error": {"code": "x", "message": "y"}}}),
            json!({"n": 1, "type": "tool_completed", "data": {"tool_call_id": "c", "tool": "t", "ok": true, "duration_ms": -1}}),
            json!({"n": 1, "type": "agent_completed", "data": {"status": "done"}}),
            json!({"n": 1, "type": "agent_completed", "data": {"status": "succeeded", "usage": 3}}),
            json!("x"),
        ];
        for event in bad {
            match one(event.clone()) {
                Err(BatchFault::Shape {
                    index: Some(0),
                    message,
                }) => assert!(message.starts_with("event 0: "), "{message}"),
                other => panic!("{event}: {other:?}"),
            }
        }
        assert!(matches!(
            parse_batch(&json!({"events": {}})),
            Err(BatchFault::Shape { index: None, .. })
        ));
        let many: Vec<Value> = (1..=1001)
            .map(|n| json!({"n": n, "type": "partial_result", "data": {"text": ""}}))
            .collect();
        assert!(matches!(
            parse_batch(&json!({ "events": many })),
            Err(BatchFault::Shape { index: None, .. })
        ));
    }

    #[test]
    fn types_a_publisher_may_not_send_are_rule_breaks() {
        for kind in ["agent_started", "input_requested", "dance"] {
            match one(json!({"n": 1, "type": kind, "data": {}})) {
                Err(BatchFault::Type { index: 0, message }) => assert!(message.contains(kind)),
                other => panic!("{kind}: {other:?}"),
            }
        }
    }

    #[test]
    fn an_event_reads_back_from_its_wire_form() {
        let batch = json!({"events": [
            {"n": 4, "type": "tool_completed", "data": {"tool_call_id": "c", "tool": "t", "ok": false, "error": {"code": "x", "message": "y"}}},
            {"n": 5, "type": "agent_completed", "data": {"status": "succeeded", "result": 1, "duration_ms": 3}}
        ]});
        let events = parse_batch(&batch).unwrap();
        let wire: Vec<Value> = events.iter().map(PublishedEvent::to_wire).collect();
        assert_eq!(parse_batch(&json!({ "events": wire })).unwrap(), events);
    }

    #[test]
    fn agent_names() {
        assert!(check_agent_name("langgraph-support").is_ok());
        assert!(check_agent_name("").is_err());
        assert!(check_agent_name(&"a".repeat(65)).is_err());
        assert!(check_agent_name("a\nb").is_err());
    }
}
