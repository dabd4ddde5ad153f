//! Bounded byte buffers shared by the backends, and the event queue.
//!
//! - [`OutBuf`]: the bounded output buffer every fd backend writes guest output into. It
//!   accepts only what fits (that is the frontend's backpressure) and is flushed with short
//!   writes handled.
//! - [`ByteRing`]: a ring that keeps the newest bytes and counts the ones it overwrote. It is
//!   the replay ring of connection-oriented backends while no peer is connected, and the
//!   storage of the `ringbuf` backend.
//! - [`EventQueue`]: backend events with `Readable`/`Writable` coalesced.
//!
//! Nothing here does I/O except through the closure given to [`OutBuf::flush_with`], and
//! nothing here grows without bound.

use std::collections::VecDeque;
use std::io;

use crate::backend::Event;
use crate::sys;

/// Default capacity of a backend's output buffer.
pub const DEFAULT_OUTBUF_SIZE: usize = 64 * 1024;

/// A bounded FIFO of output bytes.
#[derive(Debug)]
pub struct OutBuf {
    data: VecDeque<u8>,
    cap: usize,
}

impl OutBuf {
    /// An empty buffer holding at most `cap` bytes (plus any replayed backlog).
    pub fn new(cap: usize) -> Self {
        OutBuf {
            data: VecDeque::new(),
            cap,
        }
    }

    /// Bytes queued.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Nothing queued.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The capacity.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Room left.
    pub fn free(&self) -> usize {
        self.cap.saturating_sub(self.data.len())
    }

    /// Queue as much of `data` as fits; returns how much.
    pub fn push(&mut self, data: &[u8]) -> usize {
        let n = data.len().min(self.free());
        self.data.extend(&data[..n]);
        n
    }

    /// Queue all of `data` regardless of the capacity (a replayed backlog, itself bounded).
    pub fn push_unbounded(&mut self, data: &[u8]) {
        self.data.extend(data);
    }

    /// Remove and return everything queued.
    pub fn take_all(&mut self) -> Vec<u8> {
        self.data.drain(..).collect()
    }

    /// Write queued bytes with `write` until the buffer is empty, `write` would block or
    /// accepts nothing. Other errors are returned with the unsent bytes still queued.
    pub fn flush_with(
        &mut self,
        mut write: impl FnMut(&[u8]) -> io::Result<usize>,
    ) -> io::Result<()> {
        while !self.data.is_empty() {
            let front = self.data.as_slices().0;
            match write(front) {
                Ok(0) => break,
                Ok(n) => {
                    self.data.drain(..n.min(front.len()));
                }
                Err(e) if sys::would_block(&e) => break,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// A ring of the newest `cap` bytes; older ones are overwritten and counted as dropped.
#[derive(Debug)]
pub struct ByteRing {
    data: VecDeque<u8>,
    cap: usize,
    dropped: u64,
}

impl ByteRing {
    /// A ring of `cap` bytes (0: everything pushed is dropped).
    pub fn new(cap: usize) -> Self {
        ByteRing {
            data: VecDeque::new(),
            cap,
            dropped: 0,
        }
    }

    /// Bytes held.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Nothing held.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The capacity.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Bytes overwritten or dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Append `data`, overwriting the oldest bytes when full.
    pub fn push(&mut self, data: &[u8]) {
        if data.len() >= self.cap {
            self.dropped += (self.data.len() + data.len() - self.cap) as u64;
            self.data.clear();
            self.data.extend(&data[data.len() - self.cap..]);
            return;
        }
        let overflow = (self.data.len() + data.len()).saturating_sub(self.cap);
        self.data.drain(..overflow);
        self.dropped += overflow as u64;
        self.data.extend(data);
    }

    /// Consume up to `buf.len()` of the oldest bytes.
    pub fn read(&mut self, buf: &mut [u8]) -> usize {
        let n = buf.len().min(self.data.len());
        for (dst, src) in buf.iter_mut().zip(self.data.drain(..n)) {
            *dst = src;
        }
        n
    }

    /// Remove and return everything held, oldest first.
    pub fn take_all(&mut self) -> Vec<u8> {
        self.data.drain(..).collect()
    }
}

/// Backend events, oldest first, with repeated `Readable` and `Writable` coalesced.
#[derive(Debug, Default)]
pub struct EventQueue(Vec<Event>);

impl EventQueue {
    /// Queue `ev` (a `Readable` or `Writable` already pending is not queued twice).
    pub fn push(&mut self, ev: Event) {
        if matches!(ev, Event::Readable | Event::Writable) && self.0.contains(&ev) {
            return;
        }
        self.0.push(ev);
    }

    /// Take everything queued.
    pub fn take(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.0)
    }

    /// Whether anything is queued.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outbuf_accepts_only_what_fits_and_handles_short_writes() {
        let mut b = OutBuf::new(8);
        assert_eq!(b.push(b"0123456789"), 8);
        assert_eq!(b.push(b"x"), 0);
        let mut sink = Vec::new();
        // A writer that takes 3 bytes at a time, then blocks.
        let mut budget = 5;
        b.flush_with(|d| {
            if budget == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = d.len().min(3).min(budget);
            budget -= n;
            sink.extend_from_slice(&d[..n]);
            Ok(n)
        })
        .unwrap();
        assert_eq!(sink, b"01234");
        assert_eq!(b.len(), 3);
        assert_eq!(b.push(b"abcdef"), 5);
        b.flush_with(|d| {
            sink.extend_from_slice(d);
            Ok(d.len())
        })
        .unwrap();
        assert_eq!(sink, b"01234567abcde");
        assert!(b.is_empty());
    }

    #[test]
    fn outbuf_error_keeps_bytes() {
        let mut b = OutBuf::new(4);
        b.push(b"abcd");
        let e = b.flush_with(|_| Err(io::ErrorKind::BrokenPipe.into()));
        assert!(e.is_err());
        assert_eq!(b.take_all(), b"abcd");
    }

    #[test]
    fn ring_overwrites_oldest_and_counts() {
        let mut r = ByteRing::new(4);
        r.push(b"ab");
        r.push(b"cdef");
        assert_eq!(r.dropped(), 2);
        assert_eq!(r.take_all(), b"cdef");
        r.push(b"0123456789");
        assert_eq!(r.dropped(), 8);
        let mut buf = [0u8; 3];
        assert_eq!(r.read(&mut buf), 3);
        assert_eq!(&buf, b"678");
        assert_eq!(r.take_all(), b"9");
    }

    #[test]
    fn ring_of_zero_drops_everything() {
        let mut r = ByteRing::new(0);
        r.push(b"hello");
        assert!(r.is_empty());
        assert_eq!(r.dropped(), 5);
    }

    #[test]
    fn events_coalesce_readable_writable_only() {
        let mut q = EventQueue::default();
        q.push(Event::Readable);
        q.push(Event::Readable);
        q.push(Event::Opened);
        q.push(Event::Closed);
        q.push(Event::Opened);
        q.push(Event::Writable);
        q.push(Event::Writable);
        assert_eq!(
            q.take(),
            vec![
                Event::Readable,
                Event::Opened,
                Event::Closed,
                Event::Opened,
                Event::Writable
            ]
        );
        assert!(q.is_empty());
    }
}
