//! The `minivmm` command line: option definitions, value parsing, and validation that turns
//! every bad value into one line naming the option.
//!
//! Only syntax and static checks live here (a file exists, a size parses, a count is in
//! range). Nothing here opens a device or touches KVM.

use std::path::PathBuf;

use clap::Parser;
use thiserror::Error;

use chardev::ChardevSpec;

use crate::device_spec::{
    plan_com_ports, ComPortPlan, DeviceSpec, IsaSerialSpec, VirtioPortSpec, VirtioSerialSpec,
    VsockSpec,
};
use crate::layout::{COM_PORTS, MIN_MEMORY, MMIO_HOLE_START};
use monitor::MonitorMode;

/// Largest vCPU count accepted: one LAPIC id per vCPU, below the IOAPIC's id.
pub const MAX_VCPUS: u8 = 254;
/// Default guest RAM: QEMU's and Firecracker's default. Every MiB costs boot time on a host
/// whose guest ring 0 is emulated (`resources/README.md`, boot step 4).
pub const DEFAULT_MEMORY: &str = "128M";
/// Largest guest RAM accepted (1 TiB): far above what this VMM is for, below overflow.
pub const MAX_MEMORY: u64 = 1 << 40;

/// A KVM virtual machine monitor for the channels between a host and its guests.
#[derive(Parser, Debug, Clone)]
#[command(name = "minivmm", version, about, long_about = None)]
pub struct Cli {
    /// Guest kernel: a bzImage (64-bit boot protocol) or an uncompressed ELF vmlinux with a
    /// PVH entry note (booted through PVH, as Firecracker and Cloud Hypervisor do).
    #[arg(long, value_name = "PATH")]
    pub kernel: PathBuf,

    /// Initial ramdisk (cpio, optionally compressed) loaded high in guest RAM.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,

    /// Kernel command line. Default: "console=ttyS0 reboot=k panic=1".
    #[arg(long, value_name = "CMDLINE")]
    pub append: Option<String>,

    /// Guest RAM: a number of bytes with an optional K, M, G or T suffix (binary units).
    #[arg(long, value_name = "SIZE", default_value = DEFAULT_MEMORY)]
    pub memory: String,

    /// Number of vCPUs (1 to 254).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub smp: u32,

    /// A COM port's backend, repeated for COM1, COM2, ... (up to 4): `stdio`, `file:PATH`,
    /// `null`, `none`, and the other chardev forms. Default: one COM1 on stdio.
    #[arg(long, value_name = "SPEC")]
    pub serial: Vec<String>,

    /// A character-device backend: `BACKEND,id=ID[,opt=val...]` in QEMU's syntax (socket,
    /// pty, file, pipe, stdio, null, ringbuf, udp, serial; `mux=on` shares it). Repeatable.
    #[arg(long, value_name = "SPEC")]
    pub chardev: Vec<String>,

    /// A device: `isa-serial,chardev=ID[,index=N][,iobase=0x..][,irq=N][,baudbase=N][,pacing=on|off]`.
    /// Repeatable.
    #[arg(long, value_name = "SPEC")]
    pub device: Vec<String>,

    /// Serve QMP on a unix socket at PATH (mode 0600, several clients at once). Default: the
    /// socket `qmp.sock` in the instance's runtime directory.
    #[arg(long, value_name = "PATH")]
    pub monitor: Option<PathBuf>,

    /// A monitor on a chardev: `chardev=ID[,mode=control|readline]`, QMP (`control`) or the
    /// human monitor (`readline`, the default) on any `--chardev`. Repeatable.
    #[arg(long = "mon", value_name = "SPEC")]
    pub mon: Vec<String>,

    /// The instance name: its runtime directory, `minivmm list`, `query-name`. Default
    /// `vm-PID`.
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,

    /// The VM's UUID (`query-uuid`), xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx. Default: random.
    #[arg(long, value_name = "UUID")]
    pub uuid: Option<String>,

    /// Exit (status 0) instead of rebooting when the guest resets the machine, as QEMU's
    /// -no-reboot; `system_reset` exits too. Default: the VM reboots in process.
    #[arg(long)]
    pub no_reboot: bool,

