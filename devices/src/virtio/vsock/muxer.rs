//! The host side of the vsock device, in Firecracker's "hybrid vsock" model over unix
//! sockets: one listener at `PATH` for host-initiated connections (`CONNECT <port>\n`, answered
//! `OK <host port>\n` once the guest accepted), and `PATH_<port>` sockets the guest's
//! connections to the host (CID 2) reach.
//!
//! The muxer owns every host fd (the listener, clients still typing their CONNECT line, one
//! stream per connection) and gives each a `u32` token; readiness comes back by token
//! ([`VsockMuxer::on_ready`]). What each fd must be polled for is decided in one place,
//! [`Connection::interest`] (plus "readable" for the listener and waiting clients), and every
//! change to it is reported incrementally:
//! - with [`Registration::Explicit`] (what the device uses: `VirtioVsock` applies the changes
//!   to the event loop's poller), [`VsockMuxer::take_fd_changes`] returns the [`FdChange`]s
//!   since the last call (register, modify, deregister, close). A closed fd travels inside its
//!   [`FdChange::Close`] so it stays open until the registrar removed it from its epoll set
//!   (deregister before close, so a reused fd number cannot be confused);
//! - with [`Registration::PollFds`] (the muxer's own unit tests, which poll directly),
//!   nothing is queued: [`VsockMuxer::poll_fds`] lists the fds currently wanted and a closed
//!   fd is closed at once.
//!
//! Time-outs (a REQUEST the guest never answers, a shutdown that does not drain, a client
//! that never finishes its CONNECT line, a paused listener) sit in one ordered set:
//! [`VsockMuxer::next_deadline`] says when to call [`VsockMuxer::process_timeouts`].
//!
//! Limits: at most [`MAX_CONNECTIONS`] connections and [`MAX_PENDING_CLIENTS`] clients
//! waiting for their CONNECT line; a CONNECT line of at most [`CONNECT_LINE_MAX`] bytes; at
//! most [`RST_QUEUE_LEN`] RSTs waiting for a guest buffer (the device stops reading the guest's
//! transmit queue while that queue is full). Running out of fds refuses one connection.
//!
//! This module must not block (every fd is non-blocking, the guest-side connect included),
//! must not touch guest memory or virtqueues, must not dispatch on fd numbers except through
//! [`VsockMuxer::token_of`] in the `PollFds` mode, and must not panic on what the guest or a
//! host client sends.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chardev::{Interest, Readiness};
use thiserror::Error;

use super::conn::{rst_header, ConnState, Connection, KillReason, RxOutcome, Verdict, NO_INTEREST};
use super::packet::{GuestPacket, Header, Op};
use crate::Clock;

/// The token of the listening socket.
pub const LISTENER_TOKEN: u32 = 0;
/// Concurrent connections, either way (as Firecracker).
pub const MAX_CONNECTIONS: usize = 1023;
/// Accepted host clients that have not finished their CONNECT line yet.
pub const MAX_PENDING_CLIENTS: usize = 64;
/// The longest CONNECT line, its `\n` included.
pub const CONNECT_LINE_MAX: usize = 32;
/// How long a host client may take to send its CONNECT line.
pub const CONNECT_LINE_TIMEOUT_NS: u64 = 2_000_000_000;
/// The first host port handed to host-initiated connections (2^30).
pub const HOST_PORT_FIRST: u32 = 1 << 30;
/// One past the last host port handed out (2^31).
pub const HOST_PORT_END: u32 = 1 << 31;
/// RSTs for the guest waiting for a receive buffer.
pub const RST_QUEUE_LEN: usize = 256;
/// Connections accepted per readiness event of the listener.
const ACCEPTS_PER_EVENT: usize = 32;
/// How long the listener rests when no fd can be found to refuse a connection with.
pub const LISTENER_BACKOFF_NS: u64 = 100_000_000;
/// The lowest CID a guest may have (0..2 are the hypervisor, local and host).
pub const MIN_GUEST_CID: u64 = 3;
/// CIDs are 32 bits on Linux, and `u32::MAX` is `VMADDR_CID_ANY`.
pub const MAX_GUEST_CID: u64 = u32::MAX as u64 - 1;

/// Why the host side could not be set up.
#[derive(Debug, Error)]
pub enum VsockError {
    /// The guest CID is reserved or too large.
    #[error("guest cid {0} is not in 3..=4294967294")]
    Cid(u64),
    /// The listening socket could not be created.
    #[error("cannot listen on {path}")]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// How the owner of the event loop learns which fds to watch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registration {
    /// The owner asks [`VsockMuxer::poll_fds`] after every call; no change list is kept.
    PollFds,
    /// The owner applies [`VsockMuxer::take_fd_changes`] after every call.
    Explicit,
}

/// A change to what the event loop must watch.
#[derive(Debug)]
pub enum FdChange {
    /// Start watching `fd` for `interest`, reporting it as `token`.
    Register {
        /// The token readiness is reported with.
        token: u32,
        /// The fd.
        fd: RawFd,
        /// What to watch for.
        interest: Interest,
    },
    /// Watch the registered `fd` for `interest` instead.
    Modify {
        /// The token.
        token: u32,
        /// The fd.
        fd: RawFd,
        /// What to watch for now.
        interest: Interest,
    },
    /// Stop watching `fd` (it stays open and may be registered again).
    Deregister {
        /// The token.
        token: u32,
        /// The fd.
        fd: RawFd,
    },
    /// Stop watching `fd` if it was (`registered`), then drop it: that closes it.
    Close {
        /// The token (free for reuse after this change).
        token: u32,
        /// The fd, open until dropped.
        fd: OwnedFd,
        /// Whether it was registered when it was closed.
        registered: bool,
    },
}

