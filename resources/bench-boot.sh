#!/usr/bin/env bash
# `make bench`: boot-time table, minivmm beside QEMU microvm on the same guest.
# Installs QEMU (Debian's qemu-system-x86) when missing. Runs: BENCH_RUNS (default 3).
set -euo pipefail
cd "$(dirname "$0")/.."
. resources/need-qemu.sh
exec python3 resources/bench-boot.py --kernel build/guest/vmlinux --initrd build/initramfs.cpio \
    --minivmm target/release/minivmm --runs "${BENCH_RUNS:-3}"
