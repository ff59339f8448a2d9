//! Faults inside runs (PROTOCOL.md §2, §8, docs/protocol-notes.md "Runs and events"): failing
//! and panicking tools and agents, cancel, timeout, and the per-user run limit. Every run still
//! ends with exactly one agent_completed, nothing of a run follows it, and other runs and
//! users are not disturbed.

use crate::common::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// Local helpers (the shared shape checks per PROTOCOL.md §2 are in common/shape.rs)
// ---------------------------------------------------------------------------------------------

/// Reads frames until an event of `run_id` with type `ty`; returns every frame read, the
/// matching one last.
async fn read_until_event(c: &mut Client, run_id: &str, ty: &str) -> Vec<Value> {
    let mut out = Vec::new();
    loop {
        let f = c.next_frame().await;
        let hit = f["run_id"] == run_id && f["type"] == ty;
        out.push(f);
        if hit {
            return out;
        }
    }
}

fn of_run(frames: &[Value], run_id: &str) -> Vec<Value> {
    frames
        .iter()
        .filter(|f| f["run_id"] == run_id)
        .cloned()
        .collect()
}

fn completed_of(events: &[Value]) -> Vec<Value> {
    events
        .iter()
        .filter(|e| e["type"] == "tool_completed")
        .cloned()
        .collect()
}

fn assert_error_frame(f: &Value, code: &str) {
    assert_keys(f, &["type", "request_id", "code", "message"]);
    assert_eq!(f["type"], "error", "{f}");
    assert_eq!(f["code"], code, "{f}");
    assert!(f["message"].is_string(), "{f}");
}

fn assert_ack(f: &Value, run_id: &str) {
    assert_keys(f, &["type", "request_id", "run_id"]);
    assert_eq!(f["type"], "ack", "{f}");
    assert_eq!(f["run_id"], run_id, "{f}");
}

fn sleep_run(ms: u64, tail: &str) -> Value {
    scripted(json!([{"tool":"sleep","args":{"ms":ms}}, {"text": tail}]))
}

/// How long a run that must still be going during a test's other steps sleeps: those steps
/// take milliseconds, so 3 s is a wide margin, and [`assert_still_running`] checks it held
/// (so a slow machine fails the test instead of letting it pass without testing anything).
const IN_FLIGHT_MS: u64 = 3000;

