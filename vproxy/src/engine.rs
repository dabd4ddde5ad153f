//! The vproxy session engine: sans-IO, shared by both ends of a channel.
//!
//! An [`Engine`] is fed channel bytes with [`Engine::receive`] (always all of them: the reader
//! never waits for anything, which is what makes the virtproxy deadlock impossible) and gives
//! channel bytes back with [`Engine::transmit`], one frame at a time, control frames
//! first and stream data round-robin, keeping no more bytes in flight in the channel than
//! keep it busy ([`crate::path`]). Every frame is numbered; the peer's ACKs name the lost
//! ones and lost DATA is sent again ([`crate::arq`]), so a damaged frame costs a
//! retransmission, never the stream. Streams are driven with [`Engine::open`],
//! [`Engine::send`], [`Engine::recv`], [`Engine::shutdown`] and [`Engine::reset`]; what
//! happened comes out of [`Engine::poll_event`]. Time comes in as `Instant`s: the engine
//! asks for a wake-up with [`Engine::poll_timeout`] and does its timed work in
//! [`Engine::handle_timeout`].
//!
//! The protocol rules (handshake, credit, loss healing, unknown streams) are
//! `docs/vproxy.md`; this file follows it section by section. Memory is bounded by the
//! configuration: per-stream send buffers and granted receive windows (which grow with the
//! measured throughput x round trip up to a cap), a session cap checked by `send` and OPEN,
//! a maximum stream count, and capped control queues.
//!
//! The driver's loop: after `receive`, `handle_timeout` or any stream call, drain
//! `poll_event`, then call `transmit` while the channel takes bytes, and sleep until the
//! channel or a socket is ready or `poll_timeout` passes.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::arq::{Ack, Outcome, RxTracker, TxLog};
use crate::path::PathModel;
use crate::wire::{
    encode, encode_parts, Decoder, Frame, FrameType, FLAG_EOF_SEEN, FLAG_NEED_REPLY, FLAG_OPENER,
    WIRE_MAX_PAYLOAD,
};

/// The local handle of a stream. Never reused within one engine.
pub type StreamId = u32;

/// Default [`EngineConfig::max_streams`].
pub const DEFAULT_MAX_STREAMS: u32 = 16 * 1024;
/// Default [`EngineConfig::stream_window`]: the window a stream starts with.
pub const DEFAULT_STREAM_WINDOW: u32 = 64 * 1024;
/// Default [`EngineConfig::max_stream_window`]: how far a stream's window may grow.
pub const DEFAULT_MAX_STREAM_WINDOW: u32 = 8 * 1024 * 1024;
/// Default [`EngineConfig::stream_send_buffer`].
pub const DEFAULT_STREAM_SEND_BUFFER: usize = 256 * 1024;
/// Default [`EngineConfig::session_buffer_cap`].
pub const DEFAULT_SESSION_BUFFER_CAP: usize = 32 * 1024 * 1024;
/// Default [`EngineConfig::max_payload`]: the wire's limit; the frames actually sent are
/// sized to the measured channel (`crate::path`).
pub const DEFAULT_MAX_PAYLOAD: usize = WIRE_MAX_PAYLOAD;
/// Default [`EngineConfig::initial_payload`]: DATA payload before the channel is measured.
pub const DEFAULT_INITIAL_PAYLOAD: usize = 1024;
/// Default [`EngineConfig::initial_in_flight`]: bytes in flight before the channel is
/// measured.
pub const DEFAULT_INITIAL_IN_FLIGHT: usize = 16 * 1024;
/// Default [`EngineConfig::keepalive`].
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(5);

/// The smallest receive window an engine grants (smaller configured values are raised).
pub const MIN_STREAM_WINDOW: u32 = 16;
/// The longest service name.
pub const MAX_SERVICE_LEN: usize = 64;
/// The longest RESET / OPEN_FAIL reason on the wire (longer ones are cut).
pub const MAX_REASON_LEN: usize = 128;

/// `for_rate`: the window is this fraction (1/n) of a second of line time.
const RATE_WINDOW_DIVISOR: u64 = 4;
/// `for_rate`: bounds of the window.
const RATE_WINDOW_MIN: u64 = 1024;
/// `for_rate`: a DATA frame holds the line for at most 1/n second.
const RATE_FRAME_DIVISOR: u64 = 50;
/// `for_rate`: bounds of the DATA payload.
const RATE_PAYLOAD_MIN: u64 = 64;
/// `for_rate`: bytes in flight before measuring are this fraction (1/n) of a second.
const RATE_IN_FLIGHT_DIVISOR: u64 = 20;
/// `for_rate`: payloads are rounded down to a multiple of this.
const RATE_PAYLOAD_ALIGN: u64 = 16;
/// `for_rate`: the send buffer holds this many windows.
const RATE_SEND_BUFFER_WINDOWS: usize = 2;

/// How often an engine that is not up repeats its HELLO.
const HELLO_RETRY: Duration = Duration::from_secs(1);
/// First retransmit delay of a stream's unconfirmed state (OPEN, EOF, in-flight DATA): a
/// backstop behind the ACKs, which find lost frames within a round trip.
const RETX_INITIAL: Duration = Duration::from_secs(1);
/// Longest retransmit delay (the backoff doubles up to it).
const RETX_MAX: Duration = Duration::from_secs(30);
/// A pause in the input at least this long lets the decoder drop a frame cut short before
/// it (see `Decoder::mark_gap`).
const INPUT_GAP: Duration = Duration::from_millis(100);
/// Silence for this many keepalive intervals marks the session idle.
const IDLE_KEEPALIVES: u32 = 3;
/// Closed, reset or refused streams remembered to answer late frames about them.
const RECENT_STREAMS: usize = 256;
/// Cap of the queue of RESET / OPEN_FAIL / acknowledgement replies.
const REPLY_QUEUE_CAP: usize = 256;
/// Cap of the queue of PONGs owed.
const PONG_QUEUE_CAP: usize = 4;
/// The tail-loss PING backs off to at most 2^n times the retransmission timeout.
const TLP_BACKOFF_MAX_SHIFT: u32 = 6;
/// Size of the HELLO payload: peer session, max payload, stream window, max streams.
const HELLO_PAYLOAD_LEN: usize = 20;
/// Size of the window field that starts OPEN, OPEN_OK and CREDIT payloads.
const WINDOW_LEN: usize = 4;
/// A stream's window doubles when half of it was read within this many smoothed round
/// trips of the previous credit (it settles near four times the path's bytes per round trip).
const WINDOW_GROW_RTTS: u32 = 2;
/// A stream's window grows to at most this fraction (1/n) of the session cap.
const SESSION_WINDOW_SHARE: usize = 4;

// Per-stream control frames owed, one bit each (`docs/vproxy.md` §8, item 3).
const CTL_OPEN: u8 = 0x01;
const CTL_OPEN_OK: u8 = 0x02;
const CTL_CREDIT: u8 = 0x04;
const CTL_EOF: u8 = 0x08;
const CTL_RETX: u8 = 0x10;
/// The order in which a stream's owed control frames go out.
const CTL_ORDER: [u8; 5] = [CTL_OPEN, CTL_OPEN_OK, CTL_CREDIT, CTL_EOF, CTL_RETX];

/// Reasons the engine itself gives.
const R_TOO_MANY: &str = "too many streams";
const R_MEMORY: &str = "over memory cap";
const R_BAD_NAME: &str = "bad service name";
const R_MALFORMED: &str = "malformed open";
const R_STALE: &str = "stale open";
const R_UNKNOWN: &str = "unknown stream";
const R_CREDIT: &str = "credit exceeded";
const R_AFTER_EOF: &str = "data after eof";
const R_PROTOCOL: &str = "protocol error";
const R_SESSION: &str = "session reset";
const R_CHANNEL: &str = "channel reset";

/// Limits of one engine. See `docs/vproxy.md` §8 for how they bound memory.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Most streams at once; OPEN beyond it is refused ("too many streams").
    pub max_streams: u32,
    /// Bytes of receive credit a stream starts with.
    pub stream_window: u32,
    /// How far a stream's receive window may grow while its consumer keeps up (at least
    /// `stream_window`).
    pub max_stream_window: u32,
    /// Bytes `send` buffers per stream, not yet sent, before returning 0.
    pub stream_send_buffer: usize,
    /// Total buffered bytes (all streams: unsent, sent but not yet consumed by the peer, and
    /// received) at or above which `send` accepts nothing and OPEN is refused.
    pub session_buffer_cap: usize,
    /// Largest DATA payload per frame; the payload actually used follows the channel.
    pub max_payload: usize,
    /// DATA payload before the channel is measured.
    pub initial_payload: usize,
    /// Bytes in flight before the channel is measured.
    pub initial_in_flight: usize,
    /// PING interval when nothing else is sent.
    pub keepalive: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_streams: DEFAULT_MAX_STREAMS,
            stream_window: DEFAULT_STREAM_WINDOW,
            max_stream_window: DEFAULT_MAX_STREAM_WINDOW,
            stream_send_buffer: DEFAULT_STREAM_SEND_BUFFER,
            session_buffer_cap: DEFAULT_SESSION_BUFFER_CAP,
            max_payload: DEFAULT_MAX_PAYLOAD,
            initial_payload: DEFAULT_INITIAL_PAYLOAD,
            initial_in_flight: DEFAULT_INITIAL_IN_FLIGHT,
            keepalive: DEFAULT_KEEPALIVE,
        }
    }
}

