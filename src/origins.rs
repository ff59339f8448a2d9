//! Which web pages may open a stream. A browser sends `Origin` with every WebSocket upgrade
//! and EventSource request, and a page on any site can make the browser open one with the
//! user's `?token=` if it has it, or with cookies a proxy in front adds (cross-site WebSocket
//! hijacking). So `GET /v1/ws` and `GET /v1/events` with an `Origin` are served only when the
//! origin is listed in `--allowed-origins`, is the origin of the server itself (the `Host`
//! the request was sent to), or, in dev mode, is a loopback page. Requests without `Origin`
//! (programs, not browsers) are not affected. A refusal is a 403 before any upgrade.

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::{header, StatusCode};
use actix_web::web;

use crate::routes::{error, AppState};

/// The paths whose `Origin` is checked.
pub const CHECKED_PATHS: [&str; 2] = ["/v1/ws", "/v1/events"];

/// A web origin: scheme, host and port (the default port of the scheme when none is given).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub scheme: String,
    pub host: String,
    pub port: u16,
}

fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" | "ws" => Some(80),
        "https" | "wss" => Some(443),
        _ => None,
    }
}

/// Splits `host[:port]` (IPv6 hosts in brackets); the host lower-cased.
fn split_host_port(authority: &str) -> Option<(String, Option<u16>)> {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (inside, after) = rest.split_once(']')?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':')?),
        };
        (format!("[{}]", inside.to_ascii_lowercase()), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_ascii_lowercase(), Some(p)),
            None => (authority.to_ascii_lowercase(), None),
        }
    };
    let valid_host = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._[]:".contains(c));
    if !valid_host {
        return None;
    }
    let port = match port {
        None => None,
        Some(p) => Some(p.parse::<u16>().ok()?),
    };
    Some((host, port))
}

impl Origin {
    /// Parses `scheme://host[:port]` as browsers send it (a trailing `/` is tolerated, for
    /// hand-written configuration). `null` and anything with a path are not origins here.
    pub fn parse(s: &str) -> Option<Origin> {
        let s = s.trim();
        let s = s.strip_suffix('/').unwrap_or(s);
        let (scheme, authority) = s.split_once("://")?;
        let scheme = scheme.to_ascii_lowercase();
        let default = default_port(&scheme)?;
        if authority.contains(['/', '?', '#', '@']) {
            return None;
        }
        let (host, port) = split_host_port(authority)?;
        Some(Origin {
            scheme,
            host,
            port: port.unwrap_or(default),
        })
    }

    /// True when this origin is the one of a request sent to `host` (the `Host` header): same
    /// host name and port. The scheme is not known here (TLS may end at a proxy).
    pub fn is_host(&self, host: &str) -> bool {
        match split_host_port(host.trim()) {
            Some((h, port)) => {
                h == self.host && port.or(default_port(&self.scheme)) == Some(self.port)
            }
            None => false,
        }
    }

    fn is_loopback_http(&self) -> bool {
        self.scheme == "http" && matches!(self.host.as_str(), "127.0.0.1" | "localhost" | "[::1]")
    }
}

/// Which origins may open a stream.
#[derive(Debug, Clone, Default)]
pub struct OriginPolicy {
    /// `*`: every origin.
    any: bool,
    listed: Vec<Origin>,
    /// Dev mode: loopback pages (`http://127.0.0.1:*`, `http://localhost:*`, `http://[::1]:*`).
    loopback: bool,
}

/// An `--allowed-origins` entry that is not an origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadOrigin(pub String);

impl std::fmt::Display for BadOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "--allowed-origins: {:?} is not an origin like https://app.example.com[:port] (or *)",
            self.0
        )
    }
}

impl std::error::Error for BadOrigin {}

impl OriginPolicy {
    /// The policy for `--allowed-origins` entries (empty ones are ignored); `dev_mode` adds
    /// the loopback pages.
    pub fn new(allowed: &[String], dev_mode: bool) -> Result<OriginPolicy, BadOrigin> {
        let mut policy = OriginPolicy {
            loopback: dev_mode,
            ..OriginPolicy::default()
        };
        for entry in allowed.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
            if entry == "*" {
                policy.any = true;
            } else {
                let origin = Origin::parse(entry).ok_or_else(|| BadOrigin(entry.to_string()))?;
                policy.listed.push(origin);
            }
        }
        Ok(policy)
    }

    /// True when a request with this `Origin` header, sent to `host`, may open a stream.
    pub fn allows(&self, origin: &str, host: Option<&str>) -> bool {
        if self.any {
            return true;
        }
        let Some(origin) = Origin::parse(origin) else {
            return false;
        };
        self.listed.contains(&origin)
            || host.is_some_and(|h| origin.is_host(h))
            || (self.loopback && origin.is_loopback_http())
    }
}

