#!/usr/bin/env bash
# The main job: build ringkv (release), start a throwaway local 3-node
# cluster (N=3) and show puts and gets at one, quorum and all, siblings from
# concurrent writes, and a delete. The first run compiles RocksDB (~15 min on
# 2 cores); later runs start in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec cargo run --release --bin ringkv -- demo "$@"
