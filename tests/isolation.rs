//! Isolation and fan-out (PROTOCOL.md §1, §2): many users with many tabs running at once.
//! No frame of one user reaches another user's connection; every connection of a user
//! receives every event of that user's runs, in the same order, with the same bytes.

#![allow(dead_code)]

#[allow(dead_code)]
mod common;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::Barrier;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{connect_async, MaybeTlsStream, WebSocketStream};

// ---------------------------------------------------------------------------------------------
// Local helpers (shape checks per PROTOCOL.md §2 and docs/protocol-notes.md)
// ---------------------------------------------------------------------------------------------

fn sorted_keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v
        .as_object()
        .unwrap_or_else(|| panic!("expected a JSON object, got {v}"))
        .keys()
        .cloned()
        .collect();
    k.sort();
    k
}

fn assert_keys(v: &Value, expected: &[&str]) {
    let mut e: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
    e.sort();
    assert_eq!(sorted_keys(v), e, "exact keys of {v}");
}

fn is_run_id(s: &str) -> bool {
    s.len() == 26 && s.starts_with("run_") && s[4..].bytes().all(|b| b.is_ascii_alphanumeric())
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = (if y >= 0 { y } else { y - 399 }) / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Parses `YYYY-MM-DDTHH:MM:SS.ffffffZ` (RFC 3339, UTC, exactly 6 fractional digits) into
/// microseconds since the Unix epoch; panics on any other form.
fn ts_micros(ts: &str) -> i64 {
    let b = ts.as_bytes();
    assert_eq!(
        b.len(),
        27,
        "ts {ts:?} must look like 2026-11-22T01:02:03.456789Z"
    );
    for (i, c) in b.iter().enumerate() {
        let ok = match i {
            4 | 7 => *c == b'-',
            10 => *c == b'T',
            13 | 16 => *c == b':',
            19 => *c == b'.',
            26 => *c == b'Z',
            _ => c.is_ascii_digit(),
        };
        assert!(ok, "ts {ts:?}: unexpected character at index {i}");
    }
    let n = |a: usize, z: usize| ts[a..z].parse::<i64>().unwrap();
    let (y, mo, d, h, mi, s, us) = (
        n(0, 4),
        n(5, 7),
        n(8, 10),
        n(11, 13),
        n(14, 16),
        n(17, 19),
        n(20, 26),
    );
    assert!(
        (1..=12).contains(&mo) && (1..=31).contains(&d) && h < 24 && mi < 60 && s < 61,
        "ts {ts:?} is not a valid date-time"
    );
    (days_from_civil(y, mo, d) * 86_400 + h * 3_600 + mi * 60 + s) * 1_000_000 + us
}

fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
}

fn assert_error_obj(e: &Value) {
    assert_keys(e, &["code", "message"]);
    assert!(e["code"].is_string(), "error.code must be a string: {e}");
    assert!(
        e["message"].is_string(),
        "error.message must be a string: {e}"
    );
}

/// The envelope and the `data` shape of one run event, per type.
fn check_event(ev: &Value) {
    assert_keys(ev, &["type", "seq", "run_id", "thread_id", "ts", "data"]);
    let seq = ev["seq"]
        .as_u64()
        .unwrap_or_else(|| panic!("seq must be an integer: {ev}"));
    assert!(seq >= 1, "seq starts at 1: {ev}");
    assert!(
        is_run_id(ev["run_id"].as_str().unwrap_or("")),
        "run_id must be run_ + 22 base62: {ev}"
    );
    assert!(
        ev["thread_id"].is_null() || ev["thread_id"].is_string(),
        "thread_id: {ev}"
    );
    let ts = ts_micros(
        ev["ts"]
            .as_str()
            .unwrap_or_else(|| panic!("ts must be a string: {ev}")),
    );
    assert!(
        (ts - now_micros()).abs() < 300_000_000,
        "ts far from now: {ev}"
    );
    let d = &ev["data"];
    match ev["type"].as_str().unwrap() {
        "agent_started" => {
            assert_keys(d, &["agent", "input"]);
            assert!(d["agent"].is_string(), "{ev}");
        }
        "agent_thinking" | "partial_result" => {
            assert_keys(d, &["text"]);
            assert!(d["text"].is_string(), "{ev}");
        }
        "tool_executing" => {
            assert_keys(d, &["tool_call_id", "tool", "args"]);
            assert!(
                d["tool_call_id"].is_string() && d["tool"].is_string(),
                "{ev}"
            );
        }
        "tool_progress" => {
            assert_keys(d, &["tool_call_id", "tool", "message", "fraction"]);
            assert!(
                d["tool_call_id"].is_string() && d["tool"].is_string(),
                "{ev}"
            );
            assert!(d["message"].is_string(), "tool_progress.message: {ev}");
            let f = &d["fraction"];
            assert!(
                f.is_null() || f.as_f64().is_some_and(|x| (0.0..=1.0).contains(&x)),
                "fraction must be 0..1 or null: {ev}"
            );
        }
        "tool_completed" => {
            assert_keys(
                d,
                &[
                    "tool_call_id",
                    "tool",
                    "ok",
                    "result",
                    "error",
                    "duration_ms",
                ],
            );
            assert!(
                d["tool_call_id"].is_string() && d["tool"].is_string(),
                "{ev}"
            );
            let ok = d["ok"]
                .as_bool()
                .unwrap_or_else(|| panic!("ok must be a bool: {ev}"));
            if ok {
                assert!(d["error"].is_null(), "error must be null when ok: {ev}");
            } else {
                assert_error_obj(&d["error"]);
            }
            assert!(
                d["duration_ms"].as_u64().is_some(),
                "duration_ms must be a whole number: {ev}"
            );
        }
        "agent_completed" => {
            assert_keys(d, &["status", "result", "error", "duration_ms", "usage"]);
            let st = d["status"].as_str().unwrap_or("");
            assert!(
                ["succeeded", "failed", "cancelled", "timed_out"].contains(&st),
                "status: {ev}"
            );
            if st == "succeeded" {
                assert!(d["error"].is_null(), "error must be null on success: {ev}");
            } else {
                assert_error_obj(&d["error"]);
            }
            assert!(
                d["duration_ms"].as_u64().is_some(),
                "duration_ms must be a whole number: {ev}"
            );
            assert_keys(&d["usage"], &["tool_calls"]);
            assert!(d["usage"]["tool_calls"].as_u64().is_some(), "{ev}");
        }
        other => panic!("unknown event type {other:?}: {ev}"),
    }
}

