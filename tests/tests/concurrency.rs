//! Many clients at once: counts stay exact, and racing requests for one id have one winner.

use std::sync::{Arc, Barrier};
use std::thread;

use relay_tests::{owner, Relay};
use serde_json::json;

const SESSIONS: usize = 1000;
const CLIENTS: usize = 16;

/// 1000 sessions started and then stopped by 16 keep-alive clients leave exact counts each time.
#[test]
fn thousand_sessions_keep_exact_counts() {
    let relay = Relay::start(&[]);
    let ids: Arc<Vec<String>> = Arc::new((0..SESSIONS).map(|i| format!("conc-{i:04}")).collect());

    let run = |path: &'static str, expect_message: &'static str| {
        let handles: Vec<_> = (0..CLIENTS)
            .map(|client| {
                let ids = ids.clone();
                let mut conn = relay.conn();
                thread::spawn(move || {
                    for id in ids.iter().skip(client).step_by(CLIENTS) {
                        let body = if path == "/start-call" {
                            json!({"sessionId": id, "accessToken": "t"})
                        } else {
                            json!({"sessionId": id})
                        };
                        let resp = conn.post(path, &body);
                        assert_eq!(resp.status, 200, "{path} {id}: {}", resp.text());
                        assert_eq!(resp.json()["message"], expect_message);
                        assert_eq!(resp.core(), Some(owner(id, 2)), "{id}");
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().expect("client thread");
        }
    };

    run("/start-call", "Call started successfully");
    assert_eq!(relay.active_sessions(), SESSIONS as u64);
    let mut predicted = vec![0u64; 2];
    for id in ids.iter() {
        predicted[owner(id, 2)] += 1;
    }
    assert_eq!(relay.core_sessions(), predicted);

    run("/stop-call", "Call stopped successfully");
    assert_eq!(relay.active_sessions(), 0);
    assert_eq!(relay.core_sessions(), vec![0, 0]);
}

/// Half the sessions stopped concurrently with new starts leaves exactly the survivors active.
#[test]
fn mixed_start_and_stop_leave_the_difference() {
    let relay = Relay::start(&[]);
    for i in 0..200 {
        assert_eq!(relay.start_call(&format!("old-{i}"), "t").status, 200);
    }
    let handles: Vec<_> = (0..8)
        .map(|client| {
            let mut conn = relay.conn();
            thread::spawn(move || {
                for i in (client..200).step_by(8) {
                    if i % 2 == 0 {
                        assert_eq!(conn.post("/stop-call", &json!({"sessionId": format!("old-{i}")})).status, 200);
                    }
                    let start = conn.post("/start-call", &json!({"sessionId": format!("new-{i}"), "accessToken": "t"}));
                    assert_eq!(start.status, 200);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("client thread");
    }
    assert_eq!(relay.active_sessions(), 300);
    let mut predicted = vec![0u64; 2];
    for i in 0..200 {
        if i % 2 == 1 {
            predicted[owner(&format!("old-{i}"), 2)] += 1;
        }
        predicted[owner(&format!("new-{i}"), 2)] += 1;
    }
    assert_eq!(relay.core_sessions(), predicted);
}

/// Eight clients racing to start the same id: exactly one 200, the rest 409.
#[test]
fn racing_starts_have_one_winner() {
    let relay = Relay::start(&[]);
    for round in 0..10 {
        let id = format!("race-{round}");
        let barrier = Arc::new(Barrier::new(8));
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let mut conn = relay.conn();
                let barrier = barrier.clone();
                let id = id.clone();
                thread::spawn(move || {
                    barrier.wait();
                    conn.post("/start-call", &json!({"sessionId": id, "accessToken": "t"})).status
                })
            })
            .collect();
        let mut statuses: Vec<u16> = handles.into_iter().map(|h| h.join().expect("client thread")).collect();
        statuses.sort_unstable();
        assert_eq!(statuses, vec![200, 409, 409, 409, 409, 409, 409, 409], "{id}");
    }
    assert_eq!(relay.active_sessions(), 10);
}

/// Under concurrent control calls, every socket of a session sees every event, in the same order.
#[test]
fn all_sockets_of_a_session_see_one_order() {
    const SOCKETS: usize = 5;
    const WRITERS: usize = 4;
    const TOGGLES: usize = 25;
    let relay = Relay::start(&[]);
    let mut ids = relay_tests::ids_on_core("order", 0, 2, 2);
    ids.extend(relay_tests::ids_on_core("order", 1, 2, 2));
    let mut readers = Vec::new();
    for id in &ids {
        assert_eq!(relay.start_call(id, "t").status, 200);
        for _ in 0..SOCKETS {
            let mut ws = relay.observe(id, "t");
            let id = id.clone();
            readers.push(thread::spawn(move || {
                let mut seen = Vec::new();
                for _ in 0..WRITERS * TOGGLES {
                    seen.push(ws.expect_event("update")["microphoneEnabled"].as_bool().expect("bool"));
                }
                assert_eq!(ws.expect_event("call_ended")["reason"], "stopped");
                assert_eq!(ws.expect_close(), Some(1000));
                (id, seen)
            }));
        }
    }
    let writers: Vec<_> = ids
        .iter()
        .flat_map(|id| (0..WRITERS).map(move |w| (id.clone(), w)))
        .map(|(id, w)| {
            let mut conn = relay.conn();
            thread::spawn(move || {
                for i in 0..TOGGLES {
                    let path = if (i + w) % 2 == 0 { "/mute" } else { "/unmute" };
                    assert_eq!(conn.post(path, &json!({"sessionId": id})).status, 200);
                }
            })
        })
        .collect();
    for w in writers {
        w.join().expect("writer thread");
    }
    let mut final_state = std::collections::HashMap::new();
    for id in &ids {
        let tracks = relay.get(&format!("/track-status?sessionId={id}")).json();
        final_state.insert(id.clone(), tracks["data"]["microphoneEnabled"].as_bool().expect("bool"));
        assert_eq!(relay.stop_call(id).status, 200);
    }
    let mut by_session: std::collections::HashMap<String, Vec<bool>> = std::collections::HashMap::new();
    for r in readers {
        let (id, seen) = r.join().expect("reader thread");
        assert_eq!(seen.last(), final_state.get(&id), "{id}: the last event is the final state");
        match by_session.get(&id) {
            Some(first) => assert_eq!(&seen, first, "{id}: sockets disagree on the order of events"),
            None => {
                by_session.insert(id, seen);
            }
        }
    }
    assert_eq!(by_session.len(), ids.len());
}
