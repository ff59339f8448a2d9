//! Several nodes on one Redis (PROTOCOL.md §10): a real `redis-server` (common/redis.rs) and
//! two or three real agentcast nodes sharing it, with real WebSocket clients. One test per
//! rule: the same events with the same `seq` on every node, cancel, `GET /v1/runs/{id}` and
//! resume from any node (one started after the events included), the cluster's run limits and
//! the per-node connection limit, a node killed or cut off from Redis mid-run, Redis paused
//! (also past the bound on held events), down, and restarted empty, and a `--redis-url` that
//! is not one.
//!
//! Each test starts a Redis of its own. Waits are on events; the few polls (of `/metrics` or a
//! run's view) have a deadline.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use crate::common::*;
use futures_util::future::join_all;
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

// ---------------------------------------------------------------------------------------------
// Local helpers
// ---------------------------------------------------------------------------------------------

/// Added to every bound PROTOCOL.md sets (e.g. "within two node timeouts"), for a loaded CI
/// machine running other tests at the same time.
const SLACK: Duration = Duration::from_secs(3);

/// A connection and every frame it has read (heartbeats aside), in order.
struct Tab {
    /// For messages: `user@node`.
    name: String,
    c: Client,
    seen: Vec<Value>,
}

impl Tab {
    async fn open(node: &Node, user: &str) -> Tab {
        Tab::open_query(node, user, "").await
    }

    async fn open_query(node: &Node, user: &str, query: &str) -> Tab {
        Tab {
            name: format!("{user}@{}", node.id),
            c: node.connect_query(user, query).await,
            seen: Vec::new(),
        }
    }

    fn epoch(&self) -> String {
        let e = &self.c.welcome()["epoch"];
        e.as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("{}: welcome without a string epoch: {e}", self.name))
    }

    fn welcome_last_seq(&self) -> u64 {
        self.c.welcome()["last_seq"].as_u64().unwrap_or_else(|| {
            panic!(
                "{}: welcome without an integer last_seq: {}",
                self.name,
                self.c.welcome()
            )
        })
    }

    /// The run events read so far, in order.
    fn events(&self) -> Vec<Value> {
        self.seen.iter().filter(|f| is_event(f)).cloned().collect()
    }

    fn run_events(&self, run: &str) -> Vec<Value> {
        self.seen
            .iter()
            .filter(|f| is_event(f) && f["run_id"] == run)
            .cloned()
            .collect()
    }

    /// The seq of the last event read, or welcome.last_seq before any.
    fn last_seq(&self) -> u64 {
        self.events()
            .last()
            .map_or(self.welcome_last_seq(), |e| e["seq"].as_u64().unwrap())
    }

    /// Reads frames until one matches `pred` (a frame read before counts); returns it.
    async fn until(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        if let Some(f) = self.seen.iter().find(|f| pred(f)) {
            return f.clone();
        }
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let Ok(f) = tokio::time::timeout_at(deadline, self.c.next_frame()).await else {
                panic!(
                    "{}: no {what} within {TIMEOUT:?}; the last frames read: {:#?}",
                    self.name,
                    &self.seen[self.seen.len().saturating_sub(10)..]
                )
            };
            self.seen.push(f.clone());
            if pred(&f) {
                return f;
            }
        }
    }

    /// Reads until the run's event of type `ty`.
    async fn event(&mut self, run: &str, ty: &str) -> Value {
        self.until(&format!("{ty} of {run}"), |f| {
            is_event(f) && f["run_id"] == run && f["type"] == ty
        })
        .await
    }

    /// Reads until every run in `runs` has its agent_completed; returns every event read.
    async fn until_completed(&mut self, runs: &[&str]) -> Vec<Value> {
        for run in runs {
            self.event(run, "agent_completed").await;
        }
        self.events()
    }
}

/// A run that stays in a sleep tool call for a minute: it ends only when something ends it.
fn long_run() -> Value {
    scripted(json!([
        {"think": "working"},
        {"tool": "sleep", "args": {"ms": 60_000}},
        {"text": "never"}
    ]))
}

/// A short run with every kind of event, tagged so runs can be told apart by their content.
fn mixed_run(tag: &str) -> Value {
    scripted(json!([
        {"think": format!("{tag} thinks")},
        {"text": format!("{tag} 1")},
        {"tool": "calculator", "args": {"expr": "6*7"}},
        {"sleep_ms": 20},
        {"text": format!("{tag} 2")},
        {"tool": "sleep", "args": {"ms": 150}},
        {"text": format!("{tag} 3")}
    ]))
}

/// `n` text steps `t0`, `t1`, ..., each followed by a `sleep_ms` of `gap_ms`.
fn texts(n: usize, gap_ms: u64) -> Value {
    let mut steps = Vec::new();
    for i in 0..n {
        steps.push(json!({"text": format!("t{i}")}));
        steps.push(json!({"sleep_ms": gap_ms}));
    }
    scripted(Value::Array(steps))
}

/// The texts of a run's partial_result events, in order.
fn partial_texts(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["type"] == "partial_result")
        .map(|e| e["data"]["text"].as_str().unwrap().to_string())
        .collect()
}

/// `seq`s exactly `from, from+1, ...`: contiguous, nothing missing or repeated.
fn assert_seqs_from(events: &[Value], from: u64, what: &str) {
    let got = seqs(events);
    let want: Vec<u64> = (from..from + got.len() as u64).collect();
    assert_eq!(got, want, "{what}: seqs must run contiguously from {from}");
}

/// An `error` frame with this code (and the request_id when the command had one).
fn assert_error_code(f: &Value, code: &str, what: &str) {
    assert_eq!(
        f["type"], "error",
        "{what}: expected an error frame, got {f}"
    );
    assert_eq!(f["code"], code, "{what}: {f}");
    assert!(
        f["message"].is_string(),
        "{what}: error without a message: {f}"
    );
}

/// An HTTP JSON error `{code, message}` with this status.
fn assert_http_error(r: &HttpResponse, status: u16, code: &str, what: &str) {
    assert_eq!(r.status, status, "{what}: status; body {:?}", r.body);
    let b = r.json();
    assert_eq!(b["code"], code, "{what}: {b}");
    assert!(b["message"].is_string(), "{what}: {b}");
}

async fn start_over_http(node: &Node, user: &str, agent: &str, input: Value) -> String {
    let r = node
        .http(
            "POST",
            "/v1/runs",
            Some(user),
            &json!({"agent": agent, "input": input}),
        )
        .await;
    assert_eq!(
        r.status, 202,
        "POST /v1/runs on {} as {user}: {:?}",
        node.id, r.body
    );
    r.json()["run_id"]
        .as_str()
        .unwrap_or_else(|| panic!("202 without a run_id: {}", r.body))
        .to_string()
}

