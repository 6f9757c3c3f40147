#!/usr/bin/env bash
# The emulation-accuracy figure in bench/RESULTS.md: three `ringkv node`
# processes, one per cloud3 region (us-east, us-west, eu-west), N=3; a bench
# client of n1 (us-east) reads at R=1, 2 and 3. The matrix predicts the
# medians: local (no emulated delay between the client and n1), the round
# trip to us-west (68 ms), to eu-west (74 ms).
#
#   bench/regions.sh [RUNS]     # default 3
#
# Needs a release build: cargo build --release --bin ringkv
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
. bench/nodes.sh
start n1 7500 "" --region us-east --latency-matrix preset:cloud3
start n2 7501 127.0.0.1:7500 --region us-west --latency-matrix preset:cloud3
start n3 7502 127.0.0.1:7500 --region eu-west --latency-matrix preset:cloud3
. bench/machine.sh; machine_header
for run in $(seq "$runs"); do
  echo "== run $run: ringkv bench --cluster 127.0.0.1:7500 --workload c --records 100 --concurrency 4 --duration-s 5 --consistency 1,2,3 --json"
  "$bin" bench --cluster 127.0.0.1:7500 --workload c --records 100 --concurrency 4 --duration-s 5 \
    --consistency 1,2,3 --json > "$dir/run.json"
  python3 - "$dir/run.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
for s, predicted in zip(r["settings"], [None, 68.0, 74.0]):
    p50 = s["ops"]["read"]["p50_ms"]
    r_ = s["r"]
    if p50 is None:
        print(f"   R={r_}: no read answered")
    elif predicted is None:
        print(f"   R={r_}: read p50 {p50:.2f} ms, predicted: local, no emulated delay")
    else:
        print(f"   R={r_}: read p50 {p50:.2f} ms, predicted {predicted} ms ({(p50 / predicted - 1) * 100:+.1f}%)")
PY
done
