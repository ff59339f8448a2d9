//! One task per tab (a WebSocket connection of a user, kept across reconnects): connects,
//! drives runs (tab 0 of each user), reads every frame, checks it on the spot and keeps what
//! the figures need (receipt time and latency per `seq`). Cheap by design: a run event is read
//! with [`scan`](crate::scan::scan), never parsed into a tree.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{watch, Notify, Semaphore};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;

use crate::cli::{Params, Scenario};
use crate::scan::{parse_rfc3339_micros, scan};

pub type Ws = WebSocketStream<TcpStream>;

/// `Rec::recv_us` of a `seq` that never arrived.
pub const MISSING: u32 = u32::MAX;
/// Set in `Rec::lat_us` for an event that came in a replay (resume), not live.
pub const REPLAYED: u32 = 1 << 31;

/// What a tab kept of one event, indexed by `seq - base_seq`.
#[derive(Debug, Clone, Copy)]
pub struct Rec {
    /// Receipt, microseconds since the harness's `t0`.
    pub recv_us: u32,
    /// Receipt minus the event's `ts`, microseconds (0 if negative), `| REPLAYED` if replayed.
    pub lat_us: u32,
    /// A hash of the frame's bytes: every tab of the user must have the same under each seq.
    pub digest: u32,
}

impl Rec {
    const MISSING: Rec = Rec {
        recv_us: MISSING,
        lat_us: 0,
        digest: 0,
    };
}

/// A cheap hash of a frame (8 bytes at a time), to compare what the tabs of a user got
/// under one seq without keeping the frames. Not for adversaries: for divergence.
pub fn digest(b: &[u8]) -> u32 {
    const K: u64 = 0x517c_c1b7_2722_0a95;
    let mut h = b.len() as u64;
    let mut chunks = b.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_le_bytes(c.try_into().expect("8 bytes"));
        h = (h.rotate_left(5) ^ w).wrapping_mul(K);
    }
    let mut tail = [0u8; 8];
    tail[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
    h = (h.rotate_left(5) ^ u64::from_le_bytes(tail)).wrapping_mul(K);
    (h ^ (h >> 32)) as u32
}

/// Where one node of the server listens.
pub struct Endpoint {
    pub addr: SocketAddr,
    /// Host header and path of the WebSocket endpoint.
    pub host: String,
    pub path: String,
}

/// Counters of everything that went wrong; any non-zero one fails the scenario.
#[derive(Default)]
pub struct Faults {
    pub gaps: AtomicU64,
    pub duplicates: AtomicU64,
    pub foreign: AtomicU64,
    pub bad_frames: AtomicU64,
    pub bad_order: AtomicU64,
    /// Two tabs of one user got different events under the same seq.
    pub diverged: AtomicU64,
    pub runs_not_succeeded: AtomicU64,
    pub unexpected_closes: AtomicU64,
    pub error_frames: AtomicU64,
    pub connect_failures: AtomicU64,
    pub resume_failures: AtomicU64,
    pub incomplete: AtomicU64,
    pub slow_not_dropped: AtomicU64,
    /// publish: an event that is not the one published at its place in its run (another's
    /// text, an earlier event again, a later one).
    pub wrong_event: AtomicU64,
    /// publish: a publisher's request refused or failed (not a 429).
    pub publish_errors: AtomicU64,
    /// publish: a batch answered with an `accepted` or `last_n` other than its new events.
    pub publish_accepted: AtomicU64,
}

impl Faults {
    pub fn all(&self) -> Vec<(&'static str, u64)> {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        vec![
            ("gaps", l(&self.gaps)),
            ("duplicates", l(&self.duplicates)),
            ("foreign", l(&self.foreign)),
            ("bad_frames", l(&self.bad_frames)),
            ("bad_order", l(&self.bad_order)),
            ("diverged", l(&self.diverged)),
            ("runs_not_succeeded", l(&self.runs_not_succeeded)),
            ("unexpected_closes", l(&self.unexpected_closes)),
            ("error_frames", l(&self.error_frames)),
            ("connect_failures", l(&self.connect_failures)),
            ("resume_failures", l(&self.resume_failures)),
            ("incomplete", l(&self.incomplete)),
            ("slow_not_dropped", l(&self.slow_not_dropped)),
            ("wrong_event", l(&self.wrong_event)),
            ("publish_errors", l(&self.publish_errors)),
            ("publish_accepted", l(&self.publish_accepted)),
        ]
    }
}

