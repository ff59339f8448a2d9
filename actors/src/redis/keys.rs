//! Redis key and channel names.
//!
//! Everything of one user shares the hash tag `{u:ID}`, so every script touches one hash slot
//! and stays valid on Redis Cluster (where a script touching keys of different slots fails).
//! The user id is escaped (`%`, `{` and `}`), so no user id can end its tag early or name
//! another user's keys. Node-wide keys live under `agentcast:`.

use crate::ids::UserId;

/// The keys of one user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserKeys {
    /// Hash: `epoch`, `top` (the newest `seq`).
    pub meta: String,
    /// Stream of the user's frames, entry id `<seq>-0`.
    pub log: String,
    /// Set of the user's runs not yet ended, on every node.
    pub running: String,
    /// Hash: the token bucket of `--runs-per-minute`.
    pub starts: String,
    /// Pub/sub channel of the user's frames.
    pub channel: String,
    prefix: String,
}

impl UserKeys {
    pub fn new(user: &str) -> UserKeys {
        let mut tag = String::with_capacity(user.len() + 6);
        tag.push_str("{u:");
        for c in user.chars() {
            match c {
                '%' => tag.push_str("%25"),
                '{' => tag.push_str("%7B"),
                '}' => tag.push_str("%7D"),
                c => tag.push(c),
            }
        }
        tag.push('}');
        UserKeys {
            meta: format!("{tag}:meta"),
            log: format!("{tag}:log"),
            running: format!("{tag}:running"),
            starts: format!("{tag}:starts"),
            channel: format!("{tag}:events"),
            prefix: tag,
        }
    }

    /// Hash: one run's record (owner, node, status, timings, `seq` range, open tool calls).
    pub fn run(&self, run_id: &str) -> String {
        format!("{}:run:{run_id}", self.prefix)
    }

    /// The user a channel name belongs to, if it is a user channel.
    pub fn user_of_channel(channel: &str) -> Option<UserId> {
        let tag = channel.strip_prefix("{u:")?.strip_suffix("}:events")?;
        let mut user = String::with_capacity(tag.len());
        let mut rest = tag;
        while let Some(at) = rest.find('%') {
            user.push_str(&rest[..at]);
            let code = rest.get(at..at + 3)?;
            user.push(match code {
                "%25" => '%',
                "%7B" => '{',
                "%7D" => '}',
                _ => return None,
            });
            rest = &rest[at + 3..];
        }
        user.push_str(rest);
        Some(user.into())
    }
}

/// Sorted set: every node's latest heartbeat (Redis server time, ms).
pub const NODES: &str = "agentcast:nodes";

/// Set of `user \n run_id` of the runs a node is running.
pub fn node_runs(node: &str) -> String {
    format!("agentcast:node:{node}:runs")
}

/// A node's control channel (`cancel <run_id>`).
pub fn node_control(node: &str) -> String {
    format!("agentcast:node:{node}:control")
}

/// A published run's user and owner (section 11), for a node that gets a batch of it without
/// knowing whose it is: `user \n owner` (owner empty: a webhook agent's run).
pub fn published_run(run_id: &str) -> String {
    format!("agentcast:published:{run_id}")
}

/// Taken by the node that ends a lost node's runs.
pub fn node_reaper(node: &str) -> String {
    format!("agentcast:node:{node}:reaper")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_users_keys_share_one_hash_tag() {
        let k = UserKeys::new("alice");
        for key in [
            &k.meta,
            &k.log,
            &k.running,
            &k.starts,
            &k.channel,
            &k.run("r1"),
        ] {
            assert!(key.starts_with("{u:alice}:"), "{key}");
        }
    }

    #[test]
    fn braces_in_ids_cannot_end_the_tag_early_or_collide() {
        let tricky = UserKeys::new("a}:meta");
        assert_eq!(tricky.meta, "{u:a%7D:meta}:meta");
        assert_ne!(tricky.meta, UserKeys::new("a").meta);
        let pct = UserKeys::new("a%7D:meta");
        assert_ne!(pct.meta, tricky.meta);
        for user in ["plain", "a}:meta", "{x}", "100%", "%7B", "ünï ✓"] {
            let k = UserKeys::new(user);
            assert_eq!(
                UserKeys::user_of_channel(&k.channel).as_deref(),
                Some(user),
                "{user}"
            );
        }
        assert_eq!(UserKeys::user_of_channel("agentcast:node:x:control"), None);
    }
}
