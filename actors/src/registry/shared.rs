//! The registry on a shared log (Redis, PROTOCOL.md section 10).
//!
//! The registry's job does not change; where its facts come from does. Events of this node's
//! runs go to Redis to be numbered ([`RedisLog`]) and come back, like every other node's, as
//! [`LogNews::Frame`]; each user's [`UserLog`] becomes this node's *window* on the user's
//! history, kept only while the user has sessions here, and fed in `seq` order
//! ([`super::window`]).
//!
//! Starting, cancelling and inspecting runs ask Redis (cluster-wide limits; runs of other
//! nodes); a lost node's runs are ended here when this node is the one to notice.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use actix::prelude::*;
use serde_json::Value;
use tokio::sync::oneshot;

use super::runs::PublisherRef;
use crate::event::{Draft, ErrorBody, EventData, Frame, RunStatus};
use crate::ids::{new_run_id, RunId, UserId};
use crate::publish::{parse_batch, BatchFault};
use crate::redis::forward::{Reply, Request, RunPlace};
use crate::redis::{
    AppendJob, Claim, History, LogNews, Orphan, ReadEnd, RedisConfig, RedisLink, Unavailable,
};
use crate::router::*;
use crate::run::CancelReason;

use super::event_log::{Appended, EventLog, LogBudget, NewEvent, UserLog};
use super::window::Early;
use super::ConnectionRegistry;

/// Reads of one user's history from Redis (resumes older than the window) on their way at
/// once: each holds up to `--replay-user-max-bytes`.
pub const READS_PER_USER: usize = 2;
/// How often every followed user is checked against the meta hashes.
const RESYNC_EVERY: Duration = Duration::from_secs(1);

/// The registry's link to Redis and the appends it has in flight.
pub struct Shared {
    pub link: RedisLink,
    /// This node's appends not yet settled, and their bytes: past `max_pending` events or
    /// `--replay-max-bytes` bytes, runs fail `unavailable`.
    pub pending: usize,
    pub pending_bytes: usize,
    pub max_pending: usize,
    /// Since when Redis has not answered.
    down_since: Option<Instant>,
    pub(super) resyncing: bool,
}

impl Shared {
    /// Over half of what may wait for Redis is waiting: publishers are asked to retry rather
    /// than push this node's runs towards failing `unavailable`.
    pub fn is_congested(&self) -> bool {
        self.pending > self.max_pending / 2 || !self.link.is_up()
    }
}

/// One user's following of the shared log on this node.
#[derive(Default)]
pub struct Following {
    /// Subscribed, and the epoch and newest seq are known.
    pub synced: bool,
    /// A follow was asked for and not answered yet.
    pub asked: bool,
    /// Connects waiting for the follow.
    pub waiting: Vec<(Connect, oneshot::Sender<Result<Connected, ConnectRefused>>)>,
    /// Frames ahead of `last_seq + 1`, waiting for the gap before them to be filled.
    pub early: Early,
    /// A read of the stream to fill a gap is under way.
    pub repairing: bool,
    /// Reads of the user's history from the stream on their way (resumes at connect and by
    /// command): at most [`READS_PER_USER`].
    pub reading: usize,
    /// A new epoch is being started on Redis (seqs were given out again): connects wait.
    pub renewing: bool,
}

/// The shared log as an [`EventLog`]: appends are queued for Redis to number.
pub struct RedisLog(pub RedisLink);

impl EventLog for RedisLog {
    fn open(&mut self, _: &UserId, budget: &LogBudget) -> UserLog {
        // Epoch and newest seq are learnt when the user is followed.
        UserLog::new(Arc::from(""), 0, budget)
    }

    fn append(&mut self, user: &UserId, _: &mut UserLog, event: NewEvent<'_>) -> Appended {
        let draft = Draft::new(event.run_id, event.thread_id, event.at, event.data);
        let bytes = draft.tail.len();
        self.queue(user, draft, event.data, event.index);
        Appended::Queued { bytes }
    }
}

impl RedisLog {
    /// Queues an encoded event for Redis to number.
    fn queue(&self, user: &UserId, draft: Draft, data: &EventData, index: u64) {
        let call = match data {
            EventData::ToolExecuting {
                tool_call_id, tool, ..
            }
            | EventData::ToolCompleted {
                tool_call_id, tool, ..
            } => Some((tool_call_id.clone(), tool.clone())),
            _ => None,
        };
        let ended = match data {
            EventData::AgentCompleted { status, .. } => Some(*status),
            _ => None,
        };
        self.0.append(AppendJob {
            user: user.clone(),
            draft,
            index,
            call,
            ended,
        });
    }
}

