//! A session's WebRTC legs and the audio state between its legs' formats: per leg a playout
//! buffer and Opus decoder (audio in) and an Opus encoder (audio out); per session the WHEP mix.
//!
//! Formats: Twilio legs carry base64 μ-law at 8 kHz; WebRTC legs carry Opus, decoded here at
//! 48 kHz. A frame is converted only toward the sinks that need another format, once per frame:
//! μ-law from 48 kHz goes through the source leg's own (stateful) 48 → 8 kHz resampler, and Opus is
//! encoded at the frame's own rate (libopus takes 8 kHz input directly, so telephony audio needs no
//! resampler on its way to a browser).
//!
//! Invariant: pure state and arithmetic; no sockets, no clock.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;

use crate::core::command::RtcRole;
use crate::media::g711;
use crate::media::opus::{OpusDecoder, OpusEncoder, OpusSettings};
use crate::media::playout::{Playout, PlayoutBuffer, PlayoutConfig};
use crate::media::resample::Resampler;
use crate::media::SampleRate;
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

/// Base64 μ-law (Twilio's payload) → 8 kHz PCM; `None` when it is not valid base64.
pub fn ulaw_b64_to_pcm(payload: &[u8]) -> Option<Pcm> {
    let codes = base64::engine::general_purpose::STANDARD.decode(payload).ok()?;
    let mut samples = vec![0; codes.len()];
    g711::decode_into(&codes, &mut samples);
    Some(Pcm { rate: SampleRate::Hz8000, samples })
}

/// 8 kHz PCM → base64 μ-law.
pub fn pcm8_to_ulaw_b64(samples: &[i16]) -> Bytes {
    let mut codes = vec![0; samples.len()];
    g711::encode_into(samples, &mut codes);
    Bytes::from(base64::engine::general_purpose::STANDARD.encode(codes))
}

/// Audio received from a WebRTC peer: reordered and timed by a playout buffer, then decoded.
pub struct Inbound {
    /// Reorders, absorbs jitter, decides where concealment goes.
    pub playout: PlayoutBuffer,
    /// Decodes at 48 kHz while a WebRTC peer or the mix hears this leg, else straight to 8 kHz
    /// (cheaper, and no resampler delay on the way to a phone).
    decoder: OpusDecoder,
    rate: SampleRate,
    /// 48 → 8 kHz, made when a μ-law sink first needs this leg's audio.
    down: Option<Resampler>,
    /// Packets that failed to decode.
    pub decode_errors: u64,
    /// The playout counters as last reported to the core (the core adds only what changed).
    pub reported: crate::media::playout::PlayoutStats,
}

impl std::fmt::Debug for Inbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbound").field("decode_errors", &self.decode_errors).finish_non_exhaustive()
    }
}

impl Inbound {
    fn new(playout: PlayoutConfig) -> Option<Self> {
        Some(Self {
            playout: PlayoutBuffer::new(playout),
            decoder: OpusDecoder::new(8_000).ok()?,
            rate: SampleRate::Hz8000,
            down: None,
            decode_errors: 0,
            reported: crate::media::playout::PlayoutStats::default(),
        })
    }

    /// The next frame due at `now`, decoded (a concealed frame when the packet is missing), at
    /// 48 kHz when `wideband`, else at 8 kHz.
    pub fn next_frame(&mut self, now: Instant, wideband: bool) -> Option<Pcm> {
        let item = self.playout.poll(now)?;
        let rate = if wideband { SampleRate::Hz48000 } else { SampleRate::Hz8000 };
        if rate != self.rate {
            // A sink that needs the other rate joined or left: a new decoder (a glitch-free
            // switch would need both running; this happens only when legs come and go).
            if let Ok(d) = OpusDecoder::new(rate.hz()) {
                self.decoder = d;
                self.rate = rate;
            }
        }
        let n = self.rate.hz() as usize / 50;
        let mut samples = vec![0i16; n];
        let result = match &item {
            Playout::Packet(p) => self.decoder.decode(p, &mut samples),
            Playout::Fec(next) => self.decoder.decode_fec(next, &mut samples),
            Playout::Conceal => self.decoder.conceal(&mut samples),
        };
        match result {
            Ok(got) if got == n => Some(Pcm { rate: self.rate, samples }),
            // A packet of another duration, or a broken one: conceal instead, counted.
            _ => {
                self.decode_errors += 1;
                samples.iter_mut().for_each(|s| *s = 0);
                self.decoder.conceal(&mut samples).ok()?;
                Some(Pcm { rate: self.rate, samples })
            }
        }
    }

