//! Abuse: what hostile or merely careless clients can make the server spend, measured on the
//! real binary (`agentcast serve` as a child process; RSS from /proc/PID/status, open fds from
//! /proc/PID/fd) with real sockets.
//!
//! Each test states the behaviour the server must have and fails while it does not; it prints
//! the figures it measured (`[abuse] ...` lines) so they can be quoted. Every attack stops by
//! itself as soon as the server has clearly blown its bound (RSS growth over twice the bound),
//! so a failing run is quick and does not eat the machine.
//!
//! 1. `huge_frame_headers_are_refused_before_their_payload`, `trickling_frame_is_cut_by_the_frame_deadline`
//! 2. `stalled_sse_streams_count_until_reset_and_stay_bounded`
//! 3. `run_records_read_their_events_from_the_bounded_replay_log`,
//!    `global_replay_budget_evicts_idle_users_first`
//! 4. `connect_time_replay_to_clients_that_never_read`
//! 5. `run_inspection_to_clients_that_never_read`
//! 6. `reading_tabs_never_lose_events`
//! 7. `sse_resume_and_live_bursts_reach_a_fast_reader`
//! 8. `questions_nobody_answers_cost_a_bounded_amount_until_they_expire`
//! 9. `one_publisher_holds_a_bounded_amount_until_its_runs_go_idle`
//!
//! Run with `cargo test --test it abuse:: -- --test-threads=1 --nocapture` to see the figures.
//! The tests also take a lock so that they run one at a time under the default parallel runner:
//! each measures one server's memory and timing, and must not share the machine with another
//! attack. The other tests of this binary may run beside them: they do not count in the child
//! server's RSS or fds, and each time bound here leaves a second or more over what the server
//! takes, which their CPU use does not eat (checked with 2 and 4 test threads on 2 cores).

pub(crate) mod harness;

use std::time::Duration;

use futures_util::SinkExt;
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use harness::*;

const SLOW: &str = "agentcast_slow_consumer_closes_total";

/// One abuse test at a time even under the default parallel test runner: each measures a
/// server's memory and timing, which a neighbour's attack would distort. (A tokio mutex: it
/// works across the tests' runtimes and a failed test does not poison it.)
pub(crate) static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

// ---------------------------------------------------------------------------------------------
// 1. Frames announced bigger than the limit, and frames that never finish.

/// A masked text frame header announcing more than `--max-frame-bytes` (65536): the server
/// answers close 1009 and ends the connection within 2 s of the header alone, without waiting
/// for (or buffering) the payload; with the payload streamed at full speed for up to 5 s, its
/// RSS grows by less than 16 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_frame_headers_are_refused_before_their_payload() {
    let _serial = SERIAL.lock().await;
    let mut f = Failures::default();
    for len in [65_537u64, 1 << 32, 1 << 62, (1u64 << 63) - 1] {
        let server = Server::start(&[]);
        let path = format!("/v1/ws?token={}", server.token("huge"));
        let header = masked_text_header(len);

        // The header alone.
        let (mut s, status, rest) = raw_upgrade(server.addr, &path, &[], false).await.unwrap();
        assert_eq!(status, 101, "upgrade refused");
        let mut frames = FrameReader::new(rest);
        let welcome = frames
            .next_json(&mut s, Duration::from_secs(10))
            .await
            .expect("welcome");
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        s.write_all(&header).await.unwrap();
        let t0 = Instant::now();
        let ending = watch_ending(&mut s, &mut frames, t0, Duration::from_secs(2)).await;
        eprintln!(
            "[abuse] frame header announcing {len} bytes, no payload: close {:?}, connection end {:?} (watched 2 s)",
            ending.close, ending.ended
        );
        f.check(matches!(ending.close, Some((1009, _))), || {
            format!(
                "header announcing {len} bytes: no close 1009 within 2 s (got {:?})",
                ending.close
            )
        });
        f.check(ending.ended.is_some(), || {
            format!("header announcing {len} bytes: the connection did not end within 2 s")
        });
        drop(s);

        // The header, then the payload as fast as the socket takes it, for up to 5 s.
        let (s, status, rest) = raw_upgrade(server.addr, &path, &[], false).await.unwrap();
        assert_eq!(status, 101, "upgrade refused");
        let (mut rd, mut wr) = s.into_split();
        let mut frames = FrameReader::new(rest);
        frames
            .next_json(&mut rd, Duration::from_secs(10))
            .await
            .expect("welcome");
        let watch = RssWatch::start(server.pid, 16.0);
        wr.write_all(&header).await.unwrap();
        let t0 = Instant::now();
        let reader = tokio::spawn(async move {
            watch_ending(&mut rd, &mut frames, t0, Duration::from_secs(7)).await
        });
        let chunk = vec![0x5au8; 65536];
        let deadline = t0 + Duration::from_secs(5);
        let mut sent: u64 = 0;
        let stopped = loop {
            if watch.blown() {
                break "RSS over twice the bound".to_string();
            }
            if sent >= len {
                break "whole payload sent".to_string();
            }
            if Instant::now() >= deadline {
                break "5 s of streaming".to_string();
            }
            let n = (chunk.len() as u64).min(len - sent) as usize;
            match tokio::time::timeout_at(deadline, wr.write_all(&chunk[..n])).await {
                Ok(Ok(())) => sent += n as u64,
                Ok(Err(e)) => break format!("write failed ({e})"),
                Err(_) => break "writes blocked until 5 s".to_string(),
            }
        };
        let streamed = t0.elapsed();
        let growth = watch.peak_growth_mib();
        // How the server ended it (the write half stays open meanwhile: dropping it would
        // send our own FIN).
        let ending = match tokio::time::timeout(Duration::from_secs(1), reader).await {
            Ok(Ok(e)) => format!("close {:?}, end {:?}", e.close, e.ended),
            _ => "still open 1 s after the streaming stopped".into(),
        };
        drop(wr);
        eprintln!(
            "[abuse] frame header announcing {len} bytes, payload streamed: {:.1} MiB sent in {:.2} s, stopped: {stopped}; server RSS +{growth:.1} MiB (baseline {:.1} MiB); {ending}",
            sent as f64 / MIB,
            secs(streamed),
            watch.baseline_mib()
        );
        f.check(growth < 16.0, || {
            format!(
                "header announcing {len} bytes then payload: RSS grew {growth:.1} MiB (bound 16)"
            )
        });
    }
    f.assert_none("huge frame headers");
}

