//! The `udp` backend: guest output sent as datagrams to `host:port`, datagrams received on
//! `localaddr:localport` delivered as input at the frontend's pace.
//!
//! One datagram is held at a time and read from as the frontend pulls, so input is bounded by
//! the largest datagram; the socket is not read while that one is unconsumed or while the
//! frontend wants no input. Output goes through the bounded buffer, each flush sending at most
//! [`MAX_DATAGRAM`] bytes per datagram. UDP has no peer to lose, so the backend is always
//! connected; a refused datagram (ICMP port unreachable) is dropped and counted.
//!
//! This module must not block.

use std::io;
use std::net::UdpSocket;
use std::os::unix::io::AsRawFd;

use crate::backend::{Backend, Event, Interest, Readiness};
use crate::buffer::{EventQueue, OutBuf, DEFAULT_OUTBUF_SIZE};
use crate::error::{Error, Result};
use crate::poller::{FdSet, Registrar, Token};
use crate::socket::resolve;
use crate::spec::UdpSpec;
use crate::sys;

/// Largest datagram sent or received.
pub const MAX_DATAGRAM: usize = 65_507;

/// The `udp` backend.
#[derive(Debug)]
pub struct UdpBackend {
    /// Declared first: unregisters before `sock` closes.
    fds: FdSet,
    sock: UdpSocket,
    desc: String,
    inbuf: Vec<u8>,
    inpos: usize,
    out: OutBuf,
    blocked: bool,
    input_wanted: bool,
    events: EventQueue,
    dropped: u64,
}

impl UdpBackend {
    /// Bind the local address and connect to the remote one.
    pub fn open(id: &str, spec: &UdpSpec) -> Result<Self> {
        let local = format!("{}:{}", spec.localaddr, spec.localport);
        let remote = format!("{}:{}", spec.host, spec.port);
        let la = resolve(&spec.localaddr, spec.localport, true)
            .map_err(|e| Error::io(id, "resolve", local.clone(), e))?;
        let ra = resolve(&spec.host, spec.port, false)
            .map_err(|e| Error::io(id, "resolve", remote.clone(), e))?;
        let sock = UdpSocket::bind(la).map_err(|e| Error::io(id, "bind", local.clone(), e))?;
        sock.connect(ra)
            .map_err(|e| Error::io(id, "connect to", remote.clone(), e))?;
        sock.set_nonblocking(true)
            .map_err(|e| Error::io(id, "use", local, e))?;
        Ok(UdpBackend {
            fds: FdSet::new(),
            sock,
            desc: format!("udp:{ra}"),
            inbuf: Vec::new(),
            inpos: 0,
            out: OutBuf::new(DEFAULT_OUTBUF_SIZE),
            blocked: false,
            input_wanted: true,
            events: EventQueue::default(),
            dropped: 0,
        })
    }

    /// The bound local address.
    pub fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.sock.local_addr()
    }

    fn flush(&mut self) {
        let fd = self.sock.as_raw_fd();
        let mut refused = 0;
        let r = self.out.flush_with(|d| {
            let d = &d[..d.len().min(MAX_DATAGRAM)];
            match sys::send(fd, d) {
                // A refusal reported for an earlier datagram: drop this one too.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    refused += d.len();
                    Ok(d.len())
                }
                other => other,
            }
        });
        self.dropped += refused as u64;
        if let Err(e) = r {
            log::debug!("chardev {}: send failed: {e}", self.desc);
            self.dropped += self.out.take_all().len() as u64;
        }
        if self.blocked && self.out.len() <= self.out.capacity() / 2 {
            self.blocked = false;
            self.events.push(Event::Writable);
        }
    }

    fn pending_input(&self) -> bool {
        self.inpos < self.inbuf.len()
    }
}

impl UdpBackend {
    fn update_fds(&mut self) {
        let read = self.input_wanted && !self.pending_input();
        let write = !self.out.is_empty();
        self.fds
            .set(self.sock.as_raw_fd(), Interest { read, write });
    }

    fn read_datagram(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if !self.pending_input() {
            self.inbuf.resize(MAX_DATAGRAM, 0);
            self.inpos = 0;
            match self.sock.recv(&mut self.inbuf) {
                Ok(n) => self.inbuf.truncate(n),
                Err(e) => {
                    self.inbuf.clear();
                    if !sys::would_block(&e) && e.kind() != io::ErrorKind::ConnectionRefused {
                        return Err(e);
                    }
                    return Ok(0);
                }
            }
        }
        let n = buf.len().min(self.inbuf.len() - self.inpos);
        buf[..n].copy_from_slice(&self.inbuf[self.inpos..self.inpos + n]);
        self.inpos += n;
        Ok(n)
    }
}

impl Backend for UdpBackend {
    fn kind(&self) -> &'static str {
        "udp"
    }
    fn filename(&self) -> String {
        self.desc.clone()
    }
    fn attach(&mut self, reg: Registrar) {
        self.fds.attach(reg);
        self.update_fds();
    }
    fn detach(&mut self) {
        self.fds.detach();
    }
    fn on_ready(&mut self, token: Token, readiness: Readiness) {
        if self.fds.fd_of(token).is_none() {
            return;
        }
        if readiness.writable && !self.out.is_empty() {
            self.flush();
        }
        if readiness.readable && self.input_wanted {
            self.events.push(Event::Readable);
        }
        self.update_fds();
    }
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let r = self.read_datagram(buf);
        self.update_fds();
        r
    }
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = self.out.push(data);
        if n < data.len() {
            self.blocked = true;
        }
        self.flush();
        self.update_fds();
        Ok(n)
    }
    fn set_input_wanted(&mut self, wanted: bool) {
        self.input_wanted = wanted;
        if wanted && self.pending_input() {
            self.events.push(Event::Readable);
        }
        self.update_fds();
    }
    fn is_connected(&self) -> bool {
        true
    }
    fn take_events(&mut self) -> Vec<Event> {
        self.events.take()
    }
    fn dropped_bytes(&self) -> u64 {
        self.dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::read_n;

    #[test]
    fn udp_both_ways_at_the_frontends_pace() {
        let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
        peer.set_read_timeout(Some(crate::testutil::DEADLINE))
            .unwrap();
        let spec = UdpSpec {
            host: "127.0.0.1".into(),
            port: peer.local_addr().unwrap().port(),
            localaddr: "127.0.0.1".into(),
            localport: 0,
        };
        let mut b = UdpBackend::open("u", &spec).unwrap();
        assert_eq!(b.write(b"datagram").unwrap(), 8);
        let mut buf = [0u8; 64];
        let (n, from) = peer.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"datagram");
        assert_eq!(from, b.local_addr().unwrap());
        peer.send_to(b"hello guest", from).unwrap();
        // Pulled three bytes at a time from the one held datagram.
        let mut got = Vec::new();
        while got.len() < 11 {
            got.extend(read_n(&mut b, 3.min(11 - got.len())));
        }
        assert_eq!(got, b"hello guest");
    }
}
