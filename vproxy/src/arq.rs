//! Session-level loss detection and acknowledgement (`docs/vproxy.md` §7).
//!
//! Every frame a side sends carries the next number of its session's sequence. The channel
//! never reorders bytes, so a receiver that sees sequence number `s` after `h` with
//! `s > h + 1` knows that `h + 1 .. s` were lost (dropped by the decoder as damaged, or
//! never arrived), the moment the next good frame comes. [`RxTracker`] keeps the highest
//! number seen and the recent missing ranges and builds ACK frames from them; [`TxLog`]
//! keeps, on the sending side, what each tracked frame carried until an ACK says whether it
//! arrived or was lost, and counts the bytes in flight.
//!
//! An ACK is cumulative and idempotent: "the highest I have is `high`; of the numbers from
//! `complete_from` to `high`, exactly these ranges are missing". So a lost ACK is healed by
//! the next one, and a frame that is not named missing but lies below `complete_from` and
//! was never resolved is treated as lost (its retransmission is harmless: a receiver takes
//! stream bytes by offset and ignores what it already has).

use std::collections::VecDeque;
use std::time::Instant;

/// A frame's sequence number. Compared in serial-number arithmetic (wraps).
pub type Seq = u32;

/// Missing ranges older than this many numbers below the highest are forgotten.
pub const ACK_HORIZON: u32 = 1 << 20;
/// At most this many missing ranges are kept (and sent in one ACK).
pub const ACK_MAX_RANGES: usize = 16;
/// A missing range is reported in this many ACKs, then forgotten (`complete_from` moves
/// past it): enough for one to get through on a lossy line.
pub const ACK_REPORTS: u8 = 3;
/// Bytes of an ACK payload before the ranges (`complete_from`).
const ACK_FIXED_LEN: usize = 4;
/// Bytes of one missing range (first, count).
const ACK_RANGE_LEN: usize = 8;
/// At most this many frames are tracked; beyond it the oldest is forgotten (a peer that
/// never acknowledges cannot make the log grow without bound; lost DATA it held is then
/// healed by the streams' probes).
pub const MAX_TRACKED: usize = 1 << 16;

/// `a < b` in serial-number arithmetic.
pub fn seq_lt(a: Seq, b: Seq) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

/// `a <= b` in serial-number arithmetic.
pub fn seq_le(a: Seq, b: Seq) -> bool {
    a == b || seq_lt(a, b)
}

/// What one ACK says (`docs/vproxy.md` §3, type 11).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    /// The highest sequence number received.
    pub high: Seq,
    /// From here up to `high`, every number not in `missing` was received.
    pub complete_from: Seq,
    /// Missing ranges `(first, count)`, ascending, all within `complete_from..high`.
    pub missing: Vec<(Seq, u32)>,
}

impl Ack {
    /// The payload (`high` travels in the frame's value).
    pub fn payload(&self) -> Vec<u8> {
        let mut p = Vec::with_capacity(ACK_FIXED_LEN + ACK_RANGE_LEN * self.missing.len());
        p.extend_from_slice(&self.complete_from.to_le_bytes());
        for &(first, count) in &self.missing {
            p.extend_from_slice(&first.to_le_bytes());
            p.extend_from_slice(&count.to_le_bytes());
        }
        p
    }

    /// Parse an ACK's value and payload; None if malformed (ranges out of order, outside
    /// `complete_from..high`, or empty).
    pub fn parse(value: u64, payload: &[u8]) -> Option<Ack> {
        let high = u32::try_from(value).ok()?;
        let complete_from = u32::from_le_bytes(payload.get(..ACK_FIXED_LEN)?.try_into().ok()?);
        let rest = &payload[ACK_FIXED_LEN..];
        if !rest.len().is_multiple_of(ACK_RANGE_LEN) || rest.len() / ACK_RANGE_LEN > ACK_MAX_RANGES
        {
            return None;
        }
        let mut missing = Vec::with_capacity(rest.len() / ACK_RANGE_LEN);
        let mut floor = complete_from;
        for r in rest.chunks_exact(ACK_RANGE_LEN) {
            let first = u32::from_le_bytes(r[..4].try_into().ok()?);
            let count = u32::from_le_bytes(r[4..].try_into().ok()?);
            let last = first.wrapping_add(count.checked_sub(1)?);
            if seq_lt(first, floor) || !seq_lt(last, high) || seq_lt(last, first) {
                return None;
            }
            floor = last.wrapping_add(1);
            missing.push((first, count));
        }
        if seq_lt(high, complete_from) {
            return None;
        }
        Some(Ack {
            high,
            complete_from,
            missing,
        })
    }

