//! `echo`: thinks once, streams its input back in pieces, and answers with it. The smallest
//! complete agent; `docs/writing-agents.md` walks through it.

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;

use crate::agent::{Agent, AgentError, AgentRun};
use crate::catalog::Toolbox;

/// Characters per `partial_result`.
const CHUNK: usize = 16;

pub struct Echo;

#[async_trait]
impl Agent for Echo {
    fn name(&self) -> &str {
        "echo"
    }

    fn description(&self) -> &str {
        "Streams its input text back: agent_thinking, partial_result chunks, then the text. Input: a string."
    }

    fn input_schema(&self) -> Value {
        serde_json::json!({"type": "string"})
    }

    fn check_input(&self, input: &Value, _tools: &Toolbox) -> Result<(), String> {
        match input {
            Value::String(_) => Ok(()),
            _ => Err("echo takes a string as input".into()),
        }
    }

    async fn run(self: Arc<Self>, run: AgentRun, input: Value) -> Result<Value, AgentError> {
        let text = input.as_str().unwrap_or_default().to_string();
        run.think(format!("Echoing {} characters", text.chars().count()))
            .await;
        let chars: Vec<char> = text.chars().collect();
        for piece in chars.chunks(CHUNK) {
            run.partial(piece.iter().collect::<String>()).await;
        }
        Ok(Value::String(text))
    }
}
