//! Slow consumers (PROTOCOL.md §6, docs/protocol-notes.md "Liveness"): a connection that does
//! not read is dropped (close 4008 `slow_consumer` if it reads again within the grace period,
//! a reset after it) without stalling anyone else, and loses nothing it cannot resume.

#![allow(dead_code)]

#[allow(dead_code)]
mod common;

use common::*;
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

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

type RawWs = WebSocketStream<tokio::net::TcpStream>;

/// A client socket with a tiny receive buffer, so that the server's writes back up quickly.
/// Reads only the welcome.
async fn stalled_client(server: &agentcast::RunningServer, user: &str) -> (RawWs, Value) {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let stream = tokio::time::timeout(Duration::from_secs(10), sock.connect(server.addr()))
        .await
        .expect("connect timed out")
        .expect("connect");
    let url = format!("{}?token={}", server.ws_url(), server.token(user));
    let (mut ws, _) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::client_async(url, stream),
    )
    .await
    .expect("handshake timed out")
    .expect("handshake");
    let welcome = loop {
        let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("no welcome")
            .expect("closed before welcome")
            .expect("read error");
        if let Message::Text(t) = m {
            break serde_json::from_str::<Value>(t.as_str()).unwrap();
        }
    };
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    (ws, welcome)
}

enum End {
    Close(u16, String),
    Eof,
    Reset(String),
}

/// Reads everything the stalled client can still get until the connection ends; returns the
/// run events it got and how it ended.
async fn drain(ws: &mut RawWs) -> (Vec<Value>, End) {
    let mut events = Vec::new();
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("the slow consumer must be closed or reset, not left hanging");
        match m {
            None => return (events, End::Eof),
            Some(Err(e)) => return (events, End::Reset(e.to_string())),
            Some(Ok(Message::Close(f))) => {
                let (code, reason) = f
                    .map(|f| (u16::from(f.code), f.reason.to_string()))
                    .unwrap_or((0, String::new()));
                return (events, End::Close(code, reason));
            }
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(t.as_str()).expect("JSON");
                if is_event(&v) {
                    events.push(v);
                }
            }
            Some(Ok(_)) => {}
        }
    }
}

/// Reads on a normal client until the run's agent_completed; all frames must be events.
async fn read_run(c: &mut Client, run: &str, into: &mut Vec<Value>) {
    loop {
        let f = c.next_frame().await;
        assert!(is_event(&f), "unexpected frame {f}");
        let done = f["type"] == "agent_completed" && f["run_id"] == run;
        into.push(f);
        if done {
            return;
        }
    }
}

/// `n` text steps of `text_len` bytes, after a `first_pause_ms` pause (so that the huge
/// agent_started, which carries the whole input, reaches and is parsed by the reading tab
/// first), with a 2 ms pause every `sleep_every` steps: bursts stay well under the 16-frame
/// queue and the rate (~text_len/sleep_every bytes per 2 ms) is one a reading tab keeps up with.
fn big_steps(n: usize, text_len: usize, sleep_every: usize, first_pause_ms: u64) -> Value {
    let mut steps = vec![json!({"sleep_ms": first_pause_ms})];
    for i in 0..n {
        let head = format!("{i:05}-");
        let text = format!("{head}{}", "x".repeat(text_len.saturating_sub(head.len())));
        steps.push(json!({ "text": text }));
        if i % sleep_every == sleep_every - 1 {
            steps.push(json!({"sleep_ms": 2}));
        }
    }
    scripted(Value::Array(steps))
}

fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Reconnects with ?after_seq and checks the replay gives exactly the missing events, once.
async fn resume_and_check(
    server: &agentcast::RunningServer,
    user: &str,
    epoch: &Value,
    after: u64,
    expected: &[Value],
) {
    let epoch = epoch
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| epoch.to_string());
    let mut c = Client::connect_query(
        server,
        user,
        &format!("after_seq={after}&epoch={}", enc(&epoch)),
    )
    .await;
    let last = expected.last().unwrap()["seq"].as_u64().unwrap();
    for i in after + 1..=last {
        let f = c.next_frame().await;
        assert_eq!(
            f["seq"], i,
            "replay must give every missing event once, in order"
        );
        assert_eq!(f, expected[(i - 1) as usize]);
    }
    let r = c.next_frame().await;
    assert_eq!(
        r,
        json!({"type":"resumed","from_seq":after + 1,"to_seq":last})
    );
    assert!(ping_flush(&mut c, "p").await.is_empty());
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// outbound_queue 16, grace 300 ms: tab B of user u stops reading while u's run emits 2000
/// events of ~1 KiB. Tab A of u and another user v are not stalled and get everything; B is
/// cut off (close 4008 or a reset/EOF) having received far fewer events than were emitted,
/// contiguous from 1; reconnecting with ?after_seq=<last seq B saw> replays the rest once.
#[tokio::test]
async fn slow_consumer_is_dropped_without_stalling_others() {
    let mut cfg = test_config();
    cfg.outbound_queue = 16;
    cfg.slow_consumer_grace_ms = 300;
    cfg.replay_capacity = 10_000;
    cfg.max_frame_bytes = 8 << 20; // the 2000-step input is ~2 MiB
    let server = start(cfg);
    let mut a = Client::connect(&server, "u").await;
    let (mut b, b_welcome) = stalled_client(&server, "u").await;
    let mut v = Client::connect(&server, "v").await;
    assert_eq!(b_welcome["epoch"], a.welcome()["epoch"]);

    let run = a.start_run("scripted", big_steps(2000, 1024, 2, 300)).await;
    let mut a_events: Vec<Value> = Vec::new();
    while a_events.len() < 300 {
        let f = a.next_frame().await;
        assert!(is_event(&f), "{f}");
        a_events.push(f);
    }

    // Another user, meanwhile: a normal run, all of it, promptly.
    let t0 = Instant::now();
    let run_v = v
        .start_run(
            "scripted",
            scripted(
                json!([{"text":"v1"}, {"tool":"calculator","args":{"expr":"1+1"}}, {"text":"v2"}]),
            ),
        )
        .await;
    let ve = v.collect_run(&run_v).await;
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "v stalled: {:?}",
        t0.elapsed()
    );
    assert_run_shape(&ve);
    assert_contiguous(&seqs(&ve));
    assert_eq!(ve.last().unwrap()["data"]["status"], "succeeded");

    read_run(&mut a, &run, &mut a_events).await;
    assert_eq!(a_events.len(), 2002, "A gets the whole run");
    assert_eq!(a_events[0]["seq"], 1);
    assert_contiguous(&seqs(&a_events));
    assert_run_shape(&a_events);

    // B reads again.
    let (b_events, end) = drain(&mut b).await;
    match &end {
        End::Close(code, reason) => {
            assert_eq!(*code, 4008, "slow consumer close code (reason {reason:?})");
        }
        End::Eof | End::Reset(_) => {}
    }
    assert!(
        b_events.len() < 200,
        "B must be cut off at once: it got {} of 2002 events",
        b_events.len()
    );
    assert!(!b_events.iter().any(|e| e["type"] == "agent_completed"));
    if !b_events.is_empty() {
        assert_eq!(b_events[0]["seq"], 1);
        assert_contiguous(&seqs(&b_events));
    }
    let b_last = b_events.last().map_or(0, |e| e["seq"].as_u64().unwrap());
    eprintln!(
        "B got {} events, ended with {}",
        b_events.len(),
        match &end {
            End::Close(c, r) => format!("close {c} {r:?}"),
            End::Eof => "EOF".into(),
            End::Reset(e) => format!("error {e}"),
        }
    );

    resume_and_check(&server, "u", &b_welcome["epoch"], b_last, &a_events).await;
    assert!(ping_flush(&mut a, "pa").await.is_empty());
}

/// Within the grace period a slow consumer that reads again gets what was already on its
/// way, then close 4008 `slow_consumer`: no gap in what it got, far less than the run, and
/// the rest is resumable.
#[tokio::test]
async fn slow_consumer_reading_within_grace_sees_4008() {
    let mut cfg = test_config();
    cfg.outbound_queue = 16;
    cfg.slow_consumer_grace_ms = 10_000;
    cfg.max_frame_bytes = 1 << 20; // the 5000-step input is ~120 KB
    let server = start(cfg);
    let mut a = Client::connect(&server, "u").await;
    let (mut b, b_welcome) = stalled_client(&server, "u").await;

    // 5000 small events (~155 B each, ~780 KB): far more than B's queue and the socket buffers
    // (256 KiB kernel send buffer per docs/protocol-notes.md). Paced in bursts of 4 (well under
    // the 16-frame queue, even on a loaded machine), so that a client that reads keeps up.
    let n = 5000;
    let mut steps = Vec::new();
    for i in 0..n {
        steps.push(json!({"text": format!("t{i}")}));
        if i % 4 == 3 {
            steps.push(json!({"sleep_ms": 2}));
        }
    }
    let t0 = Instant::now();
    let run = a.start_run("scripted", scripted(Value::Array(steps))).await;
    let mut a_events = Vec::new();
    read_run(&mut a, &run, &mut a_events).await;
    assert_eq!(a_events.len(), n + 2);
    assert_contiguous(&seqs(&a_events));
    let total_bytes: usize = a_events.iter().map(|e| e.to_string().len()).sum();
    eprintln!("A read the run in {:?}", t0.elapsed());
    assert!(
        t0.elapsed() < Duration::from_millis(8_000),
        "test timing: B must read again within the grace period"
    );

    let (b_events, end) = drain(&mut b).await;
    match &end {
        End::Close(code, reason) => {
            assert_eq!(*code, 4008, "close code");
            assert_eq!(reason, "slow_consumer", "close reason");
        }
        End::Eof => panic!("within the grace period B must get close 4008, got EOF"),
        End::Reset(e) => panic!("within the grace period B must get close 4008, got {e}"),
    }
    // What was already queued or in the kernel buffers (256 KiB send + ~8 KiB receive, 16
    // frames) may still arrive; nothing beyond that. 400 KiB leaves room for the server's
    // own write buffer.
    let b_bytes: usize = b_events.iter().map(|e| e.to_string().len()).sum();
    assert!(
        b_bytes < 400 * 1024,
        "B must be cut off at once: it got {} of {} events ({b_bytes} of {total_bytes} bytes)",
        b_events.len(),
        n + 2
    );
    assert!(!b_events.iter().any(|e| e["type"] == "agent_completed"));
    if !b_events.is_empty() {
        assert_eq!(b_events[0]["seq"], 1);
        assert_contiguous(&seqs(&b_events));
    }
    let b_last = b_events.last().map_or(0, |e| e["seq"].as_u64().unwrap());
    eprintln!(
        "B got {} events ({b_bytes} of {total_bytes} bytes) before close 4008",
        b_events.len()
    );
    resume_and_check(&server, "u", &b_welcome["epoch"], b_last, &a_events).await;
}
