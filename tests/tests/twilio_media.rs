//! Twilio Media Streams through the relay: a Twilio-like caller on `/twilio/stream`, a Twilio
//! Media Streams bot as the agent (`--agent-url`): audio both ways byte for byte, pacing, marks,
//! clear (barge-in), mute and custom streams, DTMF, hang-up, and frames that arrive with the key.

use std::time::Duration;

use relay_tests::telephony::{
    b64, connected_msg, frames, media_msg, start_msg, Events, Frontend, TwilioBot, TwilioCaller, FRAME, FRAME_BYTES,
    SILENCE,
};
use relay_tests::{assert_success, encode_frame, ids_on_core, owner, poll_until, RawWs, Relay};
use serde_json::json;

/// Scheduling slack allowed on top of the pacing bounds (threads on a loaded 2-CPU machine).
const SLACK: Duration = Duration::from_millis(100);

/// The relay's lead: how far released audio may run ahead of the caller's playout.
const LEAD: Duration = Duration::from_millis(200);

/// Audio crosses intact and in order both ways; the bot gets `connected`, `start` first and `stop` last.
#[test]
fn audio_round_trips_intact_and_in_order() {
    let bot = TwilioBot::start();
    let relay = Relay::start(&["--agent-url", &bot.url("/media?bot=1")]);
    let caller = TwilioCaller::start(&relay, "CA-roundtrip", &[("lang", "en-GB"), ("who", "tester")]);
    let agent = bot.ready(0);
    assert_eq!(agent.path, "/media?bot=1", "the relay dials the configured path");

    let up = frames(1, 0..100);
    let down = frames(2, 0..100);
    caller.send_audio(&up);
    agent.send_audio(&down);
    let got_up = agent.wait_media(up.len());
    let got_down: Vec<Vec<u8>> = caller.wait_media(down.len()).into_iter().map(|(_, f)| f).collect();
    assert!(got_up == up, "caller audio at the bot differs: {}", diff(&got_up, &up));
    assert!(got_down == down, "bot audio at the caller differs: {}", diff(&got_down, &down));
    // Payloads are passed through verbatim (same base64 text), with Twilio's inbound shape.
    let first = &agent.events_named("media")[0].1;
    assert_eq!(first["media"]["payload"], b64(&up[0]), "first media at the bot: {first}");
    assert_eq!(first["streamSid"], caller.stream_sid.as_str(), "first media at the bot: {first}");

    caller.wait_sent();
    caller.stop();
    assert_eq!(agent.wait_closed(), Some(Some(1000)), "the relay closes the agent leg with 1000 after stop");
    assert_eq!(caller.wait_closed(), Some(Some(1000)), "the caller's stream is closed with 1000");
    assert_eq!(agent.media(), up, "nothing more reached the bot after the call");
    let names = agent.event_names();
    assert_eq!(names.last().map(String::as_str), Some("stop"), "the bot's last message is stop: {names:?}");
    let stop = &agent.events_named("stop")[0].1;
    assert_eq!(stop["stop"]["callSid"], "CA-roundtrip", "stop: {stop}");
    assert_eq!(stop["streamSid"], caller.stream_sid.as_str(), "stop: {stop}");

    // The greeting, checked last so the audio checks above stand on their own.
    assert_eq!(names.first().map(String::as_str), Some("connected"), "the bot's first message: {names:?}");
    assert_eq!(names.get(1).map(String::as_str), Some("start"), "the bot's second message: {names:?}");
    assert_eq!(names.len(), 2 + up.len() + 1, "connected, start, every media, stop: {names:?}");
    let start = &agent.events_named("start")[0].1;
    assert_eq!(start["start"]["callSid"], "CA-roundtrip", "start: {start}");
    assert_eq!(start["start"]["streamSid"], caller.stream_sid.as_str(), "start: {start}");
    assert_eq!(start["streamSid"], caller.stream_sid.as_str(), "start: {start}");
    assert_eq!(start["start"]["accountSid"], caller.account_sid.as_str(), "start: {start}");
    assert_eq!(
        start["start"]["customParameters"],
        json!({"callSid": "CA-roundtrip", "lang": "en-GB", "who": "tester"}),
        "start: {start}"
    );
    assert_eq!(start["start"]["mediaFormat"]["encoding"], "audio/x-mulaw", "start: {start}");
    assert_eq!(start["start"]["mediaFormat"]["sampleRate"], 8000, "start: {start}");
}

