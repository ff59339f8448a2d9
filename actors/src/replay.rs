//! A user's recent run events, kept for resume (PROTOCOL.md §5) and read by run records and
//! sessions that fell behind: bounded by count, by bytes and by age.
//!
//! The buffer always holds a contiguous run of `seq`s ending at the user's `last_seq`, so a
//! range is a slice and a gap is detected by comparing with the oldest kept `seq`. Appending
//! never evicts on its own: the registry first asks [`ReplayBuffer::evictions_for`] what an
//! append would push out, so that it can hold an agent back instead of dropping an event a
//! reading session still needs.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::event::Frame;

/// Events after `after_seq` are no longer (or were never) here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gap {
    /// The oldest `seq` still kept; `last_seq + 1` when none is.
    pub oldest_seq: u64,
    pub last_seq: u64,
}

/// What a kept event costs beyond its text: the slot, the frame's fields and the shared
/// allocation's header. An estimate, so that many tiny events are not free.
pub const ENTRY_OVERHEAD: usize = 96;

/// Bytes an event costs the budget.
pub fn cost(frame: &Frame) -> usize {
    frame.text.len() + ENTRY_OVERHEAD
}

pub struct ReplayBuffer {
    entries: VecDeque<(Instant, Frame)>,
    capacity: usize,
    max_bytes: usize,
    max_age: Duration,
    bytes: usize,
}

impl ReplayBuffer {
    pub fn new(capacity: usize, max_bytes: usize, max_age: Duration) -> Self {
        ReplayBuffer {
            entries: VecDeque::new(),
            capacity: capacity.max(1),
            max_bytes,
            max_age,
            bytes: 0,
        }
    }

    /// How many of the oldest events an append of `frame` would evict to stay within the
    /// count and byte bounds. The newest event is always kept, even alone over the budget.
    pub fn evictions_for(&self, frame: &Frame) -> usize {
        let by_count = (self.entries.len() + 1).saturating_sub(self.capacity);
        let mut bytes = self.bytes + cost(frame);
        let mut n = 0;
        for (_, f) in self.entries.iter() {
            if n >= by_count && bytes <= self.max_bytes {
                break;
            }
            bytes -= cost(f);
            n += 1;
        }
        n
    }

    /// Keeps `frame`, whose `seq` must follow the last one kept, evicting what
    /// [`evictions_for`](Self::evictions_for) said. Returns the bytes evicted and added.
    pub fn push(&mut self, frame: Frame, now: Instant) -> Change {
        debug_assert!(self
            .entries
            .back()
            .is_none_or(|(_, f)| f.seq + 1 == frame.seq));
        let n = self.evictions_for(&frame);
        let mut change = self.evict_oldest(n);
        change.added = cost(&frame);
        self.bytes += change.added;
        self.entries.push_back((now, frame));
        change
    }

    /// Puts back older events in front of the oldest kept one (a shared log's history read
    /// back for a resume): `frames` in `seq` order, the last one right before the oldest kept
    /// (or, with nothing kept, ending at the user's `last_seq`). Stops, keeping the newest
    /// of them, where the count or byte bound would be passed; evicts nothing. `now` dates
    /// them for the age bound.
    pub fn prepend(&mut self, frames: Vec<Frame>, now: Instant) -> Change {
        let mut change = Change::default();
        for frame in frames.into_iter().rev() {
            if self
                .oldest_seq()
                .is_some_and(|oldest| frame.seq + 1 != oldest)
            {
                break;
            }
            let c = cost(&frame);
            if self.entries.len() >= self.capacity || self.bytes + c > self.max_bytes {
                break;
            }
            self.bytes += c;
            change.added += c;
            self.entries.push_front((now, frame));
        }
        change
    }

    /// Forgets the `n` oldest events.
    pub fn evict_oldest(&mut self, n: usize) -> Change {
        let mut change = Change::default();
        for _ in 0..n {
            let Some((_, f)) = self.entries.pop_front() else {
                break;
            };
            let c = cost(&f);
            self.bytes -= c;
            change.evicted += 1;
            change.evicted_bytes += c;
        }
        change
    }

