//! The server under test: started by the harness (the release binary on 127.0.0.1:0 with a
//! random secret; with --nodes N or --redis, a redis-server of its own and N nodes on it) or a
//! running one given by --url (one URL per node); and the figures of their processes from
//! /proc.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// Everything the harness measures against: the server's nodes (one unless --nodes or several
/// --url), the Redis they share when the harness started one, and the token secret.
pub struct Cluster {
    pub nodes: Vec<Target>,
    pub redis: Option<RedisServer>,
    /// With --url: the pid of the Redis the nodes share (--redis-pid), for its figures.
    pub redis_pid: Option<u32>,
    pub secret: String,
}

impl Cluster {
    /// The pid whose figures are Redis's: the started redis-server, or --redis-pid.
    pub fn redis_pid(&self) -> Option<u32> {
        self.redis.as_ref().map(|r| r.pid).or(self.redis_pid)
    }

    /// Stops what the harness started: SIGTERM to every node at once, waiting up to `wait`
    /// for all of them (SIGKILL after that), then the redis-server. Returns each node's exit
    /// and Redis's, as text (None for what it did not start).
    pub fn stop(&mut self, wait: Duration) -> (Vec<Option<String>>, Option<String>) {
        for n in &self.nodes {
            n.terminate();
        }
        let deadline = Instant::now() + wait;
        let nodes = self.nodes.iter_mut().map(|n| n.wait(deadline)).collect();
        let redis = self.redis.as_mut().map(|r| r.stop(Duration::from_secs(10)));
        (nodes, redis)
    }
}

/// Where the harness connects for one node, and what it knows about it.
pub struct Target {
    pub addr: SocketAddr,
    /// Host header and path of the WebSocket endpoint.
    pub host: String,
    pub path: String,
    pub pid: Option<u32>,
    /// The started server, when the harness started it.
    pub child: Option<Spawned>,
}

pub struct Spawned {
    child: Child,
    pub args: Vec<String>,
    pub log_path: PathBuf,
    /// Lines of the server's log at ERROR level, or mentioning a panic.
    pub errors: Arc<AtomicUsize>,
    /// Lines at WARN level.
    pub warnings: Arc<AtomicUsize>,
}

/// A random secret: the harness signs tokens with it, nobody else knows it.
pub fn random_secret() -> String {
    let mut buf = [0u8; 24];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut buf);
    }
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!(
        "bench-{}-{t:x}",
        buf.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

/// Flags this server binary understands (from its --help), so the harness only passes those.
fn supported_flags(bin: &Path) -> String {
    Command::new(bin)
        .arg("--help")
        .env("RUST_LOG", "off")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

fn has_flag(args: &[String], flag: &str) -> bool {
    args.iter()
        .any(|a| a == flag || a.starts_with(&format!("{flag}=")))
}

/// A child process the harness starts is killed when the harness dies, however it dies (the
/// thread that spawns it, the main thread, lives until the harness exits): a harness killed
/// or crashed mid-run leaves no node or Redis behind.
fn die_with_harness(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe; the closure touches nothing else.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        })
    }
}

