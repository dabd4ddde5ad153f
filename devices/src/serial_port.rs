//! An ISA serial port: a [`Serial`] register model coupled to a chardev [`Backend`].
//!
//! The vCPU side reaches the port through [`BusDevice`]: it does the register work and, when
//! the event loop has something to do (new output, changed line parameters, RX room opened),
//! writes the "kick" eventfd. The event-loop side calls [`SerialPort::service`] on a kick, on
//! the port's timer, or after [`SerialPort::on_backend_ready`]; `service` moves output to the
//! backend, pulls input only as far as the UART can take it, forwards connection and break
//! events, and returns the next instant its timer must fire.
//!
//! This module must not block, must not read from the backend more than the UART can accept,
//! must not drop guest output the backend has merely refused (that is backpressure: the
//! transmitter holds), and must not know anything about KVM or about a particular event loop.

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::Arc;

use chardev::{Backend, Event, LineParams, ModemStatus, Readiness, Registrar, Token};
use thiserror::Error;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::bus::BusDevice;
use crate::serial::{Serial, SerialConfig, FIFO_SIZE, REGISTER_SPAN};
use crate::{Clock, IrqLine};

/// Bytes of port space a serial port occupies.
pub const SERIAL_PORT_SPAN: u64 = REGISTER_SPAN as u64;
/// What an ISA read of a byte outside the device returns (the data lines float high).
const UNCLAIMED_BYTE: u8 = 0xff;
/// Rounds of "do I/O, then handle the events it produced" in one [`SerialPort::service`].
const SERVICE_ROUNDS: usize = 4;
/// How often the modem status inputs of a backend with real lines (a host tty) are read:
/// 100 times a second, as QEMU does. Nothing announces their changes.
pub const MODEM_POLL_NS: u64 = 10_000_000;

/// Errors from building a serial port.
#[derive(Debug, Error)]
pub enum SerialPortError {
    /// The kick eventfd could not be created.
    #[error("cannot create the serial kick eventfd")]
    Kick(#[source] io::Error),
}

/// A 16550A on the ISA bus, wired to a chardev backend. See the module documentation.
pub struct SerialPort {
    serial: Serial,
    backend: Box<dyn Backend>,
    /// What the backend is attached to (a swapped-in backend is attached to it too).
    registrar: Option<Registrar>,
    kick: EventFd,
    /// Line parameters last given to the backend.
    sent_params: Option<LineParams>,
    /// Break state the backend was last told about.
    sent_break: bool,
    /// DTR and RTS the backend was last told about.
    sent_modem_control: Option<(bool, bool)>,
    /// The backend has real modem lines: MSR follows them, polled, not the connection state.
    real_modem_lines: bool,
    /// When the modem lines are read next (with `real_modem_lines`).
    next_modem_poll: u64,
    clock: Arc<dyn Clock>,
    /// What the backend was last told by `set_input_wanted`.
    input_wanted: Option<bool>,
    /// Input taken from the backend that the UART could not take yet (normally empty: reads
    /// are sized to the UART's room).
    carry: Vec<u8>,
    /// Output lost to backend errors other than "would block".
    output_errors: u64,
}

impl SerialPort {
    /// A port in its reset state, its modem inputs following whether `backend` has a peer.
    pub fn new(
        config: SerialConfig,
        irq: Arc<dyn IrqLine>,
        clock: Arc<dyn Clock>,
        mut backend: Box<dyn Backend>,
    ) -> Result<Self, SerialPortError> {
        let kick = EventFd::new(EFD_NONBLOCK).map_err(SerialPortError::Kick)?;
        let (inputs, real_modem_lines) = modem_for(&mut *backend);
        let serial = Serial::new(config, irq, Arc::clone(&clock)).with_modem_inputs(inputs);
        Ok(SerialPort {
            serial,
            backend,
            registrar: None,
            kick,
            sent_params: None,
            sent_break: false,
            sent_modem_control: None,
            real_modem_lines,
            next_modem_poll: 0,
            clock,
            input_wanted: None,
            carry: Vec::with_capacity(FIFO_SIZE),
            output_errors: 0,
        })
    }

    /// The eventfd the port writes when the event loop must call [`SerialPort::service`].
    pub fn kick_fd(&self) -> RawFd {
        self.kick.as_raw_fd()
    }

    /// Attach the backend to the event loop: it registers its fds with `reg` from now on, and
    /// so does any backend swapped in later.
    pub fn attach_backend(&mut self, reg: Registrar) {
        self.backend.attach(reg.clone());
        self.registrar = Some(reg);
    }

    /// The event loop saw `readiness` on the backend's fd registered with `token`. Call
    /// [`SerialPort::service`] afterwards.
    pub fn on_backend_ready(&mut self, token: Token, readiness: Readiness) {
        self.backend.on_ready(token, readiness);
    }

    /// Run the port: move finished output to the backend, pull input as far as the UART can
    /// take it, forward backend events, line parameters and break. Returns the clock instant
    /// at which the event loop must call `service` again without any other wakeup (`None`:
    /// only a kick or backend readiness will need it).
    pub fn service(&mut self) -> Option<u64> {
        self.consume_kick();
        self.serial.tick();
        self.poll_modem_lines();
        self.handle_events();
        let mut settled = false;
        for _ in 0..SERVICE_ROUNDS {
            self.flush_output();
            self.sync_line_state();
            self.pull_input();
            if !self.handle_events() {
                settled = true;
                break;
            }
        }
        self.update_input_wanted();
        let mut deadline = self.serial.arm_deadline();
        if self.real_modem_lines {
            deadline = Some(deadline.map_or(self.next_modem_poll, |d| d.min(self.next_modem_poll)));
        }
        if settled {
            deadline
        } else {
            // The backend kept producing events: come back at once.
            Some(0)
        }
    }

