//! What the monitor needs from the machine: the [`Machine`] trait the VMM implements, and the
//! typed values that cross it (run state, device specs from `device_spec`, port descriptions,
//! errors).
//!
//! The trait is the whole boundary between the monitor and the VMM: the monitor never sees
//! KVM, a device model or the event loop. Events go the other way through
//! [`crate::events::EventQueue`], which the implementation fills as things happen.

use chardev::{Backend, ChardevSpec, Registry};
use thiserror::Error;

use crate::device_spec::{DeviceDriver, DeviceSpec};
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

/// One vsock connection, for `query-vsock` and `info vsock`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConnection {
    /// The host end's port (for a host-initiated connection, the one `OK <port>` named).
    pub local_port: u32,
    /// The guest end's port.
    pub peer_port: u32,
    /// Whether a host client opened it (`CONNECT <port>`), else the guest did.
    pub host_initiated: bool,
    /// Its state, a short lowercase name (`connecting`, `established`, ...).
    pub state: String,
    /// Guest bytes written to the host socket.
    pub bytes_to_host: u64,
    /// Host bytes delivered to the guest.
    pub bytes_to_guest: u64,
}

/// The vsock device, for `query-vsock` and `info vsock`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockStatus {
    /// Device id.
    pub id: String,
    /// The guest's CID.
    pub guest_cid: u64,
    /// The host listener's path (`PATH`; guest connections to host port P go to `PATH_P`).
    pub uds_path: String,
    /// Every connection, by (local port, peer port).
    pub connections: Vec<VsockConnection>,
    /// The device's counters by name (malformed packets, resets, refusals, ...).
    pub counters: Vec<(&'static str, u64)>,
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
    /// default registers in [`Machine::chardevs`]; a frontend that takes it later attaches it to
    /// the event loop.
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

    /// The vsock device, if the machine has one (`query-vsock`).
    fn vsock(&self) -> Option<VsockStatus> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
