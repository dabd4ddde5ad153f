//! The endpoint loop of `minivmm-vp`: a [`VproxyBackend`] whose channel is a char device
//! (a virtio port in the guest), a serial tty, or a unix/tcp socket instead of a VMM frontend.
//!
//! The channel is itself a [`Backend`]: a tty is the `serial` backend (raw, at the given
//! speed), a socket is the `socket` backend as a client that reconnects with backoff, and a
//! char device is a [`DeviceChannel`] here. The loop moves bytes both ways without blocking:
//! everything the channel gives goes into the engine (which always takes it all); engine
//! output goes to the channel as far as the channel's bounded buffer takes it, the rest waits
//! in one chunk and the engine is not pulled further meanwhile. When the channel comes back
//! after a loss (`Event::Opened` after the first), the engine's `channel_reset` starts a new
//! session.
//!
//! A closed virtio port gives reads of 0 on the guest side (and a poll that never sleeps): a
//! [`DeviceChannel`] takes a 0-read as "no data for now" and stops polling the device for
//! [`DEVICE_IDLE_PAUSE`]; a read or write error closes it and it is reopened with backoff.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use thiserror::Error;
use vmm_sys_util::timerfd::TimerFd;

use crate::driver::VproxyBackend;
use crate::spec::VproxySpec;
use chardev::backend::{Backend, Event, Interest, LineControl, LineParams, Readiness};
use chardev::buffer::{EventQueue, OutBuf, DEFAULT_OUTBUF_SIZE};
use chardev::error::quote;
use chardev::poller::{FdSet, Poller, Registrar, Token};
use chardev::serial::{SerialBackend, DEFAULT_BAUD};
use chardev::socket::{SocketBackend, MAX_RECONNECT_BACKOFF};
use chardev::spec::{SerialSpec, SocketAddrSpec, SocketSpec};
use chardev::sys;

/// The poller owner of the channel's fds.
const OWNER_CHANNEL: u32 = 0;
/// The poller owner of the vproxy backend's fds.
const OWNER_VPROXY: u32 = 1;
/// Events taken per wait.
const MAX_EVENTS_PER_WAIT: usize = 256;

/// How long a char device that read 0 (no peer) is left alone before it is read again.
pub const DEVICE_IDLE_PAUSE: Duration = Duration::from_millis(200);
/// First delay before reopening a lost channel; doubled up to [`MAX_RECONNECT_BACKOFF`].
pub const REOPEN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest poll wait, so a stop request is seen promptly.
const MAX_POLL_WAIT_MS: libc::c_int = 200;
/// Bytes moved per read between the channel and the engine (a few whole frames on a fast
/// channel).
const CHUNK: usize = 256 * 1024;
/// Bits on the line per byte at 8N1 (start + 8 data + stop).
const BITS_PER_BYTE: u64 = 10;
/// The chardev id the endpoint's backends use in messages.
const ENDPOINT_ID: &str = "vproxy";

/// A bad `--channel` argument or a failure to set the endpoint up.
#[derive(Debug, Error)]
pub enum AgentError {
    /// The `--channel` spec does not parse.
    #[error("bad channel '{0}' (expected PATH, tty:PATH[,speed=N], unix:PATH or tcp:HOST:PORT)")]
    BadChannel(String),
    /// Setting up a backend failed.
    #[error(transparent)]
    Setup(#[from] chardev::Error),
    /// poll(2) failed.
    #[error("poll failed")]
    Poll(#[source] io::Error),
}

/// Where the endpoint's channel is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelSpec {
    /// A char device (`/dev/virtio-ports/NAME`), opened read-write, non-blocking.
    Device(PathBuf),
    /// A serial tty set raw at `speed` bits per second.
    Tty {
        /// The tty.
        path: PathBuf,
        /// Line speed.
        speed: u32,
    },
    /// A unix socket to connect to.
    Unix(PathBuf),
    /// A tcp address to connect to.
    Tcp {
        /// Host name or address.
        host: String,
        /// Port.
        port: u16,
    },
}

impl ChannelSpec {
    /// Parse `PATH`, `tty:PATH[,speed=N]`, `unix:PATH` or `tcp:HOST:PORT`.
    pub fn parse(s: &str) -> Result<ChannelSpec, AgentError> {
        let bad = || AgentError::BadChannel(quote(s));
        if let Some(rest) = s.strip_prefix("tty:") {
            let (path, speed) = match rest.split_once(",speed=") {
                Some((p, sp)) => (
                    p,
                    sp.parse::<u32>().ok().filter(|&n| n > 0).ok_or_else(bad)?,
                ),
                None => (rest, DEFAULT_BAUD),
            };
            if path.is_empty() {
                return Err(bad());
            }
            return Ok(ChannelSpec::Tty {
                path: path.into(),
                speed,
            });
        }
        if let Some(path) = s.strip_prefix("unix:") {
            return match path.is_empty() {
                true => Err(bad()),
                false => Ok(ChannelSpec::Unix(path.into())),
            };
        }
        if let Some(hp) = s.strip_prefix("tcp:") {
            let (host, port) = hp.rsplit_once(':').ok_or_else(bad)?;
            let host = host
                .strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .unwrap_or(host);
            let port = port
                .parse::<u16>()
                .ok()
                .filter(|&p| p > 0)
                .ok_or_else(bad)?;
            return Ok(ChannelSpec::Tcp {
                host: host.to_string(),
                port,
            });
        }
        if s.is_empty() || s.contains(':') {
            return Err(bad());
        }
        Ok(ChannelSpec::Device(s.into()))
    }

