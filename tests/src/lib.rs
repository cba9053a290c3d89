//! Black-box harness for Relay's loopback integration tests: starts the real `relay` binary on an
//! ephemeral port and talks to it as clients do, with a raw HTTP/1.1 client, a WebSocket client
//! (tungstenite) and a raw WebSocket frame writer for what well-behaved clients never send.
//!
//! Invariant: every wait is bounded (socket read timeouts, polling deadlines), so a server bug fails
//! a test instead of hanging it; readiness is polled on `/health`, never slept for.

use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde_json::{json, Value};
use tungstenite::client::IntoClientRequest as _;
use tungstenite::handshake::HandshakeError;
use tungstenite::http::{HeaderName, HeaderValue};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::CloseFrame;
use tungstenite::Message;

pub mod browser;
pub mod cluster;
pub mod console_page;
pub mod firefox;
pub mod postgres;
pub mod ptime;
pub mod telephony;
pub mod tools_server;
pub mod twilio_rest;
pub mod webrtc;

/// Longest any single wait in the harness lasts: a read, a startup, an exit, a poll.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// Pause between two attempts of a polled condition (polling, not a readiness sleep).
pub(crate) const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// The text the relay logs once it listens; the address follows it.
const LISTENING: &str = "listening on http://";

/// A running `relay` process on an ephemeral loopback port, killed when dropped.
pub struct Relay {
    child: Child,
    addr: SocketAddr,
    logs: Arc<Mutex<Vec<String>>>,
    api_key: Option<String>,
    cores: usize,
    data_dir: PathBuf,
    exit: Option<ExitStatus>,
}

impl Relay {
    /// Starts `relay --listen 127.0.0.1:0 --cores 2 --data-dir <fresh temp dir>` plus `args`
    /// (which may override any of those) and waits until `/health` answers 200.
    ///
    /// # Panics
    /// When the relay exits, does not log its address, or is not healthy within [`TIMEOUT`].
    pub fn start(args: &[&str]) -> Self {
        Self::start_with_env(args, &[])
    }

