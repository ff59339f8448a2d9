//! The runs API over plain HTTP (PROTOCOL.md §7): `POST /v1/runs`, `GET /v1/runs/{id}`,
//! `POST /v1/runs/{id}/cancel`, `GET /v1/agents`, with their error codes, checked against
//! what the user's WebSocket connections receive.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::common::*;
use serde_json::{json, Value};

/// One HTTP request, authenticated as `user` with a Bearer token when `user` is Some.
async fn api(
    server: &agentcast::RunningServer,
    method: &str,
    path: &str,
    user: Option<&str>,
    body: &str,
) -> HttpResponse {
    let auth = user.map(|u| bearer(server, u));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| vec![("Authorization", a)])
        .unwrap_or_default();
    http_full(server.addr(), method, path, &headers, body).await
}

async fn post_run(server: &agentcast::RunningServer, user: &str, body: Value) -> String {
    let r = api(server, "POST", "/v1/runs", Some(user), &body.to_string()).await;
    assert_eq!(
        r.status, 202,
        "POST /v1/runs {body}: status, body {:?}",
        r.body
    );
    assert_json_content_type(&r, "POST /v1/runs");
    let b = r.json();
    assert_keys(&b, &["run_id"]);
    let run_id = b["run_id"]
        .as_str()
        .unwrap_or_else(|| panic!("202 body without a string run_id: {b}"))
        .to_string();
    assert!(
        is_run_id(&run_id),
        "run_id {run_id:?} is not run_ + 22 base62"
    );
    run_id
}

async fn get_run(server: &agentcast::RunningServer, user: &str, run_id: &str) -> Value {
    let r = api(server, "GET", &format!("/v1/runs/{run_id}"), Some(user), "").await;
    assert_eq!(
        r.status, 200,
        "GET /v1/runs/{run_id}: status, body {:?}",
        r.body
    );
    assert_json_content_type(&r, "GET /v1/runs/{id}");
    let b = r.json();
    assert_keys(
        &b,
        &[
            "run_id",
            "agent",
            "thread_id",
            "status",
            "started_at",
            "ended_at",
            "duration_ms",
            "truncated",
            "events",
        ],
    );
    assert_eq!(b["run_id"], json!(run_id), "GET run_id: {b}");
    assert!(b["events"].is_array(), "events is not an array: {b}");
    b
}

fn assert_json_content_type(r: &HttpResponse, what: &str) {
    let ct = r.header("content-type").unwrap_or("");
    assert!(
        ct.starts_with("application/json"),
        "{what}: Content-Type {ct:?}, expected application/json"
    );
}

