//! agentcast's actor system: everything between an agent doing something and a WebSocket
//! frame leaving for the user's tabs.
//!
//! - [`registry::ConnectionRegistry`] sequences, keeps and routes run events per user, with
//!   its event log in the process or, with `--redis-url`, on Redis ([`redis`]).
//! - [`session::Session`] is one WebSocket connection.
//! - [`run::AgentRunActor`] is one run of an [`agent::Agent`]; tools run in supervised
//!   [`executor::ToolExecutor`]s.
//! - [`router::Router`] is the seam the edges use to reach routing and replay.
//!
//! `docs/architecture.md` follows one event through all of them.
//!
//! This crate is agentcast's inside: an agent's author uses the `agentcast` crate, which
//! re-exports what writing agents and tools takes. What could put an event in front of a user
//! (the emitter, run actors, ledgers) is private to this crate: only a run's own handle,
//! bound to its user and run, emits.

pub mod agent;
pub mod agents;
pub mod builtin;
pub mod catalog;
pub(crate) mod emitter;
pub mod event;
pub(crate) mod executor;
pub mod frame_limit;
pub mod frontends;
pub mod ids;
pub(crate) mod interrupt;
pub(crate) mod ledger;
pub mod metrics;
mod panic;
pub mod protocol;
pub mod publish;
pub mod published_run;
pub mod rate;
pub mod redis;
pub mod registry;
pub mod replay;
pub mod router;
pub(crate) mod run;
pub mod session;
pub mod sse;
pub mod tool;
pub mod tools;

pub use agent::{Agent, AgentError, AgentRun};
pub use interrupt::{Approval, ApprovedCall};
pub use tool::{Tool, ToolCall, ToolError};

/// `docs/writing-agents.md`, compiled and run as a doc test so its example stays true.
#[cfg(doctest)]
#[doc = include_str!("../../docs/writing-agents.md")]
pub struct WritingAgentsGuide;
