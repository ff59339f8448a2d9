//! What the registry holds per user: the user's log (its window on the history), the
//! sessions it fans out to, the events held back for a reading tab, and the counts that
//! limits and forgetting go by.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use crate::emitter::EmitGate;
use crate::event::Frame;
use crate::metrics::Metrics;
use crate::rate::TokenBucket;
use crate::replay::Change;

use super::event_log::UserLog;
use super::fanout::{Offer, Pump, SessionLink};

pub struct UserEntry {
    pub log: UserLog,
    /// Events sequenced and encoded, waiting for room in the log.
    pub held: VecDeque<Frame>,
    pub gate: Arc<EmitGate>,
    pub sessions: Vec<SessionLink>,
    /// Sessions cut off as slow consumers that have not gone yet: they still count against
    /// the user's connection limit.
    pub cut: HashSet<u64>,
    /// Its runs on this node not yet ended.
    pub running: usize,
    pub inspecting: usize,
    /// Since when the user has had no session and no running run.
    pub idle_since: Option<Instant>,
    pub run_starts: TokenBucket,
    /// Its following of a shared log (Redis); unused without one.
    pub follow: super::shared::Following,
}

/// What appending a frame did.
pub struct Appended {
    pub change: Change,
    /// Sessions that got it live.
    pub delivered: u64,
    /// A session's mailbox was full: it is now fed from the log.
    pub fell_behind: bool,
}

impl UserEntry {
    pub fn new(log: UserLog, run_starts: TokenBucket) -> Self {
        UserEntry {
            log,
            held: VecDeque::new(),
            gate: Arc::default(),
            sessions: Vec::new(),
            cut: HashSet::new(),
            running: 0,
            inspecting: 0,
            idle_since: None,
            run_starts,
            follow: Default::default(),
        }
    }

    pub fn touch_idle(&mut self, now: Instant) {
        if self.sessions.is_empty() && self.cut.is_empty() && self.running == 0 {
            self.idle_since.get_or_insert(now);
        } else {
            self.idle_since = None;
        }
    }

    /// Whether `frame` can be appended without evicting an event a session still needs.
    pub fn has_room_for(&self, frame: &Frame) -> bool {
        let evict = self.log.frames.evictions_for(frame) as u64;
        if evict == 0 {
            return true;
        }
        let Some(oldest) = self.log.frames.oldest_seq() else {
            return true;
        };
        let needed = self
            .sessions
            .iter()
            .filter_map(SessionLink::needs_from)
            .min();
        needed.is_none_or(|needed| oldest + evict - 1 < needed)
    }

    /// Appends a frame to the log and offers it to every live session.
    pub fn append(&mut self, frame: Frame, now: Instant) -> Appended {
        self.log.last_seq = frame.seq;
        let change = self.log.frames.push(frame.clone(), now);
        let mut delivered = 0;
        let mut fell_behind = false;
        self.sessions
            .retain_mut(|s| match s.offer_live(&frame, now) {
                (Offer::Sent, counted) => {
                    delivered += counted as u64;
                    true
                }
                (Offer::Full, _) => {
                    fell_behind = true;
                    true
                }
                (Offer::Gone, _) => false,
            });
        Appended {
            change,
            delivered,
            fell_behind,
        }
    }

    /// Feeds the sessions that are behind from the log; returns those to cut off (not
    /// reading, or fallen out of the log).
    pub fn pump(&mut self, now: Instant, metrics: &Metrics) -> Vec<SessionLink> {
        let mut cut = Vec::new();
        let mut kept = Vec::with_capacity(self.sessions.len());
        for mut s in self.sessions.drain(..) {
            if !s.has_work() {
                kept.push(s);
                continue;
            }
            match s.pump(&self.log.frames, self.log.last_seq, metrics) {
                Pump::Done => kept.push(s),
                Pump::Gone => {}
                Pump::FellOut => cut.push(s),
                Pump::Waiting if s.stalled(now) => cut.push(s),
                Pump::Waiting => kept.push(s),
            }
        }
        self.sessions = kept;
        cut
    }

    pub fn has_work(&self) -> bool {
        self.sessions.iter().any(SessionLink::has_work)
    }

    /// Everything the sessions are owed, past the mailbox bound, then `close`.
    pub fn flush_and_close(&mut self, close: impl Fn() -> crate::router::Push) {
        for s in &mut self.sessions {
            s.flush_and_close(&self.log.frames, self.log.last_seq, close());
        }
    }
}
