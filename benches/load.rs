//! agentcast's load-test harness: `cargo bench --bench load -- --scenario NAME [options]`
//! (`-- --help` lists them). docs/performance.md explains every scenario and figure.
//!
//! - `cli`: flags and each scenario's defaults
//! - `server`: starting the server (or targeting one) and reading its /proc figures
//! - `client`: one task per tab: connect, drive runs, read and check every frame
//! - `scan`: reading `type`, `seq`, `run_id` and `ts` out of a frame without a JSON tree
//! - `run`: the phases of a scenario; `stats`, `report`, `plot`: the figures and their output

#[path = "load/cli.rs"]
mod cli;
#[path = "load/client.rs"]
mod client;
#[path = "load/plot.rs"]
mod plot;
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

    let mut target = match &args.url {
        Some(url) => {
            let secret = args.secret.clone().unwrap_or_default();
            match server::target(url, secret, args.pid) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("load: {e}");
                    return ExitCode::from(2);
                }
            }
        }
        None => {
            let bin = args
                .server_bin
                .clone()
                .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_agentcast")));
            let needs = server::ServerNeeds {
                connections: params.connections(),
                tabs_per_user: params.tabs,
                runs_per_user: params.runs,
                concurrency: params.concurrency,
                // A slow tab must fill its queue with a modest number of events.
                outbound_queue: (params.scenario == cli::Scenario::Slow).then_some(256),
            };
            let log = target_dir.join(format!("bench-server-{}.log", params.scenario.name()));
            match server::spawn(&bin, &args.server_args, &needs, log) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("load: {e}");
                    return ExitCode::from(2);
                }
            }
        }
    };
    let server_desc = match &target.child {
        Some(s) => format!(
            "started {} {} (pid {}, log {})",
            args.server_bin
                .as_ref()
                .map_or("target/release/agentcast".into(), |b| b
                    .display()
                    .to_string()),
            s.args.join(" "),
            target.pid.unwrap_or(0),
            s.log_path.display()
        ),
        None => format!(
            "targeting {} (pid {})",
            args.url.as_deref().unwrap_or(""),
            target
                .pid
                .map_or("unknown: no server RSS/CPU".into(), |p| p.to_string())
        ),
    };
    notes.push(format!("server: {server_desc}"));
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
        &target,
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
    let server_exit = target.stop(Duration::from_secs(40));
    // The tabs' connections were closed when they returned; drop them (and the runtime) now.
    drop(rt);

    let faults = outcome.shared.faults.all();
    let failed: u64 = faults.iter().map(|(_, n)| n).sum();
    let mut messages = outcome.shared.messages.lock().unwrap().clone();
    let mut server_json = json!({"desc": server_desc});
    if let Some(s) = &target.child {
        let errors = s.errors.load(std::sync::atomic::Ordering::Relaxed);
        let warnings = s.warnings.load(std::sync::atomic::Ordering::Relaxed);
        server_json = json!({
            "started": true,
            "args": s.args,
            "exit": server_exit,
            "log": s.log_path.display().to_string(),
            "log_errors": errors,
            "log_warnings": warnings,
        });
        if errors > 0 {
            messages.push(format!(
                "note: the server logged {errors} error line(s); see {}",
                s.log_path.display()
            ));
        }
        if let Some(exit) = &server_exit {
            notes.push(format!("server stopped: {exit}"));
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
