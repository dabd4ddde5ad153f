"""Helpers the host-only benches share (bench-vproxy.py, bench-eventloop.py): logging, free
ports, and a process's memory and CPU from /proc."""

import os
import socket
import sys


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


def cpu_seconds(pid):
    """User + system CPU time of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
