//! The `codec` scenario: single-threaded CPU cost per 20 ms frame of the media building blocks a
//! transcoded call runs (μ-law, Opus at each setting, resampling) and a quality figure for each,
//! so `OpusSettings::default()` and the μ-law ⇄ Opus path are chosen from numbers.
//!
//! Quality is measured on a speech-like test signal (a voiced source with a wandering pitch
//! through moving vowel formants, syllable envelope and pauses, band-limited to 3.6 kHz and
//! μ-law-quantised as a caller's audio is): SNR in dB of the 8 kHz output against the 8 kHz
//! input after aligning for the path's delay by cross-correlation and fitting the gain, so it
//! scores waveform fidelity (perceptual codecs score lower on it than they sound, but the
//! comparison between settings is fair). A 440 Hz tone's recovered dominant frequency checks
//! that nothing shifts pitch.
//!
//! Invariant: bounded: `--frames` frames per measurement (default 3000, one minute of audio).

use std::time::Instant;

use anyhow::{bail, Context};
use relay_engine::media::opus::{OpusDecoder, OpusEncoder, OpusSettings};
use relay_engine::media::resample::Resampler;
use relay_engine::media::{g711, SampleRate};
use rubato::audioadapter_buffers::direct::SequentialSlice;
use serde_json::{json, Value};

/// What the scenario measures.
#[derive(Debug, Clone)]
pub struct CodecOptions {
    /// 20 ms frames per timing run (after 50 warm-up frames).
    pub frames: usize,
    /// Where to write the rows as JSON.
    pub json: Option<String>,
}

/// Nanosecond timings of one operation over many calls.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timing {
    /// Median, ns.
    pub median_ns: f64,
    /// 99th percentile, ns.
    pub p99_ns: f64,
    /// Mean, ns.
    pub mean_ns: f64,
}

impl Timing {
    fn of(mut ns: Vec<u64>) -> Self {
        if ns.is_empty() {
            return Self::default();
        }
        ns.sort_unstable();
        let at = |q: f64| ns[((ns.len() - 1) as f64 * q).round() as usize] as f64;
        Self { median_ns: at(0.5), p99_ns: at(0.99), mean_ns: ns.iter().sum::<u64>() as f64 / ns.len() as f64 }
    }

    fn json(&self) -> Value {
        json!({ "median_ns": self.median_ns, "p99_ns": self.p99_ns, "mean_ns": self.mean_ns })
    }
}

