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
        Self::with(Direction::SendRecv, Want::Receive)
    }

    /// The same with a client whose audio flows `dir`, for an endpoint that wants `want`.
    fn with(dir: Direction, want: Want) -> (Self, String, Flow) {
        let now = origin();
        let relay: SocketAddr = "127.0.0.1:4000".parse().expect("addr");
        let mut ep = Endpoint::new(Certificate::generate().expect("cert"), relay, 4);
        let (mut c, offer, pending, caddr) = client(dir, now);
        let (peer, answer, flow) = ep.accept(now, &offer, want).expect("accepted");
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

/// The trickle-ICE fragment a client would PATCH for its current ICE state: its credentials from
/// `sdp` (its offer), the first section's mid, and `candidates`.
fn fragment_of(sdp: &str, candidates: &[&str]) -> sdpfrag::IceFragment {
    let (ufrag, pwd) = remote_credentials(sdp).expect("credentials");
    let mid = sdp.lines().find_map(|l| l.strip_prefix("a=mid:")).expect("a mid");
    let mut text =
        format!("a=ice-ufrag:{ufrag}\r\na=ice-pwd:{pwd}\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:{mid}\r\n");
    for c in candidates {
        text.push_str(&format!("a={c}\r\n"));
    }
    text.push_str("a=end-of-candidates\r\n");
    sdpfrag::IceFragment::parse(&text).expect("fragment")
}

/// Rounds until the relay reports the peer connected and the client has heard `frames` of the
/// relay's audio; returns whether both happened.
fn run_until_heard(link: &mut Link, frames: usize, mut sent: impl FnMut(&[u8])) -> bool {
    let peer = link.peer;
    let (mut connected, mut heard) = (link.ep.peers.get(&peer).is_some_and(|p| p.connected), 0);
    for _ in 0..2000 {
        let (client_events, events) = link.round(&mut sent);
        heard += client_events.iter().filter(|e| matches!(e, Event::MediaData(_))).count();
        connected |= events.contains(&PeerEvent::Connected(peer));
        if connected && link.ep.write_audio(link.now, peer, &[0xf8, 0xff, 0xfe], 960) && heard >= frames {
            return true;
        }
        link.tick();
    }
    false
}

/// A client that offered no candidates trickles them: the fragment is taken (unusable mDNS
/// candidates skipped and counted) and the call connects.
#[test]
fn trickled_candidates_are_taken() {
    let now = origin();
    let relay: SocketAddr = "127.0.0.1:4000".parse().expect("addr");
    let mut ep = Endpoint::new(Certificate::generate().expect("cert"), relay, 4);
    let caddr: SocketAddr = "127.0.0.1:5000".parse().expect("addr");
    let mut c = Rtc::builder().build(now);
    let mut api = c.sdp_api();
    api.add_media(MediaKind::Audio, Direction::SendRecv, None, None, None);
    let (offer, pending) = api.apply().expect("offer");
    let offer = offer.to_sdp_string();
    assert!(!offer.contains("a=candidate"), "nothing gathered yet: {offer}");
    let (peer, answer, _) = ep.accept(now, &offer, Want::Receive).expect("accepted");
    c.sdp_api().accept_answer(pending, SdpAnswer::from_sdp_string(&answer).expect("sdp")).expect("answer");
    let host = Candidate::host(caddr, Protocol::Udp).expect("candidate");
    c.add_local_candidate(host.clone());
    let line = host.to_sdp_string();
    let fragment = fragment_of(&offer, &[&line, "candidate:2 1 udp 1 f00d.local 5001 typ host"]);
    assert_eq!(ep.handle_ice_fragment(now, peer, &fragment), Ok(IceUpdate::Trickled));
    assert_eq!(ep.stats().skipped_candidates, 1, "the mDNS name is skipped");
    let mut link = Link { now, relay, ep, c, caddr, peer };
    assert!(run_until_heard(&mut link, 5, |_| {}), "connected after trickling");
}

/// A client may trickle at most `TRICKLED_PER_SESSION` candidates into one ICE session (str0m
/// keeps each until a restart); past it the fragment is refused whole, and a restart starts the
/// count again.
#[test]
fn trickled_candidates_are_bounded_per_ice_session() {
    let now = origin();
    let relay: SocketAddr = "127.0.0.1:4000".parse().expect("addr");
    let mut ep = Endpoint::new(Certificate::generate().expect("cert"), relay, 4);
    let mut c = Rtc::builder().build(now);
    let mut api = c.sdp_api();
    api.add_media(MediaKind::Audio, Direction::SendRecv, None, None, None);
    let (offer, pending) = api.apply().expect("offer");
    let offer = offer.to_sdp_string();
    let (peer, answer, _) = ep.accept(now, &offer, Want::Receive).expect("accepted");
    c.sdp_api().accept_answer(pending, SdpAnswer::from_sdp_string(&answer).expect("sdp")).expect("answer");
    let lines: Vec<String> = (0..sdpfrag::MAX_CANDIDATES)
        .map(|i| format!("candidate:{i} 1 udp 1 192.0.2.1 {} typ host", 6000 + i))
        .collect();
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    for _ in 0..TRICKLED_PER_SESSION / sdpfrag::MAX_CANDIDATES {
        assert_eq!(ep.handle_ice_fragment(now, peer, &fragment_of(&offer, &refs)), Ok(IceUpdate::Trickled));
    }
    let one = fragment_of(&offer, &refs[..1]);
    assert!(matches!(ep.handle_ice_fragment(now, peer, &one), Err(IceError::Mismatch(_))), "past the bound");
    let mut api = c.sdp_api();
    api.ice_restart(true);
    let (restart, _pending) = api.apply().expect("a restart offer");
    let restart = restart.to_sdp_string();
    let update = ep.handle_ice_fragment(now, peer, &fragment_of(&restart, &refs)).expect("restarted");
    assert!(matches!(update, IceUpdate::Restarted { .. }), "{update:?}");
    assert_eq!(ep.handle_ice_fragment(now, peer, &fragment_of(&restart, &refs)), Ok(IceUpdate::Trickled));
    let one = fragment_of(&restart, &refs[..1]);
    assert!(matches!(ep.handle_ice_fragment(now, peer, &one), Err(IceError::Mismatch(_))), "the new session's bound");
}

/// An ICE restart mid-call: the relay answers new credentials and its candidate, routes by the
/// new ufrag only, and audio keeps flowing once the client switches.
#[test]
fn ice_restart_keeps_the_call() {
    let (link, answer, _) = Link::new();
    restart_keeps_the_call(link, &answer);
}

/// The same for a WHEP listener (a receive-only client): its offer re-applied is still accepted.
#[test]
fn ice_restart_keeps_a_listener() {
    let (link, answer, flow) = Link::with(Direction::RecvOnly, Want::Send);
    assert_eq!(flow, Flow { receives: false, sends: true });
    restart_keeps_the_call(link, &answer);
}

/// Connects `link`, restarts ICE from the client through a fragment, applies the relay's answer
/// fragment on the client, and checks the call goes on over the new credentials.
fn restart_keeps_the_call(mut link: Link, answer: &str) {
    let peer = link.peer;
    assert!(run_until_heard(&mut link, 5, |_| {}), "connected before the restart");
    let old = link.ep.ice_tag(peer).expect("a tag").to_owned();
    let mut api = link.c.sdp_api();
    let creds = api.ice_restart(true);
    let (offer, pending) = api.apply().expect("a restart offer");
    let fragment = fragment_of(&offer.to_sdp_string(), &[]);
    assert_eq!(fragment.ufrag.as_deref(), Some(creds.ufrag.as_str()));
    let IceUpdate::Restarted { fragment: reply } =
        link.ep.handle_ice_fragment(link.now, peer, &fragment).expect("restarted")
    else {
        panic!("a new ufrag is a restart");
    };
    let new = link.ep.ice_tag(peer).expect("a tag").to_owned();
    assert_ne!(old, new, "a new ICE session, a new tag");
    assert_eq!(link.ep.by_ufrag.get(&new), Some(&peer));
    assert_eq!(link.ep.by_ufrag.get(&old), None, "the old ufrag is forgotten");
    let reply = sdpfrag::IceFragment::parse(&reply).expect("our fragment parses");
    assert_eq!(reply.ufrag.as_deref(), Some(new.as_str()));
    assert_eq!(reply.candidates.len(), 1, "the relay's one candidate");
    // The client applies the fragment as its new remote description.
    let pwd = reply.pwd.as_deref().expect("a pwd");
    let restarted = with_credentials(answer, Some((&new, pwd)));
    link.c
        .sdp_api()
        .accept_answer(pending, SdpAnswer::from_sdp_string(&restarted).expect("sdp"))
        .expect("the restart answer");
    link.c.add_remote_candidate(Candidate::from_sdp_string(&reply.candidates[0]).expect("candidate"));
    let mut checks = 0;
    let counted = |d: &[u8]| {
        if stun::kind(d) == stun::Kind::Stun && stun::request_ufrag(d) == Some(new.as_str()) {
            checks += 1;
        }
    };
    assert!(run_until_heard(&mut link, 50, counted), "audio continues after the restart");
    assert!(checks > 0, "the client checks with the new credentials");
    assert_eq!(link.ep.stats().peers, 1, "the call was not lost");
    // The same fragment again is a trickle in the new session.
    assert_eq!(link.ep.handle_ice_fragment(link.now, peer, &fragment), Ok(IceUpdate::Trickled));
}

/// Fragments that do not fit the session are refused and change nothing.
#[test]
fn fragment_refusals() {
    let (mut link, _, _) = Link::new();
    let (peer, now) = (link.peer, link.now);
    let offer_creds = link.ep.peers.get(&peer).and_then(|p| p.remote.clone()).expect("remote credentials");
    let tag = link.ep.ice_tag(peer).expect("tag").to_owned();
    let parse = |t: &str| sdpfrag::IceFragment::parse(t).expect("parses");
    let unknown_mid = parse("m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:nope\r\n");
    assert!(matches!(link.ep.handle_ice_fragment(now, peer, &unknown_mid), Err(IceError::Mismatch(_))));
    let pwd_only = parse(&format!("a=ice-ufrag:{}\r\na=ice-pwd:{}\r\n", offer_creds.0, "x".repeat(22)));
    assert!(matches!(link.ep.handle_ice_fragment(now, peer, &pwd_only), Err(IceError::Mismatch(_))));
    let no_pwd = parse("a=ice-ufrag:brandnew\r\n");
    assert!(matches!(link.ep.handle_ice_fragment(now, peer, &no_pwd), Err(IceError::Mismatch(_))));
    assert_eq!(link.ep.handle_ice_fragment(now, PeerId(999), &no_pwd), Err(IceError::Gone));
    assert_eq!(link.ep.ice_tag(peer), Some(tag.as_str()), "the ICE session in use is kept");
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
            if let PeerEvent::Audio { seq, rtp_time, payload, .. } = e {
                inbound.push(link.now, seq as u16, (rtp_time & 0xffff_ffff) as u32, payload);
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
