//! The rules of one run's event stream (PROTOCOL.md §2), enforced where events are
//! sequenced: `agent_started` first and once, `agent_completed` last and once, each
//! `tool_completed` after its `tool_executing` and exactly once, progress only while a call is
//! open, nothing after the end.
//!
//! Agents, tools and the run actor send events from different actors and threads; checking
//! here, in the one place that numbers them, makes the rules hold whatever the timing (a tool
//! that finishes after its run was cancelled is simply not reported). When the run ends with
//! calls still open, the ledger closes them with `tool_completed ok:false` first.
//!
//! Questions to the user (§12) follow the same pattern: `input_requested` opens one,
//! `input_received` settles it, and a run that ends with one still open settles it first with
//! `input_received` `expired: true`. From the moment the run is cancelled, only its end (and
//! those closing events) gets through.

use std::time::Instant;

use serde_json::Value;

use crate::event::{ErrorBody, EventData, RunStatus};

#[derive(Debug, Default, Clone)]
pub struct RunLedger {
    started: bool,
    completed: bool,
    /// Set when the run was told to stop: nothing but its `agent_completed` is admitted.
    cancelling: bool,
    open_calls: Vec<(String, String, Instant)>,
    /// Every question the run asked, and whether it is still open.
    questions: Vec<(String, bool)>,
    /// Tool calls begun.
    calls: u64,
}

/// Where one of a run's questions stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Question {
    Open,
    Settled,
}

/// Why an event was not delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    NotStarted,
    AlreadyStarted,
    Completed,
    DuplicateCall,
    CallNotOpen,
    /// The run is being cancelled: only its end gets through.
    Cancelling,
    /// An `input_requested` with an `interrupt_id` the run already used.
    DuplicateQuestion,
    /// An `input_received` for a question that is not open.
    QuestionNotOpen,
    /// A publisher's `agent_completed` while a tool call is still open (section 11: the
    /// server closes open calls only for ends it makes itself).
    CallsOpen,
    /// A publisher's `tool_executing` while [`MAX_OPEN_CALLS`] calls are open.
    TooManyOpenCalls,
}

/// Most tool calls a published run may have open at once: each is kept (and looked up) until
/// its `tool_completed`, so a publisher that never completes them must be stopped somewhere.
pub const MAX_OPEN_CALLS: usize = 256;

impl Refused {
    /// What was wrong, for a person to fix (a publisher's 409).
    pub fn explain(self) -> &'static str {
        match self {
            Refused::NotStarted => "the run has not started",
            Refused::AlreadyStarted => "the run has already started",
            Refused::Completed => "the run has already ended: nothing comes after agent_completed",
            Refused::DuplicateCall => "a tool_executing with a tool_call_id that is already open",
            Refused::CallNotOpen => {
                "no open tool call with this tool_call_id: tool_progress and tool_completed come after its tool_executing, and tool_completed once"
            }
            Refused::Cancelling => "the run is being cancelled",
            Refused::DuplicateQuestion => "a question id the run already used",
            Refused::QuestionNotOpen => "no open question with this interrupt_id",
            Refused::CallsOpen => {
                "agent_completed while a tool call is open: send its tool_completed first"
            }
            Refused::TooManyOpenCalls => {
                "256 tool calls are open: complete some before starting more"
            }
        }
    }
}

impl RunLedger {
    /// The run was told to stop: from now on only its `agent_completed` is admitted.
    pub fn cancel(&mut self) {
        self.cancelling = true;
    }

    /// Tool calls the run has begun (its `usage.tool_calls`).
    pub fn calls(&self) -> u64 {
        self.calls
    }

    /// When the open call `tool_call_id` began.
    pub fn call_started(&self, tool_call_id: &str) -> Option<Instant> {
        self.open_calls
            .iter()
            .find(|(id, _, _)| id == tool_call_id)
            .map(|(_, _, at)| *at)
    }

    /// Checks an event of a published run (section 11): the same rules as [`admit`]
    /// (Self::admit), except that an `agent_completed` with a call still open is refused
    /// rather than closed for the publisher.
    pub fn admit_published(&mut self, data: &EventData, now: Instant) -> Result<(), Refused> {
        if matches!(data, EventData::AgentCompleted { .. })
            && !self.open_calls.is_empty()
            && !self.completed
        {
            return Err(Refused::CallsOpen);
        }
        if matches!(data, EventData::ToolExecuting { .. })
            && self.open_calls.len() >= MAX_OPEN_CALLS
        {
            return Err(Refused::TooManyOpenCalls);
        }
        self.admit(data, now).map(|_| ())
    }

    /// Whether the run asked `interrupt_id`, and if it is still open.
    pub fn question(&self, interrupt_id: &str) -> Option<Question> {
        self.questions
            .iter()
            .find(|(id, _)| id == interrupt_id)
            .map(|(_, open)| {
                if *open {
                    Question::Open
                } else {
                    Question::Settled
                }
            })
    }

