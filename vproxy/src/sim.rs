//! A simulated channel between two [`Engine`]s, and the engine's behaviour tests.
//!
//! Time is fake: a tick is one millisecond after a fixed `Instant`. Each direction of the
//! [`Link`] moves at most `speed` bytes per tick, delivers them `latency` ticks later, and
//! can drop bytes or inject garbage at configurable rates (a deterministic xorshift RNG, so
//! every run is reproducible). Each side runs a [`Side`]: a stand-in for the driver and its
//! sockets that sends a per-stream byte pattern and checks every byte it receives against
//! it, so silent corruption, truncation or reordering is caught.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use proptest::prelude::*;

use crate::engine::{Engine, EngineConfig, EngineEvent, OpenError, StreamId};
use crate::wire::{encode, Frame, FrameType, FLAG_EOF_SEEN, FLAG_NEED_REPLY, FLAG_OPENER};

/// One tick of fake time.
const TICK: Duration = Duration::from_millis(1);
/// Bytes an application moves per stream per tick.
const APP_CHUNK: usize = 4096;
/// Rates are given in parts per million.
const PPM: u64 = 1_000_000;
/// Longest run of injected garbage.
const MAX_GARBAGE_RUN: u64 = 8;

/// Deterministic xorshift64* generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn chance(&mut self, ppm: u64) -> bool {
        ppm > 0 && self.next() % PPM < ppm
    }
}

#[derive(Debug, Clone, Copy)]
struct LinkConfig {
    speed: usize,
    latency: u64,
    loss_ppm: u64,
    garbage_ppm: u64,
}

impl LinkConfig {
    fn clean(speed: usize, latency: u64) -> Self {
        LinkConfig {
            speed,
            latency,
            loss_ppm: 0,
            garbage_ppm: 0,
        }
    }
}

/// One direction of the channel.
struct Link {
    cfg: LinkConfig,
    rng: Rng,
    flight: VecDeque<(u64, u8)>,
}

impl Link {
    fn new(cfg: LinkConfig, seed: u64) -> Self {
        Link {
            cfg,
            rng: Rng(seed | 1),
            flight: VecDeque::new(),
        }
    }

    /// Take this tick's bytes from `from`, losing or garbling some.
    fn pump(&mut self, from: &mut Engine, tick: u64) {
        let mut buf = vec![0u8; self.cfg.speed];
        let n = from.transmit(&mut buf);
        let at = tick + self.cfg.latency;
        for &b in &buf[..n] {
            if self.rng.chance(self.cfg.garbage_ppm) {
                for _ in 0..=self.rng.next() % MAX_GARBAGE_RUN {
                    let g = self.rng.next() as u8;
                    self.flight.push_back((at, g));
                }
            }
            if !self.rng.chance(self.cfg.loss_ppm) {
                self.flight.push_back((at, b));
            }
        }
    }

    fn deliver(&mut self, to: &mut Engine, tick: u64, now: Instant) {
        let mut bytes = Vec::new();
        while let Some(&(at, b)) = self.flight.front() {
            if at > tick {
                break;
            }
            bytes.push(b);
            self.flight.pop_front();
        }
        if !bytes.is_empty() {
            to.receive(&bytes, now);
        }
    }
}

/// The byte at `offset` of stream `key` in direction `dir` (0: opener to acceptor).
fn pattern(key: u64, dir: u64, offset: u64) -> u8 {
    let x = offset
        .wrapping_mul(0x9E37_79B9)
        .wrapping_add(key.wrapping_mul(0x85EB_CA6B))
        .wrapping_add(dir.wrapping_mul(0xC2B2_AE35));
    (x ^ (x >> 13) ^ (x >> 29)) as u8
}

/// A service name carrying the test stream's key and byte counts.
fn service(key: u64, to_acceptor: u64, to_opener: u64) -> String {
    format!("t{key}:{to_acceptor}:{to_opener}")
}

fn parse_service(s: &str) -> Option<(u64, u64, u64)> {
    let mut it = s
        .strip_prefix('t')?
        .split(':')
        .map(|p| p.parse::<u64>().ok());
    Some((it.next()??, it.next()??, it.next()??))
}

/// What one side's application knows about one stream.
#[derive(Debug, Default, Clone)]
struct Flow {
    key: u64,
    opener: bool,
    send_total: u64,
    expect_total: u64,
    sent: u64,
    received: u64,
    open: bool,
    shut: bool,
    eof: bool,
    closed: bool,
    reset: Option<String>,
    corrupt: bool,
}

impl Flow {
    fn done(&self) -> bool {
        self.closed || self.reset.is_some()
    }
    fn tx_dir(&self) -> u64 {
        u64::from(!self.opener)
    }
    fn rx_dir(&self) -> u64 {
        u64::from(self.opener)
    }
}

/// A side's application: opens, accepts, writes patterns, reads and checks.
#[derive(Default)]
struct Side {
    flows: HashMap<StreamId, Flow>,
    reads: bool,
    refuse_all: bool,
    /// Incoming streams whose service is not a test pattern, left to the test to answer.
    manual: Vec<(StreamId, String)>,
    session_ups: u32,
    session_resets: u32,
    open_failed: Vec<String>,
    errors: Vec<String>,
}

