//! Checking tokens. The [`Verifier`] holds every key a token may be signed with (the HS256
//! secret and the previous ones kept for a rotation, public keys from PEM files and a JWKS
//! file) and the issuer and audience the server expects, and turns a token into a user id or
//! an [`AuthError`]. It is a pure value (no I/O, no clock but the system's), so a fuzz target
//! can drive [`Verifier::verify`] directly; [`public_key_from_pem`] and [`keys_from_jwks`]
//! are pure too.
//!
//! [`KeyStore`] holds the server's current verifier and rebuilds it from the key files on
//! SIGHUP and when a file's modification time or size changes ([`watch`]). A file that does
//! not load then leaves the previous keys in force, with a warning; at start it stops the
//! server from starting.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{decode, decode_header, Algorithm, DecodingKey, DecodingKeyKind, Validation};
use rsa::traits::PublicKeyParts;
use serde::Deserialize;
use serde_json::Value;

use crate::auth::{self, AuthError, MAX_TOKEN_BYTES};

/// The public-key algorithms accepted, besides HS256.
pub const PUBLIC_KEY_ALGORITHMS: [Algorithm; 3] =
    [Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA];

/// Smallest RSA modulus accepted.
pub const MIN_RSA_BITS: usize = 2048;

/// Checks tokens against a fixed set of keys. Build one with [`Verifier::new`] (or
/// [`Verifier::hs256`]); it never changes after that.
pub struct Verifier {
    /// HS256 secrets, the signing one first.
    secrets: Vec<DecodingKey>,
    public: Vec<PublicKey>,
    /// The checks for each accepted algorithm: HS256, then [`PUBLIC_KEY_ALGORITHMS`].
    validations: Vec<(Algorithm, Validation)>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let any = self.validations.first().map(|(_, v)| v);
        f.debug_struct("Verifier")
            .field("secrets", &self.secrets.len())
            .field("public", &self.public)
            .field("issuer", &any.map(|v| &v.iss))
            .field("audience", &any.map(|v| &v.aud))
            .finish()
    }
}

/// One public key: what it verifies (an algorithm, and a key id when it came from a JWKS
/// file), and where it came from, for logs.
#[derive(Clone)]
pub struct PublicKey {
    pub alg: Algorithm,
    pub kid: Option<String>,
    pub source: String,
    key: DecodingKey,
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?} key {}", self.alg, self.source)
    }
}

/// What a verifier accepts.
#[derive(Clone, Default)]
pub struct KeySettings {
    /// HS256 secrets; the first one is the one the server signs with (when it signs at all).
    pub secrets: Vec<String>,
    /// PEM files of public keys (RSA, EC P-256, Ed25519), one key each.
    pub public_key_files: Vec<PathBuf>,
    /// A JWKS file (`{"keys": [...]}`).
    pub jwks_file: Option<PathBuf>,
    /// `iss` that tokens must carry, when set.
    pub issuer: Option<String>,
    /// `aud` that tokens must name, when set.
    pub audience: Option<String>,
}

impl std::fmt::Debug for KeySettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySettings")
            .field("secrets", &self.secrets.len())
            .field("public_key_files", &self.public_key_files)
            .field("jwks_file", &self.jwks_file)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish()
    }
}

impl KeySettings {
    /// The files keys are read from.
    pub fn files(&self) -> Vec<&Path> {
        self.public_key_files
            .iter()
            .chain(&self.jwks_file)
            .map(PathBuf::as_path)
            .collect()
    }
}

/// A key file that cannot be used, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyError {
    /// The file (and the key in it, for a JWKS file).
    pub source: String,
    pub why: String,
}

impl std::fmt::Display for KeyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.source, self.why)
    }
}

impl std::error::Error for KeyError {}

fn key_error(source: &str, why: impl Into<String>) -> KeyError {
    KeyError {
        source: source.to_string(),
        why: why.into(),
    }
}