type Answer<T> = ResponseActFuture<ConnectionRegistry, T>;

impl ConnectionRegistry {
    /// A registry whose event log is on Redis (`--redis-url`).
    pub fn start_shared(
        settings: super::RegistrySettings,
        metrics: Arc<crate::metrics::Metrics>,
        catalog: Arc<crate::catalog::Catalog>,
        agents: ArbiterHandle,
        config: RedisConfig,
    ) -> Result<Addr<Self>, Unavailable> {
        let ctx = Context::new();
        let max_pending = config.max_pending;
        let link = RedisLink::start(config, ctx.address().recipient(), metrics.clone())?;
        let mut registry = Self::new(settings, metrics, catalog, agents);
        registry.log = Box::new(RedisLog(link.clone()));
        registry.shared = Some(Shared {
            link,
            pending: 0,
            pending_bytes: 0,
            max_pending,
            down_since: None,
            resyncing: false,
        });
        Ok(ctx.run(registry))
    }

    pub(super) fn start_resync_timer(&mut self, ctx: &mut Context<Self>) {
        if self.shared.is_some() {
            ctx.run_interval(RESYNC_EVERY, |act, ctx| act.resync(ctx));
        }
    }

    /// Counts an append of `bytes` handed to Redis; past the bounds, the run fails
    /// `unavailable`.
    pub(super) fn note_pending(&mut self, run_id: &RunId, bytes: usize) {
        let Some(shared) = &mut self.shared else {
            return;
        };
        shared.pending += 1;
        shared.pending_bytes += bytes;
        self.metrics.redis_pending.set(shared.pending as i64);
        if shared.pending > shared.max_pending || shared.pending_bytes > self.budget.max_bytes {
            log::warn!(
                "{} events wait for Redis: run {run_id} fails `unavailable`",
                shared.pending
            );
            self.runs.stop(run_id, CancelReason::Unavailable);
        }
    }

    /// `Connect` on a shared log: the user is followed first (subscribe, then read the epoch
    /// and newest seq), and a resume older than the window is read back from the stream.
    pub(super) fn connect_shared(
        &mut self,
        msg: Connect,
        ctx: &mut Context<Self>,
    ) -> Answer<Result<Connected, ConnectRefused>> {
        let Some(link) = self.shared.as_ref().map(|s| s.link.clone()) else {
            return Box::pin(actix::fut::ready(self.join(msg, ctx)));
        };
        let user = msg.user.clone();
        let entry = self.user_entry(&user);
        entry.idle_since = None;
        if entry.follow.synced && !entry.follow.renewing {
            return self.join_shared(msg, ctx);
        }
        // Not followed yet, or its epoch is being renewed: the connect waits for that.
        let (tx, rx) = oneshot::channel();
        entry.follow.waiting.push((msg, tx));
        if !entry.follow.synced && !entry.follow.asked {
            entry.follow.asked = true;
            link.follow(user);
        }
        Box::pin(
            actix::fut::wrap_future(rx)
                .map(|answer, _, _| answer.unwrap_or(Err(ConnectRefused::Unavailable))),
        )
    }

    pub(super) fn join_shared(
        &mut self,
        msg: Connect,
        ctx: &mut Context<Self>,
    ) -> Answer<Result<Connected, ConnectRefused>> {
        let missing = msg
            .resume
            .as_ref()
            .and_then(|r| self.missing(&msg.user, r.after_seq, u64::MAX, r.epoch.as_deref()));
        let Some((from, to)) = missing else {
            return Box::pin(actix::fut::ready(self.join(msg, ctx)));
        };
        let limit = self.settings.max_connections_per_user;
        let Some(entry) = self.users.get(&msg.user) else {
            return Box::pin(actix::fut::ready(self.join(msg, ctx)));
        };
        // Refused before reading anything for it, not after.
        if entry.sessions.len() + entry.cut.len() >= limit {
            return Box::pin(actix::fut::ready(Err(ConnectRefused::TooManyConnections(
                limit,
            ))));
        }
        let Some(read) = self.read_back(&msg.user, from, to) else {
            // As many reads of this user's history as one user may have are on their way:
            // 1013, try again.
            return Box::pin(actix::fut::ready(Err(ConnectRefused::Unavailable)));
        };
        Box::pin(read.map(move |read, act: &mut Self, ctx| match read {
            Ok(()) => act.join(msg, ctx),
            Err(e) => {
                log::warn!("resume of user {}: {e}", msg.user);
                Err(ConnectRefused::Unavailable)
            }
        }))
    }

