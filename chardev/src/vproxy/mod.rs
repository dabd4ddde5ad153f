//! vproxy: many byte streams between a host and a guest over one serial channel.
//!
//! This module is the protocol, sans-IO: bytes and stream operations go in, bytes and events
//! come out, no fd and no clock are touched inside, so both ends (the `vproxy` chardev in the
//! VMM and the `minivmm-vp` endpoint) share it and tests drive it with a simulated channel.
//!
//! - [`wire`]: the frame codec, with CRC-32s and resynchronisation after garbage or a lost
//!   byte;
//! - [`engine`]: the session engine: HELLO handshake and session ids, streams with credit flow
//!   control, control-first round-robin transmission, bounded memory, keepalive.
//!
//! The wire format and its rules are written down in `docs/vproxy.md`.

pub mod engine;
pub mod wire;

#[cfg(test)]
mod sim;

pub use engine::{
    Engine, EngineConfig, EngineEvent, OpenError, SessionStats, StreamId, StreamStats,
};
