//! Runs published by agents outside the server (PROTOCOL.md section 11): starting one for a
//! publisher or a webhook agent, taking a batch of its events, and showing it to its
//! publisher.
//!
//! A published run is a [`PublishedRunActor`] like any run's actor; what differs is where its
//! events come from. A batch is checked whole against the run's ledger by
//! [`RunTable::publish`](super::runs::RunTable::publish) and then sequenced event by event
//! exactly as an `Emit` is, in one handler, so nothing of another run comes between them and
//! nothing of a refused batch reaches a tab.

use std::time::{Instant, SystemTime};

use actix::prelude::*;
use serde_json::json;

use super::runs::PublisherRef;
use super::{CheckedStart, ConnectionRegistry};
use crate::ids::{new_run_id, RunId, UserId};
use crate::published_run::{Ended, Touched, WebhookCall};
use crate::router::*;

impl ConnectionRegistry {
    /// The call that starts a webhook agent's run: the run, its input, where to publish and
    /// a publisher token for this run alone, valid as long as the run can last.
    pub(super) fn webhook_call(&self, run_id: &RunId, msg: &StartRun, url: String) -> WebhookCall {
        let webhooks = &self.settings.webhooks;
        let base = webhooks.base_url.get().map_or("", String::as_str);
        let valid_for = self.settings.run_timeout + self.settings.publish_idle;
        let token = webhooks
            .mint
            .as_ref()
            .map(|mint| mint(run_id, valid_for))
            .unwrap_or_default();
        WebhookCall {
            url,
            body: json!({
                "run_id": &**run_id,
                "user": &*msg.user,
                "agent": msg.agent,
                "input": msg.input,
                "thread_id": msg.thread_id,
                "events_url": format!("{base}/v1/publish/runs/{run_id}/events"),
                "token": token,
            }),
        }
    }

    /// Whether `user`'s events are being held back for a tab that is catching up: a
    /// publisher is then asked to retry (an agent in the process waits at its gate instead).
    fn held_back(&self, user: &UserId) -> bool {
        self.users
            .get(user)
            .is_some_and(|entry| entry.gate.is_closed())
            || self.shared.as_ref().is_some_and(|s| s.is_congested())
    }
}

impl Handler<StartPublished> for ConnectionRegistry {
    type Result = ResponseActFuture<Self, Result<RunId, StartRefused>>;

    fn handle(&mut self, msg: StartPublished, ctx: &mut Context<Self>) -> Self::Result {
        if self.shutting_down {
            return Box::pin(actix::fut::ready(Err(StartRefused::ShuttingDown)));
        }
        let limit = self.settings.max_runs_per_publisher;
        if self.runs.running_published(&msg.publisher) >= limit {
            return Box::pin(actix::fut::ready(Err(StartRefused::TooManyPublished(
                limit,
            ))));
        }
        let checked = CheckedStart::Published {
            owner: Some(msg.publisher.into()),
            webhook: None,
        };
        let start = StartRun {
            user: msg.user,
            agent: msg.agent,
            input: msg.input,
            thread_id: msg.thread_id,
        };
        if self.shared.is_some() {
            return self.claim_shared(start, checked);
        }
        let started = self
            .claim_locally(&start.user)
            .map(|()| self.launch(new_run_id(), start, checked, ctx));
        Box::pin(actix::fut::ready(started))
    }
}

impl Handler<Publish> for ConnectionRegistry {
    type Result = ResponseActFuture<Self, Result<BatchAccepted, PublishRefused>>;

    fn handle(&mut self, msg: Publish, ctx: &mut Context<Self>) -> Self::Result {
        if self.shared.is_some() && self.runs.get(&msg.run_id).is_none() {
            // Maybe another node's run.
            return self.publish_shared(msg);
        }
        Box::pin(actix::fut::ready(self.publish(msg, ctx)))
    }
}

impl ConnectionRegistry {
    /// A batch of one of this node's published runs: checked whole, then sequenced.
    pub(super) fn publish(
        &mut self,
        msg: Publish,
        ctx: &mut Context<Self>,
    ) -> Result<BatchAccepted, PublishRefused> {
        let who = PublisherRef {
            name: &msg.publisher,
            only_run: msg.only_run.as_deref(),
        };
        let Some((run_id, record)) = self.runs.get(&msg.run_id) else {
            return Err(PublishRefused::NotFound);
        };
        // Whose it is first: nothing else of another publisher's run is told.
        if !record
            .publication
            .as_ref()
            .is_some_and(|p| p.allows(run_id, who))
        {
            return Err(PublishRefused::NotFound);
        }
        let (run_id, user) = (run_id.clone(), record.user.clone());
        if !msg.events.is_empty() && record.ended.is_none() && self.held_back(&user) {
            // The publisher is there, retrying: that is not idleness.
            self.runs.touch(&run_id);
            return Err(PublishRefused::Busy);
        }
        let now = Instant::now();
        let batch = self.runs.publish(&run_id, who, msg.events, now)?;
        let at = SystemTime::now();
        for (index, data) in (batch.first_index..).zip(&batch.events) {
            self.sequence(
                &batch.user,
                &run_id,
                batch.thread_id.as_deref(),
                at,
                data,
                index,
                ctx,
            );
        }
        if let Some(actor) = &batch.actor {
            match batch.ended {
                Some(_) => actor.do_send(Ended),
                None => actor.do_send(Touched),
            }
        }
        if let Some(status) = batch.ended {
            self.run_ended(&batch.user, &run_id, status, now);
        }
        Ok(BatchAccepted {
            accepted: batch.events.len(),
            last_n: batch.last_n,
        })
    }
}

impl Handler<InspectPublished> for ConnectionRegistry {
    type Result = ResponseActFuture<Self, Result<(RunView, u64), InspectRefused>>;

    fn handle(&mut self, msg: InspectPublished, ctx: &mut Context<Self>) -> Self::Result {
        let who = PublisherRef {
            name: &msg.publisher,
            only_run: msg.only_run.as_deref(),
        };
        let found = self.runs.get(&msg.run_id).and_then(|(_, record)| {
            let publication = record.publication.as_ref()?;
            publication
                .allows(&msg.run_id, who)
                .then(|| (record.user.clone(), publication.last_n))
        });
        let Some((user, last_n)) = found else {
            if self.shared.is_some() && self.runs.get(&msg.run_id).is_none() {
                return self.inspect_published_shared(msg);
            }
            return Box::pin(actix::fut::ready(Err(InspectRefused::NotFound)));
        };
        let ask = InspectRun {
            user,
            run_id: msg.run_id,
        };
        if self.shared.is_some() {
            return Box::pin(
                self.inspect_shared(ask, ctx)
                    .map(move |view, _, _| view.map(|view| (view, last_n))),
            );
        }
        Box::pin(actix::fut::ready(
            self.inspect(ask, ctx).map(|view| (view, last_n)),
        ))
    }
}
