//! `/health/detailed` reports the data directory's health without flapping: cores answering at the
//! same moment never disturb each other's view of a healthy directory.

use std::thread;

use relay_tests::{Conn, Relay};

const THREADS: usize = 8;
const REQUESTS: usize = 100;

/// 8 clients × 100 concurrent `/health/detailed` requests on two cores all get 200 `healthy`.
#[test]
fn concurrent_detailed_health_never_flaps() {
    let relay = Relay::start(&["--cores", "2"]);
    let addr = relay.addr();
    let clients: Vec<_> = (0..THREADS)
        .map(|_| {
            thread::spawn(move || {
                let mut bad = Vec::new();
                for _ in 0..REQUESTS {
                    // A new connection each time, so both cores serve the requests.
                    let resp = Conn::open(addr).request("GET", "/health/detailed", &[("Connection", "close")], None);
                    let status = resp.json()["status"].clone();
                    if resp.status != 200 || status != "healthy" {
                        bad.push(format!("{} {status}", resp.status));
                    }
                }
                bad
            })
        })
        .collect();
    let bad: Vec<String> = clients.into_iter().flat_map(|c| c.join().expect("client thread")).collect();
    assert!(bad.is_empty(), "{} of {} answers were not 200 healthy: {:?}", bad.len(), THREADS * REQUESTS, bad);
}
