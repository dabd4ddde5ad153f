//! The vproxy frame codec: [`encode`] and the incremental, resynchronising [`Decoder`].
//!
//! The layout is `docs/vproxy.md` §1: magic, version/type, flags, stream id, a 64-bit value,
//! the frame's sequence number, payload length and a header CRC-32, then the payload and its
//! own CRC-32 (absent for an empty payload). The decoder accepts byte chunks of any size,
//! keeps at most one maximal frame buffered, and recovers from garbage or lost bytes by
//! scanning for the magic (§2). A CRC-valid frame of another protocol version (the 22-byte
//! header of version 1, or this layout with another version) is skipped whole and reported,
//! so that a peer of another version is named in the log instead of looking like noise.
//! Nothing here panics on any input.

use std::fmt;

/// The two bytes every frame starts with.
pub const MAGIC: [u8; 2] = [0xA7, 0x5C];
/// The protocol version carried in the high nibble of byte 2.
pub const VERSION: u8 = 2;
/// Header size in bytes, header CRC included.
pub const HEADER_LEN: usize = 26;
/// Size of the payload CRC that follows a non-empty payload.
pub const TRAILER_LEN: usize = 4;
/// The largest payload the wire format allows (the length field is 16 bits).
pub const WIRE_MAX_PAYLOAD: usize = u16::MAX as usize;
/// The largest frame on the wire.
pub const MAX_FRAME_LEN: usize = HEADER_LEN + WIRE_MAX_PAYLOAD + TRAILER_LEN;

/// Flag: the sender of this frame opened the stream it is about.
pub const FLAG_OPENER: u8 = 0x01;
/// Flag (CREDIT): the receiver has seen the stream's EOF.
pub const FLAG_EOF_SEEN: u8 = 0x02;
/// Flag (HELLO): the sender has not seen its own session id echoed yet; answer with a HELLO.
pub const FLAG_NEED_REPLY: u8 = 0x04;

// Byte offsets of the header fields.
const OFF_VERSION_TYPE: usize = 2;
const OFF_FLAGS: usize = 3;
const OFF_STREAM: usize = 4;
const OFF_VALUE: usize = 8;
const OFF_SEQ: usize = 16;
const OFF_LENGTH: usize = 20;
const OFF_HEADER_CRC: usize = 22;
/// Version 1's header (22 bytes: no sequence number), recognised only to name the peer's
/// version: its length and header CRC offsets, and its largest payload.
const V1_HEADER_LEN: usize = 22;
const V1_OFF_LENGTH: usize = 16;
const V1_OFF_HEADER_CRC: usize = 18;
const V1_MAX_PAYLOAD: usize = 4096;
/// Shift of the version in the version/type byte.
const VERSION_SHIFT: u8 = 4;
/// Mask of the type in the version/type byte.
const TYPE_MASK: u8 = 0x0F;

/// Frame types (`docs/vproxy.md` §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrameType {
    /// Session handshake: session id, the peer id heard, limits.
    Hello = 1,
    /// Keepalive request.
    Ping = 2,
    /// Keepalive answer.
    Pong = 3,
    /// Open a stream to a named service.
    Open = 4,
    /// The stream was accepted.
    OpenOk = 5,
    /// The stream was refused, with a reason.
    OpenFail = 6,
    /// Stream bytes at an offset; empty: a probe.
    Data = 7,
    /// Half-close at a final offset.
    Eof = 8,
    /// Abort both directions, with a reason.
    Reset = 9,
    /// Cumulative consumed count and window.
    Credit = 10,
    /// The highest sequence number received and the ones found missing below it.
    Ack = 11,
}

impl FrameType {
    /// The type with wire code `code`, if known.
    pub fn from_code(code: u8) -> Option<FrameType> {
        Some(match code {
            1 => FrameType::Hello,
            2 => FrameType::Ping,
            3 => FrameType::Pong,
            4 => FrameType::Open,
            5 => FrameType::OpenOk,
            6 => FrameType::OpenFail,
            7 => FrameType::Data,
            8 => FrameType::Eof,
            9 => FrameType::Reset,
            10 => FrameType::Credit,
            11 => FrameType::Ack,
            _ => return None,
        })
    }
}