/// Bot audio sent at once reaches the caller whole and in order, never over 200 ms ahead of real-time playout.
#[test]
fn agent_audio_is_paced() {
    let bot = TwilioBot::start();
    let relay = Relay::start(&["--agent-url", &bot.url("/pace")]);
    let caller = TwilioCaller::start(&relay, "CA-pace", &[]);
    let agent = bot.ready(0);
    let down = frames(3, 0..150);
    agent.send_audio(&down);
    let got = caller.wait_media(down.len());
    let payloads: Vec<Vec<u8>> = got.iter().map(|(_, f)| f.clone()).collect();
    assert!(payloads == down, "paced audio differs: {}", diff(&payloads, &down));

    let t0 = got[0].0;
    for (i, (at, _)) in got.iter().enumerate() {
        let audio = FRAME * (i as u32 + 1);
        let allowed = at.duration_since(t0) + LEAD + FRAME + SLACK;
        assert!(
            audio <= allowed,
            "{} frames ({audio:?} of audio) had arrived {:?} after the first: more than elapsed + lead",
            i + 1,
            at.duration_since(t0)
        );
    }
    // And the whole 3 s did not come at once: the last frame came at least (3 s − lead) later.
    let span = got[got.len() - 1].0.duration_since(t0);
    assert!(span + LEAD + FRAME + SLACK >= FRAME * 150, "3 s of audio arrived within {span:?}");
}

/// A mark is echoed only after the audio before it reached the caller and played; marks return in order.
#[test]
fn marks_are_echoed_after_playout_in_order() {
    let bot = TwilioBot::start();
    let relay = Relay::start(&["--agent-url", &bot.url("/marks")]);
    let caller = TwilioCaller::start(&relay, "CA-marks", &[]);
    let agent = bot.ready(0);

    let second = frames(4, 0..50);
    agent.send_audio(&second);
    agent.mark("m1");
    let echoed = agent.wait_mark("m1");
    let got = caller.wait_media(second.len());
    assert_eq!(got.len(), second.len(), "only the audio before the mark was played");
    let last = got[got.len() - 1].0;
    assert!(
        echoed >= last,
        "m1 was echoed {:?} after the first frame reached the caller, before the last one did ({:?})",
        echoed.saturating_duration_since(got[0].0),
        last.duration_since(got[0].0)
    );
    let first = got[0].0;
    assert!(
        echoed.duration_since(first) + SLACK >= FRAME * 50,
        "m1 came back {:?} after the first frame, before 1 s of audio could play",
        echoed.duration_since(first)
    );
    let echo = agent.events_named("mark")[0].1.clone();
    assert_eq!(echo["streamSid"], caller.stream_sid.as_str(), "mark echo: {echo}");
    assert!(echo["sequenceNumber"].is_string() || echo["sequenceNumber"].is_u64(), "mark echo: {echo}");

    for (i, name) in ["m2", "m3", "m4"].iter().enumerate() {
        agent.send_audio(&frames(5 + i as u8, 0..10));
        agent.mark(name);
    }
    agent.wait_mark("m4");
    let names: Vec<String> = agent.marks().into_iter().map(|(_, n)| n).collect();
    assert_eq!(names, ["m1", "m2", "m3", "m4"], "marks come back once each, in order");
    assert_eq!(caller.media().len(), 80, "all audio before m4 reached the caller");
}