/// `GET /v1/runs/{id}` as `user`: the run has not ended yet.
async fn assert_still_running(server: &agentcast::RunningServer, user: &str, run: &str) {
    let auth = bearer(server, user);
    let (status, body) = http(
        server.addr(),
        "GET",
        &format!("/v1/runs/{run}"),
        &[("Authorization", auth.as_str())],
        "",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let view: Value = serde_json::from_str(&body).expect("run view is JSON");
    assert_eq!(
        view["status"], "running",
        "the run meant to be in flight had already ended: the machine is too slow for \
         IN_FLIGHT_MS, nothing was tested"
    );
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// Tool `fail`: tool_completed ok:false, error.code tool_failed; the run continues and succeeds.
#[tokio::test]
async fn failing_tool_is_reported_and_run_continues() {
    let server = start(test_config());
    let mut c = Client::connect(&server, "u").await;
    let run = c
        .start_run(
            "scripted",
            scripted(json!([
                {"text":"before"},
                {"tool":"fail","args":{}},
                {"text":"after"}
            ])),
        )
        .await;
    let events = c.collect_run(&run).await;
    check_run(&events, &run, None);
    assert_contiguous(&seqs(&events));
    let t = types(&events);
    assert_eq!(
        t,
        [
            "agent_started",
            "partial_result",
            "tool_executing",
            "tool_completed",
            "partial_result",
            "agent_completed"
        ]
    );
    let tc = &events[3]["data"];
    assert_eq!(tc["tool"], "fail");
    assert_eq!(tc["ok"], false, "{tc}");
    assert_eq!(tc["error"]["code"], "tool_failed", "{tc}");
    assert_eq!(tc["tool_call_id"], events[2]["data"]["tool_call_id"]);
    assert_eq!(events[4]["data"]["text"], "after");
    let done = &events[5]["data"];
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["result"], "after");
    assert_eq!(done["usage"], json!({"tool_calls":1}));
}

/// Tool `panic`: tool_completed ok:false tool_panicked, the run goes on and succeeds; runs with
/// a sleep tool in flight at the same time (same user, another user) are not disturbed: they
/// are still running after it, and end only when cancelled, as any run does; the panicking
/// executor is restarted: panic again works the same, and calculator works after.
#[tokio::test]
async fn panicking_tool_is_contained_and_restarted() {
    let server = start(test_config());
    let mut u = Client::connect(&server, "u").await;
    let mut v = Client::connect(&server, "v").await;

    // Sleeps far longer than the test: in flight for the whole panic, until cancelled below.
    let run_us = u.start_run("scripted", sleep_run(600_000, "u slept")).await;
    let run_vs = v.start_run("scripted", sleep_run(600_000, "v slept")).await;
    let mut u_frames = read_until_event(&mut u, &run_us, "tool_executing").await;
    let v_head = read_until_event(&mut v, &run_vs, "tool_executing").await;

    let run_p = u
        .start_run(
            "scripted",
            scripted(json!([
                {"text":"before"},
                {"tool":"panic","args":{}},
                {"text":"after panic"}
            ])),
        )
        .await;
    u_frames.extend(read_until_event(&mut u, &run_p, "agent_completed").await);
    let p = of_run(&u_frames, &run_p);
    check_run(&p, &run_p, None);
    let tc = completed_of(&p);
    assert_eq!(tc.len(), 1);
    assert_eq!(tc[0]["data"]["tool"], "panic");
    assert_eq!(tc[0]["data"]["ok"], false, "{}", tc[0]);
    assert_eq!(tc[0]["data"]["error"]["code"], "tool_panicked", "{}", tc[0]);
    let done = &p.last().unwrap()["data"];
    assert_eq!(
        done["status"], "succeeded",
        "the run continues after a tool panic: {done}"
    );
    assert_eq!(done["result"], "after panic");
    assert_eq!(done["usage"], json!({"tool_calls":1}));
    let panic_ts = tc[0]["ts"].as_str().unwrap().to_string();
    assert!(
        !of_run(&u_frames, &run_us)
            .iter()
            .any(|e| e["type"] == "tool_completed"),
        "the sleep is still running after the panic"
    );

    // The concurrent sleeps were not disturbed: still running, they end as asked.
    let ack = u
        .request(json!({"type":"cancel_run","run_id":run_us}))
        .await;
    assert_ack(&ack, &run_us);
    u_frames.extend(read_until_event(&mut u, &run_us, "agent_completed").await);
    let s = of_run(&u_frames, &run_us);
    check_run(&s, &run_us, None);
    let stc = completed_of(&s);
    assert_eq!(stc[0]["data"]["ok"], false, "{}", stc[0]);
    assert_eq!(stc[0]["data"]["error"]["code"], "cancelled", "{}", stc[0]);
    assert_eq!(s.last().unwrap()["data"]["status"], "cancelled");
    assert_contiguous(&seqs(
        &u_frames
            .iter()
            .filter(|f| is_event(f))
            .cloned()
            .collect::<Vec<_>>(),
    ));

    let ack = v
        .request(json!({"type":"cancel_run","run_id":run_vs}))
        .await;
    assert_ack(&ack, &run_vs);
    let mut vs = of_run(&v_head, &run_vs);
    vs.extend(v.collect_run(&run_vs).await);
    check_run(&vs, &run_vs, None);
    let vtc = completed_of(&vs);
    assert_eq!(vtc[0]["data"]["ok"], false, "{}", vtc[0]);
    assert_eq!(vtc[0]["data"]["error"]["code"], "cancelled", "{}", vtc[0]);
    assert!(
        vtc[0]["ts"].as_str().unwrap() > panic_ts.as_str(),
        "the other user's sleep was in flight during the panic"
    );
    assert_eq!(vs.last().unwrap()["data"]["status"], "cancelled");

    // The tool executor came back: a second panic behaves the same, then calculator works.
    for _ in 0..2 {
        let run_p2 = u
            .start_run(
                "scripted",
                scripted(json!([{"tool":"panic","args":{}}, {"text":"again"}])),
            )
            .await;
        let p2 = u.collect_run(&run_p2).await;
        check_run(&p2, &run_p2, None);
        assert_eq!(
            completed_of(&p2)[0]["data"]["error"]["code"],
            "tool_panicked"
        );
        assert_eq!(p2.last().unwrap()["data"]["status"], "succeeded");
    }
    for c in [&mut u, &mut v] {
        let run_c = c
            .start_run(
                "scripted",
                scripted(json!([{"tool":"calculator","args":{"expr":"6*7"}}, {"text":"ok"}])),
            )
            .await;
        let ce = c.collect_run(&run_c).await;
        check_run(&ce, &run_c, None);
        let ctc = completed_of(&ce);
        assert_eq!(ctc[0]["data"]["ok"], true, "{}", ctc[0]);
        assert_eq!(ctc[0]["data"]["result"]["value"].as_f64(), Some(42.0));
        assert_eq!(ce.last().unwrap()["data"]["status"], "succeeded");
    }
}

/// Scripted {"fail":"boom"}: agent_completed status failed, error exactly
/// {code:"agent_failed", message:"boom"}; the steps after it do not run.
#[tokio::test]
async fn scripted_fail_step_fails_the_run() {
    let server = start(test_config());
    let mut c = Client::connect(&server, "u").await;
    let run = c
        .start_run(
            "scripted",
            scripted(json!([
                {"text":"before"},
                {"fail":"boom"},
                {"text":"never"},
                {"tool":"calculator","args":{"expr":"1+1"}}
            ])),
        )
        .await;
    let events = c.collect_run(&run).await;
    check_run(&events, &run, None);
    assert_eq!(
        types(&events),
        ["agent_started", "partial_result", "agent_completed"]
    );
    let done = &events[2]["data"];
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(
        done["error"],
        json!({"code":"agent_failed","message":"boom"})
    );
    assert_eq!(done["usage"], json!({"tool_calls":0}));
    assert!(
        ping_flush(&mut c, "p").await.is_empty(),
        "nothing after agent_completed"
    );
}

/// Scripted {"panic":true}: agent_completed status failed, error.code agent_panicked, nothing
/// after; another user's run in flight is unaffected; both users can run again afterwards.
#[tokio::test]
async fn scripted_panic_step_fails_only_that_run() {
    let server = start(test_config());
    let mut u = Client::connect(&server, "u").await;
    let mut u2 = Client::connect(&server, "u").await;
    let mut v = Client::connect(&server, "v").await;

    let run_v = v
        .start_run("scripted", sleep_run(IN_FLIGHT_MS, "v done"))
        .await;
    let v_head = read_until_event(&mut v, &run_v, "tool_executing").await;

    let run = u
        .start_run(
            "scripted",
            scripted(json!([{"text":"before"}, {"panic":true}, {"text":"never"}])),
        )
        .await;
    let events = u.collect_run(&run).await;
    check_run(&events, &run, None);
    assert_eq!(
        types(&events),
        ["agent_started", "partial_result", "agent_completed"]
    );
    let done = &events[2]["data"];
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error"]["code"], "agent_panicked", "{done}");
    assert!(
        ping_flush(&mut u, "p").await.is_empty(),
        "nothing after agent_completed"
    );
    assert_eq!(
        u2.collect_run(&run).await,
        events,
        "the other tab saw the same"
    );
    assert_still_running(&server, "v", &run_v).await;

    let mut ve = of_run(&v_head, &run_v);
    ve.extend(v.collect_run(&run_v).await);
    check_run(&ve, &run_v, None);
    assert_eq!(completed_of(&ve)[0]["data"]["ok"], true);
    assert_eq!(ve.last().unwrap()["data"]["status"], "succeeded");
    assert!(
        ping_flush(&mut v, "p").await.is_empty(),
        "v sees nothing of u"
    );

    for c in [&mut u, &mut v] {
        let r = c.start_run("echo", json!("still alive")).await;
        let e = c.collect_run(&r).await;
        check_run(&e, &r, None);
        assert_eq!(e.last().unwrap()["data"]["result"], "still alive");
    }
    let u_seqs: Vec<u64> = seqs(&events);
    assert_contiguous(&u_seqs);
}

/// cancel_run from a second tab of the same user: ack{request_id, run_id}; the open tool call
/// gets tool_completed ok:false cancelled, then agent_completed status cancelled (error.code
/// cancelled), promptly; nothing of the run after it, on either tab.
#[tokio::test]
async fn cancel_from_second_tab() {
    let server = start(test_config());
    let mut c1 = Client::connect(&server, "u").await;
    let mut c2 = Client::connect(&server, "u").await;
    let run = c1
        .start_run(
            "scripted",
            scripted(
                json!([{"text":"start"}, {"tool":"sleep","args":{"ms":5000}}, {"text":"never"}]),
            ),
        )
        .await;
    let mut frames = read_until_event(&mut c1, &run, "tool_executing").await;
    let tc_id = frames.last().unwrap()["data"]["tool_call_id"].clone();

    let t0 = Instant::now();
    let ack = c2.request(json!({"type":"cancel_run","run_id":run})).await;
    assert_ack(&ack, &run);
    frames.extend(read_until_event(&mut c1, &run, "agent_completed").await);
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "cancel must be prompt, took {:?}",
        t0.elapsed()
    );

    let events = of_run(&frames, &run);
    check_run(&events, &run, None);
    assert!(!events.iter().any(|e| e["data"]["text"] == "never"));
    let tc = completed_of(&events);
    assert_eq!(tc.len(), 1);
    assert_eq!(tc[0]["data"]["tool_call_id"], tc_id);
    assert_eq!(tc[0]["data"]["ok"], false, "{}", tc[0]);
    assert_eq!(tc[0]["data"]["error"]["code"], "cancelled", "{}", tc[0]);
    let n = events.len();
    assert_eq!(
        events[n - 2]["type"],
        "tool_completed",
        "open call closed right before the end"
    );
    let done = &events[n - 1]["data"];
    assert_eq!(done["status"], "cancelled", "{done}");
    assert_eq!(done["error"]["code"], "cancelled", "{done}");
    assert_eq!(done["usage"], json!({"tool_calls":1}));

    let after = ping_flush(&mut c1, "p1").await;
    assert!(
        !after.iter().any(|f| f["run_id"] == run.as_str()),
        "nothing after agent_completed: {after:?}"
    );
    let on2 = c2.collect_run(&run).await;
    assert_eq!(on2, events, "both tabs see the same run");
    let after2 = ping_flush(&mut c2, "p2").await;
    assert!(
        !after2.iter().any(|f| f["run_id"] == run.as_str()),
        "{after2:?}"
    );
}