impl Side {
    fn new() -> Self {
        Side {
            reads: true,
            ..Side::default()
        }
    }

    fn open(&mut self, e: &mut Engine, key: u64, to_acceptor: u64, to_opener: u64) -> StreamId {
        let id = e.open(&service(key, to_acceptor, to_opener)).unwrap();
        self.flows.insert(
            id,
            Flow {
                key,
                opener: true,
                send_total: to_acceptor,
                expect_total: to_opener,
                ..Flow::default()
            },
        );
        id
    }

    fn events(&mut self, e: &mut Engine) {
        while let Some(ev) = e.poll_event() {
            match ev {
                EngineEvent::SessionUp { .. } => self.session_ups += 1,
                EngineEvent::SessionReset { .. } => self.session_resets += 1,
                EngineEvent::OpenRequest { id, service } => match parse_service(&service) {
                    Some(_) if self.refuse_all => e.refuse(id, "no such service"),
                    Some((key, to_acceptor, to_opener)) => {
                        e.accept(id);
                        self.flows.insert(
                            id,
                            Flow {
                                key,
                                opener: false,
                                send_total: to_opener,
                                expect_total: to_acceptor,
                                open: true,
                                ..Flow::default()
                            },
                        );
                    }
                    None => self.manual.push((id, service)),
                },
                EngineEvent::Opened { id } => {
                    if let Some(f) = self.flows.get_mut(&id) {
                        f.open = true;
                    }
                }
                EngineEvent::OpenFailed { id, reason } => {
                    if let Some(f) = self.flows.get_mut(&id) {
                        f.reset = Some(reason.clone());
                    }
                    self.open_failed.push(reason);
                }
                EngineEvent::Eof { id } => {
                    if let Some(f) = self.flows.get_mut(&id) {
                        if f.received != f.expect_total {
                            self.errors.push(format!(
                                "stream {} EOF after {} of {} bytes",
                                f.key, f.received, f.expect_total
                            ));
                        }
                        f.eof = true;
                    }
                }
                EngineEvent::Reset { id, reason } => {
                    if let Some(f) = self.flows.get_mut(&id) {
                        f.reset = Some(reason);
                    }
                }
                EngineEvent::Closed { id } => {
                    if let Some(f) = self.flows.get_mut(&id) {
                        f.closed = true;
                    }
                }
                EngineEvent::VersionMismatch { peer_version } => {
                    self.errors.push(format!("peer of version {peer_version}"));
                }
                EngineEvent::Readable { .. } | EngineEvent::Writable { .. } => {}
            }
        }
    }

    /// Write what the engine takes and read (and check) what it has.
    fn pump(&mut self, e: &mut Engine) {
        let mut buf = vec![0u8; APP_CHUNK];
        for (&id, f) in self.flows.iter_mut().filter(|(_, f)| !f.done()) {
            if f.sent < f.send_total {
                let n = usize::try_from(f.send_total - f.sent)
                    .unwrap_or(usize::MAX)
                    .min(APP_CHUNK)
                    .min(e.send_room(id));
                let data: Vec<u8> = (0..n as u64)
                    .map(|i| pattern(f.key, f.tx_dir(), f.sent + i))
                    .collect();
                f.sent += e.send(id, &data) as u64;
            }
            if f.open && f.sent == f.send_total && !f.shut {
                e.shutdown(id);
                f.shut = true;
            }
            if !self.reads {
                continue;
            }
            loop {
                let n = e.recv(id, &mut buf);
                if n == 0 {
                    break;
                }
                for (i, &b) in buf[..n].iter().enumerate() {
                    if b != pattern(f.key, f.rx_dir(), f.received + i as u64) {
                        f.corrupt = true;
                    }
                }
                f.received += n as u64;
            }
        }
    }

    fn all_done(&self) -> bool {
        self.flows.values().all(Flow::done)
    }
}

/// Two engines, two links, two applications, one fake clock.
struct Sim {
    base: Instant,
    tick: u64,
    a: Engine,
    b: Engine,
    ab: Link,
    ba: Link,
    sa: Side,
    sb: Side,
    /// While true no byte moves (a paused VM).
    frozen: bool,
}

impl Sim {
    fn new(ca: EngineConfig, cb: EngineConfig, link: LinkConfig) -> Self {
        let base = Instant::now();
        Sim {
            base,
            tick: 0,
            a: Engine::new(ca, 0xA11CE, base),
            b: Engine::new(cb, 0xB0B, base),
            ab: Link::new(link, 0x1234_5678),
            ba: Link::new(link, 0x8765_4321),
            sa: Side::new(),
            sb: Side::new(),
            frozen: false,
        }
    }

    fn now(&self) -> Instant {
        self.base + TICK * u32::try_from(self.tick).unwrap()
    }

