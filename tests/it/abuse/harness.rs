//! The harness of the `abuse` tests (`tests/it/abuse.rs`): the real `agentcast` binary as a
//! child process, what it costs (RSS and open fds from /proc), and the clients an attacker
//! would write: raw WebSocket frames over a plain socket, stalled sockets with a tiny receive
//! buffer, a keep-alive HTTP client for floods of run starts, a fast SSE reader and fast
//! WebSocket tabs.
//!
//! Every wait is bounded, and every attack checks an [`RssWatch`] so it stops as soon as the
//! server has clearly blown its bound (twice the bound) instead of eating the machine.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub use crate::common::get_request;
use crate::common::{
    http_client, http_within, listening_addr, read_response_head, send, sign_claims, HttpResponse,
};

pub const MIB: f64 = 1024.0 * 1024.0;

/// Receive buffer of a client playing "stalled": Linux doubles it, so ~8 KiB.
pub const STALLED_RCVBUF: u32 = 4096;

// ---------------------------------------------------------------------------------------------
// The server as a child process.

/// What the server wrote to its log (stderr), counted as it arrives.
#[derive(Default)]
pub struct Log {
    pub lines: AtomicUsize,
    pub warns: AtomicUsize,
    /// WARN lines about slow consumers ("not reading", "slow consumer").
    pub slow_consumer_warns: AtomicUsize,
    first_warns: Mutex<Vec<String>>,
    tail: Mutex<VecDeque<String>>,
}

impl Log {
    fn take(&self, line: String) {
        self.lines.fetch_add(1, Ordering::Relaxed);
        if line.contains(" WARN ") {
            self.warns.fetch_add(1, Ordering::Relaxed);
            let lower = line.to_ascii_lowercase();
            if lower.contains("slow consumer") || lower.contains("not reading") {
                self.slow_consumer_warns.fetch_add(1, Ordering::Relaxed);
            }
            let mut first = self.first_warns.lock().unwrap();
            if first.len() < 5 {
                first.push(line.clone());
            }
        }
        let mut tail = self.tail.lock().unwrap();
        if tail.len() == 40 {
            tail.pop_front();
        }
        tail.push_back(line);
    }

    pub fn first_warns(&self) -> Vec<String> {
        self.first_warns.lock().unwrap().clone()
    }

    pub fn tail(&self) -> Vec<String> {
        self.tail.lock().unwrap().iter().cloned().collect()
    }
}

pub struct Server {
    child: Child,
    pub pid: u32,
    pub addr: SocketAddr,
    secret: String,
    pub log: Arc<Log>,
}

