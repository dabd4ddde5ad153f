#!/usr/bin/env python3
"""virtio-console throughput: minivmm beside QEMU (microvm, virtio-serial on virtio-mmio) on
the same kernel, initramfs and command line, through one named port on a unix socket.

One boot per VMM. The guest (the test kernel and initramfs, script passed on the command line)
opens /dev/virtio-ports/org.minivmm.bench and, for each run:
  host -> guest: prints RX-GO, reads SIZE bytes with `head -c SIZE <&3 | md5sum` and prints
      the digest; the host writes SIZE bytes of a fixed pattern once RX-GO arrives and stops
      the clock when the digest line arrives (checked against its own digest).
  guest -> host: prints TX-GO and runs `head -c SIZE /dev/zero >&3`; the host times the
      bytes from the first read to the last (SIZE zero bytes expected).
Prints MB/s (10^6 bytes per second), median of the runs, per VMM and direction.

usage: bench-virtio.py --kernel K --initrd I --minivmm BIN [--runs N] [--size BYTES] [--no-qemu]
"""

import argparse
import hashlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from benchguest import CMDLINE, Console, find_qemu, qemu_microvm, run64

PORT = "org.minivmm.bench"
BOOT_TIMEOUT = 600


def guest_script(runs, size):
    return f"""P=/dev/virtio-ports/{PORT}
exec 3<>$P
echo BENCH-OPEN
i=0
while [ $i -lt {runs} ]; do
  echo RX-GO $i
  echo RX-MD5 $(head -c {size} <&3 | md5sum)
  echo TX-GO $i
  head -c {size} /dev/zero >&3
  i=$((i + 1))
done
echo BENCH-END
"""


def run_vmm(name, argv, sock_path, runs, size):
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    con = Console(proc)
    rx, tx = [], []
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock_path):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"{name}: no port socket")
            time.sleep(0.02)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(sock_path)
        con.expect(b"BENCH-OPEN", BOOT_TIMEOUT)
        data = bytes((i * 7 + (i >> 8)) & 0xff for i in range(size))
        digest = hashlib.md5(data).hexdigest()
        for run in range(runs):
            con.expect(b"RX-GO", 120)
            start = time.monotonic()
            s.setblocking(True)
            s.sendall(data)
            line = con.expect(b"RX-MD5", 600)
            rx_s = time.monotonic() - start
            if digest not in line:
                raise RuntimeError(f"{name}: guest digest {line!r}, host sent {digest}")
            con.expect(b"TX-GO", 120)
            got, first, last = 0, None, None
            s.settimeout(120)
            while got < size:
                chunk = s.recv(1 << 20)
                if not chunk:
                    raise RuntimeError(f"{name}: port closed after {got} bytes")
                if chunk.count(0) != len(chunk):
                    raise RuntimeError(f"{name}: guest->host data is not the zeros sent")
                last = time.monotonic()
                if first is None:
                    first = last
                    first_len = len(chunk)
                got += len(chunk)
            tx_s = last - first
            rx.append(size / rx_s / 1e6)
            tx.append((size - first_len) / tx_s / 1e6 if tx_s > 0 else float("inf"))
            print(f"  run {run + 1}/{runs} {name}: host->guest {rx[-1]:.2f} MB/s, "
                  f"guest->host {tx[-1]:.2f} MB/s", file=sys.stderr, flush=True)
        s.close()
    finally:
        proc.kill()
        proc.wait()
    return rx, tx


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernel", required=True)
    ap.add_argument("--initrd", required=True)
    ap.add_argument("--minivmm", required=True)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--size", type=int, default=4 << 20)
    ap.add_argument("--no-qemu", action="store_true")
    args = ap.parse_args()
    cmdline = f"{CMDLINE} {run64(guest_script(args.runs, args.size))}"

    tmp = tempfile.mkdtemp(prefix="bench-virtio-")
    results = {}
    try:
        sock = os.path.join(tmp, "m.sock")
        argv = [args.minivmm, "--kernel", args.kernel, "--initrd", args.initrd,
                "--append", cmdline, "--serial", "stdio",
                "--chardev", f"socket,id=c0,path={sock},server=on,wait=off",
                "--device", f"virtserialport,chardev=c0,name={PORT}"]
        results["minivmm"] = run_vmm("minivmm", argv, sock, args.runs, args.size)
        if not args.no_qemu:
            qemu = find_qemu()
            if qemu is None:
                return 1
            sock = os.path.join(tmp, "q.sock")
            argv = qemu_microvm(qemu, args.kernel, args.initrd, cmdline) + [
                "-nographic", "-serial", "stdio", "-no-reboot",
                "-chardev", f"socket,id=c0,path={sock},server=on,wait=off",
                "-device", "virtio-serial-device,id=vser0",
                "-device", f"virtserialport,chardev=c0,name={PORT},bus=vser0.0"]
            results["qemu microvm"] = run_vmm("qemu microvm", argv, sock, args.runs, args.size)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print()
    print(f"virtio-console throughput through one port, {args.size} bytes a transfer, "
          f"median of {args.runs} (MB/s = 10^6 bytes/s)")
    print("host->guest: `head -c N <&3 | md5sum` in the guest; guest->host: "
          "`head -c N /dev/zero >&3`")
    print(f"{'VMM':<14} {'host->guest':>12} {'guest->host':>12}")
    for name, (rx, tx) in results.items():
        print(f"{name:<14} {statistics.median(rx):>9.2f} MB/s {statistics.median(tx):>7.2f} MB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
