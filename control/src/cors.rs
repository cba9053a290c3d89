//! CORS for browser clients: the allow-origin decision and preflight answers.
//!
//! Invariant: a disallowed origin gets no CORS headers (the browser then blocks it); nothing else
//! about the response changes.

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Response, StatusCode};

use crate::config::CorsOrigins;

/// How long browsers may cache a preflight answer, seconds.
const MAX_AGE_SECS: &str = "600";
/// Request headers browsers may send cross-origin.
const ALLOW_HEADERS: &str = "authorization, content-type, if-match";

/// The `Access-Control-Allow-Origin` value for a request from `origin`, if it is allowed.
pub fn allow_origin(policy: &CorsOrigins, origin: &HeaderValue) -> Option<HeaderValue> {
    match policy {
        CorsOrigins::None => None,
        CorsOrigins::Any => Some(HeaderValue::from_static("*")),
        CorsOrigins::List(list) => {
            let o = origin.to_str().ok()?;
            list.iter().any(|allowed| allowed == o).then(|| origin.clone())
        }
    }
}

/// Adds CORS headers to `response` when the request came from an allowed `Origin`.
pub fn decorate(policy: &CorsOrigins, request: &HeaderMap, response: &mut Response<Bytes>) {
    vary(policy, response.headers_mut());
    let Some(origin) = request.get(header::ORIGIN) else { return };
    if let Some(value) = allow_origin(policy, origin) {
        let headers = response.headers_mut();
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, value);
        headers.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static("x-relay-core, location, etag, link"),
        );
    }
}

/// The answer to `OPTIONS` on a path that accepts `allow`: a CORS preflight when the request
/// has `Origin` and `Access-Control-Request-Method`, else a plain `Allow` listing.
pub fn options(policy: &CorsOrigins, request: &HeaderMap, allow: &'static str) -> Response<Bytes> {
    let mut response = Response::new(Bytes::new());
    *response.status_mut() = StatusCode::NO_CONTENT;
    let headers = response.headers_mut();
    headers.insert(header::ALLOW, HeaderValue::from_static(allow));
    vary(policy, headers);
    let preflight = request.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    if let (true, Some(origin)) = (preflight, request.get(header::ORIGIN)) {
        if let Some(value) = allow_origin(policy, origin) {
            headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, value);
            headers.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static(allow));
            headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, HeaderValue::from_static(ALLOW_HEADERS));
            headers.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static(MAX_AGE_SECS));
        }
    }
    response
}

/// With an origin list the answer depends on `Origin`, allowed or not, so caches must key on it.
fn vary(policy: &CorsOrigins, headers: &mut HeaderMap) {
    if matches!(policy, CorsOrigins::List(_)) {
        headers.append(header::VARY, HeaderValue::from_static("Origin"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin(s: &'static str) -> HeaderValue {
        HeaderValue::from_static(s)
    }

    /// Any, list and none policies decide as configured.
    #[test]
    fn policies() {
        let list = CorsOrigins::List(vec!["https://a.example".into()]);
        assert_eq!(allow_origin(&CorsOrigins::Any, &origin("https://x")), Some(origin("*")));
        assert_eq!(allow_origin(&list, &origin("https://a.example")), Some(origin("https://a.example")));
        assert_eq!(allow_origin(&list, &origin("https://b.example")), None);
        assert_eq!(allow_origin(&CorsOrigins::None, &origin("https://a.example")), None);
    }

    /// A preflight from an allowed origin gets methods, headers and max-age; others only Allow.
    #[test]
    fn preflight() {
        let mut req = HeaderMap::new();
        req.insert(header::ORIGIN, origin("https://a.example"));
        req.insert(header::ACCESS_CONTROL_REQUEST_METHOD, origin("POST"));
        let r = options(&CorsOrigins::Any, &req, "POST, OPTIONS");
        assert_eq!(r.status(), StatusCode::NO_CONTENT);
        assert_eq!(r.headers()[header::ACCESS_CONTROL_ALLOW_METHODS], "POST, OPTIONS");
        assert!(r.headers().contains_key(header::ACCESS_CONTROL_MAX_AGE));
        let r = options(&CorsOrigins::None, &req, "POST, OPTIONS");
        assert!(!r.headers().contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN));
        assert_eq!(r.headers()[header::ALLOW], "POST, OPTIONS");
    }
}
