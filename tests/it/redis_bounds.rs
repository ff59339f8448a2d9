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

/// Connects with `url` (a resume at connect), then sends the `resume` command from
/// `after_seq` too, and reads until both replays ended (`resumed`), one was refused (`error`), or the
/// connection was closed. `Some(true)`: both served; `Some(false)`: refused; `None`: closed.
async fn resume_everything(url: &str, after_seq: u64) -> Option<bool> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let (mut ws, _) = tokio::time::timeout(TIMEOUT, tokio_tungstenite::connect_async(url))
        .await
        .expect("handshake in time")
        .expect("handshake");
    let mut resumed = 0;
    let mut sent = false;
    loop {
        let msg = tokio::time::timeout(TIMEOUT, ws.next())
            .await
            .expect("a frame in time");
        let text = match msg {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
            Some(Ok(_)) => continue,
        };
        let v: Value = serde_json::from_str(text.as_str()).expect("JSON");
        match v["type"].as_str() {
            Some("welcome") if !sent => {
                sent = true;
                let resume = json!({"type": "resume", "after_seq": after_seq}).to_string();
                ws.send(Message::text(resume)).await.expect("send");
            }
            Some("resumed") => {
                resumed += 1;
                if resumed == 2 {
                    return Some(true);
                }
            }
            Some("error") => {
                return Some(false);
            }
            _ => {}
        }
    }
}

/// The seq of the oldest entry in `user`'s stream.
fn stream_oldest(redis: &RedisServer, user: &str) -> u64 {
    let key = format!("{{u:{user}}}:log");
    let first = redis
        .command(&["XRANGE", &key, "-", "+", "COUNT", "1"])
        .expect("XRANGE");
    first
        .split(|c: char| !c.is_ascii_digit())
        .find(|t| !t.is_empty())
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("the stream's first entry: {first:?}"))
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
    // A node's window counts bytes as the stream does: it holds all the stream kept.
    assert_eq!(
        oldest,
        stream_oldest(&redis, "hoarder"),
        "the node must serve every event the stream kept"
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

/// The attack on a node's memory through the history on Redis: a user whose stream is full
/// opens all the connections it may at once on a node that holds none of it, each asking for
/// everything (`?after_seq=0`), and sends the `resume` command on each. Every such resume reads
/// the history back from Redis before it can be served. The node reads at most two at a time
/// per user (the rest are refused, to try again: 1013, or `rate_limited` for the command), so
/// what it holds is a few histories, not one per connection; measured as the node's RSS from
/// /proc (before the bound: +125 MiB for a 4 MiB history; after: +18 MiB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_asking_for_its_whole_history_everywhere_at_once_holds_a_few_copies() {
    use crate::abuse::harness::RssWatch;
    let _serial = crate::abuse::SERIAL.lock().await;
    const HISTORY_MIB: f64 = 4.0;
    /// The window (one history) plus four reads in flight, with slack for the allocator.
    const BOUND_MIB: f64 = 6.0 * HISTORY_MIB + 16.0;
    let redis = RedisServer::start();
    let flags = [
        "--replay-user-max-bytes",
        "4194304",
        "--runs-per-minute",
        "1000",
        "--max-connections-per-user",
        "32",
    ];
    let writer = Node::spawn_child(&redis.url(), "node-w", &flags).await;
    let reader = Node::spawn_child(&redis.url(), "node-r", &flags).await;
    // Fill the user's stream to its byte budget: ~60 KB per run.
    let mut tab = writer.connect("hoarder").await;
    for r in 0..80 {
        let run = tab
            .start_run("scripted", thoughts(&format!("r{r}"), 15, 2000))
            .await;
        tab.collect_run(&run).await;
    }
    let bytes = redis_number(&redis, &["HGET", "{u:hoarder}:meta", "bytes"]);
    assert!(
        bytes as f64 > 0.9 * HISTORY_MIB * 1048576.0,
        "the stream holds {bytes} bytes: not full"
    );

    let pid = match &reader.process {
        NodeProcess::Child(c) => c.pid(),
        NodeProcess::InProcess(_) => unreachable!("a child node"),
    };
    let watch = RssWatch::start(pid, BOUND_MIB);
    // From just before the oldest event the stream still holds: all of it is wanted.
    let after = stream_oldest(&redis, "hoarder") - 1;
    let attempts = (0..32).map(|_| {
        let url = format!(
            "{}?token={}&after_seq={after}",
            reader.ws_url(),
            reader.token("hoarder")
        );
        async move { resume_everything(&url, after).await }
    });
    let outcomes = futures_util::future::join_all(attempts).await;
    let served = outcomes.iter().filter(|o| **o == Some(true)).count();
    let grew = watch.peak_growth_mib();
    eprintln!(
        "32 connections asking for a {HISTORY_MIB} MiB history: {served} served, node RSS +{grew:.1} MiB (baseline {:.1} MiB)",
        watch.baseline_mib()
    );
    assert!(served >= 1, "no connection was served at all: {outcomes:?}");
    // Refused ones were told to try again (1013, or `rate_limited` for the command); now the
    // node holds the history, and a retry is served from it without reading Redis again.
    let url = format!(
        "{}?token={}&after_seq={after}",
        reader.ws_url(),
        reader.token("hoarder")
    );
    assert_eq!(resume_everything(&url, after).await, Some(true), "a retry");
    drop(tab);
    assert!(
        grew <= BOUND_MIB,
        "the node's RSS grew {grew:.1} MiB (bound {BOUND_MIB} MiB) for one user's 32 reads"
    );
}
