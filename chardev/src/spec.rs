//! The `--chardev` and `--serial` option parser.
//!
//! `--chardev BACKEND,id=ID[,opt=val...]` follows QEMU's syntax so people's habits carry over:
//! options are comma separated, `,,` is a literal comma inside a value, booleans are `on`/`off`
//! (also `yes`/`no`/`true`/`false`, a bare `opt` meaning on and QEMU's legacy `noopt` meaning
//! off), sizes take `K`/`M`/`G` suffixes. The result is a typed [`ChardevSpec`] whose
//! [`Display`](std::fmt::Display) prints it back in canonical form (`parse(spec.to_string())`
//! gives the same spec).
//!
//! `--serial` takes the short forms of [`parse_serial`]: `stdio`, `file:PATH`,
//! `unix:PATH[,opts]`, `tcp:HOST:PORT[,opts]`, `pty`, `null`, `none`, `chardev:ID`, plus QEMU's
//! `pipe:PATH`, `udp:[HOST]:PORT[@[LOCALADDR]:LOCALPORT]`, `mon:FORM` and `/dev/...` (a host tty).
//!
//! Backend kinds that live in other crates (vproxy) register themselves with
//! [`register_kind`]: the parser then hands them their options ([`BackendKind::parse`]) and
//! keeps them as an [`ExtensionSpec`], and [`crate::create`] asks the kind to open one. The
//! core knows none of them by name.
//!
//! This module only parses and validates; it opens nothing.

use std::fmt;
use std::os::unix::io::RawFd;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::RwLock;

use crate::backend::Backend;
use crate::error::{quote, SpecError};

/// Default size of a `ringbuf` chardev.
pub const DEFAULT_RINGBUF_SIZE: usize = 64 * 1024;
/// Largest `ringbuf` `size=`.
pub const MAX_RINGBUF_SIZE: usize = 1 << 30;
/// Default replay ring (`backlog=`) of socket and pty chardevs.
pub const DEFAULT_BACKLOG: usize = 64 * 1024;
/// Largest `backlog=`.
pub const MAX_BACKLOG: usize = 1 << 30;
/// Longest chardev id.
pub const MAX_ID_LEN: usize = 127;

/// One chardev as given on the command line or to `chardev-add`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChardevSpec {
    /// The chardev's id (`id=`).
    pub id: String,
    /// The backend and its options.
    pub backend: BackendSpec,
    /// `logfile=` / `logappend=`: a copy of everything the guest wrote.
    pub log: Option<LogSpec>,
    /// `mux=on`: register `ID-base` with this backend and a mux `ID` on top of it.
    pub mux: bool,
}

/// `logfile=PATH[,logappend=on]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSpec {
    /// The log file.
    pub path: PathBuf,
    /// Append instead of truncating.
    pub append: bool,
}

/// A backend and its options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendSpec {
    /// `null`: output discarded, no input.
    Null,
    /// `file`.
    File(FileSpec),
    /// `stdio`.
    Stdio(StdioSpec),
    /// `socket`.
    Socket(SocketSpec),
    /// `pty`.
    Pty(PtySpec),
    /// `ringbuf` (alias `memory`).
    Ringbuf(RingbufSpec),
    /// `pipe`.
    Pipe(PipeSpec),
    /// `udp`.
    Udp(UdpSpec),
    /// `serial` (alias `tty`): a host tty.
    Serial(SerialSpec),
    /// `mux`: several frontends on the chardev named by `chardev=`.
    Mux(MuxSpec),
    /// A backend kind registered by another crate ([`register_kind`]).
    Extension(ExtensionSpec),
}

/// `file,path=OUT[,append=on][,input-path=IN]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSpec {
    /// Where output goes.
    pub path: PathBuf,
    /// Append instead of truncating.
    pub append: bool,
    /// Where input comes from, if anywhere.
    pub input_path: Option<PathBuf>,
}

/// `stdio[,signal=on|off]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StdioSpec {
    /// Keep ISIG so ^C reaches minivmm (default on).
    pub signal: bool,
}

/// Where a socket chardev listens or connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocketAddrSpec {
    /// `path=`, with `abstract=on` for the abstract namespace.
    Unix {
        /// The socket path (or abstract name).
        path: PathBuf,
        /// Linux abstract namespace: no file is created.
        abstract_ns: bool,
    },
    /// `host=` and `port=`.
    Tcp {
        /// Host name or address; empty means any (server) or localhost (client).
        host: String,
        /// The port; 0 lets a server pick one.
        port: u16,
    },
    /// `fd=N`: an inherited listening or connected socket.
    Fd(RawFd),
    /// `fd=NAME`: an fd passed over the monitor (`getfd`); the monitor resolves it.
    FdName(String),
}

/// `socket,...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketSpec {
    /// The address.
    pub addr: SocketAddrSpec,
    /// Listen (`server=on`) rather than connect.
    pub server: bool,
    /// A server waits for its first client before the guest starts (default on for servers).
    pub wait: bool,
    /// TCP_NODELAY (`nodelay=on`, or QEMU's `delay=off`).
    pub nodelay: bool,
    /// Client reconnect delay in ms (0: no reconnect).
    pub reconnect_ms: u64,
    /// Replay ring size while no peer is connected (`backlog=`, 0 drops).
    pub backlog: usize,
}

/// `pty[,path=LINK]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PtySpec {
    /// A stable symlink to the allocated `/dev/pts/N`.
    pub path: Option<PathBuf>,
    /// Replay ring size while the pty is not open (`backlog=`, 0 drops).
    pub backlog: usize,
}

/// `ringbuf[,size=N]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RingbufSpec {
    /// Ring size, a power of two.
    pub size: usize,
}

/// `pipe,path=P`: `P.in`/`P.out` if they exist, else `P` both ways.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipeSpec {
    /// The pipe path prefix.
    pub path: PathBuf,
}

