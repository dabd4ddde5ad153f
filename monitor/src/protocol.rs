//! The QMP session engine, sans-IO: bytes in, replies and events out.
//!
//! A [`Session`] is one client's view of the protocol: the greeting, capabilities negotiation,
//! request validation (`execute`, `arguments`, `id`), and the formatting of replies, errors and
//! events with QEMU's shapes and CRLF line ends (`docs/interop/qmp-spec.rst`). It answers by
//! itself everything that needs no machine (parse errors, malformed requests, negotiation) and
//! hands the rest back as [`Incoming::Execute`] for the dispatcher.
//!
//! This module does no I/O and knows no command but `qmp_capabilities`.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};
use thiserror::Error;

use crate::json::{self, JsonStreamer, Message};

/// The QEMU version minivmm's QMP presents itself as (what clients parse).
pub const QEMU_VERSION_MAJOR: u64 = 7;
/// See [`QEMU_VERSION_MAJOR`].
pub const QEMU_VERSION_MINOR: u64 = 2;
/// See [`QEMU_VERSION_MAJOR`].
pub const QEMU_VERSION_MICRO: u64 = 0;
/// The `package` string of the greeting and `query-version`.
pub const PACKAGE: &str = concat!("minivmm ", env!("CARGO_PKG_VERSION"));
/// Default bound on one incoming message.
pub const DEFAULT_MAX_MESSAGE: usize = 1 << 20;
/// Line end of every server message.
pub const CRLF: &str = "\r\n";

/// QEMU's error classes (`qapi/error.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Everything else.
    GenericError,
    /// Unknown command, or a command not allowed in this mode.
    CommandNotFound,
    /// A device exists but is not active.
    DeviceNotActive,
    /// No device with that id.
    DeviceNotFound,
    /// KVM lacks a capability.
    KVMMissingCap,
}

impl ErrorClass {
    /// The class name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
            ErrorClass::KVMMissingCap => "KVMMissingCap",
        }
    }
}

/// A QMP error answer: class and description.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{desc}")]
pub struct QmpError {
    /// The class.
    pub class: ErrorClass,
    /// The human-readable description (QEMU's wording where QEMU has one).
    pub desc: String,
}

impl QmpError {
    /// A `GenericError`.
    pub fn generic(desc: impl Into<String>) -> Self {
        QmpError {
            class: ErrorClass::GenericError,
            desc: desc.into(),
        }
    }

    /// A `CommandNotFound`.
    pub fn command_not_found(desc: impl Into<String>) -> Self {
        QmpError {
            class: ErrorClass::CommandNotFound,
            desc: desc.into(),
        }
    }

    /// A `DeviceNotFound`.
    pub fn device_not_found(desc: impl Into<String>) -> Self {
        QmpError {
            class: ErrorClass::DeviceNotFound,
            desc: desc.into(),
        }
    }
}

/// One well-formed command for the dispatcher.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The command name (`execute`).
    pub execute: String,
    /// Its arguments (empty when absent).
    pub arguments: Map<String, Value>,
    /// The client's `id`, echoed in the answer.
    pub id: Option<Value>,
}

/// What the session made of the input.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    /// Run this command, then send [`Session::answer`] of its result.
    Execute(Request),
    /// Send this line as it is: the session answered by itself.
    Reply(String),
}

/// An asynchronous event.
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    /// Event name (`SHUTDOWN`, `STOP`, ...).
    pub name: String,
    /// Its data; `None` leaves out the `data` member as QEMU does for empty events.
    pub data: Option<Map<String, Value>>,
    /// Seconds since the epoch when the event happened.
    pub seconds: u64,
    /// Microseconds within that second.
    pub microseconds: u32,
}

impl QmpEvent {
    /// An event timestamped now.
    pub fn new(name: impl Into<String>, data: Option<Map<String, Value>>) -> Self {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        QmpEvent {
            name: name.into(),
            data,
            seconds: now.as_secs(),
            microseconds: now.subsec_micros(),
        }
    }

