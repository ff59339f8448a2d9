//! `ConnectionRegistry`: the router. The one actor that knows which sessions belong to which
//! user, checks each run event against its run's ledger, has it numbered (`seq`) and encoded
//! once by the event log, and hands the same bytes to every connection of the owner.
//!
//! Being one actor is what makes the ordering guarantees simple: a session that joins (with
//! or without a resume) is answered and added in one step, so it receives every event after
//! the `last_seq` it was told, exactly once, in order.
//!
//! Its state is in parts with one job each:
//! - [`event_log`]: the [`EventLog`] seam and each user's [`UserLog`](event_log::UserLog), bounded by count, age and
//!   bytes (per user and over all users, idle users' histories first);
//! - [`fanout`] and [`users`]: each user's sessions, fed live or, once behind, from the log;
//!   a tab that stops reading is cut off within `fanout::STALL_LIMIT`. When appending an event
//!   would evict one a session still catching up needs, the event is *held* and the user's
//!   [`EmitGate`] closes, so agents wait rather than outrun a reading tab;
//! - [`runs`]: the run table, ledgers, limits and sweeping;
//! - [`shared`]: the same on a shared log (Redis, PROTOCOL.md section 10): this node's events
//!   are numbered on Redis and come back with every other node's; limits, cancels and run
//!   views go through Redis; [`window`]: each user's log as this node's window on the
//!   history, fed in `seq` order.

pub mod event_log;
pub mod fanout;
mod published;
pub mod runs;
pub mod shared;
mod threads;
pub mod users;
pub mod window;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use actix::prelude::*;
use serde_json::Value;

use crate::agent::Agent;
use crate::catalog::{Catalog, Toolbox};
use crate::emitter::{EmitGate, Emitter};
use crate::event::{ErrorBody, EventData, Frame, RunStatus};
use crate::ids::{new_run_id, RunId, UserId};
use crate::metrics::Metrics;
use crate::rate::TokenBucket;
use crate::router::*;
use crate::run::{AgentRunActor, CancelReason};

use self::event_log::{Appended, EventLog, LogBudget, LogBytes, MemoryLog, NewEvent};
use self::fanout::SessionLink;
use self::runs::{NotAdmitted, Publication, RunActor, RunTable};
use self::users::UserEntry;
use crate::published_run::PublishedRunActor;

/// Limits the registry enforces.
#[derive(Debug, Clone)]
pub struct RegistrySettings {
    pub replay_capacity: usize,
    pub replay_ttl: Duration,
    /// Bytes of events kept per user, and over all users.
    pub replay_user_max_bytes: usize,
    pub replay_max_bytes: usize,
    pub max_runs_per_user: usize,
    pub run_timeout: Duration,
    /// A question to a user expires after this (PROTOCOL.md §12).
    pub interrupt_timeout: Duration,
    /// A published run with no batch for this long ends `timed_out` (section 11).
    pub publish_idle: Duration,
    /// Runs one publisher may have running at once, over all its users (on this node).
    pub max_runs_per_publisher: usize,
    pub webhooks: crate::published_run::WebhookAgents,
    pub slow_consumer_grace: Duration,
    /// Longest a shutdown waits for cancelled runs to report their end.
    pub shutdown_wait: Duration,
    /// Run starts per user per minute (bursts of as many).
    pub runs_per_minute: u32,
    pub max_connections_per_user: usize,
}

impl Default for RegistrySettings {
    /// The server's defaults (PROTOCOL.md §9).
    fn default() -> Self {
        RegistrySettings {
            replay_capacity: 10_000,
            replay_ttl: Duration::from_secs(600),
            replay_user_max_bytes: 16 * 1024 * 1024,
            replay_max_bytes: 1024 * 1024 * 1024,
            max_runs_per_user: 16,
            run_timeout: Duration::from_secs(300),
            interrupt_timeout: Duration::from_secs(600),
            publish_idle: Duration::from_secs(60),
            max_runs_per_publisher: 1000,
            webhooks: Default::default(),
            slow_consumer_grace: Duration::from_secs(5),
            shutdown_wait: Duration::from_secs(10),
            runs_per_minute: 120,
            max_connections_per_user: 32,
        }
    }
}

