//! The console's browser flow, shared by the Chromium (DevTools) and Firefox (WebDriver BiDi)
//! tests: what a page driver gives ([`Page`]), the caller's tone, and the steps both browsers take
//! — the key typed in, a live call listed with moving counters, Listen measured by the page, Talk
//! heard by the caller, then Stop and the call's record.
//!
//! Invariant: every wait polls the page with a bound ([`Page::wait_for`]); nothing sleeps for
//! readiness.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::poll_until;
use crate::telephony::{ulaw, TwilioCaller};
use crate::Relay;

/// A browser page a test drives.
pub trait Page {
    /// Evaluates `expression` in the page (awaiting a promise) and returns its value as JSON.
    ///
    /// # Errors
    /// When the call fails or the expression throws.
    fn eval(&mut self, expression: &str) -> Result<Value, String>;

    /// Clicks the first element `selector` matches, as the driver can (a user's click where the
    /// browser needs one to start audio).
    ///
    /// # Errors
    /// When nothing matches or the click fails.
    fn click(&mut self, selector: &str) -> Result<(), String>;

    /// What the page has logged so far, for a failure's message.
    fn log_lines(&self) -> Vec<String>;

    /// Evaluates `expression` every 50 ms until it returns something other than `null`/`false`
    /// (an expression that throws, e.g. while the page still loads, counts as not yet).
    ///
    /// # Errors
    /// When it does not within `limit` (the message says `what`, the last exception and the log).
    fn wait_for(&mut self, what: &str, expression: &str, limit: Duration) -> Result<Value, String> {
        let deadline = Instant::now() + limit;
        let mut last = None;
        loop {
            match self.eval(expression) {
                Ok(v) if !v.is_null() && v != Value::Bool(false) => return Ok(v),
                Ok(_) => {}
                Err(e) => last = Some(e),
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "timed out after {limit:?} waiting for {what} (last error {last:?}); log: {:?}",
                    self.log_lines()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// 40 s of a 1 kHz tone as 20 ms μ-law frames: what the test's caller says all along.
pub fn caller_tone() -> Vec<Vec<u8>> {
    let tone: Vec<u8> = (0..8000 * 40)
        .map(|i| ulaw(((i as f32 * 1000.0 / 8000.0 * std::f32::consts::TAU).sin() * 6000.0) as i16))
        .collect();
    tone.chunks(160).map(<[u8]>::to_vec).collect()
}

/// The page's table row of call `id`, as a JavaScript expression.
pub fn row(id: &str) -> String {
    format!("document.querySelector('tr[data-id=\"{id}\"]')")
}

/// Waits (bounded by `limit`) for `expression` to give a value; see [`Page::wait_for`].
///
/// # Panics
/// When it does not, naming `what`.
pub fn wait(page: &mut impl Page, limit: Duration, what: &str, expression: &str) -> Value {
    page.wait_for(what, expression, limit).unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// On a console opened without the key (its 401 notice shown), types key `k`, then checks that
/// call `id` (a Twilio caller talking on `relay`, node `console-node`) is listed with its kind,
/// node and core and moving counters, that Listen's level meter measures its tone, and that Talk
/// (the browser's fake microphone) is loud in what `caller` hears. Each wait is bounded by `limit`.
///
/// # Panics
/// When a step does not happen.
pub fn list_listen_talk(page: &mut impl Page, relay: &Relay, caller: &TwilioCaller, id: &str, limit: Duration) {
    // Without the key the page says so; with it, the call shows up.
    wait(page, limit, "the 401 notice", "document.getElementById('calls-error').textContent.includes('401') || null");
    page.eval("document.getElementById('key').value = 'k'; document.querySelector('#key-form button[type=submit]').click(); true")
        .expect("type the key");
    let row = row(id);
    wait(page, limit, "the call in the table", &format!("!!{row} || null"));
    assert_eq!(page.eval("sessionStorage.getItem('relay.apiKey')").expect("eval"), "k", "the key is kept for the tab");
    assert_eq!(page.eval("document.getElementById('key').value").expect("eval"), "", "the key is not shown");
    let cells = page.eval(&format!("[...{row}.cells].map((c) => c.textContent)")).expect("cells");
    assert_eq!(cells[1], "twilio", "{cells}");
    assert_eq!(cells[3], format!("console-node / {}", crate::owner(id, relay.cores())), "{cells}");
    let text = page.eval(&format!("{row}.querySelector('.caller-counts').textContent")).expect("counts");
    let first: u64 = text.as_str().and_then(|t| t.split('/').next()).and_then(|n| n.parse().ok()).expect("framesIn");
    wait(
        page,
        limit,
        "the counters to move",
        &format!("(Number({row}.querySelector('.caller-counts').textContent.split('/')[0]) > {first}) || null"),
    );

    // One call's view: Listen hears the caller's tone.
    page.eval(&format!("{row}.querySelector('button').click(); true")).expect("open the call");
    wait(
        page,
        limit,
        "the events socket",
        "document.getElementById('call-state').textContent.includes('events connected') || null",
    );
    page.click("#listen").expect("listen");
    let peak = wait(
        page,
        limit,
        "the level meter to measure the call",
        "(Number(document.getElementById('listen-level').dataset.peak) > 0.02) && document.getElementById('listen-level').dataset.peak",
    );
    let peak: f64 = peak.as_str().and_then(|p| p.parse().ok()).expect("a level");
    assert!(peak > 0.02, "the page measured the caller's tone: {peak}");

    // Talk: the browser's fake microphone reaches the Twilio caller.
    let heard_before = caller.heard_pcm().len();
    page.click("#talk").expect("talk");
    wait(
        page,
        limit,
        "the talk leg to connect",
        "document.getElementById('media-state').textContent === 'talk: connected' || null",
    );
    poll_until("the caller to hear the browser", || {
        let heard = caller.heard_pcm();
        let loud = heard.get(heard_before..).unwrap_or_default().iter().filter(|s| s.unsigned_abs() > 2000).count();
        (loud > 400).then_some(())
    });
}

/// Stops call `id` from its view: the call's record appears, `caller`'s stream closes and the
/// row leaves the table. Each wait is bounded by `limit`.
///
/// # Panics
/// When a step does not happen.
pub fn stop_shows_the_record(page: &mut impl Page, caller: &TwilioCaller, id: &str, limit: Duration) {
    page.eval("document.querySelector('[data-act=\"stop-call\"]').click(); true").expect("stop");
    let status = wait(page, limit, "the call record", "document.getElementById('record').dataset.status || null");
    assert!(status.as_str().is_some_and(|s| !s.is_empty()), "{status}");
    assert!(caller.wait_closed().is_some(), "the caller's stream is closed");
    wait(page, limit, "the call to leave the table", &format!("!{} || null", row(id)));
}
