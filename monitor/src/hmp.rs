//! The human monitor (HMP): one text command line in, text out. It is what
//! `human-monitor-command` runs and what a `--mon chardev=ID,mode=readline` terminal talks to.
//!
//! Every command goes through the QMP dispatcher ([`crate::commands`]), so both monitors
//! validate and act the same way; this module only parses words and formats answers. The
//! [`LineEditor`] turns a raw terminal byte stream into lines (echo, backspace, Ctrl-U, escape
//! sequences skipped). Output uses `\n`; [`to_crlf`] converts it for the wire.

use serde_json::{json, Map, Value};

use crate::commands::{self, Context};
use crate::protocol::{QmpError, PACKAGE};

/// The prompt of a readline monitor.
pub const PROMPT: &str = "(minivmm) ";

/// Longest line the editor keeps; further characters are refused (the terminal bell rings).
pub const MAX_LINE: usize = 4096;

/// The banner a readline monitor prints when a peer connects.
pub fn banner() -> String {
    format!("{PACKAGE} monitor - type 'help' for more information\n")
}

/// One HMP command: name, argument synopsis, help text.
const HELP: &[(&str, &str, &str)] = &[
    ("help|?", "[cmd]", "show the help"),
    (
        "info",
        "status|version|name|uuid|chardev|ports|qtree|vsock",
        "show information about the machine",
    ),
    ("stop", "", "stop emulation"),
    ("cont|c", "", "resume emulation"),
    ("system_reset", "", "reset the system"),
    ("system_powerdown", "", "send system power down event"),
    ("quit|q", "", "quit the emulator"),
    (
        "chardev-add",
        "args",
        "add chardev (same syntax as --chardev)",
    ),
    ("chardev-change", "id args", "change chardev backend"),
    ("chardev-remove", "id", "remove chardev"),
    ("chardev-send-break", "id", "send a break on chardev"),
    ("ringbuf_write", "device data", "write to a ringbuf chardev"),
    ("ringbuf_read", "device size", "read from a ringbuf chardev"),
    (
        "device_add",
        "driver[,prop=value][,...]",
        "add a virtserialport or virtconsole",
    ),
    ("device_del", "device", "remove device"),
    (
        "getfd",
        "getfd name",
        "receive a file descriptor via SCM rights and assign it a name",
    ),
    (
        "closefd",
        "closefd name",
        "close a file descriptor previously passed via SCM rights",
    ),
];

/// Turn `\n` into `\r\n` (QEMU's monitor output).
pub fn to_crlf(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + s.len() / 16);
    for c in s.chars() {
        if c == '\n' {
            out.push('\r');
        }
        out.push(c);
    }
    out
}

fn err_text(e: &QmpError) -> String {
    format!("Error: {}\n", e.desc)
}

fn run(ctx: &mut Context<'_>, cmd: &str, args: Value) -> Result<Value, QmpError> {
    let empty = Map::new();
    commands::execute(ctx, cmd, args.as_object().unwrap_or(&empty))
}

