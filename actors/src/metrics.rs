//! What the server counts, for `GET /metrics` (Prometheus text format). One instance per
//! server, shared by the registry, sessions and routes; updating a metric is an atomic add,
//! and per-event-type counters are resolved once so the hot path does no label lookups.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::event::EventData;

/// The event types, in the order of [`EventData::kind_index`].
pub const EVENT_TYPES: [&str; 9] = [
    "agent_started",
    "agent_thinking",
    "partial_result",
    "tool_executing",
    "tool_progress",
    "tool_completed",
    "agent_completed",
    "input_requested",
    "input_received",
];

pub struct Metrics {
    registry: Registry,
    pub connections: IntGauge,
    pub users: IntGauge,
    pub runs_running: IntGauge,
    pub runs_started: IntCounter,
    runs_ended: IntCounterVec,
    emitted: Vec<IntCounter>,
    delivered: Vec<IntCounter>,
    pub events_refused: IntCounter,
    pub slow_consumers: IntCounter,
    pub resume_replayed: IntCounter,
    pub resume_gaps: IntCounter,
    auth_failures: IntCounterVec,
    pub refused_connections: IntCounterVec,
    pub queue_depth_max: IntGauge,
    pub queue_depth_sum: IntGauge,
    pub delivery_latency: Histogram,
    pub replay_bytes: IntGauge,
    /// Events evicted from users' logs, by why: `user_limit` (the user's count or bytes),
    /// `global_bytes` (the server-wide budget), `age`.
    pub replay_evicted: IntCounterVec,
    pub emit_holds: IntCounter,
    /// Section 10 (`--redis-url`): whether Redis answers (always 0 without Redis).
    pub redis_up: IntGauge,
    /// This node's events waiting to be appended on Redis.
    pub redis_pending: IntGauge,
    /// Appends retried after a lost answer that had in fact landed (skipped, not doubled).
    pub redis_retried: IntCounter,
    /// Gaps in what the subscriptions delivered, filled from the stream.
    pub redis_repairs: IntCounter,
    /// Runs of lost nodes this node ended (`node_lost`).
    pub runs_node_lost: IntCounter,
    /// 1, labelled with this node's `--node-id` (with `--redis-url`).
    pub node_info: IntGaugeVec,
}

