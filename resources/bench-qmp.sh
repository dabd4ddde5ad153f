#!/usr/bin/env bash
# `make bench`: QMP start-up and query-status latency, minivmm beside QEMU microvm.
# Installs QEMU (Debian's qemu-system-x86) when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
. resources/need-qemu.sh
exec python3 resources/bench-qmp.py --kernel build/guest/vmlinux --initrd build/initramfs.cpio \
    --minivmm target/release/minivmm --starts "${BENCH_RUNS:-5}"
