//! Small safe wrappers over the libc calls the backends share: file status flags, non-blocking
//! read/write/send, fd classification, one-shot poll; and [`with_fd`], the bridge from this
//! crate's fd numbers to the I/O-safe APIs of rustix and socket2. The terminal helpers live in
//! [`crate::term`].
//!
//! Every function here is non-blocking on a non-blocking fd (the one-shot `poll_one` blocks
//! at most for the timeout it is given). This module must not keep state.

use std::io;
use std::os::unix::io::{BorrowedFd, RawFd};

/// Return `Err(last_os_error)` when a libc call returned -1.
fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Run `f` on `fd`, borrowed for the length of the call: how this crate, which passes fds by
/// number, calls the rustix and socket2 functions that take a `BorrowedFd` or `AsFd`.
/// A negative fd is `EBADF`. Async-signal-safe when `f` is.
pub fn with_fd<R>(fd: RawFd, f: impl FnOnce(BorrowedFd<'_>) -> io::Result<R>) -> io::Result<R> {
    if fd < 0 {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    // SAFETY: fd is not -1 (the one value a BorrowedFd cannot hold), and the borrow ends with
    // `f`, while the caller, which passed the fd to use, keeps it open. A closed fd could only
    // make the system call in `f` fail with EBADF: nothing reads memory through an fd number.
    f(unsafe { BorrowedFd::borrow_raw(fd) })
}

/// Whether `e` means "try again later".
pub fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

/// The fd's file status flags (`F_GETFL`).
pub(crate) fn get_fl(fd: RawFd) -> io::Result<libc::c_int> {
    // SAFETY: F_GETFL reads flags of an fd we were given; an invalid fd only yields EBADF.
    check(unsafe { libc::fcntl(fd, libc::F_GETFL) })
}

/// Set the fd's file status flags (`F_SETFL`).
pub(crate) fn set_fl(fd: RawFd, flags: libc::c_int) -> io::Result<()> {
    // SAFETY: F_SETFL with an integer argument touches no memory of ours.
    check(unsafe { libc::fcntl(fd, libc::F_SETFL, flags) }).map(drop)
}

/// Turn `O_NONBLOCK` on or off.
pub fn set_nonblocking(fd: RawFd, on: bool) -> io::Result<()> {
    let flags = get_fl(fd)?;
    let new = if on {
        flags | libc::O_NONBLOCK
    } else {
        flags & !libc::O_NONBLOCK
    };
    if new != flags {
        set_fl(fd, new)?;
    }
    Ok(())
}

/// `read(2)`, retried on EINTR. `Ok(0)` is end of file.
pub fn read(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: the kernel writes at most buf.len() bytes into buf, which we borrow mutably.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Bytes waiting to be read on `fd` (`FIONREAD`); 0 when the fd cannot say.
pub fn pending_input(fd: RawFd) -> usize {
    with_fd(fd, |fd| Ok(rustix::io::ioctl_fionread(fd)?)).map_or(0, |n| n as usize)
}

/// `write(2)`, retried on EINTR. One attempt otherwise: callers handle short writes.
pub fn write(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: the kernel reads at most buf.len() bytes from buf, which we borrow.
        let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// `send(2)` with MSG_NOSIGNAL | MSG_DONTWAIT: a gone peer is EPIPE, not SIGPIPE.
pub fn send(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: the kernel reads at most buf.len() bytes from buf, which we borrow.
        let n = unsafe {
            libc::send(
                fd,
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// What an fd refers to, as far as polling and writing are concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FdKind {
    /// Always ready, and epoll refuses it: a regular file, a block device, or a character
    /// device without poll support (`/dev/null`, `/dev/zero`: a stdin redirected from
    /// `/dev/null` reads its end at once, as with QEMU).
    Regular,
    /// A socket: written with `send(MSG_NOSIGNAL)`.
    Socket,
    /// A FIFO or pipe.
    Fifo,
    /// A character device (tty, /dev/null, ...).
    Char,
}

impl FdKind {
    /// Whether epoll can watch this kind of fd.
    pub(crate) fn pollable(self) -> bool {
        self != FdKind::Regular
    }
}

/// Classify `fd` with `fstat` (and, for a character device, whether epoll takes it).
pub(crate) fn fd_kind(fd: RawFd) -> io::Result<FdKind> {
    // SAFETY: an all-zero stat is a valid value of this plain C struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes one stat into st, which we own.
    check(unsafe { libc::fstat(fd, &mut st) })?;
    Ok(match st.st_mode & libc::S_IFMT {
        libc::S_IFSOCK => FdKind::Socket,
        libc::S_IFIFO => FdKind::Fifo,
        libc::S_IFCHR if epoll_refuses(fd)? => FdKind::Regular,
        libc::S_IFCHR => FdKind::Char,
        _ => FdKind::Regular,
    })
}

/// Whether epoll refuses `fd` (EPERM: the file has no poll support), asked of a throwaway
/// epoll instance.
fn epoll_refuses(fd: RawFd) -> io::Result<bool> {
    use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
    let probe = Epoll::new()?;
    match probe.ctl(
        ControlOperation::Add,
        fd,
        EpollEvent::new(EventSet::empty(), 0),
    ) {
        Ok(()) => Ok(false),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => Ok(true),
        Err(e) => Err(e),
    }
}

/// Poll one fd once for `events`, waiting at most `timeout_ms` (-1: forever). Returns revents.
pub fn poll_one(
    fd: RawFd,
    events: libc::c_short,
    timeout_ms: libc::c_int,
) -> io::Result<libc::c_short> {
    let mut pfd = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    loop {
        // SAFETY: poll reads and writes exactly one pollfd, which we own.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if n >= 0 {
            return Ok(if n == 0 { 0 } else { pfd.revents });
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Ignore SIGPIPE process-wide, so a write to a pipe whose reader left is EPIPE instead of
/// death. Rust binaries already start this way; a VMM embedding this crate in another runtime
/// should call it once at startup. Sockets never need it (they are written with MSG_NOSIGNAL).
pub fn ignore_sigpipe() {
    // SAFETY: installing SIG_IGN for SIGPIPE has no memory effects and is always valid.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::io::AsRawFd;

    #[test]
    fn fd_kinds_follow_what_epoll_can_watch() {
        let null = std::fs::File::open("/dev/null").unwrap();
        assert_eq!(fd_kind(null.as_raw_fd()).unwrap(), FdKind::Regular);
        let file = tempfile::tempfile().unwrap();
        assert_eq!(fd_kind(file.as_raw_fd()).unwrap(), FdKind::Regular);
        let (master, _slave) = crate::pty::open_pty_pair().unwrap();
        assert_eq!(fd_kind(master.as_raw_fd()).unwrap(), FdKind::Char);
        let (r, _w) = std::io::pipe().unwrap();
        assert_eq!(fd_kind(r.as_raw_fd()).unwrap(), FdKind::Fifo);
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert_eq!(fd_kind(a.as_raw_fd()).unwrap(), FdKind::Socket);
    }
}
