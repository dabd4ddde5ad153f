//! virtio-console driven as a guest driver would: registers through the transport, rings and
//! descriptor chains built by hand in real guest memory.

use std::sync::{Arc, Mutex, MutexGuard};

use chardev::{Event, Readiness};
use proptest::prelude::*;
use vm_memory::{Bytes, GuestAddress};

use super::control::*;
use super::*;
use crate::bus::BusDevice;
use crate::virtio::mmio::REG_CONFIG;
use crate::virtio::queue::{RawDescriptor, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use crate::virtio::testing::{Driver, FakeBackend, FakeState, MEM_SIZE};
use crate::virtio::{INT_CONFIG, INT_VRING};

const MAX_PORTS: u32 = 4;
const DATA_SIZE: u16 = 16;
const CTRL_SIZE: u16 = 8;
const CRX: u16 = CONTROL_RX_QUEUE as u16;
const CTX: u16 = CONTROL_TX_QUEUE as u16;

fn multiport_features() -> u64 {
    feature(VIRTIO_F_VERSION_1)
        | feature(VIRTIO_CONSOLE_F_MULTIPORT)
        | feature(VIRTIO_CONSOLE_F_SIZE)
        | feature(VIRTIO_CONSOLE_F_EMERG_WRITE)
}

fn cfg(id: &str, name: Option<&str>, console: bool, nr: Option<u32>) -> PortConfig {
    PortConfig {
        id: id.into(),
        name: name.map(Into::into),
        console,
        nr,
        chardev: format!("chr-{id}"),
    }
}

fn rx(nr: u32) -> u16 {
    port_queues(nr).0 as u16
}

fn tx(nr: u32) -> u16 {
    port_queues(nr).1 as u16
}

struct Rig {
    d: Driver<VirtioConsole>,
    backends: Vec<Arc<Mutex<FakeState>>>,
    /// Lengths the device gave back for the control messages the guest sent.
    ctrl_tx_used: Vec<u32>,
}

impl Rig {
    /// A console with `ports` (config, backend connected), started as a multiport guest
    /// with every queue set up.
    fn new(ports: &[(PortConfig, bool)]) -> Rig {
        let mut rig = Rig::stopped(MAX_PORTS, ports);
        rig.d.start(multiport_features(), &all_queues());
        rig.d.run();
        rig
    }

    fn stopped(max_ports: u32, ports: &[(PortConfig, bool)]) -> Rig {
        let mut console = VirtioConsole::new(max_ports).unwrap();
        let mut backends = Vec::new();
        for (config, connected) in ports {
            let (backend, state) = FakeBackend::boxed(*connected);
            console.add_port(config.clone(), backend).unwrap();
            backends.push(state);
        }
        Rig {
            d: Driver::new(console),
            backends,
            ctrl_tx_used: Vec::new(),
        }
    }

    fn be(&self, i: usize) -> MutexGuard<'_, FakeState> {
        crate::bus::lock(&self.backends[i])
    }

    fn console(&mut self) -> &mut VirtioConsole {
        self.d.dev.device_mut()
    }

    fn send_ctrl(&mut self, id: u32, event: u16, value: u16) {
        let bytes = ControlHeader { id, event, value }.to_bytes();
        self.send_ctrl_raw(&bytes);
    }

    fn send_ctrl_raw(&mut self, bytes: &[u8]) {
        self.d.post_out(CTX, bytes);
        self.d.notify(CTX);
        self.d.run();
        let used = self.d.take_used(CTX);
        self.ctrl_tx_used
            .extend(used.iter().map(|&(_, len, _)| len));
    }

    /// Post up to `n` control receive buffers (as many as there are free descriptors).
    fn post_ctrl_bufs(&mut self, n: usize) {
        let free = self.d.queues[&CRX].free();
        for _ in 0..n.min(free) {
            self.d.post_in(CRX, 64);
        }
        self.d.notify(CRX);
        self.d.run();
    }

    /// Host → guest control messages delivered so far: header and payload.
    fn ctrl(&mut self) -> Vec<(ControlHeader, Vec<u8>)> {
        self.d
            .take_used(CRX)
            .into_iter()
            .map(|(_, _, data)| {
                let h = ControlHeader::from_bytes(&data).expect("header");
                (h, data[CONTROL_MSG_LEN..].to_vec())
            })
            .collect()
    }

    fn ctrl_events(&mut self) -> Vec<(u32, u16, u16)> {
        self.ctrl()
            .into_iter()
            .map(|(h, _)| (h.id, h.event, h.value))
            .collect()
    }

    /// DEVICE_READY and PORT_READY for every port the device announces.
    fn handshake(&mut self) -> Vec<(ControlHeader, Vec<u8>)> {
        self.post_ctrl_bufs(CTRL_SIZE as usize);
        self.send_ctrl(VIRTIO_CONSOLE_BAD_ID, VIRTIO_CONSOLE_DEVICE_READY, 1);
        let mut all = self.ctrl();
        let adds: Vec<u32> = all
            .iter()
            .filter(|(h, _)| h.event == VIRTIO_CONSOLE_PORT_ADD)
            .map(|(h, _)| h.id)
            .collect();
        for id in adds {
            self.post_ctrl_bufs(4);
            self.send_ctrl(id, VIRTIO_CONSOLE_PORT_READY, 1);
            all.extend(self.ctrl());
        }
        all
    }

    fn open(&mut self, nr: u32, open: bool) {
        self.send_ctrl(nr, VIRTIO_CONSOLE_PORT_OPEN, u16::from(open));
    }
}

