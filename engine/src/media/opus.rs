//! Opus for WebRTC legs: a mono VoIP encoder over libopus (`audiopus`) making 20 ms packets, and a
//! decoder taking packets of any duration (2.5 to 120 ms, RFC 7587), with packet-loss concealment
//! and in-band FEC recovery sized to the gap.
//!
//! On the wire an Opus stream always runs at the 48 kHz RTP clock (RFC 7587), whatever rate the
//! codec works at inside: an [`OpusEncoder`] fed 8 kHz PCM still produces a valid 48 kHz-clock
//! stream (its packets simply say narrowband), and an [`OpusDecoder`] can output 8 kHz directly
//! from any Opus packet, so a μ-law ⇄ Opus leg needs no separate resampler.
//!
//! Invariant: no I/O, no clock; every buffer is sized at construction (a packet is at most
//! [`MAX_PACKET_BYTES`] per frame, [`MAX_PACKET_SAMPLES`] long); malformed packets and room too
//! small for a packet are errors, never panics.

use audiopus::coder::{Decoder, Encoder};
use audiopus::{Application, Channels, Signal};
use bytes::Bytes;

/// The largest Opus packet (RFC 6716 §3.2.1: 1275 bytes per 20 ms frame); the encoder's output
/// buffer has exactly this size.
pub const MAX_PACKET_BYTES: usize = 1275;

/// Samples of one 20 ms frame at the 48 kHz RTP clock: the RTP timestamp step per packet Relay
/// sends.
pub const RTP_SAMPLES_PER_FRAME: u32 = 960;

/// The longest Opus packet, 120 ms, in samples at 48 kHz (RFC 6716 §3.2.5).
pub const MAX_PACKET_SAMPLES: u32 = 5760;

/// How the encoder trades CPU, bandwidth and loss resilience.
///
/// The default comes from `relay-bench codec` (AMD EPYC, one core): complexity 1, FEC on with a
/// 10 % loss hint, DTX off, 24 kbps. At 8 kHz input that costs 38 µs to encode and 7 µs to
/// decode per 20 ms (median), within 0.25 dB SNR of complexity 8–10 (110 µs) on telephony-band
/// speech. 24 kbps is the lowest rate at which libopus (1.3) actually adds FEC to a narrowband
/// stream at complexity 1: with it 5 % loss costs 0.06 dB of SNR, without it 1 dB. Complexity 0
/// is 8 µs cheaper but pushes the FEC threshold above 24 kbps. DTX saves bandwidth only and
/// leaves receivers to tell silence from loss, so it is off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpusSettings {
    /// Encoder complexity, 0 (cheapest) to 10 (libopus's best); larger values are refused.
    pub complexity: u8,
    /// In-band forward error correction: each packet also carries a coarse copy of the previous
    /// frame, which [`OpusDecoder::decode_fec`] recovers when that packet was lost.
    pub fec: bool,
    /// Discontinuous transmission: during silence the encoder emits 1–2 byte packets (see
    /// [`is_dtx_packet`]) that need not be sent, one real packet every 400 ms or so.
    pub dtx: bool,
    /// Expected packet loss, 0 to 100 %; with FEC on, higher values spend more bits on it.
    pub packet_loss_pct: u8,
    /// Target bitrate in bits per second (6000 to 510000), or `None` for libopus's automatic
    /// choice (about 11 kbps for 8 kHz input, 51 kbps for 48 kHz). libopus adds FEC only above a
    /// threshold (about 14 kbps for narrowband at 10 % loss), so with the automatic rate an
    /// 8 kHz encoder carries no FEC at all.
    pub bitrate_bps: Option<u32>,
}

impl Default for OpusSettings {
    fn default() -> Self {
        Self { complexity: 1, fec: true, dtx: false, packet_loss_pct: 10, bitrate_bps: Some(24_000) }
    }
}

