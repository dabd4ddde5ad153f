//! The `mux` chardev: several frontends (say COM1 and the monitor) on one backend, with QEMU's
//! Ctrl-A escapes on input.
//!
//! All frontends' output goes to the base; input goes only to the focused frontend. After
//! Ctrl-A: `c` moves the focus to the next frontend, `x` asks minivmm to quit
//! ([`Backend::take_exit_request`]), `b` sends a break to the focused frontend, `t` toggles
//! `[hh:mm:ss.mmm] ` timestamps at the start of output lines, `h` or `?` prints help, and a
//! second Ctrl-A is a literal Ctrl-A. Other bytes after Ctrl-A are swallowed, as in QEMU.
//!
//! **How one backend is shared.** [`Mux::add_frontend`] hands out one [`MuxFrontend`] per
//! frontend, each an ordinary [`Backend`], all sharing a core behind a mutex. The event loop
//! must see each base fd once, so only one frontend, the *driver* (the oldest alive), reports
//! the base's fds; every frontend also reports an eventfd of its own. Whenever something
//! happens that another frontend must notice (events for it, the base wanting different fds,
//! a new driver), that frontend's eventfd is signalled, the event loop calls its `on_ready`,
//! and then re-reads its `poll_fds` and `take_events` as the [`Backend`] contract says.
//!
//! Input stays pulled: the base is read only when the focused frontend pulls, for at most what
//! it asked; bytes that arrive for a newly focused frontend in the same read wait in its small
//! queue (bounded by one such read).

use std::collections::VecDeque;
use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::backend::{Backend, Event, Interest, LineParams, Readiness};
use crate::buffer::EventQueue;
use crate::error::{Error, Result};

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
    driver_fds: Vec<(RawFd, Interest)>,
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

    /// After any call by frontend `caller`: route the base's events, and wake the driver if
    /// the base now wants other fds than the driver last reported.
    fn settle(&mut self, caller: usize) {
        for ev in self.base.take_events() {
            match ev {
                Event::Opened | Event::Closed | Event::Writable => self.notify_all(ev, caller),
                Event::Readable | Event::Break => self.notify(self.focus, ev, caller),
            }
        }
        if let Some(d) = self.driver() {
            if d != caller && self.base.poll_fds() != self.driver_fds {
                self.kick(d);
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
            self.focus = next;
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
    pub fn new(id: &str, base: Box<dyn Backend>) -> Self {
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
                driver_fds: Vec::new(),
            })),
        }
    }

    /// Attach one more frontend (at most [`MAX_MUX`]). The first one has the focus.
    pub fn add_frontend(&mut self) -> Result<MuxFrontend> {
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
        let was_alone = c.driver().is_none();
        c.fronts[idx] = Some(Front {
            events,
            input: VecDeque::new(),
            input_wanted: true,
            kick,
            exit: false,
        });
        if was_alone {
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
            if let Some(d) = c.driver() {
                c.driver_fds.clear();
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

    fn poll_fds(&self) -> Vec<(RawFd, Interest)> {
        let mut c = lock(&self.core);
        let Some(Some(me)) = c.fronts.get(self.idx) else {
            return Vec::new();
        };
        let mut v = vec![(me.kick.as_raw_fd(), Interest::READ)];
        if c.driver() == Some(self.idx) {
            let base = c.base.poll_fds();
            v.extend(base.iter().copied());
            c.driver_fds = base;
        }
        v
    }

    fn on_ready(&mut self, fd: RawFd, readiness: Readiness) {
        self.with(|c, me| {
            if let Some(Some(f)) = c.fronts.get(me) {
                if f.kick.as_raw_fd() == fd {
                    let _ = f.kick.read();
                    return;
                }
            }
            if c.driver() == Some(me) {
                c.base.on_ready(fd, readiness);
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

    fn take_events(&mut self) -> Vec<Event> {
        self.with(|c, me| match c.fronts.get_mut(me) {
            Some(Some(f)) => f.events.take(),
            _ => Vec::new(),
        })
    }

    fn send_break(&mut self) {
        self.with(|c, _| c.base.send_break())
    }

    fn set_line_params(&mut self, params: LineParams) {
        self.with(|c, _| c.base.set_line_params(params))
    }

    fn dropped_bytes(&self) -> u64 {
        lock(&self.core).base.dropped_bytes()
    }

    fn wait_for_client(&mut self, timeout: Option<Duration>) -> io::Result<bool> {
        self.with(|c, _| c.base.wait_for_client(timeout))
    }

    fn take_exit_request(&mut self) -> bool {
        self.with(|c, me| match c.fronts.get_mut(me) {
            Some(Some(f)) => std::mem::take(&mut f.exit),
            _ => false,
        })
    }
}
