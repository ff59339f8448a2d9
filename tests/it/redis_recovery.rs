//! How nodes on one Redis get over what goes wrong with it and with them (PROTOCOL.md §10),
//! beyond `scale_out.rs`: a node restarted under its id ends the runs its previous process
//! left, appends Redis refuses (rather than fails to answer) wait and are never lost, and a
//! Redis that lost its newest events but kept the epoch is caught, never a silent gap.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::*;
use tokio_tungstenite::tungstenite::Message;

/// Reads frames (heartbeats aside) until one of `run` of type `ty`; panics after TIMEOUT.
async fn until_event(c: &mut Client, run: &str, ty: &str) -> Value {
    c.next_matching(ty, |f| f["run_id"] == run && f["type"] == ty)
        .await
}

/// A scripted run in a long tool call.
fn long_run() -> Value {
    scripted(json!([
        {"think": "about to wait"},
        {"tool": "sleep", "args": {"ms": 60000}},
        {"text": "never"}
    ]))
}

/// The next frame off the socket (heartbeats and kept-back frames aside), or the close code
/// when the connection ends (`None`: without a close frame).
async fn frame_or_close(c: &mut Client) -> Result<Value, Option<u16>> {
    loop {
        match c.next_message().await {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(t.as_str()).expect("JSON");
                if v["type"] != "heartbeat" {
                    return Ok(v);
                }
            }
            Some(Ok(Message::Close(f))) => return Err(f.map(|f| u16::from(f.code))),
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return Err(None),
        }
    }
}

async fn metric(node: &Node, name: &str) -> f64 {
    let res = node.http("GET", "/metrics", None, &Value::Null).await;
    res.body
        .lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} is not in /metrics"))
}

/// `kill -9` of a node and a new process under the same `--node-id` at once: the old one
/// never looks lost to the others (its id beats again), so the new process ends the runs it
/// left, `node_lost`, well within the node timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_under_its_id_ends_the_runs_it_left() {
    let redis = RedisServer::start();
    // A long node timeout: node B must not be the one that ends the runs.
    let mut a = Node::spawn_child(&redis.url(), "node-a", &["--node-timeout-ms", "20000"]).await;
    let b = Node::spawn_child(&redis.url(), "node-b", &["--node-timeout-ms", "20000"]).await;
    let mut tab = b.connect("alice").await;
    let mut starter = a.connect("alice").await;
    let run = starter.start_run("scripted", long_run()).await;
    let executing = until_event(&mut tab, &run, "tool_executing").await;

    a.kill9().await;
    let restarted = Instant::now();
    let _a2 = Node::spawn_child(&redis.url(), "node-a", &["--node-timeout-ms", "20000"]).await;
    let completed = until_event(&mut tab, &run, "tool_completed").await;
    let ended = until_event(&mut tab, &run, "agent_completed").await;
    let took = restarted.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "the restarted node ended its old run after {took:?}; the node timeout is 20 s"
    );
    assert_eq!(
        completed["data"]["tool_call_id"],
        executing["data"]["tool_call_id"]
    );
    assert_eq!(completed["data"]["ok"], false, "{completed}");
    assert_eq!(
        completed["data"]["error"]["code"], "node_lost",
        "{completed}"
    );
    assert_eq!(ended["data"]["status"], "failed", "{ended}");
    assert_eq!(ended["data"]["error"]["code"], "node_lost", "{ended}");
    assert_eq!(
        ended["seq"].as_u64(),
        completed["seq"].as_u64().map(|s| s + 1),
        "{completed} then {ended}"
    );
}