/// Barge-in: the bot's `clear` reaches the caller, drops the queued audio and echoes the pending mark.
#[test]
fn clear_drops_queued_audio_and_returns_marks() {
    let bot = TwilioBot::start();
    let relay = Relay::start(&["--agent-url", &bot.url("/clear")]);
    let caller = TwilioCaller::start(&relay, "CA-clear", &[]);
    let agent = bot.ready(0);

    let long = frames(9, 0..250);
    agent.send_audio(&long);
    agent.mark("after");
    caller.wait_media(20);
    agent.clear();
    agent.wait_mark("after");
    caller.wait_until("clear at the caller", |r| r.iter().find(|a| a.event() == Some("clear")).map(|_| ()));

    let fresh = frames(10, 0..5);
    agent.send_audio(&fresh);
    agent.mark("fresh");
    agent.wait_mark("fresh");

    let received = caller.received();
    let clear_at = received.iter().position(|a| a.event() == Some("clear")).expect("clear seen above");
    let clear = received[clear_at].json().expect("JSON");
    assert_eq!(*clear, json!({"event": "clear", "streamSid": caller.stream_sid}), "clear to the caller");
    let media = caller.media();
    let before = received[..clear_at].iter().filter(|a| a.event() == Some("media")).count();
    assert!(before >= 20, "the frames seen before clear arrived before it");
    assert!(before < 100, "{before} of 250 frames were played despite the clear (queued audio must be dropped)");
    let payloads: Vec<Vec<u8>> = media.iter().map(|(_, f)| f.clone()).collect();
    let mut expected = long[..before].to_vec();
    expected.extend(fresh.iter().cloned());
    assert!(
        payloads == expected,
        "caller audio is the released prefix then the new audio: {}",
        diff(&payloads, &expected)
    );
    let marks: Vec<String> = agent.marks().into_iter().map(|(_, n)| n).collect();
    assert_eq!(marks, ["after", "fresh"], "the cleared mark comes back first");
}

/// A stream joins a `/start-call` session; mute and custom streams give the bot same-length μ-law silence.
#[test]
fn mute_and_custom_stream_send_silence_to_the_agent() {
    let bot = TwilioBot::start();
    let relay = Relay::start(&["--agent-url", &bot.url("/mute")]);
    let id = "CA-mute";
    assert_success(&relay.start_call(id, "t"), "Call started successfully");
    let events = Events::open(&relay, id, Some("t"));
    let status = assert_success(&relay.get(&format!("/call-status?sessionId={id}")), "Call status retrieved");
    assert_eq!(status["isConnected"], false, "no caller yet: {status}");

    let caller = TwilioCaller::start(&relay, id, &[]);
    events.wait_event_where("update", |d| d["isConnected"] == true);
    let status = assert_success(&relay.get(&format!("/call-status?sessionId={id}")), "Call status retrieved");
    assert_eq!(status["isConnected"], true, "the stream is the call's caller: {status}");
    let agent = bot.ready(0);

    let all = frames(11, 0..100);
    let phase = |range: std::ops::Range<usize>| {
        caller.send_audio(&all[range.clone()]);
        caller.wait_sent();
        agent.wait_media(range.end)
    };
    phase(0..20);
    assert_success(&relay.post("/mute", &json!({"sessionId": id})), "Microphone muted");
    phase(20..40);
    assert_success(&relay.post("/unmute", &json!({"sessionId": id})), "Microphone unmuted");
    phase(40..60);
    let custom = json!({"sessionId": id, "streamId": "music", "kind": "audio"});
    let resp = relay.post("/send-custom-stream", &custom);
    assert_eq!(resp.status, 200, "send-custom-stream: {}", resp.text());
    phase(60..80);
    let resp = relay.post("/resume-microphone", &json!({"sessionId": id}));
    assert_eq!(resp.status, 200, "resume-microphone: {}", resp.text());
    let got = phase(80..100);

    assert_eq!(got.len(), 100, "one frame at the bot per caller frame");
    let silence = vec![SILENCE; FRAME_BYTES];
    for (i, f) in got.iter().enumerate() {
        let muted = (20..40).contains(&i) || (60..80).contains(&i);
        if muted {
            assert_eq!(f, &silence, "frame {i} (muted or custom stream) is μ-law silence of the same length");
        } else {
            assert_eq!(f, &all[i], "frame {i} (microphone live) is the caller's own bytes");
        }
    }
}

