//! The event-loop side of a COM port: the subscriber that runs a [`SerialPort`]'s I/O when its
//! kick eventfd or its timer fires (both watched by the event manager for the handler's life),
//! or when one of its backend's fds does (the backend registers those itself in the shared
//! backend poller, see [`crate::event_loop`]).

use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chardev::{OwnerGroup, Readiness, Token};
use devices::bus::lock;
use devices::serial_port::SerialPort;
use devices::Clock;
use event_manager::{EventOps, Events, MutEventSubscriber};

use crate::event_loop::PolledFrontend;
use crate::vcpu::{ExitLatch, VmExit};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

/// Shortest timer the handler arms (a deadline already past fires after this).
const MIN_TIMER: Duration = Duration::from_micros(1);

/// Make `fd` non-blocking. The port's timerfd must be: one epoll batch can report it
/// readable after an earlier event of the same batch re-armed (or disarmed) it, and a
/// blocking read would then hold the event loop until the new deadline, or for ever.
pub(crate) fn set_nonblocking(fd: RawFd) -> std::io::Result<()> {
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
            exit,
        })
    }

    fn service(&mut self) {
        let (deadline, quit) = {
            let mut port = lock(&self.port);
            let deadline = port.service();
            let quit = chardev::backend::take_exit_request(port.backend_mut());
            (deadline, quit)
        };
        if quit {
            // A mux's Ctrl-A x: the user quits minivmm as QEMU's `-serial mon:stdio` allows.
            self.exit.exit(VmExit::Quit);
        }
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
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.timer.as_raw_fd() {
            // Non-blocking read of the expiration count; nothing to do with the value.
            let mut buf = [0u8; 8];
            // SAFETY: reading 8 bytes into a local 8-byte buffer from a timerfd we own.
            let _ = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        }
        self.service();
    }

    fn init(&mut self, ops: &mut EventOps) {
        for fd in [self.kick, self.timer.as_raw_fd()] {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                log::error!("serial: cannot watch fd {fd}: {e}");
            }
        }
        self.service();
    }
}

impl PolledFrontend for SerialHandler {
    fn attach(&mut self, owners: OwnerGroup) {
        lock(&self.port).attach_backend(owners.registrar(0));
    }

    fn on_fd_event(&mut self, _part: u16, token: Token, readiness: Readiness) {
        lock(&self.port).on_backend_ready(token, readiness);
    }

    fn after_fd_events(&mut self) {
        self.service();
    }
}
