#!/usr/bin/env bash
# `make bench`, serial part: baud-rate pacing error of minivmm's 16550 (guest->host and
# host->guest at 9600/38400/115200 8N1 and 38400 7E2), its throughput with pacing off, and
# QEMU microvm's unpaced 16550 on the same tiny guests (tests/guests/blast.S, sink.S).
# Builds minivmm (release) and the tiny guests; installs QEMU (Debian's qemu-system-x86) when
# missing. Runs: BENCH_RUNS (default 3); extra arguments go to bench-serial.py.
set -euo pipefail
cd "$(dirname "$0")/.."
. resources/need-qemu.sh
cargo build --release -q -p vmm
# The guests are assembled by the tests crate's build script, into its OUT_DIR.
out_dir=$(cargo build -q -p tests --message-format=json | python3 -c '
import json, re, sys
for line in sys.stdin:
    msg = json.loads(line)
    if msg.get("reason") == "build-script-executed" and re.search(
            r"/tests#|^tests ", msg["package_id"]):
        print(msg["out_dir"])
')
if [ ! -f "$out_dir/guests/blast.elf" ] || [ ! -f "$out_dir/guests/sink.elf" ]; then
    echo "bench: no blast.elf/sink.elf under '$out_dir/guests'" >&2
    exit 1
fi
exec python3 resources/bench-serial.py --minivmm target/release/minivmm \
    --blast "$out_dir/guests/blast.elf" --sink "$out_dir/guests/sink.elf" \
    --runs "${BENCH_RUNS:-3}" "$@"
