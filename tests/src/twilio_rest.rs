//! A local stand-in for Twilio: its REST API (`Calls.json`, form-encoded, HTTP Basic auth) over
//! plain HTTP or TLS, and Twilio's side of every call it creates — the signed voice webhook, the
//! TwiML it answers, the Media Stream it opens and the status callbacks it sends — each step
//! scripted by the test. The relay reaches it through `--twilio-api-base`, as it reaches Twilio.
//!
//! Invariant: the stand-in only records and answers; every Twilio-side action (webhook, stream,
//! callback, hang-up) happens when the test asks for it, on the test's thread, so what the relay
//! has seen at each step is known. Every wait is bounded by [`TIMEOUT`].

pub mod tls;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha1::Sha1;

use self::tls::TestCert;
use crate::telephony::{Peer, TwilioCaller};
use crate::{Conn, Response, TIMEOUT};

/// The account the stand-in serves (the same one [`TwilioCaller`] names in its `start`).
pub const ACCOUNT_SID: &str = "AC0123456789abcdef0123456789abcdef";

/// The account's auth token: Basic auth password and webhook signing key.
pub const AUTH_TOKEN: &str = "twilio-rest-test-token";

/// The account's caller number (`--twilio-from`).
pub const FROM_NUMBER: &str = "+15550001111";

/// Longest request head the stand-in accepts, bytes.
const MAX_HEAD: usize = 16 * 1024;

/// Largest request body the stand-in accepts, bytes.
const MAX_BODY: usize = 64 * 1024;

/// One request the stand-in received.
#[derive(Debug, Clone)]
pub struct RestRequest {
    /// `POST`, `GET`, …
    pub method: String,
    /// The request target (path and query).
    pub path: String,
    /// Header fields in order, names lowercased.
    pub headers: Vec<(String, String)>,
    /// The body as text.
    pub body: String,
    /// The body decoded as `application/x-www-form-urlencoded`, in order.
    pub form: Vec<(String, String)>,
    /// Whether it came over TLS.
    pub tls: bool,
}

impl RestRequest {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers.iter().find(|(k, _)| *k == name).map(|(_, v)| v.as_str())
    }

    /// The user and password of an `Authorization: Basic` header.
    pub fn basic_auth(&self) -> Option<(String, String)> {
        let encoded = self.header("authorization")?.strip_prefix("Basic ")?;
        let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok()?;
        let text = String::from_utf8(decoded).ok()?;
        let (user, password) = text.split_once(':')?;
        Some((user.to_owned(), password.to_owned()))
    }

    /// The first value of form field `name`.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.form.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// What the stand-in answers `Calls.json` with.
#[derive(Debug, Clone)]
enum CallsAnswer {
    /// 201 with a new call.
    Create,
    /// This status and JSON body.
    Refuse(u16, Value),
}

struct RestState {
    requests: Vec<RestRequest>,
    /// Calls created, in order: sid and the request's form.
    calls: Vec<(String, Vec<(String, String)>)>,
    /// Calls handed out by [`TwilioRest::next_call`].
    handed: usize,
    answer: CallsAnswer,
    /// Characters of `annotation` added to every created call's answer.
    padding: usize,
}

struct RestShared {
    state: Mutex<RestState>,
    changed: Condvar,
    tls_ok: AtomicUsize,
    tls_failed: AtomicUsize,
}

/// Numbers the calls every stand-in of this process creates, so sids never repeat.
static NEXT_SID: AtomicU64 = AtomicU64::new(1);

/// Twilio's REST API on 127.0.0.1 (plain HTTP, or TLS with a self-signed certificate for
/// `localhost` and `127.0.0.1`): answers `POST /2010-04-01/Accounts/{sid}/Calls.json` with 201 and
/// a new call (or the refusal it was told to give) and `POST …/Calls/{sid}.json` with 200, checks
/// Basic auth, and records every request. Stops when dropped.
pub struct TwilioRest {
    addr: SocketAddr,
    cert: Option<TestCert>,
    shared: Arc<RestShared>,
    stop: Arc<AtomicBool>,
}

