//! `scripted`: runs a list of steps given as input, so tests, demos and the bench harness can
//! shape the event stream exactly (PROTOCOL.md §8).
//!
//! Input `{"steps":[...]}`, each step one of `{"think":"..."}`, `{"text":"..."}`,
//! `{"tool":"NAME","args":{...}}`, `{"sleep_ms":N}`, `{"fail":"message"}`, `{"panic":true}`,
//! and (section 12) `{"ask":"question","schema":{...}}` and `"approve":true` on a tool step.
//! A failing tool does not stop the script (the agent sees the error and goes on); `fail` and
//! `panic` end the run. A denied or expired approval skips its tool; an expired question is an
//! empty answer. The answer is the last `text`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{json, Value};

use crate::agent::{Agent, AgentError, AgentRun};
use crate::catalog::Toolbox;
use crate::interrupt::Approval;

/// One step of a script. Public (with [`parse`]) so the fuzz targets and property tests can
/// check what the parser accepted, not just that it did not panic.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    Think(String),
    Text(String),
    Tool {
        name: String,
        args: Value,
        /// Ask the user to approve the call first.
        approve: bool,
    },
    Ask {
        message: String,
        schema: Option<Value>,
    },
    Sleep(u64),
    Fail(String),
    Panic,
}

/// Reads a script's steps, or says which step is wrong and why.
pub fn parse(input: &Value) -> Result<Vec<Step>, String> {
    let steps = input
        .get("steps")
        .and_then(Value::as_array)
        .ok_or("scripted takes {\"steps\":[...]}")?;
    steps
        .iter()
        .enumerate()
        .map(|(i, step)| parse_step(step).map_err(|e| format!("step {i}: {e}")))
        .collect()
}

fn parse_step(step: &Value) -> Result<Step, String> {
    let obj = step.as_object().ok_or("a step is an object")?;
    let text = |key: &str| -> Result<String, String> {
        obj.get(key)
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or(format!("{key} must be a string"))
    };
    if obj.contains_key("think") {
        Ok(Step::Think(text("think")?))
    } else if obj.contains_key("text") {
        Ok(Step::Text(text("text")?))
    } else if obj.contains_key("tool") {
        let args = obj
            .get("args")
            .cloned()
            .unwrap_or_else(|| Value::Object(Default::default()));
        let approve = match obj.get("approve") {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err("approve must be true or false".into()),
        };
        Ok(Step::Tool {
            name: text("tool")?,
            args,
            approve,
        })
    } else if obj.contains_key("ask") {
        let schema = match obj.get("schema") {
            None | Some(Value::Null) => None,
            Some(schema) => {
                crate::interrupt::check_schema(schema).map_err(|e| format!("schema is {e}"))?;
                Some(schema.clone())
            }
        };
        Ok(Step::Ask {
            message: text("ask")?,
            schema,
        })
    } else if let Some(ms) = obj.get("sleep_ms") {
        Ok(Step::Sleep(
            ms.as_u64()
                .ok_or("sleep_ms must be a non-negative integer")?,
        ))
    } else if obj.contains_key("fail") {
        Ok(Step::Fail(text("fail")?))
    } else if obj.get("panic") == Some(&Value::Bool(true)) {
        Ok(Step::Panic)
    } else {
        Err("unknown step: use think, text, tool, ask, sleep_ms, fail or panic".into())
    }
}

pub struct Scripted;

#[async_trait]
impl Agent for Scripted {
    fn name(&self) -> &str {
        "scripted"
    }

    fn description(&self) -> &str {
        "Runs the steps it is given in order: {\"steps\":[{\"think\":..},{\"text\":..},{\"tool\":NAME,\"args\":{..},\"approve\"?:true},{\"ask\":..,\"schema\"?:{..}},{\"sleep_ms\":N},{\"fail\":..},{\"panic\":true}]}; answers with the last text."
    }

