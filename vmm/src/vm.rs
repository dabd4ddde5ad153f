//! Building and running a VM: KVM VM and irqchip, guest RAM, the boot images and ACPI tables,
//! the legacy devices on the port-I/O bus, the vCPU threads, and the event loop that runs on
//! the calling thread until the guest powers off, crashes or a signal stops it. A machine
//! reset is carried out in the same loop ([`crate::reset`]), or ends the VM under
//! `--no-reboot`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chardev::spec::SocketAddrSpec;
use chardev::{BackendSpec, Registry};
use devices::bus::Bus;
use devices::power::PowerControl;
use devices::{Clock, MonotonicClock};
use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use monitor::instance::ConsoleInfo;
use monitor::{Instance, InstanceConfig, InstanceError, Monitor, QmpEvent, ShutdownCause};
use thiserror::Error;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::cli::VmConfig;
use crate::cpu;
use crate::device_manager::{DeviceError, DeviceManager, GuestLink};
use crate::event_loop::{block_stop_signals, EventLoop, Lifecycle, SignalFd};
use crate::irq::IrqLines;
use crate::machine::{MonitorHandler, VmMachine};
use crate::reset::{BootPlan, IrqchipSnapshot, LoadError, MachineReset, ResetError};
use crate::seccomp::{self, SeccompError, SeccompMode, ThreadKind};
use crate::vcpu::{self, ExitLatch, ResetAction, VcpuContext, VcpuControl, VmExit};

