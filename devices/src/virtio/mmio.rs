//! The virtio-mmio transport (virtio 1.x, register layout version 2) for one device in a
//! 4 KiB slot.
//!
//! A vCPU thread reaches the register file through [`BusDevice`]: feature negotiation, the
//! status state machine, queue configuration, interrupt acknowledge and the device's
//! configuration space. A write to QueueNotify signals that queue's eventfd (the vmm normally
//! registers the same eventfd as an ioeventfd at [`QUEUE_NOTIFY_OFFSET`] with the queue index as
//! datamatch, so those writes never leave KVM). The event loop watches the transport's own
//! eventfds ([`VirtioMmio::event_fds`], fixed for its life), attaches the device's backends to
//! its poller once ([`VirtioMmio::attach`]), and calls [`VirtioMmio::on_event_fd`] or
//! [`VirtioMmio::on_ready`] and then [`VirtioMmio::service`], which run the device.
//!
//! Everything the guest writes is checked: queue sizes (power of two, at most the maximum),
//! ring alignment and placement inside guest memory (when QueueReady is set), feature
//! acceptance (VIRTIO_F_VERSION_1 required, nothing that was not offered), and the order of
//! status bits. A value that is refused reads back refused (QueueReady stays 0, FEATURES_OK
//! stays clear); a protocol violation sets DEVICE_NEEDS_RESET. This module must not do host
//! I/O on a vCPU thread and must not panic on any register access.

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::Arc;

use chardev::{OwnerGroup, Readiness, Token};
use thiserror::Error;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    feature, ActivateContext, VirtioDevice, VirtioInterrupt, STATUS_ACKNOWLEDGE, STATUS_DRIVER,
    STATUS_DRIVER_OK, STATUS_FAILED, STATUS_FEATURES_OK, STATUS_NEEDS_RESET, VIRTIO_F_VERSION_1,
};
use crate::bus::BusDevice;
use crate::IrqLine;

/// Bytes of guest-physical space one device occupies.
pub const MMIO_SLOT_SIZE: u64 = 0x1000;
/// "virt" in little endian.
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// The modern (virtio 1.x) register layout.
pub const MMIO_VERSION: u32 = 2;
/// The vendor id reported to the guest ("mvmm" in little endian).
pub const VENDOR_ID: u32 = 0x6d6d_766d;
/// Largest queue size the split ring allows.
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// MagicValue (R).
pub const REG_MAGIC_VALUE: u64 = 0x000;
/// Version (R).
pub const REG_VERSION: u64 = 0x004;
/// DeviceID (R).
pub const REG_DEVICE_ID: u64 = 0x008;
/// VendorID (R).
pub const REG_VENDOR_ID: u64 = 0x00c;
/// DeviceFeatures (R): 32 feature bits selected by DeviceFeaturesSel.
pub const REG_DEVICE_FEATURES: u64 = 0x010;
/// DeviceFeaturesSel (W).
pub const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
/// DriverFeatures (W): 32 feature bits selected by DriverFeaturesSel.
pub const REG_DRIVER_FEATURES: u64 = 0x020;
/// DriverFeaturesSel (W).
pub const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
/// QueueSel (W).
pub const REG_QUEUE_SEL: u64 = 0x030;
/// QueueNumMax (R): 0 when the selected queue does not exist.
pub const REG_QUEUE_NUM_MAX: u64 = 0x034;
/// QueueNum (W).
pub const REG_QUEUE_NUM: u64 = 0x038;
/// QueueReady (RW).
pub const REG_QUEUE_READY: u64 = 0x044;
/// QueueNotify (W): the value is the queue index.
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
/// InterruptStatus (R).
pub const REG_INTERRUPT_STATUS: u64 = 0x060;
/// InterruptACK (W).
pub const REG_INTERRUPT_ACK: u64 = 0x064;
/// Status (RW).
pub const REG_STATUS: u64 = 0x070;
/// QueueDescLow (W).
pub const REG_QUEUE_DESC_LOW: u64 = 0x080;
/// QueueDescHigh (W).
pub const REG_QUEUE_DESC_HIGH: u64 = 0x084;
/// QueueDriverLow (W): the available ring.
pub const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
/// QueueDriverHigh (W).
pub const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
/// QueueDeviceLow (W): the used ring.
pub const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
/// QueueDeviceHigh (W).
pub const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
/// SHMSel (W).
pub const REG_SHM_SEL: u64 = 0x0ac;
/// SHMLenLow (R).
pub const REG_SHM_LEN_LOW: u64 = 0x0b0;
/// SHMLenHigh (R).
pub const REG_SHM_LEN_HIGH: u64 = 0x0b4;
/// SHMBaseLow (R).
pub const REG_SHM_BASE_LOW: u64 = 0x0b8;
/// SHMBaseHigh (R).
pub const REG_SHM_BASE_HIGH: u64 = 0x0bc;
/// ConfigGeneration (R).
pub const REG_CONFIG_GENERATION: u64 = 0x0fc;
/// Start of the device configuration space.
pub const REG_CONFIG: u64 = 0x100;

