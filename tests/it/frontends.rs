//! The frontends' own protocols over HTTP (PROTOCOL.md section 13): `POST /v1/agui/{agent}`,
//! `POST /v1/ai-sdk/{agent}` and `GET /v1/ai-sdk/{agent}/{id}/stream`, seen from outside.
//! The real clients read these streams in tests/frontends/; here: that the same run reaches
//! the user's WebSocket tab with the same seqs, the refusals, and the bounds.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::*;

/// The scripted run every test starts: reasoning, a tool call, an answer.
fn calculate() -> Value {
    scripted(
        json!([{"think": "adding"}, {"tool": "calculator", "args": {"expr": "2+2"}}, {"text": "4"}]),
    )
}

/// One SSE event of a frontend stream: its `id:` (a seq, if any) and its `data:`.
#[derive(Debug)]
struct Out {
    id: Option<u64>,
    data: String,
}

fn parse_stream(body: &str) -> Vec<Out> {
    body.split("\n\n")
        .filter(|block| !block.is_empty() && !block.starts_with(':'))
        .map(|block| {
            let mut out = Out {
                id: None,
                data: String::new(),
            };
            for line in block.lines() {
                if let Some(id) = line.strip_prefix("id: ") {
                    out.id = Some(
                        id.parse()
                            .unwrap_or_else(|_| panic!("id {id:?} is not a seq")),
                    );
                } else if let Some(data) = line.strip_prefix("data: ") {
                    out.data = data.to_string();
                } else {
                    panic!("unexpected line {line:?} in {block:?}");
                }
            }
            out
        })
        .collect()
}

async fn post(
    server: &agentcast::RunningServer,
    path: &str,
    user: Option<&str>,
    body: &str,
) -> HttpResponse {
    let auth = user.map(|u| bearer(server, u));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
    http_full(server.addr(), "POST", path, &headers, body).await
}

