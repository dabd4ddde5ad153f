//! virtio-vsock driven as a guest driver would (registers through the transport, rings and
//! chains built by hand in guest memory), with real host clients and listeners on unix
//! sockets in a temporary directory, and a fake clock.

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;

use super::muxer::tests::{read_now, TempDir, GUEST};
use super::muxer::{guest_target_path, HOST_PORT_FIRST};
use super::packet::*;
use super::*;
use crate::bus::BusDevice;
use crate::serial::testing::FakeClock;
use crate::virtio::mmio::{REG_CONFIG, REG_DEVICE_ID, REG_STATUS};
use crate::virtio::testing::Driver;

const RXQ: u16 = RX_QUEUE as u16;
const TXQ: u16 = TX_QUEUE as u16;
const EVQ: u16 = EVENT_QUEUE as u16;
/// A receive buffer as Linux posts them: a header and 4 KiB.
const RX_BUF: u32 = HDR_LEN as u32 + 4096;
const GUEST_PORT: u32 = 1000;
const SERVICE_PORT: u32 = 52;

struct Rig {
    d: Driver<VirtioVsock>,
    clock: Arc<FakeClock>,
    dir: TempDir,
}

fn hdr(op: u16, src_port: u32, dst_port: u32, len: usize) -> Header {
    Header {
        src_cid: GUEST,
        dst_cid: VSOCK_HOST_CID,
        src_port,
        dst_port,
        len: len as u32,
        type_: VSOCK_TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 64 * 1024,
        fwd_cnt: 0,
    }
}

impl Rig {
    fn new() -> Rig {
        let dir = TempDir::new();
        let clock = Arc::new(FakeClock::default());
        let config = VsockConfig {
            guest_cid: GUEST,
            uds_path: dir.sock(),
            registration: Registration::Explicit,
        };
        let dev = VirtioVsock::new(&config, clock.clone()).unwrap();
        let mut d = Driver::new(dev);
        d.attach_poller();
        d.start(
            feature(VIRTIO_F_VERSION_1),
            &[(RXQ, 16), (TXQ, 16), (EVQ, 4)],
        );
        d.run();
        Rig { d, clock, dir }
    }

    fn vsock(&mut self) -> &mut VirtioVsock {
        self.d.dev.device_mut()
    }

    fn info(&mut self) -> VsockInfo {
        self.vsock().info()
    }

    /// The event loop, twice (fds added by the first round are polled by the second).
    fn run(&mut self) {
        self.d.run();
        self.d.run();
    }

    /// Send a packet as one buffer.
    fn send(&mut self, h: Header, payload: &[u8]) {
        let mut bytes = h.to_bytes().to_vec();
        bytes.extend_from_slice(payload);
        self.send_raw(&bytes);
    }

    fn send_raw(&mut self, bytes: &[u8]) {
        self.d.post_out(TXQ, bytes);
        self.d.notify(TXQ);
        self.run();
        assert_eq!(self.d.take_used(TXQ).len(), 1, "tx buffer given back");
    }

    /// Post receive buffers until the queue has none free.
    fn post_rx(&mut self) {
        while self.d.queues[&RXQ].free() > 0 {
            self.d.post_in(RXQ, RX_BUF);
        }
        self.d.notify(RXQ);
        self.run();
    }

    /// Packets the device put in receive buffers: header and payload.
    fn recv(&mut self) -> Vec<(Header, Vec<u8>)> {
        self.post_rx();
        let mut out = Vec::new();
        loop {
            let used = self.d.take_used(RXQ);
            if used.is_empty() {
                return out;
            }
            for (_, len, data) in used {
                let h = Header::parse(&data).expect("a header");
                assert_eq!(len as usize, HDR_LEN + h.len as usize);
                out.push((h, data[HDR_LEN..].to_vec()));
            }
            self.post_rx();
        }
    }

