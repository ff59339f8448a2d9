//! The run table: every run this node started, its owner, its ledger (which events it may
//! still emit), how it ended, and where its events are in the owner's log.
//!
//! Records hold no events of their own: `GET /v1/runs/{id}` reads them from the user's log
//! between the run's first and latest `seq`. Ended runs are forgotten after the replay TTL;
//! a run whose actor stopped without ending is ended for it (`sweep`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use actix::prelude::*;

use crate::event::{EventData, Frame, RunStatus};
use crate::ids::{RunId, UserId};
use crate::ledger::{Question, Refused, RunLedger};
use crate::router::{Emit, RespondRefused};
use crate::run::{AgentRunActor, Cancel, CancelReason};

use super::event_log::UserLog;

/// A run whose actor has stopped is only taken for lost if its `agent_completed` has still
/// not been handled this long after: the actor sends it just before stopping, and a busy
/// mailbox can hold it for a while.
const LOST_RUN_GRACE: Duration = Duration::from_secs(5);

pub struct RunRecord {
    pub user: UserId,
    pub agent: String,
    pub thread_id: Option<Arc<str>>,
    actor: Addr<AgentRunActor>,
    ledger: RunLedger,
    pub started_at: SystemTime,
    /// When and how it ended.
    pub ended: Option<(Instant, SystemTime, RunStatus)>,
    /// Its first and latest `seq`: its events are the frames of this run between them in the
    /// user's log.
    pub seqs: Option<(u64, u64)>,
    /// Since when its actor has been seen stopped while the run had not ended.
    stopped_since: Option<Instant>,
    /// Events admitted so far: each gets the next index (a shared log skips a retried one).
    admitted: u64,
}

impl RunRecord {
    /// Tells the run's actor to end; from now on its ledger lets only the end through.
    fn stop(&mut self, reason: CancelReason) {
        self.ledger.cancel();
        self.actor.do_send(Cancel(reason));
    }
}

/// Why an event was not admitted.
#[derive(Debug)]
pub enum NotAdmitted {
    UnknownRun,
    /// The emitter is not the run's owner's.
    WrongUser,
    Ledger(Refused),
}

/// An admitted event: what to sequence, in order.
pub struct Admitted {
    /// Events the ledger adds first (`tool_completed` for calls still open at the end).
    pub closing: Vec<EventData>,
    pub thread_id: Option<Arc<str>>,
    /// Set when the event ends the run.
    pub ended: Option<RunStatus>,
    /// The index in its run of the first event to sequence (the others follow on).
    pub first_index: u64,
}

#[derive(Default)]
pub struct RunTable {
    runs: HashMap<RunId, RunRecord>,
    /// Runs not yet ended.
    pub running: usize,
}

impl RunTable {
    pub fn insert(
        &mut self,
        run_id: RunId,
        user: UserId,
        agent: String,
        thread_id: Option<String>,
        actor: Addr<AgentRunActor>,
    ) {
        self.running += 1;
        self.runs.insert(
            run_id,
            RunRecord {
                user,
                agent,
                thread_id: thread_id.map(Arc::from),
                actor,
                ledger: RunLedger::default(),
                started_at: SystemTime::now(),
                ended: None,
                seqs: None,
                stopped_since: None,
                admitted: 0,
            },
        );
    }

    /// The runs not yet ended, and their users.
    pub fn running(&self) -> Vec<(UserId, RunId)> {
        self.runs
            .iter()
            .filter(|(_, r)| r.ended.is_none())
            .map(|(id, r)| (r.user.clone(), id.clone()))
            .collect()
    }

    pub fn get(&self, run_id: &str) -> Option<(&RunId, &RunRecord)> {
        self.runs.get_key_value(run_id)
    }

    /// `user`'s latest-started run of `agent` in `thread_id` that has not ended.
    pub fn running_in_thread(
        &self,
        user: &UserId,
        thread_id: &str,
        agent: &str,
    ) -> Option<(&RunId, &RunRecord)> {
        self.runs
            .iter()
            .filter(|(_, r)| {
                r.ended.is_none()
                    && r.user == *user
                    && r.agent == agent
                    && r.thread_id.as_deref() == Some(thread_id)
            })
            .max_by_key(|(_, r)| r.started_at)
    }

