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

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;

use super::keys::{self, UserKeys};
use super::{scripts, LogNews, Orphan, RedisLink};

pub async fn run(link: RedisLink, news: Recipient<LogNews>) {
    let every = (link.config.node_timeout / 4).max(Duration::from_millis(50));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Since when this node's heartbeats have landed without a break (`None`: the last failed).
    let mut heard_since: Option<Instant> = None;
    loop {
        tick.tick().await;
        let sent = Instant::now();
        match beat(&link).await {
            Ok(lapsed) => {
                link.set_up(true, &news);
                let since = *heard_since.get_or_insert(sent);
                if since.elapsed() < link.config.node_timeout {
                    continue;
                }
                for node in lapsed {
                    if *node != *link.config.node_id {
                        if let Err(e) = reap(&link, &news, node.clone()).await {
                            log::warn!("ending the runs of lost node {node}: {e}");
                        }
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

async fn beat(link: &RedisLink) -> redis::RedisResult<Vec<String>> {
    let mut conn = link.conn.clone();
    scripts::HEARTBEAT
        .key(keys::NODES)
        .arg(link.config.node_id.as_ref())
        .arg(link.config.node_timeout.as_millis() as u64)
        .invoke_async(&mut conn)
        .await
}

/// Ends a lapsed node's runs, if this node is the one to.
async fn reap(link: &RedisLink, news: &Recipient<LogNews>, node: String) -> redis::RedisResult<()> {
    let mut conn = link.conn.clone();
    let taken: Option<String> = redis::cmd("SET")
        .arg(keys::node_reaper(&node))
        .arg(link.config.node_id.as_ref())
        .arg("NX")
        .arg("PX")
        .arg(link.config.node_timeout.as_millis() as u64 * 2)
        .query_async(&mut conn)
        .await?;
    if taken.is_none() {
        return Ok(());
    }
    let members: Vec<String> = redis::cmd("SMEMBERS")
        .arg(keys::node_runs(&node))
        .query_async(&mut conn)
        .await?;
    let mut orphans = Vec::new();
    for member in members {
        let Some((user, run_id)) = member.split_once('\n') else {
            continue;
        };
        let record: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(UserKeys::new(user).run(run_id))
            .query_async(&mut conn)
            .await?;
        if record.get("status").map(String::as_str) != Some("running")
            || record.get("node").map(String::as_str) != Some(node.as_str())
        {
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
    log::warn!(
        "node {node} is lost (silent for over {} ms): ending its {} runs",
        link.config.node_timeout.as_millis(),
        orphans.len()
    );
    // The registry queues the endings, then the forgetting, on the writer: in that order.
    news.do_send(LogNews::Orphans {
        node: node.into(),
        runs: orphans,
    });
    Ok(())
}
