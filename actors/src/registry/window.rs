//! This node's window on a user's history in a shared log (see [`super::shared`]): frames
//! are fed to it in `seq` order whichever way they come (this node's append replies, other
//! nodes' through the subscription, reads of the stream); a duplicate is dropped, a frame
//! ahead of the next `seq` waits (bounded) while the gap is read back. A gap the stream
//! cannot fill, a new epoch, or a `seq` given out twice ends the window: the user's sessions
//! here are closed (1012) to reconnect and learn of it. A check of every followed user
//! against the meta hashes each second catches a lost last message and a changed epoch.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use actix::prelude::*;

use crate::event::Frame;
use crate::ids::UserId;
use crate::redis::{History, ReadEnd, Top, Unavailable};
use crate::router::*;

use super::ConnectionRegistry;

/// Frames ahead of a gap kept per user while it is filled; past this the newest are dropped
/// (the repair reads them back too).
const EARLY_MAX: usize = 4096;
/// Frames read back from the stream in one repair.
const REPAIR_MAX: u64 = 4096;

/// Frames that arrived ahead of the next `seq`, bounded by count and bytes: past either,
/// the newest are dropped (the repair reads them back from the stream).
#[derive(Default)]
pub struct Early {
    frames: BTreeMap<u64, (Arc<str>, Frame)>,
    bytes: usize,
}

impl Early {
    fn insert(&mut self, epoch: Arc<str>, frame: Frame, max_bytes: usize) {
        let cost = crate::replay::cost(&frame);
        if let Some((_, old)) = self.frames.insert(frame.seq, (epoch, frame)) {
            self.bytes -= crate::replay::cost(&old);
        }
        self.bytes += cost;
        while self.frames.len() > EARLY_MAX || self.bytes > max_bytes {
            let Some((_, (_, dropped))) = self.frames.pop_last() else {
                break;
            };
            self.bytes -= crate::replay::cost(&dropped);
        }
    }

    fn first_seq(&self) -> Option<u64> {
        self.frames.keys().next().copied()
    }

    fn remove(&mut self, seq: u64) -> Option<(Arc<str>, Frame)> {
        let removed = self.frames.remove(&seq)?;
        self.bytes -= crate::replay::cost(&removed.1);
        Some(removed)
    }

    pub(super) fn take(&mut self) -> BTreeMap<u64, (Arc<str>, Frame)> {
        self.bytes = 0;
        std::mem::take(&mut self.frames)
    }

    /// Keeps the frames past `last_seq` of `epoch`.
    fn keep_after(&mut self, last_seq: u64, epoch: &Arc<str>) {
        let kept = self.take();
        for (seq, (e, frame)) in kept {
            if seq > last_seq && e == *epoch {
                self.bytes += crate::replay::cost(&frame);
                self.frames.insert(seq, (e, frame));
            }
        }
    }
}

impl ConnectionRegistry {
    /// Feeds one numbered frame to the user's window, in `seq` order: the answer to one of
    /// this node's appends, or a copy from a subscription, whichever comes first.
    pub(super) fn ingest(
        &mut self,
        user: UserId,
        epoch: Arc<str>,
        frame: Frame,
        ctx: &mut Context<Self>,
    ) {
        self.runs.note_seq(&frame.run_id, frame.seq);
        let Some(entry) = self.users.get_mut(&user) else {
            return;
        };
        if !entry.follow.synced {
            if entry.follow.asked {
                entry
                    .follow
                    .early
                    .insert(epoch, frame, self.budget.user_max_bytes);
            }
            return;
        }
        if epoch != entry.log.epoch {
            self.lose_history(
                &user,
                epoch.clone(),
                0,
                "its history was lost (a new epoch)",
            );
        }
        let Some(entry) = self.users.get_mut(&user) else {
            return;
        };
        let last = entry.log.last_seq;
        if frame.seq <= last {
            // Usually the other copy of a frame already appended. A *different* frame under a
            // seq this node still has means Redis gave the seq out again: it lost its newest
            // events (a restart from an old snapshot, a failover) and kept the epoch.
            let reused = entry
                .log
                .frames
                .get(frame.seq)
                .is_some_and(|kept| kept.text != frame.text);
            if reused {
                // The tabs here must not get the events after it (they would look like the
                // continuation of what they have): closed now, 1012, and the window goes on
                // from the reused seq until the new epoch arrives.
                let at = frame.seq - 1;
                self.lose_history(&user, epoch.clone(), at, "Redis gave out a seq again");
                self.renew_epoch(&user, epoch.clone(), ctx);
                self.ingest(user, epoch, frame, ctx);
            }
            return;
        }
        if frame.seq == last + 1 {
            self.append(&user, frame, ctx);
            self.drain_early(&user, ctx);
            return;
        }
        entry
            .follow
            .early
            .insert(epoch, frame, self.budget.user_max_bytes);
        self.repair(&user, ctx);
    }

