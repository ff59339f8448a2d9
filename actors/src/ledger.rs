//! The rules of one run's event stream (PROTOCOL.md §2), enforced where events are
//! sequenced: `agent_started` first and once, `agent_completed` last and once, each
//! `tool_completed` after its `tool_executing` and exactly once, progress only while a call is
//! open, nothing after the end.
//!
//! Agents, tools and the run actor send events from different actors and threads; checking
//! here, in the one place that numbers them, makes the rules hold whatever the timing (a tool
//! that finishes after its run was cancelled is simply not reported). When the run ends with
//! calls still open, the ledger closes them with `tool_completed ok:false` first.

use std::time::Instant;

use serde_json::Value;

use crate::event::{ErrorBody, EventData, RunStatus};

#[derive(Debug, Default)]
pub struct RunLedger {
    started: bool,
    completed: bool,
    open_calls: Vec<(String, String, Instant)>,
}

/// Why an event was not delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    NotStarted,
    AlreadyStarted,
    Completed,
    DuplicateCall,
    CallNotOpen,
}

impl RunLedger {
    pub fn is_completed(&self) -> bool {
        self.completed
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
        match data {
            EventData::ToolExecuting {
                tool_call_id, tool, ..
            } => {
                if self.open_calls.iter().any(|(id, _, _)| id == tool_call_id) {
                    return Err(Refused::DuplicateCall);
                }
                self.open_calls
                    .push((tool_call_id.clone(), tool.clone(), now));
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
                return Ok(self
                    .open_calls
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
                        duration_ms: now.saturating_duration_since(since).as_millis() as u64,
                    })
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
        assert!(l.is_completed());
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
