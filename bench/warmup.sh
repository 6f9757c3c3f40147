#!/usr/bin/env bash
# What the warm-up does to the open loop's tail (bench/RESULTS.md, "Session
# 26"): YCSB-A at RATE ops/s on three local `ringkv node`s (as latency.sh),
# alternating --warmup-s 0 and 1 in pairs (0/1, 1/0, 0/1), each pair on a
# fresh cluster.
#
#   bench/warmup.sh [RATE]    # default 10000
#
# Needs a release build: cargo build --release --bin ringkv
set -euo pipefail
cd "$(dirname "$0")/.."
rate=${1:-10000}
for pair in "0 1" "1 0" "0 1"; do
  (
    . bench/nodes.sh
    start_three
    for w in $pair; do
      echo "== warm-up $w s: ringkv bench --cluster $cluster --regions none --workload a --records 10000 --consistency 2 --concurrency 50 --rate $rate --duration-s 10 --warmup-s $w"
      "$bin" bench --cluster "$cluster" --regions none --workload a --records 10000 --consistency 2 \
        --concurrency 50 --rate "$rate" --duration-s 10 --warmup-s "$w" 2>/dev/null | sed -n 1,3p
    done
  )
done
