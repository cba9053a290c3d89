//! Session control API of seeds 000/001: `/health`, `/start-call`, `/stop-call`, `/mute`,
//! `/unmute`, `/send-custom-stream`, `/resume-microphone`, `/call-status`, `/track-status`.

use relay_tests::{assert_error, assert_json_type, assert_success, ids_on_core, is_rfc3339, owner, Relay};
use serde_json::{json, Value};

/// `/health` answers every seed's clients at once, with the exact field set and no session yet.
#[test]
fn health_has_the_superset_shape() {
    let relay = Relay::start(&[]);
    let resp = relay.get("/health");
    assert_eq!(resp.status, 200);
    assert_json_type(&resp);
    let v = resp.json();
    assert_eq!(v["success"], true, "{v}");
    assert_eq!(v["message"], "Relay is running", "{v}");
    assert_eq!(v["status"], "ok", "{v}");
    assert!(v["timestamp"].as_str().is_some_and(is_rfc3339), "RFC 3339 timestamp: {v}");
    assert!(v["uptime"].is_u64(), "uptime is a whole number of seconds: {v}");
    assert_eq!(v["activeSessions"], 0, "{v}");
    let node = v["node"].as_str().expect("the node's name").to_owned();
    assert_eq!(v["data"], json!({"activeSessions": 0, "version": "0.1.0", "node": node}), "{v}");
}

/// `/health` counts active sessions at the top level and in `data`.
#[test]
fn health_counts_active_sessions() {
    let relay = Relay::start(&[]);
    for i in 0..3 {
        assert_success(&relay.start_call(&format!("h-{i}"), "t"), "Call started successfully");
    }
    let v = relay.health();
    assert_eq!(v["activeSessions"], 3, "{v}");
    assert_eq!(v["data"]["activeSessions"], 3, "{v}");
    assert_success(&relay.stop_call("h-1"), "Call stopped successfully");
    let v = relay.health();
    assert_eq!(v["activeSessions"], 2, "{v}");
    assert_eq!(v["data"]["activeSessions"], 2, "{v}");
}

/// `/health/detailed` reports services, memory and one entry per core.
#[test]
fn health_detailed_has_services_and_cores() {
    let relay = Relay::start(&[]);
    let resp = relay.get("/health/detailed");
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_json_type(&resp);
    let v = resp.json();
    assert_eq!(v["status"], "healthy", "{v}");
    assert!(v["timestamp"].as_str().is_some_and(is_rfc3339), "{v}");
    let services = &v["services"];
    assert_eq!(services["database"]["status"], "up", "{v}");
    assert!(services["database"]["latency"].is_number(), "{v}");
    assert_eq!(services["openai"]["status"], "not_configured", "{v}");
    assert_eq!(services["twilio"]["status"], "not_configured", "{v}");
    let server = &services["server"];
    assert_eq!(server["status"], "up", "{v}");
    assert!(server["uptime"].is_number(), "{v}");
    assert_eq!(server["activeSessions"], 0, "{v}");
    assert!(server["memoryUsage"]["rss"].as_u64().is_some_and(|rss| rss > 0), "{v}");
    let cores = server["cores"].as_array().expect("cores array");
    assert_eq!(cores.len(), 2, "{v}");
    for (i, core) in cores.iter().enumerate() {
        assert_eq!(core["id"], i, "{v}");
        assert_eq!(core["sessions"], 0, "{v}");
        assert!(core["connections"].is_u64() && core["observers"].is_u64(), "{v}");
    }
}

/// `/start-call` echoes the config with defaults filled and the token redacted.
#[test]
fn start_call_echoes_config_with_defaults() {
    let relay = Relay::start(&[]);
    let resp = relay.start_call("sess-1", "super-secret-token");
    let data = assert_success(&resp, "Call started successfully");
    assert_eq!(
        data,
        json!({"sessionId": "sess-1", "config": {"accessToken": "***", "sampleRate": 16000, "emitRawAudioSamples": false}})
    );
    assert!(!resp.text().contains("super-secret-token"), "the token never comes back: {}", resp.text());
}

/// Every allowed sample rate and `emitRawAudioSamples: true` are accepted and echoed.
#[test]
fn start_call_accepts_each_sample_rate() {
    let relay = Relay::start(&[]);
    for (i, rate) in [8000, 16000, 24000, 48000].into_iter().enumerate() {
        let id = format!("rate-{rate}");
        let emit = i % 2 == 0;
        let body = json!({"sessionId": id, "accessToken": "t", "sampleRate": rate, "emitRawAudioSamples": emit});
        let data = assert_success(&relay.post("/start-call", &body), "Call started successfully");
        assert_eq!(data["config"], json!({"accessToken": "***", "sampleRate": rate, "emitRawAudioSamples": emit}));
        assert_eq!(data["sessionId"], id.as_str());
    }
}