/// A frame that announces 60,000 bytes and then trickles one byte every 200 ms: the server
/// cuts it (close 1008, or the TCP connection ends) within 12 s (frame deadline 10 s), with
/// the default 30 s idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickling_frame_is_cut_by_the_frame_deadline() {
    let _serial = SERIAL.lock().await;
    let server = Server::start(&[]);
    let path = format!("/v1/ws?token={}", server.token("trickle"));
    let (s, status, rest) = raw_upgrade(server.addr, &path, &[], false).await.unwrap();
    assert_eq!(status, 101);
    let (mut rd, mut wr) = s.into_split();
    let mut frames = FrameReader::new(rest);
    frames
        .next_json(&mut rd, Duration::from_secs(10))
        .await
        .expect("welcome");
    wr.write_all(&masked_text_header(60_000)).await.unwrap();
    let t0 = Instant::now();
    let bound = Duration::from_secs(12);
    let reader = tokio::spawn(async move { watch_ending(&mut rd, &mut frames, t0, bound).await });
    let trickled = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let writer = {
        let trickled = trickled.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            loop {
                tick.tick().await;
                if t0.elapsed() > bound {
                    return None;
                }
                match wr.write_all(b"x").await {
                    Ok(()) => {
                        trickled.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    Err(e) => return Some((e.to_string(), t0.elapsed())),
                }
            }
        })
    };
    let ending = reader.await.unwrap();
    let write_error = if writer.is_finished() {
        writer.await.unwrap_or(None)
    } else {
        writer.abort();
        None
    };
    let sent = trickled.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!(
        "[abuse] trickling frame (60,000 announced, 1 byte / 200 ms): close {:?}, connection end {:?}, write error {:?}, {sent} bytes trickled (watched {} s)",
        ending.close,
        ending.ended,
        write_error,
        bound.as_secs()
    );
    let cut = matches!(ending.close, Some((1008, _))) || ending.ended.is_some();
    assert!(
        cut,
        "a frame trickling one byte every 200 ms was not cut within {bound:?}: close {:?}, end {:?}",
        ending.close, ending.ended
    );
}

// ---------------------------------------------------------------------------------------------
// 2. SSE streams that stop reading.

