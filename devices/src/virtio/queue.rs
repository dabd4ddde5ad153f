//! Checked access to split virtqueues.
//!
//! `virtio-queue`'s [`Queue`] keeps the ring positions and writes the used ring; its chain
//! iterator, though, ends a chain silently on a bad descriptor. A device must tell "end of
//! chain" from "the guest wrote garbage", so chains are walked here, with every descriptor
//! checked: index inside the table, no loop, no more descriptors than allowed, no zero length,
//! every buffer inside guest memory, the direction the queue expects, no indirect table (the
//! feature is never offered), and a total under 4 GiB.
//!
//! Nothing here panics on guest data, and nothing here keeps a reference into guest memory:
//! an [`Element`] is a list of (address, length) pairs that were valid when it was popped.

use std::sync::atomic::Ordering;

use thiserror::Error;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Size of one split-ring descriptor in the table.
pub const DESCRIPTOR_SIZE: u64 = 16;
/// Descriptor flag: the chain continues at `next`.
pub const VRING_DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the buffer is device-writable.
pub const VRING_DESC_F_WRITE: u16 = 2;
/// Descriptor flag: the buffer is an indirect descriptor table.
pub const VRING_DESC_F_INDIRECT: u16 = 4;

/// Which way the data in a queue's buffers flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// The device reads (a transmit queue): every buffer must be device-readable.
    DeviceReads,
    /// The device writes (a receive queue): every buffer must be device-writable.
    DeviceWrites,
}

/// What a guest got wrong in a queue.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ChainError {
    /// The available index ran more than a queue's worth ahead of the device.
    #[error("available ring index is more than a queue ahead")]
    AvailIndex,
    /// A descriptor index past the end of the table.
    #[error("descriptor index {index} outside a table of {size}")]
    Index {
        /// The index the guest gave.
        index: u16,
        /// The queue size.
        size: u16,
    },
    /// A chain that comes back to a descriptor it already used.
    #[error("descriptor chain loops back to descriptor {0}")]
    Loop(u16),
    /// A chain with more descriptors than allowed.
    #[error("descriptor chain longer than {0} descriptors")]
    TooLong(usize),
    /// A chain whose buffers add up to 4 GiB or more.
    #[error("descriptor chain of 4 GiB or more")]
    TooManyBytes,
    /// A descriptor with length zero.
    #[error("descriptor {0} has zero length")]
    ZeroLength(u16),
    /// A buffer that is not entirely inside guest memory.
    #[error("buffer {addr:#x}+{len:#x} outside guest memory")]
    OutOfRange {
        /// Guest physical address.
        addr: u64,
        /// Length.
        len: u32,
    },
    /// A buffer of the wrong direction for the queue.
    #[error("device-{found} buffer on a queue the device {expected}")]
    Direction {
        /// "writable" or "readable".
        found: &'static str,
        /// "reads" or "writes".
        expected: &'static str,
    },
    /// An indirect descriptor although the feature was not offered.
    #[error("indirect descriptor without VIRTIO_RING_F_INDIRECT_DESC")]
    Indirect,
    /// Guest memory behind a ring or buffer could not be accessed.
    #[error("guest memory access failed")]
    Memory,
}

/// One guest buffer of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buffer {
    /// Guest physical address.
    pub addr: GuestAddress,
    /// Length in bytes (never zero).
    pub len: u32,
}

/// A popped, checked descriptor chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element {
    /// The head descriptor index, to hand back in the used ring.
    pub head: u16,
    /// The buffers, in chain order.
    pub bufs: Vec<Buffer>,
    /// Sum of the buffer lengths.
    pub len: u32,
}

