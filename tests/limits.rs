//! Per-user limits: run starts per minute (`--runs-per-minute`) over the WebSocket and HTTP, and
//! connections per user (`--max-connections-per-user`): the connection over the limit is
//! upgraded and then closed with 1008.

#![allow(dead_code)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

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

// ---------------------------------------------------------------------------------------------

fn config() -> agentcast::Config {
    agentcast::Config {
        drain_secs: 0,
        ..test_config()
    }
}

async fn post_run(server: &agentcast::RunningServer, user: &str, body: &Value) -> HttpResponse {
    let auth = format!("Bearer {}", server.token(user));
    http_full(
        server.addr(),
        "POST",
        "/v1/runs",
        &[("Authorization", auth.as_str())],
        &body.to_string(),
    )
    .await
}

async fn metric(addr: SocketAddr, key: &str) -> f64 {
    let (status, body) = http(addr, "GET", "/metrics", &[], "").await;
    assert_eq!(status, 200);
    body.lines()
        .find_map(|l| l.strip_prefix(key).and_then(|rest| rest.strip_prefix(' ')))
        .map(|v| v.parse().unwrap())
        .unwrap_or(0.0)
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
        ..config()
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
        metric(server.addr(), "agentcast_runs_started_total").await,
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
        ..config()
    });
    let addr = server.addr();
    let mut a1 = Client::connect(&server, "alice").await;
    let mut a2 = Client::connect(&server, "alice").await;
    assert_refused_1008(&server, "alice").await;
    assert_refused_1008(&server, "alice").await;
    assert_eq!(
        metric(
            addr,
            "agentcast_connections_refused_total{reason=\"too_many_connections\"}"
        )
        .await,
        2.0
    );
    assert_eq!(
        metric(addr, "agentcast_connections").await,
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
        ..config()
    });
    let auth = format!("Bearer {}", server.token("alice"));
    let mut ws = Client::connect(&server, "alice").await;
    let mut sse = Sse::open(
        server.addr(),
        "/v1/events",
        &[("Authorization", auth.as_str())],
    )
    .await;
    sse.welcome("alice").await;
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
        ..config()
    });
    let auth = format!("Bearer {}", server.token("alice"));
    let mut sse = Sse::open(
        server.addr(),
        "/v1/events",
        &[("Authorization", auth.as_str())],
    )
    .await;
    sse.welcome("alice").await;
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
