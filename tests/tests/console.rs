//! `GET /console`: the operator's page is public (it holds no data), self-contained (nothing
//! loaded from elsewhere, a strict CSP), and drives the API with the key typed into it; in
//! headless Chromium it lists a real Twilio call with moving counters, listens to it (WHEP, level
//! measured by the page), talks into it (WHIP `role=agent`, heard by the caller) and stops it.

use relay_tests::Relay;

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
