//! The `/ws` event socket: credentials, greeting, ping/pong, the event each control call emits,
//! waiting for a session to start, and the socket's limits.

use relay_tests::{assert_error, assert_success, is_ms_timestamp, poll_until, RawFrame, RawWs, Relay, WsMsg};
use serde_json::json;

/// The greeting is `connection_established` with the session id and a not-connected status.
#[test]
fn greeting_is_connection_established() {
    let relay = Relay::start(&[]);
    assert_success(&relay.start_call("g", "tok"), "Call started successfully");
    let mut ws = relay.ws("/ws?sessionId=g", &[("Authorization", "Bearer tok")]).expect("upgrade");
    let v = ws.recv_json();
    assert_eq!(
        v,
        json!({"type": "connection_established", "sessionId": "g", "status": {"isConnected": false, "isAgentTalking": false}})
    );
}

/// The access token also works as the `accessToken` query parameter.
#[test]
fn token_in_query_is_accepted() {
    let relay = Relay::start(&[]);
    assert_success(&relay.start_call("q", "tok-123"), "Call started successfully");
    let mut ws = relay.ws("/ws?sessionId=q&accessToken=tok-123", &[]).expect("upgrade");
    assert_eq!(ws.recv_json()["type"], "connection_established");
}

/// For an active session, a wrong token is refused with 401 before any upgrade, and on a relay
/// with an API key so is a missing one.
#[test]
fn bad_credentials_for_active_session_are_401() {
    let keyed = Relay::start(&["--api-key", "the-key"]);
    assert_success(&keyed.start_call("a", "right"), "Call started successfully");
    assert_eq!(keyed.ws("/ws?sessionId=a", &[]).err(), Some(401));
    let relay = Relay::start(&[]);
    assert_success(&relay.start_call("a", "right"), "Call started successfully");
    assert_eq!(relay.ws("/ws?sessionId=a", &[("Authorization", "Bearer wrong")]).err(), Some(401));
    assert_eq!(relay.ws("/ws?sessionId=a&accessToken=wrong", &[]).err(), Some(401));
    assert_eq!(relay.ws("/ws?sessionId=a", &[("Authorization", "Bearer righ")]).err(), Some(401));
    assert_eq!(relay.ws("/ws?sessionId=a", &[("Authorization", "Bearer rightt")]).err(), Some(401));
    // And the refusals did not attach anything.
    let data = assert_success(&relay.get("/call-status?sessionId=a"), "Call status retrieved");
    assert_eq!(data["hasWebSocket"], false);
}

/// On a relay with an API key, a socket without any credential for a session that has not started
/// is refused with 401.
#[test]
fn missing_token_for_unstarted_session_is_401_with_a_key() {
    let relay = Relay::start(&["--api-key", "the-key"]);
    assert_eq!(relay.ws("/ws?sessionId=later", &[]).err(), Some(401));
}

/// Seeds 000/001's own web page works against a default (keyless) relay: it opens
/// `ws://HOST/ws?sessionId=web-session-<ms>` with no token before `/start-call`, then starts the
/// call with the seed's body and drives it, and its socket sees each event.
#[test]
fn seed_page_flow_needs_no_token_on_a_keyless_relay() {
    let relay = Relay::start(&[]);
    let id = "web-session-1765145700123";
    // What a browser sends for `new WebSocket(`ws://localhost:8080/ws?sessionId=${sessionId}`)`
    // from a page opened as a file: no credential, `Origin: null`.
    let mut ws = relay.ws(&format!("/ws?sessionId={id}"), &[("Origin", "null")]).expect("the seed page's socket opens");
    let greeting = ws.recv_json();
    assert_eq!(greeting["type"], "connection_established", "{greeting}");
    assert_eq!(greeting["sessionId"], id, "{greeting}");
    let body = json!({"sessionId": id, "accessToken": "demo-token", "sampleRate": 16000, "emitRawAudioSamples": true});
    assert_success(&relay.post("/start-call", &body), "Call started successfully");
    assert_eq!(ws.expect_event("call_started")["sessionId"], id);
    assert_success(&relay.post("/mute", &json!({"sessionId": id})), "Microphone muted");
    assert_eq!(ws.expect_event("update"), json!({"microphoneEnabled": false}));
    // A second tab of the page, once the call runs, gets in the same way.
    let mut late = relay.ws(&format!("/ws?sessionId={id}"), &[("Origin", "null")]).expect("a later socket opens");
    assert_eq!(late.recv_json()["type"], "connection_established");
    assert_success(&relay.post("/stop-call", &json!({"sessionId": id})), "Call stopped successfully");
    assert_eq!(ws.expect_event("call_ended")["sessionId"], id);
    // The same page against a relay with an API key is refused, before and after the start.
    let keyed = Relay::start(&["--api-key", "the-key"]);
    assert_eq!(keyed.ws(&format!("/ws?sessionId={id}"), &[("Origin", "null")]).err(), Some(401));
}

