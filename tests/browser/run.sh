#!/usr/bin/env bash
# The browser tests: the web page and agentcast.js in Debian's Chromium, driven by
# playwright-core, against real agentcast servers (one per test, dev mode, free port).
#
#   bash tests/browser/run.sh            # from the repository root (or anywhere)
#   AGENTCAST_BIN=target/release/agentcast bash tests/browser/run.sh
#
# Needs node (18+), npm and /usr/bin/chromium (apt-get install chromium). Screenshots go to
# target/browser-screenshots/. Extra arguments go to `node --test` (e.g. a file name).
#
# The binary embeds web/ when it is built: the tests stop at once if it serves an older page
# than web/ holds. AGENTCAST_WEB_DIR=web makes the browser get the page's files from disk
# instead (for working on the page without rebuilding; the check is then skipped).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root"

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

chromium="${CHROMIUM:-/usr/bin/chromium}"
if [ ! -x "$chromium" ]; then
  echo "run.sh: no Chromium at $chromium. Install Debian's: apt-get install chromium" >&2
  echo "        (playwright's own browser download is not used and does not work here)" >&2
  exit 1
fi
export CHROMIUM="$chromium"

for tool in node npm; do
  command -v "$tool" >/dev/null || { echo "run.sh: $tool is needed" >&2; exit 1; }
done

# Fresh screenshots every run.
rm -rf "$root/target/browser-screenshots"
mkdir -p "$root/target/browser-screenshots"
cd "$here"
npm ci --no-audit --no-fund --loglevel=error
if [ "$#" -eq 0 ]; then
  set -- *.test.mjs
fi
exec node --test "$@"
