//! Bounds on what one client or many can make the server hold, answered quickly and clearly:
//!
//! - **Connections** (`--max-connections`): every accepted connection is counted by a guard
//!   kept in its extensions (see `socket::on_connect`). One over the limit is still accepted
//!   (actix's own per-worker cap is set above ours, so clients never wait in the listen
//!   queue) and each request on it is answered at once with 503 `unavailable` and
//!   `Connection: close`.
//! - **Request heads**: a URL over [`MAX_URL_BYTES`] gets 414, a header over
//!   [`MAX_HEADER_BYTES`] (or all of them over [`MAX_HEADERS_BYTES`]) 431, both with a JSON
//!   body, instead of a token check on 60 KB of query string. (Past 64 KiB of URL or 128 KiB
//!   of head actix-http's parser answers by itself, with an empty 400 or 431: see
//!   `docs/protocol-notes.md`.)

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{self, HeaderValue};
use actix_web::http::{ConnectionType, StatusCode};
use actix_web::middleware::Next;
use actix_web::HttpResponse;
use agentcast_actors::metrics::Metrics;

use crate::routes::error;

/// Longest request target (path and query) accepted. nginx's default is the same.
pub const MAX_URL_BYTES: usize = 8 * 1024;
/// Longest single header value accepted.
pub const MAX_HEADER_BYTES: usize = 8 * 1024;
/// Most bytes of header names and values accepted in all.
pub const MAX_HEADERS_BYTES: usize = 32 * 1024;

/// Counts the open connections against `--max-connections`.
#[derive(Debug)]
pub struct ConnectionCounter {
    open: AtomicUsize,
    limit: usize,
    metrics: Arc<Metrics>,
}

/// Kept in a connection's extensions for as long as it is open; dropping it uncounts it.
#[derive(Debug)]
pub struct ConnectionGuard {
    counter: Arc<ConnectionCounter>,
    /// The connection came when the server was full: its requests are refused.
    pub over_limit: bool,
}

impl ConnectionCounter {
    pub fn new(limit: usize, metrics: Arc<Metrics>) -> Arc<ConnectionCounter> {
        Arc::new(ConnectionCounter {
            open: AtomicUsize::new(0),
            limit,
            metrics,
        })
    }

    /// Counts a new connection; the guard says whether it is over the limit.
    pub fn admit(self: &Arc<Self>) -> ConnectionGuard {
        let open = self.open.fetch_add(1, Ordering::AcqRel) + 1;
        let over_limit = open > self.limit;
        if over_limit {
            self.metrics
                .refused_connections
                .with_label_values(&["server_full"])
                .inc();
        }
        ConnectionGuard {
            counter: self.clone(),
            over_limit,
        }
    }

    /// Connections open now, over-limit ones included.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.counter.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// actix's own per-worker connection cap for our `limit`: above it, so that the guard decides
/// and a client over the limit is answered instead of waiting in the listen queue. The room
/// left (a tenth of the limit, at least 256 connections) bounds how many over-limit
/// connections that send nothing may wait for actix's request timeout (5 s).
pub fn actix_max_connections(limit: usize, workers: usize) -> usize {
    let room = (limit / 10).max(256);
    limit.saturating_add(room).div_ceil(workers.max(1))
}

fn closing(mut res: HttpResponse) -> HttpResponse {
    res.head_mut().set_connection_type(ConnectionType::Close);
    res
}

/// Middleware: a request on a connection over `--max-connections` gets 503 `unavailable`
/// with `Connection: close` and `Retry-After: 1`, at once.
pub async fn refuse_when_full<B: MessageBody + 'static>(
    req: ServiceRequest,
    next: Next<B>,
) -> Result<ServiceResponse<EitherBody<B>>, actix_web::Error> {
    if req
        .conn_data::<ConnectionGuard>()
        .is_some_and(|g| g.over_limit)
    {
        log::debug!(
            "refused {} {}: the server is full",
            req.method(),
            req.path()
        );
        let mut res = closing(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the server is at its connection limit: try again later",
        ));
        res.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return Ok(req.into_response(res).map_into_right_body());
    }
    next.call(req)
        .await
        .map(ServiceResponse::map_into_left_body)
}

/// What is too large about a request head, if anything.
fn oversized(req: &ServiceRequest) -> Option<(StatusCode, String)> {
    let url = req.uri().path_and_query().map_or(0, |pq| pq.as_str().len());
    if url > MAX_URL_BYTES {
        return Some((
            StatusCode::URI_TOO_LONG,
            format!(
                "the URL is {url} bytes, more than {MAX_URL_BYTES}: a token belongs in the \
                 Authorization header, or is not a token"
            ),
        ));
    }
    let mut total = 0;
    for (name, value) in req.headers() {
        let len = value.len();
        if len > MAX_HEADER_BYTES {
            return Some((
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                format!("the {name} header is {len} bytes, more than {MAX_HEADER_BYTES}"),
            ));
        }
        total += name.as_str().len() + len;
    }
    (total > MAX_HEADERS_BYTES).then(|| {
        (
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!("the headers are {total} bytes, more than {MAX_HEADERS_BYTES}"),
        )
    })
}

/// Middleware: a request whose URL or headers are too large gets 414 or 431 with a JSON
/// `{code: "invalid_field", message}` body, and its connection is closed.
pub async fn refuse_oversized<B: MessageBody + 'static>(
    req: ServiceRequest,
    next: Next<B>,
) -> Result<ServiceResponse<EitherBody<B>>, actix_web::Error> {
    if let Some((status, message)) = oversized(&req) {
        log::info!("refused {} {}: {message}", req.method(), req.path());
        let res = closing(error(status, "invalid_field", &message));
        return Ok(req.into_response(res).map_into_right_body());
    }
    next.call(req)
        .await
        .map(ServiceResponse::map_into_left_body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_marks_connections_over_the_limit() {
        let metrics = Arc::new(Metrics::new());
        let counter = ConnectionCounter::new(2, metrics.clone());
        let a = counter.admit();
        let b = counter.admit();
        let c = counter.admit();
        assert!(!a.over_limit && !b.over_limit && c.over_limit);
        assert_eq!(counter.open(), 3);
        drop(c);
        drop(a);
        assert_eq!(counter.open(), 1);
        let d = counter.admit();
        assert!(!d.over_limit);
        assert!(metrics
            .render()
            .contains("agentcast_connections_refused_total{reason=\"server_full\"} 1"));
    }

    #[test]
    fn actix_cap_leaves_room_above_ours() {
        assert_eq!(actix_max_connections(4, 2), 130);
        assert_eq!(actix_max_connections(100_000, 2), 55_000);
        assert!(actix_max_connections(usize::MAX, 1) >= 1);
        assert!(actix_max_connections(1, 0) > 1);
    }
}
