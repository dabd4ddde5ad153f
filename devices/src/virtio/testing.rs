//! Test helpers: real guest memory and a guest-side virtqueue driver that builds descriptor
//! chains and rings by hand (the recording backend is `crate::fake_backend`).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::mmio::*;
use super::queue::{RawDescriptor, DESCRIPTOR_SIZE, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use super::{
    VirtioDevice, VirtioMmio, STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK,
    STATUS_FEATURES_OK, STATUS_NEEDS_RESET,
};
use crate::bus::BusDevice;
use crate::serial::testing::RecordingIrq;

/// Size of the test guest's memory.
pub(crate) const MEM_SIZE: u64 = 0x40_0000;
/// Where the rings go.
const RING_BASE: u64 = 0x1_0000;
/// Bytes of ring space per queue: table at +0, avail at +0x800, used at +0x1000.
const RING_STRIDE: u64 = 0x2000;
/// Where buffers go.
const BUF_BASE: u64 = 0x10_0000;

pub(crate) use crate::fake_backend::{FakeBackend, FakeState};

/// Guest memory from 0.
pub(crate) fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
        .expect("guest memory")
}

/// The guest's view of one virtqueue.
pub(crate) struct DriverQueue {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    free: VecDeque<u16>,
    avail_idx: u16,
    last_used: u16,
    /// Descriptors (index, address, length) of each chain in flight, by head.
    chains: HashMap<u16, Vec<(u16, u64, u32)>>,
}

impl DriverQueue {
    /// Descriptors not in flight.
    pub(crate) fn free(&self) -> usize {
        self.free.len()
    }
}

/// A guest driver for a device on the MMIO transport, programming registers through
/// `BusDevice` and rings through guest memory.
pub(crate) struct Driver<D: VirtioDevice> {
    pub dev: VirtioMmio<D>,
    pub mem: GuestMemoryMmap,
    pub irq: Arc<RecordingIrq>,
    pub queues: HashMap<u16, DriverQueue>,
    next_buf: u64,
    /// The event loop's poller, once the device's backends are attached to one.
    poller: Option<chardev::Poller>,
}

impl<D: VirtioDevice> Driver<D> {
    pub(crate) fn new(device: D) -> Self {
        let mem = guest_memory();
        let irq = Arc::new(RecordingIrq::default());
        let dev = VirtioMmio::new(device, mem.clone(), irq.clone()).expect("transport");
        Driver {
            dev,
            mem,
            irq,
            queues: HashMap::new(),
            next_buf: BUF_BASE,
            poller: None,
        }
    }

    /// Attach the device's backends to a poller of the driver's, whose ready fds `run`
    /// hands to the device as the event loop does.
    pub(crate) fn attach_poller(&mut self) {
        let poller = chardev::Poller::new().expect("epoll");
        self.dev.attach(chardev::OwnerGroup::new(&poller, 0));
        self.poller = Some(poller);
    }

