//! Several nodes on one Redis (PROTOCOL.md §10): a real `redis-server` as a test fixture, and
//! agentcast nodes against it, as child processes (`agentcast serve --redis-url ...`) or in
//! this process (`agentcast::spawn`).
//!
//! The fixture needs Debian's `redis-server` package (scripts/test.sh installs it). Without it
//! every test that asks for one panics saying so: a missing Redis never skips a test silently.
//!
//! The fixture's methods block (briefly: a signal, or a few milliseconds until a new server
//! answers PING), so they can be called from sync and async tests alike, and from `Drop`.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{http_full, now_unix, Client, HttpResponse, ServeChild, SECRET, TIMEOUT};

/// The program started, looked up on PATH.
pub const REDIS_SERVER: &str = "redis-server";

static FIXTURES: AtomicU64 = AtomicU64::new(0);

/// A `redis-server` of this test alone on a free 127.0.0.1 port, without persistence
/// (`--save '' --appendonly no`): whatever it holds is gone when it stops. Killed on drop.
pub struct RedisServer {
    port: u16,
    /// Its working directory and log files (removed on drop).
    dir: PathBuf,
    child: Option<Child>,
    /// Servers started so far (the first one and every restart), for log file names.
    starts: u32,
}

impl RedisServer {
    /// Starts one and returns once it answers PING. Panics (with its log) if it cannot be
    /// started, and with install instructions if `redis-server` is not installed.
    pub fn start() -> RedisServer {
        let dir = std::env::temp_dir().join(format!(
            "agentcast-redis-{}-{}",
            std::process::id(),
            FIXTURES.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        let mut redis = RedisServer {
            port: 0,
            dir,
            child: None,
            starts: 0,
        };
        // The port is free when picked, but something else may take it before redis-server
        // binds it: then pick another.
        for _ in 0..5 {
            redis.port = free_port();
            match redis.launch() {
                Ok(()) => return redis,
                Err(Launch::PortTaken) => continue,
                Err(Launch::Failed(why)) => panic!("{why}"),
            }
        }
        panic!("redis-server found no free port in 5 attempts")
    }

    /// `redis://127.0.0.1:PORT`: the same for the fixture's whole life, restarts included.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The pid of the running server; panics when it was killed.
    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .map(Child::id)
            .expect("redis-server is not running (killed)")
    }

    /// SIGSTOP: the server holds its connections and answers nothing until [`resume`]d.
    /// Returns once the kernel reports it stopped.
    ///
    /// [`resume`]: RedisServer::resume
    pub fn pause(&self) {
        let pid = self.pid();
        signal(pid, libc::SIGSTOP);
        wait_process_state(pid, true);
    }

    /// SIGCONT after [`pause`](RedisServer::pause); returns once it runs again.
    pub fn resume(&self) {
        let pid = self.pid();
        signal(pid, libc::SIGCONT);
        wait_process_state(pid, false);
    }

    /// SIGKILL, and waits for the process to be gone (its port refuses connections from then
    /// on). Does nothing if it was already killed.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGKILL ends a stopped process too.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the server (if still running) and starts a new, empty one on the same port: what
    /// the nodes see when Redis restarts without persistence. Returns once it answers PING.
    pub fn restart_empty(&mut self) {
        self.kill();
        let deadline = Instant::now() + TIMEOUT;
        loop {
            match self.launch() {
                Ok(()) => return,
                // A connection of the old server may hold the port a moment longer.
                Err(Launch::PortTaken) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(Launch::PortTaken) => panic!(
                    "redis-server could not get port {} back within {TIMEOUT:?}",
                    self.port
                ),
                Err(Launch::Failed(why)) => panic!("{why}"),
            }
        }
    }

    /// True when the server answers PING within `bound`.
    pub fn ping_within(&self, bound: Duration) -> bool {
        matches!(self.command_within(&["PING"], bound), Ok(r) if r == "PONG")
    }

    /// One command on a new connection, bounded by TIMEOUT; see [`RedisServer::command_within`].
    pub fn command(&self, args: &[&str]) -> Result<String, String> {
        self.command_within(args, TIMEOUT)
    }

    /// One command on a new connection, raw RESP over TCP: the reply as text (a simple or bulk
    /// string, an integer, `(nil)`, an array's elements one a line), Err with a Redis error or
    /// what went wrong (connection refused, no answer within `bound`).
    pub fn command_within(&self, args: &[&str], bound: Duration) -> Result<String, String> {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let mut stream =
            TcpStream::connect_timeout(&addr, bound).map_err(|e| format!("connect: {e}"))?;
        stream
            .set_read_timeout(Some(bound))
            .and_then(|()| stream.set_write_timeout(Some(bound)))
            .map_err(|e| e.to_string())?;
        let mut request = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            request.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
        }
        stream
            .write_all(&request)
            .map_err(|e| format!("write: {e}"))?;
        read_reply(&mut BufReader::new(stream))
    }