/// One decoded (or to be encoded) frame.
#[derive(Clone, PartialEq, Eq)]
pub struct Frame {
    /// What the frame is.
    pub kind: FrameType,
    /// `FLAG_*` bits.
    pub flags: u8,
    /// Wire stream id (0 for session frames).
    pub stream: u32,
    /// Offset, consumed count, session id or nonce, per type.
    pub value: u64,
    /// The sender's sequence number of this frame: one more for every frame it sends in a
    /// session (set by the engine when it sends the frame).
    pub seq: u32,
    /// At most [`WIRE_MAX_PAYLOAD`] bytes.
    pub payload: Vec<u8>,
}

impl fmt::Debug for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Frame")
            .field("kind", &self.kind)
            .field("flags", &self.flags)
            .field("stream", &self.stream)
            .field("value", &self.value)
            .field("seq", &self.seq)
            .field("len", &self.payload.len())
            .finish()
    }
}

impl Frame {
    /// A frame without payload.
    pub fn new(kind: FrameType, flags: u8, stream: u32, value: u64) -> Frame {
        Frame {
            kind,
            flags,
            stream,
            value,
            seq: 0,
            payload: Vec::new(),
        }
    }

    /// The same frame with `payload`.
    pub fn with_payload(mut self, payload: Vec<u8>) -> Frame {
        self.payload = payload;
        self
    }

    /// Bytes this frame takes on the wire.
    pub fn wire_len(&self) -> usize {
        wire_len(self.payload.len())
    }
}

/// Bytes a frame with `payload_len` payload bytes takes on the wire.
pub fn wire_len(payload_len: usize) -> usize {
    if payload_len == 0 {
        HEADER_LEN
    } else {
        HEADER_LEN + payload_len + TRAILER_LEN
    }
}

/// Append `frame` to `out`. A payload longer than [`WIRE_MAX_PAYLOAD`] is truncated to it
/// (the engine never builds one).
pub fn encode(frame: &Frame, out: &mut Vec<u8>) {
    let payload = frame
        .payload
        .get(..WIRE_MAX_PAYLOAD)
        .unwrap_or(&frame.payload);
    encode_parts(frame, [payload, &[]], out);
}

/// Append a frame whose payload is the two slices `parts` one after the other (a ring
/// buffer's two halves), without copying them anywhere else first; `header.payload` is not
/// used. The parts together must be at most [`WIRE_MAX_PAYLOAD`] bytes (the engine's DATA
/// frames are); longer ones are cut to it.
pub fn encode_parts(header: &Frame, parts: [&[u8]; 2], out: &mut Vec<u8>) {
    let first = parts[0].get(..WIRE_MAX_PAYLOAD).unwrap_or(parts[0]);
    let second = parts[1]
        .get(..WIRE_MAX_PAYLOAD - first.len())
        .unwrap_or(parts[1]);
    let len = first.len() + second.len();
    let start = out.len();
    out.reserve(wire_len(len));
    out.extend_from_slice(&MAGIC);
    out.push((VERSION << VERSION_SHIFT) | (header.kind as u8 & TYPE_MASK));
    out.push(header.flags);
    out.extend_from_slice(&header.stream.to_le_bytes());
    out.extend_from_slice(&header.value.to_le_bytes());
    out.extend_from_slice(&header.seq.to_le_bytes());
    // Fits: len <= WIRE_MAX_PAYLOAD == u16::MAX.
    out.extend_from_slice(&(len as u16).to_le_bytes());
    let crc = crc32fast::hash(&out[start..]);
    out.extend_from_slice(&crc.to_le_bytes());
    if len > 0 {
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(first);
        hasher.update(second);
        out.extend_from_slice(first);
        out.extend_from_slice(second);
        out.extend_from_slice(&hasher.finalize().to_le_bytes());
    }
}

