//! The `socket` backend: unix (`path=`, `abstract=on`) and tcp (`host=`, `port=`, `nodelay`)
//! stream sockets, as a server (`server=on`, `wait=`) or a client (`reconnect-ms=`), or an
//! inherited socket (`fd=N`, listening or connected, told apart with `SO_ACCEPTCONN`).
//!
//! - A server serves one client at a time, like QEMU: while a client is connected the listener
//!   is not polled, so a second client waits in the kernel's listen backlog and is accepted
//!   when the first leaves.
//! - A client connects without blocking; with `reconnect-ms` it retries after a lost or failed
//!   connection on a timerfd, doubling the delay up to [`MAX_RECONNECT_BACKOFF`], and logs only
//!   the first failure of a series (quiet, backed-off).
//! - While no peer is connected, output goes to the replay ring (`backlog=`), replayed to the
//!   next peer; connect and disconnect are `Event::Opened` / `Event::Closed`.
//! - Unix socket files are created with mode 0600 (the mode is set on the socket before
//!   `bind`, so there is no window with a wider mode), a stale file left by a dead process is
//!   replaced, a live one is refused, and the file is removed on drop if it is still ours.
//!
//! Sockets and their addresses are socket2's; the helpers at the top of this module (also used
//! by the vproxy driver) add the crate's conventions: non-blocking and close-on-exec from
//! creation, `EINPROGRESS` as a connect in progress, unix paths and abstract names, listeners
//! with the file handling above, and `accept` refusing clients when no fd is left.
//!
//! Nothing here blocks except [`Backend::wait_for_client`]. Writes use `MSG_NOSIGNAL`.

use std::ffi::OsStr;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use rustix::fs::Mode;
use socket2::{Domain, SockRef, Socket, Type};
use vmm_sys_util::timerfd::TimerFd;

use crate::backend::{Backend, Event, Interest, Readiness};
use crate::buffer::DEFAULT_OUTBUF_SIZE;
use crate::error::{Error, Result};
use crate::poller::{FdSet, Registrar, Token};
use crate::spec::{SocketAddrSpec, SocketSpec};
use crate::stream::Link;
use crate::sys::{self, FdKind};

/// Length of the kernel listen queue: where a second client waits its turn.
pub const LISTEN_BACKLOG: libc::c_int = 8;
/// Longest delay between client reconnect attempts (unless `reconnect-ms` is longer).
pub const MAX_RECONNECT_BACKOFF: Duration = Duration::from_secs(5);
/// Mode of unix socket files.
const SOCKET_FILE_MODE: u32 = 0o600;

/// A socket address in the form the kernel takes (socket2's, with this crate's constructors).
#[derive(Clone, Debug)]
pub struct SockAddr(socket2::SockAddr);

impl SockAddr {
    /// The address family (`AF_UNIX`, `AF_INET`, `AF_INET6`).
    pub fn family(&self) -> libc::c_int {
        libc::c_int::from(self.0.family())
    }

    /// A unix address: the filesystem path `path`, or with `abstract_ns` the name `path` in
    /// Linux's abstract namespace. An empty or too long path is `ENAMETOOLONG`.
    pub fn unix(path: &Path, abstract_ns: bool) -> io::Result<Self> {
        let bytes = path.as_os_str().as_bytes();
        let too_long = || io::Error::from_raw_os_error(libc::ENAMETOOLONG);
        if bytes.is_empty() {
            return Err(too_long());
        }
        // socket2 takes a leading NUL for an abstract name and leaves no terminating NUL.
        let addr = if abstract_ns {
            let name = [&[0u8][..], bytes].concat();
            socket2::SockAddr::unix(OsStr::from_bytes(&name))
        } else {
            socket2::SockAddr::unix(path)
        };
        addr.map(SockAddr).map_err(|_| too_long())
    }

    pub fn inet(addr: &SocketAddr) -> Self {
        SockAddr(socket2::SockAddr::from(*addr))
    }

    /// The inet address, if this is one.
    // By value: callers chain it after `sockname(..).ok()` in `Option::and_then`.
    #[allow(clippy::wrong_self_convention)]
    pub fn to_inet(self) -> Option<SocketAddr> {
        self.0.as_socket()
    }
}

/// A new non-blocking, close-on-exec stream socket.
pub fn new_socket(family: libc::c_int) -> io::Result<OwnedFd> {
    let ty = Type::STREAM.nonblocking().cloexec();
    Ok(Socket::new(Domain::from(family), ty, None)?.into())
}

/// Start connecting. `Ok(true)`: connected; `Ok(false)`: in progress.
pub fn connect(fd: impl AsFd, a: &SockAddr) -> io::Result<bool> {
    let sock = SockRef::from(&fd);
    loop {
        match sock.connect(&a.0) {
            Ok(()) => return Ok(true),
            Err(e) => match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EINPROGRESS) => return Ok(false),
                _ => return Err(e),
            },
        }
    }
}

