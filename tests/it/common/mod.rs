//! The shared test client: a real tokio-tungstenite WebSocket client against a real
//! `agentcast::spawn`ed server. Every wait is bounded by `TIMEOUT` so a broken server fails a
//! test instead of hanging it.
//!
//! Submodules, all re-exported here: `http` (HTTP requests through awc), `raw` (hand-made
//! requests and response heads read off a plain socket, for tests about bytes on the wire),
//! `shape` (shape checks on frames and run events, RFC 3339 times), `reads` (strict reads on a
//! `Client`), `sse` (a small SSE client for `/v1/events`), `scrape` (reading `/metrics`),
//! `redis` (a real `redis-server`, and agentcast nodes sharing it: PROTOCOL.md §10).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::AsyncBufReadExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

mod http;
mod raw;
mod reads;
mod redis;
mod scrape;
mod shape;
mod sse;

// Re-exported so that `use crate::common::*;` brings every helper.
pub use http::*;
pub use raw::*;
pub use reads::*;
pub use redis::*;
pub use scrape::*;
pub use shape::*;
pub use sse::*;

pub const SECRET: &str = "test-secret-of-at-least-32-bytes-0123456789";

/// The bound on every single wait in the tests.
pub const TIMEOUT: Duration = Duration::from_secs(10);

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// `Config::default()` with bind 127.0.0.1:0, jwt_secret Some(SECRET), workers 2.
pub fn test_config() -> agentcast::Config {
    agentcast::Config {
        bind: "127.0.0.1:0".into(),
        jwt_secret: Some(SECRET.into()),
        workers: 2,
        ..agentcast::Config::default()
    }
}

/// `test_config()` with `drain_secs: 0`, so a server dropped with a run still running stops at
/// once.
pub fn no_drain_config() -> agentcast::Config {
    agentcast::Config {
        drain_secs: 0,
        ..test_config()
    }
}

