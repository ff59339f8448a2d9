//! `PublishedRunActor`: one short-lived actor per run that an agent outside the server
//! publishes (PROTOCOL.md section 11), the twin of [`AgentRunActor`](crate::run::AgentRunActor)
//! for code that is not in this process. Started by the registry (which sequences the run's
//! `agent_started` itself, before the run's creator is answered, so that a first batch cannot
//! come before it), bound to its user by its [`Emitter`], it owns the run's clock:
//!
//! - the run timeout (`--run-timeout-ms`) and the idle timeout (`--publish-idle-ms`, restarted
//!   by every accepted batch: [`Touched`]) end the run `timed_out`;
//! - a cancel (the user, or the server stopping) ends it `cancelled`;
//! - for a webhook agent, it calls the agent's URL, and a call that fails ends it `failed`
//!   `webhook_failed`.
//!
//! Whichever comes first, it emits the run's `agent_completed` and stops; the registry's ledger
//! closes whatever the publisher left open first. The publisher's own events do not pass
//! through it: the registry checks each batch against the run's ledger and sequences it whole,
//! and when the publisher's `agent_completed` ends the run the actor is told ([`Ended`]) and
//! stops without a word.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use actix::prelude::*;
use serde_json::Value;

use crate::emitter::Emitter;
use crate::event::{ErrorBody, EventData, RunStatus};
use crate::run::Cancel;

/// How long a webhook agent's URL has to answer the call that starts its run.
pub const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(5);

/// Makes a webhook agent's publisher token for one run, valid for so long.
pub type MintRunToken = Arc<dyn Fn(&str, Duration) -> String + Send + Sync>;

/// Webhook agents (`--webhook-agent NAME=URL`): users start them like the server's own, and
/// the server calls their URL to run them.
#[derive(Clone, Default)]
pub struct WebhookAgents {
    /// URL by agent name.
    pub urls: HashMap<String, String>,
    pub mint: Option<MintRunToken>,
    /// This server's base URL as webhook agents reach it (`--public-url`, else the address it
    /// is bound to, set once bound), for the `events_url` they publish to.
    pub base_url: Arc<OnceLock<String>>,
}

impl std::fmt::Debug for WebhookAgents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookAgents")
            .field("urls", &self.urls)
            .field("base_url", &self.base_url.get())
            .finish()
    }
}

/// The call that tells a webhook agent to run: `body` POSTed as JSON to `url`.
#[derive(Debug, Clone)]
pub struct WebhookCall {
    pub url: String,
    pub body: Value,
}

pub struct PublishedRunActor {
    emitter: Emitter,
    timeout: Duration,
    idle: Duration,
    started: Instant,
    idle_timer: Option<SpawnHandle>,
    webhook: Option<WebhookCall>,
    finished: bool,
}

/// A batch of the run was accepted: the idle timeout starts again.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Touched;

/// The publisher's `agent_completed` ended the run: nothing more to do.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Ended;

impl PublishedRunActor {
    pub fn new(
        emitter: Emitter,
        timeout: Duration,
        idle: Duration,
        webhook: Option<WebhookCall>,
    ) -> Self {
        PublishedRunActor {
            emitter,
            timeout,
            idle,
            started: Instant::now(),
            idle_timer: None,
            webhook,
            finished: false,
        }
    }

    fn arm_idle(&mut self, ctx: &mut Context<Self>) {
        if let Some(timer) = self.idle_timer.take() {
            ctx.cancel_future(timer);
        }
        self.idle_timer = Some(ctx.run_later(self.idle, |act, ctx| {
            let error = ErrorBody::new(
                "publish_idle",
                format!(
                    "no batch of events came for {} ms (--publish-idle-ms)",
                    act.idle.as_millis()
                ),
            );
            act.finish(RunStatus::TimedOut, error, ctx)
        }));
    }

    /// Ends the run from the server's side: `agent_completed` (usage filled in by the
    /// registry, which knows the calls), then stop.
    fn finish(&mut self, status: RunStatus, error: ErrorBody, ctx: &mut Context<Self>) {
        if self.finished {
            return;
        }
        self.finished = true;
        self.emitter.emit_now(EventData::AgentCompleted {
            status,
            result: Value::Null,
            error: Some(error),
            duration_ms: self.started.elapsed().as_millis() as u64,
            usage: Value::Null,
        });
        ctx.stop();
    }

    /// Calls a webhook agent's URL; a refusal or silence ends the run `failed`.
    fn call_webhook(&mut self, call: WebhookCall, ctx: &mut Context<Self>) {
        let run_id = self.emitter.run_id().to_string();
        let called = async move {
            let client = awc::Client::builder()
                .timeout(WEBHOOK_TIMEOUT)
                .disable_redirects()
                .finish();
            match client.post(&call.url).send_json(&call.body).await {
                Ok(res) if res.status().is_success() => Ok(()),
                Ok(res) => Err(format!(
                    "the webhook agent answered HTTP {}",
                    res.status().as_u16()
                )),
                Err(awc::error::SendRequestError::Timeout) => Err(format!(
                    "the webhook agent did not answer within {} s",
                    WEBHOOK_TIMEOUT.as_secs()
                )),
                Err(e) => Err(format!("the webhook agent could not be reached: {e}")),
            }
        };
        ctx.spawn(
            actix::fut::wrap_future(called).map(move |outcome, act: &mut Self, ctx| {
                if let Err(why) = outcome {
                    log::warn!("run {run_id}: {why}");
                    act.finish(
                        RunStatus::Failed,
                        ErrorBody::new("webhook_failed", why),
                        ctx,
                    );
                }
            }),
        );
    }
}

impl Actor for PublishedRunActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_later(self.timeout, |act, ctx| {
            let error = ErrorBody::new(
                "timed_out",
                format!("the run took longer than {} ms", act.timeout.as_millis()),
            );
            act.finish(RunStatus::TimedOut, error, ctx)
        });
        self.arm_idle(ctx);
        if let Some(call) = self.webhook.take() {
            self.call_webhook(call, ctx);
        }
    }
}

impl Handler<Touched> for PublishedRunActor {
    type Result = ();

    fn handle(&mut self, _: Touched, ctx: &mut Context<Self>) {
        if !self.finished {
            self.arm_idle(ctx);
        }
    }
}

impl Handler<Ended> for PublishedRunActor {
    type Result = ();

    fn handle(&mut self, _: Ended, ctx: &mut Context<Self>) {
        self.finished = true;
        ctx.stop();
    }
}

impl Handler<Cancel> for PublishedRunActor {
    type Result = ();

    fn handle(&mut self, Cancel(reason): Cancel, ctx: &mut Context<Self>) {
        let (status, error) = crate::run::cancel_outcome(reason);
        self.finish(status, error, ctx)
    }
}
