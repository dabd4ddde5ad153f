//! [`Monitor`]: every monitor of one VM behind one object the event loop drives: the QMP
//! socket servers, the monitors on chardevs, the shared named-fd store and the event queue.
//!
//! Events are sent to every endpoint: those pushed on the [`EventQueue`] (from any thread)
//! when its wakeup fd fires or a command completes, those passed to [`Monitor::emit`] at once.
//! This module adds no I/O of its own beyond what its parts do.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chardev::{Backend, FdSet, Interest, OwnerGroup, Readiness, Token};

use crate::chardev_mon::{ChardevMonitor, MonitorMode};
use crate::events::EventQueue;
use crate::fdstore::FdStore;
use crate::machine::Machine;
use crate::protocol::QmpEvent;
use crate::server::{Limits, QmpServer, ServerError};

/// All monitors of a VM.
#[derive(Debug)]
pub struct Monitor {
    /// The event queue's wakeup registration; declared first, it unregisters first.
    wake: FdSet,
    /// Where the endpoints register their fds, once the event loop attached the monitor.
    owners: Option<OwnerGroup>,
    fds: FdStore,
    events: EventQueue,
    limits: Limits,
    servers: Vec<QmpServer>,
    chardevs: Vec<ChardevMonitor>,
}

/// Which endpoint an event's owner part belongs to.
#[derive(Clone, Copy)]
enum Endpoint {
    Server(usize),
    Chardev(usize),
}

/// The owner part of the event queue's wakeup.
const PART_WAKE: u16 = 0;
/// The owner part of the first socket server; servers count up from here.
const PART_FIRST_SERVER: u16 = 1;
/// The owner part of the first monitor on a chardev; they count up from here.
const PART_FIRST_CHARDEV: u16 = 0x8000;

impl Endpoint {
    fn part(self) -> u16 {
        match self {
            Endpoint::Server(i) => PART_FIRST_SERVER + i as u16,
            Endpoint::Chardev(i) => PART_FIRST_CHARDEV + i as u16,
        }
    }

    fn of_part(part: u16) -> Option<Endpoint> {
        match part {
            PART_WAKE => None,
            p if p >= PART_FIRST_CHARDEV => {
                Some(Endpoint::Chardev(usize::from(p - PART_FIRST_CHARDEV)))
            }
            p => Some(Endpoint::Server(usize::from(p - PART_FIRST_SERVER))),
        }
    }
}

impl Monitor {
    /// No endpoints yet, default limits.
    pub fn new() -> io::Result<Self> {
        Monitor::with_limits(Limits::default())
    }

    /// No endpoints yet.
    pub fn with_limits(limits: Limits) -> io::Result<Self> {
        let events = EventQueue::new()?;
        let mut wake = FdSet::new();
        wake.set(events.wake_fd(), Interest::READ);
        Ok(Monitor {
            wake,
            owners: None,
            fds: FdStore::new(),
            events,
            limits,
            servers: Vec::new(),
            chardevs: Vec::new(),
        })
    }

    /// Serve QMP on a unix socket at `path` (`--monitor PATH`).
    pub fn listen(&mut self, path: &Path) -> Result<(), ServerError> {
        let mut s = QmpServer::bind(path, self.fds.clone(), self.events.clone(), self.limits)?;
        if let Some(owners) = &self.owners {
            s.attach(owners.registrar(Endpoint::Server(self.servers.len()).part()));
        }
        self.servers.push(s);
        Ok(())
    }

    /// Run a monitor on a chardev backend (`--mon chardev=ID,mode=...`); pass the handle
    /// from `Registry::take` so the chardev shows as busy.
    pub fn attach(&mut self, backend: Box<dyn Backend>, mode: MonitorMode) {
        let mut m = ChardevMonitor::new(
            backend,
            mode,
            self.fds.clone(),
            self.events.clone(),
            self.limits,
        );
        if let Some(owners) = &self.owners {
            m.attach(owners.registrar(Endpoint::Chardev(self.chardevs.len()).part()));
        }
        self.chardevs.push(m);
    }

    /// Register every endpoint's fds with the event loop (endpoints added later register as
    /// they come): the event queue's wakeup, the servers' sockets, the chardevs' backends.
    pub fn register(&mut self, owners: OwnerGroup) {
        self.wake.attach(owners.registrar(PART_WAKE));
        for (i, s) in self.servers.iter_mut().enumerate() {
            s.attach(owners.registrar(Endpoint::Server(i).part()));
        }
        for (i, c) in self.chardevs.iter_mut().enumerate() {
            c.attach(owners.registrar(Endpoint::Chardev(i).part()));
        }
        self.owners = Some(owners);
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

    /// The event loop saw `readiness` on the fd that owner part `part` registered with
    /// `token`; commands run on `machine`.
    pub fn on_ready(
        &mut self,
        part: u16,
        token: Token,
        readiness: Readiness,
        machine: &mut dyn Machine,
    ) {
        let Some(endpoint) = Endpoint::of_part(part) else {
            // The event queue's wakeup: read it, deliver what is queued.
            self.deliver_queued();
            return;
        };
        let emitted = match endpoint {
            Endpoint::Server(i) => match self.servers.get_mut(i) {
                Some(s) => s.on_ready(token, readiness, machine),
                None => return,
            },
            Endpoint::Chardev(i) => match self.chardevs.get_mut(i) {
                Some(c) => c.on_ready(token, readiness, machine),
                None => return,
            },
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
                let poller = chardev::Poller::new().unwrap();
                mon.lock().unwrap().register(OwnerGroup::new(&poller, 0));
                let mut ready = Vec::new();
                while !s.load(Ordering::Relaxed) {
                    ready.clear();
                    if poller.wait(&mut ready, 64, TICK_MS).unwrap_or(0) == 0 {
                        continue;
                    }
                    for ev in &ready {
                        let (_, part) = chardev::split_owner(ev.owner);
                        let mut m = mach.lock().unwrap();
                        mon.lock()
                            .unwrap()
                            .on_ready(part, ev.token, ev.readiness, &mut *m);
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
