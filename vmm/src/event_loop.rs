//! The event-loop thread's subscribers that are not devices: the VM-exit latch and the host
//! signals (SIGTERM, SIGINT, SIGHUP) that stop the VM cleanly.
//!
//! Signals are blocked in every thread and read from a signalfd here, so no signal handler
//! runs arbitrary code and the terminal is restored on the main thread's way out.

use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use crate::vcpu::{ExitLatch, VmExit};

/// Signals that stop the VM.
pub const STOP_SIGNALS: [i32; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

/// Signals blocked in every thread but not handled here: `SIGWINCH`, which the stdio chardev
/// reads from a signalfd of its own to follow the terminal's size.
pub const OTHER_BLOCKED_SIGNALS: [i32; 1] = [libc::SIGWINCH];

/// Block the stop signals (and [`OTHER_BLOCKED_SIGNALS`]) in the calling thread, and so in
/// every thread it spawns later.
pub fn block_stop_signals() -> std::io::Result<()> {
    let all: Vec<i32> = STOP_SIGNALS
        .iter()
        .chain(&OTHER_BLOCKED_SIGNALS)
        .copied()
        .collect();
    let set = sigset(&all)?;
    // SAFETY: `set` is a valid, initialised sigset; a null old-set pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

fn sigset(signals: &[i32]) -> std::io::Result<libc::sigset_t> {
    vmm_sys_util::signal::create_sigset(signals)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

/// A non-blocking signalfd for the stop signals.
pub struct SignalFd {
    fd: OwnedFd,
}

impl SignalFd {
    /// Open it; the signals must already be blocked.
    pub fn new() -> std::io::Result<Self> {
        let set = sigset(&STOP_SIGNALS)?;
        // SAFETY: `set` is valid; -1 asks for a new fd; the flags are valid.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by signalfd and is owned by nobody else.
        Ok(SignalFd {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// The next pending signal number, if any.
    pub fn read(&self) -> Option<i32> {
        let mut info = std::mem::MaybeUninit::<libc::signalfd_siginfo>::zeroed();
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: the buffer is `size` bytes of writable memory owned by this frame.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), info.as_mut_ptr().cast(), size) };
        if n as usize != size {
            return None;
        }
        // SAFETY: read filled all `size` bytes.
        Some(unsafe { info.assume_init() }.ssi_signo as i32)
    }
}

impl AsRawFd for SignalFd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Watches the exit latch and the stop signals.
pub struct Lifecycle {
    exit: Arc<ExitLatch>,
    signals: SignalFd,
}

impl Lifecycle {
    /// A subscriber for `exit`, reading signals from `signals`.
    pub fn new(exit: Arc<ExitLatch>, signals: SignalFd) -> Self {
        Lifecycle { exit, signals }
    }
}

impl MutEventSubscriber for Lifecycle {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == self.signals.as_raw_fd() {
            while let Some(sig) = self.signals.read() {
                self.exit.exit(VmExit::Signal(sig));
            }
        } else {
            let _ = self.exit.event().read();
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        for fd in [self.exit.event().as_raw_fd(), self.signals.as_raw_fd()] {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                log::error!("cannot watch lifecycle fd {fd}: {e}");
            }
        }
    }
}