/// Where the vmm registers each queue's ioeventfd (datamatch = the queue index, 4 bytes).
pub const QUEUE_NOTIFY_OFFSET: u64 = REG_QUEUE_NOTIFY;
/// What a read of a shared-memory length or base returns: there is no such region.
const SHM_NONE: u32 = u32::MAX;

/// Errors building a transport.
#[derive(Debug, Error)]
pub enum MmioError {
    /// An eventfd could not be created.
    #[error("cannot create a virtio eventfd")]
    EventFd(#[source] io::Error),
    /// The device declared an impossible queue size.
    #[error("queue {index} has invalid maximum size {size}")]
    QueueSize {
        /// Queue index.
        index: usize,
        /// The size declared.
        size: u16,
    },
}

/// What the driver programmed for one queue.
#[derive(Debug, Clone, Copy)]
struct QueueSlot {
    max: u16,
    num: u32,
    ready: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

impl QueueSlot {
    fn new(max: u16) -> Self {
        QueueSlot {
            max,
            num: u32::from(max),
            ready: false,
            desc: 0,
            driver: 0,
            device: 0,
        }
    }

    /// A `virtio-queue` queue for this configuration, if every part of it is valid.
    fn build(&self, mem: &GuestMemoryMmap) -> Result<Queue, &'static str> {
        let mut q = Queue::new(self.max).map_err(|_| "bad maximum size")?;
        let num = u16::try_from(self.num).map_err(|_| "size too large")?;
        q.try_set_size(num)
            .map_err(|_| "size not a power of two within the maximum")?;
        q.try_set_desc_table_address(GuestAddress(self.desc))
            .map_err(|_| "descriptor table misaligned")?;
        q.try_set_avail_ring_address(GuestAddress(self.driver))
            .map_err(|_| "available ring misaligned")?;
        q.try_set_used_ring_address(GuestAddress(self.device))
            .map_err(|_| "used ring misaligned")?;
        q.set_ready(true);
        if !q.is_valid(mem) {
            return Err("rings outside guest memory");
        }
        Ok(q)
    }
}

/// A virtio device on the MMIO transport. See the module documentation.
pub struct VirtioMmio<D: VirtioDevice> {
    device: D,
    mem: GuestMemoryMmap,
    interrupt: Arc<VirtioInterrupt>,
    queue_evts: Vec<EventFd>,
    kick: EventFd,
    slots: Vec<QueueSlot>,
    /// Queues checked when the driver set QueueReady, handed to the device at DRIVER_OK.
    built: Vec<Option<Queue>>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    /// The driver accepted a bit in a feature word past 63.
    unknown_features: bool,
    queue_sel: u32,
    shm_sel: u32,
    activated: bool,
    /// Guest errors logged since the last reset (only the first is a warning).
    guest_errors: u64,
}

impl<D: VirtioDevice> VirtioMmio<D> {
    /// `device` in its reset state on guest memory `mem`, interrupting through `irq`.
    pub fn new(device: D, mem: GuestMemoryMmap, irq: Arc<dyn IrqLine>) -> Result<Self, MmioError> {
        let sizes = device.queue_max_sizes();
        for (index, &size) in sizes.iter().enumerate() {
            if size == 0 || size > MAX_QUEUE_SIZE || !size.is_power_of_two() {
                return Err(MmioError::QueueSize { index, size });
            }
        }
        let queue_evts = sizes
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<io::Result<Vec<_>>>()
            .map_err(MmioError::EventFd)?;
        let kick = EventFd::new(EFD_NONBLOCK).map_err(MmioError::EventFd)?;
        Ok(VirtioMmio {
            device,
            mem,
            interrupt: Arc::new(VirtioInterrupt::new(irq)),
            queue_evts,
            kick,
            slots: sizes.iter().map(|&s| QueueSlot::new(s)).collect(),
            built: sizes.iter().map(|_| None).collect(),
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            unknown_features: false,
            queue_sel: 0,
            shm_sel: 0,
            activated: false,
            guest_errors: 0,
        })
    }

    /// The device.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device, mutably (hot-plugging a console port, draining its events). Call
    /// [`VirtioMmio::service`] afterwards.
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// One eventfd per queue, in queue order: register each as an ioeventfd at
    /// `slot base + QUEUE_NOTIFY_OFFSET`, 4 bytes, datamatch = its index.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The ioeventfd registrations the vmm should make: (offset in the slot, datamatch, fd).
    pub fn ioeventfds(&self) -> Vec<(u64, u32, &EventFd)> {
        self.queue_evts
            .iter()
            .enumerate()
            .filter_map(|(i, e)| Some((QUEUE_NOTIFY_OFFSET, u32::try_from(i).ok()?, e)))
            .collect()
    }

    /// The interrupt state shared with the device.
    pub fn interrupt(&self) -> &Arc<VirtioInterrupt> {
        &self.interrupt
    }

    /// The Status register as the guest reads it.
    pub fn status(&self) -> u32 {
        let mut status = self.status;
        if self.interrupt.needs_reset() {
            status |= STATUS_NEEDS_RESET;
        }
        status
    }