/// Runs the scenario: prints tables, writes JSON if asked.
pub fn run(opts: &CodecOptions) -> anyhow::Result<()> {
    if opts.frames < 200 {
        bail!("--frames must be at least 200 (quality figures skip the first 50 frames)");
    }
    let frames = opts.frames;
    println!("codec scenario: {frames} frames of 20 ms per timing run, single thread; {}", machine());
    let speech = test_input(frames + 50);
    let mut doc = serde_json::Map::new();

    // μ-law.
    let codes: Vec<u8> = speech.iter().map(|&s| g711::encode(s)).collect();
    let mut pcm = [0i16; 160];
    let mut out = [0u8; 160];
    let dec = time_frames(frames, |i| {
        g711::decode_into(&codes[(i % frames) * 160..][..160], &mut pcm);
    });
    let enc = time_frames(frames, |i| {
        g711::encode_into(&speech[(i % frames) * 160..][..160], &mut out);
    });
    println!("\nG.711 per 20 ms frame (160 samples):");
    println!("  μ-law → PCM  median {:>7.0} ns  p99 {:>7.0} ns", dec.median_ns, dec.p99_ns);
    println!("  PCM → μ-law  median {:>7.0} ns  p99 {:>7.0} ns", enc.median_ns, enc.p99_ns);
    doc.insert("ulaw_to_pcm".into(), dec.json());
    doc.insert("pcm_to_ulaw".into(), enc.json());

    // Resamplers: which rubato type.
    println!("\nResamplers 8 ↔ 48 kHz per 20 ms frame (round-trip SNR of the speech signal, 8→48→8):");
    println!(
        "  {:<34} {:>9} {:>9} {:>9} {:>9} {:>8} {:>9} {:>9}",
        "resampler", "up med", "up p99", "down med", "down p99", "delay", "RT SNR dB", "3.4k dB"
    );
    let mut rs_rows = Vec::new();
    for kind in ResamplerKind::ALL {
        let row = measure_resampler(kind, &speech)?;
        println!(
            "  {:<34} {:>9.0} {:>9.0} {:>9.0} {:>9.0} {:>5.1} ms {:>9.1} {:>9.2}",
            kind.name(),
            row.up.median_ns,
            row.up.p99_ns,
            row.down.median_ns,
            row.down.p99_ns,
            row.delay_ms,
            row.snr_db,
            row.gain_3400_db
        );
        rs_rows.push(json!({
            "resampler": kind.name(), "up": row.up.json(), "down": row.down.json(), "delay_ms": row.delay_ms,
            "round_trip_snr_db": row.snr_db, "gain_3400hz_db": row.gain_3400_db,
        }));
    }
    doc.insert("resamplers".into(), Value::Array(rs_rows));

    // Opus settings × paths.
    println!("\nOpus per 20 ms frame, μ-law speech in, 8 kHz out (ns; pair = encode + decode path):");
    println!(
        "  {:<22} {:<10} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>6} {:>7} {:>8} {:>8}",
        "setting",
        "path",
        "enc med",
        "enc p99",
        "dec med",
        "dec p99",
        "pair med",
        "pair p99",
        "kbps",
        "SNR dB",
        "SNR 5%",
        "440 Hz→"
    );
    let mut opus_rows = Vec::new();
    for (label, settings) in opus_settings() {
        for path in [Path::Narrow, Path::Resampled, Path::WideToNarrow] {
            let r = measure_opus(settings, path, &speech, frames)?;
            println!(
                "  {:<22} {:<10} {:>8.0} {:>8.0} {:>8.0} {:>8.0} {:>8.0} {:>8.0} {:>6.1} {:>7.2} {:>8.2} {:>8.1}",
                label,
                path.name(),
                r.encode.median_ns,
                r.encode.p99_ns,
                r.decode.median_ns,
                r.decode.p99_ns,
                r.encode.median_ns + r.decode.median_ns,
                r.encode.p99_ns + r.decode.p99_ns,
                r.kbps,
                r.snr_db,
                r.snr_loss_db,
                r.tone_hz
            );
            opus_rows.push(json!({
                "setting": label, "complexity": settings.complexity, "fec": settings.fec, "dtx": settings.dtx,
                "packet_loss_pct": settings.packet_loss_pct, "bitrate_bps": settings.bitrate_bps, "path": path.name(),
                "encode": r.encode.json(), "decode": r.decode.json(), "kbps": r.kbps,
                "snr_db": r.snr_db, "snr_5pct_loss_db": r.snr_loss_db, "tone_440_recovered_hz": r.tone_hz,
                "conceal": r.conceal.json(), "decode_fec": r.fec.json(),
            }));
            if label == "default" && path == Path::Narrow {
                println!(
                    "  {:<22} {:<10} conceal median {:.0} ns p99 {:.0} ns; decode_fec median {:.0} ns p99 {:.0} ns",
                    "", "", r.conceal.median_ns, r.conceal.p99_ns, r.fec.median_ns, r.fec.p99_ns
                );
            }
        }
    }
    doc.insert("opus".into(), Value::Array(opus_rows));
    doc.insert("frames".into(), json!(frames));
    doc.insert("machine".into(), json!(machine()));
    println!(
        "\nBudget: a transcoded call spends one decode path and one encode path per 20 ms frame pair; \
         target ≤ 80 µs (0.4 % of a core)."
    );
    if let Some(path) = &opts.json {
        std::fs::write(path, serde_json::to_vec_pretty(&Value::Object(doc))?)
            .with_context(|| format!("write {path}"))?;
    }
    Ok(())
}

