//! Client frames and the server's answers: ping/pong and every error code for malformed frames
//! (PROTOCOL §3, §4; protocol-notes "Which error code"), closes for binary and oversized frames,
//! and the per-connection rate limit.

use std::time::Duration;

use crate::common::*;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message;

/// Sends `text` as one text frame and asserts the very next non-heartbeat frame is exactly
/// `{"type":"error","code":code,"message":…}` plus `request_id` when `request_id` is Some.
/// Then asserts the connection still works (a ping gets its pong).
async fn expect_error(c: &mut Client, text: &str, code: &str, request_id: Option<&str>) {
    c.send_text(text).await;
    let f = c.next_frame().await;
    assert_eq!(f["type"], json!("error"), "answer to {text}: {f}");
    assert_eq!(f["code"], json!(code), "error code for {text}: {f}");
    assert!(
        f["message"].as_str().is_some_and(|m| !m.is_empty()),
        "error for {text} without a message: {f}"
    );
    match request_id {
        Some(id) => assert_eq!(
            f.get("request_id"),
            Some(&json!(id)),
            "request_id of the error for {text}: {f}"
        ),
        None => assert!(
            f.get("request_id").is_none(),
            "error for {text} carries a request_id: {f}"
        ),
    }
    let mut keys: Vec<&str> = f.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort();
    let mut want = vec!["code", "message", "type"];
    if request_id.is_some() {
        want.push("request_id");
        want.sort();
    }
    assert_eq!(keys, want, "fields of the error for {text}: {f}");
    c.assert_alive().await;
}