/// `/call-status` says `hasWebSocket` while a socket is attached, and not after it closes.
#[test]
fn has_web_socket_follows_attachment() {
    let relay = Relay::start(&[]);
    assert_success(&relay.start_call("h", "t"), "Call started successfully");
    let mut ws = relay.observe("h", "t");
    let data = assert_success(&relay.get("/call-status?sessionId=h"), "Call status retrieved");
    assert_eq!(data["hasWebSocket"], true);
    ws.close();
    assert_eq!(ws.expect_close(), Some(1000), "the relay answers our close with 1000");
    poll_until("hasWebSocket to become false", || {
        let data = assert_success(&relay.get("/call-status?sessionId=h"), "Call status retrieved");
        (data["hasWebSocket"] == false).then_some(())
    });
}

/// `{"type":"ping"}` is answered with a pong carrying a millisecond timestamp string.
#[test]
fn ping_message_gets_pong() {
    let relay = Relay::start(&[]);
    assert_success(&relay.start_call("p", "t"), "Call started successfully");
    let mut ws = relay.observe("p", "t");
    for _ in 0..3 {
        ws.send_json(&json!({"type": "ping"}));
        let v = ws.recv_json();
        assert_eq!(v["type"], "pong", "{v}");
        assert!(is_ms_timestamp(&v["timestamp"]), "{v}");
        assert_eq!(v.as_object().map(|o| o.len()), Some(2), "pong has exactly type and timestamp: {v}");
    }
}

/// Non-JSON text is answered with an `error` event and the socket stays usable.
#[test]
fn non_json_text_gets_error_event() {
    let relay = Relay::start(&[]);
    assert_success(&relay.start_call("e", "t"), "Call started successfully");
    let mut ws = relay.observe("e", "t");
    ws.send_text("this is not json");
    ws.expect_event("error");
    ws.send_json(&json!({"type": "ping"}));
    assert_eq!(ws.recv_json()["type"], "pong");
}

/// WebSocket ping control frames are answered with pong frames carrying the same payload.
#[test]
fn ping_frame_gets_pong_frame() {
    let relay = Relay::start(&[]);
    assert_success(&relay.start_call("pf", "t"), "Call started successfully");
    let mut ws = relay.observe("pf", "t");
    ws.send_ping(b"are-you-there");
    assert_eq!(ws.recv(), WsMsg::Pong(b"are-you-there".to_vec()));
}

/// Each control call emits its event, and `/stop-call` ends with `call_ended` and close 1000.
#[test]
fn control_calls_emit_events() {
    let relay = Relay::start(&[]);
    assert_success(&relay.start_call("ev", "t"), "Call started successfully");
    let mut ws = relay.observe("ev", "t");

    assert_success(&relay.post("/mute", &json!({"sessionId": "ev"})), "Microphone muted");
    assert_eq!(ws.expect_event("update"), json!({"microphoneEnabled": false}));
    assert_success(&relay.post("/unmute", &json!({"sessionId": "ev"})), "Microphone unmuted");
    assert_eq!(ws.expect_event("update"), json!({"microphoneEnabled": true}));
    assert_success(
        &relay.post("/send-custom-stream", &json!({"sessionId": "ev", "streamId": "promo"})),
        "Custom stream sent",
    );
    assert_eq!(ws.expect_event("custom_media_stream_sent"), json!({"streamId": "promo", "kind": "audio"}));
    assert_success(&relay.post("/resume-microphone", &json!({"sessionId": "ev"})), "Microphone resumed");
    assert_eq!(ws.expect_event("microphone_resumed"), json!({"previousStreamId": "promo"}));
    assert_success(&relay.stop_call("ev"), "Call stopped successfully");
    assert_eq!(ws.expect_event("call_ended"), json!({"sessionId": "ev", "reason": "stopped"}));
    assert_eq!(ws.expect_close(), Some(1000));
}

