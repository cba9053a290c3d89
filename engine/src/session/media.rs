//! A session's WebRTC legs and the audio state between its legs' formats: per leg a playout
//! buffer and Opus decoder (audio in, packets of any duration cut into 20 ms frames) and an Opus
//! encoder (audio out, 20 ms packets); per session the WHEP mix.
//!
//! Formats: Twilio legs carry base64 μ-law at 8 kHz; WebRTC legs carry Opus, decoded here at
//! 48 kHz. A frame is converted only toward the sinks that need another format, once per frame:
//! μ-law from 48 kHz goes through the source leg's own (stateful) 48 → 8 kHz resampler, and Opus is
//! encoded at the frame's own rate (libopus takes 8 kHz input directly, so telephony audio needs no
//! resampler on its way to a browser).
//!
//! Codec calls are timed through a [`Timing`] the core passes in (the shell's [`CodecTimer`] reads
//! the clock and records into per-core histograms; without one nothing is timed).
//!
//! Invariant: pure state and arithmetic; no sockets, and no clock but the one a [`CodecTimer`]
//! brings.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;

use crate::core::command::RtcRole;
use crate::media::opus::{self, OpusDecoder, OpusEncoder, OpusSettings, MAX_PACKET_SAMPLES};
use crate::media::playout::{Playout, PlayoutBuffer, PlayoutConfig, PlayoutStats};
use crate::media::resample::Resampler;
use crate::media::{pcm, SampleRate};
use crate::rtc::{Flow, PeerId};

/// 20 ms at 48 kHz: Opus's frame on the wire.
pub const FRAME_48K: usize = 960;
/// 20 ms at 8 kHz: one Twilio frame.
pub const FRAME_8K: usize = 160;
/// The frame period.
pub const FRAME: Duration = Duration::from_millis(20);

/// 20 ms of PCM at a known rate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pcm {
    /// Its rate.
    pub rate: SampleRate,
    /// `rate / 50` samples.
    pub samples: Vec<i16>,
}

impl Pcm {
    /// Silence of one frame at `rate`.
    pub fn silence(rate: SampleRate) -> Self {
        Self { rate, samples: vec![0; rate.hz() as usize / 50] }
    }
}

/// A codec operation whose time the core measures (`relay_codec_seconds{op}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CodecOp {
    /// One Opus packet encoded (toward a WebRTC peer, or the WHEP mix).
    OpusEncode,
    /// One Opus frame decoded, concealed or recovered from FEC (from a WebRTC peer).
    OpusDecode,
    /// One 20 ms frame resampled.
    Resample,
    /// PCM encoded as μ-law (the G.711 table lookups, not the base64 around them).
    UlawEncode,
    /// μ-law decoded to PCM (likewise).
    UlawDecode,
}

impl CodecOp {
    /// Every operation, in the order of [`CodecOp::index`].
    pub const ALL: [Self; 5] = [Self::OpusEncode, Self::OpusDecode, Self::Resample, Self::UlawEncode, Self::UlawDecode];

    /// The metric label (`op`).
    pub fn name(self) -> &'static str {
        match self {
            Self::OpusEncode => "opus_encode",
            Self::OpusDecode => "opus_decode",
            Self::Resample => "resample",
            Self::UlawEncode => "ulaw_encode",
            Self::UlawDecode => "ulaw_decode",
        }
    }

    /// Position in [`CodecOp::ALL`], for tables of per-op handles.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// Where codec timings go: the shell implements it with a clock read and per-core histogram
/// handles made once, so that timing a frame takes no lock and no lookup.
pub trait CodecTimer {
    /// A monotonic reading, taken just before a codec call.
    fn start(&self) -> Instant;
    /// Records codec call `op`, which began at `started` and has just returned.
    fn finish(&self, op: CodecOp, started: Instant);
}

/// The core's codec timer for one call into the media code, or none (tests, fuzzing): nothing
/// is timed then.
#[derive(Clone, Copy, Default)]
pub struct Timing<'a>(Option<&'a dyn CodecTimer>);

impl<'a> Timing<'a> {
    /// Times with `timer`, when there is one.
    pub fn new(timer: Option<&'a dyn CodecTimer>) -> Self {
        Self(timer)
    }

