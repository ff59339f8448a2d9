//! Helpers shared by the fuzz targets in `fuzz_targets/`: a client-frame encoder (for the
//! round-trip property), a JSON value builder driven by the fuzz bytes, and the built-in
//! toolbox that `scripted`'s `check_input` needs.

use std::sync::Arc;

use agentcast_actors::catalog::Toolbox;
use agentcast_actors::protocol::{ClientFrame, Command};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use serde_json::{Map, Number, Value};

/// The text a client would send for `frame` (PROTOCOL.md §4). `ClientFrame` has no
/// `Serialize`, so this is the fuzzers' own encoder, written from the protocol.
pub fn encode_frame(frame: &ClientFrame) -> String {
    let mut m = Map::new();
    if let Some(id) = &frame.request_id {
        m.insert("request_id".into(), Value::String(id.clone()));
    }
    let s = |v: &str| Value::String(v.to_string());
    match &frame.command {
        Command::Ping => {
            m.insert("type".into(), s("ping"));
        }
        Command::StartRun {
            agent,
            input,
            thread_id,
        } => {
            m.insert("type".into(), s("start_run"));
            m.insert("agent".into(), s(agent));
            m.insert("input".into(), input.clone());
            if let Some(t) = thread_id {
                m.insert("thread_id".into(), s(t));
            }
        }
        Command::CancelRun { run_id } => {
            m.insert("type".into(), s("cancel_run"));
            m.insert("run_id".into(), s(run_id));
        }
        Command::Resume { after_seq, epoch } => {
            m.insert("type".into(), s("resume"));
            m.insert("after_seq".into(), Value::from(*after_seq));
            if let Some(e) = epoch {
                m.insert("epoch".into(), s(e));
            }
        }
    }
    serde_json::to_string(&Value::Object(m)).expect("a Value always serialises")
}

thread_local! {
    // The actix system is never run: the tool executors are only registered (their start is
    // queued on the system arbiter), which is all `Toolbox::contains` looks at.
    static TOOLBOX: (actix::SystemRunner, Arc<Toolbox>) = {
        let system = actix::System::new();
        let catalog = agentcast_actors::builtin::fault_tools(agentcast_actors::builtin::catalog())
                    .start(actix::System::current().arbiter());
        (system, catalog.tools().clone())
    };
}

/// The built-in tools (`calculator`, `clock`, `sleep`, `fail`, `panic`).
pub fn with_toolbox<R>(f: impl FnOnce(&Toolbox) -> R) -> R {
    TOOLBOX.with(|(_, tools)| f(tools))
}

/// Keys and strings the JSON builder prefers: the words the parsers look for.
const WORDS: &[&str] = &[
    "steps",
    "think",
    "text",
    "tool",
    "args",
    "sleep_ms",
    "fail",
    "panic",
    "expr",
    "calculator",
    "clock",
    "sleep",
    "ms",
    "type",
    "start_run",
    "agent",
    "input",
    "request_id",
    "",
    "x",
];

/// A string: a known word most of the time, else arbitrary text.
pub fn string(u: &mut Unstructured) -> Result<String> {
    if u.ratio(3, 4)? {
        Ok((*u.choose(WORDS)?).to_string())
    } else {
        u.arbitrary()
    }
}

/// A JSON number: an integer of either sign, or a finite float.
pub fn number(u: &mut Unstructured) -> Result<Value> {
    Ok(match u.int_in_range(0..=3)? {
        0 => Value::from(u.int_in_range(0u64..=10)?),
        1 => Value::from(u.arbitrary::<u64>()?),
        2 => Value::from(u.arbitrary::<i64>()?),
        _ => Number::from_f64(u.arbitrary()?).map_or(Value::Null, Value::Number),
    })
}

/// Any JSON value, at most `depth` levels of arrays and objects deep.
pub fn value(u: &mut Unstructured, depth: u32) -> Result<Value> {
    let top = if depth == 0 { 4 } else { 6 };
    Ok(match u.int_in_range(0..=top)? {
        0 => Value::Null,
        1 => Value::Bool(u.arbitrary()?),
        2 => number(u)?,
        3 | 4 => Value::String(string(u)?),
        5 => {
            let n = u.int_in_range(0..=6)?;
            Value::Array((0..n).map(|_| value(u, depth - 1)).collect::<Result<_>>()?)
        }
        _ => object(u, depth - 1)?,
    })
}

/// A JSON object of up to six entries.
pub fn object(u: &mut Unstructured, depth: u32) -> Result<Value> {
    let mut m = Map::new();
    for _ in 0..u.int_in_range(0..=6)? {
        m.insert(string(u)?, value(u, depth)?);
    }
    Ok(Value::Object(m))
}

/// Whether serde_json reads back every float it writes. It does only with its
/// `float_roundtrip` feature, which this project does not enable: without it "5.5e-307" reads
/// as 5.4999999999999996e-307 (fuzz/README.md, finding 1). Checked at run time so the targets
/// turn strict by themselves once the feature is on.
pub fn floats_round_trip() -> bool {
    serde_json::from_str::<f64>("5.5e-307").ok() == "5.5e-307".parse::<f64>().ok()
}

/// `a == b`, except that while serde_json's floats do not round-trip, two floats one unit in
/// the last place apart count as the same.
pub fn same_json(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y))
            if x.is_f64() && y.is_f64() && !floats_round_trip() =>
        {
            let (x, y) = (
                x.as_f64().unwrap_or(f64::NAN),
                y.as_f64().unwrap_or(f64::NAN),
            );
            x == y || ulps_apart(x, y) <= 1
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_json(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same_json(v, w)))
        }
        _ => a == b,
    }
}

fn ulps_apart(x: f64, y: f64) -> u64 {
    // Maps floats to integers in the same order, so neighbours differ by one.
    let key = |f: f64| {
        let b = f.to_bits() as i64;
        if b < 0 {
            i64::MIN - b
        } else {
            b
        }
    };
    key(x).abs_diff(key(y))
}

/// The same frame, up to [`same_json`] in a `start_run`'s input.
pub fn same_frame(a: &ClientFrame, b: &ClientFrame) -> bool {
    match (&a.command, &b.command) {
        (
            Command::StartRun {
                agent,
                input,
                thread_id,
            },
            Command::StartRun {
                agent: agent2,
                input: input2,
                thread_id: thread_id2,
            },
        ) => {
            a.request_id == b.request_id
                && agent == agent2
                && thread_id == thread_id2
                && same_json(input, input2)
        }
        _ => a == b,
    }
}
