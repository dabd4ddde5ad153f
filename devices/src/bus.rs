//! An address-range bus that routes guest port-I/O or MMIO accesses to devices.
//!
//! The vmm keeps one bus for port I/O and one for MMIO; a vCPU thread looks up the device that
//! covers an address and calls it with the offset inside the device's range. Devices are
//! shared (`Arc<Mutex<..>>`) because the event-loop thread reaches them too. The bus holds no
//! KVM type and never blocks beyond the device's own lock.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use thiserror::Error;

/// A device that answers guest register accesses.
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes at `offset` inside the device's range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset` inside the device's range.
    fn write(&mut self, offset: u64, data: &[u8]);
    /// Machine reset (a guest reboot, `system_reset`): back to the power-on state the guest
    /// sees, keeping what belongs to the host (chardev backends, their peers, configuration).
    /// Runs on the event-loop thread while every vCPU is parked.
    fn reset(&mut self);
}

/// Errors from building a bus.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range overlaps one already on the bus.
    #[error("range {base:#x}+{len:#x} overlaps a device already on the bus")]
    Overlap {
        /// Start of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
    /// A zero-length range.
    #[error("range at {0:#x} has zero length")]
    Empty(u64),
}

/// A shared device on a bus.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Clone)]
struct Entry {
    len: u64,
    device: SharedDevice,
}

/// Address ranges mapped to devices.
#[derive(Clone, Default)]
pub struct Bus {
    ranges: BTreeMap<u64, Entry>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Bus::default()
    }

    /// Map `device` at `[base, base + len)`.
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::Empty(base));
        }
        let end = base
            .checked_add(len)
            .ok_or(BusError::Overlap { base, len })?;
        if let Some((&prev_base, prev)) = self.ranges.range(..end).next_back() {
            if prev_base + prev.len > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        self.ranges.insert(base, Entry { len, device });
        Ok(())
    }

    /// The device covering `addr` and the offset of `addr` inside it.
    pub fn resolve(&self, addr: u64) -> Option<(SharedDevice, u64)> {
        let (&base, entry) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset < entry.len).then(|| (entry.device.clone(), offset))
    }

    /// Dispatch a guest read. Returns false (and fills `data` with all-ones, as an unclaimed
    /// ISA read floats high) when no device covers `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr) {
            Some((device, offset)) => {
                lock(&device).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatch a guest write. Returns false when no device covers `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr) {
            Some((device, offset)) => {
                lock(&device).write(offset, data);
                true
            }
            None => false,
        }
    }

    /// Reset every device on the bus ([`BusDevice::reset`]), each once, in address order.
    pub fn reset_devices(&self) {
        let mut done: Vec<&SharedDevice> = Vec::new();
        for entry in self.ranges.values() {
            if done.iter().any(|d| Arc::ptr_eq(d, &entry.device)) {
                continue;
            }
            lock(&entry.device).reset();
            done.push(&entry.device);
        }
    }
}

/// Lock a device, carrying on with its state if a previous holder panicked: one broken access
/// must not take every later guest access down with it.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
        resets: usize,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
        fn reset(&mut self) {
            self.writes.clear();
            self.resets += 1;
        }
    }

    #[test]
    fn reset_reaches_each_device_once() {
        let a = Arc::new(Mutex::new(Recorder::default()));
        let b = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new();
        bus.insert(a.clone(), 0x60, 1).unwrap();
        // One device at two ranges, as an i8042 has.
        bus.insert(b.clone(), 0x3f8, 8).unwrap();
        bus.insert(b.clone(), 0x64, 1).unwrap();
        assert!(bus.write(0x3f8, &[1]));
        bus.reset_devices();
        assert_eq!(a.lock().unwrap().resets, 1);
        assert_eq!(b.lock().unwrap().resets, 1);
        assert!(b.lock().unwrap().writes.is_empty());
    }

    #[test]
    fn routes_by_range_and_offset() {
        let a = Arc::new(Mutex::new(Recorder::default()));
        let b = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new();
        bus.insert(a.clone(), 0x3f8, 8).unwrap();
        bus.insert(b.clone(), 0x2f8, 8).unwrap();
        assert!(bus.write(0x3fb, &[0x83]));
        assert!(bus.write(0x2f8, &[1]));
        assert!(!bus.write(0x400, &[1]));
        let mut d = [0u8; 1];
        assert!(bus.read(0x3fd, &mut d));
        assert_eq!(d, [5]);
        assert!(!bus.read(0x3f0, &mut d));
        assert_eq!(d, [0xff]);
        assert_eq!(a.lock().unwrap().writes, vec![(3, vec![0x83])]);
        assert_eq!(b.lock().unwrap().writes, vec![(0, vec![1])]);
    }

    #[test]
    fn rejects_overlap_and_empty() {
        let mut bus = Bus::new();
        let d = || Arc::new(Mutex::new(Recorder::default())) as SharedDevice;
        bus.insert(d(), 0x100, 0x10).unwrap();
        assert!(bus.insert(d(), 0x10f, 1).is_err());
        assert!(bus.insert(d(), 0xf8, 9).is_err());
        assert!(bus.insert(d(), 0xf8, 8).is_ok());
        assert!(bus.insert(d(), 0x110, 1).is_ok());
        assert_eq!(bus.insert(d(), 0x200, 0), Err(BusError::Empty(0x200)));
        assert!(bus.insert(d(), u64::MAX, 2).is_err());
    }
}
