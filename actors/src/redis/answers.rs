//! Answers to the questions of runs on other nodes (sections 10 and 12).
//!
//! A question is settled by its run's actor, on the node that runs it, so that the first
//! answer wins wherever it came from. An answer given on another node travels there and its
//! verdict comes back, over the nodes' control channels:
//!
//! - the answering node checks the run's record on Redis (its user, its node, still running),
//!   then publishes `respond <its node id> <token> <JSON>` on the run node's channel;
//! - the run's node hands it to its registry, which answers as for a local answer, and
//!   publishes `reply <token> <JSON verdict>` on the answering node's channel;
//! - the answering node's listener hands the verdict to the request waiting under `token`.
//!
//! A run node that does not hear it, or no verdict within [`VERDICT_WAIT`], is `unavailable`:
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
use crate::ids::UserId;
use crate::router::RespondRefused;

/// Longest an answering node waits for the run's node's verdict.
pub const VERDICT_WAIT: Duration = Duration::from_secs(5);

/// Requests of this node waiting for a verdict, by token.
#[derive(Default)]
pub struct Waiting {
    next: AtomicU64,
    open: Mutex<HashMap<u64, oneshot::Sender<Result<(), RespondRefused>>>>,
}

impl Waiting {
    fn open(&self) -> (u64, oneshot::Receiver<Result<(), RespondRefused>>) {
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
        let Some((token, verdict)) = payload.split_once(' ') else {
            log::warn!("Redis pub/sub: a malformed reply {payload:?}");
            return;
        };
        let (Ok(token), Ok(verdict)) = (token.parse::<u64>(), serde_json::from_str(verdict)) else {
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
            let _ = waiter.send(Verdict::into_result(verdict));
        }
    }
}

/// An answer on its way to the run's node.
#[derive(Debug, Serialize, Deserialize)]
pub struct Forwarded {
    pub user: String,
    pub run_id: String,
    pub interrupt_id: String,
    pub response: Value,
}

/// What the run's node made of it.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
enum Verdict {
    Taken,
    NotFound,
    UnknownQuestion,
    Resolved,
    Invalid { message: String },
    Unavailable,
}

impl Verdict {
    fn from_result(result: &Result<(), RespondRefused>) -> Verdict {
        match result {
            Ok(()) => Verdict::Taken,
            Err(RespondRefused::NotFound) => Verdict::NotFound,
            Err(RespondRefused::UnknownQuestion) => Verdict::UnknownQuestion,
            Err(RespondRefused::Resolved) => Verdict::Resolved,
            Err(RespondRefused::Invalid(message)) => Verdict::Invalid {
                message: message.clone(),
            },
            Err(RespondRefused::Unavailable) => Verdict::Unavailable,
        }
    }

    fn into_result(self) -> Result<(), RespondRefused> {
        match self {
            Verdict::Taken => Ok(()),
            Verdict::NotFound => Err(RespondRefused::NotFound),
            Verdict::UnknownQuestion => Err(RespondRefused::UnknownQuestion),
            Verdict::Resolved => Err(RespondRefused::Resolved),
            Verdict::Invalid { message } => Err(RespondRefused::Invalid(message)),
            Verdict::Unavailable => Err(RespondRefused::Unavailable),
        }
    }
}

/// Reads a `respond` control message: the answering node, its token, the answer.
pub fn parse_forwarded(payload: &str) -> Option<(String, u64, Forwarded)> {
    let mut parts = payload.splitn(3, ' ');
    let node = parts.next()?.to_string();
    let token = parts.next()?.parse().ok()?;
    let forwarded = serde_json::from_str(parts.next()?).ok()?;
    Some((node, token, forwarded))
}

