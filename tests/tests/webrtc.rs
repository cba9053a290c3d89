//! WebRTC legs (WHIP/WHEP) against the real relay with a str0m peer over loopback: audio both ways
//! between WebRTC peers and Twilio callers, the media-level controls, the mix, loss concealment,
//! and the HTTP contract of the offer endpoints.

use std::time::Duration;

use relay_tests::telephony::{unb64, TwilioCaller};
use relay_tests::webrtc::{dominant_hz, rms, Peer, Send};
use relay_tests::{assert_error, Relay, Response};
use str0m::media::Direction;

/// G.711 μ-law of one sample (the classic algorithm, written independently of the relay's tables).
fn ulaw(sample: i16) -> u8 {
    const BIAS: i32 = 0x84;
    let mut s = i32::from(sample);
    let sign = if s < 0 { 0x80 } else { 0 };
    if s < 0 {
        s = -s;
    }
    s = (s + BIAS).min(32635 + BIAS);
    let exponent = (7 - (s.leading_zeros() as i32 - 17)).clamp(0, 7);
    let mantissa = (s >> (exponent + 3)) & 0x0f;
    !(sign | (exponent << 4) as u8 as i32 | mantissa) as u8
}

fn unulaw(code: u8) -> i16 {
    let c = !code;
    let sign = c & 0x80;
    let exponent = i32::from((c >> 4) & 0x07);
    let mantissa = i32::from(c & 0x0f);
    let magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84;
    (if sign != 0 { -magnitude } else { magnitude }) as i16
}

/// `seconds` of a μ-law tone in 20 ms frames.
fn tone_frames(hz: f32, seconds: f32) -> Vec<Vec<u8>> {
    let total = (8000.0 * seconds) as usize;
    let samples: Vec<u8> =
        (0..total).map(|i| ulaw(((i as f32 * hz / 8000.0 * std::f32::consts::TAU).sin() * 8000.0) as i16)).collect();
    samples.chunks(160).map(<[u8]>::to_vec).collect()
}

fn offer(relay: &Relay, path: &str, token: &str, sdp: &str) -> Response {
    let bearer = format!("Bearer {token}");
    relay.request("POST", path, &[("Content-Type", "application/sdp"), ("Authorization", &bearer)], Some(sdp))
}

/// Publishes `peer` at `path` and connects it; returns the leg's Location.
fn publish(relay: &Relay, peer: &mut Peer, path: &str, token: &str) -> String {
    let r = offer(relay, path, token, peer.offer());
    assert_eq!(r.status, 201, "{path}: {}", r.text());
    assert_eq!(r.header("content-type"), Some("application/sdp"));
    assert!(r.header("etag").is_some(), "WHIP answers carry an ETag");
    let location = r.header("location").expect("a Location").to_owned();
    peer.accept_answer(&r.text());
    assert!(peer.connect(Duration::from_secs(5)), "{path}: ICE and DTLS connect");
    location
}

/// What a Twilio caller heard, as 8 kHz PCM.
fn caller_heard(caller: &TwilioCaller) -> Vec<i16> {
    caller
        .events_named("media")
        .iter()
        .filter_map(|(_, m)| m["media"]["payload"].as_str().map(unb64))
        .flatten()
        .map(unulaw)
        .collect()
}

/// A WHIP agent's tone reaches a Twilio caller as μ-law at the tone's frequency, and the caller's
/// tone reaches the agent as Opus at its frequency; the answer names the session's own core.
#[test]
fn whip_agent_and_twilio_caller_hear_each_other() {
    let relay = Relay::start(&[]);
    let id = "rtc-both-ways";
    assert_eq!(relay.start_call(id, "tok").status, 200);
    let caller = TwilioCaller::start(&relay, id, &[]);
    let mut agent = Peer::new(Direction::SendRecv);
    let r = offer(&relay, &format!("/whip/{id}?role=agent"), "tok", agent.offer());
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.core(), Some(relay_tests::owner(id, relay.cores())));
    let candidate = agent.accept_answer(&r.text());
    assert!(candidate.ip().is_loopback(), "the candidate is the relay's loopback address: {candidate}");
    assert!(agent.connect(Duration::from_secs(5)), "ICE and DTLS connect");
    caller.send_audio(&tone_frames(1000.0, 2.5));
    agent.run(Duration::from_secs(2), Send::Tone(440.0));
    let heard = caller_heard(&caller);
    assert!(heard.len() >= 8000, "the caller heard {} samples of the agent", heard.len());
    let hz = dominant_hz(&heard, 8000).expect("enough audio");
    assert!((hz - 440.0).abs() <= 20.0, "the caller hears the agent's 440 Hz tone, got {hz}");
    assert!(agent.received >= 50, "the agent received {} frames", agent.received);
    let hz = dominant_hz(&agent.heard, 48_000).expect("enough audio");
    assert!((hz - 1000.0).abs() <= 20.0, "the agent hears the caller's 1 kHz tone, got {hz}");
}

/// The offer endpoints' HTTP contract: token, session, content type, SDP, role conflicts, DELETE.
#[test]
fn whip_contract() {
    let relay = Relay::start(&[]);
    let id = "rtc-contract";
    assert_eq!(relay.start_call(id, "tok").status, 200);
    let peer = Peer::new(Direction::SendOnly);
    assert_error(&offer(&relay, &format!("/whip/{id}"), "wrong", peer.offer()), 401);
    assert_error(&offer(&relay, "/whip/nobody", "tok", peer.offer()), 404);
    assert_error(&offer(&relay, &format!("/whip/{id}"), "tok", "v=0\r\nnot sdp"), 400);
    assert_error(&offer(&relay, &format!("/whip/{id}?role=boss"), "tok", peer.offer()), 400);
    assert_error(&offer(&relay, &format!("/whip/{id}?role=custom"), "tok", peer.offer()), 400);
    let r = relay.request(
        "POST",
        &format!("/whip/{id}"),
        &[("Content-Type", "text/plain"), ("Authorization", "Bearer tok")],
        Some(peer.offer()),
    );
    assert_error(&r, 415);
    // A listener must receive audio: a send-only offer to WHEP is refused.
    assert_error(&offer(&relay, &format!("/whep/{id}"), "tok", peer.offer()), 400);
    let mut caller = Peer::new(Direction::SendOnly);
    let location = publish(&relay, &mut caller, &format!("/whip/{id}?role=caller"), "tok");
    assert!(location.starts_with(&format!("/whip/{id}/")), "{location}");
    let again = Peer::new(Direction::SendOnly);
    assert_error(&offer(&relay, &format!("/whip/{id}?role=caller"), "tok", again.offer()), 409);
    let status = relay.get(&format!("/call-status?sessionId={id}")).json();
    assert_eq!(status["data"]["isConnected"], true, "a connected WHIP caller is the session's caller");
    assert_error(&relay.request("PATCH", &location, &[("Authorization", "Bearer tok")], Some("")), 405);
    assert_error(&relay.request("DELETE", &location, &[("Authorization", "Bearer nope")], None), 401);
    assert_error(
        &relay.request("DELETE", &format!("/whip/{id}/999999"), &[("Authorization", "Bearer tok")], None),
        404,
    );
    let r = relay.request("DELETE", &location, &[("Authorization", "Bearer tok")], None);
    assert_eq!(r.status, 200, "{}", r.text());
    // The caller leaving ends the call, as a Twilio caller hanging up does.
    assert_error(&relay.get(&format!("/call-status?sessionId={id}")), 404);
}
