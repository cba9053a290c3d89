//! A WebRTC peer for tests, as a browser would be one: str0m with full ICE on its own loopback UDP
//! socket, Opus (libopus through audiopus, not the relay's code) at 48 kHz in 20 ms frames. It
//! offers, takes the relay's answer, sends a tone (optionally dropping some of its RTP packets, as a
//! lossy network would) and records what it hears as PCM.
//!
//! Invariant: every loop is bounded by the duration given; nothing here blocks without a timeout.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use audiopus::coder::{Decoder, Encoder};
use audiopus::{Application, Channels, SampleRate};
use str0m::change::{SdpAnswer, SdpPendingOffer};
use str0m::format::Codec;
use str0m::media::{Direction, Frequency, MediaKind, MediaTime, Mid};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, Input, Output, Rtc};

pub mod ice;

/// 20 ms at 48 kHz.
pub const FRAME: usize = 960;

/// What the peer sends.
#[derive(Debug, Clone, Copy)]
pub enum Send {
    /// Nothing.
    Nothing,
    /// A sine tone of this frequency (Hz), at about -12 dBFS.
    Tone(f32),
}

/// A test WebRTC peer.
pub struct Peer {
    rtc: Rtc,
    socket: UdpSocket,
    mid: Mid,
    pending: Option<SdpPendingOffer>,
    offer: String,
    /// The relay's candidate from its answer.
    pub remote: Option<SocketAddr>,
    encoder: Encoder,
    decoder: Decoder,
    /// Every `n`th outgoing RTP packet is dropped (0: none).
    pub drop_every: u64,
    /// Everything heard, 48 kHz mono.
    pub heard: Vec<i16>,
    /// When each decoded frame arrived, with where it starts in `heard`.
    pub marks: Vec<(Instant, usize)>,
    /// RTP packets sent, dropped and received.
    pub sent: u64,
    /// RTP packets deliberately dropped.
    pub dropped: u64,
    /// Opus frames received and decoded.
    pub received: u64,
    /// ICE+DTLS came up.
    pub connected: bool,
    /// The relay closed the connection (DTLS close_notify).
    pub closed: bool,
    phase: f32,
    frames: u64,
}

impl Peer {
    /// A peer offering one audio section flowing `direction` (from the peer's side).
    ///
    /// # Panics
    /// When a loopback socket or the codec cannot be made.
    pub fn new(direction: Direction) -> Self {
        Self::new_on(direction, IpAddr::V4(Ipv4Addr::LOCALHOST))
    }

    /// As [`Self::new`], with its socket (and host candidate) on `ip`: the address a relay in
    /// another network namespace reaches this host at.
    ///
    /// # Panics
    /// As [`Self::new`].
    pub fn new_on(direction: Direction, ip: IpAddr) -> Self {
        let socket = UdpSocket::bind((ip, 0)).expect("bind UDP");
        socket.set_read_timeout(Some(Duration::from_millis(2))).expect("timeout");
        let local = socket.local_addr().expect("addr");
        let mut rtc = Rtc::builder().clear_codecs().enable_opus(true, false).build(Instant::now());
        rtc.add_local_candidate(Candidate::host(local, Protocol::Udp).expect("host candidate"));
        let mut api = rtc.sdp_api();
        let mid = api.add_media(MediaKind::Audio, direction, None, None, None);
        let (offer, pending) = api.apply().expect("an offer");
        let mut encoder = Encoder::new(SampleRate::Hz48000, Channels::Mono, Application::Voip).expect("encoder");
        encoder.set_inband_fec(true).expect("fec");
        encoder.set_packet_loss_perc(20).expect("loss hint");
        Self {
            rtc,
            socket,
            mid,
            pending: Some(pending),
            offer: offer.to_sdp_string(),
            remote: None,
            encoder,
            decoder: Decoder::new(SampleRate::Hz48000, Channels::Mono).expect("decoder"),
            drop_every: 0,
            heard: Vec::new(),
            marks: Vec::new(),
            sent: 0,
            dropped: 0,
            received: 0,
            connected: false,
            closed: false,
            phase: 0.0,
            frames: 0,
        }
    }

