//! Connecting: authentication (PROTOCOL §1, protocol-notes "401"), the welcome frame (§3),
//! connect-time query validation, HTTP basics, dev mode and the binary (§9).

use std::process::Stdio;

use crate::common::*;
use serde_json::{json, Value};

/// An upgrade request with these credentials must be refused with 401 before the upgrade, both as
/// seen by a real WebSocket client and by a plain HTTP client (which checks the body and header).
async fn assert_refused_401(
    server: &agentcast::RunningServer,
    token_query: Option<&str>,
    bearer: Option<&str>,
) {
    let path = match token_query {
        Some(t) => format!("/v1/ws?token={t}"),
        None => "/v1/ws".to_string(),
    };
    let what = format!("query token {token_query:?}, bearer {bearer:?}");

    let url = format!("ws://{}{}", server.addr(), path);
    match Client::try_connect(&url, bearer).await {
        Ok(c) => panic!(
            "{what}: the upgrade was accepted (first frame {})",
            c.welcome()
        ),
        Err(e) => assert_eq!(
            http_status(&e),
            Some(401),
            "{what}: expected HTTP 401, got {}",
            describe_error(&e)
        ),
    }

    let auth_header;
    let mut headers: Vec<(&str, &str)> = WS_UPGRADE_HEADERS.to_vec();
    if let Some(b) = bearer {
        auth_header = format!("Bearer {b}");
        headers.push(("Authorization", &auth_header));
    }
    let r = raw_get(server.addr(), &path, &headers).await;
    assert_eq!(r.status, 401, "{what}: raw HTTP status, body {:?}", r.body);
    let body = r.json();
    assert_eq!(
        body["code"],
        json!("unauthorized"),
        "{what}: 401 body {body}"
    );
    assert!(
        body["message"].is_string(),
        "{what}: 401 body without a string message: {body}"
    );
    let www = r
        .header("www-authenticate")
        .unwrap_or_else(|| panic!("{what}: 401 without WWW-Authenticate"));
    assert!(
        www.starts_with("Bearer"),
        "{what}: WWW-Authenticate is {www:?}, expected Bearer"
    );
}

