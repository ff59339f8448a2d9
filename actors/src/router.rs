//! The seam between the edges (sessions, agent runs, HTTP routes) and whatever routes and
//! replays events: the messages it answers and [`Router`], the handle that carries them.
//!
//! Sessions and agents only ever hold a `Router` (or an `Emitter` made from one), never the
//! registry's type. The [`ConnectionRegistry`](crate::registry::ConnectionRegistry) answers
//! these messages whether its event log is in the process or on Redis (section 10: the
//! registry's [`EventLog`](crate::registry::event_log::EventLog) is the seam for that), so
//! sessions and agents are the same either way.

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::time::SystemTime;

use actix::prelude::*;
use serde_json::Value;

use crate::event::{EventData, Frame, RunStatus};
use crate::ids::{RunId, UserId};
use crate::replay::Gap;

/// Cuts a connection at the transport (TCP reset). Given by the HTTP layer, used when a
/// slow consumer's grace period runs out: a stalled session cannot close itself.
pub type ResetHandle = Arc<dyn Fn() + Send + Sync>;

/// One run event from an agent or tool, for the registry to sequence and route. Only a run's
/// emitter makes one: the [`Router`] carries none, and an agent's code never sees the
/// registry's address.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Emit {
    pub(crate) user: UserId,
    pub(crate) run_id: RunId,
    /// When it was emitted: the event's `ts`.
    pub(crate) at: SystemTime,
    pub(crate) data: EventData,
}

impl Emit {
    /// For the routing micro-benchmark (`benches/hot_path.rs`), which drives a registry it
    /// made itself. Nothing an agent or tool holds leads to a registry's address.
    #[doc(hidden)]
    pub fn for_bench(user: UserId, run_id: RunId, data: EventData) -> Emit {
        Emit {
            user,
            run_id,
            at: SystemTime::now(),
            data,
        }
    }
}

/// Where a resuming connection says it is.
#[derive(Debug, Clone)]
pub struct ResumeFrom {
    pub after_seq: u64,
    pub epoch: Option<String>,
}

/// State a session shares with the registry.
#[derive(Debug, Default)]
pub struct SessionShared {
    /// Set by the registry when it drops the session; the session then discards what is
    /// still queued for it.
    pub(crate) cut: AtomicBool,
    /// Events the session has written: with the registry's count of events sent, the depth
    /// of its outbound queue.
    pub(crate) written: AtomicU64,
    /// Their bytes: with the registry's count of bytes sent, what its queue holds.
    pub(crate) written_bytes: AtomicU64,
}

