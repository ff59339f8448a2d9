//! The `publish` scenario's publishers (PROTOCOL.md section 11): each is one task with one
//! keep-alive HTTP/1.1 connection, creating runs for its users and posting their events in
//! batches, some of them sent twice or overlapping on purpose; and what every tab checks of a
//! published event: that it is the one published at its place, with its text.
//!
//! The HTTP client is a few lines over a tokio `TcpStream`, not awc: awc needs actix's
//! single-threaded runtime (its connection pool spawns local tasks), which the harness's
//! multi-threaded tokio runtime is not, and a pool would hide which connection a request went
//! on. Written by hand, a request is one `write_all` of a buffer built in place and an answer
//! one read of a `Content-Length` body, so the harness spends as little as it can of the two
//! cores it shares with the server, and one publisher is exactly one connection.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::cli::{Inject, Params};
use crate::client::{Shared, User};

/// What the publisher's event number `n` of a run is (the script of every published run: the
/// in-process `scripted` agent's steps, so that both scenarios send the same events).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Text,
    ToolExec,
    ToolDone,
    End,
}

impl Kind {
    pub fn type_name(self) -> &'static [u8] {
        match self {
            Kind::Text => b"partial_result",
            Kind::ToolExec => b"tool_executing",
            Kind::ToolDone => b"tool_completed",
            Kind::End => b"agent_completed",
        }
    }
}

/// The kinds of events n = 1, 2, ... of every published run: `--steps` steps, every
/// `--tool-every`-th a tool call (two events), then `agent_completed`. With `agent_started`
/// (the server's) that is `Params::events_per_run` events, as for a scripted run.
pub fn script(p: &Params) -> Vec<Kind> {
    let mut kinds = Vec::with_capacity(p.events_per_run());
    for i in 0..p.steps {
        if p.tool_every > 0 && (i + 1) % p.tool_every == 0 {
            kinds.extend([Kind::ToolExec, Kind::ToolDone]);
        } else {
            kinds.push(Kind::Text);
        }
    }
    kinds.push(Kind::End);
    kinds
}

/// `RUN_ID/N;`: in every published event's data, so that a tab can tell which event of which
/// run it got, whatever order the server writes the members in.
fn marker(out: &mut Vec<u8>, run_id: &[u8], n: u64) {
    out.extend_from_slice(run_id);
    out.push(b'/');
    out.extend_from_slice(n.to_string().as_bytes());
    out.push(b';');
}

/// The text of a `partial_result`: the marker, padded to `--payload` bytes (the text differs
/// for every event of every run: a tab that got another event's text fails).
fn text(out: &mut Vec<u8>, run_id: &[u8], n: u64, payload: usize) {
    let start = out.len();
    marker(out, run_id, n);
    const FILL: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut i = 0;
    while out.len() - start < payload {
        out.push(FILL[i % FILL.len()]);
        i += 1;
    }
}

/// One event `n` as a publisher sends it (JSON, appended to `out`); its data is that of event
/// `content` (`n`, but for an injected fault).
fn event_json(
    out: &mut Vec<u8>,
    kinds: &[Kind],
    run_id: &[u8],
    n: u64,
    content: u64,
    payload: usize,
) {
    out.extend_from_slice(b"{\"n\":");
    out.extend_from_slice(n.to_string().as_bytes());
    out.extend_from_slice(b",\"type\":\"");
    let kind = kinds[(n - 1) as usize];
    out.extend_from_slice(kind.type_name());
    out.extend_from_slice(b"\",\"data\":");
    match kind {
        Kind::Text => {
            out.extend_from_slice(b"{\"text\":\"");
            text(out, run_id, content, payload);
            out.extend_from_slice(b"\"}");
        }
        Kind::ToolExec => {
            out.extend_from_slice(
                format!("{{\"tool_call_id\":\"c{n}\",\"tool\":\"search\",\"args\":{{\"q\":\"")
                    .as_bytes(),
            );
            marker(out, run_id, n);
            out.extend_from_slice(b"\"}}");
        }
        Kind::ToolDone => {
            // The call opened by the event just before.
            out.extend_from_slice(
                format!(
                    "{{\"tool_call_id\":\"c{}\",\"tool\":\"search\",\"ok\":true,\"result\":{{\"q\":\"",
                    n - 1
                )
                .as_bytes(),
            );
            marker(out, run_id, n);
            out.extend_from_slice(b"\"}}");
        }
        Kind::End => {
            out.extend_from_slice(b"{\"status\":\"succeeded\",\"result\":\"");
            marker(out, run_id, n);
            out.extend_from_slice(b"\"}");
        }
    }
    out.push(b'}');
}

