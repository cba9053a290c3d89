//! HTTP/1.1 as clients use it: keep-alive, pipelining, `Connection: close`, HTTP/1.0,
//! `Expect: 100-continue`, HEAD, routing errors (404/405) and the head/body limits.

use std::io::Write as _;
use std::thread;

use relay_tests::{assert_error, assert_json_type, assert_success, format_request, set_send_buffer, Conn, Relay};
use serde_json::json;

/// Several requests on one connection are all answered, and the connection stays open.
#[test]
fn keep_alive_serves_several_requests() {
    let relay = Relay::start(&[]);
    let mut conn = relay.conn();
    assert_eq!(conn.get("/health").status, 200);
    assert_success(
        &conn.post("/start-call", &json!({"sessionId": "ka", "accessToken": "t"})),
        "Call started successfully",
    );
    assert_success(&conn.get("/call-status?sessionId=ka"), "Call status retrieved");
    assert_success(&conn.post("/mute", &json!({"sessionId": "ka"})), "Microphone muted");
    assert_success(&conn.post("/stop-call", &json!({"sessionId": "ka"})), "Call stopped successfully");
    assert_error(&conn.get("/call-status?sessionId=ka"), 404);
    assert_error(&conn.get("/no-such-path"), 404);
    assert_eq!(conn.get("/health").status, 200, "errors do not end a keep-alive connection");
}

/// Requests written in one go are answered in order.
#[test]
fn pipelined_requests_are_answered_in_order() {
    let relay = Relay::start(&[]);
    let host = relay.addr().to_string();
    let mut bytes = Vec::new();
    let start = json!({"sessionId": "pipe", "accessToken": "t"}).to_string();
    let stop = json!({"sessionId": "pipe"}).to_string();
    bytes.extend(format_request("POST", "/start-call", &host, &[], Some(&start)));
    bytes.extend(format_request("GET", "/call-status?sessionId=pipe", &host, &[], None));
    bytes.extend(format_request("POST", "/mute", &host, &[], Some(&stop)));
    bytes.extend(format_request("GET", "/track-status?sessionId=pipe", &host, &[], None));
    bytes.extend(format_request("POST", "/stop-call", &host, &[], Some(&stop)));
    bytes.extend(format_request("GET", "/call-status?sessionId=pipe", &host, &[], None));
    bytes.extend(format_request("GET", "/health", &host, &[], None));
    let mut conn = relay.conn();
    conn.write_raw(&bytes).expect("write the pipelined requests");
    assert_success(&conn.read_response(), "Call started successfully");
    assert_success(&conn.read_response(), "Call status retrieved");
    assert_success(&conn.read_response(), "Microphone muted");
    let tracks = assert_success(&conn.read_response(), "Track status retrieved");
    assert_eq!(tracks["microphoneEnabled"], false);
    assert_success(&conn.read_response(), "Call stopped successfully");
    assert_error(&conn.read_response(), 404);
    assert_eq!(conn.read_response().json()["message"], "Relay is running");
}

/// Pipelined requests split at arbitrary byte boundaries are still answered, in order.
#[test]
fn pipelined_requests_split_across_writes() {
    let relay = Relay::start(&[]);
    let host = relay.addr().to_string();
    let mut bytes = Vec::new();
    for i in 0..10 {
        let body = json!({"sessionId": format!("split-{i}"), "accessToken": "t"}).to_string();
        bytes.extend(format_request("POST", "/start-call", &host, &[], Some(&body)));
    }
    let mut conn = relay.conn();
    for piece in bytes.chunks(37) {
        conn.write_raw(piece).expect("write a piece");
    }
    for i in 0..10 {
        let data = assert_success(&conn.read_response(), "Call started successfully");
        assert_eq!(data["sessionId"], format!("split-{i}"));
    }
}

/// `Connection: close` is honoured: the relay closes after its response.
#[test]
fn connection_close_is_honoured() {
    let relay = Relay::start(&[]);
    let mut conn = Conn::open(relay.addr());
    let resp = conn.request("GET", "/health", &[("Connection", "close")], None);
    assert_eq!(resp.status, 200);
    assert!(conn.closed_by_server(), "connection closed after the response");
}

