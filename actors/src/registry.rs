//! `ConnectionRegistry`: the in-process router. The one place that knows which sessions
//! belong to which user, numbers each user's run events (`seq`), checks them against their
//! run's ledger, encodes each once, keeps it for replay and hands the same bytes to every
//! connection of the owner.
//!
//! Being one actor is what makes the ordering guarantees simple: a session that joins (with
//! or without a resume) is answered and added in one step, so it receives every event after
//! the `last_seq` it was told, exactly once, in order. Delivery to a session is a `try_send`
//! on the one `Recipient` the session registered: a full mailbox means the client is not
//! reading, and the session is dropped at once (close 4008, then a TCP reset after the grace
//! period) without slowing anyone else.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use actix::prelude::*;
use serde_json::Value;

use crate::catalog::Catalog;
use crate::emitter::Emitter;
use crate::event::{encode, ErrorBody, EventData, RunStatus};
use crate::ids::{new_run_id, random_id, RunId, UserId};
use crate::ledger::RunLedger;
use crate::replay::{Gap, ReplayBuffer};
use crate::router::*;
use crate::run::{AgentRunActor, Cancel, CancelReason};

/// Limits the registry enforces.
#[derive(Debug, Clone)]
pub struct RegistrySettings {
    pub replay_capacity: usize,
    pub replay_ttl: Duration,
    pub max_runs_per_user: usize,
    pub run_timeout: Duration,
    pub slow_consumer_grace: Duration,
    /// Longest a shutdown waits for cancelled runs to report their end.
    pub shutdown_wait: Duration,
}

/// Events waiting in the registry's mailbox before emitters have to wait.
const MAILBOX: usize = 4096;

struct SessionLink {
    key: u64,
    push: Recipient<Push>,
    cut: Arc<AtomicBool>,
    reset: Option<ResetHandle>,
}

struct UserEntry {
    epoch: Arc<str>,
    last_seq: u64,
    replay: ReplayBuffer,
    sessions: Vec<SessionLink>,
    running: usize,
    /// Since when the user has had no session and no running run.
    idle_since: Option<Instant>,
}

impl UserEntry {
    fn touch_idle(&mut self, now: Instant) {
        if self.sessions.is_empty() && self.running == 0 {
            self.idle_since.get_or_insert(now);
        } else {
            self.idle_since = None;
        }
    }

    fn replay(
        &self,
        after_seq: u64,
        upto: u64,
        epoch: Option<&str>,
    ) -> Result<Vec<crate::event::Frame>, Gap> {
        if epoch.is_some_and(|e| e != &*self.epoch) {
            return Err(self.replay.gap(self.last_seq));
        }
        self.replay.range(after_seq, upto, self.last_seq)
    }
}

struct RunRecord {
    user: UserId,
    thread_id: Option<Arc<str>>,
    actor: Addr<AgentRunActor>,
    ledger: RunLedger,
    ended_at: Option<Instant>,
}

pub struct ConnectionRegistry {
    settings: RegistrySettings,
    catalog: Arc<Catalog>,
    agents: ArbiterHandle,
    /// New for every server start; with `generation` it makes each user history's epoch.
    boot: String,
    generation: u64,
    users: HashMap<UserId, UserEntry>,
    runs: HashMap<RunId, RunRecord>,
    running: usize,
    /// Slow consumers in their grace period, by session key.
    cut: HashMap<u64, ResetHandle>,
    shutting_down: bool,
    shutdown_waiters: Vec<tokio::sync::oneshot::Sender<()>>,
}

impl ConnectionRegistry {
    /// `agents` is the arbiter agent runs are started on.
    pub fn new(settings: RegistrySettings, catalog: Arc<Catalog>, agents: ArbiterHandle) -> Self {
        ConnectionRegistry {
            settings,
            catalog,
            agents,
            boot: random_id("", 10),
            generation: 0,
            users: HashMap::new(),
            runs: HashMap::new(),
            running: 0,
            cut: HashMap::new(),
            shutting_down: false,
            shutdown_waiters: Vec::new(),
        }
    }

    fn user_entry(&mut self, user: &UserId) -> &mut UserEntry {
        if !self.users.contains_key(user) {
            self.generation += 1;
            let entry = UserEntry {
                epoch: format!("{}-{}", self.boot, self.generation).into(),
                last_seq: 0,
                replay: ReplayBuffer::new(self.settings.replay_capacity, self.settings.replay_ttl),
                sessions: Vec::new(),
                running: 0,
                idle_since: None,
            };
            self.users.insert(user.clone(), entry);
        }
        // Inserted just above when missing.
        self.users.get_mut(user).expect("user entry exists")
    }