/// Run `line` and return its output (`\n` line ends, empty when the command prints nothing).
pub fn execute(ctx: &mut Context<'_>, line: &str) -> String {
    let line = line.trim();
    if line.is_empty() {
        return String::new();
    }
    let (cmd, rest) = match line.split_once(char::is_whitespace) {
        Some((c, r)) => (c, r.trim()),
        None => (line, ""),
    };
    let words: Vec<&str> = rest.split_whitespace().collect();
    let one = |name: &str| -> Result<&str, String> {
        match words.as_slice() {
            [w] => Ok(*w),
            [] => Err(format!("Error: missing argument '{name}'\n")),
            _ => Err("Error: extraneous characters at the end of line\n".to_string()),
        }
    };
    let none = || -> Result<(), String> {
        if words.is_empty() {
            Ok(())
        } else {
            Err("Error: extraneous characters at the end of line\n".to_string())
        }
    };
    let simple = |ctx: &mut Context<'_>, qmp: &str| -> String {
        if let Err(e) = none() {
            return e;
        }
        match run(ctx, qmp, json!({})) {
            Ok(_) => String::new(),
            Err(e) => err_text(&e),
        }
    };
    let result: Result<String, String> = match cmd {
        "help" | "?" => Ok(help(words.first().copied())),
        "info" => match words.as_slice() {
            [what] => Ok(info(ctx, what)),
            _ => Ok(info_help()),
        },
        "stop" => Ok(simple(ctx, "stop")),
        "cont" | "c" => Ok(simple(ctx, "cont")),
        "system_reset" => Ok(simple(ctx, "system_reset")),
        "system_powerdown" => Ok(simple(ctx, "system_powerdown")),
        "quit" | "q" => Ok(simple(ctx, "quit")),
        "chardev-add" => {
            if rest.is_empty() {
                Err("Error: missing argument 'args'\n".to_string())
            } else {
                Ok(match chardev::ChardevSpec::parse(rest) {
                    Err(e) => format!("Error: {}\n", crate::machine::capitalize(&e.to_string())),
                    Ok(spec) => match commands::chardev_add_spec(ctx, spec) {
                        Ok(Some(pty)) => format!("char device redirected to {pty}\n"),
                        Ok(None) => String::new(),
                        Err(e) => err_text(&e),
                    },
                })
            }
        }
        "chardev-change" => match rest.split_once(char::is_whitespace) {
            None => Err("Error: missing argument 'args'\n".to_string()),
            Some((id, args)) => {
                let opts = format!("{},id={id}", args.trim());
                Ok(match chardev::ChardevSpec::parse(&opts) {
                    Err(e) => format!("Error: {}\n", crate::machine::capitalize(&e.to_string())),
                    Ok(spec) => match commands::chardev_change_spec(ctx, spec) {
                        Ok(Some(pty)) => format!("char device redirected to {pty}\n"),
                        Ok(None) => String::new(),
                        Err(e) => err_text(&e),
                    },
                })
            }
        },
        "chardev-remove" | "chardev-send-break" | "device_del" => one("id").map(|id| {
            let qmp = cmd;
            match run(ctx, qmp, json!({"id": id})) {
                Ok(_) => String::new(),
                Err(e) => err_text(&e),
            }
        }),
        "getfd" | "closefd" => {
            one("fdname").map(|name| match run(ctx, cmd, json!({"fdname": name})) {
                Ok(_) => String::new(),
                Err(e) => err_text(&e),
            })
        }
        "ringbuf_write" => match rest.split_once(char::is_whitespace) {
            None => Err("Error: missing argument 'data'\n".to_string()),
            Some((dev, data)) => Ok(
                match run(
                    ctx,
                    "ringbuf-write",
                    json!({"device": dev, "data": data.trim_start()}),
                ) {
                    Ok(_) => String::new(),
                    Err(e) => err_text(&e),
                },
            ),
        },
        "ringbuf_read" => match words.as_slice() {
            [dev, size] => match size.parse::<i64>() {
                Err(_) => Err(format!("Error: invalid size '{size}'\n")),
                Ok(n) => Ok(
                    match run(ctx, "ringbuf-read", json!({"device": dev, "size": n})) {
                        Ok(Value::String(s)) => ringbuf_text(&s),
                        Ok(_) => String::new(),
                        Err(e) => err_text(&e),
                    },
                ),
            },
            _ => Err("Error: usage: ringbuf_read device size\n".to_string()),
        },
        "device_add" => {
            if rest.is_empty() {
                Err("Error: missing argument 'driver'\n".to_string())
            } else {
                Ok(match crate::device_spec::DeviceSpec::parse(rest) {
                    Err(e) => format!("Error: {e}\n"),
                    Ok(spec) => match ctx.machine.device_add(&spec) {
                        Ok(()) => String::new(),
                        Err(e) => err_text(&QmpError::from(e)),
                    },
                })
            }
        }
        other => Err(format!("unknown command: '{other}'\n")),
    };
    result.unwrap_or_else(|e| e)
}

/// QEMU's `ringbuf_read` prints control characters escaped.
fn ringbuf_text(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 && c != '\n' => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('\n');
    out
}

