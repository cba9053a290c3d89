//! `GET /metrics`: Prometheus text exposition of every core's counts.

use relay_tests::{assert_error, ids_on_core, Relay};

/// Value of the series `name{core="<core>"}` in an exposition.
fn series(text: &str, name: &str, core: usize) -> Option<f64> {
    let prefix = format!("{name}{{core=\"{core}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.trim().parse().ok())
}

#[test]
fn exposition_counts_sessions_per_core() {
    let relay = Relay::start(&["--api-key", "k"]);
    assert_error(&relay.request("GET", "/metrics", &[], None), 401);
    for id in ids_on_core("metrics", 0, 2, 2).into_iter().chain(ids_on_core("metrics", 1, 2, 1)) {
        assert_eq!(relay.start_call(&id, "tok").status, 200);
    }
    let r = relay.get("/metrics");
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").is_some_and(|t| t.starts_with("text/plain")), "{:?}", r.header("content-type"));
    let text = r.text();
    assert!(text.contains("# HELP relay_sessions"), "{text}");
    assert!(text.contains("# TYPE relay_sessions gauge"), "{text}");
    assert_eq!(series(&text, "relay_sessions", 0), Some(2.0), "{text}");
    assert_eq!(series(&text, "relay_sessions", 1), Some(1.0), "{text}");
    assert!(series(&text, "relay_webrtc_peers", 0).is_some(), "{text}");
    assert!(text.contains("relay_uptime_seconds"), "{text}");
    // Every input a core handled is timed: the start-calls above at least.
    let count = |core: usize| {
        let prefix = format!("relay_core_input_seconds_count{{core=\"{core}\"}} ");
        text.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.trim().parse::<f64>().ok()).unwrap_or(0.0)
    };
    assert!(count(0) >= 2.0 && count(1) >= 1.0, "{text}");
}
