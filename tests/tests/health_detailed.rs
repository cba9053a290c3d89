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

/// Configured upstreams are checked for reachability: one that answers is `up`, one that does
/// not is `down` and makes the relay `degraded` (still 200); Twilio shows as configured.
#[test]
fn upstreams_and_twilio_are_reported() {
    let listening = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let open = listening.local_addr().expect("addr");
    let closed = relay_tests::telephony::unused_port();
    let openai = format!("ws://{open}/v1/realtime");
    let agent = format!("ws://{closed}/bot");
    let mut args = vec!["--openai-url", openai.as_str(), "--agent-url", agent.as_str()];
    let twilio = relay_tests::twilio_rest::twilio_args("http://127.0.0.1:9");
    args.extend(twilio.iter().map(String::as_str));
    let relay = Relay::start(&args);
    let body = relay_tests::poll_until("both upstreams checked", || {
        let r = relay.request("GET", "/health/detailed", &[], None);
        let v = r.json();
        let done = v["services"]["openai"]["status"] != "unchecked" && v["services"]["agent"]["status"] != "unchecked";
        done.then_some((r.status, v))
    });
    let (status, v) = body;
    assert_eq!(v["services"]["openai"]["status"], "up", "{v}");
    assert_eq!(v["services"]["agent"]["status"], "down", "{v}");
    assert_eq!(v["services"]["llm"]["status"], "not_configured", "{v}");
    assert_eq!(v["services"]["twilio"]["status"], "configured", "{v}");
    assert_eq!(v["status"], "degraded", "{v}");
    assert_eq!(status, 200, "degraded is still serving");
    drop(listening);
}
