//! Headless Chromium for the end-to-end browser tests: serves `tests/browser/webrtc.html` (or the
//! seeds' own web client, `tests/browser/seed.html`) from a
//! tiny loopback HTTP server, opens it in a fresh headless Chromium and returns the JSON result the
//! page reports (WHIP/WHEP statuses, ICE state, energy of the audio it heard). [`DevTools`] drives
//! a page the relay serves itself (the console) over Chromium's DevTools protocol instead.
//!
//! Invariant: every wait is bounded, and when [`run_page`] returns Chromium (its whole process
//! group) has been killed and its temporary profile removed.

use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

/// The test page, compiled in so the harness needs no path at run time.
pub const PAGE: &str = include_str!("../browser/webrtc.html");

/// Seed 000's web client, as the seed wrote it but for its address, plus a driver that presses its
/// buttons and reports what it shows.
pub const SEED_PAGE: &str = include_str!("../browser/seed.html");

/// Chromium's command line (besides `--user-data-dir` and the URL), each flag with its reason.
pub const CHROMIUM_FLAGS: &[&str] = &[
    // New headless mode (the full browser without a window): real WebRTC and WebAudio stacks.
    "--headless",
    // Tests run as root in containers, where Chromium refuses to start sandboxed (and user
    // namespaces are usually unavailable anyway).
    "--no-sandbox",
    "--disable-gpu",
    // Docker's default /dev/shm is 64 MiB, too small for Chromium; /tmp is used instead.
    "--disable-dev-shm-usage",
    // Keep the browser quiet and hermetic: no network of its own, no first-run UI, no keyring.
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-breakpad",
    "--password-store=basic",
    // getUserMedia gets Chromium's fake microphone (a short beep about twice a second) without a
    // prompt. The fake UI also grants the page media permission up front, which ICE needs even in
    // WHEP-only pages that never call getUserMedia: without it Chromium gathers on the default
    // route's interface only (never loopback) and hides addresses behind mDNS names.
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    // AudioContext and <audio> start without a user gesture.
    "--autoplay-policy=no-user-gesture-required",
    // Timers keep their 20 ms cadence while measuring, whatever headless thinks of visibility.
    "--disable-background-timer-throttling",
    "--disable-renderer-backgrounding",
    // ICE over loopback: gather 127.0.0.1 host candidates (Chromium skips the loopback interface
    // otherwise, leaving a machine without other interfaces with no candidates at all) ...
    "--allow-loopback-in-peer-connection",
    // ... and never put random `<uuid>.local` mDNS names in them (the media permission above
    // already prevents that; this keeps it so should that change). Chromium honours only one
    // --disable-features: add other features to this one.
    "--disable-features=WebRtcHideLocalIpsWithMdns",
    // Console messages (the page logs each step) and errors go to stderr, kept for diagnostics.
    "--enable-logging=stderr",
    "--v=0",
];

/// Lines of Chromium's stderr kept for error messages.
const STDERR_LINES: usize = 200;

/// How long [`Browser::kill`] waits for the stderr reader to drain the pipe.
const STDERR_GRACE: Duration = Duration::from_millis(250);

/// Time the page keeps for itself to report partial results before [`run_page`] gives up.
const PAGE_MARGIN: Duration = Duration::from_secs(3);

/// Pause between two checks of a polled condition.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Read timeout on the page server's connections, so a stuck client cannot hold its thread.
const CONN_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest request body the page server accepts (the result JSON is a few KiB).
const MAX_BODY_BYTES: usize = 1 << 20;

/// The Chromium executable: `$CHROMIUM_BIN` when set, else the first installed of Debian's real
/// binary (skipping its launcher script), `chromium`, `chromium-browser` and Google Chrome.
pub fn chromium_path() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("CHROMIUM_BIN") {
        return Some(PathBuf::from(path)).filter(|p| executable(p));
    }
    [
        "/usr/lib/chromium/chromium",
        "/usr/bin/chromium",
        "/usr/bin/chromium-browser",
        "/usr/bin/google-chrome",
        "/usr/bin/google-chrome-stable",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| executable(p))
}

/// Opens `webrtc.html?<query>` in a fresh headless Chromium and returns the JSON the page reports.
///
/// # Errors
/// As [`run_named_page`].
pub fn run_page(query: &str, timeout: Duration) -> Result<Value, String> {
    run_named_page("webrtc.html", query, timeout)
}