    /// As [`Self::start`], with extra environment variables (the flags' `RELAY_*` twins count as
    /// overriding the defaults too).
    ///
    /// # Panics
    /// As [`Self::start`].
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Self {
        let given = |flag: &str, var: &str| {
            args.iter().any(|a| *a == flag || a.starts_with(&format!("{flag}="))) || env.iter().any(|(k, _)| *k == var)
        };
        let data_dir = temp_dir("data");
        let mut cmd = relay_command();
        if !given("--listen", "RELAY_LISTEN") {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        if !given("--cores", "RELAY_CORES") {
            cmd.args(["--cores", "2"]);
        }
        // Tests run in parallel: each relay takes free WebRTC ports, not 40000 and up.
        if !given("--rtc-port-base", "RELAY_RTC_PORT_BASE") {
            cmd.args(["--rtc-port-base", "0"]);
        }
        if !given("--data-dir", "RELAY_DATA_DIR") {
            cmd.arg("--data-dir").arg(&data_dir);
        }
        cmd.args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let cores = flag_value(args, "--cores")
            .or_else(|| env.iter().find(|(k, _)| *k == "RELAY_CORES").map(|(_, v)| (*v).to_owned()))
            .map_or(2, |v| v.parse().expect("--cores in the test's args is a number"));
        let api_key = flag_value(args, "--api-key")
            .or_else(|| env.iter().find(|(k, _)| *k == "RELAY_API_KEY").map(|(_, v)| (*v).to_owned()));

        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn the relay binary");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (addr_tx, addr_rx) = mpsc::channel();
        pump(child.stdout.take().expect("piped stdout"), logs.clone(), Some(addr_tx.clone()));
        pump(child.stderr.take().expect("piped stderr"), logs.clone(), Some(addr_tx));

        let Ok(addr) = addr_rx.recv_timeout(TIMEOUT) else {
            let _ = child.kill();
            let status = child.wait().ok();
            let logs = logs.lock().expect("log lock").join("\n");
            let _ = std::fs::remove_dir_all(&data_dir);
            panic!("relay did not log `{LISTENING}<addr>` (exit status {status:?}); output:\n{logs}");
        };
        let tls = given("--tls-cert", "RELAY_TLS_CERT");
        let mut relay = Self { child, addr, logs, api_key, cores, data_dir, exit: None };
        // A TLS relay logs its address once every core serves; its tests speak TLS themselves.
        if !tls {
            relay.wait_healthy();
        }
        relay
    }

    /// The address the relay listens on (loopback when it listens on an unspecified address).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Number of cores the relay was started with.
    pub fn cores(&self) -> usize {
        self.cores
    }

    /// The API key the relay was started with, if any.
    pub fn api_key(&self) -> Option<&str> {
        self.api_key.as_deref()
    }

    /// Every line the relay wrote to stdout and stderr so far.
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().expect("log lock").clone()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The relay process's resident memory now, bytes.
    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("the relay's status");
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS");
        kib * 1024
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) to the relay process.
    pub fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits pid_t");
        // SAFETY: kill has no memory effects; the pid is our own child, not yet reaped (we reap it
        // only in wait_exit/drop), so it cannot name another process.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0, "kill({pid}, {signal}) failed: {}", io::Error::last_os_error());
    }

    /// Sends SIGTERM and waits (bounded by [`TIMEOUT`]) for the process to exit.
    ///
    /// # Panics
    /// When the relay has not exited within [`TIMEOUT`] (it is then killed).
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait_exit(TIMEOUT)
    }

    /// Waits up to `limit` for the process to exit on its own.
    ///
    /// # Panics
    /// When it has not exited by then (it is then killed).
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        if let Some(status) = self.exit {
            return status;
        }
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait on the relay") {
                self.exit = Some(status);
                return status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let status = self.child.wait().expect("wait for the killed relay");
                self.exit = Some(status);
                panic!("relay did not exit within {limit:?}; logs:\n{}", self.logs().join("\n"));
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        if self.exit.is_some() {
            return false;
        }
        match self.child.try_wait().expect("try_wait on the relay") {
            Some(status) => {
                self.exit = Some(status);
                false
            }
            None => true,
        }
    }

    /// A new keep-alive connection that sends the API key (if any) on its `get`/`post` helpers.
    pub fn conn(&self) -> Conn {
        let mut conn = Conn::open(self.addr);
        conn.bearer = self.api_key.clone();
        conn
    }

    /// One request on a new connection with `Connection: close`, exactly the given headers
    /// (no API key added).
    pub fn request(&self, method: &str, path: &str, headers: &[(&str, &str)], body: Option<&str>) -> Response {
        let mut all: Vec<(&str, &str)> = headers.to_vec();
        all.push(("Connection", "close"));
        Conn::open(self.addr).request(method, path, &all, body)
    }

    /// `GET path` on a new connection, with the API key when the relay has one.
    pub fn get(&self, path: &str) -> Response {
        self.conn().get(path)
    }

    /// `POST path` with a JSON body on a new connection, with the API key when the relay has one.
    pub fn post(&self, path: &str, body: &Value) -> Response {
        self.conn().post(path, body)
    }

    /// `POST /start-call` with just `sessionId` and `accessToken`.
    pub fn start_call(&self, id: &str, token: &str) -> Response {
        self.post("/start-call", &json!({ "sessionId": id, "accessToken": token }))
    }

    /// `POST /stop-call`.
    pub fn stop_call(&self, id: &str) -> Response {
        self.post("/stop-call", &json!({ "sessionId": id }))
    }

    /// `GET /health`, asserted 200, as JSON.
    pub fn health(&self) -> Value {
        let resp = self.get("/health");
        assert_eq!(resp.status, 200, "GET /health: {}", resp.text());
        resp.json()
    }

    /// `GET /health/detailed`, asserted 200, as JSON.
    pub fn detailed(&self) -> Value {
        let resp = self.get("/health/detailed");
        assert_eq!(resp.status, 200, "GET /health/detailed: {}", resp.text());
        resp.json()
    }

    /// `activeSessions` of `/health`.
    pub fn active_sessions(&self) -> u64 {
        self.health()["activeSessions"].as_u64().expect("activeSessions is a number")
    }

    /// The `sessions` count of each core in `/health/detailed`, indexed by core id.
    pub fn core_sessions(&self) -> Vec<u64> {
        let detailed = self.detailed();
        let cores = detailed["services"]["server"]["cores"].as_array().expect("services.server.cores is an array");
        let mut counts = vec![0; cores.len()];
        for core in cores {
            let id = core["id"].as_u64().expect("core id") as usize;
            counts[id] = core["sessions"].as_u64().expect("core sessions count");
        }
        counts
    }

    /// Opens `/ws` at `path` (with query) using exactly `headers`; `Err(status)` when the relay
    /// refuses the upgrade with an HTTP status.
    ///
    /// # Panics
    /// When the connection or handshake fails for any other reason.
    pub fn ws(&self, path: &str, headers: &[(&str, &str)]) -> Result<Ws, u16> {
        Ws::connect(self.addr, path, headers)
    }

    /// Opens `/ws?sessionId=id` with `Authorization: Bearer token`, asserts the upgrade and the
    /// `connection_established` greeting, and returns the socket.
    ///
    /// # Panics
    /// When the upgrade is refused or the greeting is not the expected one.
    pub fn observe(&self, id: &str, token: &str) -> Ws {
        let auth = format!("Bearer {token}");
        let mut ws = match self.ws(&format!("/ws?sessionId={id}"), &[("Authorization", &auth)]) {
            Ok(ws) => ws,
            Err(status) => panic!("/ws for {id} refused with {status}"),
        };
        let greeting = ws.recv_json();
        assert_eq!(greeting["type"], "connection_established", "greeting: {greeting}");
        assert_eq!(greeting["sessionId"], id, "greeting: {greeting}");
        ws
    }

    fn wait_healthy(&mut self) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if !self.is_running() {
                panic!("relay exited with {:?} before it was healthy; logs:\n{}", self.exit, self.logs().join("\n"));
            }
            let ok = Conn::try_open(self.addr)
                .and_then(|mut c| {
                    c.send("GET", "/health", &[("Connection", "close")], None);
                    c.try_read_response()
                })
                .is_ok_and(|r| r.status == 200);
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "relay not healthy within {TIMEOUT:?}; logs:\n{}",
                self.logs().join("\n")
            );
            std::thread::sleep(POLL_INTERVAL);
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if self.exit.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            let logs = self.logs();
            let tail = &logs[logs.len().saturating_sub(60)..];
            eprintln!("---- relay output (last {} lines) ----\n{}", tail.len(), tail.join("\n"));
        }
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

