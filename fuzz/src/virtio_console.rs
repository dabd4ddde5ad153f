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
use devices::virtio::console::{PortConfig, VirtioConsole};
use devices::virtio::VirtioMmio;
use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::guest_ops::{start, NoIrq};

/// Guest memory size: small, so random addresses often land inside it.
const MEM_SIZE: u64 = 0x10_0000;
/// Ports on the device.
const PORTS: u32 = 2;
/// Its queues: a pair per port plus the control pair.
const QUEUES: u32 = 2 + 2 * PORTS;
/// Size of each port's ring buffer backend.
const RING: usize = 4096;

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
    start(&mut dev, QUEUES);

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
                    start(&mut dev, QUEUES);
                }
                dev.kick();
                dev.service();
            }
        }
    }
    dev.service();
}
