#!/usr/bin/env bash
# The `ringkv cleanup` figures of bench/RESULTS.md: three local `ringkv node`s
# (N=3, one worker thread each, no periodic anti-entropy) hold COUNT keys of
# 100 B written at W=all; a fourth joins and takes about a quarter of each
# old node's keys; then `ringkv cleanup` runs on n1 twice (the second finds
# nothing stray). Prints each answer, its wall time and every process's CPU.
#
#   bench/cleanup.sh [COUNT]     # default 100000
#
# Needs release builds: cargo build --release --bin ringkv; cargo build --release -p ringkv-bench --bin ringkv-load
set -euo pipefail
cd "$(dirname "$0")/.."
count=${1:-100000}
. bench/nodes.sh
load="$(dirname "$bin")/ringkv-load"
[ -x "$load" ] || { echo "build first: cargo build --release -p ringkv-bench --bin ringkv-load" >&2; exit 2; }
NODE_FLAGS=(--worker-threads 1 --anti-entropy-interval-s 0)
start n1 7400; start n2 7401 127.0.0.1:7400; start n3 7402 127.0.0.1:7400
"$load" --cluster 127.0.0.1:7400,127.0.0.1:7401,127.0.0.1:7402 --prefix cl: --count "$count" --value-bytes 100 -w all 2>&1 | tail -1
start n4 7403 127.0.0.1:7400
members() { "$bin" status --node 127.0.0.1:7400 --json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["nodes"]))'; }
for _ in $(seq 100); do [ "$(members)" = 4 ] && break; sleep 0.1; done
tck=$(getconf CLK_TCK)
cpu() { for p in "${pids[@]}"; do awk -v t="$tck" '{printf "%.2f ", ($14 + $15) / t}' "/proc/$p/stat"; done; }
for run in 1 2; do
  c0=$(cpu); t0=$(date +%s.%N)
  "$bin" cleanup --node 127.0.0.1:7400 --json
  t1=$(date +%s.%N); c1=$(cpu)
  echo "run $run: $(echo "$t1 - $t0" | bc) s; CPU s of n1..n4 before: $c0 after: $c1"
done