/// A cancelled run's tool that would have finished later is never reported: after the
/// cancel, a later run outlasting the cancelled sleep sees no frame of the cancelled run.
#[tokio::test]
async fn cancelled_tool_finishing_later_is_not_reported() {
    let server = start(test_config());
    let mut c = Client::connect(&server, "u").await;
    let run = c.start_run("scripted", sleep_run(600, "never")).await;
    let mut frames = read_until_event(&mut c, &run, "tool_executing").await;
    let ack = c.request(json!({"type":"cancel_run","run_id":run})).await;
    assert_ack(&ack, &run);
    frames.extend(read_until_event(&mut c, &run, "agent_completed").await);
    let events = of_run(&frames, &run);
    check_run(&events, &run, None);
    assert_eq!(events.last().unwrap()["data"]["status"], "cancelled");
    assert_eq!(
        completed_of(&events)[0]["data"]["error"]["code"],
        "cancelled"
    );

    // Outlast the cancelled 600 ms sleep by a wide margin, synchronising on this run's end.
    let run2 = c.start_run("scripted", sleep_run(1200, "later")).await;
    let frames2 = read_until_event(&mut c, &run2, "agent_completed").await;
    check_run(&of_run(&frames2, &run2), &run2, None);
    let stray: Vec<&Value> = frames2
        .iter()
        .filter(|f| f["run_id"] == run.as_str())
        .collect();
    assert!(
        stray.is_empty(),
        "cancelled run reported after its agent_completed: {stray:?}"
    );
    assert_eq!(frames2.last().unwrap()["data"]["status"], "succeeded");
    assert!(ping_flush(&mut c, "p").await.is_empty());
}