    /// `frame` (from this leg) as base64 μ-law, through this leg's resampler.
    pub fn to_ulaw(&mut self, frame: &Pcm) -> Option<Bytes> {
        to_ulaw(&mut self.down, frame)
    }
}

/// `frame` as base64 μ-law: 8 kHz directly, other rates through `down` (made on first use).
pub fn to_ulaw(down: &mut Option<Resampler>, frame: &Pcm) -> Option<Bytes> {
    if frame.rate == SampleRate::Hz8000 {
        return Some(pcm8_to_ulaw_b64(&frame.samples));
    }
    if down.as_ref().is_none_or(|r| r.from_rate() != frame.rate) {
        *down = Resampler::new(frame.rate, SampleRate::Hz8000).ok();
    }
    let r = down.as_mut()?;
    let mut out = vec![0i16; r.output_len()];
    r.process(&frame.samples, &mut out).ok()?;
    Some(pcm8_to_ulaw_b64(&out))
}

/// Opus toward one peer: an encoder at the rate of the audio it is fed (made again when that changes).
pub struct Outbound {
    encoder: Option<(SampleRate, OpusEncoder)>,
    settings: OpusSettings,
    /// Frames that failed to encode.
    pub encode_errors: u64,
}

impl std::fmt::Debug for Outbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbound").field("encode_errors", &self.encode_errors).finish_non_exhaustive()
    }
}

impl Outbound {
    /// An encoder-to-be with `settings`.
    pub fn new(settings: OpusSettings) -> Self {
        Self { encoder: None, settings, encode_errors: 0 }
    }

    /// `frame` as one Opus packet.
    pub fn encode(&mut self, frame: &Pcm) -> Option<Bytes> {
        if self.encoder.as_ref().is_none_or(|(rate, _)| *rate != frame.rate) {
            self.encoder = OpusEncoder::new(frame.rate.hz(), &self.settings).ok().map(|e| (frame.rate, e));
        }
        let (_, encoder) = self.encoder.as_mut()?;
        match encoder.encode(&frame.samples) {
            // With DTX, silence comes out as 1–2 byte packets that are not sent: the peer treats
            // the gap as silence (Opus's own comfort noise), which is what DTX saves bandwidth for.
            Ok(packet) if self.settings.dtx && crate::media::opus::is_dtx_packet(&packet) => None,
            Ok(packet) => Some(packet),
            Err(_) => {
                self.encode_errors += 1;
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

    /// The mix due at `now`, as one Opus packet, if anything was there to mix.
    pub fn tick(&mut self, now: Instant) -> Option<Bytes> {
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
                let up = &mut self.up[i];
                if up.as_ref().is_none_or(|r| r.from_rate() != frame.rate || r.to_rate() != rate) {
                    *up = Resampler::new(frame.rate, rate).ok();
                }
                let Some(r) = up.as_mut() else { continue };
                let mut out = vec![0i16; r.output_len()];
                if r.process(&frame.samples, &mut out).is_err() {
                    continue;
                }
                Pcm { rate, samples: out }
            };
            for (m, s) in mix.samples.iter_mut().zip(&frame.samples) {
                *m = m.saturating_add(*s);
            }
        }
        self.out.encode(&mix)
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
}
