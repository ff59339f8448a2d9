//! agentcast's load-test harness: `cargo bench --bench load -- --scenario NAME [options]`
//! (`-- --help` lists them). docs/performance.md explains every scenario and figure.
//!
//! - `cli`: flags and each scenario's defaults
//! - `server`: starting the server (its nodes and their Redis, or targeting running ones) and
//!   reading their /proc figures
//! - `client`: one task per tab: connect, drive runs, read and check every frame
//! - `publish`: the `publish` scenario's publishers (HTTP), and the check of a published event
//! - `scan`: reading `type`, `seq`, `run_id` and `ts` out of a frame without a JSON tree
//! - `run`: the phases of a scenario; `stats`, `report`, `plot`: the figures and their output

#[path = "load/cli.rs"]
mod cli;
#[path = "load/client.rs"]
mod client;
#[path = "load/plot.rs"]
mod plot;
#[path = "load/publish.rs"]
mod publish;
#[path = "load/report.rs"]
mod report;
#[path = "load/run.rs"]
mod run;
#[path = "load/scan.rs"]
mod scan;
#[path = "load/server.rs"]
mod server;
#[path = "load/stats.rs"]
mod stats;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use serde_json::json;

fn main() -> ExitCode {
    scan::self_check();
    publish::self_check();
    let args = cli::Args::parse();
    let params = match args.params() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("load: {e}");
            return ExitCode::from(2);
        }
    };
    let conns = params.connections() as u64;
    let mut notes = Vec::new();

    // One descriptor per client socket here, two per connection in the server (it keeps a
    // duplicate of each socket to be able to reset it), plus slack.
    let (before, after) = server::raise_nofile(conns * 3 + 4096);
    if after != before {
        notes.push(format!(
            "open-file limit raised from {before} to {after} with setrlimit (a started server inherits it)"
        ));
    }
    if after < conns * 3 + 1024 {
        notes.push(format!(
            "WARNING: open-file limit {after} may be too low for {conns} connections"
        ));
    }

    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let threads = if args.client_threads > 0 {
        args.client_threads
    } else {
        (cores / 2).max(1)
    };

    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let results = args
        .results
        .clone()
        .unwrap_or_else(|| target_dir.join("bench-results.jsonl"));

    let mut cluster = match start_cluster(&args, &params, &target_dir) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("load: {e}");
            return ExitCode::from(2);
        }
    };
    let server_bin = args
        .server_bin
        .as_ref()
        .map_or("target/release/agentcast".into(), |b| {
            b.display().to_string()
        });
    let node_descs: Vec<String> = cluster
        .nodes
        .iter()
        .enumerate()
        .map(|(i, t)| match &t.child {
            Some(s) => format!(
                "started {server_bin} {} (pid {}, ws://{}{}, log {})",
                s.args.join(" "),
                t.pid.unwrap_or(0),
                t.host,
                t.path,
                s.log_path.display()
            ),
            None => format!(
                "targeting {} (pid {})",
                args.url.get(i).map_or("", String::as_str),
                t.pid
                    .map_or("unknown: no server RSS/CPU".into(), |p| p.to_string())
            ),
        })
        .collect();
    let server_desc = node_descs.join("; ");
    if node_descs.len() == 1 {
        notes.push(format!("server: {server_desc}"));
    } else {
        for (i, d) in node_descs.iter().enumerate() {
            notes.push(format!("node {i}: {d}"));
        }
        notes.push(format!(
            "tab k of every user on node k mod {}; tab 0 starts the runs",
            node_descs.len()
        ));
    }
    if let Some(r) = &cluster.redis {
        notes.push(format!(
            "redis: started {} {} (pid {}, log {})",
            args.redis_server.display(),
            r.args
                .iter()
                .map(|a| if a.is_empty() { "''".into() } else { a.clone() })
                .collect::<Vec<_>>()
                .join(" "),
            r.pid,
            r.log_path.display()
        ));
    } else if let Some(pid) = cluster.redis_pid {
        notes.push(format!("redis: pid {pid}"));
    }
    notes.push(format!(
        "harness: {threads} runtime thread(s) on {cores} cores, connect concurrency {}",
        args.connect_concurrency
    ));

    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("load: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let outcome = rt.block_on(run::run(
        params.clone(),
        &cluster,
        args.source_addrs,
        args.connect_concurrency,
        Duration::from_secs_f64(args.timeout_secs),
        // A paced run takes a while to complete its first run: never call that a stall.
        Duration::from_secs_f64(
            args.stall_secs
                .max(3.0 * params.steps as f64 * params.step_sleep_ms as f64 / 1000.0),
        ),
    ));
    if outcome.sources > 1 {
        notes.push(format!(
            "client sockets bound to {} source addresses 127.0.0.1..{}",
            outcome.sources, outcome.sources
        ));
    }
    let figures = stats::compute(
        &outcome.tabs,
        outcome.run_start_us,
        params.tabs,
        params.slow_clients,
    );
    let (node_exits, redis_exit) = cluster.stop(Duration::from_secs(40));
    // The tabs' connections were closed when they returned; drop them (and the runtime) now.
    drop(rt);

    let faults = outcome.shared.faults.all();
    let failed: u64 = faults.iter().map(|(_, n)| n).sum();
    let mut messages = outcome.shared.messages.lock().unwrap().clone();
    let mut server_json = json!({"desc": server_desc, "nodes": cluster.nodes.len()});
    let started: Vec<_> = cluster
        .nodes
        .iter()
        .zip(&node_exits)
        .filter_map(|(t, exit)| Some((t.child.as_ref()?, exit)))
        .collect();
    if !started.is_empty() {
        let count =
            |f: fn(&server::Spawned) -> usize| -> usize { started.iter().map(|(s, _)| f(s)).sum() };
        let errors = count(|s| s.errors.load(std::sync::atomic::Ordering::Relaxed));
        let warnings = count(|s| s.warnings.load(std::sync::atomic::Ordering::Relaxed));
        let (first, first_exit) = started[0];
        server_json = json!({
            "started": true,
            "nodes": started.len(),
            "args": first.args,
            "exit": first_exit,
            "log": first.log_path.display().to_string(),
            "log_errors": errors,
            "log_warnings": warnings,
        });
        if started.len() > 1 {
            server_json["node_list"] = started
                .iter()
                .map(|(s, exit)| {
                    json!({
                        "args": s.args,
                        "exit": exit,
                        "log": s.log_path.display().to_string(),
                        "log_errors": s.errors.load(std::sync::atomic::Ordering::Relaxed),
                    })
                })
                .collect();
        }
        for (s, exit) in &started {
            let errors = s.errors.load(std::sync::atomic::Ordering::Relaxed);
            if errors > 0 {
                messages.push(format!(
                    "note: the server logged {errors} error line(s); see {}",
                    s.log_path.display()
                ));
            }
            if let Some(exit) = exit {
                notes.push(if started.len() > 1 {
                    format!("node stopped: {exit}")
                } else {
                    format!("server stopped: {exit}")
                });
            }
        }
    }
    if let Some(r) = &cluster.redis {
        server_json["redis"] = json!({
            "args": r.args,
            "exit": redis_exit,
            "log": r.log_path.display().to_string(),
        });
        if let Some(exit) = &redis_exit {
            notes.push(format!("redis stopped: {exit}"));
        }
    }
    let mut figs = report::figures(&params, &outcome, &figures);
    figs["harness"]["threads"] = json!(threads);
    let line = json!({
        "scenario": params.scenario.name(),
        "label": args.label,
        "at_unix": agentcast::auth::now_unix(),
        "ok": failed == 0,
        "faults": faults.iter().filter(|(_, n)| *n > 0).map(|(k, n)| (k.to_string(), json!(n))).collect::<serde_json::Map<_, _>>(),
        "machine": report::machine(),
        "git": report::commit(),
        "server": server_json,
        "params": report::params_json(&params),
        "figures": figs,
    });
    report::table(&params, &line, &faults, &messages, &notes);
    match report::append(&results, &line) {
        Ok(()) => println!("  result appended to {}", results.display()),
        Err(e) => eprintln!("load: cannot append to {}: {e}", results.display()),
    }
    if let Some(dir) = &args.plot {
        let title = format!(
            "{} ({} users x {} tabs)",
            params.scenario.name(),
            params.users,
            params.tabs
        );
        let stem = match &args.label {
            Some(l) => format!("{}-{}", params.scenario.name(), l.replace(['/', ' '], "_")),
            None => params.scenario.name().to_string(),
        };
        match plot::write(dir, &stem, &title, &figures) {
            Ok(paths) => {
                for p in paths {
                    println!("  chart written to {}", p.display());
                }
            }
            Err(e) => eprintln!("load: plot: {e}"),
        }
    }
    if failed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// The nodes to measure: the running ones given by --url, or the ones the harness starts
