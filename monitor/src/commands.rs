//! The QMP command dispatcher: argument validation with QEMU's wording, then a call on the
//! [`Machine`], the chardev registry or the fd store.
//!
//! Every command minivmm answers is in [`COMMANDS`]; `docs/qmp.md` documents each one. The
//! dispatcher owns no state: what persists (named fds) lives in the [`Context`] it is given.
//! It must not do I/O beyond what the machine and the registry do for it.

use chardev::backend::RingAccess;
use std::collections::{BTreeMap, VecDeque};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine;
use chardev::spec::{backend_names, is_valid_id, SocketAddrSpec};
use chardev::{BackendSpec, ChardevSpec};
use serde_json::{json, Map, Value};

use crate::device_spec::DeviceSpec;
use crate::fdstore::FdStore;
use crate::machine::{capitalize, describe, Machine};
use crate::protocol::{
    QmpError, PACKAGE, QEMU_VERSION_MAJOR, QEMU_VERSION_MICRO, QEMU_VERSION_MINOR,
};
use crate::{hmp, sys, vproxy};

/// Every command the dispatcher answers, in `query-commands` order.
pub const COMMANDS: &[&str] = &[
    "qmp_capabilities",
    "query-version",
    "query-commands",
    "query-status",
    "query-name",
    "query-uuid",
    "stop",
    "cont",
    "system_reset",
    "system_powerdown",
    "quit",
    "query-chardev",
    "query-chardev-backends",
    "chardev-add",
    "chardev-change",
    "chardev-remove",
    "chardev-send-break",
    "ringbuf-write",
    "ringbuf-read",
    "getfd",
    "closefd",
    "device_add",
    "device_del",
    "human-monitor-command",
    "query-virtio-serial",
    "vproxy-forward-add",
    "vproxy-forward-remove",
    "query-vproxy",
    "query-vsock",
];

/// Most bytes one `ringbuf-read` returns (it may always return fewer than asked).
pub const MAX_RINGBUF_READ: usize = 16 << 20;

/// UUID `query-uuid` reports when the machine has none (QEMU's default).
pub const NIL_UUID: &str = "00000000-0000-0000-0000-000000000000";

/// What a command runs against.
pub struct Context<'a> {
    /// The machine.
    pub machine: &'a mut dyn Machine,
    /// The monitor's named fds.
    pub fds: &'a FdStore,
    /// Fds received with SCM_RIGHTS on this connection and not yet claimed by `getfd`,
    /// oldest first.
    pub passed_fds: &'a mut VecDeque<OwnedFd>,
}

/// The type names QEMU's errors use.
fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Typed access to an arguments object: each getter marks its member used; [`Args::finish`]
/// refuses the rest. Messages follow QEMU's QAPI input visitor.
struct Args<'a> {
    map: &'a Map<String, Value>,
    prefix: String,
    used: Vec<&'a str>,
}

impl<'a> Args<'a> {
    fn new(map: &'a Map<String, Value>, prefix: &str) -> Self {
        Args {
            map,
            prefix: prefix.to_string(),
            used: Vec::new(),
        }
    }

    fn full(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    fn get(&mut self, name: &'a str) -> Option<&'a Value> {
        self.used.push(name);
        self.map.get(name)
    }

    fn mistyped(&self, name: &str, expected: &str) -> QmpError {
        QmpError::generic(format!(
            "Invalid parameter type for '{}', expected: {expected}",
            self.full(name)
        ))
    }

    fn missing(&self, name: &str) -> QmpError {
        QmpError::generic(format!("Parameter '{}' is missing", self.full(name)))
    }

    fn opt_str(&mut self, name: &'a str) -> Result<Option<&'a str>, QmpError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(self.mistyped(name, "string")),
        }
    }

    fn str(&mut self, name: &'a str) -> Result<&'a str, QmpError> {
        self.opt_str(name)?.ok_or_else(|| self.missing(name))
    }

    fn opt_int(&mut self, name: &'a str) -> Result<Option<i64>, QmpError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Number(n)) => n
                .as_i64()
                .map(Some)
                .ok_or_else(|| self.mistyped(name, "integer")),
            Some(_) => Err(self.mistyped(name, "integer")),
        }
    }

    fn int(&mut self, name: &'a str) -> Result<i64, QmpError> {
        self.opt_int(name)?.ok_or_else(|| self.missing(name))
    }

    fn opt_bool(&mut self, name: &'a str) -> Result<Option<bool>, QmpError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(self.mistyped(name, "boolean")),
        }
    }

    fn opt_obj(&mut self, name: &'a str) -> Result<Option<&'a Map<String, Value>>, QmpError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Object(m)) => Ok(Some(m)),
            Some(_) => Err(self.mistyped(name, "object")),
        }
    }

    fn obj(&mut self, name: &'a str) -> Result<&'a Map<String, Value>, QmpError> {
        self.opt_obj(name)?.ok_or_else(|| self.missing(name))
    }

    fn opt_enum(&mut self, name: &'a str, values: &[&str]) -> Result<Option<&'a str>, QmpError> {
        match self.opt_str(name)? {
            None => Ok(None),
            Some(v) if values.contains(&v) => Ok(Some(v)),
            Some(v) => Err(QmpError::generic(format!(
                "Parameter '{}' does not accept value '{v}'",
                self.full(name)
            ))),
        }
    }

    /// Mark every member used (commands that take free-form properties).
    fn rest(&mut self) -> impl Iterator<Item = (&'a String, &'a Value)> + '_ {
        let used = self.used.clone();
        self.map
            .iter()
            .filter(move |(k, _)| !used.contains(&k.as_str()))
    }

    fn finish(self) -> Result<(), QmpError> {
        match self.map.keys().find(|k| !self.used.contains(&k.as_str())) {
            Some(k) => Err(QmpError::generic(format!(
                "Parameter '{}' is unexpected",
                self.full(k)
            ))),
            None => Ok(()),
        }
    }
}