/// Every queue of a [`MAX_PORTS`] console with the test's sizes, as a driver sets them up.
fn all_queues() -> Vec<(u16, u16)> {
    (0..2 * (MAX_PORTS as u16 + 1))
        .map(|q| {
            let size = if q == CRX || q == CTX {
                CTRL_SIZE
            } else {
                DATA_SIZE
            };
            (q, size)
        })
        .collect()
}

fn three_ports() -> Vec<(PortConfig, bool)> {
    vec![
        (cfg("con0", None, true, None), false),
        (cfg("p1", Some("org.test.one"), false, None), true),
        (cfg("p2", None, false, None), false),
    ]
}

#[test]
fn config_space_and_features() {
    let mut rig = Rig::stopped(MAX_PORTS, &three_ports());
    let f = rig.d.dev.device().features();
    assert_eq!(f, multiport_features());
    assert_eq!(rig.d.dev.device().queue_max_sizes().len(), 10);
    let mut b = [0u8; 4];
    rig.d.dev.read(REG_CONFIG + CONFIG_MAX_NR_PORTS, &mut b);
    assert_eq!(u32::from_le_bytes(b), MAX_PORTS);
    rig.console().set_console_size("con0", 80, 25).unwrap();
    let mut c = [0u8; 4];
    rig.d.dev.read(REG_CONFIG + CONFIG_COLS, &mut c);
    assert_eq!(c, [80, 0, 25, 0]);
    assert_eq!(rig.d.read32(crate::virtio::mmio::REG_CONFIG_GENERATION), 1);
    // Reads past the config space are zero.
    rig.d.dev.read(REG_CONFIG + 10, &mut b);
    assert_eq!(b, [0; 4]);
    // A single port: no MULTIPORT.
    let single = VirtioConsole::new(1).unwrap();
    assert_eq!(single.features() & feature(VIRTIO_CONSOLE_F_MULTIPORT), 0);
    assert!(matches!(
        VirtioConsole::new(0),
        Err(ConsoleError::MaxPorts(0))
    ));
    assert!(VirtioConsole::new(512).is_err());
}

#[test]
fn full_control_handshake() {
    let mut rig = Rig::new(&three_ports());
    let msgs = rig.handshake();
    let events: Vec<(u32, u16, u16)> = msgs.iter().map(|(h, _)| (h.id, h.event, h.value)).collect();
    assert_eq!(
        events,
        vec![
            (0, VIRTIO_CONSOLE_PORT_ADD, 1),
            (1, VIRTIO_CONSOLE_PORT_ADD, 1),
            (2, VIRTIO_CONSOLE_PORT_ADD, 1),
            // Port 0: a console, host side always connected.
            (0, VIRTIO_CONSOLE_CONSOLE_PORT, 1),
            (0, VIRTIO_CONSOLE_PORT_OPEN, 1),
            // Port 1: named, backend connected.
            (1, VIRTIO_CONSOLE_PORT_NAME, 1),
            (1, VIRTIO_CONSOLE_PORT_OPEN, 1),
            // Port 2: unnamed, no peer: nothing.
        ]
    );
    let name = &msgs[5].1;
    assert_eq!(name.as_slice(), b"org.test.one\0");
    // Every control message the guest sent came back used, with length 0.
    assert_eq!(rig.ctrl_tx_used, vec![0; 4]);
    // The guest was interrupted for all this.
    assert_ne!(rig.d.ack_interrupt() & INT_VRING, 0);
    assert!(!rig.d.irq.level());
    assert!(!rig.d.needs_reset());
}

