//! Asking the user (PROTOCOL.md §12), against a real server: `input_requested` and
//! `input_received`, the `respond` command and `POST /v1/runs/{id}/respond`, the first answer
//! winning, schema checks, approvals (edited, denied, expired), expiry, cancel while waiting,
//! the run timeout not counting the wait, other users, and answering from a replay.

use std::time::Duration;

use crate::common::*;
use serde_json::{json, Value};

fn config_with(f: impl FnOnce(&mut agentcast::Config)) -> agentcast::Config {
    let mut config = test_config();
    f(&mut config);
    config
}

fn respond(run_id: &str, interrupt_id: &Value, response: Value) -> Value {
    json!({"type": "respond", "run_id": run_id, "interrupt_id": interrupt_id, "response": response})
}

/// Waits for the first `input_requested` the tab has not collected, and checks it is the run's;
/// it stays kept back, for `collect_run`.
async fn question(c: &mut Client, run_id: &str) -> Value {
    let q = c.peek_of_type("input_requested").await;
    assert_eq!(q["run_id"], run_id, "a question of another run: {q}");
    q
}

fn assert_error(reply: &Value, code: &str) {
    assert_eq!(frame_type(reply), "error", "expected error {code}: {reply}");
    assert_eq!(reply["code"], code, "{reply}");
}

async fn api(
    server: &agentcast::RunningServer,
    path: &str,
    user: &str,
    body: &str,
) -> HttpResponse {
    let auth = bearer(server, user);
    http_full(
        server.addr(),
        "POST",
        path,
        &[("Authorization", auth.as_str())],
        body,
    )
    .await
}

/// Two tabs of one user answer the same question at once: exactly one `ack`, the other
/// `interrupt_resolved`, and both tabs see one `input_received` carrying the winner's answer.
#[tokio::test]
async fn two_tabs_racing_to_answer_exactly_one_wins() {
    let server = start(test_config());
    let mut a = Client::connect(&server, "alice").await;
    let mut b = Client::connect(&server, "alice").await;
    let run = a
        .start_run(
            "scripted",
            scripted(json!([{"ask": "Your name?"}, {"text": "thanks"}])),
        )
        .await;
    let qa = question(&mut a, &run).await;
    let qb = question(&mut b, &run).await;
    assert_eq!(qa, qb, "both tabs see the same question, same seq");
    assert_eq!(qa["data"]["kind"], "input");
    assert_eq!(qa["data"]["message"], "Your name?");
    let id = qa["data"]["interrupt_id"].clone();

    let mut fa = respond(&run, &id, json!("Ada"));
    fa["request_id"] = json!("from-a");
    let mut fb = respond(&run, &id, json!("Grace"));
    fb["request_id"] = json!("from-b");
    a.send_json(fa).await;
    b.send_json(fb).await;
    let ra = a
        .next_matching("reply from-a", |f| f["request_id"] == "from-a")
        .await;
    let rb = b
        .next_matching("reply from-b", |f| f["request_id"] == "from-b")
        .await;
    let acks = [&ra, &rb].iter().filter(|r| frame_type(r) == "ack").count();
    assert_eq!(acks, 1, "exactly one answer wins: {ra} {rb}");
    let (loser, winner_answer) = if frame_type(&ra) == "ack" {
        (&rb, "Ada")
    } else {
        (&ra, "Grace")
    };
    assert_error(loser, "interrupt_resolved");

    let events_a = a.collect_run(&run).await;
    let events_b = b.collect_run(&run).await;
    assert_eq!(events_a, events_b, "both tabs see the same run");
    check_run(&events_a, &run, None);
    let received: Vec<&Value> = events_a
        .iter()
        .filter(|e| frame_type(e) == "input_received")
        .collect();
    assert_eq!(received.len(), 1, "{events_a:?}");
    assert_eq!(
        received[0]["data"],
        json!({"interrupt_id": id, "response": winner_answer, "expired": false})
    );
    assert_eq!(events_a.last().unwrap()["data"]["status"], "succeeded");
}

