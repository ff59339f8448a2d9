//! Run events (PROTOCOL.md §2) of the built-in agents (§8): envelope, payload shapes,
//! ordering, sequence numbers, and the ack-before-events rule.

use crate::common::*;
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// §2/§8 echo: agent_started{agent,input}, agent_thinking, partial_result chunks that
/// concatenate to the input, agent_completed{succeeded, result=input, error null, usage 0};
/// the ack precedes the run's first event; seqs contiguous from welcome.last_seq+1; thread_id
/// null when not given, echoed when given; every tab gets the same events; a later tab's
/// welcome.last_seq is the user's last seq.
#[tokio::test]
async fn echo_run_events_seqs_and_ack_order() {
    let server = start(test_config());
    let mut c = Client::connect(&server, "alice").await;
    let mut other_tab = Client::connect(&server, "alice").await;
    assert_eq!(c.welcome()["last_seq"], 0, "fresh user: {}", c.welcome());
    let base = c.welcome()["last_seq"].as_u64().unwrap();

    let input =
        "héllo wörld 🌍, echo me back — in pieces, please: 0123456789 abcdefghijklmnopqrstuvwxyz";
    let run = start_expect_ack_first(
        &mut c,
        "r1",
        json!({"type":"start_run","agent":"echo","input":input}),
    )
    .await;
    let events = read_only_run(&mut c, &run).await;
    check_run(&events, &run, None);

    let t = types(&events);
    assert_eq!(t[0], "agent_started", "{t:?}");
    assert_eq!(events[0]["data"], json!({"agent":"echo","input":input}));
    assert_eq!(t[1], "agent_thinking", "{t:?}");
    let n = t.len();
    assert!(n >= 4, "echo emits at least one partial_result: {t:?}");
    assert!(
        t[2..n - 1].iter().all(|x| x == "partial_result"),
        "echo order: {t:?}"
    );
    assert_eq!(t[n - 1], "agent_completed");
    let concat: String = events[2..n - 1]
        .iter()
        .map(|e| e["data"]["text"].as_str().unwrap())
        .collect();
    assert_eq!(
        concat, input,
        "partial_result chunks must concatenate to the input"
    );
    let done = &events[n - 1]["data"];
    assert_eq!(done["status"], "succeeded");
    assert_eq!(done["result"], input);
    assert!(done["error"].is_null());
    assert_eq!(done["usage"], json!({"tool_calls":0}));

    let s = seqs(&events);
    assert_eq!(s[0], base + 1, "first seq is welcome.last_seq + 1");
    assert_contiguous(&s);

    // The other tab receives the same events (no ack: it did not start the run).
    let other = read_only_run(&mut other_tab, &run).await;
    assert_eq!(other, events, "every tab receives the same events");

    // A second run with a thread_id continues the numbering and carries the thread_id.
    let run2 = start_expect_ack_first(
        &mut c,
        "r2",
        json!({"type":"start_run","agent":"echo","input":"second","thread_id":"th_1"}),
    )
    .await;
    assert_ne!(run2, run, "run ids are unique");
    let events2 = read_only_run(&mut c, &run2).await;
    check_run(&events2, &run2, Some("th_1"));
    let s2 = seqs(&events2);
    assert_eq!(s2[0], s[s.len() - 1] + 1, "numbering continues across runs");
    assert_contiguous(&s2);
    assert_eq!(events2.last().unwrap()["data"]["result"], "second");
    let other2 = read_only_run(&mut other_tab, &run2).await;
    assert_eq!(other2, events2);

    // Explicit thread_id null is the same as none.
    let run3 = start_expect_ack_first(
        &mut c,
        "r3",
        json!({"type":"start_run","agent":"echo","input":"third","thread_id":null}),
    )
    .await;
    let events3 = read_only_run(&mut c, &run3).await;
    check_run(&events3, &run3, None);
    assert_eq!(events3[0]["seq"].as_u64().unwrap(), s2[s2.len() - 1] + 1);
    let last = events3.last().unwrap()["seq"].as_u64().unwrap();

    // A tab that connects now is live from the user's last seq.
    let late = Client::connect(&server, "alice").await;
    assert_eq!(
        late.welcome()["last_seq"],
        last,
        "welcome.last_seq: {}",
        late.welcome()
    );

    // Nothing stray after the runs.
    assert!(ping_flush(&mut c, "p").await.is_empty());
}

