//! `FrameLimit`: a guard between a WebSocket connection's bytes and actix's frame decoder.
//!
//! actix-web-actors reads everything the socket has into one buffer and only checks a frame's
//! size once the whole frame is there, so a header announcing 2^62 bytes followed by a flood
//! of payload is buffered without bound. This adapter reads the frame headers as the bytes
//! pass and refuses a frame whose announced length is over the limit as soon as its header
//! arrives (the session then closes 1009). It also times a frame from its first byte: one
//! that trickles in for longer than the deadline is refused (close 1008). And it hands the
//! decoder at most one complete frame per poll, so what actix buffers stays within a frame.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use actix_http::error::PayloadError;
use actix_web::web::Bytes;
use futures_util::Stream;
use tokio::time::{Instant, Sleep};

/// Why the guard ended a connection's input, for the session to pick its close code.
#[derive(Debug, Default)]
pub struct FrameWatch(AtomicU8);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameVerdict {
    Fine,
    /// A frame announced more than the limit.
    TooLarge,
    /// A frame did not arrive in full within the deadline.
    TooSlow,
}

impl FrameWatch {
    pub fn verdict(&self) -> FrameVerdict {
        match self.0.load(Ordering::Relaxed) {
            1 => FrameVerdict::TooLarge,
            2 => FrameVerdict::TooSlow,
            _ => FrameVerdict::Fine,
        }
    }

    fn set(&self, v: FrameVerdict) {
        self.0.store(
            match v {
                FrameVerdict::Fine => 0,
                FrameVerdict::TooLarge => 1,
                FrameVerdict::TooSlow => 2,
            },
            Ordering::Relaxed,
        );
    }
}

/// The longest a WebSocket frame header can be: 2 bytes, an 8-byte length, a 4-byte mask.
const MAX_HEADER: usize = 14;

pub struct FrameLimit<S> {
    inner: S,
    max_payload: u64,
    deadline: Duration,
    watch: Arc<FrameWatch>,
    /// Bytes read past the end of the frame last passed on.
    rest: Option<Bytes>,
    header: [u8; MAX_HEADER],
    header_len: usize,
    /// Payload bytes of the current frame still to come.
    remaining: u64,
    /// Runs while a frame is incomplete.
    timer: Option<Pin<Box<Sleep>>>,
    armed: bool,
    /// A frame was just passed on whole: let the decoder take it before reading on.
    pause: bool,
    done: bool,
}

enum Scan {
    /// The chunk ends inside a frame (or exactly at its end: `true`).
    Whole(bool),
    /// A frame ends at this offset, before the chunk does.
    FrameEnd(usize),
    TooLarge,
}

impl<S> FrameLimit<S> {
    pub fn new(inner: S, max_payload: usize, deadline: Duration, watch: Arc<FrameWatch>) -> Self {
        FrameLimit {
            inner,
            max_payload: max_payload as u64,
            deadline,
            watch,
            rest: None,
            header: [0; MAX_HEADER],
            header_len: 0,
            remaining: 0,
            timer: None,
            armed: false,
            pause: false,
            done: false,
        }
    }

    fn arm(&mut self) {
        let at = Instant::now() + self.deadline;
        match self.timer.as_mut() {
            Some(timer) => timer.as_mut().reset(at),
            None => self.timer = Some(Box::pin(tokio::time::sleep_until(at))),
        }
        self.armed = true;
    }

