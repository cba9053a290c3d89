//! WebRTC legs (WHIP/WHEP) against the real relay with a str0m peer over loopback: audio both ways
//! between WebRTC peers and Twilio callers, the media-level controls, the mix, loss concealment,
//! and the HTTP contract of the offer endpoints.

use std::time::Duration;

use relay_tests::telephony::{ulaw, unulaw, TwilioCaller};
use relay_tests::webrtc::{dominant_hz, rms, Peer, Send};
use relay_tests::{assert_error, Relay, Response};
use str0m::media::Direction;

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
    // The relay logs each core's WebRTC address in core order: the answer names the owner's.
    let logs = relay.logs().join("\n");
    let line =
        logs.lines().find(|l| l.contains("WebRTC (WHIP/WHEP) on udp ")).expect("the WebRTC addresses are logged");
    let addrs: Vec<&str> = line.split("on udp ").nth(1).expect("addresses").split(", ").map(str::trim).collect();
    assert_eq!(addrs.len(), relay.cores());
    assert_eq!(addrs[relay_tests::owner(id, relay.cores())], candidate.to_string(), "the owner core's socket");
    assert!(agent.connect(Duration::from_secs(5)), "ICE and DTLS connect");
    caller.send_audio(&tone_frames(1000.0, 2.5));
    agent.run(Duration::from_secs(2), Send::Tone(440.0));
    let heard = caller.heard_pcm();
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
    // PATCH takes trickle-ICE fragments only (tests/trickle_ice.rs has the rest of its contract).
    assert_error(&relay.request("PATCH", &location, &[("Authorization", "Bearer tok")], Some("")), 415);
    assert_error(&relay.request("DELETE", &location, &[("Authorization", "Bearer nope")], None), 401);
    assert_error(
        &relay.request("DELETE", &format!("/whip/{id}/999999"), &[("Authorization", "Bearer tok")], None),
        404,
    );
    let r = relay.request("DELETE", &location, &[("Authorization", "Bearer tok")], None);
    assert_eq!(r.status, 200, "{}", r.text());
    caller.run(Duration::from_millis(300), Send::Nothing);
    assert!(caller.closed, "the peer is told its leg ended (DTLS close_notify)");
    // The caller leaving ends the call, as a Twilio caller hanging up does, and the call is
    // recorded like a phone call.
    assert_error(&relay.get(&format!("/call-status?sessionId={id}")), 404);
    let call = relay_tests::poll_until("the WebRTC call's record", || {
        let v = relay.get("/analytics/project/default/recent").json();
        v["calls"].as_array()?.iter().find(|c| c["callSid"] == id).cloned()
    });
    assert_eq!(call["status"], "completed", "{call}");
}

/// Runs `peers` (each with what it sends) for `duration` on their own threads while `control`
/// runs on this one.
fn run_all(peers: &mut [(&mut Peer, Send)], duration: Duration, control: impl FnOnce()) {
    std::thread::scope(|s| {
        for (peer, send) in peers.iter_mut() {
            let send = *send;
            s.spawn(move || peer.run(duration, send));
        }
        control();
    });
}

fn post(relay: &Relay, path: &str, body: serde_json::Value) {
    let r = relay.post(path, &body);
    assert_eq!(r.status, 200, "{path}: {}", r.text());
}

/// Mute silences the caller toward a WebRTC agent and unmute restores it.
#[test]
fn mute_silences_the_agent() {
    let relay = Relay::start(&[]);
    let id = "rtc-mute";
    assert_eq!(relay.start_call(id, "tok").status, 200);
    let caller = TwilioCaller::start(&relay, id, &[]);
    let mut agent = Peer::new(Direction::SendRecv);
    publish(&relay, &mut agent, &format!("/whip/{id}?role=agent"), "tok");
    caller.send_audio(&tone_frames(1000.0, 4.0));
    let mut marks = Vec::new();
    run_all(&mut [(&mut agent, Send::Nothing)], Duration::from_millis(3600), || {
        let step = Duration::from_millis(1200);
        let t0 = std::time::Instant::now();
        std::thread::sleep(step);
        post(&relay, "/mute", serde_json::json!({ "sessionId": id }));
        let t1 = std::time::Instant::now();
        std::thread::sleep(step);
        post(&relay, "/unmute", serde_json::json!({ "sessionId": id }));
        let t2 = std::time::Instant::now();
        marks = vec![t0, t1, t2];
    });
    // Per 20 ms frame, so a frame decoded late on a loaded machine cannot decide a window.
    let settle = Duration::from_millis(300);
    let loud = |pcm: &[i16]| {
        let frames: Vec<f64> = pcm.chunks(960).map(rms).collect();
        frames.iter().filter(|r| **r > 1000.0).count() as f64 / frames.len().max(1) as f64
    };
    let before = loud(agent.heard_between(marks[0] + settle, marks[1]));
    let muted = loud(agent.heard_between(marks[1] + settle, marks[2]));
    let after = loud(agent.heard_between(marks[2] + settle, marks[2] + Duration::from_millis(1000)));
    assert!(before > 0.8, "before mute the agent hears the caller ({before:.2} of frames loud)");
    assert!(muted < 0.1, "muted, the agent hears silence ({muted:.2} of frames loud)");
    assert!(after > 0.8, "after unmute the agent hears the caller again ({after:.2} of frames loud)");
}

