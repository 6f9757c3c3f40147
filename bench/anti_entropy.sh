#!/usr/bin/env bash
# Reproduces the anti-entropy figures in bench/RESULTS.md: three `ringkv node`
# processes on loopback (N=3, --no-hints, no periodic rounds), loaded with
# KEYS keys of 100 bytes at W=all; then
#  1. a repair round between identical replicas (bytes exchanged);
#  2. n3 killed, DIVERGENT new keys written at W=2, n3 restarted (its Merkle
#     trees rebuilt from disk: the log gives the time), one repair round on
#     n3 (keys repaired, bytes, share of the data set), then a second one;
#  3. RUNS times: put latency with no repair running, then with a repair of
#     DURING keys running on n3 (kill n3, write DURING keys, restart, repair
#     in the background while `ringkv bench` puts through n1 and n2).
#
#   bench/anti_entropy.sh [KEYS] [DIVERGENT] [RUNS] [DURING]   # defaults 1000000 100 3 20000
#
# REPAIR_KEYS_PER_S=N in the environment passes --repair-keys-per-s N to the nodes.
#
# Needs release builds: cargo build --release --bin ringkv && cargo build --release -p ringkv-bench --bin ringkv-load
set -euo pipefail
cd "$(dirname "$0")/.."
keys=${1:-1000000}
divergent=${2:-100}
runs=${3:-3}
during=${4:-20000}
rate=()
[ -n "${REPAIR_KEYS_PER_S:-}" ] && rate=(--repair-keys-per-s "$REPAIR_KEYS_PER_S")
rel="${CARGO_TARGET_DIR:-target}/release"
bin="$rel/ringkv"
load="$rel/ringkv-load"
for b in "$bin" "$load"; do
  [ -x "$b" ] || { echo "build first: cargo build --release --bin ringkv && cargo build --release -p ringkv-bench --bin ringkv-load" >&2; exit 2; }
done

dir=$(mktemp -d)
declare -A pid
cleanup() { kill "${pid[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT

start() { # id port [seed]
  local extra=()
  [ -n "${3:-}" ] && extra=(--seed "$3")
  : > "$dir/$1.out"
  "$bin" --log info node --id "$1" --listen "127.0.0.1:$2" --data-dir "$dir/$1" --replicas 3 \
    --no-hints --anti-entropy-interval-s 0 "${rate[@]}" "${extra[@]}" >> "$dir/$1.out" 2>&1 &
  pid[$1]=$!
  for _ in $(seq 300); do grep -q "serving on" "$dir/$1.out" 2>/dev/null && return 0; sleep 0.1; done
  echo "node $1 did not start:" >&2; cat "$dir/$1.out" >&2; exit 1
}
# Waits for n3's trees to be rebuilt after a start and prints the log line.
rebuilt() {
  for _ in $(seq 600); do
    if grep -q "Merkle trees rebuilt" "$dir/n3.out"; then
      grep "Merkle trees rebuilt" "$dir/n3.out" | tail -1 | sed 's/\x1b\[[0-9;]*m//g; s/.*INFO/   /'
      return 0
    fi
    sleep 0.1
  done
  echo "n3 did not rebuild its trees" >&2; exit 1
}
restart_n3() {
  kill -9 "${pid[n3]}"; wait "${pid[n3]}" 2>/dev/null || true
}
repair_n3() { "$bin" repair --node 127.0.0.1:7202 --json; }

start n1 7200
start n2 7201 127.0.0.1:7200
start n3 7202 127.0.0.1:7200
. bench/machine.sh; machine_header
echo "== load: $load --cluster 127.0.0.1:7200,127.0.0.1:7201,127.0.0.1:7202 --prefix ae: --count $keys --value-bytes 100 -w all"
"$load" --cluster 127.0.0.1:7200,127.0.0.1:7201,127.0.0.1:7202 --prefix ae: --count "$keys" --value-bytes 100 -w all
echo "== data set: $keys keys, about $(( keys * (100 + 9) )) bytes of keys and values per replica"

echo "== repair between identical replicas"
repair_n3

echo "== n3 killed; $divergent new keys at W=2; n3 restarted"
restart_n3
"$load" --cluster 127.0.0.1:7200,127.0.0.1:7201 --prefix div: --count "$divergent" --value-bytes 100 -w 2
sleep 2.5 # let coordinators stop retrying n3 (request deadline 2 s)
start n3 7202
rebuilt
echo "== repair on n3 (first round, then a second)"
repair_n3
repair_n3

bench() { "$bin" bench --workload putget --cluster 127.0.0.1:7200,127.0.0.1:7201 --concurrency 4 --duration-s 10 -w 2 -r 2 --value-bytes 100 2>/dev/null | grep -i "put"; }
for run in $(seq "$runs"); do
  echo "== run $run: idle"
  bench
  echo "== run $run: during a repair of $during keys on n3"
  restart_n3
  "$load" --cluster 127.0.0.1:7200,127.0.0.1:7201 --prefix "during$run:" --count "$during" --value-bytes 100 -w 2
  sleep 2.5
  start n3 7202
  rebuilt
  repair_n3 > "$dir/repair.json" &
  rp=$!
  bench
  wait $rp
  cat "$dir/repair.json"
done
