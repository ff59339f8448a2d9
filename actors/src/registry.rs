//! `ConnectionRegistry`: the in-process router. The one place that knows which sessions
//! belong to which user, numbers each user's run events (`seq`), checks them against their
//! run's ledger, encodes each once, keeps it for replay and hands the same bytes to every
//! connection of the owner.
//!
//! Being one actor is what makes the ordering guarantees simple: a session that joins (with
//! or without a resume) is answered and added in one step, so it receives every event after
//! the `last_seq` it was told, exactly once, in order. Delivery to a session is a `try_send`
//! on the one `Recipient` the session registered, never a wait: a session whose mailbox is
//! full is fed what it missed from the replay buffer as it makes room, and one that makes no
//! progress at all is not reading and is dropped (close 4008, then a TCP reset after the
//! grace period), without slowing anyone else.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use actix::prelude::*;
use serde_json::Value;

use crate::catalog::Catalog;
use crate::emitter::Emitter;
use crate::event::{encode, ErrorBody, EventData, Frame, RunStatus};
use crate::ids::{new_run_id, random_id, RunId, UserId};
use crate::ledger::RunLedger;
use crate::metrics::Metrics;
use crate::rate::TokenBucket;
use crate::replay::{Gap, ReplayBuffer};
use crate::router::*;
use crate::run::{AgentRunActor, Cancel, CancelReason};

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
            slow_consumer_grace: Duration::from_secs(5),
            shutdown_wait: Duration::from_secs(10),
            runs_per_minute: 120,
            max_connections_per_user: 32,
        }
    }
}

/// Events waiting in the registry's mailbox before emitters have to wait.
const MAILBOX: usize = 4096;

struct SessionLink {
    key: u64,
    push: Recipient<Push>,
    shared: Arc<SessionShared>,
    reset: Option<ResetHandle>,
    /// Events sent to it.
    sent: u64,
    /// Set while its mailbox is full: it then gets no live events but catches up from the
    /// replay buffer, in order, as it makes room.
    behind: Option<Behind>,
}

/// A session whose outbound queue filled up.
struct Behind {
    /// The next `seq` it needs.
    next_seq: u64,
    /// Its `written` count when last seen, and since when that has not moved.
    written: u64,
    stalled_since: Instant,
}

/// What became of a frame offered to a session.
enum Offer {
    Sent,
    Full,
    Gone,
}

impl SessionLink {
    fn offer(&mut self, frame: &Frame) -> Offer {
        match self.push.try_send(Push::Event(frame.clone())) {
            Ok(()) => {
                self.sent += 1;
                Offer::Sent
            }
            Err(SendError::Full(_)) => Offer::Full,
            Err(SendError::Closed(_)) => Offer::Gone,
        }
    }
}

/// How often sessions that fell behind are offered the frames they missed.
const CATCH_UP_TICK: Duration = Duration::from_millis(2);
/// A session that fell behind and writes nothing for this long is not reading.
const STALL_LIMIT: Duration = Duration::from_secs(1);

struct UserEntry {
    epoch: Arc<str>,
    last_seq: u64,
    replay: ReplayBuffer,
    sessions: Vec<SessionLink>,
    running: usize,
    /// Since when the user has had no session and no running run.
    idle_since: Option<Instant>,
    run_starts: TokenBucket,
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
    agent: String,
    thread_id: Option<Arc<str>>,
    actor: Addr<AgentRunActor>,
    ledger: RunLedger,
    started_at: SystemTime,
    /// When and how it ended.
    ended: Option<(Instant, SystemTime, RunStatus)>,
    /// Its events, for `GET /v1/runs/{id}`: at most `replay_capacity`, the newest.
    events: std::collections::VecDeque<crate::event::Frame>,
    truncated: bool,
}

pub struct ConnectionRegistry {
    settings: RegistrySettings,
    metrics: Arc<Metrics>,
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
    /// Users with a session that fell behind, and whether a catch-up is scheduled.
    behind_users: std::collections::HashSet<UserId>,
    catch_up_scheduled: bool,
    shutting_down: bool,
    shutdown_waiters: Vec<tokio::sync::oneshot::Sender<()>>,
}