    /// A host client that connected through `PATH` to guest port `port`; the guest side
    /// accepts. Returns the client and the host port.
    fn host_connect(&mut self, port: u32) -> (UnixStream, u32) {
        let mut c = UnixStream::connect(self.dir.sock()).unwrap();
        c.set_nonblocking(true).unwrap();
        c.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
        self.run();
        let pkts = self.recv();
        assert_eq!(pkts.len(), 1);
        let req = pkts[0].0;
        assert_eq!(req.op, VSOCK_OP_REQUEST);
        assert_eq!((req.src_cid, req.dst_cid), (VSOCK_HOST_CID, GUEST));
        assert_eq!(req.dst_port, port);
        self.send(hdr(VSOCK_OP_RESPONSE, port, req.src_port, 0), &[]);
        let ok = format!("OK {}\n", req.src_port);
        assert_eq!(read_now(&mut c).0, ok.as_bytes());
        (c, req.src_port)
    }

    /// The guest connects to host port `SERVICE_PORT`, where `listener` listens.
    fn guest_connect(&mut self, listener: &UnixListener, buf_alloc: u32) -> UnixStream {
        let mut h = hdr(VSOCK_OP_REQUEST, GUEST_PORT, SERVICE_PORT, 0);
        h.buf_alloc = buf_alloc;
        self.send(h, &[]);
        let pkts = self.recv();
        assert_eq!(pkts.len(), 1);
        assert_eq!(pkts[0].0.op, VSOCK_OP_RESPONSE);
        assert_eq!(
            (pkts[0].0.src_port, pkts[0].0.dst_port),
            (SERVICE_PORT, GUEST_PORT)
        );
        let (s, _) = listener.accept().unwrap();
        s.set_nonblocking(true).unwrap();
        s
    }

    fn service_listener(&self) -> UnixListener {
        UnixListener::bind(guest_target_path(&self.dir.sock(), SERVICE_PORT)).unwrap()
    }
}

fn ops(pkts: &[(Header, Vec<u8>)]) -> Vec<u16> {
    pkts.iter().map(|(h, _)| h.op).collect()
}

#[test]
fn identity_and_config_space() {
    let mut r = Rig::new();
    assert_eq!(r.d.read32(REG_DEVICE_ID), VIRTIO_ID_VSOCK);
    assert_eq!(r.d.read32(REG_CONFIG), GUEST as u32);
    assert_eq!(r.d.read32(REG_CONFIG + 4), 0);
    let mut b = [0u8; 8];
    r.d.dev.read(REG_CONFIG, &mut b);
    assert_eq!(u64::from_le_bytes(b), GUEST);
    assert_eq!(r.d.read32(REG_CONFIG + 8), 0, "past the config space");
    assert_eq!(r.vsock().features(), feature(VIRTIO_F_VERSION_1));
    assert_eq!(r.vsock().queue_max_sizes().len(), 3);
}

#[test]
fn host_client_reaches_a_guest_listener_and_bytes_flow() {
    let mut r = Rig::new();
    let (mut c, port) = r.host_connect(SERVICE_PORT);
    assert_eq!(port, HOST_PORT_FIRST);
    c.write_all(b"hello").unwrap();
    r.run();
    let pkts = r.recv();
    assert_eq!(ops(&pkts), vec![VSOCK_OP_RW]);
    assert_eq!(pkts[0].1, b"hello");
    assert_eq!(
        (pkts[0].0.src_port, pkts[0].0.dst_port),
        (port, SERVICE_PORT)
    );
    assert_eq!(pkts[0].0.buf_alloc, conn::CONN_BUF_ALLOC);
    r.send(hdr(VSOCK_OP_RW, SERVICE_PORT, port, 5), b"world");
    assert_eq!(read_now(&mut c).0, b"world");
    let info = r.info();
    assert_eq!(info.guest_cid, GUEST);
    assert_eq!(info.uds_path, r.dir.sock());
    assert_eq!(
        info.connections,
        vec![ConnectionInfo {
            local_port: port,
            peer_port: SERVICE_PORT,
            host_initiated: true,
            state: ConnState::Established,
            bytes_to_host: 5,
            bytes_to_guest: 5,
        }]
    );
}

