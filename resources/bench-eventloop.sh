#!/usr/bin/env bash
# `make bench`, event-loop part: minivmm's own cost per event against the number of open fds,
# through `minivmm relay` (the production event loop and chardev registry, no guest): a vproxy
# chardev relayed to minivmm-vp, serving 10, 100 and 1000 concurrent echo streams. Builds the
# static endpoint (`make vp`) unless MINIVMM_VP names one; strace counts the syscalls. Extra
# arguments go to bench-eventloop.py.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${MINIVMM_VP:-}" ]; then
    make -s vp >/dev/null
fi
exec python3 resources/bench-eventloop.py "$@"
