//! Explicit fd registration: whoever opens an fd registers it, changes its interest when its
//! state changes, and removes it before closing it.
//!
//! - [`Poller`] is one level-triggered epoll instance. Every registration carries an *owner*
//!   (chosen by whoever hands out the [`Registrar`]: the event loop uses it to find the
//!   frontend to wake) and a *token* (unique across the poller, so an event that was already
//!   collected for an fd removed a moment ago never reaches the fd that reuses its number).
//! - [`Registrar`] is what an owner holds to add, change and remove its fds. It is cheap to
//!   clone and may be used from any thread (epoll_ctl is).
//! - [`FdSet`] is what a backend keeps: its fds with their current interest, registered while
//!   it is attached to a registrar. Changing an interest is one `epoll_ctl` when it really
//!   changes and nothing otherwise; no call ever looks at fds that did not change, so the cost of
//!   an event does not depend on how many fds are open.
//!
//! The rule that makes reused fd numbers safe is the one the rust-vmm VMMs follow: an fd is
//! removed ([`FdSet::close`]) while its owner still holds it open. An [`FdSet`] removes what is
//! left when it is dropped, so a backend declares its `FdSet` before the fields that own fds
//! (struct fields drop in declaration order).
//!
//! This module does no I/O besides `epoll_ctl` and `epoll_wait`, and knows nothing of any
//! frontend or event loop.

use std::collections::HashMap;
use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::backend::{Interest, Readiness};

/// Identifies one registration within a [`Poller`]. Never 0.
pub type Token = u32;

/// The epoll flags for an interest.
fn event_set(interest: Interest) -> EventSet {
    let mut set = EventSet::empty();
    if interest.read {
        set |= EventSet::IN;
    }
    if interest.write {
        set |= EventSet::OUT;
    }
    set
}

/// Backend readiness from epoll flags.
pub fn readiness_of(set: EventSet) -> Readiness {
    Readiness {
        readable: set.contains(EventSet::IN),
        writable: set.contains(EventSet::OUT),
        hangup: set.intersects(EventSet::HANG_UP | EventSet::READ_HANG_UP | EventSet::ERROR),
    }
}

impl Interest {
    /// Neither readable nor writable: the fd is not registered.
    pub const NONE: Interest = Interest {
        read: false,
        write: false,
    };

    /// Whether nothing is wanted.
    pub fn is_none(self) -> bool {
        !self.read && !self.write
    }
}

struct PollerInner {
    epoll: Epoll,
    next_token: AtomicU32,
}

impl PollerInner {
    fn token(&self) -> Token {
        loop {
            let t = self.next_token.fetch_add(1, Ordering::Relaxed);
            if t != 0 {
                return t;
            }
        }
    }
}

/// One event a [`Poller`] reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolledEvent {
    /// The owner the registrar was made for.
    pub owner: u32,
    /// The registration's token.
    pub token: Token,
    /// What the fd is ready for.
    pub readiness: Readiness,
}

/// A level-triggered epoll instance shared by the owners of [`Registrar`]s.
#[derive(Clone)]
pub struct Poller {
    inner: Arc<PollerInner>,
}

impl std::fmt::Debug for Poller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Poller")
            .field("fd", &self.inner.epoll.as_raw_fd())
            .finish()
    }
}

impl Poller {
    /// A new, empty poller.
    pub fn new() -> io::Result<Poller> {
        Ok(Poller {
            inner: Arc::new(PollerInner {
                epoll: Epoll::new()?,
                next_token: AtomicU32::new(1),
            }),
        })
    }

    /// A registrar whose events come back tagged with `owner`.
    pub fn registrar(&self, owner: u32) -> Registrar {
        Registrar {
            inner: self.inner.clone(),
            owner,
        }
    }

    /// Wait at most `timeout_ms` (-1: for ever, 0: not at all) for events, appending at most
    /// `max` of them to `out`. Returns how many were appended; an interrupted wait gives 0.
    pub fn wait(
        &self,
        out: &mut Vec<PolledEvent>,
        max: usize,
        timeout_ms: i32,
    ) -> io::Result<usize> {
        let mut buf = vec![EpollEvent::default(); max.max(1)];
        let n = match self.inner.epoll.wait(timeout_ms, &mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
            Err(e) => return Err(e),
        };
        for ev in &buf[..n] {
            let data = ev.data();
            out.push(PolledEvent {
                owner: (data >> 32) as u32,
                token: data as u32,
                readiness: readiness_of(ev.event_set()),
            });
        }
        Ok(n)
    }
}

