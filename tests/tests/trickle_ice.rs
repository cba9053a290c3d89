//! Trickle ICE and ICE restarts on WHIP/WHEP leg resources (RFC 9725 §4.3) against the real relay
//! with a str0m peer over loopback: candidates trickled after the offer, a restart mid-call that
//! keeps the call, and the HTTP contract of `PATCH` (ETag/If-Match, content type, fragments).

use std::time::Duration;

use relay_tests::telephony::TwilioCaller;
use relay_tests::webrtc::{dominant_hz, Peer, Send};
use relay_tests::{assert_error, Relay, Response};
use str0m::media::Direction;

const SDPFRAG: &str = "application/trickle-ice-sdpfrag";

fn offer(relay: &Relay, path: &str, token: &str, sdp: &str) -> Response {
    let bearer = format!("Bearer {token}");
    relay.request("POST", path, &[("Content-Type", "application/sdp"), ("Authorization", &bearer)], Some(sdp))
}

fn patch(relay: &Relay, location: &str, if_match: Option<&str>, body: &str) -> Response {
    let mut headers = vec![("Content-Type", SDPFRAG), ("Authorization", "Bearer tok")];
    if let Some(tag) = if_match {
        headers.push(("If-Match", tag));
    }
    relay.request("PATCH", location, &headers, Some(body))
}

/// A WHIP publisher whose offer has no candidates trickles them (and end-of-candidates) with
/// `PATCH` and the 201's ETag: 204, and its audio reaches the Twilio caller.
#[test]
fn trickled_candidates_after_the_offer() {
    let relay = Relay::start(&[]);
    let id = "ice-trickle";
    assert_eq!(relay.start_call(id, "tok").status, 200);
    let caller = TwilioCaller::start(&relay, id, &[]);
    let mut agent = Peer::trickling(Direction::SendRecv);
    assert!(!agent.offer().contains("a=candidate"), "the offer carries no candidates");
    let r = offer(&relay, &format!("/whip/{id}?role=agent"), "tok", agent.offer());
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.header("accept-patch"), Some(SDPFRAG), "the 201 says what PATCH takes");
    let etag = r.header("etag").expect("an ETag for the ICE session").to_owned();
    assert!(etag.starts_with('"') && etag.ends_with('"'), "a strong entity-tag: {etag}");
    let location = r.header("location").expect("a Location").to_owned();
    agent.accept_answer(&r.text());
    let trickle = patch(&relay, &location, Some(&etag), &agent.trickle_fragment());
    assert_eq!(trickle.status, 204, "{}", trickle.text());
    assert!(trickle.text().is_empty());
    assert!(agent.connect(Duration::from_secs(5)), "ICE and DTLS connect");
    agent.run(Duration::from_millis(1500), Send::Tone(440.0));
    let heard = caller.heard_pcm();
    let hz = dominant_hz(&heard, 8000).expect("the caller heard the agent");
    assert!((hz - 440.0).abs() <= 20.0, "the caller hears the trickling agent's 440 Hz tone, got {hz}");
}

/// An ICE restart mid-call: `PATCH` with new credentials and `If-Match: *` gets 200, the relay's
/// new credentials and candidate as a fragment and a new ETag; the peer switches and audio keeps
/// flowing both ways; the old ETag is then refused with 412 and the new one accepted.
#[test]
fn ice_restart_mid_call_keeps_the_call() {
    let relay = Relay::start(&[]);
    let id = "ice-restart";
    assert_eq!(relay.start_call(id, "tok").status, 200);
    let caller = TwilioCaller::start(&relay, id, &[]);
    let mut agent = Peer::new(Direction::SendRecv);
    let r = offer(&relay, &format!("/whip/{id}?role=agent"), "tok", agent.offer());
    assert_eq!(r.status, 201, "{}", r.text());
    let old_tag = r.header("etag").expect("an ETag").to_owned();
    let location = r.header("location").expect("a Location").to_owned();
    let answer = r.text();
    agent.accept_answer(&answer);
    assert!(agent.connect(Duration::from_secs(5)), "ICE and DTLS connect");
    caller.send_audio(&tone_frames(1000.0, 6.0));
    agent.run(Duration::from_millis(800), Send::Tone(440.0));
    let before = agent.received;
    assert!(before > 10, "the agent hears the caller before the restart ({before} frames)");
    let heard_before = caller.heard_pcm().len();

    let restart = patch(&relay, &location, Some("*"), &agent.restart_ice());
    assert_eq!(restart.status, 200, "{}", restart.text());
    assert_eq!(restart.header("content-type"), Some(SDPFRAG));
    let new_tag = restart.header("etag").expect("a new ETag").to_owned();
    assert_ne!(new_tag, old_tag, "a new ICE session, a new entity-tag");
    let fragment = restart.text();
    assert!(fragment.contains("a=ice-ufrag:") && fragment.contains("a=ice-pwd:"), "{fragment}");
    assert!(fragment.contains("a=candidate:"), "the relay's candidate again: {fragment}");
    agent.accept_restart(&answer, &fragment);
    agent.run(Duration::from_millis(1500), Send::Tone(440.0));
    assert!(!agent.closed, "the call was not lost");
    assert!(agent.received >= before + 40, "the agent still hears the caller ({} frames)", agent.received - before);
    let heard = caller.heard_pcm();
    assert!(heard.len() >= heard_before + 8000, "the caller still hears the agent");
    let hz = dominant_hz(&heard, 8000).expect("enough audio");
    assert!((hz - 440.0).abs() <= 20.0, "after the restart the caller hears 440 Hz, got {hz}");
    let status = relay.get(&format!("/call-status?sessionId={id}")).json();
    assert_eq!(status["data"]["isActive"], true);

    // Out-of-order trickles for the old ICE session are refused; the new one takes them.
    let late = patch(&relay, &location, Some(&old_tag), &agent.trickle_fragment());
    assert_error(&late, 412);
    let trickle = patch(&relay, &location, Some(&new_tag), &agent.trickle_fragment());
    assert_eq!(trickle.status, 204, "{}", trickle.text());
}

