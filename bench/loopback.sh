#!/usr/bin/env bash
# Reproduces the figures in bench/RESULTS.md: a 3-node cluster of real
# `ringkv node` processes on loopback (N=3), then `ringkv bench` against it,
# several runs per setting so medians can be taken.
#
#   bench/loopback.sh [RUNS] [DURATION_S]            # concurrency 1 and 32, all nodes up
#   bench/loopback.sh [RUNS] [DURATION_S] one-down   # concurrency 1 against n1,n2: all up, then n3 killed
#   bench/loopback.sh [RUNS] [DURATION_S] handoff    # 5 nodes, W=all via n1..n4: all up, then n5 killed
#                                                    # (sloppy quorum); then n5 restarted and the hint
#                                                    # delivery rate measured
#
# Needs a release build: cargo build --release --bin ringkv
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
duration=${2:-10}
mode=${3:-throughput}
. bench/nodes.sh
start n1 7100
start n2 7101 127.0.0.1:7100
start n3 7102 127.0.0.1:7100
cluster=127.0.0.1:7100,127.0.0.1:7101,127.0.0.1:7102
if [ "$mode" = handoff ]; then
  start n4 7103 127.0.0.1:7100
  start n5 7104 127.0.0.1:7100
fi

. bench/machine.sh; machine_header
run_bench() { # label cluster concurrency [w]
  local w=${4:-2}
  for run in $(seq "$runs"); do
    echo "== $1, concurrency $3, run $run: ringkv bench --workload putget --cluster $2 --concurrency $3 --duration-s $duration -r 2 -w $w --value-bytes 100"
    "$bin" bench --workload putget --cluster "$2" --concurrency "$3" --duration-s "$duration" -r 2 -w "$w" --value-bytes 100 2>/dev/null
  done
}
# Total hints_pending over the nodes n1 can ask.
hints() { "$bin" status --node 127.0.0.1:7100 --json | grep -o '"hints_pending":[0-9][0-9]*' | cut -d: -f2 | paste -sd+ | bc; }
if [ "$mode" = handoff ]; then
  clients=127.0.0.1:7100,127.0.0.1:7101,127.0.0.1:7102,127.0.0.1:7103
  run_bench "all up" "$clients" 1 all
  kill -9 "${pids[4]}"
  for _ in $(seq 100); do
    "$bin" status --node 127.0.0.1:7100 --json | grep -q '"id":"n5","state":"down"' && break
    sleep 0.1
  done
  run_bench "n5 killed (sloppy quorum)" "$clients" 1 all
  held=$(hints)
  echo "== hints held for n5: $held; restarting n5"
  "$bin" node --id n5 --listen 127.0.0.1:7104 --data-dir "$dir/n5" > "$dir/n5.out2" 2>&1 &
  pids+=($!)
  t0=$(date +%s.%N)
  until "$bin" status --node 127.0.0.1:7100 --json | grep -q '"id":"n5","state":"up"'; do sleep 0.05; done
  t_up=$(date +%s.%N)
  until [ "$(hints)" = 0 ]; do sleep 0.05; done
  t_done=$(date +%s.%N)
  echo "== n5 seen up after $(echo "$t_up - $t0" | bc) s; all $held hints delivered $(echo "$t_done - $t_up" | bc) s later: $(echo "$held / ($t_done - $t_up)" | bc) hints/s"
elif [ "$mode" = one-down ]; then
  # Clients talk to n1 and n2 only, so the same clients run before and after.
  run_bench "all up" 127.0.0.1:7100,127.0.0.1:7101 1
  kill -9 "${pids[2]}"
  for _ in $(seq 100); do
    "$bin" status --node 127.0.0.1:7100 --json | grep -q '"id":"n3","state":"down"' && break
    sleep 0.1
  done
  run_bench "n3 killed" 127.0.0.1:7100,127.0.0.1:7101 1
else
  for concurrency in 1 32; do
    run_bench "all up" "$cluster" "$concurrency"
  done
fi
