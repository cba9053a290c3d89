//! Energy-based voice activity detection with hangover, for 20 ms frames of 16-bit PCM at any
//! rate: speech starts after a few loud frames in a row and stops after a stretch of quiet ones.
//!
//! Cheap by design (one multiply-add per sample, no logarithm: the threshold is compared as a
//! mean square), so it can run on every frame of every call. It tells speech from silence and
//! line noise, not speech from music or a loud background.
//!
//! Invariant: pure arithmetic on the caller's frame; no allocation, no clock (time is counted in
//! frames, each taken as 20 ms), no panics.

/// Tuning for a [`Vad`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VadConfig {
    /// A frame whose RMS level is above this, in dBFS (0 = a full-scale square wave), is voiced.
    /// Default −45 dBFS: above a quiet line's noise, well below speech at normal levels.
    pub threshold_dbfs: f32,
    /// Consecutive voiced frames that start speech. Default 2 (40 ms): one click does not.
    pub start_frames: u32,
    /// Consecutive unvoiced frames that stop speech (the hangover). Default 15 (300 ms): the
    /// pauses inside a sentence do not.
    pub stop_frames: u32,
}

impl Default for VadConfig {
    fn default() -> Self {
        Self { threshold_dbfs: -45.0, start_frames: 2, stop_frames: 15 }
    }
}

/// A change of speech state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VadEvent {
    /// Speech began (with the frame just pushed, which is its `start_frames`-th voiced frame).
    Start,
    /// Speech ended (with the frame just pushed, its `stop_frames`-th unvoiced frame).
    Stop,
}

/// Voice activity state of one audio stream.
#[derive(Debug, Clone)]
pub struct Vad {
    config: VadConfig,
    /// The threshold as a mean square of samples (full scale 32768² for 0 dBFS).
    threshold_mean_square: f64,
    active: bool,
    /// Consecutive frames on the other side of the threshold from the current state.
    run: u32,
}

impl Default for Vad {
    fn default() -> Self {
        Self::new()
    }
}

impl Vad {
    /// A detector with the default [`VadConfig`], starting inactive.
    pub fn new() -> Self {
        Self::with_config(VadConfig::default())
    }

    /// A detector with `config`, starting inactive; frame counts of 0 are read as 1, and a
    /// threshold that is not a number as the default.
    pub fn with_config(config: VadConfig) -> Self {
        let dbfs =
            if config.threshold_dbfs.is_nan() { VadConfig::default().threshold_dbfs } else { config.threshold_dbfs };
        let config = VadConfig {
            threshold_dbfs: dbfs,
            start_frames: config.start_frames.max(1),
            stop_frames: config.stop_frames.max(1),
        };
        let amplitude = 32768.0 * 10f64.powf(f64::from(dbfs) / 20.0);
        Self { config, threshold_mean_square: amplitude * amplitude, active: false, run: 0 }
    }

    /// Takes one 20 ms frame and returns the state change it caused, if any. An empty frame is
    /// unvoiced.
    pub fn push(&mut self, pcm: &[i16]) -> Option<VadEvent> {
        let voiced = mean_square(pcm) > self.threshold_mean_square;
        if voiced == self.active {
            self.run = 0;
            return None;
        }
        self.run += 1;
        let needed = if self.active { self.config.stop_frames } else { self.config.start_frames };
        if self.run < needed {
            return None;
        }
        self.run = 0;
        self.active = !self.active;
        Some(if self.active { VadEvent::Start } else { VadEvent::Stop })
    }

    /// Whether speech is in progress.
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// Back to inactive, as for a new stream (no event).
    pub fn reset(&mut self) {
        self.active = false;
        self.run = 0;
    }

    /// The configuration in force.
    pub fn config(&self) -> VadConfig {
        self.config
    }
}

/// RMS level of `pcm` in dBFS (−∞ for silence or an empty slice); for diagnostics and tests.
pub fn level_dbfs(pcm: &[i16]) -> f64 {
    10.0 * (mean_square(pcm) / (32768.0 * 32768.0)).log10()
}

