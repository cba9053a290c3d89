//! Fixed-ratio resampling of 20 ms mono 16-bit frames between 8, 16, 24 and 48 kHz, on rubato's
//! FFT resampler (`rubato::Fft`, both chunk sizes fixed).
//!
//! Why this type (measured by `relay-bench codec`, see BENCHMARKS.md): every ratio between these
//! rates is rational with small terms, so the synchronous FFT resampler gives exactly 20 ms out
//! per 20 ms in with no drift and no per-call size arithmetic, and it measured cheaper than the
//! sinc interpolator (4.4 µs up and 2.9 µs down per 20 ms for 8 ↔ 48 kHz, against 46 and 7 µs).
//! Each 20 ms frame is one FFT block: the anti-aliasing filter is then as long as a frame, flat
//! to 3.4 kHz at 8 kHz (round trip 8 → 48 → 8 kHz: 46 dB SNR), for a constant 10 ms of delay
//! (see [`Resampler::delay_samples`]). Shorter blocks cut the delay but rubato then lowers the
//! cutoff: two blocks lose 10 dB at 3.4 kHz, four lose 45 dB.
//!
//! Invariant: no allocation after construction, no state but the filter history, no panics:
//! frames of the wrong size are errors.

use rubato::audioadapter_buffers::direct::SequentialSlice;
use rubato::{Fft, FixedSync, Resampler as _};

use super::SampleRate;

/// FFT blocks per 20 ms frame: one, for a filter that keeps the whole telephony band.
const SUB_CHUNKS: usize = 1;

/// Why a frame could not be resampled; the frame is dropped and the caller counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ResampleError {
    /// The input or output slice is not exactly one 20 ms frame at its rate.
    #[error("expected a 20 ms frame of {expected} samples, got {actual}")]
    FrameSize {
        /// Samples in 20 ms at that side's rate.
        expected: usize,
        /// Samples given.
        actual: usize,
    },
    /// rubato refused to build or run the resampler (a bug: the rates are fixed and valid).
    #[error("resampler failure")]
    Internal,
}

/// A stateful resampler from one rate to another for consecutive 20 ms frames of one stream.
pub struct Resampler {
    from: SampleRate,
    to: SampleRate,
    /// `None` when `from == to`: frames are copied.
    inner: Option<Inner>,
}

struct Inner {
    fft: Fft<f32>,
    /// The input frame as floats in [-1, 1); sized once.
    input: Vec<f32>,
    /// rubato's output; sized once.
    output: Vec<f32>,
}

impl std::fmt::Debug for Resampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resampler").field("from", &self.from).field("to", &self.to).finish_non_exhaustive()
    }
}

impl Resampler {
    /// A resampler from `from` to `to`; the identity when they are equal.
    ///
    /// # Errors
    ///
    /// [`ResampleError::Internal`] if rubato refuses the rates (not expected for any pair).
    pub fn new(from: SampleRate, to: SampleRate) -> Result<Self, ResampleError> {
        let inner = if from == to {
            None
        } else {
            let (n_in, n_out) = (frame_len(from), frame_len(to));
            let fft = Fft::<f32>::new_custom(
                from.hz() as usize,
                to.hz() as usize,
                n_in,
                SUB_CHUNKS,
                1,
                rubato::WindowFunction::BlackmanHarris2,
                FixedSync::Input,
            )
            .map_err(|_| ResampleError::Internal)?;
            // Every 20 ms frame must map to exactly 20 ms out, call after call.
            if fft.input_frames_next() != n_in || fft.output_frames_next() != n_out {
                return Err(ResampleError::Internal);
            }
            Some(Inner { fft, input: vec![0.0; n_in], output: vec![0.0; n_out] })
        };
        Ok(Self { from, to, inner })
    }

    /// The input rate.
    pub fn from_rate(&self) -> SampleRate {
        self.from
    }

    /// The output rate.
    pub fn to_rate(&self) -> SampleRate {
        self.to
    }

    /// Samples per input frame (20 ms at the input rate).
    pub fn input_len(&self) -> usize {
        frame_len(self.from)
    }

    /// Samples per output frame (20 ms at the output rate).
    pub fn output_len(&self) -> usize {
        frame_len(self.to)
    }

