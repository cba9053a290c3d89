//! End to end with a real browser: headless Chromium (installed by `scripts/deps-browser`, which
//! the test command runs) publishes its fake microphone over WHIP and plays the session over WHEP;
//! the page measures the audio energy that arrives. And the seeds' own web client drives a call.

use std::time::Duration;

use relay_tests::browser;
use relay_tests::telephony::{unb64, TwilioCaller};
use relay_tests::Relay;

fn chromium() {
    assert!(browser::chromium_path().is_some(), "Chromium is missing: scripts/test installs it (scripts/deps-browser)");
}

/// The measuring page works at all: two peer connections inside the page hear the fake microphone.
#[test]
fn page_hears_its_own_loopback() {
    chromium();
    let r = browser::run_page("mode=loopback&loopbackOnly=1", Duration::from_secs(30)).expect("page result");
    assert_eq!(r["error"], serde_json::Value::Null, "{r:#}");
    assert!(r["rmsMax"].as_f64().unwrap_or(0.0) > 0.1, "{r:#}");
}

/// Chromium joins a call as the agent over WHIP and listens over WHEP: the Twilio caller hears the
/// browser's microphone, and the browser hears the call's mix.
#[test]
fn chromium_publishes_over_whip_and_plays_over_whep() {
    chromium();
    let relay = Relay::start(&[]);
    let id = "browser-call";
    assert_eq!(relay.start_call(id, "tok").status, 200);
    let caller = TwilioCaller::start(&relay, id, &[]);
    // The caller talks (a 1 kHz tone) all through the page's measurement.
    let tone: Vec<u8> = (0..8000 * 8)
        .map(|i| {
            let s = ((i as f32 * 1000.0 / 8000.0 * std::f32::consts::TAU).sin() * 6000.0) as i16;
            relay_tests::telephony::ulaw(s)
        })
        .collect();
    caller.send_audio(&tone.chunks(160).map(<[u8]>::to_vec).collect::<Vec<_>>());
    let query = format!("mode=both&role=agent&relay=http://{}&session={id}&token=tok", relay.addr());
    let r = browser::run_page(&query, Duration::from_secs(40)).expect("page result");
    assert_eq!(r["error"], serde_json::Value::Null, "{r:#}");
    assert_eq!(r["whipStatus"], 201, "{r:#}");
    assert_eq!(r["whepStatus"], 201, "{r:#}");
    assert!(r["rmsMax"].as_f64().unwrap_or(0.0) > 0.05, "the browser hears the call: {r:#}");
    assert!(r["framesWithEnergy"].as_u64().unwrap_or(0) > 20, "energy keeps arriving: {r:#}");
    let heard: Vec<u8> = caller
        .events_named("media")
        .iter()
        .filter_map(|(_, m)| m["media"]["payload"].as_str().map(unb64))
        .flatten()
        .collect();
    let loud = heard.iter().filter(|&&c| relay_tests::telephony::unulaw(c).unsigned_abs() > 2000).count();
    assert!(loud > 400, "the caller hears the browser's microphone ({loud} loud samples of {})", heard.len());
}

/// Seed 000's own web page, served from another origin with no token anywhere, drives a call on a
/// default relay: its `/ws` socket opens (a browser WebSocket cannot send headers), its
/// cross-origin `fetch`es pass CORS, and the events of its start, mute and unmute reach the page.
#[test]
fn seed_web_client_drives_a_call_on_a_default_relay() {
    chromium();
    let relay = Relay::start(&[]);
    let query = format!("relay={}", relay.addr());
    let r = browser::run_named_page("seed.html", &query, Duration::from_secs(30)).expect("page result");
    assert_eq!(r["error"], serde_json::Value::Null, "{r:#}");
    let events = r["events"].as_str().unwrap_or_default();
    assert!(events.contains("connection_established"), "{r:#}");
    assert!(events.contains(r#""microphoneEnabled":false"#), "{r:#}");
    assert!(events.contains(r#""microphoneEnabled":true"#), "{r:#}");
    let status = r["status"].as_str().unwrap_or_default();
    assert!(status.contains("Call stopped successfully"), "{r:#}");
    let id = r["sessionId"].as_str().expect("the page's session id");
    assert!(id.starts_with("web-session-"), "{r:#}");
    assert_eq!(relay.get(&format!("/call-status?sessionId={id}")).status, 404, "the call ended");
}