#[test]
fn control_messages_wait_for_buffers() {
    let mut rig = Rig::new(&three_ports());
    rig.send_ctrl(VIRTIO_CONSOLE_BAD_ID, VIRTIO_CONSOLE_DEVICE_READY, 1);
    assert!(rig.ctrl().is_empty());
    // One buffer: one message; the rest wait.
    rig.post_ctrl_bufs(1);
    assert_eq!(rig.ctrl_events(), vec![(0, VIRTIO_CONSOLE_PORT_ADD, 1)]);
    rig.post_ctrl_bufs(4);
    assert_eq!(
        rig.ctrl_events(),
        vec![
            (1, VIRTIO_CONSOLE_PORT_ADD, 1),
            (2, VIRTIO_CONSOLE_PORT_ADD, 1)
        ]
    );
    // A DEVICE_READY with value 0, a host-only event, a short message, an unknown port:
    // ignored, not an error.
    rig.send_ctrl(VIRTIO_CONSOLE_BAD_ID, VIRTIO_CONSOLE_DEVICE_READY, 0);
    rig.send_ctrl(1, VIRTIO_CONSOLE_PORT_NAME, 1);
    rig.send_ctrl_raw(&[1, 2, 3]);
    rig.send_ctrl(99, VIRTIO_CONSOLE_PORT_READY, 1);
    rig.send_ctrl(99, VIRTIO_CONSOLE_PORT_OPEN, 1);
    assert!(rig.ctrl().is_empty());
    assert!(!rig.d.needs_reset());
    assert!(rig.console().take_events().is_empty());
}

#[test]
fn guest_open_close_is_reported() {
    let mut rig = Rig::new(&three_ports());
    rig.handshake();
    rig.open(1, true);
    assert_eq!(
        rig.console().take_events(),
        vec![ConsoleEvent {
            port_id: "p1".into(),
            open: true
        }]
    );
    assert!(rig.console().port_info("p1").unwrap().guest_open);
    rig.open(1, false);
    rig.open(2, true);
    rig.open(1, true);
    let events = rig.console().take_events();
    assert_eq!(
        events
            .iter()
            .map(|e| (e.port_id.as_str(), e.open))
            .collect::<Vec<_>>(),
        vec![("p1", false), ("p2", true), ("p1", true)]
    );
    // A reset closes every open port, and says so.
    rig.d.write32(crate::virtio::mmio::REG_STATUS, 0);
    let mut closed: Vec<String> = rig
        .console()
        .take_events()
        .into_iter()
        .inspect(|e| assert!(!e.open))
        .map(|e| e.port_id)
        .collect();
    closed.sort();
    assert_eq!(closed, vec!["p1".to_string(), "p2".to_string()]);
    assert!(!rig.console().port_info("p1").unwrap().guest_open);
}

#[test]
fn host_connect_and_disconnect_reach_the_guest() {
    let mut rig = Rig::new(&three_ports());
    // Before the guest knows the port, a connect is only remembered.
    rig.be(2).events.push(Event::Opened);
    rig.d.run();
    assert!(rig.console().port_info("p2").unwrap().host_connected);
    let msgs = rig.handshake();
    assert!(msgs
        .iter()
        .any(|(h, _)| (h.id, h.event, h.value) == (2, VIRTIO_CONSOLE_PORT_OPEN, 1)));
    rig.post_ctrl_bufs(4);
    rig.be(2).events.push(Event::Closed);
    rig.d.run();
    assert_eq!(rig.ctrl_events(), vec![(2, VIRTIO_CONSOLE_PORT_OPEN, 0)]);
    assert!(!rig.console().port_info("p2").unwrap().host_connected);
    // A repeated close says nothing new; a reconnect does.
    rig.be(2).events.push(Event::Closed);
    rig.be(2).events.push(Event::Opened);
    rig.d.run();
    assert_eq!(rig.ctrl_events(), vec![(2, VIRTIO_CONSOLE_PORT_OPEN, 1)]);
    // A console port stays connected whatever its backend says.
    rig.be(0).events.push(Event::Closed);
    rig.d.run();
    assert!(rig.ctrl().is_empty());
    assert!(rig.console().port_info("con0").unwrap().host_connected);
}

#[test]
fn guest_output_holds_on_a_full_backend_and_resumes_in_order() {
    let mut rig = Rig::new(&three_ports());
    rig.handshake();
    rig.open(1, true);
    rig.be(1).budget = Some(5);
    // One element of two buffers, then a second element.
    let a = rig.d.alloc(6);
    let b = rig.d.alloc(5);
    rig.d.mem.write_slice(b"hello ", GuestAddress(a)).unwrap();
    rig.d.mem.write_slice(b"world", GuestAddress(b)).unwrap();
    rig.d.add_chain(tx(1), &[(a, 6, false), (b, 5, false)]);
    rig.d.post_out(tx(1), b"second");
    rig.d.notify(tx(1));
    rig.d.run();
    assert_eq!(rig.be(1).out, b"hello");
    assert!(
        rig.d.take_used(tx(1)).is_empty(),
        "a held element is not used"
    );
    assert!(rig.console().port_info("p1").unwrap().throttled);
    // Still full: nothing moves, nothing is popped.
    rig.d.run();
    assert_eq!(rig.be(1).out, b"hello");
    // Room for 3 more, crossing into the second buffer.
    rig.be(1).budget = Some(3);
    rig.be(1).events.push(Event::Writable);
    rig.d.run();
    assert_eq!(rig.be(1).out, b"hello wo");
    rig.be(1).budget = None;
    rig.be(1).events.push(Event::Writable);
    rig.d.run();
    assert_eq!(rig.be(1).out, b"hello worldsecond");
    let used = rig.d.take_used(tx(1));
    assert_eq!(used.len(), 2);
    assert!(used.iter().all(|&(_, len, _)| len == 0));
    assert!(!rig.console().port_info("p1").unwrap().throttled);
    assert_ne!(rig.d.ack_interrupt() & INT_VRING, 0);
}