/// Run one command. Unknown commands fail with `CommandNotFound`.
pub fn execute(
    ctx: &mut Context<'_>,
    command: &str,
    arguments: &Map<String, Value>,
) -> Result<Value, QmpError> {
    let mut a = Args::new(arguments, "");
    let ok = || Ok(json!({}));
    let result = match command {
        "qmp_capabilities" => {
            return Err(QmpError::command_not_found(
                "Capabilities negotiation is already complete, command ignored",
            ))
        }
        "query-version" => {
            a.finish()?;
            return Ok(version());
        }
        "query-commands" => {
            a.finish()?;
            return Ok(Value::Array(
                COMMANDS.iter().map(|c| json!({"name": c})).collect(),
            ));
        }
        "query-status" => {
            a.finish()?;
            let s = ctx.machine.run_state();
            return Ok(
                json!({"running": s.is_running(), "singlestep": false, "status": s.as_str()}),
            );
        }
        "query-name" => {
            a.finish()?;
            return Ok(match ctx.machine.name() {
                Some(n) => json!({"name": n}),
                None => json!({}),
            });
        }
        "query-uuid" => {
            a.finish()?;
            let uuid = ctx.machine.uuid().unwrap_or_else(|| NIL_UUID.to_string());
            return Ok(json!({"UUID": uuid}));
        }
        "stop" => {
            a.finish()?;
            ctx.machine.stop()
        }
        "cont" => {
            a.finish()?;
            ctx.machine.cont()
        }
        "system_reset" => {
            a.finish()?;
            ctx.machine.system_reset()
        }
        "system_powerdown" => {
            a.finish()?;
            ctx.machine.system_powerdown()
        }
        "quit" => {
            a.finish()?;
            ctx.machine.quit();
            Ok(())
        }
        "query-chardev" => {
            a.finish()?;
            return Ok(query_chardev(ctx));
        }
        "query-chardev-backends" => {
            a.finish()?;
            return Ok(Value::Array(
                backend_names().iter().map(|n| json!({"name": n})).collect(),
            ));
        }
        "chardev-add" | "chardev-change" => {
            let id = a.str("id")?;
            let backend = a.obj("backend")?;
            a.finish()?;
            let spec = backend_to_spec(id, backend)?;
            let pty = if command == "chardev-add" {
                chardev_add_spec(ctx, spec)?
            } else {
                chardev_change_spec(ctx, spec)?
            };
            return Ok(match pty {
                Some(p) => json!({"pty": p}),
                None => json!({}),
            });
        }
        "chardev-remove" => {
            let id = a.str("id")?;
            a.finish()?;
            ctx.machine.chardev_remove(id)
        }
        "chardev-send-break" => {
            let id = a.str("id")?;
            a.finish()?;
            ctx.machine.chardev_send_break(id)
        }
        "ringbuf-write" => {
            let device = a.str("device")?;
            let data = a.str("data")?;
            let format = a.opt_enum("format", &["utf8", "base64"])?;
            a.finish()?;
            let bytes = match format {
                Some("base64") => BASE64
                    .decode(data)
                    .map_err(|_| QmpError::generic("Invalid base64 data"))?,
                _ => data.as_bytes().to_vec(),
            };
            ringbuf(ctx, device, |b| b.ringbuf_write(&bytes))?;
            return ok();
        }
        "ringbuf-read" => {
            let device = a.str("device")?;
            let size = a.int("size")?;
            let format = a.opt_enum("format", &["utf8", "base64"])?;
            a.finish()?;
            if size <= 0 {
                return Err(QmpError::generic("size must be greater than zero"));
            }
            let max = usize::try_from(size)
                .unwrap_or(usize::MAX)
                .min(MAX_RINGBUF_READ);
            let bytes = ringbuf(ctx, device, |b| b.ringbuf_read(max))?;
            return Ok(Value::String(match format {
                Some("base64") => BASE64.encode(&bytes),
                _ => String::from_utf8_lossy(&bytes).into_owned(),
            }));
        }
        "getfd" => {
            let name = a.str("fdname")?;
            a.finish()?;
            getfd(ctx, name)
        }
        "closefd" => {
            let name = a.str("fdname")?;
            a.finish()?;
            return ctx
                .fds
                .close(name)
                .map(|()| json!({}))
                .map_err(|e| QmpError::generic(e.to_string()));
        }
        "device_add" => {
            let driver = a.str("driver")?;
            let mut props = BTreeMap::new();
            for (k, v) in a.rest() {
                let s = match v {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => if *b { "on" } else { "off" }.to_string(),
                    other => {
                        return Err(QmpError::generic(format!(
                            "Invalid parameter type for '{k}', expected: string, got {}",
                            type_name(other)
                        )))
                    }
                };
                props.insert(k.clone(), s);
            }
            let spec = DeviceSpec::from_props(driver, &props)
                .map_err(|e| QmpError::generic(e.to_string()))?;
            ctx.machine.device_add(&spec)
        }
        "device_del" => {
            let id = a.str("id")?;
            a.finish()?;
            ctx.machine.device_del(id)
        }
        "human-monitor-command" => {
            let line = a.str("command-line")?;
            a.opt_int("cpu-index")?;
            a.finish()?;
            return Ok(Value::String(hmp::to_crlf(&hmp::execute(ctx, line))));
        }
        "query-virtio-serial" => {
            a.finish()?;
            return Ok(query_virtio_serial(ctx));
        }
        "vproxy-forward-add" => {
            let id = a.str("id")?;
            let dir = a.opt_enum("direction", vproxy::DIRECTIONS)?;
            let forward = a.str("forward")?;
            a.finish()?;
            let dir = dir.ok_or_else(|| QmpError::generic("Parameter 'direction' is missing"))?;
            vproxy::forward_add(ctx.machine.chardevs(), id, dir, forward)?;
            return ok();
        }
        "vproxy-forward-remove" => {
            let id = a.str("id")?;
            let dir = a.opt_enum("direction", vproxy::DIRECTIONS)?;
            let name = a.str("name")?;
            a.finish()?;
            let dir = dir.ok_or_else(|| QmpError::generic("Parameter 'direction' is missing"))?;
            vproxy::forward_remove(ctx.machine.chardevs(), id, dir, name)?;
            return ok();
        }
        "query-vproxy" => {
            let id = a.opt_str("id")?;
            a.finish()?;
            return vproxy::query(ctx.machine.chardevs(), id);
        }
        "query-vsock" => {
            a.finish()?;
            return query_vsock(ctx);
        }
        other => {
            return Err(QmpError::command_not_found(format!(
                "The command {other} has not been found"
            )))
        }
    };
    result.map(|()| json!({})).map_err(QmpError::from)
}

