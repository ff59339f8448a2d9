//! The token verifier (src/auth.rs) on any token, in three modes picked by the first byte:
//!
//! 0. raw: any text as the token, a fixed secret. No such token may verify (forging an
//!    HS256 signature is not something a fuzzer can do, so a pass would mean a check was
//!    skipped: `alg` confusion, an ignored signature).
//! 1. forged with the right key: fuzz bytes as the header and the claims, base64url-encoded
//!    and correctly signed with HS256, so the claim checks are reached. A pass must have had
//!    `alg: HS256`, a string `sub` equal to the returned user id that is a valid user id, and
//!    an integer `exp` that is not in the past. (Not that the payload is valid JSON: finding 4.)
//! 2. round trip: `sign(secret, sub, exp)` verifies to `sub` exactly when `sub` is a valid
//!    user id and `exp` is in the future; with another secret it never verifies.
//!
//! `verify` below is the only call into the code under test: adapt it when the verifier's
//! shape changes.
#![no_main]

use agentcast::auth::{self, now_unix, valid_user_id, AuthError};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey};
use libfuzzer_sys::fuzz_target;
use serde::Deserialize;

fn verify(secret: &str, token: &str) -> Result<String, AuthError> {
    auth::verify(secret, token)
}

/// Splits `data` at its first `0xff` byte (never part of UTF-8 text).
fn split(data: &[u8]) -> (&[u8], &[u8]) {
    match data.iter().position(|&b| b == 0xff) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[]),
    }
}

fn raw(data: &[u8]) {
    let token = String::from_utf8_lossy(data);
    assert!(
        verify("fuzz-secret", &token).is_err(),
        "a token nobody signed verified: {token:?}"
    );
}

/// What the checks below read of a verified header or claims. Not a `Value`: serde_json skips
/// what nobody reads without checking it (invalid UTF-8 in a string, a number out of range),
/// so a verified token's payload need not be valid JSON (fuzz/README.md, finding 4).
#[derive(Deserialize)]
struct Read {
    alg: Option<String>,
    sub: Option<String>,
    exp: Option<u64>,
}

fn read(bytes: &[u8]) -> Read {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|e| panic!("verified, yet unreadable ({e}): {bytes:?}"))
}

fn forged(data: &[u8]) {
    let (header, claims) = split(data);
    let secret = "fuzz-secret";
    let message = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(claims)
    );
    let key = EncodingKey::from_secret(secret.as_bytes());
    let signature = jsonwebtoken::crypto::sign(message.as_bytes(), &key, Algorithm::HS256)
        .expect("HMAC signs anything");
    let token = format!("{message}.{signature}");
    let before = now_unix();
    let Ok(sub) = verify(secret, &token) else {
        return;
    };
    assert_eq!(read(header).alg.as_deref(), Some("HS256"));
    let claims = read(claims);
    assert_eq!(claims.sub.as_deref(), Some(sub.as_str()));
    assert!(valid_user_id(&sub), "{sub:?}");
    let exp = claims.exp.expect("a verified token has an integer exp");
    assert!(exp >= before, "expired at {exp}, verified at {before}");
}

fn round_trip(data: &[u8]) {
    let (secret, sub) = split(data);
    let (Ok(secret), Ok(sub)) = (std::str::from_utf8(secret), std::str::from_utf8(sub)) else {
        return;
    };
    let now = now_unix();
    let token = auth::sign(secret, sub, now + 3600);
    let want = if valid_user_id(sub) {
        Ok(sub.to_string())
    } else {
        Err(AuthError::BadSubject)
    };
    assert_eq!(verify(secret, &token), want, "sub {sub:?}");
    assert_eq!(
        verify(&format!("{secret}x"), &token),
        Err(AuthError::Invalid),
        "verified with another secret"
    );
    let old = auth::sign(secret, sub, now.saturating_sub(2));
    assert_eq!(verify(secret, &old), Err(AuthError::Expired), "sub {sub:?}");
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => raw(rest),
        1 => forged(rest),
        _ => round_trip(rest),
    }
});
