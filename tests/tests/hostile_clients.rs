//! Misbehaving clients cost only themselves: slow heads time out with 408, idle connections are
//! closed, garbage is refused, and everyone else keeps being served meanwhile.

use std::thread;

use relay_tests::{assert_success, encode_frame, poll_until, Conn, RawWs, Relay};
use serde_json::json;

/// Half a request head then silence gets 408 after the header timeout, and the connection closes.
#[test]
fn half_head_gets_408() {
    let relay = Relay::start(&["--header-timeout", "1s"]);
    let mut slow = Conn::open(relay.addr());
    slow.write_raw(b"GET /health HTTP/1.1\r\nHost: x\r\n").expect("write half a head");
    // Meanwhile other clients are served.
    for i in 0..5 {
        assert_success(&relay.start_call(&format!("meanwhile-{i}"), "t"), "Call started successfully");
    }
    let resp = slow.read_response();
    assert_eq!(resp.status, 408, "{}", resp.text());
    assert!(slow.closed_by_server(), "closed after the 408");
}

/// A body that never completes gets 408 after the header timeout too.
#[test]
fn incomplete_body_gets_408() {
    let relay = Relay::start(&["--header-timeout", "1s"]);
    let mut slow = Conn::open(relay.addr());
    slow.write_raw(b"POST /start-call HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{\"sessionId\"").expect("write");
    assert_eq!(slow.read_response().status, 408);
    assert!(slow.closed_by_server());
    assert_eq!(relay.active_sessions(), 0);
}

/// A keep-alive connection left silent is closed after the idle timeout, without a response.
#[test]
fn idle_keep_alive_is_closed() {
    let relay = Relay::start(&["--idle-timeout", "1s"]);
    let mut conn = Conn::open(relay.addr());
    assert_eq!(conn.request("GET", "/health", &[], None).status, 200);
    assert!(conn.closed_by_server(), "idle connection closed (nothing sent, EOF within the read timeout)");
    // A connection that never sent a byte is closed too.
    let mut silent = Conn::open(relay.addr());
    assert!(silent.closed_by_server(), "silent connection closed");
}

/// A client that sends a byte at a time keeps no one else waiting, and is itself served.
#[test]
fn trickling_client_does_not_block_others() {
    let relay = Relay::start(&[]);
    let addr = relay.addr();
    let trickler = thread::spawn(move || {
        let mut conn = Conn::open(addr);
        for b in b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" {
            conn.write_raw(&[*b]).expect("write a byte");
        }
        conn.read_response().status
    });
    for i in 0..20 {
        assert_success(&relay.start_call(&format!("fast-{i}"), "t"), "Call started successfully");
    }
    assert_eq!(trickler.join().expect("trickler"), 200);
}

/// Many slow and garbage connections at once do not stop other clients or disturb sessions.
#[test]
fn garbage_and_slow_clients_do_not_disturb_others() {
    let relay = Relay::start(&["--header-timeout", "2s"]);
    assert_success(&relay.start_call("survivor", "t"), "Call started successfully");
    let mut ws = relay.observe("survivor", "t");
    let addr = relay.addr();

    let garbage: Vec<Vec<u8>> = vec![
        b"\x00\x01\x02\x03\xff\xfe\r\n\r\n".to_vec(),
        b"GET / HTTP/9.9\r\n\r\n".to_vec(),
        b"GET /health HTTP/1.1\r\nBad Header Line\r\n\r\n".to_vec(),
        b"POST /start-call HTTP/1.1\r\nContent-Length: -1\r\n\r\n".to_vec(),
        b"POST /start-call HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n".to_vec(),
        b"POST /start-call HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello".to_vec(),
        b"GET /ws?sessionId=survivor HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n".to_vec(),
        vec![b'A'; 20_000],
        b"POST /start-call HTTP/1.1\r\nContent-Length: 10\r\n\r\n\xff\xfe\xfd\xfc\xfb\xfa\xf9\xf8\xf7\xf6".to_vec(),
    ];
    let mut slow: Vec<Conn> = (0..30)
        .map(|_| {
            let mut c = Conn::open(addr);
            c.write_raw(b"GET /health HTTP/1.1\r\nX-Slow: ").expect("write partial head");
            c
        })
        .collect();
    let attackers: Vec<_> = garbage
        .into_iter()
        .map(|bytes| {
            thread::spawn(move || {
                let mut c = Conn::open(addr);
                let _ = c.write_raw(&bytes);
                // Whatever the relay answers, it must answer with a 4xx/5xx status or close.
                if let Ok(resp) = c.try_read_response() {
                    assert!(resp.status >= 400, "garbage got {}: {:?}", resp.status, String::from_utf8_lossy(&bytes));
                }
            })
        })
        .collect();
    for i in 0..30 {
        assert_success(&relay.start_call(&format!("busy-{i}"), "t"), "Call started successfully");
    }
    for a in attackers {
        a.join().expect("attacker thread");
    }
    assert_success(&relay.post("/mute", &json!({"sessionId": "survivor"})), "Microphone muted");
    assert_eq!(ws.expect_event("update"), json!({"microphoneEnabled": false}));
    for c in &mut slow {
        assert_eq!(c.read_response().status, 408);
    }
    assert_eq!(relay.active_sessions(), 31);
}