/// Decoder counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DecodeStats {
    /// Frames delivered.
    pub frames: u64,
    /// Header or payload CRC mismatches (the frame was dropped).
    pub crc_errors: u64,
    /// Runs of bytes discarded while hunting for a magic.
    pub resyncs: u64,
    /// Bytes discarded while hunting for a magic.
    pub discarded: u64,
    /// CRC-valid frames of an unknown type, skipped.
    pub rejected: u64,
    /// CRC-valid frames of another protocol version, skipped.
    pub foreign: u64,
    /// The version of the last such frame.
    pub foreign_version: Option<u8>,
}

/// Incremental frame decoder with resynchronisation. Its buffer never exceeds
/// [`MAX_FRAME_LEN`] bytes.
#[derive(Debug)]
pub struct Decoder {
    buf: Vec<u8>,
    stats: DecodeStats,
    /// Whether the bytes being discarded already counted a resync.
    in_garbage: bool,
    /// Where in `buf` the bytes that came after a pause in the input start (see
    /// [`Decoder::mark_gap`]).
    gap_at: Option<usize>,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder::new()
    }
}

/// What the front of the buffer holds.
enum Parse {
    /// More bytes are needed.
    Incomplete,
    /// Discard this many bytes (garbage or a bad frame).
    Skip { bytes: usize, crc_error: bool },
    /// A CRC-valid frame of this many bytes that is not understood.
    Reject(usize),
    /// A CRC-valid frame of this many bytes in another protocol version.
    Foreign { version: u8, bytes: usize },
    /// A frame of this many bytes.
    Frame(Frame, usize),
}

impl Decoder {
    /// An empty decoder.
    pub fn new() -> Decoder {
        Decoder {
            buf: Vec::with_capacity(MAX_FRAME_LEN),
            stats: DecodeStats::default(),
            in_garbage: false,
            gap_at: None,
        }
    }

    /// The counters so far.
    pub fn stats(&self) -> DecodeStats {
        self.stats
    }

    /// Bytes buffered (a partial frame).
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Forget any partial frame (the channel was reconnected). Counters are kept.
    pub fn clear(&mut self) {
        self.buf.clear();
        self.in_garbage = false;
        self.gap_at = None;
    }

    /// The input paused before the bytes fed next. If a partial frame is buffered and the
    /// bytes after the pause start with a valid header, the partial frame was cut short (its
    /// sender restarted, or its tail was lost before the line went quiet) and is dropped,
    /// instead of swallowing the new frames as its payload. A frame that really resumes after
    /// the pause is kept (its continuation does not start with a valid header).
    pub fn mark_gap(&mut self) {
        if !self.buf.is_empty() {
            self.gap_at = Some(self.buf.len());
        }
    }

    /// Feed `bytes`, all of them, and hand every complete frame to `sink` in order.
    pub fn feed(&mut self, mut bytes: &[u8], mut sink: impl FnMut(Frame)) {
        if self.buf.is_empty() && self.gap_at.is_none() && !bytes.is_empty() {
            // Nothing buffered: parse in place, and keep only the partial frame at the end.
            let pos = self.scan(bytes, &mut sink);
            bytes = &bytes[pos..];
        }
        while !bytes.is_empty() {
            let room = MAX_FRAME_LEN.saturating_sub(self.buf.len()).max(1);
            let (now, rest) = bytes.split_at(room.min(bytes.len()));
            self.buf.extend_from_slice(now);
            bytes = rest;
            self.drain(&mut sink);
        }
    }

    /// Parse everything parseable from the buffer.
    fn drain(&mut self, sink: &mut impl FnMut(Frame)) {
        let buf = std::mem::take(&mut self.buf);
        let pos = self.scan(&buf, sink);
        self.buf = buf;
        self.buf.drain(..pos.min(self.buf.len()));
        self.gap_at = self.gap_at.and_then(|g| g.checked_sub(pos));
    }