    /// Appends the waiting frames that now follow on.
    fn drain_early(&mut self, user: &UserId, ctx: &mut Context<Self>) {
        loop {
            let Some(entry) = self.users.get_mut(user) else {
                return;
            };
            let last = entry.log.last_seq;
            let Some(entry_seq) = entry.follow.early.first_seq() else {
                return;
            };
            if entry_seq > last + 1 {
                return;
            }
            let Some((epoch, frame)) = entry.follow.early.remove(entry_seq) else {
                return;
            };
            if entry_seq == last + 1 && epoch == entry.log.epoch {
                self.append(user, frame, ctx);
            }
        }
    }

    /// Reads the frames after the window's last from the stream.
    pub(super) fn repair(&mut self, user: &UserId, ctx: &mut Context<Self>) {
        let Some(link) = self.shared.as_ref().map(|s| s.link.clone()) else {
            return;
        };
        let Some(entry) = self.users.get_mut(user) else {
            return;
        };
        if entry.follow.repairing || !entry.follow.synced {
            return;
        }
        entry.follow.repairing = true;
        let from = entry.log.last_seq + 1;
        let to = entry
            .follow
            .early
            .first_seq()
            .map_or(u64::MAX, |first| first - 1)
            .min(from + REPAIR_MAX - 1);
        self.metrics.redis_repairs.inc();
        let user = user.clone();
        ctx.spawn(
            actix::fut::wrap_future({
                let user = user.clone();
                async move { link.read(&user, from, to, ReadEnd::Oldest).await }
            })
            .map(move |read, act: &mut Self, ctx| act.repaired(user, from, read, ctx)),
        );
    }

    fn repaired(
        &mut self,
        user: UserId,
        from: u64,
        read: Result<History, Unavailable>,
        ctx: &mut Context<Self>,
    ) {
        let Some(entry) = self.users.get_mut(&user) else {
            return;
        };
        entry.follow.repairing = false;
        // Unreachable: the next resync tries again. No epoch: the history is gone, and the
        // next resync opens the new one.
        let Ok(History {
            epoch: Some(epoch),
            top,
            frames,
        }) = read
        else {
            return;
        };
        let first = frames.first().map(|f| f.seq);
        for frame in frames {
            self.ingest(user.clone(), epoch.clone(), frame, ctx);
        }
        let Some(entry) = self.users.get_mut(&user) else {
            return;
        };
        let last = entry.log.last_seq;
        let wanted = entry
            .follow
            .early
            .first_seq()
            .unwrap_or(top + 1)
            .min(top + 1);
        if last + 1 >= wanted || epoch != entry.log.epoch {
            return;
        }
        if first.is_none_or(|first| first > from) && last < from {
            // The stream no longer has what the window lacks: not a silent gap.
            let resume_at = first.map_or(wanted, |f| f).saturating_sub(1);
            self.lose_history(
                &user,
                epoch,
                resume_at,
                "events it missed are gone from Redis",
            );
            self.drain_early(&user, ctx);
        }
        self.repair(&user, ctx);
    }

    /// The window cannot go on from where it is: every session of the user here is closed
    /// (1012) to reconnect and learn of the gap, and the window starts again at `last_seq`.
    pub(super) fn lose_history(
        &mut self,
        user: &UserId,
        epoch: Arc<str>,
        last_seq: u64,
        why: &str,
    ) {
        let Some(entry) = self.users.get_mut(user) else {
            return;
        };
        log::warn!(
            "user {user}: {why}; closing its {} connections here",
            entry.sessions.len()
        );
        for s in entry.sessions.drain(..) {
            entry.cut.insert(s.key);
            s.cut(Push::Close(Goodbye::HistoryLost));
        }
        let change = entry.log.frames.clear();
        entry.log.epoch = epoch;
        entry.log.last_seq = last_seq;
        entry.log.assigned_seq = last_seq;
        let current = entry.log.epoch.clone();
        entry.follow.early.keep_after(last_seq, &current);
        self.log_bytes.account(change, "age", &self.metrics);
    }