/// 40 random characters (20 bytes of /dev/urandom, hex).
pub fn random_secret() -> String {
    let mut buf = [0u8; 20];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("reading /dev/urandom");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

impl Server {
    /// `agentcast serve --bind 127.0.0.1:0 --jwt-secret <random>` plus `flags`; returns once
    /// its log says `listening on [ADDR` (bounded: 30 s).
    pub fn start(flags: &[&str]) -> Server {
        let secret = random_secret();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_agentcast"));
        cmd.args(["serve", "--bind", "127.0.0.1:0", "--jwt-secret", &secret])
            .args(flags)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, _) in std::env::vars() {
            if k.starts_with("AGENTCAST_") {
                cmd.env_remove(k);
            }
        }
        let mut child = cmd.spawn().expect("spawning agentcast serve");
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(Log::default());
        let (tx, rx) = mpsc::channel::<SocketAddr>();
        {
            let log = log.clone();
            std::thread::Builder::new()
                .name("server-log".into())
                .spawn(move || {
                    // Always drained: a full pipe would stall the server's logging.
                    let mut tx = Some(tx);
                    for line in BufReader::new(stderr).lines() {
                        let Ok(line) = line else { break };
                        if let Some(addr) = listening_addr(&line) {
                            if let Some(tx) = tx.take() {
                                let _ = tx.send(addr);
                            }
                        }
                        log.take(line);
                    }
                })
                .expect("log thread");
        }
        let addr = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(addr) => addr,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "agentcast serve {flags:?} did not log `listening on [ADDR` within 30 s; log: {:#?}",
                    log.tail()
                );
            }
        };
        let pid = child.id();
        eprintln!("[abuse] server pid {pid} on {addr}, flags {flags:?}");
        Server {
            child,
            pid,
            addr,
            secret,
            log,
        }
    }

    pub fn token(&self, user: &str) -> String {
        sign_claims(
            &self.secret,
            &json!({ "sub": user, "exp": crate::common::now_unix() + 3600 }),
        )
    }

    /// A publisher's token (section 11) for the service `name`.
    pub fn publisher_bearer(&self, name: &str) -> String {
        let claims =
            json!({ "sub": name, "exp": crate::common::now_unix() + 3600, "scope": "publish" });
        format!("Bearer {}", sign_claims(&self.secret, &claims))
    }

    pub fn bearer(&self, user: &str) -> String {
        format!("Bearer {}", self.token(user))
    }

    pub fn ws_url(&self, user: &str, query: &str) -> String {
        let mut url = format!("ws://{}/v1/ws?token={}", self.addr, self.token(user));
        if !query.is_empty() {
            url.push('&');
            url.push_str(query);
        }
        url
    }

    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.pid)
    }

    pub fn fds(&self) -> usize {
        fd_count(self.pid)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// What the server costs.

/// VmRSS of `pid` in KiB (0 once it is gone).
pub fn rss_kib(pid: u32) -> u64 {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return 0;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Entries of /proc/PID/fd.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Samples a process's RSS every 10 ms on a thread of its own and keeps the peak. `blown()`
/// says the growth passed twice the bound: the attack should stop there.
pub struct RssWatch {
    pub baseline_kib: u64,
    pub bound_mib: f64,
    peak: Arc<AtomicU64>,
    last: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssWatch {
    pub fn start(pid: u32, bound_mib: f64) -> RssWatch {
        let baseline_kib = rss_kib(pid);
        let peak = Arc::new(AtomicU64::new(baseline_kib));
        let last = Arc::new(AtomicU64::new(baseline_kib));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (peak, last, stop) = (peak.clone(), last.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let now = rss_kib(pid);
                    last.store(now, Ordering::Relaxed);
                    peak.fetch_max(now, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(10));
                }
            })
        };
        RssWatch {
            baseline_kib,
            bound_mib,
            peak,
            last,
            stop,
            thread: Some(thread),
        }
    }

    /// Peak growth over the baseline so far, in MiB.
    pub fn peak_growth_mib(&self) -> f64 {
        self.peak
            .load(Ordering::Relaxed)
            .saturating_sub(self.baseline_kib) as f64
            / 1024.0
    }

    /// Growth over the baseline right now, in MiB.
    pub fn growth_now_mib(&self) -> f64 {
        self.last
            .load(Ordering::Relaxed)
            .saturating_sub(self.baseline_kib) as f64
            / 1024.0
    }

    pub fn baseline_mib(&self) -> f64 {
        self.baseline_kib as f64 / 1024.0
    }

    /// The growth passed twice the bound: stop attacking.
    pub fn blown(&self) -> bool {
        self.peak_growth_mib() > 2.0 * self.bound_mib
    }
}

impl Drop for RssWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Metrics.

/// One sample of `GET /metrics`; None when the server does not expose it.
pub async fn metric(addr: SocketAddr, key: &str) -> Option<f64> {
    let s = crate::common::scrape(addr).await;
    s.samples.get(key).copied()
}

