//! A small Server-Sent Events client for `GET /v1/events` over a plain TcpStream: HTTP/1.1
//! chunked transfer encoding decoded by hand, the body split into blocks.

use std::net::SocketAddr;

use serde_json::{json, Value};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use super::raw::find;
use super::{bearer, get_response_head, HttpResponse, TIMEOUT};

/// One SSE block (the text between blank lines).
#[derive(Debug, Clone)]
pub struct Block {
    /// The block's lines, as sent.
    pub lines: Vec<String>,
}

impl Block {
    /// Only comment lines (`: …`), as the heartbeats are.
    pub fn is_comment(&self) -> bool {
        self.lines.iter().all(|l| l.starts_with(':'))
    }

    /// The value of the first `name:` line (one leading space dropped).
    pub fn field(&self, name: &str) -> Option<&str> {
        let prefix = format!("{name}:");
        self.lines
            .iter()
            .find_map(|l| l.strip_prefix(&prefix))
            .map(|v| v.strip_prefix(' ').unwrap_or(v))
    }

    /// The `data:` line as JSON; panics when there is none or it is not JSON.
    pub fn data(&self) -> Value {
        let data = self
            .field("data")
            .unwrap_or_else(|| panic!("SSE block without data: {self:?}"));
        serde_json::from_str(data)
            .unwrap_or_else(|e| panic!("SSE data is not JSON ({e}): {data:?}"))
    }
}

/// An open event stream.
pub struct Sse {
    stream: TcpStream,
    /// The response head (status 200, chunked).
    pub head: HttpResponse,
    /// Bytes of the body not yet de-chunked.
    raw: Vec<u8>,
    /// De-chunked body text not yet split into blocks.
    text: String,
    /// The terminating chunk (or EOF) was seen.
    ended: bool,
}

impl Sse {
    /// `GET path` with these headers; panics unless the answer is a 200 with a chunked body.
    pub async fn open(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Sse {
        let mut all = vec![("Accept", "text/event-stream")];
        all.extend_from_slice(headers);
        let fut = get_response_head(addr, path, &all);
        let (stream, head, raw) = match tokio::time::timeout(TIMEOUT, fut).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => panic!("GET {path}: {e}"),
            Err(_) => panic!("GET {path}: no response head within {TIMEOUT:?}"),
        };
        assert_eq!(
            head.status,
            200,
            "GET {path}: status {} (headers {:?}, start of body {:?})",
            head.status,
            head.headers,
            String::from_utf8_lossy(&raw)
        );
        assert!(
            head.header("transfer-encoding")
                .is_some_and(|v| v.eq_ignore_ascii_case("chunked")),
            "GET {path}: an event stream must be chunked, headers {:?}",
            head.headers
        );
        Sse {
            stream,
            head,
            raw,
            text: String::new(),
            ended: false,
        }
    }

