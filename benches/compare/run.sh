#!/usr/bin/env bash
# Side-by-side benchmark on one machine, everything on loopback:
#   ceiling         a bare hyper server answering a fixed 307 (`roomrouter load --ceiling-server`)
#   router-redirect roomrouter, front_door.mode = "redirect" (307 + signed ticket)
#   router-lookup   roomrouter placement lookup GET /v1/placement/{room} (JSON, no ticket)
#   router-proxy    roomrouter, front_door.mode = "proxy" (skipped if this build refuses it)
#   router-proxy-hyper  the same with server.fast_path = false: every request through hyper
#                   (the fast path's own before/after, not in the default TARGETS)
#   router-proxy-shared the same with server.runtime = "shared": one multi-threaded Tokio
#                   runtime instead of an event loop per thread (that change's own
#                   before/after, not in the default TARGETS)
#   router-proxy-thp    the same with server.transparent_huge_pages = true: the kernel may
#                   back the router's heap with 2 MiB pages, whose first touch stalls an
#                   event loop (that setting's own before/after, not in the default TARGETS)
#   haproxy         balance url_param room, hash-type consistent, hash-balance-factor 125
#   haproxy-headers the same, also sending the headers the router's proxy mode must send
#                   (X-Forwarded-For/-Proto/-Host, X-Room-Node both ways, and a fixed
#                   stand-in of a ticket's length for X-Room-Ticket: HAProxy cannot sign
#                   one): like-for-like bytes and header work, only the signing differs
#                   (not in the default TARGETS)
#   nginx           hash $arg_room consistent
# Each target gets fresh demo nodes (`roomrouter demo-node`), then
#   1. wrk (closed loop, max throughput): $DURATION s, $THREADS threads, $CONNS connections,
#      random rooms out of $ROOMS (benches/compare/rooms.lua), path /status?room=rN; the
#      front end's own CPU time (user + system, with child processes) over that run, per
#      request: what a request costs the front end, steadier than throughput on a busy box;
#   2. `roomrouter load --constant-rate` (wrk2-style: open loop, constant rate, latency from
#      each request's planned send, so no coordinated omission) for $DURATION s over
#      $RATE_CONNS connections, uniform random rooms out of the same $ROOMS wrk used (so
#      they are already placed: steady-state joins), decisions only. $RATE is
#      `half` (default: half of the same target's wrk throughput, the "p99 at half of the
#      maximum throughput" claim) or a number of requests/s for every target.
# WARMUP=S (default 0) puts S s of the same load, unmeasured, before each step: wrk first
# runs S s (rounded up to whole seconds) against the fresh target (every room placed, connection pools filled: the front
# end's steady state), and the constant-rate step sends S s at its rate first (`load
# --warmup`: the load tool's own start is not the front end's either).
# With PIN=1 the front end under test gets CPU 1 to itself with one thread (PROXY_THREADS=1)
# and everything else (demo nodes, wrk with THREADS=1, the load tool with one runtime
# thread) shares CPU 0: the router's own latency, as if the load came from another machine,
# within what one core of load tool can send. PACING=wheel times the constant-rate sends
# with the load tool's 100 µs timer wheel instead of Tokio's 1 ms timer; PACING=spin with a
# 10 µs wheel on a load tool that never sleeps (a whole core: use it with PIN=1, for the
# targets that answer themselves, since the demo nodes a proxy needs share its CPU 0; see
# `load --pacing`).
# Before the rounds, an idle loop that only reads the clock spins JITTER s (default 3; 0 to
# skip) on each CPU in turn and counts the gaps in which it did not run: the machine's own
# hiccups (a VM's vCPU descheduled by its host, an interrupt storm), which every tail figure
# below includes; the footer shows them.
# PRIO=rt runs each front end under test with SCHED_FIFO priority 50 (`chrt -f 50`: it
# takes its core from any ordinary thread, kernel threads such as kdamond included, as soon
# as it wakes) and the constant-rate load tool at nice -20 (not real-time: a spinning load
# tool would starve its core); PRIO=nice runs both at nice -20; default PRIO=none. Needs root.
# DAMON=pause turns off the kernel's DAMON monitoring threads (`kdamond.N`: some VMs run one
# for proactive memory reclaim, and the footer names it when it was the busiest kernel thread
# during a step) for the whole run and turns them back on when the script exits, however it
# exits; it needs root. Default DAMON=leave: the machine as it is, and the footer says
# whether DAMON was on.
# With ROUNDS=N (default 3) the whole sequence of targets runs N times, interleaved, and the
# table shows each figure's median over the rounds; every ratio is the median of the ratios
# measured within a round (targets of one round ran minutes apart, not a whole run apart),
# and the per-round ratios are listed: on a shared VM whose speed drifts (steal time), that
# is what keeps a ratio honest. Every run's figures are in $OUT/runs.jsonl.
# Prints the table and writes it to $OUT/results.md (+ raw outputs).
# Installs haproxy, nginx and wrk with apt-get if missing. Stops everything it started.
# The router is built with BUILD_PROFILE (default release-lto, the deployable build).
#
#   bash benches/compare/run.sh                       # all targets, 10 s each, 3 rounds
#   ROUNDS=1 DURATION=5 TARGETS="ceiling router-redirect" bash benches/compare/run.sh
#   PIN=1 PACING=spin ROUNDS=1 TARGETS="ceiling router-redirect" bash benches/compare/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."

