//! Headless Firefox for the console test, driven over WebDriver BiDi: a fresh profile whose
//! `user.js` grants the fake microphone (a tone) without a prompt, lets audio start by itself and
//! keeps the browser quiet; the BiDi WebSocket address is read from Firefox's stderr and spoken
//! with tungstenite (`session.new`, `browsingContext.getTree`/`navigate`, `script.evaluate`, and
//! `log.entryAdded` events for the page's errors).
//!
//! Invariant: every wait is bounded, and when a [`Firefox`] is dropped its whole process group has
//! been killed and its profile removed.

use std::collections::VecDeque;
use std::io::{BufRead as _, BufReader};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The profile's `user.js`, each pref with its reason.
pub const USER_JS: &str = r#"// getUserMedia gets Firefox's fake devices (the microphone is a 1 kHz tone), without a prompt.
user_pref("media.navigator.streams.fake", true);
user_pref("media.navigator.permission.disabled", true);
// <audio> and AudioContext start without a user gesture.
user_pref("media.autoplay.default", 0);
user_pref("media.autoplay.block-webaudio", false);
// ICE over loopback: gather 127.0.0.1 host candidates (skipped by default), from every interface
// rather than the default route's only, and never hidden behind mDNS names.
user_pref("media.peerconnection.ice.loopback", true);
user_pref("media.peerconnection.ice.default_address_only", false);
user_pref("media.peerconnection.ice.obfuscate_host_addresses", false);
user_pref("media.peerconnection.ice.proxy_only", false);
// Quiet and hermetic: no first-run pages, default-browser check, telemetry, updates or
// background connections of its own.
user_pref("browser.shell.checkDefaultBrowser", false);
user_pref("browser.startup.homepage_override.mstone", "ignore");
user_pref("browser.startup.page", 0);
user_pref("browser.aboutwelcome.enabled", false);
user_pref("datareporting.policy.dataSubmissionEnabled", false);
user_pref("datareporting.healthreport.uploadEnabled", false);
user_pref("toolkit.telemetry.reportingpolicy.firstRun", false);
user_pref("toolkit.telemetry.enabled", false);
user_pref("app.update.auto", false);
user_pref("app.normandy.enabled", false);
user_pref("extensions.update.enabled", false);
user_pref("network.captive-portal-service.enabled", false);
user_pref("network.connectivity-service.enabled", false);
user_pref("browser.safebrowsing.malware.enabled", false);
user_pref("browser.safebrowsing.phishing.enabled", false);
user_pref("browser.newtabpage.enabled", false);
user_pref("network.proxy.type", 0);
"#;

/// How long Firefox may take to print its BiDi address, and a command to answer.
const BIDI_TIMEOUT: Duration = Duration::from_secs(30);

/// Lines of Firefox's stderr kept for error messages.
const STDERR_LINES: usize = 200;

/// Most `log.entryAdded` entries kept (a page that logs in a loop cannot grow the harness).
const MAX_LOG_ENTRIES: usize = 500;

/// The Firefox executable: `$FIREFOX_BIN` when set, else Debian's `firefox-esr` or `firefox`.
pub fn firefox_path() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("FIREFOX_BIN") {
        return Some(PathBuf::from(path)).filter(|p| executable(p));
    }
    ["/usr/bin/firefox-esr", "/usr/bin/firefox"].into_iter().map(PathBuf::from).find(|p| executable(p))
}

/// A headless Firefox with one page open, driven over WebDriver BiDi.
pub struct Firefox {
    child: Child,
    profile: PathBuf,
    stderr: Arc<Mutex<VecDeque<String>>>,
    socket: tungstenite::WebSocket<TcpStream>,
    /// The top-level browsing context the page lives in.
    context: String,
    next_id: u64,
    /// `log.entryAdded` entries seen so far, as `"<level> <type>: <text>"`.
    log: Vec<String>,
}