/// The settings compared: complexities at libopus's automatic bitrate, then FEC, DTX and
/// explicit bitrates (libopus adds FEC only above a complexity- and loss-dependent rate).
fn opus_settings() -> Vec<(String, OpusSettings)> {
    let s = |complexity, fec, dtx, bitrate_bps| OpusSettings {
        complexity,
        fec,
        dtx,
        packet_loss_pct: if fec { 10 } else { 0 },
        bitrate_bps,
    };
    let mut v = vec![("default".to_owned(), OpusSettings::default())];
    for c in [0u8, 1, 3, 5, 8, 10] {
        v.push((format!("c{c} fec auto"), s(c, true, false, None)));
    }
    v.push(("c1 fec-off auto".to_owned(), s(1, false, false, None)));
    v.push(("c1 fec dtx auto".to_owned(), s(1, true, true, None)));
    for kbps in [16u32, 24, 32] {
        v.push((format!("c1 fec {kbps}k"), s(1, true, false, Some(kbps * 1000))));
        v.push((format!("c1 fec-off {kbps}k"), s(1, false, false, Some(kbps * 1000))));
    }
    v.push(("c0 fec 24k".to_owned(), s(0, true, false, Some(24_000))));
    v.push(("c3 fec 24k".to_owned(), s(3, true, false, Some(24_000))));
    v.push(("c1 fec dtx 24k".to_owned(), s(1, true, true, Some(24_000))));
    v
}

/// How μ-law-rate audio reaches Opus and comes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    /// Encode 8 kHz input directly; decode to 8 kHz directly.
    Narrow,
    /// rubato 8 → 48 kHz then encode at 48 kHz; decode at 48 kHz then rubato 48 → 8 kHz.
    Resampled,
    /// As a browser's stream reaches us: encoded at 48 kHz (after rubato 8 → 48 kHz, as above),
    /// decoded straight to 8 kHz by libopus. Encode figures repeat `Resampled`'s.
    WideToNarrow,
}

impl Path {
    fn name(self) -> &'static str {
        match self {
            Self::Narrow => "8k",
            Self::Resampled => "48k+rs",
            Self::WideToNarrow => "48k→dec8k",
        }
    }
}

struct OpusResult {
    encode: Timing,
    decode: Timing,
    conceal: Timing,
    fec: Timing,
    kbps: f64,
    snr_db: f64,
    snr_loss_db: f64,
    tone_hz: f64,
}

fn measure_opus(settings: OpusSettings, path: Path, speech: &[i16], frames: usize) -> anyhow::Result<OpusResult> {
    let total = speech.len() / 160;
    let enc_rate = if path == Path::Narrow { 8000 } else { 48000 };
    // Encode every frame once for the packets, timing each call (the first 50 are warm-up).
    let mut encoder = OpusEncoder::new(enc_rate, &settings)?;
    let mut up = Resampler::new(SampleRate::Hz8000, SampleRate::Hz48000)?;
    let mut wide = vec![0i16; 960];
    let mut packets = Vec::with_capacity(total);
    let mut enc_ns = Vec::with_capacity(total);
    for f in 0..total {
        let frame = &speech[f * 160..][..160];
        let t = Instant::now();
        let p = match path {
            Path::Narrow => encoder.encode(frame)?,
            Path::Resampled | Path::WideToNarrow => {
                up.process(frame, &mut wide)?;
                encoder.encode(&wide)?
            }
        };
        let ns = t.elapsed().as_nanos() as u64;
        if f >= 50 {
            enc_ns.push(ns);
        }
        packets.push(p);
    }
    let bytes: usize = packets[50..].iter().map(|p| p.len()).sum();
    let kbps = bytes as f64 * 8.0 / ((total - 50) as f64 * 0.02) / 1000.0;

    // Decode them all, timing each.
    let (decoded, dec_ns) = decode_path(&packets, path, |_| false)?;
    let snr_db = aligned_snr(&speech[50 * 160..], &decoded[50 * 160..]);
    // 5 % loss: every 20th packet lost, recovered by FEC from the next one when it is on.
    let (lossy, _) = decode_path(&packets, path, |f| f % 20 == 10)?;
    let snr_loss_db = aligned_snr(&speech[50 * 160..], &lossy[50 * 160..]);

    // Concealment and FEC decode cost at the path's decode rate.
    let dec_rate = if path == Path::Resampled { 48000 } else { 8000 };
    let mut decoder = OpusDecoder::new(dec_rate)?;
    let mut out = vec![0i16; dec_rate as usize / 50];
    let mut conceal_ns = Vec::new();
    let mut fec_ns = Vec::new();
    for f in 0..frames.min(total - 1) {
        decoder.decode(&packets[f], &mut out)?;
        let t = Instant::now();
        decoder.conceal(&mut out)?;
        conceal_ns.push(t.elapsed().as_nanos() as u64);
        let t = Instant::now();
        decoder.decode_fec(&packets[f + 1], &mut out)?;
        fec_ns.push(t.elapsed().as_nanos() as u64);
    }

    // A 440 Hz tone through the same path.
    let tone: Vec<i16> = (0..160 * 100)
        .map(|i| {
            g711::decode(g711::encode((8000.0 * (2.0 * std::f64::consts::PI * 440.0 * i as f64 / 8000.0).sin()) as i16))
        })
        .collect();
    let mut encoder = OpusEncoder::new(enc_rate, &settings)?;
    let mut up = Resampler::new(SampleRate::Hz8000, SampleRate::Hz48000)?;
    let mut tone_packets = Vec::new();
    for frame in tone.chunks_exact(160) {
        tone_packets.push(match path {
            Path::Narrow => encoder.encode(frame)?,
            Path::Resampled | Path::WideToNarrow => {
                up.process(frame, &mut wide)?;
                encoder.encode(&wide)?
            }
        });
    }
    let (tone_out, _) = decode_path(&tone_packets, path, |_| false)?;
    let tone_hz = dominant_hz(&tone_out[tone_out.len() - 4000..], 8000.0, 50.0, 3950.0);

    Ok(OpusResult {
        encode: Timing::of(enc_ns),
        decode: Timing::of(dec_ns),
        conceal: Timing::of(conceal_ns),
        fec: Timing::of(fec_ns),
        kbps,
        snr_db,
        snr_loss_db,
        tone_hz,
    })
}

