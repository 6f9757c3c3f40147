#!/usr/bin/env bash
# A profile-guided release build of ringkv (PGO): build an instrumented
# binary, run it on a training load (three local nodes; YCSB A, B, C, D, F
# with 50 clients, a put-get loop with one client, an open loop; one bench
# process at a time), merge the profiles, and build again with them, so
# that the compiler lays out and inlines the code along the paths a
# request takes. bench/RESULTS.md, "Session 38", measures what it buys
# against the plain release build.
#
#   bench/pgo.sh            # prints the path of the built binary on its last line
#   RINGKV_BIN=$(bench/pgo.sh | tail -1) bench/ycsb.sh 3 10 "a c"
#
# Needs llvm-profdata of the LLVM version rustc is built on (`rustc -vV`);
# installs Debian's llvm-<version> when it is missing (as root, or with
# sudo). The build goes to $CARGO_TARGET_DIR/pgo (default target/pgo), with
# --target given so that RUSTFLAGS reach the crates but not the build
# scripts' binaries. Cargo still runs RocksDB's build script again when
# RUSTFLAGS change, so each of the two builds compiles its C++ anew: a run
# takes about 35 minutes on 2 cores (2026-12-01), the training 30 s of it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

llvm_major=$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
host=$(rustc -vV | sed -n 's/^host: //p')
profdata=$(command -v "llvm-profdata-$llvm_major" || true)
if [ -z "$profdata" ]; then
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  echo "pgo: installing llvm-$llvm_major (llvm-profdata, to merge the profiles)" >&2
  $sudo apt-get update -qq >&2
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "llvm-$llvm_major" >&2
  profdata=$(command -v "llvm-profdata-$llvm_major") || {
    echo "pgo: no llvm-profdata-$llvm_major after installing llvm-$llvm_major" >&2; exit 1; }
fi

# Absolute paths: the profile paths go into RUSTFLAGS, and the last line
# names the binary for callers in any directory.
out="${CARGO_TARGET_DIR:-target}/pgo"
mkdir -p "$out"
out=$(cd "$out" && pwd)
profiles="$out/profiles"
built="$out/$host/release/ringkv"
rm -rf "$profiles"
mkdir -p "$profiles"

echo "pgo: 1/3 instrumented build" >&2
RUSTFLAGS="-Cprofile-generate=$profiles" \
  cargo build --release --bin ringkv --target "$host" --target-dir "$out" >&2
instrumented="$out/ringkv-instrumented"
cp "$built" "$instrumented"

echo "pgo: 2/3 training run" >&2
(
  export RINGKV_BIN="$instrumented" LLVM_PROFILE_FILE="$profiles/%p-%m.profraw"
  . bench/nodes.sh
  start_three
  for w in a b c d f; do
    "$bin" bench --cluster "$cluster" --regions none --workload "$w" --records 10000 \
      --consistency 2 --concurrency 50 --duration-s 4 >/dev/null
  done
  "$bin" bench --cluster "$cluster" --workload putget -r 2 -w 2 --concurrency 1 \
    --duration-s 4 >/dev/null
  "$bin" bench --cluster "$cluster" --regions none --workload a --records 10000 \
    --consistency 2 --concurrency 50 --rate 3000 --duration-s 4 >/dev/null
) >&2
# The nodes write their profiles as they exit, on the SIGTERM of nodes.sh.
count=$(find "$profiles" -name '*.profraw' | wc -l)
# 3 nodes and 7 bench runs each write one.
[ "$count" -ge 10 ] || { echo "pgo: expected profiles from 3 nodes and 7 bench runs, found $count" >&2; exit 1; }
rm -f "$out"/merged-*.profdata
"$profdata" merge -o "$out/merged.profdata" "$profiles"/*.profraw
# Cargo does not read the profile, only RUSTFLAGS: naming the profile by its
# content makes a new profile rebuild the crates even if nothing else changed.
merged="$out/merged-$(sha256sum "$out/merged.profdata" | cut -c1-16).profdata"
mv "$out/merged.profdata" "$merged"

echo "pgo: 3/3 optimised build" >&2
RUSTFLAGS="-Cprofile-use=$merged" \
  cargo build --release --bin ringkv --target "$host" --target-dir "$out" >&2
echo "$built"
