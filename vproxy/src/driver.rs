//! The vproxy chardev backend: the I/O around the sans-IO [`Engine`].
//!
//! The frontend's channel (a virtio-console port, a UART) carries the engine's frames:
//! [`Backend::write`] hands guest bytes to [`Engine::receive`] and always accepts all of them,
//! so the channel is always drained; [`Backend::read`] pulls [`Engine::transmit`], and
//! [`Event::Readable`] says when the engine has something to send.
//!
//! Around it this module owns every socket:
//! - one listener per oforward; each accepted connection opens the peer's service of that name;
//! - for an `OpenRequest` naming a configured iforward, a non-blocking connect to its address
//!   (resolved when the forward was added, so nothing here waits for DNS); the stream is
//!   accepted once connected and refused with the error otherwise. A name that is not
//!   configured is refused with "no such service": the peer names services, never addresses;
//! - per-stream sockets, read only while the engine has send room for the stream (so a slow
//!   channel pushes back into the kernel's socket buffers), written from the engine through a
//!   small bounded buffer; EOF maps to `shutdown(SHUT_WR)` and back, a reset to a close;
//! - a timerfd armed for [`Engine::poll_timeout`] (keepalive, HELLO retries).
//!
//! Removing an oforward closes its listener; streams it already carried live on. Nothing here
//! blocks, and nothing grows without bound: the engine caps streams and buffers.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::os::unix::io::{AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use vmm_sys_util::timerfd::TimerFd;

use crate::engine::{Engine, EngineConfig, EngineEvent, SessionStats, StreamId, StreamStats};
use crate::forward::{Endpoint, Forward};
use crate::spec::VproxySpec;
use chardev::backend::{Backend, Event, Interest, Readiness};
use chardev::buffer::{EventQueue, OutBuf};
use chardev::error::{Error, Result};
use chardev::poller::{FdSet, Registrar, Token};
use chardev::socket::is_out_of_fds;
use chardev::socket::{self, SockAddr, SocketFile};
use chardev::sys;

/// Bytes buffered per stream between the engine and a socket that is not taking them
/// (allocated as used: an idle stream holds none).
pub const STREAM_PENDING_CAP: usize = 64 * 1024;
/// Largest socket read handed to the engine at once (64 KiB: a whole DATA frame on a fast
/// channel, few syscalls per MiB).
const SOCKET_READ_CHUNK: usize = 64 * 1024;
/// Accept queue of an oforward's listener: a proxy takes bursts of connections (the kernel
/// caps it at net.core.somaxconn); a short queue makes each overflowing client wait a second
/// for its SYN to be retried.
const OFORWARD_BACKLOG: libc::c_int = libc::SOMAXCONN;
/// Connections accepted per listener wakeup, so one busy listener cannot starve the rest.
const ACCEPTS_PER_WAKEUP: usize = 16;
/// Socket reads per stream wakeup, for the same reason.
const READS_PER_WAKEUP: usize = 4;
/// Shortest interval between two log lines about connections refused for want of fds.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(1);
/// The refusal reason for a service that is not an iforward here.
pub const NO_SUCH_SERVICE: &str = "no such service";

/// Which way a forward goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardDir {
    /// An iforward: the peer opens it, we connect.
    In,
    /// An oforward: we listen, the peer's service is opened.
    Out,
}

/// What `query-vproxy` shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VproxyInfo {
    /// Session state and counters.
    pub session: SessionStats,
    /// Every live stream.
    pub streams: Vec<StreamStats>,
    /// The listeners, with the port the kernel picked for port 0.
    pub oforwards: Vec<Forward>,
    /// The services the peer may open.
    pub iforwards: Vec<Forward>,
}

/// Run-time control of a vproxy backend (the monitor's `vproxy-forward-add`,
/// `vproxy-forward-remove` and `query-vproxy`).
pub trait VproxyControl {
    /// Add a forward. A listener is bound at once; an iforward's address is resolved at once.
    /// A name already used in that direction is `AlreadyExists`.
    fn add_forward(&mut self, dir: ForwardDir, f: Forward) -> io::Result<()>;
    /// Remove the forward `name`; its live streams are left alone. `NotFound` if absent.
    fn remove_forward(&mut self, dir: ForwardDir, name: &str) -> io::Result<()>;
    /// Forwards, session and streams.
    fn info(&self) -> VproxyInfo;
}

/// The vproxy control of `backend`, if it is a vproxy backend (reached through
/// [`Backend::extension`]: the chardev core knows nothing of vproxy).
pub fn control_of(backend: &mut dyn Backend) -> Option<&mut dyn VproxyControl> {
    let vp = backend.extension()?.downcast_mut::<VproxyBackend>()?;
    Some(vp)
}

