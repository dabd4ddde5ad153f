//! Multiport virtio-console (device id 3): console and named serial ports, each coupled to a
//! chardev [`Backend`] the way [`crate::serial_port::SerialPort`] couples a UART to one.
//!
//! Queues follow the spec: port 0 receive/transmit (0, 1), control receive/transmit (2, 3),
//! then receive/transmit for port N at 2N+2 / 2N+3. The control handshake is QEMU's:
//! the guest sends DEVICE_READY, the device answers PORT_ADD for every port; the guest sends
//! PORT_READY per port, the device answers CONSOLE_PORT for a console, PORT_NAME for a named
//! port and PORT_OPEN 1 when the host side is connected. A guest PORT_OPEN is recorded and
//! queued as a [`ConsoleEvent`] for the monitor; a backend peer connecting or going away
//! becomes PORT_OPEN 1/0 to the guest (console ports count as always connected, as in QEMU).
//! Host→guest control messages wait in a bounded backlog until the guest posts control
//! buffers, instead of being dropped.
//!
//! Flow control:
//! - guest → host: a transmit chain is popped only when the previous one went entirely to the
//!   backend; a short write keeps the rest of the element (nothing is dropped, order is kept)
//!   and the port resumes when the backend is writable again. The guest's queue fills and its
//!   writer blocks meanwhile.
//! - host → guest: the backend is read only while the guest has the port open, only into a
//!   receive buffer the guest posted, and never more than that buffer holds.
//!
//! Every chain is checked ([`super::queue`]); a malformed one, or a guest that lies about its
//! rings, makes the device stop processing queues and ask for a reset (DEVICE_NEEDS_RESET and
//! a configuration interrupt). Everything here runs on the event-loop thread, except the
//! register-level calls ([`VirtioDevice::read_config`], [`VirtioDevice::write_config`],
//! [`VirtioDevice::reset`]) that come from a vCPU and do no host I/O. This module must not
//! block, must not buffer host input without a bound, and must not know KVM.

pub mod control;
pub mod port;

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::sync::Arc;

use chardev::{Backend, Event, OwnerGroup, Readiness, Token};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use self::control::{parse_guest_control, GuestControl, HostControl, CONTROL_MSG_LEN};
pub use self::port::{
    validate_port_name, ConsoleError, ConsoleEvent, PortConfig, PortInfo, MAX_PORTS_LIMIT,
};
use super::queue::{self, complete, pop, unpop, ChainError, Direction, Element};
use super::{
    feature, ActivateContext, ActivateError, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1,
};

/// The virtio device id of a console.
pub const VIRTIO_ID_CONSOLE: u32 = 3;
/// Feature bit: the device reports the console size (config cols/rows, RESIZE).
pub const VIRTIO_CONSOLE_F_SIZE: u32 = 0;
/// Feature bit: several ports and the control queues.
pub const VIRTIO_CONSOLE_F_MULTIPORT: u32 = 1;
/// Feature bit: the guest may write single bytes through config `emerg_wr`.
pub const VIRTIO_CONSOLE_F_EMERG_WRITE: u32 = 2;

/// Config space offset of `le16 cols`.
pub const CONFIG_COLS: u64 = 0;
/// Config space offset of `le16 rows`.
pub const CONFIG_ROWS: u64 = 2;
/// Config space offset of `le32 max_nr_ports`.
pub const CONFIG_MAX_NR_PORTS: u64 = 4;
/// Config space offset of `le32 emerg_wr`.
pub const CONFIG_EMERG_WR: u64 = 8;
/// Bytes of config space.
pub const CONFIG_LEN: usize = 12;

/// Size of each data queue (as QEMU).
pub const DATA_QUEUE_SIZE: u16 = 128;
/// Size of each control queue (as QEMU).
pub const CONTROL_QUEUE_SIZE: u16 = 32;
/// The control receive queue (host → guest messages).
pub const CONTROL_RX_QUEUE: usize = 2;
/// The control transmit queue (guest → host messages).
pub const CONTROL_TX_QUEUE: usize = 3;
/// `max_ports` when none is given.
pub const DEFAULT_MAX_PORTS: u32 = 31;

