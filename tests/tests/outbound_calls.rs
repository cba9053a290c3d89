//! Outbound calls end to end (seed 004): `/outbound-call` dials through a local stand-in for
//! Twilio's REST API (`--twilio-api-base`), which then plays Twilio's part — signed voice webhook,
//! TwiML, Media Stream, status callbacks — while a Twilio Media Streams bot is the agent; then
//! `/call-status` and `/end-call`, and every way initiation can fail.

use relay_tests::telephony::{frames, unused_port, Events, Frontend, TwilioBot};
use relay_tests::twilio_rest::{
    invalid_number_error, owned, twilio_args, TwilioRest, ACCOUNT_SID, AUTH_TOKEN, FROM_NUMBER,
};
use relay_tests::{assert_error, assert_json_type, is_rfc3339, poll_until, Relay, Response};
use serde_json::{json, Value};

const NUMBER: &str = "+14155550123";
const PROMPT: &str = "You are a polite assistant booking a table for two & nothing \"else\".";
const FIRST: &str = "Hello! I'm calling about your <reservation>.";

/// The whole outbound path: Twilio request, TwiML, bot start, audio both ways, frontend, status timeline.
#[test]
fn outbound_call_end_to_end() {
    let twilio = TwilioRest::start();
    let bot = TwilioBot::start();
    let relay = start_relay(&twilio, &["--agent-url", &bot.url("/agent")]);
    let user = "olivia";

    let resp = initiate(&relay, user, NUMBER);
    let call = twilio.next_call();
    let sid = call.sid.clone();
    assert_eq!(resp.json(), json!({"success": true, "message": "Call initiated", "callSid": sid}));

    let requests = twilio.requests();
    assert_eq!(requests.len(), 1, "one request reached Twilio: {requests:?}");
    let create = &requests[0];
    assert_eq!((create.method.as_str(), create.path.as_str()), ("POST", calls_path().as_str()));
    assert_eq!(create.basic_auth(), Some((ACCOUNT_SID.to_owned(), AUTH_TOKEN.to_owned())), "Basic auth sid:token");
    assert_eq!(create.header("content-type"), Some("application/x-www-form-urlencoded"));
    assert!(!create.tls, "plain HTTP API base");
    let base = format!("http://{}", relay.addr());
    assert_eq!(create.form, expected_create_form(&base, NUMBER, user), "the Calls.json form");

    assert_eq!(
        call_status(&relay, &sid, user),
        json!({
            "success": true, "callSid": sid, "status": "queued", "startTime": null, "endTime": null, "duration": null
        })
    );
    let front = Frontend::connect(&relay, &sid, user, "");

    assert_eq!(call.status_callback("ringing", None).status, 200, "ringing callback accepted");
    assert_eq!(call_status(&relay, &sid, user)["status"], "ringing");

    let twiml = call.fetch_twiml();
    assert_eq!(twiml.stream_url, format!("ws://{}/twilio/stream/{sid}", relay.addr()));
    // The per-call stream signature: base64(HMAC-SHA1(auth token, call sid)), computed here on
    // its own.
    let relay_sig = {
        use base64::Engine as _;
        use hmac::{Hmac, Mac};
        let mut mac = Hmac::<sha1::Sha1>::new_from_slice(AUTH_TOKEN.as_bytes()).expect("any key length");
        mac.update(sid.as_bytes());
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    };
    let parameters = owned(&[
        ("callSid", &sid),
        ("from", FROM_NUMBER),
        ("to", NUMBER),
        ("prompt", PROMPT),
        ("first_message", FIRST),
        ("user_id", user),
        ("relaySig", &relay_sig),
    ]);
    assert_eq!(twiml.parameters, parameters, "TwiML <Parameter>s");
    assert_eq!(call_status(&relay, &sid, user)["startTime"], Value::Null, "the webhook alone starts no clock");

    let caller = call.open_stream(&twiml);
    let agent = bot.ready(0);
    let start = agent.start_msg();
    assert_eq!(start["start"]["callSid"], sid.as_str(), "start: {start}");
    // Every parameter but the relay's own stream signature.
    let custom: serde_json::Map<String, Value> = parameters
        .iter()
        .filter(|(k, _)| k != "relaySig")
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    assert_eq!(start["start"]["customParameters"], Value::Object(custom), "the bot's customParameters");

    let live = poll_until("call-status in-progress", || {
        let s = call_status(&relay, &sid, user);
        (s["status"] == "in-progress").then_some(s)
    });
    assert!(live["startTime"].as_str().is_some_and(is_rfc3339), "startTime once streaming: {live}");
    assert_eq!(live["endTime"], Value::Null, "no endTime while live: {live}");
    assert!(live["duration"].is_u64(), "a running duration while live: {live}");

    let up = frames(70, 0..50);
    let down = frames(71, 0..50);
    caller.send_audio(&up);
    agent.send_audio(&down);
    assert_eq!(agent.wait_media(up.len()), up, "the caller's audio at the bot, byte for byte");
    let heard: Vec<Vec<u8>> = caller.wait_media(down.len()).into_iter().map(|(_, f)| f).collect();
    assert_eq!(heard, down, "the bot's audio at the caller, byte for byte");
    assert_eq!(front.wait_audio("inbound", up.len()), up, "the frontend hears the caller");
    assert_eq!(front.wait_audio("outbound", down.len()), down, "the frontend hears the bot");

    caller.wait_sent();
    caller.stop();
    agent.wait_until("stop at the bot", |r| r.iter().find(|a| a.event() == Some("stop")).map(|_| ()));
    caller.wait_closed();
    let ended = poll_until("call-status completed", || {
        let s = call_status(&relay, &sid, user);
        (s["status"] == "completed").then_some(s)
    });
    assert_eq!(ended["startTime"], live["startTime"], "startTime kept: {ended}");
    let (start_s, end_s) = (rfc3339_secs(&ended["startTime"]), rfc3339_secs(&ended["endTime"]));
    assert!(end_s >= start_s, "endTime not before startTime: {ended}");
    let duration = ended["duration"].as_u64().unwrap_or_else(|| panic!("duration is a number: {ended}"));
    assert!(
        (end_s - start_s).saturating_sub(1) <= duration && duration <= end_s - start_s,
        "duration is endTime − startTime (ms precision): {ended}"
    );

    assert_eq!(call.status_callback("completed", Some(7)).status, 200, "completed callback accepted");
    let last = call_status(&relay, &sid, user);
    assert_eq!(
        (last["status"].as_str(), last["duration"].as_u64()),
        (Some("completed"), Some(7)),
        "Twilio's CallDuration wins: {last}"
    );
    assert_eq!(last["endTime"], ended["endTime"], "endTime kept: {last}");
}