/// HTTP/1.0 closes by default, and keeps alive when asked to.
#[test]
fn http10_closes_by_default() {
    let relay = Relay::start(&[]);
    let mut conn = Conn::open(relay.addr());
    conn.write_raw(b"GET /health HTTP/1.0\r\n\r\n").expect("write");
    let resp = conn.read_response();
    assert_eq!(resp.status, 200);
    assert!(conn.closed_by_server(), "HTTP/1.0 without keep-alive is closed after the response");

    let mut conn = Conn::open(relay.addr());
    conn.write_raw(b"GET /health HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").expect("write");
    assert_eq!(conn.read_response().status, 200);
    conn.write_raw(b"GET /health HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").expect("write");
    assert_eq!(conn.read_response().status, 200, "HTTP/1.0 with keep-alive serves a second request");
}

/// `Expect: 100-continue` gets `100 Continue` before the body is sent, then the real answer.
#[test]
fn expect_continue_gets_100_first() {
    let relay = Relay::start(&[]);
    let body = json!({"sessionId": "cont", "accessToken": "t"}).to_string();
    let head = format!(
        "POST /start-call HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let mut conn = Conn::open(relay.addr());
    conn.write_raw(head.as_bytes()).expect("write head");
    let interim = conn.read_response();
    assert_eq!(interim.status, 100, "interim response before the body: {interim:?}");
    conn.write_raw(body.as_bytes()).expect("write body");
    assert_success(&conn.read_response(), "Call started successfully");
}

/// `Expect: 100-continue` on a request whose answer the head already decides (no such route,
/// wrong method, no API key) gets that answer instead of `100`, then the connection closes; the
/// same request with the key gets `100` and is carried out.
#[test]
fn expect_continue_answered_early_when_the_head_decides() {
    let relay = Relay::start(&["--api-key", "k-early"]);
    let cases = [
        ("POST /no-such-path", "", 404),
        ("PUT /start-call", "Authorization: Bearer k-early\r\n", 405),
        ("POST /start-call", "", 401),
        ("POST /start-call", "Authorization: Bearer wrong\r\n", 401),
    ];
    for (line, extra, status) in cases {
        let mut conn = Conn::open(relay.addr());
        let head = format!(
            "{line} HTTP/1.1\r\nHost: x\r\n{extra}Content-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: 40\r\n\r\n"
        );
        conn.write_raw(head.as_bytes()).expect("write head");
        let resp = conn.read_response();
        assert_eq!(resp.status, status, "{line} {extra:?}: the final answer, not 100: {resp:?}");
        assert_eq!(resp.header("connection"), Some("close"), "{line}");
        assert!(conn.closed_by_server(), "{line}: closed after the early answer");
    }
    let body = json!({"sessionId": "early", "accessToken": "t"}).to_string();
    let head = format!(
        "POST /start-call HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k-early\r\nContent-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let mut conn = Conn::open(relay.addr());
    conn.write_raw(head.as_bytes()).expect("write head");
    assert_eq!(conn.read_response().status, 100, "with the key the body is asked for");
    conn.write_raw(body.as_bytes()).expect("write body");
    assert_success(&conn.read_response(), "Call started successfully");
}

/// A malformed request line is answered 400 and the connection is closed.
#[test]
fn malformed_request_line_is_400() {
    let relay = Relay::start(&[]);
    let mut conn = Conn::open(relay.addr());
    conn.write_raw(b"\x01\x02 garbage\r\n\r\n").expect("write");
    assert_error(&conn.read_response(), 400);
    assert!(conn.closed_by_server());
    assert_eq!(relay.get("/health").status, 200);
}

/// A request head larger than `--max-head-bytes` is answered 431.
#[test]
fn oversized_head_is_431() {
    let relay = Relay::start(&[]);
    let mut conn = Conn::open(relay.addr());
    let big = "a".repeat(9000);
    let resp = conn.request("GET", "/health", &[("X-Filler", &big)], None);
    assert_error(&resp, 431);

    let relay = Relay::start(&["--max-head-bytes", "1024"]);
    let filler = "b".repeat(2000);
    assert_error(&Conn::open(relay.addr()).request("GET", "/health", &[("X-Filler", &filler)], None), 431);
    let small = "c".repeat(500);
    assert_eq!(Conn::open(relay.addr()).request("GET", "/health", &[("X-Filler", &small)], None).status, 200);
}

/// More header lines than `--max-headers` are answered 431; fewer are fine.
#[test]
fn too_many_headers_is_431() {
    let relay = Relay::start(&[]);
    let names: Vec<String> = (0..70).map(|i| format!("X-H{i}")).collect();
    let headers: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "v")).collect();
    assert_error(&Conn::open(relay.addr()).request("GET", "/health", &headers, None), 431);

    let relay = Relay::start(&["--max-headers", "8"]);
    assert_error(&Conn::open(relay.addr()).request("GET", "/health", &headers[..10], None), 431);
    assert_eq!(Conn::open(relay.addr()).request("GET", "/health", &headers[..4], None).status, 200);
}