#[test]
fn large_guest_output_arrives_whole() {
    let mut rig = Rig::new(&three_ports());
    rig.handshake();
    rig.open(1, true);
    rig.be(1).budget = Some(1000);
    let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    rig.d.post_out(tx(1), &data);
    rig.d.notify(tx(1));
    rig.d.run();
    for _ in 0..10_000 {
        if rig.be(1).out.len() == data.len() {
            break;
        }
        rig.be(1).budget = Some(4093);
        rig.be(1).events.push(Event::Writable);
        rig.d.run();
    }
    assert!(rig.be(1).out == data);
    assert_eq!(rig.d.take_used(tx(1)).len(), 1);
}

#[test]
fn guest_input_only_into_posted_buffers_while_open() {
    let mut rig = Rig::new(&three_ports());
    rig.handshake();
    rig.be(1).input.extend(b"abcdef".iter());
    // Not open: the backend is not read, and not asked for input.
    rig.d.post_in(rx(1), 4);
    rig.d.notify(rx(1));
    rig.d.run();
    assert!(rig.be(1).read_sizes.is_empty());
    assert_eq!(rig.be(1).input_wanted, Some(false));
    assert!(rig.d.take_used(rx(1)).is_empty());
    // Open: the posted 4-byte buffer is filled, and no more is read.
    rig.open(1, true);
    let used = rig.d.take_used(rx(1));
    assert_eq!(used.len(), 1);
    assert_eq!(used[0].1, 4);
    assert_eq!(used[0].2, b"abcd");
    assert!(rig.be(1).read_sizes.iter().all(|&n| n <= 4));
    assert_eq!(rig.be(1).input.len(), 2);
    // No buffer posted: no read, no interest in input.
    assert_eq!(rig.be(1).input_wanted, Some(false));
    let reads = rig.be(1).read_sizes.len();
    rig.d.run();
    assert_eq!(rig.be(1).read_sizes.len(), reads);
    // A new buffer takes the rest.
    rig.d.post_in(rx(1), 16);
    rig.d.notify(rx(1));
    rig.d.run();
    let used = rig.d.take_used(rx(1));
    assert_eq!(used.len(), 1);
    assert_eq!(used[0].2, b"ef");
    // A buffer with nothing to put in it stays posted, and input is wanted.
    rig.d.post_in(rx(1), 16);
    rig.d.notify(rx(1));
    rig.d.run();
    assert!(rig.d.take_used(rx(1)).is_empty());
    assert_eq!(rig.be(1).input_wanted, Some(true));
    rig.be(1).input.extend(b"xyz".iter());
    rig.be(1).events.push(Event::Readable);
    rig.d.run();
    let used = rig.d.take_used(rx(1));
    assert_eq!(used.len(), 1);
    assert_eq!(used[0].2, b"xyz");
    // Closed again: input stays in the backend.
    rig.open(1, false);
    rig.d.post_in(rx(1), 16);
    rig.be(1).input.extend(b"later".iter());
    rig.d.notify(rx(1));
    rig.d.run();
    assert!(rig.d.take_used(rx(1)).is_empty());
    assert_eq!(rig.be(1).input.len(), 5);
    assert_eq!(rig.be(1).input_wanted, Some(false));
}

#[test]
fn input_spreads_over_a_multi_buffer_chain() {
    let mut rig = Rig::new(&three_ports());
    rig.handshake();
    rig.open(2, true);
    rig.be(2).input.extend(b"0123456789".iter());
    let a = rig.d.alloc(3);
    let b = rig.d.alloc(20);
    rig.d.add_chain(rx(2), &[(a, 3, true), (b, 20, true)]);
    rig.d.notify(rx(2));
    rig.d.run();
    let used = rig.d.take_used(rx(2));
    assert_eq!(used.len(), 1);
    assert_eq!(used[0].1, 10);
    assert_eq!(used[0].2, b"0123456789");
}