    /// How long one read of [`Self::run`] waits for a packet (2 ms by default): a peer that only
    /// listens, or many peers on few CPUs, can poll less often.
    ///
    /// # Panics
    /// When the socket refuses the timeout (zero).
    pub fn set_poll_interval(&mut self, interval: Duration) {
        self.socket.set_read_timeout(Some(interval)).expect("a read timeout");
    }

    /// The SDP offer to POST.
    pub fn offer(&self) -> &str {
        &self.offer
    }

    /// Applies the relay's answer; returns the candidate address it names.
    ///
    /// # Panics
    /// When the answer is not valid SDP or names no candidate.
    pub fn accept_answer(&mut self, answer: &str) -> SocketAddr {
        let remote = answer
            .lines()
            .filter_map(|l| l.strip_prefix("a=candidate:"))
            .find_map(|c| {
                let f: Vec<&str> = c.split_whitespace().collect();
                let ip = f.get(4)?;
                let port = f.get(5)?;
                format!("{ip}:{port}").parse::<SocketAddr>().ok()
            })
            .expect("the answer names a candidate");
        let answer = SdpAnswer::from_sdp_string(answer).expect("answer is SDP");
        let pending = self.pending.take().expect("one answer per offer");
        self.rtc.sdp_api().accept_answer(pending, answer).expect("answer accepted");
        self.remote = Some(remote);
        remote
    }

    /// Runs the peer for `duration`: sends `send` every 20 ms once connected, records what it hears.
    pub fn run(&mut self, duration: Duration, send: Send) {
        let end = Instant::now() + duration;
        let mut next_frame = Instant::now();
        let mut buf = vec![0u8; 2048];
        while Instant::now() < end {
            self.drain();
            let now = Instant::now();
            if self.connected && now >= next_frame {
                self.send_frame(send, now);
                next_frame += Duration::from_millis(20);
                if next_frame < now {
                    next_frame = now + Duration::from_millis(20);
                }
            }
            match self.socket.recv_from(&mut buf) {
                Ok((n, source)) => {
                    let local = self.socket.local_addr().expect("addr");
                    if let Ok(r) = Receive::new(Protocol::Udp, source, local, &buf[..n]) {
                        let _ = self.rtc.handle_input(Input::Receive(Instant::now(), r));
                    }
                }
                Err(_) => {
                    let _ = self.rtc.handle_input(Input::Timeout(Instant::now()));
                }
            }
        }
        self.drain();
    }

    /// What arrived between `from` and `to`.
    pub fn heard_between(&self, from: Instant, to: Instant) -> &[i16] {
        let start = self.marks.iter().find(|(t, _)| *t >= from).map_or(self.heard.len(), |(_, i)| *i);
        let end = self.marks.iter().find(|(t, _)| *t >= to).map_or(self.heard.len(), |(_, i)| *i);
        &self.heard[start..end.max(start)]
    }

    /// Runs until connected or `limit` passes; returns whether it connected.
    pub fn connect(&mut self, limit: Duration) -> bool {
        let end = Instant::now() + limit;
        while !self.connected && Instant::now() < end {
            self.run(Duration::from_millis(20), Send::Nothing);
        }
        self.connected
    }

    /// Hangs up.
    pub fn disconnect(&mut self) {
        self.rtc.disconnect();
        self.drain();
    }

