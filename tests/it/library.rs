//! agentcast as a library (issue #10): a server built with `Server::builder` and agents and
//! tools of the test's own, over real sockets: what is offered, names made at run time, an
//! agent's input check kept off the registry's thread, and a panic in it contained.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use agentcast::{async_trait, Agent, AgentError, AgentRun, Tool, ToolCall, ToolError, Toolbox};
use serde_json::{json, Value};

use crate::common::*;

/// Set by a held input check once it holds its thread, and by the test to let it go.
static HOLDING: AtomicBool = AtomicBool::new(false);
static RELEASE: AtomicBool = AtomicBool::new(false);

/// An agent whose name is made at run time, and whose input check does what it is told:
/// `{"check": "panic"}` panics, `{"check": "hold"}` blocks its thread until the test releases
/// it (20 s at most).
struct Configured {
    name: String,
}

#[async_trait]
impl Agent for Configured {
    fn name(&self) -> &str {
        &self.name
    }

    fn description(&self) -> &str {
        "made from configuration"
    }

    fn check_input(&self, input: &Value, _tools: &Toolbox) -> Result<(), String> {
        match input["check"].as_str() {
            Some("panic") => panic!("the check panicked on purpose"),
            Some("hold") => {
                HOLDING.store(true, Ordering::SeqCst);
                for _ in 0..4000 {
                    if RELEASE.load(Ordering::SeqCst) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    async fn run(self: Arc<Self>, run: AgentRun, _input: Value) -> Result<Value, AgentError> {
        let out = run
            .tool("shout", json!({"text": "hi"}))
            .await
            .map_err(|e| AgentError::failed(e.message))?;
        Ok(out)
    }
}

struct Shout;

#[async_trait]
impl Tool for Shout {
    fn name(&self) -> &str {
        "shout"
    }

    fn description(&self) -> &str {
        "upper-cases text"
    }

    async fn call(self: Arc<Self>, _call: ToolCall, args: Value) -> Result<Value, ToolError> {
        let text = args["text"]
            .as_str()
            .ok_or_else(|| ToolError::invalid_args("text"))?;
        Ok(json!(text.to_uppercase()))
    }
}

fn server() -> agentcast::RunningServer {
    agentcast::Server::builder(test_config())
        .without_builtins()
        .agent(Configured {
            name: format!("agent-{}", 7),
        })
        .tool(|| Shout)
        .spawn()
        .expect("the server starts")
}

/// Only what the builder was given is offered: the test's agent (named at run time) and tool,
/// and none of the built-ins.
#[tokio::test]
async fn the_builder_offers_what_it_was_given() {
    let server = server();
    let r = http_full(
        server.addr(),
        "GET",
        "/v1/agents",
        &[("Authorization", &bearer(&server, "alice"))],
        "",
    )
    .await;
    let v = r.json();
    let names = |key: &str| -> Vec<String> {
        v[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(names("agents"), ["agent-7"]);
    assert_eq!(names("tools"), ["shout"]);

    let mut c = Client::connect(&server, "alice").await;
    let run = c.start_run("agent-7", json!({})).await;
    let events = c.collect_run(&run).await;
    check_run(&events, &run, None);
    assert_eq!(events.last().unwrap()["data"]["result"], "HI");
    let r = c
        .request(json!({"type": "start_run", "agent": "echo", "input": "x"}))
        .await;
    assert_eq!(r["code"], "unknown_agent", "{r}");
}

/// An agent's input check is its own code: it runs on the agents' thread, so one that blocks
/// does not hold up the registry (another user connects while it blocks; were the check on
/// the registry's thread, that connect would wait for its release and time out), and a
/// panicking one refuses the start (`invalid_field`) and costs nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agents_input_check_runs_off_the_registry() {
    let server = server();
    let mut c = Client::connect(&server, "alice").await;
    let r = c
        .request(json!({"type": "start_run", "agent": "agent-7", "input": {"check": "panic"}}))
        .await;
    assert_eq!(r["code"], "invalid_field", "{r}");
    assert!(
        r["message"]
            .as_str()
            .unwrap()
            .contains("panicked on purpose"),
        "{r}"
    );

    c.send_json(json!({"type": "start_run", "agent": "agent-7", "input": {"check": "hold"}, "request_id": "slow"}))
        .await;
    while !HOLDING.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Blocks (and times out) if the registry is waiting for the check.
    let bob = Client::connect(&server, "bob").await;
    assert_eq!(bob.welcome()["user_id"], "bob");
    RELEASE.store(true, Ordering::SeqCst);
    let ack = c
        .next_matching("the slow start's ack", |f| f["request_id"] == "slow")
        .await;
    assert_eq!(frame_type(&ack), "ack", "{ack}");
    let run = ack["run_id"].as_str().unwrap().to_string();
    check_run(&c.collect_run(&run).await, &run, None);
}
