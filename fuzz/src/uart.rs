//! Fuzz target `uart`: a guest programming the 16550A UART register by register while the host side
//! feeds it input, breaks and modem-line changes, and time passes on a fake clock.
//!
//! Nothing may panic, and the UART never takes more input than it was offered.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use chardev::ModemStatus;
use devices::serial::{Serial, SerialConfig};
use devices::{Clock, IrqLine};

struct NoIrq;
impl IrqLine for NoIrq {
    fn set_level(&self, _high: bool) {}
}

#[derive(Default)]
struct FakeClock(AtomicU64);
impl Clock for FakeClock {
    fn now_ns(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Runs one input (see the module docs).
pub fn uart(data: &[u8]) {
    let Some((&flags, mut rest)) = data.split_first() else {
        return;
    };
    let clock = Arc::new(FakeClock::default());
    let config = SerialConfig {
        baud_base: if flags & 2 != 0 { 1 } else { 115_200 },
        pacing: flags & 1 != 0,
    };
    let mut uart = Serial::new(config, Arc::new(NoIrq), clock.clone());
    while let Some((&op, tail)) = rest.split_first() {
        rest = tail;
        let arg = rest.first().copied().unwrap_or(0);
        match op % 8 {
            0 => {
                uart.write(op >> 3 & 7, arg);
                rest = rest.get(1..).unwrap_or_default();
            }
            1 => {
                uart.read(op >> 3 & 7);
            }
            2 => {
                if rest.is_empty() {
                    break;
                }
                let n = usize::from(arg).min(rest.len() - 1);
                uart.rx_room();
                let taken = uart.receive(&rest[1..1 + n]);
                assert!(taken <= n, "took {taken} of {n} bytes");
                rest = &rest[1 + n..];
            }
            3 => {
                let limit = usize::from(arg);
                uart.drain_tx(&mut |bytes: &[u8]| bytes.len().min(limit));
                rest = rest.get(1..).unwrap_or_default();
            }
            4 => {
                // Time passes: up to ~16 ms in steps of 64 us.
                clock
                    .0
                    .fetch_add(u64::from(arg) * 64_000, Ordering::Relaxed);
                uart.tick();
                uart.next_deadline_ns();
                rest = rest.get(1..).unwrap_or_default();
            }
            5 => uart.receive_break(),
            6 => {
                uart.set_modem_inputs(ModemStatus {
                    cts: arg & 1 != 0,
                    dsr: arg & 2 != 0,
                    ri: arg & 4 != 0,
                    dcd: arg & 8 != 0,
                });
                uart.set_input_waiting(arg & 16 != 0);
                rest = rest.get(1..).unwrap_or_default();
            }
            _ => {
                uart.arm_deadline();
                uart.take_kick();
                if op & 0x80 != 0 {
                    uart.reset();
                }
            }
        }
    }
}