/// `/end-call` POSTs `Status=completed` to the call's URL and ends the session; others' and unknown calls are 404.
#[test]
fn end_call_hangs_up_through_twilio_and_ends_the_session() {
    let twilio = TwilioRest::start();
    let bot = TwilioBot::start();
    let relay = start_relay(&twilio, &["--agent-url", &bot.url("/agent"), "--api-key", "k"]);
    let user = "ursula";
    initiate(&relay, user, NUMBER);
    let call = twilio.next_call();
    let sid = call.sid.clone();
    let events = Events::open(&relay, &sid, Some("k"));
    let front = Frontend::connect(&relay, &sid, user, "&accessToken=k");
    let (_, caller) = call.answer();
    let agent = bot.ready(0);
    let up = frames(72, 0..5);
    caller.send_audio(&up);
    assert_eq!(agent.wait_media(up.len()), up, "the call is live");

    assert_error(&relay.post("/end-call", &json!({"callSid": sid, "user_id": "mallory"})), 404);
    let unknown = "CA00000000000000000000000000000000";
    assert_error(&relay.post("/end-call", &json!({"callSid": unknown, "user_id": user})), 404);
    assert_eq!(twilio.requests().len(), 1, "refused hang-ups never reach Twilio: {:?}", twilio.requests());
    assert!(agent.sync() && caller.sync(), "the call survives others' end-call");

    let resp = relay.post("/end-call", &json!({"callSid": sid, "user_id": user}));
    assert_eq!(resp.status, 200, "end-call: {}", resp.text());
    assert_json_type(&resp);
    assert_eq!(resp.json(), json!({"success": true, "message": "Call ended successfully"}));
    let requests = twilio.requests();
    assert_eq!(requests.len(), 2, "one hang-up request: {requests:?}");
    let hang_up = &requests[1];
    let path = format!("/2010-04-01/Accounts/{ACCOUNT_SID}/Calls/{sid}.json");
    assert_eq!((hang_up.method.as_str(), hang_up.path.as_str()), ("POST", path.as_str()));
    assert_eq!(hang_up.basic_auth(), Some((ACCOUNT_SID.to_owned(), AUTH_TOKEN.to_owned())));
    assert_eq!(hang_up.header("content-type"), Some("application/x-www-form-urlencoded"));
    assert_eq!(hang_up.form, owned(&[("Status", "completed")]));

    events.wait_event("call_ended");
    agent.wait_until("stop at the bot", |r| r.iter().find(|a| a.event() == Some("stop")).map(|_| ()));
    agent.wait_closed();
    caller.wait_closed();
    front.wait_closed();
    let status = call_status(&relay, &sid, user);
    assert_eq!(status["status"], "completed", "status after end-call: {status}");
    assert!(status["endTime"].as_str().is_some_and(is_rfc3339), "endTime after end-call: {status}");
}