    /// Runs `f`, the codec call `op`, timed.
    pub fn time<R>(self, op: CodecOp, f: impl FnOnce() -> R) -> R {
        let Some(timer) = self.0 else { return f() };
        let started = timer.start();
        let result = f();
        timer.finish(op, started);
        result
    }
}

impl std::fmt::Debug for Timing<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Timing").field(&self.0.is_some()).finish()
    }
}

/// Base64 μ-law (Twilio's payload) → 8 kHz PCM; `None` when it is not valid base64.
pub fn ulaw_b64_to_pcm(payload: &[u8], timing: Timing<'_>) -> Option<Pcm> {
    let codes = base64::engine::general_purpose::STANDARD.decode(payload).ok()?;
    let mut samples = vec![0; codes.len()];
    timing.time(CodecOp::UlawDecode, || pcm::ulaw_to_pcm(&codes, &mut samples));
    Some(Pcm { rate: SampleRate::Hz8000, samples })
}

/// 8 kHz PCM → base64 μ-law.
pub fn pcm8_to_ulaw_b64(samples: &[i16], timing: Timing<'_>) -> Bytes {
    let mut codes = vec![0; samples.len()];
    timing.time(CodecOp::UlawEncode, || pcm::pcm_to_ulaw(samples, &mut codes));
    Bytes::from(base64::engine::general_purpose::STANDARD.encode(codes))
}

/// `frame`'s samples at rate `to`, through `slot`'s resampler, which is made on first use and
/// made again when the rates change (a copy when `frame` is at `to` already); `None` when the
/// resampler cannot be made or refuses the frame.
pub fn resample(slot: &mut Option<Resampler>, frame: &Pcm, to: SampleRate, timing: Timing<'_>) -> Option<Vec<i16>> {
    if frame.rate == to {
        return Some(frame.samples.clone());
    }
    if slot.as_ref().is_none_or(|r| r.from_rate() != frame.rate || r.to_rate() != to) {
        *slot = Resampler::new(frame.rate, to).ok();
    }
    let r = slot.as_mut()?;
    let mut out = vec![0i16; r.output_len()];
    timing.time(CodecOp::Resample, || r.process(&frame.samples, &mut out)).ok()?;
    Some(out)
}

/// Audio received from a WebRTC peer: reordered and timed by a playout buffer, decoded (packets
/// of any duration, RFC 7587), and cut into 20 ms frames.
pub struct Inbound {
    /// Reorders, absorbs jitter, decides where concealment goes and how long it is.
    pub playout: PlayoutBuffer,
    /// Decodes at 48 kHz while a WebRTC peer or the mix hears this leg, else straight to 8 kHz
    /// (cheaper, and no resampler delay on the way to a phone).
    decoder: OpusDecoder,
    rate: SampleRate,
    /// 48 → 8 kHz, made when a μ-law sink first needs this leg's audio.
    down: Option<Resampler>,
    /// Decoded audio not yet released as frames, at `rate`: the rest of a packet longer than a
    /// frame (two frames of a 60 ms packet), or the start of a frame made of shorter packets.
    /// Its capacity, a longest packet plus two frames, is reserved at construction and never
    /// exceeded (the oldest samples go first).
    pending: Vec<i16>,
    /// Where each piece is decoded before it joins `pending`: room for a longest packet at 48 kHz,
    /// never reallocated.
    scratch: Box<[i16]>,
    /// Packets that failed to decode (or whose duration could not be read).
    pub decode_errors: u64,
    /// `decode_errors` as last reported to the core.
    pub reported_errors: u64,
    /// The playout counters as last reported to the core (the core adds only what changed).
    pub reported: PlayoutStats,
}

/// Room in [`Inbound`]'s pending queue, in samples at 48 kHz: a longest packet plus two frames.
const PENDING_48K: usize = MAX_PACKET_SAMPLES as usize + 2 * FRAME_48K;

impl std::fmt::Debug for Inbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbound").field("decode_errors", &self.decode_errors).finish_non_exhaustive()
    }
}

impl Inbound {
    /// A leg's inbound audio path with playout buffer `playout`; `None` if libopus refuses to make
    /// a decoder.
    pub fn new(playout: PlayoutConfig) -> Option<Self> {
        Some(Self {
            playout: PlayoutBuffer::new(playout),
            decoder: OpusDecoder::new(8_000).ok()?,
            rate: SampleRate::Hz8000,
            down: None,
            pending: Vec::with_capacity(PENDING_48K),
            scratch: vec![0; MAX_PACKET_SAMPLES as usize].into_boxed_slice(),
            decode_errors: 0,
            reported_errors: 0,
            reported: PlayoutStats::default(),
        })
    }

