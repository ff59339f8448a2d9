//! Resume without loss (PROTOCOL.md §5, docs/protocol-notes.md "Control frames" and
//! "Sequence numbers, epochs, memory"): the `resume` command, `?after_seq=` at connect while
//! events keep coming, `resume_gap`, and forgetting a user after the TTL.

use crate::common::*;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// Local helpers (the shared shape checks per PROTOCOL.md §2 are in common/shape.rs)
// ---------------------------------------------------------------------------------------------

/// The same epoch with one character changed to another of the same kind, so that it stays
/// a valid-looking value but is not the server's.
fn other_epoch(e: &str) -> String {
    let mut cs: Vec<char> = e.chars().collect();
    let last = cs.len() - 1;
    cs[last] = match cs[last] {
        '0'..='8' => ((cs[last] as u8) + 1) as char,
        '9' => '0',
        'a'..='y' | 'A'..='Y' => ((cs[last] as u8) + 1) as char,
        'z' => 'a',
        'Z' => 'A',
        _ => 'x',
    };
    cs.into_iter().collect()
}

fn epoch_of(c: &Client) -> String {
    let e = &c.welcome()["epoch"];
    e.as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| e.to_string())
}

fn assert_resumed(f: &Value, from: u64, to: u64) {
    assert_eq!(
        f,
        &json!({"type":"resumed","from_seq":from,"to_seq":to}),
        "resumed frame"
    );
}

fn assert_gap(f: &Value, request_id: Option<&str>, oldest: u64, last: u64) {
    match request_id {
        Some(r) => {
            assert_keys(
                f,
                &[
                    "type",
                    "request_id",
                    "code",
                    "message",
                    "oldest_seq",
                    "last_seq",
                ],
            );
            assert_eq!(f["request_id"], r, "{f}");
        }
        None => assert_keys(f, &["type", "code", "message", "oldest_seq", "last_seq"]),
    }
    assert_eq!(f["type"], "error", "{f}");
    assert_eq!(f["code"], "resume_gap", "{f}");
    assert_eq!(f["oldest_seq"], oldest, "oldest_seq: {f}");
    assert_eq!(f["last_seq"], last, "last_seq: {f}");
}

fn text_steps(n: usize, sleep_every: usize, sleep_ms: u64) -> Value {
    let mut steps = Vec::new();
    for i in 0..n {
        steps.push(json!({"text": format!("t{i}")}));
        if sleep_every > 0 && i % sleep_every == sleep_every - 1 {
            steps.push(json!({"sleep_ms": sleep_ms}));
        }
    }
    scripted(Value::Array(steps))
}

/// A clean client-side close: send Close, read until the server's Close answer, then drop the
/// socket (without waiting for the server to end the TCP connection).
async fn close_handshake(mut c: Client) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let ws = c.ws();
    tokio::time::timeout(Duration::from_secs(10), ws.send(Message::Close(None)))
        .await
        .expect("sending close timed out")
        .expect("sending close");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("no close answer within 10 s")
        {
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
            Some(Ok(_)) => {}
        }
    }
}

