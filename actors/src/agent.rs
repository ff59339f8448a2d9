//! What an agent is, for the people who write one: the [`Agent`] trait and the [`AgentRun`]
//! handle an agent uses to show what it is doing.
//!
//! An agent is an async function over its input. Each run of it happens inside its own
//! [`AgentRunActor`](crate::run::AgentRunActor), which emits `agent_started` before the agent
//! is called and `agent_completed` after it returns, fails, panics, times out or is cancelled;
//! the agent itself only emits what happens in between. See `docs/writing-agents.md`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use serde_json::{json, Value};

use actix::Addr;

use crate::catalog::Toolbox;
use crate::emitter::Emitter;
use crate::event::{EventData, InterruptKind};
use crate::executor::Execute;
use crate::interrupt::{self, Approval, ApprovedCall, Ask};
use crate::run::AgentRunActor;
use crate::tool::ToolError;

/// Why an agent gave up: becomes `agent_completed` with status `failed` and this as `error`.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentError {
    pub code: String,
    pub message: String,
}

impl AgentError {
    /// The usual failure: code `agent_failed`.
    pub fn failed(message: impl Into<String>) -> Self {
        AgentError {
            code: "agent_failed".into(),
            message: message.into(),
        }
    }
}

#[async_trait]
pub trait Agent: Send + Sync + 'static {
    /// The name clients start it by.
    fn name(&self) -> &str;

    /// One sentence for `GET /v1/agents`.
    fn description(&self) -> &str;

    /// The shape of the input, as a JSON Schema, for `GET /v1/agents`.
    fn input_schema(&self) -> Value {
        Value::Bool(true)
    }

    /// Refuses input before a run starts; the client gets `error` `invalid_field` with the
    /// message, and no run is created. `tools` says which tools exist.
    fn check_input(&self, _input: &Value, _tools: &Toolbox) -> Result<(), String> {
        Ok(())
    }

    /// Does the work. The returned value is `agent_completed.result`.
    async fn run(self: Arc<Self>, run: AgentRun, input: Value) -> Result<Value, AgentError>;
}

/// An agent's handle on its run: emit what it thinks and says, call tools, ask its user.
pub struct AgentRun {
    emitter: Emitter,
    tools: Arc<Toolbox>,
    /// Tool calls numbered so far (approvals reserve a number too).
    numbered: AtomicU64,
    /// What goes in `agent_completed.usage`, shared with the run's actor.
    usage: Arc<RunUsage>,
    actor: Addr<AgentRunActor>,
}

/// A run's `agent_completed.usage`: the tool calls run (counted for every agent), plus what
/// the agent added with [`AgentRun::add_usage`] (e.g. a model's tokens).
#[derive(Default)]
pub(crate) struct RunUsage {
    tool_calls: AtomicU64,
    added: Mutex<BTreeMap<&'static str, u64>>,
}

impl RunUsage {
    /// `{"tool_calls": n}`, plus the agent's own counts.
    pub(crate) fn to_json(&self) -> Value {
        let mut usage = json!({ "tool_calls": self.tool_calls.load(Ordering::Relaxed) });
        // A poisoned lock only means an agent panicked mid-add: the counts are still numbers.
        let added = self.added.lock().unwrap_or_else(|p| p.into_inner());
        for (name, n) in added.iter() {
            usage[*name] = json!(n);
        }
        usage
    }
}

impl AgentRun {
    pub(crate) fn new(
        emitter: Emitter,
        tools: Arc<Toolbox>,
        usage: Arc<RunUsage>,
        actor: Addr<AgentRunActor>,
    ) -> Self {
        AgentRun {
            emitter,
            tools,
            numbered: AtomicU64::new(0),
            usage,
            actor,
        }
    }

    pub fn run_id(&self) -> &str {
        self.emitter.run_id()
    }

    pub fn user_id(&self) -> &str {
        self.emitter.user_id()
    }

    /// The server's tools, e.g. to offer them to a model.
    pub fn toolbox(&self) -> &Toolbox {
        &self.tools
    }

    /// Adds `amount` to `name` in the run's `agent_completed.usage` (a missing name starts at
    /// 0), e.g. the tokens a model reports. `tool_calls` is the server's own count and is not
    /// changed this way.
    pub fn add_usage(&self, name: &'static str, amount: u64) {
        if name == "tool_calls" {
            log::warn!(
                "run {}: an agent tried to add to usage.tool_calls",
                self.run_id()
            );
            return;
        }
        let mut added = self.usage.added.lock().unwrap_or_else(|p| p.into_inner());
        let total = added.entry(name).or_insert(0);
        *total = total.saturating_add(amount);
    }

