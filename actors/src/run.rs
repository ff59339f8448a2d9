//! `AgentRunActor`: one short-lived actor per run, started by the registry on the agents'
//! arbiter and bound at creation to its user through its [`Emitter`].
//!
//! It emits `agent_started`, runs the agent (panics caught), and whatever happens (the agent
//! returns or fails or panics, the run times out, the owner cancels it, the server shuts down)
//! emits `agent_completed` exactly once and stops. Tool calls still open at that moment are
//! closed by the registry's ledger just before the `agent_completed` is sent on.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use futures_util::FutureExt;
use serde_json::{json, Value};

use crate::agent::{Agent, AgentError, AgentRun};
use crate::catalog::Toolbox;
use crate::emitter::Emitter;
use crate::event::{ErrorBody, EventData, RunStatus};

pub struct AgentRunActor {
    agent: Arc<dyn Agent>,
    input: Option<Value>,
    emitter: Emitter,
    tools: Arc<Toolbox>,
    timeout: Duration,
    started: Instant,
    tool_calls: Arc<AtomicU64>,
    work: Option<SpawnHandle>,
    finished: bool,
}

/// Why a run is being stopped from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelReason {
    /// The owner asked (`cancel_run`).
    Requested,
    /// The server is shutting down.
    Shutdown,
    /// The shared log (Redis) has been unreachable for longer than this node can hold the
    /// run's events: it ends `failed`, code `unavailable`.
    Unavailable,
    /// Another node took this node for lost and ended the run (`node_lost`): whatever it
    /// still emits is refused.
    NodeLost,
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct Cancel(pub CancelReason);

impl AgentRunActor {
    pub fn new(
        agent: Arc<dyn Agent>,
        input: Value,
        emitter: Emitter,
        tools: Arc<Toolbox>,
        timeout: Duration,
    ) -> Self {
        AgentRunActor {
            agent,
            input: Some(input),
            emitter,
            tools,
            timeout,
            started: Instant::now(),
            tool_calls: Arc::new(AtomicU64::new(0)),
            work: None,
            finished: false,
        }
    }

    fn finish(
        &mut self,
        status: RunStatus,
        result: Value,
        error: Option<ErrorBody>,
        ctx: &mut Context<Self>,
    ) {
        if self.finished {
            return;
        }
        self.finished = true;
        if let Some(work) = self.work.take() {
            // Dropping the agent's future ends the agent wherever it is waiting.
            ctx.cancel_future(work);
        }
        self.emitter.emit_now(EventData::AgentCompleted {
            status,
            result,
            error,
            duration_ms: self.started.elapsed().as_millis() as u64,
            usage: json!({ "tool_calls": self.tool_calls.load(Ordering::Relaxed) }),
        });
        ctx.stop();
    }
}

impl Actor for AgentRunActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let input = self.input.take().unwrap_or(Value::Null);
        self.emitter.emit_now(EventData::AgentStarted {
            agent: self.agent.name().to_string(),
            input: input.clone(),
        });
        let run = AgentRun::new(
            self.emitter.clone(),
            self.tools.clone(),
            self.tool_calls.clone(),
        );
        let work = AssertUnwindSafe(self.agent.clone().run(run, input)).catch_unwind();
        let handle = ctx.spawn(actix::fut::wrap_future(work).map(
            |outcome, act: &mut Self, ctx| {
                act.work = None;
                match outcome {
                    Ok(Ok(result)) => act.finish(RunStatus::Succeeded, result, None, ctx),
                    Ok(Err(AgentError { code, message })) => act.finish(
                        RunStatus::Failed,
                        Value::Null,
                        Some(ErrorBody::new(code, message)),
                        ctx,
                    ),
                    Err(payload) => {
                        let what = crate::panic::message(payload.as_ref());
                        log::error!(
                            "run {}: agent {} panicked: {what}",
                            act.emitter.run_id(),
                            act.agent.name()
                        );
                        let error =
                            ErrorBody::new("agent_panicked", format!("the agent panicked: {what}"));
                        act.finish(RunStatus::Failed, Value::Null, Some(error), ctx)
                    }
                }
            },
        ));
        self.work = Some(handle);
        ctx.run_later(self.timeout, |act, ctx| {
            let error = ErrorBody::new(
                "timed_out",
                format!("the run took longer than {} ms", act.timeout.as_millis()),
            );
            act.finish(RunStatus::TimedOut, Value::Null, Some(error), ctx)
        });
    }
}

impl Handler<Cancel> for AgentRunActor {
    type Result = ();

    fn handle(&mut self, Cancel(reason): Cancel, ctx: &mut Context<Self>) {
        let (status, error) = match reason {
            CancelReason::Requested => (
                RunStatus::Cancelled,
                ErrorBody::new("cancelled", "the run was cancelled"),
            ),
            CancelReason::Shutdown => (
                RunStatus::Cancelled,
                ErrorBody::new("shutdown", "the server is shutting down"),
            ),
            CancelReason::Unavailable => (
                RunStatus::Failed,
                ErrorBody::new(
                    "unavailable",
                    "the event store was unreachable for longer than the server can hold events",
                ),
            ),
            CancelReason::NodeLost => (
                RunStatus::Failed,
                ErrorBody::new("node_lost", "the node running this run was taken for lost"),
            ),
        };
        self.finish(status, Value::Null, Some(error), ctx)
    }
}
