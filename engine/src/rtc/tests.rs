//! The endpoint against a str0m client peer, datagrams carried in memory.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use str0m::change::SdpAnswer;
use str0m::media::{Direction, MediaKind};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, Input, Output, Rtc};

use super::*;

fn origin() -> Instant {
    #[allow(clippy::disallowed_methods)] // The virtual clock's origin; the test advances it by hand.
    Instant::now()
}

fn client(dir: Direction, now: Instant) -> (Rtc, String, str0m::change::SdpPendingOffer, SocketAddr) {
    let addr: SocketAddr = "127.0.0.1:5000".parse().expect("addr");
    let mut rtc = Rtc::builder().build(now);
    rtc.add_local_candidate(Candidate::host(addr, Protocol::Udp).expect("candidate"));
    let mut api = rtc.sdp_api();
    api.add_media(MediaKind::Audio, dir, None, None, None);
    let (offer, pending) = api.apply().expect("offer");
    (rtc, offer.to_sdp_string(), pending, addr)
}

/// The relay's endpoint and a str0m client peer, joined by datagrams carried in memory.
struct Link {
    now: Instant,
    relay: SocketAddr,
    ep: Endpoint,
    c: Rtc,
    caddr: SocketAddr,
    peer: PeerId,
}

impl Link {
    /// Client offer → relay answer (returned) → client accepts it.
    fn new() -> (Self, String, Flow) {
        let now = origin();
        let relay: SocketAddr = "127.0.0.1:4000".parse().expect("addr");
        let mut ep = Endpoint::new(Certificate::generate().expect("cert"), relay, 4);
        let (mut c, offer, pending, caddr) = client(Direction::SendRecv, now);
        let (peer, answer, flow) = ep.accept(now, &offer, Want::Receive).expect("accepted");
        c.sdp_api().accept_answer(pending, SdpAnswer::from_sdp_string(&answer).expect("sdp")).expect("answer");
        (Self { now, relay, ep, c, caddr, peer }, answer, flow)
    }

    /// One round at the current time: the client's datagrams to the relay (each also given to
    /// `sent`), the relay's back; returns the client's events and the relay's peer events.
    fn round(&mut self, mut sent: impl FnMut(&[u8])) -> (Vec<Event>, Vec<PeerEvent>) {
        let mut client_events = Vec::new();
        loop {
            match self.c.poll_output().expect("client output") {
                Output::Timeout(_) => break,
                Output::Transmit(t) => {
                    let data: Vec<u8> = t.contents.into();
                    sent(&data);
                    self.ep.handle_datagram(self.now, self.caddr, &data);
                }
                Output::Event(e) => client_events.push(e),
            }
        }
        while let Some(d) = self.ep.poll_transmit() {
            assert_eq!(d.to, self.caddr);
            let r = Receive::new(Protocol::Udp, self.relay, self.caddr, &d.data).expect("datagram");
            self.c.handle_input(Input::Receive(self.now, r)).expect("client input");
        }
        (client_events, std::iter::from_fn(|| self.ep.poll_event()).collect())
    }

    /// Moves time on 5 ms for both sides.
    fn tick(&mut self) {
        self.now += Duration::from_millis(5);
        self.c.handle_input(Input::Timeout(self.now)).expect("client timeout");
        self.ep.handle_timeout(self.now);
    }
}

/// Offer → answer → ICE and DTLS over in-memory datagrams → audio both ways.
#[test]
fn connects_and_carries_audio() {
    let (mut link, answer, flow) = Link::new();
    let relay = link.relay;
    assert_eq!(flow, Flow { receives: true, sends: true });
    assert!(answer.contains("a=ice-lite"), "{answer}");
    assert!(answer.contains(&format!("{} {}", relay.ip(), relay.port())), "the answer names the candidate: {answer}");
    let peer = link.peer;
    let mut connected = false;
    let mut client_connected = false;
    let mut heard = 0;
    for _ in 0..2000 {
        let (client_events, events) = link.round(|_| {});
        for e in client_events {
            match e {
                Event::Connected => client_connected = true,
                Event::MediaData(_) => heard += 1,
                _ => {}
            }
        }
        connected |= events.contains(&PeerEvent::Connected(peer));
        if connected && client_connected {
            assert!(link.ep.write_audio(link.now, peer, &[0xf8, 0xff, 0xfe], 960));
            if heard > 5 {
                break;
            }
        }
        link.tick();
    }
    assert!(connected && client_connected, "both sides connected");
    assert!(heard > 5, "the client heard the relay's audio ({heard} frames)");
    assert_eq!(link.ep.stats().unmatched, 0);
    link.ep.close(peer);
    assert_eq!(link.ep.stats().peers, 0);
}

