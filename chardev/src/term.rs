//! The terminal helper every tty user shares (stdio, pty, the host `serial` line, and
//! `minivmm console`): termios get and set, raw mode, the window size, the modem lines and
//! break, and [`RawTerminal`], a guard that restores the saved settings on drop.
//!
//! Built on rustix's `termios`, which on Linux issues the `TCGETS2`/`TCSETS2`/`TIOCGWINSZ`
//! ioctls itself rather than through the C library. Two things follow:
//!
//! - Line speeds are plain integers ([`Termios::set_speed`]) and need no libc
//!   `cfset*speed` symbol, which a static (`crt-static`) glibc link cannot resolve.
//! - [`tcsetattr`] is one `ioctl` system call (a second one, `TCSETS`, only on a kernel that
//!   refuses `TCSETS2`): no allocation, no lock, no `errno`. It is therefore
//!   async-signal-safe, which [`crate::restore_terminal`] relies on: it runs from `atexit`,
//!   signal handlers and fatal paths.
//!
//! The modem-line and break ioctls (`TIOCMGET`, `TIOCMBIS`/`TIOCMBIC`, `TIOCSBRK`/`TIOCCBRK`),
//! which rustix does not wrap, are libc calls here.
//!
//! Fds are passed by number, as everywhere in this crate: the caller keeps them open. This
//! module keeps no state.

use std::io;
use std::os::unix::io::RawFd;

use rustix::termios::OptionalActions;
pub use rustix::termios::{ControlModes, InputModes, LocalModes, OutputModes, Termios};

use crate::sys::with_fd;

/// What [`make_raw`] turns back on after `cfmakeraw`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RawMode {
    /// Set `ISIG`: ^C, ^\ and ^Z still raise signals (stdio's `signal=on`).
    pub signals: bool,
    /// Set `OPOST`: output processing stays on, so "\n" still goes out as "\r\n" (the stdio
    /// console, as QEMU does).
    pub output_processing: bool,
}

/// Whether `fd` is a terminal.
pub fn isatty(fd: RawFd) -> bool {
    with_fd(fd, |fd| Ok(rustix::termios::isatty(fd))).unwrap_or(false)
}

/// The terminal settings of `fd` (`tcgetattr`).
pub fn tcgetattr(fd: RawFd) -> io::Result<Termios> {
    with_fd(fd, |fd| Ok(rustix::termios::tcgetattr(fd)?))
}

/// Set the terminal settings of `fd` now (`tcsetattr(TCSANOW)`). Async-signal-safe: see the
/// module docs.
pub fn tcsetattr(fd: RawFd, t: &Termios) -> io::Result<()> {
    with_fd(fd, |fd| {
        Ok(rustix::termios::tcsetattr(fd, OptionalActions::Now, t)?)
    })
}

/// `t` in raw mode, as `cfmakeraw` makes it (no echo, no line editing, no signals, no input
/// or output translation, 8 bits, `VMIN` 1 and `VTIME` 0), then with what `mode` asks for set.
pub fn make_raw(t: &Termios, mode: RawMode) -> Termios {
    let mut raw = t.clone();
    raw.make_raw();
    if mode.output_processing {
        raw.output_modes |= OutputModes::OPOST;
    }
    if mode.signals {
        raw.local_modes |= LocalModes::ISIG;
    }
    raw
}

/// Put terminal `fd` in raw mode (see [`make_raw`]); returns the settings it had before.
pub fn set_raw(fd: RawFd, mode: RawMode) -> io::Result<Termios> {
    let saved = tcgetattr(fd)?;
    tcsetattr(fd, &make_raw(&saved, mode))?;
    Ok(saved)
}

/// The window size of terminal `fd` as (columns, rows); `None` if it is no terminal or its
/// size was never set (0x0).
pub fn window_size(fd: RawFd) -> Option<(u16, u16)> {
    let ws = with_fd(fd, |fd| Ok(rustix::termios::tcgetwinsize(fd)?)).ok()?;
    (ws.ws_col != 0 && ws.ws_row != 0).then_some((ws.ws_col, ws.ws_row))
}

/// Return `Err(last_os_error)` when a libc call returned -1.
fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The tty's modem lines (`TIOCMGET`): a mask of `TIOCM_*` bits.
pub fn tiocmget(fd: RawFd) -> io::Result<libc::c_int> {
    let mut bits: libc::c_int = 0;
    // SAFETY: TIOCMGET writes one int into bits, which we own.
    check(unsafe { libc::ioctl(fd, libc::TIOCMGET, &mut bits) })?;
    Ok(bits)
}