/// Make the next close of socket `fd` send a TCP reset, so that a client sees an abort
/// (ECONNRESET) rather than an orderly end. Unix sockets have no such thing: a client that must
/// tell a truncated stream from a complete one uses a TCP forward.
fn abort_socket(fd: &OwnedFd) {
    socket::abort_on_close(fd);
}

/// A random session id from the kernel's generator (getrandom(2)); on the unlikely failure,
/// the clock and pid mixed, which still differs between runs.
pub fn random_session_id() -> u64 {
    let mut buf = [0u8; 8];
    // SAFETY: getrandom writes at most buf.len() bytes into buf, which we own.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n == buf.len() as isize {
        return u64::from_ne_bytes(buf);
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos ^ (u64::from(std::process::id()) << 32) ^ 0x9E37_79B9_7F4A_7C15
}

/// An oforward's listening socket.
#[derive(Debug)]
struct Listener {
    /// The forward as bound (port 0 replaced by the kernel's choice).
    forward: Forward,
    fd: OwnedFd,
    _file: Option<SocketFile>,
}

/// An iforward and its resolved address.
#[derive(Debug)]
struct Target {
    forward: Forward,
    addr: SockAddr,
}

/// Where a stream's socket is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Our outgoing connect for an accepted-to-be iforward stream is in progress.
    Connecting,
    /// We opened the stream for an accepted connection; the peer has not answered yet.
    Opening,
    /// Data flows.
    Open,
}

/// One stream's socket.
#[derive(Debug)]
struct Conn {
    fd: OwnedFd,
    phase: Phase,
    /// Bytes from the engine not yet written to the socket.
    pending: OutBuf,
    /// The socket gave EOF (and the engine was told).
    read_eof: bool,
    /// The peer half-closed: shut our write side down once `pending` is flushed.
    peer_eof: bool,
    /// `shutdown(SHUT_WR)` done.
    write_shut: bool,
    /// The engine is finished with the stream (closed): drop the socket once flushed.
    engine_done: bool,
}

impl Conn {
    fn new(fd: OwnedFd, phase: Phase) -> Self {
        Conn {
            fd,
            phase,
            pending: OutBuf::new(STREAM_PENDING_CAP),
            read_eof: false,
            peer_eof: false,
            write_shut: false,
            engine_done: false,
        }
    }
}

/// What `io::Error` from a socket means for its stream.
fn reset_reason(e: &io::Error) -> String {
    format!("local socket error: {e}")
}

/// A forward's address: an inet endpoint resolved now (`listen` picks the wildcard-free rules
/// of a listener), a unix path as is.
fn endpoint_addr(endpoint: &Endpoint, listen: bool) -> io::Result<SockAddr> {
    match endpoint {
        Endpoint::Tcp { host, port } => Ok(SockAddr::inet(&socket::resolve(host, *port, listen)?)),
        Endpoint::Unix(path) => SockAddr::unix(path, false),
    }
}

/// The vproxy backend.
#[derive(Debug)]
pub struct VproxyBackend {
    /// Every socket and the timer, registered by token. Declared first: it unregisters what is
    /// left before the sockets close.
    fds: FdSet,
    id: String,
    engine: Engine,
    timer: TimerFd,
    /// The deadline the timer is armed for.
    armed: Option<Instant>,
    listeners: Vec<Listener>,
    targets: Vec<Target>,
    conns: BTreeMap<StreamId, Conn>,
    /// The stream of each socket, for the token of a ready fd.
    conn_by_fd: HashMap<RawFd, StreamId>,
    events: EventQueue,
    /// Connections refused because minivmm ran out of fds, and when that was last logged.
    fd_refusals: u64,
    refusal_logged: Option<Instant>,
    /// A `Readable` was announced and the frontend has not pulled everything since.
    announced: bool,
    input_wanted: bool,
    /// Scratch buffer for socket reads and writes (one for all streams).
    scratch: Vec<u8>,
}

impl VproxyBackend {
    /// Bind the listeners of `spec` and resolve its iforwards; the engine starts its handshake
    /// at once.
    pub fn open(id: &str, spec: &VproxySpec) -> Result<Self> {
        let mut config = spec
            .rate
            .map_or_else(EngineConfig::default, EngineConfig::for_rate);
        if let Some(window) = spec.window {
            config = config.with_fixed_window(window);
        }
        if let Some(n) = spec.max_streams {
            config.max_streams = n;
        }
        let timer =
            TimerFd::new().map_err(|e| Error::io(id, "create timer for", "vproxy", e.into()))?;
        // A timer re-armed between poll and its handling must not block the read.
        sys::set_nonblocking(timer.as_raw_fd(), true)
            .map_err(|e| Error::io(id, "create timer for", "vproxy", e))?;
        let mut b = VproxyBackend {
            fds: FdSet::new(),
            id: id.to_string(),
            engine: Engine::new(config, random_session_id(), Instant::now()),
            timer,
            armed: None,
            listeners: Vec::new(),
            targets: Vec::new(),
            conns: BTreeMap::new(),
            conn_by_fd: HashMap::new(),
            events: EventQueue::default(),
            fd_refusals: 0,
            refusal_logged: None,
            announced: false,
            input_wanted: true,
            scratch: vec![0; SOCKET_READ_CHUNK.max(STREAM_PENDING_CAP)],
        };
        for f in &spec.oforwards {
            b.add_forward(ForwardDir::Out, f.clone())
                .map_err(|e| Error::io(id, "listen on", f.to_string(), e))?;
        }
        for f in &spec.iforwards {
            b.add_forward(ForwardDir::In, f.clone())
                .map_err(|e| Error::io(id, "resolve", f.to_string(), e))?;
        }
        b.after();
        Ok(b)
    }

