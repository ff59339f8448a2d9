//! What one user can make Redis hold (PROTOCOL.md §10 with the limits of §5 and §9): each
//! user's stream on Redis keeps the same bounds as the in-process log, `--replay-capacity`
//! entries and `--replay-user-max-bytes` bytes, oldest first; a resume from before what is
//! kept gets an honest `resume_gap` from any node.

use serde_json::{json, Value};

use crate::common::*;

/// `scripted` input of `steps` thoughts of `size` bytes each.
fn thoughts(tag: &str, steps: usize, size: usize) -> Value {
    let steps: Vec<Value> = (0..steps)
        .map(|i| json!({ "think": format!("{tag}-{i}-{}", "x".repeat(size)) }))
        .collect();
    json!({ "steps": steps })
}

fn redis_number(redis: &RedisServer, args: &[&str]) -> u64 {
    let reply = redis
        .command(args)
        .unwrap_or_else(|e| panic!("redis {args:?}: {e}"));
    reply
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("redis {args:?} answered {reply:?}, not a number"))
}

#[tokio::test]
async fn one_users_stream_on_redis_is_bounded_by_bytes_and_count() {
    const MAX_BYTES: u64 = 64 * 1024;
    let redis = RedisServer::start();
    let nodes = spawn_child_nodes(
        &redis,
        2,
        &[
            "--replay-user-max-bytes",
            "65536",
            "--replay-capacity",
            "1000",
        ],
    )
    .await;
    let mut tab = nodes[0].connect("hoarder").await;
    // 4 runs of ~60 KB each (the echo of a 30 KB input, then 15 thoughts of 2 KB).
    let mut last = 0;
    for r in 0..4 {
        let run = tab
            .start_run("scripted", thoughts(&format!("r{r}"), 15, 2000))
            .await;
        let events = tab.collect_run(&run).await;
        last = events
            .last()
            .and_then(|e| e["seq"].as_u64())
            .expect("the run's events have seqs");
    }
    assert_eq!(last, 4 * 17, "4 runs of 17 events each");

    let bytes = redis_number(&redis, &["HGET", "{u:hoarder}:meta", "bytes"]);
    let len = redis_number(&redis, &["XLEN", "{u:hoarder}:log"]);
    assert!(
        bytes <= MAX_BYTES,
        "the user's stream holds {bytes} bytes, over --replay-user-max-bytes {MAX_BYTES}"
    );
    assert!(
        (10..last).contains(&len),
        "the stream keeps the newest events within the bytes ({len} of {last})"
    );

    // From the other node, which never saw these events: the oldest are gone, said so.
    let mut late = nodes[1].connect_query("hoarder", "after_seq=0").await;
    let gap = late.next_of_type("error").await;
    assert_eq!(gap["code"], "resume_gap", "{gap}");
    let oldest = gap["oldest_seq"].as_u64().expect("oldest_seq");
    assert_eq!(gap["last_seq"], last, "{gap}");
    assert!(
        oldest > 1 && oldest <= last,
        "oldest_seq {oldest} must say the first events are gone: {gap}"
    );
    // And what is kept is served: a resume from just before the oldest kept replays it all.
    let from = oldest - 1;
    let query = format!(
        "after_seq={from}&epoch={}",
        late.welcome()["epoch"].as_str().expect("epoch")
    );
    let mut resumed = nodes[1].connect_query("hoarder", &query).await;
    for seq in oldest..=last {
        let frame = resumed.next_frame().await;
        assert_eq!(frame["seq"], seq, "replay from Redis, in order: {frame}");
    }
    let note = resumed.next_of_type("resumed").await;
    assert_eq!(note["to_seq"], last, "{note}");

    // Another user is untouched by the first one's bounds.
    let mut other = nodes[1].connect("bystander").await;
    let run = other.start_run("scripted", thoughts("b", 2, 10)).await;
    let events = other.collect_run(&run).await;
    assert_eq!(events.first().map(|e| e["seq"].clone()), Some(json!(1)));
}
