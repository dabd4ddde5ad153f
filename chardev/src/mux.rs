//! The `mux` chardev: several frontends (say COM1 and the monitor) on one backend, with QEMU's
//! Ctrl-A escapes on input.
//!
//! All frontends' output goes to the base; input goes only to the focused frontend, which is
//! the one attached last (as in QEMU, where the serial device attached after the monitor of
//! `-serial mon:stdio` gets the console first). After Ctrl-A: `c` moves the focus to the next
//! frontend (which is woken, so a monitor can show what it held back, see
//! [`MuxControl::has_focus`]), `x` asks minivmm to quit
//! ([`MuxControl::take_exit_request`]), `b` sends a break to the focused frontend, `t` toggles
//! `[hh:mm:ss.mmm] ` timestamps at the start of output lines, `h` or `?` prints help, and a
//! second Ctrl-A is a literal Ctrl-A. Other bytes after Ctrl-A are swallowed, as in QEMU.
//!
//! **How one backend is shared.** [`Mux::add_frontend`] hands out one [`MuxFrontend`] per
//! frontend, each an ordinary [`Backend`], all sharing a core behind a mutex. The event loop
//! must see each base fd once, so the base is attached to the registrar of one frontend only,
//! the *driver* (the oldest alive; when it goes, the next one takes the base over); every
//! frontend also registers an eventfd of its own. Whenever something happens that another
//! frontend must notice (events for it, a new driver), that frontend's eventfd is signalled,
//! the event loop calls its `on_ready`, and then its `take_events` as the [`Backend`] contract
//! says.
//!
//! Input stays pulled: the base is read only when the focused frontend pulls, for at most what
//! it asked; bytes that arrive for a newly focused frontend in the same read wait in its small
//! queue (bounded by one such read).

use std::collections::VecDeque;
use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::backend::{
    send_break, Backend, Event, Interest, LineControl, LineParams, ModemStatus, MuxControl,
    Readiness,
};
use crate::buffer::EventQueue;
use crate::error::{Error, Result};
use crate::poller::{FdSet, Registrar, Token};

/// Most frontends on one mux (QEMU's `MAX_MUX`).
pub const MAX_MUX: usize = 4;
/// The escape character, Ctrl-A.
pub const MUX_ESCAPE: u8 = 0x01;
/// The help printed for Ctrl-A h.
const HELP: &[u8] = b"\r\nC-a h    print this help\r\n\
C-a x    exit minivmm\r\n\
C-a t    toggle console timestamps\r\n\
C-a b    send break\r\n\
C-a c    switch between console and monitor\r\n\
C-a C-a  send C-a\r\n";

struct Front {
    /// The kick eventfd's registration; declared first, it unregisters before `kick` closes.
    fds: FdSet,
    /// What the frontend was attached to; the base goes to the driver's.
    reg: Option<Registrar>,
    events: EventQueue,
    input: VecDeque<u8>,
    input_wanted: bool,
    kick: EventFd,
    exit: bool,
}

struct Core {
    id: String,
    base: Box<dyn Backend>,
    fronts: Vec<Option<Front>>,
    focus: usize,
    escape: bool,
    timestamps: bool,
    at_line_start: bool,
    inject: VecDeque<u8>,
    start: Instant,
}

impl Core {
    fn driver(&self) -> Option<usize> {
        self.fronts.iter().position(Option::is_some)
    }

    fn kick(&self, i: usize) {
        if let Some(Some(f)) = self.fronts.get(i) {
            if let Err(e) = f.kick.write(1) {
                log::warn!("mux '{}': cannot wake frontend {i}: {e}", self.id);
            }
        }
    }