/// Ids of 1 and 128 characters from the whole allowed set are accepted.
#[test]
fn start_call_accepts_boundary_ids() {
    let relay = Relay::start(&[]);
    let long = "a".repeat(128);
    for id in ["x", "CA0123456789abcdef.x:y_z-Q", long.as_str()] {
        let data = assert_success(&relay.start_call(id, "t"), "Call started successfully");
        assert_eq!(data["sessionId"], id);
    }
    assert_eq!(relay.active_sessions(), 3);
}

/// Malformed bodies and invalid fields get a 400 error envelope and create no session.
#[test]
fn start_call_rejects_invalid_bodies() {
    let relay = Relay::start(&[]);
    let long = "a".repeat(129);
    let bodies: Vec<String> = vec![
        "".into(),
        "not json".into(),
        "{\"sessionId\":".into(),
        "[]".into(),
        "\"sess\"".into(),
        "null".into(),
        json!({"accessToken": "t"}).to_string(),
        json!({"sessionId": 5, "accessToken": "t"}).to_string(),
        json!({"sessionId": null, "accessToken": "t"}).to_string(),
        json!({"sessionId": "", "accessToken": "t"}).to_string(),
        json!({"sessionId": long, "accessToken": "t"}).to_string(),
        json!({"sessionId": "a b", "accessToken": "t"}).to_string(),
        json!({"sessionId": "a/b", "accessToken": "t"}).to_string(),
        json!({"sessionId": "é", "accessToken": "t"}).to_string(),
        json!({"sessionId": "ok-id"}).to_string(),
        json!({"sessionId": "ok-id", "accessToken": ""}).to_string(),
        json!({"sessionId": "ok-id", "accessToken": 7}).to_string(),
        json!({"sessionId": "ok-id", "accessToken": "t", "sampleRate": 44100}).to_string(),
        json!({"sessionId": "ok-id", "accessToken": "t", "sampleRate": "16000"}).to_string(),
        json!({"sessionId": "ok-id", "accessToken": "t", "sampleRate": 16000.5}).to_string(),
        json!({"sessionId": "ok-id", "accessToken": "t", "sampleRate": 0}).to_string(),
        json!({"sessionId": "ok-id", "accessToken": "t", "sampleRate": -16000}).to_string(),
        json!({"sessionId": "ok-id", "accessToken": "t", "emitRawAudioSamples": "true"}).to_string(),
        json!({"sessionId": "ok-id", "accessToken": "t", "emitRawAudioSamples": 1}).to_string(),
    ];
    for body in &bodies {
        let resp = relay.request("POST", "/start-call", &[("Content-Type", "application/json")], Some(body));
        assert_eq!(resp.status, 400, "body {body:?} → {} {}", resp.status, resp.text());
        assert_error(&resp, 400);
    }
    assert_eq!(relay.active_sessions(), 0, "no invalid request created a session");
    assert_eq!(relay.get("/call-status?sessionId=ok-id").status, 404);
}

/// Starting an active session again is 409, tagged with the owner core, and keeps the first.
#[test]
fn start_call_twice_is_conflict() {
    let relay = Relay::start(&[]);
    assert_success(&relay.start_call("dup", "first"), "Call started successfully");
    let resp = relay.start_call("dup", "second");
    assert_error(&resp, 409);
    assert_eq!(resp.core(), Some(owner("dup", 2)), "409 carries x-relay-core");
    assert_eq!(relay.active_sessions(), 1);
    // The first session's token still opens its event socket: the second start changed nothing.
    let _ws = relay.observe("dup", "first");
}

/// `/stop-call` ends the session: its status is 404 afterwards, and a second stop is 404.
#[test]
fn stop_call_ends_the_session() {
    let relay = Relay::start(&[]);
    assert_success(&relay.start_call("s", "t"), "Call started successfully");
    let data = assert_success(&relay.stop_call("s"), "Call stopped successfully");
    assert_eq!(data, json!({"sessionId": "s"}));
    assert_error(&relay.get("/call-status?sessionId=s"), 404);
    assert_error(&relay.stop_call("s"), 404);
    assert_eq!(relay.active_sessions(), 0);
}

/// A stopped session id can be started again.
#[test]
fn stopped_session_can_restart() {
    let relay = Relay::start(&[]);
    for _ in 0..3 {
        assert_success(&relay.start_call("again", "t"), "Call started successfully");
        assert_success(&relay.stop_call("again"), "Call stopped successfully");
    }
    assert_eq!(relay.active_sessions(), 0);
}