    /// Ask the event loop to call [`SerialPort::service`] soon: the backend holds an event
    /// that no fd signals (a break from the monitor's `chardev-send-break`).
    pub fn wake(&self) {
        self.write_kick();
    }

    /// Swap in a new backend (chardev hot-swap) and return the old one. The new backend is
    /// told the line parameters, break state and input interest; the modem inputs follow its
    /// connection state. Output held in the UART goes to the new backend.
    pub fn replace_backend(&mut self, backend: Box<dyn Backend>) -> Box<dyn Backend> {
        let mut old = std::mem::replace(&mut self.backend, backend);
        old.detach();
        if let Some(reg) = &self.registrar {
            self.backend.attach(reg.clone());
        }
        self.resync_backend();
        old
    }

    /// Forget what the backend was told, so the next service tells it again, and take the
    /// modem inputs from its connection state. No input waited on the line: the first
    /// character arrives when it is read, not in slots missed before.
    fn resync_backend(&mut self) {
        self.sent_params = None;
        self.sent_break = false;
        self.sent_modem_control = None;
        self.input_wanted = None;
        self.serial.set_input_waiting(false);
        let (inputs, real) = modem_for(&mut *self.backend);
        self.real_modem_lines = real;
        self.next_modem_poll = 0;
        self.serial.set_modem_inputs(inputs);
        self.write_kick();
    }

    /// Machine reset: the UART back to its power-on registers ([`Serial::reset`]), the
    /// backend kept with its connection and peers. The backend is told the reset line
    /// parameters and break state on the next [`SerialPort::service`], which the kick asks for.
    pub fn reset(&mut self) {
        self.serial.reset();
        self.resync_backend();
    }

    /// The UART.
    pub fn serial(&self) -> &Serial {
        &self.serial
    }

    /// The UART, mutably.
    pub fn serial_mut(&mut self) -> &mut Serial {
        &mut self.serial
    }

    /// The backend.
    pub fn backend(&self) -> &dyn Backend {
        &*self.backend
    }

    /// The backend, for calls the port does not make itself (a wait for the first client
    /// before the guest starts, a mux's quit request).
    pub fn backend_mut(&mut self) -> &mut dyn Backend {
        &mut *self.backend
    }

    /// Output bytes lost because the backend failed with an error other than "would block".
    pub fn output_errors(&self) -> u64 {
        self.output_errors
    }

    fn consume_kick(&mut self) {
        // EAGAIN just means nobody kicked.
        let _ = self.kick.read();
    }

    fn write_kick(&self) {
        if let Err(e) = self.kick.write(1) {
            // A full counter (EAGAIN) already means "kicked".
            if e.kind() != io::ErrorKind::WouldBlock {
                log::warn!("serial: kick eventfd: {e}");
            }
        }
    }

    fn kick_if_needed(&mut self) {
        if self.serial.take_kick() {
            self.write_kick();
        }
    }

    /// Forward backend events to the UART. Returns whether there were any.
    fn handle_events(&mut self) -> bool {
        let events = self.backend.take_events();
        for event in &events {
            match event {
                // A real line's inputs are its own, whoever holds the other end.
                Event::Opened | Event::Closed if self.real_modem_lines => {}
                Event::Opened => self.serial.set_modem_inputs(ModemStatus::CONNECTED),
                Event::Closed => self.serial.set_modem_inputs(ModemStatus::DISCONNECTED),
                Event::Break => self.serial.receive_break(),
                Event::Readable => self.serial.set_input_waiting(true),
                // The next flush retries; a UART has no notion of a terminal size.
                Event::Writable | Event::Resized { .. } => {}
            }
        }
        !events.is_empty()
    }

    fn flush_output(&mut self) {
        let backend = &mut self.backend;
        let errors = &mut self.output_errors;
        self.serial
            .drain_tx(&mut |bytes: &[u8]| match backend.write(bytes) {
                Ok(n) => n.min(bytes.len()),
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::Interrupted =>
                {
                    0
                }
                Err(e) => {
                    // Not backpressure but a broken backend (a missing peer goes to the
                    // backend's replay ring, not here). Holding the bytes would wedge the guest's
                    // transmitter for good, so they are counted and dropped.
                    if *errors == 0 {
                        log::warn!("serial: backend {} write failed: {e}", backend.kind());
                    }
                    *errors += bytes.len() as u64;
                    bytes.len()
                }
            });
    }

    /// Tell a backend with a real line (a host tty) what the guest set: line parameters,
    /// break, DTR/RTS. Backends without one have nothing to tell.
    fn sync_line_state(&mut self) {
        let params = self.serial.line_params();
        let brk = self.serial.break_active();
        let outputs = self.serial.modem_outputs();
        let Some(line) = self.backend.line() else {
            self.sent_params = Some(params);
            self.sent_break = brk;
            self.sent_modem_control = Some(outputs);
            return;
        };
        if self.sent_params != Some(params) {
            line.set_line_params(params);
            self.sent_params = Some(params);
        }
        if brk && !self.sent_break {
            line.send_break();
        }
        self.sent_break = brk;
        if self.sent_modem_control != Some(outputs) {
            line.set_modem_control(outputs.0, outputs.1);
            self.sent_modem_control = Some(outputs);
        }
    }

