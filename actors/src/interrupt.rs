//! Questions a run asks its user (PROTOCOL.md §12): to approve a tool call, or for input.
//!
//! A question belongs to its run's [`AgentRunActor`](crate::run::AgentRunActor), the one place
//! that can settle it, so the first answer wins whichever tab or node it came from. The agent
//! asks through its [`AgentRun`](crate::agent::AgentRun) handle (`ask`, `approve`), which sends
//! the actor [`Ask`] and then waits on a oneshot channel: a parked future, no thread, and no
//! timer but the question's expiry. An answer reaches the actor as [`Answer`] from the
//! registry, which has already checked that the run is the user's and the question open.
//!
//! This file holds the messages and the pure rules: what an approval's answer looks like and
//! how a schema's refusal is worded. The actor applies them.

use actix::prelude::*;
use serde_json::Value;
use tokio::sync::oneshot;

use crate::event::InterruptKind;

/// Ask the run's user a question. Answered with the question's id and where its answer (or
/// `None`, on expiry) will come.
#[derive(Message)]
#[rtype(result = "Option<(String, oneshot::Receiver<Option<Value>>)>")]
pub(crate) struct Ask {
    pub kind: InterruptKind,
    pub message: String,
    pub tool_call_id: Option<String>,
    pub tool: Option<String>,
    pub args: Option<Value>,
    /// The schema as sent to the user, and compiled.
    pub schema: Option<(Value, jsonschema::Validator)>,
}

/// A user's answer to one of the run's questions.
#[derive(Message, Debug)]
#[rtype(result = "Result<(), AnswerRefused>")]
pub struct Answer {
    pub interrupt_id: String,
    pub response: Value,
}

/// Why an answer was not taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnswerRefused {
    /// Already settled, by another answer or by expiry (`interrupt_resolved`).
    Resolved,
    /// The answer does not fit the question; it stays open (`invalid_field`).
    Invalid(String),
}

/// How an approval was settled, as the agent sees it.
#[derive(Debug)]
pub enum Approval {
    /// The user said yes; the call may have new arguments.
    Approved(ApprovedCall),
    /// The user said no: run nothing, and decide what to do next.
    Denied,
    /// No one answered in time (treat it as a no).
    Expired,
}

/// A tool call the user approved: run it with
/// [`AgentRun::call_approved`](crate::agent::AgentRun::call_approved). It keeps the
/// `tool_call_id` the question named.
#[derive(Debug)]
pub struct ApprovedCall {
    pub(crate) tool: String,
    pub(crate) call_id: String,
    /// The arguments to run it with: the user's, when the answer replaced them.
    pub args: Value,
}

impl ApprovedCall {
    pub fn tool(&self) -> &str {
        &self.tool
    }
}

/// Longest refusal message sent back: a schema can report many errors.
const MAX_MESSAGE: usize = 512;

/// Checks an answer to an approval: `{approved: bool, args?: object}`. Returns whether it was
/// approved and the replacement arguments.
pub(crate) fn check_approval(response: &Value) -> Result<(bool, Option<Value>), String> {
    let obj = response
        .as_object()
        .ok_or("an approval's response is {\"approved\": true|false, \"args\"?: {...}}")?;
    let approved = obj
        .get("approved")
        .and_then(Value::as_bool)
        .ok_or("response.approved must be true or false")?;
    if let Some(key) = obj.keys().find(|k| *k != "approved" && *k != "args") {
        let shown: String = key.chars().take(64).collect();
        return Err(format!(
            "unknown field {shown:?} in an approval's response (approved, args)"
        ));
    }
    match obj.get("args") {
        None | Some(Value::Null) => Ok((approved, None)),
        Some(args @ Value::Object(_)) => Ok((approved, Some(args.clone()))),
        Some(_) => Err("response.args must be an object: the tool's arguments".into()),
    }
}

/// Checks an answer to an input question against its schema; the refusal quotes the
/// validator, where in the answer it found the fault, and how many more there are.
pub(crate) fn check_input(
    validator: &jsonschema::Validator,
    response: &Value,
) -> Result<(), String> {
    let mut errors = validator.iter_errors(response);
    let Some(first) = errors.next() else {
        return Ok(());
    };
    let path = first.instance_path().to_string();
    let mut message = if path.is_empty() {
        format!("the response does not fit the question's schema: {first}")
    } else {
        format!("the response does not fit the question's schema at {path}: {first}")
    };
    let more = errors.count();
    if message.len() > MAX_MESSAGE {
        let mut end = MAX_MESSAGE;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push('…');
    }
    if more > 0 {
        message.push_str(&format!(" (and {more} more)"));
    }
    Err(message)
}

/// Checks that a schema is one, against its draft's meta-schema: a tenth of the cost of
/// compiling it, for checks that run where time is shared (a run's start, on the registry).
/// What only compiling finds (a `pattern` the engine refuses) fails the question later.
pub fn check_schema(schema: &Value) -> Result<(), String> {
    check_size(schema)?;
    jsonschema::meta::validate(schema).map_err(|e| {
        let path = e.instance_path().to_string();
        if path.is_empty() {
            format!("not a valid JSON Schema: {e}")
        } else {
            format!("not a valid JSON Schema at {path}: {e}")
        }
    })
}