/// The `relay` binary: `$RELAY_BIN`, or `target/<profile>/relay` next to this test executable,
/// brought up to date with `cargo build -p relay-control --bin relay` once per test process.
///
/// # Panics
/// When the build fails or the binary is still missing afterwards.
pub fn relay_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(path) = std::env::var_os("RELAY_BIN") {
            return PathBuf::from(path);
        }
        let exe = std::env::current_exe().expect("path of the test executable");
        // target/<profile>/deps/<test> → target/<profile>
        let profile_dir = exe.parent().and_then(Path::parent).expect("test executable lives in target/<profile>/deps");
        let profile = profile_dir.file_name().and_then(|s| s.to_str()).expect("profile directory name");
        let target_dir = profile_dir.parent().expect("target directory");
        // Built every time (a no-op when fresh) so the tests never run a stale server.
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut build = Command::new(cargo);
        build
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
            .args(["build", "--quiet", "-p", "relay-control", "--bin", "relay", "--target-dir"])
            .arg(target_dir);
        if profile != "debug" {
            build.args(["--profile", profile]);
        }
        let out = build.output().expect("run cargo build for the relay binary");
        assert!(out.status.success(), "cargo build of the relay failed:\n{}", String::from_utf8_lossy(&out.stderr));
        let bin = profile_dir.join("relay");
        assert!(bin.exists(), "{} missing after cargo build", bin.display());
        bin
    })
    .clone()
}

/// A `Command` for the relay binary with no inherited `RELAY_*` variables, `RELAY_LOG=info` and
/// no colour codes in its output.
pub fn relay_command() -> Command {
    let mut cmd = Command::new(relay_bin());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("RELAY_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("RELAY_LOG", "info").env("NO_COLOR", "1");
    cmd
}

/// Runs `cmd` to completion with stdout and stderr captured, killing it after `limit`.
///
/// # Panics
/// When it is still running after `limit`.
pub fn output_bounded(mut cmd: Command, limit: Duration) -> Output {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn the relay binary");
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let out_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stdout.read_to_end(&mut v);
        v
    });
    let err_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stderr.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let err = err_reader.join().unwrap_or_default();
            panic!("relay still running after {limit:?}; stderr:\n{}", String::from_utf8_lossy(&err));
        }
        std::thread::sleep(POLL_INTERVAL);
    };
    Output {
        status,
        stdout: out_reader.join().expect("stdout reader thread"),
        stderr: err_reader.join().expect("stderr reader thread"),
    }
}

/// Asks for a send buffer of `bytes` on `stream` (the kernel may round or cap it): a small one makes
/// what a client writes reach the relay as the relay reads it, a large one lets a whole pipeline
/// sit in the client's kernel.
///
/// # Panics
/// When `setsockopt` fails.
pub fn set_send_buffer(stream: &TcpStream, bytes: libc::c_int) {
    use std::os::fd::AsRawFd as _;
    // SAFETY: setsockopt on a socket we own, with a pointer to a c_int that outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&bytes as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "setsockopt SO_SNDBUF: {}", io::Error::last_os_error());
}

/// A fresh, empty, uniquely named directory under the system temp dir.
pub fn temp_dir(label: &str) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("relay-tests-{label}-{}-{n}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

/// 64-bit FNV-1a of `s`'s bytes (offset basis `0xcbf29ce484222325`, prime `0x100000001b3`),
/// written here independently of the engine.
pub fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

/// The core that must own session `id` on a relay with `cores` cores.
pub fn owner(id: &str, cores: usize) -> usize {
    (fnv1a(id) % cores as u64) as usize
}

/// The first `n` ids `"{prefix}-{i}"` that core `core` of `cores` owns.
pub fn ids_on_core(prefix: &str, core: usize, cores: usize, n: usize) -> Vec<String> {
    (0..).map(|i| format!("{prefix}-{i}")).filter(|id| owner(id, cores) == core).take(n).collect()
}

/// Calls `probe` until it returns `Some`, for at most [`TIMEOUT`].
///
/// # Panics
/// When `probe` still returns `None` at the deadline; `what` names the awaited condition.
pub fn poll_until<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {TIMEOUT:?} waiting for {what}");
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Whether `s` looks like an RFC 3339 date-time (`YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`).
pub fn is_rfc3339(s: &str) -> bool {
    let b = s.as_bytes();
    let digits = |r: std::ops::Range<usize>| b.get(r).is_some_and(|d| d.iter().all(u8::is_ascii_digit));
    if b.len() < 20
        || !(digits(0..4) && digits(5..7) && digits(8..10) && digits(11..13) && digits(14..16) && digits(17..19))
    {
        return false;
    }
    if b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't') || b[13] != b':' || b[16] != b':' {
        return false;
    }
    let mut rest = &s[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let n = frac.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 {
            return false;
        }
        rest = &frac[n..];
    }
    rest == "Z" || rest == "z" || {
        let r = rest.as_bytes();
        r.len() == 6
            && matches!(r[0], b'+' | b'-')
            && r[1..3].iter().all(u8::is_ascii_digit)
            && r[3] == b':'
            && r[4..6].iter().all(u8::is_ascii_digit)
    }
}

/// Whether `v` is a string of decimal digits that reads as a plausible Unix time in milliseconds.
pub fn is_ms_timestamp(v: &Value) -> bool {
    v.as_str()
        .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|s| s.parse::<u64>().ok())
        .is_some_and(|ms| ms > 1_600_000_000_000)
}