fn assert_error(res: &HttpResponse, status: u16, code: &str) {
    assert_eq!(res.status, status, "{}", res.body);
    assert_eq!(res.json()["code"], code, "{}", res.body);
    assert!(res.json()["message"].is_string(), "{}", res.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_run_reaches_the_websocket_tab_with_the_streams_seqs() {
    let server = start(test_config());
    for (path, body) in [
        (
            "/v1/agui/scripted",
            json!({"threadId": "th-a", "runId": "r", "messages": [], "forwardedProps": {"input": calculate()}}),
        ),
        (
            "/v1/ai-sdk/scripted",
            json!({"id": "th-b", "messages": [], "input": calculate()}),
        ),
    ] {
        let mut tab = Client::connect(&server, "frank").await;
        let res = post(&server, path, Some("frank"), &body.to_string()).await;
        assert_eq!(res.status, 200, "{path}: {}", res.body);
        assert!(res
            .header("content-type")
            .is_some_and(|c| c.starts_with("text/event-stream")));
        let run_id = res
            .header("x-agentcast-run-id")
            .expect("the run id header")
            .to_string();
        let ws_events = tab.collect_run(&run_id).await;
        assert_run_shape(&ws_events);
        assert_eq!(ws_events[0]["type"], "agent_started");
        let thread = body
            .get("threadId")
            .or(body.get("id"))
            .cloned()
            .unwrap_or_default();
        assert_eq!(
            ws_events[0]["thread_id"], thread,
            "{path}: the thread is the client's"
        );
        let ws_seqs: BTreeSet<u64> = ws_events.iter().filter_map(|e| e["seq"].as_u64()).collect();
        let out = parse_stream(&res.body);
        let stream_seqs: BTreeSet<u64> = out.iter().filter_map(|o| o.id).collect();
        // Every event of this run says something in both encodings; nothing else is there.
        assert_eq!(stream_seqs, ws_seqs, "{path}: {}", res.body);
        let ids: Vec<u64> = out.iter().filter_map(|o| o.id).collect();
        assert!(
            ids.windows(2).all(|w| w[0] <= w[1]),
            "{path}: ids in seq order: {ids:?}"
        );
        if path.contains("ai-sdk") {
            assert_eq!(res.header("x-vercel-ai-ui-message-stream"), Some("v1"));
            let last = out.last().expect("events");
            assert_eq!((last.id, last.data.as_str()), (None, "[DONE]"));
        } else {
            let last: Value =
                serde_json::from_str(&out.last().expect("events").data).unwrap_or_default();
            assert_eq!(last["type"], "RUN_FINISHED");
            assert_eq!(last["runId"], run_id.as_str());
        }
        tab.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_answered_as_the_runs_api_answers_them() {
    let server = start(test_config());
    let input = json!({"id": "t", "messages": [], "input": "hi"}).to_string();
    for path in ["/v1/agui/echo", "/v1/ai-sdk/echo"] {
        assert_error(
            &post(&server, path, None, &input).await,
            401,
            "unauthorized",
        );
        assert_error(
            &post(&server, path, Some("gina"), "{nope").await,
            400,
            "bad_json",
        );
        assert_error(
            &post(&server, path, Some("gina"), "[1]").await,
            400,
            "bad_json",
        );
        // No input and no user message.
        let empty = json!({"id": "t", "threadId": "t", "messages": [{"role": "assistant", "content": "hi"}]});
        assert_error(
            &post(&server, path, Some("gina"), &empty.to_string()).await,
            400,
            "invalid_field",
        );
    }
    let unknown = json!({"id": "t", "messages": [], "input": "hi"}).to_string();
    assert_error(
        &post(&server, "/v1/ai-sdk/nobody", Some("gina"), &unknown).await,
        400,
        "unknown_agent",
    );
    let bad_input =
        json!({"threadId": "t", "forwardedProps": {"input": {"steps": "no"}}}).to_string();
    assert_error(
        &post(&server, "/v1/agui/scripted", Some("gina"), &bad_input).await,
        400,
        "invalid_field",
    );
    let bad_thread = json!({"threadId": 7, "forwardedProps": {"input": "x"}}).to_string();
    assert_error(
        &post(&server, "/v1/agui/echo", Some("gina"), &bad_thread).await,
        400,
        "invalid_field",
    );
    let resume = json!({"threadId": "t", "forwardedProps": {"input": "x"},
                        "resume": [{"interruptId": "i", "status": "resolved"}]})
    .to_string();
    assert_error(
        &post(&server, "/v1/agui/echo", Some("gina"), &resume).await,
        400,
        "invalid_field",
    );

    let addr = server.addr();
    let path = "/v1/ai-sdk/echo/t/stream";
    let (status, _) = http(addr, "GET", path, &[], "").await;
    assert_eq!(status, 401);
    let auth = bearer(&server, "gina");
    let res = http_full(addr, "GET", path, &[("Authorization", &auth)], "").await;
    assert_eq!(
        (res.status, res.body.as_str()),
        (204, ""),
        "nothing runs in thread t"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_apply_to_frontend_streams() {
    let server = start(agentcast::Config {
        max_runs_per_user: 1,
        max_connections_per_user: 2,
        ..no_drain_config()
    });
    let mut tab = Client::connect(&server, "hal").await;
    let sleeper = tab
        .start_run("scripted", scripted(json!([{"sleep_ms": 30000}])))
        .await;
    let body = json!({"id": "t", "messages": [], "input": "hi"}).to_string();
    assert_error(
        &post(&server, "/v1/ai-sdk/echo", Some("hal"), &body).await,
        429,
        "too_many_runs",
    );
    // The resume of the sleeping run's thread (none: it was started without one) is 204 and
    // holds nothing open; a second tab fills the connections, and a stream is one more.
    let _second = Client::connect(&server, "hal").await;
    let res = post(&server, "/v1/ai-sdk/echo", Some("hal"), &body).await;
    assert_error(&res, 429, "rate_limited");
    assert!(res.body.contains("connections"), "{}", res.body);
    tab.request(json!({"type": "cancel_run", "run_id": sleeper}))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_replays_the_running_run_from_its_start() {
    let server = start(no_drain_config());
    let mut tab = Client::connect(&server, "ida").await;
    let steps = json!([{"text": "before"}, {"sleep_ms": 30000}, {"text": "never"}]);
    tab.send_json(
        json!({"type": "start_run", "agent": "scripted", "input": {"steps": steps},
                         "thread_id": "chat-1"}),
    )
    .await;
    let started = tab.next_of_type("agent_started").await;
    let run_id = started["run_id"].as_str().expect("run id").to_string();
    tab.next_of_type("partial_result").await;
    // Another agent's view of the thread finds nothing; this one's finds the run.
    let auth = bearer(&server, "ida");
    let other = http_full(
        server.addr(),
        "GET",
        "/v1/ai-sdk/echo/chat-1/stream",
        &[("Authorization", &auth)],
        "",
    )
    .await;
    assert_eq!(other.status, 204);
    let mut resumed = Sse::open(
        server.addr(),
        "/v1/ai-sdk/scripted/chat-1/stream",
        &[("Authorization", &auth)],
    )
    .await;
    assert_eq!(
        resumed.head.header("x-agentcast-run-id"),
        Some(run_id.as_str())
    );
    let first = resumed.next_event().await;
    assert_eq!(
        first.field("id"),
        started["seq"].as_u64().map(|s| s.to_string()).as_deref()
    );
    assert_eq!(first.data(), json!({"type": "start", "messageId": run_id}));
    let mut types = Vec::new();
    while types.last().map(String::as_str) != Some("abort") {
        if types.len() == 2 {
            // Live from here: the run ends now, after the replay.
            tab.request(json!({"type": "cancel_run", "run_id": run_id}))
                .await;
        }
        let block = resumed.next_event().await;
        types.push(block.data()["type"].as_str().unwrap_or("").to_string());
    }
    assert_eq!(types, ["text-start", "text-delta", "text-end", "abort"]);
    assert_eq!(resumed.next_event().await.field("data"), Some("[DONE]"));
    assert!(
        resumed.next_block().await.is_none(),
        "the stream ends after the run"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frontend_stream_that_stops_reading_is_cut_off_without_stalling_the_user() {
    let server = start(agentcast::Config {
        outbound_queue: 16,
        slow_consumer_grace_ms: 500,
        // The request carries the whole script.
        max_frame_bytes: 4 << 20,
        ..no_drain_config()
    });
    let mut tab = Client::connect(&server, "jo").await;
    let before = scrape(server.addr())
        .await
        .get("agentcast_slow_consumer_closes_total");
    // A client with a tiny receive buffer that sends its request and never reads.
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.set_recv_buffer_size(4096).expect("recv buffer");
    let mut stalled = tokio::time::timeout(TIMEOUT, sock.connect(server.addr()))
        .await
        .expect("connect timed out")
        .expect("connect");
    let mut steps: Vec<Value> = vec![json!({"sleep_ms": 50})];
    steps.extend((0..2000).map(|i| json!({"text": format!("{i:05}-{}", "x".repeat(1000))})));
    let body = json!({"id": "big", "messages": [], "input": {"steps": steps}}).to_string();
    let request = format!(
        "POST /v1/ai-sdk/scripted HTTP/1.1\r\nHost: {}\r\nAuthorization: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        server.addr(),
        bearer(&server, "jo"),
        body.len()
    );
    stalled
        .write_all(request.as_bytes())
        .await
        .expect("send the request");
    // The reading tab gets the whole run: the stalled stream holds nobody up.
    let events = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let e = tab.next_of_type("agent_started").await;
            if e["data"]["input"]["steps"]
                .as_array()
                .is_some_and(|s| s.len() == 2001)
            {
                let run_id = e["run_id"].as_str().unwrap_or_default().to_string();
                break tab.collect_run(&run_id).await;
            }
        }
    })
    .await
    .expect("the reading tab got the run");
    assert_eq!(
        events.len(),
        2001,
        "after agent_started: 2000 texts and agent_completed"
    );
    assert_eq!(
        events.last().map(|e| e["data"]["status"].clone()),
        Some(json!("succeeded"))
    );
    // The stalled stream was dropped as a slow consumer, and its connection ends.
    wait_metric(
        server.addr(),
        "agentcast_slow_consumer_closes_total",
        before + 1.0,
    )
    .await;
    let mut sink = vec![0u8; 64 * 1024];
    let mut read = 0usize;
    let ended = tokio::time::timeout(TIMEOUT, async {
        loop {
            match stalled.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(n) => read += n,
            }
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "the stalled connection must be closed or reset"
    );
    // It got far less than the run: what was queued when it was cut off, no more.
    assert!(read < 1_000_000, "read {read} bytes of a 2 MB run");
}

/// Section 10: the AI SDK's resume finds a thread's running run started on another node (from
/// the user's running runs on Redis) and replays it from its start, then follows it live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_finds_the_running_run_on_another_node() {
    let redis = RedisServer::start();
    let nodes = spawn_child_nodes(&redis, 2, &[]).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let mut tab = a.connect("ivy").await;
    let steps = json!([{"text": "before"}, {"sleep_ms": 30000}, {"text": "never"}]);
    tab.send_json(
        json!({"type": "start_run", "agent": "scripted", "input": {"steps": steps},
                         "thread_id": "chat-9"}),
    )
    .await;
    let started = tab.next_of_type("agent_started").await;
    let run_id = started["run_id"].as_str().expect("run id").to_string();
    tab.next_of_type("partial_result").await;

    let auth = format!("Bearer {}", b.token("ivy"));
    let other = http_full(
        b.addr,
        "GET",
        "/v1/ai-sdk/echo/chat-9/stream",
        &[("Authorization", &auth)],
        "",
    )
    .await;
    assert_eq!(other.status, 204, "another agent's view of the thread");
    let mut resumed = Sse::open(
        b.addr,
        "/v1/ai-sdk/scripted/chat-9/stream",
        &[("Authorization", &auth)],
    )
    .await;
    assert_eq!(
        resumed.head.header("x-agentcast-run-id"),
        Some(run_id.as_str())
    );
    let first = resumed.next_event().await;
    assert_eq!(
        first.field("id"),
        started["seq"].as_u64().map(|s| s.to_string()).as_deref()
    );
    assert_eq!(first.data(), json!({"type": "start", "messageId": run_id}));
    let mut types = Vec::new();
    while types.last().map(String::as_str) != Some("abort") {
        if types.len() == 2 {
            tab.request(json!({"type": "cancel_run", "run_id": run_id}))
                .await;
        }
        let block = resumed.next_event().await;
        types.push(block.data()["type"].as_str().unwrap_or("").to_string());
    }
    assert_eq!(types, ["text-start", "text-delta", "text-end", "abort"]);
}