impl Poller {
    /// Every fd registered now and what for, as the kernel reports it in
    /// `/proc/self/fdinfo` (for tests, benches and diagnostics: it reads a file).
    pub fn watched(&self) -> io::Result<Vec<(RawFd, Interest)>> {
        let path = format!("/proc/self/fdinfo/{}", self.as_raw_fd());
        let text = std::fs::read_to_string(path)?;
        let mut out = Vec::new();
        for line in text.lines() {
            let mut words = line.split_whitespace();
            if words.next() != Some("tfd:") {
                continue;
            }
            let fd = words.next().and_then(|w| w.parse().ok());
            let events = words
                .skip_while(|w| *w != "events:")
                .nth(1)
                .and_then(|w| u32::from_str_radix(w, 16).ok());
            if let (Some(fd), Some(events)) = (fd, events) {
                let set = EventSet::from_bits_truncate(events);
                out.push((
                    fd,
                    Interest {
                        read: set.contains(EventSet::IN),
                        write: set.contains(EventSet::OUT),
                    },
                ));
            }
        }
        out.sort_by_key(|(fd, _)| *fd);
        Ok(out)
    }
}

impl AsRawFd for Poller {
    fn as_raw_fd(&self) -> RawFd {
        self.inner.epoll.as_raw_fd()
    }
}

/// Bits of an owner that name a part of a frontend (a device's port); the bits above name the
/// frontend.
pub const OWNER_PART_BITS: u32 = 16;

/// The registrars of one frontend's parts: owner = `base | part`, so that the event loop finds
/// the frontend from the owner's high bits and the frontend its part from the low ones.
#[derive(Clone, Debug)]
pub struct OwnerGroup {
    poller: Poller,
    base: u32,
}

impl OwnerGroup {
    /// The group of frontend `frontend` on `poller`.
    pub fn new(poller: &Poller, frontend: u16) -> Self {
        OwnerGroup {
            poller: poller.clone(),
            base: u32::from(frontend) << OWNER_PART_BITS,
        }
    }

    /// The registrar of part `part`.
    pub fn registrar(&self, part: u16) -> Registrar {
        self.poller.registrar(self.base | u32::from(part))
    }
}

/// (frontend, part) of an event's owner, for an [`OwnerGroup`]'s registrars.
pub fn split_owner(owner: u32) -> (u16, u16) {
    ((owner >> OWNER_PART_BITS) as u16, owner as u16)
}

/// An owner's handle on a [`Poller`]: adds, changes and removes fds under that owner.
#[derive(Clone)]
pub struct Registrar {
    inner: Arc<PollerInner>,
    owner: u32,
}

impl std::fmt::Debug for Registrar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registrar")
            .field("owner", &self.owner)
            .finish()
    }
}

impl Registrar {
    /// The owner events of this registrar are tagged with.
    pub fn owner(&self) -> u32 {
        self.owner
    }

    /// Whether `self` and `other` register into the same poller.
    pub fn same_poller(&self, other: &Registrar) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    fn event(&self, token: Token, interest: Interest) -> EpollEvent {
        let data = (u64::from(self.owner) << 32) | u64::from(token);
        EpollEvent::new(event_set(interest), data)
    }

    /// Watch `fd` for `interest` (not empty); returns the new registration's token.
    pub fn add(&self, fd: RawFd, interest: Interest) -> io::Result<Token> {
        let token = self.inner.token();
        self.inner
            .epoll
            .ctl(ControlOperation::Add, fd, self.event(token, interest))?;
        Ok(token)
    }

    /// Change what `fd`, registered with `token`, is watched for.
    pub fn modify(&self, fd: RawFd, token: Token, interest: Interest) -> io::Result<()> {
        self.inner
            .epoll
            .ctl(ControlOperation::Modify, fd, self.event(token, interest))
    }

    /// Stop watching `fd`. Call it while `fd` is still open.
    pub fn remove(&self, fd: RawFd) -> io::Result<()> {
        self.inner
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default())
    }
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    interest: Interest,
    /// The token while the fd is registered (attached and interest not empty).
    token: Option<Token>,
    /// epoll refused the fd (`/dev/null`, a regular file: EPERM): not tried again for the
    /// same interest.
    refused: bool,
}

/// A backend's fds and what it wants each watched for, registered while attached.
#[derive(Debug, Default)]
pub struct FdSet {
    reg: Option<Registrar>,
    entries: HashMap<RawFd, Entry>,
    by_token: HashMap<Token, RawFd>,
}