/// Why an Opus operation failed; the frame or packet is dropped and the caller counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The rate is not one of the four Relay's PCM paths use.
    #[error("unsupported sample rate {0} Hz: Opus legs run at 8000, 16000, 24000 or 48000 Hz")]
    UnsupportedRate(u32),
    /// [`OpusSettings::complexity`] above 10.
    #[error("Opus complexity {0} is out of range 0..=10")]
    InvalidComplexity(u8),
    /// [`OpusSettings::packet_loss_pct`] above 100.
    #[error("expected packet loss {0} % is out of range 0..=100")]
    InvalidPacketLoss(u8),
    /// [`OpusSettings::bitrate_bps`] outside 6000..=510000.
    #[error("Opus bitrate {0} bit/s is out of range 6000..=510000")]
    InvalidBitrate(u32),
    /// PCM given to encode is not exactly one 20 ms frame, or the room given to decode a packet
    /// is shorter than the packet.
    #[error("expected {expected} samples, got {actual}")]
    FrameSize {
        /// Samples needed: 20 ms at the encoder's rate, or the packet's duration at the decoder's.
        expected: usize,
        /// Samples given.
        actual: usize,
    },
    /// Audio to conceal or recover is not a whole number of 2.5 ms steps up to 120 ms (what
    /// libopus can conceal).
    #[error("cannot conceal {0} samples: a multiple of 2.5 ms, at most 120 ms, is needed")]
    ConcealSize(usize),
    /// A zero-length packet (libopus reads it as loss; we make the caller say so).
    #[error("empty Opus packet")]
    EmptyPacket,
    /// A packet longer than any valid Opus packet.
    #[error("Opus packet of {0} bytes exceeds the 1275-byte maximum")]
    PacketTooLong(usize),
    /// The packet's table of contents or frame lengths are inconsistent.
    #[error("malformed Opus packet")]
    InvalidPacket,
    /// libopus refused the call for another reason.
    #[error("libopus: {0}")]
    Library(audiopus::Error),
}

impl From<audiopus::Error> for CodecError {
    fn from(e: audiopus::Error) -> Self {
        match e {
            audiopus::Error::EmptyPacket => Self::EmptyPacket,
            audiopus::Error::Opus(audiopus::ErrorCode::InvalidPacket) => Self::InvalidPacket,
            other => Self::Library(other),
        }
    }
}

/// Whether an encoded `packet` is a DTX "nothing new" packet (1–2 bytes) that need not be sent.
pub fn is_dtx_packet(packet: &[u8]) -> bool {
    packet.len() <= 2
}

/// Mono Opus encoder (VoIP application, voice signal) for 20 ms frames of 16-bit PCM.
pub struct OpusEncoder {
    inner: Encoder,
    /// Samples per 20 ms at the input rate; `encode` takes exactly this many.
    frame_samples: usize,
    /// Where libopus writes a packet before it is copied out; never reallocated.
    scratch: Box<[u8; MAX_PACKET_BYTES]>,
}

impl std::fmt::Debug for OpusEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpusEncoder").field("frame_samples", &self.frame_samples).finish_non_exhaustive()
    }
}

impl OpusEncoder {
    /// An encoder for PCM at `input_rate_hz` (8000, 16000, 24000 or 48000).
    ///
    /// # Errors
    ///
    /// [`CodecError::UnsupportedRate`], [`CodecError::InvalidComplexity`],
    /// [`CodecError::InvalidPacketLoss`], [`CodecError::InvalidBitrate`], or [`CodecError::Library`] if libopus refuses.
    pub fn new(input_rate_hz: u32, settings: &OpusSettings) -> Result<Self, CodecError> {
        let rate = opus_rate(input_rate_hz)?;
        if settings.complexity > 10 {
            return Err(CodecError::InvalidComplexity(settings.complexity));
        }
        if settings.packet_loss_pct > 100 {
            return Err(CodecError::InvalidPacketLoss(settings.packet_loss_pct));
        }
        if let Some(bps) = settings.bitrate_bps.filter(|b| !(6000..=510_000).contains(b)) {
            return Err(CodecError::InvalidBitrate(bps));
        }
        let mut inner = Encoder::new(rate, Channels::Mono, Application::Voip)?;
        if let Some(bps) = settings.bitrate_bps {
            // In range, so the cast is lossless.
            inner.set_bitrate(audiopus::Bitrate::BitsPerSecond(bps as i32))?;
        }
        inner.set_signal(Signal::Voice)?;
        inner.set_complexity(settings.complexity)?;
        inner.set_inband_fec(settings.fec)?;
        inner.set_packet_loss_perc(settings.packet_loss_pct)?;
        inner.set_encoder_ctl_request(audiopus::ffi::OPUS_SET_DTX_REQUEST, i32::from(settings.dtx))?;
        Ok(Self { inner, frame_samples: frame_samples(input_rate_hz), scratch: Box::new([0; MAX_PACKET_BYTES]) })
    }

