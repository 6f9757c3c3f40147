#!/usr/bin/env bash
# The emulation-accuracy figure in bench/RESULTS.md: three `ringkv node`
# processes, one per cloud3 region (us-east, us-west, eu-west), N=3; a bench
# client of n1 (us-east) reads at R=1, 2 and 3. The matrix predicts the
# medians: local, the round trip to us-west (68 ms), to eu-west (74 ms).
#
#   bench/regions.sh [RUNS]     # default 3
#
# Needs a release build: cargo build --release --bin ringkv
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
bin="${CARGO_TARGET_DIR:-target}/release/ringkv"
[ -x "$bin" ] || { echo "build first: cargo build --release --bin ringkv" >&2; exit 2; }
dir=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT
start() { # id port region [seed]
  local extra=()
  [ -n "${4:-}" ] && extra=(--seed "$4")
  "$bin" node --id "$1" --listen "127.0.0.1:$2" --data-dir "$dir/$1" --replicas 3 \
    --region "$3" --latency-matrix preset:cloud3 "${extra[@]}" > "$dir/$1.out" 2>&1 &
  pids+=($!)
  for _ in $(seq 200); do grep -q "serving on" "$dir/$1.out" 2>/dev/null && return 0; sleep 0.1; done
  echo "node $1 did not start:" >&2; cat "$dir/$1.out" >&2; exit 1
}
start n1 7500 us-east
start n2 7501 us-west 127.0.0.1:7500
start n3 7502 eu-west 127.0.0.1:7500
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
for run in $(seq "$runs"); do
  echo "== run $run: ringkv bench --cluster 127.0.0.1:7500 --workload c --records 100 --concurrency 4 --duration-s 5 --consistency 1,2,3 --json"
  "$bin" bench --cluster 127.0.0.1:7500 --workload c --records 100 --concurrency 4 --duration-s 5 \
    --consistency 1,2,3 --json > "$dir/run.json"
  python3 - "$dir/run.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
for s, predicted in zip(r["settings"], [0.5, 68.0, 74.0]):
    p50 = s["ops"]["read"]["p50_ms"]
    r_ = s["r"]
    print(f"   R={r_}: read p50 {p50:.2f} ms, predicted {predicted} ms ({(p50 / predicted - 1) * 100:+.1f}%)")
PY
done