    /// Read a real line's modem inputs into MSR when the poll interval has passed.
    fn poll_modem_lines(&mut self) {
        if !self.real_modem_lines {
            return;
        }
        let now = self.clock.now_ns();
        if now < self.next_modem_poll {
            return;
        }
        self.next_modem_poll = now + MODEM_POLL_NS;
        // Lines that went away (the backend said why) fall back to the connection state.
        let (inputs, real) = modem_for(&mut *self.backend);
        self.real_modem_lines = real;
        self.serial.set_modem_inputs(inputs);
    }

    fn pull_input(&mut self) {
        if !self.carry.is_empty() {
            let taken = self.serial.receive(&self.carry);
            self.carry.drain(..taken);
            if !self.carry.is_empty() {
                self.serial.set_input_waiting(true);
                return;
            }
        }
        let room = self.serial.rx_room();
        if room == 0 {
            // Unknown whether input waits: assume it does, so room opening wakes us.
            self.serial.set_input_waiting(true);
            return;
        }
        let mut buf = [0u8; FIFO_SIZE];
        let want = room.min(buf.len());
        let got = match self.backend.read(&mut buf[..want]) {
            Ok(n) => n.min(want),
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted =>
            {
                0
            }
            Err(e) => {
                log::warn!("serial: backend {} read failed: {e}", self.backend.kind());
                0
            }
        };
        let taken = self.serial.receive(&buf[..got]);
        self.carry.extend_from_slice(&buf[taken..got]);
        // A full read may have left more behind; a short one drained the backend.
        self.serial
            .set_input_waiting(got == want || !self.carry.is_empty());
    }

    fn update_input_wanted(&mut self) {
        // Input is wanted only while the UART has room now. While it waits for its next
        // line slot the port's timer covers it instead: a readable fd that is not read would
        // keep a level-triggered event loop spinning.
        let wanted = self.carry.is_empty() && self.serial.rx_room() > 0;
        if self.input_wanted != Some(wanted) {
            self.backend.set_input_wanted(wanted);
            self.input_wanted = Some(wanted);
        }
    }
}

/// A backend's modem inputs, and whether they are a real line's: its lines where it has
/// them, else up while it has a peer.
fn modem_for(backend: &mut dyn Backend) -> (ModemStatus, bool) {
    match backend.line().and_then(|l| l.modem_status()) {
        Some(status) => (status, true),
        None if backend.is_connected() => (ModemStatus::CONNECTED, false),
        None => (ModemStatus::DISCONNECTED, false),
    }
}

/// The ISA bus turns an access wider than the device's 8-bit data path into consecutive byte
/// cycles at increasing addresses, so a 16-bit `in` at the base reads RBR then IER. Bytes
/// beyond the port's range float high on reads and are ignored on writes.
impl BusDevice for SerialPort {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (index, byte) in data.iter_mut().enumerate() {
            *byte = match register_at(offset, index) {
                Some(reg) => self.serial.read(reg),
                None => UNCLAIMED_BYTE,
            };
        }
        self.kick_if_needed();
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (index, &byte) in data.iter().enumerate() {
            if let Some(reg) = register_at(offset, index) {
                self.serial.write(reg, byte);
            }
        }
        self.kick_if_needed();
    }

    fn reset(&mut self) {
        SerialPort::reset(self);
    }
}

/// The register the `index`th byte of an access at `offset` reaches, if it is in range.
fn register_at(offset: u64, index: usize) -> Option<u8> {
    let addr = offset.checked_add(u64::try_from(index).ok()?)?;
    if addr < SERIAL_PORT_SPAN {
        u8::try_from(addr).ok()
    } else {
        None
    }
}

#[cfg(test)]
mod tests {

    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::serial::testing::{FakeClock, RecordingIrq};
    use crate::serial::{
        FCR_FIFO_ENABLE, FCR_RX_RESET, FCR_TX_RESET, IER_EDSSI, IER_ERBFI, IER_ETBEI, IIR_ID_MASK,
        IIR_MSI, IIR_THRI, LCR_BREAK, LCR_DLAB, LCR_WORD_LENGTH_MASK, LSR_BI, LSR_DR, LSR_OE,
        LSR_TEMT, LSR_THRE, MCR_DTR, MCR_LOOP, MCR_OUT2, MCR_RTS, MSR_CTS, MSR_DCD, MSR_DCTS,
        MSR_DDCD, MSR_DDSR, MSR_DSR, MSR_RI, REG_DLL, REG_DLM, REG_IER, REG_IIR_FCR, REG_LCR,
        REG_LSR, REG_MCR, REG_MSR, REG_RBR_THR, REG_SCR, TX_COLLECT_BATCH,
    };

    /// 8 data bits, no parity, 1 stop bit.
    const LCR_8N1: u8 = LCR_WORD_LENGTH_MASK;
    /// 115200 baud 8N1.
    const C115200: u64 = 86_805;
    /// 9600 baud 8N1.
    const C9600: u64 = 1_041_666;

    use crate::fake_backend::{FakeBackend, FakeState};

    struct Rig {
        clock: Arc<FakeClock>,
        port: SerialPort,
        state: Arc<Mutex<FakeState>>,
    }