/// `/send-custom-stream` switches what the agent hears to a published custom stream, another
/// switch changes the tone, and `/resume-microphone` brings the caller back.
#[test]
fn custom_streams_replace_the_microphone() {
    let relay = Relay::start(&[]);
    let id = "rtc-custom";
    assert_eq!(relay.start_call(id, "tok").status, 200);
    let caller = TwilioCaller::start(&relay, id, &[]);
    let mut agent = Peer::new(Direction::SendRecv);
    publish(&relay, &mut agent, &format!("/whip/{id}?role=agent"), "tok");
    let mut c1 = Peer::new(Direction::SendOnly);
    publish(&relay, &mut c1, &format!("/whip/{id}?role=custom&streamId=c1"), "tok");
    let mut c2 = Peer::new(Direction::SendOnly);
    publish(&relay, &mut c2, &format!("/whip/{id}?role=custom&streamId=c2"), "tok");
    let tracks = relay.get(&format!("/track-status?sessionId={id}")).json();
    let sources: Vec<&str> = tracks["data"]["publishedTracks"]
        .as_array()
        .expect("tracks")
        .iter()
        .filter_map(|t| t["source"].as_str())
        .collect();
    assert!(sources.iter().filter(|s| **s == "custom").count() == 2, "both custom streams are tracks: {tracks}");
    caller.send_audio(&tone_frames(1000.0, 5.0));
    let mut marks = Vec::new();
    run_all(
        &mut [(&mut agent, Send::Nothing), (&mut c1, Send::Tone(600.0)), (&mut c2, Send::Tone(1500.0))],
        Duration::from_millis(4600),
        || {
            let step = Duration::from_millis(1100);
            let t0 = std::time::Instant::now();
            std::thread::sleep(step);
            post(
                &relay,
                "/send-custom-stream",
                serde_json::json!({ "sessionId": id, "streamId": "c1", "kind": "audio" }),
            );
            let t1 = std::time::Instant::now();
            std::thread::sleep(step);
            post(&relay, "/send-custom-stream", serde_json::json!({ "sessionId": id, "streamId": "c2" }));
            let t2 = std::time::Instant::now();
            std::thread::sleep(step);
            post(&relay, "/resume-microphone", serde_json::json!({ "sessionId": id }));
            let t3 = std::time::Instant::now();
            marks = vec![t0, t1, t2, t3];
        },
    );
    let settle = Duration::from_millis(300);
    let window = |i: usize| {
        let end = marks.get(i + 1).copied().unwrap_or(marks[i] + Duration::from_millis(1000));
        dominant_hz(agent.heard_between(marks[i] + settle, end), 48_000).unwrap_or(0.0)
    };
    let expect = [1000.0, 600.0, 1500.0, 1000.0];
    for (i, want) in expect.iter().enumerate() {
        let got = window(i);
        assert!((got - want).abs() <= 20.0, "window {i}: the agent hears {got} Hz, expected {want}");
    }
}

/// A WHEP listener hears the caller and the agent mixed.
#[test]
fn whep_listener_hears_the_mix() {
    let relay = Relay::start(&[]);
    let id = "rtc-whep";
    assert_eq!(relay.start_call(id, "tok").status, 200);
    let caller = TwilioCaller::start(&relay, id, &[]);
    let mut agent = Peer::new(Direction::SendRecv);
    publish(&relay, &mut agent, &format!("/whip/{id}?role=agent"), "tok");
    let mut listener = Peer::new(Direction::RecvOnly);
    let location = publish(&relay, &mut listener, &format!("/whep/{id}"), "tok");
    assert!(location.starts_with(&format!("/whep/{id}/")), "{location}");
    caller.send_audio(&tone_frames(1000.0, 3.0));
    run_all(&mut [(&mut agent, Send::Tone(440.0)), (&mut listener, Send::Nothing)], Duration::from_millis(2500), || {});
    assert!(listener.received >= 50, "the listener received {} frames", listener.received);
    let heard = &listener.heard[listener.heard.len().saturating_sub(48_000)..];
    let (at_440, at_1000, at_700) = (band(heard, 440.0), band(heard, 1000.0), band(heard, 700.0));
    assert!(
        at_440 > 10.0 * at_700 && at_1000 > 10.0 * at_700,
        "both tones are in the mix: {at_440} {at_1000} vs {at_700}"
    );
}

