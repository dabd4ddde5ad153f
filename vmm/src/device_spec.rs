//! `--device DRIVER,key=value,...` in QEMU's syntax, and the COM-port plan it produces together
//! with `--serial`: which chardev each of COM1..COM4 uses, at which port, IRQ and line clock.
//!
//! The option syntax and the port models (`virtserialport`, `virtconsole`) go through
//! `monitor::device_spec`, the parser QMP and HMP `device_add` use too; the models only the
//! command line has (`isa-serial`, `virtio-serial`) are read here from the same properties.
//! Only parsing and static checks here; backends are opened when the VM is built.

use monitor::device_spec::{DeviceDriver, DeviceProps, DeviceSpec as PortSpec, DeviceSpecError};
use thiserror::Error;

use crate::layout::COM_PORTS;

/// Default UART input clock divided by 16: the 1.8432 MHz crystal of a PC.
pub const DEFAULT_BAUD_BASE: u32 = 115_200;

/// A rejected `--device`. The message names the option and the device.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DeviceError {
    /// No driver name.
    #[error("--device: the device model is missing (known: {KNOWN_DRIVERS})")]
    MissingDriver,
    /// The driver name is not one minivmm has.
    #[error("--device: unknown device '{0}' (known: {KNOWN_DRIVERS})")]
    UnknownDriver(String),
    /// An option the driver does not take.
    #[error("--device {driver}: unknown option '{key}'")]
    UnknownOption {
        /// The driver.
        driver: String,
        /// The option.
        key: String,
    },
    /// An option given twice.
    #[error("--device {driver}: option '{key}' given twice")]
    Duplicate {
        /// The driver.
        driver: String,
        /// The option.
        key: String,
    },
    /// A value that does not parse.
    #[error("--device {driver}: bad value '{value}' for '{key}'")]
    BadValue {
        /// The driver.
        driver: String,
        /// The option.
        key: String,
        /// The value given.
        value: String,
    },
    /// A required option is missing.
    #[error("--device {driver}: '{key}' is required")]
    Missing {
        /// The driver.
        driver: String,
        /// The option.
        key: String,
    },
    /// Two devices want the same COM index, or there is none left.
    #[error("--device isa-serial: {0}")]
    Placement(String),
    /// A vsock guest CID outside 3..=4294967294.
    #[error("--device vsock: guest-cid {0} is not in 3..=4294967294 (0-2 are reserved, CIDs are 32 bits)")]
    VsockCid(u64),
    /// An empty `uds=` path.
    #[error("--device vsock: 'uds' must be a socket path")]
    VsockPath,
}

/// The drivers `--device` knows, for its errors.
const KNOWN_DRIVERS: &str = "isa-serial, virtio-serial, virtserialport, virtconsole, vsock";

/// The shared parser's errors, in the command line's words.
impl From<DeviceSpecError> for DeviceError {
    fn from(e: DeviceSpecError) -> Self {
        match e {
            DeviceSpecError::MissingDriver => DeviceError::MissingDriver,
            DeviceSpecError::UnknownDriver(d) => DeviceError::UnknownDriver(d),
            DeviceSpecError::UnknownProperty { driver, property } => DeviceError::UnknownOption {
                driver,
                key: property,
            },
            DeviceSpecError::Duplicate { driver, property } => DeviceError::Duplicate {
                driver,
                key: property,
            },
            DeviceSpecError::BadValue {
                driver,
                property,
                value,
            } => DeviceError::BadValue {
                driver,
                key: property,
                value,
            },
            DeviceSpecError::Missing { driver, property } => DeviceError::Missing {
                driver,
                key: property,
            },
        }
    }
}

/// An ISA 16550 UART as `--device isa-serial` or `--serial` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IsaSerialSpec {
    /// The chardev id it uses.
    pub chardev: String,
    /// COM index (0 = COM1), when given.
    pub index: Option<usize>,
    /// I/O base, when given (else the index's standard port).
    pub iobase: Option<u16>,
    /// IRQ, when given (else the index's standard IRQ).
    pub irq: Option<u32>,
    /// UART clock / 16.
    pub baud_base: u32,
    /// Whether the UART keeps line-rate timing.
    pub pacing: bool,
}

/// A `virtio-serial` device (a multiport virtio-console on its own virtio-mmio slot).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtioSerialSpec {
    /// Device id (`id=`), which ports name with `bus=`.
    pub id: String,
    /// Port count the device offers (`max_ports=`).
    pub max_ports: u32,
}

