//! The register model of an ISA 16550A UART, with the real part's baud-rate timing.
//!
//! [`Serial`] is pure logic: it owns no file descriptor, starts no thread and arms no timer.
//! Time comes from an injected [`Clock`] and is applied lazily: every access first brings the
//! model up to `clock.now_ns()`, so a guest that polls LSR needs no timer at all. The event
//! loop asks [`Serial::next_deadline_ns`] for the one instant at which something must happen
//! without guest action (output to collect, an interrupt to raise, an input slot to open) and
//! calls [`Serial::tick`] then.
//!
//! Timing follows the 16550A: one character occupies the line for
//! `frame_bits / (baud_base / divisor)` seconds, where `frame_bits` counts the start bit, 5 to
//! 8 data bits, the parity bit and 1 or 2 stop bits (the 1.5 stop bits of a 5-bit frame count
//! as 2, as QEMU counts them). A divisor of 0 runs at [`ZERO_DIVISOR_BAUD`]. The transmitter
//! shifts one character per character time; THRE sets when the last byte of the holding
//! register/FIFO has moved into the shift register and TEMT when the shift register is empty
//! too. The hand-over from the holding register to an idle shift register is modelled as
//! instantaneous (the real part takes under one bit time), so a single byte written to an idle
//! transmitter leaves THRE set and TEMT clear for one character time. In FIFO mode the THRE
//! interrupt is delayed as the data sheet says: when the FIFO has not held two bytes at once
//! since it was last empty, the interrupt comes one character time less the last stop bit
//! after THRE (the first after FIFO mode is switched), so a driver's burst written to an idle
//! transmitter does not interrupt itself after its first byte.
//!
//! Received characters complete in line slots one character time apart, and never before
//! their slot. Input is pulled, so characters enter the RX FIFO only when the event loop
//! offers them; when it comes back late while input was waiting (the far end had data and the
//! FIFO had room), the slots it missed are made up: [`Serial::rx_room`] allows one character
//! per elapsed slot (bounded by FIFO room and [`RX_MAX_BACKLOG`]) and each is given its past
//! slot as arrival time, so the long-run rate is the line rate whatever the wake-up latency.
//! Slots do not accrue while the FIFO is full or after the far end was found without input:
//! the first character after such an idle line arrives now. The character-timeout interrupt
//! fires [`CTI_CHAR_TIMES`] character times after the later of the last arrival and the last
//! RBR read. With [`SerialConfig::pacing`] off every character time is zero: output is
//! collectable at once and input is limited only by FIFO room.
//!
//! Output is never dropped by the model: finished characters wait in a holding area of up to
//! [`TX_HOLD_LIMIT`] bytes until the sink of [`Serial::drain_tx`] takes them, so a late
//! collection does not hold up the line; the event loop is asked to collect after
//! [`TX_COLLECT_BATCH`] characters, when the transmitter goes idle, or when THRE rises with its
//! interrupt enabled. A sink that refuses stalls the transmitter (THRE and TEMT stay clear)
//! until it accepts. The only bytes lost are those the guest itself discards: THR writes into
//! a full FIFO, and FIFO resets.
//!
//! This module must not do I/O, block, sleep, read the host clock directly, or panic on
//! anything the guest writes.

use std::collections::VecDeque;
use std::sync::Arc;

use chardev::{LineParams, ModemStatus};

use crate::{Clock, IrqLine};

// Register offsets (the chip decodes address lines A0..A2 only).

/// Receiver buffer (read) / transmitter holding register (write), DLAB = 0.
pub const REG_RBR_THR: u8 = 0;
/// Divisor latch, low byte, DLAB = 1.
pub const REG_DLL: u8 = 0;
/// Interrupt enable register, DLAB = 0.
pub const REG_IER: u8 = 1;
/// Divisor latch, high byte, DLAB = 1.
pub const REG_DLM: u8 = 1;
/// Interrupt identification (read) / FIFO control (write).
pub const REG_IIR_FCR: u8 = 2;
/// Line control register.
pub const REG_LCR: u8 = 3;
/// Modem control register.
pub const REG_MCR: u8 = 4;
/// Line status register.
pub const REG_LSR: u8 = 5;
/// Modem status register.
pub const REG_MSR: u8 = 6;
/// Scratch register.
pub const REG_SCR: u8 = 7;
/// Bytes of address space the UART occupies.
pub const REGISTER_SPAN: u8 = 8;
/// The address bits the chip decodes.
const OFFSET_MASK: u8 = REGISTER_SPAN - 1;

// IER bits.

/// Enable the received-data-available (and character-timeout) interrupt.
pub const IER_ERBFI: u8 = 0x01;
/// Enable the transmitter-holding-register-empty interrupt.
pub const IER_ETBEI: u8 = 0x02;
/// Enable the receiver-line-status interrupt.
pub const IER_ELSI: u8 = 0x04;
/// Enable the modem-status interrupt.
pub const IER_EDSSI: u8 = 0x08;
/// IER bits the 16550A implements.
pub const IER_MASK: u8 = 0x0f;

// IIR values.

/// No interrupt pending.
pub const IIR_NONE: u8 = 0x01;
/// Modem status changed (lowest priority).
pub const IIR_MSI: u8 = 0x00;
/// Transmitter holding register empty.
pub const IIR_THRI: u8 = 0x02;
/// Received data available (at or above the trigger level).
pub const IIR_RDI: u8 = 0x04;
/// Receiver line status: overrun, parity, framing error or break (highest priority).
pub const IIR_RLSI: u8 = 0x06;
/// Character timeout: data waiting in the RX FIFO and the line quiet.
pub const IIR_CTI: u8 = 0x0c;
/// IIR bits 6-7, set while the FIFOs are enabled.
pub const IIR_FIFO_ENABLED: u8 = 0xc0;
/// The interrupt identification bits of IIR.
pub const IIR_ID_MASK: u8 = 0x0f;

// FCR bits.

/// Enable both FIFOs.
pub const FCR_FIFO_ENABLE: u8 = 0x01;
/// Clear the RX FIFO.
pub const FCR_RX_RESET: u8 = 0x02;
/// Clear the TX FIFO.
pub const FCR_TX_RESET: u8 = 0x04;
/// DMA mode select (stored, without effect: there is no DMA here).
pub const FCR_DMA_MODE: u8 = 0x08;
/// RX trigger level field.
pub const FCR_TRIGGER_MASK: u8 = 0xc0;
/// Position of the RX trigger level field.
pub const FCR_TRIGGER_SHIFT: u8 = 6;
/// RX FIFO trigger levels selected by FCR bits 6-7.
pub const RX_TRIGGER_LEVELS: [usize; 4] = [1, 4, 8, 14];

// LCR bits.

/// Word length field: 0 → 5 bits ... 3 → 8 bits.
pub const LCR_WORD_LENGTH_MASK: u8 = 0x03;
/// Two stop bits (1.5 for a 5-bit word).
pub const LCR_TWO_STOP_BITS: u8 = 0x04;
/// Parity enable.
pub const LCR_PARITY_ENABLE: u8 = 0x08;
/// Even parity select.
pub const LCR_EVEN_PARITY: u8 = 0x10;
/// Stick parity.
pub const LCR_STICK_PARITY: u8 = 0x20;
/// Set break: hold the line in the spacing state.
pub const LCR_BREAK: u8 = 0x40;
/// Divisor latch access bit.
pub const LCR_DLAB: u8 = 0x80;

// MCR bits.

/// Data terminal ready.
pub const MCR_DTR: u8 = 0x01;
/// Request to send.
pub const MCR_RTS: u8 = 0x02;
/// User output 1.
pub const MCR_OUT1: u8 = 0x04;
/// User output 2; on a PC it gates the UART's interrupt onto the ISA IRQ line.
pub const MCR_OUT2: u8 = 0x08;
/// Local loopback.
pub const MCR_LOOP: u8 = 0x10;
/// MCR bits the 16550A implements.
pub const MCR_MASK: u8 = 0x1f;

// LSR bits.

/// Data ready: at least one character in the RX FIFO.
pub const LSR_DR: u8 = 0x01;
/// Overrun error.
pub const LSR_OE: u8 = 0x02;
/// Parity error (never produced here: the line is virtual).
pub const LSR_PE: u8 = 0x04;
/// Framing error (never produced here).
pub const LSR_FE: u8 = 0x08;
/// Break interrupt.
pub const LSR_BI: u8 = 0x10;
/// Transmitter holding register (FIFO) empty.
pub const LSR_THRE: u8 = 0x20;
/// Transmitter empty: holding register and shift register both empty.
pub const LSR_TEMT: u8 = 0x40;
/// At least one character in the RX FIFO carries an error (FIFO mode).
pub const LSR_RX_FIFO_ERROR: u8 = 0x80;
/// The LSR bits that raise the receiver-line-status interrupt.
const LSR_ERROR_BITS: u8 = LSR_OE | LSR_PE | LSR_FE | LSR_BI;

// MSR bits.

/// Delta clear to send.
pub const MSR_DCTS: u8 = 0x01;
/// Delta data set ready.
pub const MSR_DDSR: u8 = 0x02;
/// Trailing edge of ring indicator.
pub const MSR_TERI: u8 = 0x04;
/// Delta data carrier detect.
pub const MSR_DDCD: u8 = 0x08;
/// Clear to send.
pub const MSR_CTS: u8 = 0x10;
/// Data set ready.
pub const MSR_DSR: u8 = 0x20;
/// Ring indicator.
pub const MSR_RI: u8 = 0x40;
/// Data carrier detect.
pub const MSR_DCD: u8 = 0x80;
/// The delta bits of MSR.
pub const MSR_DELTA_MASK: u8 = 0x0f;

// Chip parameters and timing.

/// Depth of each FIFO.
pub const FIFO_SIZE: usize = 16;
/// Default input clock divided by 16, as on a PC (1.8432 MHz / 16).
pub const DEFAULT_BAUD_BASE: u32 = 115_200;
/// Divisor latch after reset. The datasheet leaves it undefined; 12 (9600 baud at the PC's
/// baud base) is what PC firmware and QEMU use.
pub const RESET_DIVISOR: u16 = 12;
/// The line speed a divisor of 0 gives (about 3500 baud, as QEMU models it).
pub const ZERO_DIVISOR_BAUD: u32 = 3500;
/// Character times of line silence, with data waiting, before the character-timeout
/// interrupt.
pub const CTI_CHAR_TIMES: u64 = 4;
/// Finished output characters the UART holds for the event loop to collect. Only a full
/// holding area pauses the transmitter (a bound on memory, reached only when the event loop
/// is very late: 22 ms at 115200 baud); backpressure is the sink refusing bytes.
pub const TX_HOLD_LIMIT: usize = 256;
/// Finished output characters after which the event loop is asked to collect (output is
/// batched between timer wake-ups; the rest of the holding area absorbs wake-up latency).
pub const TX_COLLECT_BATCH: usize = 8;
/// Character times of missed input slots a late event loop may still make up. Older slots
/// are forfeited, so a stalled event loop does not earn an unbounded burst.
pub const RX_MAX_BACKLOG: u64 = 256;
const NS_PER_SEC: u128 = 1_000_000_000;
const START_BITS: u64 = 1;
const MIN_DATA_BITS: u8 = 5;

/// How a [`Serial`] is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SerialConfig {
    /// The UART's input clock divided by 16: the baud rate at divisor 1. 0 is taken as 1.
    pub baud_base: u32,
    /// Keep real line timing. Off, characters take no time (the unpaced behaviour).
    pub pacing: bool,
}

impl Default for SerialConfig {
    fn default() -> Self {
        SerialConfig {
            baud_base: DEFAULT_BAUD_BASE,
            pacing: true,
        }
    }
}

/// The modem status inputs as the upper nibble of MSR.
fn msr_bits(inputs: ModemStatus) -> u8 {
    let mut bits = 0;
    if inputs.dcd {
        bits |= MSR_DCD;
    }
    if inputs.dsr {
        bits |= MSR_DSR;
    }
    if inputs.cts {
        bits |= MSR_CTS;
    }
    if inputs.ri {
        bits |= MSR_RI;
    }
    bits
}

