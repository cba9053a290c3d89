//! `GET /console`: the operator's page is public (it holds no data), self-contained (nothing
//! loaded from elsewhere, a strict CSP), and drives the API with the key typed into it; in
//! headless Chromium it lists a real Twilio call with moving counters, listens to it (WHEP, level
//! measured by the page), talks into it (WHIP `role=agent`, heard by the caller) and stops it.

use std::time::Duration;

use relay_tests::browser::{self, DevTools};
use relay_tests::console_page::{caller_tone, list_listen_talk, stop_shows_the_record};
use relay_tests::telephony::TwilioCaller;
use relay_tests::Relay;

/// The bound on each wait for the page.
const LIMIT: Duration = Duration::from_secs(15);

/// The page loads without the API key on a keyed relay, as HTML with a strict CSP, references no
/// other origin, and its API calls (`/calls`) still need the key.
#[test]
fn console_is_public_and_self_contained() {
    let relay = Relay::start(&["--api-key", "k"]);
    let page = relay.request("GET", "/console", &[], None);
    assert_eq!(page.status, 200, "{}", page.text());
    assert_eq!(page.header("content-type"), Some("text/html; charset=utf-8"));
    let csp = page.header("content-security-policy").expect("a Content-Security-Policy");
    assert!(csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"), "{csp}");
    let html = page.text();
    assert!(html.starts_with("<!doctype html>"));
    for external in ["http://", "https://", "<script src", "<link"] {
        assert!(!html.contains(external), "the page references {external}");
    }
    for needed in ["/calls", "sessionStorage", "/whep/", "?role=agent", "/health/detailed", "/metrics", "/start-call"] {
        assert!(html.contains(needed), "the page uses {needed}");
    }
    assert_eq!(relay.request("GET", "/calls", &[], None).status, 401, "the data behind it needs the key");
    assert_eq!(relay.request("HEAD", "/console", &[], None).status, 200);
}

/// In headless Chromium, with the API key typed into the page: a real Twilio call appears in the
/// table within a second, its counters move, Listen plays the caller's tone (the page's level
/// meter measures it), Talk reaches the caller (the browser's fake microphone, loud in the caller's
/// decoded audio), and Stop ends the call and shows its record.
#[test]
fn console_drives_a_real_call() {
    assert!(browser::chromium_path().is_some(), "Chromium is missing: scripts/test installs it (scripts/deps-browser)");
    let relay = Relay::start(&["--api-key", "k", "--node-id", "console-node"]);
    let id = "CA-console";
    let caller = TwilioCaller::start(&relay, id, &[]);
    // The caller talks (a 1 kHz tone) all through the test.
    let tone = caller_tone();
    caller.send_audio(&tone);

    // Two more calls, so the table has something to sort and filter (and the screenshot shows it).
    let second = TwilioCaller::start(&relay, "CA-second", &[]);
    second.send_audio(&tone[..500]);
    assert_eq!(relay.start_call("web-waiting", "tok").status, 200);

    let url = format!("http://{}/console", relay.addr());
    let mut page = DevTools::open(&url, 1400, 1250).expect("chromium opens the console");
    list_listen_talk(&mut page, &relay, &caller, id, LIMIT);
    if let Some(dir) = std::env::var_os("RELAY_CONSOLE_SCREENSHOTS") {
        let png = page.screenshot().expect("screenshot");
        std::fs::write(std::path::Path::new(&dir).join("console.png"), png).expect("write the screenshot");
        // And as a phone shows it (390 CSS pixels wide).
        let phone = serde_json::json!({ "width": 390, "height": 1600, "deviceScaleFactor": 1, "mobile": true });
        page.call("Emulation.setDeviceMetricsOverride", phone).expect("phone metrics");
        // Two animation frames: the page is laid out and painted at the new width.
        page.eval("new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(() => r(true))))")
            .expect("a frame");
        let png = page.screenshot().expect("screenshot");
        std::fs::write(std::path::Path::new(&dir).join("console-phone.png"), png).expect("write the screenshot");
        page.call("Emulation.clearDeviceMetricsOverride", serde_json::json!({})).expect("metrics back");
    }

    // Stop ends the call; its record appears.
    stop_shows_the_record(&mut page, &caller, id, LIMIT);
    let errors: Vec<String> = page.console().into_iter().filter(|l| l.contains("Uncaught")).collect();
    assert!(errors.is_empty(), "no script errors: {errors:?}");
}