/// Bytes moved between guest memory and a backend per copy.
const IO_CHUNK: usize = 64 * 1024;
/// Emergency-write bytes held for port 0's backend.
const EMERG_CAPACITY: usize = 4096;
/// Host → guest control messages waiting for control buffers.
const CONTROL_BACKLOG: usize = 4096;
/// Rounds of "do I/O, then handle the events it produced" in one service call.
const SERVICE_ROUNDS: usize = 4;
/// No limit beyond the queue size on the descriptors of a chain.
const ANY_CHAIN: usize = usize::MAX;

/// The receive and transmit queue indices of port `nr`.
pub fn port_queues(nr: u32) -> (usize, usize) {
    if nr == 0 {
        (0, 1)
    } else {
        let rx = 2 + 2 * nr as usize;
        (rx, rx + 1)
    }
}

/// A transmit element part-way to the backend.
struct TxElement {
    elem: Element,
    /// Buffer being written.
    buf: usize,
    /// Bytes of that buffer already written.
    offset: u32,
}

struct Port {
    config: PortConfig,
    nr: u32,
    backend: Box<dyn Backend>,
    host_connected: bool,
    /// The guest sent PORT_READY (or, without multiport, set DRIVER_OK).
    guest_ready: bool,
    guest_open: bool,
    tx: Option<TxElement>,
    throttled: bool,
    input_wanted: Option<bool>,
    size: Option<(u16, u16)>,
    output_errors: u64,
}

impl Port {
    fn info(&self) -> PortInfo {
        PortInfo {
            id: self.config.id.clone(),
            nr: self.nr,
            name: self.config.name.clone(),
            chardev: self.config.chardev.clone(),
            console: self.config.console,
            guest_open: self.guest_open,
            host_connected: self.host_connected,
            throttled: self.throttled,
        }
    }
}

/// State that exists between DRIVER_OK and reset.
struct Active {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    interrupt: Arc<VirtioInterrupt>,
    multiport: bool,
    /// The guest sent DEVICE_READY.
    device_ready: bool,
    control_out: VecDeque<Vec<u8>>,
    /// A guest error stopped queue processing until reset.
    broken: bool,
    /// Used rings were updated since the last interrupt.
    used: bool,
}

impl Active {
    /// Queue a control message for the guest, if the guest takes control messages now.
    fn send(&mut self, msg: HostControl) {
        if !self.multiport || !self.device_ready || self.broken {
            return;
        }
        if self.control_out.len() >= CONTROL_BACKLOG {
            log::warn!("virtio-console: control backlog full, dropping {msg:?}");
            return;
        }
        self.control_out.push_back(msg.encode());
    }

    fn raise_interrupt(&mut self) {
        if self.used {
            self.used = false;
            self.interrupt.signal_used();
        }
    }

    fn fail(&mut self, error: &ChainError) {
        if !self.broken {
            log::warn!("virtio-console: {error}; the device needs a reset");
        }
        self.broken = true;
        self.interrupt.set_needs_reset();
    }
}

/// The owner part a port's backend registers under: its port number (below
/// [`MAX_PORTS_LIMIT`], so it fits).
fn port_part(nr: u32) -> u16 {
    u16::try_from(nr).unwrap_or(u16::MAX)
}

/// A multiport virtio-console. See the module documentation.
pub struct VirtioConsole {
    /// Where port backends register their fds (part = port number), once attached.
    owners: Option<OwnerGroup>,
    max_nr_ports: u32,
    ports: BTreeMap<u32, Port>,
    cols: u16,
    rows: u16,
    generation: u32,
    emerg: VecDeque<u8>,
    emerg_dropped: u64,
    kick: bool,
    events: VecDeque<ConsoleEvent>,
    active: Option<Active>,
    scratch: Vec<u8>,
}