#[test]
fn host_data_waits_for_guest_credit() {
    let mut r = Rig::new();
    let listener = r.service_listener();
    let mut s = r.guest_connect(&listener, 8);
    s.write_all(b"0123456789abcdefghij").unwrap();
    r.run();
    let pkts = r.recv();
    assert_eq!(ops(&pkts), vec![VSOCK_OP_RW, VSOCK_OP_CREDIT_REQUEST]);
    assert_eq!(pkts[0].1, b"01234567");
    // Nothing more until the guest frees space.
    r.run();
    assert!(r.recv().is_empty());
    let mut upd = hdr(VSOCK_OP_CREDIT_UPDATE, GUEST_PORT, SERVICE_PORT, 0);
    upd.buf_alloc = 8;
    upd.fwd_cnt = 8;
    r.send(upd, &[]);
    r.run();
    let pkts = r.recv();
    assert_eq!(pkts[0].1, b"89abcdef");
}

#[test]
fn large_guest_writes_return_credit() {
    let mut r = Rig::new();
    let listener = r.service_listener();
    let mut s = r.guest_connect(&listener, 4096);
    let chunk = vec![0x5au8; 31 * 1024];
    for _ in 0..2 {
        r.send(
            hdr(VSOCK_OP_RW, GUEST_PORT, SERVICE_PORT, chunk.len()),
            &chunk,
        );
    }
    let pkts = r.recv();
    assert_eq!(ops(&pkts), vec![VSOCK_OP_CREDIT_UPDATE]);
    assert_eq!(pkts[0].0.fwd_cnt, 62 * 1024);
    assert_eq!(read_now(&mut s).0.len(), 62 * 1024);
    // With the credit returned, the guest may send again.
    r.send(
        hdr(VSOCK_OP_RW, GUEST_PORT, SERVICE_PORT, chunk.len()),
        &chunk,
    );
    assert_eq!(r.info().counters.muxer.overrun_resets, 0);
    assert_eq!(r.info().connections[0].bytes_to_host, 93 * 1024);
}

#[test]
fn guest_connect_without_a_listener_gets_rst() {
    let mut r = Rig::new();
    r.send(hdr(VSOCK_OP_REQUEST, GUEST_PORT, SERVICE_PORT, 0), &[]);
    let pkts = r.recv();
    assert_eq!(ops(&pkts), vec![VSOCK_OP_RST]);
    assert_eq!(
        (pkts[0].0.src_port, pkts[0].0.dst_port),
        (SERVICE_PORT, GUEST_PORT)
    );
    assert_eq!(r.info().counters.muxer.refused_connections, 1);
    assert!(r.info().connections.is_empty());
}

#[test]
fn guest_connect_with_a_listener_and_a_split_header() {
    let mut r = Rig::new();
    let _listener = r.service_listener();
    // The header across three descriptors, the payload in a fourth.
    let mut h = hdr(VSOCK_OP_REQUEST, GUEST_PORT, SERVICE_PORT, 0);
    h.buf_alloc = 4096;
    let bytes = h.to_bytes();
    let mut bufs = Vec::new();
    for part in [&bytes[..10], &bytes[10..30], &bytes[30..]] {
        let addr = r.d.alloc(part.len() as u32);
        r.d.mem
            .write_slice(part, vm_memory::GuestAddress(addr))
            .unwrap();
        bufs.push((addr, part.len() as u32, false));
    }
    use vm_memory::Bytes;
    r.d.add_chain(TXQ, &bufs);
    r.d.notify(TXQ);
    r.run();
    let pkts = r.recv();
    assert_eq!(ops(&pkts), vec![VSOCK_OP_RESPONSE]);
    assert_eq!(r.info().counters.malformed_packets, 0);
}

