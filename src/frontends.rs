//! The frontends' own protocols over HTTP (PROTOCOL.md section 13): `POST /v1/agui/{agent}`
//! (AG-UI, for CopilotKit and other AG-UI clients), `POST /v1/ai-sdk/{agent}` (the Vercel AI
//! SDK's `useChat`) and `GET /v1/ai-sdk/{agent}/{id}/stream` (its resume).
//!
//! Each starts (or finds) one run of the bearer user and streams that run's events in the
//! frontend's encoding through an [`SseSession`] following it: the same session, bounds and
//! slow-consumer rules as `GET /v1/events`, and it counts against the user's connections.
//! The run's events reach the user's other connections as usual.

use actix::Actor;
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use agentcast_actors::frontends::Encoding;
use agentcast_actors::router::{FindRefused, FindThreadRun};
use agentcast_actors::sse::{FollowRun, Joined, SseBody, SseSession};
use serde_json::{json, Map, Value};

use crate::routes::{authenticate, error, AppState};
use crate::runs::{json_object, parse_start};
use crate::socket::ConnSocket;
use crate::stream::join_refused;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/agui/{agent}", web::post().to(agui))
        .route("/v1/ai-sdk/{agent}", web::post().to(ai_sdk))
        .route(
            "/v1/ai-sdk/{agent}/{id}/stream",
            web::get().to(ai_sdk_resume),
        );
}

/// `POST /v1/agui/{agent}`: the body is AG-UI's `RunAgentInput`. The run's input is
/// `forwardedProps.input`, else the text of the last user message; `threadId` is its thread.
async fn agui(
    req: HttpRequest,
    agent: web::Path<String>,
    body: web::Bytes,
    state: web::Data<AppState>,
) -> HttpResponse {
    let user = match authenticate(&req, &state, None) {
        Ok(user) => user,
        Err(refusal) => return *refusal,
    };
    let body = match json_object(&body) {
        Ok(body) => body,
        Err(refusal) => return *refusal,
    };
    // Answers to interrupts go through agentcast's own `respond` (section 12): a run started
    // here for them would be a different run.
    if body
        .get("resume")
        .and_then(Value::as_array)
        .is_some_and(|r| !r.is_empty())
    {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_field",
            "resume is not supported: answer the run's question with POST /v1/runs/{run_id}/respond",
        );
    }
    let input = body
        .get("forwardedProps")
        .and_then(|props| props.get("input"))
        .cloned();
    let thread = body.get("threadId").cloned();
    start(
        req,
        state,
        user,
        agent.into_inner(),
        &body,
        input,
        thread,
        Encoding::AgUi,
    )
    .await
}

/// `POST /v1/ai-sdk/{agent}`: the body is what `useChat` sends (`{id, messages, ...}`). The
/// run's input is the body's `input`, else the text of the last user message; `id` is its
/// thread.
async fn ai_sdk(
    req: HttpRequest,
    agent: web::Path<String>,
    body: web::Bytes,
    state: web::Data<AppState>,
) -> HttpResponse {
    let user = match authenticate(&req, &state, None) {
        Ok(user) => user,
        Err(refusal) => return *refusal,
    };
    let body = match json_object(&body) {
        Ok(body) => body,
        Err(refusal) => return *refusal,
    };
    let input = body.get("input").cloned();
    let thread = body.get("id").cloned();
    start(
        req,
        state,
        user,
        agent.into_inner(),
        &body,
        input,
        thread,
        Encoding::AiSdk,
    )
    .await
}

/// Starts the run and answers with its stream (or the refusal, before anything is streamed).
#[allow(clippy::too_many_arguments)]
async fn start(
    req: HttpRequest,
    state: web::Data<AppState>,
    user: String,
    agent: String,
    body: &Map<String, Value>,
    input: Option<Value>,
    thread: Option<Value>,
    encoding: Encoding,
) -> HttpResponse {
    let Some(input) = input.or_else(|| last_user_text(body).map(Value::from)) else {
        let hint = match encoding {
            Encoding::AgUi => "forwardedProps.input",
            Encoding::AiSdk => "input",
        };
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_field",
            &format!("no input: give {hint} or a user message with text"),
        );
    };
    let mut run = Map::new();
    run.insert("agent".into(), json!(agent));
    run.insert("input".into(), input);
    if let Some(thread) = thread.filter(|t| !t.is_null()) {
        run.insert("thread_id".into(), thread);
    }
    let ask = match parse_start(user.clone(), run) {
        Ok(ask) => ask,
        Err(refusal) => return *refusal,
    };
    follow(&req, &state, user, FollowRun::Start(ask), encoding).await
}