/// Missing or empty user_id/number → 400 with seed 004's sentence; a non-E.164 number → 400; Twilio is not called.
#[test]
fn bad_initiations_are_400() {
    let twilio = TwilioRest::start();
    let relay = start_relay(&twilio, &[]);
    for body in [
        json!({"number": NUMBER}),
        json!({"user_id": "u"}),
        json!({}),
        json!({"user_id": "", "number": NUMBER}),
        json!({"user_id": "u", "number": null}),
    ] {
        let resp = relay.post("/outbound-call", &body);
        assert_error(&resp, 400);
        assert_eq!(resp.json()["error"], "User ID and phone number are required", "for {body}");
    }
    for number in ["4155550123", "+0155550123", "+1 415 555 0123", "+12", "+1415555012345678", "tel:+14155550123"] {
        assert_error(&initiate_raw(&relay, "u", number), 400);
    }
    assert!(twilio.requests().is_empty(), "no bad request reached Twilio: {:?}", twilio.requests());
}

/// Without Twilio credentials `/outbound-call` is 503 and the error names the flags to set.
#[test]
fn no_credentials_is_503() {
    let twilio = TwilioRest::start();
    let relay = Relay::start(&["--twilio-api-base", &twilio.base_url()]);
    let resp = initiate_raw(&relay, "u", NUMBER);
    assert_error(&resp, 503);
    let error = resp.json()["error"].as_str().unwrap_or_default().to_owned();
    for flag in ["--twilio-account-sid", "--twilio-auth-token", "--twilio-from"] {
        assert!(error.contains(flag), "the 503 names {flag}: {error}");
    }
    assert!(twilio.requests().is_empty(), "nothing reached Twilio");
}

/// A user's 6th initiation within a minute is 429 with `Retry-After`; another user still dials.
#[test]
fn sixth_initiation_in_a_minute_is_429() {
    let twilio = TwilioRest::start();
    let relay = start_relay(&twilio, &[]);
    for i in 0..5 {
        let resp = initiate_raw(&relay, "rate-user", NUMBER);
        assert_eq!(resp.status, 200, "initiation {i}: {}", resp.text());
    }
    let resp = initiate_raw(&relay, "rate-user", NUMBER);
    assert_error(&resp, 429);
    let retry: u64 = resp
        .header("retry-after")
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("429 has a numeric Retry-After: {:?}", resp.headers));
    assert!((1..=60).contains(&retry), "Retry-After within the minute: {retry}");
    assert_eq!(twilio.requests().len(), 5, "the refused initiation did not reach Twilio");
    let other = initiate_raw(&relay, "another-user", NUMBER);
    assert_eq!(other.status, 200, "another user is not limited: {}", other.text());
    assert_eq!(twilio.created().len(), 6);
}