/// Energy of `pcm` (48 kHz) at `hz`.
fn band(pcm: &[i16], hz: f64) -> f64 {
    relay_tests::webrtc::goertzel(pcm, 48_000, hz)
}

/// Packets lost on the way in are concealed: the counters move and the caller's audio goes on.
#[test]
fn loss_is_concealed() {
    let relay = Relay::start(&[]);
    let id = "rtc-loss";
    assert_eq!(relay.start_call(id, "tok").status, 200);
    let caller = TwilioCaller::start(&relay, id, &[]);
    let mut agent = Peer::new(Direction::SendRecv);
    publish(&relay, &mut agent, &format!("/whip/{id}?role=agent"), "tok");
    agent.drop_every = 7;
    agent.run(Duration::from_secs(3), Send::Tone(440.0));
    assert!(agent.dropped >= 15, "the peer dropped {} packets", agent.dropped);
    let heard = caller.heard_pcm();
    // 3 s of 20 ms frames; every lost one is replaced, so the caller gets nearly all of them.
    assert!(heard.len() >= 8000 * 27 / 10, "the caller heard {} samples over 3 s", heard.len());
    let hz = dominant_hz(&heard, 8000).expect("audio");
    assert!((hz - 440.0).abs() <= 20.0, "the tone survives the loss: {hz}");
    let detailed = relay.detailed();
    let cores = detailed["services"]["server"]["cores"].as_array().expect("cores").clone();
    let sum = |k: &str| cores.iter().map(|c| c["webrtc"][k].as_u64().unwrap_or(0)).sum::<u64>();
    assert!(sum("lost") >= 10, "lost packets are counted: {cores:?}");
    assert!(sum("concealed") + sum("fecRecovered") >= 10, "and concealed or recovered: {cores:?}");
}

/// The agent's audio drives `call_ready`, `agent_media_stream_ready`, `agent_start_talking` and
/// `agent_stop_talking`, `isAgentTalking`, and raw samples at the session's rate.
#[test]
fn agent_voice_activity_and_raw_samples() {
    let relay = Relay::start(&[]);
    let id = "rtc-vad";
    let r = relay.post(
        "/start-call",
        &serde_json::json!({ "sessionId": id, "accessToken": "tok", "sampleRate": 16000, "emitRawAudioSamples": true }),
    );
    assert_eq!(r.status, 200);
    let mut events = relay.observe(id, "tok");
    let mut agent = Peer::new(Direction::SendRecv);
    publish(&relay, &mut agent, &format!("/whip/{id}?role=agent"), "tok");
    let mut talking = None;
    run_all(&mut [(&mut agent, Send::Tone(440.0))], Duration::from_millis(1500), || {
        std::thread::sleep(Duration::from_millis(1000));
        talking = Some(relay.get(&format!("/call-status?sessionId={id}")).json()["data"]["isAgentTalking"].clone());
    });
    assert_eq!(talking, Some(serde_json::Value::Bool(true)), "the agent is talking while its tone plays");
    agent.run(Duration::from_millis(800), Send::Nothing);
    let mut names = Vec::new();
    let mut raw = None;
    while let Some(msg) = events.recv_within(Duration::from_millis(500)) {
        let relay_tests::WsMsg::Json(m) = msg else { continue };
        let name = m["eventType"].as_str().unwrap_or_default().to_owned();
        if name == "audio" && raw.is_none() {
            raw = m["data"].as_array().cloned();
        }
        names.push(name);
    }
    for want in ["agent_media_stream_ready", "call_ready", "agent_start_talking", "agent_stop_talking", "audio"] {
        assert!(names.iter().any(|n| n == want), "{want} among {names:?}");
    }
    let raw = raw.expect("raw samples");
    assert_eq!(raw.len(), 320, "20 ms at 16 kHz");
    assert!(raw.iter().all(|v| v.as_f64().is_some_and(|x| (-1.0..=1.0).contains(&x))));
}

