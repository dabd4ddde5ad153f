//! The VM as the monitor sees it: [`VmMachine`] implements `monitor::Machine` over the
//! chardev registry, the vCPU pause control, the exit latch and the virtio-serial devices, and
//! [`MonitorHandler`] runs the monitor's sockets in the event loop.
//!
//! Everything here runs on the event-loop thread; nothing blocks beyond a bounded vCPU pause.

use std::sync::{Arc, Mutex};

use chardev::Registry;
use devices::bus::lock;
use devices::power::{GenericEventDevice, GED_EVENT_POWER_BUTTON};
use devices::serial_port::SerialPort;
use devices::virtio::console::PortConfig;
use monitor::{
    DeviceDriver, DeviceSpec, EventQueue, Machine, MachineError, Monitor, PortInfo, QmpEvent,
    RunState, ShutdownCause, VsockConnection, VsockStatus,
};

use chardev::{OwnerGroup, Readiness, Token};

use crate::event_loop::PolledFrontend;
use crate::vcpu::{ExitLatch, VcpuControl, VmExit};
use crate::virtio::SharedConsole;
use crate::vsock::SharedVsock;

/// The machine the monitor drives.
pub struct VmMachine {
    name: Option<String>,
    uuid: Option<String>,
    registry: Registry,
    vcpus: Arc<VcpuControl>,
    exit: Arc<ExitLatch>,
    events: EventQueue,
    /// virtio-serial devices by id, in slot order.
    consoles: Vec<(String, SharedConsole)>,
    /// The ACPI Generic Event Device that carries the power button, if the machine has one.
    ged: Option<Arc<Mutex<GenericEventDevice>>>,
    /// The COM ports by chardev id, to wake one for a break.
    uarts: Vec<(String, Arc<Mutex<SerialPort>>)>,
    /// The vsock device and its id, for `query-vsock`.
    vsock: Option<(String, SharedVsock)>,
}

impl VmMachine {
    /// The machine over these parts; `name` and `uuid` are what `query-name` and
    /// `query-uuid` report.
    pub fn new(
        name: Option<String>,
        uuid: Option<String>,
        registry: Registry,
        vcpus: Arc<VcpuControl>,
        exit: Arc<ExitLatch>,
        events: EventQueue,
        consoles: Vec<(String, SharedConsole)>,
    ) -> Self {
        VmMachine {
            name,
            uuid,
            registry,
            vcpus,
            exit,
            events,
            consoles,
            ged: None,
            uarts: Vec::new(),
            vsock: None,
        }
    }

    /// Give `query-vsock` the vsock device.
    pub fn with_vsock(mut self, vsock: Option<(String, SharedVsock)>) -> Self {
        self.vsock = vsock;
        self
    }

    /// Give `chardev-send-break` the COM ports (chardev id, port) to wake.
    pub fn with_uarts(mut self, uarts: Vec<(String, Arc<Mutex<SerialPort>>)>) -> Self {
        self.uarts = uarts;
        self
    }

    /// Give `system_powerdown` the GED to press the power button on.
    pub fn with_power_button(mut self, ged: Arc<Mutex<GenericEventDevice>>) -> Self {
        self.ged = Some(ged);
        self
    }

    fn console_for_port(&self, port_id: &str) -> Option<&SharedConsole> {
        self.consoles
            .iter()
            .map(|(_, c)| c)
            .find(|c| lock(c).device().ports().iter().any(|p| p.id == port_id))
    }
}

impl Machine for VmMachine {
    fn run_state(&self) -> RunState {
        if self.exit.stopping() {
            RunState::Shutdown
        } else if self.vcpus.is_paused() {
            RunState::Paused
        } else {
            RunState::Running
        }
    }

    fn stop(&mut self) -> Result<(), MachineError> {
        if self.vcpus.is_paused() {
            return Ok(());
        }
        if !self.vcpus.pause() {
            self.vcpus.resume();
            return Err(MachineError::Failed("vCPUs did not stop in time".into()));
        }
        self.events.push(QmpEvent::stop());
        Ok(())
    }

    fn cont(&mut self) -> Result<(), MachineError> {
        if self.vcpus.is_paused() {
            self.vcpus.resume();
            self.events.push(QmpEvent::resume());
        }
        Ok(())
    }

    fn system_reset(&mut self) -> Result<(), MachineError> {
        // The main loop resets the machine after this command returns and then reports
        // RESET; under --no-reboot the VM ends instead, with SHUTDOWN (QEMU's order).
        self.exit.request_reset(ShutdownCause::HostQmpSystemReset);
        Ok(())
    }

    fn system_powerdown(&mut self) -> Result<(), MachineError> {
        let ged = self.ged.as_ref().ok_or_else(|| {
            MachineError::Unsupported("this machine has no ACPI power button".into())
        })?;
        lock(ged).notify(GED_EVENT_POWER_BUTTON);
        self.events.push(QmpEvent::powerdown());
        Ok(())
    }

    fn quit(&mut self) {
        self.events
            .push(QmpEvent::shutdown(ShutdownCause::HostQmpQuit));
        self.exit.exit(VmExit::Quit);
    }

    fn name(&self) -> Option<String> {
        self.name.clone()
    }

    fn uuid(&self) -> Option<String> {
        self.uuid.clone()
    }

    fn chardevs(&mut self) -> &mut Registry {
        &mut self.registry
    }