/// `GET /v1/runs/{run}` on `node` as `user`, polled (bounded) until the run is no longer
/// running: the view may be written a moment after agent_completed is delivered.
async fn ended_view(node: &Node, user: &str, run: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2) + SLACK;
    loop {
        let r = node
            .http("GET", &format!("/v1/runs/{run}"), Some(user), &Value::Null)
            .await;
        assert_eq!(
            r.status, 200,
            "GET /v1/runs/{run} on {} as {user}: {:?}",
            node.id, r.body
        );
        let view = r.json();
        if view["status"] != "running" {
            return view;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "GET /v1/runs/{run} on {} still says running after its agent_completed: {view}",
            node.id
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits (bounded) until every node's `agentcast_redis_up` is `want`.
async fn wait_redis_up(nodes: &[Node], want: f64) {
    for node in nodes {
        wait_metric(node.addr, "agentcast_redis_up", want).await;
    }
}

/// The resumed frame ending a replay: `{type, from_seq, to_seq}` (plus the request_id).
fn assert_resumed(f: &Value, from: u64, to: u64, request_id: Option<&str>) {
    let mut want = json!({"type": "resumed", "from_seq": from, "to_seq": to});
    if let Some(id) = request_id {
        want["request_id"] = json!(id);
    }
    assert_eq!(f, &want, "resumed frame");
}

// ---------------------------------------------------------------------------------------------
// The fixture itself (needs redis-server, not agentcast's Redis support)
// ---------------------------------------------------------------------------------------------

/// The RedisServer fixture answers, pauses (no answer, data kept), resumes, is killed (port
/// refuses) and restarts empty on the same port, and is gone once dropped.
#[test]
fn redis_fixture_starts_pauses_kills_and_restarts_empty() {
    let mut redis = RedisServer::start();
    let (port, url) = (redis.port(), redis.url());
    assert_eq!(url, format!("redis://127.0.0.1:{port}"));
    assert!(redis.ping_within(TIMEOUT), "{}", redis.log_tail());
    assert_eq!(redis.command(&["SET", "k", "v"]), Ok("OK".into()));
    assert_eq!(redis.command(&["GET", "k"]), Ok("v".into()));
    assert_eq!(
        redis.command(&["CONFIG", "GET", "save"]),
        Ok("save\n".into()),
        "no RDB snapshots"
    );
    assert_eq!(
        redis.command(&["CONFIG", "GET", "appendonly"]),
        Ok("appendonly\nno".into()),
        "no AOF"
    );

    redis.pause();
    let t0 = Instant::now();
    assert!(
        !redis.ping_within(Duration::from_millis(300)),
        "a paused redis-server answered"
    );
    assert!(t0.elapsed() >= Duration::from_millis(250), "no timeout?");
    redis.resume();
    assert!(redis.ping_within(TIMEOUT), "no answer after SIGCONT");
    assert_eq!(
        redis.command(&["GET", "k"]),
        Ok("v".into()),
        "a pause keeps data"
    );

    let pid = redis.pid();
    redis.kill();
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "redis-server {pid} still exists after kill"
    );
    let refused = redis.command_within(&["PING"], Duration::from_secs(1));
    assert!(
        refused.is_err(),
        "a killed redis-server answered: {refused:?}"
    );
    redis.kill(); // again: nothing to do

    redis.restart_empty();
    assert_eq!(redis.url(), url, "a restart keeps the port");
    assert_ne!(redis.pid(), pid);
    assert_eq!(
        redis.command(&["GET", "k"]),
        Ok("(nil)".into()),
        "restarted empty"
    );
    assert_eq!(redis.command(&["DBSIZE"]), Ok("0".into()));
    assert!(redis.command(&["NO-SUCH-COMMAND"]).is_err());

    let pid = redis.pid();
    drop(redis);
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "redis-server {pid} outlived its fixture"
    );
}

// ---------------------------------------------------------------------------------------------
// No sticky sessions: the same events, the same seq, on every node
// ---------------------------------------------------------------------------------------------

