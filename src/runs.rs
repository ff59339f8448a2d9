//! The runs API over plain HTTP (PROTOCOL.md §7): start, inspect and cancel runs. Events
//! still go to the user's connections; this is for callers that are not one (a backend
//! starting a run for a user, a page reloading a run's history). Another user's run is a
//! 404, never a 403: its existence is not revealed.

use actix_web::http::StatusCode;
use actix_web::web::Bytes;
use actix_web::{web, HttpRequest, HttpResponse};
use agentcast_actors::protocol::ErrorCode;
use agentcast_actors::protocol::{parse_client_frame, Command};
use agentcast_actors::router::{
    CancelRefused, CancelRun, InspectRefused, InspectRun, Respond, RunView, StartRefused, StartRun,
};
use serde_json::{json, Value};

use crate::routes::{authenticate, error, AppState};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/runs", web::post().to(start))
        .route("/v1/runs/{run_id}", web::get().to(inspect))
        .route("/v1/runs/{run_id}/cancel", web::post().to(cancel))
        .route("/v1/runs/{run_id}/respond", web::post().to(respond));
}

pub(crate) fn unavailable() -> HttpResponse {
    error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "the event router is unavailable",
    )
}

/// Redis (section 10) is unreachable: 503 `unavailable`.
pub(crate) fn store_unavailable() -> HttpResponse {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "the event store is unreachable; try again later",
    )
}

pub(crate) fn not_found() -> HttpResponse {
    error(StatusCode::NOT_FOUND, "run_not_found", "no such run")
}

/// `POST /v1/runs` `{agent, input, thread_id?}` → 202 `{run_id}`.
async fn start(req: HttpRequest, body: web::Bytes, state: web::Data<AppState>) -> HttpResponse {
    let user = match authenticate(&req, &state, None) {
        Ok(user) => user,
        Err(refusal) => return *refusal,
    };
    let frame = match json_object(&body) {
        Ok(frame) => frame,
        Err(refusal) => return *refusal,
    };
    let ask = match parse_start(user, frame) {
        Ok(ask) => ask,
        Err(refusal) => return *refusal,
    };
    match state.router.start_run.send(ask).await {
        Ok(Ok(run_id)) => HttpResponse::Accepted().json(json!({ "run_id": &*run_id })),
        Ok(Err(refused)) => start_refused(refused),
        Err(_) => unavailable(),
    }
}

/// A request body that must be a JSON object; else the 400 `bad_json`.
pub(crate) fn json_object(
    body: &[u8],
) -> Result<serde_json::Map<String, Value>, Box<HttpResponse>> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(obj)) => Ok(obj),
        Ok(_) => Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            "bad_json",
            "the body must be a JSON object",
        ))),
        Err(e) => Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            "bad_json",
            &format!("not valid JSON: {e}"),
        ))),
    }
}

/// Reads a JSON object as the WebSocket command `kind` (with `run_id` from the path), through
/// the same parser, so that both refuse the same things with the same codes; else the 400.
fn command_of(
    mut frame: serde_json::Map<String, Value>,
    kind: &str,
    run_id: Option<&str>,
) -> Result<Command, Box<HttpResponse>> {
    frame.insert("type".into(), json!(kind));
    frame.remove("request_id");
    if let Some(run_id) = run_id {
        frame.insert("run_id".into(), json!(run_id));
    }
    parse_client_frame(&Value::Object(frame).to_string())
        .map(|parsed| parsed.command)
        .map_err(|refusal| {
            let code = serde_json::to_value(refusal.code).unwrap_or(Value::Null);
            Box::new(error(
                StatusCode::BAD_REQUEST,
                code.as_str().unwrap_or("invalid_field"),
                &refusal.message,
            ))
        })
}

/// The run a JSON object `{agent, input, thread_id?}` asks `user` to start; else the 400.
pub(crate) fn parse_start(
    user: String,
    frame: serde_json::Map<String, Value>,
) -> Result<StartRun, Box<HttpResponse>> {
    match command_of(frame, "start_run", None)? {
        Command::StartRun {
            agent,
            input,
            thread_id,
        } => Ok(StartRun {
            user: user.into(),
            agent,
            input,
            thread_id,
        }),
        _ => Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            "invalid_field",
            "not a run",
        ))),
    }
}

pub(crate) fn start_refused(refused: StartRefused) -> HttpResponse {
    match refused {
        StartRefused::UnknownAgent => error(
            StatusCode::BAD_REQUEST,
            "unknown_agent",
            "no agent by that name; see GET /v1/agents",
        ),
        StartRefused::InvalidInput(why) => error(StatusCode::BAD_REQUEST, "invalid_field", &why),
        StartRefused::TooManyRuns(limit) => error(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_runs",
            &format!("{limit} runs are already running for this user"),
        ),
        StartRefused::TooManyPublished(limit) => error(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_runs",
            &format!(
                "{limit} runs of this publisher are already running (--max-runs-per-publisher)"
            ),
        ),
        StartRefused::RateLimited { retry_after_ms } => HttpResponse::TooManyRequests()
            .insert_header(("Retry-After", retry_after_ms.div_ceil(1000).to_string()))
            .json(json!({
                "code": "rate_limited",
                "message": "too many runs started in the last minute",
                "retry_after_ms": retry_after_ms,
            })),
        StartRefused::ShuttingDown => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "internal",
            "the server is shutting down",
        ),
        StartRefused::Unavailable => store_unavailable(),
    }
}

