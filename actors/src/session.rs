//! `Session`: one actor per WebSocket connection, owning that socket's protocol: `welcome`,
//! client commands and their replies, the heartbeat, frame limits, and writing the run events
//! the registry pushes to it.
//!
//! Everything specific to actix-web-actors lives in this file (the crate is deprecated
//! upstream in favour of actix-ws; a swap stays local).
//!
//! Ordering: the session joins the registry with `ctx.wait`, which holds back every other
//! message until the answer is written, so `welcome` (and a connect-time replay and
//! `resumed`) precede the first live event. Commands that reply (`start_run`, `cancel_run`,
//! `resume`) are handled the same way, one at a time, so an `ack` precedes the run's first
//! event on the connection that started it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_web_actors::ws;

use crate::frame_limit::{FrameLimit, FrameVerdict, FrameWatch};
use crate::ids::{random_id, UserId};
use crate::metrics::Metrics;
use crate::protocol::{
    parse_client_frame, ClientFrame, Command, Control, ErrorCode, PROTOCOL_VERSION,
};
use crate::rate::TokenBucket;
use crate::router::*;

/// Per-connection settings, from the server's configuration.
#[derive(Debug, Clone)]
pub struct SessionSettings {
    pub heartbeat_interval: Duration,
    pub idle_timeout: Duration,
    /// Mailbox capacity: frames accepted for this connection and not yet written.
    pub outbound_queue: usize,
    pub max_frame_bytes: usize,
    pub commands_per_sec: u32,
    pub command_burst: u32,
    pub metrics: Arc<Metrics>,
}

static NEXT_KEY: AtomicU64 = AtomicU64::new(1);

/// The longest a client frame may take to arrive once it has begun.
const FRAME_DEADLINE: Duration = Duration::from_secs(10);

pub struct Session {
    key: u64,
    id: String,
    user: UserId,
    router: Router,
    settings: SessionSettings,
    resume: Option<ResumeFrom>,
    reset: Option<ResetHandle>,
    shared: Arc<SessionShared>,
    last_heard: Instant,
    /// The newest `seq` this connection has been sent.
    last_seq: u64,
    /// This connection has been sent every event with `seq > covered_from`.
    covered_from: u64,
    /// A fragmented text message being put together.
    fragments: Option<Vec<u8>>,
    /// What the frame guard in front of the decoder saw.
    frames: Arc<FrameWatch>,
    commands: TokenBucket,
    last_rate_error: Option<Instant>,
}

impl Session {
    /// A session for an authenticated `user`; `resume` is the connect-time `after_seq`/`epoch`.
    pub fn new(
        user: UserId,
        router: Router,
        settings: SessionSettings,
        resume: Option<ResumeFrom>,
        reset: Option<ResetHandle>,
    ) -> Self {
        let now = Instant::now();
        Session {
            key: NEXT_KEY.fetch_add(1, Ordering::Relaxed),
            id: random_id("ses_", 16),
            user,
            commands: TokenBucket::new(
                settings.command_burst,
                settings.commands_per_sec as f64,
                now,
            ),
            router,
            settings,
            resume,
            reset,
            shared: Arc::default(),
            last_heard: now,
            last_seq: 0,
            covered_from: 0,
            fragments: None,
            frames: Arc::default(),
            last_rate_error: None,
        }
    }

    /// Starts the WebSocket handshake response for this session.
    pub fn start(
        self,
        req: &actix_web::HttpRequest,
        stream: actix_web::web::Payload,
    ) -> Result<actix_web::HttpResponse, actix_web::Error> {
        let max = self.settings.max_frame_bytes;
        // A frame must arrive whole this soon after its first byte.
        let deadline = self.settings.idle_timeout.min(FRAME_DEADLINE);
        let guarded = FrameLimit::new(stream, max, deadline, self.frames.clone());
        ws::WsResponseBuilder::new(self, req, guarded)
            .frame_size(max)
            .start()
    }

    fn send(&self, ctx: &mut ws::WebsocketContext<Self>, frame: Control<'_>) {
        ctx.text(frame.to_text());
    }