    /// Whether the driver set DRIVER_OK and the device started.
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// The transport's own eventfds, to watch for reading for as long as it lives: the queue
    /// notifications and its kick.
    pub fn event_fds(&self) -> Vec<RawFd> {
        self.queue_evts
            .iter()
            .map(AsRawFd::as_raw_fd)
            .chain(std::iter::once(self.kick.as_raw_fd()))
            .collect()
    }

    /// One of [`VirtioMmio::event_fds`] fired: consume it. Call [`VirtioMmio::service`]
    /// afterwards.
    pub fn on_event_fd(&mut self, fd: RawFd) {
        if fd == self.kick.as_raw_fd() {
            // EAGAIN only means it was already consumed.
            let _ = self.kick.read();
        } else if let Some(evt) = self.queue_evts.iter().find(|e| e.as_raw_fd() == fd) {
            let _ = evt.read();
        }
    }

    /// Attach the device's backends to the event loop (see [`VirtioDevice::attach`]).
    pub fn attach(&mut self, owners: OwnerGroup) {
        self.device.attach(owners);
    }

    /// The event loop saw `readiness` on a backend fd of the device. Call
    /// [`VirtioMmio::service`] afterwards.
    pub fn on_ready(&mut self, part: u16, token: Token, readiness: Readiness) {
        self.device.on_ready(part, token, readiness);
    }

    /// Run the device: queues, backends, interrupts.
    pub fn service(&mut self) {
        self.device.service();
        if self.device.take_kick() {
            self.write_kick();
        }
    }

    /// Wake the event loop's handler for this device (after a port was added or removed from
    /// another subscriber, so it re-reads the fds to poll).
    pub fn kick(&self) {
        self.write_kick();
    }

    fn write_kick(&self) {
        if let Err(e) = self.kick.write(1) {
            if e.kind() != io::ErrorKind::WouldBlock {
                log::warn!("virtio-mmio: kick eventfd: {e}");
            }
        }
    }

    fn guest_error(&mut self, what: &str) {
        if self.guest_errors == 0 {
            log::warn!("virtio-mmio: device {}: {what}", self.device.device_type());
        } else {
            log::debug!("virtio-mmio: device {}: {what}", self.device.device_type());
        }
        self.guest_errors += 1;
    }

    /// A protocol violation: refuse it and mark the device as needing a reset.
    fn illegal(&mut self, what: &str) {
        self.guest_error(what);
        if self.status & STATUS_DRIVER_OK != 0 {
            self.interrupt.set_needs_reset();
        } else {
            self.interrupt.set_needs_reset_quiet();
        }
    }

    fn offered_features(&self) -> u64 {
        self.device.features() | feature(VIRTIO_F_VERSION_1)
    }

    /// Device reset, as the driver's write of 0 to Status does: status 0, every queue
    /// unconfigured, the interrupt cleared and its line low, the device reset
    /// ([`VirtioDevice::reset`]: it keeps its host side). A machine reset does this too.
    pub fn reset(&mut self) {
        self.device.reset();
        self.interrupt.clear();
        for slot in &mut self.slots {
            *slot = QueueSlot::new(slot.max);
        }
        for q in &mut self.built {
            *q = None;
        }
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.unknown_features = false;
        self.queue_sel = 0;
        self.shm_sel = 0;
        self.activated = false;
        self.guest_errors = 0;
    }

    fn selected(&self) -> Option<usize> {
        let sel = usize::try_from(self.queue_sel).ok()?;
        (sel < self.slots.len()).then_some(sel)
    }