impl VirtioConsole {
    /// A console with room for `max_nr_ports` ports (1..=511; MULTIPORT is offered above 1)
    /// and no port yet.
    pub fn new(max_nr_ports: u32) -> Result<Self, ConsoleError> {
        if max_nr_ports == 0 || max_nr_ports > MAX_PORTS_LIMIT {
            return Err(ConsoleError::MaxPorts(max_nr_ports));
        }
        Ok(VirtioConsole {
            owners: None,
            max_nr_ports,
            ports: BTreeMap::new(),
            cols: 0,
            rows: 0,
            generation: 0,
            emerg: VecDeque::new(),
            emerg_dropped: 0,
            kick: false,
            events: VecDeque::new(),
            active: None,
            scratch: vec![0u8; IO_CHUNK],
        })
    }

    /// The `max_ports` the device was built with.
    pub fn max_nr_ports(&self) -> u32 {
        self.max_nr_ports
    }

    /// Add a port (at start-up, or hot-plugged while the guest runs: then the guest gets
    /// PORT_ADD and a configuration interrupt). Returns the port number. Call
    /// [`VirtioDevice::service`] afterwards and re-read the fds to poll.
    pub fn add_port(
        &mut self,
        config: PortConfig,
        mut backend: Box<dyn Backend>,
    ) -> Result<u32, ConsoleError> {
        if let Some(name) = &config.name {
            validate_port_name(name)?;
            if self
                .ports
                .values()
                .any(|p| p.config.name.as_deref() == Some(name))
            {
                return Err(ConsoleError::NameInUse(name.clone()));
            }
        }
        if !config.id.is_empty() && self.ports.values().any(|p| p.config.id == config.id) {
            return Err(ConsoleError::IdInUse(config.id));
        }
        let nr = match config.nr {
            Some(nr) if nr >= self.max_nr_ports => {
                return Err(ConsoleError::NrOutOfRange(self.max_nr_ports - 1))
            }
            Some(0) if !config.console => return Err(ConsoleError::NrReserved),
            Some(nr) if self.ports.contains_key(&nr) => return Err(ConsoleError::NrInUse(nr)),
            Some(nr) => nr,
            None if config.console && !self.ports.contains_key(&0) => 0,
            None => (1..self.max_nr_ports)
                .find(|n| !self.ports.contains_key(n))
                .ok_or(ConsoleError::Full)?,
        };
        let host_connected = config.console || backend.is_connected();
        backend.set_input_wanted(false);
        if let Some(owners) = &self.owners {
            backend.attach(owners.registrar(port_part(nr)));
        }
        let size = if config.console {
            backend.window_size()
        } else {
            None
        };
        let id = config.id.clone();
        self.ports.insert(
            nr,
            Port {
                config,
                nr,
                backend,
                host_connected,
                guest_ready: false,
                guest_open: false,
                tx: None,
                throttled: false,
                input_wanted: Some(false),
                size: None,
                output_errors: 0,
            },
        );
        if let Some(active) = self.active.as_mut() {
            if active.multiport && active.device_ready && !active.broken {
                active.send(HostControl::PortAdd(nr));
                active.interrupt.signal_config();
            }
        }
        if let Some((cols, rows)) = size {
            self.set_console_size(&id, cols, rows)?;
        }
        self.kick = true;
        Ok(nr)
    }

