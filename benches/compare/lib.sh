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

# Builds the release binary and sets BIN to it.
build_release() {
  echo "== building (release)"
  cargo build --release --quiet
  BIN=$(cd "${CARGO_TARGET_DIR:-target}" && pwd)/release/roomrouter
}