/// Accept one pending connection, non-blocking. `Ok(None)`: nobody waiting.
pub fn accept(listener: impl AsFd) -> io::Result<Option<OwnedFd>> {
    let sock = SockRef::from(&listener);
    loop {
        let e = match sock.accept4(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC) {
            Ok((conn, _)) => return Ok(Some(conn.into())),
            Err(e) => e,
        };
        match e.raw_os_error() {
            Some(libc::EINTR) | Some(libc::ECONNABORTED) => continue,
            _ if sys::would_block(&e) => return Ok(None),
            _ if is_out_of_fds(&e) => {
                refuse_one(&sock);
                return Err(e);
            }
            _ => return Err(e),
        }
    }
}

/// Make the next close of socket `fd` send a TCP reset (SO_LINGER on with a zero timeout).
/// Unix sockets have no such thing: their peer sees an abort as an ordinary end of stream.
pub fn abort_on_close(fd: impl AsFd) {
    let _ = SockRef::from(&fd).set_linger(Some(Duration::ZERO));
}

/// Whether `e` says the process or the system has no fd left (`EMFILE`, `ENFILE`).
pub fn is_out_of_fds(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE))
}

/// A spare fd, given up for a moment to refuse a client when no fd is left: without it the
/// pending connection would keep the (level-triggered) listener readable and the event loop
/// would spin on it.
static SPARE_FD: Mutex<Option<OwnedFd>> = Mutex::new(None);

/// Keep one fd in reserve for [`accept`] to refuse clients with when the process runs out of
/// fds. Called when a listener is opened (while fds are still to be had); idempotent.
pub fn reserve_spare_fd() {
    let mut spare = SPARE_FD.lock().unwrap_or_else(|p| p.into_inner());
    if spare.is_none() {
        *spare = std::fs::File::open("/dev/null").ok().map(OwnedFd::from);
    }
}

/// Out of fds with a connection pending on `listener`: free the spare, accept the connection
/// and close it at once with a reset, take the spare back.
fn refuse_one(listener: &SockRef<'_>) {
    let mut spare = SPARE_FD.lock().unwrap_or_else(|p| p.into_inner());
    if spare.take().is_none() {
        return;
    }
    // Blocking is fine: the connection is known to be pending, and it is closed right away.
    if let Ok((client, _)) = listener.accept4(libc::SOCK_CLOEXEC) {
        abort_on_close(&client);
    }
    *spare = std::fs::File::open("/dev/null").ok().map(OwnedFd::from);
}

/// The local (or with `peer` the remote) address of socket `fd`.
pub fn sockname(fd: RawFd, peer: bool) -> io::Result<SockAddr> {
    sys::with_fd(fd, |fd| {
        let sock = SockRef::from(&fd);
        let addr = if peer {
            sock.peer_addr()
        } else {
            sock.local_addr()
        };
        addr.map(SockAddr)
    })
}

/// Resolve a host and port; an empty host is any (server) or loopback (client).
pub fn resolve(host: &str, port: u16, server: bool) -> io::Result<SocketAddr> {
    if host.is_empty() {
        let ip = if server {
            Ipv4Addr::UNSPECIFIED
        } else {
            Ipv4Addr::LOCALHOST
        };
        return Ok(SocketAddr::new(IpAddr::V4(ip), port));
    }
    (host, port)
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| io::Error::from(io::ErrorKind::AddrNotAvailable))
}

