//! A fake [`Machine`] for tests of the monitor and of crates that drive it (the fuzz
//! targets): it records what it was asked, keeps a real chardev registry and a port table,
//! and, [`FakeMachine::sandboxed`], opens no host resource. Behind the `test-util` feature.

use chardev::{BackendSpec, ChardevSpec, Registry};

use crate::device_spec::DeviceSpec;
use crate::machine::{Machine, MachineError, PortInfo, RunState, VsockStatus};

/// A machine that records what it was asked.
pub struct FakeMachine {
    pub state: RunState,
    pub registry: Registry,
    pub ports: Vec<PortInfo>,
    pub calls: Vec<String>,
    pub quit: bool,
    pub frontends: Vec<(String, Box<dyn chardev::Backend>)>,
    /// Where `stop`/`cont` report STOP/RESUME, as the VMM does.
    pub events: Option<crate::events::EventQueue>,
    /// Open no host resource (for fuzzing): `chardev-add` of a backend that would open a
    /// file, socket, pty, tty or the terminal registers a `null` chardev in its place.
    pub opens_nothing: bool,
    /// What `query-vsock` reports (none: the machine has no vsock device).
    pub vsock: Option<VsockStatus>,
}

impl FakeMachine {
    pub fn new() -> Self {
        FakeMachine {
            state: RunState::Running,
            registry: Registry::new(),
            ports: Vec::new(),
            calls: Vec::new(),
            quit: false,
            frontends: Vec::new(),
            events: None,
            opens_nothing: false,
            vsock: None,
        }
    }

    /// A machine that opens no host resource (see `opens_nothing`).
    pub fn sandboxed() -> Self {
        FakeMachine {
            opens_nothing: true,
            ..FakeMachine::new()
        }
    }
}

impl Default for FakeMachine {
    fn default() -> Self {
        FakeMachine::new()
    }
}

/// Whether creating `spec`'s backend opens nothing on the host.
pub fn opens_nothing(spec: &ChardevSpec) -> bool {
    spec.log.is_none() && matches!(spec.backend, BackendSpec::Null | BackendSpec::Ringbuf(_))
}

impl Machine for FakeMachine {
    fn run_state(&self) -> RunState {
        self.state
    }
    fn stop(&mut self) -> Result<(), MachineError> {
        self.state = RunState::Paused;
        self.calls.push("stop".into());
        if let Some(q) = &self.events {
            q.push(crate::protocol::QmpEvent::stop());
        }
        Ok(())
    }
    fn cont(&mut self) -> Result<(), MachineError> {
        if self.state == RunState::Shutdown {
            return Err(MachineError::Failed(
                "Resetting the Virtual Machine is required".into(),
            ));
        }
        self.state = RunState::Running;
        self.calls.push("cont".into());
        if let Some(q) = &self.events {
            q.push(crate::protocol::QmpEvent::resume());
        }
        Ok(())
    }
    fn system_reset(&mut self) -> Result<(), MachineError> {
        self.calls.push("reset".into());
        Ok(())
    }
    fn system_powerdown(&mut self) -> Result<(), MachineError> {
        self.calls.push("powerdown".into());
        Ok(())
    }
    fn quit(&mut self) {
        self.quit = true;
    }
    fn name(&self) -> Option<String> {
        Some("vm1".into())
    }
    fn uuid(&self) -> Option<String> {
        None
    }
    fn chardevs(&mut self) -> &mut Registry {
        &mut self.registry
    }
    /// The registry's own `add` (mux and `mux=on` are the real thing); sandboxed, a backend
    /// that would open something is replaced by `null`.
    fn chardev_add(&mut self, spec: &ChardevSpec) -> Result<(), MachineError> {
        let mut spec = spec.clone();
        if self.opens_nothing
            && !opens_nothing(&spec)
            && !matches!(spec.backend, BackendSpec::Mux(_))
        {
            spec.backend = BackendSpec::Null;
            spec.log = None;
        }
        self.registry.add(&spec).map_err(MachineError::from)
    }
    fn chardev_send_break(&mut self, id: &str) -> Result<(), MachineError> {
        if !self.registry.contains(id) {
            return Err(chardev::Error::NotFound(id.into()).into());
        }
        self.calls.push(format!("break {id}"));
        Ok(())
    }
    fn device_add(&mut self, d: &DeviceSpec) -> Result<(), MachineError> {
        let id = d.id.clone().unwrap_or_else(|| "anon".into());
        if self.ports.iter().any(|p| p.id == id) {
            return Err(MachineError::Failed(format!("Duplicate device ID '{id}'")));
        }
        if let Some(c) = &d.chardev {
            // The port is the chardev's frontend.
            let handle = self.registry.take(c)?;
            self.frontends.push((id.clone(), handle));
        }
        self.ports.push(PortInfo {
            id,
            driver: d.driver,
            bus: d.bus.clone().unwrap_or_else(|| "vser0.0".into()),
            nr: d.nr.unwrap_or(self.ports.len() as u32 + 1),
            name: d.name.clone(),
            chardev: d.chardev.clone(),
            guest_connected: false,
            host_connected: false,
        });
        Ok(())
    }
    fn device_del(&mut self, id: &str) -> Result<(), MachineError> {
        let n = self.ports.len();
        self.ports.retain(|p| p.id != id);
        self.frontends.retain(|(p, _)| p != id);
        if self.ports.len() == n {
            return Err(MachineError::DeviceNotFound(id.into()));
        }
        Ok(())
    }
    fn ports(&self) -> Vec<PortInfo> {
        self.ports.clone()
    }
    fn vsock(&self) -> Option<VsockStatus> {
        self.vsock.clone()
    }
}
