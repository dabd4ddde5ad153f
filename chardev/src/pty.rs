//! The `pty` backend: a pseudo-terminal whose slave (`/dev/pts/N`) a user opens with `screen`,
//! `minicom` or `cat`.
//!
//! The allocated path is logged, returned by [`PtyBackend::pts_path`] and shown by
//! `filename()` (`pty:/dev/pts/N`); `path=` adds a stable symlink to it, removed on drop.
//!
//! **Peer detection heuristic.** Linux reports POLLHUP on a pty master while no process has the
//! slave open (once the slave has been opened and closed at least once, which we do at creation
//! so that the state is right from the start; minivmm keeps no slave fd of its own, see
//! Cloud Hypervisor #3170). The backend therefore checks the master for POLLHUP on a timer
//! ([`PTY_POLL_INTERVAL`]): no HUP means a peer opened the slave (`Event::Opened`), HUP again
//! means it left (`Event::Closed`); a hangup reported by the event loop while connected counts
//! too. A peer that opens and closes the slave between two ticks is not seen, and the master is
//! never polled while disconnected, because a hung-up master is always "ready" and would spin
//! the event loop. While nobody has the slave open, output goes to the replay ring and is
//! replayed when someone opens it.
//!
//! This module must not keep the slave open.

use std::ffi::OsString;
use std::io;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::io::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use vmm_sys_util::timerfd::TimerFd;

use crate::backend::{Backend, Event, Interest, Readiness};
use crate::buffer::DEFAULT_OUTBUF_SIZE;
use crate::error::{Error, Result};
use crate::poller::{FdSet, Registrar, Token};
use crate::spec::PtySpec;
use crate::stream::Link;
use crate::sys;
use crate::term::{self, RawMode};

/// How often the master is checked for a peer opening or closing the slave.
pub const PTY_POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Room for the slave's name (`/dev/pts/NNN`); a longer one still fits (the buffer grows).
const PTS_NAME_LEN: usize = 128;

/// Allocate a pty: returns the non-blocking master and the slave path.
pub(crate) fn open_master() -> io::Result<(OwnedFd, PathBuf)> {
    use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};
    let flags = OpenptFlags::RDWR
        | OpenptFlags::NOCTTY
        | OpenptFlags::CLOEXEC
        | OpenptFlags::from_bits_retain(libc::O_NONBLOCK as u32);
    let master = openpt(flags)?;
    grantpt(&master)?;
    unlockpt(&master)?;
    let name = ptsname(&master, Vec::with_capacity(PTS_NAME_LEN))?;
    Ok((master, PathBuf::from(OsString::from_vec(name.into_bytes()))))
}

/// Open the slave at `path` (without becoming its controlling terminal).
pub(crate) fn open_slave(path: &Path) -> io::Result<OwnedFd> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(path)?;
    Ok(f.into())
}

/// A raw pty pair (master non-blocking, slave blocking), for tests and the `serial` backend's
/// tests; also handy to a VMM test harness.
pub fn open_pty_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let (master, path) = open_master()?;
    let slave = open_slave(&path)?;
    Ok((master, slave))
}

/// Whether the master says no process has the slave open.
fn slave_closed(master: RawFd) -> bool {
    match sys::poll_one(master, libc::POLLIN, 0) {
        Ok(revents) => revents & libc::POLLHUP != 0,
        Err(_) => true,
    }
}

/// The `pty` backend.
#[derive(Debug)]
pub struct PtyBackend {
    /// Declared first: unregisters before `master` and `timer` close.
    fds: FdSet,
    master: OwnedFd,
    pts: PathBuf,
    symlink: Option<PathBuf>,
    link: Link,
    timer: TimerFd,
    /// The terminal size last seen, to report changes as [`Event::Resized`].
    size: Option<(u16, u16)>,
}

impl PtyBackend {
    /// Allocate a pty in raw mode.
    pub fn open(id: &str, spec: &PtySpec) -> Result<Self> {
        Self::open_with(id, spec, PTY_POLL_INTERVAL)
    }

