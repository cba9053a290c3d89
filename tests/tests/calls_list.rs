//! `GET /calls`: the node's live calls gathered from every core (a Twilio caller with its bot, a
//! WebRTC caller), their fields and moving counters, the API key, and a bounded answer for
//! hundreds of sessions.

use std::time::Duration;

use relay_tests::telephony::{frames, TwilioBot, TwilioCaller};
use relay_tests::webrtc::{Peer, Send};
use relay_tests::{assert_error, is_rfc3339, owner, poll_until, Relay};
use serde_json::{json, Value};
use str0m::media::Direction;

const KEY: (&str, &str) = ("Authorization", "Bearer k");

/// The answer of `GET /calls{query}` with the API key.
fn calls(relay: &Relay, query: &str) -> Value {
    let r = relay.request("GET", &format!("/calls{query}"), &[KEY], None);
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

/// The call `id` in `list`, if listed.
fn find(list: &Value, id: &str) -> Option<Value> {
    list["calls"].as_array()?.iter().find(|c| c["id"] == id).cloned()
}

/// Polls `/calls` until call `id` satisfies `ok`.
fn wait_call(relay: &Relay, id: &str, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    poll_until(what, || find(&calls(relay, ""), id).filter(|c| ok(c)))
}

/// A Twilio call with a bot is listed with its kinds, node and core, ISO and ms start, and counters
/// that move on both legs; mute and a custom stream show in it; it leaves the list when it ends.
#[test]
fn twilio_call_is_listed_with_moving_counters() {
    let bot = TwilioBot::start();
    let relay = Relay::start(&["--agent-url", &bot.url("/bot"), "--api-key", "k", "--node-id", "n1"]);
    let id = "CA-listed";
    let caller = TwilioCaller::start(&relay, id, &[]);
    let agent = bot.ready(0);
    caller.send_audio(&frames(1, 0..10));
    agent.send_audio(&frames(2, 0..10));
    let first = wait_call(&relay, id, "10 frames each way", |c| {
        c["legs"]["caller"]["framesIn"] == 10 && c["legs"]["agent"]["framesOut"] == 10
    });
    assert_eq!(first["caller"], "twilio");
    assert_eq!(first["callerConnected"], true);
    assert_eq!(first["agent"], "bot");
    assert_eq!(first["agentState"], "open");
    assert_eq!(first["node"], "n1");
    assert_eq!(first["core"], owner(id, relay.cores()));
    assert!(is_rfc3339(first["startedAt"].as_str().expect("startedAt")), "{first}");
    assert!(first["startedAtMs"].as_u64().is_some_and(|ms| ms > 1_600_000_000_000), "{first}");
    assert!(first["durationMs"].is_u64(), "{first}");
    assert_eq!(first["microphoneEnabled"], true);
    assert_eq!(first["customStream"], Value::Null);
    assert!(first["legs"]["agent"]["framesIn"].as_u64().is_some_and(|n| n >= 10), "{first}");
    assert_eq!(first["legs"]["caller"]["dropped"], 0);

    // The counters move as audio flows.
    caller.send_audio(&frames(3, 0..15));
    let later = wait_call(&relay, id, "25 caller frames", |c| c["legs"]["caller"]["framesIn"] == 25);
    assert_eq!(later["legs"]["agent"]["framesOut"], 25);
    wait_call(&relay, id, "the bot's audio played to the caller", |c| c["legs"]["caller"]["framesOut"] == 10);

    // The seed API's controls show.
    let body = json!({ "sessionId": id });
    assert_eq!(relay.request("POST", "/mute", &[KEY], Some(&body.to_string())).status, 200);
    assert_eq!(find(&calls(&relay, ""), id).expect("listed")["microphoneEnabled"], false);
    let body = json!({ "sessionId": id, "streamId": "promo" });
    assert_eq!(relay.request("POST", "/send-custom-stream", &[KEY], Some(&body.to_string())).status, 200);
    assert_eq!(find(&calls(&relay, ""), id).expect("listed")["customStream"], "promo");

    caller.stop();
    poll_until("the call leaves the list", || find(&calls(&relay, ""), id).is_none().then_some(()));
}

/// A WebRTC caller (WHIP `role=caller`) is listed as `webrtc`, with its received frames counted.
#[test]
fn webrtc_caller_is_listed() {
    let relay = Relay::start(&["--api-key", "k"]);
    let id = "rtc-listed";
    let start = json!({ "sessionId": id, "accessToken": "tok" });
    assert_eq!(relay.request("POST", "/start-call", &[KEY], Some(&start.to_string())).status, 200);
    let listed = wait_call(&relay, id, "the session", |_| true);
    assert_eq!(listed["caller"], "none");
    assert_eq!(listed["agent"], "none");
    let mut peer = Peer::new(Direction::SendOnly);
    let r = relay.request(
        "POST",
        &format!("/whip/{id}?role=caller"),
        &[("Content-Type", "application/sdp"), ("Authorization", "Bearer tok")],
        Some(peer.offer()),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    peer.accept_answer(&r.text());
    assert!(peer.connect(Duration::from_secs(5)), "ICE and DTLS connect");
    peer.run(Duration::from_millis(600), Send::Tone(440.0));
    let c = wait_call(&relay, id, "the caller's packets counted", |c| {
        c["legs"]["caller"]["framesIn"].as_u64().is_some_and(|n| n >= 10)
    });
    assert_eq!(c["caller"], "webrtc");
    assert_eq!(c["callerConnected"], true);
    assert_eq!(c["webrtcLegs"], 1);
}

/// `/calls` needs the API key: none or a wrong one is 401; a bad `limit` or `all` is 400, and
/// `all=1` without shared records too.
#[test]
fn needs_the_api_key_and_a_valid_limit() {
    let relay = Relay::start(&["--api-key", "k"]);
    assert_error(&relay.request("GET", "/calls", &[], None), 401);
    assert_error(&relay.request("GET", "/calls", &[("Authorization", "Bearer nope")], None), 401);
    for bad in ["0", "1001", "x", "-3"] {
        assert_error(&relay.request("GET", &format!("/calls?limit={bad}"), &[KEY], None), 400);
    }
    for bad in ["all=2", "all=yes"] {
        assert_error(&relay.request("GET", &format!("/calls?{bad}"), &[KEY], None), 400);
    }
    // Every node's calls come from shared records: without --records-url, a 400 that says so.
    let r = relay.request("GET", "/calls?all=1", &[KEY], None);
    assert_error(&r, 400);
    assert!(r.text().contains("--records-url"), "{}", r.text());
    let empty = calls(&relay, "");
    assert_eq!(empty["total"], 0);
    assert_eq!(empty["truncated"], false);
    assert_eq!(empty["calls"], json!([]));
}

/// Hundreds of sessions over both cores: the answer lists `limit` of them (the oldest first),
/// counts them all and says it is cut; `limit=1000` lists every one.
#[test]
fn hundreds_of_sessions_bounded_answer() {
    let relay = Relay::start(&["--api-key", "k"]);
    let mut conn = relay.conn();
    for i in 0..300 {
        let body = json!({ "sessionId": format!("bulk-{i:03}"), "accessToken": "t" });
        let r = conn.request("POST", "/start-call", &[KEY], Some(&body.to_string()));
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let page = calls(&relay, "");
    assert_eq!(page["total"], 300);
    assert_eq!(page["limit"], 100);
    assert_eq!(page["truncated"], true);
    assert_eq!(page["unavailableCores"], json!([]));
    let listed = page["calls"].as_array().expect("calls");
    assert_eq!(listed.len(), 100);
    let starts: Vec<u64> = listed.iter().map(|c| c["startedAtMs"].as_u64().expect("ms")).collect();
    assert!(starts.windows(2).all(|w| w[0] <= w[1]), "oldest first");
    let cores: std::collections::BTreeSet<u64> = listed.iter().map(|c| c["core"].as_u64().expect("core")).collect();
    assert_eq!(cores.len(), 2, "both cores' calls are listed");
    let small = calls(&relay, "?limit=5");
    assert_eq!(small["calls"].as_array().expect("calls").len(), 5);
    let all = calls(&relay, "?limit=1000");
    assert_eq!(all["calls"].as_array().expect("calls").len(), 300);
    assert_eq!(all["truncated"], false);
}