/// Cancelling another user's run (or an unknown run) is run_not_found, and the run goes on
/// untouched; cancelling one's own run that already ended is an ack and changes nothing.
#[tokio::test]
async fn cancel_other_users_run_unknown_run_and_ended_run() {
    let server = start(test_config());
    let mut u = Client::connect(&server, "u").await;
    let mut v = Client::connect(&server, "v").await;

    let run = u
        .start_run("scripted", sleep_run(IN_FLIGHT_MS, "done"))
        .await;
    let u_head = read_until_event(&mut u, &run, "tool_executing").await;
    let err = v.request(json!({"type":"cancel_run","run_id":run})).await;
    assert_error_frame(&err, "run_not_found");
    let err = v
        .request(json!({"type":"cancel_run","run_id":"run_AAAAAAAAAAAAAAAAAAAAAA"}))
        .await;
    assert_error_frame(&err, "run_not_found");
    let err = u
        .request(json!({"type":"cancel_run","run_id":"run_AAAAAAAAAAAAAAAAAAAAAA"}))
        .await;
    assert_error_frame(&err, "run_not_found");
    assert_still_running(&server, "u", &run).await;

    let mut events = of_run(&u_head, &run);
    events.extend(u.collect_run(&run).await);
    check_run(&events, &run, None);
    let tc = completed_of(&events);
    assert_eq!(
        tc[0]["data"]["ok"], true,
        "another user's cancel must not touch the run: {}",
        tc[0]
    );
    let done = &events.last().unwrap()["data"];
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["result"], "done");
    assert!(
        ping_flush(&mut v, "pv").await.is_empty(),
        "v sees nothing of u's run"
    );

    // The run has ended: cancelling it again is an ack, and nothing new is emitted.
    let ack = u.request(json!({"type":"cancel_run","run_id":run})).await;
    assert_ack(&ack, &run);
    let after = ping_flush(&mut u, "pu").await;
    assert!(
        after.is_empty(),
        "cancel of an ended run emits nothing: {after:?}"
    );
    // Another user still cannot see it exists, even ended.
    let err = v.request(json!({"type":"cancel_run","run_id":run})).await;
    assert_error_frame(&err, "run_not_found");
}

