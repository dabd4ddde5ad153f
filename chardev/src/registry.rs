//! Named chardevs: the `--chardev` set and what `chardev-add`, `chardev-change`,
//! `chardev-remove`, `query-chardev` and `ringbuf-read` act on.
//!
//! The registry keeps every chardev behind a shared slot. A frontend gets a [`Handle`] with
//! [`Registry::take`]; the handle is itself a [`Backend`] that forwards to the slot, so the
//! registry can still report on the chardev, swap it ([`Registry::change`]) or read its ring
//! while the frontend uses it. A chardev is **in use** while a handle to it lives; removing it
//! then fails as busy. A mux (`mux,chardev=BASE` or `mux=on`) holds a handle to its base, so the
//! base is busy while the mux exists, and hands out one handle per frontend.
//!
//! This module does no I/O of its own, except waiting for clients when asked to.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::backend::{
    send_break, Backend, Event, LineControl, LineParams, ModemStatus, Readiness, RingAccess,
};
use crate::error::{Error, Result};
use crate::mux::Mux;
use crate::poller::{Registrar, Token};
use crate::spec::{BackendSpec, ChardevSpec};

/// One chardev's shared state.
struct Slot {
    backend: Box<dyn Backend>,
    /// Events to deliver after a `change`.
    pending: Vec<Event>,
    /// The registrar the frontend attached the chardev to; a `change` attaches the new
    /// backend to it after detaching the old one.
    reg: Option<Registrar>,
    /// Output dropped by the backends a `change` replaced: `dropped-bytes` counts over the
    /// chardev's life, not its current backend's.
    dropped_before: u64,
}

impl Slot {
    fn dropped_bytes(&self) -> u64 {
        self.dropped_before + self.backend.dropped_bytes()
    }
}

type SharedSlot = Arc<Mutex<Slot>>;

fn lock(slot: &SharedSlot) -> MutexGuard<'_, Slot> {
    // A panic while holding the lock leaves a backend in a state as good as any: keep going.
    slot.lock().unwrap_or_else(|p| p.into_inner())
}

/// A frontend's hold on a registered chardev. Dropping it makes the chardev free again.
pub struct Handle {
    slot: SharedSlot,
}

impl Handle {
    fn with<R>(&self, f: impl FnOnce(&mut Slot) -> R) -> R {
        f(&mut lock(&self.slot))
    }
}

impl Drop for Handle {
    /// The frontend is gone: nobody polls the chardev until the next one attaches it.
    fn drop(&mut self) {
        self.detach();
    }
}

impl Backend for Handle {
    fn kind(&self) -> &'static str {
        self.with(|s| s.backend.kind())
    }
    fn filename(&self) -> String {
        self.with(|s| s.backend.filename())
    }
    fn attach(&mut self, reg: Registrar) {
        self.with(|s| {
            s.reg = Some(reg.clone());
            s.backend.attach(reg);
        })
    }
    fn detach(&mut self) {
        self.with(|s| {
            s.reg = None;
            s.backend.detach();
        })
    }
    fn on_ready(&mut self, token: Token, readiness: Readiness) {
        self.with(|s| s.backend.on_ready(token, readiness))
    }
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.with(|s| s.backend.read(buf))
    }
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.with(|s| s.backend.write(data))
    }
    fn set_input_wanted(&mut self, wanted: bool) {
        self.with(|s| s.backend.set_input_wanted(wanted))
    }
    fn is_connected(&self) -> bool {
        self.with(|s| s.backend.is_connected())
    }
    fn take_events(&mut self) -> Vec<Event> {
        self.with(|s| {
            let mut evs = std::mem::take(&mut s.pending);
            evs.extend(s.backend.take_events());
            evs
        })
    }
    fn window_size(&self) -> Option<(u16, u16)> {
        self.with(|s| s.backend.window_size())
    }
    fn dropped_bytes(&self) -> u64 {
        self.with(|s| s.dropped_bytes())
    }
    fn wait_for_client(&mut self, timeout: Option<Duration>) -> io::Result<bool> {
        self.with(|s| s.backend.wait_for_client(timeout))
    }
    fn line(&mut self) -> Option<&mut dyn LineControl> {
        if self.with(|s| s.backend.line().is_some()) {
            Some(self)
        } else {
            None
        }
    }
    fn ring(&mut self) -> Option<&mut dyn RingAccess> {
        if self.with(|s| s.backend.ring().is_some()) {
            Some(self)
        } else {
            None
        }
    }
}

