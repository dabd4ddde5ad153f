//! What a sender learns about its channel from the ACKs (`docs/vproxy.md` §8): round trip,
//! bottleneck rate, loss, and from them how many bytes to keep in flight and how big to make
//! DATA frames.
//!
//! The model is BBR's, reduced to what one ordered byte pipe needs:
//!
//! - **rate**: the highest delivery rate sampled in the last [`RATE_WINDOW`] (an ACK's
//!   sample is the bytes delivered since its newest frame was sent, over that interval);
//! - **min RTT**: the lowest round trip in the last [`MIN_RTT_WINDOW`]; when it expires the
//!   sender drains its queue for a moment ([`PROBE_RTT`]) to measure it again, since a
//!   sender that always keeps a queue would otherwise measure its own queue;
//! - **in flight**: at most `IN_FLIGHT_GAIN x rate x min RTT` (two frames at least), so
//!   the channel stays busy while no more than about one round trip of bytes queues in it:
//!   an interactive frame waits behind that much at most, whatever the channel's speed and
//!   whether anyone told the endpoint its speed;
//! - **frame size**: about [`FRAME_TIME`] of the measured rate (large on virtio and sockets,
//!   short frames on a slow line), and smaller when frames get lost, so that a damaged
//!   frame costs a small retransmission and most frames get through.

use std::time::{Duration, Instant};

/// Delivery-rate samples are kept this long (max filter).
pub const RATE_WINDOW: Duration = Duration::from_secs(2);
/// Buckets of the rate max filter over `RATE_WINDOW`.
const RATE_BUCKETS: usize = 4;
/// The min RTT is trusted this long, then measured again.
pub const MIN_RTT_WINDOW: Duration = Duration::from_secs(10);
/// How long the in-flight cap stays at its minimum to measure the min RTT again (at least
/// this, and at least two round trips).
pub const PROBE_RTT: Duration = Duration::from_millis(20);
/// In flight: this many times rate x min RTT.
pub const IN_FLIGHT_GAIN: f64 = 2.0;
/// A DATA frame holds the channel for about this long at the measured rate.
pub const FRAME_TIME: Duration = Duration::from_millis(25);
/// Frames are sized so that about this fraction of them is lost on the measured byte
/// error rate.
const FRAME_LOSS_BUDGET: f64 = 0.03;
/// Frames resolved per loss-rate estimate.
const LOSS_EPOCH_FRAMES: u32 = 64;
/// Weight of the newest loss-rate estimate.
const LOSS_EWMA: f64 = 0.5;
/// Below this estimated byte error rate, loss does not limit the frame size.
const LOSS_FLOOR: f64 = 1e-9;
/// Payloads are rounded down to a multiple of this.
const PAYLOAD_ALIGN: usize = 16;
/// The smallest DATA payload the model chooses.
pub const MIN_PAYLOAD: usize = 64;
/// Retransmission timeout bounds (tail-loss probe).
pub const RTO_MIN: Duration = Duration::from_millis(10);
pub const RTO_MAX: Duration = Duration::from_secs(2);
/// Wire bytes a frame costs beyond its payload (header and payload CRC).
const FRAME_OVERHEAD: usize = crate::wire::HEADER_LEN + crate::wire::TRAILER_LEN;

/// The sender's model of its channel. See the module documentation.
#[derive(Debug, Clone)]
pub struct PathModel {
    /// Largest payload allowed (configuration and the peer's limit).
    max_payload: usize,
    /// Payload and in-flight cap before the first sample.
    initial_payload: usize,
    initial_in_flight: usize,
    buckets: [(f64, Option<Instant>); RATE_BUCKETS],
    min_rtt: Option<(Duration, Instant)>,
    srtt: Option<Duration>,
    rttvar: Duration,
    probe: Option<Probe>,
    loss_rate: f64,
    epoch_frames: u32,
    epoch_lost_frames: u32,
    epoch_bytes: usize,
}