    fn step(&mut self) {
        self.tick += 1;
        let now = self.now();
        self.a.handle_timeout(now);
        self.b.handle_timeout(now);
        if !self.frozen {
            self.ab.deliver(&mut self.b, self.tick, now);
            self.ba.deliver(&mut self.a, self.tick, now);
        }
        for _ in 0..2 {
            self.sa.events(&mut self.a);
            self.sb.events(&mut self.b);
            self.sa.pump(&mut self.a);
            self.sb.pump(&mut self.b);
        }
        if !self.frozen {
            self.ab.pump(&mut self.a, self.tick);
            self.ba.pump(&mut self.b, self.tick);
        }
    }

    /// Whether nothing can happen before the next engine timeout.
    fn quiet(&self) -> bool {
        self.frozen
            || (self.ab.flight.is_empty()
                && self.ba.flight.is_empty()
                && !self.a.wants_transmit()
                && !self.b.wants_transmit())
    }

    /// Step until `done` or `max_ticks`, jumping over quiet stretches to the next timeout.
    fn run_until(&mut self, max_ticks: u64, mut done: impl FnMut(&Sim) -> bool) -> bool {
        let end = self.tick + max_ticks;
        while self.tick < end {
            if done(self) {
                return true;
            }
            if self.quiet() {
                let next = [self.a.poll_timeout(), self.b.poll_timeout()]
                    .into_iter()
                    .flatten()
                    .min();
                let ticks = next.map_or(max_ticks, |next| {
                    (next.saturating_duration_since(self.now()).as_millis() as u64)
                        .saturating_sub(1)
                });
                self.tick = (self.tick + ticks).min(end - 1);
            }
            self.step();
        }
        done(self)
    }

    fn up(&mut self) {
        assert!(
            self.run_until(10_000, |s| s.a.is_up() && s.b.is_up()),
            "no handshake"
        );
    }

    fn check_integrity(&self) {
        for side in [&self.sa, &self.sb] {
            assert!(side.errors.is_empty(), "{:?}", side.errors);
            for f in side.flows.values() {
                assert!(!f.corrupt, "stream {} corrupted", f.key);
                if f.closed {
                    assert_eq!(f.received, f.expect_total, "stream {} truncated", f.key);
                    assert!(f.eof);
                }
            }
        }
    }
}

fn small_windows(window: u32) -> EngineConfig {
    EngineConfig {
        stream_window: window,
        max_stream_window: window,
        stream_send_buffer: window as usize,
        max_payload: window as usize,
        ..EngineConfig::default()
    }
}

#[test]
fn handshake_and_one_stream() {
    let mut sim = Sim::new(
        EngineConfig::default(),
        EngineConfig::default(),
        LinkConfig::clean(1000, 3),
    );
    sim.up();
    assert_eq!((sim.sa.session_ups, sim.sb.session_ups), (1, 1));
    sim.sa.open(&mut sim.a, 1, 100_000, 50_000);
    assert!(sim.run_until(10_000, |s| s.sa.all_done() && s.sb.all_done()));
    sim.check_integrity();
    assert!(sim.sa.flows.values().all(|f| f.closed));
    assert_eq!(sim.a.session_stats().streams, 0);
    assert_eq!(sim.b.session_stats().buffered, 0);
}

/// Streams both ways over a line that loses and garbles bytes at `ppm`; returns how many of
/// A's streams completed intact and how many were reset.
fn lossy_run(ppm: u64) -> (usize, usize) {
    let link = LinkConfig {
        speed: 400,
        latency: 5,
        loss_ppm: ppm,
        garbage_ppm: ppm,
    };
    let cfg = EngineConfig {
        stream_window: 2048,
        max_payload: 256,
        ..EngineConfig::default()
    };
    let mut sim = Sim::new(cfg.clone(), cfg, link);
    sim.up();
    for key in 0..20 {
        sim.sa.open(&mut sim.a, key, 20_000, 10_000);
        sim.sb.open(&mut sim.b, 100 + key, 5_000, 15_000);
    }
    let finished = sim.run_until(2_000_000, |s| s.sa.all_done() && s.sb.all_done());
    sim.check_integrity();
    assert!(finished, "streams hung: {:?}", sim.a.stream_stats());
    let st = sim.a.session_stats();
    assert!(st.crc_errors + st.resyncs > 0);
    assert!(st.frames_lost > 0 && sim.b.session_stats().retransmits > 0);
    let intact = sim.sa.flows.values().filter(|f| f.closed).count();
    let reset = sim.sa.flows.values().filter(|f| f.reset.is_some()).count();
    (intact, reset)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    /// Whatever the line loses or garbles (up to about one byte in 500 each way), at any
    /// speed and latency, with any window and first frame size, every stream of both sides
    /// arrives whole and none is reset.
    #[test]
    fn any_lossy_line_delivers_every_stream_whole(
        speed in 50usize..2000,
        latency in 0u64..40,
        loss_ppm in 0u64..2000,
        garbage_ppm in 0u64..500,
        window in 256u32..16384,
        payload in 64usize..2048,
        seed in any::<u64>(),
    ) {
        let link = LinkConfig { speed, latency, loss_ppm, garbage_ppm };
        let cfg = EngineConfig {
            stream_window: window,
            initial_payload: payload,
            ..EngineConfig::default()
        };
        let mut sim = Sim::new(cfg.clone(), cfg, link);
        sim.ab.rng = Rng(seed | 1);
        sim.ba.rng = Rng(seed.rotate_left(17) | 1);
        // A HELLO is retried every second; on the worst lines a few are lost.
        prop_assert!(sim.run_until(60_000, |s| s.a.is_up() && s.b.is_up()), "no handshake");
        for key in 0..6 {
            sim.sa.open(&mut sim.a, key, 30_000, 7_000);
            sim.sb.open(&mut sim.b, 100 + key, 3_000, 25_000);
        }
        let finished = sim.run_until(3_000_000, |s| s.sa.all_done() && s.sb.all_done());
        sim.check_integrity();
        prop_assert!(finished, "streams hung: {:?} / {:?}", sim.a.stream_stats(), sim.b.stream_stats());
        for side in [&sim.sa, &sim.sb] {
            prop_assert!(side.flows.values().all(|f| f.closed && f.reset.is_none()));
        }
    }
}