    /// The channel's byte rate, where the spec says (a tty's line speed).
    pub fn rate(&self) -> Option<u64> {
        match self {
            ChannelSpec::Tty { speed, .. } => Some(u64::from(*speed) / BITS_PER_BYTE),
            _ => None,
        }
    }

    /// Open the channel as a backend.
    pub fn open(&self) -> Result<Box<dyn Backend>, AgentError> {
        Ok(match self {
            ChannelSpec::Device(path) => Box::new(DeviceChannel::open(path.clone())?),
            ChannelSpec::Tty { path, speed } => {
                let mut b = SerialBackend::open(ENDPOINT_ID, &SerialSpec { path: path.clone() })?;
                b.set_line_params(LineParams {
                    baud: *speed,
                    data_bits: 8,
                    parity: 'N',
                    stop_bits: 1,
                });
                Box::new(b)
            }
            ChannelSpec::Unix(path) => Box::new(Self::client(SocketAddrSpec::Unix {
                path: path.clone(),
                abstract_ns: false,
            })?),
            ChannelSpec::Tcp { host, port } => Box::new(Self::client(SocketAddrSpec::Tcp {
                host: host.clone(),
                port: *port,
            })?),
        })
    }

    /// A socket client that reconnects, dropping output while disconnected.
    fn client(addr: SocketAddrSpec) -> Result<SocketBackend, AgentError> {
        let spec = SocketSpec {
            nodelay: matches!(addr, SocketAddrSpec::Tcp { .. }),
            addr,
            server: false,
            wait: false,
            reconnect_ms: REOPEN_BACKOFF.as_millis() as u64,
            backlog: 0,
        };
        Ok(SocketBackend::open(ENDPOINT_ID, &spec)?)
    }
}

/// Where a [`DeviceChannel`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DeviceState {
    /// Open and polled.
    Open,
    /// Open, but it read 0 (no peer): left alone until the timer fires.
    Idle,
    /// Closed after an error (or never opened): reopened when the timer fires.
    Closed,
}

/// A char device channel (a virtio port) that survives its peer going away.
#[derive(Debug)]
pub struct DeviceChannel {
    /// Declared first: unregisters before the device and the timer close.
    fds: FdSet,
    path: PathBuf,
    fd: Option<OwnedFd>,
    state: DeviceState,
    out: OutBuf,
    events: EventQueue,
    timer: TimerFd,
    timer_armed: bool,
    backoff: Duration,
    failures: u32,
}

impl DeviceChannel {
    /// Open `path`; if that fails now, keep retrying with backoff (the device may appear
    /// later, e.g. before the port is named).
    pub fn open(path: PathBuf) -> Result<Self, AgentError> {
        let timer = TimerFd::new().map_err(|e| {
            chardev::Error::io(ENDPOINT_ID, "create timer for", "channel", e.into())
        })?;
        sys::set_nonblocking(timer.as_raw_fd(), true)
            .map_err(|e| chardev::Error::io(ENDPOINT_ID, "create timer for", "channel", e))?;
        let mut d = DeviceChannel {
            fds: FdSet::new(),
            path,
            fd: None,
            state: DeviceState::Closed,
            out: OutBuf::new(DEFAULT_OUTBUF_SIZE),
            events: EventQueue::default(),
            timer,
            timer_armed: false,
            backoff: REOPEN_BACKOFF,
            failures: 0,
        };
        d.reopen();
        Ok(d)
    }

