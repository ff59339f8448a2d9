//! Tools that go wrong on purpose, for fault tests and demos: `fail` returns an error,
//! `panic` panics inside its executor.

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;

use crate::tool::{Tool, ToolCall, ToolError};

pub struct Fail;

#[async_trait]
impl Tool for Fail {
    fn name(&self) -> &str {
        "fail"
    }

    fn description(&self) -> &str {
        "Always fails with code tool_failed; {\"message\":\"...\"} sets the message."
    }

    fn args_schema(&self) -> Value {
        serde_json::json!({"type": "object", "properties": {"message": {"type": "string"}}})
    }

    async fn call(self: Arc<Self>, _call: ToolCall, args: Value) -> Result<Value, ToolError> {
        let message = args
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or("the tool failed, as asked");
        Err(ToolError::failed(message))
    }
}

pub struct Panic;

#[async_trait]
impl Tool for Panic {
    fn name(&self) -> &str {
        "panic"
    }

    fn description(&self) -> &str {
        "Panics inside its executor: reported as tool_panicked, and the executor is restarted."
    }

    async fn call(self: Arc<Self>, _call: ToolCall, _args: Value) -> Result<Value, ToolError> {
        panic!("the panic tool panicked, as asked")
    }
}