/// Tabs of one user on two nodes: the same welcome.epoch and last_seq; two runs at once, one
/// started on each node, reach both tabs as the identical sequence (same frames, same order,
/// seq contiguous from last_seq+1); tabs opened afterwards on either node agree on epoch and
/// last_seq, and a later run reaches all four tabs identically.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tabs_on_different_nodes_get_identical_sequences() {
    let redis = RedisServer::start();
    let nodes = spawn_child_nodes(&redis, 2, &[]).await;
    let mut ta = Tab::open(&nodes[0], "alice").await;
    let mut tb = Tab::open(&nodes[1], "alice").await;
    assert_eq!(
        ta.epoch(),
        tb.epoch(),
        "welcome.epoch differs between nodes"
    );
    assert_eq!(
        ta.welcome_last_seq(),
        tb.welcome_last_seq(),
        "welcome.last_seq differs between nodes"
    );
    let base = ta.welcome_last_seq();

    let r1 = ta.c.start_run("scripted", mixed_run("on-a")).await;
    let r2 = tb.c.start_run("scripted", mixed_run("on-b")).await;
    let ea = ta.until_completed(&[&r1, &r2]).await;
    let eb = tb.until_completed(&[&r1, &r2]).await;
    assert_eq!(
        ea, eb,
        "the two tabs (nodes {} and {}) saw different sequences",
        nodes[0].id, nodes[1].id
    );
    assert_seqs_from(&ea, base + 1, "both runs");
    for (run, tag) in [(&r1, "on-a"), (&r2, "on-b")] {
        let events = ta.run_events(run);
        check_run(&events, run, None);
        assert_eq!(events.last().unwrap()["data"]["status"], "succeeded");
        assert_eq!(
            partial_texts(&events),
            [format!("{tag} 1"), format!("{tag} 2"), format!("{tag} 3")]
        );
    }
    let last = ta.last_seq();

    let mut tc = Tab::open(&nodes[0], "alice").await;
    let mut td = Tab::open(&nodes[1], "alice").await;
    for t in [&tc, &td] {
        assert_eq!(t.epoch(), ta.epoch(), "{}: epoch changed", t.name);
        assert_eq!(t.welcome_last_seq(), last, "{}: welcome.last_seq", t.name);
    }

    let r3 = td.c.start_run("echo", json!("to all four tabs")).await;
    let mut seen = Vec::new();
    for t in [&mut ta, &mut tb, &mut tc, &mut td] {
        t.until_completed(&[&r3]).await;
        let events = t.run_events(&r3);
        assert_seqs_from(&events, last + 1, &t.name);
        seen.push(events);
    }
    check_run(&seen[0], &r3, None);
    for (i, s) in seen.iter().enumerate() {
        assert_eq!(s, &seen[0], "tab {i} saw another sequence of the run");
    }
    for t in [&mut ta, &mut tb, &mut tc, &mut td] {
        assert!(
            ping_flush(&mut t.c, "flush").await.is_empty(),
            "{}: frames after the runs",
            t.name
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Everything works from any node
// ---------------------------------------------------------------------------------------------

/// A run running on node A is cancelled from node B, with `cancel_run` and with
/// `POST /v1/runs/{id}/cancel`: its open call closes ok:false `cancelled`, then agent_completed
/// `cancelled`, on tabs of both nodes, within 5 s. Another user's cancel, from either node and
/// either way, is run_not_found / 404 and leaves the run running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_from_another_node() {
    let redis = RedisServer::start();
    let nodes = spawn_child_nodes(&redis, 2, &[]).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let mut ta = Tab::open(a, "alice").await;
    let mut tb = Tab::open(b, "alice").await;
    let mut bob = b.connect("bob").await;

    let run = ta.c.start_run("scripted", long_run()).await;
    // Node B has seen it: it is running, on A.
    tb.event(&run, "tool_executing").await;

    let reply = bob
        .request(json!({"type": "cancel_run", "run_id": run}))
        .await;
    assert_error_code(&reply, "run_not_found", "bob's cancel_run of alice's run");
    for node in [a, b] {
        let r = node
            .http(
                "POST",
                &format!("/v1/runs/{run}/cancel"),
                Some("bob"),
                &Value::Null,
            )
            .await;
        assert_http_error(&r, 404, "run_not_found", "bob's POST .../cancel");
        let r = node
            .http("GET", &format!("/v1/runs/{run}"), Some("bob"), &Value::Null)
            .await;
        assert_http_error(&r, 404, "run_not_found", "bob's GET of alice's run");
    }
    let view = a
        .http(
            "GET",
            &format!("/v1/runs/{run}"),
            Some("alice"),
            &Value::Null,
        )
        .await
        .json();
    assert_eq!(view["status"], "running", "after bob's cancels: {view}");

    let t0 = Instant::now();
    let ack =
        tb.c.request(json!({"type": "cancel_run", "run_id": run}))
            .await;
    assert_eq!(ack["type"], "ack", "alice's cancel_run on B: {ack}");
    tb.event(&run, "agent_completed").await;
    assert!(
        t0.elapsed() < Duration::from_secs(2) + SLACK,
        "the cancel from another node took {:?}",
        t0.elapsed()
    );
    ta.event(&run, "agent_completed").await;
    let events = tb.run_events(&run);
    assert_eq!(events, ta.run_events(&run), "both tabs see the same run");
    assert_cancelled(&events);

    // The same over HTTP: started on A, cancelled on B.
    let run2 = start_over_http(a, "alice", "scripted", long_run()).await;
    tb.event(&run2, "tool_executing").await;
    let t0 = Instant::now();
    let r = b
        .http(
            "POST",
            &format!("/v1/runs/{run2}/cancel"),
            Some("alice"),
            &Value::Null,
        )
        .await;
    assert_eq!(r.status, 202, "POST .../cancel on B: {:?}", r.body);
    assert_eq!(r.json(), json!({"run_id": run2}));
    tb.event(&run2, "agent_completed").await;
    assert!(
        t0.elapsed() < Duration::from_secs(2) + SLACK,
        "the HTTP cancel from another node took {:?}",
        t0.elapsed()
    );
    assert_cancelled(&tb.run_events(&run2));
    ta.event(&run2, "agent_completed").await;
    assert_eq!(ta.run_events(&run2), tb.run_events(&run2));

    assert!(
        ping_flush(&mut bob, "flush").await.is_empty(),
        "bob received frames of alice's runs"
    );
}

/// A run's events after a cancel: the open sleep call closed ok:false `cancelled`, then
/// agent_completed `cancelled`, and nothing of the script after the call.
fn assert_cancelled(events: &[Value]) {
    assert_run_shape(events);
    let tool = events
        .iter()
        .find(|e| e["type"] == "tool_completed")
        .unwrap_or_else(|| panic!("the open call was not closed: {events:#?}"));
    assert_eq!(tool["data"]["ok"], false, "{tool}");
    assert_eq!(tool["data"]["error"]["code"], "cancelled", "{tool}");
    let done = &events.last().unwrap()["data"];
    assert_eq!(done["status"], "cancelled", "{done}");
    assert_eq!(done["error"]["code"], "cancelled", "{done}");
    assert!(
        partial_texts(events).is_empty(),
        "the script went on: {events:#?}"
    );
}

/// `GET /v1/runs/{id}` on node B for runs of node A (nodes in this process): a finished run's
/// view has its status and exactly the events its tab received; a running one says
/// `running`, with the events so far; another user gets 404 from either node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_run_from_another_node() {
    let redis = RedisServer::start();
    let nodes = start_in_process_nodes(&redis, 2, test_config());
    let (a, b) = (&nodes[0], &nodes[1]);
    let mut ta = Tab::open(a, "alice").await;

    let run = ta.c.start_run("scripted", mixed_run("viewed")).await;
    ta.event(&run, "agent_completed").await;
    let events = ta.run_events(&run);
    let view = ended_view(b, "alice", &run).await;
    assert_eq!(view["run_id"], run, "{view}");
    assert_eq!(view["agent"], "scripted", "{view}");
    assert_eq!(view["status"], "succeeded", "{view}");
    assert_eq!(view["truncated"], false, "{view}");
    assert_eq!(
        view["events"],
        json!(events),
        "GET on B must return exactly the events of the run that ran on A"
    );
    for node in [a, b] {
        let r = node
            .http("GET", &format!("/v1/runs/{run}"), Some("bob"), &Value::Null)
            .await;
        assert_http_error(&r, 404, "run_not_found", "bob's GET of alice's run");
    }

    // While running.
    let run2 = ta.c.start_run("scripted", long_run()).await;
    let executing = ta.event(&run2, "tool_executing").await;
    let r = b
        .http(
            "GET",
            &format!("/v1/runs/{run2}"),
            Some("alice"),
            &Value::Null,
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let view = r.json();
    assert_eq!(view["status"], "running", "{view}");
    let so_far = view["events"].as_array().cloned().unwrap_or_default();
    assert!(
        so_far.contains(&executing),
        "GET on B lacks the tool_executing the tab on A already had: {view}"
    );
    let ack =
        ta.c.request(json!({"type": "cancel_run", "run_id": run2}))
            .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    ta.event(&run2, "agent_completed").await;
    let events2 = ta.run_events(&run2);
    assert!(
        so_far[..] == events2[..so_far.len()],
        "the running view is not a prefix of the run:\n GET: {so_far:#?}\n WS: {events2:#?}"
    );
    let view = ended_view(b, "alice", &run2).await;
    assert_eq!(view["status"], "cancelled", "{view}");
    assert_eq!(view["events"], json!(events2));
}

/// Resume on another node. At connect: a tab on A reads part of a long run and goes away; a
/// connection to B with `?after_seq=K&epoch=E` gets K+1.. (replay), `resumed`, then the live
/// rest, contiguous, each once, all together exactly what a steady tab saw. The `resume`
/// command on B replays (0, last_seq] and `resumed{1, last_seq}`; an SSE stream on B with
/// `Last-Event-ID: K` replays K+1.. and `resumed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_on_another_node() {
    let redis = RedisServer::start();
    let nodes = spawn_child_nodes(&redis, 2, &[]).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let mut steady = Tab::open(a, "alice").await;
    let mut leaving = Tab::open(a, "alice").await;
    let epoch = leaving.epoch();
    let base = leaving.welcome_last_seq();

    // ~3 s of events: the reconnect happens while it runs.
    let run = steady.c.start_run("scripted", texts(300, 10)).await;
    let k = base + 20;
    leaving
        .until("20 events", |f| is_event(f) && f["seq"] == k)
        .await;
    let first = leaving.events();
    drop(leaving);

    let mut back = Tab::open_query(
        b,
        "alice",
        &format!("after_seq={k}&epoch={}", percent_encode(&epoch)),
    )
    .await;
    assert_eq!(back.epoch(), epoch, "another node, the same epoch");
    let resumed = back.until("resumed", |f| f["type"] == "resumed").await;
    let replayed = back.events();
    assert_resumed(&resumed, k + 1, k + replayed.len() as u64, None);
    assert!(
        resumed["to_seq"].as_u64().unwrap() >= back.welcome_last_seq(),
        "the replay must reach welcome.last_seq: {resumed}, {}",
        back.c.welcome()
    );
    back.event(&run, "agent_completed").await;
    let after = back.events();
    assert!(
        after.len() > replayed.len(),
        "test timing: the run had ended before the reconnect, no live event was tested"
    );
    assert_seqs_from(&after, k + 1, "replay then live on B");

    steady.event(&run, "agent_completed").await;
    let whole = steady.events();
    let mut pieces = first;
    pieces.extend(after);
    assert_eq!(
        pieces, whole,
        "the events read on A and then on B are not exactly the run"
    );
    check_run(&whole, &run, None);
    assert_eq!(partial_texts(&whole).len(), 300);

    // The resume command on B.
    let last = steady.last_seq();
    let mut c = Tab::open(b, "alice").await;
    assert_eq!(c.welcome_last_seq(), last);
    c.c.send_json(json!({"type": "resume", "after_seq": base, "epoch": epoch, "request_id": "r1"}))
        .await;
    let resumed = c.until("resumed", |f| f["type"] == "resumed").await;
    assert_resumed(&resumed, base + 1, last, Some("r1"));
    assert_eq!(c.events(), whole, "the resume command on B replays the run");
    assert!(ping_flush(&mut c.c, "flush").await.is_empty());
    assert!(ping_flush(&mut back.c, "flush").await.is_empty());

    // SSE `Last-Event-ID` on B.
    let auth = format!("Bearer {}", b.token("alice"));
    let last_event_id = k.to_string();
    let mut sse = Sse::open(
        b.addr,
        "/v1/events",
        &[("Authorization", &auth), ("Last-Event-ID", &last_event_id)],
    )
    .await;
    let welcome = sse.welcome("alice").await;
    assert_eq!(welcome["epoch"], epoch, "SSE on B: {welcome}");
    for e in &whole[(k - base) as usize..] {
        assert_event_block(&sse.next_event().await, e);
    }
    let resumed = sse.next_event().await;
    assert_eq!(resumed.field("event"), Some("resumed"), "{resumed:?}");
    assert_resumed(&resumed.data(), k + 1, last, None);
}

