#!/usr/bin/env python3
"""How often guest user code corrupts what it copies, under minivmm and QEMU.

Boots the test kernel and initramfs once per VMM (same command line, 128 MiB) with a script
that runs `yes L | head -c 65536 | md5sum` RUNS times (L the 60-byte line below) and prints
each digest; counts the digests that differ from the host's for the same bytes. No device is
in that path: a wrong digest is the guest's own doing (resources/README.md, "Guest data
corruption on kvm_pvm"). `--extra` appends kernel options to measure a candidate workaround.

usage: check-guest-copies.py --kernel K --initrd I --minivmm BIN [--runs N] [--extra OPTS]
       [--no-qemu]
"""

import argparse
import collections
import hashlib
import subprocess
import sys

from benchguest import CMDLINE, MEMORY, Console, find_qemu, qemu_microvm, run64

LINE = "minivmm-virtio-console-0123456789abcdefghijklmnopqrstuvwxyz"
SIZE = 65536
BOOT_TIMEOUT = 600
RUN_TIMEOUT = 120


def expected_digest():
    data = (LINE + "\n").encode() * (SIZE // (len(LINE) + 1) + 1)
    return hashlib.md5(data[:SIZE]).hexdigest()


def run_vmm(argv, runs):
    """The digests the guest printed, in order."""
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    try:
        con = Console(proc)
        con.expect(b"MINIVMM-READY", BOOT_TIMEOUT)
        digests = []
        for i in range(1, runs + 1):
            line = con.expect(f"copy{i}=".encode(), RUN_TIMEOUT)
            digests.append(line.split("=", 1)[1].split()[0] if "=" in line else "")
        return digests
    finally:
        proc.kill()
        proc.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernel", required=True)
    ap.add_argument("--initrd", required=True)
    ap.add_argument("--minivmm", required=True)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--extra", default="")
    ap.add_argument("--no-qemu", action="store_true")
    args = ap.parse_args()
    script = (f"for i in $(seq {args.runs}); do "
              f"echo copy$i=$(yes {LINE} | head -c {SIZE} | md5sum); done\n")
    cmdline = f"{CMDLINE} {args.extra} {run64(script)}".replace("  ", " ")
    vmms = {"minivmm": [args.minivmm, "--kernel", args.kernel, "--initrd", args.initrd,
                        "--append", cmdline, "--memory", MEMORY + "M", "--serial", "stdio"]}
    if not args.no_qemu:
        qemu = find_qemu()
        if qemu is None:
            return 1
        vmms["qemu microvm"] = qemu_microvm(qemu, args.kernel, args.initrd, cmdline) + [
            "-nographic", "-serial", "stdio", "-no-reboot"]

    good = expected_digest()
    print(f"`yes L | head -c {SIZE} | md5sum` in the guest, {args.runs} runs per VMM"
          + (f", extra options: {args.extra}" if args.extra else ""))
    print(f"{'VMM':<14} {'wrong':>6} {'runs':>5}  wrong digests (count)")
    for name, argv in vmms.items():
        digests = run_vmm(argv, args.runs)
        wrong = collections.Counter(d for d in digests if d != good)
        shown = ", ".join(f"{d[:8]} ({n})" for d, n in wrong.most_common())
        print(f"{name:<14} {sum(wrong.values()):>6} {len(digests):>5}  {shown}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
