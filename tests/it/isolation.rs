//! Isolation and fan-out (PROTOCOL.md §1, §2): many users with many tabs running at once.
//! No frame of one user reaches another user's connection; every connection of a user
//! receives every event of that user's runs, in the same order, with the same bytes.

use crate::common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::collections::HashSet;
use std::sync::Arc;
use tokio::sync::Barrier;
use tokio_tungstenite::connect_async;
use tokio_tungstenite::tungstenite::Message;

// ---------------------------------------------------------------------------------------------
// A raw tab: keeps each frame's exact text so tabs can be compared byte for byte.
// ---------------------------------------------------------------------------------------------

struct Tab {
    ws: Ws,
    welcome: Value,
}

impl Tab {
    async fn open(url: &str) -> Tab {
        let (ws, _) = tokio::time::timeout(TIMEOUT, connect_async(url))
            .await
            .expect("connect timed out")
            .expect("connect failed");
        let mut tab = Tab {
            ws,
            welcome: Value::Null,
        };
        let (_, w) = tab.next_text().await;
        assert_eq!(w["type"], "welcome", "first frame must be welcome: {w}");
        tab.welcome = w;
        tab
    }

    /// Next text frame (raw, parsed), skipping heartbeats and ping/pong; panics on close or
    /// after 10 s.
    async fn next_text(&mut self) -> (String, Value) {
        loop {
            let m = tokio::time::timeout(TIMEOUT, self.ws.next())
                .await
                .expect("no frame within 10 s")
                .expect("connection ended")
                .expect("read error");
            match m {
                Message::Text(t) => {
                    let raw = t.as_str().to_owned();
                    let v: Value = serde_json::from_str(&raw).expect("text frame is JSON");
                    if v["type"] == "heartbeat" {
                        continue;
                    }
                    return (raw, v);
                }
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
                other => panic!("unexpected message {other:?}"),
            }
        }
    }

    async fn send(&mut self, v: Value) {
        self.ws
            .send(Message::text(v.to_string()))
            .await
            .expect("send");
    }
}

struct TabLog {
    raw: Vec<String>,
    events: Vec<Value>,
    /// (request_id, run_id) in arrival order.
    acks: Vec<(String, String)>,
}

/// Reads until `runs` agent_completed frames have arrived. On the starting tab acks are
/// collected, and each run's ack must arrive before its first event.
async fn read_tab(mut tab: Tab, runs: usize) -> (Tab, TabLog) {
    let mut log = TabLog {
        raw: Vec::new(),
        events: Vec::new(),
        acks: Vec::new(),
    };
    let mut completed = 0;
    while completed < runs {
        let (raw, v) = tab.next_text().await;
        if v["type"] == "ack" {
            assert_keys(&v, &["type", "request_id", "run_id"]);
            let run = v["run_id"].as_str().unwrap().to_string();
            assert!(
                !log.events.iter().any(|e| e["run_id"] == run.as_str()),
                "ack must precede the run's first event on the starting tab"
            );
            log.acks
                .push((v["request_id"].as_str().unwrap().to_string(), run));
            continue;
        }
        assert!(is_event(&v), "unexpected frame during the runs: {v}");
        if v["type"] == "agent_completed" {
            completed += 1;
        }
        log.raw.push(raw);
        log.events.push(v);
    }
    (tab, log)
}

fn steps_for(user: &str, tag: &str) -> Value {
    scripted(json!([
        {"think": format!("thinking for {user}")},
        {"text": format!("{user}-{tag}-1")},
        {"tool":"calculator","args":{"expr":"6*7"}},
        {"sleep_ms": 5},
        {"text": format!("{user}-{tag}-done")}
    ]))
}