/// A node started after a run completed serves the user's whole history from Redis: a run
/// completes on A (tabs on A and B); then node C starts, and a connection to C with
/// `?after_seq=0` gets the same epoch and last_seq, the run's events exactly as A's tab read
/// them (C never saw them: they come from the stream), then `resumed{1, last_seq}`, and
/// nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_node_serves_a_user_whose_history_it_never_saw() {
    let redis = RedisServer::start();
    let nodes = spawn_child_nodes(&redis, 2, &[]).await;
    let mut ta = Tab::open(&nodes[0], "alice").await;
    let mut tb = Tab::open(&nodes[1], "alice").await;
    let epoch = ta.epoch();
    assert_eq!(
        ta.welcome_last_seq(),
        0,
        "a fresh Redis: alice has no history"
    );

    let run = ta.c.start_run("scripted", mixed_run("before C")).await;
    let events = ta.until_completed(&[&run]).await;
    tb.until_completed(&[&run]).await;
    assert_eq!(tb.events(), events, "A's and B's tabs");
    check_run(&events, &run, None);
    assert_seqs_from(&events, 1, "the run on A");
    let last = ta.last_seq();

    // C did not exist while the run ran: it can only have the run from Redis.
    let c = Node::spawn_child(&redis.url(), &node_id(2), &[]).await;
    let mut tc = Tab::open_query(&c, "alice", "after_seq=0").await;
    assert_eq!(tc.epoch(), epoch, "C gives the epoch A and B gave");
    assert_eq!(tc.welcome_last_seq(), last, "C's welcome.last_seq");
    let resumed = tc.until("resumed", |f| f["type"] == "resumed").await;
    assert_eq!(
        tc.events(),
        events,
        "C's replay from after_seq=0 must be the whole run, as A's tab read it"
    );
    assert_resumed(&resumed, 1, last, None);
    assert!(
        tc.seen.last() == Some(&resumed),
        "resumed must come after the replayed events: {:#?}",
        tc.seen
    );
    assert!(
        ping_flush(&mut tc.c, "flush").await.is_empty(),
        "frames on C after resumed"
    );
}

// ---------------------------------------------------------------------------------------------
// The limits are the cluster's
// ---------------------------------------------------------------------------------------------

/// `--max-runs-per-user 2` on both nodes: two running runs on A make a start on B fail
/// `too_many_runs` (WebSocket and HTTP 429); another user is not limited; once one ends, a
/// start on B works again, and then A refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_runs_are_limited_per_user_across_nodes() {
    let redis = RedisServer::start();
    let nodes = spawn_child_nodes(&redis, 2, &["--max-runs-per-user", "2"]).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let mut ta = Tab::open(a, "alice").await;
    let mut tb = Tab::open(b, "alice").await;

    let r1 = ta.c.start_run("scripted", long_run()).await;
    let r2 = ta.c.start_run("scripted", long_run()).await;
    tb.event(&r1, "tool_executing").await;
    tb.event(&r2, "tool_executing").await;

    let reply =
        tb.c.request(json!({"type": "start_run", "agent": "echo", "input": "third"}))
            .await;
    assert_error_code(&reply, "too_many_runs", "a third run, started on B");
    let r = b
        .http(
            "POST",
            "/v1/runs",
            Some("alice"),
            &json!({"agent": "echo", "input": "third"}),
        )
        .await;
    assert_http_error(&r, 429, "too_many_runs", "a third run, POST on B");

    let mut bob = b.connect("bob").await;
    let bobs = bob.start_run("echo", json!("bob has his own limit")).await;
    assert_eq!(
        bob.collect_run(&bobs).await.last().unwrap()["data"]["status"],
        "succeeded"
    );

    let ack =
        ta.c.request(json!({"type": "cancel_run", "run_id": r1}))
            .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    tb.event(&r1, "agent_completed").await;
    // The end of r1 frees its place on every node; B may learn it a moment after the event.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1) + SLACK;
    let r3 = loop {
        let reply =
            tb.c.request(json!({"type": "start_run", "agent": "scripted", "input": long_run()}))
                .await;
        if reply["type"] == "ack" {
            break reply["run_id"].as_str().unwrap().to_string();
        }
        assert_error_code(&reply, "too_many_runs", "a start on B once r1 ended");
        assert!(
            tokio::time::Instant::now() < deadline,
            "r1 ended but B still refuses a second running run: {reply}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    ta.event(&r3, "tool_executing").await;
    let reply =
        ta.c.request(json!({"type": "start_run", "agent": "echo", "input": "third again"}))
            .await;
    assert_error_code(&reply, "too_many_runs", "r2 and r3 running, a start on A");

    for run in [&r2, &r3] {
        let ack =
            tb.c.request(json!({"type": "cancel_run", "run_id": run}))
                .await;
        assert_eq!(ack["type"], "ack", "{ack}");
        tb.event(run, "agent_completed").await;
    }
}

/// `--runs-per-minute 3` on both nodes: starts on A and B (WebSocket and HTTP) share one
/// budget: the fourth is `rate_limited` on either node (HTTP 429), while another user still
/// starts runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_starts_per_minute_count_across_nodes() {
    let redis = RedisServer::start();
    let nodes = spawn_child_nodes(&redis, 2, &["--runs-per-minute", "3"]).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let mut ta = Tab::open(a, "alice").await;
    let mut tb = Tab::open(b, "alice").await;

    let r1 = ta.c.start_run("echo", json!("one, on A")).await;
    let r2 = tb.c.start_run("echo", json!("two, on B")).await;
    let r3 = start_over_http(a, "alice", "echo", json!("three, POST on A")).await;

    let reply =
        tb.c.request(json!({"type": "start_run", "agent": "echo", "input": "four"}))
            .await;
    assert_error_code(&reply, "rate_limited", "the fourth start, on B");
    assert!(
        reply["retry_after_ms"].as_u64().is_some_and(|ms| ms > 0),
        "rate_limited without a positive retry_after_ms: {reply}"
    );
    let r = b
        .http(
            "POST",
            "/v1/runs",
            Some("alice"),
            &json!({"agent": "echo", "input": "five"}),
        )
        .await;
    assert_http_error(&r, 429, "rate_limited", "POST on B over the budget");
    let reply =
        ta.c.request(json!({"type": "start_run", "agent": "echo", "input": "six"}))
            .await;
    assert_error_code(&reply, "rate_limited", "a start on A over the budget");

    let mut carol = b.connect("carol").await;
    let run = carol.start_run("echo", json!("carol's budget")).await;
    carol.collect_run(&run).await;

    let events = ta.until_completed(&[&r1, &r2, &r3]).await;
    assert_eq!(
        events
            .iter()
            .filter(|e| e["type"] == "agent_completed" && e["data"]["status"] == "succeeded")
            .count(),
        3,
        "{events:#?}"
    );
    assert_eq!(
        events
            .iter()
            .map(|e| e["run_id"].as_str().unwrap())
            .collect::<BTreeSet<_>>(),
        BTreeSet::from([r1.as_str(), r2.as_str(), r3.as_str()]),
        "only the three accepted runs ran"
    );
}

/// `--max-connections-per-user` is per node (PROTOCOL.md §10 lets it be either, and asks to
/// say which): with 2 on both nodes, two tabs of one user on A and two on B are all served
/// (each gets the user's run); a third on A, and a third on B, are upgraded and then closed
/// 1008 "too many connections", as on one node (tests/it/limits.rs), and counted in that
/// node's `agentcast_connections_refused_total`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_per_user_is_per_node() {
    const REFUSED: &str = "agentcast_connections_refused_total{reason=\"too_many_connections\"}";
    let redis = RedisServer::start();
    let nodes = spawn_child_nodes(&redis, 2, &["--max-connections-per-user", "2"]).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let mut tabs = vec![
        Tab::open(a, "alice").await,
        Tab::open(a, "alice").await,
        Tab::open(b, "alice").await,
        Tab::open(b, "alice").await,
    ];
    for t in &mut tabs {
        t.c.assert_alive().await;
    }
    for node in [a, b] {
        assert_eq!(
            scrape(node.addr).await.get(REFUSED),
            0.0,
            "node {}: two connections of a user refused nothing",
            node.id
        );
    }

    assert_refused_1008_on(a, "alice").await;
    assert_eq!(scrape(a.addr).await.get(REFUSED), 1.0, "node A");
    assert_eq!(
        scrape(b.addr).await.get(REFUSED),
        0.0,
        "node B refused nothing"
    );
    assert_refused_1008_on(b, "alice").await;
    assert_eq!(scrape(b.addr).await.get(REFUSED), 1.0, "node B");

    // The four that are in are untouched, on both nodes.
    let run = tabs[0].c.start_run("echo", json!("to four tabs")).await;
    let mut seen = Vec::new();
    for t in &mut tabs {
        t.until_completed(&[&run]).await;
        seen.push(t.run_events(&run));
    }
    check_run(&seen[0], &run, None);
    for (t, s) in tabs.iter().zip(&seen) {
        assert_eq!(s, &seen[0], "{}: another sequence of the run", t.name);
    }
}