/// Polls /metrics until `ok(value)` (an absent sample counts as 0), at most `bound`. Returns
/// the last value seen and whether it was reached.
pub async fn wait_metric(
    addr: SocketAddr,
    key: &str,
    bound: Duration,
    ok: impl Fn(f64) -> bool,
) -> (f64, bool) {
    let deadline = Instant::now() + bound;
    loop {
        let v = metric(addr, key).await.unwrap_or(0.0);
        if ok(v) {
            return (v, true);
        }
        if Instant::now() >= deadline {
            return (v, false);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits (bounded) until no run is running.
pub async fn wait_runs_done(addr: SocketAddr, bound: Duration) -> bool {
    wait_metric(addr, "agentcast_runs_running", bound, |v| v == 0.0)
        .await
        .1
}

// ---------------------------------------------------------------------------------------------
// Sockets.

/// A TCP connection with a small receive buffer, set before connecting so the window it
/// advertises is small too.
pub async fn connect_small(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(STALLED_RCVBUF)?;
    socket.connect(addr).await
}

/// The kernel's TCP state of a socket (1 ESTABLISHED, 7 CLOSE after a reset, 8 CLOSE_WAIT
/// after a FIN): lets a test see the server end a connection without reading from it.
pub fn tcp_state(s: &TcpStream) -> u8 {
    let mut info = [0u8; 256];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into the buffer we own.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if r != 0 {
        return 0;
    }
    info[0]
}

pub const TCP_ESTABLISHED: u8 = 1;

/// Bytes waiting in a socket's receive queue, without reading them.
pub fn bytes_queued(s: &TcpStream) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    let r = unsafe { libc::ioctl(s.as_raw_fd(), libc::FIONREAD, &mut n) };
    if r != 0 {
        0
    } else {
        n.max(0) as usize
    }
}

/// Copies up to `buf.len()` bytes waiting in the receive queue without consuming them (and
/// without waiting).
pub fn peek_queued(s: &TcpStream, buf: &mut [u8]) -> usize {
    // SAFETY: recv writes at most `buf.len()` bytes into the buffer we own.
    let n = unsafe {
        libc::recv(
            s.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n.max(0) as usize
}

/// Reads a socket until it fails or ends, at most `cap` bytes and for at most `bound`. Ok with
/// the bytes read when it ended (EOF or an error such as a reset), Err with why not.
pub async fn read_until_end(
    s: &mut TcpStream,
    cap: usize,
    bound: Duration,
) -> Result<(usize, String), String> {
    let deadline = Instant::now() + bound;
    let mut total = 0;
    let mut buf = vec![0u8; 65536];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) => return Ok((total, "EOF".into())),
            Ok(Ok(n)) => {
                total += n;
                if total > cap {
                    return Err(format!(
                        "still streaming: read {total} bytes without an end"
                    ));
                }
            }
            Ok(Err(e)) => return Ok((total, format!("{e}"))),
            Err(_) => return Err(format!("open: read {total} bytes, no end within {bound:?}")),
        }
    }
}

/// Writes `req` on a new small-buffer connection and reads the response head.
pub async fn request_head_small(
    addr: SocketAddr,
    req: &str,
    bound: Duration,
) -> Result<(TcpStream, HttpResponse, Vec<u8>), String> {
    let fut = async {
        let mut s = connect_small(addr).await?;
        s.write_all(req.as_bytes()).await?;
        let (head, rest) = read_response_head(&mut s).await?.without_body();
        Ok::<_, std::io::Error>((s, head, rest))
    };
    match tokio::time::timeout(bound, fut).await {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(e)) => Err(format!("{e}")),
        Err(_) => Err(format!("no response head within {bound:?}")),
    }
}

/// One request on a new connection (`Connection: close`), whole response read; Err after
/// `bound`.
pub async fn http_once(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    bound: Duration,
) -> Result<HttpResponse, String> {
    http_within(addr, "GET", path, headers, "", bound).await
}

// ---------------------------------------------------------------------------------------------
// A keep-alive HTTP client, for floods of requests.

pub struct Http {
    addr: SocketAddr,
    /// awc's pool keeps the connection between calls (and drops one the server has closed).
    client: awc::Client,
    /// `--max-runs-per-user` of the server: `start_run` waits for room below it.
    pub max_runs: f64,
}

impl Http {
    pub fn new(addr: SocketAddr) -> Http {
        Http {
            addr,
            client: http_client(),
            max_runs: 16.0,
        }
    }

