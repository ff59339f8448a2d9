//! `calculator`: evaluates an arithmetic expression, `{"expr":"2+3*4"}` → `{"value":14}`.
//! `+ - * / %`, `^` (power, right-associative), unary minus, parentheses, decimals.
//! Input is bounded (length and nesting) so no expression can exhaust the stack.

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::{json, Value};

use crate::tool::{Tool, ToolCall, ToolError};

const MAX_LEN: usize = 1024;
const MAX_DEPTH: usize = 64;

pub struct Calculator;

#[async_trait]
impl Tool for Calculator {
    fn name(&self) -> &str {
        "calculator"
    }

    fn description(&self) -> &str {
        "Evaluates arithmetic: {\"expr\":\"(2+3)*4\"} with + - * / % ^ and parentheses; returns {\"value\":N}."
    }

    fn args_schema(&self) -> Value {
        json!({"type": "object", "required": ["expr"], "properties": {"expr": {"type": "string", "maxLength": MAX_LEN}}})
    }

    async fn call(self: Arc<Self>, _call: ToolCall, args: Value) -> Result<Value, ToolError> {
        let expr = args
            .get("expr")
            .and_then(Value::as_str)
            .ok_or_else(|| ToolError::invalid_args("calculator takes {\"expr\":\"...\"}"))?;
        let value = evaluate(expr).map_err(ToolError::invalid_args)?;
        Ok(json!({ "value": number(value) }))
    }
}

/// Whole numbers come back as JSON integers.
fn number(v: f64) -> Value {
    if v.fract() == 0.0 && v.abs() < 9_007_199_254_740_992.0 {
        json!(v as i64)
    } else {
        json!(v)
    }
}

/// Evaluates `expr`, or says what is wrong with it.
pub fn evaluate(expr: &str) -> Result<f64, String> {
    if expr.len() > MAX_LEN {
        return Err(format!("expression longer than {MAX_LEN} characters"));
    }
    let mut p = Parser {
        s: expr.as_bytes(),
        i: 0,
        depth: 0,
    };
    let v = p.expr()?;
    p.skip_ws();
    if p.i != p.s.len() {
        return Err(format!("unexpected {:?} at {}", p.s[p.i] as char, p.i));
    }
    if !v.is_finite() {
        return Err("the result is not a finite number".into());
    }
    Ok(v)
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
    depth: usize,
}

impl Parser<'_> {
    fn skip_ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> bool {
        self.skip_ws();
        if self.s.get(self.i) == Some(&c) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn nest<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T, String>) -> Result<T, String> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(format!("nested deeper than {MAX_DEPTH}"));
        }
        let r = f(self);
        self.depth -= 1;
        r
    }

    fn expr(&mut self) -> Result<f64, String> {
        let mut v = self.term()?;
        loop {
            if self.eat(b'+') {
                v += self.term()?;
            } else if self.eat(b'-') {
                v -= self.term()?;
            } else {
                return Ok(v);
            }
        }
    }

    fn term(&mut self) -> Result<f64, String> {
        let mut v = self.unary()?;
        loop {
            if self.eat(b'*') {
                v *= self.unary()?;
            } else if self.eat(b'/') {
                let d = self.unary()?;
                if d == 0.0 {
                    return Err("division by zero".into());
                }
                v /= d;
            } else if self.eat(b'%') {
                let d = self.unary()?;
                if d == 0.0 {
                    return Err("division by zero".into());
                }
                v %= d;
            } else {
                return Ok(v);
            }
        }
    }

    fn unary(&mut self) -> Result<f64, String> {
        if self.eat(b'-') {
            self.nest(|p| p.unary()).map(|v| -v)
        } else if self.eat(b'+') {
            self.nest(|p| p.unary())
        } else {
            self.power()
        }
    }

    fn power(&mut self) -> Result<f64, String> {
        let base = self.atom()?;
        if self.eat(b'^') {
            let exp = self.nest(|p| p.unary())?;
            Ok(base.powf(exp))
        } else {
            Ok(base)
        }
    }

    fn atom(&mut self) -> Result<f64, String> {
        if self.eat(b'(') {
            let v = self.nest(|p| p.expr())?;
            if !self.eat(b')') {
                return Err(format!("missing ) at {}", self.i));
            }
            return Ok(v);
        }
        self.skip_ws();
        let start = self.i;
        while self.i < self.s.len() && (self.s[self.i].is_ascii_digit() || self.s[self.i] == b'.') {
            self.i += 1;
        }
        if start == self.i {
            return Err(match self.s.get(self.i) {
                Some(c) => format!("expected a number at {}, found {:?}", self.i, *c as char),
                None => "expected a number at the end".into(),
            });
        }
        // Only ASCII digits and dots were taken, so this is valid UTF-8.
        let digits = std::str::from_utf8(&self.s[start..self.i]).unwrap_or("");
        digits
            .parse::<f64>()
            .map_err(|_| format!("bad number {digits:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precedence_and_associativity() {
        assert_eq!(evaluate("2+3*4"), Ok(14.0));
        assert_eq!(evaluate("(2+3)*4"), Ok(20.0));
        assert_eq!(evaluate("10-4-3"), Ok(3.0));
        assert_eq!(evaluate("2^3^2"), Ok(512.0));
        assert_eq!(evaluate("-2^2"), Ok(-4.0));
        assert_eq!(evaluate("7 % 4 / 2"), Ok(1.5));
        assert_eq!(evaluate(" 1.5 + --1 "), Ok(2.5));
    }

    #[test]
    fn refusals() {
        assert_eq!(evaluate("1/0"), Err("division by zero".into()));
        assert!(evaluate("5 % 0").is_err());
        assert!(evaluate("").is_err());
        assert!(evaluate("2+").is_err());
        assert!(evaluate("(1").is_err());
        assert!(evaluate("1)").is_err());
        assert!(evaluate("1..2").is_err());
        assert!(evaluate("abc").is_err());
        assert!(evaluate("10^400").is_err());
        assert!(evaluate(&"(".repeat(100)).unwrap_err().contains("nested"));
        assert!(evaluate(&"-".repeat(100)).unwrap_err().contains("nested"));
        assert!(evaluate(&"1+".repeat(600)).unwrap_err().contains("longer"));
    }

    #[test]
    fn whole_numbers_are_integers() {
        assert_eq!(number(14.0), json!(14));
        assert_eq!(number(2.5), json!(2.5));
    }
}