    /// Remove the port with device id `id` and return its backend. The guest gets
    /// PORT_REMOVE; what it had queued for the port's transmit queue is handed back unsent
    /// (as QEMU does), so its unplug path finds a consistent queue.
    pub fn remove_port(&mut self, id: &str) -> Result<Box<dyn Backend>, ConsoleError> {
        let nr = self
            .find(id)
            .ok_or_else(|| ConsoleError::NoSuchPort(id.to_owned()))?;
        let mut port = self
            .ports
            .remove(&nr)
            .ok_or_else(|| ConsoleError::NoSuchPort(id.to_owned()))?;
        if let Some(active) = self.active.as_mut() {
            if !active.broken {
                if let Some(tx) = port.tx.take() {
                    let (_, txq) = port_queues(nr);
                    if let Some(queue) = active.queues.get_mut(txq) {
                        match complete(queue, &active.mem, tx.elem.head, 0) {
                            Ok(()) => active.used = true,
                            Err(e) => active.fail(&e),
                        }
                    }
                }
                let mut kick = false;
                if let Err(e) = discard_tx(active, nr, &mut kick) {
                    active.fail(&e);
                }
                if active.multiport && active.device_ready {
                    active.send(HostControl::PortRemove(nr));
                    active.interrupt.signal_config();
                }
                active.raise_interrupt();
            }
        }
        self.kick = true;
        port.backend.detach();
        Ok(port.backend)
    }

    /// Guest open/close events since the last call, oldest first.
    pub fn take_events(&mut self) -> Vec<ConsoleEvent> {
        self.events.drain(..).collect()
    }

    /// Every port, by port number.
    pub fn ports(&self) -> Vec<PortInfo> {
        self.ports.values().map(Port::info).collect()
    }

    /// The port with device id `id`.
    pub fn port_info(&self, id: &str) -> Option<PortInfo> {
        self.find(id)
            .and_then(|nr| self.ports.get(&nr))
            .map(Port::info)
    }

    /// The backend of port `id`, for calls the device does not make itself.
    pub fn backend_mut(&mut self, id: &str) -> Option<&mut dyn Backend> {
        let nr = self.find(id)?;
        let port = self.ports.get_mut(&nr)?;
        Some(&mut *port.backend)
    }

    /// Set the size of console port `id`. Port 0's size is also the config `cols`/`rows`
    /// (with a configuration interrupt when the guest uses no MULTIPORT); a multiport guest
    /// gets RESIZE once it has set the console up.
    pub fn set_console_size(&mut self, id: &str, cols: u16, rows: u16) -> Result<(), ConsoleError> {
        let nr = self
            .find(id)
            .ok_or_else(|| ConsoleError::NoSuchPort(id.to_owned()))?;
        let Some(port) = self.ports.get_mut(&nr) else {
            return Err(ConsoleError::NoSuchPort(id.to_owned()));
        };
        port.size = Some((cols, rows));
        if nr == 0 {
            self.cols = cols;
            self.rows = rows;
            self.generation = self.generation.wrapping_add(1);
        }
        if let Some(active) = self.active.as_mut() {
            if !active.multiport && nr == 0 && !active.broken {
                active.interrupt.signal_config();
            }
            if port.config.console && port.guest_ready {
                active.send(HostControl::Resize { id: nr, cols, rows });
            }
        }
        self.kick = true;
        Ok(())
    }

    /// Emergency-write bytes dropped (no port 0, or more than the holding buffer).
    pub fn emergency_dropped(&self) -> u64 {
        self.emerg_dropped
    }

    fn find(&self, id: &str) -> Option<u32> {
        self.ports
            .values()
            .find(|p| p.config.id == id)
            .map(|p| p.nr)
    }

    /// Forward backend connection events. Returns whether there were any events.
    fn handle_backend_events(&mut self) -> bool {
        let mut any = false;
        let mut resized = Vec::new();
        for port in self.ports.values_mut() {
            for event in port.backend.take_events() {
                any = true;
                let connected = match event {
                    Event::Opened => true,
                    Event::Closed => false,
                    Event::Resized { cols, rows } if port.config.console => {
                        resized.push((port.config.id.clone(), cols, rows));
                        continue;
                    }
                    // Readable and Writable: the next pass reads and writes anyway.
                    _ => continue,
                };
                if port.config.console || port.host_connected == connected {
                    continue;
                }
                port.host_connected = connected;
                if port.guest_ready {
                    if let Some(active) = self.active.as_mut() {
                        active.send(HostControl::PortOpen {
                            id: port.nr,
                            open: connected,
                        });
                    }
                }
            }
        }
        for (id, cols, rows) in resized {
            // The port exists: it was found in the loop above.
            let _ = self.set_console_size(&id, cols, rows);
        }
        any
    }

