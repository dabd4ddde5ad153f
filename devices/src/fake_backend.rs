//! A chardev backend for device unit tests: it records what the device wrote and read, can
//! refuse writes (to exercise backpressure), and plays back input, events and fds set by the
//! test. Shared by the UART and virtio-console tests; never built outside `cargo test`.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use chardev::backend::LineControl;
use chardev::{Backend, Event, LineParams, ModemStatus, Readiness, Registrar, Token};

/// What the fake backend saw and what it will do, shared with the test.
#[derive(Default)]
pub(crate) struct FakeState {
    /// Everything written.
    pub out: Vec<u8>,
    /// Bytes `write` accepts before refusing; `None` is unlimited.
    pub budget: Option<usize>,
    /// Input the frontend may pull.
    pub input: VecDeque<u8>,
    /// The size of every `read` the frontend asked for.
    pub read_sizes: Vec<usize>,
    /// Events for the next `take_events`.
    pub events: Vec<Event>,
    /// Whether a peer is connected.
    pub connected: bool,
    /// The last `set_input_wanted`.
    pub input_wanted: Option<bool>,
    /// The owner of the registrar the backend is attached to, if it is.
    pub attached: Option<u32>,
    /// Every token `on_ready` was called for.
    pub ready: Vec<Token>,
    /// Every `set_line_params`.
    pub params: Vec<LineParams>,
    /// How many breaks were sent.
    pub breaks: usize,
    /// Real modem lines (a host tty), or `None` for a backend without them.
    pub modem_status: Option<ModemStatus>,
    /// How often the frontend read the modem lines.
    pub modem_reads: usize,
    /// Every `set_modem_control` as (DTR, RTS).
    pub modem_control: Vec<(bool, bool)>,
}

/// The backend half; the test keeps the `Arc<Mutex<FakeState>>`.
pub(crate) struct FakeBackend(Arc<Mutex<FakeState>>);

impl FakeBackend {
    /// A boxed backend and the state the test inspects and drives.
    pub(crate) fn boxed(connected: bool) -> (Box<dyn Backend>, Arc<Mutex<FakeState>>) {
        let state = Arc::new(Mutex::new(FakeState {
            connected,
            ..FakeState::default()
        }));
        (Box::new(FakeBackend(state.clone())), state)
    }

    fn state(&self) -> MutexGuard<'_, FakeState> {
        crate::bus::lock(&self.0)
    }
}

impl Backend for FakeBackend {
    fn kind(&self) -> &'static str {
        "fake"
    }
    fn filename(&self) -> String {
        "fake".into()
    }
    fn attach(&mut self, reg: Registrar) {
        self.state().attached = Some(reg.owner());
    }
    fn detach(&mut self) {
        self.state().attached = None;
    }
    fn on_ready(&mut self, token: Token, _readiness: Readiness) {
        self.state().ready.push(token);
    }
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut s = self.state();
        s.read_sizes.push(buf.len());
        let n = buf.len().min(s.input.len());
        for (dst, src) in buf.iter_mut().zip(s.input.drain(..n)) {
            *dst = src;
        }
        Ok(n)
    }
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let mut s = self.state();
        let n = s.budget.map_or(data.len(), |b| b.min(data.len()));
        if let Some(b) = s.budget.as_mut() {
            *b -= n;
        }
        s.out.extend_from_slice(&data[..n]);
        Ok(n)
    }
    fn set_input_wanted(&mut self, wanted: bool) {
        self.state().input_wanted = Some(wanted);
    }
    fn is_connected(&self) -> bool {
        self.state().connected
    }
    fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.state().events)
    }
    fn line(&mut self) -> Option<&mut dyn LineControl> {
        Some(self)
    }
}

/// A line like a host tty's; `modem_status` is `None` unless the test gave it modem lines.
impl LineControl for FakeBackend {
    fn send_break(&mut self) {
        self.state().breaks += 1;
    }
    fn set_line_params(&mut self, params: LineParams) {
        self.state().params.push(params);
    }
    fn set_modem_control(&mut self, dtr: bool, rts: bool) {
        self.state().modem_control.push((dtr, rts));
    }
    fn modem_status(&mut self) -> Option<ModemStatus> {
        let mut s = self.state();
        s.modem_reads += 1;
        s.modem_status
    }
}
