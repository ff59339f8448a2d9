//! The emitter: the only way to put an event into a user's stream. Made by the registry for
//! one run, it carries that run's user and run id and nothing else, so code holding it (the
//! agent, the tools it calls) has no way to address another user.

use std::time::SystemTime;

use actix::prelude::*;

use crate::event::EventData;
use crate::ids::{RunId, UserId};
use crate::router::Emit;

#[derive(Clone)]
pub struct Emitter {
    user: UserId,
    run_id: RunId,
    sink: Recipient<Emit>,
}

impl Emitter {
    pub(crate) fn new(user: UserId, run_id: RunId, sink: Recipient<Emit>) -> Self {
        Emitter { user, run_id, sink }
    }

    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    pub fn user_id(&self) -> &str {
        &self.user
    }

    fn message(&self, data: EventData) -> Emit {
        Emit {
            user: self.user.clone(),
            run_id: self.run_id.clone(),
            at: SystemTime::now(),
            data,
        }
    }

    /// Emits an event, waiting while the registry's mailbox is full: a fast agent is slowed
    /// to the speed events can be routed instead of queueing without bound.
    pub async fn emit(&self, data: EventData) {
        match self.sink.try_send(self.message(data)) {
            Ok(()) => {}
            Err(SendError::Full(msg)) => {
                if self.sink.send(msg).await.is_err() {
                    log::warn!("run {}: event router gone, event dropped", self.run_id);
                }
            }
            Err(SendError::Closed(_)) => {
                log::warn!("run {}: event router gone, event dropped", self.run_id)
            }
        }
    }

    /// Emits without waiting, past the mailbox bound: for the few lifecycle events of a run
    /// (`agent_started`, `agent_completed`), which must never be lost or delayed by a full
    /// mailbox.
    pub(crate) fn emit_now(&self, data: EventData) {
        self.sink.do_send(self.message(data));
    }
}