    fn read_register(&self, offset: u64) -> u32 {
        let slot = self.selected().map(|i| self.slots[i]);
        match offset {
            REG_MAGIC_VALUE => MMIO_MAGIC_VALUE,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.offered_features() as u32,
                1 => (self.offered_features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => slot.map_or(0, |s| u32::from(s.max)),
            REG_QUEUE_READY => slot.map_or(0, |s| u32::from(s.ready)),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.status(),
            REG_QUEUE_DESC_LOW => slot.map_or(0, |s| s.desc as u32),
            REG_QUEUE_DESC_HIGH => slot.map_or(0, |s| (s.desc >> 32) as u32),
            REG_QUEUE_DRIVER_LOW => slot.map_or(0, |s| s.driver as u32),
            REG_QUEUE_DRIVER_HIGH => slot.map_or(0, |s| (s.driver >> 32) as u32),
            REG_QUEUE_DEVICE_LOW => slot.map_or(0, |s| s.device as u32),
            REG_QUEUE_DEVICE_HIGH => slot.map_or(0, |s| (s.device >> 32) as u32),
            REG_SHM_LEN_LOW | REG_SHM_LEN_HIGH | REG_SHM_BASE_LOW | REG_SHM_BASE_HIGH => SHM_NONE,
            REG_CONFIG_GENERATION => self.device.config_generation(),
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            REG_DRIVER_FEATURES => self.write_driver_features(value),
            REG_QUEUE_SEL => self.queue_sel = value,
            REG_QUEUE_NUM
            | REG_QUEUE_READY
            | REG_QUEUE_DESC_LOW
            | REG_QUEUE_DESC_HIGH
            | REG_QUEUE_DRIVER_LOW
            | REG_QUEUE_DRIVER_HIGH
            | REG_QUEUE_DEVICE_LOW
            | REG_QUEUE_DEVICE_HIGH => self.write_queue(offset, value),
            REG_QUEUE_NOTIFY => self.notify(value),
            REG_INTERRUPT_ACK => self.interrupt.ack(value),
            REG_STATUS => self.write_status(value),
            REG_SHM_SEL => self.shm_sel = value,
            _ => self.guest_error("write to a read-only or unknown register"),
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        let negotiating = self.status & STATUS_DRIVER != 0 && self.status & STATUS_FEATURES_OK == 0;
        if !negotiating {
            self.illegal("driver features written outside negotiation");
            return;
        }
        match self.driver_features_sel {
            0 => {
                self.driver_features =
                    (self.driver_features & 0xffff_ffff_0000_0000) | u64::from(value)
            }
            1 => {
                self.driver_features =
                    (self.driver_features & 0x0000_0000_ffff_ffff) | (u64::from(value) << 32)
            }
            // Feature words past 63 are never offered; accepting any of them fails at
            // FEATURES_OK.
            _ => self.unknown_features |= value != 0,
        }
    }

    fn write_queue(&mut self, offset: u64, value: u32) {
        if self.activated {
            self.illegal("queue configuration changed after DRIVER_OK");
            return;
        }
        let Some(index) = self.selected() else {
            self.guest_error("queue register written for a queue that does not exist");
            return;
        };
        let slot = &mut self.slots[index];
        if slot.ready && !(offset == REG_QUEUE_READY && value == 0) {
            self.guest_error("queue configuration changed while the queue is ready");
            return;
        }
        let low = |old: u64| (old & 0xffff_ffff_0000_0000) | u64::from(value);
        let high = |old: u64| (old & 0x0000_0000_ffff_ffff) | (u64::from(value) << 32);
        match offset {
            REG_QUEUE_NUM => slot.num = value,
            REG_QUEUE_DESC_LOW => slot.desc = low(slot.desc),
            REG_QUEUE_DESC_HIGH => slot.desc = high(slot.desc),
            REG_QUEUE_DRIVER_LOW => slot.driver = low(slot.driver),
            REG_QUEUE_DRIVER_HIGH => slot.driver = high(slot.driver),
            REG_QUEUE_DEVICE_LOW => slot.device = low(slot.device),
            REG_QUEUE_DEVICE_HIGH => slot.device = high(slot.device),
            REG_QUEUE_READY if value == 0 => {
                slot.ready = false;
                self.built[index] = None;
            }
            REG_QUEUE_READY => match slot.build(&self.mem) {
                Ok(q) => {
                    slot.ready = true;
                    self.built[index] = Some(q);
                }
                Err(why) => self.guest_error(&format!("queue {index} refused: {why}")),
            },
            _ => {}
        }
    }

    fn notify(&mut self, value: u32) {
        let evt = usize::try_from(value)
            .ok()
            .and_then(|i| self.queue_evts.get(i));
        match evt {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    if e.kind() != io::ErrorKind::WouldBlock {
                        log::warn!("virtio-mmio: queue notify eventfd: {e}");
                    }
                }
            }
            None => self.guest_error("notify for a queue that does not exist"),
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // NEEDS_RESET belongs to the device; a driver writing back what it read may echo it.
        let value = value & !STATUS_NEEDS_RESET;
        let old = self.status;
        if value & old != old {
            self.illegal("status bits cleared without a reset");
            return;
        }
        if value & STATUS_FAILED != 0 {
            // The driver gave up; it will reset the device.
            self.status |= STATUS_FAILED;
            return;
        }
        let steps = [
            STATUS_ACKNOWLEDGE,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        ];
        if !steps.contains(&value) {
            self.illegal("status bits set out of order or unknown");
            return;
        }
        let new = value & !old;
        if new & STATUS_FEATURES_OK != 0 {
            if let Err(why) = self.check_features() {
                // Refused: FEATURES_OK stays clear for the driver to see.
                self.guest_error(why);
                self.status = value & !(STATUS_FEATURES_OK | STATUS_DRIVER_OK);
                return;
            }
        }
        self.status = value;
        if new & STATUS_DRIVER_OK != 0 {
            self.activate();
        }
    }

    fn check_features(&self) -> Result<(), &'static str> {
        if self.driver_features & feature(VIRTIO_F_VERSION_1) == 0 {
            return Err("driver did not accept VIRTIO_F_VERSION_1");
        }
        if self.driver_features & !self.offered_features() != 0 || self.unknown_features {
            return Err("driver accepted features that were not offered");
        }
        Ok(())
    }

