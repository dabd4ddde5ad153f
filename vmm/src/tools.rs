//! The subcommands that act on running instances rather than start one: `minivmm list`,
//! `minivmm qmp NAME COMMAND [JSON]` and `minivmm console NAME [PORT]`. They find an instance
//! through its runtime directory (`monitor::instance`) and talk to it over its QMP socket or
//! one of its console sockets; they never touch KVM.
//!
//! `main` dispatches here only when the first argument is one of the subcommand names, so the
//! flat `minivmm --kernel ...` command line stays as it is.

use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chardev::term::{RawMode, RawTerminal};
use clap::{Parser, Subcommand};
use monitor::instance::{self, ConsoleInfo, InstanceInfo};
use thiserror::Error;

/// The subcommand names `main` dispatches on.
pub const SUBCOMMANDS: [&str; 4] = ["list", "qmp", "console", "relay"];
/// How long `minivmm qmp` waits for the greeting and the answer.
const QMP_TIMEOUT: Duration = Duration::from_secs(30);
/// The byte that detaches `minivmm console` (Ctrl-]), as in telnet and virsh.
pub const DETACH_BYTE: u8 = 0x1d;
/// Read size of the console relay.
const RELAY_CHUNK: usize = 4096;

/// Commands on running instances.
#[derive(Parser, Debug)]
#[command(name = "minivmm", version, about = "Act on running minivmm instances")]
pub struct ToolCli {
    /// What to do.
    #[command(subcommand)]
    pub command: Tool,
}

/// One subcommand.
#[derive(Subcommand, Debug)]
pub enum Tool {
    /// List the running instances (and remove the runtime directories of dead ones).
    List,
    /// Run one QMP command on an instance and print its answer as JSON.
    Qmp {
        /// The instance name.
        name: String,
        /// The QMP command, e.g. query-status.
        command: String,
        /// The arguments: a JSON object.
        arguments: Option<String>,
    },
    /// Attach this terminal to a socket or pty console of an instance; Ctrl-] detaches.
    Console {
        /// The instance name.
        name: String,
        /// The console (`serial0`, a virtio port name, or its chardev id); default: the first.
        port: Option<String>,
    },
    /// Join two chardevs through minivmm's event loop, with no guest (a host-side vproxy, a
    /// socket to a pty, ...), until SIGINT or SIGTERM; prints what moved.
    Relay {
        /// A chardev, in `--chardev` syntax; give exactly two.
        #[arg(long = "chardev", value_name = "SPEC", required = true)]
        chardevs: Vec<String>,
        /// The event loop's seccomp filter once both chardevs are open (as minivmm's
        /// `--seccomp`).
        #[arg(long, value_name = "on|off|log", default_value = "on")]
        seccomp: crate::seccomp::SeccompMode,
    },
}