/// Status queries emit nothing: the next message after them is the pong we ask for.
#[test]
fn queries_emit_no_events() {
    let relay = Relay::start(&[]);
    assert_success(&relay.start_call("quiet", "t"), "Call started successfully");
    let mut ws = relay.observe("quiet", "t");
    assert_success(&relay.get("/call-status?sessionId=quiet"), "Call status retrieved");
    assert_success(&relay.get("/track-status?sessionId=quiet"), "Track status retrieved");
    ws.send_json(&json!({"type": "ping"}));
    assert_eq!(ws.recv_json()["type"], "pong");
}

/// A socket opened before `/start-call` with the right token waits and then gets `call_started`.
#[test]
fn waiting_socket_gets_call_started() {
    let relay = Relay::start(&[]);
    let mut ws = relay.observe("early", "tok");
    let body = json!({"sessionId": "early", "accessToken": "tok", "sampleRate": 48000, "emitRawAudioSamples": true});
    assert_success(&relay.post("/start-call", &body), "Call started successfully");
    assert_eq!(
        ws.expect_event("call_started"),
        json!({"sessionId": "early", "sampleRate": 48000, "emitRawAudioSamples": true})
    );
    let data = assert_success(&relay.get("/call-status?sessionId=early"), "Call status retrieved");
    assert_eq!(data["hasWebSocket"], true);
}

/// At `/start-call`, waiting sockets with another token are closed with 1008; matching ones stay.
#[test]
fn waiting_socket_with_wrong_token_is_closed_1008() {
    let relay = Relay::start(&[]);
    let mut wrong = relay.observe("w", "not-it");
    let mut right = relay.ws("/ws?sessionId=w&accessToken=it", &[]).expect("upgrade");
    assert_eq!(right.recv_json()["type"], "connection_established");
    assert_success(&relay.start_call("w", "it"), "Call started successfully");
    assert_eq!(wrong.expect_close(), Some(1008));
    assert_eq!(right.expect_event("call_started")["sessionId"], "w");
    assert_success(&relay.post("/mute", &json!({"sessionId": "w"})), "Microphone muted");
    assert_eq!(right.expect_event("update"), json!({"microphoneEnabled": false}));
}

/// A socket waiting for a session that never starts is closed with 1008 after the timeout.
#[test]
fn waiting_socket_times_out_with_1008() {
    let relay = Relay::start(&["--pending-observer-timeout", "1s"]);
    let mut ws = relay.observe("never", "tok");
    assert_eq!(ws.expect_close(), Some(1008));
    // The id is free again: it can start normally and new sockets attach.
    assert_success(&relay.start_call("never", "tok"), "Call started successfully");
    let _ws = relay.observe("never", "tok");
}

/// Past `--observers-per-session` sockets the upgrade is refused with 429; a freed slot is reusable.
#[test]
fn observer_limit_is_429() {
    let relay = Relay::start(&["--observers-per-session", "2"]);
    assert_success(&relay.start_call("lim", "t"), "Call started successfully");
    let mut first = relay.observe("lim", "t");
    let _second = relay.observe("lim", "t");
    let refused = RawWs::connect(relay.addr(), "/ws?sessionId=lim", &[("Authorization", "Bearer t")])
        .err()
        .expect("a third socket is refused");
    assert_error(&refused, 429);
    assert!(refused.header("retry-after").is_some(), "429 carries Retry-After: {:?}", refused.headers);
    first.close();
    assert_eq!(first.expect_close(), Some(1000));
    let mut third =
        poll_until("a freed observer slot", || relay.ws("/ws?sessionId=lim", &[("Authorization", "Bearer t")]).ok());
    assert_eq!(third.recv_json()["type"], "connection_established");
}