impl EngineConfig {
    /// Starting points for a channel known to run at `bytes_per_sec` (115200 baud 8N1 is
    /// 11520): a window of a quarter second of line time (1 KiB to 64 KiB), first DATA
    /// frames of about 20 ms of line time (64 to 1024 bytes), 50 ms of line in flight until
    /// measured, a send buffer of two windows. The engine measures the channel anyway and
    /// sizes frames and bytes in flight to it; the hint only spares the first seconds of a
    /// slow line a too-large first guess.
    pub fn for_rate(bytes_per_sec: u64) -> Self {
        let window = (bytes_per_sec / RATE_WINDOW_DIVISOR)
            .clamp(RATE_WINDOW_MIN, u64::from(DEFAULT_STREAM_WINDOW));
        let payload = (bytes_per_sec / RATE_FRAME_DIVISOR)
            .clamp(RATE_PAYLOAD_MIN, WIRE_MAX_PAYLOAD as u64)
            / RATE_PAYLOAD_ALIGN
            * RATE_PAYLOAD_ALIGN;
        // Both fit: bounded by the u32/usize defaults above.
        let window = u32::try_from(window).unwrap_or(DEFAULT_STREAM_WINDOW);
        let payload = usize::try_from(payload).unwrap_or(DEFAULT_INITIAL_PAYLOAD);
        let in_flight = usize::try_from(bytes_per_sec / RATE_IN_FLIGHT_DIVISOR)
            .unwrap_or(DEFAULT_INITIAL_IN_FLIGHT)
            .min(DEFAULT_INITIAL_IN_FLIGHT);
        EngineConfig {
            stream_window: window,
            stream_send_buffer: (window as usize)
                .saturating_mul(RATE_SEND_BUFFER_WINDOWS)
                .min(DEFAULT_STREAM_SEND_BUFFER),
            initial_payload: payload.min(DEFAULT_INITIAL_PAYLOAD),
            initial_in_flight: in_flight,
            ..EngineConfig::default()
        }
    }

    /// A fixed window of `window` bytes per stream (the `window=` option): it starts there
    /// and does not grow.
    pub fn with_fixed_window(mut self, window: u32) -> Self {
        self.stream_window = window;
        self.max_stream_window = window;
        self
    }

    /// The same limits made usable: a payload of 1..=`WIRE_MAX_PAYLOAD`, a window of at
    /// least `MIN_STREAM_WINDOW`, a keepalive of at least a millisecond.
    fn normalized(mut self) -> Self {
        self.max_payload = self.max_payload.clamp(1, WIRE_MAX_PAYLOAD);
        self.initial_payload = self.initial_payload.clamp(1, self.max_payload);
        self.stream_window = self.stream_window.max(MIN_STREAM_WINDOW);
        self.max_stream_window = self.max_stream_window.max(self.stream_window);
        self.keepalive = self.keepalive.max(Duration::from_millis(1));
        self
    }
}

/// What the driver must react to, from [`Engine::poll_event`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineEvent {
    /// HELLO exchanged (again after a reset).
    SessionUp { peer_session: u64 },
    /// The peer's session id changed: all streams reset (a `Reset` event per stream follows).
    SessionReset { peer_session: u64 },
    /// The peer opens a stream to `service`: answer with `accept` or `refuse`.
    OpenRequest { id: StreamId, service: String },
    /// Our `open` was accepted by the peer.
    Opened { id: StreamId },
    /// Our `open` was refused; the id is freed.
    OpenFailed { id: StreamId, reason: String },
    /// `recv` has bytes (sent when the receive buffer goes from empty to non-empty).
    Readable { id: StreamId },
    /// Send room came back after `send` returned short.
    Writable { id: StreamId },
    /// The peer half-closed; delivered after all its data was `recv`'d.
    Eof { id: StreamId },
    /// The stream is gone (peer reset, session reset, protocol violation); the id is freed.
    Reset { id: StreamId, reason: String },
    /// Both directions finished and drained; the id is freed.
    Closed { id: StreamId },
    /// Frames of another protocol version arrive: the peer cannot be talked to until one
    /// side is upgraded (once per version seen).
    VersionMismatch { peer_version: u8 },
}

/// Why [`Engine::open`] refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// `max_streams` streams are open.
    #[error("too many streams")]
    TooManyStreams,
    /// The session's buffered bytes are at or above `session_buffer_cap`.
    #[error("over the session memory cap")]
    OverMemoryCap,
    /// Empty, longer than 64 bytes, or not printable ASCII without spaces.
    #[error("bad service name")]
    BadServiceName,
}

/// Session counters for the monitor.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionStats {
    pub session_id: u64,
    pub peer_session: Option<u64>,
    pub up: bool,
    pub frames_tx: u64,
    pub frames_rx: u64,
    pub bytes_tx: u64,
    pub bytes_rx: u64,
    pub crc_errors: u64,
    pub resyncs: u64,
    /// Peer session changes plus `channel_reset`s.
    pub session_resets: u64,
    pub streams: u32,
    pub buffered: usize,
    /// (addition) Nothing heard from the peer for three keepalive intervals. Streams are kept.
    pub idle: bool,
    /// (addition) Frames that were CRC-valid but broke the protocol (unknown version or type,
    /// malformed payload, a frame that cannot apply), and replies dropped at a full queue.
    pub protocol_errors: u64,
    /// Frames the peer sent that never arrived whole (seen as gaps in its numbering).
    pub frames_lost: u64,
    /// DATA frames we sent again because the peer's ACK said they were lost.
    pub retransmits: u64,
    /// Bytes in flight in the channel now, and the cap on them.
    pub in_flight: usize,
    pub in_flight_cap: usize,
    /// The channel as measured: delivery rate (bytes/s), min round trip (µs), DATA payload.
    pub rate: u64,
    pub min_rtt_us: u64,
    pub payload: usize,
    /// The version of the frames of another protocol version seen, if any.
    pub foreign_version: Option<u8>,
}

/// Stream counters for the monitor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamStats {
    pub id: StreamId,
    pub service: String,
    /// We opened it.
    pub outgoing: bool,
    /// "opening", "accepting", "open", "half-closed-local", "half-closed-remote", "closing".
    pub state: &'static str,
    pub bytes_tx: u64,
    pub bytes_rx: u64,
    pub send_buffered: usize,
    pub recv_buffered: usize,
    /// Bytes the peer lets us send now.
    pub credit: u64,
    /// The receive window we grant it now (grows with its throughput).
    pub window: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Ours, waiting for OPEN_OK.
    Opening,
    /// The peer's, waiting for the driver's accept/refuse.
    Accepting,
    /// Both directions may carry data (until EOFs).
    Open,
}

#[derive(Debug)]
struct Stream {
    service: String,
    outgoing: bool,
    /// Wire id: ours (== local id) when outgoing, the peer's otherwise.
    wire: u32,
    state: State,
    /// The peer knows the stream (our OPEN went out, or it is the peer's).
    announced: bool,
    /// Bytes from stream offset `tx_base`: sent but not yet reported consumed by the peer
    /// (kept for retransmission), then not yet sent.
    tx: VecDeque<u8>,
    tx_base: u64,
    /// Offset of the next byte never sent.
    tx_sent: u64,
    /// Ranges `(offset, len)` to send again (the peer's ACK said they were lost).
    retx: VecDeque<(u64, usize)>,
    peer_consumed: u64,
    peer_window: u32,
    shutdown: bool,
    eof_sent: bool,
    eof_acked: bool,
    /// Received in order, not yet read by the user.
    rx: VecDeque<u8>,
    rx_received: u64,
    rx_consumed: u64,
    /// Received beyond a gap (a lost frame being sent again), by offset.
    ooo: BTreeMap<u64, Vec<u8>>,
    ooo_bytes: usize,
    credit_reported: u64,
    /// The window we grant (grows, see `Engine::recv`), and when we last reported credit.
    window: u32,
    credit_at: Option<Instant>,
    /// The peer's EOF offset, once its EOF arrived (maybe before all its data).
    peer_eof_at: Option<u64>,
    /// All the peer's data up to its EOF arrived.
    peer_eof: bool,
    eof_delivered: bool,
    ctl: u8,
    queued: bool,
    /// In `Engine::ready`.
    ready: bool,
    retx_at: Option<Instant>,
    /// The deadline under which the stream is in `Engine::timers`.
    timer_key: Option<Instant>,
    retx_backoff: Duration,
}