impl FdSet {
    /// An empty, detached set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the set is attached to a registrar.
    pub fn attached(&self) -> bool {
        self.reg.is_some()
    }

    /// The registrar the set is attached to.
    pub fn registrar(&self) -> Option<&Registrar> {
        self.reg.as_ref()
    }

    /// Register every fd that wants something with `reg` (after leaving any earlier one).
    pub fn attach(&mut self, reg: Registrar) {
        self.detach();
        self.reg = Some(reg);
        for e in self.entries.values_mut() {
            e.refused = false;
        }
        let fds: Vec<RawFd> = self.entries.keys().copied().collect();
        for fd in fds {
            self.register(fd);
        }
    }

    /// Unregister every fd; they stay known with their interest for a later `attach`.
    pub fn detach(&mut self) {
        let fds: Vec<RawFd> = self.by_token.values().copied().collect();
        for fd in fds {
            self.unregister(fd);
        }
        self.reg = None;
    }

    fn register(&mut self, fd: RawFd) {
        let (Some(reg), Some(e)) = (&self.reg, self.entries.get_mut(&fd)) else {
            return;
        };
        if e.token.is_some() || e.interest.is_none() {
            return;
        }
        match reg.add(fd, e.interest) {
            Ok(token) => {
                e.token = Some(token);
                self.by_token.insert(token, fd);
            }
            Err(err) => {
                e.refused = true;
                log::warn!("cannot watch fd {fd}: {err}");
            }
        }
    }

    fn unregister(&mut self, fd: RawFd) {
        let Some(e) = self.entries.get_mut(&fd) else {
            return;
        };
        if let Some(token) = e.token.take() {
            self.by_token.remove(&token);
            if let Some(reg) = &self.reg {
                if let Err(err) = reg.remove(fd) {
                    log::debug!("epoll remove fd {fd}: {err}");
                }
            }
        }
    }

    /// Want `interest` on `fd` from now on (an fd not yet in the set joins it). One
    /// `epoll_ctl` if the registration changes, none otherwise.
    pub fn set(&mut self, fd: RawFd, interest: Interest) {
        let e = self.entries.entry(fd).or_insert(Entry {
            interest: Interest::NONE,
            token: None,
            refused: false,
        });
        if e.interest == interest
            && (e.token.is_some() || e.refused || interest.is_none() || self.reg.is_none())
        {
            return;
        }
        e.refused = false;
        let old = e.interest;
        e.interest = interest;
        match (e.token, interest.is_none()) {
            (Some(_), true) => self.unregister(fd),
            (Some(token), false) => {
                if old != interest {
                    if let Some(reg) = &self.reg {
                        if let Err(err) = reg.modify(fd, token, interest) {
                            log::warn!("epoll modify fd {fd}: {err}");
                        }
                    }
                }
            }
            (None, false) => self.register(fd),
            (None, true) => {}
        }
    }

    /// Forget `fd`, unregistering it. Call it before closing `fd`.
    pub fn close(&mut self, fd: RawFd) {
        self.unregister(fd);
        self.entries.remove(&fd);
    }

    /// Make the set exactly `wanted`: for a backend with a handful of fds, which says what it
    /// wants after each call. Fds not listed are forgotten (closed ones must have been
    /// [`FdSet::close`]d before they were closed).
    pub fn sync(&mut self, wanted: &[(RawFd, Interest)]) {
        let gone: Vec<RawFd> = self
            .entries
            .keys()
            .filter(|fd| !wanted.iter().any(|(w, _)| w == *fd))
            .copied()
            .collect();
        for fd in gone {
            self.close(fd);
        }
        for &(fd, interest) in wanted {
            self.set(fd, interest);
        }
    }

    /// The fd registered with `token`, if it is one of ours.
    pub fn fd_of(&self, token: Token) -> Option<RawFd> {
        self.by_token.get(&token).copied()
    }

    /// The interest currently wanted on `fd`.
    pub fn interest(&self, fd: RawFd) -> Interest {
        self.entries.get(&fd).map_or(Interest::NONE, |e| e.interest)
    }

    /// How many fds are registered now.
    pub fn registered(&self) -> usize {
        self.by_token.len()
    }
}

