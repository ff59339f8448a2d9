//! Authentication and the edge of the server, against real servers on 127.0.0.1: who may
//! connect (user ids, token times, keys, issuers and audiences, origins) and how the server
//! answers what it refuses (Basic credentials, oversized requests, a full server).
//!
//! Helpers that only these tests need live in this file; the shared ones come from
//! `tests/common`.

mod common;

use std::process::Stdio;

use common::*;
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