impl Element {
    /// Copy `data` into the element's buffers, in order. Returns how much fitted.
    pub fn write_from(&self, mem: &GuestMemoryMmap, data: &[u8]) -> Result<usize, ChainError> {
        let mut done = 0usize;
        for buf in &self.bufs {
            if done == data.len() {
                break;
            }
            let n = (buf.len as usize).min(data.len() - done);
            mem.write_slice(&data[done..done + n], buf.addr)
                .map_err(|_| ChainError::Memory)?;
            done += n;
        }
        Ok(done)
    }

    /// Copy the start of the element's buffers into `out`. Returns how much was copied.
    pub fn read_into(&self, mem: &GuestMemoryMmap, out: &mut [u8]) -> Result<usize, ChainError> {
        let mut done = 0usize;
        for buf in &self.bufs {
            if done == out.len() {
                break;
            }
            let n = (buf.len as usize).min(out.len() - done);
            mem.read_slice(&mut out[done..done + n], buf.addr)
                .map_err(|_| ChainError::Memory)?;
            done += n;
        }
        Ok(done)
    }
}

/// Whether the driver has made buffers available that the device has not popped yet.
pub fn has_available(queue: &Queue, mem: &GuestMemoryMmap) -> Result<bool, ChainError> {
    if !queue.ready() {
        return Ok(false);
    }
    let avail = queue
        .avail_idx(mem, Ordering::Acquire)
        .map_err(|_| ChainError::Memory)?;
    let pending = avail.0.wrapping_sub(queue.next_avail());
    if pending > queue.size() {
        return Err(ChainError::AvailIndex);
    }
    Ok(pending != 0)
}

/// Pop the next available chain and check it. `Ok(None)` when the driver has made nothing
/// available (or the queue is not ready). At most `max_descriptors` descriptors (further
/// bounded by the queue size) make a chain.
pub fn pop(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    direction: Direction,
    max_descriptors: usize,
) -> Result<Option<Element>, ChainError> {
    if !has_available(queue, mem)? {
        return Ok(None);
    }
    let head = queue
        .pop_descriptor_chain(mem)
        .map(|chain| chain.head_index())
        .ok_or(ChainError::Memory)?;
    let limit = max_descriptors.min(usize::from(queue.size()));
    let (bufs, len) = walk_chain(
        mem,
        GuestAddress(queue.desc_table()),
        queue.size(),
        head,
        direction,
        limit,
    )?;
    Ok(Some(Element { head, bufs, len }))
}

/// Give back the element popped last, as if it had not been popped (nothing to put in it).
pub fn unpop(queue: &mut Queue) {
    queue.set_next_avail(queue.next_avail().wrapping_sub(1));
}

/// Put `head` in the used ring with `len` bytes written by the device.
pub fn complete(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    head: u16,
    len: u32,
) -> Result<(), ChainError> {
    queue
        .add_used(mem, head, len)
        .map_err(|_| ChainError::Memory)
}

/// Walk the chain starting at `head` in the descriptor table at `table` of `size` entries.
/// Returns its buffers and their total length.
pub fn walk_chain(
    mem: &GuestMemoryMmap,
    table: GuestAddress,
    size: u16,
    head: u16,
    direction: Direction,
    max_descriptors: usize,
) -> Result<(Vec<Buffer>, u32), ChainError> {
    let mut visited = vec![false; usize::from(size)];
    let mut bufs = Vec::new();
    let mut total: u32 = 0;
    let mut index = head;
    loop {
        let seen = visited
            .get_mut(usize::from(index))
            .ok_or(ChainError::Index { index, size })?;
        if *seen {
            return Err(ChainError::Loop(index));
        }
        *seen = true;
        if bufs.len() >= max_descriptors {
            return Err(ChainError::TooLong(max_descriptors));
        }
        let desc = read_descriptor(mem, table, index)?;
        if desc.flags & VRING_DESC_F_INDIRECT != 0 {
            return Err(ChainError::Indirect);
        }
        if desc.len == 0 {
            return Err(ChainError::ZeroLength(index));
        }
        let writable = desc.flags & VRING_DESC_F_WRITE != 0;
        match (direction, writable) {
            (Direction::DeviceReads, true) => {
                return Err(ChainError::Direction {
                    found: "writable",
                    expected: "reads",
                })
            }
            (Direction::DeviceWrites, false) => {
                return Err(ChainError::Direction {
                    found: "readable",
                    expected: "writes",
                })
            }
            _ => {}
        }
        let addr = GuestAddress(desc.addr);
        let in_range = desc.addr.checked_add(u64::from(desc.len)).is_some()
            && GuestMemoryBackend::check_range(mem, addr, desc.len as usize);
        if !in_range {
            return Err(ChainError::OutOfRange {
                addr: desc.addr,
                len: desc.len,
            });
        }
        total = total
            .checked_add(desc.len)
            .ok_or(ChainError::TooManyBytes)?;
        bufs.push(Buffer {
            addr,
            len: desc.len,
        });
        if desc.flags & VRING_DESC_F_NEXT == 0 {
            return Ok((bufs, total));
        }
        index = desc.next;
    }
}