impl RegistrySettings {
    fn budget(&self) -> LogBudget {
        LogBudget {
            capacity: self.replay_capacity,
            max_age: self.replay_ttl,
            user_max_bytes: self.replay_user_max_bytes,
            max_bytes: self.replay_max_bytes,
        }
    }
}

/// Events waiting in the registry's mailbox before emitters have to wait.
const MAILBOX: usize = 4096;
/// How often sessions that fell behind are offered the frames they missed.
const CATCH_UP_TICK: Duration = Duration::from_millis(2);
/// Run views (`GET /v1/runs/{id}`) one user may have being sent at once.
const INSPECTS_PER_USER: usize = 4;

pub struct ConnectionRegistry {
    settings: RegistrySettings,
    budget: LogBudget,
    metrics: Arc<Metrics>,
    catalog: Arc<Catalog>,
    agents: ArbiterHandle,
    log: Box<dyn EventLog>,
    users: HashMap<UserId, UserEntry>,
    runs: RunTable,
    /// Bytes in all users' logs.
    log_bytes: LogBytes,
    /// Slow consumers in their grace period, by session key.
    cut: HashMap<u64, ResetHandle>,
    /// Users with a session fed from the log, and whether a catch-up is scheduled.
    behind_users: HashSet<UserId>,
    catch_up_scheduled: bool,
    shutting_down: bool,
    /// Set when runs that were cancelled at a stop never reported their end.
    stop_now: bool,
    shutdown_waiters: Vec<tokio::sync::oneshot::Sender<()>>,
    /// Set when the log is shared (Redis).
    shared: Option<shared::Shared>,
}

/// A run start that passed the checks that need nothing but this node.
pub enum CheckedStart {
    /// An agent of this server.
    Agent {
        agent: Arc<dyn Agent>,
        tools: Arc<Toolbox>,
    },
    /// A run published from outside (section 11): by `owner`, or by a webhook agent at
    /// `webhook`.
    Published {
        owner: Option<Arc<str>>,
        webhook: Option<String>,
    },
}

impl ConnectionRegistry {
    /// `agents` is the arbiter agent runs are started on. Events are kept in the process
    /// ([`MemoryLog`]).
    pub fn new(
        settings: RegistrySettings,
        metrics: Arc<Metrics>,
        catalog: Arc<Catalog>,
        agents: ArbiterHandle,
    ) -> Self {
        ConnectionRegistry {
            budget: settings.budget(),
            settings,
            metrics,
            catalog,
            agents,
            log: Box::new(MemoryLog),
            users: HashMap::new(),
            runs: RunTable::default(),
            log_bytes: LogBytes::default(),
            cut: HashMap::new(),
            behind_users: Default::default(),
            catch_up_scheduled: false,
            shutting_down: false,
            stop_now: false,
            shutdown_waiters: Vec::new(),
            shared: None,
        }
    }

    fn user_entry(&mut self, user: &UserId) -> &mut UserEntry {
        let (settings, budget, log) = (&self.settings, &self.budget, &mut self.log);
        self.users.entry(user.clone()).or_insert_with(|| {
            UserEntry::new(
                log.open(user, budget),
                TokenBucket::new(
                    settings.runs_per_minute,
                    settings.runs_per_minute as f64 / 60.0,
                    Instant::now(),
                ),
            )
        })
    }

    /// Has one admitted event of `run_id` numbered and encoded, then appends it, or holds it
    /// while appending would evict what a session catching up still needs.
    #[allow(clippy::too_many_arguments)]
    fn sequence(
        &mut self,
        user: &UserId,
        run_id: &RunId,
        thread_id: Option<&str>,
        at: SystemTime,
        data: &EventData,
        index: u64,
        ctx: &mut Context<Self>,
    ) {
        let Some(entry) = self.users.get_mut(user) else {
            log::error!("run {run_id}: event for unknown user {user}");
            return;
        };
        self.metrics.emitted(data).inc();
        let event = NewEvent {
            run_id,
            thread_id,
            at,
            data,
            index,
        };
        let frame = match self.log.append(user, &mut entry.log, event) {
            Appended::Now(frame) => frame,
            // Numbered on the shared log; it comes back as `LogNews::Frame`.
            Appended::Queued { bytes } => return self.note_pending(run_id, bytes),
        };
        self.runs.note_seq(run_id, frame.seq);
        if entry.held.is_empty() && entry.has_room_for(&frame) {
            self.append(user, frame, ctx);
        } else {
            if entry.held.is_empty() {
                self.metrics.emit_holds.inc();
                log::debug!("user {user}: holding agents back while a connection catches up");
            }
            entry.gate.close();
            entry.held.push_back(frame);
        }
    }