#[test]
fn malformed_packets_are_counted_and_dropped() {
    let mut r = Rig::new();
    // A chain shorter than a header.
    r.send_raw(&[0u8; 20]);
    // Wrong source CID, destination not the host, too long, payload missing.
    let mut h = hdr(VSOCK_OP_REQUEST, GUEST_PORT, SERVICE_PORT, 0);
    h.src_cid = GUEST + 1;
    r.send(h, &[]);
    let mut h = hdr(VSOCK_OP_REQUEST, GUEST_PORT, SERVICE_PORT, 0);
    h.dst_cid = 7;
    r.send(h, &[]);
    r.send(hdr(VSOCK_OP_RW, GUEST_PORT, SERVICE_PORT, 70_000), &[]);
    r.send(hdr(VSOCK_OP_RW, GUEST_PORT, SERVICE_PORT, 10), b"short");
    assert!(r.recv().is_empty(), "no answer to those");
    // A datagram type and an unknown operation get an RST.
    let mut h = hdr(VSOCK_OP_REQUEST, GUEST_PORT, SERVICE_PORT, 0);
    h.type_ = 2;
    r.send(h, &[]);
    r.send(hdr(99, GUEST_PORT, SERVICE_PORT, 0), &[]);
    assert_eq!(ops(&r.recv()), vec![VSOCK_OP_RST, VSOCK_OP_RST]);
    assert_eq!(r.info().counters.malformed_packets, 7);
    assert!(!r.d.needs_reset(), "a bad packet is not a broken device");
}

#[test]
fn small_rx_buffers_are_counted() {
    let mut r = Rig::new();
    r.send(hdr(VSOCK_OP_REQUEST, GUEST_PORT, SERVICE_PORT, 0), &[]);
    r.d.post_in(RXQ, 16);
    r.d.post_in(RXQ, RX_BUF);
    r.d.notify(RXQ);
    r.run();
    let used = r.d.take_used(RXQ);
    assert_eq!(used.len(), 2);
    assert_eq!(used[0].1, 0);
    assert_eq!(Header::parse(&used[1].2).unwrap().op, VSOCK_OP_RST);
    assert_eq!(r.info().counters.small_rx_buffers, 1);
}

#[test]
fn guest_overrunning_its_credit_is_reset() {
    let mut r = Rig::new();
    let listener = r.service_listener();
    let mut s = r.guest_connect(&listener, 4096);
    let chunk = vec![1u8; 40 * 1024];
    r.send(
        hdr(VSOCK_OP_RW, GUEST_PORT, SERVICE_PORT, chunk.len()),
        &chunk,
    );
    r.send(
        hdr(VSOCK_OP_RW, GUEST_PORT, SERVICE_PORT, chunk.len()),
        &chunk,
    );
    let pkts = r.recv();
    assert_eq!(ops(&pkts), vec![VSOCK_OP_RST]);
    assert_eq!(r.info().counters.muxer.overrun_resets, 1);
    assert!(r.info().connections.is_empty());
    let (data, eof) = read_now(&mut s);
    assert_eq!((data.len(), eof), (40 * 1024, true));
}

#[test]
fn shutdown_both_ways() {
    let mut r = Rig::new();
    let listener = r.service_listener();
    let mut s = r.guest_connect(&listener, 4096);
    // The host side finishes sending: the guest hears SHUTDOWN(SEND).
    s.write_all(b"bye").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    r.run();
    let pkts = r.recv();
    assert_eq!(ops(&pkts), vec![VSOCK_OP_RW, VSOCK_OP_SHUTDOWN]);
    assert_eq!(pkts[1].0.flags, VSOCK_FLAG_SHUTDOWN_SEND);
    assert_eq!(r.info().connections[0].state, ConnState::LocalClosed);
    // The guest still answers, then closes: RST, and the host stream ends.
    r.send(hdr(VSOCK_OP_RW, GUEST_PORT, SERVICE_PORT, 2), b"ok");
    let mut sd = hdr(VSOCK_OP_SHUTDOWN, GUEST_PORT, SERVICE_PORT, 0);
    sd.flags = VSOCK_FLAG_SHUTDOWN_SEND | VSOCK_FLAG_SHUTDOWN_RCV;
    r.send(sd, &[]);
    assert_eq!(ops(&r.recv()), vec![VSOCK_OP_RST]);
    assert_eq!(read_now(&mut s), (b"ok".to_vec(), true));
    assert!(r.info().connections.is_empty());

    // Guest first, on a host-initiated connection: the client reads end of file and can
    // still send; its close ends the connection.
    let (mut c, port) = r.host_connect(SERVICE_PORT);
    let mut sd = hdr(VSOCK_OP_SHUTDOWN, SERVICE_PORT, port, 0);
    sd.flags = VSOCK_FLAG_SHUTDOWN_SEND;
    r.send(sd, &[]);
    assert_eq!(read_now(&mut c), (Vec::new(), true));
    assert_eq!(r.info().connections[0].state, ConnState::PeerClosed);
    c.write_all(b"last").unwrap();
    drop(c);
    r.run();
    let pkts = r.recv();
    assert_eq!(ops(&pkts), vec![VSOCK_OP_RW, VSOCK_OP_RST]);
    assert_eq!(pkts[0].1, b"last");
    assert!(r.info().connections.is_empty());
}