/// run_timeout_ms: a run still going is ended with status timed_out; its open tool call first
/// gets tool_completed ok:false timed_out; later runs are fine.
#[tokio::test]
async fn run_timeout_closes_open_tool_call() {
    let mut cfg = test_config();
    cfg.run_timeout_ms = 500;
    let server = start(cfg);
    let mut c = Client::connect(&server, "u").await;
    let t0 = Instant::now();
    let run = c
        .start_run(
            "scripted",
            scripted(json!([{"text":"a"}, {"tool":"sleep","args":{"ms":5000}}, {"text":"never"}])),
        )
        .await;
    let events = c.collect_run(&run).await;
    let took = t0.elapsed();
    check_run(&events, &run, None);
    assert!(
        took < Duration::from_secs(3),
        "timed out after {took:?}, want ~500 ms"
    );
    assert!(
        took >= Duration::from_millis(450),
        "timed out too early: {took:?}"
    );
    let tc = completed_of(&events);
    assert_eq!(tc.len(), 1);
    assert_eq!(tc[0]["data"]["ok"], false, "{}", tc[0]);
    assert_eq!(tc[0]["data"]["error"]["code"], "timed_out", "{}", tc[0]);
    let n = events.len();
    assert_eq!(events[n - 2]["type"], "tool_completed");
    let done = &events[n - 1]["data"];
    assert_eq!(done["status"], "timed_out", "{done}");
    assert_eq!(done["error"]["code"], "timed_out", "{done}");
    let d = done["duration_ms"].as_u64().unwrap();
    assert!((450..3000).contains(&d), "duration_ms {d}, want ~500");
    assert!(!events.iter().any(|e| e["data"]["text"] == "never"));
    assert!(ping_flush(&mut c, "p").await.is_empty());

    // A run shorter than the timeout still succeeds.
    let r = c.start_run("echo", json!("quick")).await;
    let e = c.collect_run(&r).await;
    assert_eq!(e.last().unwrap()["data"]["status"], "succeeded");
}