    fn live(&self) -> impl Iterator<Item = usize> + '_ {
        self.fronts
            .iter()
            .enumerate()
            .filter_map(|(i, f)| f.as_ref().map(|_| i))
    }

    /// Queue `ev` for frontend `i` and wake it unless it is the caller.
    fn notify(&mut self, i: usize, ev: Event, caller: usize) {
        if let Some(Some(f)) = self.fronts.get_mut(i) {
            f.events.push(ev);
            if i != caller {
                self.kick(i);
            }
        }
    }

    fn notify_all(&mut self, ev: Event, caller: usize) {
        for i in self.live().collect::<Vec<_>>() {
            self.notify(i, ev.clone(), caller);
        }
    }

    /// Attach the base to the driver's registrar (detached when no frontend has one).
    fn attach_base(&mut self) {
        let reg = self
            .driver()
            .and_then(|d| self.fronts[d].as_ref())
            .and_then(|f| f.reg.clone());
        match reg {
            Some(reg) => self.base.attach(reg),
            None => self.base.detach(),
        }
    }

    /// After any call by frontend `caller`: route the base's events.
    fn settle(&mut self, caller: usize) {
        for ev in self.base.take_events() {
            match ev {
                Event::Opened | Event::Closed | Event::Writable | Event::Resized { .. } => {
                    self.notify_all(ev, caller)
                }
                Event::Readable | Event::Break => self.notify(self.focus, ev, caller),
            }
        }
    }

    fn focus_input_wanted(&self) -> bool {
        matches!(self.fronts.get(self.focus), Some(Some(f)) if f.input_wanted)
    }

    fn switch_focus(&mut self, caller: usize) {
        let n = self.fronts.len();
        if let Some(next) = (1..=n)
            .map(|k| (self.focus + k) % n)
            .find(|&i| self.fronts[i].is_some())
        {
            let previous = std::mem::replace(&mut self.focus, next);
            // Both learn of the change: the newly focused frontend may have output it held
            // back (a monitor), the previous one stops showing its own.
            for i in [previous, next] {
                if i != caller {
                    self.kick(i);
                }
            }
        }
        let wanted = self.focus_input_wanted();
        self.base.set_input_wanted(wanted);
        if let Some(Some(f)) = self.fronts.get(self.focus) {
            if !f.input.is_empty() {
                self.notify(self.focus, Event::Readable, caller);
            }
        }
    }

    /// One input byte after escape processing, for the focused frontend.
    fn deliver(&mut self, byte: u8, caller: usize, out: &mut [u8], n: &mut usize) {
        if self.focus == caller && *n < out.len() {
            out[*n] = byte;
            *n += 1;
        } else if let Some(Some(f)) = self.fronts.get_mut(self.focus) {
            f.input.push_back(byte);
            let focus = self.focus;
            self.notify(focus, Event::Readable, caller);
        }
    }

    fn process(&mut self, byte: u8, caller: usize, out: &mut [u8], n: &mut usize) {
        if !self.escape {
            if byte == MUX_ESCAPE {
                self.escape = true;
            } else {
                self.deliver(byte, caller, out, n);
            }
            return;
        }
        self.escape = false;
        match byte {
            MUX_ESCAPE => self.deliver(byte, caller, out, n),
            b'c' => self.switch_focus(caller),
            b'x' => {
                self.inject.extend(b"\r\nminivmm: terminated\r\n");
                for i in self.live().collect::<Vec<_>>() {
                    if let Some(Some(f)) = self.fronts.get_mut(i) {
                        f.exit = true;
                    }
                    if i != caller {
                        self.kick(i);
                    }
                }
            }
            b'b' => {
                let focus = self.focus;
                self.notify(focus, Event::Break, caller);
            }
            b't' => self.timestamps = !self.timestamps,
            b'h' | b'?' => self.inject.extend(HELP),
            _ => {}
        }
        self.flush_inject();
    }

    /// Write injected bytes (help, timestamps) ahead of frontend output. Returns whether all
    /// were taken.
    fn flush_inject(&mut self) -> bool {
        while !self.inject.is_empty() {
            let front = self.inject.as_slices().0;
            match self.base.write(front) {
                Ok(0) | Err(_) => return false,
                Ok(k) => {
                    self.inject.drain(..k);
                }
            }
        }
        true
    }

    fn timestamp(&self) -> Vec<u8> {
        let t = self.start.elapsed();
        let ms = t.as_millis();
        format!(
            "[{:02}:{:02}:{:02}.{:03}] ",
            ms / 3_600_000,
            ms / 60_000 % 60,
            ms / 1000 % 60,
            ms % 1000
        )
        .into_bytes()
    }

    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if !self.flush_inject() {
            return Ok(0);
        }
        if !self.timestamps || data.is_empty() {
            let n = self.base.write(data)?;
            if n > 0 {
                self.at_line_start = data[n - 1] == b'\n';
            }
            return Ok(n);
        }
        if self.at_line_start {
            let ts = self.timestamp();
            self.inject.extend(ts);
            self.at_line_start = false;
            if !self.flush_inject() {
                return Ok(0);
            }
        }
        let line = data
            .iter()
            .position(|&b| b == b'\n')
            .map_or(data.len(), |p| p + 1);
        let n = self.base.write(&data[..line])?;
        if n > 0 {
            self.at_line_start = data[n - 1] == b'\n';
        }
        Ok(n)
    }

    fn read(&mut self, caller: usize, buf: &mut [u8]) -> io::Result<usize> {
        let mut n = 0;
        if let Some(Some(f)) = self.fronts.get_mut(caller) {
            while n < buf.len() {
                match f.input.pop_front() {
                    Some(b) => {
                        buf[n] = b;
                        n += 1;
                    }
                    None => break,
                }
            }
        }
        if n > 0 || self.focus != caller {
            return Ok(n);
        }
        let mut tmp = vec![0u8; buf.len()];
        loop {
            let k = self.base.read(&mut tmp)?;
            if k == 0 {
                return Ok(n);
            }
            for &b in &tmp[..k] {
                self.process(b, caller, buf, &mut n);
            }
            // Everything read so far was escapes or went to another frontend: try again.
            if n > 0 || self.focus != caller {
                return Ok(n);
            }
        }
    }
}