/// Asserts a 200 success envelope with `message` (JSON content type, `success: true`) and returns
/// its `data`.
///
/// # Panics
/// When the response is anything else.
pub fn assert_success(resp: &Response, message: &str) -> Value {
    assert_eq!(resp.status, 200, "expected 200 {message:?}, got {}: {}", resp.status, resp.text());
    assert_json_type(resp);
    let v = resp.json();
    assert_eq!(v["success"], true, "success envelope: {v}");
    assert_eq!(v["message"], message, "success envelope: {v}");
    assert!(v["data"].is_object(), "success envelope has an object `data`: {v}");
    v["data"].clone()
}

/// Asserts the error envelope `{"success":false,"error":"<sentence>"}` with `status`.
///
/// # Panics
/// When the response is anything else.
pub fn assert_error(resp: &Response, status: u16) {
    assert_eq!(resp.status, status, "expected {status}, got {}: {}", resp.status, resp.text());
    assert_json_type(resp);
    let v = resp.json();
    assert_eq!(v["success"], false, "error envelope: {v}");
    assert!(v["error"].as_str().is_some_and(|e| !e.trim().is_empty()), "error envelope has a sentence: {v}");
    assert!(v.get("data").is_none(), "error envelope carries no data: {v}");
}

/// Asserts `Content-Type: application/json` (parameters such as charset allowed).
///
/// # Panics
/// When the header is missing or another type.
pub fn assert_json_type(resp: &Response) {
    let ct = resp.header("content-type").unwrap_or_default().to_ascii_lowercase();
    assert!(ct.starts_with("application/json"), "content-type {ct:?} for {} {}", resp.status, resp.text());
}

/// An HTTP response as read off the wire.
#[derive(Debug, Clone)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Header fields in order, names lowercased.
    pub headers: Vec<(String, String)>,
    /// The body (empty for HEAD, 1xx, 204 and 304).
    pub body: Vec<u8>,
}

impl Response {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers.iter().find(|(k, _)| *k == name).map(|(_, v)| v.as_str())
    }

    /// The body as JSON.
    ///
    /// # Panics
    /// When the body is not JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body of {} is not JSON ({e}): {:?}", self.status, self.text()))
    }

    /// The body as (lossy) text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The `x-relay-core` header as a number.
    pub fn core(&self) -> Option<usize> {
        self.header("x-relay-core").and_then(|v| v.trim().parse().ok())
    }
}

/// One HTTP/1.1 client connection over a blocking `TcpStream` with [`TIMEOUT`] reads: keep-alive,
/// pipelining and raw bytes.
pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    host: String,
    /// For each request sent and not yet answered: whether it was a HEAD (no body comes back).
    head_only: VecDeque<bool>,
    bearer: Option<String>,
}

impl Conn {
    /// Connects to `addr`.
    ///
    /// # Panics
    /// When the connection fails.
    pub fn open(addr: SocketAddr) -> Self {
        Self::try_open(addr).unwrap_or_else(|e| panic!("connect to {addr}: {e}"))
    }

    /// Connects to `addr`.
    ///
    /// # Errors
    /// When the connection fails.
    pub fn try_open(addr: SocketAddr) -> io::Result<Self> {
        let stream = TcpStream::connect_timeout(&addr, TIMEOUT)?;
        stream.set_read_timeout(Some(TIMEOUT))?;
        stream.set_write_timeout(Some(TIMEOUT))?;
        stream.set_nodelay(true)?;
        Ok(Self { stream, buf: Vec::new(), host: addr.to_string(), head_only: VecDeque::new(), bearer: None })
    }

    /// The socket, e.g. to change its timeouts or shut it down.
    pub fn stream(&mut self) -> &mut TcpStream {
        &mut self.stream
    }

    /// Sends a request without waiting for its answer. Adds `Host`, and for a body
    /// `Content-Length` and `Content-Type: application/json` unless `headers` has them.
    ///
    /// # Panics
    /// When the write fails.
    pub fn send(&mut self, method: &str, path: &str, headers: &[(&str, &str)], body: Option<&str>) {
        let bytes = format_request(method, path, &self.host, headers, body);
        self.head_only.push_back(method.eq_ignore_ascii_case("HEAD"));
        self.stream.write_all(&bytes).unwrap_or_else(|e| panic!("write {method} {path}: {e}"));
    }

    /// Writes raw bytes (which may be several requests, or garbage).
    ///
    /// # Errors
    /// When the write fails (the peer may have closed).
    pub fn write_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Sends a request and reads its answer.
    ///
    /// # Panics
    /// When the write fails or no whole response arrives within [`TIMEOUT`].
    pub fn request(&mut self, method: &str, path: &str, headers: &[(&str, &str)], body: Option<&str>) -> Response {
        self.send(method, path, headers, body);
        self.read_response()
    }

    /// `GET path`, with the relay's API key if this connection came from [`Relay::conn`].
    pub fn get(&mut self, path: &str) -> Response {
        let auth = self.bearer.as_ref().map(|k| format!("Bearer {k}"));
        let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
        self.request("GET", path, &headers, None)
    }

