//! One vsock stream connection between a guest socket and a host byte stream: its state
//! machine (virtio 1.2 §5.10.6.3..6) and its credit-based flow control.
//!
//! Flow control, both ways:
//! - host → guest: the host stream is read only into a receive buffer the guest posted
//!   ([`Connection::next_packet`], pulled by the device), never more than the guest's free
//!   credit (`peer_buf_alloc - (sent - peer_fwd_cnt)`). At zero credit the connection stops
//!   asking to read and sends one CREDIT_REQUEST.
//! - guest → host: what the host stream does not take at once waits in a buffer bounded by
//!   the [`CONN_BUF_ALLOC`] we advertise. A guest that sends more than the credit we gave it
//!   (counted against the last `fwd_cnt` we told it) is reset. When the guest's view of our
//!   free space falls under [`CREDIT_UPDATE_THRESHOLD`], a CREDIT_UPDATE goes out.
//!
//! Time is a number of nanoseconds handed in by the caller (the device's [`crate::Clock`]).
//! This module must not block (the stream is non-blocking), must not buffer without a bound,
//! must not know about other connections, fds registration or guest memory, and must not
//! panic on what a guest sends: a protocol violation is a [`Verdict::Kill`].

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;

use chardev::Interest;

use super::packet::{
    Header, Op, MAX_PAYLOAD, VSOCK_FLAG_SHUTDOWN_RCV, VSOCK_FLAG_SHUTDOWN_SEND, VSOCK_HOST_CID,
    VSOCK_TYPE_STREAM,
};

/// The receive buffer we advertise per connection (`buf_alloc`), and the bound of what we
/// hold for a slow host stream (as Firecracker's `CONN_TX_BUF_SIZE`).
pub const CONN_BUF_ALLOC: u32 = 64 * 1024;
/// Send a CREDIT_UPDATE when the guest believes we have less free space than this.
pub const CREDIT_UPDATE_THRESHOLD: u32 = 4 * 1024;
/// How long a host-initiated REQUEST waits for the guest's answer.
pub const CONN_REQUEST_TIMEOUT_NS: u64 = 2_000_000_000;
/// How long a connection shut down both ways may take to drain before it is reset.
pub const CONN_SHUTDOWN_TIMEOUT_NS: u64 = 2_000_000_000;

/// Interest in nothing: the fd is not polled.
pub const NO_INTEREST: Interest = Interest {
    read: false,
    write: false,
};

/// The host side of a connection: a non-blocking byte stream.
pub trait HostStream: Read + Write + AsRawFd {
    /// Tell the host peer no more bytes will come (half close).
    fn shutdown_write(&mut self) -> io::Result<()>;
}

impl HostStream for UnixStream {
    fn shutdown_write(&mut self) -> io::Result<()> {
        self.shutdown(Shutdown::Write)
    }
}

/// Where a connection is in its life (a reset connection no longer exists).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// Host-initiated: REQUEST sent or queued, waiting for the guest's RESPONSE.
    Connecting,
    /// Data flows both ways.
    Established,
    /// The host stream reached end of file: the guest was told SHUTDOWN(SEND).
    LocalClosed,
    /// The guest shut down one direction.
    PeerClosed,
    /// Both directions are shut: draining what is buffered before the RST, with a deadline.
    Closing,
}

impl ConnState {
    /// A short lowercase name, for `query-vsock`.
    pub fn name(self) -> &'static str {
        match self {
            ConnState::Connecting => "connecting",
            ConnState::Established => "established",
            ConnState::LocalClosed => "local-closed",
            ConnState::PeerClosed => "peer-closed",
            ConnState::Closing => "closing",
        }
    }
}

/// Why a connection must be reset by the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KillReason {
    /// The guest sent more than its credit.
    Overrun,
    /// The guest sent an operation that makes no sense in this state.
    Protocol,
    /// The host stream failed.
    HostError,
    /// A REQUEST was not answered, or a shut-down connection did not drain, in time.
    Timeout,
}