/// `udp,host=H,port=P[,localaddr=A][,localport=Q]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpSpec {
    /// Remote host (default localhost).
    pub host: String,
    /// Remote port.
    pub port: u16,
    /// Local address (empty: any).
    pub localaddr: String,
    /// Local port (0: any).
    pub localport: u16,
}

/// `serial,path=/dev/ttyS0`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SerialSpec {
    /// The host tty.
    pub path: PathBuf,
}

/// `mux,chardev=BASE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MuxSpec {
    /// The id of the chardev the frontends share.
    pub chardev: String,
}

/// A chardev of a kind registered by another crate: its options as the kind canonicalized them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtensionSpec {
    /// The kind's name (`vproxy`).
    pub kind: &'static str,
    /// `(key, value)` options in canonical form and order.
    pub options: Vec<(String, String)>,
}

/// A backend kind that lives outside this crate.
pub trait BackendKind: Sync {
    /// Its name in `--chardev NAME,...`.
    fn name(&self) -> &'static str;

    /// Options that may be given more than once (every occurrence counts); any other given
    /// twice is refused.
    fn repeatable(&self) -> &'static [&'static str] {
        &[]
    }

    /// Read its own options from `o` (what it leaves unread is refused as unknown) and return
    /// them in canonical form: parsing the printed form again must give the same.
    fn parse(&self, o: &mut Opts) -> Result<Vec<(String, String)>, SpecError>;

    /// Open a backend from canonical options.
    fn create(&self, id: &str, options: &[(String, String)]) -> crate::Result<Box<dyn Backend>>;
}

static KINDS: RwLock<Vec<&'static dyn BackendKind>> = RwLock::new(Vec::new());

/// Make `kind` known to the parser and to [`crate::create`] (again: nothing happens).
pub fn register_kind(kind: &'static dyn BackendKind) {
    let mut kinds = KINDS.write().unwrap_or_else(|p| p.into_inner());
    if !kinds.iter().any(|k| k.name() == kind.name()) {
        kinds.push(kind);
    }
}

/// The registered kind called `name`.
pub fn backend_kind(name: &str) -> Option<&'static dyn BackendKind> {
    let kinds = KINDS.read().unwrap_or_else(|p| p.into_inner());
    kinds.iter().find(|k| k.name() == name).copied()
}

/// Every backend name `--chardev` accepts, canonical first (QMP's `query-chardev-backends`),
/// registered kinds included.
pub fn backend_names() -> Vec<&'static str> {
    let mut names = BACKEND_NAMES.to_vec();
    let kinds = KINDS.read().unwrap_or_else(|p| p.into_inner());
    names.extend(kinds.iter().map(|k| k.name()));
    names
}

/// What `--serial` resolved to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialArg {
    /// `none`: no backend, the UART is not created.
    None,
    /// `chardev:ID`: use a chardev defined with `--chardev`.
    Chardev(String),
    /// A new chardev.
    Spec(ChardevSpec),
}

impl BackendSpec {
    /// The backend's canonical name (`socket`, `pty`, ...).
    pub fn kind(&self) -> &'static str {
        match self {
            BackendSpec::Null => "null",
            BackendSpec::File(_) => "file",
            BackendSpec::Stdio(_) => "stdio",
            BackendSpec::Socket(_) => "socket",
            BackendSpec::Pty(_) => "pty",
            BackendSpec::Ringbuf(_) => "ringbuf",
            BackendSpec::Pipe(_) => "pipe",
            BackendSpec::Udp(_) => "udp",
            BackendSpec::Serial(_) => "serial",
            BackendSpec::Mux(_) => "mux",
            BackendSpec::Extension(e) => e.kind,
        }
    }
}

/// The built-in backend names `--chardev` accepts, canonical first; see [`backend_names`].
pub const BACKEND_NAMES: &[&str] = &[
    "null", "file", "stdio", "socket", "pty", "ringbuf", "pipe", "udp", "serial", "mux", "memory",
    "tty",
];

/// Whether `id` is a valid chardev id: a letter, then letters, digits, `-`, `.`, `_`.
pub fn is_valid_id(id: &str) -> bool {
    let mut chars = id.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        && id.len() <= MAX_ID_LEN
}

/// Split an option string at single commas; `,,` is a literal comma. Shared with the other
/// QEMU-style options of the command line (`--device`).
pub fn split_options(s: &str) -> Vec<String> {
    split_opts(s)
}

/// Split an option string at single commas; `,,` is a literal comma.
fn split_opts(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                out.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    out.push(cur);
    out
}

/// Escape a value for an option string: `,` becomes `,,`.
fn escape(value: &str) -> String {
    value.replace(',', ",,")
}

/// One `key[=value]` item.
#[derive(Debug)]
struct Item {
    key: String,
    value: Option<String>,
    used: bool,
}

/// The options of one chardev, consumed by the backend builders; whatever is left unused at
/// the end is an unknown option.
#[derive(Debug)]
/// The options of one chardev spec as they are read: a backend kind of another crate reads
/// its own from it ([`BackendKind::parse`]).
pub struct Opts {
    id: String,
    items: Vec<Item>,
}

