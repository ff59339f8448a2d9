//! `agentcast watch`: the command-line client. It connects to a server's WebSocket as a user,
//! optionally starts a run, and prints every frame it receives on standard output as it
//! arrives, one JSON per line (`welcome`, `ack`, every run event of the user, `heartbeat`…),
//! so that it pipes into `jq`. Messages about the watch itself go to standard error.
//!
//! ```sh
//! agentcast watch alice echo '"hello world"'   # start an echo run, print its frames, exit 0
//! agentcast watch alice --follow               # print alice's frames until Ctrl-C
//! ```
//!
//! With AGENT and INPUT it exits when the run it started completes, with the run's status as
//! its exit code (see [`RunStatus::exit_code`]; other endings in [`exit_code`]); with
//! `--follow`, or without AGENT, it keeps printing until Ctrl-C. Its token is `--token` /
//! `AGENTCAST_TOKEN`, else one from `POST /v1/dev/token` (dev mode). HTTP and WebSocket go
//! through `awc`, actix's client, on the same runtime as the server.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, Write};
use std::process::ExitCode;
use std::time::Duration;

use awc::ws;
use clap::Args;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};

/// Exit code: the command line is unusable (a bad INPUT or URL). Not clap's 2, which is a
/// run's `cancelled` here.
pub const EXIT_USAGE: u8 = 64;
/// Exit code: the server refused to start the run (its `error` frame is printed).
pub const EXIT_REFUSED: u8 = 4;
/// Exit code: the server could not be reached or refused the connection, or the connection
/// ended before the run completed.
pub const EXIT_CONNECTION: u8 = 5;
/// Exit code: stopped by Ctrl-C (128 + SIGINT, as a shell reports it).
pub const EXIT_INTERRUPTED: u8 = 130;
/// Exit code: standard output was closed (e.g. `| head -3`; 128 + SIGPIPE).
pub const EXIT_OUTPUT_CLOSED: u8 = 141;

/// The `request_id` of the `start_run` this client sends.
const REQUEST_ID: &str = "watch";
/// Largest frame accepted from the server (awc's default is 64 KiB; an event that echoes a
/// large input is bigger).
const MAX_FRAME_BYTES: usize = 64 << 20;
/// Bound on the token request and on the WebSocket handshake.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Args, Debug, Clone)]
pub struct WatchArgs {
    /// The user to watch and to start the run as (with --token, the token's user is the one
    /// watched).
    pub user: String,
    /// An agent to start a run of (`echo`, `scripted`, …: `GET /v1/agents`); needs INPUT.
    #[arg(requires = "input")]
    pub agent: Option<String>,
    /// The run's input, as JSON: a string is '"hi"', an object '{"steps":[…]}'.
    pub input: Option<String>,
    /// Keep printing after the run completes (without AGENT this is always so), until Ctrl-C.
    #[arg(long)]
    pub follow: bool,
    /// The server: ws://HOST:PORT (or http://HOST:PORT).
    #[arg(long, env = "AGENTCAST_URL", default_value = "ws://127.0.0.1:8080")]
    pub url: String,
    /// A token for the user (`agentcast token USER` signs one with the server's secret).
    /// Without it, one from `POST /v1/dev/token`, which only a dev-mode server has.
    #[arg(long, env = "AGENTCAST_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// The final status of a run, from its `agent_completed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStatus {
    Succeeded,
    Failed,
    Cancelled,
    TimedOut,
}

impl RunStatus {
    pub fn parse(status: &str) -> Option<RunStatus> {
        match status {
            "succeeded" => Some(RunStatus::Succeeded),
            "failed" => Some(RunStatus::Failed),
            "cancelled" => Some(RunStatus::Cancelled),
            "timed_out" => Some(RunStatus::TimedOut),
            _ => None,
        }
    }