    /// `Resume` on a shared log: what the window lacks is read back from the stream first.
    pub(super) fn resume_shared(
        &mut self,
        msg: Resume,
        ctx: &mut Context<Self>,
    ) -> Answer<Result<(), ResumeRefused>> {
        let missing = self.missing(&msg.user, msg.after_seq, msg.upto, msg.epoch.as_deref());
        let Some((from, to)) = missing else {
            return Box::pin(actix::fut::ready(self.resume(msg, ctx)));
        };
        let Some(read) = self.read_back(&msg.user, from, to) else {
            return Box::pin(actix::fut::ready(Err(ResumeRefused::Busy(READS_PER_USER))));
        };
        Box::pin(read.map(move |read, act: &mut Self, ctx| match read {
            Ok(()) => act.resume(msg, ctx),
            Err(e) => {
                log::warn!("resume of user {}: {e}", msg.user);
                Err(ResumeRefused::Unavailable)
            }
        }))
    }

    /// Reads `from..=to` of the user's history back from the stream into the window (up to
    /// the window's bytes), at most [`READS_PER_USER`] at once per user: what one user's
    /// resumes make a node hold is that many histories, however many connections it opens.
    /// `None` when that many are on their way. Meanwhile the user stays followed.
    fn read_back(
        &mut self,
        user: &UserId,
        from: u64,
        to: u64,
    ) -> Option<Answer<Result<(), Unavailable>>> {
        let link = self.shared.as_ref()?.link.clone();
        let entry = self.users.get_mut(user)?;
        if entry.follow.reading >= READS_PER_USER {
            return None;
        }
        entry.follow.reading += 1;
        let user = user.clone();
        Some(Box::pin(
            actix::fut::wrap_future({
                let user = user.clone();
                async move { link.read(&user, from, to, ReadEnd::Newest).await }
            })
            .map(move |read, act: &mut Self, _| {
                if let Some(entry) = act.users.get_mut(&user) {
                    entry.follow.reading -= 1;
                }
                read.map(|read| act.fill(&user, to, read))
            }),
        ))
    }

    /// The seqs a resume from `after_seq` (up to `upto`) needs that the window does not hold.
    fn missing(
        &self,
        user: &UserId,
        after_seq: u64,
        upto: u64,
        epoch: Option<&str>,
    ) -> Option<(u64, u64)> {
        let log = &self.users.get(user)?.log;
        if epoch.is_some_and(|e| e != &*log.epoch) || after_seq >= upto.min(log.last_seq) {
            return None;
        }
        match log.frames.oldest_seq() {
            Some(oldest) if oldest <= after_seq + 1 => None,
            Some(oldest) => Some((after_seq + 1, oldest - 1)),
            None => Some((after_seq + 1, log.last_seq)),
        }
    }

    /// Puts frames read back from the stream in front of the window, if they reach it.
    fn fill(&mut self, user: &UserId, to: u64, History { epoch, frames, .. }: History) {
        let Some(entry) = self.users.get_mut(user) else {
            return;
        };
        if epoch.as_deref() != Some(&*entry.log.epoch) {
            // A new history: the next resync closes this user's sessions.
            return;
        }
        let reach = entry
            .log
            .frames
            .oldest_seq()
            .map_or(entry.log.last_seq, |oldest| oldest - 1);
        let frames: Vec<Frame> = frames
            .into_iter()
            .filter(|f| f.seq <= reach.min(to))
            .collect();
        if frames.last().map(|f| f.seq) != Some(reach) {
            return;
        }
        let change = entry.log.frames.prepend(frames, Instant::now());
        self.log_bytes.account(change, "user_limit", &self.metrics);
    }

