//! `ConnectionRegistry`: the in-process router. The one place that knows which sessions
//! belong to which user, numbers each user's run events (`seq`), checks them against their
//! run's ledger, encodes each once, keeps it in the user's replay log and hands the same bytes
//! to every connection of the owner.
//!
//! Being one actor is what makes the ordering guarantees simple: a session that joins (with
//! or without a resume) is answered and added in one step, so it receives every event after
//! the `last_seq` it was told, exactly once, in order.
//!
//! Memory is bounded by bytes: each user's log by `--replay-user-max-bytes` (and a count),
//! all logs together by `--replay-max-bytes` (idle users' histories go first). Run records
//! hold no events of their own: `GET /v1/runs/{id}` reads them from the user's log. Sessions
//! are fed as `fanout` describes; when appending an event would evict one that a session still
//! catching up needs, the event is *held* (in order, behind any other held event of the user)
//! and the user's [`EmitGate`] closes, so agents wait rather than outrun a reading tab. A tab
//! that stops reading is cut off within `fanout::STALL_LIMIT` and holds no one back after.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use actix::prelude::*;
use serde_json::Value;

use crate::catalog::Catalog;
use crate::emitter::{EmitGate, Emitter};
use crate::event::{encode, ErrorBody, EventData, Frame, RunStatus};
use crate::fanout::{Offer, Pump, SessionLink};
use crate::ids::{new_run_id, random_id, RunId, UserId};
use crate::ledger::RunLedger;
use crate::metrics::Metrics;
use crate::rate::TokenBucket;
use crate::replay::{Change, Gap, ReplayBuffer};
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
/// How often sessions that fell behind are offered the frames they missed.
const CATCH_UP_TICK: Duration = Duration::from_millis(2);
/// Run views (`GET /v1/runs/{id}`) one user may have being sent at once.
const INSPECTS_PER_USER: usize = 4;
/// A run whose actor has stopped is only taken for lost if its `agent_completed` has still
/// not been handled this long after: the actor sends it just before stopping, and a busy
/// mailbox can hold it for a while.
const LOST_RUN_GRACE: Duration = Duration::from_secs(5);

struct UserEntry {
    epoch: Arc<str>,
    /// The newest `seq` in the log (what `welcome.last_seq` says).
    last_seq: u64,
    /// The newest `seq` given out: above `last_seq` while events are held.
    assigned_seq: u64,
    log: ReplayBuffer,
    /// Events sequenced and encoded, waiting for room in the log.
    held: VecDeque<Frame>,
    gate: Arc<EmitGate>,
    sessions: Vec<SessionLink>,
    /// Sessions cut off as slow consumers that have not gone yet: they still count against
    /// the user's connection limit.
    cut: HashSet<u64>,
    running: usize,
    inspecting: usize,
    /// Since when the user has had no session and no running run.
    idle_since: Option<Instant>,
    run_starts: TokenBucket,
}

impl UserEntry {
    fn touch_idle(&mut self, now: Instant) {
        if self.sessions.is_empty() && self.cut.is_empty() && self.running == 0 {
            self.idle_since.get_or_insert(now);
        } else {
            self.idle_since = None;
        }
    }

    fn check_resume(&self, after_seq: u64, upto: u64, epoch: Option<&str>) -> Result<(), Gap> {
        if epoch.is_some_and(|e| e != &*self.epoch) {
            return Err(self.log.gap(self.last_seq));
        }
        self.log.check(after_seq, upto, self.last_seq)
    }