fn help(cmd: Option<&str>) -> String {
    let mut out = String::new();
    for (names, args, text) in HELP {
        if let Some(c) = cmd {
            if !names.split('|').any(|n| n == c) {
                continue;
            }
        }
        out.push_str(&format!("{names} {args} -- {text}\n").replace("  --", " --"));
    }
    if out.is_empty() {
        out = format!("unknown command: '{}'\n", cmd.unwrap_or(""));
    }
    out
}

fn info_help() -> String {
    "info status -- show the current VM status (running|paused)\n\
     info version -- show the version of minivmm\n\
     info name -- show the current VM name\n\
     info uuid -- show the current VM UUID\n\
     info chardev -- show the character devices\n\
     info ports -- show the virtio-serial ports (also: info qtree)\n\
     info vsock -- show the vsock device and its connections\n"
        .to_string()
}

fn info(ctx: &mut Context<'_>, what: &str) -> String {
    match what {
        "status" => {
            let s = ctx.machine.run_state();
            format!("VM status: {}\n", s.as_str())
        }
        "version" => format!(
            "{}.{}.{} ({PACKAGE})\n",
            crate::protocol::QEMU_VERSION_MAJOR,
            crate::protocol::QEMU_VERSION_MINOR,
            crate::protocol::QEMU_VERSION_MICRO
        ),
        "name" => match ctx.machine.name() {
            Some(n) => format!("{n}\n"),
            None => String::new(),
        },
        "uuid" => format!(
            "{}\n",
            ctx.machine
                .uuid()
                .unwrap_or_else(|| commands::NIL_UUID.to_string())
        ),
        "chardev" => {
            let mut out = String::new();
            for c in ctx.machine.chardevs().list() {
                out.push_str(&format!(
                    "{}: filename={}{}{}\n",
                    c.label,
                    c.filename,
                    if c.connected { "" } else { " (no peer)" },
                    if c.dropped_bytes > 0 {
                        format!(", dropped={}", c.dropped_bytes)
                    } else {
                        String::new()
                    }
                ));
            }
            out
        }
        "ports" | "qtree" => {
            let ports = ctx.machine.ports();
            if ports.is_empty() {
                return "no virtio-serial ports\n".to_string();
            }
            let mut out = String::new();
            let mut buses: Vec<&str> = ports.iter().map(|p| p.bus.as_str()).collect();
            buses.dedup();
            for bus in buses {
                out.push_str(&format!("bus: {bus}\n  type virtio-serial-bus\n"));
                for p in ports.iter().filter(|p| p.bus == bus) {
                    out.push_str(&format!(
                        "  dev: {}, id \"{}\"\n    nr = {}\n    name = \"{}\"\n    chardev = \"{}\"\n    guest-connected = {}\n    host-connected = {}\n",
                        p.driver.as_str(),
                        p.id,
                        p.nr,
                        p.name.as_deref().unwrap_or(""),
                        p.chardev.as_deref().unwrap_or(""),
                        p.guest_connected,
                        p.host_connected
                    ));
                }
            }
            out
        }
        "vsock" => match ctx.machine.vsock() {
            None => "no vsock device\n".to_string(),
            Some(v) => {
                let mut out = format!(
                    "{}: guest-cid={} uds={} connections={}\n",
                    v.id,
                    v.guest_cid,
                    v.uds_path,
                    v.connections.len()
                );
                for c in &v.connections {
                    out.push_str(&format!(
                        "  {} host port {} <-> guest port {}: {}, to-host={} to-guest={}\n",
                        if c.host_initiated {
                            "host->guest"
                        } else {
                            "guest->host"
                        },
                        c.local_port,
                        c.peer_port,
                        c.state,
                        c.bytes_to_host,
                        c.bytes_to_guest
                    ));
                }
                let counters: Vec<String> =
                    v.counters.iter().map(|(k, n)| format!("{k}={n}")).collect();
                out.push_str(&format!("  {}\n", counters.join(" ")));
                out
            }
        },
        _ => info_help(),
    }
}

