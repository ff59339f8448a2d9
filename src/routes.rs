//! HTTP routes and what they share: the application state, authentication of a request,
//! JSON errors, health, metrics, the server's info, the catalog and (dev mode only) the token
//! route. The streaming endpoints are in `stream.rs`, the runs API in `runs.rs`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use actix_web::body::{BoxBody, EitherBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::{http::StatusCode, web, HttpRequest, HttpResponse};
use agentcast_actors::catalog::Catalog;
use agentcast_actors::metrics::Metrics;
use agentcast_actors::router::{RefreshGauges, ResumeFrom, Router};
use agentcast_actors::session::SessionSettings;
use serde::Deserialize;
use serde_json::json;

use crate::auth::{self, AuthError, Signer};
use crate::keys::{KeyStore, Principal, Scope};
use crate::origins::OriginPolicy;

/// Shared by every worker.
pub struct AppState {
    pub router: Router,
    pub catalog: Arc<Catalog>,
    pub sessions: SessionSettings,
    pub metrics: Arc<Metrics>,
    /// Checks tokens; its verifier may be swapped while serving.
    pub keys: Arc<KeyStore>,
    /// Signs the dev-mode tokens; None when the server holds no secret.
    pub signer: Option<Signer>,
    /// Which pages may open `/v1/ws` and `/v1/events`.
    pub origins: OriginPolicy,
    /// Set when the server starts to stop: new requests are refused with 503.
    pub draining: AtomicBool,
    /// Names of the webhook agents (section 11), listed with the server's own.
    pub webhook_agents: Vec<String>,
    /// Largest body of a publisher's request.
    pub publish_max_body: usize,
}

pub fn configure(cfg: &mut web::ServiceConfig, dev_mode: bool, max_body: usize) {
    cfg.app_data(web::PayloadConfig::new(max_body))
        .route("/healthz", web::get().to(healthz))
        .route("/metrics", web::get().to(metrics))
        .route("/v1/info", web::get().to(move || info(dev_mode)))
        .route("/v1/agents", web::get().to(agents));
    crate::stream::configure(cfg);
    crate::runs::configure(cfg);
    crate::publish::configure(cfg);
    crate::frontends::configure(cfg);
    crate::web::configure(cfg);
    if dev_mode {
        cfg.route("/v1/dev/token", web::post().to(dev_token));
    }
}