fn random_run_id() -> String {
    // "run_" + 22 base62 characters, like a real one, but never issued.
    let alphabet = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut x = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    let mut s = String::from("run_");
    for _ in 0..22 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.push(alphabet[(x % 62) as usize] as char);
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_gets_pong_echoing_request_id() {
    let server = start(test_config());
    let mut c = Client::connect(&server, "alice").await;

    c.send_json(json!({ "type": "ping", "request_id": "abc" }))
        .await;
    assert_eq!(
        c.next_frame().await,
        json!({ "type": "pong", "request_id": "abc" })
    );

    c.send_json(json!({ "type": "ping" })).await;
    assert_eq!(
        c.next_frame().await,
        json!({ "type": "pong" }),
        "a pong without request_id must omit it"
    );

    // A request_id of exactly 128 characters is fine and echoed.
    let id = "x".repeat(128);
    c.send_json(json!({ "type": "ping", "request_id": id }))
        .await;
    assert_eq!(
        c.next_frame().await,
        json!({ "type": "pong", "request_id": id })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_json_is_bad_json() {
    let server = start(test_config());
    let mut c = Client::connect(&server, "alice").await;
    expect_error(&mut c, "not json", "bad_json", None).await;
    expect_error(&mut c, "{\"type\":\"ping\"", "bad_json", None).await;
    expect_error(&mut c, "[1,2]", "bad_json", None).await;
    expect_error(&mut c, "[{\"type\":\"ping\"}]", "bad_json", None).await;
    expect_error(&mut c, "\"ping\"", "bad_json", None).await;
    expect_error(&mut c, "42", "bad_json", None).await;
    expect_error(&mut c, "null", "bad_json", None).await;
    expect_error(&mut c, "", "bad_json", None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_type_is_invalid_field_or_unknown_type() {
    let server = start(test_config());
    let mut c = Client::connect(&server, "alice").await;
    expect_error(&mut c, r#"{}"#, "invalid_field", None).await;
    expect_error(
        &mut c,
        r#"{"request_id":"r0"}"#,
        "invalid_field",
        Some("r0"),
    )
    .await;
    expect_error(&mut c, r#"{"type":5}"#, "invalid_field", None).await;
    expect_error(
        &mut c,
        r#"{"type":5,"request_id":"r1"}"#,
        "invalid_field",
        Some("r1"),
    )
    .await;
    expect_error(&mut c, r#"{"type":null}"#, "invalid_field", None).await;
    expect_error(
        &mut c,
        r#"{"type":"nope","request_id":"r2"}"#,
        "unknown_type",
        Some("r2"),
    )
    .await;
    expect_error(&mut c, r#"{"type":"nope"}"#, "unknown_type", None).await;
    // Server-to-client types are not commands.
    expect_error(
        &mut c,
        r#"{"type":"welcome","request_id":"r3"}"#,
        "unknown_type",
        Some("r3"),
    )
    .await;
    expect_error(
        &mut c,
        r#"{"type":"PING","request_id":"r4"}"#,
        "unknown_type",
        Some("r4"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_request_id_is_invalid_field_and_not_echoed() {
    let server = start(test_config());
    let mut c = Client::connect(&server, "alice").await;
    expect_error(
        &mut c,
        r#"{"type":"ping","request_id":7}"#,
        "invalid_field",
        None,
    )
    .await;
    expect_error(
        &mut c,
        r#"{"type":"ping","request_id":{"a":1}}"#,
        "invalid_field",
        None,
    )
    .await;
    let long = "y".repeat(129);
    expect_error(
        &mut c,
        &json!({ "type": "ping", "request_id": long }).to_string(),
        "invalid_field",
        None,
    )
    .await;
    expect_error(
        &mut c,
        &json!({ "type": "start_run", "agent": "echo", "input": "hi", "request_id": 7 })
            .to_string(),
        "invalid_field",
        None,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_start_run_fields_are_invalid_field() {
    let server = start(test_config());
    let mut c = Client::connect(&server, "alice").await;
    let cases = [
        json!({ "type": "start_run", "input": "hi", "request_id": "s1" }),
        json!({ "type": "start_run", "agent": 5, "input": "hi", "request_id": "s2" }),
        json!({ "type": "start_run", "agent": null, "input": "hi", "request_id": "s3" }),
        json!({ "type": "start_run", "agent": "echo", "request_id": "s4" }),
        json!({ "type": "start_run", "agent": "echo", "input": "hi", "thread_id": 5, "request_id": "s5" }),
        json!({ "type": "start_run", "agent": "echo", "input": "hi", "thread_id": "", "request_id": "s6" }),
        json!({ "type": "start_run", "agent": "echo", "input": "hi", "thread_id": "t".repeat(129), "request_id": "s7" }),
        json!({ "type": "start_run", "agent": "echo", "input": "hi", "thread_id": ["th"], "request_id": "s8" }),
    ];
    for case in cases {
        let id = case["request_id"].as_str().unwrap().to_string();
        expect_error(&mut c, &case.to_string(), "invalid_field", Some(&id)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_run_thread_id_boundaries_are_accepted() {
    let server = start(test_config());
    let mut c = Client::connect(&server, "alice").await;
    for (i, thread_id) in [Value::Null, json!("t"), json!("t".repeat(128))]
        .into_iter()
        .enumerate()
    {
        let id = format!("ok{i}");
        c.send_json(json!({ "type": "start_run", "agent": "echo", "input": "hi", "thread_id": thread_id, "request_id": id }))
            .await;
        let ack = c
            .next_matching("ack", |f| {
                f["type"] == json!("ack") || f["type"] == json!("error")
            })
            .await;
        assert_eq!(
            ack["type"],
            json!("ack"),
            "start_run with thread_id {thread_id}: {ack}"
        );
        assert_eq!(ack["request_id"], json!(id), "{ack}");
        let run_id = ack["run_id"].as_str().unwrap().to_string();
        let events = c.collect_run(&run_id).await;
        assert_run_shape(&events);
        for e in &events {
            assert_eq!(e["thread_id"], thread_id, "thread_id of {e}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_run_ack_is_exact() {
    let server = start(test_config());
    let mut c = Client::connect(&server, "alice").await;
    c.send_json(
        json!({ "type": "start_run", "agent": "echo", "input": "hello", "request_id": "go" }),
    )
    .await;
    let ack = c.next_of_type("ack").await;
    let run_id = ack["run_id"]
        .as_str()
        .unwrap_or_else(|| panic!("ack without run_id: {ack}"))
        .to_string();
    assert_eq!(
        ack,
        json!({ "type": "ack", "request_id": "go", "run_id": run_id })
    );
    let suffix = run_id
        .strip_prefix("run_")
        .unwrap_or_else(|| panic!("run_id {run_id:?} without run_ prefix"));
    assert!(
        suffix.len() == 22 && suffix.chars().all(|ch| ch.is_ascii_alphanumeric()),
        "run_id {run_id:?} is not run_ + 22 base62 characters"
    );
    // Without a request_id the ack omits it.
    c.send_json(json!({ "type": "start_run", "agent": "echo", "input": "again" }))
        .await;
    let ack = c.next_of_type("ack").await;
    let run2 = ack["run_id"].as_str().unwrap().to_string();
    assert_eq!(
        ack,
        json!({ "type": "ack", "run_id": run2 }),
        "an ack without request_id must omit it"
    );
    c.collect_run(&run_id).await;
    c.collect_run(&run2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_agent_is_unknown_agent() {
    let server = start(test_config());
    let mut c = Client::connect(&server, "alice").await;
    expect_error(
        &mut c,
        &json!({ "type": "start_run", "agent": "nope", "input": "hi", "request_id": "u1" })
            .to_string(),
        "unknown_agent",
        Some("u1"),
    )
    .await;
    expect_error(
        &mut c,
        &json!({ "type": "start_run", "agent": "ECHO", "input": "hi" }).to_string(),
        "unknown_agent",
        None,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_the_agent_refuses_is_invalid_field() {
    let server = start(test_config());
    let mut c = Client::connect(&server, "alice").await;
    let cases = [
        // echo needs a string
        json!({ "type": "start_run", "agent": "echo", "input": 5, "request_id": "e1" }),
        json!({ "type": "start_run", "agent": "echo", "input": { "text": "hi" }, "request_id": "e2" }),
        json!({ "type": "start_run", "agent": "echo", "input": null, "request_id": "e3" }),
        // scripted needs {"steps":[…]} of known step kinds and known tools
        json!({ "type": "start_run", "agent": "scripted", "input": "hi", "request_id": "c1" }),
        json!({ "type": "start_run", "agent": "scripted", "input": {}, "request_id": "c2" }),
        json!({ "type": "start_run", "agent": "scripted", "input": { "steps": "x" }, "request_id": "c3" }),
        json!({ "type": "start_run", "agent": "scripted", "input": scripted(json!([{ "dance": true }])), "request_id": "c4" }),
        json!({ "type": "start_run", "agent": "scripted",
                "input": scripted(json!([{ "text": "ok" }, { "dance": true }])), "request_id": "c5" }),
        json!({ "type": "start_run", "agent": "scripted",
                "input": scripted(json!([{ "tool": "nope", "args": {} }])), "request_id": "c6" }),
        json!({ "type": "start_run", "agent": "scripted",
                "input": scripted(json!([{ "text": "first" }, { "tool": "teleport", "args": {} }])), "request_id": "c7" }),
    ];
    for case in cases {
        let id = case["request_id"].as_str().unwrap().to_string();
        expect_error(&mut c, &case.to_string(), "invalid_field", Some(&id)).await;
    }
    // None of the refused runs started: no run event reached the connection.
    assert!(
        c.kept().iter().all(|f| f.get("seq").is_none()),
        "a refused start_run emitted events: {:?}",
        c.kept()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_cancel_run_is_invalid_field_or_run_not_found() {
    let server = start(test_config());
    let mut c = Client::connect(&server, "alice").await;
    expect_error(
        &mut c,
        r#"{"type":"cancel_run","request_id":"k1"}"#,
        "invalid_field",
        Some("k1"),
    )
    .await;
    expect_error(
        &mut c,
        r#"{"type":"cancel_run","run_id":5,"request_id":"k2"}"#,
        "invalid_field",
        Some("k2"),
    )
    .await;
    expect_error(
        &mut c,
        r#"{"type":"cancel_run","run_id":null}"#,
        "invalid_field",
        None,
    )
    .await;
    let random = random_run_id();
    expect_error(
        &mut c,
        &json!({ "type": "cancel_run", "run_id": random, "request_id": "k3" }).to_string(),
        "run_not_found",
        Some("k3"),
    )
    .await;
    expect_error(
        &mut c,
        &json!({ "type": "cancel_run", "run_id": "nonsense" }).to_string(),
        "run_not_found",
        None,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_resume_is_invalid_field() {
    let server = start(test_config());
    let mut c = Client::connect(&server, "alice").await;
    let cases = [
        r#"{"type":"resume","after_seq":-1,"request_id":"q1"}"#,
        r#"{"type":"resume","after_seq":"x","request_id":"q2"}"#,
        r#"{"type":"resume","after_seq":"0","request_id":"q3"}"#,
        r#"{"type":"resume","after_seq":1.5,"request_id":"q4"}"#,
        r#"{"type":"resume","request_id":"q5"}"#,
        r#"{"type":"resume","after_seq":null,"request_id":"q6"}"#,
        r#"{"type":"resume","after_seq":0,"epoch":5,"request_id":"q7"}"#,
    ];
    for case in cases {
        let id = serde_json::from_str::<Value>(case).unwrap()["request_id"]
            .as_str()
            .unwrap()
            .to_string();
        expect_error(&mut c, case, "invalid_field", Some(&id)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_frame_closes_with_1003() {
    let server = start(test_config());
    let mut c = Client::connect(&server, "alice").await;
    c.assert_alive().await;
    c.send_binary(b"{\"type\":\"ping\"}".to_vec()).await;
    assert_eq!(
        c.expect_close().await,
        Some(1003),
        "a binary frame must close the connection with 1003"
    );
    // Other connections are unaffected.
    let mut d = Client::connect(&server, "alice").await;
    d.assert_alive().await;
}

fn small_frames_config() -> agentcast::Config {
    agentcast::Config {
        max_frame_bytes: 1024,
        ..test_config()
    }
}

/// A ping of exactly `len` bytes: {"type":"ping","request_id":"big","pad":"xxx…"}.
fn ping_of_len(len: usize) -> String {
    let base = json!({ "type": "ping", "request_id": "big", "pad": "" }).to_string();
    assert!(len >= base.len());
    let s = json!({ "type": "ping", "request_id": "big", "pad": "x".repeat(len - base.len()) })
        .to_string();
    assert_eq!(s.len(), len);
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_text_frame_closes_with_1009() {
    let server = start(small_frames_config());
    let mut c = Client::connect(&server, "alice").await;
    c.assert_alive().await;
    c.send_text(&ping_of_len(2000)).await;
    assert_eq!(
        c.expect_close().await,
        Some(1009),
        "a 2000-byte frame over a 1024-byte limit must close with 1009"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frame_one_byte_over_the_limit_closes_with_1009() {
    let server = start(small_frames_config());
    let mut c = Client::connect(&server, "alice").await;
    c.send_text(&ping_of_len(1025)).await;
    assert_eq!(
        c.expect_close().await,
        Some(1009),
        "a 1025-byte frame over a 1024-byte limit must close with 1009"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fragmented_message_over_the_limit_closes_with_1009() {
    let server = start(small_frames_config());
    let mut c = Client::connect(&server, "alice").await;
    c.assert_alive().await;
    let text = ping_of_len(1400);
    let (a, b) = text.as_bytes().split_at(700);
    c.send(Message::Frame(Frame::message(
        a.to_vec(),
        OpCode::Data(Data::Text),
        false,
    )))
    .await;
    // The server may close as soon as it sees the first fragments add up past the limit.
    let _ = c
        .try_send(Message::Frame(Frame::message(
            b.to_vec(),
            OpCode::Data(Data::Continue),
            true,
        )))
        .await;
    assert_eq!(
        c.expect_close().await,
        Some(1009),
        "a fragmented 1400-byte message over a 1024-byte limit must close with 1009"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_up_to_the_limit_are_served() {
    let server = start(small_frames_config());
    let mut c = Client::connect(&server, "alice").await;
    for len in [1000, 1024] {
        c.send_text(&ping_of_len(len)).await;
        // Unknown fields may be ignored (pong) or refused (error); either way it is answered
        // and the connection lives.
        let f = c.next_frame().await;
        assert!(
            (f["type"] == json!("pong") || f["type"] == json!("error"))
                && f["request_id"] == json!("big"),
            "answer to a {len}-byte ping: {f}"
        );
        c.assert_alive().await;
    }
    // A fragmented message under the limit is fine too.
    let text = ping_of_len(1000);
    let (a, b) = text.as_bytes().split_at(500);
    c.send(Message::Frame(Frame::message(
        a.to_vec(),
        OpCode::Data(Data::Text),
        false,
    )))
    .await;
    c.send(Message::Frame(Frame::message(
        b.to_vec(),
        OpCode::Data(Data::Continue),
        true,
    )))
    .await;
    let f = c.next_frame().await;
    assert!(
        (f["type"] == json!("pong") || f["type"] == json!("error"))
            && f["request_id"] == json!("big"),
        "answer to a fragmented 1000-byte ping: {f}"
    );
    c.assert_alive().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flood_of_pings_is_rate_limited() {
    let server = start(test_config());
    let mut c = Client::connect(&server, "alice").await;
    const N: usize = 300;
    let started = std::time::Instant::now();
    for i in 0..N {
        c.send_json(json!({ "type": "ping", "request_id": format!("p{i}") }))
            .await;
    }
    let send_secs = started.elapsed().as_secs_f64();

    // Read until the first rate_limited error.
    let err = c
        .next_matching("rate_limited error", |f| f["type"] == json!("error"))
        .await;
    assert_eq!(err["code"], json!("rate_limited"), "{err}");
    let retry = err["retry_after_ms"]
        .as_u64()
        .unwrap_or_else(|| panic!("rate_limited without an integer retry_after_ms: {err}"));
    assert!(
        retry <= 10_000,
        "retry_after_ms {retry} is unreasonable for 50 commands a second"
    );

    // The one wait the rule allows: then the connection serves again. Everything the server
    // answers to the flood comes before the answer to this ping (one connection, in order).
    tokio::time::sleep(Duration::from_millis(retry + 100)).await;
    c.send_json(json!({ "type": "ping", "request_id": "after" }))
        .await;
    let after = c
        .next_matching("pong for \"after\"", |f| f["request_id"] == json!("after"))
        .await;
    assert_eq!(
        after,
        json!({ "type": "pong", "request_id": "after" }),
        "after waiting retry_after_ms"
    );

    let mut pongs = 0usize;
    let mut errors = 1usize;
    while let Some(f) = c.kept().front().cloned() {
        let _ = c.next_json().await;
        match f["type"].as_str() {
            Some("pong") => pongs += 1,
            Some("error") => {
                assert_eq!(f["code"], json!("rate_limited"), "{f}");
                assert!(f["retry_after_ms"].is_u64(), "{f}");
                errors += 1;
            }
            Some("heartbeat") => {}
            _ => panic!("unexpected frame during the flood: {f}"),
        }
    }
    assert!(pongs < N, "all {N} pings got a pong: no rate limit");
    assert!(pongs >= 100, "a burst of 100 must pass, only {pongs} pongs");
    let allowed_errors = 1 + (send_secs + started.elapsed().as_secs_f64()).ceil() as usize;
    assert!(
        errors <= allowed_errors,
        "{errors} rate_limited errors; at most one a second"
    );
    c.assert_alive().await;

    // PROTOCOL §3: an error carries the request_id of the frame it answers when that frame had
    // one; every refused ping had one. (Checked last so the rules above are reported first.)
    let rid = err["request_id"].as_str().unwrap_or_else(|| {
        panic!("rate_limited error without the refused ping's request_id (PROTOCOL §3): {err}")
    });
    assert!(rid.starts_with('p'), "{err}");
}
