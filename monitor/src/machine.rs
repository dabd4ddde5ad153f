//! What the monitor needs from the machine: the [`Machine`] trait the VMM implements, and the
//! typed values that cross it (run state, device specs, port descriptions, errors).
//!
//! The trait is the whole boundary between the monitor and the VMM: the monitor never sees
//! KVM, a device model or the event loop. Events go the other way through
//! [`crate::events::EventQueue`], which the implementation fills as things happen.

use std::collections::BTreeMap;

use chardev::{Backend, ChardevSpec, Registry};
use thiserror::Error;

use crate::protocol::{ErrorClass, QmpError};

/// The run state as `query-status` reports it (QEMU's `RunState`, the subset minivmm has).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// vCPUs are not started yet.
    Prelaunch,
    /// vCPUs run.
    Running,
    /// Stopped by `stop`.
    Paused,
    /// The guest powered off or the VMM is quitting.
    Shutdown,
    /// The guest crashed (triple fault, KVM error).
    InternalError,
    /// The guest reported a panic.
    GuestPanicked,
    /// The guest suspended itself.
    Suspended,
}

impl RunState {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Prelaunch => "prelaunch",
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::Shutdown => "shutdown",
            RunState::InternalError => "internal-error",
            RunState::GuestPanicked => "guest-panicked",
            RunState::Suspended => "suspended",
        }
    }

    /// Whether vCPUs run (`query-status`'s `running`).
    pub fn is_running(self) -> bool {
        self == RunState::Running
    }
}

/// The device models `device_add` knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceDriver {
    /// A virtio-serial port (`/dev/virtio-ports/NAME` in the guest).
    VirtSerialPort,
    /// A virtio console port (`/dev/hvcN` in the guest).
    VirtConsole,
}

impl DeviceDriver {
    /// The QEMU driver name.
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceDriver::VirtSerialPort => "virtserialport",
            DeviceDriver::VirtConsole => "virtconsole",
        }
    }

    /// Parse a driver name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "virtserialport" => Some(DeviceDriver::VirtSerialPort),
            "virtconsole" => Some(DeviceDriver::VirtConsole),
            _ => None,
        }
    }
}

/// Properties of a port device.
const PORT_PROPERTIES: &[&str] = &["id", "bus", "name", "chardev", "nr"];

/// `device_add` of a port: `virtserialport,id=p1,name=org.x.1,chardev=c1[,bus=vser0.0][,nr=2]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    /// The model.
    pub driver: DeviceDriver,
    /// Device id (`device_del` needs one).
    pub id: Option<String>,
    /// The virtio-serial bus (`vser0.0`); `None` lets the machine choose.
    pub bus: Option<String>,
    /// The port name the guest sees.
    pub name: Option<String>,
    /// The chardev the port is connected to.
    pub chardev: Option<String>,
    /// The port number on the bus; `None` lets the machine choose.
    pub nr: Option<u32>,
}

/// A bad `device_add`.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DeviceSpecError {
    /// No driver given.
    #[error("Parameter 'driver' is missing")]
    MissingDriver,
    /// Not a model we have.
    #[error("'{0}' is not a valid device model name")]
    UnknownDriver(String),
    /// A property the model does not have.
    #[error("Property '{driver}.{property}' not found")]
    UnknownProperty {
        /// The model.
        driver: &'static str,
        /// The property.
        property: String,
    },
    /// A property given twice.
    #[error("Property '{driver}.{property}' given twice")]
    Duplicate {
        /// The model.
        driver: &'static str,
        /// The property.
        property: String,
    },
    /// A value of the wrong shape.
    #[error("Property '{driver}.{property}' doesn't take value '{value}'")]
    BadValue {
        /// The model.
        driver: &'static str,
        /// The property.
        property: String,
        /// The value given.
        value: String,
    },
}

