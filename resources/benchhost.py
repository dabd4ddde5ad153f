"""Helpers the host-only benches share (bench-vproxy.py, bench-eventloop.py): logging, free
ports, a TCP echo server (in this process or a child), RLIMIT_NOFILE, and a process's memory
and CPU from /proc. `python3 benchhost.py echo [buffered]` is the child's echo server: prints
its port, serves until its stdin closes."""

import os
import resource
import selectors
import socket
import subprocess
import sys
import threading


def log(msg):
    print(f"  {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status_kib(pid, key="VmRSS"):
    """A `kB` field of /proc/PID/status (VmRSS by default)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise BenchError(f"no {key} for pid {pid}")


def rss_kib(pid):
    return proc_status_kib(pid, "VmRSS")


def cpu_seconds(pid, tid=None):
    """User + system CPU time of a process so far (of its thread `tid` only, if given)."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    with open(path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Echo:
    """TCP echo server, one thread and a selector for any number of connections.

    buffered=False (the default): each echo is sent with a blocking sendall, so one peer that
    stops reading stalls every connection. buffered=True: never blocks; what a connection
    cannot take yet waits for it, and that connection is not read meanwhile (its own
    backpressure only), so a stalled stream leaves the others alone."""

    def __init__(self, buffered=False):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4096)
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.buffered = buffered
        self.pending = {}  # buffered: conn -> bytes not sent yet
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.sock, selectors.EVENT_READ)
        self.conns = set()
        self.stop = False
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _drop(self, s):
        self.sel.unregister(s)
        self.conns.discard(s)
        self.pending.pop(s, None)
        s.close()

    def _loop(self):
        while not self.stop:
            for key, events in self.sel.select(timeout=0.2):
                s = key.fileobj
                if s is self.sock:
                    try:
                        c, _ = s.accept()
                    except OSError:
                        continue
                    c.setblocking(False)
                    self.conns.add(c)
                    self.sel.register(c, selectors.EVENT_READ)
                    continue
                if s in self.pending:  # buffered, writable again
                    self._send(s, self.pending.pop(s))
                    continue
                try:
                    data = s.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if data and self.buffered:
                    self._send(s, data)
                    continue
                if data:
                    try:
                        s.setblocking(True)
                        s.sendall(data)
                        s.setblocking(False)
                        continue
                    except OSError:
                        pass
                self._drop(s)

    def _send(self, s, data):
        """Buffered mode: send what the socket takes now; wait for it to be writable for the
        rest, or read it again when all went."""
        try:
            n = s.send(data)
        except BlockingIOError:
            n = 0
        except OSError:
            self._drop(s)
            return
        if n < len(data):
            self.pending[s] = data[n:]
            self.sel.modify(s, selectors.EVENT_WRITE)
        else:
            self.sel.modify(s, selectors.EVENT_READ)

    def close(self):
        self.stop = True
        self.thread.join(timeout=2)
        for c in list(self.conns):
            c.close()
        self.sock.close()
        self.sel.close()


class EchoProcess:
    """The same echo server in a child process (`python3 benchhost.py echo`), so its
    connections count against the child's RLIMIT_NOFILE, not this process's: with N streams
    through vproxy the bench holds N client sockets and the echo server N more."""

    def __init__(self, buffered=False):
        argv = [sys.executable, os.path.abspath(__file__), "echo"]
        if buffered:
            argv.append("buffered")
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        line = self.proc.stdout.readline()
        try:
            self.port = int(line)
        except ValueError:
            self.close()
            raise BenchError(f"echo process did not start (it said {line!r})")
        self.pid = self.proc.pid

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()  # the child's cue to end
                self.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()


def raise_nofile(want):
    """Raise this process's soft RLIMIT_NOFILE towards `want` (at most the hard limit; the
    children started later inherit it). Returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def nofile_of(pid):
    """The soft `Max open files` of a process (/proc/PID/limits), None if unlimited."""
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                soft = line.split()[3]
                return None if soft == "unlimited" else int(soft)
    raise BenchError(f"no open files limit for pid {pid}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["echo"]:
        raise_nofile(1 << 20)  # up to the hard limit
        echo = Echo(buffered="buffered" in sys.argv[2:])
        print(echo.port, flush=True)
        sys.stdin.read()  # until the parent closes our stdin (or exits)
        echo.close()
    else:
        sys.exit(f"usage: {sys.argv[0]} echo [buffered]")