    fn input_schema(&self) -> Value {
        let text = |key: &str| json!({"type": "object", "required": [key], "properties": {key: {"type": "string"}}});
        json!({
            "type": "object",
            "required": ["steps"],
            "properties": {"steps": {"type": "array", "items": {"oneOf": [
                text("think"),
                text("text"),
                {"type": "object", "required": ["tool"], "properties": {"tool": {"type": "string"}, "args": {"type": "object"}, "approve": {"type": "boolean"}}},
                {"type": "object", "required": ["ask"], "properties": {"ask": {"type": "string"}, "schema": {"type": ["object", "boolean"]}}},
                {"type": "object", "required": ["sleep_ms"], "properties": {"sleep_ms": {"type": "integer", "minimum": 0}}},
                text("fail"),
                {"type": "object", "required": ["panic"], "properties": {"panic": {"const": true}}},
            ]}}},
        })
    }

    fn check_input(&self, input: &Value, tools: &Toolbox) -> Result<(), String> {
        for step in parse(input)? {
            if let Step::Tool { name, .. } = step {
                if !tools.contains(&name) {
                    return Err(format!("no tool named {name:?}"));
                }
            }
        }
        Ok(())
    }

    async fn run(self: Arc<Self>, run: AgentRun, input: Value) -> Result<Value, AgentError> {
        let steps = parse(&input).map_err(AgentError::failed)?;
        let mut answer = Value::Null;
        for step in steps {
            match step {
                Step::Think(t) => run.think(t).await,
                Step::Text(t) => {
                    run.partial(t.clone()).await;
                    answer = Value::String(t);
                }
                // The outcome is in the tool_completed event; a failed call does not end the script.
                Step::Tool {
                    name,
                    args,
                    approve: false,
                } => {
                    let _ = run.tool(&name, args).await;
                }
                Step::Tool {
                    name,
                    args,
                    approve: true,
                } => {
                    if let Approval::Approved(call) = run.approve(&name, args, None).await {
                        let _ = run.call_approved(call).await;
                    }
                }
                Step::Ask { message, schema } => {
                    // The script goes on whatever the answer; an expired question is empty.
                    let _ = run.ask(message, schema).await?;
                }
                Step::Sleep(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
                Step::Fail(message) => return Err(AgentError::failed(message)),
                Step::Panic => panic!("scripted panic step"),
            }
        }
        Ok(answer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_step_kind() {
        let steps = parse(&json!({"steps":[
            {"think":"a"},{"text":"b"},{"tool":"clock"},{"sleep_ms":5},{"fail":"x"},{"panic":true}
        ]}))
        .unwrap();
        assert_eq!(
            steps,
            vec![
                Step::Think("a".into()),
                Step::Text("b".into()),
                Step::Tool {
                    name: "clock".into(),
                    args: json!({}),
                    approve: false
                },
                Step::Sleep(5),
                Step::Fail("x".into()),
                Step::Panic
            ]
        );
    }

    #[test]
    fn refuses_what_it_cannot_run() {
        assert!(parse(&json!("hi")).is_err());
        assert!(parse(&json!({"steps": 3})).is_err());
        assert!(parse(&json!({"steps": [{"dance": 1}]}))
            .unwrap_err()
            .contains("step 0"));
        assert!(parse(&json!({"steps": [{"sleep_ms": -1}]})).is_err());
        assert!(parse(&json!({"steps": [{"think": 5}]})).is_err());
        assert!(parse(&json!({"steps": [{"panic": false}]})).is_err());
        assert!(parse(&json!({"steps": [{"tool": "clock", "approve": 1}]})).is_err());
        assert!(parse(&json!({"steps": [{"ask": 1}]})).is_err());
        let e =
            parse(&json!({"steps": [{"ask": "n?", "schema": {"type": "nonsense"}}]})).unwrap_err();
        assert!(e.contains("step 0") && e.contains("JSON Schema"), "{e}");
    }

    #[test]
    fn parses_questions_and_approvals() {
        let steps = parse(&json!({"steps":[
            {"ask":"name?"},
            {"ask":"n?","schema":{"type":"integer"}},
            {"tool":"calculator","args":{"expr":"1+1"},"approve":true}
        ]}))
        .unwrap();
        assert_eq!(
            steps,
            vec![
                Step::Ask {
                    message: "name?".into(),
                    schema: None
                },
                Step::Ask {
                    message: "n?".into(),
                    schema: Some(json!({"type":"integer"}))
                },
                Step::Tool {
                    name: "calculator".into(),
                    args: json!({"expr":"1+1"}),
                    approve: true
                },
            ]
        );
    }
}
