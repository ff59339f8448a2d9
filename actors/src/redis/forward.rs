//! Requests for the node that runs a run (sections 10, 11 and 12).
//!
//! Some requests can only be decided where the run is: an answer to its question (its actor
//! settles it, so that the first answer wins wherever it came from), a publisher's batch (its
//! ledger and `last_n` are there), and whether a publisher may see its run. A request that
//! arrives on another node travels to the run's node and its verdict comes back, over the
//! nodes' control channels:
//!
//! - the asking node finds the run's node in the run's record on Redis, then publishes
//!   `ask <its node id> <token> <JSON Request>` on that node's channel;
//! - the run's node hands it to its registry (`LogNews::Forwarded`), which decides as for a
//!   local request and publishes `reply <token> <JSON Reply>` on the asking node's channel;
//! - the asking node's listener hands the reply to the request waiting under `token`.
//!
//! A run's node that does not hear it, or no reply within [`VERDICT_WAIT`], is `unavailable`:
//! the client is told to try again, not that it worked.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::oneshot;

use super::keys::{self, UserKeys};
use super::{RedisLink, Unavailable};
use crate::event::RunStatus;
use crate::ids::UserId;
use crate::registry::runs::PublisherRef;
use crate::router::{BatchAccepted, PublishRefused, RespondRefused};

/// Longest an asking node waits for the run's node's reply.
pub const VERDICT_WAIT: Duration = Duration::from_secs(5);

/// A request for the node that runs `run_id`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Request {
    /// An answer to one of the run's questions.
    Respond {
        user: String,
        run_id: String,
        interrupt_id: String,
        response: Value,
    },
    /// A publisher's batch, as it was sent (`{n, type, data}` each).
    Publish {
        publisher: String,
        only_run: Option<String>,
        run_id: String,
        events: Value,
    },
    /// Whether this publisher may see the run, and its `last_n`.
    Owner {
        publisher: String,
        only_run: Option<String>,
        run_id: String,
    },
}

/// The run's node's verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Reply {
    Taken,
    Accepted { accepted: usize, last_n: u64 },
    Owner { last_n: u64 },
    NotFound,
    UnknownQuestion,
    Resolved,
    Invalid { message: String },
    Ended { status: String },
    Order { index: usize, message: String },
    Rule { index: usize, message: String },
    Busy,
    Unavailable,
}

impl Reply {
    pub fn of_respond(result: &Result<(), RespondRefused>) -> Reply {
        match result {
            Ok(()) => Reply::Taken,
            Err(RespondRefused::NotFound) => Reply::NotFound,
            Err(RespondRefused::UnknownQuestion) => Reply::UnknownQuestion,
            Err(RespondRefused::Resolved) => Reply::Resolved,
            Err(RespondRefused::Invalid(message)) => Reply::Invalid {
                message: message.clone(),
            },
            Err(RespondRefused::Unavailable) => Reply::Unavailable,
        }
    }

    pub fn into_respond(self) -> Result<(), RespondRefused> {
        match self {
            Reply::Taken => Ok(()),
            Reply::UnknownQuestion => Err(RespondRefused::UnknownQuestion),
            Reply::Resolved => Err(RespondRefused::Resolved),
            Reply::Invalid { message } => Err(RespondRefused::Invalid(message)),
            Reply::Unavailable => Err(RespondRefused::Unavailable),
            _ => Err(RespondRefused::NotFound),
        }
    }

    pub fn of_publish(result: &Result<BatchAccepted, PublishRefused>) -> Reply {
        match result {
            Ok(a) => Reply::Accepted {
                accepted: a.accepted,
                last_n: a.last_n,
            },
            Err(PublishRefused::NotFound) => Reply::NotFound,
            Err(PublishRefused::Ended(status)) => Reply::Ended {
                status: status.as_str().to_string(),
            },
            Err(PublishRefused::Order { index, message }) => Reply::Order {
                index: *index,
                message: message.clone(),
            },
            Err(PublishRefused::Rule { index, message }) => Reply::Rule {
                index: *index,
                message: message.clone(),
            },
            Err(PublishRefused::Busy) => Reply::Busy,
            Err(PublishRefused::Unavailable) => Reply::Unavailable,
        }
    }

    pub fn into_publish(self) -> Result<BatchAccepted, PublishRefused> {
        match self {
            Reply::Accepted { accepted, last_n } => Ok(BatchAccepted { accepted, last_n }),
            Reply::Ended { status } => Err(PublishRefused::Ended(parse_status(&status))),
            Reply::Order { index, message } => Err(PublishRefused::Order { index, message }),
            Reply::Rule { index, message } => Err(PublishRefused::Rule { index, message }),
            Reply::Busy => Err(PublishRefused::Busy),
            Reply::Unavailable => Err(PublishRefused::Unavailable),
            _ => Err(PublishRefused::NotFound),
        }
    }
}

