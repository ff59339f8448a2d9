//! The listener: this node's subscriptions (the channels of the users it has sessions for,
//! and its own control channel), read without ever blocking.
//!
//! A user is followed by subscribing first and only then reading the user's epoch and newest
//! seq, so no frame falls between the two: anything published after the read arrives on the
//! subscription, anything before is in the stream. A frame the registry's mailbox cannot take
//! is dropped and a resync asked for (the registry fills gaps from the stream). The
//! connection is probed with PING: one that went silent (a failover can leave it open and
//! dead) is replaced, every channel subscribed again and every followed user resynced.

use std::collections::HashSet;
use std::time::Duration;

use actix::prelude::*;
use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::keys::{self, UserKeys};
use super::{forward, parse_published, LogNews, RedisLink};
use crate::ids::UserId;

pub enum Follow {
    Start(UserId),
    Stop(UserId),
}

pub async fn run(
    link: RedisLink,
    client: redis::Client,
    mut follows: mpsc::UnboundedReceiver<Follow>,
    news: Recipient<LogNews>,
) {
    let control = keys::node_control(link.node_id());
    let timeout = link.config.response_timeout();
    let probe_every = (link.config.node_timeout / 4).max(Duration::from_millis(100));
    let mut followed: HashSet<UserId> = HashSet::new();
    let mut pause = Duration::from_millis(50);
    loop {
        let connected = tokio::time::timeout(timeout * 2, client.get_async_pubsub()).await;
        let pubsub = match connected {
            Ok(Ok(pubsub)) => pubsub,
            failed => {
                let why = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => "timed out".to_string(),
                };
                log::debug!("Redis pub/sub: cannot connect ({why})");
                // Follows asked for meanwhile are answered: a session must not wait on them.
                while let Ok(f) = follows.try_recv() {
                    match f {
                        Follow::Start(user) => {
                            news.do_send(LogNews::FollowFailed(user));
                        }
                        Follow::Stop(user) => {
                            followed.remove(&user);
                        }
                    }
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let (mut sink, mut stream) = pubsub.split();
        let mut channels: Vec<String> = followed.iter().map(|u| UserKeys::new(u).channel).collect();
        channels.push(control.clone());
        match tokio::time::timeout(timeout * 4, sink.subscribe(&channels)).await {
            Ok(Ok(())) => {}
            _ => {
                log::warn!("Redis pub/sub: subscribing again failed; reconnecting");
                tokio::time::sleep(pause).await;
                continue;
            }
        }
        pause = Duration::from_millis(50);
        log::info!(
            "Redis pub/sub: subscribed to {} users' channels",
            followed.len()
        );
        // Whatever was published while there was no subscription is in the streams.
        news.do_send(LogNews::Resync);
        let mut probe =
            tokio::time::interval_at(tokio::time::Instant::now() + probe_every, probe_every);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                msg = stream.next() => {
                    let Some(msg) = msg else {
                        log::warn!("Redis pub/sub: the connection closed; reconnecting");
                        break;
                    };
                    deliver(&msg, &control, &link, &news);
                }
                follow = follows.recv() => {
                    let Some(follow) = follow else { return };
                    match follow {
                        // Subscribing and unsubscribing are awaited here, one at a time, so
                        // that a stop and a start of the same user cannot overtake each other.
                        // Only the read of the epoch and top, after the subscription, runs on.
                        Follow::Start(user) => {
                            let channel = UserKeys::new(&user).channel;
                            let subscribed =
                                tokio::time::timeout(timeout * 2, sink.subscribe(&channel)).await;
                            if !matches!(subscribed, Ok(Ok(()))) {
                                news.do_send(LogNews::FollowFailed(user));
                                continue;
                            }
                            followed.insert(user.clone());
                            let (link, news) = (link.clone(), news.clone());
                            actix::spawn(async move {
                                match tokio::time::timeout(timeout * 2, link.open(&user)).await {
                                    Ok(Ok((epoch, top))) => {
                                        news.do_send(LogNews::Followed { user, epoch, top })
                                    }
                                    _ => news.do_send(LogNews::FollowFailed(user)),
                                }
                            });
                        }
                        Follow::Stop(user) => {
                            followed.remove(&user);
                            let channel = UserKeys::new(&user).channel;
                            let _ = tokio::time::timeout(timeout * 2, sink.unsubscribe(&channel)).await;
                        }
                    }
                }
                _ = probe.tick() => {
                    let pong: Result<redis::RedisResult<redis::Value>, _> =
                        tokio::time::timeout(timeout * 2, sink.ping()).await;
                    if !matches!(pong, Ok(Ok(_))) {
                        log::warn!("Redis pub/sub: no answer to PING; reconnecting");
                        break;
                    }
                }
            }
        }
    }
}

/// Hands a published message to the registry, without waiting.
fn deliver(msg: &redis::Msg, control: &str, link: &RedisLink, news: &Recipient<LogNews>) {
    let me: &str = link.node_id();
    let channel = msg.get_channel_name();
    let Ok(payload) = std::str::from_utf8(msg.get_payload_bytes()) else {
        log::warn!("Redis pub/sub: a message on {channel} is not UTF-8; dropped");
        return;
    };
    let item = if channel == control {
        let (verb, rest) = payload.split_once(' ').unwrap_or((payload, ""));
        match verb {
            // Not dropped when the registry is busy: nothing would repair a lost cancel.
            // (Rare: each is a user's command, under its connection's rate limit.)
            "cancel" => return news.do_send(LogNews::Cancel(rest.into())),
            // Likewise a request for one of this node's runs; a reply goes straight to the
            // request waiting for it.
            "ask" => match forward::parse_ask(rest) {
                Some((node, token, request)) => {
                    return news.do_send(LogNews::Forwarded {
                        node,
                        token,
                        request,
                    })
                }
                None => {
                    log::warn!("Redis pub/sub: a malformed request {rest:?}");
                    return;
                }
            },
            "reply" => return link.forwarded.deliver(rest),
            _ => {
                log::warn!("Redis pub/sub: unknown control message {payload:?}");
                return;
            }
        }
    } else {
        let Some(user) = UserKeys::user_of_channel(channel) else {
            return;
        };
        let Some((node, epoch, frame)) = parse_published(payload) else {
            log::warn!("Redis pub/sub: a malformed frame for user {user}; dropped");
            return;
        };
        // This node's own: it has the frame from the append's reply. (An append retried after
        // a lost reply is answered `dup`, and its frame read back from the stream.)
        if node == me {
            return;
        }
        LogNews::Frame { user, epoch, frame }
    };
    if news.try_send(item).is_err() {
        // The registry is saturated: the frame is in the stream, and a resync finds it.
        log::debug!("Redis pub/sub: the registry is busy; a frame is dropped, to be repaired");
        let _ = news.try_send(LogNews::Resync);
    }
}