    /// Takes in an Opus packet with RTP sequence number `seq` and timestamp `rtp_time` that arrived
    /// at `now`; its duration is read from its TOC (the SDP's `ptime` is not trusted). A packet
    /// whose duration cannot be read is counted in `decode_errors` and dropped (its time is
    /// concealed as a gap).
    pub fn push(&mut self, now: Instant, seq: u16, rtp_time: u32, payload: Bytes) {
        match opus::packet_samples(&payload) {
            Ok(samples) => self.playout.push(now, seq, rtp_time, samples, payload),
            Err(_) => self.decode_errors += 1,
        }
    }

    /// The next 20 ms frame due at `now`, decoded (concealed where packets are missing), at
    /// 48 kHz when `wideband`, else at 8 kHz.
    pub fn next_frame(&mut self, now: Instant, wideband: bool, timing: Timing<'_>) -> Option<Pcm> {
        let rate = if wideband { SampleRate::Hz48000 } else { SampleRate::Hz8000 };
        if rate != self.rate {
            // A sink that needs the other rate joined or left: a new decoder (a glitch-free
            // switch would need both running; this happens only when legs come and go).
            if let Ok(d) = OpusDecoder::new(rate.hz()) {
                self.decoder = d;
                self.rate = rate;
                self.pending.clear();
            }
        }
        loop {
            match self.playout.poll(now)? {
                Playout::Frame => return Some(self.take_frame(timing)),
                Playout::Packet { payload, samples } => {
                    let (decoder, scratch) = (&mut self.decoder, &mut self.scratch);
                    match timing.time(CodecOp::OpusDecode, || decoder.decode(&payload, scratch)) {
                        Ok(n) => append(&mut self.pending, &self.scratch[..n], self.rate),
                        // A broken packet: its time is concealed instead, counted.
                        Err(_) => {
                            self.decode_errors += 1;
                            let n = self.decoder.samples_at_rate(samples);
                            self.conceal(n, timing);
                        }
                    }
                }
                Playout::Fec { next, samples } => {
                    let n = self.whole_steps(samples);
                    let (decoder, scratch) = (&mut self.decoder, &mut self.scratch[..n]);
                    match timing.time(CodecOp::OpusDecode, || decoder.decode_fec(&next, scratch)) {
                        Ok(n) => append(&mut self.pending, &self.scratch[..n], self.rate),
                        Err(_) => self.conceal(n, timing),
                    }
                }
                Playout::Conceal { samples } => {
                    let n = self.whole_steps(samples);
                    self.conceal(n, timing);
                }
            }
        }
    }

    /// `frame` (from this leg) as base64 μ-law, through this leg's resampler.
    pub fn to_ulaw(&mut self, frame: &Pcm, timing: Timing<'_>) -> Option<Bytes> {
        to_ulaw(&mut self.down, frame, timing)
    }

    /// The first 20 ms of the pending audio as a frame; a shortfall (concealment rounded to
    /// libopus's 2.5 ms steps, a decoder just replaced) is concealed first.
    fn take_frame(&mut self, timing: Timing<'_>) -> Pcm {
        let n = self.decoder.frame_samples();
        if self.pending.len() < n {
            let step = self.decoder.conceal_step();
            let short = (n - self.pending.len()).div_ceil(step) * step;
            self.conceal(short, timing);
            // A failed concealment leaves silence.
            self.pending.resize(self.pending.len().max(n), 0);
        }
        let samples = self.pending[..n].to_vec();
        self.pending.drain(..n);
        Pcm { rate: self.rate, samples }
    }

    /// `samples` at 48 kHz as a length at the decoder's rate, rounded to libopus's 2.5 ms steps
    /// and capped at 20 ms (no piece but a packet is longer).
    fn whole_steps(&self, samples: u32) -> usize {
        let step = self.decoder.conceal_step();
        let n = self.decoder.samples_at_rate(samples);
        ((n + step / 2) / step * step).min(self.decoder.frame_samples())
    }