    impl Rig {
        fn new(connected: bool) -> Rig {
            let clock = Arc::new(FakeClock::default());
            let irq = Arc::new(RecordingIrq::default());
            let (backend, state) = FakeBackend::boxed(connected);
            let port = SerialPort::new(SerialConfig::default(), irq, clock.clone(), backend)
                .expect("eventfd");
            Rig { clock, port, state }
        }

        /// Divisor, 8N1, FIFOs on, OUT2.
        fn program(&mut self, divisor: u16) {
            let [lo, hi] = divisor.to_le_bytes();
            self.outb(REG_LCR, LCR_DLAB);
            self.outb(REG_DLL, lo);
            self.outb(REG_DLM, hi);
            self.outb(REG_LCR, LCR_8N1);
            self.outb(REG_IIR_FCR, FCR_FIFO_ENABLE | FCR_RX_RESET | FCR_TX_RESET);
            self.outb(REG_MCR, MCR_OUT2);
        }

        fn outb(&mut self, reg: u8, value: u8) {
            self.port.write(u64::from(reg), &[value]);
        }

        fn inb(&mut self, reg: u8) -> u8 {
            let mut b = [0u8];
            self.port.read(u64::from(reg), &mut b);
            b[0]
        }

        fn state(&self) -> std::sync::MutexGuard<'_, FakeState> {
            crate::bus::lock(&self.state)
        }

        /// Whether the kick eventfd was written since the last look (and reset it).
        fn kicked(&self) -> bool {
            self.port.kick.read().is_ok()
        }