    /// [`PtyBackend::open`] with another peer-check interval.
    pub fn open_with(id: &str, spec: &PtySpec, interval: Duration) -> Result<Self> {
        let (master, pts) = open_master().map_err(|e| Error::io(id, "allocate", "pty", e))?;
        let pts_name = pts.display().to_string();
        {
            // Raw mode is set through the slave; closing it leaves the master reporting HUP
            // until a peer opens it.
            let slave = open_slave(&pts).map_err(|e| Error::io(id, "open", pts_name.clone(), e))?;
            term::set_raw(slave.as_raw_fd(), RawMode::default())
                .map_err(|e| Error::io(id, "configure", pts_name.clone(), e))?;
        }
        let mut timer = TimerFd::new()
            .map_err(|e| Error::io(id, "create timer for", pts_name.clone(), e.into()))?;
        timer
            .reset(interval, Some(interval))
            .map_err(|e| Error::io(id, "arm timer for", pts_name.clone(), e.into()))?;
        let symlink = match &spec.path {
            Some(p) => {
                if std::fs::symlink_metadata(p)
                    .map(|m| m.file_type().is_symlink())
                    .unwrap_or(false)
                {
                    let _ = std::fs::remove_file(p);
                }
                std::os::unix::fs::symlink(&pts, p)
                    .map_err(|e| Error::io(id, "create symlink", p.display().to_string(), e))?;
                Some(p.clone())
            }
            None => None,
        };
        log::info!("chardev '{id}': pty at {pts_name}");
        let mut b = PtyBackend {
            fds: FdSet::new(),
            master,
            pts,
            symlink,
            link: Link::new(spec.backlog, DEFAULT_OUTBUF_SIZE),
            timer,
            size: None,
        };
        b.size = term::window_size(b.master.as_raw_fd());
        b.check_peer();
        Ok(b)
    }

    /// The allocated slave, `/dev/pts/N`.
    pub fn pts_path(&self) -> &Path {
        &self.pts
    }

    /// Register what the link wants on the master, and the peer timer (always).
    fn update_fds(&mut self) {
        let master = self.master.as_raw_fd();
        let interest = self
            .link
            .wanted_fds()
            .iter()
            .find(|(fd, _)| *fd == master)
            .map_or(Interest::NONE, |(_, i)| *i);
        self.fds.set(master, interest);
        self.fds.set(self.timer.as_raw_fd(), Interest::READ);
    }

    /// Attach or detach according to the master's HUP state.
    fn check_peer(&mut self) {
        let closed = slave_closed(self.master.as_raw_fd());
        if closed && self.link.connected() {
            self.link.detach();
        } else if !closed && !self.link.connected() {
            if let Err(e) = self.link.attach(self.master.as_raw_fd()) {
                log::warn!("chardev pty {}: {e}", self.pts.display());
            }
        }
        // A lost peer (EOF, EIO) leaves the master open; the next tick sees whether it is back.
        self.link.take_lost();
        // Whoever holds the slave may resize the terminal; nothing tells the master, so the
        // same tick looks.
        let size = term::window_size(self.master.as_raw_fd());
        if size != self.size {
            self.size = size;
            if let Some((cols, rows)) = size {
                self.link.events.push(Event::Resized { cols, rows });
            }
        }
    }
}