/// Opens `<page>?<query>` (`webrtc.html` or `seed.html`) in a fresh headless Chromium and returns
/// the JSON the page reports.
///
/// The page's `results` parameter is added (pointing at this harness), and `deadlineMs` too unless
/// `query` has one, so the page reports partial results shortly before `timeout`.
///
/// The result gains a `console` array: the browser's own console messages (CORS refusals, for
/// one, which the page itself only sees as "Failed to fetch"), without the page's step log.
///
/// # Errors
/// When Chromium is not installed or does not start, exits before reporting, the page reports
/// nothing within `timeout`, or its report is not JSON; the message carries Chromium's stderr tail.
pub fn run_named_page(page: &str, query: &str, timeout: Duration) -> Result<Value, String> {
    let chromium = chromium_path().ok_or("chromium not found: run scripts/deps-browser or set CHROMIUM_BIN")?;
    let server = PageServer::start().map_err(|e| format!("page server: {e}"))?;
    let mut query = query.trim_start_matches('?').to_owned();
    if !query.split('&').any(|kv| kv.starts_with("deadlineMs=")) {
        let page_deadline = timeout.saturating_sub(PAGE_MARGIN).max(timeout / 2);
        query.push_str(&format!("&deadlineMs={}", page_deadline.as_millis()));
    }
    let url = server.url_of(page, &query);

    let mut browser = Browser::launch(&chromium, &url, &[])?;
    let deadline = Instant::now() + timeout;
    let body = loop {
        if let Some(body) = server.try_result() {
            break body;
        }
        if let Some(status) = browser.exited() {
            return Err(format!(
                "chromium exited with {status} before the page reported; stderr:\n{}",
                browser.stderr()
            ));
        }
        if Instant::now() >= deadline {
            return Err(format!("no result from the page within {timeout:?} ({url}); stderr:\n{}", browser.stderr()));
        }
        std::thread::sleep(POLL_INTERVAL);
    };
    browser.kill();
    let mut result: Value =
        serde_json::from_str(&body).map_err(|e| format!("page result is not JSON ({e}): {body}"))?;
    if let Some(object) = result.as_object_mut() {
        object.insert("console".into(), browser.console().into());
    }
    Ok(result)
}

/// A loopback HTTP/1.1 server on its own thread: `GET /webrtc.html` serves [`PAGE`] (and
/// `/seed.html` [`SEED_PAGE`]), `POST /result`
/// collects a result body, `OPTIONS` answers CORS preflights; everything carries
/// `Access-Control-Allow-Origin: *` and `Connection: close`.
pub struct PageServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    results_rx: mpsc::Receiver<String>,
    thread: Option<JoinHandle<()>>,
}

impl PageServer {
    /// Listens on `127.0.0.1:0` and starts serving.
    ///
    /// # Errors
    /// When the listener cannot be bound or set non-blocking.
    pub fn start() -> io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        // Non-blocking accept, polled, so that dropping the server can stop the thread.
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let (results_tx, results_rx) = mpsc::channel();
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new().name("page-server".into()).spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let results_tx = results_tx.clone();
                            // One thread per connection: Chromium keeps idle sockets open while
                            // opening new ones, and a serial server would wait on them.
                            std::thread::spawn(move || {
                                let _ = serve(stream, &results_tx);
                            });
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(POLL_INTERVAL),
                        Err(_) => std::thread::sleep(POLL_INTERVAL),
                    }
                }
            })?
        };
        Ok(Self { addr, stop, results_rx, thread: Some(thread) })
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>/webrtc.html?<query>&results=<this server's /result>`.
    pub fn page_url(&self, query: &str) -> String {
        self.url_of("webrtc.html", query)
    }

    /// `http://<addr>/<page>?<query>&results=<this server's /result>`.
    pub fn url_of(&self, page: &str, query: &str) -> String {
        let results = format!("http%3A%2F%2F{}%2Fresult", self.addr);
        let sep = if query.is_empty() { "" } else { "&" };
        format!("http://{}/{page}?{query}{sep}results={results}", self.addr)
    }

    /// The first result body posted and not yet taken, if any.
    pub fn try_result(&self) -> Option<String> {
        self.results_rx.try_recv().ok()
    }
}

impl Drop for PageServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A running Chromium, leader of its own process group; the group is killed and the profile
/// directory removed on drop.
struct Browser {
    child: Child,
    profile: PathBuf,
    stderr: Arc<Mutex<Stderr>>,
    /// Set by the stderr reader at end of file, i.e. once every process holding the pipe is gone.
    stderr_done: Arc<AtomicBool>,
    killed: bool,
}

