//! The chaos soak (`make soak`: `SOAK_S` seconds, 600 by default; `make test` runs a 180 s pass).
//!
//! One Linux guest with COM1 (the console), COM2..COM4, six virtio ports and a `vproxy`
//! chardev on a seventh, and a driver that, from one printed seed, at random: drops and
//! reconnects socket and pty clients mid-stream, adds and removes a port, `chardev-change`s a
//! live socket backend to another path and back, runs 8 QMP clients mixing valid, malformed,
//! garbage and oversized input, sends breaks to the UARTs, stops and continues the VM, and
//! resets the guest. Guest and host stream numbered, checksummed records on every channel the
//! whole time (`tests::soak`):
//!
//! | channel | frontend | backend | data |
//! |---|---|---|---|
//! | c2 | COM2 (ttyS1) | socket, clients dropped | host -> guest -> host (the guest echoes) |
//! | c3 | COM3 (ttyS2) | pty, opened and closed | guest -> host |
//! | c4 | COM4 (ttyS3) | file | guest -> host |
//! | v0 | virtserialport soak.v0 | socket, clients dropped | echoed |
//! | v1 | virtserialport soak.v1 | socket, `chardev-change`d between two paths | guest -> host |
//! | v2 | virtserialport soak.v2 | pty, opened and closed | echoed |
//! | v3 | virtserialport soak.v3 | file | guest -> host |
//! | v4 | virtserialport soak.v4 | ringbuf, read over QMP | guest -> host |
//! | hot | virtserialport soak.hot | ringbuf, added and removed | guest -> host |
//! | vp | virtserialport soak.vp | vproxy, oforward to the guest's echo service | streams echoed |
//!
//! At the end, per channel: bytes sent, delivered exactly once and in order, and the bytes the
//! design lets go, each from what counts it: `dropped-bytes` (a replay ring or a ringbuf that
//! overflowed), the guest kernel's UART counters, what a pty client's close left in the kernel's
//! pty, and what a reset or a hot-remove cut off inside the guest. Nothing may be unaccounted;
//! minivmm's open fds and its own RSS (guest RAM excluded) after must match before; it never
//! crashes and answers QMP throughout. A failure prints the seed (`SOAK_SEED=N` reproduces the
//! driver's choices; the guest's timing is its own).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};
use tests::qmp::Qmp;
use tests::soak::{pattern, Rng, Stream, Verifier, RECORD};
use tests::{
    host_is_kvm_pvm, minivmm_bin, minivmm_vp_bin, require_kvm, run64, test_cmdline, test_kernel,
    Vmm,
};

/// Seconds of chaos when `SOAK_S` is not set (`make soak` sets 600).
const DEFAULT_SOAK_S: u64 = 180;
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a QMP answer may take before the soak calls minivmm unresponsive.
const QMP_DEADLINE: Duration = Duration::from_secs(60);
/// Guest RAM: its mapping is left out of minivmm's own RSS.
const GUEST_MIB: u64 = 256;
/// How far minivmm's own RSS may grow over the soak (allocator caches, buffers at their
/// high-water mark).
const RSS_BOUND_KIB: i64 = 8 * 1024;
/// The most a pty client's close can leave unread in the kernel: the pty's 64 KiB of buffer
/// and the line discipline's 4 KiB.
const PTY_HELD_MAX: u64 = 68 * 1024;
/// Replay ring of the socket and pty chardevs: small, so that drops happen and are counted.
const BACKLOG: usize = 4096;
/// Ring of the ringbuf port v4.
const RINGBUF: usize = 16384;

/// A guest writer's pattern: (file and channel name, tag, records per pass).
const WRITERS: [(&str, u32, u64); 5] = [
    ("c3", 3, 1024),
    ("c4", 4, 512),
    ("v1", 11, 512),
    ("v3", 13, 512),
    ("v4", 14, 1024),
];
/// The hot port's pattern.
const HOT: (&str, u32, u64) = ("hot", 15, 256);
/// Echo channels' host streams: (channel, tag, bytes per second the host sends).
const ECHOES: [(&str, u32, u64); 3] = [("c2", 102, 300), ("v0", 110, 512), ("v2", 112, 512)];

/// The soak's phases, in order.
const RUN: u8 = 0;
const DRAIN: u8 = 1;
const DONE: u8 = 2;

/// What every thread of the driver shares.
struct Shared {
    dir: PathBuf,
    qmp_path: PathBuf,
    phase: AtomicU8,
    /// No client drops now (around a reset, so that its gap is the reset's alone).
    calm: AtomicBool,
    /// Resets issued so far.
    resets: AtomicU32,
    /// When the last reset was issued (ms since `start`).
    reset_at_ms: AtomicU64,
    /// Guest boots seen (`SOAK-UP`).
    epoch: AtomicU32,
    start: Instant,
    /// The first failure any thread saw.
    failure: Mutex<Option<String>>,
}

impl Shared {
    fn phase(&self) -> u8 {
        self.phase.load(Ordering::SeqCst)
    }
    fn running(&self) -> bool {
        self.phase() == RUN
    }
    fn fail(&self, why: String) {
        eprintln!("soak: FAILURE: {why}");
        let mut f = self.failure.lock().unwrap();
        if f.is_none() {
            *f = Some(why);
        }
    }
    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }
}

/// One channel's received stream and what its client saw.
struct Channel {
    name: &'static str,
    backend: &'static str,
    verifier: Verifier,
    /// Bytes the host sent (echo channels).
    sent: u64,
    /// Position where the guest's current boot started its pattern (periodic streams).
    epoch_start: u64,
    /// Resets whose restart position is still to be found.
    epoch_pending: u32,
    /// Client connections dropped by the driver.
    drops: u64,
    /// Bytes a pty client's close left unread, at least (FIONREAD before the close).
    pty_held_min: u64,
    /// When data last arrived.
    last_data: Instant,
}

type Chan = Arc<Mutex<Channel>>;

impl Channel {
    fn new(name: &'static str, backend: &'static str, tag: u32, period: Option<u64>) -> Chan {
        Arc::new(Mutex::new(Channel {
            name,
            backend,
            verifier: Verifier::new(Stream { tag, period }),
            sent: 0,
            epoch_start: 0,
            epoch_pending: 0,
            drops: 0,
            pty_held_min: 0,
            last_data: Instant::now(),
        }))
    }
}

