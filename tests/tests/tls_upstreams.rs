//! Outbound TLS from the relay: Twilio's REST API at an `https://` base and `wss://` agents, each
//! served with a self-signed certificate the relay trusts only through `--upstream-ca-file` or the
//! system's trust store — with it calls go through, without it the certificate is refused
//! (verification is on).

use std::net::SocketAddr;

use relay_tests::telephony::{frames, Events, Frontend, TwilioBot, TwilioCaller};
use relay_tests::twilio_rest::tls::{TestCert, TlsFront};
use relay_tests::twilio_rest::{owned, TwilioRest, ACCOUNT_SID, AUTH_TOKEN, FROM_NUMBER};
use relay_tests::{assert_error, poll_until, temp_dir, Relay, Response};
use serde_json::{json, Value};

const NUMBER: &str = "+14155550199";

/// With `--upstream-ca-file`, initiation and hang-up reach an `https://` API base over TLS.
#[test]
fn https_api_base_trusted_through_ca_file() {
    let twilio = TwilioRest::start_tls();
    let ca = twilio.ca_file().expect("a TLS stand-in has a CA file").display().to_string();
    let relay = start_relay(&twilio, &["--upstream-ca-file", &ca]);
    let resp = initiate(&relay, "tls-user");
    assert_eq!(resp.status, 200, "outbound-call over https: {}", resp.text());
    let sid = resp.json()["callSid"].as_str().unwrap_or_default().to_owned();
    assert_eq!(twilio.created(), std::slice::from_ref(&sid), "the call the stand-in created is the one answered");
    let requests = twilio.requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    let create = &requests[0];
    assert!(create.tls, "the request came over TLS");
    assert_eq!(create.path, format!("/2010-04-01/Accounts/{ACCOUNT_SID}/Calls.json"));
    assert_eq!(create.basic_auth(), Some((ACCOUNT_SID.to_owned(), AUTH_TOKEN.to_owned())));
    assert_eq!(create.field("To"), Some(NUMBER));
    assert_eq!(create.field("From"), Some(FROM_NUMBER));
    assert!(twilio.tls_handshakes() >= 1 && twilio.tls_failures() == 0, "the handshake verified");

    let resp = relay.post("/end-call", &json!({"callSid": sid, "user_id": "tls-user"}));
    assert_eq!(resp.status, 200, "end-call over https: {}", resp.text());
    let requests = twilio.requests();
    assert_eq!(requests.len(), 2, "{requests:?}");
    assert!(requests[1].tls, "the hang-up came over TLS");
    assert_eq!(requests[1].path, format!("/2010-04-01/Accounts/{ACCOUNT_SID}/Calls/{sid}.json"));
    assert_eq!(requests[1].form, owned(&[("Status", "completed")]));
}

/// The system's trust store is what outbound TLS verifies against: a certificate the store holds
/// (here through `SSL_CERT_FILE`, which the system-store loader honours) is trusted with no
/// `--upstream-ca-file`.
#[test]
fn https_api_base_trusted_through_the_system_store() {
    let twilio = TwilioRest::start_tls();
    let ca = twilio.ca_file().expect("a TLS stand-in has a CA file").display().to_string();
    let args = twilio.relay_args();
    let all: Vec<&str> = args.iter().map(String::as_str).collect();
    let relay = Relay::start_with_env(&all, &[("SSL_CERT_FILE", &ca)]);
    let resp = initiate(&relay, "system-store");
    assert_eq!(resp.status, 200, "outbound-call over https: {}", resp.text());
    assert!(twilio.tls_handshakes() >= 1 && twilio.tls_failures() == 0, "the handshake verified");
}