/// A mux: the shared core, from which frontends are handed out.
pub struct Mux {
    core: Arc<Mutex<Core>>,
}

fn lock(core: &Arc<Mutex<Core>>) -> MutexGuard<'_, Core> {
    core.lock().unwrap_or_else(|p| p.into_inner())
}

impl Mux {
    /// A mux named `id` over `base`.
    pub fn new(id: &str, mut base: Box<dyn Backend>) -> Self {
        // Events from before any frontend existed: each frontend learns the state on attach.
        base.take_events();
        Mux {
            core: Arc::new(Mutex::new(Core {
                id: id.to_string(),
                base,
                fronts: Vec::new(),
                focus: 0,
                escape: false,
                timestamps: false,
                at_line_start: true,
                inject: VecDeque::new(),
                start: Instant::now(),
            })),
        }
    }

    /// Attach one more frontend (at most [`MAX_MUX`]). It takes the focus.
    pub fn add_frontend(&mut self) -> Result<MuxFrontend> {
        self.attach(true)
    }

    /// Attach a frontend that takes the focus only when it is the only one, for a monitor: the
    /// console stays in front, as with QEMU's `-serial mon:stdio`, where the serial device is
    /// attached after the monitor.
    pub fn add_background_frontend(&mut self) -> Result<MuxFrontend> {
        self.attach(false)
    }

    fn attach(&mut self, take_focus: bool) -> Result<MuxFrontend> {
        let mut c = lock(&self.core);
        let idx = match c.fronts.iter().position(Option::is_none) {
            Some(i) => i,
            None if c.fronts.len() < MAX_MUX => {
                c.fronts.push(None);
                c.fronts.len() - 1
            }
            None => return Err(Error::MuxFull(c.id.clone())),
        };
        let kick = EventFd::new(EFD_NONBLOCK)
            .map_err(|e| Error::io(&c.id, "create eventfd for", "mux", e))?;
        let mut events = EventQueue::default();
        if c.base.is_connected() {
            events.push(Event::Opened);
        }
        let mut fds = FdSet::new();
        fds.set(kick.as_raw_fd(), Interest::READ);
        c.fronts[idx] = Some(Front {
            fds,
            reg: None,
            events,
            input: VecDeque::new(),
            input_wanted: true,
            kick,
            exit: false,
        });
        let alone = c.live().count() == 1;
        if take_focus || alone {
            // It has the focus now, and wants input.
            c.focus = idx;
            c.base.set_input_wanted(true);
        }
        Ok(MuxFrontend {
            core: self.core.clone(),
            idx,
        })
    }

    /// How many frontends are attached.
    pub fn frontends(&self) -> usize {
        lock(&self.core).live().count()
    }

