//! `GET /console`: the operator's page (live calls, one call's events and controls, Listen and
//! Talk over WHEP/WHIP, the node's cores and histograms, a test call). One self-contained HTML
//! file, `console/console.html`, embedded at build time.
//!
//! Invariant: the page holds no data and loads nothing from elsewhere (its CSP allows only this
//! origin); every API call it makes carries the API key the operator typed, kept in the tab's
//! `sessionStorage` only, and it never displays a key or a token.

use bytes::Bytes;
use http::{header, HeaderValue, Response};

/// The page: inline CSS and script, no external resource.
pub const CONSOLE_HTML: &str = include_str!("console/console.html");

/// What the page may load: itself, and connections (`fetch`, WebSockets) to this origin; media
/// from the browser's own microphone and WebRTC peers are not resources and need no source.
const CONSOLE_CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                           connect-src 'self'; img-src 'self' data:; media-src 'self' blob:";

/// `GET /console`.
pub fn page() -> Response<Bytes> {
    let mut response = Response::new(Bytes::from_static(CONSOLE_HTML.as_bytes()));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONSOLE_CSP));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The page names no other origin: no `http(s)://` URL and no protocol-relative source.
    #[test]
    fn page_is_self_contained() {
        for needle in ["http://", "https://", "src=\"//", "href=\"//"] {
            assert!(!CONSOLE_HTML.contains(needle), "console.html contains {needle}");
        }
        assert!(CONSOLE_HTML.len() < 64 * 1024, "the page stays small");
    }
}