impl Stream {
    fn new(
        service: String,
        outgoing: bool,
        wire: u32,
        state: State,
        peer_window: u32,
        window: u32,
    ) -> Self {
        Stream {
            service,
            outgoing,
            wire,
            state,
            announced: !outgoing,
            tx: VecDeque::new(),
            tx_base: 0,
            tx_sent: 0,
            retx: VecDeque::new(),
            peer_consumed: 0,
            peer_window,
            shutdown: false,
            eof_sent: false,
            eof_acked: false,
            rx: VecDeque::new(),
            rx_received: 0,
            rx_consumed: 0,
            ooo: BTreeMap::new(),
            ooo_bytes: 0,
            credit_reported: 0,
            window,
            credit_at: None,
            peer_eof_at: None,
            peer_eof: false,
            eof_delivered: false,
            ctl: 0,
            queued: false,
            ready: false,
            retx_at: None,
            timer_key: None,
            retx_backoff: RETX_INITIAL,
        }
    }

    /// Bytes queued by `send` and never sent.
    fn unsent(&self) -> usize {
        let end = self.tx_base + self.tx.len() as u64;
        usize::try_from(end - self.tx_sent).unwrap_or(usize::MAX)
    }

    /// The two slices of `tx` holding stream bytes `offset .. offset + len` (within `tx`).
    fn tx_slices(&self, offset: u64, len: usize) -> [&[u8]; 2] {
        let start = usize::try_from(offset - self.tx_base).unwrap_or(usize::MAX);
        let (a, b) = self.tx.as_slices();
        if start >= a.len() {
            let from = start - a.len();
            [&b[from..from + len], &[]]
        } else {
            let first = len.min(a.len() - start);
            [&a[start..start + first], &b[..len - first]]
        }
    }

    /// Keep stream bytes `offset ..` received beyond a gap, only the parts not already
    /// kept: what is kept never overlaps, so it stays within the window granted.
    fn keep_beyond_gap(&mut self, offset: u64, payload: &[u8]) {
        let end = offset + payload.len() as u64;
        let mut pos = offset.max(self.rx_received);
        while pos < end {
            if let Some((&at, kept)) = self.ooo.range(..=pos).next_back() {
                let kept_end = at + kept.len() as u64;
                if kept_end > pos {
                    pos = kept_end;
                    continue;
                }
            }
            let next = self
                .ooo
                .range(pos..)
                .next()
                .map_or(end, |(&at, _)| at)
                .min(end);
            let (a, b) = (pos - offset, next - offset);
            let piece = payload[a as usize..b as usize].to_vec();
            self.ooo_bytes += piece.len();
            self.ooo.insert(pos, piece);
            pos = next;
        }
    }

    /// Move what was received beyond a gap into `rx` once the gap is filled (dropping what
    /// overlaps bytes already there).
    fn fill_from_ooo(&mut self) {
        while let Some(entry) = self.ooo.first_entry() {
            let offset = *entry.key();
            if offset > self.rx_received {
                break;
            }
            let seg = entry.remove();
            self.ooo_bytes -= seg.len();
            let skip = usize::try_from(self.rx_received - offset).unwrap_or(usize::MAX);
            let fresh = seg.get(skip..).unwrap_or(&[]);
            self.rx.extend(fresh);
            self.rx_received += fresh.len() as u64;
        }
    }

    /// The peer consumed up to `consumed`: what it read need not be kept to send again.
    /// Returns the bytes freed.
    fn release(&mut self, consumed: u64) -> usize {
        let n = usize::try_from(consumed.saturating_sub(self.tx_base))
            .unwrap_or(usize::MAX)
            .min(self.tx.len());
        self.tx.drain(..n);
        self.tx_base += n as u64;
        n
    }

    /// Flags of a frame we send about this stream.
    fn flags(&self) -> u8 {
        if self.outgoing {
            FLAG_OPENER
        } else {
            0
        }
    }

    fn credit(&self) -> u64 {
        self.peer_consumed
            .saturating_add(u64::from(self.peer_window))
            .saturating_sub(self.tx_sent)
    }

    fn sendable(&self) -> bool {
        self.state == State::Open
            && (!self.retx.is_empty() || (self.unsent() > 0 && self.credit() > 0))
    }

    /// Something we sent is not confirmed yet (`docs/vproxy.md` §7).
    fn unconfirmed(&self) -> bool {
        (self.state == State::Opening && self.announced)
            || (self.eof_sent && !self.eof_acked)
            || self.tx_sent > self.peer_consumed
    }

    /// Start the retransmit timer if something is unconfirmed, stop it otherwise.
    fn arm(&mut self, now: Instant) {
        if !self.unconfirmed() {
            self.retx_at = None;
            self.retx_backoff = RETX_INITIAL;
        } else if self.retx_at.is_none() && self.ctl & CTL_RETX == 0 {
            self.retx_at = Some(now + self.retx_backoff);
        }
    }

    /// The peer confirmed something: start the backoff over.
    fn progress(&mut self, now: Instant) {
        self.retx_backoff = RETX_INITIAL;
        self.retx_at = None;
        self.arm(now);
    }

    fn buffered(&self) -> usize {
        self.tx.len() + self.rx.len() + self.ooo_bytes
    }

    fn state_name(&self) -> &'static str {
        match (self.state, self.shutdown, self.peer_eof) {
            (State::Opening, ..) => "opening",
            (State::Accepting, ..) => "accepting",
            (State::Open, false, false) => "open",
            (State::Open, true, false) => "half-closed-local",
            (State::Open, false, true) => "half-closed-remote",
            (State::Open, true, true) => "closing",
        }
    }
}

/// How a recently finished stream ended, to answer late frames about it.
#[derive(Debug)]
enum Ended {
    Closed,
    Reset,
    Refused(String),
}

#[derive(Debug)]
struct Recent {
    peer_opened: bool,
    wire: u32,
    ended: Ended,
}

/// What a tracked frame carried, to act on its loss (`docs/vproxy.md` §7).
#[derive(Debug)]
enum Carried {
    /// Stream bytes `offset .. offset + len` of local stream `id`.
    Data {
        id: StreamId,
        offset: u64,
        len: usize,
    },
    /// One of stream `id`'s control frames (a `CTL_*` bit).
    Ctl { id: StreamId, bit: u8 },
    /// A RESET, OPEN_FAIL or acknowledgement reply, sent again as it was.
    Reply(Box<Frame>),
}

/// The next frame to send, from `Engine::next_frame`.
enum Next {
    /// A built frame, and what to track it as (None: not tracked).
    Frame(Frame, Option<Carried>),
    /// A DATA frame of stream bytes, built straight from the stream's buffer.
    Data {
        id: StreamId,
        offset: u64,
        len: usize,
    },
}

/// The HELLO payload.
struct Hello {
    peer_session: u64,
    max_payload: u32,
    stream_window: u32,
    max_streams: u32,
}

impl Hello {
    fn encode(&self) -> Vec<u8> {
        let mut p = Vec::with_capacity(HELLO_PAYLOAD_LEN);
        p.extend_from_slice(&self.peer_session.to_le_bytes());
        p.extend_from_slice(&self.max_payload.to_le_bytes());
        p.extend_from_slice(&self.stream_window.to_le_bytes());
        p.extend_from_slice(&self.max_streams.to_le_bytes());
        p
    }

    fn parse(p: &[u8]) -> Option<Hello> {
        let u32_at = |off: usize| -> Option<u32> {
            Some(u32::from_le_bytes(p.get(off..off + 4)?.try_into().ok()?))
        };
        Some(Hello {
            peer_session: u64::from_le_bytes(p.get(..8)?.try_into().ok()?),
            max_payload: u32_at(8)?,
            stream_window: u32_at(12)?,
            max_streams: u32_at(16)?,
        })
    }
}

/// The window field that starts OPEN, OPEN_OK and CREDIT payloads.
fn window_of(payload: &[u8]) -> Option<u32> {
    Some(u32::from_le_bytes(
        payload.get(..WINDOW_LEN)?.try_into().ok()?,
    ))
}

fn valid_service(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_SERVICE_LEN && name.bytes().all(|b| b.is_ascii_graphic())
}

/// `reason` cut to `MAX_REASON_LEN` bytes at a character boundary.
fn reason_bytes(reason: &str) -> Vec<u8> {
    let mut end = reason.len().min(MAX_REASON_LEN);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason.as_bytes()[..end].to_vec()
}