/// The claims read here; jsonwebtoken checks `exp`, `nbf`, `iss` and `aud` itself.
#[derive(Deserialize)]
struct TokenClaims {
    sub: String,
    #[serde(default)]
    iat: Option<Value>,
    /// `"publish"` for a publisher's token (PROTOCOL.md section 11); anything else, or none,
    /// is a user's token (an identity provider's OAuth `scope` list among them).
    #[serde(default)]
    scope: Option<Value>,
    /// A publisher token for one run alone (a webhook agent's).
    #[serde(default)]
    run: Option<Value>,
    /// Every other claim, read only so that it is checked: RFC 7519 wants the claims to be
    /// valid JSON, and serde skips unread values without looking (found by fuzzing).
    #[serde(flatten)]
    _rest: serde_json::Map<String, Value>,
}

/// A NumericDate (RFC 7519: seconds, possibly fractional).
fn numeric_date(v: &Value) -> Option<f64> {
    v.as_f64().filter(|t| t.is_finite() && *t >= 0.0)
}

impl Verifier {
    /// A verifier of the secrets, issuer and audience of `settings` and of `public` keys (the
    /// key files of `settings` are not read: see [`Verifier::load`]).
    pub fn new(settings: &KeySettings, public: Vec<PublicKey>) -> Verifier {
        Verifier {
            secrets: settings
                .secrets
                .iter()
                .map(|s| DecodingKey::from_secret(s.as_bytes()))
                .collect(),
            public,
            validations: std::iter::once(Algorithm::HS256)
                .chain(PUBLIC_KEY_ALGORITHMS)
                .map(|alg| (alg, validation(alg, settings)))
                .collect(),
        }
    }

    /// Reads the key files of `settings` and builds a verifier of everything in it. Also
    /// returns warnings about keys of a JWKS file that were skipped (for other algorithms or
    /// for encryption).
    pub fn load(settings: &KeySettings) -> Result<(Verifier, Vec<String>), KeyError> {
        let mut public = Vec::new();
        let mut warnings = Vec::new();
        for path in &settings.public_key_files {
            let source = path.display().to_string();
            let pem = std::fs::read(path).map_err(|e| key_error(&source, e.to_string()))?;
            public.push(public_key_from_pem(&pem, &source)?);
        }
        if let Some(path) = &settings.jwks_file {
            let source = path.display().to_string();
            let json = std::fs::read(path).map_err(|e| key_error(&source, e.to_string()))?;
            let (keys, skipped) = keys_from_jwks(&json, &source)?;
            public.extend(keys);
            warnings.extend(skipped);
        }
        Ok((Verifier::new(settings, public), warnings))
    }

    /// The public keys, for logs.
    pub fn public_keys(&self) -> &[PublicKey] {
        &self.public
    }

    /// A verifier of HS256 tokens signed with `secret`, with no issuer or audience.
    pub fn hs256(secret: &str) -> Verifier {
        let settings = KeySettings {
            secrets: vec![secret.to_string()],
            ..KeySettings::default()
        };
        Verifier::new(&settings, Vec::new())
    }

    /// Checks `token` and returns its user id (`sub`). Tries each key that may have signed it
    /// (those of its algorithm; for a `kid` that names keys of a JWKS file, only those); the
    /// first whose signature matches decides: its claims must then be valid now.
    pub fn verify(&self, token: &str) -> Result<String, AuthError> {
        self.verify_principal(token).map(|p| p.sub)
    }

    /// As [`verify`](Self::verify), with what the token may do: act as a user, or publish.
    pub fn verify_principal(&self, token: &str) -> Result<Principal, AuthError> {
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
        let Some((_, validation)) = self.validations.iter().find(|(a, _)| *a == header.alg) else {
            return Err(AuthError::Invalid);
        };
        let keys: Vec<&DecodingKey> = if header.alg == Algorithm::HS256 {
            self.secrets.iter().collect()
        } else {
            let of_alg = || self.public.iter().filter(|k| k.alg == header.alg);
            let named: Vec<&DecodingKey> = match header.kid.as_deref() {
                Some(kid) => of_alg()
                    .filter(|k| k.kid.as_deref() == Some(kid))
                    .map(|k| &k.key)
                    .collect(),
                None => Vec::new(),
            };
            if named.is_empty() {
                of_alg().map(|k| &k.key).collect()
            } else {
                named
            }
        };
        for key in keys {
            match decode::<TokenClaims>(token, key, validation) {
                Ok(data) => return check_claims(data.claims, header.alg == Algorithm::HS256),
                Err(e) if *e.kind() == ErrorKind::InvalidSignature => continue,
                Err(e) => return Err(refusal(e.kind())),
            }
        }
        Err(AuthError::Invalid)
    }
}

