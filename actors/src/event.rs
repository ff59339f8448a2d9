//! Run events: the payloads agents and tools emit, and their one wire encoding.
//!
//! An [`EventData`] is what happened; the registry gives it a `seq` and turns it into a
//! [`Frame`] exactly once (`encode`), and that frame's bytes are shared by the replay buffer
//! and every connection of the user.

use std::fmt::Write;
use std::time::SystemTime;

use bytestring::ByteString;
use serde::Serialize;
use serde_json::Value;

/// An error inside an event (`tool_completed.error`, `agent_completed.error`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ErrorBody {
    pub code: String,
    pub message: String,
}

impl ErrorBody {
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        ErrorBody {
            code: code.into(),
            message: message.into(),
        }
    }
}

/// How a run ended (`agent_completed.status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Succeeded,
    Failed,
    Cancelled,
    TimedOut,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
            RunStatus::Cancelled => "cancelled",
            RunStatus::TimedOut => "timed_out",
        }
    }
}

/// The payload of one run event; the variant names the event `type` (PROTOCOL.md §2).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum EventData {
    AgentStarted {
        agent: String,
        input: Value,
    },
    AgentThinking {
        text: String,
    },
    PartialResult {
        text: String,
    },
    ToolExecuting {
        tool_call_id: String,
        tool: String,
        args: Value,
    },
    ToolProgress {
        tool_call_id: String,
        tool: String,
        message: String,
        fraction: Option<f64>,
    },
    ToolCompleted {
        tool_call_id: String,
        tool: String,
        ok: bool,
        result: Value,
        error: Option<ErrorBody>,
        duration_ms: u64,
    },
    AgentCompleted {
        status: RunStatus,
        result: Value,
        error: Option<ErrorBody>,
        duration_ms: u64,
        usage: Value,
    },
    /// The run asks its user (PROTOCOL.md §12): to approve a tool call, or for input.
    InputRequested {
        interrupt_id: String,
        kind: InterruptKind,
        message: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        tool_call_id: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        tool: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        args: Option<Value>,
        #[serde(skip_serializing_if = "Option::is_none")]
        schema: Option<Value>,
        /// RFC 3339, like `ts`.
        expires_at: String,
    },
    /// A question was settled: by an answer, or by expiry (`expired`, `response` null).
    InputReceived {
        interrupt_id: String,
        response: Value,
        expired: bool,
    },
}

/// What a question asks for (`input_requested.kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum InterruptKind {
    /// A yes or no to a tool call, before its `tool_executing`.
    Approval,
    /// An answer, fitting `schema` when there is one.
    Input,
}

/// RFC 3339 UTC with microseconds: the form of `ts` and `expires_at`.
pub fn rfc3339(at: SystemTime) -> String {
    humantime::format_rfc3339_micros(at).to_string()
}

impl EventData {
    /// The event's `type` on the wire.
    pub fn kind(&self) -> &'static str {
        crate::metrics::EVENT_TYPES[self.kind_index()]
    }

    /// A small number per type, for per-type counters.
    pub fn kind_index(&self) -> usize {
        match self {
            EventData::AgentStarted { .. } => 0,
            EventData::AgentThinking { .. } => 1,
            EventData::PartialResult { .. } => 2,
            EventData::ToolExecuting { .. } => 3,
            EventData::ToolProgress { .. } => 4,
            EventData::ToolCompleted { .. } => 5,
            EventData::AgentCompleted { .. } => 6,
            EventData::InputRequested { .. } => 7,
            EventData::InputReceived { .. } => 8,
        }
    }
}

/// One sequenced, encoded run event: what sessions write and the replay buffer keeps.
/// Cloning shares the bytes.
#[derive(Debug, Clone)]
pub struct Frame {
    pub seq: u64,
    /// The event's `type`.
    pub kind: &'static str,
    /// The run it belongs to (run records find their events in the user's log by it).
    pub run_id: crate::ids::RunId,
    pub text: ByteString,
    /// When the event was emitted (its `ts`), for the delivery-latency histogram.
    pub emitted: SystemTime,
}

/// Everything of the wire frame after `seq`, in wire order.
#[derive(Serialize)]
struct WireTail<'a> {
    run_id: &'a str,
    thread_id: Option<&'a str>,
    ts: String,
    data: &'a EventData,
}

/// An encoded event still waiting for its `seq`: what a shared event log (section 10)
/// numbers and stores. `number` makes the frame without encoding anything again.
#[derive(Debug, Clone)]
pub struct Draft {
    pub kind: &'static str,
    pub run_id: crate::ids::RunId,
    /// The frame's JSON from the field after `seq` on: `{"run_id":...}`.
    pub tail: String,
    pub emitted: SystemTime,
}

impl Draft {
    /// Encodes an event for the wire, all but its `seq`. Called once per event.
    pub fn new(
        run_id: &crate::ids::RunId,
        thread_id: Option<&str>,
        at: SystemTime,
        data: &EventData,
    ) -> Draft {
        let wire = WireTail {
            run_id,
            thread_id,
            ts: rfc3339(at),
            data,
        };
        // Serialising these types cannot fail: every map key is a string and no Serialize impl
        // errors. Written through a writer type of its own, so that the serializer of the
        // embedded log's hot path (`encode`) is a separate instantiation, which the compiler
        // keeps inlining there (sharing one cost `encode` 8% more instructions).
        let mut out = TailWriter(Vec::with_capacity(256));
        let tail = match serde_json::to_writer(&mut out, &wire) {
            // serde_json writes UTF-8 only.
            Ok(()) => String::from_utf8(out.0).unwrap_or_default(),
            Err(e) => {
                log::error!("encoding an event of {run_id} failed: {e}");
                format!(
                    "{{\"run_id\":{}}}",
                    serde_json::Value::from(run_id.as_ref())
                )
            }
        };
        Draft {
            kind: data.kind(),
            run_id: run_id.clone(),
            tail,
            emitted: at,
        }
    }

