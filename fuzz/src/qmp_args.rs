//! Fuzz target `qmp_args`: sequences of QMP commands, each one of the names the monitor knows
//! (now and then an unknown one) with arguments built from the input, run by the real
//! dispatcher ([`monitor::commands::execute`]) against a fake machine whose chardev registry
//! starts with a ringbuf `r0`, a null `n0` and a mux `m0`.
//!
//! The arguments come from a small structured decoder ([`Decoder`]): a tag byte picks null, a
//! boolean, an integer (small, 64-bit or a boundary value), a float, a string (the parameter
//! names and values the commands know, or bytes of the input) or an array or object of further
//! values, so the fuzzer reaches the argument checks of every command with the right member
//! names and wrong types, values and extra members. A command may also take its arguments as
//! raw JSON text from the input. Commands run in sequence on the same machine, so
//! `chardev-add` then `ringbuf-write`, `device_add` then `device_del` and so on are reached.
//!
//! Nothing may panic, and every reply, written as the QMP session writes it, is one line of
//! JSON that is a success (`{"return": ...}`) or an error object (`{"error": {"class",
//! "desc"}}`, both non-empty strings).
//!
//! The fake machine creates no host resources: a `chardev-add` of a backend that would open a
//! file, socket, pty, tty or the terminal registers a `null` chardev in its place (after the
//! dispatcher has checked and parsed everything), and a `chardev-change` (QMP or HMP) that
//! would open one is answered with an error without running it. No fds are passed, so `getfd`
//! only reaches its checks.

use std::collections::VecDeque;
use std::sync::Once;

use chardev::{BackendSpec, ChardevSpec};
use monitor::commands::{backend_to_spec, execute, Context, COMMANDS};
use monitor::protocol::{error_line, return_line, QmpError};
use monitor::testutil::{opens_nothing, FakeMachine};
use monitor::FdStore;
use serde_json::{Map, Number, Value};

/// Commands run per input at most.
const MAX_COMMANDS: usize = 64;
/// Nesting of arrays and objects at most.
const MAX_DEPTH: usize = 4;

/// Member names the commands read (and a few they do not).
const KEYS: &[&str] = &[
    "id",
    "backend",
    "type",
    "data",
    "device",
    "format",
    "size",
    "fdname",
    "driver",
    "chardev",
    "name",
    "nr",
    "bus",
    "command-line",
    "cpu-index",
    "direction",
    "forward",
    "addr",
    "path",
    "host",
    "port",
    "server",
    "wait",
    "nodelay",
    "reconnect",
    "reconnect-ms",
    "backlog",
    "logfile",
    "logappend",
    "out",
    "in",
    "append",
    "signal",
    "remote",
    "local",
    "str",
    "abstract",
    "tight",
    "numeric",
    "ipv4",
    "ipv6",
    "keep-alive",
    "telnet",
    "tn3270",
    "websocket",
    "tls-creds",
    "tls-authz",
    "mux",
    "x",
];

/// String values the commands and parsers know.
const WORDS: &[&str] = &[
    "",
    "r0",
    "n0",
    "m0",
    "c1",
    "p0",
    "vser0.0",
    "null",
    "file",
    "stdio",
    "socket",
    "pty",
    "ringbuf",
    "memory",
    "pipe",
    "udp",
    "serial",
    "tty",
    "mux",
    "vproxy",
    "unix",
    "inet",
    "fd",
    "vsock",
    "utf8",
    "base64",
    "in",
    "out",
    "virtserialport",
    "virtconsole",
    "isa-serial",
    "on",
    "off",
    "0x10",
    "4294967296",
    "127.0.0.1",
    "::1",
    "1234",
    "aGVsbG8=",
    "aGVsbG8",
    "web:8080",
    "web:127.0.0.1:8080",
    "web:unix:/x",
    "info chardev",
    "info ports",
    "info status",
    "chardev-add ringbuf,id=c1",
    "chardev-remove c1",
    "device_add virtconsole,id=p0,chardev=c1",
    "device_del p0",
    "ringbuf_write r0 hi",
    "ringbuf_read r0 8",
    "chardev-change r0 null",
    "help",
];