impl Firefox {
    /// Starts a fresh headless Firefox, opens a BiDi session and navigates its tab to `url`
    /// (waiting for the page's `load`).
    ///
    /// # Errors
    /// When Firefox is missing or does not start, prints no BiDi address in time, or a command
    /// fails; the message carries Firefox's stderr tail.
    pub fn open(url: &str) -> Result<Self, String> {
        let firefox = firefox_path().ok_or("firefox not found: run scripts/deps-browser or set FIREFOX_BIN")?;
        let profile = crate::temp_dir("firefox");
        std::fs::write(profile.join("user.js"), USER_JS).map_err(|e| format!("user.js: {e}"))?;
        let mut cmd = Command::new(&firefox);
        cmd.args(["--headless", "--no-remote", "--remote-debugging-port=0", "--profile"]).arg(&profile);
        // Firefox writes outside its profile too (~/.mozilla, caches); its content and utility
        // processes die with its process group.
        cmd.env("MOZ_CRASHREPORTER_DISABLE", "1");
        let mut child = crate::browser::spawn_in_profile(&mut cmd, &profile)?;
        let stderr = Arc::new(Mutex::new(VecDeque::new()));
        let (address_tx, address_rx) = mpsc::channel();
        let pipe = child.stderr.take().expect("stderr was piped above");
        let kept = stderr.clone();
        // Not joined: the pipe closes once every process of the group is gone (see Drop).
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                if let Some(address) = bidi_address(&line) {
                    let _ = address_tx.send(address.to_owned());
                }
                let mut kept = kept.lock().expect("stderr lock");
                if kept.len() == STDERR_LINES {
                    kept.pop_front();
                }
                kept.push_back(line);
            }
        });
        // From here on, Drop kills the group and removes the profile, whatever fails.
        let launching = Launching { child: Some(child), profile: Some(profile), stderr };
        // Disconnected (Firefox exited, its stderr closed) ends the wait early too.
        let Ok(address) = address_rx.recv_timeout(BIDI_TIMEOUT) else {
            return Err(format!("no BiDi address within {BIDI_TIMEOUT:?}; stderr:\n{}", launching.stderr()));
        };
        let socket = connect(&address).map_err(|e| format!("{e}; stderr:\n{}", launching.stderr()))?;
        let (child, profile, stderr) = launching.finish();
        let mut firefox = Self { child, profile, stderr, socket, context: String::new(), next_id: 1, log: Vec::new() };
        firefox.call("session.new", json!({ "capabilities": {} }))?;
        firefox.call("session.subscribe", json!({ "events": ["log.entryAdded"] }))?;
        let tree = firefox.call("browsingContext.getTree", json!({ "maxDepth": 0 }))?;
        firefox.context = match tree["contexts"][0]["context"].as_str() {
            Some(context) => context.to_owned(),
            None => {
                let created = firefox.call("browsingContext.create", json!({ "type": "tab" }))?;
                created["context"].as_str().ok_or("browsingContext.create: no context")?.to_owned()
            }
        };
        let context = firefox.context.clone();
        firefox.call("browsingContext.navigate", json!({ "context": context, "url": url, "wait": "complete" }))?;
        Ok(firefox)
    }

    /// Runs BiDi command `method` with `params` and returns its `result`; events that arrive
    /// meanwhile are kept (log entries) or skipped.
    ///
    /// # Errors
    /// When the socket fails, or the command answers an error.
    pub fn call(&mut self, method: &str, params: Value) -> Result<Value, String> {
        let id = self.next_id;
        self.next_id += 1;
        let message = json!({ "id": id, "method": method, "params": params }).to_string();
        self.socket.send(tungstenite::Message::text(message)).map_err(|e| format!("bidi send: {e}"))?;
        loop {
            let message = self.socket.read().map_err(|e| format!("bidi read ({method}): {e}"))?;
            let tungstenite::Message::Text(text) = message else { continue };
            let v: Value = serde_json::from_str(&text).map_err(|e| format!("bidi json: {e}"))?;
            if v["type"] == "event" {
                self.handle_event(&v);
            } else if v["id"] == id {
                if v["type"] == "error" {
                    return Err(format!("{method}: {} {}", v["error"], v["message"]));
                }
                return Ok(v["result"].clone());
            }
        }
    }

    /// Evaluates `expression` (a script: its completion value counts) in the page, awaiting a
    /// promise, and returns its value as JSON (`undefined` as `null`).
    ///
    /// # Errors
    /// When the call fails or the expression throws.
    pub fn eval(&mut self, expression: &str) -> Result<Value, String> {
        let params = json!({
            "expression": expression,
            "target": { "context": self.context },
            "awaitPromise": true,
            "resultOwnership": "none",
        });
        let r = self.call("script.evaluate", params)?;
        if r["type"] != "success" {
            return Err(format!("{expression}: {}", r["exceptionDetails"]));
        }
        Ok(remote_to_json(&r["result"]))
    }

    /// Clicks the first element `selector` matches as a user would (`input.performActions`: a
    /// mouse moved to its centre, pressed and released), so the page gets a trusted click with
    /// user activation, which starting audio needs.
    ///
    /// # Errors
    /// When nothing matches or an action fails.
    pub fn click(&mut self, selector: &str) -> Result<(), String> {
        let selector_js = serde_json::to_string(selector).map_err(|e| e.to_string())?;
        let centre = self.eval(&format!(
            "(() => {{ const e = document.querySelector({selector_js}); if (!e) return null; \
             e.scrollIntoView({{ block: 'center' }}); const r = e.getBoundingClientRect(); \
             return [Math.round(r.x + r.width / 2), Math.round(r.y + r.height / 2)]; }})()"
        ))?;
        let (Some(x), Some(y)) = (centre[0].as_i64(), centre[1].as_i64()) else {
            return Err(format!("click: nothing matches {selector}"));
        };
        let actions = json!([{
            "type": "pointer",
            "id": "mouse",
            "parameters": { "pointerType": "mouse" },
            "actions": [
                { "type": "pointerMove", "x": x, "y": y },
                { "type": "pointerDown", "button": 0 },
                { "type": "pointerUp", "button": 0 },
            ],
        }]);
        let context = self.context.clone();
        self.call("input.performActions", json!({ "context": context, "actions": actions }))?;
        Ok(())
    }

    /// The page's log so far (`log.entryAdded`: console calls and uncaught errors), each as
    /// `"<level> <type>: <text>"`.
    pub fn log(&self) -> &[String] {
        &self.log
    }

    /// The entries of [`Firefox::log`] at level `error`: uncaught exceptions, rejected promises
    /// nobody handled, `console.error`.
    pub fn errors(&self) -> Vec<String> {
        self.log.iter().filter(|l| l.starts_with("error ")).cloned().collect()
    }

    /// The last lines Firefox wrote to stderr.
    pub fn stderr(&self) -> String {
        self.stderr.lock().expect("stderr lock").iter().cloned().collect::<Vec<_>>().join("\n")
    }

    fn handle_event(&mut self, event: &Value) {
        if event["method"] != "log.entryAdded" || self.log.len() >= MAX_LOG_ENTRIES {
            return;
        }
        let entry = &event["params"];
        let text = entry["text"].as_str().unwrap_or_default();
        self.log.push(format!(
            "{} {}: {text}",
            entry["level"].as_str().unwrap_or("?"),
            entry["type"].as_str().unwrap_or("?")
        ));
    }
}

