//! `--node-id`: every HTTP answer and every WebSocket 101 names the node that served it in
//! `X-Relay-Node` (so a client behind a balancer can see that every leg of a call reached one
//! node), `/health` and `/health/detailed` show it, and call records store it.

use relay_tests::telephony::TwilioCaller;
use relay_tests::{output_bounded, poll_until, relay_command, temp_dir, Conn, Relay, TIMEOUT};
use serde_json::json;

/// Answers of every kind carry the configured node id: success, 404, 401, a refused upgrade, a
/// 101, and errors the engine writes itself (a malformed request).
#[test]
fn every_answer_names_the_node() {
    let relay = Relay::start(&["--node-id", "node-a", "--api-key", "k"]);
    let health = relay.get("/health");
    assert_eq!(health.status, 200);
    assert_eq!(health.header("x-relay-node"), Some("node-a"));
    assert_eq!(health.json()["node"], "node-a", "{}", health.text());
    let detailed = relay.get("/health/detailed");
    assert_eq!(detailed.json()["services"]["server"]["node"], "node-a", "{}", detailed.text());
    for (path, status) in [("/nowhere", 404), ("/stop-call", 401)] {
        let resp = relay.request("POST", path, &[], Some("{}"));
        assert_eq!(resp.status, status, "{path}");
        assert_eq!(resp.header("x-relay-node"), Some("node-a"), "{path}");
    }
    let started = relay.post("/start-call", &json!({"sessionId": "n1", "accessToken": "t"}));
    assert_eq!(started.status, 200, "{}", started.text());
    assert_eq!(started.header("x-relay-node"), Some("node-a"));
    let upgrade = [
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];
    let mut conn = Conn::open(relay.addr());
    let mut headers = upgrade.to_vec();
    headers.push(("Authorization", "Bearer t"));
    let switched = conn.request("GET", "/ws?sessionId=n1", &headers, None);
    assert_eq!(switched.status, 101);
    assert_eq!(switched.header("x-relay-node"), Some("node-a"), "the 101 names the node");
    let refused = relay.request("GET", "/ws?sessionId=n1", &upgrade, None);
    assert_eq!(refused.status, 401);
    assert_eq!(refused.header("x-relay-node"), Some("node-a"));
    let mut raw = Conn::open(relay.addr());
    raw.write_raw(b"NOT HTTP AT ALL\r\n\r\n").expect("write");
    let malformed = raw.read_response();
    assert_eq!(malformed.status, 400);
    assert_eq!(malformed.header("x-relay-node"), Some("node-a"), "errors the engine writes");
}

/// Without `--node-id` the node is named after its host; an id that cannot go into a header is
/// refused at start with one clear line.
#[test]
fn node_id_defaults_to_the_host_and_is_checked() {
    let relay = Relay::start(&[]);
    let health = relay.get("/health");
    let node = health.header("x-relay-node").expect("a node id").to_owned();
    assert!(!node.is_empty() && node.len() <= 64, "{node:?}");
    assert_eq!(health.json()["node"], node.as_str());

    let data = temp_dir("node-id");
    let mut cmd = relay_command();
    cmd.args(["--listen", "127.0.0.1:0", "--node-id", "bad node\u{7f}", "--data-dir"]).arg(&data);
    let out = output_bounded(cmd, TIMEOUT);
    assert!(!out.status.success(), "an invalid --node-id is refused");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--node-id"), "the error names the flag: {err}");
}

/// A call's record names the node that served it: analytics' recent calls show it as `node`.
#[test]
fn call_records_name_the_node() {
    let relay = Relay::start(&["--node-id", "node-rec"]);
    let caller = TwilioCaller::start(&relay, "CA-node", &[("projectId", "p-node")]);
    caller.stop();
    caller.wait_closed();
    let call = poll_until("the call's record in the database", || {
        let recent = relay.get("/analytics/project/p-node/recent").json();
        recent["calls"].as_array().and_then(|calls| calls.iter().find(|c| c["callSid"] == "CA-node").cloned())
    });
    assert_eq!(call["node"], "node-rec", "{call}");
}
