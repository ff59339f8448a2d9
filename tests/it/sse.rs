//! `GET /v1/events`: the run events as Server-Sent Events (PROTOCOL.md §7), read with a small
//! SSE client over a plain TcpStream (HTTP/1.1 chunked transfer encoding decoded by hand), and
//! compared with what a WebSocket tab of the same user receives.

use crate::common::*;
use serde_json::{json, Value};

/// A run of exactly six events: started, thinking, partial, executing, completed, completed.
fn six_event_run() -> Value {
    scripted(json!([{"think":"hmm"},{"text":"a"},{"tool":"calculator","args":{"expr":"1+1"}}]))
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_headers_welcome_and_auth() {
    let server = start(no_drain_config());
    let tab = Client::connect(&server, "alice").await;
    let mut sse = open_bearer(&server, "alice", &[]).await;
    let ct = sse.head.header("content-type").unwrap_or("");
    assert!(ct.starts_with("text/event-stream"), "Content-Type {ct:?}");
    assert_eq!(
        sse.head.header("cache-control"),
        Some("no-cache"),
        "{:?}",
        sse.head.headers
    );
    assert_eq!(
        sse.head.header("x-accel-buffering"),
        Some("no"),
        "{:?}",
        sse.head.headers
    );
    let w = sse.welcome("alice").await;
    assert_eq!(
        w["epoch"],
        tab.welcome()["epoch"],
        "SSE and WebSocket disagree on the epoch"
    );
    assert_eq!(w["last_seq"], json!(0));
    assert_ne!(
        w["session_id"],
        tab.welcome()["session_id"],
        "SSE reused the tab's session id"
    );

    // ?token= works too (EventSource cannot set headers).
    let path = format!("/v1/events?token={}", server.token("alice"));
    let mut sse2 = Sse::open(server.addr(), &path, &[]).await;
    sse2.welcome("alice").await;

    // No or bad token: 401 JSON before any stream.
    for (path, auth) in [
        ("/v1/events".to_string(), None),
        ("/v1/events?token=garbage".to_string(), None),
        ("/v1/events".to_string(), Some("Bearer garbage".to_string())),
        (
            "/v1/events".to_string(),
            Some(format!(
                "Bearer {}",
                agentcast::auth::sign(SECRET, "alice", now_unix() - 10)
            )),
        ),
    ] {
        let headers: Vec<(&str, &str)> = auth
            .as_deref()
            .map(|a| vec![("Authorization", a)])
            .unwrap_or_default();
        let r = http_full(server.addr(), "GET", &path, &headers, "").await;
        assert_eq!(r.status, 401, "GET {path} with {auth:?}: {:?}", r.body);
        assert_eq!(r.json()["code"], json!("unauthorized"), "{:?}", r.body);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_live_events_are_exactly_the_websocket_frames() {
    let server = start(no_drain_config());
    let mut tab = Client::connect(&server, "alice").await;
    let mut sse = open_bearer(&server, "alice", &[]).await;
    sse.welcome("alice").await;
    let mut bob_sse = open_bearer(&server, "bob", &[]).await;
    bob_sse.welcome("bob").await;

    let steps = scripted(json!([
        {"think":"with \"quotes\" and\nnewlines\r\n\n and unicode é ✓"},
        {"tool":"sleep","args":{"ms":120}},
        {"tool":"calculator","args":{"expr":"2+2"}},
        {"tool":"fail","args":{}},
        {"text":"line one\n\nline three"}
    ]));
    let run_id = tab.start_run("scripted", steps).await;
    let ws_events = tab.collect_run(&run_id).await;
    assert_run_shape(&ws_events);
    assert!(
        ws_events
            .iter()
            .any(|e| e["type"] == json!("tool_progress")),
        "no progress to compare"
    );

    for expected in &ws_events {
        let b = sse.next_event().await;
        assert_event_block(&b, expected);
    }
    // A second run continues the same seq line.
    let run2 = tab.start_run("echo", json!("second")).await;
    let ws2 = tab.collect_run(&run2).await;
    assert_eq!(
        ws2[0]["seq"].as_u64().unwrap(),
        ws_events.last().unwrap()["seq"].as_u64().unwrap() + 1
    );
    for expected in &ws2 {
        let b = sse.next_event().await;
        assert_event_block(&b, expected);
    }

    // bob's stream saw none of it: his first event is from his own run, seq 1.
    let bob_run = agentcast_start(&server, "bob").await;
    let b = bob_sse.next_event().await;
    assert_eq!(b.lines[0], "id: 1", "bob's stream: {b:?}");
    assert_eq!(
        b.data()["run_id"],
        json!(bob_run),
        "bob's stream got a foreign event: {b:?}"
    );
}

/// Starts an echo run for `user` over HTTP; returns its run_id.
async fn agentcast_start(server: &agentcast::RunningServer, user: &str) -> String {
    let auth = bearer(server, user);
    let r = http_full(
        server.addr(),
        "POST",
        "/v1/runs",
        &[("Authorization", auth.as_str())],
        &json!({"agent":"echo","input":"mine"}).to_string(),
    )
    .await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    r.json()["run_id"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_heartbeat_comments_carry_last_seq() {
    let server = start(agentcast::Config {
        heartbeat_interval_ms: 200,
        ..no_drain_config()
    });
    let mut tab = Client::connect(&server, "alice").await;
    let mut sse = open_bearer(&server, "alice", &[]).await;
    sse.welcome("alice").await;
    let t0 = std::time::Instant::now();
    let hb = sse.next_block().await.expect("stream ended");
    assert!(hb.is_comment(), "expected a heartbeat comment, got {hb:?}");
    assert_eq!(
        hb.lines,
        vec![": heartbeat last_seq=0".to_string()],
        "{hb:?}"
    );
    assert!(
        t0.elapsed() < std::time::Duration::from_secs(2),
        "first heartbeat took {:?}",
        t0.elapsed()
    );

    let run_id = tab.start_run("scripted", six_event_run()).await;
    let events = tab.collect_run(&run_id).await;
    let last = events.last().unwrap()["seq"].as_u64().unwrap();
    // Read the run's events (heartbeats may interleave), then the next heartbeat names the last seq.
    let mut seen = 0;
    while seen < events.len() {
        let b = sse.next_block().await.expect("stream ended");
        if b.is_comment() {
            continue;
        }
        assert_event_block(&b, &events[seen]);
        seen += 1;
    }
    let hb = sse.next_block().await.expect("stream ended");
    assert_eq!(
        hb.lines,
        vec![format!(": heartbeat last_seq={last}")],
        "{hb:?}"
    );
    // And they keep coming.
    let hb = sse.next_block().await.expect("stream ended");
    assert_eq!(
        hb.lines,
        vec![format!(": heartbeat last_seq={last}")],
        "{hb:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_resume_by_last_event_id_replays_then_continues_live() {
    let server = start(no_drain_config());
    let mut tab = Client::connect(&server, "alice").await;
    let run1 = tab.start_run("scripted", six_event_run()).await;
    let ev1 = tab.collect_run(&run1).await;
    assert_eq!(ev1.len(), 6);
    assert_eq!(ev1.last().unwrap()["seq"], json!(6));

    let mut sse = open_bearer(&server, "alice", &[("Last-Event-ID", "3")]).await;
    let w = sse.welcome("alice").await;
    assert_eq!(w["last_seq"], json!(6), "{w}");
    for expected in &ev1[3..] {
        let b = sse.next_event().await;
        assert_event_block(&b, expected);
    }
    let b = sse.next_event().await;
    assert_eq!(b.lines.len(), 2, "resumed block: {b:?}");
    assert_eq!(
        b.lines[0], "event: resumed",
        "after the replay of 4..6: {b:?}"
    );
    assert_eq!(
        b.data(),
        json!({"type":"resumed","from_seq":4,"to_seq":6}),
        "{b:?}"
    );

    // Live events follow on the same line: 7, 8, ... with no gap and no repeat.
    let run2 = tab.start_run("scripted", six_event_run()).await;
    let ev2 = tab.collect_run(&run2).await;
    assert_eq!(ev2[0]["seq"], json!(7));
    for expected in &ev2 {
        let b = sse.next_event().await;
        assert_event_block(&b, expected);
    }

    // Resuming at the very end replays nothing: resumed from 13 to 12, then live.
    let mut sse2 = open_bearer(&server, "alice", &[("Last-Event-ID", "12")]).await;
    sse2.welcome("alice").await;
    let b = sse2.next_event().await;
    assert_eq!(b.lines[0], "event: resumed", "{b:?}");
    assert_eq!(
        b.data(),
        json!({"type":"resumed","from_seq":13,"to_seq":12})
    );
    let run3 = tab.start_run("echo", json!("x")).await;
    let ev3 = tab.collect_run(&run3).await;
    for expected in &ev3 {
        assert_event_block(&sse2.next_event().await, expected);
        assert_event_block(&sse.next_event().await, expected);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_resume_by_after_seq_query() {
    let server = start(no_drain_config());
    let mut tab = Client::connect(&server, "alice").await;
    let epoch = tab.welcome()["epoch"].as_str().unwrap().to_string();
    let run1 = tab.start_run("scripted", six_event_run()).await;
    let ev1 = tab.collect_run(&run1).await;

    let token = server.token("alice");
    let path = format!("/v1/events?token={token}&after_seq=2&epoch={epoch}");
    let mut sse = Sse::open(server.addr(), &path, &[]).await;
    sse.welcome("alice").await;
    for expected in &ev1[2..] {
        assert_event_block(&sse.next_event().await, expected);
    }
    let b = sse.next_event().await;
    assert_eq!(b.lines[0], "event: resumed", "{b:?}");
    assert_eq!(b.data(), json!({"type":"resumed","from_seq":3,"to_seq":6}));

    // ?after_seq wins over Last-Event-ID when both are given.
    let path = format!("/v1/events?token={token}&after_seq=4");
    let mut sse2 = Sse::open(server.addr(), &path, &[("Last-Event-ID", "1")]).await;
    sse2.welcome("alice").await;
    for expected in &ev1[4..] {
        assert_event_block(&sse2.next_event().await, expected);
    }
    assert_eq!(
        sse2.next_event().await.data(),
        json!({"type":"resumed","from_seq":5,"to_seq":6})
    );

    let run2 = tab.start_run("echo", json!("live")).await;
    let ev2 = tab.collect_run(&run2).await;
    for expected in &ev2 {
        assert_event_block(&sse.next_event().await, expected);
        assert_event_block(&sse2.next_event().await, expected);
    }

    // Bad resume points are refused before the stream.
    for (path, last_event_id) in [
        (format!("/v1/events?token={token}&after_seq=abc"), None),
        (format!("/v1/events?token={token}&after_seq=-1"), None),
        (format!("/v1/events?token={token}&epoch={epoch}"), None),
        (format!("/v1/events?token={token}"), Some("not-a-seq")),
    ] {
        let headers: Vec<(&str, &str)> = last_event_id
            .map(|v| vec![("Last-Event-ID", v)])
            .unwrap_or_default();
        let r = http_full(server.addr(), "GET", &path, &headers, "").await;
        assert_eq!(
            r.status, 400,
            "GET {path} Last-Event-ID {last_event_id:?}: {:?}",
            r.body
        );
        assert_eq!(r.json()["code"], json!("invalid_field"), "{:?}", r.body);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_resume_gap_is_an_error_event_then_live() {
    let server = start(agentcast::Config {
        replay_capacity: 3,
        ..no_drain_config()
    });
    let mut tab = Client::connect(&server, "alice").await;
    let epoch = tab.welcome()["epoch"].as_str().unwrap().to_string();
    let run1 = tab.start_run("scripted", six_event_run()).await;
    let ev1 = tab.collect_run(&run1).await;
    assert_eq!(ev1.last().unwrap()["seq"], json!(6));

    let gap = |b: &Block, oldest: u64, last: u64| {
        assert_eq!(b.lines.len(), 2, "error block: {b:?}");
        assert_eq!(
            b.lines[0], "event: error",
            "expected a resume_gap error: {b:?}"
        );
        let e = b.data();
        assert_eq!(e["type"], json!("error"), "{e}");
        assert_eq!(e["code"], json!("resume_gap"), "{e}");
        assert_eq!(e["oldest_seq"], json!(oldest), "{e}");
        assert_eq!(e["last_seq"], json!(last), "{e}");
        assert!(e["message"].is_string(), "{e}");
    };

    // Events 2 and 3 are no longer buffered (only 4..6 are).
    let mut sse = open_bearer(&server, "alice", &[("Last-Event-ID", "1")]).await;
    sse.welcome("alice").await;
    gap(&sse.next_event().await, 4, 6);
    // A client that saw more than the server has.
    let mut ahead = open_bearer(&server, "alice", &[("Last-Event-ID", "9")]).await;
    ahead.welcome("alice").await;
    gap(&ahead.next_event().await, 4, 6);
    // Another epoch's history.
    let path = format!(
        "/v1/events?token={}&after_seq=5&epoch={epoch}x",
        server.token("alice")
    );
    let mut other = Sse::open(server.addr(), &path, &[]).await;
    other.welcome("alice").await;
    gap(&other.next_event().await, 4, 6);
    // The buffered part still resumes fine.
    let mut ok = open_bearer(&server, "alice", &[("Last-Event-ID", "3")]).await;
    ok.welcome("alice").await;
    for expected in &ev1[3..] {
        assert_event_block(&ok.next_event().await, expected);
    }
    assert_eq!(
        ok.next_event().await.data(),
        json!({"type":"resumed","from_seq":4,"to_seq":6})
    );

    // After the error, each stream is live from welcome.last_seq, with no replay.
    let run2 = tab.start_run("echo", json!("after the gap")).await;
    let ev2 = tab.collect_run(&run2).await;
    assert_eq!(ev2[0]["seq"], json!(7));
    for s in [&mut sse, &mut ahead, &mut other, &mut ok] {
        for expected in &ev2 {
            assert_event_block(&s.next_event().await, expected);
        }
    }
}