    /// Samples per 20 ms frame at the input rate.
    pub fn frame_samples(&self) -> usize {
        self.frame_samples
    }

    /// Samples at the input rate by which decoded audio lags the input (the encoder's lookahead).
    ///
    /// # Errors
    ///
    /// [`CodecError::Library`] if libopus refuses the query.
    pub fn lookahead_samples(&self) -> Result<u32, CodecError> {
        Ok(self.inner.lookahead()?)
    }

    /// Encodes one 20 ms frame into a new packet of 1 to [`MAX_PACKET_BYTES`] bytes.
    ///
    /// With DTX on, silent frames come back as 1–2 byte packets ([`is_dtx_packet`]) that the
    /// caller may skip sending (advancing the RTP timestamp but not the sequence number).
    ///
    /// # Errors
    ///
    /// [`CodecError::FrameSize`] unless `pcm` is exactly [`Self::frame_samples`] long, or
    /// [`CodecError::Library`].
    pub fn encode(&mut self, pcm: &[i16]) -> Result<Bytes, CodecError> {
        let Self { inner, frame_samples, scratch } = self;
        let n = encode_frame(inner, *frame_samples, pcm, &mut scratch[..])?;
        Ok(Bytes::copy_from_slice(&scratch[..n]))
    }

    /// Encodes one 20 ms frame into `out` and returns the packet's length; `out` should hold
    /// [`MAX_PACKET_BYTES`] (a smaller buffer caps the bitrate and may fail).
    ///
    /// # Errors
    ///
    /// As [`Self::encode`]; also [`CodecError::Library`] if `out` is too small.
    pub fn encode_into(&mut self, pcm: &[i16], out: &mut [u8]) -> Result<usize, CodecError> {
        encode_frame(&self.inner, self.frame_samples, pcm, out)
    }
}

/// The duration of an Opus `packet` in samples at 48 kHz, read from its TOC byte and frame count
/// (RFC 6716 §3.1): 120 (2.5 ms) to [`MAX_PACKET_SAMPLES`] (120 ms).
///
/// # Errors
///
/// [`CodecError::EmptyPacket`], [`CodecError::PacketTooLong`], [`CodecError::InvalidPacket`].
pub fn packet_samples(packet: &[u8]) -> Result<u32, CodecError> {
    check_packet(packet)
}

/// Mono Opus decoder producing 16-bit PCM at any of the four rates, from packets of any duration.
pub struct OpusDecoder {
    inner: Decoder,
    /// Samples per 20 ms at the output rate.
    frame_samples: usize,
    /// Output rate in Hz.
    rate_hz: u32,
}

impl std::fmt::Debug for OpusDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpusDecoder").field("frame_samples", &self.frame_samples).finish_non_exhaustive()
    }
}

impl OpusDecoder {
    /// A decoder writing PCM at `output_rate_hz` (8000, 16000, 24000 or 48000), whatever rate the
    /// sender encoded at.
    ///
    /// # Errors
    ///
    /// [`CodecError::UnsupportedRate`], or [`CodecError::Library`] if libopus refuses.
    pub fn new(output_rate_hz: u32) -> Result<Self, CodecError> {
        let rate = opus_rate(output_rate_hz)?;
        Ok(Self {
            inner: Decoder::new(rate, Channels::Mono)?,
            frame_samples: frame_samples(output_rate_hz),
            rate_hz: output_rate_hz,
        })
    }

    /// Samples per 20 ms frame at the output rate.
    pub fn frame_samples(&self) -> usize {
        self.frame_samples
    }

    /// Output rate in Hz.
    pub fn rate_hz(&self) -> u32 {
        self.rate_hz
    }

    /// Samples at the output rate in `samples_48k` samples of the 48 kHz RTP clock (rounded down).
    pub fn samples_at_rate(&self, samples_48k: u32) -> usize {
        (u64::from(samples_48k) * u64::from(self.rate_hz) / 48_000) as usize
    }

    /// Samples at the output rate of 2.5 ms: the step every concealed or recovered length is a
    /// multiple of.
    pub fn conceal_step(&self) -> usize {
        self.rate_hz as usize / 400
    }

