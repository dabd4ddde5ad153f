//! The chaos soak's byte accounting (`tests/tests/soak.rs`): numbered, checksummed records, the
//! streams made of them, and a [`Verifier`] that follows a received stream against the stream
//! that was sent and finds every gap: where bytes went missing, how many, and which of the
//! reasons the design allows the driver gave for it.
//!
//! A record is [`RECORD`] bytes: a magic, the stream's tag, the record's number, a payload
//! derived from both, and a checksum over all that. A stream is records 0, 1, 2, ... back to
//! back; a *periodic* stream (a guest writer sending one pattern file again and again) restarts
//! at record 0 every `period` records. Whatever is lost from a stream is a contiguous span (a
//! replay ring dropping its oldest bytes, a reset cutting what the guest held): after it, the
//! next whole record that arrives says where the stream resumed, so the verifier counts exactly
//! the bytes skipped. Bytes that match nothing, a record that arrives twice or out of order, or
//! a record damaged in the middle of the stream are errors.

/// Bytes per record.
pub const RECORD: usize = 64;
/// First bytes of every record.
pub const MAGIC: [u8; 4] = *b"SK\xa5\x5a";
const TAG_AT: usize = 4;
const SEQ_AT: usize = 8;
const PAYLOAD_AT: usize = 16;
const SUM_AT: usize = RECORD - 4;

