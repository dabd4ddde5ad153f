#!/usr/bin/env python3
"""Serial benchmark: minivmm's 16550 baud-rate pacing, and its throughput with pacing off,
beside QEMU (microvm, whose 16550 does not pace) on the same tiny guests, in one run.

Guest -> host: tests/guests/blast.S programs COM1 (divisor and LCR from its command line),
prints BLAST-START, writes `count` 'U's polling THRE before each, then BLAST-END. The host
timestamps every read of the VMM's stdout; the rate is the payload bytes that arrived after
the first payload read divided by the time from that read to the last payload read.

Host -> guest: tests/guests/sink.S programs COM1 the same way, prints READY, reads `count`
bytes polling LSR.DR and prints "GOT <n> BAD <m>". The host writes all `count` bytes into
the VMM's stdin as soon as READY arrives and stops the clock at the end of the GOT line,
less the line time of that line after its 'G'. With pacing, byte i enters the RX FIFO at i
character times and the 'G' leaves the transmitter one character time after the last byte:
count character times in all.

Expected rate = baud / frame_bits (start + data + parity + stop bits). Paced counts are sized
to ~1.5 s at the line rate; QEMU and pacing=off runs use --unpaced-count bytes. Prints a table
of medians. Runs alternate between the VMMs so a change in the machine's load hits both alike.

usage: bench-serial.py --minivmm BIN --blast ELF --sink ELF [--runs N] [--no-qemu]
"""

import argparse
import os
import selectors
import statistics
import subprocess
import sys
import tempfile
import time

from benchguest import find_qemu

BAUD_BASE = 115200
LCR = {"8N1": 0x03, "7E2": 0x1E}
ROWS = [("8N1", 9600), ("8N1", 38400), ("8N1", 115200), ("7E2", 38400)]
START, END = b"BLAST-START\n", b"BLAST-END"
READY, GOT = b"READY\n", b"GOT "
MEMORY = "64"


def frame_bits(lcr):
    """Bits per character on the line for an LCR value (5-bit frames count 1.5 stop bits as 2)."""
    data = 5 + (lcr & 3)
    parity = 1 if lcr & 0x08 else 0
    stop = 2 if lcr & 0x04 else 1
    return 1 + data + parity + stop


class Vmm:
    """One VMM process whose COM1 is its stdin/stdout, stderr kept for error reports."""

    def __init__(self, argv):
        self.err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.err)
        self.out = self.proc.stdout.fileno()
        self.inp = self.proc.stdin.fileno()
        os.set_blocking(self.inp, False)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.out, selectors.EVENT_READ)

    def stderr_line(self):
        self.err.seek(0)
        lines = self.err.read().decode(errors="replace").strip().splitlines()
        return lines[-1] if lines else ""

    def close(self):
        self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        self.sel.close()


def tx_once(argv, count, timeout):
    """Guest -> host. Returns (chars/s or None, payload bytes seen, error text)."""
    vmm = Vmm(argv)
    start = time.monotonic()
    buf = bytearray()
    payload_at = None  # index of the first payload byte in buf
    scanned = 0
    seen = 0
    first = last = None  # (time, bytes seen) of the first and last payload reads
    try:
        while True:
            left = timeout - (time.monotonic() - start)
            if left <= 0:
                return None, seen, "timeout"
            if not vmm.sel.select(timeout=min(left, 1.0)):
                if vmm.proc.poll() is not None:
                    return None, seen, "exited early: " + vmm.stderr_line()
                continue
            chunk = os.read(vmm.out, 65536)
            now = time.monotonic()
            if not chunk:
                return None, seen, "EOF before the end marker: " + vmm.stderr_line()
            buf += chunk
            if payload_at is None:
                idx = buf.find(START)
                if idx < 0:
                    continue
                payload_at = scanned = idx + len(START)
            end = buf.find(END, max(payload_at, scanned - len(END)))
            limit = end if end >= 0 else len(buf)
            new = buf.count(b"U", scanned, limit)
            scanned = limit
            if new:
                seen += new
                last = (now, seen)
                if first is None:
                    first = last
            if end >= 0:
                if first is None or last[0] <= first[0]:
                    return None, seen, "payload arrived in one read"
                return (last[1] - first[1]) / (last[0] - first[0]), seen, ""
    finally:
        vmm.close()