/// Counters a frontend can report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SerialStats {
    /// Characters handed to the sink of [`Serial::drain_tx`].
    pub transmitted: u64,
    /// Characters the transmitter looped back into the receiver (MCR loopback).
    pub looped_back: u64,
    /// Characters received into the RX FIFO (from the backend, loopback or a break).
    pub received: u64,
    /// THR writes lost because the guest wrote into a full FIFO.
    pub tx_overruns: u64,
    /// Characters the guest discarded with an FCR transmit-FIFO reset.
    pub tx_discarded: u64,
    /// Characters lost to receiver overrun (LSR.OE).
    pub rx_overruns: u64,
}

/// One character in the RX FIFO and whether it carries a break indication.
#[derive(Debug, Clone, Copy)]
struct RxChar {
    byte: u8,
    brk: bool,
}

/// The character in the transmit shift register and when its stop bit ends.
#[derive(Debug, Clone, Copy)]
struct Shift {
    byte: u8,
    done_ns: u64,
}

/// An emulated 16550A UART. See the module documentation.
pub struct Serial {
    config: SerialConfig,
    irq: Arc<dyn IrqLine>,
    clock: Arc<dyn Clock>,
    /// The instant the model has been brought up to.
    now: u64,

    ier: u8,
    lcr: u8,
    mcr: u8,
    /// The FCR bits that stick: FIFO enable, DMA mode, trigger level.
    fcr: u8,
    scr: u8,
    divisor: u16,
    /// Latched LSR error bits (OE, BI), cleared by reading LSR.
    lsr_errors: u8,
    /// Modem lines as MSR reports them (upper nibble).
    msr_lines: u8,
    /// Latched MSR delta bits.
    msr_deltas: u8,
    /// Modem lines driven by the far end (used outside loopback).
    external_lines: u8,

    rx: VecDeque<RxChar>,
    /// The last character read from RBR; an empty RBR reads it again, as the chip does.
    rbr_last: u8,
    /// Last receive or RBR read: the character-timeout reference point.
    rx_activity_ns: u64,
    /// Character timeout latched and not yet cleared by an RBR read.
    rx_timeout: bool,
    /// The next character from the far end completes in this slot (or in a later one that has
    /// already passed: missed slots are made up while input waits).
    rx_next_slot_ns: u64,
    /// The far end was found without input since the last character: the next character
    /// starts slot timing afresh at its arrival.
    rx_idle: bool,
    /// When the RX FIFO filled up, while it stays full: no slots accrue meanwhile.
    rx_full_since: Option<u64>,
    /// The far end may have input waiting for room or for a slot.
    input_waiting: bool,

    tx_fifo: VecDeque<u8>,
    tsr: Option<Shift>,
    /// Finished characters waiting for the sink (at most [`TX_HOLD_LIMIT`]).
    tx_out: VecDeque<u8>,
    /// The sink refused output: the transmitter holds until it accepts everything.
    tx_stalled: bool,
    /// The THRE interrupt source (set on a THRE rising edge, cleared by THR write or IIR read).
    thr_ipending: bool,
    /// The TX FIFO has held two bytes at once since it was last empty.
    tx_pair_seen: bool,
    /// The FIFO enable bit changed since the TX FIFO was last found empty: the next THRE
    /// interrupt is immediate.
    tx_fifo_toggled: bool,
    /// A THRE interrupt the 16550A delays (see [`Serial::thre_emptied`]) rises at this instant.
    thri_due: Option<u64>,

    irq_level: bool,
    /// Line parameters, break or loopback changed: the event loop has something to tell the
    /// backend.
    notify: bool,
    /// The deadline the event loop last learned from [`Serial::arm_deadline`].
    armed: Option<u64>,
    /// A kick has been requested and the event loop has not re-armed since.
    kick_outstanding: bool,
    stats: SerialStats,
}

impl Serial {
    /// A UART in its reset state. The modem inputs start as [`ModemStatus::CONNECTED`] (see
    /// [`Serial::with_modem_inputs`]).
    pub fn new(config: SerialConfig, irq: Arc<dyn IrqLine>, clock: Arc<dyn Clock>) -> Self {
        let now = clock.now_ns();
        let external_lines = msr_bits(ModemStatus::CONNECTED);
        Serial {
            config,
            irq,
            clock,
            now,
            ier: 0,
            lcr: 0,
            mcr: 0,
            fcr: 0,
            scr: 0,
            divisor: RESET_DIVISOR,
            lsr_errors: 0,
            msr_lines: external_lines,
            msr_deltas: 0,
            external_lines,
            rx: VecDeque::with_capacity(FIFO_SIZE),
            rbr_last: 0,
            rx_activity_ns: now,
            rx_timeout: false,
            rx_next_slot_ns: now,
            rx_idle: true,
            rx_full_since: None,
            input_waiting: false,
            tx_fifo: VecDeque::with_capacity(FIFO_SIZE),
            tsr: None,
            tx_out: VecDeque::with_capacity(TX_HOLD_LIMIT),
            tx_stalled: false,
            thr_ipending: false,
            tx_pair_seen: false,
            tx_fifo_toggled: false,
            thri_due: None,
            irq_level: false,
            notify: false,
            armed: None,
            kick_outstanding: false,
            stats: SerialStats::default(),
        }
    }

    /// Set the power-on state of the modem inputs, without delta bits.
    pub fn with_modem_inputs(mut self, inputs: ModemStatus) -> Self {
        self.external_lines = msr_bits(inputs);
        self.msr_lines = self.effective_lines();
        self.msr_deltas = 0;
        self
    }

    /// The configuration the UART was built with.
    pub fn config(&self) -> SerialConfig {
        self.config
    }

    /// Counters since creation.
    pub fn stats(&self) -> SerialStats {
        self.stats
    }

    /// A guest read of the register at `offset` (only the low 3 bits are decoded).
    pub fn read(&mut self, offset: u8) -> u8 {
        self.advance();
        let dlab = self.lcr & LCR_DLAB != 0;
        let value = match offset & OFFSET_MASK {
            REG_RBR_THR if dlab => self.divisor.to_le_bytes()[0],
            REG_RBR_THR => self.read_rbr(),
            REG_IER if dlab => self.divisor.to_le_bytes()[1],
            REG_IER => self.ier,
            REG_IIR_FCR => {
                let id = self.pending_iir();
                if id == IIR_THRI {
                    self.thr_ipending = false;
                }
                id | self.iir_fifo_bits()
            }
            REG_LCR => self.lcr,
            REG_MCR => self.mcr,
            REG_LSR => {
                let value = self.lsr();
                self.lsr_errors = 0;
                // The error of the character at the top of the FIFO has now been reported.
                if let Some(top) = self.rx.front_mut() {
                    top.brk = false;
                }
                value
            }
            REG_MSR => {
                let value = self.msr_lines | self.msr_deltas;
                self.msr_deltas = 0;
                value
            }
            REG_SCR => self.scr,
            _ => u8::MAX,
        };
        self.settle();
        value
    }

    /// A guest write of `value` to the register at `offset` (only the low 3 bits are decoded).
    pub fn write(&mut self, offset: u8, value: u8) {
        self.advance();
        let dlab = self.lcr & LCR_DLAB != 0;
        match offset & OFFSET_MASK {
            REG_RBR_THR if dlab => {
                self.set_divisor(u16::from_le_bytes([value, self.divisor.to_le_bytes()[1]]))
            }
            REG_RBR_THR => self.write_thr(value),
            REG_IER if dlab => {
                self.set_divisor(u16::from_le_bytes([self.divisor.to_le_bytes()[0], value]))
            }
            REG_IER => self.write_ier(value),
            REG_IIR_FCR => self.write_fcr(value),
            REG_LCR => self.write_lcr(value),
            REG_MCR => self.write_mcr(value),
            // LSR and MSR are read-only here (the chip's LSR write is a factory test mode).
            REG_LSR | REG_MSR => {}
            REG_SCR => self.scr = value,
            _ => {}
        }
        self.settle();
    }

    /// Offer the output characters whose line time has completed, oldest first. `sink`
    /// returns how many of the offered bytes it accepted; the rest stay in the UART and the
    /// transmitter stalls (THRE and TEMT clear, no new character starts) until a later call
    /// gets everything accepted.
    pub fn drain_tx(&mut self, sink: &mut dyn FnMut(&[u8]) -> usize) {
        self.advance();
        while !self.tx_out.is_empty() {
            let (front, _) = self.tx_out.as_slices();
            let offered = front.len();
            let took = sink(front).min(offered);
            self.tx_out.drain(..took);
            self.stats.transmitted += took as u64;
            if took < offered {
                if !self.tx_stalled {
                    self.tx_stalled = true;
                    // THRE falls: its interrupt source goes with it.
                    self.thr_ipending = false;
                    self.thri_due = None;
                }
                break;
            }
        }
        if self.tx_out.is_empty() && self.tx_stalled {
            self.tx_stalled = false;
            if self.tx_fifo.is_empty() {
                self.thr_ipending = true;
            }
        }
        self.try_start_tx(self.now);
        self.settle();
    }

    /// How many bytes the UART can take from the far end right now: the free RX FIFO room
    /// and, with pacing, one character per line slot that has passed since the last
    /// character's (missed slots are made up, at most [`RX_MAX_BACKLOG`]). After an idle line
    /// (see [`Serial::set_input_waiting`]) only one character is offered, arriving now. 0 in
    /// loopback (the receiver input is disconnected then).
    pub fn rx_room(&mut self) -> usize {
        self.advance();
        let room = self.rx_room_now();
        self.settle();
        room
    }

    /// Take up to [`Serial::rx_room`] bytes from the far end. Returns how many were taken.
    /// Each character is accounted to its line slot, which may lie in the past (event-loop
    /// latency), so latency does not slow the line; after an idle line the first one arrives
    /// now.
    pub fn receive(&mut self, data: &[u8]) -> usize {
        self.advance();
        let char_ns = self.char_time_ns();
        let mut taken = 0;
        for &byte in data {
            if self.rx_room_now() == 0 {
                break;
            }
            let arrival = if self.rx_idle || !self.config.pacing {
                self.now
            } else {
                self.rx_first_slot()
            };
            self.rx_idle = false;
            self.rx_next_slot_ns = arrival.saturating_add(char_ns);
            self.rx_push(byte, false, arrival);
            taken += 1;
        }
        self.settle();
        taken
    }

    /// The far end sent a break: a NUL character with BI enters the RX FIFO (or sets OE when
    /// the FIFO is full). Ignored in loopback, where the receiver input is disconnected.
    pub fn receive_break(&mut self) {
        self.advance();
        if !self.loopback() {
            self.rx_push(0, true, self.now);
            let busy_until = self.now.saturating_add(self.char_time_ns());
            self.rx_next_slot_ns = self.rx_next_slot_ns.max(busy_until);
        }
        self.settle();
    }

    /// The far end changed its modem lines. Changes set MSR delta bits (TERI only on RI
    /// falling) and may raise the modem-status interrupt. Outside loopback these become MSR.
    pub fn set_modem_inputs(&mut self, inputs: ModemStatus) {
        self.advance();
        self.external_lines = msr_bits(inputs);
        self.update_modem_lines();
        self.settle();
    }

    /// Tell the UART whether the far end may have input waiting, so that
    /// [`Serial::next_deadline_ns`] includes the instant the next input slot opens. `false`
    /// means the far end was found without input: the line is idle, the slots until its next
    /// character are not made up, and that character arrives when it is received.
    pub fn set_input_waiting(&mut self, waiting: bool) {
        self.input_waiting = waiting;
        if !waiting {
            self.rx_idle = true;
        }
    }

    /// The line parameters the guest programmed (divisor 0 reports [`ZERO_DIVISOR_BAUD`]; the
    /// 1.5 stop bits of a 5-bit frame report as 2).
    pub fn line_params(&self) -> LineParams {
        let baud = match self.divisor {
            0 => ZERO_DIVISOR_BAUD,
            d => self.baud_base() / u32::from(d),
        };
        let parity = match (
            self.lcr & LCR_PARITY_ENABLE != 0,
            self.lcr & LCR_STICK_PARITY != 0,
            self.lcr & LCR_EVEN_PARITY != 0,
        ) {
            (false, _, _) => 'N',
            (true, false, false) => 'O',
            (true, false, true) => 'E',
            // Stick parity: the parity bit is the inverse of the even-parity select.
            (true, true, false) => 'M',
            (true, true, true) => 'S',
        };
        LineParams {
            baud,
            data_bits: self.data_bits(),
            parity,
            stop_bits: if self.lcr & LCR_TWO_STOP_BITS != 0 {
                2
            } else {
                1
            },
        }
    }