    /// `StartRun` on a shared log: the user's limits are claimed on Redis, over every node.
    pub(super) fn claim_shared(
        &mut self,
        msg: StartRun,
        checked: super::CheckedStart,
    ) -> Answer<Result<RunId, StartRefused>> {
        let Some(link) = self.shared.as_ref().map(|s| s.link.clone()) else {
            return Box::pin(actix::fut::ready(Err(StartRefused::Unavailable)));
        };
        let (max_runs, per_minute) = (
            self.settings.max_runs_per_user,
            self.settings.runs_per_minute,
        );
        let run_id = new_run_id();
        let (user, agent, thread_id) = (msg.user.clone(), msg.agent.clone(), msg.thread_id.clone());
        let claim_id = run_id.clone();
        let published = match &checked {
            super::CheckedStart::Published { owner, .. } => {
                Some(owner.as_deref().unwrap_or("").to_string())
            }
            super::CheckedStart::Agent { .. } => None,
        };
        Box::pin(
            actix::fut::wrap_future(async move {
                link.claim(
                    &user,
                    &claim_id,
                    &agent,
                    thread_id.as_deref(),
                    max_runs,
                    per_minute,
                    published.as_deref(),
                )
                .await
            })
            .map(move |claim, act: &mut Self, ctx| match claim {
                Ok(Claim::Granted) => Ok(act.launch(run_id, msg, checked, ctx)),
                Ok(Claim::TooMany) => Err(StartRefused::TooManyRuns(max_runs)),
                Ok(Claim::RateLimited { retry_after_ms }) => {
                    Err(StartRefused::RateLimited { retry_after_ms })
                }
                Err(e) => {
                    log::warn!("run start of user {}: {e}", msg.user);
                    Err(StartRefused::Unavailable)
                }
            }),
        )
    }

    /// `CancelRun` of a run that is not this node's: the owning node is asked through Redis.
    pub(super) fn cancel_shared(&mut self, msg: CancelRun) -> Answer<Result<(), CancelRefused>> {
        let Some(link) = self.shared.as_ref().map(|s| s.link.clone()) else {
            return Box::pin(actix::fut::ready(Err(CancelRefused::NotFound)));
        };
        Box::pin(actix::fut::wrap_future(async move {
            match link.cancel(&msg.user, &msg.run_id).await {
                Ok(true) => Ok(()),
                Ok(false) => Err(CancelRefused::NotFound),
                Err(e) => {
                    log::warn!("cancel of run {}: {e}", msg.run_id);
                    Err(CancelRefused::Unavailable)
                }
            }
        }))
    }

    /// An answer to a question of a run this node does not have: it goes to the run's node,
    /// whose actor settles it (`redis/forward.rs`).
    pub(super) fn respond_shared(&mut self, msg: Respond) -> Answer<Result<(), RespondRefused>> {
        let Some(link) = self.shared.as_ref().map(|s| s.link.clone()) else {
            return Box::pin(actix::fut::ready(Err(RespondRefused::NotFound)));
        };
        Box::pin(actix::fut::wrap_future(async move {
            let node = match link.place(&msg.user, &msg.run_id).await {
                Ok(RunPlace::On(node)) => node,
                // Ended: whatever it asked was settled when it did.
                Ok(RunPlace::Ended { .. }) => return Err(RespondRefused::Resolved),
                Ok(RunPlace::Here | RunPlace::Nowhere) => return Err(RespondRefused::NotFound),
                Err(e) => {
                    log::warn!("answer to a question of run {}: {e}", msg.run_id);
                    return Err(RespondRefused::Unavailable);
                }
            };
            let request = Request::Respond {
                user: msg.user.to_string(),
                run_id: msg.run_id.clone(),
                interrupt_id: msg.interrupt_id,
                response: msg.response,
            };
            match link.ask(&node, &request).await {
                Ok(reply) => reply.into_respond(),
                Err(e) => {
                    log::warn!("answer to a question of run {}: {e}", msg.run_id);
                    Err(RespondRefused::Unavailable)
                }
            }
        }))
    }

    /// A batch of a published run this node does not have: it goes to the run's node (found
    /// through the run's index on Redis), whose ledger decides.
    pub(super) fn publish_shared(
        &mut self,
        msg: Publish,
    ) -> Answer<Result<BatchAccepted, PublishRefused>> {
        let Some(link) = self.shared.as_ref().map(|s| s.link.clone()) else {
            return Box::pin(actix::fut::ready(Err(PublishRefused::NotFound)));
        };
        Box::pin(actix::fut::wrap_future(async move {
            let run_id = msg.run_id.clone();
            let unavailable = |e: crate::redis::Unavailable| {
                log::warn!("a batch of run {run_id}: {e}");
                PublishRefused::Unavailable
            };
            let who = PublisherRef {
                name: &msg.publisher,
                only_run: msg.only_run.as_deref(),
            };
            let Some((_, node, ended)) = link
                .published_place(&msg.run_id, who)
                .await
                .map_err(unavailable)?
            else {
                return Err(PublishRefused::NotFound);
            };
            let events = msg.events.iter().map(|e| e.to_wire()).collect();
            let request = Request::Publish {
                publisher: msg.publisher,
                only_run: msg.only_run,
                run_id: msg.run_id,
                events,
            };
            match (link.ask(&node, &request).await, ended) {
                (Ok(reply), _) => reply.into_publish(),
                // Its node is gone, and what it accepted with it: a retry cannot be told
                // from a new batch any more.
                (Err(_), Some(status)) => Err(PublishRefused::Ended(status)),
                (Err(e), None) => Err(unavailable(e)),
            }
        }))
    }

