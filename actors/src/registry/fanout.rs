//! Fan-out: the registry's link to one session (WebSocket or SSE) and how frames reach it.
//!
//! A session is offered frames with `try_send` on its bounded mailbox, never a wait. While
//! it keeps up it gets each event live, as the registry appends it. When its mailbox is full
//! it falls *behind*: it then gets no live frames, but a cursor feeds it from the user's
//! replay log, in order, as it makes room. A replay (at connect, or a `resume` command) is the
//! same cursor started further back, so no replay is ever copied whole into a connection:
//! what a connection holds is its mailbox's worth of shared frames.
//!
//! A session with frames waiting that writes nothing for [`STALL_LIMIT`] is not reading; the
//! registry cuts it off. While it is behind it *pins* the log from the `seq` it needs next:
//! the registry holds agents back rather than evict what a reading session still needs.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;

use crate::event::Frame;
use crate::metrics::Metrics;
use crate::replay::ReplayBuffer;
use crate::router::{Push, ResetHandle, ResumedNote, SessionShared};

/// A session with frames waiting that writes nothing for this long is not reading.
pub const STALL_LIMIT: Duration = Duration::from_secs(1);

/// Bytes of events queued for one session (its mailbox) before it counts as full, whatever
/// `--outbound-queue` says in frames: what a stalled connection pins beyond the log.
pub const QUEUE_BYTES: u64 = 1024 * 1024;

/// What became of a frame offered to a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    Sent,
    Full,
    Gone,
}

/// What a session's feed from the log came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pump {
    /// Nothing waits for it any more.
    Done,
    /// Its mailbox is full; more later.
    Waiting,
    /// Its mailbox is closed: the session has gone.
    Gone,
    /// It needs a frame the log no longer holds.
    FellOut,
}

/// A session being fed from the log, in `seq` order, instead of live.
#[derive(Debug)]
struct Cursor {
    next_seq: u64,
    /// A connect-time replay's `resumed`, due before the first frame past `to_seq`.
    resumed: Option<ResumedNote>,
}

/// A `resume` command's replay of the events from before the session joined.
#[derive(Debug)]
struct Backfill {
    next_seq: u64,
    /// Runs to `note.to_seq`, then `note` is sent.
    note: ResumedNote,
}

pub struct SessionLink {
    pub key: u64,
    push: Recipient<Push>,
    pub shared: Arc<SessionShared>,
    pub reset: Option<ResetHandle>,
    /// Events offered to it: with its `written` count, the depth of its queue.
    pub sent: u64,
    /// Their bytes.
    sent_bytes: u64,
    behind: Option<Cursor>,
    backfill: Option<Backfill>,
    /// Its `written` count when last looked at, and since when that has not moved while it
    /// had frames waiting.
    written_seen: u64,
    stalled_since: Instant,
}

impl SessionLink {
    pub fn new(
        key: u64,
        push: Recipient<Push>,
        shared: Arc<SessionShared>,
        reset: Option<ResetHandle>,
        now: Instant,
    ) -> Self {
        SessionLink {
            key,
            push,
            shared,
            reset,
            sent: 0,
            sent_bytes: 0,
            behind: None,
            backfill: None,
            written_seen: 0,
            stalled_since: now,
        }
    }

    pub fn connected(&self) -> bool {
        self.push.connected()
    }

    /// Frames wait for it in the log.
    pub fn has_work(&self) -> bool {
        self.behind.is_some() || self.backfill.is_some()
    }