    /// ACPI tables for the guest (`on`, the default) or none (`off`, as QEMU's
    /// `-M microvm,acpi=off`): for kernels built without ACPI. With `off` the virtio-mmio
    /// devices are announced as `virtio_mmio.device=` entries on the kernel command line, the
    /// processors and interrupt routes by the MP table, and there is no ACPI power button
    /// (`system_powerdown` fails).
    #[arg(long, value_name = "on|off", default_value = "on", value_parser = parse_on_off, action = clap::ArgAction::Set)]
    pub acpi: bool,

    /// seccomp filters on every thread once set-up is done (`on`, the default): a forbidden
    /// syscall stops minivmm with one line naming the thread and the syscall. `off` installs
    /// none (for debugging, as Firecracker's --no-seccomp); `log` lets forbidden syscalls
    /// through and has the kernel log them (dmesg). docs/seccomp.md lists what is allowed.
    #[arg(long, value_name = "on|off|log", default_value = "on")]
    pub seccomp: crate::seccomp::SeccompMode,
}

/// `on` or `off` (QEMU's spelling of a switch).
fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("'{s}': expected 'on' or 'off'")),
    }
}

/// The validated machine configuration the VMM builds from.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Guest kernel image.
    pub kernel: PathBuf,
    /// Optional initrd.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// vCPU count.
    pub vcpus: u8,
    /// Every chardev to create, `--chardev` ones and those `--serial` implies.
    pub chardevs: Vec<chardev::ChardevSpec>,
    /// The COM ports, in index order.
    pub com_ports: Vec<ComPortPlan>,
    /// The virtio-serial devices with their ports, in slot order.
    pub virtio_serial: Vec<VirtioSerialPlan>,
    /// The vsock device (`--device vsock`), in the slot after the virtio-serial devices.
    pub vsock: Option<VsockSpec>,
    /// The QMP socket path given with `--monitor`.
    pub monitor: Option<PathBuf>,
    /// The monitors on chardevs (`--mon`).
    pub mons: Vec<MonSpec>,
    /// `--name`, checked.
    pub name: Option<String>,
    /// `--uuid`, checked and lowercased.
    pub uuid: Option<String>,
    /// `--no-reboot`: a reset ends the VM instead of rebooting it.
    pub no_reboot: bool,
    /// `--acpi`: ACPI tables (else virtio-mmio devices on the kernel command line).
    pub acpi: bool,
    /// `--seccomp`: the threads' filters.
    pub seccomp: crate::seccomp::SeccompMode,
}

/// A `--mon chardev=ID,mode=...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MonSpec {
    /// The chardev it runs on.
    pub chardev: String,
    /// QMP or the human monitor.
    pub mode: MonitorMode,
}

impl MonSpec {
    /// Parse `chardev=ID[,mode=control|readline]`; the mode defaults to `readline`, as in
    /// QEMU.
    pub fn parse(s: &str) -> Result<MonSpec, String> {
        let mut chardev = None;
        let mut mode = MonitorMode::Readline;
        for part in chardev::spec::split_options(s) {
            match part.split_once('=') {
                Some(("chardev", id)) if !id.is_empty() => chardev = Some(id.to_string()),
                Some(("mode", m)) => {
                    mode = MonitorMode::parse(m)
                        .ok_or_else(|| format!("mode '{m}' is not 'control' or 'readline'"))?
                }
                // QEMU's JSON pretty-printing switch: minivmm always sends one line.
                Some(("pretty", "on" | "off")) => {}
                _ => return Err(format!("unknown option '{part}' (chardev=ID,mode=MODE)")),
            }
        }
        let chardev = chardev.ok_or_else(|| "chardev=ID is missing".to_string())?;
        Ok(MonSpec { chardev, mode })
    }
}

/// What `--device` asks for: ISA UARTs, virtio-serial devices, the vsock device.
type Devices = (Vec<IsaSerialSpec>, Vec<VirtioSerialPlan>, Option<VsockSpec>);

/// A virtio-serial device and the ports on it.
#[derive(Debug, Clone)]
pub struct VirtioSerialPlan {
    /// Device id.
    pub id: String,
    /// Ports offered to the guest.
    pub max_ports: u32,
    /// Ports present at boot.
    pub ports: Vec<VirtioPortSpec>,
}