/// A caller's `dtmf` reaches the bot as Twilio's `dtmf` message and `/ws` listeners as an `update`.
#[test]
fn dtmf_reaches_agent_and_listeners() {
    let bot = TwilioBot::start();
    let relay = Relay::start(&["--agent-url", &bot.url("/dtmf")]);
    let caller = TwilioCaller::start(&relay, "CA-dtmf", &[]);
    let agent = bot.ready(0);
    // The call was created by the stream and has no access token: anonymous listeners may watch it.
    let events = Events::open(&relay, "CA-dtmf", None);
    caller.dtmf('7');
    caller.dtmf('#');
    let data = events.wait_event_where("update", |d| d.get("dtmf").is_some());
    assert_eq!(data, json!({"dtmf": {"digit": "7"}}), "update carries the digit");
    events.wait_event_where("update", |d| d["dtmf"]["digit"] == "#");
    let dtmf = agent.wait_until("two dtmf at the bot", |r| {
        let d: Vec<_> = r.iter().filter(|a| a.event() == Some("dtmf")).filter_map(|a| a.json().cloned()).collect();
        (d.len() >= 2).then_some(d)
    });
    assert_eq!(dtmf[0]["dtmf"]["digit"], "7", "dtmf at the bot: {}", dtmf[0]);
    assert_eq!(dtmf[0]["dtmf"]["track"], "inbound_track", "dtmf at the bot: {}", dtmf[0]);
    assert_eq!(dtmf[0]["streamSid"], caller.stream_sid.as_str(), "dtmf at the bot: {}", dtmf[0]);
    assert_eq!(dtmf[1]["dtmf"]["digit"], "#", "dtmf at the bot: {}", dtmf[1]);
}

/// The caller's `stop` ends the call: bot `stop`, `/ws` `call_ended`, sockets closed 1000, no session left.
#[test]
fn caller_stop_ends_the_call_everywhere() {
    let bot = TwilioBot::start();
    let relay = Relay::start(&["--agent-url", &bot.url("/stop"), "--api-key", "k"]);
    let id = "CA-stop";
    let events = Events::open(&relay, id, Some("k"));
    let front = Frontend::connect(&relay, id, "u1", "&accessToken=k");
    let caller = TwilioCaller::start(&relay, id, &[]);
    let started = events.wait_event("call_started");
    assert_eq!(started["sessionId"], id, "call_started: {started}");
    events.wait_event("call_ready");
    let agent = bot.ready(0);
    assert_eq!(relay.active_sessions(), 1);
    caller.send_audio(&frames(12, 0..5));
    caller.wait_sent();
    caller.stop();

    let ended = events.wait_event("call_ended");
    assert_eq!(ended["reason"], "caller_hangup", "call_ended: {ended}");
    assert_eq!(ended["sessionId"], id, "call_ended: {ended}");
    assert_eq!(events.wait_closed(), Some(Some(1000)), "/ws is closed with 1000");
    assert_eq!(front.wait_closed(), Some(Some(1000)), "the frontend is closed with 1000");
    assert_eq!(agent.wait_closed(), Some(Some(1000)), "the agent leg is closed with 1000");
    assert_eq!(caller.wait_closed(), Some(Some(1000)), "the caller's stream is closed with 1000");
    assert_eq!(agent.event_names().last().map(String::as_str), Some("stop"), "the bot's last message is stop");
    poll_until("no active sessions", || (relay.active_sessions() == 0).then_some(()));
}

