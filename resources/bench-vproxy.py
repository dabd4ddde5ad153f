#!/usr/bin/env python3
"""vproxy benchmark, host only: two `minivmm-vp` endpoints whose channels are joined by a relay
in this process. THE CHANNEL IS A HOST RELAY, NOT A GUEST: no VMM, no UART, no virtio; the
figures are vproxy's own costs (framing, credits, scheduling) and its memory, not a guest's.

Side A has the oforwards (`sink`, `echo`), side B the iforwards to a byte-counting sink server
(it counts each connection live) and an echo server, both in this process (row 4: a child
process). The relay is Python (two threads, one a direction): on the unpaced rows it is a real
cost, so row 1 and 1b give its CPU share. Rows, with their --only ids:

1   Bulk throughput, unpaced relay: 512 MiB through one stream (client -> oforward on A -> B ->
    sink) against the same 512 MiB through the raw relay (client -> relay -> sink, no vproxy);
    enough bytes that the stream's start (windows and bytes in flight growing from their
    first guesses over a few round trips) weighs little.
    Clock: from the client's connect to the sink's last byte. Median of --runs, alternating.
    CPU shares of A, B and the relay's threads over the vproxy runs.
1b  Fairness and aggregate, unpaced relay: --fair-streams (100) streams through `sink` at once,
    each sent without limit (one thread keeps every send buffer full); after 2 s of warm-up,
    over --fair-seconds (8): the sink's aggregate payload rate (against row 1's raw relay
    figure, measured here if row 1 is not run) and each stream's own rate over the same
    interval, given as min and max multiples of the fair share (aggregate / streams). A stream
    the sink never saw counts as 0. The streams end with a TCP reset (abort()).
2   Bulk throughput over a relay paced at 11520 B/s each way (a 115200-baud 8N1 line, a token
    bucket per direction, 16 bytes at a time): payload bytes the sink got per second over
    --paced-seconds after 2 s of warm-up, against the line rate; and the relay's wire bytes in
    that direction (frames, headers, CRCs, the opposite stream's CREDIT/acks excluded).
3   Echo latency on the same paced relay: one 32-byte message at a time through the `echo`
    forward, waiting for the whole echo; p50/p99/max of --echo-count round trips (at most
    --echo-budget s), with no other traffic (baseline) and with a bulk stream saturating the
    line in the same direction (A->B; its rate meanwhile is in the detail).
3u  The same echo rows on the UNPACED unix relay: baseline, and behind one unlimited bulk
    stream A->B (client with the default send buffer: a 16 KiB one alone caps loopback TCP near
    2 MiB/s, vproxy or not).
4   Memory: VmRSS (/proc/PID/status) of each minivmm-vp before, and with, --streams (10000)
    concurrent idle streams open through `echo` (8 bytes echoed and checked on each, all kept
    open), opened --open-batch (64) at a time, each batch echoed before the next; KiB per
    stream. If a stream cannot be opened (an engine with max_streams 1024 resets the 1025th
    at once), opening stops there: the row gives how many streams were open, the first
    failure as the client saw it and the endpoints' first log line about it (they run -vv
    here, a refused stream's reason is a debug message). The echo server is a child process,
    so the bench, each endpoint and the echo server each hold about --streams fds: this
    process raises its soft RLIMIT_NOFILE (up to the hard limit), the endpoints inherit it.
4b  (with 4) A burst of --burst (32) simultaneous connects to the oforward: time until all
    echoed, and the kernel's ListenOverflows meanwhile (a system-wide counter).
5   Lossy channel: the relay (unix, unpaced, no rate hint) damages (XOR with a random nonzero
    byte) or drops (50/50) on average 1 byte in --loss-per (10000), each direction on its own,
    the gaps drawn from a geometric distribution seeded from --seed (1); the losses start once
    the endpoints' session is up. --lossy-streams (20) echo streams at once each send
    --lossy-bytes (4 MiB) of random.Random(seed * 1000 + i) bytes, half close, and read back.
    A stream passes only if it gets exactly its bytes back and then an orderly end; otherwise
    it counts as reset, cut short (orderly end too early), wrong bytes (the worst: vproxy gave
    bytes that were never sent) or timed out (not ended within --lossy-timeout, 300 s). Also:
    payload MiB/s back (all streams' good bytes over the time until the last ended), the
    bytes damaged/dropped each way, the endpoints' commonest log lines (why streams were reset).
    An engine without retransmission resets most streams here: the row says so, the bench
    goes on. The echo server here never blocks on one stream (benchhost.Echo buffered).

Paced rows run twice. `tty` channel: each endpoint opens a pty slave with
`--channel tty:/dev/pts/N,speed=115200`, the relay copies between the pty masters; the speed
is the endpoint's rate hint (the bench passes no --rate), which sizes its windows and frames for
11520 B/s (vproxy.md §8: 2880-byte window, 224-byte frames). `unix` channel: `--channel
unix:PATH` to the relay's socket (one per side), no rate hint (64 KiB windows, 1024-byte
frames). Rows 1, 1b, 3u, 4 and 5 use the unpaced unix channel.

Which figures hold only on this machine (a 2-core VM, where the two endpoints, the Python
relay, the clients and the servers share those 2 cores): every unpaced rate, CPU share and
round trip (rows 1, 1b, 3u, 4b, 5's MiB/s), the raw relay figure and so the efficiencies; the
paced rows (2, 3) depend mostly on the line rate, less on the machine. Row 4's KiB/stream and
stream count do not depend on the machine's speed. Row 5: --seed fixes where in each
direction's byte stream the losses fall, not which frames they hit (that depends on how the
streams' frames interleave, i.e. on timing), so its counts vary a little from run to run.

usage: bench-vproxy.py [--vp BIN] [--runs N] [--paced-seconds S] [--echo-count N]
                       [--echo-budget S] [--channels tty,unix] [--fair-streams N]
                       [--fair-seconds S] [--streams N] [--open-batch N] [--burst N]
                       [--seed N] [--loss-per N] [--lossy-streams N] [--lossy-bytes N]
                       [--lossy-timeout S] [--only 1,1b,2,3,3u,4,5]
BIN: --vp, else $MINIVMM_VP, else target/x86_64-unknown-linux-gnu/vp/minivmm-vp from the repo.
Seconds per row are printed after the table.
"""

import argparse
import math
import os
import random
import re
import selectors
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

from benchhost import (BenchError, Echo, EchoProcess, cpu_seconds, free_port, log, nofile_of,
                       raise_nofile, rss_kib)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_VP = os.path.join(REPO, "target/x86_64-unknown-linux-gnu/vp/minivmm-vp")
