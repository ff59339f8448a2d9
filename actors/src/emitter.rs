//! The emitter: the only way to put an event into a user's stream. Made by the registry for
//! one run, it carries that run's user and run id and nothing else, so code holding it (the
//! agent, the tools it calls) has no way to address another user.
//!
//! It also carries its user's [`EmitGate`]: while a tab of the user that is still reading is
//! so far behind that one more event would push out of the replay log an event that tab has
//! not been sent yet, the registry closes the gate and the user's agents wait at their next
//! `emit` instead of outrunning the tab. Waiting costs a parked future, no thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use actix::prelude::*;
use tokio::sync::Notify;

use crate::event::EventData;
use crate::ids::{RunId, UserId};
use crate::router::Emit;

/// Holds a user's agents back while the registry cannot take their events without losing one
/// a reading tab still needs. Shared by the registry and every emitter of the user.
#[derive(Debug, Default)]
pub struct EmitGate {
    closed: AtomicBool,
    opened: Notify,
}

impl EmitGate {
    /// Makes emitters wait from their next event on.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }

    /// Lets waiting emitters go on.
    pub fn open(&self) {
        if self.closed.swap(false, Ordering::AcqRel) {
            self.opened.notify_waiters();
        }
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Resolves once the gate is open.
    pub async fn wait_open(&self) {
        loop {
            let opened = self.opened.notified();
            let mut opened = std::pin::pin!(opened);
            // Registered before the check, so an `open` in between is not missed.
            opened.as_mut().enable();
            if !self.is_closed() {
                return;
            }
            opened.await;
        }
    }
}

#[derive(Clone)]
pub struct Emitter {
    user: UserId,
    run_id: RunId,
    sink: Recipient<Emit>,
    gate: Arc<EmitGate>,
}

impl Emitter {
    pub(crate) fn new(
        user: UserId,
        run_id: RunId,
        sink: Recipient<Emit>,
        gate: Arc<EmitGate>,
    ) -> Self {
        Emitter {
            user,
            run_id,
            sink,
            gate,
        }
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

    /// Emits an event. Waits while the user's gate is closed (a reading tab is catching up),
    /// then while the registry's mailbox is full: a fast agent is slowed to the speed its
    /// events can be routed and read instead of queueing without bound or losing events.
    pub async fn emit(&self, data: EventData) {
        if self.gate.is_closed() {
            self.gate.wait_open().await;
        }
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

    /// Emits without waiting, past the mailbox bound and the gate: for the few lifecycle
    /// events of a run (`agent_started`, `agent_completed`), which must never be lost or
    /// delayed. The registry keeps them in order behind anything it is holding back.
    pub(crate) fn emit_now(&self, data: EventData) {
        self.sink.do_send(self.message(data));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn gate_holds_waiters_until_opened() {
        let gate = Arc::new(EmitGate::default());
        gate.wait_open().await; // open: no wait
        gate.close();
        let waiter = tokio::spawn({
            let gate = gate.clone();
            async move { gate.wait_open().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            !waiter.is_finished(),
            "a closed gate let an emitter through"
        );
        gate.open();
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("opening the gate released no one")
            .expect("waiter panicked");
    }
}