    /// `succeeded` 0, `failed` 1, `cancelled` 2, `timed_out` 3.
    pub fn exit_code(self) -> u8 {
        match self {
            RunStatus::Succeeded => 0,
            RunStatus::Failed => 1,
            RunStatus::Cancelled => 2,
            RunStatus::TimedOut => 3,
        }
    }
}

/// How a watch that went as asked ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The run this client started completed with this status.
    Completed(RunStatus),
    /// Ctrl-C.
    Interrupted,
}

/// Why a watch ended otherwise; each kind has its own exit code ([`exit_code`]).
#[derive(Debug)]
pub enum WatchError {
    /// The command line is unusable.
    Usage(String),
    /// The server could not be reached, refused the token, or is not in dev mode and no token
    /// was given.
    Connect(String),
    /// The server answered the `start_run` with an `error` frame.
    Refused { code: String, message: String },
    /// The connection ended, or the server broke the protocol, before the run completed.
    Lost(String),
    /// Standard output could not be written (closed by its reader).
    Output(io::Error),
}

impl fmt::Display for WatchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WatchError::Usage(m) | WatchError::Connect(m) | WatchError::Lost(m) => f.write_str(m),
            WatchError::Refused { code, message } => {
                write!(f, "the server refused the run: {code}: {message}")
            }
            WatchError::Output(e) => write!(f, "cannot write to standard output: {e}"),
        }
    }
}

impl std::error::Error for WatchError {}

/// The exit code for how a watch ended: the run's status ([`RunStatus::exit_code`]), or
/// [`EXIT_INTERRUPTED`], [`EXIT_USAGE`], [`EXIT_REFUSED`], [`EXIT_CONNECTION`],
/// [`EXIT_OUTPUT_CLOSED`].
pub fn exit_code(result: &Result<Ending, WatchError>) -> u8 {
    match result {
        Ok(Ending::Completed(status)) => status.exit_code(),
        Ok(Ending::Interrupted) => EXIT_INTERRUPTED,
        Err(WatchError::Usage(_)) => EXIT_USAGE,
        Err(WatchError::Refused { .. }) => EXIT_REFUSED,
        Err(WatchError::Connect(_) | WatchError::Lost(_)) => EXIT_CONNECTION,
        Err(WatchError::Output(_)) => EXIT_OUTPUT_CLOSED,
    }
}

/// `agentcast watch`: runs the watch on an actix runtime of its own and reports how it ended.
pub fn main(args: WatchArgs) -> ExitCode {
    let result = actix_web::rt::System::new().block_on(async {
        let stdout = io::stdout();
        let mut out = stdout.lock();
        watch(&args, &mut out).await
    });
    match &result {
        Err(WatchError::Output(e)) if e.kind() == io::ErrorKind::BrokenPipe => {}
        Err(e) => eprintln!("agentcast watch: {e}"),
        Ok(_) => {}
    }
    ExitCode::from(exit_code(&result))
}

/// The server's addresses, from `--url`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Server {
    /// `http://HOST:PORT[/PREFIX]`.
    http: String,
    /// `ws://HOST:PORT[/PREFIX]`.
    ws: String,
}

impl Server {
    fn parse(url: &str) -> Result<Server, WatchError> {
        let url = url.trim().trim_end_matches('/');
        let rest = if let Some(rest) = url.strip_prefix("ws://") {
            rest
        } else if let Some(rest) = url.strip_prefix("http://") {
            rest
        } else if url.starts_with("wss://") || url.starts_with("https://") {
            return Err(WatchError::Usage(format!(
                "--url {url}: this client has no TLS; connect to the server's own ws:// address"
            )));
        } else {
            return Err(WatchError::Usage(format!(
                "--url {url}: expected ws://HOST:PORT (e.g. ws://127.0.0.1:8080)"
            )));
        };
        // The WebSocket's own URL names the same server.
        let rest = rest.strip_suffix("/v1/ws").unwrap_or(rest);
        if rest.is_empty() || rest.starts_with('/') {
            return Err(WatchError::Usage(format!("--url {url}: no host")));
        }
        Ok(Server {
            http: format!("http://{rest}"),
            ws: format!("ws://{rest}"),
        })
    }
}