/// Decodes `packets` to 8 kHz along `path`, treating frame `f` as lost when `lost(f)` (recovered
/// from the next packet's FEC); returns the audio and the per-frame decode times (after warm-up).
fn decode_path(
    packets: &[bytes::Bytes],
    path: Path,
    lost: impl Fn(usize) -> bool,
) -> anyhow::Result<(Vec<i16>, Vec<u64>)> {
    let dec_rate = if path == Path::Resampled { 48000 } else { 8000 };
    let mut decoder = OpusDecoder::new(dec_rate)?;
    let mut down = Resampler::new(SampleRate::Hz48000, SampleRate::Hz8000)?;
    let mut buf = vec![0i16; dec_rate as usize / 50];
    let mut narrow = [0i16; 160];
    let mut audio = Vec::with_capacity(packets.len() * 160);
    let mut times = Vec::with_capacity(packets.len());
    for (f, p) in packets.iter().enumerate() {
        let t = Instant::now();
        if lost(f) && f + 1 < packets.len() {
            decoder.decode_fec(&packets[f + 1], &mut buf)?;
        } else {
            decoder.decode(p, &mut buf)?;
        }
        match path {
            Path::Narrow | Path::WideToNarrow => narrow.copy_from_slice(&buf),
            Path::Resampled => down.process(&buf, &mut narrow)?,
        }
        let ns = t.elapsed().as_nanos() as u64;
        if f >= 50 {
            times.push(ns);
        }
        audio.extend_from_slice(&narrow);
    }
    Ok((audio, times))
}

/// rubato configurations compared for the resampler module.
#[derive(Debug, Clone, Copy)]
enum ResamplerKind {
    /// `relay_engine::media::resample::Resampler` (Fft, 1 sub-chunk).
    Engine,
    /// rubato `Fft`, fixed input, this many sub-chunks per 20 ms.
    Fft(usize),
    /// rubato `Async` sinc, this filter length.
    Sinc(usize),
    /// rubato `Async` cubic polynomial (no anti-aliasing filter).
    Cubic,
}

impl ResamplerKind {
    const ALL: [Self; 7] =
        [Self::Engine, Self::Fft(1), Self::Fft(2), Self::Fft(4), Self::Sinc(64), Self::Sinc(128), Self::Cubic];

    fn name(self) -> String {
        match self {
            Self::Engine => "engine Resampler (Fft, 1 sub-chunk)".to_owned(),
            Self::Fft(n) => format!("rubato Fft, {n} sub-chunk(s)"),
            Self::Sinc(n) => format!("rubato Async sinc {n}"),
            Self::Cubic => "rubato Async cubic".to_owned(),
        }
    }

