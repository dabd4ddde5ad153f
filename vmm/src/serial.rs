//! The event-loop side of a COM port: the subscriber that runs a [`SerialPort`]'s I/O when its
//! kick eventfd, its timer or one of its backend's fds fires, and keeps the epoll
//! registrations of the backend's (changing) fds in step with what the backend wants.

use std::collections::HashMap;
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
#[derive(Default)]
pub struct FdRegistrations {
    registered: HashMap<RawFd, EventSet>,
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
        for (&fd, &set) in &self.registered {
            if !next.contains_key(&fd) {
                if let Err(e) = ops.remove(Events::new_raw(fd, set)) {
                    log::debug!("epoll remove fd {fd}: {e}");
                }
            }
        }
        for (&fd, &set) in &next {
            let result = match self.registered.get(&fd) {
                Some(&old) if old == set => Ok(()),
                Some(_) => ops.modify(Events::new_raw(fd, set)),
                None => ops.add(Events::new_raw(fd, set)),
            };
            if let Err(e) = result {
                log::warn!("epoll register fd {fd}: {e}");
            }
        }
        self.registered = next;
    }

    /// Whether `fd` is one of the registered backend fds.
    pub fn contains(&self, fd: RawFd) -> bool {
        self.registered.contains_key(&fd)
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
        Ok(SerialHandler {
            port,
            kick,
            timer: TimerFd::new()?,
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
        } else if fd != self.kick && self.fds.contains(fd) {
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