/// A `virtserialport` or `virtconsole` present at boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtioPortSpec {
    /// Device id (`id=`, default the chardev id).
    pub id: String,
    /// The chardev behind it.
    pub chardev: String,
    /// The name the guest sees (`/dev/virtio-ports/NAME`).
    pub name: Option<String>,
    /// Port number (`nr=`).
    pub nr: Option<u32>,
    /// The `virtio-serial` it belongs to (`bus=`); default: the first.
    pub bus: Option<String>,
    /// `virtconsole` (an hvc console) rather than `virtserialport`.
    pub console: bool,
}

/// A `vsock` device: virtio-vsock with its host side on unix sockets (Firecracker's hybrid
/// vsock): `vsock,guest-cid=N,uds=PATH[,id=ID]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockSpec {
    /// Device id (`id=`, default `vsock0`).
    pub id: String,
    /// The guest's CID.
    pub guest_cid: u64,
    /// Where host clients connect (`CONNECT <port>`); guest connections to host port P go to
    /// `PATH_P`.
    pub uds_path: std::path::PathBuf,
}

/// The id of a `vsock` device given none.
pub const DEFAULT_VSOCK_ID: &str = "vsock0";

/// Default `max_ports` of a virtio-serial device, as QEMU.
pub const DEFAULT_VIRTIO_SERIAL_PORTS: u32 = 31;
/// Most ports a virtio-serial device may offer (QEMU's limit).
const MAX_VIRTIO_SERIAL_PORTS: u32 = 511;
/// ISA IRQs a UART may use: 1 to 15.
const ISA_IRQS: std::ops::Range<u32> = 1..16;

/// One parsed `--device`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceSpec {
    /// `isa-serial`.
    IsaSerial(IsaSerialSpec),
    /// `virtio-serial`.
    VirtioSerial(VirtioSerialSpec),
    /// `virtserialport` / `virtconsole`.
    VirtioPort(VirtioPortSpec),
    /// `vsock`.
    Vsock(VsockSpec),
}

fn parse_isa_serial(mut p: DeviceProps) -> Result<DeviceSpec, DeviceSpecError> {
    // QEMU's `id=` names the device; minivmm's COM ports go by chardev, so it is only checked.
    p.take_id("id")?;
    let spec = IsaSerialSpec {
        chardev: p.take_id("chardev")?.ok_or_else(|| p.missing("chardev"))?,
        index: p.take_number("index", |&n: &usize| n < COM_PORTS.len())?,
        iobase: p.take_number("iobase", |_: &u16| true)?,
        irq: p.take_number("irq", |n: &u32| ISA_IRQS.contains(n))?,
        baud_base: p
            .take_number("baudbase", |&n: &u32| n > 0)?
            .unwrap_or(DEFAULT_BAUD_BASE),
        pacing: p.take_bool("pacing")?.unwrap_or(true),
    };
    p.finish()?;
    Ok(DeviceSpec::IsaSerial(spec))
}

fn parse_virtio_serial(mut p: DeviceProps) -> Result<DeviceSpec, DeviceSpecError> {
    let spec = VirtioSerialSpec {
        id: p.take_id("id")?.unwrap_or_default(),
        max_ports: p
            .take_number("max_ports", |n: &u32| {
                (1..=MAX_VIRTIO_SERIAL_PORTS).contains(n)
            })?
            .unwrap_or(DEFAULT_VIRTIO_SERIAL_PORTS),
    };
    p.finish()?;
    Ok(DeviceSpec::VirtioSerial(spec))
}

/// `vsock,guest-cid=N,uds=PATH[,id=ID]` (QEMU's `vhost-vsock-device` also calls the CID
/// `guest-cid`; `uds` is Firecracker's `uds_path`).
fn parse_vsock(mut p: DeviceProps) -> Result<DeviceSpec, DeviceError> {
    use devices::virtio::vsock::muxer::{MAX_GUEST_CID, MIN_GUEST_CID};
    let id = p
        .take_id("id")?
        .unwrap_or_else(|| DEFAULT_VSOCK_ID.to_string());
    let guest_cid = p.take_number("guest-cid", |_: &u64| true)?;
    let uds = p.take("uds");
    p.finish()?;
    let guest_cid = guest_cid.ok_or_else(|| DeviceError::Missing {
        driver: "vsock".into(),
        key: "guest-cid".into(),
    })?;
    if !(MIN_GUEST_CID..=MAX_GUEST_CID).contains(&guest_cid) {
        return Err(DeviceError::VsockCid(guest_cid));
    }
    let uds = uds.ok_or_else(|| DeviceError::Missing {
        driver: "vsock".into(),
        key: "uds".into(),
    })?;
    if uds.is_empty() {
        return Err(DeviceError::VsockPath);
    }
    Ok(DeviceSpec::Vsock(VsockSpec {
        id,
        guest_cid,
        uds_path: uds.into(),
    }))
}

