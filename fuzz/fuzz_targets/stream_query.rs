//! The query string of `/v1/ws` and `/v1/events`: `web::Query::<StreamQuery>::from_query`,
//! then `StreamQuery::resume` with an optional `Last-Event-ID` (src/routes.rs).
//!
//! Input: the query string, then optionally `\n` and the Last-Event-ID value (a header value
//! cannot hold a newline, so the split is unambiguous).
//!
//! Checks, beyond "no panic":
//! - a parsed query re-encoded (form-urlencoded) parses to the same fields;
//! - `resume` follows the rules: epoch without after_seq is refused; after_seq wins over
//!   Last-Event-ID; the resume point is the trimmed decimal value; refusals are 400.
#![no_main]

use actix_web::http::StatusCode;
use actix_web::web::Query;
use agentcast::routes::StreamQuery;
use libfuzzer_sys::fuzz_target;

type Fields = (Option<String>, Option<String>, Option<String>);

fn fields(q: &StreamQuery) -> Fields {
    (q.token.clone(), q.after_seq.clone(), q.epoch.clone())
}

fn encode((token, after_seq, epoch): &Fields) -> String {
    let pairs: Vec<(&str, &str)> = [("token", token), ("after_seq", after_seq), ("epoch", epoch)]
        .into_iter()
        .filter_map(|(k, v)| v.as_deref().map(|v| (k, v)))
        .collect();
    serde_urlencoded::to_string(pairs).expect("string pairs encode")
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (query, last_event_id) = match text.split_once('\n') {
        Some((q, l)) => (q, Some(l)),
        None => (text, None),
    };
    let Ok(q) = Query::<StreamQuery>::from_query(query) else {
        return;
    };
    let f = fields(&q);
    let again = encode(&f);
    let q2 = Query::<StreamQuery>::from_query(&again)
        .unwrap_or_else(|e| panic!("{query:?} re-encoded as {again:?} is refused: {e}"));
    assert_eq!(fields(&q2), f, "{query:?} re-encoded as {again:?}");

    let r = q.resume(last_event_id);
    let asked = match (&f.1, &f.2) {
        (None, Some(_)) => {
            let refusal = r.expect_err("epoch without after_seq accepted");
            assert_eq!(refusal.status(), StatusCode::BAD_REQUEST);
            return;
        }
        (Some(a), _) => Some(a.as_str()),
        (None, None) => last_event_id,
    };
    match (asked, r) {
        (None, Ok(None)) => {}
        (Some(a), Ok(Some(from))) => {
            assert_eq!(Ok(from.after_seq), a.trim().parse::<u64>(), "{a:?}");
            assert_eq!(from.epoch, f.2);
        }
        (Some(a), Err(refusal)) => {
            assert!(a.trim().parse::<u64>().is_err(), "{a:?} refused");
            assert_eq!(refusal.status(), StatusCode::BAD_REQUEST);
        }
        (asked, r) => panic!("asked {asked:?}, got {:?}", r.map_err(|e| e.status())),
    }
});
