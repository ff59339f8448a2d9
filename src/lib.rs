//! agentcast: streams what AI agents do, live, to the people chatting with them.
//!
//! This crate is the HTTP face (configuration, authentication, routes, the command line);
//! the actor system it serves lives in `agentcast-actors` (`actors/`). Start with
//! `README.md`; `docs/architecture.md` follows one event from an agent to a socket.

pub mod auth;
pub mod config;
pub mod frontends;
pub mod keys;
pub mod limits;
pub mod logging;
pub mod origins;
pub mod publish;
pub mod routes;
pub mod runs;
pub mod server;
pub mod socket;
pub mod stream;
pub mod web;

pub use config::Config;
pub use server::{serve, spawn, RunningServer};
