#!/usr/bin/env bash
# Throughput with a node that stays dead (bench/RESULTS.md, "The bench
# across a rolling restart"): three local `ringkv node`s; 8 s of YCSB-A at
# `quorum` through n1 and n2 with all three up, then again 12 s after n3
# was killed (n1 has seen it down by then). Prints ops/s, client CPU per
# operation, and per operation (errors, timeouts, shed, p50 ms, p99 ms).
#
#   bench/dead_node.sh
#
# Needs a release build: cargo build --release --bin ringkv
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/nodes.sh; start_three
b() { "$bin" bench --cluster 127.0.0.1:7300,127.0.0.1:7301 --regions none --workload a --records 10000 --consistency quorum \
  --concurrency 50 --duration-s 8 --json "$dir/r.json" > /dev/null 2> "$dir/bench.err" \
  || { echo "bench failed:"; cat "$dir/bench.err"; exit 1; }; python3 -c "
import json; s=json.load(open('$dir/r.json'))['settings'][0]; print('$1', round(s['ops_per_sec']), s['cpu_us_per_op'], {k:(v['errors'],v['timeouts'],v['shed'],v['p50_ms'],v['p99_ms']) for k,v in s['ops'].items()})"; }
b alive
kill -KILL "${pids[2]}"; sleep 12
b n3-dead
"$bin" status --node 127.0.0.1:7300 2>&1 | head -8