    /// A publisher's view of a run this node does not have: its node says whether this
    /// publisher may see it, and its `last_n`; the run is read from Redis here.
    pub(super) fn inspect_published_shared(
        &mut self,
        msg: InspectPublished,
    ) -> Answer<Result<(RunView, u64), InspectRefused>> {
        let Some(link) = self.shared.as_ref().map(|s| s.link.clone()) else {
            return Box::pin(actix::fut::ready(Err(InspectRefused::NotFound)));
        };
        let owner = async move {
            let unavailable = |e: crate::redis::Unavailable| {
                log::warn!("a publisher's view of run {}: {e}", msg.run_id);
                InspectRefused::Unavailable
            };
            let who = PublisherRef {
                name: &msg.publisher,
                only_run: msg.only_run.as_deref(),
            };
            let Some((user, node, _)) = link
                .published_place(&msg.run_id, who)
                .await
                .map_err(unavailable)?
            else {
                return Err(InspectRefused::NotFound);
            };
            let request = Request::Owner {
                publisher: msg.publisher,
                only_run: msg.only_run,
                run_id: msg.run_id.clone(),
            };
            match link.ask(&node, &request).await.map_err(unavailable)? {
                Reply::Owner { last_n } => Ok((user, msg.run_id, last_n)),
                _ => Err(InspectRefused::NotFound),
            }
        };
        Box::pin(
            actix::fut::wrap_future(owner).then(|owner, act: &mut Self, ctx| match owner {
                Ok((user, run_id, last_n)) => {
                    let view = act.inspect_shared(InspectRun { user, run_id }, ctx);
                    Box::pin(view.map(move |view, _, _| view.map(|view| (view, last_n))))
                        as Answer<_>
                }
                Err(refused) => Box::pin(actix::fut::ready(Err(refused))),
            }),
        )
    }

    /// A request another node forwarded for one of this node's runs: decided as a local
    /// one, the reply sent back.
    fn serve_forwarded(
        &mut self,
        node: String,
        token: u64,
        request: Request,
        ctx: &mut Context<Self>,
    ) {
        let Some(link) = self.shared.as_ref().map(|s| s.link.clone()) else {
            return;
        };
        let reply: Answer<Reply> = match request {
            Request::Respond {
                user,
                run_id,
                interrupt_id,
                response,
            } => {
                let msg = Respond {
                    user: UserId::from(user.as_str()),
                    run_id,
                    interrupt_id,
                    response,
                };
                // Not this node's (any more): its record on Redis is how the asker found it.
                let verdict = if self.runs.get(&msg.run_id).is_some() {
                    self.respond(msg)
                } else {
                    Box::pin(actix::fut::ready(Err(RespondRefused::Resolved)))
                };
                Box::pin(verdict.map(|result, _, _| Reply::of_respond(&result)))
            }
            Request::Publish {
                publisher,
                only_run,
                run_id,
                events,
            } => {
                let reply = match parse_batch(&serde_json::json!({ "events": events })) {
                    Ok(events) => {
                        let msg = Publish {
                            publisher,
                            only_run,
                            run_id,
                            events,
                        };
                        Reply::of_publish(&self.publish(msg, ctx))
                    }
                    // The asking node read the batch the same way before sending it.
                    Err(BatchFault::Shape { index, message }) => Reply::Rule {
                        index: index.unwrap_or(0),
                        message,
                    },
                    Err(BatchFault::Type { index, message }) => Reply::Rule { index, message },
                };
                Box::pin(actix::fut::ready(reply))
            }
            Request::Owner {
                publisher,
                only_run,
                run_id,
            } => {
                let who = super::runs::PublisherRef {
                    name: &publisher,
                    only_run: only_run.as_deref(),
                };
                let reply = self
                    .runs
                    .get(&run_id)
                    .and_then(|(_, record)| record.publication.as_ref())
                    .filter(|p| p.allows(&run_id, who))
                    .map_or(Reply::NotFound, |p| Reply::Owner { last_n: p.last_n });
                Box::pin(actix::fut::ready(reply))
            }
        };
        ctx.spawn(reply.map(move |reply, _, ctx| {
            ctx.spawn(actix::fut::wrap_future(async move {
                link.reply(&node, token, &reply).await
            }));
        }));
    }

