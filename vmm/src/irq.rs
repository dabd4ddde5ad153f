//! Interrupt lines from devices into KVM's in-kernel IOAPIC/PIC.
//!
//! ISA devices drive a level; several devices may share one line (COM1 and COM3 on IRQ 4), so
//! the line's level is the OR of its devices' levels and KVM is told only when that OR
//! changes. `KVM_IRQ_LINE` is a VM ioctl that any thread may call, so a device can raise its
//! line from a vCPU thread or the event loop alike.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use devices::IrqLine;
use kvm_ioctls::VmFd;

/// The shared state of every level-triggered line of a VM.
pub struct IrqLines {
    vm: Arc<VmFd>,
    /// Per GSI: bitmask of sources currently asserting it, and the next free source bit.
    lines: Mutex<HashMap<u32, (u64, u32)>>,
}

impl IrqLines {
    /// Lines into `vm`'s in-kernel irqchip.
    pub fn new(vm: Arc<VmFd>) -> Arc<Self> {
        Arc::new(IrqLines {
            vm,
            lines: Mutex::new(HashMap::new()),
        })
    }

    /// A new source on `gsi`. At most 64 sources share one line.
    pub fn source(self: &Arc<Self>, gsi: u32) -> Arc<dyn IrqLine> {
        let mut lines = devices::bus::lock(&self.lines);
        let entry = lines.entry(gsi).or_insert((0, 0));
        let bit = entry.1 % 64;
        entry.1 += 1;
        Arc::new(LevelIrq {
            lines: self.clone(),
            gsi,
            mask: 1 << bit,
        })
    }

    /// Machine reset: every line low, in KVM too (whatever its sources last said: they have
    /// been reset), so that no level of the old guest's devices survives into the next boot.
    pub fn lower_all(&self) {
        let mut lines = devices::bus::lock(&self.lines);
        for (&gsi, entry) in lines.iter_mut() {
            entry.0 = 0;
            if let Err(e) = self.vm.set_irq_line(gsi, false) {
                log::error!("KVM_IRQ_LINE gsi {gsi} level false: {e}");
            }
        }
    }

    fn set(&self, gsi: u32, mask: u64, high: bool) {
        let mut lines = devices::bus::lock(&self.lines);
        let entry = lines.entry(gsi).or_insert((0, 0));
        let before = entry.0 != 0;
        if high {
            entry.0 |= mask;
        } else {
            entry.0 &= !mask;
        }
        let after = entry.0 != 0;
        if before != after {
            if let Err(e) = self.vm.set_irq_line(gsi, after) {
                log::error!("KVM_IRQ_LINE gsi {gsi} level {after}: {e}");
            }
        }
    }
}

/// One device's connection to a (possibly shared) line.
struct LevelIrq {
    lines: Arc<IrqLines>,
    gsi: u32,
    mask: u64,
}

impl IrqLine for LevelIrq {
    fn set_level(&self, high: bool) {
        self.lines.set(self.gsi, self.mask, high);
    }
}
