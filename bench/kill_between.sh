#!/usr/bin/env bash
# A node killed during the first of two settings (bench/RESULTS.md, "The
# bench across a rolling restart"): three local `ringkv node`s, YCSB-A at
# `one` then `quorum`, 30 clients on 10 connections per node, 4 s each; n3
# gets kill -9 3 s in. Prints each setting's throughput, failovers, errors
# and timeouts, and the command's wall time (the second setting's clients
# connect while n3 is down).
#
#   bench/kill_between.sh
#
# Needs a release build: cargo build --release --bin ringkv
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/nodes.sh
start_three
started=$(date +%s.%N)
"$bin" bench --cluster "$cluster" --regions none --workload a --records 1000 --consistency one,quorum \
  --concurrency 30 --connections 10 --duration-s 4 --json "$dir/r.json" > /dev/null 2> "$dir/bench.err" &
bench_pid=$!
sleep 3
kill -KILL "${pids[2]}"
wait "$bench_pid" || { echo "bench failed:"; cat "$dir/bench.err"; exit 1; }
ended=$(date +%s.%N)
python3 - "$dir/r.json" "$started" "$ended" <<'PY'
import json, sys
for s in json.load(open(sys.argv[1]))["settings"]:
    failed = {k: (v["errors"], v["timeouts"], v["shed"]) for k, v in s["ops"].items()}
    print(f"{s['setting']}: {s['ops_per_sec']:.0f} ops/s, failovers {s['failovers']}, (errors, timeouts, shed) {failed}")
print(f"wall time {float(sys.argv[3]) - float(sys.argv[2]):.1f} s")
PY