/// A caller socket that just closes (no `stop`) also ends the call: the bot gets `stop`.
#[test]
fn caller_disconnect_ends_the_call() {
    let bot = TwilioBot::start();
    let relay = Relay::start(&["--agent-url", &bot.url("/gone")]);
    let caller = TwilioCaller::start(&relay, "CA-gone", &[]);
    let agent = bot.ready(0);
    caller.close(1000);
    assert_eq!(agent.wait_closed(), Some(Some(1000)), "the agent leg is closed with 1000");
    assert_eq!(agent.event_names().last().map(String::as_str), Some("stop"), "the bot is told stop");
    poll_until("no active sessions", || (relay.active_sessions() == 0).then_some(()));
}

/// A second stream naming a call that already has a caller is closed with 1008; the first goes on.
#[test]
fn second_stream_for_a_call_is_closed_1008() {
    let bot = TwilioBot::start();
    let relay = Relay::start(&["--agent-url", &bot.url("/dup")]);
    let first = TwilioCaller::start(&relay, "CA-dup", &[]);
    let agent = bot.ready(0);
    let second = TwilioCaller::start(&relay, "CA-dup", &[]);
    assert_eq!(second.wait_closed(), Some(Some(1008)), "the second stream is refused with 1008");
    first.send_audio(&frames(13, 0..5));
    assert_eq!(agent.wait_media(5), frames(13, 0..5), "the first stream still reaches the bot");
    assert_eq!(bot.connections(), 1, "the refused stream dialled no agent");
}

/// Ten media frames written with the upgrade request and `start` reach a frontend, for calls on each core.
#[test]
fn frames_sent_with_the_key_survive_the_handoff() {
    let relay = Relay::start(&[]);
    // Three calls per core, so that (whichever core accepts each socket) some are moved.
    for core in 0..relay.cores() {
        for (n, id) in ids_on_core("CA-early", core, relay.cores(), 3).iter().enumerate() {
            assert_eq!(owner(id, relay.cores()), core);
            let front = Frontend::connect(&relay, id, "watcher", "");
            let sent = frames(20 + (core * 3 + n) as u8, 0..10);
            let mut raw = early_stream(&relay, "/twilio/stream", id, id, &sent);
            let got = front.wait_audio("inbound", sent.len());
            assert!(got == sent, "{id} (core {core}): frontend audio differs: {}", diff(&got, &sent));
            raw.send_frame(true, 8, &1000u16.to_be_bytes()).expect("send close");
        }
    }
}

/// Ten media frames written with the upgrade request and `start` all reach the bot, for calls on each core.
#[test]
fn frames_sent_with_the_key_reach_the_agent() {
    let bot = TwilioBot::start();
    let relay = Relay::start(&["--agent-url", &bot.url("/early")]);
    for core in 0..relay.cores() {
        let id = &ids_on_core("CA-early-agent", core, relay.cores(), 1)[0];
        let sent = frames(30 + core as u8, 0..10);
        let _raw = early_stream(&relay, "/twilio/stream", id, id, &sent);
        let agent = bot.ready(core);
        let got = agent.wait_within(Duration::from_secs(3), |r| {
            let n = r.iter().filter(|a| a.event() == Some("media")).count();
            (n >= sent.len()).then_some(())
        });
        let media = agent.media();
        assert!(
            got.is_some() && media == sent,
            "core {core}: the bot got {} of the {} frames the caller sent with its start",
            media.len(),
            sent.len()
        );
    }
}

