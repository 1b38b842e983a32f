#!/usr/bin/env bash
# Set up everything the test suite needs on a fresh Debian host, then run it.
# Idempotent: re-running skips what is already in place.
#
# Two tiers:
# 1. natively: fmt, clippy, unit tests, the real Firecracker with the probe guest, the page
#    server, and fcvm-testhost's own tests;
# 2. the container tests (`linux_guest::`) on the real path: the real Firecracker booting fcvm's
#    guest kernel with the agent and podman. Natively where this host's KVM boots Linux
#    guests; otherwise inside the emulated KVM host (fcvm-testhost).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

need_root
install_host_packages
build_workspace
setup_fcvm

echo "== cargo fmt --check"
cargo fmt --all --check
echo "== cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== cargo test, native tier (Firecracker: $FCVM_FIRECRACKER_BIN)"
# One test thread per core at most: the real-Firecracker tests boot VMs and the
# machine has 2 cores.
cargo test --workspace --locked -- --test-threads=2 --skip linux_guest:: "$@"

echo "== cargo test, container tier on the real path"
integration=$(cargo test -p fcvm --test integration --locked --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "integration":
        print(m["executable"])')
on_real_kvm "$integration" linux_guest:: --test-threads=1 "$@"