    /// Whether `seq` (at most `high`) was lost according to this ACK.
    fn lost(&self, seq: Seq, cursor: &mut usize) -> bool {
        if seq_lt(seq, self.complete_from) {
            return true;
        }
        while let Some(&(first, count)) = self.missing.get(*cursor) {
            let last = first.wrapping_add(count - 1);
            if seq_lt(last, seq) {
                *cursor += 1;
                continue;
            }
            return seq_le(first, seq);
        }
        false
    }
}

#[derive(Debug, Clone, Copy)]
struct Missing {
    first: Seq,
    count: u32,
    reported: u8,
}

/// The receiving side: the highest number seen, the missing ranges, whether an ACK is owed.
#[derive(Debug, Default)]
pub struct RxTracker {
    high: Option<Seq>,
    complete_from: Seq,
    missing: VecDeque<Missing>,
    ack_due: bool,
    lost: u64,
}

impl RxTracker {
    /// Forget everything (a new session: the peer numbers from wherever it is).
    pub fn reset(&mut self) {
        *self = RxTracker {
            lost: self.lost,
            ..RxTracker::default()
        };
    }

    /// A frame numbered `seq` arrived; `eliciting`: it asks for an ACK (every frame but an
    /// ACK does). Returns how many numbers it showed missing.
    pub fn on_frame(&mut self, seq: Seq, eliciting: bool) -> u32 {
        self.ack_due |= eliciting;
        let Some(high) = self.high else {
            self.high = Some(seq);
            self.complete_from = seq;
            return 0;
        };
        if seq_le(seq, high) {
            // Not newer: the peer's numbering restarted without a new session (it never
            // does), or a wrap beyond the horizon. Start over from it.
            if high.wrapping_sub(seq) > ACK_HORIZON {
                self.reset_at(seq);
            }
            return 0;
        }
        let gap = seq.wrapping_sub(high) - 1;
        if gap > 0 {
            self.ack_due = true;
            self.lost = self.lost.wrapping_add(u64::from(gap));
            if self.missing.len() == ACK_MAX_RANGES {
                self.forget_oldest();
            }
            self.missing.push_back(Missing {
                first: high.wrapping_add(1),
                count: gap,
                reported: 0,
            });
        }
        self.high = Some(seq);
        let horizon = seq.wrapping_sub(ACK_HORIZON);
        if seq_lt(self.complete_from, horizon) {
            self.complete_from = horizon;
            while self
                .missing
                .front()
                .is_some_and(|m| seq_lt(m.first.wrapping_add(m.count - 1), horizon))
            {
                self.missing.pop_front();
            }
        }
        gap
    }

    fn reset_at(&mut self, seq: Seq) {
        self.high = Some(seq);
        self.complete_from = seq;
        self.missing.clear();
    }

    fn forget_oldest(&mut self) {
        if let Some(m) = self.missing.pop_front() {
            self.complete_from = m.first.wrapping_add(m.count);
        }
    }

    /// Whether an ACK is owed.
    pub fn ack_due(&self) -> bool {
        self.ack_due && self.high.is_some()
    }

    /// Numbers found missing so far (this engine's life).
    pub fn lost(&self) -> u64 {
        self.lost
    }

