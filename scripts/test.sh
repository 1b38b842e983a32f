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

# CI stops the whole run at 90 minutes. The real-guest tier gets what remains of 85 of them
# (FCVM_TEST_BUDGET, in seconds) so a slow or hung test fails with its own output in time.
budget_total=${FCVM_TEST_BUDGET:-5100}
# Every step's line starts with the time since the start, to see where the minutes go.
stamp() { printf '[%02d:%02d] ' $((SECONDS / 60)) $((SECONDS % 60)); }

need_root
echo "$(stamp)== host packages"
install_host_packages
echo "$(stamp)== build"
build_workspace
kernel_build_start
build_test_tools
echo "$(stamp)== setup"
setup_fcvm --no-kernel

echo "$(stamp)== cargo fmt --check"
cargo fmt --all --check
echo "$(stamp)== cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "$(stamp)== cargo test, native tier (Firecracker: $FCVM_FIRECRACKER_BIN)"
# One test thread per core at most: the real-Firecracker tests boot VMs and the
# machine has 2 cores.
cargo test --workspace --locked -- --test-threads=2 --skip linux_guest:: "$@"

echo "$(stamp)== guest kernel"
kernel_build_wait
echo "$(stamp)== cargo test, container tier on the real path"
integration=$(cargo test -p fcvm --test integration --locked --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "integration":
        print(m["executable"])')
left=$((budget_total - SECONDS))
# Two emulated hosts at a time where memory holds them (FCVM_TEST_LANES overrides). 720 s per
# test: the longest (container clones, the registry pull) took 440-600 s beside another
# loaded emulated host; the limit only catches hangs.
bash scripts/guest-tier.sh --budget "$left" --per-test 720 --each-on-real-kvm \
    --lanes "${FCVM_TEST_LANES:-auto}" "$integration" "$@"
echo "$(stamp)== done"