    fn refuse(
        &self,
        ctx: &mut ws::WebsocketContext<Self>,
        request_id: Option<&str>,
        code: ErrorCode,
        message: &str,
    ) {
        self.send(ctx, Control::error(request_id, code, message));
    }

    fn close(ctx: &mut ws::WebsocketContext<Self>, code: ws::CloseCode, why: &str) {
        ctx.close(Some(ws::CloseReason {
            code,
            description: Some(why.to_string()),
        }));
        ctx.stop();
    }

    fn joined(&mut self, joined: Connected, ctx: &mut ws::WebsocketContext<Self>) {
        self.last_seq = joined.last_seq;
        self.covered_from = joined.last_seq;
        self.send(
            ctx,
            Control::Welcome {
                session_id: &self.id,
                user_id: &self.user,
                epoch: &joined.epoch,
                last_seq: joined.last_seq,
                protocol: PROTOCOL_VERSION,
            },
        );
        let after_seq = self.resume.as_ref().map_or(0, |r| r.after_seq);
        match joined.resume {
            None => {}
            // The replay's frames and `resumed` follow through the mailbox.
            Some(Ok(())) => self.covered_from = after_seq,
            Some(Err(gap)) => self.resume_gap(None, after_seq, gap, ctx),
        }
    }

    fn resume_gap(
        &mut self,
        request_id: Option<&str>,
        after_seq: u64,
        gap: crate::replay::Gap,
        ctx: &mut ws::WebsocketContext<Self>,
    ) {
        let message = format!(
            "events after {after_seq} are not available (oldest kept {}, last {}); reload the conversation",
            gap.oldest_seq, gap.last_seq
        );
        self.send(
            ctx,
            Control::Error {
                request_id,
                code: ErrorCode::ResumeGap,
                message: &message,
                oldest_seq: Some(gap.oldest_seq),
                last_seq: Some(gap.last_seq),
                retry_after_ms: None,
            },
        );
    }

    fn on_text(&mut self, text: &str, ctx: &mut ws::WebsocketContext<Self>) {
        let now = Instant::now();
        if let Err(wait) = self.commands.take(now) {
            // Refused frames get at most one reply a second, so a flood cannot make us queue
            // replies for a client that does not read them.
            if self
                .last_rate_error
                .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
            {
                self.last_rate_error = Some(now);
                let message = format!(
                    "more than {} commands a second; wait and retry",
                    self.settings.commands_per_sec
                );
                let request_id = crate::protocol::request_id_of(text);
                self.send(
                    ctx,
                    Control::Error {
                        request_id: request_id.as_deref(),
                        code: ErrorCode::RateLimited,
                        message: &message,
                        oldest_seq: None,
                        last_seq: None,
                        retry_after_ms: Some(wait.as_millis() as u64 + 1),
                    },
                );
            }
            return;
        }
        match parse_client_frame(text) {
            Ok(frame) => self.on_command(frame, ctx),
            Err(r) => self.refuse(ctx, r.request_id.as_deref(), r.code, &r.message),
        }
    }

