//! The contract between a frontend (a UART, a virtio-console port, the monitor) and a chardev
//! backend (socket, pty, file, stdio, ...).
//!
//! A backend is sans-event-loop: it owns its file descriptors and registers them itself, with
//! the interest its state calls for, through the [`Registrar`] its frontend attaches it to
//! ([`Backend::attach`]); it changes an fd's interest when its state changes and removes the fd
//! before closing it (see [`crate::poller`]). It does its I/O when the event loop hands it the
//! readiness of one of its registrations ([`Backend::on_ready`], by token). No call ever looks
//! at all of a backend's fds, so an event costs the same with ten fds open or ten thousand.
//! The frontend never blocks on it:
//!
//! - **host → guest is pulled**: the frontend calls [`Backend::read`] only for as many bytes as it
//!   can accept right now, and tells the backend with [`Backend::set_input_wanted`] whether it
//!   wants input at all, so a backend whose frontend is full stops polling for input and the
//!   kernel's socket buffer pushes back on the peer.
//! - **guest → host is bounded**: [`Backend::write`] accepts what fits in the backend's bounded
//!   output buffer and returns how much it took; the frontend keeps the rest and applies the
//!   hardware's backpressure (THRE stays clear, the virtio tx queue is not popped) until
//!   [`Event::Writable`] says there is room again.
//!
//! This module must not depend on any device, on KVM, or on a particular event loop.

use std::any::Any;
use std::io;
use std::time::Duration;

use crate::poller::{Poller, Registrar, Token};

/// What a backend wants the event loop to watch an fd for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Interest {
    /// Wake the backend when the fd is readable (input, a pending accept, a hangup).
    pub read: bool,
    /// Wake the backend when the fd is writable (room to flush buffered output).
    pub write: bool,
}

impl Interest {
    /// Readable only.
    pub const READ: Interest = Interest {
        read: true,
        write: false,
    };
    /// Writable only.
    pub const WRITE: Interest = Interest {
        read: false,
        write: true,
    };
    /// Readable and writable.
    pub const BOTH: Interest = Interest {
        read: true,
        write: true,
    };
}

/// Readiness the event loop observed on one of the backend's fds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Readiness {
    /// The fd is readable.
    pub readable: bool,
    /// The fd is writable.
    pub writable: bool,
    /// The peer hung up or the fd is in error.
    pub hangup: bool,
}

/// Something a frontend must react to, returned by [`Backend::take_events`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A peer connected (socket client accepted, pty opened): modem lines up, PORT_OPEN 1.
    Opened,
    /// The peer went away: modem lines down, PORT_OPEN 0.
    Closed,
    /// Input became available: the frontend should pull with [`Backend::read`].
    Readable,
    /// Output room became available after [`Backend::write`] returned short.
    Writable,
    /// The peer sent a break condition.
    Break,
    /// The terminal behind the backend changed size (a console port sends RESIZE).
    Resized {
        /// Columns.
        cols: u16,
        /// Rows.
        rows: u16,
    },
}

/// One chardev backend. Every method is non-blocking.
pub trait Backend: Send {
    /// The backend's type name as QMP's `query-chardev` reports it ("socket", "pty", ...).
    fn kind(&self) -> &'static str;

    /// A QEMU-style description of where the backend is connected (`unix:/run/x.sock,server=on`,
    /// `pty:/dev/pts/3`, `file`, `stdio`).
    fn filename(&self) -> String;

    /// Register the backend's fds with `reg` from now on (leaving any registrar it had), and
    /// keep them registered with the interest its state calls for until [`Backend::detach`].
    fn attach(&mut self, reg: Registrar);

    /// Unregister every fd (the backend stays usable and registers again on `attach`).
    fn detach(&mut self);

    /// The event loop saw `readiness` on the fd registered with `token`: accept clients, flush
    /// output, notice hangups. A token that is not the backend's (any more) is ignored.
    fn on_ready(&mut self, token: Token, readiness: Readiness);

    /// Read up to `buf.len()` bytes of input. Returns 0 when nothing is available now. A read
    /// shorter than `buf` tells the frontend that input is drained (the UART relies on it and
    /// waits for the next [`Event::Readable`]), so a backend that buffers input itself must
    /// fill `buf` while it has bytes and announce `Readable` again once more arrive after a
    /// short read; an fd backend gets that from level-triggered readiness.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize>;

    /// Queue guest output. Returns how many bytes were accepted (0 when the bounded output
    /// buffer is full and a peer is connected: retry after [`Event::Writable`]).
    fn write(&mut self, data: &[u8]) -> io::Result<usize>;

    /// Whether the frontend can accept input now. A backend stops polling its input fds while
    /// this is false.
    fn set_input_wanted(&mut self, wanted: bool);

    /// Whether a peer is connected (always true for file, stdio, null).
    fn is_connected(&self) -> bool;

    /// Events since the last call, oldest first.
    fn take_events(&mut self) -> Vec<Event>;

    /// The size of the terminal behind the backend as (columns, rows), for backends that
    /// have one (pty, stdio on a terminal). Changes are reported with [`Event::Resized`].
    fn window_size(&self) -> Option<(u16, u16)> {
        None
    }

    /// Output bytes dropped because no peer was connected and the replay ring overflowed.
    fn dropped_bytes(&self) -> u64 {
        0
    }

    /// Take out the output the backend accepted and has not handed to a peer yet (queued for
    /// a slow peer, or kept in the replay ring while none is connected), oldest first:
    /// `chardev-change` passes it on to the new backend rather than losing it.
    fn take_unsent(&mut self) -> Vec<u8> {
        Vec::new()
    }

