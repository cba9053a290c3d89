//! Every event socket ends: a peer that ignores the relay's close frame is dropped after the close
//! wait, and a silent peer is pinged and then closed with 1001 after `--ws-idle-timeout`, while a
//! peer that answers the pings stays connected.

use std::time::{Duration, Instant};

use relay_tests::{assert_success, RawRead, RawWs, Relay, TIMEOUT};
use serde_json::json;

/// Relay flags that make the idle timeout short enough to watch.
const FAST_IDLE: [&str; 4] = ["--ws-ping-interval", "300ms", "--ws-idle-timeout", "1s"];

/// A client that ignores the close frame after `/stop-call` but keeps sending is still disconnected.
#[test]
fn ignored_close_is_dropped_despite_traffic() {
    let relay = Relay::start(&[]);
    assert_success(&relay.start_call("deaf", "t"), "Call started successfully");
    let mut ws = RawWs::connect(relay.addr(), "/ws?sessionId=deaf", &[("Authorization", "Bearer t")]).expect("upgrade");
    assert_success(&relay.stop_call("deaf"), "Call stopped successfully");

    // Every ~300 ms: one text ping, then whatever the relay sends meanwhile; never answer its close.
    // The relay half-closes right after its close frame, so only a failing write shows that it
    // dropped the connection (our write after its full close is answered with a reset).
    let deadline = Instant::now() + TIMEOUT;
    let mut close_code = None;
    let mut sent_after_close = 0;
    let mut dropped = false;
    while Instant::now() < deadline {
        if ws.send_frame(true, 1, br#"{"type":"ping"}"#).is_err() {
            dropped = true;
            break;
        }
        if close_code.is_some() {
            sent_after_close += 1;
        }
        let tick = Instant::now() + Duration::from_millis(300);
        loop {
            match ws.read_frame_within(tick.saturating_duration_since(Instant::now())) {
                RawRead::Frame(frame) if frame.opcode == 8 => close_code = Some(frame.close_code()),
                RawRead::Frame(_) => {}
                RawRead::Quiet => break,
                RawRead::Ended => {
                    // Nothing more to read; keep the sending pace.
                    std::thread::sleep(tick.saturating_duration_since(Instant::now()));
                    break;
                }
            }
        }
    }
    assert_eq!(close_code, Some(Some(1000)), "the relay sent its close frame");
    assert!(sent_after_close > 0, "the client kept sending after the close frame");
    assert!(dropped, "the connection still took our frames {TIMEOUT:?} after the stop");
}

/// A client that sends nothing, not even pongs, is pinged and then closed with 1001.
#[test]
fn silent_client_is_pinged_then_closed() {
    let relay = Relay::start(&FAST_IDLE);
    assert_success(&relay.start_call("quiet", "t"), "Call started successfully");
    let mut ws =
        RawWs::connect(relay.addr(), "/ws?sessionId=quiet", &[("Authorization", "Bearer t")]).expect("upgrade");
    let mut seen = Vec::new();
    let code = ws.read_until_close(&mut seen);
    assert!(seen.iter().any(|f| f.opcode == 9), "the relay pinged before giving up: {seen:?}");
    assert!(matches!(code, Some(1001) | None), "closed as going away (or dropped), got {code:?}; frames {seen:?}");
    if code.is_some() {
        // We never answer the close either: the connection is dropped after the close wait.
        assert_eq!(ws.read_frame(), None, "the TCP connection ends after the unanswered close");
    }
}

/// A client that answers the relay's pings stays connected well past `--ws-idle-timeout`.
#[test]
fn answering_pings_keeps_the_socket_open() {
    let relay = Relay::start(&FAST_IDLE);
    assert_success(&relay.start_call("alive", "t"), "Call started successfully");
    let mut ws = relay.observe("alive", "t");
    // Read (answering pings) for 2.5 idle timeouts; nothing but pings may arrive.
    let until = Instant::now() + Duration::from_millis(2500);
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        if let Some(msg) = ws.recv_within(left) {
            panic!("only pings were expected while idle, got {msg:?} after {} pings", ws.pings_seen());
        }
    }
    assert!(ws.pings_seen() >= 2, "the relay pinged the idle socket: {} pings", ws.pings_seen());
    ws.send_json(&json!({"type": "ping"}));
    assert_eq!(ws.recv_json()["type"], "pong", "the socket still works");
}
