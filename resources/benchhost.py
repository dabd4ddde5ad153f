"""Helpers the host-only benches share (bench-vproxy.py, bench-eventloop.py): logging, free
ports, a TCP echo server, and a process's memory and CPU from /proc."""

import os
import selectors
import socket
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
    """TCP echo server, one thread and a selector for any number of connections."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4096)
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.sock, selectors.EVENT_READ)
        self.conns = set()
        self.stop = False
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        while not self.stop:
            for key, _ in self.sel.select(timeout=0.2):
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
                try:
                    data = s.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if data:
                    try:
                        s.setblocking(True)
                        s.sendall(data)
                        s.setblocking(False)
                        continue
                    except OSError:
                        pass
                self.sel.unregister(s)
                self.conns.discard(s)
                s.close()

    def close(self):
        self.stop = True
        self.thread.join(timeout=2)
        for c in list(self.conns):
            c.close()
        self.sock.close()
        self.sel.close()