    /// Whether the guest holds a break on the line (LCR bit 6) towards the far end. In
    /// loopback the line is internal and no break reaches the far end.
    pub fn break_active(&self) -> bool {
        self.lcr & LCR_BREAK != 0 && !self.loopback()
    }

    /// The modem control outputs on the line as (DTR, RTS): MCR's bits, except in loopback,
    /// where the chip holds its outputs inactive and loops MCR back to MSR instead.
    pub fn modem_outputs(&self) -> (bool, bool) {
        if self.loopback() {
            return (false, false);
        }
        (self.mcr & MCR_DTR != 0, self.mcr & MCR_RTS != 0)
    }

    /// The line time of one character with the current LCR and divisor (0 without pacing).
    pub fn char_time_ns(&self) -> u64 {
        if !self.config.pacing {
            return 0;
        }
        let bits = u128::from(self.frame_bits());
        let ns = match self.divisor {
            0 => bits * NS_PER_SEC / u128::from(ZERO_DIVISOR_BAUD),
            d => bits * NS_PER_SEC * u128::from(d) / u128::from(self.baud_base()),
        };
        u64::try_from(ns).unwrap_or(u64::MAX).max(1)
    }

    /// The earliest clock time at which the UART changes without guest action in a way the
    /// outside world must see: finished output to collect, an interrupt to raise, an input
    /// slot opening while input may be waiting. `None` when nothing is scheduled. A value in
    /// the past means "now".
    pub fn next_deadline_ns(&self) -> Option<u64> {
        let out2 = self.mcr & MCR_OUT2 != 0;
        let mut deadline = self.tx_deadline();
        if out2 && self.ier & IER_ERBFI != 0 {
            deadline = earliest(deadline, self.cti_due());
        }
        if self.input_waiting && !self.loopback() && self.rx.len() < self.rx_capacity() {
            deadline = earliest(deadline, Some(self.rx_next_slot_ns.max(self.now)));
        }
        deadline
    }

    /// [`Serial::next_deadline_ns`], remembered as the deadline the event loop now has armed,
    /// so that [`Serial::take_kick`] knows when a guest access moved it earlier.
    pub fn arm_deadline(&mut self) -> Option<u64> {
        self.kick_outstanding = false;
        self.armed = self.next_deadline_ns();
        self.armed
    }

    /// Whether the event loop must be woken after a guest access: new output that makes the
    /// next deadline earlier than the armed one, RX room that opened while input waits,
    /// changed line parameters, break or loopback. Returns true once per such change until
    /// the event loop re-arms with [`Serial::arm_deadline`].
    pub fn take_kick(&mut self) -> bool {
        if self.kick_outstanding {
            self.notify = false;
            return false;
        }
        let earlier = match (self.next_deadline_ns(), self.armed) {
            (Some(next), Some(armed)) => next < armed,
            (Some(_), None) => true,
            (None, _) => false,
        };
        let kick = self.notify || earlier;
        if kick {
            self.notify = false;
            self.kick_outstanding = true;
        }
        kick
    }

    /// When the character in the transmit shift register finishes, if one is shifting.
    #[cfg(test)]
    pub(crate) fn tx_shift_done_ns(&self) -> Option<u64> {
        self.tsr.map(|s| s.done_ns)
    }

    /// Bring the model up to the clock's now and update the interrupt line.
    pub fn tick(&mut self) {
        self.advance();
        self.settle();
    }

    /// Machine reset: every register back to its power-on value (IER, LCR, MCR, FCR, SCR 0,
    /// divisor [`RESET_DIVISOR`], no error or delta bit latched), both FIFOs empty, the
    /// interrupt line low. What is not the chip's stays: the configuration, the modem inputs
    /// the far end drives, the counters, and the output the guest already handed over. The
    /// characters in the transmit FIFO and shift register complete at once (a guest's last
    /// line before it reboots reaches the host whole) into the holding area, up to
    /// [`TX_HOLD_LIMIT`]; a sink that refused output keeps the transmitter stalled, as
    /// before the reset.
    pub fn reset(&mut self) {
        self.advance();
        let mut tx_out = std::mem::take(&mut self.tx_out);
        let pending = self.tsr.take().map(|s| s.byte).into_iter();
        for byte in pending.chain(self.tx_fifo.drain(..)) {
            if tx_out.len() < TX_HOLD_LIMIT {
                tx_out.push_back(byte);
            } else {
                self.stats.tx_discarded += 1;
            }
        }
        let was_high = self.irq_level;
        let mut fresh = Serial::new(self.config, self.irq.clone(), self.clock.clone());
        fresh.external_lines = self.external_lines;
        fresh.msr_lines = fresh.effective_lines();
        fresh.tx_stalled = self.tx_stalled && !tx_out.is_empty();
        fresh.tx_out = tx_out;
        fresh.stats = self.stats;
        // The line parameters went back to the reset values: the far end must hear of it.
        fresh.notify = true;
        *self = fresh;
        if was_high {
            self.irq.set_level(false);
        }
    }

    // Register helpers.

    fn read_rbr(&mut self) -> u8 {
        if let Some(c) = self.rx.pop_front() {
            self.rbr_last = c.byte;
            if self.rx.front().is_some_and(|top| top.brk) {
                self.lsr_errors |= LSR_BI;
            }
            self.rx_timeout = false;
            self.rx_activity_ns = self.now;
            self.rx_room_opened();
        }
        self.rbr_last
    }

    fn write_thr(&mut self, value: u8) {
        // Writing THR clears the THRE interrupt, whether or not the byte fits, and one still
        // being delayed.
        self.thr_ipending = false;
        self.thri_due = None;
        if self.tx_fifo.len() >= self.fifo_capacity() {
            // The guest ignored THRE; the chip loses the byte.
            self.stats.tx_overruns += 1;
        } else {
            self.tx_fifo.push_back(value);
            if self.tx_fifo.len() >= 2 {
                self.tx_pair_seen = true;
            }
        }
        self.try_start_tx(self.now);
    }

    fn write_ier(&mut self, value: u8) {
        let old = self.ier;
        self.ier = value & IER_MASK;
        if (old ^ self.ier) & IER_ETBEI != 0 {
            // Enabling the THRE interrupt with THRE set raises it at once.
            self.thr_ipending = self.ier & IER_ETBEI != 0 && self.thre();
            self.thri_due = None;
        }
    }

    fn write_fcr(&mut self, value: u8) {
        let was_enabled = self.fifo_enabled();
        if was_enabled != (value & FCR_FIFO_ENABLE != 0) {
            self.tx_fifo_toggled = true;
        }
        if value & FCR_FIFO_ENABLE == 0 {
            if was_enabled {
                self.reset_rx_fifo();
                self.reset_tx_fifo();
            }
            self.fcr = 0;
            return;
        }
        if !was_enabled || value & FCR_RX_RESET != 0 {
            self.reset_rx_fifo();
        }
        if !was_enabled || value & FCR_TX_RESET != 0 {
            self.reset_tx_fifo();
        }
        self.fcr = value & (FCR_FIFO_ENABLE | FCR_DMA_MODE | FCR_TRIGGER_MASK);
    }

    fn write_lcr(&mut self, value: u8) {
        let old = self.lcr;
        self.lcr = value;
        if (old ^ value) & !LCR_DLAB != 0 {
            self.notify = true;
        }
        if value & LCR_BREAK != 0 && old & LCR_BREAK == 0 && self.loopback() {
            // In loopback the break reaches our own receiver.
            self.rx_push(0, true, self.now);
        }
    }

    fn write_mcr(&mut self, value: u8) {
        let old = self.mcr;
        self.mcr = value & MCR_MASK;
        if (old ^ self.mcr) & MCR_LOOP != 0 {
            // Loopback connects or disconnects the far end (input, output and break).
            self.notify = true;
            // The far end's slots did not run while it was disconnected.
            self.rx_next_slot_ns = self.rx_next_slot_ns.max(self.now);
        }
        self.update_modem_lines();
    }

    fn set_divisor(&mut self, divisor: u16) {
        if divisor != self.divisor {
            self.divisor = divisor;
            self.notify = true;
        }
    }

    fn reset_rx_fifo(&mut self) {
        self.rx.clear();
        self.rx_timeout = false;
        self.lsr_errors &= !LSR_BI;
        self.rx_room_opened();
    }

    fn reset_tx_fifo(&mut self) {
        self.stats.tx_discarded += self.tx_fifo.len() as u64;
        self.tx_fifo.clear();
        self.thri_due = None;
        if self.thre() {
            self.thr_ipending = true;
        }
    }

    // Derived state.

    fn baud_base(&self) -> u32 {
        self.config.baud_base.max(1)
    }

    fn data_bits(&self) -> u8 {
        MIN_DATA_BITS + (self.lcr & LCR_WORD_LENGTH_MASK)
    }

    fn frame_bits(&self) -> u64 {
        let parity = u64::from(self.lcr & LCR_PARITY_ENABLE != 0);
        let stop = if self.lcr & LCR_TWO_STOP_BITS != 0 {
            2
        } else {
            1
        };
        START_BITS + u64::from(self.data_bits()) + parity + stop
    }

    fn fifo_enabled(&self) -> bool {
        self.fcr & FCR_FIFO_ENABLE != 0
    }

    /// FIFO depth in FIFO mode; the single holding register otherwise.
    fn fifo_capacity(&self) -> usize {
        if self.fifo_enabled() {
            FIFO_SIZE
        } else {
            1
        }
    }

    fn rx_capacity(&self) -> usize {
        self.fifo_capacity()
    }

    fn rx_trigger(&self) -> usize {
        RX_TRIGGER_LEVELS[usize::from((self.fcr & FCR_TRIGGER_MASK) >> FCR_TRIGGER_SHIFT)]
    }

    fn loopback(&self) -> bool {
        self.mcr & MCR_LOOP != 0
    }

    fn iir_fifo_bits(&self) -> u8 {
        if self.fifo_enabled() {
            IIR_FIFO_ENABLED
        } else {
            0
        }
    }

    fn thre(&self) -> bool {
        self.tx_fifo.is_empty() && !self.tx_stalled
    }

    fn temt(&self) -> bool {
        self.thre() && self.tsr.is_none()
    }

    fn lsr(&self) -> u8 {
        let mut value = self.lsr_errors & LSR_ERROR_BITS;
        if !self.rx.is_empty() {
            value |= LSR_DR;
        }
        if self.thre() {
            value |= LSR_THRE;
        }
        if self.temt() {
            value |= LSR_TEMT;
        }
        if self.fifo_enabled() && self.rx.iter().any(|c| c.brk) {
            value |= LSR_RX_FIFO_ERROR;
        }
        value
    }

    fn rx_data_available(&self) -> bool {
        !self.rx.is_empty() && (!self.fifo_enabled() || self.rx.len() >= self.rx_trigger())
    }

    /// The highest-priority pending and enabled interrupt, as IIR bits 0-3.
    fn pending_iir(&self) -> u8 {
        if self.ier & IER_ELSI != 0 && self.lsr_errors & LSR_ERROR_BITS != 0 {
            IIR_RLSI
        } else if self.ier & IER_ERBFI != 0 && self.rx_timeout {
            IIR_CTI
        } else if self.ier & IER_ERBFI != 0 && self.rx_data_available() {
            IIR_RDI
        } else if self.ier & IER_ETBEI != 0 && self.thr_ipending {
            IIR_THRI
        } else if self.ier & IER_EDSSI != 0 && self.msr_deltas != 0 {
            IIR_MSI
        } else {
            IIR_NONE
        }
    }

    fn effective_lines(&self) -> u8 {
        if !self.loopback() {
            return self.external_lines;
        }
        let mut lines = 0;
        if self.mcr & MCR_DTR != 0 {
            lines |= MSR_DSR;
        }
        if self.mcr & MCR_RTS != 0 {
            lines |= MSR_CTS;
        }
        if self.mcr & MCR_OUT1 != 0 {
            lines |= MSR_RI;
        }
        if self.mcr & MCR_OUT2 != 0 {
            lines |= MSR_DCD;
        }
        lines
    }

