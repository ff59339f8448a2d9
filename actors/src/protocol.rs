//! Client commands and control frames (PROTOCOL.md §3 and §4): parsing what a client sends
//! into a [`ClientFrame`] with a precise error code, and encoding the frames that belong to
//! one connection. Pure functions, so every malformed-frame rule is unit-tested here.

use serde::Serialize;
use serde_json::{Map, Value};

/// Protocol version announced in `welcome`.
pub const PROTOCOL_VERSION: u32 = 1;
/// Longest `request_id` echoed back.
pub const MAX_REQUEST_ID: usize = 128;
/// Longest `thread_id`.
pub const MAX_THREAD_ID: usize = 128;

/// The error codes of PROTOCOL.md §3.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadJson,
    UnknownType,
    InvalidField,
    UnknownAgent,
    RunNotFound,
    TooManyRuns,
    RateLimited,
    ResumeGap,
    Internal,
    /// A store the server needs (Redis, section 10) is unreachable: try again later.
    Unavailable,
    /// The question was already settled, by another answer or by expiry (section 12).
    InterruptResolved,
    /// The token may not do this: a publisher's on a user's route, or the reverse (section 11).
    Forbidden,
}

/// What a client asked for.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    StartRun {
        agent: String,
        input: Value,
        thread_id: Option<String>,
    },
    CancelRun {
        run_id: String,
    },
    Resume {
        after_seq: u64,
        epoch: Option<String>,
    },
    /// Answers a run's question (section 12).
    Respond {
        run_id: String,
        interrupt_id: String,
        response: Value,
    },
    Ping,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ClientFrame {
    pub request_id: Option<String>,
    pub command: Command,
}

/// A refused frame: becomes an `error` frame.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub request_id: Option<String>,
    pub code: ErrorCode,
    pub message: String,
}

impl Refusal {
    fn new(request_id: Option<String>, code: ErrorCode, message: impl Into<String>) -> Self {
        Refusal {
            request_id,
            code,
            message: message.into(),
        }
    }
}

/// The `request_id` of a frame, when it has a valid one: for refusing a frame without
/// looking at the rest of it.
pub fn request_id_of(text: &str) -> Option<String> {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(obj)) => valid_request_id(&obj).ok().flatten(),
        _ => None,
    }
}

fn valid_request_id(obj: &Map<String, Value>) -> Result<Option<String>, ()> {
    match obj.get("request_id") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.chars().count() <= MAX_REQUEST_ID => Ok(Some(s.clone())),
        Some(_) => Err(()),
    }
}

/// Parses one text frame from a client.
pub fn parse_client_frame(text: &str) -> Result<ClientFrame, Refusal> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| Refusal::new(None, ErrorCode::BadJson, format!("not valid JSON: {e}")))?;
    let Value::Object(obj) = value else {
        return Err(Refusal::new(
            None,
            ErrorCode::BadJson,
            "a frame must be a JSON object",
        ));
    };
    let request_id = valid_request_id(&obj).map_err(|()| {
        Refusal::new(
            None,
            ErrorCode::InvalidField,
            format!("request_id must be a string of at most {MAX_REQUEST_ID} characters"),
        )
    })?;
    let refuse = |code, msg: String| Refusal::new(request_id.clone(), code, msg);
    let kind = match obj.get("type") {
        Some(Value::String(s)) => s.as_str(),
        Some(_) => {
            return Err(refuse(
                ErrorCode::InvalidField,
                "type must be a string".into(),
            ))
        }
        None => return Err(refuse(ErrorCode::InvalidField, "missing field type".into())),
    };
    let command = match kind {
        "ping" => Command::Ping,
        "start_run" => {
            let agent =
                string_field(&obj, "agent").map_err(|m| refuse(ErrorCode::InvalidField, m))?;
            let input = obj
                .get("input")
                .cloned()
                .ok_or_else(|| refuse(ErrorCode::InvalidField, "missing field input".into()))?;
            let thread_id = match obj.get("thread_id") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) if (1..=MAX_THREAD_ID).contains(&s.chars().count()) => {
                    Some(s.clone())
                }
                Some(_) => {
                    return Err(refuse(
                        ErrorCode::InvalidField,
                        format!("thread_id must be a string of 1 to {MAX_THREAD_ID} characters"),
                    ))
                }
            };
            Command::StartRun {
                agent,
                input,
                thread_id,
            }
        }
        "cancel_run" => Command::CancelRun {
            run_id: string_field(&obj, "run_id").map_err(|m| refuse(ErrorCode::InvalidField, m))?,
        },
        "respond" => Command::Respond {
            run_id: string_field(&obj, "run_id").map_err(|m| refuse(ErrorCode::InvalidField, m))?,
            interrupt_id: string_field(&obj, "interrupt_id")
                .map_err(|m| refuse(ErrorCode::InvalidField, m))?,
            response: obj
                .get("response")
                .cloned()
                .ok_or_else(|| refuse(ErrorCode::InvalidField, "missing field response".into()))?,
        },
        "resume" => {
            let after_seq = obj
                .get("after_seq")
                .and_then(Value::as_u64)
                .ok_or_else(|| {
                    refuse(
                        ErrorCode::InvalidField,
                        "after_seq must be a non-negative integer".into(),
                    )
                })?;
            let epoch = match obj.get("epoch") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s.clone()),
                Some(_) => {
                    return Err(refuse(
                        ErrorCode::InvalidField,
                        "epoch must be a string".into(),
                    ))
                }
            };
            Command::Resume { after_seq, epoch }
        }
        other => {
            let shown: String = other.chars().take(64).collect();
            return Err(refuse(
                ErrorCode::UnknownType,
                format!("unknown frame type {shown:?}"),
            ));
        }
    };
    Ok(ClientFrame {
        request_id,
        command,
    })
}

