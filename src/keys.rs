//! Checking tokens: the [`Verifier`] holds every key a token may be signed with (the HS256
//! secret and the previous ones kept for a rotation) and the issuer and audience the server
//! expects, and turns a token into a user id or an [`AuthError`]. It is a pure value (no
//! I/O, no clock but the system's), so a fuzz target can drive [`Verifier::verify`] directly.
//! [`KeyStore`] holds the current verifier for the server.

use std::sync::{Arc, RwLock};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{decode, decode_header, Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::Value;

use crate::auth::{self, AuthError, MAX_TOKEN_BYTES};

/// Checks tokens against a fixed set of keys. Build one with [`Verifier::new`] (or
/// [`Verifier::hs256`]); it never changes after that.
pub struct Verifier {
    /// HS256 secrets, the signing one first.
    secrets: Vec<DecodingKey>,
    hs256: Validation,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("secrets", &self.secrets.len())
            .field("issuer", &self.hs256.iss)
            .field("audience", &self.hs256.aud)
            .finish()
    }
}

/// What a verifier accepts.
#[derive(Clone, Default)]
pub struct KeySettings {
    /// HS256 secrets; the first one is the one the server signs with (when it signs at all).
    pub secrets: Vec<String>,
    /// `iss` that tokens must carry, when set.
    pub issuer: Option<String>,
    /// `aud` that tokens must name, when set.
    pub audience: Option<String>,
}

impl std::fmt::Debug for KeySettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySettings")
            .field("secrets", &self.secrets.len())
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish()
    }
}

/// The claims read here; jsonwebtoken checks `exp`, `nbf`, `iss` and `aud` itself.
#[derive(Deserialize)]
struct TokenClaims {
    sub: String,
    #[serde(default)]
    iat: Option<Value>,
}

/// A NumericDate (RFC 7519: seconds, possibly fractional).
fn numeric_date(v: &Value) -> Option<f64> {
    v.as_f64().filter(|t| t.is_finite() && *t >= 0.0)
}

impl Verifier {
    pub fn new(settings: &KeySettings) -> Verifier {
        Verifier {
            secrets: settings
                .secrets
                .iter()
                .map(|s| DecodingKey::from_secret(s.as_bytes()))
                .collect(),
            hs256: validation(Algorithm::HS256, settings),
        }
    }

    /// A verifier of HS256 tokens signed with `secret`, with no issuer or audience.
    pub fn hs256(secret: &str) -> Verifier {
        Verifier::new(&KeySettings {
            secrets: vec![secret.to_string()],
            ..KeySettings::default()
        })
    }

    /// Checks `token` and returns its user id (`sub`). Tries each key that may have signed it;
    /// the first whose signature matches decides: its claims must then be valid now.
    pub fn verify(&self, token: &str) -> Result<String, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::TooLong);
        }
        let header = decode_header(token).map_err(|_| AuthError::Invalid)?;
        // No extension is understood here, so a token that marks one critical is refused
        // (RFC 7515 §4.1.11).
        if header.crit.is_some() {
            return Err(AuthError::Invalid);
        }
        let (keys, validation) = match header.alg {
            Algorithm::HS256 => (&self.secrets, &self.hs256),
            _ => return Err(AuthError::Invalid),
        };
        for key in keys {
            match decode::<TokenClaims>(token, key, validation) {
                Ok(data) => return check_claims(data.claims),
                Err(e) if *e.kind() == ErrorKind::InvalidSignature => continue,
                Err(e) => return Err(refusal(e.kind())),
            }
        }
        Err(AuthError::Invalid)
    }
}

/// The checks jsonwebtoken leaves to us: `iat` not in the future, and the user id.
fn check_claims(claims: TokenClaims) -> Result<String, AuthError> {
    if let Some(iat) = &claims.iat {
        match numeric_date(iat) {
            Some(iat) if iat > auth::now_unix() as f64 => return Err(AuthError::NotYetValid),
            Some(_) => {}
            None => return Err(AuthError::Invalid),
        }
    }
    if !auth::valid_user_id(&claims.sub) {
        return Err(AuthError::BadSubject);
    }
    Ok(claims.sub)
}