    /// Appends a frame to the user's log and offers it to every live session.
    fn append(&mut self, user: &UserId, frame: Frame, ctx: &mut Context<Self>) {
        let Some(entry) = self.users.get_mut(user) else {
            return;
        };
        let kind = frame.kind;
        let appended = entry.append(frame, Instant::now());
        self.metrics.delivered(kind).inc_by(appended.delivered);
        self.log_bytes
            .account(appended.change, "user_limit", &self.metrics);
        if appended.fell_behind {
            self.behind_users.insert(user.clone());
            self.schedule_catch_up(ctx);
        }
        if self.log_bytes.total > self.budget.max_bytes {
            let logs = self
                .users
                .iter_mut()
                .map(|(id, e)| (id, &mut e.log, e.idle_since));
            self.log_bytes
                .enforce(self.budget.max_bytes, user, logs, &self.metrics);
        }
    }

    /// Appends what is held for `user` as far as there is room; opens the gate once nothing
    /// is held.
    fn release_held(&mut self, user: &UserId, ctx: &mut Context<Self>) {
        loop {
            let Some(entry) = self.users.get_mut(user) else {
                return;
            };
            let Some(front) = entry.held.front() else {
                entry.gate.open();
                return;
            };
            if !entry.has_room_for(front) {
                return;
            }
            if let Some(frame) = entry.held.pop_front() {
                self.append(user, frame, ctx);
            }
        }
    }

    fn schedule_catch_up(&mut self, ctx: &mut Context<Self>) {
        if !self.catch_up_scheduled {
            self.catch_up_scheduled = true;
            ctx.run_later(CATCH_UP_TICK, |act, ctx| {
                act.catch_up_scheduled = false;
                act.catch_up(ctx);
            });
        }
    }

    /// Feeds sessions that are behind from the log, cuts off those that are not reading or
    /// fell out of the log, and releases held events once there is room.
    fn catch_up(&mut self, ctx: &mut Context<Self>) {
        let now = Instant::now();
        for user in std::mem::take(&mut self.behind_users) {
            self.catch_up_user(&user, now, ctx);
        }
        if !self.behind_users.is_empty() {
            self.schedule_catch_up(ctx);
        }
    }

    fn catch_up_user(&mut self, user: &UserId, now: Instant, ctx: &mut Context<Self>) {
        let Some(entry) = self.users.get_mut(user) else {
            return;
        };
        for s in entry.pump(now, &self.metrics) {
            self.cut_off(user, s, ctx);
        }
        self.release_held(user, ctx);
        if self.users.get(user).is_some_and(UserEntry::has_work) {
            self.behind_users.insert(user.clone());
        }
    }

    /// Drops a session that is not reading: it discards what is still queued for it, gets
    /// close 4008 when it reads again, and is reset if it has not gone after the grace period.
    /// Until it has gone it still counts against its user's connection limit.
    fn cut_off(&mut self, user: &UserId, s: SessionLink, ctx: &mut Context<Self>) {
        let key = s.key;
        log::warn!("user {user}: session {key} is not reading; dropped as a slow consumer");
        self.metrics.slow_consumers.inc();
        if let Some(entry) = self.users.get_mut(user) {
            entry.cut.insert(key);
        }
        if let Some(reset) = s.cut(Push::Close(Goodbye::SlowConsumer)) {
            self.cut.insert(key, reset);
            ctx.run_later(self.settings.slow_consumer_grace, move |act, _| {
                if let Some(reset) = act.cut.remove(&key) {
                    log::info!("session {key}: slow consumer still connected after the grace period; resetting");
                    reset();
                }
            });
        }
    }