/// Integers at the edges the checks care about.
const EDGES: &[i64] = &[
    0,
    1,
    -1,
    2,
    16,
    1024,
    65535,
    65536,
    1 << 24,
    16 << 20,
    (16 << 20) + 1,
    1 << 30,
    (1 << 31) - 1,
    1 << 31,
    1 << 32,
    i64::MAX,
    i64::MIN,
    i64::MAX / 1000 + 1,
];

/// Reads values from the input bytes; an exhausted input reads as zeros.
pub struct Decoder<'a> {
    data: &'a [u8],
}

impl<'a> Decoder<'a> {
    /// A decoder over `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Decoder { data }
    }

    /// Whether input is left.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The next byte (0 past the end).
    pub fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    /// Up to `n` bytes.
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.data.split_at(n.min(self.data.len()));
        self.data = rest;
        head
    }

    /// A string: a known word, or a length byte and that many input bytes.
    pub fn string(&mut self) -> String {
        let b = self.byte();
        if b < 0xc0 {
            WORDS[usize::from(b) % WORDS.len()].to_string()
        } else {
            let n = usize::from(self.byte());
            String::from_utf8_lossy(self.bytes(n)).into_owned()
        }
    }

    /// A member name: a known one, or bytes of the input.
    pub fn key(&mut self) -> String {
        let b = self.byte();
        if b < 0xe0 {
            KEYS[usize::from(b) % KEYS.len()].to_string()
        } else {
            let n = usize::from(b & 0x1f);
            String::from_utf8_lossy(self.bytes(n)).into_owned()
        }
    }

    /// An object of up to 7 members.
    pub fn object(&mut self, depth: usize) -> Map<String, Value> {
        let n = self.byte() % 8;
        let mut map = Map::new();
        for _ in 0..n {
            let k = self.key();
            let v = self.value(depth + 1);
            map.insert(k, v);
        }
        map
    }

    /// Any JSON value, arrays and objects nested at most [`MAX_DEPTH`] deep.
    pub fn value(&mut self, depth: usize) -> Value {
        let tag = self.byte();
        match tag % 11 {
            0 => Value::Null,
            1 => Value::Bool(tag & 0x80 != 0),
            2 => Value::from(i64::from(self.byte() as i8)),
            3 => {
                let mut b = [0u8; 8];
                let raw = self.bytes(8);
                b[..raw.len()].copy_from_slice(raw);
                if tag & 0x80 != 0 {
                    Value::from(u64::from_le_bytes(b))
                } else {
                    Value::from(i64::from_le_bytes(b))
                }
            }
            4 => Value::from(EDGES[usize::from(self.byte()) % EDGES.len()]),
            5 => {
                let mut b = [0u8; 8];
                let raw = self.bytes(8);
                b[..raw.len()].copy_from_slice(raw);
                let f = f64::from_le_bytes(b);
                Number::from_f64(f).map_or(Value::from(0.5), Value::Number)
            }
            6 | 7 => Value::String(self.string()),
            8 if depth < MAX_DEPTH => {
                let n = self.byte() % 5;
                Value::Array((0..n).map(|_| self.value(depth + 1)).collect())
            }
            9 | 10 if depth < MAX_DEPTH => Value::Object(self.object(depth)),
            _ => Value::String(self.string()),
        }
    }
}

/// The monitor's fake machine, sandboxed (it opens no host resource: see the module docs),
/// with chardevs `r0` (ringbuf), `n0` (null) and `m0` (a mux on a null).
fn machine() -> FakeMachine {
    let mut m = FakeMachine::sandboxed();
    for spec in ["ringbuf,id=r0,size=1024", "null,id=n0", "null,id=m0,mux=on"] {
        let spec = ChardevSpec::parse(spec).expect("seed chardev spec");
        m.registry.add(&spec).expect("seed chardev");
    }
    m
}

/// The spec a `chardev-change` would open a backend for, if it gets that far: it names a
/// registered chardev, is no mux and has no fd name (the fd store is always empty here).
fn change_target(machine: &mut FakeMachine, spec: ChardevSpec) -> Option<ChardevSpec> {
    let reaches_create = machine.registry.contains(&spec.id)
        && !spec.mux
        && !matches!(spec.backend, BackendSpec::Mux(_))
        && !matches!(
            &spec.backend,
            BackendSpec::Socket(s) if matches!(s.addr, chardev::spec::SocketAddrSpec::FdName(_))
        );
    reaches_create.then_some(spec)
}