/// Take in `data` for channel `c`, noting resets and where a new boot's pattern began.
fn feed(sh: &Shared, c: &Chan, seen_resets: &mut u32, data: &[u8]) {
    let mut c = c.lock().unwrap();
    arm(sh, &mut c, seen_resets);
    if data.is_empty() {
        return;
    }
    // The first bytes well after a reset are the new boot's: a guest pattern starts again at
    // the next pass (what the old boot did not send of its pass is the reset's).
    if c.epoch_pending > 0 && sh.now_ms() > sh.reset_at_ms.load(Ordering::SeqCst) + 5000 {
        c.verifier.restart_pass();
        c.epoch_start = c.verifier.pos;
        c.epoch_pending -= 1;
    }
    let was_ok = c.verifier.error.is_none();
    c.verifier.feed(data);
    c.last_data = Instant::now();
    if let Some(e) = c.verifier.error.as_ref().filter(|_| was_ok) {
        let msg = format!("{}: {e}", c.name);
        drop(c);
        sh.fail(msg);
    }
}

fn arm(sh: &Shared, c: &mut Channel, seen_resets: &mut u32) {
    let r = sh.resets.load(Ordering::SeqCst);
    while *seen_resets < r {
        *seen_resets += 1;
        if c.verifier.period().is_none() {
            // An echo stream: the reset cuts what the guest held, the next gap.
            c.verifier.arm_reset();
        } else {
            c.epoch_pending += 1;
        }
    }
}

impl Channel {
    fn verifier_period_bytes(&self) -> Option<u64> {
        self.verifier.period().map(|p| p * RECORD as u64)
    }
}

/// Wait for `path` to exist (a socket or pty link minivmm creates).
fn wait_path(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn read_some(r: &mut impl Read, buf: &mut [u8]) -> Option<usize> {
    match r.read(buf) {
        Ok(n) => Some(n),
        Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
            Some(usize::MAX)
        }
        Err(_) => None,
    }
}

/// Whether echo streams send now: not before the guest's echo runs, and not from shortly before
/// a reset until the new boot's echo runs (a guest tty echoes what it gets before the script
/// makes it raw, altered by its default line settings).
fn sending(sh: &Shared) -> bool {
    sh.running() && !sh.calm.load(Ordering::SeqCst) && sh.epoch.load(Ordering::SeqCst) > 0
}

/// Send the next bytes of channel `c`'s echo stream that the pacer allows (at most `max`). An
/// error other than "try again" means the peer is gone.
fn send_paced(
    sh: &Shared,
    c: &Chan,
    pacer: &mut Pacer,
    w: &mut impl Write,
    max: u64,
) -> std::io::Result<()> {
    let allowed = pacer.allowed(sending(sh)).min(max);
    if allowed == 0 {
        return Ok(());
    }
    let (tag, pos) = {
        let c = c.lock().unwrap();
        (c.verifier.tag(), c.sent)
    };
    let data = Stream { tag, period: None }.bytes(pos, allowed as usize);
    match w.write(&data) {
        Ok(n) => {
            c.lock().unwrap().sent += n as u64;
            pacer.used(n);
            Ok(())
        }
        Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(()),
        Err(e) => Err(e),
    }
}

/// A connection made while drops were off gets its end once they are on again; draining
/// clears it (the client stays).
fn next_hold(sh: &Shared, rng: &mut Rng, until: Option<Instant>) -> Option<Instant> {
    if sh.phase() != RUN {
        None
    } else if until.is_none() {
        hold(sh, rng)
    } else {
        until
    }
}

/// A token bucket: `rate` bytes per second while sending, at most a quarter second's worth
/// saved up.
struct Pacer {
    rate: u64,
    tokens: u64,
    last: Instant,
}

impl Pacer {
    fn new(rate: u64) -> Self {
        Pacer {
            rate,
            tokens: 0,
            last: Instant::now(),
        }
    }

    /// Bytes that may be sent now (none unless `on`).
    fn allowed(&mut self, on: bool) -> u64 {
        let ms = self.last.elapsed().as_millis() as u64;
        self.last = Instant::now();
        if !on {
            self.tokens = 0;
            return 0;
        }
        self.tokens = (self.tokens + ms * self.rate / 1000).min(self.rate / 4);
        self.tokens.min(4096)
    }

    fn used(&mut self, n: usize) {
        self.tokens = self.tokens.saturating_sub(n as u64);
    }
}

/// How long the next connection lasts, or `None` to stay until the phase changes.
fn hold(sh: &Shared, rng: &mut Rng) -> Option<Instant> {
    (sh.running() && !sh.calm.load(Ordering::SeqCst))
        .then(|| Instant::now() + rng.millis(1000, 8000))
}

/// A socket client of channel `c` at `path()` (the path may change: `chardev-change`):
/// sends the echo stream at `rate` bytes/s when `rate` > 0, reads and checks what comes back,
/// and is dropped mid-stream now and then: it shuts the socket down both ways, which minivmm
/// sees as the peer gone, then reads what the kernel already held for it, so that every byte
/// minivmm handed over is counted.
fn socket_client(
    sh: Arc<Shared>,
    c: Chan,
    path: Arc<Mutex<PathBuf>>,
    rate: u64,
    mut rng: Rng,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut seen = 0u32;
        let mut buf = vec![0u8; 65536];
        while sh.phase() != DONE {
            let p = path.lock().unwrap().clone();
            let Ok(mut s) = UnixStream::connect(&p) else {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            };
            s.set_nonblocking(true).unwrap();
            let mut until = hold(&sh, &mut rng);
            let mut pacer = Pacer::new(rate);
            let mut eof = false;
            loop {
                if send_paced(&sh, &c, &mut pacer, &mut s, 4096).is_err() {
                    eof = true;
                }
                match read_some(&mut s, &mut buf) {
                    Some(0) | None => eof = true,
                    Some(usize::MAX) => {}
                    Some(n) => feed(&sh, &c, &mut seen, &buf[..n]),
                }
                if eof || sh.phase() == DONE {
                    break;
                }
                let ends = until.filter(|_| sh.running() && !sh.calm.load(Ordering::SeqCst));
                if ends.is_some_and(|t| Instant::now() >= t) {
                    // The drop: minivmm's next write fails, its next read sees the end.
                    let _ = s.shutdown(std::net::Shutdown::Both);
                    s.set_nonblocking(false).unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                    while let Ok(n) = s.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        feed(&sh, &c, &mut seen, &buf[..n]);
                    }
                    let mut c = c.lock().unwrap();
                    c.drops += 1;
                    eprintln!(
                        "soak: {} ms: {} client dropped at {}",
                        sh.now_ms(),
                        c.name,
                        c.verifier.pos
                    );
                    break;
                }
                until = next_hold(&sh, &mut rng, until);
                std::thread::sleep(Duration::from_millis(20));
            }
            drop(s);
            if sh.running() && !sh.calm.load(Ordering::SeqCst) && !eof {
                std::thread::sleep(rng.millis(200, 3000));
            }
        }
    })
}

