//! Who is calling: the token of a request, the rules for a user id, why a token is refused,
//! and signing HS256 tokens (PROTOCOL.md §1). Checking a token against the configured keys is
//! [`crate::keys::Verifier`]; a refusal is a 401 before any upgrade.

use std::time::{SystemTime, UNIX_EPOCH};

use actix_web::HttpRequest;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};

/// Longest user id, in characters.
pub const MAX_USER_ID: usize = 128;

/// Longest token accepted, in bytes. An RS256 token with a handful of claims is under 1 KiB;
/// anything near this is not a token this server issued or expects.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// The claims this server reads (and writes when it signs). `exp` and `sub` are required;
/// `nbf` and `iat` are honoured when present; `iss` and `aud` are checked when the server is
/// configured with `--jwt-issuer` / `--jwt-audience`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
    /// Read as JSON so that a fractional NumericDate is accepted as RFC 7519 allows; checked
    /// by the verifier (jsonwebtoken does not look at `iat`).
    #[serde(default, skip_serializing)]
    pub iat: Option<serde_json::Value>,
    /// `"publish"` on a publisher's token (section 11).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// On a publisher token for one run alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<String>,
}

/// Why a request's token was refused. All of them are a 401; the message helps the caller
/// fix it, and [`AuthError::reason`] labels the metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthError {
    /// No token at all.
    Missing,
    /// An `Authorization` header that is not `Bearer …`, and no `?token=`.
    NotBearer,
    /// Longer than [`MAX_TOKEN_BYTES`].
    TooLong,
    /// Not a JWT, an algorithm or key this server does not accept, a bad signature, or
    /// `sub`/`exp` missing or of the wrong type.
    Invalid,
    Expired,
    /// `nbf` or `iat` in the future.
    NotYetValid,
    BadSubject,
    /// `--jwt-issuer` is set and `iss` is missing or different.
    BadIssuer,
    /// `aud` is missing while `--jwt-audience` is set, or does not name it.
    BadAudience,
}

impl std::fmt::Display for AuthError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AuthError::Missing => "no token: send Authorization: Bearer <token> or ?token=<token>",
            AuthError::NotBearer => {
                "Authorization must be `Bearer <token>` (or leave it out and send ?token=<token>)"
            }
            AuthError::TooLong => "the token is longer than 8192 bytes",
            AuthError::Invalid => "the token is malformed, wrongly signed, or lacks sub or exp",
            AuthError::Expired => "the token has expired",
            AuthError::NotYetValid => {
                "the token is not valid yet (its nbf or iat is in the future)"
            }
            AuthError::BadSubject => {
                "the token's sub must be 1 to 128 printable characters \
                 (no control or format characters, no white space but inner spaces)"
            }
            AuthError::BadIssuer => {
                "the token's iss is missing or not the issuer this server accepts"
            }
            AuthError::BadAudience => "the token's aud is missing or does not name this server",
        })
    }
}

impl std::error::Error for AuthError {}

impl AuthError {
    /// A label for metrics.
    pub fn reason(self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::NotBearer => "not_bearer",
            AuthError::TooLong => "too_long",
            AuthError::Invalid => "invalid",
            AuthError::Expired => "expired",
            AuthError::NotYetValid => "not_yet_valid",
            AuthError::BadSubject => "bad_subject",
            AuthError::BadIssuer => "bad_issuer",
            AuthError::BadAudience => "bad_audience",
        }
    }
}

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Signs HS256 tokens: the server's (or the dev-mode) secret, plus the issuer and audience the
/// server checks, so that a token it hands out is one it accepts.
#[derive(Clone)]
pub struct Signer {
    secret: String,
    issuer: Option<String>,
    audience: Option<String>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("secret", &"[hidden]")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish()
    }
}

impl Signer {
    pub fn new(secret: &str, issuer: Option<&str>, audience: Option<&str>) -> Signer {
        Signer {
            secret: secret.to_string(),
            issuer: issuer.map(str::to_string),
            audience: audience.map(str::to_string),
        }
    }

    /// A user's token for `sub` that expires at `exp_unix_secs`.
    pub fn sign(&self, sub: &str, exp_unix_secs: u64) -> String {
        self.sign_claims(sub, exp_unix_secs, None, None)
    }

    /// A publisher's token (section 11) for the service `sub`; with `run`, for that run alone.
    pub fn sign_publisher(&self, sub: &str, exp_unix_secs: u64, run: Option<&str>) -> String {
        self.sign_claims(sub, exp_unix_secs, Some("publish"), run)
    }

