//! TLS on the listening port (`--tls-cert`, `--tls-key`): `https://` requests and `wss://`
//! sockets on 2 cores, including connections accepted by one core and moved, with their TLS
//! state, to the core that owns their session.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use relay_tests::telephony::{connected_msg, media_msg, start_msg, TwilioBot};
use relay_tests::twilio_rest::tls::TestCert;
use relay_tests::{ids_on_core, Relay};
use serde_json::{json, Value};
use tungstenite::Message;

fn start(cert: &TestCert, extra: &[&str]) -> Relay {
    let cert_path = cert.pem_file().to_str().expect("utf-8 path").to_owned();
    let key_path = cert.key_file().to_str().expect("utf-8 path").to_owned();
    let mut args = vec!["--tls-cert", cert_path.as_str(), "--tls-key", key_path.as_str()];
    args.extend_from_slice(extra);
    Relay::start(&args)
}

/// One HTTPS request; returns the status and the body.
fn https(cert: &TestCert, relay: &Relay, method: &str, path: &str, body: Option<&Value>) -> (u16, String, String) {
    let mut tls = cert.connect(relay.addr());
    let body = body.map(Value::to_string).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    tls.write_all(request.as_bytes()).expect("write over TLS");
    let mut raw = Vec::new();
    let _ = tls.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (status, head.to_owned(), body.to_owned())
}

/// A WebSocket over TLS to `path`.
fn wss(
    cert: &TestCert,
    relay: &Relay,
    path: &str,
) -> tungstenite::WebSocket<rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>> {
    let tls = cert.connect(relay.addr());
    let (ws, response) = tungstenite::client(format!("wss://localhost{path}"), tls).expect("wss upgrade");
    assert_eq!(response.status(), 101);
    ws
}

fn next_json<S: Read + Write>(ws: &mut tungstenite::WebSocket<S>) -> Value {
    loop {
        match ws.read().expect("a message") {
            Message::Text(t) => return serde_json::from_str(&t).expect("JSON"),
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// HTTPS requests work, commands reach sessions on both cores, and a plain-text request to the
/// TLS port gets no HTTP answer.
#[test]
fn https_requests_on_two_cores() {
    let cert = TestCert::localhost();
    let relay = start(&cert, &[]);
    let (status, _, body) = https(&cert, &relay, "GET", "/health", None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).expect("JSON")["status"], "ok");
    for core in 0..2 {
        let id = &ids_on_core("tls-session", core, 2, 1)[0];
        let (status, head, body) =
            https(&cert, &relay, "POST", "/start-call", Some(&json!({"sessionId": id, "accessToken": "tok"})));
        assert_eq!(status, 200, "{body}");
        assert!(head.to_ascii_lowercase().contains(&format!("x-relay-core: {core}")), "{head}");
    }
    let mut plain = std::net::TcpStream::connect(relay.addr()).expect("connect");
    plain.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    plain.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").expect("write");
    let mut got = Vec::new();
    let _ = plain.read_to_end(&mut got);
    assert!(!String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"), "no plain-text answer on a TLS port");
}

/// `/ws` listeners over `wss://` for sessions on both cores get their events, whichever core
/// accepted them (the TLS connection moves with its state).
#[test]
fn wss_listeners_on_both_cores() {
    let cert = TestCert::localhost();
    let relay = start(&cert, &[]);
    for core in 0..2 {
        for id in ids_on_core("tls-ws", core, 2, 3) {
            let (status, _, body) =
                https(&cert, &relay, "POST", "/start-call", Some(&json!({"sessionId": id, "accessToken": "tok"})));
            assert_eq!(status, 200, "{body}");
            let mut ws = wss(&cert, &relay, &format!("/ws?sessionId={id}&accessToken=tok"));
            let hello = next_json(&mut ws);
            assert_eq!(hello["type"], "connection_established", "{hello}");
            assert_eq!(hello["sessionId"], id.as_str());
            ws.send(Message::text(json!({"type": "ping"}).to_string())).expect("send");
            let pong = next_json(&mut ws);
            assert_eq!(pong["type"], "pong", "{pong}");
            let (status, _, _) = https(&cert, &relay, "POST", "/mute", Some(&json!({"sessionId": id})));
            assert_eq!(status, 200);
            let update = next_json(&mut ws);
            assert_eq!(update["eventType"], "update", "{update}");
        }
    }
}

/// A Twilio Media Stream over `wss://` (as Twilio connects: TLS only) reaches its bot and hears the
/// bot, for calls owned by either core.
#[test]
fn wss_twilio_calls_on_two_cores() {
    let cert = TestCert::localhost();
    let bot = TwilioBot::start();
    let relay = start(&cert, &["--agent-url", &bot.url("/bot")]);
    let mut calls = Vec::new();
    for core in 0..2 {
        calls.extend(ids_on_core("CAtls", core, 2, 2));
    }
    for (i, call) in calls.iter().enumerate() {
        let mut ws = wss(&cert, &relay, "/twilio/stream");
        let stream_sid = format!("MZtls{i}");
        ws.send(Message::text(connected_msg().to_string())).expect("connected");
        ws.send(Message::text(start_msg(1, &stream_sid, "ACtls", call, &[("callSid", call)]).to_string()))
            .expect("start");
        let conn = bot.ready(i);
        assert_eq!(conn.start_msg()["start"]["callSid"], call.as_str());
        for n in 0..3u8 {
            let frame = vec![n; 160];
            ws.send(Message::text(media_msg(u64::from(n) + 3, &stream_sid, u64::from(n) + 1, &frame).to_string()))
                .expect("media");
        }
        let got = conn.wait_media(3);
        assert_eq!(got[2], vec![2u8; 160], "the bot hears the caller over wss");
        conn.send_audio(&[vec![0x55; 160]]);
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut heard = false;
        while Instant::now() < deadline && !heard {
            let m = next_json(&mut ws);
            heard = m["event"] == "media";
        }
        assert!(heard, "the caller hears the bot over wss (call {call})");
    }
}

/// A TCP connection to `addr` whose receive buffer is set small before connecting, so that a large
/// answer fills the path and the relay's writes must wait for the client to read.
fn connect_small_window(addr: std::net::SocketAddr) -> std::net::TcpStream {
    use std::os::fd::FromRawFd;
    let std::net::SocketAddr::V4(v4) = addr else { panic!("the test relay listens on IPv4") };
    // SAFETY: plain socket calls on a descriptor this function owns until it is wrapped below.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket");
        let size: libc::c_int = 4096;
        let len = size_of::<libc::c_int>() as libc::socklen_t;
        assert_eq!(libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, (&raw const size).cast(), len), 0);
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: v4.port().to_be(),
            sin_addr: libc::in_addr { s_addr: u32::from(*v4.ip()).to_be() },
            sin_zero: [0; 8],
        };
        let sin_len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
        assert_eq!(libc::connect(fd, (&raw const sin).cast(), sin_len), 0, "connect");
        std::net::TcpStream::from_raw_fd(fd)
    }
}

