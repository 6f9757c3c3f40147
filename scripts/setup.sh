#!/usr/bin/env bash
# Installs what building ringkv needs beyond the Rust toolchain: libclang,
# which RocksDB's Rust bindings (bindgen) load at build time. Safe to re-run:
# it installs nothing when libclang is already there.
set -euo pipefail

has_libclang() {
  ldconfig -p 2>/dev/null | grep -qE 'libclang(-[0-9.]+)?\.so' && return 0
  ls /usr/lib/llvm-*/lib/libclang.so* /usr/lib/x86_64-linux-gnu/libclang-*.so* >/dev/null 2>&1
}

if ! has_libclang; then
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  echo "setup: installing libclang-dev (needed to build RocksDB's bindings)" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq libclang-dev clang >/dev/null
fi
command -v cargo >/dev/null || { echo "setup: cargo not found; install the Rust toolchain (rustup) first" >&2; exit 1; }