    fn update_modem_lines(&mut self) {
        let new = self.effective_lines();
        let changed = new ^ self.msr_lines;
        if changed & MSR_CTS != 0 {
            self.msr_deltas |= MSR_DCTS;
        }
        if changed & MSR_DSR != 0 {
            self.msr_deltas |= MSR_DDSR;
        }
        if changed & MSR_DCD != 0 {
            self.msr_deltas |= MSR_DDCD;
        }
        if self.msr_lines & MSR_RI != 0 && new & MSR_RI == 0 {
            self.msr_deltas |= MSR_TERI;
        }
        self.msr_lines = new;
    }

    fn rx_room_now(&self) -> usize {
        if self.loopback() {
            return 0;
        }
        let room = self.rx_capacity().saturating_sub(self.rx.len());
        if room == 0 || !self.config.pacing {
            return room;
        }
        let slots = if self.now < self.rx_next_slot_ns {
            0
        } else if self.rx_idle {
            1
        } else {
            (self.now - self.rx_first_slot()) / self.char_time_ns() + 1
        };
        room.min(usize::try_from(slots).unwrap_or(usize::MAX))
    }

    /// The slot of the next far-end character when input has been waiting: the slot after the
    /// last character's, or the oldest one [`RX_MAX_BACKLOG`] still allows to make up.
    fn rx_first_slot(&self) -> u64 {
        let backlog = self
            .char_time_ns()
            .saturating_mul(RX_MAX_BACKLOG.saturating_sub(1));
        self.rx_next_slot_ns.max(self.now.saturating_sub(backlog))
    }

    /// A full RX FIFO got room. Slots missed before it filled stay owed; the time it was full
    /// earns none (the far end is read only as far as the FIFO has room).
    fn rx_room_opened(&mut self) {
        if self.rx.len() >= self.rx_capacity() {
            return;
        }
        if let Some(full_at) = self.rx_full_since.take() {
            let owed = full_at.saturating_sub(self.rx_next_slot_ns);
            self.rx_next_slot_ns = self.rx_next_slot_ns.max(self.now.saturating_sub(owed));
        }
    }

    /// A character completes at the receiver at `at_ns`.
    fn rx_push(&mut self, byte: u8, brk: bool, at_ns: u64) {
        self.stats.received += 1;
        if self.rx.len() >= self.rx_capacity() {
            self.lsr_errors |= LSR_OE;
            self.stats.rx_overruns += 1;
            // In FIFO mode the new character is lost; the 16450-mode holding register is
            // overwritten.
            if !self.fifo_enabled() {
                if let Some(top) = self.rx.front_mut() {
                    *top = RxChar { byte, brk };
                    if brk {
                        self.lsr_errors |= LSR_BI;
                    }
                }
            }
        } else {
            self.rx.push_back(RxChar { byte, brk });
            if brk && self.rx.len() == 1 {
                self.lsr_errors |= LSR_BI;
            }
        }
        if self.rx.len() >= self.rx_capacity() && self.rx_full_since.is_none() {
            // A character accounted to a past slot still fills the FIFO only now.
            self.rx_full_since = Some(at_ns.max(self.now));
        }
        self.rx_timeout = false;
        // The timeout counts from the later of this arrival and the last RBR read.
        self.rx_activity_ns = self.rx_activity_ns.max(at_ns);
    }

    /// When the character timeout fires, if it is armed.
    fn cti_due(&self) -> Option<u64> {
        (self.fifo_enabled() && !self.rx.is_empty() && !self.rx_timeout).then(|| {
            self.rx_activity_ns
                .saturating_add(self.char_time_ns().saturating_mul(CTI_CHAR_TIMES))
        })
    }

    /// When finished output must be collected (a batch of [`TX_COLLECT_BATCH`] or the
    /// transmitter idle) or THRE must raise its interrupt.
    fn tx_deadline(&self) -> Option<u64> {
        let thre_irq = self.ier & IER_ETBEI != 0 && self.mcr & MCR_OUT2 != 0;
        let delayed_thri = self.thri_due.filter(|_| thre_irq);
        earliest(self.tx_queue_deadline(), delayed_thri)
    }

    /// [`Serial::tx_deadline`] for the characters in the transmitter.
    fn tx_queue_deadline(&self) -> Option<u64> {
        if self.tx_stalled {
            return None;
        }
        if self.tx_out.len() >= TX_COLLECT_BATCH {
            return Some(self.now);
        }
        let Some(shift) = self.tsr else {
            return (!self.tx_out.is_empty()).then_some(self.now);
        };
        if self.loopback() {
            return Some(shift.done_ns);
        }
        let thre_irq = self.ier & IER_ETBEI != 0 && self.mcr & MCR_OUT2 != 0;
        let char_ns = self.char_time_ns();
        let mut at = shift.done_ns;
        let mut out_len = self.tx_out.len();
        let mut queued = self.tx_fifo.len();
        loop {
            out_len += 1;
            if queued == 0 || out_len >= TX_COLLECT_BATCH {
                return Some(at);
            }
            queued -= 1;
            if queued == 0 && thre_irq {
                return Some(at);
            }
            at = at.saturating_add(char_ns);
        }
    }

    /// Move the next character into an idle shift register at `at_ns`, unless the sink refused
    /// output or the holding area is full.
    fn try_start_tx(&mut self, at_ns: u64) {
        if self.tsr.is_some() || self.tx_stalled || self.tx_out.len() >= TX_HOLD_LIMIT {
            return;
        }
        let Some(byte) = self.tx_fifo.pop_front() else {
            return;
        };
        self.tsr = Some(Shift {
            byte,
            done_ns: at_ns.saturating_add(self.char_time_ns()),
        });
        if self.tx_fifo.is_empty() {
            self.thre_emptied(at_ns);
        }
    }

    /// THRE rises at `at_ns`: the last queued character went to the shift register. Its
    /// interrupt rises with it, except where the 16550A delays it: in FIFO mode, when the FIFO
    /// has not held two bytes at once since it was last empty, the "transmitter FIFO empty
    /// indication" comes one character time less the last stop bit later (PC16550D data
    /// sheet, FIFO interrupt mode; not for the first one after FCR bit 0 changed). So a
    /// driver that writes a burst to an idle transmitter gets no interrupt between its first
    /// and second byte. LSR.THRE itself rises at once.
    fn thre_emptied(&mut self, at_ns: u64) {
        let delayed = self.fifo_enabled() && !self.tx_pair_seen && !self.tx_fifo_toggled;
        self.tx_pair_seen = false;
        self.tx_fifo_toggled = false;
        if delayed {
            let char_ns = self.char_time_ns();
            let stop_bit_ns = char_ns / self.frame_bits();
            self.thri_due = Some(at_ns.saturating_add(char_ns - stop_bit_ns));
        } else {
            self.thr_ipending = true;
        }
    }

    fn complete_tx(&mut self, at_ns: u64) {
        let Some(shift) = self.tsr.take() else {
            return;
        };
        if self.loopback() {
            self.stats.looped_back += 1;
            self.rx_push(shift.byte, false, at_ns);
        } else {
            self.tx_out.push_back(shift.byte);
        }
        self.try_start_tx(at_ns);
    }

    // Time.

    fn advance(&mut self) {
        let now = self.clock.now_ns().max(self.now);
        self.run_until(now);
    }

    /// Apply, in time order, every transmitter completion and character timeout due by
    /// `until_ns`. Each step consumes a queued character or latches the timeout, so this ends.
    fn run_until(&mut self, until_ns: u64) {
        loop {
            let tx_at = self.tsr.map(|s| s.done_ns).filter(|&t| t <= until_ns);
            let cti_at = self.cti_due().filter(|&t| t <= until_ns);
            let thri_at = self.thri_due.filter(|&t| t <= until_ns);
            if let Some(at) = thri_at {
                if tx_at.is_none_or(|tx| at <= tx) && cti_at.is_none_or(|cti| at <= cti) {
                    // A delayed THRE interrupt rises, if THRE is still set.
                    self.thri_due = None;
                    self.thr_ipending = self.thre();
                    continue;
                }
            }
            match (tx_at, cti_at) {
                (Some(tx), Some(cti)) if cti < tx => self.rx_timeout = true,
                (Some(tx), _) => self.complete_tx(tx),
                (None, Some(_)) => self.rx_timeout = true,
                (None, None) => break,
            }
        }
        self.now = until_ns;
    }

    /// Apply what became due at the current instant (zero-length characters without pacing)
    /// and drive the interrupt line.
    fn settle(&mut self) {
        self.run_until(self.now);
        let level = self.pending_iir() != IIR_NONE && self.mcr & MCR_OUT2 != 0;
        if level != self.irq_level {
            self.irq_level = level;
            self.irq.set_level(level);
        }
    }
}

fn earliest(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, None) => a,
        (None, b) => b,
    }
}