    /// The channel was reconnected (the endpoint binary reopened it): every stream is reset
    /// and the handshake starts again; forwards stay.
    pub fn channel_reset(&mut self) {
        self.engine.channel_reset(Instant::now());
        self.after();
        // Whatever the engine no longer knows has no business keeping a socket open.
        let live: std::collections::HashSet<StreamId> =
            self.engine.stream_stats().iter().map(|s| s.id).collect();
        let dead: Vec<StreamId> = self
            .conns
            .keys()
            .filter(|id| !live.contains(id))
            .copied()
            .collect();
        for id in dead {
            self.remove_conn(id);
        }
    }

    /// Whether the engine has channel bytes to send now.
    pub fn wants_transmit(&self) -> bool {
        self.engine.wants_transmit()
    }

    fn bind_listener(&self, f: Forward) -> io::Result<Listener> {
        let addr = endpoint_addr(&f.endpoint, true)?;
        let unix_file = match &f.endpoint {
            Endpoint::Unix(path) => Some(path.as_path()),
            Endpoint::Tcp { .. } => None,
        };
        let (fd, file) =
            socket::open_listener(&addr, unix_file, OFORWARD_BACKLOG).map_err(|(_, e)| e)?;
        let endpoint = match socket::sockname(fd.as_raw_fd(), false)
            .ok()
            .and_then(SockAddr::to_inet)
        {
            Some(sa) => Endpoint::Tcp {
                host: sa.ip().to_string(),
                port: sa.port(),
            },
            None => f.endpoint.clone(),
        };
        Ok(Listener {
            forward: Forward {
                name: f.name,
                endpoint,
            },
            fd,
            _file: file,
        })
    }

    /// After anything that may have moved the engine: handle its events, re-arm the timer and
    /// tell the frontend when there is channel output.
    fn after(&mut self) {
        while let Some(ev) = self.engine.poll_event() {
            self.handle(ev);
        }
        self.arm_timer();
        if self.input_wanted && !self.announced && self.engine.wants_transmit() {
            self.announced = true;
            self.events.push(Event::Readable);
        }
    }