/// Starts one node: `--bind 127.0.0.1:0 --jwt-secret <secret>`, with `redis` = (URL, node id)
/// `--redis-url URL --node-id ID`, per-user limits raised to fit the scenario (when the binary
/// has them and --server-arg did not set them), then `extra`. Waits for
/// `agentcast listening on [ADDR]` on its stderr.
pub fn spawn(
    bin: &Path,
    extra: &[String],
    needs: &ServerNeeds,
    log_path: PathBuf,
    secret: &str,
    redis: Option<(&str, &str)>,
) -> Result<Target, String> {
    let help = supported_flags(bin);
    let mut args: Vec<String> = vec!["--bind".into(), "127.0.0.1:0".into()];
    if let Some((url, node_id)) = redis {
        if !help.contains("--redis-url") {
            return Err(format!(
                "{} has no --redis-url: it cannot run on Redis (--nodes, --redis)",
                bin.display()
            ));
        }
        args.extend(["--redis-url".into(), url.into()]);
        if help.contains("--node-id") && !has_flag(extra, "--node-id") {
            args.extend(["--node-id".into(), node_id.into()]);
        }
    }
    let mut fit = |flag: &str, value: String| {
        if help.contains(flag) && !has_flag(extra, flag) {
            args.push(flag.into());
            args.push(value);
        }
    };
    // Only where the scenario needs more than agentcast's defaults.
    if needs.connections + 1000 > 100_000 {
        fit("--max-connections", (needs.connections + 1000).to_string());
    }
    if needs.tabs_per_user > 32 {
        fit(
            "--max-connections-per-user",
            needs.tabs_per_user.to_string(),
        );
    }
    if needs.publish {
        // A run is created in a request or two: the default 120 a minute would throttle
        // publishers that go as fast as the server answers.
        fit(
            "--runs-per-minute",
            (needs.runs_per_user * 10).max(100_000).to_string(),
        );
    } else if needs.runs_per_user > 100 {
        fit("--runs-per-minute", (needs.runs_per_user * 10).to_string());
    }
    if needs.concurrency > 16 {
        fit("--max-runs-per-user", needs.concurrency.to_string());
    }
    if let Some(q) = needs.outbound_queue {
        fit("--outbound-queue", q.to_string());
    }
    args.extend(extra.iter().cloned());
    let shown = args.clone();
    args.push("--jwt-secret".into());
    args.push(secret.into());

    let mut child = die_with_harness(&mut Command::new(bin))
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
    let stderr = child.stderr.take().expect("piped stderr");
    if let Some(dir) = log_path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let mut log = std::fs::File::create(&log_path)
        .map_err(|e| format!("cannot write {}: {e}", log_path.display()))?;
    let errors = Arc::new(AtomicUsize::new(0));
    let warnings = Arc::new(AtomicUsize::new(0));
    let (tx, rx) = mpsc::channel::<Result<SocketAddr, String>>();
    {
        let errors = errors.clone();
        let warnings = warnings.clone();
        std::thread::Builder::new()
            .name("server-log".into())
            .spawn(move || {
                // Always drain the pipe: a full pipe would stall the server's logging.
                let mut tx = Some(tx);
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    let _ = writeln!(log, "{line}");
                    if line.contains(" ERROR ") || line.contains("panic") {
                        errors.fetch_add(1, Ordering::Relaxed);
                    } else if line.contains(" WARN ") {
                        warnings.fetch_add(1, Ordering::Relaxed);
                    }
                    if let Some(at) = line.find("agentcast listening on [") {
                        let rest = &line[at + "agentcast listening on [".len()..];
                        let addr = rest.split([']', ',']).next().unwrap_or("");
                        if let Some(tx) = tx.take() {
                            let _ = tx.send(
                                addr.trim()
                                    .parse()
                                    .map_err(|_| format!("cannot parse the address in: {line}")),
                            );
                        }
                    }
                }
                let _ = log.flush();
                if let Some(tx) = tx.take() {
                    let _ = tx.send(Err("the server exited before listening".into()));
                }
            })
            .map_err(|e| e.to_string())?;
    }
    let addr = match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(Ok(addr)) => addr,
        Ok(Err(e)) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{e} (log: {})", log_path.display()));
        }
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "the server did not report listening within 30 s (log: {})",
                log_path.display()
            ));
        }
    };
    let pid = child.id();
    Ok(Target {
        addr,
        host: addr.to_string(),
        path: "/v1/ws".into(),
        pid: Some(pid),
        child: Some(Spawned {
            child,
            args: shown,
            log_path,
            errors,
            warnings,
        }),
    })
}

/// What the scenario asks of the server's per-user limits.
pub struct ServerNeeds {
    pub connections: usize,
    pub tabs_per_user: usize,
    pub runs_per_user: usize,
    pub concurrency: usize,
    pub outbound_queue: Option<usize>,
    /// Runs created over HTTP by publishers: their starts must not be what limits the rate.
    pub publish: bool,
}

/// A running server (or one node of it) at `url` (ws://host:port/path).
pub fn target(url: &str, pid: Option<u32>) -> Result<Target, String> {
    let rest = url
        .strip_prefix("ws://")
        .ok_or("--url must be ws://HOST:PORT/PATH (wss is not supported by the harness)")?;
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].to_string()),
        None => (rest, "/v1/ws".to_string()),
    };
    use std::net::ToSocketAddrs;
    let addr = hostport
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {hostport}: {e}"))?
        .find(|a| a.is_ipv4())
        .ok_or(format!("{hostport} has no IPv4 address"))?;
    Ok(Target {
        addr,
        host: hostport.to_string(),
        path,
        pid,
        child: None,
    })
}

impl Target {
    /// Sends SIGTERM to a started server (it ends runs and closes connections with 1001).
    fn terminate(&self) {
        if let Some(spawned) = &self.child {
            // SAFETY: signalling our own child process by pid.
            unsafe {
                libc::kill(spawned.child.id() as libc::pid_t, libc::SIGTERM);
            }
        }
    }

