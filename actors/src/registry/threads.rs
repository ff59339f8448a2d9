//! Finding a thread's running run (`FindThreadRun`), for the AI SDK's resume
//! (`GET /v1/ai-sdk/{agent}/{id}/stream`): the run and where its events begin in the user's log.
//!
//! This node's run table first; with a shared log (Redis), a run started on another node is
//! found among the user's running runs there (at most `--max-runs-per-user` records read).

use actix::prelude::*;

use super::ConnectionRegistry;
use crate::router::{FindRefused, FindThreadRun, ThreadRun};

impl Handler<FindThreadRun> for ConnectionRegistry {
    type Result = ResponseActFuture<Self, Result<Option<ThreadRun>, FindRefused>>;

    fn handle(&mut self, msg: FindThreadRun, _: &mut Context<Self>) -> Self::Result {
        if let Some((run_id, run)) =
            self.runs
                .running_in_thread(&msg.user, &msg.thread_id, &msg.agent)
        {
            let after_seq = match run.seqs {
                Some((first, _)) => first.saturating_sub(1),
                // None of its events is numbered yet: each will come after the user's latest.
                None => self.users.get(&msg.user).map_or(0, |u| u.log.last_seq),
            };
            let found = ThreadRun {
                run_id: run_id.clone(),
                after_seq,
            };
            return Box::pin(actix::fut::ready(Ok(Some(found))));
        }
        let Some(link) = self.shared.as_ref().map(|s| s.link.clone()) else {
            return Box::pin(actix::fut::ready(Ok(None)));
        };
        Box::pin(actix::fut::wrap_future(async move {
            match link.thread_run(&msg.user, &msg.thread_id, &msg.agent).await {
                Ok(found) => Ok(found.map(|(run_id, after_seq)| ThreadRun {
                    run_id: run_id.into(),
                    after_seq,
                })),
                Err(e) => {
                    log::warn!("finding the running run of a thread of {}: {e}", msg.user);
                    Err(FindRefused::Unavailable)
                }
            }
        }))
    }
}
