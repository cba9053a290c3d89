//! A WebRTC publisher for tests that sends Opus packets of chosen durations (RFC 7587: 10, 20, 40,
//! 60 ms, or a mix that changes mid-stream), as SIP gateways, GStreamer or pion set to `ptime:60`
//! do: str0m with full ICE on its own loopback UDP socket, libopus (through audiopus, not the
//! relay's code) at 48 kHz. It only sends; another leg of the call hears what the relay made of
//! it. (A separate peer from [`crate::webrtc::Peer`], which always sends 20 ms frames.)
//!
//! Invariant: every loop is bounded by the duration given; nothing here blocks without a timeout.

use std::net::UdpSocket;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use audiopus::coder::Encoder;
use audiopus::{Application, Channels, SampleRate};
use str0m::change::{SdpAnswer, SdpPendingOffer};
use str0m::format::Codec;
use str0m::media::{Direction, Frequency, MediaKind, MediaTime, Mid};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, Input, Output, Rtc};

/// A send-only WebRTC peer whose Opus packets last as long as the test says.
pub struct Publisher {
    rtc: Rtc,
    socket: UdpSocket,
    mid: Mid,
    pending: Option<SdpPendingOffer>,
    offer: String,
    encoder: Encoder,
    /// ICE and DTLS came up.
    pub connected: bool,
    /// RTP packets sent.
    pub sent: usize,
    /// Phase of the tone, in cycles.
    phase: f64,
    /// RTP timestamp of the next packet (48 kHz).
    ts: u64,
}

impl Publisher {
    /// A peer offering one send-only audio section.
    ///
    /// # Panics
    /// When a loopback socket or the encoder cannot be made.
    pub fn new() -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind loopback UDP");
        socket.set_read_timeout(Some(Duration::from_millis(2))).expect("timeout");
        let local = socket.local_addr().expect("addr");
        let mut rtc = Rtc::builder().clear_codecs().enable_opus(true, false).build(Instant::now());
        rtc.add_local_candidate(Candidate::host(local, Protocol::Udp).expect("host candidate"));
        let mut api = rtc.sdp_api();
        let mid = api.add_media(MediaKind::Audio, Direction::SendOnly, None, None, None);
        let (offer, pending) = api.apply().expect("an offer");
        let mut encoder = Encoder::new(SampleRate::Hz48000, Channels::Mono, Application::Voip).expect("encoder");
        encoder.set_inband_fec(true).expect("fec");
        Self {
            rtc,
            socket,
            mid,
            pending: Some(pending),
            offer: offer.to_sdp_string(),
            encoder,
            connected: false,
            sent: 0,
            phase: 0.0,
            ts: 0,
        }
    }

    /// The SDP offer to POST.
    pub fn offer(&self) -> &str {
        &self.offer
    }

    /// Applies the relay's answer.
    ///
    /// # Panics
    /// When the answer is not valid SDP for this offer.
    pub fn accept_answer(&mut self, answer: &str) {
        let answer = SdpAnswer::from_sdp_string(answer).expect("answer is SDP");
        let pending = self.pending.take().expect("one answer per offer");
        self.rtc.sdp_api().accept_answer(pending, answer).expect("answer accepted");
    }

    /// Runs until connected or `limit` passes; returns whether it connected.
    pub fn connect(&mut self, limit: Duration) -> bool {
        let end = Instant::now() + limit;
        while !self.connected && Instant::now() < end {
            self.service(Instant::now() + Duration::from_millis(5));
        }
        self.connected
    }

    /// Sends a `hz` tone (about -12 dBFS) as one Opus packet per entry of `packets_ms` (each that
    /// many ms long, timestamps contiguous), each at the moment its audio is complete, as a live
    /// source would; `progress` counts the packets sent.
    ///
    /// # Panics
    /// When a duration is not one libopus can encode (2.5, 5, 10, 20, 40, 60, 80, 100, 120 ms) or
    /// no Opus payload type was negotiated.
    pub fn send_tone(&mut self, hz: f64, packets_ms: &[u32], progress: &AtomicUsize) {
        let pt = self
            .rtc
            .writer(self.mid)
            .and_then(|w| w.payload_params().find(|p| p.spec().codec == Codec::Opus).map(|p| p.pt()))
            .expect("Opus negotiated");
        let start = Instant::now();
        let mut due = start;
        for &ms in packets_ms {
            due += Duration::from_millis(u64::from(ms));
            while Instant::now() < due {
                self.service(due);
            }
            let n = ms as usize * 48;
            let pcm: Vec<i16> = (0..n)
                .map(|_| {
                    self.phase = (self.phase + hz / 48_000.0).fract();
                    // Truncation is the intent: a sample value.
                    #[allow(clippy::cast_possible_truncation)]
                    let s = ((self.phase * std::f64::consts::TAU).sin() * 8000.0) as i16;
                    s
                })
                .collect();
            let mut out = vec![0u8; 4000];
            let len = self.encoder.encode(&pcm, &mut out).expect("a standard Opus duration");
            out.truncate(len);
            let time = MediaTime::new(self.ts, Frequency::FORTY_EIGHT_KHZ);
            self.ts += n as u64;
            if let Some(w) = self.rtc.writer(self.mid) {
                let _ = w.write(pt, Instant::now(), time, out);
            }
            self.drain();
            self.sent += 1;
            progress.fetch_add(1, Ordering::Relaxed);
        }
        // A little longer, so the last packets are surely out.
        self.service(Instant::now() + Duration::from_millis(20));
    }

    /// Handles datagrams and timers until `until`.
    fn service(&mut self, until: Instant) {
        let mut buf = vec![0u8; 2048];
        loop {
            self.drain();
            if Instant::now() >= until {
                return;
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
    }

    fn drain(&mut self) {
        loop {
            match self.rtc.poll_output() {
                Ok(Output::Timeout(_)) | Err(_) => return,
                Ok(Output::Transmit(t)) => {
                    let _ = self.socket.send_to(&t.contents, t.destination);
                }
                Ok(Output::Event(Event::Connected)) => self.connected = true,
                Ok(Output::Event(_)) => {}
            }
        }
    }
}

impl Default for Publisher {
    fn default() -> Self {
        Self::new()
    }
}
