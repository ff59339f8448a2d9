//! Node liveness: every node writes a heartbeat to the node table (Redis's clock, so nodes'
//! clocks need not agree) four times per node timeout, and learns in the same round trip
//! which nodes have been silent for longer. One surviving node (whoever takes the lost node's
//! reaper key) reads the lost node's open runs and hands them to its registry, which ends
//! each with `tool_completed ok:false` for every open call and `agent_completed` `failed`
//! `node_lost`; then the lost node is forgotten.
//!
//! A node only judges others after it has itself been heard by Redis without a break for a
//! whole node timeout: after Redis was away from *every* node (a long pause, a restart),
//! all heartbeats are old at once, and the first node back must not take the others, alive
//! and beating again within a quarter timeout, for lost.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;

use super::keys::{self, UserKeys};
use super::{scripts, LogNews, Orphan, RedisLink};

/// How often a node looks for runs under its id that it does not run.
const OWN_RUNS_EVERY: Duration = Duration::from_secs(60);
/// A run under this node's id younger than this may be one it is starting right now.
const OWN_RUNS_LEAST_AGE: Duration = Duration::from_secs(30);

pub async fn run(link: RedisLink, news: Recipient<LogNews>) {
    let every = (link.config.node_timeout / 4).max(Duration::from_millis(50));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Since when this node's heartbeats have landed without a break (`None`: the last failed).
    let mut heard_since: Option<Instant> = None;
    // Runs of this node's id it does not run: a previous process's under this id (a restart
    // under a stable id is never seen to lapse), or claims whose answer was lost. Checked when
    // Redis first answers, then now and then.
    let mut own_checked: Option<Instant> = None;
    // Reaps under way, one task each, so that a long one never delays this node's beats.
    let reaping: Arc<std::sync::Mutex<HashSet<String>>> = Arc::default();
    loop {
        tick.tick().await;
        let sent = Instant::now();
        match beat(&link).await {
            Ok(lapsed) => {
                link.set_up(true, &news);
                if own_checked.is_none_or(|at| at.elapsed() >= OWN_RUNS_EVERY) {
                    own_checked = Some(Instant::now());
                    let node = link.config.node_id.to_string();
                    spawn_reap(&link, &news, &reaping, node);
                }
                let since = *heard_since.get_or_insert(sent);
                if since.elapsed() < link.config.node_timeout {
                    continue;
                }
                for node in lapsed {
                    if *node != *link.config.node_id {
                        spawn_reap(&link, &news, &reaping, node);
                    }
                }
            }
            Err(e) => {
                log::debug!("Redis heartbeat failed: {e}");
                heard_since = None;
                link.set_up(false, &news);
            }
        }
    }
}

fn spawn_reap(
    link: &RedisLink,
    news: &Recipient<LogNews>,
    reaping: &Arc<std::sync::Mutex<HashSet<String>>>,
    node: String,
) {
    let fresh = reaping
        .lock()
        .map(|mut r| r.insert(node.clone()))
        .unwrap_or(false);
    if !fresh {
        return;
    }
    let (link, news, reaping) = (link.clone(), news.clone(), reaping.clone());
    actix::spawn(async move {
        if let Err(e) = reap(&link, &news, node.clone()).await {
            log::warn!("ending the runs of lost node {node}: {e}");
        }
        if let Ok(mut r) = reaping.lock() {
            r.remove(&node);
        }
    });
}

async fn beat(link: &RedisLink) -> redis::RedisResult<Vec<String>> {
    let mut conn = link.conn.clone();
    scripts::HEARTBEAT
        .key(keys::NODES)
        .arg(link.config.node_id.as_ref())
        .arg(link.config.node_timeout.as_millis() as u64)
        .invoke_async(&mut conn)
        .await
}

/// Ends a lapsed node's runs, if this node is the one to (for its own id: the runs of a
/// previous process under that id; the registry leaves out any it runs itself).
async fn reap(link: &RedisLink, news: &Recipient<LogNews>, node: String) -> redis::RedisResult<()> {
    let mut conn = link.conn.clone();
    let me = link.config.node_id.as_ref();
    // This node's own list holds the runs it is starting: those of another process under
    // this id go at once; this process's own only once older than any start can take (the
    // registry leaves out those it runs: what is left are claims whose answer was lost).
    let least_age = if node == me {
        OWN_RUNS_LEAST_AGE
    } else {
        Duration::ZERO
    };
    if node != me {
        let taken: Option<String> = redis::cmd("SET")
            .arg(keys::node_reaper(&node))
            .arg(me)
            .arg("NX")
            .arg("PX")
            .arg(link.config.node_timeout.as_millis() as u64 * 2)
            .query_async(&mut conn)
            .await?;
        if taken.is_none() {
            return Ok(());
        }
    }
    let members: Vec<String> = redis::cmd("SMEMBERS")
        .arg(keys::node_runs(&node))
        .query_async(&mut conn)
        .await?;
    let mut orphans = Vec::new();
    for member in &members {
        let Some((user, run_id)) = member.split_once('\n') else {
            continue;
        };
        let record: HashMap<String, String> = scripts::TAKE
            .key(UserKeys::new(user).run(run_id))
            .arg(node.as_str())
            .arg(me)
            .arg(link.config.meta_ttl().as_millis() as u64)
            .arg(link.config.process.as_ref())
            .arg(least_age.as_millis() as u64)
            .invoke_async(&mut conn)
            .await?;
        if record.is_empty() {
            continue;
        }
        let num = |f: &str| record.get(f).and_then(|v| v.parse::<u64>().ok());
        let mut open_calls: Vec<(String, String)> = record
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix("open:")?.to_string(), v.clone())))
            .collect();
        open_calls.sort();
        orphans.push(Orphan {
            user: user.into(),
            run_id: run_id.into(),
            agent: record.get("agent").cloned().unwrap_or_default(),
            thread_id: record
                .get("thread")
                .filter(|t| !t.is_empty())
                .map(|t| Arc::from(t.as_str())),
            started_ms: num("started").unwrap_or(0),
            index: num("n").unwrap_or(0),
            open_calls,
            tool_calls: num("calls").unwrap_or(0),
        });
    }
    if node != me || !orphans.is_empty() {
        log::warn!(
            "node {node} is lost (silent for over {} ms, or this node's previous process): \
             ending its {} runs",
            link.config.node_timeout.as_millis(),
            orphans.len()
        );
    }
    // The registry queues the endings, then the forgetting, on the writer: in that order.
    news.do_send(LogNews::Orphans {
        node: node.into(),
        runs: orphans,
        members,
    });
    Ok(())
}