/// `--max-connections-per-user 8 --slow-consumer-grace-ms 1000`: 8 SSE streams of one user
/// that never read count against the limit (a 9th answers 429 `rate_limited`); when the
/// user's runs emit a lot each is cut (`agentcast_slow_consumer_closes_total` rises) and its
/// TCP connection reset within 1 s stall + 1 s grace + margin; then a new stream gets 200.
/// Three times over, RSS stays under baseline + 64 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_sse_streams_count_until_reset_and_stay_bounded() {
    let _serial = SERIAL.lock().await;
    let server = Server::start(&[
        "--max-connections-per-user",
        "8",
        "--slow-consumer-grace-ms",
        "1000",
        "--runs-per-minute",
        "100000",
    ]);
    let addr = server.addr;
    let bearer = server.bearer("stalled-sse");
    let mut f = Failures::default();
    let mut http = Http::new(addr);
    let body = big_thinks_body(3, 16_000);
    let sse_req = get_request(
        addr,
        "/v1/events",
        &[("Authorization", &bearer), ("Accept", "text/event-stream")],
    );
    let ninth_headers = [
        ("Authorization", bearer.as_str()),
        ("Accept", "text/event-stream"),
    ];
    let watch = RssWatch::start(server.pid, 96.0);
    for cycle in 1..=3 {
        let mut stalled = Vec::new();
        for _ in 0..8 {
            match request_head_small(addr, &sse_req, Duration::from_secs(10)).await {
                Ok((s, head, _)) => {
                    f.check(head.status == 200, || {
                        format!("cycle {cycle}: a stalled stream got {}", head.status)
                    });
                    stalled.push(s);
                }
                Err(e) => f.fail(format!("cycle {cycle}: opening a stream: {e}")),
            }
        }
        let (conns, ok) = wait_metric(
            addr,
            "agentcast_connections",
            Duration::from_secs(10),
            |v| v >= 8.0,
        )
        .await;
        f.check(ok, || {
            format!("cycle {cycle}: only {conns} connections registered")
        });

        // A 9th while the 8 are open.
        match http_once(addr, "/v1/events", &ninth_headers, Duration::from_secs(5)).await {
            Ok(r) => {
                let code = serde_json::from_str::<Value>(&r.body)
                    .ok()
                    .and_then(|v| v["code"].as_str().map(str::to_string));
                eprintln!(
                    "[abuse] cycle {cycle}: 9th GET /v1/events answered {} {}",
                    r.status,
                    short(&r.body)
                );
                f.check(r.status == 429 && code.as_deref() == Some("rate_limited"), || {
                    format!(
                        "cycle {cycle}: a 9th stream answered {} {} (want 429 rate_limited before streaming)",
                        r.status,
                        short(&r.body)
                    )
                });
            }
            Err(e) => f.fail(format!("cycle {cycle}: 9th GET /v1/events: {e}")),
        }

        // The user's runs emit a lot.
        let slow0 = metric(addr, SLOW).await.unwrap_or(0.0);
        let flood = Instant::now();
        let mut runs = 0;
        let mut cut_at = None;
        let stopped = loop {
            if watch.blown() {
                break "RSS over twice the bound";
            }
            if runs >= 400 {
                break "400 runs";
            }
            if flood.elapsed() > Duration::from_secs(15) {
                break "15 s";
            }
            if let Err(e) = http
                .start_run(&bearer, &body, Instant::now() + Duration::from_secs(10))
                .await
            {
                f.fail(format!("cycle {cycle}: {e}"));
                break "refused";
            }
            runs += 1;
            if runs % 4 == 0 && metric(addr, SLOW).await.unwrap_or(0.0) >= slow0 + 8.0 {
                cut_at = Some(Instant::now());
                break "all 8 cut";
            }
        };
        if cut_at.is_none() && !watch.blown() {
            let (_, ok) =
                wait_metric(addr, SLOW, Duration::from_secs(5), |v| v >= slow0 + 8.0).await;
            if ok {
                cut_at = Some(Instant::now());
            }
        }
        let cut = metric(addr, SLOW).await.unwrap_or(0.0) - slow0;
        f.check(cut >= 8.0, || {
            format!("cycle {cycle}: {cut} of 8 stalled streams cut as slow consumers")
        });

        // Reset within 1 s grace + margin of the cut: seen in the kernel's TCP state, without
        // reading; then confirmed by a read that fails or ends at once.
        let since = cut_at.unwrap_or_else(Instant::now);
        let reset_bound = Duration::from_millis(1000 + 2000);
        let mut reset_after = None;
        loop {
            let gone = stalled
                .iter()
                .filter(|s| tcp_state(s) != TCP_ESTABLISHED)
                .count();
            if gone == stalled.len() {
                reset_after = Some(since.elapsed());
                break;
            }
            if since.elapsed() >= reset_bound {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut ended = 0;
        let mut open = Vec::new();
        for s in &mut stalled {
            match read_until_end(s, 2 << 20, Duration::from_secs(1)).await {
                Ok(_) => ended += 1,
                Err(e) => open.push(e),
            }
        }
        eprintln!(
            "[abuse] cycle {cycle}: {runs} runs posted in {:.2} s (stopped: {stopped}); {cut} streams cut; all reset {} after the cut; {ended}/8 ended at a read{}; server RSS +{:.1} MiB now, peak +{:.1} MiB (baseline {:.1} MiB)",
            secs(flood.elapsed()),
            reset_after.map_or("NOT within 3 s".to_string(), |d| format!("{:.2} s", secs(d))),
            open.first().map(|e| format!(" (first still open: {e})")).unwrap_or_default(),
            watch.growth_now_mib(),
            watch.peak_growth_mib(),
            watch.baseline_mib()
        );
        f.check(ended == stalled.len() && ended == 8, || {
            format!(
                "cycle {cycle}: {} of 8 stalled streams not reset within 1 s grace + 2 s of the cut: {:?}",
                8 - ended,
                open.first()
            )
        });
        drop(stalled);

        // Then a new stream gets 200.
        let (left, ok) = wait_metric(
            addr,
            "agentcast_connections",
            Duration::from_secs(10),
            |v| v == 0.0,
        )
        .await;
        f.check(ok, || {
            format!("cycle {cycle}: {left} connections still counted after the resets")
        });
        match request_head_small(addr, &sse_req, Duration::from_secs(5)).await {
            Ok((s, head, rest)) => {
                f.check(head.status == 200, || {
                    format!(
                        "cycle {cycle}: a new stream after the resets got {}",
                        head.status
                    )
                });
                let mut reader = SseReader::new(s, rest);
                match reader.next(Instant::now() + Duration::from_secs(5)).await {
                    SseNext::Block(b) => f.check(sse_fields(&b).event == Some("welcome"), || {
                        format!("cycle {cycle}: the new stream began with {b:?}")
                    }),
                    other => f.fail(format!("cycle {cycle}: the new stream: {other}")),
                }
            }
            Err(e) => f.fail(format!("cycle {cycle}: a new stream after the resets: {e}")),
        }
        wait_metric(
            addr,
            "agentcast_connections",
            Duration::from_secs(10),
            |v| v == 0.0,
        )
        .await;
        if watch.blown() {
            f.fail(format!(
                "cycle {cycle}: RSS grew {:.1} MiB (bound 64); attack stopped",
                watch.peak_growth_mib()
            ));
            break;
        }
    }
    let growth = watch.peak_growth_mib();
    eprintln!("[abuse] stalled SSE: peak RSS growth {growth:.1} MiB over 3 cycles");
    f.check(growth < 64.0, || {
        format!("stalled SSE streams: RSS grew {growth:.1} MiB (bound 64)")
    });
    f.assert_none("stalled SSE streams");
}

// ---------------------------------------------------------------------------------------------
// 3. What the server keeps of finished runs.

/// One user posts `scripted` runs of ~3,800 short think steps (a body just under 64 KiB) as
/// fast as `--max-runs-per-user 16` allows, for 20 s. Run records read their events from the
/// user's bounded replay log, so RSS must stop growing: it grows by less than 16 MiB over the
/// second 10 s (today: ~1.6 MiB per run, i.e. about 100 MiB more), and by less than 96 MiB in
/// all. The 96 is the 16 MiB log plus the working set of 16 runs in flight, each of whose
/// 64 KiB input is held parsed (~2.7 MB as a JSON value) several times over; a loaded machine
/// keeps more of them alive at once (+79 MiB was seen under load, +25 MiB on a quiet one).
/// The first run still answers `GET /v1/runs/{id}` with 200 and `truncated: true`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_records_read_their_events_from_the_bounded_replay_log() {
    let _serial = SERIAL.lock().await;
    let server = Server::start(&["--runs-per-minute", "100000"]);
    let addr = server.addr;
    let bearer = server.bearer("records");
    let mut f = Failures::default();
    let mut http = Http::new(addr);
    let mut steps = 3800;
    let body = loop {
        let body = format!(
            r#"{{"agent":"scripted","input":{{"steps":[{}]}}}}"#,
            think_steps(steps, |i| format!("t{:03}", i % 1000))
        );
        if body.len() < 65_536 {
            break body;
        }
        steps -= 10;
    };
    let watch = RssWatch::start(server.pid, 96.0);
    let t0 = Instant::now();
    let mut first = None;
    let mut runs = 0u32;
    let mut halfway = None;
    let stopped = loop {
        if watch.blown() {
            break "RSS over twice the bound";
        }
        if halfway.is_none() && t0.elapsed() >= Duration::from_secs(10) {
            halfway = Some(watch.peak_growth_mib());
        }
        if t0.elapsed() >= Duration::from_secs(20) {
            break "20 s";
        }
        match http
            .start_run(&bearer, &body, Instant::now() + Duration::from_secs(30))
            .await
        {
            Ok(id) => {
                first.get_or_insert(id);
                runs += 1;
            }
            Err(e) => {
                f.fail(e);
                break "refused";
            }
        }
    };
    let posting = t0.elapsed();
    let done = wait_runs_done(addr, Duration::from_secs(60)).await;
    f.check(done, || {
        "runs still running 60 s after the last start".into()
    });
    let growth = watch.peak_growth_mib();
    eprintln!(
        "[abuse] run records: {runs} runs of {steps} think steps ({} byte bodies) in {:.1} s (stopped: {stopped}); server RSS peak +{growth:.1} MiB, now +{:.1} MiB (baseline {:.1} MiB); {:.2} MiB per run",
        body.len(),
        secs(posting),
        watch.growth_now_mib(),
        watch.baseline_mib(),
        growth / runs.max(1) as f64
    );
    f.check(growth < 96.0, || {
        format!("{runs} runs: RSS grew {growth:.1} MiB (bound 96)")
    });
    let second_half = growth - halfway.unwrap_or(0.0);
    eprintln!("[abuse] run records: peak growth over the second 10 s: {second_half:.1} MiB");
    f.check(second_half < 16.0, || {
        format!("RSS kept growing with the runs: +{second_half:.1} MiB over the second 10 s")
    });
    let first = first.expect("no run started");
    let r = http
        .call(
            "GET",
            &format!("/v1/runs/{first}"),
            &[("Authorization", &bearer)],
            "",
        )
        .await;
    let truncated = serde_json::from_str::<Value>(&r.body)
        .ok()
        .map(|v| v["truncated"].clone());
    eprintln!(
        "[abuse] GET /v1/runs/{{first}}: {} ({} bytes), truncated {truncated:?}",
        r.status,
        r.body.len()
    );
    f.check(r.status == 200, || {
        format!("GET /v1/runs/{{first}}: {}", r.status)
    });
    f.check(truncated == Some(Value::Bool(true)), || {
        format!("GET /v1/runs/{{first}}: truncated {truncated:?}, want true")
    });
    f.assert_none("run records");
}

