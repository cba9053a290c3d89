//! `GET /console`: the operator's page is public (it holds no data), self-contained (nothing
//! loaded from elsewhere, a strict CSP), and drives the API with the key typed into it; in
//! headless Chromium it lists a real Twilio call with moving counters, listens to it (WHEP, level
//! measured by the page), talks into it (WHIP `role=agent`, heard by the caller) and stops it.

use std::time::Duration;

use relay_tests::browser::{self, DevTools};
use relay_tests::telephony::{ulaw, TwilioCaller};
use relay_tests::{poll_until, Relay};

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
    let tone: Vec<u8> = (0..8000 * 40)
        .map(|i| ulaw(((i as f32 * 1000.0 / 8000.0 * std::f32::consts::TAU).sin() * 6000.0) as i16))
        .collect();
    caller.send_audio(&tone.chunks(160).map(<[u8]>::to_vec).collect::<Vec<_>>());

    // Two more calls, so the table has something to sort and filter (and the screenshot shows it).
    let second = TwilioCaller::start(&relay, "CA-second", &[]);
    second.send_audio(&tone.chunks(160).take(500).map(<[u8]>::to_vec).collect::<Vec<_>>());
    assert_eq!(relay.start_call("web-waiting", "tok").status, 200);

    let url = format!("http://{}/console", relay.addr());
    let mut page = DevTools::open(&url, 1400, 1250).expect("chromium opens the console");
    let wait =
        |page: &mut DevTools, what: &str, js: &str| page.wait_for(what, js, Duration::from_secs(15)).expect(what);
    // Without the key the page says so; with it, the call shows up.
    wait(&mut page, "the 401 notice", "document.getElementById('calls-error').textContent.includes('401') || null");
    page.eval("document.getElementById('key').value = 'k'; document.querySelector('#key-form button[type=submit]').click(); true")
        .expect("type the key");
    let row = format!("document.querySelector('tr[data-id=\"{id}\"]')");
    let counts = |page: &mut DevTools| -> u64 {
        let text = page.eval(&format!("{row}.querySelector('.caller-counts').textContent")).expect("counts");
        text.as_str().and_then(|t| t.split('/').next()).and_then(|n| n.parse().ok()).expect("framesIn")
    };
    wait(&mut page, "the call in the table", &format!("!!{row} || null"));
    assert_eq!(page.eval("sessionStorage.getItem('relay.apiKey')").expect("eval"), "k", "the key is kept for the tab");
    assert_eq!(page.eval("document.getElementById('key').value").expect("eval"), "", "the key is not shown");
    let cells = page.eval(&format!("[...{row}.cells].map((c) => c.textContent)")).expect("cells");
    assert_eq!(cells[1], "twilio", "{cells}");
    assert_eq!(cells[3], format!("console-node / {}", relay_tests::owner(id, relay.cores())), "{cells}");
    let first = counts(&mut page);
    wait(
        &mut page,
        "the counters to move",
        &format!("(Number({row}.querySelector('.caller-counts').textContent.split('/')[0]) > {first}) || null"),
    );

    // One call's view: Listen hears the caller's tone.
    page.eval(&format!("{row}.querySelector('button').click(); true")).expect("open the call");
    wait(
        &mut page,
        "the events socket",
        "document.getElementById('call-state').textContent.includes('events connected') || null",
    );
    page.eval("document.getElementById('listen').click(); true").expect("listen");
    let peak = wait(
        &mut page,
        "the level meter to measure the call",
        "(Number(document.getElementById('listen-level').dataset.peak) > 0.02) && document.getElementById('listen-level').dataset.peak",
    );
    let peak: f64 = peak.as_str().and_then(|p| p.parse().ok()).expect("a level");
    assert!(peak > 0.02, "the page measured the caller's tone: {peak}");

    // Talk: the browser's fake microphone reaches the Twilio caller.
    let heard_before = caller.heard_pcm().len();
    page.eval("document.getElementById('talk').click(); true").expect("talk");
    wait(
        &mut page,
        "the talk leg to connect",
        "document.getElementById('media-state').textContent === 'talk: connected' || null",
    );
    poll_until("the caller to hear the browser", || {
        let heard = caller.heard_pcm();
        let loud = heard.get(heard_before..).unwrap_or_default().iter().filter(|s| s.unsigned_abs() > 2000).count();
        (loud > 400).then_some(())
    });
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
    page.eval("document.querySelector('[data-act=\"stop-call\"]').click(); true").expect("stop");
    let status = wait(&mut page, "the call record", "document.getElementById('record').dataset.status || null");
    assert!(status.as_str().is_some_and(|s| !s.is_empty()), "{status}");
    assert!(caller.wait_closed().is_some(), "the caller's stream is closed");
    wait(&mut page, "the call to leave the table", &format!("!{row} || null"));
    let errors: Vec<String> = page.console().into_iter().filter(|l| l.contains("Uncaught")).collect();
    assert!(errors.is_empty(), "no script errors: {errors:?}");
}