    /// The event as one line, CRLF included.
    pub fn to_line(&self) -> String {
        let mut out = String::from("{\"timestamp\": {\"seconds\": ");
        out.push_str(&self.seconds.to_string());
        out.push_str(", \"microseconds\": ");
        out.push_str(&self.microseconds.to_string());
        out.push_str("}, \"event\": ");
        json::write_string(&mut out, &self.name);
        if let Some(data) = &self.data {
            out.push_str(", \"data\": ");
            json::write_value(&mut out, &Value::Object(data.clone()));
        }
        out.push('}');
        out.push_str(CRLF);
        out
    }
}

/// The greeting line, CRLF included.
pub fn greeting() -> String {
    let mut out = format!(
        "{{\"QMP\": {{\"version\": {{\"qemu\": {{\"micro\": {QEMU_VERSION_MICRO}, \"minor\": {QEMU_VERSION_MINOR}, \"major\": {QEMU_VERSION_MAJOR}}}, \"package\": "
    );
    json::write_string(&mut out, PACKAGE);
    out.push_str("}, \"capabilities\": []}}");
    out.push_str(CRLF);
    out
}

/// A success answer line, CRLF included.
pub fn return_line(id: Option<&Value>, value: &Value) -> String {
    let mut out = String::from("{\"return\": ");
    json::write_value(&mut out, value);
    push_id(&mut out, id);
    out
}

/// An error answer line, CRLF included.
pub fn error_line(id: Option<&Value>, err: &QmpError) -> String {
    let mut out = String::from("{\"error\": {\"class\": ");
    json::write_string(&mut out, err.class.as_str());
    out.push_str(", \"desc\": ");
    json::write_string(&mut out, &err.desc);
    out.push('}');
    push_id(&mut out, id);
    out
}

fn push_id(out: &mut String, id: Option<&Value>) {
    if let Some(id) = id {
        out.push_str(", \"id\": ");
        json::write_value(out, id);
    }
    out.push('}');
    out.push_str(CRLF);
}

/// Check the shape of a request object as QEMU's `qmp_dispatch_check_obj` does.
fn check_request(v: Value) -> Result<Request, (Option<Value>, QmpError)> {
    let Value::Object(mut map) = v else {
        return Err((None, QmpError::generic("QMP input must be a JSON object")));
    };
    let id = map.remove("id");
    let fail = |id: Option<Value>, msg: String| Err((id, QmpError::generic(msg)));
    let mut execute = None;
    let mut arguments = Map::new();
    for (key, value) in map {
        match key.as_str() {
            "execute" => match value {
                Value::String(s) => execute = Some(s),
                _ => return fail(id, "QMP input member 'execute' must be a string".into()),
            },
            "arguments" => match value {
                Value::Object(a) => arguments = a,
                _ => return fail(id, "QMP input member 'arguments' must be an object".into()),
            },
            other => return fail(id, format!("QMP input member '{other}' is unexpected")),
        }
    }
    match execute {
        Some(execute) => Ok(Request {
            execute,
            arguments,
            id,
        }),
        None => fail(id, "QMP input lacks member 'execute'".into()),
    }
}

/// Validate `qmp_capabilities` arguments. No capability is offered, so any `enable` entry
/// fails.
fn check_capabilities(args: &Map<String, Value>) -> Result<(), QmpError> {
    for (key, value) in args {
        if key != "enable" {
            return Err(QmpError::generic(format!(
                "Parameter '{key}' is unexpected"
            )));
        }
        let Value::Array(list) = value else {
            return Err(QmpError::generic(
                "Invalid parameter type for 'enable', expected: array",
            ));
        };
        // The first entry decides: every value is refused.
        if let Some(cap) = list.first() {
            return Err(match cap.as_str() {
                Some("oob") => QmpError::generic("Capability oob not available"),
                Some(other) => QmpError::generic(format!(
                    "Parameter 'enable[0]' does not accept value '{other}'"
                )),
                None => {
                    QmpError::generic("Invalid parameter type for 'enable[0]', expected: string")
                }
            });
        }
    }
    Ok(())
}