/// Middleware: a request for [`CHECKED_PATHS`] whose `Origin` the policy refuses gets 403
/// `{code: "forbidden"}`, before any upgrade.
pub async fn check_origin<B: MessageBody + 'static>(
    req: ServiceRequest,
    next: actix_web::middleware::Next<B>,
) -> Result<ServiceResponse<EitherBody<B>>, actix_web::Error> {
    if CHECKED_PATHS.contains(&req.path()) {
        if let Some(origin) = req.headers().get(header::ORIGIN) {
            let origin = origin.to_str().unwrap_or("");
            let host = req
                .headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok());
            let state = req.app_data::<web::Data<AppState>>();
            let allowed = state.is_none_or(|s| s.origins.allows(origin, host));
            if !allowed {
                log::info!(
                    "refused {} {}: origin {origin:?} is not allowed",
                    req.method(),
                    req.path()
                );
                if let Some(state) = state {
                    state.metrics.auth_failure("forbidden_origin");
                }
                let res = error(
                    StatusCode::FORBIDDEN,
                    "forbidden",
                    "this page's origin may not open this stream: it is not the server's own \
                     origin nor one of --allowed-origins",
                );
                return Ok(req.into_response(res).map_into_right_body());
            }
        }
    }
    next.call(req)
        .await
        .map(ServiceResponse::map_into_left_body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(list: &[&str], dev: bool) -> OriginPolicy {
        let list: Vec<String> = list.iter().map(|s| s.to_string()).collect();
        OriginPolicy::new(&list, dev).unwrap()
    }

    #[test]
    fn parses_origins() {
        let o = Origin::parse("HTTPS://App.Example.com").unwrap();
        assert_eq!(
            (o.scheme.as_str(), o.host.as_str(), o.port),
            ("https", "app.example.com", 443)
        );
        assert_eq!(Origin::parse("http://a:8080/").unwrap().port, 8080);
        assert_eq!(Origin::parse("http://[::1]:3000").unwrap().host, "[::1]");
        for bad in [
            "null",
            "",
            "app.example.com",
            "ftp://a",
            "http://",
            "http://a/path",
            "http://a:99999",
            "http://u@a",
            "http://a b",
        ] {
            assert!(Origin::parse(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn same_origin_as_the_host() {
        let p = policy(&[], false);
        assert!(p.allows(
            "http://agentcast.example:8080",
            Some("agentcast.example:8080")
        ));
        assert!(p.allows("https://agentcast.example", Some("agentcast.example")));
        assert!(p.allows("https://agentcast.example", Some("AGENTCAST.example:443")));
        assert!(p.allows("http://[::1]:8080", Some("[::1]:8080")));
        assert!(!p.allows(
            "http://agentcast.example:8081",
            Some("agentcast.example:8080")
        ));
        assert!(!p.allows("https://evil.example", Some("agentcast.example")));
        assert!(!p.allows(
            "https://agentcast.example.evil.example",
            Some("agentcast.example")
        ));
        assert!(!p.allows("https://agentcast.example", None));
        assert!(!p.allows("null", Some("agentcast.example")));
        // Not dev mode: other loopback pages are other origins.
        assert!(!p.allows("http://127.0.0.1:3000", Some("127.0.0.1:8080")));
    }

    #[test]
    fn listed_any_and_dev_loopback() {
        let p = policy(
            &["https://app.example.com", " http://localhost:5173/ "],
            false,
        );
        assert!(p.allows("https://app.example.com", Some("api.example.com")));
        assert!(p.allows("https://app.example.com:443", Some("api.example.com")));
        assert!(p.allows("http://localhost:5173", Some("api.example.com")));
        assert!(!p.allows("http://app.example.com", Some("api.example.com")));
        assert!(!p.allows("http://localhost:5174", Some("api.example.com")));

        let any = policy(&["*"], false);
        assert!(any.allows("https://evil.example", Some("a")));
        assert!(any.allows("null", None));

        let dev = policy(&[], true);
        for o in [
            "http://127.0.0.1:3000",
            "http://localhost:1",
            "http://[::1]:9",
            "http://localhost",
        ] {
            assert!(dev.allows(o, Some("127.0.0.1:8080")), "{o}");
        }
        for o in [
            "https://localhost:3000",
            "http://127.0.0.2:3000",
            "http://localhost.evil.example",
        ] {
            assert!(!dev.allows(o, Some("127.0.0.1:8080")), "{o}");
        }
    }

    #[test]
    fn bad_entries_are_refused() {
        for bad in ["app.example.com", "https://a/b", "null"] {
            assert!(
                OriginPolicy::new(&[bad.to_string()], false).is_err(),
                "{bad}"
            );
        }
    }
}