/// A port through the parser QMP and HMP `device_add` use, then what a port at boot needs
/// besides: a chardev, and a name the guest can have.
fn parse_virtio_port(p: DeviceProps) -> Result<DeviceSpec, DeviceSpecError> {
    let driver = p.driver().to_string();
    let port = PortSpec::from_device_props(p)?;
    if let Some(name) = &port.name {
        devices::virtio::console::validate_port_name(name).map_err(|_| {
            DeviceSpecError::BadValue {
                driver: driver.clone(),
                property: "name".into(),
                value: name.clone(),
            }
        })?;
    }
    let chardev = port.chardev.clone().ok_or(DeviceSpecError::Missing {
        driver,
        property: "chardev".into(),
    })?;
    Ok(DeviceSpec::VirtioPort(VirtioPortSpec {
        id: port.id.clone().unwrap_or_else(|| chardev.clone()),
        bus: port.bus_device().map(str::to_string),
        name: port.name,
        nr: port.nr,
        console: port.driver == DeviceDriver::VirtConsole,
        chardev,
    }))
}

impl DeviceSpec {
    /// Parse one `--device` value.
    pub fn parse(s: &str) -> Result<DeviceSpec, DeviceError> {
        let props = DeviceProps::parse(s)?;
        let spec = match props.driver() {
            "isa-serial" => parse_isa_serial(props),
            "virtio-serial" | "virtio-serial-device" => parse_virtio_serial(props),
            "vsock" | "vhost-vsock-device" => return parse_vsock(props),
            driver if DeviceDriver::parse(driver).is_some() => parse_virtio_port(props),
            other => return Err(DeviceError::UnknownDriver(other.to_string())),
        };
        Ok(spec?)
    }
}

/// A COM port as the machine builds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComPortPlan {
    /// 0-based COM index.
    pub index: usize,
    /// I/O base.
    pub iobase: u16,
    /// IRQ.
    pub irq: u32,
    /// Chardev id.
    pub chardev: String,
    /// UART clock / 16.
    pub baud_base: u32,
    /// Line-rate timing.
    pub pacing: bool,
}