    fn sign_claims(
        &self,
        sub: &str,
        exp_unix_secs: u64,
        scope: Option<&str>,
        run: Option<&str>,
    ) -> String {
        let claims = Claims {
            sub: sub.to_string(),
            exp: exp_unix_secs,
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            iat: None,
            scope: scope.map(str::to_string),
            run: run.map(str::to_string),
        };
        // HMAC signing of a plain struct has no failure mode.
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(self.secret.as_bytes()),
        )
        .unwrap_or_default()
    }
}

/// Signs a token for `sub` that expires at `exp_unix_secs`, with `secret` and no other claim.
pub fn sign(secret: &str, sub: &str, exp_unix_secs: u64) -> String {
    Signer::new(secret, None, None).sign(sub, exp_unix_secs)
}

/// Checks a token against one HS256 secret and returns its user id: a shorthand for
/// [`crate::keys::Verifier::hs256`]`(secret).verify(token)`.
pub fn verify(secret: &str, token: &str) -> Result<String, AuthError> {
    crate::keys::Verifier::hs256(secret).verify(token)
}

/// What is wrong with a user id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserIdError {
    Empty,
    TooLong,
    /// Starts or ends with white space, or is only spaces.
    EdgeSpace,
    /// A character that is not allowed anywhere: the character and what kind it is.
    Char(char, &'static str),
}

impl std::fmt::Display for UserIdError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a user id must be 1 to 128 printable characters")?;
        match self {
            UserIdError::Empty => f.write_str(": this one is empty"),
            UserIdError::TooLong => f.write_str(": this one is longer"),
            UserIdError::EdgeSpace => {
                f.write_str(": this one starts or ends with a space (or is only spaces)")
            }
            UserIdError::Char(c, kind) => write!(f, ": this one has U+{:04X}, {kind}", *c as u32),
        }
    }
}

impl std::error::Error for UserIdError {}

/// General category Cf (format characters), as of Unicode 15.1: invisible characters that
/// change how the text around them is shown (zero-width space and joiners, bidi embeddings,
/// overrides and isolates, the BOM, tags). A user id with one of them can look exactly like
/// another user's id. Sorted, inclusive. The standard library has no category lookup and
/// these ranges change rarely (Unicode 15.0 added U+13439..U+1343F), so a table beats a crate.
const FORMAT_CHARS: &[(u32, u32)] = &[
    (0x00AD, 0x00AD),   // SOFT HYPHEN
    (0x0600, 0x0605),   // ARABIC NUMBER SIGN .. ARABIC NUMBER MARK ABOVE
    (0x061C, 0x061C),   // ARABIC LETTER MARK
    (0x06DD, 0x06DD),   // ARABIC END OF AYAH
    (0x070F, 0x070F),   // SYRIAC ABBREVIATION MARK
    (0x0890, 0x0891),   // ARABIC POUND MARK ABOVE .. ARABIC PIASTRE MARK ABOVE
    (0x08E2, 0x08E2),   // ARABIC DISPUTED END OF AYAH
    (0x180E, 0x180E),   // MONGOLIAN VOWEL SEPARATOR
    (0x200B, 0x200F),   // ZERO WIDTH SPACE, ZWNJ, ZWJ, LEFT-TO-RIGHT MARK, RIGHT-TO-LEFT MARK
    (0x202A, 0x202E),   // LEFT-TO-RIGHT EMBEDDING .. RIGHT-TO-LEFT OVERRIDE
    (0x2060, 0x2064),   // WORD JOINER .. INVISIBLE PLUS
    (0x2066, 0x206F),   // LEFT-TO-RIGHT ISOLATE .. NOMINAL DIGIT SHAPES
    (0xFEFF, 0xFEFF),   // ZERO WIDTH NO-BREAK SPACE (BOM)
    (0xFFF9, 0xFFFB),   // INTERLINEAR ANNOTATION ANCHOR .. TERMINATOR
    (0x110BD, 0x110BD), // KAITHI NUMBER SIGN
    (0x110CD, 0x110CD), // KAITHI NUMBER SIGN ABOVE
    (0x13430, 0x1343F), // EGYPTIAN HIEROGLYPH VERTICAL JOINER .. END WALLED ENCLOSURE
    (0x1BCA0, 0x1BCA3), // SHORTHAND FORMAT LETTER OVERLAP .. UP STEP
    (0x1D173, 0x1D17A), // MUSICAL SYMBOL BEGIN BEAM .. END PHRASE
    (0xE0001, 0xE0001), // LANGUAGE TAG
    (0xE0020, 0xE007F), // TAG SPACE .. CANCEL TAG
];