/// Every check on one run's events: common shape rules, each event's shape, one run_id,
/// the thread_id, ts non-decreasing.
fn check_run(events: &[Value], run_id: &str, thread_id: Option<&str>) {
    assert_run_shape(events);
    let mut last_ts = 0;
    for ev in events {
        check_event(ev);
        assert_eq!(ev["run_id"], run_id, "{ev}");
        match thread_id {
            None => assert!(ev["thread_id"].is_null(), "thread_id must be null: {ev}"),
            Some(t) => assert_eq!(ev["thread_id"], t, "{ev}"),
        }
        let ts = ts_micros(ev["ts"].as_str().unwrap());
        assert!(ts >= last_ts, "ts goes backwards within a run: {ev}");
        last_ts = ts;
    }
}

fn seqs(events: &[Value]) -> Vec<u64> {
    events.iter().map(|e| e["seq"].as_u64().unwrap()).collect()
}

fn is_event(f: &Value) -> bool {
    f.get("seq").is_some() && f.get("run_id").is_some()
}

/// Sends start_run with a request_id and requires the very next frame to be its ack
/// (use only when nothing else is running for this user). Returns the run_id.
async fn start_expect_ack_first(c: &mut Client, rid: &str, frame: Value) -> String {
    let mut frame = frame;
    frame["request_id"] = json!(rid);
    c.send_json(frame).await;
    let ack = c.next_frame().await;
    assert_keys(&ack, &["type", "request_id", "run_id"]);
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(ack["request_id"], rid, "{ack}");
    let run = ack["run_id"].as_str().unwrap().to_string();
    assert!(is_run_id(&run), "run_id format: {ack}");
    run
}

/// Reads frames until the run's agent_completed; every frame read must be an event of that run.
async fn read_only_run(c: &mut Client, run_id: &str) -> Vec<Value> {
    let mut out = Vec::new();
    loop {
        let f = c.next_frame().await;
        assert!(
            is_event(&f) && f["run_id"] == run_id,
            "expected only events of {run_id}, got {f}"
        );
        let done = f["type"] == "agent_completed";
        out.push(f);
        if done {
            return out;
        }
    }
}

/// Sends a ping and reads to its pong; returns the frames read before it (heartbeats skipped).
async fn ping_flush(c: &mut Client, id: &str) -> Vec<Value> {
    c.send_json(json!({"type":"ping","request_id":id})).await;
    let mut out = Vec::new();
    loop {
        let f = c.next_frame().await;
        if f["type"] == "pong" && f["request_id"] == id {
            assert_keys(&f, &["type", "request_id"]);
            return out;
        }
        out.push(f);
    }
}

fn types(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["type"].as_str().unwrap().to_string())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// A raw tab: keeps each frame's exact text so tabs can be compared byte for byte.
// ---------------------------------------------------------------------------------------------

type Ws = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

struct Tab {
    ws: Ws,
    welcome: Value,
}

const READ_TIMEOUT: Duration = Duration::from_secs(10);

impl Tab {
    async fn open(url: &str) -> Tab {
        let (ws, _) = tokio::time::timeout(READ_TIMEOUT, connect_async(url))
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
            let m = tokio::time::timeout(READ_TIMEOUT, self.ws.next())
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