    /// The owed ACK (None if none is owed); ranges reported often enough are forgotten.
    pub fn take_ack(&mut self) -> Option<Ack> {
        if !self.ack_due() {
            return None;
        }
        self.ack_due = false;
        let high = self.high?;
        let ack = Ack {
            high,
            complete_from: self.complete_from,
            missing: self.missing.iter().map(|m| (m.first, m.count)).collect(),
        };
        for m in &mut self.missing {
            m.reported += 1;
        }
        while self
            .missing
            .front()
            .is_some_and(|m| m.reported >= ACK_REPORTS)
        {
            self.forget_oldest();
        }
        Some(ack)
    }
}

/// One tracked frame sent and not yet resolved.
#[derive(Debug)]
pub struct Sent<K> {
    pub seq: Seq,
    /// What the frame carried, to act on its loss.
    pub kind: K,
    /// Wire bytes.
    pub bytes: usize,
    pub sent_at: Instant,
    /// The log's delivered count and time when it was sent, and when the newest frame
    /// delivered by then had been sent (for the delivery rate).
    delivered: u64,
    delivered_at: Instant,
    first_sent_at: Instant,
}

/// How a tracked frame ended, from [`TxLog::on_ack`].
#[derive(Debug)]
pub enum Outcome<K> {
    Delivered(K),
    Lost(K),
}

/// A delivery sample from one ACK: the newest frame it confirmed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// Round trip of that frame.
    pub rtt: std::time::Duration,
    /// Bytes delivered since that frame was sent, per second of the interval.
    pub rate: f64,
    /// Bytes confirmed delivered by this ACK.
    pub delivered: usize,
    /// Bytes found lost by this ACK.
    pub lost: usize,
}

/// The sending side: numbers frames, keeps the tracked ones until resolved.
#[derive(Debug)]
pub struct TxLog<K> {
    next: Seq,
    entries: VecDeque<Sent<K>>,
    inflight: usize,
    delivered: u64,
    delivered_at: Instant,
    /// When the newest delivered frame was sent.
    first_sent_at: Instant,
    forgotten: u64,
}

impl<K> TxLog<K> {
    /// An empty log numbering from `first`.
    pub fn new(first: Seq, now: Instant) -> Self {
        TxLog {
            next: first,
            entries: VecDeque::new(),
            inflight: 0,
            delivered: 0,
            delivered_at: now,
            first_sent_at: now,
            forgotten: 0,
        }
    }

    /// Frames forgotten unresolved because the log was full.
    pub fn forgotten(&self) -> u64 {
        self.forgotten
    }

    /// Frames tracked now.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Nothing tracked.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The number of the next frame, taken (every frame sent takes one).
    pub fn take_seq(&mut self) -> Seq {
        let s = self.next;
        self.next = self.next.wrapping_add(1);
        s
    }

    /// Remember tracked frame `seq` of `bytes` wire bytes carrying `kind`.
    pub fn track(&mut self, seq: Seq, kind: K, bytes: usize, now: Instant) {
        if self.entries.len() >= MAX_TRACKED {
            if let Some(old) = self.entries.pop_front() {
                self.inflight -= old.bytes;
                self.forgotten = self.forgotten.wrapping_add(1);
            }
        }
        if self.entries.is_empty() {
            // Idle until now: the delivery interval starts here, not at the last ACK.
            self.delivered_at = now;
            self.first_sent_at = now;
        }
        self.inflight += bytes;
        self.entries.push_back(Sent {
            seq,
            kind,
            bytes,
            sent_at: now,
            delivered: self.delivered,
            delivered_at: self.delivered_at,
            first_sent_at: self.first_sent_at,
        });
    }

    /// Wire bytes of tracked frames not yet resolved.
    pub fn inflight(&self) -> usize {
        self.inflight
    }

    /// When the oldest unresolved frame was sent.
    pub fn oldest(&self) -> Option<Instant> {
        self.entries.front().map(|e| e.sent_at)
    }

