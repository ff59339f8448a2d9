#!/usr/bin/env bash
# The load harness at a small scale, so that it keeps working (docs/performance.md). Every run
# does its real zero-loss checks (each connection's seq contiguous, no duplicate, no foreign
# run, every run completed) and the harness exits non-zero on any of them; so does this script.
# The last runs make sure the checks still catch a loss, and a published event duplicated or
# dropped. The runs take about 20 s on 2 cores once the bench is built; results go to
# target/bench-smoke.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cargo >/dev/null || { echo "FATAL: cargo not found: install Rust (rustup) first" >&2; exit 1; }
results=target/bench-smoke.jsonl
mkdir -p target
rm -f "$results"

load() {
    cargo bench --quiet --locked --bench load -- --results "$results" --timeout-secs 60 "$@"
}

t0=$(date +%s)
echo "== bench-smoke: building the harness and the server (bench profile)"
cargo bench --locked --bench load --no-run
t1=$(date +%s)

echo "== fanout: 50 users x 2 tabs, 5 runs each (2 at a time)"
load --scenario fanout --users 50 --tabs 2 --runs 5 --label smoke

echo "== storm: 100 connections drop at once mid-run and resume"
load --scenario storm --connections 100 --label smoke

echo "== slow: 2 of 20 tabs stop reading"
load --scenario slow --users 10 --slow-clients 2 --label smoke

# Published runs (PROTOCOL.md section 11): the events come over HTTP in batches, a quarter of
# them resent or overlapping; every tab checks each event's text against what was published.
echo "== publish: 2 publishers x 20 users x 2 tabs, 3 runs each, batches of 7, retry rate 0.25"
load --scenario publish --publishers 2 --users 20 --tabs 2 --runs 3 --batch 7 --retry-rate 0.25 --label smoke

# Two nodes on one Redis (PROTOCOL.md section 10): each user's two tabs are on different nodes,
# so every event crosses nodes, and the tabs must still get the same frames under every seq.
command -v redis-server >/dev/null ||
    { echo "FAIL: no redis-server on PATH: apt-get install redis-server (scripts/test.sh does)" >&2; exit 1; }
echo "== fanout on 2 nodes sharing a Redis: 20 users x 2 tabs, one tab on each node"
load --scenario fanout --users 20 --tabs 2 --runs 3 --nodes 2 --label smoke-2-nodes

# This run must fail: its output goes to a log, shown (each line prefixed) only when it did not
# fail as it should, and its verdict is printed as the expected failure it is, so that a scan of
# the log for failures finds none here.
echo "== the checks catch a loss: storm against a server that keeps 1 event for resume (must fail)"
must_fail_log=target/bench-smoke-must-fail.log
show_must_fail_log() { sed 's/^/    must-fail run | /' "$must_fail_log"; }
set +e
load --scenario storm --connections 40 --step-sleep-ms 2 --storm-after-ms 100 --storm-pause-ms 200 \
    --stall-secs 2 --server-arg=--replay-capacity=1 --label smoke-must-fail >"$must_fail_log" 2>&1
rc=$?
set -e
if [ "$rc" -ne 1 ]; then
    show_must_fail_log
    echo "FAIL: the harness should have reported lost events (exit 1), it exited $rc" >&2
    exit 1
fi
if ! caught=$(grep -E "FAILED: .*(resume_failures|gaps)" "$must_fail_log" | sed 's/.*FAILED: //' | paste -sd ';'); then
    show_must_fail_log
    echo "FAIL: the harness exited 1 without reporting lost events (resume_failures or gaps)" >&2
    exit 1
fi
echo "   expected failure (the checks must catch a loss): the harness reported $caught"

# The publish checks must catch what a server that duplicates or drops an event would deliver:
# publisher 0 puts an already-published text under a fresh n, or n+1's text under n.
for fault in duplicate drop; do
    case $fault in duplicate) what=duplicated ;; drop) what=dropped ;; esac
    echo "== the checks catch a published event ${what} (must fail)"
    set +e
    load --scenario publish --publishers 2 --users 4 --tabs 2 --runs 2 --inject "$fault" \
        --stall-secs 2 --label "smoke-must-fail-$fault" >"$must_fail_log" 2>&1
    rc=$?
    set -e
    if [ "$rc" -ne 1 ]; then
        show_must_fail_log
        echo "FAIL: the harness should have reported a ${what} event (exit 1), it exited $rc" >&2
        exit 1
    fi
    if ! caught=$(grep -E "FAILED: .*wrong_event" "$must_fail_log" | sed 's/.*FAILED: //' | paste -sd ';'); then
        show_must_fail_log
        echo "FAIL: the harness exited 1 without reporting the ${what} event (wrong_event)" >&2
        exit 1
    fi
    echo "   expected failure (the checks must catch it): the harness reported $caught"
done

t2=$(date +%s)
echo "== bench-smoke: OK (build $((t1 - t0)) s, runs $((t2 - t1)) s; results in $results)"
