#!/usr/bin/env bash
# Instructions per request (callgrind): a count that does not depend on what else the
# machine is doing, for before/after comparisons of one change on a noisy VM.
#   bash benches/compare/instructions.sh [MODE...]     MODE: proxy redirect lookup ceiling
#   BINS="/tmp/before /tmp/after" bash benches/compare/instructions.sh proxy
# For each binary (default: this tree's BUILD_PROFILE build, default release) and mode, the
# front end runs under `valgrind --tool=callgrind` with one worker thread and, except the
# ceiling, three demo nodes (not under valgrind). wrk -t1 -c8 warms it for 5 s over random
# rooms out of $ROOMS (rooms.lua), callgrind_control zeroes the counters, wrk runs
# $DURATION s (default 10) more, and the count is divided by the requests wrk completed.
# Prints one line per run: mode, binary, requests, instructions, instructions/request.
# Everything on loopback; installs wrk and valgrind with apt-get if missing; stops what it
# started. Under valgrind SHA-256 runs its portable code (the CPU's SHA extensions are not
# used), so the ticket's HMAC weighs far more here than on the real CPU (BENCHMARKS.md).
set -euo pipefail
cd "$(dirname "$0")/../.."

MODES=("$@")
[ ${#MODES[@]} -gt 0 ] || MODES=(proxy redirect lookup ceiling)
DURATION=${DURATION:-10}
export ROOMS=${ROOMS:-10000} RUST_LOG=${RUST_LOG:-warn}

need=()
command -v wrk >/dev/null || need+=(wrk)
command -v valgrind >/dev/null || need+=(valgrind)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
if [ -z "${BINS:-}" ]; then
  BUILD_PROFILE=${BUILD_PROFILE:-release}
  cargo build --profile "$BUILD_PROFILE" --quiet
  BINS=$(cd "${CARGO_TARGET_DIR:-target}" && pwd)/$BUILD_PROFILE/roomrouter
fi

# shellcheck source=benches/compare/lib.sh
source benches/compare/lib.sh # (the script runs from the repository root)

WORK=$(mktemp -d)
trap 'stop_started; rm -rf "$WORK"' EXIT
trap 'exit 130' INT TERM
wait_http() { # URL; bounded: 60 s (valgrind starts slowly)
  local i
  for i in $(seq 1 600); do
    curl -s -o /dev/null "$1" && return 0
    sleep 0.1
  done
  echo "timed out waiting for $1" >&2
  return 1
}

count() { # BIN MODE
  local bin=$1 mode=$2 port out front path hdr=()
  port=$(free_port)
  out="$WORK/$mode-$RANDOM"
  mkdir -p "$out"
  if [ "$mode" = ceiling ]; then
    TOKIO_WORKER_THREADS=1 valgrind --tool=callgrind --callgrind-out-file="$out/cg" \
      "$bin" load --ceiling-server "127.0.0.1:$port" >"$out/front.log" 2>&1 &
    front=$!
    PIDS+=("$front")
    wait_http "http://127.0.0.1:$port/rooms/x"
    path="/rooms/r"
  else
    local fd=$mode
    [ "$mode" = lookup ] && fd=redirect
    cat >"$out/router.toml" <<EOF
[server]
listen = "127.0.0.1:$port"
worker_threads = 1
[front_door]
mode = "$fd"
# Its nodes start after it, fresh: no live room to wait for.
[placement]
startup_hold = "0s"
EOF
    valgrind --tool=callgrind --callgrind-out-file="$out/cg" \
      "$bin" serve --config "$out/router.toml" >"$out/front.log" 2>&1 &
    front=$!
    PIDS+=("$front")
    wait_http "http://127.0.0.1:$port/healthz"
    local i
    for i in 1 2 3; do
      "$bin" demo-node --router "http://127.0.0.1:$port" --id "media-$i" \
        --capacity 1000000000 --listen "127.0.0.1:$(free_port)" >"$out/node-$i.log" 2>&1 &
      PIDS+=($!)
    done
    wait_http "http://127.0.0.1:$port/readyz"
    path="/status?room=r"
    if [ "$mode" = lookup ]; then
      path="/v1/placement/r"
      hdr=(-H "Authorization: Bearer $ROOMROUTER_ADMIN_TOKEN")
    fi
  fi
  WRK_PATH=$path wrk -t1 -c8 -d5s "${hdr[@]}" -s benches/compare/rooms.lua \
    "http://127.0.0.1:$port" >/dev/null
  callgrind_control -z "$front" >/dev/null
  WRK_PATH=$path wrk -t1 -c8 -d"${DURATION}s" "${hdr[@]}" -s benches/compare/rooms.lua \
    "http://127.0.0.1:$port" >"$out/wrk.txt"
  callgrind_control -d "$front" >/dev/null
  sleep 1
  local reqs total=0 n f
  reqs=$(grep -oE '^ *[0-9]+ requests' "$out/wrk.txt" | grep -oE '[0-9]+')
  for f in "$out"/cg*; do
    n=$(grep -E '^(summary|totals):' "$f" | tail -1 | awk '{print $2}' || true)
    if [ -n "$n" ]; then total=$((total + n)); fi
  done
  if grep -qi 'non-2xx' "$out/wrk.txt" && [ "$mode" != ceiling ] && [ "$mode" != redirect ]; then
    echo "$mode: wrk saw non-2xx answers:" >&2
    grep -i 'non-2xx' "$out/wrk.txt" >&2
  fi
  printf '%-9s %-40s requests %8d  instructions %12d  per request %6d\n' \
    "$mode" "$bin" "$reqs" "$total" $((total / reqs))
  stop_started
}

for mode in "${MODES[@]}"; do
  for bin in $BINS; do
    count "$bin" "$mode"
  done
done
