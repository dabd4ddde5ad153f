//! What a fuzzed guest does to a virtio-mmio device, shared by the device targets
//! (`virtio_console`, `vsock`): bring the device up as a well-behaved driver does, then write
//! its memory, write and read the transport's registers. Each operation takes its operands from
//! the front of the input and returns what is left, or `None` when the input is too short for
//! the operation (the target then stops).

use devices::bus::BusDevice;
use devices::virtio::mmio::*;
use devices::virtio::{
    VirtioDevice, VirtioMmio, STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
};
use devices::IrqLine;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Where the driver puts queue `i`'s rings: table, avail and used 0x800 apart.
pub const RING_BASE: u64 = 0x1_0000;
pub const RING_STRIDE: u64 = 0x2000;
/// Queue size the driver picks.
pub const QUEUE_SIZE: u16 = 16;

/// An interrupt line nobody listens to.
pub struct NoIrq;
impl IrqLine for NoIrq {
    fn set_level(&self, _high: bool) {}
}

/// A 32-bit register write.
pub fn w32<D: VirtioDevice>(dev: &mut VirtioMmio<D>, off: u64, v: u32) {
    dev.write(off, &v.to_le_bytes());
}

/// What a well-behaved driver does: reset, acknowledge, take every feature offered, place
/// `queues` queues of [`QUEUE_SIZE`] at [`RING_BASE`] + i * [`RING_STRIDE`], DRIVER_OK.
pub fn start<D: VirtioDevice>(dev: &mut VirtioMmio<D>, queues: u32) {
    w32(dev, REG_STATUS, 0);
    w32(dev, REG_STATUS, STATUS_ACKNOWLEDGE);
    w32(dev, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    for sel in 0..2u32 {
        w32(dev, REG_DEVICE_FEATURES_SEL, sel);
        let mut b = [0u8; 4];
        dev.read(REG_DEVICE_FEATURES, &mut b);
        w32(dev, REG_DRIVER_FEATURES_SEL, sel);
        w32(dev, REG_DRIVER_FEATURES, u32::from_le_bytes(b));
    }
    let ok = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
    w32(dev, REG_STATUS, ok);
    for q in 0..queues {
        let base = RING_BASE + u64::from(q) * RING_STRIDE;
        w32(dev, REG_QUEUE_SEL, q);
        w32(dev, REG_QUEUE_NUM, u32::from(QUEUE_SIZE));
        for (lo, addr) in [
            (REG_QUEUE_DESC_LOW, base),
            (REG_QUEUE_DRIVER_LOW, base + 0x800),
            (REG_QUEUE_DEVICE_LOW, base + 0x1000),
        ] {
            w32(dev, lo, addr as u32);
            w32(dev, lo + 4, (addr >> 32) as u32);
        }
        w32(dev, REG_QUEUE_READY, 1);
    }
    w32(dev, REG_STATUS, ok | STATUS_DRIVER_OK);
}

/// The register offset (within the slot's first 512 bytes) and access size an opcode and its
/// next two bytes select.
pub fn access(op: u8, rest: &[u8]) -> Option<(u64, usize)> {
    let off = rest.get(..2)?;
    let off = u64::from(u16::from_le_bytes([off[0], off[1]])) & 0x1ff;
    Some((off, [1usize, 2, 4, 8][usize::from(op >> 3) % 4]))
}

/// Write guest memory: address (3 bytes, wrapped into `mem_size`), length (1 byte), bytes.
pub fn write_memory<'a>(mem: &GuestMemoryMmap, mem_size: u64, rest: &'a [u8]) -> Option<&'a [u8]> {
    if rest.len() < 4 {
        return None;
    }
    let addr = u64::from(u32::from_le_bytes([rest[0], rest[1], rest[2], 0])) % mem_size;
    let len = usize::from(rest[3]).min(rest.len() - 4);
    let room = (mem_size - addr) as usize;
    let _ = mem.write_slice(&rest[4..4 + len.min(room)], GuestAddress(addr));
    Some(&rest[4 + len..])
}

/// A register write: access (2 bytes), value (4 bytes).
pub fn write_register<'a>(dev: &mut dyn BusDevice, op: u8, rest: &'a [u8]) -> Option<&'a [u8]> {
    let (off, size) = access(op, rest)?;
    let value = rest.get(2..6)?;
    let mut v = [0u8; 8];
    v[..4].copy_from_slice(value);
    dev.write(off, &v[..size]);
    Some(&rest[6..])
}

/// A register read: access (2 bytes).
pub fn read_register<'a>(dev: &mut dyn BusDevice, op: u8, rest: &'a [u8]) -> Option<&'a [u8]> {
    let (off, size) = access(op, rest)?;
    let mut b = [0u8; 8];
    dev.read(off, &mut b[..size]);
    Some(&rest[2..])
}