/// A unix socket file we created: removed on drop if it is still the same inode.
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Ok(m) = std::fs::symlink_metadata(&self.path) {
            if m.dev() == self.dev && m.ino() == self.ino {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// Clear the way for binding `path`: a stale socket (nobody listening) is removed, a live one
/// or any other file is refused.
fn clear_stale_socket(path: &Path, addr: &SockAddr) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(m) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !m.file_type().is_socket() {
        return Err(io::Error::from_raw_os_error(libc::EADDRINUSE));
    }
    let probe = new_socket(libc::AF_UNIX)?;
    match connect(&probe, addr) {
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => std::fs::remove_file(path),
        _ => Err(io::Error::from_raw_os_error(libc::EADDRINUSE)),
    }
}

/// What failed while setting up a listener: the operation ("bind", ...) and the OS error.
pub type SetupError = (&'static str, io::Error);

/// A non-blocking listening socket on `addr`. `unix_file` is the filesystem path of a unix
/// address (not an abstract one): a stale socket file there is replaced, the new one gets mode
/// 0600, and the returned [`SocketFile`] removes it on drop. Inet listeners get SO_REUSEADDR.
/// `backlog` is the accept queue's length.
pub fn open_listener(
    addr: &SockAddr,
    unix_file: Option<&Path>,
    backlog: libc::c_int,
) -> std::result::Result<(OwnedFd, Option<SocketFile>), SetupError> {
    reserve_spare_fd();
    let sock = Socket::new(
        Domain::from(addr.family()),
        Type::STREAM.nonblocking().cloexec(),
        None,
    )
    .map_err(|e| ("create socket for", e))?;
    let file = match unix_file {
        Some(path) => {
            let bind_err = |e| ("bind", e);
            clear_stale_socket(path, addr).map_err(bind_err)?;
            // Linux gives the socket file the mode of the socket inode: set it before bind.
            rustix::fs::fchmod(&sock, Mode::from_raw_mode(SOCKET_FILE_MODE))
                .map_err(|e| bind_err(e.into()))?;
            sock.bind(&addr.0).map_err(bind_err)?;
            // Belt and braces where fchmod before bind is not honoured.
            std::fs::set_permissions(
                path,
                std::os::unix::fs::PermissionsExt::from_mode(SOCKET_FILE_MODE),
            )
            .map_err(bind_err)?;
            let m = std::fs::symlink_metadata(path).map_err(bind_err)?;
            Some(SocketFile {
                path: path.to_path_buf(),
                dev: m.dev(),
                ino: m.ino(),
            })
        }
        None => {
            if addr.family() != libc::AF_UNIX {
                sock.set_reuse_address(true).map_err(|e| ("bind", e))?;
            }
            sock.bind(&addr.0).map_err(|e| ("bind", e))?;
            None
        }
    };
    sock.listen(backlog).map_err(|e| ("listen on", e))?;
    Ok((sock.into(), file))
}

/// How this socket finds peers.
#[derive(Debug)]
enum Role {
    /// Accepts one client at a time.
    Server { listener: OwnedFd, wait: bool },
    /// Connects, and with a delay reconnects.
    Client(Client),
    /// An inherited connected socket: once it closes, it stays closed.
    Fixed,
}

#[derive(Debug)]
struct Client {
    addr: SockAddr,
    reconnect: Option<Duration>,
    backoff: Duration,
    failures: u32,
    timer: TimerFd,
    timer_armed: bool,
    connecting: Option<OwnedFd>,
}

/// The `socket` backend.
#[derive(Debug)]
pub struct SocketBackend {
    /// Declared first: unregisters before the listener, timer and connection close.
    fds: FdSet,
    id: String,
    role: Role,
    conn: Option<OwnedFd>,
    link: Link,
    nodelay: bool,
    desc: String,
    tcp: bool,
    _file: Option<SocketFile>,
}

impl SocketBackend {
    /// Set up the socket `spec` describes (bind and listen, or start connecting).
    pub fn open(id: &str, spec: &SocketSpec) -> Result<Self> {
        let mut b = SocketBackend {
            fds: FdSet::new(),
            id: id.to_string(),
            role: Role::Fixed,
            conn: None,
            link: Link::new(spec.backlog, DEFAULT_OUTBUF_SIZE),
            nodelay: spec.nodelay,
            desc: String::new(),
            tcp: false,
            _file: None,
        };
        let (addr, desc) = match &spec.addr {
            SocketAddrSpec::Unix { path, abstract_ns } => {
                let shown = if *abstract_ns {
                    format!("unix:@{}", path.display())
                } else {
                    format!("unix:{}", path.display())
                };
                let a = SockAddr::unix(path, *abstract_ns)
                    .map_err(|e| Error::io(id, "use socket path", path.display().to_string(), e))?;
                (a, shown)
            }
            SocketAddrSpec::Tcp { host, port } => {
                b.tcp = true;
                let sa = resolve(host, *port, spec.server)
                    .map_err(|e| Error::io(id, "resolve", format!("{host}:{port}"), e))?;
                (SockAddr::inet(&sa), format!("tcp:{sa}"))
            }
            SocketAddrSpec::Fd(n) => {
                b.adopt_fd(*n, spec.wait)?;
                return Ok(b);
            }
            SocketAddrSpec::FdName(_) => {
                return Err(Error::Unsupported {
                    id: id.to_string(),
                    reason: "a named fd must be resolved by the monitor first",
                });
            }
        };
        if spec.server {
            b.listen_on(&addr, &spec.addr, &desc, spec.wait)?;
            b.desc = format!("{},server=on", b.local_desc(&desc));
        } else {
            let reconnect =
                (spec.reconnect_ms > 0).then(|| Duration::from_millis(spec.reconnect_ms));
            let timer = TimerFd::new()
                .map_err(|e| Error::io(id, "create timer for", desc.clone(), e.into()))?;
            b.desc = desc.clone();
            b.role = Role::Client(Client {
                addr,
                reconnect,
                backoff: reconnect.unwrap_or_default(),
                failures: 0,
                timer,
                timer_armed: false,
                connecting: None,
            });
            if let Err(e) = b.start_connect() {
                if reconnect.is_none() {
                    return Err(Error::io(id, "connect to", desc, e));
                }
                b.connect_failed(e);
            }
        }
        Ok(b)
    }

    fn listen_on(
        &mut self,
        addr: &SockAddr,
        spec: &SocketAddrSpec,
        desc: &str,
        wait: bool,
    ) -> Result<()> {
        let unix_file = match spec {
            SocketAddrSpec::Unix {
                path,
                abstract_ns: false,
            } => Some(path.as_path()),
            _ => None,
        };
        let (fd, file) = open_listener(addr, unix_file, LISTEN_BACKLOG)
            .map_err(|(op, e)| Error::io(&self.id, op, desc.to_string(), e))?;
        self._file = file;
        self.role = Role::Server { listener: fd, wait };
        Ok(())
    }

    /// `desc` with the port the kernel picked (for `port=0`).
    fn local_desc(&self, desc: &str) -> String {
        match (self.tcp, self.local_addr()) {
            (true, Some(a)) => format!("tcp:{a}"),
            _ => desc.to_string(),
        }
    }

    /// Take over inherited fd `n`: a listening socket becomes a server, a connected one the
    /// peer.
    fn adopt_fd(&mut self, n: RawFd, wait: bool) -> Result<()> {
        let id = self.id.clone();
        let target = format!("fd {n}");
        let err = |op, e| Error::io(&id, op, target.clone(), e);
        if n < 0 || sys::get_fl(n).is_err() {
            return Err(err("use", io::Error::from_raw_os_error(libc::EBADF)));
        }
        if sys::fd_kind(n).map_err(|e| err("use", e))? != FdKind::Socket
            || sys::with_fd(n, |fd| SockRef::from(&fd).r#type()).map_err(|e| err("use", e))?
                != Type::STREAM
        {
            return Err(Error::Unsupported {
                id,
                reason: "fd is not a stream socket",
            });
        }
        // SAFETY: the fd is open (F_GETFL succeeded) and was handed to us on the command line
        // to own: nothing else in the process uses it.
        let fd = unsafe { OwnedFd::from_raw_fd(n) };
        let sock = SockRef::from(&fd);
        sock.set_nonblocking(true).map_err(|e| err("use", e))?;
        sock.set_cloexec(true).map_err(|e| err("use", e))?;
        let listening = sock.is_listener().map_err(|e| err("use", e))?;
        self.tcp = sockname(n, false)
            .map(|a| a.to_inet().is_some())
            .unwrap_or(false);
        if listening {
            self.role = Role::Server { listener: fd, wait };
            self.desc = format!("fd:{n},server=on");
        } else {
            self.role = Role::Fixed;
            self.desc = format!("fd:{n}");
            self.connected(fd);
        }
        Ok(())
    }

    /// The local address of a tcp listener (the port for `port=0`).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        let fd = match &self.role {
            Role::Server { listener, .. } => listener.as_raw_fd(),
            _ => self.conn.as_ref()?.as_raw_fd(),
        };
        sockname(fd, false).ok()?.to_inet()
    }

    fn connected(&mut self, fd: OwnedFd) {
        if self.tcp && self.nodelay {
            let _ = SockRef::from(&fd).set_tcp_nodelay(true);
        }
        match self.link.attach(fd.as_raw_fd()) {
            Ok(()) => {
                self.conn = Some(fd);
                if let Role::Client(c) = &mut self.role {
                    if c.failures > 0 {
                        log::info!("chardev '{}': connected to {}", self.id, self.desc);
                    }
                    c.failures = 0;
                    c.backoff = c.reconnect.unwrap_or_default();
                }
                // The peer may already be gone (the backlog flush failed).
                self.after_io();
            }
            Err(e) => log::warn!("chardev '{}': cannot use connection: {e}", self.id),
        }
    }

    /// After any I/O: if the link lost its peer, close the connection and look for the next.
    fn after_io(&mut self) {
        if !self.link.take_lost() {
            return;
        }
        if let Some(conn) = self.conn.take() {
            self.fds.close(conn.as_raw_fd());
        }
        log::debug!("chardev '{}': peer disconnected", self.id);
        if let Role::Client(c) = &mut self.role {
            if let Some(delay) = c.reconnect {
                c.backoff = delay;
                arm(c, delay);
            }
        }
    }

    fn start_connect(&mut self) -> io::Result<()> {
        let Role::Client(c) = &mut self.role else {
            return Ok(());
        };
        let fd = new_socket(c.addr.family())?;
        if connect(&fd, &c.addr)? {
            self.connected(fd);
        } else {
            c.connecting = Some(fd);
        }
        Ok(())
    }

    fn connect_failed(&mut self, e: io::Error) {
        let Role::Client(c) = &mut self.role else {
            return;
        };
        if let Some(fd) = c.connecting.take() {
            self.fds.close(fd.as_raw_fd());
        }
        c.failures += 1;
        if c.failures == 1 {
            log::warn!(
                "chardev '{}': cannot connect to {}: {e}",
                self.id,
                self.desc
            );
        } else {
            log::debug!(
                "chardev '{}': reconnect to {} failed: {e}",
                self.id,
                self.desc
            );
        }
        if let Some(base) = c.reconnect {
            let delay = c.backoff;
            c.backoff = (c.backoff * 2).min(MAX_RECONNECT_BACKOFF.max(base));
            arm(c, delay);
        }
    }

    fn finish_connect(&mut self) {
        let Role::Client(c) = &mut self.role else {
            return;
        };
        let Some(fd) = c.connecting.take() else {
            return;
        };
        let error = match SockRef::from(&fd).take_error() {
            Ok(None) => return self.connected(fd),
            Ok(Some(e)) | Err(e) => e,
        };
        self.fds.close(fd.as_raw_fd());
        drop(fd);
        self.connect_failed(error);
    }

    fn accept_client(&mut self) {
        let Role::Server { listener, .. } = &self.role else {
            return;
        };
        match accept(listener) {
            Ok(Some(fd)) => self.connected(fd),
            Ok(None) => {}
            Err(e) => log::warn!("chardev '{}': accept failed: {e}", self.id),
        }
    }
}

impl SocketBackend {
    fn wanted_fds(&self) -> Vec<(RawFd, Interest)> {
        if self.conn.is_some() {
            return self.link.wanted_fds();
        }
        match &self.role {
            Role::Server { listener, .. } => vec![(listener.as_raw_fd(), Interest::READ)],
            Role::Client(c) => {
                let mut v = Vec::new();
                if let Some(fd) = &c.connecting {
                    v.push((fd.as_raw_fd(), Interest::WRITE));
                }
                if c.timer_armed {
                    v.push((c.timer.as_raw_fd(), Interest::READ));
                }
                v
            }
            Role::Fixed => Vec::new(),
        }
    }

    /// Register what the socket wants now (a listener, a connecting socket, a timer or the
    /// connection: at most two fds).
    fn update_fds(&mut self) {
        let wanted = self.wanted_fds();
        self.fds.sync(&wanted);
    }

    fn handle_ready(&mut self, fd: RawFd, readiness: Readiness) {
        if let Some(conn) = &self.conn {
            if conn.as_raw_fd() == fd {
                self.link.on_ready(fd, readiness);
                self.after_io();
                return;
            }
        }
        match &mut self.role {
            Role::Server { listener, .. } if listener.as_raw_fd() == fd && self.conn.is_none() => {
                self.accept_client();
            }
            Role::Client(c) if c.connecting.as_ref().map(AsRawFd::as_raw_fd) == Some(fd) => {
                self.finish_connect();
            }
            Role::Client(c) if c.timer.as_raw_fd() == fd => {
                let _ = c.timer.wait();
                c.timer_armed = false;
                if self.conn.is_none() && c.connecting.is_none() {
                    if let Err(e) = self.start_connect() {
                        self.connect_failed(e);
                    }
                }
            }
            _ => {}
        }
    }
}

fn arm(c: &mut Client, delay: Duration) {
    // A zero duration would disarm the timer.
    let delay = delay.max(Duration::from_millis(1));
    match c.timer.reset(delay, None) {
        Ok(()) => c.timer_armed = true,
        Err(e) => log::warn!("chardev: cannot arm reconnect timer: {e}"),
    }
}

impl Backend for SocketBackend {
    fn kind(&self) -> &'static str {
        "socket"
    }

    fn filename(&self) -> String {
        let peer = self
            .conn
            .as_ref()
            .and_then(|c| sockname(c.as_raw_fd(), true).ok())
            .and_then(SockAddr::to_inet);
        match (&self.role, self.conn.is_some(), peer) {
            (Role::Server { .. }, true, Some(p)) => format!("{} <-> {p}", self.desc),
            (Role::Server { .. }, _, _) => self.desc.clone(),
            (_, true, _) => self.desc.clone(),
            (_, false, _) => format!("disconnected:{}", self.desc),
        }
    }

    fn attach(&mut self, reg: Registrar) {
        self.fds.attach(reg);
        self.update_fds();
    }

    fn detach(&mut self) {
        self.fds.detach();
    }

    fn on_ready(&mut self, token: Token, readiness: Readiness) {
        if let Some(fd) = self.fds.fd_of(token) {
            self.handle_ready(fd, readiness);
            self.update_fds();
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.link.read(buf);
        self.after_io();
        self.update_fds();
        Ok(n)
    }

    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = self.link.write(data);
        self.after_io();
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

    fn dropped_bytes(&self) -> u64 {
        self.link.dropped()
    }

    fn take_unsent(&mut self) -> Vec<u8> {
        self.link.take_unsent()
    }

    fn wait_for_client(&mut self, timeout: Option<Duration>) -> io::Result<bool> {
        let Role::Server { listener, wait } = &self.role else {
            return Ok(true);
        };
        if !*wait || self.conn.is_some() {
            return Ok(true);
        }
        let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as libc::c_int);
        log::info!(
            "chardev '{}': waiting for a connection on {}",
            self.id,
            self.desc
        );
        let revents = sys::poll_one(listener.as_raw_fd(), libc::POLLIN, ms)?;
        if revents & libc::POLLIN != 0 {
            self.accept_client();
            self.update_fds();
        }
        Ok(self.conn.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{
        getsockopt_int, pump, read_n, wait_closed, wait_event, watched, DEADLINE,
    };
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::io::IntoRawFd;
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::time::Instant;

    fn unix_spec(path: &Path, server: bool, wait: bool, backlog: usize) -> SocketSpec {
        SocketSpec {
            addr: SocketAddrSpec::Unix {
                path: path.into(),
                abstract_ns: false,
            },
            server,
            wait,
            nodelay: false,
            reconnect_ms: 0,
            backlog,
        }
    }

    fn read_stream(s: &mut impl Read, n: usize) -> Vec<u8> {
        let mut got = vec![0u8; n];
        s.read_exact(&mut got).unwrap();
        got
    }

    fn blocking_unix(path: &Path) -> UnixStream {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        s
    }

    #[test]
    fn unix_server_wait_both_ways_mode_and_cleanup() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let mut b = SocketBackend::open("c0", &unix_spec(&path, true, true, 64)).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(b.filename(), format!("unix:{},server=on", path.display()));
        // Nobody there yet: the wait times out.
        assert!(!b.wait_for_client(Some(Duration::from_millis(20))).unwrap());
        let mut c = blocking_unix(&path);
        assert!(b.wait_for_client(Some(DEADLINE)).unwrap());
        assert!(b.is_connected());
        assert_eq!(b.take_events(), vec![Event::Opened]);
        assert_eq!(b.write(b"hello client").unwrap(), 12);
        assert_eq!(read_stream(&mut c, 12), b"hello client");
        c.write_all(b"hello guest").unwrap();
        assert_eq!(read_n(&mut b, 11), b"hello guest");
        drop(c);
        wait_closed(&mut b);
        assert!(!b.is_connected());
        drop(b);
        assert!(!path.exists(), "socket file left behind");
    }

    #[test]
    fn second_client_waits_in_backlog_then_is_served() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let mut b = SocketBackend::open("c0", &unix_spec(&path, true, false, 64)).unwrap();
        let mut first = blocking_unix(&path);
        wait_event(&mut b, |e| *e == Event::Opened);
        // The second connect succeeds into the listen backlog but is not accepted.
        let mut second = blocking_unix(&path);
        second.write_all(b"from second").unwrap();
        for _ in 0..10 {
            pump(&mut b, 5);
        }
        assert!(!b.take_events().contains(&Event::Opened));
        first.write_all(b"from first").unwrap();
        assert_eq!(read_n(&mut b, 10), b"from first");
        b.write(b"only first").unwrap();
        assert_eq!(read_stream(&mut first, 10), b"only first");
        drop(first);
        wait_closed(&mut b);
        wait_event(&mut b, |e| *e == Event::Opened);
        assert_eq!(read_n(&mut b, 11), b"from second");
        b.write(b"now second").unwrap();
        assert_eq!(read_stream(&mut second, 10), b"now second");
    }

    #[test]
    fn replay_ring_replays_newest_and_counts_drops() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let mut b = SocketBackend::open("c0", &unix_spec(&path, true, false, 8)).unwrap();
        assert_eq!(b.write(b"0123456789abcdef").unwrap(), 16);
        assert_eq!(b.dropped_bytes(), 8);
        let mut c = blocking_unix(&path);
        wait_event(&mut b, |e| *e == Event::Opened);
        assert_eq!(read_stream(&mut c, 8), b"89abcdef");
        b.write(b"!").unwrap();
        assert_eq!(read_stream(&mut c, 1), b"!");
        assert_eq!(b.dropped_bytes(), 8);
        drop(c);
        wait_closed(&mut b);
        // backlog=0 drops while disconnected.
        let path0 = dir.path().join("z.sock");
        let mut z = SocketBackend::open("c1", &unix_spec(&path0, true, false, 0)).unwrap();
        z.write(b"lost").unwrap();
        assert_eq!(z.dropped_bytes(), 4);
        let mut c = blocking_unix(&path0);
        wait_event(&mut z, |e| *e == Event::Opened);
        z.write(b"kept").unwrap();
        assert_eq!(read_stream(&mut c, 4), b"kept");
    }

    #[test]
    fn input_a_peer_sent_before_hanging_up_waits_for_a_busy_frontend() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let mut b = SocketBackend::open("c0", &unix_spec(&path, true, false, 64)).unwrap();
        let mut c = blocking_unix(&path);
        wait_event(&mut b, |e| *e == Event::Opened);
        // The frontend is full (a UART's FIFO) and has output the peer does not read: the
        // peer sends its last bytes and leaves; minivmm's next write fails.
        b.set_input_wanted(false);
        let big = vec![b'x'; 1 << 20];
        let mut queued = 0;
        while queued < big.len() {
            let n = b.write(&big[queued..]).unwrap();
            if n == 0 {
                break;
            }
            queued += n;
        }
        c.write_all(b"last words").unwrap();
        c.shutdown(std::net::Shutdown::Both).unwrap();
        drop(c);
        for _ in 0..10 {
            pump(&mut b, 5);
        }
        assert!(b.is_connected(), "dropped with input left");
        assert!(
            watched(&mut b).is_empty(),
            "a hung-up fd must not be watched"
        );
        // Output from now on waits for the next peer.
        assert_eq!(b.write(b"later").unwrap(), 5);
        // Room again: the bytes arrive, then the end.
        b.set_input_wanted(true);
        assert_eq!(read_n(&mut b, 10), b"last words");
        wait_closed(&mut b);
        assert!(!b.is_connected());
        // A peer that leaves with nothing unread is gone at once, busy frontend or not.
        let c = blocking_unix(&path);
        wait_event(&mut b, |e| *e == Event::Opened);
        b.set_input_wanted(false);
        drop(c);
        wait_closed(&mut b);
    }

    #[test]
    fn client_connects_and_reconnects_quietly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("srv.sock");
        let mut spec = unix_spec(&path, false, false, 64);
        // Without reconnect, a missing server is an error naming the address.
        let e = SocketBackend::open("c0", &spec).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("chardev 'c0': cannot connect to 'unix:{}'", path.display())
        );
        spec.reconnect_ms = 10;
        let mut b = SocketBackend::open("c0", &spec).unwrap();
        assert!(!b.is_connected());
        assert!(b.filename().starts_with("disconnected:unix:"));
        b.write(b"early").unwrap();
        for _ in 0..5 {
            pump(&mut b, 5);
        }
        let listener = UnixListener::bind(&path).unwrap();
        wait_event(&mut b, |e| *e == Event::Opened);
        let (mut conn, _) = listener.accept().unwrap();
        conn.set_read_timeout(Some(DEADLINE)).unwrap();
        assert_eq!(
            read_stream(&mut conn, 5),
            b"early",
            "backlog replayed to the server"
        );
        drop(conn);
        wait_closed(&mut b);
        b.write(b"between").unwrap();
        wait_event(&mut b, |e| *e == Event::Opened);
        let (mut conn, _) = listener.accept().unwrap();
        conn.set_read_timeout(Some(DEADLINE)).unwrap();
        assert_eq!(read_stream(&mut conn, 7), b"between");
        conn.write_all(b"pong").unwrap();
        assert_eq!(read_n(&mut b, 4), b"pong");
    }

    #[test]
    fn reconnect_backs_off() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("never.sock");
        let mut spec = unix_spec(&path, false, false, 64);
        spec.reconnect_ms = 1;
        let mut b = SocketBackend::open("c0", &spec).unwrap();
        let end = Instant::now() + Duration::from_millis(100);
        while Instant::now() < end {
            pump(&mut b, 5);
        }
        let Role::Client(c) = &b.role else {
            panic!("not a client")
        };
        // Delays of 1, 2, 4, ... ms: a handful of attempts in 100 ms, never a tight loop, and the
        // next delay is the doubled one.
        assert!((1..=12).contains(&c.failures), "{} attempts", c.failures);
        assert_eq!(c.backoff, Duration::from_millis(1 << c.failures));
    }

    #[test]
    fn inherited_listening_and_connected_fds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("inh.sock");
        let fd = UnixListener::bind(&path).unwrap().into_raw_fd();
        let spec = SocketSpec {
            addr: SocketAddrSpec::Fd(fd),
            server: true,
            wait: true,
            nodelay: false,
            reconnect_ms: 0,
            backlog: 64,
        };
        let mut b = SocketBackend::open("mon", &spec).unwrap();
        assert_eq!(b.filename(), format!("fd:{fd},server=on"));
        let mut c = blocking_unix(&path);
        assert!(b.wait_for_client(Some(DEADLINE)).unwrap());
        b.write(b"greeting").unwrap();
        assert_eq!(read_stream(&mut c, 8), b"greeting");
        drop(b);
        // We owned the fd: it is closed now.
        assert!(sys::get_fl(fd).is_err());

        let (mine, mut theirs) = UnixStream::pair().unwrap();
        theirs.set_read_timeout(Some(DEADLINE)).unwrap();
        let fd = mine.into_raw_fd();
        let spec = SocketSpec {
            addr: SocketAddrSpec::Fd(fd),
            server: false,
            wait: false,
            nodelay: false,
            reconnect_ms: 0,
            backlog: 64,
        };
        let mut b = SocketBackend::open("c", &spec).unwrap();
        assert!(b.is_connected());
        b.write(b"pair").unwrap();
        assert_eq!(read_stream(&mut theirs, 4), b"pair");
        theirs.write_all(b"back").unwrap();
        assert_eq!(read_n(&mut b, 4), b"back");

        let f = tempfile::tempfile().unwrap();
        let spec = SocketSpec {
            addr: SocketAddrSpec::Fd(f.as_raw_fd()),
            ..spec
        };
        let e = SocketBackend::open("c", &spec).unwrap_err();
        assert_eq!(e.to_string(), "chardev 'c': fd is not a stream socket");
    }

    #[test]
    fn tcp_server_and_client_on_loopback() {
        let spec = SocketSpec {
            addr: SocketAddrSpec::Tcp {
                host: "127.0.0.1".into(),
                port: 0,
            },
            server: true,
            wait: false,
            nodelay: true,
            reconnect_ms: 0,
            backlog: 64,
        };
        let mut b = SocketBackend::open("t", &spec).unwrap();
        let addr = b.local_addr().unwrap();
        assert_eq!(b.filename(), format!("tcp:{addr},server=on"));
        let mut c = TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(DEADLINE)).unwrap();
        wait_event(&mut b, |e| *e == Event::Opened);
        assert!(b.filename().contains(" <-> 127.0.0.1:"));
        let conn = b.conn.as_ref().unwrap().as_raw_fd();
        assert_eq!(
            getsockopt_int(conn, libc::IPPROTO_TCP, libc::TCP_NODELAY).unwrap(),
            1
        );
        c.write_all(b"over tcp").unwrap();
        assert_eq!(read_n(&mut b, 8), b"over tcp");
        b.write(b"and back").unwrap();
        assert_eq!(read_stream(&mut c, 8), b"and back");

        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let spec = SocketSpec {
            addr: SocketAddrSpec::Tcp {
                host: "127.0.0.1".into(),
                port: l.local_addr().unwrap().port(),
            },
            server: false,
            ..spec
        };
        let mut b = SocketBackend::open("t", &spec).unwrap();
        b.write(b"hi server").unwrap();
        let (mut s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        wait_event(&mut b, |e| *e == Event::Opened);
        assert_eq!(read_stream(&mut s, 9), b"hi server");
    }

    #[test]
    fn stale_socket_replaced_live_one_refused_abstract_has_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let b = SocketBackend::open("a", &unix_spec(&path, true, false, 64)).unwrap();
        let e = SocketBackend::open("b", &unix_spec(&path, true, false, 64)).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("chardev 'b': cannot bind 'unix:{}'", path.display())
        );
        drop(b);
        assert!(!path.exists());
        std::fs::write(&path, b"not a socket").unwrap();
        assert!(SocketBackend::open("c", &unix_spec(&path, true, false, 64)).is_err());
        assert!(path.exists(), "a regular file must not be removed");

        let name = format!("minivmm-test-{}", std::process::id());
        let spec = SocketSpec {
            addr: SocketAddrSpec::Unix {
                path: name.clone().into(),
                abstract_ns: true,
            },
            ..unix_spec(&path, true, false, 64)
        };
        let mut b = SocketBackend::open("abs", &spec).unwrap();
        assert_eq!(b.filename(), format!("unix:@{name},server=on"));
        let addr = SockAddr::unix(Path::new(&name), true).unwrap();
        let c = new_socket(libc::AF_UNIX).unwrap();
        let _ = connect(&c, &addr);
        wait_event(&mut b, |e| *e == Event::Opened);
    }

    /// 16 MiB through a client that reads slowly: the frontend only writes what the backend
    /// accepts and waits for `Writable`; every byte must arrive, in order.
    #[test]
    fn backpressure_16mib_slow_reader_no_loss() {
        const TOTAL: usize = 16 << 20;
        const OFFER: usize = 8192;
        const SLOW_READ: usize = 3000;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bp.sock");
        let mut b = SocketBackend::open("bp", &unix_spec(&path, true, false, 64)).unwrap();
        let mut c = UnixStream::connect(&path).unwrap();
        c.set_nonblocking(true).unwrap();
        wait_event(&mut b, |e| *e == Event::Opened);
        let data = crate::testutil::pseudo_random(TOTAL, 0);
        let mut sent = 0;
        let mut got = Vec::with_capacity(TOTAL);
        let mut blocked = false;
        let mut stalls = 0;
        let mut buf = vec![0u8; SLOW_READ];
        let poller = crate::Poller::new().unwrap();
        b.attach(poller.registrar(0));
        poller
            .registrar(1)
            .add(c.as_raw_fd(), Interest::READ)
            .unwrap();
        let mut ready = Vec::new();
        let end = Instant::now() + Duration::from_secs(60);
        while got.len() < TOTAL {
            assert!(Instant::now() < end, "stuck at {} of {TOTAL}", got.len());
            if !blocked && sent < TOTAL {
                let chunk = &data[sent..(sent + OFFER).min(TOTAL)];
                let n = b.write(chunk).unwrap();
                sent += n;
                if n < chunk.len() {
                    blocked = true;
                    stalls += 1;
                }
            }
            // The event loop, with the slow reader's fd alongside (owner 1).
            ready.clear();
            poller.wait(&mut ready, 16, 100).unwrap();
            for ev in ready.iter().filter(|ev| ev.owner == 0) {
                b.on_ready(ev.token, ev.readiness);
            }
            for ev in b.take_events() {
                assert_ne!(ev, Event::Closed);
                if ev == Event::Writable {
                    blocked = false;
                }
            }
            if ready.iter().any(|ev| ev.owner == 1) {
                match c.read(&mut buf) {
                    Ok(n) => {
                        let at = got.len();
                        assert!(
                            n <= TOTAL - at && buf[..n] == data[at..at + n],
                            "bytes lost or reordered at offset {at}"
                        );
                        got.extend_from_slice(&buf[..n]);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("{e}"),
                }
            }
        }
        assert!(stalls > 0, "the reader was never slow enough to push back");
        assert_eq!(b.dropped_bytes(), 0);
        assert!(got == data, "bytes lost or reordered");
    }
}
