//! The event-loop side of a virtio-mmio device: the subscriber that runs the transport's queue
//! and backend work when one of its fds fires, keeps the epoll registrations in step with what
//! the device wants, and hands the console's port open/close events to whoever listens.

use std::sync::{Arc, Mutex};

use devices::bus::lock;
use devices::virtio::console::{ConsoleEvent, VirtioConsole};
use devices::virtio::VirtioMmio;
use event_manager::{EventOps, Events, MutEventSubscriber};
use kvm_ioctls::{IoEventAddress, VmFd};

use crate::serial::{readiness, FdRegistrations};

/// A virtio-console behind its virtio-mmio transport, shared by the bus and the event loop.
pub type SharedConsole = Arc<Mutex<VirtioMmio<VirtioConsole>>>;

/// Where the console's port events go (the monitor's VSERPORT_CHANGE).
pub type PortEventSink = Box<dyn FnMut(ConsoleEvent) + Send>;

/// Register the transport's queue-notify ioeventfds at `base`, so a guest's QueueNotify write
/// wakes the event loop inside KVM without a vCPU exit to userspace.
pub fn register_ioeventfds(
    vm: &VmFd,
    device: &SharedConsole,
    base: u64,
) -> Result<(), kvm_ioctls::Error> {
    let dev = lock(device);
    for (offset, datamatch, evt) in dev.ioeventfds() {
        vm.register_ioevent(evt, &IoEventAddress::Mmio(base + offset), datamatch)?;
    }
    Ok(())
}

/// The subscriber for one virtio-console.
pub struct VirtioConsoleHandler {
    device: SharedConsole,
    fds: FdRegistrations,
    events: PortEventSink,
}

impl VirtioConsoleHandler {
    /// A handler for `device`, reporting port events to `events`.
    pub fn new(device: SharedConsole, events: PortEventSink) -> Self {
        VirtioConsoleHandler {
            device,
            fds: FdRegistrations::default(),
            events,
        }
    }

    fn service(&mut self, ops: &mut EventOps) {
        let (wanted, events) = {
            let mut dev = lock(&self.device);
            dev.service();
            let events = dev.device_mut().take_events();
            (dev.poll_fds(), events)
        };
        for event in events {
            (self.events)(event);
        }
        self.fds.sync(ops, &wanted);
    }
}

impl MutEventSubscriber for VirtioConsoleHandler {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if let Some(fd) = self.fds.original(fd) {
            lock(&self.device).on_ready(fd, readiness(events.event_set()));
        }
        self.service(ops);
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.service(ops);
    }
}
