//! One scenario from first connection to last event: the phases, the server samples taken
//! between them, and the checks at the end.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{watch, Notify, Semaphore};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::cli::{Params, Scenario};
use crate::client::{self, Endpoint, Shared, Tab, User};
use crate::server::{self, Cluster, ProcSample};

/// One process's figures (a node, or Redis) at the points between the phases.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcFigures {
    pub pid: Option<u32>,
    pub before: Option<ProcSample>,
    pub connected: Option<ProcSample>,
    pub run_start: Option<ProcSample>,
    pub run_end: Option<ProcSample>,
    pub last: Option<ProcSample>,
    /// Highest VmRSS seen by the sampler (every 50 ms), KiB.
    pub rss_peak_kib: u64,
}

pub struct Outcome {
    pub shared: Arc<Shared>,
    pub tabs: Vec<Tab>,
    /// Time to open every connection (handshake + welcome), seconds.
    pub connect_secs: f64,
    /// Microseconds since t0 at which the runs started (the gate opened).
    pub run_start_us: u64,
    /// The run phase: from the gate until every tab finished (or the timeout).
    pub run_secs: f64,
    pub timed_out: bool,
    /// Each node of the server, in --url / node order.
    pub nodes: Vec<ProcFigures>,
    /// The Redis the nodes share, when its pid is known.
    pub redis: Option<ProcFigures>,
    pub harness_cpu_us: u64,
    /// Machine-wide (busy, total) CPU ticks over the run phase, from /proc/stat.
    pub machine_ticks: Option<(u64, u64)>,
    pub sources: usize,
    /// publish: every publisher's batch round trips, merged.
    pub batch_rtt: Option<hdrhistogram::Histogram<u64>>,
}

fn random_tag() -> String {
    let n = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64;
    format!(
        "{:x}",
        (n ^ (std::process::id() as u64) << 32) & 0xff_ffff_ffff
    )
}

/// Waits until `counter` reaches `n` or the deadline passes; true if reached.
async fn wait_for(counter: &AtomicUsize, notify: &Notify, n: usize, deadline: Instant) -> bool {
    loop {
        if counter.load(Ordering::Acquire) >= n {
            return true;
        }
        if tokio::time::timeout_at(deadline.into(), notify.notified())
            .await
            .is_err()
        {
            return counter.load(Ordering::Acquire) >= n;
        }
    }
}