    /// Conceals `n` samples (a multiple of 2.5 ms, at most 120 ms) into the pending audio.
    fn conceal(&mut self, n: usize, timing: Timing<'_>) {
        if n == 0 {
            return;
        }
        let n = n.min(self.scratch.len());
        let (decoder, scratch) = (&mut self.decoder, &mut self.scratch[..n]);
        match timing.time(CodecOp::OpusDecode, || decoder.conceal(scratch)) {
            Ok(got) => append(&mut self.pending, &self.scratch[..got], self.rate),
            Err(_) => {
                self.scratch[..n].fill(0);
                append(&mut self.pending, &self.scratch[..n], self.rate);
            }
        }
    }
}

/// Appends `samples` to `pending`, dropping its oldest samples first if it would pass its room
/// (a longest packet plus two frames at `rate`).
fn append(pending: &mut Vec<i16>, samples: &[i16], rate: SampleRate) {
    let room = PENDING_48K * rate.hz() as usize / 48_000;
    let over = (pending.len() + samples.len()).saturating_sub(room);
    if over > 0 {
        pending.drain(..over.min(pending.len()));
    }
    let take = samples.len().min(room);
    pending.extend_from_slice(&samples[samples.len() - take..]);
}

/// `frame` as base64 μ-law: 8 kHz directly, other rates through `down` (see [`resample`]).
pub fn to_ulaw(down: &mut Option<Resampler>, frame: &Pcm, timing: Timing<'_>) -> Option<Bytes> {
    if frame.rate == SampleRate::Hz8000 {
        return Some(pcm8_to_ulaw_b64(&frame.samples, timing));
    }
    let out = resample(down, frame, SampleRate::Hz8000, timing)?;
    Some(pcm8_to_ulaw_b64(&out, timing))
}

/// Opus toward one peer: an encoder at the rate of the audio it is fed (made again when that changes).
pub struct Outbound {
    encoder: Option<(SampleRate, OpusEncoder)>,
    settings: OpusSettings,
}

impl std::fmt::Debug for Outbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbound").field("rate", &self.encoder.as_ref().map(|(rate, _)| *rate)).finish_non_exhaustive()
    }
}

impl Outbound {
    /// An encoder-to-be with `settings`.
    pub fn new(settings: OpusSettings) -> Self {
        Self { encoder: None, settings }
    }

    /// `frame` as one Opus packet; a frame that fails to encode adds one to `errors`.
    pub fn encode(&mut self, frame: &Pcm, timing: Timing<'_>, errors: &mut u64) -> Option<Bytes> {
        if self.encoder.as_ref().is_none_or(|(rate, _)| *rate != frame.rate) {
            self.encoder = OpusEncoder::new(frame.rate.hz(), &self.settings).ok().map(|e| (frame.rate, e));
        }
        let (_, encoder) = self.encoder.as_mut()?;
        match timing.time(CodecOp::OpusEncode, || encoder.encode(&frame.samples)) {
            // With DTX, silence comes out as 1–2 byte packets that are not sent: the peer treats
            // the gap as silence (Opus's own comfort noise), which is what DTX saves bandwidth for.
            Ok(packet) if self.settings.dtx && opus::is_dtx_packet(&packet) => None,
            Ok(packet) => Some(packet),
            Err(_) => {
                *errors += 1;
                None
            }
        }
    }
}

/// One WebRTC leg of a session.
#[derive(Debug)]
pub struct RtcLeg {
    /// Its peer on the core's endpoint.
    pub peer: PeerId,
    /// What it is to the session.
    pub role: RtcRole,
    /// Which way its audio flows.
    pub flow: Flow,
    /// ICE and DTLS are up.
    pub connected: bool,
    /// Its first audio packet arrived (the track "arrived").
    pub heard: bool,
    /// Audio from the peer (publishers).
    pub inbound: Option<Inbound>,
    /// Audio to the peer.
    pub outbound: Option<Outbound>,
}

impl RtcLeg {
    /// A new leg; publishers get a playout buffer and decoder, senders an encoder.
    pub fn new(peer: PeerId, role: RtcRole, flow: Flow, opus: OpusSettings, playout: PlayoutConfig) -> Self {
        let inbound = (flow.receives && role != RtcRole::Listener).then(|| Inbound::new(playout)).flatten();
        let outbound = flow.sends.then(|| Outbound::new(opus));
        Self { peer, role, flow, connected: false, heard: false, inbound, outbound }
    }

