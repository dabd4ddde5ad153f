#!/usr/bin/env bash
# `make bench`: QMP start-up and query-status latency, minivmm beside QEMU microvm.
# Installs QEMU (Debian's qemu-system-x86) when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
    echo "bench: installing qemu-system-x86" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-system-x86 >/dev/null
fi
exec python3 resources/bench-qmp.py --kernel build/guest/vmlinux --initrd build/initramfs.cpio \
    --minivmm target/release/minivmm --starts "${BENCH_RUNS:-5}"
