//! agentcast streams what AI agents do, live, to the people chatting with them: every event
//! of a run (`agent_started`, what it thinks, each tool call and its result, the answer,
//! `agent_completed`) reaches every connection of its user, in order, exactly once, and never
//! anyone else, over WebSocket, Server-Sent Events, or the AG-UI and AI SDK encodings.
//!
//! As a library, it is a server to which you add your own agents and tools:
//!
//! - implement [`Agent`]: an async function over its input that says what it does through its
//!   [`AgentRun`] handle (`think`, `partial`, `tool`, `ask`, `approve`); the server emits the
//!   run's start and end, whatever happens (errors, panics, timeouts, cancels);
//! - implement [`Tool`]: the agent calls it by name; it reports progress through its
//!   [`ToolCall`] handle, and runs in a supervised actor (a panic is reported, not fatal);
//! - serve them: `Server::builder(config).agent(MyAgent).tool(|| MyTool).serve()`.
//!
//! ```no_run
//! use std::sync::Arc;
//!
//! use agentcast::{async_trait, Agent, AgentError, AgentRun, Config, Server};
//! use serde_json::{json, Value};
//!
//! struct Greeter;
//!
//! #[async_trait]
//! impl Agent for Greeter {
//!     fn name(&self) -> &str {
//!         "greeter"
//!     }
//!
//!     fn description(&self) -> &str {
//!         "Greets whoever it is given."
//!     }
//!
//!     async fn run(self: Arc<Self>, run: AgentRun, input: Value) -> Result<Value, AgentError> {
//!         run.think("choosing words").await;
//!         let text = format!("Hello, {}!", input.as_str().unwrap_or("you"));
//!         run.partial(text.clone()).await;
//!         Ok(json!(text))
//!     }
//! }
//!
//! fn main() -> std::io::Result<()> {
//!     Server::builder(Config::default()).agent(Greeter).serve()
//! }
//! ```
//!
//! An agent can only ever emit to the user and run it was started for: its handle carries
//! both, and there is no other way to put an event in front of a user. `examples/weather-agent/`
//! is a complete crate built this way, and `docs/writing-agents.md` walks through it. The
//! wire protocol is `PROTOCOL.md`; the README says how to run, configure and scale it.
//!
//! The modules below the re-exports are the server's own parts, public for its tests, its
//! command line and its bench harness, and hidden from these docs: they are not an API.

#[doc(hidden)]
pub mod auth;
#[doc(hidden)]
pub mod config;
#[doc(hidden)]
pub mod frontends;
#[doc(hidden)]
pub mod keys;
#[doc(hidden)]
pub mod limits;
#[doc(hidden)]
pub mod logging;
#[doc(hidden)]
pub mod origins;
#[doc(hidden)]
pub mod publish;
#[doc(hidden)]
pub mod routes;
#[doc(hidden)]
pub mod runs;
#[doc(hidden)]
pub mod server;
#[doc(hidden)]
pub mod socket;
#[doc(hidden)]
pub mod stream;
#[doc(hidden)]
pub mod web;

pub use agentcast_actors::catalog::Toolbox;
pub use agentcast_actors::event::{ErrorBody, EventData, InterruptKind, RunStatus};
pub use agentcast_actors::{
    Agent, AgentError, AgentRun, Approval, ApprovedCall, Tool, ToolCall, ToolError,
};
/// The attribute agents and tools are written with: `#[agentcast::async_trait]`.
pub use async_trait::async_trait;
pub use config::{Config, ConfigError};
pub use server::{serve, spawn, RunningServer, Server, ServerBuilder};