/// Without `--upstream-ca-file` the self-signed API base is refused: 502, a failed handshake, no request.
#[test]
fn https_api_base_untrusted_is_502() {
    let twilio = TwilioRest::start_tls();
    let relay = start_relay(&twilio, &[]);
    let resp = initiate(&relay, "tls-user");
    assert_error(&resp, 502);
    let error = resp.json()["error"].as_str().unwrap_or_default().to_ascii_lowercase();
    assert!(error.contains("certificate"), "the 502 says the certificate was refused: {error}");
    twilio.wait_tls_failures(1);
    assert!(twilio.requests().is_empty(), "no request crossed an unverified connection: {:?}", twilio.requests());
    assert!(twilio.created().is_empty());
}

/// A Twilio answer larger than one 4 KiB TLS read (a padded `annotation`) is read whole over https.
#[test]
fn large_answer_over_https_is_read_whole() {
    let twilio = TwilioRest::start_tls();
    twilio.pad_answers(12 * 1024);
    let ca = twilio.ca_file().expect("a TLS stand-in has a CA file").display().to_string();
    let relay = start_relay(&twilio, &["--upstream-ca-file", &ca]);
    let resp = initiate(&relay, "big-answer");
    assert_eq!(resp.status, 200, "outbound-call with a 12 KiB answer over https: {}", resp.text());
    assert_eq!(resp.json()["callSid"], twilio.created()[0].as_str());
}

/// A server certificate of several KiB (handshake flight past one 4 KiB read) verifies through `--upstream-ca-file`.
#[test]
fn large_certificate_over_https_verifies() {
    let cert = TestCert::localhost_padded(200);
    assert!(cert.der().len() > 6 * 1024, "the padded certificate is {} bytes", cert.der().len());
    let twilio = TwilioRest::start_tls_with(cert);
    let ca = twilio.ca_file().expect("a TLS stand-in has a CA file").display().to_string();
    let relay = start_relay(&twilio, &["--upstream-ca-file", &ca]);
    let resp = initiate(&relay, "big-cert");
    assert_eq!(resp.status, 200, "outbound-call to a server with a large certificate: {}", resp.text());
    assert_eq!(twilio.tls_failures(), 0, "the handshake completed");
}

/// A `wss://localhost` bot trusted through `--upstream-ca-file` gets the caller's audio, and the caller hears it.
#[test]
fn wss_agent_trusted_through_ca_file() {
    let bot = TwilioBot::start();
    let front = TlsFront::start(bot_addr(&bot));
    let ca = front.ca_file().display().to_string();
    // No reachability checks: the front counts every connection it sees.
    let relay = Relay::start(&[
        "--agent-url",
        &front.url("/wss-bot?x=1"),
        "--upstream-ca-file",
        &ca,
        "--upstream-check-interval",
        "0s",
    ]);
    let caller = TwilioCaller::start(&relay, "CA-wss", &[("lang", "en")]);
    let agent = bot.ready(0);
    assert_eq!(agent.path, "/wss-bot?x=1", "the relay asks for the URL's path over TLS");
    let up = frames(80, 0..50);
    let down = frames(81, 0..50);
    caller.send_audio(&up);
    agent.send_audio(&down);
    assert_eq!(agent.wait_media(up.len()), up, "the caller's audio at the wss bot, byte for byte");
    let heard: Vec<Vec<u8>> = caller.wait_media(down.len()).into_iter().map(|(_, f)| f).collect();
    assert_eq!(heard, down, "the wss bot's audio at the caller, byte for byte");
    let start = agent.start_msg();
    assert_eq!(start["start"]["customParameters"], json!({"callSid": "CA-wss", "lang": "en"}), "start: {start}");
    assert_eq!((front.handshakes(), front.failures()), (1, 0), "one verified TLS connection");
}