#[test]
fn hot_add_and_remove() {
    let mut rig = Rig::new(&three_ports());
    rig.handshake();
    rig.d.ack_interrupt();
    rig.post_ctrl_bufs(4);
    let (backend, _state) = FakeBackend::boxed(true);
    let nr = rig
        .console()
        .add_port(cfg("p3", Some("hot"), false, None), backend)
        .unwrap();
    assert_eq!(nr, 3);
    rig.d.run();
    assert_eq!(rig.ctrl_events(), vec![(3, VIRTIO_CONSOLE_PORT_ADD, 1)]);
    assert_ne!(rig.d.ack_interrupt() & INT_CONFIG, 0);
    rig.post_ctrl_bufs(4);
    rig.send_ctrl(3, VIRTIO_CONSOLE_PORT_READY, 1);
    let msgs = rig.ctrl();
    assert_eq!(msgs[0].0.event, VIRTIO_CONSOLE_PORT_NAME);
    assert_eq!(msgs[0].1.as_slice(), b"hot\0");
    assert_eq!(msgs[1].0.event, VIRTIO_CONSOLE_PORT_OPEN);
    // Remove p1 with output held in it: the element is handed back, PORT_REMOVE sent.
    rig.open(1, true);
    rig.be(1).budget = Some(0);
    rig.d.post_out(tx(1), b"held");
    rig.d.post_out(tx(1), b"queued");
    rig.d.notify(tx(1));
    rig.d.run();
    assert!(rig.d.take_used(tx(1)).is_empty());
    let backend = rig.console().remove_port("p1").unwrap();
    assert_eq!(backend.kind(), "fake");
    rig.d.run();
    assert_eq!(rig.d.take_used(tx(1)).len(), 2);
    assert_eq!(rig.ctrl_events(), vec![(1, VIRTIO_CONSOLE_PORT_REMOVE, 1)]);
    assert!(rig.console().port_info("p1").is_none());
    assert!(matches!(
        rig.console().remove_port("p1"),
        Err(ConsoleError::NoSuchPort(_))
    ));
    // The number is free again; the name too.
    let (backend, _) = FakeBackend::boxed(true);
    let nr = rig
        .console()
        .add_port(cfg("p1b", Some("org.test.one"), false, None), backend)
        .unwrap();
    assert_eq!(nr, 1);
    assert!(!rig.d.needs_reset());
}

#[test]
fn port_numbers_names_and_ids() {
    let mut c = VirtioConsole::new(3).unwrap();
    let add = |c: &mut VirtioConsole, config: PortConfig| {
        let (backend, _) = FakeBackend::boxed(true);
        c.add_port(config, backend)
    };
    assert_eq!(
        add(&mut c, cfg("s0", None, false, Some(0))),
        Err(ConsoleError::NrReserved)
    );
    assert_eq!(
        add(&mut c, cfg("s9", None, false, Some(3))),
        Err(ConsoleError::NrOutOfRange(2))
    );
    assert_eq!(add(&mut c, cfg("s1", Some("one"), false, None)), Ok(1));
    assert_eq!(
        add(&mut c, cfg("s1", None, false, None)),
        Err(ConsoleError::IdInUse("s1".into()))
    );
    assert_eq!(
        add(&mut c, cfg("s2", Some("one"), false, None)),
        Err(ConsoleError::NameInUse("one".into()))
    );
    assert!(matches!(
        add(&mut c, cfg("s2", Some("bad name"), false, None)),
        Err(ConsoleError::InvalidName { .. })
    ));
    assert_eq!(
        add(&mut c, cfg("s2", None, false, Some(1))),
        Err(ConsoleError::NrInUse(1))
    );
    // A console takes 0 when it is free, a serial port never does.
    assert_eq!(add(&mut c, cfg("c0", None, true, None)), Ok(0));
    assert_eq!(add(&mut c, cfg("c1", None, true, None)), Ok(2));
    assert_eq!(
        add(&mut c, cfg("s3", None, false, None)),
        Err(ConsoleError::Full)
    );
    let info = c.ports();
    assert_eq!(
        info.iter()
            .map(|p| (p.nr, p.id.as_str()))
            .collect::<Vec<_>>(),
        vec![(0, "c0"), (1, "s1"), (2, "c1")]
    );
    assert_eq!(info[1].chardev, "chr-s1");
    assert_eq!(info[1].name.as_deref(), Some("one"));
}

#[test]
fn resize_after_console_setup() {
    let mut rig = Rig::new(&three_ports());
    rig.console().set_console_size("con0", 100, 40).unwrap();
    let msgs = rig.handshake();
    let resize: Vec<_> = msgs
        .iter()
        .filter(|(h, _)| h.event == VIRTIO_CONSOLE_RESIZE)
        .collect();
    assert_eq!(resize.len(), 1);
    assert_eq!(resize[0].1, vec![40, 0, 100, 0]);
    rig.post_ctrl_bufs(2);
    rig.console().set_console_size("con0", 120, 50).unwrap();
    rig.d.run();
    let msgs = rig.ctrl();
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].0.event, VIRTIO_CONSOLE_RESIZE);
    assert_eq!(msgs[0].1, vec![50, 0, 120, 0]);
    assert!(rig.console().set_console_size("nope", 1, 1).is_err());
    // A terminal resize on the console's backend becomes RESIZE; on a serial port it is ignored.
    rig.post_ctrl_bufs(2);
    rig.be(0).events.push(Event::Resized { cols: 80, rows: 24 });
    rig.be(1).events.push(Event::Resized { cols: 90, rows: 30 });
    rig.d.run();
    let msgs = rig.ctrl();
    assert_eq!(msgs.len(), 1);
    assert_eq!((msgs[0].0.id, msgs[0].0.event), (0, VIRTIO_CONSOLE_RESIZE));
    assert_eq!(msgs[0].1, vec![24, 0, 80, 0]);
}

