//! virtio-vsock (device id 19, virtio 1.2 §5.10): stream sockets between the guest and host
//! unix sockets, in Firecracker's "hybrid vsock" model.
//!
//! - [`packet`]: the 44-byte `virtio_vsock_hdr` and the checks on what the guest sends;
//! - [`conn`]: one connection's state machine and credit-based flow control;
//! - [`muxer`]: the host side: the listener at `PATH` (`CONNECT <port>\n` / `OK <port>\n`),
//!   the `PATH_<port>` sockets guest connections reach, limits, time-outs, and the per-fd
//!   tokens and registration changes the event loop applies;
//! - this file: the [`VirtioDevice`] around them.
//!
//! Queues: receive (0, host → guest packets), transmit (1, guest → host packets), event (2,
//! `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`). Configuration space: `le64 guest_cid`. Only
//! VIRTIO_F_VERSION_1 is offered (no SEQPACKET).
//!
//! Flow: a transmit chain is read (header and payload, across any descriptor boundaries),
//! checked and handed to the muxer, then given back; a malformed one is counted and dropped
//! (answered with an RST when it was addressed well). Receive buffers are filled only from
//! what the muxer has (pull, never push): a connection's host socket is read straight into
//! the guest's buffer, within the guest's credit. The guest's transmit queue waits only while
//! the muxer's queue of RST answers is full.
//!
//! The event loop drives it with [`VirtioDevice::service`] (which also runs the muxer's
//! time-outs: arm a timer for [`VirtioVsock::next_deadline_ns`]), readiness by token
//! ([`VirtioVsock::on_token_ready`]) or, through today's trait, by fd. A guest error in the
//! rings makes the device ask for a reset, as the console does. This module must not block,
//! must not panic on guest data, must not know KVM, and does no host I/O from the register
//! calls a vCPU makes ([`VirtioDevice::reset`] only marks the connections to drop).

pub mod conn;
pub mod muxer;
pub mod packet;

use std::collections::HashMap;
use std::os::unix::io::RawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chardev::{Interest, OwnerGroup, Readiness, Registrar, Token};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

pub use self::conn::ConnState;
pub use self::muxer::{
    ConnectionInfo, FdChange, MuxerCounters, Registration, VsockError, VsockMuxer, LISTENER_TOKEN,
};
use self::packet::{parse_guest_packet, HDR_LEN, MAX_PAYLOAD};
use super::queue::{complete, pop, unpop, ChainError, Direction};
use super::{
    feature, ActivateContext, ActivateError, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1,
};
use crate::Clock;

/// The virtio device id of a socket device.
pub const VIRTIO_ID_VSOCK: u32 = 19;
/// The receive queue (host → guest packets).
pub const RX_QUEUE: usize = 0;
/// The transmit queue (guest → host packets).
pub const TX_QUEUE: usize = 1;
/// The event queue.
pub const EVENT_QUEUE: usize = 2;
/// The size of each queue (as Firecracker).
pub const QUEUE_SIZE: u16 = 256;
/// Configuration space offset of `le64 guest_cid`.
pub const CONFIG_GUEST_CID: usize = 0;
/// Bytes of configuration space.
pub const CONFIG_LEN: usize = 8;
/// Event id: the transport was reset; the guest drops its connections and re-reads its CID.
pub const VIRTIO_VSOCK_EVENT_TRANSPORT_RESET: u32 = 0;
/// Bytes of a `virtio_vsock_event` (`le32 id`).
pub const EVENT_LEN: usize = 4;
/// Descriptors allowed in one chain.
const MAX_CHAIN: usize = QUEUE_SIZE as usize;

/// How to build the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's CID (3..=u32::MAX-1).
    pub guest_cid: u64,
    /// Where host clients connect; guest connections to host port P go to `PATH_P`.
    pub uds_path: PathBuf,
    /// How the event loop learns which fds to watch.
    pub registration: Registration,
}

/// What the device counted, for `query-vsock`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VsockCounters {
    /// Guest packets that failed their checks (short chain, wrong CIDs, bad length, type or
    /// operation), dropped.
    pub malformed_packets: u64,
    /// Guest receive buffers too small for a header, given back empty.
    pub small_rx_buffers: u64,
    /// TRANSPORT_RESET events delivered.
    pub transport_resets: u64,
    /// The host side's counts.
    pub muxer: MuxerCounters,
}

/// The answer to `query-vsock`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockInfo {
    /// The guest's CID.
    pub guest_cid: u64,
    /// The listening socket.
    pub uds_path: PathBuf,
    /// Every connection, by (local port, peer port).
    pub connections: Vec<ConnectionInfo>,
    /// The counters.
    pub counters: VsockCounters,
}

