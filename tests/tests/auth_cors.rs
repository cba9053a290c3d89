//! The API key on control endpoints (not on `/health` or preflights), and CORS answers for
//! browsers, with the default `*` and with a configured origin list.

use relay_tests::{assert_error, assert_success, Conn, Relay};
use serde_json::json;

const KEY: &str = "k-3f9a1c";

/// With `--api-key`, control endpoints without the bearer key are 401 with `WWW-Authenticate`.
#[test]
fn control_endpoints_need_the_key() {
    let relay = Relay::start(&["--api-key", KEY]);
    let start = json!({"sessionId": "s", "accessToken": "t"}).to_string();
    let id = json!({"sessionId": "s"}).to_string();
    let cases: [(&str, &str, Option<&str>); 9] = [
        ("POST", "/start-call", Some(&start)),
        ("POST", "/stop-call", Some(&id)),
        ("POST", "/mute", Some(&id)),
        ("POST", "/unmute", Some(&id)),
        ("POST", "/send-custom-stream", Some(&id)),
        ("POST", "/resume-microphone", Some(&id)),
        ("GET", "/call-status?sessionId=s", None),
        ("GET", "/track-status?sessionId=s", None),
        ("GET", "/health/detailed", None),
    ];
    let wrong = format!("Bearer {KEY}x");
    let lower = format!("bearer-{KEY}");
    for (method, path, body) in cases {
        for headers in [
            vec![],
            vec![("Authorization", wrong.as_str())],
            vec![("Authorization", lower.as_str())],
            vec![("Authorization", KEY)],
        ] {
            let resp = relay.request(method, path, &headers, body);
            assert_error(&resp, 401);
            let challenge = resp.header("www-authenticate").unwrap_or_default();
            assert!(
                challenge.to_ascii_lowercase().starts_with("bearer"),
                "{method} {path}: www-authenticate {challenge:?}"
            );
        }
    }
    assert_eq!(relay.active_sessions(), 0, "no unauthorised request took effect");
}

/// With the right key every control endpoint works.
#[test]
fn the_key_opens_control_endpoints() {
    let relay = Relay::start(&["--api-key", KEY]);
    let auth = format!("Bearer {KEY}");
    let headers = [("Authorization", auth.as_str())];
    let start = json!({"sessionId": "s", "accessToken": "t"}).to_string();
    assert_success(&relay.request("POST", "/start-call", &headers, Some(&start)), "Call started successfully");
    assert_success(&relay.request("GET", "/call-status?sessionId=s", &headers, None), "Call status retrieved");
    assert_eq!(relay.request("GET", "/health/detailed", &headers, None).status, 200);
    let id = json!({"sessionId": "s"}).to_string();
    assert_success(&relay.request("POST", "/stop-call", &headers, Some(&id)), "Call stopped successfully");
}

/// `/health` never needs the key and never shows it.
#[test]
fn health_is_open_and_secret_free() {
    let relay = Relay::start(&["--api-key", KEY]);
    let resp = relay.request("GET", "/health", &[], None);
    assert_eq!(resp.status, 200);
    assert!(!resp.text().contains(KEY));
    let auth = format!("Bearer {KEY}");
    let detailed = relay.request("GET", "/health/detailed", &[("Authorization", &auth)], None);
    assert_eq!(detailed.status, 200);
    assert!(!detailed.text().contains(KEY), "detailed health leaks the key: {}", detailed.text());
}

/// CORS preflights need no key.
#[test]
fn preflight_needs_no_key() {
    let relay = Relay::start(&["--api-key", KEY]);
    let resp = relay.request(
        "OPTIONS",
        "/start-call",
        &[
            ("Origin", "https://a.example"),
            ("Access-Control-Request-Method", "POST"),
            ("Access-Control-Request-Headers", "authorization, content-type"),
        ],
        None,
    );
    assert_eq!(resp.status, 204, "{:?}", resp.headers);
    assert!(resp.header("access-control-allow-origin").is_some());
}

/// The API key as a bearer token opens any session's event socket, started or not.
#[test]
fn the_key_opens_event_sockets() {
    let relay = Relay::start(&["--api-key", KEY]);
    assert_success(&relay.start_call("op", "session-token"), "Call started successfully");
    let mut ws = relay.observe("op", KEY);
    assert_success(&relay.post("/mute", &json!({"sessionId": "op"})), "Microphone muted");
    assert_eq!(ws.expect_event("update"), json!({"microphoneEnabled": false}));
    // The session's own token still works, and a wrong one does not.
    let _own = relay.observe("op", "session-token");
    assert_eq!(relay.ws("/ws?sessionId=op", &[("Authorization", "Bearer nope")]).err(), Some(401));
    // Before the start, the key may wait for any session and stays at the start.
    let mut early = relay.observe("later", KEY);
    assert_success(&relay.start_call("later", "other-token"), "Call started successfully");
    assert_eq!(early.expect_event("call_started")["sessionId"], "later");
}

/// The default CORS config allows any origin with `*`, on success and error responses.
#[test]
fn default_cors_allows_any_origin() {
    let relay = Relay::start(&[]);
    let origin = [("Origin", "https://a.example")];
    let resp = relay.request("GET", "/health", &origin, None);
    assert_eq!(resp.header("access-control-allow-origin"), Some("*"));
    let start = json!({"sessionId": "c", "accessToken": "t"}).to_string();
    let resp = relay.request("POST", "/start-call", &origin, Some(&start));
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("access-control-allow-origin"), Some("*"));
    let resp = relay.request("POST", "/start-call", &origin, Some(&start));
    assert_eq!(resp.status, 409);
    assert_eq!(resp.header("access-control-allow-origin"), Some("*"), "errors carry CORS headers too");
}