    /// Decodes `packet` (any duration, 2.5 to 120 ms) into the start of `out`, which must have
    /// room for all of it, and returns the samples written: the packet's duration at the output
    /// rate.
    ///
    /// # Errors
    ///
    /// [`CodecError::FrameSize`] when `out` is shorter than the packet, [`CodecError::EmptyPacket`],
    /// [`CodecError::PacketTooLong`], [`CodecError::InvalidPacket`].
    pub fn decode(&mut self, packet: &[u8], out: &mut [i16]) -> Result<usize, CodecError> {
        let needed = self.samples_at_rate(check_packet(packet)?);
        if out.len() < needed {
            return Err(CodecError::FrameSize { expected: needed, actual: out.len() });
        }
        // libopus takes the room as the most it may write; more than 120 ms is never used.
        let room = out.len().min(self.samples_at_rate(MAX_PACKET_SAMPLES));
        Ok(self.inner.decode(Some(packet), &mut out[..room], false)?)
    }

    /// Conceals `out.len()` lost samples (a multiple of 2.5 ms, at most 120 ms; libopus PLC:
    /// extrapolated from the last frames, fading to silence over repeated losses) into `out` and
    /// returns the samples written.
    ///
    /// # Errors
    ///
    /// [`CodecError::ConcealSize`], or [`CodecError::Library`].
    pub fn conceal(&mut self, out: &mut [i16]) -> Result<usize, CodecError> {
        self.check_conceal(out)?;
        Ok(self.inner.decode(None::<&[u8]>, out, false)?)
    }

    /// Recovers the `out.len()` lost samples *before* `next_packet` (a multiple of 2.5 ms, at most
    /// 120 ms) into `out`: libopus conceals all but the last frame's worth and recovers that from
    /// `next_packet`'s in-band FEC (or conceals it too when the packet carries none). Decode
    /// `next_packet` itself with [`Self::decode`] afterwards, as usual.
    ///
    /// # Errors
    ///
    /// [`CodecError::ConcealSize`], [`CodecError::EmptyPacket`], [`CodecError::PacketTooLong`],
    /// [`CodecError::InvalidPacket`].
    pub fn decode_fec(&mut self, next_packet: &[u8], out: &mut [i16]) -> Result<usize, CodecError> {
        self.check_conceal(out)?;
        check_packet(next_packet)?;
        Ok(self.inner.decode(Some(next_packet), out, true)?)
    }

    fn check_conceal(&self, out: &[i16]) -> Result<(), CodecError> {
        let step = self.conceal_step();
        if out.is_empty() || out.len() % step != 0 || out.len() > self.samples_at_rate(MAX_PACKET_SAMPLES) {
            return Err(CodecError::ConcealSize(out.len()));
        }
        Ok(())
    }
}

fn encode_frame(inner: &Encoder, frame_samples: usize, pcm: &[i16], out: &mut [u8]) -> Result<usize, CodecError> {
    if pcm.len() != frame_samples {
        return Err(CodecError::FrameSize { expected: frame_samples, actual: pcm.len() });
    }
    if out.is_empty() {
        return Err(CodecError::Library(audiopus::Error::Opus(audiopus::ErrorCode::BufferTooSmall)));
    }
    // libopus takes the output size as an i32; more than MAX_PACKET_BYTES is never used.
    let cap = out.len().min(MAX_PACKET_BYTES);
    Ok(inner.encode(pcm, &mut out[..cap])?)
}

/// Rejects packets that are empty, oversized or malformed before libopus sees them, and returns
/// a valid packet's duration in samples at 48 kHz.
fn check_packet(packet: &[u8]) -> Result<u32, CodecError> {
    if packet.is_empty() {
        return Err(CodecError::EmptyPacket);
    }
    // A packet holds at most 48 frames (120 ms of 2.5 ms frames) of at most 1275 bytes, but
    // encoders spend far less; 1275 × 8 is a loose bound that only rejects what no encoder
    // produces.
    if packet.len() > MAX_PACKET_BYTES * 8 {
        return Err(CodecError::PacketTooLong(packet.len()));
    }
    // audiopus casts libopus's i32 result to usize, so its negative error codes arrive as huge
    // values; the largest valid answer is 120 ms = 5760 samples.
    let samples = audiopus::packet::nb_samples(packet, audiopus::SampleRate::Hz48000)?;
    if samples == 0 || samples > MAX_PACKET_SAMPLES as usize {
        return Err(CodecError::InvalidPacket);
    }
    // At most 5760, so lossless.
    Ok(samples as u32)
}

