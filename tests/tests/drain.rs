//! Drain and readiness against the real relay (two cores): `/health/ready` for a balancer's
//! check, `POST /admin/drain`/`/admin/undrain` and SIGUSR1; while draining a new call's first leg
//! gets 503 with `Retry-After` on every entry point, every leg of a live call is still served, and
//! SIGTERM on a drained empty node exits without waiting for its grace period.

use std::time::Duration;

use relay_tests::telephony::{connected_msg, frames, start_msg, Frontend, Peer, TwilioBot, TwilioCaller};
use relay_tests::{encode_frame, ids_on_core, poll_until, Conn, RawWs, Relay, Response, Ws};
use serde_json::{json, Value};
use str0m::media::Direction;

/// The WebSocket upgrade's header fields.
const UPGRADE: [(&str, &str); 4] = [
    ("Upgrade", "websocket"),
    ("Connection", "Upgrade"),
    ("Sec-WebSocket-Version", "13"),
    ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
];

/// While drained by `POST /admin/drain`: `/health/ready` says 404 with the live calls, a live
/// Twilio call keeps its stream (frames still reach its bot), gets a new `/ws` observer and a new
/// frontend, and a live session takes a WHEP listener and stops with `/stop-call`; every entry point of a new call answers
/// 503 with `Retry-After` (a `/twilio/stream` whose `start` names a new call is closed with 1013);
/// after `/admin/undrain` new calls begin again.
#[test]
fn drain_serves_live_calls_and_refuses_new_ones() {
    let bot = TwilioBot::start();
    let relay = Relay::start(&["--agent-url", &bot.url("/bot"), "--node-id", "drain-node"]);
    let ready = relay.get("/health/ready");
    assert_eq!(ready.status, 200, "{}", ready.text());
    assert_eq!(ready.json()["status"], "ready");
    assert_eq!(ready.json()["node"], "drain-node");
    assert_eq!(relay.detailed()["services"]["server"]["draining"], false);

    // Live calls: a Twilio caller with its bot, and a session-control session with an observer.
    let live = "CA-live";
    let peer = Peer::connect(relay.addr(), &format!("/twilio/stream/{live}"), &[]).expect("upgrade");
    let caller = TwilioCaller::greet(peer, live, &[("callSid", live)]);
    let agent = bot.ready(0);
    caller.send_audio(&frames(1, 0..5));
    assert_eq!(agent.wait_media(5), frames(1, 0..5));
    let session = "s-live";
    assert_eq!(relay.start_call(session, "t").status, 200);
    let mut watcher = relay.observe(session, "t");

    let drained = relay.post("/admin/drain", &json!({}));
    assert_eq!(drained.status, 200, "{}", drained.text());
    assert_eq!((&drained.json()["draining"], &drained.json()["activeSessions"]), (&json!(true), &json!(2)));
    let ready = relay.get("/health/ready");
    assert_eq!(ready.status, 404, "{}", ready.text());
    assert_eq!((&ready.json()["status"], &ready.json()["activeSessions"]), (&json!("draining"), &json!(2)));
    assert_eq!(relay.detailed()["services"]["server"]["draining"], true);

    // Every leg of the live calls is still served.
    caller.send_audio(&frames(1, 5..10));
    assert_eq!(agent.wait_media(10), frames(1, 0..10), "the live caller's frames still reach its bot");
    let mut observer = Ws::connect(relay.addr(), &format!("/ws?sessionId={live}"), &[]).expect("a /ws of a live call");
    let hello = observer.recv_json();
    assert_eq!((&hello["type"], &hello["status"]["isConnected"]), (&json!("connection_established"), &json!(true)));
    let front = Frontend::connect(&relay, live, "watcher", "");
    caller.send_audio(&frames(1, 10..13));
    assert_eq!(front.wait_audio("inbound", 3), frames(1, 10..13), "a new frontend of a live call hears it");
    let webhook = voice(&relay, live);
    assert_eq!(webhook.status, 200, "the voice webhook of a live call: {}", webhook.text());
    let listener = relay_tests::webrtc::Peer::new(Direction::RecvOnly);
    let sdp = [("Content-Type", "application/sdp"), ("Authorization", "Bearer t")];
    let whep = relay.request("POST", &format!("/whep/{session}"), &sdp, Some(listener.offer()));
    assert_eq!(whep.status, 201, "a WHEP listener of a live call: {}", whep.text());
    let stopped = relay.stop_call(session);
    assert_eq!(stopped.status, 200, "{}", stopped.text());
    assert_eq!(watcher.expect_event("call_ended")["reason"], "stopped");

    // A new call's first leg, on each entry point, and on both cores.
    for core in 0..2 {
        let id = &ids_on_core("fresh", core, 2, 1)[0];
        assert_draining(&relay.start_call(id, "t"), &format!("/start-call {id}"));
        assert_draining(&voice(&relay, id), &format!("/twilio/voice {id}"));
        let refused = RawWs::connect(relay.addr(), &format!("/twilio/stream/{id}"), &[]).err();
        assert_draining(&refused.expect("refused before the 101"), &format!("/twilio/stream/{id}"));
        let mut headers = UPGRADE.to_vec();
        headers.push(("Authorization", "Bearer t"));
        let ws = relay.request("GET", &format!("/ws?sessionId={id}"), &headers, None);
        assert_draining(&ws, &format!("/ws {id}"));
        let frontend = relay.request("GET", &format!("/frontend-stream?callSid={id}&user_id=u"), &UPGRADE, None);
        assert_draining(&frontend, &format!("/frontend-stream {id}"));
        assert_eq!(flat_stream_close(&relay, id), Some(1013), "a /twilio/stream whose start names {id}");
    }
    let outbound = relay.post("/outbound-call", &json!({ "user_id": "u1", "number": "+14155550123" }));
    assert_draining(&outbound, "/outbound-call");
    assert_eq!(relay.active_sessions(), 1, "no new call began");

    // The live call ends; the node stays drained and says so.
    caller.stop();
    caller.wait_closed();
    poll_until("the live call ended", || (relay.active_sessions() == 0).then_some(()));
    let ready = relay.get("/health/ready");
    assert_eq!((ready.status, &ready.json()["activeSessions"]), (404, &json!(0)), "{}", ready.text());

    let undrained = relay.post("/admin/undrain", &json!({}));
    assert_eq!(undrained.status, 200, "{}", undrained.text());
    assert_eq!(undrained.json()["draining"], false);
    assert_eq!(relay.get("/health/ready").status, 200);
    assert_eq!(relay.start_call("after", "t").status, 200, "new calls begin again");
    assert_eq!(voice(&relay, "CA-after").status, 200);
}

