//! A byte stream from a guest (a console on a pipe, a socket, a pty) read on a thread, with
//! the arrival time of every chunk: tests wait for text in it, or time a run of bytes.

use std::io::Read;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// Everything read so far, and what is still arriving.
pub struct StreamReader {
    rx: Receiver<(Instant, Vec<u8>)>,
    /// Every byte seen so far, in order.
    pub seen: Vec<u8>,
    closed: bool,
}

impl StreamReader {
    /// Read `r` on a thread until it ends.
    pub fn spawn<R: Read + Send + 'static>(mut r: R) -> StreamReader {
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                match r.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => {
                        if tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
                            return;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => return,
                }
            }
        });
        StreamReader {
            rx,
            seen: Vec::new(),
            closed: false,
        }
    }

    /// Take in whatever has arrived, without waiting.
    pub fn drain(&mut self) {
        while let Ok((_, chunk)) = self.rx.try_recv() {
            self.seen.extend_from_slice(&chunk);
        }
    }

    /// Whether the stream has ended (and everything it carried is in `seen`).
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Wait until `needle` appears at or after position `from`; returns the position after it.
    /// Panics with everything seen on timeout or when the stream ends first.
    pub fn expect(&mut self, from: usize, needle: &str, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let start = from.min(self.seen.len());
            if let Some(p) = self.seen[start..]
                .windows(needle.len())
                .position(|w| w == needle.as_bytes())
            {
                return start + p + needle.len();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no {needle:?} within {timeout:?}; got:\n{}",
                String::from_utf8_lossy(&self.seen)
            );
            match self.rx.recv_timeout(left.min(Duration::from_millis(200))) {
                Ok((_, chunk)) => self.seen.extend_from_slice(&chunk),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    self.closed = true;
                    panic!(
                        "the stream ended before {needle:?}; got:\n{}",
                        String::from_utf8_lossy(&self.seen)
                    );
                }
            }
        }
    }

    /// Skip everything up to the first `byte`, then receive `n` copies of it in a row;
    /// returns the arrival times of the chunks holding the first and the last of them.
    pub fn timed_run(&mut self, byte: u8, n: usize, timeout: Duration) -> (Instant, Instant) {
        let deadline = Instant::now() + timeout;
        let mut count = 0;
        let mut first = None;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "only {count} of {n} {byte:#x} bytes within {timeout:?}"
            );
            let (at, chunk) = match self.rx.recv_timeout(left) {
                Ok(got) => got,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => {
                    self.closed = true;
                    panic!("the stream ended after {count} of {n} {byte:#x} bytes");
                }
            };
            self.seen.extend_from_slice(&chunk);
            for &b in &chunk {
                if b == byte {
                    first.get_or_insert(at);
                    count += 1;
                    if count == n {
                        return (first.unwrap_or(at), at);
                    }
                } else {
                    assert!(
                        first.is_none(),
                        "payload interrupted by {b:#x} after {count} bytes"
                    );
                }
            }
        }
    }
}
