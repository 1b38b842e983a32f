#!/usr/bin/env bash
# Set up fcvm on a fresh Debian host, then run its main job and show the output:
# the probe guest under the real Firecracker, a snapshot served to two UFFD clones, and a
# container run with `fcvm podman run` in the real Firecracker on fcvm's guest kernel (natively
# where this host's KVM boots Linux guests, otherwise inside the emulated KVM host).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

need_root
install_host_packages
build_workspace
setup_fcvm

console_of() {
    "$FCVM" ls --json | python3 -c 'import json,sys; n=sys.argv[1]; print(next(v["console_log"] for v in json.load(sys.stdin) if v["name"]==n))' "$1"
}

cleanup() {
    for vm in demo-clone-1 demo-clone-2 demo-probe; do "$FCVM" stop "$vm" --timeout 1 >/dev/null 2>&1 || true; done
    [ -n "${SERVE_PID:-}" ] && kill "$SERVE_PID" 2>/dev/null || true
    sleep 0.5
    "$FCVM" snapshots rm demo-snap >/dev/null 2>&1 || true
}
trap cleanup EXIT
cleanup

echo
echo "== fcvm doctor"
"$FCVM" doctor || true

echo
echo "== fcvm run: the probe guest under the real Firecracker (it fills 64 MiB and re-verifies it every tick)"
"$FCVM" run --name demo-probe --kernel probe --mem 256 --detach \
    --boot-args "probe.mem_mib=64 probe.tick_ms=200"
sleep 1.5
head -n 4 "$(console_of demo-probe)"

echo
echo "== fcvm snapshot create, serve, and two clones restored through the UFFD memory server"
"$FCVM" snapshot create demo-probe --tag demo-snap
SERVE_PID=$("$FCVM" snapshot serve demo-snap --detach)
"$FCVM" snapshot run --pid "$SERVE_PID" --name demo-clone-1 --detach
"$FCVM" snapshot run --pid "$SERVE_PID" --name demo-clone-2 --detach
sleep 1
"$FCVM" ls
echo "-- demo-probe, the original (last ticks):"
tail -n 2 "$(console_of demo-probe)"
for vm in demo-clone-1 demo-clone-2; do
    echo "-- $vm: restored mid-run, so no new banner; ticks continue from the snapshot, same checksum:"
    head -n 1 "$(console_of "$vm")"
    tail -n 1 "$(console_of "$vm")"
done
cleanup

echo
echo "== fcvm podman run: a busybox container (built on the spot from Debian's busybox-static) in the real Firecracker, on fcvm's guest kernel"
IMAGE_TAR="$FCVM_BASE_DIR/images/demo-busybox.tar"
mkdir -p "$(dirname "$IMAGE_TAR")"
REF=$(target/debug/examples/busybox-image "$IMAGE_TAR" demo-busybox 1)
on_real_kvm "$FCVM" podman run --name demo-container --image-archive "$IMAGE_TAR" \
    --kernel "$FCVM_TEST_KERNEL" --rootfs "$FCVM_TEST_ROOTFS" "$REF" -- \
    sh -c 'echo "hello from a container"; echo "kernel: $(uname -r), hostname: $(hostname), cpus: $(nproc)"; ls /; echo "to stderr" >&2; exit 3' \
    && rc=0 || rc=$?
echo "(container exit code forwarded: $rc)"