impl Drop for PtyBackend {
    fn drop(&mut self) {
        if let Some(p) = &self.symlink {
            if std::fs::read_link(p)
                .map(|t| t == self.pts)
                .unwrap_or(false)
            {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

impl Backend for PtyBackend {
    fn kind(&self) -> &'static str {
        "pty"
    }

    fn filename(&self) -> String {
        format!("pty:{}", self.pts.display())
    }

    fn attach(&mut self, reg: Registrar) {
        self.fds.attach(reg);
        self.update_fds();
    }

    fn detach(&mut self) {
        self.fds.detach();
    }

    fn on_ready(&mut self, token: Token, readiness: Readiness) {
        let Some(fd) = self.fds.fd_of(token) else {
            return;
        };
        if fd == self.timer.as_raw_fd() {
            let _ = self.timer.wait();
            self.check_peer();
        } else {
            self.link.on_ready(fd, readiness);
            if self.link.take_lost() {
                log::debug!("chardev pty {}: peer closed", self.pts.display());
            }
        }
        self.update_fds();
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.link.read(buf);
        self.link.take_lost();
        self.update_fds();
        Ok(n)
    }

    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = self.link.write(data);
        self.link.take_lost();
        self.update_fds();
        Ok(n)
    }

    fn set_input_wanted(&mut self, wanted: bool) {
        self.link.set_input_wanted(wanted);
        self.update_fds();
    }

    fn is_connected(&self) -> bool {
        self.link.connected()
    }

    fn take_events(&mut self) -> Vec<Event> {
        self.link.events.take()
    }

    fn window_size(&self) -> Option<(u16, u16)> {
        self.size
    }

    fn dropped_bytes(&self) -> u64 {
        self.link.dropped()
    }

    fn take_unsent(&mut self) -> Vec<u8> {
        self.link.take_unsent()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{read_n, wait_event, DEADLINE};
    use std::time::Instant;

    const FAST: Duration = Duration::from_millis(5);

    fn spec(path: Option<PathBuf>, backlog: usize) -> PtySpec {
        PtySpec { path, backlog }
    }

    fn slave_read(fd: RawFd, n: usize) -> Vec<u8> {
        let mut got = Vec::new();
        let end = Instant::now() + DEADLINE;
        while got.len() < n {
            assert!(Instant::now() < end, "slave got {got:?}");
            if sys::poll_one(fd, libc::POLLIN, 10).unwrap() & libc::POLLIN != 0 {
                let mut buf = [0u8; 4096];
                let k = sys::read(fd, &mut buf).unwrap();
                got.extend_from_slice(&buf[..k]);
            }
        }
        got
    }

    #[test]
    fn pty_open_close_replay_and_both_ways() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("console");
        let mut b = PtyBackend::open_with("p", &spec(Some(link.clone()), 8), FAST).unwrap();
        let pts = b.pts_path().to_path_buf();
        assert!(pts.starts_with("/dev/pts"));
        assert_eq!(b.filename(), format!("pty:{}", pts.display()));
        assert_eq!(std::fs::read_link(&link).unwrap(), pts);
        assert!(!b.is_connected());
        // Nobody has it open: the replay ring keeps the last 8 bytes.
        assert_eq!(b.write(b"0123456789").unwrap(), 10);
        assert_eq!(b.dropped_bytes(), 2);

        let slave = open_slave(&link).unwrap();
        let sfd = slave.as_raw_fd();
        let evs = wait_event(&mut b, |e| *e == Event::Opened);
        assert!(!evs.contains(&Event::Closed), "{evs:?}");
        assert_eq!(slave_read(sfd, 8), b"23456789");
        b.write(b"out").unwrap();
        assert_eq!(slave_read(sfd, 3), b"out");
        sys::write(sfd, b"in\x03").unwrap();
        assert_eq!(read_n(&mut b, 3), b"in\x03", "raw mode passes ^C through");

        drop(slave);
        wait_event(&mut b, |e| *e == Event::Closed);
        assert!(!b.is_connected());
        b.write(b"later").unwrap();
        let slave = open_slave(&pts).unwrap();
        wait_event(&mut b, |e| *e == Event::Opened);
        assert_eq!(slave_read(slave.as_raw_fd(), 5), b"later");
        drop(b);
        assert!(
            std::fs::symlink_metadata(&link).is_err(),
            "symlink not removed"
        );
    }

    #[test]
    fn pty_backlog_zero_drops() {
        let mut b = PtyBackend::open_with("p", &spec(None, 0), FAST).unwrap();
        b.write(b"gone").unwrap();
        assert_eq!(b.dropped_bytes(), 4);
        let slave = open_slave(b.pts_path()).unwrap();
        wait_event(&mut b, |e| *e == Event::Opened);
        b.write(b"kept").unwrap();
        assert_eq!(slave_read(slave.as_raw_fd(), 4), b"kept");
    }

    #[test]
    fn pty_reports_the_size_the_slave_sets() {
        let mut b = PtyBackend::open_with("p", &spec(None, 0), FAST).unwrap();
        let slave = open_slave(b.pts_path()).unwrap();
        wait_event(&mut b, |e| *e == Event::Opened);
        let ws = libc::winsize {
            ws_row: 40,
            ws_col: 132,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize, which we own, on the slave fd we own.
        let rc = unsafe { libc::ioctl(slave.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        assert_eq!(rc, 0);
        wait_event(&mut b, |e| {
            *e == Event::Resized {
                cols: 132,
                rows: 40,
            }
        });
        assert_eq!(b.window_size(), Some((132, 40)));
    }
}