/// The line of the chardev behind the handle (which a `change` may have swapped for one
/// without: then these do nothing).
impl LineControl for Handle {
    fn send_break(&mut self) {
        self.with(|s| send_break(s.backend.as_mut()))
    }
    fn set_line_params(&mut self, params: LineParams) {
        self.with(|s| {
            if let Some(l) = s.backend.line() {
                l.set_line_params(params);
            }
        })
    }
    fn set_modem_control(&mut self, dtr: bool, rts: bool) {
        self.with(|s| {
            if let Some(l) = s.backend.line() {
                l.set_modem_control(dtr, rts);
            }
        })
    }
    fn modem_status(&mut self) -> Option<ModemStatus> {
        self.with(|s| s.backend.line().and_then(|l| l.modem_status()))
    }
}

/// The ring of the chardev behind the handle.
impl RingAccess for Handle {
    fn ringbuf_read(&mut self, max: usize) -> io::Result<Vec<u8>> {
        self.with(|s| match s.backend.ring() {
            Some(r) => r.ringbuf_read(max),
            None => Err(io::ErrorKind::Unsupported.into()),
        })
    }
    fn ringbuf_write(&mut self, data: &[u8]) -> io::Result<()> {
        self.with(|s| match s.backend.ring() {
            Some(r) => r.ringbuf_write(data),
            None => Err(io::ErrorKind::Unsupported.into()),
        })
    }
}

/// What the registry holds for an id.
enum Entry {
    Plain(SharedSlot),
    Mux(Mux),
}

impl Entry {
    fn in_use(&self) -> bool {
        match self {
            Entry::Plain(slot) => Arc::strong_count(slot) > 1,
            Entry::Mux(m) => m.frontends() > 0,
        }
    }
}

/// One line of `query-chardev`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChardevInfo {
    /// The id.
    pub label: String,
    /// The backend's type name.
    pub kind: &'static str,
    /// The backend's `filename()`.
    pub filename: String,
    /// Whether a frontend (or a mux) uses it.
    pub in_use: bool,
    /// Whether a peer is connected.
    pub connected: bool,
    /// Output dropped for want of a peer.
    pub dropped_bytes: u64,
}