/// A client that disconnects mid-body or mid-upgrade leaves the relay and its sessions intact.
#[test]
fn abrupt_disconnects_are_harmless() {
    let relay = Relay::start(&[]);
    assert_success(&relay.start_call("stay", "t"), "Call started successfully");
    for _ in 0..20 {
        let mut c = Conn::open(relay.addr());
        let _ = c.write_raw(b"POST /start-call HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"sessionId\":");
        drop(c);
        let mut c = Conn::open(relay.addr());
        let _ = c.write_raw(b"GET /ws?sessionId=stay&accessToken=t HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n");
        drop(c);
    }
    assert_eq!(relay.active_sessions(), 1);
    let data = assert_success(&relay.get("/call-status?sessionId=stay"), "Call status retrieved");
    assert_eq!(data["isActive"], true);
}

/// An event socket dropped without a closing handshake is detached.
#[test]
fn dropped_socket_is_detached() {
    let relay = Relay::start(&[]);
    assert_success(&relay.start_call("drop", "t"), "Call started successfully");
    let ws = relay.observe("drop", "t");
    ws.abort();
    poll_until("hasWebSocket to become false", || {
        let data = assert_success(&relay.get("/call-status?sessionId=drop"), "Call status retrieved");
        (data["hasWebSocket"] == false).then_some(())
    });
}

/// An event socket whose client never reads does not stall events to the session's other sockets.
#[test]
fn non_reading_socket_does_not_stall_others() {
    let relay = Relay::start(&[]);
    assert_success(&relay.start_call("stall", "t"), "Call started successfully");
    let mut stuck =
        RawWs::connect(relay.addr(), "/ws?sessionId=stall", &[("Authorization", "Bearer t")]).expect("upgrade");
    let mut good = relay.observe("stall", "t");
    // Flood: each ping asks for a pong the stuck client never reads.
    let ping = encode_frame(true, 1, b"{\"type\":\"ping\"}", Some([1, 2, 3, 4]));
    let flood: Vec<u8> = ping.iter().copied().cycle().take(ping.len() * 20_000).collect();
    let _ = stuck.send_raw(&flood);
    for i in 0..50 {
        let path = if i % 2 == 0 { "/mute" } else { "/unmute" };
        assert_eq!(relay.post(path, &json!({"sessionId": "stall"})).status, 200);
        assert_eq!(good.expect_event("update"), json!({"microphoneEnabled": i % 2 == 1}));
    }
}

