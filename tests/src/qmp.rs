//! A small blocking QMP client for the integration tests: line-based JSON over a unix socket,
//! with the events that arrive between replies kept for later.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// How long a connect or a read may take.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// A QMP client over a unix socket, for the tests: it keeps the events that arrive between
/// replies for [`Qmp::event`].
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Events received and not yet taken.
    pub events: Vec<Value>,
}

impl Qmp {
    /// Connect to the socket at `path` (waiting up to [`TIMEOUT`] for it); returns the session
    /// and the greeting.
    pub fn connect(path: &std::path::Path) -> (Qmp, Value) {
        let deadline = Instant::now() + TIMEOUT;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(Instant::now() < deadline, "connect {}: {e}", path.display());
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        Qmp::on(stream)
    }

    /// A QMP session on a connected stream; returns it and the greeting.
    pub fn on(stream: UnixStream) -> (Qmp, Value) {
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut q = Qmp {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
            events: Vec::new(),
        };
        let greeting = q.read();
        (q, greeting)
    }

    /// The next message (panics on a closed connection or bad JSON).
    pub fn read(&mut self) -> Value {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).expect("read QMP");
        assert!(n > 0, "QMP connection closed");
        assert!(line.ends_with("\r\n"), "QMP lines end with CRLF: {line:?}");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad JSON {line:?}: {e}"))
    }

    /// Send `raw` as it is; returns the next reply, keeping events that come before it.
    pub fn send_raw(&mut self, raw: &str) -> Value {
        self.writer.write_all(raw.as_bytes()).unwrap();
        loop {
            let v = self.read();
            if v.get("event").is_some() {
                self.events.push(v);
            } else {
                return v;
            }
        }
    }

    /// Run `execute` with `arguments` (`Value::Null` for none); returns the whole reply.
    pub fn cmd(&mut self, execute: &str, arguments: Value) -> Value {
        let mut msg = json!({ "execute": execute, "id": execute });
        if !arguments.is_null() {
            msg["arguments"] = arguments;
        }
        let reply = self.send_raw(&format!("{msg}\n"));
        assert_eq!(reply["id"], json!(execute), "{reply}");
        reply
    }

    /// Run a command that must succeed; returns its `return` value.
    pub fn ok(&mut self, execute: &str, arguments: Value) -> Value {
        let reply = self.cmd(execute, arguments);
        assert!(reply.get("return").is_some(), "{execute}: {reply}");
        reply["return"].clone()
    }

    /// The first event called `name`, waiting for it if none was received yet.
    pub fn event(&mut self, name: &str) -> Value {
        loop {
            if let Some(i) = self.events.iter().position(|e| e["event"] == json!(name)) {
                return self.events.remove(i);
            }
            let v = self.read();
            if v.get("event").is_some() {
                self.events.push(v);
            }
        }
    }
}
