//! The `ringbuf` backend (alias `memory`): guest output kept in memory, newest `size` bytes,
//! read back with QMP `ringbuf-read`.
//!
//! As in QEMU, a write always succeeds and overwrites the oldest bytes when the ring is full
//! (their count is [`Backend::dropped_bytes`]); `ringbuf-write` appends to the same ring, and
//! the frontend never gets input. This module has no fds.

use std::io;

use crate::backend::{Backend, Event, Readiness, RingAccess};
use crate::buffer::ByteRing;
use crate::poller::{Registrar, Token};
use crate::spec::RingbufSpec;

/// The `ringbuf` backend.
#[derive(Debug)]
pub struct RingbufBackend {
    ring: ByteRing,
}

impl RingbufBackend {
    /// A ring of `spec.size` bytes (validated a power of two by the parser).
    pub fn new(spec: &RingbufSpec) -> Self {
        RingbufBackend {
            ring: ByteRing::new(spec.size),
        }
    }
}

impl Backend for RingbufBackend {
    fn kind(&self) -> &'static str {
        "ringbuf"
    }
    fn filename(&self) -> String {
        "ringbuf".to_string()
    }
    fn attach(&mut self, _reg: Registrar) {}
    fn detach(&mut self) {}
    fn on_ready(&mut self, _token: Token, _readiness: Readiness) {}
    fn read(&mut self, _buf: &mut [u8]) -> io::Result<usize> {
        Ok(0)
    }
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.ring.push(data);
        Ok(data.len())
    }
    fn set_input_wanted(&mut self, _wanted: bool) {}
    fn is_connected(&self) -> bool {
        true
    }
    fn take_events(&mut self) -> Vec<Event> {
        Vec::new()
    }
    fn dropped_bytes(&self) -> u64 {
        self.ring.dropped()
    }
    fn ring(&mut self) -> Option<&mut dyn RingAccess> {
        Some(self)
    }
}

impl RingAccess for RingbufBackend {
    fn ringbuf_read(&mut self, max: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; max.min(self.ring.len())];
        let n = self.ring.read(&mut buf);
        buf.truncate(n);
        Ok(buf)
    }
    fn ringbuf_write(&mut self, data: &[u8]) -> io::Result<()> {
        self.ring.push(data);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_ringbuf_semantics() {
        // QEMU's /char/ringbuf: size 2, "buff" then read 4 gives "ff", then "".
        let mut b = RingbufBackend::new(&RingbufSpec { size: 2 });
        assert_eq!(b.write(b"buff").unwrap(), 4);
        assert_eq!(b.ringbuf_read(4).unwrap(), b"ff");
        assert_eq!(b.ringbuf_read(4).unwrap(), b"");
        assert_eq!(b.dropped_bytes(), 2);
        b.ringbuf_write(b"xy").unwrap();
        assert_eq!(b.ringbuf_read(1).unwrap(), b"x");
        assert_eq!(b.ringbuf_read(1).unwrap(), b"y");
        assert_eq!(b.read(&mut [0; 4]).unwrap(), 0);
    }

    #[test]
    fn reachable_through_a_trait_object() {
        let mut b: Box<dyn Backend> = Box::new(RingbufBackend::new(&RingbufSpec { size: 16 }));
        b.write(b"hello").unwrap();
        assert_eq!(b.ring().unwrap().ringbuf_read(16).unwrap(), b"hello");
        let mut n: Box<dyn Backend> = Box::new(crate::fdchan::NullBackend);
        assert!(n.ring().is_none(), "only a ringbuf has a ring");
    }
}
