//! Building and running a VM: KVM VM and irqchip, guest RAM, the boot images and ACPI tables,
//! the legacy devices on the port-I/O bus, the vCPU threads, and the event loop that runs on
//! the calling thread until the guest powers off, crashes or a signal stops it. A machine
//! reset is carried out in the same loop ([`crate::reset`]), or ends the VM under
//! `--no-reboot`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chardev::spec::SocketAddrSpec;
use chardev::{BackendSpec, Registry};
use devices::bus::{Bus, SharedDevice};
use devices::power::{AcpiPm, GenericEventDevice, I8042};
use devices::serial::SerialConfig;
use devices::serial_port::SerialPort;
use devices::virtio::console::{PortConfig, VirtioConsole};
use devices::virtio::VirtioMmio;
use devices::{Clock, MonotonicClock};
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use monitor::instance::ConsoleInfo;
use monitor::{Instance, InstanceConfig, InstanceError, Monitor, QmpEvent, ShutdownCause};
use thiserror::Error;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::acpi::{ComPort, VirtioMmioSlot};
use crate::cli::VmConfig;
use crate::cpu;
use crate::event_loop::{block_stop_signals, Lifecycle, SignalFd};
use crate::irq::IrqLines;
use crate::layout::{
    ACPI_GED_BASE, ACPI_GED_GSI, ACPI_GED_LEN, ACPI_PM_BASE, ACPI_PM_LEN, COM_PORT_SIZE,
    I8042_DATA_PORT, I8042_PORT_LEN, VIRTIO_MMIO_FIRST_GSI, VIRTIO_MMIO_SLOT_SIZE,
    VIRTIO_MMIO_START,
};
use crate::machine::{MonitorHandler, VmMachine};
use crate::reset::{BootPlan, IrqchipSnapshot, LoadError, MachineReset, ResetError};
use crate::serial::SerialHandler;
use crate::vcpu::{self, ExitLatch, ResetAction, VcpuContext, VcpuControl, VmExit};
use crate::virtio::{register_ioeventfds, PortEventSink, VirtioConsoleHandler};