    /// Forgets everything.
    pub fn clear(&mut self) -> Change {
        self.evict_oldest(self.entries.len())
    }

    /// Forgets events older than the maximum age.
    pub fn prune(&mut self, now: Instant) -> Change {
        let old = self
            .entries
            .iter()
            .take_while(|(at, _)| now.saturating_duration_since(*at) > self.max_age)
            .count();
        self.evict_oldest(old)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes held, as the budget counts them.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The oldest `seq` kept.
    pub fn oldest_seq(&self) -> Option<u64> {
        self.entries.front().map(|(_, f)| f.seq)
    }

    /// The frame with this `seq`, if still kept.
    pub fn get(&self, seq: u64) -> Option<&Frame> {
        let oldest = self.oldest_seq()?;
        let index = seq.checked_sub(oldest)?;
        self.entries.get(index as usize).map(|(_, f)| f)
    }

    /// The kept frames with `from <= seq <= to`, in order.
    pub fn between(&self, from: u64, to: u64) -> impl Iterator<Item = &Frame> {
        let oldest = self.oldest_seq().unwrap_or(u64::MAX);
        let start = from.saturating_sub(oldest) as usize;
        let end = (to.saturating_add(1).saturating_sub(oldest) as usize).min(self.entries.len());
        self.entries.range(start.min(end)..end).map(|(_, f)| f)
    }

    /// What a client that cannot be served is told, given the user's `last_seq`.
    pub fn gap(&self, last_seq: u64) -> Gap {
        Gap {
            oldest_seq: self.oldest_seq().unwrap_or(last_seq + 1),
            last_seq,
        }
    }

    /// Whether the events with `after < seq <= upto` can all be served, given the user's
    /// `last_seq`. A resume point past `last_seq` is a gap: the history it came from is not
    /// this one.
    pub fn check(&self, after: u64, upto: u64, last_seq: u64) -> Result<(), Gap> {
        if after > last_seq {
            return Err(self.gap(last_seq));
        }
        if after >= upto.min(last_seq) {
            return Ok(());
        }
        match self.oldest_seq() {
            Some(oldest) if oldest <= after + 1 => Ok(()),
            _ => Err(self.gap(last_seq)),
        }
    }
}

/// What a change to a buffer did to its size.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    pub evicted: usize,
    pub evicted_bytes: usize,
    pub added: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytestring::ByteString;

    fn frame(seq: u64) -> Frame {
        sized(seq, 2)
    }

    fn sized(seq: u64, len: usize) -> Frame {
        Frame {
            seq,
            kind: "agent_thinking",
            run_id: "run_t".into(),
            text: ByteString::from("x".repeat(len)),
            emitted: std::time::SystemTime::now(),
        }
    }

