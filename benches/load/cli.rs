//! The command line, and each scenario's defaults.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// Many users with 2 tabs each, running scripted runs as fast as the server goes.
    Fanout,
    /// Few users with many tabs each.
    Tabs,
    /// Holds as many connections as asked, no runs: server memory per idle connection.
    Idle,
    /// Runs in flight; every connection drops at once and reconnects with
    /// ?after_seq=<last seq>&epoch=<epoch>: nothing may be lost.
    Storm,
    /// A few tabs stop reading while the rest run: they must be closed 4008 (or reset), then
    /// resume without loss; the rest keep their latency.
    Slow,
    /// Agents outside the server (PROTOCOL.md section 11): --publishers HTTP clients create
    /// runs for the users and post their events in batches of --batch, some sent twice or
    /// overlapping (--retry-rate); every tab checks each event's text, once, in order.
    Publish,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Fanout => "fanout",
            Scenario::Tabs => "tabs",
            Scenario::Idle => "idle",
            Scenario::Storm => "storm",
            Scenario::Slow => "slow",
            Scenario::Publish => "publish",
        }
    }
}

/// A fault the `publish` scenario's publisher 0 puts in its first run on purpose, to show
/// that the tabs' checks catch what a faulty server would do (scripts/bench-smoke.sh).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Inject {
    /// Publish an already-published text again under a fresh n (as a server that delivered
    /// a retried event twice would show it).
    Duplicate,
    /// Publish the text of n+1 under n (as a server that lost event n would show it).
    Drop,
}

/// agentcast's load-test harness. Starts the release server itself (bind 127.0.0.1:0, random
/// secret) unless --url is given, opens users x tabs WebSocket connections, runs `scripted`
/// runs, measures throughput, latency (event ts to receipt), tab spread, server RSS and CPU,
/// and verifies that every connection saw every event of its user's runs exactly once, in
/// order, the same frames as the user's other tabs, and nothing else. With --nodes N it starts
/// a Redis and N nodes on it and spreads each user's tabs over them. Exits 1 on any loss,
/// duplicate, divergence, foreign event or incomplete run, 2 on a usage or setup error.
///
/// Run with `cargo bench --bench load -- --scenario NAME [options]`. Results are printed as a
/// table and appended as one JSON line to --results. Unset options take the scenario's
/// defaults (docs/performance.md lists them).
#[derive(Debug, Clone, Parser)]
#[command(name = "load", version, max_term_width = 100)]
pub struct Args {
    /// Which scenario to run.
    #[arg(long, value_enum)]
    pub scenario: Scenario,

    /// Target a running server instead of starting one: its WebSocket URL,
    /// e.g. ws://127.0.0.1:8080/v1/ws. Repeatable (or comma-separated) for the nodes of one
    /// server on Redis: tab k of every user connects to URL k mod (number of URLs).
    #[arg(long, requires = "secret", value_delimiter = ',')]
    pub url: Vec<String>,

    /// With --url: the server's HS256 token secret (tokens are signed by the harness).
    #[arg(long, env = "AGENTCAST_JWT_SECRET", hide_env_values = true)]
    pub secret: Option<String>,

    /// With --url: the server's pid, for RSS (/proc/PID/status) and CPU (/proc/PID/stat).
    /// Repeatable (or comma-separated): one per --url, in the same order.
    #[arg(long, requires = "url", value_delimiter = ',')]
    pub pid: Vec<u32>,

    /// With --url: the pid of the redis-server the nodes share, for its RSS and CPU.
    #[arg(long, requires = "url")]
    pub redis_pid: Option<u32>,

    /// Start this many server nodes sharing one Redis (PROTOCOL.md section 10): the harness
    /// starts its own redis-server (no persistence) on a free port, then the nodes with
    /// --redis-url and distinct --node-id, and connects tab k of every user to node k mod N,
    /// so that every user's events cross nodes. 1: one server, without Redis unless --redis.
    #[arg(long, default_value_t = 1, conflicts_with = "url")]
    pub nodes: usize,

    /// Start the server(s) on a Redis of the harness's own even with --nodes 1 (the cost of
    /// Redis alone).
    #[arg(long, conflicts_with = "url")]
    pub redis: bool,

    /// The redis-server binary to start for --nodes > 1 or --redis.
    #[arg(long, default_value = "redis-server")]
    pub redis_server: PathBuf,

    /// The server binary to start (default: the agentcast binary cargo built for this bench).
    #[arg(long)]
    pub server_bin: Option<PathBuf>,

    /// Extra argument for the started server, repeatable: --server-arg=--workers=2.
    #[arg(long = "server-arg", allow_hyphen_values = true)]
    pub server_args: Vec<String>,

    /// Users (each connects --tabs connections).
    #[arg(long)]
    pub users: Option<usize>,

    /// Connections per user.
    #[arg(long)]
    pub tabs: Option<usize>,