/// What a tab checks of the `n`th published event of a run (its `n`: its place after
/// `agent_started`): its type, and that its data is the one published under that `n` (the
/// whole text for a `partial_result`, the marker and call id otherwise). `scratch` is the
/// tab's buffer, reused. The message says what came instead: an earlier event again (a
/// duplicate), a later one (a loss), or something else.
pub fn check_event(
    kinds: &[Kind],
    payload: usize,
    run_id: &[u8],
    n: u64,
    kind: &[u8],
    frame: &[u8],
    scratch: &mut Vec<u8>,
) -> Result<(), String> {
    let run = String::from_utf8_lossy(run_id);
    let Some(&want) = kinds.get((n as usize).wrapping_sub(1)) else {
        return Err(format!(
            "run {run}: event {n} after the script's last ({})",
            kinds.len()
        ));
    };
    scratch.clear();
    scratch.push(b'"');
    match want {
        Kind::Text => text(scratch, run_id, n, payload),
        _ => marker(scratch, run_id, n),
    }
    scratch.push(b'"');
    let mut ok = kind == want.type_name() && contains(frame, scratch);
    if ok && matches!(want, Kind::ToolExec | Kind::ToolDone) {
        let call = if want == Kind::ToolExec { n } else { n - 1 };
        ok = contains(frame, format!("\"c{call}\"").as_bytes());
    }
    if ok {
        return Ok(());
    }
    let got = carried_n(frame, run_id);
    let what = match got {
        Some(g) if g < n => {
            format!("the event published as n={g} again (duplicated; n={n} expected)")
        }
        Some(g) if g == n + 1 => format!("the event published as n={g} (n={n} lost)"),
        Some(g) if g > n => format!("the event published as n={g} (n={n} to {} lost)", g - 1),
        Some(_) => format!(
            "n={n} but not as published (type {}, expected {})",
            String::from_utf8_lossy(kind),
            String::from_utf8_lossy(want.type_name())
        ),
        None => format!(
            "a {} without this run's marker (n={n} expected)",
            String::from_utf8_lossy(kind)
        ),
    };
    let mut shown = String::from_utf8_lossy(frame).into_owned();
    if shown.len() > 300 {
        let mut cut = 300;
        while !shown.is_char_boundary(cut) {
            cut -= 1;
        }
        shown.truncate(cut);
        shown.push_str("...");
    }
    Err(format!(
        "run {run}: event {n} after agent_started is {what}: {shown}"
    ))
}

