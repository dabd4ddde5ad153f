"""What the benchmarks share: the test kernel's command line and the QEMU
microvm command line that runs the same guest as minivmm does (resources/README.md)."""

import base64
import os
import selectors
import shutil
import sys
import time

# The test kernel's command line (tests/src/lib.rs has the same for the tests).
CMDLINE = "console=ttyS0 reboot=k noxsave clearcpuid=smap,popcnt rodata=off quiet"
# Guest RAM in MiB: minivmm's default, QEMU's default.
MEMORY = "128"
# -cpu for QEMU on this machine's KVM: no PV send-IPI (it livelocks SMP bring-up under
# kvm_pvm, minivmm drops it too) and no IA32_ARCH_CAPABILITIES (kvm_pvm refuses QEMU's write
# of MSR 0x10a and QEMU aborts).
QEMU_CPU = "host,kvm-pv-ipi=off,-arch-capabilities"


def qemu_microvm(qemu, kernel, initrd, cmdline, memory=MEMORY):
    """QEMU microvm with ACPI, 1 vCPU, no default devices; the caller adds -serial etc."""
    return [qemu, "-M", "microvm,acpi=on", "-accel", "kvm", "-cpu", QEMU_CPU,
            "-m", memory, "-smp", "1", "-nodefaults", "-no-user-config",
            "-kernel", kernel, "-initrd", initrd, "-append", cmdline]


def find_qemu():
    """qemu-system-x86_64 from PATH, or None after saying it is missing."""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        print("bench: qemu-system-x86_64 not installed (make bench installs it)", file=sys.stderr)
    return qemu


def run64(script):
    """A shell script as the test /init's `minivmm.run64=` command-line word."""
    return "minivmm.run64=" + base64.b64encode(script.encode()).decode().rstrip("=")


class Console:
    """The VMM's stdout (the guest's serial console), read line by line with a deadline."""

    def __init__(self, proc):
        self.proc = proc
        self.fd = proc.stdout.fileno()
        self.sel = selectors.DefaultSelector()
        self.sel.register(proc.stdout, selectors.EVENT_READ)
        self.buf = b""

    def expect(self, word, timeout):
        deadline = time.monotonic() + timeout
        while True:
            idx = self.buf.find(word)
            if idx >= 0:
                end = self.buf.find(b"\n", idx)
                if end >= 0:
                    line = self.buf[idx:end]
                    self.buf = self.buf[end + 1:]
                    return line.decode(errors="replace")
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {word!r} on the console")
            if self.sel.select(timeout=min(left, 1.0)):
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    raise EOFError(f"VMM exited before {word!r}")
                self.buf += chunk