/// A `Content-Length` over `--max-body-bytes` is answered 413 without waiting for the body.
#[test]
fn oversized_body_is_413_before_reading_it() {
    let relay = Relay::start(&[]);
    let mut conn = Conn::open(relay.addr());
    conn.write_raw(
        b"POST /start-call HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n",
    )
    .expect("write head");
    assert_error(&conn.read_response(), 413);
    assert!(conn.closed_by_server(), "the unread body cannot be parsed as a request: closed");

    let relay = Relay::start(&["--max-body-bytes", "100"]);
    let body = json!({"sessionId": "b", "accessToken": "x".repeat(200)}).to_string();
    assert_error(&Conn::open(relay.addr()).request("POST", "/start-call", &[], Some(&body)), 413);
    let small = json!({"sessionId": "b", "accessToken": "t"}).to_string();
    assert_success(
        &Conn::open(relay.addr()).request("POST", "/start-call", &[], Some(&small)),
        "Call started successfully",
    );
}

/// A `Transfer-Encoding: chunked` body (sizes in any case, extensions, a trailer) is decoded and
/// handled like the same body sent with `Content-Length`, even split into tiny writes; the request
/// pipelined after it is answered too.
#[test]
fn chunked_body_is_decoded() {
    let relay = Relay::start(&[]);
    let body = json!({"sessionId": "chunky", "accessToken": "t"}).to_string();
    let (a, b) = body.split_at(7);
    let mut bytes = format!(
        "POST /start-call HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n\
         {:X};name=value;quoted=\"a;b\"\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\nX-Checksum: none\r\n\r\n",
        a.len(),
        b.len()
    )
    .into_bytes();
    bytes.extend(format_request("GET", "/call-status?sessionId=chunky", "x", &[], None));
    let mut conn = Conn::open(relay.addr());
    for piece in bytes.chunks(3) {
        conn.write_raw(piece).expect("write a piece");
    }
    let data = assert_success(&conn.read_response(), "Call started successfully");
    assert_eq!(data["sessionId"], "chunky");
    assert_success(&conn.read_response(), "Call status retrieved");
}

/// A chunked body is held to `--max-body-bytes` by its decoded size: 413 (and close) past it,
/// accepted at it however many bytes its chunk lines add.
#[test]
fn chunked_body_over_the_limit_is_413() {
    let relay = Relay::start(&["--max-body-bytes", "100"]);
    let big = json!({"sessionId": "big", "accessToken": "x".repeat(200)}).to_string();
    let mut conn = Conn::open(relay.addr());
    let head = "POST /start-call HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";
    conn.write_raw(format!("{head}{:x}\r\n{big}\r\n0\r\n\r\n", big.len()).as_bytes()).expect("write");
    assert_error(&conn.read_response(), 413);
    assert!(conn.closed_by_server(), "closed after the 413");

    let small = json!({"sessionId": "small", "accessToken": "t"}).to_string();
    let mut chunked = String::from(head);
    for byte in small.chars() {
        chunked.push_str(&format!("1;pad=padding\r\n{byte}\r\n"));
    }
    chunked.push_str("0\r\n\r\n");
    assert!(chunked.len() > 300, "the encoded body is longer than the limit");
    let resp = raw_request(&relay, chunked.as_bytes());
    assert_success(&resp, "Call started successfully");
    assert_eq!(relay.active_sessions(), 1, "only the small body started a call");
}

