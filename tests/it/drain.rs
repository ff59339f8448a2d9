//! Graceful drain (`--drain-secs`): on SIGTERM (the binary) or `RunningServer::stop()`, new
//! requests get 503 (except /metrics), running runs get the drain time to finish, the rest are
//! cancelled with code `shutdown`, then every connection is closed with 1001 and the process
//! exits 0.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::common::*;
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// Reads frames (heartbeats skipped) into `log` until one matches `pred`; returns it. Panics,
/// showing what was read, if the connection closes first.
async fn read_until(
    c: &mut Client,
    log: &mut Vec<Value>,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let f = if !c.kept().is_empty() {
            c.next_json().await
        } else {
            let msg = tokio::time::timeout_at(deadline, c.ws().next())
                .await
                .unwrap_or_else(|_| panic!("no {what} within {TIMEOUT:?}; read so far: {log:#?}"));
            match msg {
                Some(Ok(Message::Text(t))) => {
                    serde_json::from_str(t.as_str()).expect("JSON text frame")
                }
                Some(Ok(Message::Ping(_))) | Some(Ok(Message::Pong(_))) => continue,
                other => panic!("waiting for {what}, got {other:?}; read so far: {log:#?}"),
            }
        };
        if frame_type(&f) == "heartbeat" {
            continue;
        }
        log.push(f.clone());
        if pred(&f) {
            return f;
        }
    }
}

/// Like read_until, but done at once if a matching frame was already read into `log`.
async fn read_until_seen(
    c: &mut Client,
    log: &mut Vec<Value>,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    if let Some(f) = log.iter().find(|f| pred(f)) {
        return f.clone();
    }
    read_until(c, log, what, pred).await
}

fn run_events(log: &[Value], run_id: &str) -> Vec<Value> {
    log.iter()
        .filter(|f| f["run_id"] == json!(run_id) && f.get("seq").is_some())
        .cloned()
        .collect()
}

fn completed_of(run_id: &str) -> impl Fn(&Value) -> bool + '_ {
    move |f| frame_type(f) == "agent_completed" && f["run_id"] == json!(run_id)
}

/// The run ended cancelled by the shutdown: its open call closed with `shutdown`, then
/// agent_completed cancelled/shutdown.
fn assert_cancelled_by_shutdown(events: &[Value]) {
    assert_run_shape(events);
    let tool_done: Vec<&Value> = events
        .iter()
        .filter(|e| frame_type(e) == "tool_completed")
        .collect();
    assert_eq!(tool_done.len(), 1, "{events:?}");
    assert_eq!(tool_done[0]["data"]["ok"], json!(false), "{}", tool_done[0]);
    assert_eq!(
        tool_done[0]["data"]["error"]["code"],
        json!("shutdown"),
        "{}",
        tool_done[0]
    );
    let done = events.last().unwrap();
    assert_eq!(done["data"]["status"], json!("cancelled"), "{done}");
    assert_eq!(done["data"]["error"]["code"], json!("shutdown"), "{done}");
    assert!(
        events.iter().all(|e| frame_type(e) != "partial_result"),
        "the script went on: {events:?}"
    );
}

fn assert_succeeded(events: &[Value]) {
    assert_run_shape(events);
    let done = events.last().unwrap();
    assert_eq!(
        done["data"]["status"],
        json!("succeeded"),
        "a run that fits in the drain was not let finish: {events:?}"
    );
    assert!(
        events.iter().all(|e| e["data"]["ok"] != json!(false)),
        "{events:?}"
    );
}

fn sleep_then_text(ms: u64, text: &str) -> Value {
    scripted(json!([{"tool":"sleep","args":{"ms":ms}},{"text":text}]))
}

/// Every kind of new request answered 503 while draining; /metrics 200.
async fn assert_refusing_new_requests(addr: SocketAddr, token: &str) {
    let auth = format!("Bearer {token}");
    let h: &[(&str, &str)] = &[("Authorization", auth.as_str())];
    let (s, body) = http(addr, "GET", "/healthz", &[], "").await;
    assert_eq!(s, 503, "GET /healthz while draining: {body:?}");
    let (s, body) = http(
        addr,
        "POST",
        "/v1/runs",
        h,
        &json!({"agent":"echo","input":"late"}).to_string(),
    )
    .await;
    assert_eq!(s, 503, "POST /v1/runs while draining: {body:?}");
    let (s, body) = http(addr, "GET", "/v1/agents", h, "").await;
    assert_eq!(s, 503, "GET /v1/agents while draining: {body:?}");
    let (s, body) = http(addr, "GET", "/v1/events", h, "").await;
    assert_eq!(s, 503, "GET /v1/events while draining: {body:?}");
    match Client::try_connect(&format!("ws://{addr}/v1/ws?token={token}"), None).await {
        Ok(c) => panic!(
            "a new WebSocket was accepted while draining: {}",
            c.welcome()
        ),
        Err(e) => assert_eq!(
            http_status(&e),
            Some(503),
            "WebSocket upgrade while draining: {}",
            describe_error(&e)
        ),
    }
    let (s, body) = http(addr, "GET", "/metrics", &[], "").await;
    assert_eq!(s, 200, "GET /metrics while draining: {body:?}");
    assert!(body.contains("agentcast_runs_running"), "{body}");
}