/// An answer that does not fit the schema gets `invalid_field` with the validator's words, and
/// the question stays open for a good answer.
#[tokio::test]
async fn an_answer_outside_the_schema_is_refused_and_the_question_stays_open() {
    let server = start(test_config());
    let mut c = Client::connect(&server, "alice").await;
    let schema = json!({"type": "object", "required": ["count"],
        "properties": {"count": {"type": "integer", "minimum": 1}}});
    let run = c
        .start_run(
            "scripted",
            scripted(json!([{"ask": "How many?", "schema": schema}, {"text": "ok"}])),
        )
        .await;
    let q = question(&mut c, &run).await;
    assert_eq!(q["data"]["schema"], schema, "the schema goes to the user");
    let id = q["data"]["interrupt_id"].clone();

    let r = c.request(respond(&run, &id, json!("three"))).await;
    assert_error(&r, "invalid_field");
    assert!(r["message"].as_str().unwrap().contains("object"), "{r}");
    let r = c.request(respond(&run, &id, json!({"count": 0}))).await;
    assert_error(&r, "invalid_field");
    let message = r["message"].as_str().unwrap();
    assert!(
        message.contains("/count") && message.contains("minimum"),
        "the refusal says where and why: {r}"
    );
    let r = c.request(respond(&run, &id, json!({"count": 3}))).await;
    assert_eq!(frame_type(&r), "ack", "{r}");
    assert_eq!(r["run_id"], run.as_str());

    let events = c.collect_run(&run).await;
    check_run(&events, &run, None);
    let received: Vec<&Value> = events
        .iter()
        .filter(|e| frame_type(e) == "input_received")
        .collect();
    assert_eq!(
        received.len(),
        1,
        "refused answers settle nothing: {events:?}"
    );
    assert_eq!(received[0]["data"]["response"], json!({"count": 3}));
}

/// An approval is asked before `tool_executing`, names the call that will run, and an answer
/// with `args` runs the tool with those arguments under the same `tool_call_id`.
#[tokio::test]
async fn an_approval_with_edited_arguments_runs_the_tool_with_them() {
    let server = start(test_config());
    let mut c = Client::connect(&server, "alice").await;
    let run = c
        .start_run(
            "scripted",
            scripted(json!([
                {"tool": "calculator", "args": {"expr": "1+1"}, "approve": true},
                {"text": "done"}
            ])),
        )
        .await;
    let q = question(&mut c, &run).await;
    let d = &q["data"];
    assert_eq!(d["kind"], "approval");
    assert_eq!(d["tool"], "calculator");
    assert_eq!(d["args"], json!({"expr": "1+1"}));
    assert!(
        d["message"].as_str().is_some_and(|m| !m.is_empty()),
        "the server words a message: {q}"
    );
    let call_id = d["tool_call_id"].clone();
    assert!(call_id.is_string(), "{q}");

    // A malformed approval is refused and changes nothing.
    let r = c
        .request(respond(
            &run,
            &d["interrupt_id"],
            json!({"approved": "yes"}),
        ))
        .await;
    assert_error(&r, "invalid_field");
    let r = c
        .request(respond(
            &run,
            &d["interrupt_id"],
            json!({"approved": true, "args": {"expr": "6*7"}}),
        ))
        .await;
    assert_eq!(frame_type(&r), "ack", "{r}");

    let events = c.collect_run(&run).await;
    check_run(&events, &run, None);
    let t = types(&events);
    let asked = t.iter().position(|t| t == "input_requested").unwrap();
    let executing = t.iter().position(|t| t == "tool_executing").unwrap();
    assert!(asked < executing, "{t:?}");
    let exec = &events[executing]["data"];
    assert_eq!(
        exec["tool_call_id"], call_id,
        "the approved call keeps its id"
    );
    assert_eq!(exec["args"], json!({"expr": "6*7"}), "the user's arguments");
    let done = events
        .iter()
        .find(|e| frame_type(e) == "tool_completed")
        .unwrap();
    assert_eq!(done["data"]["result"], json!({"value": 42}));
    assert_eq!(events.last().unwrap()["data"]["usage"]["tool_calls"], 1);
}