    /// The focused frontend's index.
    pub fn focus(&self) -> usize {
        lock(&self.core).focus
    }

    /// A break from outside the mux (`chardev-send-break`) for the focused frontend, as Ctrl-A b
    /// delivers it; the frontend is woken through its kick fd.
    pub fn send_break_to_focus(&self) {
        let mut c = lock(&self.core);
        let focus = c.focus;
        // No frontend is calling: every frontend, the focused one too, gets its kick.
        c.notify(focus, Event::Break, usize::MAX);
    }

    /// Run `f` on the base backend.
    pub fn with_base<R>(&self, f: impl FnOnce(&mut dyn Backend) -> R) -> R {
        f(lock(&self.core).base.as_mut())
    }
}

/// One frontend's view of a mux.
pub struct MuxFrontend {
    core: Arc<Mutex<Core>>,
    idx: usize,
}

impl MuxFrontend {
    /// This frontend's index (focus order).
    pub fn index(&self) -> usize {
        self.idx
    }

    fn with<R>(&self, f: impl FnOnce(&mut Core, usize) -> R) -> R {
        let mut c = lock(&self.core);
        let r = f(&mut c, self.idx);
        c.settle(self.idx);
        r
    }
}

impl Drop for MuxFrontend {
    fn drop(&mut self) {
        let mut c = lock(&self.core);
        let was_driver = c.driver() == Some(self.idx);
        c.fronts[self.idx] = None;
        if c.focus == self.idx {
            c.switch_focus(self.idx);
        }
        if was_driver {
            c.attach_base();
            if let Some(d) = c.driver() {
                c.kick(d);
            }
        }
        if c.driver().is_none() {
            c.base.set_input_wanted(false);
        }
    }
}

impl Backend for MuxFrontend {
    fn kind(&self) -> &'static str {
        "mux"
    }

    fn filename(&self) -> String {
        lock(&self.core).base.filename()
    }

    fn attach(&mut self, reg: Registrar) {
        let mut c = lock(&self.core);
        if let Some(Some(me)) = c.fronts.get_mut(self.idx) {
            me.fds.attach(reg.clone());
            me.reg = Some(reg);
        }
        if c.driver() == Some(self.idx) {
            c.attach_base();
        }
    }

    fn detach(&mut self) {
        let mut c = lock(&self.core);
        if let Some(Some(me)) = c.fronts.get_mut(self.idx) {
            me.fds.detach();
            me.reg = None;
        }
        if c.driver() == Some(self.idx) {
            c.base.detach();
        }
    }

    fn on_ready(&mut self, token: Token, readiness: Readiness) {
        self.with(|c, me| {
            if let Some(Some(f)) = c.fronts.get(me) {
                if f.fds.fd_of(token).is_some() {
                    let _ = f.kick.read();
                    return;
                }
            }
            if c.driver() == Some(me) {
                c.base.on_ready(token, readiness);
            }
        })
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.with(|c, me| c.read(me, buf))
    }

    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.with(|c, _| c.write(data))
    }

    fn set_input_wanted(&mut self, wanted: bool) {
        self.with(|c, me| {
            if let Some(Some(f)) = c.fronts.get_mut(me) {
                f.input_wanted = wanted;
                if wanted && !f.input.is_empty() {
                    f.events.push(Event::Readable);
                }
            }
            if c.focus == me {
                c.base.set_input_wanted(wanted);
            }
        })
    }

    fn is_connected(&self) -> bool {
        lock(&self.core).base.is_connected()
    }

    fn window_size(&self) -> Option<(u16, u16)> {
        lock(&self.core).base.window_size()
    }

    fn take_events(&mut self) -> Vec<Event> {
        self.with(|c, me| match c.fronts.get_mut(me) {
            Some(Some(f)) => f.events.take(),
            _ => Vec::new(),
        })
    }

    fn dropped_bytes(&self) -> u64 {
        lock(&self.core).base.dropped_bytes()
    }

    fn wait_for_client(&mut self, timeout: Option<Duration>) -> io::Result<bool> {
        self.with(|c, _| c.base.wait_for_client(timeout))
    }

    fn line(&mut self) -> Option<&mut dyn LineControl> {
        if lock(&self.core).base.line().is_some() {
            Some(self)
        } else {
            None
        }
    }

    fn mux(&mut self) -> Option<&mut dyn MuxControl> {
        Some(self)
    }
}

