//! Client frames (PROTOCOL.md §4): `parse_client_frame` and `request_id_of` on any text.
//!
//! Checks, beyond "no panic":
//! - both agree on the frame's request_id, whether the frame is accepted or refused;
//! - an accepted frame re-encoded (as a client would send it) parses to the same frame (its
//!   input's floats may move by one ulp while serde_json lacks `float_roundtrip`: see
//!   `agentcast_fuzz::same_json` and fuzz/README.md, finding 1);
//! - accepted ids are within their length limits;
//! - a refusal has one of the frame-level codes, a non-empty message of bounded size (it must
//!   not echo unbounded input back), and turns into an `error` frame that is valid JSON.
#![no_main]

use agentcast_actors::protocol::{
    parse_client_frame, request_id_of, Command, Control, ErrorCode, MAX_REQUEST_ID, MAX_THREAD_ID,
};
use agentcast_fuzz::{encode_frame, same_frame};
use libfuzzer_sys::fuzz_target;

/// Longest refusal message: fixed texts, serde_json's error, or 64 characters of an unknown
/// type (escaped by `{:?}`, at most 10 bytes each).
const MAX_MESSAGE: usize = 1024;

fuzz_target!(|data: &[u8]| {
    // WebSocket text frames are UTF-8; the server never calls the parser on anything else.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = parse_client_frame(text);
    let id = request_id_of(text);
    match parsed {
        Ok(frame) => {
            assert_eq!(frame.request_id, id, "request_id_of disagrees on {text:?}");
            if let Some(r) = &frame.request_id {
                assert!(r.chars().count() <= MAX_REQUEST_ID);
            }
            if let Command::StartRun {
                thread_id: Some(t), ..
            } = &frame.command
            {
                assert!((1..=MAX_THREAD_ID).contains(&t.chars().count()));
            }
            let again = encode_frame(&frame);
            match parse_client_frame(&again) {
                Ok(f2) => assert!(
                    same_frame(&f2, &frame),
                    "{text:?} re-encoded as {again:?}: {frame:?} became {f2:?}"
                ),
                Err(e) => panic!("{text:?} re-encoded as {again:?} is refused: {e:?}"),
            }
        }
        Err(refusal) => {
            assert_eq!(
                refusal.request_id, id,
                "request_id_of disagrees on {text:?}"
            );
            assert!(matches!(
                refusal.code,
                ErrorCode::BadJson | ErrorCode::UnknownType | ErrorCode::InvalidField
            ));
            assert!(!refusal.message.is_empty());
            assert!(
                refusal.message.len() <= MAX_MESSAGE,
                "a {}-byte refusal message",
                refusal.message.len()
            );
            let frame = Control::error(
                refusal.request_id.as_deref(),
                refusal.code,
                &refusal.message,
            )
            .to_text();
            let v: serde_json::Value = serde_json::from_str(&frame).expect("error frame is JSON");
            assert_eq!(v["type"], "error");
        }
    }
});