#[derive(Debug, Clone, Copy)]
struct Probe {
    until: Instant,
    min: Option<Duration>,
}

impl PathModel {
    /// A model with no samples: frames of `initial_payload` (at most `max_payload`) and
    /// `initial_in_flight` bytes in flight until the first ACKs.
    pub fn new(max_payload: usize, initial_payload: usize, initial_in_flight: usize) -> Self {
        PathModel {
            max_payload: max_payload.max(1),
            initial_payload: initial_payload.clamp(1, max_payload.max(1)),
            initial_in_flight,
            buckets: [(0.0, None); RATE_BUCKETS],
            min_rtt: None,
            srtt: None,
            rttvar: Duration::ZERO,
            probe: None,
            loss_rate: 0.0,
            epoch_frames: 0,
            epoch_lost_frames: 0,
            epoch_bytes: 0,
        }
    }

    /// A new limit on the payload (the peer's HELLO).
    pub fn set_max_payload(&mut self, max_payload: usize) {
        self.max_payload = max_payload.max(1);
        self.initial_payload = self.initial_payload.min(self.max_payload);
    }

    /// Start over (a new session: maybe another path).
    pub fn reset(&mut self) {
        *self = PathModel::new(
            self.max_payload,
            self.initial_payload,
            self.initial_in_flight,
        );
    }

    /// The bottleneck rate in bytes per second, if measured.
    pub fn rate(&self, now: Instant) -> Option<f64> {
        self.buckets
            .iter()
            .filter(|(_, at)| at.is_some_and(|t| now.saturating_duration_since(t) < RATE_WINDOW))
            .map(|&(r, _)| r)
            .filter(|&r| r > 0.0)
            .reduce(f64::max)
    }

    /// The lowest recent round trip, if measured.
    pub fn min_rtt(&self) -> Option<Duration> {
        self.min_rtt.map(|(d, _)| d)
    }

    /// The smoothed round trip, if measured.
    pub fn srtt(&self) -> Option<Duration> {
        self.srtt
    }

    /// The estimated byte error rate of the channel.
    pub fn loss_rate(&self) -> f64 {
        self.loss_rate
    }

    /// How long to wait for an ACK before probing for a lost tail.
    pub fn rto(&self) -> Duration {
        match self.srtt {
            Some(srtt) => (srtt * 2 + self.rttvar * 4).clamp(RTO_MIN, RTO_MAX),
            None => RTO_MAX / 4,
        }
    }

    /// The DATA payload to use now.
    pub fn payload(&self, now: Instant) -> usize {
        let by_rate = match self.rate(now) {
            Some(rate) => (rate * FRAME_TIME.as_secs_f64()) as usize,
            None => self.initial_payload,
        };
        let by_loss = if self.loss_rate > LOSS_FLOOR {
            (FRAME_LOSS_BUDGET / self.loss_rate) as usize
        } else {
            usize::MAX
        };
        let p = by_rate.min(by_loss).min(self.max_payload);
        let p = if p >= PAYLOAD_ALIGN {
            p / PAYLOAD_ALIGN * PAYLOAD_ALIGN
        } else {
            p
        };
        p.max(MIN_PAYLOAD.min(self.max_payload))
    }

    /// Bytes that may be in flight now.
    pub fn in_flight_cap(&self, now: Instant) -> usize {
        let floor = 2 * (self.payload(now) + FRAME_OVERHEAD);
        if self.probe.is_some() {
            return floor;
        }
        match (self.rate(now), self.min_rtt) {
            (Some(rate), Some((rtt, _))) => {
                let bdp = rate * rtt.as_secs_f64() * IN_FLIGHT_GAIN;
                (bdp as usize).max(floor)
            }
            _ => self.initial_in_flight.max(floor),
        }
    }

    /// Whether the model is draining the channel to measure the min RTT.
    pub fn probing(&self) -> bool {
        self.probe.is_some()
    }