/// A connection as `query-vsock` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionInfo {
    /// The host end's port.
    pub local_port: u32,
    /// The guest end's port.
    pub peer_port: u32,
    /// Whether a host client opened it (through `CONNECT`).
    pub host_initiated: bool,
    /// Where it is.
    pub state: ConnState,
    /// Guest bytes written to the host socket.
    pub bytes_to_host: u64,
    /// Host bytes delivered to the guest.
    pub bytes_to_guest: u64,
}

/// What the muxer counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MuxerCounters {
    /// Guest packets for no connection (answered with an RST).
    pub stray_packets: u64,
    /// RSTs that found the RST queue full.
    pub dropped_rsts: u64,
    /// Connections refused: limits, no host listener, fds exhausted.
    pub refused_connections: u64,
    /// Connections reset because the guest overran its credit.
    pub overrun_resets: u64,
    /// Connections reset for a guest protocol violation.
    pub protocol_resets: u64,
    /// Connections reset because their host socket failed.
    pub host_error_resets: u64,
    /// Connections reset by a time-out (REQUEST unanswered, shutdown undrained).
    pub timeouts: u64,
    /// Host clients closed for a bad, overlong, late or missing CONNECT line.
    pub bad_connect_lines: u64,
}

/// Parse `CONNECT <port>` (the `\n` already removed; a trailing `\r` is allowed; the word is
/// matched case-insensitively, as Firecracker does).
pub fn parse_connect_line(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?;
    let line = line.strip_suffix('\r').unwrap_or(line);
    let (word, port) = line.split_once(' ')?;
    if !word.eq_ignore_ascii_case("connect") {
        return None;
    }
    port.trim().parse().ok()
}

/// `PATH_<port>`: where a guest connection to host port `port` goes.
pub fn guest_target_path(uds_path: &Path, port: u32) -> PathBuf {
    let mut s = uds_path.as_os_str().to_owned();
    s.push(format!("_{port}"));
    PathBuf::from(s)
}

/// Connect to the unix socket at `path` without blocking (a full backlog is `WouldBlock`,
/// not a wait).
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data, for which all zero bytes are a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "unusable socket path",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    // SAFETY: socket() takes no pointers; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket() and nothing else owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is an initialised sockaddr_un that outlives the call, and `len` (the
    // family, the path and its terminating zero) is within its size.
    let rc = unsafe {
        libc::connect(
            owned.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast::<libc::sockaddr>(),
            len as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(owned))
}

fn is_fd_exhaustion(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE))
}

/// (host port, guest port).
type ConnKey = (u32, u32);

/// A host client that has not sent its whole CONNECT line.
struct PendingClient {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: u64,
}

enum Slot {
    Pending(PendingClient),
    Conn(ConnKey),
}

struct Entry {
    token: u32,
    conn: Connection<UnixStream>,
    host_initiated: bool,
    in_rxq: bool,
    /// The deadline filed in `deadlines` for this connection.
    deadline: Option<u64>,
}

/// The host side of the vsock device. See the module documentation.
pub struct VsockMuxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    clock: Arc<dyn Clock>,
    registration: Registration,
    max_connections: usize,
    slots: HashMap<u32, Slot>,
    conns: HashMap<ConnKey, Entry>,
    pending_clients: usize,
    fd_tokens: HashMap<RawFd, u32>,
    /// What the event loop watches now, by token.
    registered: BTreeMap<u32, (RawFd, Interest)>,
    changes: Vec<FdChange>,
    deadlines: BTreeSet<(u64, u32)>,
    listener_paused: bool,
    rxq: VecDeque<ConnKey>,
    rstq: VecDeque<ConnKey>,
    host_ports: HashSet<u32>,
    next_host_port: u32,
    next_token: u32,
    /// An fd held back to refuse one connection with when fds run out.
    spare_fd: Option<File>,
    counters: MuxerCounters,
}

