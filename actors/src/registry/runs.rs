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

use serde_json::{json, Value};

use crate::event::{EventData, Frame, RunStatus};
use crate::ids::{RunId, UserId};
use crate::ledger::{Question, Refused, RunLedger};
use crate::publish::PublishedEvent;
use crate::published_run::PublishedRunActor;
use crate::router::{Emit, PublishRefused, RespondRefused};
use crate::run::{AgentRunActor, Cancel, CancelReason};

use super::event_log::UserLog;

/// A run whose actor has stopped is only taken for lost if its `agent_completed` has still
/// not been handled this long after: the actor sends it just before stopping, and a busy
/// mailbox can hold it for a while.
const LOST_RUN_GRACE: Duration = Duration::from_secs(5);

/// The actor a run lives in.
#[derive(Clone)]
pub enum RunActor {
    /// An agent of this server.
    Agent(Addr<AgentRunActor>),
    /// A run an agent outside the server publishes (section 11).
    Published(Addr<PublishedRunActor>),
}

impl RunActor {
    fn cancel(&self, reason: CancelReason) {
        match self {
            RunActor::Agent(a) => a.do_send(Cancel(reason)),
            RunActor::Published(a) => a.do_send(Cancel(reason)),
        }
    }

    fn connected(&self) -> bool {
        match self {
            RunActor::Agent(a) => a.connected(),
            RunActor::Published(a) => a.connected(),
        }
    }
}

/// What a published run has that others do not: who may publish to it, and how far.
pub struct Publication {
    /// The publisher that created it; `None` for a webhook agent's run, which only the token
    /// made for that run may publish to.
    pub owner: Option<Arc<str>>,
    /// The highest `n` accepted.
    pub last_n: u64,
}

/// Who is publishing: a publisher token's `sub`, and the one run it is limited to, if any.
#[derive(Debug, Clone, Copy)]
pub struct PublisherRef<'a> {
    pub name: &'a str,
    pub only_run: Option<&'a str>,
}

impl Publication {
    pub fn allows(&self, run_id: &str, who: PublisherRef<'_>) -> bool {
        match who.only_run {
            // A token for one run is the server's, made for a webhook agent's run alone.
            Some(run) => run == run_id && self.owner.is_none(),
            None => self.owner.as_deref() == Some(who.name),
        }
    }
}

/// A batch that was taken: the events to sequence (those it added), in order.
pub struct AdmittedBatch {
    pub user: UserId,
    pub thread_id: Option<Arc<str>>,
    pub events: Vec<EventData>,
    pub first_index: u64,
    pub last_n: u64,
    pub ended: Option<RunStatus>,
    pub actor: Option<Addr<PublishedRunActor>>,
}

pub struct RunRecord {
    pub user: UserId,
    pub agent: String,
    pub thread_id: Option<Arc<str>>,
    actor: RunActor,
    ledger: RunLedger,
    /// Set for a published run.
    pub publication: Option<Publication>,
    /// How the run will end, once it has been told to stop (before its end arrives).
    stopping: Option<RunStatus>,
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
        self.stopping = Some(crate::run::cancel_outcome(reason).0);
        self.actor.cancel(reason);
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
    /// Published runs not yet ended, by publisher (`--max-runs-per-publisher`).
    by_publisher: HashMap<Arc<str>, usize>,
}

/// One run fewer for its publisher, if it has one.
fn publisher_done(by_publisher: &mut HashMap<Arc<str>, usize>, run: &RunRecord) {
    if let Some(owner) = run.publication.as_ref().and_then(|p| p.owner.as_ref()) {
        if let Some(n) = by_publisher.get_mut(owner) {
            *n -= 1;
            if *n == 0 {
                by_publisher.remove(owner);
            }
        }
    }
}

