//! `SseSession`: one actor per `GET /v1/events` stream, the Server-Sent Events twin of the
//! WebSocket [`Session`](crate::session::Session). It joins the registry with the same
//! `Connect` message, so `Last-Event-ID` resume is the same replay path as a WebSocket
//! resume, and writes each event as `id: <seq>`, `event: <type>`, `data: <the same JSON>`.
//!
//! It is bounded exactly as a WebSocket session is. Events reach it through its bounded
//! mailbox; it passes them on to the response body through a small channel of shared byte
//! chunks (the event's JSON is the registry's bytes, not a copy). When the client does not
//! read, that channel fills, the session stops taking from its mailbox until there is room,
//! the mailbox fills, and the registry's slow-consumer rules apply: the stream falls behind
//! and catches up from the log while it reads, or is cut off and its TCP connection reset
//! after the grace period. It counts against the user's connection limit until the response
//! is gone.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use actix::prelude::*;
use actix_web::web::Bytes;
use futures_util::Stream;
use tokio::sync::{mpsc, oneshot};

use crate::event::Frame;
use crate::ids::{random_id, UserId};
use crate::metrics::Metrics;
use crate::protocol::{Control, ErrorCode, PROTOCOL_VERSION};
use crate::replay::Gap;
use crate::router::*;

static NEXT_KEY: AtomicU64 = AtomicU64::new(1 << 62);

/// Chunks between the session and the response body (three per event).
const BODY_CHUNKS: usize = 48;

/// How joining the registry went, for the HTTP layer to answer before streaming.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Joined {
    Yes,
    TooManyConnections(usize),
    Unavailable,
    /// The shared log (Redis) cannot be reached: 503 `unavailable`.
    StoreUnavailable,
}

/// The response body of a stream: what the session writes, until it ends the stream.
pub struct SseBody {
    rx: mpsc::Receiver<Bytes>,
}

impl Stream for SseBody {
    type Item = Result<Bytes, actix_web::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        match self.rx.poll_recv(cx) {
            // An empty chunk is the session's end of stream.
            Poll::Ready(Some(chunk)) if chunk.is_empty() => Poll::Ready(None),
            Poll::Ready(Some(chunk)) => Poll::Ready(Some(Ok(chunk))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

pub struct SseSession {
    key: u64,
    id: String,
    user: UserId,
    router: Router,
    out: mpsc::Sender<Bytes>,
    /// Chunks waiting for room in `out`; while any wait, the mailbox is held back.
    pending: VecDeque<Bytes>,
    joined: Option<oneshot::Sender<Joined>>,
    /// The stream is ending: nothing more is written after what is pending.
    ending: bool,
    resume: Option<ResumeFrom>,
    reset: Option<ResetHandle>,
    shared: Arc<SessionShared>,
    heartbeat: Duration,
    outbound_queue: usize,
    last_seq: u64,
    metrics: Arc<Metrics>,
}

impl SseSession {
    /// A stream for `user`; returns the actor, the response body, and how joining went
    /// (known before anything is streamed).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        user: UserId,
        router: Router,
        resume: Option<ResumeFrom>,
        reset: Option<ResetHandle>,
        heartbeat: Duration,
        outbound_queue: usize,
        metrics: Arc<Metrics>,
    ) -> (Self, SseBody, oneshot::Receiver<Joined>) {
        let (out, rx) = mpsc::channel(BODY_CHUNKS);
        let (joined_tx, joined_rx) = oneshot::channel();
        let session = SseSession {
            key: NEXT_KEY.fetch_add(1, Ordering::Relaxed),
            id: random_id("ses_", 16),
            user,
            router,
            out,
            pending: VecDeque::new(),
            joined: Some(joined_tx),
            ending: false,
            resume,
            reset,
            shared: Arc::default(),
            heartbeat,
            outbound_queue,
            last_seq: 0,
            metrics,
        };
        (session, SseBody { rx }, joined_rx)
    }

    /// Queues chunks for the client.
    fn write(&mut self, chunks: impl IntoIterator<Item = Bytes>, ctx: &mut Context<Self>) {
        if self.ending {
            return;
        }
        self.pending.extend(chunks);
        self.flush(ctx);
    }

    /// Moves pending chunks into the body channel; when it is full, waits for room with the
    /// mailbox held back, which is what makes a stalled stream's mailbox fill.
    fn flush(&mut self, ctx: &mut Context<Self>) {
        while let Some(chunk) = self.pending.pop_front() {
            match self.out.try_send(chunk) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(chunk)) => {
                    self.pending.push_front(chunk);
                    let out = self.out.clone();
                    ctx.wait(
                        actix::fut::wrap_future(async move { out.reserve().await.is_ok() }).map(
                            |room, act: &mut Self, ctx| {
                                if room {
                                    act.flush(ctx)
                                } else {
                                    ctx.stop()
                                }
                            },
                        ),
                    );
                    return;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.pending.clear();
                    ctx.stop();
                    return;
                }
            }
        }
    }

