//! `minivmm relay`: two chardevs joined through minivmm's own event loop, no guest.
//!
//! [`RelayHandler`] is a frontend like a UART or a virtio port: it pulls each backend's input
//! only as far as the other backend accepts it (a bounded carry buffer per direction, input
//! unwanted while it is full) and writes the rest after `Writable`. It runs in the production
//! [`EventLoop`] with the production chardev registry, so a `vproxy` chardev relayed to a socket
//! whose peer is `minivmm-vp` is the whole host side of vproxy without a VM: what the benches
//! measure the VMM's own cost per event with, and what the host-only tests drive.
//!
//! Nothing here touches KVM.

use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use chardev::{Backend, ChardevSpec, Event, OwnerGroup, Readiness, Registry, Token};
use event_manager::{EventOps, Events, MutEventSubscriber};
use thiserror::Error;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::event_loop::{block_stop_signals, EventLoop, Lifecycle, PolledFrontend, SignalFd};
use crate::seccomp::{SeccompError, SeccompMode, ThreadKind};
use crate::vcpu::{ExitLatch, ResetAction, VmExit};

/// Bytes carried per read.
pub const RELAY_CHUNK: usize = 64 * 1024;
/// Reads per direction in one pass before the relay yields to the event loop (and kicks
/// itself to come back).
const PASS_ROUNDS: usize = 16;

/// Why the relay could not run.
#[derive(Debug, Error)]
pub enum RelayError {
    /// The seccomp filter could not be installed.
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    /// A chardev could not be opened.
    #[error("--chardev {id}")]
    Chardev {
        /// The chardev id.
        id: String,
        /// Why.
        #[source]
        source: chardev::Error,
    },
    /// Not exactly two chardevs.
    #[error("--chardev: a relay joins exactly two chardevs, {0} given")]
    Count(usize),
    /// An OS call failed.
    #[error("{0}")]
    Io(&'static str, #[source] std::io::Error),
    /// The event loop failed.
    #[error("event loop")]
    EventLoop(#[source] event_manager::Error),
}

/// What the relay did, printed when it ends.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RelayStats {
    /// Backend fd events dispatched to the relay.
    pub events: u64,
    /// Bytes from the first chardev to the second.
    pub bytes_ab: u64,
    /// Bytes from the second chardev to the first.
    pub bytes_ba: u64,
}

/// One direction: what was read from the source and not yet taken by the destination.
#[derive(Default)]
struct Carry {
    buf: Vec<u8>,
    pos: usize,
    /// The source announced input not yet pulled to the end.
    pending: bool,
    /// What the source was last told about wanting input.
    wanted: Option<bool>,
}

impl Carry {
    fn is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }
}

/// The frontend joining two backends.
pub struct RelayHandler {
    ends: [Box<dyn Backend>; 2],
    carry: [Carry; 2],
    /// Signalled when a pass stopped with work left.
    kick: EventFd,
    scratch: Vec<u8>,
    stats: RelayStats,
}

impl RelayHandler {
    /// Join `a` and `b`.
    pub fn new(a: Box<dyn Backend>, b: Box<dyn Backend>) -> std::io::Result<Self> {
        Ok(RelayHandler {
            ends: [a, b],
            carry: [Carry::default(), Carry::default()],
            kick: EventFd::new(EFD_NONBLOCK)?,
            scratch: vec![0u8; RELAY_CHUNK],
            stats: RelayStats::default(),
        })
    }

    /// What the relay did so far.
    pub fn stats(&self) -> RelayStats {
        self.stats
    }

    /// Move bytes both ways until nothing moves or the pass is used up.
    fn pump(&mut self) {
        for (i, end) in self.ends.iter_mut().enumerate() {
            for ev in end.take_events() {
                if matches!(ev, Event::Readable | Event::Opened) {
                    self.carry[i].pending = true;
                }
            }
        }
        let mut busy = false;
        for _ in 0..PASS_ROUNDS {
            let moved = self.step(0) | self.step(1);
            busy = moved;
            if !moved {
                break;
            }
        }
        for i in 0..2 {
            let want = self.carry[i].is_empty();
            if self.carry[i].wanted != Some(want) {
                self.carry[i].wanted = Some(want);
                self.ends[i].set_input_wanted(want);
            }
        }
        if busy {
            // Work left: come back after the other fds had their turn.
            let _ = self.kick.write(1);
        }
    }

    /// One round of direction `from` → the other end. Returns whether bytes moved.
    fn step(&mut self, from: usize) -> bool {
        let to = 1 - from;
        let mut moved = false;
        let c = &mut self.carry[from];
        if c.is_empty() && c.pending {
            let n = self.ends[from].read(&mut self.scratch).unwrap_or(0);
            if n < self.scratch.len() {
                c.pending = false;
            }
            c.buf.clear();
            c.buf.extend_from_slice(&self.scratch[..n]);
            c.pos = 0;
            moved |= n > 0;
        }
        if !c.is_empty() {
            let n = self.ends[to].write(&c.buf[c.pos..]).unwrap_or(0);
            c.pos += n;
            if from == 0 {
                self.stats.bytes_ab += n as u64;
            } else {
                self.stats.bytes_ba += n as u64;
            }
            moved |= n > 0;
        }
        moved
    }
}

impl PolledFrontend for RelayHandler {
    fn attach(&mut self, owners: OwnerGroup) {
        self.ends[0].attach(owners.registrar(0));
        self.ends[1].attach(owners.registrar(1));
    }