pub fn start(config: agentcast::Config) -> agentcast::RunningServer {
    agentcast::spawn(config).expect("agentcast::spawn failed")
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The `Authorization` header value for `user`: `Bearer <server.token(user)>`.
pub fn bearer(server: &agentcast::RunningServer, user: &str) -> String {
    format!("Bearer {}", server.token(user))
}

/// Percent-encodes everything but RFC 3986 unreserved characters, for query values.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A scripted input from steps.
pub fn scripted(steps: Value) -> Value {
    json!({ "steps": steps })
}

fn is_heartbeat(v: &Value) -> bool {
    frame_type(v) == "heartbeat"
}

pub struct Client {
    ws: Ws,
    /// Frames read but not yet consumed, in arrival order.
    kept: VecDeque<Value>,
    welcome: Value,
    next_request: u64,
    /// Set once the server's close frame (or the end of the connection) was seen.
    closed: Option<Option<u16>>,
}

impl Client {
    /// Connects as `user` (token from server.token), reads and keeps the welcome frame.
    /// Panics on failure.
    pub async fn connect(server: &agentcast::RunningServer, user: &str) -> Client {
        Self::connect_query(server, user, "").await
    }

    /// Same with extra query string, e.g. "after_seq=3&epoch=abc" (appended after token).
    pub async fn connect_query(
        server: &agentcast::RunningServer,
        user: &str,
        query: &str,
    ) -> Client {
        Self::connect_to(&server.ws_url(), &server.token(user), user, query).await
    }

    /// Same against any server (e.g. a child process): `ws_url` is `ws://ADDR/v1/ws`, `token`
    /// is `user`'s, `query` as for [`Client::connect_query`].
    pub async fn connect_to(ws_url: &str, token: &str, user: &str, query: &str) -> Client {
        let mut url = format!("{ws_url}?token={token}");
        if !query.is_empty() {
            url.push('&');
            url.push_str(query.trim_start_matches(['?', '&']));
        }
        let client = match Self::try_connect(&url, None).await {
            Ok(c) => c,
            Err(e) => panic!("connecting as {user:?} failed: {}", describe_error(&e)),
        };
        assert_eq!(
            frame_type(&client.welcome),
            "welcome",
            "the first frame of a connection must be welcome, got {}",
            client.welcome
        );
        assert_eq!(
            client.welcome["user_id"],
            json!(user),
            "welcome.user_id: {}",
            client.welcome
        );
        client
    }

    /// Raw attempt for auth tests: Err carries the HTTP status when the upgrade is refused.
    /// On success the first text frame (expected: welcome) has been read and is `welcome()`.
    pub async fn try_connect(
        url: &str,
        bearer: Option<&str>,
    ) -> Result<Client, tungstenite::Error> {
        let mut request = url.into_client_request()?;
        if let Some(token) = bearer {
            request.headers_mut().insert(
                "Authorization",
                HeaderValue::from_str(&format!("Bearer {token}")).expect("token is a header value"),
            );
        }
        let (ws, _response) =
            match tokio::time::timeout(TIMEOUT, tokio_tungstenite::connect_async(request)).await {
                Ok(r) => r?,
                Err(_) => panic!("WebSocket handshake with {url} timed out"),
            };
        let mut client = Client {
            ws,
            kept: VecDeque::new(),
            welcome: Value::Null,
            next_request: 0,
            closed: None,
        };
        client.welcome = client.read_json().await;
        Ok(client)
    }

    pub fn welcome(&self) -> &Value {
        &self.welcome
    }

    /// The raw stream, for tests that need WebSocket-level access.
    pub fn ws(&mut self) -> &mut Ws {
        &mut self.ws
    }

    /// Frames read but not yet consumed.
    pub fn kept(&self) -> &VecDeque<Value> {
        &self.kept
    }

    pub async fn send_json(&mut self, v: Value) {
        self.send(Message::text(v.to_string())).await;
    }

    pub async fn send_text(&mut self, s: &str) {
        self.send(Message::text(s.to_string())).await;
    }

    pub async fn send_binary(&mut self, b: Vec<u8>) {
        self.send(Message::binary(b)).await;
    }

    /// Sends one message; panics if the connection is gone or the send does not finish in time.
    pub async fn send(&mut self, m: Message) {
        match tokio::time::timeout(TIMEOUT, self.ws.send(m)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("sending a frame failed: {e}"),
            Err(_) => panic!("sending a frame did not finish within {TIMEOUT:?}"),
        }
    }

    /// Sends one message; returns the error instead of panicking.
    pub async fn try_send(&mut self, m: Message) -> Result<(), tungstenite::Error> {
        match tokio::time::timeout(TIMEOUT, self.ws.send(m)).await {
            Ok(r) => r,
            Err(_) => Err(tungstenite::Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "send timed out",
            ))),
        }
    }

    /// The next WebSocket message straight off the socket (ignores kept-back frames), or None
    /// when the connection ended. Panics after TIMEOUT.
    pub async fn next_message(&mut self) -> Option<Result<Message, tungstenite::Error>> {
        match tokio::time::timeout(TIMEOUT, self.ws.next()).await {
            Ok(m) => m,
            Err(_) => panic!(
                "no WebSocket message within {TIMEOUT:?}; frames kept back: {:?}",
                self.kept
            ),
        }
    }

    /// Reads the next text frame off the socket (not from the kept-back queue) as JSON.
    /// Skips WebSocket ping/pong. Panics on timeout, close, binary frames and non-JSON text.
    async fn read_json(&mut self) -> Value {
        if let Some(code) = self.closed {
            panic!("expected a frame but the connection was already closed (code {code:?})");
        }
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let msg = match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Ok(m) => m,
                Err(_) => panic!(
                    "no frame within {TIMEOUT:?}; frames kept back: {:?}",
                    self.kept
                ),
            };
            match msg {
                Some(Ok(Message::Text(t))) => {
                    return serde_json::from_str(t.as_str()).unwrap_or_else(|e| {
                        panic!("server sent a text frame that is not JSON ({e}): {t}")
                    })
                }
                Some(Ok(Message::Ping(_)))
                | Some(Ok(Message::Pong(_)))
                | Some(Ok(Message::Frame(_))) => {}
                Some(Ok(Message::Binary(b))) => panic!("server sent a binary frame: {b:?}"),
                Some(Ok(Message::Close(f))) => {
                    let code = f.as_ref().map(|f| u16::from(f.code)).unwrap_or(1005);
                    self.closed = Some(Some(code));
                    panic!("expected a frame but the server closed the connection: {f:?}");
                }
                Some(Err(e)) => {
                    self.closed = Some(None);
                    panic!("expected a frame but the connection failed: {e}");
                }
                None => {
                    self.closed = Some(None);
                    panic!("expected a frame but the connection ended");
                }
            }
        }
    }

    /// Next text frame as JSON (kept-back frames first). Skips WebSocket ping/pong. Panics after a
    /// 10 s timeout or if the connection closes.
    pub async fn next_json(&mut self) -> Value {
        if let Some(v) = self.kept.pop_front() {
            return v;
        }
        self.read_json().await
    }

    /// Like next_json but skips `heartbeat` frames.
    pub async fn next_frame(&mut self) -> Value {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let v = match tokio::time::timeout_at(deadline, self.next_json()).await {
                Ok(v) => v,
                Err(_) => panic!("no frame other than heartbeats within {TIMEOUT:?}"),
            };
            if !is_heartbeat(&v) {
                return v;
            }
        }
    }

    /// Reads until a frame matching `pred` (kept-back frames first); frames passed over are kept
    /// back, in order; heartbeats passed over are dropped. Panics after TIMEOUT.
    pub async fn next_matching(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        if let Some(i) = self.kept.iter().position(&pred) {
            return self.kept.remove(i).unwrap();
        }
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let v = match tokio::time::timeout_at(deadline, self.read_json()).await {
                Ok(v) => v,
                Err(_) => panic!(
                    "no frame matching {what} within {TIMEOUT:?}; frames kept back: {:?}",
                    self.kept
                ),
            };
            if pred(&v) {
                return v;
            }
            if !is_heartbeat(&v) {
                self.kept.push_back(v);
            }
        }
    }

    /// Reads until a frame with this `type` (skipping heartbeats); frames passed over are kept back,
    /// in order, for later reads.
    pub async fn next_of_type(&mut self, ty: &str) -> Value {
        let ty = ty.to_string();
        self.next_matching(&format!("type {ty:?}"), move |v| frame_type(v) == ty)
            .await
    }

    /// Waits for a frame with this `type` like next_of_type, but leaves it (and everything before
    /// it) kept back for later reads; returns a copy.
    pub async fn peek_of_type(&mut self, ty: &str) -> Value {
        if let Some(v) = self.kept.iter().find(|v| frame_type(v) == ty) {
            return v.clone();
        }
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let v = match tokio::time::timeout_at(deadline, self.read_json()).await {
                Ok(v) => v,
                Err(_) => panic!(
                    "no frame of type {ty:?} within {TIMEOUT:?}; frames kept back: {:?}",
                    self.kept
                ),
            };
            let hit = frame_type(&v) == ty;
            if hit || !is_heartbeat(&v) {
                self.kept.push_back(v.clone());
            }
            if hit {
                return v;
            }
        }
    }

    fn fresh_request_id(&mut self) -> String {
        self.next_request += 1;
        format!("req-{}", self.next_request)
    }

    /// Sends a frame with a fresh request_id and returns the ack or error frame answering it.
    /// (A request_id already in `v` is kept and used.)
    pub async fn request(&mut self, mut v: Value) -> Value {
        let id = match v.get("request_id").and_then(Value::as_str) {
            Some(id) => id.to_string(),
            None => {
                let id = self.fresh_request_id();
                v.as_object_mut()
                    .expect("request() needs a JSON object")
                    .insert("request_id".into(), json!(id));
                id
            }
        };
        self.send_json(v).await;
        let want = json!(id);
        self.next_matching(&format!("ack/error for request {id:?}"), move |f| {
            matches!(frame_type(f), "ack" | "error" | "pong") && f.get("request_id") == Some(&want)
        })
        .await
    }

    /// Sends start_run {agent, input, request_id}, waits for the ack with that request_id (other frames
    /// kept back), returns run_id. Panics on an error frame for that request.
    pub async fn start_run(&mut self, agent: &str, input: Value) -> String {
        let reply = self
            .request(json!({ "type": "start_run", "agent": agent, "input": input }))
            .await;
        assert_eq!(
            frame_type(&reply),
            "ack",
            "start_run of {agent:?} was refused: {reply}"
        );
        reply["run_id"]
            .as_str()
            .unwrap_or_else(|| panic!("ack of start_run without a string run_id: {reply}"))
            .to_string()
    }

    /// Reads until that run's agent_completed; returns all of that run's events in order (events of
    /// other runs are kept back).
    pub async fn collect_run(&mut self, run_id: &str) -> Vec<Value> {
        let mut events = Vec::new();
        let of_run = |v: &Value| {
            v.get("run_id").and_then(Value::as_str) == Some(run_id) && v.get("seq").is_some()
        };
        // Kept-back events of this run first, in order.
        let mut rest = VecDeque::with_capacity(self.kept.len());
        let mut done = false;
        while let Some(v) = self.kept.pop_front() {
            if !done && of_run(&v) {
                done = frame_type(&v) == "agent_completed";
                events.push(v);
            } else {
                rest.push_back(v);
            }
        }
        self.kept = rest;
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        while !done {
            let v = match tokio::time::timeout_at(deadline, self.read_json()).await {
                Ok(v) => v,
                Err(_) => panic!(
                    "run {run_id} did not complete within {TIMEOUT:?}; its events so far: {events:?}"
                ),
            };
            if of_run(&v) {
                done = frame_type(&v) == "agent_completed";
                events.push(v);
            } else if !is_heartbeat(&v) {
                self.kept.push_back(v);
            }
        }
        events
    }

    /// Reads until the server closes; returns the close code (None if the TCP connection just ended
    /// or was reset). Frames read on the way are kept back.
    pub async fn expect_close(&mut self) -> Option<u16> {
        if let Some(code) = self.closed {
            return code;
        }
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let msg = match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Ok(m) => m,
                Err(_) => panic!(
                    "the server did not close the connection within {TIMEOUT:?}; frames kept back: {} (last: {:?})",
                    self.kept.len(),
                    self.kept.back()
                ),
            };
            match msg {
                Some(Ok(Message::Text(t))) => match serde_json::from_str(t.as_str()) {
                    Ok(v) => self.kept.push_back(v),
                    Err(e) => panic!("server sent a text frame that is not JSON ({e}): {t}"),
                },
                Some(Ok(Message::Close(f))) => {
                    let code = Some(f.as_ref().map(|f| u16::from(f.code)).unwrap_or(1005));
                    self.closed = Some(code);
                    return code;
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => {
                    self.closed = Some(None);
                    return None;
                }
            }
        }
    }

    /// Sends ping with a fresh request_id and asserts the matching pong arrives: proof that the
    /// connection is alive and served.
    pub async fn assert_alive(&mut self) {
        let id = self.fresh_request_id();
        self.send_json(json!({ "type": "ping", "request_id": id }))
            .await;
        let want = json!(id);
        let pong = self
            .next_matching(&format!("pong for {id:?}"), move |f| {
                frame_type(f) == "pong" && f.get("request_id") == Some(&want)
            })
            .await;
        assert_eq!(pong, json!({ "type": "pong", "request_id": id }));
    }

    pub async fn close(mut self) {
        if self.closed.is_some() {
            return;
        }
        let _ = tokio::time::timeout(TIMEOUT, self.ws.close(None)).await;
        // Drain until the server answers the close (or the connection ends).
        let _ = tokio::time::timeout(TIMEOUT, async {
            while let Some(Ok(_)) = self.ws.next().await {}
        })
        .await;
    }
}