    /// De-chunks what has arrived.
    pub fn decode(&mut self) {
        while !self.ended {
            let Some(line_end) = find(&self.raw, b"\r\n") else {
                return;
            };
            let size_text = String::from_utf8_lossy(&self.raw[..line_end]).into_owned();
            let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16)
                .unwrap_or_else(|_| panic!("bad chunk size line {size_text:?}"));
            if size == 0 {
                self.ended = true;
                return;
            }
            if self.raw.len() < line_end + 2 + size + 2 {
                return;
            }
            let data = &self.raw[line_end + 2..line_end + 2 + size];
            self.text
                .push_str(std::str::from_utf8(data).expect("SSE is UTF-8"));
            assert_eq!(
                &self.raw[line_end + 2 + size..line_end + 4 + size],
                b"\r\n",
                "chunk not followed by CRLF"
            );
            self.raw.drain(..line_end + 4 + size);
        }
    }

    /// The next block, or None when the stream ended. Panics after TIMEOUT.
    pub async fn next_block(&mut self) -> Option<Block> {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            self.decode();
            if let Some(i) = self.text.find("\n\n") {
                let block: String = self.text.drain(..i + 2).collect();
                let lines = block
                    .trim_end_matches('\n')
                    .split('\n')
                    .map(str::to_string)
                    .collect();
                return Some(Block { lines });
            }
            if self.ended {
                assert!(
                    self.text.is_empty(),
                    "the stream ended inside a block: {:?}",
                    self.text
                );
                return None;
            }
            let mut chunk = [0u8; 8192];
            let n = match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Ok(Ok(n)) => n,
                Ok(Err(e)) => panic!(
                    "reading the event stream failed: {e}; pending text {:?}",
                    self.text
                ),
                Err(_) => panic!(
                    "no complete SSE block within {TIMEOUT:?}; pending text {:?}",
                    self.text
                ),
            };
            if n == 0 {
                self.ended = true;
                assert!(
                    self.raw.is_empty(),
                    "the connection ended inside a chunk: {:?}",
                    self.raw
                );
                continue;
            }
            self.raw.extend_from_slice(&chunk[..n]);
        }
    }

    /// The next block that is not a comment. Panics if the stream ends.
    pub async fn next_event(&mut self) -> Block {
        loop {
            match self.next_block().await {
                Some(b) if b.is_comment() => continue,
                Some(b) => return b,
                None => panic!("the event stream ended"),
            }
        }
    }

    /// The welcome block, checked.
    pub async fn welcome(&mut self, user: &str) -> Value {
        let b = self.next_event().await;
        assert_eq!(
            b.lines.len(),
            2,
            "welcome block must be `event:` and `data:` lines: {b:?}"
        );
        assert_eq!(
            b.lines[0], "event: welcome",
            "first event is not welcome: {b:?}"
        );
        assert!(b.lines[1].starts_with("data: "), "{b:?}");
        let w = b.data();
        assert_eq!(w["type"], json!("welcome"), "{w}");
        assert_eq!(w["user_id"], json!(user), "{w}");
        assert_eq!(w["protocol"], json!(1), "{w}");
        assert!(
            w["session_id"]
                .as_str()
                .is_some_and(|s| s.starts_with("ses_")),
            "{w}"
        );
        assert!(w["epoch"].as_str().is_some_and(|s| !s.is_empty()), "{w}");
        assert!(w["last_seq"].is_u64(), "{w}");
        w
    }
}

/// Opens `/v1/events` as `user` (Bearer token), with these headers too.
pub async fn open_bearer(
    server: &agentcast::RunningServer,
    user: &str,
    extra: &[(&str, &str)],
) -> Sse {
    let auth = bearer(server, user);
    let mut headers = vec![("Authorization", auth.as_str())];
    headers.extend_from_slice(extra);
    Sse::open(server.addr(), "/v1/events", &headers).await
}

/// Opens `/v1/events` as `user` (Bearer token) and reads its welcome block (checked).
pub async fn open_sse(server: &agentcast::RunningServer, user: &str) -> Sse {
    let mut sse = open_bearer(server, user, &[]).await;
    sse.welcome(user).await;
    sse
}

/// Asserts the block is exactly `id: <seq>`, `event: <type>`, `data: <json>` for this event.
pub fn assert_event_block(b: &Block, expected: &Value) {
    let seq = expected["seq"].as_u64().unwrap();
    let ty = expected["type"].as_str().unwrap();
    assert_eq!(
        b.lines.len(),
        3,
        "an event block is id, event, data lines: {b:?}"
    );
    assert_eq!(
        b.lines[0],
        format!("id: {seq}"),
        "id line of {expected}: {b:?}"
    );
    assert_eq!(
        b.lines[1],
        format!("event: {ty}"),
        "event line of {expected}: {b:?}"
    );
    assert!(b.lines[2].starts_with("data: "), "data line: {b:?}");
    assert_eq!(
        &b.data(),
        expected,
        "SSE data differs from the WebSocket frame"
    );
}
