//! The event-loop side of a virtio-mmio device: the subscriber that runs the transport's queue
//! and backend work when one of its eventfds (watched by the event manager for the device's
//! life) or one of its ports' backend fds (registered by the backends in the shared backend
//! poller) fires, and hands the console's port open/close events to whoever listens.

use std::sync::{Arc, Mutex};

use devices::bus::lock;
use devices::virtio::console::{ConsoleEvent, VirtioConsole};
use devices::virtio::VirtioMmio;
use event_manager::{EventOps, Events, MutEventSubscriber};
use kvm_ioctls::{IoEventAddress, VmFd};

use chardev::{OwnerGroup, Readiness, Token};
use vmm_sys_util::epoll::EventSet;

use crate::event_loop::PolledFrontend;

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
    events: PortEventSink,
}

impl VirtioConsoleHandler {
    /// A handler for `device`, reporting port events to `events`.
    pub fn new(device: SharedConsole, events: PortEventSink) -> Self {
        VirtioConsoleHandler { device, events }
    }

    fn service(&mut self) {
        let events = {
            let mut dev = lock(&self.device);
            dev.service();
            dev.device_mut().take_events()
        };
        for event in events {
            (self.events)(event);
        }
    }
}

impl MutEventSubscriber for VirtioConsoleHandler {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        lock(&self.device).on_event_fd(events.fd());
        self.service();
    }

    fn init(&mut self, ops: &mut EventOps) {
        let fds = lock(&self.device).event_fds();
        for fd in fds {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                log::error!("virtio: cannot watch fd {fd}: {e}");
            }
        }
        self.service();
    }
}

impl PolledFrontend for VirtioConsoleHandler {
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