/// A denied approval runs nothing and sends no tool events; the script goes on.
#[tokio::test]
async fn a_denied_call_runs_nothing() {
    let server = start(test_config());
    let mut c = Client::connect(&server, "alice").await;
    let run = c
        .start_run(
            "scripted",
            scripted(json!([
                {"tool": "panic", "approve": true},
                {"text": "went on"}
            ])),
        )
        .await;
    let q = question(&mut c, &run).await;
    let r = c
        .request(respond(
            &run,
            &q["data"]["interrupt_id"],
            json!({"approved": false}),
        ))
        .await;
    assert_eq!(frame_type(&r), "ack", "{r}");
    let events = c.collect_run(&run).await;
    check_run(&events, &run, None);
    assert_eq!(
        types(&events),
        [
            "agent_started",
            "input_requested",
            "input_received",
            "partial_result",
            "agent_completed"
        ]
    );
    let end = &events.last().unwrap()["data"];
    assert_eq!(end["status"], "succeeded");
    assert_eq!(end["result"], "went on");
    assert_eq!(end["usage"]["tool_calls"], 0);
}

/// Unanswered questions expire after `--interrupt-timeout-ms`: `input_received` with
/// `expired: true` and no response; an expired approval runs nothing; a late answer gets
/// `interrupt_resolved`.
#[tokio::test]
async fn an_unanswered_question_expires() {
    let server = start(config_with(|c| c.interrupt_timeout_ms = 300));
    let mut c = Client::connect(&server, "alice").await;
    let run = c
        .start_run(
            "scripted",
            scripted(json!([
                {"ask": "anyone?"},
                {"tool": "clock", "approve": true},
                {"text": "alone"}
            ])),
        )
        .await;
    let events = c.collect_run(&run).await;
    check_run(&events, &run, None);
    assert_eq!(
        types(&events),
        [
            "agent_started",
            "input_requested",
            "input_received",
            "input_requested",
            "input_received",
            "partial_result",
            "agent_completed"
        ]
    );
    for e in events.iter().filter(|e| frame_type(e) == "input_received") {
        assert_eq!(e["data"]["expired"], true, "{e}");
        assert_eq!(e["data"]["response"], Value::Null, "{e}");
    }
    let asked = &events[1];
    let expires = ts_micros(asked["data"]["expires_at"].as_str().unwrap());
    let at = ts_micros(asked["ts"].as_str().unwrap());
    assert!(
        (expires - at - 300_000).abs() < 100_000,
        "expires_at is ts + the interrupt timeout: {asked}"
    );
    let r = c
        .request(respond(&run, &asked["data"]["interrupt_id"], json!("late")))
        .await;
    assert_error(&r, "interrupt_resolved");
}

/// Cancelling a run while it waits ends it `cancelled`, with `input_received` `expired: true`
/// first; an answer after that is `interrupt_resolved`.
#[tokio::test]
async fn cancelling_while_waiting_expires_the_question_first() {
    let server = start(test_config());
    let mut c = Client::connect(&server, "alice").await;
    let run = c
        .start_run(
            "scripted",
            scripted(json!([{"tool": "clock", "approve": true}, {"text": "never"}])),
        )
        .await;
    let q = question(&mut c, &run).await;
    let r = c
        .request(json!({"type": "cancel_run", "run_id": run}))
        .await;
    assert_eq!(frame_type(&r), "ack", "{r}");
    let events = c.collect_run(&run).await;
    check_run(&events, &run, None);
    assert_eq!(
        types(&events),
        [
            "agent_started",
            "input_requested",
            "input_received",
            "agent_completed"
        ]
    );
    assert_eq!(
        events[2]["data"],
        json!({"interrupt_id": q["data"]["interrupt_id"], "response": null, "expired": true})
    );
    assert_eq!(events[3]["data"]["status"], "cancelled");
    let r = c
        .request(respond(
            &run,
            &q["data"]["interrupt_id"],
            json!({"approved": true}),
        ))
        .await;
    assert_error(&r, "interrupt_resolved");
}