/// Make the terminal at `fd` raw (the pty's slave side, which the host reads and writes).
fn make_raw(fd: i32) {
    // SAFETY: tcgetattr fills a termios we own; cfmakeraw and tcsetattr read it; fd is open.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(fd, &mut t) == 0 {
            libc::cfmakeraw(&mut t);
            libc::tcsetattr(fd, libc::TCSANOW, &t);
        }
    }
}

/// A pty client: opens the slave, reads (and sends the echo stream when `rate` > 0), and is
/// closed now and then. What the kernel still held for it at the close is lost with it, as for
/// any pty client; FIONREAD just before gives the least it was.
fn pty_client(sh: Arc<Shared>, c: Chan, link: PathBuf, rate: u64, mut rng: Rng) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut seen = 0u32;
        let mut buf = vec![0u8; 65536];
        wait_path(&link);
        while sh.phase() != DONE {
            let Ok(mut f) = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags_nonblock()
                .open(&link)
            else {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            };
            make_raw(f.as_raw_fd());
            let mut until = hold(&sh, &mut rng);
            let mut pacer = Pacer::new(rate);
            loop {
                // A pty that is full or closing refuses for now; the next turn tries again.
                let _ = send_paced(&sh, &c, &mut pacer, &mut f, 1024);
                if let Some(n) = read_some(&mut f, &mut buf) {
                    if n != usize::MAX && n > 0 {
                        feed(&sh, &c, &mut seen, &buf[..n]);
                    }
                }
                if sh.phase() == DONE {
                    break;
                }
                let ends = until.filter(|_| sh.running() && !sh.calm.load(Ordering::SeqCst));
                if ends.is_some_and(|t| Instant::now() >= t) {
                    let mut held: libc::c_int = 0;
                    // SAFETY: FIONREAD writes one int we own; the fd is open.
                    unsafe { libc::ioctl(f.as_raw_fd(), libc::FIONREAD, &mut held) };
                    let mut c = c.lock().unwrap();
                    c.pty_held_min += held.max(0) as u64;
                    c.drops += 1;
                    break;
                }
                until = next_hold(&sh, &mut rng, until);
                std::thread::sleep(Duration::from_millis(20));
            }
            drop(f);
            if sh.running() && !sh.calm.load(Ordering::SeqCst) {
                std::thread::sleep(rng.millis(200, 3000));
            }
        }
    })
}

trait NonBlock {
    fn custom_flags_nonblock(&mut self) -> &mut Self;
}
impl NonBlock for std::fs::OpenOptions {
    fn custom_flags_nonblock(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
    }
}

/// Follows a file backend's output as it grows.
fn file_reader(sh: Arc<Shared>, c: Chan, path: PathBuf) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut seen = 0u32;
        wait_path(&path);
        let mut f = std::fs::File::open(&path).unwrap();
        let mut buf = vec![0u8; 65536];
        while sh.phase() != DONE {
            match f.read(&mut buf) {
                Ok(0) => {
                    feed(&sh, &c, &mut seen, &[]);
                    std::thread::sleep(Duration::from_millis(200));
                }
                Ok(n) => feed(&sh, &c, &mut seen, &buf[..n]),
                Err(e) => panic!("read {}: {e}", path.display()),
            }
        }
    })
}

/// A QMP session that tolerates what the chaos does to it: reads replies by id, skipping
/// events and the id-less errors that garbage earns.
struct Session {
    w: UnixStream,
    r: BufReader<UnixStream>,
    next_id: u64,
    /// Events that arrived while waiting for a reply (the newest few).
    events: Vec<Value>,
}

/// Events a session keeps while it waits for replies.
const KEPT_EVENTS: usize = 64;

impl Session {
    fn open(path: &Path) -> std::io::Result<Session> {
        let s = UnixStream::connect(path)?;
        s.set_read_timeout(Some(QMP_DEADLINE))?;
        let mut q = Session {
            r: BufReader::new(s.try_clone()?),
            w: s,
            next_id: 0,
            events: Vec::new(),
        };
        let greeting = q.line()?;
        if greeting.get("QMP").is_none() {
            return Err(std::io::Error::other(format!("greeting {greeting}")));
        }
        q.call("qmp_capabilities", Value::Null)?;
        Ok(q)
    }

    fn line(&mut self) -> std::io::Result<Value> {
        let mut l = String::new();
        if self.r.read_line(&mut l)? == 0 {
            return Err(std::io::Error::new(ErrorKind::UnexpectedEof, "QMP closed"));
        }
        serde_json::from_str(&l).map_err(|e| std::io::Error::other(format!("{l:?}: {e}")))
    }

    /// Send `raw`, then a command of our own, and return every reply up to that one's.
    fn send_then_sync(&mut self, raw: &[u8]) -> std::io::Result<Vec<Value>> {
        self.w.write_all(raw)?;
        self.next_id += 1;
        let id = format!("sync-{}", self.next_id);
        let msg = json!({"execute": "query-version", "id": id});
        self.w.write_all(format!("{msg}\n").as_bytes())?;
        let mut replies = Vec::new();
        loop {
            let v = self.line()?;
            if v.get("event").is_some() {
                continue;
            }
            if v["id"] == json!(id) {
                if v.get("return").is_none() {
                    return Err(std::io::Error::other(format!("sync answered {v}")));
                }
                return Ok(replies);
            }
            replies.push(v);
        }
    }

    /// Run a command; its whole reply.
    fn call(&mut self, cmd: &str, args: Value) -> std::io::Result<Value> {
        self.next_id += 1;
        let id = format!("c-{}", self.next_id);
        let mut msg = json!({"execute": cmd, "id": id});
        if !args.is_null() {
            msg["arguments"] = args;
        }
        self.w.write_all(format!("{msg}\n").as_bytes())?;
        loop {
            let v = self.line()?;
            if v["id"] == json!(id) {
                return Ok(v);
            }
            if v.get("event").is_some() {
                if self.events.len() == KEPT_EVENTS {
                    self.events.remove(0);
                }
                self.events.push(v);
            }
        }
    }

    /// Run a command that must succeed; its `return`.
    fn ok(&mut self, cmd: &str, args: Value) -> Value {
        let v = self
            .call(cmd, args.clone())
            .unwrap_or_else(|e| panic!("QMP {cmd} {args}: {e}"));
        assert!(v.get("return").is_some(), "QMP {cmd} {args}: {v}");
        v["return"].clone()
    }

    /// Wait for event `name` whose data member `key` is `val`.
    fn event(&mut self, name: &str, key: &str, val: &str) -> Value {
        let wanted = |v: &Value| v["event"] == json!(name) && v["data"][key] == json!(val);
        if let Some(i) = self.events.iter().position(wanted) {
            return self.events.remove(i);
        }
        loop {
            let v = self
                .line()
                .unwrap_or_else(|e| panic!("waiting for {name}: {e}"));
            if v["event"] == json!(name) && v["data"][key] == json!(val) {
                return v;
            }
        }
    }
}