/// Twenty pipelined large answers over TLS, to a client with a small window that starts reading
/// late, arrive whole and in order: each flush writes out the TLS records too, none is left in the
/// relay's buffer waiting for another request.
#[test]
fn large_answers_to_a_slow_tls_reader_arrive_whole() {
    const REQUESTS: usize = 20;
    let cert = TestCert::localhost();
    let relay = start(&cert, &[]);
    let tcp = connect_small_window(relay.addr());
    tcp.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let conn = rustls::ClientConnection::new(cert.client_config(), name).expect("client");
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let request = "GET /openapi.json HTTP/1.1\r\nHost: localhost\r\n\r\n".repeat(REQUESTS);
    tls.write_all(request.as_bytes()).expect("pipelined requests");
    // Let the relay fill the small window and wait on the socket.
    std::thread::sleep(Duration::from_millis(500));
    let mut raw = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    for i in 0..REQUESTS {
        let (head_len, length) = loop {
            let text = String::from_utf8_lossy(&raw);
            if let Some(end) = text.find("\r\n\r\n") {
                let length: usize = text[..end]
                    .lines()
                    .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned()))
                    .and_then(|v| v.parse().ok())
                    .expect("a Content-Length");
                break (end + 4, length);
            }
            let n = tls.read(&mut chunk).unwrap_or_else(|e| panic!("answer {i} keeps coming: {e}"));
            assert!(n > 0, "the relay closed a keep-alive connection");
            raw.extend_from_slice(&chunk[..n]);
        };
        while raw.len() < head_len + length {
            let n = tls.read(&mut chunk).unwrap_or_else(|e| panic!("the whole body of answer {i}: {e}"));
            assert!(n > 0, "the relay closed a keep-alive connection mid-body");
            raw.extend_from_slice(&chunk[..n]);
        }
        let body: Value = serde_json::from_slice(&raw[head_len..head_len + length]).expect("the document parses");
        assert!(body["paths"].is_object(), "an OpenAPI document");
        raw.drain(..head_len + length);
    }
    assert!(raw.is_empty(), "nothing past the last answer");
}

/// Over TLS, a chunked body is decoded like one in plain text, and a client that writes a 2 MiB
/// body in one call before reading (with a small send buffer, so the body cannot wait in its own
/// kernel) gets its 413: the refused body is read and discarded through TLS before the close.
#[test]
fn chunked_and_refused_bodies_over_tls() {
    use std::os::fd::AsRawFd as _;
    let cert = TestCert::localhost();
    let relay = start(&cert, &[]);
    let body = json!({"sessionId": "tls-chunked", "accessToken": "tok"}).to_string();
    let (a, b) = body.split_at(5);
    let mut tls = cert.connect(relay.addr());
    let request = format!(
        "POST /start-call HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{a}\r\n{:x};e=1\r\n{b}\r\n0\r\n\r\n",
        a.len(),
        b.len()
    );
    tls.write_all(request.as_bytes()).expect("write over TLS");
    let mut raw = Vec::new();
    let _ = tls.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 200 "), "chunked over TLS: {text}");
    assert!(text.contains("Call started successfully"), "{text}");

    const BODY: usize = 2 * 1024 * 1024;
    let mut tls = cert.connect(relay.addr());
    let size: libc::c_int = 64 * 1024;
    // SAFETY: setsockopt on a socket we own, with a pointer to a c_int that outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            tls.sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&raw const size).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "setsockopt SO_SNDBUF");
    let mut request =
        format!("POST /start-call HTTP/1.1\r\nHost: localhost\r\nContent-Length: {BODY}\r\n\r\n").into_bytes();
    request.resize(request.len() + BODY, b' ');
    tls.write_all(&request).expect("the relay reads the body it refused");
    let mut raw = Vec::new();
    let _ = tls.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 413 "), "refused body over TLS: {text}");
}