/// Twilio answering 400 (code 21211) → 502 carrying Twilio's message; no call record is left.
#[test]
fn twilio_refusal_is_502_with_its_message() {
    let twilio = TwilioRest::start();
    let relay = start_relay(&twilio, &[]);
    let refusal = invalid_number_error("+15005550001");
    twilio.refuse_calls(400, refusal.clone());
    let resp = initiate_raw(&relay, "refused-user", "+15005550001");
    assert_error(&resp, 502);
    let error = resp.json()["error"].as_str().unwrap_or_default().to_owned();
    let message = refusal["message"].as_str().expect("message");
    assert!(error.contains(message), "the 502 carries Twilio's message {message:?}: {error}");
    let requests = twilio.requests();
    assert_eq!(requests.len(), 1, "the request reached Twilio: {requests:?}");
    assert_eq!(requests[0].field("To"), Some("+15005550001"));

    twilio.accept_calls();
    assert_eq!(initiate_raw(&relay, "refused-user", NUMBER).status, 200, "dialling works again");
}

/// A Twilio answer of over 12 KiB (a padded `annotation`) over plain HTTP is read whole.
#[test]
fn large_twilio_answer_is_read_whole() {
    let twilio = TwilioRest::start();
    twilio.pad_answers(12 * 1024);
    let relay = start_relay(&twilio, &[]);
    let resp = initiate(&relay, "big-answer", NUMBER);
    assert_eq!(resp.json()["callSid"], twilio.created()[0].as_str());
}

