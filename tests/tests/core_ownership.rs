//! Sessions live on `fnv1a(id) % cores`: the `x-relay-core` header and per-core counts say so,
//! and event sockets work whichever core accepted their TCP connection.

use std::thread;

use relay_tests::{assert_success, ids_on_core, owner, Relay, Ws};
use serde_json::json;

/// Every response about a session names the hash-predicted owner core in `x-relay-core`.
#[test]
fn x_relay_core_is_the_hash_owner() {
    let relay = Relay::start(&[]);
    let ids: Vec<String> = (0..24).map(|i| format!("own-{i}")).collect();
    assert!(ids.iter().any(|id| owner(id, 2) == 0) && ids.iter().any(|id| owner(id, 2) == 1), "both cores covered");
    for id in &ids {
        let want = Some(owner(id, 2));
        let body = json!({"sessionId": id});
        let responses = [
            ("start", relay.start_call(id, "t")),
            ("conflict", relay.start_call(id, "t")),
            ("mute", relay.post("/mute", &body)),
            ("unmute", relay.post("/unmute", &body)),
            ("custom", relay.post("/send-custom-stream", &json!({"sessionId": id, "streamId": "s"}))),
            ("resume", relay.post("/resume-microphone", &body)),
            ("status", relay.get(&format!("/call-status?sessionId={id}"))),
            ("tracks", relay.get(&format!("/track-status?sessionId={id}"))),
            ("stop", relay.stop_call(id)),
            ("missing", relay.stop_call(id)),
        ];
        for (what, resp) in responses {
            assert_eq!(resp.core(), want, "{what} for {id}: status {} headers {:?}", resp.status, resp.headers);
        }
    }
}

/// With three cores the owner is the hash modulo three, and per-core counts match the prediction.
#[test]
fn three_cores_use_modulo_three() {
    let relay = Relay::start(&["--cores", "3"]);
    let mut predicted = vec![0u64; 3];
    for i in 0..30 {
        let id = format!("tri-{i}");
        let resp = relay.start_call(&id, "t");
        assert_success(&resp, "Call started successfully");
        assert_eq!(resp.core(), Some(owner(&id, 3)), "{id}");
        predicted[owner(&id, 3)] += 1;
    }
    assert!(predicted.iter().all(|&n| n > 0), "every core owns some of the ids: {predicted:?}");
    assert_eq!(relay.core_sessions(), predicted);
}

/// `/health/detailed` per-core session counts equal the hash prediction and sum to the total.
#[test]
fn detailed_counts_match_the_hash() {
    let relay = Relay::start(&[]);
    let mut predicted = vec![0u64; 2];
    for i in 0..50 {
        let id = format!("count-{i}");
        assert_success(&relay.start_call(&id, "t"), "Call started successfully");
        predicted[owner(&id, 2)] += 1;
    }
    assert_eq!(relay.core_sessions(), predicted);
    let detailed = relay.detailed();
    assert_eq!(detailed["services"]["server"]["activeSessions"], 50);
    assert_eq!(relay.active_sessions(), 50);
}

/// Twenty sockets per session, for sessions on each core, all get every event and the final close.
#[test]
fn sockets_work_from_any_accepting_core() {
    let relay = Relay::start(&[]);
    let mut ids = ids_on_core("fan", 0, 2, 2);
    ids.extend(ids_on_core("fan", 1, 2, 2));
    for id in &ids {
        assert_success(&relay.start_call(id, &format!("tok-{id}")), "Call started successfully");
    }
    // Each socket is a new TCP connection, so the kernel spreads them over both cores' listeners;
    // the relay must move each one to its session's owner.
    let mut sockets: Vec<(String, Ws)> = Vec::new();
    for id in &ids {
        for _ in 0..20 {
            sockets.push((id.clone(), relay.observe(id, &format!("tok-{id}"))));
        }
    }
    let detailed = relay.detailed();
    let cores = detailed["services"]["server"]["cores"].as_array().expect("cores").clone();
    assert_eq!(cores[0]["observers"], 40, "observers counted on their owner core: {detailed}");
    assert_eq!(cores[1]["observers"], 40, "observers counted on their owner core: {detailed}");
    for id in &ids {
        assert_success(&relay.post("/mute", &json!({"sessionId": id})), "Microphone muted");
        assert_success(&relay.stop_call(id), "Call stopped successfully");
    }
    let handles: Vec<_> = sockets
        .into_iter()
        .map(|(id, mut ws)| {
            thread::spawn(move || {
                assert_eq!(ws.expect_event("update"), json!({"microphoneEnabled": false}), "{id}");
                assert_eq!(ws.expect_event("call_ended"), json!({"sessionId": id, "reason": "stopped"}));
                assert_eq!(ws.expect_close(), Some(1000), "{id}");
            })
        })
        .collect();
    for h in handles {
        h.join().expect("every socket saw its events");
    }
}

/// Ping messages are answered on sockets of sessions owned by each core.
#[test]
fn ping_works_on_every_core() {
    let relay = Relay::start(&[]);
    for core in 0..2 {
        for id in ids_on_core("pingc", core, 2, 2) {
            assert_success(&relay.start_call(&id, "t"), "Call started successfully");
            for _ in 0..5 {
                let mut ws = relay.observe(&id, "t");
                ws.send_json(&json!({"type": "ping"}));
                assert_eq!(ws.recv_json()["type"], "pong", "{id} on core {core}");
            }
        }
    }
}

/// With one core everything lives on core 0, and event sockets still work.
#[test]
fn one_core_owns_everything() {
    let relay = Relay::start(&["--cores", "1"]);
    for i in 0..10 {
        let id = format!("solo-{i}");
        assert_eq!(relay.start_call(&id, "t").core(), Some(0));
    }
    assert_eq!(relay.core_sessions(), vec![10]);
    let mut ws = relay.observe("solo-3", "t");
    assert_success(&relay.stop_call("solo-3"), "Call stopped successfully");
    assert_eq!(ws.expect_event("call_ended")["reason"], "stopped");
}

/// Frames a client sends in the same write as its upgrade request are kept, whichever core
/// accepted the connection: they travel with the socket to the session's owner core.
#[test]
fn frames_behind_the_upgrade_request_are_not_lost() {
    let relay = Relay::start(&[]);
    let ping = relay_tests::encode_frame(true, 0x1, br#"{"type":"ping"}"#, Some([9, 8, 7, 6]));
    for core in 0..2 {
        let id = &ids_on_core("early", core, 2, 1)[0];
        assert_success(&relay.start_call(id, "t"), "Call started successfully");
        // Connections land on cores by the kernel's hash of their ports: with ten, both the local
        // path and the handoff path are taken with overwhelming likelihood.
        for _ in 0..10 {
            let path = format!("/ws?sessionId={id}&accessToken=t");
            let mut ws = relay_tests::RawWs::connect_with_early(relay.addr(), &path, &[], &ping)
                .unwrap_or_else(|r| panic!("upgrade refused: {}", r.status));
            let mut texts = Vec::new();
            while texts.len() < 2 {
                let frame = ws.read_frame().expect("the socket stays open");
                if frame.opcode == 0x1 {
                    let v: serde_json::Value = serde_json::from_slice(&frame.payload).expect("json");
                    texts.push(v["type"].as_str().unwrap_or_default().to_owned());
                }
            }
            assert_eq!(texts, ["connection_established", "pong"], "greeting, then the early ping's pong");
        }
    }
}
