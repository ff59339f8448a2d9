//! The `scripted` agent's input: `parse`, reached the way the server does through the agent's
//! `check_input` (with the built-in toolbox), on any JSON value.
//!
//! Input: first byte even, the rest is JSON text (so seeds are readable scripts); odd, the
//! rest drives a JSON builder biased towards scripts (keys `steps`, `think`, `tool`, ...).
//!
//! Checks, beyond "no panic":
//! - `check_input` refuses with `parse`'s own message whenever `parse` refuses;
//! - when `parse` accepts, there is one step per element of `steps`, each step holds what its
//!   object said, and `check_input` accepts exactly when every tool step names a built-in tool
//!   (its refusal naming the first unknown one).
#![no_main]

use agentcast_actors::agents::scripted::{parse, Scripted, Step};
use agentcast_actors::Agent;
use agentcast_fuzz::{number, object, string, value, with_toolbox};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Map, Value};

/// `{"steps":[...]}`, mostly made of step-like objects, sometimes with noise.
fn script(u: &mut Unstructured) -> Result<Value> {
    if u.ratio(1, 8)? {
        return value(u, 4);
    }
    let n = u.int_in_range(0..=8)?;
    let mut steps = Vec::new();
    for _ in 0..n {
        steps.push(if u.ratio(1, 8)? {
            value(u, 2)?
        } else {
            step(u)?
        });
    }
    let mut top = match object(u, 1)? {
        Value::Object(m) if u.ratio(1, 4)? => m,
        _ => Map::new(),
    };
    top.insert("steps".into(), Value::Array(steps));
    Ok(Value::Object(top))
}

fn step(u: &mut Unstructured) -> Result<Value> {
    let mut m = Map::new();
    for _ in 0..u.int_in_range(1..=3)? {
        let key = string(u)?;
        let v = match key.as_str() {
            "tool" if u.ratio(3, 4)? => Value::String(
                (*u.choose(&["calculator", "clock", "sleep", "fail", "panic", "nope"])?).into(),
            ),
            "args" if u.ratio(3, 4)? => object(u, 2)?,
            "sleep_ms" if u.ratio(3, 4)? => number(u)?,
            "panic" if u.ratio(1, 2)? => Value::Bool(u.arbitrary()?),
            _ => value(u, 2)?,
        };
        m.insert(key, v);
    }
    Ok(Value::Object(m))
}

fn check(input: &Value) {
    let checked = with_toolbox(|tools| Scripted.check_input(input, tools));
    let steps = match parse(input) {
        Err(e) => {
            assert_eq!(checked, Err(e), "{input}");
            return;
        }
        Ok(steps) => steps,
    };
    let objects = input["steps"]
        .as_array()
        .expect("accepted steps are an array");
    assert_eq!(steps.len(), objects.len(), "{input}");
    let mut unknown = None;
    for (step, obj) in steps.iter().zip(objects) {
        match step {
            Step::Think(t) => assert_eq!(obj["think"], json!(t)),
            Step::Text(t) => assert_eq!(obj["text"], json!(t)),
            Step::Tool { name, args, .. } => {
                assert_eq!(obj["tool"], json!(name));
                assert_eq!(obj.get("args").unwrap_or(&json!({})), args);
                if unknown.is_none() && !with_toolbox(|t| t.contains(name)) {
                    unknown = Some(name.clone());
                }
            }
            Step::Sleep(ms) => assert_eq!(obj["sleep_ms"].as_u64(), Some(*ms)),
            Step::Fail(m) => assert_eq!(obj["fail"], json!(m)),
            Step::Panic => assert_eq!(obj["panic"], json!(true)),
            Step::Ask { message, .. } => assert_eq!(obj["ask"], json!(message)),
        }
    }
    match unknown {
        None => assert_eq!(checked, Ok(()), "{input}"),
        Some(name) => {
            let e = checked.expect_err("a script calling an unknown tool accepted");
            assert!(e.contains(&format!("{name:?}")), "{e}");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        if let Ok(input) = serde_json::from_slice::<Value>(rest) {
            check(&input);
        }
    } else if let Ok(input) = script(&mut Unstructured::new(rest)) {
        check(&input);
    }
});
