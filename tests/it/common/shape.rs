//! Shape checks on frames and run events (PROTOCOL.md §2, docs/protocol-notes.md "Runs and
//! events"), and the JSON and time helpers they use.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;

/// A frame's `type`, or "" when it has none.
pub fn frame_type(v: &Value) -> &str {
    v.get("type").and_then(Value::as_str).unwrap_or("")
}

/// The keys of a JSON object, sorted; panics if `v` is not an object.
pub fn sorted_keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v
        .as_object()
        .unwrap_or_else(|| panic!("expected a JSON object, got {v}"))
        .keys()
        .cloned()
        .collect();
    k.sort();
    k
}

/// Asserts `v` is an object with exactly these keys (no more, no fewer).
pub fn assert_keys(v: &Value, expected: &[&str]) {
    let mut e: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
    e.sort();
    assert_eq!(sorted_keys(v), e, "exact keys of {v}");
}

/// `run_` followed by 22 base62 characters.
pub fn is_run_id(s: &str) -> bool {
    s.len() == 26 && s.starts_with("run_") && s[4..].bytes().all(|b| b.is_ascii_alphanumeric())
}

/// Days from 1970-01-01 to the proleptic Gregorian date y-m-d (Howard Hinnant's algorithm).
pub fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = (if y >= 0 { y } else { y - 399 }) / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Parses `YYYY-MM-DDTHH:MM:SS.ffffffZ` (RFC 3339, UTC, exactly 6 fractional digits) into
/// microseconds since the Unix epoch; panics on any other form.
pub fn ts_micros(ts: &str) -> i64 {
    let b = ts.as_bytes();
    assert_eq!(
        b.len(),
        27,
        "ts {ts:?} must look like 2026-11-22T01:02:03.456789Z"
    );
    for (i, c) in b.iter().enumerate() {
        let ok = match i {
            4 | 7 => *c == b'-',
            10 => *c == b'T',
            13 | 16 => *c == b':',
            19 => *c == b'.',
            26 => *c == b'Z',
            _ => c.is_ascii_digit(),
        };
        assert!(ok, "ts {ts:?}: unexpected character at index {i}");
    }
    let n = |a: usize, z: usize| ts[a..z].parse::<i64>().unwrap();
    let (y, mo, d, h, mi, s, us) = (
        n(0, 4),
        n(5, 7),
        n(8, 10),
        n(11, 13),
        n(14, 16),
        n(17, 19),
        n(20, 26),
    );
    assert!(
        (1..=12).contains(&mo) && (1..=31).contains(&d) && h < 24 && mi < 60 && s < 61,
        "ts {ts:?} is not a valid date-time"
    );
    (days_from_civil(y, mo, d) * 86_400 + h * 3_600 + mi * 60 + s) * 1_000_000 + us
}

/// Microseconds since the Unix epoch, now.
pub fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
}

/// An error object: exactly `{code, message}`, both strings.
pub fn assert_error_obj(e: &Value) {
    assert_keys(e, &["code", "message"]);
    assert!(e["code"].is_string(), "error.code must be a string: {e}");
    assert!(
        e["message"].is_string(),
        "error.message must be a string: {e}"
    );
}

