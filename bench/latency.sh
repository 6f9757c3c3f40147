#!/usr/bin/env bash
# Latency figures of bench/RESULTS.md on three local `ringkv node`s (N=3, WAL
# on, no fsync, one worker thread each, as in ycsb.sh), R=W=2, 1 KiB values:
#  1. unloaded: one client, puts then gets, one at a time (putget);
#  2. loaded: YCSB-A in an open loop at RATE ops/s (half the measured peak),
#     latency counted from when each request was due.
#
#   bench/latency.sh [RATE] [DURATION_S]    # defaults 5000 10
#
# Needs a release build: cargo build --release --bin ringkv
set -euo pipefail
cd "$(dirname "$0")/.."
rate=${1:-5000}
duration=${2:-10}
. bench/nodes.sh
start_three
. bench/machine.sh; machine_header
echo "== unloaded: ringkv bench --cluster $cluster --workload putget -r 2 -w 2 --concurrency 1 --duration-s $duration"
"$bin" bench --cluster "$cluster" --workload putget -r 2 -w 2 --concurrency 1 --duration-s "$duration" 2>/dev/null
echo "== open loop: ringkv bench --cluster $cluster --regions none --workload a --records 10000 --consistency 2 --concurrency 50 --rate $rate --duration-s $duration"
"$bin" bench --cluster "$cluster" --regions none --workload a --records 10000 --consistency 2 \
  --concurrency 50 --rate "$rate" --duration-s "$duration" 2>/dev/null | sed -n '1,3p;/^Wait from due/p;/^This machine/p'