    /// Total connections (idle, storm): users = connections / tabs.
    #[arg(long)]
    pub connections: Option<usize>,

    /// Runs each user starts.
    #[arg(long)]
    pub runs: Option<usize>,

    /// Runs each user keeps running at once.
    #[arg(long)]
    pub concurrency: Option<usize>,

    /// Steps per run (text steps, with a tool call every --tool-every-th step).
    #[arg(long)]
    pub steps: Option<usize>,

    /// Every Nth step is a calculator call instead of text (0: none).
    #[arg(long)]
    pub tool_every: Option<usize>,

    /// Bytes of text in each text step.
    #[arg(long)]
    pub payload: Option<usize>,

    /// A sleep_ms step of this many ms before every step (paced runs; 0: as fast as possible).
    #[arg(long)]
    pub step_sleep_ms: Option<u64>,

    /// idle: how long to hold the connections once all are open.
    #[arg(long)]
    pub hold_secs: Option<f64>,

    /// storm: ms after the first run starts at which every connection drops.
    #[arg(long)]
    pub storm_after_ms: Option<u64>,

    /// storm: how long every connection stays away before it reconnects.
    #[arg(long)]
    pub storm_pause_ms: Option<u64>,

    /// slow: tabs that stop reading (tab 1 of users 0..N; needs --tabs >= 2).
    #[arg(long)]
    pub slow_clients: Option<usize>,

    /// slow: longest a slow tab stops reading (it reads again once its user's runs are done).
    #[arg(long)]
    pub slow_pause_ms: Option<u64>,

    /// publish: publisher tasks, each with one keep-alive HTTP/1.1 connection; user i is
    /// published to by publisher i mod N.
    #[arg(long)]
    pub publishers: Option<usize>,

    /// publish: events per batch (1 to 1000; the run's last batch may be shorter).
    #[arg(long)]
    pub batch: Option<usize>,

    /// publish: fraction of batches sent again (0 to 1): half of these are resent as they were
    /// right after their answer (must be accepted: 0), half carry the last half of the
    /// previous batch in front of the next one (only the new events may count).
    #[arg(long)]
    pub retry_rate: Option<f64>,

    /// publish: put this fault in publisher 0's first run (a check of the checks: the run
    /// must fail).
    #[arg(long, value_enum)]
    pub inject: Option<Inject>,

    /// slow: SO_RCVBUF of the slow tabs' sockets (small, so the server sees them stall soon).
    #[arg(long)]
    pub slow_rcvbuf: Option<usize>,

    /// Client source addresses 127.0.0.1..=127.0.0.N (0: one per 25,000 connections when the
    /// server is on loopback). Each source address has its own ~28k ephemeral ports.
    #[arg(long, default_value_t = 0)]
    pub source_addrs: u8,

    /// Handshakes in flight at once while connecting (storm reconnects are all at once).
    #[arg(long, default_value_t = 256)]
    pub connect_concurrency: usize,

    /// Worker threads of the harness's runtime (0: half the cores, at least 1). The harness
    /// shares the machine with the server; keep it small.
    #[arg(long, default_value_t = 0)]
    pub client_threads: usize,

    /// Give up on the run phase after this long (a stuck run is a failure).
    #[arg(long, default_value_t = 120.0)]
    pub timeout_secs: f64,

    /// End the run phase as a failure when no run completed for this long (at least three
    /// times a paced run's length).
    #[arg(long, default_value_t = 10.0)]
    pub stall_secs: f64,

    /// Where to append the JSON line (default: target/bench-results.jsonl).
    #[arg(long)]
    pub results: Option<PathBuf>,

    /// Write SVG charts (latency histogram, throughput over time) into this directory.
    #[arg(long)]
    pub plot: Option<PathBuf>,

    /// A label stored with the result (e.g. what was changed).
    #[arg(long)]
    pub label: Option<String>,

    /// Set by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    pub bench: bool,
}

/// Everything a scenario runs with, defaults filled in.
#[derive(Debug, Clone)]
pub struct Params {
    pub scenario: Scenario,
    /// The server's nodes (--nodes, or how many --url).
    pub nodes: usize,
    /// The harness starts a Redis for the nodes (--redis, or --nodes > 1).
    pub own_redis: bool,
    pub users: usize,
    pub tabs: usize,
    pub runs: usize,
    pub concurrency: usize,
    pub steps: usize,
    pub tool_every: usize,
    pub payload: usize,
    pub step_sleep_ms: u64,
    pub hold_secs: f64,
    pub storm_after_ms: u64,
    pub storm_pause_ms: u64,
    pub slow_clients: usize,
    pub slow_pause_ms: u64,
    pub slow_rcvbuf: usize,
    pub publishers: usize,
    pub batch: usize,
    pub retry_rate: f64,
    pub inject: Option<Inject>,
}