/// Without the CA file a `wss://` bot's certificate is refused: `/ws` gets an `error`, the call goes on without it.
#[test]
fn wss_agent_untrusted_call_goes_on() {
    let bot = TwilioBot::start();
    let front = TlsFront::start(bot_addr(&bot));
    let relay =
        Relay::start(&["--agent-url", &front.url("/wss-bot"), "--api-key", "k", "--upstream-check-interval", "0s"]);
    let id = "CA-wss-untrusted";
    let events = Events::open(&relay, id, Some("k"));
    let listener = Frontend::connect(&relay, id, "u", "&accessToken=k");
    let caller = TwilioCaller::start(&relay, id, &[]);
    let error = events.wait_event("error");
    let message = error["message"].as_str().unwrap_or_default().to_ascii_lowercase();
    assert!(message.contains("agent"), "the error names the agent: {error}");
    poll_until("the relay's TLS handshake to fail at the bot", || (front.failures() >= 1).then_some(()));
    let sent = frames(82, 0..25);
    caller.send_audio(&sent);
    assert_eq!(listener.wait_audio("inbound", sent.len()), sent, "caller audio still reaches the frontend");
    assert!(!caller.ended(), "the caller's stream is still open");
    assert_eq!((front.handshakes(), bot.connections()), (0, 0), "nothing reached the bot");
    assert!(events.events().iter().all(|(t, _)| t != "call_ended"), "the call did not end");
}

/// An outbound call over an https API base to a wss bot, both CAs in one `--upstream-ca-file`, end to end.
#[test]
fn outbound_call_over_tls_to_a_wss_bot() {
    let twilio = TwilioRest::start_tls();
    let bot = TwilioBot::start();
    let front = TlsFront::start(bot_addr(&bot));
    let dir = temp_dir("cas");
    let bundle = dir.join("bundle.pem");
    let pems: Vec<String> = [twilio.ca_file().expect("CA file"), front.ca_file()]
        .iter()
        .map(|p| std::fs::read_to_string(p).expect("read a PEM"))
        .collect();
    std::fs::write(&bundle, pems.concat()).expect("write the CA bundle");
    let bundle_arg = bundle.display().to_string();
    let relay = start_relay(&twilio, &["--agent-url", &front.url("/bot"), "--upstream-ca-file", &bundle_arg]);

    let resp = initiate(&relay, "tls-e2e");
    assert_eq!(resp.status, 200, "outbound-call: {}", resp.text());
    let call = twilio.next_call();
    assert_eq!(resp.json()["callSid"], call.sid.as_str());
    let (twiml, caller) = call.answer();
    assert_eq!(twiml.parameter("prompt"), Some("Speak softly."));
    let agent = bot.ready(0);
    let custom = &agent.start_msg()["start"]["customParameters"];
    assert_eq!(
        (&custom["prompt"], &custom["first_message"], &custom["user_id"]),
        (&Value::from("Speak softly."), &Value::from("Hi there"), &Value::from("tls-e2e")),
        "the wss bot's customParameters: {custom}"
    );
    let up = frames(83, 0..20);
    let down = frames(84, 0..20);
    caller.send_audio(&up);
    agent.send_audio(&down);
    assert_eq!(agent.wait_media(up.len()), up);
    let heard: Vec<Vec<u8>> = caller.wait_media(down.len()).into_iter().map(|(_, f)| f).collect();
    assert_eq!(heard, down);
    call.hang_up(&caller, 3);
    let status = relay.get(&format!("/call-status?callSid={}&user_id=tls-e2e", call.sid)).json();
    assert_eq!((status["status"].as_str(), status["duration"].as_u64()), (Some("completed"), Some(3)), "{status}");
    let _ = std::fs::remove_dir_all(dir);
}

/// `relay` started with the stand-in's Twilio flags plus `extra`.
fn start_relay(twilio: &TwilioRest, extra: &[&str]) -> Relay {
    let args = twilio.relay_args();
    let mut all: Vec<&str> = args.iter().map(String::as_str).collect();
    all.extend_from_slice(extra);
    Relay::start(&all)
}

/// `POST /outbound-call` for `user` to [`NUMBER`].
fn initiate(relay: &Relay, user: &str) -> Response {
    relay.post(
        "/outbound-call",
        &json!({"user_id": user, "number": NUMBER, "prompt": "Speak softly.", "first_message": "Hi there"}),
    )
}

/// The plain address the bot listens on.
fn bot_addr(bot: &TwilioBot) -> SocketAddr {
    bot.authority().parse().expect("the bot's authority is an address")
}
