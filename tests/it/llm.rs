//! The `llm` agent (PROTOCOL.md §14) against a fake OpenAI-compatible server on 127.0.0.1
//! (`llm/fake_model.rs`), each through a real agentcast server and a real WebSocket: the wire
//! format's shapes, the tool loop, usage, the errors that end a run, cancel, max steps, the
//! input forms, the API key, and approvals (`--llm-approve-tools`, §12).

mod fake_model;

use fake_model::*;
use serde_json::{json, Value};

use crate::common::*;

fn llm_config(fake: &FakeModel) -> agentcast::Config {
    agentcast::Config {
        llm_base_url: Some(fake.base_url.clone()),
        llm_model: Some("fake-model".into()),
        ..test_config()
    }
}

/// Starts an `llm` run of `input` as alice and returns all its events.
async fn run_llm(server: &agentcast::RunningServer, input: Value) -> Vec<Value> {
    let mut c = Client::connect(server, "alice").await;
    let run = c.start_run("llm", input).await;
    c.collect_run(&run).await
}

fn of_type<'a>(events: &'a [Value], ty: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["type"] == ty).collect()
}

fn completed(events: &[Value]) -> &Value {
    let last = events.last().expect("a run has events");
    assert_eq!(last["type"], "agent_completed", "{events:#?}");
    &last["data"]
}

/// The run failed with `llm_error`; returns its message.
fn llm_error(events: &[Value]) -> String {
    let done = completed(events);
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error"]["code"], "llm_error", "{done}");
    done["error"]["message"]
        .as_str()
        .expect("a message")
        .to_string()
}

