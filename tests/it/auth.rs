//! Authentication and the edge of the server, against real servers on 127.0.0.1: who may
//! connect (user ids, token times, keys, issuers and audiences, origins) and how the server
//! answers what it refuses (Basic credentials, oversized requests, a full server).
//!
//! Helpers that only these tests need live in this file; the shared ones come from
//! `tests/it/common`.

use std::process::Stdio;

use crate::common::*;
use serde_json::{json, Value};

/// A secret long enough for the server's minimum (32 bytes).
const LONG_SECRET: &str = "edge-tests-secret-0123456789abcdef-0123456789";

/// `test_config()` with a secret of acceptable length.
fn config() -> agentcast::Config {
    agentcast::Config {
        jwt_secret: Some(LONG_SECRET.into()),
        ..test_config()
    }
}

fn dev_config() -> agentcast::Config {
    agentcast::Config {
        jwt_secret: None,
        ..test_config()
    }
}

fn in_an_hour() -> u64 {
    now_unix() + 3600
}

/// A plain GET of `path` (no upgrade): the 401/403/400 of the streaming routes comes before
/// any upgrade, so the JSON body can be read.
async fn get(
    server: &agentcast::RunningServer,
    path: &str,
    headers: &[(&str, &str)],
) -> HttpResponse {
    http_full(server.addr(), "GET", path, headers, "").await
}

/// Asserts a JSON error `{code, message}` with this status and returns the message.
fn assert_json_error(r: &HttpResponse, status: u16, code: &str, what: &str) -> String {
    assert_eq!(r.status, status, "{what}: {r:?}");
    let body: Value = serde_json::from_str(&r.body)
        .unwrap_or_else(|e| panic!("{what}: the body is not JSON ({e}): {r:?}"));
    assert_eq!(body["code"], json!(code), "{what}: {body}");
    let message = body["message"]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: no message: {body}"));
    assert!(!message.is_empty(), "{what}: empty message");
    message.to_string()
}

/// Connects a real WebSocket client with `?token=`; Ok(user_id from welcome) or Err(status).
async fn ws_connect(server: &agentcast::RunningServer, token: &str) -> Result<String, String> {
    let url = format!("{}?token={}", server.ws_url(), percent_encode(token));
    match Client::try_connect(&url, None).await {
        Ok(c) => Ok(c.welcome()["user_id"]
            .as_str()
            .unwrap_or_default()
            .to_string()),
        Err(e) => Err(describe_error(&e)),
    }
}

/// The metric `agentcast_auth_failures_total{reason=…}`.
async fn auth_failures(server: &agentcast::RunningServer, reason: &str) -> f64 {
    scrape(server.addr()).await.get(&format!(
        "agentcast_auth_failures_total{{reason=\"{reason}\"}}"
    ))
}

