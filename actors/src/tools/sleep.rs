//! `sleep`: waits `{"ms":N}` milliseconds, reporting `tool_progress` as it goes. The long
//! tool call of tests and demos (cancel, timeout, progress).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{json, Value};

use crate::tool::{Tool, ToolCall, ToolError};

/// Progress reports per call at most, and at least this long apart.
const REPORTS: u64 = 10;
const MIN_STEP_MS: u64 = 50;

pub struct Sleep;

#[async_trait]
impl Tool for Sleep {
    fn name(&self) -> &str {
        "sleep"
    }

    fn description(&self) -> &str {
        "Waits {\"ms\":N} milliseconds, reporting progress; returns {\"slept_ms\":N}."
    }

    fn args_schema(&self) -> Value {
        json!({"type": "object", "required": ["ms"], "properties": {"ms": {"type": "integer", "minimum": 0}}})
    }

    async fn call(self: Arc<Self>, call: ToolCall, args: Value) -> Result<Value, ToolError> {
        let ms = args
            .get("ms")
            .and_then(Value::as_u64)
            .ok_or_else(|| ToolError::invalid_args("sleep takes {\"ms\": non-negative integer}"))?;
        let steps = (ms / MIN_STEP_MS).clamp(1, REPORTS);
        let mut slept = 0;
        for i in 1..=steps {
            let until = ms * i / steps;
            tokio::time::sleep(Duration::from_millis(until - slept)).await;
            slept = until;
            call.progress(
                format!("slept {slept} of {ms} ms"),
                Some(i as f64 / steps as f64),
            )
            .await;
        }
        Ok(json!({ "slept_ms": ms }))
    }
}