    fn activate(&mut self) {
        let queues = self
            .built
            .iter_mut()
            .zip(&self.slots)
            .map(|(built, slot)| match built.take() {
                Some(q) => q,
                // Not enabled: a fresh, not-ready queue (`max` was checked in `new`).
                None => Queue::new(slot.max).unwrap_or_default(),
            })
            .collect();
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            queues,
            features: self.driver_features,
            interrupt: self.interrupt.clone(),
        };
        match self.device.activate(ctx) {
            Ok(()) => {
                self.activated = true;
                // Work the guest queued before DRIVER_OK.
                self.write_kick();
            }
            Err(e) => self.illegal(&format!("activation failed: {e}")),
        }
    }
}

/// Registers are 32 bits wide and must be accessed as such; the configuration space takes
/// any width. Anything else reads as zero and is ignored on write.
impl<D: VirtioDevice> BusDevice for VirtioMmio<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= REG_CONFIG {
            data.fill(0);
            if offset < MMIO_SLOT_SIZE {
                self.device.read_config(offset - REG_CONFIG, data);
            }
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            self.guest_error("register read that is not 32 bits aligned");
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_register(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= REG_CONFIG {
            if offset < MMIO_SLOT_SIZE {
                self.device.write_config(offset - REG_CONFIG, data);
            }
        } else if let (Ok(bytes), true) = (<[u8; 4]>::try_from(data), offset.is_multiple_of(4)) {
            self.write_register(offset, u32::from_le_bytes(bytes));
        } else {
            self.guest_error("register write that is not 32 bits aligned");
        }
        // A reset, an activation or a configuration write may leave work for the event loop.
        if self.device.take_kick() {
            self.write_kick();
        }
    }

