//! `SseSession`: one actor per `GET /v1/events` stream, the Server-Sent Events twin of the
//! WebSocket [`Session`](crate::session::Session). It joins the registry with the same
//! `Connect` message, so `Last-Event-ID` resume is the same replay path as a WebSocket
//! resume, and writes each event as `id: <seq>`, `event: <type>`, `data: <the same JSON>`.
//!
//! Its output is a bounded channel that the HTTP response streams from; a client that does
//! not read fills it and the stream is ended (it can resume with `Last-Event-ID`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use actix_web::web::Bytes;
use tokio::sync::mpsc;

use crate::event::Frame;
use crate::ids::{random_id, UserId};
use crate::metrics::Metrics;
use crate::protocol::{Control, ErrorCode, PROTOCOL_VERSION};
use crate::replay::Gap;
use crate::router::*;

static NEXT_KEY: AtomicU64 = AtomicU64::new(1 << 62);

pub struct SseSession {
    key: u64,
    id: String,
    user: UserId,
    router: Router,
    out: mpsc::Sender<Bytes>,
    resume: Option<ResumeFrom>,
    reset: Option<ResetHandle>,
    shared: Arc<SessionShared>,
    heartbeat: Duration,
    outbound_queue: usize,
    last_seq: u64,
    metrics: Arc<Metrics>,
}

impl SseSession {
    /// A stream for `user`; returns the actor and the receiving end the response streams from.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        user: UserId,
        router: Router,
        resume: Option<ResumeFrom>,
        reset: Option<ResetHandle>,
        heartbeat: Duration,
        outbound_queue: usize,
        metrics: Arc<Metrics>,
    ) -> (Self, mpsc::Receiver<Bytes>) {
        let (out, rx) = mpsc::channel(outbound_queue.max(1));
        let session = SseSession {
            key: NEXT_KEY.fetch_add(1, Ordering::Relaxed),
            id: random_id("ses_", 16),
            user,
            router,
            out,
            resume,
            reset,
            shared: Arc::default(),
            heartbeat,
            outbound_queue,
            last_seq: 0,
            metrics,
        };
        (session, rx)
    }

    /// Queues bytes for the client; a full queue ends the stream.
    fn write(&mut self, bytes: String, ctx: &mut Context<Self>) {
        match self.out.try_send(Bytes::from(bytes)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                log::warn!(
                    "SSE stream {} of {}: not reading; ended as a slow consumer",
                    self.id,
                    self.user
                );
                self.metrics.slow_consumers.inc();
                ctx.stop();
            }
            Err(mpsc::error::TrySendError::Closed(_)) => ctx.stop(),
        }
    }

    fn control(&mut self, event: &str, frame: Control<'_>, ctx: &mut Context<Self>) {
        self.write(
            format!("event: {event}\ndata: {}\n\n", frame.to_text()),
            ctx,
        );
    }

    fn event(&mut self, frame: &Frame, ctx: &mut Context<Self>) {
        self.write(
            format!(
                "id: {}\nevent: {}\ndata: {}\n\n",
                frame.seq, frame.kind, frame.text
            ),
            ctx,
        );
    }

    fn joined(&mut self, joined: Connected, ctx: &mut Context<Self>) {
        self.last_seq = joined.last_seq;
        let welcome = Control::Welcome {
            session_id: &self.id.clone(),
            user_id: &self.user.clone(),
            epoch: &joined.epoch,
            last_seq: joined.last_seq,
            protocol: PROTOCOL_VERSION,
        };
        self.control("welcome", welcome, ctx);
        let after_seq = self.resume.as_ref().map_or(0, |r| r.after_seq);
        match joined.replay {
            None => {}
            Some(Ok(frames)) => {
                for frame in &frames {
                    self.event(frame, ctx);
                }
                let resumed = Control::Resumed {
                    from_seq: after_seq + 1,
                    to_seq: after_seq + frames.len() as u64,
                };
                self.control("resumed", resumed, ctx);
            }
            Some(Err(Gap {
                oldest_seq,
                last_seq,
            })) => {
                let message = format!("events after {after_seq} are not available");
                let error = Control::Error {
                    request_id: None,
                    code: ErrorCode::ResumeGap,
                    message: &message,
                    oldest_seq: Some(oldest_seq),
                    last_seq: Some(last_seq),
                    retry_after_ms: None,
                };
                self.control("error", error, ctx);
            }
        }
    }
}

impl Actor for SseSession {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(self.outbound_queue);
        // The HTTP layer drops the receiving end as soon as the client goes away: leave then,
        // not at the next write, so the connection stops counting against the user at once.
        let out = self.out.clone();
        ctx.spawn(
            actix::fut::wrap_future(async move { out.closed().await })
                .map(|(), _: &mut Self, ctx| ctx.stop()),
        );
        ctx.run_interval(self.heartbeat, |act, ctx| {
            if act.out.is_closed() {
                return ctx.stop();
            }
            act.write(format!(": heartbeat last_seq={}\n\n", act.last_seq), ctx);
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
                    act.metrics
                        .refused_connections
                        .with_label_values(&["too_many_connections"])
                        .inc();
                    let message = format!("too many connections for this user (at most {limit})");
                    act.control(
                        "error",
                        Control::error(None, ErrorCode::Internal, &message),
                        ctx,
                    );
                    ctx.stop();
                }
                Err(_) => ctx.stop(),
            },
        ));
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        self.router.disconnect.do_send(Disconnect {
            user: self.user.clone(),
            key: self.key,
        });
    }
}

impl Handler<Push> for SseSession {
    type Result = ();

    fn handle(&mut self, msg: Push, ctx: &mut Context<Self>) {
        match msg {
            Push::Event(frame) => {
                if self.shared.take(&frame, &self.metrics) {
                    self.last_seq = frame.seq;
                    self.event(&frame, ctx);
                }
            }
            Push::Close(_) => ctx.stop(),
        }
    }
}