        /// Play the event loop on simulated time up to `until`: service, sleep to the
        /// returned deadline, repeat.
        fn run_until(&mut self, until: u64) {
            for _ in 0..100_000 {
                let now = self.clock.now_ns();
                match self.port.service() {
                    // Due already: service again at once.
                    Some(t) if t <= now => {}
                    Some(t) if t <= until => self.clock.set(t),
                    _ if now >= until => return,
                    _ => self.clock.set(until),
                }
            }
            panic!("the port never settled (busy loop)");
        }
    }

    #[test]
    fn output_leaves_at_line_rate() {
        let mut rig = Rig::new(true);
        rig.program(1);
        rig.port.service();
        let msg = b"hello, world";
        for &b in msg {
            rig.outb(REG_RBR_THR, b);
        }
        assert!(rig.kicked());
        let n = msg.len() as u64;
        // The first batch is collected as soon as it has finished.
        assert_eq!(rig.port.service(), Some(TX_COLLECT_BATCH as u64 * C115200));
        // Part way: exactly the characters whose stop bit has ended.
        rig.clock.set(5 * C115200 - 1);
        rig.port.service();
        assert_eq!(rig.state().out, b"hell");
        rig.clock.set(5 * C115200);
        rig.port.service();
        assert_eq!(rig.state().out, b"hello");
        rig.run_until(n * C115200);
        assert_eq!(rig.state().out, msg);
        assert_eq!(
            rig.inb(REG_LSR) & (LSR_THRE | LSR_TEMT),
            LSR_THRE | LSR_TEMT
        );
        assert_eq!(rig.port.service(), None);
    }

    #[test]
    fn refused_output_holds_then_flows_without_loss() {
        let mut rig = Rig::new(true);
        rig.program(1);
        rig.state().budget = Some(0);
        for &b in b"abc" {
            rig.outb(REG_RBR_THR, b);
        }
        rig.run_until(10 * C115200);
        assert!(rig.state().out.is_empty());
        // Transmitter stalled: THRE and TEMT clear; no timer needed while the backend is full.
        assert_eq!(rig.inb(REG_LSR) & (LSR_THRE | LSR_TEMT), 0);
        assert_eq!(rig.port.service(), None);
        // The backend takes one byte, then says it is writable again.
        rig.state().budget = Some(1);
        rig.state().events.push(Event::Writable);
        rig.port.service();
        assert_eq!(rig.state().out, b"a");
        assert_eq!(rig.inb(REG_LSR) & LSR_THRE, 0);
        rig.state().budget = None;
        rig.state().events.push(Event::Writable);
        rig.port.service();
        rig.run_until(20 * C115200);
        assert_eq!(rig.state().out, b"abc");
        assert_eq!(
            rig.inb(REG_LSR) & (LSR_THRE | LSR_TEMT),
            LSR_THRE | LSR_TEMT
        );
        assert_eq!(rig.port.output_errors(), 0);
    }

    #[test]
    fn input_pulled_no_faster_than_the_line() {
        let mut rig = Rig::new(true);
        rig.program(12);
        rig.state().input.extend(b"abcdefgh".iter());
        rig.clock.set(10 * C9600);
        let start = rig.clock.now_ns();
        let deadline = rig.port.service();
        // One character now, the next slot one character time later.
        assert_eq!(rig.state().read_sizes, vec![1]);
        assert_eq!(deadline, Some(start + C9600));
        assert_eq!(rig.state().input_wanted, Some(false));
        // Halfway to the slot nothing more is read.
        rig.clock.set(start + C9600 / 2);
        rig.port.service();
        assert_eq!(rig.state().read_sizes, vec![1]);
        // Every read asks for at most the room the UART has.
        rig.run_until(start + 5 * C9600);
        {
            let s = rig.state();
            assert!(s.read_sizes.iter().all(|&n| n == 1), "{:?}", s.read_sizes);
            assert_eq!(s.input.len(), 2);
        }
        let mut got = Vec::new();
        while rig.inb(REG_LSR) & LSR_DR != 0 {
            got.push(rig.inb(REG_RBR_THR));
        }
        assert_eq!(got, b"abcdef");
        rig.run_until(start + 20 * C9600);
        assert!(rig.state().input.is_empty());
        // Input exhausted: the backend is asked to poll for more.
        assert_eq!(rig.state().input_wanted, Some(true));
    }

    #[test]
    fn full_fifo_stops_input_until_the_guest_reads() {
        let mut rig = Rig::new(true);
        rig.program(1);
        rig.state().input.extend([7u8; 40].iter());
        rig.run_until(100 * C115200);
        assert_eq!(rig.state().input.len(), 40 - FIFO_SIZE);
        assert_eq!(rig.state().input_wanted, Some(false));
        assert_eq!(rig.port.service(), None);
        // Draining one byte opens room: the vCPU side kicks the event loop.
        rig.inb(REG_RBR_THR);
        assert!(rig.kicked());
        rig.port.service();
        assert_eq!(rig.state().input.len(), 40 - FIFO_SIZE - 1);
        assert_eq!(rig.inb(REG_LSR) & LSR_OE, 0, "no overrun");
    }

    #[test]
    fn connection_events_drive_msr() {
        let mut rig = Rig::new(false);
        rig.program(1);
        rig.outb(REG_IER, IER_EDSSI);
        assert_eq!(rig.inb(REG_MSR), 0);
        rig.state().events.push(Event::Opened);
        rig.port.service();
        assert_eq!(rig.inb(REG_IIR_FCR) & IIR_ID_MASK, IIR_MSI);
        assert_eq!(
            rig.inb(REG_MSR),
            MSR_DCD | MSR_DSR | MSR_CTS | MSR_DCTS | MSR_DDSR | MSR_DDCD
        );
        assert_eq!(rig.inb(REG_MSR), MSR_DCD | MSR_DSR | MSR_CTS);
        rig.state().events.push(Event::Closed);
        rig.port.service();
        assert_eq!(rig.inb(REG_MSR), MSR_DCTS | MSR_DDSR | MSR_DDCD);
    }

    #[test]
    fn dtr_and_rts_reach_the_backend_except_in_loopback() {
        let mut rig = Rig::new(true);
        rig.program(1);
        rig.port.service();
        assert_eq!(
            rig.state().modem_control,
            vec![(false, false)],
            "reset: both low"
        );
        rig.outb(REG_MCR, MCR_OUT2 | MCR_DTR);
        rig.port.service();
        rig.outb(REG_MCR, MCR_OUT2 | MCR_DTR | MCR_RTS);
        rig.port.service();
        rig.port.service();
        // Loopback holds the outputs inactive on the line.
        rig.outb(REG_MCR, MCR_LOOP | MCR_DTR | MCR_RTS);
        rig.port.service();
        rig.outb(REG_MCR, MCR_DTR | MCR_RTS);
        rig.port.service();
        assert_eq!(
            rig.state().modem_control,
            vec![
                (false, false),
                (true, false),
                (true, true),
                (false, false),
                (true, true)
            ],
            "only changes are sent"
        );
    }

    #[test]
    fn real_modem_lines_are_polled_into_msr() {
        let clock = Arc::new(FakeClock::default());
        let irq = Arc::new(RecordingIrq::default());
        let (backend, state) = FakeBackend::boxed(true);
        crate::bus::lock(&state).modem_status = Some(ModemStatus {
            dcd: false,
            dsr: true,
            cts: true,
            ri: false,
        });
        let mut rig = Rig {
            port: SerialPort::new(SerialConfig::default(), irq, clock.clone(), backend)
                .expect("eventfd"),
            clock,
            state,
        };
        rig.program(1);
        // The line's own inputs from the start, not "a peer is connected".
        assert_eq!(rig.inb(REG_MSR), MSR_DSR | MSR_CTS);
        rig.outb(REG_IER, IER_EDSSI);
        // A connection event does not override a real line.
        rig.state().events.push(Event::Opened);
        let t0 = rig.clock.now_ns();
        let deadline = rig.port.service();
        assert_eq!(rig.inb(REG_MSR), MSR_DSR | MSR_CTS);
        // The port asks to be serviced again within one poll interval.
        assert!(
            deadline.is_some_and(|d| d <= t0 + MODEM_POLL_NS),
            "{deadline:?}"
        );
        // Carrier comes up, CTS drops: seen at the next poll, with deltas and MSI.
        rig.state().modem_status = Some(ModemStatus {
            dcd: true,
            dsr: true,
            cts: false,
            ri: true,
        });
        let reads = rig.state().modem_reads;
        rig.port.service();
        assert_eq!(
            rig.state().modem_reads,
            reads,
            "not polled before the interval"
        );
        rig.clock.set(t0 + MODEM_POLL_NS);
        rig.port.service();
        assert_eq!(rig.inb(REG_IIR_FCR) & IIR_ID_MASK, IIR_MSI);
        assert_eq!(
            rig.inb(REG_MSR),
            MSR_DCD | MSR_DSR | MSR_RI | MSR_DDCD | MSR_DCTS
        );
        assert_eq!(rig.inb(REG_MSR), MSR_DCD | MSR_DSR | MSR_RI);
    }

    #[test]
    fn backend_break_and_guest_break() {
        let mut rig = Rig::new(true);
        rig.program(1);
        rig.state().events.push(Event::Break);
        rig.port.service();
        assert_eq!(rig.inb(REG_LSR) & (LSR_BI | LSR_DR), LSR_BI | LSR_DR);
        assert_eq!(rig.inb(REG_RBR_THR), 0);
        rig.port.service();
        assert_eq!(rig.state().breaks, 0);
        rig.outb(REG_LCR, LCR_8N1 | LCR_BREAK);
        assert!(rig.kicked());
        rig.port.service();
        rig.port.service();
        assert_eq!(rig.state().breaks, 1);
        rig.outb(REG_LCR, LCR_8N1);
        rig.port.service();
        rig.outb(REG_LCR, LCR_8N1 | LCR_BREAK);
        rig.port.service();
        assert_eq!(rig.state().breaks, 2);
    }

    #[test]
    fn line_params_reach_the_backend_on_change() {
        let mut rig = Rig::new(true);
        rig.port.service();
        assert_eq!(rig.state().params.len(), 1);
        rig.program(3);
        assert!(rig.kicked());
        rig.port.service();
        let last = *rig.state().params.last().expect("params sent");
        assert_eq!(
            last,
            LineParams {
                baud: 38400,
                data_bits: 8,
                parity: 'N',
                stop_bits: 1
            }
        );
        let sent = rig.state().params.len();
        rig.port.service();
        assert_eq!(rig.state().params.len(), sent);
    }

    #[test]
    fn wide_accesses_are_byte_cycles() {
        let mut rig = Rig::new(true);
        rig.outb(REG_LCR, LCR_DLAB);
        rig.port.write(u64::from(REG_DLL), &[0x34, 0x12]);
        let mut two = [0u8; 2];
        rig.port.read(u64::from(REG_DLL), &mut two);
        assert_eq!(two, [0x34, 0x12]);
        rig.outb(REG_LCR, LCR_8N1);
        assert_eq!(rig.port.serial().line_params().baud, 115_200 / 0x1234);
        rig.port.write(u64::from(REG_SCR), &[0xaa, 0xbb]);
        rig.port.read(u64::from(REG_SCR), &mut two);
        assert_eq!(two, [0xaa, UNCLAIMED_BYTE]);
        let mut four = [0u8; 4];
        rig.port.read(u64::MAX - 1, &mut four);
        assert_eq!(four, [UNCLAIMED_BYTE; 4]);
        rig.port.write(u64::MAX, &[1, 2]);
    }

    #[test]
    fn interrupt_driven_tx_gets_its_timer() {
        let mut rig = Rig::new(true);
        rig.program(1);
        rig.outb(REG_IER, IER_ETBEI | IER_ERBFI);
        assert_eq!(rig.inb(REG_IIR_FCR) & IIR_ID_MASK, IIR_THRI);
        rig.port.service();
        for b in 0..8u8 {
            rig.outb(REG_RBR_THR, b);
        }
        // THRE rises when the 8th byte enters the shift register, after 7 characters.
        assert_eq!(rig.port.service(), Some(7 * C115200));
    }

    #[test]
    fn replace_backend_resyncs() {
        let mut rig = Rig::new(true);
        rig.program(1);
        rig.state().budget = Some(0);
        rig.outb(REG_RBR_THR, b'q');
        rig.run_until(3 * C115200);
        assert!(rig.state().out.is_empty());
        let (new, new_state) = FakeBackend::boxed(false);
        let old = rig.port.replace_backend(new);
        assert_eq!(old.kind(), "fake");
        assert!(rig.kicked());
        rig.port.service();
        let s = crate::bus::lock(&new_state);
        assert_eq!(s.out, b"q");
        assert_eq!(s.params.len(), 1);
        assert_eq!(s.input_wanted, Some(true));
        drop(s);
        assert_eq!(rig.inb(REG_MSR), MSR_DCTS | MSR_DDSR | MSR_DDCD);
    }

    const MS: u64 = 1_000_000;
    const SECOND: u64 = 1_000_000_000;

    /// A deterministic generator for simulated wake-up latencies (xorshift64).
    struct Latency(u64);

    impl Latency {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    /// The event loop on simulated time, waking late after each deadline and after a kick,
    /// beside a guest that acts at times of its choosing.
    struct LateLoop {
        wake: Option<u64>,
        guest_at: u64,
        /// The guest also acts right after each service (it polls continuously).
        guest_follows_service: bool,
    }

    impl LateLoop {
        fn new(guest_follows_service: bool) -> LateLoop {
            LateLoop {
                wake: Some(0),
                guest_at: 0,
                guest_follows_service,
            }
        }

        /// Run until `until`. `late` gives each wake-up's latency; `guest` plays the guest at
        /// the current instant and returns when it acts next; `check` runs after each service.
        fn run(
            &mut self,
            rig: &mut Rig,
            until: u64,
            late: &mut dyn FnMut() -> u64,
            guest: &mut dyn FnMut(&mut Rig) -> u64,
            check: &mut dyn FnMut(&Rig),
        ) {
            loop {
                let now = self.wake.map_or(self.guest_at, |w| w.min(self.guest_at));
                if now > until {
                    return;
                }
                rig.clock.set(now);
                if self.wake.is_some_and(|w| w <= now) {
                    let deadline = rig.port.service();
                    check(rig);
                    self.wake = deadline.map(|d| d.max(now) + late());
                    if self.guest_follows_service {
                        self.guest_at = now;
                    }
                } else {
                    self.guest_at = now + guest(rig);
                    if rig.kicked() {
                        let at = now + late();
                        self.wake = Some(self.wake.map_or(at, |w| w.min(at)));
                    }
                }
            }
        }
    }

    /// Host input waits all along at 115200 baud and a guest polling LSR drains the RX FIFO,
    /// while the event loop wakes late: a quarter of its wake-ups by 3 ms, the rest by up to
    /// 0.3 ms. Every missed slot is made up (a 3 ms wake-up, 35 slots, can hand over one
    /// FIFO's worth; the rest follow at the next ones), never ahead of its slot.
    #[test]
    fn late_wakeups_keep_the_rx_line_rate() {
        let mut rig = Rig::new(true);
        rig.program(1);
        rig.state().input.extend([b'U'; 20_000].iter());
        let mut rng = Latency(0x9e37_79b9_7f4a_7c15);
        let mut late = || {
            if rng.below(4) == 0 {
                3 * MS
            } else {
                rng.below(3 * MS / 10)
            }
        };
        let mut read = 0u64;
        let mut drain = |rig: &mut Rig| {
            while rig.inb(REG_LSR) & LSR_DR != 0 {
                assert_eq!(rig.inb(REG_RBR_THR), b'U');
                read += 1;
            }
        };
        // The first character arrives at 0 (the line was idle), then one per slot.
        let slots_by = |t: u64| t / C115200 + 1;
        let mut check = |rig: &Rig| {
            let now = rig.clock.now_ns();
            let received = rig.port.serial().stats().received;
            assert!(received <= slots_by(now), "{received} bytes by {now} ns");
        };
        let mut sim = LateLoop::new(true);
        sim.run(
            &mut rig,
            SECOND,
            &mut late,
            &mut |rig| {
                drain(rig);
                10_000
            },
            &mut check,
        );
        // The event loop's last wake-up can be up to 3 ms ago, its slots not yet made up.
        let received = rig.port.serial().stats().received;
        let due = slots_by(SECOND);
        assert!(
            due - received <= 3 * MS / C115200 + 2,
            "{received} of {due}"
        );
        // It wakes on time at 1 s and catches up: exactly the slots that have passed.
        rig.clock.set(SECOND);
        for _ in 0..RX_CATCH_UP_ROUNDS {
            drain(&mut rig);
            rig.port.service();
            check(&rig);
        }
        drain(&mut rig);
        let received = rig.port.serial().stats().received;
        assert!(received.abs_diff(due) <= 1, "{received} of {due}");
        assert_eq!(read, received);
        assert_eq!(rig.port.serial().stats().rx_overruns, 0);
    }

    /// Services at one instant that let a late event loop hand over its whole backlog.
    const RX_CATCH_UP_ROUNDS: usize = 8;

    /// The blast guest with burst=16, as Linux's 8250 driver fills the FIFO: it polls LSR at
    /// every character boundary and refills the FIFO when THRE is set. Bytes are numbered.
    fn blaster(written: &mut u64) -> impl FnMut(&mut Rig) -> u64 + '_ {
        move |rig: &mut Rig| {
            if rig.inb(REG_LSR) & LSR_THRE != 0 {
                for _ in 0..FIFO_SIZE {
                    rig.outb(REG_RBR_THR, *written as u8);
                    *written += 1;
                }
            }
            C115200
        }
    }

    /// The FIFO-filling guest at 115200 baud with an event loop that collects output 2 ms after
    /// every deadline: uncollected output does not hold up the line.
    #[test]
    fn late_collection_keeps_the_tx_line_rate() {
        let mut rig = Rig::new(true);
        rig.program(1);
        let mut written = 0u64;
        let mut sim = LateLoop::new(false);
        sim.run(
            &mut rig,
            SECOND,
            &mut || 2 * MS,
            &mut blaster(&mut written),
            &mut |_| {},
        );
        rig.clock.set(SECOND);
        rig.port.service();
        let sent = rig.state().out.len() as u64;
        let line = SECOND / C115200;
        assert!(sent.abs_diff(line) <= 1, "{sent} bytes, line rate {line}");
        let s = rig.state();
        assert!(s.out.iter().enumerate().all(|(i, &b)| b == i as u8));
        drop(s);
        assert_eq!(rig.port.serial().stats().tx_overruns, 0);
    }

    /// With the holding area, a backend that refuses still stalls the transmitter at once and
    /// loses nothing, and output resumes in order when it accepts again.
    #[test]
    fn refusing_backend_stalls_the_fifo_filling_guest_without_loss() {
        let mut rig = Rig::new(true);
        rig.program(1);
        rig.state().budget = Some(100);
        let mut written = 0u64;
        let mut sim = LateLoop::new(false);
        let end = 100 * MS;
        sim.run(
            &mut rig,
            end,
            &mut || 0,
            &mut blaster(&mut written),
            &mut |_| {},
        );
        assert_eq!(rig.state().out.len(), 100);
        // Stalled: no new character started once the backend refused, the guest was held off by
        // THRE, and the event loop needs no timer.
        assert_eq!(rig.inb(REG_LSR) & (LSR_THRE | LSR_TEMT), 0);
        assert!(
            written <= 100 + (TX_COLLECT_BATCH + 1 + FIFO_SIZE) as u64,
            "{written} written"
        );
        assert_eq!(rig.port.service(), None);
        assert_eq!(rig.port.serial().stats().transmitted, 100);
        // Still stalled much later.
        rig.clock.set(2 * end);
        rig.port.service();
        assert_eq!(rig.inb(REG_LSR) & (LSR_THRE | LSR_TEMT), 0);
        assert_eq!(rig.state().out.len(), 100);
        // The backend drains: everything written arrives, in order, and the line runs again.
        let held = written;
        rig.state().budget = None;
        rig.state().events.push(Event::Writable);
        sim.wake = Some(2 * end);
        sim.guest_at = 2 * end;
        sim.run(
            &mut rig,
            3 * end,
            &mut || 0,
            &mut blaster(&mut written),
            &mut |_| {},
        );
        rig.clock.set(3 * end);
        rig.port.service();
        assert!(written > held + 1000);
        let s = rig.state();
        let sent = s.out.len() as u64;
        assert!(
            written - sent <= 1 + FIFO_SIZE as u64,
            "{sent} of {written}"
        );
        assert!(s.out.iter().enumerate().all(|(i, &b)| b == i as u8));
        drop(s);
        assert_eq!(rig.port.output_errors(), 0);
        assert_eq!(rig.port.serial().stats().tx_overruns, 0);
    }

    /// The guest that polls LSR.THRE before each byte (one byte queued behind the shift
    /// register, as blast.S with burst=1 and Linux's console do), beside an event loop that
    /// services 60 µs after each deadline it returned: every character still starts exactly when
    /// the previous one finished, so the line runs at exactly its rate whatever the wake-ups.
    #[test]
    fn thre_polling_guest_keeps_the_exact_line_rate() {
        const BYTES: u64 = 1440;
        /// The guest's LSR polling period: it sees THRE within this of its rising.
        const POLL: u64 = 1_000;
        for (divisor, char_ns) in [(12u16, C9600), (1, C115200)] {
            let mut rig = Rig::new(true);
            rig.program(divisor);
            rig.port.service();
            assert_eq!(rig.port.serial().char_time_ns(), char_ns);
            let mut written = 0u64;
            // The completion time of every character, as it enters the shift register.
            let mut done: Vec<u64> = Vec::new();
            let mut guest = |rig: &mut Rig| {
                let lsr = rig.inb(REG_LSR);
                if written < BYTES && lsr & LSR_THRE != 0 {
                    rig.outb(REG_RBR_THR, b'U');
                    written += 1;
                }
                if let Some(at) = rig.port.serial().tx_shift_done_ns() {
                    if done.last() != Some(&at) {
                        done.push(at);
                    }
                }
                POLL
            };
            let mut sim = LateLoop::new(false);
            let end = (BYTES + 4) * char_ns;
            let mut services = 0u64;
            sim.run(&mut rig, end, &mut || 60_000, &mut guest, &mut |_| {
                services += 1
            });
            rig.clock.set(end + MS);
            rig.port.service();
            assert_eq!(done.len() as u64, BYTES, "divisor {divisor}");
            let span = done[done.len() - 1] - done[0];
            let chars = BYTES - 1;
            let exact = chars * char_ns;
            // ± 1 ns of rounding per character.
            assert!(
                span.abs_diff(exact) <= chars,
                "divisor {divisor}: {span} ns for {chars} characters of {char_ns} ns ({} ns late)",
                span as i64 - exact as i64
            );
            assert_eq!(rig.state().out.len() as u64, BYTES);
            assert_eq!(
                rig.inb(REG_LSR) & (LSR_THRE | LSR_TEMT),
                LSR_THRE | LSR_TEMT
            );
            // The event loop is woken when the transmitter would go idle, two characters ahead
            // with this guest: not at every character end.
            assert!(
                services <= BYTES / 2 + 2,
                "divisor {divisor}: {services} services"
            );
        }
    }

    #[test]
    fn kick_only_when_needed() {
        let mut rig = Rig::new(true);
        rig.program(1);
        rig.port.service();
        assert!(!rig.kicked());
        // Register traffic that changes nothing the event loop cares about.
        rig.outb(REG_SCR, 1);
        rig.inb(REG_LSR);
        rig.inb(REG_IER);
        assert!(!rig.kicked());
        rig.outb(REG_RBR_THR, b'x');
        assert!(rig.kicked());
        // Already kicked: more output before the service does not kick again.
        rig.outb(REG_RBR_THR, b'y');
        assert!(!rig.kicked());
    }

    /// A machine reset keeps the backend (and its peer) and everything the guest had sent;
    /// the backend hears the power-on line parameters.
    #[test]
    fn machine_reset_keeps_the_backend_and_the_output() {
        let mut rig = Rig::new(true);
        rig.program(1);
        for &b in b"bye\n" {
            rig.outb(REG_RBR_THR, b);
        }
        BusDevice::reset(&mut rig.port);
        assert_eq!(rig.inb(REG_LCR), 0);
        assert_eq!(rig.inb(REG_MCR), 0);
        assert_eq!(rig.inb(REG_LSR), LSR_THRE | LSR_TEMT);
        assert_eq!(
            rig.inb(REG_MSR) & (MSR_DCD | MSR_DSR | MSR_CTS),
            MSR_DCD | MSR_DSR | MSR_CTS
        );
        assert_eq!(rig.port.service(), None);
        assert_eq!(rig.state().out, b"bye\n");
        let params = rig
            .state()
            .params
            .last()
            .copied()
            .expect("line parameters sent");
        assert_eq!(params.baud, 9600);
        assert!(rig.state().connected);
        let _ = &rig.clock;
    }
}
