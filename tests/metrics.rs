//! `GET /metrics` (PROTOCOL.md §7): Prometheus text, no auth. Each test runs on a fresh server
//! and checks that the counters and gauges move by exactly what the test did.

#![allow(dead_code)]

mod common;

use std::collections::BTreeMap;
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

#[allow(dead_code)]
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
// Scraping.

/// Samples by `name{labels}` exactly as exposed.
struct Scrape {
    text: String,
    samples: BTreeMap<String, f64>,
}

impl Scrape {
    /// The sample's value; 0 when absent (a labelled series not yet created counts as 0).
    fn get(&self, key: &str) -> f64 {
        self.samples.get(key).copied().unwrap_or(0.0)
    }

    fn has(&self, key: &str) -> bool {
        self.samples.contains_key(key)
    }
}

async fn scrape(addr: SocketAddr) -> Scrape {
    let r = http_full(addr, "GET", "/metrics", &[], "").await;
    assert_eq!(r.status, 200, "GET /metrics: {:?}", r.body);
    let ct = r.header("content-type").unwrap_or("");
    assert!(
        ct.starts_with("text/plain"),
        "GET /metrics Content-Type {ct:?}"
    );
    let mut samples = BTreeMap::new();
    for line in r.body.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("not a Prometheus sample line: {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad sample value in {line:?}"));
        assert!(
            samples.insert(key.to_string(), value).is_none(),
            "sample {key} exposed twice"
        );
    }
    Scrape {
        text: r.body,
        samples,
    }
}

/// Polls /metrics (bounded) until `key` has `want`: for changes the server makes after a client
/// goes away, which no response of the server announces.
async fn wait_metric(addr: SocketAddr, key: &str, want: f64) -> Scrape {
    wait_metric_within(addr, key, want, TIMEOUT).await
}

async fn wait_metric_within(
    addr: SocketAddr,
    key: &str,
    want: f64,
    bound: std::time::Duration,
) -> Scrape {
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        let s = scrape(addr).await;
        if s.get(key) == want {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{key} is {} after {bound:?}, expected {want}",
            s.get(key)
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

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

fn config() -> agentcast::Config {
    agentcast::Config {
        drain_secs: 0,
        ..test_config()
    }
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
    let server = start(config());
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
    let server = start(config());
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
    let server = start(config());
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
    let server = start(config());
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

async fn open_sse(server: &agentcast::RunningServer, user: &str) -> Sse {
    let auth = format!("Bearer {}", server.token(user));
    let mut sse = Sse::open(
        server.addr(),
        "/v1/events",
        &[("Authorization", auth.as_str())],
    )
    .await;
    sse.welcome(user).await;
    sse
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_gauge_equals_open_connections() {
    // Heartbeats every 200 ms so that a vanished SSE client is noticed at the next write.
    let server = start(agentcast::Config {
        heartbeat_interval_ms: 200,
        ..config()
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
    let server = start(config());
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
        ..config()
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