impl Opts {
    /// Build from `key[=value]` tokens, rejecting empty tokens and duplicate keys, and pull
    /// out `id`.
    pub fn new(backend: &str, tokens: &[String], id: Option<String>) -> Result<Opts, SpecError> {
        let mut items: Vec<Item> = Vec::with_capacity(tokens.len());
        for t in tokens {
            let (key, value) = match t.split_once('=') {
                Some((k, v)) => (k.to_string(), Some(v.to_string())),
                None => (t.clone(), None),
            };
            items.push(Item {
                key,
                value,
                used: false,
            });
        }
        // The id goes into every later message, so find it before complaining about anything.
        let found_id = items
            .iter()
            .find(|i| i.key == "id")
            .map(|i| i.value.clone().unwrap_or_default());
        let id = match (found_id, id) {
            (Some(i), None) => i,
            (None, Some(i)) => i,
            (Some(_), Some(given)) => {
                return Err(SpecError::UnknownOption {
                    id: given,
                    option: "id".into(),
                })
            }
            (None, None) => {
                return Err(SpecError::MissingId {
                    backend: quote(backend),
                })
            }
        };
        if !is_valid_id(&id) {
            return Err(SpecError::BadId(quote(&id)));
        }
        for (n, item) in items.iter().enumerate() {
            if item.key.is_empty() {
                return Err(SpecError::EmptyOption { id });
            }
            let repeatable =
                backend_kind(backend).is_some_and(|k| k.repeatable().contains(&item.key.as_str()));
            if !repeatable && items[..n].iter().any(|i| i.key == item.key) {
                return Err(SpecError::DuplicateOption {
                    id,
                    option: quote(&item.key),
                });
            }
        }
        if let Some(item) = items.iter_mut().find(|i| i.key == "id") {
            item.used = true;
        }
        Ok(Opts { id, items })
    }

    fn find(&mut self, key: &str) -> Option<&mut Item> {
        self.items.iter_mut().find(|i| i.key == key && !i.used)
    }

    /// The chardev's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The error for a bad `value` of `option`.
    pub fn bad(&self, option: &str, value: &str, expected: &'static str) -> SpecError {
        SpecError::BadValue {
            id: self.id.clone(),
            option: option.to_string(),
            value: quote(value),
            expected,
        }
    }

    /// A string option (the next unread one, for an option that may repeat).
    pub fn string(&mut self, key: &str) -> Result<Option<String>, SpecError> {
        let id = self.id.clone();
        match self.find(key) {
            None => Ok(None),
            Some(item) => {
                item.used = true;
                match item.value.clone() {
                    Some(v) => Ok(Some(v)),
                    None => Err(SpecError::MissingValue {
                        id,
                        option: key.to_string(),
                    }),
                }
            }
        }
    }

    /// A non-empty path option.
    fn path(&mut self, key: &str) -> Result<Option<PathBuf>, SpecError> {
        match self.string(key)? {
            Some(v) if v.is_empty() => Err(self.bad(key, &v, "a path")),
            Some(v) => Ok(Some(PathBuf::from(v))),
            None => Ok(None),
        }
    }

    /// A required non-empty path option.
    fn required_path(&mut self, key: &'static str) -> Result<PathBuf, SpecError> {
        self.path(key)?.ok_or_else(|| SpecError::MissingOption {
            id: self.id.clone(),
            option: key,
        })
    }

    /// A boolean: `key=on|off|yes|no|true|false`, bare `key` (on) or legacy `nokey` (off).
    fn boolean(&mut self, key: &str) -> Result<Option<bool>, SpecError> {
        if let Some(item) = self.find(key) {
            item.used = true;
            let v = item.value.clone();
            return match v.as_deref() {
                None | Some("on") | Some("yes") | Some("true") => Ok(Some(true)),
                Some("off") | Some("no") | Some("false") => Ok(Some(false)),
                Some(other) => Err(self.bad(key, other, "on or off")),
            };
        }
        let negated = format!("no{key}");
        if let Some(item) = self.find(&negated) {
            if item.value.is_none() {
                item.used = true;
                return Ok(Some(false));
            }
        }
        Ok(None)
    }

    /// An unsigned number with optional `K`/`M`/`G` suffix, at most `max`.
    pub fn size(
        &mut self,
        key: &str,
        max: u64,
        expected: &'static str,
    ) -> Result<Option<u64>, SpecError> {
        let Some(v) = self.string(key)? else {
            return Ok(None);
        };
        match parse_size(&v) {
            Some(n) if n <= max => Ok(Some(n)),
            _ => Err(self.bad(key, &v, expected)),
        }
    }

    /// A plain number parsed as `T`.
    fn number<T: FromStr>(
        &mut self,
        key: &str,
        expected: &'static str,
    ) -> Result<Option<T>, SpecError> {
        let Some(v) = self.string(key)? else {
            return Ok(None);
        };
        if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
            return Err(self.bad(key, &v, expected));
        }
        v.parse::<T>()
            .map(Some)
            .map_err(|_| self.bad(key, &v, expected))
    }

    fn conflict(&self, option: &'static str, reason: &'static str) -> SpecError {
        SpecError::Conflict {
            id: self.id.clone(),
            option,
            reason,
        }
    }

    /// Fail on the first option nobody consumed; returns the id.
    pub fn finish(self) -> Result<String, SpecError> {
        if let Some(item) = self.items.iter().find(|i| !i.used) {
            return Err(SpecError::UnknownOption {
                id: self.id,
                option: quote(&item.key),
            });
        }
        Ok(self.id)
    }
}

/// Parse `123`, `64K`, `1M`, `2G` (binary multiples).
fn parse_size(s: &str) -> Option<u64> {
    let (digits, shift) = match s.as_bytes().last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 10),
        b'm' | b'M' => (&s[..s.len() - 1], 20),
        b'g' | b'G' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    n.checked_mul(1u64 << shift)
}

/// Canonical backend name for a name or alias.
fn canonical_backend(name: &str) -> Option<&'static str> {
    Some(match name {
        "null" => "null",
        "file" => "file",
        "stdio" => "stdio",
        "socket" => "socket",
        "pty" => "pty",
        "ringbuf" | "memory" => "ringbuf",
        "pipe" => "pipe",
        "udp" => "udp",
        "serial" | "tty" => "serial",
        "mux" => "mux",
        other => return backend_kind(other).map(|k| k.name()),
    })
}

fn backlog(o: &mut Opts) -> Result<usize, SpecError> {
    Ok(o.size("backlog", MAX_BACKLOG as u64, "a size up to 1G")?
        .map_or(DEFAULT_BACKLOG, |n| n as usize))
}

