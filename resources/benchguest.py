"""What the benchmarks share: the test kernel's command line and the QEMU
microvm command line that runs the same guest as minivmm does (resources/README.md)."""

import shutil
import sys

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
