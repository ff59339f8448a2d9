#!/usr/bin/env bash
# Runs the shell examples of README.md against a real dev-mode server, so that a reader who
# copies them gets what the README says. scripts/test.sh (so CI) calls it.
#
#   bash scripts/readme-test.sh                                   # builds target/debug/agentcast
#   AGENTCAST_BIN=target/release/agentcast bash scripts/readme-test.sh
#
# Which examples: every ```sh block of README.md, in order, in ONE bash with
# `set -euo pipefail`, as a reader would paste them into one terminal (a variable one block
# sets, e.g. T, is there for the next). A block is left out only when the line right before
# its opening fence is a marker
#
#   <!-- not-tested: why -->
#
# (the server itself, the test command, long benchmarks). Other fences (```json, ```text) are
# not shell; ```bash, ```shell and ```console are refused, so that no example goes untested by
# a slip of the fence.
#
# What is changed for the run, and nothing else:
#   - a dev-mode server is started on a free port (--bind 127.0.0.1:0; the port is read from
#     its "listening on [ADDR" log line), and `localhost:8080` / `127.0.0.1:8080` in the blocks
#     become its address; `agentcast watch` finds it through AGENTCAST_URL;
#   - `cargo run --release -- ARGS` runs the binary under test with ARGS (the server a reader
#     started with `cargo run --release` is this one); any other cargo command is refused, so
#     a block that builds or benchmarks must be marked;
#   - curl gets --fail-with-body: an HTTP error fails the block (a reader would see it).
# The blocks get 180 s in all. The first failing command stops everything: the script names
# the block, shows the server's log, and exits non-zero.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
readme=${READMETEST_README:-README.md}   # another file only to test this script

for tool in curl jq; do
    command -v "$tool" >/dev/null || { echo "FATAL: readme-test needs $tool (apt-get install $tool)" >&2; exit 1; }
done

if [ -n "${AGENTCAST_BIN:-}" ]; then
    bin=$AGENTCAST_BIN
else
    bin=target/debug/agentcast
    cargo build --quiet --locked
fi
case "$bin" in /*) ;; *) bin="$root/$bin" ;; esac
[ -x "$bin" ] || { echo "FATAL: AGENTCAST_BIN=$bin is not an executable" >&2; exit 1; }

tmp=$(mktemp -d)
server_pid=
cleanup() {
    if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
        kill -TERM "$server_pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$server_pid" 2>/dev/null || true
    fi
    rm -rf "$tmp"
}
trap cleanup EXIT

# ---- the blocks -------------------------------------------------------------------------------
# One file per block, named by the README line of its fence; NAME.skip beside the untested ones.
awk -v dir="$tmp" '
    function fail(msg) { print "FATAL: " FILENAME " line " NR ": " msg > "/dev/stderr"; bad = 1; exit 1 }
    !inblock && /^```(bash|shell|console|zsh)[[:space:]]*$/ { fail("shell examples are ```sh blocks (the README test runs only those)") }
    !inblock && /^```sh[[:space:]]*$/ {
        inblock = 1; start = NR; file = sprintf("%s/block-%05d", dir, NR)
        printf "" > file
        if (prev ~ /^<!-- not-tested: [^ ].*-->[[:space:]]*$/) { print prev > (file ".skip"); close(file ".skip") }
        else if (prev ~ /not-tested/) fail("a marker is <!-- not-tested: why -->")
        pending = 0; prev = $0; next
    }
    inblock && /^```[[:space:]]*$/ { inblock = 0; close(file); prev = $0; next }
    inblock { print > file; prev = $0; next }
    pending { fail("<!-- not-tested: ... --> on line " pending " is not followed by a ```sh fence") }
    /^<!-- not-tested/ { pending = NR }
    { prev = $0 }
    END {
        if (bad) exit 1
        if (inblock) { print "FATAL: " FILENAME ": the block of line " start " is never closed" > "/dev/stderr"; exit 1 }
        if (pending) { print "FATAL: " FILENAME ": the marker of line " pending " is not followed by a ```sh fence" > "/dev/stderr"; exit 1 }
    }
' "$readme"

tested=()
skipped=()
for block in "$tmp"/block-*; do
    case "$block" in *.skip) continue ;; esac
    line=$((10#${block##*-}))
    if [ -e "$block.skip" ]; then skipped+=("$line"); else tested+=("$line"); fi
done
[ ${#tested[@]} -gt 0 ] || { echo "FATAL: no tested \`\`\`sh block in $readme" >&2; exit 1; }

# ---- the server -------------------------------------------------------------------------------
# Dev mode: no AGENTCAST_* setting from outside.
unset_agentcast=()
for name in $(compgen -e | grep '^AGENTCAST_' || true); do unset_agentcast+=(-u "$name"); done
env "${unset_agentcast[@]}" RUST_LOG=info "$bin" --bind 127.0.0.1:0 --drain-secs 2 \
    2>"$tmp/server.log" >/dev/null &
server_pid=$!
port=
for _ in $(seq 200); do
    port=$(grep -o 'listening on \[127\.0\.0\.1:[0-9]*' "$tmp/server.log" | grep -o '[0-9]*$' || true)
    [ -n "$port" ] && break
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.1
done
if [ -z "$port" ]; then
    cat "$tmp/server.log" >&2
    echo "FATAL: the server did not say where it listens" >&2
    exit 1
fi
addr=127.0.0.1:$port

# ---- one script of the tested blocks ----------------------------------------------------------
script=$tmp/readme.sh
{
    cat <<'PRELUDE'
set -Eeuo pipefail
trap 'rc=$?; echo "FAIL: README block of line $readme_line: \`$BASH_COMMAND\` exited $rc" >&2' ERR
cargo() {
    if [ "${1-}" = run ] && [ "${2-}" = --release ] && [ "${3-}" = -- ]; then
        shift 3
        "$READMETEST_BIN" "$@"
    else
        echo "readme-test: 'cargo $*' is not run here: mark the block <!-- not-tested: why -->" >&2
        return 1
    fi
}
curl() { command curl --fail-with-body -S "$@"; }
PRELUDE
    for line in "${tested[@]}"; do
        block=$(printf '%s/block-%05d' "$tmp" "$line")
        echo "readme_line=$line"
        printf 'echo %q\n' "== $readme line $line"
        sed 's/^/  $ /' "$block" | while IFS= read -r shown; do printf 'echo %q\n' "$shown"; done
        sed -e "s#localhost:8080#$addr#g" -e "s#127\.0\.0\.1:8080#$addr#g" "$block"
    done
    echo "echo \"== $readme: every tested block ran\""
} >"$script"

echo "== readme-test: ${#tested[@]} blocks ($readme lines ${tested[*]}) against the dev-mode server at $addr;" \
    "${#skipped[@]} marked not-tested (lines ${skipped[*]:-none})"
rc=0
env "${unset_agentcast[@]}" READMETEST_BIN="$bin" AGENTCAST_URL="ws://$addr" \
    timeout 180 bash "$script" || rc=$?
if [ "$rc" -ne 0 ]; then
    [ "$rc" -eq 124 ] && echo "FAIL: the README blocks did not finish within 180 s" >&2
    echo "---- server log (last 40 lines) ----" >&2
    tail -n 40 "$tmp/server.log" >&2
    echo "FAIL: readme-test (exit $rc)" >&2
    exit 1
fi
if ! kill -0 "$server_pid" 2>/dev/null; then
    cat "$tmp/server.log" >&2
    echo "FAIL: the server died during the README blocks" >&2
    exit 1
fi
echo "== readme-test: OK"