/// A well-mixed 64-bit value (splitmix64's finaliser), for derived session ids and nonces.
fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The sans-IO vproxy session engine. See the module documentation.
#[derive(Debug)]
pub struct Engine {
    cfg: EngineConfig,
    session_id: u64,
    peer_session: Option<u64>,
    peer_max_payload: usize,
    peer_window: u32,
    up: bool,
    now: Instant,
    hello_due: bool,
    hello_at: Instant,
    ping_due: bool,
    ping_nonce: u64,
    last_tx: Instant,
    last_rx: Instant,
    last_byte: Instant,
    idle: bool,
    pongs: VecDeque<u64>,
    replies: VecDeque<Frame>,
    ctl_queue: VecDeque<StreamId>,
    streams: BTreeMap<StreamId, Stream>,
    incoming: HashMap<u32, StreamId>,
    next_id: StreamId,
    recent: VecDeque<Recent>,
    /// Streams that have something to send, in round-robin order (entries may be stale:
    /// checked when taken).
    ready: VecDeque<StreamId>,
    /// Streams' retransmit deadlines.
    timers: BTreeSet<(Instant, StreamId)>,
    writers: BTreeSet<StreamId>,
    /// Numbering and tracking of the frames we send, and of those we receive.
    log: TxLog<Carried>,
    rx_seq: RxTracker,
    /// The channel as measured.
    path: PathModel,
    /// When to send a PING if no ACK came (a lost tail shows only once a later frame
    /// arrives), and how many times it fired without an ACK.
    tlp_at: Option<Instant>,
    tlp_fired: u32,
    /// DATA waited for room in flight since the last ACK (the ACK's rate sample is then
    /// the channel's, not the application's).
    in_flight_limited: bool,
    retransmits: u64,
    foreign_reported: Option<u8>,
    out: Vec<u8>,
    out_pos: usize,
    decoder: Decoder,
    events: VecDeque<EngineEvent>,
    buffered: usize,
    frames_tx: u64,
    frames_rx: u64,
    bytes_tx: u64,
    bytes_rx: u64,
    session_resets: u64,
    protocol_errors: u64,
}

impl Engine {
    /// A new engine with a random `session_id` (0 is replaced: it means "none" on the
    /// wire). Its HELLO is queued.
    pub fn new(config: EngineConfig, session_id: u64, now: Instant) -> Engine {
        let cfg = config.normalized();
        let path = PathModel::new(cfg.max_payload, cfg.initial_payload, cfg.initial_in_flight);
        Engine {
            peer_max_payload: cfg.max_payload,
            peer_window: cfg.stream_window,
            cfg,
            session_id: if session_id == 0 {
                mix64(0)
            } else {
                session_id
            },
            peer_session: None,
            up: false,
            now,
            hello_due: true,
            hello_at: now + HELLO_RETRY,
            ping_due: false,
            ping_nonce: 0,
            last_tx: now,
            last_rx: now,
            last_byte: now,
            idle: false,
            pongs: VecDeque::new(),
            replies: VecDeque::new(),
            ctl_queue: VecDeque::new(),
            streams: BTreeMap::new(),
            incoming: HashMap::new(),
            next_id: 1,
            recent: VecDeque::new(),
            ready: VecDeque::new(),
            timers: BTreeSet::new(),
            writers: BTreeSet::new(),
            log: TxLog::new(0, now),
            rx_seq: RxTracker::default(),
            path,
            tlp_at: None,
            tlp_fired: 0,
            in_flight_limited: false,
            retransmits: 0,
            foreign_reported: None,
            out: Vec::new(),
            out_pos: 0,
            decoder: Decoder::new(),
            events: VecDeque::new(),
            buffered: 0,
            frames_tx: 0,
            frames_rx: 0,
            bytes_tx: 0,
            bytes_rx: 0,
            session_resets: 0,
            protocol_errors: 0,
        }
    }

    /// The configuration in force (normalised).
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// Whether the HELLO handshake is complete.
    pub fn is_up(&self) -> bool {
        self.up
    }

    // ----- channel side -----

    /// Decode and act on channel bytes. Always consumes all of `bytes`; never blocks.
    pub fn receive(&mut self, bytes: &[u8], now: Instant) {
        self.now = now;
        self.bytes_rx = self.bytes_rx.wrapping_add(bytes.len() as u64);
        if bytes.is_empty() {
            return;
        }
        if now.saturating_duration_since(self.last_byte) >= INPUT_GAP {
            self.decoder.mark_gap();
        }
        self.last_byte = now;
        let mut frames = Vec::new();
        self.decoder.feed(bytes, |f| frames.push(f));
        if !frames.is_empty() {
            self.last_rx = now;
            self.idle = false;
        }
        for f in frames {
            self.frames_rx = self.frames_rx.wrapping_add(1);
            let (seq, kind) = (f.seq, f.kind);
            self.handle_frame(f);
            // A frame ignored before the session is up counts as missing, so the peer
            // sends it again (session frames are retried on their own).
            let session_frame =
                matches!(kind, FrameType::Hello | FrameType::Ping | FrameType::Pong);
            if self.up || session_frame {
                self.rx_seq.on_frame(seq, kind != FrameType::Ack);
            }
        }
        let foreign = self.decoder.stats().foreign_version;
        if let Some(v) = foreign.filter(|&v| self.foreign_reported != Some(v)) {
            self.foreign_reported = Some(v);
            self.events
                .push_back(EngineEvent::VersionMismatch { peer_version: v });
        }
        // Streams the peer reset freed memory that other writers may be waiting for.
        self.wake_writers();
    }

    /// Fill `buf` with the next channel bytes; 0 when there is nothing to send now. Frames
    /// may be split across calls (a UART may take one byte at a time).
    pub fn transmit(&mut self, buf: &mut [u8]) -> usize {
        let mut n = 0;
        while n < buf.len() {
            if self.out_pos >= self.out.len() {
                self.out.clear();
                self.out_pos = 0;
                if !self.build_next() {
                    break;
                }
                self.frames_tx = self.frames_tx.wrapping_add(1);
            }
            let chunk = self.out.get(self.out_pos..).unwrap_or(&[]);
            let k = chunk.len().min(buf.len() - n);
            buf[n..n + k].copy_from_slice(&chunk[..k]);
            n += k;
            self.out_pos += k;
        }
        if n > 0 {
            self.bytes_tx = self.bytes_tx.wrapping_add(n as u64);
            self.last_tx = self.now;
            self.wake_writers();
        }
        n
    }

    /// Whether `transmit` has something to send now.
    pub fn wants_transmit(&self) -> bool {
        self.out_pos < self.out.len()
            || self.hello_due
            || !self.pongs.is_empty()
            || (self.up
                && (self.ping_due
                    || self.rx_seq.ack_due()
                    || !self.replies.is_empty()
                    || !self.ctl_queue.is_empty()
                    || (self.data_room() && self.has_ready())))
    }

    /// Whether DATA may go out now (the bytes in flight are under the cap).
    fn data_room(&self) -> bool {
        self.log.inflight() < self.path.in_flight_cap(self.now)
    }

    /// Whether a stream has something to send (the ready queue's live entries).
    fn has_ready(&self) -> bool {
        self.ready
            .iter()
            .any(|id| self.streams.get(id).is_some_and(Stream::sendable))
    }

    /// The channel was reconnected (or replaced): every stream the peer knows is reset
    /// (`Reset` events), OPENs not yet sent are kept, the engine takes a new session id so
    /// that the peer resets its side too, and the HELLO handshake starts over.
    pub fn channel_reset(&mut self, now: Instant) {
        self.now = now;
        self.decoder.clear();
        self.out.clear();
        self.out_pos = 0;
        self.session_id = mix64(self.session_id);
        self.session_resets = self.session_resets.wrapping_add(1);
        self.drop_session(R_CHANNEL);
        // Maybe another path now: measure it afresh.
        self.path.reset();
        self.last_rx = now;
        self.last_tx = now;
        self.idle = false;
    }

    // ----- stream side -----

    /// Open a stream to the peer's `service`. Before the session is up the OPEN is queued.
    pub fn open(&mut self, service: &str) -> Result<StreamId, OpenError> {
        if !valid_service(service) {
            return Err(OpenError::BadServiceName);
        }
        if self.streams.len() >= self.cfg.max_streams as usize {
            return Err(OpenError::TooManyStreams);
        }
        if self.buffered >= self.cfg.session_buffer_cap {
            return Err(OpenError::OverMemoryCap);
        }
        let id = self.alloc_id().ok_or(OpenError::TooManyStreams)?;
        let stream = Stream::new(
            service.to_string(),
            true,
            id,
            State::Opening,
            0,
            self.cfg.stream_window,
        );
        self.streams.insert(id, stream);
        self.queue_ctl(id, CTL_OPEN);
        Ok(id)
    }

