//! The shared event log on Redis (PROTOCOL.md section 10): several nodes that share one
//! Redis serve as one server.
//!
//! Per user, Redis holds a meta hash (epoch, newest seq), a stream of frames (entry id
//! `<seq>-0`, trimmed to a count and bytes per user, TTL), the set of the user's running runs and one record per run;
//! a Lua script per append numbers the event, adds it to the stream and publishes it on the
//! user's channel, so live delivery and replay agree on `seq` ([`scripts`]). Every node
//! subscribes to the channels of the users it has sessions for.
//!
//! [`RedisLink`] is the registry's handle. It runs on an arbiter (thread) of its own:
//! - the *writer* (`writer.rs`) sends this node's appends in order, pipelined, and retries
//!   them while Redis is away (each event of a run has an index, so a retry that had in fact
//!   landed is skipped, never appended twice);
//! - the *listener* (`listener.rs`) reads the subscriptions and never blocks: a frame it
//!   cannot hand over is dropped, and the registry repairs the gap from the stream;
//! - the *heartbeat* (`nodes.rs`) keeps this node alive in the node table and ends the runs of
//!   nodes that lapsed (`node_lost`).
//!
//! What they learn reaches the registry as [`LogNews`]; queries the registry waits on
//! (claims, reads, run records) are plain futures on a shared multiplexed connection.

pub mod forward;
pub mod keys;
mod listener;
mod nodes;
pub mod scripts;
mod writer;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix::prelude::*;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Value;
use tokio::sync::mpsc;

use crate::event::{Draft, Frame, RunStatus};
use crate::ids::{random_id, RunId, UserId};
use crate::metrics::{Metrics, EVENT_TYPES};
use crate::router::{InspectLease, RunView};

use self::keys::UserKeys;

/// How this node uses Redis.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    pub url: String,
    pub node_id: Arc<str>,
    /// This process, among the processes that ever ran under `node_id`: random.
    pub process: Arc<str>,
    /// A node silent for this long is taken for dead and its runs are ended.
    pub node_timeout: Duration,
    /// Frames kept per user (the stream's length): `--replay-capacity`.
    pub log_capacity: usize,
    /// Bytes of frames kept per user in the stream: `--replay-user-max-bytes`.
    pub log_max_bytes: usize,
    /// How long a user's stream lives after its last event: `--replay-ttl-secs`.
    pub log_ttl: Duration,
    /// Longest a run may take (`--run-timeout-secs`): its record outlives it.
    pub run_timeout: Duration,
    /// Events of this node's runs waiting for Redis before runs are failed `unavailable`.
    pub max_pending: usize,
}

impl RedisConfig {
    /// A user's meta hash (epoch, top) outlives the stream, so a user who comes back after
    /// the stream expired keeps the epoch and counts on: a resume gets an honest gap.
    fn meta_ttl(&self) -> Duration {
        (self.log_ttl * 10).max(Duration::from_secs(24 * 3600))
    }

    fn run_ttl(&self) -> Duration {
        self.run_timeout + self.log_ttl + self.node_timeout * 2
    }

    /// How long one command may take before Redis counts as unreachable.
    fn response_timeout(&self) -> Duration {
        (self.node_timeout / 4).clamp(Duration::from_millis(250), Duration::from_secs(2))
    }
}

/// Whether `url` is a Redis URL this client can use.
pub fn check_url(url: &str) -> Result<(), String> {
    redis::Client::open(url)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Why a Redis query failed.
#[derive(Debug)]
pub struct Unavailable(pub String);

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Redis is unavailable: {}", self.0)
    }
}

impl From<redis::RedisError> for Unavailable {
    fn from(e: redis::RedisError) -> Self {
        Unavailable(e.to_string())
    }
}

