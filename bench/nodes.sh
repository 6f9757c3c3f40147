# Sourced by the bench scripts: the release binary, a scratch dir removed on
# exit with every node started, and `start ID PORT [SEED] [FLAG...]`, which
# starts a `ringkv node` (N=3) and waits for it to serve. Extra node flags
# can also come from the NODE_FLAGS array. RINGKV_BIN picks another binary
# (A/B runs of two builds in one session).
bin="${RINGKV_BIN:-${CARGO_TARGET_DIR:-target}/release/ringkv}"
[ -x "$bin" ] || { echo "build first: cargo build --release --bin ringkv" >&2; exit 2; }
dir=$(mktemp -d)
[ -n "${NODE_FLAGS+x}" ] || NODE_FLAGS=()
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT
start() { # id port [seed] [flag...]
  local id=$1 port=$2 seed=${3:-} extra=()
  shift 2; [ $# -gt 0 ] && shift
  [ -n "$seed" ] && extra=(--seed "$seed")
  "$bin" node --id "$id" --listen "127.0.0.1:$port" --data-dir "$dir/$id" --replicas 3 \
    "${extra[@]}" "${NODE_FLAGS[@]}" "$@" > "$dir/$id.out" 2>&1 &
  pids+=($!)
  for _ in $(seq 200); do grep -q "serving on" "$dir/$id.out" 2>/dev/null && return 0; sleep 0.1; done
  echo "node $id did not start:" >&2; cat "$dir/$id.out" >&2; exit 1
}

# The speed scripts' cluster: n1..n3 on 127.0.0.1:7300-7302, one worker
# thread each unless RINGKV_NODE_FLAGS says otherwise (three nodes and the
# client share the cores; more threads only preempt each other). Sets $cluster.
start_three() {
  read -ra NODE_FLAGS <<< "${RINGKV_NODE_FLAGS---worker-threads 1}"
  start n1 7300
  start n2 7301 127.0.0.1:7300
  start n3 7302 127.0.0.1:7300
  cluster=127.0.0.1:7300,127.0.0.1:7301,127.0.0.1:7302
}