    fn send_frame(&mut self, send: Send, now: Instant) {
        let pcm: Vec<i16> = match send {
            Send::Nothing => return,
            Send::Tone(hz) => (0..FRAME)
                .map(|_| {
                    self.phase += hz / 48_000.0;
                    if self.phase >= 1.0 {
                        self.phase -= 1.0;
                    }
                    // Truncation is the intent: a sample value.
                    #[allow(clippy::cast_possible_truncation)]
                    let s = ((self.phase * std::f32::consts::TAU).sin() * 8000.0) as i16;
                    s
                })
                .collect(),
        };
        let mut out = [0u8; 1500];
        let Ok(n) = self.encoder.encode(&pcm, &mut out) else { return };
        let pt = self
            .rtc
            .writer(self.mid)
            .and_then(|w| w.payload_params().find(|p| p.spec().codec == Codec::Opus).map(|p| p.pt()));
        let Some(pt) = pt else { return };
        let time = MediaTime::new(self.frames * FRAME as u64, Frequency::FORTY_EIGHT_KHZ);
        self.frames += 1;
        if let Some(w) = self.rtc.writer(self.mid) {
            let _ = w.write(pt, now, time, out[..n].to_vec());
        }
    }

    fn drain(&mut self) {
        loop {
            match self.rtc.poll_output() {
                Ok(Output::Timeout(_)) | Err(_) => return,
                Ok(Output::Transmit(t)) => {
                    let data: Vec<u8> = t.contents.into();
                    let rtp = data.len() > 12 && (128..192).contains(&data[0]) && !(64..96).contains(&(data[1] & 0x7f));
                    if rtp {
                        self.sent += 1;
                        if self.drop_every > 0 && self.sent % self.drop_every == 0 {
                            self.dropped += 1;
                            continue;
                        }
                    }
                    let _ = self.socket.send_to(&data, t.destination);
                }
                Ok(Output::Event(Event::Connected)) => self.connected = true,
                Ok(Output::Event(Event::Closed)) => self.closed = true,
                Ok(Output::Event(Event::MediaData(d))) => {
                    let mut pcm = vec![0i16; FRAME * 6];
                    if let Ok(n) = self.decoder.decode(Some(&d.data[..]), &mut pcm[..], false) {
                        self.received += 1;
                        self.marks.push((Instant::now(), self.heard.len()));
                        self.heard.extend_from_slice(&pcm[..n]);
                    }
                }
                Ok(Output::Event(_)) => {}
            }
        }
    }
}

/// The strongest frequency in `pcm` (at `rate`), searched from 100 Hz to 3.5 kHz in 10 Hz steps
/// (Goertzel), over at most the last second.
pub fn dominant_hz(pcm: &[i16], rate: u32) -> Option<f32> {
    let n = pcm.len().min(rate as usize);
    if n < rate as usize / 10 {
        return None;
    }
    let x = &pcm[pcm.len() - n..];
    let mut best = (0.0f64, 0.0f32);
    let mut f = 100.0f32;
    while f <= 3500.0 {
        let power = goertzel(x, rate, f64::from(f));
        if power > best.0 {
            best = (power, f);
        }
        f += 10.0;
    }
    Some(best.1)
}

/// The energy of `pcm` (at `rate`) at frequency `hz` (the Goertzel algorithm).
pub fn goertzel(pcm: &[i16], rate: u32, hz: f64) -> f64 {
    let w = std::f64::consts::TAU * hz / f64::from(rate);
    let c = 2.0 * w.cos();
    let (mut s1, mut s2) = (0.0f64, 0.0f64);
    for &v in pcm {
        let s = f64::from(v) + c * s1 - s2;
        s2 = s1;
        s1 = s;
    }
    s1 * s1 + s2 * s2 - c * s1 * s2
}

/// Root-mean-square level of `pcm`, in sample units.
pub fn rms(pcm: &[i16]) -> f64 {
    if pcm.is_empty() {
        return 0.0;
    }
    let sum: f64 = pcm.iter().map(|&s| f64::from(s) * f64::from(s)).sum();
    #[allow(clippy::cast_precision_loss)]
    let n = pcm.len() as f64;
    (sum / n).sqrt()
}