/// Two WebRTC peers talk through one session at full band: a WHIP caller and a WHIP agent.
#[test]
fn webrtc_caller_and_agent() {
    let relay = Relay::start(&[]);
    let id = "rtc-peers";
    assert_eq!(relay.start_call(id, "tok").status, 200);
    let mut caller = Peer::new(Direction::SendRecv);
    publish(&relay, &mut caller, &format!("/whip/{id}?role=caller"), "tok");
    let mut agent = Peer::new(Direction::SendRecv);
    publish(&relay, &mut agent, &format!("/whip/{id}?role=agent"), "tok");
    run_all(
        &mut [(&mut caller, Send::Tone(5000.0 / 2.0)), (&mut agent, Send::Tone(700.0))],
        Duration::from_secs(2),
        || {},
    );
    let hz = dominant_hz(&agent.heard, 48_000).expect("audio");
    assert!((hz - 2500.0).abs() <= 20.0, "the agent hears the caller's 2.5 kHz tone: {hz}");
    let hz = dominant_hz(&caller.heard, 48_000).expect("audio");
    assert!((hz - 700.0).abs() <= 20.0, "the caller hears the agent: {hz}");
}

/// An offer without Opus is refused with a clear 400; with an API key configured, a request with
/// no token is refused before the session is asked, and the API key opens any session's legs.
#[test]
fn codec_and_credentials() {
    let relay = Relay::start(&["--api-key", "secret-key"]);
    let id = "rtc-creds";
    assert_eq!(relay.start_call(id, "tok").status, 200);
    let peer = Peer::new(Direction::SendOnly);
    let pcmu = peer.offer().replace("opus/48000/2", "PCMU/8000");
    assert_ne!(pcmu, peer.offer());
    let r = offer(&relay, &format!("/whip/{id}"), "tok", &pcmu);
    assert_error(&r, 400);
    assert!(r.text().contains("Opus"), "the error names the supported codec: {}", r.text());
    let r = relay.request("POST", &format!("/whip/{id}"), &[("Content-Type", "application/sdp")], Some(peer.offer()));
    assert_error(&r, 401);
    let mut operator = Peer::new(Direction::SendOnly);
    publish(&relay, &mut operator, &format!("/whip/{id}?role=custom&streamId=op"), "secret-key");
}

/// The per-session leg limit answers 503 past it, and a refused offer leaves nothing behind.
#[test]
fn leg_limit() {
    let relay = Relay::start(&["--rtc-legs-per-session", "1"]);
    let id = "rtc-limit";
    assert_eq!(relay.start_call(id, "tok").status, 200);
    let first = Peer::new(Direction::SendOnly);
    assert_eq!(offer(&relay, &format!("/whip/{id}?role=custom&streamId=a"), "tok", first.offer()).status, 201);
    let second = Peer::new(Direction::SendOnly);
    let r = offer(&relay, &format!("/whip/{id}?role=custom&streamId=b"), "tok", second.offer());
    assert_error(&r, 503);
    let cores = relay.detailed()["services"]["server"]["cores"].clone();
    let peers: u64 = cores.as_array().expect("cores").iter().map(|c| c["webrtc"]["peers"].as_u64().unwrap_or(0)).sum();
    assert_eq!(peers, 1, "only the accepted leg holds a peer: {cores}");
}

/// A WebRTC caller reaches the configured Twilio-protocol bot as a Media Stream: the bot is greeted
/// with the session as the call, hears the caller's tone as μ-law, and its paced reply (with a
/// mark echoed once played) reaches the browser-side peer as Opus; stopping the call says `stop`.
#[test]
fn webrtc_caller_talks_to_a_twilio_bot() {
    let bot = relay_tests::telephony::TwilioBot::start();
    let relay = Relay::start(&["--agent-url", &bot.url("/bot")]);
    let id = "rtc-bot";
    assert_eq!(relay.start_call(id, "tok").status, 200);
    let mut caller = Peer::new(Direction::SendRecv);
    publish(&relay, &mut caller, &format!("/whip/{id}?role=caller"), "tok");
    caller.run(Duration::from_millis(200), Send::Tone(1000.0));
    let conn = bot.ready(0);
    let start = conn.start_msg();
    assert_eq!(start["start"]["callSid"], id, "{start}");
    assert_eq!(start["start"]["customParameters"]["callSid"], id, "{start}");
    conn.send_audio(&tone_frames(440.0, 1.5));
    conn.mark("reply-done");
    caller.run(Duration::from_millis(2200), Send::Tone(1000.0));
    let heard: Vec<i16> = conn.media().into_iter().flatten().map(unulaw).collect();
    let hz = dominant_hz(&heard, 8000).expect("the bot heard audio");
    assert!((hz - 1000.0).abs() <= 20.0, "the bot hears the caller's 1 kHz tone: {hz}");
    let hz = dominant_hz(&caller.heard, 48_000).expect("the caller heard audio");
    assert!((hz - 440.0).abs() <= 20.0, "the caller hears the bot's 440 Hz reply: {hz}");
    assert!(conn.event_names().iter().any(|e| e == "mark"), "the mark comes back once played");
    assert_eq!(relay.stop_call(id).status, 200);
    conn.wait_until("stop at the bot", |r| r.iter().any(|a| a.event() == Some("stop")).then_some(()));
}
