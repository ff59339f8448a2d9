#!/usr/bin/env bash
# The test command (README.md): installs what the tests need on a fresh Debian machine, then
# runs every test: unit, doc and integration tests (real servers on 127.0.0.1), the shell
# examples of README.md (scripts/readme-test.sh), the bench harness at a small scale (zero-loss
# checks included), and the browser tests in Chromium. The scale-out tests (tests/it/scale_out.rs)
# start real redis-server processes: Debian's redis-server package. examples/publish.py runs
# under python3 (tests/it/publish.rs). The frontend tests read
# POST /v1/agui and /v1/ai-sdk with the real @ag-ui/client and ai packages (npm ci).
# CI (.ci/run) calls exactly this. Anything missing or failing stops it loudly.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cargo >/dev/null || { echo "FATAL: cargo not found: install Rust (rustup) first" >&2; exit 1; }

missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium)
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
command -v curl >/dev/null || missing+=(curl)
command -v jq >/dev/null || missing+=(jq)
command -v redis-server >/dev/null || missing+=(redis-server)
command -v python3 >/dev/null || missing+=(python3)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    echo "== installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
  else
    echo "FATAL: the tests need: ${missing[*]} (apt-get install ${missing[*]})" >&2
    exit 1
  fi
fi

echo "== $(cargo --version), node $(node --version), $(/usr/bin/chromium --version 2>/dev/null), $(redis-server --version | cut -d' ' -f1-3), $(nproc) cores"

echo "== format and lint (cargo fmt --check, cargo clippy -D warnings)"
rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy
cargo fmt --all --check || { echo "FAIL: cargo fmt would change files: run cargo fmt --all" >&2; exit 1; }
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== unit, doc and integration tests"
cargo test --workspace --locked

echo "== README.md shell examples, against a dev-mode server"
AGENTCAST_BIN=target/debug/agentcast bash scripts/readme-test.sh

if [ -f scripts/bench-smoke.sh ]; then
  echo "== bench harness, small scale"
  bash scripts/bench-smoke.sh
fi

echo "== browser tests"
AGENTCAST_BIN=target/debug/agentcast bash tests/browser/run.sh

echo "== frontend protocol tests (@ag-ui/client and ai, pinned, npm ci)"
AGENTCAST_BIN=target/debug/agentcast bash tests/frontends/run.sh
