//! The QMP unix-socket server: several clients at once, each with its own negotiation state
//! and event stream, driven by the VMM's event loop.
//!
//! The server is sans-event-loop like a chardev backend: once attached to a registrar
//! ([`QmpServer::attach`]) it registers its listener and clients itself, with the interest each
//! needs, and [`QmpServer::on_ready`] does the I/O for a token. All fds are non-blocking;
//! nothing here blocks except [`QmpServer::flush_blocking`], meant for the way out.
//!
//! Memory stays bounded per client: input is read only while the client's pending output is
//! below a high-water mark (a client that sends commands but never reads its answers stops
//! being read), and a client whose output still exceeds the hard limit (events pile up) is
//! disconnected. Fds passed with SCM_RIGHTS wait, a bounded number of them, for `getfd`.
//!
//! The socket file is created mode 0600 and removed on drop if it is still ours.

use std::collections::VecDeque;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chardev::{FdSet, Interest, Readiness, Registrar, Token};
use serde_json::Value;
use thiserror::Error;

use crate::commands::{self, Context};
use crate::events::EventQueue;
use crate::fdstore::FdStore;
use crate::machine::Machine;
use crate::protocol::{self, Incoming, QmpError, QmpEvent, Request, Session};
use crate::sys;

/// Mode of the socket file.
pub const SOCKET_MODE: u32 = 0o600;
/// Bytes read from a client per `recvmsg`.
pub const READ_CHUNK: usize = 4096;
/// Reads per client per wakeup, so one busy client cannot starve the others.
pub const READS_PER_WAKEUP: usize = 16;
/// Passed fds kept per client while waiting for `getfd` (the oldest are closed beyond).
pub const MAX_PENDING_FDS: usize = 16;

/// Resource bounds of a monitor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest incoming message.
    pub max_message: usize,
    /// Pending output above which a client's input is no longer read.
    pub output_high_water: usize,
    /// Pending output above which a client is disconnected.
    pub max_output: usize,
    /// Most clients of one server at a time; more are accepted and closed at once.
    pub max_clients: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message: protocol::DEFAULT_MAX_MESSAGE,
            output_high_water: 256 << 10,
            max_output: 4 << 20,
            max_clients: 64,
        }
    }
}

/// Setting up the server failed.
#[derive(Debug, Error)]
pub enum ServerError {
    /// Another live process listens on the path.
    #[error("monitor socket '{0}' is in use by another process")]
    InUse(PathBuf),
    /// Something that is not a socket is in the way.
    #[error("monitor socket path '{0}' exists and is not a socket")]
    NotASocket(PathBuf),
    /// An OS call failed.
    #[error("cannot {op} monitor socket '{path}'")]
    Io {
        /// What we tried.
        op: &'static str,
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// Pending output of one connection.
#[derive(Debug, Default)]
pub(crate) struct OutBuf {
    data: Vec<u8>,
    start: usize,
}

impl OutBuf {
    pub(crate) fn len(&self) -> usize {
        self.data.len() - self.start
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start == self.data.len() {
            self.data.clear();
            self.start = 0;
        }
        self.data.extend_from_slice(bytes);
    }

    pub(crate) fn pending(&self) -> &[u8] {
        &self.data[self.start..]
    }

    pub(crate) fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.data.len());
        if self.start == self.data.len() {
            self.data.clear();
            self.start = 0;
        } else if self.start > self.data.len() / 2 {
            self.data.drain(..self.start);
            self.start = 0;
        }
    }

    pub(crate) fn clear(&mut self) {
        self.data.clear();
        self.start = 0;
    }
}

/// Run one request on the machine and collect the events it caused.
pub(crate) fn run_request(
    machine: &mut dyn Machine,
    fds: &FdStore,
    events: &EventQueue,
    passed: &mut VecDeque<OwnedFd>,
    req: &Request,
) -> (Result<Value, QmpError>, Vec<QmpEvent>) {
    let mut ctx = Context {
        machine,
        fds,
        passed_fds: passed,
    };
    let result = commands::execute(&mut ctx, &req.execute, &req.arguments);
    (result, events.drain())
}

