//! `logfile=` / `logappend=on`: a wrapper that copies every byte the guest wrote to a file,
//! whether or not a peer read it (bytes accepted into a replay ring, or dropped because there
//! is no peer and no backlog, are logged too).
//!
//! A byte is logged when the backend accepts it, so bytes the frontend retries after
//! backpressure are logged once. The log is best effort: it is opened non-blocking, a write
//! that fails or would block (a FIFO nobody reads) loses the log bytes, never guest progress.
//! This module must not change what the wrapped backend does.

use std::io;
use std::os::unix::io::{AsRawFd, OwnedFd};
use std::time::Duration;

use crate::backend::{Backend, Event, LineControl, MuxControl, Readiness, RingAccess};
use crate::error::{Error, Result};
use crate::fdchan::open_nonblocking;
use crate::poller::{Registrar, Token};
use crate::spec::LogSpec;
use crate::sys;

/// A backend whose output is also copied to a log file.
pub struct Logged {
    inner: Box<dyn Backend>,
    log: OwnedFd,
    path: String,
    warned: bool,
}

impl Logged {
    /// Wrap `inner`, opening the log as `spec` says.
    pub fn new(id: &str, inner: Box<dyn Backend>, spec: &LogSpec) -> Result<Self> {
        let log = open_nonblocking(&spec.path, true, spec.append)
            .map_err(|e| Error::io(id, "open", spec.path.display().to_string(), e))?;
        Ok(Logged {
            inner,
            log,
            path: spec.path.display().to_string(),
            warned: false,
        })
    }

    fn log(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match sys::write(self.log.as_raw_fd(), data) {
                Ok(0) => break,
                Ok(n) => data = &data[n..],
                Err(e) => {
                    if !self.warned {
                        log::warn!("chardev log {}: {e}, log incomplete", self.path);
                        self.warned = true;
                    }
                    return;
                }
            }
        }
    }
}

impl Backend for Logged {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    fn filename(&self) -> String {
        self.inner.filename()
    }
    fn attach(&mut self, reg: Registrar) {
        self.inner.attach(reg)
    }
    fn detach(&mut self) {
        self.inner.detach()
    }
    fn on_ready(&mut self, token: Token, readiness: Readiness) {
        self.inner.on_ready(token, readiness)
    }
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf)
    }
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(data)?;
        self.log(&data[..n.min(data.len())]);
        Ok(n)
    }
    fn set_input_wanted(&mut self, wanted: bool) {
        self.inner.set_input_wanted(wanted)
    }
    fn is_connected(&self) -> bool {
        self.inner.is_connected()
    }
    fn take_events(&mut self) -> Vec<Event> {
        self.inner.take_events()
    }
    fn window_size(&self) -> Option<(u16, u16)> {
        self.inner.window_size()
    }
    fn dropped_bytes(&self) -> u64 {
        self.inner.dropped_bytes()
    }
    fn wait_for_client(&mut self, timeout: Option<Duration>) -> io::Result<bool> {
        self.inner.wait_for_client(timeout)
    }
    fn line(&mut self) -> Option<&mut dyn LineControl> {
        self.inner.line()
    }
    fn ring(&mut self) -> Option<&mut dyn RingAccess> {
        self.inner.ring()
    }
    fn mux(&mut self) -> Option<&mut dyn MuxControl> {
        self.inner.mux()
    }
    fn extension(&mut self) -> Option<&mut dyn std::any::Any> {
        self.inner.extension()
    }
}