    /// Forget everything in flight (the session ended); returns what was in it.
    pub fn clear(&mut self) -> impl Iterator<Item = K> + '_ {
        self.inflight = 0;
        self.entries.drain(..).map(|e| e.kind)
    }

    /// Resolve every frame `ack` covers, oldest first, through `f`; returns the sample of
    /// the newest delivered one (None if it delivered nothing).
    pub fn on_ack(
        &mut self,
        ack: &Ack,
        now: Instant,
        mut f: impl FnMut(Outcome<K>),
    ) -> Option<Sample> {
        let mut cursor = 0;
        let mut newest: Option<(Instant, u64, Instant, Instant)> = None;
        let mut delivered = 0;
        let mut lost = 0;
        while self
            .entries
            .front()
            .is_some_and(|e| seq_le(e.seq, ack.high))
        {
            let Some(e) = self.entries.pop_front() else {
                break;
            };
            self.inflight -= e.bytes;
            if ack.lost(e.seq, &mut cursor) {
                lost += e.bytes;
                f(Outcome::Lost(e.kind));
            } else {
                delivered += e.bytes;
                self.delivered = self.delivered.wrapping_add(e.bytes as u64);
                newest = Some((e.sent_at, e.delivered, e.delivered_at, e.first_sent_at));
                f(Outcome::Delivered(e.kind));
            }
        }
        let (sent_at, then, then_at, first_sent_at) = newest?;
        self.delivered_at = now;
        self.first_sent_at = sent_at;
        // As BBR does: the longer of the ACK interval and the send interval, so that ACKs
        // arriving bunched (behind the other direction's data) do not inflate the rate.
        let ack_elapsed = now.saturating_duration_since(then_at);
        let send_elapsed = sent_at.saturating_duration_since(first_sent_at);
        let interval = ack_elapsed.max(send_elapsed).as_secs_f64();
        let bytes = self.delivered.wrapping_sub(then) as f64;
        Some(Sample {
            rtt: now.saturating_duration_since(sent_at),
            rate: if interval > 0.0 {
                bytes / interval
            } else {
                0.0
            },
            delivered,
            lost,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::Duration;

    #[test]
    fn gaps_become_missing_ranges_and_acks_resolve_them() {
        let t0 = Instant::now();
        let mut tx: TxLog<u32> = TxLog::new(u32::MAX - 2, t0);
        let mut rx = RxTracker::default();
        let mut sent = Vec::new();
        for i in 0..8 {
            let s = tx.take_seq();
            tx.track(s, i, 100, t0);
            sent.push(s);
        }
        assert_eq!(tx.inflight(), 800);
        // Frames 2, 3 and 6 are lost (the numbers wrap past u32::MAX on the way).
        for (i, &s) in sent.iter().enumerate() {
            if ![2, 3, 6].contains(&i) {
                rx.on_frame(s, true);
            }
        }
        assert_eq!(rx.lost(), 3);
        let ack = rx.take_ack().unwrap();
        let wire = Ack::parse(u64::from(ack.high), &ack.payload()).unwrap();
        assert_eq!(wire, ack);
        let mut outcomes = Vec::new();
        let sample = tx
            .on_ack(&wire, t0 + Duration::from_millis(10), |o| outcomes.push(o))
            .unwrap();
        let lost: Vec<u32> = outcomes
            .iter()
            .filter_map(|o| match o {
                Outcome::Lost(k) => Some(*k),
                Outcome::Delivered(_) => None,
            })
            .collect();
        assert_eq!(lost, vec![2, 3, 6]);
        assert_eq!(outcomes.len(), 8);
        assert_eq!(tx.inflight(), 0);
        assert_eq!(sample.delivered, 500);
        assert_eq!(sample.lost, 300);
        assert_eq!(sample.rtt, Duration::from_millis(10));
    }

    #[test]
    fn a_range_is_forgotten_after_enough_reports_and_then_counts_as_lost_below_complete() {
        let mut rx = RxTracker::default();
        rx.on_frame(10, true);
        rx.on_frame(13, true);
        for _ in 0..ACK_REPORTS {
            let ack = rx.take_ack().unwrap();
            assert_eq!(ack.missing, vec![(11, 2)]);
            rx.on_frame(ack.high.wrapping_add(1), true);
        }
        let ack = rx.take_ack().unwrap();
        assert!(ack.missing.is_empty());
        assert_eq!(ack.complete_from, 13);
        // A sender that never heard the three ACKs still resolves 11 and 12 as lost.
        let mut cursor = 0;
        assert!(ack.lost(11, &mut cursor) && ack.lost(12, &mut cursor));
        assert!(!ack.lost(13, &mut cursor));
    }

    #[test]
    fn a_peer_that_never_acknowledges_cannot_grow_the_log() {
        let t0 = Instant::now();
        let mut tx: TxLog<()> = TxLog::new(0, t0);
        for _ in 0..MAX_TRACKED + 10 {
            let s = tx.take_seq();
            tx.track(s, (), 40, t0);
        }
        assert_eq!(tx.len(), MAX_TRACKED);
        assert_eq!(tx.forgotten(), 10);
        assert_eq!(tx.inflight(), MAX_TRACKED * 40);
    }

    #[test]
    fn malformed_acks_are_refused() {
        let good = Ack {
            high: 100,
            complete_from: 50,
            missing: vec![(60, 2), (70, 1)],
        };
        assert!(Ack::parse(100, &good.payload()).is_some());
        let mut p = good.payload();
        p.pop();
        assert!(Ack::parse(100, &p).is_none(), "ragged");
        assert!(
            Ack::parse(65, &good.payload()).is_none(),
            "range above high"
        );
        assert!(Ack::parse(u64::from(u32::MAX) + 1, &good.payload()).is_none());
        let unordered = Ack {
            missing: vec![(70, 1), (60, 2)],
            ..good.clone()
        };
        assert!(Ack::parse(100, &unordered.payload()).is_none());
        let empty = Ack {
            missing: vec![(60, 0)],
            ..good
        };
        assert!(Ack::parse(100, &empty.payload()).is_none());
    }

    proptest! {
        /// Whatever is lost, every tracked frame is resolved exactly once, as lost exactly
        /// when it was lost, provided one ACK gets through after the last frame.
        #[test]
        fn every_frame_is_resolved_once_and_right(
            start in any::<u32>(),
            drops in proptest::collection::vec(any::<bool>(), 1..300),
            ack_every in 1usize..40,
        ) {
            let t0 = Instant::now();
            let mut tx: TxLog<usize> = TxLog::new(start, t0);
            let mut rx = RxTracker::default();
            let mut resolved = vec![None; drops.len()];
            // The first frame always arrives (it sets the receiver's base), like a HELLO.
            for (i, &drop) in drops.iter().enumerate() {
                let s = tx.take_seq();
                tx.track(s, i, 10, t0);
                if !drop || i == 0 {
                    rx.on_frame(s, true);
                }
                if i % ack_every == 0 {
                    if let Some(ack) = rx.take_ack() {
                        tx.on_ack(&ack, t0, |o| match o {
                            Outcome::Lost(k) => resolved[k] = Some(true),
                            Outcome::Delivered(k) => resolved[k] = Some(false),
                        });
                    }
                }
            }
            // A final frame that arrives, and its ACK.
            let s = tx.take_seq();
            rx.on_frame(s, true);
            let ack = rx.take_ack().unwrap();
            tx.on_ack(&ack, t0, |o| match o {
                Outcome::Lost(k) => resolved[k] = Some(true),
                Outcome::Delivered(k) => resolved[k] = Some(false),
            });
            prop_assert_eq!(tx.inflight(), 0);
            for (i, r) in resolved.iter().enumerate() {
                let really_lost = drops[i] && i != 0;
                // Lost frames must be found lost; a delivered one may be resolved as lost
                // only once its range was forgotten (spurious retransmission, harmless).
                prop_assert!(r.is_some());
                if really_lost {
                    prop_assert_eq!(*r, Some(true), "frame {} lost but not resolved so", i);
                }
            }
        }

        #[test]
        fn ack_parse_never_panics(value in any::<u64>(),
                                  payload in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Ack::parse(value, &payload);
        }
    }
}