/// Connects, starts the run if asked, and prints every frame to `out` until the run completes
/// (or, when following, until Ctrl-C).
pub async fn watch(args: &WatchArgs, out: &mut impl Write) -> Result<Ending, WatchError> {
    let server = Server::parse(&args.url)?;
    let start = match (&args.agent, &args.input) {
        (Some(agent), Some(input)) => {
            let input: Value = serde_json::from_str(input).map_err(|e| {
                WatchError::Usage(format!(
                    "INPUT is not JSON ({e}): a string is written '\"hi\"' (quotes inside the \
                     shell's quotes)"
                ))
            })?;
            Some(json!({
                "type": "start_run",
                "agent": agent,
                "input": input,
                "request_id": REQUEST_ID,
            }))
        }
        _ => None,
    };
    if let Err(e) = agentcast::auth::check_user_id(&args.user) {
        return Err(WatchError::Usage(format!("USER: {e}")));
    }

    let client = awc::Client::builder().timeout(HTTP_TIMEOUT).finish();
    let token = match &args.token {
        Some(token) => token.clone(),
        None => dev_token(&client, &server, &args.user).await?,
    };
    let (_, mut socket) = client
        .ws(format!("{}/v1/ws", server.ws))
        .bearer_auth(&token)
        .max_frame_size(MAX_FRAME_BYTES)
        .connect()
        .await
        .map_err(|e| refused_connection(&server, e))?;

    let mut state = Watcher::new(&args.user, start, args.follow || args.agent.is_none());
    let interrupted = actix_web::rt::signal::ctrl_c();
    tokio::pin!(interrupted);
    loop {
        let frame = tokio::select! {
            frame = socket.next() => frame,
            _ = &mut interrupted => {
                let _ = socket.send(ws::Message::Close(Some(ws::CloseCode::Normal.into()))).await;
                return Ok(Ending::Interrupted);
            }
        };
        let text = match frame {
            Some(Ok(ws::Frame::Text(bytes))) => bytes,
            Some(Ok(ws::Frame::Ping(payload))) => {
                send(&mut socket, ws::Message::Pong(payload)).await?;
                continue;
            }
            Some(Ok(ws::Frame::Pong(_))) => continue,
            Some(Ok(ws::Frame::Close(reason))) => {
                let why = match reason {
                    Some(r) => format!(
                        "{}{}",
                        u16::from(r.code),
                        r.description.map(|d| format!(" {d}")).unwrap_or_default()
                    ),
                    None => "no code".into(),
                };
                return Err(WatchError::Lost(format!(
                    "the server closed the connection ({why}){}",
                    state.unfinished()
                )));
            }
            Some(Ok(ws::Frame::Binary(_) | ws::Frame::Continuation(_))) => {
                return Err(WatchError::Lost(
                    "the server sent a binary or fragmented message: not an agentcast server?"
                        .into(),
                ))
            }
            Some(Err(e)) => {
                return Err(WatchError::Lost(format!(
                    "the connection failed: {e}{}",
                    state.unfinished()
                )))
            }
            None => {
                return Err(WatchError::Lost(format!(
                    "the connection ended{}",
                    state.unfinished()
                )))
            }
        };
        let text = std::str::from_utf8(&text).map_err(|_| {
            WatchError::Lost("the server sent a text frame that is not UTF-8".into())
        })?;
        writeln!(out, "{text}").map_err(WatchError::Output)?;
        let frame: Value = serde_json::from_str(text).map_err(|e| {
            WatchError::Lost(format!("the server sent a frame that is not JSON: {e}"))
        })?;
        match state.on_frame(&frame)? {
            Step::Continue => {}
            Step::Send(frame) => {
                send(&mut socket, ws::Message::Text(frame.to_string().into())).await?;
            }
            Step::Completed(status) => {
                out.flush().map_err(WatchError::Output)?;
                let _ = socket
                    .send(ws::Message::Close(Some(ws::CloseCode::Normal.into())))
                    .await;
                return Ok(Ending::Completed(status));
            }
        }
    }
}