    fn build(self, from: usize, to: usize) -> anyhow::Result<Box<dyn rubato::Resampler<f32>>> {
        let chunk = from / 50;
        Ok(match self {
            Self::Engine => bail!("the engine resampler is not a rubato trait object"),
            Self::Fft(sub) => Box::new(rubato::Fft::<f32>::new_custom(
                from,
                to,
                chunk,
                sub,
                1,
                rubato::WindowFunction::BlackmanHarris2,
                rubato::FixedSync::Input,
            )?),
            Self::Sinc(len) => Box::new(rubato::Async::<f32>::new_sinc(
                to as f64 / from as f64,
                1.0,
                &rubato::SincInterpolationParameters::new(len, rubato::WindowFunction::BlackmanHarris2),
                chunk,
                1,
                rubato::FixedAsync::Input,
            )?),
            Self::Cubic => Box::new(rubato::Async::<f32>::new_poly(
                to as f64 / from as f64,
                1.0,
                rubato::PolynomialDegree::Cubic,
                chunk,
                1,
                rubato::FixedAsync::Input,
            )?),
        })
    }
}

struct ResamplerRow {
    up: Timing,
    down: Timing,
    delay_ms: f64,
    snr_db: f64,
    gain_3400_db: f64,
}

/// One direction of a resampler under test, frame by frame, i16 in and out.
enum Stage {
    Engine(Box<Resampler>),
    Rubato { r: Box<dyn rubato::Resampler<f32>>, input: Vec<f32>, output: Vec<f32> },
}

impl Stage {
    fn new(kind: ResamplerKind, from: SampleRate, to: SampleRate) -> anyhow::Result<Self> {
        Ok(match kind {
            ResamplerKind::Engine => Self::Engine(Box::new(Resampler::new(from, to)?)),
            other => {
                let r = other.build(from.hz() as usize, to.hz() as usize)?;
                let output = vec![0.0; r.output_frames_max()];
                Self::Rubato { r, input: vec![0.0; from.hz() as usize / 50], output }
            }
        })
    }

    /// Resamples one frame, appending whatever comes out to `out`.
    fn process(&mut self, frame: &[i16], out: &mut Vec<i16>, scratch: &mut [i16]) -> anyhow::Result<()> {
        match self {
            Self::Engine(r) => {
                r.process(frame, scratch)?;
                out.extend_from_slice(scratch);
            }
            Self::Rubato { r, input, output } => {
                for (f, &s) in input.iter_mut().zip(frame) {
                    *f = f32::from(s) / 32768.0;
                }
                let n_out = output.len();
                let a_in = SequentialSlice::new(&input[..], 1, input.len())?;
                let mut a_out = SequentialSlice::new_mut(&mut output[..], 1, n_out)?;
                let (_, written) = r.process_into_buffer(&a_in, &mut a_out, None)?;
                out.extend(output[..written].iter().map(|&f| (f * 32768.0).round() as i16));
            }
        }
        Ok(())
    }

    fn delay(&self) -> usize {
        match self {
            Self::Engine(r) => r.delay_samples(),
            Self::Rubato { r, .. } => r.output_delay(),
        }
    }
}

