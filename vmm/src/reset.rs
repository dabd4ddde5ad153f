//! Machine reset in process: what a guest reboot or `system_reset` does when the VM is allowed
//! to reboot (the default; `--no-reboot` ends the VM instead).
//!
//! The process, its chardevs (sockets, ptys, their peers), the monitor and its clients stay;
//! the guest's machine goes back to its first-boot state:
//!
//! 1. every vCPU parks before its next `KVM_RUN` (they already stop at the request; each one
//!    still in the guest gets one kick, which cannot be lost: see `vcpu`);
//! 2. the ACPI tables, the kernel, the initrd, the command line and the boot structure are
//!    written into guest RAM again by the first boot's own code ([`BootPlan::load`]); the
//!    rest of RAM is not cleared, as on QEMU;
//! 3. every device on both buses goes back to its power-on state (`BusDevice::reset`: the
//!    UARTs keep their backends, the virtio transports go to status 0 and the consoles keep
//!    their ports; the vsock device drops its connections, closing their host sockets, keeps
//!    its listener and queues TRANSPORT_RESET for the rebooted driver), then every interrupt line is lowered and the in-kernel PIC, IOAPIC and PIT
//!    get the state they had right after creation ([`IrqchipSnapshot`]);
//! 4. each vCPU, on its own thread, puts back the state KVM created it in and is configured
//!    for the boot as the first time (`cpu::reset_vcpu`);
//! 5. the vCPUs run again, unless `stop` is in force: a stopped VM stays stopped until `cont`.
//!
//! Everything runs on the event-loop thread, which does nothing else meanwhile: well under a
//! millisecond for a tiny guest, plus the copy of the boot images (about 7 ms for 32 MiB on
//! the development machine). An error ends the VM (status 1) with the message; nothing here
//! panics.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use devices::bus::Bus;
use kvm_bindings::{
    kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use thiserror::Error;
use vm_memory::GuestMemoryMmap;

use crate::acpi::{self, ComPort, VirtioMmioSlot};
use crate::boot::{self, BootInfo};
use crate::irq::IrqLines;
use crate::mptable;
use crate::vcpu::{ExitLatch, VcpuControl};
use crate::vsock::SharedVsock;

/// Errors while loading the boot images and tables.
#[derive(Debug, Error)]
pub enum LoadError {
    /// Loading the kernel or initrd failed.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// Writing ACPI tables failed.
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    /// Writing the MP table failed.
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
}

/// Errors during a reset. Each ends the VM.
#[derive(Debug, Error)]
pub enum ResetError {
    /// A vCPU did not leave the guest in time.
    #[error("the vCPUs did not stop in time")]
    Park,
    /// The boot images or tables could not be written again.
    #[error("cannot load the boot images again")]
    Load(#[from] LoadError),
    /// A KVM VM ioctl failed.
    #[error("KVM {0} failed")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// A vCPU could not reset its state.
    #[error("{0}")]
    Vcpu(String),
}

/// What the boot writes into guest RAM, kept to write it again on a reset.
#[derive(Debug, Clone)]
pub struct BootPlan {
    /// The kernel image.
    pub kernel: PathBuf,
    /// The initrd.
    pub initrd: Option<PathBuf>,
    /// The kernel command line.
    pub cmdline: String,
    /// vCPUs (one local APIC each in the MADT).
    pub vcpus: u8,
    /// The COM ports the DSDT declares.
    pub com_ports: Vec<ComPort>,
    /// The virtio-mmio slots: declared in the DSDT, or on the command line without ACPI.
    pub virtio_slots: Vec<VirtioMmioSlot>,
    /// Whether the guest gets ACPI tables.
    pub acpi: bool,
}

impl BootPlan {
    /// Write the ACPI (if on) and MP tables, then the kernel, initrd, command line and boot
    /// structure. The files are read again each time, as at the first boot.
    pub fn load(&self, mem: &GuestMemoryMmap) -> Result<BootInfo, LoadError> {
        let rsdp = if self.acpi {
            acpi::create_acpi_tables(mem, self.vcpus, &self.com_ports, &self.virtio_slots)?
        } else {
            NO_RSDP
        };
        mptable::setup_mptable(mem, self.vcpus)?;
        Ok(boot::load(
            mem,
            &self.kernel,
            self.initrd.as_deref(),
            &self.guest_cmdline(),
            rsdp,
        )?)
    }

    /// The command line the guest gets: the user's, and without ACPI one
    /// `virtio_mmio.device=SIZE@BASE:GSI` entry per virtio-mmio slot (Linux's
    /// `VIRTIO_MMIO_CMDLINE_DEVICES`, as Firecracker and QEMU's microvm with `acpi=off` do).
    /// With ACPI the DSDT declares the slots: a device is never announced both ways, which
    /// would make Linux probe it twice.
    pub fn guest_cmdline(&self) -> String {
        let mut cmdline = self.cmdline.clone();
        if !self.acpi {
            for slot in &self.virtio_slots {
                cmdline.push_str(&format!(
                    " virtio_mmio.device={}K@{:#x}:{}",
                    slot.size / 1024,
                    slot.base,
                    slot.gsi
                ));
            }
        }
        cmdline
    }
}

/// The RSDP address given to the guest when it has no ACPI tables: none.
const NO_RSDP: u64 = 0;

/// The in-kernel interrupt controllers and timer as KVM created them.
pub struct IrqchipSnapshot {
    chips: Vec<kvm_irqchip>,
    pit: kvm_pit_state2,
}

impl IrqchipSnapshot {
    /// Read the PICs, the IOAPIC and the PIT (call right after creating them).
    pub fn capture(vm: &VmFd) -> Result<Self, ResetError> {
        let mut chips = Vec::new();
        for chip_id in [
            KVM_IRQCHIP_PIC_MASTER,
            KVM_IRQCHIP_PIC_SLAVE,
            KVM_IRQCHIP_IOAPIC,
        ] {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            vm.get_irqchip(&mut chip)
                .map_err(|e| ResetError::Kvm("KVM_GET_IRQCHIP", e))?;
            chips.push(chip);
        }
        let pit = vm
            .get_pit2()
            .map_err(|e| ResetError::Kvm("KVM_GET_PIT2", e))?;
        Ok(IrqchipSnapshot { chips, pit })
    }

    /// Put them back.
    pub fn restore(&self, vm: &VmFd) -> Result<(), ResetError> {
        for chip in &self.chips {
            vm.set_irqchip(chip)
                .map_err(|e| ResetError::Kvm("KVM_SET_IRQCHIP", e))?;
        }
        vm.set_pit2(&self.pit)
            .map_err(|e| ResetError::Kvm("KVM_SET_PIT2", e))
    }
}

/// Everything a reset touches; see the module documentation for the order.
pub struct MachineReset {
    /// The boot to write again.
    pub plan: BootPlan,
    /// Guest RAM.
    pub mem: GuestMemoryMmap,
    /// The KVM VM.
    pub vm: Arc<VmFd>,
    /// The in-kernel irqchip and PIT as created.
    pub irqchip: IrqchipSnapshot,
    /// The interrupt lines the devices drive.
    pub irqs: Arc<IrqLines>,
    /// The port-I/O bus.
    pub pio: Arc<Bus>,
    /// The MMIO bus.
    pub mmio: Arc<Bus>,
    /// The vCPUs.
    pub control: Arc<VcpuControl>,
    /// Where the reset was asked for.
    pub exit: Arc<ExitLatch>,
    /// The vsock device, told of a transport reset.
    pub vsock: Option<SharedVsock>,
}

impl MachineReset {
    /// Reset the machine and let the vCPUs boot again (unless `stop` holds them). The reset
    /// request on the exit latch is cleared on success; on an error the vCPUs stay parked
    /// and the caller ends the VM.
    pub fn run(&self) -> Result<(), ResetError> {
        let started = Instant::now();
        if !self.control.park_all(&self.exit) {
            return Err(ResetError::Park);
        }
        let parked = started.elapsed();
        let boot = self.plan.load(&self.mem)?;
        let loaded = started.elapsed();
        self.pio.reset_devices();
        self.mmio.reset_devices();
        if let Some(vsock) = &self.vsock {
            // Every connection goes (its host socket closed, so host peers see the reset),
            // the listener stays, and the rebooted guest's driver gets TRANSPORT_RESET.
            let mut dev = devices::bus::lock(vsock);
            dev.device_mut().transport_reset();
            dev.kick();
        }
        self.irqs.lower_all();
        self.irqchip.restore(&self.vm)?;
        self.control
            .order_reset(boot.mode, &self.exit)
            .map_err(ResetError::Vcpu)?;
        self.exit.clear_reset();
        self.control.release();
        log::debug!(
            "reset: vCPUs parked after {parked:?}, boot images loaded after {loaded:?}, \
             done after {:?}",
            started.elapsed()
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    /// Whether an RSDP signature sits anywhere in the BIOS area, where Linux looks.
    fn has_rsdp(mem: &GuestMemoryMmap) -> bool {
        let mut sig = [0u8; 8];
        (0xe_0000u64..0x10_0000).step_by(16).any(|addr| {
            mem.read_slice(&mut sig, GuestAddress(addr)).unwrap();
            &sig == b"RSD PTR "
        })
    }

    fn plan(acpi: bool) -> BootPlan {
        BootPlan {
            kernel: PathBuf::from("/vmlinux"),
            initrd: None,
            cmdline: "console=ttyS0".to_string(),
            vcpus: 1,
            com_ports: Vec::new(),
            virtio_slots: vec![
                VirtioMmioSlot {
                    base: 0xd000_0000,
                    size: 0x1000,
                    gsi: 5,
                },
                VirtioMmioSlot {
                    base: 0xd000_1000,
                    size: 0x1000,
                    gsi: 16,
                },
            ],
            acpi,
        }
    }

    #[test]
    fn virtio_slots_go_on_the_command_line_only_without_acpi() {
        assert_eq!(plan(true).guest_cmdline(), "console=ttyS0");
        assert_eq!(
            plan(false).guest_cmdline(),
            "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5 \
             virtio_mmio.device=4K@0xd0001000:16"
        );
    }

    #[test]
    fn without_acpi_no_tables_are_written() {
        let mem = crate::memory::create_guest_memory(16 << 20).unwrap();
        // The kernel file does not exist: loading fails after the tables were (or were not)
        // written, which is what is looked at.
        assert!(plan(false).load(&mem).is_err());
        assert!(!has_rsdp(&mem), "an RSDP without ACPI");
        assert!(plan(true).load(&mem).is_err());
        assert!(has_rsdp(&mem), "no RSDP with ACPI");
    }
}
