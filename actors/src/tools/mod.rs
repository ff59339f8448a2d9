//! The built-in tools. A new tool is one file here and one line in `builtin.rs`.

pub mod calculator;
pub mod clock;
pub mod fault;
pub mod sleep;
