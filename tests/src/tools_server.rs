//! A local tools server: what an app behind `--tools-url` is. It records every function call the
//! relay POSTs, checks its `X-Relay-Signature` with its own HMAC-SHA256 (not the relay's code),
//! and answers as the test scripted: at once, only when released, or never (a timeout).
//!
//! Invariant: the server only records and answers; every wait is bounded by [`TIMEOUT`].

use std::collections::VecDeque;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

use crate::twilio_rest::read_request;
use crate::TIMEOUT;

/// The shared secret of the signatures (`--tools-secret`).
pub const TOOLS_SECRET: &str = "tools-test-secret";

/// How the server answers one request.
#[derive(Debug, Clone)]
pub enum Reply {
    /// This status and JSON body, at once.
    Json(u16, Value),
    /// `200 {"output": …}` once the test calls [`ToolsServer::release`].
    Held(Value),
    /// Nothing, ever (the connection stays open until the server stops): the relay times out.
    Silent,
}

/// One request the server received.
#[derive(Debug, Clone)]
pub struct ToolRequest {
    /// Method and target.
    pub method: String,
    /// Path and query.
    pub path: String,
    /// Header fields, names lowercased.
    pub headers: Vec<(String, String)>,
    /// The body as text.
    pub body: String,
    /// Whether `X-Relay-Signature` is the HMAC-SHA256 of `"{X-Relay-Timestamp}.{body}"` with
    /// [`TOOLS_SECRET`].
    pub signed: bool,
}

impl ToolRequest {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers.iter().find(|(k, _)| *k == name).map(|(_, v)| v.as_str())
    }

    /// The body as JSON (`null` when it is not).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
}

#[derive(Default)]
struct State {
    requests: Vec<ToolRequest>,
    replies: VecDeque<Reply>,
    released: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

/// The server, on 127.0.0.1:0, stopped when dropped.
pub struct ToolsServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
}

impl ToolsServer {
    /// Serves on a free loopback port; unscripted requests get `200 {"output":"ok"}`.
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the tools server");
        let addr = listener.local_addr().expect("tools server address");
        let shared = Arc::new(Shared::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (sh, st) = (shared.clone(), stop.clone());
        std::thread::Builder::new()
            .name(format!("tools {addr}"))
            .spawn(move || {
                for stream in listener.incoming() {
                    if st.load(Ordering::Acquire) {
                        return;
                    }
                    let Ok(stream) = stream else { continue };
                    let (sh, st) = (sh.clone(), st.clone());
                    std::thread::spawn(move || serve(stream, &sh, &st));
                }
            })
            .expect("spawn the tools server's accept thread");
        Self { addr, shared, stop }
    }

    /// The URL the relay POSTs to.
    pub fn url(&self) -> String {
        format!("http://{}/tools", self.addr)
    }

    /// `--tools-url <url> --tools-secret <secret>`.
    pub fn relay_args(&self) -> Vec<String> {
        vec!["--tools-url".into(), self.url(), "--tools-secret".into(), TOOLS_SECRET.into()]
    }

    /// Queues how the next unanswered request is answered (in order).
    pub fn reply(&self, reply: Reply) {
        self.shared.state.lock().expect("tools lock").replies.push_back(reply);
    }

    /// Lets every [`Reply::Held`] answer go, now and later.
    pub fn release(&self) {
        self.shared.state.lock().expect("tools lock").released = true;
        self.shared.changed.notify_all();
    }

    /// The requests so far.
    pub fn requests(&self) -> Vec<ToolRequest> {
        self.shared.state.lock().expect("tools lock").requests.clone()
    }

    /// Waits (at most [`TIMEOUT`]) until `n` requests have arrived.
    ///
    /// # Panics
    /// When they do not.
    pub fn wait_requests(&self, n: usize) -> Vec<ToolRequest> {
        let deadline = Instant::now() + TIMEOUT;
        let mut state = self.shared.state.lock().expect("tools lock");
        while state.requests.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "{n} tool requests expected, got {:?}", state.requests);
            state = self.shared.changed.wait_timeout(state, left).expect("tools lock").0;
        }
        state.requests.clone()
    }
}

impl Drop for ToolsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.release();
        self.shared.changed.notify_all();
        // Wakes the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

/// Whether `signature` is `sha256=` + hex HMAC-SHA256(secret, "{timestamp}.{body}").
pub fn verify(secret: &str, timestamp: &str, body: &[u8], signature: &str) -> bool {
    let Some(hex) = signature.strip_prefix("sha256=") else { return false };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    let expected: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
    expected == hex
}

fn serve(mut stream: TcpStream, shared: &Shared, stop: &AtomicBool) {
    let _ = stream.set_read_timeout(Some(TIMEOUT));
    let _ = stream.set_write_timeout(Some(TIMEOUT));
    let Some(r) = read_request(&mut stream, false) else { return };
    let timestamp = r.header("x-relay-timestamp").unwrap_or_default().to_owned();
    let signed = r.header("x-relay-signature").is_some_and(|s| verify(TOOLS_SECRET, &timestamp, r.body.as_bytes(), s));
    let request = ToolRequest { method: r.method, path: r.path, headers: r.headers, body: r.body, signed };
    let reply = {
        let mut state = shared.state.lock().expect("tools lock");
        state.requests.push(request);
        shared.changed.notify_all();
        state.replies.pop_front().unwrap_or_else(|| Reply::Json(200, json!({"output": "ok"})))
    };
    let (status, body) = match reply {
        Reply::Json(status, body) => (status, body),
        Reply::Held(body) => {
            let mut state = shared.state.lock().expect("tools lock");
            while !state.released && !stop.load(Ordering::Acquire) {
                state = shared.changed.wait_timeout(state, TIMEOUT).expect("tools lock").0;
            }
            (200, body)
        }
        Reply::Silent => {
            let mut state = shared.state.lock().expect("tools lock");
            while !stop.load(Ordering::Acquire) {
                state = shared.changed.wait_timeout(state, TIMEOUT).expect("tools lock").0;
            }
            return;
        }
    };
    let text = body.to_string();
    let head = format!(
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        text.len()
    );
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(text.as_bytes());
    let _ = stream.flush();
}