/// What the reader kept of Chromium's stderr.
#[derive(Default)]
struct Stderr {
    /// The last [`STDERR_LINES`] lines, for error messages.
    tail: VecDeque<String>,
    /// Console messages not logged by the page itself (at most [`STDERR_LINES`]).
    console: Vec<String>,
}

impl Browser {
    fn launch(chromium: &Path, url: &str, extra: &[&str]) -> Result<Self, String> {
        let profile = temp_profile().map_err(|e| format!("chromium profile directory: {e}"))?;
        let mut cmd = Command::new(chromium);
        cmd.args(CHROMIUM_FLAGS).args(extra).arg(format!("--user-data-dir={}", profile.display())).arg(url);
        // Chromium writes outside its profile too (crashpad's database under ~/.config, PulseAudio
        // and dconf state). (The crashpad handlers call setsid; they exit by themselves once the
        // browser is gone.)
        let mut child = spawn_in_profile(&mut cmd, &profile)?;
        let stderr = Arc::new(Mutex::new(Stderr::default()));
        let stderr_done = Arc::new(AtomicBool::new(false));
        let pipe = child.stderr.take().expect("stderr was piped above");
        let (kept, done) = (stderr.clone(), stderr_done.clone());
        // Not joined: the pipe closes only once every process holding it is gone (see kill).
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                let mut kept = kept.lock().expect("stderr lock");
                // Chromium logs console messages as `[pid:tid:time:INFO:CONSOLE:line] "text", source: url`.
                if line.contains(":CONSOLE") && !line.contains("\"[webrtc.html] ") && kept.console.len() < STDERR_LINES
                {
                    let text = line.split_once("] ").map_or(line.as_str(), |(_, text)| text);
                    kept.console.push(text.to_owned());
                }
                if kept.tail.len() == STDERR_LINES {
                    kept.tail.pop_front();
                }
                kept.tail.push_back(line);
            }
            done.store(true, Ordering::Release);
        });
        Ok(Self { child, profile, stderr, stderr_done, killed: false })
    }

    /// Kills the whole process group, reaps Chromium, and waits (briefly) for the rest of its
    /// stderr.
    fn kill(&mut self) {
        if self.killed {
            return;
        }
        self.killed = true;
        let pgid = libc::pid_t::try_from(self.child.id()).expect("pid fits pid_t");
        // SAFETY: kill has no memory effects. The group id is our child's pid: either the child
        // is not reaped yet, or it is and the kernel still reserves the id while the group has
        // members; only once the group is empty could the id name someone else, and then the
        // kill is almost surely ESRCH (a new group of that id within microseconds is the risk).
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        let _ = self.child.wait();
        // The crashpad handlers (own session, so not killed above) hold the pipe too and exit a
        // while after the browser, so end of file may come late; what the killed processes left
        // in the pipe is read within this grace.
        let deadline = Instant::now() + STDERR_GRACE;
        while !self.stderr_done.load(Ordering::Acquire) && Instant::now() < deadline {
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// The exit status, once Chromium has exited.
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The last lines Chromium wrote to stderr.
    fn stderr(&self) -> String {
        self.stderr.lock().expect("stderr lock").tail.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// The browser's console messages, but the page's own step log.
    fn console(&self) -> Vec<String> {
        self.stderr.lock().expect("stderr lock").console.clone()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        self.kill();
        // Children of the group may still be exiting and closing files: retry briefly.
        let deadline = Instant::now() + Duration::from_secs(2);
        while std::fs::remove_dir_all(&self.profile).is_err() && self.profile.exists() && Instant::now() < deadline {
            std::thread::sleep(POLL_INTERVAL);
        }
    }
}

/// Answers one request on `stream` (then closes it).
fn serve(stream: TcpStream, results_tx: &mpsc::Sender<String>) -> io::Result<()> {
    stream.set_read_timeout(Some(CONN_TIMEOUT))?;
    stream.set_write_timeout(Some(CONN_TIMEOUT))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut parts = request_line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let content_length = read_fields(&mut reader)?;
    let path = target.split('?').next().unwrap_or("");
    let (status, content_type, body): (&str, &str, &[u8]) = match (method, path) {
        ("GET", "/webrtc.html") => ("200 OK", "text/html; charset=utf-8", PAGE.as_bytes()),
        ("GET", "/seed.html") => ("200 OK", "text/html; charset=utf-8", SEED_PAGE.as_bytes()),
        ("POST", "/result") if content_length <= MAX_BODY_BYTES => {
            let mut body = vec![0; content_length];
            reader.read_exact(&mut body)?;
            let _ = results_tx.send(String::from_utf8_lossy(&body).into_owned());
            ("204 No Content", "text/plain", b"")
        }
        ("POST", "/result") => ("413 Payload Too Large", "text/plain", b"too large\n"),
        ("OPTIONS", _) => ("204 No Content", "text/plain", b""),
        _ => ("404 Not Found", "text/plain", b"not found\n"),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nAccess-Control-Allow-Origin: *\r\n\
         Access-Control-Allow-Methods: GET, POST, OPTIONS\r\nAccess-Control-Allow-Headers: *\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    let mut stream = stream;
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    stream.flush()
}

/// A new empty directory under the system temp dir for one Chromium profile.
fn temp_profile() -> io::Result<PathBuf> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("relay-chromium-{}-{nanos}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A page open in headless Chromium, driven over the DevTools protocol (a WebSocket to the page
/// target): evaluate script in it, take screenshots. For pages served by the relay itself (the
/// console), which cannot post results to the harness.
pub struct DevTools {
    browser: Browser,
    socket: tungstenite::WebSocket<TcpStream>,
    next_id: u64,
}

/// How long the DevTools endpoint may take to appear after launch, and a command to answer.
const DEVTOOLS_TIMEOUT: Duration = Duration::from_secs(15);

impl DevTools {
    /// Opens `url` in a fresh headless Chromium (a `width`×`height` window) with its DevTools
    /// endpoint on a free loopback port, and connects to the page.
    ///
    /// # Errors
    /// When Chromium is missing or does not start, or its page target does not appear in time.
    pub fn open(url: &str, width: u32, height: u32) -> Result<Self, String> {
        let chromium = chromium_path().ok_or("chromium not found: run scripts/deps-browser or set CHROMIUM_BIN")?;
        let size = format!("--window-size={width},{height}");
        let mut browser = Browser::launch(&chromium, url, &["--remote-debugging-port=0", &size])?;
        let deadline = Instant::now() + DEVTOOLS_TIMEOUT;
        // Chromium writes the port it bound to the profile's DevToolsActivePort once it listens.
        let port: u16 = loop {
            let file = std::fs::read_to_string(browser.profile.join("DevToolsActivePort")).unwrap_or_default();
            if let Some(port) = file.lines().next().and_then(|l| l.trim().parse().ok()) {
                break port;
            }
            if let Some(status) = browser.exited() {
                return Err(format!("chromium exited with {status}; stderr:\n{}", browser.stderr()));
            }
            if Instant::now() >= deadline {
                return Err(format!("no DevTools port within {DEVTOOLS_TIMEOUT:?}; stderr:\n{}", browser.stderr()));
            }
            std::thread::sleep(POLL_INTERVAL);
        };
        let target = loop {
            let list = http_get(SocketAddr::from(([127, 0, 0, 1], port)), "/json/list").unwrap_or_default();
            let targets: Value = serde_json::from_str(&list).unwrap_or(Value::Null);
            let page = targets.as_array().and_then(|t| {
                t.iter()
                    .find(|t| t["type"] == "page")
                    .and_then(|t| t["webSocketDebuggerUrl"].as_str().map(str::to_owned))
            });
            if let Some(page) = page {
                break page;
            }
            if Instant::now() >= deadline {
                browser.kill();
                return Err(format!("no page target within {DEVTOOLS_TIMEOUT:?}: {list}"));
            }
            std::thread::sleep(POLL_INTERVAL);
        };
        let stream = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("devtools connect: {e}"))?;
        stream.set_read_timeout(Some(DEVTOOLS_TIMEOUT)).map_err(|e| e.to_string())?;
        let (socket, _) =
            tungstenite::client(target.as_str(), stream).map_err(|e| format!("devtools handshake: {e}"))?;
        Ok(Self { browser, socket, next_id: 1 })
    }

    /// Runs DevTools command `method` with `params` and returns its `result`.
    ///
    /// # Errors
    /// When the socket fails, or the command answers an error.
    pub fn call(&mut self, method: &str, params: Value) -> Result<Value, String> {
        let id = self.next_id;
        self.next_id += 1;
        let message = serde_json::json!({ "id": id, "method": method, "params": params }).to_string();
        self.socket.send(tungstenite::Message::text(message)).map_err(|e| format!("devtools send: {e}"))?;
        loop {
            let message = self.socket.read().map_err(|e| format!("devtools read: {e}"))?;
            let tungstenite::Message::Text(text) = message else { continue };
            let v: Value = serde_json::from_str(&text).map_err(|e| format!("devtools json: {e}"))?;
            if v["id"] == id {
                if !v["error"].is_null() {
                    return Err(format!("{method}: {}", v["error"]));
                }
                return Ok(v["result"].clone());
            }
        }
    }

    /// Evaluates `expression` in the page (awaiting a promise) and returns its value as JSON.
    ///
    /// # Errors
    /// When the call fails or the expression throws.
    pub fn eval(&mut self, expression: &str) -> Result<Value, String> {
        let params = serde_json::json!({ "expression": expression, "returnByValue": true, "awaitPromise": true });
        let r = self.call("Runtime.evaluate", params)?;
        if let Some(e) = r.get("exceptionDetails") {
            return Err(format!("{expression}: {e}"));
        }
        Ok(r["result"]["value"].clone())
    }

    /// A PNG screenshot of the page's viewport.
    ///
    /// # Errors
    /// When the capture fails.
    pub fn screenshot(&mut self) -> Result<Vec<u8>, String> {
        use base64::Engine as _;
        let r = self.call("Page.captureScreenshot", serde_json::json!({ "format": "png" }))?;
        let data = r["data"].as_str().ok_or("no screenshot data")?;
        base64::engine::general_purpose::STANDARD.decode(data).map_err(|e| e.to_string())
    }

    /// The browser's console messages so far.
    pub fn console(&self) -> Vec<String> {
        self.browser.console()
    }
}

impl crate::console_page::Page for DevTools {
    fn eval(&mut self, expression: &str) -> Result<Value, String> {
        Self::eval(self, expression)
    }

    /// A script click (Chromium starts audio without a user gesture under the test's flags).
    fn click(&mut self, selector: &str) -> Result<(), String> {
        let selector = serde_json::to_string(selector).map_err(|e| e.to_string())?;
        let clicked = self.eval(&format!(
            "(() => {{ const e = document.querySelector({selector}); if (!e) return false; e.click(); return true; }})()"
        ))?;
        if clicked == Value::Bool(true) {
            Ok(())
        } else {
            Err(format!("click: nothing matches {selector}"))
        }
    }

    fn log_lines(&self) -> Vec<String> {
        self.console()
    }
}

/// Reads header lines up to the blank one (or the end) and returns the `Content-Length` among
/// them (0 when absent or unreadable).
fn read_fields(reader: &mut impl BufRead) -> io::Result<usize> {
    let mut length = 0;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
            return Ok(length);
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.trim().eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().unwrap_or(0);
            }
        }
    }
}