    fn arm(&mut self, delay: Duration) {
        match self.timer.reset(delay.max(Duration::from_millis(1)), None) {
            Ok(()) => self.timer_armed = true,
            Err(e) => log::warn!("minivmm-vp: cannot arm channel timer: {e}"),
        }
    }

    /// Register the device while it is open (output pending: writable too) and the timer while
    /// it is armed.
    fn update_fds(&mut self) {
        if let Some(fd) = &self.fd {
            let interest = match self.state {
                DeviceState::Open => Interest {
                    read: true,
                    write: !self.out.is_empty(),
                },
                _ => Interest::NONE,
            };
            self.fds.set(fd.as_raw_fd(), interest);
        }
        let timer = if self.timer_armed {
            Interest::READ
        } else {
            Interest::NONE
        };
        self.fds.set(self.timer.as_raw_fd(), timer);
    }

    fn reopen(&mut self) {
        let opened = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(&self.path);
        match opened {
            Ok(f) => {
                if self.failures > 0 {
                    log::info!("minivmm-vp: channel {} open again", self.path.display());
                }
                self.fd = Some(f.into());
                self.state = DeviceState::Open;
                self.update_fds();
                self.backoff = REOPEN_BACKOFF;
                self.failures = 0;
                self.events.push(Event::Opened);
            }
            Err(e) => {
                self.failures += 1;
                if self.failures == 1 {
                    log::warn!("minivmm-vp: cannot open {}: {e}", self.path.display());
                }
                let delay = self.backoff;
                self.backoff = (self.backoff * 2).min(MAX_RECONNECT_BACKOFF);
                self.arm(delay);
            }
        }
    }

    /// The device failed: close it, drop its output and reopen later.
    fn lose(&mut self, e: &io::Error) {
        log::warn!("minivmm-vp: channel {} lost: {e}", self.path.display());
        if let Some(fd) = self.fd.take() {
            self.fds.close(fd.as_raw_fd());
        }
        self.state = DeviceState::Closed;
        self.out.take_all();
        self.events.push(Event::Closed);
        let delay = self.backoff;
        self.arm(delay);
    }

    fn flush(&mut self) {
        let Some(fd) = self.fd.as_ref().map(AsRawFd::as_raw_fd) else {
            return;
        };
        if let Err(e) = self.out.flush_with(|b| sys::write(fd, b)) {
            self.lose(&e);
        }
    }
}

impl DeviceChannel {
    fn handle_ready(&mut self, fd: RawFd, readiness: Readiness) {
        if fd == self.timer.as_raw_fd() {
            let _ = self.timer.wait();
            self.timer_armed = false;
            match self.state {
                DeviceState::Idle => self.state = DeviceState::Open,
                DeviceState::Closed => self.reopen(),
                DeviceState::Open => {}
            }
            return;
        }
        if readiness.writable {
            self.flush();
        }
        if readiness.readable || readiness.hangup {
            self.events.push(Event::Readable);
        }
    }

    fn read_device(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(fd) = self.fd.as_ref().map(AsRawFd::as_raw_fd) else {
            return Ok(0);
        };
        if self.state != DeviceState::Open {
            return Ok(0);
        }
        match sys::read(fd, buf) {
            Ok(0) => {
                self.state = DeviceState::Idle;
                self.arm(DEVICE_IDLE_PAUSE);
                Ok(0)
            }
            Ok(n) => Ok(n),
            Err(e) if sys::would_block(&e) => Ok(0),
            Err(e) => {
                self.lose(&e);
                Ok(0)
            }
        }
    }
}

impl Backend for DeviceChannel {
    fn kind(&self) -> &'static str {
        "device"
    }

    fn filename(&self) -> String {
        self.path.display().to_string()
    }

    fn attach(&mut self, reg: Registrar) {
        self.fds.attach(reg);
        self.update_fds();
    }

    fn detach(&mut self) {
        self.fds.detach();
    }

    fn on_ready(&mut self, token: Token, readiness: Readiness) {
        let Some(fd) = self.fds.fd_of(token) else {
            return;
        };
        self.handle_ready(fd, readiness);
        self.update_fds();
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let r = self.read_device(buf);
        self.update_fds();
        r
    }

    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.fd.is_none() {
            // No channel: the peer will not see this anyway, and a reopen resets the session.
            return Ok(data.len());
        }
        let n = self.out.push(data);
        self.flush();
        self.update_fds();
        Ok(n)
    }

    fn set_input_wanted(&mut self, _wanted: bool) {}

    fn is_connected(&self) -> bool {
        self.fd.is_some()
    }

    fn take_events(&mut self) -> Vec<Event> {
        self.events.take()
    }
}