async fn send<S>(socket: &mut S, message: ws::Message) -> Result<(), WatchError>
where
    S: futures_util::Sink<ws::Message> + Unpin,
    S::Error: fmt::Display,
{
    socket
        .send(message)
        .await
        .map_err(|e| WatchError::Lost(format!("cannot send to the server: {e}")))
}

/// A token for `user` from a dev-mode server's `POST /v1/dev/token`.
async fn dev_token(
    client: &awc::Client,
    server: &Server,
    user: &str,
) -> Result<String, WatchError> {
    let url = format!("{}/v1/dev/token", server.http);
    let mut res = client
        .post(&url)
        .send_json(&json!({ "user": user }))
        .await
        .map_err(|e| {
            WatchError::Connect(format!(
                "cannot reach {}: {e} (is the server running? `cargo run --release`)",
                server.http
            ))
        })?;
    let status = res.status();
    let body: Value = res.json().await.unwrap_or(Value::Null);
    if status.as_u16() == 404 {
        return Err(WatchError::Connect(format!(
            "{} is not in dev mode (no POST /v1/dev/token): pass a token with --token or \
             AGENTCAST_TOKEN (`agentcast token {user}` signs one with the server's secret)",
            server.http
        )));
    }
    match body.get("token").and_then(Value::as_str) {
        Some(token) if status.is_success() => Ok(token.to_string()),
        _ => Err(WatchError::Connect(format!(
            "POST {url} answered {status}: {}",
            body.get("message")
                .and_then(Value::as_str)
                .unwrap_or("no token")
        ))),
    }
}

fn refused_connection(server: &Server, e: awc::error::WsClientError) -> WatchError {
    use awc::error::{SendRequestError, WsClientError};
    match e {
        WsClientError::InvalidResponseStatus(status) if status.as_u16() == 401 => {
            WatchError::Connect(format!(
                "{} refused the token (401): expired, or signed with another secret?",
                server.ws
            ))
        }
        WsClientError::InvalidResponseStatus(status) => WatchError::Connect(format!(
            "{}/v1/ws answered {status} instead of a WebSocket upgrade",
            server.ws
        )),
        WsClientError::SendRequest(SendRequestError::Connect(e)) => WatchError::Connect(format!(
            "cannot reach {}: {e} (is the server running? `cargo run --release`)",
            server.ws
        )),
        e => WatchError::Connect(format!("cannot connect to {}/v1/ws: {e}", server.ws)),
    }
}

/// What to do after a frame.
#[derive(Debug, PartialEq)]
enum Step {
    Continue,
    /// Send this frame.
    Send(Value),
    /// The run this client started completed (and it is not following).
    Completed(RunStatus),
}

/// What the watch knows from the frames so far: no I/O, so that it is tested alone.
struct Watcher {
    user: String,
    /// The `start_run` to send once the `welcome` has come.
    start: Option<Value>,
    /// Whether a `start_run` was sent and its `ack` (or `error`) has not come yet.
    awaiting_ack: bool,
    /// The run this client started, once acknowledged.
    run_id: Option<String>,
    /// Runs that completed while the `ack` was awaited: one of them may be ours.
    completed_before_ack: HashMap<String, RunStatus>,
    /// Whether to go on after the run completes.
    follow: bool,
}

impl Watcher {
    fn new(user: &str, start: Option<Value>, follow: bool) -> Watcher {
        Watcher {
            user: user.to_string(),
            start,
            awaiting_ack: false,
            run_id: None,
            completed_before_ack: HashMap::new(),
            follow,
        }
    }