fn build_socket(o: &mut Opts) -> Result<SocketSpec, SpecError> {
    let path = o.path("path")?;
    let host = o.string("host")?;
    let port = o.number::<u16>("port", "a port number")?;
    let fd = o.string("fd")?;
    let abstract_ns = o.boolean("abstract")?.unwrap_or(false);
    let server = o.boolean("server")?.unwrap_or(false);
    let wait = o.boolean("wait")?;
    let nodelay = match (o.boolean("nodelay")?, o.boolean("delay")?) {
        (Some(_), Some(_)) => return Err(o.conflict("delay", "conflicts with 'nodelay'")),
        (Some(n), None) => n,
        (None, Some(d)) => !d,
        (None, None) => false,
    };
    let reconnect_ms = o
        .number::<u64>("reconnect-ms", "milliseconds")?
        .unwrap_or(0);
    let backlog = backlog(o)?;

    let addr = match (path, port, fd) {
        (Some(path), None, None) => {
            if host.is_some() {
                return Err(o.conflict("host", "conflicts with 'path'"));
            }
            SocketAddrSpec::Unix { path, abstract_ns }
        }
        (None, Some(port), None) => SocketAddrSpec::Tcp {
            host: host.unwrap_or_default(),
            port,
        },
        (None, None, Some(fd)) => {
            if host.is_some() {
                return Err(o.conflict("host", "conflicts with 'fd'"));
            }
            if !fd.is_empty() && fd.bytes().all(|b| b.is_ascii_digit()) {
                match fd.parse::<RawFd>() {
                    Ok(n) => SocketAddrSpec::Fd(n),
                    Err(_) => return Err(o.bad("fd", &fd, "an fd number or name")),
                }
            } else if is_valid_id(&fd) {
                SocketAddrSpec::FdName(fd)
            } else {
                return Err(o.bad("fd", &fd, "an fd number or name"));
            }
        }
        (None, None, None) if host.is_some() => {
            return Err(SpecError::MissingOption {
                id: o.id.clone(),
                option: "port",
            })
        }
        (None, None, None) => {
            return Err(SpecError::MissingOption {
                id: o.id.clone(),
                option: "path",
            })
        }
        (Some(_), Some(_), _) => return Err(o.conflict("port", "conflicts with 'path'")),
        (_, _, Some(_)) => return Err(o.conflict("fd", "conflicts with 'path' and 'port'")),
    };
    if abstract_ns && !matches!(addr, SocketAddrSpec::Unix { .. }) {
        return Err(o.conflict("abstract", "needs 'path'"));
    }
    if nodelay && matches!(addr, SocketAddrSpec::Unix { .. }) {
        return Err(o.conflict("nodelay", "needs a tcp socket"));
    }
    if wait == Some(true) && !server {
        return Err(o.conflict("wait", "needs server=on"));
    }
    if reconnect_ms > 0 && server {
        return Err(o.conflict("reconnect-ms", "needs server=off"));
    }
    if reconnect_ms > 0 && matches!(addr, SocketAddrSpec::Fd(_) | SocketAddrSpec::FdName(_)) {
        return Err(o.conflict("reconnect-ms", "cannot be used with 'fd'"));
    }
    Ok(SocketSpec {
        addr,
        server,
        wait: server && wait.unwrap_or(true),
        nodelay,
        reconnect_ms,
        backlog,
    })
}

fn build_udp(o: &mut Opts) -> Result<UdpSpec, SpecError> {
    let host = o.string("host")?.unwrap_or_else(|| "localhost".to_string());
    let port =
        o.number::<u16>("port", "a port number")?
            .ok_or_else(|| SpecError::MissingOption {
                id: o.id.clone(),
                option: "port",
            })?;
    let localaddr = o.string("localaddr")?.unwrap_or_default();
    let localport = o.number::<u16>("localport", "a port number")?.unwrap_or(0);
    if host.is_empty() {
        return Err(o.bad("host", &host, "a host name"));
    }
    Ok(UdpSpec {
        host,
        port,
        localaddr,
        localport,
    })
}

/// Every `key=` forward, parsed with `parse`; names must differ.
/// Build a spec for `backend` from `key[=value]` tokens. `id` comes from the tokens unless
/// given (the `--serial` forms name their chardev themselves).
fn build(backend: &str, tokens: &[String], id: Option<String>) -> Result<ChardevSpec, SpecError> {
    let kind =
        canonical_backend(backend).ok_or_else(|| SpecError::UnknownBackend(quote(backend)))?;
    let mut o = Opts::new(backend, tokens, id)?;
    let spec = match kind {
        "null" => BackendSpec::Null,
        "file" => BackendSpec::File(FileSpec {
            path: o.required_path("path")?,
            append: o.boolean("append")?.unwrap_or(false),
            input_path: o.path("input-path")?,
        }),
        "stdio" => BackendSpec::Stdio(StdioSpec {
            signal: o.boolean("signal")?.unwrap_or(true),
        }),
        "socket" => BackendSpec::Socket(build_socket(&mut o)?),
        "pty" => BackendSpec::Pty(PtySpec {
            path: o.path("path")?,
            backlog: backlog(&mut o)?,
        }),
        "ringbuf" => {
            let size = o
                .size("size", MAX_RINGBUF_SIZE as u64, "a power of two up to 1G")?
                .map_or(DEFAULT_RINGBUF_SIZE, |n| n as usize);
            if !size.is_power_of_two() {
                return Err(o.bad("size", &size.to_string(), "a power of two up to 1G"));
            }
            BackendSpec::Ringbuf(RingbufSpec { size })
        }
        "pipe" => BackendSpec::Pipe(PipeSpec {
            path: o.required_path("path")?,
        }),
        "udp" => BackendSpec::Udp(build_udp(&mut o)?),
        "serial" => BackendSpec::Serial(SerialSpec {
            path: o.required_path("path")?,
        }),
        "mux" => {
            let chardev = o
                .string("chardev")?
                .ok_or_else(|| SpecError::MissingOption {
                    id: o.id.clone(),
                    option: "chardev",
                })?;
            if !is_valid_id(&chardev) {
                return Err(o.bad("chardev", &chardev, "a chardev id"));
            }
            BackendSpec::Mux(MuxSpec { chardev })
        }
        other => match backend_kind(other) {
            Some(k) => BackendSpec::Extension(ExtensionSpec {
                kind: k.name(),
                options: k.parse(&mut o)?,
            }),
            None => return Err(SpecError::UnknownBackend(quote(other))),
        },
    };
    let logfile = o.path("logfile")?;
    let logappend = o.boolean("logappend")?;
    let mux = o.boolean("mux")?.unwrap_or(false);
    let log = match (logfile, logappend) {
        (Some(path), append) => Some(LogSpec {
            path,
            append: append.unwrap_or(false),
        }),
        (None, Some(_)) => return Err(o.conflict("logappend", "needs 'logfile'")),
        (None, None) => None,
    };
    if mux && matches!(spec, BackendSpec::Mux(_)) {
        return Err(o.conflict("mux", "cannot be used on a mux"));
    }
    let id = o.finish()?;
    Ok(ChardevSpec {
        id,
        backend: spec,
        log,
        mux,
    })
}

