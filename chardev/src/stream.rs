//! The I/O engine shared by the fd backends.
//!
//! - [`Stream`] moves bytes between a frontend and an input fd and an output fd (the same fd for
//!   a socket, pty or tty): input is read only when pulled, output goes through a bounded
//!   [`OutBuf`] flushed without blocking. Regular files and devices without poll support
//!   (`/dev/null`), which epoll refuses, are never reported for polling: output to them is
//!   written at once, and input from them is announced with synthetic `Readable` events.
//! - [`Link`] adds a peer that comes and goes (socket client, pty slave): while nobody is
//!   connected, output goes to a replay ring ([`ByteRing`]) that is replayed to the next peer;
//!   output still unsent when a peer leaves goes back into that ring.
//!
//! Neither owns its fds: the backend does, and closes them after the stream is gone. Neither
//! blocks.

use std::io;
use std::os::unix::io::RawFd;

use crate::backend::{Event, Interest, Readiness};
use crate::buffer::{ByteRing, EventQueue, OutBuf};
use crate::sys::{self, FdKind};

/// What a pull from the input fd gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Input {
    /// Bytes were read.
    Data(usize),
    /// Nothing available now.
    Empty,
    /// End of input (EOF, or EIO from a pty whose slave closed).
    Eof,
}

/// One input fd and one output fd with a bounded output buffer.
#[derive(Debug)]
pub(crate) struct Stream {
    rfd: Option<RawFd>,
    wfd: Option<RawFd>,
    rkind: FdKind,
    wkind: FdKind,
    out: OutBuf,
    input_wanted: bool,
    eof: bool,
    hup: bool,
    blocked: bool,
}

impl Stream {
    /// A stream reading `rfd` and writing `wfd` (either may be absent), buffering at most
    /// `out_cap` bytes of output.
    pub(crate) fn new(rfd: Option<RawFd>, wfd: Option<RawFd>, out_cap: usize) -> io::Result<Self> {
        let rkind = match rfd {
            Some(fd) => sys::fd_kind(fd)?,
            None => FdKind::Char,
        };
        let wkind = match wfd {
            Some(fd) => sys::fd_kind(fd)?,
            None => FdKind::Char,
        };
        Ok(Stream {
            rfd,
            wfd,
            rkind,
            wkind,
            out: OutBuf::new(out_cap),
            input_wanted: true,
            eof: false,
            hup: false,
            blocked: false,
        })
    }

    /// Whether input is pulled synthetically (a regular file, `/dev/null`) rather than polled.
    fn input_synthetic(&self) -> bool {
        self.rfd.is_some() && !self.rkind.pollable()
    }

    /// Whether the input side may still give bytes.
    fn input_open(&self) -> bool {
        self.rfd.is_some() && !self.eof
    }

    /// Queue a `Readable` for synthetic input, to be called when input becomes wanted.
    pub(crate) fn announce_input(&self, ev: &mut EventQueue) {
        if self.input_wanted && self.input_open() && self.input_synthetic() {
            ev.push(Event::Readable);
        }
    }

    /// The frontend can (not) take input now.
    pub(crate) fn set_input_wanted(&mut self, wanted: bool, ev: &mut EventQueue) {
        self.input_wanted = wanted;
        self.announce_input(ev);
    }

    /// The fds to watch and for what (the owning backend registers them).
    pub(crate) fn wanted_fds(&self) -> Vec<(RawFd, Interest)> {
        let read = self.input_wanted && self.input_open() && !self.hup && self.rkind.pollable();
        let write = !self.out.is_empty() && self.wkind.pollable();
        let mut v = Vec::with_capacity(2);
        match (self.rfd, self.wfd) {
            (Some(r), Some(w)) if r == w => {
                if read || write {
                    v.push((r, Interest { read, write }));
                }
            }
            (r, w) => {
                if let (Some(r), true) = (r, read) {
                    v.push((r, Interest::READ));
                }
                if let (Some(w), true) = (w, write) {
                    v.push((w, Interest::WRITE));
                }
            }
        }
        v
    }

    /// Pull input.
    pub(crate) fn read(&mut self, buf: &mut [u8]) -> io::Result<Input> {
        let Some(fd) = self.rfd else {
            return Ok(Input::Empty);
        };
        if self.eof {
            return Ok(Input::Eof);
        }
        if buf.is_empty() {
            return Ok(Input::Empty);
        }
        match sys::read(fd, buf) {
            Ok(0) => {
                self.eof = true;
                Ok(Input::Eof)
            }
            Ok(n) => Ok(Input::Data(n)),
            Err(e) if sys::would_block(&e) => Ok(Input::Empty),
            Err(e) if e.raw_os_error() == Some(libc::EIO) => {
                self.eof = true;
                Ok(Input::Eof)
            }
            Err(e) => Err(e),
        }
    }