/// The envelope and the `data` shape of one run event, per type.
pub fn check_event(ev: &Value) {
    assert_keys(ev, &["type", "seq", "run_id", "thread_id", "ts", "data"]);
    let seq = ev["seq"]
        .as_u64()
        .unwrap_or_else(|| panic!("seq must be an integer: {ev}"));
    assert!(seq >= 1, "seq starts at 1: {ev}");
    assert!(
        is_run_id(ev["run_id"].as_str().unwrap_or("")),
        "run_id must be run_ + 22 base62: {ev}"
    );
    assert!(
        ev["thread_id"].is_null() || ev["thread_id"].is_string(),
        "thread_id: {ev}"
    );
    let ts = ts_micros(
        ev["ts"]
            .as_str()
            .unwrap_or_else(|| panic!("ts must be a string: {ev}")),
    );
    assert!(
        (ts - now_micros()).abs() < 300_000_000,
        "ts far from now: {ev}"
    );
    let d = &ev["data"];
    match ev["type"].as_str().unwrap() {
        "agent_started" => {
            assert_keys(d, &["agent", "input"]);
            assert!(d["agent"].is_string(), "{ev}");
        }
        "agent_thinking" | "partial_result" => {
            assert_keys(d, &["text"]);
            assert!(d["text"].is_string(), "{ev}");
        }
        "tool_executing" => {
            assert_keys(d, &["tool_call_id", "tool", "args"]);
            assert!(
                d["tool_call_id"].is_string() && d["tool"].is_string(),
                "{ev}"
            );
        }
        "tool_progress" => {
            assert_keys(d, &["tool_call_id", "tool", "message", "fraction"]);
            assert!(
                d["tool_call_id"].is_string() && d["tool"].is_string(),
                "{ev}"
            );
            assert!(d["message"].is_string(), "tool_progress.message: {ev}");
            let f = &d["fraction"];
            assert!(
                f.is_null() || f.as_f64().is_some_and(|x| (0.0..=1.0).contains(&x)),
                "fraction must be 0..1 or null: {ev}"
            );
        }
        "tool_completed" => {
            assert_keys(
                d,
                &[
                    "tool_call_id",
                    "tool",
                    "ok",
                    "result",
                    "error",
                    "duration_ms",
                ],
            );
            assert!(
                d["tool_call_id"].is_string() && d["tool"].is_string(),
                "{ev}"
            );
            let ok = d["ok"]
                .as_bool()
                .unwrap_or_else(|| panic!("ok must be a bool: {ev}"));
            if ok {
                assert!(d["error"].is_null(), "error must be null when ok: {ev}");
            } else {
                assert_error_obj(&d["error"]);
            }
            assert!(
                d["duration_ms"].as_u64().is_some(),
                "duration_ms must be a whole number: {ev}"
            );
        }
        "agent_completed" => {
            assert_keys(d, &["status", "result", "error", "duration_ms", "usage"]);
            let st = d["status"].as_str().unwrap_or("");
            assert!(
                ["succeeded", "failed", "cancelled", "timed_out"].contains(&st),
                "status: {ev}"
            );
            if st == "succeeded" {
                assert!(d["error"].is_null(), "error must be null on success: {ev}");
            } else {
                assert_error_obj(&d["error"]);
            }
            assert!(
                d["duration_ms"].as_u64().is_some(),
                "duration_ms must be a whole number: {ev}"
            );
            assert_keys(&d["usage"], &["tool_calls"]);
            assert!(d["usage"]["tool_calls"].as_u64().is_some(), "{ev}");
        }
        "input_requested" => {
            let kind = d["kind"].as_str().unwrap_or("");
            let mut keys = vec!["interrupt_id", "kind", "message", "expires_at"];
            match kind {
                "approval" => keys.extend(["tool_call_id", "tool", "args"]),
                "input" => {
                    if d.get("schema").is_some() {
                        keys.push("schema");
                    }
                }
                other => panic!("input_requested.kind {other:?}: {ev}"),
            }
            assert_keys(d, &keys);
            assert!(
                d["interrupt_id"].is_string() && d["message"].is_string(),
                "{ev}"
            );
            let expires = ts_micros(d["expires_at"].as_str().unwrap_or(""));
            assert!(expires > ts_micros(ev["ts"].as_str().unwrap_or("")), "{ev}");
        }
        "input_received" => {
            assert_keys(d, &["interrupt_id", "response", "expired"]);
            let expired = d["expired"]
                .as_bool()
                .unwrap_or_else(|| panic!("expired must be a bool: {ev}"));
            if expired {
                assert!(d["response"].is_null(), "an expiry has no response: {ev}");
            }
        }
        other => panic!("unknown event type {other:?}: {ev}"),
    }
}

/// Every check on one run's events: common shape rules, each event's shape, one run_id,
/// the thread_id, ts non-decreasing.
pub fn check_run(events: &[Value], run_id: &str, thread_id: Option<&str>) {
    assert_run_shape(events);
    let mut last_ts = 0;
    for ev in events {
        check_event(ev);
        assert_eq!(ev["run_id"], run_id, "{ev}");
        match thread_id {
            None => assert!(ev["thread_id"].is_null(), "thread_id must be null: {ev}"),
            Some(t) => assert_eq!(ev["thread_id"], t, "{ev}"),
        }
        let ts = ts_micros(ev["ts"].as_str().unwrap());
        assert!(ts >= last_ts, "ts goes backwards within a run: {ev}");
        last_ts = ts;
    }
}

/// The `seq` of each event, in order.
pub fn seqs(events: &[Value]) -> Vec<u64> {
    events.iter().map(|e| e["seq"].as_u64().unwrap()).collect()
}

/// A run event (it has a `seq` and a `run_id`), as opposed to an ack, error, pong, ….
pub fn is_event(f: &Value) -> bool {
    f.get("seq").is_some() && f.get("run_id").is_some()
}

/// The `type` of each event, in order.
pub fn types(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["type"].as_str().unwrap().to_string())
        .collect()
}

/// An event's `ts` in microseconds since the Unix epoch (checked like [`ts_micros`]); panics when
/// the event has no string `ts`.
pub fn event_ts_micros(ev: &Value) -> i64 {
    ts_micros(ev["ts"].as_str().unwrap_or_else(|| panic!("no ts: {ev}")))
}