    pub(super) fn inspect_shared(
        &mut self,
        msg: InspectRun,
        ctx: &mut Context<Self>,
    ) -> Answer<Result<RunView, InspectRefused>> {
        let Some(link) = self.shared.as_ref().map(|s| s.link.clone()) else {
            return Box::pin(actix::fut::ready(Err(InspectRefused::NotFound)));
        };
        let entry = self.user_entry(&msg.user);
        if entry.inspecting >= super::INSPECTS_PER_USER {
            return Box::pin(actix::fut::ready(Err(InspectRefused::Busy(
                super::INSPECTS_PER_USER,
            ))));
        }
        entry.inspecting += 1;
        let lease = InspectLease::new(msg.user.clone(), ctx.address().recipient());
        Box::pin(actix::fut::wrap_future(async move {
            let run_id: RunId = msg.run_id.as_str().into();
            match link.inspect(&msg.user, &run_id, lease).await {
                Ok(Some(view)) => Ok(view),
                Ok(None) => Err(InspectRefused::NotFound),
                Err(e) => {
                    log::warn!("run view of {run_id}: {e}");
                    Err(InspectRefused::Unavailable)
                }
            }
        }))
    }

    /// Redis answers again (or stopped): after an absence as long as the node timeout, other
    /// nodes may have taken this node for lost and ended its runs; those are stopped now,
    /// rather than when they next emit something.
    fn redis_up(&mut self, up: bool, ctx: &mut Context<Self>) {
        let Some(shared) = &mut self.shared else {
            return;
        };
        if !up {
            shared.down_since.get_or_insert_with(Instant::now);
            return;
        }
        let Some(since) = shared.down_since.take() else {
            return;
        };
        if since.elapsed() < shared.link.node_timeout() {
            return;
        }
        let link = shared.link.clone();
        let running = self.runs.running();
        ctx.spawn(
            actix::fut::wrap_future(async move { link.taken(running).await }).map(
                |taken, act: &mut Self, _| {
                    for run_id in taken.unwrap_or_default() {
                        log::warn!(
                            "run {run_id}: ended by another node while this one was cut off"
                        );
                        act.runs.stop(&run_id, CancelReason::NodeLost);
                    }
                },
            ),
        );
    }

