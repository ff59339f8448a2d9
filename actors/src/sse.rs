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
//!
//! The frontends' routes (`/v1/agui`, `/v1/ai-sdk`, PROTOCOL.md section 13) use the same
//! session with a [`FollowRun`]: it joins, then starts the run (or, to resume, joins with a
//! replay from the run's first event), writes only that run's events, re-encoded by the
//! format's [`RunEncoder`], and ends the stream after the run's last event.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use actix::prelude::*;
use actix_web::web::Bytes;
use futures_util::Stream;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use crate::event::Frame;
use crate::frontends::{Encoding, RunEncoder, RunEvent};
use crate::ids::{random_id, RunId, UserId};
use crate::metrics::Metrics;
use crate::protocol::{Control, ErrorCode, PROTOCOL_VERSION};
use crate::replay::Gap;
use crate::router::*;

static NEXT_KEY: AtomicU64 = AtomicU64::new(1 << 62);

/// Chunks between the session and the response body (three per event).
const BODY_CHUNKS: usize = 48;

/// How joining the registry went, for the HTTP layer to answer before streaming.
#[derive(Debug, Clone, PartialEq)]
pub enum Joined {
    Yes,
    /// A frontend stream joined and follows this run.
    Following(RunId),
    /// The run to follow could not be started.
    RunRefused(StartRefused),
    /// The run to follow is no longer in the user's log from its first event.
    RunGone,
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

/// What a frontend stream follows: one run, in one of the frontends' encodings.
pub enum FollowRun {
    /// Start this run once joined, so that none of its events can come before the session.
    Start(StartRun),
    /// A running run, replayed from the user's events after `after_seq` (its first is next).
    Running { run_id: RunId, after_seq: u64 },
}

/// A frontend stream's state: the run it follows and the encoder of its format.
struct RunStream {
    encoder: Box<dyn RunEncoder>,
    /// Known once the run has started.
    run_id: Option<RunId>,
    start: Option<StartRun>,
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
    /// Set for a frontend stream: one run's events only, re-encoded; no control frames.
    run: Option<RunStream>,
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
            run: None,
        };
        (session, SseBody { rx }, joined_rx)
    }

    /// A frontend stream of `user`: one run in `encoding`. Joining answers `Following` once
    /// the run is known (started, for [`FollowRun::Start`]).
    #[allow(clippy::too_many_arguments)]
    pub fn for_run(
        user: UserId,
        router: Router,
        follow: FollowRun,
        encoding: Encoding,
        reset: Option<ResetHandle>,
        heartbeat: Duration,
        outbound_queue: usize,
        metrics: Arc<Metrics>,
    ) -> (Self, SseBody, oneshot::Receiver<Joined>) {
        let (run, resume) = match follow {
            FollowRun::Start(start) => ((None, Some(start)), None),
            FollowRun::Running { run_id, after_seq } => (
                (Some(run_id), None),
                Some(ResumeFrom {
                    after_seq,
                    epoch: None,
                }),
            ),
        };
        let (mut session, body, joined) = Self::new(
            user,
            router,
            resume,
            reset,
            heartbeat,
            outbound_queue,
            metrics,
        );
        session.run = Some(RunStream {
            encoder: encoding.encoder(),
            run_id: run.0,
            start: run.1,
        });
        (session, body, joined)
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
        if self.run.is_some() {
            // The frontends' formats have no place for agentcast's control frames.
            return;
        }
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

    /// One of the followed run's events, in the stream's format; the stream ends after the
    /// run's last event.
    fn run_event(&mut self, frame: Frame, ctx: &mut Context<Self>) {
        let Some(run) = self.run.as_mut() else {
            return;
        };
        if run.run_id.as_ref() != Some(&frame.run_id) || run.encoder.finished() {
            return;
        }
        let parsed: Value = match serde_json::from_str(&frame.text) {
            Ok(value) => value,
            Err(e) => {
                log::error!("run {}: event {} is not JSON: {e}", frame.run_id, frame.seq);
                return;
            }
        };
        let Some(event) = RunEvent::from_json(&parsed) else {
            log::error!(
                "run {}: event {} is not a run event",
                frame.run_id,
                frame.seq
            );
            return;
        };
        let mut chunks: Vec<Bytes> = run
            .encoder
            .encode(&event)
            .into_iter()
            .map(|out| Bytes::from(format!("id: {}\ndata: {out}\n\n", frame.seq)))
            .collect();
        let finished = run.encoder.finished();
        if finished {
            if let Some(trailer) = run.encoder.trailer() {
                chunks.push(Bytes::from(format!("data: {trailer}\n\n")));
            }
        }
        self.write(chunks, ctx);
        if finished {
            self.end(ctx);
        }
    }

    /// A frontend stream has joined: it starts its run, if it is to, before it reads any
    /// event (`ctx.wait` holds the mailbox back), so the run's first events wait for it.
    fn follow(&mut self, joined: Connected, ctx: &mut Context<Self>) {
        if let Some(Err(_)) = joined.resume {
            return self.refused(Joined::RunGone, ctx);
        }
        let start = self.run.as_mut().and_then(|run| run.start.take());
        let Some(start) = start else {
            let run_id = self.run.as_ref().and_then(|run| run.run_id.clone());
            if let (Some(tx), Some(run_id)) = (self.joined.take(), run_id) {
                let _ = tx.send(Joined::Following(run_id));
            }
            return;
        };
        ctx.wait(
            actix::fut::wrap_future(self.router.start_run.send(start)).map(
                |answer, act: &mut Self, ctx| match answer {
                    Ok(Ok(run_id)) => {
                        if let Some(run) = act.run.as_mut() {
                            run.run_id = Some(run_id.clone());
                        }
                        if let Some(tx) = act.joined.take() {
                            let _ = tx.send(Joined::Following(run_id));
                        }
                    }
                    Ok(Err(refused)) => act.refused(Joined::RunRefused(refused), ctx),
                    Err(_) => act.refused(Joined::Unavailable, ctx),
                },
            ),
        );
    }

    fn on_joined(&mut self, joined: Connected, ctx: &mut Context<Self>) {
        self.last_seq = joined.last_seq;
        if self.run.is_some() {
            return self.follow(joined, ctx);
        }
        if let Some(tx) = self.joined.take() {
            let _ = tx.send(Joined::Yes);
        }
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
                // Every frame taken counts as written, the other runs' ones on a frontend
                // stream too: the registry judges whether the session is reading by it.
                if self.shared.take(&frame, &self.metrics) {
                    self.last_seq = self.last_seq.max(frame.seq);
                    if self.run.is_some() {
                        self.run_event(frame, ctx);
                    } else {
                        self.event(frame, ctx);
                    }
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