/// Readable text of a connection error, with the HTTP status when the upgrade was refused.
pub fn describe_error(e: &tungstenite::Error) -> String {
    match e {
        tungstenite::Error::Http(resp) => format!(
            "HTTP {} {}",
            resp.status(),
            resp.body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default()
        ),
        other => other.to_string(),
    }
}

/// The HTTP status of a refused upgrade, or None when the error was something else.
pub fn http_status(e: &tungstenite::Error) -> Option<u16> {
    match e {
        tungstenite::Error::Http(resp) => Some(resp.status().as_u16()),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// The binary as a child process.

/// `agentcast serve --bind 127.0.0.1:0` plus `args`, as a child process for [`ServeChild::spawn`]:
/// no `AGENTCAST_*` variable from the environment (the caller may set some), `RUST_LOG=info`
/// (so that it logs where it listens), stderr piped, killed on drop.
pub fn serve_command(args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_agentcast"));
    cmd.args(["serve", "--bind", "127.0.0.1:0"])
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, _) in std::env::vars() {
        if k.starts_with("AGENTCAST_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

/// The address in the server's `agentcast listening on [ADDR, ...]` log line, if `line` is it.
pub fn listening_addr(line: &str) -> Option<SocketAddr> {
    let at = line.find("listening on [")?;
    let rest = &line[at + "listening on [".len()..];
    rest.split([']', ',']).next()?.trim().parse().ok()
}

/// A child `agentcast serve` (see [`serve_command`]) and its log, read as it comes (always
/// drained: a full pipe would stall the server's logging).
pub struct ServeChild {
    pub process: tokio::process::Child,
    /// Where it listens, as its log said.
    pub addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl ServeChild {
    /// Spawns `cmd` and waits until its log says `listening on [ADDR` (the port the kernel gave
    /// it: no port is picked beforehand, so none can be taken in between). Panics if that line
    /// does not come within TIMEOUT, or the child exits first.
    pub async fn spawn(mut cmd: tokio::process::Command) -> ServeChild {
        let mut process = cmd.spawn().expect("spawning agentcast serve");
        let stderr = process.stderr.take().expect("serve_command pipes stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let sink = log.clone();
        tokio::spawn(async move {
            let mut tx = Some(tx);
            let mut lines = tokio::io::BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(addr) = listening_addr(&line) {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(addr);
                    }
                }
                sink.lock().expect("log lock").push(line);
            }
        });
        let addr = match tokio::time::timeout(TIMEOUT, rx).await {
            Ok(Ok(addr)) => addr,
            // The log ended (the child exited) or the line never came.
            _ => panic!(
                "agentcast serve did not log `listening on [ADDR` within {TIMEOUT:?} (exit \
                 status {:?}); log: {:#?}",
                process.try_wait(),
                log.lock().expect("log lock")
            ),
        };
        ServeChild { process, addr, log }
    }

    pub fn pid(&self) -> u32 {
        self.process.id().expect("the child is running")
    }

    /// The log lines so far.
    pub fn lines(&self) -> Vec<String> {
        self.log.lock().expect("log lock").clone()
    }
}

// ---------------------------------------------------------------------------------------------

/// Makes an HS256 JWT with arbitrary claims (for malformed-claims tests).
pub fn sign_claims(secret: &str, claims: &Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("signing a test token")
}