    /// The oldest `seq` it still needs from the log, if it needs any.
    pub fn needs_from(&self) -> Option<u64> {
        let behind = self.behind.as_ref().map(|c| c.next_seq);
        let backfill = self.backfill.as_ref().map(|b| b.next_seq);
        match (behind, backfill) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Starts the stall clock when it gets its first waiting frame.
    fn begin_work(&mut self, now: Instant) {
        if !self.has_work() {
            self.written_seen = self.shared.written.load(Ordering::Relaxed);
            self.stalled_since = now;
        }
    }

    fn offer(&mut self, push: Push) -> Offer {
        let bytes = match &push {
            Push::Event(frame) => {
                let queued = self
                    .sent_bytes
                    .saturating_sub(self.shared.written_bytes.load(Ordering::Relaxed));
                if queued >= QUEUE_BYTES {
                    return Offer::Full;
                }
                Some(frame.text.len() as u64)
            }
            _ => None,
        };
        match self.push.try_send(push) {
            Ok(()) => {
                if let Some(bytes) = bytes {
                    self.sent += 1;
                    self.sent_bytes += bytes;
                }
                Offer::Sent
            }
            Err(SendError::Full(_)) => Offer::Full,
            Err(SendError::Closed(_)) => Offer::Gone,
        }
    }

    /// Offers a frame just appended to the log. A session fed from the log gets it from
    /// there in turn (a live frame now would jump its queue): `Sent` means it is taken care
    /// of. A full mailbox makes the session fall behind at this frame.
    pub fn offer_live(&mut self, frame: &Frame, now: Instant) -> (Offer, bool) {
        if self.behind.is_some() {
            return (Offer::Sent, false);
        }
        match self.offer(Push::Event(frame.clone())) {
            Offer::Full => {
                self.begin_work(now);
                self.behind = Some(Cursor {
                    next_seq: frame.seq,
                    resumed: None,
                });
                (Offer::Full, false)
            }
            offer => (offer, offer == Offer::Sent),
        }
    }

    /// A connect-time resume: the session is fed `note.from_seq..` from the log, with
    /// `resumed` after `note.to_seq`, and then goes on live.
    pub fn start_replay(&mut self, note: ResumedNote, now: Instant) {
        self.begin_work(now);
        self.behind = Some(Cursor {
            next_seq: note.from_seq,
            resumed: Some(note),
        });
    }

    /// A `resume` command: `note.from_seq..=note.to_seq` from the log alongside live frames,
    /// then `resumed`. False if one is already under way.
    pub fn start_backfill(&mut self, note: ResumedNote, now: Instant) -> bool {
        if self.backfill.is_some() {
            return false;
        }
        self.begin_work(now);
        self.backfill = Some(Backfill {
            next_seq: note.from_seq,
            note,
        });
        true
    }

    /// Offers it what waits for it in the log, as far as its mailbox takes.
    pub fn pump(&mut self, log: &ReplayBuffer, last_seq: u64, metrics: &Metrics) -> Pump {
        if let Some(mut cursor) = self.behind.take() {
            match self.pump_cursor(&mut cursor, log, last_seq, metrics) {
                Pump::Done => {}
                other => {
                    self.behind = Some(cursor);
                    return other;
                }
            }
        }
        if let Some(mut backfill) = self.backfill.take() {
            match self.pump_backfill(&mut backfill, log, metrics) {
                Pump::Done => {}
                other => {
                    self.backfill = Some(backfill);
                    return other;
                }
            }
        }
        Pump::Done
    }

    fn pump_cursor(
        &mut self,
        cursor: &mut Cursor,
        log: &ReplayBuffer,
        last_seq: u64,
        metrics: &Metrics,
    ) -> Pump {
        loop {
            if let Some(note) = cursor
                .resumed
                .as_ref()
                .filter(|n| cursor.next_seq > n.to_seq)
            {
                if let Err(pump) = self.feed(Push::Resumed(note.clone()), metrics) {
                    return pump;
                }
                cursor.resumed = None;
            }
            if cursor.next_seq > last_seq {
                return Pump::Done;
            }
            if let Err(pump) = self.feed_seq(log, cursor.next_seq, metrics) {
                return pump;
            }
            cursor.next_seq += 1;
        }
    }

    fn pump_backfill(
        &mut self,
        backfill: &mut Backfill,
        log: &ReplayBuffer,
        metrics: &Metrics,
    ) -> Pump {
        while backfill.next_seq <= backfill.note.to_seq {
            if let Err(pump) = self.feed_seq(log, backfill.next_seq, metrics) {
                return pump;
            }
            backfill.next_seq += 1;
        }
        match self.feed(Push::Resumed(backfill.note.clone()), metrics) {
            Ok(()) => Pump::Done,
            Err(pump) => pump,
        }
    }

    /// Offers the log's frame `seq`.
    fn feed_seq(&mut self, log: &ReplayBuffer, seq: u64, metrics: &Metrics) -> Result<(), Pump> {
        let frame = log.get(seq).ok_or(Pump::FellOut)?;
        self.feed(Push::Event(frame.clone()), metrics)
    }

    /// Offers a message from the log's feed: `Err` says why the feed stops here.
    fn feed(&mut self, push: Push, metrics: &Metrics) -> Result<(), Pump> {
        let kind = match &push {
            Push::Event(frame) => Some(frame.kind),
            _ => None,
        };
        match self.offer(push) {
            Offer::Sent => {
                if let Some(kind) = kind {
                    metrics.delivered(kind).inc();
                }
                Ok(())
            }
            Offer::Full => Err(Pump::Waiting),
            Offer::Gone => Err(Pump::Gone),
        }
    }

    /// With frames waiting, whether it has written nothing for [`STALL_LIMIT`].
    pub fn stalled(&mut self, now: Instant) -> bool {
        let written = self.shared.written.load(Ordering::Relaxed);
        if written != self.written_seen {
            self.written_seen = written;
            self.stalled_since = now;
            return false;
        }
        now.duration_since(self.stalled_since) > STALL_LIMIT
    }

    /// At a stop: everything still waiting for it, past the mailbox bound (nothing is lost
    /// at a stop), then `close`.
    pub fn flush_and_close(&mut self, log: &ReplayBuffer, last_seq: u64, close: Push) {
        if let Some(cursor) = self.behind.take() {
            for seq in cursor.next_seq..=last_seq {
                if let Some(note) = cursor.resumed.as_ref().filter(|n| n.to_seq + 1 == seq) {
                    self.push.do_send(Push::Resumed(note.clone()));
                }
                if let Some(frame) = log.get(seq) {
                    self.push.do_send(Push::Event(frame.clone()));
                }
            }
            if let Some(note) = cursor.resumed.filter(|n| n.to_seq >= last_seq) {
                self.push.do_send(Push::Resumed(note));
            }
        }
        if let Some(backfill) = self.backfill.take() {
            for frame in log.between(backfill.next_seq, backfill.note.to_seq) {
                self.push.do_send(Push::Event(frame.clone()));
            }
            self.push.do_send(Push::Resumed(backfill.note));
        }
        self.push.do_send(close);
    }

    /// Tells the session it has been cut off (it discards what is still queued) and to
    /// close; returns its reset handle.
    pub fn cut(self, close: Push) -> Option<ResetHandle> {
        self.shared.cut.store(true, Ordering::Relaxed);
        self.push.do_send(close);
        self.reset
    }
}