#[test]
fn unanswered_request_times_out() {
    let mut r = Rig::new();
    let mut c = UnixStream::connect(r.dir.sock()).unwrap();
    c.set_nonblocking(true).unwrap();
    c.write_all(b"CONNECT 52\n").unwrap();
    r.run();
    assert_eq!(ops(&r.recv()), vec![VSOCK_OP_REQUEST]);
    assert_eq!(
        r.vsock().next_deadline_ns(),
        Some(conn::CONN_REQUEST_TIMEOUT_NS)
    );
    r.clock.advance(conn::CONN_REQUEST_TIMEOUT_NS - 1);
    r.run();
    assert!(!read_now(&mut c).1);
    r.clock.advance(1);
    r.run();
    assert_eq!(read_now(&mut c), (Vec::new(), true), "closed without OK");
    assert_eq!(ops(&r.recv()), vec![VSOCK_OP_RST]);
    assert_eq!(r.info().counters.muxer.timeouts, 1);
}

#[test]
fn device_reset_drops_connections_and_keeps_the_listener() {
    let mut r = Rig::new();
    let listener = r.service_listener();
    let mut s = r.guest_connect(&listener, 4096);
    let (mut c, _) = r.host_connect(SERVICE_PORT);
    assert_eq!(r.info().connections.len(), 2);
    r.d.write32(REG_STATUS, 0);
    r.run();
    assert!(r.info().connections.is_empty());
    assert!(read_now(&mut s).1);
    assert!(read_now(&mut c).1);
    // The driver comes back; host clients still reach the guest.
    r.d.start(
        feature(VIRTIO_F_VERSION_1),
        &[(RXQ, 16), (TXQ, 16), (EVQ, 4)],
    );
    r.run();
    let (_c, port) = r.host_connect(SERVICE_PORT);
    assert_eq!(port, HOST_PORT_FIRST + 1);
}

#[test]
fn transport_reset_sends_the_event_and_drops_connections() {
    let mut r = Rig::new();
    let (mut c, _) = r.host_connect(SERVICE_PORT);
    r.vsock().transport_reset();
    r.run();
    assert!(read_now(&mut c).1);
    assert!(r.info().connections.is_empty());
    // No event buffer yet: the event waits for one.
    assert_eq!(r.info().counters.transport_resets, 0);
    r.d.post_in(EVQ, EVENT_LEN as u32);
    r.d.notify(EVQ);
    r.run();
    let used = r.d.take_used(EVQ);
    assert_eq!(used.len(), 1);
    assert_eq!(used[0].1, EVENT_LEN as u32);
    assert_eq!(
        used[0].2,
        VIRTIO_VSOCK_EVENT_TRANSPORT_RESET.to_le_bytes().to_vec()
    );
    assert_eq!(r.info().counters.transport_resets, 1);
    // Once only.
    r.d.post_in(EVQ, EVENT_LEN as u32);
    r.d.notify(EVQ);
    r.run();
    assert!(r.d.take_used(EVQ).is_empty());
}

