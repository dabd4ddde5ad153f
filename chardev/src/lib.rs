//! Character-device backends for minivmm's frontends (UARTs, virtio-console ports, the monitor).
//!
//! Every frontend talks to the outside world through a [`Backend`]; the frontend never knows
//! which one. Backends are non-blocking and bounded (see [`backend`] for the contract). This
//! crate depends on no other minivmm crate, on no device and on no KVM type.
//!
//! - [`spec`] parses `--chardev` and `--serial` into a [`ChardevSpec`];
//! - [`create`] turns a spec into a `Box<dyn Backend>`;
//! - [`Registry`] keeps named chardevs, hands them to frontends and refuses to remove busy ones;
//! - [`mux::Mux`] shares one backend between several frontends (Ctrl-A escapes);
//! - [`spec::register_kind`] lets another crate add a backend kind (the `vproxy` crate does),
//!   which the core knows by nothing but its name;
//! - [`term`] is the terminal helper (termios, raw mode, window size) the tty backends share,
//!   also used by `minivmm console`.
//!
//! # Driving a backend
//!
//! The event loop is level-triggered and keyed by token ([`poller`]). A frontend attaches its
//! backend to a [`Registrar`] once; from then on the backend registers, re-registers and removes
//! its own fds as its state changes. For each event the loop calls `on_ready(token, ..)`, then
//! `take_events()`. On `Readable` the frontend pulls with `read` until it returns 0, returns
//! short (drained: see [`Backend::read`]) or the frontend is full (then
//! `set_input_wanted(false)`). A peer
//! closing is seen when the frontend pulls the end of input, or when a write fails: a frontend
//! that never reads notices a disconnect only through its writes (or, for a pty, the periodic
//! hangup check). After a mux's Ctrl-A x, `take_exit_request()` returns true once.
//!
//! Before starting vCPUs the VMM calls `wait_for_client` (or [`Registry::wait_for_clients`])
//! for `wait=on` servers; that is the only blocking call. On fatal paths that skip destructors
//! it calls [`restore_terminal`] (also registered with `atexit`).

pub mod backend;
pub mod buffer;
pub mod error;
pub mod fdchan;
pub mod logfile;
pub mod mux;
pub mod poller;
pub mod pty;
pub mod registry;
pub mod ringbuf;
pub mod serial;
pub mod socket;
pub mod spec;
pub mod stdio;
mod stream;
pub mod sys;
pub mod term;
pub mod udp;

/// Helpers for the tests of this crate and of crates with backends of their own (feature
/// `test-util`).
#[cfg(any(test, feature = "test-util"))]
pub mod testutil;

pub use backend::{poll_backends, Backend, Event, Interest, LineParams, ModemStatus, Readiness};
pub use error::{Error, Result, SpecError};
pub use poller::{split_owner, FdSet, OwnerGroup, PolledEvent, Poller, Registrar, Token};
pub use registry::{ChardevInfo, Handle, Registry};
pub use spec::{parse_serial, BackendSpec, ChardevSpec, SerialArg};
pub use stdio::restore_terminal;
pub use sys::ignore_sigpipe;

/// Create the backend `spec` describes, with its `logfile=` wrapper if any. A `wait=on` server
/// does not wait here: see [`Backend::wait_for_client`]. A `mux` spec needs
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
        BackendSpec::Extension(e) => match spec::backend_kind(e.kind) {
            Some(kind) => kind.create(id, &e.options)?,
            None => return Err(Error::UnknownKind(e.kind.to_string())),
        },
    };
    match &spec.log {
        Some(log) => Ok(Box::new(logfile::Logged::new(id, backend, log)?)),
        None => Ok(backend),
    }
}