/// Storm and slow-consumer observations.
#[derive(Default)]
pub struct Events {
    pub connect_retries: AtomicU64,
    pub start_refusals: AtomicU64,
    pub negative_latency: AtomicU64,
    /// storm: tabs that dropped and got their welcome back; latest welcome and `resumed`,
    /// microseconds after the storm.
    pub storm_reconnected: AtomicU64,
    pub storm_last_welcome_us: AtomicU64,
    pub storm_last_resumed_us: AtomicU64,
    pub replayed: AtomicU64,
    pub resumes: AtomicU64,
    /// slow: how the slow tabs' connections ended, and how many resumed to completion.
    pub slow_close_4008: AtomicU64,
    pub slow_close_other: AtomicU64,
    pub slow_reset: AtomicU64,
    pub slow_eof: AtomicU64,
    /// slow: events a slow tab read after it started reading again, before the end.
    pub slow_backlog: AtomicU64,
    /// publish: batches answered (resent ones and 429s included), events they added, batches
    /// deliberately sent twice / overlapping the previous one, 429 answers, reconnects.
    pub publish_batches: AtomicU64,
    pub publish_accepted: AtomicU64,
    pub publish_resent: AtomicU64,
    pub publish_overlapped: AtomicU64,
    pub publish_429: AtomicU64,
    pub publish_reconnects: AtomicU64,
    /// publish: the latest answer that accepted a batch, microseconds since t0.
    pub publish_last_accept_us: AtomicU64,
}

pub struct User {
    pub idx: usize,
    pub name: String,
    pub token: HeaderValue,
    /// Run ids from the driver's acks: the only runs this user's tabs may see.
    pub acked: Mutex<Vec<Box<[u8]>>>,
    /// Set when the driver tab has seen all of the user's runs complete.
    pub runs_done: AtomicBool,
}

pub struct Shared {
    pub params: Params,
    /// The server's nodes: tab k of every user connects to node k mod their number.
    pub endpoints: Vec<Endpoint>,
    pub sources: Vec<Ipv4Addr>,
    pub ws_config: WebSocketConfig,
    pub t0_unix_us: i64,
    pub start_run: Utf8Bytes,
    pub events_per_run: u32,
    /// publish: the kinds of a published run's events n = 1, 2, ... (empty otherwise).
    pub script: Vec<crate::publish::Kind>,
    pub connect_sem: Semaphore,
    pub gate: watch::Receiver<bool>,
    pub stop: watch::Receiver<bool>,
    pub run_start: OnceLock<Instant>,
    pub connected: AtomicUsize,
    pub connected_notify: Notify,
    pub finished: AtomicUsize,
    pub finished_notify: Notify,
    /// Runs completed, as seen by any tab: the run phase is stalled when it stops moving.
    pub progress: AtomicU64,
    pub faults: Faults,
    pub events: Events,
    pub messages: Mutex<Vec<String>>,
}

impl Shared {
    pub fn fail(&self, counter: &AtomicU64, msg: impl FnOnce() -> String) {
        counter.fetch_add(1, Ordering::Relaxed);
        let mut m = self.messages.lock().unwrap();
        if m.len() < 40 {
            m.push(msg());
        }
    }

    fn now_unix_us() -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as i64)
            .unwrap_or(0)
    }

    fn storm_at(&self) -> Option<Instant> {
        (self.params.scenario == Scenario::Storm).then(|| {
            *self.run_start.get().expect("run started")
                + Duration::from_millis(self.params.storm_after_ms)
        })
    }
}