/// §8 scripted: events follow the steps exactly; tool_executing{tool_call_id,tool,args};
/// tool_completed{…, ok:true, result, error:null, duration_ms}; calculator 2+3*4 = 14;
/// sleep reports tool_progress with non-decreasing fraction in 0..=1 between executing and
/// completed; the run's result is the last text; usage counts tool calls.
#[tokio::test]
async fn scripted_run_follows_steps() {
    let server = start(test_config());
    let mut c = Client::connect(&server, "bob").await;
    let steps = json!([
        {"think":"let me think"},
        {"text":"first text"},
        {"tool":"calculator","args":{"expr":"2+3*4"}},
        {"tool":"clock","args":{}},
        {"tool":"sleep","args":{"ms":300}},
        {"text":"the final answer"}
    ]);
    let run = start_expect_ack_first(
        &mut c,
        "s1",
        json!({"type":"start_run","agent":"scripted","input":scripted(steps.clone()),"thread_id":"conv-9"}),
    )
    .await;
    let events = read_only_run(&mut c, &run).await;
    check_run(&events, &run, Some("conv-9"));
    assert_contiguous(&seqs(&events));
    assert_eq!(events[0]["seq"], 1);

    // Remove progress events to compare against the steps, checking them on the way.
    let mut non_progress: Vec<&Value> = Vec::new();
    let mut progress: Vec<&Value> = Vec::new();
    let mut in_sleep = false;
    for ev in &events {
        match ev["type"].as_str().unwrap() {
            "tool_progress" => {
                assert!(in_sleep, "tool_progress only within the sleep call: {ev}");
                assert_eq!(ev["data"]["tool"], "sleep");
                progress.push(ev);
            }
            "tool_executing" => {
                in_sleep = ev["data"]["tool"] == "sleep";
                non_progress.push(ev);
            }
            "tool_completed" => {
                in_sleep = false;
                non_progress.push(ev);
            }
            _ => non_progress.push(ev),
        }
    }
    let t: Vec<&str> = non_progress
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        t,
        vec![
            "agent_started",
            "agent_thinking",
            "partial_result",
            "tool_executing",
            "tool_completed",
            "tool_executing",
            "tool_completed",
            "tool_executing",
            "tool_completed",
            "partial_result",
            "agent_completed"
        ],
        "events in step order"
    );
    let e = &non_progress;
    assert_eq!(
        e[0]["data"],
        json!({"agent":"scripted","input":scripted(steps)})
    );
    assert_eq!(e[1]["data"], json!({"text":"let me think"}));
    assert_eq!(e[2]["data"], json!({"text":"first text"}));

    let mut ids = std::collections::HashSet::new();
    for (i, (tool, args)) in [
        ("calculator", json!({"expr":"2+3*4"})),
        ("clock", json!({})),
        ("sleep", json!({"ms":300})),
    ]
    .iter()
    .enumerate()
    {
        let ex = e[3 + 2 * i];
        let done = e[4 + 2 * i];
        assert_eq!(ex["data"]["tool"], *tool, "{ex}");
        assert_eq!(ex["data"]["args"], *args, "{ex}");
        let id = ex["data"]["tool_call_id"].as_str().unwrap();
        assert!(
            ids.insert(id.to_string()),
            "tool_call_id must be unique within a run: {id}"
        );
        assert_eq!(done["data"]["tool_call_id"], id, "{done}");
        assert_eq!(done["data"]["tool"], *tool, "{done}");
        assert_eq!(done["data"]["ok"], true, "{done}");
        assert!(done["data"]["error"].is_null(), "{done}");
        assert!(
            !done["data"]["result"].is_null(),
            "a successful tool has a result: {done}"
        );
    }
    let calc = &e[4]["data"]["result"];
    assert_keys(calc, &["value"]);
    assert_eq!(calc["value"].as_f64(), Some(14.0), "2+3*4 = 14: {calc}");
    let sleep_done = e[8];
    assert!(
        sleep_done["data"]["duration_ms"].as_u64().unwrap() >= 295,
        "sleep 300 ms lasts ~300 ms: {sleep_done}"
    );

    assert!(
        !progress.is_empty(),
        "sleep reports tool_progress as it goes"
    );
    let sleep_id = e[7]["data"]["tool_call_id"].clone();
    let mut last_f = -1.0;
    for p in &progress {
        assert_eq!(p["data"]["tool_call_id"], sleep_id, "{p}");
        let f = p["data"]["fraction"]
            .as_f64()
            .unwrap_or_else(|| panic!("sleep knows its fraction: {p}"));
        assert!((0.0..=1.0).contains(&f), "{p}");
        assert!(f >= last_f, "fraction must not decrease: {p}");
        last_f = f;
    }

    let done = &e[10]["data"];
    assert_eq!(done["status"], "succeeded");
    assert_eq!(
        done["result"], "the final answer",
        "result is the last text"
    );
    assert!(done["error"].is_null());
    assert_eq!(done["usage"], json!({"tool_calls":3}));
    assert!(done["duration_ms"].as_u64().unwrap() >= 295, "{done}");
}