#[test]
fn emergency_write_goes_to_port_0() {
    let mut rig = Rig::new(&three_ports());
    rig.d
        .dev
        .write(REG_CONFIG + CONFIG_EMERG_WR, &[b'!', 0, 0, 0]);
    rig.d
        .dev
        .write(REG_CONFIG + CONFIG_EMERG_WR, &(b'?' as u32).to_le_bytes());
    // Other config offsets are read-only.
    rig.d.dev.write(REG_CONFIG, &[9, 9]);
    rig.d.run();
    assert_eq!(rig.be(0).out, b"!?");
    let mut c = [0u8; 2];
    rig.d.dev.read(REG_CONFIG, &mut c);
    assert_eq!(c, [0, 0]);
    // Without a port 0 the byte is counted and dropped.
    let mut rig = Rig::new(&[(cfg("p1", None, false, None), true)]);
    rig.d.dev.write(REG_CONFIG + CONFIG_EMERG_WR, b"x");
    rig.d.run();
    assert_eq!(rig.console().emergency_dropped(), 1);
}

#[test]
fn single_port_guest_without_multiport() {
    let mut rig = Rig::stopped(1, &[(cfg("con0", None, true, None), true)]);
    rig.d.start(
        feature(VIRTIO_F_VERSION_1) | feature(VIRTIO_CONSOLE_F_SIZE),
        &[(0, DATA_SIZE), (1, DATA_SIZE)],
    );
    rig.d.run();
    assert_eq!(
        rig.console().take_events(),
        vec![ConsoleEvent {
            port_id: "con0".into(),
            open: true
        }]
    );
    rig.d.post_out(1, b"boot log");
    rig.d.notify(1);
    rig.be(0).input.extend(b"ls\n".iter());
    rig.d.post_in(0, 64);
    rig.d.notify(0);
    rig.d.run();
    assert_eq!(rig.be(0).out, b"boot log");
    assert_eq!(rig.d.take_used(0)[0].2, b"ls\n");
    // The size is in config space, and a change interrupts.
    rig.d.ack_interrupt();
    rig.console().set_console_size("con0", 132, 43).unwrap();
    assert_ne!(rig.d.ack_interrupt() & INT_CONFIG, 0);
    assert!(!rig.d.needs_reset());
}

#[test]
fn output_to_a_missing_port_is_discarded_not_held() {
    let mut rig = Rig::new(&[(cfg("p1", None, false, None), true)]);
    rig.d.post_out(tx(0), b"nobody");
    rig.d.post_out(tx(3), b"listens");
    rig.d.notify(tx(0));
    rig.d.run();
    assert_eq!(rig.d.take_used(tx(0)).len(), 1);
    assert_eq!(rig.d.take_used(tx(3)).len(), 1);
    assert!(rig.be(0).out.is_empty());
}

#[test]
fn restart_after_reset() {
    let mut rig = Rig::new(&three_ports());
    rig.handshake();
    rig.open(1, true);
    rig.be(1).budget = Some(0);
    rig.d.post_out(tx(1), b"lost on reset");
    rig.d.notify(tx(1));
    rig.d.run();
    rig.console().take_events();
    // A new driver: full handshake again, data flows.
    let rig_queues = all_queues();
    rig.d.start(multiport_features(), &rig_queues);
    rig.d.run();
    assert_eq!(rig.console().take_events().len(), 1);
    let msgs = rig.handshake();
    assert_eq!(
        msgs.iter()
            .filter(|(h, _)| h.event == VIRTIO_CONSOLE_PORT_ADD)
            .count(),
        3
    );
    rig.open(1, true);
    rig.be(1).budget = None;
    rig.be(1).out.clear();
    rig.d.post_out(tx(1), b"fresh");
    rig.d.notify(tx(1));
    rig.d.run();
    assert_eq!(rig.be(1).out, b"fresh");
}

