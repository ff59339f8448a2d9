//! What a tool is, for the people who write one: the [`Tool`] trait and the [`ToolCall`]
//! handle a tool uses to report progress. Tools run inside supervised
//! [`ToolExecutor`](crate::executor::ToolExecutor) actors on their own thread, never on the
//! threads that serve sockets; work that blocks belongs in `tokio::task::spawn_blocking`.

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;

use crate::emitter::Emitter;
use crate::event::{ErrorBody, EventData};

/// A tool's failure: `tool_completed` with `ok:false` and this as `error`.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolError {
    pub code: String,
    pub message: String,
}

impl ToolError {
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        ToolError {
            code: code.into(),
            message: message.into(),
        }
    }

    /// The arguments do not fit the tool: code `invalid_args`.
    pub fn invalid_args(message: impl Into<String>) -> Self {
        ToolError::new("invalid_args", message)
    }

    /// The tool tried and failed: code `tool_failed`.
    pub fn failed(message: impl Into<String>) -> Self {
        ToolError::new("tool_failed", message)
    }

    pub(crate) fn body(&self) -> ErrorBody {
        ErrorBody::new(self.code.clone(), self.message.clone())
    }
}

#[async_trait]
pub trait Tool: Send + Sync + 'static {
    /// The name agents call it by.
    fn name(&self) -> &str;

    /// One sentence for `GET /v1/agents`, saying what `args` it takes.
    fn description(&self) -> &str;

    /// The shape of `args`, as a JSON Schema, for `GET /v1/agents`.
    fn args_schema(&self) -> Value {
        Value::Bool(true)
    }

    /// Does the work; the value is `tool_completed.result`.
    async fn call(self: Arc<Self>, call: ToolCall, args: Value) -> Result<Value, ToolError>;
}

/// A tool's handle on the call it is serving.
pub struct ToolCall {
    id: String,
    tool: Arc<str>,
    emitter: Emitter,
}

impl ToolCall {
    pub(crate) fn new(id: String, tool: Arc<str>, emitter: Emitter) -> Self {
        ToolCall { id, tool, emitter }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Emits `tool_progress`; `fraction` is 0..1 when known.
    pub async fn progress(&self, message: impl Into<String>, fraction: Option<f64>) {
        let fraction = fraction.map(|f| f.clamp(0.0, 1.0));
        self.emitter
            .emit(EventData::ToolProgress {
                tool_call_id: self.id.clone(),
                tool: self.tool.to_string(),
                message: message.into(),
                fraction,
            })
            .await
    }
}
