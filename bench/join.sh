#!/usr/bin/env bash
# The ring hand-over figures of bench/RESULTS.md: three local `ringkv node`s
# (N=3, one worker thread each, no periodic anti-entropy) hold COUNT keys of
# 100 B written at W=all; a fourth joins and takes about a quarter of each
# old node's keys, which each old node hands to it at PACE keys/s
# (`--repair-keys-per-s`). Prints, from the old nodes' metrics, when each
# finished its pass and how many keys it sent, and every process's CPU.
#
#   bench/join.sh [COUNT] [PACE]     # defaults 100000 and 1000
#
# Needs release builds: cargo build --release --bin ringkv; cargo build --release -p ringkv-bench --bin ringkv-load
set -euo pipefail
cd "$(dirname "$0")/.."
count=${1:-100000}
pace=${2:-1000}
. bench/nodes.sh
load="$(dirname "$bin")/ringkv-load"
[ -x "$load" ] || { echo "build first: cargo build --release -p ringkv-bench --bin ringkv-load" >&2; exit 2; }
NODE_FLAGS=(--worker-threads 1 --anti-entropy-interval-s 0 --repair-keys-per-s "$pace")
start n1 7500 "" --metrics 127.0.0.1:9500
start n2 7501 127.0.0.1:7500 --metrics 127.0.0.1:9501
start n3 7502 127.0.0.1:7500 --metrics 127.0.0.1:9502
"$load" --cluster 127.0.0.1:7500,127.0.0.1:7501,127.0.0.1:7502 --prefix j: --count "$count" --value-bytes 100 -w all 2>&1 | tail -1
tck=$(getconf CLK_TCK)
cpu() { for p in "${pids[@]}"; do awk -v t="$tck" '{printf "%.2f ", ($14 + $15) / t}' "/proc/$p/stat"; done; }
metric() { # port name: the sample's value, 0 if absent
  curl -s "http://127.0.0.1:$1/metrics" | awk -v n="$2" '$1 == n {print $2; found=1} END {if (!found) print 0}'
}
# Passes already done (the cluster's own forming changed the ring too).
declare -A before=([none]=0)
for port in 9500 9501 9502; do
  before[$port]=$(metric "$port" 'ringkv_ring_handover_passes_total{outcome="done"}')
done
c0=$(cpu)
t0=$(date +%s.%N)
start n4 7503 127.0.0.1:7500
declare -A done_at=([none]=0)
finished=0
while [ "$finished" -lt 3 ]; do
  for port in 9500 9501 9502; do
    [ -n "${done_at[$port]:-}" ] && continue
    if [ "$(metric "$port" 'ringkv_ring_handover_passes_total{outcome="done"}')" != "${before[$port]}" ]; then
      done_at[$port]=$(echo "$(date +%s.%N) - $t0" | bc)
      finished=$((finished + 1))
      echo "n$((port - 9499)): pass done at ${done_at[$port]} s after n4 started, $(metric "$port" ringkv_ring_handover_keys_total) keys sent"
    fi
  done
  sleep 0.2
  [ "$(echo "$(date +%s.%N) - $t0 > 600" | bc)" = 1 ] && { echo "no pass done within 600 s" >&2; exit 1; }
done
echo "CPU s of n1..n4 before n4: $c0 after: $(cpu)"