struct Client {
    stream: UnixStream,
    session: Session,
    out: OutBuf,
    passed: VecDeque<OwnedFd>,
    /// The peer closed its side: answer what is pending, then drop it.
    eof: bool,
    /// Drop at the next reap.
    dead: bool,
}

impl Client {
    fn fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    fn flush(&mut self) {
        while !self.out.is_empty() {
            match sys::send_nosignal(self.fd(), self.out.pending()) {
                Ok(0) => break,
                Ok(n) => self.out.consume(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    log::debug!("monitor client: write: {e}");
                    self.dead = true;
                    self.out.clear();
                    break;
                }
            }
        }
    }

    fn push(&mut self, line: &str) {
        if !self.dead {
            self.out.push(line.as_bytes());
        }
    }
}

/// A QMP server on a unix socket.
pub struct QmpServer {
    /// The listener's and the clients' registrations. Declared first: it unregisters what is
    /// left before the sockets close.
    registered: FdSet,
    listener: UnixListener,
    path: PathBuf,
    file_id: Option<(u64, u64)>,
    clients: Vec<Client>,
    fds: FdStore,
    events: EventQueue,
    limits: Limits,
}

impl std::fmt::Debug for QmpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QmpServer")
            .field("path", &self.path)
            .field("clients", &self.clients.len())
            .finish()
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ServerError + 'a {
    move |source| ServerError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