/// A rejected command-line value. The message names the option.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CliError {
    /// The kernel image cannot be read.
    #[error("--kernel: cannot read '{path}': {reason}")]
    Kernel {
        /// The path given.
        path: String,
        /// Why.
        reason: String,
    },
    /// The initrd cannot be read.
    #[error("--initrd: cannot read '{path}': {reason}")]
    Initrd {
        /// The path given.
        path: String,
        /// Why.
        reason: String,
    },
    /// The memory size did not parse or is out of range.
    #[error("--memory: {0}")]
    Memory(String),
    /// The vCPU count is out of range.
    #[error("--smp: {0} vCPUs is out of range (1 to {max})", max = MAX_VCPUS)]
    Smp(u32),
    /// Too many serial ports.
    #[error("--serial: at most {max} ports (COM1 to COM{max}), got {0}", max = COM_PORTS.len())]
    TooManySerial(usize),
    /// A `--serial` value does not parse.
    #[error("--serial: {0}")]
    Serial(chardev::SpecError),
    /// A `--chardev` value does not parse.
    #[error("--chardev: {0}")]
    Chardev(chardev::SpecError),
    /// Two chardevs with one id.
    #[error("--chardev: duplicate id '{0}'")]
    DuplicateChardev(String),
    /// A chardev used by two frontends without `mux=on`.
    #[error("--device: chardev '{0}' is used by two frontends (add mux=on to share it)")]
    ChardevInUse(String),
    /// A device names a chardev that `--chardev` did not define.
    #[error("--device {driver}: chardev '{id}' is not defined with --chardev")]
    UnknownDeviceChardev {
        /// The device driver.
        driver: String,
        /// The chardev id.
        id: String,
    },
    /// More virtio-serial devices than GSIs for them.
    #[error("--device: at most {max} virtio-serial devices, got {0}", max = crate::layout::MAX_VIRTIO_MMIO_DEVICES)]
    TooManyVirtioSerial(usize),
    /// A second `--device vsock`.
    #[error("--device vsock: only one vsock device is supported")]
    TwoVsock,
    /// Two devices with one id.
    #[error("--device: duplicate id '{0}'")]
    DuplicateDevice(String),
    /// A port's `bus=` names no virtio-serial.
    #[error("--device: bus '{0}' is not a virtio-serial device")]
    UnknownBus(String),
    /// Two ports with one name.
    #[error("--device: port name '{0}' is used twice")]
    DuplicatePortName(String),
    /// A `--device` value is invalid.
    #[error("{0}")]
    Device(crate::device_spec::DeviceError),
    /// `--serial chardev:ID` names no `--chardev`.
    #[error("--serial: chardev:{0}: no --chardev with that id")]
    UnknownChardev(String),
    /// A `--mon` value is invalid.
    #[error("--mon: {0}")]
    Mon(String),
    /// A bad `--name` or `--uuid`.
    #[error("--{option}: {reason}")]
    Instance {
        /// `name` or `uuid`.
        option: &'static str,
        /// Why.
        reason: String,
    },
    /// The command line is too long.
    #[error("--append: the command line is {0} bytes, the limit is {max}", max = crate::layout::CMDLINE_MAX_SIZE - 1)]
    CmdlineTooLong(usize),
}

/// Default kernel command line.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

/// Parse a size such as `256M`, `1G`, `65536`, `512k`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("empty size".into());
    }
    let (digits, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => {
                    return Err(format!(
                        "'{s}' has an unknown unit '{c}' (use K, M, G or T)"
                    ))
                }
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("'{s}' is not a size (examples: 256M, 1G, 1048576)"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("'{s}' is too large"))
}

