//! Test helpers: a tiny poll(2) event loop that drives backends the way the VMM's event loop
//! does, with a deadline on everything so a broken backend fails a test instead of hanging it.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::backend::{poll_backends, Backend, Event};

/// How long any test helper waits before failing.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// Poll the fds of `backends` once for up to `timeout_ms` and dispatch what was ready.
/// Returns whether anything was.
pub fn pump_many(backends: &mut [&mut dyn Backend], timeout_ms: i32) -> bool {
    if backends.iter_mut().all(|b| watched(&mut **b).is_empty()) {
        std::thread::sleep(Duration::from_millis(timeout_ms.clamp(0, 5) as u64));
        return false;
    }
    poll_backends(backends, timeout_ms).expect("poll")
}

/// Poll one backend once.
/// The fds `b` registers now, and what for (attached to a scratch poller for the look).
pub fn watched(b: &mut dyn Backend) -> Vec<(std::os::unix::io::RawFd, crate::Interest)> {
    let poller = crate::Poller::new().expect("epoll");
    b.attach(poller.registrar(0));
    let fds = poller.watched().expect("fdinfo");
    b.detach();
    fds
}

pub fn pump(b: &mut dyn Backend, timeout_ms: i32) -> bool {
    pump_many(&mut [b], timeout_ms)
}

/// Pump and pull input until `n` bytes arrived; panics after [`DEADLINE`].
pub fn read_n(b: &mut dyn Backend, n: usize) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let end = Instant::now() + DEADLINE;
    while got.len() < n {
        assert!(
            Instant::now() < end,
            "timed out reading {} bytes, got {got:?}",
            n
        );
        let want = (n - got.len()).min(buf.len());
        let k = b.read(&mut buf[..want]).unwrap();
        got.extend_from_slice(&buf[..k]);
        if k == 0 {
            pump(b, 10);
        }
    }
    got
}

/// Pull whatever input is available now.
pub fn drain_input(b: &mut dyn Backend) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let k = b.read(&mut buf).unwrap();
        if k == 0 {
            return got;
        }
        got.extend_from_slice(&buf[..k]);
    }
}

/// Pump until an event matching `pred` arrives; returns the events seen up to it.
pub fn wait_event(b: &mut dyn Backend, pred: impl Fn(&Event) -> bool) -> Vec<Event> {
    let mut seen = Vec::new();
    let end = Instant::now() + DEADLINE;
    loop {
        let evs = b.take_events();
        let hit = evs.iter().any(&pred);
        seen.extend(evs);
        if hit {
            return seen;
        }
        assert!(
            Instant::now() < end,
            "timed out waiting for an event, saw {}",
            tail(&seen)
        );
        pump(b, 10);
    }
}

/// `len` pseudo-random bytes (xorshift), different for each `seed`.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = 0x2545_F491_4F6C_DD1D ^ seed.wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Make a FIFO.
pub fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: c is a valid NUL-terminated path that outlives the call.
    let r = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
    assert_eq!(r, 0, "mkfifo {}", path.display());
}

/// Pump like a frontend that reads (and discards) input until the peer is gone.
pub fn wait_closed(b: &mut dyn Backend) -> Vec<Event> {
    let mut seen = Vec::new();
    let end = Instant::now() + DEADLINE;
    loop {
        drain_input(b);
        let evs = b.take_events();
        let hit = evs.contains(&Event::Closed);
        seen.extend(evs);
        if hit {
            return seen;
        }
        assert!(
            Instant::now() < end,
            "timed out waiting for Closed, saw {}",
            tail(&seen)
        );
        pump(b, 10);
    }
}

/// The last few events, for a short failure message.
fn tail(seen: &[Event]) -> String {
    const SHOWN: usize = 8;
    let from = seen.len().saturating_sub(SHOWN);
    format!("{} events, last {:?}", seen.len(), &seen[from..])
}

/// The terminal settings of `fd` as the C library reads them (`tcgetattr(3)`, `TCGETS`): the
/// tests check what [`crate::term`] (rustix, `TCSETS2`) set through a path of their own.
pub fn tcgetattr(fd: std::os::unix::io::RawFd) -> std::io::Result<libc::termios> {
    let mut t = std::mem::MaybeUninit::<libc::termios>::zeroed();
    // SAFETY: tcgetattr writes one termios into t, which we own and which is sized for it.
    if unsafe { libc::tcgetattr(fd, t.as_mut_ptr()) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: tcgetattr succeeded, so t is initialised (and all-zero was valid anyway).
    Ok(unsafe { t.assume_init() })
}

/// An `int` socket option, read with libc (an independent check of what socket2 set).
pub fn getsockopt_int(
    fd: std::os::unix::io::RawFd,
    level: libc::c_int,
    name: libc::c_int,
) -> std::io::Result<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: the kernel writes at most len bytes into v, both of which we own.
    let r =
        unsafe { libc::getsockopt(fd, level, name, std::ptr::addr_of_mut!(v).cast(), &mut len) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(v)
}
