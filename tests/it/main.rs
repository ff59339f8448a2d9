//! The integration tests, as one test binary: each module was its own binary before, and each
//! recompiled `common`. Run one area with a filter, e.g. `cargo test --test it sse::`.

mod common;

mod abuse;
mod auth;
mod connect;
mod docs;
mod drain;
mod faults;
mod frames;
mod frontends;
mod http_api;
mod info;
mod interrupts;
mod isolation;
mod library;
mod limits;
mod liveness;
mod llm;
mod metrics;
mod properties;
mod publish;
mod redis_bounds;
mod redis_recovery;
mod resume;
mod runs;
mod scale_out;
mod slow_consumer;
mod sse;
