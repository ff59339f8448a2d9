//! Bytes on the wire, for the tests that need them: hand-made requests (oversized, malformed,
//! WebSocket upgrades written by hand) and response heads read off a plain `TcpStream`, so the
//! test can go on using the socket after the head.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{HttpResponse, TIMEOUT};

/// A response head as read off the wire.
pub struct ResponseHead {
    /// The status line, as sent.
    pub status_line: String,
    /// The status code of the status line; None when it has none.
    pub status: Option<u16>,
    /// The header lines (names lower-cased, names and values trimmed).
    pub headers: Vec<(String, String)>,
    /// Bytes that arrived after the blank line ending the head.
    pub rest: Vec<u8>,
}

impl ResponseHead {
    /// The head as an HttpResponse with an empty body (status 0 when the status line had none),
    /// and the bytes that came after it.
    pub fn without_body(self) -> (HttpResponse, Vec<u8>) {
        let head = HttpResponse {
            status: self.status.unwrap_or(0),
            headers: self.headers,
            body: String::new(),
        };
        (head, self.rest)
    }
}

/// Reads an HTTP response head (up to the blank line). Err when the connection ends first.
pub async fn read_response_head(stream: &mut TcpStream) -> std::io::Result<ResponseHead> {
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i;
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "connection ended inside the response head: {:?}",
                    String::from_utf8_lossy(&buf)
                ),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let rest = buf[head_end + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("").to_string();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok());
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(ResponseHead {
        status_line,
        status,
        headers,
        rest,
    })
}

/// Reads one HTTP response: the head, then a body framed by Content-Length, or by the end of
/// the connection when there is none. (The answers read this way, to hand-made requests, are
/// errors with a Content-Length; a chunked one is refused rather than misread.)
pub async fn read_http_response(stream: &mut TcpStream) -> std::io::Result<HttpResponse> {
    let head = read_response_head(stream).await?;
    let invalid = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    let status = head
        .status
        .ok_or_else(|| invalid(format!("bad status line {:?}", head.status_line)))?;
    let (response, mut body) = head.without_body();
    if response.header("transfer-encoding").is_some() {
        return Err(invalid(format!(
            "a chunked answer, which this reader does not decode: {:?}",
            response.headers
        )));
    }
    match response.header("content-length") {
        _ if status == 101 || status == 204 || status == 304 => body.clear(),
        Some(len) => {
            let len: usize = len
                .parse()
                .map_err(|_| invalid(format!("bad Content-Length {len:?}")))?;
            while body.len() < len {
                let mut chunk = [0u8; 4096];
                let n = stream.read(&mut chunk).await?;
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..n]);
            }
            body.truncate(len);
        }
        None => {
            stream.read_to_end(&mut body).await?;
        }
    }
    Ok(HttpResponse {
        body: String::from_utf8_lossy(&body).into_owned(),
        ..response
    })
}

pub(super) fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The fixed key of the hand-made WebSocket handshakes below.
pub const RAW_WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// The headers that make a GET a WebSocket upgrade request (with the fixed key).
pub const WS_UPGRADE_HEADERS: [(&str, &str); 4] = [
    ("Upgrade", "websocket"),
    ("Connection", "Upgrade"),
    ("Sec-WebSocket-Key", RAW_WS_KEY),
    ("Sec-WebSocket-Version", "13"),
];

/// `GET path_and_query HTTP/1.1` with a Host header, then `headers` in order, and no body.
pub fn get_request(addr: SocketAddr, path_and_query: &str, headers: &[(&str, &str)]) -> String {
    let mut req = format!("GET {path_and_query} HTTP/1.1\r\nHost: {addr}\r\n");
    for (n, v) in headers {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req
}

/// Sends [`get_request`] over a new TcpStream and reads the response head. Returns the stream
/// (positioned after the head), the head (as an HttpResponse with an empty body) and any bytes
/// that came with it.
pub async fn get_response_head(
    addr: SocketAddr,
    path_and_query: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<(TcpStream, HttpResponse, Vec<u8>)> {
    let mut stream = TcpStream::connect(addr).await?;
    stream
        .write_all(get_request(addr, path_and_query, headers).as_bytes())
        .await?;
    let (head, after) = read_response_head(&mut stream).await?.without_body();
    Ok((stream, head, after))
}

/// Sends a WebSocket upgrade request for `path_and_query` by hand over a plain TcpStream and
/// returns the stream and the response head. The stream is positioned after the response head when
/// the status is 101; any bytes that came with the head are returned too.
pub async fn raw_ws_upgrade(
    addr: SocketAddr,
    path_and_query: &str,
    extra_headers: &[(&str, &str)],
) -> (TcpStream, HttpResponse, Vec<u8>) {
    let mut headers = WS_UPGRADE_HEADERS.to_vec();
    headers.extend_from_slice(extra_headers);
    match tokio::time::timeout(TIMEOUT, get_response_head(addr, path_and_query, &headers)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => panic!("raw WebSocket upgrade failed: {e}"),
        Err(_) => panic!("raw WebSocket upgrade timed out"),
    }
}

/// Sends `bytes` on a new connection and reads the whole answer, if any (None when the
/// connection failed or ended first). The server may answer and close before it has read
/// everything, so a failed write is fine. Panics after TIMEOUT.
pub async fn raw_request(addr: SocketAddr, bytes: &[u8]) -> Option<HttpResponse> {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let _ = stream.write_all(bytes).await;
    match tokio::time::timeout(TIMEOUT, read_http_response(&mut stream)).await {
        Ok(r) => r.ok(),
        Err(_) => panic!("no answer within {TIMEOUT:?}"),
    }
}

/// [`get_request`] sent by hand (e.g. a WebSocket upgrade, which an HTTP client would not send
/// as such) and its whole answer read. Panics when there is none.
pub async fn raw_get(
    addr: SocketAddr,
    path_and_query: &str,
    headers: &[(&str, &str)],
) -> HttpResponse {
    let req = get_request(addr, path_and_query, headers);
    raw_request(addr, req.as_bytes())
        .await
        .unwrap_or_else(|| panic!("GET {path_and_query}: no answer"))
}
