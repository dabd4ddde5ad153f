//! The device manager: the two buses, every device on them, their event-loop handlers and the
//! virtio-mmio slots, built from the machine plan.
//!
//! It owns the [`EventLoop`] the devices run in, and knows KVM only through two small traits
//! ([`InterruptLines`] for the interrupt lines, [`IoEventRegistrar`] for the queue-notify
//! ioeventfds), so unit tests and benches build devices and drive the production event loop
//! without a VM. What the guest is told about the devices (the ACPI/MP tables, the command
//! line) comes from [`DeviceManager::com_ports`] and [`DeviceManager::virtio_slots`].

use std::sync::{Arc, Mutex};

use chardev::{Backend, Registry};
use devices::bus::{Bus, BusError, SharedDevice};
use devices::power::{AcpiPm, GenericEventDevice, PowerControl, I8042};
use devices::serial::SerialConfig;
use devices::serial_port::SerialPort;
use devices::virtio::console::{PortConfig, VirtioConsole};
use devices::virtio::vsock::{Registration, VirtioVsock, VsockConfig};
use devices::virtio::VirtioMmio;
use devices::{Clock, IrqLine};
use monitor::{EventQueue, QmpEvent};
use thiserror::Error;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::acpi::{ComPort, VirtioMmioSlot};
use crate::cli::VirtioSerialPlan;
use crate::device_spec::{ComPortPlan, VsockSpec};
use crate::event_loop::EventLoop;
use crate::layout::{
    ACPI_GED_BASE, ACPI_GED_GSI, ACPI_GED_LEN, ACPI_PM_BASE, ACPI_PM_LEN, COM_PORT_SIZE,
    I8042_DATA_PORT, I8042_PORT_LEN, VIRTIO_MMIO_FIRST_GSI, VIRTIO_MMIO_SLOT_SIZE,
    VIRTIO_MMIO_START,
};
use crate::serial::SerialHandler;
use crate::vcpu::ExitLatch;
use crate::virtio::{PortEventSink, SharedConsole, VirtioConsoleHandler};
use crate::vsock::{SharedVsock, VsockHandler};

/// Where the devices' interrupt lines come from (KVM's irqchip in the VM, a recorder in tests).
pub trait InterruptLines {
    /// The line of `gsi`, OR-ed with the other sources on it.
    fn line(&self, gsi: u32) -> Arc<dyn IrqLine>;
}

impl InterruptLines for Arc<crate::irq::IrqLines> {
    fn line(&self, gsi: u32) -> Arc<dyn IrqLine> {
        self.source(gsi)
    }
}

/// Where a virtio transport's queue-notify eventfds are registered (KVM's ioeventfds).
pub trait IoEventRegistrar {
    /// Signal `evt` when the guest writes `datamatch` (4 bytes) at guest-physical `addr`.
    fn register(&self, evt: &EventFd, addr: u64, datamatch: u32) -> std::io::Result<()>;
}