    /// `POST path` with a JSON body, with the relay's API key if this connection came from
    /// [`Relay::conn`].
    pub fn post(&mut self, path: &str, body: &Value) -> Response {
        let auth = self.bearer.as_ref().map(|k| format!("Bearer {k}"));
        let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
        self.request("POST", path, &headers, Some(&body.to_string()))
    }

    /// Reads the next response (an interim 1xx one included).
    ///
    /// # Panics
    /// When none arrives within [`TIMEOUT`] or the connection ends first.
    pub fn read_response(&mut self) -> Response {
        self.try_read_response()
            .unwrap_or_else(|e| panic!("reading a response: {e} (buffered: {:?})", String::from_utf8_lossy(&self.buf)))
    }

    /// Reads the next response (an interim 1xx one included).
    ///
    /// # Errors
    /// When the connection ends, times out or the bytes are not an HTTP response.
    pub fn try_read_response(&mut self) -> io::Result<Response> {
        let head_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i + 4;
            }
            self.fill()?;
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end - 4]).into_owned();
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let mut parts = status_line.split(' ');
        let version = parts.next().unwrap_or_default();
        let status: u16 = parts
            .next()
            .and_then(|s| s.parse().ok())
            .filter(|_| version.starts_with("HTTP/1."))
            .ok_or_else(|| invalid(format!("bad status line {status_line:?}")))?;
        let mut headers = Vec::new();
        for line in lines {
            let (name, value) = line.split_once(':').ok_or_else(|| invalid(format!("bad header line {line:?}")))?;
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
        }
        self.buf.drain(..head_end);
        let interim = (100..200).contains(&status);
        let head_only = if interim { false } else { self.head_only.pop_front().unwrap_or(false) };
        let length = headers.iter().find(|(k, _)| k == "content-length").map(|(_, v)| v.clone());
        let body = if head_only || interim || status == 204 || status == 304 {
            Vec::new()
        } else if let Some(length) = length {
            let n: usize = length.parse().map_err(|_| invalid(format!("bad content-length {length:?}")))?;
            while self.buf.len() < n {
                self.fill()?;
            }
            self.buf.drain(..n).collect()
        } else {
            // No length: the body runs to the end of the connection.
            loop {
                match self.fill() {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
                    Err(e) => return Err(e),
                }
            }
            std::mem::take(&mut self.buf)
        };
        Ok(Response { status, headers, body })
    }

    /// Whether the server closes the connection (EOF or reset) within [`TIMEOUT`] without sending
    /// anything more.
    pub fn closed_by_server(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut byte = [0u8; 1];
        match self.stream.read(&mut byte) {
            Ok(0) => true,
            Ok(_) => {
                self.buf.push(byte[0]);
                false
            }
            Err(e) => matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted | io::ErrorKind::BrokenPipe
            ),
        }
    }

    /// Gives up the connection: the socket and any bytes already read past the last response.
    pub fn into_parts(self) -> (TcpStream, Vec<u8>) {
        (self.stream, self.buf)
    }

    fn fill(&mut self) -> io::Result<()> {
        let mut chunk = [0u8; 16 * 1024];
        let n = self.stream.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed by the server"));
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }
}

/// The bytes of an HTTP/1.1 request, as [`Conn::send`] writes them.
pub fn format_request(method: &str, path: &str, host: &str, headers: &[(&str, &str)], body: Option<&str>) -> Vec<u8> {
    let has = |name: &str| headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(name));
    let mut out = format!("{method} {path} HTTP/1.1\r\n");
    if !has("host") {
        out.push_str(&format!("Host: {host}\r\n"));
    }
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(body) = body {
        if !has("content-type") {
            out.push_str("Content-Type: application/json\r\n");
        }
        if !has("content-length") {
            out.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
    }
    out.push_str("\r\n");
    if let Some(body) = body {
        out.push_str(body);
    }
    out.into_bytes()
}

/// What a WebSocket read produced.
#[derive(Debug, Clone, PartialEq)]
pub enum WsMsg {
    /// A text message holding JSON.
    Json(Value),
    /// A text message that is not JSON.
    Text(String),
    /// A binary message.
    Binary(Vec<u8>),
    /// A pong control frame with its payload.
    Pong(Vec<u8>),
    /// A close frame with its code (if any).
    Close(Option<u16>),
    /// The connection ended without (further) frames; the text says how.
    Gone(String),
}

/// Opens a client WebSocket to `path` on `addr` with `headers` added to the upgrade request; every
/// read and write bounded by [`TIMEOUT`]. `Err(status)` when the server answers another status.
///
/// # Panics
/// When connecting fails, or the handshake fails for a reason other than an HTTP status.
pub fn client_socket(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<tungstenite::WebSocket<TcpStream>, u16> {
    client_socket_answered(addr, path, headers).map(|(socket, _)| socket)
}

/// Header fields of an answer, names lowercased, in order.
pub type Fields = Vec<(String, String)>;

/// As [`client_socket`], also returning the 101's header fields (names lowercased), e.g. to read
/// which node answered (`x-relay-node`).
///
/// # Panics
/// As [`client_socket`].
pub fn client_socket_answered(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(tungstenite::WebSocket<TcpStream>, Fields), u16> {
    let stream = TcpStream::connect_timeout(&addr, TIMEOUT).unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    stream.set_read_timeout(Some(TIMEOUT)).expect("set read timeout");
    stream.set_write_timeout(Some(TIMEOUT)).expect("set write timeout");
    stream.set_nodelay(true).expect("set nodelay");
    let mut request = format!("ws://{addr}{path}").into_client_request().expect("a valid ws:// URL");
    for (k, v) in headers {
        let name = HeaderName::from_bytes(k.as_bytes()).expect("valid header name");
        request.headers_mut().append(name, HeaderValue::from_str(v).expect("valid header value"));
    }
    match tungstenite::client(request, stream) {
        Ok((socket, answer)) => {
            let fields = answer
                .headers()
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or_default().to_owned()))
                .collect();
            Ok((socket, fields))
        }
        Err(HandshakeError::Failure(tungstenite::Error::Http(resp))) => Err(resp.status().as_u16()),
        Err(e) => panic!("WebSocket handshake for {path} failed: {e}"),
    }
}

