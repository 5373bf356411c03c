# What the benchmark scripts of this directory share (sourced, not run): fresh credentials
# for the router and its demo nodes, a free loopback port, and stopping every process a
# script started (each appends its processes' PIDs to PIDS).

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