/// Text only, with `content` null in the first delta and "" later: partial_result per piece,
/// result the text; the request is a streaming Chat Completions request with usage asked for,
/// the user's message, and the server's tools with their schemas (fault tools left out). No
/// usage chunk: the token counts are 0.
#[tokio::test]
async fn text_only() {
    let fake = FakeModel::start(vec![Reply::Stream(vec![
        role(Value::Null),
        text("Hel"),
        text(""),
        text("lo"),
        finish("stop"),
        DONE.into(),
    ])])
    .await;
    let server = start(llm_config(&fake));
    let events = run_llm(&server, json!("hi")).await;
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        [
            "agent_started",
            "partial_result",
            "partial_result",
            "agent_completed"
        ]
    );
    assert_eq!(events[1]["data"]["text"], "Hel");
    assert_eq!(events[2]["data"]["text"], "lo");
    let done = completed(&events);
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["result"], "Hello");
    assert_eq!(
        done["usage"],
        json!({"tool_calls": 0, "prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0})
    );

    let requests = fake.requests();
    assert_eq!(requests.len(), 1);
    let r = &requests[0];
    assert_eq!(
        (r.method.as_str(), r.path.as_str()),
        ("POST", "/v1/chat/completions")
    );
    assert_eq!(r.authorization, None, "no key configured, no Authorization");
    assert_eq!(r.body["model"], "fake-model");
    assert_eq!(r.body["stream"], true);
    assert_eq!(r.body["stream_options"], json!({"include_usage": true}));
    assert_eq!(
        r.body["messages"],
        json!([{"role": "user", "content": "hi"}])
    );
    let tools = r.body["tools"].as_array().expect("tools");
    let names: Vec<&str> = tools
        .iter()
        .map(|t| {
            assert_eq!(t["type"], "function", "{t}");
            t["function"]["name"].as_str().unwrap()
        })
        .collect();
    assert_eq!(
        names,
        ["calculator", "clock", "sleep"],
        "every tool but the fault ones"
    );
    let calculator = &tools[0]["function"];
    assert!(calculator["description"]
        .as_str()
        .is_some_and(|d| !d.is_empty()));
    assert_eq!(
        calculator["parameters"]["properties"]["expr"]["type"], "string",
        "{calculator}"
    );
}

/// `delta.reasoning_content` and `delta.reasoning` both become agent_thinking, in order with
/// the text.
#[tokio::test]
async fn both_reasoning_fields() {
    let fake = FakeModel::start(vec![answer(
        vec![
            reasoning_content("first, "),
            reasoning("then"),
            text("answer"),
        ],
        "stop",
        (1, 2),
    )])
    .await;
    let server = start(llm_config(&fake));
    let events = run_llm(&server, json!("think")).await;
    let shown: Vec<(String, String)> = events[1..events.len() - 1]
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap().to_string(),
                e["data"]["text"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        shown,
        [
            ("agent_thinking".into(), "first, ".into()),
            ("agent_thinking".into(), "then".into()),
            ("partial_result".into(), "answer".to_string()),
        ]
    );
    assert_eq!(completed(&events)["result"], "answer");
}

/// Two parallel calls whose fragments interleave over many chunks: each runs through the tool
/// actors (tool_executing / tool_completed), the results go back as `tool` messages with the
/// model's ids after the assistant message carrying the calls, and a second model call gives
/// the answer. The usage chunks of both calls are added up.
#[tokio::test]
async fn parallel_tool_calls_and_usage() {
    let fake = FakeModel::start(vec![
        answer(
            vec![
                call_start(0, "call_a", "calculator"),
                call_start(1, "call_b", "clock"),
                call_args(0, "{\"ex"),
                call_args(1, "{"),
                call_args(0, "pr\": \"6"),
                call_args(0, "*7\"}"),
                call_args(1, "}"),
            ],
            "tool_calls",
            (10, 5),
        ),
        answer(vec![text("It is 42.")], "stop", (20, 3)),
    ])
    .await;
    let server = start(llm_config(&fake));
    let events = run_llm(&server, json!("6*7 and the time?")).await;
    let executing = of_type(&events, "tool_executing");
    let finished = of_type(&events, "tool_completed");
    assert_eq!(executing.len(), 2, "{events:#?}");
    assert_eq!(finished.len(), 2, "{events:#?}");
    let calc = executing
        .iter()
        .find(|e| e["data"]["tool"] == "calculator")
        .expect("a calculator call");
    assert_eq!(calc["data"]["args"], json!({"expr": "6*7"}));
    assert!(executing.iter().any(|e| e["data"]["tool"] == "clock"));
    for e in &executing {
        let id = &e["data"]["tool_call_id"];
        let done = finished
            .iter()
            .find(|f| &f["data"]["tool_call_id"] == id)
            .unwrap_or_else(|| panic!("no tool_completed for {id}"));
        assert_eq!(done["data"]["ok"], true, "{done}");
    }
    let done = completed(&events);
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["result"], "It is 42.");
    assert_eq!(
        done["usage"],
        json!({"tool_calls": 2, "prompt_tokens": 30, "completion_tokens": 8, "total_tokens": 38})
    );

    let requests = fake.requests();
    assert_eq!(requests.len(), 2);
    let messages = requests[1].body["messages"]
        .as_array()
        .expect("messages")
        .clone();
    assert_eq!(messages.len(), 4, "{messages:#?}");
    assert_eq!(
        messages[0],
        json!({"role": "user", "content": "6*7 and the time?"})
    );
    assert_eq!(messages[1]["role"], "assistant");
    assert_eq!(
        messages[1]["tool_calls"],
        json!([
            {"id": "call_a", "type": "function", "function": {"name": "calculator", "arguments": "{\"expr\": \"6*7\"}"}},
            {"id": "call_b", "type": "function", "function": {"name": "clock", "arguments": "{}"}},
        ])
    );
    assert_eq!(messages[2]["role"], "tool");
    assert_eq!(messages[2]["tool_call_id"], "call_a");
    let calc_result: Value = serde_json::from_str(
        messages[2]["content"]
            .as_str()
            .expect("content is a string"),
    )
    .expect("the calculator's result as JSON");
    assert_eq!(calc_result["value"].as_f64(), Some(42.0), "{calc_result}");
    assert_eq!(messages[3]["role"], "tool");
    assert_eq!(messages[3]["tool_call_id"], "call_b");
}