    /// Parse everything parseable from the front of `data` (the buffer, or input when
    /// nothing is buffered); returns how many bytes were used up.
    fn scan(&mut self, data: &[u8], sink: &mut impl FnMut(Frame)) -> usize {
        let mut pos = 0;
        loop {
            let rest = data.get(pos..).unwrap_or(&[]);
            match parse(rest) {
                Parse::Incomplete => {
                    let resumed = self.gap_at.take().filter(|&g| g > pos);
                    match resumed {
                        Some(g) if data.get(g..).is_some_and(|b| b.len() < HEADER_LEN) => {
                            // Not enough bytes after the pause to tell yet.
                            self.gap_at = Some(g);
                        }
                        Some(g) if data.get(g..).is_some_and(header_ok) => {
                            self.stats.crc_errors = self.stats.crc_errors.wrapping_add(1);
                            self.stats.resyncs = self.stats.resyncs.wrapping_add(1);
                            self.stats.discarded =
                                self.stats.discarded.wrapping_add((g - pos) as u64);
                            pos = g;
                            continue;
                        }
                        _ => {}
                    }
                    break;
                }
                Parse::Skip { bytes, crc_error } => {
                    if crc_error {
                        self.stats.crc_errors = self.stats.crc_errors.wrapping_add(1);
                        self.in_garbage = true;
                        // The bad frame's first byte counts as discarded garbage, and its
                        // run as one resync.
                        self.stats.resyncs = self.stats.resyncs.wrapping_add(1);
                    } else if !self.in_garbage {
                        self.in_garbage = true;
                        self.stats.resyncs = self.stats.resyncs.wrapping_add(1);
                    }
                    self.stats.discarded = self.stats.discarded.wrapping_add(bytes as u64);
                    pos += bytes;
                }
                Parse::Reject(len) => {
                    self.in_garbage = false;
                    self.stats.rejected = self.stats.rejected.wrapping_add(1);
                    pos += len;
                }
                Parse::Foreign { version, bytes } => {
                    self.in_garbage = false;
                    self.stats.foreign = self.stats.foreign.wrapping_add(1);
                    self.stats.foreign_version = Some(version);
                    pos += bytes;
                }
                Parse::Frame(frame, len) => {
                    self.in_garbage = false;
                    self.stats.frames = self.stats.frames.wrapping_add(1);
                    pos += len;
                    sink(frame);
                }
            }
        }
        pos
    }
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

/// Whether `b` starts with a frame header whose CRC and length are valid.
fn header_ok(b: &[u8]) -> bool {
    let Some(header) = b.get(..HEADER_LEN) else {
        return false;
    };
    header.starts_with(&MAGIC)
        && u32_at(header, OFF_HEADER_CRC) == Some(crc32fast::hash(&header[..OFF_HEADER_CRC]))
        && u16_at(header, OFF_LENGTH).is_some_and(|l| usize::from(l) <= WIRE_MAX_PAYLOAD)
}

/// Look at the front of `b`.
fn parse(b: &[u8]) -> Parse {
    if b.is_empty() {
        return Parse::Incomplete;
    }
    if !b.starts_with(&MAGIC) {
        // Garbage up to the next magic; a lone trailing first magic byte may start one.
        let skip = b
            .windows(MAGIC.len())
            .position(|w| w == MAGIC)
            .unwrap_or_else(|| {
                if b.last() == Some(&MAGIC[0]) {
                    b.len() - 1
                } else {
                    b.len()
                }
            });
        if skip == 0 {
            return Parse::Incomplete;
        }
        return Parse::Skip {
            bytes: skip,
            crc_error: false,
        };
    }
    let version = b
        .get(OFF_VERSION_TYPE)
        .map_or(VERSION, |v| v >> VERSION_SHIFT);
    if version == 1 {
        if let Some(foreign) = parse_v1(b) {
            return foreign;
        }
    }
    let Some(header) = b.get(..HEADER_LEN) else {
        return Parse::Incomplete;
    };
    let bad = Parse::Skip {
        bytes: 1,
        crc_error: true,
    };
    if !header_ok(header) {
        return bad;
    }
    let length = u16_at(header, OFF_LENGTH).map_or(0, usize::from);
    let total = wire_len(length);
    let Some(whole) = b.get(..total) else {
        return Parse::Incomplete;
    };
    let payload = whole.get(HEADER_LEN..HEADER_LEN + length).unwrap_or(&[]);
    if length > 0 && u32_at(whole, HEADER_LEN + length) != Some(crc32fast::hash(payload)) {
        return bad;
    }
    let version_type = header[OFF_VERSION_TYPE];
    if version_type >> VERSION_SHIFT != VERSION {
        return Parse::Foreign {
            version: version_type >> VERSION_SHIFT,
            bytes: total,
        };
    }
    let Some(kind) = FrameType::from_code(version_type & TYPE_MASK) else {
        return Parse::Reject(total);
    };
    Parse::Frame(
        Frame {
            kind,
            flags: header[OFF_FLAGS],
            stream: u32_at(header, OFF_STREAM).unwrap_or(0),
            value: u64_at(header, OFF_VALUE).unwrap_or(0),
            seq: u32_at(header, OFF_SEQ).unwrap_or(0),
            payload: payload.to_vec(),
        },
        total,
    )
}

/// A whole, CRC-valid version-1 frame at the front of `b` (`Foreign`), `Incomplete` if its
/// valid header is there but not yet all of it, or None: too short to tell yet (this
/// version's parse then waits for more bytes as well) or not one.
fn parse_v1(b: &[u8]) -> Option<Parse> {
    let header = b.get(..V1_HEADER_LEN)?;
    if u32_at(header, V1_OFF_HEADER_CRC) != Some(crc32fast::hash(&header[..V1_OFF_HEADER_CRC])) {
        return None;
    }
    let length = usize::from(u16_at(header, V1_OFF_LENGTH)?);
    if length > V1_MAX_PAYLOAD {
        return None;
    }
    let total = V1_HEADER_LEN + if length > 0 { length + TRAILER_LEN } else { 0 };
    let Some(whole) = b.get(..total) else {
        return Some(Parse::Incomplete);
    };
    if length > 0 {
        let payload = &whole[V1_HEADER_LEN..V1_HEADER_LEN + length];
        if u32_at(whole, V1_HEADER_LEN + length) != Some(crc32fast::hash(payload)) {
            return None;
        }
    }
    Some(Parse::Foreign {
        version: 1,
        bytes: total,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample(payload_len: usize, stream: u32) -> Frame {
        Frame::new(FrameType::Data, FLAG_OPENER, stream, 0x0102_0304_0506_0708)
            .with_payload((0..payload_len).map(|i| (i * 7) as u8).collect())
    }

    fn decode_all(dec: &mut Decoder, bytes: &[u8]) -> Vec<Frame> {
        let mut out = Vec::new();
        dec.feed(bytes, |f| out.push(f));
        out
    }

    #[test]
    fn round_trip_every_type_and_size() {
        let mut bytes = Vec::new();
        let mut frames = Vec::new();
        for code in 1..=11 {
            let kind = FrameType::from_code(code).unwrap();
            for len in [0, 1, 100, WIRE_MAX_PAYLOAD] {
                let mut f = Frame::new(kind, 3, code.into(), u64::MAX - len as u64)
                    .with_payload(vec![0xA7; len]);
                f.seq = u32::MAX - u32::from(code) * 7 - len as u32;
                encode(&f, &mut bytes);
                frames.push(f);
            }
        }
        let mut dec = Decoder::new();
        // One byte at a time: the decoder must not care about chunking.
        let mut out = Vec::new();
        for b in &bytes {
            dec.feed(std::slice::from_ref(b), |f| out.push(f));
        }
        assert_eq!(out, frames);
        assert_eq!(dec.stats().crc_errors, 0);
        assert_eq!(dec.stats().resyncs, 0);
        assert_eq!(dec.buffered(), 0);
    }

    #[test]
    fn resync_after_garbage() {
        let mut bytes = b"login: \xA7\xA7\x5Cjunk".to_vec();
        encode(&sample(10, 1), &mut bytes);
        bytes.extend_from_slice(&[0xA7, 0x5C, 0, 0]);
        encode(&sample(20, 2), &mut bytes);
        let mut dec = Decoder::new();
        let out = decode_all(&mut dec, &bytes);
        assert_eq!(out, vec![sample(10, 1), sample(20, 2)]);
        assert!(dec.stats().resyncs >= 2);
    }

    #[test]
    fn lost_byte_drops_only_that_frame() {
        for lost in 0..wire_len(40) {
            let mut bytes = Vec::new();
            encode(&sample(40, 1), &mut bytes);
            bytes.remove(lost);
            encode(&sample(40, 2), &mut bytes);
            let mut dec = Decoder::new();
            let out = decode_all(&mut dec, &bytes);
            assert_eq!(out, vec![sample(40, 2)], "lost byte {lost}");
        }
    }

    #[test]
    fn bad_crc_is_counted_and_dropped() {
        for flip in 0..wire_len(8) {
            let mut bytes = Vec::new();
            encode(&sample(8, 1), &mut bytes);
            bytes[flip] ^= 0x10;
            encode(&sample(8, 2), &mut bytes);
            let mut dec = Decoder::new();
            let out = decode_all(&mut dec, &bytes);
            assert_eq!(out, vec![sample(8, 2)], "flipped byte {flip}");
            if flip >= MAGIC.len() {
                assert!(dec.stats().crc_errors >= 1);
            }
        }
    }

    #[test]
    fn frame_cut_short_before_a_pause_is_dropped() {
        let mut cut = Vec::new();
        encode(&sample(500, 1), &mut cut);
        cut.truncate(100);
        let mut next = Vec::new();
        encode(&sample(5, 2), &mut next);
        let mut dec = Decoder::new();
        assert!(decode_all(&mut dec, &cut).is_empty());
        dec.mark_gap();
        // The new frame arrives in pieces after the pause.
        assert!(decode_all(&mut dec, &next[..10]).is_empty());
        assert_eq!(decode_all(&mut dec, &next[10..]), vec![sample(5, 2)]);
        assert_eq!(dec.buffered(), 0);
        // A frame that resumes after a pause is kept.
        let mut whole = Vec::new();
        encode(&sample(500, 3), &mut whole);
        assert!(decode_all(&mut dec, &whole[..100]).is_empty());
        dec.mark_gap();
        assert_eq!(decode_all(&mut dec, &whole[100..]), vec![sample(500, 3)]);
    }

    #[test]
    fn other_version_is_skipped_whole_and_named() {
        let mut bytes = Vec::new();
        encode(&sample(5, 1), &mut bytes);
        bytes[OFF_VERSION_TYPE] = (3 << VERSION_SHIFT) | FrameType::Data as u8;
        let crc = crc32fast::hash(&bytes[..OFF_HEADER_CRC]);
        bytes[OFF_HEADER_CRC..HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
        encode(&sample(5, 2), &mut bytes);
        let mut dec = Decoder::new();
        assert_eq!(decode_all(&mut dec, &bytes), vec![sample(5, 2)]);
        assert_eq!(dec.stats().foreign, 1);
        assert_eq!(dec.stats().foreign_version, Some(3));
        assert_eq!(dec.stats().crc_errors, 0);
    }

    /// A version-1 frame as that version encoded it (22-byte header, no sequence number).
    fn v1_frame(kind: FrameType, payload: &[u8]) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.push((1 << VERSION_SHIFT) | kind as u8);
        out.push(0);
        out.extend_from_slice(&7u32.to_le_bytes());
        out.extend_from_slice(&9u64.to_le_bytes());
        out.extend_from_slice(&(payload.len() as u16).to_le_bytes());
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        if !payload.is_empty() {
            out.extend_from_slice(payload);
            out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        }
        out
    }

    #[test]
    fn version_one_frames_are_named_not_counted_as_noise() {
        let mut bytes = v1_frame(FrameType::Hello, &[0; 20]);
        bytes.extend(v1_frame(FrameType::Ping, &[]));
        encode(&sample(3, 4), &mut bytes);
        let mut dec = Decoder::new();
        // One byte at a time too: a v1 header is shorter than ours.
        let mut got = Vec::new();
        for b in &bytes {
            dec.feed(std::slice::from_ref(b), |f| got.push(f));
        }
        assert_eq!(got, vec![sample(3, 4)]);
        assert_eq!(dec.stats().foreign, 2);
        assert_eq!(dec.stats().foreign_version, Some(1));
        assert_eq!(dec.stats().crc_errors, 0);
    }

    #[test]
    fn split_payload_encodes_like_one() {
        let f = sample(300, 5);
        let (a, b) = f.payload.split_at(120);
        let mut one = Vec::new();
        let mut two = Vec::new();
        encode(&f, &mut one);
        encode_parts(&f, [a, b], &mut two);
        assert_eq!(one, two);
    }

    #[test]
    fn buffer_stays_bounded() {
        let mut dec = Decoder::new();
        let mut header = Vec::new();
        encode(&sample(WIRE_MAX_PAYLOAD, 1), &mut header);
        header.truncate(HEADER_LEN);
        dec.feed(&header, |_| panic!("no frame"));
        dec.feed(&vec![0xA7; 3 * MAX_FRAME_LEN], |_| panic!("no frame"));
        assert!(dec.buffered() <= MAX_FRAME_LEN);
    }

    proptest! {
        #[test]
        fn decoder_never_panics(chunks in proptest::collection::vec(
            proptest::collection::vec(any::<u8>(), 0..600), 0..20)) {
            let mut dec = Decoder::new();
            for c in &chunks {
                dec.feed(c, |f| assert!(f.payload.len() <= WIRE_MAX_PAYLOAD));
                prop_assert!(dec.buffered() <= MAX_FRAME_LEN);
            }
        }

        /// However the input is cut into chunks (parsed in place or buffered), the same
        /// frames come out with the same counters.
        #[test]
        fn chunking_changes_nothing(
            items in proptest::collection::vec(
                (0usize..3000, proptest::collection::vec(any::<u8>(), 0..40)), 1..8),
            cuts in proptest::collection::vec(1usize..5000, 1..12),
        ) {
            let mut bytes = Vec::new();
            for (i, (len, garbage)) in items.iter().enumerate() {
                bytes.extend_from_slice(garbage);
                encode(&sample(*len, i as u32), &mut bytes);
            }
            let mut whole = Decoder::new();
            let expected = decode_all(&mut whole, &bytes);
            let mut chunked = Decoder::new();
            let mut got = Vec::new();
            let mut rest = &bytes[..];
            for c in cuts.iter().cycle() {
                if rest.is_empty() {
                    break;
                }
                let (now, later) = rest.split_at((*c).min(rest.len()));
                chunked.feed(now, |f| got.push(f));
                rest = later;
            }
            prop_assert_eq!(got, expected);
            prop_assert_eq!(chunked.stats(), whole.stats());
        }

        #[test]
        fn frames_survive_surrounding_garbage(pre in proptest::collection::vec(any::<u8>(), 0..200),
                                              len in 0usize..300, stream in any::<u32>()) {
            let mut bytes = pre;
            let f = sample(len, stream);
            encode(&f, &mut bytes);
            let mut dec = Decoder::new();
            let out = decode_all(&mut dec, &bytes);
            prop_assert_eq!(out.last(), Some(&f));
        }
    }
}