/// A split-ring descriptor as the guest wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawDescriptor {
    /// Buffer address.
    pub addr: u64,
    /// Buffer length.
    pub len: u32,
    /// `VRING_DESC_F_*`.
    pub flags: u16,
    /// The next descriptor when `VRING_DESC_F_NEXT` is set.
    pub next: u16,
}

impl RawDescriptor {
    /// Decode the 16 little-endian bytes of a descriptor.
    pub fn from_bytes(b: &[u8; DESCRIPTOR_SIZE as usize]) -> Self {
        RawDescriptor {
            addr: u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
            len: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            flags: u16::from_le_bytes([b[12], b[13]]),
            next: u16::from_le_bytes([b[14], b[15]]),
        }
    }

    /// Encode as the 16 little-endian bytes of a descriptor.
    pub fn to_bytes(self) -> [u8; DESCRIPTOR_SIZE as usize] {
        let mut b = [0u8; DESCRIPTOR_SIZE as usize];
        b[0..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..14].copy_from_slice(&self.flags.to_le_bytes());
        b[14..16].copy_from_slice(&self.next.to_le_bytes());
        b
    }
}

fn read_descriptor(
    mem: &GuestMemoryMmap,
    table: GuestAddress,
    index: u16,
) -> Result<RawDescriptor, ChainError> {
    let addr = table
        .checked_add(u64::from(index) * DESCRIPTOR_SIZE)
        .ok_or(ChainError::Memory)?;
    let mut raw = [0u8; DESCRIPTOR_SIZE as usize];
    mem.read_slice(&mut raw, addr)
        .map_err(|_| ChainError::Memory)?;
    Ok(RawDescriptor::from_bytes(&raw))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::testing::guest_memory;

    const TABLE: u64 = 0x1000;

    fn put(mem: &GuestMemoryMmap, index: u16, d: RawDescriptor) {
        mem.write_slice(
            &d.to_bytes(),
            GuestAddress(TABLE + u64::from(index) * DESCRIPTOR_SIZE),
        )
        .unwrap();
    }

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor {
            addr,
            len,
            flags,
            next,
        }
    }

    fn walk(
        mem: &GuestMemoryMmap,
        head: u16,
        dir: Direction,
        max: usize,
    ) -> Result<u32, ChainError> {
        walk_chain(mem, GuestAddress(TABLE), 8, head, dir, max).map(|(_, len)| len)
    }

    #[test]
    fn good_chain() {
        let mem = guest_memory();
        put(&mem, 0, desc(0x8000, 10, VRING_DESC_F_NEXT, 3));
        put(&mem, 3, desc(0x9000, 20, 0, 0));
        let (bufs, len) =
            walk_chain(&mem, GuestAddress(TABLE), 8, 0, Direction::DeviceReads, 8).unwrap();
        assert_eq!(len, 30);
        assert_eq!(bufs.len(), 2);
        assert_eq!(bufs[1].addr, GuestAddress(0x9000));
    }

    #[test]
    fn malformed_chains() {
        let mem = guest_memory();
        let read = Direction::DeviceReads;
        // Loop 0 -> 1 -> 0.
        put(&mem, 0, desc(0x8000, 1, VRING_DESC_F_NEXT, 1));
        put(&mem, 1, desc(0x8000, 1, VRING_DESC_F_NEXT, 0));
        assert_eq!(walk(&mem, 0, read, 8), Err(ChainError::Loop(0)));
        // Self loop.
        put(&mem, 2, desc(0x8000, 1, VRING_DESC_F_NEXT, 2));
        assert_eq!(walk(&mem, 2, read, 8), Err(ChainError::Loop(2)));
        // Next out of the table, head out of the table.
        put(&mem, 3, desc(0x8000, 1, VRING_DESC_F_NEXT, 8));
        assert_eq!(
            walk(&mem, 3, read, 8),
            Err(ChainError::Index { index: 8, size: 8 })
        );
        assert_eq!(
            walk(&mem, 100, read, 8),
            Err(ChainError::Index {
                index: 100,
                size: 8
            })
        );
        // Too long for the limit.
        put(&mem, 4, desc(0x8000, 1, VRING_DESC_F_NEXT, 5));
        put(&mem, 5, desc(0x8000, 1, VRING_DESC_F_NEXT, 6));
        put(&mem, 6, desc(0x8000, 1, 0, 0));
        assert_eq!(walk(&mem, 4, read, 2), Err(ChainError::TooLong(2)));
        assert_eq!(walk(&mem, 4, read, 3), Ok(3));
        // Zero length.
        put(&mem, 7, desc(0x8000, 0, 0, 0));
        assert_eq!(walk(&mem, 7, read, 8), Err(ChainError::ZeroLength(7)));
        // Out of range, and an address that wraps.
        put(&mem, 7, desc(crate::virtio::testing::MEM_SIZE - 4, 8, 0, 0));
        assert!(matches!(
            walk(&mem, 7, read, 8),
            Err(ChainError::OutOfRange { .. })
        ));
        put(&mem, 7, desc(u64::MAX - 1, 8, 0, 0));
        assert!(matches!(
            walk(&mem, 7, read, 8),
            Err(ChainError::OutOfRange { .. })
        ));
        // Wrong direction both ways.
        put(&mem, 7, desc(0x8000, 4, VRING_DESC_F_WRITE, 0));
        assert!(matches!(
            walk(&mem, 7, read, 8),
            Err(ChainError::Direction { .. })
        ));
        put(&mem, 7, desc(0x8000, 4, 0, 0));
        assert!(matches!(
            walk(&mem, 7, Direction::DeviceWrites, 8),
            Err(ChainError::Direction { .. })
        ));
        // Indirect.
        put(&mem, 7, desc(0x8000, 16, VRING_DESC_F_INDIRECT, 0));
        assert_eq!(walk(&mem, 7, read, 8), Err(ChainError::Indirect));
        // 4 GiB in total.
        put(&mem, 0, desc(0x8000, u32::MAX, VRING_DESC_F_NEXT, 1));
        put(&mem, 1, desc(0x8000, 1, 0, 0));
        let big = walk(&mem, 0, read, 8);
        assert!(matches!(
            big,
            Err(ChainError::OutOfRange { .. }) | Err(ChainError::TooManyBytes)
        ));
        // A table outside guest memory.
        assert_eq!(
            walk_chain(&mem, GuestAddress(u64::MAX - 8), 8, 0, read, 8),
            Err(ChainError::Memory)
        );
    }

    #[test]
    fn descriptor_round_trip() {
        let d = desc(0x1122_3344_5566_7788, 0x99aa_bbcc, 0xddee, 0xff00);
        assert_eq!(RawDescriptor::from_bytes(&d.to_bytes()), d);
    }
}