    /// Said when the connection ends early: what is lost.
    fn unfinished(&self) -> String {
        match &self.run_id {
            Some(run_id) => format!(" before {run_id} completed"),
            None if self.awaiting_ack => " before the run was acknowledged".into(),
            None => String::new(),
        }
    }

    fn on_frame(&mut self, frame: &Value) -> Result<Step, WatchError> {
        let str_field = |name: &str| frame.get(name).and_then(Value::as_str);
        match str_field("type") {
            Some("welcome") => {
                if let Some(user) = str_field("user_id").filter(|u| *u != self.user) {
                    eprintln!(
                        "agentcast watch: the token is for user {user:?}, not {:?}: watching {user:?}",
                        self.user
                    );
                }
                match self.start.take() {
                    Some(start) => {
                        self.awaiting_ack = true;
                        Ok(Step::Send(start))
                    }
                    None => Ok(Step::Continue),
                }
            }
            Some("ack") if self.awaiting_ack && str_field("request_id") == Some(REQUEST_ID) => {
                self.awaiting_ack = false;
                let Some(run_id) = str_field("run_id") else {
                    return Err(WatchError::Lost(
                        "the ack of start_run has no run_id".into(),
                    ));
                };
                self.run_id = Some(run_id.to_string());
                let done = self.completed_before_ack.remove(run_id);
                self.completed_before_ack.clear();
                Ok(self.completed(done))
            }
            Some("error") if self.awaiting_ack && str_field("request_id") == Some(REQUEST_ID) => {
                Err(WatchError::Refused {
                    code: str_field("code").unwrap_or("?").to_string(),
                    message: str_field("message").unwrap_or("").to_string(),
                })
            }
            Some("agent_completed") => {
                let Some(run_id) = str_field("run_id") else {
                    return Ok(Step::Continue);
                };
                let ours = self.run_id.as_deref() == Some(run_id);
                if !ours && !self.awaiting_ack {
                    return Ok(Step::Continue);
                }
                let status = frame
                    .pointer("/data/status")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                let Some(status) = RunStatus::parse(status) else {
                    return Err(WatchError::Lost(format!(
                        "agent_completed of {run_id} has an unknown status {status:?}"
                    )));
                };
                if ours {
                    Ok(self.completed(Some(status)))
                } else {
                    self.completed_before_ack.insert(run_id.to_string(), status);
                    Ok(Step::Continue)
                }
            }
            _ => Ok(Step::Continue),
        }
    }