/// `GET /v1/ai-sdk/{agent}/{id}/stream`: the thread's running run of `agent`, from its first
/// event, then live; 204 when none is running.
async fn ai_sdk_resume(
    req: HttpRequest,
    path: web::Path<(String, String)>,
    state: web::Data<AppState>,
) -> HttpResponse {
    let user = match authenticate(&req, &state, None) {
        Ok(user) => user,
        Err(refusal) => return *refusal,
    };
    let (agent, thread_id) = path.into_inner();
    let ask = FindThreadRun {
        user: user.clone().into(),
        thread_id,
        agent,
    };
    let run = match state.router.find_thread_run.send(ask).await {
        Ok(Ok(Some(run))) => run,
        Ok(Ok(None)) => return HttpResponse::NoContent().finish(),
        Ok(Err(FindRefused::Unavailable)) => return join_refused(Some(Joined::StoreUnavailable)),
        Err(_) => return join_refused(None),
    };
    let follow_run = FollowRun::Running {
        run_id: run.run_id,
        after_seq: run.after_seq,
    };
    follow(&req, &state, user, follow_run, Encoding::AiSdk).await
}

/// Streams one run in `encoding` once the session following it has joined.
async fn follow(
    req: &HttpRequest,
    state: &AppState,
    user: String,
    run: FollowRun,
    encoding: Encoding,
) -> HttpResponse {
    let reset = req.conn_data::<ConnSocket>().map(ConnSocket::reset_handle);
    let (session, body, joined) = SseSession::for_run(
        user.into(),
        state.router.clone(),
        run,
        encoding,
        reset,
        state.sessions.heartbeat_interval,
        state.sessions.outbound_queue,
        state.metrics.clone(),
    );
    session.start();
    match joined.await {
        Ok(Joined::Following(run_id)) => stream(body, &run_id, encoding),
        refused => join_refused(refused.ok()),
    }
}

fn stream(body: SseBody, run_id: &str, encoding: Encoding) -> HttpResponse {
    let mut res = HttpResponse::Ok();
    res.content_type("text/event-stream")
        .insert_header(("Cache-Control", "no-cache"))
        // Tells nginx and similar proxies not to buffer the stream.
        .insert_header(("X-Accel-Buffering", "no"))
        // Which run this is, for a client that wants to cancel it or read it elsewhere.
        .insert_header(("x-agentcast-run-id", run_id));
    if encoding == Encoding::AiSdk {
        res.insert_header(("x-vercel-ai-ui-message-stream", "v1"));
    }
    res.streaming(body)
}

/// The text of the last user message: AG-UI's `content` (a string, or parts with `text`) or
/// the AI SDK's `parts` of type `text`.
fn last_user_text(body: &Map<String, Value>) -> Option<String> {
    let message = body
        .get("messages")?
        .as_array()?
        .iter()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))?;
    if let Some(text) = message.get("content").and_then(Value::as_str) {
        return Some(text.to_owned());
    }
    let parts = message
        .get("parts")
        .or_else(|| message.get("content"))?
        .as_array()?;
    let text: String = parts
        .iter()
        .filter(|p| p.get("type").and_then(Value::as_str) == Some("text"))
        .filter_map(|p| p.get("text").and_then(Value::as_str))
        .collect();
    Some(text).filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(value: Value) -> Map<String, Value> {
        value.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn the_last_user_messages_text_in_each_shape() {
        let agui = body(json!({"messages": [
            {"id": "1", "role": "user", "content": "first"},
            {"id": "2", "role": "assistant", "content": "ok"},
            {"id": "3", "role": "user", "content": "second"},
            {"id": "4", "role": "assistant", "content": "ok"}]}));
        assert_eq!(last_user_text(&agui).as_deref(), Some("second"));
        let parts = body(json!({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "a"}, {"type": "image", "url": "x"}, {"type": "text", "text": "b"}]}]}));
        assert_eq!(last_user_text(&parts).as_deref(), Some("ab"));
        let ai_sdk = body(json!({"messages": [{"id": "m", "role": "user", "parts": [
            {"type": "text", "text": "hello"}]}]}));
        assert_eq!(last_user_text(&ai_sdk).as_deref(), Some("hello"));
    }

    #[test]
    fn no_user_text_is_no_input() {
        for b in [
            json!({}),
            json!({"messages": "x"}),
            json!({"messages": [{"role": "assistant", "content": "hi"}]}),
            json!({"messages": [{"role": "user", "parts": [{"type": "file"}]}]}),
        ] {
            assert_eq!(last_user_text(&body(b)), None);
        }
    }
}
