//! The HTTP side of the `llm` agent: one streaming `POST {base}/chat/completions`, read as
//! Server-Sent Events, handed over one `data:` payload at a time.
//!
//! The request runs on a task of its own on the agents' arbiter: `awc`, actix's client, is
//! single-threaded (`!Send`), while an agent's future must be `Send`. The agent holds a
//! [`ModelStream`]; dropping it (the run was cancelled, or ended) aborts that task, which drops
//! the response and with it the TCP connection, so the model server sees the close at once and
//! stops generating.

use std::time::Duration;

use eventsource_stream::{EventStreamError, Eventsource};
use futures_util::StreamExt;
use serde_json::Value;
use tokio::sync::mpsc;

/// How long connecting to the model server may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes of one model response read at most (the SSE stream of one call): bounds what a model
/// server that never stops, or sends one endless line, can make the server hold.
pub const MAX_RESPONSE_BYTES: usize = 8 * 1024 * 1024;

/// Bytes of one line of the stream at most (a chunk is one line; real ones are a few hundred
/// bytes). The SSE parser looks for a line's end from its start at every read, so one endless
/// line would cost time growing with its square.
pub const MAX_LINE_BYTES: usize = 256 * 1024;

/// Bytes of an HTTP error's body quoted in the run's error message.
const MAX_ERROR_BODY: usize = 512;

/// Where and how to call the model.
#[derive(Clone)]
pub struct Endpoint {
    /// `{base}/chat/completions`.
    pub url: String,
    pub api_key: Option<String>,
    /// A call that sends nothing (no response head, no byte of body) for this long fails.
    pub idle_timeout: Duration,
}

/// Why a model call's stream broke off.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamError {
    /// Nothing arrived for the idle timeout. After a `finish_reason` this is just a server
    /// that keeps the connection open without `[DONE]`.
    Idle(Duration),
    /// Anything else, worded for the run's error message.
    Failed(String),
}

impl std::fmt::Display for StreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StreamError::Idle(d) => {
                write!(f, "the model server sent nothing for {} ms", d.as_millis())
            }
            StreamError::Failed(why) => f.write_str(why),
        }
    }
}

/// A model call in flight: the `data:` payloads of its stream, in order. `None` when the
/// response's body ended. Dropping it closes the connection.
pub struct ModelStream {
    payloads: mpsc::Receiver<Result<String, StreamError>>,
    task: tokio::task::JoinHandle<()>,
}

impl ModelStream {
    pub async fn next(&mut self) -> Option<Result<String, StreamError>> {
        self.payloads.recv().await
    }
}

impl Drop for ModelStream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts a call with `body` (the Chat Completions request). Must be called on an actix
/// arbiter (the agents' one, where runs live).
pub fn open(endpoint: &Endpoint, body: Value) -> ModelStream {
    // A few payloads of slack: the agent emits each as an event, which may wait.
    let (tx, payloads) = mpsc::channel(16);
    let endpoint = endpoint.clone();
    let task = actix::spawn(async move {
        if let Err(e) = stream_payloads(&endpoint, &body, &tx).await {
            let _ = tx.send(Err(e)).await;
        }
    });
    ModelStream { payloads, task }
}

/// Why reading the body stopped, before SSE parsing.
#[derive(Debug)]
enum BodyError {
    Transport(awc::error::PayloadError),
    TooLong,
    LineTooLong,
}

/// Counts a response's bytes as they arrive, against [`MAX_RESPONSE_BYTES`] and
/// [`MAX_LINE_BYTES`].
#[derive(Default)]
struct Budget {
    read: usize,
    /// Bytes since the last line end.
    line: usize,
}

impl Budget {
    fn take(&mut self, piece: &[u8]) -> Result<(), BodyError> {
        self.read += piece.len();
        if self.read > MAX_RESPONSE_BYTES {
            return Err(BodyError::TooLong);
        }
        for byte in piece {
            if *byte == b'\n' || *byte == b'\r' {
                self.line = 0;
            } else {
                self.line += 1;
                if self.line > MAX_LINE_BYTES {
                    return Err(BodyError::LineTooLong);
                }
            }
        }
        Ok(())
    }
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyError::Transport(e) => write!(f, "the connection to the model server broke ({e})"),
            BodyError::TooLong => write!(
                f,
                "the model's response is longer than {MAX_RESPONSE_BYTES} bytes"
            ),
            BodyError::LineTooLong => write!(
                f,
                "the model's stream has a line longer than {MAX_LINE_BYTES} bytes"
            ),
        }
    }
}