fn opus_rate(hz: u32) -> Result<audiopus::SampleRate, CodecError> {
    match hz {
        8000 => Ok(audiopus::SampleRate::Hz8000),
        16000 => Ok(audiopus::SampleRate::Hz16000),
        24000 => Ok(audiopus::SampleRate::Hz24000),
        48000 => Ok(audiopus::SampleRate::Hz48000),
        other => Err(CodecError::UnsupportedRate(other)),
    }
}

/// 20 ms of samples at `hz` (a rate `opus_rate` accepted).
fn frame_samples(hz: u32) -> usize {
    hz as usize / 50
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A 20 ms frame `index` of a `freq_hz` sine at `rate` Hz, amplitude `amp`.
    fn tone(rate: u32, freq_hz: f64, amp: f64, index: usize) -> Vec<i16> {
        let n = rate as usize / 50;
        (0..n)
            .map(|i| {
                let t = (index * n + i) as f64 / f64::from(rate);
                (amp * (2.0 * std::f64::consts::PI * freq_hz * t).sin()) as i16
            })
            .collect()
    }

    fn energy(pcm: &[i16]) -> f64 {
        pcm.iter().map(|&s| f64::from(s) * f64::from(s)).sum::<f64>() / pcm.len().max(1) as f64
    }

    /// Every rate pair encodes and decodes a tone back to roughly its energy, after the codec's
    /// start-up frames.
    #[test]
    fn round_trip_all_rates() {
        for enc_rate in [8000, 16000, 24000, 48000] {
            for dec_rate in [8000, 16000, 24000, 48000] {
                let mut enc = OpusEncoder::new(enc_rate, &OpusSettings::default()).expect("encoder");
                let mut dec = OpusDecoder::new(dec_rate).expect("decoder");
                let mut out = vec![0i16; dec.frame_samples()];
                let (mut e_in, mut e_out) = (0.0, 0.0);
                for i in 0..25 {
                    let pcm = tone(enc_rate, 440.0, 8000.0, i);
                    let packet = enc.encode(&pcm).expect("encode");
                    assert!(!packet.is_empty() && packet.len() <= MAX_PACKET_BYTES);
                    assert_eq!(dec.decode(&packet, &mut out).expect("decode"), dec_rate as usize / 50);
                    if i >= 5 {
                        e_in += energy(&pcm);
                        e_out += energy(&out);
                    }
                }
                let ratio = e_out / e_in;
                assert!((0.5..2.0).contains(&ratio), "{enc_rate}→{dec_rate}: energy ratio {ratio}");
            }
        }
    }

    /// Rates, complexities and loss percentages outside the documented ranges are refused.
    #[test]
    fn bad_settings() {
        let s = OpusSettings::default();
        assert_eq!(OpusEncoder::new(44100, &s).err(), Some(CodecError::UnsupportedRate(44100)));
        assert_eq!(OpusEncoder::new(12000, &s).err(), Some(CodecError::UnsupportedRate(12000)));
        assert_eq!(OpusDecoder::new(0).err(), Some(CodecError::UnsupportedRate(0)));
        let c11 = OpusSettings { complexity: 11, ..s };
        assert_eq!(OpusEncoder::new(8000, &c11).err(), Some(CodecError::InvalidComplexity(11)));
        let loss = OpusSettings { packet_loss_pct: 101, ..s };
        assert_eq!(OpusEncoder::new(8000, &loss).err(), Some(CodecError::InvalidPacketLoss(101)));
        for bps in [0, 5999, 510_001] {
            let b = OpusSettings { bitrate_bps: Some(bps), ..s };
            assert_eq!(OpusEncoder::new(8000, &b).err(), Some(CodecError::InvalidBitrate(bps)));
        }
        for bps in [6000, 510_000] {
            assert!(OpusEncoder::new(8000, &OpusSettings { bitrate_bps: Some(bps), ..s }).is_ok());
        }
        for complexity in 0..=10 {
            for (fec, dtx) in [(false, false), (true, true)] {
                let ok = OpusSettings { complexity, fec, dtx, packet_loss_pct: 100, bitrate_bps: None };
                assert!(OpusEncoder::new(48000, &ok).is_ok(), "complexity {complexity}");
            }
        }
    }

    /// Wrong frame sizes are errors on both sides: the encoder takes exactly 20 ms, the decoder
    /// needs room for the whole packet, and concealment comes in 2.5 ms steps up to 120 ms.
    #[test]
    fn frame_sizes() {
        let mut enc = OpusEncoder::new(16000, &OpusSettings::default()).expect("encoder");
        assert_eq!(enc.frame_samples(), 320);
        assert_eq!(enc.encode(&[0; 160]).err(), Some(CodecError::FrameSize { expected: 320, actual: 160 }));
        assert_eq!(enc.encode(&[]).err(), Some(CodecError::FrameSize { expected: 320, actual: 0 }));
        let packet = enc.encode(&[0; 320]).expect("encode");
        let mut dec = OpusDecoder::new(8000).expect("decoder");
        let mut short = [0i16; 159];
        assert_eq!(dec.decode(&packet, &mut short).err(), Some(CodecError::FrameSize { expected: 160, actual: 159 }));
        assert_eq!(dec.decode(&packet, &mut [0; 1000]), Ok(160), "more room than the packet is fine");
        assert_eq!(dec.conceal(&mut [0; 161]), Err(CodecError::ConcealSize(161)));
        assert_eq!(dec.conceal(&mut [0; 20]), Ok(20), "2.5 ms");
        assert_eq!(dec.conceal(&mut [0; 960]), Ok(960), "120 ms");
        assert_eq!(dec.conceal(&mut [0; 980]), Err(CodecError::ConcealSize(980)));
        assert!(dec.decode_fec(&packet, &mut [0; 0]).is_err());
        assert_eq!(dec.decode_fec(&packet, &mut [0; 80]), Ok(80), "10 ms recovered");
        let mut buf = [0u8; 0];
        assert!(enc.encode_into(&[0; 320], &mut buf).is_err());
        let mut buf = [0u8; MAX_PACKET_BYTES];
        let n = enc.encode_into(&[0; 320], &mut buf).expect("encode_into");
        assert!((1..=MAX_PACKET_BYTES).contains(&n));
    }

    /// Empty and malformed packets are refused, and so is room shorter than the packet; every
    /// standard duration is read from the TOC.
    #[test]
    fn bad_packets() {
        let mut dec = OpusDecoder::new(48000).expect("decoder");
        let mut out = vec![0i16; 960];
        assert_eq!(dec.decode(&[], &mut out), Err(CodecError::EmptyPacket));
        // TOC config 3 = SILK NB 60 ms, code 0: one 60 ms frame, longer than the room given.
        assert_eq!(dec.decode(&[3 << 3, 0, 0], &mut out), Err(CodecError::FrameSize { expected: 2880, actual: 960 }));
        assert_eq!(packet_samples(&[3 << 3, 0, 0]), Ok(2880));
        // TOC config 1 (SILK NB 20 ms), code 3 with 6 frames = 120 ms.
        assert_eq!(packet_samples(&[(1 << 3) | 3, 6, 0, 0]), Ok(5760));
        // Code 3 with 7 frames of 20 ms = 140 ms: over the maximum.
        assert_eq!(packet_samples(&[(1 << 3) | 3, 7, 0, 0]), Err(CodecError::InvalidPacket));
        // Code 3 with a frame count of 0 is invalid (RFC 6716 R5).
        assert_eq!(dec.decode(&[(1 << 3) | 3, 0], &mut out), Err(CodecError::InvalidPacket));
        // Code 2 (two 10 ms frames of config 0) whose first frame length runs past the end.
        assert_eq!(dec.decode(&[2, 200, 1], &mut out), Err(CodecError::InvalidPacket));
        // Code 2 (two 20 ms frames) is 40 ms.
        assert_eq!(packet_samples(&[(1 << 3) | 2, 1, 0, 0]), Ok(1920));
        // CELT FB 2.5 ms (config 28).
        assert_eq!(packet_samples(&[28 << 3]), Ok(120));
        assert_eq!(dec.decode(&vec![0u8; 20_000], &mut out), Err(CodecError::PacketTooLong(20_000)));
        assert_eq!(packet_samples(&[]), Err(CodecError::EmptyPacket));
        // 10 ms packets (TOC config 0) fill half the frame.
        let ten_ms = dec.decode(&[0], &mut out).expect("a TOC-only 10 ms packet is valid");
        assert_eq!(ten_ms, 480);
    }

    /// 10, 40 and 60 ms packets of a tone decode whole, at every output rate, to the tone's energy,
    /// and a lost 60 ms packet is concealed and recovered for exactly its length.
    #[test]
    fn long_and_short_packets() {
        for ms in [10usize, 40, 60] {
            let n48 = ms * 48;
            let mut enc =
                Encoder::new(audiopus::SampleRate::Hz48000, Channels::Mono, Application::Voip).expect("encoder");
            enc.set_inband_fec(true).expect("fec");
            enc.set_packet_loss_perc(20).expect("loss");
            let packets: Vec<Vec<u8>> = (0..2000 / ms)
                .map(|k| {
                    let pcm: Vec<i16> = (0..n48)
                        .map(|i| {
                            ((((k * n48 + i) as f64) * 440.0 / 48_000.0 * std::f64::consts::TAU).sin() * 8000.0) as i16
                        })
                        .collect();
                    let mut out = vec![0u8; MAX_PACKET_BYTES * 3];
                    let len = enc.encode(&pcm, &mut out).expect("encode");
                    out.truncate(len);
                    out
                })
                .collect();
            for rate in [8000u32, 48000] {
                let mut dec = OpusDecoder::new(rate).expect("decoder");
                let mut out = vec![0i16; dec.samples_at_rate(MAX_PACKET_SAMPLES)];
                let mut e = 0.0;
                for (k, p) in packets.iter().enumerate() {
                    assert_eq!(packet_samples(p), Ok(n48 as u32));
                    let got = dec.decode(p, &mut out).expect("decode");
                    assert_eq!(got, dec.samples_at_rate(n48 as u32), "{ms} ms at {rate} Hz");
                    if k >= 5 {
                        e += energy(&out[..got]) / (packets.len() - 5) as f64;
                    }
                }
                assert!((0.5 * 32e6..2.0 * 32e6).contains(&e), "{ms} ms at {rate} Hz: energy {e}");
                // One packet lost: conceal all but its last 20 ms, recover that from the next.
                let lost = dec.samples_at_rate(n48 as u32);
                let frame = dec.frame_samples();
                if lost > frame {
                    assert_eq!(dec.conceal(&mut out[..lost - frame]), Ok(lost - frame));
                }
                assert_eq!(dec.decode_fec(&packets[1], &mut out[..lost.min(frame)]), Ok(lost.min(frame)));
            }
        }
    }

    /// Concealment yields a full frame that continues a tone, then fades over repeated losses.
    #[test]
    fn concealment() {
        let mut enc = OpusEncoder::new(8000, &OpusSettings::default()).expect("encoder");
        let mut dec = OpusDecoder::new(8000).expect("decoder");
        let mut out = [0i16; 160];
        for i in 0..20 {
            let p = enc.encode(&tone(8000, 300.0, 10000.0, i)).expect("encode");
            dec.decode(&p, &mut out).expect("decode");
        }
        let last = energy(&out);
        assert_eq!(dec.conceal(&mut out), Ok(160));
        assert!(energy(&out) > last * 0.05, "first concealed frame carries on the tone");
        for _ in 0..30 {
            dec.conceal(&mut out).expect("conceal");
        }
        assert!(energy(&out) < last * 0.01, "long loss fades out: {} vs {last}", energy(&out));
    }

    /// Decodes `packets` at `rate`, losing frame `lost` and recovering it by FEC or concealment.
    fn decode_with_loss(packets: &[Bytes], rate: u32, lost: Option<(usize, bool)>) -> Vec<Vec<i16>> {
        let mut dec = OpusDecoder::new(rate).expect("decoder");
        let mut out = vec![0i16; rate as usize / 50];
        let mut decoded = Vec::new();
        for (i, p) in packets.iter().enumerate() {
            match lost {
                Some((l, true)) if l == i => dec.decode_fec(&packets[i + 1], &mut out).expect("fec"),
                Some((l, false)) if l == i => dec.conceal(&mut out).expect("conceal"),
                _ => dec.decode(p, &mut out).expect("decode"),
            };
            decoded.push(out.clone());
        }
        decoded
    }

    /// With the default settings (FEC on, 24 kbps) a lost frame recovered from the next packet is
    /// much closer to the clean decode than plain concealment, at 8 and 16 kHz; with FEC off, or
    /// at a rate below libopus's FEC threshold (16 kbps or the automatic 11 kbps at 8 kHz), it is
    /// not.
    #[test]
    fn fec_recovers_lost_frame() {
        let err =
            |a: &[i16], b: &[i16]| a.iter().zip(b).map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2)).sum::<f64>();
        let with_fec = OpusSettings::default();
        let no_fec = OpusSettings { fec: false, ..with_fec };
        let auto_rate = OpusSettings { bitrate_bps: None, ..with_fec };
        let low_rate = OpusSettings { bitrate_bps: Some(16_000), ..with_fec };
        for (rate, settings, expect_fec) in [
            (8000, with_fec, true),
            (16000, with_fec, true),
            (8000, no_fec, false),
            (8000, auto_rate, false),
            (8000, low_rate, false),
        ] {
            let mut enc = OpusEncoder::new(rate, &settings).expect("encoder");
            // A tone whose pitch changes every frame, so concealment (extrapolation) cannot guess it.
            let packets: Vec<Bytes> = (0..40)
                .map(|i| enc.encode(&tone(rate, 200.0 + 37.0 * (i % 7) as f64, 9000.0, i)).expect("encode"))
                .collect();
            let lost = 30;
            let clean = decode_with_loss(&packets, rate, None);
            let e_fec = err(&decode_with_loss(&packets, rate, Some((lost, true)))[lost], &clean[lost]);
            let e_plc = err(&decode_with_loss(&packets, rate, Some((lost, false)))[lost], &clean[lost]);
            if expect_fec {
                assert!(e_fec < e_plc * 0.5, "{rate} Hz: FEC error {e_fec} should be well below PLC error {e_plc}");
            } else {
                assert!(e_fec > e_plc * 0.5, "{rate} Hz {settings:?}: FEC {e_fec} vs PLC {e_plc}: FEC present?");
            }
        }
    }

    /// With DTX on, sustained silence becomes tiny packets; speech does not.
    #[test]
    fn dtx_silence() {
        let settings = OpusSettings { dtx: true, ..OpusSettings::default() };
        let mut enc = OpusEncoder::new(8000, &settings).expect("encoder");
        let mut tiny = 0;
        for _ in 0..50 {
            if is_dtx_packet(&enc.encode(&[0; 160]).expect("encode")) {
                tiny += 1;
            }
        }
        assert!(tiny > 30, "only {tiny} of 50 silent frames were DTX");
        let speech = enc.encode(&tone(8000, 200.0, 9000.0, 3)).expect("encode");
        assert!(!is_dtx_packet(&speech));
        let mut dec = OpusDecoder::new(8000).expect("decoder");
        let mut out = [0i16; 160];
        assert!(dec.decode(&[0x08], &mut out).is_ok(), "a 1-byte DTX packet decodes");
    }

    /// Every error message says what was wrong.
    #[test]
    fn messages() {
        assert_eq!(
            CodecError::UnsupportedRate(44100).to_string(),
            "unsupported sample rate 44100 Hz: Opus legs run at 8000, 16000, 24000 or 48000 Hz"
        );
        assert_eq!(
            CodecError::ConcealSize(161).to_string(),
            "cannot conceal 161 samples: a multiple of 2.5 ms, at most 120 ms, is needed"
        );
        assert_eq!(CodecError::FrameSize { expected: 160, actual: 3 }.to_string(), "expected 160 samples, got 3");
    }

    proptest! {
        /// Arbitrary bytes never panic the decoder; they decode to at most the room given (and
        /// the duration their TOC says) or fail.
        #[test]
        fn arbitrary_packets(packet in proptest::collection::vec(any::<u8>(), 0..1500), fec in any::<bool>(), room in 0usize..1000) {
            let mut dec = OpusDecoder::new(8000).expect("decoder");
            let mut out = vec![0i16; room];
            let r = if fec { dec.decode_fec(&packet, &mut out) } else { dec.decode(&packet, &mut out) };
            if let Ok(n) = r {
                prop_assert!(n <= room);
                if !fec {
                    prop_assert_eq!(Ok(n), packet_samples(&packet).map(|s| dec.samples_at_rate(s)));
                }
            }
            prop_assert_eq!(dec.conceal(&mut [0; 160]), Ok(160));
        }

        /// Arbitrary PCM always encodes to a packet the decoder accepts.
        #[test]
        fn arbitrary_pcm(pcm in proptest::collection::vec(any::<i16>(), 160)) {
            let mut enc = OpusEncoder::new(8000, &OpusSettings::default()).expect("encoder");
            let p = enc.encode(&pcm).expect("encode");
            prop_assert!(!p.is_empty() && p.len() <= MAX_PACKET_BYTES);
            let mut dec = OpusDecoder::new(48000).expect("decoder");
            let mut out = vec![0i16; 960];
            prop_assert_eq!(dec.decode(&p, &mut out), Ok(960));
        }
    }
}