/// What `minivmm-vp` runs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The channel.
    pub channel: ChannelSpec,
    /// Forwards and engine knobs (a tty's rate is filled in from its speed when not given).
    pub vproxy: VproxySpec,
}

/// Move bytes between `chan` and `vp` until neither has anything to give; `carry` holds
/// engine output the channel did not take yet.
fn shuttle(chan: &mut dyn Backend, vp: &mut VproxyBackend, carry: &mut Vec<u8>, buf: &mut [u8]) {
    loop {
        let n = match chan.read(buf) {
            Ok(n) => n,
            Err(e) => {
                log::debug!("minivmm-vp: channel read: {e}");
                0
            }
        };
        if n == 0 {
            break;
        }
        // The engine always takes everything: the channel is always drained.
        let _ = vp.write(&buf[..n]);
    }
    loop {
        if carry.is_empty() {
            let n = vp.read(buf).unwrap_or(0);
            if n == 0 {
                break;
            }
            // Straight from the buffer; only what the channel does not take is kept.
            let taken = chan.write(&buf[..n]).unwrap_or(0);
            carry.extend_from_slice(&buf[taken..n]);
            if taken < n {
                break;
            }
            continue;
        }
        match chan.write(carry) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                carry.drain(..n);
            }
        }
    }
}