/// Middleware: while draining, everything but `/metrics` answers 503 (health included, so
/// load balancers stop sending new users here).
pub async fn refuse_while_draining(
    req: ServiceRequest,
    next: actix_web::middleware::Next<BoxBody>,
) -> Result<ServiceResponse<EitherBody<BoxBody>>, actix_web::Error> {
    let draining = req
        .app_data::<web::Data<AppState>>()
        .is_some_and(|s| s.draining.load(Ordering::Relaxed));
    if draining && req.path() != "/metrics" {
        let res = error(
            StatusCode::SERVICE_UNAVAILABLE,
            "internal",
            "the server is shutting down",
        );
        return Ok(req.into_response(res).map_into_right_body());
    }
    next.call(req)
        .await
        .map(ServiceResponse::map_into_left_body)
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

/// The user a request is from: `Authorization: Bearer`, else `query_token` (for clients that
/// cannot set headers: browsers' WebSocket and EventSource). Otherwise the 401 to answer.
/// A publisher's token (section 11) is refused here with 403 `forbidden`.
pub fn authenticate(
    req: &HttpRequest,
    state: &AppState,
    query_token: Option<&str>,
) -> Result<String, Box<HttpResponse>> {
    match principal(req, state, query_token)? {
        Principal {
            sub,
            scope: Scope::User,
        } => Ok(sub),
        Principal { sub, .. } => {
            log::info!(
                "refused {} {}: a publisher token ({sub})",
                req.method(),
                req.path()
            );
            Err(Box::new(forbidden(
                "a publisher token cannot act as a user",
            )))
        }
    }
}

/// The publishing service a request is from (`Authorization: Bearer` with a publisher token),
/// and the one run it is limited to, if any; a user's token is refused with 403 `forbidden`.
pub fn authenticate_publisher(
    req: &HttpRequest,
    state: &AppState,
) -> Result<(String, Option<String>), Box<HttpResponse>> {
    match principal(req, state, None)? {
        Principal {
            sub,
            scope: Scope::Publisher { run },
        } => Ok((sub, run)),
        Principal { sub, .. } => {
            log::info!(
                "refused {} {}: a user token ({sub}) cannot publish",
                req.method(),
                req.path()
            );
            Err(Box::new(forbidden(
                "a user's token cannot publish: use a publisher token (agentcast token NAME --publisher)",
            )))
        }
    }
}

fn principal(
    req: &HttpRequest,
    state: &AppState,
    query_token: Option<&str>,
) -> Result<Principal, Box<HttpResponse>> {
    let verified = auth::token_of(req, query_token).and_then(|token| state.keys.verify(&token));
    verified.map_err(|e| {
        log::info!("refused {} {}: {e}", req.method(), req.path());
        state.metrics.auth_failure(e.reason());
        Box::new(unauthorized(e))
    })
}

pub fn forbidden(message: &str) -> HttpResponse {
    error(StatusCode::FORBIDDEN, "forbidden", message)
}

/// Query parameters of the streaming endpoints.
#[derive(Deserialize)]
pub struct StreamQuery {
    pub token: Option<String>,
    pub after_seq: Option<String>,
    pub epoch: Option<String>,
}

impl StreamQuery {
    pub fn parse(req: &HttpRequest) -> Result<StreamQuery, Box<HttpResponse>> {
        web::Query::<StreamQuery>::from_query(req.query_string())
            .map(web::Query::into_inner)
            .map_err(|e| {
                Box::new(error(
                    StatusCode::BAD_REQUEST,
                    "invalid_field",
                    &format!("bad query string: {e}"),
                ))
            })
    }

    /// The resume point asked for, if any: `?after_seq=` (with `?epoch=`), else `fallback`
    /// (SSE's `Last-Event-ID`).
    pub fn resume(&self, fallback: Option<&str>) -> Result<Option<ResumeFrom>, Box<HttpResponse>> {
        // Where the value came from, to name it in a refusal.
        let (after, name) = match (&self.after_seq, &self.epoch) {
            (None, Some(_)) => {
                return Err(Box::new(error(
                    StatusCode::BAD_REQUEST,
                    "invalid_field",
                    "epoch needs after_seq",
                )))
            }
            (Some(after), _) => (Some(after.as_str()), "after_seq"),
            (None, None) => (fallback, "the Last-Event-ID header"),
        };
        let Some(after) = after else {
            return Ok(None);
        };
        match after.trim().parse::<u64>() {
            Ok(after_seq) => Ok(Some(ResumeFrom {
                after_seq,
                epoch: self.epoch.clone(),
            })),
            Err(_) => Err(Box::new(error(
                StatusCode::BAD_REQUEST,
                "invalid_field",
                &format!("{name} must be a non-negative integer (a seq)"),
            ))),
        }
    }
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().content_type("text/plain").body("ok\n")
}

/// `GET /metrics`: Prometheus text.
async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    if state
        .router
        .refresh_gauges
        .send(RefreshGauges)
        .await
        .is_err()
    {
        log::warn!("metrics: the registry did not answer; gauges may be stale");
    }
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(state.metrics.render())
}

/// `GET /v1/info`, no auth: what a client needs before signing in, e.g. whether
/// `POST /v1/dev/token` exists.
async fn info(dev_mode: bool) -> HttpResponse {
    HttpResponse::Ok().json(json!({
        "protocol": agentcast_actors::protocol::PROTOCOL_VERSION,
        "dev_mode": dev_mode,
        "version": env!("CARGO_PKG_VERSION"),
    }))
}

/// `GET /v1/agents`: what can be run, and the tools agents can call.
async fn agents(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    if let Err(refusal) = authenticate(&req, &state, None) {
        return *refusal;
    }
    let mut agents: Vec<_> = state
        .catalog
        .agents()
        .map(|a| json!({"name": a.name(), "description": a.description(), "input": a.input_schema()}))
        .collect();
    agents.extend(state.webhook_agents.iter().map(|name| {
        json!({"name": name, "description": "An agent outside the server, called by webhook: it publishes its events (PROTOCOL.md section 11).", "input": true})
    }));
    let tools: Vec<_> = state
        .catalog
        .tools()
        .list()
        .map(|(name, description, args)| json!({"name": name, "description": description, "args": args}))
        .collect();
    HttpResponse::Ok().json(json!({ "agents": agents, "tools": tools }))
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
    if let Err(e) = auth::check_user_id(&ask.user) {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_field",
            &format!("user: {e}"),
        );
    }
    let Some(signer) = &state.signer else {
        return error(
            StatusCode::NOT_FOUND,
            "invalid_field",
            "this server does not sign tokens",
        );
    };
    let token = signer.sign(&ask.user, auth::now_unix() + 86_400);
    HttpResponse::Ok().json(json!({ "token": token }))
}