    /// At a stop: every held event is appended (no one is waiting for room any more), every
    /// session gets what it is owed and then close 1001.
    fn close_all_sessions(&mut self) {
        let now = Instant::now();
        for entry in self.users.values_mut() {
            while let Some(frame) = entry.held.pop_front() {
                let appended = entry.append(frame, now);
                self.log_bytes
                    .account(appended.change, "user_limit", &self.metrics);
            }
            entry.gate.open();
            entry.flush_and_close(|| Push::Close(Goodbye::ServerShutdown));
        }
    }

    fn maybe_finish_shutdown(&mut self) {
        let appending = self.shared.as_ref().is_some_and(|s| s.pending > 0);
        if self.shutting_down
            && ((self.runs.running == 0 && !appending) || self.stop_now)
            && !self.shutdown_waiters.is_empty()
        {
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
        let mut changes = Vec::new();
        for entry in self.users.values_mut() {
            changes.push((entry.log.frames.prune(now), "age"));
            entry.sessions.retain(SessionLink::connected);
            entry.touch_idle(now);
        }
        // On a shared log the history is in Redis: a user idle here is unfollowed at once.
        let shared = self.shared.as_ref().map(|s| s.link.clone());
        self.users.retain(|user, e| {
            let keep = match &shared {
                None => e
                    .idle_since
                    .is_none_or(|since| now.duration_since(since) < ttl),
                Some(_) => {
                    // A user whose epoch is being renewed is kept: connects wait in its
                    // entry for the new epoch, and a fresh entry would read the old one.
                    e.idle_since.is_none()
                        || e.follow.asked
                        || e.follow.renewing
                        || e.follow.reading > 0
                        || e.inspecting > 0
                }
            };
            if !keep {
                changes.push((e.log.frames.clear(), "age"));
                if let (Some(link), true) = (&shared, e.follow.synced) {
                    link.unfollow(user.clone());
                }
            }
            keep
        });
        for (change, reason) in changes {
            self.log_bytes.account(change, reason, &self.metrics);
        }
        for (run_id, user) in self.runs.sweep(now, ttl) {
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
        self.start_resync_timer(ctx);
    }
}

impl Handler<Emit> for ConnectionRegistry {
    type Result = ();

    fn handle(&mut self, mut msg: Emit, ctx: &mut Context<Self>) {
        let now = Instant::now();
        let admitted = match self.runs.admit(&mut msg, now) {
            Ok(admitted) => admitted,
            Err(why) => {
                match why {
                    NotAdmitted::UnknownRun => log::debug!(
                        "event {} for unknown run {} dropped",
                        msg.data.kind(),
                        msg.run_id
                    ),
                    NotAdmitted::WrongUser => log::error!(
                        "run {}: emitter of user {} does not own it; event dropped",
                        msg.run_id,
                        msg.user
                    ),
                    NotAdmitted::Ledger(why) => {
                        log::debug!("run {}: {} dropped ({why:?})", msg.run_id, msg.data.kind())
                    }
                }
                self.metrics.events_refused.inc();
                return;
            }
        };
        let events = admitted.closing.iter().chain(std::iter::once(&msg.data));
        for (index, data) in (admitted.first_index..).zip(events) {
            self.sequence(
                &msg.user,
                &msg.run_id,
                admitted.thread_id.as_deref(),
                msg.at,
                data,
                index,
                ctx,
            );
        }
        if let Some(status) = admitted.ended {
            self.run_ended(&msg.user, &msg.run_id, status, now);
        }
    }
}

impl ConnectionRegistry {
    /// A run's end was sequenced: the user has one run fewer, and a stop may be complete.
    fn run_ended(&mut self, user: &UserId, run_id: &str, status: RunStatus, now: Instant) {
        self.metrics.run_ended(status.as_str());
        if let Some(entry) = self.users.get_mut(user) {
            entry.running = entry.running.saturating_sub(1);
            entry.touch_idle(now);
        }
        log::debug!("run {run_id} of user {user} ended");
        self.maybe_finish_shutdown();
    }
}

impl ConnectionRegistry {
    /// A session joins, in one step: answered with the `last_seq` it is live from, and added.
    fn join(&mut self, msg: Connect, ctx: &mut Context<Self>) -> Result<Connected, ConnectRefused> {
        let now = Instant::now();
        let shutting_down = self.shutting_down;
        let limit = self.settings.max_connections_per_user;
        let metrics = self.metrics.clone();
        let entry = self.user_entry(&msg.user);
        entry.sessions.retain(SessionLink::connected);
        if entry.sessions.len() + entry.cut.len() >= limit {
            entry.touch_idle(now);
            return Err(ConnectRefused::TooManyConnections(limit));
        }
        let mut link = SessionLink::new(msg.key, msg.push, msg.shared, msg.reset, now);
        let last_seq = entry.log.last_seq;
        let resume = msg.resume.as_ref().map(|r| {
            entry
                .log
                .check_resume(r.after_seq, last_seq, r.epoch.as_deref())?;
            link.start_replay(
                ResumedNote {
                    from_seq: r.after_seq + 1,
                    to_seq: last_seq,
                    request_id: None,
                },
                now,
            );
            Ok(())
        });
        match &resume {
            Some(Ok(())) => metrics.resume_replayed.inc(),
            Some(Err(_)) => metrics.resume_gaps.inc(),
            None => {}
        }
        if shutting_down {
            link.flush_and_close(
                &entry.log.frames,
                last_seq,
                Push::Close(Goodbye::ServerShutdown),
            );
        }
        let catching_up = link.has_work();
        entry.sessions.push(link);
        entry.idle_since = None;
        let connected = Connected {
            epoch: entry.log.epoch.clone(),
            last_seq,
            resume,
        };
        if catching_up {
            self.catch_up_user(&msg.user, now, ctx);
            self.schedule_catch_up(ctx);
        }
        Ok(connected)
    }
}

impl Handler<Connect> for ConnectionRegistry {
    type Result = ResponseActFuture<Self, Result<Connected, ConnectRefused>>;

    fn handle(&mut self, msg: Connect, ctx: &mut Context<Self>) -> Self::Result {
        if self.shared.is_some() {
            return self.connect_shared(msg, ctx);
        }
        Box::pin(actix::fut::ready(self.join(msg, ctx)))
    }
}

impl Handler<Disconnect> for ConnectionRegistry {
    type Result = ();

    fn handle(&mut self, msg: Disconnect, ctx: &mut Context<Self>) {
        self.cut.remove(&msg.key);
        if let Some(entry) = self.users.get_mut(&msg.user) {
            entry.sessions.retain(|s| s.key != msg.key);
            entry.cut.remove(&msg.key);
            entry.touch_idle(Instant::now());
        }
        // It may have been what held the user's agents back.
        self.release_held(&msg.user, ctx);
    }
}

impl ConnectionRegistry {
    /// A `resume` command: its replay begins, fed from the log alongside live frames.
    fn resume(&mut self, msg: Resume, ctx: &mut Context<Self>) -> Result<(), ResumeRefused> {
        let now = Instant::now();
        let metrics = self.metrics.clone();
        let entry = self.user_entry(&msg.user);
        if let Err(gap) = entry
            .log
            .check_resume(msg.after_seq, msg.upto, msg.epoch.as_deref())
        {
            metrics.resume_gaps.inc();
            return Err(ResumeRefused::Gap(gap));
        }
        let upto = msg.upto.min(entry.log.last_seq).max(msg.after_seq);
        let note = ResumedNote {
            from_seq: msg.after_seq + 1,
            to_seq: upto,
            request_id: msg.request_id,
        };
        let Some(link) = entry.sessions.iter_mut().find(|s| s.key == msg.key) else {
            // Cut off or gone: nothing will be written to it anyway.
            return Ok(());
        };
        if !link.start_backfill(note, now) {
            return Err(ResumeRefused::InProgress);
        }
        metrics.resume_replayed.inc();
        self.catch_up_user(&msg.user, now, ctx);
        self.schedule_catch_up(ctx);
        Ok(())
    }
}

impl Handler<Resume> for ConnectionRegistry {
    type Result = ResponseActFuture<Self, Result<(), ResumeRefused>>;

    fn handle(&mut self, msg: Resume, ctx: &mut Context<Self>) -> Self::Result {
        if self.shared.is_some() {
            return self.resume_shared(msg, ctx);
        }
        Box::pin(actix::fut::ready(self.resume(msg, ctx)))
    }
}

impl ConnectionRegistry {
    /// The checks of a run start that need nothing but this node, but the agent's own input
    /// check ([`check_input`], which is the agent's code and runs on the agents' arbiter).
    fn check_start(&self, msg: &StartRun) -> Result<CheckedStart, StartRefused> {
        if self.shutting_down {
            return Err(StartRefused::ShuttingDown);
        }
        let Some(agent) = self.catalog.agent(&msg.agent) else {
            return match self.settings.webhooks.urls.get(&msg.agent) {
                Some(url) => Ok(CheckedStart::Published {
                    owner: None,
                    webhook: Some(url.clone()),
                }),
                None => Err(StartRefused::UnknownAgent),
            };
        };
        let tools = self.catalog.tools().clone();
        Ok(CheckedStart::Agent { agent, tools })
    }

    /// Claims the user's limits (here, or on Redis) and launches the run.
    fn claim_and_launch(
        &mut self,
        msg: StartRun,
        checked: CheckedStart,
        ctx: &mut Context<Self>,
    ) -> ResponseActFuture<Self, Result<RunId, StartRefused>> {
        if self.shutting_down {
            return Box::pin(actix::fut::ready(Err(StartRefused::ShuttingDown)));
        }
        if self.shared.is_some() {
            return self.claim_shared(msg, checked);
        }
        let started = self
            .claim_locally(&msg.user)
            .map(|()| self.launch(new_run_id(), msg, checked, ctx));
        Box::pin(actix::fut::ready(started))
    }

    /// This node's limits of the user's runs (without a shared log).
    fn claim_locally(&mut self, user: &UserId) -> Result<(), StartRefused> {
        let limit = self.settings.max_runs_per_user;
        let entry = self.user_entry(user);
        if entry.running >= limit {
            entry.touch_idle(Instant::now());
            return Err(StartRefused::TooManyRuns(limit));
        }
        if let Err(wait) = entry.run_starts.take(Instant::now()) {
            entry.touch_idle(Instant::now());
            return Err(StartRefused::RateLimited {
                retry_after_ms: wait.as_millis() as u64 + 1,
            });
        }
        Ok(())
    }

    /// Starts a run that was granted: its actor, bound to its user by its emitter.
    fn launch(
        &mut self,
        run_id: RunId,
        mut msg: StartRun,
        checked: CheckedStart,
        ctx: &mut Context<Self>,
    ) -> RunId {
        let entry = self.user_entry(&msg.user);
        entry.running += 1;
        entry.idle_since = None;
        let gate: Arc<EmitGate> = entry.gate.clone();
        let emitter = Emitter::new(
            msg.user.clone(),
            run_id.clone(),
            ctx.address().recipient(),
            gate,
        );
        let (timeout, interrupt_timeout) =
            (self.settings.run_timeout, self.settings.interrupt_timeout);
        let (actor, publication) = match checked {
            CheckedStart::Agent { agent, tools } => {
                let input = std::mem::take(&mut msg.input);
                let actor = AgentRunActor::start_in_arbiter(&self.agents, move |_| {
                    AgentRunActor::new(agent, input, emitter, tools, timeout, interrupt_timeout)
                });
                (RunActor::Agent(actor), None)
            }
            CheckedStart::Published { owner, webhook } => {
                let call = webhook.map(|url| self.webhook_call(&run_id, &msg, url));
                let idle = self.settings.publish_idle;
                let actor = PublishedRunActor::start_in_arbiter(&self.agents, move |_| {
                    PublishedRunActor::new(emitter, timeout, idle, call)
                });
                let publication = Publication { owner, last_n: 0 };
                (RunActor::Published(actor), Some(publication))
            }
        };
        log::debug!("run {run_id} of user {}: started ({})", msg.user, msg.agent);
        self.metrics.runs_started.inc();
        let published = publication.is_some();
        self.runs.insert(
            run_id.clone(),
            msg.user.clone(),
            msg.agent.clone(),
            msg.thread_id,
            actor,
            publication,
        );
        if published {
            // A published run's start is sequenced here, before its creator is answered: its
            // first batch can then never come before it.
            let started = Emit {
                user: msg.user,
                run_id: run_id.clone(),
                at: SystemTime::now(),
                data: EventData::AgentStarted {
                    agent: msg.agent,
                    input: msg.input,
                },
            };
            <Self as Handler<Emit>>::handle(self, started, ctx);
        }
        run_id
    }
}

impl Handler<StartRun> for ConnectionRegistry {
    type Result = ResponseActFuture<Self, Result<RunId, StartRefused>>;

    fn handle(&mut self, msg: StartRun, ctx: &mut Context<Self>) -> Self::Result {
        let checked = match self.check_start(&msg) {
            Ok(checked) => checked,
            Err(refused) => return Box::pin(actix::fut::ready(Err(refused))),
        };
        let CheckedStart::Agent { agent, tools } = &checked else {
            return self.claim_and_launch(msg, checked, ctx);
        };
        // The agent's input check is its code: it runs on the agents' arbiter, never here,
        // and a panic in it is contained (the start is refused, the server goes on).
        let (agent, tools) = (agent.clone(), tools.clone());
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.agents.spawn(async move {
            let verdict = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                agent.check_input(&msg.input, &tools)
            }));
            let _ = tx.send((verdict, msg));
        });
        Box::pin(
            actix::fut::wrap_future(rx).then(move |checked_input, act: &mut Self, ctx| {
                match checked_input {
                    Ok((Ok(Ok(())), msg)) => act.claim_and_launch(msg, checked, ctx),
                    Ok((Ok(Err(why)), _)) => {
                        Box::pin(actix::fut::ready(Err(StartRefused::InvalidInput(why))))
                    }
                    Ok((Err(payload), msg)) => {
                        let what = crate::panic::message(payload.as_ref());
                        log::error!("agent {}: its input check panicked: {what}", msg.agent);
                        Box::pin(actix::fut::ready(Err(StartRefused::InvalidInput(format!(
                            "the agent's input check failed: {what}"
                        )))))
                    }
                    // The agents' arbiter is gone: the server is stopping.
                    Err(_) => Box::pin(actix::fut::ready(Err(StartRefused::ShuttingDown))),
                }
            }),
        )
    }
}