impl Cli {
    /// Check every value and build the machine configuration. The checks run in the order of
    /// the helpers below, so the first bad value met in that order is the one reported.
    pub fn validate(&self) -> Result<VmConfig, CliError> {
        self.check_files()?;
        let memory = self.memory_size()?;
        let vcpus = match u8::try_from(self.smp) {
            Ok(n) if (1..=MAX_VCPUS).contains(&n) => n,
            _ => return Err(CliError::Smp(self.smp)),
        };
        if self.serial.len() > COM_PORTS.len() {
            return Err(CliError::TooManySerial(self.serial.len()));
        }
        let cmdline = self.cmdline()?;
        let mut chardevs = self.chardev_specs()?;
        // `--serial mon:FORM` also puts the human monitor on that chardev, as QEMU does.
        let (serial_ids, mut mons) = add_serial_chardevs(&self.serial_specs(), &mut chardevs)?;
        let (isa, virtio_serial, vsock) = self.devices(&chardevs)?;
        let com_ports = plan_com_ports(&serial_ids, &isa).map_err(CliError::Device)?;
        for m in &self.mon {
            mons.push(parse_mon(m, &chardevs)?);
        }
        check_chardev_users(&chardevs, &com_ports, &virtio_serial, &mons)?;
        let uuid = self.instance_ids()?;
        Ok(VmConfig {
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            cmdline,
            memory,
            vcpus,
            chardevs,
            com_ports,
            virtio_serial,
            vsock,
            monitor: self.monitor.clone(),
            mons,
            name: self.name.clone(),
            uuid,
            no_reboot: self.no_reboot,
            acpi: self.acpi,
            seccomp: self.seccomp,
        })
    }

    /// The kernel and the initrd can be read.
    fn check_files(&self) -> Result<(), CliError> {
        std::fs::File::open(&self.kernel).map_err(|e| CliError::Kernel {
            path: self.kernel.display().to_string(),
            reason: io_reason(&e),
        })?;
        if let Some(initrd) = &self.initrd {
            std::fs::File::open(initrd).map_err(|e| CliError::Initrd {
                path: initrd.display().to_string(),
                reason: io_reason(&e),
            })?;
        }
        Ok(())
    }

    /// `--memory` in bytes: at least [`MIN_MEMORY`], at most [`MAX_MEMORY`], whole pages.
    fn memory_size(&self) -> Result<u64, CliError> {
        let memory = parse_size(&self.memory).map_err(CliError::Memory)?;
        let problem = if memory < MIN_MEMORY {
            format!("is too small: at least {} MiB", MIN_MEMORY >> 20)
        } else if memory > MAX_MEMORY {
            format!("is too large: at most {} GiB", MAX_MEMORY >> 30)
        } else if memory % PAGE_SIZE != 0 {
            "is not a multiple of 4 KiB".to_string()
        } else {
            return Ok(memory);
        };
        Err(CliError::Memory(format!("'{}' {problem}", self.memory)))
    }

    /// `--append`, or the default, if it fits the boot protocol's buffer.
    fn cmdline(&self) -> Result<String, CliError> {
        let cmdline = self
            .append
            .clone()
            .unwrap_or_else(|| DEFAULT_CMDLINE.to_string());
        if cmdline.len() >= crate::layout::CMDLINE_MAX_SIZE {
            return Err(CliError::CmdlineTooLong(cmdline.len()));
        }
        Ok(cmdline)
    }

    /// The `--serial` values; as in QEMU, the default COM1 on stdio exists only when the
    /// command line asks for no UART at all.
    fn serial_specs(&self) -> Vec<String> {
        let has_isa_serial = self
            .device
            .iter()
            .any(|d| d.split(',').next() == Some("isa-serial"));
        if self.serial.is_empty() && !has_isa_serial {
            vec!["stdio".to_string()]
        } else {
            self.serial.clone()
        }
    }

    /// Every `--chardev`, ids unique.
    fn chardev_specs(&self) -> Result<Vec<ChardevSpec>, CliError> {
        let mut chardevs: Vec<ChardevSpec> = Vec::new();
        for spec in &self.chardev {
            let spec = ChardevSpec::parse(spec).map_err(CliError::Chardev)?;
            if chardevs.iter().any(|c| c.id == spec.id) {
                return Err(CliError::DuplicateChardev(spec.id));
            }
            chardevs.push(spec);
        }
        Ok(chardevs)
    }