#[test]
fn backends_are_attached_per_port_and_routed() {
    let mut rig = Rig::new(&three_ports());
    let poller = chardev::Poller::new().unwrap();
    rig.d.dev.attach(chardev::OwnerGroup::new(&poller, 7));
    let owner = |part: u32| (7 << chardev::poller::OWNER_PART_BITS) | part;
    assert_eq!(rig.be(1).attached, Some(owner(1)));
    assert_eq!(rig.be(2).attached, Some(owner(2)));
    // Queue eventfds and the kick are the transport's own.
    assert_eq!(rig.d.dev.event_fds().len(), 10 + 1);
    rig.d.dev.on_ready(2, 1002, Readiness::default());
    assert_eq!(rig.be(2).ready, vec![1002]);
    assert!(rig.be(1).ready.is_empty());
    // A port added later is attached as it comes; a removed one is detached.
    let (backend, state) = FakeBackend::boxed(true);
    let config = PortConfig {
        id: "late".into(),
        name: Some("org.late".into()),
        console: false,
        nr: None,
        chardev: "c3".into(),
    };
    rig.d.dev.device_mut().remove_port("p2").unwrap();
    let nr = rig.d.dev.device_mut().add_port(config, backend).unwrap();
    assert_eq!(state.lock().unwrap().attached, Some(owner(nr)));
    let mut gone = rig.d.dev.device_mut().remove_port("late").unwrap();
    assert_eq!(state.lock().unwrap().attached, None);
    gone.detach();
}

/// Run one malformed-chain case on a fresh, handshaken device with port 1 open.
fn malformed(case: impl FnOnce(&mut Rig)) -> Rig {
    let mut rig = Rig::new(&three_ports());
    rig.handshake();
    rig.open(1, true);
    rig.be(1).input.extend(b"data".iter());
    rig.d.ack_interrupt();
    case(&mut rig);
    rig.d.run();
    assert!(rig.d.needs_reset(), "device not marked for reset");
    assert_ne!(
        rig.d.read32(crate::virtio::mmio::REG_INTERRUPT_STATUS) & INT_CONFIG,
        0
    );
    assert!(rig.d.irq.level());
    // Stopped: nothing more is processed, no input wanted.
    rig.d.post_out(tx(2), b"ignored");
    rig.d.notify(tx(2));
    rig.d.run();
    assert!(rig.be(2).out.is_empty());
    assert_eq!(rig.be(1).input_wanted, Some(false));
    rig
}

fn put(rig: &mut Rig, q: u16, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
    rig.d.put_desc(
        q,
        index,
        RawDescriptor {
            addr,
            len,
            flags,
            next,
        },
    );
}

#[test]
fn malformed_descriptor_loop() {
    malformed(|rig| {
        let buf = rig.d.alloc(16);
        put(rig, tx(1), 0, buf, 4, VRING_DESC_F_NEXT, 1);
        put(rig, tx(1), 1, buf, 4, VRING_DESC_F_NEXT, 0);
        rig.d.publish(tx(1), 0);
        rig.d.notify(tx(1));
    });
}

#[test]
fn malformed_chain_longer_than_the_queue() {
    malformed(|rig| {
        let buf = rig.d.alloc(16);
        // DATA_SIZE descriptors all chained, the last pointing back at the first: the
        // chain claims DATA_SIZE + 1 entries.
        for i in 0..DATA_SIZE {
            put(
                rig,
                tx(1),
                i,
                buf,
                1,
                VRING_DESC_F_NEXT,
                (i + 1) % DATA_SIZE,
            );
        }
        rig.d.publish(tx(1), 0);
        rig.d.notify(tx(1));
    });
}

#[test]
fn malformed_out_of_range_address() {
    let rig = malformed(|rig| {
        put(rig, tx(1), 0, MEM_SIZE - 2, 4, 0, 0);
        rig.d.publish(tx(1), 0);
        rig.d.notify(tx(1));
    });
    assert!(rig.be(1).out.is_empty());
}

#[test]
fn malformed_zero_length() {
    malformed(|rig| {
        let buf = rig.d.alloc(16);
        put(rig, tx(1), 0, buf, 0, 0, 0);
        rig.d.publish(tx(1), 0);
        rig.d.notify(tx(1));
    });
}

#[test]
fn malformed_writable_buffer_on_a_tx_queue() {
    malformed(|rig| {
        let buf = rig.d.alloc(16);
        put(rig, tx(1), 0, buf, 8, VRING_DESC_F_WRITE, 0);
        rig.d.publish(tx(1), 0);
        rig.d.notify(tx(1));
    });
}

#[test]
fn malformed_readable_buffer_on_an_rx_queue() {
    malformed(|rig| {
        let buf = rig.d.alloc(16);
        put(rig, rx(1), 0, buf, 8, 0, 0);
        rig.d.publish(rx(1), 0);
        rig.d.notify(rx(1));
    });
}

#[test]
fn malformed_head_index_and_avail_index() {
    malformed(|rig| {
        rig.d.publish(tx(1), DATA_SIZE + 3);
        rig.d.notify(tx(1));
    });
    malformed(|rig| {
        rig.d.set_avail_idx(tx(1), 1000);
        rig.d.notify(tx(1));
    });
}