/// `POST /v1/runs/{id}/respond`: 202; a second answer 409 `interrupt_resolved`; a bad one 400
/// `invalid_field`; another user's run, or none, 404 `run_not_found`; a question the run never
/// asked 400; a body that is not JSON 400 `bad_json`. The tab sees the answer settle.
#[tokio::test]
async fn answering_over_http() {
    let server = start(test_config());
    let mut c = Client::connect(&server, "alice").await;
    let run = c
        .start_run(
            "scripted",
            scripted(json!([{"ask": "n?", "schema": {"type": "integer"}}, {"text": "ok"}])),
        )
        .await;
    let q = question(&mut c, &run).await;
    let id = q["data"]["interrupt_id"].as_str().unwrap().to_string();
    let path = format!("/v1/runs/{run}/respond");
    let body = |response: Value| json!({"interrupt_id": id, "response": response}).to_string();

    let r = api(&server, &path, "bob", &body(json!(1))).await;
    assert_eq!(r.status, 404, "another user's run: {:?}", r.body);
    assert_eq!(r.json()["code"], "run_not_found");
    let r = api(
        &server,
        "/v1/runs/run_nope/respond",
        "alice",
        &body(json!(1)),
    )
    .await;
    assert_eq!(r.status, 404, "{:?}", r.body);
    let r = api(&server, &path, "alice", "{nope").await;
    assert_eq!(r.status, 400, "{:?}", r.body);
    assert_eq!(r.json()["code"], "bad_json");
    let r = api(
        &server,
        &path,
        "alice",
        &json!({"interrupt_id": id}).to_string(),
    )
    .await;
    assert_eq!(r.status, 400, "a missing response: {:?}", r.body);
    assert_eq!(r.json()["code"], "invalid_field");
    let r = api(
        &server,
        &path,
        "alice",
        &json!({"interrupt_id": "in_99", "response": 1}).to_string(),
    )
    .await;
    assert_eq!(r.status, 400, "a question never asked: {:?}", r.body);
    assert_eq!(r.json()["code"], "invalid_field");
    let r = api(&server, &path, "alice", &body(json!("one"))).await;
    assert_eq!(r.status, 400, "{:?}", r.body);
    assert_eq!(r.json()["code"], "invalid_field");

    let r = api(&server, &path, "alice", &body(json!(7))).await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    let r = api(&server, &path, "alice", &body(json!(8))).await;
    assert_eq!(r.status, 409, "{:?}", r.body);
    assert_eq!(r.json()["code"], "interrupt_resolved");

    let events = c.collect_run(&run).await;
    check_run(&events, &run, None);
    let received = events
        .iter()
        .find(|e| frame_type(e) == "input_received")
        .unwrap();
    assert_eq!(received["data"]["response"], 7);
}

/// Another user cannot answer (`run_not_found`, as for a run that does not exist) and sees
/// nothing of the question; an answer naming another run of the same user is refused too.
#[tokio::test]
async fn another_user_cannot_answer_or_see_the_question() {
    let server = start(no_drain_config());
    let mut alice = Client::connect(&server, "alice").await;
    let mut bob = Client::connect(&server, "bob").await;
    let run = alice
        .start_run("scripted", scripted(json!([{"ask": "secret?"}])))
        .await;
    let other = alice
        .start_run("scripted", scripted(json!([{"sleep_ms": 60000}])))
        .await;
    let q = question(&mut alice, &run).await;
    let id = &q["data"]["interrupt_id"];

    let r = bob.request(respond(&run, id, json!("mine now"))).await;
    assert_error(&r, "run_not_found");
    let r = alice.request(respond(&other, id, json!("wrong run"))).await;
    assert_error(&r, "invalid_field");
    let r = alice.request(respond(&run, id, json!("right"))).await;
    assert_eq!(frame_type(&r), "ack", "the question stayed open: {r}");
    let events = alice.collect_run(&run).await;
    check_run(&events, &run, None);

    let r = bob.request(json!({"type": "ping"})).await;
    assert_eq!(frame_type(&r), "pong");
    assert!(
        bob.kept().iter().all(|f| !is_event(f)),
        "bob saw alice's events: {:?}",
        bob.kept()
    );
}