/// An unknown tool, a tool not offered (a fault tool), arguments that are not JSON, and a
/// tool that fails all go back to the model as errors; only the call that ran has tool
/// events, and the run goes on to the model's answer.
#[tokio::test]
async fn tool_trouble_goes_back_to_the_model() {
    let fake = FakeModel::start(vec![
        answer(
            vec![
                call_start(0, "c_unknown", "no_such_tool"),
                call_args(0, "{}"),
                call_start(1, "c_fault", "fail"),
                call_args(1, "{}"),
                call_start(2, "c_notjson", "calculator"),
                call_args(2, "{\"expr\": 1+"),
                call_start(3, "c_fails", "calculator"),
                call_args(3, "{\"expr\": \"1/\"}"),
            ],
            "tool_calls",
            (1, 1),
        ),
        answer(vec![text("sorry")], "stop", (1, 1)),
    ])
    .await;
    let server = start(llm_config(&fake));
    let events = run_llm(&server, json!("break things")).await;
    let executing = of_type(&events, "tool_executing");
    assert_eq!(
        executing.len(),
        1,
        "only the well-formed call runs: {events:#?}"
    );
    assert_eq!(executing[0]["data"]["args"], json!({"expr": "1/"}));
    let failed = of_type(&events, "tool_completed");
    assert_eq!(failed[0]["data"]["ok"], false);
    let done = completed(&events);
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["result"], "sorry");
    assert_eq!(done["usage"]["tool_calls"], 1);

    let requests = fake.requests();
    assert_eq!(requests.len(), 2, "the run went on to a second model call");
    let messages = requests[1].body["messages"].as_array().unwrap().clone();
    let result_of = |id: &str| -> Value {
        let m = messages
            .iter()
            .find(|m| m["tool_call_id"] == id)
            .unwrap_or_else(|| panic!("no tool message for {id}: {messages:#?}"));
        assert_eq!(m["role"], "tool");
        serde_json::from_str(m["content"].as_str().unwrap()).expect("an error as JSON")
    };
    assert_eq!(result_of("c_unknown")["error"]["code"], "unknown_tool");
    assert_eq!(result_of("c_fault")["error"]["code"], "unknown_tool");
    let not_json = result_of("c_notjson");
    assert_eq!(not_json["error"]["code"], "invalid_args");
    assert!(not_json["error"]["message"]
        .as_str()
        .unwrap()
        .contains("not JSON"));
    assert_eq!(
        result_of("c_fails")["error"]["code"],
        failed[0]["data"]["error"]["code"]
    );
}

/// HTTP 500: failed, `llm_error`, the message names the status (and quotes the body).
#[tokio::test]
async fn http_error() {
    let fake = FakeModel::start(vec![Reply::Status(
        500,
        r#"{"error":{"message":"model exploded"}}"#.into(),
    )])
    .await;
    let server = start(llm_config(&fake));
    let events = run_llm(&server, json!("hi")).await;
    let message = llm_error(&events);
    assert!(message.contains("HTTP 500"), "{message}");
    assert!(message.contains("model exploded"), "{message}");
}

/// A chunk that is not JSON ends the run `llm_error` after what came before it.
#[tokio::test]
async fn malformed_chunk() {
    let fake = FakeModel::start(vec![Reply::Stream(vec![
        role(json!("")),
        text("so far"),
        "{\"choices\": [{\"delta\": ".into(),
        finish("stop"),
        DONE.into(),
    ])])
    .await;
    let server = start(llm_config(&fake));
    let events = run_llm(&server, json!("hi")).await;
    assert_eq!(of_type(&events, "partial_result").len(), 1);
    let message = llm_error(&events);
    assert!(message.contains("malformed chunk"), "{message}");
}

