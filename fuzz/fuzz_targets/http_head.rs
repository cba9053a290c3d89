//! HTTP request heads: never panics; a complete head's length is within the input and the limit;
//! the headers recovered for an error answer are at most the one `Origin`. Round trips: a request
//! the relay writes as a client (to agents, Twilio's REST API) parses back as the server reads
//! requests (method, target, headers, body length), and a response the relay writes as a server
//! parses back as its client reads responses (status, headers, body).
#![no_main]

use arbitrary::Unstructured;
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use relay_engine::config::Limits;
use relay_engine::proto::http::{error_context, parse_head, write_response, Connection, Parse};
use relay_engine::proto::http_client::{parse_response, write_request};

/// A header-safe token (field name): 1–16 lowercase letters and digits, never one the writers add.
fn name(u: &mut Unstructured<'_>) -> Option<String> {
    let len = u.int_in_range(1..=16).ok()?;
    let name: String = (0..len)
        .map(|_| u.choose(b"abcdefghijklmnopqrstuvwxyz0123456789-").map(|&b| b as char))
        .collect::<Result<_, _>>()
        .ok()?;
    let taken = ["host", "connection", "content-length", "transfer-encoding", "expect", "date"];
    (!name.starts_with('-') && !taken.contains(&name.as_str())).then_some(name)
}

/// A field value: visible ASCII and inner spaces, no leading or trailing whitespace.
fn value(u: &mut Unstructured<'_>) -> Option<String> {
    let len = u.int_in_range(0..=40).ok()?;
    let v: String = (0..len).map(|_| u.int_in_range(0x20u8..=0x7e).map(char::from)).collect::<Result<_, _>>().ok()?;
    Some(v.trim().to_owned())
}

fn fields(u: &mut Unstructured<'_>) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for _ in 0..u.int_in_range(0..=6).unwrap_or(0) {
        if let (Some(n), Some(v)) = (name(u), value(u)) {
            if out.iter().all(|(k, _)| *k != n) {
                out.push((n, v));
            }
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    if let Ok(Parse::Complete { head, head_len }) = parse_head(data, &limits) {
        assert!(head_len <= data.len());
        assert!(head_len <= limits.max_head_bytes);
        assert!(head.content_length <= limits.max_body_bytes);
    }
    assert!(error_context(data).len() <= 1);

    let mut u = Unstructured::new(data);
    // Client writer → server parser.
    let headers = fields(&mut u);
    let segment: String = (0..u.int_in_range(0..=24).unwrap_or(0))
        .filter_map(|_| u.choose(b"abcdefghijklmnopqrstuvwxyz0123456789-._~/").ok().map(|&b| b as char))
        .collect();
    let target = format!("/{segment}");
    let method = if u.arbitrary::<bool>().unwrap_or(false) { "POST" } else { "GET" };
    let body_len = u.int_in_range(0..=64usize).unwrap_or(0);
    let body = vec![b'x'; if method == "POST" { body_len } else { 0 }];
    let mut request = Vec::new();
    write_request(&mut request, method, "relay.test", &target, &headers, &body);
    match parse_head(&request, &limits) {
        Ok(Parse::Complete { head, head_len }) => {
            assert_eq!(head.method.as_str(), method);
            assert_eq!(head.uri.path(), target);
            assert_eq!(head.content_length, body.len());
            assert_eq!(&request[head_len..], &body[..], "the body follows the head");
            assert!(!head.keep_alive, "the writer asks to close");
            for (n, v) in &headers {
                assert_eq!(head.headers.get(n.as_str()).map(|h| h.as_bytes()), Some(v.as_bytes()), "{n}");
            }
        }
        other => panic!("a written request must parse: {other:?}"),
    }

    // Server writer → client parser.
    let status = u.int_in_range(200u16..=599).unwrap_or(200);
    let bodiless = status == 204 || status == 304;
    let headers = fields(&mut u);
    let body = Bytes::from(u.bytes(u.len().min(256)).unwrap_or_default().to_vec());
    let mut builder = http::Response::builder().status(status);
    for (n, v) in &headers {
        builder = builder.header(n.as_str(), v.as_str());
    }
    let response = builder.body(if bodiless { Bytes::new() } else { body.clone() }).expect("valid parts");
    let mut wire = Vec::new();
    write_response(&mut wire, &response, Connection::Close, false, "Sat, 21 Nov 2026 12:00:00 GMT", "");
    let parsed = parse_response(&wire, true).expect("a written response parses").expect("and is complete");
    assert_eq!(parsed.status, status);
    assert_eq!(parsed.body, if bodiless { Bytes::new() } else { body });
    for (n, v) in &headers {
        assert_eq!(parsed.header(n), Some(v.as_str()), "{n}");
    }
});
