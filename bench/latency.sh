#!/usr/bin/env bash
# Latency figures of bench/RESULTS.md on three local `ringkv node`s (N=3, WAL
# on, no fsync, one worker thread each, as in ycsb.sh), R=W=2, 1 KiB values:
#  1. unloaded: one client, puts then gets, one at a time (putget);
#  2. loaded: YCSB workload W (default A) in an open loop at RATE: a number
#     of requests a second, or by default 50%, half the peak that a closed
#     loop of the same workload measures just before (so the peak is this
#     machine's, today's); latency counted from when each request was due.
#
#   bench/latency.sh [RATE] [DURATION_S] [W]    # defaults 50% 10 a
#
# RINGKV_OPEN_LOOP_FLAGS adds flags to the loaded run (and so to the peak
# measured before it), e.g. "--client-reads".
#
# Needs a release build: cargo build --release --bin ringkv
set -euo pipefail
cd "$(dirname "$0")/.."
rate=${1:-50%}
duration=${2:-10}
workload=${3:-a}
. bench/nodes.sh
start_three
. bench/machine.sh; machine_header
# Runs `ringkv bench ARGS`, its progress bars kept off the log; on failure
# prints its error (and what it reported) and stops the script.
bench() {
  if ! "$bin" bench "$@" > "$dir/bench.out" 2> "$dir/bench.err"; then
    cat "$dir/bench.out"; grep -a "error" "$dir/bench.err" >&2; exit 1
  fi
}
echo "== unloaded: ringkv bench --cluster $cluster --workload putget -r 2 -w 2 --concurrency 1 --duration-s $duration"
bench --cluster "$cluster" --workload putget -r 2 -w 2 --concurrency 1 --duration-s "$duration"
cat "$dir/bench.out"
read -ra open_loop_flags <<< "${RINGKV_OPEN_LOOP_FLAGS:-}"
echo "== open loop: ringkv bench --cluster $cluster --regions none --workload $workload --records 10000 --consistency 2 --concurrency 50 --rate $rate --duration-s $duration ${open_loop_flags[*]}"
bench --cluster "$cluster" --regions none --workload "$workload" --records 10000 --consistency 2 \
  --concurrency 50 --rate "$rate" --duration-s "$duration" "${open_loop_flags[@]}"
sed -n '1,3p;/^Peak/p;/^Wait from due/p;/^Of that wait/p;/^This machine/p;/client-driven reads/p' "$dir/bench.out"