/// The `n` of the first `RUN_ID/N;` marker in a frame.
fn carried_n(frame: &[u8], run_id: &[u8]) -> Option<u64> {
    let mut needle = run_id.to_vec();
    needle.push(b'/');
    let at = frame.windows(needle.len()).position(|w| w == needle)? + needle.len();
    let digits = frame[at..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    std::str::from_utf8(&frame[at..at + digits])
        .ok()?
        .parse()
        .ok()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || hay.windows(needle.len()).any(|w| w == needle)
}

/// An answer: status and body.
struct Answer {
    status: u16,
    body: Vec<u8>,
}

/// One keep-alive HTTP/1.1 connection. Answers must have a `Content-Length` (actix-web's JSON
/// answers do); anything else is an error, never a guess.
struct Conn {
    addr: SocketAddr,
    host: String,
    stream: Option<TcpStream>,
    buf: Vec<u8>,
    req: Vec<u8>,
}

/// Longest wait for one answer: a server that takes longer is stuck, for this harness.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

impl Conn {
    fn new(addr: SocketAddr, host: String) -> Conn {
        Conn {
            addr,
            host,
            stream: None,
            buf: Vec::with_capacity(4096),
            req: Vec::with_capacity(4096),
        }
    }

    /// POST `body` to `path`; `Err` on a transport or framing error (the connection is then
    /// dropped: the next request opens another, and the caller counts it).
    async fn post(&mut self, path: &str, auth: &str, body: &[u8]) -> Result<Answer, String> {
        let r = tokio::time::timeout(ANSWER_TIMEOUT, self.post_once(path, auth, body))
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {} s", ANSWER_TIMEOUT.as_secs())));
        if r.is_err() {
            self.stream = None;
        }
        r
    }

    async fn post_once(&mut self, path: &str, auth: &str, body: &[u8]) -> Result<Answer, String> {
        if self.stream.is_none() {
            let s = TcpStream::connect(self.addr)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            // Requests are written whole; do not let Nagle hold one back.
            let _ = s.set_nodelay(true);
            self.stream = Some(s);
            self.buf.clear();
        }
        let stream = self.stream.as_mut().ok_or("no connection")?;
        self.req.clear();
        self.req.extend_from_slice(
            format!(
                "POST {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: {auth}\r\n\
                 Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                self.host,
                body.len()
            )
            .as_bytes(),
        );
        self.req.extend_from_slice(body);
        stream
            .write_all(&self.req)
            .await
            .map_err(|e| format!("write: {e}"))?;
        // The head.
        let head_end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if self.buf.len() > 64 * 1024 {
                return Err("an answer's head over 64 KiB".into());
            }
            read_more(stream, &mut self.buf).await?;
        };
        let head = std::str::from_utf8(&self.buf[..head_end])
            .map_err(|_| "an answer's head is not UTF-8".to_string())?;
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or("");
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad status line {status_line:?}"))?;
        let mut length = None;
        let mut close = false;
        for line in lines {
            let Some((k, v)) = line.split_once(':') else {
                continue;
            };
            let v = v.trim();
            if k.eq_ignore_ascii_case("content-length") {
                length = Some(v.parse::<usize>().map_err(|_| format!("bad {line:?}"))?);
            } else if k.eq_ignore_ascii_case("transfer-encoding") {
                return Err(format!(
                    "{line:?}: the harness reads Content-Length bodies only"
                ));
            } else if k.eq_ignore_ascii_case("connection") && v.eq_ignore_ascii_case("close") {
                close = true;
            }
        }
        let length = length.ok_or_else(|| format!("{status_line}: no Content-Length"))?;
        while self.buf.len() < head_end + length {
            read_more(stream, &mut self.buf).await?;
        }
        let body = self.buf[head_end..head_end + length].to_vec();
        self.buf.drain(..head_end + length);
        if close {
            self.stream = None;
        }
        Ok(Answer { status, body })
    }
}

async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<(), String> {
    let mut chunk = [0u8; 8192];
    let n = stream
        .read(&mut chunk)
        .await
        .map_err(|e| format!("read: {e}"))?;
    if n == 0 {
        return Err("the server closed the connection".into());
    }
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
}

/// A small deterministic generator (xorshift64*): the same publishers retry the same batches
/// from one run of the harness to the next.
struct Rng(u64);

