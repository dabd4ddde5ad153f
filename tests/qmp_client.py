#!/usr/bin/env python3
"""QEMU's Python QMP library (qemu.qmp) driving a running minivmm, unchanged.

Usage: qmp_client.py SOCKET. The VM runs a tiny spinning guest with a `virtio-serial` device
(id vser0) and its QMP server on SOCKET. Run by tests/tests/monitor.rs with the interpreter of
build/pyenv (`make pyenv`). Prints "qmp_client: all checks passed" and quits the VM on success;
any failed check raises and exits non-zero.
"""

import asyncio
import socket
import sys

from qemu.qmp import ExecuteError, QMPClient

# How long any one answer or event may take.
TIMEOUT = 30


async def expect_event(qmp, name):
    """The next event named `name` from the client's default event listener."""
    while True:
        event = await asyncio.wait_for(qmp.events.get(), TIMEOUT)
        if event["event"] == name:
            return event


async def run(path):
    qmp = QMPClient("minivmm-test")
    await asyncio.wait_for(qmp.connect(path), TIMEOUT)
    # connect() has read the greeting and negotiated capabilities.
    assert qmp.greeting is not None
    print("greeting:", qmp.greeting._raw)

    status = await qmp.execute("query-status")
    assert status["status"] == "running" and status["running"], status

    await qmp.execute("stop")
    await expect_event(qmp, "STOP")
    status = await qmp.execute("query-status")
    assert status["status"] == "paused" and not status["running"], status
    await qmp.execute("cont")
    await expect_event(qmp, "RESUME")
    assert (await qmp.execute("query-status"))["status"] == "running"

    await qmp.execute(
        "chardev-add", {"id": "py0", "backend": {"type": "ringbuf", "data": {"size": 4096}}}
    )
    await qmp.execute("ringbuf-write", {"device": "py0", "data": "through qemu.qmp"})
    got = await qmp.execute("ringbuf-read", {"device": "py0", "size": 64})
    assert got == "through qemu.qmp", got
    labels = [c["label"] for c in await qmp.execute("query-chardev")]
    assert "py0" in labels, labels
    await qmp.execute("chardev-remove", {"id": "py0"})
    try:
        await qmp.execute("chardev-remove", {"id": "py0"})
        raise AssertionError("removing a removed chardev succeeded")
    except ExecuteError as err:
        assert err.error_class == "GenericError", err

    # An fd passed with SCM_RIGHTS, named by getfd, becomes a chardev.
    ours, theirs = socket.socketpair()
    qmp.send_fd_scm(theirs.fileno())
    theirs.close()
    await qmp.execute("getfd", {"fdname": "pyfd"})
    await qmp.execute(
        "chardev-add",
        {
            "id": "fdc",
            "backend": {
                "type": "socket",
                "data": {"addr": {"type": "fd", "data": {"str": "pyfd"}}, "server": False},
            },
        },
    )
    fdc = [c for c in await qmp.execute("query-chardev") if c["label"] == "fdc"]
    assert fdc and fdc[0]["peer-connected"], fdc
    await qmp.execute("chardev-remove", {"id": "fdc"})
    ours.close()

    # Hot-plug a port on the virtio-serial device, then unplug it.
    await qmp.execute(
        "chardev-add", {"id": "vp0", "backend": {"type": "null", "data": {}}}
    )
    await qmp.execute(
        "device_add",
        {"driver": "virtserialport", "id": "port0", "name": "org.minivmm.py", "chardev": "vp0"},
    )
    ports = await qmp.execute("query-virtio-serial")
    port = [p for p in ports if p["id"] == "port0"]
    assert port and port[0]["name"] == "org.minivmm.py", ports
    await qmp.execute("device_del", {"id": "port0"})
    deleted = await expect_event(qmp, "DEVICE_DELETED")
    assert deleted["data"]["device"] == "port0", deleted
    await qmp.execute("chardev-remove", {"id": "vp0"})

    out = await qmp.execute("human-monitor-command", {"command-line": "info status"})
    assert "VM status: running" in out, out

    await qmp.execute("quit")
    shutdown = await expect_event(qmp, "SHUTDOWN")
    assert shutdown["data"]["reason"] == "host-qmp-quit", shutdown
    await qmp.disconnect()
    print("qmp_client: all checks passed")


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    asyncio.run(run(sys.argv[1]))


if __name__ == "__main__":
    main()
