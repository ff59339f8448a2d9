//! Criterion micro-benchmarks of the hot path every run event takes (docs/architecture.md):
//! encoding it once (`event::encode`), keeping it for replay (`ReplayBuffer::push`) and
//! reading a range back (`ReplayBuffer::range`), and the registry routing it to each of the
//! user's N tabs (a real `ConnectionRegistry`, N dummy session actors joined with `Connect`).
//!
//! `cargo bench --bench hot_path` (add a filter, e.g. `-- route`, to run some).

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use actix::prelude::*;
use agentcast_actors::builtin;
use agentcast_actors::event::{encode, ErrorBody, EventData, Frame, RunStatus};
use agentcast_actors::ids::UserId;
use agentcast_actors::metrics::Metrics;
use agentcast_actors::registry::{ConnectionRegistry, RegistrySettings};
use agentcast_actors::replay::ReplayBuffer;
use agentcast_actors::router::{Connect, Emit, Push, SessionShared, StartRun};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use serde_json::json;

const RUN_ID: &str = "run_7Jc2abcdefghijklmnopqr";

fn text_64() -> String {
    "abcdefghijklmnopqrstuvwxyz0123456789"
        .chars()
        .cycle()
        .take(64)
        .collect()
}

fn encoding(c: &mut Criterion) {
    let at = SystemTime::now();
    let partial = EventData::PartialResult { text: text_64() };
    let tool_completed = EventData::ToolCompleted {
        tool_call_id: "tc_8".into(),
        tool: "calculator".into(),
        ok: true,
        result: json!(14),
        error: None,
        duration_ms: 0,
    };
    let completed = EventData::AgentCompleted {
        status: RunStatus::Failed,
        result: json!(null),
        error: Some(ErrorBody::new("agent_failed", "the script said so")),
        duration_ms: 1234,
        usage: json!({"tool_calls": 8}),
    };
    let mut g = c.benchmark_group("encode");
    g.throughput(Throughput::Elements(1));
    for (name, data) in [
        ("partial_result_64B", &partial),
        ("tool_completed", &tool_completed),
        ("agent_completed_failed", &completed),
    ] {
        g.bench_function(name, |b| {
            let run_id: agentcast_actors::ids::RunId = RUN_ID.into();
            let mut seq = 0u64;
            b.iter(|| {
                seq += 1;
                black_box(encode(seq, &run_id, Some("th_1"), at, black_box(data)))
            })
        });
    }
    g.finish();
}

fn frame(seq: u64) -> Frame {
    encode(
        seq,
        &RUN_ID.into(),
        None,
        SystemTime::now(),
        &EventData::PartialResult { text: text_64() },
    )
}

fn replay(c: &mut Criterion) {
    let mut g = c.benchmark_group("replay");
    // Appending to a full buffer (the steady state: one in, the oldest out).
    g.throughput(Throughput::Elements(1));
    g.bench_function("push_full_10000", |b| {
        let mut buf = ReplayBuffer::new(10_000, usize::MAX, Duration::from_secs(600));
        let now = Instant::now();
        let f = frame(1);
        let mut seq = 0u64;
        for _ in 0..10_000 {
            seq += 1;
            buf.push(Frame { seq, ..f.clone() }, now);
        }
        b.iter(|| {
            seq += 1;
            buf.push(Frame { seq, ..f.clone() }, now);
        })
    });
    // Reading a range back, as a resume does.
    let mut buf = ReplayBuffer::new(10_000, usize::MAX, Duration::from_secs(600));
    let now = Instant::now();
    let f = frame(1);
    for seq in 1..=10_000 {
        buf.push(Frame { seq, ..f.clone() }, now);
    }
    for n in [1u64, 100, 1000] {
        g.throughput(Throughput::Elements(n));
        g.bench_with_input(BenchmarkId::new("range", n), &n, |b, &n| {
            b.iter(|| {
                black_box(buf.check(black_box(5_000), 5_000 + n, 10_000)).ok();
                black_box(buf.between(5_001, 5_000 + n).cloned().collect::<Vec<_>>())
            })
        });
    }
    g.finish();
}

/// A session that only counts the frames the registry pushes to it.
struct DummyTab {
    got: Arc<AtomicU64>,
}

impl Actor for DummyTab {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // Never full: a full mailbox would make the registry treat it as a slow consumer.
        ctx.set_mailbox_capacity(1 << 24);
    }
}

impl Handler<Push> for DummyTab {
    type Result = ();

    fn handle(&mut self, msg: Push, _: &mut Context<Self>) {
        if let Push::Event(frame) = msg {
            black_box(&frame.text);
            self.got.fetch_add(1, Ordering::Relaxed);
        }
    }
}

struct Routing {
    registry: Addr<ConnectionRegistry>,
    user: UserId,
    run_id: Arc<str>,
    got: Arc<AtomicU64>,
}

/// A registry on this thread's actix system, `tabs` dummy sessions of one user joined to it,
/// and one run of that user that sleeps for an hour (so its events are admitted).
async fn routing(tabs: usize) -> Routing {
    let arbiter = Arbiter::current();
    let catalog = Arc::new(builtin::fault_tools(builtin::catalog()).start(&arbiter));
    let settings = RegistrySettings {
        max_connections_per_user: tabs.max(32),
        ..RegistrySettings::default()
    };
    let registry =
        ConnectionRegistry::new(settings, Arc::new(Metrics::new()), catalog, arbiter).start();
    let user: UserId = Arc::from("bench-user");
    let got = Arc::new(AtomicU64::new(0));
    for key in 0..tabs as u64 {
        let tab = DummyTab { got: got.clone() }.start();
        registry
            .send(Connect {
                user: user.clone(),
                key: 1_000_000 + key,
                push: tab.recipient(),
                shared: Arc::new(SessionShared::default()),
                reset: None,
                resume: None,
            })
            .await
            .expect("registry answers")
            .expect("connect accepted");
    }
    let run_id = registry
        .send(StartRun {
            user: user.clone(),
            agent: "scripted".into(),
            input: json!({"steps": [{"sleep_ms": 3_600_000}]}),
            thread_id: None,
        })
        .await
        .expect("registry answers")
        .expect("run started");
    // Wait for its agent_started on every tab.
    while got.load(Ordering::Relaxed) < tabs as u64 {
        tokio::task::yield_now().await;
    }
    Routing {
        registry,
        user,
        run_id,
        got,
    }
}

fn route(c: &mut Criterion) {
    let mut g = c.benchmark_group("route_to_tabs");
    for tabs in [1usize, 2, 8, 32, 128] {
        let system = actix::System::new();
        let r = system.block_on(routing(tabs));
        let text = text_64();
        g.throughput(Throughput::Elements(tabs as u64));
        g.bench_with_input(BenchmarkId::from_parameter(tabs), &tabs, |b, &tabs| {
            b.iter_custom(|iters| {
                system.block_on(async {
                    let target = r.got.load(Ordering::Relaxed) + iters * tabs as u64;
                    let start = Instant::now();
                    for _ in 0..iters {
                        r.registry.do_send(Emit::for_bench(
                            r.user.clone(),
                            r.run_id.clone(),
                            EventData::PartialResult { text: text.clone() },
                        ));
                    }
                    // The registry and the tabs run on this thread while it yields.
                    while r.got.load(Ordering::Relaxed) < target {
                        tokio::task::yield_now().await;
                    }
                    start.elapsed()
                })
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = encoding, replay, route
}
criterion_main!(benches);
