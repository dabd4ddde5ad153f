//! vproxy: many byte streams between a host and a guest over one serial channel. This crate
//! builds on `chardev` (which knows it only as a registered backend kind, see [`spec`]) and
//! holds the `minivmm-vp` endpoint.
//!
//! The protocol is sans-IO: bytes and stream operations go in, bytes and events
//! come out, no fd and no clock are touched inside, so both ends (the `vproxy` chardev in the
//! VMM and the `minivmm-vp` endpoint) share it and tests drive it with a simulated channel.
//!
//! - [`wire`]: the frame codec, with CRC-32s and resynchronisation after garbage or a lost
//!   byte;
//! - [`engine`]: the session engine: HELLO handshake and session ids, streams with credit flow
//!   control, control-first round-robin transmission, bounded memory, keepalive;
//! - [`forward`]: forward specs (`NAME:[BIND:]PORT`, `NAME:HOST:PORT`, unix paths);
//! - [`spec`]: the `vproxy` chardev kind's options and its registration ([`spec::register`]);
//! - [`driver`]: the `vproxy` chardev backend, the sockets and timer around the engine;
//! - [`agent`]: the `minivmm-vp` endpoint loop over a char device, tty or socket channel;
//! - [`vsock_cat`]: `minivmm-vp vsock-cat`, stdin and stdout joined to one AF_VSOCK stream
//!   (the guest side of the vsock tests).
//!
//! The wire format and its rules are written down in `docs/vproxy.md`.

pub mod agent;
pub mod arq;
pub mod driver;
pub mod engine;
pub mod forward;
pub mod path;
pub mod spec;
pub mod vsock_cat;
pub mod wire;

pub use spec::{register, VproxySpec};

#[cfg(test)]
mod sim;

pub use engine::{
    Engine, EngineConfig, EngineEvent, OpenError, SessionStats, StreamId, StreamStats,
};