/// A WebSocket connection to `node` over the user's connection limit: the upgrade succeeds,
/// and the first thing that comes is a close 1008 whose reason says too many connections (as
/// tests/it/limits.rs checks on one node).
async fn assert_refused_1008_on(node: &Node, user: &str) {
    let url = format!("{}?token={}", node.ws_url(), node.token(user));
    let what = format!("{user}@{} over the limit", node.id);
    let (mut ws, response) =
        match tokio::time::timeout(TIMEOUT, tokio_tungstenite::connect_async(url)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => panic!(
                "{what}: the connection must still be upgraded, got {}",
                describe_error(&e)
            ),
            Err(_) => panic!("{what}: handshake timed out"),
        };
    assert_eq!(response.status().as_u16(), 101, "{what}");
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .unwrap_or_else(|_| panic!("{what}: not closed within {TIMEOUT:?}"));
        match msg {
            Some(Ok(Message::Close(Some(frame)))) => {
                assert_eq!(u16::from(frame.code), 1008, "{what}: close {frame:?}");
                let reason = frame.reason.as_str().to_ascii_lowercase();
                assert!(
                    reason.contains("too many connections"),
                    "{what}: close reason {reason:?}"
                );
                return;
            }
            Some(Ok(Message::Ping(_))) | Some(Ok(Message::Pong(_))) => {}
            other => panic!("{what}: expected close 1008 first, got {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A node dies
// ---------------------------------------------------------------------------------------------

/// kill -9 of node A (`--node-timeout-ms 1000`) during a run's long tool call: a tab of the
/// user on B gets `tool_completed` ok:false for the open call, then `agent_completed` failed
/// with code `node_lost`, within two node timeouts (plus slack) of the kill. The dead node's
/// client reconnects to B with after_seq and gets exactly what it missed. `GET` on B says
/// failed, and the user can start runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_nodes_runs_end_node_lost() {
    const NODE_TIMEOUT: Duration = Duration::from_millis(1000);
    let redis = RedisServer::start();
    let mut nodes = spawn_child_nodes(&redis, 2, &["--node-timeout-ms", "1000"]).await;
    let mut ta = Tab::open(&nodes[0], "alice").await;
    let mut tb = Tab::open(&nodes[1], "alice").await;
    let epoch = ta.epoch();

    let run = ta.c.start_run("scripted", long_run()).await;
    let executing = tb.event(&run, "tool_executing").await;
    ta.event(&run, "tool_executing").await;
    let k = ta.last_seq();

    let killed = Instant::now();
    nodes[0].kill9().await;
    let tool_done = tb.event(&run, "tool_completed").await;
    let done = tb.event(&run, "agent_completed").await;
    let took = killed.elapsed();
    eprintln!("node_lost {took:?} after the kill");
    assert!(
        took <= 2 * NODE_TIMEOUT + SLACK,
        "agent_completed node_lost came {took:?} after the kill (node timeout {NODE_TIMEOUT:?}); \
         the surviving node's log: {:#?}",
        nodes[1].log()
    );
    assert_eq!(
        tool_done["data"]["tool_call_id"], executing["data"]["tool_call_id"],
        "{tool_done}"
    );
    assert_eq!(tool_done["data"]["ok"], false, "{tool_done}");
    assert_error_obj(&tool_done["data"]["error"]);
    assert_eq!(done["data"]["status"], "failed", "{done}");
    assert_eq!(done["data"]["error"]["code"], "node_lost", "{done}");
    let events = tb.run_events(&run);
    check_run(&events, &run, None);
    assert_seqs_from(&tb.events(), tb.welcome_last_seq() + 1, "B's tab");

    // A's client: its connection ended; it reconnects to B and resumes.
    ta.c.expect_close().await;
    let mut back = Tab::open_query(
        &nodes[1],
        "alice",
        &format!("after_seq={k}&epoch={}", percent_encode(&epoch)),
    )
    .await;
    assert_eq!(back.epoch(), epoch);
    let resumed = back.until("resumed", |f| f["type"] == "resumed").await;
    let missed: Vec<Value> = tb
        .events()
        .into_iter()
        .filter(|e| e["seq"].as_u64().unwrap() > k)
        .collect();
    assert_eq!(back.events(), missed, "the replay on B after the node died");
    assert_resumed(&resumed, k + 1, tb.last_seq(), None);

    let view = ended_view(&nodes[1], "alice", &run).await;
    assert_eq!(view["status"], "failed", "{view}");
    let again = back.c.start_run("echo", json!("after the loss")).await;
    back.event(&again, "agent_completed").await;
    assert_seqs_from(&back.events(), k + 1, "B after the loss");
}

/// Node A reaches Redis through a [`CutProxy`], node B directly (`--node-timeout-ms 1000`). A
/// run on A is in a long `sleep` call (progress every 2 s) when A is cut off from Redis. A tab
/// on B gets `tool_completed` ok:false `node_lost` for the open call, then `agent_completed`
/// `failed` `node_lost`, within two node timeouts (plus slack) of the cut, while A says Redis
/// is down (so the loss is the cut's doing). Then A is reconnected: it stops the run's actor
/// (its `agentcast_runs_running` falls to 0, long before the sleep would have ended), what the
/// actor still emitted never reaches a tab, A serves a new run, and the user's tab on A
/// (resumed, if A closed it) and the tab on B read the same sequence, seq contiguous, with
/// nothing of the lost run after its `agent_completed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_from_redis_is_taken_for_lost() {
    const NODE_TIMEOUT: Duration = Duration::from_millis(1000);
    /// The run's sleep call; the tool reports progress every tenth of it.
    const SLEEP_MS: u64 = 20_000;
    let redis = RedisServer::start();
    let proxy = CutProxy::start(redis.port()).await;
    let args = ["--node-timeout-ms", "1000"];
    let nodes = vec![
        Node::spawn_child(&proxy.url(), &node_id(0), &args).await,
        Node::spawn_child(&redis.url(), &node_id(1), &args).await,
    ];
    let (a, b) = (&nodes[0], &nodes[1]);
    wait_redis_up(&nodes, 1.0).await;
    let mut ta = Tab::open(a, "alice").await;
    let mut tb = Tab::open(b, "alice").await;
    let epoch = ta.epoch();
    let base = ta.welcome_last_seq();

    let run =
        ta.c.start_run(
            "scripted",
            scripted(json!([
                {"think": "working"},
                {"tool": "sleep", "args": {"ms": SLEEP_MS}},
                {"text": "never"}
            ])),
        )
        .await;
    let executing = tb.event(&run, "tool_executing").await;
    let executing_at = Instant::now();
    ta.event(&run, "tool_executing").await;

    proxy.cut();
    let cut_at = Instant::now();
    let tool_done = tb.event(&run, "tool_completed").await;
    let done = tb.event(&run, "agent_completed").await;
    let took = cut_at.elapsed();
    eprintln!("node_lost {took:?} after the cut");
    assert!(
        took <= 2 * NODE_TIMEOUT + SLACK,
        "agent_completed node_lost came {took:?} after A was cut off (node timeout \
         {NODE_TIMEOUT:?}); B's log: {:#?}",
        b.log()
    );
    assert_eq!(
        tool_done["data"]["tool_call_id"], executing["data"]["tool_call_id"],
        "{tool_done}"
    );
    assert_eq!(tool_done["data"]["ok"], false, "{tool_done}");
    assert_error_obj(&tool_done["data"]["error"]);
    assert_eq!(
        tool_done["data"]["error"]["code"], "node_lost",
        "{tool_done}"
    );
    assert_eq!(done["data"]["status"], "failed", "{done}");
    assert_error_obj(&done["data"]["error"]);
    assert_eq!(done["data"]["error"]["code"], "node_lost", "{done}");
    let lost = tb.run_events(&run);
    check_run(&lost, &run, None);
    let a_metrics = scrape(a.addr).await;
    assert_eq!(
        a_metrics.get("agentcast_redis_up"),
        0.0,
        "test fixture: A still reaches Redis through the cut proxy"
    );
    eprintln!(
        "A's agentcast_runs_running while cut off: {}",
        a_metrics.get("agentcast_runs_running")
    );
    assert_eq!(
        scrape(b.addr).await.get("agentcast_runs_node_lost_total"),
        1.0,
        "B ended A's run"
    );

    // A is back. Its run actor still emits (progress every SLEEP_MS / 10): Redis refuses that,
    // and A stops the actor.
    proxy.restore();
    event_resuming(&mut ta, a, "alice", &run, "agent_completed").await;
    wait_metric_within(
        a.addr,
        "agentcast_runs_running",
        0.0,
        Duration::from_millis(SLEEP_MS / 10) + SLACK,
    )
    .await;
    assert!(
        executing_at.elapsed() < Duration::from_millis(SLEEP_MS),
        "test timing: the sleep may have ended by itself, not been stopped"
    );

    // A serves again: a new run on A reaches both tabs. (A may refuse starts `unavailable`
    // for a moment after Redis answers again, as PROTOCOL.md §3 allows: try again later.)
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let again = loop {
        let reply =
            ta.c.request(json!({"type": "start_run", "agent": "echo", "input": "A is back"}))
                .await;
        if reply["type"] == "ack" {
            break reply["run_id"].as_str().unwrap().to_string();
        }
        assert_error_code(&reply, "unavailable", "start_run on A after the cut");
        assert!(
            tokio::time::Instant::now() < deadline,
            "A still refuses starts {TIMEOUT:?} after it was reconnected: {reply}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    event_resuming(&mut ta, a, "alice", &again, "agent_completed").await;
    tb.event(&again, "agent_completed").await;
    for t in [&mut ta, &mut tb] {
        assert!(
            ping_flush(&mut t.c, "flush").await.is_empty(),
            "{}: frames after the new run",
            t.name
        );
    }

    assert_eq!(ta.epoch(), epoch, "a cut must not change the epoch");
    for t in [&ta, &tb] {
        assert_eq!(
            t.run_events(&run),
            lost,
            "{}: the lost run, ending with node_lost and nothing after",
            t.name
        );
        let new = t.run_events(&again);
        check_run(&new, &again, None);
        assert_eq!(
            new.last().unwrap()["data"]["status"],
            "succeeded",
            "{}",
            t.name
        );
        assert_seqs_from(&t.events(), base + 1, &t.name);
    }
    assert_eq!(
        ta.events(),
        tb.events(),
        "the tab on A and the tab on B read different sequences"
    );
}

/// Reads like [`Tab::event`] until the run's event of type `ty`, but when the server closes
/// the connection (or it ends), opens another on `node` with `?after_seq=<last seq
/// read>&epoch=<epoch>`, as a client does, and reads on; the replay and `resumed` count as
/// read.
async fn event_resuming(t: &mut Tab, node: &Node, user: &str, run: &str, ty: &str) -> Value {
    let what = format!("{ty} of {run}");
    let pred = |f: &Value| is_event(f) && f["run_id"] == run && f["type"] == ty;
    if let Some(f) = t.seen.iter().find(|f| pred(f)) {
        return f.clone();
    }
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        // Frames the client kept back (read while waiting for a reply) first.
        while !t.c.kept().is_empty() {
            let f = t.c.next_json().await;
            if f["type"] == "heartbeat" {
                continue;
            }
            t.seen.push(f.clone());
            if pred(&f) {
                return f;
            }
        }
        let Ok(msg) = tokio::time::timeout_at(deadline, t.c.next_message()).await else {
            panic!(
                "{}: no {what} within {TIMEOUT:?}; the last frames read: {:#?}",
                t.name,
                &t.seen[t.seen.len().saturating_sub(10)..]
            )
        };
        match msg {
            Some(Ok(Message::Text(text))) => {
                let f: Value = serde_json::from_str(text.as_str()).expect("a JSON frame");
                if f["type"] == "heartbeat" {
                    continue;
                }
                t.seen.push(f.clone());
                if pred(&f) {
                    return f;
                }
            }
            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                eprintln!("{}: closed by the server ({msg:?}); resuming", t.name);
                let query = format!(
                    "after_seq={}&epoch={}",
                    t.last_seq(),
                    percent_encode(&t.epoch())
                );
                t.c = node.connect_query(user, &query).await;
            }
            Some(Ok(_)) => {}
        }
    }
}

/// A TCP proxy in front of Redis, for one node: [`CutProxy::cut`] cuts that node off as a
/// network partition does (connections stay open and new ones are accepted, but no byte is
/// forwarded either way), while other nodes still reach Redis directly; [`CutProxy::restore`]
/// lets the held bytes flow on.
struct CutProxy {
    port: u16,
    cut: watch::Sender<bool>,
    accept: tokio::task::JoinHandle<()>,
}

impl CutProxy {
    async fn start(redis_port: u16) -> CutProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the proxy");
        let port = listener.local_addr().expect("the proxy's address").port();
        let (cut, cut_rx) = watch::channel(false);
        let accept = tokio::spawn(async move {
            while let Ok((node_side, _)) = listener.accept().await {
                let cut = cut_rx.clone();
                tokio::spawn(async move {
                    let Ok(redis_side) =
                        tokio::net::TcpStream::connect(("127.0.0.1", redis_port)).await
                    else {
                        return;
                    };
                    let _ = node_side.set_nodelay(true);
                    let _ = redis_side.set_nodelay(true);
                    let (node_read, node_write) = node_side.into_split();
                    let (redis_read, redis_write) = redis_side.into_split();
                    tokio::join!(
                        pump(node_read, redis_write, cut.clone()),
                        pump(redis_read, node_write, cut)
                    );
                });
            }
        });
        CutProxy { port, cut, accept }
    }

    /// `redis://127.0.0.1:PORT` of the proxy.
    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn cut(&self) {
        self.cut.send_replace(true);
    }

    fn restore(&self) {
        self.cut.send_replace(false);
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Copies `from` to `to`, holding what it read while the link is cut.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut cut: watch::Receiver<bool>,
) {
    let mut buf = vec![0; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if cut.wait_for(|cut| !*cut).await.is_err() {
            break;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Redis fails
// ---------------------------------------------------------------------------------------------

/// Redis paused (SIGSTOP) for 1.5 s while runs on both nodes emit, then resumed: every tab, on
/// either node, gets every event of both runs, the same sequence, seq contiguous, nothing lost
/// or repeated, and the epoch is unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_paused_mid_run_loses_nothing() {
    /// Well under the node timeout: no node may be declared dead.
    const PAUSE: Duration = Duration::from_millis(1500);
    let redis = RedisServer::start();
    let nodes = spawn_child_nodes(&redis, 2, &["--node-timeout-ms", "10000"]).await;
    let mut tabs = vec![
        Tab::open(&nodes[0], "alice").await,
        Tab::open(&nodes[1], "alice").await,
        Tab::open(&nodes[1], "alice").await,
    ];
    let epoch = tabs[0].epoch();
    let base = tabs[0].welcome_last_seq();

    // ~3 s each.
    let r1 = tabs[0].c.start_run("scripted", texts(100, 30)).await;
    let r2 = tabs[1].c.start_run("scripted", texts(100, 30)).await;
    for t in &mut tabs {
        t.until("20 events", |f| is_event(f) && f["seq"] == base + 20)
            .await;
    }
    redis.pause();
    let paused_at = now_micros();
    // The fault lasts this long; nothing is synchronised on it.
    tokio::time::sleep(PAUSE).await;
    redis.resume();

    let mut all = Vec::new();
    for t in &mut tabs {
        all.push(t.until_completed(&[&r1, &r2]).await);
    }
    for (i, events) in all.iter().enumerate() {
        assert_eq!(events, &all[0], "tab {} saw another sequence", tabs[i].name);
    }
    assert_seqs_from(&all[0], base + 1, "through the pause");
    for run in [&r1, &r2] {
        let events = tabs[0].run_events(run);
        check_run(&events, run, None);
        assert_eq!(events.last().unwrap()["data"]["status"], "succeeded");
        let want: Vec<String> = (0..100).map(|i| format!("t{i}")).collect();
        assert_eq!(partial_texts(&events), want, "every text, once, in order");
        assert!(
            event_ts_micros(events.last().unwrap()) > paused_at,
            "test timing: run {run} ended before Redis was paused, nothing was tested"
        );
    }
    let last = tabs[0].last_seq();
    for node in &nodes {
        let t = Tab::open(node, "alice").await;
        assert_eq!(t.epoch(), epoch, "a pause must not change the epoch");
        assert_eq!(t.welcome_last_seq(), last);
    }
}

/// Redis killed: `start_run` gets `error` `unavailable` and `POST /v1/runs` 503 `unavailable`
/// on every node; `agentcast_redis_up` goes 1 -> 0; open connections stay open, keep getting
/// `heartbeat` frames (with the last seq they saw) and answer pings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_refuses_starts_and_keeps_connections() {
    let mut redis = RedisServer::start();
    let nodes = spawn_child_nodes(&redis, 2, &["--heartbeat-interval-ms", "200"]).await;
    let mut tabs = vec![
        Tab::open(&nodes[0], "alice").await,
        Tab::open(&nodes[1], "alice").await,
    ];
    wait_redis_up(&nodes, 1.0).await;
    let run = tabs[0].c.start_run("echo", json!("before")).await;
    for t in &mut tabs {
        t.event(&run, "agent_completed").await;
    }
    let last = tabs[0].last_seq();

    redis.kill();
    wait_redis_up(&nodes, 0.0).await;

    for t in &mut tabs {
        let reply =
            t.c.request(json!({"type": "start_run", "agent": "echo", "input": "while down"}))
                .await;
        assert_error_code(&reply, "unavailable", &format!("start_run on {}", t.name));
    }
    for node in &nodes {
        let r = node
            .http(
                "POST",
                "/v1/runs",
                Some("alice"),
                &json!({"agent": "echo", "input": "while down"}),
            )
            .await;
        assert_http_error(
            &r,
            503,
            "unavailable",
            &format!("POST /v1/runs on {}", node.id),
        );
    }
    for t in &mut tabs {
        for _ in 0..5 {
            let hb = t.c.next_of_type("heartbeat").await;
            assert_eq!(
                hb,
                json!({"type": "heartbeat", "last_seq": last}),
                "{}: heartbeat while Redis is down",
                t.name
            );
        }
        t.c.assert_alive().await;
        assert!(
            t.c.kept().iter().all(|f| !is_event(f)),
            "{}: events while Redis is down: {:?}",
            t.name,
            t.c.kept()
        );
    }
}

/// Redis restarted empty (all its data lost): a new connection's welcome.epoch differs from
/// before, on both nodes alike; a resume with the old epoch (at connect, and by command), or
/// with an after_seq past the new last_seq, gets `resume_gap`; a connection that stayed open
/// through it is closed 1012 or gets `error` `resume_gap` before any event of a run started
/// after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_empty_changes_the_epoch_and_never_gaps_silently() {
    let mut redis = RedisServer::start();
    let nodes = spawn_child_nodes(&redis, 2, &[]).await;
    let mut old = vec![
        Tab::open(&nodes[0], "alice").await,
        Tab::open(&nodes[1], "alice").await,
    ];
    let old_epoch = old[0].epoch();
    let run = old[0].c.start_run("echo", json!("before the loss")).await;
    for t in &mut old {
        t.event(&run, "agent_completed").await;
    }
    let n = old[0].last_seq();
    wait_redis_up(&nodes, 1.0).await;

    redis.kill();
    wait_redis_up(&nodes, 0.0).await;
    redis.restart_empty();
    wait_redis_up(&nodes, 1.0).await;

    let mut fresh = Tab::open(&nodes[1], "alice").await;
    let new_epoch = fresh.epoch();
    assert_ne!(new_epoch, old_epoch, "Redis lost the history: a new epoch");
    let other = Tab::open(&nodes[0], "alice").await;
    assert_eq!(other.epoch(), new_epoch, "both nodes give the new epoch");
    let new_last = fresh.welcome_last_seq();

    // Resuming into the old epoch: at connect, and with the command.
    let mut at_connect = Tab::open_query(
        &nodes[0],
        "alice",
        &format!("after_seq={n}&epoch={}", percent_encode(&old_epoch)),
    )
    .await;
    assert_eq!(at_connect.epoch(), new_epoch);
    let gap = at_connect.until("an error", |f| f["type"] == "error").await;
    assert_gap(&gap, "resume with the old epoch at connect");
    let reply = fresh
        .c
        .request(json!({"type": "resume", "after_seq": n, "epoch": old_epoch}))
        .await;
    assert_gap(&reply, "the resume command with the old epoch");
    if new_last < n {
        let mut past = Tab::open_query(&nodes[1], "alice", &format!("after_seq={n}")).await;
        let gap = past.until("an error", |f| f["type"] == "error").await;
        assert_gap(&gap, "after_seq past the new last_seq");
    }

    // A run of the new epoch; the connections from before must not take it for the old one.
    let run = fresh.c.start_run("echo", json!("after the loss")).await;
    fresh.event(&run, "agent_completed").await;
    let new_events = fresh.run_events(&run);
    check_run(&new_events, &run, None);
    for t in &mut old {
        match loss_notice(t).await {
            LossNotice::Closed => {}
            LossNotice::Gap(gap) => {
                assert_gap(&gap, &format!("{}: unsolicited resume_gap", t.name));
                t.event(&run, "agent_completed").await;
                assert_eq!(
                    t.run_events(&run),
                    new_events,
                    "{}: after its resume_gap, the new epoch's events",
                    t.name
                );
            }
        }
    }
}

enum LossNotice {
    Closed,
    Gap(Value),
}

/// What a connection opened before Redis lost its data reads next (heartbeats aside): a close
/// 1012 or an error resume_gap. A run event first is a silent gap.
async fn loss_notice(t: &mut Tab) -> LossNotice {
    let before = t.seen.len();
    while !t.c.kept().is_empty() {
        let f = t.c.next_json().await;
        if let Some(notice) = notice_in(t, &f, before) {
            return notice;
        }
    }
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let Ok(msg) = tokio::time::timeout_at(deadline, t.c.next_message()).await else {
            panic!(
                "{}: neither close 1012 nor resume_gap within {TIMEOUT:?} of a run of the new epoch",
                t.name
            )
        };
        match msg {
            Some(Ok(Message::Text(text))) => {
                let f: Value = serde_json::from_str(text.as_str()).expect("a JSON frame");
                if let Some(notice) = notice_in(t, &f, before) {
                    return notice;
                }
            }
            Some(Ok(Message::Close(frame))) => {
                let code = frame.as_ref().map(|f| u16::from(f.code));
                assert_eq!(
                    code,
                    Some(1012),
                    "{}: closed after the loss of Redis data with {frame:?}, not 1012",
                    t.name
                );
                return LossNotice::Closed;
            }
            Some(Ok(_)) => {}
            other => panic!(
                "{}: the connection ended without close 1012 or resume_gap: {other:?}",
                t.name
            ),
        }
    }
}