/// One client's QMP session.
#[derive(Debug)]
pub struct Session {
    streamer: JsonStreamer,
    negotiated: bool,
}

impl Default for Session {
    fn default() -> Self {
        Session::new(DEFAULT_MAX_MESSAGE)
    }
}

impl Session {
    /// A session in capabilities-negotiation mode that refuses messages over `max_message`
    /// bytes.
    pub fn new(max_message: usize) -> Self {
        Session {
            streamer: JsonStreamer::new(max_message),
            negotiated: false,
        }
    }

    /// Back to negotiation mode with an empty parser (a new connection on the same chardev).
    pub fn reset(&mut self) {
        self.streamer.reset();
        self.negotiated = false;
    }

    /// Whether `qmp_capabilities` has been accepted (events are sent only then).
    pub fn is_negotiated(&self) -> bool {
        self.negotiated
    }

    /// Feed received bytes; returns what to do, in order.
    pub fn feed(&mut self, data: &[u8]) -> Vec<Incoming> {
        let mut messages = Vec::new();
        self.streamer.feed(data, &mut messages);
        let mut out = Vec::with_capacity(messages.len());
        for m in messages {
            out.push(match m {
                Message::Error(e) => Incoming::Reply(error_line(None, &QmpError::generic(e))),
                Message::Value(v) => match check_request(v) {
                    Err((id, e)) => Incoming::Reply(error_line(id.as_ref(), &e)),
                    Ok(req) => self.route(req),
                },
            });
        }
        out
    }

    fn route(&mut self, req: Request) -> Incoming {
        let id = req.id.as_ref();
        if !self.negotiated {
            if req.execute != "qmp_capabilities" {
                return Incoming::Reply(error_line(
                    id,
                    &QmpError::command_not_found(
                        "Expecting capabilities negotiation with 'qmp_capabilities'",
                    ),
                ));
            }
            return Incoming::Reply(match check_capabilities(&req.arguments) {
                Ok(()) => {
                    self.negotiated = true;
                    return_line(id, &Value::Object(Map::new()))
                }
                Err(e) => error_line(id, &e),
            });
        }
        if req.execute == "qmp_capabilities" {
            return Incoming::Reply(match check_capabilities(&req.arguments) {
                Ok(()) => error_line(
                    id,
                    &QmpError::command_not_found(
                        "Capabilities negotiation is already complete, command ignored",
                    ),
                ),
                Err(e) => error_line(id, &e),
            });
        }
        Incoming::Execute(req)
    }

    /// The answer line for a command's result.
    pub fn answer(&self, id: Option<&Value>, result: &Result<Value, QmpError>) -> String {
        match result {
            Ok(v) => return_line(id, v),
            Err(e) => error_line(id, e),
        }
    }

