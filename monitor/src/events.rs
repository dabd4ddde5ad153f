//! The event queue: where the machine (any thread) puts QMP events for the monitor to send.
//!
//! The queue is bounded (the oldest events are dropped, and counted, when nobody drains it)
//! and comes with an eventfd that becomes readable when something is queued, so the event loop
//! wakes for events pushed from vCPU threads. Constructors for the events minivmm emits are
//! here too, with QEMU's names and data. This module sends nothing itself.

use std::collections::VecDeque;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::{json, Map, Value};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::protocol::QmpEvent;

/// Most events kept while nobody drains the queue.
pub const MAX_QUEUED_EVENTS: usize = 1024;

/// Why the machine shut down or reset (QEMU's `ShutdownCause`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownCause {
    /// No particular reason.
    None,
    /// An error in the host.
    HostError,
    /// The `quit` command.
    HostQmpQuit,
    /// The `system_reset` command.
    HostQmpSystemReset,
    /// A signal to the VMM (SIGTERM, SIGINT, SIGHUP).
    HostSignal,
    /// The user interface (a mux's Ctrl-A x).
    HostUi,
    /// The guest powered off.
    GuestShutdown,
    /// The guest reset itself.
    GuestReset,
    /// The guest panicked.
    GuestPanic,
}

impl ShutdownCause {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            ShutdownCause::None => "none",
            ShutdownCause::HostError => "host-error",
            ShutdownCause::HostQmpQuit => "host-qmp-quit",
            ShutdownCause::HostQmpSystemReset => "host-qmp-system-reset",
            ShutdownCause::HostSignal => "host-signal",
            ShutdownCause::HostUi => "host-ui",
            ShutdownCause::GuestShutdown => "guest-shutdown",
            ShutdownCause::GuestReset => "guest-reset",
            ShutdownCause::GuestPanic => "guest-panic",
        }
    }

    /// Whether the guest caused it (the events' `guest` member).
    pub fn is_guest(self) -> bool {
        matches!(
            self,
            ShutdownCause::GuestShutdown | ShutdownCause::GuestReset | ShutdownCause::GuestPanic
        )
    }
}

fn data(v: Value) -> Option<Map<String, Value>> {
    match v {
        Value::Object(m) => Some(m),
        _ => None,
    }
}

impl QmpEvent {
    /// `SHUTDOWN {"guest", "reason"}`.
    pub fn shutdown(cause: ShutdownCause) -> Self {
        QmpEvent::new(
            "SHUTDOWN",
            data(json!({"guest": cause.is_guest(), "reason": cause.as_str()})),
        )
    }

    /// `RESET {"guest", "reason"}`.
    pub fn reset(cause: ShutdownCause) -> Self {
        QmpEvent::new(
            "RESET",
            data(json!({"guest": cause.is_guest(), "reason": cause.as_str()})),
        )
    }

    /// `STOP`.
    pub fn stop() -> Self {
        QmpEvent::new("STOP", None)
    }

    /// `RESUME`.
    pub fn resume() -> Self {
        QmpEvent::new("RESUME", None)
    }

    /// `POWERDOWN`.
    pub fn powerdown() -> Self {
        QmpEvent::new("POWERDOWN", None)
    }

    /// `DEVICE_DELETED {"device", "path"}`.
    pub fn device_deleted(id: &str) -> Self {
        QmpEvent::new(
            "DEVICE_DELETED",
            data(json!({"device": id, "path": format!("/machine/peripheral/{id}")})),
        )
    }

    /// `VSERPORT_CHANGE {"id", "open"}`: the guest opened or closed a port.
    pub fn vserport_change(id: &str, open: bool) -> Self {
        QmpEvent::new("VSERPORT_CHANGE", data(json!({"id": id, "open": open})))
    }
}

#[derive(Debug, Default)]
struct Inner {
    events: VecDeque<QmpEvent>,
    dropped: u64,
}

/// A cloneable handle on the monitor's event queue.
#[derive(Debug, Clone)]
pub struct EventQueue {
    inner: Arc<Mutex<Inner>>,
    wake: Arc<EventFd>,
}

impl EventQueue {
    /// An empty queue.
    pub fn new() -> std::io::Result<Self> {
        Ok(EventQueue {
            inner: Arc::default(),
            wake: Arc::new(EventFd::new(EFD_NONBLOCK)?),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queue an event and wake the event loop.
    pub fn push(&self, event: QmpEvent) {
        {
            let mut inner = self.lock();
            if inner.events.len() >= MAX_QUEUED_EVENTS {
                inner.events.pop_front();
                inner.dropped += 1;
            }
            inner.events.push_back(event);
        }
        if let Err(e) = self.wake.write(1) {
            log::debug!("monitor event wakeup: {e}");
        }
    }

    /// Take every queued event, oldest first, and clear the wakeup.
    pub fn drain(&self) -> Vec<QmpEvent> {
        // Reading an eventfd that is not readable fails with EAGAIN; nothing to do then.
        let _ = self.wake.read();
        self.lock().events.drain(..).collect()
    }

    /// Events dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.lock().dropped
    }

    /// The fd that is readable while events are queued.
    pub fn wake_fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_is_bounded_and_wakes() {
        let q = EventQueue::new().unwrap();
        let other = q.clone();
        std::thread::spawn(move || other.push(QmpEvent::stop()))
            .join()
            .unwrap();
        let mut fds = [libc::pollfd {
            fd: q.wake_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: polling one valid pollfd for 0 ms.
        assert_eq!(unsafe { libc::poll(fds.as_mut_ptr(), 1, 0) }, 1);
        let got = q.drain();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].name, "STOP");
        for _ in 0..MAX_QUEUED_EVENTS + 5 {
            q.push(QmpEvent::resume());
        }
        assert_eq!(q.drain().len(), MAX_QUEUED_EVENTS);
        assert_eq!(q.dropped(), 5);
    }

    #[test]
    fn event_shapes() {
        let e = QmpEvent::shutdown(ShutdownCause::HostQmpQuit);
        assert_eq!(
            Value::Object(e.data.unwrap()),
            json!({"guest": false, "reason": "host-qmp-quit"})
        );
        let e = QmpEvent::reset(ShutdownCause::GuestReset);
        assert_eq!(e.data.unwrap()["guest"], true);
        let e = QmpEvent::device_deleted("p1");
        assert_eq!(e.data.unwrap()["path"], "/machine/peripheral/p1");
        assert!(QmpEvent::powerdown().data.is_none());
    }
}
