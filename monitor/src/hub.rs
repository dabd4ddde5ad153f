//! [`Monitor`]: every monitor of one VM behind one object the event loop drives: the QMP
//! socket servers, the monitors on chardevs, the shared named-fd store and the event queue.
//!
//! Events are sent to every endpoint: those pushed on the [`EventQueue`] (from any thread)
//! when its wakeup fd fires or a command completes, those passed to [`Monitor::emit`] at once.
//! This module adds no I/O of its own beyond what its parts do.

use std::io;
use std::os::unix::io::RawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chardev::{Backend, Interest, Readiness};

use crate::chardev_mon::{ChardevMonitor, MonitorMode};
use crate::events::EventQueue;
use crate::fdstore::FdStore;
use crate::machine::Machine;
use crate::protocol::QmpEvent;
use crate::server::{Limits, QmpServer, ServerError};

/// All monitors of a VM.
#[derive(Debug)]
pub struct Monitor {
    fds: FdStore,
    events: EventQueue,
    limits: Limits,
    servers: Vec<QmpServer>,
    chardevs: Vec<ChardevMonitor>,
}

/// Which endpoint an fd belongs to.
#[derive(Clone, Copy)]
enum Endpoint {
    Server(usize),
    Chardev(usize),
}

impl Monitor {
    /// No endpoints yet, default limits.
    pub fn new() -> io::Result<Self> {
        Monitor::with_limits(Limits::default())
    }

    /// No endpoints yet.
    pub fn with_limits(limits: Limits) -> io::Result<Self> {
        Ok(Monitor {
            fds: FdStore::new(),
            events: EventQueue::new()?,
            limits,
            servers: Vec::new(),
            chardevs: Vec::new(),
        })
    }

    /// Serve QMP on a unix socket at `path` (`--monitor PATH`).
    pub fn listen(&mut self, path: &Path) -> Result<(), ServerError> {
        let s = QmpServer::bind(path, self.fds.clone(), self.events.clone(), self.limits)?;
        self.servers.push(s);
        Ok(())
    }

    /// Run a monitor on a chardev backend (`--mon chardev=ID,mode=...`); pass the handle
    /// from `Registry::take` so the chardev shows as busy.
    pub fn attach(&mut self, backend: Box<dyn Backend>, mode: MonitorMode) {
        self.chardevs.push(ChardevMonitor::new(
            backend,
            mode,
            self.fds.clone(),
            self.events.clone(),
            self.limits,
        ));
    }

    /// The queue the machine pushes its events on (clone it into the `Machine` impl and
    /// into whatever thread reports guest events).
    pub fn events(&self) -> EventQueue {
        self.events.clone()
    }

    /// The named fds (`getfd`).
    pub fn fds(&self) -> FdStore {
        self.fds.clone()
    }

    /// The QMP socket paths, for the instance file.
    pub fn socket_paths(&self) -> Vec<PathBuf> {
        self.servers
            .iter()
            .map(|s| s.path().to_path_buf())
            .collect()
    }

    /// Send an event to every negotiated QMP peer now.
    pub fn emit(&mut self, event: QmpEvent) {
        self.broadcast(&event, None);
    }

    fn broadcast(&mut self, event: &QmpEvent, except: Option<Endpoint>) {
        for (i, s) in self.servers.iter_mut().enumerate() {
            if !matches!(except, Some(Endpoint::Server(j)) if j == i) {
                s.broadcast_event(event);
            }
        }
        for (i, c) in self.chardevs.iter_mut().enumerate() {
            if !matches!(except, Some(Endpoint::Chardev(j)) if j == i) {
                c.broadcast_event(event);
            }
        }
    }

    /// Every fd to watch now: the event queue's wakeup and each endpoint's. Re-read after
    /// every `on_ready` and `emit`.
    pub fn poll_fds(&self) -> Vec<(RawFd, Interest)> {
        let mut v = vec![(self.events.wake_fd(), Interest::READ)];
        for s in &self.servers {
            v.extend(s.poll_fds());
        }
        for c in &self.chardevs {
            v.extend(c.poll_fds());
        }
        v
    }

    /// The event loop saw `readiness` on `fd`; commands run on `machine`.
    pub fn on_ready(&mut self, fd: RawFd, readiness: Readiness, machine: &mut dyn Machine) {
        if fd == self.events.wake_fd() {
            self.deliver_queued();
            return;
        }
        let endpoint = if let Some(i) = self.servers.iter().position(|s| s.owns(fd)) {
            Endpoint::Server(i)
        } else if let Some(i) = self.chardevs.iter().position(|c| c.owns(fd)) {
            Endpoint::Chardev(i)
        } else {
            return;
        };
        let emitted = match endpoint {
            Endpoint::Server(i) => self.servers[i].on_ready(fd, readiness, machine),
            Endpoint::Chardev(i) => self.chardevs[i].on_ready(fd, readiness, machine),
        };
        for ev in &emitted {
            self.broadcast(ev, Some(endpoint));
        }
    }

    /// Send whatever is queued on the event queue.
    pub fn deliver_queued(&mut self) {
        for ev in self.events.drain() {
            self.broadcast(&ev, None);
        }
    }

    /// Deliver queued events and try to write all pending output for at most `timeout`
    /// (before the VMM exits, so `quit`'s answer and `SHUTDOWN` reach the clients).
    pub fn flush(&mut self, timeout: Duration) {
        self.deliver_queued();
        for s in &mut self.servers {
            s.flush_blocking(timeout);
        }
    }
}

/// A poll loop for tests: drives a [`Monitor`] on its own thread as the VMM's event loop
/// would, until told to stop.
#[cfg(test)]
pub(crate) mod testloop {
    use super::*;
    use crate::commands::tests::FakeMachine;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::thread::JoinHandle;

    /// Poll timeout of one loop iteration.
    const TICK_MS: i32 = 10;

    pub struct Running {
        stop: Arc<AtomicBool>,
        thread: Option<JoinHandle<()>>,
        pub monitor: Arc<Mutex<Monitor>>,
        pub machine: Arc<Mutex<FakeMachine>>,
    }

    impl Running {
        pub fn start(monitor: Monitor, machine: FakeMachine) -> Self {
            let stop = Arc::new(AtomicBool::new(false));
            let monitor = Arc::new(Mutex::new(monitor));
            let machine = Arc::new(Mutex::new(machine));
            let (s, mon, mach) = (stop.clone(), monitor.clone(), machine.clone());
            let thread = std::thread::spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    let wanted = mon.lock().unwrap().poll_fds();
                    let mut pfds: Vec<libc::pollfd> = wanted
                        .iter()
                        .map(|&(fd, i)| libc::pollfd {
                            fd,
                            events: (if i.read { libc::POLLIN } else { 0 })
                                | (if i.write { libc::POLLOUT } else { 0 }),
                            revents: 0,
                        })
                        .collect();
                    // SAFETY: polling our own vector of pollfds, with its true length.
                    let n = unsafe {
                        libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, TICK_MS)
                    };
                    if n <= 0 {
                        continue;
                    }
                    for p in pfds.iter().filter(|p| p.revents != 0) {
                        let r = Readiness {
                            readable: p.revents & libc::POLLIN != 0,
                            writable: p.revents & libc::POLLOUT != 0,
                            hangup: p.revents & (libc::POLLHUP | libc::POLLERR) != 0,
                        };
                        let mut m = mach.lock().unwrap();
                        mon.lock().unwrap().on_ready(p.fd, r, &mut *m);
                    }
                }
            });
            Running {
                stop,
                thread: Some(thread),
                monitor,
                machine,
            }
        }
    }

    impl Drop for Running {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }
}