impl DeviceSpec {
    /// Build from a driver and `key=value` properties (strings, as QEMU's option parser and
    /// `device_add` both take them).
    pub fn from_props(
        driver: &str,
        props: &BTreeMap<String, String>,
    ) -> Result<Self, DeviceSpecError> {
        let d = DeviceDriver::parse(driver)
            .ok_or_else(|| DeviceSpecError::UnknownDriver(driver.to_string()))?;
        let name = d.as_str();
        if let Some(bad) = props
            .keys()
            .find(|k| !PORT_PROPERTIES.contains(&k.as_str()))
        {
            return Err(DeviceSpecError::UnknownProperty {
                driver: name,
                property: bad.clone(),
            });
        }
        let get = |k: &str| props.get(k).cloned();
        let nr = match props.get("nr") {
            None => None,
            Some(v) => Some(v.parse::<u32>().map_err(|_| DeviceSpecError::BadValue {
                driver: name,
                property: "nr".into(),
                value: v.clone(),
            })?),
        };
        if let Some(id) = props.get("id") {
            if !chardev::spec::is_valid_id(id) {
                return Err(DeviceSpecError::BadValue {
                    driver: name,
                    property: "id".into(),
                    value: id.clone(),
                });
            }
        }
        Ok(DeviceSpec {
            driver: d,
            id: get("id"),
            bus: get("bus"),
            name: get("name"),
            chardev: get("chardev"),
            nr,
        })
    }

    /// Parse `DRIVER,key=value,...` (HMP `device_add`, the CLI's `--device`). `,,` is a
    /// literal comma; `driver=X` may stand in place of the leading driver name.
    pub fn parse(s: &str) -> Result<Self, DeviceSpecError> {
        let parts = chardev::spec::split_options(s);
        let mut driver = None;
        let mut props = BTreeMap::new();
        for (n, part) in parts.iter().enumerate() {
            match part.split_once('=') {
                None if n == 0 => driver = Some(part.clone()),
                None => {
                    return Err(DeviceSpecError::UnknownProperty {
                        driver: DeviceDriver::parse(driver.as_deref().unwrap_or(""))
                            .map_or("device", DeviceDriver::as_str),
                        property: part.clone(),
                    })
                }
                Some(("driver", v)) if driver.is_none() => driver = Some(v.to_string()),
                Some((k, v)) => {
                    if props.insert(k.to_string(), v.to_string()).is_some() {
                        return Err(DeviceSpecError::Duplicate {
                            driver: DeviceDriver::parse(driver.as_deref().unwrap_or(""))
                                .map_or("device", DeviceDriver::as_str),
                            property: k.to_string(),
                        });
                    }
                }
            }
        }
        let driver = driver
            .filter(|d| !d.is_empty())
            .ok_or(DeviceSpecError::MissingDriver)?;
        DeviceSpec::from_props(&driver, &props)
    }
}

/// One virtio-serial port, for `query-virtio-serial`, `info ports` and `query-chardev`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortInfo {
    /// Device id.
    pub id: String,
    /// The model.
    pub driver: DeviceDriver,
    /// The bus it sits on (`vser0.0`).
    pub bus: String,
    /// The port number.
    pub nr: u32,
    /// The name the guest sees, if any.
    pub name: Option<String>,
    /// The chardev it is connected to, if any.
    pub chardev: Option<String>,
    /// Whether the guest has the port open.
    pub guest_connected: bool,
    /// Whether a host peer is connected to the chardev.
    pub host_connected: bool,
}

/// Why the machine refused an operation.
#[derive(Debug, Error)]
pub enum MachineError {
    /// A chardev operation failed.
    #[error(transparent)]
    Chardev(#[from] chardev::Error),
    /// No device with this id (class `DeviceNotFound`).
    #[error("Device '{0}' not found")]
    DeviceNotFound(String),
    /// The device model cannot do this (e.g. a frontend without chardev hotswap).
    #[error("{0}")]
    Unsupported(String),
    /// Anything else, as a one-line description.
    #[error("{0}")]
    Failed(String),
}

/// `e` and its sources on one line, with a capital letter as QEMU's messages have.
pub(crate) fn describe(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    capitalize(&s)
}

pub(crate) fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(first) => first.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

impl From<MachineError> for QmpError {
    fn from(e: MachineError) -> Self {
        let class = match &e {
            MachineError::DeviceNotFound(_) => ErrorClass::DeviceNotFound,
            _ => ErrorClass::GenericError,
        };
        QmpError {
            class,
            desc: describe(&e),
        }
    }
}

/// The machine as the monitor drives it. The VMM implements this; every method is called
/// on the event-loop thread and must not block.
///
/// State changes are reported as events by the implementation through
/// [`crate::events::EventQueue`] (`STOP` when vCPUs stop, whoever stopped them), not by the
/// monitor: a guest-initiated change must produce the same events.
pub trait Machine {
    /// The current run state.
    fn run_state(&self) -> RunState;
    /// Pause the vCPUs (`stop`); emits `STOP` when done.
    fn stop(&mut self) -> Result<(), MachineError>;
    /// Resume the vCPUs (`cont`); emits `RESUME`.
    fn cont(&mut self) -> Result<(), MachineError>;
    /// Reset the machine (`system_reset`); emits `RESET`.
    fn system_reset(&mut self) -> Result<(), MachineError>;
    /// Press the ACPI power button (`system_powerdown`); emits `POWERDOWN`.
    fn system_powerdown(&mut self) -> Result<(), MachineError>;
    /// Ask the VMM to exit (`quit`) once the answer is flushed; emits `SHUTDOWN`.
    fn quit(&mut self);
    /// The VM name (`--name`), if any.
    fn name(&self) -> Option<String>;
    /// The VM UUID in canonical form, if any.
    fn uuid(&self) -> Option<String>;