/// A failed subcommand.
#[derive(Debug, Error)]
pub enum ToolError {
    /// Finding or listing instances failed.
    #[error(transparent)]
    Instance(#[from] monitor::InstanceError),
    /// The instance has no QMP socket recorded.
    #[error("instance '{0}' has no QMP socket")]
    NoQmp(String),
    /// The QMP exchange failed.
    #[error("instance '{name}'")]
    Client {
        /// The instance.
        name: String,
        /// Why.
        #[source]
        source: monitor::ClientError,
    },
    /// The arguments are not a JSON object.
    #[error("arguments: {0}")]
    Arguments(String),
    /// The command failed: the QMP error.
    #[error("{command}: {class}: {desc}")]
    Qmp {
        /// The command.
        command: String,
        /// The error class.
        class: String,
        /// The description.
        desc: String,
    },
    /// No such console.
    #[error("instance '{name}' has no console '{port}' (it has: {have})")]
    NoConsole {
        /// The instance.
        name: String,
        /// What was asked for.
        port: String,
        /// What there is.
        have: String,
    },
    /// The instance has no socket or pty console.
    #[error("instance '{0}' has no socket or pty console")]
    NoConsoles(String),
    /// Terminal or socket I/O failed.
    #[error("console: cannot {0}")]
    Io(&'static str, #[source] io::Error),
    /// A relay chardev does not parse.
    #[error("--chardev: {0}")]
    Spec(#[from] chardev::SpecError),
    /// The relay failed.
    #[error(transparent)]
    Relay(#[from] crate::relay::RelayError),
}

/// Run a subcommand.
pub fn run(tool: Tool) -> Result<(), ToolError> {
    let root = instance::runtime_root();
    match tool {
        Tool::List => list(&root, &mut io::stdout().lock()),
        Tool::Qmp {
            name,
            command,
            arguments,
        } => {
            let answer = qmp(&root, &name, &command, arguments.as_deref())?;
            let text = serde_json::to_string_pretty(&answer).unwrap_or_default();
            println!("{text}");
            Ok(())
        }
        Tool::Console { name, port } => console(&root, &name, port.as_deref()),
        Tool::Relay { chardevs, seccomp } => {
            let specs = chardevs
                .iter()
                .map(|s| chardev::ChardevSpec::parse(s))
                .collect::<Result<Vec<_>, _>>()?;
            let stats = crate::relay::run(&specs, seccomp)?;
            eprintln!(
                "minivmm relay: events {} bytes {}->{} {} {}->{} {}",
                stats.events,
                specs[0].id,
                specs[1].id,
                stats.bytes_ab,
                specs[1].id,
                specs[0].id,
                stats.bytes_ba
            );
            Ok(())
        }
    }
}

/// `minivmm list`: remove stale instances, then print a table of the live ones.
pub fn list(root: &Path, out: &mut dyn Write) -> Result<(), ToolError> {
    for gone in instance::remove_stale(root)? {
        log::info!("removed the stale instance directory of '{gone}'");
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let mut rows = vec![[
        "NAME".to_string(),
        "PID".to_string(),
        "UUID".to_string(),
        "UP".to_string(),
        "CONSOLES".to_string(),
        "QMP".to_string(),
    ]];
    for inst in instance::list(root)? {
        let Some(info) = inst.info.filter(|_| inst.alive) else {
            continue;
        };
        rows.push(row(&info, now));
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    for r in &rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            if c + 1 == r.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  ", w = widths[c]));
            }
        }
        writeln!(out, "{}", line.trim_end()).map_err(|e| ToolError::Io("write the list", e))?;
    }
    Ok(())
}

fn row(info: &InstanceInfo, now: u64) -> [String; 6] {
    let consoles: Vec<&str> = info.consoles.iter().map(|c| c.name.as_str()).collect();
    [
        info.name.clone(),
        info.pid.to_string(),
        info.uuid.clone(),
        uptime(now.saturating_sub(info.start_time)),
        if consoles.is_empty() {
            "-".to_string()
        } else {
            consoles.join(",")
        },
        info.qmp
            .as_ref()
            .map_or_else(|| "-".to_string(), |p| p.display().to_string()),
    ]
}

/// `42s`, `5m03s`, `2h04m`, `3d01h`.
pub fn uptime(secs: u64) -> String {
    const MIN: u64 = 60;
    const HOUR: u64 = 60 * MIN;
    const DAY: u64 = 24 * HOUR;
    match secs {
        s if s < MIN => format!("{s}s"),
        s if s < HOUR => format!("{}m{:02}s", s / MIN, s % MIN),
        s if s < DAY => format!("{}h{:02}m", s / HOUR, s % HOUR / MIN),
        s => format!("{}d{:02}h", s / DAY, s % DAY / HOUR),
    }
}

/// `minivmm qmp`: run `command` on instance `name`; returns the `return` value.
pub fn qmp(
    root: &Path,
    name: &str,
    command: &str,
    arguments: Option<&str>,
) -> Result<serde_json::Value, ToolError> {
    let arguments = match arguments {
        None => None,
        Some(text) => {
            let v: serde_json::Value =
                serde_json::from_str(text).map_err(|e| ToolError::Arguments(e.to_string()))?;
            if !v.is_object() {
                return Err(ToolError::Arguments("not a JSON object".into()));
            }
            Some(v)
        }
    };
    let info = instance::find(root, name)?;
    let socket = info.qmp.ok_or_else(|| ToolError::NoQmp(name.to_string()))?;
    let mut answer =
        monitor::qmp_command(&socket, command, arguments, QMP_TIMEOUT).map_err(|source| {
            ToolError::Client {
                name: name.to_string(),
                source,
            }
        })?;
    if let Some(err) = answer.get("error") {
        return Err(ToolError::Qmp {
            command: command.to_string(),
            class: err["class"].as_str().unwrap_or("GenericError").to_string(),
            desc: err["desc"].as_str().unwrap_or_default().to_string(),
        });
    }
    Ok(answer
        .get_mut("return")
        .map(serde_json::Value::take)
        .unwrap_or_default())
}

/// Pick the console `port` (by name or chardev id), or the first one.
pub fn pick_console<'a>(
    name: &str,
    consoles: &'a [ConsoleInfo],
    port: Option<&str>,
) -> Result<&'a ConsoleInfo, ToolError> {
    let usable = || consoles.iter().filter(|c| c.path.is_some());
    match port {
        None => usable()
            .next()
            .ok_or_else(|| ToolError::NoConsoles(name.to_string())),
        Some(p) => usable()
            .find(|c| c.name == p || c.chardev == p)
            .ok_or_else(|| ToolError::NoConsole {
                name: name.to_string(),
                port: p.to_string(),
                have: usable()
                    .map(|c| c.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
    }
}

/// `minivmm console`: relay this terminal to the console until Ctrl-], end of input or the
/// console closing.
pub fn console(root: &Path, name: &str, port: Option<&str>) -> Result<(), ToolError> {
    let info = instance::find(root, name)?;
    let target = pick_console(name, &info.consoles, port)?;
    let path = target.path.clone().unwrap_or_default();
    let mut conn: Box<dyn ReadWriteFd> = if target.kind == "pty" {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(&path)
            .map_err(|e| ToolError::Io("open the pty", e))?;
        Box::new(f)
    } else {
        Box::new(UnixStream::connect(&path).map_err(|e| ToolError::Io("connect", e))?)
    };
    // Raw while relaying; a no-op when stdin is no terminal.
    let _raw = RawTerminal::enter(libc::STDIN_FILENO, RawMode::default()).ok();
    eprint!(
        "minivmm: connected to {name} {} ({}); Ctrl-] detaches\r\n",
        target.name,
        path.display()
    );
    let result = relay(libc::STDIN_FILENO, &mut *conn, &mut io::stdout().lock());
    eprint!("\r\nminivmm: detached\r\n");
    result
}

/// A readable, writable fd (a socket or a pty).
trait ReadWriteFd: Read + Write + AsRawFd {}
impl<T: Read + Write + AsRawFd> ReadWriteFd for T {}

/// Copy `input` (an fd) to `conn` and `conn` to `out` until the detach byte, end of input or
/// the connection closing.
fn relay(input: RawFd, conn: &mut dyn ReadWriteFd, out: &mut dyn Write) -> Result<(), ToolError> {
    let mut buf = [0u8; RELAY_CHUNK];
    loop {
        let mut fds = [
            libc::pollfd {
                fd: input,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: conn.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a live array of two pollfds and its length is passed with it.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(ToolError::Io("poll", e));
        }
        if fds[1].revents != 0 {
            match conn.read(&mut buf) {
                // A pty whose other side is gone reads EIO.
                Ok(0) | Err(_) => return Ok(()),
                Ok(k) => {
                    out.write_all(&buf[..k])
                        .and_then(|()| out.flush())
                        .map_err(|e| ToolError::Io("write to the terminal", e))?;
                }
            }
        }
        if fds[0].revents != 0 {
            // SAFETY: reading into a local buffer of the given length from an fd we poll.
            let k = unsafe { libc::read(input, buf.as_mut_ptr().cast(), buf.len()) };
            if k <= 0 {
                return Ok(());
            }
            let data = &buf[..k as usize];
            let (data, detach) = match data.iter().position(|&b| b == DETACH_BYTE) {
                Some(i) => (&data[..i], true),
                None => (data, false),
            };
            conn.write_all(data)
                .map_err(|e| ToolError::Io("write to the console", e))?;
            if detach {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn console(name: &str, chardev: &str, path: Option<&str>) -> ConsoleInfo {
        ConsoleInfo {
            name: name.into(),
            chardev: chardev.into(),
            kind: "socket".into(),
            path: path.map(Into::into),
        }
    }

    #[test]
    fn uptime_reads_well() {
        assert_eq!(uptime(42), "42s");
        assert_eq!(uptime(303), "5m03s");
        assert_eq!(uptime(2 * 3600 + 4 * 60 + 9), "2h04m");
        assert_eq!(uptime(3 * 86400 + 3600), "3d01h");
    }

    #[test]
    fn consoles_are_picked_by_name_or_chardev() {
        let c = [
            console("serial0", "s0", Some("/a")),
            console("org.x.1", "p1", Some("/b")),
            console("gone", "g", None),
        ];
        assert_eq!(pick_console("vm", &c, None).unwrap().name, "serial0");
        assert_eq!(pick_console("vm", &c, Some("p1")).unwrap().name, "org.x.1");
        let e = pick_console("vm", &c, Some("nope")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "instance 'vm' has no console 'nope' (it has: serial0, org.x.1)"
        );
        assert!(pick_console("vm", &c[2..], None).is_err());
    }

    #[test]
    fn relay_stops_at_the_detach_byte() {
        let (mut ours, theirs) = UnixStream::pair().unwrap();
        let (input_w, input_r) = UnixStream::pair().unwrap();
        let mut theirs = theirs;
        ours.write_all(b"from the guest").unwrap();
        (&input_w).write_all(b"typed\x1dlost").unwrap();
        let mut out = Vec::new();
        relay(input_r.as_raw_fd(), &mut theirs, &mut out).unwrap();
        let mut got = [0u8; 5];
        ours.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"typed");
        ours.set_nonblocking(true).unwrap();
        assert!(
            ours.read(&mut [0u8; 8]).is_err(),
            "bytes after Ctrl-] were sent"
        );
        // Both fds were ready on the first poll; the console side is read first.
        assert_eq!(out, b"from the guest");
    }

    #[test]
    fn list_prints_live_instances_and_drops_stale_ones() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("minivmm");
        let live = monitor::Instance::create(&monitor::InstanceConfig {
            name: Some("web".into()),
            uuid: None,
            root: Some(root.clone()),
        })
        .unwrap();
        let mut out = Vec::new();
        list(&root, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("NAME"), "{text}");
        assert!(lines[1].starts_with("web "), "{text}");
        assert!(lines[1].contains(&std::process::id().to_string()));
        drop(live);
    }
}