    fn chardev_send_break(&mut self, id: &str) -> Result<(), MachineError> {
        if self.registry.send_break_to_frontend(id)? {
            // A UART takes it on its next service; a virtio port or a monitor drops it there.
            for (_, port) in self.uarts.iter().filter(|(c, _)| c == id) {
                lock(port).wake();
            }
        }
        Ok(())
    }

    fn device_add(&mut self, device: &DeviceSpec) -> Result<(), MachineError> {
        let chardev = device
            .chardev
            .clone()
            .ok_or_else(|| MachineError::Failed("Parameter 'chardev' is missing".into()))?;
        let id = device.id.clone().unwrap_or_else(|| chardev.clone());
        let console = match &device.bus {
            Some(bus) => {
                let bus = bus.split('.').next().unwrap_or(bus);
                self.consoles
                    .iter()
                    .find(|(vid, _)| vid == bus)
                    .map(|(_, c)| c.clone())
                    .ok_or_else(|| MachineError::Failed(format!("Bus '{bus}' not found")))?
            }
            None => self
                .consoles
                .first()
                .map(|(_, c)| c.clone())
                .ok_or_else(|| {
                    MachineError::Failed("No 'virtio-serial-bus' bus found for device".into())
                })?,
        };
        let backend = self.registry.take(&chardev)?;
        let config = PortConfig {
            id,
            name: device.name.clone(),
            console: device.driver == DeviceDriver::VirtConsole,
            nr: device.nr,
            chardev,
        };
        let mut transport = lock(&console);
        transport
            .device_mut()
            .add_port(config, backend)
            .map_err(|e| MachineError::Failed(e.to_string()))?;
        transport.kick();
        Ok(())
    }

    fn device_del(&mut self, id: &str) -> Result<(), MachineError> {
        let console = self
            .console_for_port(id)
            .cloned()
            .ok_or_else(|| MachineError::DeviceNotFound(id.to_string()))?;
        let mut transport = lock(&console);
        let backend = transport
            .device_mut()
            .remove_port(id)
            .map_err(|e| MachineError::Failed(e.to_string()))?;
        transport.kick();
        drop(transport);
        // Dropping the handle hands the chardev back to the registry, free for reuse.
        drop(backend);
        self.events.push(QmpEvent::device_deleted(id));
        Ok(())
    }

    fn vsock(&self) -> Option<VsockStatus> {
        let (id, vsock) = self.vsock.as_ref()?;
        let info = lock(vsock).device().info();
        let c = info.counters;
        let m = c.muxer;
        Some(VsockStatus {
            id: id.clone(),
            guest_cid: info.guest_cid,
            uds_path: info.uds_path.display().to_string(),
            connections: info
                .connections
                .iter()
                .map(|c| VsockConnection {
                    local_port: c.local_port,
                    peer_port: c.peer_port,
                    host_initiated: c.host_initiated,
                    state: c.state.name().to_string(),
                    bytes_to_host: c.bytes_to_host,
                    bytes_to_guest: c.bytes_to_guest,
                })
                .collect(),
            counters: vec![
                ("malformed-packets", c.malformed_packets),
                ("small-rx-buffers", c.small_rx_buffers),
                ("transport-resets", c.transport_resets),
                ("stray-packets", m.stray_packets),
                ("dropped-rsts", m.dropped_rsts),
                ("refused-connections", m.refused_connections),
                ("overrun-resets", m.overrun_resets),
                ("protocol-resets", m.protocol_resets),
                ("host-error-resets", m.host_error_resets),
                ("timeouts", m.timeouts),
                ("bad-connect-lines", m.bad_connect_lines),
            ],
        })
    }

    fn ports(&self) -> Vec<PortInfo> {
        let mut out = Vec::new();
        for (bus, console) in &self.consoles {
            for p in lock(console).device().ports() {
                out.push(PortInfo {
                    id: p.id.clone(),
                    driver: if p.console {
                        DeviceDriver::VirtConsole
                    } else {
                        DeviceDriver::VirtSerialPort
                    },
                    bus: format!("{bus}.0"),
                    nr: p.nr,
                    name: p.name.clone(),
                    chardev: Some(p.chardev.clone()),
                    guest_connected: p.guest_open,
                    host_connected: p.host_connected,
                });
            }
        }
        out
    }
}

/// The event-loop frontend for the monitor's sockets, its chardev endpoints and its event
/// queue, all registered in the backend poller.
pub struct MonitorHandler {
    monitor: Monitor,
    machine: VmMachine,
}

impl MonitorHandler {
    /// Serve `monitor`, running commands on `machine`.
    pub fn new(monitor: Monitor, machine: VmMachine) -> Self {
        MonitorHandler { monitor, machine }
    }

    /// Queue an event for every client.
    pub fn push_event(&mut self, event: QmpEvent) {
        self.machine.events.push(event);
    }

    /// Send the last events and replies before the process exits.
    pub fn flush(&mut self, timeout: std::time::Duration) {
        self.monitor.flush(timeout);
    }
}

impl PolledFrontend for MonitorHandler {
    fn attach(&mut self, owners: OwnerGroup) {
        self.monitor.register(owners);
    }

    fn on_fd_event(&mut self, part: u16, token: Token, readiness: Readiness) {
        self.monitor
            .on_ready(part, token, readiness, &mut self.machine);
    }

    fn after_fd_events(&mut self) {}
}