/// Malformed chunked framing (a size that is not hex, negative, past 64 bits, data longer than its
/// size, a bare LF, an endless size line or trailer) is answered 400 and the connection closes.
#[test]
fn malformed_chunks_are_400_and_close() {
    let relay = Relay::start(&[]);
    let long_extension = format!("5;{}\r\nhello\r\n0\r\n\r\n", "e".repeat(10_000));
    let cases: [&str; 9] = [
        "zz\r\nhello\r\n0\r\n\r\n",
        "-5\r\nhello\r\n0\r\n\r\n",
        "0x5\r\nhello\r\n0\r\n\r\n",
        "1ffffffffffffffff\r\nhello\r\n0\r\n\r\n",
        "10000000000000000\r\nhello\r\n0\r\n\r\n",
        "3\r\nhello\r\n0\r\n\r\n",
        "5\nhello\r\n0\r\n\r\n",
        "\r\nhello\r\n0\r\n\r\n",
        &long_extension,
    ];
    for chunks in cases {
        let mut conn = Conn::open(relay.addr());
        let request = format!("POST /start-call HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{chunks}");
        conn.write_raw(request.as_bytes()).expect("write");
        let resp = conn.read_response();
        assert_error(&resp, 400);
        assert_eq!(resp.header("connection"), Some("close"), "{chunks:.40?}");
        assert!(conn.closed_by_server(), "{chunks:.40?}: closed after the 400");
    }
    assert_eq!(relay.active_sessions(), 0);
    assert_eq!(relay.get("/health").status, 200);
}

/// A chunked body's trailer section is held to the head's limits: more fields than
/// `--max-headers`, or more bytes than `--max-head-bytes`, is 431 and the connection closes.
#[test]
fn chunked_trailers_are_bounded() {
    let relay = Relay::start(&["--max-headers", "8", "--max-head-bytes", "1024"]);
    let many: String = (0..9).map(|i| format!("X-T{i}: v\r\n")).collect();
    let long = format!("X-Long: {}\r\n", "v".repeat(1100));
    for trailers in [many, long] {
        let mut conn = Conn::open(relay.addr());
        let request = format!(
            "POST /start-call HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{{}}\r\n0\r\n{trailers}\r\n"
        );
        conn.write_raw(request.as_bytes()).expect("write");
        assert_error(&conn.read_response(), 431);
        assert!(conn.closed_by_server(), "closed after the 431");
    }
    let few: String = (0..3).map(|i| format!("X-T{i}: v\r\n")).collect();
    let body = json!({"sessionId": "trailers", "accessToken": "t"}).to_string();
    let request = format!(
        "POST /start-call HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n{few}\r\n",
        body.len()
    );
    assert_success(&raw_request(&relay, request.as_bytes()), "Call started successfully");
}

/// `Content-Length` and `Transfer-Encoding` together (a smuggling attempt) are 400 and close,
/// whichever comes first, and the body is not taken as a request.
#[test]
fn content_length_with_transfer_encoding_is_400() {
    let relay = Relay::start(&[]);
    let smuggled = "GET /no-such-path HTTP/1.1\r\nHost: x\r\n\r\n";
    for headers in
        ["Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", "Transfer-Encoding: chunked\r\nContent-Length: 40\r\n"]
    {
        let mut conn = Conn::open(relay.addr());
        let request = format!("POST /start-call HTTP/1.1\r\nHost: x\r\n{headers}\r\n0\r\n\r\n{smuggled}");
        conn.write_raw(request.as_bytes()).expect("write");
        assert_error(&conn.read_response(), 400);
        assert!(conn.closed_by_server(), "{headers:?}: closed, nothing else answered");
    }
}

/// A transfer coding other than chunked (alone, or before chunked) is 501 and the connection
/// closes; chunked on an HTTP/1.0 request is 400.
#[test]
fn other_transfer_codings_are_501() {
    let relay = Relay::start(&[]);
    for coding in ["gzip", "gzip, chunked", "identity", "chunked;x=1"] {
        let mut conn = Conn::open(relay.addr());
        let request = format!("POST /start-call HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: {coding}\r\n\r\n0\r\n\r\n");
        conn.write_raw(request.as_bytes()).expect("write");
        assert_error(&conn.read_response(), 501);
        assert!(conn.closed_by_server(), "{coding}: closed");
    }
    let resp = raw_request(&relay, b"POST /start-call HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n");
    assert_error(&resp, 400);
    assert_eq!(relay.active_sessions(), 0);
}

