//! The calculator tool's `evaluate` on any text.
//!
//! Checks, beyond "no panic" (a stack overflow from deep nesting is a crash) and "no hang"
//! (scripts/fuzz.sh runs it with a per-input timeout):
//! - a value is always finite, and only inputs within the length bound have one;
//! - `E+0`, ` E ` and `(E)` have the value of `E` (`(E)` may instead be refused for nesting
//!   one level too deep), so what was accepted is an expression, not a lucky prefix.
#![no_main]

use agentcast_actors::tools::calculator::evaluate;
use libfuzzer_sys::fuzz_target;

/// calculator.rs's MAX_LEN (private there).
const MAX_LEN: usize = 1024;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let r = evaluate(&text);
    if text.len() > MAX_LEN {
        let e = r.expect_err("an over-long expression has a value");
        assert!(e.contains("longer"), "{e}");
        return;
    }
    let Ok(v) = r else { return };
    assert!(v.is_finite(), "{text:?} = {v}");
    if text.len() + 2 <= MAX_LEN {
        assert_eq!(evaluate(&format!("{text}+0")), Ok(v), "{text:?} + 0");
        assert_eq!(evaluate(&format!(" {text} ")), Ok(v), "{text:?} spaced");
        match evaluate(&format!("({text})")) {
            Ok(w) => assert_eq!(w, v, "({text:?})"),
            Err(e) => assert!(e.contains("nested"), "({text:?}): {e}"),
        }
    }
});