/// One user: 3 tabs; tab 0 starts 2 runs; all tabs read until both runs completed.
async fn user_session(
    user: String,
    url: String,
    barrier: Arc<Barrier>,
) -> (String, Vec<String>, Vec<Tab>) {
    let mut tabs = Vec::new();
    for _ in 0..3 {
        tabs.push(Tab::open(&url).await);
    }
    let mut sessions = HashSet::new();
    for t in &tabs {
        let w = &t.welcome;
        assert_keys(
            w,
            &[
                "type",
                "session_id",
                "user_id",
                "epoch",
                "last_seq",
                "protocol",
            ],
        );
        assert_eq!(w["user_id"], user.as_str(), "{w}");
        assert_eq!(w["last_seq"], 0, "{w}");
        assert_eq!(w["protocol"], 1, "{w}");
        assert!(w["session_id"].as_str().unwrap().starts_with("ses_"), "{w}");
        assert!(
            sessions.insert(w["session_id"].as_str().unwrap().to_string()),
            "session ids differ"
        );
        assert_eq!(w["epoch"], tabs[0].welcome["epoch"], "one epoch per user");
    }

    barrier.wait().await;
    let thread = format!("th-{user}");
    for tag in ["a", "b"] {
        tabs[0]
            .send(
                json!({"type":"start_run","agent":"scripted","input":steps_for(&user, tag),
                         "thread_id":thread,"request_id":tag}),
            )
            .await;
    }
    let t2 = tabs.pop().unwrap();
    let t1 = tabs.pop().unwrap();
    let t0 = tabs.pop().unwrap();
    let ((t0, l0), (t1, l1), (t2, l2)) =
        tokio::join!(read_tab(t0, 2), read_tab(t1, 2), read_tab(t2, 2));

    // The acks name this user's two runs.
    assert_eq!(l0.acks.len(), 2, "{user}: one ack per start_run");
    assert!(
        l1.acks.is_empty() && l2.acks.is_empty(),
        "acks go to the requesting tab only"
    );
    let mut by_tag: Vec<(String, String)> = l0.acks.clone();
    by_tag.sort();
    assert_eq!(by_tag[0].0, "a");
    assert_eq!(by_tag[1].0, "b");
    let run_ids: Vec<String> = by_tag.iter().map(|(_, r)| r.clone()).collect();
    assert_ne!(run_ids[0], run_ids[1]);

    for (i, log) in [&l0, &l1, &l2].iter().enumerate() {
        for e in &log.events {
            assert!(
                run_ids.iter().any(|r| e["run_id"] == r.as_str()),
                "{user} tab {i} received an event of a run it did not start: {e}"
            );
        }
        let s = seqs(&log.events);
        assert_eq!(s.first(), Some(&1), "{user} tab {i}: seqs start at 1");
        assert_contiguous(&s);
    }
    assert_eq!(
        l1.raw, l0.raw,
        "{user}: tab 1 must receive exactly tab 0's frames"
    );
    assert_eq!(
        l2.raw, l0.raw,
        "{user}: tab 2 must receive exactly tab 0's frames"
    );

    for ((tag, run), _) in by_tag.iter().zip(0..) {
        let evs: Vec<Value> = l0
            .events
            .iter()
            .filter(|e| e["run_id"] == run.as_str())
            .cloned()
            .collect();
        check_run(&evs, run, Some(&thread));
        assert_eq!(evs[0]["data"]["input"], steps_for(&user, tag));
        let calc: Vec<&Value> = evs
            .iter()
            .filter(|e| e["type"] == "tool_completed")
            .collect();
        assert_eq!(calc.len(), 1);
        assert_eq!(
            calc[0]["data"]["result"]["value"].as_f64(),
            Some(42.0),
            "{}",
            calc[0]
        );
        let done = &evs.last().unwrap()["data"];
        assert_eq!(done["status"], "succeeded", "{done}");
        assert_eq!(done["result"], format!("{user}-{tag}-done"), "{done}");
    }
    (user, run_ids, vec![t0, t1, t2])
}

/// 50 users x 3 tabs, 2 runs per user, all at once: each tab gets only its user's runs
/// (run ids match the acks), all tabs of a user get the same frames byte for byte, seqs are
/// contiguous per tab, every run is complete and well-shaped; afterwards nothing stray arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_users_many_tabs_are_isolated() {
    const USERS: usize = 50;
    let server = start(test_config());
    let barrier = Arc::new(Barrier::new(USERS));
    let mut handles = Vec::new();
    for i in 0..USERS {
        let user = format!("user{i:02}");
        let url = format!("{}?token={}", server.ws_url(), server.token(&user));
        handles.push(tokio::spawn(user_session(user, url, barrier.clone())));
    }
    let mut results = Vec::new();
    for h in handles {
        results.push(h.await.expect("user task panicked"));
    }

    let mut all_runs = HashSet::new();
    for (_, runs, _) in &results {
        for r in runs {
            assert!(
                all_runs.insert(r.clone()),
                "run ids are unique server-wide: {r}"
            );
        }
    }
    assert_eq!(all_runs.len(), USERS * 2);

    // All runs have ended: a ping round trip on every tab must find nothing but its pong.
    let mut checks = Vec::new();
    for (user, _, tabs) in results {
        for (i, mut tab) in tabs.into_iter().enumerate() {
            let user = user.clone();
            checks.push(tokio::spawn(async move {
                tab.send(json!({"type":"ping","request_id":"final"})).await;
                let (_, f) = tab.next_text().await;
                assert_eq!(
                    f,
                    json!({"type":"pong","request_id":"final"}),
                    "{user} tab {i}: stray frame"
                );
                tab
            }));
        }
    }
    let mut tabs = Vec::new();
    for c in checks {
        tabs.push(c.await.expect("final check panicked"));
    }
    drop(tabs);
}