impl RunTable {
    pub fn insert(
        &mut self,
        run_id: RunId,
        user: UserId,
        agent: String,
        thread_id: Option<String>,
        actor: RunActor,
        publication: Option<Publication>,
    ) {
        self.running += 1;
        if let Some(owner) = publication.as_ref().and_then(|p| p.owner.clone()) {
            *self.by_publisher.entry(owner).or_default() += 1;
        }
        self.runs.insert(
            run_id,
            RunRecord {
                user,
                agent,
                thread_id: thread_id.map(Arc::from),
                actor,
                ledger: RunLedger::default(),
                publication,
                stopping: None,
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

    /// Checks an event against its run (owner, ledger) and notes a start or an end. An end
    /// without `usage` (a published run's, made by the server) gets the run's tool calls.
    pub fn admit(&mut self, msg: &mut Emit, now: Instant) -> Result<Admitted, NotAdmitted> {
        let run = self
            .runs
            .get_mut(&msg.run_id)
            .ok_or(NotAdmitted::UnknownRun)?;
        if run.user != msg.user {
            return Err(NotAdmitted::WrongUser);
        }
        if let EventData::AgentCompleted {
            usage: usage @ Value::Null,
            ..
        } = &mut msg.data
        {
            *usage = json!({ "tool_calls": run.ledger.calls() });
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
            publisher_done(&mut self.by_publisher, run);
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

    /// Tells a published run's actor that its publisher is sending (its idle clock restarts).
    pub fn touch(&self, run_id: &str) {
        if let Some(RunActor::Published(actor)) = self.runs.get(run_id).map(|r| &r.actor) {
            actor.do_send(crate::published_run::Touched);
        }
    }

    /// Running published runs of `owner`.
    pub fn running_published(&self, owner: &str) -> usize {
        self.by_publisher.get(owner).copied().unwrap_or(0)
    }

    /// Checks a publisher's batch against its run: the publisher's own run, `n` without a
    /// hole or a repeat (what was accepted before is skipped), and every event the run's
    /// ledger would admit, all of them or none. `duration_ms` left out is filled in.
    pub fn publish(
        &mut self,
        run_id: &str,
        who: PublisherRef<'_>,
        batch: Vec<PublishedEvent>,
        now: Instant,
    ) -> Result<AdmittedBatch, PublishRefused> {
        let run = self
            .runs
            .get_mut(run_id)
            .filter(|r| {
                r.publication
                    .as_ref()
                    .is_some_and(|p| p.allows(run_id, who))
            })
            .ok_or(PublishRefused::NotFound)?;
        let last_n = run.publication.as_ref().map_or(0, |p| p.last_n);
        for (i, pair) in batch.windows(2).enumerate() {
            if pair[0].n.checked_add(1) != Some(pair[1].n) {
                let what = if pair[1].n == pair[0].n {
                    "repeats"
                } else {
                    "does not follow"
                };
                return Err(PublishRefused::Order {
                    index: i + 1,
                    message: format!(
                        "event {}: n {} {what} n {} of the event before it: n numbers the run's events 1, 2, 3, ... in order",
                        i + 1,
                        pair[1].n,
                        pair[0].n
                    ),
                });
            }
        }
        let (first_n, batch_last) = match (batch.first(), batch.last()) {
            (Some(first), Some(last)) => (first.n, last.n),
            _ => (last_n + 1, last_n),
        };
        if batch_last <= last_n {
            // All of it was accepted before: a retry.
            return Ok(AdmittedBatch {
                user: run.user.clone(),
                thread_id: run.thread_id.clone(),
                events: Vec::new(),
                first_index: run.admitted + 1,
                last_n,
                ended: None,
                actor: None,
            });
        }
        if let Some((_, _, status)) = run.ended {
            return Err(PublishRefused::Ended(status));
        }
        if let Some(status) = run.stopping {
            return Err(PublishRefused::Ended(status));
        }
        if first_n > last_n + 1 {
            return Err(PublishRefused::Order {
                index: 0,
                message: format!(
                    "event 0: n {first_n} leaves a hole: the run's last accepted n is {last_n}, so the next is {}",
                    last_n + 1
                ),
            });
        }
        let skip = (last_n + 1 - first_n) as usize;
        let mut ledger = run.ledger.clone();
        let mut events = Vec::with_capacity(batch.len() - skip);
        let since_start = SystemTime::now()
            .duration_since(run.started_at)
            .unwrap_or_default();
        for (index, mut event) in batch.into_iter().enumerate().skip(skip) {
            if event.untimed {
                match &mut event.data {
                    EventData::ToolCompleted {
                        tool_call_id,
                        duration_ms,
                        ..
                    } => {
                        *duration_ms = ledger
                            .call_started(tool_call_id)
                            .map_or(0, |at| now.saturating_duration_since(at).as_millis() as u64);
                    }
                    EventData::AgentCompleted { duration_ms, .. } => {
                        *duration_ms = since_start.as_millis() as u64;
                    }
                    _ => {}
                }
            }
            if let EventData::AgentCompleted {
                usage: usage @ Value::Null,
                ..
            } = &mut event.data
            {
                *usage = json!({ "tool_calls": ledger.calls() });
            }
            ledger
                .admit_published(&event.data, now)
                .map_err(|refused| PublishRefused::Rule {
                    index,
                    message: format!("event {index} (n {}): {}", event.n, refused.explain()),
                })?;
            events.push(event.data);
        }
        run.ledger = ledger;
        if let Some(p) = run.publication.as_mut() {
            p.last_n = batch_last;
        }
        let first_index = run.admitted + 1;
        run.admitted += events.len() as u64;
        let ended = match events.last() {
            Some(EventData::AgentCompleted { status, .. }) => Some(*status),
            _ => None,
        };
        if let Some(status) = ended {
            run.ended = Some((now, SystemTime::now(), status));
            self.running = self.running.saturating_sub(1);
            publisher_done(&mut self.by_publisher, run);
        }
        let actor = match &run.actor {
            RunActor::Published(a) => Some(a.clone()),
            RunActor::Agent(_) => None,
        };
        Ok(AdmittedBatch {
            user: run.user.clone(),
            thread_id: run.thread_id.clone(),
            events,
            first_index,
            last_n: batch_last,
            ended,
            actor,
        })
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
        match (run.ledger.question(interrupt_id), &run.actor) {
            (None, _) | (_, RunActor::Published(_)) => Err(RespondRefused::UnknownQuestion),
            (Some(Question::Settled), _) => Err(RespondRefused::Resolved),
            (Some(Question::Open), RunActor::Agent(actor)) => Ok(actor.clone()),
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
