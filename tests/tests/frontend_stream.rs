//! `/frontend-stream` (seed 004): listeners hear the caller (`inbound`) and the agent as played
//! (`outbound`) byte for byte, only after `connect-twilio` for their call, and at most three
//! sockets per user at once.

use relay_tests::telephony::{b64, frames, Frontend, TwilioBot, TwilioCaller};
use relay_tests::{poll_until, Relay, WsMsg};
use serde_json::json;

/// Two frontends get every caller frame as `inbound` and the bot's audio as `outbound`, byte for byte.
#[test]
fn frontends_hear_both_tracks() {
    let bot = TwilioBot::start();
    let relay = Relay::start(&["--agent-url", &bot.url("/front")]);
    let id = "CA-front";
    let fronts = [Frontend::connect(&relay, id, "alice", ""), Frontend::connect(&relay, id, "bob", "")];
    let caller = TwilioCaller::start(&relay, id, &[]);
    let agent = bot.ready(0);
    let up = frames(60, 0..50);
    let down = frames(61, 0..50);
    caller.send_audio(&up);
    agent.send_audio(&down);
    for (i, front) in fronts.iter().enumerate() {
        assert_eq!(front.wait_audio("inbound", up.len()), up, "frontend {i}: inbound is the caller's audio");
        assert_eq!(front.wait_audio("outbound", down.len()), down, "frontend {i}: outbound is the bot's audio");
        let first_in = front
            .received()
            .iter()
            .filter_map(|a| a.json().cloned())
            .find(|v| v["event"] == "audio" && v["track"] == "inbound")
            .expect("inbound audio seen above");
        assert_eq!(first_in, json!({"event": "audio", "payload": b64(&up[0]), "track": "inbound"}));
    }
    caller.wait_media(down.len());
    for front in &fronts {
        assert_eq!(front.audio("inbound").len(), up.len(), "no inbound frame twice");
        assert_eq!(front.audio("outbound").len(), down.len(), "no outbound frame twice");
    }
}

/// A frontend socket that has not sent `connect-twilio` receives no audio.
#[test]
fn no_audio_before_connect_twilio() {
    let relay = Relay::start(&[]);
    let id = "CA-quiet";
    let silent = Frontend::open(&relay, id, "carol", "").expect("upgrade");
    let listening = Frontend::connect(&relay, id, "dave", "");
    let caller = TwilioCaller::start(&relay, id, &[]);
    caller.send_audio(&frames(62, 0..10));
    listening.wait_audio("inbound", 10);
    assert!(silent.sync(), "the silent socket is still open");
    assert!(silent.audio("inbound").is_empty(), "no audio without connect-twilio");
}

/// `connect-twilio` naming another call closes the socket with 1008.
#[test]
fn connect_twilio_for_another_call_is_closed_1008() {
    let relay = Relay::start(&[]);
    let front = Frontend::open(&relay, "CA-mine", "erin", "").expect("upgrade");
    front.send_json(&json!({"event": "connect-twilio", "callSid": "CA-theirs", "user_id": "erin"}));
    assert_eq!(front.wait_closed(), Some(Some(1008)));
}

/// A user's 4th concurrent socket is closed with 1008 while three are open; closing one frees a place.
#[test]
fn fourth_socket_of_a_user_is_closed_1008() {
    let relay = Relay::start(&[]);
    let id = "CA-limit";
    let open: Vec<Frontend> = (0..3).map(|_| Frontend::connect(&relay, id, "frank", "")).collect();
    let fourth = Frontend::open(&relay, id, "frank", "").expect("the 4th socket is upgraded, then closed");
    assert_eq!(fourth.wait_closed(), Some(Some(1008)), "the 4th socket is closed with 1008");
    let other_user = Frontend::connect(&relay, id, "grace", "");
    assert!(other_user.sync(), "another user is not affected");
    for f in &open {
        assert!(f.sync(), "the first three sockets stay open");
    }
    open[0].close(1000);
    assert_eq!(open[0].wait_closed(), Some(Some(1000)));
    poll_until("a place freed for frank", || {
        let f = Frontend::open(&relay, id, "frank", "").expect("upgrade");
        if f.sync() {
            Some(())
        } else {
            assert!(
                f.received().iter().any(|a| a.msg == WsMsg::Close(Some(1008))),
                "a refused socket is closed with 1008: {:?}",
                f.received()
            );
            None
        }
    });
}

/// With `--twilio-transcription`, the TwiML starts Twilio's Real-Time Transcription, and its final
/// `transcription-content` callbacks reach frontends as `transcription` events (partial results
/// do not), labelled by track in the call's record.
#[test]
fn twilio_transcripts_reach_frontends() {
    let relay = Relay::start(&["--twilio-transcription"]);
    let form = [("Content-Type", "application/x-www-form-urlencoded")];
    let twiml =
        relay.request("POST", "/twilio/voice", &form, Some("CallSid=CA-words&From=%2B15550001&To=%2B15550002")).text();
    let callback = format!("http://{}/twilio/transcription", relay.addr());
    assert!(
        twiml.contains(&format!(
            r#"<Start><Transcription statusCallbackUrl="{callback}" track="both_tracks"/></Start><Connect>"#
        )),
        "{twiml}"
    );
    let id = "CA-words";
    let front = Frontend::connect(&relay, id, "frank", "");
    let _caller = TwilioCaller::start(&relay, id, &[]);
    let post = |track: &str, text: &str, final_: &str| {
        let data = format!(r#"{{"transcript":"{text}","confidence":0.93}}"#);
        let body = format!(
            "AccountSid=AC1&CallSid={id}&TranscriptionSid=GT1&TranscriptionEvent=transcription-content&Track={track}&Final={final_}&SequenceId=1&TranscriptionData={}",
            relay_tests::twilio_rest::percent_encode(&data)
        );
        let resp = relay.request("POST", "/twilio/transcription", &form, Some(&body));
        assert_eq!(resp.status, 200, "{}", resp.text());
    };
    post("inbound_track", "my sink is", "false");
    post("inbound_track", "my sink is leaking", "true");
    post("outbound_track", "I can send someone today", "true");
    let texts = front.wait_until("two transcripts", |seen| {
        let t: Vec<String> = seen
            .iter()
            .filter_map(|a| a.json())
            .filter(|v| v["event"] == "transcription")
            .map(|v| v["text"].as_str().unwrap_or_default().to_owned())
            .collect();
        (t.len() >= 2).then_some(t)
    });
    assert_eq!(texts, ["my sink is leaking", "I can send someone today"], "final results only, in order");
    let started = relay.request(
        "POST",
        "/twilio/transcription",
        &form,
        Some(&format!("CallSid={id}&TranscriptionEvent=transcription-started")),
    );
    assert_eq!(started.status, 200, "other events are acknowledged");
}

/// A frontend that only listens (audio streams to it the whole time) is pinged because it is the
/// quiet side, answers, and so outlives the idle timeout: long calls keep their listeners.
#[test]
fn listening_frontend_outlives_the_idle_timeout() {
    let relay = Relay::start(&["--ws-ping-interval", "300ms", "--ws-idle-timeout", "1s"]);
    let id = "CA-long";
    let front = Frontend::connect(&relay, id, "gail", "");
    let caller = TwilioCaller::start(&relay, id, &[]);
    // 2.5 s of real-time audio: well past the 1 s idle timeout.
    caller.send_audio(&frames(70, 0..125));
    front.wait_audio("inbound", 125);
    assert!(front.sync(), "the frontend is still connected after 2.5 s of listening");
    assert!(!front.ended(), "not closed for idleness");
}