/// `Expect: 100-continue` with a chunked body gets `100 Continue`, then the real answer.
#[test]
fn expect_continue_with_a_chunked_body() {
    let relay = Relay::start(&[]);
    let body = json!({"sessionId": "cont-chunked", "accessToken": "t"}).to_string();
    let mut conn = Conn::open(relay.addr());
    conn.write_raw(
        b"POST /start-call HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nExpect: 100-continue\r\nTransfer-Encoding: chunked\r\n\r\n",
    )
    .expect("write head");
    let interim = conn.read_response();
    assert_eq!(interim.status, 100, "interim response before the body: {interim:?}");
    conn.write_raw(format!("{:x}\r\n{body}\r\n0\r\n\r\n", body.len()).as_bytes()).expect("write body");
    assert_success(&conn.read_response(), "Call started successfully");
}

/// Unknown paths are 404 with the error envelope.
#[test]
fn unknown_path_is_404() {
    let relay = Relay::start(&[]);
    for (method, path) in [("GET", "/nope"), ("POST", "/start-call/extra"), ("GET", "/"), ("DELETE", "/nothing-here")] {
        let resp = relay.request(method, path, &[], None);
        assert_error(&resp, 404);
    }
}

/// A known path with the wrong method is 405 with an `Allow` header naming the right one.
#[test]
fn wrong_method_is_405_with_allow() {
    let relay = Relay::start(&[]);
    for (method, path, allowed) in [
        ("GET", "/start-call", "POST"),
        ("PUT", "/stop-call", "POST"),
        ("DELETE", "/mute", "POST"),
        ("GET", "/send-custom-stream", "POST"),
        ("POST", "/health", "GET"),
        ("DELETE", "/health/detailed", "GET"),
        ("POST", "/call-status?sessionId=x", "GET"),
        ("PATCH", "/track-status?sessionId=x", "GET"),
    ] {
        let body = (method != "GET").then_some("{}");
        let resp = relay.request(method, path, &[], body);
        assert_error(&resp, 405);
        let allow = resp.header("allow").unwrap_or_else(|| panic!("{method} {path}: 405 without allow header"));
        assert!(allow.split(',').any(|m| m.trim().eq_ignore_ascii_case(allowed)), "{method} {path}: allow {allow:?}");
    }
}

/// HEAD works wherever GET does: same status and headers, no body.
#[test]
fn head_works_like_get() {
    let relay = Relay::start(&[]);
    assert_success(&relay.start_call("hd", "t"), "Call started successfully");
    let mut conn = relay.conn();
    for path in [
        "/health",
        "/health/detailed",
        "/call-status?sessionId=hd",
        "/track-status?sessionId=hd",
        "/call-status?sessionId=none",
    ] {
        let get = conn.request("GET", path, &[], None);
        let head = conn.request("HEAD", path, &[], None);
        assert_eq!(head.status, get.status, "HEAD {path}");
        assert!(head.body.is_empty());
        assert_json_type(&head);
        if let Some(len) = head.header("content-length") {
            if path != "/health" && path != "/health/detailed" {
                // Health bodies carry a clock; the others are stable, so the length matches.
                assert_eq!(len, get.body.len().to_string(), "HEAD {path} content-length");
            }
        }
    }
    // If a HEAD answer had carried a body, this response would not parse.
    assert_eq!(conn.get("/health").status, 200);
}

/// Every response, success or error, is JSON.
#[test]
fn every_response_is_json() {
    let relay = Relay::start(&[]);
    let cases: [(&str, &str, Option<&str>); 6] = [
        ("GET", "/health", None),
        ("GET", "/nope", None),
        ("GET", "/start-call", None),
        ("POST", "/start-call", Some("nope")),
        ("POST", "/stop-call", Some("{\"sessionId\":\"x\"}")),
        ("GET", "/call-status", None),
    ];
    for (method, path, body) in cases {
        let resp = relay.request(method, path, &[], body);
        assert_json_type(&resp);
        resp.json();
    }
}