    /// Every `--device`: the ISA UARTs, the virtio-serial devices with their ports (a
    /// port without one gets one) and the vsock device, if any. Each chardev named must be
    /// defined.
    fn devices(&self, chardevs: &[ChardevSpec]) -> Result<Devices, CliError> {
        let mut vsock = None;
        let mut isa = Vec::new();
        let mut virtio_serial: Vec<VirtioSerialPlan> = Vec::new();
        let mut virtio_ports = Vec::new();
        for d in &self.device {
            match DeviceSpec::parse(d).map_err(CliError::Device)? {
                DeviceSpec::IsaSerial(s) => {
                    check_device_chardev(chardevs, &s.chardev, "isa-serial")?;
                    isa.push(s);
                }
                DeviceSpec::VirtioSerial(s) => add_virtio_serial(&mut virtio_serial, s)?,
                DeviceSpec::VirtioPort(p) => {
                    let driver = if p.console {
                        "virtconsole"
                    } else {
                        "virtserialport"
                    };
                    check_device_chardev(chardevs, &p.chardev, driver)?;
                    virtio_ports.push(p);
                }
                DeviceSpec::Vsock(v) => {
                    if vsock.replace(v).is_some() {
                        return Err(CliError::TwoVsock);
                    }
                }
            }
        }
        // The vsock device takes one of the virtio-mmio slots too.
        let slots_left = crate::layout::MAX_VIRTIO_MMIO_DEVICES - usize::from(vsock.is_some());
        if virtio_serial.len() > slots_left {
            return Err(CliError::TooManyVirtioSerial(virtio_serial.len()));
        }
        place_ports(&mut virtio_serial, virtio_ports)?;
        Ok((isa, virtio_serial, vsock))
    }

    /// `--name` checked; `--uuid` checked and lowercased.
    fn instance_ids(&self) -> Result<Option<String>, CliError> {
        if let Some(name) = &self.name {
            monitor::instance::validate_name(name).map_err(|e| CliError::Instance {
                option: "name",
                reason: e.to_string(),
            })?;
        }
        self.uuid
            .as_deref()
            .map(|u| {
                monitor::instance::validate_uuid(u).map_err(|e| CliError::Instance {
                    option: "uuid",
                    reason: e.to_string(),
                })
            })
            .transpose()
    }
}

/// Guest RAM is mapped in whole pages.
const PAGE_SIZE: u64 = 4096;

/// Add the chardevs `--serial` values imply (`serialN`) to `chardevs`; returns the chardev of
/// each COM port (`None` for `none`) and the human monitors `mon:` asks for.
fn add_serial_chardevs(
    specs: &[String],
    chardevs: &mut Vec<ChardevSpec>,
) -> Result<(Vec<Option<String>>, Vec<MonSpec>), CliError> {
    let mut serial_ids = Vec::new();
    let mut mons = Vec::new();
    for (i, text) in specs.iter().enumerate() {
        match chardev::parse_serial(text, &format!("serial{i}")).map_err(CliError::Serial)? {
            chardev::SerialArg::None => serial_ids.push(None),
            chardev::SerialArg::Chardev(id) => {
                if !chardevs.iter().any(|c| c.id == id) {
                    return Err(CliError::UnknownChardev(id));
                }
                serial_ids.push(Some(id));
            }
            chardev::SerialArg::Spec(spec) => {
                if chardevs.iter().any(|c| c.id == spec.id) {
                    return Err(CliError::DuplicateChardev(spec.id));
                }
                serial_ids.push(Some(spec.id.clone()));
                if text.starts_with("mon:") {
                    mons.push(MonSpec {
                        chardev: spec.id.clone(),
                        mode: MonitorMode::Readline,
                    });
                }
                chardevs.push(spec);
            }
        }
    }
    Ok((serial_ids, mons))
}

/// The chardev `id` a `driver` device names is defined.
fn check_device_chardev(chardevs: &[ChardevSpec], id: &str, driver: &str) -> Result<(), CliError> {
    if chardevs.iter().any(|c| c.id == id) {
        Ok(())
    } else {
        Err(CliError::UnknownDeviceChardev {
            driver: driver.to_string(),
            id: id.to_string(),
        })
    }
}

/// Add a `virtio-serial` (`vserN` when it has no id); ids are unique.
fn add_virtio_serial(
    plans: &mut Vec<VirtioSerialPlan>,
    mut spec: VirtioSerialSpec,
) -> Result<(), CliError> {
    if spec.id.is_empty() {
        spec.id = format!("vser{}", plans.len());
    }
    if plans.iter().any(|v| v.id == spec.id) {
        return Err(CliError::DuplicateDevice(spec.id));
    }
    plans.push(VirtioSerialPlan {
        id: spec.id,
        max_ports: spec.max_ports,
        ports: Vec::new(),
    });
    Ok(())
}