/// The scripted input of every run.
pub fn start_run_frame(p: &Params) -> String {
    let mut steps = Vec::with_capacity(p.steps * 2);
    let text: String = "abcdefghijklmnopqrstuvwxyz0123456789"
        .chars()
        .cycle()
        .take(p.payload)
        .collect();
    for i in 0..p.steps {
        if p.step_sleep_ms > 0 {
            steps.push(serde_json::json!({"sleep_ms": p.step_sleep_ms}));
        }
        if p.tool_every > 0 && (i + 1) % p.tool_every == 0 {
            steps.push(serde_json::json!({"tool":"calculator","args":{"expr":"2+3*4"}}));
        } else {
            steps.push(serde_json::json!({"text": text}));
        }
    }
    serde_json::json!({"type":"start_run","agent":"scripted","input":{"steps":steps}}).to_string()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlowPhase {
    /// Not a slow tab.
    No,
    /// Will stop reading when the runs start.
    Waiting,
    /// Reading again after the pause: expects its connection to end.
    Reading,
    /// Was dropped and resumed.
    Resumed,
}

#[derive(Debug, Default)]
struct RunSeen {
    events: u32,
    completed: bool,
}

/// One tab: its connection's state while it runs, and what it kept.
pub struct Tab {
    pub user: Arc<User>,
    pub tab: usize,
    pub global: usize,
    pub driver: bool,
    pub slow: SlowPhase,
    pub epoch: String,
    pub base_seq: u64,
    pub next_seq: u64,
    pub recs: Vec<Rec>,
    pub replaying: bool,
    /// publish: a buffer for the expected text of an event.
    scratch: Vec<u8>,
    runs: HashMap<Box<[u8]>, RunSeen>,
    pub completed: usize,
    pub done: bool,
    // Driver only.
    sent: usize,
    pending: usize,
    retry_at: Option<Instant>,
    // Storm.
    stormed: bool,
    storm_wanted: bool,
    storm_dropped_at: Option<Instant>,
}

enum Ended {
    Stop,
    Gone(String),
}

impl Tab {
    fn new(user: Arc<User>, tab: usize, global: usize, p: &Params) -> Tab {
        let slow = if p.scenario == Scenario::Slow && tab == 1 && user.idx < p.slow_clients {
            SlowPhase::Waiting
        } else {
            SlowPhase::No
        };
        Tab {
            user,
            tab,
            global,
            // A published run is started by its publisher, not by a tab.
            driver: tab == 0 && p.scenario != Scenario::Publish,
            slow,
            epoch: String::new(),
            base_seq: 1,
            next_seq: 1,
            recs: Vec::with_capacity(if p.has_runs() {
                p.runs * p.events_per_run()
            } else {
                0
            }),
            replaying: false,
            scratch: Vec::new(),
            runs: HashMap::new(),
            completed: 0,
            done: false,
            sent: 0,
            pending: 0,
            retry_at: None,
            stormed: false,
            storm_wanted: false,
            storm_dropped_at: None,
        }
    }

    fn label(&self) -> String {
        format!("{} tab {}", self.user.name, self.tab)
    }

    /// Handles one text frame. Returns false if it is the end of this tab's work.
    fn on_text(&mut self, sh: &Shared, b: &[u8]) {
        let recv = Shared::now_unix_us();
        let Some(f) = scan(b) else {
            return sh.fail(&sh.faults.bad_frames, || {
                format!(
                    "{}: unreadable frame {:?}",
                    self.label(),
                    String::from_utf8_lossy(b)
                )
            });
        };
        let Some(seq) = f.seq else {
            return self.on_control(sh, b);
        };
        if seq < self.next_seq {
            return sh.fail(&sh.faults.duplicates, || {
                format!(
                    "{}: seq {seq} again (expected {})",
                    self.label(),
                    self.next_seq
                )
            });
        }
        if seq > self.next_seq {
            sh.fail(&sh.faults.gaps, || {
                format!(
                    "{}: seq {} to {} missing (got {seq})",
                    self.label(),
                    self.next_seq,
                    seq - 1
                )
            });
            for _ in self.next_seq..seq {
                self.recs.push(Rec::MISSING);
            }
        }
        self.next_seq = seq + 1;
        let ts = f.ts.and_then(parse_rfc3339_micros);
        let Some(ts) = ts else {
            sh.fail(&sh.faults.bad_frames, || {
                format!("{}: seq {seq} has no readable ts", self.label())
            });
            self.recs.push(Rec::MISSING);
            return;
        };
        let lat = recv - ts;
        if lat < 0 {
            sh.events.negative_latency.fetch_add(1, Ordering::Relaxed);
        }
        let mut lat_us = lat.clamp(0, (REPLAYED - 1) as i64) as u32;
        if self.replaying {
            lat_us |= REPLAYED;
            sh.events.replayed.fetch_add(1, Ordering::Relaxed);
        }
        self.recs.push(Rec {
            recv_us: (recv - sh.t0_unix_us).clamp(0, (MISSING - 1) as i64) as u32,
            lat_us,
            digest: digest(b),
        });
        let (Some(run_id), Some(kind)) = (f.run_id, f.kind) else {
            return sh.fail(&sh.faults.bad_frames, || {
                format!("{}: seq {seq} lacks run_id or type", self.label())
            });
        };
        let run = match self.runs.get_mut(run_id) {
            Some(r) => r,
            None => {
                if kind != b"agent_started" {
                    sh.fail(&sh.faults.bad_order, || {
                        format!(
                            "{}: first event of {} is {}",
                            self.label(),
                            String::from_utf8_lossy(run_id),
                            String::from_utf8_lossy(kind)
                        )
                    });
                }
                self.runs.entry(run_id.into()).or_default()
            }
        };
        if run.completed {
            return sh.fail(&sh.faults.bad_order, || {
                format!(
                    "{}: seq {seq} of {} after its agent_completed",
                    self.label(),
                    String::from_utf8_lossy(run_id)
                )
            });
        }
        run.events += 1;
        if !sh.script.is_empty() && run.events > 1 {
            // Published: the event must be the one published at this place of its run.
            let n = (run.events - 1) as u64;
            if let Err(what) = crate::publish::check_event(
                &sh.script,
                sh.params.payload,
                run_id,
                n,
                kind,
                b,
                &mut self.scratch,
            ) {
                // Not `self.label()`: `run` still borrows `self.runs`.
                sh.fail(&sh.faults.wrong_event, || {
                    format!("{} tab {}: {what}", self.user.name, self.tab)
                });
            }
        }
        if kind == b"agent_completed" {
            run.completed = true;
            let events = run.events;
            if events != sh.events_per_run {
                sh.fail(&sh.faults.gaps, || {
                    format!(
                        "{}: run {} ended after {events} events, expected {}",
                        self.label(),
                        String::from_utf8_lossy(run_id),
                        sh.events_per_run
                    )
                });
            }
            if !contains(b, br#""status":"succeeded""#) {
                sh.fail(&sh.faults.runs_not_succeeded, || {
                    format!(
                        "{}: run did not succeed: {}",
                        self.label(),
                        String::from_utf8_lossy(b)
                    )
                });
            }
            self.completed += 1;
            sh.progress.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn on_control(&mut self, sh: &Shared, b: &[u8]) {
        let v: serde_json::Value = match serde_json::from_slice(b) {
            Ok(v) => v,
            Err(_) => {
                return sh.fail(&sh.faults.bad_frames, || {
                    format!(
                        "{}: bad JSON {:?}",
                        self.label(),
                        String::from_utf8_lossy(b)
                    )
                })
            }
        };
        match v["type"].as_str().unwrap_or("") {
            "ack" if self.driver && self.pending > 0 => {
                self.pending -= 1;
                match v["run_id"].as_str() {
                    Some(id) => self.user.acked.lock().unwrap().push(id.as_bytes().into()),
                    None => sh.fail(&sh.faults.bad_frames, || {
                        format!("{}: ack without run_id: {v}", self.label())
                    }),
                }
            }
            "error"
                if self.driver
                    && self.pending > 0
                    && matches!(v["code"].as_str(), Some("rate_limited" | "too_many_runs")) =>
            {
                // A refused start: try again later.
                self.pending -= 1;
                self.sent -= 1;
                let wait = v["retry_after_ms"].as_u64().unwrap_or(100).clamp(10, 5_000);
                self.retry_at = Some(Instant::now() + Duration::from_millis(wait));
                sh.events.start_refusals.fetch_add(1, Ordering::Relaxed);
            }
            "error" if v["code"] == "resume_gap" => sh.fail(&sh.faults.resume_failures, || {
                format!("{}: resume refused: {v}", self.label())
            }),
            "resumed" => {
                let (from, to) = (v["from_seq"].as_u64(), v["to_seq"].as_u64());
                if !self.replaying || to.map(|t| t + 1) != Some(self.next_seq) || from.is_none() {
                    sh.fail(&sh.faults.bad_order, || {
                        format!(
                            "{}: unexpected {v} (next seq {})",
                            self.label(),
                            self.next_seq
                        )
                    });
                }
                self.replaying = false;
                if self.storm_dropped_at.take().is_some() {
                    let us = sh.storm_at().map_or(0, |s| {
                        Instant::now().saturating_duration_since(s).as_micros()
                    });
                    sh.events
                        .storm_last_resumed_us
                        .fetch_max(us as u64, Ordering::Relaxed);
                }
            }
            "heartbeat" | "pong" => {}
            _ => sh.fail(&sh.faults.error_frames, || {
                format!("{}: unexpected frame {v}", self.label())
            }),
        }
    }

    /// How many start_runs the driver should send now.
    fn starts_due(&mut self, p: &Params) -> usize {
        if !self.driver || self.sent >= p.runs {
            return 0;
        }
        if let Some(at) = self.retry_at {
            if Instant::now() < at {
                return 0;
            }
            self.retry_at = None;
        }
        let in_flight = self.sent - self.completed.min(self.sent);
        p.concurrency
            .saturating_sub(in_flight)
            .min(p.runs - self.sent)
    }

    fn finished_runs(&self, p: &Params) -> bool {
        self.completed >= p.runs && (!self.driver || self.pending == 0)
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// What the first frame of a connection said.
struct Welcome {
    epoch: String,
    last_seq: u64,
}

/// Longest wait for a TCP connect, the upgrade and the `welcome` frame, before a retry.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens one connection (with retries for transport errors) and reads its `welcome`.
async fn open(
    sh: &Shared,
    t: &Tab,
    resume: Option<(u64, &str)>,
    rcvbuf: Option<usize>,
) -> Result<(Ws, Welcome), String> {
    let mut attempt = 0u32;
    loop {
        let once = tokio::time::timeout(HANDSHAKE_TIMEOUT, open_once(sh, t, resume, rcvbuf));
        let result = once.await.unwrap_or_else(|_| {
            Err((
                format!(
                    "no handshake and welcome within {} s",
                    HANDSHAKE_TIMEOUT.as_secs()
                ),
                true,
            ))
        });
        match result {
            Ok(ok) => return Ok(ok),
            Err((e, retry)) => {
                attempt += 1;
                if !retry || attempt > 6 {
                    return Err(e);
                }
                sh.events.connect_retries.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50 << attempt.min(5))).await;
            }
        }
    }
}

async fn open_once(
    sh: &Shared,
    t: &Tab,
    resume: Option<(u64, &str)>,
    rcvbuf: Option<usize>,
) -> Result<(Ws, Welcome), (String, bool)> {
    let io = |e: std::io::Error| (e.to_string(), true);
    let sock = TcpSocket::new_v4().map_err(io)?;
    if let Some(n) = rcvbuf {
        sock.set_recv_buffer_size(n as u32).map_err(io)?;
    }
    if !sh.sources.is_empty() {
        let ip = sh.sources[t.global % sh.sources.len()];
        let one: libc::c_int = 1;
        // SAFETY: setsockopt on a socket we own, with a c_int option value.
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                &one as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        sock.bind(SocketAddr::new(ip.into(), 0)).map_err(io)?;
    }
    let node = &sh.endpoints[t.tab % sh.endpoints.len()];
    let stream = sock.connect(node.addr).await.map_err(io)?;
    let _ = stream.set_nodelay(true);
    let mut url = format!("ws://{}{}", node.host, node.path);
    if let Some((after, epoch)) = resume {
        url.push_str(&format!(
            "?after_seq={after}&epoch={}",
            percent_encode(epoch)
        ));
    }
    let mut req = url
        .into_client_request()
        .map_err(|e| (e.to_string(), false))?;
    req.headers_mut()
        .insert("authorization", t.user.token.clone());
    let (mut ws, _) = tokio_tungstenite::client_async_with_config(req, stream, Some(sh.ws_config))
        .await
        .map_err(|e| match &e {
            WsError::Http(r) => (format!("HTTP {}", r.status()), false),
            _ => (e.to_string(), true),
        })?;
    match ws.next().await {
        Some(Ok(Message::Text(text))) => {
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| (e.to_string(), false))?;
            if v["type"] != "welcome" {
                return Err((format!("first frame is not welcome: {v}"), false));
            }
            Ok((
                ws,
                Welcome {
                    epoch: v["epoch"].as_str().unwrap_or("").to_string(),
                    last_seq: v["last_seq"].as_u64().unwrap_or(0),
                },
            ))
        }
        Some(Ok(Message::Close(c))) => Err((format!("closed before welcome: {c:?}"), false)),
        Some(Ok(other)) => Err((format!("first frame is not welcome: {other:?}"), false)),
        Some(Err(e)) => Err((e.to_string(), true)),
        None => Err(("connection ended before welcome".into(), true)),
    }
}

/// Reads frames until `stop`, the tab's end, or the connection's end.
/// `until` is an optional deadline at which it returns `Ok(false)`.
async fn pump(
    sh: &Shared,
    t: &mut Tab,
    ws: &mut Ws,
    stop: &mut watch::Receiver<bool>,
    until: Option<Instant>,
) -> Result<bool, Ended> {
    loop {
        let wake = match (until, t.retry_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let msg = tokio::select! {
            biased;
            m = ws.next() => m,
            _ = stop.changed() => return Err(Ended::Stop),
            _ = tokio::time::sleep_until(wake.unwrap_or_else(Instant::now).into()), if wake.is_some() => {
                let now = Instant::now();
                if t.retry_at.is_some_and(|r| r <= now) {
                    send_starts(sh, t, ws).await?;
                }
                if until.is_some_and(|u| u <= now) {
                    return Ok(false);
                }
                continue;
            }
        };
        match msg {
            Some(Ok(Message::Text(text))) => {
                t.on_text(sh, text.as_bytes());
                if t.driver {
                    send_starts(sh, t, ws).await?;
                    if t.storm_wanted && t.pending == 0 {
                        return Ok(false);
                    }
                }
                if !t.done && t.finished_runs(&sh.params) {
                    return Ok(true);
                }
            }
            Some(Ok(Message::Close(c))) => {
                return Err(Ended::Gone(match c {
                    Some(c) => format!("close {} {}", u16::from(c.code), c.reason),
                    None => "close without code".into(),
                }))
            }
            Some(Ok(Message::Binary(_))) => sh.fail(&sh.faults.bad_frames, || {
                format!("{}: binary frame", t.label())
            }),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(Ended::Gone(format!("error {e}"))),
            None => return Err(Ended::Gone("eof".into())),
        }
    }
}

async fn send_starts(sh: &Shared, t: &mut Tab, ws: &mut Ws) -> Result<(), Ended> {
    let n = t.starts_due(&sh.params);
    for _ in 0..n {
        t.sent += 1;
        t.pending += 1;
        ws.feed(Message::Text(sh.start_run.clone()))
            .await
            .map_err(|e| Ended::Gone(format!("send failed: {e}")))?;
    }
    if n > 0 {
        ws.flush()
            .await
            .map_err(|e| Ended::Gone(format!("send failed: {e}")))?;
    }
    Ok(())
}

/// A tab from its first connection to the stop signal. Always counts itself as connected
/// (or failed to) and finished exactly once.
pub async fn run_tab(sh: Arc<Shared>, user: Arc<User>, tab: usize, global: usize) -> Tab {
    let mut t = Tab::new(user, tab, global, &sh.params);
    let mut stop = sh.stop.clone();
    let result = tab_body(&sh, &mut t, &mut stop).await;
    if let Err(msg) = result {
        let counter = if msg.starts_with("connect:") {
            &sh.faults.connect_failures
        } else {
            &sh.faults.unexpected_closes
        };
        sh.fail(counter, || format!("{}: {msg}", t.label()));
        finish(&sh, &mut t);
    }
    t
}

fn finish(sh: &Shared, t: &mut Tab) {
    if !t.done {
        t.done = true;
        if t.driver {
            t.user.runs_done.store(true, Ordering::Release);
        }
        sh.finished.fetch_add(1, Ordering::AcqRel);
        sh.finished_notify.notify_one();
    }
}

async fn tab_body(
    sh: &Arc<Shared>,
    t: &mut Tab,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), String> {
    let p = &sh.params;
    let rcvbuf = (t.slow != SlowPhase::No).then_some(p.slow_rcvbuf);
    let opened = {
        let _permit = sh.connect_sem.acquire().await;
        open(sh, t, None, rcvbuf).await
    };
    let (mut ws, welcome) = match opened {
        Ok(ok) => ok,
        Err(e) => {
            sh.connected.fetch_add(1, Ordering::AcqRel);
            sh.connected_notify.notify_one();
            return Err(format!("connect: {e}"));
        }
    };
    t.epoch = welcome.epoch;
    t.base_seq = welcome.last_seq + 1;
    t.next_seq = t.base_seq;
    sh.connected.fetch_add(1, Ordering::AcqRel);
    sh.connected_notify.notify_one();

    // Until the run phase: keep reading (pongs, heartbeats), nothing is expected.
    let mut gate = sh.gate.clone();
    while !*gate.borrow() {
        tokio::select! {
            m = ws.next() => match m {
                Some(Ok(Message::Text(text))) => t.on_text(sh, text.as_bytes()),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(format!("ended before the runs: {e}")),
                None => return Err("ended before the runs: eof".into()),
            },
            r = gate.changed() => if r.is_err() { return Ok(()) },
            _ = stop.changed() => return Ok(()),
        }
    }
    if !p.has_runs() {
        // idle: hold the connection, answer pings, until told to stop.
        finish(sh, t);
        return match pump(sh, t, &mut ws, stop, None).await {
            Err(Ended::Stop) | Ok(_) => Ok(()),
            Err(Ended::Gone(why)) => Err(why),
        };
    }

    if t.slow == SlowPhase::Waiting {
        // Stop reading until the user's runs are done (or the pause's limit).
        let limit = Instant::now() + Duration::from_millis(p.slow_pause_ms);
        while !t.user.runs_done.load(Ordering::Acquire) && Instant::now() < limit {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                _ = stop.changed() => return Ok(()),
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        t.slow = SlowPhase::Reading;
    }
    if t.driver && p.step_sleep_ms > 0 && p.users > 1 {
        // Paced runs: spread the users' first starts over one step interval, so that their
        // steps do not all fall on the same millisecond (arrivals are not synchronised).
        let offset = p.step_sleep_ms * 1000 * t.user.idx as u64 / p.users as u64;
        t.retry_at = Some(Instant::now() + Duration::from_micros(offset));
    }
    if t.driver {
        send_starts(sh, t, &mut ws).await.map_err(ended_text)?;
    }

    loop {
        let storm_at = if p.scenario == Scenario::Storm && !t.stormed {
            sh.storm_at()
        } else {
            None
        };
        match pump(sh, t, &mut ws, stop, storm_at).await {
            Ok(true) => {
                if t.slow == SlowPhase::Reading {
                    sh.fail(&sh.faults.slow_not_dropped, || {
                        format!(
                            "{}: stopped reading but was never dropped (its outbound queue never \
                             filled: use more --runs or --payload, or a smaller --outbound-queue)",
                            t.label()
                        )
                    });
                }
                if p.scenario == Scenario::Storm && !t.stormed {
                    // Done before the storm: still takes part in it.
                    continue;
                }
                finish(sh, t);
            }
            Ok(false) => {
                // The storm: drop the connection (once no start_run awaits its ack) and come
                // back at once with the last seq seen.
                if t.driver && t.pending > 0 {
                    t.storm_wanted = true;
                    t.stormed = true;
                    continue;
                }
                t.storm_wanted = false;
                t.stormed = true;
                drop(ws);
                t.storm_dropped_at = Some(Instant::now());
                if p.storm_pause_ms > 0 {
                    tokio::time::sleep(Duration::from_millis(p.storm_pause_ms)).await;
                }
                ws = reconnect(sh, t).await?;
                let us = sh.storm_at().map_or(0, |s| {
                    Instant::now().saturating_duration_since(s).as_micros() as u64
                });
                sh.events
                    .storm_last_welcome_us
                    .fetch_max(us, Ordering::Relaxed);
                sh.events.storm_reconnected.fetch_add(1, Ordering::Relaxed);
                if t.driver {
                    send_starts(sh, t, &mut ws).await.map_err(ended_text)?;
                }
            }
            Err(Ended::Stop) => return Ok(()),
            Err(Ended::Gone(why)) if t.slow == SlowPhase::Reading => {
                let counter = if why.starts_with("close 4008") {
                    &sh.events.slow_close_4008
                } else if why.starts_with("close") {
                    &sh.events.slow_close_other
                } else if why == "eof" {
                    &sh.events.slow_eof
                } else {
                    &sh.events.slow_reset
                };
                counter.fetch_add(1, Ordering::Relaxed);
                sh.events
                    .slow_backlog
                    .fetch_add(t.recs.len() as u64, Ordering::Relaxed);
                if why.starts_with("close") && !why.starts_with("close 4008") {
                    sh.fail(&sh.faults.unexpected_closes, || {
                        format!("{}: slow tab closed with {why}, not 4008", t.label())
                    });
                }
                t.slow = SlowPhase::Resumed;
                ws = reconnect(sh, t).await?;
            }
            Err(Ended::Gone(why)) => return Err(why),
        }
    }
}

fn ended_text(e: Ended) -> String {
    match e {
        Ended::Stop => "stopped".into(),
        Ended::Gone(why) => why,
    }
}

/// Connects again with ?after_seq=<last seq>&epoch=<epoch>; the replay follows.
async fn reconnect(sh: &Shared, t: &mut Tab) -> Result<Ws, String> {
    let last = t.next_seq - 1;
    let epoch = t.epoch.clone();
    let (ws, welcome) = open(sh, t, Some((last, &epoch)), None)
        .await
        .map_err(|e| format!("connect: reconnecting: {e}"))?;
    sh.events.resumes.fetch_add(1, Ordering::Relaxed);
    if welcome.epoch != t.epoch {
        sh.fail(&sh.faults.resume_failures, || {
            format!(
                "{}: epoch changed from {} to {} on reconnect",
                t.label(),
                t.epoch,
                welcome.epoch
            )
        });
    }
    t.replaying = true;
    Ok(ws)
}

/// Per-tab results the scenario checks after the run.
pub fn verify_tab(sh: &Shared, t: &Tab) {
    let p = &sh.params;
    if !p.has_runs() {
        return;
    }
    let acked = t.user.acked.lock().unwrap();
    for (run_id, seen) in &t.runs {
        if !acked.iter().any(|a| a == run_id) {
            sh.fail(&sh.faults.foreign, || {
                format!(
                    "{}: events of run {} that its user never started",
                    t.label(),
                    String::from_utf8_lossy(run_id)
                )
            });
        } else if !seen.completed {
            sh.fail(&sh.faults.incomplete, || {
                format!(
                    "{}: run {} incomplete after {} events",
                    t.label(),
                    String::from_utf8_lossy(run_id),
                    seen.events
                )
            });
        }
    }
    for run_id in acked.iter() {
        if !t.runs.contains_key(run_id) {
            sh.fail(&sh.faults.incomplete, || {
                format!(
                    "{}: never saw run {}",
                    t.label(),
                    String::from_utf8_lossy(run_id)
                )
            });
        }
    }
    if t.driver && acked.len() != p.runs {
        sh.fail(&sh.faults.incomplete, || {
            format!("{}: {} of {} runs started", t.label(), acked.len(), p.runs)
        });
    }
}

/// The tabs of one user (whichever node each is on) must have received the same event under
/// each seq they both got: a hash of the frame's bytes is compared, seq by seq.
pub fn verify_user(sh: &Shared, tabs: &[Tab]) {
    let Some(first) = tabs.first() else { return };
    let lo = tabs.iter().map(|t| t.base_seq).min().unwrap_or(1);
    let hi = tabs
        .iter()
        .map(|t| t.base_seq + t.recs.len() as u64)
        .max()
        .unwrap_or(lo);
    let mut reported = 0;
    for seq in lo..hi {
        let mut seen: Option<(&Tab, u32)> = None;
        for t in tabs {
            let Some(r) = seq
                .checked_sub(t.base_seq)
                .and_then(|i| t.recs.get(i as usize))
            else {
                continue;
            };
            if r.recv_us == MISSING {
                continue;
            }
            match seen {
                None => seen = Some((t, r.digest)),
                Some((other, d)) if d != r.digest => {
                    // One count per seq; the first few are named.
                    if reported < 3 {
                        sh.fail(&sh.faults.diverged, || {
                            format!(
                                "{}: seq {seq} differs from {} tab {}'s seq {seq}",
                                t.label(),
                                first.user.name,
                                other.tab
                            )
                        });
                    } else {
                        sh.faults.diverged.fetch_add(1, Ordering::Relaxed);
                    }
                    reported += 1;
                    break;
                }
                Some(_) => {}
            }
        }
    }
}
