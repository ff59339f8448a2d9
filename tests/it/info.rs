//! `GET /v1/info`: answered without a token, it tells a client the protocol version, whether
//! the server is in dev mode (so whether `POST /v1/dev/token` exists) and the server's version.

use crate::common::*;
use serde_json::json;

fn dev_config() -> agentcast::Config {
    agentcast::Config {
        jwt_secret: None,
        ..test_config()
    }
}

#[tokio::test]
async fn info_needs_no_token_and_tells_the_mode() {
    for (config, dev_mode) in [(test_config(), false), (dev_config(), true)] {
        let server = start(config);
        let addr = server.addr();

        let r = http_full(addr, "GET", "/v1/info", &[], "").await;
        assert_eq!(r.status, 200, "GET /v1/info: {r:?}");
        assert!(
            r.header("content-type")
                .is_some_and(|t| t.starts_with("application/json")),
            "{r:?}"
        );
        let info = r.json();
        assert_keys(&info, &["dev_mode", "protocol", "version"]);
        assert_eq!(
            info,
            json!({"protocol": 1, "dev_mode": dev_mode, "version": env!("CARGO_PKG_VERSION")})
        );

        // A token that does not verify changes nothing: the route takes none.
        let bad = [("Authorization", "Bearer not-a-token")];
        let (status, body) = http(addr, "GET", "/v1/info", &bad, "").await;
        assert_eq!(
            (status, serde_json::from_str(&body).ok()),
            (200, Some(info))
        );

        // dev_mode is true exactly when the dev token route exists.
        let (status, _) = http(addr, "POST", "/v1/dev/token", &[], r#"{"user":"alice"}"#).await;
        assert_eq!(
            status == 200,
            dev_mode,
            "POST /v1/dev/token answered {status}"
        );
    }
}

#[tokio::test]
async fn info_protocol_is_the_welcome_protocol() {
    let server = start(test_config());
    let (_, body) = http(server.addr(), "GET", "/v1/info", &[], "").await;
    let info: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let client = Client::connect(&server, "alice").await;
    assert_eq!(info["protocol"], client.welcome()["protocol"]);
    client.close().await;
}