/// Polls /healthz (bounded) until the server says 503: the drain has begun.
async fn wait_for_drain(addr: SocketAddr) {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let (s, _) = http(addr, "GET", "/healthz", &[], "").await;
        if s == 503 {
            return;
        }
        assert_eq!(s, 200, "/healthz before the drain");
        assert!(
            tokio::time::Instant::now() < deadline,
            "/healthz never turned 503 after the stop"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_runs_then_cancels_the_rest_closes_1001_and_exits_0() {
    const DRAIN: Duration = Duration::from_secs(2);
    let mut cmd = serve_command(&["--drain-secs", "2"]);
    cmd.env("AGENTCAST_JWT_SECRET", SECRET);
    let mut child = ServeChild::spawn(cmd).await;
    let (addr, pid) = (child.addr, child.pid());

    let token = |user: &str| agentcast::auth::sign(SECRET, user, now_unix() + 3600);
    let connect = |user: &'static str| {
        let url = format!("ws://{addr}/v1/ws?token={}", token(user));
        async move {
            Client::try_connect(&url, None)
                .await
                .unwrap_or_else(|e| panic!("connecting as {user}: {}", describe_error(&e)))
        }
    };
    let mut c = connect("alice").await;
    let mut idle = connect("bob").await;

    let short = c
        .start_run("scripted", sleep_then_text(500, "short done"))
        .await;
    let long = c
        .start_run("scripted", sleep_then_text(60_000, "never"))
        .await;
    let mut log = Vec::new();
    for run in [&short, &long] {
        read_until_seen(&mut c, &mut log, "tool_executing", |f| {
            frame_type(f) == "tool_executing" && f["run_id"] == json!(run)
        })
        .await;
    }

    let sigterm_wall = now_micros();
    let sigterm = Instant::now();
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("running kill");
    assert!(kill.success(), "kill -TERM {pid} failed");

    wait_for_drain(addr).await;
    assert_refusing_new_requests(addr, &token("carol")).await;
    // A start over an open connection is refused too.
    let reply = c
        .request(json!({"type":"start_run","agent":"echo","input":"late"}))
        .await;
    assert_eq!(
        reply["type"],
        json!("error"),
        "start_run while draining: {reply}"
    );
    assert_eq!(
        reply["code"],
        json!("internal"),
        "start_run while draining: {reply}"
    );
    // Open connections are still served during the drain.
    idle.assert_alive().await;
    assert!(
        sigterm.elapsed() < Duration::from_millis(1500),
        "the drain checks took {:?}: too slow to be inside the 2 s drain",
        sigterm.elapsed()
    );

    // The short run finishes normally, after the SIGTERM.
    read_until_seen(
        &mut c,
        &mut log,
        "the short run's agent_completed",
        completed_of(&short),
    )
    .await;
    let short_events = run_events(&log, &short);
    assert_succeeded(&short_events);
    assert!(
        event_ts_micros(short_events.last().unwrap()) > sigterm_wall,
        "the short run ended before the SIGTERM: the test proves nothing"
    );
    // Connections stay open while a run is still running.
    idle.assert_alive().await;

    // The long one is cancelled when the drain time is up.
    read_until_seen(
        &mut c,
        &mut log,
        "the long run's agent_completed",
        completed_of(&long),
    )
    .await;
    let long_events = run_events(&log, &long);
    assert_cancelled_by_shutdown(&long_events);
    let cancelled_after = event_ts_micros(long_events.last().unwrap()) - sigterm_wall;
    assert!(
        cancelled_after >= DRAIN.as_micros() as i64 - 100_000,
        "the long run was cancelled {} ms after SIGTERM, before the {DRAIN:?} drain was up",
        cancelled_after / 1000
    );
    assert!(
        cancelled_after <= DRAIN.as_micros() as i64 + 3_000_000,
        "the long run was cancelled only {} ms after SIGTERM",
        cancelled_after / 1000
    );

    // Then every connection is closed with 1001, with no frame of any run after that.
    assert_eq!(
        c.expect_close().await,
        Some(1001),
        "alice's connection after the drain"
    );
    assert!(
        c.kept().iter().all(|f| f.get("seq").is_none()),
        "run events after the last run's end: {:?}",
        c.kept()
    );
    assert_eq!(
        idle.expect_close().await,
        Some(1001),
        "bob's idle connection after the drain"
    );
    drop(c);
    drop(idle);

    let status = tokio::time::timeout_at(
        (sigterm + DRAIN + Duration::from_secs(5)).into(),
        child.process.wait(),
    )
    .await
    .expect("agentcast serve did not exit within drain + 5 s of SIGTERM")
    .expect("waiting for agentcast serve");
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM: {status:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_with_drain_zero_cancels_running_runs_at_once() {
    let server = start(agentcast::Config {
        drain_secs: 0,
        ..test_config()
    });
    let addr = server.addr();
    let mut c = Client::connect(&server, "alice").await;
    let auth = format!("Bearer {}", server.token("alice"));
    let mut sse = Sse::open(addr, "/v1/events", &[("Authorization", auth.as_str())]).await;
    sse.welcome("alice").await;
    let run = c
        .start_run("scripted", sleep_then_text(60_000, "never"))
        .await;
    let run2 = c
        .start_run("scripted", sleep_then_text(500, "would fit a drain"))
        .await;
    let mut log = Vec::new();
    for r in [&run, &run2] {
        read_until_seen(&mut c, &mut log, "tool_executing", |f| {
            frame_type(f) == "tool_executing" && f["run_id"] == json!(r)
        })
        .await;
    }

    let t0 = Instant::now();
    let stopping = tokio::task::spawn_blocking(move || server.stop());
    for r in [&run, &run2] {
        read_until_seen(&mut c, &mut log, "agent_completed", completed_of(r)).await;
    }
    assert!(
        t0.elapsed() < Duration::from_millis(400),
        "with drain 0 the runs took {:?} to be cancelled",
        t0.elapsed()
    );
    let e1 = run_events(&log, &run);
    let e2 = run_events(&log, &run2);
    assert_cancelled_by_shutdown(&e1);
    assert_cancelled_by_shutdown(&e2);
    assert_eq!(c.expect_close().await, Some(1001));
    assert!(
        c.kept().iter().all(|f| f.get("seq").is_none()),
        "{:?}",
        c.kept()
    );

    // The SSE stream got the same events, then ended.
    let mut sse_events = Vec::new();
    while let Some(b) = sse.next_block().await {
        if !b.is_comment() {
            sse_events.push(b.data());
        }
    }
    let ws_events: Vec<Value> = log
        .iter()
        .filter(|f| f.get("seq").is_some())
        .cloned()
        .collect();
    assert_eq!(sse_events, ws_events, "the SSE stream before its end");

    tokio::time::timeout(TIMEOUT, stopping)
        .await
        .expect("RunningServer::stop() did not return in time")
        .expect("stop panicked");
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "still listening after stop()"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_lets_runs_finish_within_the_drain_and_refuses_new_requests() {
    let server = start(agentcast::Config {
        drain_secs: 2,
        ..test_config()
    });
    let addr = server.addr();
    let token = server.token("alice");
    let mut c = Client::connect(&server, "alice").await;
    let auth = format!("Bearer {token}");
    let mut sse = Sse::open(addr, "/v1/events", &[("Authorization", auth.as_str())]).await;
    sse.welcome("alice").await;
    let run = c
        .start_run("scripted", sleep_then_text(300, "made it"))
        .await;
    let mut log = Vec::new();
    read_until_seen(&mut c, &mut log, "tool_executing", |f| {
        frame_type(f) == "tool_executing"
    })
    .await;

    let stop_wall = now_micros();
    let t0 = Instant::now();
    let stopping = tokio::task::spawn_blocking(move || server.stop());
    wait_for_drain(addr).await;
    assert_refusing_new_requests(addr, &token).await;
    assert!(
        t0.elapsed() < Duration::from_millis(1500),
        "drain checks took {:?}",
        t0.elapsed()
    );

    read_until_seen(&mut c, &mut log, "agent_completed", completed_of(&run)).await;
    let events = run_events(&log, &run);
    assert_succeeded(&events);
    assert!(
        event_ts_micros(events.last().unwrap()) > stop_wall,
        "the run ended before stop(): the test proves nothing"
    );
    // Nothing left running: the server does not wait out the drain time.
    assert_eq!(c.expect_close().await, Some(1001));
    assert!(
        t0.elapsed() < Duration::from_millis(1500),
        "with no run left the connections were closed only {:?} after stop()",
        t0.elapsed()
    );
    let mut sse_events = Vec::new();
    while let Some(b) = sse.next_block().await {
        if !b.is_comment() {
            sse_events.push(b.data());
        }
    }
    assert_eq!(sse_events, events, "the SSE stream before its end");
    tokio::time::timeout(TIMEOUT, stopping)
        .await
        .expect("RunningServer::stop() did not return in time")
        .expect("stop panicked");
}
