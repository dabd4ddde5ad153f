//! `minivmm-vp vsock-cat`: stdin and stdout joined to one AF_VSOCK stream, the small part of
//! `socat` the guest tests need (busybox `nc` has no vsock).
//!
//! ```text
//! minivmm-vp vsock-cat [--tee FD] listen PORT         accept one connection on PORT (any CID)
//! minivmm-vp vsock-cat [--tee FD] connect CID PORT    connect to CID:PORT (the host is CID 2)
//! ```
//!
//! `--tee FD` also writes what the stream brings to the open fd FD (from the same buffer), so
//! that one process both checksums (stdout into `md5sum`) and passes on (FD a FIFO) what it
//! receives: busybox `tee` moves 1 KiB a system call, which costs more than the stream itself
//! on kvm_pvm's emulated ring 0.
//!
//! Bytes move by `read(2)` into a buffer and `write(2)` from that same buffer, never copied
//! between user buffers: on kvm_pvm, guest user code that copies with SSE stores now and then
//! writes zeros (resources/README.md, "Guest data corruption on kvm_pvm"), so what a test
//! checksums must only be moved by the kernel. When stdin ends, the socket's sending side is
//! shut down (the peer reads end of file); when the peer's side ends, what it sent is written
//! out and the program exits 0. A failed connect prints one line naming the error (a vsock
//! RST is `ECONNRESET`) and exits 1.

use std::io;
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// The bytes moved per `read(2)`.
const CHUNK: usize = 64 * 1024;
/// How long `poll(2)` waits: for ever.
const POLL_FOREVER: libc::c_int = -1;

/// What the command line asked for: the stream and where else its bytes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VsockCat {
    /// Which stream.
    pub mode: Mode,
    /// An fd that gets a copy of what the stream brings (`--tee FD`).
    pub tee: Option<RawFd>,
}

/// Which stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Accept one connection on `port`.
    Listen {
        /// The port.
        port: u32,
    },
    /// Connect to `cid`:`port`.
    Connect {
        /// The peer's CID.
        cid: u32,
        /// The peer's port.
        port: u32,
    },
}

/// The usage line.
pub const USAGE: &str =
    "usage: minivmm-vp vsock-cat [--tee FD] listen PORT | vsock-cat [--tee FD] connect CID PORT";

impl VsockCat {
    /// Parse the arguments after `vsock-cat`.
    pub fn parse(args: &[String]) -> Result<VsockCat, String> {
        let number = |what: &str, s: &str| -> Result<u32, String> {
            s.parse::<u32>()
                .map_err(|_| format!("vsock-cat: bad {what} '{}'", s.escape_debug()))
        };
        let (tee, args) = match args {
            [flag, fd, rest @ ..] if flag == "--tee" => (Some(number("fd", fd)? as RawFd), rest),
            _ => (None, args),
        };
        let mode = match args {
            [mode, port] if mode == "listen" => Mode::Listen {
                port: number("port", port)?,
            },
            [mode, cid, port] if mode == "connect" => Mode::Connect {
                cid: number("CID", cid)?,
                port: number("port", port)?,
            },
            _ => return Err(format!("vsock-cat: bad arguments ({USAGE})")),
        };
        Ok(VsockCat { mode, tee })
    }

    /// Open the stream, then [`pump`] it between stdin and stdout.
    pub fn run(self) -> io::Result<Traffic> {
        let sock = match self.mode {
            Mode::Listen { port } => {
                let listener = vsock_socket()?;
                bind_listen(&listener, port)?;
                eprintln!("vsock-cat: listening on port {port}");
                accept(&listener)?
            }
            Mode::Connect { cid, port } => {
                let sock = vsock_socket()?;
                connect(&sock, cid, port).map_err(|e| {
                    io::Error::new(e.kind(), format!("connect to {cid}:{port}: {e}"))
                })?;
                sock
            }
        };
        pump(
            sock.as_raw_fd(),
            libc::STDIN_FILENO,
            libc::STDOUT_FILENO,
            self.tee,
        )
    }
}

/// Bytes moved each way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Read from the input, written to the socket.
    pub sent: u64,
    /// Read from the socket, written to the output.
    pub received: u64,
}

fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn vsock_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; no memory is passed.
    let fd =
        cvt(unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn address(cid: u32, port: u32) -> libc::sockaddr_vm {
    libc::sockaddr_vm {
        svm_family: libc::AF_VSOCK as libc::sa_family_t,
        svm_reserved1: 0,
        svm_port: port,
        svm_cid: cid,
        svm_zero: [0; 4],
    }
}

const ADDR_LEN: libc::socklen_t = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;

fn bind_listen(sock: &OwnedFd, port: u32) -> io::Result<()> {
    let addr = address(libc::VMADDR_CID_ANY, port);
    // SAFETY: `addr` is a valid sockaddr_vm of ADDR_LEN bytes that outlives the call.
    cvt(unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            ADDR_LEN,
        )
    })?;
    // SAFETY: listen(2) on a socket we own; no memory is passed.
    cvt(unsafe { libc::listen(sock.as_raw_fd(), 1) })?;
    Ok(())
}