impl ConnectionRegistry {
    /// `agents` is the arbiter agent runs are started on.
    pub fn new(
        settings: RegistrySettings,
        metrics: Arc<Metrics>,
        catalog: Arc<Catalog>,
        agents: ArbiterHandle,
    ) -> Self {
        ConnectionRegistry {
            settings,
            metrics,
            catalog,
            agents,
            boot: random_id("", 10),
            generation: 0,
            users: HashMap::new(),
            runs: HashMap::new(),
            running: 0,
            cut: HashMap::new(),
            behind_users: Default::default(),
            catch_up_scheduled: false,
            shutting_down: false,
            shutdown_waiters: Vec::new(),
        }
    }

    fn user_entry(&mut self, user: &UserId) -> &mut UserEntry {
        let (settings, boot, generation) = (&self.settings, &self.boot, &mut self.generation);
        self.users.entry(user.clone()).or_insert_with(|| {
            *generation += 1;
            UserEntry {
                epoch: format!("{boot}-{generation}").into(),
                last_seq: 0,
                replay: ReplayBuffer::new(settings.replay_capacity, settings.replay_ttl),
                sessions: Vec::new(),
                running: 0,
                idle_since: None,
                run_starts: TokenBucket::new(
                    settings.runs_per_minute,
                    settings.runs_per_minute as f64 / 60.0,
                    Instant::now(),
                ),
            }
        })
    }