fn must<T>(r: prometheus::Result<T>) -> T {
    // Only fails for malformed names or duplicate registration: fixed at compile time here.
    r.unwrap_or_else(|e| panic!("metric definition: {e}"))
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let reg = |c: Box<dyn prometheus::core::Collector>| must(registry.register(c));
        let gauge = |name: &str, help: &str| {
            let g = must(IntGauge::new(name, help));
            reg(Box::new(g.clone()));
            g
        };
        let counter = |name: &str, help: &str| {
            let c = must(IntCounter::new(name, help));
            reg(Box::new(c.clone()));
            c
        };
        let counter_vec = |name: &str, help: &str, label: &str| {
            let c = must(IntCounterVec::new(Opts::new(name, help), &[label]));
            reg(Box::new(c.clone()));
            c
        };
        let emitted_vec = counter_vec(
            "agentcast_events_emitted_total",
            "Run events sequenced, by type.",
            "type",
        );
        let delivered_vec = counter_vec(
            "agentcast_events_delivered_total",
            "Run events handed to connections (one per connection), by type.",
            "type",
        );
        let latency = must(Histogram::with_opts(
            HistogramOpts::new(
                "agentcast_delivery_latency_seconds",
                "From an event's emission to its write to a live connection.",
            )
            .buckets(vec![
                0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                0.25, 1.0,
            ]),
        ));
        reg(Box::new(latency.clone()));
        Metrics {
            connections: gauge("agentcast_connections", "Open WebSocket and SSE connections."),
            users: gauge("agentcast_users", "Users the server keeps a history for."),
            runs_running: gauge("agentcast_runs_running", "Runs running now."),
            runs_started: counter("agentcast_runs_started_total", "Runs started."),
            runs_ended: counter_vec("agentcast_runs_ended_total", "Runs ended, by status.", "status"),
            emitted: EVENT_TYPES.iter().map(|t| emitted_vec.with_label_values(&[t])).collect(),
            delivered: EVENT_TYPES.iter().map(|t| delivered_vec.with_label_values(&[t])).collect(),
            events_refused: counter(
                "agentcast_events_refused_total",
                "Events dropped because they broke their run's rules (e.g. a tool finishing after its run ended).",
            ),
            slow_consumers: counter(
                "agentcast_slow_consumer_closes_total",
                "Connections dropped because they did not read (close 4008).",
            ),
            resume_replayed: counter("agentcast_resume_replayed_total", "Resumes served from the replay buffer."),
            resume_gaps: counter("agentcast_resume_gaps_total", "Resumes refused with resume_gap."),
            auth_failures: counter_vec("agentcast_auth_failures_total", "Refused tokens, by reason.", "reason"),
            refused_connections: counter_vec(
                "agentcast_connections_refused_total",
                "Connections refused after authentication, by reason.",
                "reason",
            ),
            queue_depth_max: gauge(
                "agentcast_outbound_queue_depth_max",
                "Frames queued for the most backed-up connection.",
            ),
            queue_depth_sum: gauge("agentcast_outbound_queue_depth_sum", "Frames queued over all connections."),
            delivery_latency: latency,
            replay_bytes: gauge(
                "agentcast_replay_bytes",
                "Bytes of run events kept for resume, over all users (as the budgets count them).",
            ),
            replay_evicted: counter_vec(
                "agentcast_replay_evicted_total",
                "Events dropped from users' replay logs, by reason (user_limit, global_bytes, age).",
                "reason",
            ),
            emit_holds: counter(
                "agentcast_emit_holds_total",
                "Times a user's agents were held back so a reading connection could catch up.",
            ),
            redis_up: gauge("agentcast_redis_up", "1 while Redis answers (with --redis-url)."),
            redis_pending: gauge(
                "agentcast_redis_pending_events",
                "This node's run events waiting to be appended on Redis.",
            ),
            redis_retried: counter(
                "agentcast_redis_appends_retried_total",
                "Appends sent again after a lost answer that had in fact landed (skipped by Redis).",
            ),
            redis_repairs: counter(
                "agentcast_redis_gap_repairs_total",
                "Gaps in the pub/sub feed filled from the users' streams.",
            ),
            node_info: {
                let g = must(IntGaugeVec::new(
                    Opts::new("agentcast_node_info", "This node (with --redis-url): 1, by node_id."),
                    &["node_id"],
                ));
                reg(Box::new(g.clone()));
                g
            },
            runs_node_lost: counter(
                "agentcast_runs_node_lost_total",
                "Runs of lost nodes this node ended with node_lost.",
            ),
            registry,
        }
    }

    pub fn emitted(&self, data: &EventData) -> &IntCounter {
        &self.emitted[data.kind_index()]
    }

    /// Events of type `kind` handed to connections.
    pub fn delivered(&self, kind: &str) -> &IntCounter {
        let index = EVENT_TYPES.iter().position(|t| *t == kind).unwrap_or(0);
        &self.delivered[index]
    }

    pub fn run_ended(&self, status: &str) {
        self.runs_ended.with_label_values(&[status]).inc();
    }

    pub fn auth_failure(&self, reason: &str) {
        self.auth_failures.with_label_values(&[reason]).inc();
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            log::error!("encoding metrics failed: {e}");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_with_their_labels() {
        let m = Metrics::new();
        m.emitted(&EventData::AgentThinking {
            text: String::new(),
        })
        .inc();
        m.run_ended("succeeded");
        m.auth_failure("expired");
        let text = m.render();
        assert!(
            text.contains("agentcast_events_emitted_total{type=\"agent_thinking\"} 1"),
            "{text}"
        );
        assert!(text.contains("agentcast_runs_ended_total{status=\"succeeded\"} 1"));
        assert!(text.contains("agentcast_auth_failures_total{reason=\"expired\"} 1"));
        assert!(text.contains("agentcast_delivery_latency_seconds_bucket"));
    }
}
