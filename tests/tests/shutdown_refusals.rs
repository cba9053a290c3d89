//! Graceful shutdown takes on no new work: requests that were already on the wire when SIGTERM
//! arrived, but complete only afterwards, are refused with 503 instead of starting a session or
//! opening an event socket that the exiting relay would then abandon.

use std::net::TcpStream;
use std::time::Duration;

use relay_tests::{assert_error, assert_success, poll_until, Conn, Relay, TIMEOUT};
use serde_json::json;

/// After shutdown began, a `/start-call` and a `/ws` upgrade finished on old connections get 503.
#[test]
fn requests_finished_after_sigterm_are_refused() {
    let mut relay = Relay::start(&["--cores", "1", "--shutdown-grace", "3s"]);
    assert_success(&relay.start_call("live", "t"), "Call started successfully");

    // A start whose head is sent but whose body is not, and an upgrade for the live session with
    // half its head sent.
    let body = json!({"sessionId": "late", "accessToken": "t"}).to_string();
    let mut start = Conn::open(relay.addr());
    let head = format!(
        "POST /start-call HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    start.write_raw(head.as_bytes()).expect("write the start head");
    let mut upgrade = Conn::open(relay.addr());
    upgrade
        .write_raw(b"GET /ws?sessionId=live HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\nUpgrade: websocket\r\n")
        .expect("write half the upgrade head");

    // Both connections must be the relay's (accepted), not just queued in the kernel, before the
    // signal: the two above plus the polling request's own.
    poll_until("both half-sent connections to be accepted", || {
        let d = relay.detailed();
        (d["services"]["server"]["cores"][0]["connections"].as_u64() >= Some(3)).then_some(())
    });

    relay.signal(libc::SIGTERM);
    // Shutdown has begun once the listener is gone.
    poll_until("the relay to refuse new connections", || {
        TcpStream::connect_timeout(&relay.addr(), Duration::from_secs(1)).is_err().then_some(())
    });

    start.write_raw(body.as_bytes()).expect("write the start body");
    let resp = start.read_response();
    assert_error(&resp, 503);

    upgrade
        .write_raw(
            b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
        .expect("write the rest of the upgrade head");
    let resp = upgrade.read_response();
    assert_ne!(resp.status, 101, "no event socket opens during shutdown");
    assert_error(&resp, 503);

    let status = relay.wait_exit(TIMEOUT);
    assert_eq!(status.code(), Some(0), "exit status {status:?}");
}