    /// Sequences, encodes, keeps and routes one event of `run_id`; returns the frame.
    fn deliver(
        &mut self,
        user: &UserId,
        run_id: &str,
        thread_id: Option<&str>,
        at: SystemTime,
        data: &EventData,
        ctx: &mut Context<Self>,
    ) -> Option<Frame> {
        let now = Instant::now();
        let Some(entry) = self.users.get_mut(user) else {
            log::error!("run {run_id}: event for unknown user {user}");
            return None;
        };
        entry.last_seq += 1;
        let frame = encode(entry.last_seq, run_id, thread_id, at, data);
        entry.replay.push(frame.clone(), now);
        self.metrics.emitted(data).inc();
        let mut delivered = 0;
        let mut fell_behind = false;
        entry.sessions.retain_mut(|s| {
            if s.behind.is_some() {
                // Catching up from the replay buffer; a live frame now would jump the queue.
                return true;
            }
            match s.offer(&frame) {
                Offer::Sent => {
                    delivered += 1;
                    true
                }
                Offer::Full => {
                    let written = s.shared.written.load(Ordering::Relaxed);
                    s.behind = Some(Behind {
                        next_seq: frame.seq,
                        written,
                        stalled_since: now,
                    });
                    fell_behind = true;
                    true
                }
                Offer::Gone => false,
            }
        });
        self.metrics.delivered(frame.kind).inc_by(delivered);
        if fell_behind {
            self.behind_users.insert(user.clone());
            self.schedule_catch_up(ctx);
        }
        Some(frame)
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

    /// Offers sessions that fell behind the frames they missed, from the replay buffer. One
    /// that wrote nothing for `STALL_LIMIT`, or fell out of the buffer, is not reading: it is
    /// cut off.
    fn catch_up(&mut self, ctx: &mut Context<Self>) {
        let now = Instant::now();
        let mut cut = Vec::new();
        for user in std::mem::take(&mut self.behind_users) {
            let Some(entry) = self.users.get_mut(&user) else {
                continue;
            };
            let mut still_behind = false;
            let mut kept = Vec::with_capacity(entry.sessions.len());
            for mut s in entry.sessions.drain(..) {
                let Some(mut behind) = s.behind.take() else {
                    kept.push(s);
                    continue;
                };
                let written = s.shared.written.load(Ordering::Relaxed);
                if written != behind.written {
                    behind.written = written;
                    behind.stalled_since = now;
                }
                let mut gone = false;
                while behind.next_seq <= entry.last_seq {
                    let Some(frame) = entry.replay.get(behind.next_seq) else {
                        break;
                    };
                    match s.offer(frame) {
                        Offer::Sent => {
                            self.metrics.delivered(frame.kind).inc();
                            behind.next_seq += 1;
                        }
                        Offer::Full => break,
                        Offer::Gone => {
                            gone = true;
                            break;
                        }
                    }
                }
                if gone {
                    continue;
                }
                if behind.next_seq > entry.last_seq {
                    kept.push(s);
                } else if entry.replay.get(behind.next_seq).is_none()
                    || now.duration_since(behind.stalled_since) > STALL_LIMIT
                {
                    cut.push((user.clone(), s));
                } else {
                    s.behind = Some(behind);
                    still_behind = true;
                    kept.push(s);
                }
            }
            entry.sessions = kept;
            if still_behind {
                self.behind_users.insert(user);
            }
        }
        for (user, s) in cut {
            self.cut_off(&user, s, ctx);
        }
        if !self.behind_users.is_empty() {
            self.schedule_catch_up(ctx);
        }
    }

    /// Drops a session that is not reading: it discards what is still queued for it, gets
    /// close 4008 when it reads again, and is reset if it has not gone after the grace period.
    fn cut_off(&mut self, user: &UserId, s: SessionLink, ctx: &mut Context<Self>) {
        let key = s.key;
        log::warn!("user {user}: session {key} is not reading; dropped as a slow consumer");
        self.metrics.slow_consumers.inc();
        s.shared.cut.store(true, Ordering::Relaxed);
        s.push.do_send(Push::Close(Goodbye::SlowConsumer));
        if let Some(reset) = s.reset {
            self.cut.insert(key, reset);
            ctx.run_later(self.settings.slow_consumer_grace, move |act, _| {
                if let Some(reset) = act.cut.remove(&key) {
                    log::info!("session {key}: slow consumer still connected after the grace period; resetting");
                    reset();
                }
            });
        }
    }

    fn cancel_running(&mut self) {
        for run in self.runs.values().filter(|r| r.ended.is_none()) {
            run.actor.do_send(Cancel(CancelReason::Shutdown));
        }
    }

    fn close_all_sessions(&mut self) {
        for entry in self.users.values_mut() {
            for s in &mut entry.sessions {
                // A session that fell behind gets the rest first: nothing is lost at a stop.
                if let Some(behind) = s.behind.take() {
                    for seq in behind.next_seq..=entry.last_seq {
                        if let Some(frame) = entry.replay.get(seq) {
                            s.push.do_send(Push::Event(frame.clone()));
                        }
                    }
                }
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
        self.runs.retain(|_, r| {
            r.ended
                .is_none_or(|(at, _, _)| now.duration_since(at) < ttl)
        });
        let vanished: Vec<(RunId, UserId)> = self
            .runs
            .iter()
            .filter(|(_, r)| r.ended.is_none() && !r.actor.connected())
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
        let ended = match &msg.data {
            EventData::AgentCompleted { status, .. } => Some(*status),
            _ => None,
        };
        if let Some(status) = ended {
            run.ended = Some((now, msg.at, status));
        }
        if let EventData::AgentStarted { .. } = msg.data {
            // The run's start is its first event, not when the registry got round to noting it.
            run.started_at = msg.at;
        }
        let thread_id = run.thread_id.clone();
        let capacity = self.settings.replay_capacity;
        for data in closing.iter().chain(std::iter::once(&msg.data)) {
            let delivered = self.deliver(
                &msg.user,
                &msg.run_id,
                thread_id.as_deref(),
                msg.at,
                data,
                ctx,
            );
            if let (Some(frame), Some(run)) = (delivered, self.runs.get_mut(&msg.run_id)) {
                if run.events.len() == capacity {
                    run.events.pop_front();
                    run.truncated = true;
                }
                run.events.push_back(frame);
            }
        }
        if let Some(status) = ended {
            self.metrics.run_ended(status.as_str());
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
        let limit = self.settings.max_connections_per_user;
        let metrics = self.metrics.clone();
        let entry = self.user_entry(&msg.user);
        entry.sessions.retain(|s| s.push.connected());
        if entry.sessions.len() >= limit {
            entry.touch_idle(Instant::now());
            return MessageResult(Err(ConnectRefused::TooManyConnections(limit)));
        }
        let replay = msg
            .resume
            .as_ref()
            .map(|r| entry.replay(r.after_seq, entry.last_seq, r.epoch.as_deref()));
        match &replay {
            Some(Ok(_)) => metrics.resume_replayed.inc(),
            Some(Err(_)) => metrics.resume_gaps.inc(),
            None => {}
        }
        if shutting_down {
            msg.push.do_send(Push::Close(Goodbye::ServerShutdown));
        }
        entry.sessions.push(SessionLink {
            key: msg.key,
            push: msg.push,
            shared: msg.shared,
            reset: msg.reset,
            sent: 0,
            behind: None,
        });
        entry.idle_since = None;
        MessageResult(Ok(Connected {
            epoch: entry.epoch.clone(),
            last_seq: entry.last_seq,
            replay,
        }))
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
        let replay = entry.replay(msg.after_seq, msg.upto, msg.epoch.as_deref());
        entry.touch_idle(Instant::now());
        match &replay {
            Ok(_) => self.metrics.resume_replayed.inc(),
            Err(_) => self.metrics.resume_gaps.inc(),
        }
        MessageResult(replay)
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
            entry.touch_idle(Instant::now());
            return MessageResult(Err(StartRefused::TooManyRuns(limit)));
        }
        if let Err(wait) = entry.run_starts.take(Instant::now()) {
            entry.touch_idle(Instant::now());
            return MessageResult(Err(StartRefused::RateLimited {
                retry_after_ms: wait.as_millis() as u64 + 1,
            }));
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
        log::debug!("run {run_id} of user {}: started ({})", msg.user, msg.agent);
        self.metrics.runs_started.inc();
        self.runs.insert(
            run_id.clone(),
            RunRecord {
                user: msg.user,
                agent: msg.agent,
                thread_id: msg.thread_id.map(Arc::from),
                actor,
                ledger: RunLedger::default(),
                started_at: SystemTime::now(),
                ended: None,
                events: Default::default(),
                truncated: false,
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
                if run.ended.is_none() {
                    log::debug!(
                        "run {} of user {}: cancelled by its user",
                        msg.run_id,
                        msg.user
                    );
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

    fn handle(&mut self, msg: Shutdown, ctx: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.shutdown_waiters.push(tx);
        if !self.shutting_down {
            self.shutting_down = true;
            log::info!(
                "draining: {} runs running, {} s for them to finish",
                self.running,
                msg.drain.as_secs_f64()
            );
            ctx.run_later(msg.drain, |act, ctx| {
                if act.running > 0 {
                    log::info!("drain time is up: cancelling {} runs", act.running);
                    act.cancel_running();
                }
                // Runs whose end never arrives must not hold the server up forever.
                ctx.run_later(act.settings.shutdown_wait, |act, _| {
                    if !act.shutdown_waiters.is_empty() {
                        log::warn!("stopping: {} runs did not report their end", act.running);
                        act.running = 0;
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

impl Handler<InspectRun> for ConnectionRegistry {
    type Result = Option<RunView>;

    fn handle(&mut self, msg: InspectRun, _: &mut Context<Self>) -> Self::Result {
        let (run_id, run) = self.runs.get_key_value(msg.run_id.as_str())?;
        if run.user != msg.user {
            return None;
        }
        Some(RunView {
            run_id: run_id.clone(),
            agent: run.agent.clone(),
            thread_id: run.thread_id.clone(),
            status: run.ended.map(|(_, _, status)| status),
            started_at: run.started_at,
            ended_at: run.ended.map(|(_, at, _)| at),
            events: run.events.iter().cloned().collect(),
            truncated: run.truncated,
        })
    }
}

impl Handler<RefreshGauges> for ConnectionRegistry {
    type Result = ();

    fn handle(&mut self, _: RefreshGauges, _: &mut Context<Self>) {
        let (mut connections, mut depth_sum, mut depth_max) = (0, 0, 0);
        for entry in self.users.values() {
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
        self.metrics.runs_running.set(self.running as i64);
        self.metrics.queue_depth_sum.set(depth_sum as i64);
        self.metrics.queue_depth_max.set(depth_max as i64);
    }
}