/// What the owner must do with the connection after an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Keep it.
    Keep,
    /// Send the guest an RST and drop it.
    Kill(KillReason),
    /// The guest reset it: drop it, no answer.
    Reset,
    /// Both sides are finished: send the guest an RST and drop it.
    Done,
}

/// What the connection has for a guest receive buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxOutcome {
    /// A packet: its header, and `len` payload bytes written at the start of the buffer.
    Packet(Header),
    /// Nothing now.
    Nothing,
    /// As [`Verdict`], when the read found the connection over.
    Over(Verdict),
}

/// Control packets owed to the guest.
#[derive(Debug, Default, Clone, Copy)]
struct PendingRx {
    request: bool,
    response: bool,
    shutdown: bool,
    credit_request: bool,
    credit_update: bool,
}

impl PendingRx {
    fn any(&self) -> bool {
        self.request || self.response || self.shutdown || self.credit_request || self.credit_update
    }
}

/// One connection. See the module documentation.
pub struct Connection<S> {
    stream: S,
    guest_cid: u64,
    local_port: u32,
    peer_port: u32,
    connecting: bool,
    /// The host stream reached end of file.
    local_eof: bool,
    /// We shut the host stream's write side (the guest will send nothing more).
    host_write_shut: bool,
    peer_shut_rcv: bool,
    peer_shut_send: bool,
    /// The host stream was reported readable and not yet read dry.
    rx_data_pending: bool,
    pending: PendingRx,
    /// Bytes for the host stream before any guest data (`OK <port>\n`).
    prefix: Vec<u8>,
    /// Guest bytes the host stream did not take yet.
    tx_buf: VecDeque<u8>,
    /// Guest bytes written to the host stream, modulo 2^32.
    fwd_cnt: u32,
    /// The `fwd_cnt` in the last header we sent.
    last_fwd_cnt_sent: u32,
    /// Bytes sent to the guest, modulo 2^32.
    sent_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// A CREDIT_REQUEST went out and the guest's credit has not grown since.
    credit_requested: bool,
    deadline: Option<u64>,
    bytes_to_host: u64,
    bytes_to_guest: u64,
}

/// An RST from the host port `local_port` to the guest port `peer_port`.
pub fn rst_header(guest_cid: u64, local_port: u32, peer_port: u32) -> Header {
    Header {
        src_cid: VSOCK_HOST_CID,
        dst_cid: guest_cid,
        src_port: local_port,
        dst_port: peer_port,
        len: 0,
        type_: VSOCK_TYPE_STREAM,
        op: Op::Rst.wire(),
        flags: 0,
        buf_alloc: 0,
        fwd_cnt: 0,
    }
}

fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

impl<S: HostStream> Connection<S> {
    fn with(stream: S, guest_cid: u64, local_port: u32, peer_port: u32) -> Self {
        Connection {
            stream,
            guest_cid,
            local_port,
            peer_port,
            connecting: false,
            local_eof: false,
            host_write_shut: false,
            peer_shut_rcv: false,
            peer_shut_send: false,
            rx_data_pending: false,
            pending: PendingRx::default(),
            prefix: Vec::new(),
            tx_buf: VecDeque::new(),
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            sent_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            credit_requested: false,
            deadline: None,
            bytes_to_host: 0,
            bytes_to_guest: 0,
        }
    }

    /// A host client asked for guest port `peer_port`; the host end is `local_port`. The
    /// REQUEST is queued and the guest has [`CONN_REQUEST_TIMEOUT_NS`] from `now` to answer.
    pub fn host_initiated(
        stream: S,
        guest_cid: u64,
        local_port: u32,
        peer_port: u32,
        now: u64,
    ) -> Self {
        let mut c = Connection::with(stream, guest_cid, local_port, peer_port);
        c.connecting = true;
        c.pending.request = true;
        c.deadline = Some(now.saturating_add(CONN_REQUEST_TIMEOUT_NS));
        c
    }