    /// Sequences, encodes, keeps and routes one event of `run_id`.
    fn deliver(
        &mut self,
        user: &UserId,
        run_id: &str,
        thread_id: Option<&str>,
        at: SystemTime,
        data: &EventData,
        ctx: &mut Context<Self>,
    ) {
        let now = Instant::now();
        let Some(entry) = self.users.get_mut(user) else {
            log::error!("run {run_id}: event for unknown user {user}");
            return;
        };
        entry.last_seq += 1;
        let frame = encode(entry.last_seq, run_id, thread_id, at, data);
        entry.replay.push(frame.clone(), now);
        let mut dropped = Vec::new();
        entry
            .sessions
            .retain(|s| match s.push.try_send(Push::Event(frame.clone())) {
                Ok(()) => true,
                Err(SendError::Full(_)) => {
                    s.cut.store(true, Ordering::Relaxed);
                    s.push.do_send(Push::Close(Goodbye::SlowConsumer));
                    dropped.push((s.key, s.reset.clone()));
                    false
                }
                Err(SendError::Closed(_)) => false,
            });
        for (key, reset) in dropped {
            log::warn!("user {user}: session {key} is not reading; dropped as a slow consumer");
            if let Some(reset) = reset {
                self.cut.insert(key, reset);
                ctx.run_later(self.settings.slow_consumer_grace, move |act, _| {
                    if let Some(reset) = act.cut.remove(&key) {
                        log::info!("session {key}: slow consumer still connected after the grace period; resetting");
                        reset();
                    }
                });
            }
        }
    }

    fn close_all_sessions(&mut self) {
        for entry in self.users.values() {
            for s in &entry.sessions {
                s.push.do_send(Push::Close(Goodbye::ServerShutdown));
            }
        }
    }

    fn maybe_finish_shutdown(&mut self) {
        if self.shutting_down && self.running == 0 && !self.shutdown_waiters.is_empty() {
            self.close_all_sessions();
            for w in self.shutdown_waiters.drain(..) {
                let _ = w.send(());
            }
        }
    }

    /// Forgets what has expired: old events, idle users, ended runs; ends runs whose actor died
    /// without saying so.
    fn sweep(&mut self, ctx: &mut Context<Self>) {
        let now = Instant::now();
        let ttl = self.settings.replay_ttl;
        for entry in self.users.values_mut() {
            entry.replay.prune(now);
            entry.sessions.retain(|s| s.push.connected());
            entry.touch_idle(now);
        }
        self.users.retain(|_, e| {
            e.idle_since
                .is_none_or(|since| now.duration_since(since) < ttl)
        });
        self.runs
            .retain(|_, r| r.ended_at.is_none_or(|at| now.duration_since(at) < ttl));
        let vanished: Vec<(RunId, UserId)> = self
            .runs
            .iter()
            .filter(|(_, r)| r.ended_at.is_none() && !r.actor.connected())
            .map(|(id, r)| (id.clone(), r.user.clone()))
            .collect();
        for (run_id, user) in vanished {
            log::error!("run {run_id} of user {user}: its actor stopped without ending the run");
            let end = Emit {
                user,
                run_id,
                at: SystemTime::now(),
                data: EventData::AgentCompleted {
                    status: RunStatus::Failed,
                    result: Value::Null,
                    error: Some(ErrorBody::new("internal", "the run stopped unexpectedly")),
                    duration_ms: 0,
                    usage: Value::Null,
                },
            };
            <Self as Handler<Emit>>::handle(self, end, ctx);
        }
    }
}

impl Actor for ConnectionRegistry {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(MAILBOX);
        let every =
            (self.settings.replay_ttl / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
        ctx.run_interval(every, |act, ctx| act.sweep(ctx));
    }
}

impl Handler<Emit> for ConnectionRegistry {
    type Result = ();

    fn handle(&mut self, msg: Emit, ctx: &mut Context<Self>) {
        let now = Instant::now();
        let Some(run) = self.runs.get_mut(&msg.run_id) else {
            log::debug!(
                "event {} for unknown run {} dropped",
                msg.data.kind(),
                msg.run_id
            );
            return;
        };
        if run.user != msg.user {
            log::error!(
                "run {}: emitter of user {} does not own it; event dropped",
                msg.run_id,
                msg.user
            );
            return;
        }
        let closing = match run.ledger.admit(&msg.data, now) {
            Ok(closing) => closing,
            Err(why) => {
                log::debug!("run {}: {} dropped ({why:?})", msg.run_id, msg.data.kind());
                return;
            }
        };
        let ended = run.ledger.is_completed();
        if ended {
            run.ended_at = Some(now);
        }
        let thread_id = run.thread_id.clone();
        for data in closing.iter().chain(std::iter::once(&msg.data)) {
            self.deliver(
                &msg.user,
                &msg.run_id,
                thread_id.as_deref(),
                msg.at,
                data,
                ctx,
            );
        }
        if ended {
            self.running -= 1;
            if let Some(entry) = self.users.get_mut(&msg.user) {
                entry.running -= 1;
                entry.touch_idle(now);
            }
            log::debug!("run {} of user {} ended", msg.run_id, msg.user);
            self.maybe_finish_shutdown();
        }
    }
}