    /// Checks `data` against the run's history. `Ok` holds the events to deliver first
    /// (closings of calls left open by `agent_completed`).
    pub fn admit(&mut self, data: &EventData, now: Instant) -> Result<Vec<EventData>, Refused> {
        if self.completed {
            return Err(Refused::Completed);
        }
        if let EventData::AgentStarted { .. } = data {
            if self.started {
                return Err(Refused::AlreadyStarted);
            }
            self.started = true;
            return Ok(Vec::new());
        }
        if !self.started {
            return Err(Refused::NotStarted);
        }
        // An answer the run's actor took before the cancel reached it settles its question:
        // the tab that answered was told so, and every tab must see it that way.
        let settles = matches!(data, EventData::InputReceived { interrupt_id, .. }
            if self.question(interrupt_id) == Some(Question::Open));
        if self.cancelling && !matches!(data, EventData::AgentCompleted { .. }) && !settles {
            return Err(Refused::Cancelling);
        }
        match data {
            EventData::ToolExecuting {
                tool_call_id, tool, ..
            } => {
                if self.open_calls.iter().any(|(id, _, _)| id == tool_call_id) {
                    return Err(Refused::DuplicateCall);
                }
                self.open_calls
                    .push((tool_call_id.clone(), tool.clone(), now));
                self.calls += 1;
            }
            EventData::ToolProgress { tool_call_id, .. } => {
                if !self.open_calls.iter().any(|(id, _, _)| id == tool_call_id) {
                    return Err(Refused::CallNotOpen);
                }
            }
            EventData::ToolCompleted { tool_call_id, .. } => {
                let pos = self
                    .open_calls
                    .iter()
                    .position(|(id, _, _)| id == tool_call_id);
                match pos {
                    Some(i) => {
                        self.open_calls.remove(i);
                    }
                    None => return Err(Refused::CallNotOpen),
                }
            }
            EventData::InputRequested {
                interrupt_id,
                tool_call_id,
                ..
            } => {
                if self.question(interrupt_id).is_some() {
                    return Err(Refused::DuplicateQuestion);
                }
                // An approval comes before its call's `tool_executing`.
                if let Some(call) = tool_call_id {
                    if self.open_calls.iter().any(|(id, _, _)| id == call) {
                        return Err(Refused::DuplicateCall);
                    }
                }
                self.questions.push((interrupt_id.clone(), true));
            }
            EventData::InputReceived { interrupt_id, .. } => {
                match self.questions.iter_mut().find(|(id, _)| id == interrupt_id) {
                    Some((_, open)) if *open => *open = false,
                    _ => return Err(Refused::QuestionNotOpen),
                }
            }
            EventData::AgentCompleted { status, error, .. } => {
                self.completed = true;
                let code = match (status, error) {
                    (RunStatus::TimedOut, _) => "timed_out".to_string(),
                    (RunStatus::Cancelled, Some(e)) => e.code.clone(),
                    (RunStatus::Cancelled, None) | (RunStatus::Succeeded, _) => {
                        "cancelled".to_string()
                    }
                    (RunStatus::Failed, Some(e)) => e.code.clone(),
                    (RunStatus::Failed, None) => "agent_failed".to_string(),
                };
                // Open questions are settled first: expired, as no answer can come any more.
                let expired = self
                    .questions
                    .iter_mut()
                    .filter(|(_, open)| *open)
                    .map(|(id, open)| {
                        *open = false;
                        EventData::InputReceived {
                            interrupt_id: id.clone(),
                            response: Value::Null,
                            expired: true,
                        }
                    })
                    .collect::<Vec<_>>();
                return Ok(expired
                    .into_iter()
                    .chain(
                        self.open_calls
                            .drain(..)
                            .map(|(tool_call_id, tool, since)| EventData::ToolCompleted {
                                tool_call_id,
                                tool,
                                ok: false,
                                result: Value::Null,
                                error: Some(ErrorBody::new(
                                    code.clone(),
                                    format!(
                                        "the run ended ({}) before the tool call finished",
                                        status.as_str()
                                    ),
                                )),
                                duration_ms: now.saturating_duration_since(since).as_millis()
                                    as u64,
                            }),
                    )
                    .collect());
            }
            EventData::AgentStarted { .. }
            | EventData::AgentThinking { .. }
            | EventData::PartialResult { .. } => {}
        }
        Ok(Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn started() -> EventData {
        EventData::AgentStarted {
            agent: "a".into(),
            input: json!(null),
        }
    }
    fn think() -> EventData {
        EventData::AgentThinking { text: "t".into() }
    }
    fn exec(id: &str) -> EventData {
        EventData::ToolExecuting {
            tool_call_id: id.into(),
            tool: "sleep".into(),
            args: json!({}),
        }
    }
    fn progress(id: &str) -> EventData {
        EventData::ToolProgress {
            tool_call_id: id.into(),
            tool: "sleep".into(),
            message: "m".into(),
            fraction: None,
        }
    }
    fn done(id: &str) -> EventData {
        EventData::ToolCompleted {
            tool_call_id: id.into(),
            tool: "sleep".into(),
            ok: true,
            result: json!(1),
            error: None,
            duration_ms: 1,
        }
    }
    fn end(status: RunStatus, error: Option<ErrorBody>) -> EventData {
        EventData::AgentCompleted {
            status,
            result: json!(null),
            error,
            duration_ms: 1,
            usage: json!({}),
        }
    }

    #[test]
    fn a_well_formed_run_passes() {
        let mut l = RunLedger::default();
        let now = Instant::now();
        for e in [
            started(),
            think(),
            exec("tc_1"),
            progress("tc_1"),
            done("tc_1"),
        ] {
            assert_eq!(l.admit(&e, now), Ok(vec![]));
        }
        assert_eq!(l.admit(&end(RunStatus::Succeeded, None), now), Ok(vec![]));
        assert!(l.completed);
    }

    #[test]
    fn order_rules_are_enforced() {
        let mut l = RunLedger::default();
        let now = Instant::now();
        assert_eq!(l.admit(&think(), now), Err(Refused::NotStarted));
        l.admit(&started(), now).unwrap();
        assert_eq!(l.admit(&started(), now), Err(Refused::AlreadyStarted));
        assert_eq!(l.admit(&done("tc_9"), now), Err(Refused::CallNotOpen));
        assert_eq!(l.admit(&progress("tc_9"), now), Err(Refused::CallNotOpen));
        l.admit(&exec("tc_1"), now).unwrap();
        assert_eq!(l.admit(&exec("tc_1"), now), Err(Refused::DuplicateCall));
        l.admit(&done("tc_1"), now).unwrap();
        assert_eq!(l.admit(&done("tc_1"), now), Err(Refused::CallNotOpen));
    }

    #[test]
    fn the_end_closes_open_calls_and_nothing_follows() {
        let mut l = RunLedger::default();
        let now = Instant::now();
        l.admit(&started(), now).unwrap();
        l.admit(&exec("tc_1"), now).unwrap();
        l.admit(&exec("tc_2"), now).unwrap();
        let closing = l
            .admit(
                &end(
                    RunStatus::Cancelled,
                    Some(ErrorBody::new("shutdown", "bye")),
                ),
                now,
            )
            .unwrap();
        assert_eq!(closing.len(), 2);
        for (e, id) in closing.iter().zip(["tc_1", "tc_2"]) {
            match e {
                EventData::ToolCompleted {
                    tool_call_id,
                    ok,
                    error,
                    ..
                } => {
                    assert_eq!(tool_call_id, id);
                    assert!(!ok);
                    assert_eq!(error.as_ref().unwrap().code, "shutdown");
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(l.admit(&done("tc_1"), now), Err(Refused::Completed));
        assert_eq!(l.admit(&think(), now), Err(Refused::Completed));
        assert_eq!(
            l.admit(&end(RunStatus::Succeeded, None), now),
            Err(Refused::Completed)
        );
    }

    fn ask(id: &str, call: Option<&str>) -> EventData {
        EventData::InputRequested {
            interrupt_id: id.into(),
            kind: crate::event::InterruptKind::Input,
            message: "?".into(),
            tool_call_id: call.map(str::to_string),
            tool: None,
            args: None,
            schema: None,
            expires_at: "2026-01-01T00:00:00.000000Z".into(),
        }
    }
    fn answered(id: &str) -> EventData {
        EventData::InputReceived {
            interrupt_id: id.into(),
            response: json!(1),
            expired: false,
        }
    }

    #[test]
    fn a_question_is_asked_once_and_settled_once() {
        let mut l = RunLedger::default();
        let now = Instant::now();
        l.admit(&started(), now).unwrap();
        assert_eq!(
            l.admit(&answered("in_1"), now),
            Err(Refused::QuestionNotOpen)
        );
        assert_eq!(l.question("in_1"), None);
        l.admit(&ask("in_1", None), now).unwrap();
        assert_eq!(l.question("in_1"), Some(Question::Open));
        assert_eq!(
            l.admit(&ask("in_1", None), now),
            Err(Refused::DuplicateQuestion)
        );
        l.admit(&answered("in_1"), now).unwrap();
        assert_eq!(l.question("in_1"), Some(Question::Settled));
        assert_eq!(
            l.admit(&answered("in_1"), now),
            Err(Refused::QuestionNotOpen)
        );
        assert_eq!(
            l.admit(&ask("in_1", None), now),
            Err(Refused::DuplicateQuestion)
        );
    }

    #[test]
    fn an_approval_comes_before_its_call() {
        let mut l = RunLedger::default();
        let now = Instant::now();
        l.admit(&started(), now).unwrap();
        l.admit(&exec("tc_1"), now).unwrap();
        assert_eq!(
            l.admit(&ask("in_1", Some("tc_1")), now),
            Err(Refused::DuplicateCall)
        );
        l.admit(&ask("in_2", Some("tc_2")), now).unwrap();
    }

    #[test]
    fn the_end_expires_open_questions_before_closing_calls() {
        let mut l = RunLedger::default();
        let now = Instant::now();
        l.admit(&started(), now).unwrap();
        l.admit(&exec("tc_1"), now).unwrap();
        l.admit(&ask("in_1", None), now).unwrap();
        l.admit(&ask("in_2", None), now).unwrap();
        l.admit(&answered("in_2"), now).unwrap();
        let closing = l.admit(&end(RunStatus::Cancelled, None), now).unwrap();
        assert_eq!(closing.len(), 2, "{closing:?}");
        assert_eq!(
            closing[0],
            EventData::InputReceived {
                interrupt_id: "in_1".into(),
                response: Value::Null,
                expired: true
            }
        );
        assert!(
            matches!(&closing[1], EventData::ToolCompleted { tool_call_id, ok: false, .. } if tool_call_id == "tc_1")
        );
    }

    #[test]
    fn an_answer_taken_before_the_cancel_still_settles_its_question() {
        let mut l = RunLedger::default();
        let now = Instant::now();
        l.admit(&started(), now).unwrap();
        l.admit(&ask("in_1", None), now).unwrap();
        l.cancel();
        l.admit(&answered("in_1"), now).unwrap();
        assert_eq!(l.admit(&answered("in_1"), now), Err(Refused::Cancelling));
        let closing = l.admit(&end(RunStatus::Cancelled, None), now).unwrap();
        assert!(
            closing.is_empty(),
            "no expiry for an answered question: {closing:?}"
        );
    }

    #[test]
    fn a_publisher_cannot_keep_calls_open_without_bound() {
        let mut l = RunLedger::default();
        let now = Instant::now();
        l.admit(&started(), now).unwrap();
        for i in 0..MAX_OPEN_CALLS {
            l.admit_published(&exec(&format!("c{i}")), now).unwrap();
        }
        assert_eq!(
            l.admit_published(&exec("one-more"), now),
            Err(Refused::TooManyOpenCalls)
        );
        l.admit_published(&done("c0"), now).unwrap();
        l.admit_published(&exec("one-more"), now).unwrap();
    }

    #[test]
    fn after_a_cancel_only_the_end_gets_through() {
        let mut l = RunLedger::default();
        let now = Instant::now();
        l.admit(&started(), now).unwrap();
        l.admit(&exec("tc_1"), now).unwrap();
        l.cancel();
        for e in [
            think(),
            progress("tc_1"),
            done("tc_1"),
            ask("in_1", None),
            exec("tc_2"),
        ] {
            assert_eq!(l.admit(&e, now), Err(Refused::Cancelling), "{e:?}");
        }
        let closing = l.admit(&end(RunStatus::Cancelled, None), now).unwrap();
        assert_eq!(closing.len(), 1);
    }

    #[test]
    fn a_published_end_with_an_open_call_is_refused() {
        let mut l = RunLedger::default();
        let now = Instant::now();
        l.admit(&started(), now).unwrap();
        l.admit_published(&exec("tc_1"), now).unwrap();
        assert!(l.call_started("tc_1").is_some());
        assert_eq!(
            l.admit_published(&end(RunStatus::Succeeded, None), now),
            Err(Refused::CallsOpen)
        );
        assert!(!l.completed, "a refused end changes nothing");
        l.admit_published(&done("tc_1"), now).unwrap();
        l.admit_published(&end(RunStatus::Succeeded, None), now)
            .unwrap();
        assert_eq!(l.calls(), 1);
        assert_eq!(l.admit_published(&think(), now), Err(Refused::Completed));
    }

    #[test]
    fn timeout_closes_calls_as_timed_out() {
        let mut l = RunLedger::default();
        let now = Instant::now();
        l.admit(&started(), now).unwrap();
        l.admit(&exec("tc_1"), now).unwrap();
        let closing = l
            .admit(
                &end(RunStatus::TimedOut, Some(ErrorBody::new("timed_out", "x"))),
                now,
            )
            .unwrap();
        assert!(
            matches!(&closing[0], EventData::ToolCompleted { error: Some(e), .. } if e.code == "timed_out")
        );
    }
}
