#!/usr/bin/env python3
"""Event-loop cost against open fds: minivmm's production event loop and chardev registry, NO
GUEST. `minivmm relay` joins a `vproxy` chardev (an oforward `echo`) to a unix socket chardev
whose peer is a `minivmm-vp` process (an iforward `echo` to an echo server in this process),
exactly as a UART or virtio port would carry the vproxy channel, but with nothing emulated in
between. N client streams (10, 100, 1000) stay open at once; for --seconds, 10 echo messages of 4 KiB
are in flight at any time, each sent on the next stream in turn, so every stream carries
traffic and the load per event is the same whatever N is: what changes is only how many fds are
open.

Measured on the relay process only (minivmm, single-threaded here: no vCPU):
- syscalls per event: every syscall of the relay's life (`strace -c -f`, a second run, since
  strace slows what it counts) over the backend fd events its event loop dispatched (the relay
  prints that count when it stops); "loop/event" counts only the event loop's own
  (epoll_wait, epoll_ctl, timerfd_settime, and the fcntl/kcmp the old fd sync made), then
  epoll_ctl per event and the number of kcmp calls;
- host CPU per MiB moved: utime+stime of the relay (/proc/PID/stat, run without strace) while
  the messages flow (the streams already open) over the bytes the clients got back (each byte crosses the relay twice: in on its oforward
  socket, out on the channel, and the echo back the same way);
- RSS per stream: VmRSS with N streams open minus VmRSS with none, over N;
- fds: the relay's open fds with N streams open, minus N (what does not grow with streams).

The echo server and the clients are Python in this process: they bound the throughput, not the
ratios. Figures hold for this machine; the guest, where there is one, is not involved.

usage: bench-eventloop.py [--minivmm BIN] [--vp BIN] [--streams 10,100,1000] [--seconds S]
"""

import argparse
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time

from benchhost import BenchError, Echo, cpu_seconds, free_port, log, proc_status_kib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MSG = 4096
MIB = 1 << 20


def open_fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