    fn reset(&mut self) {
        VirtioMmio::reset(self);
        // The event loop re-reads what to poll (the device may no longer want input).
        self.write_kick();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serial::testing::RecordingIrq;
    use crate::virtio::testing::{guest_memory, MEM_SIZE};
    use crate::virtio::{ActivateError, INT_CONFIG, INT_VRING};
    use proptest::prelude::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const DEVICE_ID: u32 = 42;
    const F_TEST: u32 = 5;

    /// A device that records what the transport does to it.
    #[derive(Default)]
    struct Dummy {
        activations: Arc<AtomicUsize>,
        resets: usize,
        queues: Vec<(bool, u16)>,
        interrupt: Option<Arc<VirtioInterrupt>>,
        config: [u8; 8],
        required: Option<usize>,
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            DEVICE_ID
        }
        fn features(&self) -> u64 {
            feature(F_TEST)
        }
        fn queue_max_sizes(&self) -> Vec<u16> {
            vec![16, 256]
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = self.config.get(offset as usize + i).copied().unwrap_or(0);
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            for (i, b) in data.iter().enumerate() {
                if let Some(c) = self.config.get_mut(offset as usize + i) {
                    *c = *b;
                }
            }
        }
        fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
            if let Some(q) = self.required {
                if !ctx.queues[q].ready() {
                    return Err(ActivateError::QueueNotReady(q));
                }
            }
            self.activations.fetch_add(1, Ordering::SeqCst);
            self.queues = ctx.queues.iter().map(|q| (q.ready(), q.size())).collect();
            self.interrupt = Some(ctx.interrupt);
            Ok(())
        }
        fn reset(&mut self) {
            self.resets += 1;
            self.interrupt = None;
        }
        fn attach(&mut self, _owners: OwnerGroup) {}
        fn on_ready(&mut self, _part: u16, _token: Token, _readiness: Readiness) {}
        fn service(&mut self) {}
    }

    struct Rig {
        dev: VirtioMmio<Dummy>,
        irq: Arc<RecordingIrq>,
    }

    impl Rig {
        fn new() -> Rig {
            let irq = Arc::new(RecordingIrq::default());
            let dev = VirtioMmio::new(Dummy::default(), guest_memory(), irq.clone()).unwrap();
            Rig { dev, irq }
        }
        fn r(&mut self, off: u64) -> u32 {
            let mut b = [0u8; 4];
            self.dev.read(off, &mut b);
            u32::from_le_bytes(b)
        }
        fn w(&mut self, off: u64, v: u32) {
            self.dev.write(off, &v.to_le_bytes());
        }
        fn negotiate(&mut self, features: u64) -> bool {
            self.w(REG_STATUS, 0);
            self.w(REG_STATUS, STATUS_ACKNOWLEDGE);
            self.w(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
            self.w(REG_DRIVER_FEATURES_SEL, 0);
            self.w(REG_DRIVER_FEATURES, features as u32);
            self.w(REG_DRIVER_FEATURES_SEL, 1);
            self.w(REG_DRIVER_FEATURES, (features >> 32) as u32);
            self.w(
                REG_STATUS,
                STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
            );
            self.r(REG_STATUS) & STATUS_FEATURES_OK != 0
        }
        fn queue(&mut self, index: u32, num: u32, desc: u64, driver: u64, device: u64) -> bool {
            self.w(REG_QUEUE_SEL, index);
            self.w(REG_QUEUE_NUM, num);
            self.w(REG_QUEUE_DESC_LOW, desc as u32);
            self.w(REG_QUEUE_DESC_HIGH, (desc >> 32) as u32);
            self.w(REG_QUEUE_DRIVER_LOW, driver as u32);
            self.w(REG_QUEUE_DRIVER_HIGH, (driver >> 32) as u32);
            self.w(REG_QUEUE_DEVICE_LOW, device as u32);
            self.w(REG_QUEUE_DEVICE_HIGH, (device >> 32) as u32);
            self.w(REG_QUEUE_READY, 1);
            self.r(REG_QUEUE_READY) == 1
        }
        fn driver_ok(&mut self) {
            self.w(
                REG_STATUS,
                STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
            );
        }
    }

    fn v1() -> u64 {
        feature(VIRTIO_F_VERSION_1)
    }

    #[test]
    fn identification_registers() {
        let mut rig = Rig::new();
        assert_eq!(rig.r(REG_MAGIC_VALUE), 0x7472_6976);
        assert_eq!(rig.r(REG_VERSION), 2);
        assert_eq!(rig.r(REG_DEVICE_ID), DEVICE_ID);
        assert_eq!(rig.r(REG_VENDOR_ID), VENDOR_ID);
        assert_eq!(rig.r(REG_SHM_LEN_LOW), u32::MAX);
        // Narrow register reads and unknown offsets read zero.
        let mut b = [0xffu8; 2];
        rig.dev.read(REG_MAGIC_VALUE, &mut b);
        assert_eq!(b, [0, 0]);
        assert_eq!(rig.r(0x0f0), 0);
        // Offsets match the virtio-bindings constants.
        use virtio_bindings::virtio_mmio as b;
        assert_eq!(REG_QUEUE_NOTIFY, u64::from(b::VIRTIO_MMIO_QUEUE_NOTIFY));
        assert_eq!(REG_QUEUE_READY, u64::from(b::VIRTIO_MMIO_QUEUE_READY));
        assert_eq!(
            REG_QUEUE_DEVICE_HIGH,
            u64::from(b::VIRTIO_MMIO_QUEUE_USED_HIGH)
        );
        assert_eq!(
            REG_CONFIG_GENERATION,
            u64::from(b::VIRTIO_MMIO_CONFIG_GENERATION)
        );
        assert_eq!(REG_SHM_BASE_HIGH, u64::from(b::VIRTIO_MMIO_SHM_BASE_HIGH));
        assert_eq!(REG_CONFIG, u64::from(b::VIRTIO_MMIO_CONFIG));
    }

    #[test]
    fn feature_negotiation() {
        let mut rig = Rig::new();
        rig.w(REG_DEVICE_FEATURES_SEL, 0);
        assert_eq!(rig.r(REG_DEVICE_FEATURES), 1 << F_TEST);
        rig.w(REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(rig.r(REG_DEVICE_FEATURES), 1);
        rig.w(REG_DEVICE_FEATURES_SEL, 2);
        assert_eq!(rig.r(REG_DEVICE_FEATURES), 0);
        // VERSION_1 missing: refused.
        assert!(!rig.negotiate(feature(F_TEST)));
        assert_eq!(rig.r(REG_STATUS), STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        // A feature that was not offered: refused.
        assert!(!rig.negotiate(v1() | feature(7)));
        // A feature word past 63: refused.
        rig.negotiate(v1());
        rig.w(REG_STATUS, 0);
        rig.w(REG_STATUS, STATUS_ACKNOWLEDGE);
        rig.w(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        rig.w(REG_DRIVER_FEATURES_SEL, 0);
        rig.w(REG_DRIVER_FEATURES, 0);
        rig.w(REG_DRIVER_FEATURES_SEL, 1);
        rig.w(REG_DRIVER_FEATURES, 1);
        rig.w(REG_DRIVER_FEATURES_SEL, 2);
        rig.w(REG_DRIVER_FEATURES, 1);
        rig.w(
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_eq!(rig.r(REG_STATUS) & STATUS_FEATURES_OK, 0);
        // Accepted.
        assert!(rig.negotiate(v1() | feature(F_TEST)));
        assert_eq!(rig.r(REG_STATUS) & STATUS_NEEDS_RESET, 0);
        // Writing features after FEATURES_OK is a violation.
        rig.w(REG_DRIVER_FEATURES, 0);
        assert_ne!(rig.r(REG_STATUS) & STATUS_NEEDS_RESET, 0);
    }

    #[test]
    fn queue_setup_validation() {
        let mut rig = Rig::new();
        assert!(rig.negotiate(v1()));
        rig.w(REG_QUEUE_SEL, 0);
        assert_eq!(rig.r(REG_QUEUE_NUM_MAX), 16);
        rig.w(REG_QUEUE_SEL, 1);
        assert_eq!(rig.r(REG_QUEUE_NUM_MAX), 256);
        rig.w(REG_QUEUE_SEL, 2);
        assert_eq!(rig.r(REG_QUEUE_NUM_MAX), 0);
        // Sizes: not a power of two, zero, over the maximum.
        assert!(!rig.queue(0, 12, 0x1000, 0x2000, 0x3000));
        assert!(!rig.queue(0, 0, 0x1000, 0x2000, 0x3000));
        assert!(!rig.queue(0, 32, 0x1000, 0x2000, 0x3000));
        assert!(!rig.queue(0, 0x1_0000, 0x1000, 0x2000, 0x3000));
        // Misaligned rings.
        assert!(!rig.queue(0, 16, 0x1008, 0x2000, 0x3000));
        assert!(!rig.queue(0, 16, 0x1000, 0x2001, 0x3000));
        assert!(!rig.queue(0, 16, 0x1000, 0x2000, 0x3002));
        // Outside guest memory, straddling its end, above 4 GiB.
        assert!(!rig.queue(0, 16, MEM_SIZE, 0x2000, 0x3000));
        assert!(!rig.queue(0, 16, 0x1000, 0x2000, MEM_SIZE - 8));
        assert!(!rig.queue(0, 16, 0x1_0000_1000, 0x2000, 0x3000));
        // A queue that does not exist.
        assert!(!rig.queue(7, 16, 0x1000, 0x2000, 0x3000));
        // Nothing so far was a protocol violation.
        assert_eq!(rig.r(REG_STATUS) & STATUS_NEEDS_RESET, 0);
        // Good, and it reads back.
        assert!(rig.queue(0, 8, 0x1000, 0x2000, 0x3000));
        assert_eq!(rig.r(REG_QUEUE_DESC_LOW), 0x1000);
        // Changing a ready queue is refused; disabling it is allowed.
        rig.w(REG_QUEUE_NUM, 4);
        rig.w(REG_QUEUE_READY, 0);
        assert_eq!(rig.r(REG_QUEUE_READY), 0);
        assert!(rig.queue(0, 8, 0x1000, 0x2000, 0x3000));
        rig.driver_ok();
        assert!(rig.dev.is_activated());
        assert_eq!(rig.dev.device().queues, vec![(true, 8), (false, 256)]);
        // Queue configuration after DRIVER_OK is a violation, and changes nothing.
        rig.w(REG_QUEUE_SEL, 1);
        rig.w(REG_QUEUE_NUM, 16);
        let status = rig.r(REG_STATUS);
        assert_ne!(status & STATUS_NEEDS_RESET, 0);
        assert_ne!(rig.r(0x060) & INT_CONFIG, 0);
        assert!(rig.irq.level());
    }

    #[test]
    fn status_transitions() {
        let mut rig = Rig::new();
        // Skipping ACKNOWLEDGE.
        rig.w(REG_STATUS, STATUS_DRIVER);
        assert_ne!(rig.r(REG_STATUS) & STATUS_NEEDS_RESET, 0);
        // Reset clears it.
        rig.w(REG_STATUS, 0);
        assert_eq!(rig.r(REG_STATUS), 0);
        // DRIVER_OK before FEATURES_OK.
        rig.w(REG_STATUS, STATUS_ACKNOWLEDGE);
        rig.w(
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK,
        );
        assert_ne!(rig.r(REG_STATUS) & STATUS_NEEDS_RESET, 0);
        assert!(!rig.dev.is_activated());
        // Clearing a bit without a reset.
        assert!(rig.negotiate(v1()));
        rig.w(REG_STATUS, STATUS_ACKNOWLEDGE);
        assert_ne!(rig.r(REG_STATUS) & STATUS_NEEDS_RESET, 0);
        // The full sequence; NEEDS_RESET echoed back by the driver is ignored.
        assert!(rig.negotiate(v1()));
        rig.w(
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_NEEDS_RESET,
        );
        assert_eq!(rig.r(REG_STATUS) & STATUS_NEEDS_RESET, 0);
        rig.driver_ok();
        assert!(rig.dev.is_activated());
        assert_eq!(rig.dev.device().activations.load(Ordering::SeqCst), 1);
        // Writing the same status again changes nothing and does not re-activate.
        rig.driver_ok();
        let all = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
        assert_eq!(rig.r(REG_STATUS), all);
        assert_eq!(rig.dev.device().activations.load(Ordering::SeqCst), 1);
        // FAILED is accepted at any time.
        let status = rig.r(REG_STATUS);
        rig.w(REG_STATUS, status | STATUS_FAILED);
        assert_ne!(rig.r(REG_STATUS) & STATUS_FAILED, 0);
        // A refused activation marks the device.
        rig.dev.device_mut().required = Some(1);
        assert!(rig.negotiate(v1()));
        rig.driver_ok();
        assert!(!rig.dev.is_activated());
        assert_ne!(rig.r(REG_STATUS) & STATUS_NEEDS_RESET, 0);
    }

    #[test]
    fn reset_clears_state() {
        let mut rig = Rig::new();
        assert!(rig.negotiate(v1() | feature(F_TEST)));
        assert!(rig.queue(0, 8, 0x1000, 0x2000, 0x3000));
        rig.driver_ok();
        let int = rig.dev.device().interrupt.clone().unwrap();
        int.signal_used();
        assert!(rig.irq.level());
        let resets = rig.dev.device().resets;
        rig.w(REG_STATUS, 0);
        assert_eq!(rig.dev.device().resets, resets + 1);
        assert_eq!(rig.r(REG_STATUS), 0);
        assert_eq!(rig.r(REG_INTERRUPT_STATUS), 0);
        assert!(!rig.irq.level());
        assert!(!rig.dev.is_activated());
        rig.w(REG_QUEUE_SEL, 0);
        assert_eq!(rig.r(REG_QUEUE_READY), 0);
        assert_eq!(rig.r(REG_QUEUE_DESC_LOW), 0);
        // Features must be negotiated again.
        rig.w(REG_STATUS, STATUS_ACKNOWLEDGE);
        rig.w(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        rig.w(
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_eq!(rig.r(REG_STATUS) & STATUS_FEATURES_OK, 0);
    }

    #[test]
    fn interrupt_ack_drives_the_line() {
        let mut rig = Rig::new();
        assert!(rig.negotiate(v1()));
        rig.driver_ok();
        let int = rig.dev.device().interrupt.clone().unwrap();
        int.signal_used();
        int.signal_config();
        assert_eq!(rig.r(REG_INTERRUPT_STATUS), INT_VRING | INT_CONFIG);
        assert!(rig.irq.level());
        rig.w(REG_INTERRUPT_ACK, INT_VRING);
        assert!(rig.irq.level());
        assert_eq!(rig.r(REG_INTERRUPT_STATUS), INT_CONFIG);
        rig.w(REG_INTERRUPT_ACK, INT_CONFIG);
        assert!(!rig.irq.level());
        assert_eq!(rig.r(REG_INTERRUPT_STATUS), 0);
        int.signal_used();
        assert!(rig.irq.level());
    }

    #[test]
    fn notify_signals_the_queue_eventfd() {
        let mut rig = Rig::new();
        assert!(rig.dev.queue_evts()[1].read().is_err());
        rig.w(REG_QUEUE_NOTIFY, 1);
        assert_eq!(rig.dev.queue_evts()[1].read().unwrap(), 1);
        assert!(rig.dev.queue_evts()[0].read().is_err());
        // A queue that does not exist: nothing.
        rig.w(REG_QUEUE_NOTIFY, 9);
        assert!(rig.dev.queue_evts().iter().all(|e| e.read().is_err()));
        // The registrations the vmm makes, and the fds it polls.
        let io = rig.dev.ioeventfds();
        assert_eq!(io.len(), 2);
        assert_eq!((io[1].0, io[1].1), (0x50, 1));
        let fds = rig.dev.event_fds();
        assert_eq!(fds.len(), 3);
        // on_event_fd consumes the signal.
        rig.w(REG_QUEUE_NOTIFY, 0);
        let fd = rig.dev.queue_evts()[0].as_raw_fd();
        rig.dev.on_event_fd(fd);
        assert!(rig.dev.queue_evts()[0].read().is_err());
    }

    #[test]
    fn config_space_passes_through() {
        let mut rig = Rig::new();
        rig.dev.write(REG_CONFIG + 2, &[0xaa, 0xbb]);
        let mut b = [0u8; 4];
        rig.dev.read(REG_CONFIG, &mut b);
        assert_eq!(b, [0, 0, 0xaa, 0xbb]);
        // Past the slot: nothing.
        rig.dev.read(MMIO_SLOT_SIZE, &mut b);
        assert_eq!(b, [0; 4]);
    }

    #[derive(Debug, Clone)]
    enum Access {
        Read(u64, usize),
        Write(u64, Vec<u8>),
    }

    fn access() -> impl Strategy<Value = Access> {
        let offset = prop_oneof![(0u64..0x40).prop_map(|r| r * 4), 0u64..0x1100, any::<u64>(),];
        let value = prop_oneof![
            any::<u32>().prop_map(|v| v.to_le_bytes().to_vec()),
            (0u32..16).prop_map(|v| v.to_le_bytes().to_vec()),
            Just(STATUS_ACKNOWLEDGE.to_le_bytes().to_vec()),
            Just((STATUS_ACKNOWLEDGE | STATUS_DRIVER).to_le_bytes().to_vec()),
            Just(15u32.to_le_bytes().to_vec()),
            proptest::collection::vec(any::<u8>(), 0..9),
        ];
        prop_oneof![
            (offset.clone(), 0usize..9).prop_map(|(o, n)| Access::Read(o, n)),
            (offset, value).prop_map(|(o, v)| Access::Write(o, v)),
        ]
    }

    proptest! {
        #[test]
        fn random_register_traffic_never_panics(ops in proptest::collection::vec(access(), 1..200)) {
            let mut rig = Rig::new();
            for op in ops {
                match op {
                    Access::Read(o, n) => {
                        let mut b = vec![0u8; n];
                        rig.dev.read(o, &mut b);
                    }
                    Access::Write(o, v) => rig.dev.write(o, &v),
                }
                rig.dev.service();
                // The line is high exactly when something is pending.
                prop_assert_eq!(rig.irq.level(), rig.dev.interrupt().status() != 0);
            }
        }
    }
}
