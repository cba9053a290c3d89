//! Identity in time: the audio the `webrtc` scenario's senders emit (silence, and a one-frame 1 kHz
//! tone burst every N frames), the onset detector its receivers run on decoded audio, the matcher
//! that pairs each onset with the burst scheduled last before it, and the codec-only reference
//! (the same bursts through libopus alone, no network and no buffers).
//!
//! Invariant: pure computation on samples and nanosecond times; no clock, no I/O.

use audiopus::coder::{Decoder, Encoder};
use audiopus::{Application, Bitrate, Channels, SampleRate, Signal};

/// Peak amplitude of a burst (about −8.7 dBFS): loud enough to stand far above codec noise,
/// quiet enough that neither μ-law nor Opus clips it.
pub(crate) const AMPLITUDE: f32 = 12_000.0;
/// The burst's tone, Hz: inside the narrowband telephone channel and every Opus bandwidth.
pub(crate) const TONE_HZ: f32 = 1000.0;
/// One 20 ms frame, nanoseconds.
pub(crate) const FRAME_NS: i64 = 20_000_000;

/// One frame of the burst at `rate`: a cosine, so the very first sample is already loud and the
/// onset is the frame's first sample.
pub(crate) fn burst_frame(rate: u32) -> Vec<i16> {
    let n = rate as usize / 50;
    (0..n)
        .map(|i| {
            let phase = std::f32::consts::TAU * TONE_HZ * i as f32 / rate as f32;
            // Truncation is the intent: a sample value within ±AMPLITUDE.
            #[allow(clippy::cast_possible_truncation)]
            let s = (phase.cos() * AMPLITUDE) as i16;
            s
        })
        .collect()
}

/// Finds where loud audio starts after quiet, sample-accurately, across frame boundaries.
///
/// Energy is judged on a sliding window of 1 ms: an onset fires when the window's mean square
/// reaches (A/4)² while armed, and is placed at the window's first sample whose magnitude
/// reaches A/4 (A: the burst's amplitude). After an onset the detector re-arms only once the
/// window has stayed below (A/16)² for 40 ms, so one burst (and the codec's ringing after it)
/// gives one onset.
pub(crate) struct OnsetDetector {
    /// Window length, samples (1 ms).
    window: usize,
    /// Ring of the window's samples and their times (ns since the run's origin).
    ring: Vec<(i16, i64)>,
    /// Next slot of `ring` to overwrite; the oldest sample when the ring is full.
    head: usize,
    /// Samples in the ring (up to `window`).
    filled: usize,
    /// Sum of squares over the ring.
    sum_sq: i64,
    /// `window × (A/4)²`: the onset energy.
    loud_sum: i64,
    /// `window × (A/16)²`: below this the window counts as quiet.
    quiet_sum: i64,
    /// Magnitude that places the onset within the window.
    edge: i16,
    /// Quiet samples needed to re-arm (40 ms).
    rearm_after: usize,
    quiet_run: usize,
    armed: bool,
    /// Nanoseconds per sample.
    sample_ns: f64,
}

impl OnsetDetector {
    /// A detector for audio at `rate` Hz, armed (the stream starts quiet).
    pub(crate) fn new(rate: u32) -> Self {
        let window = (rate as usize / 1000).max(1);
        let loud = f64::from(AMPLITUDE) / 4.0;
        let quiet = f64::from(AMPLITUDE) / 16.0;
        // Rounding to whole sums of squares: these are thresholds, exactness is not needed.
        #[allow(clippy::cast_possible_truncation)]
        let (loud_sum, quiet_sum) = ((window as f64 * loud * loud) as i64, (window as f64 * quiet * quiet) as i64);
        #[allow(clippy::cast_possible_truncation)]
        let edge = loud as i16;
        Self {
            window,
            ring: vec![(0, 0); window],
            head: 0,
            filled: 0,
            sum_sq: 0,
            loud_sum,
            quiet_sum,
            edge,
            rearm_after: rate as usize * 40 / 1000,
            quiet_run: 0,
            armed: true,
            sample_ns: 1e9 / f64::from(rate),
        }
    }