/// SIGUSR1 drains as `POST /admin/drain` does; the drain and undrain endpoints need the API key
/// when one is set, and `/health/ready` does not.
#[test]
fn sigusr1_drains_and_admin_needs_the_key() {
    let relay = Relay::start(&["--api-key", "k"]);
    let mut anonymous = Conn::open(relay.addr());
    let ready = anonymous.request("GET", "/health/ready", &[], None);
    assert_eq!(ready.status, 200, "public, as /health: {}", ready.text());
    assert_eq!(anonymous.request("POST", "/admin/drain", &[], Some("{}")).status, 401);
    assert_eq!(anonymous.request("POST", "/admin/undrain", &[], Some("{}")).status, 401);
    relay.signal(libc::SIGUSR1);
    let ready = poll_until("SIGUSR1 drained the node", || {
        let r = relay.get("/health/ready");
        (r.status == 404).then_some(r)
    });
    assert_eq!(ready.json()["status"], "draining");
    assert_draining(&relay.start_call("late", "t"), "/start-call after SIGUSR1");
    assert_eq!(relay.post("/admin/undrain", &json!({})).status, 200);
    assert_eq!(relay.get("/health/ready").status, 200);
    assert_eq!(relay.start_call("late", "t").status, 200);
}

/// SIGTERM on a drained node with no call left exits 0 at once: a client stuck halfway through
/// its request, which a graceful shutdown waits for (up to the 120 s header timeout and grace),
/// does not hold it up.
#[test]
fn sigterm_on_a_drained_empty_node_exits_at_once() {
    let mut relay = Relay::start(&["--shutdown-grace", "120s", "--header-timeout", "120s"]);
    assert_eq!(relay.start_call("brief", "t").status, 200);
    assert_eq!(relay.post("/admin/drain", &json!({})).status, 200);
    assert_eq!(relay.stop_call("brief").status, 200);
    assert_eq!(relay.get("/health/ready").status, 404, "still drained once empty");
    let mut stuck = Conn::open(relay.addr());
    stuck.write_raw(b"POST /start-call HTTP/1.1\r\nHost: x\r\n").expect("write half a head");
    poll_until("the stuck connection is counted", || {
        let open: u64 = relay.detailed()["services"]["server"]["cores"]
            .as_array()
            .expect("cores")
            .iter()
            .map(|c| c["connections"].as_u64().unwrap_or(0))
            .sum();
        (open >= 2).then_some(())
    });
    relay.signal(libc::SIGTERM);
    // Far below the 120 s grace: wait_exit panics if the relay waited for it.
    let status = relay.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "exit status {status:?}");
}

/// Asserts a draining node's refusal of a new call: 503, `Retry-After: 5`, the JSON error.
fn assert_draining(resp: &Response, what: &str) {
    assert_eq!(resp.status, 503, "{what}: {}", resp.text());
    assert_eq!(resp.header("retry-after"), Some("5"), "{what}: {:?}", resp.headers);
    let body: Value = resp.json();
    assert_eq!(body["success"], false, "{what}: {body}");
    assert!(body["error"].as_str().is_some_and(|e| e.contains("draining")), "{what}: {body}");
}

/// `POST /twilio/voice` for `call_sid`, as Twilio sends it (no auth token configured).
fn voice(relay: &Relay, call_sid: &str) -> Response {
    let body = format!("CallSid={call_sid}&From=%2B15551230000&To=%2B15559870000");
    relay.request("POST", "/twilio/voice", &[("Content-Type", "application/x-www-form-urlencoded")], Some(&body))
}

/// Opens `/twilio/stream` (no call in the path) whose `start` names `call_sid`; the close code.
fn flat_stream_close(relay: &Relay, call_sid: &str) -> Option<u16> {
    let mask = Some([1, 2, 3, 4]);
    let start = start_msg(1, "MZflat", "AC0123456789abcdef0123456789abcdef", call_sid, &[("callSid", call_sid)]);
    let mut bytes = encode_frame(true, 1, connected_msg().to_string().as_bytes(), mask);
    bytes.extend(encode_frame(true, 1, start.to_string().as_bytes(), mask));
    let mut ws = RawWs::connect_with_early(relay.addr(), "/twilio/stream", &[], &bytes).expect("upgrade");
    ws.read_until_close(&mut Vec::new())
}