    /// The guest's REQUEST `hdr` reached a host listener through `stream`: the RESPONSE is
    /// queued and the connection is established.
    pub fn guest_initiated(stream: S, guest_cid: u64, hdr: &Header) -> Self {
        let mut c = Connection::with(stream, guest_cid, hdr.dst_port, hdr.src_port);
        c.peer_buf_alloc = hdr.buf_alloc;
        c.peer_fwd_cnt = hdr.fwd_cnt;
        c.pending.response = true;
        c
    }

    /// The host end's port.
    pub fn local_port(&self) -> u32 {
        self.local_port
    }

    /// The guest end's port.
    pub fn peer_port(&self) -> u32 {
        self.peer_port
    }

    /// The host stream.
    pub fn stream(&self) -> &S {
        &self.stream
    }

    /// Give up the connection, keeping its host stream (to close it where the owner wants).
    pub fn into_stream(self) -> S {
        self.stream
    }

    /// Guest bytes written to the host stream.
    pub fn bytes_to_host(&self) -> u64 {
        self.bytes_to_host
    }

    /// Host bytes sent to the guest.
    pub fn bytes_to_guest(&self) -> u64 {
        self.bytes_to_guest
    }

    /// When the connection times out, in clock nanoseconds.
    pub fn deadline(&self) -> Option<u64> {
        self.deadline
    }

    /// Where the connection is.
    pub fn state(&self) -> ConnState {
        if self.connecting {
            ConnState::Connecting
        } else if self.peer_shut_send && (self.local_eof || self.peer_shut_rcv) {
            ConnState::Closing
        } else if self.local_eof {
            ConnState::LocalClosed
        } else if self.peer_shut_send || self.peer_shut_rcv {
            ConnState::PeerClosed
        } else {
            ConnState::Established
        }
    }

    /// The bytes the guest can take from us now.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = self.sent_cnt.wrapping_sub(self.peer_fwd_cnt);
        // A guest claiming to have forwarded more than it got sees in_flight wrap: no credit.
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn can_send_data(&self) -> bool {
        !self.connecting && !self.local_eof && !self.peer_shut_rcv && self.peer_credit() > 0
    }

    /// The single rule for what the host stream must be polled for now: readable while data
    /// may go to the guest (established, the guest has credit for us, not already known to be
    /// readable), writable while bytes wait for it. Empty means "do not poll".
    pub fn interest(&self) -> Interest {
        Interest {
            read: self.can_send_data() && !self.rx_data_pending,
            write: !self.connecting && (!self.prefix.is_empty() || !self.tx_buf.is_empty()),
        }
    }

    /// Whether [`Connection::next_packet`] has something for the guest.
    pub fn has_rx(&self) -> bool {
        self.pending.any() || (self.rx_data_pending && self.can_send_data())
    }

    /// The host stream is readable (or hung up): the next guest buffer will read it.
    pub fn on_readable(&mut self) {
        if !self.connecting {
            self.rx_data_pending = true;
        }
    }