/// Redis refusing writes (out of memory under `noeviction`) is not Redis being away, but it
/// is no reason to drop events either: they wait, and arrive, all of them, in order, once
/// Redis takes writes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_redis_refuses_wait_and_are_never_lost() {
    let redis = RedisServer::start();
    let node = Node::spawn_child(&redis.url(), "node-a", &[]).await;
    let mut tab = node.connect("alice").await;
    let steps: Vec<Value> = (0..30)
        .flat_map(|i| [json!({"text": format!("t{i}")}), json!({"sleep_ms": 30})])
        .collect();
    let run = tab.start_run("scripted", json!({ "steps": steps })).await;
    until_event(&mut tab, &run, "agent_started").await;

    redis
        .command(&["CONFIG", "SET", "maxmemory-policy", "noeviction"])
        .expect("CONFIG SET");
    redis
        .command(&["CONFIG", "SET", "maxmemory", "1"])
        .expect("CONFIG SET");
    let deadline = Instant::now() + TIMEOUT;
    while metric(&node, "agentcast_redis_pending_events").await < 3.0 {
        assert!(
            Instant::now() < deadline,
            "no events waited while Redis refused writes"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    redis
        .command(&["CONFIG", "SET", "maxmemory", "0"])
        .expect("CONFIG SET");

    let events = tab.collect_run(&run).await;
    let texts: Vec<&str> = events
        .iter()
        .filter(|e| e["type"] == "partial_result")
        .filter_map(|e| e["data"]["text"].as_str())
        .collect();
    let expected: Vec<String> = (0..30).map(|i| format!("t{i}")).collect();
    assert_eq!(texts, expected, "every text, once, in order");
    let seqs: Vec<u64> = events.iter().filter_map(|e| e["seq"].as_u64()).collect();
    let first = seqs[0];
    assert_eq!(
        seqs,
        (first..first + seqs.len() as u64).collect::<Vec<_>>(),
        "contiguous"
    );
    assert_eq!(
        events.last().map(|e| e["data"]["status"].clone()),
        Some(json!("succeeded"))
    );
    // And the refusals cost the history nothing: the stream holds every event.
    let len = redis.command(&["XLEN", "{u:alice}:log"]).expect("XLEN");
    assert_eq!(
        len.trim().parse::<u64>().ok(),
        seqs.last().copied(),
        "the user's stream after Redis refused writes"
    );
}

/// Redis loses its newest events and keeps the epoch (a restart from an old snapshot, a
/// failover to a lagging replica): the next events would reuse seqs clients already have.
/// The nodes notice, the user gets a new epoch, every open tab is closed 1012 (or told
/// `resume_gap`) before any reused seq reaches it, and a resume with the old epoch gets
/// `resume_gap`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_that_lost_its_newest_events_under_the_same_epoch_gets_a_new_epoch() {
    let redis = RedisServer::start();
    let nodes = spawn_child_nodes(&redis, 2, &[]).await;
    let mut ta = nodes[0].connect("alice").await;
    let mut tb = nodes[1].connect("alice").await;
    let epoch = ta.welcome()["epoch"].as_str().expect("epoch").to_string();
    let first = ta
        .start_run("scripted", scripted(json!([{"text": "a"}, {"text": "b"}])))
        .await;
    let seen_a = ta.collect_run(&first).await;
    let seen_b = tb.collect_run(&first).await;
    assert_eq!(seen_a, seen_b);
    let last = seen_a.last().and_then(|e| e["seq"].as_u64()).expect("seq");

    // Redis "forgets" all but the first event, under the same epoch.
    redis.command(&["DEL", "{u:alice}:log"]).expect("DEL");
    redis
        .command(&["HSET", "{u:alice}:meta", "top", "1"])
        .expect("HSET");

    let mut starter = nodes[0].connect("alice").await;
    let second = starter
        .start_run("scripted", scripted(json!([{"text": "c"}, {"text": "d"}])))
        .await;
    for (name, tab) in [("A", &mut ta), ("B", &mut tb)] {
        loop {
            match frame_or_close(tab).await {
                Ok(frame) => {
                    if frame["type"] == "error" {
                        assert_eq!(frame["code"], "resume_gap", "{name}: {frame}");
                        break;
                    }
                    if let Some(seq) = frame["seq"].as_u64() {
                        assert!(
                            seq > last,
                            "{name}: seq {seq} given out again reached the tab: {frame}"
                        );
                    }
                    assert_ne!(frame["run_id"], second, "{name}: {frame} before the 1012");
                }
                Err(code) => {
                    assert_eq!(code, Some(1012), "{name}: closed, but not 1012");
                    break;
                }
            }
        }
    }
    // A reconnecting client learns of it.
    let query = format!("after_seq={last}&epoch={}", percent_encode(&epoch));
    let mut back = nodes[1].connect_query("alice", &query).await;
    assert_ne!(back.welcome()["epoch"], json!(epoch), "a new epoch");
    let gap = back.next_of_type("error").await;
    assert_eq!(gap["code"], "resume_gap", "{gap}");
}