impl SessionShared {
    /// A session received `frame` from its mailbox: whether to write it (not once the
    /// session was cut off). Counts it as written and records its delivery latency.
    pub fn take(&self, frame: &Frame, metrics: &crate::metrics::Metrics) -> bool {
        if self.cut.load(std::sync::atomic::Ordering::Relaxed) {
            return false;
        }
        self.written
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.written_bytes.fetch_add(
            frame.text.len() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        if let Ok(latency) = frame.emitted.elapsed() {
            metrics.delivery_latency.observe(latency.as_secs_f64());
        }
        true
    }
}

/// A session joins its user. Answered with what `welcome` needs and, when `resume` is set,
/// the replay; from the moment this is handled the session receives every new event.
#[derive(Message)]
#[rtype(result = "Result<Connected, ConnectRefused>")]
pub struct Connect {
    pub user: UserId,
    /// Server-unique key of the session.
    pub key: u64,
    /// The session's mailbox, stored once: events go through `try_send` on it, so a full
    /// mailbox means a slow consumer.
    pub push: Recipient<Push>,
    pub shared: Arc<SessionShared>,
    pub reset: Option<ResetHandle>,
    pub resume: Option<ResumeFrom>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectRefused {
    /// The user already has `--max-connections-per-user` connections.
    TooManyConnections(usize),
    /// The shared log (Redis) cannot be reached to learn the user's epoch and history.
    Unavailable,
}

#[derive(Debug)]
pub struct Connected {
    pub epoch: Arc<str>,
    pub last_seq: u64,
    /// For a connect-time resume: the replay of `(resume.after_seq, last_seq]` has begun (its
    /// frames and then `Push::Resumed` follow through the mailbox), or why it cannot be.
    pub resume: Option<Result<(), Gap>>,
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct Disconnect {
    pub user: UserId,
    pub key: u64,
}

/// Start a run of `agent` for `user`.
#[derive(Message)]
#[rtype(result = "Result<RunId, StartRefused>")]
pub struct StartRun {
    pub user: UserId,
    pub agent: String,
    pub input: Value,
    pub thread_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum StartRefused {
    UnknownAgent,
    InvalidInput(String),
    TooManyRuns(usize),
    /// The publisher already has `--max-runs-per-publisher` runs running (section 11).
    TooManyPublished(usize),
    /// More than `--runs-per-minute` starts; a token is back after this long.
    RateLimited {
        retry_after_ms: u64,
    },
    ShuttingDown,
    /// The shared log (Redis) is unreachable.
    Unavailable,
}

/// Cancel one of `user`'s runs.
#[derive(Message)]
#[rtype(result = "Result<(), CancelRefused>")]
pub struct CancelRun {
    pub user: UserId,
    pub run_id: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelRefused {
    /// No such run for this user (whether or not another user has it).
    NotFound,
    /// The run is not this node's and the shared log (Redis) is unreachable.
    Unavailable,
}

/// An answer to one of `user`'s run's questions (section 12): the `respond` command and
/// `POST /v1/runs/{run_id}/respond`.
#[derive(Message)]
#[rtype(result = "Result<(), RespondRefused>")]
pub struct Respond {
    pub user: UserId,
    pub run_id: String,
    pub interrupt_id: String,
    pub response: Value,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RespondRefused {
    /// No such run for this user (whether or not another user has it).
    NotFound,
    /// The run asked no question of that id.
    UnknownQuestion,
    /// The question was already settled (`interrupt_resolved`).
    Resolved,
    /// The answer does not fit the question (`invalid_field`); it stays open.
    Invalid(String),
    /// The run is on another node and the shared log (Redis) is unreachable.
    Unavailable,
}

impl RespondRefused {
    /// The error code and message a client is told (the HTTP status follows the code).
    pub fn code_and_message(&self) -> (crate::protocol::ErrorCode, String) {
        use crate::protocol::ErrorCode;
        match self {
            RespondRefused::NotFound => (ErrorCode::RunNotFound, "no such run".into()),
            RespondRefused::UnknownQuestion => (
                ErrorCode::InvalidField,
                "the run asked no question with this interrupt_id".into(),
            ),
            RespondRefused::Resolved => (
                ErrorCode::InterruptResolved,
                "the question was already settled (answered, or expired)".into(),
            ),
            RespondRefused::Invalid(why) => (ErrorCode::InvalidField, why.clone()),
            RespondRefused::Unavailable => (
                ErrorCode::Unavailable,
                "the event store is unreachable; try again later".into(),
            ),
        }
    }
}

/// A publisher starts a run for `user` (section 11): `POST /v1/publish/runs`. Answered once
/// the run exists (and its `agent_started` is on its way), under the user's run limits.
#[derive(Message)]
#[rtype(result = "Result<RunId, StartRefused>")]
pub struct StartPublished {
    /// The publisher token's `sub`: only it may publish to the run.
    pub publisher: String,
    pub user: UserId,
    pub agent: String,
    pub input: Value,
    pub thread_id: Option<String>,
}

/// A batch of a published run's events (`POST /v1/publish/runs/{run_id}/events`).
#[derive(Message)]
#[rtype(result = "Result<BatchAccepted, PublishRefused>")]
pub struct Publish {
    pub publisher: String,
    /// Set when the token is for one run alone (a webhook agent's).
    pub only_run: Option<String>,
    pub run_id: String,
    pub events: Vec<crate::publish::PublishedEvent>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchAccepted {
    /// Events this batch added (a retry adds none).
    pub accepted: usize,
    pub last_n: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublishRefused {
    /// Not a run of this publisher (whether or not it exists).
    NotFound,
    /// The run has ended (or is ending) this way; the batch was not all accepted before.
    Ended(RunStatus),
    /// `n` leaves a hole or repeats (409 `invalid_field`, with the event's index).
    Order { index: usize, message: String },
    /// An event breaks a rule of section 2 (409 `invalid_field`, with its index).
    Rule { index: usize, message: String },
    /// The user's events are held back for a tab catching up, or the shared log is behind:
    /// the publisher retries the batch (429 `rate_limited`; retrying is harmless).
    Busy,
    /// The run is on another node and the shared log (Redis) is unreachable.
    Unavailable,
}

/// A publisher's view of its run: `GET /v1/publish/runs/{run_id}`.
#[derive(Message)]
#[rtype(result = "Result<(RunView, u64), InspectRefused>")]
pub struct InspectPublished {
    pub publisher: String,
    pub only_run: Option<String>,
    pub run_id: String,
}

/// A `resume` command: replay to session `key` the user's events with
/// `after_seq < seq <= upto` (the ones from before it joined), alongside its live events, then
/// `Push::Resumed`. Answered at once with whether the replay could begin.
#[derive(Message)]
#[rtype(result = "Result<(), ResumeRefused>")]
pub struct Resume {
    pub user: UserId,
    pub key: u64,
    pub after_seq: u64,
    pub upto: u64,
    pub epoch: Option<String>,
    pub request_id: Option<Arc<str>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResumeRefused {
    /// The events are no longer (or were never) kept.
    Gap(Gap),
    /// This session's previous `resume` is still replaying.
    InProgress,
    /// The history is on the shared log (Redis), which is unreachable.
    Unavailable,
    /// This many reads of the user's history from the shared log are already on their way.
    Busy(usize),
}

/// Stop: no new runs; running runs get `drain` to finish and are then cancelled; then every
/// session is told to close. Answered once that has happened.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Shutdown {
    pub drain: std::time::Duration,
}

/// One of `user`'s runs as it stands (`GET /v1/runs/{id}`).
#[derive(Message)]
#[rtype(result = "Result<RunView, InspectRefused>")]
pub struct InspectRun {
    pub user: UserId,
    pub run_id: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InspectRefused {
    /// No such run for this user (whether or not another user has it).
    NotFound,
    /// The user already has this many run views being sent.
    Busy(usize),
    /// The run is on the shared log (Redis), which is unreachable.
    Unavailable,
}

#[derive(Debug)]
pub struct RunView {
    pub run_id: RunId,
    pub agent: String,
    pub thread_id: Option<Arc<str>>,
    /// `None` while running.
    pub status: Option<RunStatus>,
    pub started_at: SystemTime,
    pub ended_at: Option<SystemTime>,
    /// The run's events so far, in order, as the user's log still holds them: the same
    /// shared bytes, not a copy.
    pub events: Vec<Frame>,
    /// Older events of the run are no longer kept.
    pub truncated: bool,
    /// Counts this view against the user's views in flight until it is dropped (when its
    /// response has been sent, or its client is gone).
    pub lease: InspectLease,
}

/// A run view being sent; tells the registry when it is done with.
#[derive(Message)]
#[rtype(result = "()")]
pub struct InspectDone {
    pub user: UserId,
}

#[derive(Debug)]
pub struct InspectLease {
    user: UserId,
    done: Option<Recipient<InspectDone>>,
}

impl InspectLease {
    pub(crate) fn new(user: UserId, done: Recipient<InspectDone>) -> Self {
        InspectLease {
            user,
            done: Some(done),
        }
    }
}

impl Drop for InspectLease {
    fn drop(&mut self) {
        if let Some(done) = self.done.take() {
            done.do_send(InspectDone {
                user: self.user.clone(),
            });
        }
    }
}

/// The running run of `user`'s thread, if this node runs it: what `GET
/// /v1/ai-sdk/{agent}/{id}/stream` follows, replayed from its first event.
#[derive(Message)]
#[rtype(result = "Result<Option<ThreadRun>, FindRefused>")]
pub struct FindThreadRun {
    pub user: UserId,
    pub thread_id: String,
    /// Only a run of this agent.
    pub agent: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FindRefused {
    /// The runs are on the shared log (Redis), which is unreachable.
    Unavailable,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThreadRun {
    pub run_id: RunId,
    /// A replay of the user's events after this `seq` begins with the run's first event.
    pub after_seq: u64,
}

/// Brings the gauges in the metrics up to date (before a scrape).
#[derive(Message)]
#[rtype(result = "()")]
pub struct RefreshGauges;

/// What the registry sends a session.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub enum Push {
    Event(Frame),
    /// A replay has been sent in full.
    Resumed(ResumedNote),
    Close(Goodbye),
}

/// The `resumed` frame's fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumedNote {
    pub from_seq: u64,
    pub to_seq: u64,
    pub request_id: Option<Arc<str>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Goodbye {
    SlowConsumer,
    ServerShutdown,
    /// The user's history was lost (Redis lost its data): the epoch changed under an open
    /// connection, which is closed (1012) so that it reconnects and learns of the gap.
    HistoryLost,
}

/// The handle to routing and replay that sessions and HTTP routes hold.
#[derive(Clone)]
pub struct Router {
    pub connect: Recipient<Connect>,
    pub disconnect: Recipient<Disconnect>,
    pub start_run: Recipient<StartRun>,
    pub cancel_run: Recipient<CancelRun>,
    pub respond: Recipient<Respond>,
    pub start_published: Recipient<StartPublished>,
    pub publish: Recipient<Publish>,
    pub inspect_published: Recipient<InspectPublished>,
    pub resume: Recipient<Resume>,
    pub shutdown: Recipient<Shutdown>,
    pub inspect_run: Recipient<InspectRun>,
    pub refresh_gauges: Recipient<RefreshGauges>,
    pub find_thread_run: Recipient<FindThreadRun>,
}

impl Router {
    pub fn new<A>(addr: Addr<A>) -> Self
    where
        A: Actor<Context = Context<A>>
            + Handler<Connect>
            + Handler<Disconnect>
            + Handler<StartRun>
            + Handler<CancelRun>
            + Handler<Respond>
            + Handler<StartPublished>
            + Handler<Publish>
            + Handler<InspectPublished>
            + Handler<Resume>
            + Handler<Emit>
            + Handler<Shutdown>
            + Handler<InspectRun>
            + Handler<RefreshGauges>
            + Handler<FindThreadRun>,
    {
        Router {
            connect: addr.clone().recipient(),
            disconnect: addr.clone().recipient(),
            start_run: addr.clone().recipient(),
            cancel_run: addr.clone().recipient(),
            respond: addr.clone().recipient(),
            start_published: addr.clone().recipient(),
            publish: addr.clone().recipient(),
            inspect_published: addr.clone().recipient(),
            resume: addr.clone().recipient(),
            shutdown: addr.clone().recipient(),
            inspect_run: addr.clone().recipient(),
            refresh_gauges: addr.clone().recipient(),
            find_thread_run: addr.recipient(),
        }
    }
}