    /// The frame with this `seq`: `{"type":..,"seq":..,` and the tail.
    pub fn number(&self, seq: u64) -> Frame {
        Frame::assemble(
            seq,
            self.kind,
            self.run_id.clone(),
            &self.tail,
            self.emitted,
        )
    }
}

/// Where a draft's JSON is written (see [`Draft::new`]).
struct TailWriter(Vec<u8>);

impl std::io::Write for TailWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.0.extend_from_slice(buf);
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Frame {
    /// A frame from its parts (a draft's, or a shared log's entry).
    pub fn assemble(
        seq: u64,
        kind: &'static str,
        run_id: crate::ids::RunId,
        tail: &str,
        emitted: SystemTime,
    ) -> Frame {
        let body = tail.strip_prefix('{').unwrap_or(tail);
        let mut text = String::with_capacity(body.len() + kind.len() + 32);
        text.push_str("{\"type\":\"");
        text.push_str(kind);
        text.push_str("\",\"seq\":");
        let _ = write!(text, "{seq},");
        text.push_str(body);
        Frame {
            seq,
            kind,
            run_id,
            text: ByteString::from(text),
            emitted,
        }
    }

    /// The frame's JSON after `"seq":N,` (what [`Frame::assemble`] takes back).
    pub fn tail(&self) -> &str {
        let text: &str = &self.text;
        text.find("\"seq\":")
            .map(|at| at + 6)
            .and_then(|at| text[at..].find(',').map(|comma| &text[at + comma + 1..]))
            .unwrap_or(text)
    }
}

#[derive(Serialize)]
struct Wire<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    seq: u64,
    run_id: &'a str,
    thread_id: Option<&'a str>,
    ts: String,
    data: &'a EventData,
}

/// Encodes an event for the wire, `seq` included, in one go: the hot path of the embedded
/// log, which knows the `seq` before it encodes. (The same bytes as a [`Draft`] numbered
/// with that `seq`.)
pub fn encode(
    seq: u64,
    run_id: &crate::ids::RunId,
    thread_id: Option<&str>,
    at: SystemTime,
    data: &EventData,
) -> Frame {
    let wire = Wire {
        kind: data.kind(),
        seq,
        run_id,
        thread_id,
        ts: rfc3339(at),
        data,
    };
    // Serialising these types cannot fail: every map key is a string and no Serialize impl errors.
    let text = serde_json::to_string(&wire).unwrap_or_else(|e| {
        log::error!("encoding event {seq} of {run_id} failed: {e}");
        String::from("{}")
    });
    Frame {
        seq,
        kind: data.kind(),
        run_id: run_id.clone(),
        text: ByteString::from(text),
        emitted: at,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn encodes_every_field_once() {
        let at = SystemTime::UNIX_EPOCH + std::time::Duration::from_micros(1_700_000_000_123_456);
        let data = EventData::ToolExecuting {
            tool_call_id: "tc_1".into(),
            tool: "calculator".into(),
            args: json!({"expr": "2+2"}),
        };
        let frame = encode(42, &"run_x".into(), Some("th_1"), at, &data);
        let v: Value = serde_json::from_str(&frame.text).unwrap();
        assert_eq!(
            v,
            json!({"type":"tool_executing","seq":42,"run_id":"run_x","thread_id":"th_1",
                   "ts":"2023-11-14T22:13:20.123456Z",
                   "data":{"tool_call_id":"tc_1","tool":"calculator","args":{"expr":"2+2"}}})
        );
    }

    #[test]
    fn a_numbered_draft_is_the_encoded_frame() {
        let data = EventData::ToolCompleted {
            tool_call_id: "tc_9".into(),
            tool: "calculator".into(),
            ok: true,
            result: json!({"value": 4}),
            error: None,
            duration_ms: 3,
        };
        let at = SystemTime::now();
        let run: crate::ids::RunId = "run_z".into();
        let direct = encode(77, &run, Some("th"), at, &data);
        let drafted = Draft::new(&run, Some("th"), at, &data).number(77);
        assert_eq!(direct.text, drafted.text);
    }

    #[test]
    fn a_frame_rebuilt_from_its_tail_is_the_same_frame() {
        let data = EventData::AgentThinking {
            text: "seq\":1, {braces}".into(),
        };
        let frame = encode(7, &"run_y".into(), Some("th"), SystemTime::now(), &data);
        let again = Frame::assemble(7, frame.kind, "run_y".into(), frame.tail(), frame.emitted);
        assert_eq!(frame.text, again.text);
        let later = Frame::assemble(
            1234,
            frame.kind,
            "run_y".into(),
            frame.tail(),
            frame.emitted,
        );
        let v: Value = serde_json::from_str(&later.text).unwrap();
        assert_eq!(v["seq"], 1234);
        assert_eq!(v["data"]["text"], "seq\":1, {braces}");
    }

    #[test]
    fn null_thread_and_status_spelling() {
        let data = EventData::AgentCompleted {
            status: RunStatus::TimedOut,
            result: Value::Null,
            error: Some(ErrorBody::new("timed_out", "too slow")),
            duration_ms: 5,
            usage: json!({"tool_calls": 0}),
        };
        let frame = encode(1, &"r".into(), None, SystemTime::now(), &data);
        let v: Value = serde_json::from_str(&frame.text).unwrap();
        assert_eq!(v["thread_id"], Value::Null);
        assert_eq!(v["data"]["status"], "timed_out");
        assert_eq!(v["data"]["error"]["code"], "timed_out");
    }
}