    /// Constant latency in output samples: an impulse at input sample 0 peaks at this output
    /// sample (half an FFT block, 10 ms: 80 at 8 kHz, 480 at 48 kHz; 0 for the identity).
    pub fn delay_samples(&self) -> usize {
        self.inner.as_ref().map_or(0, |i| i.fft.output_delay())
    }

    /// Resamples one 20 ms `input` frame into `output` (20 ms at the output rate).
    ///
    /// # Errors
    ///
    /// [`ResampleError::FrameSize`] if either slice is the wrong length; nothing is written.
    pub fn process(&mut self, input: &[i16], output: &mut [i16]) -> Result<(), ResampleError> {
        let (n_in, n_out) = (self.input_len(), self.output_len());
        if input.len() != n_in {
            return Err(ResampleError::FrameSize { expected: n_in, actual: input.len() });
        }
        if output.len() != n_out {
            return Err(ResampleError::FrameSize { expected: n_out, actual: output.len() });
        }
        let Some(inner) = self.inner.as_mut() else {
            output.copy_from_slice(input);
            return Ok(());
        };
        for (f, &s) in inner.input.iter_mut().zip(input) {
            *f = f32::from(s) * (1.0 / 32768.0);
        }
        let adapter_in = SequentialSlice::new(&inner.input[..], 1, n_in).map_err(|_| ResampleError::Internal)?;
        let mut adapter_out =
            SequentialSlice::new_mut(&mut inner.output[..], 1, n_out).map_err(|_| ResampleError::Internal)?;
        let (used, written) =
            inner.fft.process_into_buffer(&adapter_in, &mut adapter_out, None).map_err(|_| ResampleError::Internal)?;
        if used != n_in || written != n_out {
            return Err(ResampleError::Internal);
        }
        for (s, &f) in output.iter_mut().zip(&inner.output) {
            // `as` saturates, so overshoot past full scale clips instead of wrapping.
            *s = (f * 32768.0).round() as i16;
        }
        Ok(())
    }

    /// Clears the filter history, as for a new stream.
    pub fn reset(&mut self) {
        if let Some(inner) = self.inner.as_mut() {
            inner.fft.reset();
        }
    }
}

