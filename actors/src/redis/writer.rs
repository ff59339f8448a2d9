//! The writer: this node's appends, in order, pipelined, retried until Redis takes them.
//!
//! Order matters within a run (the registry admitted its events in order, and a
//! `tool_completed` must not overtake its `tool_executing`): appends go out in queue order, in
//! batches of up to 256, up to four batches on their way at once on the one connection, whose
//! order Redis keeps. The script takes a run's events only in index order, so whatever goes
//! wrong (Redis away or refusing, a batch that fails while later ones land) ends with the
//! appends not taken sent again, in order, with a growing pause; an append that did land
//! before its answer was lost is skipped (its run's index), so nothing is numbered twice and
//! nothing is dropped. The registry bounds how many wait here.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use futures_util::stream::{FuturesOrdered, StreamExt};
use redis::Value;
use tokio::sync::mpsc;

use super::keys::{self, UserKeys};
use super::scripts;
use super::{micros_since_epoch, string_at, tag, AppendJob, LogNews, RedisLink};
use crate::ids::{RunId, UserId};
use crate::metrics::Metrics;

/// Appends sent in one round trip.
const BATCH: usize = 256;
/// Batches on their way at once.
const DEPTH: usize = 4;

pub enum Job {
    Append(AppendJob),
    /// A lost node's runs have all been ended: forget them and its heartbeat.
    ForgetNode(Arc<str>, Vec<String>),
    /// A run that never emitted an event: ended without one.
    DropRun(UserId, RunId),
}

