//! Who is calling: HS256 JWTs with `sub` (the user id) and a required `exp`
//! (PROTOCOL.md §1). Verified before the WebSocket upgrade; a refusal is a 401.

use std::time::{SystemTime, UNIX_EPOCH};

use actix_web::HttpRequest;
use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// Longest user id.
pub const MAX_USER_ID: usize = 128;

#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub exp: u64,
}

/// Why a token was refused. All of them are a 401; the message helps the caller fix it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthError {
    Missing,
    Invalid,
    Expired,
    BadSubject,
}

impl std::fmt::Display for AuthError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AuthError::Missing => "no token: send Authorization: Bearer <token> or ?token=<token>",
            AuthError::Invalid => "the token is malformed, wrongly signed, or lacks sub or exp",
            AuthError::Expired => "the token has expired",
            AuthError::BadSubject => "the token's sub must be 1 to 128 printable characters",
        })
    }
}

impl AuthError {
    /// A label for metrics.
    pub fn reason(self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Invalid => "invalid",
            AuthError::Expired => "expired",
            AuthError::BadSubject => "bad_subject",
        }
    }
}

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Signs a token for `sub` that expires at `exp_unix_secs`.
pub fn sign(secret: &str, sub: &str, exp_unix_secs: u64) -> String {
    let claims = Claims {
        sub: sub.to_string(),
        exp: exp_unix_secs,
    };
    // HMAC signing of a plain struct has no failure mode.
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap_or_default()
}

/// A user id is 1 to 128 printable characters.
pub fn valid_user_id(sub: &str) -> bool {
    let n = sub.chars().count();
    (1..=MAX_USER_ID).contains(&n) && !sub.chars().any(char::is_control)
}

/// Checks a token and returns its user id.
pub fn verify(secret: &str, token: &str) -> Result<String, AuthError> {
    let mut validation = Validation::new(Algorithm::HS256);
    validation.leeway = 0;
    validation.set_required_spec_claims(&["exp", "sub"]);
    let data = decode::<Claims>(
        token,
        &DecodingKey::from_secret(secret.as_bytes()),
        &validation,
    )
    .map_err(|e| match e.kind() {
        jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
        _ => AuthError::Invalid,
    })?;
    if !valid_user_id(&data.claims.sub) {
        return Err(AuthError::BadSubject);
    }
    Ok(data.claims.sub)
}

/// The token of a request: the `Authorization: Bearer` header, else the `token` query parameter.
pub fn token_of(req: &HttpRequest, query_token: Option<&str>) -> Option<String> {
    if let Some(h) = req.headers().get(actix_web::http::header::AUTHORIZATION) {
        let h = h.to_str().ok()?;
        let (scheme, token) = h.split_once(' ')?;
        return scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| token.trim().to_string());
    }
    query_token.map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let t = sign("s", "alice", now_unix() + 60);
        assert_eq!(verify("s", &t), Ok("alice".into()));
        assert_eq!(verify("other", &t), Err(AuthError::Invalid));
        assert_eq!(verify("s", "not.a.jwt"), Err(AuthError::Invalid));
        assert_eq!(
            verify("s", &sign("s", "alice", now_unix() - 1)),
            Err(AuthError::Expired)
        );
        assert_eq!(
            verify("s", &sign("s", "", now_unix() + 60)),
            Err(AuthError::BadSubject)
        );
        assert_eq!(
            verify("s", &sign("s", &"x".repeat(129), now_unix() + 60)),
            Err(AuthError::BadSubject)
        );
        assert_eq!(
            verify("s", &sign("s", "a\u{7}b", now_unix() + 60)),
            Err(AuthError::BadSubject)
        );
        assert!(verify("s", &sign("s", &"é".repeat(128), now_unix() + 60)).is_ok());
    }

    #[test]
    fn exp_is_required_and_alg_none_refused() {
        #[derive(Serialize)]
        struct NoExp {
            sub: String,
        }
        let t = encode(
            &Header::new(Algorithm::HS256),
            &NoExp { sub: "a".into() },
            &EncodingKey::from_secret(b"s"),
        )
        .unwrap();
        assert_eq!(verify("s", &t), Err(AuthError::Invalid));
        // {"alg":"none"} with an empty signature.
        let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJhIiwiZXhwIjo5OTk5OTk5OTk5fQ.";
        assert_eq!(verify("s", none), Err(AuthError::Invalid));
    }
}
