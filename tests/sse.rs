//! `GET /v1/events`: the run events as Server-Sent Events (PROTOCOL.md §7), read with a small
//! SSE client over a plain TcpStream (HTTP/1.1 chunked transfer encoding decoded by hand), and
//! compared with what a WebSocket tab of the same user receives.

mod common;

use std::net::SocketAddr;

use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

// ---------------------------------------------------------------------------------------------
// A small SSE client.

/// One SSE block (the text between blank lines).
#[derive(Debug, Clone)]
struct Block {
    /// The block's lines, as sent.
    lines: Vec<String>,
}

impl Block {
    fn is_comment(&self) -> bool {
        self.lines.iter().all(|l| l.starts_with(':'))
    }

    fn field(&self, name: &str) -> Option<&str> {
        let prefix = format!("{name}:");
        self.lines
            .iter()
            .find_map(|l| l.strip_prefix(&prefix))
            .map(|v| v.strip_prefix(' ').unwrap_or(v))
    }

    fn data(&self) -> Value {
        let data = self
            .field("data")
            .unwrap_or_else(|| panic!("SSE block without data: {self:?}"));
        serde_json::from_str(data)
            .unwrap_or_else(|e| panic!("SSE data is not JSON ({e}): {data:?}"))
    }
}

struct Sse {
    stream: TcpStream,
    head: HttpResponse,
    /// Bytes of the body not yet de-chunked.
    raw: Vec<u8>,
    /// De-chunked body text not yet split into blocks.
    text: String,
    /// The terminating chunk (or EOF) was seen.
    ended: bool,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

impl Sse {
    /// `GET path` with these headers; panics unless the answer is a 200 with a chunked body.
    async fn open(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Sse {
        let fut = async {
            let mut stream = TcpStream::connect(addr).await?;
            let mut req =
                format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n");
            for (n, v) in headers {
                req.push_str(&format!("{n}: {v}\r\n"));
            }
            req.push_str("\r\n");
            stream.write_all(req.as_bytes()).await?;
            let mut buf = Vec::new();
            let head_end = loop {
                if let Some(i) = find(&buf, b"\r\n\r\n") {
                    break i;
                }
                let mut chunk = [0u8; 4096];
                let n = stream.read(&mut chunk).await?;
                if n == 0 {
                    return Err(std::io::Error::other(format!(
                        "connection ended in the response head: {:?}",
                        String::from_utf8_lossy(&buf)
                    )));
                }
                buf.extend_from_slice(&chunk[..n]);
            };
            let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
            let raw = buf[head_end + 4..].to_vec();
            let mut lines = head.split("\r\n");
            let status = lines
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            let headers = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
                .collect();
            Ok::<_, std::io::Error>((
                stream,
                HttpResponse {
                    status,
                    headers,
                    body: String::new(),
                },
                raw,
            ))
        };
        let (stream, head, raw) = match tokio::time::timeout(TIMEOUT, fut).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => panic!("GET {path}: {e}"),
            Err(_) => panic!("GET {path}: no response head within {TIMEOUT:?}"),
        };
        assert_eq!(
            head.status,
            200,
            "GET {path}: status {} (headers {:?}, start of body {:?})",
            head.status,
            head.headers,
            String::from_utf8_lossy(&raw)
        );
        assert!(
            head.header("transfer-encoding")
                .is_some_and(|v| v.eq_ignore_ascii_case("chunked")),
            "GET {path}: an event stream must be chunked, headers {:?}",
            head.headers
        );
        Sse {
            stream,
            head,
            raw,
            text: String::new(),
            ended: false,
        }
    }

    /// De-chunks what has arrived.
    fn decode(&mut self) {
        while !self.ended {
            let Some(line_end) = find(&self.raw, b"\r\n") else {
                return;
            };
            let size_text = String::from_utf8_lossy(&self.raw[..line_end]).into_owned();
            let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16)
                .unwrap_or_else(|_| panic!("bad chunk size line {size_text:?}"));
            if size == 0 {
                self.ended = true;
                return;
            }
            if self.raw.len() < line_end + 2 + size + 2 {
                return;
            }
            let data = &self.raw[line_end + 2..line_end + 2 + size];
            self.text
                .push_str(std::str::from_utf8(data).expect("SSE is UTF-8"));
            assert_eq!(
                &self.raw[line_end + 2 + size..line_end + 4 + size],
                b"\r\n",
                "chunk not followed by CRLF"
            );
            self.raw.drain(..line_end + 4 + size);
        }
    }