    /// Queue as much of `data` as fits (nothing is written yet: call [`Stream::flush`]).
    pub(crate) fn write(&mut self, data: &[u8]) -> usize {
        let n = self.out.push(data);
        if n < data.len() {
            self.blocked = true;
        }
        n
    }

    /// Write buffered output until the fd would block. An error means the peer is gone; the
    /// unsent bytes stay queued for [`Stream::take_unsent`].
    pub(crate) fn flush(&mut self, ev: &mut EventQueue) -> io::Result<()> {
        let Some(fd) = self.wfd else {
            // No output fd: output is discarded, as `null` would.
            self.out.take_all();
            return Ok(());
        };
        if self.wkind == FdKind::Socket {
            self.out.flush_with(|d| sys::send(fd, d))?;
        } else {
            self.out.flush_with(|d| sys::write(fd, d))?;
        }
        if self.blocked && self.out.len() <= self.out.capacity() / 2 {
            self.blocked = false;
            ev.push(Event::Writable);
        }
        Ok(())
    }

    /// Queue a replayed backlog ahead of new output.
    pub(crate) fn replay(&mut self, data: &[u8]) {
        self.out.push_unbounded(data);
    }

    /// Output queued but not yet written.
    pub(crate) fn take_unsent(&mut self) -> Vec<u8> {
        self.out.take_all()
    }

    /// Whether output is queued.
    pub(crate) fn has_output(&self) -> bool {
        !self.out.is_empty()
    }

    /// The input hung up while the frontend was not reading (see [`Stream::on_ready`]).
    pub(crate) fn hung_up(&self) -> bool {
        self.hup
    }

    /// Whether the input fd still holds bytes to read.
    pub(crate) fn input_left(&self) -> bool {
        self.rfd
            .is_some_and(|fd| !self.eof && sys::pending_input(fd) > 0)
    }

    /// React to readiness of one of our fds. An error means the peer is gone.
    pub(crate) fn on_ready(
        &mut self,
        fd: RawFd,
        r: Readiness,
        ev: &mut EventQueue,
    ) -> io::Result<()> {
        if Some(fd) == self.wfd && (r.writable || r.hangup) && self.has_output() {
            self.flush(ev)?;
        }
        if Some(fd) == self.rfd && (r.readable || r.hangup) && self.input_open() {
            if self.input_wanted {
                // Let the frontend pull: it reads what is left, then sees the end of input.
                ev.push(Event::Readable);
            } else if r.hangup {
                self.hup = true;
            }
        }
        Ok(())
    }
}

/// A stream to a peer that connects and disconnects, with a replay ring for the gaps.
#[derive(Debug)]
pub(crate) struct Link {
    stream: Option<Stream>,
    ring: ByteRing,
    out_cap: usize,
    input_wanted: bool,
    lost: bool,
    /// The peer can take no more output but may still have sent input not yet read: output
    /// goes to the replay ring until that input is read to its end.
    out_dead: bool,
    pub(crate) events: EventQueue,
}

impl Link {
    /// A disconnected link with a replay ring of `backlog` bytes.
    pub(crate) fn new(backlog: usize, out_cap: usize) -> Self {
        Link {
            stream: None,
            ring: ByteRing::new(backlog),
            out_cap,
            input_wanted: true,
            lost: false,
            out_dead: false,
            events: EventQueue::default(),
        }
    }

    /// Whether a peer is connected.
    pub(crate) fn connected(&self) -> bool {
        self.stream.is_some()
    }

    /// A peer connected on `fd` (read and written): replay the backlog, report `Opened`.
    pub(crate) fn attach(&mut self, fd: RawFd) -> io::Result<()> {
        let mut s = Stream::new(Some(fd), Some(fd), self.out_cap)?;
        s.input_wanted = self.input_wanted;
        let backlog = self.ring.take_all();
        s.replay(&backlog);
        self.stream = Some(s);
        self.lost = false;
        self.out_dead = false;
        self.events.push(Event::Opened);
        self.flush();
        Ok(())
    }