/// One event of one of this node's runs (or a lost node's), for the writer to append.
#[derive(Debug)]
pub struct AppendJob {
    pub user: UserId,
    pub draft: Draft,
    /// The event's index in its run (1, 2, ...): a retry of an appended one is skipped.
    pub index: u64,
    /// `tool_executing` / `tool_completed`: the call id and tool, for the run record's open
    /// calls.
    pub call: Option<(String, String)>,
    /// `agent_completed`: how it ended.
    pub ended: Option<RunStatus>,
}

/// A run of a lost node that is still open: what it takes to end it.
#[derive(Debug, Clone)]
pub struct Orphan {
    pub user: UserId,
    pub run_id: RunId,
    pub agent: String,
    pub thread_id: Option<Arc<str>>,
    pub started_ms: u64,
    /// The index of the run's last appended event.
    pub index: u64,
    /// Tool calls still open: call id and tool.
    pub open_calls: Vec<(String, String)>,
    /// Tool calls the run made.
    pub tool_calls: u64,
}

/// What the Redis side tells the registry.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub enum LogNews {
    /// A numbered frame of a user: from one of this node's appends, or from a subscription.
    Frame {
        user: UserId,
        epoch: Arc<str>,
        frame: Frame,
    },
    /// This many of this node's appends, of these bytes (their drafts' tails), are done
    /// with (appended, skipped or refused).
    Settled(usize, usize),
    /// Appends of this run were refused: it has been ended elsewhere (its node was taken
    /// for lost).
    RunGone(RunId),
    /// The node now follows the user: subscribed, then read the epoch and newest seq.
    Followed {
        user: UserId,
        epoch: Arc<str>,
        top: u64,
    },
    FollowFailed(UserId),
    /// The subscriptions were lost and are back (or frames were dropped): check every
    /// followed user against the meta hashes.
    Resync,
    /// One of this node's appends for this user had landed before (a retry): its frame is
    /// neither in a reply nor, since a node skips its own, in a subscription; read it back.
    Stale(UserId),
    /// Another node asks this one to cancel a run.
    Cancel(RunId),
    /// Another node forwards a request for one of this node's runs; the reply goes back to
    /// `node` under `token`.
    Forwarded {
        node: String,
        token: u64,
        request: forward::Request,
    },
    /// A lost node's open runs, for this node to end (and then forget the node's `members`,
    /// its run list as read).
    Orphans {
        node: Arc<str>,
        runs: Vec<Orphan>,
        members: Vec<String>,
    },
    /// Whether Redis answers.
    Up(bool),
}

/// A stretch of a user's history read from Redis.
#[derive(Debug)]
pub struct History {
    /// `None`: there is no history (Redis lost it, or never had it).
    pub epoch: Option<Arc<str>>,
    /// The newest seq.
    pub top: u64,
    /// The frames asked for that the stream still holds, in order.
    pub frames: Vec<Frame>,
}

/// Which end of a long stretch of history a read keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadEnd {
    Oldest,
    Newest,
}

/// A user's epoch and newest seq, as the meta hash says.
#[derive(Debug, Clone)]
pub struct Top {
    pub user: UserId,
    pub epoch: Arc<str>,
    pub top: u64,
}

/// What a start-run claim came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    Granted,
    TooMany,
    RateLimited { retry_after_ms: u64 },
}

/// The registry's handle on Redis.
#[derive(Clone)]
pub struct RedisLink {
    config: Arc<RedisConfig>,
    conn: ConnectionManager,
    appends: mpsc::UnboundedSender<writer::Job>,
    follows: mpsc::UnboundedSender<listener::Follow>,
    up: Arc<AtomicBool>,
    /// Requests forwarded to other nodes, waiting for their reply.
    forwarded: Arc<forward::Waiting>,
}