#[test]
fn lossy_line_delivers_every_stream_whole() {
    // 10 ppm lost and 10 ppm garbage: a few frames damaged; 300 ppm: a damaged frame in
    // most windows. Lost frames are sent again: every stream arrives whole, none is reset.
    for ppm in [10, 300] {
        let (intact, reset) = lossy_run(ppm);
        assert_eq!((intact, reset), (40, 0), "at {ppm} ppm");
    }
}

#[test]
fn hundred_streams_tiny_windows_no_deadlock() {
    let mut sim = Sim::new(
        small_windows(64),
        small_windows(64),
        LinkConfig::clean(2000, 2),
    );
    sim.up();
    for key in 0..50 {
        sim.sa.open(&mut sim.a, key, 3000, 3000);
        sim.sb.open(&mut sim.b, 1000 + key, 3000, 3000);
    }
    assert!(sim.run_until(200_000, |s| s.sa.all_done() && s.sb.all_done()));
    sim.check_integrity();
    for side in [&sim.sa, &sim.sb] {
        assert_eq!(side.flows.len(), 100);
        assert!(side.flows.values().all(|f| f.closed && f.received == 3000));
    }
}

/// One-byte echoes on a stream beside bulk streams both ways, over a line of 11.52 bytes per
/// millisecond (115200 baud) with 2 ms latency, engines configured with `cfg`. Returns the
/// round trips (ticks) of the echoes that started after `warmup` ticks, the bytes B received
/// meanwhile, and the DATA payload A settled on.
fn echo_beside_bulk(cfg: EngineConfig, ticks: u64, warmup: u64) -> (Vec<u64>, u64, usize) {
    let mut sim = Sim::new(
        cfg.clone(),
        cfg,
        LinkConfig::clean(ECHO_LINE_SPEED, ECHO_LINE_LATENCY),
    );
    sim.up();
    // Bulk both ways, far more than the run moves.
    sim.sa.open(&mut sim.a, 1, u64::MAX / 2, u64::MAX / 2);
    let echo = sim.a.open("echo").unwrap();
    let mut echo_b = None;
    let mut sent_at = None;
    let mut rtts = Vec::new();
    let mut start_rx = 0;
    let first = sim.tick;
    for _ in 0..ticks {
        sim.step();
        if sim.tick == first + warmup {
            start_rx = sim.b.session_stats().bytes_rx;
        }
        // The `echo` stream is not in the Sides' tables: handle it here.
        if let Some((id, _)) = sim.sb.manual.pop() {
            echo_b = Some(id);
            sim.b.accept(id);
        }
        if let Some(eb) = echo_b {
            let mut buf = [0u8; 64];
            let n = sim.b.recv(eb, &mut buf);
            assert_eq!(sim.b.send(eb, &buf[..n]), n);
        }
        let mut buf = [0u8; 64];
        if sim.a.recv(echo, &mut buf) > 0 {
            let at = sent_at.take().unwrap();
            if at >= first + warmup {
                rtts.push(sim.tick - at);
            }
        }
        if sent_at.is_none() && sim.a.send(echo, b"k") == 1 {
            sent_at = Some(sim.tick);
        }
    }
    sim.check_integrity();
    let moved = sim.b.session_stats().bytes_rx - start_rx;
    (rtts, moved, sim.a.session_stats().payload)
}

/// Bytes per tick and latency (ticks) of the line in `echo_beside_bulk`.
const ECHO_LINE_SPEED: usize = 12;
const ECHO_LINE_LATENCY: u64 = 2;

/// The bound on an echo's round trip beside bulk with frames of `payload` bytes: per
/// direction, about the bytes in flight (two frames and a little) ahead of it, a few control
/// frames, its own frame, the latency. A FIFO behind a whole window would be seconds.
fn echo_bound(payload: usize) -> u64 {
    let frame_ticks = ((payload + 30) / ECHO_LINE_SPEED + 1) as u64;
    let control_ticks = (4 * 40 / ECHO_LINE_SPEED + 1) as u64;
    2 * (ECHO_LINE_LATENCY + 3 * frame_ticks + control_ticks + 2)
}