    fn flush_emergency(&mut self) {
        if self.emerg.is_empty() {
            return;
        }
        let Some(port) = self.ports.get_mut(&0) else {
            self.emerg_dropped += self.emerg.len() as u64;
            self.emerg.clear();
            return;
        };
        let bytes = self.emerg.make_contiguous();
        match port.backend.write(bytes) {
            Ok(n) => {
                let n = n.min(self.emerg.len());
                self.emerg.drain(..n);
            }
            Err(e) if is_transient(&e) => {}
            Err(e) => {
                log::warn!("virtio-console: emergency write: {e}");
                self.emerg_dropped += self.emerg.len() as u64;
                self.emerg.clear();
            }
        }
    }

    fn run_queues(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        if active.broken {
            return;
        }
        let result = process_queues(
            active,
            &mut self.ports,
            self.max_nr_ports,
            &mut self.events,
            &mut self.scratch,
            &mut self.kick,
        );
        if let Err(e) = result {
            active.fail(&e);
        }
        active.raise_interrupt();
    }

    fn update_input_wanted(&mut self) {
        for port in self.ports.values_mut() {
            let wanted = match self.active.as_ref() {
                Some(active) if !active.broken && port.guest_open => {
                    let (rxq, _) = port_queues(port.nr);
                    (active.multiport || port.nr == 0)
                        && active
                            .queues
                            .get(rxq)
                            .is_some_and(|q| queue::has_available(q, &active.mem).unwrap_or(false))
                }
                _ => false,
            };
            if port.input_wanted != Some(wanted) {
                log::debug!(
                    "virtio-console: port {} ({}) input {}",
                    port.nr,
                    port.config.id,
                    if wanted { "wanted" } else { "not wanted" }
                );
                port.backend.set_input_wanted(wanted);
                port.input_wanted = Some(wanted);
            }
        }
    }

    fn config_bytes(&self) -> [u8; CONFIG_LEN] {
        let mut b = [0u8; CONFIG_LEN];
        b[0..2].copy_from_slice(&self.cols.to_le_bytes());
        b[2..4].copy_from_slice(&self.rows.to_le_bytes());
        b[4..8].copy_from_slice(&self.max_nr_ports.to_le_bytes());
        b
    }
}