fn in_an_hour() -> u64 {
    now_unix() + 3600
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_token_is_refused_with_401() {
    let server = start(test_config());
    // No credentials at all.
    assert_refused_401(&server, None, None).await;
    // Query form present but empty.
    assert_refused_401(&server, Some(""), None).await;
    // Header form present but empty.
    assert_refused_401(&server, None, Some("")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_token_is_refused_with_401() {
    let server = start(test_config());
    for bad in ["not-a-jwt", "a.b.c", "eyJhbGciOiJIUzI1NiJ9.e30", "...."] {
        assert_refused_401(&server, Some(bad), None).await;
        assert_refused_401(&server, None, Some(bad)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrongly_signed_token_is_refused_with_401() {
    let server = start(test_config());
    let forged = agentcast::auth::sign("some-other-secret", "alice", in_an_hour());
    assert_refused_401(&server, Some(&forged), None).await;
    assert_refused_401(&server, None, Some(&forged)).await;
    // The same claims signed with the right secret are accepted: the signature was the problem.
    let good = agentcast::auth::sign(SECRET, "alice", in_an_hour());
    let c = Client::try_connect(&server.ws_url(), Some(&good))
        .await
        .expect("a good token connects");
    assert_eq!(c.welcome()["user_id"], json!("alice"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_token_is_refused_with_401() {
    let server = start(test_config());
    let expired = agentcast::auth::sign(SECRET, "alice", now_unix() - 3600);
    assert_refused_401(&server, Some(&expired), None).await;
    assert_refused_401(&server, None, Some(&expired)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_without_exp_is_refused_with_401() {
    let server = start(test_config());
    let no_exp = sign_claims(SECRET, &json!({ "sub": "alice" }));
    assert_refused_401(&server, Some(&no_exp), None).await;
    assert_refused_401(&server, None, Some(&no_exp)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_with_bad_sub_is_refused_with_401() {
    let server = start(test_config());
    let exp = in_an_hour();
    let long = "a".repeat(129);
    let subs: Vec<Value> = vec![
        json!(""),
        json!(long),
        json!("ali\u{7}ce"),
        json!("ali\nce"),
        json!("alice\u{0}"),
        json!("\u{7f}"),
        json!(5),
    ];
    for sub in &subs {
        let token = sign_claims(SECRET, &json!({ "sub": sub, "exp": exp }));
        assert_refused_401(&server, Some(&token), None).await;
    }
    // No sub at all.
    let token = sign_claims(SECRET, &json!({ "exp": exp }));
    assert_refused_401(&server, Some(&token), None).await;

    // The boundary: 128 printable characters is a valid user id.
    let max = "b".repeat(128);
    let token = agentcast::auth::sign(SECRET, &max, exp);
    let c = Client::try_connect(&format!("{}?token={token}", server.ws_url()), None)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "a 128-character sub must be accepted: {}",
                describe_error(&e)
            )
        });
    assert_eq!(c.welcome()["user_id"], json!(max));
}

fn assert_welcome(w: &Value, user: &str) {
    assert_eq!(
        w["type"],
        json!("welcome"),
        "first frame is not welcome: {w}"
    );
    let keys: std::collections::BTreeSet<&str> =
        w.as_object().unwrap().keys().map(String::as_str).collect();
    let want: std::collections::BTreeSet<&str> = [
        "type",
        "session_id",
        "user_id",
        "epoch",
        "last_seq",
        "protocol",
    ]
    .into_iter()
    .collect();
    assert_eq!(keys, want, "welcome fields: {w}");
    let sid = w["session_id"]
        .as_str()
        .unwrap_or_else(|| panic!("session_id not a string: {w}"));
    assert!(
        sid.starts_with("ses_") && sid.len() > 4,
        "session_id {sid:?} is not ses_…"
    );
    assert_eq!(w["user_id"], json!(user), "welcome.user_id: {w}");
    let epoch = w["epoch"]
        .as_str()
        .unwrap_or_else(|| panic!("epoch is not a string: {w}"));
    assert!(!epoch.is_empty(), "empty epoch: {w}");
    assert!(
        w["last_seq"].is_u64(),
        "last_seq is not a non-negative integer: {w}"
    );
    assert_eq!(w["protocol"], json!(1), "protocol: {w}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_header_connects_and_welcome_is_first() {
    let server = start(test_config());
    let token = server.token("alice");
    let mut c = Client::try_connect(&server.ws_url(), Some(&token))
        .await
        .unwrap_or_else(|e| panic!("Bearer header must connect: {}", describe_error(&e)));
    assert_welcome(c.welcome(), "alice");
    assert_eq!(
        c.welcome()["last_seq"],
        json!(0),
        "a new user starts at last_seq 0"
    );
    c.assert_alive().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_token_connects_and_welcome_is_first() {
    let server = start(test_config());
    let url = format!("{}?token={}", server.ws_url(), server.token("bob"));
    let mut c = Client::try_connect(&url, None)
        .await
        .unwrap_or_else(|e| panic!("?token= must connect: {}", describe_error(&e)));
    assert_welcome(c.welcome(), "bob");
    assert_eq!(
        c.welcome()["last_seq"],
        json!(0),
        "a new user starts at last_seq 0"
    );
    c.assert_alive().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_get_distinct_sessions_and_the_same_epoch() {
    let server = start(test_config());
    let a = Client::connect(&server, "alice").await;
    let b = Client::connect(&server, "alice").await;
    assert_welcome(a.welcome(), "alice");
    assert_welcome(b.welcome(), "alice");
    assert_ne!(
        a.welcome()["session_id"],
        b.welcome()["session_id"],
        "two connections share a session_id"
    );
    assert_eq!(
        a.welcome()["epoch"],
        b.welcome()["epoch"],
        "one user's connections disagree on the epoch"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn welcome_last_seq_reflects_the_users_history() {
    let server = start(test_config());
    let mut a = Client::connect(&server, "alice").await;
    let run = a.start_run("echo", json!("hello there")).await;
    let events = a.collect_run(&run).await;
    let last = events.last().unwrap()["seq"].as_u64().unwrap();
    let b = Client::connect(&server, "alice").await;
    assert_eq!(
        b.welcome()["last_seq"],
        json!(last),
        "welcome.last_seq after a run: {}",
        b.welcome()
    );
    assert_eq!(b.welcome()["epoch"], a.welcome()["epoch"]);
    // Another user's history is not this user's.
    let c = Client::connect(&server, "carol").await;
    assert_eq!(
        c.welcome()["last_seq"],
        json!(0),
        "another user's welcome: {}",
        c.welcome()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_after_seq_at_connect_is_400() {
    let server = start(test_config());
    let token = server.token("alice");
    for bad in ["abc", "-1", "1.5"] {
        let path = format!("/v1/ws?token={token}&after_seq={bad}");
        let url = format!("ws://{}{}", server.addr(), path);
        match Client::try_connect(&url, None).await {
            Ok(c) => panic!(
                "after_seq={bad}: the upgrade was accepted (first frame {})",
                c.welcome()
            ),
            Err(e) => assert_eq!(
                http_status(&e),
                Some(400),
                "after_seq={bad}: {}",
                describe_error(&e)
            ),
        }
        let r = raw_get(server.addr(), &path, &WS_UPGRADE_HEADERS).await;
        assert_eq!(r.status, 400, "after_seq={bad}: body {:?}", r.body);
        let body = r.json();
        assert_eq!(
            body["code"],
            json!("invalid_field"),
            "after_seq={bad}: {body}"
        );
        assert!(body["message"].is_string(), "after_seq={bad}: {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_is_200() {
    let server = start(test_config());
    let (status, _body) = http(server.addr(), "GET", "/healthz", &[], "").await;
    assert_eq!(status, 200);
}

fn dev_config() -> agentcast::Config {
    agentcast::Config {
        jwt_secret: None,
        ..test_config()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_mode_hands_out_tokens() {
    let server = start(dev_config());
    let r = http_full(
        server.addr(),
        "POST",
        "/v1/dev/token",
        &[],
        r#"{"user":"alice"}"#,
    )
    .await;
    assert_eq!(
        r.status, 200,
        "POST /v1/dev/token in dev mode: {:?}",
        r.body
    );
    let body = r.json();
    let token = body["token"]
        .as_str()
        .unwrap_or_else(|| panic!("no token in {body}"))
        .to_string();
    let url = format!("{}?token={token}", server.ws_url());
    let mut c = Client::try_connect(&url, None)
        .await
        .unwrap_or_else(|e| panic!("the dev token must connect: {}", describe_error(&e)));
    assert_welcome(c.welcome(), "alice");
    c.assert_alive().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_token_route_does_not_exist_with_a_secret() {
    let server = start(test_config());
    let (status, body) = http(
        server.addr(),
        "POST",
        "/v1/dev/token",
        &[],
        r#"{"user":"alice"}"#,
    )
    .await;
    assert_eq!(
        status, 404,
        "POST /v1/dev/token with a secret configured: {body:?}"
    );
}

#[test]
fn dev_mode_refuses_a_non_loopback_bind() {
    let config = agentcast::Config {
        bind: "0.0.0.0:0".into(),
        jwt_secret: None,
        ..test_config()
    };
    assert!(
        config.validate().is_err(),
        "Config::validate accepts dev mode on 0.0.0.0"
    );
    if let Ok(server) = agentcast::spawn(config) {
        panic!(
            "spawn served dev mode on a non-loopback address: {}",
            server.addr()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_token_command_prints_an_accepted_token() {
    let out = tokio::time::timeout(
        TIMEOUT,
        tokio::process::Command::new(env!("CARGO_BIN_EXE_agentcast"))
            .args(["token", "bob", "--ttl-secs", "60"])
            .env("AGENTCAST_JWT_SECRET", SECRET)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("agentcast token did not finish in time")
    .expect("running agentcast token");
    assert!(
        out.status.success(),
        "agentcast token failed: {:?}, stderr {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout)
        .expect("utf-8 token")
        .trim()
        .to_string();
    assert!(
        !token.is_empty() && !token.contains(char::is_whitespace),
        "printed token: {token:?}"
    );

    // --ttl-secs 60: exp is about a minute from now.
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.validate_exp = true;
    let data = jsonwebtoken::decode::<Value>(
        &token,
        &jsonwebtoken::DecodingKey::from_secret(SECRET.as_bytes()),
        &validation,
    )
    .expect("the printed token is an HS256 JWT signed with AGENTCAST_JWT_SECRET");
    assert_eq!(data.claims["sub"], json!("bob"));
    let exp = data.claims["exp"].as_u64().expect("integer exp");
    let now = now_unix();
    assert!(
        exp >= now + 50 && exp <= now + 70,
        "exp {exp} is not about now ({now}) + 60"
    );

    let server = start(test_config());
    let url = format!("{}?token={token}", server.ws_url());
    let c = Client::try_connect(&url, None)
        .await
        .unwrap_or_else(|e| panic!("the CLI token must connect: {}", describe_error(&e)));
    assert_welcome(c.welcome(), "bob");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_serve_shuts_down_on_sigterm_with_1001() {
    let mut cmd = serve_command(&[]);
    cmd.env("AGENTCAST_JWT_SECRET", SECRET);
    let mut child = ServeChild::spawn(cmd).await;
    let (addr, pid) = (child.addr, child.pid());

    let token = agentcast::auth::sign(SECRET, "dave", now_unix() + 3600);
    let mut c = Client::try_connect(&format!("ws://{addr}/v1/ws?token={token}"), None)
        .await
        .unwrap_or_else(|e| panic!("connecting to agentcast serve: {}", describe_error(&e)));
    assert_welcome(c.welcome(), "dave");
    c.assert_alive().await;

    let kill = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("running kill");
    assert!(kill.success(), "kill -TERM {pid} failed");

    assert_eq!(
        c.expect_close().await,
        Some(1001),
        "a client of a server stopped by SIGTERM must see close 1001"
    );
    let status = tokio::time::timeout(TIMEOUT, child.process.wait())
        .await
        .expect("agentcast serve did not exit within 10 s of SIGTERM")
        .expect("waiting for agentcast serve");
    assert_eq!(
        status.code(),
        Some(0),
        "agentcast serve exit status after SIGTERM: {status:?}"
    );
}