fn parse_status(status: &str) -> RunStatus {
    match status {
        "succeeded" => RunStatus::Succeeded,
        "cancelled" => RunStatus::Cancelled,
        "timed_out" => RunStatus::TimedOut,
        _ => RunStatus::Failed,
    }
}

/// Requests of this node waiting for a reply, by token.
pub struct Waiting {
    next: AtomicU64,
    open: Mutex<HashMap<u64, oneshot::Sender<Reply>>>,
}

impl Default for Waiting {
    /// Tokens start at a random number: a node that restarts under the same id must not take
    /// a late reply meant for its previous process for the answer to a new request.
    fn default() -> Self {
        Waiting {
            next: AtomicU64::new(rand::random::<u64>() >> 1),
            open: Mutex::default(),
        }
    }
}

impl Waiting {
    fn open(&self) -> (u64, oneshot::Receiver<Reply>) {
        let token = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        if let Ok(mut open) = self.open.lock() {
            open.insert(token, tx);
        }
        (token, rx)
    }

    fn close(&self, token: u64) {
        if let Ok(mut open) = self.open.lock() {
            open.remove(&token);
        }
    }

    /// A `reply` message from the listener.
    pub fn deliver(&self, payload: &str) {
        let parsed = payload.split_once(' ').and_then(|(token, reply)| {
            Some((
                token.parse::<u64>().ok()?,
                serde_json::from_str(reply).ok()?,
            ))
        });
        let Some((token, reply)) = parsed else {
            log::warn!("Redis pub/sub: a malformed reply {payload:?}");
            return;
        };
        let waiter = self
            .open
            .lock()
            .ok()
            .and_then(|mut open| open.remove(&token));
        // None: it gave up waiting.
        if let Some(waiter) = waiter {
            let _ = waiter.send(reply);
        }
    }
}

/// Reads an `ask` control message: the asking node, its token, the request.
pub fn parse_ask(payload: &str) -> Option<(String, u64, Request)> {
    let mut parts = payload.splitn(3, ' ');
    let node = parts.next()?.to_string();
    let token = parts.next()?.parse().ok()?;
    let request = serde_json::from_str(parts.next()?).ok()?;
    Some((node, token, request))
}

/// Where a run is, as its record on Redis says.
pub enum RunPlace {
    /// Running on this node (the caller looked for it locally first).
    Here,
    /// Running on another node.
    On(String),
    /// Ended, this way, on `node`.
    Ended { node: String, status: RunStatus },
    /// No record (or not this user's).
    Nowhere,
}

impl RedisLink {
    /// Where `user`'s run `run_id` is.
    pub async fn place(&self, user: &UserId, run_id: &str) -> Result<RunPlace, Unavailable> {
        let keys = UserKeys::new(user);
        let mut conn = self.conn.clone();
        let (owner, node, status): (Option<String>, Option<String>, Option<String>) =
            redis::cmd("HMGET")
                .arg(keys.run(run_id))
                .arg(&["user", "node", "status"])
                .query_async(&mut conn)
                .await?;
        if owner.as_deref() != Some(user.as_ref()) {
            return Ok(RunPlace::Nowhere);
        }
        Ok(match (node, status) {
            (Some(node), Some(status)) if status == "running" => {
                if node == *self.node_id().as_ref() {
                    RunPlace::Here
                } else {
                    RunPlace::On(node)
                }
            }
            (Some(node), Some(status)) => RunPlace::Ended {
                node,
                status: parse_status(&status),
            },
            _ => RunPlace::Nowhere,
        })
    }

    /// A published run's user, if `who` may touch it: from the run's index (set when it was
    /// created, with its owner), so that a run of another publisher is not even found.
    pub async fn published_user(
        &self,
        run_id: &str,
        who: PublisherRef<'_>,
    ) -> Result<Option<UserId>, Unavailable> {
        let mut conn = self.conn.clone();
        let index: Option<String> = redis::cmd("GET")
            .arg(keys::published_run(run_id))
            .query_async(&mut conn)
            .await?;
        let Some((user, owner)) = index.as_deref().and_then(|i| i.split_once('\n')) else {
            return Ok(None);
        };
        let allowed = match who.only_run {
            Some(run) => run == run_id && owner.is_empty(),
            None => owner == who.name,
        };
        Ok(allowed.then(|| UserId::from(user)))
    }