impl IoEventRegistrar for kvm_ioctls::VmFd {
    fn register(&self, evt: &EventFd, addr: u64, datamatch: u32) -> std::io::Result<()> {
        self.register_ioevent(evt, &kvm_ioctls::IoEventAddress::Mmio(addr), datamatch)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
}

/// Why a device could not be built.
#[derive(Debug, Error)]
pub enum DeviceError {
    /// A frontend could not get its chardev.
    #[error("--chardev {id}")]
    Chardev {
        /// The chardev id.
        id: String,
        /// Why.
        #[source]
        source: chardev::Error,
    },
    /// A device refused its configuration.
    #[error("--device {id}: {reason}")]
    Device {
        /// Device id.
        id: String,
        /// Why.
        reason: String,
    },
    /// A device could not be placed on a bus.
    #[error("device bus")]
    Bus(#[from] BusError),
    /// An OS call failed.
    #[error("{0}")]
    Io(&'static str, #[source] std::io::Error),
}

/// The buses, the devices on them and the loop they run in.
pub struct DeviceManager {
    event_loop: EventLoop,
    clock: Arc<dyn Clock>,
    exit: Arc<ExitLatch>,
    pio: Bus,
    mmio: Bus,
    uarts: Vec<(String, Arc<Mutex<SerialPort>>)>,
    consoles: Vec<(String, SharedConsole)>,
    vsock: Option<(String, SharedVsock)>,
    com_ports: Vec<ComPort>,
    virtio_slots: Vec<VirtioMmioSlot>,
    ged: Option<Arc<Mutex<GenericEventDevice>>>,
}

impl DeviceManager {
    /// No device yet; devices read `clock`, and a mux's Ctrl-A x ends the VM through `exit`.
    pub fn new(clock: Arc<dyn Clock>, exit: Arc<ExitLatch>) -> Result<Self, DeviceError> {
        Ok(DeviceManager {
            event_loop: EventLoop::new().map_err(|e| DeviceError::Io("event loop", e))?,
            clock,
            exit,
            pio: Bus::new(),
            mmio: Bus::new(),
            uarts: Vec::new(),
            consoles: Vec::new(),
            vsock: None,
            com_ports: Vec::new(),
            virtio_slots: Vec::new(),
            ged: None,
        })
    }

    /// Put a 16550A on the port-I/O bus for `plan`, on its chardev from `registry`.
    pub fn add_com_port(
        &mut self,
        plan: &ComPortPlan,
        registry: &mut Registry,
        irqs: &dyn InterruptLines,
    ) -> Result<(), DeviceError> {
        let backend = take_chardev(registry, &plan.chardev)?;
        let config = SerialConfig {
            baud_base: plan.baud_base,
            pacing: plan.pacing,
        };
        let port = SerialPort::new(config, irqs.line(plan.irq), self.clock.clone(), backend)
            .map_err(|e| DeviceError::Device {
                id: format!("serial{}", plan.index),
                reason: e.to_string(),
            })?;
        let port = Arc::new(Mutex::new(port));
        self.pio.insert(
            port.clone() as SharedDevice,
            u64::from(plan.iobase),
            COM_PORT_SIZE,
        )?;
        let handler = SerialHandler::new(port.clone(), self.clock.clone(), self.exit.clone())
            .map_err(|e| DeviceError::Io("cannot create serial timer", e))?;
        self.event_loop.add_frontend(Arc::new(Mutex::new(handler)));
        self.uarts.push((plan.chardev.clone(), port));
        self.com_ports.push(ComPort {
            index: (plan.index + 1) as u8,
            base: plan.iobase,
            irq: plan.irq,
        });
        Ok(())
    }

    /// The base address and GSI of the next free virtio-mmio slot.
    fn next_virtio_slot(&self) -> (u64, u32) {
        let slot = self.virtio_slots.len() as u64;
        (
            VIRTIO_MMIO_START + slot * VIRTIO_MMIO_SLOT_SIZE,
            VIRTIO_MMIO_FIRST_GSI + slot as u32,
        )
    }

    /// Map a virtio-mmio transport at `base` on the MMIO bus, register its queue notifications
    /// with KVM as ioeventfds, and record the slot (ACPI and the command line announce it).
    fn place_virtio<D: devices::virtio::VirtioDevice + 'static>(
        &mut self,
        shared: &Arc<Mutex<VirtioMmio<D>>>,
        (base, gsi): (u64, u32),
        guest: &GuestLink<'_>,
    ) -> Result<(), DeviceError> {
        self.mmio
            .insert(shared.clone() as SharedDevice, base, VIRTIO_MMIO_SLOT_SIZE)?;
        for (offset, datamatch, evt) in devices::bus::lock(shared).ioeventfds() {
            guest
                .ioevents
                .register(evt, base + offset, datamatch)
                .map_err(|e| DeviceError::Io("KVM_IOEVENTFD", e))?;
        }
        self.virtio_slots.push(VirtioMmioSlot {
            base,
            size: VIRTIO_MMIO_SLOT_SIZE,
            gsi,
        });
        Ok(())
    }

    /// Put a virtio-console in the next virtio-mmio slot, with the ports of `plan` on their
    /// chardevs; port open/close events go to `events` as `VSERPORT_CHANGE`.
    pub fn add_virtio_console(
        &mut self,
        plan: &VirtioSerialPlan,
        registry: &mut Registry,
        guest: &GuestLink<'_>,
    ) -> Result<(), DeviceError> {
        let (base, gsi) = self.next_virtio_slot();
        let device_err = |reason: String| DeviceError::Device {
            id: plan.id.clone(),
            reason,
        };
        let mut console =
            VirtioConsole::new(plan.max_ports).map_err(|e| device_err(e.to_string()))?;
        for port in &plan.ports {
            let backend = take_chardev(registry, &port.chardev)?;
            let config = PortConfig {
                id: port.id.clone(),
                name: port.name.clone(),
                console: port.console,
                nr: port.nr,
                chardev: port.chardev.clone(),
            };
            console
                .add_port(config, backend)
                .map_err(|e| device_err(e.to_string()))?;
        }
        let transport = VirtioMmio::new(console, guest.mem.clone(), guest.irqs.line(gsi))
            .map_err(|e| device_err(e.to_string()))?;
        let shared = Arc::new(Mutex::new(transport));
        self.place_virtio(&shared, (base, gsi), guest)?;
        let handler = VirtioConsoleHandler::new(shared.clone(), port_event_sink(guest.events));
        self.event_loop.add_frontend(Arc::new(Mutex::new(handler)));
        self.consoles.push((plan.id.clone(), shared));
        Ok(())
    }

    /// Put the virtio-vsock device of `spec` in the next virtio-mmio slot: its listener at
    /// `spec.uds_path` (which must not exist) and, as it comes and goes, every host socket of
    /// its connections in the event loop's poller; its time-outs on a timer of its handler.
    pub fn add_vsock(
        &mut self,
        spec: &VsockSpec,
        guest: &GuestLink<'_>,
    ) -> Result<(), DeviceError> {
        let (base, gsi) = self.next_virtio_slot();
        let device_err = |reason: String| DeviceError::Device {
            id: spec.id.clone(),
            reason,
        };
        let config = VsockConfig {
            guest_cid: spec.guest_cid,
            uds_path: spec.uds_path.clone(),
            registration: Registration::Explicit,
        };
        let vsock = VirtioVsock::new(&config, self.clock.clone())
            .map_err(|e| device_err(crate::error_chain(&e)))?;
        let transport = VirtioMmio::new(vsock, guest.mem.clone(), guest.irqs.line(gsi))
            .map_err(|e| device_err(e.to_string()))?;
        let shared = Arc::new(Mutex::new(transport));
        self.place_virtio(&shared, (base, gsi), guest)?;
        let handler = VsockHandler::new(shared.clone(), self.clock.clone())
            .map_err(|e| DeviceError::Io("cannot create the vsock timer", e))?;
        self.event_loop.add_frontend(Arc::new(Mutex::new(handler)));
        self.vsock = Some((spec.id.clone(), shared));
        Ok(())
    }

    /// The i8042 (its reset line), the ACPI PM block and the Generic Event Device.
    pub fn add_platform_devices(
        &mut self,
        power: Arc<dyn PowerControl>,
        irqs: &dyn InterruptLines,
    ) -> Result<(), DeviceError> {
        self.pio.insert(
            Arc::new(Mutex::new(I8042::new(power.clone()))) as SharedDevice,
            u64::from(I8042_DATA_PORT),
            I8042_PORT_LEN,
        )?;
        self.pio.insert(
            Arc::new(Mutex::new(AcpiPm::new(power))) as SharedDevice,
            u64::from(ACPI_PM_BASE),
            ACPI_PM_LEN,
        )?;
        let ged = Arc::new(Mutex::new(GenericEventDevice::new(irqs.line(ACPI_GED_GSI))));
        self.pio.insert(
            ged.clone() as SharedDevice,
            u64::from(ACPI_GED_BASE),
            ACPI_GED_LEN,
        )?;
        self.ged = Some(ged);
        Ok(())
    }

    /// The COM ports as the ACPI and MP tables describe them.
    pub fn com_ports(&self) -> Vec<ComPort> {
        self.com_ports.clone()
    }

    /// The virtio-mmio slots in use.
    pub fn virtio_slots(&self) -> Vec<VirtioMmioSlot> {
        self.virtio_slots.clone()
    }

    /// The COM ports by chardev id (`chardev-send-break` wakes them).
    pub fn uarts(&self) -> Vec<(String, Arc<Mutex<SerialPort>>)> {
        self.uarts.clone()
    }

    /// The virtio-serial devices by id.
    pub fn consoles(&self) -> Vec<(String, SharedConsole)> {
        self.consoles.clone()
    }

    /// The vsock device and its id, if the machine has one.
    pub fn vsock(&self) -> Option<(String, SharedVsock)> {
        self.vsock.clone()
    }

    /// The Generic Event Device, once the platform devices are in.
    pub fn ged(&self) -> Option<Arc<Mutex<GenericEventDevice>>> {
        self.ged.clone()
    }

    /// The event loop the devices run in (the monitor and the lifecycle join it).
    pub fn event_loop(&mut self) -> &mut EventLoop {
        &mut self.event_loop
    }

    /// Hand over the buses (to the vCPUs) and the event loop (to the main loop).
    pub fn into_parts(self) -> (Arc<Bus>, Arc<Bus>, EventLoop) {
        (Arc::new(self.pio), Arc::new(self.mmio), self.event_loop)
    }
}

/// What a virtio device needs of the VM: guest memory, interrupt lines, ioeventfds and the
/// monitor's event queue.
pub struct GuestLink<'a> {
    /// Guest RAM.
    pub mem: &'a GuestMemoryMmap,
    /// Interrupt lines.
    pub irqs: &'a dyn InterruptLines,
    /// Queue-notify registration.
    pub ioevents: &'a dyn IoEventRegistrar,
    /// Where guest port open/close is reported.
    pub events: &'a EventQueue,
}

/// A frontend's handle to chardev `id`.
pub fn take_chardev(registry: &mut Registry, id: &str) -> Result<Box<dyn Backend>, DeviceError> {
    registry.take(id).map_err(|source| DeviceError::Chardev {
        id: id.to_string(),
        source,
    })
}

/// Report a console's port open/close as `VSERPORT_CHANGE` on `events`.
fn port_event_sink(events: &EventQueue) -> PortEventSink {
    let sink = events.clone();
    Box::new(move |event| {
        log::info!(
            "virtio-serial port '{}' {} by the guest",
            event.port_id,
            if event.open { "opened" } else { "closed" }
        );
        sink.push(QmpEvent::vserport_change(&event.port_id, event.open));
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vcpu::ResetAction;
    use chardev::ChardevSpec;
    use devices::MonotonicClock;
    use std::io::Read;
    use std::os::unix::net::UnixStream;
    use std::time::{Duration, Instant};

    /// Interrupt lines that go nowhere.
    struct NoIrqs;
    struct NoLine;
    impl IrqLine for NoLine {
        fn set_level(&self, _high: bool) {}
    }
    impl InterruptLines for NoIrqs {
        fn line(&self, _gsi: u32) -> Arc<dyn IrqLine> {
            Arc::new(NoLine)
        }
    }

    /// A COM port built by the device manager on a unix socket chardev, driven by the
    /// production event loop: what the guest writes to THR (here, a write on the port-I/O
    /// bus, as a vCPU's exit would) reaches the socket's client.
    #[test]
    fn a_com_port_on_a_socket_runs_in_the_event_loop_without_kvm() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("com1.sock");
        let spec = format!("socket,id=s0,path={},server=on,wait=off", path.display());
        let mut registry = Registry::new();
        registry.add(&ChardevSpec::parse(&spec).unwrap()).unwrap();
        let exit = ExitLatch::new(ResetAction::Exit).unwrap();
        let mut dm = DeviceManager::new(Arc::new(MonotonicClock::new()), exit).unwrap();
        let plan = ComPortPlan {
            index: 0,
            iobase: 0x3f8,
            irq: 4,
            chardev: "s0".into(),
            baud_base: 115_200,
            pacing: false,
        };
        dm.add_com_port(&plan, &mut registry, &NoIrqs).unwrap();
        assert_eq!(dm.com_ports().len(), 1);
        let mut client = UnixStream::connect(&path).unwrap();
        client
            .set_read_timeout(Some(Duration::from_millis(10)))
            .unwrap();
        let (pio, _mmio, mut event_loop) = dm.into_parts();
        let end = Instant::now() + Duration::from_secs(10);
        let mut got = Vec::new();
        let mut sent = 0;
        while got != b"hi" {
            assert!(Instant::now() < end, "got {got:?}");
            event_loop.run_with_timeout(10).unwrap();
            // The guest writes THR once the client is connected (bytes before that go to the
            // replay ring, which would do too, but this checks the live path).
            if sent < 2 {
                assert!(pio.write(0x3f8, &[b"hi"[sent]]));
                sent += 1;
            }
            let mut buf = [0u8; 8];
            if let Ok(n) = client.read(&mut buf) {
                got.extend_from_slice(&buf[..n]);
            }
        }
    }
}