    /// An ACK's delivery sample, at `now`. `app_limited`: the sender had less to send than
    /// it was allowed (a low rate then says nothing about the channel).
    pub fn on_sample(&mut self, s: &crate::arq::Sample, app_limited: bool, now: Instant) {
        self.on_rtt(s.rtt, now);
        if !app_limited || self.rate(now).is_none_or(|r| s.rate > r) {
            self.add_rate(s.rate, now);
        }
    }

    /// Frames resolved: `lost` of `frames`, carrying `bytes` wire bytes in all.
    pub fn on_resolved(&mut self, frames: u32, lost: u32, bytes: usize) {
        self.epoch_frames += frames;
        self.epoch_lost_frames += lost;
        self.epoch_bytes += bytes;
        if self.epoch_frames < LOSS_EPOCH_FRAMES {
            return;
        }
        let f = (f64::from(self.epoch_lost_frames) / f64::from(self.epoch_frames)).min(0.99);
        let mean_len = self.epoch_bytes as f64 / f64::from(self.epoch_frames);
        // P(frame ok) = (1 - p)^len, so p = 1 - (1 - f)^(1/len) ~ -ln(1 - f) / len.
        let sample = if mean_len > 0.0 {
            -(1.0 - f).ln() / mean_len
        } else {
            0.0
        };
        self.loss_rate = LOSS_EWMA * sample + (1.0 - LOSS_EWMA) * self.loss_rate;
        self.epoch_frames = 0;
        self.epoch_lost_frames = 0;
        self.epoch_bytes = 0;
    }

    /// Time passes: start or end a min-RTT probe.
    pub fn tick(&mut self, now: Instant) {
        if let Some(p) = self.probe {
            if now >= p.until {
                self.probe = None;
                if let Some(min) = p.min {
                    self.min_rtt = Some((min, now));
                } else if let Some((d, _)) = self.min_rtt {
                    // Nothing was sent meanwhile: keep the old figure a while longer.
                    self.min_rtt = Some((d, now));
                }
            }
        } else if let Some((d, at)) = self.min_rtt {
            if now.saturating_duration_since(at) >= MIN_RTT_WINDOW {
                self.probe = Some(Probe {
                    until: now + (d * 2).max(PROBE_RTT),
                    min: None,
                });
            }
        }
    }

    /// When `tick` has something to do.
    pub fn next_tick(&self) -> Option<Instant> {
        match (self.probe, self.min_rtt) {
            (Some(p), _) => Some(p.until),
            (None, Some((_, at))) => Some(at + MIN_RTT_WINDOW),
            (None, None) => None,
        }
    }

    fn on_rtt(&mut self, rtt: Duration, now: Instant) {
        match self.srtt {
            None => {
                self.srtt = Some(rtt);
                self.rttvar = rtt / 2;
            }
            Some(srtt) => {
                let diff = srtt.abs_diff(rtt);
                self.rttvar = (self.rttvar * 3 + diff) / 4;
                self.srtt = Some((srtt * 7 + rtt) / 8);
            }
        }
        if let Some(p) = &mut self.probe {
            p.min = Some(p.min.map_or(rtt, |m| m.min(rtt)));
        }
        if self.min_rtt.is_none_or(|(d, _)| rtt <= d) {
            self.min_rtt = Some((rtt, now));
        }
    }