def rx_once(argv, count, timeout, char_s):
    """Host -> guest. Returns (chars/s or None, bytes the guest got, bad bytes, error text).
    char_s: the VMM's line time per character (0 when it does not pace)."""
    payload = bytes(ord("A") + i % 26 for i in range(count))
    vmm = Vmm(argv)
    start = time.monotonic()
    buf = bytearray()
    sent = 0
    t0 = t_end = None
    after = None  # index in buf just past READY
    try:
        while True:
            left = timeout - (time.monotonic() - start)
            if left <= 0:
                return None, 0, 0, "timeout"
            events = vmm.sel.select(timeout=min(left, 1.0))
            if not events and vmm.proc.poll() is not None:
                return None, 0, 0, "exited early: " + vmm.stderr_line()
            for key, mask in events:
                if key.fd == vmm.inp:
                    try:
                        sent += os.write(vmm.inp, payload[sent:sent + 65536])
                    except BlockingIOError:
                        pass
                    if sent == len(payload):
                        vmm.sel.unregister(vmm.inp)
                    continue
                chunk = os.read(vmm.out, 65536)
                now = time.monotonic()
                if not chunk:
                    return None, 0, 0, "EOF before GOT: " + vmm.stderr_line()
                buf += chunk
                if after is None:
                    idx = buf.find(READY)
                    if idx < 0:
                        continue
                    after = idx + len(READY)
                    t0 = time.monotonic()
                    try:
                        sent = os.write(vmm.inp, payload)
                    except BlockingIOError:
                        sent = 0
                    if sent < len(payload):
                        vmm.sel.register(vmm.inp, selectors.EVENT_WRITE)
                got = buf.find(GOT, after)
                nl = buf.find(b"\n", got) if got >= 0 else -1
                if nl >= 0:
                    words = buf[got:nl].decode(errors="replace").split()
                    try:
                        n, bad = int(words[1]), int(words[3])
                    except (IndexError, ValueError):
                        return None, 0, 0, "bad GOT line: " + " ".join(words)
                    # The clock stops at the line's newline (a paced UART hands its output
                    # over in batches, so the 'G' may arrive with the rest of the line);
                    # the rest of the line after the 'G' took (len - 1) character times.
                    t_end = now - (nl + 1 - got - 1) * char_s
                    return n / (t_end - t0), n, bad, ""
    finally:
        vmm.close()