    /// Accept the peer's stream `id` (after `OpenRequest`).
    pub fn accept(&mut self, id: StreamId) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        if s.state != State::Accepting {
            return;
        }
        s.state = State::Open;
        self.queue_ctl(id, CTL_OPEN_OK);
        self.check_eof(id);
        self.mark_ready(id);
    }

    /// Refuse the peer's stream `id` (after `OpenRequest`) with `reason`; the id is freed.
    pub fn refuse(&mut self, id: StreamId, reason: &str) {
        if self.streams.get(&id).map(|s| s.state) != Some(State::Accepting) {
            return;
        }
        if let Some(s) = self.remove_stream(id) {
            self.reply(
                Frame::new(FrameType::OpenFail, 0, s.wire, 0).with_payload(reason_bytes(reason)),
            );
            self.remember(true, s.wire, Ended::Refused(reason.to_string()));
        }
    }

    /// Queue `data` on stream `id`; returns how much was accepted (0: full, wait for
    /// `Writable`; also 0 for an unknown or shut down stream).
    pub fn send(&mut self, id: StreamId, data: &[u8]) -> usize {
        let room = self.send_room(id);
        let n = room.min(data.len());
        if let Some(s) = self.streams.get_mut(&id) {
            if n < data.len() && !s.shutdown {
                self.writers.insert(id);
            }
            s.tx.extend(&data[..n]);
            self.buffered += n;
        }
        if n > 0 {
            self.mark_ready(id);
        }
        n
    }

    /// Ask for a `Writable` event once stream `id` has send room again, if it has none now
    /// (its window is used up, or the session buffer is full of other streams' bytes).
    pub fn notify_when_writable(&mut self, id: StreamId) {
        let open = self.streams.get(&id).is_some_and(|s| !s.shutdown);
        if open && self.send_room(id) == 0 {
            self.writers.insert(id);
        }
    }

    /// Bytes `send` would accept now.
    pub fn send_room(&self, id: StreamId) -> usize {
        let Some(s) = self.streams.get(&id) else {
            return 0;
        };
        if s.shutdown {
            return 0;
        }
        self.cfg
            .stream_send_buffer
            .saturating_sub(s.unsent())
            .min(self.cfg.session_buffer_cap.saturating_sub(self.buffered))
    }

    /// Take up to `buf.len()` received bytes of stream `id`; credit goes back to the peer as
    /// they are consumed.
    pub fn recv(&mut self, id: StreamId, buf: &mut [u8]) -> usize {
        let grow_within = self.path.srtt().map(|rtt| rtt * WINDOW_GROW_RTTS);
        let max_window = self.max_window();
        let now = self.now;
        let Some(s) = self.streams.get_mut(&id) else {
            return 0;
        };
        let n = buf.len().min(s.rx.len());
        let (a, b) = s.rx.as_slices();
        let from_a = n.min(a.len());
        buf[..from_a].copy_from_slice(&a[..from_a]);
        buf[from_a..n].copy_from_slice(&b[..n - from_a]);
        s.rx.drain(..n);
        s.rx_consumed = s.rx_consumed.wrapping_add(n as u64);
        self.buffered -= n;
        let half_window = u64::from(s.window / 2);
        let owe_credit =
            !s.peer_eof && s.rx_consumed.wrapping_sub(s.credit_reported) >= half_window;
        // Half the window read within a few round trips of the last credit: the window, not
        // the channel, limits the stream. Grant more (docs/vproxy.md §7).
        let window_limited = s
            .credit_at
            .zip(grow_within)
            .is_some_and(|(at, within)| now.saturating_duration_since(at) < within);
        if owe_credit && window_limited {
            s.window = s.window.saturating_mul(2).min(max_window).max(s.window);
        }
        let eof_now = s.rx.is_empty() && s.peer_eof && !s.eof_delivered;
        if eof_now {
            s.eof_delivered = true;
        }
        if owe_credit {
            self.queue_ctl(id, CTL_CREDIT);
        }
        if eof_now {
            self.events.push_back(EngineEvent::Eof { id });
            self.maybe_close(id);
        }
        if n > 0 {
            self.wake_writers();
        }
        n
    }

    /// The largest window a stream may grow to: the configured cap, and a share of the
    /// session's memory.
    fn max_window(&self) -> u32 {
        let share = self.cfg.session_buffer_cap / SESSION_WINDOW_SHARE;
        self.cfg
            .max_stream_window
            .min(u32::try_from(share).unwrap_or(u32::MAX))
            .max(self.cfg.stream_window)
    }

    /// Received bytes waiting for `recv`.
    pub fn recv_pending(&self, id: StreamId) -> usize {
        self.streams.get(&id).map_or(0, |s| s.rx.len())
    }

    /// Half-close our direction: EOF goes out after the queued data. Receiving goes on.
    pub fn shutdown(&mut self, id: StreamId) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        s.shutdown = true;
        self.writers.remove(&id);
        self.check_eof(id);
    }

    /// Abort both directions with `reason`; the id is freed at once (no event).
    pub fn reset(&mut self, id: StreamId, reason: &str) {
        if let Some(s) = self.remove_stream(id) {
            self.reset_peer(&s, reason);
            self.wake_writers();
        }
    }

    // ----- events and time -----

    /// The next event, oldest first. Drain after every call into the engine.
    pub fn poll_event(&mut self) -> Option<EngineEvent> {
        self.events.pop_front()
    }

    /// When `handle_timeout` wants to run next (never an instant already handled).
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut t: Option<Instant> = None;
        let mut consider = |x: Instant| t = Some(t.map_or(x, |t| t.min(x)));
        if !self.up && !self.hello_due {
            consider(self.hello_at);
        }
        if self.up && !self.ping_due {
            consider(self.last_tx + self.cfg.keepalive);
        }
        if !self.idle {
            consider(self.last_rx + self.idle_after());
        }
        if let Some(&(at, _)) = self.timers.first() {
            consider(at);
        }
        if let Some(at) = self.tlp_at.filter(|_| self.up && !self.ping_due) {
            consider(at);
        }
        if let Some(at) = self.path.next_tick() {
            consider(at);
        }
        t
    }

    /// Do the timed work due at `now`: HELLO retries, keepalive PING, idle marking, stream
    /// retransmissions.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = now;
        if !self.up && now >= self.hello_at {
            self.hello_due = true;
            self.hello_at = now + HELLO_RETRY;
        }
        if self.up && now >= self.last_tx + self.cfg.keepalive {
            self.ping_due = true;
        }
        if now >= self.last_rx + self.idle_after() {
            self.idle = true;
        }
        if self.up && self.tlp_at.is_some_and(|at| now >= at) {
            // No ACK for a while with frames in flight: a PING shows the peer any lost
            // tail (as a gap before it) and asks for an ACK.
            self.ping_due = true;
            self.tlp_fired = self.tlp_fired.saturating_add(1);
            let backoff = 1u32 << self.tlp_fired.min(TLP_BACKOFF_MAX_SHIFT);
            self.tlp_at = Some(now + self.path.rto() * backoff);
        }
        self.path.tick(now);
        while let Some(&(at, id)) = self.timers.first() {
            if at > now {
                break;
            }
            self.timers.pop_first();
            if let Some(s) = self.streams.get_mut(&id) {
                s.timer_key = None;
                s.retx_at = None;
                s.retx_backoff = (s.retx_backoff * 2).min(RETX_MAX);
            }
            self.queue_ctl(id, CTL_RETX);
        }
    }

    /// Keep `timers` in step with stream `id`'s retransmit deadline.
    fn sync_timer(&mut self, id: StreamId) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        if s.timer_key == s.retx_at {
            return;
        }
        if let Some(old) = s.timer_key.take() {
            self.timers.remove(&(old, id));
        }
        if let Some(at) = s.retx_at {
            s.timer_key = Some(at);
            self.timers.insert((at, id));
        }
    }

    /// Put stream `id` in the ready queue if it has something to send and is not there.
    fn mark_ready(&mut self, id: StreamId) {
        if let Some(s) = self.streams.get_mut(&id) {
            if !s.ready && s.sendable() {
                s.ready = true;
                self.ready.push_back(id);
            }
        }
    }

    /// Session counters.
    pub fn session_stats(&self) -> SessionStats {
        let d = self.decoder.stats();
        SessionStats {
            session_id: self.session_id,
            peer_session: self.peer_session,
            up: self.up,
            frames_tx: self.frames_tx,
            frames_rx: self.frames_rx,
            bytes_tx: self.bytes_tx,
            bytes_rx: self.bytes_rx,
            crc_errors: d.crc_errors,
            resyncs: d.resyncs,
            session_resets: self.session_resets,
            streams: u32::try_from(self.streams.len()).unwrap_or(u32::MAX),
            buffered: self.buffered,
            idle: self.idle,
            protocol_errors: self.protocol_errors.wrapping_add(d.rejected),
            frames_lost: self.rx_seq.lost(),
            retransmits: self.retransmits,
            in_flight: self.log.inflight(),
            in_flight_cap: self.path.in_flight_cap(self.now),
            rate: self.path.rate(self.now).map_or(0, |r| r as u64),
            min_rtt_us: self
                .path
                .min_rtt()
                .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX)),
            payload: self.effective_payload(),
            foreign_version: d.foreign_version,
        }
    }

    /// Per-stream counters, by id.
    pub fn stream_stats(&self) -> Vec<StreamStats> {
        self.streams
            .iter()
            .map(|(&id, s)| StreamStats {
                id,
                service: s.service.clone(),
                outgoing: s.outgoing,
                state: s.state_name(),
                bytes_tx: s.tx_sent,
                bytes_rx: s.rx_received,
                send_buffered: s.tx.len(),
                recv_buffered: s.rx.len() + s.ooo_bytes,
                credit: s.credit(),
                window: s.window,
            })
            .collect()
    }

    // ----- internals: bookkeeping -----

    fn idle_after(&self) -> Duration {
        self.cfg.keepalive * IDLE_KEEPALIVES
    }

    fn alloc_id(&mut self) -> Option<StreamId> {
        let id = self.next_id;
        self.next_id = self.next_id.checked_add(1)?;
        Some(id)
    }

    fn queue_ctl(&mut self, id: StreamId, bit: u8) {
        if let Some(s) = self.streams.get_mut(&id) {
            s.ctl |= bit;
            if !s.queued {
                s.queued = true;
                self.ctl_queue.push_back(id);
            }
        }
    }

    /// Queue a peer-triggered reply, or drop and count it when the queue is full.
    fn reply(&mut self, frame: Frame) {
        if self.replies.len() < REPLY_QUEUE_CAP {
            self.replies.push_back(frame);
        } else {
            self.protocol_errors = self.protocol_errors.wrapping_add(1);
        }
    }

    /// Tell the peer about a stream we dropped, if it knows the stream.
    fn reset_peer(&mut self, s: &Stream, reason: &str) {
        if s.announced {
            self.reply(
                Frame::new(FrameType::Reset, s.flags(), s.wire, 0)
                    .with_payload(reason_bytes(reason)),
            );
            self.remember(!s.outgoing, s.wire, Ended::Reset);
        }
    }

    fn remember(&mut self, peer_opened: bool, wire: u32, ended: Ended) {
        if self.recent.len() >= RECENT_STREAMS {
            self.recent.pop_front();
        }
        self.recent.push_back(Recent {
            peer_opened,
            wire,
            ended,
        });
    }

    fn recent(&self, peer_opened: bool, wire: u32) -> Option<&Ended> {
        self.recent
            .iter()
            .rev()
            .find(|r| r.peer_opened == peer_opened && r.wire == wire)
            .map(|r| &r.ended)
    }

    fn remove_stream(&mut self, id: StreamId) -> Option<Stream> {
        let s = self.streams.remove(&id)?;
        if let Some(at) = s.timer_key {
            self.timers.remove(&(at, id));
        }
        self.buffered -= s.buffered();
        self.writers.remove(&id);
        if s.buffered() > 0 {
            // What it held is session room that other writers may be waiting for.
            self.wake_writers();
        }
        if !s.outgoing {
            self.incoming.remove(&s.wire);
        }
        if s.queued {
            self.ctl_queue.retain(|&q| q != id);
        }
        self.writers.remove(&id);
        Some(s)
    }

    /// Drop a stream because of the peer or a protocol violation, with a `Reset` event (or
    /// `OpenFailed` for our stream still opening) and, if `tell_peer`, a RESET.
    fn kill(&mut self, id: StreamId, reason: &str, tell_peer: bool) {
        let Some(s) = self.remove_stream(id) else {
            return;
        };
        if tell_peer {
            self.reset_peer(&s, reason);
        }
        let reason = reason.to_string();
        self.events.push_back(if s.state == State::Opening {
            EngineEvent::OpenFailed { id, reason }
        } else {
            EngineEvent::Reset { id, reason }
        });
    }

    /// Reset every stream the peer knows and restart the handshake.
    fn drop_session(&mut self, reason: &str) {
        let known: Vec<StreamId> = self
            .streams
            .iter()
            .filter(|(_, s)| s.announced)
            .map(|(&id, _)| id)
            .collect();
        for id in known {
            if self.remove_stream(id).is_some() {
                self.events.push_back(EngineEvent::Reset {
                    id,
                    reason: reason.to_string(),
                });
            }
        }
        self.incoming.clear();
        self.recent.clear();
        self.replies.clear();
        self.pongs.clear();
        // What was in flight belonged to the old session; the new one numbers afresh.
        self.log.clear().for_each(drop);
        self.rx_seq.reset();
        self.tlp_at = None;
        self.tlp_fired = 0;
        self.ready.clear();
        for s in self.streams.values_mut() {
            s.ready = false;
        }
        self.ping_due = false;
        self.up = false;
        self.hello_due = true;
        self.hello_at = self.now + HELLO_RETRY;
    }

    fn wake_writers(&mut self) {
        if self.writers.is_empty() {
            return;
        }
        let ready: Vec<StreamId> = self
            .writers
            .iter()
            .copied()
            .filter(|&id| self.send_room(id) > 0)
            .collect();
        for id in ready {
            self.writers.remove(&id);
            self.events.push_back(EngineEvent::Writable { id });
        }
    }

    /// Queue our EOF once the stream is open, shut down, and all its data framed.
    fn check_eof(&mut self, id: StreamId) {
        if let Some(s) = self.streams.get(&id) {
            if s.shutdown && !s.eof_sent && s.state == State::Open && s.unsent() == 0 {
                self.queue_ctl(id, CTL_EOF);
            }
        }
    }

    fn maybe_close(&mut self, id: StreamId) {
        let done = self
            .streams
            .get(&id)
            .is_some_and(|s| s.eof_acked && s.eof_delivered && s.unsent() == 0 && s.rx.is_empty());
        if done {
            if let Some(s) = self.remove_stream(id) {
                self.remember(!s.outgoing, s.wire, Ended::Closed);
                self.events.push_back(EngineEvent::Closed { id });
            }
        }
    }

    /// The DATA payload now: what the channel measurements suggest, within both sides'
    /// limits.
    fn effective_payload(&self) -> usize {
        self.path
            .payload(self.now)
            .min(self.cfg.max_payload)
            .min(self.peer_max_payload)
            .max(1)
    }

    // ----- internals: receiving -----

    fn handle_frame(&mut self, f: Frame) {
        match f.kind {
            FrameType::Hello => self.on_hello(&f),
            FrameType::Ping => {
                if self.pongs.len() < PONG_QUEUE_CAP {
                    self.pongs.push_back(f.value);
                }
            }
            FrameType::Pong => {}
            // Before the handshake completes the peer retries whatever matters.
            _ if !self.up => {}
            FrameType::Ack => self.on_ack(&f),
            FrameType::Open => self.on_open(f),
            _ => self.on_stream_frame(f),
        }
    }

    fn on_hello(&mut self, f: &Frame) {
        let Some(h) = Hello::parse(&f.payload) else {
            self.protocol_errors = self.protocol_errors.wrapping_add(1);
            return;
        };
        let peer = f.value;
        if let Some(old) = self.peer_session {
            if old != peer {
                self.session_resets = self.session_resets.wrapping_add(1);
                self.events
                    .push_back(EngineEvent::SessionReset { peer_session: peer });
                self.drop_session(R_SESSION);
            }
        }
        self.peer_session = Some(peer);
        self.peer_max_payload = (h.max_payload as usize).clamp(1, WIRE_MAX_PAYLOAD);
        self.path
            .set_max_payload(self.cfg.max_payload.min(self.peer_max_payload));
        self.peer_window = h.stream_window;
        let _ = h.max_streams;
        let echoed = h.peer_session == self.session_id;
        if echoed && !self.up {
            self.up = true;
            self.hello_due = false;
            self.events
                .push_back(EngineEvent::SessionUp { peer_session: peer });
        }
        if !echoed || f.flags & FLAG_NEED_REPLY != 0 {
            self.hello_due = true;
        }
    }

    fn on_open(&mut self, f: Frame) {
        if f.flags & FLAG_OPENER == 0 {
            self.protocol_errors = self.protocol_errors.wrapping_add(1);
            return;
        }
        let wire = f.stream;
        if let Some(&id) = self.incoming.get(&wire) {
            // A retransmitted OPEN: repeat our answer if we gave one.
            if self
                .streams
                .get(&id)
                .is_some_and(|s| s.state == State::Open)
            {
                self.queue_ctl(id, CTL_OPEN_OK);
            }
            return;
        }
        // A retransmitted OPEN of a stream that already ended: repeat how it ended.
        let stale = match self.recent(true, wire) {
            Some(Ended::Refused(reason)) => {
                Some(Frame::new(FrameType::OpenFail, 0, wire, 0).with_payload(reason_bytes(reason)))
            }
            Some(_) => {
                Some(Frame::new(FrameType::Reset, 0, wire, 0).with_payload(reason_bytes(R_STALE)))
            }
            None => None,
        };
        if let Some(answer) = stale {
            return self.reply(answer);
        }
        let service = f
            .payload
            .get(WINDOW_LEN..)
            .and_then(|b| std::str::from_utf8(b).ok());
        let (Some(window), Some(service)) = (window_of(&f.payload), service) else {
            return self.refuse_wire(wire, R_MALFORMED);
        };
        let refusal = if !valid_service(service) {
            Some(R_BAD_NAME)
        } else if self.streams.len() >= self.cfg.max_streams as usize {
            Some(R_TOO_MANY)
        } else if self.buffered >= self.cfg.session_buffer_cap {
            Some(R_MEMORY)
        } else {
            None
        };
        if let Some(reason) = refusal {
            return self.refuse_wire(wire, reason);
        }
        let Some(id) = self.alloc_id() else {
            return self.refuse_wire(wire, R_TOO_MANY);
        };
        let service = service.to_string();
        self.streams.insert(
            id,
            Stream::new(
                service.clone(),
                false,
                wire,
                State::Accepting,
                window,
                self.cfg.stream_window,
            ),
        );
        self.incoming.insert(wire, id);
        self.events
            .push_back(EngineEvent::OpenRequest { id, service });
    }

    fn refuse_wire(&mut self, wire: u32, reason: &str) {
        self.reply(Frame::new(FrameType::OpenFail, 0, wire, 0).with_payload(reason_bytes(reason)));
        self.remember(true, wire, Ended::Refused(reason.to_string()));
    }

    fn on_stream_frame(&mut self, f: Frame) {
        let peer_opened = f.flags & FLAG_OPENER != 0;
        let id = if peer_opened {
            self.incoming.get(&f.stream).copied()
        } else {
            Some(f.stream).filter(|id| self.streams.get(id).is_some_and(|s| s.outgoing))
        };
        let Some(id) = id else {
            return self.on_unknown_stream(&f, peer_opened);
        };
        let reason = || String::from_utf8_lossy(&f.payload).into_owned();
        match f.kind {
            FrameType::OpenOk => {
                let window = window_of(&f.payload).unwrap_or(self.peer_window);
                self.opened(id, window);
            }
            FrameType::OpenFail | FrameType::Reset => {
                let reason = reason();
                if let Some(s) = self.remove_stream(id) {
                    self.events.push_back(if s.state == State::Opening {
                        EngineEvent::OpenFailed { id, reason }
                    } else {
                        EngineEvent::Reset { id, reason }
                    });
                }
            }
            FrameType::Data => self.on_data(id, f),
            FrameType::Eof => self.on_eof(id, f.value),
            FrameType::Credit => self.on_credit(id, &f),
            FrameType::Hello
            | FrameType::Ping
            | FrameType::Pong
            | FrameType::Open
            | FrameType::Ack => {}
        }
    }

    /// Frames about a stream we do not know (`docs/vproxy.md` §6).
    fn on_unknown_stream(&mut self, f: &Frame, peer_opened: bool) {
        let reply_flags = if peer_opened { 0 } else { FLAG_OPENER };
        let ack = Frame::new(
            FrameType::Credit,
            reply_flags | FLAG_EOF_SEEN,
            f.stream,
            f.value,
        )
        .with_payload(self.cfg.stream_window.to_le_bytes().to_vec());
        let reset = Frame::new(FrameType::Reset, reply_flags, f.stream, 0)
            .with_payload(reason_bytes(R_UNKNOWN));
        let answer = match (self.recent(peer_opened, f.stream), f.kind) {
            (Some(Ended::Closed), FrameType::Eof) => Some(ack),
            (Some(Ended::Closed), _) => None,
            (_, FrameType::Data | FrameType::Eof | FrameType::OpenOk) => Some(reset),
            _ => None,
        };
        if let Some(frame) = answer {
            self.reply(frame);
        }
    }

    /// Our stream `id` is accepted (OPEN_OK, or DATA/EOF proving it).
    fn opened(&mut self, id: StreamId, window: u32) {
        let now = self.now;
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        if s.state != State::Opening {
            return;
        }
        s.state = State::Open;
        s.peer_window = window;
        s.progress(now);
        self.sync_timer(id);
        self.events.push_back(EngineEvent::Opened { id });
        self.check_eof(id);
        self.mark_ready(id);
    }

    /// Make sure our stream `id` is open before the peer's DATA/EOF applies to it; false if
    /// the frame cannot apply (the peer's stream we have not accepted).
    fn ensure_open(&mut self, id: StreamId) -> bool {
        match self.streams.get(&id).map(|s| s.state) {
            Some(State::Opening) => {
                self.opened(id, self.peer_window);
                true
            }
            Some(State::Open) => true,
            _ => false,
        }
    }

    fn on_data(&mut self, id: StreamId, f: Frame) {
        if !self.ensure_open(id) {
            self.protocol_errors = self.protocol_errors.wrapping_add(1);
            return self.kill(id, R_PROTOCOL, true);
        }
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        let len = f.payload.len() as u64;
        let offset = f.value;
        let end = offset.saturating_add(len);
        let verdict = if s.peer_eof_at.is_some_and(|eof| end > eof) {
            Err(R_AFTER_EOF)
        } else if end > s.rx_consumed.saturating_add(u64::from(s.window)) {
            Err(R_CREDIT)
        } else {
            Ok(())
        };
        if let Err(reason) = verdict {
            return self.kill(id, reason, true);
        }
        if len == 0 {
            // A probe: restate our consumption (and EOF_SEEN if it applies). A probe beyond
            // what arrived shows lost DATA, which the ACKs have the peer send again.
            return self.queue_ctl(id, CTL_CREDIT);
        }
        let was_empty = s.rx.is_empty();
        let before = s.buffered();
        if offset > s.rx_received {
            // Beyond a gap: keep it until the lost frame is sent again.
            s.keep_beyond_gap(offset, &f.payload);
        } else {
            // In order, or overlapping what we have (a retransmission): take the new part.
            let skip = usize::try_from(s.rx_received - offset).unwrap_or(usize::MAX);
            let fresh = f.payload.get(skip..).unwrap_or(&[]);
            s.rx.extend(fresh);
            s.rx_received += fresh.len() as u64;
            s.fill_from_ooo();
        }
        self.buffered = self.buffered + s.buffered() - before;
        if was_empty && !s.rx.is_empty() {
            self.events.push_back(EngineEvent::Readable { id });
        }
        self.check_peer_eof(id);
    }

    fn on_eof(&mut self, id: StreamId, offset: u64) {
        if !self.ensure_open(id) {
            self.protocol_errors = self.protocol_errors.wrapping_add(1);
            return self.kill(id, R_PROTOCOL, true);
        }
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        let below = offset < s.rx_received;
        let moved = s.peer_eof_at.is_some_and(|at| at != offset);
        if below || moved {
            self.protocol_errors = self.protocol_errors.wrapping_add(1);
            return self.kill(id, R_PROTOCOL, true);
        }
        let repeated = s.peer_eof;
        s.peer_eof_at = Some(offset);
        if repeated {
            // Our acknowledgement was lost: give it again.
            return self.queue_ctl(id, CTL_CREDIT);
        }
        self.check_peer_eof(id);
    }

    /// Once every byte before the peer's EOF arrived: acknowledge it, and deliver it if the
    /// user has read them all.
    fn check_peer_eof(&mut self, id: StreamId) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        if s.peer_eof || s.peer_eof_at != Some(s.rx_received) {
            return;
        }
        s.peer_eof = true;
        let deliver = s.rx.is_empty();
        if deliver {
            s.eof_delivered = true;
        }
        self.queue_ctl(id, CTL_CREDIT);
        if deliver {
            self.events.push_back(EngineEvent::Eof { id });
            self.maybe_close(id);
        }
    }

    fn on_credit(&mut self, id: StreamId, f: &Frame) {
        let now = self.now;
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        let mut progressed = false;
        let consumed = f.value.min(s.tx_sent);
        if consumed > s.peer_consumed {
            s.peer_consumed = consumed;
            let freed = s.release(consumed);
            self.buffered -= freed;
            progressed = true;
        }
        if let Some(w) = window_of(&f.payload) {
            s.peer_window = w;
        }
        if f.flags & FLAG_EOF_SEEN != 0 && s.eof_sent && !s.eof_acked {
            s.eof_acked = true;
            progressed = true;
        }
        if progressed {
            s.progress(now);
            self.sync_timer(id);
        }
        self.mark_ready(id);
        self.maybe_close(id);
    }

    /// The peer's ACK: resolve what it covers; send the lost frames' contents again.
    fn on_ack(&mut self, f: &Frame) {
        let Some(ack) = Ack::parse(f.value, &f.payload) else {
            self.protocol_errors = self.protocol_errors.wrapping_add(1);
            return;
        };
        let now = self.now;
        let mut lost = Vec::new();
        let mut frames = 0u32;
        let sample = self.log.on_ack(&ack, now, |o| {
            frames += 1;
            if let Outcome::Lost(c) = o {
                lost.push(c);
            }
        });
        if let Some(sample) = &sample {
            let app_limited = !self.in_flight_limited;
            self.path.on_sample(sample, app_limited, now);
            self.path.on_resolved(
                frames,
                u32::try_from(lost.len()).unwrap_or(u32::MAX),
                sample.delivered + sample.lost,
            );
        } else if frames > 0 {
            self.path.on_resolved(frames, frames, 0);
        }
        if frames > 0 {
            self.in_flight_limited = false;
            self.tlp_fired = 0;
            self.tlp_at = self.log.oldest().map(|_| now + self.path.rto());
        }
        for c in lost {
            self.resend(c);
        }
    }

    /// What a lost frame carried goes out again, if it still matters.
    fn resend(&mut self, c: Carried) {
        match c {
            Carried::Data { id, offset, len } => {
                let Some(s) = self.streams.get_mut(&id) else {
                    return;
                };
                let end = offset + len as u64;
                if s.state != State::Open || end <= s.peer_consumed {
                    return;
                }
                let start = offset.max(s.peer_consumed);
                s.retx
                    .push_back((start, usize::try_from(end - start).unwrap_or(0)));
                self.mark_ready(id);
            }
            Carried::Ctl { id, bit } => {
                let Some(s) = self.streams.get(&id) else {
                    return;
                };
                let matters = match bit {
                    CTL_OPEN => s.state == State::Opening,
                    CTL_OPEN_OK => !s.outgoing && s.state == State::Open,
                    CTL_CREDIT => true,
                    CTL_EOF => s.eof_sent && !s.eof_acked,
                    _ => false,
                };
                if matters {
                    self.queue_ctl(id, bit);
                }
            }
            Carried::Reply(frame) => self.reply(*frame),
        }
    }

    // ----- internals: transmitting -----

    /// Build the next frame into `self.out`, numbered and, if it matters when lost,
    /// tracked; false if there is nothing to send.
    fn build_next(&mut self) -> bool {
        let Some(next) = self.next_frame() else {
            return false;
        };
        let seq = self.log.take_seq();
        let start = self.out.len();
        let carried = match next {
            Next::Frame(mut frame, carried) => {
                frame.seq = seq;
                encode(&frame, &mut self.out);
                carried
            }
            Next::Data { id, offset, len } => {
                let Some(s) = self.streams.get(&id) else {
                    return false;
                };
                let mut header = Frame::new(FrameType::Data, s.flags(), s.wire, offset);
                header.seq = seq;
                encode_parts(&header, s.tx_slices(offset, len), &mut self.out);
                Some(Carried::Data { id, offset, len })
            }
        };
        if let Some(c) = carried {
            let bytes = self.out.len() - start;
            self.log.track(seq, c, bytes, self.now);
            if self.tlp_at.is_none() {
                self.tlp_at = Some(self.now + self.path.rto());
            }
        }
        true
    }

    /// The next frame in priority order (`docs/vproxy.md` §8).
    fn next_frame(&mut self) -> Option<Next> {
        if self.hello_due {
            self.hello_due = false;
            let hello = Hello {
                peer_session: self.peer_session.unwrap_or(0),
                max_payload: u32::try_from(self.cfg.max_payload).unwrap_or(u32::MAX),
                stream_window: self.cfg.stream_window,
                max_streams: self.cfg.max_streams,
            };
            let flags = if self.up { 0 } else { FLAG_NEED_REPLY };
            let hello = Frame::new(FrameType::Hello, flags, 0, self.session_id)
                .with_payload(hello.encode());
            return Some(Next::Frame(hello, None));
        }
        if let Some(nonce) = self.pongs.pop_front() {
            return Some(Next::Frame(Frame::new(FrameType::Pong, 0, 0, nonce), None));
        }
        if !self.up {
            return None;
        }
        if let Some(ack) = self.rx_seq.take_ack() {
            let frame =
                Frame::new(FrameType::Ack, 0, 0, u64::from(ack.high)).with_payload(ack.payload());
            return Some(Next::Frame(frame, None));
        }
        if self.ping_due {
            self.ping_due = false;
            self.ping_nonce = self.ping_nonce.wrapping_add(1);
            let ping = Frame::new(FrameType::Ping, 0, 0, self.ping_nonce);
            return Some(Next::Frame(ping, None));
        }
        if let Some(frame) = self.replies.pop_front() {
            let again = Carried::Reply(Box::new(frame.clone()));
            return Some(Next::Frame(frame, Some(again)));
        }
        while let Some(id) = self.ctl_queue.pop_front() {
            if let Some((frame, bit)) = self.stream_control(id) {
                self.sync_timer(id);
                return Some(Next::Frame(frame, Some(Carried::Ctl { id, bit })));
            }
        }
        self.next_data()
    }

    /// One owed control frame of stream `id` and its `CTL_*` bit; the stream stays queued
    /// if it owes more.
    fn stream_control(&mut self, id: StreamId) -> Option<(Frame, u8)> {
        let now = self.now;
        let s = self.streams.get_mut(&id)?;
        loop {
            let Some(bit) = CTL_ORDER.iter().copied().find(|&b| s.ctl & b != 0) else {
                s.queued = false;
                return None;
            };
            s.ctl &= !bit;
            let window = s.window;
            let frame = match bit {
                CTL_OPEN => Some(open_frame(s, window)),
                CTL_OPEN_OK => Some(
                    Frame::new(FrameType::OpenOk, s.flags(), s.wire, 0)
                        .with_payload(window.to_le_bytes().to_vec()),
                ),
                CTL_CREDIT => {
                    s.credit_reported = s.rx_consumed;
                    s.credit_at = Some(now);
                    let flags = s.flags() | if s.peer_eof { FLAG_EOF_SEEN } else { 0 };
                    Some(
                        Frame::new(FrameType::Credit, flags, s.wire, s.rx_consumed)
                            .with_payload(window.to_le_bytes().to_vec()),
                    )
                }
                // First sent, or sent again after the ACK said it was lost.
                CTL_EOF if !s.eof_acked && s.unsent() == 0 => {
                    s.eof_sent = true;
                    Some(Frame::new(FrameType::Eof, s.flags(), s.wire, s.tx_sent))
                }
                CTL_RETX if s.state == State::Opening && s.announced => Some(open_frame(s, window)),
                CTL_RETX if s.eof_sent && !s.eof_acked => {
                    Some(Frame::new(FrameType::Eof, s.flags(), s.wire, s.tx_sent))
                }
                CTL_RETX if s.tx_sent > s.peer_consumed => {
                    Some(Frame::new(FrameType::Data, s.flags(), s.wire, s.tx_sent))
                }
                _ => None,
            };
            if let Some(frame) = frame {
                s.arm(now);
                if s.ctl == 0 {
                    s.queued = false;
                } else {
                    self.ctl_queue.push_front(id);
                }
                return Some((frame, bit));
            }
        }
    }

    /// One DATA frame from the next ready stream (round robin): bytes the peer lost first,
    /// then new bytes within the peer's credit. None while the bytes in flight are at the
    /// cap: what waits then is scheduled when the channel has drained, not queued in it.
    fn next_data(&mut self) -> Option<Next> {
        if !self.data_room() {
            if self.has_ready() {
                self.in_flight_limited = true;
            }
            return None;
        }
        let max = self.effective_payload();
        let now = self.now;
        while let Some(id) = self.ready.pop_front() {
            let Some(s) = self.streams.get_mut(&id) else {
                continue;
            };
            s.ready = false;
            if !s.sendable() {
                continue;
            }
            let mut again = None;
            while let Some((off, len)) = s.retx.pop_front() {
                let end = off + len as u64;
                let start = off.max(s.peer_consumed).max(s.tx_base);
                if end <= start {
                    continue;
                }
                let left = usize::try_from(end - start).unwrap_or(usize::MAX);
                let n = left.min(max);
                if n < left {
                    s.retx.push_front((start + n as u64, left - n));
                }
                again = Some((start, n));
                break;
            }
            let (offset, n) = match again {
                Some(range) => {
                    self.retransmits = self.retransmits.wrapping_add(1);
                    range
                }
                None => {
                    let credit = usize::try_from(s.credit()).unwrap_or(usize::MAX);
                    let n = s.unsent().min(credit).min(max);
                    if n == 0 {
                        continue;
                    }
                    let offset = s.tx_sent;
                    s.tx_sent += n as u64;
                    (offset, n)
                }
            };
            s.arm(now);
            if s.sendable() {
                s.ready = true;
                self.ready.push_back(id);
            }
            self.sync_timer(id);
            self.check_eof(id);
            return Some(Next::Data { id, offset, len: n });
        }
        None
    }
}

/// The OPEN frame of our stream `s` (first sending or retransmission).
fn open_frame(s: &mut Stream, window: u32) -> Frame {
    s.announced = true;
    let mut payload = window.to_le_bytes().to_vec();
    payload.extend_from_slice(s.service.as_bytes());
    Frame::new(FrameType::Open, FLAG_OPENER, s.wire, 0).with_payload(payload)
}
