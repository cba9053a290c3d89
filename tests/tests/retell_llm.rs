//! `WS /llm-websocket/{call_id}` (seed 002): the relay as Retell's custom LLM with its built-in
//! scripted responder: config and begin sentence on connect, ping_pong, streamed responses with
//! `content_complete` and `end_call`, and completed utterances feeding `/ws` transcript updates.

use std::time::Duration;

use relay_tests::{Relay, Ws};
use serde_json::{json, Value};

fn next(ws: &mut Ws) -> Value {
    ws.recv_json()
}

/// The chunks of the answer to `response_id`, until the complete one.
fn answer(ws: &mut Ws, response_id: u64) -> (String, bool) {
    let mut text = String::new();
    loop {
        let m = next(ws);
        assert_eq!(m["response_type"], "response", "{m}");
        assert_eq!(m["response_id"], response_id, "{m}");
        text.push_str(m["content"].as_str().unwrap_or_default());
        if m["content_complete"] == true {
            return (text, m["end_call"] == true);
        }
        assert_eq!(m["end_call"], false, "only the last chunk may end the call: {m}");
    }
}

fn utterances(pairs: &[(&str, &str)]) -> Value {
    Value::Array(pairs.iter().map(|(r, c)| json!({"role": r, "content": c})).collect())
}

#[test]
fn scripted_responder_speaks_the_protocol() {
    let relay = Relay::start(&["--begin-sentence", "Thanks for calling Demo Plumbing."]);
    let call = "call-llm-1";
    assert_eq!(relay.start_call(call, "tok").status, 200);
    let mut events = relay.observe(call, "tok");
    let mut ws = relay.ws(&format!("/llm-websocket/{call}"), &[]).expect("upgrade");
    let config = next(&mut ws);
    assert_eq!(config["response_type"], "config", "{config}");
    assert_eq!(config["config"]["auto_reconnect"], true);
    assert_eq!(config["config"]["call_details"], true);
    let begin = next(&mut ws);
    assert_eq!(begin["response_id"], 0, "{begin}");
    assert_eq!(begin["content"], "Thanks for calling Demo Plumbing.");
    assert_eq!(begin["content_complete"], true);

    ws.send_json(&json!({"interaction_type": "ping_pong", "timestamp": 1_700_000_000_123u64}));
    let pong = next(&mut ws);
    assert_eq!(pong, json!({"response_type": "ping_pong", "timestamp": 1_700_000_000_123u64}));
    // Seed 002's own naming of the config exchange.
    ws.send_json(&json!({"response_type": "config", "response_id": 1}));
    assert_eq!(next(&mut ws)["response_id"], 1);

    let partial = utterances(&[("agent", "Thanks for calling Demo Plumbing."), ("user", "my pipe")]);
    ws.send_json(&json!({"interaction_type": "update_only", "transcript": partial}));
    let full = utterances(&[("agent", "Thanks for calling Demo Plumbing."), ("user", "my pipe burst")]);
    ws.send_json(&json!({"interaction_type": "response_required", "response_id": 3, "transcript": full}));
    let (text, end) = answer(&mut ws, 3);
    assert!(text.contains("my pipe burst") && !end, "{text}");

    ws.send_json(&json!({"interaction_type": "reminder_required", "response_id": 4, "transcript": full}));
    let (text, end) = answer(&mut ws, 4);
    assert!(text.contains("still there") && !end, "{text}");

    let bye = utterances(&[
        ("agent", "Thanks for calling Demo Plumbing."),
        ("user", "my pipe burst"),
        ("user", "ok goodbye"),
    ]);
    ws.send_json(&json!({"interaction_type": "response_required", "response_id": 5, "transcript": bye}));
    let (text, end) = answer(&mut ws, 5);
    assert!(text.contains("Goodbye") && end, "a farewell ends the call: {text}");

    // Completed utterances reached the session's /ws listeners, each once, the partial one never.
    let mut said = Vec::new();
    while let Some(relay_tests::WsMsg::Json(m)) = events.recv_within(Duration::from_millis(300)) {
        if m["eventType"] == "update" {
            if let Some(t) = m["data"]["transcript"][0]["content"].as_str() {
                said.push((m["data"]["transcript"][0]["role"].as_str().unwrap_or("").to_owned(), t.to_owned()));
            }
        }
    }
    let expected: Vec<(String, String)> =
        [("agent", "Thanks for calling Demo Plumbing."), ("user", "my pipe burst"), ("user", "ok goodbye")]
            .iter()
            .map(|(r, c)| ((*r).to_owned(), (*c).to_owned()))
            .collect();
    assert_eq!(said, expected);
}

/// Garbage is ignored (the socket stays usable); with an API key the socket needs it.
#[test]
fn bad_input_and_credentials() {
    let relay = Relay::start(&["--api-key", "k1"]);
    assert_eq!(relay.ws("/llm-websocket/call-x", &[]).err(), Some(401));
    let mut ws = relay.ws("/llm-websocket/call-x", &[("Authorization", "Bearer k1")]).expect("upgrade with the key");
    assert_eq!(next(&mut ws)["response_type"], "config");
    assert_eq!(next(&mut ws)["response_id"], 0);
    ws.send_text("not json");
    ws.send_json(&json!({"interaction_type": "response_required"}));
    ws.send_json(&json!({"interaction_type": "ping_pong", "timestamp": 5}));
    assert_eq!(next(&mut ws)["timestamp"], 5, "still answering after bad input");
}

/// With `--llm-upstream-url` the socket is forwarded both ways to an upstream LLM server (dialled
/// at `<url>/<call_id>`), and the relay still reads the transcripts on the way.
#[test]
fn forwarded_to_an_upstream_llm() {
    let upstream = relay_tests::telephony::TwilioBot::start();
    let relay = Relay::start(&["--llm-upstream-url", &upstream.url("/llm-websocket")]);
    let call = "call-llm-up";
    assert_eq!(relay.start_call(call, "tok").status, 200);
    let events = relay_tests::telephony::Events::open(&relay, call, Some("tok"));
    let mut ws = relay.ws(&format!("/llm-websocket/{call}"), &[]).expect("upgrade");
    let up = upstream.ready(0);
    assert_eq!(up.path, format!("/llm-websocket/{call}"));
    up.send_json(&json!({"response_type": "config", "config": {"auto_reconnect": false, "call_details": false}}));
    let config = next(&mut ws);
    assert_eq!(config["config"]["auto_reconnect"], false, "the upstream's own config, not the relay's: {config}");
    let turn = utterances(&[("user", "is anyone there")]);
    ws.send_json(&json!({"interaction_type": "response_required", "response_id": 7, "transcript": turn}));
    let got = up.wait_until("the turn at the upstream", |r| {
        r.iter().filter_map(|a| a.json().cloned()).find(|v| v["interaction_type"] == "response_required")
    });
    assert_eq!(got["response_id"], 7);
    up.send_json(&json!({"response_type": "response", "response_id": 7, "content": "Yes, hello!", "content_complete": true, "end_call": false}));
    let (text, _) = answer(&mut ws, 7);
    assert_eq!(text, "Yes, hello!");
    let heard = events.wait_event_where("update", |d| d["transcript"][0]["content"] == "is anyone there");
    assert_eq!(heard["transcript"][0]["role"], "user");
}