#[test]
fn interactive_echo_stays_fast_beside_bulk_with_a_rate_hint() {
    let ticks = 20_000;
    let (rtts, moved, payload) = echo_beside_bulk(EngineConfig::for_rate(11_520), ticks, 2_000);
    assert!(payload <= 512, "frames of {payload} bytes on a slow line");
    assert!(rtts.len() > 50, "only {} echoes", rtts.len());
    let worst = *rtts.iter().max().unwrap();
    assert!(
        worst <= echo_bound(payload),
        "echo round trip {worst} ticks > {}",
        echo_bound(payload)
    );
    // And the bulk stream still got most of the line.
    assert!(
        moved * 10 >= (ticks - 2_000) * ECHO_LINE_SPEED as u64 * 8,
        "line used {moved}"
    );
}

#[test]
fn interactive_echo_stays_fast_beside_bulk_without_any_hint() {
    // The engines are told nothing: they start with 1 KiB frames and 16 KiB in flight (over
    // a second of this line) and must find its speed from the ACKs.
    let ticks = 30_000;
    let warmup = 5_000;
    let (mut rtts, moved, payload) = echo_beside_bulk(EngineConfig::default(), ticks, warmup);
    assert!(payload <= 512, "frames of {payload} bytes on a slow line");
    assert!(rtts.len() > 50, "only {} echoes", rtts.len());
    rtts.sort_unstable();
    let median = rtts[rtts.len() / 2];
    let worst = *rtts.last().unwrap();
    let bound = echo_bound(payload);
    assert!(median <= bound, "median echo {median} ticks > {bound}");
    // A min-RTT probe or a rate sample expiring may let one echo wait a little longer.
    assert!(
        worst <= 2 * bound,
        "worst echo {worst} ticks > {}",
        2 * bound
    );
    assert!(
        moved * 10 >= (ticks - warmup) * ECHO_LINE_SPEED as u64 * 8,
        "line used {moved}"
    );
}

#[test]
fn half_close_both_directions() {
    let mut sim = Sim::new(
        EngineConfig::default(),
        EngineConfig::default(),
        LinkConfig::clean(500, 4),
    );
    sim.up();
    // The opener finishes first and the acceptor keeps sending after the opener's EOF, and the
    // other way round.
    sim.sa.open(&mut sim.a, 1, 10, 200_000);
    sim.sa.open(&mut sim.a, 2, 200_000, 10);
    assert!(sim.run_until(100_000, |s| s.sa.all_done() && s.sb.all_done()));
    sim.check_integrity();
    for side in [&sim.sa, &sim.sb] {
        assert!(side.flows.values().all(|f| f.closed && f.eof));
    }
}

#[test]
fn peer_restart_resets_streams_and_new_opens_work() {
    let mut sim = Sim::new(
        EngineConfig::default(),
        EngineConfig::default(),
        LinkConfig::clean(500, 4),
    );
    sim.up();
    for key in 0..5 {
        sim.sa.open(&mut sim.a, key, 1 << 40, 1 << 40);
    }
    sim.run_until(200, |_| false);
    assert_eq!(sim.a.session_stats().streams, 5);
    // The guest reboots: a new engine with a new session id; its old streams are gone.
    sim.b = Engine::new(EngineConfig::default(), 0x005E_C04D, sim.now());
    sim.sb = Side::new();
    let up = sim.run_until(10_000, |s| s.a.is_up() && s.b.is_up());
    assert!(
        up,
        "{:?}\n{:?}",
        sim.a.session_stats(),
        sim.b.session_stats()
    );
    assert_eq!(sim.sa.session_resets, 1);
    assert!(sim.sa.flows.values().all(|f| f.reset.is_some()));
    assert_eq!(sim.a.session_stats().streams, 0);
    assert_eq!(sim.a.session_stats().session_resets, 1);
    sim.sa.flows.clear();
    sim.sa.open(&mut sim.a, 9, 5000, 5000);
    assert!(sim.run_until(10_000, |s| s.sa.all_done() && s.sb.all_done()));
    sim.check_integrity();
    assert!(sim.sa.flows.values().all(|f| f.closed));
}

#[test]
fn channel_reset_restarts_the_session_on_both_sides() {
    let mut sim = Sim::new(
        EngineConfig::default(),
        EngineConfig::default(),
        LinkConfig::clean(500, 4),
    );
    sim.up();
    sim.sa.open(&mut sim.a, 1, 1 << 40, 1 << 40);
    sim.run_until(100, |_| false);
    let old = sim.a.session_stats().session_id;
    let now = sim.now();
    sim.a.channel_reset(now);
    assert_ne!(sim.a.session_stats().session_id, old);
    assert!(sim.run_until(10_000, |s| s.a.is_up() && s.b.is_up() && s.sb.all_done()));
    assert!(sim.sa.all_done() && sim.sb.all_done());
    assert_eq!(sim.sb.session_resets, 1);
}