/// Whether running `command` with `args` would make the dispatcher open a host resource (a
/// `chardev-change` to such a backend, from QMP or through HMP).
fn would_open(machine: &mut FakeMachine, command: &str, args: &Map<String, Value>) -> bool {
    let spec = match command {
        "chardev-change" => {
            let (Some(Value::String(id)), Some(Value::Object(backend))) =
                (args.get("id"), args.get("backend"))
            else {
                return false;
            };
            backend_to_spec(id, backend).ok()
        }
        "human-monitor-command" => {
            let Some(Value::String(line)) = args.get("command-line") else {
                return false;
            };
            // As monitor::hmp::execute splits it.
            let line = line.trim();
            let Some(("chardev-change", rest)) = line.split_once(char::is_whitespace) else {
                return false;
            };
            let Some((id, opts)) = rest.trim().split_once(char::is_whitespace) else {
                return false;
            };
            ChardevSpec::parse(&format!("{},id={id}", opts.trim())).ok()
        }
        _ => return false,
    };
    spec.and_then(|s| change_target(machine, s))
        .is_some_and(|s| !opens_nothing(&s))
}

/// `line` is one line of JSON, a QMP success or error object, with `id` if one was given.
fn check_reply(line: &str, id: Option<&Value>) {
    let text = line.strip_suffix("\r\n").unwrap_or(line);
    assert!(
        !text.contains('\n') && !text.contains('\r'),
        "reply of several lines: {text:?}"
    );
    let mut v: Value =
        serde_json::from_str(text).unwrap_or_else(|e| panic!("reply is not JSON ({e}): {text:?}"));
    let obj = v.as_object_mut().expect("reply is an object");
    assert_eq!(obj.remove("id").as_ref(), id, "reply id: {text}");
    match (obj.get("return"), obj.get("error")) {
        (Some(_), None) => assert_eq!(obj.len(), 1, "success with extra members: {text}"),
        (None, Some(Value::Object(e))) => {
            assert_eq!(obj.len(), 1, "error with extra members: {text}");
            for member in ["class", "desc"] {
                match e.get(member) {
                    Some(Value::String(s)) if !s.is_empty() => {}
                    other => panic!("error {member} is {other:?}: {text}"),
                }
            }
            assert_eq!(e.len(), 2, "error object with extra members: {text}");
        }
        _ => panic!("neither a success nor an error: {text}"),
    }
}

/// Runs one input (see the module docs).
pub fn qmp_args(data: &[u8]) {
    qmp_args_traced(data, &mut |_, _, _| {});
}

/// What [`qmp_args_traced`] reports: a command, its arguments, its reply line.
pub type Trace<'a> = dyn FnMut(&str, &Map<String, Value>, &str) + 'a;

/// [`qmp_args`], calling `trace` with each command, its arguments and its reply line.
pub fn qmp_args_traced(data: &[u8], trace: &mut Trace<'_>) {
    static REGISTER: Once = Once::new();
    REGISTER.call_once(vproxy::register);
    let mut machine = machine();
    let fds = FdStore::new();
    let mut passed = VecDeque::new();
    let mut input = Decoder::new(data);
    for _ in 0..MAX_COMMANDS {
        if input.is_empty() {
            break;
        }
        let op = input.byte();
        let command = if op < 0xf8 {
            COMMANDS[usize::from(op) % COMMANDS.len()].to_string()
        } else {
            input.string()
        };
        let how = input.byte();
        let args = if how & 0xc0 == 0xc0 {
            // Raw JSON text: a length byte, then the text.
            let n = usize::from(input.byte());
            match serde_json::from_slice::<Value>(input.bytes(n)) {
                Ok(Value::Object(m)) => m,
                _ => continue,
            }
        } else {
            input.object(0)
        };
        let result = if would_open(&mut machine, &command, &args) {
            Err(QmpError::generic(
                "fuzz: chardev-change would open a backend",
            ))
        } else {
            let mut ctx = Context {
                machine: &mut machine,
                fds: &fds,
                passed_fds: &mut passed,
            };
            execute(&mut ctx, &command, &args)
        };
        let id = (how & 1 != 0).then(|| Value::from(u64::from(how)));
        let line = match &result {
            Ok(v) => return_line(id.as_ref(), v),
            Err(e) => error_line(id.as_ref(), e),
        };
        check_reply(&line, id.as_ref());
        trace(&command, &args, &line);
    }
}