/// State that exists between DRIVER_OK and reset.
struct Active {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    interrupt: Arc<VirtioInterrupt>,
    /// A guest error stopped queue processing until reset.
    broken: bool,
    /// Used rings were updated since the last interrupt.
    used: bool,
}

impl Active {
    fn fail(&mut self, error: &ChainError) {
        if !self.broken {
            log::warn!("virtio-vsock: {error}; the device needs a reset");
        }
        self.broken = true;
        self.interrupt.set_needs_reset();
    }
}

/// The virtio-vsock device. See the module documentation.
pub struct VirtioVsock {
    /// The muxer's fds in the event loop's poller; declared first, it unregisters them before
    /// the muxer closes them.
    registered: PollerRegistrations,
    muxer: VsockMuxer,
    active: Option<Active>,
    kick: bool,
    /// The driver reset the device: drop the connections at the next service.
    reset_pending: bool,
    /// A TRANSPORT_RESET waits for an event buffer.
    event_pending: bool,
    counters: VsockCounters,
    /// One packet: header and the largest payload.
    scratch: Vec<u8>,
}

impl VirtioVsock {
    /// A device for the guest with `config.guest_cid`, listening at `config.uds_path` (which
    /// must not exist yet), reading time from `clock`.
    pub fn new(config: &VsockConfig, clock: Arc<dyn Clock>) -> Result<Self, VsockError> {
        let muxer = VsockMuxer::new(
            config.guest_cid,
            &config.uds_path,
            clock,
            config.registration,
        )?;
        Ok(VirtioVsock {
            registered: PollerRegistrations::default(),
            muxer,
            active: None,
            kick: false,
            reset_pending: false,
            event_pending: false,
            counters: VsockCounters::default(),
            scratch: vec![0u8; HDR_LEN + MAX_PAYLOAD as usize],
        })
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.muxer.guest_cid()
    }

    /// The listening socket's path.
    pub fn uds_path(&self) -> &Path {
        self.muxer.uds_path()
    }

    /// The host side (tokens, fds, connections).
    pub fn muxer(&self) -> &VsockMuxer {
        &self.muxer
    }

    /// What `query-vsock` shows.
    pub fn info(&self) -> VsockInfo {
        VsockInfo {
            guest_cid: self.muxer.guest_cid(),
            uds_path: self.muxer.uds_path().to_owned(),
            connections: self.muxer.connections(),
            counters: VsockCounters {
                muxer: self.muxer.counters(),
                ..self.counters
            },
        }
    }

    /// The registration changes since the last call ([`Registration::Explicit`]): apply them
    /// in order after every call into the device; dropping a [`FdChange::Close`] closes its fd.
    pub fn take_fd_changes(&mut self) -> Vec<FdChange> {
        self.muxer.take_fd_changes()
    }

    /// The event loop saw `readiness` on the fd registered under `token`. Call
    /// [`VirtioDevice::service`] afterwards.
    pub fn on_token_ready(&mut self, token: u32, readiness: Readiness) {
        self.muxer.on_ready(token, readiness);
    }

    /// When [`VirtioDevice::service`] must run next for a time-out, in [`Clock`] nanoseconds.
    pub fn next_deadline_ns(&self) -> Option<u64> {
        self.muxer.next_deadline()
    }

    /// Tell the guest its transport was reset (a machine reset, a snapshot restored, a
    /// host-side reset): every connection is dropped and its host socket closed, the listener
    /// stays, and the guest gets VIRTIO_VSOCK_EVENT_TRANSPORT_RESET as soon as it has an event
    /// buffer posted. After a machine reset that is the rebooted guest's first event buffer:
    /// its driver finds no socket to reset then, and reads its CID again.
    pub fn transport_reset(&mut self) {
        self.muxer.reset();
        self.event_pending = true;
        self.kick = true;
    }

    fn config_bytes(&self) -> [u8; CONFIG_LEN] {
        self.muxer.guest_cid().to_le_bytes()
    }
}