    /// One request on the kept connection (trying once more if that failed, e.g. because the
    /// server had just closed it).
    pub async fn call(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> HttpResponse {
        for attempt in 0..2 {
            let exchange = send(&self.client, self.addr, method, path, headers, body, false);
            match tokio::time::timeout(Duration::from_secs(20), exchange).await {
                Ok(Ok(r)) => return r,
                Ok(Err(e)) if attempt == 0 => {
                    log_once(&format!("keep-alive connection failed ({e}); trying again"));
                }
                Ok(Err(e)) => panic!("{method} {path}: {e}"),
                Err(_) => panic!("{method} {path}: no answer within 20 s"),
            }
        }
        unreachable!()
    }

    /// `POST /v1/runs`; while the user has too many runs running (429 `too_many_runs`),
    /// retries every 2 ms until `deadline`. Ok(run_id), or Err with the refusal.
    pub async fn start_run(
        &mut self,
        bearer: &str,
        body: &str,
        deadline: Instant,
    ) -> Result<String, String> {
        loop {
            let r = self
                .call("POST", "/v1/runs", &[("Authorization", bearer)], body)
                .await;
            if r.status == 202 {
                return r.json()["run_id"]
                    .as_str()
                    .map(str::to_string)
                    .ok_or_else(|| format!("202 without run_id: {}", r.body));
            }
            let too_many = r.status == 429 && r.body.contains("too_many_runs");
            if !too_many || Instant::now() >= deadline {
                return Err(format!("POST /v1/runs: {} {}", r.status, short(&r.body)));
            }
            // Retrying the (big) body at once would keep the server busy parsing it: wait,
            // on a cheap request, until a run has ended (only one user runs at a time here).
            while self.runs_running().await >= self.max_runs && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        }
    }

    /// `agentcast_runs_running` from `GET /metrics` on the kept connection.
    pub async fn runs_running(&mut self) -> f64 {
        let r = self.call("GET", "/metrics", &[], "").await;
        r.body
            .lines()
            .find_map(|l| l.strip_prefix("agentcast_runs_running "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    }
}

fn log_once(msg: &str) {
    static SAID: AtomicBool = AtomicBool::new(false);
    if !SAID.swap(true, Ordering::Relaxed) {
        eprintln!("[abuse] {msg}");
    }
}

pub fn short(s: &str) -> String {
    if s.len() <= 300 {
        s.to_string()
    } else {
        let mut end = 300;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}... ({} bytes)", &s[..end], s.len())
    }
}

// ---------------------------------------------------------------------------------------------
// Run inputs.

/// `{"agent":"scripted","input":{"steps":[{"think": text}, ...]}}` with `n` steps of
/// `text_len` characters each.
pub fn big_thinks_body(n: usize, text_len: usize) -> String {
    let text: String = "abcdefghijklmnopqrstuvwxyz"
        .chars()
        .cycle()
        .take(text_len)
        .collect();
    let steps: Vec<Value> = (0..n).map(|_| json!({ "think": text })).collect();
    json!({ "agent": "scripted", "input": { "steps": steps } }).to_string()
}

/// The JSON array text of `n` think steps with the given texts.
pub fn think_steps(n: usize, text: impl Fn(usize) -> String) -> String {
    let mut s = String::with_capacity(n * 16);
    for i in 0..n {
        if i > 0 {
            s.push(',');
        }
        s.push_str("{\"think\":\"");
        s.push_str(&text(i));
        s.push_str("\"}");
    }
    s
}

// ---------------------------------------------------------------------------------------------
// Raw WebSocket: hand-made frames over a plain socket.

/// A masked text frame header announcing `len` payload bytes (the shortest length form).
pub fn masked_text_header(len: u64) -> Vec<u8> {
    let mut h = vec![0x81u8];
    if len < 126 {
        h.push(0x80 | len as u8);
    } else if len <= 0xFFFF {
        h.push(0x80 | 126);
        h.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        h.push(0x80 | 127);
        h.extend_from_slice(&len.to_be_bytes());
    }
    h.extend_from_slice(&[0x37, 0xfa, 0x21, 0x3d]);
    h
}

/// `GET path` with the WebSocket upgrade headers over a new socket (small receive buffer when
/// `small`); returns the socket, the response status and any bytes after the head.
pub async fn raw_upgrade(
    addr: SocketAddr,
    path_and_query: &str,
    extra: &[(&str, &str)],
    small: bool,
) -> Result<(TcpStream, u16, Vec<u8>), String> {
    let mut headers = crate::common::WS_UPGRADE_HEADERS.to_vec();
    headers.extend_from_slice(extra);
    let req = get_request(addr, path_and_query, &headers);
    let fut = async {
        let mut s = if small {
            connect_small(addr).await?
        } else {
            TcpStream::connect(addr).await?
        };
        s.write_all(req.as_bytes()).await?;
        let (head, rest) = read_response_head(&mut s).await?.without_body();
        Ok::<_, std::io::Error>((s, head.status, rest))
    };
    match tokio::time::timeout(Duration::from_secs(10), fut).await {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(e)) => Err(format!("upgrade failed: {e}")),
        Err(_) => Err("upgrade: no response head within 10 s".into()),
    }
}

/// What a raw WebSocket read gave.
#[derive(Debug)]
pub enum Got {
    Frame(u8, Vec<u8>),
    Eof,
    Failed(String),
    Timeout,
}

/// Parses the server's (unmasked) frames off a raw socket.
pub struct FrameReader {
    buf: Vec<u8>,
}

impl FrameReader {
    pub fn new(initial: Vec<u8>) -> FrameReader {
        FrameReader { buf: initial }
    }