/// Who a verified token speaks for, and what it may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// A user's id, or a publishing service's name.
    pub sub: String,
    pub scope: Scope,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Opens the user's streams, starts and answers the user's runs.
    User,
    /// Publishes runs for users (section 11): its own, or only `run` when set.
    Publisher { run: Option<String> },
}

/// The checks jsonwebtoken leaves to us: `iat` not in the future, the user id, and the scope.
/// Only a token signed with one of the server's own secrets (`own`) can be a publisher's: an
/// identity provider's keys speak for users, and a `scope: "publish"` it signed is a user's.
fn check_claims(claims: TokenClaims, own: bool) -> Result<Principal, AuthError> {
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
    let publish = own && matches!(&claims.scope, Some(Value::String(s)) if s == "publish");
    let scope = match (publish, &claims.run) {
        (true, None) => Scope::Publisher { run: None },
        (true, Some(Value::String(run))) => Scope::Publisher {
            run: Some(run.clone()),
        },
        // A run named where it means nothing, or not as a string: not a token we made.
        (_, Some(_)) => return Err(AuthError::Invalid),
        (false, None) => Scope::User,
    };
    Ok(Principal {
        sub: claims.sub,
        scope,
    })
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

/// Reads one public key from a PEM file's contents (`-----BEGIN PUBLIC KEY-----`, or
/// `RSA PUBLIC KEY`): RSA of at least [`MIN_RSA_BITS`] bits (RS256), EC on P-256 (ES256) or
/// Ed25519 (EdDSA). A private key or a certificate is refused with a hint.
pub fn public_key_from_pem(pem: &[u8], source: &str) -> Result<PublicKey, KeyError> {
    let text = std::str::from_utf8(pem).map_err(|_| key_error(source, "not a PEM file"))?;
    let label = text
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("-----BEGIN ")
                .and_then(|r| r.strip_suffix("-----"))
        })
        .ok_or_else(|| key_error(source, "not a PEM file (no -----BEGIN line)"))?;
    match label {
        "PUBLIC KEY" | "RSA PUBLIC KEY" => {}
        l if l.contains("PRIVATE KEY") => {
            return Err(key_error(
                source,
                "holds a private key: give the public key only (openssl pkey -in KEY -pubout)",
            ))
        }
        "CERTIFICATE" => {
            return Err(key_error(
                source,
                "is a certificate: give its public key (openssl x509 -in CERT -pubkey -noout)",
            ))
        }
        other => {
            return Err(key_error(
                source,
                format!("holds a {other}, not a public key"),
            ))
        }
    }
    let (alg, key) = if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
        (Algorithm::RS256, key)
    } else if let Ok(key) = DecodingKey::from_ec_pem(pem) {
        (Algorithm::ES256, key)
    } else if let Ok(key) = DecodingKey::from_ed_pem(pem) {
        (Algorithm::EdDSA, key)
    } else {
        return Err(key_error(
            source,
            "not an RSA, EC or Ed25519 public key (or not valid PEM)",
        ));
    };
    check_key(&key, alg).map_err(|why| key_error(source, why))?;
    Ok(PublicKey {
        alg,
        kid: None,
        source: source.to_string(),
        key,
    })
}