async fn stream_payloads(
    endpoint: &Endpoint,
    body: &Value,
    tx: &mpsc::Sender<Result<String, StreamError>>,
) -> Result<(), StreamError> {
    let client = awc::Client::builder()
        .connector(awc::Connector::new().timeout(CONNECT_TIMEOUT))
        // Until the response head; the body has its own idle timeout below.
        .timeout(endpoint.idle_timeout)
        .disable_redirects()
        .finish();
    let mut request = client
        .post(&endpoint.url)
        .insert_header(("accept", "text/event-stream"));
    if let Some(key) = &endpoint.api_key {
        request = request.bearer_auth(key);
    }
    let mut response = request.send_json(body).await.map_err(|e| match e {
        awc::error::SendRequestError::Timeout => StreamError::Idle(endpoint.idle_timeout),
        e => StreamError::Failed(format!(
            "cannot reach the model server at {}: {e}",
            endpoint.url
        )),
    })?;
    let status = response.status();
    if !status.is_success() {
        let quoted = error_body(&mut response, endpoint.idle_timeout).await;
        let quoted = match &endpoint.api_key {
            // A server that echoes the request must not put the key in a user's event.
            Some(key) if !key.is_empty() => quoted.replace(key.as_str(), "[hidden]"),
            _ => quoted,
        };
        return Err(StreamError::Failed(format!(
            "the model server answered HTTP {}{}",
            status.as_u16(),
            if quoted.is_empty() {
                String::new()
            } else {
                format!(": {quoted}")
            }
        )));
    }
    let mut budget = Budget::default();
    let bytes = response.map(move |piece| {
        let piece = piece.map_err(BodyError::Transport)?;
        budget.take(&piece)?;
        Ok::<_, BodyError>(piece)
    });
    let mut events = bytes.eventsource();
    loop {
        let next = tokio::time::timeout(endpoint.idle_timeout, events.next())
            .await
            .map_err(|_| StreamError::Idle(endpoint.idle_timeout))?;
        let event = match next {
            None => return Ok(()),
            Some(Ok(event)) => event,
            Some(Err(EventStreamError::Transport(e))) => {
                return Err(StreamError::Failed(e.to_string()))
            }
            Some(Err(e)) => {
                return Err(StreamError::Failed(format!(
                    "the model's stream is not valid Server-Sent Events ({e})"
                )))
            }
        };
        // Comment lines never get here; an event without data (a bare `event:` line) says
        // nothing.
        if event.data.is_empty() {
            continue;
        }
        if tx.send(Ok(event.data)).await.is_err() {
            // The agent is gone: returning drops the response and closes the connection.
            return Ok(());
        }
    }
}

/// The start of an error response's body, as text: the server's own explanation. Whatever
/// goes wrong reading it (or a slow server) just shortens it.
async fn error_body<S, B, E>(body: &mut S, wait: Duration) -> String
where
    S: futures_util::Stream<Item = Result<B, E>> + Unpin,
    B: AsRef<[u8]>,
{
    let mut kept = Vec::new();
    while kept.len() < MAX_ERROR_BODY {
        match tokio::time::timeout(wait, body.next()).await {
            Ok(Some(Ok(piece))) => kept.extend_from_slice(piece.as_ref()),
            _ => break,
        }
    }
    kept.truncate(MAX_ERROR_BODY);
    String::from_utf8_lossy(&kept).trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_bounds_the_response_and_each_line() {
        let mut b = Budget::default();
        let mut one_piece = vec![b'x'; MAX_LINE_BYTES + 1];
        one_piece.extend_from_slice(b"\n\n");
        assert!(matches!(b.take(&one_piece), Err(BodyError::LineTooLong)));

        let mut b = Budget::default();
        let line = vec![b'x'; MAX_LINE_BYTES / 2];
        assert!(b.take(&line).is_ok());
        assert!(b.take(&line).is_ok());
        assert!(matches!(b.take(b"y"), Err(BodyError::LineTooLong)));

        let mut b = Budget::default();
        let mut lines = vec![b'x'; MAX_LINE_BYTES - 2];
        lines.extend_from_slice(b"\n\n");
        let mut result = Ok(());
        for _ in 0..=MAX_RESPONSE_BYTES / lines.len() {
            result = b.take(&lines);
            if result.is_err() {
                break;
            }
        }
        assert!(matches!(result, Err(BodyError::TooLong)));

        let mut b = Budget::default();
        assert!(b.take(b"data: a\r\n").is_ok());
        assert_eq!(b.line, 0);
        assert!(b.take(b"\nda").is_ok());
        assert_eq!(b.line, 2);
    }
}
