//! What a fuzzed guest does to a virtio-mmio device, shared by the device targets
//! (`virtio_console`, `vsock`): write its memory, write and read the transport's registers. Each takes its
//! operands from the front of the input and returns what is left, or `None` when the input is
//! too short for the operation (the target then stops).

use devices::bus::BusDevice;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

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