fn notice_in(t: &mut Tab, f: &Value, before: usize) -> Option<LossNotice> {
    if f["type"] == "heartbeat" {
        return None;
    }
    t.seen.push(f.clone());
    if f["type"] == "error" && f["code"] == "resume_gap" {
        return Some(LossNotice::Gap(f.clone()));
    }
    panic!(
        "{}: after Redis lost its data, {f} came before any close 1012 or resume_gap (read: {:#?})",
        t.name,
        &t.seen[before..]
    );
}

/// An `error` `resume_gap` with its `oldest_seq` and `last_seq`.
fn assert_gap(f: &Value, what: &str) {
    assert_error_code(f, "resume_gap", what);
    assert!(
        f["oldest_seq"].is_u64() && f["last_seq"].is_u64(),
        "{what}: resume_gap without oldest_seq and last_seq: {f}"
    );
}

/// One node with `--redis-max-pending 20` (and a node timeout far longer than the test, so
/// nobody is taken for lost): a run thinks 50 times a second; Redis is paused (SIGSTOP) until
/// the node's `agentcast_redis_pending_events` exceeds 20, then resumed. The tab gets the run's
/// events seq-contiguous, each once, its thoughts in script order with none missing (the held
/// events went out), ending with `agent_completed` `failed`, error code `unavailable`, and
/// nothing of the run after it. A run started afterwards succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_that_overflows_the_held_events_ends_unavailable() {
    const MAX_PENDING: f64 = 20.0;
    let redis = RedisServer::start();
    let nodes = spawn_child_nodes(
        &redis,
        1,
        &["--redis-max-pending", "20", "--node-timeout-ms", "60000"],
    )
    .await;
    let node = &nodes[0];
    let mut tab = Tab::open(node, "alice").await;
    let base = tab.welcome_last_seq();

    // 600 thoughts 20 ms apart: ~12 s unless something ends it.
    let steps: Vec<Value> = (0..600)
        .flat_map(|i| [json!({"think": format!("k{i}")}), json!({"sleep_ms": 20})])
        .collect();
    let run = tab
        .c
        .start_run("scripted", scripted(Value::Array(steps)))
        .await;
    tab.until("10 events", |f| is_event(f) && f["seq"] == base + 10)
        .await;
    assert!(
        tab.run_events(&run)
            .iter()
            .all(|e| e["type"] != "agent_completed"),
        "the run ended before Redis was paused: {:#?}",
        tab.run_events(&run)
    );

    redis.pause();
    let paused_at = now_micros();
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let held = loop {
        let pending = scrape(node.addr)
            .await
            .get("agentcast_redis_pending_events");
        if pending > MAX_PENDING {
            break pending;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "Redis paused for {TIMEOUT:?}: agentcast_redis_pending_events is {pending}, never over \
             --redis-max-pending {MAX_PENDING}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eprintln!("{held} events held when Redis was resumed");
    redis.resume();

    let done = tab.event(&run, "agent_completed").await;
    assert_eq!(done["data"]["status"], "failed", "{done}");
    assert_error_obj(&done["data"]["error"]);
    assert_eq!(done["data"]["error"]["code"], "unavailable", "{done}");
    assert!(
        event_ts_micros(&done) > paused_at,
        "the run ended before Redis was paused: {done}"
    );
    let events = tab.run_events(&run);
    check_run(&events, &run, None);
    assert_seqs_from(&tab.events(), base + 1, "the tab, through the pause");
    let thoughts: Vec<&str> = events
        .iter()
        .filter(|e| e["type"] == "agent_thinking")
        .map(|e| e["data"]["text"].as_str().unwrap())
        .collect();
    let want: Vec<String> = (0..thoughts.len()).map(|i| format!("k{i}")).collect();
    assert_eq!(
        thoughts, want,
        "the thoughts must be the script's first ones, in order, none missing or repeated"
    );
    assert!(
        thoughts.len() as f64 > MAX_PENDING,
        "over {MAX_PENDING} events were held, yet the run has only {} thoughts: held events were \
         lost",
        thoughts.len()
    );

    // Redis is back: the next run works, and nothing more of the failed one came.
    let again = tab.c.start_run("echo", json!("after the overflow")).await;
    tab.event(&again, "agent_completed").await;
    let after = tab.run_events(&again);
    check_run(&after, &again, None);
    assert_eq!(after.last().unwrap()["data"]["status"], "succeeded");
    assert!(
        ping_flush(&mut tab.c, "flush").await.is_empty(),
        "frames after the second run"
    );
    assert_eq!(
        tab.run_events(&run),
        events,
        "events of the failed run came after its agent_completed"
    );
    assert_seqs_from(&tab.events(), base + 1, "the tab, both runs");
}

// ---------------------------------------------------------------------------------------------
// Many users
// ---------------------------------------------------------------------------------------------

/// 20 users with 2 tabs each, one tab on each of two nodes (one a child process, one in this
/// process), five runs each started alternately from both tabs: each user's two tabs see the
/// identical sequence, seq contiguous, exactly the user's five runs, each whole and
/// successful, and no frame of another user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_users_two_tabs_two_nodes() {
    let redis = RedisServer::start();
    let mut nodes = spawn_child_nodes(&redis, 1, &[]).await;
    nodes.extend(start_in_process_nodes(&redis, 1, test_config()));
    let users = join_all((0..20).map(|i| one_user(&nodes, i))).await;
    let events: usize = users.iter().sum();
    eprintln!("{events} events checked on 40 tabs");
}