/// A WebSocket client (tungstenite) over a blocking `TcpStream`, every read bounded by [`TIMEOUT`].
pub struct Ws {
    socket: tungstenite::WebSocket<TcpStream>,
    pings: u64,
}

impl Ws {
    /// Opens a WebSocket to `path` on `addr` with exactly `headers` added to the upgrade request;
    /// `Err(status)` when the server answers with another HTTP status.
    ///
    /// # Panics
    /// When connecting fails or the handshake fails for a reason other than an HTTP status.
    pub fn connect(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Result<Self, u16> {
        client_socket(addr, path, headers).map(|socket| Self { socket, pings: 0 })
    }

    /// Reads the next message other than a ping (pings are answered by tungstenite).
    ///
    /// # Panics
    /// When nothing arrives within [`TIMEOUT`].
    pub fn recv(&mut self) -> WsMsg {
        self.recv_within(TIMEOUT).unwrap_or_else(|| panic!("no WebSocket message within {TIMEOUT:?}"))
    }

    /// Reads the next message other than a ping (pings are answered by tungstenite), waiting at
    /// most `limit` (at most [`TIMEOUT`]); `None` when nothing else arrived by then.
    pub fn recv_within(&mut self, limit: Duration) -> Option<WsMsg> {
        let deadline = Instant::now() + limit.min(TIMEOUT);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let _ = self.socket.get_mut().set_read_timeout(Some(left));
            match self.socket.read() {
                Ok(Message::Text(t)) => {
                    return Some(match serde_json::from_str(t.as_str()) {
                        Ok(v) => WsMsg::Json(v),
                        Err(_) => WsMsg::Text(t.as_str().to_owned()),
                    })
                }
                Ok(Message::Binary(b)) => return Some(WsMsg::Binary(b.to_vec())),
                Ok(Message::Pong(p)) => return Some(WsMsg::Pong(p.to_vec())),
                Ok(Message::Close(frame)) => return Some(WsMsg::Close(frame.map(|f| u16::from(f.code)))),
                Ok(Message::Ping(_)) => {
                    self.pings += 1;
                    let _ = self.socket.flush();
                }
                Ok(Message::Frame(_)) => {
                    let _ = self.socket.flush();
                }
                Err(tungstenite::Error::Io(e))
                    if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
                Err(e) => return Some(WsMsg::Gone(e.to_string())),
            }
        }
    }

    /// How many ping frames the relay sent that reads so far have seen (and answered).
    pub fn pings_seen(&self) -> u64 {
        self.pings
    }

    /// Reads the next JSON text message, skipping pongs.
    ///
    /// # Panics
    /// When the next message is anything else, or nothing arrives within [`TIMEOUT`].
    pub fn recv_json(&mut self) -> Value {
        loop {
            match self.recv() {
                WsMsg::Json(v) => return v,
                WsMsg::Pong(_) => {}
                other => panic!("expected a JSON message, got {other:?}"),
            }
        }
    }

    /// Reads the next message, asserts it is a `retell_event` of `event_type` with a millisecond
    /// timestamp, and returns its `data`.
    ///
    /// # Panics
    /// When it is not.
    pub fn expect_event(&mut self, event_type: &str) -> Value {
        let v = self.recv_json();
        assert_eq!(v["type"], "retell_event", "expected retell_event {event_type}, got {v}");
        assert_eq!(v["eventType"], event_type, "expected retell_event {event_type}, got {v}");
        assert!(is_ms_timestamp(&v["timestamp"]), "timestamp is a string of Unix ms: {v}");
        v["data"].clone()
    }