/// Hundreds of idle connections do not block service, and the gauges return to zero once they and
/// every event socket are gone.
#[test]
fn connection_and_observer_gauges_return_to_zero() {
    let relay = Relay::start(&[]);
    assert_success(&relay.start_call("gauge", "t"), "Call started successfully");
    let idle: Vec<Conn> = (0..300).map(|_| Conn::open(relay.addr())).collect();
    let sockets: Vec<_> = (0..10).map(|_| relay.observe("gauge", "t")).collect();
    assert_success(&relay.get("/call-status?sessionId=gauge"), "Call status retrieved");
    let totals = |detailed: &serde_json::Value, field: &str| -> u64 {
        detailed["services"]["server"]["cores"]
            .as_array()
            .expect("cores")
            .iter()
            .map(|c| c[field].as_u64().expect("count"))
            .sum()
    };
    poll_until("300 idle connections to be counted", || {
        (totals(&relay.detailed(), "connections") >= 300).then_some(())
    });
    assert_eq!(totals(&relay.detailed(), "observers"), 10);
    drop(idle);
    for ws in sockets {
        ws.abort();
    }
    // Only the polling request's own connection remains.
    poll_until("connections and observers to drain", || {
        let d = relay.detailed();
        (totals(&d, "connections") <= 1 && totals(&d, "observers") == 0).then_some(())
    });
}

/// Seeded random bytes on many HTTP connections and after WebSocket handshakes never take the
/// relay down or disturb a session.
#[test]
fn random_bytes_cost_only_their_sender() {
    let relay = Relay::start(&["--header-timeout", "1s"]);
    assert_success(&relay.start_call("fuzz", "t"), "Call started successfully");
    let mut good = relay.observe("fuzz", "t");
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let prefixes: [&[u8]; 4] =
        [b"", b"GET /health HTTP/1.1\r\n", b"POST /start-call HTTP/1.1\r\nContent-Length: 20\r\n\r\n", b"GET /"];
    let mut conns = Vec::new();
    for i in 0..120 {
        let mut bytes = prefixes[i % prefixes.len()].to_vec();
        let n = (rng.next() % 3000) as usize;
        bytes.extend((0..n).map(|_| rng.next() as u8));
        let mut c = Conn::open(relay.addr());
        let _ = c.write_raw(&bytes);
        conns.push(c);
    }
    for i in 0..40 {
        let mut ws =
            RawWs::connect(relay.addr(), "/ws?sessionId=fuzz", &[("Authorization", "Bearer t")]).expect("upgrade");
        let n = 1 + (rng.next() % 2000) as usize;
        let mut bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
        if i % 2 == 0 {
            bytes[0] = 0x81; // text, FIN: the rest is a random length and mask
        }
        let _ = ws.send_raw(&bytes);
    }
    for i in 0..10 {
        assert_success(&relay.start_call(&format!("calm-{i}"), "t"), "Call started successfully");
    }
    assert_success(&relay.post("/mute", &json!({"sessionId": "fuzz"})), "Microphone muted");
    assert_eq!(good.expect_event("update"), json!({"microphoneEnabled": false}));
    for mut c in conns {
        // Each random connection is answered with an error status, or closed, or times out (408).
        if let Ok(resp) = c.try_read_response() {
            assert!(resp.status >= 400, "random bytes got {}", resp.status);
        }
    }
    assert_eq!(relay.active_sessions(), 11);
}

/// A small seeded PRNG, so failures replay exactly.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Thousands of idle sockets at once (the relay raises its open-file limit at start): service and
/// sessions go on, and everything drains when they go.
#[test]
fn thousands_of_idle_sockets() {
    let relay = Relay::start(&[]);
    assert_success(&relay.start_call("crowd", "t"), "Call started successfully");
    let idle: Vec<std::net::TcpStream> =
        (0..3000).map(|_| std::net::TcpStream::connect(relay.addr()).expect("connect")).collect();
    let mut events = relay.observe("crowd", "t");
    assert_success(&relay.post("/mute", &json!({ "sessionId": "crowd" })), "Microphone muted");
    let update = events.recv_json();
    assert_eq!(update["eventType"], "update", "{update}");
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", relay.pid())).expect("limits");
    let open_files = limits.lines().find(|l| l.starts_with("Max open files")).expect("a file limit").to_owned();
    let soft: u64 = open_files.split_whitespace().nth(3).and_then(|v| v.parse().ok()).unwrap_or(0);
    assert!(soft >= 3000, "the relay's soft limit holds the crowd: {open_files}");
    drop(idle);
    poll_until("the idle sockets to drain", || {
        let d = relay.detailed();
        let open: u64 =
            d["services"]["server"]["cores"].as_array()?.iter().map(|c| c["connections"].as_u64().unwrap_or(0)).sum();
        (open <= 3).then_some(())
    });
}

