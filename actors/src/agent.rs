//! What an agent is, for the people who write one: the [`Agent`] trait and the [`AgentRun`]
//! handle an agent uses to show what it is doing.
//!
//! An agent is an async function over its input. Each run of it happens inside its own
//! [`AgentRunActor`](crate::run::AgentRunActor), which emits `agent_started` before the agent
//! is called and `agent_completed` after it returns, fails, panics, times out or is cancelled;
//! the agent itself only emits what happens in between. See `docs/writing-agents.md`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;

use crate::catalog::Toolbox;
use crate::emitter::Emitter;
use crate::event::EventData;
use crate::executor::Execute;
use crate::tool::ToolError;

/// Why an agent gave up: becomes `agent_completed` with status `failed` and this as `error`.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentError {
    pub code: String,
    pub message: String,
}

impl AgentError {
    /// The usual failure: code `agent_failed`.
    pub fn failed(message: impl Into<String>) -> Self {
        AgentError {
            code: "agent_failed".into(),
            message: message.into(),
        }
    }
}

#[async_trait]
pub trait Agent: Send + Sync + 'static {
    /// The name clients start it by.
    fn name(&self) -> &'static str;

    /// One sentence for `GET /v1/agents`.
    fn description(&self) -> &'static str;

    /// The shape of the input, as a JSON Schema, for `GET /v1/agents`.
    fn input_schema(&self) -> Value {
        Value::Bool(true)
    }

    /// Refuses input before a run starts; the client gets `error` `invalid_field` with the
    /// message, and no run is created. `tools` says which tools exist.
    fn check_input(&self, _input: &Value, _tools: &Toolbox) -> Result<(), String> {
        Ok(())
    }

    /// Does the work. The returned value is `agent_completed.result`.
    async fn run(self: Arc<Self>, run: AgentRun, input: Value) -> Result<Value, AgentError>;
}

/// An agent's handle on its run: emit what it thinks and says, call tools.
pub struct AgentRun {
    emitter: Emitter,
    tools: Arc<Toolbox>,
    calls: Arc<AtomicU64>,
}

impl AgentRun {
    pub(crate) fn new(emitter: Emitter, tools: Arc<Toolbox>, calls: Arc<AtomicU64>) -> Self {
        AgentRun {
            emitter,
            tools,
            calls,
        }
    }

    pub fn run_id(&self) -> &str {
        self.emitter.run_id()
    }

    pub fn user_id(&self) -> &str {
        self.emitter.user_id()
    }

    /// Emits `agent_thinking`.
    pub async fn think(&self, text: impl Into<String>) {
        self.emitter
            .emit(EventData::AgentThinking { text: text.into() })
            .await
    }

    /// Emits `partial_result`: a streamed piece of the answer.
    pub async fn partial(&self, text: impl Into<String>) {
        self.emitter
            .emit(EventData::PartialResult { text: text.into() })
            .await
    }

    /// Calls a tool. Its executor emits `tool_executing`, any `tool_progress` and
    /// `tool_completed`; a failing or panicking tool comes back as `Err`, and the run goes on.
    pub async fn tool(&self, name: &str, args: Value) -> Result<Value, ToolError> {
        let Some(executor) = self.tools.executor(name) else {
            return Err(ToolError::new(
                "unknown_tool",
                format!("no tool named {name:?}"),
            ));
        };
        let n = self.calls.fetch_add(1, Ordering::Relaxed) + 1;
        let call = Execute {
            call_id: format!("tc_{n}"),
            args,
            emitter: self.emitter.clone(),
        };
        match executor.send(call).await {
            Ok(result) => result,
            Err(_) => Err(ToolError::new(
                "tool_failed",
                format!("the {name} executor is not running"),
            )),
        }
    }
}