    /// Ends the stream after what is pending. The session stays (and counts against the
    /// user) until the response is gone.
    fn end(&mut self, ctx: &mut Context<Self>) {
        if !self.ending {
            self.pending.push_back(Bytes::new());
            self.flush(ctx);
            self.ending = true;
        }
    }

    fn control(&mut self, event: &str, frame: Control<'_>, ctx: &mut Context<Self>) {
        let text = format!("event: {event}\ndata: {}\n\n", frame.to_text());
        self.write([Bytes::from(text)], ctx);
    }

    fn event(&mut self, frame: Frame, ctx: &mut Context<Self>) {
        let head = format!("id: {}\nevent: {}\ndata: ", frame.seq, frame.kind);
        self.write(
            [
                Bytes::from(head),
                frame.text.into_bytes(),
                Bytes::from_static(b"\n\n"),
            ],
            ctx,
        );
    }

    fn on_joined(&mut self, joined: Connected, ctx: &mut Context<Self>) {
        if let Some(tx) = self.joined.take() {
            let _ = tx.send(Joined::Yes);
        }
        self.last_seq = joined.last_seq;
        let (id, user) = (self.id.clone(), self.user.clone());
        let welcome = Control::Welcome {
            session_id: &id,
            user_id: &user,
            epoch: &joined.epoch,
            last_seq: joined.last_seq,
            protocol: PROTOCOL_VERSION,
        };
        self.control("welcome", welcome, ctx);
        let after_seq = self.resume.as_ref().map_or(0, |r| r.after_seq);
        if let Some(Err(Gap {
            oldest_seq,
            last_seq,
        })) = joined.resume
        {
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

    fn refused(&mut self, why: Joined, ctx: &mut Context<Self>) {
        if let Some(tx) = self.joined.take() {
            let _ = tx.send(why);
        }
        ctx.stop();
    }
}

impl Actor for SseSession {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(self.outbound_queue);
        // The HTTP layer drops the body as soon as the response is done or the client has
        // gone: leave then, so the stream stops counting against the user at once.
        let out = self.out.clone();
        ctx.spawn(
            actix::fut::wrap_future(async move { out.closed().await })
                .map(|(), _: &mut Self, ctx| ctx.stop()),
        );
        ctx.run_interval(self.heartbeat, |act, ctx| {
            let comment = format!(": heartbeat last_seq={}\n\n", act.last_seq);
            act.write([Bytes::from(comment)], ctx);
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
                Ok(Ok(joined)) => act.on_joined(joined, ctx),
                Ok(Err(ConnectRefused::TooManyConnections(limit))) => {
                    act.metrics
                        .refused_connections
                        .with_label_values(&["too_many_connections"])
                        .inc();
                    act.refused(Joined::TooManyConnections(limit), ctx)
                }
                Ok(Err(ConnectRefused::Unavailable)) => act.refused(Joined::StoreUnavailable, ctx),
                Err(_) => act.refused(Joined::Unavailable, ctx),
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
                    self.last_seq = self.last_seq.max(frame.seq);
                    self.event(frame, ctx);
                }
            }
            Push::Resumed(note) => {
                let resumed = Control::Resumed {
                    request_id: note.request_id.as_deref(),
                    from_seq: note.from_seq,
                    to_seq: note.to_seq,
                };
                self.control("resumed", resumed, ctx);
            }
            Push::Close(_) => self.end(ctx),
        }
    }
}