impl RedisLink {
    /// Connects (lazily: a node starts while Redis is away, and serves once it is back) and
    /// starts the writer, listener and heartbeat on an arbiter of their own.
    pub fn start(
        config: RedisConfig,
        news: Recipient<LogNews>,
        metrics: Arc<Metrics>,
    ) -> Result<RedisLink, Unavailable> {
        let client = redis::Client::open(config.url.as_str())?;
        let config = Arc::new(config);
        let timeout = config.response_timeout();
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), manager_config)?;
        let (appends, append_rx) = mpsc::unbounded_channel();
        let (follows, follow_rx) = mpsc::unbounded_channel();
        let up = Arc::new(AtomicBool::new(false));
        let link = RedisLink {
            config: config.clone(),
            conn,
            appends,
            follows,
            up,
            forwarded: Arc::default(),
        };
        let arbiter = Arbiter::new();
        let started = arbiter.spawn(writer::run(link.clone(), append_rx, news.clone(), metrics))
            && arbiter.spawn(listener::run(link.clone(), client, follow_rx, news.clone()))
            && arbiter.spawn(nodes::run(link.clone(), news));
        if !started {
            return Err(Unavailable("the Redis arbiter did not start".into()));
        }
        // The arbiter lives as long as the process: its thread ends with the system.
        std::mem::forget(arbiter);
        Ok(link)
    }

    pub fn node_timeout(&self) -> Duration {
        self.config.node_timeout
    }

    pub fn node_id(&self) -> &Arc<str> {
        &self.config.node_id
    }

    /// Whether Redis answered the latest command.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    fn set_up(&self, up: bool, news: &Recipient<LogNews>) {
        if self.up.swap(up, Ordering::Relaxed) != up {
            if up {
                log::info!("Redis is reachable");
            } else {
                log::warn!("Redis is unreachable");
            }
            news.do_send(LogNews::Up(up));
        }
    }

    /// Queues an append; the result comes back as [`LogNews`].
    pub fn append(&self, job: AppendJob) {
        if self.appends.send(writer::Job::Append(job)).is_err() {
            log::error!("the Redis writer has stopped; an event is lost");
        }
    }

    /// After the appends queued so far: ends a run that never emitted anything (a claim whose
    /// start was never answered) without an event: it leaves the user's running runs.
    pub fn drop_run(&self, user: UserId, run_id: RunId) {
        let _ = self.appends.send(writer::Job::DropRun(user, run_id));
    }

    /// After the appends queued so far: forgets `members` of a lost node's run list and, if
    /// it is not this node, its heartbeat.
    pub fn forget_node(&self, node: Arc<str>, members: Vec<String>) {
        let _ = self.appends.send(writer::Job::ForgetNode(node, members));
    }

    /// Follow a user's appends from now on; answered by `Followed` or `FollowFailed`.
    pub fn follow(&self, user: UserId) {
        let _ = self.follows.send(listener::Follow::Start(user));
    }

    pub fn unfollow(&self, user: UserId) {
        let _ = self.follows.send(listener::Follow::Stop(user));
    }

    /// Claims a run start against the user's cluster-wide limits and records the run; a
    /// published run (`published`: its owner, empty for a webhook agent's) is also indexed by
    /// its id, for batches that reach another node.
    #[allow(clippy::too_many_arguments)]
    pub async fn claim(
        &self,
        user: &UserId,
        run_id: &RunId,
        agent: &str,
        thread_id: Option<&str>,
        max_runs: usize,
        runs_per_minute: u32,
        published: Option<&str>,
    ) -> Result<Claim, Unavailable> {
        let keys = UserKeys::new(user);
        let mut conn = self.conn.clone();
        // On this node's run list first: a claim whose answer is lost (it may have landed) is
        // found there by the node's own check and dropped, instead of counting for ever.
        let member = format!("{user}\n{run_id}");
        let node_runs = keys::node_runs(&self.config.node_id);
        let _: () = redis::cmd("SADD")
            .arg(&node_runs)
            .arg(&member)
            .query_async(&mut conn)
            .await?;
        let reply: Value = scripts::CLAIM
            .key(&keys.running)
            .key(&keys.starts)
            .key(keys.run(run_id))
            .arg(max_runs)
            .arg(runs_per_minute.max(1))
            .arg(run_id.as_ref())
            .arg(self.config.node_id.as_ref())
            .arg(agent)
            .arg(thread_id.unwrap_or(""))
            .arg(user.as_ref())
            .arg(self.config.run_ttl().as_millis() as u64)
            .arg(self.config.process.as_ref())
            .invoke_async(&mut conn)
            .await?;
        let claim = match tag(&reply).as_deref() {
            Some("ok") => Claim::Granted,
            Some("too_many") => Claim::TooMany,
            Some("rate") => Claim::RateLimited {
                retry_after_ms: int_at(&reply, 1).unwrap_or(1000).max(1),
            },
            _ => return Err(Unavailable(format!("unexpected claim reply {reply:?}"))),
        };
        if claim != Claim::Granted {
            let _: Result<(), _> = redis::cmd("SREM")
                .arg(&node_runs)
                .arg(&member)
                .query_async(&mut conn)
                .await;
        } else if let Some(owner) = published {
            // A publisher's batches may reach any node, which must find the run's user, and
            // tell its owner from other publishers before anything else.
            let _: () = redis::cmd("SET")
                .arg(keys::published_run(run_id))
                .arg(format!("{user}\n{owner}"))
                .arg("PX")
                .arg(self.config.run_ttl().as_millis() as u64)
                .query_async(&mut conn)
                .await?;
        }
        Ok(claim)
    }

    /// The user's epoch (made if there is none) and newest seq.
    pub async fn open(&self, user: &UserId) -> Result<(Arc<str>, u64), Unavailable> {
        let keys = UserKeys::new(user);
        let mut conn = self.conn.clone();
        let reply: Value = scripts::OPEN
            .key(&keys.meta)
            .arg(random_id("", 16))
            .arg(self.config.meta_ttl().as_millis() as u64)
            .invoke_async(&mut conn)
            .await?;
        let epoch = string_at(&reply, 0).ok_or_else(|| Unavailable("no epoch".into()))?;
        Ok((epoch.into(), int_at(&reply, 1).unwrap_or(0)))
    }

    /// The user's frames with `from <= seq <= to` that the stream still holds, in pages,
    /// up to about `--replay-user-max-bytes` of them: the oldest, or with `end` `Newest` the
    /// newest. Pages read under another epoch than the first are left out.
    pub async fn read(
        &self,
        user: &UserId,
        from: u64,
        to: u64,
        end: ReadEnd,
    ) -> Result<History, Unavailable> {
        const PAGE: u64 = 500;
        let keys = UserKeys::new(user);
        let mut conn = self.conn.clone();
        let (mut lo, mut hi) = (from.max(1), to);
        let mut pages: Vec<Vec<Frame>> = Vec::new();
        let (mut epoch, mut top, mut bytes) = (None::<Arc<str>>, 0, 0);
        while lo <= hi {
            let reply: Value = scripts::READ
                .key(&keys.meta)
                .key(&keys.log)
                .arg(lo)
                .arg(hi)
                .arg(PAGE)
                .arg(u8::from(end == ReadEnd::Newest))
                .invoke_async(&mut conn)
                .await?;
            let page_epoch = string_at(&reply, 0).map(Arc::<str>::from);
            if pages.is_empty() {
                epoch = page_epoch;
                top = int_at(&reply, 1).unwrap_or(0);
            } else if page_epoch != epoch {
                break;
            }
            let page: Vec<Frame> = match array_at(&reply, 2) {
                Some(entries) => entries.iter().filter_map(stream_entry).collect(),
                None => Vec::new(),
            };
            let (Some(first), Some(last)) = (page.first(), page.last()) else {
                break;
            };
            let (first, last, full) = (first.seq, last.seq, page.len() as u64 == PAGE);
            bytes += page.iter().map(crate::replay::cost).sum::<usize>();
            pages.push(page);
            if !full || bytes >= self.config.log_max_bytes {
                break;
            }
            match end {
                ReadEnd::Oldest => lo = last + 1,
                ReadEnd::Newest => hi = first.saturating_sub(1),
            }
        }
        if end == ReadEnd::Newest {
            pages.reverse();
        }
        let frames = pages.into_iter().flatten().collect();
        Ok(History { epoch, top, frames })
    }

    /// Starts a new history for `user` if its epoch is still `old` (Redis gave a seq out
    /// twice); returns the epoch now.
    pub async fn renew(&self, user: &UserId, old: &str) -> Result<Arc<str>, Unavailable> {
        let keys = UserKeys::new(user);
        let mut conn = self.conn.clone();
        let epoch: String = scripts::RENEW
            .key(&keys.meta)
            .key(&keys.log)
            .arg(old)
            .arg(random_id("", 16))
            .invoke_async(&mut conn)
            .await?;
        Ok(epoch.into())
    }

    /// Every user's epoch and newest seq, as the meta hashes say (a missing one is made).
    pub async fn tops(&self, users: Vec<UserId>) -> Result<Vec<Top>, Unavailable> {
        let mut conn = self.conn.clone();
        let mut tops = Vec::with_capacity(users.len());
        for chunk in users.chunks(256) {
            let mut pipe = redis::pipe();
            for user in chunk {
                pipe.cmd("HMGET")
                    .arg(UserKeys::new(user).meta)
                    .arg("epoch")
                    .arg("top");
            }
            // Followed users' epochs live as long as they are followed, however quiet.
            let meta_ttl = self.config.meta_ttl().as_millis() as u64;
            for user in chunk {
                pipe.cmd("PEXPIRE")
                    .arg(UserKeys::new(user).meta)
                    .arg(meta_ttl)
                    .ignore();
            }
            let replies: Vec<Value> = pipe.query_async(&mut conn).await?;
            for (user, reply) in chunk.iter().zip(replies) {
                match string_at(&reply, 0) {
                    Some(epoch) => tops.push(Top {
                        user: user.clone(),
                        epoch: epoch.into(),
                        top: int_at(&reply, 1).unwrap_or(0),
                    }),
                    // Lost with Redis's data: a new history begins.
                    None => {
                        let (epoch, top) = self.open(user).await?;
                        tops.push(Top {
                            user: user.clone(),
                            epoch,
                            top,
                        });
                    }
                }
            }
        }
        Ok(tops)
    }

    /// Of these runs of this node, those Redis says are no longer this node's (taken over
    /// and ended by another node while this one was cut off).
    pub async fn taken(&self, runs: Vec<(UserId, RunId)>) -> Result<Vec<RunId>, Unavailable> {
        let mut conn = self.conn.clone();
        let mut taken = Vec::new();
        for chunk in runs.chunks(256) {
            let mut pipe = redis::pipe();
            for (user, run_id) in chunk {
                pipe.hget(UserKeys::new(user).run(run_id), "node");
            }
            let owners: Vec<Option<String>> = pipe.query_async(&mut conn).await?;
            for ((_, run_id), owner) in chunk.iter().zip(owners) {
                if owner.is_some_and(|o| *o != *self.config.node_id) {
                    taken.push(run_id.clone());
                }
            }
        }
        Ok(taken)
    }

    /// Asks the node running one of `user`'s runs to cancel it. `Ok(false)`: `user` has no
    /// such run.
    pub async fn cancel(&self, user: &UserId, run_id: &str) -> Result<bool, Unavailable> {
        let keys = UserKeys::new(user);
        let mut conn = self.conn.clone();
        let (owner, node, status): (Option<String>, Option<String>, Option<String>) =
            redis::cmd("HMGET")
                .arg(keys.run(run_id))
                .arg(&["user", "node", "status"])
                .query_async(&mut conn)
                .await?;
        if owner.as_deref() != Some(user.as_ref()) {
            return Ok(false);
        }
        if let (Some(node), Some("running")) = (node, status.as_deref()) {
            let heard: i64 = redis::cmd("PUBLISH")
                .arg(keys::node_control(&node))
                .arg(format!("cancel {run_id}"))
                .query_async(&mut conn)
                .await?;
            if heard == 0 {
                // Its node is not listening (reconnecting, or lost and about to be reaped):
                // the client is told to try again rather than that it worked.
                return Err(Unavailable(format!("node {node} did not hear the cancel")));
            }
        }
        Ok(true)
    }

    /// The running run of `agent` in `user`'s thread, on any node: its id and the `seq` its
    /// events come after. Reads the user's running set (at most `--max-runs-per-user` runs).
    pub async fn thread_run(
        &self,
        user: &UserId,
        thread_id: &str,
        agent: &str,
    ) -> Result<Option<(String, u64)>, Unavailable> {
        let keys = UserKeys::new(user);
        let mut conn = self.conn.clone();
        let running: Vec<String> = redis::cmd("SMEMBERS")
            .arg(&keys.running)
            .query_async(&mut conn)
            .await?;
        for run_id in running {
            let (of_agent, thread, status, first): (
                Option<String>,
                Option<String>,
                Option<String>,
                Option<u64>,
            ) = redis::cmd("HMGET")
                .arg(keys.run(&run_id))
                .arg(&["agent", "thread", "status", "first"])
                .query_async(&mut conn)
                .await?;
            let matches = of_agent.as_deref() == Some(agent)
                && thread.as_deref() == Some(thread_id)
                && status.as_deref() == Some("running");
            if !matches {
                continue;
            }
            let after_seq = match first {
                Some(first) => first.saturating_sub(1),
                // None of its events is numbered yet: each will come after the newest.
                None => redis::cmd("HGET")
                    .arg(&keys.meta)
                    .arg("top")
                    .query_async::<Option<u64>>(&mut conn)
                    .await?
                    .unwrap_or(0),
            };
            return Ok(Some((run_id, after_seq)));
        }
        Ok(None)
    }

    /// One of `user`'s runs as Redis has it: its record, and its events from the stream, as
    /// the view `GET /v1/runs/{id}` sends (counted by `lease`).
    pub async fn inspect(
        &self,
        user: &UserId,
        run_id: &RunId,
        lease: InspectLease,
    ) -> Result<Option<RunView>, Unavailable> {
        let keys = UserKeys::new(user);
        let mut conn = self.conn.clone();
        let record: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(keys.run(run_id))
            .query_async(&mut conn)
            .await?;
        if record.get("user").map(String::as_str) != Some(user.as_ref()) {
            return Ok(None);
        }
        let num = |field: &str| record.get(field).and_then(|v| v.parse::<u64>().ok());
        let (events, truncated) = match (num("first"), num("last")) {
            (Some(first), Some(last)) => {
                let frames = self.read(user, first, last, ReadEnd::Oldest).await?.frames;
                let truncated = frames.first().is_none_or(|f| f.seq > first);
                let events = frames.into_iter().filter(|f| f.run_id == *run_id).collect();
                (events, truncated)
            }
            _ => (Vec::new(), false),
        };
        let status = record.get("status").and_then(|s| parse_status(s));
        Ok(Some(RunView {
            run_id: run_id.clone(),
            agent: record.get("agent").cloned().unwrap_or_default(),
            thread_id: record
                .get("thread")
                .filter(|t| !t.is_empty())
                .map(|t| Arc::from(t.as_str())),
            status,
            started_at: UNIX_EPOCH + Duration::from_millis(num("started").unwrap_or(0)),
            ended_at: num("ended").map(|us| UNIX_EPOCH + Duration::from_micros(us)),
            events,
            truncated,
            lease,
        }))
    }
}