/// A client frame with a payload over 64 KiB closes the socket with 1009.
#[test]
fn oversized_frame_closes_1009() {
    let relay = Relay::start(&[]);
    assert_success(&relay.start_call("big", "t"), "Call started successfully");
    let mut ws = RawWs::connect(relay.addr(), "/ws?sessionId=big", &[("Authorization", "Bearer t")]).expect("upgrade");
    let greeting = ws.read_frame().expect("greeting frame");
    assert_eq!(greeting.opcode, 1);
    let _ = ws.send_frame(true, 1, &vec![b' '; 64 * 1024 + 1]);
    let mut seen = Vec::new();
    assert_eq!(ws.read_until_close(&mut seen), Some(1009), "frames before the close: {seen:?}");
}

/// A fragmented message over 256 KiB (each frame within the frame limit) closes with 1009.
#[test]
fn oversized_message_closes_1009() {
    let relay = Relay::start(&[]);
    assert_success(&relay.start_call("huge", "t"), "Call started successfully");
    let mut ws = RawWs::connect(relay.addr(), "/ws?sessionId=huge", &[("Authorization", "Bearer t")]).expect("upgrade");
    ws.read_frame().expect("greeting frame");
    let chunk = vec![b' '; 60 * 1024];
    for i in 0..5 {
        // 5 × 60 KiB = 300 KiB; the relay may close before the last fragments are written.
        let _ = ws.send_frame(i == 4, if i == 0 { 1 } else { 0 }, &chunk);
    }
    let mut seen = Vec::new();
    assert_eq!(ws.read_until_close(&mut seen), Some(1009), "frames before the close: {seen:?}");
}

/// A text message split over continuation frames is reassembled: a fragmented ping gets a pong.
#[test]
fn fragmented_ping_gets_pong() {
    let relay = Relay::start(&[]);
    assert_success(&relay.start_call("frag", "t"), "Call started successfully");
    let mut ws = RawWs::connect(relay.addr(), "/ws?sessionId=frag", &[("Authorization", "Bearer t")]).expect("upgrade");
    ws.read_frame().expect("greeting frame");
    ws.send_frame(false, 1, b"{\"ty").expect("first fragment");
    ws.send_frame(false, 0, b"pe\":\"pi").expect("middle fragment");
    // A control frame may come between fragments.
    ws.send_frame(true, 9, b"mid").expect("ping between fragments");
    ws.send_frame(true, 0, b"ng\"}").expect("last fragment");
    let mut pong_frame = false;
    let mut pong_message = None;
    for _ in 0..4 {
        let RawFrame { opcode, payload, .. } = ws.read_frame().expect("a frame");
        match opcode {
            10 => {
                assert_eq!(payload, b"mid");
                pong_frame = true;
            }
            1 => pong_message = Some(serde_json::from_slice::<serde_json::Value>(&payload).expect("JSON")),
            other => panic!("unexpected opcode {other}"),
        }
        if pong_frame && pong_message.is_some() {
            break;
        }
    }
    assert!(pong_frame, "the ping between fragments was answered");
    assert_eq!(pong_message.expect("a text reply")["type"], "pong");
}

/// A client breaking the protocol (unmasked frame) is closed with 1002; other sockets go on.
#[test]
fn protocol_violation_costs_only_that_socket() {
    let relay = Relay::start(&[]);
    assert_success(&relay.start_call("pv", "t"), "Call started successfully");
    let mut good = relay.observe("pv", "t");
    let mut bad = RawWs::connect(relay.addr(), "/ws?sessionId=pv", &[("Authorization", "Bearer t")]).expect("upgrade");
    bad.read_frame().expect("greeting frame");
    let _ = bad.send_raw(&relay_tests::encode_frame(true, 1, b"{\"type\":\"ping\"}", None));
    let mut seen = Vec::new();
    assert_eq!(bad.read_until_close(&mut seen), Some(1002));
    assert_success(&relay.post("/mute", &json!({"sessionId": "pv"})), "Microphone muted");
    assert_eq!(good.expect_event("update"), json!({"microphoneEnabled": false}));
}