fn frame_len(rate: SampleRate) -> usize {
    rate.hz() as usize / 50
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const RATES: [SampleRate; 4] = [SampleRate::Hz8000, SampleRate::Hz16000, SampleRate::Hz24000, SampleRate::Hz48000];

    fn sine(rate: SampleRate, freq: f64, frames: usize) -> Vec<i16> {
        let n = frame_len(rate) * frames;
        (0..n)
            .map(|i| (10000.0 * (2.0 * std::f64::consts::PI * freq * i as f64 / f64::from(rate.hz())).sin()) as i16)
            .collect()
    }

    /// Runs `x` through `r` frame by frame.
    fn run(r: &mut Resampler, x: &[i16]) -> Vec<i16> {
        let mut out = Vec::new();
        let mut frame = vec![0i16; r.output_len()];
        for chunk in x.chunks_exact(r.input_len()) {
            r.process(chunk, &mut frame).expect("process");
            out.extend_from_slice(&frame);
        }
        out
    }

    /// Every pair builds; output is 20 ms per 20 ms; a 1 kHz tone comes out as the same tone,
    /// delayed by `delay_samples`, with error well below the signal.
    #[test]
    fn all_pairs_preserve_a_tone() {
        for from in RATES {
            for to in RATES {
                let mut r = Resampler::new(from, to).expect("resampler");
                let x = sine(from, 1000.0, 20);
                let y = run(&mut r, &x);
                assert_eq!(y.len(), frame_len(to) * 20);
                let expected = sine(to, 1000.0, 20);
                let d = r.delay_samples();
                let expected_delay = if from == to { 0 } else { frame_len(to) / 2 };
                assert_eq!(d, expected_delay, "{from:?}→{to:?}: delay");
                // Skip the first 5 frames (filter warm-up), compare the delayed output.
                let start = frame_len(to) * 5;
                let (mut sig, mut err) = (0.0, 0.0);
                for i in start..y.len() {
                    let e = f64::from(expected[i - d]);
                    sig += e * e;
                    err += (f64::from(y[i]) - e).powi(2);
                }
                let snr = 10.0 * (sig / err.max(1.0)).log10();
                assert!(snr > 30.0, "{from:?}→{to:?}: SNR {snr:.1} dB");
            }
        }
    }

    /// The telephony band's top (3.4 kHz) passes within 1 dB up to 48 kHz and back down.
    #[test]
    fn passband_reaches_3400_hz() {
        let rms = |x: &[i16]| (x.iter().map(|&s| f64::from(s).powi(2)).sum::<f64>() / x.len() as f64).sqrt();
        let mut up = Resampler::new(SampleRate::Hz8000, SampleRate::Hz48000).expect("resampler");
        let mut down = Resampler::new(SampleRate::Hz48000, SampleRate::Hz8000).expect("resampler");
        let x = sine(SampleRate::Hz8000, 3400.0, 20);
        let wide = run(&mut up, &x);
        let back = run(&mut down, &wide);
        for (y, n) in [(&wide, 960), (&back, 160)] {
            let gain_db = 20.0 * (rms(&y[n * 5..]) / rms(&x[800..])).log10();
            assert!(gain_db.abs() < 1.0, "3.4 kHz gain {gain_db:.2} dB");
        }
    }

    /// The identity copies exactly, with no delay.
    #[test]
    fn identity() {
        let mut r = Resampler::new(SampleRate::Hz16000, SampleRate::Hz16000).expect("resampler");
        assert_eq!(r.delay_samples(), 0);
        let x = sine(SampleRate::Hz16000, 440.0, 3);
        assert_eq!(run(&mut r, &x), x);
    }

    /// Downsampling removes content above the new Nyquist frequency instead of aliasing it.
    #[test]
    fn downsampling_filters_alias() {
        let mut r = Resampler::new(SampleRate::Hz48000, SampleRate::Hz8000).expect("resampler");
        // 6 kHz would alias to 2 kHz at 8 kHz.
        let y = run(&mut r, &sine(SampleRate::Hz48000, 6000.0, 20));
        let tail = &y[160 * 5..];
        let rms = (tail.iter().map(|&s| f64::from(s).powi(2)).sum::<f64>() / tail.len() as f64).sqrt();
        assert!(rms < 10000.0 / 100.0, "alias at {rms:.0} RMS, more than -40 dB");
    }

    /// Wrong frame sizes are errors and write nothing.
    #[test]
    fn frame_sizes() {
        let mut r = Resampler::new(SampleRate::Hz8000, SampleRate::Hz48000).expect("resampler");
        let mut out = vec![7i16; 960];
        assert_eq!(r.process(&[0; 159], &mut out), Err(ResampleError::FrameSize { expected: 160, actual: 159 }));
        assert_eq!(r.process(&[0; 160], &mut out[..10]), Err(ResampleError::FrameSize { expected: 960, actual: 10 }));
        assert!(out.iter().all(|&s| s == 7));
        let mut id = Resampler::new(SampleRate::Hz8000, SampleRate::Hz8000).expect("identity");
        assert!(id.process(&[0; 160], &mut [0; 161]).is_err());
    }

    /// After `reset` the resampler behaves as new.
    #[test]
    fn reset_forgets_history() {
        let mut r = Resampler::new(SampleRate::Hz16000, SampleRate::Hz24000).expect("resampler");
        let loud = sine(SampleRate::Hz16000, 500.0, 1);
        let mut out = vec![0i16; 480];
        r.process(&loud, &mut out).expect("process");
        r.reset();
        r.process(&[0; 320], &mut out).expect("process");
        assert!(out.iter().all(|&s| s == 0), "history leaked past reset");
    }

    proptest! {
        /// Full-scale noise never panics, and output length always matches the rate ratio.
        #[test]
        fn arbitrary_input(from in 0usize..4, to in 0usize..4, seed in proptest::collection::vec(any::<i16>(), 960)) {
            let (from, to) = (RATES[from], RATES[to]);
            let mut r = Resampler::new(from, to).expect("resampler");
            let mut out = vec![0i16; frame_len(to)];
            for _ in 0..3 {
                prop_assert!(r.process(&seed[..frame_len(from)], &mut out).is_ok());
            }
            prop_assert_eq!(out.len() * from.hz() as usize, frame_len(from) * to.hz() as usize);
        }
    }
}