impl VirtioDevice for VirtioConsole {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_CONSOLE
    }

    fn features(&self) -> u64 {
        let mut f = feature(VIRTIO_F_VERSION_1)
            | feature(VIRTIO_CONSOLE_F_SIZE)
            | feature(VIRTIO_CONSOLE_F_EMERG_WRITE);
        if self.max_nr_ports > 1 {
            f |= feature(VIRTIO_CONSOLE_F_MULTIPORT);
        }
        f
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        let mut sizes = vec![
            DATA_QUEUE_SIZE,
            DATA_QUEUE_SIZE,
            CONTROL_QUEUE_SIZE,
            CONTROL_QUEUE_SIZE,
        ];
        for _ in 1..self.max_nr_ports {
            sizes.extend([DATA_QUEUE_SIZE, DATA_QUEUE_SIZE]);
        }
        sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.config_bytes();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| config.get(o).copied())
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only emerg_wr is writable; its low byte is the character.
        if offset != CONFIG_EMERG_WR {
            return;
        }
        let Some(&byte) = data.first() else {
            return;
        };
        if self.emerg.len() >= EMERG_CAPACITY {
            self.emerg_dropped += 1;
        } else {
            self.emerg.push_back(byte);
        }
        self.kick = true;
    }

    fn config_generation(&self) -> u32 {
        self.generation
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let multiport = ctx.features & feature(VIRTIO_CONSOLE_F_MULTIPORT) != 0;
        if multiport {
            for q in [CONTROL_RX_QUEUE, CONTROL_TX_QUEUE] {
                if !ctx.queues.get(q).is_some_and(|q| q.ready()) {
                    return Err(ActivateError::QueueNotReady(q));
                }
            }
        } else if let Some(port) = self.ports.get_mut(&0) {
            // Without MULTIPORT the guest drives port 0 as an open console from DRIVER_OK.
            port.guest_ready = true;
            port.guest_open = true;
            self.events.push_back(ConsoleEvent {
                port_id: port.config.id.clone(),
                open: true,
            });
        }
        self.active = Some(Active {
            mem: ctx.mem,
            queues: ctx.queues,
            interrupt: ctx.interrupt,
            multiport,
            device_ready: false,
            control_out: VecDeque::new(),
            broken: false,
            used: false,
        });
        self.kick = true;
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        for port in self.ports.values_mut() {
            if port.guest_open {
                self.events.push_back(ConsoleEvent {
                    port_id: port.config.id.clone(),
                    open: false,
                });
            }
            port.guest_open = false;
            port.guest_ready = false;
            port.tx = None;
            port.throttled = false;
        }
        self.kick = true;
    }

    fn attach(&mut self, owners: OwnerGroup) {
        for (&nr, port) in self.ports.iter_mut() {
            port.backend.attach(owners.registrar(port_part(nr)));
        }
        self.owners = Some(owners);
    }

    fn on_ready(&mut self, part: u16, token: Token, readiness: Readiness) {
        if let Some(port) = self.ports.get_mut(&u32::from(part)) {
            port.backend.on_ready(token, readiness);
        }
    }

    fn service(&mut self) {
        self.handle_backend_events();
        let mut settled = false;
        for _ in 0..SERVICE_ROUNDS {
            self.flush_emergency();
            self.run_queues();
            if !self.handle_backend_events() {
                settled = true;
                break;
            }
        }
        if !settled {
            // The backends kept producing events: come back soon.
            self.kick = true;
        }
        self.update_input_wanted();
    }

    fn take_kick(&mut self) -> bool {
        std::mem::take(&mut self.kick)
    }
}

fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

/// One pass over the queues: guest control messages, every port's data, then host control
/// messages.
fn process_queues(
    active: &mut Active,
    ports: &mut BTreeMap<u32, Port>,
    max_nr_ports: u32,
    events: &mut VecDeque<ConsoleEvent>,
    scratch: &mut [u8],
    kick: &mut bool,
) -> Result<(), ChainError> {
    if active.multiport {
        control_tx(active, ports, events, kick)?;
    }
    let last = if active.multiport { max_nr_ports } else { 1 };
    for nr in 0..last {
        match ports.get_mut(&nr) {
            Some(port) => {
                flush_tx(active, port, scratch, kick)?;
                pull_rx(active, port, scratch, kick)?;
            }
            // Output to a port that does not exist goes nowhere, as in QEMU; holding it
            // would hang a guest writing to a console it assumes.
            None => discard_tx(active, nr, kick)?,
        }
    }
    if active.multiport {
        control_rx(active)?;
    }
    Ok(())
}

/// Read and act on the guest's control messages.
fn control_tx(
    active: &mut Active,
    ports: &mut BTreeMap<u32, Port>,
    events: &mut VecDeque<ConsoleEvent>,
    kick: &mut bool,
) -> Result<(), ChainError> {
    let mut messages = Vec::new();
    {
        let Some(queue) = active.queues.get_mut(CONTROL_TX_QUEUE) else {
            return Ok(());
        };
        let mut drained = false;
        for _ in 0..queue.size() {
            let Some(elem) = pop(queue, &active.mem, Direction::DeviceReads, ANY_CHAIN)? else {
                drained = true;
                break;
            };
            let mut buf = [0u8; CONTROL_MSG_LEN];
            let n = elem.read_into(&active.mem, &mut buf)?;
            complete(queue, &active.mem, elem.head, 0)?;
            active.used = true;
            messages.push(parse_guest_control(&buf[..n]));
        }
        if !drained {
            *kick = true;
        }
    }
    for msg in messages {
        match msg {
            Ok(msg) => handle_guest_control(active, ports, events, msg),
            Err(e) => log::debug!("virtio-console: ignoring control message: {e}"),
        }
    }
    Ok(())
}

