//! The machine, the commit, the human table and the JSON line.

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::Ordering;

use serde_json::{json, Value};

use crate::cli::{Params, Scenario};
use crate::run::{Outcome, ProcFigures};
use crate::server::{clock_ticks_per_sec, ProcSample};
use crate::stats::{self, Figures};

fn cstr(b: &[libc::c_char]) -> String {
    let bytes: Vec<u8> = b
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// `uname -a`-like facts, cores, memory, load: what the figures were measured on.
pub fn machine() -> Value {
    // SAFETY: uname fills the struct we pass.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    unsafe {
        libc::uname(&mut u);
    }
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string());
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "));
    json!({
        "sysname": cstr(&u.sysname),
        "nodename": cstr(&u.nodename),
        "release": cstr(&u.release),
        "version": cstr(&u.version),
        "machine": cstr(&u.machine),
        "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu": cpu,
        "mem_total_kib": mem_kib,
        "loadavg_at_start": load,
    })
}

/// `git rev-parse HEAD` of the repository, and whether the tree had changes.
pub fn commit() -> Value {
    let dir = env!("CARGO_MANIFEST_DIR");
    let head = Command::new("git")
        .args(["-C", dir, "rev-parse", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    let dirty = Command::new("git")
        .args(["-C", dir, "status", "--porcelain", "--untracked-files=no"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| !o.stdout.is_empty());
    json!({"commit": head, "dirty": dirty})
}

pub fn params_json(p: &Params) -> Value {
    let mut v = json!({
        "users": p.users,
        "tabs": p.tabs,
        "connections": p.connections(),
        "nodes": p.nodes,
        "own_redis": p.own_redis,
    });
    let m = v.as_object_mut().expect("object");
    if p.has_runs() {
        m.insert("runs_per_user".into(), json!(p.runs));
        m.insert("concurrency".into(), json!(p.concurrency));
        m.insert("steps".into(), json!(p.steps));
        m.insert("tool_every".into(), json!(p.tool_every));
        m.insert("payload_bytes".into(), json!(p.payload));
        m.insert("step_sleep_ms".into(), json!(p.step_sleep_ms));
        m.insert("events_per_run".into(), json!(p.events_per_run()));
    } else {
        m.insert("hold_secs".into(), json!(p.hold_secs));
    }
    match p.scenario {
        Scenario::Storm => {
            m.insert("storm_after_ms".into(), json!(p.storm_after_ms));
            m.insert("storm_pause_ms".into(), json!(p.storm_pause_ms));
        }
        Scenario::Publish => {
            m.insert("publishers".into(), json!(p.publishers));
            m.insert("batch".into(), json!(p.batch));
            m.insert("retry_rate".into(), json!(p.retry_rate));
            if let Some(i) = p.inject {
                m.insert("inject".into(), json!(format!("{i:?}").to_lowercase()));
            }
        }
        Scenario::Slow => {
            m.insert("slow_clients".into(), json!(p.slow_clients));
            m.insert("slow_pause_ms".into(), json!(p.slow_pause_ms));
            m.insert("slow_rcvbuf".into(), json!(p.slow_rcvbuf));
        }
        _ => {}
    }
    v
}

fn kib(s: &Option<ProcSample>) -> Option<u64> {
    s.map(|s| s.rss_kib)
}

/// CPU time (utime + stime) between two samples, microseconds.
fn cpu_us(a: &Option<ProcSample>, b: &Option<ProcSample>) -> Option<u64> {
    Some(
        (b.as_ref()?.cpu_ticks.checked_sub(a.as_ref()?.cpu_ticks)?) * 1_000_000
            / clock_ticks_per_sec(),
    )
}

/// One process's figures (a node, or Redis): `conns` connections on it, `deliveries` events
/// delivered in all (its CPU per event is its share of the total).
fn proc_json(f: &ProcFigures, conns: usize, deliveries: Option<u64>) -> Value {
    let cpu = cpu_us(&f.run_start, &f.run_end);
    let per_conn = match (kib(&f.before), kib(&f.connected)) {
        (Some(a), Some(b)) if conns > 0 => {
            Some(((b as f64 - a as f64) * 1024.0 / conns as f64).round())
        }
        _ => None,
    };
    let mut v = json!({
        "pid": f.pid,
        "rss_before_kib": kib(&f.before),
        "rss_connected_kib": kib(&f.connected),
        "rss_per_connection_bytes": per_conn,
        "rss_peak_kib": (f.rss_peak_kib > 0).then_some(f.rss_peak_kib),
        "vm_hwm_kib": f.last.or(f.run_end).map(|s| s.hwm_kib),
        "threads": f.run_end.map(|s| s.threads),
        "cpu_run_ms": cpu.map(|c| c as f64 / 1000.0),
    });
    if let (Some(c), Some(d)) = (cpu, deliveries) {
        v["cpu_us_per_event"] = json!(round3(c as f64 / d.max(1) as f64));
    }
    v
}

/// The sum of a figure over the nodes; None unless every node has it.
fn sum(nodes: &[Value], key: &str) -> Value {
    let mut total = 0.0;
    for n in nodes {
        match n[key].as_f64() {
            Some(x) => total += x,
            None => return Value::Null,
        }
    }
    if nodes.iter().all(|n| n[key].is_u64()) {
        json!(total as u64)
    } else {
        json!(round3(total))
    }
}

/// Everything measured, as the JSON line's `figures`.
pub fn figures(p: &Params, o: &Outcome, f: &Figures) -> Value {
    let ev = &o.shared.events;
    let l = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let conns = p.connections() as f64;
    // The run phase for throughput: gate to last receipt.
    let run_us = f.last_recv_us.saturating_sub(o.run_start_us).max(1);
    let deliveries = p.has_runs().then_some(f.deliveries);
    // Tab k of every user is on node k mod the number of nodes.
    let n = o.nodes.len().max(1);
    let nodes: Vec<Value> = o
        .nodes
        .iter()
        .enumerate()
        .map(|(i, nf)| {
            let on = (0..p.tabs).filter(|k| k % n == i).count() * p.users;
            proc_json(nf, on, deliveries)
        })
        .collect();
    let server_cpu: Option<u64> = o
        .nodes
        .iter()
        .map(|nf| cpu_us(&nf.run_start, &nf.run_end))
        .sum();
    let redis = o.redis.as_ref().map(|r| proc_json(r, 0, deliveries));
    let redis_cpu = o
        .redis
        .as_ref()
        .and_then(|r| cpu_us(&r.run_start, &r.run_end));
    let per_conn = match (
        sum(&nodes, "rss_before_kib").as_f64(),
        sum(&nodes, "rss_connected_kib").as_f64(),
    ) {
        (Some(a), Some(b)) => Some(((b - a) * 1024.0 / conns).round()),
        _ => None,
    };
    let mut server = json!({
        "rss_before_kib": sum(&nodes, "rss_before_kib"),
        "rss_connected_kib": sum(&nodes, "rss_connected_kib"),
        "rss_per_connection_bytes": per_conn,
        "rss_peak_kib": sum(&nodes, "rss_peak_kib"),
        "vm_hwm_kib": sum(&nodes, "vm_hwm_kib"),
        "threads": sum(&nodes, "threads"),
        "cpu_run_ms": server_cpu.map(|c| c as f64 / 1000.0),
    });
    if nodes.len() > 1 {
        // The totals above are sums over the nodes (RSS peaks: of each node's own peak).
        server["nodes"] = json!(nodes);
    }
    let mut v = json!({
        "connect": {
            "connections": p.connections(),
            "secs": round3(o.connect_secs),
            "per_sec": (conns / o.connect_secs.max(1e-9)).round(),
            "retries": l(&ev.connect_retries),
            "source_addrs": o.sources.max(1),
        },
        "server": server,
        "harness": {
            "cpu_run_ms": o.harness_cpu_us as f64 / 1000.0,
        },
    });
    if let Some(r) = redis {
        v["redis"] = r;
    }
    // How busy the whole machine was over the run phase, and how much of that was neither the
    // server (its nodes), its Redis nor the harness (other processes: the measure of noise).
    if let Some((busy, total)) = o.machine_ticks {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let secs = total as f64 / cores / clock_ticks_per_sec() as f64;
        if secs > 0.0 {
            let busy_cores = busy as f64 / clock_ticks_per_sec() as f64 / secs;
            let ours = (server_cpu.unwrap_or(0) + redis_cpu.unwrap_or(0) + o.harness_cpu_us) as f64
                / 1e6
                / secs;
            v["machine_load"] = json!({
                "busy_cores": round3(busy_cores),
                "other_processes_cores": round3((busy_cores - ours).max(0.0)),
            });
        }
    }
    let m = v.as_object_mut().expect("object");
    if p.has_runs() {
        let events_per_sec = f.deliveries as f64 * 1e6 / run_us as f64;
        m.insert(
            "run".into(),
            json!({
                "secs": round3(run_us as f64 / 1e6),
                "until_all_finished_secs": round3(o.run_secs),
                "delivered_events": f.deliveries,
                "delivered_events_per_sec": events_per_sec.round(),
                "runs": p.users * p.runs,
                "timed_out": o.timed_out,
                "start_refusals": l(&ev.start_refusals),
            }),
        );
        m.insert("latency_us".into(), stats::summary(&f.latency));
        if p.tabs >= 2 {
            m.insert("tab_spread_us".into(), stats::summary(&f.spread));
        }
        if !f.replayed.is_empty() {
            m.insert("replayed_latency_us".into(), stats::summary(&f.replayed));
        }
        if let Some(c) = server_cpu {
            m["server"]["cpu_us_per_event"] = json!(round3(c as f64 / f.deliveries.max(1) as f64));
            if let Some(r) = redis_cpu {
                m["server"]["with_redis_cpu_us_per_event"] =
                    json!(round3((c + r) as f64 / f.deliveries.max(1) as f64));
            }
        }
        m["harness"]["cpu_us_per_event"] =
            json!(round3(o.harness_cpu_us as f64 / f.deliveries.max(1) as f64));
    } else {
        m["server"]["cpu_hold_ms"] = json!(server_cpu.map(|c| c as f64 / 1000.0));
    }
    match p.scenario {
        Scenario::Storm => {
            m.insert(
                "storm".into(),
                json!({
                    "reconnected": l(&ev.storm_reconnected),
                    "all_welcomed_ms": l(&ev.storm_last_welcome_us) as f64 / 1000.0,
                    "all_resumed_ms": l(&ev.storm_last_resumed_us) as f64 / 1000.0,
                    "replayed_events": l(&ev.replayed),
                }),
            );
        }
        Scenario::Publish => {
            let accepted = l(&ev.publish_accepted);
            // Publisher side: first answer to the last answer that added events.
            let span = l(&ev.publish_last_accept_us)
                .saturating_sub(o.run_start_us)
                .max(1);
            let mut pb = json!({
                "batches_answered": l(&ev.publish_batches),
                "accepted_events": accepted,
                "accepted_events_per_sec": (accepted as f64 * 1e6 / span as f64).round(),
                "batches_resent": l(&ev.publish_resent),
                "batches_overlapping": l(&ev.publish_overlapped),
                "answers_429": l(&ev.publish_429),
                "create_refusals": l(&ev.start_refusals),
                "reconnects": l(&ev.publish_reconnects),
            });
            if let Some(h) = &o.batch_rtt {
                pb["batch_rtt_us"] = stats::summary(h);
            }
            if let Some(c) = server_cpu {
                pb["server_cpu_us_per_accepted_event"] =
                    json!(round3(c as f64 / accepted.max(1) as f64));
            }
            m.insert("publish".into(), pb);
        }
        Scenario::Slow => {
            m.insert(
                "slow".into(),
                json!({
                    "slow_clients": p.slow_clients,
                    "closed_4008": l(&ev.slow_close_4008),
                    "reset": l(&ev.slow_reset),
                    "eof_without_close": l(&ev.slow_eof),
                    "closed_other": l(&ev.slow_close_other),
                    "backlog_events_read": l(&ev.slow_backlog),
                    "resumed": l(&ev.resumes),
                    "replayed_events": l(&ev.replayed),
                    "slow_tab_latency_us": stats::summary(&f.slow),
                    "peer_tab_latency_us": stats::summary(&f.peers),
                }),
            );
        }
        _ => {}
    }
    v
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// The reference targets (docs/performance.md), shown next to the figures; never asserted.
fn target_note(p: &Params, key: &str) -> &'static str {
    match (p.scenario, key) {
        (Scenario::Fanout, "events") => "target >= 148,000/s (reference scenario)",
        (Scenario::Fanout, "cpu") => "target <= 8 us (reference scenario)",
        (Scenario::Idle, "rss") => "target <= 8 KiB at 10,000",
        (_, "p99") if p.step_sleep_ms >= 50 => "target <= 2 ms when paced at 50 ms/step",
        (Scenario::Storm, "loss") => "target: nothing lost at 5,000",
        _ => "",
    }
}

pub fn table(p: &Params, v: &Value, faults: &[(&str, u64)], messages: &[String], extra: &[String]) {
    let mut out = String::new();
    let mut row = |k: &str, val: String, note: &str| {
        out.push_str(&format!("  {k:<34} {val:>16}  {note}\n"));
    };
    let num = |x: &Value| -> String {
        match x {
            Value::Null => "-".into(),
            Value::Number(n) => {
                let f = n.as_f64().unwrap_or(0.0);
                if n.is_u64() || n.is_i64() || f.fract() == 0.0 {
                    group(f as i64)
                } else {
                    format!("{f:.3}")
                }
            }
            other => other.to_string(),
        }
    };
    let f = &v["figures"];
    println!();
    println!(
        "== agentcast load: {} ({} users x {} tabs = {} connections{})",
        p.scenario.name(),
        p.users,
        p.tabs,
        p.connections(),
        match (p.nodes, p.own_redis) {
            (1, false) => String::new(),
            (1, true) => ", 1 node on Redis".into(),
            (n, _) => format!(", {n} nodes"),
        }
    );
    if p.has_runs() {
        println!(
            "   {} runs per user ({} at a time), {} steps ({} tool calls, {}-byte text{}) = {} events per run",
            p.runs,
            p.concurrency,
            p.steps,
            p.tool_steps(),
            p.payload,
            if p.step_sleep_ms > 0 {
                format!(", {} ms between steps", p.step_sleep_ms)
            } else {
                String::new()
            },
            p.events_per_run()
        );
    }
    if p.scenario == Scenario::Publish {
        println!(
            "   published over HTTP by {} publishers (one keep-alive connection each), batches of {}, retry rate {}",
            p.publishers, p.batch, p.retry_rate
        );
    }
    for line in extra {
        println!("   {line}");
    }
    row("time to connect all (s)", num(&f["connect"]["secs"]), "");
    row("connections per second", num(&f["connect"]["per_sec"]), "");
    if f["connect"]["retries"].as_u64() > Some(0) {
        row("connect retries", num(&f["connect"]["retries"]), "");
    }
    if p.has_runs() {
        row("run phase (s)", num(&f["run"]["secs"]), "");
        row("delivered events", num(&f["run"]["delivered_events"]), "");
        row(
            "delivered events per second",
            num(&f["run"]["delivered_events_per_sec"]),
            target_note(p, "events"),
        );
        let lat = &f["latency_us"];
        row("latency ts->receipt p50 (us)", num(&lat["p50"]), "");
        row("latency p90 (us)", num(&lat["p90"]), "");
        row("latency p99 (us)", num(&lat["p99"]), target_note(p, "p99"));
        row("latency p99.9 (us)", num(&lat["p999"]), "");
        row("latency max (us)", num(&lat["max"]), "");
        if let Some(s) = f.get("tab_spread_us") {
            row(
                "tab spread p50 / p99 (us)",
                format!("{} / {}", num(&s["p50"]), num(&s["p99"])),
                "",
            );
            row("tab spread max (us)", num(&s["max"]), "");
        }
        if let Some(r) = f.get("replayed_latency_us") {
            row(
                "replayed events p50 / max (us)",
                format!("{} / {}", num(&r["p50"]), num(&r["max"])),
                "",
            );
        }
    }
    let s = &f["server"];
    let nodes = s["nodes"].as_array().map_or(&[][..], Vec::as_slice);
    // With several nodes the server's figures are sums over them.
    let all = if nodes.is_empty() {
        String::new()
    } else {
        format!("sum over the {} nodes", nodes.len())
    };
    row(
        "server RSS before connecting (KiB)",
        num(&s["rss_before_kib"]),
        &all,
    );
    row(
        "server RSS connected (KiB)",
        num(&s["rss_connected_kib"]),
        &all,
    );
    row(
        "server RSS per connection (bytes)",
        num(&s["rss_per_connection_bytes"]),
        target_note(p, "rss"),
    );
    row(
        "server RSS peak (KiB)",
        num(&s["rss_peak_kib"]),
        &if nodes.is_empty() {
            "sampled every 50 ms".to_string()
        } else {
            format!("{all} (each node's own peak), sampled every 50 ms")
        },
    );
    row("server VmHWM (KiB)", num(&s["vm_hwm_kib"]), &all);
    if p.has_runs() {
        row("server CPU over the run (ms)", num(&s["cpu_run_ms"]), &all);
        row(
            "server CPU per delivered event (us)",
            num(&s["cpu_us_per_event"]),
            if nodes.is_empty() {
                target_note(p, "cpu")
            } else {
                all.as_str()
            },
        );
    } else {
        row("server CPU while held (ms)", num(&s["cpu_hold_ms"]), "");
    }
    for (i, node) in nodes.iter().enumerate() {
        row(
            &format!("node {i} RSS connected / peak (KiB)"),
            format!(
                "{} / {}",
                num(&node["rss_connected_kib"]),
                num(&node["rss_peak_kib"])
            ),
            "",
        );
        row(
            &format!("node {i} CPU over the run (ms)"),
            num(&node["cpu_run_ms"]),
            "",
        );
        if p.has_runs() {
            row(
                &format!("node {i} CPU per event (us)"),
                num(&node["cpu_us_per_event"]),
                "its CPU / all delivered events",
            );
        }
    }
    if let Some(r) = f.get("redis") {
        row(
            "Redis RSS before / connected (KiB)",
            format!(
                "{} / {}",
                num(&r["rss_before_kib"]),
                num(&r["rss_connected_kib"])
            ),
            "",
        );
        row(
            "Redis RSS peak (KiB)",
            num(&r["rss_peak_kib"]),
            "sampled every 50 ms",
        );
        row("Redis CPU over the run (ms)", num(&r["cpu_run_ms"]), "");
        if p.has_runs() {
            row(
                "Redis CPU per delivered event (us)",
                num(&r["cpu_us_per_event"]),
                "",
            );
            row(
                "server+Redis CPU per event (us)",
                num(&s["with_redis_cpu_us_per_event"]),
                "the nodes' CPU and Redis's / delivered events",
            );
        }
    }
    if p.has_runs() {
        row(
            "harness CPU per delivered event (us)",
            num(&f["harness"]["cpu_us_per_event"]),
            "",
        );
    }
    if let Some(st) = f.get("storm") {
        row("storm: reconnected", num(&st["reconnected"]), "");
        row(
            "storm: all welcomed after (ms)",
            num(&st["all_welcomed_ms"]),
            "",
        );
        row(
            "storm: all resumed after (ms)",
            num(&st["all_resumed_ms"]),
            "",
        );
        row(
            "storm: events replayed",
            num(&st["replayed_events"]),
            target_note(p, "loss"),
        );
    }
    if let Some(pb) = f.get("publish") {
        row("publish: accepted events", num(&pb["accepted_events"]), "");
        row(
            "publish: accepted events per second",
            num(&pb["accepted_events_per_sec"]),
            "publisher side: first to last accepting answer",
        );
        row(
            "publish: batches answered",
            num(&pb["batches_answered"]),
            "resent and 429'd ones included",
        );
        row(
            "publish: resent / overlapping batches",
            format!(
                "{} / {}",
                num(&pb["batches_resent"]),
                num(&pb["batches_overlapping"])
            ),
            "on purpose (--retry-rate)",
        );
        row(
            "publish: 429 / create refusals",
            format!(
                "{} / {}",
                num(&pb["answers_429"]),
                num(&pb["create_refusals"])
            ),
            "",
        );
        if pb["reconnects"].as_u64() > Some(0) {
            row("publish: reconnects", num(&pb["reconnects"]), "");
        }
        row(
            "publish: batch round trip p50 / p99 (us)",
            format!(
                "{} / {}",
                num(&pb["batch_rtt_us"]["p50"]),
                num(&pb["batch_rtt_us"]["p99"])
            ),
            "POST to answer",
        );
        row(
            "server CPU per accepted event (us)",
            num(&pb["server_cpu_us_per_accepted_event"]),
            "",
        );
    }
    if let Some(sl) = f.get("slow") {
        row("slow: closed 4008", num(&sl["closed_4008"]), "");
        row("slow: reset", num(&sl["reset"]), "");
        row("slow: eof without close", num(&sl["eof_without_close"]), "");
        row(
            "slow: backlog read after pause",
            num(&sl["backlog_events_read"]),
            "",
        );
        row("slow: resumed", num(&sl["resumed"]), "");
        row("slow: replayed events", num(&sl["replayed_events"]), "");
        row(
            "slow tabs' latency p99 (us)",
            num(&sl["slow_tab_latency_us"]["p99"]),
            "",
        );
        row(
            "their users' other tabs p50 / p99 (us)",
            format!(
                "{} / {}",
                num(&sl["peer_tab_latency_us"]["p50"]),
                num(&sl["peer_tab_latency_us"]["p99"])
            ),
            "",
        );
    }
    if let Some(m) = f.get("machine_load") {
        row(
            "machine busy / other processes (cores)",
            format!(
                "{} / {}",
                num(&m["busy_cores"]),
                num(&m["other_processes_cores"])
            ),
            "noise: CPU used by neither server, Redis nor harness",
        );
    }
    let total: u64 = faults.iter().map(|(_, n)| n).sum();
    let verdict = if total == 0 && p.scenario == Scenario::Publish {
        "OK: every connection saw every published event of its user once, in order, with the text published under its n, the same as its user's other tabs, nothing foreign, every run completed; every batch accepted exactly its new events".to_string()
    } else if total == 0 {
        "OK: every connection saw every event of its user once, in order, the same as its user's other tabs, nothing foreign, every run completed".to_string()
    } else {
        format!(
            "FAILED: {}",
            faults
                .iter()
                .filter(|(_, n)| *n > 0)
                .map(|(k, n)| format!("{k} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    print!("{out}");
    println!("  {verdict}");
    for m in messages.iter().take(20) {
        println!("    {m}");
    }
    if messages.len() > 20 {
        println!("    ... {} more", messages.len() - 20);
    }
}

fn group(n: i64) -> String {
    let s = n.abs().to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

pub fn append(path: &Path, line: &Value) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    writeln!(f, "{line}")
}
