#!/usr/bin/env bash
# Failure injection: does a room ever end up on two nodes when Redis or a router fails?
# Each scenario starts a fresh cluster on loopback (a private redis-server without
# persistence, three routers on it with store.kind = "redis", four demo nodes of capacity 400
# each given all three routers in rotated order), runs `roomrouter load` over the three
# routers (--rate 80 --rooms 300, open loop, bounded duration) while a checker reads every
# node's GET /status about once a second (ground truth: a room with participants on two
# nodes in one poll), injects the failure, and at the end sums
# roomrouter_splits_detected_total over the routers' /metrics.
#
#   A   Redis SIGSTOP 3 s; meanwhile 10 new rooms looked up through router A and the same 10
#       through router B (GET /v1/placement/{room}): rooms whose two answers differ
#   B   Redis SIGKILL under load, started again empty on the same port 5 s later
#   C   Redis SIGSTOP 20 s, store.outage_node_hold = "10s", no probes (splits are expected
#       past the hold: README, store.outage_node_hold)
#   Cp  as C with health.probe_interval = "500ms" (and probe_timeout = "500ms": the 1 s
#       default must not exceed the interval)
#   D   router B SIGSTOP 10 s under load (nodes fail over to their next router)
#
#   bash benches/compare/chaos.sh                      # all, about 4-5 minutes
#   SCENARIOS="A Cp" bash benches/compare/chaos.sh
#   BIN=/path/to/roomrouter bash benches/compare/chaos.sh   # skip the release build
#
# It measures and does not judge: one table line per scenario (splits as harness /
# ground truth / splits_detected summed; errors by code from the harness's JSON), exit 0;
# non-zero only when a cluster does not come up. Every file (logs, load JSON, checker JSON
# with the split rooms, nodes and times) is under $OUT/<scenario>/. Needs python3, curl,
# jq and redis-server (installed with apt-get if missing). Everything listens on 127.0.0.1
# and every process started is stopped at the end (also on Ctrl-C).
set -euo pipefail
cd "$(dirname "$0")/../.."

SCENARIOS=${SCENARIOS:-"A B C Cp D"}
OUT=${OUT:-target/compare-chaos}
SEED=${SEED:-1}
export RUST_LOG=${RUST_LOG:-info}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

# shellcheck source=benches/compare/lib.sh
source benches/compare/lib.sh # (the script runs from the repository root)
for tool in python3 curl jq; do
  command -v "$tool" >/dev/null || { echo "chaos.sh needs $tool" >&2; exit 1; }
done
need_redis_server
if [ -n "${BIN:-}" ]; then
  BIN=$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")
else
  build_release
fi
ADMIN=$ROOMROUTER_ADMIN_TOKEN