    fn arm_timer(&mut self) {
        let deadline = self.engine.poll_timeout();
        if deadline == self.armed {
            return;
        }
        // A zero duration would disarm the timer, so a due deadline fires in a millisecond.
        let delay = deadline.map_or(Duration::ZERO, |d| {
            d.saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1))
        });
        match self.timer.reset(delay, None) {
            Ok(()) => self.armed = deadline,
            Err(e) => log::warn!("chardev '{}': cannot arm vproxy timer: {e}", self.id),
        }
        let interest = if self.armed.is_some() {
            Interest::READ
        } else {
            Interest::NONE
        };
        self.fds.set(self.timer.as_raw_fd(), interest);
    }

    fn handle(&mut self, ev: EngineEvent) {
        match ev {
            EngineEvent::SessionUp { peer_session } => {
                log::info!(
                    "chardev '{}': vproxy session up (peer {peer_session:016x})",
                    self.id
                );
            }
            EngineEvent::SessionReset { peer_session } => {
                log::info!(
                    "chardev '{}': vproxy peer restarted (session {peer_session:016x}), streams reset",
                    self.id
                );
            }
            EngineEvent::OpenRequest { id, service } => self.open_request(id, &service),
            EngineEvent::Opened { id } => {
                if let Some(c) = self.conns.get_mut(&id) {
                    c.phase = Phase::Open;
                }
                self.update_conn(id);
            }
            EngineEvent::OpenFailed { id, reason } => {
                log::debug!(
                    "chardev '{}': vproxy stream {id} refused: {reason}",
                    self.id
                );
                self.abort(id);
            }
            EngineEvent::Readable { id } => self.flush(id),
            // Send room again: read the socket when it is readable.
            EngineEvent::Writable { id } => self.update_conn(id),
            EngineEvent::Eof { id } => {
                if let Some(c) = self.conns.get_mut(&id) {
                    c.peer_eof = true;
                }
                self.flush(id);
            }
            EngineEvent::Reset { id, reason } => {
                log::debug!("chardev '{}': vproxy stream {id} reset: {reason}", self.id);
                self.abort(id);
            }
            EngineEvent::Closed { id } => {
                if let Some(c) = self.conns.get_mut(&id) {
                    c.engine_done = true;
                }
                self.flush(id);
            }
            EngineEvent::VersionMismatch { peer_version } => {
                log::error!(
                    "chardev '{}': the vproxy peer speaks wire version {peer_version}, this end \
                     version {}: no session until both ends run the same vproxy (update \
                     minivmm-vp in the guest, or minivmm)",
                    self.id,
                    crate::wire::VERSION
                );
            }
        }
    }

    /// The peer wants to open `service`: connect to its iforward, or refuse.
    fn open_request(&mut self, id: StreamId, service: &str) {
        let Some(target) = self.targets.iter().find(|t| t.forward.name == service) else {
            log::debug!(
                "chardev '{}': vproxy peer asked for unknown service '{service}'",
                self.id
            );
            self.engine.refuse(id, NO_SUCH_SERVICE);
            return;
        };
        let addr = &target.addr;
        let attempt = socket::new_socket(addr.family()).and_then(|fd| {
            let done = socket::connect(&fd, addr)?;
            Ok((fd, done))
        });
        match attempt {
            Ok((fd, true)) => {
                self.engine.accept(id);
                self.insert_conn(id, Conn::new(fd, Phase::Open));
            }
            Ok((fd, false)) => {
                self.insert_conn(id, Conn::new(fd, Phase::Connecting));
            }
            Err(e) if is_out_of_fds(&e) => {
                self.count_fd_refusal(&e);
                self.engine.refuse(id, &format!("connect failed: {e}"));
            }
            Err(e) => {
                log::debug!(
                    "chardev '{}': vproxy cannot connect '{service}': {e}",
                    self.id
                );
                self.engine.refuse(id, &format!("connect failed: {e}"));
            }
        }
    }

    /// Drop stream `id`'s connection with a TCP reset rather than a FIN, so that its client
    /// sees an abort (ECONNRESET), never an orderly end after truncated data.
    fn abort(&mut self, id: StreamId) {
        if let Some(c) = self.remove_conn(id) {
            abort_socket(&c.fd);
        }
    }

    /// Track stream `id`'s socket and register it for what the stream wants.
    fn insert_conn(&mut self, id: StreamId, conn: Conn) {
        self.conn_by_fd.insert(conn.fd.as_raw_fd(), id);
        self.conns.insert(id, conn);
        self.update_conn(id);
    }

    /// Stop tracking stream `id`'s socket, unregistered; it closes when the caller drops it.
    fn remove_conn(&mut self, id: StreamId) -> Option<Conn> {
        let c = self.conns.remove(&id)?;
        let fd = c.fd.as_raw_fd();
        self.conn_by_fd.remove(&fd);
        self.fds.close(fd);
        Some(c)
    }

    /// What stream `id`'s socket must be watched for now: connect completion while
    /// connecting; input while the engine has send room for it; output while bytes wait.
    fn conn_interest(&self, id: StreamId, c: &Conn) -> Interest {
        match c.phase {
            Phase::Connecting => Interest::WRITE,
            Phase::Opening => Interest::NONE,
            Phase::Open => Interest {
                read: !c.read_eof && self.engine.send_room(id) > 0,
                write: !c.pending.is_empty(),
            },
        }
    }

    /// Re-register stream `id`'s socket after its state may have changed (one `epoll_ctl`
    /// at most, and only when the interest really changed).
    fn update_conn(&mut self, id: StreamId) {
        let Some(c) = self.conns.get(&id) else {
            return;
        };
        let interest = self.conn_interest(id, c);
        if c.phase == Phase::Open && !c.read_eof && !interest.read {
            // Out of send room (its window, or the session buffer other streams filled): the
            // engine says when there is room again, and the socket is read from then on.
            self.engine.notify_when_writable(id);
        }
        self.fds.set(c.fd.as_raw_fd(), interest);
    }

    /// A connection refused for want of fds: counted, and logged once per burst.
    fn count_fd_refusal(&mut self, e: &io::Error) {
        self.fd_refusals += 1;
        let now = Instant::now();
        if self
            .refusal_logged
            .is_none_or(|t| now.duration_since(t) >= REFUSAL_LOG_INTERVAL)
        {
            self.refusal_logged = Some(now);
            log::warn!(
                "chardev '{}': vproxy refuses connections: {e} ({} refused so far)",
                self.id,
                self.fd_refusals
            );
        }
    }

    /// An outgoing connect finished.
    fn finish_connect(&mut self, id: StreamId) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        let error = match socket2::SockRef::from(&c.fd).take_error() {
            Ok(None) => {
                c.phase = Phase::Open;
                self.engine.accept(id);
                return self.update_conn(id);
            }
            Ok(Some(e)) | Err(e) => e,
        };
        self.remove_conn(id);
        self.engine.refuse(id, &format!("connect failed: {error}"));
    }

    /// Accept what waits on listener `index` and open a stream for each connection.
    fn accept_on(&mut self, index: usize) {
        for _ in 0..ACCEPTS_PER_WAKEUP {
            let l = &self.listeners[index];
            let fd = match socket::accept(&l.fd) {
                Ok(Some(fd)) => fd,
                Ok(None) => return,
                // The client was refused (see `socket::accept`): look for the next one.
                Err(e) if is_out_of_fds(&e) => {
                    self.count_fd_refusal(&e);
                    continue;
                }
                Err(e) => {
                    log::warn!("chardev '{}': vproxy accept failed: {e}", self.id);
                    return;
                }
            };
            match self.engine.open(&l.forward.name) {
                Ok(id) => {
                    self.insert_conn(id, Conn::new(fd, Phase::Opening));
                }
                // Aborting the connection closes it: the client sees the refusal at once.
                Err(e) => {
                    abort_socket(&fd);
                    log::warn!(
                        "chardev '{}': vproxy cannot open '{}': {e}",
                        self.id,
                        l.forward.name
                    );
                }
            }
        }
    }

    /// Read the socket of stream `id` into the engine while it has room.
    fn read_socket(&mut self, id: StreamId) {
        self.read_socket_chunks(id);
        self.update_conn(id);
    }

    fn read_socket_chunks(&mut self, id: StreamId) {
        let mut buf = std::mem::take(&mut self.scratch);
        self.read_socket_into(id, &mut buf[..SOCKET_READ_CHUNK]);
        self.scratch = buf;
    }

    fn read_socket_into(&mut self, id: StreamId, buf: &mut [u8]) {
        for _ in 0..READS_PER_WAKEUP {
            let Some(c) = self.conns.get_mut(&id) else {
                return;
            };
            let room = self.engine.send_room(id).min(buf.len());
            if c.phase != Phase::Open || c.read_eof || room == 0 {
                return;
            }
            match sys::read(c.fd.as_raw_fd(), &mut buf[..room]) {
                Ok(0) => {
                    c.read_eof = true;
                    self.engine.shutdown(id);
                    return;
                }
                Ok(n) => {
                    let taken = self.engine.send(id, &buf[..n]);
                    debug_assert_eq!(taken, n, "engine took less than its send room");
                }
                Err(e) if sys::would_block(&e) => return,
                Err(e) => {
                    self.remove_conn(id);
                    self.engine.reset(id, &reset_reason(&e));
                    return;
                }
            }
        }
    }

    /// Move received bytes of stream `id` from the engine to its socket, then carry out a
    /// pending half-close or close.
    fn flush(&mut self, id: StreamId) {
        self.flush_pending(id);
        self.update_conn(id);
    }

    fn flush_pending(&mut self, id: StreamId) {
        let mut buf = std::mem::take(&mut self.scratch);
        self.flush_pending_with(id, &mut buf[..STREAM_PENDING_CAP]);
        self.scratch = buf;
    }

    fn flush_pending_with(&mut self, id: StreamId, buf: &mut [u8]) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        let fd = c.fd.as_raw_fd();
        loop {
            if let Err(e) = c.pending.flush_with(|b| sys::send(fd, b)) {
                self.remove_conn(id);
                self.engine.reset(id, &reset_reason(&e));
                return;
            }
            if !c.pending.is_empty() || c.engine_done {
                break;
            }
            let n = self.engine.recv(id, &mut buf[..c.pending.free()]);
            if n == 0 {
                break;
            }
            // Straight to the socket; only what it does not take waits in `pending`.
            match sys::send(fd, &buf[..n]) {
                Ok(k) => {
                    c.pending.push(&buf[k..n]);
                }
                Err(e) if sys::would_block(&e) => {
                    c.pending.push(&buf[..n]);
                }
                Err(e) => {
                    self.remove_conn(id);
                    self.engine.reset(id, &reset_reason(&e));
                    return;
                }
            }
        }
        if !c.pending.is_empty() {
            return;
        }
        if c.peer_eof && !c.write_shut {
            c.write_shut = true;
            // SAFETY: shutdown on a socket we own; integer arguments only.
            unsafe { libc::shutdown(fd, libc::SHUT_WR) };
        }
        if c.engine_done {
            self.remove_conn(id);
        }
    }
}