/// A stream that ends without a finish_reason, with or without `[DONE]`, is `llm_error`.
#[tokio::test]
async fn stream_cut_without_finish_reason() {
    let fake = FakeModel::start(vec![
        Reply::Stream(vec![role(Value::Null), text("half an ans")]),
        Reply::Stream(vec![role(Value::Null), text("half"), DONE.into()]),
    ])
    .await;
    let server = start(llm_config(&fake));
    for _ in 0..2 {
        let events = run_llm(&server, json!("hi")).await;
        assert_eq!(of_type(&events, "partial_result").len(), 1);
        let message = llm_error(&events);
        assert!(message.contains("without a finish_reason"), "{message}");
    }
}

/// A stream that ends at its `finish_reason` without `[DONE]` (some servers do) is fine.
#[tokio::test]
async fn finish_without_done() {
    let fake = FakeModel::start(vec![Reply::Stream(vec![
        role(Value::Null),
        text("ok"),
        finish("length"),
    ])])
    .await;
    let server = start(llm_config(&fake));
    let events = run_llm(&server, json!("hi")).await;
    let done = completed(&events);
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["result"], "ok");
}

/// Nothing listens at the base URL: `llm_error` saying the server cannot be reached.
#[tokio::test]
async fn refused_connection() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let config = agentcast::Config {
        llm_base_url: Some(format!("http://127.0.0.1:{port}/v1")),
        llm_model: Some("m".into()),
        ..test_config()
    };
    let server = start(config);
    let events = run_llm(&server, json!("hi")).await;
    let message = llm_error(&events);
    assert!(
        message.contains("cannot reach the model server"),
        "{message}"
    );
    assert!(message.to_lowercase().contains("refused"), "{message}");
}

/// Cancelling a run whose model is still streaming closes the model's connection: the fake
/// sees the close (it waits on nothing else).
#[tokio::test]
async fn cancel_closes_the_model_connection() {
    let mut fake = FakeModel::start(vec![Reply::StreamThenHang(vec![
        role(Value::Null),
        text("slowly"),
    ])])
    .await;
    let server = start(llm_config(&fake));
    let mut c = Client::connect(&server, "alice").await;
    let run = c.start_run("llm", json!("take your time")).await;
    let partial = c.next_of_type("partial_result").await;
    assert_eq!(partial["data"]["text"], "slowly");
    let ack = c
        .request(json!({"type": "cancel_run", "run_id": run}))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let events = c.collect_run(&run).await;
    assert_eq!(completed(&events)["status"], "cancelled");
    assert_eq!(fake.wait_closed().await, 0);
}

/// A model that stops sending without finishing fails the run after `--llm-idle-timeout-ms`,
/// and its connection is closed.
#[tokio::test]
async fn idle_model_times_out() {
    let mut fake = FakeModel::start(vec![Reply::StreamThenHang(vec![
        role(Value::Null),
        text("a"),
    ])])
    .await;
    let server = start(agentcast::Config {
        llm_idle_timeout_ms: 300,
        ..llm_config(&fake)
    });
    let events = run_llm(&server, json!("hi")).await;
    let message = llm_error(&events);
    assert!(message.contains("sent nothing for 300 ms"), "{message}");
    assert_eq!(fake.wait_closed().await, 0);
}

/// An endless line is cut at the line bound: `llm_error`, not memory (the bound on a whole
/// response is unit-tested in the agent's client).
#[tokio::test]
async fn endless_line_is_bounded() {
    let huge = "x".repeat(agentcast_actors::agents::llm::MAX_LINE_BYTES + 1);
    let fake = FakeModel::start(vec![Reply::Stream(vec![role(Value::Null), huge])]).await;
    let server = start(llm_config(&fake));
    let events = run_llm(&server, json!("hi")).await;
    let message = llm_error(&events);
    assert!(message.contains("a line longer than"), "{message}");
}