impl Handler<CancelRun> for ConnectionRegistry {
    type Result = ResponseActFuture<Self, Result<(), CancelRefused>>;

    fn handle(&mut self, msg: CancelRun, _: &mut Context<Self>) -> Self::Result {
        if self.runs.cancel(&msg.user, &msg.run_id).is_some() {
            return Box::pin(actix::fut::ready(Ok(())));
        }
        if self.shared.is_some() {
            // Maybe another node's run.
            return self.cancel_shared(msg);
        }
        Box::pin(actix::fut::ready(Err(CancelRefused::NotFound)))
    }
}

impl ConnectionRegistry {
    /// An answer to a question of one of this node's runs: the run's actor settles it (first
    /// answer wins there); the ledger has already told apart a run or question that is not
    /// the user's, not asked, or settled.
    fn respond(&self, msg: Respond) -> ResponseActFuture<Self, Result<(), RespondRefused>> {
        let actor = match self
            .runs
            .question(&msg.user, &msg.run_id, &msg.interrupt_id)
        {
            Ok(actor) => actor,
            Err(refused) => return Box::pin(actix::fut::ready(Err(refused))),
        };
        let answer = crate::interrupt::Answer {
            interrupt_id: msg.interrupt_id,
            response: msg.response,
        };
        Box::pin(actix::fut::wrap_future(async move {
            match actor.send(answer).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(crate::interrupt::AnswerRefused::Resolved)) => Err(RespondRefused::Resolved),
                Ok(Err(crate::interrupt::AnswerRefused::Invalid(why))) => {
                    Err(RespondRefused::Invalid(why))
                }
                // The run's actor has stopped: the run ended, and its questions expired.
                Err(_) => Err(RespondRefused::Resolved),
            }
        }))
    }
}