    /// The full header's length, once its first two bytes are known.
    fn header_size(&self) -> Option<usize> {
        if self.header_len < 2 {
            return None;
        }
        let mask = if self.header[1] & 0x80 != 0 { 4 } else { 0 };
        let ext = match self.header[1] & 0x7F {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        Some(2 + ext + mask)
    }

    fn payload_len(&self) -> u64 {
        let h = &self.header;
        match h[1] & 0x7F {
            126 => u16::from_be_bytes([h[2], h[3]]) as u64,
            127 => u64::from_be_bytes([h[2], h[3], h[4], h[5], h[6], h[7], h[8], h[9]]),
            n => n as u64,
        }
    }

    fn scan(&mut self, chunk: &[u8]) -> Scan {
        let mut pos = 0;
        while pos < chunk.len() {
            if self.remaining > 0 {
                let take = self.remaining.min((chunk.len() - pos) as u64);
                self.remaining -= take;
                pos += take as usize;
                if self.remaining == 0 {
                    self.armed = false;
                    return self.frame_end(pos, chunk.len());
                }
                continue;
            }
            if self.header_len == 0 {
                self.arm();
            }
            self.header[self.header_len] = chunk[pos];
            self.header_len += 1;
            pos += 1;
            if self.header_size() == Some(self.header_len) {
                let len = self.payload_len();
                if len > self.max_payload {
                    return Scan::TooLarge;
                }
                self.header_len = 0;
                self.remaining = len;
                if len == 0 {
                    self.armed = false;
                    return self.frame_end(pos, chunk.len());
                }
            }
        }
        Scan::Whole(false)
    }

    fn frame_end(&self, pos: usize, len: usize) -> Scan {
        if pos == len {
            Scan::Whole(true)
        } else {
            Scan::FrameEnd(pos)
        }
    }

    fn refuse(&mut self, verdict: FrameVerdict) -> Poll<Option<Result<Bytes, PayloadError>>> {
        self.done = true;
        self.rest = None;
        self.watch.set(verdict);
        let error = match verdict {
            FrameVerdict::TooSlow => PayloadError::Io(io::Error::new(
                io::ErrorKind::TimedOut,
                "a frame took too long to arrive",
            )),
            _ => PayloadError::Overflow,
        };
        Poll::Ready(Some(Err(error)))
    }
}

impl<S> Stream for FrameLimit<S>
where
    S: Stream<Item = Result<Bytes, PayloadError>> + Unpin,
{
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        if this.pause {
            this.pause = false;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let chunk = match this.rest.take() {
            Some(chunk) => chunk,
            None => match Pin::new(&mut this.inner).poll_next(cx) {
                Poll::Ready(Some(Ok(chunk))) => chunk,
                Poll::Pending => {
                    if this.armed {
                        if let Some(timer) = this.timer.as_mut() {
                            if timer.as_mut().poll(cx).is_ready() {
                                return this.refuse(FrameVerdict::TooSlow);
                            }
                        }
                    }
                    return Poll::Pending;
                }
                other => return other,
            },
        };
        match this.scan(&chunk) {
            Scan::Whole(frame_ended) => {
                this.pause = frame_ended;
                Poll::Ready(Some(Ok(chunk)))
            }
            Scan::FrameEnd(at) => {
                this.rest = Some(chunk.slice(at..));
                this.pause = true;
                Poll::Ready(Some(Ok(chunk.slice(..at))))
            }
            Scan::TooLarge => this.refuse(FrameVerdict::TooLarge),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    fn header(len: u64) -> Vec<u8> {
        let mut h = vec![0x81];
        if len < 126 {
            h.push(0x80 | len as u8);
        } else if len <= u16::MAX as u64 {
            h.push(0x80 | 126);
            h.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            h.push(0x80 | 127);
            h.extend_from_slice(&len.to_be_bytes());
        }
        h.extend_from_slice(&[1, 2, 3, 4]);
        h
    }

    fn guard(
        chunks: Vec<Vec<u8>>,
        max: usize,
    ) -> (
        impl Stream<Item = Result<Bytes, PayloadError>>,
        Arc<FrameWatch>,
    ) {
        let watch = Arc::new(FrameWatch::default());
        let inner = futures_util::stream::iter(chunks.into_iter().map(|c| Ok(Bytes::from(c))));
        (
            FrameLimit::new(inner, max, Duration::from_secs(5), watch.clone()),
            watch,
        )
    }

    async fn collect(s: impl Stream<Item = Result<Bytes, PayloadError>>) -> (Vec<Vec<u8>>, bool) {
        let items: Vec<_> = s.collect().await;
        let failed = items.iter().any(|i| i.is_err());
        (
            items
                .into_iter()
                .filter_map(Result::ok)
                .map(|b| b.to_vec())
                .collect(),
            failed,
        )
    }

    #[tokio::test]
    async fn refuses_at_the_header() {
        for len in [65_537u64, 1 << 32, 1 << 62, (1 << 63) - 1, u64::MAX] {
            let (s, watch) = guard(vec![header(len), vec![0; 1000]], 65_536);
            let (passed, failed) = collect(s).await;
            assert!(failed, "length {len} passed");
            assert!(
                passed.is_empty(),
                "bytes of an oversized frame were passed on"
            );
            assert_eq!(watch.verdict(), FrameVerdict::TooLarge);
        }
    }

    #[tokio::test]
    async fn passes_frames_one_at_a_time_split_anywhere() {
        let mut wire = Vec::new();
        for len in [0u64, 5, 125, 126, 70_000 - 14] {
            wire.extend(header(len));
            wire.extend(std::iter::repeat_n(7u8, len as usize));
        }
        for split in [1usize, 3, 7, 100, 65_536, wire.len()] {
            let chunks: Vec<Vec<u8>> = wire.chunks(split).map(<[u8]>::to_vec).collect();
            let (s, watch) = guard(chunks, 70_000);
            let (passed, failed) = collect(s).await;
            assert!(!failed);
            assert_eq!(passed.concat(), wire, "bytes changed with split {split}");
            assert_eq!(watch.verdict(), FrameVerdict::Fine);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn times_out_a_trickling_frame() {
        let watch = Arc::new(FrameWatch::default());
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Result<Bytes, PayloadError>>();
        let inner = tokio_stream_from(rx);
        let mut s = FrameLimit::new(inner, 65_536, Duration::from_secs(10), watch.clone());
        tx.send(Ok(Bytes::from(header(60_000)))).ok();
        assert!(s.next().await.is_some_and(|r| r.is_ok()));
        let next = tokio::time::timeout(Duration::from_secs(11), s.next()).await;
        assert!(
            matches!(next, Ok(Some(Err(_)))),
            "a frame trickling for 10 s was not refused"
        );
        assert_eq!(watch.verdict(), FrameVerdict::TooSlow);
    }

    fn tokio_stream_from(
        mut rx: tokio::sync::mpsc::UnboundedReceiver<Result<Bytes, PayloadError>>,
    ) -> impl Stream<Item = Result<Bytes, PayloadError>> + Unpin {
        Box::pin(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)))
    }
}
