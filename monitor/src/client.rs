//! A small blocking QMP client: connect, negotiate, run commands, read events. It backs
//! `minivmm qmp NAME CMD [JSON]` and the tests; it is not used inside the VMM's event loop.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Map, Value};
use thiserror::Error;

use crate::sys;

/// Longest line the client accepts from a server.
pub const MAX_LINE: usize = 64 << 20;

/// A failed client operation.
#[derive(Debug, Error)]
pub enum ClientError {
    /// Connecting, reading or writing failed (a timeout included).
    #[error("cannot {op} the QMP socket")]
    Io {
        /// What we tried.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The server closed the connection.
    #[error("the QMP server closed the connection")]
    Closed,
    /// The server sent something that is not QMP.
    #[error("unexpected QMP message: {0}")]
    Protocol(String),
    /// The arguments are not a JSON object.
    #[error("arguments must be a JSON object")]
    BadArguments,
}

fn io_err(op: &'static str) -> impl FnOnce(io::Error) -> ClientError {
    move |source| ClientError::Io { op, source }
}

/// A blocking QMP connection.
#[derive(Debug)]
pub struct QmpClient {
    stream: UnixStream,
    buf: Vec<u8>,
    greeting: Value,
    events: VecDeque<Value>,
    next_id: u64,
}

impl QmpClient {
    /// Connect to `path` and read the greeting; every read waits at most `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, ClientError> {
        let stream = UnixStream::connect(path).map_err(io_err("connect to"))?;
        stream
            .set_read_timeout(Some(timeout))
            .map_err(io_err("set up"))?;
        stream
            .set_write_timeout(Some(timeout))
            .map_err(io_err("set up"))?;
        let mut c = QmpClient {
            stream,
            buf: Vec::new(),
            greeting: Value::Null,
            events: VecDeque::new(),
            next_id: 0,
        };
        let g = c.read_message()?;
        if g.get("QMP").is_none() {
            return Err(ClientError::Protocol(g.to_string()));
        }
        c.greeting = g;
        Ok(c)
    }

    /// The greeting the server sent.
    pub fn greeting(&self) -> &Value {
        &self.greeting
    }

    /// Send `qmp_capabilities`; fails if the server refuses.
    pub fn negotiate(&mut self) -> Result<(), ClientError> {
        let r = self.execute("qmp_capabilities", None)?;
        if r.get("return").is_none() {
            return Err(ClientError::Protocol(r.to_string()));
        }
        Ok(())
    }

    /// Send raw bytes (tests of malformed input).
    pub fn send_raw(&mut self, data: &[u8]) -> Result<(), ClientError> {
        self.stream.write_all(data).map_err(io_err("write to"))
    }

    /// Send raw bytes with fds attached (SCM_RIGHTS).
    pub fn send_raw_with_fds(&mut self, data: &[u8], fds: &[RawFd]) -> Result<(), ClientError> {
        let n =
            sys::send_with_fds(self.stream.as_raw_fd(), data, fds).map_err(io_err("write to"))?;
        self.send_raw(&data[n..])
    }

    /// Read the next message, events included.
    pub fn read_message(&mut self) -> Result<Value, ClientError> {
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                let text = String::from_utf8_lossy(&line);
                let text = text.trim();
                if text.is_empty() {
                    continue;
                }
                return serde_json::from_str(text)
                    .map_err(|_| ClientError::Protocol(text.to_string()));
            }
            if self.buf.len() > MAX_LINE {
                return Err(ClientError::Protocol("line too long".into()));
            }
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).map_err(io_err("read from"))?;
            if n == 0 {
                return Err(ClientError::Closed);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Read the next answer, keeping events aside for [`QmpClient::take_events`].
    pub fn read_answer(&mut self) -> Result<Value, ClientError> {
        loop {
            let m = self.read_message()?;
            if m.get("event").is_some() {
                self.events.push_back(m);
            } else {
                return Ok(m);
            }
        }
    }

    /// Run one command, with fds attached if any; returns the whole answer object
    /// (`{"return": ...}` or `{"error": ...}`).
    pub fn execute_with_fds(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        fds: &[RawFd],
    ) -> Result<Value, ClientError> {
        self.next_id += 1;
        let id = format!("minivmm-{}", self.next_id);
        let mut msg = Map::new();
        msg.insert("execute".into(), json!(command));
        match arguments {
            None => {}
            Some(Value::Object(a)) => {
                msg.insert("arguments".into(), Value::Object(a));
            }
            Some(_) => return Err(ClientError::BadArguments),
        }
        msg.insert("id".into(), json!(id));
        let mut line = Value::Object(msg).to_string();
        line.push('\n');
        if fds.is_empty() {
            self.send_raw(line.as_bytes())?;
        } else {
            self.send_raw_with_fds(line.as_bytes(), fds)?;
        }
        loop {
            let a = self.read_answer()?;
            if a.get("id") == Some(&json!(id)) {
                return Ok(a);
            }
            if a.get("id").is_none() {
                return Err(ClientError::Protocol(a.to_string()));
            }
        }
    }

    /// Run one command; returns the whole answer object.
    pub fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, ClientError> {
        self.execute_with_fds(command, arguments, &[])
    }

    /// Wait for the next event, at most the read timeout.
    pub fn next_event(&mut self) -> Result<Value, ClientError> {
        if let Some(e) = self.events.pop_front() {
            return Ok(e);
        }
        loop {
            let m = self.read_message()?;
            if m.get("event").is_some() {
                return Ok(m);
            }
        }
    }

    /// Events received while waiting for answers.
    pub fn take_events(&mut self) -> Vec<Value> {
        self.events.drain(..).collect()
    }
}

/// `minivmm qmp`: connect to `socket`, negotiate, run `command` with `arguments`, and return
/// the answer object.
pub fn qmp_command(
    socket: &Path,
    command: &str,
    arguments: Option<Value>,
    timeout: Duration,
) -> Result<Value, ClientError> {
    let mut c = QmpClient::connect(socket, timeout)?;
    c.negotiate()?;
    c.execute(command, arguments)
}