/// A small line editor for a raw terminal: echoes what is typed, handles backspace, Ctrl-U,
/// Ctrl-C (drop the line) and skips escape sequences (arrows). CR, LF and CRLF end a line.
#[derive(Debug, Default)]
pub struct LineEditor {
    line: Vec<u8>,
    after_cr: bool,
    escape: Escape,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Escape {
    #[default]
    None,
    Started,
    Csi,
}

const BACKSPACE: u8 = 0x08;
const DELETE: u8 = 0x7f;
const CTRL_C: u8 = 0x03;
const CTRL_U: u8 = 0x15;
const ESC: u8 = 0x1b;
const BELL: u8 = 0x07;

impl LineEditor {
    /// An empty editor.
    pub fn new() -> Self {
        LineEditor::default()
    }

    /// Forget the current line (a new connection).
    pub fn reset(&mut self) {
        *self = LineEditor::default();
    }

    /// Feed typed bytes: returns the echo to send back and the completed lines.
    pub fn feed(&mut self, data: &[u8]) -> (Vec<u8>, Vec<String>) {
        let mut echo = Vec::new();
        let mut lines = Vec::new();
        for &b in data {
            let after_cr = std::mem::take(&mut self.after_cr);
            match self.escape {
                Escape::Started => {
                    self.escape = if b == b'[' || b == b'O' {
                        Escape::Csi
                    } else {
                        Escape::None
                    };
                    continue;
                }
                Escape::Csi => {
                    if (0x40..=0x7e).contains(&b) {
                        self.escape = Escape::None;
                    }
                    continue;
                }
                Escape::None => {}
            }
            match b {
                b'\n' if after_cr => {}
                b'\r' | b'\n' => {
                    self.after_cr = b == b'\r';
                    echo.extend_from_slice(b"\r\n");
                    lines.push(String::from_utf8_lossy(&self.line).into_owned());
                    self.line.clear();
                }
                BACKSPACE | DELETE if self.line.pop().is_some() => {
                    echo.extend_from_slice(b"\x08 \x08");
                }
                CTRL_U | CTRL_C => {
                    for _ in 0..self.line.len() {
                        echo.extend_from_slice(b"\x08 \x08");
                    }
                    self.line.clear();
                }
                ESC => self.escape = Escape::Started,
                b'\t' | 0x20..=0x7e | 0x80..=0xff => {
                    if self.line.len() < MAX_LINE {
                        self.line.push(b);
                        echo.push(b);
                    } else {
                        echo.push(BELL);
                    }
                }
                _ => {}
            }
        }
        (echo, lines)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::tests::FakeMachine;
    use crate::fdstore::FdStore;
    use crate::machine::RunState;
    use std::collections::VecDeque;

    fn hmp(m: &mut FakeMachine, fds: &FdStore, line: &str) -> String {
        let mut passed = VecDeque::new();
        let mut ctx = Context {
            machine: m,
            fds,
            passed_fds: &mut passed,
        };
        execute(&mut ctx, line)
    }

    #[test]
    fn info_vsock() {
        let mut m = FakeMachine::new();
        let f = FdStore::new();
        assert_eq!(hmp(&mut m, &f, "info vsock"), "no vsock device\n");
        m.vsock = Some(crate::commands::tests::sample_vsock());
        assert_eq!(
            hmp(&mut m, &f, "info vsock"),
            "vsock0: guest-cid=3 uds=/tmp/v.sock connections=1\n  \
             host->guest host port 1073741824 <-> guest port 5000: established, to-host=7 \
             to-guest=9\n  malformed-packets=2 transport-resets=1\n"
        );
    }

    #[test]
    fn info_and_lifecycle() {
        let mut m = FakeMachine::new();
        let f = FdStore::new();
        assert_eq!(hmp(&mut m, &f, "info status"), "VM status: running\n");
        assert_eq!(hmp(&mut m, &f, "stop"), "");
        assert_eq!(m.state, RunState::Paused);
        assert_eq!(hmp(&mut m, &f, "info status"), "VM status: paused\n");
        assert_eq!(hmp(&mut m, &f, "c"), "");
        assert_eq!(hmp(&mut m, &f, "system_reset"), "");
        assert_eq!(hmp(&mut m, &f, "system_powerdown"), "");
        assert!(hmp(&mut m, &f, "info version").starts_with("7.2.0 (minivmm "));
        assert_eq!(hmp(&mut m, &f, "info name"), "vm1\n");
        assert_eq!(
            hmp(&mut m, &f, "stop now"),
            "Error: extraneous characters at the end of line\n"
        );
        assert_eq!(
            hmp(&mut m, &f, "frobnicate"),
            "unknown command: 'frobnicate'\n"
        );
        assert!(hmp(&mut m, &f, "help").contains("chardev-add args -- add chardev"));
        assert!(hmp(&mut m, &f, "help quit").starts_with("quit|q"));
        assert!(hmp(&mut m, &f, "info").contains("info status"));
        assert_eq!(hmp(&mut m, &f, ""), "");
        assert_eq!(hmp(&mut m, &f, "q"), "");
        assert!(m.quit);
    }

    #[test]
    fn chardevs_and_ports() {
        let mut m = FakeMachine::new();
        let f = FdStore::new();
        assert_eq!(hmp(&mut m, &f, "chardev-add ringbuf,id=rb,size=16"), "");
        assert_eq!(
            hmp(&mut m, &f, "chardev-add null,id=rb"),
            "Error: Chardev with id 'rb' already exists\n"
        );
        assert!(
            hmp(&mut m, &f, "chardev-add bogus,id=x").starts_with("Error: Unknown chardev backend")
        );
        assert!(hmp(&mut m, &f, "info chardev").contains("rb: filename=ringbuf\n"));
        assert_eq!(hmp(&mut m, &f, "ringbuf_write rb hello world"), "");
        assert_eq!(hmp(&mut m, &f, "ringbuf_read rb 100"), "hello world\n");
        assert_eq!(hmp(&mut m, &f, "chardev-send-break rb"), "");
        assert_eq!(hmp(&mut m, &f, "chardev-change rb null"), "");
        assert_eq!(m.registry.list()[0].kind, "null");
        assert_eq!(
            hmp(
                &mut m,
                &f,
                "device_add virtserialport,id=p1,name=org.x.1,chardev=rb"
            ),
            ""
        );
        let tree = hmp(&mut m, &f, "info ports");
        assert!(tree.contains("dev: virtserialport, id \"p1\""), "{tree}");
        assert!(tree.contains("name = \"org.x.1\""));
        assert_eq!(
            hmp(&mut m, &f, "chardev-remove rb"),
            "Error: Chardev 'rb' is busy\n"
        );
        assert_eq!(
            hmp(&mut m, &f, "device_add e1000"),
            "Error: 'e1000' is not a valid device model name\n"
        );
        assert_eq!(hmp(&mut m, &f, "device_del p1"), "");
        assert_eq!(
            hmp(&mut m, &f, "device_del p1"),
            "Error: Device 'p1' not found\n"
        );
        assert_eq!(hmp(&mut m, &f, "chardev-remove rb"), "");
        assert_eq!(
            hmp(&mut m, &f, "chardev-remove"),
            "Error: missing argument 'id'\n"
        );
        assert_eq!(
            hmp(&mut m, &f, "getfd x"),
            "Error: No file descriptor supplied via SCM_RIGHTS\n"
        );
        assert_eq!(hmp(&mut m, &f, "info ports"), "no virtio-serial ports\n");
        let p = hmp(&mut m, &f, "chardev-add pty,id=tty0");
        assert!(p.starts_with("char device redirected to /dev/pts/"), "{p}");
    }

    #[test]
    fn crlf_conversion() {
        assert_eq!(to_crlf("a\nb\n"), "a\r\nb\r\n");
    }

    #[test]
    fn line_editor_handles_terminal_input() {
        let mut e = LineEditor::new();
        let (echo, lines) = e.feed(b"inf\x7ffo status\r\n");
        assert_eq!(lines, vec!["info status".to_string()]);
        assert_eq!(echo, b"inf\x08 \x08fo status\r\n");
        let (_, lines) = e.feed(b"st\x1b[Aop\n\rcont\r");
        assert_eq!(
            lines,
            vec!["stop".to_string(), String::new(), "cont".to_string()]
        );
        let (_, lines) = e.feed(b"\nabc\x15q\r");
        assert_eq!(lines, vec!["q".to_string()]);
        let long = vec![b'a'; MAX_LINE + 10];
        let (echo, _) = e.feed(&long);
        assert_eq!(echo.iter().filter(|&&b| b == BELL).count(), 10);
    }
}