/// Give every UART a COM index: explicit indexes first, then the rest in order into the free
/// ones. `serial` are the `--serial` ports (chardev ids, `None` for `none`), which take COM1,
/// COM2, ... by position like QEMU's `-serial`.
pub fn plan_com_ports(
    serial: &[Option<String>],
    devices: &[IsaSerialSpec],
) -> Result<Vec<ComPortPlan>, DeviceError> {
    let mut slots: [Option<ComPortPlan>; 4] = Default::default();
    let mut taken = [false; 4];
    let plan = |index: usize, s: &IsaSerialSpec| ComPortPlan {
        index,
        iobase: s.iobase.unwrap_or(COM_PORTS[index].0),
        irq: s.irq.unwrap_or(COM_PORTS[index].1),
        chardev: s.chardev.clone(),
        baud_base: s.baud_base,
        pacing: s.pacing,
    };
    for (i, id) in serial.iter().enumerate() {
        taken[i] = true;
        if let Some(id) = id {
            slots[i] = Some(plan(
                i,
                &IsaSerialSpec {
                    chardev: id.clone(),
                    index: Some(i),
                    iobase: None,
                    irq: None,
                    baud_base: DEFAULT_BAUD_BASE,
                    pacing: true,
                },
            ));
        }
    }
    for d in devices.iter().filter(|d| d.index.is_some()) {
        let i = d.index.unwrap_or_default();
        if taken[i] {
            return Err(DeviceError::Placement(format!(
                "COM{} is already in use",
                i + 1
            )));
        }
        taken[i] = true;
        slots[i] = Some(plan(i, d));
    }
    for d in devices.iter().filter(|d| d.index.is_none()) {
        let i = taken
            .iter()
            .position(|t| !t)
            .ok_or_else(|| DeviceError::Placement("all four COM ports are in use".into()))?;
        taken[i] = true;
        slots[i] = Some(plan(i, d));
    }
    let ports: Vec<ComPortPlan> = slots.into_iter().flatten().collect();
    for (a, p) in ports.iter().enumerate() {
        for q in &ports[a + 1..] {
            let (lo, hi) = (p.iobase.min(q.iobase), p.iobase.max(q.iobase));
            if hi - lo < 8 {
                return Err(DeviceError::Placement(format!(
                    "COM{} and COM{} overlap at I/O {:#x}",
                    p.index + 1,
                    q.index + 1,
                    hi
                )));
            }
        }
    }
    Ok(ports)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn isa(s: &str) -> IsaSerialSpec {
        match DeviceSpec::parse(s).unwrap() {
            DeviceSpec::IsaSerial(s) => s,
            other => panic!("not isa-serial: {other:?}"),
        }
    }

    #[test]
    fn virtio_serial_and_ports_parse() {
        assert_eq!(
            DeviceSpec::parse("virtio-serial,id=vser0,max_ports=4").unwrap(),
            DeviceSpec::VirtioSerial(VirtioSerialSpec {
                id: "vser0".into(),
                max_ports: 4
            })
        );
        assert_eq!(
            DeviceSpec::parse("virtserialport,chardev=c0,name=org.example.agent,bus=vser0.0,nr=2")
                .unwrap(),
            DeviceSpec::VirtioPort(VirtioPortSpec {
                id: "c0".into(),
                chardev: "c0".into(),
                name: Some("org.example.agent".into()),
                nr: Some(2),
                bus: Some("vser0".into()),
                console: false,
            })
        );
        match DeviceSpec::parse("virtconsole,chardev=c1,id=con0").unwrap() {
            DeviceSpec::VirtioPort(p) => assert!(p.console && p.id == "con0"),
            other => panic!("{other:?}"),
        }
        let e = |s: &str| DeviceSpec::parse(s).unwrap_err().to_string();
        assert!(e("virtserialport,chardev=c0,name=a b").contains("'name'"));
        assert!(e("virtserialport,chardev=c0,name=a,b=c").contains("unknown option 'b'"));
        assert!(e("virtserialport,name=x").contains("'chardev' is required"));
        assert!(e("virtio-serial,max_ports=0").contains("'max_ports'"));
    }

    #[test]
    fn vsock_parses_and_names_its_bad_options() {
        assert_eq!(
            DeviceSpec::parse("vsock,guest-cid=3,uds=/tmp/v.sock").unwrap(),
            DeviceSpec::Vsock(VsockSpec {
                id: "vsock0".into(),
                guest_cid: 3,
                uds_path: "/tmp/v.sock".into(),
            })
        );
        match DeviceSpec::parse("vsock,id=vs1,guest-cid=0x10,uds=a,,b").unwrap() {
            DeviceSpec::Vsock(v) => {
                assert_eq!((v.id.as_str(), v.guest_cid), ("vs1", 16));
                assert_eq!(v.uds_path, std::path::PathBuf::from("a,b"));
            }
            other => panic!("{other:?}"),
        }
        let e = |s: &str| DeviceSpec::parse(s).unwrap_err().to_string();
        assert_eq!(
            e("vsock,guest-cid=2,uds=/x"),
            "--device vsock: guest-cid 2 is not in 3..=4294967294 (0-2 are reserved, CIDs are 32 bits)"
        );
        assert!(e("vsock,guest-cid=4294967295,uds=/x").contains("guest-cid 4294967295"));
        assert_eq!(
            e("vsock,guest-cid=x,uds=/x"),
            "--device vsock: bad value 'x' for 'guest-cid'"
        );
        assert_eq!(e("vsock,uds=/x"), "--device vsock: 'guest-cid' is required");
        assert_eq!(e("vsock,guest-cid=3"), "--device vsock: 'uds' is required");
        assert_eq!(
            e("vsock,guest-cid=3,uds="),
            "--device vsock: 'uds' must be a socket path"
        );
        assert_eq!(
            e("vsock,guest-cid=3,uds=/x,port=9"),
            "--device vsock: unknown option 'port'"
        );
    }

    #[test]
    fn isa_serial_options_parse() {
        let s = isa("isa-serial,chardev=c0,index=1,iobase=0x2f8,irq=3,baudbase=9600,pacing=off");
        assert_eq!(s.chardev, "c0");
        assert_eq!(s.index, Some(1));
        assert_eq!(s.iobase, Some(0x2f8));
        assert_eq!(s.irq, Some(3));
        assert_eq!(s.baud_base, 9600);
        assert!(!s.pacing);
        let d = isa("isa-serial,chardev=c1");
        assert_eq!(
            (d.index, d.baud_base, d.pacing),
            (None, DEFAULT_BAUD_BASE, true)
        );
    }

    #[test]
    fn bad_device_options_name_themselves() {
        let e = |s: &str| DeviceSpec::parse(s).unwrap_err().to_string();
        assert_eq!(
            e("floppy,chardev=x"),
            "--device: unknown device 'floppy' (known: isa-serial, virtio-serial, virtserialport, virtconsole, vsock)"
        );
        assert_eq!(
            e("isa-serial,chardev=c0,speed=9"),
            "--device isa-serial: unknown option 'speed'"
        );
        assert_eq!(
            e("isa-serial,index=0"),
            "--device isa-serial: 'chardev' is required"
        );
        assert!(e("isa-serial,chardev=c0,index=4").contains("'index'"));
        assert!(e("isa-serial,chardev=c0,irq=99").contains("'irq'"));
        assert!(e("isa-serial,chardev=c0,pacing=maybe").contains("'pacing'"));
        assert!(e("isa-serial,chardev=c0,baudbase=0").contains("'baudbase'"));
        assert!(e("isa-serial,chardev=c0,iobase=0x10000").contains("'iobase'"));
    }

    #[test]
    fn serial_ports_take_com1_on_and_devices_fill_the_rest() {
        let ports = plan_com_ports(
            &[Some("s0".into()), None],
            &[
                isa("isa-serial,chardev=d0"),
                isa("isa-serial,chardev=d1,index=3"),
            ],
        )
        .unwrap();
        let got: Vec<(usize, u16, u32, &str)> = ports
            .iter()
            .map(|p| (p.index, p.iobase, p.irq, p.chardev.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                (0, 0x3f8, 4, "s0"),
                (2, 0x3e8, 4, "d0"),
                (3, 0x2e8, 3, "d1")
            ]
        );
    }

    #[test]
    fn clashes_are_refused() {
        assert!(
            plan_com_ports(&[Some("a".into())], &[isa("isa-serial,chardev=b,index=0")]).is_err()
        );
        let five: Vec<IsaSerialSpec> = (0..5).map(|_| isa("isa-serial,chardev=x")).collect();
        assert!(plan_com_ports(&[], &five).is_err());
        assert!(plan_com_ports(
            &[],
            &[
                isa("isa-serial,chardev=a,index=0"),
                isa("isa-serial,chardev=b,index=1,iobase=0x3fc")
            ]
        )
        .is_err());
    }

    /// A port on the command line is what `device_add` makes of the same text, with the
    /// defaults and checks of a port present at boot on top.
    #[test]
    fn ports_parse_as_device_add_parses_them() {
        let text = "virtconsole,chardev=c0,id=p0,bus=vser1.0,nr=0x3,name=org.x.y";
        let shared = PortSpec::parse(text).unwrap();
        let DeviceSpec::VirtioPort(port) = DeviceSpec::parse(text).unwrap() else {
            panic!("not a port");
        };
        assert_eq!(port.bus.as_deref(), shared.bus_device());
        assert_eq!(
            (
                Some(port.id),
                Some(port.chardev),
                port.name,
                port.nr,
                port.console
            ),
            (shared.id, shared.chardev, shared.name, shared.nr, true)
        );
        let e = |s: &str| DeviceSpec::parse(s).unwrap_err().to_string();
        assert_eq!(
            e("virtserialport,chardev=c0,id=a,id=b"),
            "--device virtserialport: option 'id' given twice"
        );
        assert_eq!(
            e("chardev=c0"),
            "--device: the device model is missing (known: isa-serial, virtio-serial, \
             virtserialport, virtconsole, vsock)"
        );
        assert_eq!(
            e("virtserialport,chardev=c0,nr=-1"),
            "--device virtserialport: bad value '-1' for 'nr'"
        );
    }

    proptest! {
        #[test]
        fn parse_never_panics(s in ".{0,80}") {
            let _ = DeviceSpec::parse(&s);
        }

        #[test]
        fn plans_never_overlap(idx in proptest::collection::vec(proptest::option::of(0usize..4), 0..6)) {
            let devs: Vec<IsaSerialSpec> = idx.iter().map(|i| IsaSerialSpec {
                chardev: "c".into(), index: *i, iobase: None, irq: None,
                baud_base: DEFAULT_BAUD_BASE, pacing: true,
            }).collect();
            if let Ok(ports) = plan_com_ports(&[], &devs) {
                let mut seen = std::collections::HashSet::new();
                for p in &ports {
                    prop_assert!(seen.insert(p.index));
                }
                prop_assert_eq!(ports.len(), devs.len());
            }
        }
    }
}