/// One user of [`twenty_users_two_tabs_two_nodes`]; returns how many events each tab saw.
async fn one_user(nodes: &[Node], i: usize) -> usize {
    let user = format!("user{i:02}");
    let mut tabs = [
        Tab::open(&nodes[i % 2], &user).await,
        Tab::open(&nodes[(i + 1) % 2], &user).await,
    ];
    let base = tabs[0].welcome_last_seq();
    assert_eq!(tabs[1].welcome_last_seq(), base, "{user}");
    assert_eq!(tabs[0].epoch(), tabs[1].epoch(), "{user}");
    let mut inputs = HashMap::new();
    for k in 0..5 {
        let input = mixed_run(&format!("{user} run {k}"));
        let run = tabs[k % 2].c.start_run("scripted", input.clone()).await;
        inputs.insert(run, input);
    }
    let runs: Vec<&str> = inputs.keys().map(String::as_str).collect();
    let seen0 = tabs[0].until_completed(&runs).await;
    let seen1 = tabs[1].until_completed(&runs).await;
    assert_eq!(seen0, seen1, "{user}: the two tabs saw different sequences");
    assert_seqs_from(&seen0, base + 1, &user);
    for e in &seen0 {
        let run = e["run_id"].as_str().unwrap();
        assert!(
            inputs.contains_key(run),
            "{user} received an event of a run not theirs: {e}"
        );
    }
    for (run, input) in &inputs {
        let events = tabs[0].run_events(run);
        check_run(&events, run, None);
        assert_eq!(events[0]["data"]["input"], *input, "{user}: {run}");
        assert_eq!(
            events.last().unwrap()["data"]["status"],
            "succeeded",
            "{user}: {run}"
        );
    }
    for t in &mut tabs {
        assert!(
            ping_flush(&mut t.c, "flush").await.is_empty(),
            "{}: frames after the runs",
            t.name
        );
    }
    seen0.len()
}

