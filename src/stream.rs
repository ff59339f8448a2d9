//! The two ways to receive a user's run events: the WebSocket (`GET /v1/ws`, a
//! [`Session`]) and Server-Sent Events (`GET /v1/events`, an [`SseSession`]). Both check the
//! token and the resume point here, before anything is streamed, and join the registry the
//! same way.

use actix::Actor;
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use agentcast_actors::session::Session;
use agentcast_actors::sse::{Joined, SseSession};

use crate::routes::{authenticate, error, AppState, StreamQuery};
use crate::socket::ConnSocket;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/ws", web::get().to(websocket))
        .route("/v1/events", web::get().to(events));
}

async fn websocket(
    req: HttpRequest,
    stream: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, actix_web::Error> {
    let query = match StreamQuery::parse(&req) {
        Ok(q) => q,
        Err(refusal) => return Ok(*refusal),
    };
    let user = match authenticate(&req, &state, query.token.as_deref()) {
        Ok(user) => user,
        Err(refusal) => return Ok(*refusal),
    };
    let resume = match query.resume(None) {
        Ok(resume) => resume,
        Err(refusal) => return Ok(*refusal),
    };
    let reset = req.conn_data::<ConnSocket>().map(ConnSocket::reset_handle);
    Session::new(
        user.into(),
        state.router.clone(),
        state.sessions.clone(),
        resume,
        reset,
    )
    .start(&req, stream)
}

/// `GET /v1/events`: Server-Sent Events. `Last-Event-ID` (or `?after_seq=`) resumes.
async fn events(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    let query = match StreamQuery::parse(&req) {
        Ok(q) => q,
        Err(refusal) => return *refusal,
    };
    let user = match authenticate(&req, &state, query.token.as_deref()) {
        Ok(user) => user,
        Err(refusal) => return *refusal,
    };
    let last_event_id = match req.headers().get("Last-Event-ID").map(|v| v.to_str()) {
        None => None,
        Some(Ok(v)) => Some(v),
        Some(Err(_)) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_field",
                "Last-Event-ID must be a seq",
            )
        }
    };
    let resume = match query.resume(last_event_id) {
        Ok(resume) => resume,
        Err(refusal) => return *refusal,
    };
    let reset = req.conn_data::<ConnSocket>().map(ConnSocket::reset_handle);
    let (session, body, joined) = SseSession::new(
        user.into(),
        state.router.clone(),
        resume,
        reset,
        state.sessions.heartbeat_interval,
        state.sessions.outbound_queue,
        state.metrics.clone(),
    );
    session.start();
    // Refusals are answered before anything is streamed.
    match joined.await {
        Ok(Joined::Yes) => {}
        refused => return join_refused(refused.ok()),
    }
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("Cache-Control", "no-cache"))
        // Tells nginx and similar proxies not to buffer the stream.
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(body)
}

/// The answer to a stream that could not join its user (`None`: the session is gone), before
/// anything is streamed.
pub(crate) fn join_refused(joined: Option<Joined>) -> HttpResponse {
    match joined {
        Some(Joined::TooManyConnections(limit)) => error(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            &format!("too many connections for this user (at most {limit}); close one first"),
        ),
        Some(Joined::StoreUnavailable) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the event store is unreachable; try again later",
        ),
        Some(Joined::RunRefused(refused)) => crate::runs::start_refused(refused),
        Some(Joined::RunGone) => error(
            StatusCode::GONE,
            "resume_gap",
            "the run's first events are no longer kept; it cannot be replayed from its start",
        ),
        Some(Joined::Yes | Joined::Following(_) | Joined::Unavailable) | None => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "internal",
            "the event router is unavailable",
        ),
    }
}