    pub(crate) fn read32(&mut self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.dev.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    pub(crate) fn write32(&mut self, offset: u64, value: u32) {
        self.dev.write(offset, &value.to_le_bytes());
    }

    pub(crate) fn status(&mut self) -> u32 {
        self.read32(REG_STATUS)
    }

    pub(crate) fn needs_reset(&mut self) -> bool {
        self.status() & STATUS_NEEDS_RESET != 0
    }

    /// Reset, negotiate `features`, set up `queues` (index, size), DRIVER_OK.
    pub(crate) fn start(&mut self, features: u64, queues: &[(u16, u16)]) {
        self.write32(REG_STATUS, 0);
        self.queues.clear();
        self.write32(REG_STATUS, STATUS_ACKNOWLEDGE);
        self.write32(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        for sel in 0..2u32 {
            self.write32(REG_DRIVER_FEATURES_SEL, sel);
            self.write32(REG_DRIVER_FEATURES, (features >> (32 * sel)) as u32);
        }
        let ok = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        self.write32(REG_STATUS, ok);
        assert_eq!(self.status(), ok, "features refused");
        for &(index, size) in queues {
            self.setup_queue(index, size);
        }
        self.write32(REG_STATUS, ok | STATUS_DRIVER_OK);
        assert_eq!(self.status(), ok | STATUS_DRIVER_OK);
    }

    pub(crate) fn setup_queue(&mut self, index: u16, size: u16) {
        let base = RING_BASE + u64::from(index) * RING_STRIDE;
        let q = DriverQueue {
            size,
            desc: base,
            avail: base + 0x800,
            used: base + 0x1000,
            free: (0..size).collect(),
            avail_idx: 0,
            last_used: 0,
            chains: HashMap::new(),
        };
        // Clean rings.
        self.mem
            .write_slice(&vec![0u8; RING_STRIDE as usize], GuestAddress(base))
            .expect("ring memory");
        self.write32(REG_QUEUE_SEL, u32::from(index));
        self.write32(REG_QUEUE_NUM, u32::from(size));
        for (lo, addr) in [
            (REG_QUEUE_DESC_LOW, q.desc),
            (REG_QUEUE_DRIVER_LOW, q.avail),
            (REG_QUEUE_DEVICE_LOW, q.used),
        ] {
            self.write32(lo, addr as u32);
            self.write32(lo + 4, (addr >> 32) as u32);
        }
        self.write32(REG_QUEUE_READY, 1);
        assert_eq!(self.read32(REG_QUEUE_READY), 1, "queue {index} refused");
        self.queues.insert(index, q);
    }

    /// Guest memory for a buffer of `len` bytes.
    pub(crate) fn alloc(&mut self, len: u32) -> u64 {
        let addr = self.next_buf;
        self.next_buf = (self.next_buf + u64::from(len.max(1)) + 15) & !15;
        assert!(self.next_buf < MEM_SIZE, "test guest out of memory");
        addr
    }

    /// Write descriptor `index` of `queue` as given (for malformed chains).
    pub(crate) fn put_desc(&mut self, queue: u16, index: u16, d: RawDescriptor) {
        let q = &self.queues[&queue];
        let addr = q.desc + u64::from(index) * DESCRIPTOR_SIZE;
        self.mem
            .write_slice(&d.to_bytes(), GuestAddress(addr))
            .expect("descriptor");
    }

    /// Publish `head` in the available ring (without a notification).
    pub(crate) fn publish(&mut self, queue: u16, head: u16) {
        let q = self.queues.get_mut(&queue).expect("queue set up");
        let slot = q.avail + 4 + u64::from(q.avail_idx % q.size) * 2;
        self.mem
            .write_obj(head.to_le(), GuestAddress(slot))
            .expect("avail ring");
        q.avail_idx = q.avail_idx.wrapping_add(1);
        let idx = q.avail_idx;
        let avail = q.avail;
        self.mem
            .write_obj(idx.to_le(), GuestAddress(avail + 2))
            .expect("avail idx");
    }

    /// Set the avail index directly (for a bogus one).
    pub(crate) fn set_avail_idx(&mut self, queue: u16, idx: u16) {
        let q = self.queues.get_mut(&queue).expect("queue set up");
        q.avail_idx = idx;
        let avail = q.avail;
        self.mem
            .write_obj(idx.to_le(), GuestAddress(avail + 2))
            .expect("avail idx");
    }

    /// Build a chain of the given (address, length, device-writable) buffers from free
    /// descriptors and publish it.
    pub(crate) fn add_chain(&mut self, queue: u16, bufs: &[(u64, u32, bool)]) -> u16 {
        let q = self.queues.get_mut(&queue).expect("queue set up");
        assert!(
            q.free.len() >= bufs.len(),
            "queue {queue} has no free descriptors"
        );
        let indices: Vec<u16> = (0..bufs.len()).filter_map(|_| q.free.pop_front()).collect();
        let head = indices[0];
        q.chains.insert(
            head,
            indices
                .iter()
                .zip(bufs)
                .map(|(&i, &(a, l, _))| (i, a, l))
                .collect(),
        );
        for (i, &(addr, len, writable)) in bufs.iter().enumerate() {
            let mut flags = if writable { VRING_DESC_F_WRITE } else { 0 };
            let mut next = 0;
            if let Some(&n) = indices.get(i + 1) {
                flags |= VRING_DESC_F_NEXT;
                next = n;
            }
            self.put_desc(
                queue,
                indices[i],
                RawDescriptor {
                    addr,
                    len,
                    flags,
                    next,
                },
            );
        }
        self.publish(queue, head);
        head
    }

    /// Post `data` for the device to read.
    pub(crate) fn post_out(&mut self, queue: u16, data: &[u8]) -> u16 {
        let addr = self.alloc(data.len() as u32);
        self.mem
            .write_slice(data, GuestAddress(addr))
            .expect("buffer");
        self.add_chain(queue, &[(addr, data.len() as u32, false)])
    }

    /// Post a buffer of `len` bytes for the device to fill.
    pub(crate) fn post_in(&mut self, queue: u16, len: u32) -> u16 {
        let addr = self.alloc(len);
        self.add_chain(queue, &[(addr, len, true)])
    }

    /// QueueNotify through the register (what KVM does through the ioeventfd).
    pub(crate) fn notify(&mut self, queue: u16) {
        self.write32(REG_QUEUE_NOTIFY, u32::from(queue));
    }

    /// Let the event loop run: every eventfd of the transport is consumed, the ready fds of
    /// the attached poller are handed over, then service.
    pub(crate) fn run(&mut self) {
        for fd in self.dev.event_fds() {
            self.dev.on_event_fd(fd);
        }
        if let Some(poller) = &self.poller {
            let mut ready = Vec::new();
            poller.wait(&mut ready, 256, 0).expect("epoll_wait");
            for ev in ready {
                let (_, part) = chardev::split_owner(ev.owner);
                self.dev.on_ready(part, ev.token, ev.readiness);
            }
        }
        self.dev.service();
    }

    /// New used entries: (head, len, the bytes the device wrote).
    pub(crate) fn take_used(&mut self, queue: u16) -> Vec<(u16, u32, Vec<u8>)> {
        let mem = self.mem.clone();
        let q = self.queues.get_mut(&queue).expect("queue set up");
        let used_idx: u16 = mem
            .read_obj::<u16>(GuestAddress(q.used + 2))
            .map(u16::from_le)
            .expect("used idx");
        let mut out = Vec::new();
        while q.last_used != used_idx {
            let elem = q.used + 4 + u64::from(q.last_used % q.size) * 8;
            let id: u32 = mem.read_obj(GuestAddress(elem)).expect("used elem");
            let len: u32 = mem.read_obj(GuestAddress(elem + 4)).expect("used elem");
            let head = id as u16;
            let mut data = Vec::new();
            if let Some(bufs) = q.chains.remove(&head) {
                let mut left = len as usize;
                for (index, addr, blen) in bufs {
                    q.free.push_back(index);
                    let n = left.min(blen as usize);
                    let mut b = vec![0u8; n];
                    mem.read_slice(&mut b, GuestAddress(addr)).expect("buffer");
                    data.extend_from_slice(&b);
                    left -= n;
                }
            }
            out.push((head, len, data));
            q.last_used = q.last_used.wrapping_add(1);
        }
        out
    }

    /// Read InterruptStatus and acknowledge all of it.
    pub(crate) fn ack_interrupt(&mut self) -> u32 {
        let status = self.read32(REG_INTERRUPT_STATUS);
        self.write32(REG_INTERRUPT_ACK, status);
        status
    }
}
