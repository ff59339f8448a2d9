//! The publish API (PROTOCOL.md section 11): agents outside the server, in any language,
//! create runs for users and publish their events, with a publisher token (claim
//! `scope: "publish"`). A user's token gets 403 `forbidden` here, as a publisher's does on the
//! user's routes.
//!
//! - `POST /v1/publish/runs` `{user, agent, input?, thread_id?}` → 201 `{run_id}`;
//! - `POST /v1/publish/runs/{run_id}/events` `{events: [{n, type, data}]}` → 200
//!   `{accepted, last_n}`: taken whole or not at all, idempotent by `n`;
//! - `GET /v1/publish/runs/{run_id}` → the run as `GET /v1/runs/{id}` shows it, and `last_n`.
//!
//! A publisher sees and touches only the runs it created (a webhook run's token, only its
//! run); any other run is a 404. Bodies are bounded by `--publish-max-body-bytes` (413).

use actix_web::http::StatusCode;
use actix_web::web::{Bytes, BytesMut};
use actix_web::{web, HttpRequest, HttpResponse};
use agentcast_actors::publish::{check_agent_name, parse_batch, BatchFault};
use agentcast_actors::router::{InspectPublished, Publish, PublishRefused, StartPublished};
use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::routes::{authenticate_publisher, error, forbidden, AppState};
use crate::runs::{
    inspect_refused, json_object, not_found, run_view, start_refused, store_unavailable,
    unavailable,
};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/publish/runs", web::post().to(create))
        .route("/v1/publish/runs/{run_id}/events", web::post().to(events))
        .route("/v1/publish/runs/{run_id}", web::get().to(inspect));
}

/// Reads a request body up to `limit` bytes; past it, 413 with a JSON error at once.
async fn read_body(mut payload: web::Payload, limit: usize) -> Result<Bytes, HttpResponse> {
    let mut body = BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| {
            error(
                StatusCode::BAD_REQUEST,
                "bad_json",
                &format!("the body could not be read: {e}"),
            )
        })?;
        if body.len() + chunk.len() > limit {
            return Err(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_field",
                &format!(
                    "the body is over {limit} bytes (--publish-max-body-bytes): send fewer events per batch"
                ),
            ));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

fn invalid(status: StatusCode, message: &str, index: Option<usize>) -> HttpResponse {
    let mut body = json!({"code": "invalid_field", "message": message});
    if let Some(index) = index {
        body["index"] = json!(index);
    }
    HttpResponse::build(status).json(body)
}

/// `POST /v1/publish/runs`: a run for a user, by this publisher.
async fn create(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> HttpResponse {
    let (publisher, only_run) = match authenticate_publisher(&req, &state) {
        Ok(who) => who,
        Err(refusal) => return *refusal,
    };
    if only_run.is_some() {
        return forbidden("this token publishes to one run only; it cannot create runs");
    }
    let body = match read_body(payload, state.publish_max_body).await {
        Ok(body) => body,
        Err(refusal) => return refusal,
    };
    let obj = match json_object(&body) {
        Ok(obj) => obj,
        Err(refusal) => return *refusal,
    };
    let bad = |message: &str| invalid(StatusCode::BAD_REQUEST, message, None);
    let user = match obj.get("user") {
        Some(Value::String(user)) => user.clone(),
        _ => return bad("user must be the id of the user the run is for"),
    };
    if let Err(e) = crate::auth::check_user_id(&user) {
        return bad(&format!("user: {e}"));
    }
    let agent = match obj.get("agent") {
        Some(Value::String(agent)) => agent.clone(),
        _ => return bad("agent must be a string: the name the user sees"),
    };
    if let Err(e) = check_agent_name(&agent) {
        return bad(&e);
    }
    let thread_id = match obj.get("thread_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(t)) if (1..=128).contains(&t.chars().count()) => Some(t.clone()),
        Some(_) => return bad("thread_id must be a string of 1 to 128 characters"),
    };
    let ask = StartPublished {
        publisher,
        user: user.into(),
        agent,
        input: obj.get("input").cloned().unwrap_or(Value::Null),
        thread_id,
    };
    match state.router.start_published.send(ask).await {
        Ok(Ok(run_id)) => HttpResponse::Created().json(json!({ "run_id": &*run_id })),
        Ok(Err(refused)) => start_refused(refused),
        Err(_) => unavailable(),
    }
}

/// `POST /v1/publish/runs/{run_id}/events`: a batch, whole or not at all.
async fn events(
    req: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> HttpResponse {
    let (publisher, only_run) = match authenticate_publisher(&req, &state) {
        Ok(who) => who,
        Err(refusal) => return *refusal,
    };
    let body = match read_body(payload, state.publish_max_body).await {
        Ok(body) => body,
        Err(refusal) => return refusal,
    };
    let obj = match json_object(&body) {
        Ok(obj) => obj,
        Err(refusal) => return *refusal,
    };
    let batch = match parse_batch(&Value::Object(obj)) {
        Ok(batch) => batch,
        Err(BatchFault::Shape { index, message }) => {
            return invalid(StatusCode::BAD_REQUEST, &message, index)
        }
        Err(BatchFault::Type { index, message }) => {
            return invalid(StatusCode::CONFLICT, &message, Some(index))
        }
    };
    let ask = Publish {
        publisher,
        only_run,
        run_id: path.into_inner(),
        events: batch,
    };
    match state.router.publish.send(ask).await {
        Ok(Ok(accepted)) => HttpResponse::Ok()
            .json(json!({"accepted": accepted.accepted, "last_n": accepted.last_n})),
        Ok(Err(PublishRefused::NotFound)) => not_found(),
        Ok(Err(PublishRefused::Ended(status))) => HttpResponse::Conflict().json(json!({
            "code": "run_not_found",
            "message": format!("the run has ended ({}): it takes no more events", status.as_str()),
            "status": status.as_str(),
        })),
        Ok(Err(PublishRefused::Order { index, message } | PublishRefused::Rule { index, message })) => {
            invalid(StatusCode::CONFLICT, &message, Some(index))
        }
        Ok(Err(PublishRefused::Busy)) => HttpResponse::TooManyRequests()
            .insert_header(("Retry-After", "1"))
            .json(json!({
                "code": "rate_limited",
                "message": "the user's events are being held back for a tab that is catching up: retry the batch (it is idempotent)",
                "retry_after_ms": 100,
            })),
        Ok(Err(PublishRefused::Unavailable)) => store_unavailable(),
        Err(_) => unavailable(),
    }
}

/// `GET /v1/publish/runs/{run_id}`: the run, its events so far, and `last_n`.
async fn inspect(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> HttpResponse {
    let (publisher, only_run) = match authenticate_publisher(&req, &state) {
        Ok(who) => who,
        Err(refusal) => return *refusal,
    };
    let ask = InspectPublished {
        publisher,
        only_run,
        run_id: path.into_inner(),
    };
    match state.router.inspect_published.send(ask).await {
        Ok(Ok((view, last_n))) => run_view(view, Some(last_n)),
        Ok(Err(refused)) => inspect_refused(refused),
        Err(_) => unavailable(),
    }
}