impl crate::console_page::Page for Firefox {
    fn eval(&mut self, expression: &str) -> Result<Value, String> {
        Self::eval(self, expression)
    }

    fn click(&mut self, selector: &str) -> Result<(), String> {
        Self::click(self, selector)
    }

    fn log_lines(&self) -> Vec<String> {
        self.log.clone()
    }
}

impl Drop for Firefox {
    fn drop(&mut self) {
        let _ = self.socket.close(None);
        kill_group(&mut self.child);
        remove_profile(&self.profile);
    }
}

/// A Firefox started but not yet connected: killed and its profile removed if dropped.
struct Launching {
    child: Option<Child>,
    profile: Option<PathBuf>,
    stderr: Arc<Mutex<VecDeque<String>>>,
}

impl Launching {
    fn stderr(&self) -> String {
        self.stderr.lock().expect("stderr lock").iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// Hands the process and profile over to their new owner.
    fn finish(mut self) -> (Child, PathBuf, Arc<Mutex<VecDeque<String>>>) {
        let child = self.child.take().expect("finish runs once");
        let profile = self.profile.take().expect("finish runs once");
        (child, profile, self.stderr.clone())
    }
}

impl Drop for Launching {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            kill_group(child);
        }
        if let Some(profile) = &self.profile {
            remove_profile(profile);
        }
    }
}

