//! The event-loop side of a COM port: the subscriber that runs a [`SerialPort`]'s I/O when its
//! kick eventfd, its timer or one of its backend's fds fires, and keeps the epoll
//! registrations of the backend's (changing) fds in step with what the backend wants.

use std::collections::HashMap;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chardev::{Interest, Readiness};
use devices::bus::lock;
use devices::serial_port::SerialPort;
use devices::Clock;
use event_manager::{EventOps, Events, MutEventSubscriber};

use crate::vcpu::{ExitLatch, VmExit};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

/// Shortest timer the handler arms (a deadline already past fires after this).
const MIN_TIMER: Duration = Duration::from_micros(1);

/// Keeps a set of fds registered in epoll with the interests a backend asks for.
///
/// Backends close fds on their own (a peer hangs up, a client goes) before the next `sync`
/// can take them out of epoll, and the next fd they open often gets the same number. So epoll
/// watches a duplicate of each fd, owned here: removing it always works, and a new file behind
/// a reused number is told from the old one ([`same_file`]) and registered afresh. Events
/// arrive on the duplicates; [`FdRegistrations::original`] maps them back.
#[derive(Default)]
pub struct FdRegistrations {
    /// Backend fd → (the duplicate epoll watches, its interest).
    registered: HashMap<RawFd, (OwnedFd, EventSet)>,
    /// Duplicate → backend fd.
    by_dup: HashMap<RawFd, RawFd>,
}

/// `kcmp(2)`'s "same open file description" comparison.
const KCMP_FILE: libc::c_long = 0;

/// Whether `fd` and `other` refer to the same open file (false once `fd` is closed).
pub fn same_file(fd: RawFd, other: RawFd) -> bool {
    let pid = libc::c_long::from(std::process::id() as i32);
    // SAFETY: kcmp only compares two fd numbers of this process; no memory is passed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            pid,
            pid,
            KCMP_FILE,
            libc::c_long::from(fd),
            libc::c_long::from(other),
        )
    };
    if r >= 0 {
        return r == 0;
    }
    // No kcmp (an old kernel without CONFIG_KCMP): compare what fstat says.
    let stat = |f: RawFd| {
        let mut st = std::mem::MaybeUninit::<libc::stat>::zeroed();
        // SAFETY: fstat fills the stat buffer it is given, which is ours and sized for it.
        (unsafe { libc::fstat(f, st.as_mut_ptr()) } == 0).then(|| {
            // SAFETY: fstat succeeded, so the buffer is initialised.
            let st = unsafe { st.assume_init() };
            (st.st_dev, st.st_ino, st.st_mode)
        })
    };
    matches!((stat(fd), stat(other)), (Some(a), Some(b)) if a == b)
}

impl FdRegistrations {
    /// Make epoll watch exactly `wanted` (fds with no interest are removed).
    pub fn sync(&mut self, ops: &mut EventOps, wanted: &[(RawFd, Interest)]) {
        let mut next: HashMap<RawFd, EventSet> = HashMap::new();
        for &(fd, interest) in wanted {
            let mut set = EventSet::empty();
            if interest.read {
                set |= EventSet::IN;
            }
            if interest.write {
                set |= EventSet::OUT;
            }
            if !set.is_empty() {
                *next.entry(fd).or_insert(EventSet::empty()) |= set;
            }
        }
        let stale: Vec<RawFd> = self
            .registered
            .iter()
            .filter(|(fd, (dup, _))| !next.contains_key(fd) || !same_file(**fd, dup.as_raw_fd()))
            .map(|(&fd, _)| fd)
            .collect();
        for fd in stale {
            if let Some((dup, set)) = self.registered.remove(&fd) {
                self.by_dup.remove(&dup.as_raw_fd());
                if let Err(e) = ops.remove(Events::new_raw(dup.as_raw_fd(), set)) {
                    log::debug!("epoll remove fd {fd}: {e}");
                }
            }
        }
        for (&fd, &set) in &next {
            match self.registered.get_mut(&fd) {
                Some((_, old)) if *old == set => {}
                Some((dup, old)) => {
                    if let Err(e) = ops.modify(Events::new_raw(dup.as_raw_fd(), set)) {
                        log::warn!("epoll modify fd {fd}: {e}");
                    }
                    *old = set;
                }
                None => {
                    // SAFETY: F_DUPFD_CLOEXEC on an fd number only creates a new fd or fails.
                    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
                    if dup < 0 {
                        log::warn!("cannot watch fd {fd}: {}", std::io::Error::last_os_error());
                        continue;
                    }
                    // SAFETY: `dup` was just created by fcntl and is owned by nobody else.
                    let dup = unsafe { OwnedFd::from_raw_fd(dup) };
                    if let Err(e) = ops.add(Events::new_raw(dup.as_raw_fd(), set)) {
                        log::warn!("epoll register fd {fd}: {e}");
                        continue;
                    }
                    self.by_dup.insert(dup.as_raw_fd(), fd);
                    self.registered.insert(fd, (dup, set));
                }
            }
        }
    }

