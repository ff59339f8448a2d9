//! `ToolExecutor`: one supervised actor per tool, on the tools' own arbiter.
//!
//! Each call runs as its own task, so a slow call never holds up the next one, and is wrapped
//! in `catch_unwind`: a panicking tool becomes `tool_completed` `ok:false` with code
//! `tool_panicked`. The executor then stops and its `Supervisor` restarts it with a fresh
//! instance of the tool (its state may be broken); calls already running finish on the
//! instance they started with, undisturbed.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;
use futures_util::FutureExt;
use serde_json::Value;

use crate::emitter::Emitter;
use crate::event::EventData;
use crate::tool::{Tool, ToolCall, ToolError};

/// Makes a fresh instance of a tool (at start and at every restart).
pub type ToolFactory = Arc<dyn Fn() -> Arc<dyn Tool> + Send + Sync>;

pub struct ToolExecutor {
    make: ToolFactory,
    tool: Arc<dyn Tool>,
    restarts: u64,
}

impl ToolExecutor {
    pub fn new(make: ToolFactory) -> Self {
        let tool = make();
        ToolExecutor {
            make,
            tool,
            restarts: 0,
        }
    }
}

impl Actor for ToolExecutor {
    type Context = Context<Self>;
}

impl Supervised for ToolExecutor {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        self.restarts += 1;
        self.tool = (self.make)();
        log::warn!(
            "tool {} restarted after a panic ({} restarts)",
            self.tool.name(),
            self.restarts
        );
    }
}

/// Run one call of this executor's tool.
#[derive(Message)]
#[rtype(result = "Result<Value, ToolError>")]
pub struct Execute {
    pub call_id: String,
    pub args: Value,
    pub emitter: Emitter,
}

/// A call panicked: the tool instance is suspect.
#[derive(Message)]
#[rtype(result = "()")]
struct Poisoned;

impl Handler<Execute> for ToolExecutor {
    type Result = ResponseFuture<Result<Value, ToolError>>;

    fn handle(&mut self, msg: Execute, ctx: &mut Context<Self>) -> Self::Result {
        let tool = self.tool.clone();
        let me = ctx.address();
        // The future is spawned on this arbiter by actix, independent of the actor's own
        // lifetime: a restart does not cancel it.
        Box::pin(async move {
            let Execute {
                call_id,
                args,
                emitter,
            } = msg;
            let name: Arc<str> = tool.name().into();
            let started = Instant::now();
            emitter
                .emit(EventData::ToolExecuting {
                    tool_call_id: call_id.clone(),
                    tool: name.to_string(),
                    args: args.clone(),
                })
                .await;
            let call = ToolCall::new(call_id.clone(), name.clone(), emitter.clone());
            let result = match AssertUnwindSafe(tool.call(call, args)).catch_unwind().await {
                Ok(result) => result,
                Err(payload) => {
                    let what = crate::panic::message(payload.as_ref());
                    log::error!("run {}: tool {name} panicked: {what}", emitter.run_id());
                    me.do_send(Poisoned);
                    Err(ToolError::new(
                        "tool_panicked",
                        format!("the {name} tool panicked: {what}"),
                    ))
                }
            };
            let (ok, value, error) = match &result {
                Ok(v) => (true, v.clone(), None),
                Err(e) => (false, Value::Null, Some(e.body())),
            };
            emitter
                .emit(EventData::ToolCompleted {
                    tool_call_id: call_id,
                    tool: name.to_string(),
                    ok,
                    result: value,
                    error,
                    duration_ms: started.elapsed().as_millis() as u64,
                })
                .await;
            result
        })
    }
}

impl Handler<Poisoned> for ToolExecutor {
    type Result = ();

    fn handle(&mut self, _: Poisoned, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}
