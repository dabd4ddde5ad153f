//! The `stdio` backend: the guest console on minivmm's own terminal.
//!
//! When stdin is a terminal it is put in raw mode (`cfmakeraw`, keeping ISIG when `signal=on`
//! so ^C still reaches minivmm, and OPOST as QEMU does). The original settings come back when
//! the backend drops, at `exit()` (an `atexit` hook), and whenever the VMM calls
//! [`restore_terminal`], which is async-signal-safe for use from a signal handler or a fatal
//! path that will not unwind.
//!
//! Non-blocking without touching the shell: `O_NONBLOCK` lives on the open file description,
//! which stdin and stdout share with the user's shell, so setting it there would leave the shell
//! with a non-blocking terminal after minivmm exits. Ttys, pipes and other character devices
//! are therefore reopened through `/proc/self/fd/N`, which gives minivmm a description of its
//! own; regular files need no `O_NONBLOCK` (they never block on readiness, and epoll refuses
//! them anyway); only what cannot be reopened (sockets) gets `O_NONBLOCK` set on the shared
//! description, and its old flags are restored with the termios.
//!
//! **Terminal size.** When stdout is a terminal the backend reports its size
//! ([`Backend::window_size`]) and each change as [`Event::Resized`], read from a signalfd for
//! `SIGWINCH`. The process must block `SIGWINCH` in every thread for that (the VMM does, with
//! its stop signals); where it is not blocked, changes go unseen and the size stays readable.
//!
//! Only one stdio chardev exists at a time. This module must not close fds 0 and 1.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Once, OnceLock};

use crate::backend::{Backend, Event, Interest, Readiness};
use crate::error::{Error, Result};
use crate::fdchan::FdChannel;
use crate::poller::{FdSet, Registrar, Token};
use crate::spec::StdioSpec;
use crate::sys::{self, FdKind};
use crate::term::{self, RawMode, Termios};

const STDIN: RawFd = libc::STDIN_FILENO;
const STDOUT: RawFd = libc::STDOUT_FILENO;
/// Marks a saved-flags slot as unused.
const NO_FLAGS: i32 = -1;

/// Whether a stdio backend exists.
static IN_USE: AtomicBool = AtomicBool::new(false);
/// The terminal settings found before the first stdio backend changed them.
static SAVED_TERMIOS: OnceLock<Termios> = OnceLock::new();
/// Whether the terminal is currently changed and must be restored.
static TERMIOS_CHANGED: AtomicBool = AtomicBool::new(false);
/// File status flags of fds 0 and 1 before we set O_NONBLOCK on them, or [`NO_FLAGS`].
static SAVED_FLAGS: [AtomicI32; 2] = [AtomicI32::new(NO_FLAGS), AtomicI32::new(NO_FLAGS)];
/// Registers the `atexit` hook once.
static ATEXIT: Once = Once::new();

/// Put the terminal and the stdio file flags back as they were before the stdio backend
/// changed them. Idempotent, and async-signal-safe (atomics, [`term::tcsetattr`], `fcntl`
/// only): call it from a signal handler or before any exit that skips destructors. Also runs
/// at `exit()`.
pub fn restore_terminal() {
    if TERMIOS_CHANGED.swap(false, Ordering::SeqCst) {
        if let Some(t) = SAVED_TERMIOS.get() {
            // One TCSETS2 ioctl on a termios that lives in a static: no allocation, no lock
            // (see `term`), so this stays async-signal-safe.
            let _ = term::tcsetattr(STDIN, t);
        }
    }
    for (fd, slot) in [STDIN, STDOUT].into_iter().zip(&SAVED_FLAGS) {
        let flags = slot.swap(NO_FLAGS, Ordering::SeqCst);
        if flags != NO_FLAGS {
            // SAFETY: F_SETFL with an integer argument; async-signal-safe.
            unsafe { libc::fcntl(fd, libc::F_SETFL, flags) };
        }
    }
}

extern "C" fn restore_at_exit() {
    restore_terminal();
}

/// Get a non-blocking fd for `fd` without changing the description the shell shares: see the
/// module docs. Returns the fd to use and, if we opened one, its owner.
fn private_fd(fd: RawFd, write: bool, slot: usize) -> io::Result<(RawFd, Option<OwnedFd>)> {
    let kind = sys::fd_kind(fd)?;
    if kind == FdKind::Regular {
        return Ok((fd, None));
    }
    if kind != FdKind::Socket {
        let flags = sys::get_fl(fd)?;
        let mut o = OpenOptions::new();
        o.custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | (flags & libc::O_APPEND));
        if write {
            o.write(true);
        } else {
            o.read(true);
        }
        match o.open(format!("/proc/self/fd/{fd}")) {
            Ok(f) => {
                let owned: OwnedFd = f.into();
                return Ok((owned.as_raw_fd(), Some(owned)));
            }
            Err(e) => log::debug!("stdio: cannot reopen fd {fd} ({e}), sharing its flags"),
        }
    }
    let flags = sys::get_fl(fd)?;
    if SAVED_FLAGS[slot]
        .compare_exchange(NO_FLAGS, flags, Ordering::SeqCst, Ordering::SeqCst)
        .is_ok()
    {
        ATEXIT.call_once(register_atexit);
    }
    sys::set_nonblocking(fd, true)?;
    Ok((fd, None))
}