    /// The backend fd behind `fd`, an fd epoll reported, if it is one of ours.
    pub fn original(&self, fd: RawFd) -> Option<RawFd> {
        self.by_dup.get(&fd).copied()
    }
}

/// Turn an epoll event set into backend readiness.
pub fn readiness(set: EventSet) -> Readiness {
    Readiness {
        readable: set.contains(EventSet::IN),
        writable: set.contains(EventSet::OUT),
        hangup: set.intersects(EventSet::HANG_UP | EventSet::READ_HANG_UP | EventSet::ERROR),
    }
}

/// Make `fd` non-blocking. The port's timerfd must be: one epoll batch can report it
/// readable after an earlier event of the same batch re-armed (or disarmed) it, and a
/// blocking read would then hold the event loop until the new deadline, or for ever.
fn set_nonblocking(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on an fd this handler owns; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The subscriber for one COM port.
pub struct SerialHandler {
    port: Arc<Mutex<SerialPort>>,
    kick: RawFd,
    timer: TimerFd,
    clock: Arc<dyn Clock>,
    fds: FdRegistrations,
    exit: Arc<ExitLatch>,
}

impl SerialHandler {
    /// A handler for `port`, whose device uses `clock`.
    pub fn new(
        port: Arc<Mutex<SerialPort>>,
        clock: Arc<dyn Clock>,
        exit: Arc<ExitLatch>,
    ) -> std::io::Result<Self> {
        let kick = lock(&port).kick_fd();
        let timer = TimerFd::new()?;
        set_nonblocking(timer.as_raw_fd())?;
        Ok(SerialHandler {
            port,
            kick,
            timer,
            clock,
            fds: FdRegistrations::default(),
            exit,
        })
    }

    fn service(&mut self, ops: &mut EventOps) {
        let (deadline, wanted, quit) = {
            let mut port = lock(&self.port);
            let deadline = port.service();
            let quit = port.backend_mut().take_exit_request();
            (deadline, port.backend_fds(), quit)
        };
        if quit {
            // A mux's Ctrl-A x: the user quits minivmm as QEMU's `-serial mon:stdio` allows.
            self.exit.exit(VmExit::Quit);
        }
        self.fds.sync(ops, &wanted);
        let result = match deadline {
            Some(at) => {
                let now = self.clock.now_ns();
                let wait = Duration::from_nanos(at.saturating_sub(now)).max(MIN_TIMER);
                self.timer.reset(wait, None)
            }
            None => self.timer.clear(),
        };
        if let Err(e) = result {
            log::error!("serial timer: {e}");
        }
    }
}

impl MutEventSubscriber for SerialHandler {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.timer.as_raw_fd() {
            // Non-blocking read of the expiration count; nothing to do with the value.
            let mut buf = [0u8; 8];
            // SAFETY: reading 8 bytes into a local 8-byte buffer from a timerfd we own.
            let _ = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        } else if let Some(fd) = self.fds.original(fd) {
            lock(&self.port).on_backend_ready(fd, readiness(events.event_set()));
        }
        self.service(ops);
    }

    fn init(&mut self, ops: &mut EventOps) {
        for fd in [self.kick, self.timer.as_raw_fd()] {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                log::error!("serial: cannot watch fd {fd}: {e}");
            }
        }
        self.service(ops);
    }
}
