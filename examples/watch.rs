//! A command-line client: connects as a user, optionally starts a run, and prints every frame
//! it receives. Handy for trying the server by hand.
//!
//! ```sh
//! cargo run --release &                                  # a dev-mode server
//! cargo run --example watch -- alice echo '"hello world"' # start an echo run and watch it
//! cargo run --example watch -- alice                      # just watch alice's events
//! ```
//! With a server that has a secret, pass `AGENTCAST_TOKEN` (from `agentcast token USER`);
//! `AGENTCAST_URL` overrides `ws://127.0.0.1:8080`.

use std::io::{Read, Write};
use std::net::TcpStream;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

fn dev_token(host: &str, user: &str) -> Result<String, Box<dyn std::error::Error>> {
    let body = serde_json::json!({ "user": user }).to_string();
    let mut tcp = TcpStream::connect(host)?;
    write!(
        tcp,
        "POST /v1/dev/token HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut response = String::new();
    tcp.read_to_string(&mut response)?;
    let json = response.split("\r\n\r\n").nth(1).ok_or("no body")?;
    let v: serde_json::Value = serde_json::from_str(json)?;
    Ok(v["token"]
        .as_str()
        .ok_or("no token: is the server in dev mode? set AGENTCAST_TOKEN")?
        .to_string())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let user = args.next().ok_or("usage: watch USER [AGENT INPUT_JSON]")?;
    let run = match (args.next(), args.next()) {
        (Some(agent), Some(input)) => {
            Some((agent, serde_json::from_str::<serde_json::Value>(&input)?))
        }
        _ => None,
    };
    let base = std::env::var("AGENTCAST_URL").unwrap_or_else(|_| "ws://127.0.0.1:8080".into());
    let token = match std::env::var("AGENTCAST_TOKEN") {
        Ok(t) => t,
        Err(_) => dev_token(base.trim_start_matches("ws://"), &user)?,
    };
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("{base}/v1/ws?token={token}")).await?;
    if let Some((agent, input)) = run {
        let start = serde_json::json!({"type": "start_run", "agent": agent, "input": input, "request_id": "r1"});
        ws.send(Message::text(start.to_string())).await?;
    }
    while let Some(msg) = ws.next().await {
        match msg? {
            Message::Text(t) => println!("{t}"),
            Message::Close(c) => {
                println!("closed: {c:?}");
                break;
            }
            _ => {}
        }
    }
    Ok(())
}