    /// The next block, or None when the stream ended. Panics after TIMEOUT.
    async fn next_block(&mut self) -> Option<Block> {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            self.decode();
            if let Some(i) = self.text.find("\n\n") {
                let block: String = self.text.drain(..i + 2).collect();
                let lines = block
                    .trim_end_matches('\n')
                    .split('\n')
                    .map(str::to_string)
                    .collect();
                return Some(Block { lines });
            }
            if self.ended {
                assert!(
                    self.text.is_empty(),
                    "the stream ended inside a block: {:?}",
                    self.text
                );
                return None;
            }
            let mut chunk = [0u8; 8192];
            let n = match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Ok(Ok(n)) => n,
                Ok(Err(e)) => panic!(
                    "reading the event stream failed: {e}; pending text {:?}",
                    self.text
                ),
                Err(_) => panic!(
                    "no complete SSE block within {TIMEOUT:?}; pending text {:?}",
                    self.text
                ),
            };
            if n == 0 {
                self.ended = true;
                assert!(
                    self.raw.is_empty(),
                    "the connection ended inside a chunk: {:?}",
                    self.raw
                );
                continue;
            }
            self.raw.extend_from_slice(&chunk[..n]);
        }
    }

    /// The next block that is not a comment. Panics if the stream ends.
    async fn next_event(&mut self) -> Block {
        loop {
            match self.next_block().await {
                Some(b) if b.is_comment() => continue,
                Some(b) => return b,
                None => panic!("the event stream ended"),
            }
        }
    }

    /// The welcome block, checked.
    async fn welcome(&mut self, user: &str) -> Value {
        let b = self.next_event().await;
        assert_eq!(
            b.lines.len(),
            2,
            "welcome block must be `event:` and `data:` lines: {b:?}"
        );
        assert_eq!(
            b.lines[0], "event: welcome",
            "first event is not welcome: {b:?}"
        );
        assert!(b.lines[1].starts_with("data: "), "{b:?}");
        let w = b.data();
        assert_eq!(w["type"], json!("welcome"), "{w}");
        assert_eq!(w["user_id"], json!(user), "{w}");
        assert_eq!(w["protocol"], json!(1), "{w}");
        assert!(
            w["session_id"]
                .as_str()
                .is_some_and(|s| s.starts_with("ses_")),
            "{w}"
        );
        assert!(w["epoch"].as_str().is_some_and(|s| !s.is_empty()), "{w}");
        assert!(w["last_seq"].is_u64(), "{w}");
        w
    }
}

/// Asserts the block is exactly `id: <seq>`, `event: <type>`, `data: <json>` for this event.
fn assert_event_block(b: &Block, expected: &Value) {
    let seq = expected["seq"].as_u64().unwrap();
    let ty = expected["type"].as_str().unwrap();
    assert_eq!(
        b.lines.len(),
        3,
        "an event block is id, event, data lines: {b:?}"
    );
    assert_eq!(
        b.lines[0],
        format!("id: {seq}"),
        "id line of {expected}: {b:?}"
    );
    assert_eq!(
        b.lines[1],
        format!("event: {ty}"),
        "event line of {expected}: {b:?}"
    );
    assert!(b.lines[2].starts_with("data: "), "data line: {b:?}");
    assert_eq!(
        &b.data(),
        expected,
        "SSE data differs from the WebSocket frame"
    );
}

fn bearer(server: &agentcast::RunningServer, user: &str) -> String {
    format!("Bearer {}", server.token(user))
}

async fn open_bearer(server: &agentcast::RunningServer, user: &str, extra: &[(&str, &str)]) -> Sse {
    let auth = bearer(server, user);
    let mut headers = vec![("Authorization", auth.as_str())];
    headers.extend_from_slice(extra);
    Sse::open(server.addr(), "/v1/events", &headers).await
}

/// A run of exactly six events: started, thinking, partial, executing, completed, completed.
fn six_event_run() -> Value {
    scripted(json!([{"think":"hmm"},{"text":"a"},{"tool":"calculator","args":{"expr":"1+1"}}]))
}

fn config() -> agentcast::Config {
    agentcast::Config {
        drain_secs: 0,
        ..test_config()
    }
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_headers_welcome_and_auth() {
    let server = start(config());
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
    let server = start(config());
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
        ..config()
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
    let server = start(config());
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
    let server = start(config());
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
        ..config()
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
