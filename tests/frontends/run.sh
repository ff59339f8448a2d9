#!/usr/bin/env bash
# The frontend tests: POST /v1/agui and /v1/ai-sdk (PROTOCOL.md section 13) read by the
# frontends' own clients, @ag-ui/client and ai (exact versions in package.json), against
# real agentcast servers (dev mode, free port).
#
#   bash tests/frontends/run.sh            # from the repository root (or anywhere)
#   AGENTCAST_BIN=target/release/agentcast bash tests/frontends/run.sh
#
# Needs node (18+) and npm. Extra arguments go to `node --test` (e.g. a file name).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root"

for tool in node npm; do
  command -v "$tool" >/dev/null || { echo "run.sh: $tool is needed (apt-get install nodejs npm)" >&2; exit 1; }
done

bin="${AGENTCAST_BIN:-target/debug/agentcast}"
case "$bin" in /*) ;; *) bin="$root/$bin" ;; esac
if [ ! -x "$bin" ]; then
  if [ -n "${AGENTCAST_BIN:-}" ]; then
    echo "run.sh: AGENTCAST_BIN=$AGENTCAST_BIN is not an executable" >&2
    exit 1
  fi
  echo "run.sh: no $bin, building it (cargo build)" >&2
  cargo build
fi
export AGENTCAST_BIN="$bin"

cd "$here"
npm ci --no-audit --no-fund --loglevel=error
if [ "$#" -eq 0 ]; then
  set -- *.test.mjs
fi
exec node --test "$@"
