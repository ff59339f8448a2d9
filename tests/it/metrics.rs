//! `GET /metrics` (PROTOCOL.md §7): Prometheus text, no auth. Each test runs on a fresh server
//! and checks that the counters and gauges move by exactly what the test did.

use std::collections::BTreeMap;

use crate::common::*;
use serde_json::{json, Value};

const TYPES: [&str; 7] = [
    "agent_started",
    "agent_thinking",
    "partial_result",
    "tool_executing",
    "tool_progress",
    "tool_completed",
    "agent_completed",
];

fn emitted(t: &str) -> String {
    format!("agentcast_events_emitted_total{{type=\"{t}\"}}")
}

fn delivered(t: &str) -> String {
    format!("agentcast_events_delivered_total{{type=\"{t}\"}}")
}

fn ended(status: &str) -> String {
    format!("agentcast_runs_ended_total{{status=\"{status}\"}}")
}

fn auth_failures(reason: &str) -> String {
    format!("agentcast_auth_failures_total{{reason=\"{reason}\"}}")
}

/// Counts of events by type.
fn by_type(events: &[Value]) -> BTreeMap<String, f64> {
    let mut m: BTreeMap<String, f64> = TYPES.iter().map(|t| (t.to_string(), 0.0)).collect();
    for e in events {
        *m.get_mut(e["type"].as_str().unwrap())
            .expect("known event type") += 1.0;
    }
    m
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_server_exposes_every_metric_at_zero_without_auth() {
    let server = start(no_drain_config());
    let s = scrape(server.addr()).await;
    for (name, kind) in [
        ("agentcast_connections", "gauge"),
        ("agentcast_users", "gauge"),
        ("agentcast_runs_running", "gauge"),
        ("agentcast_runs_started_total", "counter"),
        ("agentcast_events_emitted_total", "counter"),
        ("agentcast_events_delivered_total", "counter"),
        ("agentcast_slow_consumer_closes_total", "counter"),
        ("agentcast_resume_replayed_total", "counter"),
        ("agentcast_resume_gaps_total", "counter"),
        ("agentcast_outbound_queue_depth_max", "gauge"),
        ("agentcast_outbound_queue_depth_sum", "gauge"),
        ("agentcast_delivery_latency_seconds", "histogram"),
    ] {
        assert!(
            s.text.contains(&format!("# TYPE {name} {kind}\n")),
            "no `# TYPE {name} {kind}` in:\n{}",
            s.text
        );
        assert!(
            s.text.contains(&format!("# HELP {name} ")),
            "no HELP for {name}"
        );
    }
    for key in [
        "agentcast_connections",
        "agentcast_users",
        "agentcast_runs_running",
        "agentcast_runs_started_total",
        "agentcast_slow_consumer_closes_total",
        "agentcast_resume_replayed_total",
        "agentcast_resume_gaps_total",
        "agentcast_outbound_queue_depth_max",
        "agentcast_outbound_queue_depth_sum",
        "agentcast_delivery_latency_seconds_count",
    ] {
        assert!(s.has(key), "{key} missing:\n{}", s.text);
        assert_eq!(s.get(key), 0.0, "{key} on a fresh server");
    }
    for t in TYPES {
        assert!(
            s.has(&emitted(t)) && s.has(&delivered(t)),
            "events of type {t} not exposed:\n{}",
            s.text
        );
        assert_eq!(s.get(&emitted(t)), 0.0);
        assert_eq!(s.get(&delivered(t)), 0.0);
    }
    // Scraping is not an authenticated request: nothing was refused.
    assert!(
        !s.text.contains("agentcast_auth_failures_total{"),
        "{}",
        s.text
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_moves_the_counters_by_exactly_its_events() {
    let server = start(no_drain_config());
    let addr = server.addr();
    let mut tab1 = Client::connect(&server, "alice").await;
    let mut tab2 = Client::connect(&server, "alice").await;
    // A run of a known shape: started, thinking, partial, executing, completed, completed.
    let run_id = tab1
        .start_run(
            "scripted",
            scripted(
                json!([{"think":"t"},{"text":"x"},{"tool":"calculator","args":{"expr":"1+2"}}]),
            ),
        )
        .await;
    let e1 = tab1.collect_run(&run_id).await;
    let e2 = tab2.collect_run(&run_id).await;
    assert_eq!(e1, e2);
    assert_eq!(e1.len(), 6, "the run's events: {e1:?}");
    let counts = by_type(&e1);

    let s = scrape(addr).await;
    assert_eq!(s.get("agentcast_runs_started_total"), 1.0);
    assert_eq!(s.get(&ended("succeeded")), 1.0, "{}", s.text);
    for status in ["failed", "cancelled", "timed_out"] {
        assert_eq!(s.get(&ended(status)), 0.0, "runs_ended {status}");
    }
    assert_eq!(s.get("agentcast_runs_running"), 0.0);
    for t in TYPES {
        assert_eq!(s.get(&emitted(t)), counts[t], "events_emitted {t}");
        assert_eq!(
            s.get(&delivered(t)),
            2.0 * counts[t],
            "events_delivered {t} with 2 tabs"
        );
    }
    assert_eq!(
        s.get("agentcast_delivery_latency_seconds_count"),
        12.0,
        "one latency per delivery"
    );
    assert!(s.get("agentcast_delivery_latency_seconds_sum") > 0.0);
    assert!(
        s.get("agentcast_delivery_latency_seconds_sum") < 12.0,
        "12 local deliveries took over a second each on average?"
    );
    assert_eq!(s.get("agentcast_connections"), 2.0);
    assert_eq!(s.get("agentcast_users"), 1.0);
    // Both tabs have read everything: nothing is queued.
    assert_eq!(s.get("agentcast_outbound_queue_depth_max"), 0.0);
    assert_eq!(s.get("agentcast_outbound_queue_depth_sum"), 0.0);

    // An SSE stream is a third connection: each event is delivered three times now. The sleep
    // tool reports progress (100 ms: 2 reports).
    let mut sse = open_sse(&server, "alice").await;
    let run2 = tab1
        .start_run(
            "scripted",
            scripted(json!([{"tool":"sleep","args":{"ms":100}},{"text":"done"}])),
        )
        .await;
    let r2 = tab1.collect_run(&run2).await;
    tab2.collect_run(&run2).await;
    for _ in &r2 {
        sse.next_event().await;
    }
    let counts2 = by_type(&r2);
    assert_eq!(counts2["tool_progress"], 2.0, "{r2:?}");
    let s = scrape(addr).await;
    assert_eq!(s.get("agentcast_runs_started_total"), 2.0);
    assert_eq!(s.get(&ended("succeeded")), 2.0);
    for t in TYPES {
        assert_eq!(
            s.get(&emitted(t)),
            counts[t] + counts2[t],
            "events_emitted {t}"
        );
        assert_eq!(
            s.get(&delivered(t)),
            2.0 * counts[t] + 3.0 * counts2[t],
            "events_delivered {t}"
        );
    }
    let total_delivered: f64 = TYPES.iter().map(|t| s.get(&delivered(t))).sum();
    assert_eq!(
        s.get("agentcast_delivery_latency_seconds_count"),
        total_delivered
    );
    assert_eq!(s.get("agentcast_connections"), 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_gauge_and_runs_ended_by_status() {
    let server = start(no_drain_config());
    let addr = server.addr();
    let mut c = Client::connect(&server, "alice").await;
    let long = c
        .start_run(
            "scripted",
            scripted(json!([{"tool":"sleep","args":{"ms":60000}}])),
        )
        .await;
    c.peek_of_type("tool_executing").await;
    let s = scrape(addr).await;
    assert_eq!(s.get("agentcast_runs_running"), 1.0);
    assert_eq!(s.get("agentcast_runs_started_total"), 1.0);
    assert_eq!(s.get(&ended("cancelled")), 0.0);

    let ack = c.request(json!({"type":"cancel_run","run_id":long})).await;
    assert_eq!(ack["type"], json!("ack"), "{ack}");
    c.collect_run(&long).await;
    let failed = c
        .start_run("scripted", scripted(json!([{"fail":"no"}])))
        .await;
    c.collect_run(&failed).await;
    // Refused starts are not runs.
    let refused = c
        .request(json!({"type":"start_run","agent":"nope","input":"x"}))
        .await;
    assert_eq!(refused["type"], json!("error"));

    let s = scrape(addr).await;
    assert_eq!(s.get("agentcast_runs_running"), 0.0);
    assert_eq!(s.get("agentcast_runs_started_total"), 2.0);
    assert_eq!(s.get(&ended("cancelled")), 1.0);
    assert_eq!(s.get(&ended("failed")), 1.0);
    assert_eq!(s.get(&ended("succeeded")), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_failures_are_counted_by_reason() {
    let server = start(no_drain_config());
    let addr = server.addr();
    // Successes count nothing.
    let ok = format!("Bearer {}", server.token("alice"));
    assert_eq!(
        http(addr, "GET", "/v1/agents", &[("Authorization", &ok)], "")
            .await
            .0,
        200
    );
    let _c = Client::connect(&server, "alice").await;

    // missing: 2 (HTTP and WebSocket)
    assert_eq!(http(addr, "GET", "/v1/agents", &[], "").await.0, 401);
    assert_eq!(http(addr, "GET", "/v1/ws", &[], "").await.0, 401);
    // invalid: 3 (garbage, wrong secret, over the WebSocket query)
    assert_eq!(
        http(
            addr,
            "GET",
            "/v1/agents",
            &[("Authorization", "Bearer garbage")],
            ""
        )
        .await
        .0,
        401
    );
    let forged = format!(
        "Bearer {}",
        agentcast::auth::sign("wrong", "alice", now_unix() + 60)
    );
    assert_eq!(
        http(
            addr,
            "POST",
            "/v1/runs",
            &[("Authorization", &forged)],
            "{}"
        )
        .await
        .0,
        401
    );
    let e = Client::try_connect(&format!("{}?token=x.y.z", server.ws_url()), None)
        .await
        .err()
        .expect("refused");
    assert_eq!(http_status(&e), Some(401));
    // expired: 1 (SSE)
    let expired = agentcast::auth::sign(SECRET, "alice", now_unix() - 60);
    assert_eq!(
        http(addr, "GET", &format!("/v1/events?token={expired}"), &[], "")
            .await
            .0,
        401
    );
    // bad_subject: 1
    let bad_sub = sign_claims(SECRET, &json!({"sub":"a\u{7}b","exp":now_unix() + 60}));
    assert_eq!(
        http(
            addr,
            "GET",
            "/v1/runs/run_x",
            &[("Authorization", &format!("Bearer {bad_sub}"))],
            ""
        )
        .await
        .0,
        401
    );

    let s = scrape(addr).await;
    assert_eq!(s.get(&auth_failures("missing")), 2.0, "{}", s.text);
    assert_eq!(s.get(&auth_failures("invalid")), 3.0, "{}", s.text);
    assert_eq!(s.get(&auth_failures("expired")), 1.0, "{}", s.text);
    assert_eq!(s.get(&auth_failures("bad_subject")), 1.0, "{}", s.text);
    let all: f64 = s
        .samples
        .iter()
        .filter(|(k, _)| k.starts_with("agentcast_auth_failures_total{"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(all, 7.0, "auth failures in total: {}", s.text);
    // /healthz and /metrics are not authenticated and count nothing.
    assert_eq!(http(addr, "GET", "/healthz", &[], "").await.0, 200);
    let s2 = scrape(addr).await;
    assert_eq!(
        s2.samples
            .iter()
            .filter(|(k, _)| k.starts_with("agentcast_auth_failures_total{"))
            .map(|(_, v)| v)
            .sum::<f64>(),
        7.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_gauge_equals_open_connections() {
    // Heartbeats every 200 ms so that a vanished SSE client is noticed at the next write.
    let server = start(agentcast::Config {
        heartbeat_interval_ms: 200,
        ..no_drain_config()
    });
    let addr = server.addr();
    let s = scrape(addr).await;
    assert_eq!(s.get("agentcast_connections"), 0.0);
    assert_eq!(s.get("agentcast_users"), 0.0);

    let a1 = Client::connect(&server, "alice").await;
    let a2 = Client::connect(&server, "alice").await;
    let b1 = Client::connect(&server, "bob").await;
    let sse = open_sse(&server, "alice").await;
    // Refused attempts are not connections.
    assert_eq!(http(addr, "GET", "/v1/ws", &[], "").await.0, 401);
    assert_eq!(http(addr, "GET", "/v1/events", &[], "").await.0, 401);
    let s = scrape(addr).await;
    assert_eq!(
        s.get("agentcast_connections"),
        4.0,
        "2 + 1 WebSockets and 1 SSE stream are open"
    );
    assert_eq!(s.get("agentcast_users"), 2.0);

    // A clean close.
    a1.close().await;
    let s = wait_metric(addr, "agentcast_connections", 3.0).await;
    assert_eq!(
        s.get("agentcast_users"),
        2.0,
        "users are kept (for resume) after a disconnect"
    );
    // An SSE client that goes away.
    drop(sse);
    wait_metric(addr, "agentcast_connections", 2.0).await;
    // A WebSocket client that vanishes without a close frame.
    drop(b1);
    wait_metric(addr, "agentcast_connections", 1.0).await;
    // The one left is really the one open: it still works.
    let mut a2 = a2;
    a2.assert_alive().await;
    let s = scrape(addr).await;
    assert_eq!(s.get("agentcast_connections"), 1.0);
}

/// With the default heartbeat (10 s), an SSE client that closes its TCP connection must stop
/// counting as an open connection promptly, as a WebSocket client does: the server can see the
/// end of the connection without waiting for its next writes to fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_sse_stream_stops_counting_promptly() {
    let server = start(no_drain_config());
    let addr = server.addr();
    let ws = Client::connect(&server, "alice").await;
    let sse = open_sse(&server, "alice").await;
    assert_eq!(scrape(addr).await.get("agentcast_connections"), 2.0);
    // The WebSocket twin: gone within the bound.
    drop(ws);
    wait_metric_within(
        addr,
        "agentcast_connections",
        1.0,
        std::time::Duration::from_secs(3),
    )
    .await;
    drop(sse);
    wait_metric_within(
        addr,
        "agentcast_connections",
        0.0,
        std::time::Duration::from_secs(3),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_replays_and_gaps_are_counted() {
    let server = start(agentcast::Config {
        replay_capacity: 2,
        ..no_drain_config()
    });
    let addr = server.addr();
    let mut c = Client::connect(&server, "alice").await;
    let run = c
        .start_run(
            "scripted",
            scripted(json!([{"think":"t"},{"text":"x"},{"tool":"clock"}])),
        )
        .await;
    let events = c.collect_run(&run).await;
    assert_eq!(events.len(), 6);
    let s = scrape(addr).await;
    assert_eq!(s.get("agentcast_resume_gaps_total"), 0.0);
    assert_eq!(s.get("agentcast_resume_replayed_total"), 0.0);

    // At connect, from 1: only 5 and 6 are buffered: a gap.
    let mut g = Client::connect_query(&server, "alice", "after_seq=1").await;
    let err = g.next_of_type("error").await;
    assert_eq!(err["code"], json!("resume_gap"), "{err}");
    let s = scrape(addr).await;
    assert_eq!(s.get("agentcast_resume_gaps_total"), 1.0);
    assert_eq!(s.get("agentcast_resume_replayed_total"), 0.0);

    // At connect, from 4: replayed.
    let mut r = Client::connect_query(&server, "alice", "after_seq=4").await;
    let resumed = r.next_of_type("resumed").await;
    assert_eq!(resumed["from_seq"], json!(5), "{resumed}");
    let s = scrape(addr).await;
    assert_eq!(s.get("agentcast_resume_gaps_total"), 1.0);
    assert_eq!(s.get("agentcast_resume_replayed_total"), 1.0);

    // SSE from 0: a gap. The resume command on an open connection: a gap, then a replay.
    let mut sse = {
        let auth = format!("Bearer {}", server.token("alice"));
        Sse::open(
            addr,
            "/v1/events",
            &[("Authorization", auth.as_str()), ("Last-Event-ID", "0")],
        )
        .await
    };
    sse.welcome("alice").await;
    let b = sse.next_event().await;
    assert_eq!(b.data()["code"], json!("resume_gap"), "{b:?}");
    // (A connection opened now has 1..6 before it: the resume command covers those.)
    let mut fresh = Client::connect(&server, "alice").await;
    assert_eq!(fresh.welcome()["last_seq"], json!(6));
    let reply = fresh.request(json!({"type":"resume","after_seq":2})).await;
    assert_eq!(reply["code"], json!("resume_gap"), "{reply}");
    fresh
        .send_json(json!({"type":"resume","after_seq":4}))
        .await;
    let resumed = fresh.next_of_type("resumed").await;
    assert_eq!(resumed, json!({"type":"resumed","from_seq":5,"to_seq":6}));
    let s = scrape(addr).await;
    assert_eq!(s.get("agentcast_resume_gaps_total"), 3.0);
    assert_eq!(s.get("agentcast_resume_replayed_total"), 2.0);

    // Plain connects are neither.
    let _plain = Client::connect(&server, "alice").await;
    let s = scrape(addr).await;
    assert_eq!(s.get("agentcast_resume_gaps_total"), 3.0);
    assert_eq!(s.get("agentcast_resume_replayed_total"), 2.0);
}