/// Counts of one QMP chaos client.
#[derive(Default, Debug, Clone)]
struct QmpTally {
    sessions: u64,
    valid: u64,
    malformed: u64,
    garbage: u64,
    oversized: u64,
    cut: u64,
    slowest: Duration,
}

/// Malformed commands and a word of the error each must earn.
const MALFORMED: [(&str, &str); 8] = [
    (r#"{"execute":"no-such-command","id":1}"#, "CommandNotFound"),
    (
        r#"{"execute":"query-status","arguments":{"bogus":1},"id":2}"#,
        "unexpected",
    ),
    (r#"[1,2,3]"#, "must be a JSON object"),
    (r#"{"id":3}"#, "lacks member"),
    (r#"{"execute":42,"id":4}"#, "must be a string"),
    (
        r#"{"execute":"device_del","arguments":{"id":"no-such-dev"},"id":5}"#,
        "not found",
    ),
    (
        r#"{"execute":"chardev-add","arguments":{"id":"x","backend":{"type":"nope","data":{}}},"id":6}"#,
        "nope",
    ),
    (
        r#"{"execute":"ringbuf-read","arguments":{"device":"v4","size":-1},"id":7}"#,
        "size",
    ),
];

const VALID: [&str; 6] = [
    "query-status",
    "query-chardev",
    "query-virtio-serial",
    "query-vproxy",
    "query-version",
    "query-commands",
];

/// One of the 8 QMP clients: sessions of random length, each a random mix of valid,
/// malformed, garbage and oversized input (every one followed by a command of ours that must be
/// answered within [`QMP_DEADLINE`]), some ended halfway through a command.
fn qmp_chaos(sh: Arc<Shared>, mut rng: Rng, tally: Arc<Mutex<QmpTally>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        while sh.running() {
            let mut q = match Session::open(&sh.qmp_path) {
                Ok(q) => q,
                Err(e) => {
                    sh.fail(format!("QMP connect/negotiate: {e}"));
                    return;
                }
            };
            tally.lock().unwrap().sessions += 1;
            for _ in 0..rng.range(1, 40) {
                if !sh.running() {
                    break;
                }
                let t0 = Instant::now();
                let kind = rng.range(0, 99);
                let result = if kind < 50 {
                    let cmd = VALID[rng.range(0, VALID.len() as u64 - 1) as usize];
                    let r = q.call(cmd, Value::Null);
                    match r {
                        Ok(v) if v.get("return").is_some() => {
                            tally.lock().unwrap().valid += 1;
                            Ok(())
                        }
                        Ok(v) => Err(std::io::Error::other(format!("{cmd}: {v}"))),
                        Err(e) => Err(e),
                    }
                } else if kind < 75 {
                    let (raw, want) = MALFORMED[rng.range(0, 7) as usize];
                    q.send_then_sync(format!("{raw}\n").as_bytes())
                        .and_then(|r| {
                            let text = r.first().map(|v| v.to_string()).unwrap_or_default();
                            if r.len() == 1 && r[0].get("error").is_some() && text.contains(want) {
                                tally.lock().unwrap().malformed += 1;
                                Ok(())
                            } else {
                                Err(std::io::Error::other(format!("{raw} answered {r:?}")))
                            }
                        })
                } else if kind < 90 {
                    // Garbage, then a control character that resets QMP's parser.
                    let n = rng.range(1, 512) as usize;
                    const ALPHABET: &[u8] = b"{}[]\":,ab1 \x7f\xfe\\ntrue";
                    let junk: Vec<u8> = (0..n)
                        .map(|_| ALPHABET[rng.range(0, ALPHABET.len() as u64 - 1) as usize])
                        .chain(*b"\x01")
                        .collect();
                    q.send_then_sync(&junk).map(|r| {
                        debug_assert!(r.iter().all(|v| v.get("return").is_none()));
                        tally.lock().unwrap().garbage += 1;
                    })
                } else if kind < 95 {
                    // Over the 1 MiB limit: one error, and the connection lives on.
                    let big = format!(
                        "{{\"execute\":\"query-status\",\"arguments\":{{\"pad\":\"{}\"}}}}\n",
                        "A".repeat((1 << 20) + rng.range(1, 4096) as usize)
                    );
                    q.send_then_sync(big.as_bytes()).and_then(|r| {
                        if r.len() == 1 && r[0].get("error").is_some() {
                            tally.lock().unwrap().oversized += 1;
                            Ok(())
                        } else {
                            Err(std::io::Error::other(format!("oversized answered {r:?}")))
                        }
                    })
                } else {
                    // Leave halfway through a command.
                    let _ = q.w.write_all(br#"{"execute":"query-chardev","argu"#);
                    tally.lock().unwrap().cut += 1;
                    break;
                };
                let took = t0.elapsed();
                {
                    let mut t = tally.lock().unwrap();
                    t.slowest = t.slowest.max(took);
                }
                if let Err(e) = result {
                    sh.fail(format!("QMP client: {e} (after {took:?})"));
                    return;
                }
                std::thread::sleep(rng.millis(10, 500));
            }
        }
    })
}

/// Counts of the fault thread.
#[derive(Default, Debug, Clone)]
struct Faults {
    stops: u64,
    breaks: BTreeMap<String, u64>,
    /// Breaks per UART sent since the guest last booted.
    breaks_this_boot: BTreeMap<String, u64>,
    changes: u64,
    resets: u64,
}

/// Stops and continues, breaks, `chardev-change` of v1 between two socket paths, and resets
/// at the times chosen from the seed.
fn fault_thread(
    sh: Arc<Shared>,
    mut rng: Rng,
    v1_path: Arc<Mutex<PathBuf>>,
    reset_times: Vec<Duration>,
    faults: Arc<Mutex<Faults>>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut q = Session::open(&sh.qmp_path).expect("fault thread QMP");
        let paths = [sh.dir.join("v1-a.sock"), sh.dir.join("v1-b.sock")];
        let mut which = 0;
        let mut resets = reset_times.into_iter().peekable();
        while sh.running() {
            std::thread::sleep(rng.millis(1000, 4000));
            if !sh.running() {
                break;
            }
            if resets.peek().is_some_and(|t| sh.start.elapsed() >= *t) {
                resets.next();
                reset(&sh, &mut q, &faults);
                continue;
            }
            match rng.range(0, 2) {
                0 => {
                    q.ok("stop", Value::Null);
                    std::thread::sleep(rng.millis(200, 2000));
                    q.ok("cont", Value::Null);
                    faults.lock().unwrap().stops += 1;
                }
                1 => {
                    let id = if rng.chance(50) { "c2" } else { "c3" };
                    q.ok("chardev-send-break", json!({ "id": id }));
                    eprintln!("soak: {} ms: break on {id}", sh.now_ms());
                    let mut f = faults.lock().unwrap();
                    *f.breaks.entry(id.into()).or_default() += 1;
                    *f.breaks_this_boot.entry(id.into()).or_default() += 1;
                }
                _ => {
                    which = 1 - which;
                    let p = &paths[which];
                    let _ = std::fs::remove_file(p);
                    q.ok("chardev-change", socket_backend("v1", p));
                    *v1_path.lock().unwrap() = p.clone();
                    faults.lock().unwrap().changes += 1;
                }
            }
        }
    })
}

fn socket_backend(id: &str, path: &Path) -> Value {
    json!({"id": id, "backend": {"type": "socket", "data": {
        "addr": {"type": "unix", "data": {"path": path.to_str().unwrap()}},
        "server": true, "wait": false, "backlog": BACKLOG}}})
}

/// Reset the guest with every client connected and staying so (the gap a reset cuts is then
/// the reset's alone), and wait for the new boot.
fn reset(sh: &Shared, q: &mut Session, faults: &Mutex<Faults>) {
    sh.calm.store(true, Ordering::SeqCst);
    std::thread::sleep(Duration::from_secs(10));
    let epoch = sh.epoch.load(Ordering::SeqCst);
    sh.reset_at_ms.store(sh.now_ms(), Ordering::SeqCst);
    sh.resets.fetch_add(1, Ordering::SeqCst);
    q.ok("system_reset", Value::Null);
    {
        let mut f = faults.lock().unwrap();
        f.resets += 1;
        f.breaks_this_boot.clear();
    }
    let deadline = Instant::now() + BOOT_TIMEOUT;
    while sh.epoch.load(Ordering::SeqCst) == epoch && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(10));
    sh.calm.store(false, Ordering::SeqCst);
}

