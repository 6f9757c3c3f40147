#!/usr/bin/env bash
# Every test: unit, property, simulated-network scenario and end-to-end tests
# (real ringkv processes on 127.x loopback addresses). The first run compiles
# RocksDB (~15 min on 2 cores).
#
# Always build with --workspace --all-targets: other package sets unify
# features differently and would compile RocksDB's C++ once more.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec cargo test --workspace --all-targets "$@"