/// Put each port on its `bus=` (default: the first virtio-serial, made if there is none, as
/// QEMU's machines do); port names are unique.
fn place_ports(
    virtio_serial: &mut Vec<VirtioSerialPlan>,
    ports: Vec<VirtioPortSpec>,
) -> Result<(), CliError> {
    for port in ports {
        if virtio_serial.is_empty() {
            virtio_serial.push(VirtioSerialPlan {
                id: "vser0".into(),
                max_ports: crate::device_spec::DEFAULT_VIRTIO_SERIAL_PORTS,
                ports: Vec::new(),
            });
        }
        let bus = match &port.bus {
            Some(b) => virtio_serial
                .iter_mut()
                .find(|v| &v.id == b)
                .ok_or_else(|| CliError::UnknownBus(b.clone()))?,
            None => &mut virtio_serial[0],
        };
        bus.ports.push(port);
    }
    let names = virtio_serial
        .iter()
        .flat_map(|v| v.ports.iter().filter_map(|p| p.name.as_deref()));
    match repeats(names).first() {
        Some(name) => Err(CliError::DuplicatePortName(name.to_string())),
        None => Ok(()),
    }
}

/// One `--mon`, on a defined chardev.
fn parse_mon(text: &str, chardevs: &[ChardevSpec]) -> Result<MonSpec, CliError> {
    let m = MonSpec::parse(text).map_err(CliError::Mon)?;
    if !chardevs.iter().any(|c| c.id == m.chardev) {
        return Err(CliError::Mon(format!(
            "chardev '{}' is not defined with --chardev",
            m.chardev
        )));
    }
    Ok(m)
}

/// A chardev has one frontend (a COM port, a virtio port or a monitor) unless `mux=on`.
fn check_chardev_users(
    chardevs: &[ChardevSpec],
    com_ports: &[ComPortPlan],
    virtio_serial: &[VirtioSerialPlan],
    mons: &[MonSpec],
) -> Result<(), CliError> {
    let users = com_ports
        .iter()
        .map(|p| p.chardev.as_str())
        .chain(
            virtio_serial
                .iter()
                .flat_map(|v| v.ports.iter().map(|p| p.chardev.as_str())),
        )
        .chain(mons.iter().map(|m| m.chardev.as_str()));
    let unshareable = repeats(users)
        .into_iter()
        .find(|&id| !chardevs.iter().any(|c| c.id == id && c.mux));
    match unshareable {
        Some(id) => Err(CliError::ChardevInUse(id.to_string())),
        None => Ok(()),
    }
}

/// The items that occur more than once, in order (one entry per extra occurrence).
fn repeats<'a>(items: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut items: Vec<&str> = items.collect();
    items.sort_unstable();
    items
        .windows(2)
        .filter(|w| w[0] == w[1])
        .map(|w| w[0])
        .collect()
}

/// Above 3 GiB of RAM the rest goes above 4 GiB; this says how much sits below the hole.
pub fn low_memory(total: u64) -> u64 {
    total.min(MMIO_HOLE_START)
}