// ---------------------------------------------------------------------------------------------
// Settings
// ---------------------------------------------------------------------------------------------

/// `agentcast serve` with a `--redis-url` (or `AGENTCAST_REDIS_URL`) that is not a Redis URL
/// exits at once, non-zero, with a message naming `--redis-url`; `Config::validate` refuses it
/// the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_url_that_is_not_a_url_is_refused_at_start() {
    let flag = serve_command(&["--redis-url", "not-a-url"]);
    let mut env = serve_command(&[]);
    env.env("AGENTCAST_REDIS_URL", "not-a-url");
    for (what, mut cmd) in [
        ("--redis-url not-a-url", flag),
        ("AGENTCAST_REDIS_URL=not-a-url", env),
    ] {
        cmd.env("AGENTCAST_JWT_SECRET", SECRET);
        let out = match tokio::time::timeout(TIMEOUT, cmd.output()).await {
            Ok(Ok(out)) => out,
            Ok(Err(e)) => panic!("{what}: running agentcast serve: {e}"),
            Err(_) => panic!("{what}: agentcast serve did not exit within {TIMEOUT:?}: it served"),
        };
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{what}: agentcast serve exited successfully; stderr: {stderr}"
        );
        assert!(
            stderr.contains("--redis-url"),
            "{what}: the message must name --redis-url; stderr: {stderr}"
        );
        assert!(
            !stderr.contains("listening on"),
            "{what}: it listened before refusing; stderr: {stderr}"
        );
    }

    let config = agentcast::Config {
        redis_url: Some("not-a-url".into()),
        ..test_config()
    };
    let e = config
        .validate()
        .expect_err("Config::validate accepts --redis-url not-a-url");
    assert!(e.to_string().contains("--redis-url"), "{e}");
    if let Ok(server) = agentcast::spawn(config) {
        panic!(
            "agentcast::spawn served with --redis-url not-a-url on {}",
            server.addr()
        );
    }
}