class Setup:
    """An echo server, a relay (optionally under strace) and minivmm-vp on its channel."""

    def __init__(self, args, tmp, strace_out=None):
        self.echo = Echo()
        self.port = free_port()
        chan = os.path.join(tmp, "chan.sock")
        relay = [args.minivmm, "relay",
                 "--chardev", f"vproxy,id=vp,oforward=echo:127.0.0.1:{self.port}",
                 "--chardev", f"socket,id=ch,path={chan},server=on,wait=off"]
        if strace_out:
            relay = ["strace", "-f", "-c", "-o", strace_out] + relay
        self.relay = subprocess.Popen(relay, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while not os.path.exists(chan):
            if time.monotonic() > deadline or self.relay.poll() is not None:
                raise BenchError("the relay did not start")
            time.sleep(0.02)
        self.vp = subprocess.Popen([args.vp, "--channel", f"unix:{chan}",
                                    "--iforward", f"echo:127.0.0.1:{self.echo.port}"],
                                   stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.pid = self.relay_pid()
        self.wait_session()

    def relay_pid(self):
        """The minivmm process (under strace, its child)."""
        pid = self.relay.pid
        for _ in range(100):
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() == "minivmm":
                    return pid
            try:
                with open(f"/proc/{pid}/task/{pid}/children") as f:
                    kids = f.read().split()
            except OSError:
                kids = []
            if kids:
                pid = int(kids[0])
            else:
                time.sleep(0.02)
        raise BenchError("cannot find the minivmm process")

    def wait_session(self):
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                    s.sendall(b"ping")
                    if s.recv(4) == b"ping":
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise BenchError("the vproxy session did not come up")

    def stop(self):
        """Stop the relay; returns its `events` count (and strace writes its table)."""
        # To minivmm itself: strace ends when its tracee does.
        os.kill(self.pid, signal.SIGTERM)
        _, err = self.relay.communicate(timeout=600)
        self.vp.terminate()
        self.vp.wait(timeout=10)
        self.echo.close()
        m = re.search(rb"minivmm relay: events (\d+)", err)
        if not m:
            raise BenchError(f"no relay stats: {err[-500:]!r}")
        return int(m.group(1))


def drive(port, streams, seconds, in_flight, started):
    """Open `streams` echo streams (each echoes once first), then for `seconds` keep
    `in_flight` MSG-byte messages in flight, each on the next stream in turn: every stream is
    used, and the load the event loop sees is the same whatever the number of streams.
    Returns (bytes echoed back, [sockets]) after checking every echo."""
    socks = []
    for _ in range(streams):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        socks.append(s)
    for s in socks:
        s.sendall(b"x")
    for s in socks:
        if s.recv(1) != b"x":
            raise BenchError("a stream did not echo")
    sel = selectors.DefaultSelector()
    msg = bytes(range(256)) * (MSG // 256)
    for s in socks:
        s.setblocking(False)
    want = {}
    nxt = 0

    def send_next():
        nonlocal nxt
        s = socks[nxt % streams]
        nxt += 1
        while s in want:  # already in flight (fewer streams than messages in flight)
            s = socks[nxt % streams]
            nxt += 1
        s.setblocking(True)
        s.sendall(msg)
        s.setblocking(False)
        want[s] = MSG
        sel.register(s, selectors.EVENT_READ)

    started()
    for _ in range(min(in_flight, streams)):
        send_next()
    got = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for key, _ in sel.select(0.1):
            s = key.fileobj
            try:
                d = s.recv(65536)
            except BlockingIOError:
                continue
            if not d:
                raise BenchError("a stream closed")
            if d != msg[MSG - want[s]:MSG - want[s] + len(d)]:
                raise BenchError("an echo came back different")
            got += len(d)
            want[s] -= len(d)
            if want[s] == 0:
                sel.unregister(s)
                del want[s]
                send_next()
    return got, socks


def run_once(args, streams, with_strace):
    with tempfile.TemporaryDirectory(prefix="minivmm-bench-el-") as tmp:
        out = os.path.join(tmp, "strace.txt") if with_strace else None
        setup = Setup(args, tmp, out)
        try:
            rss0 = proc_status_kib(setup.pid)
            at_start = {}

            def started():
                # Every stream open and echoed once: memory and fds per stream now, CPU
                # from here.
                at_start["rss"] = proc_status_kib(setup.pid)
                at_start["fds"] = open_fds(setup.pid)
                at_start["cpu"] = cpu_seconds(setup.pid)

            got, socks = drive(setup.port, streams, args.seconds, args.in_flight, started)
            row = {
                "cpu": cpu_seconds(setup.pid) - at_start["cpu"],
                "bytes": got,
                "rss_per_stream": (at_start["rss"] - rss0) / streams,
                "fds_fixed": at_start["fds"] - streams,
            }
            for s in socks:
                s.close()
        finally:
            events = setup.stop()
        row["events"] = events
        if with_strace:
            row.update(parse_strace(out))
            if args.show_strace:
                with open(out) as f:
                    log(f"strace -c of the relay, {streams} streams:\n" + f.read())
        return row


def parse_strace(path):
    calls = {}
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 5 and parts[0][0].isdigit() and not parts[-1].startswith("total"):
                try:
                    n = int(parts[3])
                except ValueError:
                    continue
                calls[parts[-1]] = n
    loop = sum(calls.get(k, 0) for k in ("epoll_wait", "epoll_pwait", "epoll_ctl", "kcmp",
                                          "fcntl", "timerfd_settime"))
    return {"syscalls": sum(calls.values()), "epoll_ctl": calls.get("epoll_ctl", 0),
            "kcmp": calls.get("kcmp", 0), "fcntl": calls.get("fcntl", 0), "loop": loop}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minivmm", default=os.environ.get("MINIVMM_BIN",
                    os.path.join(REPO, "target/release/minivmm")))
    ap.add_argument("--vp", default=os.environ.get("MINIVMM_VP", os.path.join(
        REPO, "target/x86_64-unknown-linux-gnu/vp/minivmm-vp")))
    ap.add_argument("--streams", default="10,100,1000")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--label", default="minivmm")
    ap.add_argument("--in-flight", type=int, default=10,
                    help="echo messages in flight at once, over all streams")
    ap.add_argument("--show-strace", action="store_true", help="print each strace table")
    args = ap.parse_args()
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    print(f"Event-loop cost against open fds ({args.label}; host relay through `minivmm relay`,"
          " no guest; this machine)")
    print(f"{'streams':>7} {'events':>9} {'syscalls/event':>14} {'loop/event':>10} "
          f"{'epoll_ctl/event':>15} {'kcmp':>8} {'CPU ms/MiB':>10} {'MiB/s':>7} "
          f"{'RSS KiB/stream':>14} {'fixed fds':>9}")
    for n in [int(x) for x in args.streams.split(",")]:
        log(f"{n} streams, plain run")
        plain = run_once(args, n, False)
        log(f"{n} streams, under strace")
        traced = run_once(args, n, True)
        mib = plain["bytes"] / MIB
        print(f"{n:>7} {traced['events']:>9} {traced['syscalls'] / traced['events']:>14.2f} "
              f"{traced['loop'] / traced['events']:>10.2f} "
              f"{traced['epoll_ctl'] / traced['events']:>15.3f} {traced['kcmp']:>8} "
              f"{1000 * plain['cpu'] / max(mib, 1e-9):>10.1f} {mib / args.seconds:>7.1f} "
              f"{plain['rss_per_stream']:>14.1f} {plain['fds_fixed']:>9}", flush=True)


if __name__ == "__main__":
    try:
        main()
    except BenchError as e:
        print(f"bench-eventloop: {e}", file=sys.stderr)
        sys.exit(1)