/// True for a character of general category Cf.
pub fn is_format_char(c: char) -> bool {
    let c = c as u32;
    FORMAT_CHARS
        .binary_search_by(|&(lo, hi)| {
            if hi < c {
                std::cmp::Ordering::Less
            } else if lo > c {
                std::cmp::Ordering::Greater
            } else {
                std::cmp::Ordering::Equal
            }
        })
        .is_ok()
}

/// Checks a user id (a token's `sub`, `POST /v1/dev/token`'s `user`, `agentcast token USER`):
/// 1 to 128 characters; no control (Cc), format (Cf), line (Zl) or paragraph (Zp) separator;
/// no white space but U+0020 (a no-break or ideographic space renders like a space: spoofing);
/// no space at either end.
pub fn check_user_id(sub: &str) -> Result<(), UserIdError> {
    let n = sub.chars().count();
    if n == 0 {
        return Err(UserIdError::Empty);
    }
    if n > MAX_USER_ID {
        return Err(UserIdError::TooLong);
    }
    for c in sub.chars() {
        let kind = if c.is_control() {
            "a control character"
        } else if is_format_char(c) {
            "a format character (zero-width, bidi, BOM or tag)"
        } else if c == '\u{2028}' || c == '\u{2029}' {
            "a line or paragraph separator"
        } else if c.is_whitespace() && c != ' ' {
            "white space other than a plain space"
        } else {
            continue;
        };
        return Err(UserIdError::Char(c, kind));
    }
    if sub.starts_with(' ') || sub.ends_with(' ') {
        return Err(UserIdError::EdgeSpace);
    }
    Ok(())
}

/// A user id is 1 to 128 printable characters (see [`check_user_id`]).
pub fn valid_user_id(sub: &str) -> bool {
    check_user_id(sub).is_ok()
}

/// The token of a request: the `Authorization: Bearer` header, else the `token` query
/// parameter. Any other `Authorization` (browsers behind HTTP basic auth send `Basic …` by
/// themselves) is ignored when `?token=` is there, and refused with [`AuthError::NotBearer`]
/// when it is not.
pub fn token_of(req: &HttpRequest, query_token: Option<&str>) -> Result<String, AuthError> {
    let header = req.headers().get(actix_web::http::header::AUTHORIZATION);
    token_from(header.map(|h| h.as_bytes()), query_token)
}