/// `query-version`'s answer.
pub fn version() -> Value {
    json!({
        "qemu": {"major": QEMU_VERSION_MAJOR, "minor": QEMU_VERSION_MINOR, "micro": QEMU_VERSION_MICRO},
        "package": PACKAGE,
    })
}

fn chardev_error(e: chardev::Error) -> QmpError {
    QmpError::generic(describe(&e))
}

/// `query-chardev`: QEMU's members plus minivmm's peer and drop counters.
pub fn query_chardev(ctx: &mut Context<'_>) -> Value {
    let ports = ctx.machine.ports();
    let list = ctx.machine.chardevs().list();
    Value::Array(
        list.into_iter()
            .map(|c| {
                let port = ports
                    .iter()
                    .find(|p| p.chardev.as_deref() == Some(c.label.as_str()));
                let frontend_open = port.map_or(c.in_use, |p| p.guest_connected);
                json!({
                    "label": c.label,
                    "filename": c.filename,
                    "frontend-open": frontend_open,
                    "backend": c.kind,
                    "peer-connected": c.connected,
                    "dropped-bytes": c.dropped_bytes,
                })
            })
            .collect(),
    )
}

/// `query-vsock`: the vsock device, its connections and counters; an error when the
/// machine has none.
pub fn query_vsock(ctx: &mut Context<'_>) -> Result<Value, QmpError> {
    let v = ctx
        .machine
        .vsock()
        .ok_or_else(|| QmpError::generic("This machine has no vsock device"))?;
    let connections: Vec<Value> = v
        .connections
        .iter()
        .map(|c| {
            json!({
                "local-port": c.local_port,
                "peer-port": c.peer_port,
                "host-initiated": c.host_initiated,
                "state": c.state,
                "bytes-to-host": c.bytes_to_host,
                "bytes-to-guest": c.bytes_to_guest,
            })
        })
        .collect();
    let counters: Map<String, Value> = v
        .counters
        .iter()
        .map(|&(name, n)| (name.to_string(), json!(n)))
        .collect();
    Ok(json!({
        "id": v.id,
        "guest-cid": v.guest_cid,
        "uds-path": v.uds_path,
        "connections": connections,
        "counters": counters,
    }))
}

/// `query-virtio-serial`.
pub fn query_virtio_serial(ctx: &mut Context<'_>) -> Value {
    Value::Array(
        ctx.machine
            .ports()
            .into_iter()
            .map(|p| {
                json!({
                    "id": p.id,
                    "driver": p.driver.as_str(),
                    "bus": p.bus,
                    "nr": p.nr,
                    "name": p.name,
                    "chardev": p.chardev,
                    "guest-connected": p.guest_connected,
                    "host-connected": p.host_connected,
                })
            })
            .collect(),
    )
}

fn ringbuf<R>(
    ctx: &mut Context<'_>,
    device: &str,
    f: impl FnOnce(&mut dyn RingAccess) -> std::io::Result<R>,
) -> Result<R, QmpError> {
    let on_ring = |b: &mut dyn chardev::Backend| match b.ring() {
        Some(ring) => f(ring),
        None => Err(std::io::ErrorKind::Unsupported.into()),
    };
    match ctx.machine.chardevs().with(device, on_ring) {
        Err(_) => Err(QmpError::generic(format!("Device '{device}' not found"))),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::Unsupported => Err(QmpError::generic(
            format!("{device} is not a ringbuf device"),
        )),
        Ok(Err(e)) => Err(QmpError::generic(capitalize(&e.to_string()))),
        Ok(Ok(r)) => Ok(r),
    }
}

fn getfd(ctx: &mut Context<'_>, name: &str) -> Result<(), crate::machine::MachineError> {
    FdStore::check_name(name).map_err(|e| crate::machine::MachineError::Failed(e.to_string()))?;
    let fd = ctx.passed_fds.pop_front().ok_or_else(|| {
        crate::machine::MachineError::Failed(
            "No file descriptor supplied via SCM_RIGHTS".to_string(),
        )
    })?;
    ctx.fds
        .insert(name, fd)
        .map_err(|e| crate::machine::MachineError::Failed(e.to_string()))
}