impl Drop for FdSet {
    fn drop(&mut self) {
        self.detach();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn drain(p: &Poller) -> Vec<PolledEvent> {
        let mut v = Vec::new();
        p.wait(&mut v, 64, 0).unwrap();
        v
    }

    #[test]
    fn events_carry_owner_and_token_and_follow_interest() {
        let p = Poller::new().unwrap();
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut set = FdSet::new();
        set.set(a.as_raw_fd(), Interest::READ);
        assert_eq!(set.registered(), 0, "nothing registers while detached");
        set.attach(p.registrar(7));
        assert_eq!(set.registered(), 1);
        assert!(drain(&p).is_empty(), "nothing to read yet");
        std::io::Write::write_all(&mut b, b"x").unwrap();
        let ev = drain(&p);
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].owner, 7);
        assert_eq!(set.fd_of(ev[0].token), Some(a.as_raw_fd()));
        assert!(ev[0].readiness.readable);
        // Interest off: unregistered, no more events although still readable.
        set.set(a.as_raw_fd(), Interest::NONE);
        assert_eq!(set.registered(), 0);
        assert!(drain(&p).is_empty());
        // Back on: a new token; the old one is no longer ours.
        let old = ev[0].token;
        set.set(a.as_raw_fd(), Interest::BOTH);
        let ev = drain(&p);
        assert_eq!(ev.len(), 1);
        assert_ne!(ev[0].token, old);
        assert_eq!(set.fd_of(old), None);
        assert!(ev[0].readiness.readable && ev[0].readiness.writable);
    }

    #[test]
    fn close_before_reuse_and_detach_and_drop_unregister() {
        let p = Poller::new().unwrap();
        let mut set = FdSet::new();
        set.attach(p.registrar(1));
        let (a, _b) = UnixStream::pair().unwrap();
        let num = a.as_raw_fd();
        set.set(num, Interest::WRITE);
        assert_eq!(drain(&p).len(), 1);
        set.close(num);
        // The number is reused by a new socket (dup2 closes the old file and puts the new
        // one at the same number at once, so no other thread can take it in between):
        // registering it again works.
        let (c, _d) = UnixStream::pair().unwrap();
        // SAFETY: dup2 onto `num`, which `a` owns; `a` is forgotten below and `num` is owned
        // by the new OwnedFd from then on.
        assert_eq!(unsafe { libc::dup2(c.as_raw_fd(), num) }, num);
        std::mem::forget(a);
        // SAFETY: `num` now holds a duplicate of `c` that nothing else owns.
        let c = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(num) };
        set.set(c.as_raw_fd(), Interest::WRITE);
        let ev = drain(&p);
        assert_eq!(ev.len(), 1);
        assert_eq!(set.fd_of(ev[0].token), Some(num));
        set.detach();
        assert!(drain(&p).is_empty());
        assert_eq!(
            set.interest(num),
            Interest::WRITE,
            "kept for the next attach"
        );
        set.attach(p.registrar(2));
        assert_eq!(drain(&p)[0].owner, 2);
        drop(set);
        assert!(
            drain(&p).is_empty(),
            "a dropped set leaves nothing registered"
        );
    }

    #[test]
    fn an_fd_epoll_refuses_is_not_tried_again_for_the_same_interest() {
        let p = Poller::new().unwrap();
        let null = std::fs::File::open("/dev/null").unwrap();
        let mut set = FdSet::new();
        set.attach(p.registrar(4));
        set.set(null.as_raw_fd(), Interest::READ);
        assert_eq!(set.registered(), 0, "epoll refuses /dev/null");
        assert!(set.entries[&null.as_raw_fd()].refused);
        set.set(null.as_raw_fd(), Interest::READ);
        assert!(set.entries[&null.as_raw_fd()].refused, "no second try");
        set.set(null.as_raw_fd(), Interest::BOTH);
        assert!(
            set.entries[&null.as_raw_fd()].refused,
            "tried again, refused again"
        );
        set.close(null.as_raw_fd());
    }

    #[test]
    fn sync_costs_nothing_when_nothing_changes() {
        let p = Poller::new().unwrap();
        let (a, _b) = UnixStream::pair().unwrap();
        let mut set = FdSet::new();
        set.attach(p.registrar(3));
        set.sync(&[(a.as_raw_fd(), Interest::WRITE)]);
        let first = drain(&p)[0].token;
        set.sync(&[(a.as_raw_fd(), Interest::WRITE)]);
        assert_eq!(drain(&p)[0].token, first, "same registration");
        assert_eq!(p.watched().unwrap(), vec![(a.as_raw_fd(), Interest::WRITE)]);
        set.sync(&[]);
        assert_eq!(set.registered(), 0);
        assert!(drain(&p).is_empty());
        assert!(p.watched().unwrap().is_empty());
    }
}
