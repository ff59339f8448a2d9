//! The built-in agents. A new agent is one file here and one line in `builtin.rs`.

pub mod echo;
pub mod llm;
pub mod scripted;