    /// When this leg's playout next releases a frame.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.inbound.as_ref().and_then(|i| i.playout.poll_timeout())
    }
}

/// Frames each source may queue for the mix before the oldest go (60 ms).
const MIX_QUEUE: usize = 3;
/// Ticks with nothing to mix before the mixer sleeps until the next frame.
const IDLE_TICKS: u32 = 5;

/// The WHEP mix: caller and agent summed every 20 ms, encoded once for every listener.
pub struct Mixer {
    caller: VecDeque<Pcm>,
    agent: VecDeque<Pcm>,
    /// 8 → 48 kHz per source, for mixing telephony audio with a 48 kHz source.
    up: [Option<Resampler>; 2],
    out: Outbound,
    next: Option<Instant>,
    idle: u32,
}

impl std::fmt::Debug for Mixer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mixer").field("next", &self.next).finish_non_exhaustive()
    }
}

/// Which side of the call a frame comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The caller.
    Caller,
    /// The agent.
    Agent,
}

impl Mixer {
    /// An idle mixer encoding with `opus`.
    pub fn new(opus: OpusSettings) -> Self {
        Self {
            caller: VecDeque::new(),
            agent: VecDeque::new(),
            up: [None, None],
            out: Outbound::new(opus),
            next: None,
            idle: 0,
        }
    }

    /// Queues a frame from `side`; the mixer starts ticking if it slept.
    pub fn push(&mut self, now: Instant, side: Side, frame: Pcm) {
        let q = match side {
            Side::Caller => &mut self.caller,
            Side::Agent => &mut self.agent,
        };
        if q.len() >= MIX_QUEUE {
            q.pop_front();
        }
        q.push_back(frame);
        self.idle = 0;
        if self.next.is_none() {
            self.next = Some(now);
        }
    }

    /// When the next mix is due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.next
    }

    /// The mix due at `now`, as one Opus packet, if anything was there to mix; a mix that fails to
    /// encode (not sent) adds one to `errors`.
    pub fn tick(&mut self, now: Instant, timing: Timing<'_>, errors: &mut u64) -> Option<Bytes> {
        let due = self.next?;
        if now < due {
            return None;
        }
        // Keep the 20 ms grid; after a long stall, restart it from now.
        let next = due + FRAME;
        self.next = Some(if next + FRAME < now { now + FRAME } else { next });
        let (c, a) = (self.caller.pop_front(), self.agent.pop_front());
        if c.is_none() && a.is_none() {
            self.idle += 1;
            if self.idle >= IDLE_TICKS {
                self.next = None;
            }
            return None;
        }
        let rate = match (&c, &a) {
            (Some(x), Some(y)) if x.rate != y.rate => SampleRate::Hz48000,
            (Some(x), _) | (_, Some(x)) => x.rate,
            (None, None) => return None,
        };
        let mut mix = Pcm::silence(rate);
        for (i, frame) in [c, a].into_iter().enumerate() {
            let Some(frame) = frame else { continue };
            let frame = if frame.rate == rate {
                frame
            } else {
                let Some(samples) = resample(&mut self.up[i], &frame, rate, timing) else { continue };
                Pcm { rate, samples }
            };
            for (m, s) in mix.samples.iter_mut().zip(&frame.samples) {
                *m = m.saturating_add(*s);
            }
        }
        self.out.encode(&mix, timing, errors)
    }
}

/// Cuts audio of any chunk size into 20 ms frames (Opus, the mix and the VAD need whole frames;
/// Twilio-protocol peers may send any size).
#[derive(Debug)]
pub struct Framer {
    rate: SampleRate,
    buf: Vec<i16>,
}

impl Framer {
    /// A framer for audio at `rate`.
    pub fn new(rate: SampleRate) -> Self {
        Self { rate, buf: Vec::new() }
    }

    /// Adds `samples`; returns the whole frames now complete (the rest waits, under one frame).
    pub fn push(&mut self, samples: &[i16]) -> Vec<Pcm> {
        let n = self.rate.hz() as usize / 50;
        self.buf.extend_from_slice(samples);
        let mut frames = Vec::new();
        let mut start = 0;
        while self.buf.len() - start >= n {
            frames.push(Pcm { rate: self.rate, samples: self.buf[start..start + n].to_vec() });
            start += n;
        }
        self.buf.drain(..start);
        frames
    }