/// Calculator: a bad expression and a division by zero give tool_completed ok:false with
/// error.code invalid_args; the run goes on and succeeds.
#[tokio::test]
async fn calculator_bad_input_is_invalid_args_and_run_succeeds() {
    let server = start(test_config());
    let mut c = Client::connect(&server, "carol").await;
    let run = c
        .start_run(
            "scripted",
            scripted(json!([
                {"tool":"calculator","args":{"expr":"2+*3"}},
                {"tool":"calculator","args":{"expr":"1/0"}},
                {"tool":"calculator","args":{"expr":"(1+2)*(3+4)"}},
                {"text":"still here"}
            ])),
        )
        .await;
    let events = c.collect_run(&run).await;
    check_run(&events, &run, None);
    assert_contiguous(&seqs(&events));
    let completed: Vec<&Value> = events
        .iter()
        .filter(|e| e["type"] == "tool_completed")
        .collect();
    assert_eq!(completed.len(), 3);
    for bad in &completed[..2] {
        assert_eq!(bad["data"]["tool"], "calculator");
        assert_eq!(bad["data"]["ok"], false, "{bad}");
        assert_eq!(bad["data"]["error"]["code"], "invalid_args", "{bad}");
    }
    assert_eq!(completed[2]["data"]["ok"], true, "{}", completed[2]);
    assert_eq!(completed[2]["data"]["result"]["value"].as_f64(), Some(21.0));
    let done = &events.last().unwrap()["data"];
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["result"], "still here");
    assert_eq!(done["usage"], json!({"tool_calls":3}));
    assert!(
        events
            .iter()
            .any(|e| e["type"] == "partial_result" && e["data"]["text"] == "still here"),
        "steps after a failed tool call still run"
    );
}

/// Two runs of one user at once: both complete, their events interleave on one seq line
/// (contiguous across the connection), each run well-shaped.
#[tokio::test]
async fn concurrent_runs_share_one_seq_line() {
    let server = start(test_config());
    let mut c = Client::connect(&server, "dave").await;
    let steps = |tag: &str| {
        scripted(json!([
            {"text": format!("{tag}-1")},
            {"sleep_ms": 20},
            {"text": format!("{tag}-2")},
            {"tool":"sleep","args":{"ms":100}},
            {"text": format!("{tag}-3")}
        ]))
    };
    c.send_json(json!({"type":"start_run","agent":"scripted","input":steps("a"),"request_id":"a"}))
        .await;
    c.send_json(json!({"type":"start_run","agent":"scripted","input":steps("b"),"request_id":"b"}))
        .await;
    let mut runs: Vec<String> = Vec::new();
    let mut tags: Vec<String> = Vec::new();
    let mut all: Vec<Value> = Vec::new();
    let mut completed = 0;
    while completed < 2 {
        let f = c.next_frame().await;
        if f["type"] == "ack" {
            let run = f["run_id"].as_str().unwrap().to_string();
            assert!(
                !all.iter().any(|e| e["run_id"] == run.as_str()),
                "ack must precede the run's first event"
            );
            runs.push(run);
            tags.push(f["request_id"].as_str().unwrap().to_string());
            continue;
        }
        assert!(is_event(&f), "unexpected frame {f}");
        assert!(
            runs.iter().any(|r| f["run_id"] == r.as_str()),
            "event of a run not acked yet: {f}"
        );
        if f["type"] == "agent_completed" {
            completed += 1;
        }
        all.push(f);
    }
    assert_eq!(runs.len(), 2);
    assert_contiguous(&seqs(&all));
    assert_eq!(all[0]["seq"], 1);
    let mut sorted_tags = tags.clone();
    sorted_tags.sort();
    assert_eq!(sorted_tags, ["a", "b"], "one ack per start_run");
    for (run, tag) in runs.iter().zip(tags.iter()) {
        let evs: Vec<Value> = all
            .iter()
            .filter(|e| e["run_id"] == run.as_str())
            .cloned()
            .collect();
        check_run(&evs, run, None);
        let done = &evs.last().unwrap()["data"];
        assert_eq!(done["status"], "succeeded");
        assert_eq!(done["result"], format!("{tag}-3"));
    }
}