# Stopping: a process held by SIGSTOP never acts on SIGTERM, so every one gets SIGCONT
# first; what is still there after 5 s gets SIGKILL. Bounded.
alive() { # a PID of ours that has not exited (a zombie has)
  local s
  s=$(ps -o stat= -p "$1" 2>/dev/null || true)
  [ -n "$s" ] && [ "${s:0:1}" != Z ]
}
stop_all() {
  local p i left
  [ ${#PIDS[@]} -eq 0 ] && return 0
  for p in "${PIDS[@]}"; do kill -CONT "$p" 2>/dev/null || true; kill "$p" 2>/dev/null || true; done
  for i in $(seq 1 50); do
    left=0
    for p in "${PIDS[@]}"; do alive "$p" && left=1; done
    [ $left = 0 ] && break
    sleep 0.1
  done
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  PIDS=()
}
trap stop_all EXIT
trap 'exit 130' INT TERM

now_ms() { date +%s%3N; }
T0=0
ev() { # an event, on the terminal and in the scenario's log, at its time in the scenario
  local t
  t=$(awk -v a="$(now_ms)" -v b="$T0" 'BEGIN { printf "%.2f", (a - b) / 1000 }')
  echo "  [$SC +${t}s] $*"
  echo "+${t}s $*" >>"$DIR/events.log"
}

# ---- the ground-truth checker (python3): see checker.py's own comment
write_checker() {
  cat >"$1" <<'PY'
# Polls every demo node's GET /status about once a second (all nodes at once, a thread each)
# and records rooms with participants on two nodes in one poll (split), and rooms whose only
# node changed between two consecutive polls while in use in both (moved in use; twice or
# more: back and forth). Bounded: at most MAX_POLLS polls; stops early when STOP_FILE exists.
import json, os, sys, threading, time, urllib.request

out, stop_file, t0_ms, max_polls = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
nodes = dict(a.split("=", 1) for a in sys.argv[5:])

def fetch(nid, url, res):
    try:
        with urllib.request.urlopen(url + "/status", timeout=0.8) as r:
            res[nid] = json.load(r).get("rooms", {})
    except Exception:
        res[nid] = None

polls = failed = split_sightings = 0
split_first, episodes, moves, last = {}, [], [], {}
for _ in range(max_polls):
    if os.path.exists(stop_file):
        break
    start = time.time()
    res = {}
    ths = [threading.Thread(target=fetch, args=(n, u, res)) for n, u in nodes.items()]
    for t in ths: t.start()
    for t in ths: t.join(2)
    t_s = round(time.time() - t0_ms / 1000, 2)
    polls += 1
    where = {}
    for nid in nodes:
        rooms = res.get(nid)
        if rooms is None:
            failed += 1
            continue
        for room, n in rooms.items():
            if n > 0:
                where.setdefault(room, {})[nid] = n
    for room, on in where.items():
        if len(on) >= 2:
            split_sightings += 1
            split_first.setdefault(room, {"t_s": t_s, "nodes": on})
            if len(episodes) < 500:
                episodes.append({"t_s": t_s, "room": room, "nodes": on})
        prev = last.get(room)
        if prev is not None and len(prev) == 1 and len(on) == 1 and set(prev) != set(on):
            moves.append({"t_s": t_s, "room": room, "from": next(iter(prev)), "to": next(iter(on))})
    last = where
    time.sleep(max(0.0, 1.0 - (time.time() - start)))

per_room = {}
for m in moves:
    per_room.setdefault(m["room"], []).append(m)
back = {r: ms for r, ms in per_room.items() if len(ms) >= 2}
json.dump({
    "polls": polls, "failed_node_polls": failed,
    "split_rooms": len(split_first), "split_sightings": split_sightings,
    "split_first": split_first, "split_episodes": episodes,
    "moves_in_use": len(moves), "moves": moves[:500],
    "back_and_forth_rooms": len(back), "back_and_forth": dict(list(back.items())[:50]),
}, open(out, "w"), indent=1)
PY
}

# ---- one cluster
REDIS_PID=
start_redis() { # on $RPORT (lib.sh's start_private_redis), stopped with the rest
  local rc=0
  start_private_redis "$RPORT" "$DIR/redis.log" || rc=$?
  PIDS+=("$REDIS_PID")
  return $rc
}

R=() RPID=() NODE_URLS=()
start_cluster() { # $1: extra TOML for the routers' [store] and after
  local extra=$1 prefix i j port order
  RPORT=$(free_port)
  start_redis || return 1
  prefix="chaos-$(rand | head -c 8)"
  R=() RPID=()
  for i in 0 1 2; do
    port=$(free_port)
    cat >"$DIR/router$i.toml" <<EOF
[server]
listen = "127.0.0.1:$port"
[store]
kind = "redis"
url = "redis://127.0.0.1:$RPORT/0"
key_prefix = "$prefix"
$extra
EOF
    "$BIN" serve --config "$DIR/router$i.toml" >"$DIR/router$i.log" 2>&1 &
    PIDS+=($!)
    RPID+=($!)
    R+=("http://127.0.0.1:$port")
  done
  for i in 0 1 2; do # every router answers: bounded, 10 s
    for j in $(seq 1 100); do
      curl -s -o /dev/null "${R[$i]}/healthz" && break
      sleep 0.1
    done
  done
  NODE_URLS=()
  for i in 1 2 3 4; do
    port=$(free_port)
    order=()
    for j in 0 1 2; do order+=(--router "${R[$(((i - 1 + j) % 3))]}"); done
    "$BIN" demo-node "${order[@]}" --id "media-$i" --capacity 400 \
      --listen "127.0.0.1:$port" >"$DIR/node$i.log" 2>&1 &
    PIDS+=($!)
    NODE_URLS+=("media-$i=http://127.0.0.1:$port")
  done
  # Ready: every router /readyz 200 and 4 healthy nodes in its table. Bounded: 20 s.
  local ok
  for j in $(seq 1 100); do
    ok=0
    for i in 0 1 2; do
      alive "${RPID[$i]}" || {
        echo "scenario $SC: router$i exited: $(tail -1 "$DIR/router$i.log")" >&2
        return 1
      }
      [ "$(curl -s -o /dev/null -w '%{http_code}' "${R[$i]}/readyz" || true)" = 200 ] || continue
      [ "$(curl -s -H "authorization: Bearer $ADMIN" "${R[$i]}/v1/nodes" |
        jq '[.nodes[] | select(.healthy)] | length' 2>/dev/null || echo 0)" = 4 ] || continue
      ok=$((ok + 1))
    done
    [ $ok = 3 ] && return 0
    sleep 0.2
  done
  echo "scenario $SC: the cluster did not come up within 20 s (logs in $DIR)" >&2
  return 1
}

LOAD_PID= CHECK_PID=
start_load() { # $1: duration in s
  LOAD_DUR=$1
  "$BIN" load --router "${R[0]}" --router "${R[1]}" --router "${R[2]}" \
    --rate 80 --rooms 300 --duration "$1" --seed "$SEED" --admin-token "$ADMIN" \
    --json "$DIR/load.json" --quiet >"$DIR/load.log" 2>&1 &
  LOAD_PID=$!
  PIDS+=("$LOAD_PID")
  ev "load started: --rate 80 --rooms 300 --duration $1 over 3 routers"
}
start_checker() {
  rm -f "$DIR/checker.stop"
  python3 "$DIR/checker.py" "$DIR/checker.json" "$DIR/checker.stop" "$T0" 240 "${NODE_URLS[@]}" \
    >"$DIR/checker.log" 2>&1 &
  CHECK_PID=$!
  PIDS+=("$CHECK_PID")
}
wait_load() { # the harness stops itself at duration + timeout (5 s) + 1 s; bounded here at +30 s
  local i
  for i in $(seq 1 $(((LOAD_DUR + 30) * 10))); do
    alive "$LOAD_PID" || break
    sleep 0.1
  done
  alive "$LOAD_PID" && { ev "load still running at duration + 30 s: killed"; kill -9 "$LOAD_PID"; }
  wait "$LOAD_PID" 2>/dev/null || true # (non-zero when it saw a split)
  ev "load done"
}
finish() { # let the checker see the last heartbeats' evictions, stop it, read the metrics
  sleep 3
  touch "$DIR/checker.stop"
  local i
  for i in $(seq 1 50); do alive "$CHECK_PID" || break; sleep 0.1; done
  wait "$CHECK_PID" 2>/dev/null || true
  DETECTED=0
  for i in 0 1 2; do
    local m
    m=$(curl -s -m 3 "${R[$i]}/metrics" | awk '$1 ~ /^roomrouter_splits_detected_total/ { s += $2 } END { print s + 0 }')
    echo "router$i roomrouter_splits_detected_total $m" >>"$DIR/events.log"
    DETECTED=$((DETECTED + ${m%.*}))
  done
  for i in 0 1 2; do curl -s -m 3 "${R[$i]}/metrics" >"$DIR/router$i.metrics" || true; done
  stop_all
}

TABLE=()
report() { # $1: extra column
  local h g e n
  h=$(jq -r '.split_rooms // "?"' "$DIR/load.json" 2>/dev/null || echo "?")
  g=$(jq -r '.split_rooms // "?"' "$DIR/checker.json" 2>/dev/null || echo "?")
  e=$(jq -r '(.errors // {}) | to_entries | map("\(.key): \(.value)") | join(", ") | if . == "" then "none" else . end' \
    "$DIR/load.json" 2>/dev/null || echo "?")
  n=$(jq -r '(.node_errors // {}) | to_entries | map("\(.key): \(.value)") | join(", ") | if . == "" then "none" else . end' \
    "$DIR/load.json" 2>/dev/null || echo "?")
  local mv
  mv=$(jq -r '"\(.moves_in_use)/\(.back_and_forth_rooms)"' "$DIR/checker.json" 2>/dev/null || echo "?")
  TABLE+=("$(printf '| %-3s | %s / %s / %s | %s | %s | %s | %s |' "$SC" "$h" "$g" "$DETECTED" "$mv" "$e" "$n" "$1")")
  echo "${TABLE[-1]}"
}

# ---- scenarios
lookup() { # $1 router URL, $2 room: the node its placement answer names (or the error)
  local body
  body=$(curl -s -m 5 -H "authorization: Bearer $ADMIN" "$1/v1/placement/$2" || true)
  [ -n "$body" ] || { echo no-answer; return 0; }
  jq -r '.node // .error // "no-answer"' <<<"$body" 2>/dev/null || echo "no-answer"
}

scenario_A() {
  start_cluster "" || exit 1
  start_checker
  start_load 20
  sleep 5
  kill -STOP "$REDIS_PID"
  ev "redis SIGSTOP"
  local rooms=() i
  for i in $(seq 1 10); do rooms+=("chaos-a-$i-$(rand | head -c 6)"); done
  ( for r in "${rooms[@]}"; do t=$(now_ms); echo "$r $(lookup "${R[0]}" "$r") $(now_ms) $t"; done >"$DIR/lookups-A.txt" ) &
  local la=$!
  ( for r in "${rooms[@]}"; do t=$(now_ms); echo "$r $(lookup "${R[1]}" "$r") $(now_ms) $t"; done >"$DIR/lookups-B.txt" ) &
  local lb=$!
  PIDS+=("$la" "$lb")
  sleep 3
  kill -CONT "$REDIS_PID"
  ev "redis SIGCONT"
  local cont_ms
  cont_ms=$(now_ms)
  wait "$la" "$lb" 2>/dev/null || true # each lookup is bounded at 5 s
  sleep 2
  # after the write-back: what each router says now (no placement: create=false)
  for r in "${rooms[@]}"; do
    echo "$r $(curl -s -m 3 -H "authorization: Bearer $ADMIN" "${R[0]}/v1/placement/$r?create=false" | jq -r '.node // .error') \
$(curl -s -m 3 -H "authorization: Bearer $ADMIN" "${R[1]}/v1/placement/$r?create=false" | jq -r '.node // .error')"
  done >"$DIR/lookups-after.txt"
  # lookups-{A,B}.txt: room, node, answered at, sent at (epoch ms)
  local differ late after moved
  differ=$(join <(sort "$DIR/lookups-A.txt") <(sort "$DIR/lookups-B.txt") | awk '$2 != $5 { n++ } END { print n + 0 }')
  moved=$(join <(sort "$DIR/lookups-A.txt") <(sort "$DIR/lookups-after.txt") | awk '$2 != $5 || $2 != $6 { n++ } END { print n + 0 }')
  late=$(cat "$DIR/lookups-A.txt" "$DIR/lookups-B.txt" | awk -v c="$cont_ms" '$3 > c { n++ } END { print n + 0 }')
  after=$(awk '$2 != $3 { n++ } END { print n + 0 }' "$DIR/lookups-after.txt")
  ev "lookups: A/B answers differ for $differ of 10 rooms ($late of 20 answered after SIGCONT); after the write-back A/B differ for $after, $moved name another node than during the pause"
  wait_load
  finish
  report "lookups during the pause: A/B differ $differ/10 ($late/20 answered after SIGCONT); after the write-back: differ $after/10, on another node than answered $moved/10"
}

scenario_B() {
  start_cluster "" || exit 1
  start_checker
  start_load 25
  sleep 5
  kill -9 "$REDIS_PID"
  wait "$REDIS_PID" 2>/dev/null || true
  ev "redis SIGKILL"
  sleep 5
  start_redis || ev "redis-server did not start again"
  ev "redis started again on the same port, empty (dbsize a moment later: $(redis-cli -p "$RPORT" dbsize))"
  wait_load
  ev "redis dbsize $(redis-cli -p "$RPORT" dbsize) after the run"
  finish
  report "redis killed at +5 s, back empty at +10 s"
}

scenario_C() { # $1: extra TOML
  start_cluster "outage_node_hold = \"10s\"
$1" || exit 1
  start_checker
  start_load 40
  sleep 5
  kill -STOP "$REDIS_PID"
  ev "redis SIGSTOP"
  sleep 20
  kill -CONT "$REDIS_PID"
  ev "redis SIGCONT"
  wait_load
  finish
  report "$2"
}

scenario_D() {
  start_cluster "" || exit 1
  start_checker
  start_load 25
  sleep 5
  kill -STOP "${RPID[1]}"
  ev "router B (${R[1]}) SIGSTOP"
  sleep 10
  kill -CONT "${RPID[1]}"
  ev "router B SIGCONT"
  wait_load
  finish
  report "router B paused +5..+15 s"
}

for SC in $SCENARIOS; do
  DIR=$OUT/$SC
  rm -rf "$DIR"
  mkdir -p "$DIR"
  write_checker "$DIR/checker.py"
  T0=$(now_ms)
  echo "== scenario $SC ($DIR)"
  echo "T0 $(date -u -d "@${T0:0:10}.${T0:10}" +%FT%T.%3NZ) (router logs are in UTC)" >"$DIR/events.log"
  case $SC in
  A) scenario_A ;;
  B) scenario_B ;;
  C) scenario_C "" "redis paused +5..+25 s, hold 10 s, no probes" ;;
  Cp) scenario_C "[health]
probe_interval = \"500ms\"
probe_timeout = \"500ms\"" "as C, probes every 500 ms (timeout 500 ms)" ;;
  D) scenario_D ;;
  *) echo "unknown scenario $SC (A B C Cp D)" >&2; exit 2 ;;
  esac
done

echo
echo "| scen | splits harness / ground truth / splits_detected | moves in use / back-and-forth rooms (checker) | harness errors | node errors | notes |"
echo "|---|---|---|---|---|---|"
printf '%s\n' "${TABLE[@]}"