/// [`token_of`] on the raw header value.
pub fn token_from(
    authorization: Option<&[u8]>,
    query_token: Option<&str>,
) -> Result<String, AuthError> {
    let bearer = authorization.map(|h| {
        let h = std::str::from_utf8(h).ok()?.trim();
        let (scheme, rest) = h.split_once(' ').unwrap_or((h, ""));
        scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| rest.trim().to_string())
    });
    match (bearer, query_token) {
        (Some(Some(token)), _) if !token.is_empty() => Ok(token),
        (Some(Some(_)), None) | (None, None) => Err(AuthError::Missing),
        (Some(None), None) => Err(AuthError::NotBearer),
        (_, Some("")) => Err(AuthError::Missing),
        (_, Some(token)) => Ok(token.to_string()),
    }
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

    fn refused_as(sub: &str) -> &'static str {
        match check_user_id(sub) {
            Ok(()) => panic!("{sub:?} was accepted"),
            Err(UserIdError::Char(_, kind)) => kind,
            Err(UserIdError::EdgeSpace) => "edge",
            Err(UserIdError::Empty) => "empty",
            Err(UserIdError::TooLong) => "long",
        }
    }

    #[test]
    fn user_id_length() {
        assert_eq!(check_user_id(""), Err(UserIdError::Empty));
        assert_eq!(check_user_id(&"x".repeat(129)), Err(UserIdError::TooLong));
        assert!(valid_user_id(&"x".repeat(128)));
        // Characters, not bytes.
        assert!(valid_user_id(&"é".repeat(128)));
        assert!(valid_user_id("a"));
    }

    #[test]
    fn user_id_control_characters_cc() {
        for s in [
            "a\u{0}b", "a\u{7}b", "a\nb", "a\tb", "a\u{1b}b", "\u{7f}", "a\u{85}b", "a\u{9f}b",
        ] {
            assert_eq!(refused_as(s), "a control character", "{s:?}");
        }
    }

    #[test]
    fn user_id_format_characters_cf() {
        for c in [
            '\u{00AD}',
            '\u{061C}',
            '\u{180E}',
            '\u{200B}',
            '\u{200C}',
            '\u{200D}',
            '\u{200E}',
            '\u{200F}',
            '\u{202A}',
            '\u{202E}',
            '\u{2060}',
            '\u{2066}',
            '\u{2069}',
            '\u{FEFF}',
            '\u{FFF9}',
            '\u{110BD}',
            '\u{1343F}',
            '\u{1D173}',
            '\u{E0001}',
            '\u{E0041}',
            '\u{E007F}',
        ] {
            let s = format!("ali{c}ce");
            assert!(is_format_char(c), "U+{:04X}", c as u32);
            assert!(
                refused_as(&s).starts_with("a format character"),
                "U+{:04X}",
                c as u32
            );
        }
        // Neighbours of the ranges are ordinary characters.
        for c in [
            '\u{00AC}',
            '\u{00AE}',
            '\u{2010}',
            '\u{2065}',
            '\u{FEFE}',
            '\u{E0080}',
            'a',
        ] {
            assert!(!is_format_char(c), "U+{:04X}", c as u32);
        }
        // The table is sorted and its ranges do not overlap (binary search relies on it).
        assert!(FORMAT_CHARS.windows(2).all(|w| w[0].1 < w[1].0));
        assert!(FORMAT_CHARS.iter().all(|(lo, hi)| lo <= hi));
    }

    #[test]
    fn user_id_line_and_paragraph_separators() {
        assert_eq!(refused_as("a\u{2028}b"), "a line or paragraph separator");
        assert_eq!(refused_as("a\u{2029}b"), "a line or paragraph separator");
    }

    #[test]
    fn user_id_white_space_other_than_space() {
        for c in [
            '\u{A0}', '\u{1680}', '\u{2000}', '\u{2007}', '\u{200A}', '\u{202F}', '\u{205F}',
            '\u{3000}',
        ] {
            let s = format!("ali{c}ce");
            assert_eq!(
                refused_as(&s),
                "white space other than a plain space",
                "U+{:04X}",
                c as u32
            );
        }
    }

    #[test]
    fn user_id_spaces_inside_only() {
        assert!(valid_user_id("alice smith"));
        assert!(valid_user_id("a b c"));
        for s in [" alice", "alice ", " ", "   ", " a "] {
            assert_eq!(check_user_id(s), Err(UserIdError::EdgeSpace), "{s:?}");
        }
        // Non-Latin printable ids are fine.
        for s in ["アリス", "Ωμέγα", "user@example.com", "😀", "a\u{301}"] {
            assert!(valid_user_id(s), "{s:?}");
        }
    }

    #[test]
    fn user_id_error_names_the_character() {
        let e = check_user_id("ali\u{202E}ce").unwrap_err();
        assert!(e.to_string().contains("U+202E"), "{e}");
    }

    #[test]
    fn which_token() {
        let t = |h: Option<&str>, q: Option<&str>| token_from(h.map(str::as_bytes), q);
        assert_eq!(t(Some("Bearer abc"), None), Ok("abc".into()));
        assert_eq!(t(Some("bearer  abc "), None), Ok("abc".into()));
        assert_eq!(t(Some("Bearer abc"), Some("q")), Ok("abc".into()));
        assert_eq!(t(None, Some("q")), Ok("q".into()));
        assert_eq!(t(None, None), Err(AuthError::Missing));
        assert_eq!(t(Some("Bearer"), None), Err(AuthError::Missing));
        assert_eq!(t(Some("Bearer "), None), Err(AuthError::Missing));
        assert_eq!(t(Some("Bearer "), Some("q")), Ok("q".into()));
        // A non-Bearer Authorization is ignored when ?token= is there.
        assert_eq!(t(Some("Basic dXNlcjpwYXNz"), Some("q")), Ok("q".into()));
        assert_eq!(
            t(Some("Basic dXNlcjpwYXNz"), None),
            Err(AuthError::NotBearer)
        );
        assert_eq!(t(Some("abc"), None), Err(AuthError::NotBearer));
        assert_eq!(t(Some("Basic x"), Some("")), Err(AuthError::Missing));
    }
}