fn handle_guest_control(
    active: &mut Active,
    ports: &mut BTreeMap<u32, Port>,
    events: &mut VecDeque<ConsoleEvent>,
    msg: GuestControl,
) {
    log::debug!("virtio-console: guest control {msg:?}");
    match msg {
        GuestControl::DeviceReady { ok: false } => {
            log::warn!("virtio-console: the guest driver failed to initialise");
        }
        GuestControl::DeviceReady { ok: true } => {
            active.device_ready = true;
            for &nr in ports.keys() {
                active.send(HostControl::PortAdd(nr));
            }
        }
        GuestControl::PortReady { id, ok } => {
            let Some(port) = ports.get_mut(&id) else {
                log::debug!("virtio-console: PORT_READY for unknown port {id}");
                return;
            };
            if !ok {
                log::warn!("virtio-console: the guest failed to add port {id}");
                return;
            }
            port.guest_ready = true;
            if port.config.console {
                active.send(HostControl::ConsolePort(id));
                if let Some((cols, rows)) = port.size {
                    active.send(HostControl::Resize { id, cols, rows });
                }
            }
            if let Some(name) = &port.config.name {
                active.send(HostControl::PortName {
                    id,
                    name: name.clone(),
                });
            }
            if port.host_connected {
                active.send(HostControl::PortOpen { id, open: true });
            }
        }
        GuestControl::PortOpen { id, open } => {
            let Some(port) = ports.get_mut(&id) else {
                log::debug!("virtio-console: PORT_OPEN for unknown port {id}");
                return;
            };
            port.guest_open = open;
            events.push_back(ConsoleEvent {
                port_id: port.config.id.clone(),
                open,
            });
        }
    }
}

/// Deliver queued host control messages into the guest's control buffers.
fn control_rx(active: &mut Active) -> Result<(), ChainError> {
    let Some(queue) = active.queues.get_mut(CONTROL_RX_QUEUE) else {
        return Ok(());
    };
    while let Some(msg) = active.control_out.front() {
        let Some(elem) = pop(queue, &active.mem, Direction::DeviceWrites, ANY_CHAIN)? else {
            break;
        };
        let n = elem.write_from(&active.mem, msg)?;
        if n < msg.len() {
            log::warn!(
                "virtio-console: control buffer of {} bytes truncated a {}-byte message",
                elem.len,
                msg.len()
            );
        }
        complete(queue, &active.mem, elem.head, n as u32)?;
        active.used = true;
        active.control_out.pop_front();
    }
    Ok(())
}

/// Move guest output to the port's backend for as long as the backend takes it.
fn flush_tx(
    active: &mut Active,
    port: &mut Port,
    scratch: &mut [u8],
    kick: &mut bool,
) -> Result<(), ChainError> {
    let (_, txq) = port_queues(port.nr);
    let Some(queue) = active.queues.get_mut(txq) else {
        return Ok(());
    };
    if !queue.ready() {
        return Ok(());
    }
    for _ in 0..queue.size() {
        if port.tx.is_none() {
            match pop(queue, &active.mem, Direction::DeviceReads, ANY_CHAIN)? {
                Some(elem) => {
                    port.tx = Some(TxElement {
                        elem,
                        buf: 0,
                        offset: 0,
                    })
                }
                None => {
                    port.throttled = false;
                    return Ok(());
                }
            }
        }
        let Some(tx) = port.tx.as_mut() else {
            return Ok(());
        };
        let done = write_element(
            &mut *port.backend,
            tx,
            &active.mem,
            scratch,
            &mut port.output_errors,
        )?;
        if !done {
            port.throttled = true;
            return Ok(());
        }
        complete(queue, &active.mem, tx.elem.head, 0)?;
        active.used = true;
        port.tx = None;
        port.throttled = false;
    }
    // More may be waiting: come back after the other ports had their turn.
    *kick = true;
    Ok(())
}