/// Header names are case-insensitive.
#[test]
fn header_names_are_case_insensitive() {
    let relay = Relay::start(&[]);
    let body = json!({"sessionId": "case", "accessToken": "t"}).to_string();
    let head = format!(
        "POST /start-call HTTP/1.1\r\nhOsT: x\r\nCONTENT-TYPE: application/json\r\ncontent-LENGTH: {}\r\n\r\n",
        body.len()
    );
    let mut conn = Conn::open(relay.addr());
    conn.write_raw(format!("{head}{body}").as_bytes()).expect("write");
    assert_success(&conn.read_response(), "Call started successfully");
    conn.write_raw(b"GET /health HTTP/1.1\r\nHOST: x\r\nCONNECTION: CLOSE\r\n\r\n").expect("write");
    assert_eq!(conn.read_response().status, 200);
    assert!(conn.closed_by_server(), "CONNECTION: CLOSE honoured");
}

/// In a pipeline, a request with `Connection: close` is the last one answered.
#[test]
fn pipelined_close_is_the_last_answer() {
    let relay = Relay::start(&[]);
    let host = relay.addr().to_string();
    let mut bytes = Vec::new();
    bytes.extend(format_request("GET", "/health", &host, &[], None));
    bytes.extend(format_request("GET", "/health", &host, &[("Connection", "close")], None));
    let start = json!({"sessionId": "after-close", "accessToken": "t"}).to_string();
    bytes.extend(format_request("POST", "/start-call", &host, &[], Some(&start)));
    let mut conn = Conn::open(relay.addr());
    conn.write_raw(&bytes).expect("write");
    assert_eq!(conn.read_response().status, 200);
    assert_eq!(conn.read_response().status, 200);
    assert!(conn.closed_by_server(), "closed after the Connection: close request");
    assert_error(&relay.get("/call-status?sessionId=after-close"), 404);
}

/// `Expect: 100-continue` with a body over the limit is answered 413 at once, with no 100 first.
#[test]
fn expect_continue_over_limit_is_413() {
    let relay = Relay::start(&["--max-body-bytes", "1000"]);
    let mut conn = Conn::open(relay.addr());
    conn.write_raw(b"POST /start-call HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5000\r\n\r\n")
        .expect("write head");
    assert_error(&conn.read_response(), 413);
}

/// Two hundred requests written at once are all answered, in order.
#[test]
fn deep_pipeline_is_answered_in_order() {
    let relay = Relay::start(&[]);
    let host = relay.addr().to_string();
    let mut bytes = Vec::new();
    for i in 0..200 {
        let body = json!({"sessionId": format!("deep-{i}"), "accessToken": "t"}).to_string();
        bytes.extend(format_request("POST", "/start-call", &host, &[], Some(&body)));
    }
    let mut conn = Conn::open(relay.addr());
    conn.write_raw(&bytes).expect("write");
    for i in 0..200 {
        let data = assert_success(&conn.read_response(), "Call started successfully");
        assert_eq!(data["sessionId"], format!("deep-{i}"));
    }
    assert_eq!(relay.active_sessions(), 200);
}

/// A keep-alive connection that served requests can then upgrade to the event socket.
#[test]
fn keep_alive_connection_can_upgrade() {
    let relay = Relay::start(&[]);
    for id in relay_tests::ids_on_core("upg", 0, 2, 1).into_iter().chain(relay_tests::ids_on_core("upg", 1, 2, 1)) {
        assert_success(&relay.start_call(&id, "t"), "Call started successfully");
        let mut conn = relay.conn();
        assert_eq!(conn.get("/health").status, 200);
        assert_success(&conn.get(&format!("/call-status?sessionId={id}")), "Call status retrieved");
        let upgrade = [
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Version", "13"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("Authorization", "Bearer t"),
        ];
        let resp = conn.request("GET", &format!("/ws?sessionId={id}"), &upgrade, None);
        assert_eq!(resp.status, 101, "{id}: {}", resp.text());
        let (stream, rest) = conn.into_parts();
        let mut ws =
            tungstenite::WebSocket::from_partially_read(stream, rest, tungstenite::protocol::Role::Client, None);
        let greeting: serde_json::Value =
            serde_json::from_str(ws.read().expect("greeting").to_text().expect("text")).expect("JSON");
        assert_eq!(greeting["type"], "connection_established");
        assert_success(&relay.stop_call(&id), "Call stopped successfully");
        let ended: serde_json::Value =
            serde_json::from_str(ws.read().expect("event").to_text().expect("text")).expect("JSON");
        assert_eq!(ended["eventType"], "call_ended", "{id}");
    }
}