/// Reads ringbuf v4 over QMP at random intervals.
fn ringbuf_reader(sh: Arc<Shared>, c: Chan, mut rng: Rng) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut seen = 0u32;
        let mut q = Session::open(&sh.qmp_path).expect("ringbuf QMP");
        while sh.phase() != DONE {
            let data = read_ring(&mut q, "v4");
            feed(&sh, &c, &mut seen, &data);
            std::thread::sleep(rng.millis(100, 1500));
        }
    })
}

fn read_ring(q: &mut Session, id: &str) -> Vec<u8> {
    let r = q.ok(
        "ringbuf-read",
        json!({"device": id, "size": 1 << 20, "format": "base64"}),
    );
    base64::engine::general_purpose::STANDARD
        .decode(r.as_str().unwrap())
        .unwrap()
}

fn dropped_bytes(q: &mut Session, id: &str) -> u64 {
    let list = q.ok("query-chardev", Value::Null);
    list.as_array()
        .unwrap()
        .iter()
        .find(|c| c["label"] == json!(id))
        .and_then(|c| c["dropped-bytes"].as_u64())
        .unwrap_or_else(|| panic!("chardev {id} not in {list}"))
}

/// The hot port's cycles.
#[derive(Default, Debug, Clone)]
struct HotTally {
    cycles: u64,
    delivered: u64,
    gaps: u64,
    dropped: u64,
    /// Cycles in which the guest's writer got some bytes through.
    with_data: u64,
}

/// Adds a ringbuf-backed port, reads it a while, removes it, again and again. Every cycle's
/// bytes must be the pattern from its start, with gaps only where the ring overflowed.
fn hot_thread(sh: Arc<Shared>, mut rng: Rng, tally: Arc<Mutex<HotTally>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut q = Session::open(&sh.qmp_path).expect("hot QMP");
        let mut n = 0u64;
        while sh.running() {
            n += 1;
            let (cid, did) = (format!("hotc{n}"), format!("hot{n}"));
            q.ok(
                "chardev-add",
                json!({"id": cid, "backend": {"type": "ringbuf", "data": {"size": 65536}}}),
            );
            q.ok(
                "device_add",
                json!({"driver": "virtserialport", "id": did, "chardev": cid, "name": "soak.hot"}),
            );
            let mut v = Verifier::new(Stream {
                tag: HOT.1,
                period: Some(HOT.2),
            });
            let until = Instant::now() + rng.millis(10_000, 25_000);
            while Instant::now() < until && sh.running() {
                v.feed(&read_ring(&mut q, &cid));
                std::thread::sleep(rng.millis(200, 1500));
            }
            q.ok("device_del", json!({ "id": did }));
            q.event("DEVICE_DELETED", "device", &did);
            v.feed(&read_ring(&mut q, &cid));
            let dropped = dropped_bytes(&mut q, &cid);
            q.ok("chardev-remove", json!({ "id": cid }));
            let (_, gaps) = v.gap_totals();
            if let Some(e) = &v.error {
                sh.fail(format!("hot port cycle {n}: {e}"));
            } else if gaps != dropped || v.unexplained() > 0 {
                sh.fail(format!(
                    "hot port cycle {n}: gaps {gaps} bytes, ring dropped {dropped}, {} unexplained",
                    v.unexplained()
                ));
            }
            let mut t = tally.lock().unwrap();
            t.cycles += 1;
            t.delivered += v.delivered;
            t.gaps += gaps;
            t.dropped += dropped;
            t.with_data += u64::from(v.delivered > 0);
            drop(t);
            std::thread::sleep(rng.millis(500, 3000));
        }
    })
}

/// vproxy streams' outcomes.
#[derive(Default, Debug, Clone)]
struct VpTally {
    streams: u64,
    echoed_whole: u64,
    bytes: u64,
    abandoned: u64,
    cut_by_reset: u64,
    cut_by_guest: u64,
    damaged: u64,
}