/// Time spent waiting does not count toward `--run-timeout-ms`: a run whose work takes less
/// than the timeout survives a longer wait, and its clock runs again after the answer.
#[tokio::test]
async fn the_run_timeout_does_not_count_the_wait() {
    let server = start(config_with(|c| c.run_timeout_ms = 1_000));
    let mut c = Client::connect(&server, "alice").await;
    let run = c
        .start_run(
            "scripted",
            scripted(json!([{"sleep_ms": 300}, {"ask": "wait for me"}, {"sleep_ms": 300}, {"text": "made it"}])),
        )
        .await;
    let q = question(&mut c, &run).await;
    // The time passing is what is under test: longer than the whole run timeout.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let r = c
        .request(respond(&run, &q["data"]["interrupt_id"], json!("here")))
        .await;
    assert_eq!(
        frame_type(&r),
        "ack",
        "the run outlived its timeout while waiting: {r}"
    );
    let events = c.collect_run(&run).await;
    check_run(&events, &run, None);
    let end = &events.last().unwrap()["data"];
    assert_eq!(end["status"], "succeeded", "{end}");
    assert!(end["duration_ms"].as_u64().unwrap() >= 1_500, "{end}");

    // The clock runs before and after the wait: 600 ms of work, then the answer, then 600 ms
    // more goes past the 1 s timeout.
    let run = c
        .start_run(
            "scripted",
            scripted(
                json!([{"sleep_ms": 600}, {"ask": "quick"}, {"sleep_ms": 600}, {"text": "late"}]),
            ),
        )
        .await;
    let q = question(&mut c, &run).await;
    let r = c
        .request(respond(&run, &q["data"]["interrupt_id"], json!("now")))
        .await;
    assert_eq!(frame_type(&r), "ack", "{r}");
    let events = c.collect_run(&run).await;
    check_run(&events, &run, None);
    assert_eq!(events.last().unwrap()["data"]["status"], "timed_out");
}

/// A tab that connects after the question was asked gets it from the replay and can answer
/// it; the tab that was there sees it settled.
#[tokio::test]
async fn a_tab_that_connects_later_answers_from_the_replay() {
    let server = start(test_config());
    let mut first = Client::connect(&server, "alice").await;
    let base = first.welcome()["last_seq"].as_u64().unwrap();
    let run = first
        .start_run(
            "scripted",
            scripted(json!([{"ask": "still there?"}, {"text": "yes"}])),
        )
        .await;
    let q = question(&mut first, &run).await;
    drop(first);

    let mut later = Client::connect_query(&server, "alice", &format!("after_seq={base}")).await;
    let replayed = question(&mut later, &run).await;
    assert_eq!(replayed, q, "the replay carries the open question");
    let mut watcher = Client::connect(&server, "alice").await;
    let r = later
        .request(respond(&run, &q["data"]["interrupt_id"], json!("yes")))
        .await;
    assert_eq!(frame_type(&r), "ack", "{r}");
    let events = later.collect_run(&run).await;
    check_run(&events, &run, None);
    let settled = watcher.next_of_type("input_received").await;
    assert_eq!(settled["data"]["response"], "yes");
}

/// `respond` frames with a field missing or of the wrong type get `invalid_field`, and the
/// connection lives on.
#[tokio::test]
async fn malformed_respond_frames_are_refused() {
    let server = start(test_config());
    let mut c = Client::connect(&server, "alice").await;
    for frame in [
        json!({"type": "respond", "interrupt_id": "in_1", "response": 1}),
        json!({"type": "respond", "run_id": "r", "response": 1}),
        json!({"type": "respond", "run_id": "r", "interrupt_id": "in_1"}),
        json!({"type": "respond", "run_id": 5, "interrupt_id": "in_1", "response": 1}),
    ] {
        let r = c.request(frame.clone()).await;
        assert_error(&r, "invalid_field");
    }
    let r = c
        .request(
            json!({"type": "respond", "run_id": "run_x", "interrupt_id": "in_1", "response": 1}),
        )
        .await;
    assert_error(&r, "run_not_found");
    c.assert_alive().await;
}

