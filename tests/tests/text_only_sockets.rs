//! Sockets whose protocols carry text only (`/ws`, `/frontend-stream`, `/twilio/stream`,
//! `/llm-websocket`): a binary frame closes the socket that sent it with 1003 (RFC 6455 §7.4.1),
//! and the call goes on for everyone else; a caller's unusable `start` is refused at once.

use relay_tests::telephony::{connected_msg, frames, start_msg, Frontend, TwilioBot, TwilioCaller};
use relay_tests::{assert_success, encode_frame, RawFrame, RawWs, Relay};
use serde_json::json;

/// A binary frame on a `/ws` socket closes that socket with 1003; the session's other socket
/// keeps receiving its events and the call stays active.
#[test]
fn binary_on_ws_closes_only_that_socket() {
    let relay = Relay::start(&[]);
    assert_success(&relay.start_call("bin-ws", "t"), "Call started successfully");
    let mut sender = RawWs::connect(relay.addr(), "/ws?sessionId=bin-ws&accessToken=t", &[]).expect("upgrade");
    let mut other = relay.observe("bin-ws", "t");
    sender.send_frame(true, 2, &[1, 2, 3]).expect("a binary frame");
    assert_eq!(close_code(&mut sender), Some(1003), "data the protocol cannot carry");
    assert_success(&relay.post("/mute", &json!({"sessionId": "bin-ws"})), "Microphone muted");
    assert_eq!(other.expect_event("update"), json!({"microphoneEnabled": false}), "the other socket goes on");
    let status = assert_success(&relay.get("/call-status?sessionId=bin-ws"), "Call status retrieved");
    assert_eq!(status["isActive"], true, "{status}");
}

/// A binary frame on a `/frontend-stream` socket closes it with 1003; the caller's audio still
/// reaches the bot and the call's other frontend.
#[test]
fn binary_on_frontend_stream_closes_only_that_socket() {
    let bot = TwilioBot::start();
    let relay = Relay::start(&["--agent-url", &bot.url("/bot")]);
    let id = "CA-bin-front";
    let good = Frontend::connect(&relay, id, "good", "");
    let mut bad =
        RawWs::connect(relay.addr(), &format!("/frontend-stream?callSid={id}&user_id=bad"), &[]).expect("upgrade");
    let connect = json!({"event": "connect-twilio", "callSid": id, "user_id": "bad"}).to_string();
    bad.send_frame(true, 1, connect.as_bytes()).expect("connect-twilio");
    let caller = TwilioCaller::start(&relay, id, &[]);
    let agent = bot.ready(0);
    caller.send_audio(&frames(7, 0..3));
    assert_eq!(agent.wait_media(3), frames(7, 0..3));
    bad.send_frame(true, 2, b"\x00\x01binary audio").expect("a binary frame");
    assert_eq!(close_code(&mut bad), Some(1003), "data the protocol cannot carry");
    caller.send_audio(&frames(7, 3..6));
    assert_eq!(agent.wait_media(6), frames(7, 0..6), "the caller's audio still reaches the bot");
    assert_eq!(good.wait_audio("inbound", 6), frames(7, 0..6), "and the other frontend");
}

/// A binary frame on `/twilio/stream` closes that stream with 1003, before its `start` (on the
/// accepting core) and after it (on the call's core); the relay's other calls go on.
#[test]
fn binary_on_twilio_stream_closes_it() {
    let bot = TwilioBot::start();
    let relay = Relay::start(&["--agent-url", &bot.url("/bot")]);
    let other = TwilioCaller::start(&relay, "CA-bin-other", &[]);
    let other_agent = bot.ready(0);

    let mut early = RawWs::connect(relay.addr(), "/twilio/stream", &[]).expect("upgrade");
    early.send_frame(true, 1, connected_msg().to_string().as_bytes()).expect("connected");
    early.send_frame(true, 2, &[0xff; 160]).expect("binary μ-law instead of media");
    assert_eq!(close_code(&mut early), Some(1003), "before start");

    let mut started = RawWs::connect(relay.addr(), "/twilio/stream", &[]).expect("upgrade");
    let account = "AC0123456789abcdef0123456789abcdef";
    let start = start_msg(1, "MZbinstarted", account, "CA-bin-started", &[("callSid", "CA-bin-started")]);
    started.send_frame(true, 1, connected_msg().to_string().as_bytes()).expect("connected");
    started.send_frame(true, 1, start.to_string().as_bytes()).expect("start");
    let _started_agent = bot.ready(1);
    started.send_frame(true, 2, &[0xff; 160]).expect("binary μ-law instead of media");
    assert_eq!(close_code(&mut started), Some(1003), "after start");

    other.send_audio(&frames(8, 0..4));
    assert_eq!(other_agent.wait_media(4), frames(8, 0..4), "the other call goes on");
}