/// The absolute-form request target is accepted (RFC 9112 §3.2.2: a server MUST accept it).
#[test]
fn absolute_form_target_is_accepted() {
    let relay = Relay::start(&[]);
    let target = format!("http://{}/call-status?sessionId=abs", relay.addr());
    assert_success(&relay.start_call("abs", "t"), "Call started successfully");
    let resp = relay.request("GET", &target, &[], None);
    assert_success(&resp, "Call status retrieved");
}

/// Writes `bytes` on a new connection and reads one response.
fn raw_request(relay: &Relay, bytes: &[u8]) -> relay_tests::Response {
    let mut conn = Conn::open(relay.addr());
    conn.write_raw(bytes).expect("write the request");
    conn.read_response()
}

/// An `Expect` other than `100-continue` is answered 417, and the request is not carried out.
#[test]
fn unknown_expectation_is_417() {
    let relay = Relay::start(&[]);
    let body = json!({"sessionId": "expect", "accessToken": "t"}).to_string();
    let resp = Conn::open(relay.addr()).request("POST", "/start-call", &[("Expect", "something-else")], Some(&body));
    assert_error(&resp, 417);
    assert_error(&relay.get("/call-status?sessionId=expect"), 404);
}

/// An HTTP/1.1 request needs exactly one `Host`: none or two is 400; HTTP/1.0 may leave it out.
#[test]
fn http11_needs_exactly_one_host() {
    let relay = Relay::start(&[]);
    assert_error(&raw_request(&relay, b"GET /health HTTP/1.1\r\n\r\n"), 400);
    assert_error(&raw_request(&relay, b"GET /health HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"), 400);
    assert_eq!(raw_request(&relay, b"GET /health HTTP/1.0\r\n\r\n").status, 200);
}

/// A `Host` that is not `host[:port]` (spaces, control characters, a port that is not a number up
/// to 65535, characters no host has) is 400 and closes, in HTTP/1.1 and 1.0 alike; so are two
/// Hosts in HTTP/1.0. Names, IPv4, IPv6 literals and an empty Host are accepted.
#[test]
fn invalid_host_is_400() {
    let relay = Relay::start(&[]);
    let bad = [
        "a b", "a\tb", "h\x01", "h:abc", "h:99999", "h:-1", "h:80:81", "[::1", "[::1]x", "[zz]:80", "a/b", "a@b",
        "h\x7f",
    ];
    for host in bad {
        for version in ["1.1", "1.0"] {
            let mut conn = Conn::open(relay.addr());
            conn.write_raw(format!("GET /health HTTP/{version}\r\nHost: {host}\r\n\r\n").as_bytes()).expect("write");
            let resp = conn.read_response();
            assert_eq!(resp.status, 400, "Host {host:?} over HTTP/{version}: {resp:?}");
            assert!(conn.closed_by_server(), "Host {host:?}: closed after the 400");
        }
    }
    assert_error(&raw_request(&relay, b"GET /health HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n"), 400);
    let addr = relay.addr().to_string();
    for host in [
        addr.as_str(),
        "relay.example",
        "relay.example:443",
        "10.0.0.1",
        "[::1]:8080",
        "[fe80::1]",
        "a-b_c.~x%20!$&'()*+,;=",
        "",
    ] {
        let request = format!("GET /health HTTP/1.1\r\nHost: {host}\r\n\r\n");
        assert_eq!(raw_request(&relay, request.as_bytes()).status, 200, "Host {host:?}");
    }
}