#[test]
fn memory_stays_under_caps_when_nobody_reads() {
    let ca = EngineConfig {
        stream_window: 1024,
        max_stream_window: 1024,
        stream_send_buffer: 2048,
        ..EngineConfig::default()
    };
    let cb = EngineConfig {
        session_buffer_cap: 6 * 1024,
        ..ca.clone()
    };
    let mut sim = Sim::new(ca.clone(), cb.clone(), LinkConfig::clean(1000, 2));
    sim.sb.reads = false;
    sim.up();
    for key in 0..5 {
        sim.sa.open(&mut sim.a, key, 1 << 40, 0);
    }
    sim.run_until(5_000, |_| false);
    for e in [&sim.a, &sim.b] {
        for s in e.stream_stats() {
            assert!(s.recv_buffered <= ca.stream_window as usize);
            // Unsent, plus sent and kept until the peer reports it consumed.
            assert!(s.send_buffered <= ca.stream_send_buffer + ca.stream_window as usize);
        }
    }
    assert_eq!(sim.a.session_stats().buffered, 5 * (2048 + 1024));
    // B holds 5 full windows (5 KiB): under its 6 KiB cap, so one more stream is accepted,
    // and then B is at its cap and refuses the next.
    assert_eq!(sim.b.session_stats().buffered, 5 * 1024);
    sim.sa.open(&mut sim.a, 5, 1 << 40, 0);
    sim.run_until(2_000, |_| false);
    assert_eq!(sim.b.session_stats().buffered, cb.session_buffer_cap);
    sim.sa.open(&mut sim.a, 6, 1 << 40, 0);
    sim.run_until(2_000, |_| false);
    assert_eq!(sim.sa.open_failed, vec!["over memory cap".to_string()]);
    assert_eq!(sim.b.session_stats().buffered, cb.session_buffer_cap);
}

#[test]
fn send_and_open_respect_the_session_cap() {
    let cfg = EngineConfig {
        session_buffer_cap: 100,
        ..EngineConfig::default()
    };
    let mut e = Engine::new(cfg, 1, Instant::now());
    let a = e.open("a").unwrap();
    assert_eq!(e.send(a, &[0; 70]), 70);
    let b = e.open("b").unwrap();
    assert_eq!(e.send(b, &[0; 70]), 30);
    assert_eq!(e.send(a, &[0; 10]), 0);
    assert_eq!(e.open("c"), Err(OpenError::OverMemoryCap));
    e.reset(b, "done");
    assert_eq!(e.poll_event(), Some(EngineEvent::Writable { id: a }));
    assert_eq!(e.send_room(a), 30);
    assert!(e.open("c").is_ok());
}

#[test]
fn open_refused_beyond_max_streams() {
    let cfg = EngineConfig {
        max_streams: 3,
        ..EngineConfig::default()
    };
    let mut sim = Sim::new(
        EngineConfig::default(),
        cfg.clone(),
        LinkConfig::clean(500, 2),
    );
    sim.up();
    for key in 0..5 {
        sim.sa.open(&mut sim.a, key, 1 << 40, 0);
    }
    sim.run_until(1_000, |_| false);
    assert_eq!(sim.b.session_stats().streams, 3);
    assert_eq!(sim.sa.open_failed, vec!["too many streams"; 2]);
    // Our own limit: open() refuses without asking the peer.
    let mut e = Engine::new(cfg, 1, sim.now());
    for _ in 0..3 {
        e.open("s").unwrap();
    }
    assert_eq!(e.open("s"), Err(OpenError::TooManyStreams));
    assert_eq!(e.open("bad name"), Err(OpenError::BadServiceName));
    assert_eq!(e.open(""), Err(OpenError::BadServiceName));
}

#[test]
fn refused_service_fails_the_open() {
    let mut sim = Sim::new(
        EngineConfig::default(),
        EngineConfig::default(),
        LinkConfig::clean(500, 2),
    );
    sim.sb.refuse_all = true;
    sim.up();
    sim.sa.open(&mut sim.a, 1, 10, 10);
    assert!(sim.run_until(1_000, |s| s.sa.all_done()));
    assert_eq!(sim.sa.open_failed, vec!["no such service"]);
}

#[test]
fn silent_peer_for_ten_minutes_keeps_streams() {
    let mut sim = Sim::new(
        EngineConfig::default(),
        EngineConfig::default(),
        LinkConfig::clean(500, 2),
    );
    sim.up();
    sim.sa.open(&mut sim.a, 1, 1 << 20, 1 << 20);
    sim.run_until(50, |_| false);
    sim.frozen = true;
    let ten_minutes = 10 * 60 * 1000;
    sim.run_until(ten_minutes, |_| false);
    assert_eq!(sim.a.session_stats().streams, 1);
    assert_eq!(sim.b.session_stats().streams, 1);
    assert!(sim.a.session_stats().idle && sim.a.session_stats().up);
    sim.frozen = false;
    assert!(sim.run_until(100_000, |s| s.sa.all_done() && s.sb.all_done()));
    sim.check_integrity();
    assert!(sim.sa.flows.values().all(|f| f.closed));
    assert!(!sim.a.session_stats().idle);
}

// ----- frame-level tests -----

/// An engine whose session is up with a peer of session `PEER`.
const PEER: u64 = 0xFEED;

