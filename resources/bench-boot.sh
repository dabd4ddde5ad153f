#!/usr/bin/env bash
# `make bench`: boot-time table, minivmm beside QEMU microvm on the same guest.
# Installs QEMU (Debian's qemu-system-x86) when missing. Runs: BENCH_RUNS (default 3).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
    echo "bench: installing qemu-system-x86" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-system-x86 >/dev/null
fi
exec python3 resources/bench-boot.py --kernel build/guest/vmlinux --initrd build/initramfs.cpio \
    --minivmm target/release/minivmm --runs "${BENCH_RUNS:-3}"