    /// The peer left (or we dropped it): unsent output goes back to the replay ring.
    pub(crate) fn detach(&mut self) {
        if let Some(mut s) = self.stream.take() {
            let unsent = s.take_unsent();
            self.ring.push(&unsent);
            self.events.push(Event::Closed);
            // A frontend blocked on a full buffer can write again (into the ring).
            if s.blocked {
                self.events.push(Event::Writable);
            }
        }
    }

    fn lose(&mut self, why: Option<io::Error>) {
        if let Some(e) = why {
            log::debug!("chardev peer lost: {e}");
        }
        self.detach();
        self.lost = true;
    }

    /// Whether the peer was lost since the last call: the owner closes the fd and re-arms its
    /// listener or reconnect timer.
    pub(crate) fn take_lost(&mut self) -> bool {
        std::mem::take(&mut self.lost)
    }

    fn flush(&mut self) {
        if let Some(s) = &mut self.stream {
            if let Err(e) = s.flush(&mut self.events) {
                self.output_failed(e);
            }
        }
    }

    /// Writing to the peer failed (it shut down or left). Input it sent before that is still
    /// the guest's: while some is left to read, only output stops (what it did not take goes
    /// to the replay ring, and so does what follows); the peer is lost when its input ends.
    fn output_failed(&mut self, e: io::Error) {
        match &mut self.stream {
            Some(s) if s.input_left() => {
                log::debug!("chardev peer takes no more output ({e}); reading what it sent");
                let unsent = s.take_unsent();
                self.ring.push(&unsent);
                self.out_dead = true;
            }
            _ => self.lose(Some(e)),
        }
    }

    /// The fds to watch while connected.
    pub(crate) fn wanted_fds(&self) -> Vec<(RawFd, Interest)> {
        self.stream
            .as_ref()
            .map(Stream::wanted_fds)
            .unwrap_or_default()
    }

    /// Pull input from the peer; end of input disconnects.
    pub(crate) fn read(&mut self, buf: &mut [u8]) -> usize {
        let Some(s) = &mut self.stream else {
            return 0;
        };
        match s.read(buf) {
            Ok(Input::Data(n)) => n,
            Ok(Input::Empty) => 0,
            Ok(Input::Eof) => {
                self.lose(None);
                0
            }
            Err(e) => {
                self.lose(Some(e));
                0
            }
        }
    }

    /// Queue guest output: to the peer's bounded buffer while connected (returns what fit),
    /// else to the replay ring (takes everything).
    pub(crate) fn write(&mut self, data: &[u8]) -> usize {
        if let Some(s) = self.stream.as_mut().filter(|_| !self.out_dead) {
            let n = s.write(data);
            self.flush();
            if self.stream.is_some() {
                return n;
            }
            // The peer went away during the flush: what it did not take is in the ring now.
            self.ring.push(&data[n..]);
            return data.len();
        }
        self.ring.push(data);
        data.len()
    }

    /// The frontend can (not) take input.
    pub(crate) fn set_input_wanted(&mut self, wanted: bool) {
        self.input_wanted = wanted;
        if let Some(s) = &mut self.stream {
            s.set_input_wanted(wanted, &mut self.events);
            if wanted && s.hung_up() {
                self.events.push(Event::Readable);
            }
        }
    }

    /// Readiness on the peer fd.
    pub(crate) fn on_ready(&mut self, fd: RawFd, r: Readiness) {
        let Some(s) = &mut self.stream else {
            return;
        };
        let res = s.on_ready(fd, r, &mut self.events);
        match res {
            Err(e) => self.output_failed(e),
            Ok(()) if s.hung_up() && !s.has_output() && !self.input_wanted && !s.input_left() => {
                // The peer hung up, left nothing to read and nothing waits to be written: it is
                // gone. With input left, the stream stays (its fd unwatched) until the frontend
                // reads the rest and meets the end: bytes a peer sent before it left are the
                // guest's, however busy the frontend was when it left.
                self.lose(None)
            }
            Ok(()) => {}
        }
    }

    /// Output not yet written to a peer, oldest first: the replay ring, then what the
    /// connected peer has not taken. Both are emptied.
    pub(crate) fn take_unsent(&mut self) -> Vec<u8> {
        let mut out = self.ring.take_all();
        if let Some(s) = &mut self.stream {
            out.extend(s.take_unsent());
        }
        out
    }

    /// Bytes dropped by the replay ring.
    pub(crate) fn dropped(&self) -> u64 {
        self.ring.dropped()
    }
}