/// A named fd taken out of the store for a chardev, with what identifies the open file, so
/// that it can be closed if the chardev could not take it over.
struct Lent {
    raw: i32,
    id: Option<(u64, u64)>,
}

impl Lent {
    /// Close the fd if the failed chardev left it open.
    fn reclaim(self) {
        if self.id.is_some() && sys::file_id(self.raw) == self.id {
            // SAFETY: the fd number still refers to the very file we handed over (same device
            // and inode) and the chardev that was to own it failed: we own it again.
            drop(unsafe { OwnedFd::from_raw_fd(self.raw) });
        }
    }
}

/// Resolve `fd=NAME` of a socket spec into an fd number the chardev will own.
fn resolve_fd_name(
    ctx: &mut Context<'_>,
    spec: &mut ChardevSpec,
) -> Result<Option<Lent>, QmpError> {
    let BackendSpec::Socket(sock) = &mut spec.backend else {
        return Ok(None);
    };
    let SocketAddrSpec::FdName(name) = &sock.addr else {
        return Ok(None);
    };
    let fd = ctx
        .fds
        .take(name)
        .map_err(|e| QmpError::generic(e.to_string()))?;
    if !sys::is_stream_socket(fd.as_raw_fd()) {
        let name = name.clone();
        // Put it back: the caller may still use it for something else.
        let _ = ctx.fds.insert(&name, fd);
        return Err(QmpError::generic(format!(
            "File descriptor named '{name}' is not a stream socket"
        )));
    }
    let id = sys::file_id(fd.as_raw_fd());
    let raw = fd.into_raw_fd();
    sock.addr = SocketAddrSpec::Fd(raw);
    Ok(Some(Lent { raw, id }))
}

fn pty_path(ctx: &mut Context<'_>, id: &str) -> Option<String> {
    ctx.machine
        .chardevs()
        .with(id, |b| {
            (b.kind() == "pty").then(|| {
                let f = b.filename();
                f.strip_prefix("pty:").unwrap_or(&f).to_string()
            })
        })
        .ok()
        .flatten()
}

/// `chardev-add` of a parsed spec (QMP and HMP). Returns the pty path for a pty.
pub fn chardev_add_spec(
    ctx: &mut Context<'_>,
    mut spec: ChardevSpec,
) -> Result<Option<String>, QmpError> {
    if ctx.machine.chardevs().contains(&spec.id) {
        return Err(chardev_error(chardev::Error::Duplicate(spec.id)));
    }
    let lent = resolve_fd_name(ctx, &mut spec)?;
    if let Err(e) = ctx.machine.chardev_add(&spec) {
        if let Some(l) = lent {
            l.reclaim();
        }
        return Err(e.into());
    }
    Ok(pty_path(ctx, &spec.id))
}

/// `chardev-change` of a parsed spec (QMP and HMP). Returns the pty path for a pty.
pub fn chardev_change_spec(
    ctx: &mut Context<'_>,
    mut spec: ChardevSpec,
) -> Result<Option<String>, QmpError> {
    if !ctx.machine.chardevs().contains(&spec.id) {
        return Err(QmpError::generic(format!(
            "Chardev '{}' does not exist",
            spec.id
        )));
    }
    if spec.mux || matches!(spec.backend, BackendSpec::Mux(_)) {
        return Err(QmpError::generic(
            "Chardev 'mux' cannot be used for chardev-change",
        ));
    }
    let lent = resolve_fd_name(ctx, &mut spec)?;
    let backend = match chardev::create(&spec) {
        Ok(b) => b,
        Err(e) => {
            if let Some(l) = lent {
                l.reclaim();
            }
            return Err(chardev_error(e));
        }
    };
    ctx.machine.chardev_change(&spec.id, backend)?;
    Ok(pty_path(ctx, &spec.id))
}

/// Append `,key=value` with the value escaped for the option parser.
fn opt(out: &mut String, key: &str, value: &str) {
    out.push(',');
    out.push_str(key);
    out.push('=');
    out.push_str(&value.replace(',', ",,"));
}

fn onoff(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

/// `SocketAddressLegacy` (`{"type": T, "data": {...}}`) or the flat `SocketAddress`.
fn socket_addr(
    out: &mut String,
    addr: &Map<String, Value>,
    prefix: &str,
    local: bool,
) -> Result<(), QmpError> {
    let mut a = Args::new(addr, prefix);
    let kind = a.str("type")?;
    let (data, dprefix) = match a.opt_obj("data")? {
        Some(d) => (d, format!("{prefix}data.")),
        None => (addr, prefix.to_string()),
    };
    let mut d = Args::new(data, &dprefix);
    if std::ptr::eq(data, addr) {
        d.used.push("type");
    } else {
        a.finish()?;
    }
    let (host_key, port_key) = if local {
        ("localaddr", "localport")
    } else {
        ("host", "port")
    };
    match kind {
        "unix" if !local => {
            opt(out, "path", d.str("path")?);
            if d.opt_bool("abstract")? == Some(true) {
                out.push_str(",abstract=on");
            }
            d.opt_bool("tight")?;
        }
        "inet" => {
            let host = d.str("host")?;
            let port = match d.get("port") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Number(n)) => n.to_string(),
                Some(_) => return Err(d.mistyped("port", "string")),
                None => return Err(d.missing("port")),
            };
            if !host.is_empty() {
                opt(out, host_key, host);
            }
            opt(out, port_key, &port);
            for flag in ["numeric", "ipv4", "ipv6", "keep-alive"] {
                d.opt_bool(flag)?;
            }
        }
        "fd" if !local => opt(out, "fd", d.str("str")?),
        "vsock" => return Err(QmpError::generic("vsock sockets are not supported")),
        other => {
            return Err(QmpError::generic(format!(
                "Parameter '{prefix}type' does not accept value '{other}'"
            )))
        }
    }
    d.finish()
}