fn measure_resampler(kind: ResamplerKind, speech: &[i16]) -> anyhow::Result<ResamplerRow> {
    let mut up = Stage::new(kind, SampleRate::Hz8000, SampleRate::Hz48000)?;
    let mut down = Stage::new(kind, SampleRate::Hz48000, SampleRate::Hz8000)?;
    let delay_ms = up.delay() as f64 / 48.0 + down.delay() as f64 / 8.0;
    let mut wide = Vec::with_capacity(speech.len() * 6);
    let mut scratch_wide = vec![0i16; 960];
    let mut up_ns = Vec::new();
    for (f, frame) in speech.chunks_exact(160).enumerate() {
        let t = Instant::now();
        up.process(frame, &mut wide, &mut scratch_wide)?;
        if f >= 50 {
            up_ns.push(t.elapsed().as_nanos() as u64);
        }
    }
    let mut narrow = Vec::with_capacity(speech.len());
    let mut scratch_narrow = vec![0i16; 160];
    let mut down_ns = Vec::new();
    for (f, frame) in wide.chunks_exact(960).enumerate() {
        let t = Instant::now();
        down.process(frame, &mut narrow, &mut scratch_narrow)?;
        if f >= 50 {
            down_ns.push(t.elapsed().as_nanos() as u64);
        }
    }
    let snr_db = aligned_snr(&speech[50 * 160..], narrow.get(50 * 160..).unwrap_or(&[]));
    // Gain at 3.4 kHz (the top of the telephony band) through 8 → 48 kHz.
    let tone: Vec<i16> = (0..160 * 50)
        .map(|i| (10000.0 * (2.0 * std::f64::consts::PI * 3400.0 * i as f64 / 8000.0).sin()) as i16)
        .collect();
    let mut up = Stage::new(kind, SampleRate::Hz8000, SampleRate::Hz48000)?;
    let mut tone_wide = Vec::new();
    for frame in tone.chunks_exact(160) {
        up.process(frame, &mut tone_wide, &mut scratch_wide)?;
    }
    let tail = &tone_wide[tone_wide.len() / 2..];
    let rms = (tail.iter().map(|&s| f64::from(s).powi(2)).sum::<f64>() / tail.len().max(1) as f64).sqrt();
    let gain_3400_db = 20.0 * (rms / (10000.0 / std::f64::consts::SQRT_2)).log10();
    Ok(ResamplerRow { up: Timing::of(up_ns), down: Timing::of(down_ns), delay_ms, snr_db, gain_3400_db })
}

/// Times `f(i)` for `frames` calls after 50 warm-up calls.
fn time_frames(frames: usize, mut f: impl FnMut(usize)) -> Timing {
    for i in 0..50 {
        f(i);
    }
    let mut ns = Vec::with_capacity(frames);
    for i in 0..frames {
        let t = Instant::now();
        f(i);
        ns.push(t.elapsed().as_nanos() as u64);
    }
    Timing::of(ns)
}

/// `frames` frames of the speech-like signal at 8 kHz, through μ-law as a caller's audio is.
pub fn test_input(frames: usize) -> Vec<i16> {
    speech_like(frames * 160, 8000.0).into_iter().map(|s| g711::decode(g711::encode(s))).collect()
}

/// A speech-like signal: a voiced source (harmonics of a pitch wandering over 100–200 Hz, with a
/// −6 dB/octave tilt) shaped by three formants gliding between the vowels /a/, /i/ and /u/, a
/// syllable envelope at ~4 Hz, a 0.5 s pause every 2.5 s, and faint noise; harmonics stop below
/// 3.6 kHz, so it is telephony-band. Deterministic.
pub fn speech_like(n: usize, rate: f64) -> Vec<i16> {
    // (F1, F2, F3) in Hz for /a/, /i/, /u/.
    const VOWELS: [[f64; 3]; 3] = [[730.0, 1090.0, 2440.0], [270.0, 2290.0, 3010.0], [300.0, 870.0, 2240.0]];
    const BANDWIDTHS: [f64; 3] = [90.0, 110.0, 170.0];
    let tau = std::f64::consts::TAU;
    let mut phase = 0.0f64;
    let mut noise = 0x2545_f491_u32;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let t = i as f64 / rate;
        let f0 = 150.0 + 35.0 * (tau * 0.45 * t).sin() + 12.0 * (tau * 2.3 * t).sin();
        phase = (phase + tau * f0 / rate) % (tau * 1000.0);
        // Vowel position: glides through /a/ → /i/ → /u/ → /a/ every 1.2 s.
        let v = (t / 0.4) % 3.0;
        let (a, b, w) = (v.floor() as usize % 3, (v.floor() as usize + 1) % 3, v.fract());
        let formants: [f64; 3] = std::array::from_fn(|k| VOWELS[a][k] * (1.0 - w) + VOWELS[b][k] * w);
        let mut x = 0.0;
        let mut k = 1.0;
        while k * f0 < 3600.0 {
            let f = k * f0;
            let resonance: f64 =
                formants.iter().zip(BANDWIDTHS).map(|(&fc, bw)| 1.0 / (1.0 + ((f - fc) / bw).powi(2))).sum::<f64>()
                    + 0.05;
            x += resonance / k * (k * phase).sin();
            k += 1.0;
        }
        let syllable = 0.25 + 0.75 * (0.5 - 0.5 * (tau * 4.0 * t).cos());
        let gate = if t % 2.5 < 2.0 { 1.0 } else { 0.0 };
        noise = noise.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        let n = (f64::from(noise >> 16) / 65536.0 - 0.5) * 20.0;
        out.push((x * syllable * gate * 3500.0 + n).clamp(-32768.0, 32767.0) as i16);
    }
    out
}

