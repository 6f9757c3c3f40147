#!/usr/bin/env bash
# What a rolling restart costs `ringkv bench --cluster` (bench/RESULTS.md,
# "The bench across a rolling restart"): three local `ringkv node`s, a
# closed-loop YCSB-A run (R=W=2, 1 KiB, 50 clients, one connection per node)
# of DURATION_S seconds; STOP_AT_S seconds in, n1 gets SIGTERM (or SIGNAL), stays down
# DOWN_S seconds and starts again on its data dir. Prints the run's
# throughput, errors, timeouts, failovers and latency percentiles, and the
# first error of each operation type.
#
#   bench/rolling.sh [DURATION_S] [STOP_AT_S] [DOWN_S]    # defaults 20 5 4
#   SIGNAL=KILL bench/rolling.sh ...    # kill -9 instead of a drain
#
# Needs a release build: cargo build --release --bin ringkv
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-20}
stop_at=${2:-5}
down=${3:-4}
. bench/nodes.sh
start_three
"$bin" bench --cluster "$cluster" --regions none --workload a --records 10000 --consistency 2 \
  --concurrency 50 --duration-s "$duration" --json "$dir/r.json" > /dev/null 2> "$dir/bench.err" &
bench_pid=$!
# The load of 10,000 records takes about a second: wait for the run phase.
sleep $((stop_at + 1))
kill -"${SIGNAL:-TERM}" "${pids[0]}"
while kill -0 "${pids[0]}" 2>/dev/null; do sleep 0.05; done
sleep "$down"
rm -f "$dir/n1.out"
start n1 7300
wait "$bench_pid" || { echo "bench failed:"; cat "$dir/bench.err"; exit 1; }
python3 - "$dir/r.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))["settings"][0]
ops = s["ops"]
errors = sum(o["errors"] for o in ops.values())
timeouts = sum(o["timeouts"] for o in ops.values())
shed = sum(o["shed"] for o in ops.values())
r, u = ops["read"], ops["update"]
ms = lambda v, d=2: "-" if v is None else f"{v:.{d}f}"  # null: nothing answered
print(f"{s['ops_per_sec']:.0f} ops/s, errors {errors}, timeouts {timeouts}, shed {shed}, failovers {s.get('failovers', '-')}; "
      f"read p50/p99/max {ms(r['p50_ms'])}/{ms(r['p99_ms'])}/{ms(r['max_ms'], 1)} ms, "
      f"update p50/p99/max {ms(u['p50_ms'])}/{ms(u['p99_ms'])}/{ms(u['max_ms'], 1)} ms")
for name, o in ops.items():
    if o.get("first_error"):
        print(f"  {name}: first error: {o['first_error']}")
PY
