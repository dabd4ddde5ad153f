#!/usr/bin/env bash
# `make bench`: vsock throughput beside virtio-console in one minivmm boot (both directions).
# BENCH_RUNS (default 3) transfers of BENCH_VSOCK_SIZE bytes (default 1 MiB) each way on each.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 resources/bench-vsock.py --kernel build/guest/vmlinux --initrd build/initramfs-vp.cpio \
    --minivmm target/release/minivmm --runs "${BENCH_RUNS:-3}" --size "${BENCH_VSOCK_SIZE:-1048576}"
