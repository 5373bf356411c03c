# What the benchmark scripts of this directory share (sourced, not run): fresh credentials
# for the router and its demo nodes, a free loopback port, redis-server and the release
# binary for the scripts that need them, and stopping every process a script started (each
# appends its processes' PIDs to PIDS).

rand() { head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n'; }
export ROOMROUTER_ADMIN_TOKEN="admin-$(rand)"
export ROOMROUTER_NODE_TOKEN="node-$(rand)"
export ROOMROUTER_TICKET_SECRET="$(rand)"

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

PIDS=()
stop_started() {
  local p
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  PIDS=()
}

# Installs redis-server from Debian's packages if it is not on PATH.
need_redis_server() {
  command -v redis-server >/dev/null || {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  }
}

# A private redis-server on 127.0.0.1:$1 without persistence, logging to $2; sets REDIS_PID
# (also when it fails to answer). Bounded: 2 s for its first PONG.
start_private_redis() {
  redis-server --port "$1" --bind 127.0.0.1 --save '' --appendonly no >>"$2" 2>&1 &
  REDIS_PID=$!
  local i
  for i in $(seq 1 100); do
    redis-cli -p "$1" ping >/dev/null 2>&1 && return 0
    sleep 0.02
  done
  echo "redis-server did not start on $1" >&2
  return 1
}

# Builds the release binary and sets BIN to it.
build_release() {
  echo "== building (release)"
  cargo build --release --quiet
  BIN=$(cd "${CARGO_TARGET_DIR:-target}" && pwd)/release/roomrouter
}