    /// Ends a lost node's runs: `tool_completed ok:false` for each open call, then
    /// `agent_completed` `failed` `node_lost`.
    fn end_orphans(&mut self, node: Arc<str>, runs: Vec<Orphan>, members: Vec<String>) {
        let Some(link) = self.shared.as_ref().map(|s| s.link.clone()) else {
            return;
        };
        let now = SystemTime::now();
        // For this node's own id: the runs of a previous process, not those running here.
        let runs: Vec<Orphan> = runs
            .into_iter()
            .filter(|o| self.runs.get(&o.run_id).is_none())
            .collect();
        let members: Vec<String> = members
            .into_iter()
            .filter(|m| {
                m.split_once('\n')
                    .is_none_or(|(_, run_id)| self.runs.get(run_id).is_none())
            })
            .collect();
        for orphan in runs {
            if orphan.index == 0 && node == *link.node_id() {
                // This node's, never emitted anything: a claim whose answer was lost, so its
                // start was refused. No events to end; it only leaves the user's running runs.
                log::info!(
                    "run {} of user {}: claimed, never started; dropped",
                    orphan.run_id,
                    orphan.user
                );
                link.drop_run(orphan.user, orphan.run_id);
                continue;
            }
            log::warn!(
                "run {} of user {}: its node {node} is lost; ending it",
                orphan.run_id,
                orphan.user
            );
            let lost = || {
                ErrorBody::new(
                    "node_lost",
                    format!("the node running this run ({node}) was lost"),
                )
            };
            // A run lost before its first event still starts and ends, as every run does.
            let started = (orphan.index == 0).then(|| EventData::AgentStarted {
                agent: orphan.agent.clone(),
                input: Value::Null,
            });
            let mut events: Vec<EventData> = started.into_iter().collect();
            events.extend(orphan.open_calls.iter().map(|(call_id, tool)| {
                EventData::ToolCompleted {
                    tool_call_id: call_id.clone(),
                    tool: tool.clone(),
                    ok: false,
                    result: Value::Null,
                    error: Some(lost()),
                    duration_ms: 0,
                }
            }));
            let started = std::time::UNIX_EPOCH + Duration::from_millis(orphan.started_ms);
            events.push(EventData::AgentCompleted {
                status: RunStatus::Failed,
                result: Value::Null,
                error: Some(lost()),
                duration_ms: now
                    .duration_since(started)
                    .map_or(0, |d| d.as_millis() as u64),
                usage: serde_json::json!({ "tool_calls": orphan.tool_calls }),
            });
            for (k, data) in events.iter().enumerate() {
                let draft = Draft::new(&orphan.run_id, orphan.thread_id.as_deref(), now, data);
                self.metrics.emitted(data).inc();
                self.note_pending(&orphan.run_id, draft.tail.len());
                RedisLog(link.clone()).queue(
                    &orphan.user,
                    draft,
                    data,
                    orphan.index + 1 + k as u64,
                );
            }
            self.metrics.runs_node_lost.inc();
            self.metrics.run_ended(RunStatus::Failed.as_str());
        }
        link.forget_node(node, members);
    }
}

impl Handler<LogNews> for ConnectionRegistry {
    type Result = ();

    fn handle(&mut self, news: LogNews, ctx: &mut Context<Self>) {
        match news {
            LogNews::Frame { user, epoch, frame } => self.ingest(user, epoch, frame, ctx),
            LogNews::Settled(n, bytes) => {
                if let Some(shared) = &mut self.shared {
                    shared.pending = shared.pending.saturating_sub(n);
                    shared.pending_bytes = shared.pending_bytes.saturating_sub(bytes);
                    self.metrics.redis_pending.set(shared.pending as i64);
                }
                self.maybe_finish_shutdown();
            }
            LogNews::RunGone(run_id) => {
                self.runs.stop(&run_id, CancelReason::NodeLost);
            }
            LogNews::Followed { user, epoch, top } => {
                let Some(entry) = self.users.get_mut(&user) else {
                    if let Some(shared) = &self.shared {
                        shared.link.unfollow(user);
                    }
                    return;
                };
                entry.follow.asked = false;
                // A second answer (the user was unfollowed and followed again meanwhile)
                // must not move a window that is already being fed back to `top`.
                if !entry.follow.synced {
                    entry.follow.synced = true;
                    entry.log.epoch = epoch;
                    entry.log.last_seq = top;
                    entry.log.assigned_seq = top;
                }
                let early = entry.follow.early.take();
                let waiting = std::mem::take(&mut entry.follow.waiting);
                for (_, (epoch, frame)) in early {
                    self.ingest(user.clone(), epoch, frame, ctx);
                }
                for (connect, answer) in waiting {
                    let join = self.join_shared(connect, ctx);
                    ctx.spawn(join.map(|result, _, _| {
                        let _ = answer.send(result);
                    }));
                }
            }
            LogNews::FollowFailed(user) => {
                if let Some(entry) = self.users.get_mut(&user) {
                    if !entry.follow.synced {
                        entry.follow.asked = false;
                        entry.follow.early.take();
                        for (_, answer) in entry.follow.waiting.drain(..) {
                            let _ = answer.send(Err(ConnectRefused::Unavailable));
                        }
                        if let Some(shared) = &self.shared {
                            shared.link.unfollow(user);
                        }
                    }
                }
            }
            LogNews::Resync => self.resync(ctx),
            LogNews::Stale(user) => self.repair(&user, ctx),
            LogNews::Cancel(run_id) => {
                self.runs.stop(&run_id, CancelReason::Requested);
            }
            LogNews::Forwarded {
                node,
                token,
                request,
            } => self.serve_forwarded(node, token, request, ctx),
            LogNews::Orphans {
                node,
                runs,
                members,
            } => self.end_orphans(node, runs, members),
            LogNews::Up(up) => {
                self.metrics.redis_up.set(up as i64);
                self.redis_up(up, ctx);
            }
        }
    }
}
