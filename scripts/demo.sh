#!/usr/bin/env bash
# Set up fcvm on a fresh Debian host, then run its main job and show the output.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

need_root
install_host_packages
build_workspace
setup_firecracker

echo "== fcvm doctor"
"$FCVM" doctor || true
echo "== fcvm run: the probe guest under the real Firecracker (10 ticks, then it powers off)"
"$FCVM" run --name demo --kernel probe --mem 256 \
    --boot-args "probe.mem_mib=64 probe.tick_ms=100 probe.exit_after=10"