impl Rng {
    fn unit(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// One run being published.
struct Live {
    user: Arc<User>,
    run_id: String,
    /// The next event number not sent yet.
    next: u64,
    /// The previous batch's first and last `n` (for an overlapping batch).
    prev: Option<(u64, u64)>,
}

/// What one publisher measured, returned when it ends.
pub struct PublisherOutcome {
    /// POST of a batch to its answer, microseconds (every batch, resent ones included).
    pub batch_rtt: Histogram<u64>,
    pub runs_created: HashMap<usize, usize>,
}

fn now_us(sh: &Shared) -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
    (now - sh.t0_unix_us).max(0) as u64
}

/// How long the server asks to wait before a retry (`retry_after_ms`), within reason.
fn retry_after(body: &Value) -> Duration {
    Duration::from_millis(
        body["retry_after_ms"]
            .as_u64()
            .unwrap_or(100)
            .clamp(10, 2_000),
    )
}

/// Why a publisher stopped early (the fault is already counted).
struct Stop;

/// One publisher: waits for the gate, then publishes `users`' runs (each user `--runs` runs,
/// `--concurrency` at a time), one batch of one run after the other, round robin, on one
/// connection, until all are done or the harness stops.
pub async fn run_publisher(
    sh: Arc<Shared>,
    idx: usize,
    users: Vec<Arc<User>>,
    auth: String,
) -> PublisherOutcome {
    let mut out = PublisherOutcome {
        batch_rtt: crate::stats::histogram(),
        runs_created: HashMap::new(),
    };
    let mut gate = sh.gate.clone();
    while !*gate.borrow() {
        if gate.changed().await.is_err() {
            return out;
        }
    }
    let node = &sh.endpoints[0];
    let mut conn = Conn::new(node.addr, node.host.clone());
    let mut publisher = Publisher {
        sh: &sh,
        conn: &mut conn,
        auth: &auth,
        idx,
        rng: Rng(0x9e37_79b9_7f4a_7c15 ^ ((idx as u64 + 1) << 17)),
        kinds: script(&sh.params),
        // Once, in publisher 0's first run.
        inject: if idx == 0 { sh.params.inject } else { None },
        body: Vec::with_capacity(1024),
        out: &mut out,
    };
    let _ = publisher.publish_all(users).await;
    out
}

struct Publisher<'a> {
    sh: &'a Shared,
    conn: &'a mut Conn,
    auth: &'a str,
    idx: usize,
    rng: Rng,
    kinds: Vec<Kind>,
    inject: Option<Inject>,
    body: Vec<u8>,
    out: &'a mut PublisherOutcome,
}

