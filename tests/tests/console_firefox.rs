//! `GET /console` in headless Firefox (driven over WebDriver BiDi, tests/src/firefox.rs): the same
//! flow as the Chromium test in console.rs — a real Twilio call listed with moving counters,
//! Listen (WHEP, level measured by the page), Talk (WHIP `role=agent` from Firefox's fake
//! microphone, heard by the caller), Stop and the call's record — with no script error.

use std::time::Duration;

use relay_tests::firefox::{self, Firefox};
use relay_tests::telephony::{ulaw, TwilioCaller};
use relay_tests::{poll_until, Relay};

/// In headless Firefox, with the API key typed into the page: a real Twilio call appears in the
/// table, its counters move, Listen plays the caller's tone (the page's level meter measures it),
/// Talk reaches the caller (Firefox's fake microphone tone, loud in the caller's decoded audio),
/// Stop ends the call and shows its record, and the page logs no error on the way.
#[test]
fn console_drives_a_real_call_in_firefox() {
    assert!(firefox::firefox_path().is_some(), "Firefox is missing: scripts/test installs it (scripts/deps-browser)");
    // Firefox gathers no loopback ICE candidates, `media.peerconnection.ice.loopback` or not (seen
    // with 153 ESR): the relay listens on every interface, so that its WebRTC candidate is the
    // default route's address, which Firefox does gather. (The key makes that allowed.)
    let relay = Relay::start(&["--listen", "0.0.0.0:0", "--api-key", "k", "--node-id", "console-node"]);
    let id = "CA-console-firefox";
    let caller = TwilioCaller::start(&relay, id, &[]);
    // The caller talks (a 1 kHz tone) all through the test.
    let tone: Vec<u8> = (0..8000 * 40)
        .map(|i| ulaw(((i as f32 * 1000.0 / 8000.0 * std::f32::consts::TAU).sin() * 6000.0) as i16))
        .collect();
    caller.send_audio(&tone.chunks(160).map(<[u8]>::to_vec).collect::<Vec<_>>());

    let url = format!("http://{}/console", relay.addr());
    let mut page = Firefox::open(&url).expect("firefox opens the console");
    let wait = |page: &mut Firefox, what: &str, js: &str| page.wait_for(what, js, Duration::from_secs(20)).expect(what);
    // Without the key the page says so; with it, the call shows up.
    wait(&mut page, "the 401 notice", "document.getElementById('calls-error').textContent.includes('401') || null");
    page.eval("document.getElementById('key').value = 'k'; document.querySelector('#key-form button[type=submit]').click(); true")
        .expect("type the key");
    let row = format!("document.querySelector('tr[data-id=\"{id}\"]')");
    wait(&mut page, "the call in the table", &format!("!!{row} || null"));
    assert_eq!(page.eval("sessionStorage.getItem('relay.apiKey')").expect("eval"), "k", "the key is kept for the tab");
    assert_eq!(page.eval("document.getElementById('key').value").expect("eval"), "", "the key is not shown");
    let cells = page.eval(&format!("[...{row}.cells].map((c) => c.textContent)")).expect("cells");
    assert_eq!(cells[1], "twilio", "{cells}");
    assert_eq!(cells[3], format!("console-node / {}", relay_tests::owner(id, relay.cores())), "{cells}");
    let text = page.eval(&format!("{row}.querySelector('.caller-counts').textContent")).expect("counts");
    let first: u64 = text.as_str().and_then(|t| t.split('/').next()).and_then(|n| n.parse().ok()).expect("framesIn");
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
    page.click("#listen").expect("listen");
    let peak = wait(
        &mut page,
        "the level meter to measure the call",
        "(Number(document.getElementById('listen-level').dataset.peak) > 0.02) && document.getElementById('listen-level').dataset.peak",
    );
    let peak: f64 = peak.as_str().and_then(|p| p.parse().ok()).expect("a level");
    assert!(peak > 0.02, "the page measured the caller's tone: {peak}");

    // Talk: Firefox's fake microphone (a continuous tone) reaches the Twilio caller.
    let heard_before = caller.heard_pcm().len();
    page.click("#talk").expect("talk");
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

    // Stop ends the call; its record appears.
    page.eval("document.querySelector('[data-act=\"stop-call\"]').click(); true").expect("stop");
    let status = wait(&mut page, "the call record", "document.getElementById('record').dataset.status || null");
    assert!(status.as_str().is_some_and(|s| !s.is_empty()), "{status}");
    assert!(caller.wait_closed().is_some(), "the caller's stream is closed");
    wait(&mut page, "the call to leave the table", &format!("!{row} || null"));
    let errors = page.errors();
    assert!(errors.is_empty(), "no script errors: {errors:?}; whole log: {:?}", page.log());
}