impl Handler<Respond> for ConnectionRegistry {
    type Result = ResponseActFuture<Self, Result<(), RespondRefused>>;

    fn handle(&mut self, msg: Respond, _: &mut Context<Self>) -> Self::Result {
        if self.shared.is_some() && self.runs.get(&msg.run_id).is_none() {
            // Maybe another node's run.
            return self.respond_shared(msg);
        }
        self.respond(msg)
    }
}

impl Handler<Shutdown> for ConnectionRegistry {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, msg: Shutdown, ctx: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.shutdown_waiters.push(tx);
        if !self.shutting_down {
            self.shutting_down = true;
            log::info!(
                "draining: {} runs running, {} s for them to finish",
                self.runs.running,
                msg.drain.as_secs_f64()
            );
            ctx.run_later(msg.drain, |act, ctx| {
                if act.runs.running > 0 {
                    log::info!("drain time is up: cancelling {} runs", act.runs.running);
                    act.runs.cancel_running(CancelReason::Shutdown);
                }
                // Runs whose end never arrives must not hold the server up forever.
                ctx.run_later(act.settings.shutdown_wait, |act, _| {
                    if !act.shutdown_waiters.is_empty() {
                        log::warn!(
                            "stopping: {} runs did not report their end",
                            act.runs.running
                        );
                        act.stop_now = true;
                        act.maybe_finish_shutdown();
                    }
                });
            });
        }
        self.maybe_finish_shutdown();
        Box::pin(actix::fut::wrap_future(async move {
            let _ = rx.await;
        }))
    }
}