    /// Reads the next message, asserts it is a close frame and returns its code.
    ///
    /// # Panics
    /// When the next message is anything else.
    pub fn expect_close(&mut self) -> Option<u16> {
        loop {
            match self.recv() {
                WsMsg::Close(code) => return code,
                WsMsg::Pong(_) => {}
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    }

    /// Sends a text message.
    ///
    /// # Panics
    /// When the write fails.
    pub fn send_text(&mut self, text: &str) {
        self.socket.send(Message::text(text)).expect("send a text message");
    }

    /// Sends a JSON text message.
    ///
    /// # Panics
    /// When the write fails.
    pub fn send_json(&mut self, v: &Value) {
        self.send_text(&v.to_string());
    }

    /// Sends a ping control frame.
    ///
    /// # Panics
    /// When the write fails.
    pub fn send_ping(&mut self, payload: &[u8]) {
        self.socket.send(Message::Ping(payload.to_vec().into())).expect("send a ping");
    }

    /// Starts the closing handshake with code 1000 (best effort).
    pub fn close(&mut self) {
        let frame = CloseFrame { code: CloseCode::Normal, reason: "".into() };
        let _ = self.socket.close(Some(frame));
        let _ = self.socket.flush();
    }

    /// Drops the TCP connection without a closing handshake.
    pub fn abort(self) {
        let _ = self.socket.get_ref().shutdown(std::net::Shutdown::Both);
    }
}

/// A server WebSocket frame read by [`RawWs`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame {
    /// FIN bit.
    pub fin: bool,
    /// Opcode (1 text, 2 binary, 8 close, 9 ping, 10 pong, 0 continuation).
    pub opcode: u8,
    /// Unmasked payload.
    pub payload: Vec<u8>,
}

impl RawFrame {
    /// The close code of a close frame.
    pub fn close_code(&self) -> Option<u16> {
        (self.opcode == 8 && self.payload.len() >= 2).then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }
}

/// What [`RawWs::read_frame_within`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawRead {
    /// A whole frame.
    Frame(RawFrame),
    /// The connection ended (EOF or reset).
    Ended,
    /// Nothing (or only part of a frame) arrived in time.
    Quiet,
}

/// A WebSocket connection driven frame by frame, for sending what tungstenite never would
/// (fragments at will, oversized or malformed frames).
pub struct RawWs {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl RawWs {
    /// Performs the upgrade to `path` with `headers` (which replace the default upgrade headers of
    /// the same name); `Err(response)` when not answered 101.
    ///
    /// # Panics
    /// When the connection fails or no response arrives.
    pub fn connect(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Result<Self, Response> {
        Self::connect_with_early(addr, path, headers, &[])
    }

    /// As [`Self::connect`], with `early` bytes (client frames) written in the same write as the
    /// upgrade request, before any answer: they reach the relay together with the request head.
    ///
    /// # Panics
    /// When the connection fails or no response arrives.
    pub fn connect_with_early(
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
        early: &[u8],
    ) -> Result<Self, Response> {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let mut nonce = [0u8; 16];
        nonce[..8].copy_from_slice(&NEXT.fetch_add(1, Ordering::Relaxed).to_le_bytes());
        nonce[8..].copy_from_slice(&u64::from(std::process::id()).to_le_bytes());
        let key = base64::engine::general_purpose::STANDARD.encode(nonce);
        let defaults = [
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Version", "13"),
            ("Sec-WebSocket-Key", key.as_str()),
        ];
        // The caller's headers replace the defaults of the same name.
        let mut all: Vec<(&str, &str)> =
            defaults.into_iter().filter(|(d, _)| !headers.iter().any(|(h, _)| h.eq_ignore_ascii_case(d))).collect();
        all.extend_from_slice(headers);
        let mut conn = Conn::open(addr);
        let mut request = format_request("GET", path, &addr.to_string(), &all, None);
        request.extend_from_slice(early);
        conn.write_raw(&request).expect("write the upgrade request");
        let resp = conn.read_response();
        if resp.status != 101 {
            return Err(resp);
        }
        let expected = tungstenite::handshake::derive_accept_key(key.as_bytes());
        assert_eq!(resp.header("sec-websocket-accept"), Some(expected.as_str()), "101 answer has the right accept key");
        let (stream, buf) = conn.into_parts();
        Ok(Self { stream, buf })
    }

    /// Sends one masked frame.
    ///
    /// # Errors
    /// When the write fails (the server may already have closed).
    pub fn send_frame(&mut self, fin: bool, opcode: u8, payload: &[u8]) -> io::Result<()> {
        self.stream.write_all(&encode_frame(fin, opcode, payload, Some([0x37, 0xfa, 0x21, 0x3d])))
    }

    /// Writes raw bytes.
    ///
    /// # Errors
    /// When the write fails.
    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Reads the next frame; `None` when the connection ended (EOF or reset).
    ///
    /// # Panics
    /// When no frame arrives within [`TIMEOUT`], or the server sends a malformed frame.
    pub fn read_frame(&mut self) -> Option<RawFrame> {
        loop {
            if let Some((frame, used)) = decode_frame(&self.buf) {
                self.buf.drain(..used);
                return Some(frame);
            }
            let mut chunk = [0u8; 16 * 1024];
            match self.stream.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                    panic!("no WebSocket frame within {TIMEOUT:?}")
                }
                Err(_) => return None,
            }
        }
    }

    /// Reads the next frame, waiting at most `limit` (at most [`TIMEOUT`]).
    ///
    /// # Panics
    /// When the server sends a malformed frame.
    pub fn read_frame_within(&mut self, limit: Duration) -> RawRead {
        let deadline = Instant::now() + limit.min(TIMEOUT);
        let read = loop {
            if let Some((frame, used)) = decode_frame(&self.buf) {
                self.buf.drain(..used);
                break RawRead::Frame(frame);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break RawRead::Quiet;
            }
            let _ = self.stream.set_read_timeout(Some(left));
            let mut chunk = [0u8; 16 * 1024];
            match self.stream.read(&mut chunk) {
                Ok(0) => break RawRead::Ended,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
                Err(_) => break RawRead::Ended,
            }
        };
        let _ = self.stream.set_read_timeout(Some(TIMEOUT));
        read
    }