/// The WebSocket address in Firefox's `WebDriver BiDi listening on ws://127.0.0.1:<port>` line.
fn bidi_address(line: &str) -> Option<&str> {
    let address = line.strip_prefix("WebDriver BiDi listening on ")?.trim();
    address.starts_with("ws://").then_some(address)
}

/// Connects to the BiDi endpoint `ws://host:port` (its session path is `/session`).
fn connect(address: &str) -> Result<tungstenite::WebSocket<TcpStream>, String> {
    let host_port = address.strip_prefix("ws://").ok_or_else(|| format!("not a ws:// address: {address}"))?;
    let host_port = host_port.trim_end_matches('/');
    let stream = TcpStream::connect(host_port).map_err(|e| format!("bidi connect {host_port}: {e}"))?;
    stream.set_read_timeout(Some(BIDI_TIMEOUT)).map_err(|e| e.to_string())?;
    let url = format!("ws://{host_port}/session");
    let (socket, _) = tungstenite::client(url.as_str(), stream).map_err(|e| format!("bidi handshake: {e}"))?;
    Ok(socket)
}

/// A BiDi remote value (`{"type": "string", "value": "k"}`, arrays and objects nested the same
/// way) as plain JSON, as DevTools' `returnByValue` gives it; what JSON cannot hold (`undefined`,
/// NaN, nodes, functions…) becomes `null`.
fn remote_to_json(remote: &Value) -> Value {
    let value = &remote["value"];
    match remote["type"].as_str() {
        Some("string" | "boolean") => value.clone(),
        Some("number") => value.as_f64().map_or(Value::Null, |n| value.as_i64().map_or_else(|| json!(n), |i| json!(i))),
        Some("array" | "set") => {
            value.as_array().map_or(Value::Null, |items| items.iter().map(remote_to_json).collect())
        }
        Some("object" | "map") => value.as_array().map_or(Value::Null, |pairs| {
            pairs
                .iter()
                .filter_map(|pair| {
                    let key = match &pair[0] {
                        Value::String(key) => key.clone(),
                        other => remote_to_json(other).as_str()?.to_owned(),
                    };
                    Some((key, remote_to_json(&pair[1])))
                })
                .collect::<serde_json::Map<_, _>>()
                .into()
        }),
        _ => Value::Null,
    }
}

/// Kills `child`'s whole process group and reaps it.
fn kill_group(child: &mut Child) {
    let pgid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
    // SAFETY: kill has no memory effects. The group id is our unreaped child's pid (reaped just
    // below), so the group cannot be someone else's.
    unsafe { libc::kill(-pgid, libc::SIGKILL) };
    let _ = child.wait();
}

/// Removes a profile, retrying briefly while the killed processes still close their files.
fn remove_profile(profile: &Path) {
    let deadline = Instant::now() + Duration::from_secs(2);
    while std::fs::remove_dir_all(profile).is_err() && profile.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The BiDi address is read from Firefox's announcement line, and from nothing else.
    #[test]
    fn bidi_address_from_stderr() {
        assert_eq!(bidi_address("WebDriver BiDi listening on ws://127.0.0.1:41679"), Some("ws://127.0.0.1:41679"));
        assert_eq!(bidi_address("*** You are running in headless mode."), None);
        assert_eq!(bidi_address("WebDriver BiDi listening on nowhere"), None);
    }

    /// BiDi's typed remote values read as the plain JSON the tests compare with: strings, whole
    /// and fractional numbers, nested arrays and objects; `undefined` and NaN as `null`.
    #[test]
    fn remote_values_read_as_json() {
        let remote = json!({ "type": "array", "value": [
            { "type": "string", "value": "k" },
            { "type": "number", "value": 3 },
            { "type": "number", "value": 0.5 },
            { "type": "number", "value": "NaN" },
            { "type": "undefined" },
            { "type": "object", "value": [["a", { "type": "boolean", "value": true }], ["b", { "type": "null" }]] },
        ]});
        assert_eq!(remote_to_json(&remote), json!(["k", 3, 0.5, null, null, { "a": true, "b": null }]));
    }
}