    /// Block until a peer connects, for a backend configured to wait for one before the guest
    /// starts (`socket,server=on,wait=on`), at most `timeout` (`None`: no limit). Returns
    /// whether a peer is connected (or nothing needs waiting for). The only blocking call of
    /// the trait: the VMM calls it once, before starting vCPUs.
    fn wait_for_client(&mut self, _timeout: Option<Duration>) -> io::Result<bool> {
        Ok(true)
    }

    /// The controls of a real serial line (break, line parameters, modem lines), for the
    /// backends that drive one (a host `serial` tty).
    fn line(&mut self) -> Option<&mut dyn LineControl> {
        None
    }

    /// The ring of a `ringbuf` backend, for QMP's `ringbuf-read` and `ringbuf-write`.
    fn ring(&mut self) -> Option<&mut dyn RingAccess> {
        None
    }

    /// The focus and escapes of a mux frontend.
    fn mux(&mut self) -> Option<&mut dyn MuxControl> {
        None
    }

    /// What else one particular backend offers at run time, for the code that knows its type
    /// to downcast (the vproxy backend's forwards). The core knows no such backend.
    fn extension(&mut self) -> Option<&mut dyn Any> {
        None
    }
}

/// The controls of a real serial line. A frontend reaches them through [`Backend::line`];
/// backends without a line have none.
pub trait LineControl {
    /// Send a break condition to the peer.
    fn send_break(&mut self);

    /// The line parameters the guest programmed into its UART.
    fn set_line_params(&mut self, params: LineParams);

    /// Drive the modem control outputs (DTR, RTS) the guest set in its UART.
    fn set_modem_control(&mut self, dtr: bool, rts: bool);

    /// The modem status inputs, or `None` where the line has none (a tty without modem
    /// lines): the frontend then derives them from [`Backend::is_connected`]. No event
    /// announces a change: a frontend that shows them polls.
    fn modem_status(&mut self) -> Option<ModemStatus>;
}

/// A `ringbuf` backend's ring, as QMP reaches it.
pub trait RingAccess {
    /// `ringbuf-read`: consume up to `max` bytes of the ring.
    fn ringbuf_read(&mut self, max: usize) -> io::Result<Vec<u8>>;

    /// `ringbuf-write`: append `data` to the ring.
    fn ringbuf_write(&mut self, data: &[u8]) -> io::Result<()>;
}

/// What a frontend on a mux must know besides bytes.
pub trait MuxControl {
    /// Whether this frontend has the input now (another frontend may have the focus); its
    /// output still goes out, but a monitor holds its own until it has the focus, as QEMU's
    /// does. A mux wakes a frontend that gains the focus.
    fn has_focus(&self) -> bool;

    /// Whether the user asked to quit minivmm through the mux (Ctrl-A x) since the last call.
    fn take_exit_request(&mut self) -> bool;
}

/// Send a break to `b`'s line, if it has one.
pub fn send_break(b: &mut dyn Backend) {
    if let Some(l) = b.line() {
        l.send_break();
    }
}

/// Whether `b` has the input (always, unless it is a mux frontend without the focus).
pub fn has_focus(b: &mut dyn Backend) -> bool {
    b.mux().is_none_or(|m| m.has_focus())
}

/// Whether the user asked to quit through `b` (a mux's Ctrl-A x) since the last call.
pub fn take_exit_request(b: &mut dyn Backend) -> bool {
    b.mux().is_some_and(|m| m.take_exit_request())
}

/// Wait once for the fds of `backends`, at most `timeout_ms` (-1: forever), and hand what was
/// ready to their `on_ready`. Returns whether anything was. A small loop for tools and tests,
/// which registers every backend afresh on each call (the VMM keeps its registrations).
pub fn poll_backends(backends: &mut [&mut dyn Backend], timeout_ms: i32) -> io::Result<bool> {
    let poller = Poller::new()?;
    for (i, b) in backends.iter_mut().enumerate() {
        b.attach(poller.registrar(i as u32));
    }
    let mut events = Vec::new();
    let res = poller.wait(&mut events, 256, timeout_ms);
    for ev in &events {
        backends[ev.owner as usize].on_ready(ev.token, ev.readiness);
    }
    for b in backends.iter_mut() {
        b.detach();
    }
    Ok(res? > 0)
}

/// The modem status inputs of a serial line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ModemStatus {
    /// Data carrier detect.
    pub dcd: bool,
    /// Data set ready.
    pub dsr: bool,
    /// Clear to send.
    pub cts: bool,
    /// Ring indicator.
    pub ri: bool,
}

impl ModemStatus {
    /// What a line with a peer attached shows: carrier, data set ready and clear to send up.
    pub const CONNECTED: ModemStatus = ModemStatus {
        dcd: true,
        dsr: true,
        cts: true,
        ri: false,
    };
    /// No peer: every line down.
    pub const DISCONNECTED: ModemStatus = ModemStatus {
        dcd: false,
        dsr: false,
        cts: false,
        ri: false,
    };
}

/// Line parameters of a UART, as the guest programmed them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineParams {
    /// Bits per second.
    pub baud: u32,
    /// Data bits, 5 to 8.
    pub data_bits: u8,
    /// Parity: 'N', 'E', 'O', 'M' (mark) or 'S' (space).
    pub parity: char,
    /// Stop bits, 1 or 2.
    pub stop_bits: u8,
}