    /// Reads frames until a close frame and returns its code; `None` if the connection ended first.
    /// `seen` collects the data frames read on the way.
    pub fn read_until_close(&mut self, seen: &mut Vec<RawFrame>) -> Option<u16> {
        for _ in 0..10_000 {
            let frame = self.read_frame()?;
            if frame.opcode == 8 {
                return frame.close_code();
            }
            seen.push(frame);
        }
        panic!("no close frame among 10000 frames");
    }
}

/// Encodes one client (masked) or server (unmasked) WebSocket frame.
pub fn encode_frame(fin: bool, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(if fin { 0x80 } else { 0 } | (opcode & 0x0f));
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(mask_bit | n as u8),
        n if n <= usize::from(u16::MAX) => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(m) => {
            out.extend_from_slice(&m);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ m[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

/// Decodes one frame at the start of `buf`: the frame and the bytes it used, `None` if incomplete.
fn decode_frame(buf: &[u8]) -> Option<(RawFrame, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let fin = buf[0] & 0x80 != 0;
    let opcode = buf[0] & 0x0f;
    let masked = buf[1] & 0x80 != 0;
    let (len, mut at) = match buf[1] & 0x7f {
        126 => (usize::from(u16::from_be_bytes([*buf.get(2)?, *buf.get(3)?])), 4),
        127 => (usize::try_from(u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?)).ok()?, 10),
        n => (usize::from(n), 2),
    };
    let mask = if masked {
        let m: [u8; 4] = buf.get(at..at + 4)?.try_into().ok()?;
        at += 4;
        Some(m)
    } else {
        None
    };
    let raw = buf.get(at..at + len)?;
    let payload = match mask {
        Some(m) => raw.iter().enumerate().map(|(i, b)| b ^ m[i % 4]).collect(),
        None => raw.to_vec(),
    };
    Some((RawFrame { fin, opcode, payload }, at + len))
}

/// Reads lines from a child's pipe into `logs`, and sends the address once the relay logs it.
fn pump(reader: impl Read + Send + 'static, logs: Arc<Mutex<Vec<String>>>, addr_tx: Option<mpsc::Sender<SocketAddr>>) {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(reader);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let text = strip_ansi(&String::from_utf8_lossy(&line)).trim_end().to_owned();
            if let (Some(tx), Some(addr)) = (&addr_tx, parse_listening(&text)) {
                let _ = tx.send(addr);
            }
            logs.lock().expect("log lock").push(text);
        }
    });
}

/// The address in a `listening on http://<ip>:<port>` line, with an unspecified IP made loopback.
fn parse_listening(line: &str) -> Option<SocketAddr> {
    const TLS: &str = "listening on https://";
    let at = match line.find(LISTENING) {
        Some(i) => i + LISTENING.len(),
        None => line.find(TLS)? + TLS.len(),
    };
    let rest: String =
        line[at..].chars().take_while(|c| c.is_ascii_hexdigit() || matches!(c, '.' | ':' | '[' | ']')).collect();
    let mut addr: SocketAddr = rest.parse().ok()?;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        });
    }
    Some(addr)
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ params final-byte (0x40..=0x7e).
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if ('\u{40}'..='\u{7e}').contains(&c) {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn flag_value(args: &[&str], flag: &str) -> Option<String> {
    let prefix = format!("{flag}=");
    args.iter().enumerate().rev().find_map(|(i, a)| {
        if *a == flag {
            args.get(i + 1).map(|v| (*v).to_owned())
        } else {
            a.strip_prefix(&prefix).map(str::to_owned)
        }
    })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The harness's FNV-1a matches the published 64-bit test vectors.
    #[test]
    fn fnv1a_vectors() {
        assert_eq!(fnv1a(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a("foobar"), 0x8594_4171_f739_67e8);
    }

    /// The listening line is found with or without colour codes, and 0.0.0.0 maps to loopback.
    #[test]
    fn listening_line() {
        let line = "\u{1b}[2m2024\u{1b}[0m INFO relay: listening on http://127.0.0.1:40123 cores=2";
        assert_eq!(parse_listening(&strip_ansi(line)), Some("127.0.0.1:40123".parse().expect("addr")));
        assert_eq!(parse_listening("listening on http://0.0.0.0:8080"), Some("127.0.0.1:8080".parse().expect("addr")));
        assert_eq!(parse_listening("listening on http://[::1]:9"), Some("[::1]:9".parse().expect("addr")));
        assert_eq!(parse_listening("starting"), None);
    }

    /// RFC 3339 recognition accepts the usual forms and rejects near misses.
    #[test]
    fn rfc3339() {
        assert!(is_rfc3339("2024-05-01T12:34:56Z"));
        assert!(is_rfc3339("2024-05-01T12:34:56.123456789+02:00"));
        assert!(!is_rfc3339("2024-05-01 12:34:56"));
        assert!(!is_rfc3339("Wed, 01 May 2024 12:34:56 GMT"));
    }

    /// Frames round-trip through the encoder and decoder, masked or not, at every length class.
    #[test]
    fn frames() {
        for len in [0usize, 125, 126, 65_535, 65_536] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            for mask in [None, Some([1, 2, 3, 4])] {
                let bytes = encode_frame(false, 1, &payload, mask);
                let (frame, used) = decode_frame(&bytes).expect("complete frame");
                assert_eq!(used, bytes.len());
                assert_eq!(frame, RawFrame { fin: false, opcode: 1, payload: payload.clone() });
                assert!(decode_frame(&bytes[..bytes.len() - 1]).is_none());
            }
        }
    }
}