impl ChardevSpec {
    /// Parse `BACKEND,id=ID[,opt=val...]` (the `--chardev` argument).
    pub fn parse(s: &str) -> Result<ChardevSpec, SpecError> {
        if s.is_empty() {
            return Err(SpecError::Empty);
        }
        let tokens = split_opts(s);
        let backend = &tokens[0];
        if backend.contains('=') {
            return Err(SpecError::UnknownBackend(quote(backend)));
        }
        build(backend, &tokens[1..], None)
    }

    /// The spec of the base chardev that `mux=on` registers under `ID-base`.
    pub fn mux_base_id(&self) -> String {
        format!("{}-base", self.id)
    }
}

impl FromStr for ChardevSpec {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ChardevSpec::parse(s)
    }
}

/// Writes `,key=value` with the value escaped.
fn opt(f: &mut fmt::Formatter<'_>, key: &str, value: &str) -> fmt::Result {
    write!(f, ",{key}={}", escape(value))
}

fn path_opt(f: &mut fmt::Formatter<'_>, key: &str, value: &std::path::Path) -> fmt::Result {
    opt(f, key, &value.to_string_lossy())
}

fn on(f: &mut fmt::Formatter<'_>, key: &str, value: bool) -> fmt::Result {
    write!(f, ",{key}={}", if value { "on" } else { "off" })
}

impl fmt::Display for ChardevSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{},id={}", self.backend.kind(), self.id)?;
        match &self.backend {
            BackendSpec::Null => {}
            BackendSpec::File(s) => {
                path_opt(f, "path", &s.path)?;
                if s.append {
                    on(f, "append", true)?;
                }
                if let Some(p) = &s.input_path {
                    path_opt(f, "input-path", p)?;
                }
            }
            BackendSpec::Stdio(s) => {
                if !s.signal {
                    on(f, "signal", false)?;
                }
            }
            BackendSpec::Socket(s) => {
                match &s.addr {
                    SocketAddrSpec::Unix { path, abstract_ns } => {
                        path_opt(f, "path", path)?;
                        if *abstract_ns {
                            on(f, "abstract", true)?;
                        }
                    }
                    SocketAddrSpec::Tcp { host, port } => {
                        if !host.is_empty() {
                            opt(f, "host", host)?;
                        }
                        write!(f, ",port={port}")?;
                    }
                    SocketAddrSpec::Fd(n) => write!(f, ",fd={n}")?,
                    SocketAddrSpec::FdName(n) => opt(f, "fd", n)?,
                }
                if s.server {
                    on(f, "server", true)?;
                    on(f, "wait", s.wait)?;
                }
                if s.nodelay {
                    on(f, "nodelay", true)?;
                }
                if s.reconnect_ms > 0 {
                    write!(f, ",reconnect-ms={}", s.reconnect_ms)?;
                }
                if s.backlog != DEFAULT_BACKLOG {
                    write!(f, ",backlog={}", s.backlog)?;
                }
            }
            BackendSpec::Pty(s) => {
                if let Some(p) = &s.path {
                    path_opt(f, "path", p)?;
                }
                if s.backlog != DEFAULT_BACKLOG {
                    write!(f, ",backlog={}", s.backlog)?;
                }
            }
            BackendSpec::Ringbuf(s) => {
                if s.size != DEFAULT_RINGBUF_SIZE {
                    write!(f, ",size={}", s.size)?;
                }
            }
            BackendSpec::Pipe(s) => path_opt(f, "path", &s.path)?,
            BackendSpec::Udp(s) => {
                opt(f, "host", &s.host)?;
                write!(f, ",port={}", s.port)?;
                if !s.localaddr.is_empty() {
                    opt(f, "localaddr", &s.localaddr)?;
                }
                if s.localport != 0 {
                    write!(f, ",localport={}", s.localport)?;
                }
            }
            BackendSpec::Serial(s) => path_opt(f, "path", &s.path)?,
            BackendSpec::Mux(s) => opt(f, "chardev", &s.chardev)?,
            BackendSpec::Extension(e) => {
                for (key, value) in &e.options {
                    opt(f, key, value)?;
                }
            }
        }
        if let Some(log) = &self.log {
            path_opt(f, "logfile", &log.path)?;
            if log.append {
                on(f, "logappend", true)?;
            }
        }
        if self.mux {
            on(f, "mux", true)?;
        }
        Ok(())
    }
}

/// Split `HOST:PORT` at the last colon; `[v6]` loses its brackets.
fn split_host_port(s: &str) -> Option<(String, String)> {
    let (host, port) = s.rsplit_once(':')?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    Some((host.to_string(), port.to_string()))
}

