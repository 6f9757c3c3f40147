#!/usr/bin/env bash
# The main job: build ringkv (release) and run `ringkv bench` on its embedded
# default: 5 nodes (N=3) across 3 emulated regions, YCSB-A at one, quorum and
# all, side by side with staleness. Extra arguments go to `ringkv bench`
# (e.g. --workload c). The first run compiles RocksDB (~15 min on 2 cores);
# later runs take under a minute. `ringkv demo` shows siblings and contexts.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec cargo run --release --bin ringkv -- bench "$@"