impl QmpServer {
    /// Listen on `path` (mode 0600). A stale socket file nobody listens on is replaced; a
    /// live one is refused. Named fds go to `fds`; events of commands are drained from
    /// `events`.
    pub fn bind(
        path: &Path,
        fds: FdStore,
        events: EventQueue,
        limits: Limits,
    ) -> Result<Self, ServerError> {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(ServerError::NotASocket(path.to_path_buf()));
            }
            match UnixStream::connect(path) {
                Ok(_) => return Err(ServerError::InUse(path.to_path_buf())),
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    std::fs::remove_file(path).map_err(io_err("replace stale", path))?;
                }
                Err(e) => return Err(io_err("check", path)(e)),
            }
        }
        let listener = UnixListener::bind(path).map_err(io_err("bind", path))?;
        // The runtime directory (0700) is the real guard; this closes the file itself too.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))
            .map_err(io_err("set the mode of", path))?;
        listener
            .set_nonblocking(true)
            .map_err(io_err("set up", path))?;
        let file_id = std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()));
        let mut registered = FdSet::new();
        registered.set(listener.as_raw_fd(), Interest::READ);
        Ok(QmpServer {
            registered,
            listener,
            path: path.to_path_buf(),
            file_id,
            clients: Vec::new(),
            fds,
            events,
            limits,
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Connected clients.
    pub fn client_count(&self) -> usize {
        self.clients.len()
    }

    /// Register the listener and the clients with `reg` from now on (the listener for
    /// reading; a client for reading while it may send commands, for writing while replies
    /// wait).
    pub fn attach(&mut self, reg: Registrar) {
        self.registered.attach(reg);
    }

    /// What client `c` is watched for.
    fn client_interest(&self, c: &Client) -> Interest {
        Interest {
            read: !c.eof && c.out.len() <= self.limits.output_high_water,
            write: !c.out.is_empty(),
        }
    }

    /// Re-register every client after something touched them all (at most `max_clients`).
    fn update_clients(&mut self) {
        for i in 0..self.clients.len() {
            let interest = self.client_interest(&self.clients[i]);
            self.registered.set(self.clients[i].fd(), interest);
        }
    }

    /// The event loop saw `readiness` on the fd registered with `token`. Commands run on
    /// `machine`. Returns the events that the commands caused (already sent to this server's
    /// clients), for the caller to pass to its other monitors.
    pub fn on_ready(
        &mut self,
        token: Token,
        readiness: Readiness,
        machine: &mut dyn Machine,
    ) -> Vec<QmpEvent> {
        let mut emitted = Vec::new();
        let Some(fd) = self.registered.fd_of(token) else {
            return emitted;
        };
        if fd == self.listener.as_raw_fd() {
            self.accept();
            self.update_clients();
            return emitted;
        }
        let Some(i) = self.clients.iter().position(|c| c.fd() == fd) else {
            return emitted;
        };
        if readiness.writable {
            self.clients[i].flush();
        }
        if readiness.readable || readiness.hangup {
            self.read_client(i, machine, &mut emitted);
        }
        self.clients[i].flush();
        self.reap();
        self.update_clients();
        emitted
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.clients.len() >= self.limits.max_clients {
                        log::warn!(
                            "monitor {}: too many clients (max {}), refusing one",
                            self.path.display(),
                            self.limits.max_clients
                        );
                        continue;
                    }
                    if let Err(e) = stream.set_nonblocking(true) {
                        log::warn!("monitor client: {e}");
                        continue;
                    }
                    let mut c = Client {
                        stream,
                        session: Session::new(self.limits.max_message),
                        out: OutBuf::default(),
                        passed: VecDeque::new(),
                        eof: false,
                        dead: false,
                    };
                    c.push(&protocol::greeting());
                    c.flush();
                    self.clients.push(c);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    log::warn!("monitor {}: accept: {e}", self.path.display());
                    break;
                }
            }
        }
    }

    fn read_client(&mut self, i: usize, machine: &mut dyn Machine, emitted: &mut Vec<QmpEvent>) {
        let mut buf = [0u8; READ_CHUNK];
        for _ in 0..READS_PER_WAKEUP {
            let c = &mut self.clients[i];
            if c.eof || c.dead || c.out.len() > self.limits.output_high_water {
                break;
            }
            let mut new_fds = Vec::new();
            let n = match sys::recv_with_fds(c.fd(), &mut buf, &mut new_fds) {
                Ok(0) => {
                    c.eof = true;
                    break;
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    log::debug!("monitor client: read: {e}");
                    c.dead = true;
                    break;
                }
            };
            for fd in new_fds {
                if c.passed.len() >= MAX_PENDING_FDS {
                    c.passed.pop_front();
                }
                c.passed.push_back(fd);
            }
            let incoming = c.session.feed(&buf[..n]);
            for item in incoming {
                match item {
                    Incoming::Reply(line) => self.clients[i].push(&line),
                    Incoming::Execute(req) => {
                        let mut passed = std::mem::take(&mut self.clients[i].passed);
                        let (result, events) =
                            run_request(machine, &self.fds, &self.events, &mut passed, &req);
                        self.clients[i].passed = passed;
                        for ev in &events {
                            self.send_event(ev);
                        }
                        emitted.extend(events);
                        let c = &mut self.clients[i];
                        let line = c.session.answer(req.id.as_ref(), &result);
                        c.push(&line);
                    }
                }
            }
            self.clients[i].flush();
        }
    }

    /// Drop clients that are gone, done, or over their output limit.
    fn reap(&mut self) {
        let max = self.limits.max_output;
        let path = &self.path;
        let registered = &mut self.registered;
        self.clients.retain(|c| {
            let keep = Self::keep_client(c, max, path);
            if !keep {
                // Unregistered while still open: it closes when dropped.
                registered.close(c.fd());
            }
            keep
        });
    }

    fn keep_client(c: &Client, max: usize, path: &Path) -> bool {
        if c.out.len() > max {
            log::warn!(
                "monitor {}: disconnecting a client that does not read ({} bytes pending)",
                path.display(),
                c.out.len()
            );
            return false;
        }
        !(c.dead || (c.eof && c.out.is_empty()))
    }

    /// Send an event to every negotiated client.
    pub fn broadcast_event(&mut self, event: &QmpEvent) {
        self.send_event(event);
        self.reap();
        self.update_clients();
    }

    fn send_event(&mut self, event: &QmpEvent) {
        for c in &mut self.clients {
            if let Some(line) = c.session.event_line(event) {
                c.push(&line);
                c.flush();
            }
        }
    }

    /// Try to write all pending output for at most `timeout` (before the VMM exits).
    pub fn flush_blocking(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        for c in &mut self.clients {
            while !c.out.is_empty() && !c.dead {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return;
                }
                let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX).max(1);
                match sys::poll_one(c.fd(), libc::POLLOUT, ms) {
                    Ok(r) if r & libc::POLLOUT != 0 => c.flush(),
                    _ => break,
                }
            }
        }
    }
}