/// `/ws` without a valid `sessionId` is refused with 400.
#[test]
fn ws_needs_a_valid_session_id() {
    let relay = Relay::start(&[]);
    for path in ["/ws", "/ws?sessionId=", "/ws?sessionId=a%20b", "/ws?accessToken=t"] {
        assert_eq!(relay.ws(path, &[("Authorization", "Bearer t")]).err(), Some(400), "{path}");
    }
}

/// A session's events reach only its own sockets.
#[test]
fn events_stay_within_their_session() {
    let relay = Relay::start(&[]);
    assert_success(&relay.start_call("one", "t1"), "Call started successfully");
    assert_success(&relay.start_call("two", "t2"), "Call started successfully");
    let mut one = relay.observe("one", "t1");
    let mut two = relay.observe("two", "t2");
    assert_success(&relay.post("/mute", &json!({"sessionId": "one"})), "Microphone muted");
    assert_success(&relay.stop_call("one"), "Call stopped successfully");
    assert_eq!(one.expect_event("update"), json!({"microphoneEnabled": false}));
    assert_eq!(one.expect_event("call_ended")["sessionId"], "one");
    two.send_json(&json!({"type": "ping"}));
    assert_eq!(two.recv_json()["type"], "pong", "session two saw nothing of session one");
}

/// Sockets waiting for a session count toward `--observers-per-session` too.
#[test]
fn observer_limit_counts_waiting_sockets() {
    let relay = Relay::start(&["--observers-per-session", "2"]);
    let _a = relay.observe("soon", "t");
    let _b = relay.observe("soon", "t");
    assert_eq!(relay.ws("/ws?sessionId=soon&accessToken=t", &[]).err(), Some(429));
}

/// Browser-style upgrade headers (`Connection: keep-alive, Upgrade`, any letter case) are accepted.
#[test]
fn browser_style_upgrade_is_accepted() {
    let relay = Relay::start(&[]);
    assert_success(&relay.start_call("ff", "t"), "Call started successfully");
    let headers = [
        ("Connection", "keep-alive, Upgrade"),
        ("Upgrade", "WebSocket"),
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("Origin", "https://app.example"),
        ("Sec-WebSocket-Extensions", "permessage-deflate; client_max_window_bits"),
    ];
    let mut conn = relay_tests::Conn::open(relay.addr());
    let resp = conn.request("GET", "/ws?sessionId=ff&accessToken=t", &headers, None);
    assert_eq!(resp.status, 101, "{:?} {}", resp.headers, resp.text());
    assert_eq!(resp.header("sec-websocket-accept"), Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="));
    assert_eq!(resp.header("sec-websocket-extensions"), None, "no extension is negotiated");
}

/// 426 answers name what to upgrade to: `Upgrade: websocket` for a plain GET (RFC 9110 §15.5.22)
/// and `Sec-WebSocket-Version: 13` for an unsupported version (RFC 6455 §4.4).
#[test]
fn upgrade_required_names_the_protocol() {
    let relay = Relay::start(&[]);
    let plain = relay.request("GET", "/ws?sessionId=x&accessToken=t", &[], None);
    assert_error(&plain, 426);
    assert!(
        plain.header("upgrade").is_some_and(|u| u.eq_ignore_ascii_case("websocket")),
        "426 without Upgrade header: {:?}",
        plain.headers
    );
    let old = RawWs::connect(relay.addr(), "/ws?sessionId=x&accessToken=t", &[("Sec-WebSocket-Version", "8")]);
    let old = old.err().expect("version 8 is refused");
    assert_eq!(old.status, 426, "{}", old.text());
    assert_eq!(old.header("sec-websocket-version"), Some("13"), "headers: {:?}", old.headers);
}