    /// Checks an event against its run (owner, ledger) and notes a start or an end.
    pub fn admit(&mut self, msg: &Emit, now: Instant) -> Result<Admitted, NotAdmitted> {
        let run = self
            .runs
            .get_mut(&msg.run_id)
            .ok_or(NotAdmitted::UnknownRun)?;
        if run.user != msg.user {
            return Err(NotAdmitted::WrongUser);
        }
        let closing = run
            .ledger
            .admit(&msg.data, now)
            .map_err(NotAdmitted::Ledger)?;
        let ended = match &msg.data {
            EventData::AgentCompleted { status, .. } => Some(*status),
            _ => None,
        };
        if let Some(status) = ended {
            run.ended = Some((now, msg.at, status));
            self.running = self.running.saturating_sub(1);
        }
        if let EventData::AgentStarted { .. } = msg.data {
            // The run's start is its first event, not when the registry got round to noting it.
            run.started_at = msg.at;
        }
        let first_index = run.admitted + 1;
        run.admitted += closing.len() as u64 + 1;
        Ok(Admitted {
            closing,
            thread_id: run.thread_id.clone(),
            ended,
            first_index,
        })
    }

    /// Notes that one of the run's events got `seq`.
    pub fn note_seq(&mut self, run_id: &str, seq: u64) {
        if let Some(run) = self.runs.get_mut(run_id) {
            let first = run.seqs.map_or(seq, |(first, _)| first);
            run.seqs = Some((first, seq));
        }
    }

    /// Cancels one of `user`'s runs; `None` if it has no such run.
    pub fn cancel(&mut self, user: &UserId, run_id: &str) -> Option<()> {
        let run = self.runs.get_mut(run_id).filter(|run| run.user == *user)?;
        if run.ended.is_none() {
            log::debug!("run {run_id} of user {user}: cancelled by its user");
            run.stop(CancelReason::Requested);
        }
        Some(())
    }

    /// Stops a run of this node whoever asks (another node, which checked the owner).
    pub fn stop(&mut self, run_id: &str, reason: CancelReason) -> bool {
        match self.runs.get_mut(run_id) {
            Some(run) if run.ended.is_none() => {
                run.stop(reason);
                true
            }
            Some(_) => true,
            None => false,
        }
    }

    pub fn cancel_running(&mut self, reason: CancelReason) {
        for run in self.runs.values_mut().filter(|r| r.ended.is_none()) {
            run.stop(reason);
        }
    }

    /// Where an answer to one of `user`'s run's questions goes: the run's actor, which settles
    /// it, when the question is still open.
    pub fn question(
        &self,
        user: &UserId,
        run_id: &str,
        interrupt_id: &str,
    ) -> Result<Addr<AgentRunActor>, RespondRefused> {
        let run = self
            .runs
            .get(run_id)
            .filter(|run| run.user == *user)
            .ok_or(RespondRefused::NotFound)?;
        match run.ledger.question(interrupt_id) {
            None => Err(RespondRefused::UnknownQuestion),
            Some(Question::Settled) => Err(RespondRefused::Resolved),
            Some(Question::Open) => Ok(run.actor.clone()),
        }
    }

    /// Forgets runs ended more than `ttl` ago; returns the runs whose actor stopped without
    /// ending them, for the registry to end.
    pub fn sweep(&mut self, now: Instant, ttl: Duration) -> Vec<(RunId, UserId)> {
        self.runs.retain(|_, r| {
            r.ended
                .is_none_or(|(at, _, _)| now.duration_since(at) < ttl)
        });
        let mut vanished = Vec::new();
        for (id, r) in self.runs.iter_mut() {
            if r.ended.is_some() || r.actor.connected() {
                continue;
            }
            let since = *r.stopped_since.get_or_insert(now);
            if now.duration_since(since) >= LOST_RUN_GRACE {
                vanished.push((id.clone(), r.user.clone()));
            }
        }
        vanished
    }
}

/// A run's events as `log` still holds them, and whether older ones are gone.
pub fn events_of(
    run_id: &RunId,
    seqs: Option<(u64, u64)>,
    log: Option<&UserLog>,
) -> (Vec<Frame>, bool) {
    match (log, seqs) {
        (Some(log), Some((first, last))) => {
            let events: Vec<Frame> = log
                .frames
                .between(first, last)
                .filter(|f| f.run_id == *run_id)
                .cloned()
                .collect();
            let kept_from = log.frames.oldest_seq().unwrap_or(u64::MAX);
            (events, kept_from > first)
        }
        (None, Some(_)) => (Vec::new(), true),
        (_, None) => (Vec::new(), false),
    }
}
