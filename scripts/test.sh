#!/usr/bin/env bash
# The test command (README.md): installs what the tests need on a fresh Debian machine, then
# runs every test. CI (.ci/run) calls exactly this. Anything missing fails loudly.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cargo >/dev/null || { echo "FATAL: cargo not found: install Rust (rustup) first" >&2; exit 1; }
echo "== $(cargo --version) on $(nproc) cores"

echo "== unit, doc and integration tests"
cargo test --workspace --locked
