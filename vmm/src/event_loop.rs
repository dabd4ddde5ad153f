//! The event-loop thread's subscribers that are not devices: the VM-exit latch, the host
//! signals (SIGTERM, SIGINT, SIGHUP) that stop the VM cleanly, and [`BackendEvents`], which
//! hands the readiness of every chardev and monitor fd to the frontend that registered it.
//!
//! Signals are blocked in every thread and read from a signalfd here, so no signal handler
//! runs arbitrary code and the terminal is restored on the main thread's way out.
//!
//! # Who registers what
//!
//! The event manager (epoll) watches the fds that live as long as their handler: the exit
//! latch, the signalfd, each COM port's kick eventfd and timerfd, each virtio transport's
//! queue-notify ioeventfds and kick, and one more: the shared [`Poller`] of the backends.
//! Every fd that comes and goes (a socket client, a vproxy stream, a listener added over QMP,
//! a monitor client) is registered in that poller by whoever opens it, with a token, under the
//! owner group its frontend got from [`BackendEvents::add`]; it changes its interest and
//! removes it itself. When the poller is readable, [`BackendEvents`] takes a batch of events
//! and routes each by its owner's group to the frontend, by its part to the port, and by its
//! token to the fd: no call looks at fds that did not fire.

use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};

use chardev::{split_owner, OwnerGroup, PolledEvent, Poller, Readiness, Token};
use devices::bus::lock;
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
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

/// A frontend whose backends (or sockets) register fds in the shared [`Poller`].
pub trait PolledFrontend: Send {
    /// Attach the frontend's backends: part `p` registers with `owners.registrar(p)`.
    fn attach(&mut self, owners: OwnerGroup);
    /// `readiness` on the fd that part `part` of the frontend registered with `token`.
    fn on_fd_event(&mut self, part: u16, token: Token, readiness: Readiness);
    /// After a batch that held at least one event of this frontend: run the device.
    fn after_fd_events(&mut self);
}

/// A shared frontend, as [`BackendEvents`] keeps it.
pub type SharedFrontend = Arc<Mutex<dyn PolledFrontend>>;

/// Events taken from the poller per wakeup; the rest wait for the next (level-triggered).
pub const BACKEND_EVENT_BATCH: usize = 256;

/// The event-manager subscriber for the shared backend [`Poller`].
pub struct BackendEvents {
    poller: Poller,
    frontends: Vec<SharedFrontend>,
    batch: Vec<PolledEvent>,
    touched: Vec<u16>,
}

impl BackendEvents {
    /// A new poller, no frontend yet.
    pub fn new() -> std::io::Result<Self> {
        Ok(BackendEvents {
            poller: Poller::new()?,
            frontends: Vec::new(),
            batch: Vec::with_capacity(BACKEND_EVENT_BATCH),
            touched: Vec::new(),
        })
    }

    /// The poller.
    pub fn poller(&self) -> &Poller {
        &self.poller
    }

    /// Route events of a new owner group to `frontend`; its parts register with the group's
    /// registrars.
    pub fn add(&mut self, frontend: SharedFrontend) -> OwnerGroup {
        let group = u16::try_from(self.frontends.len()).expect("at most 65536 frontends");
        self.frontends.push(frontend);
        OwnerGroup::new(&self.poller, group)
    }

    /// Take one batch of ready events (waiting at most `timeout_ms`) and dispatch it. Returns
    /// how many events there were.
    pub fn dispatch(&mut self, timeout_ms: i32) -> std::io::Result<usize> {
        self.batch.clear();
        let n = self
            .poller
            .wait(&mut self.batch, BACKEND_EVENT_BATCH, timeout_ms)?;
        self.touched.clear();
        for ev in &self.batch {
            let (group, part) = split_owner(ev.owner);
            let Some(f) = self.frontends.get(usize::from(group)) else {
                continue;
            };
            lock(f).on_fd_event(part, ev.token, ev.readiness);
            if self.touched.last() != Some(&group) {
                self.touched.push(group);
            }
        }
        self.touched.sort_unstable();
        self.touched.dedup();
        for &group in &self.touched {
            lock(&self.frontends[usize::from(group)]).after_fd_events();
        }
        Ok(n)
    }
}

impl MutEventSubscriber for BackendEvents {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        if let Err(e) = self.dispatch(0) {
            log::error!("backend poller: {e}");
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.poller, EventSet::IN)) {
            log::error!("cannot watch the backend poller: {e}");
        }
    }
}

/// A subscriber as the event manager keeps it.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// The event loop: the event manager, with the backend poller as one of its subscribers.
/// Nothing in it needs KVM: unit tests and benches run the production loop.
pub struct EventLoop {
    manager: EventManager<Subscriber>,
    backends: Arc<Mutex<BackendEvents>>,
}

impl EventLoop {
    /// An empty loop (the backend poller already subscribed).
    pub fn new() -> std::io::Result<Self> {
        let mut manager: EventManager<Subscriber> =
            EventManager::new().map_err(|e| std::io::Error::other(format!("{e:?}")))?;
        let backends = Arc::new(Mutex::new(BackendEvents::new()?));
        manager.add_subscriber(backends.clone());
        Ok(EventLoop { manager, backends })
    }

    /// Watch the fds `subscriber` registers in its `init`.
    pub fn add_subscriber(&mut self, subscriber: Subscriber) {
        self.manager.add_subscriber(subscriber);
    }

