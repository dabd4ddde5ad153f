#!/usr/bin/env bash
# `make bench`, vproxy part: two minivmm-vp endpoints on a relay in this host (no guest):
# bulk throughput against the raw relay, throughput and echo latency over a relay paced like
# a 115200-baud line, and memory with 1000 open streams. Builds the static endpoint
# (`make vp`) unless MINIVMM_VP names one. Runs: BENCH_RUNS (default 3); extra arguments go
# to bench-vproxy.py.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${MINIVMM_VP:-}" ]; then
    make -s vp >/dev/null
fi
exec python3 resources/bench-vproxy.py --runs "${BENCH_RUNS:-3}" "$@"