    fn parse(&mut self) -> Option<(u8, Vec<u8>)> {
        if self.buf.len() < 2 {
            return None;
        }
        let opcode = self.buf[0] & 0x0f;
        let len7 = (self.buf[1] & 0x7f) as usize;
        let masked = self.buf[1] & 0x80 != 0;
        let (len, mut at) = match len7 {
            126 if self.buf.len() >= 4 => {
                (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4)
            }
            126 => return None,
            127 if self.buf.len() >= 10 => (
                u64::from_be_bytes(self.buf[2..10].try_into().unwrap()) as usize,
                10,
            ),
            127 => return None,
            n => (n, 2),
        };
        if masked {
            at += 4;
        }
        if self.buf.len() < at + len {
            return None;
        }
        let payload = self.buf[at..at + len].to_vec();
        self.buf.drain(..at + len);
        Some((opcode, payload))
    }

    pub async fn next(&mut self, s: &mut (impl AsyncReadExt + Unpin), deadline: Instant) -> Got {
        loop {
            if let Some((op, payload)) = self.parse() {
                return Got::Frame(op, payload);
            }
            let mut chunk = [0u8; 16384];
            match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
                Ok(Ok(0)) => return Got::Eof,
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
                Ok(Err(e)) => return Got::Failed(e.to_string()),
                Err(_) => return Got::Timeout,
            }
        }
    }

    /// The next text frame's JSON (pings skipped).
    pub async fn next_json(
        &mut self,
        s: &mut (impl AsyncReadExt + Unpin),
        bound: Duration,
    ) -> Result<Value, String> {
        let deadline = Instant::now() + bound;
        loop {
            match self.next(s, deadline).await {
                Got::Frame(1, p) => {
                    return serde_json::from_slice(&p)
                        .map_err(|e| format!("text frame is not JSON: {e}"))
                }
                Got::Frame(8, p) => return Err(format!("closed: {}", close_code(&p))),
                Got::Frame(_, _) => {}
                other => return Err(format!("{other:?}")),
            }
        }
    }
}

/// The code of a close frame's payload (1005 when it has none).
pub fn close_code(payload: &[u8]) -> u16 {
    if payload.len() >= 2 {
        u16::from_be_bytes([payload[0], payload[1]])
    } else {
        1005
    }
}

/// How a connection under attack ended, as seen by the client.
#[derive(Debug, Default, Clone)]
pub struct Ending {
    /// The server's close frame: code and when (after the start of the watch).
    pub close: Option<(u16, Duration)>,
    /// The connection ended (EOF or error): how, and when.
    pub ended: Option<(String, Duration)>,
}

/// Reads the server's frames until the connection ends or `bound` passes; notes the close
/// frame and the end. `since` is when the clock started.
pub async fn watch_ending(
    s: &mut (impl AsyncReadExt + Unpin),
    frames: &mut FrameReader,
    since: Instant,
    bound: Duration,
) -> Ending {
    let deadline = since + bound;
    let mut ending = Ending::default();
    loop {
        match frames.next(s, deadline).await {
            Got::Frame(8, p) => {
                if ending.close.is_none() {
                    ending.close = Some((close_code(&p), since.elapsed()));
                }
            }
            Got::Frame(_, _) => {}
            Got::Eof => {
                ending.ended = Some(("EOF".into(), since.elapsed()));
                return ending;
            }
            Got::Failed(e) => {
                ending.ended = Some((e, since.elapsed()));
                return ending;
            }
            Got::Timeout => return ending,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A fast SSE reader: de-chunks by hand, splits blocks, never panics.

pub struct SseReader {
    s: TcpStream,
    raw: Vec<u8>,
    rpos: usize,
    text: Vec<u8>,
    scan: usize,
    ended: bool,
}

#[derive(Debug)]
pub enum SseNext {
    Block(String),
    Ended,
    Failed(String),
    Timeout,
}

impl std::fmt::Display for SseNext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SseNext::Block(b) => write!(f, "block {}", short(b)),
            SseNext::Ended => f.write_str("the stream ended"),
            SseNext::Failed(e) => write!(f, "reading failed: {e}"),
            SseNext::Timeout => f.write_str("no block in time"),
        }
    }
}

impl SseReader {
    pub fn new(s: TcpStream, rest: Vec<u8>) -> SseReader {
        SseReader {
            s,
            raw: rest,
            rpos: 0,
            text: Vec::new(),
            scan: 0,
            ended: false,
        }
    }