    /// Write what waits for the host stream, as far as it takes it.
    pub fn flush(&mut self, now: u64) -> Verdict {
        if self.connecting {
            return Verdict::Keep;
        }
        while !self.prefix.is_empty() {
            match self.stream.write(&self.prefix) {
                Ok(0) => return Verdict::Kill(KillReason::HostError),
                Ok(n) => {
                    self.prefix.drain(..n.min(self.prefix.len()));
                }
                Err(e) if is_transient(&e) => return self.settle(now),
                Err(_) => return Verdict::Kill(KillReason::HostError),
            }
        }
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            match self.stream.write(front) {
                Ok(0) => return Verdict::Kill(KillReason::HostError),
                Ok(n) => {
                    let n = n.min(front.len());
                    self.tx_buf.drain(..n);
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                    self.bytes_to_host += n as u64;
                }
                Err(e) if is_transient(&e) => break,
                Err(_) => return Verdict::Kill(KillReason::HostError),
            }
        }
        if self.tx_buf.is_empty() && self.peer_shut_send && !self.host_write_shut {
            self.host_write_shut = true;
            if let Err(e) = self.stream.shutdown_write() {
                log::debug!("vsock: half close of port {}: {e}", self.local_port);
            }
        }
        self.check_credit_update();
        self.settle(now)
    }

    /// Bytes the guest believes it has in flight towards us.
    fn guest_unacked(&self) -> u32 {
        (self.tx_buf.len() as u32).wrapping_add(self.fwd_cnt.wrapping_sub(self.last_fwd_cnt_sent))
    }

    fn check_credit_update(&mut self) {
        let stale = self.fwd_cnt != self.last_fwd_cnt_sent;
        if stale && CONN_BUF_ALLOC.saturating_sub(self.guest_unacked()) < CREDIT_UPDATE_THRESHOLD {
            self.pending.credit_update = true;
        }
    }

    fn both_ways_shut(&self) -> bool {
        self.peer_shut_send && (self.local_eof || self.peer_shut_rcv)
    }

    /// After any change: finished, or arm the shutdown deadline.
    fn settle(&mut self, now: u64) -> Verdict {
        if self.connecting || !self.both_ways_shut() {
            return Verdict::Keep;
        }
        if self.tx_buf.is_empty() && self.prefix.is_empty() {
            return Verdict::Done;
        }
        if self.deadline.is_none() {
            self.deadline = Some(now.saturating_add(CONN_SHUTDOWN_TIMEOUT_NS));
        }
        Verdict::Keep
    }

    /// A packet from the guest for this connection (already checked by
    /// [`super::packet::parse_guest_packet`]).
    pub fn on_guest_packet(&mut self, hdr: &Header, op: Op, payload: &[u8], now: u64) -> Verdict {
        let credit_before = self.peer_credit();
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = hdr.fwd_cnt;
        if self.peer_credit() > credit_before {
            self.credit_requested = false;
        }
        if self.connecting {
            return match op {
                Op::Response => {
                    self.connecting = false;
                    self.deadline = None;
                    self.prefix = format!("OK {}\n", self.local_port).into_bytes();
                    self.flush(now)
                }
                Op::Rst => Verdict::Reset,
                _ => Verdict::Kill(KillReason::Protocol),
            };
        }
        match op {
            Op::Rw => {
                if self.peer_shut_send {
                    return Verdict::Kill(KillReason::Protocol);
                }
                let unacked = u64::from(self.guest_unacked()) + payload.len() as u64;
                if unacked > u64::from(CONN_BUF_ALLOC) {
                    return Verdict::Kill(KillReason::Overrun);
                }
                self.tx_buf.extend(payload);
                self.flush(now)
            }
            Op::CreditUpdate => self.settle(now),
            Op::CreditRequest => {
                self.pending.credit_update = true;
                self.settle(now)
            }
            Op::Shutdown => {
                if hdr.flags & VSOCK_FLAG_SHUTDOWN_RCV != 0 {
                    self.peer_shut_rcv = true;
                    self.rx_data_pending = false;
                }
                if hdr.flags & VSOCK_FLAG_SHUTDOWN_SEND != 0 {
                    self.peer_shut_send = true;
                }
                self.flush(now)
            }
            Op::Rst => Verdict::Reset,
            Op::Request | Op::Response => Verdict::Kill(KillReason::Protocol),
        }
    }

    /// The time has come: a REQUEST left unanswered or a shutdown that did not drain.
    pub fn on_deadline(&mut self, now: u64) -> Verdict {
        match self.deadline {
            Some(d) if d <= now => Verdict::Kill(KillReason::Timeout),
            _ => Verdict::Keep,
        }
    }

    fn header(&mut self, op: Op, flags: u32, len: usize) -> Header {
        self.last_fwd_cnt_sent = self.fwd_cnt;
        self.pending.credit_update = false;
        Header {
            src_cid: VSOCK_HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len: len as u32,
            type_: VSOCK_TYPE_STREAM,
            op: op.wire(),
            flags,
            buf_alloc: CONN_BUF_ALLOC,
            fwd_cnt: self.fwd_cnt,
        }
    }

    /// The next packet for the guest, its payload (if any) read from the host stream straight
    /// into `payload` (the room the guest's buffer has after the header).
    pub fn next_packet(&mut self, payload: &mut [u8], now: u64) -> RxOutcome {
        if self.pending.request {
            self.pending.request = false;
            return RxOutcome::Packet(self.header(Op::Request, 0, 0));
        }
        if self.pending.response {
            self.pending.response = false;
            return RxOutcome::Packet(self.header(Op::Response, 0, 0));
        }
        if self.rx_data_pending && self.can_send_data() {
            let max = payload
                .len()
                .min(self.peer_credit() as usize)
                .min(MAX_PAYLOAD as usize);
            if max > 0 {
                match self.stream.read(&mut payload[..max]) {
                    Ok(0) => {
                        self.local_eof = true;
                        self.rx_data_pending = false;
                        self.pending.shutdown = true;
                        let verdict = self.settle(now);
                        if verdict != Verdict::Keep {
                            return RxOutcome::Over(verdict);
                        }
                    }
                    Ok(n) => {
                        let n = n.min(max);
                        self.sent_cnt = self.sent_cnt.wrapping_add(n as u32);
                        self.bytes_to_guest += n as u64;
                        if self.peer_credit() == 0 && !self.credit_requested {
                            self.credit_requested = true;
                            self.pending.credit_request = true;
                        }
                        return RxOutcome::Packet(self.header(Op::Rw, 0, n));
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.rx_data_pending = false;
                    }
                    Err(_) => return RxOutcome::Over(Verdict::Kill(KillReason::HostError)),
                }
            }
        }
        if self.pending.shutdown {
            self.pending.shutdown = false;
            return RxOutcome::Packet(self.header(Op::Shutdown, VSOCK_FLAG_SHUTDOWN_SEND, 0));
        }
        if self.pending.credit_request {
            self.pending.credit_request = false;
            return RxOutcome::Packet(self.header(Op::CreditRequest, 0, 0));
        }
        if self.pending.credit_update {
            return RxOutcome::Packet(self.header(Op::CreditUpdate, 0, 0));
        }
        RxOutcome::Nothing
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::vsock::packet::{VSOCK_OP_CREDIT_UPDATE, VSOCK_OP_RW};

    const GUEST: u64 = 3;
    const LOCAL: u32 = 1 << 30;
    const PEER: u32 = 52;

    fn pair() -> (UnixStream, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        (a, b)
    }

    fn guest(op: Op, flags: u32, len: usize, buf_alloc: u32, fwd_cnt: u32) -> Header {
        Header {
            src_cid: GUEST,
            dst_cid: VSOCK_HOST_CID,
            src_port: PEER,
            dst_port: LOCAL,
            len: len as u32,
            type_: VSOCK_TYPE_STREAM,
            op: op.wire(),
            flags,
            buf_alloc,
            fwd_cnt,
        }
    }

    /// An established guest-initiated connection whose guest has `credit` bytes of buffer.
    fn established(credit: u32) -> (Connection<UnixStream>, UnixStream) {
        let (ours, theirs) = pair();
        let mut c = Connection::guest_initiated(ours, GUEST, &guest(Op::Request, 0, 0, credit, 0));
        let mut buf = [0u8; 64];
        match c.next_packet(&mut buf, 0) {
            RxOutcome::Packet(h) => assert_eq!(h.op, Op::Response.wire()),
            other => panic!("{other:?}"),
        }
        (c, theirs)
    }

    fn packet(c: &mut Connection<UnixStream>, buf: &mut [u8]) -> Header {
        match c.next_packet(buf, 0) {
            RxOutcome::Packet(h) => h,
            other => panic!("expected a packet, got {other:?}"),
        }
    }

    fn read_all(s: &mut UnixStream) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf) {
                Ok(0) => return out,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return out,
                Err(e) => panic!("{e}"),
            }
        }
    }

    #[test]
    fn host_initiated_handshake_writes_ok() {
        let (ours, mut theirs) = pair();
        let mut c = Connection::host_initiated(ours, GUEST, LOCAL, PEER, 100);
        assert_eq!(c.state(), ConnState::Connecting);
        assert_eq!(c.deadline(), Some(100 + CONN_REQUEST_TIMEOUT_NS));
        assert_eq!(c.interest(), NO_INTEREST);
        let mut buf = [0u8; 16];
        let h = packet(&mut c, &mut buf);
        assert_eq!(
            (h.op, h.src_port, h.dst_port),
            (Op::Request.wire(), LOCAL, PEER)
        );
        assert_eq!((h.src_cid, h.dst_cid), (VSOCK_HOST_CID, GUEST));
        assert_eq!(c.next_packet(&mut buf, 0), RxOutcome::Nothing);
        let v = c.on_guest_packet(&guest(Op::Response, 0, 0, 4096, 0), Op::Response, &[], 200);
        assert_eq!(v, Verdict::Keep);
        assert_eq!(c.state(), ConnState::Established);
        assert_eq!(c.deadline(), None);
        assert_eq!(read_all(&mut theirs), format!("OK {LOCAL}\n").into_bytes());
        assert!(c.interest().read);
    }

    #[test]
    fn unanswered_request_times_out_and_rst_is_a_reset() {
        let (ours, _theirs) = pair();
        let mut c = Connection::host_initiated(ours, GUEST, LOCAL, PEER, 0);
        assert_eq!(c.on_deadline(CONN_REQUEST_TIMEOUT_NS - 1), Verdict::Keep);
        assert_eq!(
            c.on_deadline(CONN_REQUEST_TIMEOUT_NS),
            Verdict::Kill(KillReason::Timeout)
        );
        let rst = guest(Op::Rst, 0, 0, 0, 0);
        assert_eq!(c.on_guest_packet(&rst, Op::Rst, &[], 0), Verdict::Reset);
        let rw = guest(Op::Rw, 0, 1, 0, 0);
        assert_eq!(
            c.on_guest_packet(&rw, Op::Rw, b"x", 0),
            Verdict::Kill(KillReason::Protocol)
        );
    }

    #[test]
    fn host_data_respects_guest_credit() {
        let (mut c, mut theirs) = established(10);
        theirs.write_all(b"0123456789abcdef").unwrap();
        assert!(c.interest().read);
        c.on_readable();
        assert!(!c.interest().read, "no read interest while data is pending");
        assert!(c.has_rx());
        let mut buf = [0u8; 64];
        let h = packet(&mut c, &mut buf);
        assert_eq!((h.op, h.len), (VSOCK_OP_RW, 10));
        assert_eq!(&buf[..10], b"0123456789");
        assert_eq!(c.peer_credit(), 0);
        // Out of credit: one CREDIT_REQUEST, then nothing, and no polling for input.
        let h = packet(&mut c, &mut buf);
        assert_eq!(h.op, Op::CreditRequest.wire());
        assert_eq!(c.next_packet(&mut buf, 0), RxOutcome::Nothing);
        assert!(!c.has_rx());
        assert!(!c.interest().read);
        // The guest forwarded 4 bytes.
        let upd = guest(Op::CreditUpdate, 0, 0, 10, 4);
        assert_eq!(
            c.on_guest_packet(&upd, Op::CreditUpdate, &[], 0),
            Verdict::Keep
        );
        assert_eq!(c.peer_credit(), 4);
        assert!(c.has_rx());
        let h = packet(&mut c, &mut buf);
        assert_eq!((h.op, h.len), (VSOCK_OP_RW, 4));
        assert_eq!(&buf[..4], b"abcd");
        assert_eq!(c.bytes_to_guest(), 14);
    }

    #[test]
    fn a_small_guest_buffer_bounds_the_read() {
        let (mut c, mut theirs) = established(1000);
        theirs.write_all(b"hello world").unwrap();
        c.on_readable();
        let mut buf = [0u8; 5];
        let h = packet(&mut c, &mut buf);
        assert_eq!(h.len, 5);
        assert_eq!(&buf, b"hello");
        let h = packet(&mut c, &mut buf);
        assert_eq!(&buf[..h.len as usize], b" worl");
    }

    #[test]
    fn guest_data_reaches_the_host_and_credit_is_returned() {
        let (mut c, mut theirs) = established(1000);
        let chunk = vec![7u8; 31 * 1024];
        let rw = guest(Op::Rw, 0, chunk.len(), 1000, 0);
        assert_eq!(c.on_guest_packet(&rw, Op::Rw, &chunk, 0), Verdict::Keep);
        assert!(!c.has_rx(), "plenty of room left in the guest's view");
        assert_eq!(c.on_guest_packet(&rw, Op::Rw, &chunk, 0), Verdict::Keep);
        // 62 KiB unacknowledged: the guest thinks 2 KiB are left, less than the threshold.
        assert!(c.has_rx());
        let mut buf = [0u8; 64];
        let h = packet(&mut c, &mut buf);
        assert_eq!(h.op, VSOCK_OP_CREDIT_UPDATE);
        assert_eq!(h.fwd_cnt, 62 * 1024);
        assert_eq!(h.buf_alloc, CONN_BUF_ALLOC);
        assert_eq!(read_all(&mut theirs).len(), 62 * 1024);
        assert_eq!(c.bytes_to_host(), 62 * 1024);
    }

    #[test]
    fn guest_overrunning_its_credit_is_killed() {
        let (mut c, _theirs) = established(1000);
        let chunk = vec![1u8; 40 * 1024];
        let rw = guest(Op::Rw, 0, chunk.len(), 1000, 0);
        assert_eq!(c.on_guest_packet(&rw, Op::Rw, &chunk, 0), Verdict::Keep);
        // The host took every byte, but the guest was never told: 80 KiB is over its credit.
        assert_eq!(
            c.on_guest_packet(&rw, Op::Rw, &chunk, 0),
            Verdict::Kill(KillReason::Overrun)
        );
    }

    #[test]
    fn slow_host_keeps_bytes_in_the_bounded_buffer() {
        let (mut c, mut theirs) = established(1000);
        // Fill the socket so the host takes nothing more.
        let fill = vec![9u8; 4096];
        let mut sent = 0usize;
        loop {
            match c.stream.write(&fill) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        let data = vec![5u8; 1000];
        let rw = guest(Op::Rw, 0, data.len(), 1000, 0);
        assert_eq!(c.on_guest_packet(&rw, Op::Rw, &data, 0), Verdict::Keep);
        assert!(c.interest().write);
        assert_eq!(c.bytes_to_host(), 0);
        let got = read_all(&mut theirs);
        assert_eq!(got.len(), sent);
        assert_eq!(c.flush(0), Verdict::Keep);
        assert!(!c.interest().write);
        assert_eq!(read_all(&mut theirs), data);
    }

    #[test]
    fn shutdown_both_ways() {
        // Host EOF first: SHUTDOWN(SEND) to the guest; the guest then shuts down: done.
        let (mut c, theirs) = established(1000);
        theirs.shutdown(Shutdown::Write).unwrap();
        c.on_readable();
        let mut buf = [0u8; 64];
        let h = packet(&mut c, &mut buf);
        assert_eq!(
            (h.op, h.flags),
            (Op::Shutdown.wire(), VSOCK_FLAG_SHUTDOWN_SEND)
        );
        assert_eq!(c.state(), ConnState::LocalClosed);
        assert!(!c.interest().read);
        let data = b"reply";
        let rw = guest(Op::Rw, 0, data.len(), 1000, 0);
        assert_eq!(c.on_guest_packet(&rw, Op::Rw, data, 0), Verdict::Keep);
        let sd = guest(Op::Shutdown, VSOCK_FLAG_SHUTDOWN_SEND, 0, 1000, 0);
        assert_eq!(c.on_guest_packet(&sd, Op::Shutdown, &[], 0), Verdict::Done);
        let mut theirs = theirs;
        assert_eq!(read_all(&mut theirs), b"reply");

        // Guest first: SHUTDOWN(SEND) half-closes the host stream, data still flows to the
        // guest; then SHUTDOWN(RCV) finishes it.
        let (mut c, mut theirs) = established(1000);
        let sd = guest(Op::Shutdown, VSOCK_FLAG_SHUTDOWN_SEND, 0, 1000, 0);
        assert_eq!(c.on_guest_packet(&sd, Op::Shutdown, &[], 0), Verdict::Keep);
        assert_eq!(c.state(), ConnState::PeerClosed);
        assert_eq!(
            read_all(&mut theirs),
            b"",
            "the host client sees end of file"
        );
        theirs.write_all(b"late").unwrap();
        c.on_readable();
        let h = packet(&mut c, &mut buf);
        assert_eq!((h.op, &buf[..4]), (VSOCK_OP_RW, &b"late"[..]));
        let rw = guest(Op::Rw, 0, 1, 1000, 0);
        assert_eq!(
            c.on_guest_packet(&rw, Op::Rw, b"x", 0),
            Verdict::Kill(KillReason::Protocol),
            "data after SHUTDOWN(SEND)"
        );
        let sd = guest(Op::Shutdown, VSOCK_FLAG_SHUTDOWN_RCV, 0, 1000, 0);
        assert_eq!(c.on_guest_packet(&sd, Op::Shutdown, &[], 0), Verdict::Done);
    }

    #[test]
    fn shutdown_with_undrained_bytes_times_out() {
        let (mut c, _theirs) = established(1000);
        let fill = vec![0u8; 4096];
        while c.stream.write(&fill).is_ok() {}
        let rw = guest(Op::Rw, 0, 10, 1000, 0);
        assert_eq!(c.on_guest_packet(&rw, Op::Rw, &[1; 10], 0), Verdict::Keep);
        let both = VSOCK_FLAG_SHUTDOWN_SEND | VSOCK_FLAG_SHUTDOWN_RCV;
        let sd = guest(Op::Shutdown, both, 0, 1000, 0);
        assert_eq!(c.on_guest_packet(&sd, Op::Shutdown, &[], 50), Verdict::Keep);
        assert_eq!(c.state(), ConnState::Closing);
        assert_eq!(c.deadline(), Some(50 + CONN_SHUTDOWN_TIMEOUT_NS));
        assert_eq!(
            c.on_deadline(50 + CONN_SHUTDOWN_TIMEOUT_NS),
            Verdict::Kill(KillReason::Timeout)
        );
    }

    #[test]
    fn host_error_kills() {
        let (mut c, theirs) = established(1000);
        drop(theirs);
        let rw = guest(Op::Rw, 0, 3, 1000, 0);
        assert_eq!(
            c.on_guest_packet(&rw, Op::Rw, b"abc", 0),
            Verdict::Kill(KillReason::HostError)
        );
    }

    #[test]
    fn lying_fwd_cnt_gives_no_credit() {
        let (mut c, _theirs) = established(1000);
        let upd = guest(Op::CreditUpdate, 0, 0, 1000, 5);
        c.on_guest_packet(&upd, Op::CreditUpdate, &[], 0);
        assert_eq!(c.peer_credit(), 0);
        assert!(!c.interest().read);
    }

    #[test]
    fn request_on_an_open_connection_is_a_protocol_error() {
        let (mut c, _theirs) = established(1000);
        let req = guest(Op::Request, 0, 0, 1000, 0);
        assert_eq!(
            c.on_guest_packet(&req, Op::Request, &[], 0),
            Verdict::Kill(KillReason::Protocol)
        );
        let rst = guest(Op::Rst, 0, 0, 1000, 0);
        assert_eq!(c.on_guest_packet(&rst, Op::Rst, &[], 0), Verdict::Reset);
    }
}