/// Checks the §2 rules on one run's events: agent_started first and once, agent_completed last and
/// once, each tool_executing has exactly one later tool_completed with the same tool_call_id,
/// tool_progress only between them, all events carry the same run_id. Panics with a clear message.
pub fn assert_run_shape(events: &[Value]) {
    assert!(!events.is_empty(), "a run with no events");
    let dump = || {
        events
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("\n  ")
    };
    let run_id = events[0]["run_id"].clone();
    assert!(
        run_id.is_string(),
        "event without a string run_id:\n  {}",
        dump()
    );
    for (i, e) in events.iter().enumerate() {
        assert_eq!(
            e["run_id"],
            run_id,
            "event {i} belongs to another run:\n  {}",
            dump()
        );
        assert!(
            e["seq"].is_u64(),
            "event {i} has no integer seq:\n  {}",
            dump()
        );
        assert!(e["ts"].is_string(), "event {i} has no ts:\n  {}", dump());
        assert!(
            e.get("thread_id").is_some(),
            "event {i} has no thread_id (null when none):\n  {}",
            dump()
        );
        assert!(
            e.get("data").is_some_and(Value::is_object),
            "event {i} has no data object:\n  {}",
            dump()
        );
    }
    assert_eq!(
        frame_type(&events[0]),
        "agent_started",
        "first event is not agent_started:\n  {}",
        dump()
    );
    let started = events
        .iter()
        .filter(|e| frame_type(e) == "agent_started")
        .count();
    assert_eq!(
        started,
        1,
        "agent_started appears {started} times:\n  {}",
        dump()
    );
    assert_eq!(
        frame_type(events.last().unwrap()),
        "agent_completed",
        "last event is not agent_completed:\n  {}",
        dump()
    );
    let completed = events
        .iter()
        .filter(|e| frame_type(e) == "agent_completed")
        .count();
    assert_eq!(
        completed,
        1,
        "agent_completed appears {completed} times:\n  {}",
        dump()
    );

    // Tool calls: open on tool_executing, progress only while open, closed exactly once.
    let mut open: std::collections::HashSet<String> = Default::default();
    let mut seen: std::collections::HashSet<String> = Default::default();
    for (i, e) in events.iter().enumerate() {
        let id = || {
            e["data"]["tool_call_id"]
                .as_str()
                .unwrap_or_else(|| {
                    panic!(
                        "event {i} ({}) has no data.tool_call_id:\n  {}",
                        frame_type(e),
                        dump()
                    )
                })
                .to_string()
        };
        match frame_type(e) {
            "tool_executing" => {
                let id = id();
                assert!(
                    seen.insert(id.clone()),
                    "tool_call_id {id} executed twice:\n  {}",
                    dump()
                );
                open.insert(id);
            }
            "tool_progress" => {
                let id = id();
                assert!(
                    open.contains(&id),
                    "tool_progress for {id} outside its call (event {i}):\n  {}",
                    dump()
                );
            }
            "tool_completed" => {
                let id = id();
                assert!(
                    open.remove(&id),
                    "tool_completed for {id} without an open tool_executing (event {i}):\n  {}",
                    dump()
                );
            }
            _ => {}
        }
    }
    assert!(
        open.is_empty(),
        "tool calls never completed: {open:?}:\n  {}",
        dump()
    );

    // Questions (§12): asked once, settled exactly once, an approval before its call.
    let mut asked: std::collections::HashSet<String> = Default::default();
    let mut waiting: std::collections::HashSet<String> = Default::default();
    for (i, e) in events.iter().enumerate() {
        let id = || e["data"]["interrupt_id"].as_str().unwrap_or("").to_string();
        match frame_type(e) {
            "input_requested" => {
                let id = id();
                assert!(
                    asked.insert(id.clone()),
                    "question {id} asked twice:\n  {}",
                    dump()
                );
                waiting.insert(id);
                if let Some(call) = e["data"]["tool_call_id"].as_str() {
                    assert!(
                        !events[..i].iter().any(|p| frame_type(p) == "tool_executing"
                            && p["data"]["tool_call_id"] == call),
                        "approval of {call} after its tool_executing:\n  {}",
                        dump()
                    );
                }
            }
            "input_received" => {
                let id = id();
                assert!(
                    waiting.remove(&id),
                    "input_received for {id} that is not open (event {i}):\n  {}",
                    dump()
                );
            }
            _ => {}
        }
    }
    assert!(
        waiting.is_empty(),
        "questions never settled: {waiting:?}:\n  {}",
        dump()
    );
}

/// Checks seqs are strictly contiguous (each = previous + 1).
pub fn assert_contiguous(seqs: &[u64]) {
    for w in seqs.windows(2) {
        assert_eq!(w[1], w[0] + 1, "seqs are not contiguous: {seqs:?}");
    }
}