/// Reads frames until the run's agent_completed (all must be events); returns them.
async fn events_until_completed(c: &mut Client, run: &str) -> Vec<Value> {
    let mut out = Vec::new();
    loop {
        let f = c.next_frame().await;
        assert!(is_event(&f), "expected only events, got {f}");
        let done = f["type"] == "agent_completed" && f["run_id"] == run;
        out.push(f);
        if done {
            return out;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// `resume` on an open connection replays (after_seq, welcome.last_seq] in order, then
/// resumed{from_seq: after_seq+1, to_seq}; a repeated resume replays nothing already
/// delivered (to_seq - from_seq + 1 = events replayed); `epoch` is accepted; a mid-point
/// after_seq replays only the tail; later live events arrive once.
#[tokio::test]
async fn resume_command_replays_history_once() {
    let server = start(test_config());
    let mut c1 = Client::connect(&server, "u").await;
    let run = c1
        .start_run("echo", json!("please replay me, every piece of me"))
        .await;
    let ev1 = c1.collect_run(&run).await;
    check_run(&ev1, &run, None);
    let n = ev1.last().unwrap()["seq"].as_u64().unwrap();
    assert_eq!(seqs(&ev1), (1..=n).collect::<Vec<_>>());

    let mut c2 = Client::connect(&server, "u").await;
    assert_eq!(c2.welcome()["last_seq"], n, "{}", c2.welcome());
    c2.send_json(json!({"type":"resume","after_seq":0})).await;
    let mut seen: Vec<Value> = Vec::new();
    for i in 1..=n {
        let f = c2.next_frame().await;
        assert_eq!(f["seq"], i, "replay in seq order: {f}");
        assert_eq!(
            f,
            ev1[(i - 1) as usize],
            "replayed event equals the live one"
        );
        seen.push(f);
    }
    let r = c2.next_frame().await;
    assert_resumed(&r, 1, n);

    // Again: everything was delivered on this connection already; nothing is sent twice.
    c2.send_json(json!({"type":"resume","after_seq":0})).await;
    let mut dup = Vec::new();
    let r2 = loop {
        let f = c2.next_frame().await;
        if f["type"] == "resumed" {
            break f;
        }
        dup.push(f);
    };
    assert!(
        dup.is_empty(),
        "a second resume must not deliver any seq twice: {dup:?}"
    );
    assert_keys(&r2, &["type", "from_seq", "to_seq"]);
    let (from, to) = (
        r2["from_seq"].as_i64().unwrap(),
        r2["to_seq"].as_i64().unwrap(),
    );
    assert_eq!(
        to - from + 1,
        0,
        "resumed must say 0 events were replayed: {r2}"
    );

    // A fresh tab with the (correct) epoch and a mid-point after_seq gets only the tail.
    let mut c3 = Client::connect(&server, "u").await;
    let epoch = c3.welcome()["epoch"].clone();
    c3.send_json(json!({"type":"resume","after_seq":2,"epoch":epoch}))
        .await;
    for i in 3..=n {
        let f = c3.next_frame().await;
        assert_eq!(f, ev1[(i - 1) as usize], "tail replay");
    }
    assert_resumed(&c3.next_frame().await, 3, n);

    // Nothing to replay: resumed{after_seq+1, after_seq}.
    c3.send_json(json!({"type":"resume","after_seq":n})).await;
    assert_resumed(&c3.next_frame().await, n + 1, n);

    // Live events after that arrive exactly once on the resumed connections.
    let run2 = c1.start_run("echo", json!("live now")).await;
    let ev2 = c1.collect_run(&run2).await;
    let got2 = events_until_completed(&mut c2, &run2).await;
    assert_eq!(got2, ev2);
    seen.extend(got2);
    let got3 = events_until_completed(&mut c3, &run2).await;
    assert_eq!(got3, ev2);
    assert!(
        ping_flush(&mut c2, "p2").await.is_empty(),
        "no late duplicates"
    );
    assert!(
        ping_flush(&mut c3, "p3").await.is_empty(),
        "no late duplicates"
    );
    let s = seqs(&seen);
    assert_eq!(
        s,
        (1..=s.len() as u64).collect::<Vec<_>>(),
        "each seq exactly once on c2"
    );
}

/// `resume after_seq=0` sent right after connecting while a long run is emitting: replayed
/// events (seq <= welcome.last_seq) come before resumed{1, welcome.last_seq}, live ones
/// (> welcome.last_seq) in order; together every seq from 1 to the end exactly once, equal to
/// what the starting tab saw.
#[tokio::test]
async fn resume_command_racing_live_events() {
    let server = start(test_config());
    for round in 0..3 {
        let user = format!("racer{round}");
        let mut c1 = Client::connect(&server, &user).await;
        let run = c1.start_run("scripted", text_steps(200, 5, 1)).await;
        let mut ev1 = Vec::new();
        while ev1.len() < 20 {
            let f = c1.next_frame().await;
            assert!(is_event(&f), "{f}");
            ev1.push(f);
        }
        let mut c2 = Client::connect(&server, &user).await;
        let l = c2.welcome()["last_seq"].as_u64().unwrap();
        c2.send_json(json!({"type":"resume","after_seq":0})).await;

        let mut got: Vec<Value> = Vec::new();
        let mut resumed_at: Option<usize> = None;
        let mut completed = false;
        while !(completed && resumed_at.is_some()) {
            let f = c2.next_frame().await;
            if f["type"] == "resumed" {
                assert!(resumed_at.is_none(), "one resumed frame");
                assert_resumed(&f, 1, l);
                resumed_at = Some(got.len());
                continue;
            }
            assert!(is_event(&f), "{f}");
            if f["type"] == "agent_completed" {
                completed = true;
            }
            got.push(f);
        }
        ev1.extend(events_until_completed(&mut c1, &run).await);
        check_run(&ev1, &run, None);
        let last = ev1.last().unwrap()["seq"].as_u64().unwrap();
        assert!(
            l < last,
            "test timing: the run must still be going when tab 2 connects"
        );

        let mut sorted = seqs(&got);
        sorted.sort();
        assert_eq!(
            sorted,
            (1..=last).collect::<Vec<_>>(),
            "every seq exactly once (round {round})"
        );
        let before: Vec<u64> = seqs(&got[..resumed_at.unwrap()]);
        assert!(
            (1..=l).all(|s| before.contains(&s)),
            "all replayed events (<= {l}) come before resumed"
        );
        let live: Vec<u64> = seqs(&got).into_iter().filter(|s| *s > l).collect();
        assert_eq!(
            live,
            (l + 1..=last).collect::<Vec<_>>(),
            "live events in order"
        );
        let replayed: Vec<u64> = seqs(&got).into_iter().filter(|s| *s <= l).collect();
        assert_eq!(
            replayed,
            (1..=l).collect::<Vec<_>>(),
            "replayed events in order"
        );
        let by_seq: HashMap<u64, &Value> = ev1
            .iter()
            .map(|e| (e["seq"].as_u64().unwrap(), e))
            .collect();
        for e in &got {
            assert_eq!(
                &e,
                by_seq.get(&e["seq"].as_u64().unwrap()).unwrap(),
                "same event on both tabs"
            );
        }
        assert!(ping_flush(&mut c2, "p").await.is_empty(), "nothing after");
    }
}

/// Reconnecting with ?after_seq=<last seen>&epoch=<epoch> again and again during one long
/// run: each connection gets welcome, the missed events, resumed{after_seq+1, to}, then live
/// events, strictly contiguous from after_seq+1, each exactly once; all the pieces together
/// are exactly the run as a steady tab saw it.
#[tokio::test]
async fn reconnect_with_after_seq_during_a_live_run() {
    let server = start(test_config());
    let mut obs = Client::connect(&server, "u").await;
    let mut c = Client::connect(&server, "u").await;
    let epoch = epoch_of(&c);
    let run = obs.start_run("scripted", text_steps(400, 4, 3)).await;

    let mut all: Vec<Value> = Vec::new();
    while all.len() < 25 {
        let f = c.next_frame().await;
        assert!(is_event(&f), "{f}");
        all.push(f);
    }
    let mut segments = 0;
    let mut segments_with_live = 0;
    let mut done = false;
    let mut abrupt = false;
    while !done {
        // Alternate a clean close and a plain drop of the socket.
        if abrupt {
            drop(c);
        } else {
            close_handshake(c).await;
        }
        abrupt = !abrupt;
        let after = all.last().unwrap()["seq"].as_u64().unwrap();
        c = Client::connect_query(
            &server,
            "u",
            &format!("after_seq={after}&epoch={}", percent_encode(&epoch)),
        )
        .await;
        segments += 1;
        assert_eq!(epoch_of(&c), epoch, "same epoch on reconnect");
        let wl = c.welcome()["last_seq"].as_u64().unwrap();
        assert!(wl >= after, "welcome.last_seq {wl} < after_seq {after}");

        let mut seg: Vec<Value> = Vec::new();
        let mut resumed: Option<Value> = None;
        let mut live = 0;
        loop {
            let f = c.next_frame().await;
            if f["type"] == "resumed" {
                assert!(resumed.is_none(), "one resumed per connection");
                assert_keys(&f, &["type", "from_seq", "to_seq"]);
                assert_eq!(f["from_seq"], after + 1, "{f}");
                let to = f["to_seq"].as_u64().unwrap();
                assert_eq!(
                    to,
                    after + seg.len() as u64,
                    "resumed.to_seq = last replayed seq: {f}"
                );
                assert!(
                    to >= wl,
                    "the replay covers at least up to welcome.last_seq: {f}"
                );
                resumed = Some(f);
                if done {
                    break;
                }
                continue;
            }
            assert!(is_event(&f), "{f}");
            let expect = after + 1 + seg.len() as u64;
            assert_eq!(f["seq"], expect, "contiguous from after_seq+1, each once");
            if resumed.is_some() {
                live += 1;
            }
            if f["type"] == "agent_completed" && f["run_id"] == run.as_str() {
                done = true;
            }
            seg.push(f);
            if resumed.is_some() && (done || live >= 25) {
                break;
            }
        }
        eprintln!(
            "segment {segments}: after_seq {after}, welcome.last_seq {wl}, resumed {}, {} live, done {done}",
            resumed.as_ref().unwrap(),
            live
        );
        if live > 0 && !done {
            segments_with_live += 1;
        }
        all.extend(seg);
    }
    let steady = obs.collect_run(&run).await;
    check_run(&steady, &run, None);
    assert_eq!(
        all.len(),
        steady.len(),
        "every event exactly once across reconnects"
    );
    assert_eq!(
        all, steady,
        "the reconnecting client saw exactly the steady tab's events"
    );
    assert!(segments >= 3, "reconnected {segments} times");
    eprintln!("reconnects: {segments}, of which {segments_with_live} raced live events");
    assert!(ping_flush(&mut c, "p").await.is_empty());
}

/// resume_gap (replay_capacity 5): at connect with after_seq older than the buffer, with a
/// wrong epoch, or with after_seq > last_seq: welcome, then error resume_gap with the right
/// oldest_seq/last_seq, no replay, and live events still flow. The same three by the
/// `resume` command (request_id echoed). The edge of the buffer replays fine.
#[tokio::test]
async fn resume_gap_cases() {
    let mut cfg = test_config();
    cfg.replay_capacity = 5;
    let server = start(cfg);
    let mut c1 = Client::connect(&server, "u").await;
    let epoch = epoch_of(&c1);
    let run = c1.start_run("scripted", text_steps(8, 0, 0)).await;
    let ev = c1.collect_run(&run).await;
    check_run(&ev, &run, None);
    assert_eq!(ev.len(), 10);
    let last = 10u64;
    let oldest = 6u64;

    // Buffer edge: after_seq = oldest-1 replays the 5 buffered events.
    let mut ok = Client::connect_query(
        &server,
        "u",
        &format!("after_seq={}&epoch={}", oldest - 1, percent_encode(&epoch)),
    )
    .await;
    for i in oldest..=last {
        assert_eq!(ok.next_frame().await, ev[(i - 1) as usize]);
    }
    assert_resumed(&ok.next_frame().await, oldest, last);
    // Nothing missed: resumed{last+1, last}.
    let mut none = Client::connect_query(
        &server,
        "u",
        &format!("after_seq={last}&epoch={}", percent_encode(&epoch)),
    )
    .await;
    assert_resumed(&none.next_frame().await, last + 1, last);

    let mut gapped: Vec<Client> = Vec::new();
    for q in [
        "after_seq=0".to_string(),
        format!("after_seq={}&epoch={}", oldest - 2, percent_encode(&epoch)),
        format!(
            "after_seq={last}&epoch={}",
            percent_encode(&other_epoch(&epoch))
        ),
        format!("after_seq={}&epoch={}", last + 1, percent_encode(&epoch)),
    ] {
        let mut c = Client::connect_query(&server, "u", &q).await;
        assert_eq!(c.welcome()["last_seq"], last, "{q}: {}", c.welcome());
        let f = c.next_frame().await;
        assert_gap(&f, None, oldest, last);
        gapped.push(c);
    }

    // The command, on an open connection (welcome.last_seq = 10).
    let mut c2 = Client::connect(&server, "u").await;
    for (i, r) in [
        json!({"type":"resume","after_seq":0,"request_id":"g0"}),
        json!({"type":"resume","after_seq":oldest - 2,"request_id":"g1"}),
        json!({"type":"resume","after_seq":last,"epoch":other_epoch(&epoch),"request_id":"g2"}),
        json!({"type":"resume","after_seq":last + 1,"request_id":"g3"}),
    ]
    .into_iter()
    .enumerate()
    {
        c2.send_json(r).await;
        let f = c2.next_frame().await;
        assert_gap(&f, Some(&format!("g{i}")), oldest, last);
    }
    c2.send_json(json!({"type":"resume","after_seq":7})).await;
    for i in 8..=last {
        assert_eq!(c2.next_frame().await, ev[(i - 1) as usize]);
    }
    assert_resumed(&c2.next_frame().await, 8, last);

    // Live events still flow to every connection, gapped ones included, from last+1.
    let run2 = c1.start_run("echo", json!("after the gap")).await;
    let ev2 = c1.collect_run(&run2).await;
    assert_eq!(ev2[0]["seq"], last + 1);
    for c in gapped.iter_mut().chain([&mut c2, &mut ok, &mut none]) {
        let got = events_until_completed(c, &run2).await;
        assert_eq!(got, ev2, "live events after a resume_gap");
        assert!(ping_flush(c, "p").await.is_empty());
    }
}

/// replay_ttl_secs 1: a user with no connection and no run is forgotten: a later welcome has a
/// new epoch and last_seq 0, and resuming into the old epoch is a resume_gap. A user who
/// stays connected, and one with a run still running, keep their epoch and seqs.
#[tokio::test]
async fn idle_user_is_forgotten_after_ttl() {
    let mut cfg = test_config();
    cfg.replay_ttl_secs = 1;
    let server = start(cfg);

    let mut u = Client::connect(&server, "gone").await;
    let e_u = epoch_of(&u);
    let r = u.start_run("echo", json!("remember me")).await;
    let n_u = u.collect_run(&r).await.last().unwrap()["seq"]
        .as_u64()
        .unwrap();
    u.close().await;

    let mut w = Client::connect(&server, "stays").await;
    let e_w = epoch_of(&w);
    let r = w.start_run("echo", json!("I stay connected")).await;
    let n_w = w.collect_run(&r).await.last().unwrap()["seq"]
        .as_u64()
        .unwrap();

    let mut rr = Client::connect(&server, "running").await;
    let e_r = epoch_of(&rr);
    let run_r = rr
        .start_run(
            "scripted",
            scripted(json!([{"tool":"sleep","args":{"ms":15000}}])),
        )
        .await;
    loop {
        let f = rr.next_frame().await;
        if f["run_id"] == run_r.as_str() && f["type"] == "tool_executing" {
            break;
        }
    }
    rr.close().await;

    // Forgetting is about time passing with no connection, and a connection as "gone" would
    // make it known again: so watch `agentcast_users` (users with a history) fall to the two
    // that must stay, then connect. Expected after the TTL (1 s) plus one sweep (every ttl/4);
    // the bound is TIMEOUT (10 s), eight times that.
    let t0 = Instant::now();
    wait_metric(server.addr(), "agentcast_users", 2.0).await;
    let fresh = Client::connect(&server, "gone").await;
    assert_ne!(
        epoch_of(&fresh),
        e_u,
        "user not forgotten after {:?} (ttl 1 s)",
        t0.elapsed()
    );
    assert_eq!(
        fresh.welcome()["last_seq"],
        0,
        "new epoch starts over: {}",
        fresh.welcome()
    );
    let e_new = epoch_of(&fresh);

    let mut old = Client::connect_query(
        &server,
        "gone",
        &format!("after_seq={n_u}&epoch={}", percent_encode(&e_u)),
    )
    .await;
    assert_eq!(epoch_of(&old), e_new);
    assert_gap(&old.next_frame().await, None, 1, 0);

    let w2 = Client::connect(&server, "stays").await;
    assert_eq!(epoch_of(&w2), e_w, "a connected user is not forgotten");
    assert_eq!(w2.welcome()["last_seq"], n_w);
    assert!(ping_flush(&mut w, "p").await.is_empty());

    let r2 = Client::connect(&server, "running").await;
    assert_eq!(
        epoch_of(&r2),
        e_r,
        "a user with a running run is not forgotten"
    );
    assert!(
        r2.welcome()["last_seq"].as_u64().unwrap() >= 2,
        "{}",
        r2.welcome()
    );
    // End the long run here rather than leaving it to the server's shutdown.
    let mut r2 = r2;
    let ack = r2
        .request(json!({"type":"cancel_run","run_id":run_r}))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let mut tail = Vec::new();
    loop {
        let f = r2.next_frame().await;
        let end = f["type"] == "agent_completed" && f["run_id"] == run_r.as_str();
        tail.push(f);
        if end {
            break;
        }
    }
    assert_eq!(tail.last().unwrap()["data"]["status"], "cancelled");
}