/// Translate QMP's `ChardevBackend` into the option string the `--chardev` parser takes,
/// then parse it: one validation for the CLI, HMP and QMP.
pub fn backend_to_spec(id: &str, backend: &Map<String, Value>) -> Result<ChardevSpec, QmpError> {
    let mut b = Args::new(backend, "backend.");
    let kind = b.str("type")?;
    let empty = Map::new();
    let data = b.opt_obj("data")?.unwrap_or(&empty);
    b.finish()?;
    let mut d = Args::new(data, "backend.data.");
    let canonical = match kind {
        "memory" => "ringbuf",
        "tty" => "serial",
        k => k,
    };
    if !backend_names().contains(&canonical) {
        return Err(QmpError::generic(format!(
            "Parameter 'backend.type' does not accept value '{kind}'"
        )));
    }
    let mut s = String::from(canonical);
    opt(&mut s, "id", id);
    match canonical {
        "null" => {}
        "file" => {
            opt(&mut s, "path", d.str("out")?);
            if let Some(i) = d.opt_str("in")? {
                opt(&mut s, "input-path", i);
            }
            if let Some(ap) = d.opt_bool("append")? {
                opt(&mut s, "append", onoff(ap));
            }
        }
        "pipe" | "serial" => opt(&mut s, "path", d.str("device")?),
        "pty" => {
            if let Some(p) = d.opt_str("path")? {
                opt(&mut s, "path", p);
            }
        }
        "stdio" => {
            if let Some(sig) = d.opt_bool("signal")? {
                opt(&mut s, "signal", onoff(sig));
            }
        }
        "ringbuf" => {
            if let Some(size) = d.opt_int("size")? {
                opt(&mut s, "size", &size.to_string());
            }
        }
        "udp" => {
            let remote = d.obj("remote")?;
            socket_addr(&mut s, remote, "backend.data.remote.", false)?;
            if let Some(local) = d.opt_obj("local")? {
                socket_addr(&mut s, local, "backend.data.local.", true)?;
            }
        }
        "mux" => opt(&mut s, "chardev", d.str("chardev")?),
        "socket" => {
            let addr = d.obj("addr")?;
            socket_addr(&mut s, addr, "backend.data.addr.", false)?;
            // QMP's defaults differ from the command line's: server on, wait off.
            let server = d.opt_bool("server")?.unwrap_or(true);
            let wait = d.opt_bool("wait")?.unwrap_or(false);
            opt(&mut s, "server", onoff(server));
            if server {
                opt(&mut s, "wait", onoff(wait));
            }
            if let Some(nd) = d.opt_bool("nodelay")? {
                if nd {
                    opt(&mut s, "nodelay", "on");
                }
            }
            for unsupported in ["telnet", "tn3270", "websocket"] {
                if d.opt_bool(unsupported)? == Some(true) {
                    return Err(QmpError::generic(format!(
                        "'{unsupported}' is not supported by minivmm"
                    )));
                }
            }
            if d.opt_str("tls-creds")?.is_some() || d.opt_str("tls-authz")?.is_some() {
                return Err(QmpError::generic("TLS is not supported by minivmm"));
            }
            let reconnect_ms = match (d.opt_int("reconnect-ms")?, d.opt_int("reconnect")?) {
                (Some(ms), _) => Some(ms),
                (None, Some(secs)) => Some(secs.saturating_mul(1000)),
                (None, None) => None,
            };
            if let Some(ms) = reconnect_ms.filter(|&ms| ms > 0) {
                opt(&mut s, "reconnect-ms", &ms.to_string());
            }
        }
        _ => {}
    }
    if matches!(canonical, "socket" | "pty") {
        if let Some(n) = d.opt_int("backlog")? {
            opt(&mut s, "backlog", &n.to_string());
        }
    }
    if let Some(log) = d.opt_str("logfile")? {
        opt(&mut s, "logfile", log);
    }
    if let Some(ap) = d.opt_bool("logappend")? {
        opt(&mut s, "logappend", onoff(ap));
    }
    d.finish()?;
    if !is_valid_id(id) {
        return Err(QmpError::generic(format!("Invalid chardev id '{id}'")));
    }
    ChardevSpec::parse(&s).map_err(|e| QmpError::generic(capitalize(&e.to_string())))
}

