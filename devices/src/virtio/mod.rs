//! Virtio devices behind a virtio-mmio transport.
//!
//! - [`mmio`] is the transport: the virtio 1.x (version 2) register file a guest driver
//!   programs, generic over a [`VirtioDevice`];
//! - [`queue`] turns what a guest put in a split virtqueue into checked descriptor chains;
//! - [`console`] is the multiport virtio-console.
//!
//! The split of work: a vCPU thread only ever touches registers (through
//! [`crate::bus::BusDevice`]); a queue notification becomes an eventfd signal (an ioeventfd
//! when the vmm registers one, or the same eventfd written by the transport). All queue
//! processing and all chardev I/O happen on the event-loop thread in
//! [`VirtioDevice::service`]. Interrupts leave through a level-driven [`crate::IrqLine`].
//!
//! Nothing in here may trust guest memory or panic on what a guest wrote: a guest error marks
//! the device as needing reset ([`STATUS_NEEDS_RESET`]) and raises a configuration interrupt.
//! This module must not know KVM.

pub mod console;
pub mod mmio;
pub mod queue;
pub mod vsock;

#[cfg(test)]
pub(crate) mod testing;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use chardev::{OwnerGroup, Readiness, Token};
use thiserror::Error;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use crate::IrqLine;

pub use mmio::VirtioMmio;

/// Feature bit: the device follows virtio 1.x (required by this transport).
pub const VIRTIO_F_VERSION_1: u32 = 32;
/// Feature bit: indirect descriptors (never offered).
pub const VIRTIO_RING_F_INDIRECT_DESC: u32 = 28;
/// Feature bit: used/avail event indices (never offered).
pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;

/// Device status: the guest noticed the device.
pub const STATUS_ACKNOWLEDGE: u32 = 1;
/// Device status: the guest has a driver for it.
pub const STATUS_DRIVER: u32 = 2;
/// Device status: the driver is set up and the device is live.
pub const STATUS_DRIVER_OK: u32 = 4;
/// Device status: feature negotiation is complete.
pub const STATUS_FEATURES_OK: u32 = 8;
/// Device status: the device hit an error it cannot recover from without a reset.
pub const STATUS_NEEDS_RESET: u32 = 64;
/// Device status: the driver gave up on the device.
pub const STATUS_FAILED: u32 = 128;

/// InterruptStatus bit: a used ring was updated.
pub const INT_VRING: u32 = 1;
/// InterruptStatus bit: the configuration (or the device status) changed.
pub const INT_CONFIG: u32 = 2;

/// The bit mask of feature bit `bit`.
pub const fn feature(bit: u32) -> u64 {
    1u64 << bit
}

/// A device behind a virtio transport.
///
/// The transport owns the register file and the queue configuration; at DRIVER_OK it hands
/// the device its queues ([`VirtioDevice::activate`]). The event-loop hooks have the shape of
/// [`crate::serial_port::SerialPort`]'s, so the vmm drives every device the same way.
pub trait VirtioDevice: Send {
    /// The virtio device id (3 for a console).
    fn device_type(&self) -> u32;

    /// The feature bits offered (VIRTIO_F_VERSION_1 is added by the transport).
    fn features(&self) -> u64;

    /// The maximum size of each queue, one entry per queue. Called once, when the transport
    /// is built: the number of queues must not change afterwards. Each size is a power of two
    /// of at most 32768.
    fn queue_max_sizes(&self) -> Vec<u16>;

    /// The guest reads `data.len()` bytes at `offset` in the device configuration space.
    /// Bytes outside it read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// The guest writes `data` at `offset` in the configuration space. Runs on a vCPU thread:
    /// no host I/O here (set a kick, see [`VirtioDevice::take_kick`]).
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// A counter that changes whenever the configuration space changes.
    fn config_generation(&self) -> u32 {
        0
    }

    /// The driver set DRIVER_OK: start using the queues.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;

    /// The driver reset the device: drop the queues and guest-facing state.
    fn reset(&mut self);

    /// Attach the device's backends to the event loop: part `p` of the device (a port) registers
    /// its fds with `owners.registrar(p)`, now and when it is added later.
    fn attach(&mut self, owners: OwnerGroup);

    /// The event loop saw `readiness` on the fd registered with `token` by part `part`.
    fn on_ready(&mut self, part: u16, token: Token, readiness: Readiness);

    /// Do the device's work: process queues and backends, raise interrupts.
    fn service(&mut self);

    /// Whether the device wants [`VirtioDevice::service`] to run soon without any fd being
    /// ready (work left after a bounded pass, a configuration write). Resets the request.
    fn take_kick(&mut self) -> bool {
        false
    }
}

/// What a device gets when the driver sets DRIVER_OK.
pub struct ActivateContext {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// One queue per index; a queue the driver did not enable is not `ready()`. The ready
    /// ones were checked: size, alignment and rings inside guest memory.
    pub queues: Vec<Queue>,
    /// The negotiated feature bits.
    pub features: u64,
    /// Where the device raises interrupts and reports that it needs a reset.
    pub interrupt: Arc<VirtioInterrupt>,
}