/// The relay flags for this stand-in's account sid, auth token and from number, with Twilio's
/// REST API at `api_base`.
pub fn twilio_args(api_base: &str) -> Vec<String> {
    [
        "--twilio-account-sid",
        ACCOUNT_SID,
        "--twilio-auth-token",
        AUTH_TOKEN,
        "--twilio-from",
        FROM_NUMBER,
        "--twilio-api-base",
        api_base,
    ]
    .map(str::to_owned)
    .to_vec()
}

impl TwilioRest {
    /// Serves plain HTTP on 127.0.0.1:0.
    pub fn start() -> Self {
        Self::serve(None)
    }

    /// Serves plain HTTP on `ip`, port 0 (`0.0.0.0`: relays in the test's network namespaces reach
    /// it at their root-side address; [`Self::base_url`] then names no reachable host).
    pub fn start_on(ip: std::net::IpAddr) -> Self {
        Self::serve_on(ip, None)
    }

    /// Serves HTTPS on 127.0.0.1:0 with a fresh self-signed certificate (see [`Self::ca_file`]).
    pub fn start_tls() -> Self {
        Self::serve(Some(TestCert::localhost()))
    }

    /// Serves HTTPS on 127.0.0.1:0 presenting `cert`.
    pub fn start_tls_with(cert: TestCert) -> Self {
        Self::serve(Some(cert))
    }

    fn serve(cert: Option<TestCert>) -> Self {
        Self::serve_on(std::net::IpAddr::from([127, 0, 0, 1]), cert)
    }

