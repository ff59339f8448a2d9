#!/usr/bin/env bash
# Several agentcast nodes sharing one Redis, on this machine (PROTOCOL.md §10,
# docs/scale-out.md): a redis-server without persistence on a free port, and NODES (default 2)
# nodes against it, each on a port of its own. Prints their URLs, a token command and the pids
# to play with (kill -STOP the Redis, kill -9 a node, ...); Ctrl-C stops everything.
#
#   scripts/scale-out.sh [serve flags for every node, e.g. --node-timeout-ms 3000]
#
# AGENTCAST_BIN=PATH runs that binary; otherwise `cargo build --release` builds one.
# Without AGENTCAST_JWT_SECRET the nodes run in dev mode (loopback only, one well-known secret
# on every node: a token from any node works on all). Logs go to a temporary directory, removed
# at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

nodes=${NODES:-2}
command -v redis-server >/dev/null ||
  { echo "FATAL: redis-server not found: apt-get install redis-server" >&2; exit 1; }

bin=${AGENTCAST_BIN:-}
if [ -z "$bin" ]; then
  echo "== cargo build --release"
  cargo build --release --quiet
  bin="${CARGO_TARGET_DIR:-target}/release/agentcast"
fi
[ -x "$bin" ] || { echo "FATAL: $bin is not an executable" >&2; exit 1; }

dir=$(mktemp -d "${TMPDIR:-/tmp}/agentcast-scale-out.XXXXXX")
node_pids=()
redis_pid=

cleanup() {
  trap - EXIT INT TERM
  echo
  echo "== stopping"
  # Nodes first (SIGTERM: they drain, see AGENTCAST_DRAIN_SECS below), then Redis.
  for pid in "${node_pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${node_pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [ -n "$redis_pid" ]; then
    kill -CONT "$redis_pid" 2>/dev/null || true # in case it was left paused
    kill -TERM "$redis_pid" 2>/dev/null || true
    wait "$redis_pid" 2>/dev/null || true
  fi
  rm -rf "$dir"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# True when nothing listens on 127.0.0.1:$1.
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# True when the Redis on 127.0.0.1:$1 answers PING (inline command, no redis-cli needed).
redis_ping() {
  (
    exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
    printf 'PING\r\n' >&3
    read -r -t 1 reply <&3 && [[ $reply == +PONG* ]]
  ) 2>/dev/null
}

# Redis on a free port: pick one, and pick again if something took it first.
redis_port=
for _ in 1 2 3 4 5; do
  port=$((20000 + RANDOM % 40000))
  port_free "$port" || continue
  redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no \
    --dir "$dir" --logfile "$dir/redis.log" &
  redis_pid=$!
  for _ in $(seq 100); do
    redis_ping "$port" && { redis_port=$port; break; }
    kill -0 "$redis_pid" 2>/dev/null || break
    sleep 0.1
  done
  [ -n "$redis_port" ] && break
  kill -KILL "$redis_pid" 2>/dev/null || true
  wait "$redis_pid" 2>/dev/null || true
  redis_pid=
done
[ -n "$redis_port" ] || { echo "FATAL: redis-server did not start:" >&2; cat "$dir/redis.log" >&2; exit 1; }
redis_url="redis://127.0.0.1:$redis_port"

# A short drain, so that Ctrl-C does not wait 30 s for running runs (a flag overrides it).
export AGENTCAST_DRAIN_SECS=${AGENTCAST_DRAIN_SECS:-2}
export RUST_LOG=${RUST_LOG:-info}
addrs=()
for i in $(seq "$nodes"); do
  log="$dir/node-$i.log"
  "$bin" serve --bind 127.0.0.1:0 --redis-url "$redis_url" --node-id "node-$i" "$@" >"$log" 2>&1 &
  node_pids+=($!)
  addr=
  for _ in $(seq 300); do
    addr=$(grep -o 'listening on \[[^],]*' "$log" | head -n1 | sed 's/.*\[//') || true
    [ -n "$addr" ] && break
    kill -0 "${node_pids[-1]}" 2>/dev/null || break
    sleep 0.1
  done
  [ -n "$addr" ] || { echo "FATAL: node-$i did not start; its log:" >&2; cat "$log" >&2; exit 1; }
  addrs+=("$addr")
done

echo
echo "redis   $redis_url   pid $redis_pid   (no persistence; log $dir/redis.log)"
for i in $(seq "$nodes"); do
  a=${addrs[$((i - 1))]}
  echo "node-$i  http://$a/   ws://$a/v1/ws   pid ${node_pids[$((i - 1))]}   (log $dir/node-$i.log)"
done
echo
if [ -n "${AGENTCAST_JWT_SECRET:-}" ]; then
  echo "token:  T=\$($bin token alice)   # signed with AGENTCAST_JWT_SECRET, like the nodes"
else
  echo "token:  T=\$(curl -s -XPOST http://${addrs[0]}/v1/dev/token -d '{\"user\":\"alice\"}' | jq -r .token)"
fi
echo "watch:  $bin watch --url ws://${addrs[0]} --token \"\$T\" alice   # on node-1"
echo "run:    $bin watch --url ws://${addrs[$((nodes - 1))]} --token \"\$T\" alice echo '\"hi\"'   # on node-$nodes"
echo "faults: kill -STOP $redis_pid / kill -CONT $redis_pid (pause Redis), kill -9 ${node_pids[0]} (node-1 dies)"
echo "metrics: curl -s http://${addrs[0]}/metrics | grep -E 'agentcast_(redis_up|runs_running|connections) '"
echo
echo "Ctrl-C stops everything."
# Until Ctrl-C, or until every node has exited (a node killed by hand leaves the others up).
wait "${node_pids[@]}" || true