fn io_reason(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "no such file".into(),
        std::io::ErrorKind::PermissionDenied => "permission denied".into(),
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Cli {
        let mut v = vec!["minivmm", "--kernel", "/dev/null"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v).unwrap()
    }

    /// Why `minivmm ARGS` is refused.
    fn rejected(args: &[&str]) -> String {
        cli(args).validate().unwrap_err().to_string()
    }

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("").is_err());
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("-1M").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn defaults_give_one_vcpu_128m_and_stdio_console() {
        let c = cli(&[]).validate().unwrap();
        assert_eq!(c.memory, 128 << 20);
        assert_eq!(c.vcpus, 1);
        assert_eq!(c.com_ports.len(), 1);
        assert_eq!(c.com_ports[0].chardev, "serial0");
        assert_eq!(c.chardevs[0].backend.kind(), "stdio");
        assert_eq!(c.cmdline, DEFAULT_CMDLINE);
        assert!(!c.no_reboot, "a guest reboot restarts the VM by default");
        assert!(cli(&["--no-reboot"]).validate().unwrap().no_reboot);
        assert!(c.acpi, "ACPI is on by default");
        assert!(!cli(&["--acpi", "off"]).validate().unwrap().acpi);
    }

    #[test]
    fn bad_values_name_their_option() {
        let e = cli(&["--memory", "lots"]).validate().unwrap_err();
        assert!(e.to_string().starts_with("--memory:"), "{e}");
        let e = cli(&["--memory", "1M"]).validate().unwrap_err();
        assert!(e.to_string().contains("too small"), "{e}");
        let e = cli(&["--smp", "0"]).validate().unwrap_err();
        assert!(e.to_string().starts_with("--smp:"), "{e}");
        let e = cli(&["--smp", "300"]).validate().unwrap_err();
        assert!(e.to_string().starts_with("--smp:"), "{e}");
        let five: Vec<&str> = ["--serial", "stdio"].repeat(5);
        let e = cli(&five).validate().unwrap_err();
        assert!(e.to_string().starts_with("--serial:"), "{e}");
        let e = cli(&["--serial", "bogus:thing"]).validate().unwrap_err();
        assert!(e.to_string().starts_with("--serial:"), "{e}");
        let e = cli(&["--serial", "chardev:nope"]).validate().unwrap_err();
        assert!(e.to_string().starts_with("--serial:"), "{e}");
        let long = "x".repeat(3000);
        let e = cli(&["--append", &long]).validate().unwrap_err();
        assert!(e.to_string().starts_with("--append:"), "{e}");
    }

    #[test]
    fn one_vsock_device() {
        let c = cli(&["--device", "vsock,guest-cid=3,uds=/tmp/v.sock"])
            .validate()
            .unwrap();
        let v = c.vsock.expect("a vsock");
        assert_eq!((v.guest_cid, v.uds_path.to_str()), (3, Some("/tmp/v.sock")));
        assert_eq!(
            rejected(&[
                "--device",
                "vsock,guest-cid=3,uds=/tmp/a",
                "--device",
                "vsock,guest-cid=4,uds=/tmp/b",
            ]),
            "--device vsock: only one vsock device is supported"
        );
        assert!(rejected(&["--device", "vsock,guest-cid=1,uds=/tmp/a"]).contains("guest-cid 1"));
    }

    #[test]
    fn chardevs_and_devices_make_com_ports() {
        let c = cli(&[
            "--chardev",
            "null,id=n0",
            "--chardev",
            "file,id=f0,path=/tmp/x",
            "--device",
            "isa-serial,chardev=n0",
            "--device",
            "isa-serial,chardev=f0,index=3,pacing=off",
        ])
        .validate()
        .unwrap();
        let ports: Vec<(usize, &str, bool)> = c
            .com_ports
            .iter()
            .map(|p| (p.index, p.chardev.as_str(), p.pacing))
            .collect();
        // An isa-serial device replaces the default COM1 on stdio, as in QEMU.
        assert_eq!(ports, vec![(0, "n0", true), (3, "f0", false)]);
        assert_eq!(
            rejected(&["--chardev", "null,id=a", "--chardev", "null,id=a"]),
            "--chardev: duplicate id 'a'"
        );
        let e = rejected(&["--device", "isa-serial,chardev=zz"]);
        assert!(e.contains("'zz'"), "{e}");
        let e = rejected(&[
            "--chardev",
            "null,id=a",
            "--serial",
            "chardev:a",
            "--device",
            "isa-serial,chardev=a",
        ]);
        assert!(e.contains("mux=on"), "{e}");
        // Every shared chardev needs mux=on, not only the first in id order.
        let e = rejected(&[
            "--chardev",
            "null,id=a,mux=on",
            "--chardev",
            "null,id=b",
            "--serial",
            "chardev:a",
            "--serial",
            "chardev:b",
            "--device",
            "virtserialport,chardev=a",
            "--device",
            "virtserialport,chardev=b,id=b2",
        ]);
        assert_eq!(
            e,
            "--device: chardev 'b' is used by two frontends (add mux=on to share it)"
        );
        let e = rejected(&["--chardev", "bogus,id=a"]);
        assert!(e.starts_with("--chardev:"), "{e}");
    }

    #[test]
    fn virtio_ports_go_on_a_virtio_serial() {
        let c = cli(&[
            "--chardev",
            "null,id=a",
            "--chardev",
            "null,id=b",
            "--device",
            "virtserialport,chardev=a,name=org.x.a",
            "--device",
            "virtconsole,chardev=b",
        ])
        .validate()
        .unwrap();
        assert_eq!(c.virtio_serial.len(), 1);
        assert_eq!(c.virtio_serial[0].id, "vser0");
        assert_eq!(c.virtio_serial[0].ports.len(), 2);
        let e = rejected(&[
            "--chardev",
            "null,id=a",
            "--chardev",
            "null,id=b",
            "--device",
            "virtserialport,chardev=a,name=same",
            "--device",
            "virtserialport,chardev=b,name=same",
        ]);
        assert_eq!(e, "--device: port name 'same' is used twice");
        let e = rejected(&[
            "--chardev",
            "null,id=a",
            "--device",
            "virtserialport,chardev=a,bus=nope",
        ]);
        assert!(e.contains("'nope'"), "{e}");
    }

    #[test]
    fn monitors_on_chardevs_and_instance_identity() {
        let c = cli(&[
            "--chardev",
            "null,id=q",
            "--chardev",
            "null,id=h",
            "--mon",
            "chardev=q,mode=control",
            "--mon",
            "chardev=h",
            "--uuid",
            "ABCDEF01-2345-6789-ABCD-EF0123456789",
        ])
        .validate()
        .unwrap();
        let q = MonSpec {
            chardev: "q".into(),
            mode: MonitorMode::Control,
        };
        let h = MonSpec {
            chardev: "h".into(),
            mode: MonitorMode::Readline,
        };
        assert_eq!(c.mons, vec![q, h]);
        assert_eq!(
            c.uuid.as_deref(),
            Some("abcdef01-2345-6789-abcd-ef0123456789")
        );
        assert_eq!(c.name, None);
        let e = cli(&["--mon", "chardev=zz"]).validate().unwrap_err();
        assert_eq!(
            e.to_string(),
            "--mon: chardev 'zz' is not defined with --chardev"
        );
        let e = cli(&["--chardev", "null,id=q", "--mon", "chardev=q,mode=qmp"])
            .validate()
            .unwrap_err();
        assert!(e.to_string().starts_with("--mon: mode 'qmp'"), "{e}");
        let e = cli(&["--mon", "mode=control"]).validate().unwrap_err();
        assert!(e.to_string().contains("chardev=ID"), "{e}");
        // A chardev a COM port uses needs mux=on to carry a monitor too.
        let e = cli(&[
            "--chardev",
            "null,id=s",
            "--serial",
            "chardev:s",
            "--mon",
            "chardev=s",
        ])
        .validate()
        .unwrap_err();
        assert!(e.to_string().contains("mux=on"), "{e}");
        // `--serial mon:FORM`: the COM port and the human monitor share a mux, as in QEMU.
        let c = cli(&["--serial", "mon:stdio", "--serial", "pty"])
            .validate()
            .unwrap();
        let com1 = c.chardevs.iter().find(|s| s.id == "serial0").unwrap();
        assert!(com1.mux);
        assert_eq!(
            c.mons,
            vec![MonSpec {
                chardev: "serial0".into(),
                mode: MonitorMode::Readline,
            }]
        );
        let e = cli(&["--name", "a/b"]).validate().unwrap_err();
        assert!(
            e.to_string().starts_with("--name: bad instance name"),
            "{e}"
        );
        let e = cli(&["--uuid", "nope"]).validate().unwrap_err();
        assert!(e.to_string().starts_with("--uuid: bad uuid"), "{e}");
    }

    #[test]
    fn missing_kernel_file_names_kernel() {
        let c = Cli::try_parse_from(["minivmm", "--kernel", "/nonexistent/vmlinux"]).unwrap();
        let e = c.validate().unwrap_err();
        assert_eq!(
            e.to_string(),
            "--kernel: cannot read '/nonexistent/vmlinux': no such file"
        );
    }

    #[test]
    fn memory_splits_around_the_hole() {
        assert_eq!(low_memory(256 << 20), 256 << 20);
        assert_eq!(low_memory(4 << 30), MMIO_HOLE_START);
    }
}
