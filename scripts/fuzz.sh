#!/usr/bin/env bash
# Fuzzes agentcast's parsers with cargo-fuzz (fuzz/README.md says what each target checks).
# Builds every target, then runs each for SECONDS (default 600) in turn: one libFuzzer
# process at a time, in-process (no -jobs/-fork, so exactly one process), under `nice -n 10`.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]      # default: all five targets
#
# Needs a nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`). Targets are built
# with AddressSanitizer, debug assertions and overflow checks (`-O -a`).
#
# Corpora grow in fuzz/corpus/<target>/ (only the seed-* files there are committed).
# libFuzzer's own log of each run is fuzz/target/fuzz-logs/<target>.log.
#
# A crash is a panic or failed assertion, a sanitizer report, a stack overflow, an input that
# runs over 10 s (-timeout) or over 2 GiB (-rss_limit_mb). Its input is copied to
# fuzz/regressions/<target>/, the remaining targets still run, and the script exits 1.
# To reproduce one (runs that input once, with the panic message and backtrace):
#   cd fuzz && RUST_BACKTRACE=1 cargo +nightly fuzz run -O -a <target> regressions/<target>/<file>
# to shrink it: cargo +nightly fuzz tmin -O -a <target> regressions/<target>/<file>
# and to see it as bytes: cargo +nightly fuzz fmt <target> regressions/<target>/<file>
# Then add a regression test to the crate that owns the code (or to tests/it/properties.rs).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

SECONDS_EACH=${1:-600}
shift || true
ALL=(client_frame jwt stream_query scripted calculator)
if [ $# -gt 0 ]; then TARGETS=("$@"); else TARGETS=("${ALL[@]}"); fi

command -v cargo >/dev/null || { echo "FATAL: cargo not found" >&2; exit 2; }
cargo +nightly --version >/dev/null 2>&1 || {
  echo "FATAL: no nightly toolchain: rustup toolchain install nightly" >&2; exit 2; }
cargo +nightly fuzz --version >/dev/null 2>&1 || {
  echo "FATAL: cargo-fuzz missing: cargo install cargo-fuzz" >&2; exit 2; }

# Longest input per target: over the calculator's 1 KiB bound, under the frame limit (64 KiB)
# where bigger inputs would only slow the search.
max_len() {
  case $1 in
    calculator) echo 2048 ;;
    stream_query) echo 1024 ;;
    *) echo 4096 ;;
  esac
}

echo "== building ${TARGETS[*]} ($(cargo +nightly --version))"
nice -n 10 cargo +nightly fuzz build -O -a

mkdir -p target/fuzz-logs
failed=()
for t in "${TARGETS[@]}"; do
  mkdir -p "corpus/$t" "artifacts/$t"
  log="target/fuzz-logs/$t.log"
  dict=()
  [ -f "dict/$t.dict" ] && dict=("-dict=dict/$t.dict")
  echo "== $t: ${SECONDS_EACH}s (log: fuzz/$log)"
  set +e
  nice -n 10 cargo +nightly fuzz run -O -a "$t" "corpus/$t" -- \
    -max_total_time="$SECONDS_EACH" -timeout=10 -rss_limit_mb=2048 \
    -max_len="$(max_len "$t")" -print_final_stats=1 "${dict[@]}" >"$log" 2>&1
  rc=$?
  set -e
  grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -1 || true
  grep -E '^stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb)' "$log" || true
  echo "   corpus: $(find "corpus/$t" -type f | wc -l) files"
  if [ "$rc" -ne 0 ]; then
    failed+=("$t")
    mkdir -p "regressions/$t"
    # libFuzzer names the input it stopped on: "Test unit written to <path>".
    for unit in $(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log"); do
      [ -f "$unit" ] && cp -v "$unit" "regressions/$t/"
    done
    echo "!! $t failed (exit $rc): see fuzz/$log; inputs in fuzz/regressions/$t/" >&2
    grep -E -m5 "panicked at|ERROR: (libFuzzer|AddressSanitizer)|SUMMARY" "$log" >&2 || true
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "== crashes in: ${failed[*]}" >&2
  exit 1
fi
echo "== no crash in ${TARGETS[*]}"
