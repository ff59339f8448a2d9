//! Slow consumers (PROTOCOL.md §6, docs/protocol-notes.md "Liveness"): a connection that does
//! not read is dropped (close 4008 `slow_consumer` if it reads again within the grace period,
//! a reset after it) without stalling anyone else, and loses nothing it cannot resume.

use crate::common::*;
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

// ---------------------------------------------------------------------------------------------
// Local helpers (the shared shape checks per PROTOCOL.md §2 are in common/shape.rs)
// ---------------------------------------------------------------------------------------------

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
        &format!("after_seq={after}&epoch={}", percent_encode(&epoch)),
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