fn frame_bytes(frames: &[Frame]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in frames {
        encode(f, &mut out);
    }
    out
}

fn hello(peer_session_heard: u64) -> Frame {
    let mut p = peer_session_heard.to_le_bytes().to_vec();
    for v in [1024u32, 100, 16] {
        p.extend_from_slice(&v.to_le_bytes());
    }
    Frame::new(FrameType::Hello, FLAG_NEED_REPLY, 0, PEER).with_payload(p)
}

fn up_engine(now: Instant) -> Engine {
    let mut e = Engine::new(EngineConfig::default(), 7, now);
    e.receive(&frame_bytes(&[hello(7)]), now);
    assert!(e.is_up());
    assert_eq!(
        e.poll_event(),
        Some(EngineEvent::SessionUp { peer_session: PEER })
    );
    e
}

fn drain(e: &mut Engine) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = e.transmit(&mut buf);
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&buf[..n]);
    }
}

fn credit(stream: u32, consumed: u64, window: u32) -> Frame {
    Frame::new(FrameType::Credit, 0, stream, consumed).with_payload(window.to_le_bytes().to_vec())
}

fn arb_frame() -> impl Strategy<Value = Frame> {
    (
        1u8..=11,
        0u8..8,
        0u32..6,
        prop_oneof![0u64..5000, any::<u64>()],
        proptest::collection::vec(any::<u8>(), 0..40),
        prop_oneof![0u32..8, any::<u32>()],
    )
        .prop_map(|(code, flags, stream, value, payload, seq)| {
            let mut f = Frame::new(FrameType::from_code(code).unwrap(), flags, stream, value)
                .with_payload(payload);
            f.seq = seq;
            f
        })
}

#[derive(Debug, Clone)]
enum Op {
    Frames(Vec<Frame>),
    Bytes(Vec<u8>),
    Open,
    Send(u32, usize),
    Recv(u32),
    Accept(u32),
    Shutdown(u32),
    Reset(u32),
    Transmit,
    Tick(u16),
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => proptest::collection::vec(arb_frame(), 1..6).prop_map(Op::Frames),
        1 => proptest::collection::vec(any::<u8>(), 0..100).prop_map(Op::Bytes),
        1 => Just(Op::Open),
        1 => (0u32..6, 0usize..3000).prop_map(|(i, n)| Op::Send(i, n)),
        1 => (0u32..6).prop_map(Op::Recv),
        1 => (0u32..6).prop_map(Op::Accept),
        1 => (0u32..6).prop_map(Op::Shutdown),
        1 => (0u32..6).prop_map(Op::Reset),
        2 => Just(Op::Transmit),
        1 => any::<u16>().prop_map(Op::Tick),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn engine_never_panics_on_arbitrary_frames(ops in proptest::collection::vec(arb_op(), 0..40)) {
        let mut now = Instant::now();
        let mut e = up_engine(now);
        for op in ops {
            match op {
                Op::Frames(f) => e.receive(&frame_bytes(&f), now),
                Op::Bytes(b) => e.receive(&b, now),
                Op::Open => { let _ = e.open("svc"); }
                Op::Send(id, n) => { e.send(id, &vec![1; n]); }
                Op::Recv(id) => { e.recv(id, &mut [0; 500]); }
                Op::Accept(id) => e.accept(id),
                Op::Shutdown(id) => e.shutdown(id),
                Op::Reset(id) => e.reset(id, "r"),
                Op::Transmit => { drain(&mut e); }
                Op::Tick(ms) => {
                    now += Duration::from_millis(ms.into());
                    e.handle_timeout(now);
                }
            }
            while e.poll_event().is_some() {}
            let sum: usize = e.stream_stats().iter().map(|s| s.send_buffered + s.recv_buffered).sum();
            prop_assert_eq!(e.session_stats().buffered, sum);
            for s in e.stream_stats() {
                // What a peer's DATA can make us hold: never more than the window granted.
                prop_assert!(s.recv_buffered <= s.window as usize);
            }
            prop_assert!(e.poll_timeout().is_none_or(|t| t > now || e.wants_transmit()));
        }
    }

    #[test]
    fn cumulative_credit_heals_duplicates_and_reordering(
        steps in proptest::collection::vec(0u64..=100, 1..12),
        rot in 0usize..12,
    ) {
        let now = Instant::now();
        let mut e = up_engine(now);
        let id = e.open("svc").unwrap();
        let ok = Frame::new(FrameType::OpenOk, 0, id, 0).with_payload(100u32.to_le_bytes().to_vec());
        drain(&mut e);
        e.receive(&frame_bytes(&[ok]), now);
        prop_assert_eq!(e.send(id, &[5; 300]), 300);
        drain(&mut e);
        prop_assert_eq!(e.stream_stats()[0].bytes_tx, 100);
        // The peer read in steps; its CREDITs come duplicated, reordered and some lost, but
        // the largest arrives (a later one always restates it).
        let mut values = steps.clone();
        values.sort_unstable();
        let max = *values.last().unwrap();
        let mut mixed: Vec<u64> = values.iter().rev().step_by(2).copied().collect();
        mixed.extend(values.iter().step_by(3));
        mixed.push(max);
        mixed.push(max);
        let len = mixed.len();
        mixed.rotate_left(rot % len);
        let frames: Vec<Frame> = mixed.iter().map(|&v| credit(id, v, 100)).collect();
        e.receive(&frame_bytes(&frames), now);
        prop_assert_eq!(e.stream_stats()[0].credit, max);
        drain(&mut e);
        let st = &e.stream_stats()[0];
        prop_assert_eq!(st.bytes_tx, max + 100);
        prop_assert_eq!(st.credit, 0);
    }
}