impl VsockMuxer {
    /// Listen at `uds_path` for a guest with CID `guest_cid`. The path must not exist.
    pub fn new(
        guest_cid: u64,
        uds_path: &Path,
        clock: Arc<dyn Clock>,
        registration: Registration,
    ) -> Result<Self, VsockError> {
        if !(MIN_GUEST_CID..=MAX_GUEST_CID).contains(&guest_cid) {
            return Err(VsockError::Cid(guest_cid));
        }
        let listen_err = |source| VsockError::Listen {
            path: uds_path.to_owned(),
            source,
        };
        let listener = UnixListener::bind(uds_path).map_err(listen_err)?;
        listener.set_nonblocking(true).map_err(listen_err)?;
        let mut muxer = VsockMuxer {
            guest_cid,
            uds_path: uds_path.to_owned(),
            clock,
            registration,
            max_connections: MAX_CONNECTIONS,
            slots: HashMap::new(),
            conns: HashMap::new(),
            pending_clients: 0,
            fd_tokens: HashMap::new(),
            registered: BTreeMap::new(),
            changes: Vec::new(),
            deadlines: BTreeSet::new(),
            listener_paused: false,
            rxq: VecDeque::new(),
            rstq: VecDeque::new(),
            host_ports: HashSet::new(),
            next_host_port: HOST_PORT_FIRST,
            next_token: LISTENER_TOKEN + 1,
            spare_fd: File::open("/dev/null").ok(),
            counters: MuxerCounters::default(),
            listener,
        };
        let fd = muxer.listener.as_raw_fd();
        muxer.fd_tokens.insert(fd, LISTENER_TOKEN);
        muxer.set_interest(LISTENER_TOKEN, fd, Interest::READ);
        Ok(muxer)
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// The listening socket's path.
    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    /// What was counted.
    pub fn counters(&self) -> MuxerCounters {
        self.counters
    }

    /// Every connection.
    pub fn connections(&self) -> Vec<ConnectionInfo> {
        let mut v: Vec<ConnectionInfo> = self
            .conns
            .values()
            .map(|e| ConnectionInfo {
                local_port: e.conn.local_port(),
                peer_port: e.conn.peer_port(),
                host_initiated: e.host_initiated,
                state: e.conn.state(),
                bytes_to_host: e.conn.bytes_to_host(),
                bytes_to_guest: e.conn.bytes_to_guest(),
            })
            .collect();
        v.sort_by_key(|c| (c.local_port, c.peer_port));
        v
    }

    /// The registration changes since the last call, in order ([`Registration::Explicit`]).
    pub fn take_fd_changes(&mut self) -> Vec<FdChange> {
        std::mem::take(&mut self.changes)
    }

    /// The fds to watch now and for what ([`Registration::PollFds`]).
    pub fn poll_fds(&self) -> Vec<(RawFd, Interest)> {
        self.registered.values().copied().collect()
    }

    /// The token of a watched fd (the shim for the fd-keyed `on_ready` of today's trait).
    pub fn token_of(&self, fd: RawFd) -> Option<u32> {
        self.fd_tokens.get(&fd).copied()
    }

    /// When [`VsockMuxer::process_timeouts`] must run next, in [`Clock`] nanoseconds.
    pub fn next_deadline(&self) -> Option<u64> {
        self.deadlines.first().map(|&(t, _)| t)
    }

    /// Whether packets wait for guest receive buffers.
    pub fn has_rx(&self) -> bool {
        !self.rstq.is_empty() || !self.rxq.is_empty()
    }

    /// Whether the device may hand in another guest packet now: false while the RST queue is
    /// full, so that no answer is lost (the guest's transmit queue waits meanwhile).
    pub fn can_take_guest_packet(&self) -> bool {
        self.rstq.len() < RST_QUEUE_LEN
    }

    fn set_interest(&mut self, token: u32, fd: RawFd, want: Interest) {
        let want = (want.read || want.write).then_some(want);
        let explicit = self.registration == Registration::Explicit;
        let change = match (self.registered.get(&token).map(|&(_, i)| i), want) {
            (None, Some(interest)) => {
                self.registered.insert(token, (fd, interest));
                FdChange::Register {
                    token,
                    fd,
                    interest,
                }
            }
            (Some(old), Some(interest)) if old != interest => {
                self.registered.insert(token, (fd, interest));
                FdChange::Modify {
                    token,
                    fd,
                    interest,
                }
            }
            (Some(_), None) => {
                self.registered.remove(&token);
                FdChange::Deregister { token, fd }
            }
            _ => return,
        };
        if explicit {
            self.changes.push(change);
        }
    }

    fn close_fd(&mut self, token: u32, fd: OwnedFd) {
        let registered = self.registered.remove(&token).is_some();
        self.fd_tokens.remove(&fd.as_raw_fd());
        if self.registration == Registration::Explicit {
            self.changes.push(FdChange::Close {
                token,
                fd,
                registered,
            });
        }
    }

    fn alloc_token(&mut self) -> u32 {
        loop {
            let t = self.next_token;
            self.next_token = self.next_token.wrapping_add(1).max(LISTENER_TOKEN + 1);
            if t != LISTENER_TOKEN && !self.slots.contains_key(&t) {
                return t;
            }
        }
    }

    /// A free host port for a connection to guest port `peer`, sequentially in
    /// [`HOST_PORT_FIRST`, `HOST_PORT_END`), skipping those in use.
    fn alloc_host_port(&mut self, peer: u32) -> Option<u32> {
        for _ in 0..=self.host_ports.len() + self.conns.len() {
            let p = self.next_host_port;
            self.next_host_port = if p + 1 >= HOST_PORT_END {
                HOST_PORT_FIRST
            } else {
                p + 1
            };
            if !self.host_ports.contains(&p) && !self.conns.contains_key(&(p, peer)) {
                return Some(p);
            }
        }
        None
    }

    fn now(&self) -> u64 {
        self.clock.now_ns()
    }

    /// Bring the registration, the receive queue and the deadline of connection `key` in
    /// line with its state.
    fn refresh(&mut self, key: ConnKey) {
        let Some(e) = self.conns.get_mut(&key) else {
            return;
        };
        if !e.in_rxq && e.conn.has_rx() {
            e.in_rxq = true;
            self.rxq.push_back(key);
        }
        let (token, fd, interest) = (e.token, e.conn.stream().as_raw_fd(), e.conn.interest());
        let (old, new) = (e.deadline, e.conn.deadline());
        e.deadline = new;
        if old != new {
            if let Some(t) = old {
                self.deadlines.remove(&(t, token));
            }
            if let Some(t) = new {
                self.deadlines.insert((t, token));
            }
        }
        self.set_interest(token, fd, interest);
    }

    fn queue_rst(&mut self, key: ConnKey) {
        if self.rstq.len() >= RST_QUEUE_LEN {
            self.counters.dropped_rsts += 1;
        } else {
            self.rstq.push_back(key);
        }
    }

    fn remove_conn(&mut self, key: ConnKey) {
        let Some(e) = self.conns.remove(&key) else {
            return;
        };
        self.slots.remove(&e.token);
        if let Some(t) = e.deadline {
            self.deadlines.remove(&(t, e.token));
        }
        if e.host_initiated {
            self.host_ports.remove(&key.0);
        }
        if e.in_rxq {
            self.rxq.retain(|k| *k != key);
        }
        self.close_fd(e.token, e.conn.into_stream().into());
    }

    fn count_kill(&mut self, reason: KillReason) {
        let c = &mut self.counters;
        match reason {
            KillReason::Overrun => c.overrun_resets += 1,
            KillReason::Protocol => c.protocol_resets += 1,
            KillReason::HostError => c.host_error_resets += 1,
            KillReason::Timeout => c.timeouts += 1,
        }
    }

    /// Act on what a connection said. Returns whether an RST is owed to the guest.
    fn apply(&mut self, key: ConnKey, verdict: Verdict) -> bool {
        match verdict {
            Verdict::Keep => {
                self.refresh(key);
                false
            }
            Verdict::Reset => {
                self.remove_conn(key);
                false
            }
            Verdict::Kill(reason) => {
                log::debug!("vsock: resetting {key:?}: {reason:?}");
                self.count_kill(reason);
                self.remove_conn(key);
                true
            }
            Verdict::Done => {
                self.remove_conn(key);
                true
            }
        }
    }

    fn apply_and_answer(&mut self, key: ConnKey, verdict: Verdict) {
        if self.apply(key, verdict) {
            self.queue_rst(key);
        }
    }

    /// The event loop saw `readiness` on the fd of `token`.
    pub fn on_ready(&mut self, token: u32, readiness: Readiness) {
        if token == LISTENER_TOKEN {
            self.accept_clients();
            return;
        }
        match self.slots.get(&token) {
            Some(Slot::Pending(_)) => self.read_connect_line(token),
            Some(&Slot::Conn(key)) => {
                let now = self.now();
                let Some(e) = self.conns.get_mut(&key) else {
                    return;
                };
                if readiness.readable || readiness.hangup {
                    e.conn.on_readable();
                }
                let verdict = if readiness.writable || readiness.hangup {
                    e.conn.flush(now)
                } else {
                    Verdict::Keep
                };
                self.apply_and_answer(key, verdict);
            }
            None => log::debug!("vsock: readiness for stale token {token}"),
        }
    }

    fn accept_clients(&mut self) {
        for _ in 0..ACCEPTS_PER_EVENT {
            match self.listener.accept() {
                Ok((stream, _)) => self.add_client(stream),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_fd_exhaustion(&e) => {
                    log::warn!("vsock: refusing a host connection: {e}");
                    self.counters.refused_connections += 1;
                    self.shed_one_client();
                    return;
                }
                // A client that gave up while queued: only that one is gone.
                Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => {}
                Err(e) => {
                    // Anything else may well happen again at once: rest rather than spin.
                    log::warn!("vsock: accept on {}: {e}", self.uds_path.display());
                    self.pause_listener();
                    return;
                }
            }
        }
    }

    /// Out of fds: close the spare one, accept the waiting client with it and close that at
    /// once, and take a spare again. Without a spare, rest the listener a while rather than
    /// spin on its readiness.
    fn shed_one_client(&mut self) {
        let shed = self.spare_fd.take().is_some() && self.listener.accept().is_ok();
        self.spare_fd = File::open("/dev/null").ok();
        if !shed || self.spare_fd.is_none() {
            self.pause_listener();
        }
    }

    fn pause_listener(&mut self) {
        if self.listener_paused {
            return;
        }
        self.listener_paused = true;
        let until = self.now().saturating_add(LISTENER_BACKOFF_NS);
        self.deadlines.insert((until, LISTENER_TOKEN));
        let fd = self.listener.as_raw_fd();
        self.set_interest(LISTENER_TOKEN, fd, NO_INTEREST);
    }

    fn add_client(&mut self, stream: UnixStream) {
        if self.conns.len() >= self.max_connections
            || self.pending_clients >= MAX_PENDING_CLIENTS
            || stream.set_nonblocking(true).is_err()
        {
            self.counters.refused_connections += 1;
            return;
        }
        let token = self.alloc_token();
        let fd = stream.as_raw_fd();
        let deadline = self.now().saturating_add(CONNECT_LINE_TIMEOUT_NS);
        self.slots.insert(
            token,
            Slot::Pending(PendingClient {
                stream,
                line: Vec::new(),
                deadline,
            }),
        );
        self.pending_clients += 1;
        self.fd_tokens.insert(fd, token);
        self.deadlines.insert((deadline, token));
        self.set_interest(token, fd, Interest::READ);
    }

    fn take_pending(&mut self, token: u32) -> Option<PendingClient> {
        match self.slots.remove(&token) {
            Some(Slot::Pending(p)) => {
                self.pending_clients -= 1;
                self.deadlines.remove(&(p.deadline, token));
                Some(p)
            }
            Some(other) => {
                self.slots.insert(token, other);
                None
            }
            None => None,
        }
    }

    fn drop_client(&mut self, token: u32) {
        if let Some(p) = self.take_pending(token) {
            self.counters.bad_connect_lines += 1;
            self.close_fd(token, p.stream.into());
        }
    }

    /// Read what the client sent of its CONNECT line, byte by byte so that nothing after the
    /// `\n` is consumed.
    fn read_connect_line(&mut self, token: u32) {
        let Some(Slot::Pending(p)) = self.slots.get_mut(&token) else {
            return;
        };
        let mut byte = [0u8; 1];
        let port = loop {
            match p.stream.read(&mut byte) {
                Ok(0) => break None,
                Ok(_) if byte[0] == b'\n' => break parse_connect_line(&p.line),
                Ok(_) if p.line.len() + 1 >= CONNECT_LINE_MAX => break None,
                Ok(_) => p.line.push(byte[0]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => break None,
            }
        };
        match port {
            Some(port) => self.connect_to_guest(token, port),
            None => self.drop_client(token),
        }
    }

    fn connect_to_guest(&mut self, token: u32, peer_port: u32) {
        let Some(p) = self.take_pending(token) else {
            return;
        };
        let local = if self.conns.len() < self.max_connections {
            self.alloc_host_port(peer_port)
        } else {
            None
        };
        let Some(local) = local else {
            self.counters.refused_connections += 1;
            self.close_fd(token, p.stream.into());
            return;
        };
        let now = self.now();
        let conn = Connection::host_initiated(p.stream, self.guest_cid, local, peer_port, now);
        let key = (local, peer_port);
        self.host_ports.insert(local);
        self.insert_conn(token, key, conn, true);
    }

    fn insert_conn(
        &mut self,
        token: u32,
        key: ConnKey,
        conn: Connection<UnixStream>,
        host_initiated: bool,
    ) {
        self.slots.insert(token, Slot::Conn(key));
        let entry = Entry {
            token,
            conn,
            host_initiated,
            in_rxq: false,
            deadline: None,
        };
        self.conns.insert(key, entry);
        self.refresh(key);
    }

    /// A checked packet from the guest.
    pub fn on_guest_packet(&mut self, pkt: &GuestPacket<'_>) {
        let hdr = &pkt.hdr;
        let key = (hdr.dst_port, hdr.src_port);
        let now = self.now();
        if let Some(e) = self.conns.get_mut(&key) {
            let verdict = e.conn.on_guest_packet(hdr, pkt.op, pkt.payload, now);
            self.apply_and_answer(key, verdict);
            return;
        }
        match pkt.op {
            Op::Request => self.guest_connect(hdr),
            Op::Rst => {}
            _ => {
                self.counters.stray_packets += 1;
                self.queue_rst(key);
            }
        }
    }

    /// Answer a guest packet that failed its checks but was addressed well (see
    /// [`super::packet::PacketError::wants_rst`]) with an RST.
    pub fn reply_rst(&mut self, hdr: &Header) {
        if hdr.op != Op::Rst.wire() {
            self.queue_rst((hdr.dst_port, hdr.src_port));
        }
    }

    fn guest_connect(&mut self, hdr: &Header) {
        let key = (hdr.dst_port, hdr.src_port);
        if self.conns.len() >= self.max_connections {
            self.counters.refused_connections += 1;
            self.queue_rst(key);
            return;
        }
        let path = guest_target_path(&self.uds_path, hdr.dst_port);
        let stream = match connect_nonblocking(&path) {
            Ok(s) => s,
            Err(e) => {
                log::debug!("vsock: guest connection to {}: {e}", path.display());
                self.counters.refused_connections += 1;
                self.queue_rst(key);
                return;
            }
        };
        let token = self.alloc_token();
        self.fd_tokens.insert(stream.as_raw_fd(), token);
        let conn = Connection::guest_initiated(stream, self.guest_cid, hdr);
        self.insert_conn(token, key, conn, false);
    }

    /// The next packet for the guest: its header, with `hdr.len` payload bytes written at the
    /// start of `payload` (the room in the guest's buffer after the header). RSTs first, then
    /// the connections with something to say, in turn.
    pub fn next_rx_packet(&mut self, payload: &mut [u8]) -> Option<Header> {
        if let Some((local, peer)) = self.rstq.pop_front() {
            return Some(rst_header(self.guest_cid, local, peer));
        }
        let now = self.now();
        for _ in 0..self.rxq.len() {
            let Some(key) = self.rxq.pop_front() else {
                break;
            };
            let Some(e) = self.conns.get_mut(&key) else {
                continue;
            };
            e.in_rxq = false;
            match e.conn.next_packet(payload, now) {
                RxOutcome::Packet(hdr) => {
                    self.refresh(key);
                    return Some(hdr);
                }
                RxOutcome::Nothing => self.refresh(key),
                RxOutcome::Over(verdict) => {
                    if self.apply(key, verdict) {
                        return Some(rst_header(self.guest_cid, key.0, key.1));
                    }
                }
            }
        }
        None
    }

    /// Act on every deadline that has passed.
    pub fn process_timeouts(&mut self) {
        let now = self.now();
        while let Some(&(t, token)) = self.deadlines.first() {
            if t > now {
                break;
            }
            self.deadlines.remove(&(t, token));
            if token == LISTENER_TOKEN {
                self.listener_paused = false;
                let fd = self.listener.as_raw_fd();
                self.set_interest(LISTENER_TOKEN, fd, Interest::READ);
                continue;
            }
            match self.slots.get(&token) {
                Some(Slot::Pending(_)) => self.drop_client(token),
                Some(&Slot::Conn(key)) => {
                    let Some(e) = self.conns.get_mut(&key) else {
                        continue;
                    };
                    e.deadline = None;
                    let verdict = e.conn.on_deadline(now);
                    self.apply_and_answer(key, verdict);
                }
                None => {}
            }
        }
    }

    /// Drop every connection and waiting client, closing their host sockets; keep the
    /// listener. What was queued for the guest is forgotten.
    pub fn reset(&mut self) {
        let tokens: Vec<u32> = self.slots.keys().copied().collect();
        for token in tokens {
            match self.slots.get(&token) {
                Some(Slot::Pending(_)) => {
                    if let Some(p) = self.take_pending(token) {
                        self.close_fd(token, p.stream.into());
                    }
                }
                Some(&Slot::Conn(key)) => self.remove_conn(key),
                None => {}
            }
        }
        self.rxq.clear();
        self.rstq.clear();
    }
}

impl Drop for VsockMuxer {
    /// The listening socket's path goes with the listener, as a bound socket file left
    /// behind would make the next `bind` there fail.
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.uds_path) {
            log::debug!("vsock: cannot remove {}: {e}", self.uds_path.display());
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::io::Write;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::serial::testing::FakeClock;
    use crate::virtio::vsock::packet::{parse_guest_packet, VSOCK_HOST_CID, VSOCK_TYPE_STREAM};

    pub(crate) const GUEST: u64 = 3;

    /// A directory removed when dropped.
    pub(crate) struct TempDir(pub PathBuf);

    impl TempDir {
        pub(crate) fn new() -> TempDir {
            static N: AtomicUsize = AtomicUsize::new(0);
            let dir = std::env::temp_dir().join(format!(
                "minivmm-vsock-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::SeqCst)
            ));
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        pub(crate) fn sock(&self) -> PathBuf {
            self.0.join("v.sock")
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    struct Rig {
        m: VsockMuxer,
        clock: Arc<FakeClock>,
        dir: TempDir,
    }

    const READ: Readiness = Readiness {
        readable: true,
        writable: false,
        hangup: false,
    };

    impl Rig {
        fn new(registration: Registration) -> Rig {
            let dir = TempDir::new();
            let clock = Arc::new(FakeClock::default());
            let m = VsockMuxer::new(GUEST, &dir.sock(), clock.clone(), registration).unwrap();
            Rig { m, clock, dir }
        }

        fn client(&mut self) -> UnixStream {
            let c = UnixStream::connect(self.dir.sock()).unwrap();
            c.set_nonblocking(true).unwrap();
            self.m.on_ready(LISTENER_TOKEN, READ);
            c
        }

        /// Every token but the listener's, by fd readiness as an event loop would see it.
        fn poll(&mut self) {
            for (fd, interest) in self.m.poll_fds() {
                let token = self.m.token_of(fd).unwrap();
                self.m.on_ready(
                    token,
                    Readiness {
                        readable: interest.read,
                        writable: interest.write,
                        hangup: false,
                    },
                );
            }
        }

        fn guest(&mut self, op: Op, src_port: u32, dst_port: u32, payload: &[u8]) {
            let hdr = Header {
                src_cid: GUEST,
                dst_cid: VSOCK_HOST_CID,
                src_port,
                dst_port,
                len: payload.len() as u32,
                type_: VSOCK_TYPE_STREAM,
                op: op.wire(),
                flags: 0,
                buf_alloc: 65536,
                fwd_cnt: 0,
            };
            let mut bytes = hdr.to_bytes().to_vec();
            bytes.extend_from_slice(payload);
            let pkt = parse_guest_packet(&bytes, GUEST).unwrap();
            self.m.on_guest_packet(&pkt);
        }

        fn rx(&mut self) -> Vec<(Header, Vec<u8>)> {
            let mut out = Vec::new();
            let mut buf = vec![0u8; 4096];
            while let Some(h) = self.m.next_rx_packet(&mut buf) {
                out.push((h, buf[..h.len as usize].to_vec()));
            }
            out
        }
    }

    fn ops(pkts: &[(Header, Vec<u8>)]) -> Vec<u16> {
        pkts.iter().map(|(h, _)| h.op).collect()
    }

    /// What a non-blocking stream holds now, and whether it reached end of file.
    pub(crate) fn read_now(s: &mut UnixStream) -> (Vec<u8>, bool) {
        let mut out = Vec::new();
        let mut buf = [0u8; 256];
        loop {
            match s.read(&mut buf) {
                Ok(0) => return (out, true),
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return (out, false),
                Err(e) => panic!("{e}"),
            }
        }
    }

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect_line(b"CONNECT 52"), Some(52));
        assert_eq!(parse_connect_line(b"connect 4294967295\r"), Some(u32::MAX));
        assert_eq!(parse_connect_line(b"CONNECT 4294967296"), None);
        assert_eq!(parse_connect_line(b"CONNECT"), None);
        assert_eq!(parse_connect_line(b"LISTEN 52"), None);
        assert_eq!(parse_connect_line(b"CONNECT -1"), None);
        assert_eq!(parse_connect_line(b"CONNECT \xff"), None);
        assert_eq!(
            guest_target_path(Path::new("/run/v.sock"), 52),
            PathBuf::from("/run/v.sock_52")
        );
    }

    #[test]
    fn bad_cid_and_taken_path_are_refused() {
        let dir = TempDir::new();
        let clock: Arc<dyn Clock> = Arc::new(FakeClock::default());
        for cid in [0, 1, 2, u64::from(u32::MAX)] {
            assert!(matches!(
                VsockMuxer::new(cid, &dir.sock(), clock.clone(), Registration::PollFds),
                Err(VsockError::Cid(_))
            ));
        }
        let _m = VsockMuxer::new(3, &dir.sock(), clock.clone(), Registration::PollFds).unwrap();
        assert!(matches!(
            VsockMuxer::new(3, &dir.sock(), clock, Registration::PollFds),
            Err(VsockError::Listen { .. })
        ));
    }

    #[test]
    fn host_connect_in_pieces_then_ok() {
        let mut r = Rig::new(Registration::PollFds);
        let mut c = r.client();
        c.write_all(b"CONN").unwrap();
        r.poll();
        assert!(!r.m.has_rx());
        c.write_all(b"ECT 52\nearly").unwrap();
        r.poll();
        let pkts = r.rx();
        assert_eq!(ops(&pkts), vec![Op::Request.wire()]);
        let req = pkts[0].0;
        assert_eq!((req.src_port, req.dst_port), (HOST_PORT_FIRST, 52));
        assert_eq!(req.dst_cid, GUEST);
        assert_eq!(r.m.connections()[0].state, ConnState::Connecting);
        r.guest(Op::Response, 52, HOST_PORT_FIRST, &[]);
        assert_eq!(read_now(&mut c).0, b"OK 1073741824\n");
        // The bytes after the line were left in the socket: they are the stream's first.
        r.poll();
        let pkts = r.rx();
        assert_eq!(ops(&pkts), vec![Op::Rw.wire()]);
        assert_eq!(pkts[0].1, b"early");
        assert_eq!(r.m.connections()[0].bytes_to_guest, 5);
    }

    #[test]
    fn bad_or_long_lines_close_the_client() {
        let mut r = Rig::new(Registration::PollFds);
        let mut c = r.client();
        c.write_all(b"HELLO 52\n").unwrap();
        r.poll();
        assert!(read_now(&mut c).1, "closed");
        let mut c = r.client();
        c.write_all(&[b'1'; CONNECT_LINE_MAX]).unwrap();
        r.poll();
        assert!(read_now(&mut c).1, "closed");
        // Exactly at the limit is fine.
        let mut c = r.client();
        c.write_all(format!("CONNECT {}\n", "0".repeat(CONNECT_LINE_MAX - 9)).as_bytes())
            .unwrap();
        r.poll();
        assert!(!read_now(&mut c).1, "open");
        assert_eq!(r.m.counters().bad_connect_lines, 2);
        assert!(r.m.has_rx());
    }

    #[test]
    fn guest_rst_closes_the_client_and_silence_times_out() {
        let mut r = Rig::new(Registration::PollFds);
        let mut c = r.client();
        c.write_all(b"CONNECT 52\n").unwrap();
        r.poll();
        r.rx();
        r.guest(Op::Rst, 52, HOST_PORT_FIRST, &[]);
        assert_eq!(read_now(&mut c), (Vec::new(), true));
        assert!(r.m.connections().is_empty());

        let mut c = r.client();
        c.write_all(b"CONNECT 53\n").unwrap();
        r.poll();
        let req = r.rx()[0].0;
        assert_eq!(
            req.src_port,
            HOST_PORT_FIRST + 1,
            "ports are handed out in turn"
        );
        assert_eq!(
            r.m.next_deadline(),
            Some(super::super::conn::CONN_REQUEST_TIMEOUT_NS)
        );
        r.clock.advance(super::super::conn::CONN_REQUEST_TIMEOUT_NS);
        r.m.process_timeouts();
        assert_eq!(read_now(&mut c), (Vec::new(), true));
        let pkts = r.rx();
        assert_eq!(ops(&pkts), vec![Op::Rst.wire()]);
        assert_eq!((pkts[0].0.src_port, pkts[0].0.dst_port), (req.src_port, 53));
        assert_eq!(r.m.counters().timeouts, 1);
        assert_eq!(r.m.next_deadline(), None);
    }

    #[test]
    fn silent_client_times_out() {
        let mut r = Rig::new(Registration::PollFds);
        let mut c = r.client();
        r.clock.advance(CONNECT_LINE_TIMEOUT_NS);
        r.m.process_timeouts();
        assert!(read_now(&mut c).1);
        assert_eq!(r.m.counters().bad_connect_lines, 1);
    }

    #[test]
    fn guest_connects_with_and_without_a_listener() {
        let mut r = Rig::new(Registration::PollFds);
        r.guest(Op::Request, 1000, 52, &[]);
        let pkts = r.rx();
        assert_eq!(ops(&pkts), vec![Op::Rst.wire()]);
        assert_eq!((pkts[0].0.src_port, pkts[0].0.dst_port), (52, 1000));
        assert_eq!(r.m.counters().refused_connections, 1);

        let listener = UnixListener::bind(guest_target_path(&r.dir.sock(), 52)).unwrap();
        r.guest(Op::Request, 1000, 52, &[]);
        assert_eq!(ops(&r.rx()), vec![Op::Response.wire()]);
        let (mut host, _) = listener.accept().unwrap();
        host.set_nonblocking(true).unwrap();
        r.guest(Op::Rw, 1000, 52, b"ping");
        assert_eq!(read_now(&mut host).0, b"ping");
        host.write_all(b"pong").unwrap();
        r.poll();
        let pkts = r.rx();
        assert_eq!(pkts[0].1, b"pong");
        // A packet for a connection that does not exist gets an RST.
        r.guest(Op::Rw, 1001, 52, b"?");
        assert_eq!(ops(&r.rx()), vec![Op::Rst.wire()]);
        assert_eq!(r.m.counters().stray_packets, 1);
    }

    #[test]
    fn connection_limit() {
        let mut r = Rig::new(Registration::PollFds);
        r.m.max_connections = 1;
        let _listener = UnixListener::bind(guest_target_path(&r.dir.sock(), 52)).unwrap();
        r.guest(Op::Request, 1000, 52, &[]);
        assert_eq!(ops(&r.rx()), vec![Op::Response.wire()]);
        r.guest(Op::Request, 1001, 52, &[]);
        assert_eq!(ops(&r.rx()), vec![Op::Rst.wire()]);
        let mut c = r.client();
        assert!(read_now(&mut c).1, "host client closed at once");
        assert_eq!(r.m.counters().refused_connections, 2);
        assert_eq!(r.m.connections().len(), 1);
    }

    #[test]
    fn host_ports_skip_those_in_use() {
        let mut r = Rig::new(Registration::PollFds);
        r.m.next_host_port = HOST_PORT_END - 1;
        r.m.host_ports.insert(HOST_PORT_FIRST);
        assert_eq!(r.m.alloc_host_port(1), Some(HOST_PORT_END - 1));
        assert_eq!(r.m.alloc_host_port(1), Some(HOST_PORT_FIRST + 1));
    }

    #[test]
    fn explicit_registration_reports_changes_by_token() {
        let mut r = Rig::new(Registration::Explicit);
        let listener_fd = r.m.listener.as_raw_fd();
        match r.m.take_fd_changes().as_slice() {
            [FdChange::Register {
                token: LISTENER_TOKEN,
                fd,
                interest: Interest::READ,
            }] => assert_eq!(*fd, listener_fd),
            other => panic!("{other:?}"),
        }
        let mut c = r.client();
        let token = match r.m.take_fd_changes().as_slice() {
            [FdChange::Register {
                token,
                interest: Interest::READ,
                ..
            }] => *token,
            other => panic!("{other:?}"),
        };
        c.write_all(b"CONNECT 52\n").unwrap();
        r.m.on_ready(token, READ);
        // Connecting: nothing to poll.
        assert!(matches!(
            r.m.take_fd_changes().as_slice(),
            [FdChange::Deregister { token: t, .. }] if *t == token
        ));
        r.rx();
        r.guest(Op::Response, 52, HOST_PORT_FIRST, &[]);
        assert!(matches!(
            r.m.take_fd_changes().as_slice(),
            [FdChange::Register { token: t, interest: Interest::READ, .. }] if *t == token
        ));
        r.guest(Op::Rst, 52, HOST_PORT_FIRST, &[]);
        let changes = r.m.take_fd_changes();
        match changes.as_slice() {
            [FdChange::Close {
                token: t,
                registered: true,
                ..
            }] => assert_eq!(*t, token),
            other => panic!("{other:?}"),
        }
        // The fd is still open until the change is dropped.
        assert!(!read_now(&mut c).1);
        drop(changes);
        assert!(read_now(&mut c).1);
        // Nothing is left registered but the listener.
        assert_eq!(r.m.poll_fds(), vec![(listener_fd, Interest::READ)]);
    }

    #[test]
    fn reset_drops_connections_and_keeps_the_listener() {
        let mut r = Rig::new(Registration::PollFds);
        let _l = UnixListener::bind(guest_target_path(&r.dir.sock(), 52)).unwrap();
        r.guest(Op::Request, 1000, 52, &[]);
        let mut c = r.client();
        c.write_all(b"CONNECT 7\n").unwrap();
        r.poll();
        let mut waiting = r.client();
        assert_eq!(r.m.connections().len(), 2);
        r.m.reset();
        assert!(r.m.connections().is_empty());
        assert!(!r.m.has_rx());
        assert!(read_now(&mut c).1);
        assert!(read_now(&mut waiting).1);
        assert_eq!(r.m.poll_fds().len(), 1);
        let mut again = r.client();
        again.write_all(b"CONNECT 7\n").unwrap();
        r.poll();
        assert_eq!(ops(&r.rx()), vec![Op::Request.wire()]);
    }

    #[test]
    fn out_of_fds_refuses_one_client_with_the_spare() {
        let mut r = Rig::new(Registration::PollFds);
        let mut c = UnixStream::connect(r.dir.sock()).unwrap();
        c.set_nonblocking(true).unwrap();
        // What accept_clients does on EMFILE: the spare fd takes the client and closes it.
        assert!(r.m.spare_fd.is_some());
        r.m.shed_one_client();
        assert!(read_now(&mut c).1, "refused");
        assert!(r.m.spare_fd.is_some(), "spare taken again");
        assert!(!r.m.listener_paused);
        assert!(r.m.connections().is_empty());
        // Without a spare, the client stays in the backlog and the listener rests instead
        // of being polled (and found readable) again at once.
        let mut c = UnixStream::connect(r.dir.sock()).unwrap();
        c.set_nonblocking(true).unwrap();
        r.m.spare_fd = None;
        r.m.shed_one_client();
        assert!(r.m.listener_paused);
        assert!(r.m.poll_fds().is_empty());
        assert!(!read_now(&mut c).1);
        assert!(is_fd_exhaustion(&io::Error::from_raw_os_error(
            libc::EMFILE
        )));
        assert!(is_fd_exhaustion(&io::Error::from_raw_os_error(
            libc::ENFILE
        )));
        assert!(!is_fd_exhaustion(&io::Error::from_raw_os_error(
            libc::EAGAIN
        )));
    }

    #[test]
    fn hangup_of_a_waiting_client_closes_it() {
        let mut r = Rig::new(Registration::PollFds);
        let c = r.client();
        drop(c);
        let token = r.m.slots.keys().copied().next().unwrap();
        r.m.on_ready(
            token,
            Readiness {
                readable: false,
                writable: false,
                hangup: true,
            },
        );
        assert!(r.m.slots.is_empty());
        assert_eq!(r.m.poll_fds().len(), 1);
        // Readiness for a token that is gone is ignored.
        r.m.on_ready(token, READ);
    }

    #[test]
    fn a_paused_listener_comes_back() {
        let mut r = Rig::new(Registration::Explicit);
        r.m.take_fd_changes();
        r.m.pause_listener();
        assert!(matches!(
            r.m.take_fd_changes().as_slice(),
            [FdChange::Deregister {
                token: LISTENER_TOKEN,
                ..
            }]
        ));
        assert_eq!(r.m.next_deadline(), Some(LISTENER_BACKOFF_NS));
        r.clock.advance(LISTENER_BACKOFF_NS);
        r.m.process_timeouts();
        assert!(matches!(
            r.m.take_fd_changes().as_slice(),
            [FdChange::Register {
                token: LISTENER_TOKEN,
                ..
            }]
        ));
    }
}