fn string_field(obj: &Map<String, Value>, name: &str) -> Result<String, String> {
    match obj.get(name) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(format!("{name} must be a string")),
        None => Err(format!("missing field {name}")),
    }
}

/// Frames that belong to one connection (no `seq`).
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Control<'a> {
    Welcome {
        session_id: &'a str,
        user_id: &'a str,
        epoch: &'a str,
        last_seq: u64,
        protocol: u32,
    },
    Ack {
        #[serde(skip_serializing_if = "Option::is_none")]
        request_id: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        run_id: Option<&'a str>,
    },
    Error {
        #[serde(skip_serializing_if = "Option::is_none")]
        request_id: Option<&'a str>,
        code: ErrorCode,
        message: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        oldest_seq: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        last_seq: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
    },
    Pong {
        #[serde(skip_serializing_if = "Option::is_none")]
        request_id: Option<&'a str>,
    },
    Resumed {
        #[serde(skip_serializing_if = "Option::is_none")]
        request_id: Option<&'a str>,
        from_seq: u64,
        to_seq: u64,
    },
    Heartbeat {
        last_seq: u64,
    },
}

impl Control<'_> {
    pub fn to_text(&self) -> String {
        // Plain structs of strings and integers: serialisation cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// A plain `error` frame.
    pub fn error<'b>(
        request_id: Option<&'b str>,
        code: ErrorCode,
        message: &'b str,
    ) -> Control<'b> {
        Control::Error {
            request_id,
            code,
            message,
            oldest_seq: None,
            last_seq: None,
            retry_after_ms: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn code(text: &str) -> ErrorCode {
        parse_client_frame(text).unwrap_err().code
    }

    #[test]
    fn parses_each_command() {
        let f = parse_client_frame(
            r#"{"type":"start_run","agent":"echo","input":"hi","thread_id":"t","request_id":"r1"}"#,
        )
        .unwrap();
        assert_eq!(f.request_id.as_deref(), Some("r1"));
        assert_eq!(
            f.command,
            Command::StartRun {
                agent: "echo".into(),
                input: json!("hi"),
                thread_id: Some("t".into())
            }
        );
        assert_eq!(
            parse_client_frame(r#"{"type":"ping"}"#).unwrap().command,
            Command::Ping
        );
        assert_eq!(
            parse_client_frame(r#"{"type":"resume","after_seq":7,"epoch":"e"}"#)
                .unwrap()
                .command,
            Command::Resume {
                after_seq: 7,
                epoch: Some("e".into())
            }
        );
        assert_eq!(
            parse_client_frame(r#"{"type":"cancel_run","run_id":"run_1"}"#)
                .unwrap()
                .command,
            Command::CancelRun {
                run_id: "run_1".into()
            }
        );
        assert_eq!(
            parse_client_frame(
                r#"{"type":"respond","run_id":"run_1","interrupt_id":"in_1","response":{"approved":true}}"#
            )
            .unwrap()
            .command,
            Command::Respond {
                run_id: "run_1".into(),
                interrupt_id: "in_1".into(),
                response: json!({"approved": true})
            }
        );
    }

    #[test]
    fn malformed_frames_get_their_codes() {
        assert_eq!(code("nope"), ErrorCode::BadJson);
        assert_eq!(code("[1,2]"), ErrorCode::BadJson);
        assert_eq!(code("{}"), ErrorCode::InvalidField);
        assert_eq!(code(r#"{"type":5}"#), ErrorCode::InvalidField);
        assert_eq!(code(r#"{"type":"dance"}"#), ErrorCode::UnknownType);
        assert_eq!(
            code(r#"{"type":"ping","request_id":7}"#),
            ErrorCode::InvalidField
        );
        assert_eq!(
            code(r#"{"type":"start_run","input":1}"#),
            ErrorCode::InvalidField
        );
        assert_eq!(
            code(r#"{"type":"start_run","agent":"echo"}"#),
            ErrorCode::InvalidField
        );
        assert_eq!(
            code(r#"{"type":"start_run","agent":"echo","input":"x","thread_id":5}"#),
            ErrorCode::InvalidField
        );
        assert_eq!(
            code(r#"{"type":"start_run","agent":"echo","input":"x","thread_id":""}"#),
            ErrorCode::InvalidField
        );
        assert_eq!(code(r#"{"type":"cancel_run"}"#), ErrorCode::InvalidField);
        for respond in [
            r#"{"type":"respond","interrupt_id":"in_1","response":1}"#,
            r#"{"type":"respond","run_id":"r","response":1}"#,
            r#"{"type":"respond","run_id":"r","interrupt_id":"in_1"}"#,
            r#"{"type":"respond","run_id":"r","interrupt_id":7,"response":1}"#,
        ] {
            assert_eq!(code(respond), ErrorCode::InvalidField, "{respond}");
        }
        assert_eq!(
            code(r#"{"type":"resume","after_seq":-1}"#),
            ErrorCode::InvalidField
        );
        assert_eq!(
            code(r#"{"type":"resume","after_seq":"3"}"#),
            ErrorCode::InvalidField
        );
        assert_eq!(
            code(r#"{"type":"resume","after_seq":1.5}"#),
            ErrorCode::InvalidField
        );
        assert_eq!(
            code(r#"{"type":"resume","after_seq":1,"epoch":3}"#),
            ErrorCode::InvalidField
        );
    }

    #[test]
    fn request_id_is_echoed_on_refusal_only_when_valid() {
        let r = parse_client_frame(r#"{"type":"dance","request_id":"q"}"#).unwrap_err();
        assert_eq!(r.request_id.as_deref(), Some("q"));
        let long = "x".repeat(MAX_REQUEST_ID + 1);
        let r =
            parse_client_frame(&format!(r#"{{"type":"ping","request_id":"{long}"}}"#)).unwrap_err();
        assert_eq!(r.request_id, None);
        assert_eq!(
            request_id_of(r#"{"type":"ping","request_id":"q"}"#).as_deref(),
            Some("q")
        );
        assert_eq!(request_id_of(r#"{"request_id":7}"#), None);
        assert_eq!(request_id_of("nope"), None);
    }

    #[test]
    fn control_frames_leave_out_missing_fields() {
        let v: Value = serde_json::from_str(&Control::Pong { request_id: None }.to_text()).unwrap();
        assert_eq!(v, json!({"type":"pong"}));
        let v: Value = serde_json::from_str(
            &Control::Ack {
                request_id: Some("a"),
                run_id: Some("run_1"),
            }
            .to_text(),
        )
        .unwrap();
        assert_eq!(v, json!({"type":"ack","request_id":"a","run_id":"run_1"}));
        let v: Value =
            serde_json::from_str(&Control::error(None, ErrorCode::BadJson, "m").to_text()).unwrap();
        assert_eq!(v, json!({"type":"error","code":"bad_json","message":"m"}));
    }
}