fn register_atexit() {
    // SAFETY: registers a plain extern "C" function with no captured state.
    if unsafe { libc::atexit(restore_at_exit) } != 0 {
        log::warn!("stdio: cannot register the terminal restore at exit");
    }
}

/// Put stdin's terminal in raw mode, remembering the original settings.
fn make_raw(signal: bool) -> io::Result<()> {
    let current = term::tcgetattr(STDIN)?;
    let original = SAVED_TERMIOS.get_or_init(|| current);
    let mode = RawMode {
        signals: signal,
        output_processing: true,
    };
    let raw = term::make_raw(original, mode);
    ATEXIT.call_once(register_atexit);
    TERMIOS_CHANGED.store(true, Ordering::SeqCst);
    term::tcsetattr(STDIN, &raw)
}

/// A non-blocking signalfd for `SIGWINCH`.
fn winch_signalfd() -> io::Result<OwnedFd> {
    // SAFETY: an all-zero sigset_t is valid storage for sigemptyset to initialise.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: set is valid, owned storage; SIGWINCH is a valid signal number.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGWINCH);
    }
    // SAFETY: set is initialised; -1 asks for a new fd; the flags are valid.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by signalfd and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Read every pending signal from a non-blocking signalfd.
fn drain_signalfd(fd: RawFd) {
    let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
    while matches!(sys::read(fd, &mut info), Ok(n) if n > 0) {}
}

/// The `stdio` backend.
#[derive(Debug)]
pub struct StdioBackend {
    /// The `SIGWINCH` signalfd's registration; declared first, it unregisters before `winch`
    /// closes.
    fds: FdSet,
    chan: FdChannel,
    /// `SIGWINCH` notifications, when stdout is a terminal.
    _winch: Option<OwnedFd>,
    /// The terminal size last reported.
    size: Option<(u16, u16)>,
    /// A resize not yet taken by the frontend.
    resized: Option<(u16, u16)>,
}

impl StdioBackend {
    /// Take over stdin and stdout. Fails if another stdio backend exists.
    pub fn open(id: &str, spec: &StdioSpec) -> Result<Self> {
        if IN_USE.swap(true, Ordering::SeqCst) {
            return Err(Error::StdioInUse(id.to_string()));
        }
        match Self::setup(id, spec) {
            Ok(b) => Ok(b),
            Err(e) => {
                restore_terminal();
                IN_USE.store(false, Ordering::SeqCst);
                Err(e)
            }
        }
    }

    fn setup(id: &str, spec: &StdioSpec) -> Result<Self> {
        let err = |op, e| Error::io(id, op, "stdio", e);
        let (rfd, rown) = private_fd(STDIN, false, 0).map_err(|e| err("use", e))?;
        let (wfd, wown) = private_fd(STDOUT, true, 1).map_err(|e| err("use", e))?;
        if term::isatty(STDIN) {
            make_raw(spec.signal).map_err(|e| err("set raw mode on", e))?;
        }
        let owned = rown.into_iter().chain(wown).collect();
        let chan = FdChannel::new("stdio", "stdio".to_string(), Some(rfd), Some(wfd), owned)
            .map_err(|e| err("use", e))?;
        let winch = if term::isatty(STDOUT) {
            winch_signalfd()
                .map_err(|e| log::warn!("stdio: no terminal size changes: {e}"))
                .ok()
        } else {
            None
        };
        let mut fds = FdSet::new();
        if let Some(w) = &winch {
            fds.set(w.as_raw_fd(), Interest::READ);
        }
        Ok(StdioBackend {
            fds,
            chan,
            _winch: winch,
            size: term::window_size(STDOUT),
            resized: None,
        })
    }
}

impl Drop for StdioBackend {
    fn drop(&mut self) {
        restore_terminal();
        IN_USE.store(false, Ordering::SeqCst);
    }
}