/// A `start` whose `callSid` is empty and has no `callSid` parameter is keyed by `?callSid=`.
#[test]
fn call_sid_query_is_the_fallback_key() {
    let relay = Relay::start(&[]);
    let id = "CA-query";
    let front = Frontend::connect(&relay, id, "watcher", "");
    let peer = relay_tests::telephony::Peer::connect(relay.addr(), &format!("/twilio/stream?callSid={id}"), &[])
        .expect("upgrade");
    let caller = TwilioCaller::greet(peer, "", &[("lang", "fr")]);
    caller.send_audio(&frames(40, 0..5));
    assert_eq!(front.wait_audio("inbound", 5), frames(40, 0..5), "the stream joined call {id}");
    let status = assert_success(&relay.get(&format!("/call-status?sessionId={id}")), "Call status retrieved");
    assert_eq!(status["isConnected"], true, "call-status: {status}");
}

/// A stream that ends before its `start` gets the close a WebSocket peer expects: its own close
/// code echoed when it closed, 1009 when it sent a frame past the size limit.
#[test]
fn streams_closed_before_start_get_the_right_close_code() {
    let relay = Relay::start(&[]);
    let mut closing = RawWs::connect(relay.addr(), "/twilio/stream", &[]).expect("upgrade");
    let close_frame = encode_frame(true, 0x8, &[0x0f, 0xa0], Some([1, 2, 3, 4])); // 4000
    closing.send_raw(&close_frame).expect("a close frame");
    let mut seen = Vec::new();
    assert_eq!(closing.read_until_close(&mut seen), Some(4000), "the peer's code echoed");
    let mut big = RawWs::connect(relay.addr(), "/twilio/stream", &[]).expect("upgrade");
    let huge = vec![b'x'; 2 << 20];
    let _ = big.send_raw(&encode_frame(true, 0x1, &huge, Some([1, 2, 3, 4])));
    let mut seen = Vec::new();
    assert_eq!(big.read_until_close(&mut seen), Some(1009), "a frame past the limit");
}

/// A client written to seed 003 sends `start` flat (its fields beside `event`) and names the call
/// only in `?callSid=`: the stream joins that call, and the bot is greeted with a Twilio `start`
/// whose `callSid` is the call's.
#[test]
fn flat_start_named_by_the_query() {
    let bot = TwilioBot::start();
    let relay = Relay::start(&["--agent-url", &bot.url("/flat")]);
    let id = "CA-flat";
    let front = Frontend::connect(&relay, id, "watcher", "");
    let peer = relay_tests::telephony::Peer::connect(relay.addr(), &format!("/twilio/stream?callSid={id}"), &[])
        .expect("upgrade");
    let caller = TwilioCaller::new(peer, "");
    caller.peer().send_json(&connected_msg());
    caller.peer().send_json(&json!({
        "event": "start", "streamSid": "MZflat", "accountSid": "AC0123456789abcdef0123456789abcdef",
        "tracks": ["inbound", "outbound"],
    }));
    let agent = bot.ready(0);
    let start = &agent.events_named("start")[0].1;
    assert_eq!(start["start"]["callSid"], id, "the bot's start names the call: {start}");
    caller.send_audio(&frames(41, 0..5));
    assert_eq!(agent.wait_media(5), frames(41, 0..5), "caller audio reaches the bot");
    assert_eq!(front.wait_audio("inbound", 5), frames(41, 0..5), "the stream joined call {id}");
}