impl Publisher<'_> {
    /// Whose data event `n` carries: its own, but for the one event an `--inject` fault
    /// changes (the first text event between two text events), once.
    fn inject(&mut self, n: u64) -> u64 {
        let Some(fault) = self.inject else { return n };
        let i = (n - 1) as usize;
        let text_at = |i: usize| self.kinds.get(i) == Some(&Kind::Text);
        if n < 2 || !(text_at(i - 1) && text_at(i) && text_at(i + 1)) {
            return n;
        }
        self.inject = None;
        match fault {
            Inject::Duplicate => n - 1,
            Inject::Drop => n + 1,
        }
    }

    fn fail(&self, msg: String) -> Stop {
        let sh = self.sh;
        sh.fail(&sh.faults.publish_errors, || {
            format!("publisher {}: {msg}", self.idx)
        });
        Stop
    }

    fn stopped(&self) -> bool {
        *self.sh.stop.borrow()
    }

    async fn publish_all(&mut self, users: Vec<Arc<User>>) -> Result<(), Stop> {
        let p = &self.sh.params;
        let mut live: VecDeque<Live> = VecDeque::new();
        let mut to_start: Vec<(Arc<User>, usize)> =
            users.into_iter().map(|u| (u, p.runs)).collect();
        // The first runs of every user, `--concurrency` each.
        for (user, left) in &mut to_start {
            for _ in 0..p.concurrency.min(*left) {
                *left -= 1;
                live.push_back(self.create(user.clone()).await?);
            }
        }
        let mut left: HashMap<usize, usize> =
            to_start.into_iter().map(|(u, n)| (u.idx, n)).collect();
        let total = self.kinds.len() as u64;
        while let Some(mut run) = live.pop_front() {
            if self.stopped() {
                return Err(Stop);
            }
            self.next_batch(&mut run).await?;
            if run.next > total {
                let n = left.entry(run.user.idx).or_default();
                if *n > 0 {
                    *n -= 1;
                    live.push_back(self.create(run.user.clone()).await?);
                }
            } else {
                live.push_back(run);
            }
        }
        Ok(())
    }

    /// `POST /v1/publish/runs` until it is taken (a refusal for the user's limits is retried
    /// after the delay the server asks for).
    async fn create(&mut self, user: Arc<User>) -> Result<Live, Stop> {
        let body = serde_json::json!({"user": user.name, "agent": "bench-publisher"}).to_string();
        loop {
            if self.stopped() {
                return Err(Stop);
            }
            // Not retried on a transport error: the run may have been created.
            let a = self
                .conn
                .post("/v1/publish/runs", self.auth, body.as_bytes())
                .await
                .map_err(|e| self.fail(format!("creating a run for {}: {e}", user.name)))?;
            let v: Value = serde_json::from_slice(&a.body).unwrap_or(Value::Null);
            match a.status {
                201 => {
                    let Some(run_id) = v["run_id"].as_str() else {
                        return Err(self.fail(format!("201 without run_id: {v}")));
                    };
                    user.acked.lock().unwrap().push(run_id.as_bytes().into());
                    *self.out.runs_created.entry(user.idx).or_default() += 1;
                    return Ok(Live {
                        user,
                        run_id: run_id.to_string(),
                        next: 1,
                        prev: None,
                    });
                }
                429 => {
                    self.sh
                        .events
                        .start_refusals
                        .fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(retry_after(&v)).await;
                }
                s => {
                    return Err(self.fail(format!(
                        "creating a run for {}: {s} {}",
                        user.name,
                        String::from_utf8_lossy(&a.body)
                    )))
                }
            }
        }
    }

    /// The run's next batch of up to `--batch` new events; by chance (`--retry-rate`) the last
    /// half of the previous batch in front of them, or the whole batch sent again after it.
    async fn next_batch(&mut self, run: &mut Live) -> Result<(), Stop> {
        let p = &self.sh.params;
        let total = self.kinds.len() as u64;
        let last = (run.next + p.batch as u64 - 1).min(total);
        let roll = if p.retry_rate > 0.0 {
            self.rng.unit()
        } else {
            1.0
        };
        let mut first = run.next;
        if roll < p.retry_rate / 2.0 {
            if let Some((a, b)) = run.prev {
                // The last half of it (at least its last event).
                let len = b + 1 - a;
                first = b + 1 - (len / 2).max(1);
                self.sh
                    .events
                    .publish_overlapped
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        self.body.clear();
        self.body.extend_from_slice(b"{\"events\":[");
        for n in first..=last {
            if n > first {
                self.body.push(b',');
            }
            let content = self.inject(n);
            event_json(
                &mut self.body,
                &self.kinds,
                run.run_id.as_bytes(),
                n,
                content,
                p.payload,
            );
        }
        self.body.extend_from_slice(b"]}");
        let new = last + 1 - run.next;
        self.send(run, new, last).await?;
        if roll >= p.retry_rate / 2.0 && roll < p.retry_rate {
            // As a publisher does when the answer was lost: nothing of it may count again.
            self.sh
                .events
                .publish_resent
                .fetch_add(1, Ordering::Relaxed);
            self.send(run, 0, last).await?;
        }
        run.prev = Some((run.next, last));
        run.next = last + 1;
        Ok(())
    }

    /// Posts `self.body` until it is answered 200 (429 and transport errors are retried: a
    /// batch is idempotent), and checks that it added `new` events and `last_n` is `last`.
    async fn send(&mut self, run: &Live, new: u64, last: u64) -> Result<(), Stop> {
        let path = format!("/v1/publish/runs/{}/events", run.run_id);
        let mut transport_errors = 0;
        loop {
            if self.stopped() {
                return Err(Stop);
            }
            let sent = Instant::now();
            let a = match self.conn.post(&path, self.auth, &self.body).await {
                Ok(a) => a,
                Err(e) => {
                    transport_errors += 1;
                    self.sh
                        .events
                        .publish_reconnects
                        .fetch_add(1, Ordering::Relaxed);
                    if transport_errors > 3 {
                        return Err(self.fail(format!("posting to {}: {e}", run.run_id)));
                    }
                    continue;
                }
            };
            self.out
                .batch_rtt
                .saturating_record((sent.elapsed().as_micros() as u64).max(1));
            self.sh
                .events
                .publish_batches
                .fetch_add(1, Ordering::Relaxed);
            let v: Value = serde_json::from_slice(&a.body).unwrap_or(Value::Null);
            match a.status {
                200 => {
                    let (accepted, last_n) = (v["accepted"].as_u64(), v["last_n"].as_u64());
                    if accepted != Some(new) || last_n != Some(last) {
                        let sh = self.sh;
                        sh.fail(&sh.faults.publish_accepted, || {
                            format!(
                                "publisher {}: run {} ({}): batch ending at n={last} answered {v}, \
                                 expected accepted {new}, last_n {last}",
                                self.idx, run.run_id, run.user.name
                            )
                        });
                    }
                    let ev = &self.sh.events;
                    ev.publish_accepted
                        .fetch_add(accepted.unwrap_or(0), Ordering::Relaxed);
                    ev.publish_last_accept_us
                        .fetch_max(now_us(self.sh), Ordering::Relaxed);
                    return Ok(());
                }
                429 => {
                    // The user's events are held back for a tab catching up: retry later.
                    self.sh.events.publish_429.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(retry_after(&v)).await;
                }
                s => {
                    return Err(self.fail(format!(
                        "run {} ({}): batch ending at n={last}: {s} {}",
                        run.run_id,
                        run.user.name,
                        String::from_utf8_lossy(&a.body)
                    )))
                }
            }
        }
    }
}

/// Run at start, like `scan::self_check`: the check of a published event must take the event
/// published at its place and refuse an earlier one (a duplicate) and a later one (a loss).
pub fn self_check() {
    let kinds = [
        Kind::Text,
        Kind::ToolExec,
        Kind::ToolDone,
        Kind::Text,
        Kind::End,
    ];
    let run = b"r_selfcheck";
    let frame = |n: u64| {
        let mut e = Vec::new();
        event_json(&mut e, &kinds, run, n, n, 40);
        // A frame as the server writes it: the event's members around the publisher's data.
        let v: Value = serde_json::from_slice(&e).expect("self-check event is JSON");
        format!(
            "{{\"seq\":9,\"type\":{},\"run_id\":\"r_selfcheck\",\"data\":{}}}",
            v["type"], v["data"]
        )
    };
    let mut scratch = Vec::new();
    for n in 1..=kinds.len() as u64 {
        let f = frame(n);
        let kind = kinds[n as usize - 1].type_name();
        assert!(
            check_event(&kinds, 40, run, n, kind, f.as_bytes(), &mut scratch).is_ok(),
            "publish self-check: event {n} refused: {f}"
        );
    }
    let dup = frame(1);
    let e = check_event(
        &kinds,
        40,
        run,
        4,
        b"partial_result",
        dup.as_bytes(),
        &mut scratch,
    );
    assert!(
        e.is_err_and(|m| m.contains("duplicated")),
        "publish self-check: duplicate taken"
    );
    let later = frame(4);
    let e = check_event(
        &kinds,
        40,
        run,
        1,
        b"partial_result",
        later.as_bytes(),
        &mut scratch,
    );
    assert!(
        e.is_err_and(|m| m.contains("lost")),
        "publish self-check: loss taken"
    );
}