    /// The chardev registry (`query-chardev`, `ringbuf-read/write`).
    fn chardevs(&mut self) -> &mut Registry;

    /// `chardev-add`: create and register. Named fds are already resolved to numbers. The
    /// default registers in [`Machine::chardevs`]; the VMM re-reads poll fds afterwards.
    fn chardev_add(&mut self, spec: &ChardevSpec) -> Result<(), MachineError> {
        self.chardevs().add(spec).map_err(MachineError::from)
    }

    /// `chardev-change`: swap the backend of `id` under its frontend. The default swaps in
    /// the registry; an implementation whose frontend cannot hotswap returns
    /// [`MachineError::Unsupported`].
    fn chardev_change(&mut self, id: &str, backend: Box<dyn Backend>) -> Result<(), MachineError> {
        self.chardevs()
            .change(id, backend)
            .map(drop)
            .map_err(MachineError::from)
    }

    /// `chardev-remove`.
    fn chardev_remove(&mut self, id: &str) -> Result<(), MachineError> {
        self.chardevs().remove(id).map_err(MachineError::from)
    }

    /// `chardev-send-break`: deliver a break condition to the frontend of `id` (the UART sets
    /// its break indication). Unknown ids fail with [`chardev::Error::NotFound`].
    fn chardev_send_break(&mut self, id: &str) -> Result<(), MachineError>;

    /// `device_add` of a port.
    fn device_add(&mut self, device: &DeviceSpec) -> Result<(), MachineError>;
    /// `device_del`: remove the port; emits `DEVICE_DELETED` when it is gone.
    fn device_del(&mut self, id: &str) -> Result<(), MachineError>;
    /// Every virtio-serial port.
    fn ports(&self) -> Vec<PortInfo>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_spec_parses_qemu_syntax() {
        let d = DeviceSpec::parse("virtserialport,id=p1,name=org.x,,y,chardev=c1,nr=2").unwrap();
        assert_eq!(
            d,
            DeviceSpec {
                driver: DeviceDriver::VirtSerialPort,
                id: Some("p1".into()),
                bus: None,
                name: Some("org.x,y".into()),
                chardev: Some("c1".into()),
                nr: Some(2),
            }
        );
        assert_eq!(
            DeviceSpec::parse("driver=virtconsole,id=c").unwrap().driver,
            DeviceDriver::VirtConsole
        );
        assert_eq!(
            DeviceSpec::parse("e1000,id=n").unwrap_err().to_string(),
            "'e1000' is not a valid device model name"
        );
        assert_eq!(
            DeviceSpec::parse("virtserialport,foo=1")
                .unwrap_err()
                .to_string(),
            "Property 'virtserialport.foo' not found"
        );
        assert!(DeviceSpec::parse("virtserialport,nr=x").is_err());
        assert!(DeviceSpec::parse("virtserialport,id=1bad").is_err());
        assert!(DeviceSpec::parse("").is_err());
    }

    #[test]
    fn machine_errors_map_to_classes() {
        let e: QmpError = MachineError::DeviceNotFound("p".into()).into();
        assert_eq!(e.class, ErrorClass::DeviceNotFound);
        let e: QmpError = MachineError::Chardev(chardev::Error::NotFound("c".into())).into();
        assert_eq!(
            (e.class, e.desc.as_str()),
            (ErrorClass::GenericError, "Chardev 'c' not found")
        );
        let io = chardev::Error::Io {
            id: "c".into(),
            op: "bind",
            target: "/x".into(),
            source: std::io::Error::from_raw_os_error(libc::EADDRINUSE),
        };
        assert!(describe(&io).starts_with("Chardev 'c': cannot bind '/x': "));
    }
}