    /// The event line for this client, or `None` before negotiation.
    pub fn event_line(&self, event: &QmpEvent) -> Option<String> {
        self.negotiated.then(|| event.to_line())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn parse_line(line: &str) -> Value {
        assert!(line.ends_with("\r\n"), "{line:?}");
        serde_json::from_str(line.trim_end()).unwrap()
    }

    fn reply(s: &mut Session, input: &str) -> Value {
        let out = s.feed(input.as_bytes());
        assert_eq!(out.len(), 1, "{out:?}");
        match &out[0] {
            Incoming::Reply(l) => parse_line(l),
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    fn class(v: &Value) -> &str {
        v["error"]["class"].as_str().unwrap()
    }

    fn negotiated() -> Session {
        let mut s = Session::default();
        assert_eq!(
            reply(&mut s, "{\"execute\": \"qmp_capabilities\"}"),
            json!({"return": {}})
        );
        s
    }

    #[test]
    fn greeting_has_qemu_shape() {
        let g = greeting();
        assert!(g.starts_with("{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 2, \"major\": 7}, \"package\": \"minivmm "));
        let v = parse_line(&g);
        assert_eq!(v["QMP"]["capabilities"], json!([]));
        assert_eq!(v["QMP"]["version"]["qemu"]["major"], 7);
        assert!(v["QMP"]["version"]["package"].is_string());
    }

    #[test]
    fn negotiation_gates_commands() {
        let mut s = Session::default();
        let r = reply(&mut s, "{'execute': 'query-version', 'id': 1}");
        assert_eq!(class(&r), "CommandNotFound");
        assert_eq!(
            r["error"]["desc"],
            "Expecting capabilities negotiation with 'qmp_capabilities'"
        );
        assert_eq!(r["id"], 1);
        // Unknown commands get the same answer before negotiation.
        assert_eq!(
            class(&reply(&mut s, "{'execute': 'nope'}")),
            "CommandNotFound"
        );
        // Bad capabilities keep negotiation mode.
        let r = reply(
            &mut s,
            "{'execute': 'qmp_capabilities', 'arguments': {'enable': ['cap-does-not-exist']}}",
        );
        assert_eq!(class(&r), "GenericError");
        assert_eq!(
            class(&reply(
                &mut s,
                "{'execute': 'qmp_capabilities', 'arguments': {'enable': ['oob']}}"
            )),
            "GenericError"
        );
        assert!(!s.is_negotiated());
        assert!(s.event_line(&QmpEvent::new("STOP", None)).is_none());
        assert_eq!(
            reply(
                &mut s,
                "{'execute': 'qmp_capabilities', 'arguments': {}, 'id': 'a'}"
            ),
            json!({"return": {}, "id": "a"})
        );
        let r = reply(&mut s, "{'execute': 'qmp_capabilities'}");
        assert_eq!(class(&r), "CommandNotFound");
        assert_eq!(
            r["error"]["desc"],
            "Capabilities negotiation is already complete, command ignored"
        );
        let out = s.feed(b"{\"execute\": \"query-status\", \"id\": [1]}");
        assert_eq!(
            out,
            vec![Incoming::Execute(Request {
                execute: "query-status".into(),
                arguments: Map::new(),
                id: Some(json!([1])),
            })]
        );
        s.reset();
        assert!(!s.is_negotiated());
    }

    #[test]
    fn malformed_requests_are_generic_errors_with_id() {
        let mut s = negotiated();
        let cases = [
            ("null\n", "QMP input must be a JSON object", None),
            ("{}", "QMP input lacks member 'execute'", None),
            (
                "{'execute': true, 'id': 3}",
                "QMP input member 'execute' must be a string",
                Some(json!(3)),
            ),
            (
                "{'execute': 'no-such-cmd', 'arguments': []}",
                "QMP input member 'arguments' must be an object",
                None,
            ),
            (
                "{'execute': 'no-such-cmd', 'extra': true}",
                "QMP input member 'extra' is unexpected",
                None,
            ),
            (
                "{'exec-oob': 'query-status'}",
                "QMP input member 'exec-oob' is unexpected",
                None,
            ),
        ];
        for (input, desc, id) in cases {
            let r = reply(&mut s, input);
            assert_eq!(class(&r), "GenericError", "{input}");
            assert_eq!(r["error"]["desc"], desc, "{input}");
            assert_eq!(r.get("id").cloned(), id, "{input}");
        }
    }

    #[test]
    fn parse_errors_then_recovery_in_both_modes() {
        for mut s in [Session::default(), negotiated()] {
            for bad in [
                &b"{]\n"[..],
                b"{\xff",
                b"{\x01",
                b"{'bad \xff",
                b"{'execute': 'nonexistent', 'id':'\n",
                b"%p",
            ] {
                let out = s.feed(bad);
                assert_eq!(out.len(), 1);
                let Incoming::Reply(l) = &out[0] else {
                    panic!("{out:?}")
                };
                let v = parse_line(l);
                assert_eq!(class(&v), "GenericError");
                assert!(v.get("id").is_none());
                assert!(v["error"]["desc"]
                    .as_str()
                    .unwrap()
                    .starts_with("JSON parse error"));
                let out = s.feed(b"{ 'execute': 'no-such-cmd' }");
                match &out[..] {
                    [Incoming::Reply(l)] => assert_eq!(class(&parse_line(l)), "CommandNotFound"),
                    [Incoming::Execute(r)] => assert_eq!(r.execute, "no-such-cmd"),
                    other => panic!("{other:?}"),
                }
            }
        }
    }

    #[test]
    fn over_long_input_is_refused_and_session_survives() {
        let mut s = Session::new(128);
        s.feed(b"{'execute': 'qmp_capabilities'}");
        let big = format!(
            "{{'execute': 'x', 'arguments': {{'d': '{}'}}}}",
            "z".repeat(4096)
        );
        let out = s.feed(big.as_bytes());
        assert_eq!(out.len(), 1);
        let Incoming::Reply(l) = &out[0] else {
            panic!()
        };
        assert_eq!(class(&parse_line(l)), "GenericError");
        assert!(
            matches!(&s.feed(b"{'execute': 'y'}")[..], [Incoming::Execute(r)] if r.execute == "y")
        );
    }

    #[test]
    fn every_error_class_has_its_wire_name() {
        let all = [
            (ErrorClass::GenericError, "GenericError"),
            (ErrorClass::CommandNotFound, "CommandNotFound"),
            (ErrorClass::DeviceNotActive, "DeviceNotActive"),
            (ErrorClass::DeviceNotFound, "DeviceNotFound"),
            (ErrorClass::KVMMissingCap, "KVMMissingCap"),
        ];
        for (class, name) in all {
            let e = QmpError {
                class,
                desc: "d".into(),
            };
            let v = parse_line(&error_line(Some(&json!(1)), &e));
            assert_eq!(v, json!({"error": {"class": name, "desc": "d"}, "id": 1}));
        }
    }

    #[test]
    fn answers_and_events_are_crlf_lines() {
        let s = negotiated();
        assert_eq!(
            s.answer(Some(&json!("x")), &Ok(json!({}))),
            "{\"return\": {}, \"id\": \"x\"}\r\n"
        );
        assert_eq!(
            s.answer(
                None,
                &Err(QmpError::device_not_found("Device 'p' not found"))
            ),
            "{\"error\": {\"class\": \"DeviceNotFound\", \"desc\": \"Device 'p' not found\"}}\r\n"
        );
        let mut ev = QmpEvent::new("STOP", None);
        ev.seconds = 5;
        ev.microseconds = 7;
        assert_eq!(
            s.event_line(&ev).unwrap(),
            "{\"timestamp\": {\"seconds\": 5, \"microseconds\": 7}, \"event\": \"STOP\"}\r\n"
        );
        let mut data = Map::new();
        data.insert("id".into(), json!("p1"));
        data.insert("open".into(), json!(true));
        let v = parse_line(&QmpEvent::new("VSERPORT_CHANGE", Some(data)).to_line());
        assert_eq!(v["data"], json!({"id": "p1", "open": true}));
        assert!(v["timestamp"]["seconds"].as_u64().unwrap() > 0);
    }

    proptest! {
        #[test]
        fn engine_never_panics(chunks in proptest::collection::vec(
            proptest::collection::vec(any::<u8>(), 0..48), 0..12)) {
            let mut s = Session::new(200);
            for c in &chunks {
                for item in s.feed(c) {
                    if let Incoming::Reply(l) = item {
                        prop_assert!(l.ends_with("\r\n"));
                        prop_assert!(serde_json::from_str::<Value>(l.trim_end()).is_ok());
                    }
                }
            }
        }
    }
}