fn mean_square(pcm: &[i16]) -> f64 {
    if pcm.is_empty() {
        return 0.0;
    }
    // Each square is below 2^30 and a frame holds at most a few thousand samples: no overflow
    // for any slice shorter than 2^33 samples.
    let sum: u64 = pcm.iter().map(|&s| (i64::from(s) * i64::from(s)) as u64).sum();
    sum as f64 / pcm.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 20 ms frame at `rate` of a sine with RMS level `dbfs`.
    fn frame(rate: usize, dbfs: f64) -> Vec<i16> {
        let amp = 32768.0 * 10f64.powf(dbfs / 20.0) * std::f64::consts::SQRT_2;
        (0..rate / 50)
            .map(|i| (amp * (2.0 * std::f64::consts::PI * 300.0 * i as f64 / rate as f64).sin()) as i16)
            .collect()
    }

    /// Speech starts on the second loud frame and stops after 300 ms of quiet, at every rate.
    #[test]
    fn start_and_stop() {
        for rate in [8000, 16000, 24000, 48000] {
            let (loud, quiet) = (frame(rate, -20.0), frame(rate, -60.0));
            let mut vad = Vad::new();
            assert_eq!(vad.push(&quiet), None);
            assert_eq!(vad.push(&loud), None);
            assert!(!vad.is_active());
            assert_eq!(vad.push(&loud), Some(VadEvent::Start), "rate {rate}");
            assert!(vad.is_active());
            for _ in 0..14 {
                assert_eq!(vad.push(&quiet), None);
                assert!(vad.is_active());
            }
            assert_eq!(vad.push(&quiet), Some(VadEvent::Stop));
            assert!(!vad.is_active());
        }
    }

    /// A single loud frame (a click) does not start speech; a short pause does not stop it.
    #[test]
    fn hangover_and_debounce() {
        let (loud, quiet) = (frame(8000, -20.0), frame(8000, -70.0));
        let mut vad = Vad::new();
        for _ in 0..10 {
            assert_eq!(vad.push(&loud), None);
            assert_eq!(vad.push(&quiet), None);
        }
        assert!(!vad.is_active(), "alternating clicks never start speech");
        vad.push(&loud);
        assert_eq!(vad.push(&loud), Some(VadEvent::Start));
        for _ in 0..3 {
            for _ in 0..10 {
                assert_eq!(vad.push(&quiet), None);
            }
            assert_eq!(vad.push(&loud), None, "a 200 ms pause is within the hangover");
        }
        assert!(vad.is_active());
    }

    /// The threshold sits at −45 dBFS by default and is configurable.
    #[test]
    fn threshold() {
        let mut vad = Vad::new();
        let below = frame(16000, -47.0);
        let above = frame(16000, -43.0);
        assert!(level_dbfs(&below) < -45.0 && level_dbfs(&above) > -45.0);
        vad.push(&below);
        assert_eq!(vad.push(&below), None);
        vad.push(&above);
        assert_eq!(vad.push(&above), Some(VadEvent::Start));
        let mut strict = Vad::with_config(VadConfig { threshold_dbfs: -30.0, start_frames: 1, stop_frames: 1 });
        assert_eq!(strict.push(&above), None);
        assert_eq!(strict.push(&frame(16000, -20.0)), Some(VadEvent::Start));
        assert_eq!(strict.push(&above), Some(VadEvent::Stop));
    }

    /// Empty frames, full-scale frames, zero counts and a NaN threshold are all handled.
    #[test]
    fn degenerate_inputs() {
        let mut vad = Vad::with_config(VadConfig { threshold_dbfs: f32::NAN, start_frames: 0, stop_frames: 0 });
        assert_eq!(vad.config(), VadConfig { threshold_dbfs: -45.0, start_frames: 1, stop_frames: 1 });
        assert_eq!(vad.push(&[]), None);
        assert_eq!(vad.push(&[i16::MIN; 960]), Some(VadEvent::Start));
        assert_eq!(vad.push(&[]), Some(VadEvent::Stop));
        assert_eq!(level_dbfs(&[]), f64::NEG_INFINITY);
        assert!((level_dbfs(&[i16::MIN; 4]) - 0.0).abs() < 1e-9);
        vad.push(&[i16::MAX; 160]);
        vad.reset();
        assert!(!vad.is_active());
    }
}