#[test]
fn frames_for_unknown_streams_are_reset_but_credit_is_ignored() {
    let now = Instant::now();
    let mut e = up_engine(now);
    drain(&mut e);
    let data = Frame::new(FrameType::Data, FLAG_OPENER, 42, 0).with_payload(vec![1, 2, 3]);
    e.receive(&frame_bytes(&[data, credit(9, 5, 10)]), now);
    let out = drain(&mut e);
    let mut dec = super::wire::Decoder::new();
    let mut got = Vec::new();
    dec.feed(&out, |f| got.push(f));
    got.retain(|f| f.kind != FrameType::Ack);
    assert_eq!(got.len(), 1);
    assert_eq!(
        (got[0].kind, got[0].stream, got[0].flags),
        (FrameType::Reset, 42, 0)
    );
}

#[test]
fn gap_in_data_waits_for_the_retransmission() {
    let now = Instant::now();
    let mut e = up_engine(now);
    let open = Frame::new(FrameType::Open, FLAG_OPENER, 3, 0)
        .with_payload([&100u32.to_le_bytes()[..], b"svc"].concat());
    e.receive(&frame_bytes(&[open]), now);
    let Some(EngineEvent::OpenRequest { id, .. }) = e.poll_event() else {
        panic!("no open request");
    };
    e.accept(id);
    let d = |off: u64| Frame::new(FrameType::Data, FLAG_OPENER, 3, off).with_payload(vec![7; 10]);
    // Bytes 10..20 were lost: 20..30 is kept aside, not delivered, the stream lives.
    e.receive(&frame_bytes(&[d(0), d(20)]), now);
    assert_eq!(e.poll_event(), Some(EngineEvent::Readable { id }));
    assert_eq!(e.poll_event(), None);
    assert_eq!(e.recv_pending(id), 10);
    // The retransmission fills the gap, and a duplicate changes nothing.
    e.receive(&frame_bytes(&[d(10), d(20)]), now);
    let mut buf = [0; 100];
    assert_eq!(e.recv(id, &mut buf), 30);
    assert_eq!(e.session_stats().buffered, 0);
    // Bytes beyond the window granted still reset it.
    let window = u64::from(EngineConfig::default().stream_window);
    e.receive(&frame_bytes(&[d(30 + window)]), now);
    assert_eq!(
        e.poll_event(),
        Some(EngineEvent::Reset {
            id,
            reason: "credit exceeded".into()
        })
    );
}

#[test]
fn eof_is_acknowledged_even_after_close() {
    let now = Instant::now();
    let mut e = up_engine(now);
    let id = e.open("svc").unwrap();
    drain(&mut e);
    let ok = Frame::new(FrameType::OpenOk, 0, id, 0).with_payload(100u32.to_le_bytes().to_vec());
    let eof = Frame::new(FrameType::Eof, 0, id, 0);
    e.shutdown(id);
    e.receive(&frame_bytes(&[ok, eof.clone()]), now);
    drain(&mut e);
    let ack = Frame::new(FrameType::Credit, FLAG_EOF_SEEN, id, 0);
    e.receive(&frame_bytes(&[ack]), now);
    let events: Vec<_> = std::iter::from_fn(|| e.poll_event()).collect();
    assert_eq!(
        events,
        vec![
            EngineEvent::Opened { id },
            EngineEvent::Eof { id },
            EngineEvent::Closed { id }
        ]
    );
    // The peer missed our acknowledgement and repeats its EOF: acknowledged, not reset.
    e.receive(&frame_bytes(&[eof]), now);
    let mut got = Vec::new();
    super::wire::Decoder::new().feed(&drain(&mut e), |f| got.push(f));
    got.retain(|f| f.kind != FrameType::Ack);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].kind, FrameType::Credit);
    assert_ne!(got[0].flags & FLAG_EOF_SEEN, 0);
}

#[test]
fn for_rate_sizes_a_uart() {
    let c = EngineConfig::for_rate(11_520);
    assert_eq!(c.stream_window, 2880);
    assert_eq!(c.initial_payload, 224);
    assert_eq!(c.max_payload, EngineConfig::default().max_payload);
    assert_eq!(c.initial_in_flight, 576);
    assert_eq!(c.stream_send_buffer, 5760);
    let fast = EngineConfig::for_rate(1 << 30);
    assert_eq!(fast.stream_window, EngineConfig::default().stream_window);
    assert_eq!(
        fast.initial_payload,
        EngineConfig::default().initial_payload
    );
}