/// `--llm-max-steps 2`: two model calls at most, although the model keeps asking for tools;
/// the second call's tools are not run (no model call is left to read their results).
#[tokio::test]
async fn max_steps() {
    let again = || {
        answer(
            vec![
                text("checking"),
                call_start(0, "c", "clock"),
                call_args(0, "{}"),
            ],
            "tool_calls",
            (1, 1),
        )
    };
    let fake = FakeModel::start(vec![again(), again(), again()]).await;
    let server = start(agentcast::Config {
        llm_max_steps: 2,
        ..llm_config(&fake)
    });
    let events = run_llm(&server, json!("loop forever")).await;
    assert_eq!(fake.requests().len(), 2);
    assert_eq!(of_type(&events, "tool_executing").len(), 1);
    let done = completed(&events);
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["result"], "checking");
    assert_eq!(done["usage"]["prompt_tokens"], 2);
}

/// The object form: `system` first, then the messages as given. Other inputs are refused at
/// `start_run` with `invalid_field`, and no run is made.
#[tokio::test]
async fn both_input_forms() {
    let fake = FakeModel::start(vec![answer(vec![text("4")], "stop", (1, 1))]).await;
    let server = start(llm_config(&fake));
    let messages = json!([
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "Let me think."},
        {"role": "user", "content": "Well?"},
    ]);
    let events = run_llm(
        &server,
        json!({"system": "Be brief.", "messages": messages}),
    )
    .await;
    assert_eq!(completed(&events)["result"], "4");
    let sent = &fake.requests()[0].body["messages"];
    let mut want = vec![json!({"role": "system", "content": "Be brief."})];
    want.extend(messages.as_array().unwrap().iter().cloned());
    assert_eq!(sent, &json!(want));

    let mut c = Client::connect(&server, "alice").await;
    for bad in [json!(42), json!({"messages": []}), json!({"prompt": "hi"})] {
        let reply = c
            .request(json!({"type": "start_run", "agent": "llm", "input": bad}))
            .await;
        assert_eq!(reply["type"], "error", "{bad}: {reply}");
        assert_eq!(reply["code"], "invalid_field", "{reply}");
        assert!(
            reply["message"].as_str().unwrap().contains("messages"),
            "{reply}"
        );
    }
    assert_eq!(fake.requests().len(), 1, "no model call for refused input");
}

/// `llm` is offered only with `--llm-base-url`.
#[tokio::test]
async fn listed_only_when_configured() {
    let fake = FakeModel::start(vec![]).await;
    for (config, listed) in [(test_config(), false), (llm_config(&fake), true)] {
        let server = start(config);
        let auth = bearer(&server, "alice");
        let r = http_full(
            server.addr(),
            "GET",
            "/v1/agents",
            &[("authorization", &auth)],
            "",
        )
        .await;
        assert_eq!(r.status, 200);
        let body: Value = serde_json::from_str(&r.body).unwrap();
        let has = body["agents"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["name"] == "llm");
        assert_eq!(has, listed, "{body}");
    }
}

/// `--llm-approve-tools calculator`: the user is asked first. Approved (with edited
/// arguments), the call runs with the user's arguments; denied, nothing runs and the model is
/// told the user denied it.
#[tokio::test]
async fn approve_tools() {
    let call = || {
        answer(
            vec![
                call_start(0, "c1", "calculator"),
                call_args(0, "{\"expr\":\"1+1\"}"),
            ],
            "tool_calls",
            (1, 1),
        )
    };
    let fake = FakeModel::start(vec![
        call(),
        answer(vec![text("approved")], "stop", (1, 1)),
        call(),
        answer(vec![text("denied")], "stop", (1, 1)),
    ])
    .await;
    let server = start(agentcast::Config {
        llm_approve_tools: vec!["calculator".into()],
        ..llm_config(&fake)
    });
    let mut c = Client::connect(&server, "alice").await;
    for (response, result) in [
        (
            json!({"approved": true, "args": {"expr": "2+2"}}),
            "approved",
        ),
        (json!({"approved": false}), "denied"),
    ] {
        let run = c.start_run("llm", json!("add")).await;
        let asked = c.next_of_type("input_requested").await;
        assert_eq!(asked["data"]["kind"], "approval", "{asked}");
        assert_eq!(asked["data"]["tool"], "calculator");
        assert_eq!(asked["data"]["args"], json!({"expr": "1+1"}));
        let ack = c
            .request(json!({"type": "respond", "run_id": run,
                "interrupt_id": asked["data"]["interrupt_id"], "response": response}))
            .await;
        assert_eq!(ack["type"], "ack", "{ack}");
        let events = c.collect_run(&run).await;
        assert_eq!(completed(&events)["result"], result);
        let executing = of_type(&events, "tool_executing");
        let messages = fake.requests().last().unwrap().body["messages"].clone();
        let content = messages[2]["content"].as_str().unwrap().to_string();
        assert_eq!(messages[2]["tool_call_id"], "c1");
        if result == "approved" {
            assert_eq!(executing.len(), 1);
            assert_eq!(executing[0]["data"]["args"], json!({"expr": "2+2"}));
            assert_eq!(
                executing[0]["data"]["tool_call_id"],
                asked["data"]["tool_call_id"]
            );
            let value: Value = serde_json::from_str(&content).unwrap();
            assert_eq!(value["value"].as_f64(), Some(4.0), "{content}");
        } else {
            assert!(executing.is_empty(), "{events:#?}");
            assert!(of_type(&events, "tool_completed").is_empty());
            assert!(content.contains("denied"), "{content}");
        }
    }
}

