# Shared steps for scripts/demo.sh and scripts/test.sh (sourced, not run).

export FCVM_BASE_DIR="${FCVM_BASE_DIR:-/var/lib/fcvm}"
FCVM="$PWD/target/debug/fcvm"

need_root() {
    if [ "$(id -u)" != 0 ]; then
        echo "error: run as root (fcvm needs /dev/kvm, network namespaces, loop devices)" >&2
        exit 1
    fi
}

# Debian packages fcvm and its tests use. Installed only when something is missing.
HOST_PACKAGES=(gcc binutils iproute2 python3-pip)

install_host_packages() {
    local missing=()
    for pkg in "${HOST_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    # pip may come from a non-Debian Python; then python3-pip is not needed.
    if python3 -m pip --version >/dev/null 2>&1; then
        missing=("${missing[@]/python3-pip/}")
    fi
    missing=($(printf '%s\n' "${missing[@]}" | grep -v '^$' || true))
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "== apt-get install ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
    fi
}

build_workspace() {
    echo "== cargo build"
    cargo build --workspace --locked
}

setup_firecracker() {
    echo "== fcvm setup firecracker"
    "$FCVM" setup firecracker
    export FCVM_FIRECRACKER_BIN="${FCVM_FIRECRACKER_BIN:-$(command -v firecracker || echo "$FCVM_BASE_DIR/bin/firecracker")}"
}
