#!/usr/bin/env bash
# The speed figures of bench/RESULTS.md: three `ringkv node` processes on
# loopback (N=3, WAL on, no fsync, no emulated latency), then `ringkv bench`
# with YCSB workloads at R=W=2, 1 KiB values, 50 clients, several runs each.
# Prints, per run, the bench table and the CPU time (user+system, all nodes
# and the client) per operation, from /proc/<pid>/stat.
#
#   bench/ycsb.sh [RUNS] [DURATION_S] [WORKLOADS] [CONCURRENCY]   # defaults 3 10 "a c" 50
#   RINGKV_NODE_FLAGS="" bench/ycsb.sh ...     # other node flags (default --worker-threads 1)
#   RINGKV_BENCH_FLAGS="--updates context" bench/ycsb.sh ...   # extra bench flags
#   RINGKV_BENCH_FLAGS="--connections 50" bench/ycsb.sh ...   # a connection per client (default: one per node, shared)
#
# Needs a release build: cargo build --release --bin ringkv
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
duration=${2:-10}
workloads=${3:-a c}
clients=${4:-50}
. bench/nodes.sh
start_three
tck=$(getconf CLK_TCK)
bench_flags=${RINGKV_BENCH_FLAGS:-}
# CPU ticks (user + system) of the node processes.
node_ticks() { local t=0; for p in "${pids[@]}"; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done; echo $t; }

. bench/machine.sh; machine_header
for w in $workloads; do
  for run in $(seq "$runs"); do
    echo "== YCSB-$w run $run: ringkv bench --cluster $cluster --regions none --workload $w --records 10000 --consistency 2 --concurrency $clients --duration-s $duration $bench_flags (nodes: ${NODE_FLAGS[*]})"
    before=$(node_ticks)
    /usr/bin/time -f "client cpu %U %S" -o "$dir/time" "$bin" bench --cluster "$cluster" --regions none --workload "$w" --records 10000 \
      --consistency 2 --concurrency "$clients" --duration-s "$duration" $bench_flags --json "$dir/run.json" 2>/dev/null | sed -n "1,3p;/^setting  *siblings/,/^$/p"
    after=$(node_ticks)
    python3 - "$dir/run.json" "$dir/time" "$before" "$after" "$tck" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
_, _, user, system = open(sys.argv[2]).read().split()
node_s = (int(sys.argv[4]) - int(sys.argv[3])) / int(sys.argv[5])
s = report["settings"][0]
ops = sum(o["ops"] for o in s["ops"].values())
# The client's CPU covers the load phase too; count the load's writes.
total_ops = ops + report["config"]["records"]
cpu = node_s + float(user) + float(system)
client = float(user) + float(system)
print(f"   {s['ops_per_sec']:.0f} ops/s; CPU {cpu:.1f} s over {total_ops} ops (load + run) = {cpu / total_ops * 1e6:.0f} us/op"
      f" (nodes {node_s / total_ops * 1e6:.0f}, client {client / total_ops * 1e6:.0f})")
if s.get("host_steal_pct") is not None:
    per_op = s.get("machine_cpu_us_per_op")
    per_op = "no operations" if per_op is None else f"{per_op:.0f} us per operation"
    print(f"   machine {s['machine_busy_pct']:.0f}% busy ({per_op}, the run alone),"
          f" {s['host_steal_pct']:.1f}% taken by the host (steal)")
PY
  done
done