/// QMP's base64 (`ringbuf-write` and `ringbuf-read` with `format=base64`): the standard
/// alphabet, padded on output; on input the padding is optional and so are zero trailing bits,
/// while whitespace or any other character is refused, as QEMU's decoder does.
pub const BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_encode_padding(true)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::device_spec::DeviceDriver;
    use crate::machine::RunState;

    pub use crate::testutil::FakeMachine;

    pub fn run(
        m: &mut FakeMachine,
        fds: &FdStore,
        cmd: &str,
        args: Value,
    ) -> Result<Value, QmpError> {
        let mut passed = VecDeque::new();
        let mut ctx = Context {
            machine: m,
            fds,
            passed_fds: &mut passed,
        };
        execute(&mut ctx, cmd, args.as_object().unwrap())
    }

    fn desc(r: Result<Value, QmpError>) -> String {
        r.unwrap_err().desc
    }

    #[test]
    fn lifecycle_and_queries() {
        let mut m = FakeMachine::new();
        let fds = FdStore::new();
        assert_eq!(
            run(&mut m, &fds, "query-status", json!({})).unwrap(),
            json!({"running": true, "singlestep": false, "status": "running"})
        );
        run(&mut m, &fds, "stop", json!({})).unwrap();
        assert_eq!(
            run(&mut m, &fds, "query-status", json!({})).unwrap()["status"],
            "paused"
        );
        run(&mut m, &fds, "cont", json!({})).unwrap();
        run(&mut m, &fds, "system_reset", json!({})).unwrap();
        run(&mut m, &fds, "system_powerdown", json!({})).unwrap();
        assert_eq!(m.calls, ["stop", "cont", "reset", "powerdown"]);
        m.state = RunState::Shutdown;
        assert_eq!(
            desc(run(&mut m, &fds, "cont", json!({}))),
            "Resetting the Virtual Machine is required"
        );
        run(&mut m, &fds, "quit", json!({})).unwrap();
        assert!(m.quit);
        assert_eq!(
            run(&mut m, &fds, "query-name", json!({})).unwrap(),
            json!({"name": "vm1"})
        );
        assert_eq!(
            run(&mut m, &fds, "query-uuid", json!({})).unwrap(),
            json!({"UUID": NIL_UUID})
        );
        let v = run(&mut m, &fds, "query-version", json!({})).unwrap();
        assert_eq!(v["qemu"], json!({"major": 7, "minor": 2, "micro": 0}));
        let cmds = run(&mut m, &fds, "query-commands", json!({})).unwrap();
        assert_eq!(cmds.as_array().unwrap().len(), COMMANDS.len());
        let backends = run(&mut m, &fds, "query-chardev-backends", json!({})).unwrap();
        assert!(backends
            .as_array()
            .unwrap()
            .contains(&json!({"name": "socket"})));
    }

    #[test]
    fn argument_errors_have_qemu_wording() {
        let mut m = FakeMachine::new();
        let fds = FdStore::new();
        let e = run(&mut m, &fds, "nope", json!({})).unwrap_err();
        assert_eq!(e.class, crate::protocol::ErrorClass::CommandNotFound);
        assert_eq!(e.desc, "The command nope has not been found");
        assert_eq!(
            desc(run(&mut m, &fds, "query-status", json!({"x": 1}))),
            "Parameter 'x' is unexpected"
        );
        assert_eq!(
            desc(run(&mut m, &fds, "chardev-remove", json!({}))),
            "Parameter 'id' is missing"
        );
        assert_eq!(
            desc(run(&mut m, &fds, "chardev-remove", json!({"id": 5}))),
            "Invalid parameter type for 'id', expected: string"
        );
        assert_eq!(
            desc(run(
                &mut m,
                &fds,
                "ringbuf-read",
                json!({"device": "r", "size": "1"})
            )),
            "Invalid parameter type for 'size', expected: integer"
        );
        assert_eq!(
            desc(run(
                &mut m,
                &fds,
                "ringbuf-read",
                json!({"device": "r", "size": 1, "format": "hex"})
            )),
            "Parameter 'format' does not accept value 'hex'"
        );
        assert_eq!(
            desc(run(&mut m, &fds, "human-monitor-command", json!({}))),
            "Parameter 'command-line' is missing"
        );
        assert_eq!(
            desc(run(
                &mut m,
                &fds,
                "chardev-add",
                json!({"id": "c", "backend": {"type": "bogus", "data": {}}})
            )),
            "Parameter 'backend.type' does not accept value 'bogus'"
        );
        assert_eq!(
            desc(run(
                &mut m,
                &fds,
                "chardev-add",
                json!({"id": "c", "backend": {"type": "file", "data": {"oot": "/x"}}})
            )),
            "Parameter 'backend.data.out' is missing"
        );
        assert_eq!(
            desc(run(
                &mut m,
                &fds,
                "chardev-add",
                json!({"id": "c", "backend": {"type": "null", "data": {"x": 1}}})
            )),
            "Parameter 'backend.data.x' is unexpected"
        );
    }

    #[test]
    fn chardev_lifecycle_and_ringbuf() {
        let mut m = FakeMachine::new();
        let fds = FdStore::new();
        let add = |m: &mut FakeMachine, id: &str, backend: Value| {
            run(
                m,
                &fds,
                "chardev-add",
                json!({"id": id, "backend": backend}),
            )
        };
        assert_eq!(
            add(
                &mut m,
                "rb",
                json!({"type": "ringbuf", "data": {"size": 8}})
            )
            .unwrap(),
            json!({})
        );
        assert_eq!(
            desc(add(&mut m, "rb", json!({"type": "null", "data": {}}))),
            "Chardev with id 'rb' already exists"
        );
        assert!(desc(add(
            &mut m,
            "r2",
            json!({"type": "ringbuf", "data": {"size": 5}})
        ))
        .contains("power of two"));
        add(&mut m, "n", json!({"type": "null"})).unwrap();
        run(
            &mut m,
            &fds,
            "ringbuf-write",
            json!({"device": "rb", "data": "hello"}),
        )
        .unwrap();
        run(
            &mut m,
            &fds,
            "ringbuf-write",
            json!({"device": "rb", "data": BASE64.encode(b"\x00\xffz"), "format": "base64"}),
        )
        .unwrap();
        // size 8 keeps the last 8 bytes: "lo\0\xffz" preceded by "hel" overwritten.
        let got = run(
            &mut m,
            &fds,
            "ringbuf-read",
            json!({"device": "rb", "size": 100, "format": "base64"}),
        )
        .unwrap();
        assert_eq!(
            BASE64.decode(got.as_str().unwrap()).unwrap(),
            b"hello\x00\xffz"
        );
        assert_eq!(
            run(
                &mut m,
                &fds,
                "ringbuf-read",
                json!({"device": "rb", "size": 4})
            )
            .unwrap(),
            json!("")
        );
        assert_eq!(
            desc(run(
                &mut m,
                &fds,
                "ringbuf-read",
                json!({"device": "rb", "size": 0})
            )),
            "size must be greater than zero"
        );
        assert_eq!(
            desc(run(
                &mut m,
                &fds,
                "ringbuf-read",
                json!({"device": "n", "size": 1})
            )),
            "n is not a ringbuf device"
        );
        assert_eq!(
            desc(run(
                &mut m,
                &fds,
                "ringbuf-write",
                json!({"device": "zz", "data": ""})
            )),
            "Device 'zz' not found"
        );
        let list = run(&mut m, &fds, "query-chardev", json!({})).unwrap();
        assert_eq!(
            list[1],
            json!({"label": "rb", "filename": "ringbuf", "frontend-open": false,
                   "backend": "ringbuf", "peer-connected": true, "dropped-bytes": 0})
        );
        run(&mut m, &fds, "chardev-send-break", json!({"id": "rb"})).unwrap();
        assert_eq!(
            desc(run(&mut m, &fds, "chardev-send-break", json!({"id": "no"}))),
            "Chardev 'no' not found"
        );
        run(
            &mut m,
            &fds,
            "chardev-change",
            json!({"id": "n", "backend": {"type": "ringbuf", "data": {}}}),
        )
        .unwrap();
        assert_eq!(m.registry.list()[0].kind, "ringbuf");
        assert_eq!(
            desc(run(
                &mut m,
                &fds,
                "chardev-change",
                json!({"id": "x", "backend": {"type": "null"}})
            )),
            "Chardev 'x' does not exist"
        );
        run(&mut m, &fds, "chardev-remove", json!({"id": "n"})).unwrap();
        assert_eq!(
            desc(run(&mut m, &fds, "chardev-remove", json!({"id": "n"}))),
            "Chardev 'n' not found"
        );
    }

    #[test]
    fn pty_chardev_returns_its_path() {
        let mut m = FakeMachine::new();
        let fds = FdStore::new();
        let r = run(
            &mut m,
            &fds,
            "chardev-add",
            json!({"id": "p", "backend": {"type": "pty", "data": {}}}),
        )
        .unwrap();
        assert!(r["pty"].as_str().unwrap().starts_with("/dev/pts/"), "{r}");
    }

    #[test]
    fn socket_backend_translation() {
        let spec = backend_to_spec(
            "s",
            json!({"type": "socket", "data": {
                "addr": {"type": "unix", "data": {"path": "/tmp/a,b"}}, "server": true, "wait": false}})
            .as_object()
            .unwrap(),
        )
        .unwrap();
        assert_eq!(
            spec.to_string(),
            "socket,id=s,path=/tmp/a,,b,server=on,wait=off"
        );
        let spec = backend_to_spec(
            "t",
            json!({"type": "socket", "data": {
                "addr": {"type": "inet", "host": "127.0.0.1", "port": "4444"}, "server": false,
                "reconnect": 2}})
            .as_object()
            .unwrap(),
        )
        .unwrap();
        assert_eq!(
            spec.to_string(),
            "socket,id=t,host=127.0.0.1,port=4444,reconnect-ms=2000"
        );
        let spec = backend_to_spec(
            "f",
            json!({"type": "socket", "data": {"addr": {"type": "fd", "data": {"str": "myfd"}}}})
                .as_object()
                .unwrap(),
        )
        .unwrap();
        assert!(matches!(
            &spec.backend,
            BackendSpec::Socket(s) if s.addr == SocketAddrSpec::FdName("myfd".into())
        ));
        let spec = backend_to_spec(
            "u",
            json!({"type": "udp", "data": {
                "remote": {"type": "inet", "data": {"host": "localhost", "port": "5555"}},
                "local": {"type": "inet", "data": {"host": "", "port": "0"}}}})
            .as_object()
            .unwrap(),
        )
        .unwrap();
        assert_eq!(spec.to_string(), "udp,id=u,host=localhost,port=5555");
        assert!(backend_to_spec(
            "v",
            json!({"type": "socket", "data": {"addr": {"type": "unix", "data": {"path": "/x"}}, "telnet": true}})
                .as_object()
                .unwrap()
        )
        .is_err());
    }

    #[test]
    fn getfd_closefd_and_fd_chardev() {
        let mut m = FakeMachine::new();
        let fds = FdStore::new();
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut passed = VecDeque::new();
        passed.push_back(OwnedFd::from(theirs));
        let mut ctx = Context {
            machine: &mut m,
            fds: &fds,
            passed_fds: &mut passed,
        };
        let args = json!({"fdname": "myfd"});
        execute(&mut ctx, "getfd", args.as_object().unwrap()).unwrap();
        assert_eq!(
            execute(&mut ctx, "getfd", args.as_object().unwrap())
                .unwrap_err()
                .desc,
            "No file descriptor supplied via SCM_RIGHTS"
        );
        assert!(fds.contains("myfd"));
        let add = json!({"id": "viafd", "backend": {"type": "socket", "data": {
            "addr": {"type": "fd", "data": {"str": "myfd"}}, "server": false}}});
        execute(&mut ctx, "chardev-add", add.as_object().unwrap()).unwrap();
        assert!(!fds.contains("myfd"));
        // The chardev owns the passed end now: bytes written to it reach `ours`.
        let written = m
            .registry
            .with("viafd", |b| b.write(b"ping"))
            .unwrap()
            .unwrap();
        assert_eq!(written, 4);
        let mut got = [0u8; 4];
        ours.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut r = &ours;
        let mut n = 0;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while n < 4 && std::time::Instant::now() < deadline {
            m.registry
                .with("viafd", |b| {
                    // Flushes when the socket is writable.
                    let _ = chardev::poll_backends(&mut [b], 10);
                })
                .unwrap();
            n += std::io::Read::read(&mut r, &mut got[n..]).unwrap_or(0);
        }
        assert_eq!(&got, b"ping");
        let mut ctx = Context {
            machine: &mut m,
            fds: &fds,
            passed_fds: &mut passed,
        };
        let close = json!({"fdname": "myfd"});
        assert_eq!(
            execute(&mut ctx, "closefd", close.as_object().unwrap())
                .unwrap_err()
                .desc,
            "File descriptor named 'myfd' not found"
        );
        // A non-socket named fd is refused and stays in the store.
        fds.insert("file", std::fs::File::open("/dev/null").unwrap().into())
            .unwrap();
        let add = json!({"id": "bad", "backend": {"type": "socket", "data": {
            "addr": {"type": "fd", "data": {"str": "file"}}}}});
        assert!(execute(&mut ctx, "chardev-add", add.as_object().unwrap()).is_err());
        assert!(fds.contains("file"));
        execute(
            &mut ctx,
            "closefd",
            json!({"fdname": "file"}).as_object().unwrap(),
        )
        .unwrap();
    }

    /// A vsock device as the VMM would report one.
    pub fn sample_vsock() -> crate::machine::VsockStatus {
        crate::machine::VsockStatus {
            id: "vsock0".into(),
            guest_cid: 3,
            uds_path: "/tmp/v.sock".into(),
            connections: vec![crate::machine::VsockConnection {
                local_port: 1 << 30,
                peer_port: 5000,
                host_initiated: true,
                state: "established".into(),
                bytes_to_host: 7,
                bytes_to_guest: 9,
            }],
            counters: vec![("malformed-packets", 2), ("transport-resets", 1)],
        }
    }

    #[test]
    fn query_vsock() {
        let mut m = FakeMachine::new();
        let fds = FdStore::new();
        assert_eq!(
            desc(run(&mut m, &fds, "query-vsock", json!({}))),
            "This machine has no vsock device"
        );
        m.vsock = Some(sample_vsock());
        assert_eq!(
            run(&mut m, &fds, "query-vsock", json!({})).unwrap(),
            json!({
                "id": "vsock0", "guest-cid": 3, "uds-path": "/tmp/v.sock",
                "connections": [{"local-port": 1073741824u32, "peer-port": 5000,
                    "host-initiated": true, "state": "established",
                    "bytes-to-host": 7, "bytes-to-guest": 9}],
                "counters": {"malformed-packets": 2, "transport-resets": 1},
            })
        );
        assert!(desc(run(&mut m, &fds, "query-vsock", json!({"x": 1}))).contains("x"));
    }

    #[test]
    fn ports_hotplug() {
        let mut m = FakeMachine::new();
        let fds = FdStore::new();
        run(
            &mut m,
            &fds,
            "chardev-add",
            json!({"id": "c1", "backend": {"type": "ringbuf"}}),
        )
        .unwrap();
        run(
            &mut m,
            &fds,
            "device_add",
            json!({"driver": "virtserialport", "id": "p1", "name": "org.x.1", "chardev": "c1", "nr": 2}),
        )
        .unwrap();
        assert_eq!(
            desc(run(&mut m, &fds, "device_add", json!({"driver": "e1000"}))),
            "'e1000' is not a valid device model name"
        );
        assert_eq!(
            desc(run(
                &mut m,
                &fds,
                "device_add",
                json!({"driver": "virtconsole", "speed": 1})
            )),
            "Property 'virtconsole.speed' not found"
        );
        let ports = run(&mut m, &fds, "query-virtio-serial", json!({})).unwrap();
        assert_eq!(
            ports,
            json!([{"id": "p1", "driver": "virtserialport", "bus": "vser0.0", "nr": 2,
                    "name": "org.x.1", "chardev": "c1", "guest-connected": false,
                    "host-connected": false}])
        );
        assert_eq!(
            desc(run(&mut m, &fds, "chardev-remove", json!({"id": "c1"}))),
            "Chardev 'c1' is busy"
        );
        let e = run(&mut m, &fds, "device_del", json!({"id": "p9"})).unwrap_err();
        assert_eq!(e.class, crate::protocol::ErrorClass::DeviceNotFound);
        run(&mut m, &fds, "device_del", json!({"id": "p1"})).unwrap();
        assert_eq!(m.ports.len(), 0);
        let _ = DeviceDriver::VirtConsole;
    }

    #[test]
    fn base64_is_standard_padded_and_lenient_only_about_padding() {
        for data in [&b""[..], b"f", b"fo", b"foo", b"foob", b"fooba", b"foobar"] {
            assert_eq!(BASE64.decode(BASE64.encode(data)).unwrap(), data);
        }
        assert_eq!(BASE64.encode(b"foobar"), "Zm9vYmFy");
        assert_eq!(BASE64.encode(b"fo"), "Zm8=");
        assert_eq!(BASE64.encode(b"\xfb\xff"), "+/8=");
        assert_eq!(BASE64.decode("Zm8").unwrap(), b"fo");
        assert_eq!(BASE64.decode("Zm8=").unwrap(), b"fo");
        assert_eq!(
            BASE64.decode("Zm9").unwrap(),
            b"fo",
            "non-zero trailing bits"
        );
        for bad in ["Z", "Zm9v!", "Zm9v Zm9v", "Zm9v\n", "Zm=8", "-_8="] {
            assert!(BASE64.decode(bad).is_err(), "{bad:?} decoded");
        }
    }
}