pub async fn run(
    p: Params,
    cluster: &Cluster,
    source_addrs: u8,
    connect_concurrency: usize,
    timeout: Duration,
    stall: Duration,
) -> Outcome {
    let t0_unix_us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
    // Every node's pid, then Redis's: sampled together between the phases.
    let pids: Vec<Option<u32>> = cluster
        .nodes
        .iter()
        .map(|t| t.pid)
        .chain(cluster.redis_pid().map(Some))
        .collect();
    let sample = {
        let pids = pids.clone();
        move || -> Vec<Option<ProcSample>> {
            pids.iter().map(|p| p.and_then(server::sample)).collect()
        }
    };

    let n = p.connections();
    let endpoints: Vec<Endpoint> = cluster
        .nodes
        .iter()
        .map(|t| Endpoint {
            addr: t.addr,
            host: t.host.clone(),
            path: t.path.clone(),
        })
        .collect();
    let sources = if !endpoints.iter().all(|e| e.addr.ip().is_loopback()) {
        Vec::new()
    } else {
        let k = if source_addrs > 0 {
            source_addrs as usize
        } else {
            n.div_ceil(25_000)
        };
        if k <= 1 {
            Vec::new()
        } else {
            (1..=k.min(254))
                .map(|i| Ipv4Addr::new(127, 0, 0, i as u8))
                .collect()
        }
    };

    let tag = random_tag();
    let exp = agentcast::auth::now_unix() + 24 * 3600;
    let users: Vec<Arc<User>> = (0..p.users)
        .map(|idx| {
            let name = format!("bench-{tag}-{idx}");
            let token = agentcast::auth::sign(&cluster.secret, &name, exp);
            Arc::new(User {
                idx,
                token: HeaderValue::from_str(&format!("Bearer {token}")).expect("token is ASCII"),
                name,
                acked: Mutex::new(Vec::with_capacity(p.runs)),
                runs_done: Default::default(),
            })
        })
        .collect();

    let (gate_tx, gate_rx) = watch::channel(false);
    let (stop_tx, stop_rx) = watch::channel(false);
    let shared = Arc::new(Shared {
        endpoints,
        sources: sources.clone(),
        // Small buffers: frames are small, and 10,000 connections x the default 128 KiB read
        // buffer would be more than a gigabyte of harness memory.
        ws_config: WebSocketConfig::default()
            .read_buffer_size(4 * 1024)
            .write_buffer_size(0)
            .max_write_buffer_size(1 << 20),
        t0_unix_us,
        start_run: client::start_run_frame(&p).into(),
        events_per_run: p.events_per_run() as u32,
        script: if p.scenario == Scenario::Publish {
            crate::publish::script(&p)
        } else {
            Vec::new()
        },
        connect_sem: Semaphore::new(connect_concurrency.max(1)),
        gate: gate_rx,
        stop: stop_rx,
        run_start: OnceLock::new(),
        connected: AtomicUsize::new(0),
        connected_notify: Notify::new(),
        finished: AtomicUsize::new(0),
        finished_notify: Notify::new(),
        progress: AtomicU64::new(0),
        faults: Default::default(),
        events: Default::default(),
        messages: Mutex::new(Vec::new()),
        params: p.clone(),
    });

    // Each process's RSS, every 50 ms, for its peak.
    let peaks: Arc<Vec<AtomicU64>> = Arc::new(pids.iter().map(|_| AtomicU64::new(0)).collect());
    let sampler = {
        let peaks = peaks.clone();
        let sample = sample.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(50));
            loop {
                every.tick().await;
                let samples = sample();
                if samples.iter().all(Option::is_none) {
                    break;
                }
                for (peak, s) in peaks.iter().zip(samples) {
                    if let Some(s) = s {
                        peak.fetch_max(s.rss_kib, Ordering::Relaxed);
                    }
                }
            }
        })
    };

    let server_before = sample();
    let connect_start = Instant::now();
    let mut handles = Vec::with_capacity(n);
    let mut global = 0;
    for user in &users {
        for tab in 0..p.tabs {
            handles.push(tokio::spawn(client::run_tab(
                shared.clone(),
                user.clone(),
                tab,
                global,
            )));
            global += 1;
        }
    }
    // publish: the publishers wait for the gate, as the driver tabs do. User i is published
    // to by publisher i mod N, each publisher with a token of its own.
    let mut publishers: Vec<tokio::task::JoinHandle<crate::publish::PublisherOutcome>> = Vec::new();
    if p.scenario == Scenario::Publish {
        let signer = agentcast::auth::Signer::new(&cluster.secret, None, None);
        for idx in 0..p.publishers {
            let mine: Vec<Arc<User>> = users
                .iter()
                .filter(|u| u.idx % p.publishers == idx)
                .cloned()
                .collect();
            let token = signer.sign_publisher(&format!("bench-{tag}-publisher-{idx}"), exp, None);
            publishers.push(tokio::spawn(crate::publish::run_publisher(
                shared.clone(),
                idx,
                mine,
                format!("Bearer {token}"),
            )));
        }
    }
    let deadline = Instant::now() + timeout.max(Duration::from_secs(30));
    let all_connected = wait_for(&shared.connected, &shared.connected_notify, n, deadline).await;
    let connect_secs = connect_start.elapsed().as_secs_f64();
    if !all_connected {
        shared.fail(&shared.faults.connect_failures, || {
            format!(
                "only {} of {n} connections opened in time",
                shared.connected.load(Ordering::Acquire)
            )
        });
    }
    // Let the server settle (allocations of the last handshakes, deferred frees) before
    // measuring what the connections cost.
    tokio::time::sleep(Duration::from_millis(if p.has_runs() {
        300
    } else {
        1_000
    }))
    .await;
    let server_connected = sample();

    let harness_cpu_start = server::self_cpu_us();
    let machine_start = server::machine_cpu_ticks();
    let server_run_start = sample();
    let run_start = Instant::now();
    let run_start_us = (SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
        - t0_unix_us)
        .max(0) as u64;
    let _ = shared.run_start.set(run_start);
    let _ = gate_tx.send(true);

    let mut timed_out = false;
    let mut stalled = false;
    if p.has_runs() {
        // Until every tab finished; a failure when the timeout passes, or when no tab has
        // seen a run complete for `stall` (lost events can leave tabs waiting forever).
        let deadline = run_start + timeout;
        let mut last = (0, Instant::now());
        loop {
            let step = (Instant::now() + Duration::from_millis(250)).min(deadline);
            if wait_for(&shared.finished, &shared.finished_notify, n, step).await {
                break;
            }
            let now = Instant::now();
            let progress = shared.progress.load(Ordering::Relaxed);
            if progress != last.0 {
                last = (progress, now);
            }
            if now >= deadline {
                timed_out = true;
                break;
            }
            if now.duration_since(last.1) >= stall {
                stalled = true;
                break;
            }
        }
    } else {
        tokio::time::sleep(Duration::from_secs_f64(p.hold_secs)).await;
    }
    // The publishers end after their last answer, which may come after the tabs saw the last
    // event (a batch resent on purpose); a stuck one is stopped with the rest.
    let publishers_deadline = Instant::now() + Duration::from_secs(5);
    let mut batch_rtt = None;
    let mut created: std::collections::HashMap<usize, usize> = Default::default();
    if !timed_out && !stalled {
        while publishers.iter().any(|h| !h.is_finished()) && Instant::now() < publishers_deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let run_secs = run_start.elapsed().as_secs_f64();
    let server_run_end = sample();
    let harness_cpu_us = server::self_cpu_us() - harness_cpu_start;
    let machine_ticks = match (machine_start, server::machine_cpu_ticks()) {
        (Some(a), Some(b)) => Some((b.0 - a.0, b.1 - a.1)),
        _ => None,
    };
    if stalled {
        shared.fail(&shared.faults.incomplete, || {
            format!(
                "run phase stalled: no run completed for {} s; {} of {n} tabs finished",
                stall.as_secs_f64(),
                shared.finished.load(Ordering::Acquire)
            )
        });
    }
    if timed_out {
        shared.fail(&shared.faults.incomplete, || {
            format!(
                "run phase timed out after {:.0} s: {} of {n} tabs finished",
                run_secs,
                shared.finished.load(Ordering::Acquire)
            )
        });
    }

    let _ = stop_tx.send(true);
    for h in publishers {
        match h.await {
            Ok(o) => {
                let rtt = batch_rtt.get_or_insert_with(crate::stats::histogram);
                let _ = rtt.add(&o.batch_rtt);
                for (user, n) in o.runs_created {
                    *created.entry(user).or_default() += n;
                }
            }
            Err(e) => shared.fail(&shared.faults.publish_errors, || {
                format!("a publisher task failed: {e}")
            }),
        }
    }
    if p.scenario == Scenario::Publish {
        // Every user's runs created, and every event of them taken once.
        for u in &users {
            let n = created.get(&u.idx).copied().unwrap_or(0);
            if n != p.runs {
                shared.fail(&shared.faults.incomplete, || {
                    format!(
                        "{}: {n} of {} runs created by its publisher",
                        u.name, p.runs
                    )
                });
            }
        }
        let want = (p.users * p.runs * (p.events_per_run() - 1)) as u64;
        let got = shared.events.publish_accepted.load(Ordering::Relaxed);
        if got != want {
            shared.fail(&shared.faults.publish_accepted, || {
                format!("the server accepted {got} published events in all, {want} were published")
            });
        }
    }
    let mut tabs = Vec::with_capacity(n);
    for h in handles {
        match h.await {
            Ok(t) => tabs.push(t),
            Err(e) => shared.fail(&shared.faults.unexpected_closes, || {
                format!("a tab task failed: {e}")
            }),
        }
    }
    // The idle scenario's connections must all still be there when it ends.
    if p.scenario == Scenario::Idle {
        let gone = shared.faults.unexpected_closes.load(Ordering::Relaxed);
        if gone > 0 {
            eprintln!("{gone} idle connections were closed by the server while held");
        }
    }
    for t in &tabs {
        client::verify_tab(&shared, t);
    }
    // The tabs of a user are consecutive: they must have got the same event under each seq,
    // whichever node each is on.
    for user in tabs.chunk_by(|a, b| a.user.idx == b.user.idx) {
        client::verify_user(&shared, user);
    }
    sampler.abort();
    let server_last = sample();
    let mut procs: Vec<ProcFigures> = pids
        .iter()
        .enumerate()
        .map(|(i, &pid)| ProcFigures {
            pid,
            before: server_before[i],
            connected: server_connected[i],
            run_start: server_run_start[i],
            run_end: server_run_end[i],
            last: server_last[i],
            rss_peak_kib: peaks[i].load(Ordering::Relaxed),
        })
        .collect();
    let redis = (procs.len() > cluster.nodes.len()).then(|| procs.pop().expect("redis"));
    Outcome {
        shared,
        tabs,
        connect_secs,
        run_start_us,
        run_secs,
        timed_out: timed_out || stalled,
        nodes: procs,
        redis,
        harness_cpu_us,
        machine_ticks,
        sources: sources.len(),
        batch_rtt,
    }
}
