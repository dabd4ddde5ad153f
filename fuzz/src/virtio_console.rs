//! Fuzz target `virtio_console`: a guest driving a multiport virtio-console through its virtio-mmio registers
//! and its own memory.
//!
//! The device starts as a well-behaved driver leaves it (features negotiated, every queue
//! placed in guest memory, DRIVER_OK), so the fuzzer spends its time on what a hostile guest
//! controls afterwards: register writes and reads (including resets and queue reconfiguration)
//! and arbitrary bytes written anywhere in guest memory (descriptor tables, rings, control
//! messages, buffers), with the device serviced in between. Nothing may panic; a malformed
//! chain may only mark the device as needing a reset.

use std::sync::Arc;

use chardev::ringbuf::RingbufBackend;
use chardev::spec::RingbufSpec;
use devices::bus::BusDevice;
use devices::virtio::console::{PortConfig, VirtioConsole};
use devices::virtio::mmio::*;
use devices::virtio::{
    VirtioMmio, STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK,
};
use devices::IrqLine;
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// Guest memory size: small, so random addresses often land inside it.
const MEM_SIZE: u64 = 0x10_0000;
/// Where the driver puts queue `i`'s rings: table, avail and used 0x800 apart.
const RING_BASE: u64 = 0x1_0000;
const RING_STRIDE: u64 = 0x2000;
/// Queue size the driver picks.
const QUEUE_SIZE: u32 = 16;
/// Ports on the device (queues: 2 per port plus the control pair).
const PORTS: u32 = 2;
/// Size of each port's ring buffer backend.
const RING: usize = 4096;

struct NoIrq;
impl IrqLine for NoIrq {
    fn set_level(&self, _high: bool) {}
}

fn w32(dev: &mut VirtioMmio<VirtioConsole>, off: u64, v: u32) {
    dev.write(off, &v.to_le_bytes());
}

fn start(dev: &mut VirtioMmio<VirtioConsole>) {
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
    for q in 0..(2 + 2 * PORTS) {
        let base = RING_BASE + u64::from(q) * RING_STRIDE;
        w32(dev, REG_QUEUE_SEL, q);
        w32(dev, REG_QUEUE_NUM, QUEUE_SIZE);
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

/// Runs one input (see the module docs).
pub fn virtio_console(data: &[u8]) {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
        .expect("guest memory");
    let mut console = VirtioConsole::new(PORTS + 1).expect("console");
    for i in 0..PORTS {
        let config = PortConfig {
            id: format!("p{i}"),
            name: Some(format!("org.fuzz.{i}")),
            console: i == 0,
            nr: None,
            chardev: format!("c{i}"),
        };
        let backend = RingbufBackend::new(&RingbufSpec { size: RING });
        console.add_port(config, Box::new(backend)).expect("port");
    }
    let mut dev = VirtioMmio::new(console, mem.clone(), Arc::new(NoIrq)).expect("transport");
    start(&mut dev);

    // Operations: an opcode byte, then its operands.
    let mut rest = data;
    while let Some((&op, tail)) = rest.split_first() {
        rest = tail;
        match op % 5 {
            // Write guest memory: address (3 bytes), length (1 byte), bytes.
            0 | 1 => {
                let Some(left) = crate::guest_ops::write_memory(&mem, MEM_SIZE, rest) else {
                    break;
                };
                rest = left;
            }
            // Register write: access (2 bytes), value (4 bytes).
            2 => {
                let Some(left) = crate::guest_ops::write_register(&mut dev, op, rest) else {
                    break;
                };
                rest = left;
            }
            // Register read: access (2 bytes).
            3 => {
                let Some(left) = crate::guest_ops::read_register(&mut dev, op, rest) else {
                    break;
                };
                rest = left;
            }
            // Let the device work (as the event loop does after a notification).
            _ => {
                if op & 0x80 != 0 {
                    start(&mut dev);
                }
                dev.kick();
                dev.service();
            }
        }
    }
    dev.service();
}