/// `/mute` and `/unmute` answer the new microphone state, and `/track-status` follows it.
#[test]
fn mute_and_unmute_follow_track_status() {
    let relay = Relay::start(&[]);
    assert_success(&relay.start_call("m", "t"), "Call started successfully");
    let tracks = assert_success(&relay.get("/track-status?sessionId=m"), "Track status retrieved");
    assert_eq!(tracks, json!({"microphoneEnabled": true, "publishedTracks": [], "totalTracks": 0}));

    let data = assert_success(&relay.post("/mute", &json!({"sessionId": "m"})), "Microphone muted");
    assert_eq!(data, json!({"sessionId": "m", "microphoneEnabled": false}));
    let tracks = assert_success(&relay.get("/track-status?sessionId=m"), "Track status retrieved");
    assert_eq!(tracks["microphoneEnabled"], false);

    let data = assert_success(&relay.post("/unmute", &json!({"sessionId": "m"})), "Microphone unmuted");
    assert_eq!(data, json!({"sessionId": "m", "microphoneEnabled": true}));
    let tracks = assert_success(&relay.get("/track-status?sessionId=m"), "Track status retrieved");
    assert_eq!(tracks["microphoneEnabled"], true);
}

/// `/send-custom-stream` answers the stream id, defaults kind to audio and validates its fields.
#[test]
fn send_custom_stream_validates() {
    let relay = Relay::start(&[]);
    assert_success(&relay.start_call("c", "t"), "Call started successfully");
    let data = assert_success(
        &relay.post("/send-custom-stream", &json!({"sessionId": "c", "streamId": "hold-music", "kind": "audio"})),
        "Custom stream sent",
    );
    assert_eq!(data, json!({"sessionId": "c", "streamId": "hold-music"}));
    let data = assert_success(
        &relay.post("/send-custom-stream", &json!({"sessionId": "c", "streamId": "s2"})),
        "Custom stream sent",
    );
    assert_eq!(data, json!({"sessionId": "c", "streamId": "s2"}));

    for body in [
        json!({"sessionId": "c", "streamId": "s3", "kind": "video"}),
        json!({"sessionId": "c", "streamId": "s3", "kind": 1}),
        json!({"sessionId": "c"}),
        json!({"sessionId": "c", "streamId": ""}),
        json!({"sessionId": "c", "streamId": "bad id"}),
        json!({"sessionId": "c", "streamId": "x".repeat(129)}),
        json!({"sessionId": "c", "streamId": 3}),
        json!({"streamId": "s3"}),
    ] {
        let resp = relay.post("/send-custom-stream", &body);
        assert_eq!(resp.status, 400, "{body} → {}", resp.text());
        assert_error(&resp, 400);
    }
    assert_error(&relay.post("/send-custom-stream", &json!({"sessionId": "nobody", "streamId": "s"})), 404);
}

/// `/resume-microphone` answers the session id, with or without a custom stream before it.
#[test]
fn resume_microphone_answers() {
    let relay = Relay::start(&[]);
    assert_success(&relay.start_call("r", "t"), "Call started successfully");
    let data = assert_success(&relay.post("/resume-microphone", &json!({"sessionId": "r"})), "Microphone resumed");
    assert_eq!(data, json!({"sessionId": "r"}));
    assert_success(
        &relay.post("/send-custom-stream", &json!({"sessionId": "r", "streamId": "x"})),
        "Custom stream sent",
    );
    let data = assert_success(&relay.post("/resume-microphone", &json!({"sessionId": "r"})), "Microphone resumed");
    assert_eq!(data, json!({"sessionId": "r"}));
}

/// `/call-status` reports an active session without media, and validates its query.
#[test]
fn call_status_reports_and_validates() {
    let relay = Relay::start(&[]);
    assert_success(&relay.start_call("cs", "t"), "Call started successfully");
    let data = assert_success(&relay.get("/call-status?sessionId=cs"), "Call status retrieved");
    assert_eq!(
        data,
        json!({"sessionId": "cs", "isActive": true, "isConnected": false, "isAgentTalking": false, "hasWebSocket": false})
    );
    for path in ["/call-status", "/call-status?sessionId=", "/call-status?sessionId=a%20b", "/call-status?other=cs"] {
        assert_error(&relay.get(path), 400);
    }
    for path in ["/track-status", "/track-status?sessionId=", "/track-status?sessionId=a%2Fb"] {
        assert_error(&relay.get(path), 400);
    }
    assert_error(&relay.get("/call-status?sessionId=unknown"), 404);
    assert_error(&relay.get("/track-status?sessionId=unknown"), 404);
}