/// FNV-1a over `data`: the records' checksum.
fn fnv1a(data: &[u8]) -> u32 {
    data.iter().fold(0x811c_9dc5u32, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// Record `seq` of the stream tagged `tag`.
pub fn record(tag: u32, seq: u64) -> [u8; RECORD] {
    let mut r = [0u8; RECORD];
    r[..4].copy_from_slice(&MAGIC);
    r[TAG_AT..TAG_AT + 4].copy_from_slice(&tag.to_le_bytes());
    r[SEQ_AT..SEQ_AT + 8].copy_from_slice(&seq.to_le_bytes());
    let mut x = (u64::from(tag) << 32 ^ seq).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for b in &mut r[PAYLOAD_AT..SUM_AT] {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let sum = fnv1a(&r[..SUM_AT]);
    r[SUM_AT..].copy_from_slice(&sum.to_le_bytes());
    r
}

/// The first `records` records of stream `tag`: a guest writer's pattern file.
pub fn pattern(tag: u32, records: u64) -> Vec<u8> {
    (0..records).flat_map(|s| record(tag, s)).collect()
}

/// The tag and number of a whole, intact record of stream `tag` at the start of `buf`.
fn parse(buf: &[u8], tag: u32) -> Option<u64> {
    let r = buf.get(..RECORD)?;
    if r[..4] != MAGIC || r[TAG_AT..TAG_AT + 4] != tag.to_le_bytes() {
        return None;
    }
    let sum = u32::from_le_bytes(r[SUM_AT..].try_into().ok()?);
    if fnv1a(&r[..SUM_AT]) != sum {
        return None;
    }
    let seq = u64::from_le_bytes(r[SEQ_AT..SEQ_AT + 8].try_into().ok()?);
    (r == record(tag, seq)).then_some(seq)
}

/// A sender's side of a stream: the bytes from any position on.
#[derive(Debug, Clone, Copy)]
pub struct Stream {
    /// The stream's tag.
    pub tag: u32,
    /// Records before the stream starts again at record 0 (`None`: never).
    pub period: Option<u64>,
}

impl Stream {
    /// The record that holds byte `pos`.
    fn record_at(&self, pos: u64) -> [u8; RECORD] {
        let n = pos / RECORD as u64;
        record(self.tag, self.period.map_or(n, |p| n % p))
    }

    /// The byte at `pos`.
    pub fn byte(&self, pos: u64) -> u8 {
        self.record_at(pos)[(pos % RECORD as u64) as usize]
    }

    /// `len` bytes from `pos` on.
    pub fn bytes(&self, pos: u64, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len);
        let mut p = pos;
        while out.len() < len {
            let r = self.record_at(p);
            let from = (p % RECORD as u64) as usize;
            let take = (RECORD - from).min(len - out.len());
            out.extend_from_slice(&r[from..from + take]);
            p += take as u64;
        }
        out
    }
}

/// A gap the verifier found: `len` bytes of the sent stream skipped after `at` bytes had been
/// delivered, and the reason it was charged to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gap {
    /// Bytes delivered before the gap.
    pub at: u64,
    /// Bytes skipped.
    pub len: u64,
    /// Whether it was charged to a reset of the guest (else to the channel's counters).
    pub reset: bool,
}

/// Follows a received stream against what was sent.
#[derive(Debug)]
pub struct Verifier {
    stream: Stream,
    /// Position in the sent stream of the next byte expected.
    pub pos: u64,
    /// Bytes that arrived where they were expected.
    pub delivered: u64,
    /// Every gap, in order.
    pub gaps: Vec<Gap>,
    /// Resets whose gap has not been seen yet (each allows one gap charged to it).
    resets_armed: u32,
    /// Bytes after a mismatch, until a whole record says where the stream resumed.
    pending: Vec<u8>,
    /// The first error: bytes that fit nowhere, a duplicate, a record out of order.
    pub error: Option<String>,
}

/// A resync can look this far into unexplained bytes before calling them garbage.
const RESYNC_WINDOW: usize = 4 * RECORD;

impl Verifier {
    /// A verifier at the start of `stream`.
    pub fn new(stream: Stream) -> Self {
        Verifier {
            stream,
            pos: 0,
            delivered: 0,
            gaps: Vec::new(),
            resets_armed: 0,
            pending: Vec::new(),
            error: None,
        }
    }

    /// The stream's tag.
    pub fn tag(&self) -> u32 {
        self.stream.tag
    }

    /// Records per pass of a periodic stream.
    pub fn period(&self) -> Option<u64> {
        self.stream.period
    }

    /// The guest was reset: the next gap is charged to it (bytes the guest held or had not yet
    /// handed to the device when it restarted).
    pub fn arm_reset(&mut self) {
        self.resets_armed += 1;
    }

    /// The guest restarted its pattern (a periodic stream's sender booted again): what follows
    /// starts at the next pass. The rest of the current pass is a gap charged to the reset.
    pub fn restart_pass(&mut self) {
        let Some(p) = self.stream.period else {
            return;
        };
        let period = p * RECORD as u64;
        let next = self.pos.div_ceil(period) * period;
        if next > self.pos {
            self.gaps.push(Gap {
                at: self.delivered,
                len: next - self.pos,
                reset: true,
            });
            self.pos = next;
        }
    }

    /// The sender's stream ended at `end`: bytes still unexplained (too few to hold a whole
    /// record) must be its last ones, after a gap.
    pub fn finish(&mut self, end: u64) {
        if self.pending.is_empty() || self.error.is_some() {
            return;
        }
        let n = self.pending.len() as u64;
        if end < self.pos + n || self.pending[..] != self.stream.bytes(end - n, n as usize)[..] {
            self.error = Some(format!(
                "{n} bytes after position {} are not the end of the stream at {end}",
                self.pos
            ));
            return;
        }
        let reset = self.resets_armed > 0;
        if reset {
            self.resets_armed -= 1;
        }
        self.gaps.push(Gap {
            at: self.delivered,
            len: end - n - self.pos,
            reset,
        });
        self.delivered += n;
        self.pos = end;
        self.pending.clear();
    }

    /// Resets armed whose gap was not seen (the stream went on without losing a byte).
    pub fn resets_unused(&self) -> u32 {
        self.resets_armed
    }

    /// Bytes skipped in gaps charged to resets, and in the others.
    pub fn gap_totals(&self) -> (u64, u64) {
        let reset = self.gaps.iter().filter(|g| g.reset).map(|g| g.len).sum();
        let other = self.gaps.iter().filter(|g| !g.reset).map(|g| g.len).sum();
        (reset, other)
    }

    /// Bytes received and not yet explained (after a mismatch, before the next whole record).
    pub fn unexplained(&self) -> usize {
        self.pending.len()
    }

    /// Take in received bytes.
    pub fn feed(&mut self, data: &[u8]) {
        if self.error.is_some() {
            return;
        }
        let i = if self.pending.is_empty() {
            self.matching(data)
        } else {
            0
        };
        self.pending.extend_from_slice(&data[i..]);
        while !self.pending.is_empty() && self.error.is_none() {
            if !self.resync() {
                break;
            }
        }
    }

    /// Explain the pending bytes: find the first whole record in them; the bytes before it are
    /// the tail of the record before it in the sent stream. Returns whether it made progress.
    fn resync(&mut self) -> bool {
        let tag = self.stream.tag;
        let found = (0..self.pending.len().saturating_sub(RECORD - 1))
            .take(RESYNC_WINDOW + 1)
            .find_map(|j| parse(&self.pending[j..], tag).map(|seq| (j, seq)));
        let Some((j, seq)) = found else {
            if self.pending.len() >= RESYNC_WINDOW + RECORD {
                self.error = Some(format!(
                    "{} bytes after position {} match no record: {:02x?}",
                    self.pending.len(),
                    self.pos,
                    &self.pending[..32]
                ));
            }
            return false;
        };
        // Where that record sits in the sent stream: the first place at or after our position
        // (plus the bytes before it) with that number.
        let rec = RECORD as u64;
        let at_least = self.pos + j as u64;
        let start = match self.stream.period {
            None => seq * rec,
            Some(p) => {
                let period = p * rec;
                let base = at_least - at_least % period + seq * rec;
                if base >= at_least {
                    base
                } else {
                    base + period
                }
            }
        };
        if start < at_least {
            let from = start
                .saturating_sub(j as u64)
                .max(self.pos.saturating_sub(8));
            self.error = Some(format!(
                "record {seq} arrived again or out of order at position {} ({} bytes before it: \
                 {:02x?}; the stream there: {:02x?})",
                self.pos,
                j,
                &self.pending[..j],
                self.stream
                    .bytes(from, start.saturating_sub(from) as usize + 4)
            ));
            return false;
        }
        let resume = start - j as u64;
        if self.pending[..j] != self.stream.bytes(resume, j)[..] {
            self.error = Some(format!(
                "{j} bytes before record {seq} (position {}) are not the end of record {}",
                self.pos,
                seq.wrapping_sub(1)
            ));
            return false;
        }
        let reset = self.resets_armed > 0;
        if reset {
            self.resets_armed -= 1;
        }
        self.gaps.push(Gap {
            at: self.delivered,
            len: resume - self.pos,
            reset,
        });
        let rest = self.pending.split_off(j + RECORD);
        self.delivered += (j + RECORD) as u64;
        self.pos = start + rec;
        self.pending.clear();
        // The rest is checked as the stream goes on.
        let i = self.matching(&rest);
        self.pending.extend_from_slice(&rest[i..]);
        true
    }

    /// Take in the longest prefix of `data` that is what the stream holds next; returns its
    /// length.
    fn matching(&mut self, data: &[u8]) -> usize {
        let mut i = 0;
        while i < data.len() {
            let r = self.stream.record_at(self.pos);
            let from = (self.pos % RECORD as u64) as usize;
            let n = (RECORD - from).min(data.len() - i);
            let same = data[i..i + n]
                .iter()
                .zip(&r[from..from + n])
                .take_while(|(a, b)| a == b)
                .count();
            self.pos += same as u64;
            self.delivered += same as u64;
            i += same;
            if same < n {
                break;
            }
        }
        i
    }
}

/// A small seeded generator (splitmix64): every random choice of the soak comes from one seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }

    /// Milliseconds in `lo..=hi` as a duration.
    pub fn millis(&mut self, lo: u64, hi: u64) -> std::time::Duration {
        std::time::Duration::from_millis(self.range(lo, hi))
    }

    /// True with probability `percent` / 100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.range(0, 99) < percent
    }

    /// A generator of its own for one part of the soak.
    pub fn fork(&mut self) -> Rng {
        Rng::new(self.next_u64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(period: Option<u64>) -> Stream {
        Stream { tag: 7, period }
    }

    #[test]
    fn records_check_themselves() {
        let r = record(3, 99);
        assert_eq!(parse(&r, 3), Some(99));
        assert_eq!(parse(&r, 4), None);
        let mut bad = r;
        bad[20] ^= 1;
        assert_eq!(parse(&bad, 3), None);
    }

    #[test]
    fn whole_stream_in_pieces_has_no_gap() {
        let s = stream(None);
        let data = s.bytes(0, 10_000);
        let mut v = Verifier::new(s);
        for chunk in data.chunks(37) {
            v.feed(chunk);
        }
        assert_eq!((v.delivered, v.pos, v.gaps.len()), (10_000, 10_000, 0));
        assert!(v.error.is_none());
    }

    #[test]
    fn a_dropped_span_is_counted_exactly() {
        for (from, len) in [(100u64, 1u64), (130, 5000), (0, 64), (64, 64), (5, 200)] {
            let s = stream(None);
            let mut data = s.bytes(0, from as usize);
            data.extend(s.bytes(from + len, 3000));
            let mut v = Verifier::new(s);
            for chunk in data.chunks(50) {
                v.feed(chunk);
            }
            assert!(v.error.is_none(), "{:?}", v.error);
            assert_eq!(v.gap_totals(), (0, len), "gap at {from} of {len}");
            assert_eq!(v.delivered, data.len() as u64);
            assert_eq!(v.pos, from + len + 3000);
        }
    }

    #[test]
    fn periodic_stream_resumes_in_the_next_pass() {
        let s = stream(Some(16));
        let period = 16 * RECORD as u64;
        let mut data = s.bytes(0, 900);
        // A reset: the guest starts its pattern again from record 0.
        data.extend(s.bytes(period * 5, 2 * period as usize));
        let mut v = Verifier::new(s);
        v.arm_reset();
        v.feed(&data);
        assert!(v.error.is_none(), "{:?}", v.error);
        assert_eq!(v.gaps.len(), 1);
        assert!(v.gaps[0].reset);
        assert_eq!(v.gaps[0].len, period - 900);
        assert_eq!(v.pos, 3 * period);
    }

    #[test]
    fn a_restarted_pass_charges_the_rest_to_the_reset_and_ring_drops_stay_apart() {
        let s = stream(Some(16));
        let period = 16 * RECORD as u64;
        let mut v = Verifier::new(s);
        v.feed(&s.bytes(0, 700));
        v.restart_pass();
        // The new boot's first 100 bytes were dropped by a ring.
        v.feed(&s.bytes(period + 100, 500));
        assert!(v.error.is_none(), "{:?}", v.error);
        assert_eq!(v.gap_totals(), (period - 700, 100));
        assert_eq!(v.pos, period + 600);
    }

    #[test]
    fn the_last_bytes_after_a_gap_are_placed_at_the_end() {
        let s = stream(None);
        let mut v = Verifier::new(s);
        v.feed(&s.bytes(0, 300));
        v.arm_reset();
        v.feed(&s.bytes(1000, 40));
        assert_eq!(v.unexplained(), 40);
        v.finish(1040);
        assert!(v.error.is_none(), "{:?}", v.error);
        assert_eq!((v.gap_totals(), v.delivered, v.pos), ((700, 0), 340, 1040));
        let mut w = Verifier::new(s);
        w.feed(&s.bytes(0, 300));
        w.feed(&s.bytes(1000, 40));
        w.finish(2000);
        assert!(w.error.is_some(), "bytes from elsewhere are not the end");
    }

    #[test]
    fn duplicates_and_garbage_are_errors() {
        let s = stream(None);
        let mut data = s.bytes(0, 640);
        data.extend(s.bytes(320, 640));
        let mut v = Verifier::new(s);
        v.feed(&data);
        assert!(v.error.is_some(), "a repeated span must not pass");

        let mut data = s.bytes(0, 640);
        data.extend(std::iter::repeat_n(0u8, 16));
        data.extend(s.bytes(640 + 16, 640));
        let mut v = Verifier::new(s);
        v.feed(&data);
        assert!(v.error.is_some(), "zeroed bytes must not pass as a gap");
    }
}