/// The API key goes to the model server as a bearer token, and appears in no log line (at
/// trace level) and no event, even when the model server echoes it in an error.
#[tokio::test]
async fn api_key_never_logged() {
    const KEY: &str = "sk-test-0123456789-very-secret";
    let fake = FakeModel::start(vec![
        answer(vec![text("hello")], "stop", (1, 1)),
        Reply::Status(401, format!(r#"{{"error":{{"message":"bad key {KEY}"}}}}"#)),
    ])
    .await;
    let mut cmd = serve_command(&[
        "--jwt-secret",
        SECRET,
        "--llm-base-url",
        &fake.base_url,
        "--llm-model",
        "fake-model",
    ]);
    cmd.env("AGENTCAST_LLM_API_KEY", KEY)
        .env("RUST_LOG", "trace");
    let child = ServeChild::spawn(cmd).await;
    let token = sign_claims(SECRET, &json!({"sub": "alice", "exp": now_unix() + 600}));
    let mut c =
        Client::connect_to(&format!("ws://{}/v1/ws", child.addr), &token, "alice", "").await;
    let first = c.start_run("llm", json!("hi")).await;
    let ok = c.collect_run(&first).await;
    assert_eq!(completed(&ok)["status"], "succeeded");
    let second = c.start_run("llm", json!("hi")).await;
    let failed = c.collect_run(&second).await;
    let message = llm_error(&failed);
    assert!(
        message.contains("HTTP 401") && message.contains("[hidden]"),
        "{message}"
    );

    let requests = fake.requests();
    assert_eq!(
        requests[0].authorization.as_deref(),
        Some(format!("Bearer {KEY}").as_str())
    );
    for e in ok.iter().chain(&failed) {
        assert!(!e.to_string().contains(KEY), "an event holds the key: {e}");
    }
    let lines = child.lines();
    assert!(
        lines.iter().any(|l| l.contains("agent llm")),
        "the log is captured: {lines:#?}"
    );
    for line in &lines {
        assert!(!line.contains(KEY), "a log line holds the key: {line}");
    }
}

/// https is spoken (rustls): against the fake, which speaks plain HTTP, the TLS handshake
/// fails and says so; it is not refused as unsupported.
#[tokio::test]
async fn https_is_spoken() {
    let fake = FakeModel::start(vec![]).await;
    let base = fake.base_url.replace("http://", "https://");
    let server = start(agentcast::Config {
        llm_base_url: Some(base),
        ..llm_config(&fake)
    });
    let events = run_llm(&server, json!("hi")).await;
    let message = llm_error(&events);
    assert!(
        message.contains("cannot reach the model server"),
        "{message}"
    );
    assert!(!message.contains("SSL is not supported"), "{message}");
}