/// TSS address KVM needs on Intel hosts (three pages just below the BIOS ROM window).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
/// Identity-map page KVM needs on Intel hosts, just below the TSS.
const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// Errors while building or running the VM.
#[derive(Debug, Error)]
pub enum VmError {
    /// Opening /dev/kvm failed.
    #[error("cannot open /dev/kvm (is KVM available and accessible?)")]
    Kvm(#[source] kvm_ioctls::Error),
    /// A KVM VM ioctl failed.
    #[error("KVM {0} failed")]
    KvmIoctl(&'static str, #[source] kvm_ioctls::Error),
    /// Guest memory could not be allocated.
    #[error("cannot allocate guest memory")]
    Memory(#[source] vm_memory::mmap::FromRangesError),
    /// Loading the kernel, the initrd or the ACPI tables failed.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The first-boot state a reset returns to could not be read.
    #[error(transparent)]
    Reset(#[from] ResetError),
    /// vCPU set-up failed.
    #[error(transparent)]
    Cpu(#[from] cpu::CpuError),
    /// A device could not be placed on a bus.
    #[error("device bus")]
    Bus(#[from] devices::bus::BusError),
    /// A chardev backend could not be opened or attached.
    #[error("--chardev {id}")]
    Chardev {
        /// The chardev id.
        id: String,
        /// Why.
        #[source]
        source: chardev::Error,
    },
    /// A device could not be created.
    #[error("--device {id}: {reason}")]
    Device {
        /// Device id.
        id: String,
        /// Why.
        reason: String,
    },
    /// The monitor socket could not be created.
    #[error("--monitor: {0}")]
    Monitor(String),
    /// The runtime directory could not be claimed (`what` names the option at fault).
    #[error("{what}")]
    Instance {
        /// `--name`, `--uuid` or `runtime directory`.
        what: &'static str,
        /// Why.
        #[source]
        source: InstanceError,
    },
    /// A stop signal came before the guest started (while waiting for a `wait=on` client).
    #[error("stopped by signal {0} before the guest started")]
    Signal(i32),
    /// A COM port could not be created.
    #[error("cannot create serial port")]
    SerialPort(#[source] devices::serial_port::SerialPortError),
    /// An OS call failed.
    #[error("{0}")]
    Io(&'static str, #[source] std::io::Error),
    /// The event loop failed.
    #[error("event loop")]
    EventLoop(#[source] event_manager::Error),
}

/// Longest time spent draining device output after the guest stopped.
const EXIT_DRAIN_TIME: Duration = Duration::from_millis(500);
/// Draining ends once the event loop has been idle this long (ms).
const EXIT_DRAIN_IDLE_MS: i32 = 30;

/// How long replies and the last events may take to reach monitor clients at exit.
const MONITOR_FLUSH_TIME: Duration = Duration::from_millis(500);

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// How often a wait for `wait=on` clients looks for a stop signal.
const WAIT_SIGNAL_POLL: Duration = Duration::from_millis(100);

/// A built VM, ready to run.
pub struct Vm {
    vcpus: Vec<VcpuContext>,
    event_manager: EventManager<Subscriber>,
    exit: Arc<ExitLatch>,
    /// The monitor subscriber; its machine owns the chardev registry.
    monitor: Arc<Mutex<MonitorHandler>>,
    /// What a machine reset needs.
    reset: MachineReset,
    /// The runtime directory, removed when the VM is dropped, however it ended.
    _instance: Instance,
}

impl Vm {
    /// Build the VM described by `config`.
    pub fn new(config: &VmConfig) -> Result<Vm, VmError> {
        // From here on the stop signals are read from a signalfd, so that every way out,
        // SIGTERM/SIGINT/SIGHUP included, goes through the destructors that remove the runtime
        // directory; every thread spawned later (the vCPUs) inherits the blocked mask.
        block_stop_signals().map_err(|e| VmError::Io("cannot block signals", e))?;
        let signals = SignalFd::new().map_err(|e| VmError::Io("cannot create signalfd", e))?;
        let mut instance = Instance::create(&InstanceConfig {
            name: config.name.clone(),
            uuid: config.uuid.clone(),
            root: None,
        })
        .map_err(|source| VmError::Instance {
            what: match source {
                InstanceError::NameInUse { .. } | InstanceError::BadName(_) => "--name",
                InstanceError::UuidInUse { .. } | InstanceError::BadUuid(_) => "--uuid",
                _ => "runtime directory",
            },
            source,
        })?;
        let instance_err = |source| VmError::Instance {
            what: "runtime directory",
            source,
        };
        let kvm = Kvm::new().map_err(VmError::Kvm)?;
        let kvm_vm = Arc::new(
            kvm.create_vm()
                .map_err(|e| VmError::KvmIoctl("KVM_CREATE_VM", e))?,
        );
        let mem = crate::memory::create_guest_memory(config.memory).map_err(VmError::Memory)?;
        register_memory(&kvm_vm, &mem)?;
        kvm_vm
            .set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(|e| VmError::KvmIoctl("KVM_SET_IDENTITY_MAP_ADDR", e))?;
        kvm_vm
            .set_tss_address(KVM_TSS_ADDRESS)
            .map_err(|e| VmError::KvmIoctl("KVM_SET_TSS_ADDR", e))?;
        kvm_vm
            .create_irq_chip()
            .map_err(|e| VmError::KvmIoctl("KVM_CREATE_IRQCHIP", e))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        kvm_vm
            .create_pit2(pit)
            .map_err(|e| VmError::KvmIoctl("KVM_CREATE_PIT2", e))?;
        let irqchip = IrqchipSnapshot::capture(&kvm_vm)?;

        let on_reset = if config.no_reboot {
            ResetAction::Exit
        } else {
            ResetAction::Reboot
        };
        let exit = ExitLatch::new(on_reset).map_err(|e| VmError::Io("cannot create eventfd", e))?;
        let irqs = IrqLines::new(kvm_vm.clone());
        let clock: Arc<dyn Clock> = Arc::new(MonotonicClock::new());
        let mut event_manager: EventManager<Subscriber> =
            EventManager::new().map_err(VmError::EventLoop)?;

        let mut monitor = Monitor::new().map_err(|e| VmError::Io("cannot create monitor", e))?;
        let qmp_path = config
            .monitor
            .clone()
            .unwrap_or_else(|| instance.qmp_socket_path());
        monitor
            .listen(&qmp_path)
            .map_err(|e| VmError::Monitor(e.to_string()))?;
        instance.set_qmp(Some(qmp_path)).map_err(instance_err)?;
        let monitor_events = monitor.events();

        let mut registry = Registry::new();
        for spec in &config.chardevs {
            registry.add(spec).map_err(|source| VmError::Chardev {
                id: spec.id.clone(),
                source,
            })?;
            if let Some(info) = registry.list().into_iter().find(|i| i.label == spec.id) {
                if info.kind == "pty" {
                    // Where to connect, as QEMU says it.
                    eprintln!(
                        "minivmm: char device redirected to {} (label {})",
                        info.filename.trim_start_matches("pty:"),
                        spec.id
                    );
                }
            }
        }
        instance
            .set_consoles(consoles_of(config, &mut registry))
            .map_err(instance_err)?;
        // `wait=on` servers hold the boot until their first client connects; a stop signal
        // ends the wait.
        while !registry
            .wait_for_clients(Some(WAIT_SIGNAL_POLL))
            .map_err(|source| VmError::Chardev {
                id: "wait=on".into(),
                source,
            })?
            .is_empty()
        {
            if let Some(sig) = signals.read() {
                return Err(VmError::Signal(sig));
            }
        }

        let mut pio = Bus::new();
        let mut com_ports = Vec::new();
        let mut uarts = Vec::new();
        for plan in &config.com_ports {
            let backend = take_chardev(&mut registry, &plan.chardev)?;
            let uart_config = SerialConfig {
                baud_base: plan.baud_base,
                pacing: plan.pacing,
            };
            let port = SerialPort::new(uart_config, irqs.source(plan.irq), clock.clone(), backend)
                .map_err(VmError::SerialPort)?;
            let port = Arc::new(Mutex::new(port));
            pio.insert(
                port.clone() as SharedDevice,
                u64::from(plan.iobase),
                COM_PORT_SIZE,
            )?;
            let handler = SerialHandler::new(port.clone(), clock.clone(), exit.clone())
                .map_err(|e| VmError::Io("cannot create serial timer", e))?;
            event_manager.add_subscriber(Arc::new(Mutex::new(handler)));
            uarts.push((plan.chardev.clone(), port));
            com_ports.push(ComPort {
                index: (plan.index + 1) as u8,
                base: plan.iobase,
                irq: plan.irq,
            });
        }
        let mut mmio = Bus::new();
        let mut virtio_slots = Vec::new();
        let mut consoles = Vec::new();
        for (i, plan) in config.virtio_serial.iter().enumerate() {
            let base = VIRTIO_MMIO_START + i as u64 * VIRTIO_MMIO_SLOT_SIZE;
            let gsi = VIRTIO_MMIO_FIRST_GSI + i as u32;
            let device_err = |e: String| VmError::Device {
                id: plan.id.clone(),
                reason: e,
            };
            let mut console =
                VirtioConsole::new(plan.max_ports).map_err(|e| device_err(e.to_string()))?;
            for port in &plan.ports {
                let backend = take_chardev(&mut registry, &port.chardev)?;
                let port_config = PortConfig {
                    id: port.id.clone(),
                    name: port.name.clone(),
                    console: port.console,
                    nr: port.nr,
                    chardev: port.chardev.clone(),
                };
                console
                    .add_port(port_config, backend)
                    .map_err(|e| device_err(e.to_string()))?;
            }
            let transport = VirtioMmio::new(console, mem.clone(), irqs.source(gsi))
                .map_err(|e| device_err(e.to_string()))?;
            let shared = Arc::new(Mutex::new(transport));
            mmio.insert(shared.clone() as SharedDevice, base, VIRTIO_MMIO_SLOT_SIZE)?;
            register_ioeventfds(&kvm_vm, &shared, base)
                .map_err(|e| VmError::KvmIoctl("KVM_IOEVENTFD", e))?;
            let sink = monitor_events.clone();
            let report: PortEventSink = Box::new(move |event| {
                log::info!(
                    "virtio-serial port '{}' {} by the guest",
                    event.port_id,
                    if event.open { "opened" } else { "closed" }
                );
                sink.push(QmpEvent::vserport_change(&event.port_id, event.open));
            });
            event_manager.add_subscriber(Arc::new(Mutex::new(VirtioConsoleHandler::new(
                shared.clone(),
                report,
            ))));
            consoles.push((plan.id.clone(), shared));
            virtio_slots.push(VirtioMmioSlot {
                base,
                size: VIRTIO_MMIO_SLOT_SIZE,
                gsi,
            });
        }

        // Monitors on chardevs come after the devices: on a mux (`--serial mon:stdio`) the
        // device keeps the focus and the monitor waits for Ctrl-A c, as in QEMU.
        for mon in &config.mons {
            let backend =
                registry
                    .take_for_monitor(&mon.chardev)
                    .map_err(|source| VmError::Chardev {
                        id: mon.chardev.clone(),
                        source,
                    })?;
            monitor.attach(backend, mon.mode);
        }

        let power: Arc<dyn devices::power::PowerControl> = exit.clone();
        pio.insert(
            Arc::new(Mutex::new(I8042::new(power.clone()))) as SharedDevice,
            u64::from(I8042_DATA_PORT),
            I8042_PORT_LEN,
        )?;
        pio.insert(
            Arc::new(Mutex::new(AcpiPm::new(power))) as SharedDevice,
            u64::from(ACPI_PM_BASE),
            ACPI_PM_LEN,
        )?;
        let ged = Arc::new(Mutex::new(GenericEventDevice::new(
            irqs.source(ACPI_GED_GSI),
        )));
        pio.insert(
            ged.clone() as SharedDevice,
            u64::from(ACPI_GED_BASE),
            ACPI_GED_LEN,
        )?;

        let plan = BootPlan {
            kernel: config.kernel.clone(),
            initrd: config.initrd.clone(),
            cmdline: config.cmdline.clone(),
            vcpus: config.vcpus,
            com_ports,
            virtio_slots,
            acpi: config.acpi,
        };
        let boot = plan.load(&mem)?;

        event_manager.add_subscriber(Arc::new(Mutex::new(Lifecycle::new(exit.clone(), signals))));

        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| VmError::KvmIoctl("KVM_GET_SUPPORTED_CPUID", e))?;
        let msr_indices = kvm
            .get_msr_index_list()
            .map_err(|e| VmError::KvmIoctl("KVM_GET_MSR_INDEX_LIST", e))?;
        let control = VcpuControl::new();
        VcpuControl::install_kick_handler()
            .map_err(|e| VmError::Io("cannot install the vCPU kick handler", e))?;
        let machine = VmMachine::new(
            config.name.clone(),
            Some(instance.info().uuid.clone()),
            registry,
            control.clone(),
            exit.clone(),
            monitor.events(),
            consoles,
        )
        .with_uarts(uarts);
        // The power button is an ACPI device: without ACPI the guest has no driver for it.
        let machine = if config.acpi {
            machine.with_power_button(ged)
        } else {
            machine
        };
        let monitor = Arc::new(Mutex::new(MonitorHandler::new(monitor, machine)));
        event_manager.add_subscriber(monitor.clone());
        let pio = Arc::new(pio);
        let mmio = Arc::new(mmio);
        let mut vcpus = Vec::new();
        for id in 0..config.vcpus {
            let fd = kvm_vm
                .create_vcpu(u64::from(id))
                .map_err(|e| VmError::KvmIoctl("KVM_CREATE_VCPU", e))?;
            cpu::set_cpuid(&fd, id, &cpuid)?;
            let snapshot = cpu::VcpuSnapshot::capture(&fd, msr_indices.as_slice())?;
            cpu::configure_vcpu(&fd, id, &cpuid, &mem, boot.mode)?;
            vcpus.push(VcpuContext {
                id,
                fd,
                pio: pio.clone(),
                mmio: mmio.clone(),
                mem: mem.clone(),
                exit: exit.clone(),
                control: control.clone(),
                snapshot,
            });
        }
        let reset = MachineReset {
            plan,
            mem,
            vm: kvm_vm,
            irqchip,
            irqs,
            pio,
            mmio,
            control,
            exit: exit.clone(),
        };
        Ok(Vm {
            vcpus,
            event_manager,
            exit,
            monitor,
            reset,
            _instance: instance,
        })
    }

    /// Run until the guest stops; returns how it ended. The event loop runs on this thread.
    pub fn run(mut self) -> Result<VmExit, VmError> {
        let mut threads = Vec::new();
        for ctx in self.vcpus.drain(..) {
            threads.push(vcpu::spawn(ctx).map_err(|e| VmError::Io("cannot spawn vCPU thread", e))?);
        }
        while !self.exit.stopping() {
            self.event_manager.run().map_err(VmError::EventLoop)?;
            if let Some(cause) = self.exit.pending_reset() {
                self.reset(cause);
            }
        }
        // Let the paced UARTs and the backends' buffers drain what the guest wrote before it
        // stopped (its last console lines), for a bounded time.
        let deadline = Instant::now() + EXIT_DRAIN_TIME;
        while Instant::now() < deadline {
            match self.event_manager.run_with_timeout(EXIT_DRAIN_IDLE_MS) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        let reason = self.exit.reason().unwrap_or(VmExit::PowerOff);
        {
            let mut handler = devices::bus::lock(&self.monitor);
            let cause = match &reason {
                VmExit::PowerOff => Some(ShutdownCause::GuestShutdown),
                VmExit::Reset(cause) => Some(*cause),
                VmExit::Signal(_) => Some(ShutdownCause::HostSignal),
                VmExit::Crash(_) | VmExit::ResetFailed(_) => Some(ShutdownCause::HostError),
                // quit queued its own SHUTDOWN.
                VmExit::Quit => None,
            };
            if let Some(cause) = cause {
                handler.push_event(QmpEvent::shutdown(cause));
            }
            handler.flush(MONITOR_FLUSH_TIME);
        }
        Ok(reason)
    }
}

impl Vm {
    /// Carry out the pending machine reset for `cause` and report it with `RESET`; a failure
    /// ends the VM.
    fn reset(&mut self, cause: ShutdownCause) {
        let started = Instant::now();
        match self.reset.run() {
            Ok(()) => {
                log::info!("machine reset ({cause:?}) in {:?}", started.elapsed());
                devices::bus::lock(&self.monitor).push_event(QmpEvent::reset(cause));
            }
            Err(e) => self.exit.exit(VmExit::ResetFailed(crate::error_chain(&e))),
        }
    }
}

/// A frontend's handle to chardev `id`.
fn take_chardev(registry: &mut Registry, id: &str) -> Result<Box<dyn chardev::Backend>, VmError> {
    registry.take(id).map_err(|source| VmError::Chardev {
        id: id.to_string(),
        source,
    })
}

/// The consoles `minivmm console` can attach to: every COM port and virtio-serial port whose
/// chardev is a unix socket server or a pty, named `serialN` (COM(N+1)) or by the port's name
/// (else its id).
fn consoles_of(config: &VmConfig, registry: &mut Registry) -> Vec<ConsoleInfo> {
    let com = config
        .com_ports
        .iter()
        .map(|p| (format!("serial{}", p.index), p.chardev.clone()));
    let virtio = config.virtio_serial.iter().flat_map(|v| {
        v.ports.iter().map(|p| {
            let name = p.name.clone().unwrap_or_else(|| p.id.clone());
            (name, p.chardev.clone())
        })
    });
    let listed = registry.list();
    let mut out = Vec::new();
    for (name, chardev) in com.chain(virtio) {
        let Some(spec) = config.chardevs.iter().find(|c| c.id == chardev) else {
            continue;
        };
        let (kind, path) = match &spec.backend {
            BackendSpec::Socket(s) if s.server => match &s.addr {
                SocketAddrSpec::Unix {
                    path,
                    abstract_ns: false,
                } => ("socket", path.clone()),
                _ => continue,
            },
            BackendSpec::Pty(_) => {
                let Some(info) = listed.iter().find(|i| i.label == chardev) else {
                    continue;
                };
                let pts = info.filename.trim_start_matches("pty:");
                ("pty", std::path::PathBuf::from(pts))
            }
            _ => continue,
        };
        // A relative socket path is relative to where minivmm started.
        let path = std::env::current_dir()
            .map(|d| d.join(&path))
            .unwrap_or(path);
        out.push(ConsoleInfo {
            name,
            chardev,
            kind: kind.to_string(),
            path: Some(path),
        });
    }
    out
}

fn register_memory(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), VmError> {
    for (slot, region) in mem.iter().enumerate() {
        let region_desc = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
            flags: 0,
        };
        // SAFETY: the region is a live mmap owned by `mem`, which the VM keeps (vCPU contexts
        // hold clones) for as long as the guest runs; size and address come from the mapping.
        unsafe { vm.set_user_memory_region(region_desc) }
            .map_err(|e| VmError::KvmIoctl("KVM_SET_USER_MEMORY_REGION", e))?;
    }
    Ok(())
}