/// A machine reset: the transport goes to status 0 (the vCPUs' bus reset), then the VMM
/// reports a transport reset; the rebooted driver's first event buffer gets the event, and
/// the socket left behind by a dropped device is removed.
#[test]
fn machine_reset_delivers_the_event_to_the_rebooted_driver() {
    let mut r = Rig::new();
    let (mut c, _) = r.host_connect(SERVICE_PORT);
    r.d.write32(REG_STATUS, 0);
    r.vsock().transport_reset();
    r.run();
    assert!(read_now(&mut c).1, "the host stream was closed");
    r.d.start(
        feature(VIRTIO_F_VERSION_1),
        &[(RXQ, 16), (TXQ, 16), (EVQ, 4)],
    );
    r.d.post_in(EVQ, EVENT_LEN as u32);
    r.d.notify(EVQ);
    r.run();
    let used = r.d.take_used(EVQ);
    assert_eq!(used.len(), 1);
    assert_eq!(r.info().counters.transport_resets, 1);
    let (_c, port) = r.host_connect(SERVICE_PORT);
    assert_eq!(port, HOST_PORT_FIRST + 1);
    let path = r.dir.sock();
    drop(r.d);
    assert!(!path.exists(), "{} left behind", path.display());
}

#[test]
fn activation_needs_every_queue() {
    let dir = TempDir::new();
    let config = VsockConfig {
        guest_cid: GUEST,
        uds_path: dir.sock(),
        registration: Registration::PollFds,
    };
    let dev = VirtioVsock::new(&config, Arc::new(FakeClock::default())).unwrap();
    let mut d = Driver::new(dev);
    d.write32(REG_STATUS, 0);
    let ok = crate::virtio::STATUS_ACKNOWLEDGE
        | crate::virtio::STATUS_DRIVER
        | crate::virtio::STATUS_FEATURES_OK;
    d.write32(REG_STATUS, crate::virtio::STATUS_ACKNOWLEDGE);
    d.write32(
        REG_STATUS,
        crate::virtio::STATUS_ACKNOWLEDGE | crate::virtio::STATUS_DRIVER,
    );
    d.write32(crate::virtio::mmio::REG_DRIVER_FEATURES_SEL, 1);
    d.write32(crate::virtio::mmio::REG_DRIVER_FEATURES, 1);
    d.write32(REG_STATUS, ok);
    d.setup_queue(RXQ, 16);
    d.setup_queue(TXQ, 16);
    d.write32(REG_STATUS, ok | crate::virtio::STATUS_DRIVER_OK);
    assert!(d.needs_reset());
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

    /// Whatever header and payload the guest sends, cut wherever across descriptors, the
    /// device gives every buffer back, counts what it refuses and stays usable.
    #[test]
    fn random_packets_in_random_layouts(
        packets in proptest::collection::vec(
            (
                proptest::prelude::any::<[u8; HDR_LEN]>(),
                0usize..64,
                proptest::prelude::any::<bool>(),
                proptest::collection::vec(1usize..30, 0..3),
            ),
            1..6,
        ),
    ) {
        let mut r = Rig::new();
        let _listener = r.service_listener();
        for (raw, plen, addressed, cuts) in packets {
            let mut h = Header::from_bytes(&raw);
            if addressed {
                h.src_cid = GUEST;
                h.dst_cid = VSOCK_HOST_CID;
                h.type_ = VSOCK_TYPE_STREAM;
                h.op = 1 + h.op % 7;
                h.src_port = GUEST_PORT;
                h.dst_port = SERVICE_PORT;
            }
            let mut bytes = h.to_bytes().to_vec();
            bytes.extend(std::iter::repeat_n(0xa5u8, plen));
            let mut bufs = Vec::new();
            let mut rest = &bytes[..];
            for cut in cuts {
                if cut >= rest.len() {
                    break;
                }
                let (part, tail) = rest.split_at(cut);
                bufs.push(part.to_vec());
                rest = tail;
            }
            bufs.push(rest.to_vec());
            let chain: Vec<(u64, u32, bool)> = bufs
                .iter()
                .map(|b| {
                    let addr = r.d.alloc(b.len() as u32);
                    vm_memory::Bytes::write_slice(&r.d.mem, b, vm_memory::GuestAddress(addr))
                        .unwrap();
                    (addr, b.len() as u32, false)
                })
                .collect();
            r.d.add_chain(TXQ, &chain);
            r.d.notify(TXQ);
            r.run();
            proptest::prop_assert_eq!(r.d.take_used(TXQ).len(), 1);
            r.recv();
        }
        proptest::prop_assert!(!r.d.needs_reset());
        // Still usable: a host client reaches the guest.
        let (_c, _port) = r.host_connect(SERVICE_PORT + 1);
    }
}
