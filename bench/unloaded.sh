#!/usr/bin/env bash
# Where an unloaded W=2 put's time goes (bench/RESULTS.md, "Speed, step 10"):
# three local `ringkv node`s and one client doing puts then gets one at a
# time (putget, R=W=2, 1 KiB), ROUNDS times unpinned and with every process
# pinned to CPU 0 (no vCPU wake-ups), then one unpinned run that prints each
# process's CPU time per operation.
#
#   bench/unloaded.sh [ROUNDS]     # default 3
#
# Needs a release build: cargo build --release --bin ringkv
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
p50s='import json,sys; r=json.load(open(sys.argv[1])); print("put p50", r["put"]["p50_ms"], "ms, get p50", r["get"]["p50_ms"], "ms")'
for round in $(seq "$rounds"); do
  for pin in no cpu0; do
    ( if [ "$pin" = cpu0 ]; then taskset -p -c 0 "$BASHPID" >/dev/null; fi
      . bench/nodes.sh; start_three
      "$bin" bench --cluster "$cluster" --workload putget -r 2 -w 2 --concurrency 1 --duration-s 5 --json "$dir/r.json" >/dev/null 2>&1
      echo "round $round, pinned $pin: $(python3 -c "$p50s" "$dir/r.json")" )
  done
done
( . bench/nodes.sh; start_three
  tck=$(getconf CLK_TCK)
  ticks() { for p in "${pids[@]}"; do awk '{printf "%d ", $14 + $15}' "/proc/$p/stat"; done; }
  before=$(ticks)
  /usr/bin/time -f "%U %S" -o "$dir/time" "$bin" bench --cluster "$cluster" --workload putget -r 2 -w 2 \
    --concurrency 1 --duration-s 5 --json "$dir/r.json" >/dev/null 2>&1
  after=$(ticks)
  python3 - "$dir/r.json" "$before" "$after" "$tck" "$(cat "$dir/time")" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
ops = r["put"]["ops"] + r["get"]["ops"]
before, after = (list(map(int, a.split())) for a in sys.argv[2:4])
tck = int(sys.argv[4])
user, system = map(float, sys.argv[5].split())
nodes = [round((a - b) / tck / ops * 1e6) for a, b in zip(after, before)]
print(f"CPU per operation: n1..n3 {nodes} us, client {round((user + system) / ops * 1e6)} us")
PY
)