    fn on_command(&mut self, frame: ClientFrame, ctx: &mut ws::WebsocketContext<Self>) {
        let ClientFrame {
            request_id,
            command,
        } = frame;
        match command {
            Command::Ping => self.send(
                ctx,
                Control::Pong {
                    request_id: request_id.as_deref(),
                },
            ),
            Command::StartRun {
                agent,
                input,
                thread_id,
            } => {
                let ask = self.router.start_run.send(StartRun {
                    user: self.user.clone(),
                    agent,
                    input,
                    thread_id,
                });
                ctx.wait(
                    actix::fut::wrap_future(ask).map(move |answer, act: &mut Self, ctx| {
                        let rid = request_id.as_deref();
                        match answer {
                            Ok(Ok(run_id)) => act.send(
                                ctx,
                                Control::Ack {
                                    request_id: rid,
                                    run_id: Some(&run_id),
                                },
                            ),
                            Ok(Err(StartRefused::UnknownAgent)) => act.refuse(
                                ctx,
                                rid,
                                ErrorCode::UnknownAgent,
                                "no agent by that name; see GET /v1/agents",
                            ),
                            Ok(Err(StartRefused::InvalidInput(why))) => {
                                act.refuse(ctx, rid, ErrorCode::InvalidField, &why)
                            }
                            Ok(Err(StartRefused::TooManyRuns(limit))) => act.refuse(
                                ctx,
                                rid,
                                ErrorCode::TooManyRuns,
                                &format!("{limit} runs are already running for this user"),
                            ),
                            // Only a publisher's start is refused so; not a tab's.
                            Ok(Err(StartRefused::TooManyPublished(limit))) => act.refuse(
                                ctx,
                                rid,
                                ErrorCode::TooManyRuns,
                                &format!("{limit} runs of this publisher are already running"),
                            ),
                            Ok(Err(StartRefused::RateLimited { retry_after_ms })) => act.send(
                                ctx,
                                Control::Error {
                                    request_id: rid,
                                    code: ErrorCode::RateLimited,
                                    message: "too many runs started in the last minute",
                                    oldest_seq: None,
                                    last_seq: None,
                                    retry_after_ms: Some(retry_after_ms),
                                },
                            ),
                            Ok(Err(StartRefused::ShuttingDown)) => act.refuse(
                                ctx,
                                rid,
                                ErrorCode::Internal,
                                "the server is shutting down",
                            ),
                            Ok(Err(StartRefused::Unavailable)) => act.refuse(
                                ctx,
                                rid,
                                ErrorCode::Unavailable,
                                "the event store is unreachable; try again later",
                            ),
                            Err(_) => act.refuse(
                                ctx,
                                rid,
                                ErrorCode::Internal,
                                "the event router is unavailable",
                            ),
                        }
                    }),
                );
            }
            Command::CancelRun { run_id } => {
                let ask = self.router.cancel_run.send(CancelRun {
                    user: self.user.clone(),
                    run_id: run_id.clone(),
                });
                ctx.wait(
                    actix::fut::wrap_future(ask).map(move |answer, act: &mut Self, ctx| {
                        let rid = request_id.as_deref();
                        match answer {
                            Ok(Ok(())) => act.send(
                                ctx,
                                Control::Ack {
                                    request_id: rid,
                                    run_id: Some(&run_id),
                                },
                            ),
                            Ok(Err(CancelRefused::NotFound)) => {
                                act.refuse(ctx, rid, ErrorCode::RunNotFound, "no such run")
                            }
                            Ok(Err(CancelRefused::Unavailable)) => act.refuse(
                                ctx,
                                rid,
                                ErrorCode::Unavailable,
                                "the event store is unreachable; try again later",
                            ),
                            Err(_) => act.refuse(
                                ctx,
                                rid,
                                ErrorCode::Internal,
                                "the event router is unavailable",
                            ),
                        }
                    }),
                );
            }
            Command::Respond {
                run_id,
                interrupt_id,
                response,
            } => {
                let ask = self.router.respond.send(Respond {
                    user: self.user.clone(),
                    run_id: run_id.clone(),
                    interrupt_id,
                    response,
                });
                // Not `wait`: the answer may travel to another node (up to 5 s), and nothing's order
                // depends on its `ack`, while a session that does not read its mailbox meanwhile
                // would be taken for a slow consumer.
                ctx.spawn(
                    actix::fut::wrap_future(ask).map(move |answer, act: &mut Self, ctx| {
                        let rid = request_id.as_deref();
                        match answer {
                            Ok(Ok(())) => act.send(
                                ctx,
                                Control::Ack {
                                    request_id: rid,
                                    run_id: Some(&run_id),
                                },
                            ),
                            Ok(Err(refused)) => {
                                let (code, message) = refused.code_and_message();
                                act.refuse(ctx, rid, code, &message)
                            }
                            Err(_) => act.refuse(
                                ctx,
                                rid,
                                ErrorCode::Internal,
                                "the event router is unavailable",
                            ),
                        }
                    }),
                );
            }
            Command::Resume { after_seq, epoch } => {
                // Only what this connection was not sent: the events before it joined.
                let ask = self.router.resume.send(Resume {
                    user: self.user.clone(),
                    key: self.key,
                    after_seq,
                    upto: self.covered_from,
                    epoch,
                    request_id: request_id.as_deref().map(Arc::from),
                });
                ctx.wait(
                    actix::fut::wrap_future(ask).map(move |answer, act: &mut Self, ctx| {
                        let rid = request_id.as_deref();
                        match answer {
                            Ok(Ok(())) => act.covered_from = act.covered_from.min(after_seq),
                            Ok(Err(ResumeRefused::Gap(gap))) => {
                                act.resume_gap(rid, after_seq, gap, ctx)
                            }
                            Ok(Err(ResumeRefused::InProgress)) => act.refuse(
                                ctx,
                                rid,
                                ErrorCode::InvalidField,
                                "a resume is already replaying on this connection; wait for its resumed",
                            ),
                            Ok(Err(ResumeRefused::Unavailable)) => act.refuse(
                                ctx,
                                rid,
                                ErrorCode::Unavailable,
                                "the event store is unreachable; try again later",
                            ),
                            Ok(Err(ResumeRefused::Busy(limit))) => act.refuse(
                                ctx,
                                rid,
                                ErrorCode::RateLimited,
                                &format!(
                                    "{limit} replays of this user's history are being read; \
                                     try again when one has ended"
                                ),
                            ),
                            Err(_) => act.refuse(
                                ctx,
                                rid,
                                ErrorCode::Internal,
                                "the event router is unavailable",
                            ),
                        }
                    }),
                );
            }
        }
    }