    fn seqs<'a>(frames: impl Iterator<Item = &'a Frame>) -> Vec<u64> {
        frames.map(|f| f.seq).collect()
    }

    fn filled(n: u64, capacity: usize) -> ReplayBuffer {
        let mut b = ReplayBuffer::new(capacity, usize::MAX, Duration::from_secs(60));
        let now = Instant::now();
        for s in 1..=n {
            b.push(frame(s), now);
        }
        b
    }

    #[test]
    fn prepend_puts_back_what_fits_right_before_the_oldest() {
        let mut b = ReplayBuffer::new(6, usize::MAX, Duration::from_secs(60));
        let now = Instant::now();
        for s in 8..=10 {
            b.push(frame(s), now);
        }
        // Not adjacent to 8: nothing goes in.
        assert_eq!(b.prepend(vec![frame(3), frame(4), frame(5)], now).added, 0);
        // Adjacent: the newest that fit (the count bound is 6) go in, in order.
        let change = b.prepend((2..=7).map(frame).collect(), now);
        assert_eq!(change.added, 3 * cost(&frame(1)));
        assert_eq!(seqs(b.between(0, 100)), (5..=10).collect::<Vec<_>>());
        assert_eq!(b.bytes(), 6 * cost(&frame(1)));
    }

    #[test]
    fn between_is_inclusive_and_clamped() {
        let b = filled(10, 100);
        assert_eq!(seqs(b.between(4, 6)), vec![4, 5, 6]);
        assert_eq!(seqs(b.between(0, 100)), (1..=10).collect::<Vec<_>>());
        assert!(seqs(b.between(7, 5)).is_empty());
        assert!(seqs(b.between(11, 20)).is_empty());
    }

    #[test]
    fn capacity_drops_the_oldest_and_reports_a_gap() {
        let b = filled(10, 4);
        assert_eq!(b.len(), 4);
        assert_eq!(b.check(6, 10, 10), Ok(()));
        assert_eq!(
            b.check(5, 10, 10),
            Err(Gap {
                oldest_seq: 7,
                last_seq: 10
            })
        );
        // Nothing missing when the client already has everything, even with a short buffer.
        assert_eq!(b.check(10, 10, 10), Ok(()));
        assert_eq!(b.bytes(), 4 * cost(&frame(1)));
    }

    #[test]
    fn bytes_bound_evicts_and_keeps_the_newest() {
        let per = cost(&sized(1, 100));
        let mut b = ReplayBuffer::new(1000, 3 * per, Duration::from_secs(60));
        let now = Instant::now();
        for s in 1..=3 {
            assert_eq!(b.evictions_for(&sized(s, 100)), 0);
            b.push(sized(s, 100), now);
        }
        assert_eq!(b.evictions_for(&sized(4, 100)), 1);
        assert_eq!(b.evictions_for(&sized(4, 100 + per)), 2);
        let change = b.push(sized(4, 100), now);
        assert_eq!((change.evicted, change.evicted_bytes), (1, per));
        assert_eq!(b.oldest_seq(), Some(2));
        // One event over the whole budget still stays, alone.
        b.push(sized(5, 10 * per), now);
        assert_eq!(seqs(b.between(0, 10)), vec![5]);
        assert_eq!(b.bytes(), cost(&sized(5, 10 * per)));
    }

    #[test]
    fn get_finds_kept_frames_only() {
        let b = filled(10, 4);
        assert_eq!(b.get(7).map(|f| f.seq), Some(7));
        assert_eq!(b.get(10).map(|f| f.seq), Some(10));
        assert!(b.get(6).is_none());
        assert!(b.get(11).is_none());
    }

    #[test]
    fn ahead_of_history_is_a_gap() {
        let b = filled(3, 10);
        assert_eq!(
            b.check(4, 3, 3),
            Err(Gap {
                oldest_seq: 1,
                last_seq: 3
            })
        );
        let empty = ReplayBuffer::new(10, usize::MAX, Duration::from_secs(1));
        assert_eq!(
            empty.check(1, 0, 0),
            Err(Gap {
                oldest_seq: 1,
                last_seq: 0
            })
        );
        assert_eq!(empty.check(0, 0, 0), Ok(()));
    }

    #[test]
    fn age_prunes_old_events() {
        let mut b = ReplayBuffer::new(100, usize::MAX, Duration::from_millis(50));
        let t0 = Instant::now();
        b.push(frame(1), t0);
        b.push(frame(2), t0);
        b.push(frame(3), t0 + Duration::from_millis(40));
        assert_eq!(b.prune(t0 + Duration::from_millis(60)).evicted, 2);
        assert_eq!(b.check(2, 3, 3), Ok(()));
        assert_eq!(
            b.check(0, 3, 3),
            Err(Gap {
                oldest_seq: 3,
                last_seq: 3
            })
        );
        b.prune(t0 + Duration::from_millis(100));
        assert!(b.is_empty());
        assert_eq!(b.bytes(), 0);
        assert_eq!(
            b.check(2, 3, 3),
            Err(Gap {
                oldest_seq: 4,
                last_seq: 3
            })
        );
    }
}