    fn add_rate(&mut self, rate: f64, now: Instant) {
        let bucket_len = RATE_WINDOW / RATE_BUCKETS as u32;
        // The newest bucket is the one started within the last bucket_len.
        let newest = self
            .buckets
            .iter_mut()
            .filter(|(_, at)| at.is_some_and(|t| now.saturating_duration_since(t) < bucket_len))
            .max_by_key(|(_, at)| *at);
        if let Some(b) = newest {
            b.0 = b.0.max(rate);
            return;
        }
        // Replace the oldest (or an empty) bucket.
        if let Some(b) = self.buckets.iter_mut().min_by_key(|(_, at)| *at) {
            *b = (rate, Some(now));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arq::Sample;

    fn sample(rtt_ms: u64, rate: f64) -> Sample {
        Sample {
            rtt: Duration::from_millis(rtt_ms),
            rate,
            delivered: 1000,
            lost: 0,
        }
    }

    #[test]
    fn in_flight_follows_rate_times_min_rtt() {
        let t0 = Instant::now();
        let mut m = PathModel::new(65535, 1024, 64 * 1024);
        assert_eq!(m.in_flight_cap(t0), 64 * 1024);
        assert_eq!(m.payload(t0), 1024);
        // A 115200-baud line: 11 520 B/s, 25 ms round trip.
        m.on_sample(&sample(25, 11_520.0), false, t0);
        let cap = m.in_flight_cap(t0);
        assert!((560..=700).contains(&cap), "cap {cap}");
        assert_eq!(m.payload(t0), 288);
        // A queue builds: higher RTTs do not raise the min.
        m.on_sample(&sample(200, 11_520.0), false, t0);
        assert_eq!(m.min_rtt(), Some(Duration::from_millis(25)));
        // A fast channel: big frames.
        let mut fast = PathModel::new(65535, 1024, 64 * 1024);
        fast.on_sample(&sample(1, 1e9), false, t0);
        assert_eq!(fast.payload(t0), 65535 / 16 * 16);
        assert_eq!(fast.in_flight_cap(t0), 2_000_000);
    }

    #[test]
    fn old_rates_expire_and_app_limited_samples_do_not_lower_the_rate() {
        let t0 = Instant::now();
        let mut m = PathModel::new(65535, 1024, 64 * 1024);
        m.on_sample(&sample(10, 1e6), false, t0);
        m.on_sample(&sample(10, 10.0), true, t0 + Duration::from_millis(600));
        m.on_sample(&sample(10, 5e5), false, t0 + Duration::from_millis(900));
        assert_eq!(m.rate(t0 + Duration::from_millis(950)), Some(1e6));
        // The first sample expired; the app-limited one never counted.
        assert_eq!(
            m.rate(t0 + RATE_WINDOW + Duration::from_millis(1)),
            Some(5e5)
        );
        assert_eq!(m.rate(t0 + RATE_WINDOW * 2), None);
    }

    #[test]
    fn min_rtt_is_probed_again_after_its_window() {
        let t0 = Instant::now();
        let mut m = PathModel::new(1024, 1024, 8192);
        m.on_sample(&sample(5, 1e6), false, t0);
        let later = t0 + MIN_RTT_WINDOW;
        m.tick(later);
        assert!(m.probing());
        assert_eq!(m.in_flight_cap(later), 2 * (1024 + FRAME_OVERHEAD));
        m.on_sample(&sample(8, 1e6), false, later);
        m.tick(later + PROBE_RTT);
        assert!(!m.probing());
        assert_eq!(m.min_rtt(), Some(Duration::from_millis(8)));
    }

    #[test]
    fn frames_shrink_on_a_lossy_line() {
        let t0 = Instant::now();
        let mut m = PathModel::new(65535, 65535, 1 << 20);
        m.on_sample(&sample(1, 1e9), false, t0);
        // 1 byte in 10^4 damaged: 64 KiB frames nearly all lost.
        let f_ok = (1.0f64 - 1e-4).powf(65_000.0);
        let lost = ((1.0 - f_ok) * 64.0).round() as u32;
        m.on_resolved(64, lost, 64 * 65_000);
        let p = m.payload(t0);
        assert!(p < 2048, "payload {p}");
        // Frames of that size: the estimate settles near the real rate.
        for _ in 0..8 {
            let p = m.payload(t0);
            let lost = ((1.0 - (1.0f64 - 1e-4).powf(p as f64 + 30.0)) * 640.0).round() as u32;
            m.on_resolved(640, lost, 640 * (p + 30));
        }
        let p = m.payload(t0);
        assert!(
            (150..=600).contains(&p),
            "payload {p}, loss rate {}",
            m.loss_rate()
        );
    }
}