/// Streams through the vproxy oforward to the guest's echo service, one at a time: each sends
/// numbered records and must get them back whole; some are abandoned halfway by the host.
fn vproxy_thread(
    sh: Arc<Shared>,
    path: PathBuf,
    mut rng: Rng,
    tally: Arc<Mutex<VpTally>>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut n = 0u32;
        let mut buf = vec![0u8; 65536];
        let mut q = Session::open(&sh.qmp_path).expect("vproxy QMP");
        while sh.running() {
            // A stream opened before the guest's endpoint is up waits for it: not a test of
            // anything, and a reset would cut it.
            let up = q.ok("query-vproxy", json!({"id": "vp"}))[0]["session"]["up"] == json!(true);
            if !up || sh.calm.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(500));
                continue;
            }
            n += 1;
            let resets_before = sh.resets.load(Ordering::SeqCst);
            let Ok(mut s) = UnixStream::connect(&path) else {
                std::thread::sleep(Duration::from_millis(500));
                continue;
            };
            let stream = Stream {
                tag: 1000 + n,
                period: None,
            };
            let len = rng.range(1, 8) as usize * 1024;
            let data = stream.bytes(0, len);
            let abandon = rng
                .chance(10)
                .then(|| rng.range(0, len as u64 - 1) as usize);
            s.set_read_timeout(Some(Duration::from_secs(180))).unwrap();
            let writer = {
                let mut w = s.try_clone().unwrap();
                let data = data.clone();
                std::thread::spawn(move || {
                    let _ = w.write_all(&data);
                })
            };
            let mut got = Vec::new();
            let mut outcome = "whole";
            while got.len() < len {
                if abandon.is_some_and(|a| got.len() >= a) {
                    outcome = "abandoned";
                    break;
                }
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => {
                        outcome = "cut";
                        break;
                    }
                    Ok(k) => got.extend_from_slice(&buf[..k]),
                }
            }
            let _ = s.shutdown(std::net::Shutdown::Both);
            let _ = writer.join();
            eprintln!(
                "soak: {} ms: vproxy stream {n}: {outcome}, {} of {len} bytes back",
                sh.now_ms(),
                got.len()
            );
            let mut t = tally.lock().unwrap();
            t.streams += 1;
            t.bytes += got.len() as u64;
            let intact = got[..] == data[..got.len().min(len)];
            match outcome {
                _ if !intact => {
                    t.damaged += 1;
                    let at = got.iter().zip(&data).position(|(a, b)| a != b).unwrap_or(0);
                    eprintln!("soak: vproxy stream {n}: echo differs at byte {at} of {len}");
                }
                "whole" => t.echoed_whole += 1,
                "abandoned" => t.abandoned += 1,
                _ if sh.resets.load(Ordering::SeqCst) != resets_before => t.cut_by_reset += 1,
                // Reset from the guest's side (its echo service, forking a `cat` per
                // connection, did not take it): whole or not at all, never wrong bytes.
                _ => t.cut_by_guest += 1,
            }
            drop(t);
            std::thread::sleep(rng.millis(100, 2000));
        }
    })
}

/// minivmm's open fds.
fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// minivmm's resident memory in KiB, the guest RAM mapping left out.
fn own_rss_kib(pid: u32) -> i64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let (mut total, mut guest) = (0i64, false);
    for line in smaps.lines() {
        let mut it = line.split_whitespace();
        match it.next() {
            Some("Size:") => {
                let size: u64 = it.next().unwrap().parse().unwrap();
                guest = size == GUEST_MIB * 1024;
            }
            Some("Rss:") if !guest => total += it.next().unwrap().parse::<i64>().unwrap(),
            _ => {}
        }
    }
    total
}

/// Prints the seed if the test fails, however it fails.
struct SeedOnFailure(u64);
impl Drop for SeedOnFailure {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "soak: FAILED with seed {0}: SOAK_SEED={0} make soak reproduces the driver's choices",
                self.0
            );
        }
    }
}

/// Build the soak's initramfs: the test image with minivmm-vp, the guest script, and the
/// writers' pattern files.
fn build_initramfs(dir: &Path) -> PathBuf {
    let mut extra = Vec::new();
    let script = dir.join("guest.sh");
    std::fs::write(&script, include_str!("../soak/guest.sh")).unwrap();
    extra.push(format!("{}:/soak/run.sh", script.display()));
    for (name, tag, records) in WRITERS.iter().chain([&HOT]) {
        let p = dir.join(format!("pattern-{name}"));
        std::fs::write(&p, pattern(*tag, *records)).unwrap();
        extra.push(format!("{}:/soak/{name}", p.display()));
    }
    let out = dir.join("soak.cpio");
    let status = std::process::Command::new("bash")
        .arg(tests::workspace_root().join("resources/initramfs/build.sh"))
        .arg(&out)
        .args(&extra)
        .env("VP", minivmm_vp_bin())
        .status()
        .expect("run resources/initramfs/build.sh");
    assert!(status.success(), "building the soak initramfs failed");
    out
}