    /// Emits `agent_thinking`.
    pub async fn think(&self, text: impl Into<String>) {
        self.emitter
            .emit(EventData::AgentThinking { text: text.into() })
            .await
    }

    /// Emits `partial_result`: a streamed piece of the answer.
    pub async fn partial(&self, text: impl Into<String>) {
        self.emitter
            .emit(EventData::PartialResult { text: text.into() })
            .await
    }

    /// Calls a tool. Its executor emits `tool_executing`, any `tool_progress` and
    /// `tool_completed`; a failing or panicking tool comes back as `Err`, and the run goes on.
    pub async fn tool(&self, name: &str, args: Value) -> Result<Value, ToolError> {
        if !self.tools.contains(name) {
            return Err(unknown_tool(name));
        }
        let call_id = self.next_call_id();
        self.call(name, call_id, args).await
    }

    /// Asks the user for input (PROTOCOL.md §12) and waits, costing nothing, until a tab
    /// answers: `input_requested`, then `input_received` when it is settled. With a JSON
    /// Schema, only an answer that fits it is taken. `Ok(None)` when no one answered before
    /// `--interrupt-timeout-ms`. Time spent waiting does not count toward the run timeout.
    /// An invalid schema is an error (code `invalid_schema`), and nothing is asked.
    pub async fn ask(
        &self,
        message: impl Into<String>,
        schema: Option<Value>,
    ) -> Result<Option<Value>, AgentError> {
        let schema = match schema {
            Some(schema) => {
                let validator = interrupt::compile(&schema).map_err(|e| AgentError {
                    code: "invalid_schema".into(),
                    message: e,
                })?;
                Some((schema, validator))
            }
            None => None,
        };
        Ok(self
            .question(Ask {
                kind: InterruptKind::Input,
                message: message.into(),
                tool_call_id: None,
                tool: None,
                args: None,
                schema,
            })
            .await)
    }

    /// Asks the user to approve a call of `tool` with `args` before it runs, and waits. An
    /// approved call may come back with the user's arguments; run it with
    /// [`call_approved`](Self::call_approved). A denied or expired one runs nothing and sends
    /// no tool events: what to do next is the agent's choice. `message` is shown to the user;
    /// without one the server words one.
    pub async fn approve(&self, tool: &str, args: Value, message: Option<String>) -> Approval {
        let call_id = self.next_call_id();
        let message = message.unwrap_or_else(|| format!("Allow the {tool} tool to run?"));
        let answer = self
            .question(Ask {
                kind: InterruptKind::Approval,
                message,
                tool_call_id: Some(call_id.clone()),
                tool: Some(tool.to_string()),
                args: Some(args.clone()),
                schema: None,
            })
            .await;
        let Some(answer) = answer else {
            return Approval::Expired;
        };
        // The run's actor took only a well-formed answer.
        match interrupt::check_approval(&answer) {
            Ok((true, new_args)) => Approval::Approved(ApprovedCall {
                tool: tool.to_string(),
                call_id,
                args: new_args.unwrap_or(args),
            }),
            Ok((false, _)) | Err(_) => Approval::Denied,
        }
    }

    /// Runs a call the user approved, under the `tool_call_id` its question named.
    pub async fn call_approved(&self, call: ApprovedCall) -> Result<Value, ToolError> {
        self.call(&call.tool, call.call_id, call.args).await
    }

    /// Sends the run's actor a question and waits for how it is settled.
    async fn question(&self, ask: Ask) -> Option<Value> {
        match self.actor.send(ask).await {
            Ok(Some((_, answer))) => answer.await.ok().flatten(),
            // The run is ending: the agent's future is about to be dropped.
            Ok(None) | Err(_) => None,
        }
    }

    fn next_call_id(&self) -> String {
        let n = self.numbered.fetch_add(1, Ordering::Relaxed) + 1;
        format!("tc_{n}")
    }

    async fn call(&self, name: &str, call_id: String, args: Value) -> Result<Value, ToolError> {
        let Some(executor) = self.tools.executor(name) else {
            return Err(unknown_tool(name));
        };
        self.usage.tool_calls.fetch_add(1, Ordering::Relaxed);
        let call = Execute {
            call_id,
            args,
            emitter: self.emitter.clone(),
        };
        match executor.send(call).await {
            Ok(result) => result,
            Err(_) => Err(ToolError::new(
                "tool_failed",
                format!("the {name} executor is not running"),
            )),
        }
    }
}

fn unknown_tool(name: &str) -> ToolError {
    ToolError::new("unknown_tool", format!("no tool named {name:?}"))
}