fn refusal(kind: &ErrorKind) -> AuthError {
    match kind {
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidIssuer => AuthError::BadIssuer,
        ErrorKind::InvalidAudience => AuthError::BadAudience,
        ErrorKind::MissingRequiredClaim(c) if c == "iss" => AuthError::BadIssuer,
        ErrorKind::MissingRequiredClaim(c) if c == "aud" => AuthError::BadAudience,
        _ => AuthError::Invalid,
    }
}

/// The checks for tokens of `alg`: `exp` and `sub` required, `nbf` honoured, no leeway;
/// `iss` and `aud` required and checked when configured. (A token with an `aud` is refused
/// when no audience is configured: it was meant for someone else.)
fn validation(alg: Algorithm, settings: &KeySettings) -> Validation {
    let mut v = Validation::new(alg);
    v.leeway = 0;
    v.validate_nbf = true;
    let mut required = vec!["exp", "sub"];
    if let Some(iss) = &settings.issuer {
        v.set_issuer(&[iss]);
        required.push("iss");
    }
    if let Some(aud) = &settings.audience {
        v.set_audience(&[aud]);
        required.push("aud");
    }
    v.set_required_spec_claims(&required);
    v
}

/// The server's current verifier.
pub struct KeyStore {
    current: RwLock<Arc<Verifier>>,
}

impl KeyStore {
    pub fn new(settings: &KeySettings) -> KeyStore {
        KeyStore {
            current: RwLock::new(Arc::new(Verifier::new(settings))),
        }
    }