/// A JSON error `{code, message}` (plus any `extra` keys) with this status.
fn assert_error(r: &HttpResponse, status: u16, code: &str, what: &str) -> Value {
    assert_eq!(r.status, status, "{what}: status; body {:?}", r.body);
    assert_json_content_type(r, what);
    let b = r.json();
    assert_eq!(b["code"], json!(code), "{what}: code in {b}");
    assert!(
        b["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: error without a message: {b}"
    );
    b
}

fn events_of(b: &Value) -> Vec<Value> {
    b["events"].as_array().cloned().unwrap_or_default()
}

/// The run view's head after the run ended with `status`, consistent with its events.
fn assert_ended_view(view: &Value, status: &str, ws_events: &[Value]) {
    assert_eq!(view["status"], json!(status), "final status: {view}");
    let started = ts_micros(
        view["started_at"]
            .as_str()
            .unwrap_or_else(|| panic!("started_at: {view}")),
    );
    let ended = ts_micros(
        view["ended_at"]
            .as_str()
            .unwrap_or_else(|| panic!("ended_at must be set once ended: {view}")),
    );
    let duration = view["duration_ms"]
        .as_u64()
        .unwrap_or_else(|| panic!("duration_ms must be a whole number once ended: {view}"))
        as i64;
    assert!(ended >= started, "ended_at before started_at: {view}");
    let span_ms = (ended - started) / 1000;
    assert!(
        (duration - span_ms).abs() <= 1,
        "duration_ms {duration} is not ended_at - started_at ({span_ms} ms): {view}"
    );
    let last_ts = ts_micros(ws_events.last().unwrap()["ts"].as_str().unwrap());
    assert!(
        ended >= last_ts,
        "ended_at is before the run's agent_completed ts: {view} vs {}",
        ws_events.last().unwrap()
    );
    assert_eq!(view["truncated"], json!(false), "{view}");
    assert_eq!(
        events_of(view),
        ws_events,
        "GET /v1/runs/{{id}} events must be exactly the events the WebSocket received"
    );
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_lists_the_builtin_agents_and_tools() {
    let server = start(no_drain_config());
    let r = api(&server, "GET", "/v1/agents", Some("alice"), "").await;
    assert_eq!(r.status, 200, "GET /v1/agents: body {:?}", r.body);
    assert_json_content_type(&r, "GET /v1/agents");
    let b = r.json();
    assert_keys(&b, &["agents", "tools"]);
    let names = |key: &str| -> BTreeSet<String> {
        let list = b[key]
            .as_array()
            .unwrap_or_else(|| panic!("{key} is not an array: {b}"));
        // Agents describe their input, tools their args, each as a JSON Schema.
        let shape = if key == "agents" { "input" } else { "args" };
        for entry in list {
            assert_keys(entry, &["name", "description", shape]);
            assert!(
                entry[shape].is_object() || entry[shape] == true,
                "{key} entry without a schema: {entry}"
            );
            assert!(
                entry["description"]
                    .as_str()
                    .is_some_and(|d| !d.trim().is_empty()),
                "{key} entry without a description: {entry}"
            );
        }
        let set: BTreeSet<String> = list
            .iter()
            .map(|e| e["name"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(set.len(), list.len(), "duplicate names in {key}: {b}");
        set
    };
    let agents = names("agents");
    let tools = names("tools");
    for a in ["echo", "scripted"] {
        assert!(agents.contains(a), "agent {a} missing from {agents:?}");
    }
    for t in ["calculator", "clock", "sleep", "fail", "panic"] {
        assert!(tools.contains(t), "tool {t} missing from {tools:?}");
    }
    let echo = b["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "echo")
        .unwrap();
    assert_eq!(echo["input"], json!({"type": "string"}));
    let calc = b["tools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "calculator")
        .unwrap();
    assert_eq!(calc["args"]["required"], json!(["expr"]));

    // Every agent listed can actually be started (the list is not decoration).
    let mut c = Client::connect(&server, "alice").await;
    let unknown = c
        .request(json!({"type":"start_run","agent":"no-such-agent","input":"x"}))
        .await;
    assert_eq!(unknown["code"], json!("unknown_agent"), "{unknown}");
    for a in &agents {
        let input = if a == "scripted" {
            scripted(json!([{"text":"hi"}]))
        } else {
            json!("hi")
        };
        let reply = c
            .request(json!({"type":"start_run","agent":a,"input":input}))
            .await;
        assert_ne!(
            reply["code"],
            json!("unknown_agent"),
            "listed agent {a} is unknown: {reply}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_run_is_202_and_its_events_reach_only_the_owners_connections() {
    let server = start(no_drain_config());
    let mut alice1 = Client::connect(&server, "alice").await;
    let mut alice2 = Client::connect(&server, "alice").await;
    let mut bob = Client::connect(&server, "bob").await;

    let run_id = post_run(
        &server,
        "alice",
        json!({"agent":"echo","input":"hello over http, a longer text","thread_id":"th_http"}),
    )
    .await;

    let e1 = alice1.collect_run(&run_id).await;
    let e2 = alice2.collect_run(&run_id).await;
    assert_run_shape(&e1);
    assert_eq!(
        e1, e2,
        "two tabs of alice saw different events of the HTTP-started run"
    );
    assert_eq!(
        e1[0]["data"],
        json!({"agent":"echo","input":"hello over http, a longer text"}),
        "{}",
        e1[0]
    );
    for e in &e1 {
        assert_eq!(
            e["thread_id"],
            json!("th_http"),
            "thread_id given in the POST body: {e}"
        );
    }
    let seqs: Vec<u64> = e1.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs[0], 1, "alice's first event is seq 1: {seqs:?}");
    assert_contiguous(&seqs);
    let done = e1.last().unwrap();
    assert_eq!(done["data"]["status"], json!("succeeded"), "{done}");
    assert_eq!(
        done["data"]["result"],
        json!("hello over http, a longer text"),
        "{done}"
    );

    // bob got nothing of it: his own run (started after alice's ended) starts his seq line at 1
    // and is the first thing on his connection.
    let bob_run = post_run(&server, "bob", json!({"agent":"echo","input":"bob's"})).await;
    let first = bob.next_frame().await;
    assert_eq!(
        first["run_id"],
        json!(bob_run),
        "bob's first frame is not of his run: {first}"
    );
    assert_eq!(
        first["seq"],
        json!(1),
        "bob's seq line was touched by alice's run: {first}"
    );
    let be = bob.collect_run(&bob_run).await;
    assert_run_shape(&std::iter::once(first).chain(be).collect::<Vec<_>>());
    bob.assert_alive().await;
    assert!(
        bob.kept().iter().all(|f| f["run_id"] != json!(run_id)),
        "bob received a frame of alice's run: {:?}",
        bob.kept()
    );
    // And alice got nothing of bob's.
    alice1.assert_alive().await;
    assert!(
        alice1.kept().iter().all(|f| f["run_id"] != json!(bob_run)),
        "alice received a frame of bob's run: {:?}",
        alice1.kept()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_run_shows_running_then_the_final_status_with_the_websocket_events() {
    let server = start(no_drain_config());
    let mut c = Client::connect(&server, "alice").await;
    let steps = json!([
        {"think":"planning"},
        {"tool":"sleep","args":{"ms":400}},
        {"tool":"calculator","args":{"expr":"6*7"}},
        {"text":"forty-two"}
    ]);
    let run_id = post_run(
        &server,
        "alice",
        json!({"agent":"scripted","input":scripted(steps),"thread_id":"th_9"}),
    )
    .await;

    // While the sleep tool runs, the run is running.
    let executing = c.peek_of_type("tool_executing").await;
    assert_eq!(executing["data"]["tool"], json!("sleep"), "{executing}");
    assert_eq!(executing["run_id"], json!(run_id));
    let view = get_run(&server, "alice", &run_id).await;
    assert_eq!(
        view["status"],
        json!("running"),
        "status while the sleep tool runs: {view}"
    );
    assert_eq!(
        view["ended_at"],
        Value::Null,
        "ended_at while running: {view}"
    );
    assert_eq!(
        view["duration_ms"],
        Value::Null,
        "duration_ms while running: {view}"
    );
    assert_eq!(view["agent"], json!("scripted"), "{view}");
    assert_eq!(view["thread_id"], json!("th_9"), "{view}");
    assert_eq!(view["truncated"], json!(false), "{view}");
    ts_micros(
        view["started_at"]
            .as_str()
            .unwrap_or_else(|| panic!("started_at: {view}")),
    );
    let partial = events_of(&view);

    let ws_events = c.collect_run(&run_id).await;
    assert_run_shape(&ws_events);
    assert_eq!(
        ws_events.last().unwrap()["data"]["status"],
        json!("succeeded")
    );

    // What GET showed while running is a prefix of the run, reaching at least the
    // tool_executing the WebSocket had already received.
    assert!(
        partial.len() <= ws_events.len() && partial[..] == ws_events[..partial.len()],
        "events of the running run are not a prefix of the run's events:\n GET: {partial:?}\n WS: {ws_events:?}"
    );
    assert!(
        partial.contains(&executing),
        "GET while running lacks the tool_executing the WebSocket already had: {partial:?}"
    );
    assert!(
        partial.iter().all(|e| frame_type(e) != "agent_completed"),
        "status running but agent_completed already in events: {partial:?}"
    );

    let view = get_run(&server, "alice", &run_id).await;
    assert_ended_view(&view, "succeeded", &ws_events);
    assert_eq!(view["agent"], json!("scripted"));
    assert_eq!(view["thread_id"], json!("th_9"));
    let started = ts_micros(view["started_at"].as_str().unwrap());
    let first_ts = ts_micros(ws_events[0]["ts"].as_str().unwrap());
    assert!(
        started <= first_ts,
        "started_at {} is after the run's first event (agent_started ts {})",
        view["started_at"],
        ws_events[0]["ts"]
    );

    // A failed run reports failed, with its events.
    let failed = post_run(
        &server,
        "alice",
        json!({"agent":"scripted","input":scripted(json!([{"think":"x"},{"fail":"boom"}]))}),
    )
    .await;
    let fe = c.collect_run(&failed).await;
    assert_run_shape(&fe);
    let view = get_run(&server, "alice", &failed).await;
    assert_ended_view(&view, "failed", &fe);
    assert_eq!(view["thread_id"], Value::Null, "no thread_id given: {view}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_started_without_a_connection_is_inspectable_and_replayable() {
    let server = start(no_drain_config());
    let run_id = post_run(
        &server,
        "carol",
        json!({"agent":"echo","input":"nobody is watching","thread_id":null}),
    )
    .await;
    // No connection to synchronise on: poll the run's view (bounded) until it ends.
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let view = loop {
        let v = get_run(&server, "carol", &run_id).await;
        if v["status"] != json!("running") {
            break v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "run {run_id} still running after {TIMEOUT:?}: {v}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let events = events_of(&view);
    assert_run_shape(&events);
    assert_ended_view(&view, "succeeded", &events);
    assert_eq!(view["thread_id"], Value::Null);
    for e in &events {
        assert_eq!(e["thread_id"], Value::Null, "thread_id null: {e}");
    }

    // A connection that resumes from 0 replays exactly those events.
    let mut c = Client::connect_query(&server, "carol", "after_seq=0").await;
    let replayed = c.collect_run(&run_id).await;
    assert_eq!(
        replayed, events,
        "the WebSocket replay differs from GET /v1/runs/{{id}}"
    );
    let resumed = c.next_of_type("resumed").await;
    assert_eq!(resumed["from_seq"], json!(1));
    assert_eq!(resumed["to_seq"], json!(events.len()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_users_run_is_404_for_get_and_cancel_and_stays_untouched() {
    let server = start(no_drain_config());
    let mut alice = Client::connect(&server, "alice").await;
    let run_id = post_run(
        &server,
        "alice",
        json!({"agent":"scripted","input":scripted(json!([{"tool":"sleep","args":{"ms":500}},{"text":"fine"}]))}),
    )
    .await;
    alice.peek_of_type("tool_executing").await;

    let unknown = "run_0000000000000000000000";
    let mut bodies = Vec::new();
    for (method, path) in [
        ("GET", format!("/v1/runs/{run_id}")),
        ("POST", format!("/v1/runs/{run_id}/cancel")),
        ("GET", format!("/v1/runs/{unknown}")),
        ("POST", format!("/v1/runs/{unknown}/cancel")),
        ("GET", "/v1/runs/not-even-an-id".to_string()),
        ("POST", "/v1/runs/not-even-an-id/cancel".to_string()),
    ] {
        let r = api(&server, method, &path, Some("bob"), "").await;
        let b = assert_error(&r, 404, "run_not_found", &format!("bob: {method} {path}"));
        bodies.push(b);
    }
    // A run of someone else looks exactly like one that does not exist.
    assert_eq!(
        bodies[0], bodies[2],
        "GET: another user's run is distinguishable from an unknown one"
    );
    assert_eq!(
        bodies[1], bodies[3],
        "cancel: another user's run is distinguishable from an unknown one"
    );
    // Alice's own unknown run too.
    let r = api(
        &server,
        "GET",
        &format!("/v1/runs/{unknown}"),
        Some("alice"),
        "",
    )
    .await;
    assert_error(&r, 404, "run_not_found", "alice: GET unknown run");

    // bob's cancel did nothing: the run is still running and then succeeds.
    let view = get_run(&server, "alice", &run_id).await;
    assert_eq!(
        view["status"],
        json!("running"),
        "after bob's cancel attempt: {view}"
    );
    let events = alice.collect_run(&run_id).await;
    assert_run_shape(&events);
    let done = events.last().unwrap();
    assert_eq!(
        done["data"]["status"],
        json!("succeeded"),
        "bob's cancel affected alice's run: {done}"
    );
    assert!(
        events.iter().all(|e| e["data"]["ok"] != json!(false)),
        "a tool call of alice's run failed: {events:?}"
    );
    let view = get_run(&server, "alice", &run_id).await;
    assert_ended_view(&view, "succeeded", &events);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_over_http_ends_a_long_sleep_cancelled() {
    let server = start(no_drain_config());
    let mut c = Client::connect(&server, "alice").await;
    let run_id = post_run(
        &server,
        "alice",
        json!({"agent":"scripted","input":scripted(json!([{"think":"long"},{"tool":"sleep","args":{"ms":60000}},{"text":"never"}]))}),
    )
    .await;
    c.peek_of_type("tool_executing").await;

    let t0 = std::time::Instant::now();
    let r = api(
        &server,
        "POST",
        &format!("/v1/runs/{run_id}/cancel"),
        Some("alice"),
        "",
    )
    .await;
    assert_eq!(r.status, 202, "cancel: body {:?}", r.body);
    assert_json_content_type(&r, "POST /v1/runs/{id}/cancel");
    assert_eq!(r.json(), json!({"run_id": run_id}), "cancel body");

    let events = c.collect_run(&run_id).await;
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "the cancel took {:?}",
        t0.elapsed()
    );
    assert_run_shape(&events);
    let completed_tool = events
        .iter()
        .find(|e| frame_type(e) == "tool_completed")
        .unwrap_or_else(|| panic!("the open sleep call was not closed: {events:?}"));
    assert_eq!(
        completed_tool["data"]["ok"],
        json!(false),
        "{completed_tool}"
    );
    assert_eq!(
        completed_tool["data"]["error"]["code"],
        json!("cancelled"),
        "{completed_tool}"
    );
    let done = events.last().unwrap();
    assert_eq!(done["data"]["status"], json!("cancelled"), "{done}");
    assert_eq!(done["data"]["error"]["code"], json!("cancelled"), "{done}");
    assert!(
        events.iter().all(|e| frame_type(e) != "partial_result"),
        "the script went on after the cancel: {events:?}"
    );

    let view = get_run(&server, "alice", &run_id).await;
    assert_ended_view(&view, "cancelled", &events);

    // Cancelling a run that already ended is accepted and changes nothing.
    let r = api(
        &server,
        "POST",
        &format!("/v1/runs/{run_id}/cancel"),
        Some("alice"),
        "",
    )
    .await;
    assert_eq!(r.status, 202, "second cancel: body {:?}", r.body);
    assert_eq!(r.json(), json!({"run_id": run_id}));
    c.assert_alive().await;
    assert!(
        c.kept().iter().all(|f| f["run_id"] != json!(run_id)),
        "events after the run's agent_completed: {:?}",
        c.kept()
    );
    assert_eq!(
        get_run(&server, "alice", &run_id).await,
        view,
        "a second cancel changed the run"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_run_refuses_bad_bodies_with_the_right_code() {
    let server = start(no_drain_config());
    let mut c = Client::connect(&server, "alice").await;
    let long_thread = "t".repeat(129);
    let cases: Vec<(String, &str)> = vec![
        ("{not json".into(), "bad_json"),
        ("".into(), "bad_json"),
        ("[1,2]".into(), "bad_json"),
        ("\"echo\"".into(), "bad_json"),
        ("null".into(), "bad_json"),
        (json!({"input":"x"}).to_string(), "invalid_field"),
        (json!({"agent":5,"input":"x"}).to_string(), "invalid_field"),
        (
            json!({"agent":null,"input":"x"}).to_string(),
            "invalid_field",
        ),
        (json!({"agent":"echo"}).to_string(), "invalid_field"),
        (
            json!({"agent":"echo","input":"x","thread_id":""}).to_string(),
            "invalid_field",
        ),
        (
            json!({"agent":"echo","input":"x","thread_id":long_thread}).to_string(),
            "invalid_field",
        ),
        (
            json!({"agent":"echo","input":"x","thread_id":7}).to_string(),
            "invalid_field",
        ),
        (
            json!({"agent":"echo","input":{"not":"a string"}}).to_string(),
            "invalid_field",
        ),
        (
            json!({"agent":"scripted","input":"no steps"}).to_string(),
            "invalid_field",
        ),
        (
            json!({"agent":"scripted","input":{"steps":[{"tool":"no-such-tool"}]}}).to_string(),
            "invalid_field",
        ),
        (
            json!({"agent":"scripted","input":{"steps":[{"dance":true}]}}).to_string(),
            "invalid_field",
        ),
        (
            json!({"agent":"no-such-agent","input":"x"}).to_string(),
            "unknown_agent",
        ),
        (json!({"agent":"","input":"x"}).to_string(), "unknown_agent"),
    ];
    for (body, code) in &cases {
        let r = api(&server, "POST", "/v1/runs", Some("alice"), body).await;
        assert_error(&r, 400, code, &format!("POST /v1/runs {body:?}"));
    }
    // None of them started anything.
    c.assert_alive().await;
    assert!(
        c.kept().is_empty(),
        "refused POSTs produced frames: {:?}",
        c.kept()
    );

    // The boundaries that are fine: a 128-character thread_id, a null one, extra fields.
    let max_thread = "t".repeat(128);
    let run_id = post_run(
        &server,
        "alice",
        json!({"agent":"echo","input":"x","thread_id":max_thread}),
    )
    .await;
    let ev = c.collect_run(&run_id).await;
    assert_eq!(ev[0]["thread_id"], json!(max_thread));
    assert_eq!(
        ev[0]["seq"],
        json!(1),
        "a refused POST consumed a seq: {}",
        ev[0]
    );
    let run_id = post_run(
        &server,
        "alice",
        json!({"agent":"echo","input":"y","thread_id":null,"request_id":"r1"}),
    )
    .await;
    let ev = c.collect_run(&run_id).await;
    assert_eq!(ev[0]["thread_id"], Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_running_runs_is_429() {
    let server = start(agentcast::Config {
        max_runs_per_user: 2,
        ..no_drain_config()
    });
    let mut c = Client::connect(&server, "alice").await;
    let long =
        json!({"agent":"scripted","input":scripted(json!([{"tool":"sleep","args":{"ms":60000}}]))});
    let r1 = post_run(&server, "alice", long.clone()).await;
    let _r2 = post_run(&server, "alice", long.clone()).await;
    let r = api(
        &server,
        "POST",
        "/v1/runs",
        Some("alice"),
        &long.to_string(),
    )
    .await;
    assert_error(&r, 429, "too_many_runs", "third running run");
    // Over the WebSocket too: the limit is the user's, whatever started the runs.
    let reply = c
        .request(json!({"type":"start_run","agent":"echo","input":"x"}))
        .await;
    assert_eq!(reply["type"], json!("error"), "{reply}");
    assert_eq!(reply["code"], json!("too_many_runs"), "{reply}");
    // Another user is not limited by alice's runs.
    post_run(&server, "bob", json!({"agent":"echo","input":"bob"})).await;

    // When one ends, there is room again.
    let r = api(
        &server,
        "POST",
        &format!("/v1/runs/{r1}/cancel"),
        Some("alice"),
        "",
    )
    .await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    let ev = c.collect_run(&r1).await;
    assert_eq!(ev.last().unwrap()["data"]["status"], json!("cancelled"));
    let r3 = post_run(
        &server,
        "alice",
        json!({"agent":"echo","input":"room again"}),
    )
    .await;
    let ev = c.collect_run(&r3).await;
    assert_eq!(ev.last().unwrap()["data"]["status"], json!("succeeded"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_starts_over_the_rate_are_429_rate_limited_with_retry_after() {
    let server = start(agentcast::Config {
        runs_per_minute: 2,
        ..no_drain_config()
    });
    let body = json!({"agent":"echo","input":"x"}).to_string();
    for i in 0..2 {
        let r = api(&server, "POST", "/v1/runs", Some("alice"), &body).await;
        assert_eq!(r.status, 202, "start {i} within the rate: {:?}", r.body);
    }
    let r = api(&server, "POST", "/v1/runs", Some("alice"), &body).await;
    let b = assert_error(
        &r,
        429,
        "rate_limited",
        "third start within a minute at 2/min",
    );
    let retry_ms = b["retry_after_ms"]
        .as_u64()
        .unwrap_or_else(|| panic!("rate_limited without an integer retry_after_ms: {b}"));
    assert!(
        retry_ms > 0 && retry_ms <= 30_001,
        "retry_after_ms {retry_ms}: at 2 runs a minute a start is back within 30 s"
    );
    let header = r
        .header("retry-after")
        .unwrap_or_else(|| panic!("429 rate_limited without Retry-After: {:?}", r.headers));
    let secs: u64 = header
        .parse()
        .unwrap_or_else(|_| panic!("Retry-After {header:?} is not a whole number of seconds"));
    assert_eq!(
        secs,
        retry_ms.div_ceil(1000),
        "Retry-After {secs} vs retry_after_ms {retry_ms}"
    );
    // Another user has a budget of their own.
    let r = api(&server, "POST", "/v1/runs", Some("bob"), &body).await;
    assert_eq!(
        r.status, 202,
        "bob is limited by alice's starts: {:?}",
        r.body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_a_valid_token_are_401() {
    let server = start(no_drain_config());
    // A real run, so that 401s for it are not 404s in disguise.
    let mut c = Client::connect(&server, "alice").await;
    let run_id = post_run(&server, "alice", json!({"agent":"echo","input":"x"})).await;
    c.collect_run(&run_id).await;

    let expired = agentcast::auth::sign(SECRET, "alice", now_unix() - 60);
    let forged = agentcast::auth::sign("not-the-secret", "alice", now_unix() + 3600);
    let good = server.token("alice");
    let auths: Vec<Option<String>> = vec![
        None,
        Some("Bearer".into()),
        Some("Bearer ".into()),
        Some("Bearer garbage".into()),
        Some(format!("Bearer {expired}")),
        Some(format!("Bearer {forged}")),
        Some(format!("Basic {good}")),
        Some(good.clone()),
    ];
    let body = json!({"agent":"echo","input":"x"}).to_string();
    let routes = [
        ("GET", "/v1/agents".to_string(), ""),
        ("POST", "/v1/runs".to_string(), body.as_str()),
        ("GET", format!("/v1/runs/{run_id}"), ""),
        ("POST", format!("/v1/runs/{run_id}/cancel"), ""),
        ("GET", "/v1/events".to_string(), ""),
    ];
    for (method, path, body) in &routes {
        for auth in &auths {
            let headers: Vec<(&str, &str)> = auth
                .as_deref()
                .map(|a| vec![("Authorization", a)])
                .unwrap_or_default();
            let r = http_full(server.addr(), method, path, &headers, body).await;
            let what = format!("{method} {path} with Authorization {auth:?}");
            assert_error(&r, 401, "unauthorized", &what);
            let www = r
                .header("www-authenticate")
                .unwrap_or_else(|| panic!("{what}: no WWW-Authenticate"));
            assert!(
                www.starts_with("Bearer"),
                "{what}: WWW-Authenticate {www:?}"
            );
        }
    }
    // Nothing was started or cancelled by any of them.
    c.assert_alive().await;
    assert!(
        c.kept().is_empty(),
        "refused requests produced frames: {:?}",
        c.kept()
    );
    assert_eq!(
        get_run(&server, "alice", &run_id).await["status"],
        json!("succeeded")
    );
}

/// Many very short runs: for every one, `started_at` is no later than its first event, `ended_at`
/// is its `agent_completed` time or later, and an ended run always has a `duration_ms`. (A run can
/// emit all its events within microseconds of being started: the times must still line up.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_runs_have_consistent_started_at_ended_at_and_duration() {
    let server = start(no_drain_config());
    let mut c = Client::connect(&server, "alice").await;
    for i in 0..40 {
        let input = if i % 2 == 0 {
            json!({"agent":"echo","input":"x"})
        } else {
            json!({"agent":"scripted","input":scripted(json!([{"fail":"quick"}]))})
        };
        let run_id = post_run(&server, "alice", input).await;
        let events = c.collect_run(&run_id).await;
        let view = get_run(&server, "alice", &run_id).await;
        let started = ts_micros(
            view["started_at"]
                .as_str()
                .unwrap_or_else(|| panic!("started_at: {view}")),
        );
        let first = ts_micros(events[0]["ts"].as_str().unwrap());
        assert!(
            started <= first,
            "run {i}: started_at {} is after its agent_started ts {}",
            view["started_at"],
            events[0]["ts"]
        );
        let status = events.last().unwrap()["data"]["status"]
            .as_str()
            .unwrap()
            .to_string();
        assert_ended_view(&view, &status, &events);
    }
}