/// Why a device refused to start.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ActivateError {
    /// A queue the device cannot work without was not enabled.
    #[error("queue {0} is required but was not enabled")]
    QueueNotReady(usize),
}

/// The interrupt side of a transport, shared with its device: the InterruptStatus bits, the
/// level of the interrupt line, and the device's "needs reset" condition.
pub struct VirtioInterrupt {
    status: AtomicU32,
    needs_reset: AtomicBool,
    irq: Arc<dyn IrqLine>,
}

impl VirtioInterrupt {
    /// Interrupts with nothing pending, the line low.
    pub fn new(irq: Arc<dyn IrqLine>) -> Self {
        VirtioInterrupt {
            status: AtomicU32::new(0),
            needs_reset: AtomicBool::new(false),
            irq,
        }
    }

    /// A used ring was updated.
    pub fn signal_used(&self) {
        self.raise(INT_VRING);
    }

    /// The configuration space changed.
    pub fn signal_config(&self) {
        self.raise(INT_CONFIG);
    }

    /// The device hit an error it cannot recover from: set DEVICE_NEEDS_RESET and raise a
    /// configuration interrupt (the first time).
    pub fn set_needs_reset(&self) {
        if !self.needs_reset.swap(true, Ordering::SeqCst) {
            self.signal_config();
        }
    }

    /// Set DEVICE_NEEDS_RESET without an interrupt (the driver has not set DRIVER_OK yet).
    pub(crate) fn set_needs_reset_quiet(&self) {
        self.needs_reset.store(true, Ordering::SeqCst);
    }

    /// Whether DEVICE_NEEDS_RESET is set.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// InterruptACK: clear `bits`; the line drops when nothing is left pending.
    pub(crate) fn ack(&self, bits: u32) {
        let old = self.status.fetch_and(!bits, Ordering::SeqCst);
        if old != 0 && old & !bits == 0 {
            self.irq.set_level(false);
        }
    }

    /// Device reset: nothing pending, line low, no reset needed.
    pub(crate) fn clear(&self) {
        self.needs_reset.store(false, Ordering::SeqCst);
        if self.status.swap(0, Ordering::SeqCst) != 0 {
            self.irq.set_level(false);
        }
    }

    fn raise(&self, bit: u32) {
        let old = self.status.fetch_or(bit, Ordering::SeqCst);
        if old == 0 {
            self.irq.set_level(true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serial::testing::RecordingIrq;

    #[test]
    fn constants_match_the_linux_headers() {
        use virtio_bindings::virtio_config as c;
        use virtio_bindings::virtio_ids as ids;
        use virtio_bindings::virtio_mmio as m;
        use virtio_bindings::virtio_ring as r;
        assert_eq!(STATUS_ACKNOWLEDGE, c::VIRTIO_CONFIG_S_ACKNOWLEDGE);
        assert_eq!(STATUS_DRIVER, c::VIRTIO_CONFIG_S_DRIVER);
        assert_eq!(STATUS_DRIVER_OK, c::VIRTIO_CONFIG_S_DRIVER_OK);
        assert_eq!(STATUS_FEATURES_OK, c::VIRTIO_CONFIG_S_FEATURES_OK);
        assert_eq!(STATUS_NEEDS_RESET, c::VIRTIO_CONFIG_S_NEEDS_RESET);
        assert_eq!(STATUS_FAILED, c::VIRTIO_CONFIG_S_FAILED);
        assert_eq!(VIRTIO_F_VERSION_1, c::VIRTIO_F_VERSION_1);
        assert_eq!(VIRTIO_RING_F_INDIRECT_DESC, r::VIRTIO_RING_F_INDIRECT_DESC);
        assert_eq!(VIRTIO_RING_F_EVENT_IDX, r::VIRTIO_RING_F_EVENT_IDX);
        assert_eq!(INT_VRING, m::VIRTIO_MMIO_INT_VRING);
        assert_eq!(INT_CONFIG, m::VIRTIO_MMIO_INT_CONFIG);
        assert_eq!(u32::from(queue::VRING_DESC_F_NEXT), r::VRING_DESC_F_NEXT);
        assert_eq!(u32::from(queue::VRING_DESC_F_WRITE), r::VRING_DESC_F_WRITE);
        assert_eq!(
            u32::from(queue::VRING_DESC_F_INDIRECT),
            r::VRING_DESC_F_INDIRECT
        );
        assert_eq!(console::VIRTIO_ID_CONSOLE, ids::VIRTIO_ID_CONSOLE);
    }

    #[test]
    fn interrupt_level_follows_status() {
        let irq = Arc::new(RecordingIrq::default());
        let int = VirtioInterrupt::new(irq.clone());
        int.signal_used();
        int.signal_config();
        assert_eq!(int.status(), INT_VRING | INT_CONFIG);
        assert!(irq.level());
        int.ack(INT_VRING);
        assert!(irq.level());
        int.ack(INT_CONFIG);
        assert!(!irq.level());
        assert_eq!(irq.changes(), vec![true, false]);
        int.set_needs_reset();
        int.set_needs_reset();
        assert!(int.needs_reset());
        assert_eq!(int.status(), INT_CONFIG);
        int.clear();
        assert!(!int.needs_reset());
        assert!(!irq.level());
    }
}