/// `GET /v1/runs/{run_id}`: the run's status, timings and events so far.
async fn inspect(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> HttpResponse {
    let user = match authenticate(&req, &state, None) {
        Ok(user) => user,
        Err(refusal) => return *refusal,
    };
    let ask = InspectRun {
        user: user.into(),
        run_id: path.into_inner(),
    };
    match state.router.inspect_run.send(ask).await {
        Ok(Ok(run)) => run_view(run, None),
        Ok(Err(refused)) => inspect_refused(refused),
        Err(_) => unavailable(),
    }
}

pub(crate) fn inspect_refused(refused: InspectRefused) -> HttpResponse {
    match refused {
        InspectRefused::NotFound => not_found(),
        InspectRefused::Unavailable => store_unavailable(),
        InspectRefused::Busy(limit) => HttpResponse::TooManyRequests()
            .insert_header(("Retry-After", "1"))
            .json(json!({
                "code": "rate_limited",
                "message": format!("{limit} run views are already being sent to this user; read them first"),
                "retry_after_ms": 1000,
            })),
    }
}

/// A run as `GET /v1/runs/{id}` shows it; `last_n` is added for its publisher (section 11).
pub(crate) fn run_view(run: RunView, last_n: Option<u64>) -> HttpResponse {
    let rfc3339 = |t| humantime::format_rfc3339_micros(t).to_string();
    let duration_ms = run
        .ended_at
        .and_then(|end| end.duration_since(run.started_at).ok())
        .map(|d| d.as_millis() as u64);
    let mut head = json!({
        "run_id": &*run.run_id,
        "agent": run.agent,
        "thread_id": run.thread_id.as_deref(),
        "status": run.status.map_or("running", |s| s.as_str()),
        "started_at": rfc3339(run.started_at),
        "ended_at": run.ended_at.map(rfc3339),
        "duration_ms": duration_ms,
        "truncated": run.truncated,
    });
    if let Some(last_n) = last_n {
        head["last_n"] = json!(last_n);
    }
    // The events are already encoded and shared with the user's log: the body is their bytes,
    // not a copy. The lease travels with the body: it counts against the user's views in
    // flight until the response has been sent or the client has gone.
    let mut head = head.to_string();
    head.pop();
    head.push_str(",\"events\":[");
    let lease = run.lease;
    let events = run.events.into_iter().enumerate().flat_map(|(i, frame)| {
        let sep = (i > 0).then(|| Bytes::from_static(b","));
        sep.into_iter()
            .chain(std::iter::once(frame.text.into_bytes()))
    });
    let chunks = std::iter::once(Bytes::from(head))
        .chain(events)
        .chain(std::iter::once(Bytes::from_static(b"]}")))
        .map(move |chunk| {
            let _held = &lease;
            Ok::<_, actix_web::Error>(chunk)
        });
    HttpResponse::Ok()
        .content_type("application/json")
        .streaming(futures_util::stream::iter(chunks))
}

/// `POST /v1/runs/{run_id}/cancel`: as `cancel_run`.
async fn cancel(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> HttpResponse {
    let user = match authenticate(&req, &state, None) {
        Ok(user) => user,
        Err(refusal) => return *refusal,
    };
    let run_id = path.into_inner();
    match state
        .router
        .cancel_run
        .send(CancelRun {
            user: user.into(),
            run_id: run_id.clone(),
        })
        .await
    {
        Ok(Ok(())) => HttpResponse::Accepted().json(json!({ "run_id": run_id })),
        Ok(Err(CancelRefused::NotFound)) => not_found(),
        Ok(Err(CancelRefused::Unavailable)) => store_unavailable(),
        Err(_) => unavailable(),
    }
}

/// `POST /v1/runs/{run_id}/respond` `{interrupt_id, response}`: as `respond` (section 12).
/// 202, or 400 `invalid_field`, 409 `interrupt_resolved`, 404 `run_not_found`.
async fn respond(
    req: HttpRequest,
    path: web::Path<String>,
    body: Bytes,
    state: web::Data<AppState>,
) -> HttpResponse {
    let user = match authenticate(&req, &state, None) {
        Ok(user) => user,
        Err(refusal) => return *refusal,
    };
    let run_id = path.into_inner();
    let answer = json_object(&body).and_then(|frame| command_of(frame, "respond", Some(&run_id)));
    let (interrupt_id, response) = match answer {
        Ok(Command::Respond {
            interrupt_id,
            response,
            ..
        }) => (interrupt_id, response),
        Ok(_) => return error(StatusCode::BAD_REQUEST, "invalid_field", "not an answer"),
        Err(refusal) => return *refusal,
    };
    let ask = Respond {
        user: user.into(),
        run_id: run_id.clone(),
        interrupt_id: interrupt_id.clone(),
        response,
    };
    match state.router.respond.send(ask).await {
        Ok(Ok(())) => {
            HttpResponse::Accepted().json(json!({ "run_id": run_id, "interrupt_id": interrupt_id }))
        }
        Ok(Err(refused)) => {
            let (code, message) = refused.code_and_message();
            let status = match code {
                ErrorCode::RunNotFound => StatusCode::NOT_FOUND,
                ErrorCode::InterruptResolved => StatusCode::CONFLICT,
                ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::BAD_REQUEST,
            };
            let code = serde_json::to_value(code).unwrap_or(Value::Null);
            error(status, code.as_str().unwrap_or("internal"), &message)
        }
        Err(_) => unavailable(),
    }
}