    /// Add a frontend that has both: fixed fds for the event manager (a kick, a timer,
    /// ioeventfds) and backends in the poller. The backends are attached before its `init`
    /// first runs the device.
    pub fn add_frontend<H>(&mut self, frontend: Arc<Mutex<H>>)
    where
        H: MutEventSubscriber + PolledFrontend + 'static,
    {
        self.add_polled(frontend.clone());
        self.manager.add_subscriber(frontend);
    }

    /// Add a frontend whose fds are all in the poller (the monitor).
    pub fn add_polled<H>(&mut self, frontend: Arc<Mutex<H>>)
    where
        H: PolledFrontend + 'static,
    {
        let owners = lock(&self.backends).add(frontend.clone());
        lock(&frontend).attach(owners);
    }

    /// The backend poller.
    pub fn poller(&self) -> Poller {
        lock(&self.backends).poller().clone()
    }

    /// Wait for events (for ever) and dispatch them; returns how many fds were ready.
    pub fn run(&mut self) -> Result<usize, event_manager::Error> {
        self.manager.run()
    }

    /// Wait at most `timeout_ms` for events and dispatch them.
    pub fn run_with_timeout(&mut self, timeout_ms: i32) -> Result<usize, event_manager::Error> {
        self.manager.run_with_timeout(timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chardev::{FdSet, Interest};
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    /// A frontend that registers the given sockets (part = index) and records what it got.
    #[derive(Default)]
    struct Recorder {
        socks: Vec<UnixStream>,
        sets: Vec<FdSet>,
        events: Vec<(u16, Token)>,
        batches: usize,
    }

    impl PolledFrontend for Recorder {
        fn attach(&mut self, owners: OwnerGroup) {
            for (i, s) in self.socks.iter().enumerate() {
                let mut set = FdSet::new();
                set.set(s.as_raw_fd(), Interest::READ);
                set.attach(owners.registrar(i as u16));
                self.sets.push(set);
            }
        }

        fn on_fd_event(&mut self, part: u16, token: Token, readiness: Readiness) {
            assert!(readiness.readable);
            assert_eq!(
                self.sets[usize::from(part)].fd_of(token),
                Some(self.socks[usize::from(part)].as_raw_fd())
            );
            self.events.push((part, token));
        }

        fn after_fd_events(&mut self) {
            self.batches += 1;
        }
    }

    fn recorder(n: usize) -> (Arc<Mutex<Recorder>>, Vec<UnixStream>) {
        let mut peers = Vec::new();
        let mut r = Recorder::default();
        for _ in 0..n {
            let (a, b) = UnixStream::pair().unwrap();
            r.socks.push(a);
            peers.push(b);
        }
        (Arc::new(Mutex::new(r)), peers)
    }

    #[test]
    fn events_reach_their_frontend_and_part_once_per_batch() {
        let mut backends = BackendEvents::new().unwrap();
        let (one, mut one_peers) = recorder(3);
        let (two, mut two_peers) = recorder(2);
        lock(&one).attach(backends.add(one.clone()));
        lock(&two).attach(backends.add(two.clone()));
        assert_eq!(backends.dispatch(0).unwrap(), 0, "nothing ready");
        one_peers[2].write_all(b"x").unwrap();
        two_peers[0].write_all(b"y").unwrap();
        one_peers[0].write_all(b"z").unwrap();
        assert_eq!(backends.dispatch(0).unwrap(), 3);
        let mut parts: Vec<u16> = lock(&one).events.iter().map(|e| e.0).collect();
        parts.sort_unstable();
        assert_eq!(parts, vec![0, 2]);
        assert_eq!(
            lock(&two).events.iter().map(|e| e.0).collect::<Vec<_>>(),
            vec![0]
        );
        // One service per frontend per batch, however many of its fds fired.
        assert_eq!((lock(&one).batches, lock(&two).batches), (1, 1));
        drop(one_peers.remove(1));
        drop(two_peers.remove(1));
    }

    #[test]
    fn one_ready_fd_among_four_hundred_is_one_event() {
        let mut backends = BackendEvents::new().unwrap();
        let (many, mut peers) = recorder(400);
        lock(&many).attach(backends.add(many.clone()));
        peers[377].write_all(b"!").unwrap();
        assert_eq!(backends.dispatch(0).unwrap(), 1);
        assert_eq!(lock(&many).events.len(), 1);
        assert_eq!(lock(&many).events[0].0, 377);
        // An fd closed by its owner (unregistered first) never fires again.
        {
            let mut m = lock(&many);
            let fd = m.socks[377].as_raw_fd();
            m.sets[377].close(fd);
        }
        assert_eq!(backends.dispatch(0).unwrap(), 0);
    }

    #[test]
    fn the_event_loop_runs_a_frontend_without_kvm() {
        let mut event_loop = EventLoop::new().unwrap();
        let (r, mut peers) = recorder(1);
        event_loop.add_polled(r.clone());
        peers[0].write_all(b"go").unwrap();
        // One wakeup of the event manager: the poller's fd, then the frontend's event.
        assert!(event_loop.run_with_timeout(1000).unwrap() >= 1);
        assert_eq!(lock(&r).events.len(), 1);
        assert_eq!(lock(&r).batches, 1);
    }
}
