//! HTTP requests through a real client, awc (actix's own). awc is built for actix's
//! single-threaded runtime: its futures are not `Send` and its connection pool spawns local
//! tasks, so each exchange runs inside a `LocalSet` on the calling task. That works under
//! every tokio runtime the tests use (current-thread and multi-thread) as long as the call is
//! not inside a `tokio::spawn`ed task, which none is.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;

use super::TIMEOUT;

/// A response: status, headers (names lower-cased), body.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("HTTP body is not JSON ({e}): {:?}", self.body))
    }
}

/// A client whose own timeout is off: the callers bound each exchange themselves.
pub fn http_client() -> awc::Client {
    awc::Client::builder().disable_timeout().finish()
}

/// One request on `client`: `headers` in order, `Content-Type: application/json` when there is
/// a body and no Content-Type among them, `Connection: close` when `close`. The whole body is
/// read (up to 64 MiB). Err with what went wrong; no timeout of its own.
pub async fn send(
    client: &awc::Client,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
    close: bool,
) -> Result<HttpResponse, String> {
    let exchange = async {
        let method = awc::http::Method::from_bytes(method.as_bytes()).map_err(|e| e.to_string())?;
        let mut req = client.request(method.clone(), format!("http://{addr}{path}"));
        for (n, v) in headers {
            req = req.append_header((*n, *v));
        }
        if !body.is_empty()
            && !headers
                .iter()
                .any(|(n, _)| n.eq_ignore_ascii_case("content-type"))
        {
            req = req.insert_header(("Content-Type", "application/json"));
        }
        if close {
            req = req.force_close();
        }
        let sent = if body.is_empty() && method != awc::http::Method::POST {
            req.send().await
        } else {
            req.send_body(body.to_string()).await
        };
        let mut res = sent.map_err(|e| e.to_string())?;
        let headers = res
            .headers()
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let body = res
            .body()
            .limit(64 << 20)
            .await
            .map_err(|e| format!("reading the body: {e}"))?;
        Ok(HttpResponse {
            status: res.status().as_u16(),
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    };
    tokio::task::LocalSet::new().run_until(exchange).await
}

/// One request on a new connection (`Connection: close`), bounded by `bound`.
pub async fn http_within(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
    bound: Duration,
) -> Result<HttpResponse, String> {
    let client = http_client();
    let exchange = send(&client, addr, method, path, headers, body, true);
    match tokio::time::timeout(bound, exchange).await {
        Ok(r) => r,
        Err(_) => Err(format!("no complete answer within {bound:?}")),
    }
}

/// One request on a new connection; returns (status, body). Panics after TIMEOUT.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let r = http_full(addr, method, path, headers, body).await;
    (r.status, r.body)
}

/// One request on a new connection, with the response headers too. Panics after TIMEOUT.
pub async fn http_full(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> HttpResponse {
    http_within(addr, method, path, headers, body, TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("HTTP {method} {path}: {e}"))
}