/// Section 10: a question of a run on node A is answered from a tab on node B, and over HTTP
/// on B: the answer travels to A, whose actor settles it, and the verdict comes back (an
/// `ack`; `interrupt_resolved` for a second answer from A; `invalid_field` with the schema's
/// words; `run_not_found` for another user). Every tab on both nodes sees it settled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_question_is_answered_from_another_node() {
    let redis = RedisServer::start();
    let nodes = spawn_child_nodes(&redis, 2, &[]).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let mut on_a = a.connect("alice").await;
    let mut on_b = b.connect("alice").await;
    let mut bob_on_b = b.connect("bob").await;
    let run = on_a
        .start_run(
            "scripted",
            scripted(json!([
                {"ask": "n?", "schema": {"type": "integer", "minimum": 10}},
                {"tool": "calculator", "args": {"expr": "1+1"}, "approve": true},
                {"text": "done"}
            ])),
        )
        .await;
    let q = question(&mut on_b, &run).await;
    let id = &q["data"]["interrupt_id"];

    let r = bob_on_b.request(respond(&run, id, json!(11))).await;
    assert_error(&r, "run_not_found");
    let r = on_b.request(respond(&run, id, json!(3))).await;
    assert_error(&r, "invalid_field");
    assert!(r["message"].as_str().unwrap().contains("minimum"), "{r}");
    let r = on_b.request(respond(&run, id, json!(12))).await;
    assert_eq!(frame_type(&r), "ack", "answered from B: {r}");
    let r = on_a.request(respond(&run, id, json!(13))).await;
    assert_error(&r, "interrupt_resolved");

    // The approval, over HTTP on B.
    let approval = on_a
        .next_matching("the approval", |f| {
            frame_type(f) == "input_requested" && f["data"]["kind"] == "approval"
        })
        .await;
    let body = json!({"interrupt_id": approval["data"]["interrupt_id"],
        "response": {"approved": true, "args": {"expr": "2*5"}}});
    let r = b
        .http(
            "POST",
            &format!("/v1/runs/{run}/respond"),
            Some("alice"),
            &body,
        )
        .await;
    assert_eq!(r.status, 202, "{:?}", r.body);

    let events_b = on_b.collect_run(&run).await;
    check_run(&events_b, &run, None);
    let received: Vec<&Value> = events_b
        .iter()
        .filter(|e| frame_type(e) == "input_received")
        .collect();
    assert_eq!(received.len(), 2, "{events_b:?}");
    assert_eq!(received[0]["data"]["response"], 12);
    let exec = events_b
        .iter()
        .find(|e| frame_type(e) == "tool_executing")
        .unwrap();
    assert_eq!(exec["data"]["args"], json!({"expr": "2*5"}));
    assert_eq!(events_b.last().unwrap()["data"]["status"], "succeeded");
}

/// A question's schema is bounded and checked: one over 8 KiB, or not a schema, is refused
/// when the run is started (`invalid_field`); one whose `pattern` the server's linear-time
/// engine refuses (look-around) fails the run `invalid_schema` without asking anything.
#[tokio::test]
async fn a_schema_too_big_or_broken_is_refused() {
    let server = start(test_config());
    let mut c = Client::connect(&server, "alice").await;
    let properties: serde_json::Map<String, Value> = (0..400)
        .map(|i| (format!("p{i}"), json!({"type": "string"})))
        .collect();
    for schema in [
        json!({"type": "object", "properties": properties}),
        json!({"type": "nonsense"}),
    ] {
        let r = c
            .request(json!({"type": "start_run", "agent": "scripted",
                "input": {"steps": [{"ask": "?", "schema": schema}]}}))
            .await;
        assert_error(&r, "invalid_field");
        assert!(r["message"].as_str().unwrap().contains("step 0"), "{r}");
    }
    let run = c
        .start_run(
            "scripted",
            scripted(json!([{"ask": "?", "schema": {"type": "string", "pattern": "^(?=a)"}}])),
        )
        .await;
    let events = c.collect_run(&run).await;
    check_run(&events, &run, None);
    assert_eq!(types(&events), ["agent_started", "agent_completed"]);
    assert_eq!(events[1]["data"]["status"], "failed");
    assert_eq!(events[1]["data"]["error"]["code"], "invalid_schema");
}
