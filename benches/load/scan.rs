//! Reading only what the harness needs out of a frame, without building a JSON tree.
//!
//! A run event is one JSON object; the harness needs four of its top-level members (`type`,
//! `seq`, `run_id`, `ts`). [`scan`] walks the top level of the object, skipping every other
//! value (strings with escapes, nested objects and arrays) without looking inside, and stops as
//! soon as it has the four. It does not depend on member order, so it reads any server that
//! speaks PROTOCOL.md; with agentcast's order (`data` last) it never reads the payload at all.
//! Frames without a top-level `seq` are control frames and are parsed with serde_json (rare).

/// The top-level members of a frame the harness looks at. Strings are raw (still escaped);
/// the ones used here (type names, run ids, timestamps) never contain escapes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Fields<'a> {
    pub kind: Option<&'a [u8]>,
    pub seq: Option<u64>,
    pub run_id: Option<&'a [u8]>,
    pub ts: Option<&'a [u8]>,
}

#[inline]
fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && matches!(b[i], b' ' | b'\t' | b'\n' | b'\r') {
        i += 1;
    }
    i
}

/// `b[i]` is the opening quote; returns the index just past the closing quote.
#[inline]
fn skip_string(b: &[u8], mut i: usize) -> Option<usize> {
    i += 1;
    while i < b.len() {
        match b[i] {
            b'"' => return Some(i + 1),
            b'\\' => i += 2,
            _ => i += 1,
        }
    }
    None
}