impl VproxyControl for VproxyBackend {
    fn add_forward(&mut self, dir: ForwardDir, f: Forward) -> io::Result<()> {
        let taken = match dir {
            ForwardDir::Out => self.listeners.iter().any(|l| l.forward.name == f.name),
            ForwardDir::In => self.targets.iter().any(|t| t.forward.name == f.name),
        };
        if taken {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("forward '{}' already exists", f.name),
            ));
        }
        match dir {
            ForwardDir::Out => {
                let l = self.bind_listener(f)?;
                self.fds.set(l.fd.as_raw_fd(), Interest::READ);
                self.listeners.push(l);
            }
            ForwardDir::In => {
                let addr = endpoint_addr(&f.endpoint, false)?;
                self.targets.push(Target { forward: f, addr });
            }
        }
        Ok(())
    }

    fn remove_forward(&mut self, dir: ForwardDir, name: &str) -> io::Result<()> {
        let before = self.listeners.len() + self.targets.len();
        match dir {
            ForwardDir::Out => {
                if let Some(i) = self.listeners.iter().position(|l| l.forward.name == name) {
                    let l = self.listeners.remove(i);
                    self.fds.close(l.fd.as_raw_fd());
                }
            }
            ForwardDir::In => self.targets.retain(|t| t.forward.name != name),
        }
        if self.listeners.len() + self.targets.len() == before {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no forward '{name}'"),
            ));
        }
        Ok(())
    }

    fn info(&self) -> VproxyInfo {
        VproxyInfo {
            session: self.engine.session_stats(),
            streams: self.engine.stream_stats(),
            oforwards: self.listeners.iter().map(|l| l.forward.clone()).collect(),
            iforwards: self.targets.iter().map(|t| t.forward.clone()).collect(),
        }
    }
}