/// Run the endpoint until `stop` is set: set up the forwards and the channel, then carry
/// streams over it for good, reopening the channel whenever it goes away.
pub fn run(config: &AgentConfig, stop: &AtomicBool) -> Result<(), AgentError> {
    let mut spec = config.vproxy.clone();
    if spec.rate.is_none() {
        spec.rate = config.channel.rate();
    }
    let mut vp = VproxyBackend::open(ENDPOINT_ID, &spec)?;
    let mut chan = config.channel.open()?;
    // The channel and every stream register themselves once; each wait costs the same however
    // many streams are open.
    let poller = Poller::new().map_err(AgentError::Poll)?;
    chan.attach(poller.registrar(OWNER_CHANNEL));
    vp.attach(poller.registrar(OWNER_VPROXY));
    let mut ready = Vec::new();
    let mut carry = Vec::with_capacity(CHUNK);
    let mut buf = vec![0u8; CHUNK];
    // The first `Opened` is the first connection, not a comeback.
    let mut seen_open = false;
    while !stop.load(Ordering::Relaxed) {
        for ev in chan.take_events() {
            match ev {
                Event::Opened if seen_open => {
                    log::info!("minivmm-vp: channel back, new session");
                    carry.clear();
                    vp.channel_reset();
                }
                Event::Opened => seen_open = true,
                Event::Closed => log::info!("minivmm-vp: channel lost, reconnecting"),
                _ => {}
            }
        }
        shuttle(chan.as_mut(), &mut vp, &mut carry, &mut buf);
        let _ = vp.take_events();
        ready.clear();
        poller
            .wait(&mut ready, MAX_EVENTS_PER_WAIT, MAX_POLL_WAIT_MS)
            .map_err(AgentError::Poll)?;
        for ev in &ready {
            match ev.owner {
                OWNER_CHANNEL => chan.on_ready(ev.token, ev.readiness),
                _ => vp.on_ready(ev.token, ev.readiness),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::VproxyControl;
    use crate::forward::{parse_iforward, parse_oforward};
    use chardev::testutil::DEADLINE;
    use std::io::{Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::sync::Arc;
    use std::time::Instant;

    /// Serve one vproxy channel connection on `l` with `vp` until `client` finishes.
    fn serve_channel(
        l: &UnixListener,
        vp: &mut VproxyBackend,
        client: std::thread::JoinHandle<Vec<u8>>,
    ) -> Vec<u8> {
        let (mut chan, _) = l.accept().unwrap();
        chan.set_nonblocking(true).unwrap();
        let mut buf = vec![0u8; CHUNK];
        let end = Instant::now() + DEADLINE;
        while !client.is_finished() {
            assert!(Instant::now() < end, "client did not finish");
            while let Ok(n) = chan.read(&mut buf) {
                if n == 0 {
                    break;
                }
                vp.write(&buf[..n]).unwrap();
            }
            loop {
                let n = vp.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                chan.set_nonblocking(false).unwrap();
                chan.write_all(&buf[..n]).unwrap();
                chan.set_nonblocking(true).unwrap();
            }
            chardev::poll_backends(&mut [vp], 5).unwrap();
        }
        client.join().unwrap()
    }

    /// A client of the agent's oforward at `path` that sends `msg` and reads to the end,
    /// retrying until it gets `msg` back: a stream opened while the agent has not yet noticed a
    /// lost channel is reset with the session, as it must be.
    fn client(path: std::path::PathBuf, msg: &'static [u8]) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let end = Instant::now() + DEADLINE;
            let attempt = || -> io::Result<Vec<u8>> {
                let mut c = UnixStream::connect(&path)?;
                c.set_read_timeout(Some(DEADLINE))?;
                c.write_all(msg)?;
                c.shutdown(std::net::Shutdown::Write)?;
                let mut got = Vec::new();
                c.read_to_end(&mut got)?;
                Ok(got)
            };
            loop {
                match attempt() {
                    Ok(got) if got == msg => return got,
                    other if Instant::now() > end => panic!("no echo: {other:?}"),
                    _ => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        })
    }

    #[test]
    fn agent_carries_streams_and_survives_a_channel_loss() {
        let dir = tempfile::tempdir().unwrap();
        let chan_path = dir.path().join("chan.sock");
        let listen_path = dir.path().join("web.sock");
        let echo_path = dir.path().join("echo.sock");
        let echo = UnixListener::bind(&echo_path).unwrap();
        std::thread::spawn(move || {
            for s in echo.incoming() {
                let mut s = s.unwrap();
                let mut r = s.try_clone().unwrap();
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut r, &mut s);
                });
            }
        });
        let l = UnixListener::bind(&chan_path).unwrap();
        let config = AgentConfig {
            channel: ChannelSpec::Unix(chan_path.clone()),
            vproxy: VproxySpec {
                oforwards: vec![
                    parse_oforward(&format!("web:unix:{}", listen_path.display())).unwrap(),
                ],
                iforwards: Vec::new(),
                rate: None,
                window: None,
                max_streams: None,
            },
        };
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let agent = std::thread::spawn(move || run(&config, &stop2));
        let mut host = VproxyBackend::open(
            "host",
            &VproxySpec {
                oforwards: Vec::new(),
                iforwards: vec![
                    parse_iforward(&format!("web:unix:{}", echo_path.display())).unwrap()
                ],
                rate: None,
                window: None,
                max_streams: None,
            },
        )
        .unwrap();
        let got = serve_channel(&l, &mut host, client(listen_path.clone(), b"first"));
        assert_eq!(got, b"first");
        // The channel connection drops (serve_channel closed it); the agent reconnects and
        // starts a new session, and the forwards work again.
        let got = serve_channel(&l, &mut host, client(listen_path.clone(), b"second"));
        assert_eq!(got, b"second");
        assert!(host.info().session.session_resets >= 1, "no new session");
        stop.store(true, Ordering::Relaxed);
        agent.join().unwrap().unwrap();
    }

    #[test]
    fn channel_specs() {
        assert_eq!(
            ChannelSpec::parse("/dev/virtio-ports/org.minivmm.vproxy").unwrap(),
            ChannelSpec::Device("/dev/virtio-ports/org.minivmm.vproxy".into())
        );
        assert_eq!(
            ChannelSpec::parse("tty:/dev/ttyS1,speed=9600").unwrap(),
            ChannelSpec::Tty {
                path: "/dev/ttyS1".into(),
                speed: 9600
            }
        );
        assert_eq!(
            ChannelSpec::parse("tty:/dev/ttyS1").unwrap().rate(),
            Some(11_520)
        );
        assert_eq!(
            ChannelSpec::parse("unix:/run/vp.sock").unwrap(),
            ChannelSpec::Unix("/run/vp.sock".into())
        );
        assert_eq!(
            ChannelSpec::parse("tcp:[::1]:4444").unwrap(),
            ChannelSpec::Tcp {
                host: "::1".into(),
                port: 4444
            }
        );
        for bad in [
            "",
            "tty:",
            "tty:/x,speed=0",
            "unix:",
            "tcp:host",
            "tcp:h:0",
            "udp:x",
        ] {
            let e = ChannelSpec::parse(bad).unwrap_err().to_string();
            assert!(e.starts_with("bad channel"), "{bad}: {e}");
        }
    }
}