/// Skips one JSON value starting at `b[i]`; returns the index just past it.
fn skip_value(b: &[u8], i: usize) -> Option<usize> {
    match *b.get(i)? {
        b'"' => skip_string(b, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            while j < b.len() {
                match b[j] {
                    b'"' => {
                        j = skip_string(b, j)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            None
        }
        _ => {
            let mut j = i;
            while j < b.len() && !matches!(b[j], b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r')
            {
                j += 1;
            }
            (j > i).then_some(j)
        }
    }
}

/// Scans the top level of a JSON object. `None` when it is not a well-formed object as far as
/// it was read.
pub fn scan(b: &[u8]) -> Option<Fields<'_>> {
    let mut f = Fields::default();
    let mut i = skip_ws(b, 0);
    if b.get(i) != Some(&b'{') {
        return None;
    }
    i = skip_ws(b, i + 1);
    if b.get(i) == Some(&b'}') {
        return Some(f);
    }
    loop {
        if b.get(i) != Some(&b'"') {
            return None;
        }
        let key_end = skip_string(b, i)?;
        let key = &b[i + 1..key_end - 1];
        i = skip_ws(b, key_end);
        if b.get(i) != Some(&b':') {
            return None;
        }
        i = skip_ws(b, i + 1);
        let end = skip_value(b, i)?;
        let value = &b[i..end];
        match key {
            b"type" => f.kind = unquote(value),
            b"run_id" => f.run_id = unquote(value),
            b"ts" => f.ts = unquote(value),
            b"seq" => f.seq = parse_u64(value),
            _ => {}
        }
        if f.kind.is_some() && f.seq.is_some() && f.run_id.is_some() && f.ts.is_some() {
            return Some(f);
        }
        i = skip_ws(b, end);
        match b.get(i) {
            Some(b',') => i = skip_ws(b, i + 1),
            Some(b'}') => return Some(f),
            _ => return None,
        }
    }
}

#[inline]
fn unquote(v: &[u8]) -> Option<&[u8]> {
    (v.len() >= 2 && v[0] == b'"' && v[v.len() - 1] == b'"').then(|| &v[1..v.len() - 1])
}

#[inline]
fn parse_u64(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 {
        return None;
    }
    let mut n = 0u64;
    for &c in v {
        if !c.is_ascii_digit() {
            return None;
        }
        n = n * 10 + (c - b'0') as u64;
    }
    Some(n)
}

#[inline]
fn digits(b: &[u8], at: usize, n: usize) -> Option<i64> {
    let s = b.get(at..at + n)?;
    let mut v = 0i64;
    for &c in s {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v * 10 + (c - b'0') as i64;
    }
    Some(v)
}

/// Days from 1970-01-01 to the given civil date (proleptic Gregorian).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// An RFC 3339 timestamp (`2026-11-22T01:02:03.456789Z`, any number of fraction digits, `Z`
/// or a `+hh:mm`/`-hh:mm` offset) as microseconds since the Unix epoch.
pub fn parse_rfc3339_micros(b: &[u8]) -> Option<i64> {
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (y, mo, d) = (digits(b, 0, 4)?, digits(b, 5, 2)?, digits(b, 8, 2)?);
    let (h, mi, s) = (digits(b, 11, 2)?, digits(b, 14, 2)?, digits(b, 17, 2)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 60 {
        return None;
    }
    let mut i = 19;
    let mut micros = 0i64;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            if i - start < 6 {
                micros = micros * 10 + (b[i] - b'0') as i64;
            }
            i += 1;
        }
        let n = i - start;
        if n == 0 {
            return None;
        }
        for _ in n..6 {
            micros *= 10;
        }
    }
    let offset_secs = match b.get(i) {
        Some(b'Z' | b'z') if i + 1 == b.len() => 0,
        Some(&sign @ (b'+' | b'-')) if i + 6 == b.len() && b[i + 3] == b':' => {
            let off = digits(b, i + 1, 2)? * 3600 + digits(b, i + 4, 2)? * 60;
            if sign == b'+' {
                off
            } else {
                -off
            }
        }
        _ => return None,
    };
    let secs = days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + s - offset_secs;
    Some(secs * 1_000_000 + micros)
}

/// Checks the scanner and the timestamp parser on known frames; the harness runs this at
/// start (it costs microseconds), since a bench target has no unit tests.
pub fn self_check() {
    {
        let f = br#"{"type":"tool_executing","seq":42,"run_id":"run_7Jc2","thread_id":"th_1","ts":"2026-11-22T01:02:03.456789Z","data":{"seq":1}}"#;
        let s = scan(f).unwrap();
        assert_eq!(s.kind, Some(&b"tool_executing"[..]));
        assert_eq!(s.seq, Some(42));
        assert_eq!(s.run_id, Some(&b"run_7Jc2"[..]));
        assert_eq!(s.ts, Some(&b"2026-11-22T01:02:03.456789Z"[..]));
    }

    {
        let f = br#" { "data" : {"seq":7,"x":[1,{"run_id":"no"}],"s":"a\"}\\"}, "ts":"2026-01-01T00:00:00Z" , "seq" : 3, "run_id":"r", "type":"partial_result"} "#;
        let s = scan(f).unwrap();
        assert_eq!(s.seq, Some(3));
        assert_eq!(s.run_id, Some(&b"r"[..]));
        assert_eq!(s.kind, Some(&b"partial_result"[..]));
    }

    {
        let s = scan(br#"{"type":"heartbeat","last_seq":9}"#).unwrap();
        assert_eq!(s.seq, None);
        assert_eq!(s.kind, Some(&b"heartbeat"[..]));
        assert!(scan(b"[1]").is_none());
        assert!(scan(br#"{"type":"#).is_none());
    }

    {
        assert_eq!(parse_rfc3339_micros(b"1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339_micros(b"2023-11-14T22:13:20.123456Z"),
            Some(1_700_000_000_123_456)
        );
        assert_eq!(
            parse_rfc3339_micros(b"2023-11-14T23:13:20.1234567+01:00"),
            Some(1_700_000_000_123_456)
        );
        assert_eq!(
            parse_rfc3339_micros(b"2024-02-29T00:00:00.5Z"),
            Some(1_709_164_800_500_000)
        );
        assert!(parse_rfc3339_micros(b"2024-02-29 nonsense").is_none());
    }
}