    /// Feeds one frame whose first sample is at `start_ns` (ns since the origin); appends the
    /// time of every onset found to `onsets`.
    pub(crate) fn push(&mut self, samples: &[i16], start_ns: i64, onsets: &mut Vec<i64>) {
        for (i, &s) in samples.iter().enumerate() {
            // Sub-nanosecond rounding only.
            #[allow(clippy::cast_possible_truncation)]
            let t = start_ns + (i as f64 * self.sample_ns) as i64;
            let (old, _) = self.ring[self.head];
            if self.filled == self.window {
                self.sum_sq -= i64::from(old) * i64::from(old);
            } else {
                self.filled += 1;
            }
            self.ring[self.head] = (s, t);
            self.head = (self.head + 1) % self.window;
            self.sum_sq += i64::from(s) * i64::from(s);
            if self.armed {
                if self.sum_sq >= self.loud_sum {
                    onsets.push(self.first_edge());
                    self.armed = false;
                    self.quiet_run = 0;
                }
            } else if self.sum_sq < self.quiet_sum {
                self.quiet_run += 1;
                if self.quiet_run >= self.rearm_after {
                    self.armed = true;
                }
            } else {
                self.quiet_run = 0;
            }
        }
    }

    /// Time of the oldest sample in the window at least `edge` loud (the newest when none is).
    fn first_edge(&self) -> i64 {
        let start = if self.filled == self.window { self.head } else { 0 };
        let mut newest = 0;
        for k in 0..self.filled {
            let (s, t) = self.ring[(start + k) % self.window];
            if s.unsigned_abs() >= self.edge.unsigned_abs() {
                return t;
            }
            newest = t;
        }
        newest
    }
}

/// The bursts one sender emits: frame `first_seq + k × every` for `k < count`, frame `seq` due at
/// `offset_ns + seq × 20 ms` after the origin.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bursts {
    /// The sender's start within the period (the call's stagger), ns.
    pub(crate) offset_ns: i64,
    /// The first burst's frame (the call's phase).
    pub(crate) first_seq: u64,
    /// Frames between bursts.
    pub(crate) every: u64,
    /// Bursts sent.
    pub(crate) count: u64,
}

impl Bursts {
    /// The bursts of a sender of `frames` frames with phase `phase` (< `every`).
    pub(crate) fn new(offset_ns: i64, phase: u64, every: u64, frames: u64) -> Self {
        let every = every.max(1);
        let count = if phase < frames { (frames - phase - 1) / every + 1 } else { 0 };
        Self { offset_ns, first_seq: phase, every, count }
    }

    /// Whether frame `seq` is a burst.
    pub(crate) fn is_burst(&self, seq: u64) -> bool {
        seq >= self.first_seq && (seq - self.first_seq) % self.every == 0
    }

    /// When burst `k` was due, ns since the origin.
    fn due_ns(&self, k: u64) -> i64 {
        let seq = self.first_seq + k * self.every;
        self.offset_ns + i64::try_from(seq).unwrap_or(i64::MAX / FRAME_NS) * FRAME_NS
    }
}

/// Pairs one receiver's onsets with its sender's bursts.
#[derive(Debug)]
pub(crate) struct Matcher {
    bursts: Bursts,
    /// The last burst matched: onsets arrive in order, so a second onset for it is spurious.
    last: Option<u64>,
    /// Bursts matched.
    pub(crate) detected: u64,
    /// Onsets with no burst within half a burst period before them, or a second onset for one.
    pub(crate) unmatched: u64,
}

impl Matcher {
    /// A matcher for `bursts`.
    pub(crate) fn new(bursts: Bursts) -> Self {
        Self { bursts, last: None, detected: 0, unmatched: 0 }
    }