/// Raise (`TIOCMBIS`) or lower (`TIOCMBIC`) the tty's modem lines in `bits`.
pub fn tiocm_change(fd: RawFd, bits: libc::c_int, on: bool) -> io::Result<()> {
    let req = if on { libc::TIOCMBIS } else { libc::TIOCMBIC };
    // SAFETY: TIOCMBIS/TIOCMBIC read one int from bits, which we borrow.
    check(unsafe { libc::ioctl(fd, req, &bits) })
}

/// Start (`TIOCSBRK`) or end (`TIOCCBRK`) a break on the line. Unlike `tcsendbreak`, this
/// never blocks: the caller times the break.
pub fn set_break(fd: RawFd, on: bool) -> io::Result<()> {
    let req = if on { libc::TIOCSBRK } else { libc::TIOCCBRK };
    // SAFETY: TIOCSBRK/TIOCCBRK take no argument; they touch no memory of ours.
    check(unsafe { libc::ioctl(fd, req) })
}

/// A terminal in raw mode while this lives: the settings found when it was entered come back
/// on drop. The fd is not owned: keep it open at least as long as the guard.
#[derive(Debug)]
pub struct RawTerminal {
    fd: RawFd,
    saved: Termios,
}

impl RawTerminal {
    /// Put terminal `fd` in raw mode (see [`make_raw`]). Fails if `fd` is no terminal.
    pub fn enter(fd: RawFd, mode: RawMode) -> io::Result<Self> {
        Self::enter_with(fd, |t| Ok(make_raw(t, mode)))
    }

    /// Save the settings of terminal `fd` and set those `configure` derives from them.
    pub fn enter_with(
        fd: RawFd,
        configure: impl FnOnce(&Termios) -> io::Result<Termios>,
    ) -> io::Result<Self> {
        let saved = tcgetattr(fd)?;
        tcsetattr(fd, &configure(&saved)?)?;
        Ok(RawTerminal { fd, saved })
    }

    /// The settings restored on drop.
    pub fn saved(&self) -> &Termios {
        &self.saved
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Err(e) = tcsetattr(self.fd, &self.saved) {
            log::debug!(
                "cannot restore the settings of terminal fd {}: {e}",
                self.fd
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pty::open_pty_pair;
    use crate::testutil;
    use std::os::unix::io::AsRawFd;

    #[test]
    fn raw_guard_sets_and_restores() {
        let (_master, slave) = open_pty_pair().unwrap();
        let fd = slave.as_raw_fd();
        let before = testutil::tcgetattr(fd).unwrap();
        assert_ne!(before.c_lflag & libc::ICANON, 0);
        {
            let mode = RawMode {
                signals: true,
                output_processing: false,
            };
            let _raw = RawTerminal::enter(fd, mode).unwrap();
            let t = testutil::tcgetattr(fd).unwrap();
            assert_eq!(t.c_lflag & (libc::ICANON | libc::ECHO), 0);
            assert_ne!(t.c_lflag & libc::ISIG, 0, "signals kept");
            assert_eq!(t.c_oflag & libc::OPOST, 0);
            assert_eq!(t.c_cflag & libc::CSIZE, libc::CS8);
            assert_eq!((t.c_cc[libc::VMIN], t.c_cc[libc::VTIME]), (1, 0));
        }
        let after = testutil::tcgetattr(fd).unwrap();
        assert_eq!(after.c_lflag, before.c_lflag);
        assert_eq!(after.c_iflag, before.c_iflag);
        assert_eq!(after.c_oflag, before.c_oflag);
        assert_eq!(after.c_cflag, before.c_cflag);
    }

    #[test]
    fn make_raw_is_cfmakeraw() {
        let (_master, slave) = open_pty_pair().unwrap();
        let fd = slave.as_raw_fd();
        let ours = make_raw(&tcgetattr(fd).unwrap(), RawMode::default());
        let mut theirs = testutil::tcgetattr(fd).unwrap();
        // SAFETY: cfmakeraw only edits the termios we own.
        unsafe { libc::cfmakeraw(&mut theirs) };
        assert_eq!(ours.input_modes.bits(), theirs.c_iflag);
        assert_eq!(ours.output_modes.bits(), theirs.c_oflag);
        assert_eq!(ours.control_modes.bits(), theirs.c_cflag);
        assert_eq!(ours.local_modes.bits(), theirs.c_lflag);
        let with = make_raw(
            &ours,
            RawMode {
                signals: true,
                output_processing: true,
            },
        );
        assert!(with.local_modes.contains(LocalModes::ISIG));
        assert!(with.output_modes.contains(OutputModes::OPOST));
    }

    #[test]
    fn not_a_terminal() {
        let f = tempfile::tempfile().unwrap();
        assert!(!isatty(f.as_raw_fd()));
        assert!(tcgetattr(f.as_raw_fd()).is_err());
        assert_eq!(window_size(f.as_raw_fd()), None);
        assert!(RawTerminal::enter(f.as_raw_fd(), RawMode::default()).is_err());
        assert!(!isatty(-1));
    }
}
