//! Twilio's HTTP side: the voice webhook's TwiML, status callbacks, and `X-Twilio-Signature`
//! checks on both webhooks and the Media Stream upgrade, with and without `--public-url`.
//! Signatures are computed here with Twilio's published algorithm, independently of the relay.

use relay_tests::telephony::{Peer, TwilioCaller};
use relay_tests::twilio_rest::{sign, sign_url};
use relay_tests::{assert_error, assert_json_type, Relay, Response};
use serde_json::json;

const TOKEN: &str = "twilio-test-token";

/// The signer reproduces Twilio's documented example (token 12345, its URL and parameters).
#[test]
fn signer_matches_twilios_documented_example() {
    let params = [
        ("CallSid", "CA1234567890ABCDE"),
        ("Caller", "+12349013030"),
        ("Digits", "1234"),
        ("From", "+12349013030"),
        ("To", "+18005551212"),
    ];
    assert_eq!(sign("12345", "https://mycompany.com/myapp.php?foo=1&bar=2", &params), "0/KCTR6DLpKmkAf8muzZqo1nDgQ=");
}

/// `/twilio/voice` answers `text/xml` TwiML streaming to this relay, with callSid, from and to parameters.
#[test]
fn voice_answers_connect_stream_twiml() {
    let relay = Relay::start(&[]);
    let params = call_params("CA0001");
    let resp = post_form(&relay, "/twilio/voice", &params, None, &[]);
    assert_eq!(resp.status, 200, "voice: {}", resp.text());
    assert!(resp.header("content-type").is_some_and(|c| c.starts_with("text/xml")), "content-type: {:?}", resp.headers);
    let expected = format!(
        concat!(
            r#"<?xml version="1.0" encoding="UTF-8"?><Response><Connect><Stream url="ws://{}/twilio/stream/CA0001">"#,
            r#"<Parameter name="callSid" value="CA0001"/><Parameter name="from" value="+15551230000"/>"#,
            r#"<Parameter name="to" value="+15559870000"/></Stream></Connect></Response>"#
        ),
        relay.addr()
    );
    assert_eq!(resp.text(), expected);
}

