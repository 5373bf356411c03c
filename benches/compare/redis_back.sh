#!/usr/bin/env bash
# How soon a router on Redis leaves degraded mode once Redis is back: one router (release
# build) on a private redis-server, a node heartbeating it every 0.5 s so that /readyz can
# say ready; each round kills Redis (SIGKILL), waits DOWN s, starts it again on the same
# port, and times until /readyz answers 200 (polled every 10 ms; bounded: 20 s a round).
#
#   bash benches/compare/redis_back.sh               # 5 rounds of 1, 3 and 6 s down
#   ROUNDS=3 DOWNS="2" bash benches/compare/redis_back.sh
#
# Needs redis-server (installed with apt-get if missing); always a private one, since the
# script kills it. Everything listens on 127.0.0.1 and is stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/../.."

ROUNDS=${ROUNDS:-5}
DOWNS=${DOWNS:-"1 3 6"}
OUT=${OUT:-target/compare-redis-back}
export RUST_LOG=${RUST_LOG:-warn}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

# shellcheck source=benches/compare/lib.sh
source benches/compare/lib.sh # (the script runs from the repository root)
need_redis_server
build_release

REDIS_PID=
stop_redis() {
  if [ -n "$REDIS_PID" ]; then
    kill -9 "$REDIS_PID" 2>/dev/null || true
    wait "$REDIS_PID" 2>/dev/null || true
    REDIS_PID=
  fi
}
cleanup() {
  stop_started
  stop_redis
}
trap cleanup EXIT
trap 'exit 130' INT TERM

RPORT=$(free_port)
start_redis() { start_private_redis "$RPORT" "$OUT/redis.log"; }

HTTP=$(free_port)
cat >"$OUT/router.toml" <<EOF
[server]
listen = "127.0.0.1:$HTTP"
[store]
kind = "redis"
url = "redis://127.0.0.1:$RPORT/0"
key_prefix = "redis-back-$(rand | head -c 8)"
EOF

ready() { [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$HTTP/readyz" || true)" = 200 ]; }
wait_ready() { # bounded: 20 s
  local i
  for i in $(seq 1 2000); do
    ready && return 0
    sleep 0.01
  done
  return 1
}

start_redis
"$BIN" serve --config "$OUT/router.toml" >"$OUT/router.log" 2>&1 &
PIDS+=($!)
(
  # The node: bounded, at most 10 minutes.
  for _ in $(seq 1 1200); do
    curl -s -o /dev/null -H "Authorization: Bearer $ROOMROUTER_NODE_TOKEN" \
      -H 'content-type: application/json' -d '{"url":"http://127.0.0.1:1","capacity":100,"load":0}' \
      "http://127.0.0.1:$HTTP/v1/nodes/n1/heartbeat" || true
    sleep 0.5
  done
) &
PIDS+=($!)
wait_ready || { echo "the router never got ready; see $OUT/router.log" >&2; exit 1; }

for down in $DOWNS; do
  for round in $(seq 1 "$ROUNDS"); do
    stop_redis
    sleep "$down"
    start_redis
    t0=$(date +%s%N)
    if wait_ready; then
      echo "down ${down} s, round $round: ready $((($(date +%s%N) - t0) / 1000000)) ms after Redis was back"
    else
      echo "down ${down} s, round $round: not ready within 20 s"
    fi
  done
done
