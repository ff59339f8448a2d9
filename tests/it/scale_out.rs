//! Several nodes on one Redis (PROTOCOL.md §10): a real `redis-server` (common/redis.rs).

use std::time::{Duration, Instant};

use crate::common::*;

// ---------------------------------------------------------------------------------------------
// The fixture itself (needs redis-server, not agentcast's Redis support)
// ---------------------------------------------------------------------------------------------

/// The RedisServer fixture answers, pauses (no answer, data kept), resumes, is killed (port
/// refuses) and restarts empty on the same port, and is gone once dropped.
#[test]
fn redis_fixture_starts_pauses_kills_and_restarts_empty() {
    let mut redis = RedisServer::start();
    let (port, url) = (redis.port(), redis.url());
    assert_eq!(url, format!("redis://127.0.0.1:{port}"));
    assert!(redis.ping_within(TIMEOUT), "{}", redis.log_tail());
    assert_eq!(redis.command(&["SET", "k", "v"]), Ok("OK".into()));
    assert_eq!(redis.command(&["GET", "k"]), Ok("v".into()));
    assert_eq!(
        redis.command(&["CONFIG", "GET", "save"]),
        Ok("save\n".into()),
        "no RDB snapshots"
    );
    assert_eq!(
        redis.command(&["CONFIG", "GET", "appendonly"]),
        Ok("appendonly\nno".into()),
        "no AOF"
    );

    redis.pause();
    let t0 = Instant::now();
    assert!(
        !redis.ping_within(Duration::from_millis(300)),
        "a paused redis-server answered"
    );
    assert!(t0.elapsed() >= Duration::from_millis(250), "no timeout?");
    redis.resume();
    assert!(redis.ping_within(TIMEOUT), "no answer after SIGCONT");
    assert_eq!(
        redis.command(&["GET", "k"]),
        Ok("v".into()),
        "a pause keeps data"
    );

    let pid = redis.pid();
    redis.kill();
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "redis-server {pid} still exists after kill"
    );
    let refused = redis.command_within(&["PING"], Duration::from_secs(1));
    assert!(
        refused.is_err(),
        "a killed redis-server answered: {refused:?}"
    );
    redis.kill(); // again: nothing to do

    redis.restart_empty();
    assert_eq!(redis.url(), url, "a restart keeps the port");
    assert_ne!(redis.pid(), pid);
    assert_eq!(
        redis.command(&["GET", "k"]),
        Ok("(nil)".into()),
        "restarted empty"
    );
    assert_eq!(redis.command(&["DBSIZE"]), Ok("0".into()));
    assert!(redis.command(&["NO-SUCH-COMMAND"]).is_err());

    let pid = redis.pid();
    drop(redis);
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "redis-server {pid} outlived its fixture"
    );
}