/// `X-Forwarded-Proto: https` gives a `wss://` stream URL; the `agentUrl` query becomes an escaped parameter.
#[test]
fn voice_passes_agent_url_and_honours_forwarded_proto() {
    let relay = Relay::start(&[]);
    let path = format!("/twilio/voice?agentUrl={}", encode("ws://bot.example:9000/x?a=1&b=2"));
    let resp = post_form(&relay, &path, &call_params("CA0002"), None, &[("X-Forwarded-Proto", "https")]);
    assert_eq!(resp.status, 200, "voice: {}", resp.text());
    let text = resp.text();
    assert!(text.contains(&format!(r#"<Stream url="wss://{}/twilio/stream/CA0002">"#, relay.addr())), "TwiML: {text}");
    assert!(
        text.contains(r#"<Parameter name="agentUrl" value="ws://bot.example:9000/x?a=1&amp;b=2"/>"#),
        "TwiML: {text}"
    );
}

/// A voice webhook without `CallSid` is a 400 error envelope.
#[test]
fn voice_without_call_sid_is_400() {
    let relay = Relay::start(&[]);
    let resp = post_form(&relay, "/twilio/voice", &[("From", "+15551230000"), ("To", "+15559870000")], None, &[]);
    assert_error(&resp, 400);
}

/// A status callback is answered `{"success":true}`.
#[test]
fn status_callback_answers_success() {
    let relay = Relay::start(&[]);
    let params = [("CallSid", "CA0003"), ("CallStatus", "completed"), ("CallDuration", "42")];
    let resp = post_form(&relay, "/twilio/status", &params, None, &[]);
    assert_eq!(resp.status, 200, "status: {}", resp.text());
    assert_json_type(&resp);
    assert_eq!(resp.json(), json!({"success": true}));
}

/// With an auth token, correctly signed voice and status webhooks (query included) are answered 200.
#[test]
fn signed_webhooks_are_accepted() {
    let relay = Relay::start(&["--twilio-auth-token", TOKEN]);
    let base = format!("http://{}", relay.addr());
    let params = call_params("CA0004");
    let sig = sign(TOKEN, &format!("{base}/twilio/voice"), &params);
    let resp = post_form(&relay, "/twilio/voice", &params, Some(&sig), &[]);
    assert_eq!(resp.status, 200, "signed voice: {}", resp.text());
    assert!(resp.text().contains(r#"value="CA0004""#), "TwiML: {}", resp.text());

    let path = "/twilio/voice?agentUrl=ws%3A%2F%2Fbot.example%2Fq";
    let sig = sign(TOKEN, &format!("{base}{path}"), &params);
    let resp = post_form(&relay, path, &params, Some(&sig), &[]);
    assert_eq!(resp.status, 200, "signed voice with a query: {}", resp.text());

    let status = [("CallSid", "CA0004"), ("CallStatus", "in-progress"), ("CallDuration", "3")];
    let sig = sign(TOKEN, &format!("{base}/twilio/status"), &status);
    let resp = post_form(&relay, "/twilio/status", &status, Some(&sig), &[]);
    assert_eq!(resp.status, 200, "signed status: {}", resp.text());
    assert_eq!(resp.json(), json!({"success": true}));
}

/// With an auth token, tampered, foreign, empty or missing signatures get 403 on both webhooks.
#[test]
fn bad_signatures_are_403() {
    let relay = Relay::start(&["--twilio-auth-token", TOKEN]);
    let base = format!("http://{}", relay.addr());
    for path in ["/twilio/voice", "/twilio/status"] {
        let params = [("CallSid", "CA0005"), ("CallStatus", "ringing"), ("From", "+15551230000")];
        let good = sign(TOKEN, &format!("{base}{path}"), &params);
        let tampered = [("CallSid", "CA0005"), ("CallStatus", "ringing"), ("From", "+15551239999")];
        assert_error(&post_form(&relay, path, &tampered, Some(&good), &[]), 403);
        let other_token = sign("another-token", &format!("{base}{path}"), &params);
        assert_error(&post_form(&relay, path, &params, Some(&other_token), &[]), 403);
        let other_url = sign(TOKEN, &format!("{base}/elsewhere"), &params);
        assert_error(&post_form(&relay, path, &params, Some(&other_url), &[]), 403);
        let extra = [("CallSid", "CA0005"), ("CallStatus", "ringing"), ("From", "+15551230000"), ("X", "1")];
        assert_error(&post_form(&relay, path, &extra, Some(&good), &[]), 403);
        assert_error(&post_form(&relay, path, &params, None, &[]), 403);
        assert_error(&post_form(&relay, path, &params, Some(""), &[]), 403);
        // The untampered request passes, so the refusals above were about the signature.
        assert_eq!(post_form(&relay, path, &params, Some(&good), &[]).status, 200, "{path} signed correctly");
    }
}

/// With an auth token, the stream upgrade signed over its `ws://` URL gets 101; unsigned or wrong gets 403.
#[test]
fn stream_upgrade_needs_a_signature() {
    let relay = Relay::start(&["--twilio-auth-token", TOKEN]);
    let url = format!("ws://{}/twilio/stream", relay.addr());
    let sig = sign_url(TOKEN, &url);
    let peer = Peer::connect(relay.addr(), "/twilio/stream", &[("X-Twilio-Signature", &sig)]);
    assert!(peer.is_ok(), "signed upgrade refused with {:?}", peer.err());
    assert_eq!(Peer::connect(relay.addr(), "/twilio/stream", &[]).err(), Some(403), "unsigned upgrade");
    let wrong = sign_url("another-token", &url);
    assert_eq!(
        Peer::connect(relay.addr(), "/twilio/stream", &[("X-Twilio-Signature", &wrong)]).err(),
        Some(403),
        "wrongly signed upgrade"
    );
    let http_sig = sign_url(TOKEN, &format!("ws://{}/twilio/other", relay.addr()));
    assert_eq!(
        Peer::connect(relay.addr(), "/twilio/stream", &[("X-Twilio-Signature", &http_sig)]).err(),
        Some(403),
        "a signature over another path"
    );
}

/// An https `--public-url` gives `wss://` TwiML, and signatures over the public URL (±:443) verify.
#[test]
fn https_public_url_is_used_for_twiml_and_signatures() {
    let relay = Relay::start(&["--twilio-auth-token", TOKEN, "--public-url", "https://relay.example.com"]);
    let params = call_params("CA0006");
    let sig = sign(TOKEN, "https://relay.example.com/twilio/voice", &params);
    let resp = post_form(&relay, "/twilio/voice", &params, Some(&sig), &[]);
    assert_eq!(resp.status, 200, "voice signed over the public URL: {}", resp.text());
    assert!(
        resp.text().contains(r#"<Stream url="wss://relay.example.com/twilio/stream/CA0006">"#),
        "TwiML: {}",
        resp.text()
    );
    let sig = sign(TOKEN, "https://relay.example.com:443/twilio/voice", &params);
    assert_eq!(post_form(&relay, "/twilio/voice", &params, Some(&sig), &[]).status, 200, "with :443");
    let sig = sign(TOKEN, "https://relay.example.org/twilio/voice", &params);
    assert_error(&post_form(&relay, "/twilio/voice", &params, Some(&sig), &[]), 403);

    let sig = sign_url(TOKEN, "wss://relay.example.com/twilio/stream/CA0006");
    let peer = Peer::connect(relay.addr(), "/twilio/stream/CA0006", &[("X-Twilio-Signature", &sig)]);
    assert!(peer.is_ok(), "upgrade signed over the public wss URL refused with {:?}", peer.err());
}

/// An http `--public-url` with a port gives `ws://host:port` TwiML, and signatures over it verify.
#[test]
fn http_public_url_is_used_for_twiml_and_signatures() {
    let relay = Relay::start(&["--twilio-auth-token", TOKEN, "--public-url", "http://relay.example:8080/"]);
    let params = call_params("CA0007");
    let sig = sign(TOKEN, "http://relay.example:8080/twilio/voice", &params);
    let resp = post_form(&relay, "/twilio/voice", &params, Some(&sig), &[]);
    assert_eq!(resp.status, 200, "voice signed over the public URL: {}", resp.text());
    assert!(
        resp.text().contains(r#"<Stream url="ws://relay.example:8080/twilio/stream/CA0007">"#),
        "TwiML: {}",
        resp.text()
    );
    let sig = sign_url(TOKEN, "ws://relay.example:8080/twilio/stream/CA0007");
    let peer = Peer::connect(relay.addr(), "/twilio/stream/CA0007", &[("X-Twilio-Signature", &sig)]);
    assert!(peer.is_ok(), "upgrade signed over the public ws URL refused with {:?}", peer.err());
}

/// The parameters of an incoming-call webhook.
fn call_params(call_sid: &str) -> Vec<(&str, &str)> {
    vec![
        ("AccountSid", "AC0123456789abcdef0123456789abcdef"),
        ("CallSid", call_sid),
        ("CallStatus", "ringing"),
        ("Direction", "inbound"),
        ("From", "+15551230000"),
        ("To", "+15559870000"),
    ]
}

/// `POST path` with a form body, `X-Twilio-Signature` when given, and `headers`.
fn post_form(
    relay: &Relay,
    path: &str,
    params: &[(&str, &str)],
    signature: Option<&str>,
    headers: &[(&str, &str)],
) -> Response {
    let body = params.iter().map(|(k, v)| format!("{}={}", encode(k), encode(v))).collect::<Vec<_>>().join("&");
    let mut all = vec![("Content-Type", "application/x-www-form-urlencoded")];
    if let Some(sig) = signature {
        all.push(("X-Twilio-Signature", sig));
    }
    all.extend_from_slice(headers);
    relay.request("POST", path, &all, Some(&body))
}

/// Percent-encodes everything but unreserved characters.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => char::from(b).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// With an API key but no Twilio auth token, Twilio's endpoints are not open to anyone: they need
/// the API key like every control endpoint (a stream could otherwise create sessions and dial bots).
#[test]
fn api_key_guards_twilio_endpoints_without_a_twilio_token() {
    let relay = Relay::start(&["--api-key", "k"]);
    let form = [("Content-Type", "application/x-www-form-urlencoded")];
    let voice = relay.request("POST", "/twilio/voice", &form, Some("CallSid=CA1"));
    assert_error(&voice, 401);
    let status = relay.request("POST", "/twilio/status", &form, Some("CallSid=CA1&CallStatus=completed"));
    assert_error(&status, 401);
    assert!(matches!(Peer::connect(relay.addr(), "/twilio/stream", &[]), Err(401)), "anonymous streams are refused");
    let authorized = [("Content-Type", "application/x-www-form-urlencoded"), ("Authorization", "Bearer k")];
    assert_eq!(relay.request("POST", "/twilio/voice", &authorized, Some("CallSid=CA1")).status, 200);
    assert!(Peer::connect(relay.addr(), "/twilio/stream", &[("Authorization", "Bearer k")]).is_ok());
}

/// Status callbacks must carry one of Twilio's call statuses.
#[test]
fn status_callbacks_need_a_known_status() {
    let relay = Relay::start(&[]);
    let form = [("Content-Type", "application/x-www-form-urlencoded")];
    let bad =
        relay.request("POST", "/twilio/status", &form, Some(&format!("CallSid=CA1&CallStatus={}", "x".repeat(60_000))));
    assert_error(&bad, 400);
    assert_eq!(relay.request("POST", "/twilio/status", &form, Some("CallSid=CA1&CallStatus=busy")).status, 200);
}

/// With a Twilio token, a stream is accepted only if its `start` carries the `relaySig` the
/// relay's TwiML handed out for that very call: a replayed upgrade signature cannot forge calls.
#[test]
fn streams_must_carry_the_twiml_call_signature() {
    let relay = Relay::start(&["--twilio-auth-token", TOKEN]);
    let base = format!("http://{}", relay.addr());
    let params = call_params("CA0009");
    let sig = sign(TOKEN, &format!("{base}/twilio/voice"), &params);
    let twiml = post_form(&relay, "/twilio/voice", &params, Some(&sig), &[]).text();
    let relay_sig = twiml
        .split(r#"<Parameter name="relaySig" value=""#)
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("the TwiML carries relaySig")
        .to_owned();
    let url = format!("ws://{}/twilio/stream", relay.addr());
    let upgrade = sign_url(TOKEN, &url);
    let open =
        || Peer::connect(relay.addr(), "/twilio/stream", &[("X-Twilio-Signature", &upgrade)]).expect("signed upgrade");

    let forged = TwilioCaller::greet(open(), "CA0666", &[("callSid", "CA0666")]);
    assert_eq!(forged.peer().wait_closed(), Some(Some(1008)), "no relaySig");
    let borrowed = TwilioCaller::greet(open(), "CA0666", &[("callSid", "CA0666"), ("relaySig", &relay_sig)]);
    assert_eq!(borrowed.peer().wait_closed(), Some(Some(1008)), "another call's relaySig");

    let _real = TwilioCaller::greet(open(), "CA0009", &[("callSid", "CA0009"), ("relaySig", &relay_sig)]);
    relay_tests::poll_until("the real stream to connect", || {
        let r = relay.get("/call-status?sessionId=CA0009");
        (r.status == 200 && r.json()["data"]["isConnected"] == true).then_some(())
    });
    assert_eq!(relay.get("/call-status?sessionId=CA0666").status, 404, "the forged call never existed");
}
