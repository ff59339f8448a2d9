//! Figures from what the tabs kept: latency and tab-spread histograms, deliveries and
//! throughput over time. All computed after the run, so the hot path only appends.

use hdrhistogram::Histogram;
use serde_json::{json, Value};

use crate::client::{SlowPhase, Tab, MISSING, REPLAYED};

pub fn histogram() -> Histogram<u64> {
    // 1 us to 1 hour, 3 significant figures.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

pub struct Figures {
    /// Run events received, over all tabs (each tab's copy counts once).
    pub deliveries: u64,
    /// ts-to-receipt of live events on tabs that kept reading.
    pub latency: Histogram<u64>,
    /// ts-to-receipt of events that came in a replay (resume).
    pub replayed: Histogram<u64>,
    /// ts-to-receipt of events on slow tabs (live or backlog).
    pub slow: Histogram<u64>,
    /// ts-to-receipt of live events on the reading tabs of users that have a slow tab
    /// (also counted in `latency`).
    pub peers: Histogram<u64>,
    /// For each event of a user received live by two or more of its reading tabs: last
    /// receipt minus first receipt.
    pub spread: Histogram<u64>,
    /// Last receipt, microseconds since t0.
    pub last_recv_us: u64,
    /// Deliveries per bin since the run started: (bin width in us, counts).
    pub timeline: (u64, Vec<u64>),
}

pub fn compute(
    tabs: &[Tab],
    run_start_us: u64,
    tabs_per_user: usize,
    slow_users: usize,
) -> Figures {
    let mut f = Figures {
        deliveries: 0,
        latency: histogram(),
        replayed: histogram(),
        slow: histogram(),
        peers: histogram(),
        spread: histogram(),
        last_recv_us: run_start_us,
        timeline: (0, Vec::new()),
    };
    for t in tabs {
        for r in &t.recs {
            if r.recv_us == MISSING {
                continue;
            }
            f.deliveries += 1;
            f.last_recv_us = f.last_recv_us.max(r.recv_us as u64);
            let lat = ((r.lat_us & !REPLAYED) as u64).max(1);
            if t.slow == SlowPhase::No && t.user.idx < slow_users && r.lat_us & REPLAYED == 0 {
                f.peers.saturating_record(lat);
            }
            let h = if t.slow != SlowPhase::No {
                &mut f.slow
            } else if r.lat_us & REPLAYED != 0 {
                &mut f.replayed
            } else {
                &mut f.latency
            };
            h.saturating_record(lat);
        }
    }
    // Throughput over time: about 100 bins over the run, each at least 10 ms.
    let span = f.last_recv_us.saturating_sub(run_start_us).max(1);
    let width = (span / 100).clamp(10_000, 1_000_000);
    let mut bins = vec![0u64; (span / width + 1) as usize];
    for t in tabs {
        for r in &t.recs {
            if r.recv_us != MISSING && r.recv_us as u64 >= run_start_us {
                bins[((r.recv_us as u64 - run_start_us) / width) as usize] += 1;
            }
        }
    }
    f.timeline = (width, bins);

    // Spread: tabs of one user are consecutive in `tabs` (same user index).
    if tabs_per_user >= 2 {
        let mut i = 0;
        while i < tabs.len() {
            let user = tabs[i].user.idx;
            let mut j = i;
            while j < tabs.len() && tabs[j].user.idx == user {
                j += 1;
            }
            let group: Vec<&Tab> = tabs[i..j]
                .iter()
                .filter(|t| t.slow == SlowPhase::No)
                .collect();
            if group.len() >= 2 {
                let first = group.iter().map(|t| t.base_seq).min().unwrap_or(1);
                let last = group
                    .iter()
                    .map(|t| t.base_seq + t.recs.len() as u64)
                    .max()
                    .unwrap_or(1);
                for seq in first..last {
                    let mut lo = u32::MAX;
                    let mut hi = 0u32;
                    let mut n = 0;
                    for t in &group {
                        if seq < t.base_seq {
                            continue;
                        }
                        let Some(r) = t.recs.get((seq - t.base_seq) as usize) else {
                            continue;
                        };
                        if r.recv_us == MISSING || r.lat_us & REPLAYED != 0 {
                            continue;
                        }
                        lo = lo.min(r.recv_us);
                        hi = hi.max(r.recv_us);
                        n += 1;
                    }
                    if n >= 2 {
                        f.spread.saturating_record(((hi - lo) as u64).max(1));
                    }
                }
            }
            i = j;
        }
    }
    f
}

/// p50, p90, p99, p99.9, max and mean of a histogram, in microseconds.
pub fn summary(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return json!({"count": 0});
    }
    json!({
        "count": h.len(),
        "p50": h.value_at_quantile(0.50),
        "p90": h.value_at_quantile(0.90),
        "p99": h.value_at_quantile(0.99),
        "p999": h.value_at_quantile(0.999),
        "max": h.max(),
        "mean": (h.mean() * 10.0).round() / 10.0,
    })
}
