#!/usr/bin/env bash
# A real local topology on loopback: one Redis, two routers sharing it, three demo nodes.
# Node 1 and 3 heartbeat router A, node 2 router B; each router still sees all three.
#
#   deploy/local/run.sh            run until Ctrl-C, then stop everything it started
#   deploy/local/run.sh --check    start, check that both routers agree, stop, exit 0/1
#
# Env: REDIS_URL to use an existing Redis instead of starting one; BASE_PORT (default 18080):
# routers listen on BASE_PORT+1 and +2, Redis (if started) on BASE_PORT+79.
# Stops only the processes it started (by their process id).
set -euo pipefail
cd "$(dirname "$0")/../.."

CHECK=0
[[ "${1:-}" == "--check" ]] && CHECK=1
BASE_PORT="${BASE_PORT:-18080}"
A_PORT=$((BASE_PORT + 1))
B_PORT=$((BASE_PORT + 2))
REDIS_PORT=$((BASE_PORT + 79))
WORK="$(mktemp -d -t roomrouter-local.XXXXXX)"
PIDS=()

export ROOMROUTER_ADMIN_TOKEN="local-admin-token-0123456789"
export ROOMROUTER_NODE_TOKEN="local-node-token-0123456789"
export ROOMROUTER_TICKET_SECRET="local-ticket-secret-0123456789-0123456789"

stop_all() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap stop_all EXIT
trap 'exit 130' INT TERM

echo "== build"
cargo build --quiet --bin roomrouter
BIN="$(pwd)/target/debug/roomrouter"

if [[ -n "${REDIS_URL:-}" ]]; then
  URL="$REDIS_URL"
else
  command -v redis-server >/dev/null || { echo "redis-server not found (or set REDIS_URL)"; exit 1; }
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
    --dir "$WORK" >"$WORK/redis.log" 2>&1 &
  PIDS+=($!)
  URL="redis://127.0.0.1:$REDIS_PORT"
  for _ in $(seq 1 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
fi
echo "== redis at $URL"

PREFIX="local-$$"
for name in a b; do
  port=$A_PORT; [[ $name == b ]] && port=$B_PORT
  cat >"$WORK/router-$name.toml" <<TOML
[server]
listen = "127.0.0.1:$port"

[store]
kind = "redis"
url = "$URL"
key_prefix = "$PREFIX"
resync_interval = "5s"
TOML
  "$BIN" serve --config "$WORK/router-$name.toml" >"$WORK/router-$name.log" 2>&1 &
  PIDS+=($!)
done

wait_ok() { # url, tries
  for _ in $(seq 1 "$2"); do curl -fsS "$1" >/dev/null 2>&1 && return 0; sleep 0.2; done
  return 1
}
wait_ok "http://127.0.0.1:$A_PORT/healthz" 100 || { cat "$WORK/router-a.log"; exit 1; }
wait_ok "http://127.0.0.1:$B_PORT/healthz" 100 || { cat "$WORK/router-b.log"; exit 1; }

# Each node reports to one router (the other hears of it through Redis), and to the other
# only if that one fails: a router's crash must not look like the node's.
for i in 1 2 3; do
  port=$A_PORT; other=$B_PORT; [[ $i == 2 ]] && { port=$B_PORT; other=$A_PORT; }
  "$BIN" demo-node --router "http://127.0.0.1:$port" --router "http://127.0.0.1:$other" \
    --id "node-$i" --capacity 100 >"$WORK/node-$i.log" 2>&1 &
  PIDS+=($!)
done

healthy_nodes() { # port
  curl -fsS -H "Authorization: Bearer $ROOMROUTER_ADMIN_TOKEN" "http://127.0.0.1:$1/v1/nodes" |
    grep -o '"healthy":true' | wc -l
}
for _ in $(seq 1 50); do
  [[ "$(healthy_nodes "$A_PORT")" == 3 && "$(healthy_nodes "$B_PORT")" == 3 ]] && break
  sleep 0.2
done
echo "== router A sees $(healthy_nodes "$A_PORT") healthy nodes, router B $(healthy_nodes "$B_PORT")"

node_of() { # port room
  curl -fsS "http://127.0.0.1:$1/v1/placement/$2" | sed -n 's/.*"node":"\([^"]*\)".*/\1/p'
}
FAIL=0
[[ "$(healthy_nodes "$A_PORT")" == 3 && "$(healthy_nodes "$B_PORT")" == 3 ]] || FAIL=1
for i in $(seq 1 20); do
  a="$(node_of "$A_PORT" "room-$i")"; b="$(node_of "$B_PORT" "room-$i")"
  if [[ -z "$a" || "$a" != "$b" ]]; then echo "room-$i: A says '$a', B says '$b'"; FAIL=1; fi
done
curl -fsS "http://127.0.0.1:$A_PORT/readyz" >/dev/null || FAIL=1
curl -fsS "http://127.0.0.1:$B_PORT/readyz" >/dev/null || FAIL=1
if [[ $FAIL == 0 ]]; then echo "== OK: both routers agree on 20 rooms"; else echo "== FAILED"; fi

if [[ $CHECK == 1 ]]; then exit $FAIL; fi
echo "router A: http://127.0.0.1:$A_PORT  router B: http://127.0.0.1:$B_PORT  (Ctrl-C stops all)"
echo "admin token: $ROOMROUTER_ADMIN_TOKEN   logs: $WORK"
wait -n "${PIDS[@]}" || true