/// Reads the keys of a JWKS document (`{"keys": [...]}`). RSA keys verify RS256, EC keys on
/// P-256 ES256 and OKP keys on Ed25519 EdDSA (a key's `alg`, when given, must be that one).
/// Keys for encryption (`use: enc`), symmetric keys and keys of other algorithms are skipped,
/// each with a warning (the second part of the answer); a malformed key of a supported kind,
/// or a document without one usable key, is an error.
pub fn keys_from_jwks(
    json: &[u8],
    source: &str,
) -> Result<(Vec<PublicKey>, Vec<String>), KeyError> {
    let doc: Value =
        serde_json::from_slice(json).map_err(|e| key_error(source, format!("not JSON: {e}")))?;
    let Some(entries) = doc.get("keys").and_then(Value::as_array) else {
        return Err(key_error(source, "not a JWKS document: no \"keys\" array"));
    };
    let mut keys = Vec::new();
    let mut skipped = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        let name = match entry.get("kid").and_then(Value::as_str) {
            Some(kid) => format!("{source} key {kid:?}"),
            None => format!("{source} key #{i}"),
        };
        let jwk: Jwk = serde_json::from_value(entry.clone())
            .map_err(|e| key_error(&name, format!("not a JWK: {e}")))?;
        if jwk.common.public_key_use == Some(PublicKeyUse::Encryption) {
            skipped.push(format!("{name}: skipped, it is for encryption (use: enc)"));
            continue;
        }
        let declared = jwk.common.key_algorithm;
        let alg = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => Algorithm::RS256,
            AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => {
                Algorithm::ES256
            }
            AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
                Algorithm::EdDSA
            }
            AlgorithmParameters::OctetKey(_) => {
                skipped.push(format!(
                    "{name}: skipped, a symmetric key does not belong in a JWKS file (use --jwt-secret)"
                ));
                continue;
            }
            _ => {
                skipped.push(format!(
                    "{name}: skipped, only RSA, EC P-256 and Ed25519 keys are supported"
                ));
                continue;
            }
        };
        let declared_ok = match declared {
            None => true,
            Some(KeyAlgorithm::RS256) => alg == Algorithm::RS256,
            Some(KeyAlgorithm::ES256) => alg == Algorithm::ES256,
            Some(KeyAlgorithm::EdDSA) => alg == Algorithm::EdDSA,
            Some(_) => false,
        };
        if !declared_ok {
            skipped.push(format!(
                "{name}: skipped, its alg {declared:?} is not one of RS256, ES256, EdDSA"
            ));
            continue;
        }
        let key = DecodingKey::from_jwk(&jwk).map_err(|e| key_error(&name, e.to_string()))?;
        check_key(&key, alg).map_err(|why| key_error(&name, why))?;
        keys.push(PublicKey {
            alg,
            kid: jwk.common.key_id.clone(),
            source: name,
            key,
        });
    }
    if keys.is_empty() {
        return Err(key_error(
            source,
            "no usable key (RSA, EC P-256 or Ed25519)",
        ));
    }
    Ok((keys, skipped))
}

/// Makes sure a public key can verify `alg` tokens: jsonwebtoken parses some keys only when a
/// token comes, and would report a bad key as a bad signature on every token.
fn check_key(key: &DecodingKey, alg: Algorithm) -> Result<(), String> {
    match alg {
        Algorithm::RS256 => {
            let parsed = match key.kind() {
                DecodingKeyKind::SecretOrDer(der) => {
                    rsa::pkcs1::DecodeRsaPublicKey::from_pkcs1_der(der).map_err(|e| e.to_string())
                }
                DecodingKeyKind::RsaModulusExponent { n, e } => rsa::RsaPublicKey::new(
                    rsa::BigUint::from_bytes_be(n),
                    rsa::BigUint::from_bytes_be(e),
                )
                .map_err(|e| e.to_string()),
            };
            let parsed: rsa::RsaPublicKey =
                parsed.map_err(|e| format!("not a usable RSA public key: {e}"))?;
            let bits = parsed.size() * 8;
            if bits < MIN_RSA_BITS {
                return Err(format!(
                    "an RSA key of {bits} bits is too weak: at least {MIN_RSA_BITS}"
                ));
            }
            Ok(())
        }
        Algorithm::ES256 => probe(key, alg, "eyJhbGciOiJFUzI1NiJ9")
            .map_err(|_| "not a usable EC public key on P-256 (ES256)".to_string()),
        Algorithm::EdDSA => {
            // jsonwebtoken slices the key to 32 bytes without checking its length (a panic).
            if key.try_get_as_bytes().map(<[u8]>::len) != Ok(32) {
                return Err("not an Ed25519 public key (32 bytes)".into());
            }
            probe(key, alg, "eyJhbGciOiJFZERTQSJ9")
                .map_err(|_| "not a usable Ed25519 public key".to_string())
        }
        _ => Err(format!("{alg:?} is not accepted")),
    }
}