    /// Where a published run is, if `who` may touch it: its user, the node that runs (or
    /// ran) it, and how it ended, if it has.
    pub async fn published_place(
        &self,
        run_id: &str,
        who: PublisherRef<'_>,
    ) -> Result<Option<(UserId, String, Option<RunStatus>)>, Unavailable> {
        let Some(user) = self.published_user(run_id, who).await? else {
            return Ok(None);
        };
        Ok(match self.place(&user, run_id).await? {
            RunPlace::On(node) => Some((user, node, None)),
            RunPlace::Ended { node, status } => Some((user, node, Some(status))),
            RunPlace::Here | RunPlace::Nowhere => None,
        })
    }

    /// Sends `request` to `node` and waits for its reply.
    pub async fn ask(&self, node: &str, request: &Request) -> Result<Reply, Unavailable> {
        let body = serde_json::to_string(request)
            .map_err(|e| Unavailable(format!("encoding a request: {e}")))?;
        let (token, reply) = self.forwarded.open();
        let mut conn = self.conn.clone();
        let heard: Result<i64, _> = redis::cmd("PUBLISH")
            .arg(keys::node_control(node))
            .arg(format!("ask {} {token} {body}", self.node_id()))
            .query_async(&mut conn)
            .await;
        match heard {
            Ok(0) => {
                self.forwarded.close(token);
                return Err(Unavailable(format!("node {node} did not hear the request")));
            }
            Ok(_) => {}
            Err(e) => {
                self.forwarded.close(token);
                return Err(e.into());
            }
        }
        match tokio::time::timeout(VERDICT_WAIT, reply).await {
            Ok(Ok(reply)) => Ok(reply),
            _ => {
                self.forwarded.close(token);
                Err(Unavailable(format!(
                    "node {node} did not reply within {VERDICT_WAIT:?}"
                )))
            }
        }
    }

    /// Sends the reply to a forwarded request back to the node that asked.
    pub async fn reply(&self, node: &str, token: u64, reply: &Reply) {
        let reply = match serde_json::to_string(reply) {
            Ok(reply) => reply,
            Err(e) => return log::error!("encoding a reply failed: {e}"),
        };
        let mut conn = self.conn.clone();
        let sent: Result<i64, _> = redis::cmd("PUBLISH")
            .arg(keys::node_control(node))
            .arg(format!("reply {token} {reply}"))
            .query_async(&mut conn)
            .await;
        if let Err(e) = sent {
            // The asking node times out and tells its client to try again.
            log::warn!("a reply for node {node} was not sent: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn replies_travel_unchanged() {
        for result in [
            Ok(()),
            Err(RespondRefused::UnknownQuestion),
            Err(RespondRefused::Resolved),
            Err(RespondRefused::Invalid("at /n: 0 is less than 1".into())),
            Err(RespondRefused::Unavailable),
            Err(RespondRefused::NotFound),
        ] {
            let text = serde_json::to_string(&Reply::of_respond(&result)).unwrap();
            let back: Reply = serde_json::from_str(&text).unwrap();
            assert_eq!(back.into_respond(), result);
        }
        for result in [
            Ok(BatchAccepted {
                accepted: 3,
                last_n: 9,
            }),
            Err(PublishRefused::NotFound),
            Err(PublishRefused::Ended(RunStatus::Cancelled)),
            Err(PublishRefused::Order {
                index: 1,
                message: "m".into(),
            }),
            Err(PublishRefused::Rule {
                index: 2,
                message: "r".into(),
            }),
            Err(PublishRefused::Busy),
            Err(PublishRefused::Unavailable),
        ] {
            let text = serde_json::to_string(&Reply::of_publish(&result)).unwrap();
            let back: Reply = serde_json::from_str(&text).unwrap();
            assert_eq!(back.into_publish(), result);
        }
    }

    #[test]
    fn a_request_reads_back() {
        let r = Request::Respond {
            user: "a b".into(),
            run_id: "run_1".into(),
            interrupt_id: "in_1".into(),
            response: json!({"approved": true, "args": {"x": "1 2"}}),
        };
        let payload = format!("node-1 7 {}", serde_json::to_string(&r).unwrap());
        let (node, token, back) = parse_ask(&payload).unwrap();
        assert_eq!((node.as_str(), token), ("node-1", 7));
        assert!(matches!(back, Request::Respond { user, .. } if user == "a b"));
        assert!(parse_ask("node-1 x {}").is_none());
        assert!(parse_ask("node-1 7 nope").is_none());
    }

    #[test]
    fn a_reply_reaches_its_waiter_once() {
        let waiting = Waiting::default();
        let (token, mut rx) = waiting.open();
        waiting.deliver(&format!("{token} {{\"verdict\":\"resolved\"}}"));
        assert_eq!(rx.try_recv().unwrap(), Reply::Resolved);
        // A late or unknown reply is dropped.
        waiting.deliver(&format!("{token} {{\"verdict\":\"taken\"}}"));
        waiting.deliver("garbage");
    }
}