/// `--replay-max-bytes 4194304 --replay-user-max-bytes 4194304`: user X, with no connection,
/// leaves ~3 MiB of history; then user Y, with a reading tab, emits ~3 MiB. X's history is
/// evicted first (X resuming from 0 gets `resume_gap` after `welcome`), Y's tab loses nothing,
/// `agentcast_replay_bytes` ≤ 4194304 and `agentcast_replay_evicted_total{reason="global_bytes"}`
/// > 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_replay_budget_evicts_idle_users_first() {
    let _serial = SERIAL.lock().await;
    let server = Server::start(&[
        "--replay-max-bytes",
        "4194304",
        "--replay-user-max-bytes",
        "4194304",
        "--runs-per-minute",
        "100000",
    ]);
    let addr = server.addr;
    let mut f = Failures::default();
    let mut http = Http::new(addr);
    // Per run: agent_started (echoing the ~48 KB input), three 16 KB thinks, agent_completed:
    // ~97 KB of events; 32 runs ~3 MiB.
    let body = big_thinks_body(3, 16_000);
    const RUNS: usize = 32;
    let deadline = || Instant::now() + Duration::from_secs(30);
    let bx = server.bearer("budget-x");
    for _ in 0..RUNS {
        http.start_run(&bx, &body, deadline()).await.unwrap();
    }
    assert!(
        wait_runs_done(addr, Duration::from_secs(30)).await,
        "X's runs did not end"
    );

    let (_sink, read, welcome) = connect_tab(&server.ws_url("budget-y", "")).await;
    let first = welcome["last_seq"].as_u64().unwrap() + 1;
    let tab = tokio::spawn(read_tab(
        read,
        "Y's tab".into(),
        first,
        RUNS,
        Duration::from_secs(10),
        Duration::from_secs(60),
    ));
    let by = server.bearer("budget-y");
    for _ in 0..RUNS {
        http.start_run(&by, &body, deadline()).await.unwrap();
    }
    let y = tab.await.unwrap();
    eprintln!("[abuse] global budget: {}", y.summary());
    f.check(
        y.completed == RUNS
            && y.events == (RUNS * 5) as u64
            && y.seq_breaks == 0
            && y.close.is_none()
            && y.errors.is_empty(),
        || format!("Y's tab lost something: {}", y.summary()),
    );

    // X comes back from 0.
    let (_sx, mut rx, wx) = connect_tab(&server.ws_url("budget-x", "after_seq=0")).await;
    let mut replayed = 0;
    let outcome = loop {
        match tokio::time::timeout(
            Duration::from_secs(10),
            futures_util::StreamExt::next(&mut rx),
        )
        .await
        {
            Ok(Some(Ok(Message::Text(t)))) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                match v["type"].as_str().unwrap_or("") {
                    "heartbeat" => {}
                    "error" => break format!("error {}", v["code"]),
                    "resumed" => break format!("resumed after {replayed} replayed events: {v}"),
                    _ if v.get("seq").is_some() => replayed += 1,
                    _ => break format!("unexpected {}", short(&t)),
                }
            }
            Ok(Some(Ok(_))) => {}
            other => break format!("no answer: {other:?}"),
        }
    };
    eprintln!(
        "[abuse] global budget: X (last_seq {}) resuming from 0 got: {outcome}",
        wx["last_seq"]
    );
    f.check(outcome == "error \"resume_gap\"", || {
        format!("X's history was not evicted: resuming from 0 got {outcome}")
    });
    let bytes = metric(addr, "agentcast_replay_bytes").await;
    let evicted = metric(
        addr,
        "agentcast_replay_evicted_total{reason=\"global_bytes\"}",
    )
    .await;
    eprintln!("[abuse] global budget: agentcast_replay_bytes {bytes:?}, evicted (global_bytes) {evicted:?}");
    f.check(bytes.is_some_and(|b| b <= 4_194_304.0), || {
        format!("agentcast_replay_bytes {bytes:?}, want present and <= 4194304")
    });
    f.check(evicted.is_some_and(|e| e > 0.0), || {
        format!("agentcast_replay_evicted_total{{reason=\"global_bytes\"}} {evicted:?}, want > 0")
    });
    f.assert_none("global replay budget");
}

// ---------------------------------------------------------------------------------------------
// 4. Connect-time replay to a client that never reads.