/// JSON nesting bombs and invalid UTF-8 in control bodies are 400s that cost nothing else.
#[test]
fn json_bombs_are_400() {
    let relay = Relay::start(&[]);
    assert_success(&relay.start_call("bombed", "t"), "Call started successfully");
    let deep = format!("{}{}", "[".repeat(20_000), "]".repeat(20_000));
    let r = relay.request("POST", "/mute", &[("Content-Type", "application/json")], Some(&deep));
    relay_tests::assert_error(&r, 400);
    let nested = format!("{{\"sessionId\":\"bombed\",\"x\":{}1{}}}", "{\"a\":".repeat(5_000), "}".repeat(5_000));
    let r = relay.request("POST", "/mute", &[("Content-Type", "application/json")], Some(&nested));
    relay_tests::assert_error(&r, 400);
    let mut conn = Conn::open(relay.addr());
    let body = b"{\"sessionId\":\"\xff\xfe\"}";
    let head = format!("POST /mute HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n", body.len());
    conn.write_raw(&[head.as_bytes(), body.as_slice()].concat()).expect("write");
    let r = conn.read_response();
    assert_eq!(r.status, 400, "invalid UTF-8: {}", r.text());
    assert_success(&relay.get("/call-status?sessionId=bombed"), "Call status retrieved");
}

/// A ping flood from a client that never reads its pongs costs only that socket: other sockets of
/// the session keep their events, the relay stays healthy, and the pongs it cannot deliver are
/// not kept without bound (the flooder is cut off past the write buffer limit, 1 MiB).
#[test]
fn ping_flood_costs_only_the_flooder() {
    let relay = Relay::start(&[]);
    let rss_before = relay.rss_bytes();
    assert_success(&relay.start_call("flood", "t"), "Call started successfully");
    let mut calm = relay.observe("flood", "t");
    let mut flooder =
        RawWs::connect(relay.addr(), "/ws?sessionId=flood&accessToken=t", &[]).expect("upgrade the flooder");
    let ping = encode_frame(true, 0x9, &[0u8; 100], Some([1, 2, 3, 4]));
    let burst: Vec<u8> = std::iter::repeat_n(ping, 2_000).flatten().collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    while std::time::Instant::now() < deadline {
        if flooder.send_raw(&burst).is_err() {
            break; // The relay closed the flooder: fine.
        }
    }
    let grown = relay.rss_bytes().saturating_sub(rss_before);
    assert!(grown < 16 << 20, "the flood grew the relay by {} MiB", grown >> 20);
    assert_success(&relay.post("/mute", &json!({ "sessionId": "flood" })), "Microphone muted");
    let update = calm.recv_json();
    assert_eq!(update["eventType"], "update", "the calm socket still gets its events: {update}");
    assert_eq!(relay.get("/health").status, 200);
}

/// Many pipelined requests for a large answer, from a client that reads none of them, do not make
/// the relay hold every answer: they are written out as they are made, and wait in the socket.
#[test]
fn pipelined_large_answers_are_not_all_held() {
    let relay = Relay::start(&[]);
    let rss_before = relay.rss_bytes();
    let mut conn = Conn::open(relay.addr());
    let request = "GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n".repeat(400);
    conn.write_raw(request.as_bytes()).expect("pipelined requests");
    // One 4 KiB read holds ~100 of these requests: ~7 MiB of answers if all were held (they are
    // made in well under a second).
    // The relay writes until the socket is full, then waits.
    thread::sleep(std::time::Duration::from_secs(2));
    let grown = relay.rss_bytes().saturating_sub(rss_before);
    assert!(grown < 3 << 20, "unread answers grew the relay by {} KiB", grown >> 10);
    assert_eq!(relay.get("/health").status, 200, "others are served meanwhile");
    // Reading resumes the pipeline: the first answer is whole.
    let first = conn.read_response();
    assert_eq!(first.status, 200);
}