    fn dechunk(&mut self) -> Result<(), String> {
        while !self.ended {
            let avail = &self.raw[self.rpos..];
            let Some(line_end) = avail.windows(2).position(|w| w == b"\r\n") else {
                break;
            };
            let size_text = String::from_utf8_lossy(&avail[..line_end]).into_owned();
            let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16)
                .map_err(|_| format!("bad chunk size line {size_text:?}"))?;
            if size == 0 {
                self.ended = true;
                break;
            }
            if avail.len() < line_end + 2 + size + 2 {
                break;
            }
            self.text
                .extend_from_slice(&avail[line_end + 2..line_end + 2 + size]);
            self.rpos += line_end + 4 + size;
        }
        if self.rpos > 0 && self.rpos * 2 > self.raw.len() {
            self.raw.drain(..self.rpos);
            self.rpos = 0;
        }
        Ok(())
    }

    pub async fn next(&mut self, deadline: Instant) -> SseNext {
        loop {
            if let Err(e) = self.dechunk() {
                return SseNext::Failed(e);
            }
            let from = self.scan.saturating_sub(1);
            if let Some(i) = self.text[from..].windows(2).position(|w| w == b"\n\n") {
                let end = from + i + 2;
                let block = String::from_utf8_lossy(&self.text[..end - 2]).into_owned();
                self.text.drain(..end);
                self.scan = 0;
                return SseNext::Block(block);
            }
            self.scan = self.text.len();
            if self.ended {
                return SseNext::Ended;
            }
            let mut chunk = vec![0u8; 65536];
            match tokio::time::timeout_at(deadline, self.s.read(&mut chunk)).await {
                Ok(Ok(0)) => {
                    self.ended = true;
                }
                Ok(Ok(n)) => self.raw.extend_from_slice(&chunk[..n]),
                Ok(Err(e)) => return SseNext::Failed(e.to_string()),
                Err(_) => return SseNext::Timeout,
            }
        }
    }
}

/// `id:` and `event:` of an SSE block; a comment block is `(None, None)` with `comment` true.
pub struct SseBlock<'a> {
    pub id: Option<&'a str>,
    pub event: Option<&'a str>,
    pub data: Option<&'a str>,
    pub comment: bool,
}

pub fn sse_fields(block: &str) -> SseBlock<'_> {
    let mut b = SseBlock {
        id: None,
        event: None,
        data: None,
        comment: true,
    };
    for line in block.split('\n') {
        if line.starts_with(':') {
            continue;
        }
        b.comment = false;
        if let Some(v) = line.strip_prefix("id:") {
            b.id = Some(v.trim_start());
        } else if let Some(v) = line.strip_prefix("event:") {
            b.event = Some(v.trim_start());
        } else if let Some(v) = line.strip_prefix("data:") {
            b.data = Some(v.trim_start());
        }
    }
    b
}

// ---------------------------------------------------------------------------------------------
// WebSocket tabs that read as fast as tokio-tungstenite can.

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;
pub type WsSink = SplitSink<Ws, Message>;
pub type WsRead = SplitStream<Ws>;

/// Connects and reads the welcome frame.
pub async fn connect_tab(url: &str) -> (WsSink, WsRead, Value) {
    let (ws, _) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async(url),
    )
    .await
    .expect("WebSocket handshake timed out")
    .unwrap_or_else(|e| panic!("WebSocket handshake failed: {e}"));
    let (sink, mut read) = ws.split();
    let welcome = loop {
        match tokio::time::timeout(Duration::from_secs(10), read.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => break serde_json::from_str::<Value>(&t).unwrap(),
            Ok(Some(Ok(_))) => continue,
            other => panic!("no welcome frame: {other:?}"),
        }
    };
    assert_eq!(welcome["type"], "welcome", "first frame: {welcome}");
    (sink, read, welcome)
}

/// The fields of a frame a tab looks at; `data` is skipped, not built.
#[derive(serde::Deserialize)]
struct Head<'a> {
    #[serde(rename = "type", borrow)]
    ty: &'a str,
    seq: Option<u64>,
    #[serde(borrow)]
    run_id: Option<&'a str>,
    #[serde(borrow)]
    code: Option<&'a str>,
}