impl Backend for StdioBackend {
    fn kind(&self) -> &'static str {
        "stdio"
    }
    fn filename(&self) -> String {
        "stdio".to_string()
    }
    fn attach(&mut self, reg: Registrar) {
        self.fds.attach(reg.clone());
        self.chan.attach(reg);
    }
    fn detach(&mut self) {
        self.fds.detach();
        self.chan.detach();
    }
    fn on_ready(&mut self, token: Token, readiness: Readiness) {
        let Some(fd) = self.fds.fd_of(token) else {
            return self.chan.on_ready(token, readiness);
        };
        drain_signalfd(fd);
        let size = term::window_size(STDOUT);
        if size != self.size {
            self.size = size;
            self.resized = size;
        }
    }
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.chan.read(buf)
    }
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.chan.write(data)
    }
    fn set_input_wanted(&mut self, wanted: bool) {
        self.chan.set_input_wanted(wanted)
    }
    fn is_connected(&self) -> bool {
        true
    }
    fn take_events(&mut self) -> Vec<Event> {
        let mut events = self.chan.take_events();
        if let Some((cols, rows)) = self.resized.take() {
            events.push(Event::Resized { cols, rows });
        }
        events
    }
    fn window_size(&self) -> Option<(u16, u16)> {
        self.size
    }
    fn dropped_bytes(&self) -> u64 {
        self.chan.dropped_bytes()
    }
}

#[cfg(test)]
mod tests {
    //! stdio is tested in a child process (this test binary re-run on one test), with its
    //! stdin and stdout on a real pty whose settings and flags the parent checks afterwards.
    use super::*;
    use crate::pty::open_pty_pair;
    use crate::testutil::{pump, tcgetattr, DEADLINE};
    use std::process::{Command, Stdio};
    use std::time::Instant;

    const CHILD_ENV: &str = "CHARDEV_STDIO_CHILD";

    /// The child: echo input upper-cased until 'q', then leave by the path in CHILD_ENV.
    #[test]
    fn stdio_child() {
        let Ok(mode) = std::env::var(CHILD_ENV) else {
            return;
        };
        let mut b = StdioBackend::open("s", &StdioSpec { signal: false }).unwrap();
        assert!(matches!(
            StdioBackend::open("t", &StdioSpec { signal: true }),
            Err(Error::StdioInUse(_))
        ));
        let t = tcgetattr(STDIN).unwrap();
        assert_eq!(t.c_lflag & (libc::ICANON | libc::ECHO | libc::ISIG), 0);
        b.write(b"ready\n").unwrap();
        let end = Instant::now() + DEADLINE;
        'outer: while Instant::now() < end {
            pump(&mut b, 10);
            let mut buf = [0u8; 64];
            let n = b.read(&mut buf).unwrap();
            for &c in &buf[..n] {
                if c == b'q' {
                    break 'outer;
                }
                b.write(&[c.to_ascii_uppercase()]).unwrap();
            }
        }
        b.write(b"bye\n").unwrap();
        if mode == "exit" {
            // No destructor runs: the atexit hook must restore the terminal.
            std::process::exit(0);
        }
    }

    fn run_child(mode: &str) {
        let (master, slave) = open_pty_pair().unwrap();
        let before = tcgetattr(slave.as_raw_fd()).unwrap();
        assert_ne!(before.c_lflag & libc::ICANON, 0);
        let fl_before = sys::get_fl(slave.as_raw_fd()).unwrap();
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "stdio::tests::stdio_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, mode)
            .stdin(Stdio::from(slave.try_clone().unwrap()))
            .stdout(Stdio::from(slave.try_clone().unwrap()))
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mfd = master.as_raw_fd();
        let mut seen = Vec::new();
        let read_until = |seen: &mut Vec<u8>, needle: &[u8]| {
            let end = Instant::now() + DEADLINE;
            while !seen.windows(needle.len()).any(|w| w == needle) {
                assert!(
                    Instant::now() < end,
                    "child said {:?}",
                    String::from_utf8_lossy(seen)
                );
                if sys::poll_one(mfd, libc::POLLIN, 10).unwrap() & libc::POLLIN != 0 {
                    let mut buf = [0u8; 256];
                    if let Ok(n) = sys::read(mfd, &mut buf) {
                        seen.extend_from_slice(&buf[..n]);
                    }
                }
            }
        };
        read_until(&mut seen, b"ready");
        sys::write(mfd, b"abc").unwrap();
        read_until(&mut seen, b"ABC");
        sys::write(mfd, b"q").unwrap();
        read_until(&mut seen, b"bye");
        assert!(child.wait().unwrap().success());
        let after = tcgetattr(slave.as_raw_fd()).unwrap();
        assert_eq!(after.c_lflag, before.c_lflag, "local modes not restored");
        assert_eq!(after.c_iflag, before.c_iflag, "input modes not restored");
        assert_eq!(after.c_oflag, before.c_oflag, "output modes not restored");
        assert_eq!(
            sys::get_fl(slave.as_raw_fd()).unwrap(),
            fl_before,
            "flags changed"
        );
    }

    #[test]
    fn stdio_raw_echo_and_restore_on_drop() {
        run_child("drop");
    }

    #[test]
    fn stdio_restore_at_exit() {
        run_child("exit");
    }
}
