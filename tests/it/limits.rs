//! Per-user limits: run starts per minute (`--runs-per-minute`) over the WebSocket and HTTP, and
//! connections per user (`--max-connections-per-user`): the connection over the limit is
//! upgraded and then closed with 1008.

use std::time::Duration;

use crate::common::*;
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

async fn post_run(server: &agentcast::RunningServer, user: &str, body: &Value) -> HttpResponse {
    let auth = bearer(server, user);
    http_full(
        server.addr(),
        "POST",
        "/v1/runs",
        &[("Authorization", auth.as_str())],
        &body.to_string(),
    )
    .await
}

/// A WebSocket connection over the user's limit: the upgrade succeeds, and the first thing
/// that comes is a close 1008 whose reason mentions too many connections; no frame before it.
async fn assert_refused_1008(server: &agentcast::RunningServer, user: &str) {
    let url = format!("{}?token={}", server.ws_url(), server.token(user));
    let (mut ws, response) =
        match tokio::time::timeout(TIMEOUT, tokio_tungstenite::connect_async(url)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => panic!(
                "{user}: the connection over the limit must still be upgraded, got {}",
                describe_error(&e)
            ),
            Err(_) => panic!("{user}: handshake timed out"),
        };
    assert_eq!(response.status().as_u16(), 101);
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .unwrap_or_else(|_| {
                panic!("{user}: the connection over the limit was not closed within {TIMEOUT:?}")
            });
        match msg {
            Some(Ok(Message::Close(Some(frame)))) => {
                assert_eq!(
                    u16::from(frame.code),
                    1008,
                    "{user}: close code over the limit: {frame:?}"
                );
                let reason = frame.reason.as_str().to_ascii_lowercase();
                assert!(
                    reason.contains("too many connections"),
                    "{user}: close reason {reason:?}"
                );
                break;
            }
            Some(Ok(Message::Ping(_))) | Some(Ok(Message::Pong(_))) => {}
            other => panic!("{user}: over the limit, expected close 1008 first, got {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_per_minute_refuses_the_fourth_start_over_ws_and_http() {
    let server = start(agentcast::Config {
        runs_per_minute: 3,
        ..no_drain_config()
    });
    let mut c = Client::connect(&server, "alice").await;
    let body = json!({"agent":"echo","input":"x"});

    // Three starts, over both ways in: one budget.
    let r1 = c.start_run("echo", json!("one")).await;
    let r2 = c.start_run("echo", json!("two")).await;
    let r = post_run(&server, "alice", &body).await;
    assert_eq!(
        r.status, 202,
        "third start (HTTP) within 3 a minute: {:?}",
        r.body
    );
    let r3 = r.json()["run_id"].as_str().unwrap().to_string();

    // The fourth over the WebSocket.
    let reply = c
        .request(json!({"type":"start_run","agent":"echo","input":"four","request_id":"fourth"}))
        .await;
    assert_eq!(reply["type"], json!("error"), "fourth start: {reply}");
    assert_eq!(reply["code"], json!("rate_limited"), "{reply}");
    assert_eq!(reply["request_id"], json!("fourth"), "{reply}");
    assert!(reply["message"].is_string(), "{reply}");
    let retry = reply["retry_after_ms"]
        .as_u64()
        .unwrap_or_else(|| panic!("rate_limited without an integer retry_after_ms: {reply}"));
    assert!(
        retry > 0 && retry <= 20_001,
        "retry_after_ms {retry}: at 3 a minute one start is back within 20 s"
    );
    assert!(reply.get("run_id").is_none(), "{reply}");

    // And over HTTP.
    let r = post_run(&server, "alice", &body).await;
    assert_eq!(r.status, 429, "fifth start (HTTP): {:?}", r.body);
    let b = r.json();
    assert_eq!(b["code"], json!("rate_limited"), "{b}");
    assert!(b["message"].is_string(), "{b}");
    let retry_http = b["retry_after_ms"]
        .as_u64()
        .unwrap_or_else(|| panic!("no retry_after_ms: {b}"));
    assert!(retry_http > 0 && retry_http <= 20_001, "{b}");
    let header = r
        .header("retry-after")
        .unwrap_or_else(|| panic!("429 without Retry-After: {:?}", r.headers));
    assert_eq!(
        header,
        retry_http.div_ceil(1000).to_string(),
        "Retry-After vs retry_after_ms {retry_http}"
    );

    // The three ran; the refused ones started nothing.
    for run in [&r1, &r2, &r3] {
        let ev = c.collect_run(run).await;
        assert_eq!(ev.last().unwrap()["data"]["status"], json!("succeeded"));
    }
    c.assert_alive().await;
    assert!(
        c.kept().is_empty(),
        "a refused start produced frames: {:?}",
        c.kept()
    );
    assert_eq!(
        scrape(server.addr())
            .await
            .get("agentcast_runs_started_total"),
        3.0
    );

    // Another user has a budget of their own.
    let mut bob = Client::connect(&server, "bob").await;
    for _ in 0..3 {
        bob.start_run("echo", json!("bob")).await;
    }
    let reply = bob
        .request(json!({"type":"start_run","agent":"echo","input":"x"}))
        .await;
    assert_eq!(reply["code"], json!("rate_limited"), "{reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_over_max_connections_per_user_is_closed_1008() {
    let server = start(agentcast::Config {
        max_connections_per_user: 2,
        ..no_drain_config()
    });
    let addr = server.addr();
    let mut a1 = Client::connect(&server, "alice").await;
    let mut a2 = Client::connect(&server, "alice").await;
    assert_refused_1008(&server, "alice").await;
    assert_refused_1008(&server, "alice").await;
    assert_eq!(
        scrape(addr)
            .await
            .get("agentcast_connections_refused_total{reason=\"too_many_connections\"}"),
        2.0
    );
    assert_eq!(
        scrape(addr).await.get("agentcast_connections"),
        2.0,
        "refused connections are counted as open"
    );

    // Another user is not affected.
    let mut b1 = Client::connect(&server, "bob").await;
    let _b2 = Client::connect(&server, "bob").await;
    b1.assert_alive().await;

    // alice's two connections are untouched: alive, and both get her events.
    a1.assert_alive().await;
    let run = a2.start_run("echo", json!("still here")).await;
    let e1 = a1.collect_run(&run).await;
    let e2 = a2.collect_run(&run).await;
    assert_eq!(e1, e2);
    assert_eq!(e1.last().unwrap()["data"]["status"], json!("succeeded"));

    // Once one closes, a new one is accepted (and the limit holds again after it).
    a1.close().await;
    let mut a3 = Client::connect(&server, "alice").await;
    a3.assert_alive().await;
    assert_eq!(
        a3.welcome()["last_seq"],
        e1.last().unwrap()["seq"],
        "{}",
        a3.welcome()
    );
    assert_refused_1008(&server, "alice").await;
    let run = a3.start_run("echo", json!("again")).await;
    assert_eq!(a3.collect_run(&run).await, a2.collect_run(&run).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_streams_count_toward_the_connection_limit() {
    let server = start(agentcast::Config {
        max_connections_per_user: 2,
        ..no_drain_config()
    });
    let auth = bearer(&server, "alice");
    let mut ws = Client::connect(&server, "alice").await;
    let mut sse = open_sse(&server, "alice").await;
    // 1 WebSocket + 1 SSE: a second WebSocket is over the limit.
    assert_refused_1008(&server, "alice").await;

    // A third stream over SSE is not served either: no welcome, no events, and it ends.
    let (status, body) = http(
        server.addr(),
        "GET",
        "/v1/events",
        &[("Authorization", auth.as_str())],
        "",
    )
    .await;
    assert!(
        !body.contains("event: welcome"),
        "an SSE stream over the limit was served (status {status}): {body:?}"
    );
    assert!(
        status != 200 || body.to_ascii_lowercase().contains("too many connections"),
        "an SSE stream over the limit must say why: status {status}, body {body:?}"
    );

    // The two that are in still work.
    let run = ws.start_run("echo", json!("x")).await;
    let events = ws.collect_run(&run).await;
    for e in &events {
        let b = sse.next_event().await;
        assert_eq!(&b.data(), e, "{b:?}");
    }
}

/// After an SSE client closes its stream, the user can connect again at once (its slot is free),
/// as after a WebSocket close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_sse_stream_frees_its_slot_promptly() {
    let server = start(agentcast::Config {
        max_connections_per_user: 1,
        ..no_drain_config()
    });
    let sse = open_sse(&server, "alice").await;
    assert_refused_1008(&server, "alice").await;
    drop(sse);
    // The server learns of the closed TCP connection asynchronously: retry (bounded) for 3 s.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    loop {
        let url = format!("{}?token={}", server.ws_url(), server.token("alice"));
        let (mut ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("upgrade");
        let first = tokio::time::timeout(TIMEOUT, ws.next())
            .await
            .expect("a first message");
        match first {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                assert_eq!(v["type"], json!("welcome"), "{v}");
                break;
            }
            Some(Ok(Message::Close(Some(f)))) if u16::from(f.code) == 1008 => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "3 s after the SSE client closed its stream, its slot is still taken (close 1008)"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => panic!("unexpected first message {other:?}"),
        }
    }
}