LINE_RATE = 11520  # bytes/s of a 115200-baud 8N1 line (10 bits a byte)
BULK_BYTES = 512 << 20
CHUNK = 256 << 10
ECHO_MSG = 32
MIB = 1 << 20
ROW_IDS = ("1", "1b", "2", "3", "3u", "4", "5")  # --only



# ---------------------------------------------------------------- relay


class Relay:
    """Joins two byte channels, optionally pacing each direction at `rate` bytes/s with a
    token bucket (16 bytes a time, like a UART's FIFO; bursts of at most 32). kind 'unix': one
    listening socket per side (specs[0] for A, specs[1] for B), so the directions are known;
    kind 'tty': two pty pairs, the endpoints open the slaves. wire[0] counts bytes A->B (first
    spec to second), wire[1] B->A.

    `loss_per` N: once arm_loss() is called, each direction independently loses on average 1
    byte in N, half of them damaged (XOR with a random nonzero byte) and half dropped; the gaps
    between lost bytes are drawn from a geometric distribution (one draw per lost byte, not
    per byte), seeded from `seed`. damaged[i] / dropped[i] count them per direction."""

    def __init__(self, tmp, kind, rate=None, name="relay", loss_per=None, seed=1):
        self.kind, self.rate = kind, rate
        self.wire = [0, 0]
        self.damaged, self.dropped = [0, 0], [0, 0]
        self.loss_per, self.loss_on = loss_per, False
        self.rngs = [random.Random(f"relay-{seed}-{d}") for d in "AB"]
        self.stop = threading.Event()
        self.threads = []
        self.tids = []  # native ids of the pump threads, for their CPU time
        self.fds = []  # pty fds to close
        self.lsocks, self.conns = [], []
        if kind == "unix":
            self.paths = [os.path.join(tmp, f"{name}-{side}.sock") for side in "ab"]
            for path in self.paths:
                ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.lsocks.append(ls)
                ls.bind(path)
                ls.listen(1)
            self.specs = [f"unix:{path}" for path in self.paths]
            t = threading.Thread(target=self._accept, daemon=True)
            t.start()
            self.threads.append(t)
        else:
            pairs = [os.openpty() for _ in range(2)]
            # The slaves stay open here too, so a master never reads EIO while an endpoint
            # (re)opens its slave.
            for m, s in pairs:
                self.fds += [m, s]
            self.specs = [f"tty:{os.ttyname(s)},speed=115200" for _, s in pairs]
            self._start([p[0] for p in pairs], [os.read] * 2, [self._fd_writer] * 2)

    @staticmethod
    def _fd_writer(fd, data):
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]

    def _accept(self):
        try:
            for ls in self.lsocks:  # A's socket first: conns[0] is A
                c, _ = ls.accept()
                self.conns.append(c)
        except OSError:
            return
        self._start(self.conns, [lambda c, n: c.recv(n)] * 2, [lambda c, d: c.sendall(d)] * 2)

    def _start(self, ends, readers, writers):
        for i in (0, 1):
            t = threading.Thread(target=self._pump, daemon=True,
                                 args=(ends[i], ends[1 - i], readers[i], writers[1 - i], i))
            t.start()
            self.threads.append(t)

    def arm_loss(self):
        """Start losing bytes (from the next byte read on)."""
        self.loss_on = self.loss_per is not None

    def _gap(self, idx):
        """Bytes up to and including the next lost one: geometric with p = 1/loss_per."""
        u = 1.0 - self.rngs[idx].random()  # (0, 1]
        return int(math.log(u) / math.log1p(-1.0 / self.loss_per)) + 1

    def _lose(self, idx, data, state):
        """`data` with this direction's lost bytes damaged or dropped. state: [position of
        the first byte of `data` in the direction's stream, position of the next lost byte]."""
        pos, end = state[0], state[0] + len(data)
        state[0] = end
        if state[1] is None:
            state[1] = pos - 1 + self._gap(idx)
        if state[1] >= end:
            return data
        rng = self.rngs[idx]
        buf = bytearray(data)
        drops = []
        while state[1] < end:
            k = state[1] - pos
            if rng.random() < 0.5:
                buf[k] ^= rng.randrange(1, 256)
                self.damaged[idx] += 1
            else:
                drops.append(k)
                self.dropped[idx] += 1
            state[1] += self._gap(idx)
        if not drops:
            return buf
        out, last = bytearray(), 0
        for k in drops:
            out += buf[last:k]
            last = k + 1
        out += buf[last:]
        return out

    def _pump(self, src, dst, read, write, idx):
        self.tids.append(threading.get_native_id())
        rate = self.rate
        # 16 bytes (a UART FIFO) go at a time and at most 32 at once, so even a lone short
        # frame takes its line time; about 720 wakeups/s at 11520 B/s.
        chunk = min(16, rate) if rate else CHUNK
        burst = 2 * chunk if rate else None  # absorbs a late wakeup
        tokens, last = 0.0, time.monotonic()
        loss = [0, None]
        try:
            while not self.stop.is_set():
                if rate:
                    now = time.monotonic()
                    tokens = min(burst, tokens + (now - last) * rate)
                    last = now
                    if tokens < chunk:
                        time.sleep((chunk - tokens) / rate)
                        continue
                    n = int(tokens)
                else:
                    n = CHUNK
                data = read(src, n)
                if not data:
                    break
                if rate:
                    tokens -= len(data)
                if self.loss_on:
                    data = self._lose(idx, data, loss)
                write(dst, data)
                self.wire[idx] += len(data)
        except OSError:
            pass
        if self.kind == "unix":
            try:
                dst.shutdown(socket.SHUT_WR)  # pass the end on, as a half close
            except OSError:
                pass

    def cpu_seconds(self):
        """CPU time of the pump threads so far (both directions)."""
        total = 0.0
        for tid in list(self.tids):
            try:
                total += cpu_seconds(os.getpid(), tid)
            except OSError:
                pass
        return total

    def close(self):
        self.stop.set()
        for ls in self.lsocks:
            ls.close()
        for path in getattr(self, "paths", []):
            try:
                os.unlink(path)
            except OSError:
                pass
        for c in self.conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        for t in self.threads:
            t.join(timeout=2)


# ---------------------------------------------------------------- local servers


