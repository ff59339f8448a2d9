//! Strict reads on a [`Client`]: helpers for tests that know exactly which frames must come next.

use serde_json::{json, Value};

use super::{assert_keys, is_event, is_run_id, Client};

/// Sends start_run with a request_id and requires the very next frame to be its ack
/// (use only when nothing else is running for this user). Returns the run_id.
pub async fn start_expect_ack_first(c: &mut Client, rid: &str, frame: Value) -> String {
    let mut frame = frame;
    frame["request_id"] = json!(rid);
    c.send_json(frame).await;
    let ack = c.next_frame().await;
    assert_keys(&ack, &["type", "request_id", "run_id"]);
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(ack["request_id"], rid, "{ack}");
    let run = ack["run_id"].as_str().unwrap().to_string();
    assert!(is_run_id(&run), "run_id format: {ack}");
    run
}

/// Reads frames until the run's agent_completed; every frame read must be an event of that run.
pub async fn read_only_run(c: &mut Client, run_id: &str) -> Vec<Value> {
    let mut out = Vec::new();
    loop {
        let f = c.next_frame().await;
        assert!(
            is_event(&f) && f["run_id"] == run_id,
            "expected only events of {run_id}, got {f}"
        );
        let done = f["type"] == "agent_completed";
        out.push(f);
        if done {
            return out;
        }
    }
}

/// Sends a ping and reads to its pong; returns the frames read before it (heartbeats skipped).
pub async fn ping_flush(c: &mut Client, id: &str) -> Vec<Value> {
    c.send_json(json!({"type":"ping","request_id":id})).await;
    let mut out = Vec::new();
    loop {
        let f = c.next_frame().await;
        if f["type"] == "pong" && f["request_id"] == id {
            assert_keys(&f, &["type", "request_id"]);
            return out;
        }
        out.push(f);
    }
}
