#!/usr/bin/env bash
# `make bench`: virtio-console throughput through one port, both directions, minivmm beside
# QEMU microvm's virtio-serial on the same guest. Installs QEMU when missing.
# BENCH_RUNS (default 5) transfers of BENCH_VIRTIO_SIZE bytes (default 1 MiB: the guest
# kernel moves about 0.1-0.3 MB/s on this machine's emulated ring 0) each way, in one boot.
set -euo pipefail
cd "$(dirname "$0")/.."
. resources/need-qemu.sh
exec python3 resources/bench-virtio.py --kernel build/guest/vmlinux --initrd build/initramfs.cpio \
    --minivmm target/release/minivmm --runs "${BENCH_RUNS:-5}" --size "${BENCH_VIRTIO_SIZE:-1048576}"