    /// Waits for a started server to exit until `deadline`, SIGKILL after that. Returns its
    /// exit status as text.
    fn wait(&mut self, deadline: Instant) -> Option<String> {
        let spawned = self.child.as_mut()?;
        wait_or_kill(&mut spawned.child, deadline)
    }
}

fn wait_or_kill(child: &mut Child, deadline: Instant) -> Option<String> {
    let wait = deadline.saturating_duration_since(Instant::now());
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status.to_string()),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Some(format!(
                    "killed: no exit {} s after SIGTERM",
                    wait.as_secs()
                ));
            }
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(s) = self.child.as_mut() {
            if let Ok(None) = s.child.try_wait() {
                let _ = s.child.kill();
                let _ = s.child.wait();
            }
        }
    }
}

/// A redis-server the harness started for its nodes: loopback, a free port, no persistence.
pub struct RedisServer {
    child: Child,
    pub pid: u32,
    pub url: String,
    pub args: Vec<String>,
    pub log_path: PathBuf,
}

/// Starts `bin` (redis-server) on a free loopback port with `--save '' --appendonly no`,
/// logging to `log_path`, and waits until it answers PING. Tries another port if the one
/// picked was taken in between.
pub fn start_redis(bin: &Path, log_path: PathBuf) -> Result<RedisServer, String> {
    if let Some(dir) = log_path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let dir = log_path
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let mut last_err = String::new();
    for _ in 0..5 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("cannot find a free port: {e}"))?
            .port();
        let args: Vec<String> = [
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            &dir.display().to_string(),
            "--logfile",
            &log_path.display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut child = die_with_harness(&mut Command::new(bin))
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if redis_ping(port) {
                return Ok(RedisServer {
                    pid: child.id(),
                    child,
                    url: format!("redis://127.0.0.1:{port}"),
                    args,
                    log_path,
                });
            }
            if let Ok(Some(status)) = child.try_wait() {
                last_err = format!("{} exited ({status}) on port {port}", bin.display());
                break;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                last_err = format!(
                    "{} did not answer PING on port {port} in 10 s",
                    bin.display()
                );
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Err(format!("{last_err} (log: {})", log_path.display()))
}

/// True when a Redis on 127.0.0.1:`port` answers PING (inline command).
fn redis_ping(port: u16) -> bool {
    use std::io::Read;
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let mut buf = [0u8; 16];
    s.write_all(b"PING\r\n").is_ok()
        && s.read(&mut buf)
            .is_ok_and(|n| buf[..n].starts_with(b"+PONG"))
}

impl RedisServer {
    /// SIGTERM (no persistence: it exits at once), SIGKILL after `wait`.
    fn stop(&mut self, wait: Duration) -> String {
        // SAFETY: signalling our own child process by pid.
        unsafe {
            libc::kill(self.pid as libc::pid_t, libc::SIGTERM);
        }
        wait_or_kill(&mut self.child, Instant::now() + wait).unwrap_or_default()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A process's figures from /proc.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcSample {
    pub rss_kib: u64,
    pub hwm_kib: u64,
    /// utime + stime, in clock ticks.
    pub cpu_ticks: u64,
    pub threads: u64,
}

pub fn clock_ticks_per_sec() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

pub fn sample(pid: u32) -> Option<ProcSample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l[name.len()..].split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after "(comm) ": index 0 is field 3 (state); utime is field 14, stime 15,
    // num_threads 20.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    Some(ProcSample {
        rss_kib: field("VmRSS:"),
        hwm_kib: field("VmHWM:"),
        cpu_ticks: num(11) + num(12),
        threads: num(17),
    })
}

/// This process's CPU time (user + system), in microseconds.
pub fn self_cpu_us() -> u64 {
    // SAFETY: getrusage writes into the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe {
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
    }
    let tv = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Raises this process's open-file limit (soft and, when permitted, hard) to at least `want`;
/// a server the harness starts inherits it. Returns (before, after) soft limits.
pub fn raise_nofile(want: u64) -> (u64, u64) {
    // SAFETY: plain getrlimit/setrlimit on structs we own.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        let before = lim.rlim_cur;
        if lim.rlim_cur >= want {
            return (before, before);
        }
        if lim.rlim_max < want {
            let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .unwrap_or(want);
            let raised = libc::rlimit {
                rlim_cur: want.min(nr_open),
                rlim_max: want.min(nr_open),
            };
            // Needs CAP_SYS_RESOURCE; falls back to the hard limit below.
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return (before, raised.rlim_cur);
            }
        }
        lim.rlim_cur = want.min(lim.rlim_max);
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        (before, lim.rlim_cur)
    }
}

/// Machine-wide CPU time from /proc/stat: (busy, total) in clock ticks over all cores.
pub fn machine_cpu_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}