    /// Checks every followed user against the meta hashes.
    pub(super) fn resync(&mut self, ctx: &mut Context<Self>) {
        let Some(shared) = &mut self.shared else {
            return;
        };
        if shared.resyncing {
            return;
        }
        // What each window held when asked: an answer is only compared with that, never
        // with what was ingested while it was on its way.
        let asked: HashMap<UserId, (Arc<str>, u64)> = self
            .users
            .iter()
            .filter(|(_, e)| e.follow.synced)
            .map(|(id, e)| (id.clone(), (e.log.epoch.clone(), e.log.last_seq)))
            .collect();
        if asked.is_empty() {
            return;
        }
        shared.resyncing = true;
        let link = shared.link.clone();
        let users: Vec<UserId> = asked.keys().cloned().collect();
        ctx.spawn(
            actix::fut::wrap_future(async move { link.tops(users).await }).map(
                move |tops, act: &mut Self, ctx| {
                    if let Some(shared) = &mut act.shared {
                        shared.resyncing = false;
                    }
                    let Ok(tops) = tops else {
                        return;
                    };
                    for top in tops {
                        if let Some(was) = asked.get(&top.user) {
                            act.check_top(top, was, ctx);
                        }
                    }
                },
            ),
        );
    }

    /// `top` is the user's epoch and newest seq as Redis said after the window was at `was`.
    fn check_top(&mut self, top: Top, was: &(Arc<str>, u64), ctx: &mut Context<Self>) {
        let Top { user, epoch, top } = top;
        let Some(entry) = self.users.get_mut(&user) else {
            return;
        };
        // Not followed any more, or moved on to another epoch since: the answer is stale.
        if !entry.follow.synced || entry.log.epoch != was.0 {
            return;
        }
        if epoch != entry.log.epoch {
            self.lose_history(&user, epoch, 0, "its history was lost (a new epoch)");
        } else if top < was.1 {
            // Redis has fewer events than this node had seen under the same epoch: it lost
            // its newest (a restart from an old snapshot, a failover to a lagging replica).
            self.renew_epoch(&user, epoch, ctx);
            return;
        }
        if self.users.get(&user).is_some_and(|e| top > e.log.last_seq) {
            self.repair(&user, ctx);
        }
    }

    /// Redis gave out seqs again under an unchanged epoch: starts a new history there (if no
    /// node did yet), so that every node and every resuming client sees the change.
    fn renew_epoch(&mut self, user: &UserId, old: Arc<str>, ctx: &mut Context<Self>) {
        let Some(link) = self.shared.as_ref().map(|s| s.link.clone()) else {
            return;
        };
        log::warn!(
            "user {user}: Redis lost its newest events under epoch {old}; starting a new one"
        );
        let Some(entry) = self.users.get_mut(user) else {
            return;
        };
        if entry.follow.renewing {
            return;
        }
        // Until the new epoch is known here, no one joins under the old one: its seqs are
        // being given out again.
        entry.follow.renewing = true;
        let user = user.clone();
        ctx.spawn(
            actix::fut::wrap_future({
                let user = user.clone();
                async move { link.renew(&user, &old).await }
            })
            .map(move |renewed, act: &mut Self, ctx| {
                let Some(entry) = act.users.get_mut(&user) else {
                    return;
                };
                entry.follow.renewing = false;
                let waiting = std::mem::take(&mut entry.follow.waiting);
                match renewed {
                    Ok(epoch) => {
                        if entry.log.epoch != epoch {
                            act.lose_history(&user, epoch, 0, "its history was lost (a new epoch)");
                            act.repair(&user, ctx);
                        }
                        for (connect, answer) in waiting {
                            let join = act.join_shared(connect, ctx);
                            ctx.spawn(join.map(|result, _, _| {
                                let _ = answer.send(result);
                            }));
                        }
                    }
                    Err(e) => {
                        log::warn!("user {user}: renewing the epoch: {e}");
                        for (_, answer) in waiting {
                            let _ = answer.send(Err(ConnectRefused::Unavailable));
                        }
                    }
                }
            }),
        );
    }
}