/// Fakes for unit tests of the UART and of what is built on it.
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Mutex;

    use crate::{Clock, IrqLine};

    /// A clock that moves only when told.
    #[derive(Default)]
    pub(crate) struct FakeClock(AtomicU64);

    impl FakeClock {
        pub(crate) fn set(&self, ns: u64) {
            self.0.store(ns, Ordering::SeqCst);
        }
        pub(crate) fn advance(&self, ns: u64) {
            self.0.fetch_add(ns, Ordering::SeqCst);
        }
    }

    impl Clock for FakeClock {
        fn now_ns(&self) -> u64 {
            self.0.load(Ordering::SeqCst)
        }
    }

    /// An interrupt line that records every level change.
    #[derive(Default)]
    pub(crate) struct RecordingIrq {
        level: AtomicBool,
        changes: Mutex<Vec<bool>>,
    }

    impl RecordingIrq {
        pub(crate) fn level(&self) -> bool {
            self.level.load(Ordering::SeqCst)
        }
        pub(crate) fn changes(&self) -> Vec<bool> {
            self.changes.lock().map(|c| c.clone()).unwrap_or_default()
        }
    }

    impl IrqLine for RecordingIrq {
        fn set_level(&self, high: bool) {
            self.level.store(high, Ordering::SeqCst);
            if let Ok(mut changes) = self.changes.lock() {
                changes.push(high);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{FakeClock, RecordingIrq};
    use super::*;
    use proptest::prelude::*;

    /// 9600 baud 8N1 at the PC baud base: 10 bits * 12 / 115200 s.
    const C9600: u64 = 1_041_666;
    /// 38400 baud 8N1.
    const C38400: u64 = 260_416;
    /// 115200 baud 8N1.
    const C115200: u64 = 86_805;
    /// 9600 baud 7E2: 11 bits.
    const C9600_7E2: u64 = 1_145_833;

    const LCR_8N1: u8 = 0x03;
    const LCR_7E2: u8 = 0x02 | LCR_TWO_STOP_BITS | LCR_PARITY_ENABLE | LCR_EVEN_PARITY;
    const FCR_ENABLE_RESET: u8 = FCR_FIFO_ENABLE | FCR_RX_RESET | FCR_TX_RESET;

    struct Rig {
        clock: Arc<FakeClock>,
        irq: Arc<RecordingIrq>,
        uart: Serial,
    }

    impl Rig {
        fn new(pacing: bool) -> Rig {
            let clock = Arc::new(FakeClock::default());
            let irq = Arc::new(RecordingIrq::default());
            let uart = Serial::new(
                SerialConfig {
                    baud_base: DEFAULT_BAUD_BASE,
                    pacing,
                },
                irq.clone(),
                clock.clone(),
            );
            Rig { clock, irq, uart }
        }

        /// A rig programmed to `divisor`, `lcr`, FIFOs on (trigger 1) and OUT2 set.
        fn programmed(divisor: u16, lcr: u8) -> Rig {
            let mut rig = Rig::new(true);
            rig.set_line(divisor, lcr);
            rig.uart.write(REG_IIR_FCR, FCR_ENABLE_RESET);
            rig.uart.write(REG_MCR, MCR_OUT2);
            rig
        }

        fn set_line(&mut self, divisor: u16, lcr: u8) {
            let [lo, hi] = divisor.to_le_bytes();
            self.uart.write(REG_LCR, LCR_DLAB);
            self.uart.write(REG_DLL, lo);
            self.uart.write(REG_DLM, hi);
            self.uart.write(REG_LCR, lcr);
        }

        fn at(&self, ns: u64) {
            self.clock.set(ns);
        }

        /// The event loop's deadline is `due`, and the interrupt line rises exactly then: not
        /// 1 ns before (the timer firing early finds nothing), and at `due`.
        fn irq_rises_at(&mut self, due: u64) {
            assert_eq!(self.uart.next_deadline_ns(), Some(due));
            self.at(due - 1);
            self.uart.tick();
            assert!(!self.irq.level());
            self.at(due);
            self.uart.tick();
            assert!(self.irq.level());
        }

        fn lsr(&mut self) -> u8 {
            self.uart.read(REG_LSR)
        }

        fn iir(&mut self) -> u8 {
            self.uart.read(REG_IIR_FCR)
        }

        fn drain(&mut self) -> Vec<u8> {
            let mut out = Vec::new();
            self.uart.drain_tx(&mut |b: &[u8]| {
                out.extend_from_slice(b);
                b.len()
            });
            out
        }

        /// Feed one byte from the far end, waiting for its slot.
        fn feed(&mut self, byte: u8) {
            while self.uart.rx_room() == 0 {
                let slot = self.uart.rx_next_slot_ns;
                assert!(slot > self.clock.now_ns(), "rx blocked with no slot ahead");
                self.at(slot);
            }
            assert_eq!(self.uart.receive(&[byte]), 1);
        }
    }

    #[test]
    fn machine_reset_restores_power_on_registers_and_keeps_the_output() {
        let mut rig = Rig::programmed(12, LCR_8N1);
        rig.uart.write(REG_IER, IER_ERBFI | IER_ETBEI);
        rig.uart.write(REG_SCR, 0x5a);
        rig.uart.set_modem_inputs(ModemStatus::DISCONNECTED);
        rig.feed(b'x');
        for &b in b"ab" {
            rig.uart.write(REG_RBR_THR, b);
        }
        assert!(rig.irq.level());
        rig.uart.reset();
        assert!(!rig.irq.level(), "the line drops on reset");
        let u = &mut rig.uart;
        assert_eq!(u.read(REG_IER), 0);
        assert_eq!(u.read(REG_IIR_FCR), IIR_NONE);
        assert_eq!(u.read(REG_LCR), 0);
        assert_eq!(u.read(REG_MCR), 0);
        assert_eq!(u.read(REG_SCR), 0);
        assert_eq!(u.read(REG_LSR), LSR_THRE | LSR_TEMT, "RX FIFO emptied");
        // The far end is still disconnected, with no delta bits for it.
        assert_eq!(u.read(REG_MSR), 0);
        assert_eq!(
            u.line_params().baud,
            DEFAULT_BAUD_BASE / u32::from(RESET_DIVISOR)
        );
        assert!(
            u.take_kick(),
            "the backend hears of the reset line parameters"
        );
        // What the guest wrote before the reset still reaches the host, in order.
        assert_eq!(rig.drain(), b"ab");
    }

    #[test]
    fn reset_values() {
        let mut rig = Rig::new(true);
        let u = &mut rig.uart;
        assert_eq!(u.read(REG_IER), 0);
        assert_eq!(u.read(REG_IIR_FCR), IIR_NONE);
        assert_eq!(u.read(REG_LCR), 0);
        assert_eq!(u.read(REG_MCR), 0);
        assert_eq!(u.read(REG_LSR), LSR_THRE | LSR_TEMT);
        assert_eq!(u.read(REG_MSR), MSR_DCD | MSR_DSR | MSR_CTS);
        assert_eq!(u.read(REG_SCR), 0);
        assert_eq!(u.read(REG_RBR_THR), 0);
        u.write(REG_LCR, LCR_DLAB);
        assert_eq!(u.read(REG_DLL), 12);
        assert_eq!(u.read(REG_DLM), 0);
        // Reset LCR: 5N1 at 9600 baud.
        assert_eq!(
            u.line_params(),
            LineParams {
                baud: 9600,
                data_bits: 5,
                parity: 'N',
                stop_bits: 1
            }
        );
        assert!(rig.irq.changes().is_empty());
        let mut quiet = Serial::new(SerialConfig::default(), rig.irq.clone(), rig.clock.clone())
            .with_modem_inputs(ModemStatus::DISCONNECTED);
        assert_eq!(quiet.read(REG_MSR), 0);
    }

    #[test]
    fn scratch_and_register_masks() {
        let mut rig = Rig::new(true);
        let u = &mut rig.uart;
        u.write(REG_SCR, 0x5a);
        assert_eq!(u.read(REG_SCR), 0x5a);
        u.write(REG_IER, 0xff);
        assert_eq!(u.read(REG_IER), IER_MASK);
        u.write(REG_MCR, 0xff);
        assert_eq!(u.read(REG_MCR), MCR_MASK);
        u.write(REG_LSR, 0);
        u.write(REG_MSR, 0xff);
        // Offsets alias modulo 8.
        assert_eq!(u.read(REG_SCR + 8), 0x5a);
        // Divisor latch does not disturb IER.
        u.write(REG_LCR, LCR_DLAB);
        u.write(REG_DLM, 0x12);
        u.write(REG_DLL, 0x34);
        u.write(REG_LCR, 0);
        assert_eq!(u.read(REG_IER), IER_MASK);
        assert_eq!(u.divisor, 0x1234);
    }

    #[test]
    fn line_params_and_parity() {
        let mut rig = Rig::new(true);
        for (lcr, parity, bits, stop) in [
            (0x03, 'N', 8, 1),
            (0x1a, 'E', 7, 1),
            (0x0a, 'O', 7, 1),
            (0x2b, 'M', 8, 1),
            (0x3b, 'S', 8, 1),
            (0x04, 'N', 5, 2),
        ] {
            rig.set_line(3, lcr);
            let p = rig.uart.line_params();
            assert_eq!(
                (p.baud, p.parity, p.data_bits, p.stop_bits),
                (38400, parity, bits, stop)
            );
        }
        rig.set_line(0, LCR_8N1);
        assert_eq!(rig.uart.line_params().baud, ZERO_DIVISOR_BAUD);
        // 10 bits at 3500 baud.
        assert_eq!(rig.uart.char_time_ns(), 2_857_142);
        // 5 bits with "1.5" stop bits counts 2: 1 + 5 + 2 = 8 bits.
        rig.set_line(1, LCR_TWO_STOP_BITS);
        assert_eq!(rig.uart.char_time_ns(), 8 * 1_000_000_000 / 115_200);
    }

    fn assert_tx_timing(divisor: u16, lcr: u8, char_ns: u64) {
        let mut rig = Rig::programmed(divisor, lcr);
        assert_eq!(rig.uart.char_time_ns(), char_ns);
        let t0 = 1_000;
        rig.at(t0);
        rig.uart.write(REG_RBR_THR, b'a');
        // The first byte goes straight to the shift register: THRE back at once, TEMT clear.
        assert_eq!(rig.lsr() & (LSR_THRE | LSR_TEMT), LSR_THRE);
        rig.uart.write(REG_RBR_THR, b'b');
        rig.uart.write(REG_RBR_THR, b'c');
        assert_eq!(rig.lsr() & (LSR_THRE | LSR_TEMT), 0);
        // 'a' finishes at t0 + c; 'b' starts, 'c' still queued.
        rig.at(t0 + char_ns - 1);
        assert_eq!(rig.lsr() & (LSR_THRE | LSR_TEMT), 0);
        assert_eq!(rig.drain(), b"");
        rig.at(t0 + char_ns);
        assert_eq!(rig.lsr() & (LSR_THRE | LSR_TEMT), 0);
        assert_eq!(rig.drain(), b"a");
        // 'b' finishes at t0 + 2c; 'c' moves to the shift register and THRE sets.
        rig.at(t0 + 2 * char_ns - 1);
        assert_eq!(rig.lsr() & (LSR_THRE | LSR_TEMT), 0);
        rig.at(t0 + 2 * char_ns);
        assert_eq!(rig.lsr() & (LSR_THRE | LSR_TEMT), LSR_THRE);
        rig.at(t0 + 3 * char_ns - 1);
        assert_eq!(rig.lsr() & (LSR_THRE | LSR_TEMT), LSR_THRE);
        assert_eq!(rig.uart.next_deadline_ns(), Some(t0 + 3 * char_ns));
        rig.at(t0 + 3 * char_ns);
        assert_eq!(rig.lsr() & (LSR_THRE | LSR_TEMT), LSR_THRE | LSR_TEMT);
        assert_eq!(rig.drain(), b"bc");
        assert_eq!(rig.uart.next_deadline_ns(), None);
    }

    #[test]
    fn thre_temt_timing_9600_8n1() {
        assert_tx_timing(12, LCR_8N1, C9600);
    }

    #[test]
    fn thre_temt_timing_38400_8n1() {
        assert_tx_timing(3, LCR_8N1, C38400);
    }

    #[test]
    fn thre_temt_timing_115200_8n1() {
        assert_tx_timing(1, LCR_8N1, C115200);
    }

    #[test]
    fn thre_temt_timing_9600_7e2() {
        assert_tx_timing(12, LCR_7E2, C9600_7E2);
    }

    #[test]
    fn full_fifo_drains_at_line_rate_and_batches_collection() {
        let mut rig = Rig::programmed(1, LCR_8N1);
        for b in 0..17u8 {
            rig.uart.write(REG_RBR_THR, b);
        }
        // 1 in the shift register + 16 in the FIFO; an 18th write is lost.
        rig.uart.write(REG_RBR_THR, 99);
        assert_eq!(rig.uart.stats().tx_overruns, 1);
        // No THRE interrupt enabled: collect when the transmitter goes idle or a batch has
        // finished.
        let batch = TX_COLLECT_BATCH as u64;
        assert_eq!(rig.uart.next_deadline_ns(), Some(batch * C115200));
        // A late collection costs the line nothing.
        rig.at(16 * C115200);
        assert_eq!(rig.drain(), (0..16).collect::<Vec<u8>>());
        assert_eq!(rig.uart.next_deadline_ns(), Some(17 * C115200));
        rig.at(17 * C115200);
        assert_eq!(rig.drain(), vec![16]);
        // With the THRE interrupt enabled the deadline is when the FIFO empties.
        rig.uart.write(REG_IER, IER_ETBEI);
        assert_eq!(rig.iir(), IIR_THRI | IIR_FIFO_ENABLED);
        for b in 0..4u8 {
            rig.uart.write(REG_RBR_THR, b);
        }
        let t = 17 * C115200;
        assert_eq!(rig.uart.next_deadline_ns(), Some(t + 3 * C115200));
    }

    #[test]
    fn hold_limit_pauses_transmitter_until_drained() {
        let mut rig = Rig::programmed(1, LCR_8N1);
        let mut sent = 0u8;
        let steps = TX_HOLD_LIMIT as u64 + 40;
        // A polling guest keeps the FIFO topped up and never lets the transmitter idle.
        for step in 0..steps {
            rig.at(step * C115200);
            while rig.lsr() & LSR_THRE != 0 {
                rig.uart.write(REG_RBR_THR, sent);
                sent = sent.wrapping_add(1);
            }
            // Uncollected output does not slow the line until the holding area is full.
            if step <= TX_HOLD_LIMIT as u64 {
                assert_eq!(rig.uart.tx_out.len() as u64, step, "step {step}");
            }
        }
        // Nobody collected: the holding area is full and the transmitter paused.
        assert_eq!(rig.uart.tx_out.len(), TX_HOLD_LIMIT);
        assert_eq!(rig.lsr() & (LSR_THRE | LSR_TEMT), 0);
        assert_eq!(rig.uart.next_deadline_ns(), Some(rig.uart.now));
        let out = rig.drain();
        assert_eq!(out, (0..=255).collect::<Vec<u8>>());
        assert!(rig.uart.tsr.is_some());
        assert_eq!(rig.uart.stats().tx_overruns, 0);
    }

    #[test]
    fn iir_priorities() {
        let mut rig = Rig::programmed(1, LCR_8N1);
        rig.uart.write(REG_IER, IER_MASK);
        // THRI is raised by enabling ETBEI with THRE set; reading IIR with THRI as the
        // source clears it.
        assert_eq!(rig.iir() & IIR_ID_MASK, IIR_THRI);
        assert_eq!(rig.iir() & IIR_ID_MASK, IIR_NONE);
        // MSI alone; reading IIR does not clear it.
        rig.uart.set_modem_inputs(ModemStatus::DISCONNECTED);
        assert_eq!(rig.iir() & IIR_ID_MASK, IIR_MSI);
        assert_eq!(rig.iir() & IIR_ID_MASK, IIR_MSI);
        // THRI > MSI ('x' goes straight to the shift register, THRE rises again).
        rig.uart.write(REG_RBR_THR, b'x');
        assert_eq!(rig.iir() & IIR_ID_MASK, IIR_THRI);
        // 'y' waits behind 'x'; when 'x' finishes, 'y' moves on and THRI is pending again.
        rig.uart.write(REG_RBR_THR, b'y');
        // RDI > MSI.
        rig.feed(b'1');
        assert_eq!(rig.iir() & IIR_ID_MASK, IIR_RDI);
        // CTI > THRI and MSI once the line has been quiet four character times.
        rig.at(rig.clock.now_ns() + 4 * C115200);
        assert_eq!(rig.iir() & IIR_ID_MASK, IIR_CTI);
        assert!(rig.uart.thr_ipending);
        // Reading RBR clears CTI.
        assert_eq!(rig.uart.read(REG_RBR_THR), b'1');
        // RLS > RDI > THRI: a break puts NUL (data) with BI at the top of the FIFO.
        rig.uart.receive_break();
        assert_eq!(rig.iir() & IIR_ID_MASK, IIR_RLSI);
        assert!(rig.irq.level());
        // Reading LSR clears RLS.
        assert_eq!(rig.lsr() & (LSR_BI | LSR_DR), LSR_BI | LSR_DR);
        assert_eq!(rig.iir() & IIR_ID_MASK, IIR_RDI);
        assert_eq!(rig.uart.read(REG_RBR_THR), 0);
        assert_eq!(rig.iir() & IIR_ID_MASK, IIR_THRI);
        assert_eq!(rig.iir() & IIR_ID_MASK, IIR_MSI);
        // Reading MSR clears MSI.
        assert_eq!(
            rig.uart.read(REG_MSR) & MSR_DELTA_MASK,
            MSR_DCTS | MSR_DDSR | MSR_DDCD
        );
        assert_eq!(rig.iir(), IIR_NONE | IIR_FIFO_ENABLED);
        assert!(!rig.irq.level());
    }

    #[test]
    fn thr_write_clears_thri() {
        let mut rig = Rig::programmed(12, LCR_8N1);
        rig.uart.write(REG_IER, IER_ETBEI);
        assert!(rig.irq.level());
        rig.uart.write(REG_RBR_THR, b'a');
        // 'a' moved to the shift register at once: THRE rose again, and so did THRI (the
        // first THRE interrupt after FIFO mode was switched on is never delayed).
        assert_eq!(rig.lsr() & (LSR_THRE | LSR_TEMT), LSR_THRE);
        assert!(rig.irq.level());
        rig.uart.write(REG_RBR_THR, b'b');
        assert!(!rig.irq.level());
        assert_eq!(rig.iir() & IIR_ID_MASK, IIR_NONE);
        // 'b' enters the shift register at one character time; with only 'b' in the FIFO,
        // THRI follows one character time less the stop bit later, raised by a timer the
        // event loop arms from the deadline.
        assert_eq!(rig.uart.next_deadline_ns(), Some(C9600));
        rig.at(C9600);
        rig.uart.tick();
        assert!(!rig.irq.level());
        assert_eq!(rig.lsr() & LSR_THRE, LSR_THRE);
        rig.irq_rises_at(C9600 + (C9600 - C9600 / 10));
        assert_eq!(rig.iir() & IIR_ID_MASK, IIR_THRI);
        assert!(!rig.irq.level());
        // A burst into the FIFO (two or more bytes at once) gets THRI as soon as the last
        // byte moves to the shift register, and no interrupt between the first two writes.
        let t = rig.clock.now_ns() + 2 * C9600;
        rig.at(t);
        assert_eq!(rig.lsr() & LSR_TEMT, LSR_TEMT);
        let before = rig.irq.changes().len();
        for &b in b"0123" {
            rig.uart.write(REG_RBR_THR, b);
        }
        assert_eq!(
            rig.irq.changes().len(),
            before,
            "no interrupt inside the burst"
        );
        assert_eq!(rig.uart.next_deadline_ns(), Some(t + 3 * C9600));
        rig.at(t + 3 * C9600);
        rig.uart.tick();
        assert!(rig.irq.level());
        assert_eq!(rig.iir() & IIR_ID_MASK, IIR_THRI);
        // Disabling ETBEI drops the pending source.
        rig.uart.write(REG_IER, 0);
        assert!(!rig.uart.thr_ipending);
    }

    #[test]
    fn thre_interrupt_is_delayed_only_in_fifo_mode() {
        // 16450 mode: a byte to an idle transmitter raises THRI again at once.
        let mut rig = Rig::new(true);
        rig.set_line(12, LCR_8N1);
        rig.uart.write(REG_MCR, MCR_OUT2);
        rig.uart.write(REG_IER, IER_ETBEI);
        assert_eq!(rig.iir() & IIR_ID_MASK, IIR_THRI);
        rig.uart.write(REG_RBR_THR, b'a');
        assert_eq!(rig.iir() & IIR_ID_MASK, IIR_THRI);
        rig.at(2 * C9600);
        // FIFO mode: the first THRI after the switch is immediate, the next single byte's is
        // not; a THRI still being delayed is cancelled by the next THR write.
        rig.uart.write(REG_IIR_FCR, FCR_FIFO_ENABLE);
        rig.uart.write(REG_RBR_THR, b'b');
        assert_eq!(rig.iir() & IIR_ID_MASK, IIR_THRI);
        rig.at(4 * C9600);
        rig.uart.write(REG_RBR_THR, b'c');
        assert_eq!(rig.iir() & IIR_ID_MASK, IIR_NONE);
        assert_eq!(
            rig.uart.next_deadline_ns(),
            Some(4 * C9600 + C9600 - C9600 / 10)
        );
        rig.at(4 * C9600 + C9600 / 2);
        rig.uart.write(REG_IER, 0);
        rig.uart.write(REG_IER, IER_ETBEI);
        // Re-enabling ETBEI with THRE set raises THRI at once; the delayed one is gone.
        assert_eq!(rig.iir() & IIR_ID_MASK, IIR_THRI);
        assert_eq!(rig.uart.next_deadline_ns(), Some(5 * C9600));
        rig.at(5 * C9600 + C9600);
        assert_eq!(rig.iir() & IIR_ID_MASK, IIR_NONE);
    }

    #[test]
    fn irq_follows_out2_and_changes_only_on_edges() {
        let mut rig = Rig::new(true);
        rig.uart.write(REG_IER, IER_ETBEI);
        assert!(rig.irq.changes().is_empty());
        rig.uart.write(REG_MCR, MCR_OUT2);
        assert_eq!(rig.irq.changes(), vec![true]);
        rig.uart.write(REG_MCR, MCR_OUT2 | MCR_DTR);
        rig.uart.write(REG_SCR, 1);
        assert_eq!(rig.irq.changes(), vec![true]);
        rig.uart.write(REG_MCR, 0);
        assert_eq!(rig.irq.changes(), vec![true, false]);
        assert_eq!(rig.iir() & IIR_ID_MASK, IIR_THRI);
        rig.uart.write(REG_MCR, MCR_OUT2);
        assert_eq!(rig.irq.changes(), vec![true, false]);
    }

    #[test]
    fn fifo_trigger_levels() {
        for (bits, level) in [(0u8, 1usize), (1, 4), (2, 8), (3, 14)] {
            let mut rig = Rig::programmed(1, LCR_8N1);
            rig.uart
                .write(REG_IIR_FCR, FCR_FIFO_ENABLE | (bits << FCR_TRIGGER_SHIFT));
            rig.uart.write(REG_IER, IER_ERBFI);
            for i in 0..level {
                assert!(!rig.irq.level(), "level {level}: early at {i}");
                rig.feed(i as u8);
            }
            // Read straight away, before any timeout could fire.
            assert_eq!(rig.iir(), IIR_RDI | IIR_FIFO_ENABLED, "level {level}");
            assert!(rig.irq.level());
            // RDA clears when the FIFO drops below the trigger.
            rig.uart.read(REG_RBR_THR);
            assert_eq!(rig.iir() & IIR_ID_MASK, IIR_NONE);
            assert!(!rig.irq.level());
        }
    }

    #[test]
    fn rx_timeout_fires_after_four_character_times() {
        let mut rig = Rig::programmed(12, LCR_8N1);
        rig.uart
            .write(REG_IIR_FCR, FCR_FIFO_ENABLE | (2 << FCR_TRIGGER_SHIFT));
        rig.uart.write(REG_IER, IER_ERBFI);
        rig.at(100);
        rig.feed(b'a');
        rig.uart.set_input_waiting(false);
        assert_eq!(rig.uart.next_deadline_ns(), Some(100 + 4 * C9600));
        rig.at(100 + 4 * C9600 - 1);
        rig.uart.tick();
        assert!(!rig.irq.level());
        rig.at(100 + 4 * C9600);
        rig.uart.tick();
        assert!(rig.irq.level());
        assert_eq!(rig.iir(), IIR_CTI | IIR_FIFO_ENABLED);
        // A new character clears the timeout and re-arms it.
        rig.feed(b'b');
        let t = rig.clock.now_ns();
        assert_eq!(rig.iir() & IIR_ID_MASK, IIR_NONE);
        assert_eq!(rig.uart.next_deadline_ns(), Some(t + 4 * C9600));
        rig.at(t + 4 * C9600);
        assert_eq!(rig.iir() & IIR_ID_MASK, IIR_CTI);
        // An RBR read clears it; data left re-arms from the read.
        assert_eq!(rig.uart.read(REG_RBR_THR), b'a');
        assert_eq!(rig.iir() & IIR_ID_MASK, IIR_NONE);
        let t = rig.clock.now_ns();
        assert_eq!(rig.uart.next_deadline_ns(), Some(t + 4 * C9600));
        rig.at(t + 4 * C9600);
        assert_eq!(rig.iir() & IIR_ID_MASK, IIR_CTI);
        assert_eq!(rig.uart.read(REG_RBR_THR), b'b');
        assert_eq!(rig.iir() & IIR_ID_MASK, IIR_NONE);
        assert_eq!(rig.uart.next_deadline_ns(), None);
    }

    #[test]
    fn no_timeout_in_16450_mode() {
        let mut rig = Rig::new(true);
        rig.set_line(12, LCR_8N1);
        rig.uart.write(REG_IER, IER_ERBFI);
        rig.feed(b'z');
        assert_eq!(rig.iir(), IIR_RDI);
        rig.at(100 * C9600);
        assert_eq!(rig.iir(), IIR_RDI);
        // One holding register: no room for more.
        assert_eq!(rig.uart.rx_room(), 0);
    }

    #[test]
    fn rx_paced_at_line_rate() {
        let mut rig = Rig::programmed(12, LCR_8N1);
        // After an idle line a character arrives now.
        let t0 = 10 * C9600;
        rig.at(t0);
        assert_eq!(rig.uart.rx_room(), 1);
        assert_eq!(rig.uart.receive(b"abc"), 1);
        assert_eq!(rig.uart.rx_room(), 0);
        assert_eq!(rig.uart.receive(b"bc"), 0);
        rig.uart.set_input_waiting(true);
        assert_eq!(rig.uart.next_deadline_ns(), Some(t0 + C9600));
        rig.at(t0 + C9600 - 1);
        assert_eq!(rig.uart.rx_room(), 0);
        // Late by less than a character: accounted to the slot, no drift.
        rig.at(t0 + C9600 + 10);
        assert_eq!(rig.uart.receive(b"bc"), 1);
        assert_eq!(rig.uart.rx_next_slot_ns, t0 + 2 * C9600);
        // The far end runs dry: after a long idle gap only one character is offered.
        rig.uart.set_input_waiting(false);
        rig.at(1_000 * C9600);
        assert_eq!(rig.uart.rx_room(), 1);
        assert_eq!(rig.uart.receive(b"cd"), 1);
        assert_eq!(rig.uart.rx_next_slot_ns, 1_001 * C9600);
        assert_eq!(rig.uart.rx_room(), 0);
    }

    #[test]
    fn late_service_makes_up_missed_rx_slots() {
        let mut rig = Rig::programmed(1, LCR_8N1);
        let t0 = 1_000 * C115200;
        rig.at(t0);
        assert_eq!(rig.uart.receive(b"a"), 1);
        rig.uart.set_input_waiting(true);
        // The event loop comes back 3 ms after the next slot: every slot since is made up.
        let now = t0 + C115200 + 3_000_000;
        rig.at(now);
        let slots = (now - t0) / C115200;
        assert_eq!(slots, 35);
        assert_eq!(rig.uart.rx_room(), FIFO_SIZE - 1);
        assert_eq!(rig.uart.receive(&[b'b'; 40]), FIFO_SIZE - 1);
        // The FIFO filled with slots still owed; they stay owed while it is full...
        assert_eq!(rig.uart.rx_next_slot_ns, t0 + 16 * C115200);
        rig.at(now + 10 * C115200);
        assert_eq!(rig.uart.rx_room(), 0);
        // ...but its full time earns none: reading 8 opens room for 8 of them.
        for _ in 0..8 {
            rig.uart.read(REG_RBR_THR);
        }
        assert_eq!(rig.uart.rx_next_slot_ns, t0 + 26 * C115200);
        assert_eq!(rig.uart.rx_room(), 8);
        assert_eq!(rig.uart.receive(&[b'c'; 8]), 8);
        assert_eq!(rig.uart.rx_next_slot_ns, t0 + 34 * C115200);
        // Never more than the slots that have passed since the last character's.
        for _ in 0..16 {
            rig.uart.read(REG_RBR_THR);
        }
        let now = rig.clock.now_ns();
        assert_eq!(
            rig.uart.rx_room(),
            ((now - (t0 + 34 * C115200)) / C115200 + 1) as usize
        );
        assert_eq!(rig.uart.stats().rx_overruns, 0);
    }

    #[test]
    fn backdated_input_times_the_character_timeout_from_its_slot() {
        let mut rig = Rig::programmed(12, LCR_8N1);
        rig.uart
            .write(REG_IIR_FCR, FCR_FIFO_ENABLE | (2 << FCR_TRIGGER_SHIFT));
        rig.uart.write(REG_IER, IER_ERBFI);
        let t0 = 100;
        rig.at(t0);
        assert_eq!(rig.uart.receive(b"a"), 1);
        rig.uart.set_input_waiting(true);
        assert_eq!(rig.uart.next_deadline_ns(), Some(t0 + C9600));
        // 3 ms late: slots t0 + c, t0 + 2c and t0 + 3c have passed.
        rig.at(t0 + C9600 + 3_000_000);
        assert_eq!(rig.uart.rx_room(), 3);
        assert_eq!(rig.uart.receive(b"bcdefg"), 3);
        assert_eq!(rig.uart.rx_next_slot_ns, t0 + 4 * C9600);
        // The far end ran dry. The timeout counts from the last character's slot, not from
        // when the event loop handed it over.
        rig.uart.set_input_waiting(false);
        let due = t0 + 3 * C9600 + CTI_CHAR_TIMES * C9600;
        rig.irq_rises_at(due);
        assert_eq!(rig.iir() & IIR_ID_MASK, IIR_CTI);
        // An RBR read after a backdated arrival restarts the timeout from the read.
        assert_eq!(rig.uart.read(REG_RBR_THR), b'a');
        let read_at = due + 10;
        rig.at(read_at);
        assert_eq!(rig.uart.read(REG_RBR_THR), b'b');
        // After the idle line the next character arrives now, not in a past slot.
        let later = read_at + 20 * C9600;
        rig.at(later);
        assert_eq!(rig.uart.rx_room(), 1);
        assert_eq!(rig.uart.receive(b"hi"), 1);
        assert_eq!(rig.uart.rx_next_slot_ns, later + C9600);
        assert_eq!(
            rig.uart.next_deadline_ns(),
            Some(later + CTI_CHAR_TIMES * C9600)
        );
        // A character in an earlier slot than the last RBR read does not pull the timeout
        // back before the read.
        rig.uart.set_input_waiting(true);
        let late = later + 2 * C9600 + 5;
        rig.at(late);
        rig.uart.read(REG_RBR_THR);
        assert_eq!(rig.uart.receive(b"j"), 1);
        assert_eq!(rig.uart.rx_next_slot_ns, later + 2 * C9600);
        assert_eq!(rig.uart.cti_due(), Some(late + CTI_CHAR_TIMES * C9600));
    }

    #[test]
    fn thre_shows_in_lsr_on_time_while_output_waits_for_collection() {
        let mut rig = Rig::programmed(1, LCR_8N1);
        rig.uart.write(REG_IER, IER_ETBEI);
        rig.iir();
        assert!(!rig.irq.level());
        // Three FIFO-filling bursts, nothing collected and no tick: every THRE edge is visible
        // to the guest at its exact instant, and the guest's own access raises the interrupt.
        let mut start = 0;
        for burst in 0..3u64 {
            rig.at(start);
            for _ in 0..FIFO_SIZE {
                rig.uart.write(REG_RBR_THR, b'U');
            }
            assert!(!rig.irq.level());
            // The first byte of the first burst went straight to the shift register.
            let queued = if burst == 0 { FIFO_SIZE - 1 } else { FIFO_SIZE };
            let thre_at = start + queued as u64 * C115200;
            rig.at(thre_at - 1);
            assert_eq!(rig.lsr() & LSR_THRE, 0, "burst {burst}");
            rig.at(thre_at);
            assert_eq!(rig.lsr() & (LSR_THRE | LSR_TEMT), LSR_THRE, "burst {burst}");
            assert!(rig.irq.level());
            assert_eq!(rig.iir() & IIR_ID_MASK, IIR_THRI);
            start = thre_at;
        }
        assert_eq!(rig.uart.tx_out.len(), 3 * FIFO_SIZE - 1);
        assert_eq!(rig.drain().len(), 3 * FIFO_SIZE - 1);
    }

    #[test]
    fn rx_room_limited_by_fifo() {
        let mut rig = Rig::new(false);
        rig.uart.write(REG_IIR_FCR, FCR_FIFO_ENABLE);
        assert_eq!(rig.uart.rx_room(), FIFO_SIZE);
        assert_eq!(rig.uart.receive(&[7; 20]), FIFO_SIZE);
        assert_eq!(rig.uart.rx_room(), 0);
        rig.uart.set_input_waiting(true);
        assert_eq!(rig.uart.next_deadline_ns(), None);
        assert_eq!(rig.uart.arm_deadline(), None);
        assert!(!rig.uart.take_kick());
        // An RBR read opens room while input waits: the event loop must be kicked.
        rig.uart.read(REG_RBR_THR);
        assert_eq!(rig.uart.rx_room(), 1);
        assert!(rig.uart.take_kick());
        assert!(!rig.uart.take_kick());
        assert_eq!(rig.uart.stats().rx_overruns, 0);
    }

    #[test]
    fn loopback_data_and_modem_lines() {
        let mut rig = Rig::programmed(3, LCR_8N1);
        rig.uart.read(REG_MSR);
        rig.uart.write(REG_MCR, MCR_LOOP | MCR_OUT2);
        // Loopback: DCD follows OUT2, the rest follow their outputs (all low).
        assert_eq!(rig.uart.read(REG_MSR), MSR_DCD | MSR_DCTS | MSR_DDSR);
        rig.uart
            .write(REG_MCR, MCR_LOOP | MCR_DTR | MCR_RTS | MCR_OUT1);
        assert_eq!(
            rig.uart.read(REG_MSR),
            MSR_DSR | MSR_CTS | MSR_RI | MSR_DDSR | MSR_DCTS | MSR_DDCD
        );
        // RI falling sets TERI.
        rig.uart.write(REG_MCR, MCR_LOOP | MCR_DTR | MCR_RTS);
        assert_eq!(rig.uart.read(REG_MSR), MSR_DSR | MSR_CTS | MSR_TERI);
        // Far-end input is disconnected.
        assert_eq!(rig.uart.rx_room(), 0);
        rig.uart.receive_break();
        assert_eq!(rig.lsr() & LSR_DR, 0);
        // TX reaches RX at line speed, not the sink.
        rig.uart.write(REG_RBR_THR, b'L');
        rig.uart.write(REG_RBR_THR, b'M');
        assert_eq!(rig.lsr() & LSR_DR, 0);
        assert_eq!(rig.uart.next_deadline_ns(), Some(C38400));
        rig.at(C38400);
        assert_eq!(rig.lsr() & LSR_DR, LSR_DR);
        assert_eq!(rig.uart.read(REG_RBR_THR), b'L');
        rig.at(2 * C38400);
        assert_eq!(rig.uart.read(REG_RBR_THR), b'M');
        assert_eq!(rig.drain(), b"");
        assert_eq!(rig.uart.stats().looped_back, 2);
        // Leaving loopback restores the far end's lines.
        rig.uart.write(REG_MCR, MCR_OUT2);
        assert_eq!(
            rig.uart.read(REG_MSR) & !MSR_DELTA_MASK,
            MSR_DCD | MSR_DSR | MSR_CTS
        );
    }

    #[test]
    fn loopback_overrun() {
        let mut rig = Rig::programmed(1, LCR_8N1);
        rig.uart.write(REG_MCR, MCR_LOOP | MCR_OUT2);
        rig.uart.write(REG_IER, IER_ELSI);
        for b in 0..18u8 {
            rig.uart.write(REG_RBR_THR, b);
        }
        assert_eq!(rig.uart.stats().tx_overruns, 1);
        rig.at(17 * C115200);
        let lsr = rig.lsr();
        assert_eq!(lsr & (LSR_OE | LSR_DR), LSR_OE | LSR_DR);
        assert_eq!(rig.uart.stats().rx_overruns, 1);
        // The 17th byte was lost, the first 16 are kept.
        for b in 0..16u8 {
            assert_eq!(rig.uart.read(REG_RBR_THR), b);
        }
        assert_eq!(rig.lsr() & (LSR_OE | LSR_DR), 0);
    }

    #[test]
    fn overrun_in_16450_mode_overwrites() {
        let mut rig = Rig::new(true);
        rig.set_line(1, LCR_8N1);
        rig.uart.write(REG_MCR, MCR_LOOP);
        rig.uart.write(REG_RBR_THR, b'1');
        rig.uart.write(REG_RBR_THR, b'2');
        rig.at(2 * C115200);
        assert_eq!(rig.lsr() & (LSR_OE | LSR_DR), LSR_OE | LSR_DR);
        assert_eq!(rig.uart.read(REG_RBR_THR), b'2');
    }

    #[test]
    fn break_both_ways() {
        let mut rig = Rig::programmed(1, LCR_8N1);
        rig.uart.take_kick();
        rig.uart.arm_deadline();
        assert!(!rig.uart.break_active());
        assert!(!rig.uart.take_kick());
        rig.uart.write(REG_LCR, LCR_8N1 | LCR_BREAK);
        assert!(rig.uart.break_active());
        assert!(rig.uart.take_kick());
        rig.uart.write(REG_LCR, LCR_8N1);
        assert!(!rig.uart.break_active());
        // From the far end: NUL with BI, reported when at the top of the FIFO.
        rig.uart.write(REG_IER, IER_ELSI | IER_ERBFI);
        rig.feed(b'a');
        rig.uart.receive_break();
        assert_eq!(rig.iir() & IIR_ID_MASK, IIR_RDI);
        let lsr = rig.lsr();
        assert_eq!(lsr & (LSR_BI | LSR_RX_FIFO_ERROR), LSR_RX_FIFO_ERROR);
        assert_eq!(rig.uart.read(REG_RBR_THR), b'a');
        assert_eq!(rig.iir() & IIR_ID_MASK, IIR_RLSI);
        assert_eq!(
            rig.lsr() & (LSR_BI | LSR_DR | LSR_RX_FIFO_ERROR),
            LSR_BI | LSR_DR | LSR_RX_FIFO_ERROR
        );
        assert_eq!(rig.lsr() & (LSR_BI | LSR_RX_FIFO_ERROR), 0);
        assert_eq!(rig.uart.read(REG_RBR_THR), 0);
        // The break occupies the line: the next far-end character waits a character time.
        assert_eq!(rig.uart.rx_room(), 0);
        // Break in loopback reaches our own receiver, not the far end.
        rig.uart.write(REG_MCR, MCR_LOOP);
        rig.uart.write(REG_LCR, LCR_8N1 | LCR_BREAK);
        assert!(!rig.uart.break_active());
        assert_eq!(rig.lsr() & (LSR_BI | LSR_DR), LSR_BI | LSR_DR);
    }

    #[test]
    fn modem_deltas_on_connect_and_disconnect() {
        let mut rig = Rig::programmed(1, LCR_8N1);
        rig.uart.write(REG_IER, IER_EDSSI);
        assert!(!rig.irq.level());
        rig.uart.set_modem_inputs(ModemStatus::DISCONNECTED);
        assert!(rig.irq.level());
        assert_eq!(rig.iir() & IIR_ID_MASK, IIR_MSI);
        assert_eq!(rig.uart.read(REG_MSR), MSR_DCTS | MSR_DDSR | MSR_DDCD);
        assert!(!rig.irq.level());
        assert_eq!(rig.uart.read(REG_MSR), 0);
        rig.uart.set_modem_inputs(ModemStatus::CONNECTED);
        assert_eq!(
            rig.uart.read(REG_MSR),
            MSR_DCD | MSR_DSR | MSR_CTS | MSR_DCTS | MSR_DDSR | MSR_DDCD
        );
        // Same lines again: no delta.
        rig.uart.set_modem_inputs(ModemStatus::CONNECTED);
        assert_eq!(rig.uart.read(REG_MSR), MSR_DCD | MSR_DSR | MSR_CTS);
        // Ring: TERI only on the trailing edge.
        let ringing = ModemStatus {
            ri: true,
            ..ModemStatus::CONNECTED
        };
        rig.uart.set_modem_inputs(ringing);
        assert_eq!(rig.uart.read(REG_MSR) & MSR_DELTA_MASK, 0);
        rig.uart.set_modem_inputs(ModemStatus::CONNECTED);
        assert_eq!(rig.uart.read(REG_MSR) & MSR_DELTA_MASK, MSR_TERI);
    }

    #[test]
    fn backpressure_holds_without_loss() {
        let mut rig = Rig::programmed(1, LCR_8N1);
        rig.uart.write(REG_IER, IER_ETBEI);
        rig.uart.write(REG_RBR_THR, b'a');
        rig.uart.write(REG_RBR_THR, b'b');
        rig.at(C115200);
        let mut refused = 0;
        rig.uart.drain_tx(&mut |b: &[u8]| {
            refused += b.len();
            0
        });
        assert_eq!(refused, 1);
        // Stalled: 'b' is shifting (it started before the refusal), but nothing new starts.
        assert_eq!(rig.lsr() & (LSR_THRE | LSR_TEMT), 0);
        assert!(!rig.irq.level());
        assert_eq!(rig.uart.next_deadline_ns(), None);
        rig.uart.write(REG_RBR_THR, b'c');
        rig.at(100 * C115200);
        assert_eq!(rig.lsr() & (LSR_THRE | LSR_TEMT), 0);
        assert_eq!(rig.uart.tx_out, [b'a', b'b']);
        // The sink takes one byte: still stalled.
        rig.uart.drain_tx(&mut |b: &[u8]| {
            assert_eq!(b, b"ab");
            1
        });
        assert_eq!(rig.lsr() & LSR_THRE, 0);
        // Then everything: 'c' starts now and THRE rises; the FIFO never held two bytes, so
        // its interrupt follows one character time less a stop bit later.
        assert_eq!(rig.drain(), b"b");
        let t = rig.clock.now_ns();
        assert_eq!(rig.lsr() & (LSR_THRE | LSR_TEMT), LSR_THRE);
        assert!(!rig.irq.level());
        assert_eq!(
            rig.uart.next_deadline_ns(),
            Some(t + (C115200 - C115200 / 10))
        );
        rig.at(t + (C115200 - C115200 / 10));
        rig.uart.tick();
        assert!(rig.irq.level());
        rig.at(t + C115200);
        assert_eq!(rig.drain(), b"c");
        assert_eq!(rig.lsr() & (LSR_THRE | LSR_TEMT), LSR_THRE | LSR_TEMT);
        assert_eq!(rig.uart.stats().transmitted, 3);
    }

    #[test]
    fn pacing_off_is_instant() {
        let mut rig = Rig::new(false);
        rig.uart.write(REG_IIR_FCR, FCR_FIFO_ENABLE);
        rig.uart.write(REG_MCR, MCR_OUT2);
        for &b in b"hello" {
            rig.uart.write(REG_RBR_THR, b);
            assert_eq!(rig.lsr() & (LSR_THRE | LSR_TEMT), LSR_THRE | LSR_TEMT);
        }
        assert_eq!(rig.uart.next_deadline_ns(), Some(0));
        assert_eq!(rig.drain(), b"hello");
        assert_eq!(rig.uart.next_deadline_ns(), None);
        // Uncollected output is bounded: then THRE clears until the event loop collects.
        for b in 0..TX_HOLD_LIMIT + 3 {
            rig.uart.write(REG_RBR_THR, b as u8);
        }
        assert_eq!(rig.lsr() & LSR_THRE, 0);
        assert_eq!(rig.drain().len(), TX_HOLD_LIMIT);
        assert_eq!(rig.lsr() & LSR_THRE, LSR_THRE);
        assert_eq!(rig.drain(), vec![0, 1, 2]);
        // Input is limited by FIFO room only.
        assert_eq!(rig.uart.receive(b"0123456789"), 10);
        assert_eq!(rig.uart.rx_room(), FIFO_SIZE - 10);
    }

    #[test]
    fn fifo_control() {
        let mut rig = Rig::programmed(1, LCR_8N1);
        assert_eq!(rig.iir() & IIR_FIFO_ENABLED, IIR_FIFO_ENABLED);
        rig.feed(b'a');
        for b in 0..5u8 {
            rig.uart.write(REG_RBR_THR, b);
        }
        rig.uart.write(REG_IER, IER_ETBEI);
        assert_eq!(rig.iir() & IIR_ID_MASK, IIR_NONE);
        rig.uart.write(REG_IIR_FCR, FCR_FIFO_ENABLE | FCR_TX_RESET);
        // XMIT reset: FIFO empty, THRE and its interrupt back; the shift register finishes.
        assert_eq!(
            rig.lsr() & (LSR_THRE | LSR_TEMT | LSR_DR),
            LSR_THRE | LSR_DR
        );
        assert_eq!(rig.iir() & IIR_ID_MASK, IIR_THRI);
        assert_eq!(rig.uart.stats().tx_discarded, 4);
        rig.uart.write(REG_IIR_FCR, FCR_FIFO_ENABLE | FCR_RX_RESET);
        assert_eq!(rig.lsr() & LSR_DR, 0);
        // Disabling the FIFOs: 16450 mode, IIR bits 6-7 clear.
        rig.uart.write(REG_IIR_FCR, 0);
        assert_eq!(rig.iir() & IIR_FIFO_ENABLED, 0);
        rig.at(C115200);
        assert_eq!(rig.drain(), vec![0]);
    }

    #[test]
    fn kick_on_new_output_and_params() {
        let mut rig = Rig::programmed(1, LCR_8N1);
        assert!(rig.uart.take_kick());
        assert_eq!(rig.uart.arm_deadline(), None);
        assert!(!rig.uart.take_kick());
        rig.uart.write(REG_RBR_THR, b'a');
        assert!(rig.uart.take_kick());
        // Outstanding until re-armed.
        rig.uart.write(REG_LCR, 0x02);
        assert!(!rig.uart.take_kick());
        assert_eq!(rig.uart.arm_deadline(), Some(C115200));
        // More output makes the collection deadline later: no kick needed.
        rig.uart.write(REG_RBR_THR, b'b');
        assert!(!rig.uart.take_kick());
    }

    // Property test: random guest and far-end activity never panics and keeps invariants.

    #[derive(Debug, Clone)]
    enum Op {
        Read(u8),
        Write(u8, u8),
        Receive(Vec<u8>),
        Break,
        Advance(u64),
        Drain(usize),
        Modem(ModemStatus),
        Tick,
        Waiting(bool),
        Kick,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u8..16).prop_map(Op::Read),
            6 => (0u8..8, any::<u8>()).prop_map(|(o, v)| Op::Write(o, v)),
            // Favour sane line settings so that time matters within the test's time span.
            2 => (prop_oneof![Just(0x03u8), Just(0x83), Just(0x1e), Just(0x40)])
                .prop_map(|v| Op::Write(REG_LCR, v)),
            2 => (prop_oneof![Just(0u8), Just(1), Just(2), Just(12)])
                .prop_map(|v| Op::Write(REG_DLL, v)),
            2 => any::<u8>().prop_map(|v| Op::Write(REG_RBR_THR, v)),
            3 => proptest::collection::vec(any::<u8>(), 0..24).prop_map(Op::Receive),
            1 => Just(Op::Break),
            4 => prop_oneof![0u64..100_000, 0u64..20_000_000].prop_map(Op::Advance),
            3 => (0usize..20).prop_map(Op::Drain),
            1 => (any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>())
                .prop_map(|(dcd, dsr, cts, ri)| Op::Modem(ModemStatus { dcd, dsr, cts, ri })),
            1 => Just(Op::Tick),
            1 => any::<bool>().prop_map(Op::Waiting),
            1 => Just(Op::Kick),
        ]
    }

    fn check_invariants(rig: &Rig, delivered: u64, thr_writes: u64) -> Result<(), TestCaseError> {
        let u = &rig.uart;
        prop_assert!(u.rx.len() <= FIFO_SIZE);
        prop_assert!(u.tx_fifo.len() <= FIFO_SIZE);
        prop_assert!(u.tx_out.len() <= TX_HOLD_LIMIT);
        if !u.fifo_enabled() {
            prop_assert!(u.rx.len() <= 1 && u.tx_fifo.len() <= 1);
        }
        let lsr = u.lsr();
        if lsr & LSR_THRE != 0 {
            prop_assert!(u.tx_fifo.is_empty());
        }
        if lsr & LSR_TEMT != 0 {
            prop_assert!(lsr & LSR_THRE != 0 && u.tsr.is_none());
        }
        prop_assert_eq!(lsr & LSR_DR != 0, !u.rx.is_empty());
        if u.thr_ipending {
            prop_assert!(u.thre());
        }
        let iir = u.pending_iir();
        prop_assert!([IIR_NONE, IIR_MSI, IIR_THRI, IIR_RDI, IIR_RLSI, IIR_CTI].contains(&iir));
        let expected = iir != IIR_NONE && u.mcr & MCR_OUT2 != 0;
        prop_assert_eq!(u.irq_level, expected);
        prop_assert_eq!(rig.irq.level(), expected);
        // Output conservation: every THR write is delivered, still in the UART, looped back,
        // or discarded by the guest itself.
        let s = u.stats();
        let held = (u.tx_fifo.len() + usize::from(u.tsr.is_some()) + u.tx_out.len()) as u64;
        prop_assert_eq!(s.transmitted, delivered);
        prop_assert_eq!(
            thr_writes,
            delivered + held + s.looped_back + s.tx_overruns + s.tx_discarded
        );
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn random_activity_keeps_invariants(
            pacing in any::<bool>(),
            ops in proptest::collection::vec(op(), 1..200),
        ) {
            let mut rig = Rig::new(pacing);
            let mut delivered = 0u64;
            let mut thr_writes = 0u64;
            for op in ops {
                match op {
                    Op::Read(o) => {
                        rig.uart.read(o);
                    }
                    Op::Write(o, v) => {
                        if o & OFFSET_MASK == REG_RBR_THR && rig.uart.lcr & LCR_DLAB == 0 {
                            thr_writes += 1;
                        }
                        rig.uart.write(o, v);
                    }
                    Op::Receive(data) => {
                        let room = rig.uart.rx_room();
                        let took = rig.uart.receive(&data);
                        prop_assert!(took <= room && took <= data.len());
                    }
                    Op::Break => rig.uart.receive_break(),
                    Op::Advance(ns) => rig.clock.advance(ns),
                    Op::Drain(max) => {
                        let mut got = 0;
                        rig.uart.drain_tx(&mut |b: &[u8]| {
                            let n = b.len().min(max.saturating_sub(got));
                            got += n;
                            n
                        });
                        delivered += got as u64;
                    }
                    Op::Modem(m) => rig.uart.set_modem_inputs(m),
                    Op::Tick => rig.uart.tick(),
                    Op::Waiting(w) => rig.uart.set_input_waiting(w),
                    Op::Kick => {
                        rig.uart.take_kick();
                        if let Some(d) = rig.uart.arm_deadline() {
                            // Everything due has been applied: a deadline is never in the past.
                            prop_assert!(d >= rig.uart.now);
                        }
                    }
                }
                check_invariants(&rig, delivered, thr_writes)?;
            }
        }
    }
}