/// A peer checking from more addresses than the relay keeps (4) loses the least recently used
/// one, never the path it keeps using: its media still arrives.
#[test]
fn busy_path_survives_new_addresses() {
    let (mut link, _, _) = Link::new();
    let (peer, caddr) = (link.peer, link.caddr);
    let mut check = None;
    let mut connected = false;
    for _ in 0..2000 {
        let (_, events) = link.round(|data| {
            if stun::kind(data) == stun::Kind::Stun {
                check = Some(data.to_vec());
            }
        });
        connected |= events.contains(&PeerEvent::Connected(peer));
        if connected && check.is_some() {
            break;
        }
        link.tick();
    }
    assert!(connected, "connected");
    let check = check.expect("a connectivity check");
    let (now, ep) = (link.now, &mut link.ep);
    let other = |i: u16| SocketAddr::from(([127, 0, 0, 1], 6000 + i));
    // Three more paths, then the one in use checks again, then a fourth new path.
    for i in 0..3 {
        ep.handle_datagram(now, other(i), &check);
    }
    ep.handle_datagram(now, caddr, &check);
    ep.handle_datagram(now, other(3), &check);
    assert_eq!(ep.by_addr.get(&caddr), Some(&peer), "the path in use is still bound");
    assert_eq!(ep.by_addr.get(&other(0)), None, "the least recently used one made room");
    assert_eq!(ep.by_addr.get(&other(3)), Some(&peer));
}

/// Offers that cannot work are refused with the reason; the core's peer limit holds.
#[test]
fn refusals() {
    let now = origin();
    let mut ep = Endpoint::new(Certificate::generate().expect("cert"), "127.0.0.1:4000".parse().expect("addr"), 1);
    assert!(matches!(ep.accept(now, "not sdp", Want::Receive), Err(OfferError::Malformed(_))));
    let (_, send_only, _, _) = client(Direction::SendOnly, now);
    assert!(matches!(ep.accept(now, &send_only, Want::Send), Err(OfferError::Direction(_))));
    let (_, recv_only, _, _) = client(Direction::RecvOnly, now);
    assert!(matches!(ep.accept(now, &recv_only, Want::Receive), Err(OfferError::Direction(_))));
    assert!(ep.accept(now, &send_only, Want::Receive).is_ok());
    assert_eq!(ep.accept(now, &recv_only, Want::Send).err(), Some(OfferError::TooManyPeers { limit: 1 }));
    // Datagrams nobody asked for are counted and dropped.
    ep.handle_datagram(now, "127.0.0.1:9".parse().expect("addr"), &[0x80, 0, 0, 0]);
    assert_eq!(ep.stats().unmatched, 1);
}

/// An accepted offer whose peer never connects is dropped by the deadline, with an event.
#[test]
fn unconnected_peers_expire() {
    let now = origin();
    let mut ep = Endpoint::new(Certificate::generate().expect("cert"), "127.0.0.1:4000".parse().expect("addr"), 4);
    let (_, offer, _, _) = client(Direction::SendOnly, now);
    let (peer, _, _) = ep.accept(now, &offer, Want::Receive).expect("accepted");
    let mut t = now;
    while t < now + CONNECT_DEADLINE + Duration::from_secs(1) {
        t = ep.poll_timeout().expect("a deadline while the peer exists").max(t + Duration::from_millis(1));
        ep.handle_timeout(t);
        if ep.stats().peers == 0 {
            break;
        }
    }
    assert_eq!(ep.stats().peers, 0, "dropped");
    // str0m's ICE gives up on a silent peer after 15 s; the endpoint's own deadline is the backstop.
    assert!(t <= now + CONNECT_DEADLINE, "by the deadline, not {:?}", t - now);
    let events: Vec<PeerEvent> = std::iter::from_fn(|| ep.poll_event()).collect();
    assert!(events.iter().any(|e| matches!(e, PeerEvent::Closed { peer: p, .. } if *p == peer)), "{events:?}");
}