/// An API base nobody listens on → 502, and the relay stays healthy.
#[test]
fn unreachable_twilio_is_502() {
    let closed = format!("http://{}", unused_port());
    let args = twilio_args(&closed);
    let relay = Relay::start(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_error(&initiate_raw(&relay, "u", NUMBER), 502);
    relay.health();
}

/// Signed status callbacks update the record (`ringing`, then `busy` with its duration); `/call-status` guards users.
#[test]
fn status_callbacks_update_the_record() {
    let twilio = TwilioRest::start();
    let (listen, public) = public_address();
    let relay = start_relay(&twilio, &["--listen", &listen, "--public-url", &public]);
    let user = "bea";
    initiate(&relay, user, NUMBER);
    let call = twilio.next_call();
    let url = call.param("Url").unwrap_or_default();
    assert!(url.starts_with(&format!("{public}/twilio/voice?user_id=bea&")), "callbacks use --public-url: {url}");
    assert_eq!(call.param("StatusCallback"), Some(format!("{public}/twilio/status?user_id=bea").as_str()));

    assert_eq!(call.status_callback("ringing", None).status, 200);
    assert_eq!(call_status(&relay, &call.sid, user)["status"], "ringing");
    let resp = call.status_callback("busy", Some(0));
    assert_eq!(resp.status, 200, "busy callback: {}", resp.text());
    assert_eq!(resp.json(), json!({"success": true}));
    let status = call_status(&relay, &call.sid, user);
    assert_eq!((status["status"].as_str(), status["duration"].as_u64()), (Some("busy"), Some(0)), "{status}");
    assert_eq!(status["startTime"], Value::Null, "a busy call never started: {status}");

    let forged = [("CallSid", call.sid.as_str()), ("CallStatus", "completed")];
    let resp = relay.request(
        "POST",
        "/twilio/status",
        &[("Content-Type", "application/x-www-form-urlencoded"), ("X-Twilio-Signature", "AAAA")],
        Some(&forged.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("&")),
    );
    assert_error(&resp, 403);
    assert_eq!(call_status(&relay, &call.sid, user)["status"], "busy", "a forged callback changes nothing");

    assert_error(&relay.get(&format!("/call-status?callSid={}&user_id=someone-else", call.sid)), 404);
    assert_error(&relay.get(&format!("/call-status?callSid={}", call.sid)), 400);
    assert_error(&relay.get("/call-status?callSid=CA11111111111111111111111111111111&user_id=bea"), 404);
}

/// After a restart, a late status callback makes the call's record again on its core, without the
/// user who placed it: the stored record still says whose call it is, so another user gets 404.
#[test]
fn a_record_made_again_after_a_restart_keeps_its_owner() {
    let twilio = TwilioRest::start();
    let (listen, public) = public_address();
    let dir = relay_tests::temp_dir("owner-restart");
    let dir_arg = dir.to_str().expect("utf-8 temp path").to_owned();
    let extra = ["--listen", listen.as_str(), "--public-url", public.as_str(), "--data-dir", dir_arg.as_str()];
    let mut relay = start_relay(&twilio, &extra);
    initiate(&relay, "bea", NUMBER);
    let call = twilio.next_call();
    assert_eq!(call.status_callback("ringing", None).status, 200);
    let status = relay.terminate();
    assert!(status.success(), "clean exit on SIGTERM: {status:?}");

    let relay = start_relay(&twilio, &extra);
    assert_eq!(call.status_callback("completed", Some(3)).status, 200, "a late callback after the restart");
    assert_error(&relay.get(&format!("/call-status?callSid={}&user_id=mallory", call.sid)), 404);
    let resp = relay.post("/end-call", &json!({"callSid": call.sid, "user_id": "mallory"}));
    assert_error(&resp, 404);
    assert_eq!(call_status(&relay, &call.sid, "bea")["status"], "completed", "its owner still sees it");
}

/// A free loopback port as `--listen` and the `--public-url` naming it: callbacks are signed over
/// the public URL, so it must be known before the relay starts.
fn public_address() -> (String, String) {
    let port = unused_port().port();
    (format!("127.0.0.1:{port}"), format!("http://localhost:{port}"))
}

/// `relay` started with the stand-in's Twilio flags plus `extra`.
fn start_relay(twilio: &TwilioRest, extra: &[&str]) -> Relay {
    let args = twilio.relay_args();
    let mut all: Vec<&str> = args.iter().map(String::as_str).collect();
    all.extend_from_slice(extra);
    Relay::start(&all)
}

/// `POST /outbound-call` with prompt and first message, asserted 200 JSON.
fn initiate(relay: &Relay, user: &str, number: &str) -> Response {
    let resp = initiate_raw(relay, user, number);
    assert_eq!(resp.status, 200, "outbound-call: {}", resp.text());
    assert_json_type(&resp);
    resp
}

/// `POST /outbound-call` with prompt and first message.
fn initiate_raw(relay: &Relay, user: &str, number: &str) -> Response {
    relay.post("/outbound-call", &json!({"user_id": user, "number": number, "prompt": PROMPT, "first_message": FIRST}))
}

/// `GET /call-status?callSid=&user_id=`, asserted 200 JSON.
fn call_status(relay: &Relay, sid: &str, user: &str) -> Value {
    let resp = relay.get(&format!("/call-status?callSid={sid}&user_id={user}"));
    assert_eq!(resp.status, 200, "call-status of {sid}: {}", resp.text());
    assert_json_type(&resp);
    resp.json()
}

fn calls_path() -> String {
    format!("/2010-04-01/Accounts/{ACCOUNT_SID}/Calls.json")
}

/// The form the relay must send to create a call from `user` to `number` with callbacks under
/// `base`: the webhook's query hands the call over to whichever node Twilio reaches (see
/// outbound_handover.rs), the status callback's names its owner.
fn expected_create_form(base: &str, number: &str, user: &str) -> Vec<(String, String)> {
    let text = |s: &str| relay_tests::twilio_rest::percent_encode(s);
    let voice =
        format!("{base}/twilio/voice?user_id={}&prompt={}&first_message={}", text(user), text(PROMPT), text(FIRST));
    owned(&[
        ("To", number),
        ("From", FROM_NUMBER),
        ("Url", &voice),
        ("Method", "POST"),
        ("StatusCallback", &format!("{base}/twilio/status?user_id={}", text(user))),
        ("StatusCallbackMethod", "POST"),
        ("StatusCallbackEvent", "initiated"),
        ("StatusCallbackEvent", "ringing"),
        ("StatusCallbackEvent", "answered"),
        ("StatusCallbackEvent", "completed"),
    ])
}

/// Seconds since the epoch of an RFC 3339 `YYYY-MM-DDTHH:MM:SS[.frac]Z` string.
fn rfc3339_secs(v: &Value) -> u64 {
    let s = v.as_str().filter(|s| is_rfc3339(s)).unwrap_or_else(|| panic!("an RFC 3339 time: {v}"));
    assert!(s.ends_with('Z') || s.ends_with('z'), "a UTC time: {s}");
    let n = |r: std::ops::Range<usize>| -> i64 { s[r].parse().expect("digits, checked by is_rfc3339") };
    let (y, m, d) = (n(0..4), n(5..7), n(8..10));
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + n(11..13) * 3600 + n(14..16) * 60 + n(17..19)).expect("after 1970")
}