impl MuxControl for MuxFrontend {
    fn has_focus(&self) -> bool {
        lock(&self.core).focus == self.idx
    }

    fn take_exit_request(&mut self) -> bool {
        self.with(|c, me| match c.fronts.get_mut(me) {
            Some(Some(f)) => std::mem::take(&mut f.exit),
            _ => false,
        })
    }
}

/// The base's line, shared by every frontend of the mux.
impl LineControl for MuxFrontend {
    fn send_break(&mut self) {
        self.with(|c, _| send_break(c.base.as_mut()))
    }

    fn set_line_params(&mut self, params: LineParams) {
        self.with(|c, _| {
            if let Some(l) = c.base.line() {
                l.set_line_params(params);
            }
        })
    }

    fn set_modem_control(&mut self, dtr: bool, rts: bool) {
        self.with(|c, _| {
            if let Some(l) = c.base.line() {
                l.set_modem_control(dtr, rts);
            }
        })
    }

    fn modem_status(&mut self) -> Option<ModemStatus> {
        lock(&self.core).base.line().and_then(|l| l.modem_status())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::socket::SocketBackend;
    use crate::spec::{SocketAddrSpec, SocketSpec};
    use crate::sys;
    use crate::testutil::{pump_many, watched, DEADLINE};
    use std::io::{Read, Write};
    use std::os::unix::io::IntoRawFd;
    use std::os::unix::net::UnixStream;

    /// A mux over a connected socket whose other end the test holds.
    fn setup() -> (Mux, MuxFrontend, MuxFrontend, UnixStream) {
        let (mine, theirs) = UnixStream::pair().unwrap();
        theirs.set_read_timeout(Some(DEADLINE)).unwrap();
        let spec = SocketSpec {
            addr: SocketAddrSpec::Fd(mine.into_raw_fd()),
            server: false,
            wait: false,
            nodelay: false,
            reconnect_ms: 0,
            backlog: 1024,
        };
        let base = SocketBackend::open("base", &spec).unwrap();
        let mut m = Mux::new("m", Box::new(base));
        let a = m.add_frontend().unwrap();
        let b = m.add_frontend().unwrap();
        (m, a, b, theirs)
    }

    /// Run the event loop over both frontends, reading input like frontends do, until `done`.
    fn run(
        a: &mut MuxFrontend,
        b: &mut MuxFrontend,
        got: &mut [Vec<u8>; 2],
        evs: &mut [Vec<Event>; 2],
        done: impl Fn(&[Vec<u8>; 2], &[Vec<Event>; 2]) -> bool,
    ) {
        let end = std::time::Instant::now() + DEADLINE;
        while !done(got, evs) {
            assert!(
                std::time::Instant::now() < end,
                "mux stuck: {got:?} {evs:?}"
            );
            pump_many(&mut [&mut *a, &mut *b], 10);
            for (i, f) in [&mut *a, &mut *b].into_iter().enumerate() {
                evs[i].extend(f.take_events());
                let mut buf = [0u8; 64];
                loop {
                    let n = f.read(&mut buf).unwrap();
                    if n == 0 {
                        break;
                    }
                    got[i].extend_from_slice(&buf[..n]);
                }
            }
        }
    }

    #[test]
    fn input_follows_focus_output_from_all() {
        let (m, mut a, mut b, mut peer) = setup();
        assert_eq!(m.frontends(), 2);
        let mut got = [Vec::new(), Vec::new()];
        let mut evs = [Vec::new(), Vec::new()];
        // Both saw the base already connected.
        run(&mut a, &mut b, &mut got, &mut evs, |_, e| {
            e[0].contains(&Event::Opened) && e[1].contains(&Event::Opened)
        });
        assert_eq!(
            evs,
            [vec![Event::Opened], vec![Event::Opened]],
            "one Opened each"
        );
        // b, attached last, has the focus, and a is told it has not.
        assert!(b.has_focus() && !a.has_focus());
        peer.write_all(b"to b").unwrap();
        run(&mut a, &mut b, &mut got, &mut evs, |g, _| g[1] == b"to b");
        // Ctrl-A c switches focus mid-read: the rest goes to a.
        peer.write_all(b"\x01cto a\x01\x01").unwrap();
        run(&mut a, &mut b, &mut got, &mut evs, |g, _| {
            g[0] == b"to a\x01"
        });
        assert_eq!(got[1], b"to b");
        assert_eq!(m.focus(), 0);
        assert!(a.has_focus() && !b.has_focus());
        peer.write_all(b"more a").unwrap();
        run(&mut a, &mut b, &mut got, &mut evs, |g, _| {
            g[0] == b"to a\x01more a"
        });
        // Ctrl-A b: a break for the focused frontend only.
        peer.write_all(b"\x01b").unwrap();
        run(&mut a, &mut b, &mut got, &mut evs, |_, e| {
            e[0].contains(&Event::Break)
        });
        assert!(!evs[1].contains(&Event::Break));
        // Output from either frontend reaches the peer, focused or not.
        a.write(b"A").unwrap();
        b.write(b"B").unwrap();
        let mut out = [0u8; 2];
        peer.read_exact(&mut out).unwrap();
        assert_eq!(&out, b"AB");
        // Back to b.
        peer.write_all(b"\x01cagain b").unwrap();
        run(&mut a, &mut b, &mut got, &mut evs, |g, _| {
            g[1] == b"to bagain b"
        });
        assert_eq!(m.focus(), 1);
        // A frontend that gains the focus is woken (a monitor shows what it held back).
        let kick_a = lock(&m.core).fronts[0].as_ref().unwrap().kick.as_raw_fd();
        while pump_many(&mut [&mut a, &mut b], 0) {}
        assert_eq!(
            sys::poll_one(kick_a, libc::POLLIN, 0).unwrap() & libc::POLLIN,
            0
        );
        lock(&m.core).switch_focus(b.index());
        assert_ne!(
            sys::poll_one(kick_a, libc::POLLIN, 0).unwrap() & libc::POLLIN,
            0
        );
        assert!(a.has_focus());
    }

    #[test]
    fn escapes_exit_timestamps_help() {
        let (_m, mut a, mut b, mut peer) = setup();
        let mut got = [Vec::new(), Vec::new()];
        let mut evs = [Vec::new(), Vec::new()];
        peer.write_all(b"\x01t").unwrap();
        run(&mut a, &mut b, &mut got, &mut evs, |_, _| {
            // Timestamps are on once the escape has been read.
            lock(&_m.core).timestamps
        });
        // With timestamps on, a write stops after a newline so the next line gets its stamp.
        assert_eq!(a.write(b"line one\nline two\n").unwrap(), 9);
        assert_eq!(a.write(b"line two\n").unwrap(), 9);
        let mut out = vec![0u8; 2 * 15 + 9 + 9];
        peer.read_exact(&mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text:?}");
        for (l, want) in lines.iter().zip(["line one", "line two"]) {
            assert!(
                l.starts_with("[00:00:0") && l.ends_with(want) && l.len() == 15 + 8,
                "{l:?}"
            );
        }
        peer.write_all(b"\x01h").unwrap();
        run(&mut a, &mut b, &mut got, &mut evs, |_, _| {
            let r = sys::poll_one(peer.as_raw_fd(), libc::POLLIN, 0).unwrap();
            r & libc::POLLIN != 0
        });
        let mut help = vec![0u8; HELP.len()];
        peer.read_exact(&mut help).unwrap();
        assert_eq!(help, HELP);
        peer.write_all(b"\x01x").unwrap();
        run(&mut a, &mut b, &mut got, &mut evs, |_, _| {
            lock(&_m.core).fronts[1].as_ref().unwrap().exit
        });
        assert!(a.take_exit_request());
        assert!(b.take_exit_request());
        assert!(!a.take_exit_request());
        assert!(
            got[0].is_empty() && got[1].is_empty(),
            "escapes leaked: {got:?}"
        );
    }

    #[test]
    fn one_driver_reports_base_fds_and_hands_over() {
        let (mut m, a, b, _peer) = setup();
        let base_fds = m.with_base(|bk| watched(bk));
        assert!(!base_fds.is_empty());
        let (mut a, mut b) = (a, b);
        let fa = watched(&mut a);
        let fb = watched(&mut b);
        assert_eq!(fa.len(), 1 + base_fds.len(), "driver reports base fds");
        assert_eq!(fb.len(), 1, "others only their eventfd");
        let kick_b = fb[0].0;
        drop(a);
        // b is the driver and the focus now (the base is attached to its registrar), and was woken.
        assert_ne!(
            sys::poll_one(kick_b, libc::POLLIN, 0).unwrap() & libc::POLLIN,
            0
        );
        assert_eq!(watched(&mut b).len(), 1 + base_fds.len());
        assert_eq!(m.focus(), 1);
        let _c = m.add_frontend().unwrap();
        let _d = m.add_frontend().unwrap();
        let _e = m.add_frontend().unwrap();
        assert_eq!(
            m.add_frontend().err().unwrap().to_string(),
            "chardev 'm': too many mux frontends"
        );
    }

    /// What the escapes do to a byte stream, for two frontends with the second focused:
    /// the bytes each frontend gets, the breaks each sees, and whether Ctrl-A x was typed.
    fn model(input: &[u8]) -> ([Vec<u8>; 2], [usize; 2], bool) {
        let (mut got, mut breaks, mut exit) = ([Vec::new(), Vec::new()], [0, 0], false);
        let (mut focus, mut escape) = (1, false);
        for &b in input {
            match (escape, b) {
                (false, MUX_ESCAPE) => escape = true,
                (false, _) | (true, MUX_ESCAPE) => {
                    got[focus].push(b);
                    escape = false;
                }
                (true, b'c') => {
                    focus = 1 - focus;
                    escape = false;
                }
                (true, b'b') => {
                    breaks[focus] += 1;
                    escape = false;
                }
                (true, b'x') => {
                    exit = true;
                    escape = false;
                }
                (true, _) => escape = false,
            }
        }
        (got, breaks, exit)
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// Whatever a peer types, in whatever pieces, each frontend gets exactly what the
        /// escape rules give it, reading in whatever sizes it likes.
        #[test]
        fn escapes_and_focus_follow_the_model(
            input in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::prelude::Just(MUX_ESCAPE),
                    proptest::prelude::Just(b'c'),
                    proptest::prelude::Just(b'b'),
                    proptest::prelude::Just(b'x'),
                    proptest::prelude::Just(b'h'),
                    proptest::prelude::Just(b't'),
                    proptest::prelude::any::<u8>(),
                ],
                0..160,
            ),
            pieces in proptest::collection::vec(1usize..32, 1..8),
            reads in proptest::collection::vec(1usize..24, 1..8),
        ) {
            let (_m, mut a, mut b, mut peer) = setup();
            peer.set_nonblocking(true).unwrap();
            let (want, want_breaks, want_exit) = model(&input);
            let mut got = [Vec::new(), Vec::new()];
            let mut breaks = [0usize, 0];
            let mut sent = 0;
            let mut k = 0;
            let end = std::time::Instant::now() + DEADLINE;
            while got != want || breaks != want_breaks || sent < input.len() {
                proptest::prop_assert!(
                    std::time::Instant::now() < end,
                    "stuck: got {:?} want {:?}, breaks {:?}", got, want, breaks
                );
                if sent < input.len() {
                    let n = pieces[k % pieces.len()].min(input.len() - sent);
                    peer.write_all(&input[sent..sent + n]).unwrap();
                    sent += n;
                }
                // What the mux writes back (help, the quit message) is drained.
                let mut sink = [0u8; 4096];
                while peer.read(&mut sink).map(|n| n > 0).unwrap_or(false) {}
                pump_many(&mut [&mut a, &mut b], 1);
                for (i, f) in [&mut a, &mut b].into_iter().enumerate() {
                    breaks[i] += f.take_events().iter().filter(|e| **e == Event::Break).count();
                    let mut buf = vec![0u8; reads[(k + i) % reads.len()]];
                    let n = f.read(&mut buf).unwrap();
                    got[i].extend_from_slice(&buf[..n]);
                }
                k += 1;
            }
            proptest::prop_assert_eq!(a.take_exit_request(), want_exit);
        }
    }
}
