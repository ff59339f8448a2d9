//! HTTP routes: the WebSocket endpoint (authentication and resume parameters are checked
//! here, before the upgrade), health, and in dev mode the token route.

use actix_web::{http::StatusCode, web, HttpRequest, HttpResponse};
use agentcast_actors::router::{ResumeFrom, Router};
use agentcast_actors::session::{Session, SessionSettings};
use serde::Deserialize;
use serde_json::json;

use crate::auth::{self, AuthError};
use crate::socket::ConnSocket;

/// Shared by every worker.
pub struct AppState {
    pub router: Router,
    pub sessions: SessionSettings,
    pub secret: String,
}

pub fn configure(cfg: &mut web::ServiceConfig, dev_mode: bool) {
    cfg.route("/healthz", web::get().to(healthz))
        .route("/v1/ws", web::get().to(websocket));
    if dev_mode {
        cfg.route("/v1/dev/token", web::post().to(dev_token));
    }
}

/// A JSON error body `{code, message}`.
pub fn error(status: StatusCode, code: &str, message: &str) -> HttpResponse {
    HttpResponse::build(status).json(json!({ "code": code, "message": message }))
}

fn unauthorized(e: AuthError) -> HttpResponse {
    let mut res = error(StatusCode::UNAUTHORIZED, "unauthorized", &e.to_string());
    res.headers_mut().insert(
        actix_web::http::header::WWW_AUTHENTICATE,
        actix_web::http::header::HeaderValue::from_static("Bearer"),
    );
    res
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().content_type("text/plain").body("ok\n")
}

#[derive(Deserialize)]
struct WsQuery {
    token: Option<String>,
    after_seq: Option<String>,
    epoch: Option<String>,
}

async fn websocket(
    req: HttpRequest,
    stream: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, actix_web::Error> {
    let query = match web::Query::<WsQuery>::from_query(req.query_string()) {
        Ok(q) => q.into_inner(),
        Err(e) => {
            return Ok(error(
                StatusCode::BAD_REQUEST,
                "invalid_field",
                &format!("bad query string: {e}"),
            ))
        }
    };
    let Some(token) = auth::token_of(&req, query.token.as_deref()) else {
        return Ok(unauthorized(AuthError::Missing));
    };
    let user = match auth::verify(&state.secret, &token) {
        Ok(user) => user,
        Err(e) => {
            log::info!("refused a connection: {e}");
            return Ok(unauthorized(e));
        }
    };
    let resume = match (query.after_seq, query.epoch) {
        (None, None) => None,
        (None, Some(_)) => {
            return Ok(error(
                StatusCode::BAD_REQUEST,
                "invalid_field",
                "epoch needs after_seq",
            ));
        }
        (Some(after), epoch) => match after.parse::<u64>() {
            Ok(after_seq) => Some(ResumeFrom { after_seq, epoch }),
            Err(_) => {
                return Ok(error(
                    StatusCode::BAD_REQUEST,
                    "invalid_field",
                    "after_seq must be a non-negative integer",
                ))
            }
        },
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

#[derive(Deserialize)]
struct DevTokenRequest {
    user: String,
}

/// Dev mode only: a token for any user, valid for a day.
async fn dev_token(body: web::Bytes, state: web::Data<AppState>) -> HttpResponse {
    let Ok(ask) = serde_json::from_slice::<DevTokenRequest>(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_json",
            "body must be {\"user\":\"...\"}",
        );
    };
    if !auth::valid_user_id(&ask.user) {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_field",
            "user must be 1 to 128 printable characters",
        );
    }
    let token = auth::sign(&state.secret, &ask.user, auth::now_unix() + 86_400);
    HttpResponse::Ok().json(json!({ "token": token }))
}