/// A user with ~5,000 buffered events (~10 MB), then 16 upgrades with `?after_seq=0` that
/// never read (`--slow-consumer-grace-ms 1000`): all 16 are cut as slow consumers and reset,
/// the server's open fds are back to their baseline within 6 s, and its RSS grows by less than
/// 64 MiB while they hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_time_replay_to_clients_that_never_read() {
    let _serial = SERIAL.lock().await;
    let server = Server::start(&[
        "--slow-consumer-grace-ms",
        "1000",
        "--runs-per-minute",
        "100000",
    ]);
    let addr = server.addr;
    let user = "replay-hog";
    let bearer = server.bearer(user);
    let mut f = Failures::default();
    let mut http = Http::new(addr);
    // 60 thinks of 1,000 characters: 62 events and ~130 KB of them per run.
    let body = big_thinks_body(60, 1000);
    assert!(body.len() < 65_536);
    let runs = 5000usize.div_ceil(62);
    for _ in 0..runs {
        http.start_run(&bearer, &body, Instant::now() + Duration::from_secs(30))
            .await
            .unwrap();
    }
    assert!(
        wait_runs_done(addr, Duration::from_secs(30)).await,
        "runs did not end"
    );
    let slow0 = metric(addr, SLOW).await.unwrap_or(0.0);
    drop(http);
    let fds0 = server.fds();
    let watch = RssWatch::start(server.pid, 96.0);
    let path = format!("/v1/ws?token={}&after_seq=0", server.token(user));
    let mut socks = Vec::new();
    for _ in 0..16 {
        if watch.blown() {
            break;
        }
        match raw_upgrade(addr, &path, &[], true).await {
            Ok((s, 101, _)) => socks.push(s),
            Ok((_, status, _)) => f.fail(format!("upgrade answered {status}")),
            Err(e) => f.fail(e),
        }
    }
    let opened = socks.len();
    let t0 = Instant::now();
    let mut max_fds = fds0;
    let mut back_after = None;
    // (Even when RSS blew: no more connections are made, the ones made just hang.)
    while t0.elapsed() < Duration::from_secs(6) {
        let fds = server.fds();
        max_fds = max_fds.max(fds);
        if fds <= fds0 + 2 {
            back_after = Some(t0.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let fds_end = server.fds();
    let growth = watch.peak_growth_mib();
    let cut = metric(addr, SLOW).await.unwrap_or(0.0) - slow0;
    eprintln!(
        "[abuse] connect-time replay of {} events x {opened} non-reading upgrades: server RSS peak +{growth:.1} MiB (baseline {:.1} MiB); fds {fds0} before, {max_fds} at most, {fds_end} at the end; back to baseline {}; {cut} cut as slow consumers",
        runs * 62,
        watch.baseline_mib(),
        back_after.map_or("NOT within 6 s".into(), |d| format!("after {:.2} s", secs(d)))
    );
    f.check(opened == 16, || {
        format!("only {opened} of 16 upgrades made before RSS blew")
    });
    f.check(growth < 64.0, || {
        format!("{opened} non-reading replays: RSS grew {growth:.1} MiB (bound 64)")
    });
    f.check(back_after.is_some(), || {
        format!("open fds not back to {fds0} within 6 s (at {fds_end})")
    });
    f.check(cut >= opened as f64, || {
        format!("{cut} of {opened} non-reading replays cut as slow consumers")
    });
    drop(socks);
    f.assert_none("connect-time replay");
}

// ---------------------------------------------------------------------------------------------
// 5. GET /v1/runs/{id} to clients that never read.

/// One finished run with ~2.8 MB of events (`--max-frame-bytes 2097152` lets its ~1.4 MB input
/// in; `agent_started` echoes it). 300 connections with a small receive buffer each pipeline 4
/// `GET /v1/runs/{id}` and never read: RSS grows by less than 64 MiB while they hang (some
/// answers may be 429 `rate_limited`) and is back near its baseline (+32 MiB) within 5 s of
/// their closing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_inspection_to_clients_that_never_read() {
    let _serial = SERIAL.lock().await;
    let server = Server::start(&["--max-frame-bytes", "2097152"]);
    let addr = server.addr;
    let bearer = server.bearer("inspected");
    let mut f = Failures::default();
    let mut http = Http::new(addr);
    let body = big_thinks_body(14, 100_000);
    let run_id = http
        .start_run(&bearer, &body, Instant::now() + Duration::from_secs(30))
        .await
        .unwrap();
    assert!(
        wait_runs_done(addr, Duration::from_secs(30)).await,
        "the run did not end"
    );
    let path = format!("/v1/runs/{run_id}");
    let whole = http
        .call("GET", &path, &[("Authorization", &bearer)], "")
        .await;
    assert_eq!(whole.status, 200, "{}", short(&whole.body));
    drop(http);
    let req = get_request(addr, &path, &[("Authorization", &bearer)]).repeat(4);
    let watch = RssWatch::start(server.pid, 96.0);
    // In batches of 25, each given up to 1 s to be answered (bytes waiting, unread) before the
    // next: requests already sent cannot be taken back, so this bounds the overshoot when RSS
    // blows.
    let mut socks = Vec::new();
    let t0 = Instant::now();
    while socks.len() < 300 && !watch.blown() {
        for _ in 0..25 {
            let mut s = connect_small(addr).await.expect("connect");
            s.write_all(req.as_bytes())
                .await
                .expect("sending 4 requests");
            socks.push(s);
        }
        let batch = Instant::now();
        while batch.elapsed() < Duration::from_secs(1) && !watch.blown() {
            if socks[socks.len() - 25..]
                .iter()
                .all(|s| bytes_queued(s) > 0)
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let opened = socks.len();
    // Until every connection has its answer started, at most 5 s more.
    let mut answered = 0;
    let wait = Instant::now();
    while wait.elapsed() < Duration::from_secs(5) && !watch.blown() {
        answered = socks.iter().filter(|s| bytes_queued(s) > 0).count();
        if answered == opened {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    answered = answered.max(socks.iter().filter(|s| bytes_queued(s) > 0).count());
    let opening = t0.elapsed();
    let hanging = watch.peak_growth_mib();
    let (mut ok, mut limited, mut other) = (0, 0, 0);
    for s in &socks {
        let mut head = [0u8; 12];
        let n = peek_queued(s, &mut head);
        match &head[9..12] {
            b"200" if n >= 12 => ok += 1,
            b"429" if n >= 12 => limited += 1,
            _ => other += 1,
        }
    }
    drop(socks);
    let closed = Instant::now();
    let near = watch.baseline_kib + 32 * 1024;
    let mut settled_after = None;
    while closed.elapsed() < Duration::from_secs(5) {
        if server.rss_kib() <= near {
            settled_after = Some(closed.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = server.rss_kib().saturating_sub(watch.baseline_kib) as f64 / 1024.0;
    eprintln!(
        "[abuse] GET /v1/runs/{{id}} ({:.2} MB answer) x4 pipelined on {opened} non-reading connections (opened in {:.1} s): {answered} answered ({ok} 200, {limited} 429, {other} other/none); server RSS +{hanging:.1} MiB while they hang (baseline {:.1} MiB), +{after:.1} MiB after they closed ({})",
        whole.body.len() as f64 / 1e6,
        secs(opening),
        watch.baseline_mib(),
        settled_after.map_or("NOT back within 5 s".into(), |d| format!("back after {:.2} s", secs(d)))
    );
    f.check(opened == 300, || {
        format!("only {opened} of 300 connections made before RSS blew")
    });
    f.check(hanging < 64.0, || {
        format!("{opened} non-reading run inspections: RSS grew {hanging:.1} MiB (bound 64)")
    });
    f.check(settled_after.is_some(), || {
        format!("RSS still +{after:.1} MiB 5 s after the connections closed (want < 32)")
    });
    f.assert_none("run inspection");
}

// ---------------------------------------------------------------------------------------------
// 6. Fast readers.

/// Two tabs of one user reading as fast as tokio-tungstenite can receive every event of 3
/// runs of 5,000 think steps (each start_run frame just under 64 KiB), then of 16 such runs at
/// once: `seq`s contiguous from `welcome.last_seq + 1`, every run's `agent_completed`, no close
/// 4008, no error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_tabs_never_lose_events() {
    let _serial = SERIAL.lock().await;
    let mut f = Failures::default();
    let steps = think_steps(5000, |_| String::new());
    for runs in [3usize, 16] {
        let server = Server::start(&[]);
        let url = server.ws_url("fast-reader", "");
        let (mut sink1, read1, w1) = connect_tab(&url).await;
        let (_sink2, read2, w2) = connect_tab(&url).await;
        let first1 = w1["last_seq"].as_u64().unwrap() + 1;
        let first2 = w2["last_seq"].as_u64().unwrap() + 1;
        let per_run = 5002u64;
        let stall = Duration::from_secs(10);
        let overall = Duration::from_secs(120);
        let t1 = tokio::spawn(read_tab(
            read1,
            "tab 1".into(),
            first1,
            runs,
            stall,
            overall,
        ));
        let t2 = tokio::spawn(read_tab(
            read2,
            "tab 2".into(),
            first2,
            runs,
            stall,
            overall,
        ));
        let started = Instant::now();
        for i in 0..runs {
            let frame = format!(
                r#"{{"type":"start_run","request_id":"r{i}","agent":"scripted","input":{{"steps":[{steps}]}}}}"#
            );
            assert!(
                frame.len() < 65_536,
                "start_run frame of {} bytes",
                frame.len()
            );
            if let Err(e) = sink1.send(Message::text(frame)).await {
                f.fail(format!("{runs} runs: sending start_run {i}: {e}"));
                break;
            }
        }
        let r1 = t1.await.unwrap();
        let r2 = t2.await.unwrap();
        eprintln!(
            "[abuse] {runs} runs x {per_run} events, two reading tabs ({:.1} s):\n    {}\n    {}",
            secs(started.elapsed()),
            r1.summary(),
            r2.summary()
        );
        for r in [&r1, &r2] {
            f.check(
                r.close.is_none()
                    && r.stopped.is_none()
                    && r.events == runs as u64 * per_run
                    && r.seq_breaks == 0
                    && r.completed == runs
                    && r.errors.is_empty(),
                || format!("{runs} runs: {}", r.summary()),
            );
        }
        f.check(r1.acks.len() == runs, || {
            format!("{runs} runs: {} acks for {runs} start_run", r1.acks.len())
        });
    }
    f.assert_none("reading tabs");
}

// ---------------------------------------------------------------------------------------------
// 7. SSE to a fast reader.

/// What a fast SSE reader got.
#[derive(Debug, Default)]
struct SseTally {
    events: u64,
    next_id: u64,
    breaks: u64,
    first_break: Option<String>,
    resumed: bool,
    /// A heartbeat comment after everything: the stream is still open.
    heartbeat_after: bool,
    stopped: Option<String>,
}

/// Reads events with ids from `first_id`, until `want` events (and `resumed`, when
/// `expect_resumed`) then one heartbeat comment; `stall` bounds each wait.
async fn tally_sse(
    reader: &mut SseReader,
    first_id: u64,
    want: u64,
    expect_resumed: bool,
    stall: Duration,
) -> SseTally {
    let mut t = SseTally {
        next_id: first_id,
        ..Default::default()
    };
    loop {
        let done = t.events >= want && (t.resumed || !expect_resumed);
        match reader.next(Instant::now() + stall).await {
            SseNext::Block(b) => {
                let fields = sse_fields(&b);
                if fields.comment {
                    if done {
                        t.heartbeat_after = true;
                        return t;
                    }
                    continue;
                }
                if let Some(id) = fields.id {
                    let id: u64 = id.parse().unwrap_or(0);
                    t.events += 1;
                    if id != t.next_id || (t.resumed && expect_resumed) {
                        t.breaks += 1;
                        if t.first_break.is_none() {
                            t.first_break = Some(format!(
                                "expected id {} got {id} (resumed seen: {})",
                                t.next_id, t.resumed
                            ));
                        }
                    }
                    t.next_id = id + 1;
                } else if fields.event == Some("resumed") {
                    t.resumed = true;
                    if t.events < want {
                        t.breaks += 1;
                        t.first_break
                            .get_or_insert(format!("resumed after {} events", t.events));
                    }
                } else if fields.event != Some("welcome") {
                    t.stopped = Some(format!("unexpected block {}", short(&b)));
                    return t;
                }
            }
            other => {
                t.stopped = Some(other.to_string());
                return t;
            }
        }
    }
}

/// A user with 4,002 buffered events opens `GET /v1/events` with `Last-Event-ID: 0` and reads
/// fast: all 4,002 events in order, then `event: resumed`, then the stream stays open
/// (heartbeat comments). A live burst of 4,002 events to a fast-reading stream: all received,
/// stream still open. No slow-consumer close, no WARN line about one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_resume_and_live_bursts_reach_a_fast_reader() {
    let _serial = SERIAL.lock().await;
    let server = Server::start(&["--heartbeat-interval-ms", "1000"]);
    let addr = server.addr;
    let mut f = Failures::default();
    let mut http = Http::new(addr);
    let body = format!(
        r#"{{"agent":"scripted","input":{{"steps":[{}]}}}}"#,
        think_steps(4000, |_| String::new())
    );
    const EVENTS: u64 = 4002;
    let slow0 = metric(addr, SLOW).await.unwrap_or(0.0);
    let warns0 = server
        .log
        .slow_consumer_warns
        .load(std::sync::atomic::Ordering::Relaxed);

    // Resume of a buffered history.
    let resumer = server.bearer("sse-resumer");
    http.start_run(&resumer, &body, Instant::now() + Duration::from_secs(30))
        .await
        .unwrap();
    assert!(
        wait_runs_done(addr, Duration::from_secs(30)).await,
        "the run did not end"
    );
    let req = get_request(
        addr,
        "/v1/events",
        &[
            ("Authorization", &resumer),
            ("Accept", "text/event-stream"),
            ("Last-Event-ID", "0"),
        ],
    );
    let (s, head, rest) = request_head_normal(addr, &req).await;
    assert_eq!(head.status, 200);
    let mut reader = SseReader::new(s, rest);
    let t0 = Instant::now();
    let resumed = tally_sse(&mut reader, 1, EVENTS, true, Duration::from_secs(5)).await;
    eprintln!(
        "[abuse] SSE resume from 0 of {EVENTS} buffered events ({:.2} s): {resumed:?}",
        secs(t0.elapsed())
    );
    f.check(
        resumed.events == EVENTS
            && resumed.breaks == 0
            && resumed.resumed
            && resumed.heartbeat_after
            && resumed.stopped.is_none(),
        || format!("SSE resume of {EVENTS} events: {resumed:?}"),
    );
    drop(reader);

    // A live burst.
    let live = server.bearer("sse-live");
    let req = get_request(
        addr,
        "/v1/events",
        &[("Authorization", &live), ("Accept", "text/event-stream")],
    );
    let (s, head, rest) = request_head_normal(addr, &req).await;
    assert_eq!(head.status, 200);
    let mut reader = SseReader::new(s, rest);
    match reader.next(Instant::now() + Duration::from_secs(5)).await {
        SseNext::Block(b) => assert_eq!(sse_fields(&b).event, Some("welcome"), "{b}"),
        other => panic!("no welcome: {other}"),
    }
    let t0 = Instant::now();
    let (run, tally) = tokio::join!(
        http.start_run(&live, &body, Instant::now() + Duration::from_secs(30)),
        tally_sse(&mut reader, 1, EVENTS, false, Duration::from_secs(5))
    );
    run.unwrap();
    eprintln!(
        "[abuse] SSE live burst of {EVENTS} events ({:.2} s): {tally:?}",
        secs(t0.elapsed())
    );
    f.check(
        tally.events == EVENTS
            && tally.breaks == 0
            && tally.heartbeat_after
            && tally.stopped.is_none(),
        || format!("SSE live burst of {EVENTS} events: {tally:?}"),
    );
    drop(reader);

    let slow = metric(addr, SLOW).await.unwrap_or(0.0) - slow0;
    let warns = server
        .log
        .slow_consumer_warns
        .load(std::sync::atomic::Ordering::Relaxed)
        - warns0;
    eprintln!(
        "[abuse] SSE fast readers: {slow} slow-consumer closes, {warns} WARN lines about slow consumers (first: {:?})",
        server.log.first_warns().first()
    );
    f.check(slow == 0.0, || {
        format!("{slow} fast SSE readers closed as slow consumers")
    });
    f.check(warns == 0, || {
        format!("{warns} WARN lines about slow consumers in the log")
    });
    f.assert_none("SSE fast readers");
}

/// Writes `req` on a new (normal) connection and reads the response head; panics after 10 s.
async fn request_head_normal(
    addr: std::net::SocketAddr,
    req: &str,
) -> (tokio::net::TcpStream, crate::common::HttpResponse, Vec<u8>) {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(req.as_bytes()).await?;
        let head = crate::common::read_response_head(&mut s).await?;
        Ok::<_, std::io::Error>((s, head))
    };
    match tokio::time::timeout(Duration::from_secs(10), fut).await {
        Ok(Ok((s, head))) => {
            let (head, rest) = head.without_body();
            (s, head, rest)
        }
        Ok(Err(e)) => panic!("request failed: {e}"),
        Err(_) => panic!("no response head within 10 s"),
    }
}

// ---------------------------------------------------------------------------------------------
// 8. Questions (section 12) left open.

/// Users who start as many runs as they may (`--max-runs-per-user` 16), each asking a question
/// with the largest schema a question may have (8 KiB of JSON, ~200 properties: the most
/// validator per byte), in an input padded to a frame's size, and never answer. What the
/// server holds for each open question (the run's input, the schema and its compiled
/// validator, a parked future and one expiry timer) stays under 768 KiB: 8 users x 16
/// questions under 96 MiB (0.53 MiB each measured; events kept for resume held to 8 MiB here, so that they do not count), no
/// file descriptor is held for a question, and once `--interrupt-timeout-ms` passes every
/// question has expired and every run has ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn questions_nobody_answers_cost_a_bounded_amount_until_they_expire() {
    let _serial = SERIAL.lock().await;
    let server = Server::start(&[
        "--interrupt-timeout-ms",
        "12000",
        "--runs-per-minute",
        "100000",
        "--replay-max-bytes",
        "8388608",
    ]);
    let addr = server.addr;
    let mut f = Failures::default();
    let mut http = Http::new(addr);
    // A schema of many small properties: the most validator per byte of JSON.
    let mut n = 400;
    let schema = loop {
        let properties: serde_json::Map<String, Value> = (0..n)
            .map(|i| {
                (
                    format!("p{i}"),
                    serde_json::json!({"type": "string", "maxLength": i}),
                )
            })
            .collect();
        let schema = serde_json::json!({"type": "object", "properties": properties});
        if schema.to_string().len() <= 8192 {
            break schema;
        }
        n -= 5;
    };
    let pad = 64_000 - schema.to_string().len() - 200;
    let body = serde_json::json!({"agent": "scripted", "input": {"steps": [
        {"think": "x".repeat(pad)},
        {"ask": "fill this in", "schema": schema}
    ]}})
    .to_string();
    let fds_before = server.fds();
    let watch = RssWatch::start(server.pid, 96.0);
    let t0 = Instant::now();
    let mut asked = 0;
    'users: for user in 0..8 {
        let bearer = server.bearer(&format!("asker-{user}"));
        for _ in 0..16 {
            if watch.blown() {
                f.fail("RSS over twice the bound");
                break 'users;
            }
            match http
                .start_run(&bearer, &body, Instant::now() + Duration::from_secs(10))
                .await
            {
                Ok(_) => asked += 1,
                Err(e) => f.fail(e),
            }
        }
    }
    let started = t0.elapsed();
    let (asking, _) = wait_metric(
        addr,
        "agentcast_events_emitted_total{type=\"input_requested\"}",
        Duration::from_secs(10),
        |v| v >= 128.0,
    )
    .await;
    let running = metric(addr, "agentcast_runs_running").await.unwrap_or(0.0);
    let growth = watch.peak_growth_mib();
    let fds = server.fds();
    eprintln!(
        "[abuse] questions: {asked} runs started in {:.1} s, {asking} questions asked, {running} running ({} byte bodies, {n} properties); RSS peak +{growth:.1} MiB (baseline {:.1} MiB), {:.2} MiB per open question; fds {fds_before} -> {fds}",
        secs(started),
        body.len(),
        watch.baseline_mib(),
        growth / asked.max(1) as f64
    );
    f.check(running == 128.0, || {
        format!("{running} runs waiting, want 128")
    });
    f.check(growth < 96.0, || {
        format!("128 open questions: RSS grew {growth:.1} MiB (bound 96)")
    });
    f.check(fds <= fds_before + 2, || {
        format!("{asked} open questions hold fds: {fds_before} -> {fds}")
    });
    let done = wait_runs_done(addr, Duration::from_secs(30)).await;
    f.check(done, || {
        "runs still running 30 s after their questions were asked (expiry 12 s)".into()
    });
    let expired = metric(
        addr,
        "agentcast_events_emitted_total{type=\"input_received\"}",
    )
    .await
    .unwrap_or(0.0);
    eprintln!(
        "[abuse] questions: all ended {:.1} s after the first start; {expired} input_received; RSS now +{:.1} MiB",
        secs(t0.elapsed()),
        watch.growth_now_mib()
    );
    f.check(expired == 128.0, || {
        format!("{expired} questions settled, want 128 (all expired)")
    });
    f.assert_none("questions");
}

// ---------------------------------------------------------------------------------------------
// 9. A publisher (section 11) that creates all the runs it may and leaves them open.

/// One publisher creates `--max-runs-per-publisher` (here 500) runs for 500 different users,
/// fills each with the most open tool calls a run may hold (256, with 2 KB of arguments each)
/// and then goes silent. The next run is refused (429); what the server holds for them stays
/// under 128 MiB (52 MiB measured; events kept for resume held to 8 MiB here, so that they
/// do not count), no
/// file descriptor is held for a run, and after `--publish-idle-ms` every run has ended and
/// its calls were closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_publisher_holds_a_bounded_amount_until_its_runs_go_idle() {
    let _serial = SERIAL.lock().await;
    let server = Server::start(&[
        "--max-runs-per-publisher",
        "500",
        "--publish-idle-ms",
        // Longer than creating the 500 runs takes (about 35 s in a debug build), so that
        // none has gone idle when the 501st is asked for.
        "60000",
        "--runs-per-minute",
        "100000",
        "--replay-max-bytes",
        "8388608",
    ]);
    let addr = server.addr;
    let bearer = server.publisher_bearer("hostile-service");
    let mut f = Failures::default();
    let mut http = Http::new(addr);
    let args = "x".repeat(2000);
    // Taken once the harness's connection is open and the workers have served a request:
    // a per-run descriptor would show as hundreds more.
    let mut fds_before = 0;
    let watch = RssWatch::start(server.pid, 128.0);
    let t0 = Instant::now();
    let mut runs = 0;
    for u in 0..500 {
        if watch.blown() {
            f.fail("RSS over twice the bound");
            break;
        }
        let body = format!(r#"{{"user":"victim-{u}","agent":"a"}}"#);
        let r = http
            .call(
                "POST",
                "/v1/publish/runs",
                &[("Authorization", &bearer)],
                &body,
            )
            .await;
        let Some(run) = serde_json::from_str::<Value>(&r.body)
            .ok()
            .and_then(|v| v["run_id"].as_str().map(str::to_string))
        else {
            f.fail(format!("run {u}: {} {}", r.status, short(&r.body)));
            break;
        };
        let events: Vec<Value> = (1..=256)
            .map(|n| {
                serde_json::json!({"n": n, "type": "tool_executing",
                "data": {"tool_call_id": format!("c{n}"), "tool": "t", "args": {"a": args}}})
            })
            .collect();
        let batch = serde_json::json!({ "events": events }).to_string();
        let r = http
            .call(
                "POST",
                &format!("/v1/publish/runs/{run}/events"),
                &[("Authorization", &bearer)],
                &batch,
            )
            .await;
        f.check(r.status == 200, || {
            format!("run {u}'s batch: {} {}", r.status, short(&r.body))
        });
        if runs == 0 {
            fds_before = server.fds();
        }
        runs += 1;
    }
    let r = http
        .call(
            "POST",
            "/v1/publish/runs",
            &[("Authorization", &bearer)],
            r#"{"user":"one-more","agent":"a"}"#,
        )
        .await;
    f.check(r.status == 429, || {
        format!("run 501: {} {}", r.status, short(&r.body))
    });
    let growth = watch.peak_growth_mib();
    let fds = server.fds();
    eprintln!(
        "[abuse] publisher: {runs} runs x 256 open calls in {:.1} s; RSS peak +{growth:.1} MiB (baseline {:.1} MiB), {:.1} KiB per run; fds {fds_before} -> {fds}",
        secs(t0.elapsed()),
        watch.baseline_mib(),
        growth * 1024.0 / runs.max(1) as f64
    );
    f.check(growth < 128.0, || {
        format!("{runs} open runs: RSS grew {growth:.1} MiB (bound 128)")
    });
    f.check(fds <= fds_before + 4, || {
        format!("open runs hold fds: {fds_before} -> {fds}")
    });
    let done = wait_runs_done(addr, Duration::from_secs(60)).await;
    f.check(done, || {
        "runs still running 60 s after their publisher went silent (idle 8 s)".into()
    });
    let closed = metric(
        addr,
        "agentcast_events_emitted_total{type=\"tool_completed\"}",
    )
    .await
    .unwrap_or(0.0);
    eprintln!(
        "[abuse] publisher: all ended {:.1} s after the first run; {closed} calls closed",
        secs(t0.elapsed())
    );
    f.check(closed == runs as f64 * 256.0, || {
        format!("{closed} calls closed, want {}", runs * 256)
    });
    f.assert_none("publisher");
}