/// With `--cors-origins`, a listed origin is echoed with `Vary: Origin`; others get no allow-origin.
#[test]
fn configured_cors_echoes_listed_origins() {
    let relay = Relay::start(&["--cors-origins", "https://a.example,https://b.example"]);
    for origin in ["https://a.example", "https://b.example"] {
        let resp = relay.request("GET", "/health", &[("Origin", origin)], None);
        assert_eq!(resp.header("access-control-allow-origin"), Some(origin));
        let vary = resp.header("vary").unwrap_or_default();
        assert!(vary.split(',').any(|v| v.trim().eq_ignore_ascii_case("origin")), "vary {vary:?}");
    }
    for origin in ["https://c.example", "https://a.example.evil", "null"] {
        let resp = relay.request("GET", "/health", &[("Origin", origin)], None);
        assert_eq!(resp.status, 200);
        assert_eq!(resp.header("access-control-allow-origin"), None, "{origin} is not allowed");
    }
}

/// Errors the relay finds in the head itself (body over the limit 413, a transfer coding other
/// than chunked 501, an unknown `Expect` 417) or in a chunked body (a chunk past the limit 413)
/// carry CORS headers for an allowed origin, so a browser sees the status rather than a CORS
/// failure; a disallowed origin still gets none.
#[test]
fn head_errors_carry_cors_headers() {
    let relay = Relay::start(&["--cors-origins", "https://a.example", "--max-body-bytes", "1024"]);
    let heads = [
        ("Content-Length: 5000\r\n", 413),
        ("Transfer-Encoding: gzip, chunked\r\n", 501),
        ("Transfer-Encoding: chunked\r\n\r\n800", 413),
        ("Expect: 200-ok\r\nContent-Length: 2\r\n", 417),
    ];
    for (extra, status) in heads {
        for (origin, allowed) in [("https://a.example", true), ("https://c.example", false)] {
            let mut conn = Conn::open(relay.addr());
            let head = format!(
                "POST /start-call HTTP/1.1\r\nHost: relay\r\nOrigin: {origin}\r\nContent-Type: application/json\r\n{extra}\r\n"
            );
            conn.write_raw(head.as_bytes()).expect("send the head");
            let resp = conn.read_response();
            assert_eq!(resp.status, status, "{extra:?}: {}", resp.text());
            let want = allowed.then_some(origin);
            assert_eq!(resp.header("access-control-allow-origin"), want, "{extra:?} from {origin}");
            let vary = resp.header("vary").unwrap_or_default();
            assert!(vary.split(',').any(|v| v.trim().eq_ignore_ascii_case("origin")), "vary {vary:?}");
        }
    }
}

/// A preflight is 204 with the allowed methods, headers and a max age.
#[test]
fn preflight_answers_methods_headers_and_max_age() {
    let relay = Relay::start(&[]);
    let resp = relay.request(
        "OPTIONS",
        "/start-call",
        &[
            ("Origin", "https://a.example"),
            ("Access-Control-Request-Method", "POST"),
            ("Access-Control-Request-Headers", "content-type,authorization"),
        ],
        None,
    );
    assert_eq!(resp.status, 204, "{:?}", resp.headers);
    assert!(resp.body.is_empty());
    assert!(resp.header("access-control-allow-origin").is_some());
    let methods = resp.header("access-control-allow-methods").unwrap_or_default().to_ascii_uppercase();
    assert!(methods.split(',').any(|m| m.trim() == "POST"), "allow-methods {methods:?}");
    let headers = resp.header("access-control-allow-headers").unwrap_or_default().to_ascii_lowercase();
    let listed: Vec<&str> = headers.split(',').map(str::trim).collect();
    assert!(listed.contains(&"authorization") && listed.contains(&"content-type"), "allow-headers {headers:?}");
    let max_age = resp.header("access-control-max-age").unwrap_or_default();
    assert!(max_age.parse::<u64>().is_ok(), "max-age {max_age:?}");
}

/// A preflight for a path that does not exist is 404.
#[test]
fn preflight_on_unknown_path_is_404() {
    let relay = Relay::start(&[]);
    let resp = relay.request(
        "OPTIONS",
        "/no-such-thing",
        &[("Origin", "https://a.example"), ("Access-Control-Request-Method", "POST")],
        None,
    );
    assert_error(&resp, 404);
}

/// Secrets never come back: not in responses, errors, events, nor in the relay's debug logs.
#[test]
fn secrets_stay_secret() {
    let key = "key-SECRET-8d1f";
    let token = "tok-SECRET-51ab";
    let wrong = "wrong-SECRET-c0de";
    let relay = Relay::start(&["--api-key", key, "--log", "debug"]);
    let mut seen = Vec::new();
    let start = relay.start_call("sec", token);
    assert_success(&start, "Call started successfully");
    seen.push(start.text());
    let refused =
        relay.request("GET", "/call-status?sessionId=sec", &[("Authorization", &format!("Bearer {wrong}"))], None);
    assert_eq!(refused.status, 401);
    seen.push(refused.text());
    seen.push(relay.get("/health").text());
    seen.push(relay.get("/health/detailed").text());
    assert_eq!(relay.ws(&format!("/ws?sessionId=sec&accessToken={wrong}"), &[]).err(), Some(401));
    let mut ws = relay.observe("sec", token);
    assert_success(&relay.stop_call("sec"), "Call stopped successfully");
    seen.push(ws.expect_event("call_ended").to_string());
    for text in &seen {
        for secret in [key, token, wrong] {
            assert!(!text.contains(secret), "{secret} leaked in {text}");
        }
    }
    let logs = relay.logs().join("\n");
    assert!(!logs.is_empty());
    for secret in [key, token, wrong] {
        assert!(!logs.contains(secret), "{secret} leaked into the logs:\n{logs}");
    }
}