    /// Drops the part frame waiting (audio that was cut off, as by a barge-in).
    pub fn reset(&mut self) {
        self.buf.clear();
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;

    /// A framer cuts any chunk sizes into 20 ms frames, and a reset drops the part frame waiting,
    /// so audio cut off by a barge-in is not glued to the next utterance.
    #[test]
    fn framer_frames_and_resets() {
        let mut f = Framer::new(SampleRate::Hz8000);
        let frames = f.push(&[1i16; 240]);
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].samples, vec![1i16; 160]);
        f.reset();
        let frames = f.push(&[2i16; 160]);
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].samples, vec![2i16; 160], "none of the 80 samples before the reset");
    }

    /// Records which codec calls were timed.
    struct Recorder {
        origin: Instant,
        ops: RefCell<Vec<CodecOp>>,
    }

    impl Recorder {
        fn new() -> Self {
            #[allow(clippy::disallowed_methods)] // Any instant will do: the recorder ignores durations.
            let origin = Instant::now();
            Self { origin, ops: RefCell::new(Vec::new()) }
        }
    }

    impl CodecTimer for Recorder {
        fn start(&self) -> Instant {
            self.origin
        }

        fn finish(&self, op: CodecOp, started: Instant) {
            assert_eq!(started, self.origin, "finish gets what start gave");
            self.ops.borrow_mut().push(op);
        }
    }

    fn tone(rate: SampleRate) -> Pcm {
        let n = rate.hz() as usize / 50;
        Pcm { rate, samples: (0..n).map(|i| ((i as f32 * 0.1).sin() * 8000.0) as i16).collect() }
    }

    /// Each codec call is timed once under its own op, and only codec calls; no timer times nothing.
    #[test]
    fn codec_calls_are_timed_by_op() {
        let recorder = Recorder::new();
        let timing = Timing::new(Some(&recorder));
        let mut down = None;
        let ulaw = to_ulaw(&mut down, &tone(SampleRate::Hz48000), timing).expect("resampled and encoded");
        assert_eq!(*recorder.ops.borrow(), [CodecOp::Resample, CodecOp::UlawEncode]);
        let pcm = ulaw_b64_to_pcm(&ulaw, timing).expect("base64");
        assert_eq!(pcm.samples.len(), FRAME_8K);
        assert!(ulaw_b64_to_pcm(b"not base64!", timing).is_none());
        let mut out = Outbound::new(OpusSettings::default());
        assert!(out.encode(&pcm, timing, &mut 0).is_some());
        assert_eq!(
            *recorder.ops.borrow(),
            [CodecOp::Resample, CodecOp::UlawEncode, CodecOp::UlawDecode, CodecOp::OpusEncode],
            "a payload that is not base64 reaches no codec"
        );
        let untimed = to_ulaw(&mut None, &tone(SampleRate::Hz48000), Timing::default());
        assert_eq!(untimed, Some(ulaw), "timing changes nothing");
        assert_eq!(recorder.ops.borrow().len(), 4);
        let names: Vec<&str> = CodecOp::ALL.iter().map(|op| op.name()).collect();
        assert_eq!(names, ["opus_encode", "opus_decode", "resample", "ulaw_encode", "ulaw_decode"]);
        assert!(CodecOp::ALL.iter().enumerate().all(|(i, op)| op.index() == i));
    }

    /// Opus packets of `ms` each of a 440 Hz tone at 48 kHz, made by libopus directly.
    fn opus_tone(ms: usize, count: usize) -> Vec<Bytes> {
        let mut enc = audiopus::coder::Encoder::new(
            audiopus::SampleRate::Hz48000,
            audiopus::Channels::Mono,
            audiopus::Application::Voip,
        )
        .expect("encoder");
        enc.set_inband_fec(true).expect("fec");
        enc.set_packet_loss_perc(20).expect("loss hint");
        let n = ms * 48;
        (0..count)
            .map(|k| {
                let pcm: Vec<i16> = (0..n)
                    .map(|i| ((((k * n + i) as f64) * 440.0 / 48_000.0 * std::f64::consts::TAU).sin() * 8000.0) as i16)
                    .collect();
                let mut out = vec![0u8; 4000];
                let len = enc.encode(&pcm, &mut out).expect("encode");
                Bytes::copy_from_slice(&out[..len])
            })
            .collect()
    }

    /// A leg's inbound path turns packets of 10, 40 and 60 ms into whole 20 ms frames of the tone,
    /// one per 20 ms, at 8 and 48 kHz, with nothing concealed; a lost packet is concealed for its
    /// length and the frames go on without a gap in their timing.
    #[test]
    fn any_packet_duration_makes_whole_frames() {
        for ms in [10usize, 40, 60] {
            for (wideband, n) in [(false, FRAME_8K), (true, FRAME_48K)] {
                for lose in [None, Some(20usize)] {
                    #[allow(clippy::disallowed_methods)] // The virtual clock's origin.
                    let t0 = Instant::now();
                    let mut inbound = Inbound::new(PlayoutConfig::default()).expect("decoder");
                    let packets = opus_tone(ms, 2400 / ms);
                    let mut frames = Vec::new();
                    let mut next = 0;
                    for t in 0..2500u64 {
                        let now = t0 + Duration::from_millis(t);
                        // Packet k arrives at k × ms.
                        while next < packets.len() && (next * ms) as u64 <= t {
                            if lose != Some(next) {
                                inbound.push(now, next as u16, (next * ms * 48) as u32, packets[next].clone());
                            }
                            next += 1;
                        }
                        while let Some(f) = inbound.next_frame(now, wideband, Timing::default()) {
                            frames.push((t, f));
                        }
                        if frames.len() == 100 {
                            break;
                        }
                    }
                    let what = format!("{ms} ms, {n} samples a frame, lost {lose:?}");
                    assert_eq!(frames.len(), 100, "{what}: 2 s of frames");
                    assert!(frames.windows(2).all(|w| w[1].0 - w[0].0 == 20), "{what}: one every 20 ms");
                    assert!(frames.iter().all(|(_, f)| f.samples.len() == n), "{what}: whole frames");
                    let s = inbound.playout.stats();
                    assert_eq!(inbound.decode_errors, 0, "{what}");
                    let lost_ms = lose.map_or(0, |_| ms as u64);
                    assert_eq!(s.late, 0, "{what}: {s:?}");
                    assert!((s.concealed + s.fec_recovered) * 20 >= lost_ms, "{what}: the loss is concealed: {s:?}");
                    if lose.is_none() {
                        assert_eq!((s.concealed, s.lost), (0, 0), "{what}: {s:?}");
                        let loud = frames.iter().skip(3).all(|(_, f)| {
                            let e = f.samples.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>() / n as f64;
                            e.sqrt() > 3000.0
                        });
                        assert!(loud, "{what}: every frame carries the tone");
                    }
                }
            }
        }
    }

    /// The shared resampler slot is made on first use, kept while the rates hold, made again when
    /// they change; a frame already at the target rate is copied without one.
    #[test]
    fn resampler_slot_follows_the_rates() {
        let mut slot = None;
        let same = resample(&mut slot, &tone(SampleRate::Hz16000), SampleRate::Hz16000, Timing::default());
        assert_eq!(same, Some(tone(SampleRate::Hz16000).samples));
        assert!(slot.is_none());
        let up = resample(&mut slot, &tone(SampleRate::Hz8000), SampleRate::Hz16000, Timing::default());
        assert_eq!(up.map(|s| s.len()), Some(320));
        let rates = slot.as_ref().map(|r| (r.from_rate(), r.to_rate()));
        assert_eq!(rates, Some((SampleRate::Hz8000, SampleRate::Hz16000)));
        let down = resample(&mut slot, &tone(SampleRate::Hz48000), SampleRate::Hz16000, Timing::default());
        assert_eq!(down.map(|s| s.len()), Some(320));
        let rates = slot.as_ref().map(|r| (r.from_rate(), r.to_rate()));
        assert_eq!(rates, Some((SampleRate::Hz48000, SampleRate::Hz16000)));
        let wrong = Pcm { rate: SampleRate::Hz8000, samples: vec![0; 10] };
        assert_eq!(resample(&mut slot, &wrong, SampleRate::Hz16000, Timing::default()), None, "a short frame");
    }
}