    /// Bursts the sender emitted.
    pub(crate) fn sent(&self) -> u64 {
        self.bursts.count
    }

    /// Takes an onset at `onset_ns`; returns the latency from its burst's scheduled send time, ns,
    /// when it matches the latest burst scheduled before it within half a burst period.
    pub(crate) fn onset(&mut self, onset_ns: i64) -> Option<i64> {
        let b = self.bursts;
        let first = b.due_ns(0);
        let spacing = i64::try_from(b.every).unwrap_or(i64::MAX / FRAME_NS) * FRAME_NS;
        if b.count == 0 || onset_ns < first {
            self.unmatched += 1;
            return None;
        }
        let k = u64::try_from((onset_ns - first) / spacing).unwrap_or(0).min(b.count - 1);
        let latency = onset_ns - b.due_ns(k);
        if latency > spacing / 2 || self.last == Some(k) {
            self.unmatched += 1;
            return None;
        }
        self.last = Some(k);
        self.detected += 1;
        Some(latency)
    }
}

/// Where each direction's bursts come out of libopus alone (no network, no buffers): what the
/// codecs cost before Relay adds anything.
#[derive(Debug, Clone, Copy, Default)]
pub struct CodecReference {
    /// Caller → agent: μ-law 8 kHz → Opus encoded at 8 kHz (Relay's default settings) → decoded
    /// at 48 kHz, µs from a burst's start to its detected onset.
    pub uplink_us: f64,
    /// Agent → caller: 48 kHz → Opus (the generator's encoder) → decoded at 8 kHz → μ-law, µs.
    pub downlink_us: f64,
}

/// Measures [`CodecReference`] with `complexity` for the generator's encoder.
///
/// # Errors
/// When libopus refuses a setting.
pub fn codec_reference(complexity: u8) -> Result<CodecReference, audiopus::Error> {
    // Relay's defaults (engine OpusSettings): VoIP, voice, 24 kbit/s, FEC with 10 % loss expected.
    let mut relay_encoder = Encoder::new(SampleRate::Hz8000, Channels::Mono, Application::Voip)?;
    relay_encoder.set_bitrate(Bitrate::BitsPerSecond(24_000))?;
    relay_encoder.set_signal(Signal::Voice)?;
    relay_encoder.set_complexity(1)?;
    relay_encoder.set_inband_fec(true)?;
    relay_encoder.set_packet_loss_perc(10)?;
    let ulaw_burst: Vec<i16> = burst_frame(8000)
        .iter()
        .map(|&s| relay_engine::media::g711::decode(relay_engine::media::g711::encode(s)))
        .collect();
    let up = through(&relay_encoder, &ulaw_burst, 8000, SampleRate::Hz48000, 48_000, |pcm| pcm)?;
    let agent_encoder = generator_encoder(complexity)?;
    let down = through(&agent_encoder, &burst_frame(48_000), 48_000, SampleRate::Hz8000, 8000, |pcm| {
        for s in pcm.iter_mut() {
            *s = relay_engine::media::g711::decode(relay_engine::media::g711::encode(*s));
        }
        pcm
    })?;
    Ok(CodecReference { uplink_us: up, downlink_us: down })
}

/// The generator's Opus encoder (48 kHz mono, VoIP, `complexity`).
///
/// # Errors
/// When libopus refuses a setting.
pub(crate) fn generator_encoder(complexity: u8) -> Result<Encoder, audiopus::Error> {
    let mut e = Encoder::new(SampleRate::Hz48000, Channels::Mono, Application::Voip)?;
    e.set_complexity(complexity)?;
    Ok(e)
}

