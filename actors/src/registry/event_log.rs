//! The event log: where each user's run events get their `seq` and are kept for replay.
//!
//! [`EventLog`] is the seam between the registry and the store. [`MemoryLog`] is the
//! embedded default: it numbers an event the moment the registry hands it over, and what a
//! node keeps *is* the history. A shared log (Redis, PROTOCOL.md section 10) numbers events
//! in the store; its frames come back to the registry as messages, from this node's runs and
//! every other node's, and the [`UserLog`] a node keeps is its window on the history.
//!
//! Either way the window is bounded the same way: a count and an age per user, bytes per
//! user (`--replay-user-max-bytes`) and bytes over all users (`--replay-max-bytes`, idle
//! users' histories first). Run records and fan-out read frames from it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::event::{encode, EventData, Frame};
use crate::ids::{random_id, RunId, UserId};
use crate::metrics::Metrics;
use crate::replay::{Change, Gap, ReplayBuffer};

/// One user's history as this node holds it.
pub struct UserLog {
    /// Changes when the history is lost (`welcome.epoch`).
    pub epoch: Arc<str>,
    /// The newest `seq` in `frames` (what `welcome.last_seq` says): frames up to it are all
    /// here, or were here and have been evicted.
    pub last_seq: u64,
    /// The newest `seq` the memory log gave out: above `last_seq` while events are held.
    pub assigned_seq: u64,
    pub frames: ReplayBuffer,
}

impl UserLog {
    pub fn new(epoch: Arc<str>, last_seq: u64, budget: &LogBudget) -> Self {
        UserLog {
            epoch,
            last_seq,
            assigned_seq: last_seq,
            frames: ReplayBuffer::new(budget.capacity, budget.user_max_bytes, budget.max_age),
        }
    }

    /// Whether the events after `after_seq` up to `upto` can be replayed from here.
    pub fn check_resume(&self, after_seq: u64, upto: u64, epoch: Option<&str>) -> Result<(), Gap> {
        if epoch.is_some_and(|e| e != &*self.epoch) {
            return Err(self.frames.gap(self.last_seq));
        }
        self.frames.check(after_seq, upto, self.last_seq)
    }
}

/// How much history is kept.
#[derive(Debug, Clone)]
pub struct LogBudget {
    pub capacity: usize,
    pub max_age: Duration,
    pub user_max_bytes: usize,
    pub max_bytes: usize,
}

/// The store behind the users' logs.
pub trait EventLog {
    /// A fresh history for a user this node has no log for.
    fn open(&mut self, user: &UserId, budget: &LogBudget) -> UserLog;

    /// Numbers and encodes an admitted event. The memory log numbers it now and returns the
    /// frame, for the registry to append to `log`; a shared log queues it for its store, and
    /// the frame comes back as a message, like those of every other node.
    fn append(&mut self, user: &UserId, log: &mut UserLog, event: NewEvent<'_>) -> Appended;
}

/// An admitted event, not yet numbered nor encoded (each log encodes it as it needs).
pub struct NewEvent<'a> {
    pub run_id: &'a RunId,
    pub thread_id: Option<&'a str>,
    /// When it was emitted (its `ts`).
    pub at: SystemTime,
    pub data: &'a EventData,
    /// Its index in its run (1, 2, ...).
    pub index: u64,
}

/// What became of an event handed to the log.
pub enum Appended {
    /// Numbered here: the frame to append.
    Now(Frame),
    /// Queued for a shared store, with the bytes it holds meanwhile.
    Queued { bytes: usize },
}

/// The embedded log: the process is the store.
#[derive(Debug, Default)]
pub struct MemoryLog;

impl EventLog for MemoryLog {
    fn open(&mut self, _: &UserId, budget: &LogBudget) -> UserLog {
        // Random: an epoch tells nothing about how many histories the server holds.
        UserLog::new(random_id("", 16).into(), 0, budget)
    }

    fn append(&mut self, _: &UserId, log: &mut UserLog, event: NewEvent<'_>) -> Appended {
        log.assigned_seq += 1;
        Appended::Now(encode(
            log.assigned_seq,
            event.run_id,
            event.thread_id,
            event.at,
            event.data,
        ))
    }
}

/// The bytes all users' logs hold, against `--replay-max-bytes`.
#[derive(Debug, Default)]
pub struct LogBytes {
    pub total: usize,
}

impl LogBytes {
    /// Accounts for a change in one user's log.
    pub fn account(&mut self, change: Change, reason: &str, metrics: &Metrics) {
        self.total = self.total + change.added - change.evicted_bytes;
        if change.evicted > 0 {
            metrics
                .replay_evicted
                .with_label_values(&[reason])
                .inc_by(change.evicted as u64);
        }
    }

    /// Over `max_bytes`: idle users' histories go first, the longest idle first; then the
    /// oldest events of whoever holds the most (sessions that still needed them are cut off
    /// at their next feed and resume with `resume_gap`). `logs` gives each user's log and
    /// since when the user has been idle.
    pub fn enforce<'a>(
        &mut self,
        max_bytes: usize,
        appending: &UserId,
        logs: impl Iterator<Item = (&'a UserId, &'a mut UserLog, Option<Instant>)>,
        metrics: &Metrics,
    ) {
        // Down to 15/16 of the budget, so that a server at its budget does not scan every
        // user at every append.
        let max = max_bytes - max_bytes / 16;
        let mut logs: HashMap<&UserId, (&mut UserLog, Option<Instant>)> =
            logs.map(|(id, log, idle)| (id, (log, idle))).collect();
        let mut idle: Vec<(Instant, &UserId)> = logs
            .iter()
            .filter(|(id, (log, _))| **id != appending && !log.frames.is_empty())
            .filter_map(|(id, (_, since))| since.map(|since| (since, *id)))
            .collect();
        idle.sort();
        for (_, id) in idle {
            if self.total <= max {
                return;
            }
            if let Some((log, _)) = logs.get_mut(id) {
                let change = log.frames.clear();
                log::info!(
                    "replay budget: forgot {} events of idle user {id}",
                    change.evicted
                );
                self.account(change, "global_bytes", metrics);
            }
        }
        while self.total > max {
            let Some((log, _)) = logs
                .values_mut()
                .filter(|(log, _)| log.frames.len() > 1)
                .max_by_key(|(log, _)| log.frames.bytes())
            else {
                return;
            };
            let change = log.frames.evict_oldest(1);
            self.account(change, "global_bytes", metrics);
        }
    }
}