/// SNR in dB of `y` against `x` after shifting `y` by the lag (0 to 50 ms at 8 kHz) with the best
/// normalised cross-correlation and scaling it by the least-squares gain.
pub fn aligned_snr(x: &[i16], y: &[i16]) -> f64 {
    const MAX_LAG: usize = 400;
    let n = x.len().min(y.len()).saturating_sub(MAX_LAG);
    if n == 0 {
        return f64::NAN;
    }
    let xf: Vec<f64> = x[..n].iter().map(|&s| f64::from(s)).collect();
    let yf: Vec<f64> = y.iter().map(|&s| f64::from(s)).collect();
    let (mut best_lag, mut best) = (0, f64::MIN);
    for lag in 0..=MAX_LAG {
        let seg = &yf[lag..lag + n];
        let xy: f64 = xf.iter().zip(seg).map(|(a, b)| a * b).sum();
        let yy: f64 = seg.iter().map(|b| b * b).sum();
        let score = xy / yy.max(1.0).sqrt();
        if score > best {
            best = score;
            best_lag = lag;
        }
    }
    let seg = &yf[best_lag..best_lag + n];
    let xy: f64 = xf.iter().zip(seg).map(|(a, b)| a * b).sum();
    let yy: f64 = seg.iter().map(|b| b * b).sum::<f64>().max(1.0);
    let g = xy / yy;
    let sig: f64 = xf.iter().map(|a| a * a).sum();
    let err: f64 = xf.iter().zip(seg).map(|(a, b)| (a - g * b).powi(2)).sum::<f64>().max(1e-9);
    10.0 * (sig / err).log10()
}

/// Frequency in Hz (1 Hz steps from `lo` to `hi`) of the largest Hann-windowed DTFT magnitude.
pub fn dominant_hz(x: &[i16], rate: f64, lo: f64, hi: f64) -> f64 {
    let n = x.len();
    let w: Vec<f64> = x
        .iter()
        .enumerate()
        .map(|(i, &s)| f64::from(s) * (0.5 - 0.5 * (std::f64::consts::TAU * i as f64 / n as f64).cos()))
        .collect();
    let (mut best_f, mut best) = (lo, -1.0);
    let mut f = lo;
    while f <= hi {
        let step = std::f64::consts::TAU * f / rate;
        let (mut re, mut im) = (0.0, 0.0);
        for (i, v) in w.iter().enumerate() {
            let a = step * i as f64;
            re += v * a.cos();
            im -= v * a.sin();
        }
        let m = re * re + im * im;
        if m > best {
            best = m;
            best_f = f;
        }
        f += 1.0;
    }
    best_f
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    format!("{model}, {cpus} vCPU")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The alignment finds a pure delay and scores an exact copy as near-infinite SNR, and noise
    /// as about 0 dB.
    #[test]
    fn snr_alignment() {
        let x = speech_like(16000, 8000.0);
        let mut y = vec![0i16; 37];
        y.extend_from_slice(&x);
        assert!(aligned_snr(&x, &y) > 60.0);
        let halved: Vec<i16> = y.iter().map(|&s| s / 2).collect();
        assert!(aligned_snr(&x, &halved) > 30.0, "gain is fitted");
        let other = speech_like(20000, 8000.0)[3000..].to_vec();
        assert!(aligned_snr(&x, &other) < 6.0);
    }

    /// A 440 Hz tone is found at 440 Hz.
    #[test]
    fn dominant_frequency() {
        let x: Vec<i16> = (0..4000)
            .map(|i| (9000.0 * (std::f64::consts::TAU * 440.0 * f64::from(i) / 8000.0).sin()) as i16)
            .collect();
        assert!((dominant_hz(&x, 8000.0, 50.0, 3950.0) - 440.0).abs() <= 1.0);
    }
}