fn parse_status(s: &str) -> Option<RunStatus> {
    Some(match s {
        "succeeded" => RunStatus::Succeeded,
        "failed" => RunStatus::Failed,
        "cancelled" => RunStatus::Cancelled,
        "timed_out" => RunStatus::TimedOut,
        _ => return None,
    })
}

/// The `&'static` name of an event type.
fn kind_named(kind: &str) -> Option<&'static str> {
    EVENT_TYPES.iter().copied().find(|k| *k == kind)
}

fn micros_since_epoch(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// A frame from its stored parts.
fn frame_from(seq: u64, run_id: &str, kind: &str, emitted_us: &str, tail: &str) -> Option<Frame> {
    let kind = kind_named(kind)?;
    let emitted = UNIX_EPOCH + Duration::from_micros(emitted_us.parse().ok()?);
    Some(Frame::assemble(seq, kind, run_id.into(), tail, emitted))
}

/// A published message: `node \n epoch \n seq \n run_id \n kind \n emitted_us \n tail`.
/// Returns the node that appended it too.
fn parse_published(payload: &str) -> Option<(&str, Arc<str>, Frame)> {
    let mut parts = payload.splitn(7, '\n');
    let node = parts.next()?;
    let epoch = parts.next()?;
    let seq = parts.next()?.parse().ok()?;
    let (run_id, kind, emitted, tail) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    Some((
        node,
        epoch.into(),
        frame_from(seq, run_id, kind, emitted, tail)?,
    ))
}

/// A stream entry: `[id "<seq>-0", [field, value, ...]]`.
fn stream_entry(entry: &Value) -> Option<Frame> {
    let id = string_at(entry, 0)?;
    let seq = id.split('-').next()?.parse().ok()?;
    let fields = array_at(entry, 1)?;
    let get = |name: &str| -> Option<String> {
        fields
            .chunks(2)
            .find(|kv| as_string(&kv[0]).as_deref() == Some(name))
            .and_then(|kv| kv.get(1))
            .and_then(as_string)
    };
    let (run_id, kind, emitted, tail) = (get("r")?, get("k")?, get("t")?, get("b")?);
    frame_from(seq, &run_id, &kind, &emitted, &tail)
}

fn as_string(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        _ => None,
    }
}