class Sink:
    """TCP server counting bytes, one thread and a selector for all connections. `total`
    counts all bytes; conns[serial] = [bytes so far, time of the last byte, still open] for
    every connection, live (serials count up from 0 in accept order), so a rate per
    connection can be sampled at any time; `done` has (bytes, time of the last byte) per
    finished connection."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1024)
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.total = 0
        self.conns = {}
        self.serial = 0  # the next connection's serial
        self.done = []
        self.cond = threading.Condition()
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.sock, selectors.EVENT_READ, None)
        self.stop = False
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        buf = bytearray(CHUNK)
        while not self.stop:
            for key, _ in self.sel.select(timeout=0.2):
                c = key.fileobj
                if key.data is None:
                    try:
                        c, _ = self.sock.accept()
                    except OSError:
                        continue
                    c.setblocking(False)
                    with self.cond:
                        serial = self.serial
                        self.serial += 1
                        self.conns[serial] = [0, time.monotonic(), True]
                    self.sel.register(c, selectors.EVENT_READ, serial)
                    continue
                try:
                    n = c.recv_into(buf)
                except BlockingIOError:
                    continue
                except OSError:
                    n = 0
                rec = self.conns[key.data]
                with self.cond:
                    if n:
                        rec[0] += n
                        rec[1] = time.monotonic()
                        self.total += n
                    else:
                        rec[2] = False
                        self.done.append((rec[0], rec[1]))
                    self.cond.notify_all()
                if not n:
                    self.sel.unregister(c)
                    c.close()

    def counts(self, first_serial):
        """{serial: bytes so far} of the connections from `first_serial` on."""
        with self.cond:
            return {k: v[0] for k, v in self.conns.items() if k >= first_serial}

    def wait_total(self, target, timeout):
        end = time.monotonic() + timeout
        with self.cond:
            while self.total < target:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(left)
            return True

    def close(self):
        self.stop = True
        self.thread.join(timeout=2)
        for key in list(self.sel.get_map().values()):
            key.fileobj.close()
        self.sel.close()


# ---------------------------------------------------------------- endpoints


class Endpoints:
    """A relay and the two minivmm-vp processes on it: A with oforwards sink/echo, B with the
    iforwards to `sink` and `echo`."""

    def __init__(self, vp, tmp, kind, rate, sink, echo, tag, verbose=0, **relay_opts):
        self.relay = Relay(tmp, kind, rate, name=tag, **relay_opts)
        self.sink_port, self.echo_port = free_port(), free_port()
        self.procs, self.errs = [], []
        argv_a = [vp, "--channel", self.relay.specs[0],
                  "--oforward", f"sink:{self.sink_port}", "--oforward", f"echo:{self.echo_port}"]
        argv_b = [vp, "--channel", self.relay.specs[1],
                  "--iforward", f"sink:127.0.0.1:{sink.port}",
                  "--iforward", f"echo:127.0.0.1:{echo.port}"]
        try:
            for argv in (argv_a, argv_b):
                argv += ["-v"] * verbose
                err = tempfile.TemporaryFile(dir=tmp)
                self.errs.append(err)
                self.procs.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                                   stdout=subprocess.DEVNULL, stderr=err))
            self.wait_ready()
        except BaseException:
            self.close()
            raise

    def stderr_tail(self):
        out = []
        for name, err in zip("AB", self.errs):
            err.seek(0)
            lines = err.read().decode(errors="replace").strip().splitlines()
            if lines:
                out.append(f"{name}: " + " | ".join(lines[-3:]))
        return "; ".join(out) or "(no stderr)"

    def stderr_marks(self):
        """Where each side's stderr ends now (for stderr_first)."""
        return [os.fstat(e.fileno()).st_size for e in self.errs]

    def stderr_first(self, marks, pattern=r"refus|cannot|too many|fail|reset|lost|error"):
        """The first line matching `pattern` each side wrote to stderr after `marks`, as
        'A: ...; B: ...' (the endpoints log a refused stream's reason only at debug level,
        verbose=2)."""
        out = []
        for name, err, mark in zip("AB", self.errs, marks):
            err.seek(mark)
            for raw in err:
                line = raw.decode(errors="replace").strip()
                if re.search(pattern, line):
                    out.append(f"{name}: {line}")
                    break
            err.seek(0, os.SEEK_END)  # (the child's stderr shares this file offset)
        return "; ".join(out)

    def stderr_summary(self, marks, top=3):
        """The commonest lines each side wrote to stderr after `marks`, numbers masked
        ('A: 17x vproxy stream N reset: ...'), at most `top` a side."""
        out = []
        for name, err, mark in zip("AB", self.errs, marks):
            err.seek(mark)
            counts = {}
            for raw in err:
                line = re.sub(r"minivmm-vp: \w+: (chardev '[^']*': )?", "",
                              raw.decode(errors="replace").strip())
                line = re.sub(r"\b[0-9a-f]{16}\b|\d+", "N", line)
                if line:
                    counts[line] = counts.get(line, 0) + 1
            err.seek(0, os.SEEK_END)
            for line, k in sorted(counts.items(), key=lambda kv: -kv[1])[:top]:
                out.append(f"{name}: {k}x {line}")
        return "; ".join(out)

    def check_alive(self):
        for name, p in zip("AB", self.procs):
            if p.poll() is not None:
                raise BenchError(f"minivmm-vp {name} exited with {p.returncode}: "
                                 + self.stderr_tail())

    def wait_ready(self, timeout=20):
        """Until an echo goes through (session up, both forwards in place)."""
        end = time.monotonic() + timeout
        last = ""
        while time.monotonic() < end:
            self.check_alive()
            try:
                with socket.create_connection(("127.0.0.1", self.echo_port), timeout=5) as s:
                    s.sendall(b"ready?")
                    got = b""
                    while len(got) < 6:
                        data = s.recv(64)
                        if not data:
                            break
                        got += data
                    if got == b"ready?":
                        return
                    last = f"echo returned {got!r}"
            except OSError as e:
                last = str(e)
            time.sleep(0.1)
        raise BenchError(f"endpoints not ready after {timeout} s ({last}): " + self.stderr_tail())

    def close(self):
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=3)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.relay.close()
        for e in self.errs:
            e.close()


# ---------------------------------------------------------------- measurements


def send_bulk(sock, total=None, stop=None):
    """Send `total` bytes (or until `stop` is set), then shut the write side."""
    buf = b"\x5a" * CHUNK
    sent = 0
    try:
        while (total is None or sent < total) and not (stop is not None and stop.is_set()):
            n = CHUNK if total is None else min(CHUNK, total - sent)
            sock.sendall(buf[:n])
            sent += n
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    return sent