/// The named chardevs.
#[derive(Default)]
pub struct Registry {
    entries: BTreeMap<String, Entry>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Registry::default()
    }

    /// Create and register the chardev `spec` describes. `mux=on` registers `ID-base` with
    /// the backend and a mux `ID` over it; a `mux` spec needs its base registered first.
    pub fn add(&mut self, spec: &ChardevSpec) -> Result<()> {
        if self.entries.contains_key(&spec.id) {
            return Err(Error::Duplicate(spec.id.clone()));
        }
        if let BackendSpec::Mux(m) = &spec.backend {
            let base = self.take(&m.chardev)?;
            let mux = Mux::new(&spec.id, base);
            self.entries.insert(spec.id.clone(), Entry::Mux(mux));
            return Ok(());
        }
        if spec.mux {
            let base_id = spec.mux_base_id();
            if self.entries.contains_key(&base_id) {
                return Err(Error::Duplicate(base_id));
            }
            let backend = crate::create(spec)?;
            self.insert(&base_id, backend)?;
            let base = self.take(&base_id)?;
            let mux = Mux::new(&spec.id, base);
            self.entries.insert(spec.id.clone(), Entry::Mux(mux));
            return Ok(());
        }
        let backend = crate::create(spec)?;
        self.insert(&spec.id, backend)
    }

    /// Register an already created backend under `id`.
    pub fn insert(&mut self, id: &str, backend: Box<dyn Backend>) -> Result<()> {
        if self.entries.contains_key(id) {
            return Err(Error::Duplicate(id.to_string()));
        }
        let slot = Arc::new(Mutex::new(Slot {
            dropped_before: 0,
            backend,
            pending: Vec::new(),
            reg: None,
        }));
        self.entries.insert(id.to_string(), Entry::Plain(slot));
        Ok(())
    }

    /// Whether `id` is registered.
    pub fn contains(&self, id: &str) -> bool {
        self.entries.contains_key(id)
    }

    /// The registered ids, sorted.
    pub fn ids(&self) -> Vec<String> {
        self.entries.keys().cloned().collect()
    }

    /// Whether a frontend uses `id`.
    pub fn in_use(&self, id: &str) -> Result<bool> {
        self.entries
            .get(id)
            .map(Entry::in_use)
            .ok_or_else(|| Error::NotFound(id.to_string()))
    }

    /// Attach a frontend: a handle to `id`. A plain chardev has one frontend at a time
    /// ("already in use"); a mux gives each frontend its own handle, up to its maximum.
    pub fn take(&mut self, id: &str) -> Result<Box<dyn Backend>> {
        match self.entries.get_mut(id) {
            None => Err(Error::NotFound(id.to_string())),
            Some(Entry::Mux(m)) => m.add_frontend().map(|f| Box::new(f) as Box<dyn Backend>),
            Some(e @ Entry::Plain(_)) if e.in_use() => Err(Error::InUse(id.to_string())),
            Some(Entry::Plain(slot)) => Ok(Box::new(Handle { slot: slot.clone() })),
        }
    }

    /// [`Registry::take`] for a monitor: on a mux, the monitor's frontend does not take the
    /// focus from a device's (see [`Mux::add_background_frontend`]).
    pub fn take_for_monitor(&mut self, id: &str) -> Result<Box<dyn Backend>> {
        match self.entries.get_mut(id) {
            Some(Entry::Mux(m)) => m
                .add_background_frontend()
                .map(|f| Box::new(f) as Box<dyn Backend>),
            _ => self.take(id),
        }
    }

    /// Run `f` on chardev `id`, whether or not a frontend uses it (query, `ringbuf-read`,
    /// `chardev-send-break`, waiting for a client). For a mux, `f` gets the base.
    pub fn with<R>(&mut self, id: &str, f: impl FnOnce(&mut dyn Backend) -> R) -> Result<R> {
        match self.entries.get_mut(id) {
            None => Err(Error::NotFound(id.to_string())),
            Some(Entry::Plain(slot)) => Ok(f(lock(slot).backend.as_mut())),
            Some(Entry::Mux(m)) => Ok(m.with_base(f)),
        }
    }

    /// A break for the frontend of `id` (`chardev-send-break`): the frontend sees
    /// [`Event::Break`] on its next `take_events` (a UART sets BI). Returns whether the caller
    /// must wake the frontend so that it looks soon: a plain chardev in use has no fd that
    /// signals this; a mux wakes its focused frontend itself; without a frontend the break is
    /// dropped, as in QEMU.
    pub fn send_break_to_frontend(&mut self, id: &str) -> Result<bool> {
        match self.entries.get_mut(id) {
            None => Err(Error::NotFound(id.to_string())),
            Some(Entry::Mux(m)) => {
                m.send_break_to_focus();
                Ok(false)
            }
            Some(e @ Entry::Plain(_)) if !e.in_use() => Ok(false),
            Some(Entry::Plain(slot)) => {
                lock(slot).pending.push(Event::Break);
                Ok(true)
            }
        }
    }

    /// Replace the backend of `id` (`chardev-change`), in place under its frontend, which
    /// sees `Closed`/`Opened` as the connection state changes; the old backend is detached from the
    /// frontend's registrar and the new one attached to it. Guest output the old backend still
    /// held goes to the new one first; what the new one does not take counts as dropped, and
    /// so do the old one's drops (`dropped-bytes` is the chardev's, across changes).
    /// Returns the old backend. Muxes cannot be changed.
    pub fn change(&mut self, id: &str, backend: Box<dyn Backend>) -> Result<Box<dyn Backend>> {
        match self.entries.get_mut(id) {
            None => Err(Error::NotFound(id.to_string())),
            Some(Entry::Mux(_)) => Err(Error::Unsupported {
                id: id.to_string(),
                reason: "a mux cannot be changed",
            }),
            Some(Entry::Plain(slot)) => {
                let mut s = lock(slot);
                let was = s.backend.is_connected();
                let now = backend.is_connected();
                let mut old = std::mem::replace(&mut s.backend, backend);
                // Events the old backend had not delivered no longer mean anything.
                old.take_events();
                old.detach();
                if let Some(reg) = s.reg.clone() {
                    s.backend.attach(reg);
                }
                let unsent = old.take_unsent();
                let mut handed = 0;
                while handed < unsent.len() {
                    match s.backend.write(&unsent[handed..]) {
                        Ok(n) if n > 0 => handed += n,
                        _ => break,
                    }
                }
                s.dropped_before += old.dropped_bytes() + (unsent.len() - handed) as u64;
                if was {
                    s.pending.push(Event::Closed);
                }
                if now {
                    s.pending.push(Event::Opened);
                }
                Ok(old)
            }
        }
    }

    /// Unregister `id` (`chardev-remove`); fails as busy while a frontend or a mux uses it.
    pub fn remove(&mut self, id: &str) -> Result<()> {
        match self.entries.get(id) {
            None => Err(Error::NotFound(id.to_string())),
            Some(e) if e.in_use() => Err(Error::Busy(id.to_string())),
            Some(_) => {
                self.entries.remove(id);
                Ok(())
            }
        }
    }

    /// `query-chardev`.
    pub fn list(&mut self) -> Vec<ChardevInfo> {
        let mut out = Vec::new();
        for id in self.ids() {
            let Ok(in_use) = self.in_use(&id) else {
                continue;
            };
            let is_mux = matches!(self.entries.get(&id), Some(Entry::Mux(_)));
            // Drops of backends a `change` replaced count too.
            let replaced = match self.entries.get(&id) {
                Some(Entry::Plain(slot)) => lock(slot).dropped_before,
                _ => 0,
            };
            if let Ok(info) = self.with(&id, |b| ChardevInfo {
                label: id.clone(),
                kind: if is_mux { "mux" } else { b.kind() },
                filename: b.filename(),
                in_use,
                connected: b.is_connected(),
                dropped_bytes: replaced + b.dropped_bytes(),
            }) {
                out.push(info);
            }
        }
        out
    }

    /// Wait for the first client of every chardev configured with `wait=on`, at most
    /// `timeout` each. Returns the ids that timed out.
    pub fn wait_for_clients(&mut self, timeout: Option<Duration>) -> Result<Vec<String>> {
        let mut timed_out = Vec::new();
        for id in self.ids() {
            let ok = self
                .with(&id, |b| b.wait_for_client(timeout))?
                .map_err(|e| Error::io(&id, "wait for a client on", id.clone(), e))?;
            if !ok {
                timed_out.push(id);
            }
        }
        Ok(timed_out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{read_n, wait_event};
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    fn add(r: &mut Registry, s: &str) -> Result<()> {
        r.add(&ChardevSpec::parse(s)?)
    }

    #[test]
    fn add_take_busy_remove() {
        let mut r = Registry::new();
        add(&mut r, "ringbuf,id=rb,size=16").unwrap();
        assert_eq!(
            add(&mut r, "null,id=rb").unwrap_err().to_string(),
            "chardev with id 'rb' already exists"
        );
        assert_eq!(
            add(&mut r, "bogus,id=x").unwrap_err().to_string(),
            "unknown chardev backend 'bogus'"
        );
        let mut h = r.take("rb").unwrap();
        assert!(r.in_use("rb").unwrap());
        assert_eq!(
            r.take("rb").err().unwrap().to_string(),
            "chardev 'rb' is already in use"
        );
        assert_eq!(
            r.remove("rb").unwrap_err().to_string(),
            "chardev 'rb' is busy"
        );
        // The registry still reaches it while the frontend uses it (ringbuf-read).
        h.write(b"guest said").unwrap();
        let got = r
            .with("rb", |b| b.ring().unwrap().ringbuf_read(64))
            .unwrap()
            .unwrap();
        assert_eq!(got, b"guest said");
        drop(h);
        assert!(!r.in_use("rb").unwrap());
        r.remove("rb").unwrap();
        assert_eq!(
            r.remove("rb").unwrap_err().to_string(),
            "chardev 'rb' not found"
        );
        assert!(r.take("nope").is_err());
    }

    #[test]
    fn change_hands_unsent_output_to_the_new_backend_and_keeps_the_drop_count() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Registry::new();
        // A server nobody connected to: output waits in its 8-byte replay ring.
        let spec = format!(
            "socket,id=c,path={},server=on,wait=off,backlog=8",
            dir.path().join("s").display()
        );
        add(&mut r, &spec).unwrap();
        let mut h = r.take("c").unwrap();
        assert_eq!(h.write(b"0123456789AB").unwrap(), 12);
        assert_eq!(h.dropped_bytes(), 4);
        // The new backend's ring holds 4 of the 8 bytes handed over; 4 more are dropped.
        let rb = crate::create(&ChardevSpec::parse("ringbuf,id=c,size=4").unwrap()).unwrap();
        r.change("c", rb).unwrap();
        assert_eq!(h.ring().unwrap().ringbuf_read(64).unwrap(), b"89AB");
        assert_eq!(h.dropped_bytes(), 8);
        let info = r.list().into_iter().find(|i| i.label == "c").unwrap();
        assert_eq!(info.dropped_bytes, 8);
    }

    #[test]
    fn change_swaps_under_the_frontend() {
        let mut r = Registry::new();
        add(&mut r, "null,id=c").unwrap();
        let mut h = r.take("c").unwrap();
        h.write(b"into null").unwrap();
        let rb = crate::create(&ChardevSpec::parse("ringbuf,id=c").unwrap()).unwrap();
        let old = r.change("c", rb).unwrap();
        assert_eq!(old.kind(), "null");
        assert_eq!(h.kind(), "ringbuf");
        // null was connected, so is the ringbuf: Closed then Opened.
        assert_eq!(h.take_events(), vec![Event::Closed, Event::Opened]);
        h.write(b"into ring").unwrap();
        assert_eq!(h.ring().unwrap().ringbuf_read(64).unwrap(), b"into ring");
    }

    #[test]
    fn send_break_reaches_the_frontend() {
        let mut r = Registry::new();
        add(&mut r, "null,id=c").unwrap();
        add(&mut r, "ringbuf,id=m,mux=on").unwrap();
        // No frontend: nothing to deliver, nothing to wake.
        assert!(!r.send_break_to_frontend("c").unwrap());
        let mut h = r.take("c").unwrap();
        h.take_events();
        assert!(r.send_break_to_frontend("c").unwrap());
        assert_eq!(h.take_events(), vec![Event::Break]);
        // A mux hands it to the focused frontend and wakes it itself.
        let mut f = r.take("m").unwrap();
        f.take_events();
        assert!(!r.send_break_to_frontend("m").unwrap());
        assert_eq!(f.take_events(), vec![Event::Break]);
        assert!(matches!(
            r.send_break_to_frontend("nope"),
            Err(Error::NotFound(_))
        ));
    }

    #[test]
    fn list_reports_each_chardev() {
        let mut r = Registry::new();
        add(&mut r, "null,id=a").unwrap();
        add(&mut r, "ringbuf,id=b").unwrap();
        let _h = r.take("b").unwrap();
        let l = r.list();
        assert_eq!(l.len(), 2);
        assert_eq!(
            (l[0].label.as_str(), l[0].kind, l[0].in_use),
            ("a", "null", false)
        );
        assert_eq!(
            (l[1].label.as_str(), l[1].kind, l[1].in_use),
            ("b", "ringbuf", true)
        );
    }

    #[test]
    fn mux_on_registers_base_and_mux_and_guards_removal() {
        let mut r = Registry::new();
        add(&mut r, "ringbuf,id=con,mux=on").unwrap();
        assert_eq!(r.ids(), vec!["con".to_string(), "con-base".to_string()]);
        assert_eq!(
            r.remove("con-base").unwrap_err().to_string(),
            "chardev 'con-base' is busy"
        );
        let mut uart = r.take("con").unwrap();
        let mut mon = r.take("con").unwrap();
        uart.write(b"u").unwrap();
        mon.write(b"m").unwrap();
        assert_eq!(
            r.with("con-base", |b| b.ring().unwrap().ringbuf_read(8))
                .unwrap()
                .unwrap(),
            b"um"
        );
        assert_eq!(
            r.remove("con").unwrap_err().to_string(),
            "chardev 'con' is busy"
        );
        drop(uart);
        drop(mon);
        r.remove("con").unwrap();
        r.remove("con-base").unwrap();
        // A mux over an existing chardev.
        add(&mut r, "null,id=base").unwrap();
        add(&mut r, "mux,id=m,chardev=base").unwrap();
        assert!(r.in_use("base").unwrap());
        assert_eq!(
            add(&mut r, "mux,id=m2,chardev=missing")
                .unwrap_err()
                .to_string(),
            "chardev 'missing' not found"
        );
        assert_eq!(
            crate::create(&ChardevSpec::parse("mux,id=m3,chardev=base").unwrap())
                .err()
                .unwrap()
                .to_string(),
            "chardev 'm3': a mux needs the chardev registry"
        );
    }

    #[test]
    fn wait_for_clients_times_out_per_id() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.sock");
        let mut r = Registry::new();
        add(
            &mut r,
            &format!("socket,id=w,path={},server=on", path.display()),
        )
        .unwrap();
        add(&mut r, "null,id=n").unwrap();
        let t = Some(std::time::Duration::from_millis(10));
        assert_eq!(r.wait_for_clients(t).unwrap(), vec!["w".to_string()]);
        let _c = UnixStream::connect(&path).unwrap();
        assert!(r.wait_for_clients(t).unwrap().is_empty());
        assert!(r.list()[1].connected);
    }

    #[test]
    fn logfile_records_output_with_and_without_a_peer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.sock");
        let log = dir.path().join("out.log");
        let spec = format!(
            "socket,id=s,path={},server=on,wait=off,backlog=0,logfile={}",
            path.display(),
            log.display()
        );
        let mut b = crate::create(&ChardevSpec::parse(&spec).unwrap()).unwrap();
        b.write(b"nobody listening;").unwrap();
        assert_eq!(b.dropped_bytes(), 17);
        let mut c = UnixStream::connect(&path).unwrap();
        c.set_read_timeout(Some(crate::testutil::DEADLINE)).unwrap();
        wait_event(b.as_mut(), |e| *e == Event::Opened);
        b.write(b" now someone").unwrap();
        let mut got = [0u8; 12];
        c.read_exact(&mut got).unwrap();
        assert_eq!(&got, b" now someone");
        assert_eq!(
            std::fs::read(&log).unwrap(),
            b"nobody listening; now someone"
        );
        // Input is not logged.
        std::io::Write::write_all(&mut c, b"typed").unwrap();
        assert_eq!(read_n(b.as_mut(), 5), b"typed");
        assert_eq!(
            std::fs::read(&log).unwrap(),
            b"nobody listening; now someone"
        );
        drop(b);
        // logappend=on keeps what was there.
        let spec = format!("null,id=n,logfile={},logappend=on", log.display());
        let mut b = crate::create(&ChardevSpec::parse(&spec).unwrap()).unwrap();
        b.write(b"!").unwrap();
        assert_eq!(
            std::fs::read(&log).unwrap(),
            b"nobody listening; now someone!"
        );
    }
}
