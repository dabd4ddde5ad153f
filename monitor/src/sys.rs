//! The few system calls the monitor needs that std does not offer: SCM_RIGHTS send and
//! receive, non-signalling sends, socket and file identity checks, process liveness and
//! random bytes. Every `unsafe` block of the crate outside tests lives here.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// Most fds accepted with one message (QEMU's limit for a socket chardev too).
pub const MAX_FDS_PER_MESSAGE: usize = 16;

/// Bytes of control buffer for [`MAX_FDS_PER_MESSAGE`] fds, rounded up generously.
const CMSG_BUFFER: usize = 256;

fn cvt(r: libc::ssize_t) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// Control-message buffer with the alignment `cmsghdr` needs.
#[repr(C, align(8))]
struct CmsgBuf([u8; CMSG_BUFFER]);

/// `recvmsg` on a stream socket: up to `buf.len()` bytes, plus any fds passed with them
/// (appended to `fds`, close-on-exec). Returns 0 at end of stream.
pub fn recv_with_fds(fd: RawFd, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
    let mut cmsg = CmsgBuf([0; CMSG_BUFFER]);
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.0.as_mut_ptr().cast();
    msg.msg_controllen = CMSG_BUFFER as _;
    // SAFETY: `msg` points at a live iovec over `buf` and at `cmsg`, both outliving the call,
    // with their true lengths.
    let n =
        cvt(unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT) })?;
    // SAFETY: `msg` was filled by recvmsg; the CMSG macros walk the control buffer within
    // `msg_controllen`, which the kernel set to what it wrote.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c);
                let payload = ((*c).cmsg_len as usize).saturating_sub(libc::CMSG_LEN(0) as usize);
                let count = payload / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    let raw = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    // The kernel installed this fd for us: we own it now.
                    fds.push(OwnedFd::from_raw_fd(raw));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        log::warn!("monitor: more fds passed than {MAX_FDS_PER_MESSAGE}; extra fds were dropped");
    }
    Ok(n)
}

/// Non-blocking `send` that never raises SIGPIPE.
pub fn send_nosignal(fd: RawFd, data: &[u8]) -> io::Result<usize> {
    // SAFETY: `data` is a live buffer of the given length.
    cvt(unsafe {
        libc::send(
            fd,
            data.as_ptr().cast(),
            data.len(),
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    })
}

/// `sendmsg` of `data` with `fds` attached as SCM_RIGHTS (the client side of `getfd`).
pub fn send_with_fds(fd: RawFd, data: &[u8], fds: &[RawFd]) -> io::Result<usize> {
    if fds.len() > MAX_FDS_PER_MESSAGE {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "too many fds"));
    }
    let mut cmsg = CmsgBuf([0; CMSG_BUFFER]);
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let bytes = std::mem::size_of_val(fds);
        // SAFETY: CMSG_SPACE is a pure size computation.
        let space = unsafe { libc::CMSG_SPACE(bytes as u32) } as usize;
        msg.msg_control = cmsg.0.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: the control buffer is CMSG_BUFFER bytes, more than CMSG_SPACE of at most
        // MAX_FDS_PER_MESSAGE fds; the header and data are written inside it.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(bytes as u32) as _;
            std::ptr::copy_nonoverlapping(fds.as_ptr().cast::<u8>(), libc::CMSG_DATA(c), bytes);
        }
    }
    // SAFETY: `msg` points at live buffers (iov over `data`, `cmsg`) of the stated sizes.
    cvt(unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL) })
}

/// Whether `fd` is a stream socket.
pub fn is_stream_socket(fd: RawFd) -> bool {
    let mut ty: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `ty`.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            (&mut ty as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    r == 0 && ty == libc::SOCK_STREAM
}

/// The (device, inode) of what `fd` refers to, `None` if it is not open.
pub fn file_id(fd: RawFd) -> Option<(u64, u64)> {
    // SAFETY: an all-zero stat is a valid out-buffer.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes into `st` only.
    let r = unsafe { libc::fstat(fd, &mut st) };
    (r == 0).then_some((st.st_dev as u64, st.st_ino as u64))
}

/// Whether process `pid` exists (it may belong to another user).
pub fn process_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 only checks for existence and permission; nothing is delivered.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// The effective user id.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no failure mode and touches no memory.
    unsafe { libc::geteuid() }
}

/// Fill `buf` with random bytes from the kernel.
pub fn random_bytes(buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: getrandom writes at most the remaining length into our buffer.
        let r = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        match cvt(r) {
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `poll` one fd for `events`, at most `timeout_ms` (-1: forever). Returns the revents.
pub fn poll_one(fd: RawFd, events: libc::c_short, timeout_ms: i32) -> io::Result<libc::c_short> {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let r = unsafe { libc::poll(&mut p, 1, timeout_ms) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(p.revents)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn fds_cross_a_socket() {
        let (a, b) = UnixStream::pair().unwrap();
        let f = std::fs::File::open("/dev/null").unwrap();
        assert_eq!(
            send_with_fds(a.as_raw_fd(), b"x", &[f.as_raw_fd()]).unwrap(),
            1
        );
        let mut buf = [0u8; 8];
        let mut fds = Vec::new();
        assert_eq!(recv_with_fds(b.as_raw_fd(), &mut buf, &mut fds).unwrap(), 1);
        assert_eq!(fds.len(), 1);
        assert_eq!(file_id(fds[0].as_raw_fd()), file_id(f.as_raw_fd()));
        assert!(!is_stream_socket(f.as_raw_fd()));
        assert!(is_stream_socket(a.as_raw_fd()));
        assert!(process_alive(std::process::id() as i32));
        let mut r = [0u8; 16];
        random_bytes(&mut r).unwrap();
        assert_ne!(r, [0u8; 16]);
    }
}
