//! A fake OpenAI-compatible Chat Completions server: a real HTTP/1.1 server on 127.0.0.1 that
//! answers the n-th request with the n-th scripted [`Reply`], streamed as Server-Sent Events
//! the way OpenAI, vLLM, llama.cpp and Ollama send them, and records every request it got.
//! It is a peer of the `llm` agent over a socket, written by hand on tokio so that each byte
//! and each close is the test's to decide.

use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::common::TIMEOUT;

/// How the fake answers one request.
#[derive(Clone, Debug)]
pub enum Reply {
    /// 200 `text/event-stream`: each payload as its own `data:` event and write, then the
    /// end of the body.
    Stream(Vec<String>),
    /// The same, then nothing: the connection stays open until the client closes it.
    StreamThenHang(Vec<String>),
    /// An HTTP error with this body.
    Status(u16, String),
}

/// One request as the fake read it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub authorization: Option<String>,
    pub body: Value,
}

pub struct FakeModel {
    /// What `--llm-base-url` is set to.
    pub base_url: String,
    requests: Arc<Mutex<Vec<Recorded>>>,
    /// The number (from 0) of each hanging request whose connection the client closed.
    closed: mpsc::UnboundedReceiver<usize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeModel {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeModel {
    pub async fn start(replies: Vec<Reply>) -> FakeModel {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the fake model");
        let addr = listener.local_addr().expect("its address");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (closed_tx, closed) = mpsc::unbounded_channel();
        let recorded = requests.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    return;
                };
                let recorded = recorded.clone();
                let replies = replies.clone();
                let closed_tx = closed_tx.clone();
                tokio::spawn(async move {
                    serve(socket, recorded, replies, closed_tx).await;
                });
            }
        });
        FakeModel {
            base_url: format!("http://{addr}/v1"),
            requests,
            closed,
            task,
        }
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().expect("requests lock").clone()
    }

    /// Waits (bounded) until the client closes the connection of a hanging reply; returns
    /// which request it was.
    pub async fn wait_closed(&mut self) -> usize {
        match tokio::time::timeout(TIMEOUT, self.closed.recv()).await {
            Ok(Some(n)) => n,
            _ => panic!("the client did not close the model connection within {TIMEOUT:?}"),
        }
    }
}

async fn serve(
    mut socket: TcpStream,
    recorded: Arc<Mutex<Vec<Recorded>>>,
    replies: Vec<Reply>,
    closed: mpsc::UnboundedSender<usize>,
) {
    let Some(request) = read_request(&mut socket).await else {
        return;
    };
    let n = {
        let mut all = recorded.lock().expect("requests lock");
        all.push(request);
        all.len() - 1
    };
    let reply = replies
        .get(n)
        .cloned()
        .unwrap_or_else(|| Reply::Status(500, format!("the fake has no reply for request {n}")));
    let (payloads, hang) = match reply {
        Reply::Status(status, body) => {
            let head = format!(
                "HTTP/1.1 {status} Error\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = socket.write_all(head.as_bytes()).await;
            return;
        }
        Reply::Stream(p) => (p, false),
        Reply::StreamThenHang(p) => (p, true),
    };
    let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n";
    if socket.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    for payload in payloads {
        let event = format!("data: {payload}\n\n");
        let chunk = format!("{:x}\r\n{event}\r\n", event.len());
        if socket.write_all(chunk.as_bytes()).await.is_err() {
            return;
        }
    }
    if hang {
        // The client sends nothing more: a read ends only when it closes the connection.
        let mut buf = [0u8; 1024];
        loop {
            match socket.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        let _ = closed.send(n);
        return;
    }
    let _ = socket.write_all(b"0\r\n\r\n").await;
    let _ = socket.shutdown().await;
}

/// Reads one request (head, then a `content-length` body).
async fn read_request(socket: &mut TcpStream) -> Option<Recorded> {
    let mut data = Vec::new();
    let mut buf = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = socket.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        data.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&data[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let method = first.next()?.to_string();
    let path = first.next()?.to_string();
    let mut length = 0;
    let mut authorization = None;
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            match name.trim().to_ascii_lowercase().as_str() {
                "content-length" => length = value.trim().parse().ok()?,
                "authorization" => authorization = Some(value.trim().to_string()),
                _ => {}
            }
        }
    }
    while data.len() < head_end + length {
        let n = socket.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        data.extend_from_slice(&buf[..n]);
    }
    let body = serde_json::from_slice(&data[head_end..head_end + length]).unwrap_or(Value::Null);
    Some(Recorded {
        method,
        path,
        authorization,
        body,
    })
}

// ---------------------------------------------------------------------------------------------
// Chunk shapes, as the servers send them.

fn chunk(delta: Value, finish_reason: Value) -> String {
    json!({
        "id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1_767_000_000,
        "model": "fake-model",
        "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason}],
        "usage": null,
    })
    .to_string()
}

/// The first delta: the role, and `content` null (OpenAI) or "" (others).
pub fn role(content: Value) -> String {
    chunk(
        json!({"role": "assistant", "content": content}),
        Value::Null,
    )
}

pub fn text(t: &str) -> String {
    chunk(json!({"content": t}), Value::Null)
}

/// DeepSeek's and llama.cpp's field.
pub fn reasoning_content(t: &str) -> String {
    chunk(
        json!({"content": null, "reasoning_content": t}),
        Value::Null,
    )
}

/// vLLM's, Ollama's and OpenRouter's field.
pub fn reasoning(t: &str) -> String {
    chunk(json!({"reasoning": t}), Value::Null)
}

/// The first fragment of a call.
pub fn call_start(index: u64, id: &str, name: &str) -> String {
    chunk(
        json!({"tool_calls": [{"index": index, "id": id, "type": "function",
            "function": {"name": name, "arguments": ""}}]}),
        Value::Null,
    )
}

/// A later fragment: only the index and a piece of the arguments.
pub fn call_args(index: u64, piece: &str) -> String {
    chunk(
        json!({"tool_calls": [{"index": index, "function": {"arguments": piece}}]}),
        Value::Null,
    )
}

pub fn finish(reason: &str) -> String {
    chunk(json!({}), json!(reason))
}

/// The usage chunk of `stream_options.include_usage`: no choices.
pub fn usage(prompt: u64, completion: u64) -> String {
    json!({
        "id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1_767_000_000,
        "model": "fake-model", "choices": [],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion},
    })
    .to_string()
}

pub const DONE: &str = "[DONE]";

/// A whole call: `parts`, then `finish_reason`, the usage chunk and `[DONE]`.
pub fn answer(parts: Vec<String>, reason: &str, (prompt, completion): (u64, u64)) -> Reply {
    let mut all = vec![role(Value::Null)];
    all.extend(parts);
    all.push(finish(reason));
    all.push(usage(prompt, completion));
    all.push(DONE.to_string());
    Reply::Stream(all)
}