impl Drop for QmpServer {
    fn drop(&mut self) {
        // Remove the socket only if it is still the one we created.
        let now = std::fs::symlink_metadata(&self.path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        if now.is_some() && now == self.file_id {
            if let Err(e) = std::fs::remove_file(&self.path) {
                log::debug!("monitor: remove {}: {e}", self.path.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{ClientError, QmpClient};
    use crate::commands::tests::FakeMachine;
    use crate::hub::testloop::Running;
    use crate::hub::Monitor;
    use serde_json::json;
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;

    const TIMEOUT: Duration = Duration::from_secs(10);

    fn start(limits: Limits) -> (tempfile::TempDir, PathBuf, Running) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let mut mon = Monitor::with_limits(limits).unwrap();
        mon.listen(&path).unwrap();
        let mut machine = FakeMachine::new();
        machine.events = Some(mon.events());
        (dir, path, Running::start(mon, machine))
    }

    fn connect(path: &Path) -> QmpClient {
        QmpClient::connect(path, TIMEOUT).unwrap()
    }

    fn class(v: &Value) -> &str {
        v["error"]["class"].as_str().unwrap_or("")
    }

    #[test]
    fn socket_is_private_and_removed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.sock");
        let s = QmpServer::bind(
            &path,
            FdStore::new(),
            EventQueue::new().unwrap(),
            Limits::default(),
        )
        .unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, SOCKET_MODE);
        // A live server's socket is refused.
        let e = QmpServer::bind(
            &path,
            FdStore::new(),
            EventQueue::new().unwrap(),
            Limits::default(),
        )
        .unwrap_err();
        assert!(matches!(e, ServerError::InUse(_)), "{e}");
        drop(s);
        assert!(!path.exists());
        // A stale socket file is replaced; a regular file is refused.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let s = QmpServer::bind(
            &path,
            FdStore::new(),
            EventQueue::new().unwrap(),
            Limits::default(),
        )
        .unwrap();
        drop(s);
        std::fs::write(&path, b"x").unwrap();
        assert!(matches!(
            QmpServer::bind(
                &path,
                FdStore::new(),
                EventQueue::new().unwrap(),
                Limits::default()
            ),
            Err(ServerError::NotASocket(_))
        ));
    }

    #[test]
    fn concurrent_clients_have_their_own_sessions_and_events() {
        let (_dir, path, running) = start(Limits::default());
        let mut a = connect(&path);
        let mut b = connect(&path);
        let mut c = connect(&path);
        for cl in [&a, &b, &c] {
            assert_eq!(cl.greeting()["QMP"]["version"]["qemu"]["major"], 7);
        }
        a.negotiate().unwrap();
        b.negotiate().unwrap();
        // c is still negotiating: commands are refused there only.
        let r = c.execute("query-status", None).unwrap();
        assert_eq!(class(&r), "CommandNotFound");
        // a's garbage does not disturb b.
        a.send_raw(b"{]\n").unwrap();
        let r = a.read_answer().unwrap();
        assert_eq!(class(&r), "GenericError");
        a.send_raw(b"{'execute': 'query-status', 'id': 'half")
            .unwrap();
        let r = b.execute("query-status", None).unwrap();
        assert_eq!(r["return"]["status"], "running");
        a.send_raw(b"\xff").unwrap();
        assert_eq!(class(&a.read_answer().unwrap()), "GenericError");
        // a stops the VM: both negotiated clients see STOP, a before its answer.
        let r = a.execute("stop", None).unwrap();
        assert_eq!(r["return"], json!({}));
        let evs = a.take_events();
        assert_eq!(evs.len(), 1);
        assert_eq!(evs[0]["event"], "STOP");
        assert!(evs[0]["timestamp"]["microseconds"].is_u64());
        assert_eq!(b.next_event().unwrap()["event"], "STOP");
        // An event from another thread reaches both as well.
        running
            .monitor
            .lock()
            .unwrap()
            .events()
            .push(QmpEvent::vserport_change("p1", true));
        for cl in [&mut a, &mut b] {
            let e = cl.next_event().unwrap();
            assert_eq!(e["event"], "VSERPORT_CHANGE");
            assert_eq!(e["data"], json!({"id": "p1", "open": true}));
        }
        // c saw no event before negotiating: its next message is the answer.
        c.negotiate().unwrap();
        assert!(c.take_events().is_empty());
        let r = c.execute("query-status", None).unwrap();
        assert_eq!(r["return"]["status"], "paused");
        assert!(c.take_events().is_empty());
        // HMP through QMP, with CRLF line ends.
        let r = c
            .execute(
                "human-monitor-command",
                Some(json!({"command-line": "info status"})),
            )
            .unwrap();
        assert_eq!(r["return"], "VM status: paused\r\n");
        // Closing one client leaves the others working.
        drop(a);
        let r = b.execute("cont", None).unwrap();
        assert_eq!(r["return"], json!({}));
        assert_eq!(c.next_event().unwrap()["event"], "RESUME");
        assert_eq!(running.machine.lock().unwrap().calls, ["stop", "cont"]);
    }

    #[test]
    fn half_closed_client_still_gets_its_answers() {
        let (_dir, path, _running) = start(Limits::default());
        let mut s = UnixStream::connect(&path).unwrap();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        std::io::Write::write_all(
            &mut s,
            b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"query-name\",\"id\":1}\n",
        )
        .unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut all = String::new();
        s.read_to_string(&mut all).unwrap();
        let lines: Vec<&str> = all.split("\r\n").filter(|l| !l.is_empty()).collect();
        assert_eq!(lines.len(), 3, "{all}");
        assert_eq!(
            serde_json::from_str::<Value>(lines[2]).unwrap(),
            json!({"return": {"name": "vm1"}, "id": 1})
        );
    }

    #[test]
    fn passed_fds_feed_getfd_and_chardev_add() {
        let (_dir, path, running) = start(Limits::default());
        let mut c = connect(&path);
        c.negotiate().unwrap();
        let (ours, theirs) = UnixStream::pair().unwrap();
        // The fd travels with the command itself (libvirt's way).
        let r = c
            .execute_with_fds(
                "getfd",
                Some(json!({"fdname": "myfd"})),
                &[theirs.as_raw_fd()],
            )
            .unwrap();
        assert_eq!(r["return"], json!({}), "{r}");
        drop(theirs);
        let r = c
            .execute(
                "chardev-add",
                Some(
                    json!({"id": "viafd", "backend": {"type": "socket", "data": {
                    "addr": {"type": "fd", "data": {"str": "myfd"}}, "server": false}}}),
                ),
            )
            .unwrap();
        assert_eq!(r["return"], json!({}), "{r}");
        let list = c.execute("query-chardev", None).unwrap();
        let entry = list["return"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["label"] == "viafd")
            .cloned()
            .unwrap();
        assert_eq!(entry["peer-connected"], true);
        assert!(entry["filename"].as_str().unwrap().starts_with("fd:"));
        // The fd was consumed by the chardev.
        let r = c
            .execute("closefd", Some(json!({"fdname": "myfd"})))
            .unwrap();
        assert_eq!(class(&r), "GenericError");
        // The chardev really owns the passed end.
        running
            .machine
            .lock()
            .unwrap()
            .registry
            .with("viafd", |b| b.write(b"hi").unwrap())
            .unwrap();
        let mut buf = [0u8; 2];
        ours.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut got = 0;
        let deadline = Instant::now() + TIMEOUT;
        while got < 2 && Instant::now() < deadline {
            // The chardev flushes when polled for writing; nudge it.
            running
                .machine
                .lock()
                .unwrap()
                .registry
                .with("viafd", |b| {
                    // Flushes when the socket is writable.
                    let _ = chardev::poll_backends(&mut [b], 10);
                })
                .unwrap();
            ours.set_nonblocking(true).unwrap();
            if let Ok(n) = (&ours).read(&mut buf[got..]) {
                got += n;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(&buf, b"hi");
        // qemu.qmp's way: the fd alone with one byte, then the command.
        let f = std::fs::File::open("/dev/null").unwrap();
        c.send_raw_with_fds(b" ", &[f.as_raw_fd()]).unwrap();
        let r = c
            .execute("getfd", Some(json!({"fdname": "second"})))
            .unwrap();
        assert_eq!(r["return"], json!({}));
        let r = c
            .execute("getfd", Some(json!({"fdname": "third"})))
            .unwrap();
        assert_eq!(
            r["error"]["desc"],
            "No file descriptor supplied via SCM_RIGHTS"
        );
        let r = c
            .execute("closefd", Some(json!({"fdname": "second"})))
            .unwrap();
        assert_eq!(r["return"], json!({}));
        // Named fds are shared by the monitor's clients.
        let f2 = std::fs::File::open("/dev/null").unwrap();
        c.execute_with_fds(
            "getfd",
            Some(json!({"fdname": "shared"})),
            &[f2.as_raw_fd()],
        )
        .unwrap();
        let mut other = connect(&path);
        other.negotiate().unwrap();
        let r = other
            .execute("closefd", Some(json!({"fdname": "shared"})))
            .unwrap();
        assert_eq!(r["return"], json!({}));
    }

    #[test]
    fn a_client_that_never_reads_is_disconnected() {
        let limits = Limits {
            output_high_water: 4096,
            max_output: 64 << 10,
            ..Limits::default()
        };
        let (_dir, path, running) = start(limits);
        let mut slow = connect(&path);
        slow.negotiate().unwrap();
        let mut fast = connect(&path);
        fast.negotiate().unwrap();
        let events = running.monitor.lock().unwrap().events();
        // The fast client reads everything on its own thread until the marker event.
        let reader = std::thread::spawn(move || {
            let mut seen = 0usize;
            loop {
                let e = fast.next_event().unwrap();
                if e["event"] == "DONE" {
                    return (fast, seen);
                }
                seen += 1;
            }
        });
        // Far more than the socket buffers and the output limit hold.
        const BATCHES: usize = 64;
        const PER_BATCH: usize = 128;
        for _ in 0..BATCHES {
            for _ in 0..PER_BATCH {
                events.push(QmpEvent::new("X", None));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        events.push(QmpEvent::new("DONE", None));
        let (mut fast, seen) = reader.join().unwrap();
        assert!(seen > 0);
        // The slow client finds the end of the stream after what was sent before.
        let deadline = Instant::now() + TIMEOUT;
        let mut closed = false;
        while Instant::now() < deadline {
            match slow.read_message() {
                Ok(_) => {}
                Err(ClientError::Closed) => {
                    closed = true;
                    break;
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert!(closed);
        let r = fast.execute("query-status", None).unwrap();
        assert_eq!(r["return"]["running"], true);
    }

    #[test]
    fn oversized_input_gets_an_error_and_the_connection_stays() {
        let limits = Limits {
            max_message: 1024,
            ..Limits::default()
        };
        let (_dir, path, _running) = start(limits);
        let mut c = connect(&path);
        c.negotiate().unwrap();
        let big = format!(
            "{{\"execute\": \"ringbuf-write\", \"arguments\": {{\"device\": \"x\", \"data\": \"{}\"}}}}",
            "a".repeat(100_000)
        );
        c.send_raw(big.as_bytes()).unwrap();
        let r = c.read_answer().unwrap();
        assert!(
            r["error"]["desc"].as_str().unwrap().contains("1024 bytes"),
            "{r}"
        );
        let r = c.execute("query-name", None).unwrap();
        assert_eq!(r["return"]["name"], "vm1");
    }

    #[test]
    fn too_many_clients_are_refused() {
        let limits = Limits {
            max_clients: 2,
            ..Limits::default()
        };
        let (_dir, path, _running) = start(limits);
        let _a = connect(&path);
        let _b = connect(&path);
        match QmpClient::connect(&path, TIMEOUT) {
            Err(ClientError::Closed) | Err(ClientError::Io { .. }) => {}
            other => panic!("third client: {other:?}"),
        }
    }
}
