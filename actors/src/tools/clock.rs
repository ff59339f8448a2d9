//! `clock`: the server's current time.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use serde_json::{json, Value};

use crate::tool::{Tool, ToolCall, ToolError};

pub struct Clock;

#[async_trait]
impl Tool for Clock {
    fn name(&self) -> &str {
        "clock"
    }

    fn description(&self) -> &str {
        "The current time: returns {\"now\": RFC 3339 UTC, \"unix_ms\": N}. No arguments."
    }

    fn args_schema(&self) -> Value {
        json!({"type": "object"})
    }

    async fn call(self: Arc<Self>, _call: ToolCall, _args: Value) -> Result<Value, ToolError> {
        let now = SystemTime::now();
        let unix_ms = now
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        Ok(json!({ "now": humantime::format_rfc3339_micros(now).to_string(), "unix_ms": unix_ms }))
    }
}
