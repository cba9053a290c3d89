//! `--pending-sessions-per-core` counts the ids that have sockets waiting for a start right now,
//! not every id that ever waited: a socket that waited and left frees its place at once.

use relay_tests::{poll_until, Relay, Ws};

/// Opens a pre-start socket for `id` (any token), asserting the 101 and the greeting.
fn wait_for(relay: &Relay, id: &str) -> Ws {
    let mut ws = relay
        .ws(&format!("/ws?sessionId={id}&accessToken=x"), &[])
        .unwrap_or_else(|status| panic!("pre-start socket for {id} refused with {status}"));
    let greeting = ws.recv_json();
    assert_eq!(greeting["type"], "connection_established", "greeting for {id}: {greeting}");
    ws
}

/// Twenty waits that closed cleanly do not use up a limit of five; five live waits still do.
#[test]
fn closed_waits_free_their_pending_places() {
    let relay = Relay::start(&["--cores", "1", "--pending-sessions-per-core", "5"]);
    for i in 0..20 {
        let mut ws = wait_for(&relay, &format!("junk-{i}"));
        ws.close();
        assert_eq!(ws.expect_close(), Some(1000), "junk-{i}: the relay answers our close");
    }
    poll_until("every waiting socket to be gone", || {
        let d = relay.detailed();
        (d["services"]["server"]["cores"][0]["observers"].as_u64() == Some(0)).then_some(())
    });

    // Places are free again, and the limit still holds for waits that are live.
    let live: Vec<Ws> = (0..5).map(|i| wait_for(&relay, &format!("fresh-{i}"))).collect();
    assert_eq!(
        relay.ws("/ws?sessionId=fresh-5&accessToken=x", &[]).err(),
        Some(503),
        "a sixth live wait is over the limit"
    );
    drop(live);
}
