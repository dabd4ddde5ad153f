#!/usr/bin/env bash
# `make bench`, vproxy part: two minivmm-vp endpoints on a relay in this host (no guest):
# bulk throughput against the raw relay (1 and 100 streams), throughput and echo latency over
# a relay paced like a 115200-baud line and behind bulk on the unpaced one, memory with
# 10 000 open streams, and streams through a relay that damages or drops 1 byte in 10^4. Builds the static endpoint
# (`make vp`) unless MINIVMM_VP names one. Runs: BENCH_RUNS (default 3); extra arguments go
# to bench-vproxy.py.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${MINIVMM_VP:-}" ]; then
    make -s vp >/dev/null
fi
exec python3 resources/bench-vproxy.py --runs "${BENCH_RUNS:-3}" "$@"