/// Spawns a browser `cmd` whose profile is `profile`: what it writes outside its profile (`HOME`,
/// the XDG config and cache dirs) goes there too, it runs in its own process group (so that its
/// child processes die with it), with stderr piped and the other streams closed. When it cannot
/// start, the profile is removed.
///
/// # Errors
/// When the spawn fails; the message names the program.
pub(crate) fn spawn_in_profile(cmd: &mut Command, profile: &Path) -> Result<Child, String> {
    cmd.env("HOME", profile)
        .env("XDG_CONFIG_HOME", profile.join(".config"))
        .env("XDG_CACHE_HOME", profile.join(".cache"));
    cmd.process_group(0);
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    cmd.spawn().map_err(|e| {
        let _ = std::fs::remove_dir_all(profile);
        format!("spawn {}: {e}", cmd.get_program().to_string_lossy())
    })
}

/// A plain HTTP/1.1 GET on loopback, for Chromium's DevTools listing.
fn http_get(addr: SocketAddr, path: &str) -> io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, CONN_TIMEOUT)?;
    stream.set_read_timeout(Some(CONN_TIMEOUT))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    // Chromium may keep the connection open: read the head, then exactly Content-Length bytes.
    let mut reader = BufReader::new(stream);
    let length = read_fields(&mut reader)?;
    let mut body = vec![0; length.min(MAX_BODY_BYTES)];
    reader.read_exact(&mut body)?;
    Ok(String::from_utf8_lossy(&body).into_owned())
}