    fn serve_on(ip: std::net::IpAddr, cert: Option<TestCert>) -> Self {
        let listener = TcpListener::bind((ip, 0)).expect("bind the Twilio REST stand-in");
        let addr = listener.local_addr().expect("stand-in address");
        let shared = Arc::new(RestShared {
            state: Mutex::new(RestState {
                requests: Vec::new(),
                calls: Vec::new(),
                handed: 0,
                answer: CallsAnswer::Create,
                padding: 0,
            }),
            changed: Condvar::new(),
            tls_ok: AtomicUsize::new(0),
            tls_failed: AtomicUsize::new(0),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let config = cert.as_ref().map(TestCert::server_config);
        let (sh, st) = (shared.clone(), stop.clone());
        std::thread::Builder::new()
            .name(format!("twilio rest {addr}"))
            .spawn(move || {
                for stream in listener.incoming() {
                    if st.load(Ordering::Acquire) {
                        return;
                    }
                    let Ok(stream) = stream else { continue };
                    let (sh, config) = (sh.clone(), config.clone());
                    std::thread::spawn(move || {
                        let _ = stream.set_read_timeout(Some(TIMEOUT));
                        let _ = stream.set_write_timeout(Some(TIMEOUT));
                        match config {
                            None => serve_plain(stream, &sh),
                            Some(config) => serve_tls(stream, config, &sh),
                        }
                    });
                }
            })
            .expect("spawn the stand-in's accept thread");
        Self { addr, cert, shared, stop }
    }

    /// `http://127.0.0.1:<port>`, or `https://127.0.0.1:<port>` when serving TLS.
    pub fn base_url(&self) -> String {
        let scheme = if self.cert.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The PEM file of the certificate it serves (for `--upstream-ca-file`), when serving TLS.
    pub fn ca_file(&self) -> Option<&Path> {
        self.cert.as_ref().map(TestCert::pem_file)
    }

    /// The relay flags that point it here: account sid, auth token, from number and API base.
    pub fn relay_args(&self) -> Vec<String> {
        twilio_args(&self.base_url())
    }

    /// From now on, answers `Calls.json` with `status` and `body` instead of creating a call.
    pub fn refuse_calls(&self, status: u16, body: Value) {
        self.shared.state.lock().expect("rest lock").answer = CallsAnswer::Refuse(status, body);
    }

    /// From now on, pads each created call's answer with an `annotation` of `chars` characters (a
    /// field of Twilio's Call resource), for answers larger than one read.
    pub fn pad_answers(&self, chars: usize) {
        self.shared.state.lock().expect("rest lock").padding = chars;
    }

    /// From now on, creates calls again.
    pub fn accept_calls(&self) {
        self.shared.state.lock().expect("rest lock").answer = CallsAnswer::Create;
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<RestRequest> {
        self.shared.state.lock().expect("rest lock").requests.clone()
    }

    /// Waits until at least `n` requests arrived; returns all so far.
    ///
    /// # Panics
    /// When they do not within [`TIMEOUT`].
    pub fn wait_requests(&self, n: usize) -> Vec<RestRequest> {
        self.wait(&format!("{n} requests at the Twilio stand-in"), |s| {
            (s.requests.len() >= n).then(|| s.requests.clone())
        })
    }

    /// TLS handshakes completed so far.
    pub fn tls_handshakes(&self) -> usize {
        self.shared.tls_ok.load(Ordering::Acquire)
    }

    /// TLS handshakes that failed (e.g. the client did not trust the certificate).
    pub fn tls_failures(&self) -> usize {
        self.shared.tls_failed.load(Ordering::Acquire)
    }

    /// Waits until at least `n` TLS handshakes failed.
    ///
    /// # Panics
    /// When they do not within [`TIMEOUT`].
    pub fn wait_tls_failures(&self, n: usize) {
        crate::poll_until(&format!("{n} failed TLS handshakes at the stand-in"), || {
            (self.tls_failures() >= n).then_some(())
        });
    }

    /// The next created call not yet handed out, waiting for it: Twilio's side of that call.
    ///
    /// # Panics
    /// When none is created within [`TIMEOUT`].
    pub fn next_call(&self) -> PlacedCall {
        let (sid, form) = self.wait("a call created at the Twilio stand-in", |s| {
            s.calls.get(s.handed).cloned().inspect(|_| s.handed += 1)
        });
        PlacedCall { sid, form }
    }

    /// The created call `sid`: Twilio's side of it.
    ///
    /// # Panics
    /// When the stand-in created no such call.
    pub fn call(&self, sid: &str) -> PlacedCall {
        let state = self.shared.state.lock().expect("rest lock");
        let (sid, form) = state
            .calls
            .iter()
            .find(|(s, _)| s == sid)
            .cloned()
            .unwrap_or_else(|| panic!("the stand-in created no call {sid}"));
        PlacedCall { sid, form }
    }

    /// Sids of the calls created so far, in order.
    pub fn created(&self) -> Vec<String> {
        self.shared.state.lock().expect("rest lock").calls.iter().map(|(s, _)| s.clone()).collect()
    }

    fn wait<T>(&self, what: &str, mut probe: impl FnMut(&mut RestState) -> Option<T>) -> T {
        let deadline = Instant::now() + TIMEOUT;
        let mut state = self.shared.state.lock().expect("rest lock");
        loop {
            if let Some(v) = probe(&mut state) {
                return v;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "timed out after {TIMEOUT:?} waiting for {what}; requests: {:?}", state.requests);
            state = self.shared.changed.wait_timeout(state, left).expect("rest lock").0;
        }
    }
}

impl Drop for TwilioRest {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
    }
}

/// Twilio's documented error for an invalid `To` number (code 21211), as a 400 body.
pub fn invalid_number_error(number: &str) -> Value {
    json!({
        "code": 21211,
        "message": format!("The 'To' number {number} is not a valid phone number."),
        "more_info": "https://www.twilio.com/docs/errors/21211",
        "status": 400
    })
}

fn serve_plain(mut stream: TcpStream, shared: &RestShared) {
    serve_one(&mut stream, shared, false);
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

fn serve_tls(mut tcp: TcpStream, config: Arc<rustls::ServerConfig>, shared: &RestShared) {
    let Some(conn) = tls::accept(&mut tcp, config) else {
        shared.tls_failed.fetch_add(1, Ordering::AcqRel);
        return;
    };
    shared.tls_ok.fetch_add(1, Ordering::AcqRel);
    let mut stream = rustls::StreamOwned::new(conn, tcp);
    serve_one(&mut stream, shared, true);
    stream.conn.send_close_notify();
    let _ = stream.flush();
    let _ = stream.sock.shutdown(std::net::Shutdown::Both);
}

/// Reads one request, records it, answers it (`Connection: close`).
fn serve_one(stream: &mut (impl Read + Write), shared: &RestShared, tls: bool) {
    let Some(request) = read_request(stream, tls) else { return };
    let (status, body) = answer(shared, &request);
    let text = body.to_string();
    let head = format!(
        concat!(
            "HTTP/1.1 {} {}\r\nContent-Type: application/json; charset=utf-8\r\n",
            "Content-Length: {}\r\nConnection: close\r\n\r\n"
        ),
        status,
        reason(status),
        text.len()
    );
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(text.as_bytes());
    let _ = stream.flush();
}

/// What Twilio answers `request` with; records it (and the call it creates) first.
fn answer(shared: &RestShared, request: &RestRequest) -> (u16, Value) {
    let mut state = shared.state.lock().expect("rest lock");
    state.requests.push(request.clone());
    shared.changed.notify_all();
    let accounts = format!("/2010-04-01/Accounts/{ACCOUNT_SID}/");
    let authorised = request.basic_auth() == Some((ACCOUNT_SID.to_owned(), AUTH_TOKEN.to_owned()));
    let Some(rest) = request.path.strip_prefix(&accounts) else {
        return (404, json!({"code": 20404, "message": "The requested resource was not found", "status": 404}));
    };
    if !authorised {
        return (
            401,
            json!({
                "code": 20003,
                "message": "Authenticate",
                "more_info": "https://www.twilio.com/docs/errors/20003",
                "status": 401
            }),
        );
    }
    if request.method != "POST" {
        return (405, json!({"code": 20004, "message": "Method not allowed", "status": 405}));
    }
    if rest == "Calls.json" {
        if let CallsAnswer::Refuse(status, body) = &state.answer {
            return (*status, body.clone());
        }
        let n = NEXT_SID.fetch_add(1, Ordering::Relaxed);
        let sid = format!("CA{:08x}{:024x}", std::process::id(), n);
        let annotation: String = (0..state.padding).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
        let body = json!({
            "annotation": (state.padding > 0).then_some(annotation),
            "sid": sid,
            "account_sid": ACCOUNT_SID,
            "to": request.field("To"),
            "from": request.field("From"),
            "status": "queued",
            "direction": "outbound-api",
            "api_version": "2010-04-01",
            "uri": format!("/2010-04-01/Accounts/{ACCOUNT_SID}/Calls/{sid}.json"),
        });
        state.calls.push((sid, request.form.clone()));
        shared.changed.notify_all();
        return (201, body);
    }
    if let Some(sid) = rest.strip_prefix("Calls/").and_then(|r| r.strip_suffix(".json")) {
        if state.calls.iter().any(|(s, _)| s == sid) {
            let status = request.field("Status").unwrap_or("in-progress");
            return (200, json!({"sid": sid, "account_sid": ACCOUNT_SID, "status": status}));
        }
        return (
            404,
            json!({
                "code": 20404,
                "message": format!("The requested resource {accounts}Calls/{sid}.json was not found"),
                "status": 404
            }),
        );
    }
    (404, json!({"code": 20404, "message": "The requested resource was not found", "status": 404}))
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

/// Reads one HTTP/1.1 request with a `Content-Length` body (or none).
pub(crate) fn read_request(stream: &mut impl Read, tls: bool) -> Option<RestRequest> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > MAX_HEAD {
            return None;
        }
        let n = stream.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end - 4]).into_owned();
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next()?.split(' ');
    let (method, path) = (request_line.next()?.to_owned(), request_line.next()?.to_owned());
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let length: usize =
        headers.iter().find(|(k, _)| k == "content-length").and_then(|(_, v)| v.parse().ok()).unwrap_or(0);
    if length > MAX_BODY {
        return None;
    }
    let mut body = buf[head_end..].to_vec();
    while body.len() < length {
        let n = stream.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(length);
    let body = String::from_utf8_lossy(&body).into_owned();
    let form = decode_form(&body);
    Some(RestRequest { method, path, headers, body, form, tls })
}

/// Twilio's side of a call the stand-in created: the webhook it fetches, the stream it opens and
/// the status callbacks it sends, each when the test calls for it.
#[derive(Debug, Clone)]
pub struct PlacedCall {
    /// The call's sid (`CA` + 32 hex digits).
    pub sid: String,
    /// The form the relay created it with, in order.
    pub form: Vec<(String, String)>,
}

/// What the relay's voice webhook answered: the `<Stream>` URL and its `<Parameter>`s, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Twiml {
    /// The `<Stream url>`.
    pub stream_url: String,
    /// `(name, value)` of each `<Parameter>`, unescaped.
    pub parameters: Vec<(String, String)>,
}

impl Twiml {
    /// Parses `<Response><Connect><Stream url="…"><Parameter name="…" value="…"/>…`.
    ///
    /// # Panics
    /// When the document has no `<Connect><Stream url>`.
    pub fn parse(text: &str) -> Self {
        assert!(text.contains("<Response>") && text.contains("<Connect>"), "TwiML with <Connect>: {text}");
        let stream_url =
            attribute(text, "<Stream ", "url").unwrap_or_else(|| panic!("TwiML with a <Stream url>: {text}"));
        let mut parameters = Vec::new();
        let mut rest = text;
        while let Some(at) = rest.find("<Parameter ") {
            let element = &rest[at..];
            let end = element.find("/>").unwrap_or(element.len());
            let element = &element[..end];
            let name = attribute(element, "<Parameter ", "name").unwrap_or_else(|| panic!("Parameter name: {text}"));
            let value = attribute(element, "<Parameter ", "value").unwrap_or_else(|| panic!("Parameter value: {text}"));
            parameters.push((name, value));
            rest = &rest[at + end..];
        }
        Self { stream_url, parameters }
    }

    /// The value of parameter `name`.
    pub fn parameter(&self, name: &str) -> Option<&str> {
        self.parameters.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// The unescaped value of `name="…"` in the first element starting with `element`.
fn attribute(text: &str, element: &str, name: &str) -> Option<String> {
    let start = text.find(element)?;
    let tag = &text[start..];
    let tag = &tag[..tag.find('>').unwrap_or(tag.len())];
    let key = format!(" {name}=\"");
    let at = tag.find(&key)? + key.len();
    let value = &tag[at..];
    let value = &value[..value.find('"')?];
    Some(
        value
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&quot;", "\"")
            .replace("&apos;", "'")
            .replace("&amp;", "&"),
    )
}

impl PlacedCall {
    /// The first value of form field `name` of the create request.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.form.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// The parameters Twilio posts to the voice webhook of an answered outbound call.
    pub fn webhook_params(&self) -> Vec<(String, String)> {
        let to = self.param("To").unwrap_or_default();
        let from = self.param("From").unwrap_or_default();
        owned(&[
            ("AccountSid", ACCOUNT_SID),
            ("ApiVersion", "2010-04-01"),
            ("CallSid", &self.sid),
            ("CallStatus", "in-progress"),
            ("Called", to),
            ("Caller", from),
            ("Direction", "outbound-api"),
            ("From", from),
            ("To", to),
        ])
    }

    /// POSTs the call's `Url` as Twilio does on answer (signed) and returns the relay's answer.
    ///
    /// # Panics
    /// When the create request had no `Url` or the relay does not answer.
    pub fn post_webhook(&self) -> Response {
        let url = self.webhook_url();
        post_signed(split_url(url).0, url, url, &self.webhook_params())
    }

    /// The `Url` the relay created the call with.
    ///
    /// # Panics
    /// When it created it without one.
    pub fn webhook_url(&self) -> &str {
        self.param("Url").unwrap_or_else(|| panic!("call {} was created without a Url", self.sid))
    }

    /// As [`Self::post_webhook`], but delivered to `node` whatever the URL's host (as a balancer in
    /// front of several relays routes it), with the URL's authority as `Host`; the request's
    /// target is `sent_url`'s path and query while the signature covers the call's own `Url` (the
    /// same URL unless a test tampers with it on the way).
    ///
    /// # Panics
    /// When the relay does not answer.
    pub fn post_webhook_at(&self, node: SocketAddr, sent_url: &str) -> Response {
        post_signed(node, sent_url, self.webhook_url(), &self.webhook_params())
    }

    /// [`Self::fetch_twiml`] from `node` (see [`Self::post_webhook_at`]).
    ///
    /// # Panics
    /// When the relay answers anything but 200 TwiML.
    pub fn fetch_twiml_at(&self, node: SocketAddr) -> Twiml {
        let resp = self.post_webhook_at(node, self.webhook_url());
        assert_eq!(resp.status, 200, "voice webhook for {} at {node}: {}", self.sid, resp.text());
        Twiml::parse(&resp.text())
    }

    /// [`Self::open_stream`] to `node` whatever the stream URL's host (as a balancer routes it),
    /// signed over the stream URL (the relay must know that URL's host as its `--public-url`: the
    /// upgrade's `Host` names `node`).
    ///
    /// # Panics
    /// When the relay refuses the upgrade.
    pub fn open_stream_at(&self, node: SocketAddr, twiml: &Twiml) -> TwilioCaller {
        let (_, _, path) = split_url_unresolved(&twiml.stream_url);
        let signature = sign_url(AUTH_TOKEN, &twiml.stream_url);
        let headers = [("X-Twilio-Signature", signature.as_str()), ("User-Agent", "Twilio.TmeWs/1.0")];
        let peer = Peer::connect(node, &path, &headers)
            .unwrap_or_else(|status| panic!("stream upgrade to {} at {node} refused with {status}", twiml.stream_url));
        let params: Vec<(&str, &str)> = twiml.parameters.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        TwilioCaller::greet(peer, &self.sid, &params)
    }

    /// [`Self::post_webhook`], asserted 200 `text/xml`, parsed.
    ///
    /// # Panics
    /// When the relay answers anything else.
    pub fn fetch_twiml(&self) -> Twiml {
        let resp = self.post_webhook();
        assert_eq!(resp.status, 200, "voice webhook for {}: {}", self.sid, resp.text());
        let ct = resp.header("content-type").unwrap_or_default();
        assert!(ct.starts_with("text/xml") || ct.starts_with("application/xml"), "TwiML content-type: {ct:?}");
        Twiml::parse(&resp.text())
    }

    /// Opens the Media Stream `twiml` names as Twilio does (upgrade signed over the stream URL,
    /// then `connected` and `start` with the TwiML's parameters as `customParameters`).
    ///
    /// # Panics
    /// When the relay refuses the upgrade.
    pub fn open_stream(&self, twiml: &Twiml) -> TwilioCaller {
        let (addr, authority, path) = split_url(&twiml.stream_url);
        let signature = sign_url(AUTH_TOKEN, &twiml.stream_url);
        let headers = [("X-Twilio-Signature", signature.as_str()), ("User-Agent", "Twilio.TmeWs/1.0")];
        let peer = Peer::connect(addr, &path, &headers).unwrap_or_else(|status| {
            panic!("stream upgrade to {} ({authority}) refused with {status}", twiml.stream_url)
        });
        let params: Vec<(&str, &str)> = twiml.parameters.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        TwilioCaller::greet(peer, &self.sid, &params)
    }

    /// Answers the call as Twilio does: fetches the TwiML and opens its stream.
    pub fn answer(&self) -> (Twiml, TwilioCaller) {
        let twiml = self.fetch_twiml();
        let caller = self.open_stream(&twiml);
        (twiml, caller)
    }

    /// Sends a signed status callback to the call's `StatusCallback` with `CallStatus` = `status`
    /// (and `CallDuration`/`Duration` when given) and returns the relay's answer.
    ///
    /// # Panics
    /// When the call was created without a `StatusCallback` or the relay does not answer.
    pub fn status_callback(&self, status: &str, duration_secs: Option<u64>) -> Response {
        let url = self
            .param("StatusCallback")
            .unwrap_or_else(|| panic!("call {} was created without a StatusCallback", self.sid));
        let to = self.param("To").unwrap_or_default();
        let from = self.param("From").unwrap_or_default();
        let mut params = owned(&[
            ("AccountSid", ACCOUNT_SID),
            ("ApiVersion", "2010-04-01"),
            ("CallSid", &self.sid),
            ("CallStatus", status),
            ("CallbackSource", "call-progress-events"),
            ("Called", to),
            ("Caller", from),
            ("Direction", "outbound-api"),
            ("From", from),
            ("SequenceNumber", "0"),
            ("To", to),
        ]);
        if let Some(d) = duration_secs {
            params.push(("CallDuration".to_owned(), d.to_string()));
            params.push(("Duration".to_owned(), d.div_ceil(60).to_string()));
        }
        post_signed(split_url(url).0, url, url, &params)
    }

    /// Hangs up as Twilio does: `stop` on the stream, waits for the relay to close it, then the
    /// `completed` status callback with `CallDuration` = `duration_secs`.
    ///
    /// # Panics
    /// When the relay does not close the stream or refuses the callback.
    pub fn hang_up(&self, caller: &TwilioCaller, duration_secs: u64) {
        caller.wait_sent();
        caller.stop();
        caller.wait_closed();
        let resp = self.status_callback("completed", Some(duration_secs));
        assert_eq!(resp.status, 200, "completed callback for {}: {}", self.sid, resp.text());
    }
}

/// POSTs `params` form-encoded to `addr`, to `url`'s path and query (an `http://` URL) with its
/// authority as `Host`, with Twilio's signature over `signed_url`.
fn post_signed(addr: SocketAddr, url: &str, signed_url: &str, params: &[(String, String)]) -> Response {
    let (_, authority, path) = split_url_unresolved(url);
    let signature = sign(AUTH_TOKEN, signed_url, params);
    let body = encode_form(params);
    let headers = [
        ("Host", authority.as_str()),
        ("Content-Type", "application/x-www-form-urlencoded"),
        ("X-Twilio-Signature", signature.as_str()),
        ("User-Agent", "TwilioProxy/1.1"),
        ("Connection", "close"),
    ];
    Conn::open(addr).request("POST", &path, &headers, Some(&body))
}

/// The socket address, authority and path of an `http://` or `ws://` URL.
///
/// # Panics
/// For other schemes, or when the host does not resolve.
fn split_url(url: &str) -> (SocketAddr, String, String) {
    let (with_port, authority, path) = split_url_unresolved(url);
    let addrs: Vec<SocketAddr> =
        with_port.to_socket_addrs().unwrap_or_else(|e| panic!("resolve {authority}: {e}")).collect();
    let addr = addrs.iter().find(|a| a.is_ipv4()).or_else(|| addrs.first()).copied();
    let addr = addr.unwrap_or_else(|| panic!("{authority} has no address"));
    (addr, authority, path)
}

/// The `host:port` (port 80 when absent), authority and path of an `http://` or `ws://` URL.
///
/// # Panics
/// For other schemes.
fn split_url_unresolved(url: &str) -> (String, String, String) {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("ws://"))
        .unwrap_or_else(|| panic!("the stand-in calls plain http:// and ws:// URLs only: {url}"));
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    let with_port = if authority.contains(':') { authority.to_owned() } else { format!("{authority}:80") };
    (with_port, authority.to_owned(), path.to_owned())
}

/// Twilio's signature: base64(HMAC-SHA1(token, url + key₁value₁key₂value₂…)) over the parameters
/// sorted by key.
pub fn sign<K: AsRef<str>, V: AsRef<str>>(token: &str, url: &str, params: &[(K, V)]) -> String {
    let mut sorted: Vec<(&str, &str)> = params.iter().map(|(k, v)| (k.as_ref(), v.as_ref())).collect();
    sorted.sort_unstable();
    let mut mac = Hmac::<Sha1>::new_from_slice(token.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(url.as_bytes());
    for (k, v) in sorted {
        mac.update(k.as_bytes());
        mac.update(v.as_bytes());
    }
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// A Twilio caller on `relay` (configured with [`AUTH_TOKEN`]) for call `sid` on the flat
/// `/twilio/stream`: the upgrade signed as Twilio signs it, and the `relaySig` parameter the relay's
/// TwiML would have handed out (base64 HMAC-SHA1 of the sid), then `params`.
///
/// # Panics
/// When the relay refuses the upgrade.
pub fn signed_caller(relay: &crate::Relay, sid: &str, params: &[(&str, &str)]) -> TwilioCaller {
    let url = format!("ws://{}/twilio/stream", relay.addr());
    let signature = sign_url(AUTH_TOKEN, &url);
    let peer = Peer::connect(relay.addr(), "/twilio/stream", &[("X-Twilio-Signature", signature.as_str())])
        .unwrap_or_else(|status| panic!("stream upgrade refused with {status}"));
    let mut mac = Hmac::<Sha1>::new_from_slice(AUTH_TOKEN.as_bytes()).expect("any key length");
    mac.update(sid.as_bytes());
    let relay_sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    let mut all = vec![("callSid", sid), ("relaySig", relay_sig.as_str())];
    all.extend_from_slice(params);
    TwilioCaller::greet(peer, sid, &all)
}

/// Twilio's signature of a request with no form parameters (a WebSocket upgrade).
pub fn sign_url(token: &str, url: &str) -> String {
    sign::<&str, &str>(token, url, &[])
}

/// `application/x-www-form-urlencoded` of `params`, everything but unreserved characters escaped.
pub fn encode_form(params: &[(String, String)]) -> String {
    params.iter().map(|(k, v)| format!("{}={}", percent_encode(k), percent_encode(v))).collect::<Vec<_>>().join("&")
}

/// Decodes an `application/x-www-form-urlencoded` body (`+` is a space), in order.
pub fn decode_form(body: &str) -> Vec<(String, String)> {
    body.split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

/// `(name, value)` pairs as owned strings.
pub fn owned(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

/// Percent-encodes everything but unreserved characters (form and query values).
pub fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => char::from(b).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let hex = |b: u8| char::from(b).to_digit(16);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex)) {
            (b'+', _, _) => out.push(b' '),
            (b'%', Some(hi), Some(lo)) => {
                out.push((hi * 16 + lo) as u8);
                i += 2;
            }
            (b, _, _) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The signer reproduces Twilio's documented example (token 12345, its URL and parameters).
    #[test]
    fn signer_matches_twilios_documented_example() {
        let params = owned(&[
            ("CallSid", "CA1234567890ABCDE"),
            ("Caller", "+12349013030"),
            ("Digits", "1234"),
            ("From", "+12349013030"),
            ("To", "+18005551212"),
        ]);
        assert_eq!(
            sign("12345", "https://mycompany.com/myapp.php?foo=1&bar=2", &params),
            "0/KCTR6DLpKmkAf8muzZqo1nDgQ="
        );
    }

    /// Forms round-trip through the encoder and decoder; `+` decodes to a space.
    #[test]
    fn forms_round_trip() {
        let params = owned(&[("To", "+1 555"), ("Url", "http://h:1/a?b=c&d"), ("E", ""), ("Ü", "%")]);
        assert_eq!(decode_form(&encode_form(&params)), params);
        assert_eq!(decode_form("a=b+c&d=%2B1&e"), owned(&[("a", "b c"), ("d", "+1"), ("e", "")]));
        assert_eq!(decode_form("bad=%zz&cut=%4"), owned(&[("bad", "%zz"), ("cut", "%4")]));
    }

    /// TwiML parsing finds the stream URL and unescaped parameters in order.
    #[test]
    fn twiml_parsing() {
        let text = concat!(
            r#"<?xml version="1.0" encoding="UTF-8"?><Response><Connect><Stream url="ws://127.0.0.1:1/twilio/stream">"#,
            r#"<Parameter name="callSid" value="CA1"/>"#,
            r#"<Parameter name="prompt" value="a &lt;b&gt; &amp; &quot;c&quot;"/>"#,
            r#"</Stream></Connect></Response>"#
        );
        let twiml = Twiml::parse(text);
        assert_eq!(twiml.stream_url, "ws://127.0.0.1:1/twilio/stream");
        assert_eq!(twiml.parameters, owned(&[("callSid", "CA1"), ("prompt", "a <b> & \"c\"")]));
    }
}