/// Parse a `--serial` argument. `id` names the chardev it creates (e.g. `serial0`).
///
/// Forms: `none`, `null`, `stdio`, `pty`, `file:PATH`, `pipe:PATH`, `unix:PATH[,opts]`,
/// `tcp:[HOST]:PORT[,opts]`, `udp:[HOST]:PORT[@[LOCALADDR]:LOCALPORT]`, `chardev:ID`,
/// `mon:FORM` (the form with `mux=on`; stdio then has `signal=off`), `/dev/...` (a host tty),
/// and for completeness the full `--chardev`-style `BACKEND,opts` without `id=`.
pub fn parse_serial(s: &str, id: &str) -> Result<SerialArg, SpecError> {
    if s.is_empty() {
        return Err(SpecError::Empty);
    }
    if !is_valid_id(id) {
        return Err(SpecError::BadId(quote(id)));
    }
    let own_id = Some(id.to_string());
    let with = |backend: &str, first: Vec<String>, rest: &str| -> Result<SerialArg, SpecError> {
        let mut tokens = first;
        if !rest.is_empty() {
            tokens.extend(split_opts(rest));
        }
        build(backend, &tokens, own_id.clone()).map(SerialArg::Spec)
    };
    if s == "none" {
        return Ok(SerialArg::None);
    }
    if let Some(rest) = s.strip_prefix("chardev:") {
        if !is_valid_id(rest) {
            return Err(SpecError::BadId(quote(rest)));
        }
        return Ok(SerialArg::Chardev(rest.to_string()));
    }
    if let Some(rest) = s.strip_prefix("mon:") {
        return match parse_serial(rest, id)? {
            SerialArg::Spec(mut spec) => {
                if let BackendSpec::Stdio(st) = &mut spec.backend {
                    st.signal = false;
                }
                spec.mux = true;
                Ok(SerialArg::Spec(spec))
            }
            _ => Err(SpecError::UnknownSerial(quote(s))),
        };
    }
    if let Some(path) = s.strip_prefix("file:") {
        return with("file", vec![format!("path={path}")], "");
    }
    if let Some(path) = s.strip_prefix("pipe:") {
        return with("pipe", vec![format!("path={path}")], "");
    }
    if s.starts_with("/dev/") {
        return with("serial", vec![format!("path={s}")], "");
    }
    if let Some(rest) = s.strip_prefix("unix:") {
        let mut tokens = split_opts(rest);
        let path = tokens.remove(0);
        tokens.insert(0, format!("path={path}"));
        return build("socket", &tokens, own_id).map(SerialArg::Spec);
    }
    if let Some(rest) = s.strip_prefix("tcp:") {
        let mut tokens = split_opts(rest);
        let hp = tokens.remove(0);
        let (host, port) =
            split_host_port(&hp).ok_or_else(|| SpecError::UnknownSerial(quote(s)))?;
        tokens.insert(0, format!("port={port}"));
        if !host.is_empty() {
            tokens.insert(0, format!("host={host}"));
        }
        return build("socket", &tokens, own_id).map(SerialArg::Spec);
    }
    if let Some(rest) = s.strip_prefix("udp:") {
        let (remote, local) = match rest.split_once('@') {
            Some((r, l)) => (r, Some(l)),
            None => (rest, None),
        };
        let (host, port) =
            split_host_port(remote).ok_or_else(|| SpecError::UnknownSerial(quote(s)))?;
        let mut tokens = vec![format!("port={port}")];
        if !host.is_empty() {
            tokens.push(format!("host={host}"));
        }
        if let Some(l) = local {
            let (laddr, lport) =
                split_host_port(l).ok_or_else(|| SpecError::UnknownSerial(quote(s)))?;
            if !laddr.is_empty() {
                tokens.push(format!("localaddr={laddr}"));
            }
            tokens.push(format!("localport={lport}"));
        }
        return build("udp", &tokens, own_id).map(SerialArg::Spec);
    }
    let tokens = split_opts(s);
    match canonical_backend(&tokens[0]) {
        Some(_) => build(&tokens[0], &tokens[1..], own_id).map(SerialArg::Spec),
        None => Err(SpecError::UnknownSerial(quote(s))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse(s: &str) -> Result<ChardevSpec, SpecError> {
        ChardevSpec::parse(s)
    }

    fn err(s: &str) -> String {
        parse(s).unwrap_err().to_string()
    }

    #[test]
    fn socket_unix_server() {
        let s = parse("socket,id=c0,path=/tmp/a,,b.sock,server=on,wait=off").unwrap();
        assert_eq!(s.id, "c0");
        assert_eq!(
            s.backend,
            BackendSpec::Socket(SocketSpec {
                addr: SocketAddrSpec::Unix {
                    path: "/tmp/a,b.sock".into(),
                    abstract_ns: false
                },
                server: true,
                wait: false,
                nodelay: false,
                reconnect_ms: 0,
                backlog: DEFAULT_BACKLOG,
            })
        );
        assert_eq!(
            s.to_string(),
            "socket,id=c0,path=/tmp/a,,b.sock,server=on,wait=off"
        );
    }

    #[test]
    fn server_waits_by_default_and_legacy_booleans() {
        let s = parse("socket,id=c0,port=4444,server").unwrap();
        let BackendSpec::Socket(sock) = s.backend else {
            panic!("not a socket")
        };
        assert!(sock.server && sock.wait);
        let s = parse("socket,id=c0,port=4444,server,nowait,delay=off").unwrap();
        let BackendSpec::Socket(sock) = s.backend else {
            panic!("not a socket")
        };
        assert!(sock.server && !sock.wait && sock.nodelay);
    }

    #[test]
    fn fd_numbers_and_names() {
        let s = parse("socket,id=m,fd=3,server=on,wait=off").unwrap();
        assert!(matches!(
            s.backend,
            BackendSpec::Socket(SocketSpec {
                addr: SocketAddrSpec::Fd(3),
                ..
            })
        ));
        let s = parse("socket,id=m,fd=myfd").unwrap();
        assert!(matches!(
            s.backend,
            BackendSpec::Socket(SocketSpec {
                addr: SocketAddrSpec::FdName(ref n),
                ..
            }) if n == "myfd"
        ));
    }

    #[test]
    fn rejections_name_the_option() {
        assert_eq!(err("bogus,id=x"), "unknown chardev backend 'bogus'");
        assert_eq!(
            err("null,id=c0,foo=1"),
            "chardev 'c0': unknown option 'foo'"
        );
        assert_eq!(
            err("null,foo=1,id=c0"),
            "chardev 'c0': unknown option 'foo'"
        );
        assert_eq!(err("null"), "chardev 'null': missing option 'id'");
        assert_eq!(err(""), "empty chardev option string");
        assert_eq!(
            err("null,id=c0,id=c1"),
            "chardev 'c0': option 'id' given twice"
        );
        assert_eq!(
            err("null,id=0x"),
            "bad chardev id '0x' (a letter, then letters, digits, '-', '.', '_')"
        );
        assert_eq!(err("null,id=c0,"), "chardev 'c0': empty option");
        assert_eq!(
            err("socket,id=c0,port=70000"),
            "chardev 'c0': bad value '70000' for option 'port' (expected a port number)"
        );
        assert_eq!(
            err("socket,id=c0,path=/x,server=maybe"),
            "chardev 'c0': bad value 'maybe' for option 'server' (expected on or off)"
        );
        assert_eq!(err("socket,id=c0"), "chardev 'c0': missing option 'path'");
        assert_eq!(
            err("socket,id=c0,host=h"),
            "chardev 'c0': missing option 'port'"
        );
        assert_eq!(
            err("socket,id=c0,path=/x,wait=on"),
            "chardev 'c0': option 'wait' needs server=on"
        );
        assert_eq!(
            err("socket,id=c0,path=/x,server=on,reconnect-ms=10"),
            "chardev 'c0': option 'reconnect-ms' needs server=off"
        );
        assert_eq!(
            err("socket,id=c0,path=/x,port=1"),
            "chardev 'c0': option 'port' conflicts with 'path'"
        );
        assert_eq!(
            err("socket,id=c0,path=/x,nodelay=on"),
            "chardev 'c0': option 'nodelay' needs a tcp socket"
        );
        assert_eq!(
            err("ringbuf,id=r,size=5"),
            "chardev 'r': bad value '5' for option 'size' (expected a power of two up to 1G)"
        );
        assert_eq!(err("file,id=f"), "chardev 'f': missing option 'path'");
        assert_eq!(
            err("file,id=f,path="),
            "chardev 'f': bad value '' for option 'path' (expected a path)"
        );
        assert_eq!(
            err("file,id=f,path"),
            "chardev 'f': option 'path' needs a value"
        );
        assert_eq!(
            err("null,id=n,logappend=on"),
            "chardev 'n': option 'logappend' needs 'logfile'"
        );
        assert_eq!(err("mux,id=m"), "chardev 'm': missing option 'chardev'");
        assert_eq!(
            err("mux,id=m,chardev=b,mux=on"),
            "chardev 'm': option 'mux' cannot be used on a mux"
        );
        assert!(!err("null,id=c0,fo\no=1").contains('\n'));
    }

    #[test]
    fn sizes_and_aliases() {
        let s = parse("memory,id=r,size=4K").unwrap();
        assert_eq!(s.backend, BackendSpec::Ringbuf(RingbufSpec { size: 4096 }));
        let s = parse("tty,id=t,path=/dev/ttyS0").unwrap();
        assert_eq!(s.backend.kind(), "serial");
        let s = parse("pty,id=p,backlog=0,logfile=/tmp/l,logappend=on").unwrap();
        assert_eq!(
            s.backend,
            BackendSpec::Pty(PtySpec {
                path: None,
                backlog: 0
            })
        );
        assert_eq!(
            s.log,
            Some(LogSpec {
                path: "/tmp/l".into(),
                append: true
            })
        );
    }

    #[test]
    fn serial_short_forms() {
        let spec = |s: &str| match parse_serial(s, "serial0").unwrap() {
            SerialArg::Spec(spec) => spec,
            other => panic!("{other:?}"),
        };
        assert_eq!(parse_serial("none", "serial0").unwrap(), SerialArg::None);
        assert_eq!(
            parse_serial("chardev:c0", "serial0").unwrap(),
            SerialArg::Chardev("c0".into())
        );
        assert_eq!(
            spec("stdio").backend,
            BackendSpec::Stdio(StdioSpec { signal: true })
        );
        assert_eq!(spec("null").backend, BackendSpec::Null);
        assert_eq!(spec("pty").backend.kind(), "pty");
        assert_eq!(spec("stdio").id, "serial0");
        assert_eq!(
            spec("file:/tmp/a,b").backend,
            BackendSpec::File(FileSpec {
                path: "/tmp/a,b".into(),
                append: false,
                input_path: None
            })
        );
        assert_eq!(
            spec("unix:/tmp/s,server=on,wait=off").to_string(),
            "socket,id=serial0,path=/tmp/s,server=on,wait=off"
        );
        assert_eq!(
            spec("tcp::4444,server=on").to_string(),
            "socket,id=serial0,port=4444,server=on,wait=on"
        );
        assert_eq!(
            spec("tcp:[::1]:4444").to_string(),
            "socket,id=serial0,host=::1,port=4444"
        );
        assert_eq!(
            spec("udp:1.2.3.4:5@:6").to_string(),
            "udp,id=serial0,host=1.2.3.4,port=5,localport=6"
        );
        let mon = spec("mon:stdio");
        assert!(mon.mux);
        assert_eq!(mon.backend, BackendSpec::Stdio(StdioSpec { signal: false }));
        assert_eq!(spec("/dev/ttyS0").backend.kind(), "serial");
        assert_eq!(
            parse_serial("bogus", "serial0").unwrap_err().to_string(),
            "unknown serial option 'bogus'"
        );
        assert_eq!(
            parse_serial("unix:/x,bad=1", "serial0")
                .unwrap_err()
                .to_string(),
            "chardev 'serial0': unknown option 'bad'"
        );
        assert!(parse_serial("tcp:nocolon", "serial0").is_err());
        assert!(parse_serial("chardev:", "serial0").is_err());
    }

    #[test]
    fn repeated_options_only_where_a_kind_takes_them() {
        assert_eq!(
            err("socket,id=c0,path=/x,oforward=a:1"),
            "chardev 'c0': unknown option 'oforward'"
        );
        assert_eq!(
            err("nosuchkind,id=c0"),
            "unknown chardev backend 'nosuchkind'"
        );
    }

    fn arb_path() -> impl Strategy<Value = PathBuf> {
        "[^\u{0}]{1,24}".prop_map(PathBuf::from)
    }

    fn arb_id() -> impl Strategy<Value = String> {
        "[a-zA-Z][a-zA-Z0-9._-]{0,12}"
    }

    fn arb_backlog() -> impl Strategy<Value = usize> {
        prop_oneof![Just(DEFAULT_BACKLOG), 0usize..1_000_000]
    }

    fn arb_socket() -> impl Strategy<Value = SocketSpec> {
        let addr = prop_oneof![
            (arb_path(), any::<bool>())
                .prop_map(|(path, abstract_ns)| SocketAddrSpec::Unix { path, abstract_ns }),
            ("[a-z0-9.:,]{0,12}", any::<u16>())
                .prop_map(|(host, port)| SocketAddrSpec::Tcp { host, port }),
            (0i32..100_000).prop_map(SocketAddrSpec::Fd),
            arb_id().prop_map(SocketAddrSpec::FdName),
        ];
        (
            addr,
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            0u64..100_000,
            arb_backlog(),
        )
            .prop_map(|(addr, server, wait, nodelay, reconnect_ms, backlog)| {
                let tcpish = !matches!(addr, SocketAddrSpec::Unix { .. });
                let fd = matches!(addr, SocketAddrSpec::Fd(_) | SocketAddrSpec::FdName(_));
                SocketSpec {
                    server,
                    wait: server && wait,
                    nodelay: nodelay && tcpish,
                    reconnect_ms: if server || fd { 0 } else { reconnect_ms },
                    backlog,
                    addr,
                }
            })
    }

    fn arb_backend() -> impl Strategy<Value = BackendSpec> {
        prop_oneof![
            Just(BackendSpec::Null),
            (arb_path(), any::<bool>(), proptest::option::of(arb_path())).prop_map(
                |(path, append, input_path)| BackendSpec::File(FileSpec {
                    path,
                    append,
                    input_path
                })
            ),
            any::<bool>().prop_map(|signal| BackendSpec::Stdio(StdioSpec { signal })),
            arb_socket().prop_map(BackendSpec::Socket),
            (proptest::option::of(arb_path()), arb_backlog())
                .prop_map(|(path, backlog)| BackendSpec::Pty(PtySpec { path, backlog })),
            (0u32..20).prop_map(|b| BackendSpec::Ringbuf(RingbufSpec { size: 1 << b })),
            arb_path().prop_map(|path| BackendSpec::Pipe(PipeSpec { path })),
            (
                "[a-z0-9.,]{1,12}",
                any::<u16>(),
                "[a-z0-9.]{0,8}",
                any::<u16>()
            )
                .prop_map(|(host, port, localaddr, localport)| BackendSpec::Udp(
                    UdpSpec {
                        host,
                        port,
                        localaddr,
                        localport
                    }
                )),
            arb_path().prop_map(|path| BackendSpec::Serial(SerialSpec { path })),
            arb_id().prop_map(|chardev| BackendSpec::Mux(MuxSpec { chardev })),
        ]
    }

    fn arb_spec() -> impl Strategy<Value = ChardevSpec> {
        (
            arb_id(),
            arb_backend(),
            proptest::option::of((arb_path(), any::<bool>())),
            any::<bool>(),
        )
            .prop_map(|(id, backend, log, mux)| ChardevSpec {
                mux: mux && !matches!(backend, BackendSpec::Mux(_)),
                id,
                backend,
                log: log.map(|(path, append)| LogSpec { path, append }),
            })
    }

    proptest! {
        #[test]
        fn display_parse_round_trip(spec in arb_spec()) {
            let text = spec.to_string();
            prop_assert_eq!(parse(&text), Ok(spec), "{}", text);
        }

        #[test]
        fn parse_never_panics(s in "\\PC{0,64}") {
            if let Ok(spec) = parse(&s) {
                // Whatever parses prints back to something that parses the same.
                prop_assert_eq!(parse(&spec.to_string()), Ok(spec));
            }
            let _ = parse_serial(&s, "serial0");
        }

        #[test]
        fn parse_never_panics_on_option_soup(
            backend in prop::sample::select(BACKEND_NAMES),
            opts in prop::collection::vec("(id|path|port|host|server|wait|fd|size|backlog|mux|oforward|iforward|rate|window|x)(=[a-z0-9,/:]{0,6})?", 0..6),
        ) {
            let s = format!("{backend},{}", opts.join(","));
            if let Err(e) = parse(&s) {
                prop_assert!(!e.to_string().contains('\n'));
            }
        }

        #[test]
        fn errors_are_one_line(s in "[a-z]{1,6},(id=[a-z]{1,3},)?[^\u{0}]{0,40}") {
            if let Err(e) = parse(&s) {
                prop_assert!(!e.to_string().contains('\n'));
            }
        }
    }
}
