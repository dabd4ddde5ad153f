#!/usr/bin/env python3
"""QMP benchmark: minivmm beside QEMU (microvm) on the same kernel and initramfs.

For each VMM: the time from process start until its QMP socket accepts a connection and sends
the greeting (median of --starts), then the round-trip time of `query-status` over one
negotiated connection (--queries of them: median, p99, max), measured while the guest boots
(the vCPU is busy, as on a real machine). Prints a markdown table.
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from benchguest import CMDLINE, find_qemu, qemu_microvm

POLL = 0.0005  # seconds between connect attempts while waiting for the socket


def connect(path, started, timeout):
    """Connect to the QMP socket as soon as it accepts; returns (socket file, seconds)."""
    deadline = started + timeout
    while True:
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(path)
            f = s.makefile("rwb", buffering=0)
            greeting = f.readline()
            elapsed = time.monotonic() - started
            if b"QMP" not in greeting:
                raise RuntimeError(f"no QMP greeting: {greeting!r}")
            return s, f, elapsed
        except (FileNotFoundError, ConnectionRefusedError):
            s.close()
            if time.monotonic() > deadline:
                raise RuntimeError(f"{path}: no QMP socket after {timeout} s")
            time.sleep(POLL)


def command(f, execute):
    f.write(json.dumps({"execute": execute}).encode() + b"\n")
    while True:
        msg = json.loads(f.readline())
        if "event" not in msg:
            if "error" in msg:
                raise RuntimeError(f"{execute}: {msg['error']}")
            return msg


def run(argv, sock, queries):
    """Start one VMM; returns (seconds to greeting, [query-status round trips])."""
    if os.path.exists(sock):
        os.unlink(sock)
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        s, f, ready = connect(sock, started, 30)
        command(f, "qmp_capabilities")
        rtts = []
        for _ in range(queries):
            t = time.monotonic()
            command(f, "query-status")
            rtts.append(time.monotonic() - t)
        command(f, "quit")
        s.close()
        proc.wait(timeout=30)
        return ready, rtts
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def pct(values, q):
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))]


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--kernel", required=True)
    ap.add_argument("--initrd", required=True)
    ap.add_argument("--minivmm", required=True)
    ap.add_argument("--starts", type=int, default=5)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--no-qemu", action="store_true")
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="minivmm-bench-qmp-")
    sock = os.path.join(tmp, "qmp.sock")
    cmdline = CMDLINE
    vmms = {
        "minivmm": [args.minivmm, "--kernel", args.kernel, "--initrd", args.initrd,
                    "--append", cmdline, "--serial", "null", "--monitor", sock,
                    "--name", f"bench-qmp-{os.getpid()}"],
    }
    if not args.no_qemu:
        qemu = find_qemu()
        if qemu is None:
            return 1
        vmms["qemu microvm"] = qemu_microvm(qemu, args.kernel, args.initrd, cmdline) + [
            "-display", "none", "-serial", "null",
            "-qmp", f"unix:{sock},server=on,wait=off"]

    print(f"QMP: process start to greeting (median of {args.starts}), and query-status "
          f"round trips ({args.queries}, one connection, guest booting)\n")
    print("| VMM | start → greeting (ms) | query-status median (µs) | p99 (µs) | max (µs) |")
    print("|---|---:|---:|---:|---:|")
    for name, argv in vmms.items():
        readies, rtts = [], []
        for _ in range(args.starts):
            ready, r = run(argv, sock, args.queries)
            readies.append(ready)
            rtts.extend(r)
        print(f"| {name} | {statistics.median(readies) * 1e3:.1f} "
              f"| {statistics.median(rtts) * 1e6:.0f} | {pct(rtts, 0.99) * 1e6:.0f} "
              f"| {max(rtts) * 1e6:.0f} |")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