impl RedisLink {
    /// An answer to a question of `user`'s run `run_id`, which is not this node's: sent to the
    /// run's node, whose verdict is returned.
    pub async fn respond(
        &self,
        user: &UserId,
        run_id: &str,
        interrupt_id: String,
        response: Value,
    ) -> Result<Result<(), RespondRefused>, Unavailable> {
        let keys = UserKeys::new(user);
        let mut conn = self.conn.clone();
        let (owner, node, status): (Option<String>, Option<String>, Option<String>) =
            redis::cmd("HMGET")
                .arg(keys.run(run_id))
                .arg(&["user", "node", "status"])
                .query_async(&mut conn)
                .await?;
        if owner.as_deref() != Some(user.as_ref()) {
            return Ok(Err(RespondRefused::NotFound));
        }
        let (Some(node), Some("running")) = (node, status.as_deref()) else {
            // The run has ended: whatever it asked was settled when it did.
            return Ok(Err(RespondRefused::Resolved));
        };
        let forwarded = Forwarded {
            user: user.to_string(),
            run_id: run_id.to_string(),
            interrupt_id,
            response,
        };
        let body = serde_json::to_string(&forwarded)
            .map_err(|e| Unavailable(format!("encoding an answer: {e}")))?;
        let (token, verdict) = self.answers.open();
        let heard: Result<i64, _> = redis::cmd("PUBLISH")
            .arg(keys::node_control(&node))
            .arg(format!("respond {} {token} {body}", self.node_id()))
            .query_async(&mut conn)
            .await;
        match heard {
            Ok(0) => {
                self.answers.close(token);
                return Err(Unavailable(format!("node {node} did not hear the answer")));
            }
            Ok(_) => {}
            Err(e) => {
                self.answers.close(token);
                return Err(e.into());
            }
        }
        match tokio::time::timeout(VERDICT_WAIT, verdict).await {
            Ok(Ok(verdict)) => Ok(verdict),
            _ => {
                self.answers.close(token);
                Err(Unavailable(format!(
                    "node {node} gave no verdict on an answer within {VERDICT_WAIT:?}"
                )))
            }
        }
    }

    /// Sends the verdict on a forwarded answer back to the node that asked.
    pub async fn reply(&self, node: &str, token: u64, result: &Result<(), RespondRefused>) {
        let verdict = match serde_json::to_string(&Verdict::from_result(result)) {
            Ok(verdict) => verdict,
            Err(e) => return log::error!("encoding a verdict failed: {e}"),
        };
        let mut conn = self.conn.clone();
        let sent: Result<i64, _> = redis::cmd("PUBLISH")
            .arg(keys::node_control(node))
            .arg(format!("reply {token} {verdict}"))
            .query_async(&mut conn)
            .await;
        if let Err(e) = sent {
            // The asking node times out and tells its client to try again.
            log::warn!("the verdict on an answer for node {node} was not sent: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn verdicts_travel_unchanged() {
        for result in [
            Ok(()),
            Err(RespondRefused::NotFound),
            Err(RespondRefused::UnknownQuestion),
            Err(RespondRefused::Resolved),
            Err(RespondRefused::Invalid("at /n: 0 is less than 1".into())),
            Err(RespondRefused::Unavailable),
        ] {
            let text = serde_json::to_string(&Verdict::from_result(&result)).unwrap();
            let back: Verdict = serde_json::from_str(&text).unwrap();
            assert_eq!(back.into_result(), result);
        }
    }

    #[test]
    fn a_forwarded_answer_reads_back() {
        let f = Forwarded {
            user: "a b".into(),
            run_id: "run_1".into(),
            interrupt_id: "in_1".into(),
            response: json!({"approved": true, "args": {"x": "1 2"}}),
        };
        let payload = format!("node-1 7 {}", serde_json::to_string(&f).unwrap());
        let (node, token, back) = parse_forwarded(&payload).unwrap();
        assert_eq!((node.as_str(), token), ("node-1", 7));
        assert_eq!(back.user, "a b");
        assert_eq!(back.response, f.response);
        assert!(parse_forwarded("node-1 x {}").is_none());
        assert!(parse_forwarded("node-1 7 nope").is_none());
    }

    #[test]
    fn a_reply_reaches_its_waiter_once() {
        let waiting = Waiting::default();
        let (token, mut rx) = waiting.open();
        waiting.deliver(&format!("{token} {{\"verdict\":\"resolved\"}}"));
        assert_eq!(rx.try_recv().unwrap(), Err(RespondRefused::Resolved));
        // A late or unknown reply is dropped.
        waiting.deliver(&format!("{token} {{\"verdict\":\"taken\"}}"));
        waiting.deliver("garbage");
    }
}