fn accept(listener: &OwnedFd) -> io::Result<OwnedFd> {
    loop {
        // SAFETY: null address pointers are allowed (the peer's address is not wanted).
        let rc = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        match cvt(rc) {
            // SAFETY: `fd` was just returned by accept4(2) and is owned by nobody else.
            Ok(fd) => return Ok(unsafe { OwnedFd::from_raw_fd(fd) }),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

fn connect(sock: &OwnedFd, cid: u32, port: u32) -> io::Result<()> {
    let addr = address(cid, port);
    // SAFETY: `addr` is a valid sockaddr_vm of ADDR_LEN bytes that outlives the call.
    cvt(unsafe {
        libc::connect(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            ADDR_LEN,
        )
    })?;
    Ok(())
}

/// `write(2)` all of `buf`, straight from it (chardev's `write` retries EINTR; this, short
/// writes).
fn write_all_fd(fd: RawFd, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        let n = chardev::sys::write(fd, buf)?;
        buf = &buf[n..];
    }
    Ok(())
}

/// Move bytes both ways between the stream `sock` and `input`/`output` until the peer's side
/// ends: `input` → `sock` (then `shutdown(SHUT_WR)` at its end) and `sock` → `output` (and
/// `tee`, if given; it is closed when the stream ends). All fds blocking; every byte goes
/// through `read(2)` and `write(2)` on one buffer per way.
pub fn pump(sock: RawFd, input: RawFd, output: RawFd, tee: Option<RawFd>) -> io::Result<Traffic> {
    let mut up = vec![0u8; CHUNK];
    let mut down = vec![0u8; CHUNK];
    let mut traffic = Traffic::default();
    let mut input_open = true;
    loop {
        let mut fds = [
            libc::pollfd {
                fd: sock,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                // A negative fd is ignored by poll(2).
                fd: if input_open { input } else { -1 },
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is an array of two pollfd that outlives the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, POLL_FOREVER) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if fds[0].revents != 0 {
            let n = chardev::sys::read(sock, &mut down)?;
            if n == 0 {
                if let Some(fd) = tee {
                    // SAFETY: the caller gave this fd to the pump to write to and close; no
                    // one uses it after this.
                    unsafe { libc::close(fd) };
                }
                return Ok(traffic);
            }
            write_all_fd(output, &down[..n])?;
            if let Some(fd) = tee {
                write_all_fd(fd, &down[..n])?;
            }
            traffic.received += n as u64;
        }
        if input_open && fds[1].revents != 0 {
            let n = chardev::sys::read(input, &mut up)?;
            if n == 0 {
                input_open = false;
                // SAFETY: shutdown(2) on a socket the caller owns; no memory is passed.
                cvt(unsafe { libc::shutdown(sock, libc::SHUT_WR) })?;
            } else {
                write_all_fd(sock, &up[..n])?;
                traffic.sent += n as u64;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::io::IntoRawFd;
    use std::os::unix::net::UnixStream;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn arguments() {
        assert_eq!(
            VsockCat::parse(&args(&["listen", "5000"])),
            Ok(VsockCat {
                mode: Mode::Listen { port: 5000 },
                tee: None
            })
        );
        assert_eq!(
            VsockCat::parse(&args(&["--tee", "3", "connect", "2", "52"])),
            Ok(VsockCat {
                mode: Mode::Connect { cid: 2, port: 52 },
                tee: Some(3)
            })
        );
        for bad in [
            &["listen"][..],
            &["connect", "2"],
            &["listen", "x"],
            &["dial", "1", "2"],
            &["--tee", "x", "listen", "1"],
            &["--tee"],
        ] {
            let e = VsockCat::parse(&args(bad)).unwrap_err();
            assert!(e.starts_with("vsock-cat: bad"), "{bad:?}: {e}");
        }
    }

    fn read_all(mut s: UnixStream) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut got = Vec::new();
            s.read_to_end(&mut got).unwrap();
            got
        })
    }

    /// Both ways at once over a socket pair standing in for the vsock stream: the input's end
    /// shuts the sending side (the peer reads EOF), the peer's end ends the pump once what it
    /// sent was written out, to the output and to the tee fd (closed at the end).
    #[test]
    fn pumps_both_ways_and_half_closes() {
        let (sock, mut peer) = UnixStream::pair().unwrap();
        let (mut input_w, input_r) = UnixStream::pair().unwrap();
        let (output_w, output_r) = UnixStream::pair().unwrap();
        let (tee_w, tee_r) = UnixStream::pair().unwrap();
        let tee_fd = tee_w.into_raw_fd();
        let up: Vec<u8> = (0..300_000u32).map(|i| (i * 7) as u8).collect();
        let down: Vec<u8> = (0..200_000u32).map(|i| (i * 13) as u8).collect();
        let pump_thread = std::thread::spawn(move || {
            pump(
                sock.as_raw_fd(),
                input_r.as_raw_fd(),
                output_w.as_raw_fd(),
                Some(tee_fd),
            )
        });
        let up2 = up.clone();
        let feeder = std::thread::spawn(move || input_w.write_all(&up2).unwrap());
        let output = read_all(output_r);
        let tee = read_all(tee_r);
        let peer_reader = read_all(peer.try_clone().unwrap());
        peer.write_all(&down).unwrap();
        feeder.join().unwrap();
        // The pump read EOF on its input and shut down its side: the peer sees the end.
        assert_eq!(peer_reader.join().unwrap(), up);
        peer.shutdown(std::net::Shutdown::Write).unwrap();
        let traffic = pump_thread.join().unwrap().unwrap();
        assert_eq!(
            traffic,
            Traffic {
                sent: up.len() as u64,
                received: down.len() as u64
            }
        );
        assert_eq!(output.join().unwrap(), down);
        assert_eq!(tee.join().unwrap(), down);
    }
}
