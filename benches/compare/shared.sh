#!/usr/bin/env bash
# placement.share_reservations on the real system: two routers on one Redis, four demo nodes,
# a burst of new rooms placed through both routers right after a fresh node joined.
#
#   0 s   routers A and B (Redis store), nodes media-1..3 (capacity 2500; 1-2 report to A,
#         3 to B); `roomrouter load` sends joins round-robin to both routers, follows the
#         redirects to the nodes, every room with its true size as ?size= (--size-hints)
#   2 s   burst 1: 150 new rooms of 10-30 participants within a second (about 0.4 of media-1..3)
#   12 s  media-4 starts, empty, reporting to B
#   16 s  burst 2: 100 new rooms: placed well, about 1250 participants on media-4 and 250 on
#         each of the others (all four near 0.5)
#
# Without sharing each router fills media-4 up to the others' level with its own rooms, both
# do, and media-4 gets twice its share. The figure is the highest node utilization (reported
# participants / capacity) and max/mean at that moment, per seed, with sharing off and on,
# alternating. Participants stay 40 s, so nobody leaves before the peak.
#
#   bash benches/compare/shared.sh            # seeds 1-3
#   SEEDS="1 2 3 4 5" bash benches/compare/shared.sh
#
# Redis: $REDIS_URL if set, else a private redis-server from PATH on a free port (installed
# with apt-get if missing); keys under a fresh prefix, deleted at the end. Everything listens
# on 127.0.0.1 and is stopped at the end. Builds the release binary.
set -euo pipefail
cd "$(dirname "$0")/../.."

SEEDS=${SEEDS:-"1 2 3"}
OUT=${OUT:-target/compare-shared}
export RUST_LOG=${RUST_LOG:-warn}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

# shellcheck source=benches/compare/lib.sh
source benches/compare/lib.sh # (the script runs from the repository root)
need_redis_server
build_release

REDIS_PID=
cleanup() {
  stop_started
  if [ -n "$REDIS_PID" ]; then
    kill "$REDIS_PID" 2>/dev/null || true
    wait "$REDIS_PID" 2>/dev/null || true
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ -n "${REDIS_URL:-}" ]; then
  URL=$REDIS_URL
else
  RPORT=$(free_port)
  redis-server --port "$RPORT" --bind 127.0.0.1 --save '' --appendonly no >"$OUT/redis.log" 2>&1 &
  REDIS_PID=$!
  URL="redis://127.0.0.1:$RPORT"
  for _ in $(seq 1 50); do redis-cli -u "$URL" ping >/dev/null 2>&1 && break; sleep 0.1; done
fi
echo "== redis at $URL"

wait_http() { # URL; bounded: 10 s
  local i
  for i in $(seq 1 100); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "$1" || true)" = 200 ] && return 0
    sleep 0.1
  done
  echo "timed out waiting for $1" >&2
  return 1
}

start_node() { # ID ROUTER_PORT
  local port
  port=$(free_port)
  "$BIN" demo-node --router "http://127.0.0.1:$2" --id "$1" --capacity 2500 \
    --listen "127.0.0.1:$port" >"$OUT/$1.log" 2>&1 &
  PIDS+=($!)
}

run() { # SHARE SEED
  local share=$1 seed=$2 prefix="shared-bench-$1-$2-$$" r port
  declare -A PORT
  for r in a b; do
    port=$(free_port)
    PORT[$r]=$port
    cat >"$OUT/router-$r.toml" <<EOF
[server]
listen = "127.0.0.1:$port"
[placement]
share_reservations = $share
[store]
kind = "redis"
url = "$URL"
key_prefix = "$prefix"
EOF
    "$BIN" serve --config "$OUT/router-$r.toml" >"$OUT/router-$r-$share-$seed.log" 2>&1 &
    PIDS+=($!)
  done
  for r in a b; do wait_http "http://127.0.0.1:${PORT[$r]}/healthz"; done
  start_node media-1 "${PORT[a]}"
  start_node media-2 "${PORT[a]}"
  start_node media-3 "${PORT[b]}"
  sleep 3 # both routers hear of the three nodes (heartbeats every 2 s)
  (sleep 12 && exec "$BIN" demo-node --router "http://127.0.0.1:${PORT[b]}" --id media-4 \
    --capacity 2500 --listen "127.0.0.1:$(free_port)" >"$OUT/media-4.log" 2>&1) &
  PIDS+=($!)
  "$BIN" load --router "http://127.0.0.1:${PORT[a]}" --router "http://127.0.0.1:${PORT[b]}" \
    --rate 5 --duration 30 --burst 2:150 --burst 16:100 --size uniform:10:30 --stay fixed:40 \
    --spread 4 --size-hints --rooms 100000 --zipf 0.01 --connections 128 --seed "$seed" \
    --quiet --json "$OUT/load-$share-$seed.json" >"$OUT/load-$share-$seed.txt" 2>&1
  stop_started
  redis-cli -u "$URL" --scan --pattern "*$prefix*" | xargs -r redis-cli -u "$URL" del >/dev/null
}

for seed in $SEEDS; do
  for share in false true; do
    echo "== seed $seed, share_reservations = $share"
    run "$share" "$seed"
  done
done

python3 - "$OUT" "$SEEDS" <<'EOF' | tee "$OUT/results.md"
import json, statistics, sys
out, seeds = sys.argv[1], sys.argv[2].split()
print("| seed | share_reservations | peak node utilization | cluster mean then | max/mean then | split rooms | errors |")
print("|---|---|---:|---:|---:|---:|---|")
peaks = {"false": [], "true": []}
for seed in seeds:
    for share in ("false", "true"):
        r = json.load(open(f"{out}/load-{share}-{seed}.json"))
        u = r["utilization"]
        top = max((s for s in u["samples"] if s["mean"] > 0), key=lambda s: s["max"])
        peaks[share].append(top["max"])
        print(f"| {seed} | {share} | {top['max']:.3f} | {top['mean']:.3f} | {top['max'] / top['mean']:.2f} "
              f"| {r['split_rooms']} | {r['errors'] or 'none'} |")
off, on = statistics.median(peaks["false"]), statistics.median(peaks["true"])
print(f"\nmedian peak: {off:.3f} without sharing, {on:.3f} with it ({100 * (on / off - 1):+.1f}%)")
EOF