fn array_at(v: &Value, i: usize) -> Option<&Vec<Value>> {
    match v {
        Value::Array(items) => match items.get(i)? {
            Value::Array(inner) => Some(inner),
            _ => None,
        },
        _ => None,
    }
}

fn string_at(v: &Value, i: usize) -> Option<String> {
    match v {
        Value::Array(items) => as_string(items.get(i)?),
        _ => None,
    }
}

fn int_at(v: &Value, i: usize) -> Option<u64> {
    match v {
        Value::Array(items) => match items.get(i)? {
            Value::Int(n) => u64::try_from(*n).ok(),
            other => as_string(other)?.parse().ok(),
        },
        _ => None,
    }
}

/// The reply's first element, the status word of the scripts.
fn tag(v: &Value) -> Option<String> {
    string_at(v, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{encode, EventData};

    #[test]
    fn a_published_frame_reads_back_as_sent() {
        let at = UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456);
        let data = EventData::AgentThinking {
            text: "line one\nline two".into(),
        };
        let frame = encode(9, &"run_p".into(), Some("th"), at, &data);
        let payload = format!(
            "node-x\nep\n9\nrun_p\nagent_thinking\n{}\n{}",
            micros_since_epoch(at),
            frame.tail()
        );
        let (node, epoch, back) = parse_published(&payload).expect("parses");
        assert_eq!(node, "node-x");
        assert_eq!(&*epoch, "ep");
        assert_eq!(back.seq, 9);
        assert_eq!(back.text, frame.text);
        assert_eq!(back.emitted, at);
        assert!(parse_published("n\nep\n9\nrun_p\nnot_a_type\n1\n{}").is_none());
        assert!(parse_published("n\nep\nx\nrun_p\nagent_thinking\n1\n{}").is_none());
    }
}
