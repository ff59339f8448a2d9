//! Finding a thread's running run (`FindThreadRun`), for the AI SDK's resume
//! (`GET /v1/ai-sdk/{agent}/{id}/stream`): the run and where its events begin in the user's log.
//!
//! Only this node's run table is searched: with a shared log (Redis) a run started on another
//! node is not found here (the route then answers as if none were running).

use actix::prelude::*;

use super::ConnectionRegistry;
use crate::router::{FindThreadRun, ThreadRun};

impl Handler<FindThreadRun> for ConnectionRegistry {
    type Result = Option<ThreadRun>;

    fn handle(&mut self, msg: FindThreadRun, _: &mut Context<Self>) -> Self::Result {
        let (run_id, run) = self
            .runs
            .running_in_thread(&msg.user, &msg.thread_id, &msg.agent)?;
        let after_seq = match run.seqs {
            Some((first, _)) => first.saturating_sub(1),
            // None of its events is numbered yet: each will come after the user's latest.
            None => self.users.get(&msg.user).map_or(0, |u| u.log.last_seq),
        };
        Some(ThreadRun {
            run_id: run_id.clone(),
            after_seq,
        })
    }
}