impl ConnectionRegistry {
    /// A run of this node's, its events from the user's log.
    fn inspect(
        &mut self,
        msg: InspectRun,
        ctx: &mut Context<Self>,
    ) -> Result<RunView, InspectRefused> {
        let (run_id, run) = self
            .runs
            .get(&msg.run_id)
            .filter(|(_, run)| run.user == msg.user)
            .ok_or(InspectRefused::NotFound)?;
        let entry = self.users.get_mut(&msg.user);
        let (events, truncated) = runs::events_of(run_id, run.seqs, entry.as_ref().map(|e| &e.log));
        // A user forgotten before the run's record: the view has no events left, and nothing
        // to count it against.
        if let Some(entry) = entry {
            if entry.inspecting >= INSPECTS_PER_USER {
                return Err(InspectRefused::Busy(INSPECTS_PER_USER));
            }
            entry.inspecting += 1;
        }
        Ok(RunView {
            run_id: run_id.clone(),
            agent: run.agent.clone(),
            thread_id: run.thread_id.clone(),
            status: run.ended.map(|(_, _, status)| status),
            started_at: run.started_at,
            ended_at: run.ended.map(|(_, at, _)| at),
            events,
            truncated,
            lease: InspectLease::new(msg.user, ctx.address().recipient()),
        })
    }
}

