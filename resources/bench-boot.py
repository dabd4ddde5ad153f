#!/usr/bin/env python3
"""Boot-time benchmark: minivmm beside QEMU (microvm) on the same kernel, initramfs and
command line, in one run.

For each VMM and each run: process start -> the guest's ready marker on the console (wall
time), and the guest's own uptime when it printed the marker (/init prints it after the
marker word). Prints a table of medians. Runs alternate between the VMMs so a change in the
machine's load hits both alike.

usage: bench-boot.py --kernel K --initrd I --minivmm BIN [--runs N] [--timeout S] [--no-qemu]
"""

import argparse
import os
import selectors
import statistics
import subprocess
import sys
import time

from benchguest import CMDLINE, MEMORY, find_qemu, qemu_microvm

MARKER = b"MINIVMM-READY"


def boot_once(argv, timeout):
    """Start argv, read its stdout until the marker; return (seconds, guest_uptime or None)."""
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    buf = b""
    try:
        while True:
            left = timeout - (time.monotonic() - start)
            if left <= 0:
                return None, None
            if not sel.select(timeout=min(left, 1.0)):
                if proc.poll() is not None:
                    return None, None
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                return None, None
            buf += chunk
            idx = buf.find(MARKER)
            if idx >= 0:
                elapsed = time.monotonic() - start
                line_end = buf.find(b"\n", idx)
                while line_end < 0:
                    more = os.read(proc.stdout.fileno(), 65536)
                    if not more:
                        break
                    buf += more
                    line_end = buf.find(b"\n", idx)
                line = buf[idx:line_end if line_end >= 0 else None].decode(errors="replace")
                uptime = None
                for word in line.split()[1:]:
                    if word.startswith("uptime="):
                        try:
                            uptime = float(word.split("=", 1)[1])
                        except ValueError:
                            pass
                return elapsed, uptime
    finally:
        proc.kill()
        proc.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernel", required=True)
    ap.add_argument("--initrd", required=True)
    ap.add_argument("--minivmm", required=True)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--memory", default=MEMORY)
    ap.add_argument("--no-qemu", action="store_true")
    ap.add_argument("--extra", default="",
                    help="options appended to the kernel command line (to measure a candidate)")
    args = ap.parse_args()
    cmdline = (CMDLINE + " " + args.extra).strip()

    vmms = {
        "minivmm": [args.minivmm, "--kernel", args.kernel, "--initrd", args.initrd,
                    "--append", cmdline, "--memory", args.memory + "M", "--serial", "stdio"],
    }
    if not args.no_qemu:
        qemu = find_qemu()
        if qemu is None:
            return 1
        vmms["qemu microvm"] = qemu_microvm(qemu, args.kernel, args.initrd, cmdline,
                                            args.memory) + [
            "-nographic", "-serial", "stdio", "-no-reboot"]

    results = {name: [] for name in vmms}
    for run in range(args.runs):
        for name, argv in vmms.items():
            elapsed, uptime = boot_once(argv, args.timeout)
            results[name].append((elapsed, uptime))
            shown = "timeout" if elapsed is None else f"{elapsed:.1f} s"
            print(f"  run {run + 1}/{args.runs} {name}: {shown}"
                  + ("" if uptime is None else f" (guest uptime {uptime:.1f} s)"),
                  file=sys.stderr, flush=True)

    print()
    print(f"Boot to userspace ready marker, median of {args.runs} "
          f"(kernel {os.path.basename(args.kernel)}, {args.memory} MiB, 1 vCPU)")
    print(f"command line: {cmdline}")
    print(f"{'VMM':<14} {'start->marker':>14} {'guest uptime':>13} {'runs ok':>8}")
    medians = {}
    for name, rs in results.items():
        ok = [e for e, _ in rs if e is not None]
        ups = [u for e, u in rs if e is not None and u is not None]
        med = statistics.median(ok) if ok else None
        medians[name] = med
        up = statistics.median(ups) if ups else None
        print(f"{name:<14} {('%.1f s' % med) if med else 'n/a':>14} "
              f"{('%.1f s' % up) if up else 'n/a':>13} {len(ok):>5}/{len(rs)}")
    if medians.get("minivmm") and medians.get("qemu microvm"):
        print(f"minivmm / qemu: {medians['minivmm'] / medians['qemu microvm']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