/// `PATCH`'s HTTP contract: OPTIONS lists it (with Accept-Patch and a CORS preflight allowing it
/// and If-Match), 415 for another type, 428 without If-Match, 400 for a bad fragment or If-Match,
/// 401 without the token, 404 for an unknown leg; the offer endpoint itself takes no PATCH.
#[test]
fn patch_contract() {
    let relay = Relay::start(&[]);
    let id = "ice-contract";
    assert_eq!(relay.start_call(id, "tok").status, 200);
    let mut peer = Peer::new(Direction::SendOnly);
    let r = offer(&relay, &format!("/whip/{id}?role=caller"), "tok", peer.offer());
    assert_eq!(r.status, 201, "{}", r.text());
    let etag = r.header("etag").expect("an ETag").to_owned();
    let location = r.header("location").expect("a Location").to_owned();
    peer.accept_answer(&r.text());
    let body = peer.trickle_fragment();

    let options = relay.request("OPTIONS", &location, &[], None);
    assert_eq!(options.status, 204);
    assert_eq!(options.header("allow"), Some("PATCH, DELETE, OPTIONS"));
    assert_eq!(options.header("accept-patch"), Some(SDPFRAG));
    let preflight = relay.request(
        "OPTIONS",
        &location,
        &[
            ("Origin", "https://a.example"),
            ("Access-Control-Request-Method", "PATCH"),
            ("Access-Control-Request-Headers", "authorization, content-type, if-match"),
        ],
        None,
    );
    assert_eq!(preflight.status, 204);
    assert!(preflight.header("access-control-allow-methods").is_some_and(|m| m.contains("PATCH")));
    assert!(preflight.header("access-control-allow-headers").is_some_and(|h| h.contains("if-match")));
    let cors = relay.request("PATCH", &location, &[("Origin", "https://a.example")], Some(&body));
    assert!(cors.header("access-control-expose-headers").is_some_and(|h| h.contains("etag")));

    let wrong_type = relay.request(
        "PATCH",
        &location,
        &[("Content-Type", "application/sdp"), ("Authorization", "Bearer tok"), ("If-Match", &etag)],
        Some(&body),
    );
    assert_error(&wrong_type, 415);
    assert_error(&patch(&relay, &location, None, &body), 428);
    assert_error(&patch(&relay, &location, Some("\"someone-else\""), &body), 412);
    assert_error(&patch(&relay, &location, Some(&format!("W/{etag}")), &body), 412);
    assert_error(&patch(&relay, &location, Some("not-quoted"), &body), 400);
    assert_error(&patch(&relay, &location, Some(&etag), "v=0\r\ns=-\r\n"), 400);
    assert_error(&patch(&relay, &location, Some(&etag), ""), 400);
    let unknown_mid = body.replace("a=mid:", "a=mid:x");
    assert_error(&patch(&relay, &location, Some(&etag), &unknown_mid), 400);
    let huge = "a=x\r\n".repeat(5000);
    assert_error(&patch(&relay, &location, Some(&etag), &huge), 400);
    let unauthorized = relay.request(
        "PATCH",
        &location,
        &[("Content-Type", SDPFRAG), ("Authorization", "Bearer nope"), ("If-Match", &etag)],
        Some(&body),
    );
    assert_error(&unauthorized, 401);
    assert_error(&patch(&relay, &format!("/whip/{id}/999999"), Some("*"), &body), 404);
    assert_error(&patch(&relay, "/whip/nobody/1", Some("*"), &body), 404);
    assert_error(&patch(&relay, &format!("/whip/{id}"), Some("*"), &body), 405);
    // A good trickle after all that: the ICE session is intact.
    assert_eq!(patch(&relay, &location, Some(&etag), &body).status, 204);
    assert_eq!(patch(&relay, &location, Some("*"), &body).status, 204, "If-Match: * matches any session");
    assert!(peer.connect(Duration::from_secs(5)), "the caller connects");
}

/// `seconds` of a μ-law tone in 20 ms frames.
fn tone_frames(hz: f32, seconds: f32) -> Vec<Vec<u8>> {
    let total = (8000.0 * seconds) as usize;
    let samples: Vec<u8> = (0..total)
        .map(|i| relay_tests::telephony::ulaw(((i as f32 * hz / 8000.0 * std::f32::consts::TAU).sin() * 8000.0) as i16))
        .collect();
    samples.chunks(160).map(<[u8]>::to_vec).collect()
}