DURATION=${DURATION:-10}
THREADS=${THREADS:-2}
CONNS=${CONNS:-64}
ROOMS=${ROOMS:-10000}
NODES=${NODES:-3}
RATE=${RATE:-half}
RATE_CONNS=${RATE_CONNS:-$CONNS}
ROUNDS=${ROUNDS:-3}
# Threads each front end under test gets (router runtime workers, HAProxy nbthread, nginx
# worker_processes, the ceiling's runtime): the same budget for all. "auto" = their defaults
# (one per core each).
PROXY_THREADS=${PROXY_THREADS:-auto}
PIN=${PIN:-0}
PACING=${PACING:-tokio}
JITTER=${JITTER:-3}
WARMUP=${WARMUP:-0}
DAMON=${DAMON:-leave}
case "$DAMON" in leave | pause) ;; *) echo "DAMON must be leave or pause (got $DAMON)" >&2; exit 1 ;; esac
for v in JITTER WARMUP; do
  [[ ${!v} =~ ^[0-9]+([.][0-9]+)?$ ]] || { echo "$v must be a number of seconds (got ${!v})" >&2; exit 1; }
done
FRONT_CPU=() REST_CPU=() LOAD_THREADS=()
if [ "$PIN" = 1 ]; then
  [ "$(nproc)" -ge 2 ] || { echo "PIN=1 needs 2 CPUs" >&2; exit 1; }
  PROXY_THREADS=1 THREADS=1
  FRONT_CPU=(taskset -c 1) REST_CPU=(taskset -c 0) LOAD_THREADS=(env TOKIO_WORKER_THREADS=1)
fi
PRIO=${PRIO:-none}
LOAD_PRIO=()
case "$PRIO" in
  none) ;;
  nice) FRONT_CPU+=(nice -n -20) LOAD_PRIO=(nice -n -20) ;;
  rt) FRONT_CPU+=(chrt -f 50) LOAD_PRIO=(nice -n -20) ;;
  *) echo "PRIO must be none, nice or rt (got $PRIO)" >&2; exit 1 ;;
esac
TARGETS=${TARGETS:-"ceiling router-lookup router-redirect router-proxy haproxy nginx"}
OUT=${OUT:-target/compare}
export ROOMS RUST_LOG=${RUST_LOG:-warn}

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
RUNS="$OUT/runs.jsonl"
: >"$RUNS"

