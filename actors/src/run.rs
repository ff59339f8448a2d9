//! `AgentRunActor`: one short-lived actor per run, started by the registry on the agents'
//! arbiter and bound at creation to its user through its [`Emitter`].
//!
//! It emits `agent_started`, runs the agent (panics caught), and whatever happens (the agent
//! returns or fails or panics, the run times out, the owner cancels it, the server shuts down)
//! emits `agent_completed` exactly once and stops. Tool calls still open at that moment are
//! closed by the registry's ledger just before the `agent_completed` is sent on.
//!
//! It also owns the run's questions to its user (section 12, [`crate::interrupt`]): it asks
//! them, settles each once (the first answer, or expiry), and stops the run's clock while any
//! is open, since time spent waiting for a person does not count toward the run timeout.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use actix::prelude::*;
use futures_util::FutureExt;
use serde_json::Value;

use crate::agent::{Agent, AgentError, AgentRun, RunUsage};
use crate::catalog::Toolbox;
use crate::emitter::Emitter;
use crate::event::{rfc3339, ErrorBody, EventData, InterruptKind, RunStatus};
use crate::interrupt::{self, Answer, AnswerRefused, Ask};

pub struct AgentRunActor {
    agent: Arc<dyn Agent>,
    input: Option<Value>,
    emitter: Emitter,
    tools: Arc<Toolbox>,
    timeout: Duration,
    started: Instant,
    usage: Arc<RunUsage>,
    work: Option<SpawnHandle>,
    finished: bool,
    /// The run timeout's timer while it runs; stopped while a question is open.
    deadline: Option<SpawnHandle>,
    /// Run time left when the timer was last set, and when that was.
    time_left: Duration,
    armed_at: Instant,
    interrupt_timeout: Duration,
    /// Questions asked so far (their ids are `in_1`, `in_2`, ...).
    asked: u64,
    open: HashMap<String, OpenQuestion>,
}

/// A question waiting for its answer.
struct OpenQuestion {
    kind: InterruptKind,
    validator: Option<jsonschema::Validator>,
    answer: tokio::sync::oneshot::Sender<Option<Value>>,
    expiry: SpawnHandle,
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
        interrupt_timeout: Duration,
    ) -> Self {
        AgentRunActor {
            agent,
            input: Some(input),
            emitter,
            tools,
            timeout,
            started: Instant::now(),
            usage: Arc::new(RunUsage::default()),
            work: None,
            finished: false,
            deadline: None,
            time_left: timeout,
            armed_at: Instant::now(),
            interrupt_timeout,
            asked: 0,
            open: HashMap::new(),
        }
    }

    /// Starts (or restarts) the run's clock with the time it has left.
    fn arm_deadline(&mut self, ctx: &mut Context<Self>) {
        self.armed_at = Instant::now();
        self.deadline = Some(ctx.run_later(self.time_left, |act, ctx| {
            let error = ErrorBody::new(
                "timed_out",
                format!("the run took longer than {} ms", act.timeout.as_millis()),
            );
            act.finish(RunStatus::TimedOut, Value::Null, Some(error), ctx)
        }));
    }

    /// Stops the run's clock while the run waits for its user.
    fn pause_deadline(&mut self, ctx: &mut Context<Self>) {
        if let Some(timer) = self.deadline.take() {
            ctx.cancel_future(timer);
            self.time_left = self.time_left.saturating_sub(self.armed_at.elapsed());
        }
    }

    /// Settles an open question: tells every tab (`input_received`), hands the answer (or
    /// `None`) to the waiting agent, and restarts the clock if nothing else is open.
    fn settle(&mut self, interrupt_id: &str, response: Option<Value>, ctx: &mut Context<Self>) {
        let Some(question) = self.open.remove(interrupt_id) else {
            return;
        };
        ctx.cancel_future(question.expiry);
        self.emitter.emit_now(EventData::InputReceived {
            interrupt_id: interrupt_id.to_string(),
            expired: response.is_none(),
            response: response.clone().unwrap_or(Value::Null),
        });
        let _ = question.answer.send(response);
        if self.open.is_empty() && !self.finished {
            self.arm_deadline(ctx);
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
        // The ledger settles the open questions (expired) just before this end goes out.
        self.open.clear();
        if let Some(work) = self.work.take() {
            // Dropping the agent's future ends the agent wherever it is waiting.
            ctx.cancel_future(work);
        }
        self.emitter.emit_now(EventData::AgentCompleted {
            status,
            result,
            error,
            duration_ms: self.started.elapsed().as_millis() as u64,
            usage: self.usage.to_json(),
        });
        ctx.stop();
    }
}

impl Handler<Ask> for AgentRunActor {
    type Result = Option<(String, tokio::sync::oneshot::Receiver<Option<Value>>)>;

    fn handle(&mut self, ask: Ask, ctx: &mut Context<Self>) -> Self::Result {
        if self.finished {
            return None;
        }
        self.asked += 1;
        let interrupt_id = format!("in_{}", self.asked);
        let (schema, validator) = match ask.schema {
            Some((schema, validator)) => (Some(schema), Some(validator)),
            None => (None, None),
        };
        // Registered before the event leaves, so an answer can never arrive first.
        let (tx, rx) = tokio::sync::oneshot::channel();
        let expiry = ctx.run_later(self.interrupt_timeout, {
            let id = interrupt_id.clone();
            move |act, ctx| {
                log::debug!("run {}: question {id} expired", act.emitter.run_id());
                act.settle(&id, None, ctx)
            }
        });
        self.emitter.emit_now(EventData::InputRequested {
            interrupt_id: interrupt_id.clone(),
            kind: ask.kind,
            message: ask.message,
            tool_call_id: ask.tool_call_id,
            tool: ask.tool,
            args: ask.args,
            schema,
            expires_at: rfc3339(SystemTime::now() + self.interrupt_timeout),
        });
        if self.open.is_empty() {
            self.pause_deadline(ctx);
        }
        self.open.insert(
            interrupt_id.clone(),
            OpenQuestion {
                kind: ask.kind,
                validator,
                answer: tx,
                expiry,
            },
        );
        Some((interrupt_id, rx))
    }
}

impl Handler<Answer> for AgentRunActor {
    type Result = Result<(), AnswerRefused>;

    fn handle(&mut self, msg: Answer, ctx: &mut Context<Self>) -> Self::Result {
        let Some(question) = self.open.get(&msg.interrupt_id) else {
            // Settled already (the registry only sends answers to questions it saw asked).
            return Err(AnswerRefused::Resolved);
        };
        match question.kind {
            InterruptKind::Approval => {
                interrupt::check_approval(&msg.response).map_err(AnswerRefused::Invalid)?;
            }
            InterruptKind::Input => {
                if let Some(validator) = &question.validator {
                    interrupt::check_input(validator, &msg.response)
                        .map_err(AnswerRefused::Invalid)?;
                }
            }
        }
        self.settle(&msg.interrupt_id, Some(msg.response), ctx);
        Ok(())
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
            self.usage.clone(),
            ctx.address(),
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
        self.arm_deadline(ctx);
    }
}

impl Handler<Cancel> for AgentRunActor {
    type Result = ();

    fn handle(&mut self, Cancel(reason): Cancel, ctx: &mut Context<Self>) {
        let (status, error) = cancel_outcome(reason);
        self.finish(status, Value::Null, Some(error), ctx)
    }
}

/// How a run stopped from outside ends: its status and error.
pub(crate) fn cancel_outcome(reason: CancelReason) -> (RunStatus, ErrorBody) {
    match reason {
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
    }
}
