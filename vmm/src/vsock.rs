//! The event-loop side of the virtio-vsock device: the subscriber that runs the transport's
//! queues when a queue-notify ioeventfd, its kick or its time-out timer fires (the event
//! manager watches those for the device's life), or when one of the muxer's host sockets does
//! (the device registers each, with its token, in the shared backend poller: the listener at
//! `PATH`, clients typing their `CONNECT` line, one stream per connection).
//!
//! The timer is armed after every service for the device's next deadline (an unanswered
//! REQUEST, a shutdown that does not drain, a slow `CONNECT` line, a paused listener).

use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chardev::{OwnerGroup, Readiness, Token};
use devices::bus::lock;
use devices::virtio::vsock::VirtioVsock;
use devices::virtio::VirtioMmio;
use devices::Clock;
use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

use crate::event_loop::PolledFrontend;
use crate::serial::set_nonblocking;

/// A virtio-vsock behind its virtio-mmio transport, shared by the bus and the event loop.
pub type SharedVsock = Arc<Mutex<VirtioMmio<VirtioVsock>>>;

/// Shortest timer the handler arms (a deadline already past fires after this).
const MIN_TIMER: Duration = Duration::from_micros(1);

/// The subscriber for the vsock device.
pub struct VsockHandler {
    device: SharedVsock,
    timer: TimerFd,
    clock: Arc<dyn Clock>,
}

impl VsockHandler {
    /// A handler for `device`, whose muxer reads `clock`.
    pub fn new(device: SharedVsock, clock: Arc<dyn Clock>) -> std::io::Result<Self> {
        let timer = TimerFd::new()?;
        set_nonblocking(timer.as_raw_fd())?;
        Ok(VsockHandler {
            device,
            timer,
            clock,
        })
    }

    /// Run the device, then arm the timer for its next deadline.
    fn service(&mut self) {
        let deadline = {
            let mut dev = lock(&self.device);
            dev.service();
            dev.device().next_deadline_ns()
        };
        let result = match deadline {
            Some(at) => {
                let wait = Duration::from_nanos(at.saturating_sub(self.clock.now_ns()));
                self.timer.reset(wait.max(MIN_TIMER), None)
            }
            None => self.timer.clear(),
        };
        if let Err(e) = result {
            log::error!("vsock timer: {e}");
        }
    }

    fn consume_timer(&self) {
        let mut buf = [0u8; 8];
        // SAFETY: reading 8 bytes into a local 8-byte buffer from a non-blocking timerfd we
        // own; the count read is not needed.
        let _ = unsafe { libc::read(self.timer.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    }
}

impl MutEventSubscriber for VsockHandler {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let fd: RawFd = events.fd();
        if fd == self.timer.as_raw_fd() {
            self.consume_timer();
        } else {
            lock(&self.device).on_event_fd(fd);
        }
        self.service();
    }

    fn init(&mut self, ops: &mut EventOps) {
        let fds = lock(&self.device).event_fds();
        for fd in fds
            .into_iter()
            .chain(std::iter::once(self.timer.as_raw_fd()))
        {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                log::error!("vsock: cannot watch fd {fd}: {e}");
            }
        }
        self.service();
    }
}

impl PolledFrontend for VsockHandler {
    fn attach(&mut self, owners: OwnerGroup) {
        lock(&self.device).attach(owners);
    }

    fn on_fd_event(&mut self, part: u16, token: Token, readiness: Readiness) {
        lock(&self.device).on_ready(part, token, readiness);
    }

    fn after_fd_events(&mut self) {
        self.service();
    }
}