    fn on_fd_event(&mut self, part: u16, token: Token, readiness: Readiness) {
        self.stats.events += 1;
        if let Some(end) = self.ends.get_mut(usize::from(part)) {
            end.on_ready(token, readiness);
        }
    }

    fn after_fd_events(&mut self) {
        self.pump();
    }
}

impl MutEventSubscriber for RelayHandler {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.kick.read();
        self.pump();
    }

    fn init(&mut self, ops: &mut EventOps) {
        let fd: RawFd = self.kick.as_raw_fd();
        if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
            log::error!("relay: cannot watch its kick: {e}");
        }
        self.pump();
    }
}

/// Open the chardevs of `specs` (exactly two) and relay between them until SIGINT, SIGTERM or
/// SIGHUP, confined by the event loop's seccomp filter once they are open (`seccomp`);
/// returns what was moved.
pub fn run(specs: &[ChardevSpec], seccomp: SeccompMode) -> Result<RelayStats, RelayError> {
    if specs.len() != 2 {
        return Err(RelayError::Count(specs.len()));
    }
    block_stop_signals().map_err(|e| RelayError::Io("cannot block signals", e))?;
    let signals = SignalFd::new().map_err(|e| RelayError::Io("cannot create signalfd", e))?;
    let mut registry = Registry::new();
    let mut ends = Vec::new();
    for spec in specs {
        let chardev_err = |source| RelayError::Chardev {
            id: spec.id.clone(),
            source,
        };
        registry.add(spec).map_err(chardev_err)?;
        ends.push(registry.take(&spec.id).map_err(chardev_err)?);
    }
    let b = ends.pop().expect("two chardevs");
    let a = ends.pop().expect("two chardevs");
    let exit = ExitLatch::new(ResetAction::Exit)
        .map_err(|e| RelayError::Io("cannot create eventfd", e))?;
    let mut event_loop =
        EventLoop::new().map_err(|e| RelayError::Io("cannot create the event loop", e))?;
    let relay = Arc::new(Mutex::new(
        RelayHandler::new(a, b).map_err(|e| RelayError::Io("cannot create eventfd", e))?,
    ));
    event_loop.add_frontend(relay.clone());
    event_loop.add_subscriber(Arc::new(Mutex::new(Lifecycle::new(exit.clone(), signals))));
    if seccomp != SeccompMode::Off {
        crate::seccomp::install_sigsys_handler()?;
    }
    crate::seccomp::install(ThreadKind::EventLoop, seccomp, "main")?;
    while !exit.stopping() {
        event_loop.run().map_err(RelayError::EventLoop)?;
    }
    if let Some(VmExit::Signal(sig)) = exit.reason() {
        log::info!("relay stopped by signal {sig}");
    }
    let stats = devices::bus::lock(&relay).stats();
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::time::{Duration, Instant};

    /// Two unix socket chardevs relayed through the production event loop: bytes cross both
    /// ways intact, and a slow reader pushes back instead of growing a buffer.
    #[test]
    fn relays_two_sockets_both_ways_with_backpressure() {
        let dir = tempfile::tempdir().unwrap();
        let pa = dir.path().join("a.sock");
        let pb = dir.path().join("b.sock");
        let spec = |id: &str, p: &std::path::Path| {
            ChardevSpec::parse(&format!(
                "socket,id={id},path={},server=on,wait=off",
                p.display()
            ))
            .unwrap()
        };
        let mut registry = Registry::new();
        registry.add(&spec("a", &pa)).unwrap();
        registry.add(&spec("b", &pb)).unwrap();
        let relay =
            RelayHandler::new(registry.take("a").unwrap(), registry.take("b").unwrap()).unwrap();
        let relay = Arc::new(Mutex::new(relay));
        let mut event_loop = EventLoop::new().unwrap();
        event_loop.add_frontend(relay.clone());
        let mut ca = UnixStream::connect(&pa).unwrap();
        let mut cb = UnixStream::connect(&pb).unwrap();
        const TOTAL: usize = 4 << 20;
        let data: Vec<u8> = (0..TOTAL).map(|i| (i * 7 + i / 251) as u8).collect();
        let writer = {
            let data = data.clone();
            let mut ca = ca.try_clone().unwrap();
            std::thread::spawn(move || ca.write_all(&data).unwrap())
        };
        cb.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
        let mut got = Vec::with_capacity(TOTAL);
        let mut buf = vec![0u8; 4096];
        let end = Instant::now() + Duration::from_secs(30);
        while got.len() < TOTAL {
            assert!(Instant::now() < end, "stuck at {}", got.len());
            event_loop.run_with_timeout(1).unwrap();
            if let Ok(n) = cb.read(&mut buf) {
                got.extend_from_slice(&buf[..n]);
            }
        }
        writer.join().unwrap();
        assert!(got == data, "bytes lost or reordered a->b");
        cb.write_all(b"and back").unwrap();
        ca.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
        let mut back = Vec::new();
        while back.len() < 8 {
            assert!(Instant::now() < end, "stuck on the way back");
            event_loop.run_with_timeout(1).unwrap();
            if let Ok(n) = ca.read(&mut buf) {
                back.extend_from_slice(&buf[..n]);
            }
        }
        assert_eq!(back, b"and back");
        let stats = devices::bus::lock(&relay).stats();
        assert_eq!((stats.bytes_ab, stats.bytes_ba), (TOTAL as u64, 8));
        assert!(stats.events > 0);
    }
}