/// What a tab received.
#[derive(Debug, Default, Clone)]
pub struct TabReport {
    pub label: String,
    pub events: u64,
    /// The next `seq` it expected.
    pub next_seq: u64,
    pub seq_breaks: u64,
    pub first_break: Option<String>,
    pub completed: usize,
    pub acks: Vec<String>,
    pub errors: Vec<String>,
    pub close: Option<(u16, String)>,
    /// Why reading stopped, when it was not because every run completed.
    pub stopped: Option<String>,
    pub elapsed: Duration,
}

impl TabReport {
    pub fn summary(&self) -> String {
        format!(
            "{}: {} events (next seq {}), {} runs completed, {} seq breaks{}, close {:?}, errors {:?}, stopped {:?}, {:.1} s",
            self.label,
            self.events,
            self.next_seq,
            self.completed,
            self.seq_breaks,
            self.first_break
                .as_ref()
                .map(|b| format!(" (first: {b})"))
                .unwrap_or_default(),
            self.close,
            self.errors.iter().take(3).collect::<Vec<_>>(),
            self.stopped,
            self.elapsed.as_secs_f64()
        )
    }
}

/// Reads a tab until `want_completed` runs have completed, the connection closes, no event
/// arrives for `stall`, or `overall` passes. Events must be numbered from `first_seq` on.
pub async fn read_tab(
    mut read: WsRead,
    label: String,
    first_seq: u64,
    want_completed: usize,
    stall: Duration,
    overall: Duration,
) -> TabReport {
    let start = Instant::now();
    let deadline = start + overall;
    let mut r = TabReport {
        label,
        next_seq: first_seq,
        ..Default::default()
    };
    // Heartbeats and pings keep coming from a server whose runs stalled: only events count as
    // progress.
    let mut last_event = start;
    loop {
        if r.completed >= want_completed {
            break;
        }
        let wait = (last_event + stall).min(deadline);
        let msg = match tokio::time::timeout_at(wait, read.next()).await {
            Ok(Some(Ok(m))) => m,
            Ok(Some(Err(e))) => {
                r.stopped = Some(format!("connection failed: {e}"));
                break;
            }
            Ok(None) => {
                r.stopped = Some("connection ended".into());
                break;
            }
            Err(_) => {
                r.stopped = Some(if Instant::now() >= deadline {
                    format!("not done within {overall:?}")
                } else {
                    format!("no event for {stall:?}")
                });
                break;
            }
        };
        match msg {
            Message::Text(t) => {
                let head: Head = match serde_json::from_str(t.as_str()) {
                    Ok(h) => h,
                    Err(e) => {
                        r.errors
                            .push(format!("unparsable frame ({e}): {}", short(&t)));
                        continue;
                    }
                };
                if let Some(seq) = head.seq {
                    last_event = Instant::now();
                    r.events += 1;
                    if seq != r.next_seq {
                        r.seq_breaks += 1;
                        if r.first_break.is_none() {
                            r.first_break = Some(format!("expected {} got {seq}", r.next_seq));
                        }
                    }
                    r.next_seq = seq + 1;
                    if head.ty == "agent_completed" {
                        r.completed += 1;
                    }
                } else {
                    match head.ty {
                        "ack" => r.acks.push(head.run_id.unwrap_or("").to_string()),
                        "error" => r.errors.push(format!(
                            "error {}: {}",
                            head.code.unwrap_or("?"),
                            short(&t)
                        )),
                        "resumed" => r.errors.push(format!("unexpected resumed: {}", short(&t))),
                        _ => {}
                    }
                }
            }
            Message::Close(f) => {
                r.close = Some(
                    f.map(|f| (u16::from(f.code), f.reason.to_string()))
                        .unwrap_or((1005, String::new())),
                );
                break;
            }
            _ => {}
        }
    }
    r.elapsed = start.elapsed();
    r
}

/// Collects what failed, so a test reports every broken expectation (and every measured
/// figure) at once instead of stopping at the first.
#[derive(Default)]
pub struct Failures(pub Vec<String>);

impl Failures {
    pub fn check(&mut self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            let w = what();
            eprintln!("[abuse] FAILED: {w}");
            self.0.push(w);
        }
    }

    pub fn fail(&mut self, what: impl Into<String>) {
        let w = what.into();
        eprintln!("[abuse] FAILED: {w}");
        self.0.push(w);
    }

    pub fn assert_none(self, test: &str) {
        assert!(
            self.0.is_empty(),
            "{test}: {} expectation(s) failed:\n  - {}",
            self.0.len(),
            self.0.join("\n  - ")
        );
    }
}