/// The timeout also ends a run that is sleeping between steps (no tool call open).
#[tokio::test]
async fn run_timeout_without_tool_call() {
    let mut cfg = test_config();
    cfg.run_timeout_ms = 400;
    let server = start(cfg);
    let mut c = Client::connect(&server, "u").await;
    let run = c
        .start_run(
            "scripted",
            scripted(json!([{"text":"a"}, {"sleep_ms":5000}, {"text":"never"}])),
        )
        .await;
    let events = c.collect_run(&run).await;
    check_run(&events, &run, None);
    assert_eq!(
        types(&events),
        ["agent_started", "partial_result", "agent_completed"]
    );
    let done = &events[2]["data"];
    assert_eq!(done["status"], "timed_out", "{done}");
    assert_eq!(done["error"]["code"], "timed_out", "{done}");
    assert_eq!(done["usage"], json!({"tool_calls":0}));
}

/// max_runs_per_user: with the limit running, start_run (from any tab of that user) is
/// too_many_runs; other users are not limited by it; once one run ends a start works again.
#[tokio::test]
async fn too_many_runs_per_user() {
    let mut cfg = test_config();
    cfg.max_runs_per_user = 2;
    let server = start(cfg);
    let mut c1 = Client::connect(&server, "u").await;
    let mut c2 = Client::connect(&server, "u").await;
    let mut v = Client::connect(&server, "v").await;

    let r1 = c1.start_run("scripted", sleep_run(5000, "one")).await;
    let r2 = c1.start_run("scripted", sleep_run(5000, "two")).await;
    let err = c1
        .request(json!({"type":"start_run","agent":"echo","input":"three"}))
        .await;
    assert_error_frame(&err, "too_many_runs");
    let err = c2
        .request(json!({"type":"start_run","agent":"echo","input":"three"}))
        .await;
    assert_error_frame(&err, "too_many_runs");

    let rv = v.start_run("echo", json!("v is not limited by u")).await;
    let ve = v.collect_run(&rv).await;
    assert_eq!(ve.last().unwrap()["data"]["status"], "succeeded");

    let ack = c1.request(json!({"type":"cancel_run","run_id":r1})).await;
    assert_ack(&ack, &r1);
    let frames = read_until_event(&mut c1, &r1, "agent_completed").await;
    let e1 = of_run(&frames, &r1);
    check_run(&e1, &r1, None);
    assert_eq!(e1.last().unwrap()["data"]["status"], "cancelled");
    let ok = c1
        .request(json!({"type":"start_run","agent":"echo","input":"three"}))
        .await;
    assert_eq!(
        ok["type"], "ack",
        "a start works once a run has ended: {ok}"
    );
    let r3 = ok["run_id"].as_str().unwrap().to_string();
    let e3 = c1.collect_run(&r3).await;
    check_run(&e3, &r3, None);
    assert_eq!(e3.last().unwrap()["data"]["result"], "three");
    // r2 still runs and r3 has ended: one more fits, a second does not.
    let r4 = c2.start_run("scripted", sleep_run(5000, "four")).await;
    let err = c2
        .request(json!({"type":"start_run","agent":"echo","input":"five"}))
        .await;
    assert_error_frame(&err, "too_many_runs");
    for r in [&r2, &r4] {
        let ack = c2.request(json!({"type":"cancel_run","run_id":r})).await;
        assert_ack(&ack, r);
    }
}
