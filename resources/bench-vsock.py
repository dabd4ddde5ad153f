#!/usr/bin/env python3
"""vsock throughput beside virtio-console, in one minivmm boot with both devices: one named
virtio-console port on a unix socket chardev and `--device vsock,guest-cid=3,uds=PATH`.

The guest (the test kernel and the initramfs with /bin/minivmm-vp) runs, for each run and for
each channel, the same two transfers:
  host -> guest: prints RX-GO (vsock-cat: "listening on port"), reads SIZE bytes and prints their digest (`head -c SIZE <&3 |
      md5sum` on the port; `minivmm-vp vsock-cat listen PORT </dev/null | md5sum` on vsock,
      the host connecting with `CONNECT PORT`); the host writes SIZE bytes once RX-GO arrives
      and stops the clock at the digest line (checked against its own digest).
  guest -> host: prints TX-GO and sends SIZE zero bytes (`head -c SIZE /dev/zero >&3`;
      `head -c SIZE /dev/zero | minivmm-vp vsock-cat connect 2 PORT` to the host listener
      `PATH_PORT`); the host times the bytes from the first read to the last.
Prints MB/s (10^6 bytes per second), median of the runs, per channel and direction. QEMU is
not measured: its vsock needs the host's vhost-vsock, a different design.

usage: bench-vsock.py --kernel K --initrd I_VP --minivmm BIN [--runs N] [--size BYTES]
                      [--seccomp on|log|off]
"""

import argparse
import hashlib
import os
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
import subprocess

from benchguest import CMDLINE, Console, run64

PORT = "org.minivmm.bench"
VSOCK_PORT = 5100
HOST_PORT = 6100
BOOT_TIMEOUT = 600


def guest_script(runs, size):
    vp = "/bin/minivmm-vp vsock-cat"
    return f"""P=/dev/virtio-ports/{PORT}
exec 3<>$P
echo BENCH-OPEN
i=0
while [ $i -lt {runs} ]; do
  echo RX-GO console $i
  echo RX-MD5 $(head -c {size} <&3 | md5sum)
  echo TX-GO console $i
  head -c {size} /dev/zero >&3
  ({vp} listen {VSOCK_PORT} </dev/null | md5sum >/tmp/md5) &
  wait
  echo RX-MD5 $(cat /tmp/md5)
  echo TX-GO vsock $i
  head -c {size} /dev/zero | {vp} connect 2 {HOST_PORT} >/dev/null
  i=$((i + 1))
done
echo BENCH-END
"""


def receive_zeros(s, size, name):
    """Read SIZE zero bytes from `s`; returns the seconds from the first read to the last and
    the first read's length (the clock starts after it)."""
    got, first, last, first_len = 0, None, None, 0
    s.settimeout(300)
    while got < size:
        chunk = s.recv(1 << 20)
        if not chunk:
            raise RuntimeError(f"{name}: closed after {got} bytes")
        if chunk.count(0) != len(chunk):
            raise RuntimeError(f"{name}: guest->host data is not the zeros sent")
        last = time.monotonic()
        if first is None:
            first, first_len = last, len(chunk)
        got += len(chunk)
    return last - first, first_len


def vsock_connect(uds, port):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(uds)
    s.sendall(f"CONNECT {port}\n".encode())
    line = b""
    s.settimeout(120)
    while not line.endswith(b"\n"):
        b = s.recv(1)
        if not b:
            raise RuntimeError(f"vsock: CONNECT {port} refused")
        line += b
    if not line.startswith(b"OK "):
        raise RuntimeError(f"vsock: CONNECT {port}: {line!r}")
    s.settimeout(None)
    return s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernel", required=True)
    ap.add_argument("--initrd", required=True)
    ap.add_argument("--minivmm", required=True)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--size", type=int, default=1 << 20)
    ap.add_argument("--seccomp", default="on", choices=["on", "log", "off"])
    args = ap.parse_args()
    cmdline = f"{CMDLINE} {run64(guest_script(args.runs, args.size))}"
    data = bytes((i * 7 + (i >> 8)) & 0xff for i in range(args.size))
    digest = hashlib.md5(data).hexdigest()
    tmp = tempfile.mkdtemp(prefix="bench-vsock-")
    res = {"virtio-console": ([], []), "vsock": ([], [])}
    try:
        sock = os.path.join(tmp, "c.sock")
        uds = os.path.join(tmp, "v.sock")
        host_listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        host_listener.bind(f"{uds}_{HOST_PORT}")
        host_listener.listen(4)
        argv = [args.minivmm, "--kernel", args.kernel, "--initrd", args.initrd,
                "--append", cmdline, "--serial", "stdio", "--memory", "256M",
                "--chardev", f"socket,id=c0,path={sock},server=on,wait=off",
                "--device", f"virtserialport,chardev=c0,name={PORT}",
                "--device", f"vsock,guest-cid=3,uds={uds}", "--seccomp", args.seccomp]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL)
        con = Console(proc)
        try:
            deadline = time.monotonic() + 30
            while not os.path.exists(sock):
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("no port socket")
                time.sleep(0.02)
            port = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            port.connect(sock)
            con.expect(b"BENCH-OPEN", BOOT_TIMEOUT)
            for run in range(args.runs):
                for name in ("virtio-console", "vsock"):
                    # vsock-cat says "listening on port" once its listener is up.
                    con.expect(b"RX-GO" if name == "virtio-console" else b"listening on port",
                               300)
                    start = time.monotonic()
                    if name == "vsock":
                        s = vsock_connect(uds, VSOCK_PORT)
                        s.sendall(data)
                        s.shutdown(socket.SHUT_WR)
                    else:
                        port.sendall(data)
                    line = con.expect(b"RX-MD5", 600)
                    rx_s = time.monotonic() - start
                    if name == "vsock":
                        s.close()
                    if digest not in line:
                        raise RuntimeError(f"{name}: guest digest {line!r}, host sent {digest}")
                    con.expect(b"TX-GO", 120)
                    if name == "vsock":
                        host_listener.settimeout(120)
                        conn, _ = host_listener.accept()
                        tx_s, first = receive_zeros(conn, args.size, name)
                        conn.close()
                    else:
                        tx_s, first = receive_zeros(port, args.size, name)
                    rx, tx = res[name]
                    rx.append(args.size / rx_s / 1e6)
                    tx.append((args.size - first) / tx_s / 1e6 if tx_s > 0 else float("inf"))
                    print(f"  run {run + 1}/{args.runs} {name}: host->guest {rx[-1]:.2f} MB/s, "
                          f"guest->host {tx[-1]:.2f} MB/s", file=sys.stderr, flush=True)
            con.expect(b"BENCH-END", 120)
        finally:
            proc.kill()
            proc.wait()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print()
    print(f"minivmm channels, one boot, {args.size} bytes a transfer, median of {args.runs} "
          "(MB/s = 10^6 bytes/s)")
    print("host->guest: the guest's md5sum of what it read; guest->host: "
          "`head -c N /dev/zero` into the channel")
    print(f"{'channel':<15} {'host->guest':>12} {'guest->host':>12}")
    for name, (rx, tx) in res.items():
        print(f"{name:<15} {statistics.median(rx):>9.2f} MB/s {statistics.median(tx):>7.2f} MB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