/// TSS address KVM needs on Intel hosts (three pages just below the BIOS ROM window).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
/// Identity-map page KVM needs on Intel hosts, just below the TSS.
const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// Errors while building or running the VM.
#[derive(Debug, Error)]
pub enum VmError {
    /// A seccomp filter or its handler could not be installed.
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
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
    /// A device could not be built or attached to its chardev.
    #[error(transparent)]
    Devices(#[from] DeviceError),
    /// A chardev backend could not be opened or attached.
    #[error("--chardev {id}")]
    Chardev {
        /// The chardev id.
        id: String,
        /// Why.
        #[source]
        source: chardev::Error,
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

/// How often a wait for `wait=on` clients looks for a stop signal.
const WAIT_SIGNAL_POLL: Duration = Duration::from_millis(100);

/// A built VM, ready to run.
pub struct Vm {
    vcpus: Vec<VcpuContext>,
    event_loop: EventLoop,
    exit: Arc<ExitLatch>,
    /// The monitor frontend; its machine owns the chardev registry.
    monitor: Arc<Mutex<MonitorHandler>>,
    /// What a machine reset needs.
    reset: MachineReset,
    /// The filters the threads install once they run.
    seccomp: SeccompMode,
    /// The runtime directory, removed when the VM is dropped, however it ended.
    _instance: Instance,
}

/// The KVM side of the machine: the VM with its irqchip and PIT, as first created.
struct KvmVm {
    kvm: Kvm,
    vm: Arc<VmFd>,
    irqchip: IrqchipSnapshot,
}

impl Vm {
    /// Build the VM described by `config`, stage by stage.
    pub fn new(config: &VmConfig) -> Result<Vm, VmError> {
        // From here on the stop signals are read from a signalfd, so that every way out,
        // SIGTERM/SIGINT/SIGHUP included, goes through the destructors that remove the runtime
        // directory; every thread spawned later (the vCPUs) inherits the blocked mask.
        block_stop_signals().map_err(|e| VmError::Io("cannot block signals", e))?;
        let signals = SignalFd::new().map_err(|e| VmError::Io("cannot create signalfd", e))?;
        let mut instance = claim_instance(config)?;
        let kvm = KvmVm::create()?;
        let mem = crate::memory::create_guest_memory(config.memory).map_err(VmError::Memory)?;
        register_memory(&kvm.vm, &mem)?;
        let on_reset = if config.no_reboot {
            ResetAction::Exit
        } else {
            ResetAction::Reboot
        };
        let exit = ExitLatch::new(on_reset).map_err(|e| VmError::Io("cannot create eventfd", e))?;
        let irqs = IrqLines::new(kvm.vm.clone());
        let clock: Arc<dyn Clock> = Arc::new(MonotonicClock::new());
        let mut monitor = open_monitor(config, &mut instance)?;
        let mut registry = open_chardevs(config, &mut instance, &signals)?;
        let mut dm = DeviceManager::new(clock, exit.clone())?;
        let link = GuestLink {
            mem: &mem,
            irqs: &irqs,
            ioevents: kvm.vm.as_ref(),
            events: &monitor.events(),
        };
        build_devices(config, &mut dm, &mut registry, &link, exit.clone())?;
        attach_monitors(config, &mut monitor, &mut registry)?;
        let plan = BootPlan {
            kernel: config.kernel.clone(),
            initrd: config.initrd.clone(),
            cmdline: config.cmdline.clone(),
            vcpus: config.vcpus,
            com_ports: dm.com_ports(),
            virtio_slots: dm.virtio_slots(),
            acpi: config.acpi,
        };
        let boot = plan.load(&mem)?;
        let control = VcpuControl::new();
        VcpuControl::install_kick_handler()
            .map_err(|e| VmError::Io("cannot install the vCPU kick handler", e))?;
        let vsock = dm.vsock();
        let machine = machine_of(config, &instance, registry, &dm, &control, &exit, &monitor);
        let monitor = Arc::new(Mutex::new(MonitorHandler::new(monitor, machine)));
        dm.event_loop().add_polled(monitor.clone());
        dm.event_loop()
            .add_subscriber(Arc::new(Mutex::new(Lifecycle::new(exit.clone(), signals))));
        let (pio, mmio, event_loop) = dm.into_parts();
        let parts = VcpuParts {
            pio: pio.clone(),
            mmio: mmio.clone(),
            mem: mem.clone(),
            exit: exit.clone(),
            control: control.clone(),
            seccomp: config.seccomp,
        };
        let vcpus = create_vcpus(&kvm, config.vcpus, &parts, boot.mode)?;
        let reset = MachineReset {
            plan,
            mem,
            vm: kvm.vm,
            irqchip: kvm.irqchip,
            irqs,
            pio,
            mmio,
            control,
            exit: exit.clone(),
            vsock: vsock.map(|(_, v)| v),
        };
        Ok(Vm {
            vcpus,
            event_loop,
            exit,
            monitor,
            reset,
            seccomp: config.seccomp,
            _instance: instance,
        })
    }

    /// Run until the guest stops; returns how it ended. The event loop runs on this thread.
    pub fn run(mut self) -> Result<VmExit, VmError> {
        if self.seccomp != SeccompMode::Off {
            seccomp::install_sigsys_handler()?;
        }
        let mut threads = Vec::new();
        for ctx in self.vcpus.drain(..) {
            threads.push(vcpu::spawn(ctx).map_err(|e| VmError::Io("cannot spawn vCPU thread", e))?);
        }
        // Set-up is done and every thread is spawned: from here on the event loop runs
        // confined.
        seccomp::install(ThreadKind::EventLoop, self.seccomp, "main")?;
        while !self.exit.stopping() {
            self.event_loop.run().map_err(VmError::EventLoop)?;
            if let Some(cause) = self.exit.pending_reset() {
                self.reset(cause);
            }
        }
        // Let the paced UARTs and the backends' buffers drain what the guest wrote before it
        // stopped (its last console lines), for a bounded time.
        let deadline = Instant::now() + EXIT_DRAIN_TIME;
        while Instant::now() < deadline {
            match self.event_loop.run_with_timeout(EXIT_DRAIN_IDLE_MS) {
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

impl KvmVm {
    /// A KVM VM with the in-kernel irqchip and PIT, and their state as created (a reset puts
    /// it back).
    fn create() -> Result<KvmVm, VmError> {
        let kvm = Kvm::new().map_err(VmError::Kvm)?;
        let vm = Arc::new(
            kvm.create_vm()
                .map_err(|e| VmError::KvmIoctl("KVM_CREATE_VM", e))?,
        );
        vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(|e| VmError::KvmIoctl("KVM_SET_IDENTITY_MAP_ADDR", e))?;
        vm.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(|e| VmError::KvmIoctl("KVM_SET_TSS_ADDR", e))?;
        vm.create_irq_chip()
            .map_err(|e| VmError::KvmIoctl("KVM_CREATE_IRQCHIP", e))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit)
            .map_err(|e| VmError::KvmIoctl("KVM_CREATE_PIT2", e))?;
        let irqchip = IrqchipSnapshot::capture(&vm)?;
        Ok(KvmVm { kvm, vm, irqchip })
    }
}

/// Claim the instance's runtime directory (`--name`/`--uuid` clashes are refused).
fn claim_instance(config: &VmConfig) -> Result<Instance, VmError> {
    Instance::create(&InstanceConfig {
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
    })
}

fn instance_err(source: InstanceError) -> VmError {
    VmError::Instance {
        what: "runtime directory",
        source,
    }
}

/// Serve QMP on `--monitor PATH` or the instance's `qmp.sock`, and record it.
fn open_monitor(config: &VmConfig, instance: &mut Instance) -> Result<Monitor, VmError> {
    let mut monitor = Monitor::new().map_err(|e| VmError::Io("cannot create monitor", e))?;
    let qmp_path = config
        .monitor
        .clone()
        .unwrap_or_else(|| instance.qmp_socket_path());
    monitor
        .listen(&qmp_path)
        .map_err(|e| VmError::Monitor(e.to_string()))?;
    instance.set_qmp(Some(qmp_path)).map_err(instance_err)?;
    Ok(monitor)
}

/// Open every `--chardev` (printing each pty's path, as QEMU does), record the consoles, and
/// wait for the `wait=on` servers' first clients (a stop signal ends the wait).
fn open_chardevs(
    config: &VmConfig,
    instance: &mut Instance,
    signals: &SignalFd,
) -> Result<Registry, VmError> {
    let mut registry = Registry::new();
    for spec in &config.chardevs {
        registry.add(spec).map_err(|source| VmError::Chardev {
            id: spec.id.clone(),
            source,
        })?;
        if let Some(info) = registry.list().into_iter().find(|i| i.label == spec.id) {
            if info.kind == "pty" {
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
    Ok(registry)
}

/// The COM ports, the virtio-serial devices, the vsock device and the platform devices.
fn build_devices(
    config: &VmConfig,
    dm: &mut DeviceManager,
    registry: &mut Registry,
    link: &GuestLink<'_>,
    power: Arc<dyn PowerControl>,
) -> Result<(), VmError> {
    for plan in &config.com_ports {
        dm.add_com_port(plan, registry, link.irqs)?;
    }
    for plan in &config.virtio_serial {
        dm.add_virtio_console(plan, registry, link)?;
    }
    if let Some(spec) = &config.vsock {
        dm.add_vsock(spec, link)?;
    }
    dm.add_platform_devices(power, link.irqs)?;
    Ok(())
}

/// Monitors on chardevs come after the devices: on a mux (`--serial mon:stdio`) the device
/// keeps the focus and the monitor waits for Ctrl-A c, as in QEMU.
fn attach_monitors(
    config: &VmConfig,
    monitor: &mut Monitor,
    registry: &mut Registry,
) -> Result<(), VmError> {
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
    Ok(())
}

/// The monitor's view of the machine.
fn machine_of(
    config: &VmConfig,
    instance: &Instance,
    registry: Registry,
    dm: &DeviceManager,
    control: &Arc<VcpuControl>,
    exit: &Arc<ExitLatch>,
    monitor: &Monitor,
) -> VmMachine {
    let machine = VmMachine::new(
        config.name.clone(),
        Some(instance.info().uuid.clone()),
        registry,
        control.clone(),
        exit.clone(),
        monitor.events(),
        dm.consoles(),
    )
    .with_uarts(dm.uarts())
    .with_vsock(dm.vsock());
    // The power button is an ACPI device: without ACPI the guest has no driver for it.
    match (config.acpi, dm.ged()) {
        (true, Some(ged)) => machine.with_power_button(ged),
        _ => machine,
    }
}

/// What every vCPU shares.
struct VcpuParts {
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    mem: GuestMemoryMmap,
    exit: Arc<ExitLatch>,
    control: Arc<VcpuControl>,
    seccomp: SeccompMode,
}

/// Create and configure the vCPUs (CPUID, first-boot snapshot, registers for `mode`).
fn create_vcpus(
    kvm: &KvmVm,
    count: u8,
    parts: &VcpuParts,
    mode: crate::boot::EntryMode,
) -> Result<Vec<VcpuContext>, VmError> {
    let cpuid = kvm
        .kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| VmError::KvmIoctl("KVM_GET_SUPPORTED_CPUID", e))?;
    let msr_indices = kvm
        .kvm
        .get_msr_index_list()
        .map_err(|e| VmError::KvmIoctl("KVM_GET_MSR_INDEX_LIST", e))?;
    let mut vcpus = Vec::new();
    for id in 0..count {
        let fd = kvm
            .vm
            .create_vcpu(u64::from(id))
            .map_err(|e| VmError::KvmIoctl("KVM_CREATE_VCPU", e))?;
        cpu::set_cpuid(&fd, id, &cpuid)?;
        let snapshot = cpu::VcpuSnapshot::capture(&fd, msr_indices.as_slice())?;
        cpu::configure_vcpu(&fd, id, &cpuid, &parts.mem, mode)?;
        vcpus.push(VcpuContext {
            id,
            seccomp: parts.seccomp,
            fd,
            pio: parts.pio.clone(),
            mmio: parts.mmio.clone(),
            mem: parts.mem.clone(),
            exit: parts.exit.clone(),
            control: parts.control.clone(),
            snapshot,
        });
    }
    Ok(vcpus)
}
