//! `GET /console` in headless Firefox (driven over WebDriver BiDi, tests/src/firefox.rs): the same
//! flow as the Chromium test in console.rs — a real Twilio call listed with moving counters,
//! Listen (WHEP, level measured by the page), Talk (WHIP `role=agent` from Firefox's fake
//! microphone, heard by the caller), Stop and the call's record — with no script error.

use std::time::Duration;

use relay_tests::console_page::{caller_tone, list_listen_talk, stop_shows_the_record};
use relay_tests::firefox::{self, Firefox};
use relay_tests::telephony::TwilioCaller;
use relay_tests::Relay;

/// The bound on each wait for the page.
const LIMIT: Duration = Duration::from_secs(20);

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
    caller.send_audio(&caller_tone());

    let url = format!("http://{}/console", relay.addr());
    let mut page = Firefox::open(&url).expect("firefox opens the console");
    // Listen and Talk are real mouse clicks here: Firefox starts audio only in a user's gesture.
    list_listen_talk(&mut page, &relay, &caller, id, LIMIT);
    // Stop ends the call; its record appears.
    stop_shows_the_record(&mut page, &caller, id, LIMIT);
    let errors = page.errors();
    assert!(errors.is_empty(), "no script errors: {errors:?}; whole log: {:?}", page.log());
}