pub async fn run(
    link: RedisLink,
    mut jobs: mpsc::UnboundedReceiver<Job>,
    news: Recipient<LogNews>,
    metrics: Arc<Metrics>,
) {
    // Loaded up front, so that the first appends do not all meet NOSCRIPT.
    load_scripts(&link).await;
    // Batches sent and not yet answered, oldest first: Redis works on one while the next is
    // on its way, instead of the two taking turns.
    let mut in_flight = FuturesOrdered::new();
    // Appends to send again, in order, before anything new (Redis away or refusing, or an
    // append that came before its run's previous one).
    let mut again: Vec<Job> = Vec::new();
    let mut pause = Duration::from_millis(50);
    loop {
        if !again.is_empty() {
            if in_flight.is_empty() {
                in_flight.push_back(send(link.clone(), std::mem::take(&mut again)));
            }
        } else {
            while in_flight.len() < DEPTH {
                let mut batch = Vec::with_capacity(BATCH);
                if in_flight.is_empty() {
                    let Some(job) = jobs.recv().await else {
                        return;
                    };
                    batch.push(job);
                }
                while batch.len() < BATCH {
                    match jobs.try_recv() {
                        Ok(job) => batch.push(job),
                        Err(_) => break,
                    }
                }
                if batch.is_empty() {
                    break;
                }
                in_flight.push_back(send(link.clone(), batch));
            }
        }
        let Some((mut batch, answer)) = in_flight.next().await else {
            continue;
        };
        if taken(&link, &news, &metrics, &mut batch, answer).await {
            pause = Duration::from_millis(50);
            continue;
        }
        // Nothing is ever dropped here: what was not taken is sent again until Redis takes
        // it, whether Redis is away or refusing (LOADING after a restart, READONLY or
        // MASTERDOWN during a failover, OOM, BUSY). Runs wait meanwhile, and fail
        // `unavailable` past the registry's bound; a retry of an append that had landed is
        // skipped by the script. The batches sent after this one are answered first, and
        // what they could not place goes after it, in order.
        again.append(&mut batch);
        while let Some((mut later, answer)) = in_flight.next().await {
            taken(&link, &news, &metrics, &mut later, answer).await;
            again.append(&mut later);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}

/// Settles a batch's answer: true if all of it was taken; else what is left in `batch` is
/// to be sent again.
async fn taken(
    link: &RedisLink,
    news: &Recipient<LogNews>,
    metrics: &Metrics,
    batch: &mut Vec<Job>,
    answer: redis::RedisResult<Vec<Value>>,
) -> bool {
    match answer {
        Ok(replies) => {
            link.set_up(true, news);
            if settle(news, metrics, batch, replies) {
                return true;
            }
            log::warn!(
                "Redis: {} appends out of order; sending them again",
                batch.len()
            );
        }
        Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
            log::info!("Redis does not have the scripts (restarted?): loading them");
            load_scripts(link).await;
        }
        Err(e) => {
            if unreachable(&e) {
                log::warn!("Redis: {} appends wait ({e})", batch.len());
            } else {
                log::error!("Redis refuses {} appends ({e}); retrying", batch.len());
            }
            link.set_up(false, news);
        }
    }
    false
}

/// Redis is away (as opposed to refusing the command).
fn unreachable(e: &redis::RedisError) -> bool {
    e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal()
}

pub async fn load_scripts(link: &RedisLink) {
    let mut conn = link.conn.clone();
    for script in scripts::all() {
        if let Err(e) = script.prepare_invoke().load_async(&mut conn).await {
            log::warn!("Redis: loading a script failed: {e}");
        }
    }
}

/// Sends a batch as one pipeline; gives the batch back with the answer.
async fn send(link: RedisLink, batch: Vec<Job>) -> (Vec<Job>, redis::RedisResult<Vec<Value>>) {
    let answer = query(&link, &batch).await;
    (batch, answer)
}

async fn query(link: &RedisLink, batch: &[Job]) -> redis::RedisResult<Vec<Value>> {
    let config = &link.config;
    let mut pipe = redis::pipe();
    for job in batch {
        match job {
            Job::Append(a) => {
                let keys = UserKeys::new(&a.user);
                let (call_id, tool) = a
                    .call
                    .as_ref()
                    .map_or(("", ""), |(c, t)| (c.as_str(), t.as_str()));
                pipe.cmd("EVALSHA")
                    .arg(scripts::APPEND.get_hash())
                    .arg(4)
                    .arg(&keys.meta)
                    .arg(&keys.log)
                    .arg(&keys.running)
                    .arg(keys.run(&a.draft.run_id))
                    .arg(crate::ids::random_id("", 16))
                    .arg(a.draft.run_id.as_ref())
                    .arg(a.draft.kind)
                    .arg(micros_since_epoch(a.draft.emitted))
                    .arg(&a.draft.tail)
                    .arg(config.log_capacity)
                    .arg(config.log_ttl.as_millis() as u64)
                    .arg(config.meta_ttl().as_millis() as u64)
                    .arg(a.index)
                    .arg(call_id)
                    .arg(tool)
                    .arg(a.ended.map_or("", |s| s.as_str()))
                    .arg(&keys.channel)
                    .arg(config.node_id.as_ref())
                    .arg(config.run_ttl().as_millis() as u64)
                    .arg(a.user.as_ref())
                    .arg(config.log_max_bytes)
                    .arg(config.process.as_ref());
                if a.ended.is_some() {
                    pipe.cmd("SREM")
                        .arg(keys::node_runs(&config.node_id))
                        .arg(format!("{}\n{}", a.user, a.draft.run_id))
                        .ignore();
                }
            }
            Job::DropRun(user, run_id) => {
                let keys = UserKeys::new(user);
                pipe.cmd("HSET")
                    .arg(keys.run(run_id))
                    .arg("status")
                    .arg("failed")
                    .ignore();
                pipe.cmd("SREM")
                    .arg(&keys.running)
                    .arg(run_id.as_ref())
                    .ignore();
            }
            Job::ForgetNode(node, members) => {
                if !members.is_empty() {
                    pipe.cmd("SREM")
                        .arg(keys::node_runs(node))
                        .arg(members)
                        .ignore();
                }
                if **node != *config.node_id {
                    pipe.cmd("ZREM")
                        .arg(keys::NODES)
                        .arg(node.as_ref())
                        .ignore();
                }
            }
        }
    }
    if pipe.cmd_iter().next().is_none() {
        // Nothing to send (forgetting no runs of this node itself): Redis would refuse an
        // empty pipeline, and this batch would be retried for ever.
        return Ok(Vec::new());
    }
    let mut conn = link.conn.clone();
    pipe.query_async(&mut conn).await
}

/// Tells the registry what became of each append of a batch, in order, and takes them out
/// of it. Stops at an append refused as `early` (its run's previous event has not landed):
/// false, and what is left in `batch` is to be sent again.
fn settle(
    news: &Recipient<LogNews>,
    metrics: &Metrics,
    batch: &mut Vec<Job>,
    replies: Vec<Value>,
) -> bool {
    let mut replies = replies.into_iter();
    let mut settled = 0;
    let mut bytes = 0;
    let mut done = 0;
    let mut complete = true;
    for job in batch.iter() {
        let Job::Append(a) = job else {
            done += 1;
            continue;
        };
        let Some(reply) = replies.next() else {
            log::error!("Redis: a pipeline answered fewer appends than it was sent");
            complete = false;
            break;
        };
        match tag(&reply).as_deref() {
            Some("early") => {
                complete = false;
                break;
            }
            Some("ok") => match (string_at(&reply, 1), super::int_at(&reply, 2)) {
                (Some(epoch), Some(seq)) => news.do_send(LogNews::Frame {
                    user: a.user.clone(),
                    epoch: epoch.into(),
                    frame: a.draft.number(seq),
                }),
                _ => log::error!("Redis: unexpected append reply {reply:?}"),
            },
            // Landed before, its answer lost: the frame is read back from the stream.
            Some("dup") => {
                metrics.redis_retried.inc();
                news.do_send(LogNews::Stale(a.user.clone()));
            }
            Some("ended") => {
                log::info!(
                    "run {}: ended by another node; its {} is dropped",
                    a.draft.run_id,
                    a.draft.kind
                );
                news.do_send(LogNews::RunGone(a.draft.run_id.clone()));
            }
            _ => log::error!("Redis: unexpected append reply {reply:?}"),
        }
        settled += 1;
        bytes += a.draft.tail.len();
        done += 1;
    }
    batch.drain(..done);
    if settled > 0 {
        news.do_send(LogNews::Settled(settled, bytes));
    }
    complete && batch.is_empty()
}
