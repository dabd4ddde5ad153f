//! Character-device backends for minivmm's frontends (UARTs, virtio-console ports, the monitor).
//!
//! Every frontend talks to the outside world through a [`Backend`]; the frontend never knows
//! which one. Backends are non-blocking and bounded (see [`backend`] for the contract). This
//! crate depends on no other minivmm crate, on no device and on no KVM type.
//!
//! - [`spec`] parses `--chardev` and `--serial` into a [`ChardevSpec`];
//! - [`create`] turns a spec into a `Box<dyn Backend>`;
//! - [`Registry`] keeps named chardevs, hands them to frontends and refuses to remove busy ones;
//! - [`mux::Mux`] shares one backend between several frontends (Ctrl-A escapes).

pub mod backend;
pub mod buffer;
pub mod error;
pub mod fdchan;
pub mod logfile;
pub mod mux;
pub mod pty;
pub mod registry;
pub mod ringbuf;
pub mod serial;
pub mod socket;
pub mod spec;
pub mod stdio;
mod stream;
pub mod sys;
pub mod udp;

#[cfg(test)]
mod testutil;

pub use backend::{Backend, Event, Interest, LineParams, Readiness};
pub use error::{Error, Result, SpecError};
pub use registry::{ChardevInfo, Handle, Registry};
pub use spec::{parse_serial, BackendSpec, ChardevSpec, SerialArg};
pub use stdio::restore_terminal;
pub use sys::ignore_sigpipe;

/// Create the backend `spec` describes, with its `logfile=` wrapper if any. A `mux` spec needs
/// the [`Registry`] (it names another chardev) and `mux=on` is the registry's business too:
/// here it is ignored and the plain backend is created.
pub fn create(spec: &ChardevSpec) -> Result<Box<dyn Backend>> {
    let id = spec.id.as_str();
    let backend: Box<dyn Backend> = match &spec.backend {
        BackendSpec::Null => Box::new(fdchan::NullBackend),
        BackendSpec::File(s) => Box::new(fdchan::open_file(id, s)?),
        BackendSpec::Stdio(s) => Box::new(stdio::StdioBackend::open(id, s)?),
        BackendSpec::Socket(s) => Box::new(socket::SocketBackend::open(id, s)?),
        BackendSpec::Pty(s) => Box::new(pty::PtyBackend::open(id, s)?),
        BackendSpec::Ringbuf(s) => Box::new(ringbuf::RingbufBackend::new(s)),
        BackendSpec::Pipe(s) => Box::new(fdchan::open_pipe(id, s)?),
        BackendSpec::Udp(s) => Box::new(udp::UdpBackend::open(id, s)?),
        BackendSpec::Serial(s) => Box::new(serial::SerialBackend::open(id, s)?),
        BackendSpec::Mux(_) => return Err(Error::NeedsRegistry(id.to_string())),
    };
    match &spec.log {
        Some(log) => Ok(Box::new(logfile::Logged::new(id, backend, log)?)),
        None => Ok(backend),
    }
}