/// Sends ten bursts (one every 25 frames) through `encoder` and a decoder at `out_rate`, frames
/// "arriving" at their send time; returns the median onset delay, µs.
fn through(
    encoder: &Encoder,
    burst: &[i16],
    in_rate: u32,
    out: SampleRate,
    out_rate: u32,
    post: impl Fn(&mut [i16]) -> &mut [i16],
) -> Result<f64, audiopus::Error> {
    const EVERY: u64 = 25;
    let mut decoder = Decoder::new(out, Channels::Mono)?;
    let silence = vec![0i16; in_rate as usize / 50];
    let bursts = Bursts::new(0, 5, EVERY, 10 * EVERY);
    let mut matcher = Matcher::new(bursts);
    let mut detector = OnsetDetector::new(out_rate);
    let (mut packet, mut pcm, mut onsets) = ([0u8; 1500], vec![0i16; out_rate as usize / 50], Vec::new());
    let mut delays = Vec::new();
    for seq in 0..10 * EVERY {
        let frame = if bursts.is_burst(seq) { burst } else { &silence[..] };
        let n = encoder.encode(frame, &mut packet)?;
        let m = decoder.decode(Some(&packet[..n]), &mut pcm[..], false)?;
        let start = i64::try_from(seq).unwrap_or(0) * FRAME_NS;
        detector.push(post(&mut pcm[..m]), start, &mut onsets);
        for at in onsets.drain(..) {
            delays.extend(matcher.onset(at));
        }
    }
    delays.sort_unstable();
    Ok(delays.get(delays.len() / 2).map_or(f64::NAN, |d| *d as f64 / 1e3))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An onset is placed at the burst's first sample, even when it straddles two frames, and one
    /// burst gives one onset.
    #[test]
    fn onsets_are_sample_accurate() {
        let mut d = OnsetDetector::new(8000);
        let mut onsets = Vec::new();
        let burst = burst_frame(8000);
        let mut audio = vec![0i16; 8000];
        audio[1000..1160].copy_from_slice(&burst);
        audio[5000..5160].copy_from_slice(&burst);
        // Frames of 160 shifted by 37 samples: the first burst straddles a frame boundary.
        let mut at = 0;
        for chunk in audio.chunks(160).flat_map(|c| [&c[..37.min(c.len())], &c[37.min(c.len())..]]) {
            d.push(chunk, at as i64 * 125_000, &mut onsets);
            at += chunk.len();
        }
        assert_eq!(onsets, vec![1000 * 125_000, 5000 * 125_000], "125 µs per sample at 8 kHz");
    }

    /// A burst's onset matches it; an onset too long after any burst, before the first, or a
    /// second one for the same burst does not.
    #[test]
    fn matching() {
        let b = Bursts::new(5_000_000, 3, 25, 100);
        assert_eq!(b.count, 4, "frames 3, 28, 53, 78");
        assert!(b.is_burst(28) && !b.is_burst(29) && !b.is_burst(2));
        let mut m = Matcher::new(b);
        let due = |seq: i64| 5_000_000 + seq * FRAME_NS;
        assert_eq!(m.onset(due(3) + 12_000_000), Some(12_000_000));
        assert_eq!(m.onset(due(3) + 13_000_000), None, "a second onset for the same burst");
        assert_eq!(m.onset(due(2)), None, "before the first burst");
        assert_eq!(m.onset(due(28) + 251 * 1_000_000), None, "over half the spacing late");
        assert_eq!(m.onset(due(78) + 1_000_000), Some(1_000_000));
        assert_eq!(m.onset(due(200)), None, "long after the last burst");
        assert_eq!((m.detected, m.unmatched, m.sent()), (2, 4, 4));
        assert_eq!(Bursts::new(0, 30, 25, 20).count, 0, "phase past the end");
    }

    /// Through libopus alone both directions come out a few milliseconds late (the codecs'
    /// look-ahead and resampling), never early and never by more than a frame.
    #[test]
    fn codec_reference_is_a_few_ms() {
        let r = codec_reference(0).expect("libopus");
        for d in [r.uplink_us, r.downlink_us] {
            assert!((0.0..20_000.0).contains(&d), "{r:?}");
        }
    }
}