/// Write what is left of `tx` to `backend`. Returns whether all of it went.
fn write_element(
    backend: &mut dyn Backend,
    tx: &mut TxElement,
    mem: &GuestMemoryMmap,
    scratch: &mut [u8],
    errors: &mut u64,
) -> Result<bool, ChainError> {
    use vm_memory::{Address, Bytes};
    while let Some(buf) = tx.elem.bufs.get(tx.buf).copied() {
        let left = buf.len.saturating_sub(tx.offset);
        let n = (left as usize).min(scratch.len());
        let addr = buf
            .addr
            .checked_add(u64::from(tx.offset))
            .ok_or(ChainError::Memory)?;
        mem.read_slice(&mut scratch[..n], addr)
            .map_err(|_| ChainError::Memory)?;
        let accepted = match backend.write(&scratch[..n]) {
            Ok(k) => k.min(n),
            Err(e) if is_transient(&e) => 0,
            Err(e) => {
                // A broken backend, not backpressure: holding the bytes would wedge the
                // guest's writer for good, so they are counted and dropped.
                if *errors == 0 {
                    log::warn!(
                        "virtio-console: backend {} write failed: {e}",
                        backend.kind()
                    );
                }
                *errors += n as u64;
                n
            }
        };
        tx.offset += accepted as u32;
        if tx.offset >= buf.len {
            tx.buf += 1;
            tx.offset = 0;
        }
        if accepted < n {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Pull backend input into the receive buffers the guest posted, while it has the port open.
fn pull_rx(
    active: &mut Active,
    port: &mut Port,
    scratch: &mut [u8],
    kick: &mut bool,
) -> Result<(), ChainError> {
    if !port.guest_open {
        return Ok(());
    }
    let (rxq, _) = port_queues(port.nr);
    let Some(queue) = active.queues.get_mut(rxq) else {
        return Ok(());
    };
    if !queue.ready() {
        return Ok(());
    }
    for _ in 0..queue.size() {
        let Some(elem) = pop(queue, &active.mem, Direction::DeviceWrites, ANY_CHAIN)? else {
            return Ok(());
        };
        let want = (elem.len as usize).min(scratch.len());
        let got = match port.backend.read(&mut scratch[..want]) {
            Ok(n) => n.min(want),
            Err(e) if is_transient(&e) => 0,
            Err(e) => {
                log::debug!(
                    "virtio-console: backend {} read failed: {e}",
                    port.backend.kind()
                );
                0
            }
        };
        if got == 0 {
            // Nothing to give: the buffer stays the guest's, unpopped.
            unpop(queue);
            return Ok(());
        }
        let n = elem.write_from(&active.mem, &scratch[..got])?;
        log::trace!(
            "virtio-console: port {} received {n} bytes from its backend",
            port.nr
        );
        complete(queue, &active.mem, elem.head, n as u32)?;
        active.used = true;
    }
    *kick = true;
    Ok(())
}

/// Hand back, unsent, what the guest queued on port `nr`'s transmit queue.
fn discard_tx(active: &mut Active, nr: u32, kick: &mut bool) -> Result<(), ChainError> {
    let (_, txq) = port_queues(nr);
    let Some(queue) = active.queues.get_mut(txq) else {
        return Ok(());
    };
    if !queue.ready() {
        return Ok(());
    }
    for _ in 0..queue.size() {
        let Some(elem) = pop(queue, &active.mem, Direction::DeviceReads, ANY_CHAIN)? else {
            return Ok(());
        };
        complete(queue, &active.mem, elem.head, 0)?;
        active.used = true;
    }
    *kick = true;
    Ok(())
}

#[cfg(test)]
mod tests;