#[test]
fn malformed_control_chain() {
    malformed(|rig| {
        let buf = rig.d.alloc(16);
        put(rig, CTX, 0, buf, 8, VRING_DESC_F_WRITE, 0);
        rig.d.publish(CTX, 0);
        rig.d.notify(CTX);
    });
}

#[test]
fn a_reset_recovers_from_needs_reset() {
    let mut rig = malformed(|rig| {
        let buf = rig.d.alloc(16);
        put(rig, tx(1), 0, buf, 0, 0, 0);
        rig.d.publish(tx(1), 0);
        rig.d.notify(tx(1));
    });
    let queues = all_queues();
    rig.d.start(multiport_features(), &queues);
    assert!(!rig.d.needs_reset());
    rig.handshake();
    rig.open(2, true);
    rig.d.post_out(tx(2), b"works");
    rig.d.notify(tx(2));
    rig.d.run();
    assert_eq!(rig.be(2).out, b"works");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Random register traffic on a console's transport, mixed with event-loop passes.
    #[test]
    fn random_registers_never_panic(
        ops in proptest::collection::vec((0u64..0x110, any::<u32>(), any::<bool>()), 1..300),
    ) {
        let mut rig = Rig::stopped(MAX_PORTS, &three_ports());
        for (reg, value, read) in ops {
            let offset = reg * 4;
            if read {
                rig.d.read32(offset);
            } else {
                rig.d.write32(offset, value);
            }
            rig.d.run();
        }
        let status = rig.d.read32(crate::virtio::mmio::REG_INTERRUPT_STATUS);
        prop_assert_eq!(rig.d.irq.level(), status != 0);
    }

    /// Whatever the guest writes in descriptor tables and available rings, the device never
    /// panics, and either processes it or asks for a reset.
    #[test]
    fn random_rings_never_panic(
        descs in proptest::collection::vec(
            (prop_oneof![0x10_0000u64..0x10_1000, any::<u64>()], 0u32..0x2000, 0u16..8, 0u16..20),
            1..20),
        heads in proptest::collection::vec(0u16..20, 1..8),
        queue in 0u16..10,
        open in any::<bool>(),
    ) {
        let mut rig = Rig::new(&three_ports());
        rig.handshake();
        if open {
            rig.open(1, true);
            rig.open(2, true);
        }
        rig.be(1).input.extend([7u8; 100].iter());
        for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
            let size = if queue == CRX || queue == CTX { CTRL_SIZE } else { DATA_SIZE };
            put(&mut rig, queue, i as u16 % size, addr, len, flags, next);
        }
        for &h in &heads {
            rig.d.publish(queue, h);
        }
        rig.d.notify(queue);
        rig.d.run();
        rig.d.run();
        // The level follows InterruptStatus.
        let status = rig.d.read32(crate::virtio::mmio::REG_INTERRUPT_STATUS);
        prop_assert_eq!(rig.d.irq.level(), status != 0);
    }
}

/// A machine reset (the bus's reset, not the driver's Status write): the transport goes back
/// to status 0 and the ports forget the guest, but keep their backends and host connection;
/// the next guest redoes the handshake and finds the ports as the first one did.
#[test]
fn machine_reset_keeps_ports_and_backends_for_the_next_guest() {
    let mut rig = Rig::new(&three_ports());
    rig.handshake();
    rig.open(1, true);
    rig.d.run();
    rig.console().take_events();
    assert!(rig.console().port_info("p1").unwrap().guest_open);

    BusDevice::reset(&mut rig.d.dev);
    assert_eq!(rig.d.status(), 0);
    assert!(!rig.d.dev.is_activated());
    let closed: Vec<(String, bool)> = rig
        .console()
        .take_events()
        .into_iter()
        .map(|e| (e.port_id, e.open))
        .collect();
    assert_eq!(closed, vec![("p1".to_string(), false)]);
    let p1 = rig.console().port_info("p1").unwrap();
    assert!(!p1.guest_open);
    assert!(p1.host_connected, "the backend's peer is still there");
    assert_eq!(rig.console().ports().len(), 3);

    // The rebooted guest's driver starts from scratch and learns the same ports.
    let queues = all_queues();
    rig.d.start(multiport_features(), &queues);
    rig.d.run();
    let msgs = rig.handshake();
    let adds = msgs
        .iter()
        .filter(|(h, _)| h.event == VIRTIO_CONSOLE_PORT_ADD)
        .count();
    assert_eq!(adds, 3);
    assert!(msgs
        .iter()
        .any(|(h, _)| (h.id, h.event, h.value) == (1, VIRTIO_CONSOLE_PORT_OPEN, 1)));
    rig.open(1, true);
    rig.d.post_out(tx(1), b"again");
    rig.d.notify(tx(1));
    rig.d.run();
    assert_eq!(rig.be(1).out, b"again");
}
