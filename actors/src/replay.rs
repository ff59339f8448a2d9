//! A user's recent run events, kept for resume (PROTOCOL.md §5): bounded by count and by age.
//!
//! The buffer always holds a contiguous run of `seq`s ending at the user's `last_seq`, so a
//! range is a slice and a gap is detected by comparing with the oldest kept `seq`.

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

pub struct ReplayBuffer {
    entries: VecDeque<(Instant, Frame)>,
    capacity: usize,
    max_age: Duration,
}

impl ReplayBuffer {
    pub fn new(capacity: usize, max_age: Duration) -> Self {
        ReplayBuffer {
            entries: VecDeque::new(),
            capacity: capacity.max(1),
            max_age,
        }
    }

    /// Keeps `frame`, whose `seq` must follow the last one kept.
    pub fn push(&mut self, frame: Frame, now: Instant) {
        debug_assert!(self
            .entries
            .back()
            .is_none_or(|(_, f)| f.seq + 1 == frame.seq));
        if self.entries.len() == self.capacity {
            self.entries.pop_front();
        }
        self.entries.push_back((now, frame));
        self.prune(now);
    }

    /// Forgets events older than the maximum age.
    pub fn prune(&mut self, now: Instant) {
        while let Some((at, _)) = self.entries.front() {
            if now.saturating_duration_since(*at) > self.max_age {
                self.entries.pop_front();
            } else {
                break;
            }
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The frame with this `seq`, if still kept.
    pub fn get(&self, seq: u64) -> Option<&Frame> {
        let oldest = self.entries.front()?.1.seq;
        let index = seq.checked_sub(oldest)?;
        self.entries.get(index as usize).map(|(_, f)| f)
    }

    /// What a client that cannot be served is told, given the user's `last_seq`.
    pub fn gap(&self, last_seq: u64) -> Gap {
        let oldest_seq = self.entries.front().map_or(last_seq + 1, |(_, f)| f.seq);
        Gap {
            oldest_seq,
            last_seq,
        }
    }

    /// The events with `after < seq <= upto`, given the user's `last_seq`.
    pub fn range(&self, after: u64, upto: u64, last_seq: u64) -> Result<Vec<Frame>, Gap> {
        let oldest = self.entries.front().map(|(_, f)| f.seq);
        let gap = self.gap(last_seq);
        if after > last_seq {
            return Err(gap);
        }
        let upto = upto.min(last_seq);
        if after >= upto {
            return Ok(Vec::new());
        }
        match oldest {
            Some(oldest) if oldest <= after + 1 => {
                let start = (after + 1 - oldest) as usize;
                let end = (upto - oldest + 1) as usize;
                Ok(self
                    .entries
                    .range(start..end.min(self.entries.len()))
                    .map(|(_, f)| f.clone())
                    .collect())
            }
            _ => Err(gap),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytestring::ByteString;

    fn frame(seq: u64) -> Frame {
        Frame {
            seq,
            kind: "agent_thinking",
            text: ByteString::from(format!("e{seq}")),
            emitted: std::time::SystemTime::now(),
        }
    }

    fn seqs(frames: &[Frame]) -> Vec<u64> {
        frames.iter().map(|f| f.seq).collect()
    }

    fn filled(n: u64, capacity: usize) -> ReplayBuffer {
        let mut b = ReplayBuffer::new(capacity, Duration::from_secs(60));
        let now = Instant::now();
        for s in 1..=n {
            b.push(frame(s), now);
        }
        b
    }

    #[test]
    fn range_is_exclusive_below_inclusive_above() {
        let b = filled(10, 100);
        assert_eq!(seqs(&b.range(3, 6, 10).unwrap()), vec![4, 5, 6]);
        assert_eq!(
            seqs(&b.range(0, 10, 10).unwrap()),
            (1..=10).collect::<Vec<_>>()
        );
        assert!(b.range(10, 10, 10).unwrap().is_empty());
        assert!(b.range(7, 5, 10).unwrap().is_empty());
    }

    #[test]
    fn capacity_drops_the_oldest_and_reports_a_gap() {
        let b = filled(10, 4);
        assert_eq!(b.len(), 4);
        assert_eq!(seqs(&b.range(6, 10, 10).unwrap()), vec![7, 8, 9, 10]);
        assert_eq!(
            b.range(5, 10, 10).map(|f| seqs(&f)),
            Err(Gap {
                oldest_seq: 7,
                last_seq: 10
            })
        );
        // Nothing missing when the client already has everything, even with a short buffer.
        assert!(b.range(10, 10, 10).unwrap().is_empty());
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
            b.range(4, 3, 3).map(|f| seqs(&f)),
            Err(Gap {
                oldest_seq: 1,
                last_seq: 3
            })
        );
        let empty = ReplayBuffer::new(10, Duration::from_secs(1));
        assert_eq!(
            empty.range(1, 0, 0).map(|f| seqs(&f)),
            Err(Gap {
                oldest_seq: 1,
                last_seq: 0
            })
        );
        assert!(empty.range(0, 0, 0).unwrap().is_empty());
    }

    #[test]
    fn age_prunes_old_events() {
        let mut b = ReplayBuffer::new(100, Duration::from_millis(50));
        let t0 = Instant::now();
        b.push(frame(1), t0);
        b.push(frame(2), t0);
        b.push(frame(3), t0 + Duration::from_millis(40));
        b.prune(t0 + Duration::from_millis(60));
        assert_eq!(seqs(&b.range(2, 3, 3).unwrap()), vec![3]);
        assert_eq!(
            b.range(0, 3, 3).map(|f| seqs(&f)),
            Err(Gap {
                oldest_seq: 3,
                last_seq: 3
            })
        );
        b.prune(t0 + Duration::from_millis(100));
        assert!(b.is_empty());
        assert_eq!(
            b.range(2, 3, 3).map(|f| seqs(&f)),
            Err(Gap {
                oldest_seq: 4,
                last_seq: 3
            })
        );
    }
}