/// A stream opened at `/twilio/stream/{callSid}` (the form the TwiML gives, which a balancer can
/// route by) joins that call, whether its `start` names the same call or none; a `start` naming
/// another call is refused with 1008, and a key that is not a valid id is a 400.
#[test]
fn stream_named_by_its_path() {
    let bot = TwilioBot::start();
    let relay = Relay::start(&["--agent-url", &bot.url("/path")]);
    let id = "CA-path";
    let front = Frontend::connect(&relay, id, "watcher", "");
    let peer =
        relay_tests::telephony::Peer::connect(relay.addr(), &format!("/twilio/stream/{id}"), &[]).expect("upgrade");
    let caller = TwilioCaller::greet(peer, id, &[("callSid", id)]);
    let agent = bot.ready(0);
    caller.send_audio(&frames(42, 0..5));
    assert_eq!(agent.wait_media(5), frames(42, 0..5), "caller audio reaches the bot");
    assert_eq!(front.wait_audio("inbound", 5), frames(42, 0..5), "the stream joined call {id}");

    let flat_id = "CA-path-flat";
    let flat_front = Frontend::connect(&relay, flat_id, "watcher", "");
    let peer = relay_tests::telephony::Peer::connect(relay.addr(), &format!("/twilio/stream/{flat_id}"), &[])
        .expect("upgrade");
    let flat = TwilioCaller::new(peer, "");
    flat.peer().send_json(&connected_msg());
    flat.peer().send_json(&json!({
        "event": "start", "streamSid": "MZpathflat", "accountSid": "AC0123456789abcdef0123456789abcdef",
        "tracks": ["inbound", "outbound"],
    }));
    flat.send_audio(&frames(43, 0..3));
    assert_eq!(flat_front.wait_audio("inbound", 3), frames(43, 0..3), "a start naming no call joins the path's");

    let other = start_msg(1, "MZother", "AC0123456789abcdef0123456789abcdef", "CA-elsewhere", &[]);
    let mut bytes = encode_frame(true, 1, connected_msg().to_string().as_bytes(), Some([1, 2, 3, 4]));
    bytes.extend(encode_frame(true, 1, other.to_string().as_bytes(), Some([1, 2, 3, 4])));
    let mut wrong = RawWs::connect_with_early(relay.addr(), "/twilio/stream/CA-path-2", &[], &bytes).expect("upgrade");
    let mut seen = Vec::new();
    assert_eq!(wrong.read_until_close(&mut seen), Some(1008), "a start naming another call than the URL");
    let refused = RawWs::connect(relay.addr(), "/twilio/stream/not%20an%20id", &[]).err().map(|r| r.status);
    assert_eq!(refused, Some(400), "a key that is not a valid id");
}

/// Opens `/twilio/stream` with `connected`, `start` (for `call_sid`, parameter `callSid` = `param`)
/// and `frames` as media, all in the same write as the upgrade request.
fn early_stream(relay: &Relay, path: &str, call_sid: &str, param: &str, frames: &[Vec<u8>]) -> RawWs {
    let stream_sid = format!("MZ{}", call_sid.replace(['-', '.', ':', '_'], ""));
    let account = "AC0123456789abcdef0123456789abcdef";
    let mut bytes = Vec::new();
    let mask = Some([0x11, 0x22, 0x33, 0x44]);
    bytes.extend(encode_frame(true, 1, connected_msg().to_string().as_bytes(), mask));
    let start = start_msg(1, &stream_sid, account, call_sid, &[("callSid", param)]);
    bytes.extend(encode_frame(true, 1, start.to_string().as_bytes(), mask));
    for (i, f) in frames.iter().enumerate() {
        let m = media_msg(i as u64 + 2, &stream_sid, i as u64 + 1, f);
        bytes.extend(encode_frame(true, 1, m.to_string().as_bytes(), mask));
    }
    match RawWs::connect_with_early(relay.addr(), path, &[], &bytes) {
        Ok(raw) => raw,
        Err(resp) => panic!("/twilio/stream refused with {}: {}", resp.status, resp.text()),
    }
}

/// Where two frame sequences first differ, for failure messages.
fn diff(got: &[Vec<u8>], want: &[Vec<u8>]) -> String {
    let at = got.iter().zip(want).position(|(g, w)| g != w);
    let name = |f: &Vec<u8>| {
        if f.len() >= 5 {
            format!("tag {} #{}", f[0], u32::from_be_bytes([f[1], f[2], f[3], f[4]]))
        } else {
            format!("{} bytes", f.len())
        }
    };
    match at {
        Some(i) => format!("first difference at frame {i}: got {} want {}", name(&got[i]), name(&want[i])),
        None => format!("lengths differ: got {} want {}", got.len(), want.len()),
    }
}