/// (with a redis-server of its own for --nodes > 1 or --redis). Whatever was started before a
/// failure is stopped when the partial cluster is dropped.
fn start_cluster(
    args: &cli::Args,
    params: &cli::Params,
    target_dir: &std::path::Path,
) -> Result<server::Cluster, String> {
    if !args.url.is_empty() {
        let nodes = args
            .url
            .iter()
            .enumerate()
            .map(|(i, url)| server::target(url, args.pid.get(i).copied()))
            .collect::<Result<Vec<_>, _>>()?;
        return Ok(server::Cluster {
            nodes,
            redis: None,
            redis_pid: args.redis_pid,
            secret: args.secret.clone().unwrap_or_default(),
        });
    }
    let mut cluster = server::Cluster {
        nodes: Vec::new(),
        redis: None,
        redis_pid: None,
        secret: server::random_secret(),
    };
    let name = params.scenario.name();
    if params.own_redis {
        let log = target_dir.join(format!("bench-redis-{name}.log"));
        cluster.redis = Some(server::start_redis(&args.redis_server, log)?);
    }
    let bin = args
        .server_bin
        .clone()
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_agentcast")));
    let n = params.nodes;
    // Tab k of every user is on node k mod n.
    let tabs_on = |node: usize| (0..params.tabs).filter(|k| k % n == node).count();
    for node in 0..n {
        let needs = server::ServerNeeds {
            connections: params.users * tabs_on(node),
            tabs_per_user: tabs_on(node),
            runs_per_user: params.runs,
            concurrency: params.concurrency,
            // A slow tab must fill its queue with a modest number of events.
            outbound_queue: (params.scenario == cli::Scenario::Slow).then_some(256),
            publish: params.scenario == cli::Scenario::Publish,
        };
        let log = if n == 1 {
            target_dir.join(format!("bench-server-{name}.log"))
        } else {
            target_dir.join(format!("bench-server-{name}-node{node}.log"))
        };
        let node_id = format!("bench-node-{node}");
        let redis = cluster
            .redis
            .as_ref()
            .map(|r| (r.url.as_str(), node_id.as_str()));
        let t = server::spawn(&bin, &args.server_args, &needs, log, &cluster.secret, redis)?;
        cluster.nodes.push(t);
    }
    Ok(cluster)
}