    /// The tail of the current server's log, for failure messages.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log_path())
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join(format!("redis-{}.log", self.starts))
    }

    /// Starts redis-server on `self.port` and waits until it answers PING.
    fn launch(&mut self) -> Result<(), Launch> {
        self.starts += 1;
        let log = self.log_path();
        let spawned = Command::new(REDIS_SERVER)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--daemonize", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "`{REDIS_SERVER}` is not installed (not found on PATH): the scale-out tests need a \
                 real Redis. Install Debian's `redis-server` package (apt-get install \
                 redis-server), or run scripts/test.sh, which installs it"
            ),
            Err(e) => return Err(Launch::Failed(format!("spawning {REDIS_SERVER}: {e}"))),
        };
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let tail = log_tail(&log);
                return Err(if tail.contains("Address already in use") {
                    Launch::PortTaken
                } else {
                    Launch::Failed(format!(
                        "{REDIS_SERVER} on port {} exited at start ({status}); its log:\n{tail}",
                        self.port
                    ))
                });
            }
            if self.ping_within(Duration::from_millis(200)) {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Launch::Failed(format!(
                    "{REDIS_SERVER} on port {} did not answer PING within {TIMEOUT:?}; its log:\n{}",
                    self.port,
                    log_tail(&log)
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

enum Launch {
    PortTaken,
    Failed(String),
}

/// A port nobody listens on now (the kernel's pick for 127.0.0.1:0).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding 127.0.0.1:0")
        .port()
}

fn signal(pid: u32, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(pid).expect("a pid fits pid_t");
    // SAFETY: kill(2) on a child process of ours, with a valid signal number.
    let rc = unsafe { libc::kill(pid, sig) };
    assert_eq!(
        rc,
        0,
        "kill({pid}, {sig}): {}",
        std::io::Error::last_os_error()
    );
}

/// Waits (bounded) until /proc says the process is stopped (`T`) or not.
fn wait_process_state(pid: u32, stopped: bool) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // The state is the first field after the command name, which is in parentheses.
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .unwrap_or("?");
        if (state == "T") == stopped {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "process {pid} is in state {state:?}, not {} after {TIMEOUT:?}",
            if stopped { "stopped" } else { "running" }
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| format!("(no log: {e})"));
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Reads one RESP reply.
fn read_reply(r: &mut impl BufRead) -> Result<String, String> {
    let mut line = String::new();
    r.read_line(&mut line).map_err(|e| format!("read: {e}"))?;
    if line.is_empty() {
        return Err("the connection ended without a reply".into());
    }
    let line = line.trim_end_matches("\r\n");
    let (kind, rest) = line.split_at(1);
    let number = || {
        rest.parse::<i64>()
            .map_err(|_| format!("bad RESP line {line:?}"))
    };
    match kind {
        "+" | ":" => Ok(rest.to_string()),
        "-" => Err(rest.to_string()),
        "$" => {
            let len = number()?;
            if len < 0 {
                return Ok("(nil)".into());
            }
            let mut buf = vec![0; len as usize + 2];
            r.read_exact(&mut buf).map_err(|e| format!("read: {e}"))?;
            buf.truncate(len as usize);
            String::from_utf8(buf).map_err(|e| e.to_string())
        }
        "*" => {
            let len = number()?;
            if len < 0 {
                return Ok("(nil)".into());
            }
            let items: Result<Vec<String>, String> = (0..len).map(|_| read_reply(r)).collect();
            Ok(items?.join("\n"))
        }
        _ => Err(format!("bad RESP line {line:?}")),
    }
}

// ---------------------------------------------------------------------------------------------
// agentcast nodes sharing one Redis.

/// How a node runs.
pub enum NodeProcess {
    /// `agentcast serve` as a child process (killed on drop).
    Child(ServeChild),
    /// `agentcast::spawn` on a thread of this process (stopped on drop).
    InProcess(agentcast::RunningServer),
}

/// One agentcast node of a cluster. Every node verifies and signs tokens with [`SECRET`].
pub struct Node {
    /// `--node-id` for a child; for a node in this process a name for messages only (the
    /// server picks its own id).
    pub id: String,
    pub addr: SocketAddr,
    pub process: NodeProcess,
}

impl Node {
    /// `agentcast serve --redis-url URL --node-id ID` plus `args`, as a child process, with
    /// `AGENTCAST_JWT_SECRET` = [`SECRET`]; returns once it listens.
    pub async fn spawn_child(redis_url: &str, id: &str, args: &[&str]) -> Node {
        let mut all = vec!["--redis-url", redis_url, "--node-id", id];
        all.extend_from_slice(args);
        let mut cmd = super::serve_command(&all);
        cmd.env("AGENTCAST_JWT_SECRET", SECRET);
        let child = ServeChild::spawn(cmd).await;
        Node {
            id: id.to_string(),
            addr: child.addr,
            process: NodeProcess::Child(child),
        }
    }

    /// `agentcast::spawn(config)` with `redis_url` set to `redis_url`; returns once it listens.
    /// Panics when the server refuses to start.
    pub fn start_in_process(redis_url: &str, name: &str, config: agentcast::Config) -> Node {
        let config = agentcast::Config {
            redis_url: Some(redis_url.to_string()),
            ..config
        };
        let server = agentcast::spawn(config).unwrap_or_else(|e| {
            panic!("agentcast::spawn of in-process node {name} with --redis-url failed: {e}")
        });
        Node {
            id: name.to_string(),
            addr: server.addr(),
            process: NodeProcess::InProcess(server),
        }
    }

    /// `ws://ADDR/v1/ws`.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/ws", self.addr)
    }

    /// A token for `user`, valid for an hour: every node accepts it (all have [`SECRET`]).
    pub fn token(&self, user: &str) -> String {
        match &self.process {
            NodeProcess::Child(_) => agentcast::auth::sign(SECRET, user, now_unix() + 3600),
            NodeProcess::InProcess(server) => server.token(user),
        }
    }

    /// Connects as `user`, checks and keeps the welcome (see [`Client::connect`]).
    pub async fn connect(&self, user: &str) -> Client {
        self.connect_query(user, "").await
    }

    /// Same with extra query parameters, e.g. `after_seq=3&epoch=abc`.
    pub async fn connect_query(&self, user: &str, query: &str) -> Client {
        Client::connect_to(&self.ws_url(), &self.token(user), user, query).await
    }

    /// One HTTP request, as `user` (Bearer token) when given; panics after TIMEOUT.
    pub async fn http(
        &self,
        method: &str,
        path: &str,
        user: Option<&str>,
        body: &Value,
    ) -> HttpResponse {
        let auth = user.map(|u| format!("Bearer {}", self.token(u)));
        let headers: Vec<(&str, &str)> = auth
            .as_deref()
            .map(|a| vec![("Authorization", a)])
            .unwrap_or_default();
        let body = if body.is_null() {
            String::new()
        } else {
            body.to_string()
        };
        http_full(self.addr, method, path, &headers, &body).await
    }

    /// SIGKILL (kill -9) a child node and wait until it is gone. Panics for a node in this
    /// process (it cannot be killed alone).
    pub async fn kill9(&mut self) {
        match &mut self.process {
            NodeProcess::Child(child) => {
                child
                    .process
                    .start_kill()
                    .unwrap_or_else(|e| panic!("kill -9 node {}: {e}", self.id));
                tokio::time::timeout(TIMEOUT, child.process.wait())
                    .await
                    .unwrap_or_else(|_| panic!("node {} still alive after kill -9", self.id))
                    .unwrap_or_else(|e| panic!("waiting for node {}: {e}", self.id));
            }
            NodeProcess::InProcess(_) => {
                panic!(
                    "node {} runs in this process: only a child can be killed",
                    self.id
                )
            }
        }
    }

    /// A child's log so far (empty for a node in this process, which logs with the tests).
    pub fn log(&self) -> Vec<String> {
        match &self.process {
            NodeProcess::Child(child) => child.lines(),
            NodeProcess::InProcess(_) => Vec::new(),
        }
    }
}

/// The ids of the child nodes [`spawn_child_nodes`] starts: `node-a`, `node-b`, ...
pub fn node_id(i: usize) -> String {
    format!("node-{}", (b'a' + i as u8) as char)
}

/// `n` child nodes (`node-a`, `node-b`, ...) on `redis`, each `agentcast serve --redis-url URL
/// --node-id ID` plus `args` (e.g. `--node-timeout-ms 1000`).
pub async fn spawn_child_nodes(redis: &RedisServer, n: usize, args: &[&str]) -> Vec<Node> {
    let mut nodes = Vec::with_capacity(n);
    for i in 0..n {
        nodes.push(Node::spawn_child(&redis.url(), &node_id(i), args).await);
    }
    nodes
}

/// `n` nodes in this process on `redis`: `config` (e.g. `test_config()`) with its `redis_url`
/// set. They are named `in-process-0`, `in-process-1`, ... in messages.
pub fn start_in_process_nodes(
    redis: &RedisServer,
    n: usize,
    config: agentcast::Config,
) -> Vec<Node> {
    (0..n)
        .map(|i| Node::start_in_process(&redis.url(), &format!("in-process-{i}"), config.clone()))
        .collect()
}