    /// The verifier in force now.
    pub fn verifier(&self) -> Arc<Verifier> {
        match self.current.read() {
            Ok(v) => v.clone(),
            // A panic while swapping cannot leave a half-written Arc: the old one is whole.
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Checks a token with the verifier in force now.
    pub fn verify(&self, token: &str) -> Result<String, AuthError> {
        self.verifier().verify(token)
    }
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    use super::*;
    use crate::auth::now_unix;

    fn hs(secret: &str, claims: &Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    fn settings(secrets: &[&str]) -> KeySettings {
        KeySettings {
            secrets: secrets.iter().map(|s| s.to_string()).collect(),
            ..KeySettings::default()
        }
    }

    #[test]
    fn nbf_and_iat_in_the_future_are_not_valid_yet() {
        let v = Verifier::hs256("s");
        let now = now_unix();
        let exp = now + 600;
        for claims in [
            json!({"sub": "a", "exp": exp, "nbf": now + 60}),
            json!({"sub": "a", "exp": exp, "iat": now + 60}),
            json!({"sub": "a", "exp": exp, "iat": (now + 60) as f64 + 0.5}),
        ] {
            assert_eq!(
                v.verify(&hs("s", &claims)),
                Err(AuthError::NotYetValid),
                "{claims}"
            );
        }
        for claims in [
            json!({"sub": "a", "exp": exp, "nbf": now, "iat": now}),
            json!({"sub": "a", "exp": exp, "nbf": now - 60, "iat": now - 60}),
            json!({"sub": "a", "exp": exp, "iat": (now - 1) as f64 + 0.5}),
        ] {
            assert_eq!(v.verify(&hs("s", &claims)), Ok("a".into()), "{claims}");
        }
        // Not a NumericDate.
        let bad = json!({"sub": "a", "exp": exp, "iat": "yesterday"});
        assert_eq!(v.verify(&hs("s", &bad)), Err(AuthError::Invalid));
        // A wrong signature is refused before the times are looked at.
        let early = json!({"sub": "a", "exp": exp, "nbf": now + 60});
        assert_eq!(v.verify(&hs("t", &early)), Err(AuthError::Invalid));
    }

    #[test]
    fn previous_secrets_verify_too() {
        let v = Verifier::new(&settings(&["new", "old", "older"]));
        let exp = now_unix() + 60;
        for s in ["new", "old", "older"] {
            assert_eq!(
                v.verify(&hs(s, &json!({"sub": s, "exp": exp}))),
                Ok(s.into())
            );
        }
        assert_eq!(
            v.verify(&hs("other", &json!({"sub": "a", "exp": exp}))),
            Err(AuthError::Invalid)
        );
        // The first key that matches decides: an expired token signed with an old secret is
        // expired, not invalid.
        assert_eq!(
            v.verify(&hs("old", &json!({"sub": "a", "exp": exp - 120}))),
            Err(AuthError::Expired)
        );
    }

    #[test]
    fn issuer_and_audience_when_configured() {
        let exp = now_unix() + 60;
        let v = Verifier::new(&KeySettings {
            issuer: Some("https://id.example".into()),
            audience: Some("agentcast".into()),
            ..settings(&["s"])
        });
        let ok = json!({"sub": "a", "exp": exp, "iss": "https://id.example", "aud": "agentcast"});
        assert_eq!(v.verify(&hs("s", &ok)), Ok("a".into()));
        let list =
            json!({"sub": "a", "exp": exp, "iss": "https://id.example", "aud": ["x", "agentcast"]});
        assert_eq!(v.verify(&hs("s", &list)), Ok("a".into()));
        for (claims, want) in [
            (
                json!({"sub": "a", "exp": exp, "aud": "agentcast"}),
                AuthError::BadIssuer,
            ),
            (
                json!({"sub": "a", "exp": exp, "iss": "https://evil", "aud": "agentcast"}),
                AuthError::BadIssuer,
            ),
            (
                json!({"sub": "a", "exp": exp, "iss": "https://id.example"}),
                AuthError::BadAudience,
            ),
            (
                json!({"sub": "a", "exp": exp, "iss": "https://id.example", "aud": "other"}),
                AuthError::BadAudience,
            ),
        ] {
            assert_eq!(v.verify(&hs("s", &claims)), Err(want), "{claims}");
        }
        // Without them configured, iss is not looked at; an aud means the token is for
        // someone else.
        let plain = Verifier::hs256("s");
        assert_eq!(
            plain.verify(&hs("s", &json!({"sub": "a", "exp": exp, "iss": "x"}))),
            Ok("a".into())
        );
        assert_eq!(
            plain.verify(&hs("s", &json!({"sub": "a", "exp": exp, "aud": "x"}))),
            Err(AuthError::BadAudience)
        );
    }

    #[test]
    fn odd_tokens() {
        let v = Verifier::hs256("s");
        assert_eq!(v.verify(""), Err(AuthError::Missing));
        assert_eq!(
            v.verify(&"a".repeat(MAX_TOKEN_BYTES + 1)),
            Err(AuthError::TooLong)
        );
        for t in ["a", "a.b", "a.b.c", "....", "é.é.é", "\u{0}.\u{0}.\u{0}"] {
            assert_eq!(v.verify(t), Err(AuthError::Invalid), "{t:?}");
        }
        let exp = now_unix() + 60;
        // HS384 with the right secret: not an algorithm the server takes.
        let hs384 = encode(
            &Header::new(Algorithm::HS384),
            &json!({"sub": "a", "exp": exp}),
            &EncodingKey::from_secret(b"s"),
        )
        .unwrap();
        assert_eq!(v.verify(&hs384), Err(AuthError::Invalid));
        // A critical header extension is refused.
        let mut h = Header::new(Algorithm::HS256);
        h.crit = Some(vec!["exp".into()]);
        let crit = encode(
            &h,
            &json!({"sub": "a", "exp": exp}),
            &EncodingKey::from_secret(b"s"),
        )
        .unwrap();
        assert_eq!(v.verify(&crit), Err(AuthError::Invalid));
        // sub and exp of the wrong type, exp as a float (allowed by RFC 7519).
        assert_eq!(
            v.verify(&hs("s", &json!({"sub": 5, "exp": exp}))),
            Err(AuthError::Invalid)
        );
        assert_eq!(
            v.verify(&hs("s", &json!({"sub": "a", "exp": "later"}))),
            Err(AuthError::Invalid)
        );
        assert_eq!(
            v.verify(&hs("s", &json!({"sub": "a", "exp": exp as f64 + 0.5}))),
            Ok("a".into())
        );
    }
}