    fn on_fragment(&mut self, item: actix_http::ws::Item, ctx: &mut ws::WebsocketContext<Self>) {
        let (bytes, last) = match item {
            actix_http::ws::Item::FirstText(b) => {
                self.fragments = Some(Vec::new());
                (b, false)
            }
            actix_http::ws::Item::FirstBinary(_) => {
                return Self::close(
                    ctx,
                    ws::CloseCode::Unsupported,
                    "binary frames are not supported",
                )
            }
            actix_http::ws::Item::Continue(b) => (b, false),
            actix_http::ws::Item::Last(b) => (b, true),
        };
        let Some(buf) = self.fragments.as_mut() else {
            return Self::close(
                ctx,
                ws::CloseCode::Protocol,
                "continuation without a first frame",
            );
        };
        if buf.len() + bytes.len() > self.settings.max_frame_bytes {
            return Self::close(ctx, ws::CloseCode::Size, "message too large");
        }
        buf.extend_from_slice(&bytes);
        if last {
            let buf = self.fragments.take().unwrap_or_default();
            match String::from_utf8(buf) {
                Ok(text) => self.on_text(&text, ctx),
                Err(_) => Self::close(ctx, ws::CloseCode::Invalid, "text message is not UTF-8"),
            }
        }
    }
}