/// Verifies a token with no valid signature (header `encoded_header`, claims `{}`): the key
/// is parsed first, so an error other than a bad signature means the key is unusable.
fn probe(key: &DecodingKey, alg: Algorithm, encoded_header: &str) -> Result<(), ()> {
    let token = format!("{encoded_header}.e30.AAAA");
    let mut v = Validation::new(alg);
    v.required_spec_claims.clear();
    v.validate_exp = false;
    match decode::<Value>(&token, key, &v) {
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::InvalidEcdsaKey
                    | ErrorKind::InvalidEddsaKey
                    | ErrorKind::InvalidKeyFormat
                    | ErrorKind::InvalidAlgorithm
            ) =>
        {
            Err(())
        }
        _ => Ok(()),
    }
}

/// A file's modification time and size: a change in either means it was rewritten.
type Stamp = Option<(SystemTime, u64)>;

fn stamp(path: &Path) -> Stamp {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// The server's current verifier, and what to rebuild it from.
pub struct KeyStore {
    settings: KeySettings,
    current: RwLock<Arc<Verifier>>,
    /// The stamps of the key files when they were last read.
    stamps: Mutex<Vec<Stamp>>,
}

impl std::fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyStore")
            .field("settings", &self.settings)
            .finish()
    }
}

impl KeyStore {
    /// Loads the keys of `settings`; an unusable key file is an error. Skipped keys of a JWKS
    /// file are logged as warnings.
    pub fn load(settings: KeySettings) -> Result<KeyStore, KeyError> {
        let stamps = settings.files().iter().map(|p| stamp(p)).collect();
        let (verifier, warnings) = Verifier::load(&settings)?;
        for w in warnings {
            log::warn!("{w}");
        }
        if !verifier.public.is_empty() {
            log::info!("public keys: {:?}", verifier.public);
        }
        Ok(KeyStore {
            settings,
            current: RwLock::new(Arc::new(verifier)),
            stamps: Mutex::new(stamps),
        })
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
    pub fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        self.verifier().verify_principal(token)
    }

    /// True when keys come from files (and so may be reloaded).
    pub fn has_files(&self) -> bool {
        !self.settings.files().is_empty()
    }

    /// Reads the key files again and puts the new keys in force; on any error the keys in
    /// force stay and the error is logged as a warning. `why` is for the log.
    pub fn reload(&self, why: &str) -> Result<(), KeyError> {
        let now = self.settings.files().iter().map(|p| stamp(p)).collect();
        match self.stamps.lock() {
            Ok(mut stamps) => *stamps = now,
            Err(poisoned) => *poisoned.into_inner() = now,
        }
        match Verifier::load(&self.settings) {
            Ok((verifier, warnings)) => {
                for w in warnings {
                    log::warn!("{w}");
                }
                log::info!("keys reloaded ({why}): {:?}", verifier.public);
                let fresh = Arc::new(verifier);
                match self.current.write() {
                    Ok(mut current) => *current = fresh,
                    Err(poisoned) => *poisoned.into_inner() = fresh,
                }
                Ok(())
            }
            Err(e) => {
                log::warn!("keys not reloaded ({why}), keeping the previous ones: {e}");
                Err(e)
            }
        }
    }

    /// Reloads when a key file's modification time or size changed since it was last read.
    /// None when nothing changed.
    pub fn reload_if_changed(&self) -> Option<Result<(), KeyError>> {
        let now: Vec<Stamp> = self.settings.files().iter().map(|p| stamp(p)).collect();
        let changed = match self.stamps.lock() {
            Ok(stamps) => *stamps != now,
            Err(poisoned) => *poisoned.into_inner() != now,
        };
        changed.then(|| self.reload("a key file changed"))
    }
}