impl VirtioDevice for VirtioVsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn features(&self) -> u64 {
        feature(VIRTIO_F_VERSION_1)
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; 3]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.config_bytes();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| o.checked_sub(CONFIG_GUEST_CID))
                .and_then(|o| config.get(o).copied())
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // The configuration space is read-only.
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        for q in [RX_QUEUE, TX_QUEUE, EVENT_QUEUE] {
            if !ctx.queues.get(q).is_some_and(|q| q.ready()) {
                return Err(ActivateError::QueueNotReady(q));
            }
        }
        self.active = Some(Active {
            mem: ctx.mem,
            queues: ctx.queues,
            interrupt: ctx.interrupt,
            broken: false,
            used: false,
        });
        self.kick = true;
        Ok(())
    }

    fn reset(&mut self) {
        // Runs on a vCPU: the sockets are closed by the next service, on the event loop.
        // A TRANSPORT_RESET still pending stays so: it is for the driver that comes next
        // (the rebooted guest's probe starts with this reset).
        self.active = None;
        self.reset_pending = true;
        self.kick = true;
    }

    fn attach(&mut self, owners: OwnerGroup) {
        self.registered.attach(owners.registrar(0));
        self.registered.apply(&mut self.muxer);
    }

    fn on_ready(&mut self, _part: u16, token: Token, readiness: Readiness) {
        if let Some(local) = self.registered.local_token(token) {
            self.muxer.on_ready(local, readiness);
        }
        self.registered.apply(&mut self.muxer);
    }

    fn service(&mut self) {
        self.run();
        self.registered.apply(&mut self.muxer);
    }

    fn take_kick(&mut self) -> bool {
        std::mem::take(&mut self.kick)
    }
}

impl VirtioVsock {
    /// The work of [`VirtioDevice::service`]: resets, time-outs, queues.
    fn run(&mut self) {
        if std::mem::take(&mut self.reset_pending) {
            self.muxer.reset();
        }
        self.muxer.process_timeouts();
        let Some(active) = self.active.as_mut() else {
            return;
        };
        if active.broken {
            return;
        }
        let result = process_queues(
            active,
            &mut self.muxer,
            &mut self.scratch,
            &mut self.counters,
            &mut self.event_pending,
        );
        let more = match result {
            Ok(more) => more,
            Err(e) => {
                active.fail(&e);
                false
            }
        };
        if std::mem::take(&mut active.used) {
            active.interrupt.signal_used();
        }
        if more {
            self.kick = true;
        }
    }
}

/// The muxer's fds in the event loop's poller ([`Registration::Explicit`]): its registration
/// changes applied in order, its tokens mapped to the poller's. A closed fd is unregistered
/// before it is dropped, so before its number can be reused.
#[derive(Default)]
struct PollerRegistrations {
    reg: Option<Registrar>,
    /// Muxer token → (fd, poller token), for what is registered.
    by_local: HashMap<u32, (RawFd, Token)>,
    /// Poller token → muxer token.
    by_poller: HashMap<Token, u32>,
}

impl Drop for PollerRegistrations {
    fn drop(&mut self) {
        let locals: Vec<u32> = self.by_local.keys().copied().collect();
        for local in locals {
            self.unregister(local);
        }
    }
}

impl PollerRegistrations {
    fn attach(&mut self, reg: Registrar) {
        self.reg = Some(reg);
    }

    fn local_token(&self, token: Token) -> Option<u32> {
        self.by_poller.get(&token).copied()
    }

    /// Apply what the muxer changed since the last call (nothing until attached: the changes
    /// wait in the muxer).
    fn apply(&mut self, muxer: &mut VsockMuxer) {
        if self.reg.is_none() {
            return;
        }
        for change in muxer.take_fd_changes() {
            match change {
                FdChange::Register {
                    token,
                    fd,
                    interest,
                } => self.register(token, fd, interest),
                FdChange::Modify {
                    token,
                    fd,
                    interest,
                } => match self.by_local.get(&token) {
                    Some(&(_, ptoken)) => self.modify(fd, ptoken, interest),
                    None => self.register(token, fd, interest),
                },
                FdChange::Deregister { token, .. } => self.unregister(token),
                // Unregistered first; the fd closes when `fd` drops at the end of the arm.
                FdChange::Close { token, fd, .. } => {
                    self.unregister(token);
                    drop(fd);
                }
            }
        }
    }

    fn register(&mut self, local: u32, fd: RawFd, interest: Interest) {
        let Some(reg) = &self.reg else { return };
        match reg.add(fd, interest) {
            Ok(ptoken) => {
                self.by_local.insert(local, (fd, ptoken));
                self.by_poller.insert(ptoken, local);
            }
            Err(e) => log::warn!("vsock: cannot watch fd {fd}: {e}"),
        }
    }

    fn modify(&self, fd: RawFd, ptoken: Token, interest: Interest) {
        if let Some(reg) = &self.reg {
            if let Err(e) = reg.modify(fd, ptoken, interest) {
                log::warn!("vsock: epoll modify fd {fd}: {e}");
            }
        }
    }