def median(values):
    ok = [v for v in values if v is not None]
    return statistics.median(ok) if ok else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minivmm", required=True)
    ap.add_argument("--blast", required=True, help="tests/guests/blast.S, assembled")
    ap.add_argument("--sink", required=True, help="tests/guests/sink.S, assembled")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=1.5,
                    help="paced transfer length at the line rate (sets the counts)")
    ap.add_argument("--unpaced-count", type=int, default=20000,
                    help="bytes per QEMU and pacing=off run")
    ap.add_argument("--burst", type=int, default=1,
                    help="guest->host: bytes the guest writes per THRE seen (1..16)")
    ap.add_argument("--no-qemu", action="store_true")
    ap.add_argument("--only", default="", help="run only the rows whose label contains this, "
                    "e.g. 'host->guest' or '7E2'")
    args = ap.parse_args()

    qemu = None if args.no_qemu else find_qemu()
    if not args.no_qemu and qemu is None:
        return 1

    def minivmm(elf, params, pacing=True):
        argv = [args.minivmm, "--kernel", elf, "--append", params, "--memory", MEMORY + "M"]
        if pacing:
            return argv + ["--serial", "stdio"]
        return argv + pacing_off

    def qemu_argv(elf, params):
        return [qemu, "-M", "microvm,acpi=off", "-accel", "kvm", "-cpu", "host,-arch-capabilities", "-m", MEMORY,
                "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
                "-kernel", elf, "-append", params]

    # COM1 with pacing=off: the documented form, or (while a --device port does not replace
    # the default `--serial stdio` on COM1) COM1 left empty and the device placed at COM1's
    # port and IRQ.
    pacing_off = None
    for form in (["--chardev", "stdio,id=c0",
                  "--device", "isa-serial,chardev=c0,index=0,pacing=off"],
                 ["--serial", "none", "--chardev", "stdio,id=c0",
                  "--device", "isa-serial,chardev=c0,iobase=0x3f8,irq=4,pacing=off"]):
        pacing_off = form
        rate, seen, err = tx_once(minivmm(args.blast, "count=2000", False), 2000, 20)
        if rate is not None and seen == 2000:
            break
        print(f"  pacing=off: {' '.join(form)!r} did not work ({err})", file=sys.stderr)
    else:
        pacing_off = None

    plan = []  # (direction, frame, baud, lcr, divisor, count, pacing)
    for direction in ("guest->host", "host->guest"):
        for frame, baud in ROWS:
            lcr = LCR[frame]
            count = round(baud / frame_bits(lcr) * args.seconds)
            plan.append((direction, frame, baud, lcr, BAUD_BASE // baud, count, True))
        if pacing_off is not None:
            plan.append((direction, "8N1", 115200, LCR["8N1"], 1, args.unpaced_count, False))

    rows = []
    for direction, frame, baud, lcr, divisor, count, pacing in plan:
        expected = baud / frame_bits(lcr)
        elf = args.blast if direction == "guest->host" else args.sink
        extra = f" burst={args.burst}" if direction == "guest->host" else ""
        label = f"{direction} {frame} {baud}" + ("" if pacing else " pacing=off")
        if args.only not in label:
            continue
        mine, theirs, problems, clean = [], [], [], 0
        for run in range(args.runs):
            vmms = [("minivmm", count, minivmm(
                elf, f"divisor={divisor} lcr={lcr} count={count}{extra}", pacing))]
            if not args.no_qemu and pacing:
                n = args.unpaced_count
                vmms.append(("qemu", n, qemu_argv(
                    elf, f"divisor={divisor} lcr={lcr} count={n}{extra}")))
            for name, n, argv in vmms:
                timeout = 3 * n / expected + 10 if name == "minivmm" and pacing else 30
                if direction == "guest->host":
                    rate, seen, err = tx_once(argv, n, timeout)
                    if rate is not None and seen != n:
                        err = f"{n - seen} of {n} bytes missing"
                else:
                    char_s = 1 / expected if name == "minivmm" and pacing else 0
                    rate, seen, bad, err = rx_once(argv, n, timeout, char_s)
                    if rate is not None and (seen != n or bad):
                        err = f"guest got {seen} of {n} bytes, {bad} wrong"
                if err:
                    problems.append(f"{name} run {run + 1}: {err}")
                elif name == "minivmm":
                    clean += 1
                (mine if name == "minivmm" else theirs).append(rate)
                shown = "failed: " + err if rate is None else f"{rate:.1f} chars/s"
                if rate is not None and err:
                    shown += f" ({err})"
                print(f"  {label} run {run + 1}/{args.runs} {name}: {shown}",
                      file=sys.stderr, flush=True)
        rows.append((direction, frame, baud, pacing, count, expected, median(mine), median(theirs),
                     clean, problems))

    qemu_row = {(d, f, b): q for d, f, b, p, _, _, _, q, _, _ in rows if p}
    print()
    print(f"Serial throughput on COM1, median of {args.runs} (tiny PVH guests, 1 vCPU, "
          f"{MEMORY} MiB). error = minivmm vs baud/frame_bits; QEMU does not pace")
    print(f"(guest->host: the guest writes {args.burst} byte(s) per THRE seen; QEMU and pacing=off "
          f"runs move {args.unpaced_count} bytes;")
    print(" x = rate over the line rate; ok = minivmm runs with every byte through intact)")
    print(f"{'direction':<12} {'frame':<5} {'baud':>6} {'pacing':>6} {'bytes':>6} "
          f"{'expected/s':>10} {'minivmm/s':>10} {'error %':>9} {'QEMU/s':>8} {'QEMU x':>6} "
          f"{'ok':>4}")
    failed = False
    for direction, frame, baud, pacing, count, expected, mine, theirs, ok, problems in rows:
        if not pacing:
            theirs = qemu_row.get((direction, frame, baud))
        if mine is None:
            err = "n/a"
        elif pacing:
            err = f"{(mine - expected) / expected * 100:+.3f}"
        else:
            err = f"x{mine / expected:.1f}"
        print(f"{direction:<12} {frame:<5} {baud:>6} {'on' if pacing else 'off':>6} {count:>6} "
              f"{expected:>10.1f} {('%.1f' % mine) if mine else 'n/a':>10} {err:>9} "
              f"{('%.0f' % theirs) if theirs else 'n/a':>8} "
              f"{('x%.1f' % (theirs / expected)) if theirs else '':>6} {ok:>2}/{args.runs}")
        failed |= bool(problems)
    if pacing_off is None:
        print("pacing=off: no working command-line form found (rows left out)")
    for row in rows:
        for p in row[-1]:
            print(f"problem: {' '.join(map(str, row[:3]))}: {p}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