def abort(sock):
    """Close with a TCP reset, so the endpoint drops what the kernel still buffers for it
    (an orderly close would still deliver the client's socket buffers, seconds of line)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


def bulk_vproxy(ep, sink, total, timeout=120):
    """Returns bytes/s, and the CPU share of each endpoint and of the relay meanwhile."""
    base = sink.total
    cpu0 = [cpu_seconds(p.pid) for p in ep.procs] + [ep.relay.cpu_seconds()]
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", ep.sink_port)) as s:
        threading.Thread(target=send_bulk, args=(s, total), daemon=True).start()
        ok = sink.wait_total(base + total, timeout)
        t1 = time.monotonic()
    if not ok:
        ep.check_alive()
        raise BenchError(f"vproxy bulk: {sink.total - base} of {total} bytes in {timeout} s")
    cpu1 = [cpu_seconds(p.pid) for p in ep.procs] + [ep.relay.cpu_seconds()]
    return total / (t1 - t0), [(b - a) / (t1 - t0) for a, b in zip(cpu0, cpu1)]


def bulk_raw(tmp, total, timeout=120):
    """The same bytes through the relay alone: a client on each side of it."""
    relay = Relay(tmp, "unix", None, name="raw")
    try:
        t0 = time.monotonic()
        a = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        a.connect(relay.paths[0])
        b = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        b.connect(relay.paths[1])
        threading.Thread(target=send_bulk, args=(a, total), daemon=True).start()
        got = 0
        b.settimeout(timeout)
        while got < total:
            data = b.recv(CHUNK)
            if not data:
                break
            got += len(data)
        t1 = time.monotonic()
        a.close()
        b.close()
    finally:
        relay.close()
    if got < total:
        raise BenchError(f"raw relay: {got} of {total} bytes")
    return total / (t1 - t0)


def cpu_now(ep):
    """CPU seconds so far of endpoint A, endpoint B, the relay's threads and this process."""
    return ([cpu_seconds(p.pid) for p in ep.procs]
            + [ep.relay.cpu_seconds(), cpu_seconds(os.getpid())])


def cpu_shares(cpu0, cpu1, seconds):
    return [(b - a) / seconds for a, b in zip(cpu0, cpu1)]


def fill_streams(socks, stop, errors):
    """Keep every socket's send buffer full (one thread, a selector) until `stop`."""
    buf = b"\x5a" * (64 << 10)
    sel = selectors.DefaultSelector()
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_WRITE)
    try:
        while not stop.is_set() and sel.get_map():
            for key, _ in sel.select(timeout=0.2):
                try:
                    key.fileobj.send(buf)
                except BlockingIOError:
                    pass
                except OSError as e:
                    errors.append(e)
                    sel.unregister(key.fileobj)
    finally:
        sel.close()


def fair_streams(ep, sink, n, warmup, seconds):
    """`n` streams through `sink` at once, each sent without limit; after `warmup` s, the bytes
    the sink got on each over `seconds`. Returns (aggregate B/s, B/s of each stream (n values,
    0 for a stream the sink never saw), CPU shares of [A, B, relay, this process], send
    errors). The streams are closed with abort() afterwards."""
    first = sink.serial
    socks, errors = [], []
    stop = threading.Event()
    thread = None
    try:
        for _ in range(n):
            socks.append(socket.create_connection(("127.0.0.1", ep.sink_port), timeout=10))
        thread = threading.Thread(target=fill_streams, args=(socks, stop, errors), daemon=True)
        thread.start()
        time.sleep(warmup)
        ep.check_alive()
        c0, cpu0, t0 = sink.counts(first), cpu_now(ep), time.monotonic()
        time.sleep(seconds)
        c1, cpu1, t1 = sink.counts(first), cpu_now(ep), time.monotonic()
        ep.check_alive()
    finally:
        stop.set()
        if thread is not None:
            thread.join(timeout=5)
        for s in socks:
            abort(s)
    dt = t1 - t0
    rates = [(c1[k] - c0.get(k, 0)) / dt for k in c1]
    rates += [0.0] * (n - len(rates))
    return sum(rates), rates, cpu_shares(cpu0, cpu1, dt), errors


class BulkStream:
    """A stream through `sink` that a thread keeps full until close(). `sndbuf`: the client's
    SO_SNDBUF. A small one (the paced rows) queues less in the kernel ahead of vproxy, but on
    loopback TCP a 16 KiB send buffer alone caps a connection at about 2 MiB/s (even with no
    vproxy in the way), so the unpaced rows keep the default."""

    def __init__(self, ep, sndbuf=16 << 10):
        self.stop = threading.Event()
        self.sock = socket.create_connection(("127.0.0.1", ep.sink_port))
        if sndbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        self.thread = threading.Thread(target=send_bulk, args=(self.sock, None, self.stop),
                                       daemon=True)
        self.thread.start()

    def close(self):
        self.stop.set()
        abort(self.sock)
        self.thread.join(timeout=5)


def paced_rates(ep, sink, seconds):
    """Payload B/s the sink gets, and wire B/s A->B, over `seconds` (a bulk stream running)."""
    p0, w0, t0 = sink.total, ep.relay.wire[0], time.monotonic()
    time.sleep(seconds)
    p1, w1, t1 = sink.total, ep.relay.wire[0], time.monotonic()
    ep.check_alive()
    return (p1 - p0) / (t1 - t0), (w1 - w0) / (t1 - t0)