impl Backend for VproxyBackend {
    fn kind(&self) -> &'static str {
        "vproxy"
    }

    fn filename(&self) -> String {
        let mut s = String::from("vproxy");
        for l in &self.listeners {
            s.push_str(&format!(",oforward={}", l.forward));
        }
        for t in &self.targets {
            s.push_str(&format!(",iforward={}", t.forward));
        }
        s
    }

    fn attach(&mut self, reg: Registrar) {
        self.fds.attach(reg);
    }

    fn detach(&mut self) {
        self.fds.detach();
    }

    fn on_ready(&mut self, token: Token, readiness: Readiness) {
        let Some(fd) = self.fds.fd_of(token) else {
            return;
        };
        if fd == self.timer.as_raw_fd() {
            // Non-blocking: a timer re-armed since the event was collected reads nothing.
            let _ = self.timer.wait();
            self.armed = None;
            self.engine.handle_timeout(Instant::now());
        } else if let Some(&id) = self.conn_by_fd.get(&fd) {
            let connecting = self.conns.get(&id).map(|c| c.phase) == Some(Phase::Connecting);
            if connecting {
                self.finish_connect(id);
            } else {
                if readiness.writable || readiness.hangup {
                    self.flush(id);
                }
                if readiness.readable || readiness.hangup {
                    self.read_socket(id);
                }
            }
        } else if let Some(i) = self.listeners.iter().position(|l| l.fd.as_raw_fd() == fd) {
            self.accept_on(i);
        }
        self.after();
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // Fill the whole buffer if the engine has that much: frontends take a short read as
        // "drained" (as from an fd) and wait for the next `Readable`, which is announced
        // again only after a short read.
        let mut n = 0;
        while n < buf.len() {
            let k = self.engine.transmit(&mut buf[n..]);
            if k == 0 {
                break;
            }
            n += k;
        }
        if n < buf.len() {
            self.announced = false;
        }
        self.after();
        Ok(n)
    }

    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.engine.receive(data, Instant::now());
        self.after();
        Ok(data.len())
    }

    fn set_input_wanted(&mut self, wanted: bool) {
        self.input_wanted = wanted;
        if wanted {
            self.announced = false;
            self.after();
        }
    }

    fn is_connected(&self) -> bool {
        true
    }

    fn take_events(&mut self) -> Vec<Event> {
        self.events.take()
    }

    fn extension(&mut self) -> Option<&mut dyn std::any::Any> {
        Some(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chardev::backend::poll_backends;
    use chardev::testutil::{pseudo_random, DEADLINE};
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpListener, TcpStream};
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{mpsc, Arc};
    use std::thread::JoinHandle;

    type Cmd = Box<dyn FnOnce(&mut VproxyBackend, &mut VproxyBackend) + Send>;

    /// Bytes the test channel moves per read: a 16550's FIFO.
    const CHANNEL_CHUNK: usize = 16;

    /// Two backends whose channels are wired to each other, pumped by a thread.
    struct Pair {
        cmds: mpsc::Sender<Cmd>,
        stop: Arc<AtomicBool>,
        thread: Option<JoinHandle<()>>,
    }

    /// Move channel bytes from `from` to `to` the way a frontend does: only after `from`
    /// announced `Readable` (`pending`), and taking a short read as "drained" until the next
    /// announcement. `buf` is small (a UART's FIFO), so frames cross in pieces.
    fn carry(
        from: &mut VproxyBackend,
        to: &mut VproxyBackend,
        pending: &mut bool,
        buf: &mut [u8],
    ) -> bool {
        *pending |= from.take_events().contains(&Event::Readable);
        let mut moved = false;
        while *pending {
            let n = from.read(buf).unwrap();
            if n < buf.len() {
                *pending = false;
            }
            assert_eq!(
                to.write(&buf[..n]).unwrap(),
                n,
                "the channel must always be drained"
            );
            moved |= n > 0;
            *pending |= from.take_events().contains(&Event::Readable);
        }
        moved
    }

    impl Pair {
        fn new(a: VproxySpec, b: VproxySpec) -> Pair {
            let mut a = VproxyBackend::open("a", &a).unwrap();
            let mut b = VproxyBackend::open("b", &b).unwrap();
            let (cmds, rx) = mpsc::channel::<Cmd>();
            let stop = Arc::new(AtomicBool::new(false));
            let stop2 = stop.clone();
            let thread = std::thread::spawn(move || {
                let mut buf = [0u8; CHANNEL_CHUNK];
                let (mut a_pending, mut b_pending) = (false, false);
                while !stop2.load(Ordering::Relaxed) {
                    while let Ok(cmd) = rx.try_recv() {
                        cmd(&mut a, &mut b);
                    }
                    let moved = carry(&mut a, &mut b, &mut a_pending, &mut buf)
                        | carry(&mut b, &mut a, &mut b_pending, &mut buf);
                    let wait = if moved { 0 } else { 5 };
                    poll_backends(&mut [&mut a, &mut b], wait).unwrap();
                }
            });
            Pair {
                cmds,
                stop,
                thread: Some(thread),
            }
        }

        /// Run `f` on the two backends in the pump thread and return its result.
        fn with<R: Send + 'static>(
            &self,
            f: impl FnOnce(&mut VproxyBackend, &mut VproxyBackend) -> R + Send + 'static,
        ) -> R {
            let (tx, rx) = mpsc::channel();
            self.cmds
                .send(Box::new(move |a, b| {
                    let _ = tx.send(f(a, b));
                }))
                .unwrap();
            rx.recv_timeout(DEADLINE).unwrap()
        }

        /// The port side A listens on for oforward `name`.
        fn a_port(&self, name: &'static str) -> u16 {
            self.with(move |a, _| {
                let info = a.info();
                let f = info.oforwards.iter().find(|f| f.name == name).unwrap();
                match &f.endpoint {
                    Endpoint::Tcp { port, .. } => *port,
                    Endpoint::Unix(_) => panic!("not tcp"),
                }
            })
        }
    }

    impl Drop for Pair {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    fn spec(oforwards: &[&str], iforwards: &[&str]) -> VproxySpec {
        VproxySpec {
            oforwards: oforwards
                .iter()
                .map(|s| super::super::forward::parse_oforward(s).unwrap())
                .collect(),
            iforwards: iforwards
                .iter()
                .map(|s| super::super::forward::parse_iforward(s).unwrap())
                .collect(),
            rate: None,
            window: None,
            max_streams: None,
        }
    }

    /// A tcp echo server on loopback serving every connection in its own thread; its port.
    fn echo_server() -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { return };
                std::thread::spawn(move || {
                    let mut r = s.try_clone().unwrap();
                    let _ = std::io::copy(&mut r, &mut s);
                    let _ = s.shutdown(Shutdown::Write);
                });
            }
        });
        port
    }

    fn connect(port: u16) -> TcpStream {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        s
    }

    #[test]
    fn tcp_echo_through_oforward_and_iforward_with_half_close() {
        let echo = echo_server();
        let pair = Pair::new(
            spec(&["echo:0"], &[]),
            spec(&[], &[&format!("echo:127.0.0.1:{echo}")]),
        );
        let mut c = connect(pair.a_port("echo"));
        c.write_all(b"hello through vproxy").unwrap();
        let mut got = [0u8; 20];
        c.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello through vproxy");
        // Half-close: our EOF reaches the echo server, whose EOF comes back after the data.
        c.write_all(b"last words").unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, b"last words");
        // Both directions finished: the stream is freed on both sides.
        let end = Instant::now() + DEADLINE;
        while pair.with(|a, b| a.info().streams.len() + b.info().streams.len()) > 0 {
            assert!(Instant::now() < end, "streams not freed");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn unix_oforward_to_unix_iforward() {
        let dir = tempfile::tempdir().unwrap();
        let server_path = dir.path().join("server.sock");
        let listen_path = dir.path().join("listen.sock");
        let l = UnixListener::bind(&server_path).unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut line = [0u8; 4];
            s.read_exact(&mut line).unwrap();
            s.write_all(b"pong").unwrap();
        });
        let _pair = Pair::new(
            spec(&[&format!("svc:unix:{}", listen_path.display())], &[]),
            spec(&[], &[&format!("svc:unix:{}", server_path.display())]),
        );
        let mut c = UnixStream::connect(&listen_path).unwrap();
        c.set_read_timeout(Some(DEADLINE)).unwrap();
        c.write_all(b"ping").unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"pong");
    }

    /// A connection the peer refuses is closed without data.
    fn assert_refused(port: u16) {
        let mut c = connect(port);
        let _ = c.write_all(b"anyone?");
        let mut got = Vec::new();
        match c.read_to_end(&mut got) {
            Ok(_) => assert!(got.is_empty(), "refused stream gave {got:?}"),
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}"),
        }
    }

    #[test]
    fn unknown_service_and_failed_connect_are_refused() {
        // Nothing listens on the port of a listener we closed.
        let dead = TcpListener::bind("127.0.0.1:0").unwrap();
        let dead_port = dead.local_addr().unwrap().port();
        drop(dead);
        let pair = Pair::new(
            spec(&["nosuch:0", "down:0"], &[]),
            spec(&[], &[&format!("down:127.0.0.1:{dead_port}")]),
        );
        assert_refused(pair.a_port("nosuch"));
        assert_refused(pair.a_port("down"));
        let failures = pair.with(|a, _| a.info().streams.len());
        assert_eq!(failures, 0, "refused streams must be freed");
    }

    #[test]
    fn twenty_concurrent_streams_checksummed() {
        const STREAMS: usize = 20;
        const BYTES: usize = 200 * 1024;
        let echo = echo_server();
        let pair = Pair::new(
            spec(&["echo:0"], &[]),
            spec(&[], &[&format!("echo:127.0.0.1:{echo}")]),
        );
        let port = pair.a_port("echo");
        let clients: Vec<_> = (0..STREAMS)
            .map(|i| {
                std::thread::spawn(move || {
                    // A different pseudo-random payload per stream.
                    let data = pseudo_random(BYTES, i as u64);
                    let c = connect(port);
                    let mut w = c.try_clone().unwrap();
                    let sent = data.clone();
                    let writer = std::thread::spawn(move || {
                        w.write_all(&sent).unwrap();
                        w.shutdown(Shutdown::Write).unwrap();
                    });
                    let mut got = Vec::with_capacity(BYTES);
                    (&c).read_to_end(&mut got).unwrap();
                    writer.join().unwrap();
                    let sum = |d: &[u8]| {
                        d.iter().fold(0u64, |h, &b| {
                            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01B3)
                        })
                    };
                    assert_eq!(got.len(), BYTES, "stream {i} length");
                    assert_eq!(sum(&got), sum(&data), "stream {i} checksum");
                })
            })
            .collect();
        for c in clients {
            c.join().unwrap();
        }
    }

    #[test]
    fn forwards_added_and_removed_at_run_time() {
        let echo = echo_server();
        let pair = Pair::new(spec(&[], &[]), spec(&[], &[]));
        let echo_fwd = format!("echo:127.0.0.1:{echo}");
        pair.with(move |a, b| {
            let o = super::super::forward::parse_oforward("echo:0").unwrap();
            a.add_forward(ForwardDir::Out, o).unwrap();
            let i = super::super::forward::parse_iforward(&echo_fwd).unwrap();
            b.add_forward(ForwardDir::In, i.clone()).unwrap();
            let again = b.add_forward(ForwardDir::In, i);
            assert_eq!(again.unwrap_err().kind(), io::ErrorKind::AlreadyExists);
        });
        let port = pair.a_port("echo");
        let mut live = connect(port);
        live.write_all(b"one").unwrap();
        let mut got = [0u8; 3];
        live.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"one");

        // Removing the oforward closes the listener but not the stream it carries.
        pair.with(|a, _| {
            let c = a;
            c.remove_forward(ForwardDir::Out, "echo").unwrap();
            assert_eq!(
                c.remove_forward(ForwardDir::Out, "echo")
                    .unwrap_err()
                    .kind(),
                io::ErrorKind::NotFound
            );
            assert!(c.info().oforwards.is_empty());
        });
        assert_eq!(
            TcpStream::connect(("127.0.0.1", port)).unwrap_err().kind(),
            io::ErrorKind::ConnectionRefused
        );
        live.write_all(b"two").unwrap();
        live.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"two");

        // Without the iforward, the peer's service is gone for new streams.
        pair.with(|a, b| {
            b.remove_forward(ForwardDir::In, "echo").unwrap();
            let o = super::super::forward::parse_oforward("echo:0").unwrap();
            a.add_forward(ForwardDir::Out, o).unwrap();
        });
        assert_refused(pair.a_port("echo"));
        live.write_all(b"three").unwrap();
        let mut got = [0u8; 5];
        live.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"three");
        let info = pair.with(|a, _| a.info());
        assert_eq!(info.streams.len(), 1);
        assert!(info.session.up);
    }
}