    fn unregister(&mut self, local: u32) {
        let Some((fd, ptoken)) = self.by_local.remove(&local) else {
            return;
        };
        self.by_poller.remove(&ptoken);
        if let Some(reg) = &self.reg {
            if let Err(e) = reg.remove(fd) {
                log::debug!("vsock: epoll remove fd {fd}: {e}");
            }
        }
    }
}

/// One pass: receive buffers (answers already queued), the transmit queue, receive buffers
/// again (its answers), the event queue. Returns whether work was left behind.
fn process_queues(
    active: &mut Active,
    muxer: &mut VsockMuxer,
    scratch: &mut [u8],
    counters: &mut VsockCounters,
    event_pending: &mut bool,
) -> Result<bool, ChainError> {
    let mut more = fill_rx(active, muxer, scratch, counters)?;
    more |= drain_tx(active, muxer, scratch, counters)?;
    more |= fill_rx(active, muxer, scratch, counters)?;
    send_event(active, event_pending, counters)?;
    Ok(more)
}

/// Read, check and hand the guest's packets to the muxer. Returns whether a full pass left
/// packets behind (come back soon).
fn drain_tx(
    active: &mut Active,
    muxer: &mut VsockMuxer,
    scratch: &mut [u8],
    counters: &mut VsockCounters,
) -> Result<bool, ChainError> {
    let Some(queue) = active.queues.get_mut(TX_QUEUE) else {
        return Ok(false);
    };
    for _ in 0..queue.size() {
        if !muxer.can_take_guest_packet() {
            // Resumes when the guest takes the RSTs waiting for receive buffers.
            return Ok(false);
        }
        let Some(elem) = pop(queue, &active.mem, Direction::DeviceReads, MAX_CHAIN)? else {
            return Ok(false);
        };
        let n = elem.read_into(&active.mem, scratch)?;
        match parse_guest_packet(&scratch[..n], muxer.guest_cid()) {
            Ok(pkt) => muxer.on_guest_packet(&pkt),
            Err((e, hdr)) => {
                log::debug!("virtio-vsock: dropping a guest packet: {e}");
                counters.malformed_packets += 1;
                if let (true, Some(hdr)) = (e.wants_rst(), hdr) {
                    muxer.reply_rst(&hdr);
                }
            }
        }
        complete(queue, &active.mem, elem.head, 0)?;
        active.used = true;
    }
    Ok(true)
}

/// Fill the guest's receive buffers with what the muxer has. Returns whether a full pass
/// left packets and buffers behind.
fn fill_rx(
    active: &mut Active,
    muxer: &mut VsockMuxer,
    scratch: &mut [u8],
    counters: &mut VsockCounters,
) -> Result<bool, ChainError> {
    let Some(queue) = active.queues.get_mut(RX_QUEUE) else {
        return Ok(false);
    };
    for _ in 0..queue.size() {
        if !muxer.has_rx() {
            return Ok(false);
        }
        let Some(elem) = pop(queue, &active.mem, Direction::DeviceWrites, MAX_CHAIN)? else {
            return Ok(false);
        };
        let len = elem.len as usize;
        if len < HDR_LEN {
            counters.small_rx_buffers += 1;
            complete(queue, &active.mem, elem.head, 0)?;
            active.used = true;
            continue;
        }
        let room = (len - HDR_LEN).min(MAX_PAYLOAD as usize);
        let (head_bytes, payload) = scratch.split_at_mut(HDR_LEN);
        let Some(hdr) = muxer.next_rx_packet(&mut payload[..room]) else {
            unpop(queue);
            return Ok(false);
        };
        head_bytes.copy_from_slice(&hdr.to_bytes());
        let total = HDR_LEN + (hdr.len as usize).min(room);
        let n = elem.write_from(&active.mem, &scratch[..total])?;
        complete(queue, &active.mem, elem.head, n as u32)?;
        active.used = true;
    }
    Ok(muxer.has_rx())
}

/// Deliver a pending TRANSPORT_RESET into an event buffer.
fn send_event(
    active: &mut Active,
    pending: &mut bool,
    counters: &mut VsockCounters,
) -> Result<(), ChainError> {
    if !*pending {
        return Ok(());
    }
    let Some(queue) = active.queues.get_mut(EVENT_QUEUE) else {
        return Ok(());
    };
    let Some(elem) = pop(queue, &active.mem, Direction::DeviceWrites, MAX_CHAIN)? else {
        return Ok(());
    };
    let n = elem.write_from(
        &active.mem,
        &VIRTIO_VSOCK_EVENT_TRANSPORT_RESET.to_le_bytes(),
    )?;
    complete(queue, &active.mem, elem.head, n as u32)?;
    active.used = true;
    *pending = false;
    counters.transport_resets += 1;
    Ok(())
}

#[cfg(test)]
mod tests;
