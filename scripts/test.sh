#!/usr/bin/env bash
# Set up everything the test suite needs on a fresh Debian host, then run it.
# Idempotent: re-running skips what is already in place.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

need_root
install_host_packages
build_workspace
setup_fcvm

echo "== cargo test (Firecracker: $FCVM_FIRECRACKER_BIN)"
# One test thread per core at most: the real-Firecracker tests boot VMs and the
# machine has 2 cores.
cargo test --workspace --locked -- --test-threads=2 "$@"