/// Offers use prepared peers while there are any; the endpoint asks for more below its target.
#[test]
fn spares() {
    let now = origin();
    let mut ep = Endpoint::new(Certificate::generate().expect("cert"), "127.0.0.1:4000".parse().expect("addr"), 8);
    assert!(ep.wants_spare());
    for _ in 0..SPARES + 2 {
        let spare = Prepared::new(ep.certificate(), now);
        ep.add_spare(spare);
    }
    assert!(!ep.wants_spare(), "stocked, extra spares dropped");
    let (_, offer, _, _) = client(Direction::SendOnly, now);
    let (_, answer, _) = ep.accept(now + Duration::from_secs(1), &offer, Want::Receive).expect("accepted");
    assert!(answer.contains("a=ice-lite"));
    assert!(ep.wants_spare(), "one was used");
}

/// The answer states what Relay sends and takes: `a=ptime:20` and `a=maxptime:120` in its audio
/// section, once, and the client still accepts it.
#[test]
fn answer_states_ptime() {
    let (_, answer, _) = Link::new();
    let audio = answer.split("\r\nm=").find(|s| s.starts_with("audio ")).expect("an audio section");
    assert_eq!(audio.matches("a=ptime:20\r\n").count(), 1, "{answer}");
    assert_eq!(audio.matches("a=maxptime:120\r\n").count(), 1, "{answer}");
    assert!(answer.ends_with("\r\n"));
    let again = with_ptime(&answer, "0");
    assert_eq!(again.matches("a=ptime:").count(), 1, "not stated twice");
}

/// A peer sending 60 ms Opus packets over a real (in-memory) DTLS/SRTP link is heard whole: every
/// packet reaches the leg's playout with its timestamp, and comes out as 20 ms frames of the tone
/// with nothing concealed.
#[test]
fn sixty_ms_packets_are_heard_whole() {
    use crate::media::playout::PlayoutConfig;
    use crate::session::media::{Inbound, Timing};
    use str0m::format::Codec;

    let (mut link, answer, _) = Link::new();
    let mid = match answered_audio(&answer) {
        Answered::Opus { mid, .. } => Mid::from(mid.as_str()),
        other => panic!("{other:?}"),
    };
    let mut inbound = Inbound::new(PlayoutConfig::default()).expect("decoder");
    let enc = audiopus::coder::Encoder::new(
        audiopus::SampleRate::Hz48000,
        audiopus::Channels::Mono,
        audiopus::Application::Voip,
    )
    .expect("encoder");
    let mut connected = false;
    let (mut sent, mut next_send) = (0u64, None);
    let mut frames = Vec::new();
    for _ in 0..2000 {
        let (client_events, events) = link.round(|_| {});
        connected |= client_events.iter().any(|e| matches!(e, Event::Connected));
        for e in events {
            if let PeerEvent::Audio { rtp_time, payload, .. } = e {
                inbound.push(link.now, (rtp_time & 0xffff_ffff) as u32, payload);
            }
        }
        while let Some(f) = inbound.next_frame(link.now, true, Timing::default()) {
            frames.push(f.samples);
        }
        if connected && sent < 25 && next_send.is_none_or(|t| link.now >= t) {
            let pcm: Vec<i16> = (0..2880u64)
                .map(|i| {
                    ((((sent * 2880 + i) as f64) * 440.0 / 48_000.0 * std::f64::consts::TAU).sin() * 8000.0) as i16
                })
                .collect();
            let mut out = vec![0u8; 4000];
            let n = enc.encode(&pcm, &mut out).expect("encode");
            let pt = link
                .c
                .writer(mid)
                .and_then(|w| w.payload_params().find(|p| p.spec().codec == Codec::Opus).map(|p| p.pt()))
                .expect("Opus negotiated");
            let time = MediaTime::new(sent * 2880, str0m::media::Frequency::FORTY_EIGHT_KHZ);
            link.c.writer(mid).expect("writer").write(pt, link.now, time, out[..n].to_vec()).expect("write");
            sent += 1;
            next_send = Some(link.now + Duration::from_millis(60));
        }
        if sent == 25 && frames.len() >= 75 {
            break;
        }
        link.tick();
    }
    let s = inbound.playout.stats();
    assert_eq!((s.received, s.played), (25, 25), "{s:?}, sent {sent}, connected {connected}, frames {}", frames.len());
    assert_eq!((s.concealed, s.lost, s.late), (0, 0, 0), "{s:?}");
    assert_eq!(inbound.decode_errors, 0);
    assert!(frames.len() >= 75, "three 20 ms frames per packet: {}", frames.len());
    for (i, f) in frames.iter().enumerate().take(75).skip(3) {
        assert_eq!(f.len(), 960);
        let rms = (f.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>() / 960.0).sqrt();
        assert!(rms > 3000.0, "frame {i} carries the tone (rms {rms})");
    }
}