def echo_rtts(ep, count, budget):
    """Round trips of `count` ECHO_MSG-byte messages on one stream (stops after `budget` s)."""
    rtts = []
    msg = bytes(range(ECHO_MSG))
    end = time.monotonic() + budget
    with socket.create_connection(("127.0.0.1", ep.echo_port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.settimeout(max(budget, 1) + 30)
        for _ in range(count):
            if rtts and time.monotonic() > end:
                break
            t0 = time.monotonic()
            s.sendall(msg)
            got = b""
            while len(got) < len(msg):
                data = s.recv(len(msg) - len(got))
                if not data:
                    raise BenchError("echo stream closed: " + ep.stderr_tail())
                got += data
            rtts.append(time.monotonic() - t0)
            if got != msg:
                raise BenchError(f"echo returned {got!r}")
            time.sleep(0.02)
    return rtts


def lossy_echo(ep, n, nbytes, seed, timeout):
    """`n` streams through `echo` at once, stream i sending `nbytes` of
    random.Random(seed * 1000 + i) bytes, then a half close, and reading back until the end
    (one thread, a selector). Each stream ends 'exact' (all its bytes back, unchanged, then an
    orderly end), 'reset' (ECONNRESET/EPIPE), 'cut' (an orderly end before all bytes came
    back), 'wrong' (bytes that differ from those sent) or 'timeout' (not ended in `timeout`
    s). Returns (the streams as dicts: i, result, sent, got, t (seconds to its end), detail),
    seconds until the last ended)."""
    sel = selectors.DefaultSelector()
    streams = []
    t0 = time.monotonic()
    try:
        for i in range(n):
            st = {"i": i, "data": random.Random(seed * 1000 + i).randbytes(nbytes),
                  "sent": 0, "got": 0, "result": None, "t": None, "detail": ""}
            streams.append(st)
            try:
                s = socket.create_connection(("127.0.0.1", ep.echo_port), timeout=10)
            except OSError as e:
                st["result"], st["detail"], st["t"] = "reset", f"connect: {e}", 0.0
                continue
            s.setblocking(False)
            st["sock"] = s
            sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE, st)
        t0 = time.monotonic()
        end, report = t0 + timeout, t0 + 10

        def finish(st, result, detail=""):
            st["result"], st["detail"], st["t"] = result, detail, time.monotonic() - t0
            sel.unregister(st["sock"])
            if result == "exact":
                st["sock"].close()
            else:
                abort(st["sock"])

        def failed(st, e):
            if isinstance(e, (ConnectionResetError, BrokenPipeError)):
                finish(st, "reset", e.strerror or str(e))
            else:
                finish(st, "reset", str(e))

        while sel.get_map() and time.monotonic() < end:
            if time.monotonic() > report:
                report += 10
                left = [st for st in streams if st["result"] is None]
                log(f"lossy relay, {time.monotonic() - t0:.0f} s: {len(left)} streams "
                    f"running, {sum(st['got'] for st in streams) / MIB:.1f} MiB back")
            for key, ev in sel.select(timeout=0.5):
                st, s = key.data, key.fileobj
                if st["result"] is not None:
                    continue
                if ev & selectors.EVENT_WRITE and st["sent"] < nbytes:
                    try:
                        k = s.send(memoryview(st["data"])[st["sent"]:st["sent"] + CHUNK])
                    except BlockingIOError:
                        k = 0
                    except OSError as e:
                        failed(st, e)
                        continue
                    st["sent"] += k
                    if st["sent"] == nbytes:
                        try:
                            s.shutdown(socket.SHUT_WR)
                        except OSError as e:
                            failed(st, e)
                            continue
                        sel.modify(s, selectors.EVENT_READ, st)
                if ev & selectors.EVENT_READ:
                    try:
                        chunk = s.recv(CHUNK)
                    except BlockingIOError:
                        continue
                    except OSError as e:
                        failed(st, e)
                        continue
                    g = st["got"]
                    if not chunk:
                        if g == nbytes:
                            finish(st, "exact")
                        else:
                            finish(st, "cut", f"ended after {g} of {nbytes} bytes")
                        continue
                    want = st["data"][g:g + len(chunk)]
                    if chunk != want:
                        off = next((k for k, (a, b) in enumerate(zip(chunk, want)) if a != b),
                                   len(want))
                        finish(st, "wrong", f"differs at byte {g + off}")
                        continue
                    st["got"] = g + len(chunk)
        for st in streams:
            if st["result"] is None:
                finish(st, "timeout", f"{st['got']} of {nbytes} bytes back, "
                                      f"{st['sent']} sent")
    finally:
        for key in list(sel.get_map().values()):
            abort(key.fileobj)
        sel.close()
    return streams, max((st["t"] for st in streams), default=0.0)


def echo_rows(lat, what_log, label):
    """Table rows (and log lines) of [(what, round trip seconds[, bulk B/s meanwhile])]."""
    rows = []
    for what, rtts, *bulk in lat:
        ms = [x * 1000 for x in rtts]
        beside = ""
        if bulk:
            b = bulk[0]
            beside = f"; the bulk stream {b / MIB:.1f} MiB/s meanwhile" if b >= MIB else \
                f"; the bulk stream {b:.0f} B/s meanwhile"
        log(f"echo, {what_log}, {what}: {len(ms)} round trips, p50 "
            f"{percentile(ms, 50):.1f} ms, max {max(ms):.1f} ms{beside}")
        rows.append((f"3. echo {ECHO_MSG} B RTT, {what}", label,
                     f"p50 {fmt_ms(percentile(ms, 50))}, p99 {fmt_ms(percentile(ms, 99))}, "
                     f"max {fmt_ms(max(ms))}", f"{len(ms)} round trips{beside}"))
    return rows


def fmt_ms(ms):
    """Milliseconds, with a decimal below 10 ms (the unpaced relay's round trips)."""
    return f"{ms:.1f} ms" if ms < 10 else f"{ms:.0f} ms"


def percentile(values, p):
    v = sorted(values)
    k = (len(v) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def open_streams(ep, n, batch, timeout=30):
    """Open up to `n` streams through `echo`, `batch` connects at a time, 8 bytes echoed (and
    checked) on each before the next batch. The first stream that cannot connect, is reset or
    closed, or does not echo within `timeout` s ends the opening (after its batch). Returns
    (the sockets of the streams that echoed, None or what happened to the first that did
    not)."""
    socks, failure = [], None
    sel = selectors.DefaultSelector()

    def fail(i, what):
        nonlocal failure
        if failure is None or i < failure[0]:
            failure = (i, what)

    try:
        for first in range(0, n, batch):
            for i in range(first, min(n, first + batch)):
                try:
                    s = socket.create_connection(("127.0.0.1", ep.echo_port), timeout=10)
                except OSError as e:
                    fail(i, f"connect failed: {e}")
                    break
                s.setblocking(False)
                sel.register(s, selectors.EVENT_READ, [i, b""])
                try:
                    s.send(b"%08d" % i)
                except OSError as e:
                    sel.unregister(s)
                    s.close()
                    fail(i, f"send failed: {e}")
            end = time.monotonic() + timeout
            while sel.get_map() and time.monotonic() < end:
                for key, _ in sel.select(timeout=1):
                    s, (i, got) = key.fileobj, key.data
                    try:
                        data = s.recv(64)
                    except BlockingIOError:
                        continue
                    except OSError as e:
                        data, err = b"", e
                    else:
                        err = None
                    if data:
                        key.data[1] = got = got + data
                        if len(got) < 8:
                            continue
                    sel.unregister(s)
                    if data and got == b"%08d" % i:
                        socks.append(s)
                        continue
                    s.close()
                    fail(i, f"reset ({err})" if isinstance(err, ConnectionResetError)
                         else f"error ({err})" if err else
                         f"echoed {got!r}" if data else "closed before its echo")
            for key in list(sel.get_map().values()):
                fail(key.data[0], f"no echo in {timeout} s")
                sel.unregister(key.fileobj)
                key.fileobj.close()
            if failure is not None:
                break
        return socks, failure
    except BaseException:
        for s in socks:
            s.close()
        raise
    finally:
        sel.close()


def listen_overflows():
    """The kernel's ListenOverflows counter (a connect found an accept queue full)."""
    try:
        with open("/proc/net/netstat") as f:
            lines = f.read().splitlines()
        for head, vals in zip(lines[::2], lines[1::2]):
            h, v = head.split(), vals.split()
            if "ListenOverflows" in h:
                return int(v[h.index("ListenOverflows")])
    except (OSError, ValueError):
        pass
    return None


# ---------------------------------------------------------------- main


def lossy_row(args, tmp, sink):
    """Row 5: echo streams over a relay that damages and drops bytes (see lossy_echo)."""
    n, nbytes, per, seed = args.lossy_streams, args.lossy_bytes, args.loss_per, args.seed
    echo = Echo(buffered=True)  # a stalled stream must not block the others' echoes
    ep = None
    died = ""
    try:
        # -vv: the endpoints say why each stream was reset (debug messages).
        ep = Endpoints(args.vp, tmp, "unix", None, sink, echo, "lossy", verbose=2,
                       loss_per=per, seed=seed)
        marks = ep.stderr_marks()
        ep.relay.arm_loss()  # after the session is up: the losses hit the streams
        cpu0 = cpu_now(ep)
        streams, took = lossy_echo(ep, n, nbytes, seed, args.lossy_timeout)
        cpu = cpu_shares(cpu0, cpu_now(ep), max(took, 1e-3))
        try:
            ep.check_alive()
        except BenchError as e:
            died = f"; {e}"
        said = ep.stderr_summary(marks)
        dmg, drop = ep.relay.damaged[:], ep.relay.dropped[:]
    finally:
        if ep is not None:
            ep.close()
        echo.close()
    by = {}
    for st in streams:
        by.setdefault(st["result"], []).append(st)
        log(f"lossy stream {st['i']}: {st['result']} after {st['t']:.2f} s, {st['got']} of "
            f"{nbytes} bytes back" + (f" ({st['detail']})" if st["detail"] else ""))
    back = sum(st["got"] for st in streams)
    rate = back / took if took > 0 else 0.0
    exact = len(by.get("exact", []))
    timed_out = len(by.get("timeout", []))
    log(f"lossy relay: {exact}/{n} byte-exact in {took:.1f} s, {back / MIB:.1f} MiB back; "
        f"A->B {dmg[0]} damaged, {drop[0]} dropped; B->A {dmg[1]} damaged, {drop[1]} dropped; "
        f"CPU A {cpu[0] * 100:.0f} %, B {cpu[1] * 100:.0f} %, relay {cpu[2] * 100:.0f} %, "
        f"bench process {cpu[3] * 100:.0f} %" + (f"; endpoint log: {said}" if said else ""))
    wrong = by.get("wrong", [])
    return ("5. lossy relay: echo streams byte-exact", "unix, unpaced (no rate hint)",
            f"{exact}/{n} byte-exact; {len(by.get('reset', []))} reset, "
            f"{len(by.get('cut', []))} cut short, {len(wrong)} with wrong bytes, "
            f"{timed_out} timed out; {rate / MIB:.2f} MiB/s payload back ({back / MIB:.2f} "
            f"MiB in {took:.2f} s)",
            f"{n} x {nbytes / MIB:g} MiB; seed {seed}, 1 byte in {per} lost each way; "
            f"A->B {dmg[0]} damaged / {drop[0]} dropped, B->A {dmg[1]} damaged / {drop[1]} "
            f"dropped; all ended in {took:.2f} s"
            + (f" (timeout {args.lossy_timeout:.0f} s: the timed out count as failed)"
               if timed_out else "")
            + (f"; first wrong: stream {wrong[0]['i']} {wrong[0]['detail']}" if wrong else "")
            + f"; relay CPU {cpu[2] * 100:.0f} %" + died
            + (f"; endpoint log: {said}" if said else ""))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split(":")[0])
    ap.add_argument("--vp", default=os.environ.get("MINIVMM_VP") or DEFAULT_VP)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--paced-seconds", type=float, default=18.0,
                    help="measured seconds of paced bulk (after 2 s of warm-up and the echoes)")
    ap.add_argument("--echo-count", type=int, default=50)
    ap.add_argument("--echo-budget", type=float, default=30.0,
                    help="at most this many seconds of echoes per row")
    ap.add_argument("--fair-streams", type=int, default=100,
                    help="concurrent bulk streams in row 1b")
    ap.add_argument("--fair-seconds", type=float, default=8.0,
                    help="measured seconds of row 1b (after 2 s of warm-up)")
    ap.add_argument("--streams", type=int, default=10000,
                    help="concurrent idle streams in row 4")
    ap.add_argument("--open-batch", type=int, default=64,
                    help="row 4 opens this many streams at once, each batch echoed first")
    ap.add_argument("--burst", type=int, default=32,
                    help="simultaneous connects in the burst row (4b)")
    ap.add_argument("--channels", default="tty,unix", help="paced rows: tty, unix or both")
    ap.add_argument("--seed", type=int, default=1,
                    help="row 5: seeds the relay's losses and the streams' bytes")
    ap.add_argument("--loss-per", type=int, default=10000,
                    help="row 5: on average 1 byte in this many is damaged or dropped, each way")
    ap.add_argument("--lossy-streams", type=int, default=20)
    ap.add_argument("--lossy-bytes", type=int, default=4 * MIB,
                    help="row 5: bytes each stream sends and reads back")
    ap.add_argument("--lossy-timeout", type=float, default=300.0,
                    help="row 5: a stream not ended by then counts as failed")
    ap.add_argument("--only", default=",".join(ROW_IDS),
                    help="rows to run (4 includes 4b)")
    args = ap.parse_args()

    if not (os.path.isfile(args.vp) and os.access(args.vp, os.X_OK)):
        print(f"bench: minivmm-vp not found at '{args.vp}' (build it with `make vp`, "
              "or set MINIVMM_VP)", file=sys.stderr)
        return 1
    only = set(x.strip() for x in args.only.split(",") if x.strip())
    unknown = only - set(ROW_IDS)
    if unknown:
        print(f"bench: unknown row id(s) {', '.join(sorted(unknown))} in --only "
              f"(rows: {', '.join(ROW_IDS)})", file=sys.stderr)
        return 1
    channels = [c for c in args.channels.split(",") if c]
    # Row 4 holds the client side of each stream here, A and B (which inherit this limit)
    # one socket each per stream, the echo server (a child process) one more.
    need = args.streams + 512
    nofile = raise_nofile(max(8192, need + 1024))
    if "4" in only and nofile < need:
        print(f"bench: RLIMIT_NOFILE is {nofile}, {need} needed for {args.streams} streams",
              file=sys.stderr)
        return 1

    # SIGTERM (make's Ctrl-C goes as SIGINT) unwinds through the finally blocks.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    rows, notes, timings = [], [], []
    raw_rate = None  # B/s of the raw relay (row 1), for row 1b
    sink, echo = Sink(), Echo()
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-vproxy.") as tmp:
            if "1" in only:
                t_row = time.monotonic()
                ep = Endpoints(args.vp, tmp, "unix", None, sink, echo, "unpaced")
                try:
                    vps, raws, cpus = [], [], []
                    for run in range(args.runs):
                        rate, cpu = bulk_vproxy(ep, sink, BULK_BYTES)
                        vps.append(rate)
                        cpus.append(cpu)
                        raws.append(bulk_raw(tmp, BULK_BYTES))
                        log(f"bulk {BULK_BYTES // MIB} MiB run {run + 1}/{args.runs}: vproxy "
                            f"{vps[-1] / MIB:.1f} MiB/s (CPU A {cpu[0] * 100:.0f} %, B "
                            f"{cpu[1] * 100:.0f} %, relay {cpu[2] * 100:.0f} %), raw relay "
                            f"{raws[-1] / MIB:.1f} MiB/s")
                finally:
                    ep.close()
                v, r = statistics.median(vps), statistics.median(raws)
                raw_rate = r
                ca = statistics.median(c[0] for c in cpus) * 100
                cb = statistics.median(c[1] for c in cpus) * 100
                cr = statistics.median(c[2] for c in cpus) * 100
                rows.append((f"1. bulk {BULK_BYTES // MIB} MiB, 1 stream", "unix, unpaced",
                             f"{v / MIB:.1f} MiB/s vs raw relay {r / MIB:.1f} MiB/s = "
                             f"{v / r * 100:.1f} % efficiency",
                             f"median of {args.runs}; minivmm-vp CPU A {ca:.0f} %, B {cb:.0f} %"
                             f", relay {cr:.0f} %"))
                timings.append(("1", time.monotonic() - t_row))

            if "1b" in only:
                t_row = time.monotonic()
                if raw_rate is None:
                    raw_rate = bulk_raw(tmp, BULK_BYTES)
                    log(f"raw relay {raw_rate / MIB:.1f} MiB/s ({BULK_BYTES // MIB} MiB, 1 run)")
                ep = Endpoints(args.vp, tmp, "unix", None, sink, echo, "fair")
                try:
                    n = args.fair_streams
                    agg, rates, cpu, errors = fair_streams(ep, sink, n, 2.0, args.fair_seconds)
                finally:
                    ep.close()
                fair = agg / n
                lo = min(rates) / fair if fair else 0.0
                hi = max(rates) / fair if fair else 0.0
                seen = sum(1 for r in rates if r > 0)
                log(f"{n} streams: {agg / MIB:.1f} MiB/s at the sink, per stream min {lo:.2f}x, "
                    f"max {hi:.2f}x of fair share; CPU A {cpu[0] * 100:.0f} %, B "
                    f"{cpu[1] * 100:.0f} %, relay {cpu[2] * 100:.0f} %, bench process "
                    f"{cpu[3] * 100:.0f} %" + (f"; {len(errors)} send errors, first: "
                                               f"{errors[0]}" if errors else ""))
                rows.append((f"1b. bulk, {n} concurrent streams", "unix, unpaced",
                             f"{agg / MIB:.1f} MiB/s vs raw relay {raw_rate / MIB:.1f} MiB/s = "
                             f"{agg / raw_rate * 100:.1f} % efficiency; per stream min "
                             f"{lo:.2f}x, max {hi:.2f}x of fair share",
                             f"{args.fair_seconds:.0f} s after 2 s warm-up; fair share "
                             f"{fair / 1024:.0f} KiB/s; {seen}/{n} streams moved bytes; "
                             f"minivmm-vp CPU A {cpu[0] * 100:.0f} %, B {cpu[1] * 100:.0f} %, "
                             f"relay {cpu[2] * 100:.0f} %"
                             + (f"; {len(errors)} streams failed ({errors[0]})" if errors
                                else "")))
                timings.append(("1b", time.monotonic() - t_row))

            for kind in channels:
                if not ({"2", "3"} & only):
                    break
                label = (f"{kind}, paced (speed=115200: rate hint 11520)" if kind == "tty"
                         else f"{kind}, paced (no rate hint)")
                t_row = time.monotonic()
                ep = Endpoints(args.vp, tmp, kind, LINE_RATE, sink, echo, "paced-" + kind)
                bulk = None
                try:
                    # Echo on the idle line, then one bulk stream: echo beside it, then its
                    # throughput (the echoes are over by then).
                    lat = []
                    if "3" in only:
                        lat.append(("idle line (baseline)",
                                    echo_rtts(ep, args.echo_count, args.echo_budget)))
                    start = sink.total
                    bulk = BulkStream(ep)
                    time.sleep(2.0)
                    if sink.total == start:
                        raise BenchError("the bulk stream did not start: " + ep.stderr_tail())
                    if "3" in only:
                        base, t0 = sink.total, time.monotonic()
                        lat.append(("with bulk A->B",
                                    echo_rtts(ep, args.echo_count, args.echo_budget),
                                    (sink.total - base) / (time.monotonic() - t0)))
                        if sink.total == base:
                            raise BenchError("the bulk stream stalled while echoing")
                    rows += echo_rows(lat, f"{kind}, paced", label)
                    if "2" in only:
                        payload, wire = paced_rates(ep, sink, args.paced_seconds)
                        log(f"paced bulk, {kind}: {payload:.0f} B/s payload, {wire:.0f} B/s wire")
                        rows.append(("2. bulk, 1 stream, paced 11520 B/s", label,
                                     f"{payload:.0f} B/s = {payload / LINE_RATE * 100:.1f} % "
                                     "of line",
                                     f"wire A->B {wire:.0f} B/s ({wire / LINE_RATE * 100:.1f} %)"
                                     f", {args.paced_seconds:.0f} s"))
                finally:
                    if bulk is not None:
                        bulk.close()
                    ep.close()
                timings.append((f"2+3 {kind}", time.monotonic() - t_row))

            if "3u" in only:
                t_row = time.monotonic()
                ep = Endpoints(args.vp, tmp, "unix", None, sink, echo, "echo-unpaced")
                bulk = None
                try:
                    lat = [("idle line (baseline)",
                            echo_rtts(ep, args.echo_count, args.echo_budget))]
                    start = sink.total
                    bulk = BulkStream(ep, sndbuf=None)
                    time.sleep(2.0)
                    if sink.total == start:
                        raise BenchError("the bulk stream did not start: " + ep.stderr_tail())
                    base, t0 = sink.total, time.monotonic()
                    lat.append(("with bulk A->B",
                                echo_rtts(ep, args.echo_count, args.echo_budget),
                                (sink.total - base) / (time.monotonic() - t0)))
                finally:
                    if bulk is not None:
                        bulk.close()
                    ep.close()
                rows += echo_rows(lat, "unix, unpaced", "unix, unpaced (no rate hint)")
                timings.append(("3u", time.monotonic() - t_row))

            if "4" in only:
                t_row = time.monotonic()
                echo_p = EchoProcess()  # its fds count against its own RLIMIT_NOFILE
                ep = None
                socks = []
                try:
                    # -vv: a refused stream's reason is a debug message.
                    ep = Endpoints(args.vp, tmp, "unix", None, sink, echo_p, "streams",
                                   verbose=2)
                    limits = {name: nofile_of(pid) for name, pid in
                              (("A", ep.procs[0].pid), ("B", ep.procs[1].pid),
                               ("echo server", echo_p.pid), ("bench", os.getpid()))}
                    log("RLIMIT_NOFILE: " + ", ".join(f"{k} {v}" for k, v in limits.items()))
                    short = [k for k, v in limits.items()
                             if v is not None and v < args.streams + 64]
                    if short:
                        notes.append(f"RLIMIT_NOFILE below {args.streams} + 64 for "
                                     f"{', '.join(short)}: {limits}")
                    time.sleep(0.5)
                    before = [rss_kib(p.pid) for p in ep.procs]
                    marks = ep.stderr_marks()
                    ov0 = listen_overflows()
                    t0 = time.monotonic()
                    socks, failure = open_streams(ep, args.streams, args.open_batch)
                    took = time.monotonic() - t0
                    ov1 = listen_overflows()
                    ov = "n/a" if ov0 is None or ov1 is None else ov1 - ov0
                    time.sleep(0.5)
                    ep.check_alive()
                    during = [rss_kib(p.pid) for p in ep.procs]
                    n_open = len(socks)
                    why = ""
                    if failure is not None:
                        said = re.sub(r"minivmm-vp: \w+: (chardev '[^']*': )?", "",
                                      ep.stderr_first(marks))
                        why = (f"; stream {failure[0] + 1} failed: {failure[1]}"
                               + (f"; endpoint log: {said}" if said else ""))
                    log(f"{n_open} of {args.streams} streams open in {took:.1f} s{why}; VmRSS A "
                        f"{before[0]} -> {during[0]} KiB, B {before[1]} -> {during[1]} KiB")
                    what = (f"{n_open} open streams" if n_open == args.streams
                            else f"{n_open} open streams (of {args.streams} tried)")
                    for name, b, d in zip("AB", before, during):
                        rows.append((f"4. VmRSS, {what}, side {name}", "unix, unpaced",
                                     f"{b} KiB -> {d} KiB",
                                     (f"{(d - b) / n_open:.2f} KiB/stream" if n_open
                                      else "no stream opened") + why))
                    notes.append(f"row 4: {n_open} streams opened {args.open_batch} at a time "
                                 f"(each batch echoed before the next) in {took:.1f} s, "
                                 f"kernel ListenOverflows +{ov}" + why)
                    for s in socks:
                        s.close()
                    socks = []
                    # A burst of simultaneous connects to one oforward.
                    time.sleep(1.0)
                    ov0 = listen_overflows()
                    t0 = time.monotonic()
                    socks, failure = open_streams(ep, args.burst, args.burst)
                    took = time.monotonic() - t0
                    ov1 = listen_overflows()
                    ov = "n/a" if ov0 is None or ov1 is None else ov1 - ov0
                    res = (f"all echoed in {took:.2f} s" if failure is None else
                           f"{len(socks)} of {args.burst} echoed in {took:.2f} s; stream "
                           f"{failure[0] + 1}: {failure[1]}")
                    log(f"burst of {args.burst} connects: {res}, ListenOverflows +{ov}")
                    rows.append((f"4b. burst of {args.burst} simultaneous connects to an "
                                 "oforward", "unix, unpaced", res,
                                 f"kernel ListenOverflows +{ov} (system-wide counter)"))
                finally:
                    for s in socks:
                        s.close()
                    if ep is not None:
                        ep.close()
                    echo_p.close()
                timings.append(("4+4b", time.monotonic() - t_row))
            if "5" in only:
                t_row = time.monotonic()
                rows.append(lossy_row(args, tmp, sink))
                timings.append(("5", time.monotonic() - t_row))
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    finally:
        echo.close()
        sink.close()

    sys.stderr.flush()
    print()
    print(f"vproxy, two minivmm-vp endpoints on a HOST RELAY (not a guest: no VMM, no UART, "
          f"no virtio), {time.strftime('%Y-%m-%d')}, {time.monotonic() - started:.0f} s")
    print(f"paced = relay token bucket at {LINE_RATE} B/s each way (115200 baud 8N1); "
          "tty = pty pairs, the endpoints' speed=115200 is their rate hint; "
          "unix = socket channel, no rate hint")
    print()
    print("| measurement | channel | result | detail |")
    print("|---|---|---|---|")
    for r in sorted(rows, key=lambda r: r[0].split(".")[0]):  # stable: 1, 2, 3, 4, 4b
        print("| " + " | ".join(r) + " |")
    for n in notes:
        print(f"\n{n}")
    if timings:
        print("\nseconds per row: " + ", ".join(f"{k} {v:.0f}" for k, v in timings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