/// An HTTP/1.0 keep-alive request is answered `connection: keep-alive`, and the connection stays.
#[test]
fn http10_keep_alive_is_announced() {
    let relay = Relay::start(&[]);
    let mut conn = Conn::open(relay.addr());
    for i in 0..2 {
        conn.write_raw(b"GET /health HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").expect("write");
        let resp = conn.read_response();
        assert_eq!(resp.status, 200, "request {i}");
        let connection = resp.header("connection").unwrap_or_default();
        assert!(connection.eq_ignore_ascii_case("keep-alive"), "request {i}: connection {connection:?}");
    }
}

/// `OPTIONS *` is answered 204 with an `Allow` header naming GET, POST and OPTIONS.
#[test]
fn options_star_lists_the_methods() {
    let relay = Relay::start(&[]);
    let resp = raw_request(&relay, b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(resp.status, 204, "{resp:?}");
    let allow: Vec<String> =
        resp.header("allow").unwrap_or_default().split(',').map(|m| m.trim().to_ascii_uppercase()).collect();
    for method in ["GET", "POST", "OPTIONS"] {
        assert!(allow.iter().any(|m| m == method), "allow names {method}: {allow:?}");
    }
}

/// A WebSocket upgrade sent as HTTP/1.0 is refused with a 4xx error, not switched.
#[test]
fn http10_websocket_upgrade_is_refused() {
    let relay = Relay::start(&[]);
    assert_success(&relay.start_call("ten", "t"), "Call started successfully");
    let resp = raw_request(
        &relay,
        b"GET /ws?sessionId=ten HTTP/1.0\r\nHost: x\r\nAuthorization: Bearer t\r\nUpgrade: websocket\r\n\
          Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    );
    assert_ne!(resp.status, 101, "no switch over HTTP/1.0");
    assert!((400..500).contains(&resp.status), "refused as a client error: {resp:?}");
    assert_error(&resp, resp.status);
}

/// A client that writes its whole 2 MiB request in one call before reading sees the 413 (for a
/// `Content-Length` or a chunked body over the limit), not a reset: the relay reads and discards
/// the body it refused before it closes. The client's send buffer is small, so the body cannot
/// hide in kernel buffers: the write completes only if the relay reads it.
#[test]
fn early_413_reaches_a_client_that_writes_2mib_at_once() {
    const BODY: usize = 2 * 1024 * 1024;
    let relay = Relay::start(&[]);
    let filler = vec![b' '; BODY];
    let mut length = format!("POST /start-call HTTP/1.1\r\nHost: x\r\nContent-Length: {BODY}\r\n\r\n").into_bytes();
    length.extend_from_slice(&filler);
    let mut chunked =
        format!("POST /start-call HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{BODY:x}\r\n").into_bytes();
    chunked.extend_from_slice(&filler);
    chunked.extend_from_slice(b"\r\n0\r\n\r\n");
    for (name, request) in [("content-length", length), ("chunked", chunked)] {
        let mut conn = Conn::open(relay.addr());
        set_send_buffer(conn.stream(), 64 * 1024);
        conn.write_raw(&request).unwrap_or_else(|e| panic!("{name}: the relay stopped reading the body: {e}"));
        let resp = conn.try_read_response().unwrap_or_else(|e| panic!("{name}: the 413 did not arrive: {e}"));
        assert_error(&resp, 413);
        assert!(conn.closed_by_server(), "{name}: closed after the 413");
    }
}

/// A 413 for a too-large body reaches a client that is still sending that body, whole.
#[test]
fn oversized_body_413_survives_the_unread_body() {
    const BODY: usize = 200_000;
    let relay = Relay::start(&[]);
    let mut conn = Conn::open(relay.addr());
    let head = format!(
        "POST /start-call HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {BODY}\r\n\r\n"
    );
    conn.write_raw(head.as_bytes()).expect("write head");
    let mut writer = conn.stream().try_clone().expect("clone the socket");
    // Stream the body while the main thread reads; the relay may stop reading it at any point.
    let sender = thread::spawn(move || {
        let chunk = [b' '; 16 * 1024];
        let mut sent = 0;
        while sent < BODY {
            let n = chunk.len().min(BODY - sent);
            if writer.write_all(&chunk[..n]).is_err() {
                break;
            }
            sent += n;
        }
    });
    let resp = conn.try_read_response().unwrap_or_else(|e| panic!("the 413 did not arrive whole: {e}"));
    assert_error(&resp, 413);
    sender.join().expect("body sender");
}