/// Every command on an unknown session is a 404 envelope carrying the owner core.
#[test]
fn unknown_session_is_404_everywhere() {
    let relay = Relay::start(&[]);
    let id = "ghost-1";
    let core = owner(id, 2);
    let posts: [(&str, Value); 5] = [
        ("/stop-call", json!({"sessionId": id})),
        ("/mute", json!({"sessionId": id})),
        ("/unmute", json!({"sessionId": id})),
        ("/send-custom-stream", json!({"sessionId": id, "streamId": "s"})),
        ("/resume-microphone", json!({"sessionId": id})),
    ];
    for (path, body) in &posts {
        let resp = relay.post(path, body);
        assert_error(&resp, 404);
        assert_eq!(resp.core(), Some(core), "{path} 404 carries x-relay-core");
    }
    for path in ["/call-status", "/track-status"] {
        let resp = relay.get(&format!("{path}?sessionId={id}"));
        assert_error(&resp, 404);
        assert_eq!(resp.core(), Some(core), "{path} 404 carries x-relay-core");
    }
}

/// A core at `--sessions-per-core` answers 503 for its ids only, until a session ends.
#[test]
fn full_core_answers_503() {
    let relay = Relay::start(&["--sessions-per-core", "2"]);
    let on0 = ids_on_core("full", 0, 2, 3);
    let on1 = ids_on_core("full", 1, 2, 1);
    assert_success(&relay.start_call(&on0[0], "t"), "Call started successfully");
    assert_success(&relay.start_call(&on0[1], "t"), "Call started successfully");
    let resp = relay.start_call(&on0[2], "t");
    assert_error(&resp, 503);
    assert_eq!(resp.core(), Some(0));
    assert_success(&relay.start_call(&on1[0], "t"), "Call started successfully");
    assert_success(&relay.stop_call(&on0[0]), "Call stopped successfully");
    assert_success(&relay.start_call(&on0[2], "t"), "Call started successfully");
    assert_eq!(relay.active_sessions(), 3);
    assert_eq!(relay.core_sessions(), vec![2, 1]);
}

/// Bodies are read as JSON, not as text: unknown fields, whitespace and escapes are fine.
#[test]
fn start_call_reads_json_leniently() {
    let relay = Relay::start(&[]);
    let bodies = [
        ("extra", r#"{"sessionId":"extra","accessToken":"t","agentId":"a-1","metadata":{"k":[1,2]}}"#),
        ("spaced", "\r\n  {\n\t\"sessionId\" : \"spaced\" ,\"accessToken\":\"t\"}\n\n"),
        ("abc", r#"{"sessionId":"\u0061bc","accessToken":"\u0074"}"#),
    ];
    for (id, body) in bodies {
        let resp = relay.request("POST", "/start-call", &[("Content-Type", "application/json")], Some(body));
        let data = assert_success(&resp, "Call started successfully");
        assert_eq!(data["sessionId"], id, "{body}");
    }
    // The escaped token is the token: it opens the event socket.
    let _ws = relay.observe("abc", "t");
}

/// Ids in query strings are percent-decoded, as browsers' `URLSearchParams` encode `:`.
#[test]
fn query_ids_are_percent_decoded() {
    let relay = Relay::start(&[]);
    assert_success(&relay.start_call("room:1.a_b-c", "t"), "Call started successfully");
    let data = assert_success(&relay.get("/call-status?sessionId=room%3A1.a_b-c"), "Call status retrieved");
    assert_eq!(data["sessionId"], "room:1.a_b-c");
    let data = assert_success(&relay.get("/call-status?foo=1&sessionId=room%3a1.a_b-c&bar"), "Call status retrieved");
    assert_eq!(data["sessionId"], "room:1.a_b-c");
    assert_success(&relay.get("/track-status?sessionId=room%3A1.a_b-c"), "Track status retrieved");
}

/// `/health/detailed` reports the database down when the data directory becomes unusable, and
/// `/health` keeps answering 200 for load balancers.
#[test]
fn detailed_health_sees_a_broken_data_dir() {
    let parent = relay_tests::temp_dir("broken");
    let dir = parent.join("data");
    let relay = Relay::start(&["--data-dir", dir.to_str().expect("utf-8 path")]);
    assert_eq!(relay.detailed()["status"], "healthy");
    std::fs::remove_dir_all(&dir).expect("remove the data dir");
    // The probe runs in the background, once a second.
    let resp = relay_tests::poll_until("the probe to see the broken data dir", || {
        let r = relay.get("/health/detailed");
        (r.json()["status"] != "healthy").then_some(r)
    });
    assert_json_type(&resp);
    let v = resp.json();
    assert_ne!(v["status"], "healthy", "{v}");
    assert_ne!(v["services"]["database"]["status"], "up", "{v}");
    assert_eq!(resp.status == 503, v["status"] == "unhealthy", "503 exactly when unhealthy: {} {v}", resp.status);
    assert_eq!(relay.get("/health").status, 200);
    let _ = std::fs::remove_dir_all(&parent);
}