/// Longest schema a question may carry, as JSON. A question is for a person to answer: a
/// form of a few dozen fields is some 2 KB. Its compiled validator is kept while the question
/// is open and weighs some 50 times the schema's JSON (a 64 KB schema of 1,500 fields held
/// 3 MiB), so the bound is what keeps open questions cheap.
pub const MAX_SCHEMA_BYTES: usize = 8 * 1024;

fn check_size(schema: &Value) -> Result<(), String> {
    let bytes = serde_json::to_vec(schema)
        .map(|v| v.len())
        .unwrap_or(usize::MAX);
    if bytes > MAX_SCHEMA_BYTES {
        return Err(format!(
            "a question's schema may be at most {MAX_SCHEMA_BYTES} bytes of JSON, this one is {bytes}"
        ));
    }
    Ok(())
}

/// Bytes a schema's compiled `pattern` may take (each), and its matcher's cache.
const PATTERN_BYTES: usize = 256 * 1024;

/// Compiles a question's schema; the error says what is wrong with it. Patterns use the
/// `regex` engine, whose matching is linear in the input (no catastrophic backtracking; no
/// look-around either), within a size bound: a schema can come from a user (`scripted`), and
/// compiling and checking it must cost little.
pub(crate) fn compile(schema: &Value) -> Result<jsonschema::Validator, String> {
    check_size(schema)?;
    let patterns = jsonschema::PatternOptions::regex()
        .size_limit(PATTERN_BYTES)
        .dfa_size_limit(PATTERN_BYTES);
    jsonschema::options()
        .with_pattern_options(patterns)
        .build(schema)
        .map_err(|e| format!("not a valid JSON Schema: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn approvals_take_yes_no_and_new_arguments() {
        assert_eq!(check_approval(&json!({"approved": true})), Ok((true, None)));
        assert_eq!(
            check_approval(&json!({"approved": false, "args": null})),
            Ok((false, None))
        );
        assert_eq!(
            check_approval(&json!({"approved": true, "args": {"expr": "1+1"}})),
            Ok((true, Some(json!({"expr": "1+1"}))))
        );
        for bad in [
            json!(true),
            json!({}),
            json!({"approved": "yes"}),
            json!({"approved": true, "args": [1]}),
            json!({"approved": true, "why": "x"}),
        ] {
            assert!(check_approval(&bad).is_err(), "{bad} was taken");
        }
    }

    #[test]
    fn a_schema_refusal_says_where_and_what() {
        let v = compile(&json!({"type": "object", "required": ["n"],
            "properties": {"n": {"type": "integer", "minimum": 1}}}))
        .unwrap();
        assert_eq!(check_input(&v, &json!({"n": 3})), Ok(()));
        let e = check_input(&v, &json!({"n": 0})).unwrap_err();
        assert!(e.contains("/n") && e.contains("minimum"), "{e}");
        let e = check_input(&v, &json!("x")).unwrap_err();
        assert!(e.contains("object"), "{e}");
    }

    #[test]
    fn a_long_refusal_is_cut_and_counts_the_rest() {
        let v = compile(&json!({"type": "array", "items": {"type": "string", "maxLength": 1}}))
            .unwrap();
        let long = "é".repeat(1000);
        let e = check_input(&v, &json!([long, "ab", "cd"])).unwrap_err();
        assert!(e.chars().count() < MAX_MESSAGE + 40, "{e}");
        assert!(e.ends_with("(and 2 more)"), "{e}");
    }

    #[test]
    fn a_broken_schema_is_refused_when_checked_or_compiled() {
        for broken in [
            json!({"type": "nonsense"}),
            json!({"minimum": "a"}),
            json!(3),
        ] {
            assert!(check_schema(&broken).is_err(), "{broken}");
            assert!(compile(&broken).is_err(), "{broken}");
        }
        assert_eq!(
            check_schema(&json!({"type": "integer", "minimum": 1})),
            Ok(())
        );
        assert_eq!(check_schema(&json!(true)), Ok(()));
        assert!(compile(&json!({"type": "nonsense"})).is_err());
        assert!(compile(&json!({"minimum": "a"})).is_err());
        assert!(
            compile(&json!({"$ref": "http://127.0.0.1:9/schema.json"})).is_err(),
            "a remote $ref is never fetched"
        );
        assert!(
            compile(&json!({"pattern": "(a{1000}){1000}"})).is_err(),
            "a pattern past the size bound"
        );
    }

    #[test]
    fn a_schema_is_bounded_in_size() {
        let properties: serde_json::Map<String, Value> = (0..400)
            .map(|i| (format!("p{i}"), json!({"type": "string"})))
            .collect();
        let big = json!({"type": "object", "properties": properties});
        let e = check_schema(&big).unwrap_err();
        assert!(e.contains("at most 8192 bytes"), "{e}");
        assert!(compile(&big).is_err());
    }

    #[test]
    fn a_hostile_schema_costs_little_to_compile_and_check() {
        let pattern = format!("^({})+$", vec!["[a-z]{1,20}"; 300].join("|"));
        let schema =
            json!({"type": "object", "patternProperties": {pattern.clone(): {"pattern": pattern}}});
        let started = std::time::Instant::now();
        let compiled = compile(&schema);
        if let Ok(v) = compiled {
            let _ = check_input(&v, &json!({"a".repeat(60_000): "b".repeat(60_000)}));
        }
        // Generous: a debug build on a loaded machine; a backtracking engine takes minutes.
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }
}