    /// Whether `frame` can be appended without evicting an event a session still needs.
    fn has_room_for(&self, frame: &Frame) -> bool {
        let evict = self.log.evictions_for(frame) as u64;
        if evict == 0 {
            return true;
        }
        let Some(oldest) = self.log.oldest_seq() else {
            return true;
        };
        let needed = self
            .sessions
            .iter()
            .filter_map(SessionLink::needs_from)
            .min();
        needed.is_none_or(|needed| oldest + evict - 1 < needed)
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
    /// Its first and latest `seq`: its events are the frames of this run between them in the
    /// user's log.
    seqs: Option<(u64, u64)>,
    /// Since when its actor has been seen stopped while the run had not ended.
    stopped_since: Option<Instant>,
}

pub struct ConnectionRegistry {
    settings: RegistrySettings,
    metrics: Arc<Metrics>,
    catalog: Arc<Catalog>,
    agents: ArbiterHandle,
    users: HashMap<UserId, UserEntry>,
    runs: HashMap<RunId, RunRecord>,
    running: usize,
    /// Bytes in all users' logs.
    replay_bytes: usize,
    /// Slow consumers in their grace period, by session key.
    cut: HashMap<u64, ResetHandle>,
    /// Users with a session fed from the log, and whether a catch-up is scheduled.
    behind_users: HashSet<UserId>,
    catch_up_scheduled: bool,
    shutting_down: bool,
    /// Set when runs that were cancelled at a stop never reported their end.
    stop_now: bool,
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
            users: HashMap::new(),
            runs: HashMap::new(),
            running: 0,
            replay_bytes: 0,
            cut: HashMap::new(),
            behind_users: Default::default(),
            catch_up_scheduled: false,
            shutting_down: false,
            stop_now: false,
            shutdown_waiters: Vec::new(),
        }
    }

    fn user_entry(&mut self, user: &UserId) -> &mut UserEntry {
        let settings = &self.settings;
        self.users.entry(user.clone()).or_insert_with(|| UserEntry {
            // Random: an epoch tells nothing about how many histories the server holds.
            epoch: random_id("", 16).into(),
            last_seq: 0,
            assigned_seq: 0,
            log: ReplayBuffer::new(
                settings.replay_capacity,
                settings.replay_user_max_bytes,
                settings.replay_ttl,
            ),
            held: VecDeque::new(),
            gate: Arc::default(),
            sessions: Vec::new(),
            cut: HashSet::new(),
            running: 0,
            inspecting: 0,
            idle_since: None,
            run_starts: TokenBucket::new(
                settings.runs_per_minute,
                settings.runs_per_minute as f64 / 60.0,
                Instant::now(),
            ),
        })
    }

    /// Accounts for a change in one user's log.
    fn account(&mut self, change: Change, reason: &str) {
        self.replay_bytes = self.replay_bytes + change.added - change.evicted_bytes;
        if change.evicted > 0 {
            self.metrics
                .replay_evicted
                .with_label_values(&[reason])
                .inc_by(change.evicted as u64);
        }
    }

    /// Sequences and encodes one admitted event of `run_id`, then appends it, or holds it
    /// while appending would evict what a session catching up still needs.
    fn sequence(
        &mut self,
        user: &UserId,
        run_id: &RunId,
        thread_id: Option<&str>,
        at: SystemTime,
        data: &EventData,
        ctx: &mut Context<Self>,
    ) {
        let Some(entry) = self.users.get_mut(user) else {
            log::error!("run {run_id}: event for unknown user {user}");
            return;
        };
        entry.assigned_seq += 1;
        let frame = encode(entry.assigned_seq, run_id, thread_id, at, data);
        self.metrics.emitted(data).inc();
        if let Some(run) = self.runs.get_mut(run_id) {
            let first = run.seqs.map_or(frame.seq, |(first, _)| first);
            run.seqs = Some((first, frame.seq));
        }
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
        let now = Instant::now();
        let Some(entry) = self.users.get_mut(user) else {
            return;
        };
        entry.last_seq = frame.seq;
        let change = entry.log.push(frame.clone(), now);
        let mut delivered = 0;
        let mut fell_behind = false;
        entry
            .sessions
            .retain_mut(|s| match s.offer_live(&frame, now) {
                (Offer::Sent, counted) => {
                    delivered += counted as u64;
                    true
                }
                (Offer::Full, _) => {
                    fell_behind = true;
                    true
                }
                (Offer::Gone, _) => false,
            });
        self.metrics.delivered(frame.kind).inc_by(delivered);
        self.account(change, "user_limit");
        if fell_behind {
            self.behind_users.insert(user.clone());
            self.schedule_catch_up(ctx);
        }
        if self.replay_bytes > self.settings.replay_max_bytes {
            self.enforce_global_budget(user);
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

    /// Over `--replay-max-bytes`: idle users' histories go first, the longest idle first; then
    /// the oldest events of whoever holds the most (sessions that still needed them are cut
    /// off at their next feed and resume with `resume_gap`).
    fn enforce_global_budget(&mut self, appending: &UserId) {
        // Down to 15/16 of the budget, so that a server at its budget does not scan every
        // user at every append.
        let max = self.settings.replay_max_bytes - self.settings.replay_max_bytes / 16;
        let mut idle: Vec<(Instant, UserId)> = self
            .users
            .iter()
            .filter(|(id, e)| *id != appending && !e.log.is_empty())
            .filter_map(|(id, e)| e.idle_since.map(|since| (since, id.clone())))
            .collect();
        idle.sort();
        for (_, id) in idle {
            if self.replay_bytes <= max {
                return;
            }
            if let Some(entry) = self.users.get_mut(&id) {
                let change = entry.log.clear();
                log::info!(
                    "replay budget: forgot {} events of idle user {id}",
                    change.evicted
                );
                self.account(change, "global_bytes");
            }
        }
        while self.replay_bytes > max {
            let Some((_, entry)) = self
                .users
                .iter_mut()
                .filter(|(_, e)| e.log.len() > 1)
                .max_by_key(|(_, e)| e.log.bytes())
            else {
                return;
            };
            let change = entry.log.evict_oldest(1);
            self.account(change, "global_bytes");
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
        let metrics = self.metrics.clone();
        let Some(entry) = self.users.get_mut(user) else {
            return;
        };
        let mut cut = Vec::new();
        let mut kept = Vec::with_capacity(entry.sessions.len());
        for mut s in entry.sessions.drain(..) {
            if !s.has_work() {
                kept.push(s);
                continue;
            }
            match s.pump(&entry.log, entry.last_seq, &metrics) {
                Pump::Done => kept.push(s),
                Pump::Gone => {}
                Pump::FellOut => cut.push(s),
                Pump::Waiting if s.stalled(now) => cut.push(s),
                Pump::Waiting => kept.push(s),
            }
        }
        entry.sessions = kept;
        for s in cut {
            self.cut_off(user, s, ctx);
        }
        self.release_held(user, ctx);
        if let Some(entry) = self.users.get(user) {
            if entry.sessions.iter().any(SessionLink::has_work) {
                self.behind_users.insert(user.clone());
            }
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

    fn cancel_running(&mut self) {
        for run in self.runs.values().filter(|r| r.ended.is_none()) {
            run.actor.do_send(Cancel(CancelReason::Shutdown));
        }
    }

    /// At a stop: every held event is appended (no one is waiting for room any more), every
    /// session gets what it is owed and then close 1001.
    fn close_all_sessions(&mut self) {
        let mut changes = Vec::new();
        for entry in self.users.values_mut() {
            let now = Instant::now();
            while let Some(frame) = entry.held.pop_front() {
                entry.last_seq = frame.seq;
                for s in &mut entry.sessions {
                    s.offer_live(&frame, now);
                }
                changes.push(entry.log.push(frame, now));
            }
            entry.gate.open();
            for s in &mut entry.sessions {
                s.flush_and_close(
                    &entry.log,
                    entry.last_seq,
                    Push::Close(Goodbye::ServerShutdown),
                );
            }
        }
        for change in changes {
            self.account(change, "user_limit");
        }
    }

    fn maybe_finish_shutdown(&mut self) {
        if self.shutting_down
            && (self.running == 0 || self.stop_now)
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
            changes.push((entry.log.prune(now), "age"));
            entry.sessions.retain(SessionLink::connected);
            entry.touch_idle(now);
        }
        self.users.retain(|_, e| {
            let keep = e
                .idle_since
                .is_none_or(|since| now.duration_since(since) < ttl);
            if !keep {
                changes.push((e.log.clear(), "age"));
            }
            keep
        });
        for (change, reason) in changes {
            self.account(change, reason);
        }
        self.runs.retain(|_, r| {
            r.ended
                .is_none_or(|(at, _, _)| now.duration_since(at) < ttl)
        });
        let mut vanished: Vec<(RunId, UserId)> = Vec::new();
        for (id, r) in self.runs.iter_mut() {
            if r.ended.is_some() || r.actor.connected() {
                continue;
            }
            let since = *r.stopped_since.get_or_insert(now);
            if now.duration_since(since) >= LOST_RUN_GRACE {
                vanished.push((id.clone(), r.user.clone()));
            }
        }
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
            self.metrics.events_refused.inc();
            return;
        };
        if run.user != msg.user {
            log::error!(
                "run {}: emitter of user {} does not own it; event dropped",
                msg.run_id,
                msg.user
            );
            self.metrics.events_refused.inc();
            return;
        }
        let closing = match run.ledger.admit(&msg.data, now) {
            Ok(closing) => closing,
            Err(why) => {
                log::debug!("run {}: {} dropped ({why:?})", msg.run_id, msg.data.kind());
                self.metrics.events_refused.inc();
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
        for data in closing.iter().chain(std::iter::once(&msg.data)) {
            self.sequence(
                &msg.user,
                &msg.run_id,
                thread_id.as_deref(),
                msg.at,
                data,
                ctx,
            );
        }
        if let Some(status) = ended {
            self.metrics.run_ended(status.as_str());
            self.running = self.running.saturating_sub(1);
            if let Some(entry) = self.users.get_mut(&msg.user) {
                entry.running = entry.running.saturating_sub(1);
                entry.touch_idle(now);
            }
            log::debug!("run {} of user {} ended", msg.run_id, msg.user);
            self.maybe_finish_shutdown();
        }
    }
}

impl Handler<Connect> for ConnectionRegistry {
    type Result = MessageResult<Connect>;

    fn handle(&mut self, msg: Connect, ctx: &mut Context<Self>) -> Self::Result {
        let now = Instant::now();
        let shutting_down = self.shutting_down;
        let limit = self.settings.max_connections_per_user;
        let metrics = self.metrics.clone();
        let entry = self.user_entry(&msg.user);
        entry.sessions.retain(SessionLink::connected);
        if entry.sessions.len() + entry.cut.len() >= limit {
            entry.touch_idle(now);
            return MessageResult(Err(ConnectRefused::TooManyConnections(limit)));
        }
        let mut link = SessionLink::new(msg.key, msg.push, msg.shared, msg.reset, now);
        let resume = msg.resume.as_ref().map(|r| {
            entry.check_resume(r.after_seq, entry.last_seq, r.epoch.as_deref())?;
            link.start_replay(
                ResumedNote {
                    from_seq: r.after_seq + 1,
                    to_seq: entry.last_seq,
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
                &entry.log,
                entry.last_seq,
                Push::Close(Goodbye::ServerShutdown),
            );
        }
        let catching_up = link.has_work();
        entry.sessions.push(link);
        entry.idle_since = None;
        let connected = Connected {
            epoch: entry.epoch.clone(),
            last_seq: entry.last_seq,
            resume,
        };
        if catching_up {
            self.catch_up_user(&msg.user, now, ctx);
            self.schedule_catch_up(ctx);
        }
        MessageResult(Ok(connected))
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

impl Handler<Resume> for ConnectionRegistry {
    type Result = Result<(), ResumeRefused>;

    fn handle(&mut self, msg: Resume, ctx: &mut Context<Self>) -> Self::Result {
        let now = Instant::now();
        let metrics = self.metrics.clone();
        let entry = self.user_entry(&msg.user);
        if let Err(gap) = entry.check_resume(msg.after_seq, msg.upto, msg.epoch.as_deref()) {
            metrics.resume_gaps.inc();
            return Err(ResumeRefused::Gap(gap));
        }
        let upto = msg.upto.min(entry.last_seq).max(msg.after_seq);
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
        let gate = entry.gate.clone();
        self.running += 1;

        let run_id = new_run_id();
        let emitter = Emitter::new(
            msg.user.clone(),
            run_id.clone(),
            ctx.address().recipient(),
            gate,
        );
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
                seqs: None,
                stopped_since: None,
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

impl Handler<InspectRun> for ConnectionRegistry {
    type Result = Result<RunView, InspectRefused>;

    fn handle(&mut self, msg: InspectRun, ctx: &mut Context<Self>) -> Self::Result {
        let (run_id, run) = self
            .runs
            .get_key_value(msg.run_id.as_str())
            .filter(|(_, run)| run.user == msg.user)
            .ok_or(InspectRefused::NotFound)?;
        let entry = self.users.get_mut(&msg.user);
        let (events, truncated) = match (&entry, run.seqs) {
            (Some(entry), Some((first, last))) => {
                let events: Vec<Frame> = entry
                    .log
                    .between(first, last)
                    .filter(|f| f.run_id == *run_id)
                    .cloned()
                    .collect();
                let kept_from = entry.log.oldest_seq().unwrap_or(u64::MAX);
                (events, kept_from > first)
            }
            (None, Some(_)) => (Vec::new(), true),
            (_, None) => (Vec::new(), false),
        };
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
        self.metrics.runs_running.set(self.running as i64);
        self.metrics.queue_depth_sum.set(depth_sum as i64);
        self.metrics.queue_depth_max.set(depth_max as i64);
        self.metrics.replay_bytes.set(self.replay_bytes as i64);
    }
}