impl Handler<InspectRun> for ConnectionRegistry {
    type Result = ResponseActFuture<Self, Result<RunView, InspectRefused>>;

    fn handle(&mut self, msg: InspectRun, ctx: &mut Context<Self>) -> Self::Result {
        if self.shared.is_some() {
            // The window here holds only what this node's sessions needed: Redis has it all.
            return self.inspect_shared(msg, ctx);
        }
        Box::pin(actix::fut::ready(self.inspect(msg, ctx)))
    }
}

impl Handler<InspectDone> for ConnectionRegistry {
    type Result = ();

    fn handle(&mut self, msg: InspectDone, _: &mut Context<Self>) {
        if let Some(entry) = self.users.get_mut(&msg.user) {
            entry.inspecting = entry.inspecting.saturating_sub(1);
        }
    }
}

impl Handler<RefreshGauges> for ConnectionRegistry {
    type Result = ();

    fn handle(&mut self, _: RefreshGauges, _: &mut Context<Self>) {
        let (mut connections, mut depth_sum, mut depth_max) = (0, 0, 0);
        for entry in self.users.values() {
            connections += entry.cut.len() as i64;
            for s in &entry.sessions {
                connections += 1;
                let depth = s
                    .sent
                    .saturating_sub(s.shared.written.load(Ordering::Relaxed));
                depth_sum += depth;
                depth_max = depth_max.max(depth);
            }
        }
        self.metrics.connections.set(connections);
        self.metrics.users.set(self.users.len() as i64);
        self.metrics.runs_running.set(self.runs.running as i64);
        self.metrics.queue_depth_sum.set(depth_sum as i64);
        self.metrics.queue_depth_max.set(depth_max as i64);
        self.metrics.replay_bytes.set(self.log_bytes.total as i64);
    }
}