    fn completed(&self, status: Option<RunStatus>) -> Step {
        match status {
            Some(status) if !self.follow => Step::Completed(status),
            _ => Step::Continue,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start() -> Value {
        json!({"type":"start_run","agent":"echo","input":"hi","request_id":REQUEST_ID})
    }

    fn welcome() -> Value {
        json!({"type":"welcome","user_id":"alice","session_id":"ses_1","epoch":"e","last_seq":0,"protocol":1})
    }

    fn completed(run_id: &str, status: &str) -> Value {
        json!({"type":"agent_completed","seq":3,"run_id":run_id,"thread_id":null,"ts":"t",
               "data":{"status":status,"result":null,"error":null,"duration_ms":1,"usage":{"tool_calls":0}}})
    }

    #[test]
    fn status_exit_codes_are_the_documented_ones() {
        let codes: Vec<_> = ["succeeded", "failed", "cancelled", "timed_out"]
            .iter()
            .map(|s| RunStatus::parse(s).map(RunStatus::exit_code))
            .collect();
        assert_eq!(codes, [Some(0), Some(1), Some(2), Some(3)]);
        assert_eq!(RunStatus::parse("running"), None);
        assert_eq!(exit_code(&Ok(Ending::Interrupted)), 130);
        assert_eq!(exit_code(&Err(WatchError::Usage(String::new()))), 64);
        let refused = WatchError::Refused {
            code: "unknown_agent".into(),
            message: String::new(),
        };
        assert_eq!(exit_code(&Err(refused)), 4);
        assert_eq!(exit_code(&Err(WatchError::Lost(String::new()))), 5);
    }

    #[test]
    fn urls() {
        let local = Server {
            http: "http://127.0.0.1:8080".into(),
            ws: "ws://127.0.0.1:8080".into(),
        };
        for url in [
            "ws://127.0.0.1:8080",
            "ws://127.0.0.1:8080/",
            "http://127.0.0.1:8080",
            "ws://127.0.0.1:8080/v1/ws",
        ] {
            assert_eq!(Server::parse(url).ok(), Some(local.clone()), "{url}");
        }
        for url in [
            "wss://example.com",
            "127.0.0.1:8080",
            "ws://",
            "ws:///v1/ws",
        ] {
            assert!(
                matches!(Server::parse(url), Err(WatchError::Usage(_))),
                "{url}"
            );
        }
    }

    #[test]
    fn starts_after_welcome_and_ends_with_its_own_run() {
        let mut w = Watcher::new("alice", Some(start()), false);
        assert_eq!(w.on_frame(&welcome()).ok(), Some(Step::Send(start())));
        // Another tab's run ends: not ours, and not before our ack either once acked.
        let ack = json!({"type":"ack","request_id":REQUEST_ID,"run_id":"run_a"});
        assert_eq!(w.on_frame(&ack).ok(), Some(Step::Continue));
        let other = completed("run_b", "failed");
        assert_eq!(w.on_frame(&other).ok(), Some(Step::Continue));
        let ours = completed("run_a", "cancelled");
        assert_eq!(
            w.on_frame(&ours).ok(),
            Some(Step::Completed(RunStatus::Cancelled))
        );
    }

    #[test]
    fn a_run_that_completes_before_its_ack_still_ends_the_watch() {
        let mut w = Watcher::new("alice", Some(start()), false);
        let _ = w.on_frame(&welcome());
        assert_eq!(
            w.on_frame(&completed("run_a", "timed_out")).ok(),
            Some(Step::Continue)
        );
        let ack = json!({"type":"ack","request_id":REQUEST_ID,"run_id":"run_a"});
        assert_eq!(
            w.on_frame(&ack).ok(),
            Some(Step::Completed(RunStatus::TimedOut))
        );
    }

    #[test]
    fn a_refused_start_is_an_error_and_following_never_ends() {
        let mut w = Watcher::new("alice", Some(start()), false);
        let _ = w.on_frame(&welcome());
        let refusal =
            json!({"type":"error","request_id":REQUEST_ID,"code":"unknown_agent","message":"no"});
        assert!(matches!(
            w.on_frame(&refusal),
            Err(WatchError::Refused { code, .. }) if code == "unknown_agent"
        ));

        let mut w = Watcher::new("alice", Some(start()), true);
        let _ = w.on_frame(&welcome());
        let ack = json!({"type":"ack","request_id":REQUEST_ID,"run_id":"run_a"});
        let _ = w.on_frame(&ack);
        assert_eq!(
            w.on_frame(&completed("run_a", "succeeded")).ok(),
            Some(Step::Continue)
        );
        assert!(matches!(
            w.on_frame(&completed("run_a", "bogus")),
            Err(WatchError::Lost(_))
        ));
    }

    // ---- against a real server ----

    fn args(url: String, agent: Option<&str>, input: Option<&str>) -> WatchArgs {
        WatchArgs {
            user: "alice".into(),
            agent: agent.map(str::to_string),
            input: input.map(str::to_string),
            follow: false,
            url,
            token: None,
        }
    }

    fn dev_server() -> agentcast::RunningServer {
        let config = agentcast::Config {
            bind: "127.0.0.1:0".into(),
            jwt_secret: None,
            workers: 1,
            ..agentcast::Config::default()
        };
        match agentcast::spawn(config) {
            Ok(server) => server,
            Err(e) => panic!("cannot start a server: {e}"),
        }
    }

    /// Runs `watch` to its end (at most 20 s); returns its result and the lines it printed.
    fn run(args: &WatchArgs) -> (Result<Ending, WatchError>, Vec<Value>) {
        let mut out = Vec::new();
        let result = actix_web::rt::System::new().block_on(async {
            match tokio::time::timeout(Duration::from_secs(20), watch(args, &mut out)).await {
                Ok(result) => result,
                Err(_) => panic!("watch did not end within 20 s"),
            }
        });
        let text = String::from_utf8(out).expect("watch printed UTF-8");
        let lines = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect();
        (result, lines)
    }

    fn types(lines: &[Value]) -> Vec<&str> {
        lines.iter().filter_map(|l| l["type"].as_str()).collect()
    }

    #[test]
    fn watches_its_run_to_the_end_and_exits_with_its_status() {
        let server = dev_server();
        let url = format!("ws://{}", server.addr());

        let (result, lines) = run(&args(url.clone(), Some("echo"), Some(r#""hello world""#)));
        assert_eq!(result.ok(), Some(Ending::Completed(RunStatus::Succeeded)));
        let seen = types(&lines);
        assert_eq!(seen.first(), Some(&"welcome"), "{seen:?}");
        assert!(
            seen.contains(&"ack") && seen.contains(&"agent_started"),
            "{seen:?}"
        );
        assert_eq!(seen.last(), Some(&"agent_completed"), "{seen:?}");
        assert_eq!(lines[lines.len() - 1]["data"]["result"], "hello world");

        let fail = r#"{"steps":[{"think":"hm"},{"fail":"on purpose"}]}"#;
        let (result, lines) = run(&args(url.clone(), Some("scripted"), Some(fail)));
        assert_eq!(exit_code(&result), 1, "{result:?}");
        assert_eq!(lines[lines.len() - 1]["data"]["status"], "failed");

        let (result, lines) = run(&args(url.clone(), Some("nope"), Some("1")));
        assert_eq!(exit_code(&result), EXIT_REFUSED, "{result:?}");
        assert_eq!(types(&lines), ["welcome", "error"]);

        let (result, lines) = run(&args(url, Some("echo"), Some("not json")));
        assert_eq!(exit_code(&result), EXIT_USAGE, "{result:?}");
        assert!(lines.is_empty());
    }

    #[test]
    fn with_a_secret_it_needs_a_good_token() {
        let secret = "a-test-secret-of-at-least-32-bytes-000";
        let config = agentcast::Config {
            bind: "127.0.0.1:0".into(),
            jwt_secret: Some(secret.into()),
            workers: 1,
            ..agentcast::Config::default()
        };
        let server = match agentcast::spawn(config) {
            Ok(server) => server,
            Err(e) => panic!("cannot start a server: {e}"),
        };
        let mut a = args(
            format!("ws://{}", server.addr()),
            Some("echo"),
            Some(r#""x""#),
        );

        let (result, _) = run(&a);
        match result {
            Err(WatchError::Connect(m)) => assert!(m.contains("not in dev mode"), "{m}"),
            other => panic!("no token, not dev mode: {other:?}"),
        }

        a.token = Some("not-a-token".into());
        let (result, _) = run(&a);
        match result {
            Err(WatchError::Connect(m)) => assert!(m.contains("401"), "{m}"),
            other => panic!("a bad token: {other:?}"),
        }

        a.token = Some(server.token("alice"));
        let (result, _) = run(&a);
        assert_eq!(result.ok(), Some(Ending::Completed(RunStatus::Succeeded)));
    }

    #[test]
    fn no_server_is_a_connection_error() {
        // A port that was free a moment ago.
        let port = match std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()) {
            Ok(addr) => addr.port(),
            Err(e) => panic!("no free port: {e}"),
        };
        let (result, lines) = run(&args(format!("ws://127.0.0.1:{port}"), None, None));
        assert_eq!(exit_code(&result), EXIT_CONNECTION, "{result:?}");
        assert!(lines.is_empty());
    }
}