impl Params {
    pub fn connections(&self) -> usize {
        self.users * self.tabs
    }

    /// Run events of one run: agent_started, one per text step, two per tool call
    /// (tool_executing, tool_completed), agent_completed.
    pub fn events_per_run(&self) -> usize {
        let tools = self.tool_steps();
        2 + (self.steps - tools) + 2 * tools
    }

    pub fn tool_steps(&self) -> usize {
        self.steps.checked_div(self.tool_every).unwrap_or(0)
    }

    pub fn has_runs(&self) -> bool {
        self.scenario != Scenario::Idle && self.runs > 0
    }
}

impl Args {
    pub fn params(&self) -> Result<Params, String> {
        use Scenario::*;
        let s = self.scenario;
        // (users, tabs, runs, concurrency, steps, tool_every, payload, step_sleep_ms)
        let d = match s {
            Fanout => (200, 2, 20, 2, 40, 5, 64, 0),
            Tabs => (10, 50, 20, 2, 40, 5, 64, 0),
            Idle => (10_000, 1, 0, 0, 0, 0, 0, 0),
            Storm => (2_500, 2, 2, 1, 20, 5, 64, 100),
            Slow => (50, 2, 30, 2, 40, 5, 512, 5),
            Publish => (50, 2, 20, 2, 40, 5, 64, 0),
        };
        let tabs = self.tabs.unwrap_or(d.1).max(1);
        let users = match (self.connections, self.users) {
            (Some(c), None) => c.div_ceil(tabs),
            (None, Some(u)) => u,
            (Some(c), Some(u)) if u * tabs == c => u,
            (Some(_), Some(_)) => return Err("--connections must equal --users x --tabs".into()),
            (None, None) => d.0,
        };
        if self.nodes == 0 {
            return Err("--nodes must be at least 1".into());
        }
        if !self.pid.is_empty() && self.pid.len() != self.url.len() {
            return Err(format!(
                "{} --pid for {} --url: give one pid per URL, in the same order, or none",
                self.pid.len(),
                self.url.len()
            ));
        }
        let p = Params {
            scenario: s,
            nodes: if self.url.is_empty() {
                self.nodes
            } else {
                self.url.len()
            },
            own_redis: self.url.is_empty() && (self.redis || self.nodes > 1),
            users,
            tabs,
            runs: self.runs.unwrap_or(d.2),
            concurrency: self.concurrency.unwrap_or(d.3).max(1),
            steps: self.steps.unwrap_or(d.4),
            tool_every: self.tool_every.unwrap_or(d.5),
            payload: self.payload.unwrap_or(d.6),
            step_sleep_ms: self.step_sleep_ms.unwrap_or(d.7),
            hold_secs: self.hold_secs.unwrap_or(5.0),
            storm_after_ms: self.storm_after_ms.unwrap_or(300),
            storm_pause_ms: self.storm_pause_ms.unwrap_or(0),
            slow_clients: self.slow_clients.unwrap_or(if s == Slow { 2 } else { 0 }),
            slow_pause_ms: self.slow_pause_ms.unwrap_or(15_000),
            slow_rcvbuf: self.slow_rcvbuf.unwrap_or(4096),
            publishers: self.publishers.unwrap_or(4),
            batch: self.batch.unwrap_or(10),
            retry_rate: self.retry_rate.unwrap_or(0.1),
            inject: self.inject,
        };
        if p.users == 0 {
            return Err("no users".into());
        }
        if s == Slow {
            if p.tabs < 2 {
                return Err(
                    "slow needs --tabs >= 2 (tab 0 drives the runs and keeps reading)".into(),
                );
            }
            if p.slow_clients > p.users {
                return Err("--slow-clients is at most --users (one slow tab per user)".into());
            }
        } else if p.slow_clients > 0 {
            return Err("--slow-clients is for --scenario slow".into());
        }
        if s == Publish {
            if p.publishers == 0 {
                return Err("--publishers must be at least 1".into());
            }
            if !(1..=1000).contains(&p.batch) {
                return Err("--batch is 1 to 1000 events (the server's limit per batch)".into());
            }
            if !(0.0..=1.0).contains(&p.retry_rate) {
                return Err("--retry-rate is a fraction, 0 to 1".into());
            }
            if p.step_sleep_ms > 0 {
                return Err("--step-sleep-ms is for scripted runs, not --scenario publish".into());
            }
            if p.runs == 0 {
                return Err("--runs must be at least 1 for --scenario publish".into());
            }
        } else if self.publishers.is_some()
            || self.batch.is_some()
            || self.retry_rate.is_some()
            || self.inject.is_some()
        {
            return Err(
                "--publishers, --batch, --retry-rate and --inject are for --scenario publish"
                    .into(),
            );
        }
        if p.has_runs() && p.steps == 0 {
            return Err("--steps must be at least 1".into());
        }
        Ok(p)
    }
}