#[test]
fn chaos_soak() {
    require_kvm();
    let seconds: u64 = std::env::var("SOAK_S")
        .ok()
        .map(|s| s.parse().expect("SOAK_S: a number of seconds"))
        .unwrap_or(DEFAULT_SOAK_S);
    let seed: u64 = std::env::var("SOAK_SEED")
        .ok()
        .map(|s| s.parse().expect("SOAK_SEED: a number"))
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("soak: seed {seed}, {seconds} s of chaos");
    let _seed_guard = SeedOnFailure(seed);
    let mut rng = Rng::new(seed);

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let initrd = build_initramfs(&dir);
    let kernel = test_kernel();
    let p = |n: &str| dir.join(n);
    let sock = |id: &str, path: PathBuf| {
        format!(
            "socket,id={id},path={},server=on,wait=off,backlog={BACKLOG}",
            path.display()
        )
    };
    let args: Vec<String> = vec![
        "--kernel".into(),
        kernel.display().to_string(),
        "--initrd".into(),
        initrd.display().to_string(),
        "--memory".into(),
        format!("{GUEST_MIB}M"),
        "--append".into(),
        test_cmdline(&run64("sh /soak/run.sh")),
        "--serial".into(),
        "stdio".into(),
        "--monitor".into(),
        p("qmp.sock").display().to_string(),
        "--chardev".into(),
        sock("c2", p("c2.sock")),
        "--chardev".into(),
        format!("pty,id=c3,path={},backlog={BACKLOG}", p("c3.pty").display()),
        "--chardev".into(),
        format!("file,id=c4,path={}", p("c4.out").display()),
        "--device".into(),
        "isa-serial,chardev=c2,index=1".into(),
        "--device".into(),
        "isa-serial,chardev=c3,index=2".into(),
        "--device".into(),
        "isa-serial,chardev=c4,index=3".into(),
        "--chardev".into(),
        sock("v0", p("v0.sock")),
        "--chardev".into(),
        sock("v1", p("v1-a.sock")),
        "--chardev".into(),
        format!("pty,id=v2,path={},backlog={BACKLOG}", p("v2.pty").display()),
        "--chardev".into(),
        format!("file,id=v3,path={}", p("v3.out").display()),
        "--chardev".into(),
        format!("ringbuf,id=v4,size={RINGBUF}"),
        "--chardev".into(),
        format!(
            "vproxy,id=vp,oforward=echo:unix:{}",
            p("vp-echo.sock").display()
        ),
        "--chardev".into(),
        sock("ctl", p("ctl.sock")),
    ]
    .into_iter()
    .chain(
        ["v0", "v1", "v2", "v3", "v4", "vp", "ctl"]
            .iter()
            .flat_map(|id| {
                [
                    "--device".to_string(),
                    format!("virtserialport,chardev={id},name=soak.{id}"),
                ]
            }),
    )
    .collect();
    let mut cmd = std::process::Command::new(minivmm_bin());
    cmd.args(&args);
    let mut vm = Vmm::spawn(cmd);
    let pid = vm.pid();

    let sh = Arc::new(Shared {
        dir: dir.clone(),
        qmp_path: p("qmp.sock"),
        phase: AtomicU8::new(RUN),
        calm: AtomicBool::new(true),
        resets: AtomicU32::new(0),
        reset_at_ms: AtomicU64::new(0),
        epoch: AtomicU32::new(0),
        start: Instant::now(),
        failure: Mutex::new(None),
    });
    let period = |name: &str| {
        WRITERS
            .iter()
            .find(|w| w.0 == name)
            .map(|w| (w.1, w.2))
            .unwrap()
    };
    let g2h = |name: &'static str, backend| {
        let (tag, recs) = period(name);
        Channel::new(name, backend, tag, Some(recs))
    };
    let echo = |name: &'static str, backend| {
        let (_, tag, _) = *ECHOES.iter().find(|e| e.0 == name).unwrap();
        Channel::new(name, backend, tag, None)
    };
    let rate = |name: &str| ECHOES.iter().find(|e| e.0 == name).unwrap().2;
    let chans: Vec<Chan> = vec![
        echo("c2", "socket"),
        g2h("c3", "pty"),
        g2h("c4", "file"),
        echo("v0", "socket"),
        g2h("v1", "socket+change"),
        echo("v2", "pty"),
        g2h("v3", "file"),
        g2h("v4", "ringbuf"),
    ];
    let ch = |name: &str| {
        chans
            .iter()
            .find(|c| c.lock().unwrap().name == name)
            .unwrap()
            .clone()
    };
    let v1_path = Arc::new(Mutex::new(p("v1-a.sock")));
    for path in ["c2.sock", "v0.sock", "v1-a.sock", "ctl.sock", "qmp.sock"] {
        wait_path(&p(path));
    }
    let mut clients = vec![
        socket_client(
            sh.clone(),
            ch("c2"),
            Arc::new(Mutex::new(p("c2.sock"))),
            rate("c2"),
            rng.fork(),
        ),
        pty_client(sh.clone(), ch("c3"), p("c3.pty"), 0, rng.fork()),
        file_reader(sh.clone(), ch("c4"), p("c4.out")),
        socket_client(
            sh.clone(),
            ch("v0"),
            Arc::new(Mutex::new(p("v0.sock"))),
            rate("v0"),
            rng.fork(),
        ),
        socket_client(sh.clone(), ch("v1"), v1_path.clone(), 0, rng.fork()),
        pty_client(sh.clone(), ch("v2"), p("v2.pty"), rate("v2"), rng.fork()),
        file_reader(sh.clone(), ch("v3"), p("v3.out")),
        ringbuf_reader(sh.clone(), ch("v4"), rng.fork()),
    ];
    let mut ctl = UnixStream::connect(p("ctl.sock")).unwrap();
    let mut mon = Session::open(&p("qmp.sock")).unwrap();

    vm.wait_for("SOAK-UP", BOOT_TIMEOUT);
    sh.epoch.store(1, Ordering::SeqCst);
    // Clients connect and data flows before the "before" figures are taken.
    std::thread::sleep(Duration::from_secs(8));
    let fds_before = fd_count(pid);
    let rss_before = own_rss_kib(pid);
    eprintln!("soak: guest up; minivmm has {fds_before} fds, {rss_before} KiB of its own");
    sh.calm.store(false, Ordering::SeqCst);
    let chaos_start = Instant::now();

    let qmp_tallies: Vec<_> = (0..8)
        .map(|_| Arc::new(Mutex::new(QmpTally::default())))
        .collect();
    let faults = Arc::new(Mutex::new(Faults::default()));
    let hot = Arc::new(Mutex::new(HotTally::default()));
    let vp = Arc::new(Mutex::new(VpTally::default()));
    let n_resets = (seconds / 300).max(1);
    let reset_times: Vec<Duration> = (0..n_resets)
        .map(|i| {
            let slot = seconds / n_resets;
            sh.start.elapsed()
                + Duration::from_secs(i * slot + rng.range(slot * 2 / 5, slot * 7 / 10))
        })
        .collect();
    let mut chaos: Vec<JoinHandle<()>> = qmp_tallies
        .iter()
        .map(|t| qmp_chaos(sh.clone(), rng.fork(), t.clone()))
        .collect();
    chaos.push(fault_thread(
        sh.clone(),
        rng.fork(),
        v1_path,
        reset_times,
        faults.clone(),
    ));
    chaos.push(hot_thread(sh.clone(), rng.fork(), hot.clone()));
    chaos.push(vproxy_thread(
        sh.clone(),
        p("vp-echo.sock"),
        rng.fork(),
        vp.clone(),
    ));

    // The chaos runs; the console says when the guest has booted again.
    while chaos_start.elapsed() < Duration::from_secs(seconds) || sh.calm.load(Ordering::SeqCst) {
        if vm
            .try_wait_for("SOAK-UP", Duration::from_millis(500))
            .is_some()
        {
            sh.epoch.fetch_add(1, Ordering::SeqCst);
        }
        if sh.failure.lock().unwrap().is_some() {
            break;
        }
    }
    eprintln!(
        "soak: chaos over after {:?}; draining",
        chaos_start.elapsed()
    );
    sh.phase.store(DRAIN, Ordering::SeqCst);
    for t in chaos {
        t.join().expect("a chaos thread panicked");
    }
    // Every client reconnects and stays; the guest's writers finish their pass and report.
    ctl.write_all(b"stop\n").unwrap();
    let mut passes = BTreeMap::new();
    while passes.len() < WRITERS.len() {
        let line = vm.wait_for("SOAK-SENT", Duration::from_secs(300));
        let w: Vec<&str> = line.split_whitespace().collect();
        let at = w.iter().position(|x| *x == "SOAK-SENT").unwrap();
        passes.insert(w[at + 1].to_string(), w[at + 2].parse::<u64>().unwrap());
    }
    vm.wait_for("SOAK-DONE", Duration::from_secs(300));
    let uart: Vec<String> = vm
        .output
        .iter()
        .filter(|l| l.contains("SOAK-UART"))
        .cloned()
        .collect();
    // Wait until every channel has gone quiet with everything in.
    let quiet = Instant::now() + Duration::from_secs(240);
    loop {
        let settled = chans.iter().all(|c| {
            let c = c.lock().unwrap();
            c.last_data.elapsed() > Duration::from_secs(10) && c.verifier.unexplained() == 0
        });
        if settled || Instant::now() > quiet {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let fds_after = fd_count(pid);
    let rss_after = own_rss_kib(pid);
    sh.phase.store(DONE, Ordering::SeqCst);
    for t in clients.drain(..) {
        t.join().expect("a client thread panicked");
    }

    // The accounting.
    let brk_oe_bo = |port: usize| -> (u64, u64) {
        let l = uart
            .iter()
            .find(|l| l.contains(&format!("SOAK-UART {port}: ")))
            .unwrap_or_else(|| panic!("no ttyS{port} line in {uart:?}"));
        let field = |k: &str| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .map_or(0, |v| v.parse::<u64>().unwrap())
        };
        (field("brk:"), field("oe:") + field("bo:"))
    };
    let mut failures: Vec<String> = sh.failure.lock().unwrap().iter().cloned().collect();
    println!(
        "\nsoak: seed {seed}, {seconds} s, {} reset(s)\n{:<4} {:<14} {:<10} {:>10} {:>10} {:>9} {:>7} {:>9} {:>9} {:>6} {:>5}",
        faults.lock().unwrap().resets,
        "chan",
        "backend",
        "direction",
        "sent",
        "delivered",
        "dropped",
        "guest",
        "pty-held",
        "reset-cut",
        "unacc",
        "drops"
    );
    for c in &chans {
        let mut c = c.lock().unwrap();
        let counted = dropped_bytes(&mut mon, c.name);
        let echo = c.verifier.period().is_none();
        let sent = if echo {
            c.sent
        } else {
            let per = c.verifier_period_bytes().unwrap();
            c.epoch_start + passes[c.name] * per
        };
        c.verifier.finish(sent);
        if let Some(e) = &c.verifier.error {
            failures.push(format!("{}: {e}", c.name));
        }
        let (reset_cut, gaps) = c.verifier.gap_totals();
        let guest = if c.name == "c2" { brk_oe_bo(1).1 } else { 0 };
        let pty_held = if c.backend == "pty" {
            gaps.saturating_sub(counted + guest)
        } else {
            0
        };
        let accounted = c.verifier.delivered + counted + guest + pty_held + reset_cut;
        // A periodic stream's sent figure of earlier boots is where their bytes stopped.
        let unaccounted = sent as i64 - accounted as i64;
        println!(
            "{:<4} {:<14} {:<10} {:>10} {:>10} {:>9} {:>7} {:>9} {:>9} {:>6} {:>5}",
            c.name,
            c.backend,
            if echo { "echo" } else { "guest->host" },
            sent,
            c.verifier.delivered,
            counted,
            guest,
            pty_held,
            reset_cut,
            unaccounted,
            c.drops
        );
        if unaccounted != 0 {
            failures.push(format!(
                "{}: {unaccounted} bytes unaccounted (received stream at {}, {} bytes unexplained)",
                c.name,
                c.verifier.pos,
                c.verifier.unexplained()
            ));
        }
        if gaps != counted + guest + pty_held {
            failures.push(format!(
                "{}: gaps of {gaps} bytes but {counted} counted by minivmm, {guest} by the guest",
                c.name
            ));
        }
        if c.backend == "pty" && pty_held > (c.drops + 1) * PTY_HELD_MAX {
            failures.push(format!("{}: {pty_held} bytes held by pty closes", c.name));
        }
        if c.backend == "pty" && pty_held < c.pty_held_min {
            failures.push(format!(
                "{}: closes left at least {} bytes unread, the gaps only {pty_held}",
                c.name, c.pty_held_min
            ));
        }
    }
    let f = faults.lock().unwrap().clone();
    for (port, id) in [(1, "c2"), (2, "c3")] {
        let want = f.breaks_this_boot.get(id).copied().unwrap_or(0);
        let (brk, _) = brk_oe_bo(port);
        if brk != want {
            failures.push(format!(
                "ttyS{port} ({id}) counted {brk} breaks, {want} sent this boot"
            ));
        }
    }
    let h = hot.lock().unwrap().clone();
    println!(
        "hot  ringbuf, {} add/remove cycles ({} with data): {} bytes delivered in order, {} dropped by the ring (= gaps {})",
        h.cycles, h.with_data, h.delivered, h.dropped, h.gaps
    );
    let v = vp.lock().unwrap().clone();
    let vq = mon.ok("query-vproxy", json!({"id": "vp"}));
    eprintln!("soak: query-vproxy at the end: {}", vq[0]["session"]);
    println!(
        "vp   vproxy, {} streams: {} echoed whole, {} abandoned by the host, {} cut by a reset, {} reset by the guest's side, {} damaged; {} bytes back",
        v.streams, v.echoed_whole, v.abandoned, v.cut_by_reset, v.cut_by_guest, v.damaged, v.bytes
    );
    if v.damaged > 0 && !host_is_kvm_pvm() {
        failures.push(format!("{} vproxy streams came back damaged", v.damaged));
    } else if v.damaged > 0 {
        println!(
            "     (damage in the guest endpoint's own copies, a kvm_pvm fault: resources/README.md)"
        );
    }
    let mut total = QmpTally::default();
    for t in &qmp_tallies {
        let t = t.lock().unwrap();
        total.sessions += t.sessions;
        total.valid += t.valid;
        total.malformed += t.malformed;
        total.garbage += t.garbage;
        total.oversized += t.oversized;
        total.cut += t.cut;
        total.slowest = total.slowest.max(t.slowest);
    }
    println!(
        "qmp  8 clients, {} sessions: {} valid, {} malformed, {} garbage, {} oversized, {} cut mid-command; slowest answer {:?}",
        total.sessions, total.valid, total.malformed, total.garbage, total.oversized, total.cut, total.slowest
    );
    println!(
        "faults: {} stop/cont, breaks {:?}, {} chardev-change, {} reset(s)",
        f.stops, f.breaks, f.changes, f.resets
    );
    println!(
        "minivmm: fds {fds_before} -> {fds_after}, own RSS {rss_before} -> {rss_after} KiB (bound +{RSS_BOUND_KIB})"
    );
    if fds_after != fds_before {
        failures.push(format!("fds {fds_before} before, {fds_after} after"));
    }
    if rss_after - rss_before > RSS_BOUND_KIB {
        failures.push(format!("own RSS grew {} KiB", rss_after - rss_before));
    }
    let status = mon.ok("query-status", Value::Null);
    assert_eq!(status["status"], json!("running"), "{status}");
    drop(mon);
    let mut q = Qmp::connect(&p("qmp.sock")).0;
    q.ok("qmp_capabilities", Value::Null);
    q.ok("quit", Value::Null);
    let exit = vm.wait_exit(Duration::from_secs(60));
    assert!(
        failures.is_empty(),
        "soak failed (seed {seed}):\n{}\n{}",
        failures.join("\n"),
        vm.transcript()
    );
    assert_eq!(exit.code(), Some(0), "minivmm exit");
}