/// A binary frame on `/llm-websocket/{call_id}` closes that socket with 1003; another call's
/// socket is still answered.
#[test]
fn binary_on_llm_websocket_closes_it() {
    let relay = Relay::start(&[]);
    let mut bad = RawWs::connect(relay.addr(), "/llm-websocket/call-bin", &[]).expect("upgrade");
    bad.send_frame(true, 2, b"{\"interaction_type\":\"ping_pong\"}").expect("a binary frame");
    assert_eq!(close_code(&mut bad), Some(1003), "data the protocol cannot carry");
    let mut good = relay.ws("/llm-websocket/call-ok", &[]).expect("upgrade");
    let first = good.recv_json();
    assert!(first.is_object(), "the other call's socket is served: {first}");
}

/// A `start` whose `callSid` is over its bound is refused at once with 1008 and a reason naming
/// the field, not left open until a timeout.
#[test]
fn oversized_call_sid_is_refused_at_once() {
    let relay = Relay::start(&["--header-timeout", "60s", "--idle-timeout", "60s"]);
    let long = "C".repeat(300);
    let start = start_msg(1, "MZoversized", "AC0123456789abcdef0123456789abcdef", &long, &[]);
    let mut bytes = encode_frame(true, 1, connected_msg().to_string().as_bytes(), Some([1, 2, 3, 4]));
    bytes.extend(encode_frame(true, 1, start.to_string().as_bytes(), Some([1, 2, 3, 4])));
    let mut ws = RawWs::connect_with_early(relay.addr(), "/twilio/stream", &[], &bytes).expect("upgrade");
    let (code, reason) = close_of(&mut ws);
    assert_eq!(code, Some(1008), "policy violation: {reason}");
    assert!(reason.contains("callSid"), "the reason names the field: {reason:?}");
}

/// A `start` whose `callSid` (as a custom parameter, or as `start.callSid`) is not a valid id is
/// refused at once with 1008 and a reason.
#[test]
fn invalid_call_sid_is_refused_at_once() {
    let relay = Relay::start(&["--header-timeout", "60s", "--idle-timeout", "60s"]);
    for (sid, param) in [("CA bad", ""), ("CA-fine", "has spaces"), ("", &*"p".repeat(300))] {
        let params: &[(&str, &str)] = if param.is_empty() { &[] } else { &[("callSid", param)] };
        let start = start_msg(1, "MZinvalid", "AC0123456789abcdef0123456789abcdef", sid, params);
        let mut bytes = encode_frame(true, 1, connected_msg().to_string().as_bytes(), Some([1, 2, 3, 4]));
        bytes.extend(encode_frame(true, 1, start.to_string().as_bytes(), Some([1, 2, 3, 4])));
        let mut ws = RawWs::connect_with_early(relay.addr(), "/twilio/stream", &[], &bytes).expect("upgrade");
        let (code, reason) = close_of(&mut ws);
        assert_eq!(code, Some(1008), "{sid:?}/{param:?}: {reason}");
        assert!(!reason.is_empty(), "{sid:?}/{param:?}: a reason is given");
    }
}

/// The close code the relay sends, skipping data frames.
fn close_code(ws: &mut RawWs) -> Option<u16> {
    let mut seen = Vec::new();
    ws.read_until_close(&mut seen)
}

/// The close code and reason the relay sends, skipping data frames.
fn close_of(ws: &mut RawWs) -> (Option<u16>, String) {
    for _ in 0..100 {
        let Some(frame): Option<RawFrame> = ws.read_frame() else { return (None, String::new()) };
        if frame.opcode == 8 {
            let reason = frame.payload.get(2..).map(|r| String::from_utf8_lossy(r).into_owned()).unwrap_or_default();
            return (frame.close_code(), reason);
        }
    }
    panic!("no close frame among 100 frames");
}