need=()
command -v wrk >/dev/null || need+=(wrk)
command -v haproxy >/dev/null || need+=(haproxy)
command -v nginx >/dev/null && [ -x "$(command -v nginx)" ] || need+=(nginx)
if [ ${#need[@]} -gt 0 ]; then
  echo "== installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

# The deployable build (Cargo.toml's release-lto profile: fat LTO, one codegen unit).
BUILD_PROFILE=${BUILD_PROFILE:-release-lto}
echo "== building ($BUILD_PROFILE)"
cargo build --profile "$BUILD_PROFILE" --quiet
BIN=$(cd "${CARGO_TARGET_DIR:-target}" && pwd)/$BUILD_PROFILE/roomrouter

# shellcheck source=benches/compare/lib.sh
source benches/compare/lib.sh # (the script runs from the repository root)

# DAMON's threads, as /sys/kernel/mm/damon/admin/kdamonds/N/state files that read "on".
DAMON_ON=()
for f in /sys/kernel/mm/damon/admin/kdamonds/*/state; do
  if [ -r "$f" ] && [ "$(cat "$f")" = on ]; then DAMON_ON+=("$f"); fi
done
DAMON_PAUSED=()
resume_damon() {
  local f
  for f in "${DAMON_PAUSED[@]}"; do echo on >"$f" || echo "could not turn $f back on" >&2; done
  DAMON_PAUSED=()
}
trap 'stop_started; resume_damon' EXIT
trap 'exit 130' INT TERM
if [ "$DAMON" = pause ] && [ ${#DAMON_ON[@]} -gt 0 ]; then
  for f in "${DAMON_ON[@]}"; do
    echo off >"$f" || { echo "DAMON=pause: cannot write $f (root needed)" >&2; exit 1; }
    DAMON_PAUSED+=("$f")
  done
  echo "== DAMON paused for the run (${#DAMON_PAUSED[@]} kdamond(s)); back on at exit"
fi

wait_http() { # URL [expected status]; bounded: 10 s
  local i
  for i in $(seq 1 100); do
    code=$(curl -s -o /dev/null -w '%{http_code}' "$1" || true)
    if [ "$code" = "${2:-200}" ]; then return 0; fi
    sleep 0.1
  done
  echo "timed out waiting for $1 (last status $code)" >&2
  return 1
}

NODE_PORTS=()
NODE_PIDS=()
start_nodes() { # ROUTER_URL
  NODE_PORTS=()
  NODE_PIDS=()
  local i port
  for i in $(seq 1 "$NODES"); do
    port=$(free_port)
    "${REST_CPU[@]}" "$BIN" demo-node --router "$1" --id "media-$i" --capacity 1000000000 \
      --listen "127.0.0.1:$port" >"$OUT/node-$i.log" 2>&1 &
    PIDS+=($!)
    NODE_PIDS+=($!)
    NODE_PORTS+=("$port")
  done
  for port in "${NODE_PORTS[@]}"; do wait_http "http://127.0.0.1:$port/healthz"; done
}

start_router() { # MODE PORT [FAST_PATH] [RUNTIME] [TRANSPARENT_HUGE_PAGES]
  cat >"$OUT/router-$1.toml" <<EOF
[server]
listen = "127.0.0.1:$2"
fast_path = ${3:-true}
runtime = "${4:-per_thread}"
transparent_huge_pages = ${5:-false}
$( [ "$PROXY_THREADS" = auto ] || echo "worker_threads = $PROXY_THREADS" )
[front_door]
mode = "$1"
# Its nodes start after it, fresh: no live room to wait for.
[placement]
startup_hold = "0s"
EOF
  if ! "$BIN" check-config "$OUT/router-$1.toml" >"$OUT/router-$1.check" 2>&1; then
    return 1
  fi
  "${FRONT_CPU[@]}" "$BIN" serve --config "$OUT/router-$1.toml" >"$OUT/router-$1.log" 2>&1 &
  PIDS+=($!)
  FRONT_PID=$!
  wait_http "http://127.0.0.1:$2/healthz"
  start_nodes "http://127.0.0.1:$2"
  wait_http "http://127.0.0.1:$2/readyz"
}

# A ticket's length of base64url (the router's are about 270 characters).
TICKET_STANDIN=$(head -c 204 /dev/urandom | base64 -w0 | tr '+/' '-_' | tr -d '=')

start_haproxy() { # PORT [with the router's headers: 1]
  start_nodes "http://127.0.0.1:9" # nobody to heartbeat to; the nodes serve anyway
  {
    cat <<EOF
global
  maxconn 4000
$( [ "$PROXY_THREADS" = auto ] || echo "  nbthread $PROXY_THREADS" )
  log stdout format raw local0 err
defaults
  mode http
  timeout connect 2s
  timeout client 30s
  timeout server 30s
frontend fe
  bind 127.0.0.1:$1
  default_backend nodes
backend nodes
  balance url_param room
  hash-type consistent
  hash-balance-factor 125
EOF
    if [ "${2:-0}" = 1 ]; then
      cat <<EOF
  option forwardfor
  http-request set-header X-Forwarded-Proto http
  http-request set-header X-Forwarded-Host %[req.hdr(host)]
  http-request set-header X-Room-Ticket $TICKET_STANDIN
  http-send-name-header X-Room-Node
  http-response set-header X-Room-Node %[srv_name]
EOF
    fi
    local i=1 port
    for port in "${NODE_PORTS[@]}"; do
      echo "  server media-$i 127.0.0.1:$port"
      i=$((i + 1))
    done
  } >"$OUT/haproxy.cfg"
  "${FRONT_CPU[@]}" haproxy -db -f "$OUT/haproxy.cfg" >"$OUT/haproxy.log" 2>&1 &
  PIDS+=($!)
  FRONT_PID=$!
  wait_http "http://127.0.0.1:$1/status?room=r1"
}

start_nginx() { # PORT
  start_nodes "http://127.0.0.1:9"
  mkdir -p "$OUT/nginx/logs"
  {
    cat <<EOF
worker_processes $( [ "$PROXY_THREADS" = auto ] && echo auto || echo "$PROXY_THREADS" );
pid $OUT/nginx/nginx.pid;
error_log $OUT/nginx/logs/error.log warn;
events { worker_connections 8192; }
http {
  access_log off;
  client_body_temp_path $OUT/nginx/body;
  proxy_temp_path $OUT/nginx/proxy;
  fastcgi_temp_path $OUT/nginx/fastcgi;
  uwsgi_temp_path $OUT/nginx/uwsgi;
  scgi_temp_path $OUT/nginx/scgi;
  upstream nodes {
    hash \$arg_room consistent;
EOF
    local port
    for port in "${NODE_PORTS[@]}"; do echo "    server 127.0.0.1:$port;"; done
    cat <<EOF
    keepalive 128;
  }
  server {
    listen 127.0.0.1:$1;
    location / {
      proxy_pass http://nodes;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
EOF
  } >"$OUT/nginx.conf"
  "${FRONT_CPU[@]}" nginx -p "$OUT/nginx" -c "$OUT/nginx.conf" -g 'daemon off;' >"$OUT/nginx.log" 2>&1 &
  PIDS+=($!)
  FRONT_PID=$!
  wait_http "http://127.0.0.1:$1/status?room=r1"
}

to_us() { # wrk value like 812.00us, 1.23ms, 2.01s -> microseconds
  awk -v v="$1" 'BEGIN {
    n = v + 0
    if (v ~ /us$/) print int(n + 0.5); else if (v ~ /ms$/) print int(n * 1000 + 0.5);
    else if (v ~ /s$/) print int(n * 1000000 + 0.5); else print "?" }'
}

# CPU time (user + system, clock ticks) of the front end under test and its child processes
# (nginx workers): divided by the requests wrk completed, the CPU each request cost it, a
# figure that varies less with the machine's noise than throughput does.
FRONT_PID=
cpu_ticks() { # PID
  local p t=0
  for p in "$1" $(pgrep -P "$1" || true); do
    t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0)))
  done
  echo "$t"
}

# The same for the demo nodes together: what each request cost the nodes behind the front end
# (a front end that makes the nodes work harder per request leaves less CPU for the rest).
node_ticks() {
  local p t=0
  for p in "${NODE_PIDS[@]}"; do t=$((t + $(cpu_ticks "$p"))); done
  echo "$t"
}

declare -A RPS NOTE
ROUND=1

record() { # JSON object fields (without braces) -> one line of $RUNS for this round
  echo "{\"round\": $ROUND, $1}" >>"$RUNS"
}

wrk_prefix() { # NAME -> the path prefix wrk puts before the room number
  case $1 in router-lookup) echo "/v1/placement/r" ;; *) echo "/status?room=r" ;; esac
}

open_path() { # NAME -> the constant-rate path template (rooms r1..r$ROOMS, as wrk names them)
  case $1 in router-lookup) echo "/v1/placement/{room}" ;; *) echo "/status?room={room}" ;; esac
}

# The kernel's transparent-huge-page faults and direct compactions over a step, machine-wide
# (/proc/vmstat): each first touch of a 2 MiB page zeroes it, and finding one may compact
# memory first, both inside the faulting thread (section 1, twenty-fourth session). A front
# end that faults them during its run pays for them in its tail.
vmstat_thp() { # -> "THP_FAULTS COMPACT_STALLS" so far
  awk '$1 == "thp_fault_alloc" {f = $2} $1 == "compact_stall" {c = $2} END {print f + 0, c + 0}' /proc/vmstat
}

run_wrk() { # NAME PORT
  local f="$OUT/wrk-$1-$ROUND.txt" t0 t1 n0 n1 cpu ncpu p50 p90 p99 bad v0 v1 thp compact
  if [ "$WARMUP" != 0 ]; then # the same load, unmeasured: placed rooms, warm pools
    # wrk takes whole seconds only
    WRK_PATH=$(wrk_prefix "$1") "${REST_CPU[@]}" wrk -t"$THREADS" -c"$CONNS" \
      -d"$(python3 -c "import math; print(math.ceil($WARMUP))")s" -s benches/compare/rooms.lua \
      "http://127.0.0.1:$2" >"$OUT/wrk-$1-$ROUND.warmup.txt" 2>&1
  fi
  t0=$(cpu_ticks "$FRONT_PID")
  n0=$(node_ticks)
  v0=$(vmstat_thp)
  WRK_PATH=$(wrk_prefix "$1") "${REST_CPU[@]}" wrk -t"$THREADS" -c"$CONNS" -d"${DURATION}s" --latency -s benches/compare/rooms.lua \
    "http://127.0.0.1:$2" >"$f" 2>&1
  t1=$(cpu_ticks "$FRONT_PID")
  n1=$(node_ticks)
  v1=$(vmstat_thp)
  thp=$(( ${v1% *} - ${v0% *} )) compact=$(( ${v1#* } - ${v0#* } ))
  RPS[$1]=$(awk '/^Requests\/sec:/ {printf "%d", $2}' "$f")
  cpu=$(awk -v d=$((t1 - t0)) -v hz="$(getconf CLK_TCK)" '/requests in/ { printf "%.1f", d * 1e6 / hz / $1 }' "$f")
  ncpu=$(awk -v d=$((n1 - n0)) -v hz="$(getconf CLK_TCK)" '/requests in/ { printf "%.1f", d * 1e6 / hz / $1 }' "$f")
  p50=$(to_us "$(awk '$1 == "50%" {print $2}' "$f")")
  p90=$(to_us "$(awk '$1 == "90%" {print $2}' "$f")")
  p99=$(to_us "$(awk '$1 == "99%" {print $2}' "$f")")
  bad=$(awk '/Non-2xx or 3xx/ {print $NF}' "$f")
  if [ -n "$bad" ]; then NOTE[$1]="${NOTE[$1]:-}non-2xx/3xx: $bad; "; fi
  record "\"target\": \"$1\", \"kind\": \"wrk\", \"rps\": ${RPS[$1]:-0}, \"cpu_us\": ${cpu:-null}, \"node_cpu_us\": ${ncpu:-null}, \"p50\": ${p50:-null}, \"p90\": ${p90:-null}, \"p99\": ${p99:-null}, \"non_2xx_3xx\": ${bad:-0}, \"thp_faults\": $thp, \"compact_stalls\": $compact"
  echo "   wrk: ${RPS[$1]} req/s, p50 $p50 us, p99 $p99 us, front end CPU $cpu us/req, nodes $ncpu us/req, THP faults $thp (compaction stalls $compact)"
}

# The load tool also reports how long the kernel's own threads (memory reclaim and
# monitoring, RCU, workqueues: they take the cores from whatever runs there, front end
# included; the idle probe above does not see the work a run makes for them) ran over the
# step, from /proc/PID/schedstat: total and the busiest (`load::kthreads`).
run_rate() { # NAME PORT RATE
  local j="$OUT/rate-$1-$ROUND.json" line
  "${REST_CPU[@]}" "${LOAD_PRIO[@]}" "${LOAD_THREADS[@]}" "$BIN" load --constant-rate "$3" \
    --url "http://127.0.0.1:$2" --duration "$DURATION" --warmup "$WARMUP" --pacing "$PACING" \
    --connections "$RATE_CONNS" --rooms "$ROOMS" --room-prefix r --zipf 0 \
    --path "$(open_path "$1")" --max-requests $(python3 -c "import math; print(math.floor($3 * ($DURATION + $WARMUP)) + 1)") \
    --quiet --json "$j" >"$OUT/rate-$1-$ROUND.txt" 2>&1 || {
    # Said again under the table: a step that failed leaves only a '-' in it.
    local rc=$?
    cat "$OUT/rate-$1-$ROUND.txt" >&2
    NOTE[$1]="${NOTE[$1]:-}constant-rate step failed in round $ROUND (exit $rc: $OUT/rate-$1-$ROUND.txt); "
    return 0
  }
  line=$(python3 - "$j" "$1" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
l = r["latency_us"]
k = r.get("kernel_threads")
line = {"target": sys.argv[2], "kind": "rate", "rate": int(r["target_rate"]),
        "achieved": int(r["achieved_per_s"]), "p50": l["p50"], "p99": l["p99"],
        "p999": l["p999"], "service_p99": r["service_us"]["p99"],
        "late": r["late_sends"], "load_tool_cores": r.get("load_tool_cores"),
        "not_ok": r["planned"] - r["ok"]}
if k:
    line.update({"kthreads_ms": round(k["run_ms"], 1), "kthreads_top": k["busiest"],
                 "kthreads_top_ms": round(k["busiest_ms"], 1)})
print(json.dumps(line)[1:-1])
EOF
)
  record "$line"
  echo "   constant rate: {$line}"
}

bench() { # NAME
  local name=$1 port
  port=$(free_port)
  echo "== $name"
  case $name in
    ceiling)
      if [ "$PROXY_THREADS" = auto ]; then
        "${FRONT_CPU[@]}" "$BIN" load --ceiling-server "127.0.0.1:$port" >"$OUT/ceiling.log" 2>&1 &
      else
        TOKIO_WORKER_THREADS=$PROXY_THREADS "${FRONT_CPU[@]}" "$BIN" load --ceiling-server "127.0.0.1:$port" >"$OUT/ceiling.log" 2>&1 &
      fi
      PIDS+=($!)
      FRONT_PID=$!
      wait_http "http://127.0.0.1:$port/x" 307 ;;
    router-redirect|router-lookup)
      start_router redirect "$port" ;;
    router-proxy)
      if ! start_router proxy "$port"; then
        echo "   proxy mode not available in this build ($(tr '\n' ' ' <"$OUT/router-proxy.check"))"
        NOTE[$name]="proxy mode not available in this build"
        return 0
      fi ;;
    router-proxy-hyper) start_router proxy "$port" false ;;
    router-proxy-shared) start_router proxy "$port" true shared ;;
    router-proxy-thp) start_router proxy "$port" true per_thread true ;;
    haproxy) start_haproxy "$port" ;;
    haproxy-headers) start_haproxy "$port" 1 ;;
    nginx) start_nginx "$port" ;;
    *) echo "unknown target $name" >&2; return 1 ;;
  esac
  run_wrk "$name" "$port"
  local rate=$RATE
  if [ "$RATE" = half ]; then rate=$(( ${RPS[$name]:-0} / 2 )); fi
  if [ "$rate" -gt 0 ] 2>/dev/null; then
    run_rate "$name" "$port" "$rate"
  else
    case "${NOTE[$name]:-}" in
      *"no constant-rate run"*) ;; # once, not once per round
      *) NOTE[$name]="${NOTE[$name]:-}no constant-rate run (rate $rate); " ;;
    esac
  fi
  stop_started
}

jitter_probe() { # each CPU this script may use, alone in turn: one $RUNS line per CPU
  [ "$JITTER" != 0 ] || return 0
  echo "== the machine's own hiccups: a clock-reading loop, ${JITTER} s on each CPU"
  python3 - "$JITTER" >>"$RUNS" <<'EOF'
import json, os, sys, time
secs = float(sys.argv[1])
now = time.perf_counter_ns
for cpu in sorted(os.sched_getaffinity(0)):
    os.sched_setaffinity(0, {cpu})
    prev = start = now()
    end = start + int(secs * 1e9)
    over_100us = over_1ms = longest = lost = 0
    while prev < end:
        t = now()
        gap, prev = t - prev, t
        if gap > 100_000:
            over_100us += 1
            lost += gap
            over_1ms += gap > 1_000_000
            longest = max(longest, gap)
    print(json.dumps({"round": 0, "target": f"cpu{cpu}", "kind": "jitter", "seconds": secs,
                      "gaps_over_100us": over_100us, "gaps_over_1ms": over_1ms,
                      "longest_gap_us": longest // 1000, "lost_share": lost / (now() - start)}))
EOF
}
jitter_probe

for ROUND in $(seq 1 "$ROUNDS"); do
  [ "$ROUNDS" -gt 1 ] && echo "==== round $ROUND of $ROUNDS"
  for t in $TARGETS; do bench "$t"; done
done

{
  python3 - "$RUNS" "$TARGETS" <<'EOF'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
targets = sys.argv[2].split()
rounds = sorted({r["round"] for r in runs})

def get(target, kind, round_=None):
    return [r for r in runs if r["target"] == target and r["kind"] == kind
            and (round_ is None or r["round"] == round_)]

def med(target, kind, key):
    v = [r[key] for r in get(target, kind) if r.get(key) is not None]
    if not v:
        return "-"
    m = statistics.median(v)
    if key == "load_tool_cores":
        return f"{m:.2f}"
    return f"{m:.1f}" if key in ("cpu_us", "node_cpu_us") else str(int(m))

def ratios(a, b):
    """a / b throughput within each round where both ran."""
    out = []
    for n in rounds:
        x, y = get(a, "wrk", n), get(b, "wrk", n)
        if x and y and y[0]["rps"] > 0:
            out.append(x[0]["rps"] / y[0]["rps"])
    return out

def show(rs):
    return f"{statistics.median(rs):.2f}x" if rs else "-"

print("| target | wrk req/s | vs HAProxy | p50 µs | p90 µs | p99 µs | CPU µs/req | nodes' CPU µs/req | constant rate req/s | achieved | p50 µs | p99 µs | p99.9 µs | service p99 µs | late sends | load tool cores | not ok |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for t in targets:
    if not get(t, "wrk"):
        print(f"| {t} |" + " - |" * 16)
        continue
    print(f"| {t} | {med(t, 'wrk', 'rps')} | {show(ratios(t, 'haproxy'))} | "
          f"{med(t, 'wrk', 'p50')} | {med(t, 'wrk', 'p90')} | {med(t, 'wrk', 'p99')} | "
          f"{med(t, 'wrk', 'cpu_us')} | {med(t, 'wrk', 'node_cpu_us')} | {med(t, 'rate', 'rate')} | {med(t, 'rate', 'achieved')} | "
          f"{med(t, 'rate', 'p50')} | {med(t, 'rate', 'p99')} | {med(t, 'rate', 'p999')} | "
          f"{med(t, 'rate', 'service_p99')} | {med(t, 'rate', 'late')} | "
          f"{med(t, 'rate', 'load_tool_cores')} | {med(t, 'rate', 'not_ok')} |")
print()
for a, b in [("router-lookup", "ceiling"), ("router-redirect", "ceiling"),
             ("router-proxy", "haproxy"), ("router-proxy", "haproxy-headers"),
             ("haproxy-headers", "haproxy"), ("router-proxy", "nginx"),
             ("router-proxy", "router-proxy-hyper"), ("router-proxy-hyper", "haproxy"),
             ("router-proxy", "router-proxy-shared"), ("router-proxy-shared", "haproxy"),
             ("router-proxy", "router-proxy-thp"), ("router-proxy-thp", "haproxy")]:
    rs = ratios(a, b)
    if rs:
        per = ", ".join(f"{r:.2f}" for r in rs)
        print(f"{a} / {b}: {show(rs)} (median; per round: {per})")
kt = [t for t in targets if any("kthreads_ms" in r for r in get(t, "rate"))]
if kt:
    print()
    print("kernel threads' run time during each constant-rate step (busiest thread): "
          + "; ".join(t + ": " + ", ".join(f"{r['kthreads_ms']:g} ms ({r['kthreads_top']} {r['kthreads_top_ms']:g})"
                                           for r in get(t, "rate") if "kthreads_ms" in r) for t in kt))
jit = [r for r in runs if r["kind"] == "jitter"]
if jit:
    print()
    print("the machine's own hiccups before the rounds (a loop that only reads the clock, alone on each CPU): "
          + "; ".join(f"{r['target']} over {r['seconds']:g} s: gaps > 100 µs {r['gaps_over_100us']}, "
                      f"> 1 ms {r['gaps_over_1ms']}, longest {r['longest_gap_us'] / 1000:.1f} ms, "
                      f"{100 * r['lost_share']:.2f}% of the time" for r in jit))
EOF
  echo
  echo "medians over $ROUNDS round(s); constant rate: RATE=$RATE (half = half of each target's own wrk req/s in that round), $RATE_CONNS connections, ${DURATION}s after ${WARMUP}s of warm-up, latency from the planned send (service: from the actual send), paced by $PACING"
  [ "$PIN" = 1 ] && echo "PIN=1: each front end alone on CPU 1 with one thread; demo nodes, wrk and the load tool on CPU 0"
  case "$PRIO" in
    rt) echo "PRIO=rt: front ends under SCHED_FIFO 50, the constant-rate load tool at nice -20" ;;
    nice) echo "PRIO=nice: front ends and the constant-rate load tool at nice -20" ;;
  esac
  if [ ${#DAMON_PAUSED[@]} -gt 0 ]; then
    echo "DAMON: ${#DAMON_PAUSED[@]} kdamond(s) paused for the run (DAMON=pause)"
  elif [ ${#DAMON_ON[@]} -gt 0 ]; then
    echo "DAMON: ${#DAMON_ON[@]} kdamond(s) on during the run (the kernel's memory-access monitor; DAMON=pause pauses it)"
  fi
  echo "machine: $(nproc) cores, $(awk -F: '/model name/ {print $2; exit}' /proc/cpuinfo | sed 's/^ //'); wrk -t$THREADS -c$CONNS -d${DURATION}s after ${WARMUP}s unmeasured; $ROOMS rooms; $NODES demo nodes; $PROXY_THREADS thread(s) per front end"
  for t in $TARGETS; do if [ -n "${NOTE[$t]:-}" ]; then echo "$t: ${NOTE[$t]}"; fi; done
} | tee "$OUT/results.md"