/// Runs `agentcast ARGS` with only the given `AGENTCAST_*` variables set.
async fn run_cli(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_agentcast"));
    cmd.args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .env("RUST_LOG", "warn");
    for (k, _) in std::env::vars() {
        if k.starts_with("AGENTCAST_") {
            cmd.env_remove(k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    match tokio::time::timeout(TIMEOUT, cmd.output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => panic!("running agentcast {args:?}: {e}"),
        Err(_) => panic!("agentcast {args:?} did not finish within {TIMEOUT:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// User ids

/// One of each kind of id that must be refused, with a name for messages.
fn bad_user_ids() -> Vec<(&'static str, String)> {
    vec![
        ("zero-width space U+200B", "ali\u{200B}ce".into()),
        ("right-to-left override U+202E", "ali\u{202E}ce".into()),
        ("BOM U+FEFF", "\u{FEFF}alice".into()),
        ("no-break space U+00A0", "ali\u{A0}ce".into()),
        ("ideographic space U+3000", "ali\u{3000}ce".into()),
        ("line separator U+2028", "ali\u{2028}ce".into()),
        ("tab", "ali\tce".into()),
        ("leading space", " alice".into()),
        ("trailing space", "alice ".into()),
        ("only spaces", "   ".into()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_with_unprintable_user_ids_are_refused() {
    let server = start(config());
    for (what, sub) in bad_user_ids() {
        let token = sign_claims(LONG_SECRET, &json!({ "sub": sub, "exp": in_an_hour() }));
        let r = get(
            &server,
            &format!("/v1/ws?token={}", percent_encode(&token)),
            &[],
        )
        .await;
        let message = assert_json_error(&r, 401, "unauthorized", what);
        assert!(message.contains("sub"), "{what}: {message}");
        let e = ws_connect(&server, &token).await.expect_err(what);
        assert!(e.starts_with("HTTP 401"), "{what}: {e}");
        // The SSE stream and the HTTP API refuse it the same way.
        let bearer = format!("Bearer {token}");
        let r = get(&server, "/v1/agents", &[("Authorization", &bearer)]).await;
        assert_json_error(&r, 401, "unauthorized", what);
    }
    assert_eq!(
        auth_failures(&server, "bad_subject").await,
        3.0 * bad_user_ids().len() as f64
    );
    // Inner spaces and non-Latin letters are printable.
    for ok in ["alice smith", "アリス", "Ωμέγα"] {
        let token = sign_claims(LONG_SECRET, &json!({ "sub": ok, "exp": in_an_hour() }));
        assert_eq!(ws_connect(&server, &token).await, Ok(ok.to_string()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_token_route_refuses_unprintable_user_ids() {
    let server = start(dev_config());
    for (what, user) in bad_user_ids() {
        let body = json!({ "user": user }).to_string();
        let r = http_full(server.addr(), "POST", "/v1/dev/token", &[], &body).await;
        let message = assert_json_error(&r, 400, "invalid_field", what);
        assert!(message.contains("user"), "{what}: {message}");
    }
    let r = http_full(
        server.addr(),
        "POST",
        "/v1/dev/token",
        &[],
        r#"{"user":"alice smith"}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_token_refuses_unprintable_user_ids() {
    let env = [("AGENTCAST_JWT_SECRET", LONG_SECRET)];
    for (what, user) in bad_user_ids() {
        let out = run_cli(&["token", &user], &env).await;
        assert_eq!(out.status.code(), Some(2), "{what}: {out:?}");
        assert!(out.stdout.is_empty(), "{what}: printed a token");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("USER"), "{what}: {stderr}");
    }
    let out = run_cli(&["token", "alice smith"], &env).await;
    assert!(out.status.success(), "{out:?}");
}

// ---------------------------------------------------------------------------------------------
// Token times

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_not_valid_yet_are_refused() {
    let server = start(config());
    let now = now_unix();
    let exp = now + 3600;
    let early = [
        (
            "nbf in a minute",
            json!({"sub": "alice", "exp": exp, "nbf": now + 60}),
        ),
        (
            "iat in a minute",
            json!({"sub": "alice", "exp": exp, "iat": now + 60}),
        ),
        (
            "both",
            json!({"sub": "alice", "exp": exp, "nbf": now + 600, "iat": now + 600}),
        ),
    ];
    for (what, claims) in &early {
        let token = sign_claims(LONG_SECRET, claims);
        let r = get(&server, &format!("/v1/ws?token={token}"), &[]).await;
        let message = assert_json_error(&r, 401, "unauthorized", what);
        assert!(
            message.contains("the token is not valid yet"),
            "{what}: {message}"
        );
        let e = ws_connect(&server, &token).await.expect_err(what);
        assert!(e.starts_with("HTTP 401"), "{what}: {e}");
        let r = get(&server, &format!("/v1/events?token={token}"), &[]).await;
        assert_json_error(&r, 401, "unauthorized", what);
    }
    assert_eq!(auth_failures(&server, "not_yet_valid").await, 9.0);
    // nbf and iat now or in the past are fine.
    let token = sign_claims(
        LONG_SECRET,
        &json!({"sub": "alice", "exp": exp, "nbf": now, "iat": now - 10}),
    );
    assert_eq!(ws_connect(&server, &token).await, Ok("alice".into()));
}

// ---------------------------------------------------------------------------------------------
// Several HS256 secrets; issuer and audience

const OLD_SECRET: &str = "edge-tests-old-secret-0123456789abcdef-01234";
const OLDER_SECRET: &str = "edge-tests-older-secret-0123456789abcdef-012";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn previous_secrets_verify_but_do_not_sign() {
    let server = start(agentcast::Config {
        jwt_previous_secrets: vec![OLD_SECRET.into(), OLDER_SECRET.into()],
        ..config()
    });
    for (secret, user) in [
        (LONG_SECRET, "new"),
        (OLD_SECRET, "old"),
        (OLDER_SECRET, "older"),
    ] {
        let token = agentcast::auth::sign(secret, user, in_an_hour());
        assert_eq!(ws_connect(&server, &token).await, Ok(user.to_string()));
    }
    let forged = agentcast::auth::sign(
        "edge-tests-unknown-secret-0123456789abcdef",
        "x",
        in_an_hour(),
    );
    assert!(ws_connect(&server, &forged).await.is_err());
    // The server signs with --jwt-secret only.
    assert_eq!(
        agentcast::auth::verify(LONG_SECRET, &server.token("alice")),
        Ok("alice".into())
    );
    assert!(agentcast::auth::verify(OLD_SECRET, &server.token("alice")).is_err());
}

#[test]
fn previous_secrets_need_a_current_one() {
    let config = agentcast::Config {
        jwt_secret: None,
        jwt_previous_secrets: vec![OLD_SECRET.into()],
        ..test_config()
    };
    let e = config.validate().expect_err("previous secrets alone");
    assert!(e.to_string().contains("--jwt-secret"), "{e}");
    assert!(agentcast::spawn(config).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issuer_and_audience_are_enforced_when_set() {
    let server = start(agentcast::Config {
        jwt_issuer: Some("https://id.example".into()),
        jwt_audience: Some("agentcast".into()),
        ..config()
    });
    let exp = in_an_hour();
    let good = json!({"sub": "alice", "exp": exp, "iss": "https://id.example", "aud": "agentcast"});
    assert_eq!(
        ws_connect(&server, &sign_claims(LONG_SECRET, &good)).await,
        Ok("alice".into())
    );
    let refused = [
        (
            "no iss",
            json!({"sub": "a", "exp": exp, "aud": "agentcast"}),
            "bad_issuer",
            "iss",
        ),
        (
            "other iss",
            json!({"sub": "a", "exp": exp, "iss": "https://evil.example", "aud": "agentcast"}),
            "bad_issuer",
            "iss",
        ),
        (
            "no aud",
            json!({"sub": "a", "exp": exp, "iss": "https://id.example"}),
            "bad_audience",
            "aud",
        ),
        (
            "other aud",
            json!({"sub": "a", "exp": exp, "iss": "https://id.example", "aud": "other"}),
            "bad_audience",
            "aud",
        ),
    ];
    for (what, claims, _, word) in &refused {
        let token = sign_claims(LONG_SECRET, claims);
        let r = get(&server, &format!("/v1/ws?token={token}"), &[]).await;
        let message = assert_json_error(&r, 401, "unauthorized", what);
        assert!(message.contains(word), "{what}: {message}");
    }
    assert_eq!(auth_failures(&server, "bad_issuer").await, 2.0);
    assert_eq!(auth_failures(&server, "bad_audience").await, 2.0);
    // The server's own tokens carry both, so they are accepted.
    assert_eq!(
        ws_connect(&server, &server.token("bob")).await,
        Ok("bob".into())
    );
    // So do the CLI's, given the same settings.
    let out = run_cli(
        &["token", "carol"],
        &[
            ("AGENTCAST_JWT_SECRET", LONG_SECRET),
            ("AGENTCAST_JWT_ISSUER", "https://id.example"),
            ("AGENTCAST_JWT_AUDIENCE", "agentcast"),
        ],
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(ws_connect(&server, &token).await, Ok("carol".into()));

    // Without an issuer configured, iss is not looked at.
    let plain = start(config());
    let token = sign_claims(
        LONG_SECRET,
        &json!({"sub": "a", "exp": exp, "iss": "anyone"}),
    );
    assert_eq!(ws_connect(&plain, &token).await, Ok("a".into()));
}

// ---------------------------------------------------------------------------------------------
// Public keys (PEM files, JWKS) and their reload

/// A fixture under tests/fixtures/keys.
fn fixture_path(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/keys")
        .join(name)
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(fixture_path(name)).unwrap_or_else(|e| panic!("fixture {name}: {e}"))
}

/// A token for `sub`, valid for an hour, signed with the private key in fixture `key`.
fn signed_with(alg: jsonwebtoken::Algorithm, key: &str, kid: Option<&str>, sub: &str) -> String {
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    let pem = fixture(key);
    let key = match alg {
        Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem),
        Algorithm::ES256 => EncodingKey::from_ec_pem(&pem),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem),
        other => panic!("no test keys for {other:?}"),
    }
    .unwrap_or_else(|e| panic!("fixture {key:?}: {e}"));
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&header, &json!({"sub": sub, "exp": in_an_hour()}), &key)
        .expect("signing a test token")
}

/// The JWK of the private key in fixture `key`, with key id `kid`.
fn jwk_of(alg: jsonwebtoken::Algorithm, key: &str, kid: &str) -> Value {
    use jsonwebtoken::{Algorithm, EncodingKey};
    let pem = fixture(key);
    let encoding = match alg {
        Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem),
        Algorithm::ES256 => EncodingKey::from_ec_pem(&pem),
        _ => EncodingKey::from_ed_pem(&pem),
    }
    .expect("fixture key");
    let mut jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&encoding, alg).expect("a JWK");
    jwk.common.key_id = Some(kid.into());
    serde_json::to_value(jwk).expect("JWK as JSON")
}

/// A directory of its own for one test's key files, removed on drop.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(test: &str) -> TempDir {
        let dir =
            std::env::temp_dir().join(format!("agentcast-auth-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating a temp dir");
        TempDir(dir)
    }

    /// Writes `name` (atomically: a rename, as deploy tools do) and returns its path.
    fn write(&self, name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let path = self.0.join(name);
        let tmp = self.0.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, bytes).expect("writing a key file");
        std::fs::rename(&tmp, &path).expect("renaming a key file");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A config with only public keys (no secret).
fn public_key_config(
    files: Vec<std::path::PathBuf>,
    jwks: Option<std::path::PathBuf>,
) -> agentcast::Config {
    agentcast::Config {
        jwt_secret: None,
        jwt_public_keys: files,
        jwks_file: jwks,
        ..test_config()
    }
}

/// Polls `check` every 50 ms until it is true, for at most TIMEOUT.
async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {TIMEOUT:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_key_tokens_are_accepted_with_matching_keys_only() {
    use jsonwebtoken::Algorithm::{EdDSA, ES256, RS256};
    let server = start(public_key_config(
        vec![
            fixture_path("rsa.pub.pem"),
            fixture_path("ec.pub.pem"),
            fixture_path("ed.pub.pem"),
        ],
        None,
    ));
    for (alg, key, other) in [
        (RS256, "rsa.key.pem", "rsa-other.key.pem"),
        (ES256, "ec.key.pem", "ec-other.key.pem"),
        (EdDSA, "ed.key.pem", "ed-other.key.pem"),
    ] {
        let good = signed_with(alg, key, None, "alice");
        assert_eq!(
            ws_connect(&server, &good).await,
            Ok("alice".into()),
            "{alg:?}"
        );
        let bearer = format!("Bearer {good}");
        assert_eq!(
            get(&server, "/v1/agents", &[("Authorization", &bearer)])
                .await
                .status,
            200
        );
        let forged = signed_with(alg, other, None, "alice");
        let r = get(&server, &format!("/v1/ws?token={forged}"), &[]).await;
        assert_json_error(
            &r,
            401,
            "unauthorized",
            &format!("{alg:?} signed with {other}"),
        );
    }
    // Only public keys: no HS256 token is accepted, there is no dev token route, and the
    // server cannot sign.
    let hs = agentcast::auth::sign(agentcast::config::DEV_SECRET, "alice", in_an_hour());
    assert!(ws_connect(&server, &hs).await.is_err());
    let r = http_full(
        server.addr(),
        "POST",
        "/v1/dev/token",
        &[],
        r#"{"user":"a"}"#,
    )
    .await;
    assert_eq!(r.status, 404);
    assert!(server.try_token("alice").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_keys_and_a_secret_together() {
    let server = start(agentcast::Config {
        jwt_public_keys: vec![fixture_path("ed.pub.pem")],
        ..config()
    });
    let ed = signed_with(
        jsonwebtoken::Algorithm::EdDSA,
        "ed.key.pem",
        None,
        "ed-user",
    );
    assert_eq!(ws_connect(&server, &ed).await, Ok("ed-user".into()));
    assert_eq!(
        ws_connect(&server, &server.token("hs-user")).await,
        Ok("hs-user".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_kid_picks_the_key() {
    use jsonwebtoken::Algorithm::{EdDSA, ES256, RS256};
    let dir = TempDir::new("jwks-kid");
    let jwks = json!({"keys": [
        jwk_of(RS256, "rsa.key.pem", "key-a"),
        jwk_of(RS256, "rsa-other.key.pem", "key-b"),
        jwk_of(ES256, "ec.key.pem", "key-ec"),
        jwk_of(EdDSA, "ed.key.pem", "key-ed"),
    ]});
    let path = dir.write("jwks.json", jwks.to_string().as_bytes());
    let server = start(public_key_config(Vec::new(), Some(path)));
    for (alg, key, kid) in [
        (RS256, "rsa.key.pem", "key-a"),
        (RS256, "rsa-other.key.pem", "key-b"),
        (ES256, "ec.key.pem", "key-ec"),
        (EdDSA, "ed.key.pem", "key-ed"),
    ] {
        let token = signed_with(alg, key, Some(kid), "alice");
        assert_eq!(
            ws_connect(&server, &token).await,
            Ok("alice".into()),
            "{kid}"
        );
    }
    // Signed with key A but naming key B: only B is tried, so it is refused.
    let mislabelled = signed_with(RS256, "rsa.key.pem", Some("key-b"), "alice");
    let r = get(&server, &format!("/v1/ws?token={mislabelled}"), &[]).await;
    assert_json_error(&r, 401, "unauthorized", "a kid naming another key");
    // Without a kid, every key of the algorithm is tried.
    let no_kid = signed_with(RS256, "rsa-other.key.pem", None, "alice");
    assert_eq!(ws_connect(&server, &no_kid).await, Ok("alice".into()));
    // A key that is not in the set at all.
    let stranger = signed_with(EdDSA, "ed-other.key.pem", Some("key-ed"), "alice");
    assert!(ws_connect(&server, &stranger).await.is_err());
}

#[test]
fn unusable_key_files_refuse_to_start() {
    let dir = TempDir::new("bad-start");
    let garbage = dir.write("garbage.pem", b"not a key");
    let missing = dir.0.join("missing.pem");
    let private = fixture_path("rsa.key.pem");
    let weak = fixture_path("rsa-1024.pub.pem");
    let bad_jwks = dir.write("jwks.json", br#"{"keys": []}"#);
    for (what, config, names) in [
        (
            "garbage",
            public_key_config(vec![garbage.clone()], None),
            garbage,
        ),
        (
            "missing",
            public_key_config(vec![missing.clone()], None),
            missing,
        ),
        (
            "private key",
            public_key_config(vec![private.clone()], None),
            private,
        ),
        (
            "1024-bit RSA",
            public_key_config(vec![weak.clone()], None),
            weak,
        ),
        (
            "empty JWKS",
            public_key_config(Vec::new(), Some(bad_jwks.clone())),
            bad_jwks,
        ),
    ] {
        match agentcast::spawn(config) {
            Ok(server) => panic!("{what}: started on {}", server.addr()),
            Err(e) => assert!(
                e.to_string().contains(&names.display().to_string()),
                "{what}: the error does not name the file: {e}"
            ),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_key_file_is_reloaded() {
    use jsonwebtoken::Algorithm::EdDSA;
    let dir = TempDir::new("mtime-reload");
    let path = dir.write("key.pem", &fixture("ed.pub.pem"));
    let server = start(agentcast::Config {
        jwt_key_check_ms: 100,
        ..public_key_config(vec![path], None)
    });
    let first = signed_with(EdDSA, "ed.key.pem", None, "first");
    let second = signed_with(EdDSA, "ed-other.key.pem", None, "second");
    assert_eq!(ws_connect(&server, &first).await, Ok("first".into()));
    assert!(ws_connect(&server, &second).await.is_err());

    dir.write("key.pem", &fixture("ed-other.pub.pem"));
    eventually("the rewritten key file is in force", async || {
        ws_connect(&server, &second).await.is_ok()
    })
    .await;
    assert!(
        ws_connect(&server, &first).await.is_err(),
        "the old key is gone"
    );
}

/// An `agentcast serve` child whose log lines are collected.
struct Child {
    serve: ServeChild,
    addr: std::net::SocketAddr,
}

impl Child {
    /// `agentcast serve` with these flags, and RUST_LOG as the server's default (`info`) unless
    /// `env` sets it.
    async fn serve(args: &[&str], env: &[(&str, &str)]) -> Child {
        let mut cmd = serve_command(args);
        cmd.env_remove("RUST_LOG");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let serve = ServeChild::spawn(cmd).await;
        let addr = serve.addr;
        Child { serve, addr }
    }

    fn lines(&self) -> Vec<String> {
        self.serve.lines()
    }

    /// Waits (bounded) for a log line containing all of `words`.
    async fn wait_for_line(&self, words: &[&str]) -> String {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            if let Some(l) = self
                .lines()
                .into_iter()
                .find(|l| words.iter().all(|w| l.contains(w)))
            {
                return l;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no log line with {words:?} within {TIMEOUT:?}; log: {:#?}",
                self.lines()
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    fn signal(&self, sig: &str) {
        let pid = self.serve.pid();
        let status = std::process::Command::new("kill")
            .args([&format!("-{sig}"), &pid.to_string()])
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -{sig} {pid}");
    }

    async fn connects(&self, token: &str) -> bool {
        let url = format!("ws://{}/v1/ws?token={token}", self.addr);
        Client::try_connect(&url, None).await.is_ok()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_keys_and_a_bad_file_keeps_the_old_ones() {
    use jsonwebtoken::Algorithm::{ES256, RS256};
    let dir = TempDir::new("sighup");
    let jwks_with =
        |alg, key: &str, kid: &str| json!({"keys": [jwk_of(alg, key, kid)]}).to_string();
    let path = dir.write(
        "jwks.json",
        jwks_with(RS256, "rsa.key.pem", "one").as_bytes(),
    );
    let path_text = path.display().to_string();
    // The file is checked for changes once an hour here: only SIGHUP reloads it.
    let server = Child::serve(
        &["--jwks-file", &path_text, "--jwt-key-check-ms", "3600000"],
        &[],
    )
    .await;
    let first = signed_with(RS256, "rsa.key.pem", Some("one"), "first");
    let second = signed_with(ES256, "ec.key.pem", Some("two"), "second");
    assert!(server.connects(&first).await);
    assert!(!server.connects(&second).await);

    dir.write(
        "jwks.json",
        jwks_with(ES256, "ec.key.pem", "two").as_bytes(),
    );
    server.signal("HUP");
    eventually("the JWKS file is reloaded on SIGHUP", async || {
        server.connects(&second).await
    })
    .await;
    assert!(!server.connects(&first).await, "the old key is gone");
    server
        .wait_for_line(&["INFO", "keys reloaded (SIGHUP)"])
        .await;

    // A bad file: a warning, and the keys in force stay.
    dir.write("jwks.json", b"{\"keys\": [");
    server.signal("HUP");
    let warning = server
        .wait_for_line(&["WARN", "keeping the previous ones"])
        .await;
    assert!(warning.contains(&path_text), "{warning}");
    assert!(
        server.connects(&second).await,
        "the previous keys stay in force"
    );
    // The server is still alive and serving after all that.
    let (status, _) = http(server.addr, "GET", "/healthz", &[], "").await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_token_says_it_cannot_sign_with_public_keys_only() {
    let key = fixture_path("ed.pub.pem").display().to_string();
    let out = run_cli(&["token", "alice"], &[("AGENTCAST_JWT_PUBLIC_KEY", &key)]).await;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(out.stdout.is_empty(), "printed a token anyway");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot sign"), "{stderr}");
    let out = run_cli(&["token", "alice", "--jwks-file", "/nonexistent.json"], &[]).await;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

#[test]
fn public_keys_alone_are_not_dev_mode() {
    let config = agentcast::Config {
        bind: "0.0.0.0:0".into(),
        ..public_key_config(vec![fixture_path("ed.pub.pem")], None)
    };
    assert!(!config.dev_mode());
    assert!(config.validate().is_ok(), "public keys may serve a network");
}

// ---------------------------------------------------------------------------------------------
// Basic credentials next to ?token=

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_authorization_is_ignored_when_a_query_token_is_given() {
    let server = start(config());
    let token = server.token("alice");
    // What a browser behind HTTP basic auth sends by itself.
    let basic = ("Authorization", "Basic dXNlcjpwYXNzd29yZA==");
    let (_, head, _) =
        raw_ws_upgrade(server.addr(), &format!("/v1/ws?token={token}"), &[basic]).await;
    assert_eq!(head.status, 101, "WebSocket with Basic + ?token=: {head:?}");
    let (_, head, _) = get_response_head(
        server.addr(),
        &format!("/v1/events?token={token}"),
        &[basic],
    )
    .await
    .expect("GET /v1/events");
    assert_eq!(head.status, 200, "SSE with Basic + ?token=: {head:?}");

    // Basic alone: the message says what to send instead.
    for path in ["/v1/ws", "/v1/events", "/v1/agents"] {
        let r = get(&server, path, &[basic]).await;
        let message = assert_json_error(&r, 401, "unauthorized", path);
        assert!(
            message.contains("Authorization must be `Bearer <token>`"),
            "{path}: {message}"
        );
    }
    assert_eq!(auth_failures(&server, "not_bearer").await, 3.0);
    // A Bearer header still wins over ?token= (it was set on purpose).
    let url = format!("{}?token=not-a-token", server.ws_url());
    let c = Client::try_connect(&url, Some(&server.token("bob")))
        .await
        .unwrap_or_else(|e| panic!("Bearer + a bad ?token=: {}", describe_error(&e)));
    assert_eq!(c.welcome()["user_id"], json!("bob"));
}

// ---------------------------------------------------------------------------------------------
// Resume points: the refusal names where the bad value came from

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_resume_point_names_its_source() {
    let server = start(config());
    let token = server.token("alice");
    let r = get(
        &server,
        &format!("/v1/events?token={token}"),
        &[("Last-Event-ID", "not-a-seq")],
    )
    .await;
    let message = assert_json_error(&r, 400, "invalid_field", "bad Last-Event-ID");
    assert!(message.contains("Last-Event-ID"), "{message}");
    assert!(!message.contains("after_seq"), "{message}");
    for path in [
        format!("/v1/events?token={token}&after_seq=x"),
        format!("/v1/ws?token={token}&after_seq=-1"),
    ] {
        let r = get(&server, &path, &[("Last-Event-ID", "1")]).await;
        let message = assert_json_error(&r, 400, "invalid_field", &path);
        assert!(message.contains("after_seq"), "{path}: {message}");
    }
}

// ---------------------------------------------------------------------------------------------
// Origins of browser pages

/// The status of a WebSocket upgrade and of an SSE request, each with these extra headers.
async fn stream_statuses(
    server: &agentcast::RunningServer,
    token: &str,
    headers: &[(&str, &str)],
) -> (u16, u16) {
    let (_, ws, _) = raw_ws_upgrade(server.addr(), &format!("/v1/ws?token={token}"), headers).await;
    let (_, sse, _) =
        get_response_head(server.addr(), &format!("/v1/events?token={token}"), headers)
            .await
            .expect("GET /v1/events");
    (ws.status, sse.status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origins_are_checked_for_websocket_and_sse() {
    let server = start(agentcast::Config {
        allowed_origins: vec![
            "https://app.example.com".into(),
            "http://localhost:5173".into(),
        ],
        ..config()
    });
    let token = server.token("alice");
    let own = format!("http://{}", server.addr());
    for (origin, want) in [
        ("https://app.example.com", (101, 200)),
        ("http://localhost:5173", (101, 200)),
        (own.as_str(), (101, 200)),
        ("https://evil.example", (403, 403)),
        ("http://app.example.com", (403, 403)),
        ("http://127.0.0.1:1", (403, 403)),
        ("null", (403, 403)),
    ] {
        let got = stream_statuses(&server, &token, &[("Origin", origin)]).await;
        assert_eq!(got, want, "Origin {origin}: (WebSocket, SSE)");
    }
    // No Origin: not a browser, not checked.
    assert_eq!(stream_statuses(&server, &token, &[]).await, (101, 200));
    // The refusal is a JSON 403 that comes before authentication.
    for path in ["/v1/ws", "/v1/events", "/v1/ws?token=x"] {
        let r = get(&server, path, &[("Origin", "https://evil.example")]).await;
        let message = assert_json_error(&r, 403, "forbidden", path);
        assert!(message.contains("origin"), "{message}");
    }
    // Other routes are not streams: CORS governs them.
    let bearer = format!("Bearer {token}");
    let r = get(
        &server,
        "/v1/agents",
        &[
            ("Origin", "https://evil.example"),
            ("Authorization", &bearer),
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    // The real client sees the 403 too.
    let mut request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(format!(
            "{}?token={token}",
            server.ws_url()
        ))
        .expect("a request");
    request.headers_mut().insert(
        "Origin",
        tokio_tungstenite::tungstenite::http::HeaderValue::from_static("https://evil.example"),
    );
    let e = tokio_tungstenite::connect_async(request)
        .await
        .expect_err("a refused upgrade");
    assert_eq!(http_status(&e), Some(403));
    // 4 origins refused on 2 paths, 3 plain requests, the real client.
    assert_eq!(auth_failures(&server, "forbidden_origin").await, 12.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_mode_allows_loopback_pages_and_star_allows_all() {
    let dev = start(dev_config());
    let token = dev.token("alice");
    for origin in [
        "http://localhost:5173",
        "http://127.0.0.1:3000",
        "http://[::1]:8000",
    ] {
        assert_eq!(
            stream_statuses(&dev, &token, &[("Origin", origin)]).await,
            (101, 200),
            "{origin}"
        );
    }
    for origin in ["https://evil.example", "http://localhost.evil.example"] {
        assert_eq!(
            stream_statuses(&dev, &token, &[("Origin", origin)]).await,
            (403, 403),
            "{origin}"
        );
    }
    // Not in dev mode, a loopback page on another port is another origin.
    let prod = start(config());
    let token = prod.token("alice");
    let origin = ("Origin", "http://localhost:5173");
    assert_eq!(stream_statuses(&prod, &token, &[origin]).await, (403, 403));

    let star = start(agentcast::Config {
        allowed_origins: vec!["*".into()],
        ..config()
    });
    let token = star.token("alice");
    let origin = ("Origin", "https://evil.example");
    assert_eq!(stream_statuses(&star, &token, &[origin]).await, (101, 200));
}

#[test]
fn allowed_origins_must_be_origins() {
    for bad in ["app.example.com", "https://app.example.com/path", "ftp://x"] {
        let config = agentcast::Config {
            allowed_origins: vec![bad.into()],
            ..config()
        };
        let e = config.validate().expect_err(bad);
        assert!(e.to_string().contains("--allowed-origins"), "{e}");
    }
}

// ---------------------------------------------------------------------------------------------
// A full server answers at once

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_server_refuses_new_connections_quickly() {
    let server = start(agentcast::Config {
        max_connections: 4,
        ..config()
    });
    let mut open = Vec::new();
    for i in 0..4 {
        open.push(Client::connect(&server, &format!("user{i}")).await);
    }
    // The fifth connection is answered, not left in the listen queue: 503 within 2 s.
    let quick = std::time::Duration::from_secs(2);
    let started = std::time::Instant::now();
    let r = tokio::time::timeout(quick, http_full(server.addr(), "GET", "/healthz", &[], ""))
        .await
        .expect("the fifth connection got no answer within 2 s");
    assert_json_error(&r, 503, "unavailable", "GET /healthz on a full server");
    assert_eq!(r.header("connection"), Some("close"), "{r:?}");
    assert!(r.header("retry-after").is_some(), "{r:?}");
    let token = server.token("late");
    let (_, head, _) = tokio::time::timeout(
        quick,
        raw_ws_upgrade(server.addr(), &format!("/v1/ws?token={token}"), &[]),
    )
    .await
    .expect("the upgrade got no answer within 2 s");
    assert_eq!(head.status, 503, "{head:?}");
    assert!(started.elapsed() < 2 * quick);
    // The open connections are served as before.
    for c in &mut open {
        c.assert_alive().await;
    }

    // Once one closes, a new one gets in (the server notices the close a moment later).
    open.pop().expect("an open client").close().await;
    let url = format!("{}?token={token}", server.ws_url());
    let mut late = None;
    eventually(
        "a connection after one closed",
        async || match Client::try_connect(&url, None).await {
            Ok(c) => {
                late = Some(c);
                true
            }
            Err(e) => {
                assert_eq!(http_status(&e), Some(503), "{}", describe_error(&e));
                false
            }
        },
    )
    .await;
    let mut late = late.expect("connected");
    late.assert_alive().await;
    // Make room for the scrape, then count the refusals (at least the two above).
    late.close().await;
    let mut refused = 0.0;
    eventually("a scrape of /metrics", async || {
        let (status, body) = http(server.addr(), "GET", "/metrics", &[], "").await;
        if status == 200 {
            refused = body
                .lines()
                .find_map(|l| {
                    l.strip_prefix("agentcast_connections_refused_total{reason=\"server_full\"} ")
                })
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0.0);
        }
        status == 200
    })
    .await;
    assert!(refused >= 2.0, "server_full refusals counted: {refused}");
}

// ---------------------------------------------------------------------------------------------
// Oversized requests: a clear answer, and no ERROR line per request

fn get_with(path: &str, headers: &[(&str, &str)]) -> Vec<u8> {
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
    for (n, v) in headers {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_tokens_get_a_clear_answer() {
    let server = start(config());
    let long = "a".repeat(60 * 1024);
    // 60 KB in ?token=: 414 with a JSON body.
    for path in ["/v1/ws", "/v1/events", "/v1/agents"] {
        let r = raw_request(
            server.addr(),
            &get_with(&format!("{path}?token={long}"), &[]),
        )
        .await
        .expect("an answer");
        let message = assert_json_error(&r, 414, "invalid_field", path);
        assert!(message.contains("URL"), "{message}");
    }
    // 60 KB in the Authorization header: 431 with a JSON body.
    let bearer = format!("Bearer {long}");
    let r = raw_request(
        server.addr(),
        &get_with("/v1/agents", &[("Authorization", &bearer)]),
    )
    .await
    .expect("an answer");
    let message = assert_json_error(&r, 431, "invalid_field", "a 60 KB Authorization");
    assert!(message.contains("authorization"), "{message}");
    // Many headers that are each fine but too many together.
    let filler = "b".repeat(4000);
    let many: Vec<(String, &str)> = (0..10)
        .map(|i| (format!("X-Filler-{i}"), filler.as_str()))
        .collect();
    let many: Vec<(&str, &str)> = many.iter().map(|(n, v)| (n.as_str(), *v)).collect();
    let r = raw_request(server.addr(), &get_with("/healthz", &many))
        .await
        .expect("an answer");
    assert_json_error(&r, 431, "invalid_field", "40 KB of headers");
    // A token just under the limits still gets its 401 about the token.
    let token = "a".repeat(8000);
    let r = get(&server, &format!("/v1/ws?token={token}"), &[]).await;
    assert_json_error(&r, 401, "unauthorized", "an 8000-byte token");
    let r = get(&server, "/v1/ws?token=a.b.c", &[]).await;
    assert_json_error(&r, 401, "unauthorized", "a short bad token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_actix_cannot_parse_are_not_logged_as_errors() {
    // DEBUG for the dispatcher only, so that the demoted lines show and mark the moment they
    // were logged.
    let server = Child::serve(
        &["--jwt-secret", LONG_SECRET],
        &[("RUST_LOG", "info,actix_http::h1::dispatcher=debug")],
    )
    .await;
    let long = "a".repeat(60 * 1024);
    let r = raw_request(server.addr, &get_with(&format!("/v1/ws?token={long}"), &[]))
        .await
        .expect("an answer");
    assert_json_error(&r, 414, "invalid_field", "60 KB ?token=");
    // Past 64 KiB of URL and 128 KiB of head actix-http answers by itself (400, 431).
    let longer = "a".repeat(70 * 1024);
    let r = raw_request(
        server.addr,
        &get_with(&format!("/v1/ws?token={longer}"), &[]),
    )
    .await;
    assert_eq!(r.map(|r| r.status), Some(400), "a 70 KB URL");
    let huge = "a".repeat(140 * 1024);
    let r = raw_request(server.addr, &get_with("/v1/ws", &[("X-Huge", &huge)])).await;
    assert_eq!(r.map(|r| r.status), Some(431), "a 140 KB header");
    let r = raw_request(server.addr, b"\x00\x01 not http\r\n\r\n").await;
    assert_eq!(r.map(|r| r.status), Some(400), "not HTTP");
    // Each of those three is logged, at DEBUG.
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let demoted = server
            .lines()
            .iter()
            .filter(|l| l.contains("DEBUG") && l.contains("request parse error"))
            .count();
        if demoted >= 3 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the parse errors were not logged at DEBUG: {:#?}",
            server.lines()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let errors: Vec<String> = server
        .lines()
        .into_iter()
        .filter(|l| l.contains("ERROR"))
        .collect();
    assert!(errors.is_empty(), "ERROR lines: {errors:#?}");
}

// ---------------------------------------------------------------------------------------------
// Secrets too short to be secret

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_secrets_are_refused_at_start() {
    let short = &LONG_SECRET[..31];
    let exactly = &LONG_SECRET[..32];
    for (what, config) in [
        (
            "--jwt-secret",
            agentcast::Config {
                jwt_secret: Some(short.into()),
                ..test_config()
            },
        ),
        (
            "--jwt-previous-secrets",
            agentcast::Config {
                jwt_previous_secrets: vec![short.into()],
                ..config()
            },
        ),
    ] {
        let e = config.validate().expect_err(what);
        assert!(
            e.to_string().contains(what) && e.to_string().contains("at least 32"),
            "{what}: {e}"
        );
        assert!(agentcast::spawn(config).is_err(), "{what}: spawn served");
    }
    let server = start(agentcast::Config {
        jwt_secret: Some(exactly.into()),
        ..test_config()
    });
    assert_eq!(
        ws_connect(&server, &server.token("alice")).await,
        Ok("alice".into())
    );

    // The binary refuses to start, and to sign, with a clear message.
    let out = run_cli(
        &["serve", "--bind", "127.0.0.1:0"],
        &[("AGENTCAST_JWT_SECRET", short)],
    )
    .await;
    assert!(!out.status.success(), "serve started: {out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("at least 32"), "{stderr}");
    let out = run_cli(&["token", "alice"], &[("AGENTCAST_JWT_SECRET", short)]).await;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(out.stdout.is_empty());
    // Dev mode has no secret to check.
    assert!(dev_config().validate().is_ok());
}