impl Handler<Connect> for ConnectionRegistry {
    type Result = MessageResult<Connect>;

    fn handle(&mut self, msg: Connect, _: &mut Context<Self>) -> Self::Result {
        let shutting_down = self.shutting_down;
        let entry = self.user_entry(&msg.user);
        let replay = msg
            .resume
            .as_ref()
            .map(|r| entry.replay(r.after_seq, entry.last_seq, r.epoch.as_deref()));
        if shutting_down {
            msg.push.do_send(Push::Close(Goodbye::ServerShutdown));
        }
        entry.sessions.push(SessionLink {
            key: msg.key,
            push: msg.push,
            cut: msg.cut,
            reset: msg.reset,
        });
        entry.idle_since = None;
        MessageResult(Connected {
            epoch: entry.epoch.clone(),
            last_seq: entry.last_seq,
            replay,
        })
    }
}

impl Handler<Disconnect> for ConnectionRegistry {
    type Result = ();

    fn handle(&mut self, msg: Disconnect, _: &mut Context<Self>) {
        self.cut.remove(&msg.key);
        if let Some(entry) = self.users.get_mut(&msg.user) {
            entry.sessions.retain(|s| s.key != msg.key);
            entry.touch_idle(Instant::now());
        }
    }
}

impl Handler<Replay> for ConnectionRegistry {
    type Result = MessageResult<Replay>;

    fn handle(&mut self, msg: Replay, _: &mut Context<Self>) -> Self::Result {
        let entry = self.user_entry(&msg.user);
        MessageResult(entry.replay(msg.after_seq, msg.upto, msg.epoch.as_deref()))
    }
}

impl Handler<StartRun> for ConnectionRegistry {
    type Result = MessageResult<StartRun>;

    fn handle(&mut self, msg: StartRun, ctx: &mut Context<Self>) -> Self::Result {
        if self.shutting_down {
            return MessageResult(Err(StartRefused::ShuttingDown));
        }
        let Some(agent) = self.catalog.agent(&msg.agent) else {
            return MessageResult(Err(StartRefused::UnknownAgent));
        };
        let tools = self.catalog.tools().clone();
        if let Err(why) = agent.check_input(&msg.input, &tools) {
            return MessageResult(Err(StartRefused::InvalidInput(why)));
        }
        let limit = self.settings.max_runs_per_user;
        let entry = self.user_entry(&msg.user);
        if entry.running >= limit {
            return MessageResult(Err(StartRefused::TooManyRuns(limit)));
        }
        entry.running += 1;
        entry.idle_since = None;
        self.running += 1;

        let run_id = new_run_id();
        let emitter = Emitter::new(msg.user.clone(), run_id.clone(), ctx.address().recipient());
        let timeout = self.settings.run_timeout;
        let input = msg.input;
        let actor = AgentRunActor::start_in_arbiter(&self.agents, move |_| {
            AgentRunActor::new(agent, input, emitter, tools, timeout)
        });
        log::debug!("run {run_id} of user {} started ({})", msg.user, msg.agent);
        self.runs.insert(
            run_id.clone(),
            RunRecord {
                user: msg.user,
                thread_id: msg.thread_id.map(Arc::from),
                actor,
                ledger: RunLedger::default(),
                ended_at: None,
            },
        );
        MessageResult(Ok(run_id))
    }
}

impl Handler<CancelRun> for ConnectionRegistry {
    type Result = Result<(), RunNotFound>;

    fn handle(&mut self, msg: CancelRun, _: &mut Context<Self>) -> Self::Result {
        match self.runs.get(msg.run_id.as_str()) {
            Some(run) if run.user == msg.user => {
                if run.ended_at.is_none() {
                    log::debug!("run {} cancelled by its user", msg.run_id);
                    run.actor.do_send(Cancel(CancelReason::Requested));
                }
                Ok(())
            }
            _ => Err(RunNotFound),
        }
    }
}

impl Handler<Shutdown> for ConnectionRegistry {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, _: Shutdown, ctx: &mut Context<Self>) -> Self::Result {
        self.shutting_down = true;
        let running: Vec<_> = self
            .runs
            .values()
            .filter(|r| r.ended_at.is_none())
            .map(|r| r.actor.clone())
            .collect();
        log::info!("shutting down: cancelling {} running runs", running.len());
        for actor in running {
            actor.do_send(Cancel(CancelReason::Shutdown));
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.shutdown_waiters.push(tx);
        self.maybe_finish_shutdown();
        // Runs whose end never arrives must not hold the server up forever.
        ctx.run_later(self.settings.shutdown_wait, |act, _| {
            if !act.shutdown_waiters.is_empty() {
                log::warn!("shutting down: {} runs did not end in time", act.running);
                act.running = 0;
                act.maybe_finish_shutdown();
            }
        });
        Box::pin(actix::fut::wrap_future(async move {
            let _ = rx.await;
        }))
    }
}