impl Actor for Session {
    type Context = ws::WebsocketContext<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.settings.outbound_queue);
        ctx.run_interval(self.settings.heartbeat_interval, |act, ctx| {
            if act.last_heard.elapsed() > act.settings.idle_timeout {
                log::debug!(
                    "session {} of {}: silent too long, closing",
                    act.id,
                    act.user
                );
                return Self::close(ctx, ws::CloseCode::Normal, "idle timeout");
            }
            ctx.ping(b"");
            act.send(
                ctx,
                Control::Heartbeat {
                    last_seq: act.last_seq,
                },
            );
        });
        let join = Connect {
            user: self.user.clone(),
            key: self.key,
            push: ctx.address().recipient(),
            shared: self.shared.clone(),
            reset: self.reset.clone(),
            resume: self.resume.clone(),
        };
        ctx.wait(actix::fut::wrap_future(self.router.connect.send(join)).map(
            |answer, act: &mut Self, ctx| match answer {
                Ok(Ok(joined)) => act.joined(joined, ctx),
                Ok(Err(ConnectRefused::TooManyConnections(limit))) => {
                    act.settings
                        .metrics
                        .refused_connections
                        .with_label_values(&["too_many_connections"])
                        .inc();
                    let why = format!("too many connections for this user (at most {limit})");
                    Self::close(ctx, ws::CloseCode::Policy, &why)
                }
                Ok(Err(ConnectRefused::Unavailable)) => {
                    act.settings
                        .metrics
                        .refused_connections
                        .with_label_values(&["unavailable"])
                        .inc();
                    // 1013 Try Again Later: the user's history cannot be reached right now.
                    Self::close(
                        ctx,
                        ws::CloseCode::Again,
                        "unavailable: the event store is unreachable; try again later",
                    )
                }
                Err(_) => Self::close(ctx, ws::CloseCode::Error, "the event router is unavailable"),
            },
        ));
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        self.router.disconnect.do_send(Disconnect {
            user: self.user.clone(),
            key: self.key,
        });
    }
}

impl Handler<Push> for Session {
    type Result = ();

    fn handle(&mut self, msg: Push, ctx: &mut Self::Context) {
        match msg {
            Push::Event(frame) => {
                if self.shared.take(&frame, &self.settings.metrics) {
                    self.last_seq = self.last_seq.max(frame.seq);
                    ctx.text(frame.text);
                }
            }
            Push::Resumed(note) => self.send(
                ctx,
                Control::Resumed {
                    request_id: note.request_id.as_deref(),
                    from_seq: note.from_seq,
                    to_seq: note.to_seq,
                },
            ),
            Push::Close(Goodbye::SlowConsumer) => {
                Self::close(ctx, ws::CloseCode::Other(4008), "slow_consumer")
            }
            Push::Close(Goodbye::ServerShutdown) => {
                Self::close(ctx, ws::CloseCode::Away, "server shutting down")
            }
            Push::Close(Goodbye::HistoryLost) => Self::close(
                ctx,
                ws::CloseCode::Restart,
                "the event history was lost; reconnect and resume",
            ),
        }
    }
}

impl StreamHandler<Result<ws::Message, ws::ProtocolError>> for Session {
    fn handle(&mut self, item: Result<ws::Message, ws::ProtocolError>, ctx: &mut Self::Context) {
        self.last_heard = Instant::now();
        match item {
            Ok(ws::Message::Text(text)) => {
                if self.fragments.is_some() {
                    return Self::close(
                        ctx,
                        ws::CloseCode::Protocol,
                        "new message inside a fragmented one",
                    );
                }
                self.on_text(&text, ctx)
            }
            Ok(ws::Message::Binary(_)) => Self::close(
                ctx,
                ws::CloseCode::Unsupported,
                "binary frames are not supported",
            ),
            Ok(ws::Message::Continuation(item)) => self.on_fragment(item, ctx),
            Ok(ws::Message::Ping(payload)) => ctx.pong(&payload),
            Ok(ws::Message::Pong(_)) | Ok(ws::Message::Nop) => {}
            Ok(ws::Message::Close(reason)) => {
                ctx.close(reason);
                ctx.stop();
            }
            Err(ws::ProtocolError::Overflow) => {
                Self::close(ctx, ws::CloseCode::Size, "frame too large")
            }
            Err(_) if self.frames.verdict() == FrameVerdict::TooLarge => {
                Self::close(ctx, ws::CloseCode::Size, "frame too large")
            }
            Err(_) if self.frames.verdict() == FrameVerdict::TooSlow => {
                Self::close(ctx, ws::CloseCode::Policy, "frame took too long to arrive")
            }
            Err(e) => {
                log::debug!("session {} of {}: protocol error {e}", self.id, self.user);
                Self::close(ctx, ws::CloseCode::Protocol, "protocol error")
            }
        }
    }

    fn finished(&mut self, ctx: &mut Self::Context) {
        ctx.stop();
    }
}