/// Reloads `store`'s keys on each signal of `hangup` (SIGHUP) and whenever a key file changes
/// (checked every `every`). Runs until dropped.
pub async fn watch(
    store: Arc<KeyStore>,
    every: Duration,
    mut hangup: Option<actix_web::rt::signal::unix::Signal>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        let hup = async {
            match hangup.as_mut() {
                Some(h) => h.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            got = hup => {
                if got.is_none() {
                    hangup = None;
                    continue;
                }
                let _ = store.reload("SIGHUP");
            }
            _ = tick.tick() => {
                let _ = store.reload_if_changed();
            }
        }
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
    fn scopes_are_read_from_the_claims() {
        let v = Verifier::hs256("s");
        let exp = now_unix() + 60;
        let scope = |claims: Value| v.verify_principal(&hs("s", &claims)).map(|p| p.scope);
        assert_eq!(scope(json!({"sub": "a", "exp": exp})), Ok(Scope::User));
        assert_eq!(
            scope(json!({"sub": "a", "exp": exp, "scope": "openid profile"})),
            Ok(Scope::User),
            "an identity provider's OAuth scopes are a user's"
        );
        assert_eq!(
            scope(json!({"sub": "svc", "exp": exp, "scope": "publish"})),
            Ok(Scope::Publisher { run: None })
        );
        assert_eq!(
            scope(json!({"sub": "svc", "exp": exp, "scope": "publish", "run": "run_1"})),
            Ok(Scope::Publisher {
                run: Some("run_1".into())
            })
        );
        for odd in [
            json!({"sub": "a", "exp": exp, "run": "run_1"}),
            json!({"sub": "a", "exp": exp, "scope": "publish", "run": 5}),
        ] {
            assert_eq!(scope(odd.clone()), Err(AuthError::Invalid), "{odd}");
        }
        let signer = crate::auth::Signer::new("s", None, None);
        assert_eq!(
            v.verify_principal(&signer.sign_publisher("svc", exp, Some("run_2"))),
            Ok(Principal {
                sub: "svc".into(),
                scope: Scope::Publisher {
                    run: Some("run_2".into())
                }
            })
        );
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
        let v = Verifier::new(&settings(&["new", "old", "older"]), Vec::new());
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
        let with = KeySettings {
            issuer: Some("https://id.example".into()),
            audience: Some("agentcast".into()),
            ..settings(&["s"])
        };
        let v = Verifier::new(&with, Vec::new());
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

    macro_rules! fixture {
        ($name:literal) => {
            include_bytes!(concat!("../tests/fixtures/keys/", $name)).as_slice()
        };
    }

    fn signed(alg: Algorithm, private_pem: &[u8], kid: Option<&str>, claims: &Value) -> String {
        let key = match alg {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(private_pem),
            Algorithm::ES256 => EncodingKey::from_ec_pem(private_pem),
            Algorithm::EdDSA => EncodingKey::from_ed_pem(private_pem),
            _ => panic!("{alg:?}"),
        }
        .unwrap();
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_string);
        encode(&header, claims, &key).unwrap()
    }

    fn claims(sub: &str) -> Value {
        json!({"sub": sub, "exp": now_unix() + 60})
    }

    #[test]
    fn only_the_servers_own_secret_makes_publishers() {
        let ed = public_key_from_pem(fixture!("ed.pub.pem"), "ed").unwrap();
        let v = Verifier::new(&KeySettings::default(), vec![ed]);
        let exp = now_unix() + 60;
        let from_idp = signed(
            Algorithm::EdDSA,
            fixture!("ed.key.pem"),
            None,
            &json!({"sub": "mallory", "exp": exp, "scope": "publish"}),
        );
        assert_eq!(
            v.verify_principal(&from_idp).map(|p| p.scope),
            Ok(Scope::User),
            "an identity provider's `scope: publish` is a user's"
        );
        let with_run = signed(
            Algorithm::EdDSA,
            fixture!("ed.key.pem"),
            None,
            &json!({"sub": "mallory", "exp": exp, "scope": "publish", "run": "run_1"}),
        );
        assert_eq!(v.verify_principal(&with_run), Err(AuthError::Invalid));
    }

    #[test]
    fn pem_public_keys_of_each_kind() {
        let rsa = public_key_from_pem(fixture!("rsa.pub.pem"), "rsa").unwrap();
        let ec = public_key_from_pem(fixture!("ec.pub.pem"), "ec").unwrap();
        let ed = public_key_from_pem(fixture!("ed.pub.pem"), "ed").unwrap();
        assert_eq!(
            (rsa.alg, ec.alg, ed.alg),
            (Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA)
        );
        let v = Verifier::new(&KeySettings::default(), vec![rsa, ec, ed]);
        for (alg, key, other) in [
            (
                Algorithm::RS256,
                fixture!("rsa.key.pem"),
                fixture!("rsa-other.key.pem"),
            ),
            (
                Algorithm::ES256,
                fixture!("ec.key.pem"),
                fixture!("ec-other.key.pem"),
            ),
            (
                Algorithm::EdDSA,
                fixture!("ed.key.pem"),
                fixture!("ed-other.key.pem"),
            ),
        ] {
            assert_eq!(
                v.verify(&signed(alg, key, None, &claims("a"))),
                Ok("a".into()),
                "{alg:?}"
            );
            assert_eq!(
                v.verify(&signed(alg, other, None, &claims("a"))),
                Err(AuthError::Invalid),
                "{alg:?} signed with another key"
            );
            // Times and user ids are checked as for HS256 tokens.
            let early = json!({"sub": "a", "exp": now_unix() + 60, "nbf": now_unix() + 60});
            assert_eq!(
                v.verify(&signed(alg, key, None, &early)),
                Err(AuthError::NotYetValid)
            );
            assert_eq!(
                v.verify(&signed(alg, key, None, &claims(" a"))),
                Err(AuthError::BadSubject)
            );
        }
        // No secret is configured: no HS256 token passes, not even one whose secret is the
        // bytes of a public key (the classic algorithm confusion).
        let confused = encode(
            &Header::new(Algorithm::HS256),
            &claims("a"),
            &EncodingKey::from_secret(fixture!("rsa.pub.pem")),
        )
        .unwrap();
        assert_eq!(v.verify(&confused), Err(AuthError::Invalid));
    }

    #[test]
    fn unusable_pem_files_are_refused_with_a_reason() {
        for (name, pem, why) in [
            ("private RSA", fixture!("rsa.key.pem"), "private key"),
            ("private EC", fixture!("ec.key.pem"), "private key"),
            ("certificate", fixture!("ec.cert.pem"), "certificate"),
            ("P-384", fixture!("ec-p384.pub.pem"), "P-256"),
            ("RSA 1024", fixture!("rsa-1024.pub.pem"), "too weak"),
            ("garbage", b"hello".as_slice(), "not a PEM file"),
            ("empty", b"".as_slice(), "not a PEM file"),
            ("truncated", &fixture!("rsa.pub.pem")[..200], "not an RSA"),
            (
                "bad base64",
                b"-----BEGIN PUBLIC KEY-----\n!!!!\n-----END PUBLIC KEY-----\n".as_slice(),
                "not an RSA",
            ),
        ] {
            let e = public_key_from_pem(pem, "f.pem").expect_err(name);
            assert!(e.why.contains(why), "{name}: {e}");
            assert!(e.to_string().starts_with("f.pem: "), "{name}: {e}");
        }
    }

    fn jwk(alg: Algorithm, private_pem: &[u8], kid: &str) -> Value {
        let key = match alg {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(private_pem),
            Algorithm::ES256 => EncodingKey::from_ec_pem(private_pem),
            _ => EncodingKey::from_ed_pem(private_pem),
        }
        .unwrap();
        let mut jwk = Jwk::from_encoding_key(&key, alg).unwrap();
        jwk.common.key_id = Some(kid.into());
        serde_json::to_value(jwk).unwrap()
    }

    #[test]
    fn jwks_keys_and_kid() {
        let doc = json!({"keys": [
            jwk(Algorithm::RS256, fixture!("rsa.key.pem"), "a"),
            jwk(Algorithm::RS256, fixture!("rsa-other.key.pem"), "b"),
            jwk(Algorithm::ES256, fixture!("ec.key.pem"), "c"),
            jwk(Algorithm::EdDSA, fixture!("ed.key.pem"), "d"),
            {"kty": "oct", "k": "c2VjcmV0", "kid": "sym"},
            {"kty": "RSA", "use": "enc", "kid": "e", "n": "AQAB", "e": "AQAB"},
        ]});
        let (keys, skipped) = keys_from_jwks(doc.to_string().as_bytes(), "jwks.json").unwrap();
        assert_eq!(keys.len(), 4, "{keys:?}");
        assert_eq!(skipped.len(), 2, "{skipped:?}");
        let v = Verifier::new(&KeySettings::default(), keys);
        let rsa_a = fixture!("rsa.key.pem");
        let rsa_b = fixture!("rsa-other.key.pem");
        assert_eq!(
            v.verify(&signed(Algorithm::RS256, rsa_a, Some("a"), &claims("x"))),
            Ok("x".into())
        );
        assert_eq!(
            v.verify(&signed(Algorithm::RS256, rsa_b, Some("b"), &claims("x"))),
            Ok("x".into())
        );
        // A kid that names a key: only that key is tried.
        assert_eq!(
            v.verify(&signed(Algorithm::RS256, rsa_a, Some("b"), &claims("x"))),
            Err(AuthError::Invalid)
        );
        // No kid, or one naming no key: every key of the algorithm is tried.
        assert_eq!(
            v.verify(&signed(Algorithm::RS256, rsa_b, None, &claims("x"))),
            Ok("x".into())
        );
        assert_eq!(
            v.verify(&signed(Algorithm::RS256, rsa_b, Some("zz"), &claims("x"))),
            Ok("x".into())
        );
        // A kid of a key of another algorithm does not matter.
        assert_eq!(
            v.verify(&signed(Algorithm::RS256, rsa_a, Some("c"), &claims("x"))),
            Ok("x".into())
        );
        assert_eq!(
            v.verify(&signed(
                Algorithm::ES256,
                fixture!("ec.key.pem"),
                Some("c"),
                &claims("x")
            )),
            Ok("x".into())
        );
        assert_eq!(
            v.verify(&signed(
                Algorithm::EdDSA,
                fixture!("ed.key.pem"),
                Some("d"),
                &claims("x")
            )),
            Ok("x".into())
        );
    }

    #[test]
    fn unusable_jwks_files_are_refused() {
        let good = jwk(Algorithm::RS256, fixture!("rsa.key.pem"), "a");
        let mut short_ed = jwk(Algorithm::EdDSA, fixture!("ed.key.pem"), "d");
        short_ed["x"] = json!("AAAA");
        let mut bad_kid = good.clone();
        bad_kid["kid"] = json!(5);
        let mut weak = jwk(Algorithm::RS256, fixture!("rsa.key.pem"), "w");
        weak["n"] = json!("AQAB");
        for (name, doc, why) in [
            ("not JSON", "{".to_string(), "not JSON"),
            ("no keys", json!({"k": []}).to_string(), "no \"keys\""),
            ("empty", json!({"keys": []}).to_string(), "no usable key"),
            (
                "only skipped",
                json!({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}).to_string(),
                "no usable key",
            ),
            (
                "short Ed25519",
                json!({"keys": [good.clone(), short_ed]}).to_string(),
                "Ed25519",
            ),
            (
                "weak RSA",
                json!({"keys": [good.clone(), weak]}).to_string(),
                "RSA",
            ),
            (
                "kid not a string",
                json!({"keys": [good, bad_kid]}).to_string(),
                "not a JWK",
            ),
        ] {
            let e = keys_from_jwks(doc.as_bytes(), "j.json").expect_err(name);
            assert!(e.why.contains(why), "{name}: {e}");
        }
    }

    #[test]
    fn key_store_reloads_and_keeps_old_keys_on_a_bad_file() {
        let dir = std::env::temp_dir().join(format!("agentcast-keys-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("key.pem");
        std::fs::write(&path, fixture!("ed.pub.pem")).unwrap();
        let store = KeyStore::load(KeySettings {
            public_key_files: vec![path.clone()],
            ..KeySettings::default()
        })
        .unwrap();
        let by_first = signed(Algorithm::EdDSA, fixture!("ed.key.pem"), None, &claims("a"));
        let by_second = signed(
            Algorithm::EdDSA,
            fixture!("ed-other.key.pem"),
            None,
            &claims("b"),
        );
        assert!(store.verify(&by_first).is_ok());
        assert!(store.reload_if_changed().is_none(), "nothing changed yet");
        std::fs::write(&path, fixture!("ed-other.pub.pem")).unwrap();
        store.reload("test").unwrap();
        assert!(store.verify(&by_first).is_err());
        assert_eq!(store.verify(&by_second).map(|p| p.sub), Ok("b".into()));
        std::fs::write(&path, b"not a key").unwrap();
        assert!(store.reload("test").is_err());
        assert_eq!(
            store.verify(&by_second).map(|p| p.sub),
            Ok("b".into()),
            "the old keys stay"
        );
        std::fs::remove_file(&path).unwrap();
        assert!(store.reload("test").is_err());
        assert_eq!(
            store.verify(&by_second).map(|p| p.sub),
            Ok("b".into()),
            "the old keys stay"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
