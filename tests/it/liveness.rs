//! Liveness (PROTOCOL §6, §3 heartbeat; protocol-notes "Liveness"): server pings with heartbeat
//! frames, the idle timeout, and graceful shutdown.

use std::time::{Duration, Instant};

use crate::common::*;
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;
use tokio_tungstenite::tungstenite::Message;

fn fast_heartbeat_config() -> agentcast::Config {
    agentcast::Config {
        heartbeat_interval_ms: 200,
        idle_timeout_ms: 800,
        ..test_config()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_frames_carry_last_seq_and_come_with_pings() {
    let server = start(agentcast::Config {
        heartbeat_interval_ms: 200,
        ..test_config()
    });
    let mut c = Client::connect(&server, "alice").await;

    // Before any run: a heartbeat says last_seq 0.
    let hb = c.next_of_type("heartbeat").await;
    assert_eq!(
        hb,
        json!({ "type": "heartbeat", "last_seq": 0 }),
        "heartbeat of a new user"
    );

    let run = c.start_run("echo", json!("hello heartbeat")).await;
    let events = c.collect_run(&run).await;
    assert_run_shape(&events);
    let last = events.last().unwrap()["seq"].as_u64().unwrap();
    assert!(last > 0);

    // From here on nothing happens for the user: every heartbeat shows `last`, and each comes
    // with a WebSocket ping. Read raw messages so the pings are visible (tungstenite answers them).
    let mut pings = 0;
    let mut heartbeats = 0;
    let deadline = Instant::now() + TIMEOUT;
    while pings < 3 || heartbeats < 3 {
        assert!(
            Instant::now() < deadline,
            "within {TIMEOUT:?} saw {pings} pings and {heartbeats} heartbeats (want 3 of each at a 200 ms interval)"
        );
        match c.next_message().await {
            Some(Ok(Message::Ping(_))) => pings += 1,
            Some(Ok(Message::Text(t))) => {
                let f: Value = serde_json::from_str(t.as_str()).expect("JSON text frame");
                assert_eq!(
                    f,
                    json!({ "type": "heartbeat", "last_seq": last }),
                    "after the run ended (last seq {last}) only heartbeats with that last_seq may arrive"
                );
                heartbeats += 1;
            }
            Some(Ok(Message::Pong(_))) => {}
            other => panic!("unexpected message while waiting for heartbeats: {other:?}"),
        }
    }

    // A new connection of the same user hears the same last_seq.
    let mut d = Client::connect(&server, "alice").await;
    assert_eq!(d.welcome()["last_seq"], json!(last));
    let hb = d.next_of_type("heartbeat").await;
    assert_eq!(hb, json!({ "type": "heartbeat", "last_seq": last }));
}

/// Parses server-to-client WebSocket frames (unmasked) out of raw bytes; returns (opcode, payload)
/// of each complete frame.
fn parse_frames(mut bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while bytes.len() >= 2 {
        let opcode = bytes[0] & 0x0f;
        let masked = bytes[1] & 0x80 != 0;
        let mut len = (bytes[1] & 0x7f) as usize;
        let mut pos = 2;
        if len == 126 {
            if bytes.len() < 4 {
                break;
            }
            len = u16::from_be_bytes([bytes[2], bytes[3]]) as usize;
            pos = 4;
        } else if len == 127 {
            if bytes.len() < 10 {
                break;
            }
            len = u64::from_be_bytes(bytes[2..10].try_into().unwrap()) as usize;
            pos = 10;
        }
        assert!(!masked, "a server frame must not be masked");
        if bytes.len() < pos + len {
            break;
        }
        out.push((opcode, bytes[pos..pos + len].to_vec()));
        bytes = &bytes[pos + len..];
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connection_is_closed_with_1000_idle_timeout() {
    let server = start(fast_heartbeat_config());
    let token = server.token("alice");
    let (mut stream, head, mut bytes) =
        raw_ws_upgrade(server.addr(), &format!("/v1/ws?token={token}"), &[]).await;
    assert_eq!(
        head.status, 101,
        "the hand-made upgrade was refused: {head:?}"
    );
    let upgraded = Instant::now();

    // Never send anything: not even a pong. Read until the server ends the connection.
    let read_all = async {
        let mut chunk = [0u8; 4096];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => bytes.extend_from_slice(&chunk[..n]),
            }
        }
    };
    if tokio::time::timeout(TIMEOUT, read_all).await.is_err() {
        let frames = parse_frames(&bytes);
        panic!(
            "a silent connection was still open after {TIMEOUT:?} (idle timeout 800 ms); frames seen (opcode, len): {:?}",
            frames.iter().map(|(o, p)| (*o, p.len())).collect::<Vec<_>>()
        );
    }
    let elapsed = upgraded.elapsed();

    let frames = parse_frames(&bytes);
    let first = frames.first().expect("no frame at all");
    assert_eq!(first.0, 0x1, "first frame is not text");
    let welcome: Value = serde_json::from_slice(&first.1).expect("welcome JSON");
    assert_eq!(welcome["type"], json!("welcome"));
    assert!(
        frames.iter().any(|(o, _)| *o == 0x9),
        "the server never pinged the silent connection"
    );
    let close = frames.iter().find(|(o, _)| *o == 0x8).unwrap_or_else(|| {
        panic!(
            "the connection ended without a close frame; opcodes: {:?}",
            frames.iter().map(|f| f.0).collect::<Vec<_>>()
        )
    });
    assert!(close.1.len() >= 2, "close frame without a status code");
    let code = u16::from_be_bytes([close.1[0], close.1[1]]);
    let reason = String::from_utf8_lossy(&close.1[2..]).into_owned();
    assert_eq!(code, 1000, "idle close code (reason {reason:?})");
    assert_eq!(reason, "idle timeout", "idle close reason");
    assert!(
        elapsed >= Duration::from_millis(600),
        "closed after {elapsed:?}, before the 800 ms idle timeout could have passed"
    );
    // The close frame is the last frame the server sent.
    assert_eq!(
        frames.last().unwrap().0,
        0x8,
        "frames after the close frame"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responsive_connection_stays_open_past_the_idle_timeout() {
    let server = start(fast_heartbeat_config());
    let mut c = Client::connect(&server, "alice").await;
    // Only read (tungstenite answers every ping with a pong) for 2.5 idle timeouts.
    let until = Instant::now() + Duration::from_millis(2000);
    let mut pings = 0;
    while Instant::now() < until {
        let left = until.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, c.ws().next()).await {
            Err(_) => break,
            Ok(Some(Ok(Message::Ping(_)))) => pings += 1,
            Ok(Some(Ok(Message::Text(_)))) | Ok(Some(Ok(Message::Pong(_)))) => {}
            Ok(other) => panic!("a connection that answers pings was ended: {other:?}"),
        }
    }
    assert!(pings >= 3, "only {pings} pings in 2 s at a 200 ms interval");
    c.assert_alive().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_cancels_running_runs_then_closes_with_1001() {
    // No drain time: running runs are cancelled at once (the `drain` tests cover the drain).
    let mut cfg = test_config();
    cfg.drain_secs = 0;
    let server = start(cfg);
    let mut c = Client::connect(&server, "alice").await;
    let mut other = Client::connect(&server, "bob").await;
    let run = c
        .start_run(
            "scripted",
            scripted(
                json!([{ "think": "about to sleep" }, { "sleep_ms": 60_000 }, { "text": "never" }]),
            ),
        )
        .await;
    let started = c.peek_of_type("agent_started").await;
    assert_eq!(started["run_id"], json!(run));

    let stopping = tokio::task::spawn_blocking(move || server.stop());

    let events = c.collect_run(&run).await;
    assert_run_shape(&events);
    let done = events.last().unwrap();
    assert_eq!(
        done["data"]["status"],
        json!("cancelled"),
        "status of a run ended by shutdown: {done}"
    );
    assert_eq!(
        done["data"]["error"]["code"],
        json!("shutdown"),
        "error of a run ended by shutdown: {done}"
    );
    assert!(
        !events.iter().any(|e| e["type"] == json!("partial_result")),
        "the sleep step must not have finished: {events:?}"
    );

    assert_eq!(
        c.expect_close().await,
        Some(1001),
        "after its runs ended the connection is closed with 1001"
    );
    assert!(
        c.kept().iter().all(|f| f["type"] == json!("heartbeat")),
        "frames after the run's agent_completed: {:?}",
        c.kept()
    );
    assert_eq!(
        other.expect_close().await,
        Some(1001),
        "an idle connection is closed with 1001 too"
    );

    tokio::time::timeout(TIMEOUT, stopping)
        .await
        .expect("RunningServer::stop did not return within 10 s")
        .expect("stop panicked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_closes_an_open_tool_call_before_agent_completed() {
    // No drain time: running runs are cancelled at once (the `drain` tests cover the drain).
    let mut cfg = test_config();
    cfg.drain_secs = 0;
    let server = start(cfg);
    let mut c = Client::connect(&server, "alice").await;
    let run = c
        .start_run(
            "scripted",
            scripted(json!([{ "tool": "sleep", "args": { "ms": 60_000 } }, { "text": "never" }])),
        )
        .await;
    let exec = c.peek_of_type("tool_executing").await;
    assert_eq!(exec["run_id"], json!(run));
    let call = exec["data"]["tool_call_id"].clone();

    let stopping = tokio::task::spawn_blocking(move || server.stop());

    let events = c.collect_run(&run).await;
    assert_run_shape(&events);
    let n = events.len();
    let tc = &events[n - 2];
    assert_eq!(
        tc["type"],
        json!("tool_completed"),
        "the open tool call is closed right before agent_completed: {events:?}"
    );
    assert_eq!(tc["data"]["tool_call_id"], call);
    assert_eq!(tc["data"]["ok"], json!(false), "{tc}");
    assert_eq!(tc["data"]["error"]["code"], json!("shutdown"), "{tc}");
    let done = &events[n - 1];
    assert_eq!(done["data"]["status"], json!("cancelled"), "{done}");
    assert_eq!(done["data"]["error"]["code"], json!("shutdown"), "{done}");

    assert_eq!(c.expect_close().await, Some(1001));
    tokio::time::timeout(TIMEOUT, stopping)
        .await
        .expect("RunningServer::stop did not return within 10 s")
        .expect("stop panicked");
}
