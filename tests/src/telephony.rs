//! Telephony peers for loopback tests: a caller that speaks to `/twilio/stream` as Twilio does, a
//! Twilio Media Streams bot the relay dials as its agent (plus a bot that is down and one that
//! stalls), `/frontend-stream` and `/ws` listeners, and 20 ms μ-law frames with identity.
//!
//! Invariant: each WebSocket peer runs on its own thread, records every message with its arrival
//! `Instant`, and never blocks longer than a short read timeout; every wait a test makes on a peer
//! is bounded by [`TIMEOUT`].

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};
use tungstenite::handshake::server::{ErrorResponse, Request as HsRequest, Response as HsResponse};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::CloseFrame;
use tungstenite::{Message, WebSocket};

use crate::{Relay, WsMsg, TIMEOUT};

/// Bytes (= samples) in one 20 ms μ-law frame at 8 kHz.
pub const FRAME_BYTES: usize = 160;

/// Duration of one frame.
pub const FRAME: Duration = Duration::from_millis(20);

/// μ-law silence: the byte the relay sends the agent in place of a muted microphone.
pub const SILENCE: u8 = 0xFF;

/// Longest a peer thread blocks in a read before it looks at its command queue again.
const READ_SLICE: Duration = Duration::from_millis(5);

/// How long a dropped peer keeps reading for the answer to its close frame.
const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// Frame `index` of stream `tag`: 160 bytes that differ from every other frame of every other tag
/// (tag and index up front, then a counter pattern) and are never all silence.
pub fn frame(tag: u8, index: u32) -> Vec<u8> {
    let mut f = Vec::with_capacity(FRAME_BYTES);
    f.push(tag);
    f.extend_from_slice(&index.to_be_bytes());
    let seed = usize::from(tag) * 131 + index as usize * 31;
    f.extend((f.len()..FRAME_BYTES).map(|i| ((seed + i * 7) % 251) as u8));
    f
}

/// Frames `range` of stream `tag`.
pub fn frames(tag: u8, range: std::ops::Range<u32>) -> Vec<Vec<u8>> {
    range.map(|i| frame(tag, i)).collect()
}

/// Standard base64.
pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Decodes standard base64.
///
/// # Panics
/// When `text` is not base64.
pub fn unb64(text: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD.decode(text).unwrap_or_else(|e| panic!("not base64 ({e}): {text:?}"))
}

/// A port on 127.0.0.1 with nothing listening (bound, read, released): a bot that is down.
pub fn unused_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local addr")
}

/// One message a peer received, with when its read returned.
#[derive(Debug, Clone)]
pub struct Arrival {
    /// When the peer's read returned it.
    pub at: Instant,
    /// What arrived.
    pub msg: WsMsg,
}

impl Arrival {
    /// The JSON body of a text message, if that is what arrived.
    pub fn json(&self) -> Option<&Value> {
        match &self.msg {
            WsMsg::Json(v) => Some(v),
            _ => None,
        }
    }

    /// The `event` field of a JSON message (Twilio and frontend messages).
    pub fn event(&self) -> Option<&str> {
        self.json().and_then(|v| v["event"].as_str())
    }
}

/// What a peer thread is told to do, in order.
enum Cmd {
    /// Send now (behind anything queued before it).
    Text(String),
    /// Send one text every 20 ms on absolute deadlines, after anything queued before.
    Paced(Vec<String>),
    /// Send a ping with this payload.
    Ping(Vec<u8>),
    /// Start the closing handshake with this code.
    Close(u16),
    /// Drop the TCP connection without a closing handshake.
    Abort,
}

/// An item waiting in a peer's send queue.
enum Item {
    Text { due: Option<Instant>, text: String },
    Ping(Vec<u8>),
    Close(u16),
    Abort,
}

#[derive(Default)]
struct PeerState {
    received: Vec<Arrival>,
    /// Texts written, with when the write returned.
    sent: Vec<(Instant, String)>,
    /// Items accepted and not yet written.
    queued: usize,
    /// The thread has stopped: the connection ended.
    ended: bool,
}

struct PeerShared {
    state: Mutex<PeerState>,
    changed: Condvar,
}

impl PeerShared {
    fn update(&self, f: impl FnOnce(&mut PeerState)) {
        f(&mut self.state.lock().expect("peer lock"));
        self.changed.notify_all();
    }
}

/// A WebSocket peer on its own thread: it writes what it is told (paced or at once), reads and
/// records everything that arrives, and answers pings. Dropping every handle closes it.
#[derive(Clone)]
pub struct Peer {
    tx: Sender<Cmd>,
    shared: Arc<PeerShared>,
    name: Arc<str>,
}

impl Peer {
    /// Opens a client WebSocket to `path` on `addr` with `headers` added to the upgrade request;
    /// `Err(status)` when the server answers with another HTTP status.
    ///
    /// # Panics
    /// When connecting fails or the handshake fails for another reason.
    pub fn connect(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Result<Self, u16> {
        crate::client_socket(addr, path, headers).map(|socket| Self::spawn(socket, path))
    }

    /// As [`Self::connect`], also returning the 101's header fields (names lowercased).
    ///
    /// # Panics
    /// As [`Self::connect`].
    pub fn connect_answered(
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<(Self, crate::Fields), u16> {
        crate::client_socket_answered(addr, path, headers).map(|(socket, answer)| (Self::spawn(socket, path), answer))
    }

    /// Serves an open socket (client or server side) on a new thread.
    pub fn spawn(socket: WebSocket<TcpStream>, name: &str) -> Self {
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(PeerShared { state: Mutex::new(PeerState::default()), changed: Condvar::new() });
        let thread_shared = shared.clone();
        std::thread::Builder::new()
            .name(format!("peer {name}"))
            .spawn(move || peer_thread(socket, &rx, &thread_shared))
            .expect("spawn a peer thread");
        Self { tx, shared, name: name.into() }
    }

    /// Sends a text message (after anything queued before it).
    pub fn send_text(&self, text: impl Into<String>) {
        self.command(Cmd::Text(text.into()));
    }

    /// Sends a JSON text message (after anything queued before it).
    pub fn send_json(&self, v: &Value) {
        self.send_text(v.to_string());
    }

    /// Sends `texts` one every 20 ms on absolute deadlines (after anything queued before them).
    pub fn send_paced(&self, texts: Vec<String>) {
        self.command(Cmd::Paced(texts));
    }

    /// Starts the closing handshake with `code` (after anything queued before it).
    pub fn close(&self, code: u16) {
        self.command(Cmd::Close(code));
    }

    /// Drops the TCP connection without a closing handshake (after anything queued before it).
    pub fn abort(&self) {
        self.command(Cmd::Abort);
    }

    /// Round-trips a ping: once its pong is back, the server has read (and, for these servers,
    /// handled) every message sent before it. False when the connection ended first.
    pub fn sync(&self) -> bool {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let payload = NEXT.fetch_add(1, Ordering::Relaxed).to_be_bytes().to_vec();
        self.command(Cmd::Ping(payload.clone()));
        self.wait(&format!("pong on {}", self.name), |s| {
            if s.received.iter().any(|a| a.msg == WsMsg::Pong(payload.clone())) {
                Some(true)
            } else {
                s.ended.then_some(false)
            }
        })
    }

    /// Waits until everything queued so far has been written.
    ///
    /// # Panics
    /// After [`TIMEOUT`] plus the time the paced part needs.
    pub fn wait_sent(&self) {
        let deadline_extra = {
            let s = self.shared.state.lock().expect("peer lock");
            FRAME * u32::try_from(s.queued).unwrap_or(u32::MAX)
        };
        self.wait_for(&format!("{}'s queue to drain", self.name), TIMEOUT + deadline_extra, |s| {
            (s.queued == 0 || s.ended).then_some(())
        });
    }

    /// Everything received so far.
    pub fn received(&self) -> Vec<Arrival> {
        self.shared.state.lock().expect("peer lock").received.clone()
    }

    /// Every text written so far, with when.
    pub fn sent(&self) -> Vec<(Instant, String)> {
        self.shared.state.lock().expect("peer lock").sent.clone()
    }

    /// Every JSON message received with `event` == `event`, in order.
    pub fn events_named(&self, event: &str) -> Vec<(Instant, Value)> {
        self.received()
            .into_iter()
            .filter(|a| a.event() == Some(event))
            .map(|a| (a.at, a.json().cloned().expect("event() implies JSON")))
            .collect()
    }

    /// Whether the connection has ended.
    pub fn ended(&self) -> bool {
        self.shared.state.lock().expect("peer lock").ended
    }

    /// Waits for the server's close frame (`Some(code)`, `Some(None)` for a close without a code),
    /// or `None` when the connection ended without one.
    ///
    /// # Panics
    /// When neither happens within [`TIMEOUT`].
    pub fn wait_closed(&self) -> Option<Option<u16>> {
        self.wait(&format!("{} to close", self.name), |s| {
            let close = s.received.iter().find_map(|a| match a.msg {
                WsMsg::Close(code) => Some(code),
                _ => None,
            });
            match close {
                Some(code) => Some(Some(code)),
                None => s.ended.then_some(None),
            }
        })
    }

    /// Calls `probe` on everything received so far, each time something changes, until it
    /// returns `Some`.
    ///
    /// # Panics
    /// When it still returns `None` after [`TIMEOUT`]; `what` names the awaited condition.
    pub fn wait_until<T>(&self, what: &str, mut probe: impl FnMut(&[Arrival]) -> Option<T>) -> T {
        self.wait(what, |s| probe(&s.received))
    }

    /// As [`Self::wait_until`], but gives up (returning `None`) after `limit` or when the
    /// connection has ended.
    pub fn wait_within<T>(&self, limit: Duration, mut probe: impl FnMut(&[Arrival]) -> Option<T>) -> Option<T> {
        let deadline = Instant::now() + limit.min(TIMEOUT);
        let mut state = self.shared.state.lock().expect("peer lock");
        loop {
            if let Some(v) = probe(&state.received) {
                return Some(v);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || state.ended {
                return None;
            }
            state = self.shared.changed.wait_timeout(state, left).expect("peer lock").0;
        }
    }

    fn wait<T>(&self, what: &str, probe: impl FnMut(&PeerState) -> Option<T>) -> T {
        self.wait_for(what, TIMEOUT, probe)
    }

    fn wait_for<T>(&self, what: &str, limit: Duration, mut probe: impl FnMut(&PeerState) -> Option<T>) -> T {
        let deadline = Instant::now() + limit;
        let mut state = self.shared.state.lock().expect("peer lock");
        loop {
            if let Some(v) = probe(&state) {
                return v;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "timed out after {limit:?} waiting for {what}; received: {:?}", summary(&state));
            state = self.shared.changed.wait_timeout(state, left).expect("peer lock").0;
        }
    }

    fn command(&self, cmd: Cmd) {
        let items = match &cmd {
            Cmd::Paced(v) => v.len(),
            _ => 1,
        };
        self.shared.update(|s| s.queued += items);
        // A send error means the thread ended (the connection is gone); nothing will be written.
        if self.tx.send(cmd).is_err() {
            self.shared.update(|s| s.queued -= items);
        }
    }
}

/// A short description of what a peer received, for failure messages.
fn summary(state: &PeerState) -> String {
    let mut counts: Vec<(String, usize)> = Vec::new();
    for a in &state.received {
        let key = match &a.msg {
            WsMsg::Json(v) => {
                v["event"].as_str().or_else(|| v["eventType"].as_str()).or_else(|| v["type"].as_str()).unwrap_or("json")
            }
            WsMsg::Text(_) => "text",
            WsMsg::Binary(_) => "binary",
            WsMsg::Pong(_) => "pong",
            WsMsg::Close(_) => "close",
            WsMsg::Gone(_) => "gone",
        };
        match counts.iter_mut().find(|(k, _)| k == key) {
            Some((_, n)) => *n += 1,
            None => counts.push((key.to_owned(), 1)),
        }
    }
    let closes: Vec<String> = state
        .received
        .iter()
        .filter_map(|a| match &a.msg {
            WsMsg::Close(c) => Some(format!("close {c:?}")),
            WsMsg::Gone(e) => Some(format!("gone: {e}")),
            _ => None,
        })
        .collect();
    format!("{counts:?} {closes:?} ended={} queued={}", state.ended, state.queued)
}

fn peer_thread(mut socket: WebSocket<TcpStream>, rx: &Receiver<Cmd>, shared: &PeerShared) {
    let mut queue: VecDeque<Item> = VecDeque::new();
    // The deadline the next paced item gets: pacing continues across batches without drift.
    let mut next_slot: Option<Instant> = None;
    let mut linger_until: Option<Instant> = None;
    loop {
        loop {
            match rx.try_recv() {
                Ok(Cmd::Text(text)) => queue.push_back(Item::Text { due: None, text }),
                Ok(Cmd::Paced(texts)) => {
                    let now = Instant::now();
                    let mut slot = next_slot.filter(|s| *s > now).unwrap_or(now);
                    for text in texts {
                        queue.push_back(Item::Text { due: Some(slot), text });
                        slot += FRAME;
                    }
                    next_slot = Some(slot);
                }
                Ok(Cmd::Ping(p)) => queue.push_back(Item::Ping(p)),
                Ok(Cmd::Close(code)) => queue.push_back(Item::Close(code)),
                Ok(Cmd::Abort) => queue.push_back(Item::Abort),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    // Every handle is gone: close (once) and linger for the answer.
                    if linger_until.is_none() {
                        queue.clear();
                        let frame = CloseFrame { code: CloseCode::Normal, reason: "".into() };
                        let _ = socket.close(Some(frame));
                        let _ = socket.flush();
                        linger_until = Some(Instant::now() + CLOSE_LINGER);
                    }
                    break;
                }
            }
        }
        if linger_until.is_some_and(|t| Instant::now() >= t) {
            break;
        }
        // Write whatever is due, in order.
        while let Some(item) = queue.front() {
            if let Item::Text { due: Some(due), .. } = item {
                if *due > Instant::now() {
                    break;
                }
            }
            let item = queue.pop_front().expect("front exists");
            match item {
                Item::Text { text, .. } => {
                    let _ = socket.send(Message::text(text.clone()));
                    let at = Instant::now();
                    shared.update(|s| {
                        s.sent.push((at, text));
                        s.queued -= 1;
                    });
                }
                Item::Ping(p) => {
                    let _ = socket.send(Message::Ping(p.into()));
                    shared.update(|s| s.queued -= 1);
                }
                Item::Close(code) => {
                    let frame = CloseFrame { code: CloseCode::from(code), reason: "".into() };
                    let _ = socket.close(Some(frame));
                    let _ = socket.flush();
                    shared.update(|s| s.queued -= 1);
                }
                Item::Abort => {
                    let _ = socket.get_ref().shutdown(std::net::Shutdown::Both);
                    shared.update(|s| {
                        s.queued -= 1;
                        s.received.push(Arrival { at: Instant::now(), msg: WsMsg::Gone("aborted".to_owned()) });
                    });
                }
            }
        }
        let wait = match queue.front() {
            Some(Item::Text { due: Some(due), .. }) => due.saturating_duration_since(Instant::now()).min(READ_SLICE),
            Some(_) => Duration::from_millis(1),
            None => READ_SLICE,
        }
        .max(Duration::from_millis(1));
        let _ = socket.get_mut().set_read_timeout(Some(wait));
        let msg = match socket.read() {
            Ok(Message::Text(t)) => match serde_json::from_str(t.as_str()) {
                Ok(v) => WsMsg::Json(v),
                Err(_) => WsMsg::Text(t.as_str().to_owned()),
            },
            Ok(Message::Binary(b)) => WsMsg::Binary(b.to_vec()),
            Ok(Message::Pong(p)) => WsMsg::Pong(p.to_vec()),
            Ok(Message::Close(frame)) => WsMsg::Close(frame.map(|f| u16::from(f.code))),
            Ok(Message::Ping(_) | Message::Frame(_)) => continue,
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) =>
            {
                continue
            }
            Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => break,
            Err(e) => {
                let at = Instant::now();
                shared.update(|s| s.received.push(Arrival { at, msg: WsMsg::Gone(e.to_string()) }));
                break;
            }
        };
        let at = Instant::now();
        shared.update(|s| s.received.push(Arrival { at, msg }));
    }
    let _ = socket.get_ref().shutdown(std::net::Shutdown::Both);
    shared.update(|s| {
        s.ended = true;
        s.queued = 0;
    });
}

/// A caller as Twilio connects it to `/twilio/stream`: `connected`, `start`, paced `media`,
/// `dtmf`, `stop`; records what the relay plays to it.
pub struct TwilioCaller {
    peer: Peer,
    /// `start.callSid` (and the `callSid` custom parameter).
    pub call_sid: String,
    /// `start.streamSid`: what every message to this caller must carry.
    pub stream_sid: String,
    /// `start.accountSid`.
    pub account_sid: String,
    /// Next `sequenceNumber` (Twilio numbers every message from 1: connected is 1, start 2).
    sequence: AtomicU64,
    /// Next media `chunk` number (from 1).
    chunk: AtomicU64,
}

impl std::ops::Deref for TwilioCaller {
    type Target = Peer;

    fn deref(&self) -> &Peer {
        &self.peer
    }
}

impl TwilioCaller {
    /// Upgrades `/twilio/stream` on `relay` and says `connected` and `start` for `call_sid`, with
    /// `callSid` plus `params` as `customParameters`.
    ///
    /// # Panics
    /// When the upgrade is refused.
    pub fn start(relay: &Relay, call_sid: &str, params: &[(&str, &str)]) -> Self {
        // Without a Twilio auth token, a relay with an API key guards its Twilio endpoints with it.
        let bearer = relay.api_key().map(|k| format!("Bearer {k}"));
        let headers: Vec<(&str, &str)> = bearer.as_deref().map(|b| ("Authorization", b)).into_iter().collect();
        let peer = match Peer::connect(relay.addr(), "/twilio/stream", &headers) {
            Ok(p) => p,
            Err(status) => panic!("/twilio/stream refused with {status}"),
        };
        let mut all = vec![("callSid", call_sid)];
        all.extend_from_slice(params);
        Self::greet(peer, call_sid, &all)
    }

    /// Says `connected` and `start` on an already upgraded stream: `start.callSid` is
    /// `call_sid` and `customParameters` exactly `params`.
    pub fn greet(peer: Peer, call_sid: &str, params: &[(&str, &str)]) -> Self {
        let caller = Self::new(peer, call_sid);
        caller.peer.send_json(&connected_msg());
        caller.peer.send_json(&start_msg(1, &caller.stream_sid, &caller.account_sid, call_sid, params));
        caller.sequence.store(3, Ordering::Relaxed);
        caller
    }

    /// Wraps a peer without sending anything (for tests that write the greeting themselves).
    pub fn new(peer: Peer, call_sid: &str) -> Self {
        Self {
            peer,
            call_sid: call_sid.to_owned(),
            stream_sid: format!("MZ{}", suffix(call_sid)),
            account_sid: "AC0123456789abcdef0123456789abcdef".to_owned(),
            sequence: AtomicU64::new(1),
            chunk: AtomicU64::new(1),
        }
    }

    /// The peer underneath.
    pub fn peer(&self) -> &Peer {
        &self.peer
    }

    /// Sends `frames` as `media` messages, one every 20 ms on absolute deadlines, after anything
    /// queued before.
    pub fn send_audio(&self, frames: &[Vec<u8>]) {
        let texts = frames
            .iter()
            .map(|f| {
                let seq = self.sequence.fetch_add(1, Ordering::Relaxed);
                let chunk = self.chunk.fetch_add(1, Ordering::Relaxed);
                media_msg(seq, &self.stream_sid, chunk, f).to_string()
            })
            .collect();
        self.peer.send_paced(texts);
    }

    /// Sends a `dtmf` message for `digit`.
    pub fn dtmf(&self, digit: char) {
        let seq = self.sequence.fetch_add(1, Ordering::Relaxed);
        self.peer.send_json(&json!({
            "event": "dtmf", "streamSid": self.stream_sid, "sequenceNumber": seq.to_string(),
            "dtmf": { "track": "inbound_track", "digit": digit.to_string() }
        }));
    }

    /// Echoes the mark `name` as Twilio does when its playback reaches it (or when a `clear`
    /// flushes it): `{"event":"mark","sequenceNumber","streamSid","mark":{"name"}}`. Twilio
    /// echoes on its own; a test chooses which marks were heard, and when.
    pub fn echo_mark(&self, name: &str) {
        let seq = self.sequence.fetch_add(1, Ordering::Relaxed);
        self.peer.send_json(&json!({
            "event": "mark", "sequenceNumber": seq.to_string(), "streamSid": self.stream_sid,
            "mark": { "name": name }
        }));
    }

    /// The names of the marks the relay sent to this caller so far, in order.
    pub fn marks(&self) -> Vec<String> {
        marks_of(&self.peer.received()).into_iter().map(|(_, name)| name).collect()
    }

    /// Sends `stop` (Twilio's hang-up).
    pub fn stop(&self) {
        let seq = self.sequence.fetch_add(1, Ordering::Relaxed);
        self.peer.send_json(&json!({
            "event": "stop", "sequenceNumber": seq.to_string(), "streamSid": self.stream_sid,
            "stop": { "accountSid": self.account_sid, "callSid": self.call_sid }
        }));
    }

    /// Everything this caller heard, decoded from μ-law to 8 kHz PCM.
    pub fn heard_pcm(&self) -> Vec<i16> {
        self.events_named("media")
            .iter()
            .filter_map(|(_, m)| m["media"]["payload"].as_str().map(unb64))
            .flatten()
            .map(unulaw)
            .collect()
    }

    /// The decoded payloads of the `media` messages received so far, with arrival times.
    ///
    /// # Panics
    /// When a media message does not have the caller's `streamSid` or a base64 payload.
    pub fn media(&self) -> Vec<(Instant, Vec<u8>)> {
        media_of(&self.peer.received(), &self.stream_sid)
    }

    /// Waits until at least `n` media messages arrived; returns all received so far.
    pub fn wait_media(&self, n: usize) -> Vec<(Instant, Vec<u8>)> {
        let sid = self.stream_sid.clone();
        self.peer.wait_until(&format!("{n} media messages at the caller"), |r| {
            let got = media_of(r, &sid);
            (got.len() >= n).then_some(got)
        })
    }
}

/// A Twilio Media Streams server: the bot the relay dials. Accepts any number of connections,
/// each served by a [`Peer`].
pub struct TwilioBot {
    addr: SocketAddr,
    conns: Arc<(Mutex<Vec<BotConn>>, Condvar)>,
    stop: Arc<AtomicBool>,
}

impl TwilioBot {
    /// Listens on 127.0.0.1:0 and serves every connection on its own thread.
    pub fn start() -> Self {
        Self::start_on(IpAddr::V4(Ipv4Addr::LOCALHOST))
    }

    /// Listens on `ip` (any port), e.g. `0.0.0.0` for relays in other network namespaces, and
    /// serves every connection on its own thread.
    pub fn start_on(ip: IpAddr) -> Self {
        let listener = TcpListener::bind((ip, 0)).expect("bind the bot");
        let addr = listener.local_addr().expect("bot address");
        let conns: Arc<(Mutex<Vec<BotConn>>, Condvar)> = Arc::new((Mutex::new(Vec::new()), Condvar::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (conns.clone(), stop.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if s.load(Ordering::Acquire) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                let c = c.clone();
                std::thread::spawn(move || {
                    let _ = stream.set_read_timeout(Some(TIMEOUT));
                    let _ = stream.set_write_timeout(Some(TIMEOUT));
                    let _ = stream.set_nodelay(true);
                    let mut path = String::new();
                    let mut headers = Vec::new();
                    // tungstenite's callback signature fixes this (large) error type.
                    #[allow(clippy::result_large_err)]
                    let callback = |req: &HsRequest, resp: HsResponse| -> Result<HsResponse, ErrorResponse> {
                        path = req.uri().to_string();
                        headers = req
                            .headers()
                            .iter()
                            .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or_default().to_owned()))
                            .collect();
                        Ok(resp)
                    };
                    let Ok(socket) = tungstenite::accept_hdr(stream, callback) else { return };
                    let conn = BotConn { peer: Peer::spawn(socket, &format!("bot {path}")), path, headers };
                    c.0.lock().expect("bot lock").push(conn);
                    c.1.notify_all();
                });
            }
        });
        Self { addr, conns, stop }
    }

    /// `ws://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }

    /// `ws://<ip>:<port><path>`: the bot as a host that reaches it at `ip` dials it.
    pub fn url_at(&self, ip: IpAddr, path: &str) -> String {
        format!("ws://{}{path}", SocketAddr::new(ip, self.addr.port()))
    }

    /// `127.0.0.1:<port>`, as `--agent-allow` names it.
    pub fn authority(&self) -> String {
        self.addr.to_string()
    }

    /// WebSocket connections completed so far.
    pub fn connections(&self) -> usize {
        self.conns.0.lock().expect("bot lock").len()
    }

    /// The `index`-th connection (from 0), once the relay serves it: a ping round trip proves the
    /// relay has opened the agent leg, so caller audio sent from then on is relayed to it.
    ///
    /// # Panics
    /// When it does not come within [`TIMEOUT`], or the relay closes it at once.
    pub fn ready(&self, index: usize) -> BotConn {
        let conn = self.connection(index);
        assert!(conn.sync(), "the relay closed agent connection {index}: {:?}", conn.received());
        conn
    }

    /// The `index`-th connection (from 0), waiting for it.
    ///
    /// # Panics
    /// When it does not come within [`TIMEOUT`].
    pub fn connection(&self, index: usize) -> BotConn {
        let deadline = Instant::now() + TIMEOUT;
        let mut conns = self.conns.0.lock().expect("bot lock");
        loop {
            if let Some(c) = conns.get(index) {
                return c.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "the relay did not dial bot {} (connection {index}) within {TIMEOUT:?}",
                self.addr
            );
            conns = self.conns.1.wait_timeout(conns, left).expect("bot lock").0;
        }
    }
}

impl Drop for TwilioBot {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
    }
}

/// One connection the relay made to a [`TwilioBot`].
#[derive(Clone)]
pub struct BotConn {
    peer: Peer,
    /// The request target the relay asked for (path and query).
    pub path: String,
    /// The upgrade request's header fields (names lowercased).
    pub headers: Vec<(String, String)>,
}

impl BotConn {
    /// The value of header `name` (lowercase) in the upgrade request.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

impl std::ops::Deref for BotConn {
    type Target = Peer;

    fn deref(&self) -> &Peer {
        &self.peer
    }
}

impl BotConn {
    /// The `start` message, waiting for it.
    pub fn start_msg(&self) -> Value {
        self.peer.wait_until("start at the bot", |r| r.iter().find(|a| a.event() == Some("start")).map(json_of))
    }

    /// The `streamSid` of `start` if it has arrived, else a placeholder (the relay routes agent
    /// messages by connection, so a missing greeting does not stop the bot from talking).
    pub fn stream_sid(&self) -> String {
        let start = self.peer.received().iter().find(|a| a.event() == Some("start")).map(json_of);
        start
            .and_then(|s| s["start"]["streamSid"].as_str().map(str::to_owned))
            .unwrap_or_else(|| "MZ-no-start-received".to_owned())
    }

    /// Sends `frames` as `media` messages all at once, as a TTS bot does.
    pub fn send_audio(&self, frames: &[Vec<u8>]) {
        let sid = self.stream_sid();
        for f in frames {
            self.peer.send_json(&json!({ "event": "media", "streamSid": sid, "media": { "payload": b64(f) } }));
        }
    }

    /// Sends a `mark` named `name`.
    pub fn mark(&self, name: &str) {
        let sid = self.stream_sid();
        self.peer.send_json(&json!({ "event": "mark", "streamSid": sid, "mark": { "name": name } }));
    }

    /// Sends `clear`.
    pub fn clear(&self) {
        let sid = self.stream_sid();
        self.peer.send_json(&json!({ "event": "clear", "streamSid": sid }));
    }

    /// The `event` of every JSON message received, in order.
    pub fn event_names(&self) -> Vec<String> {
        self.peer.received().iter().filter_map(|a| a.event().map(str::to_owned)).collect()
    }

    /// The decoded payloads of the `media` messages received so far.
    ///
    /// # Panics
    /// When a media message is not Twilio's inbound shape.
    pub fn media(&self) -> Vec<Vec<u8>> {
        inbound_media(&self.peer.received())
    }

    /// Waits until at least `n` media messages arrived; returns all received so far.
    pub fn wait_media(&self, n: usize) -> Vec<Vec<u8>> {
        self.peer.wait_until(&format!("{n} media messages at the bot"), |r| {
            let got = inbound_media(r);
            (got.len() >= n).then_some(got)
        })
    }

    /// The names of the mark echoes received so far, with arrival times.
    pub fn marks(&self) -> Vec<(Instant, String)> {
        marks_of(&self.peer.received())
    }

    /// Waits until the mark `name` is echoed; returns when it arrived.
    pub fn wait_mark(&self, name: &str) -> Instant {
        self.peer.wait_until(&format!("mark {name:?} echoed to the bot"), |r| {
            marks_of(r).into_iter().find(|(_, n)| n == name).map(|(at, _)| at)
        })
    }
}

/// A bot that accepts TCP connections but never answers the WebSocket handshake.
pub struct StalledBot {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl StalledBot {
    /// Listens on 127.0.0.1:0, accepting and holding every connection silently.
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the stalled bot");
        let addr = listener.local_addr().expect("address");
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, s) = (accepted.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for stream in listener.incoming() {
                if s.load(Ordering::Acquire) {
                    return;
                }
                if let Ok(stream) = stream {
                    held.push(stream);
                    a.fetch_add(1, Ordering::AcqRel);
                }
            }
        });
        Self { addr, accepted, stop }
    }

    /// `ws://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }

    /// TCP connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Acquire)
    }
}

impl Drop for StalledBot {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
    }
}

/// A `/frontend-stream` listener.
pub struct Frontend {
    peer: Peer,
}

impl std::ops::Deref for Frontend {
    type Target = Peer;

    fn deref(&self) -> &Peer {
        &self.peer
    }
}

impl Frontend {
    /// Upgrades `/frontend-stream?callSid=<call>&user_id=<user><extra>`; `Err(status)` when refused.
    pub fn open(relay: &Relay, call_sid: &str, user: &str, extra_query: &str) -> Result<Self, u16> {
        let path = format!("/frontend-stream?callSid={call_sid}&user_id={user}{extra_query}");
        Peer::connect(relay.addr(), &path, &[]).map(|peer| Self { peer })
    }

    /// As [`Self::connect`] at `addr` (a relay or a balancer in front of relays); also returns the
    /// 101's header fields (names lowercased).
    ///
    /// # Panics
    /// As [`Self::connect`].
    pub fn connect_at(addr: SocketAddr, call_sid: &str, user: &str, extra_query: &str) -> (Self, crate::Fields) {
        let path = format!("/frontend-stream?callSid={call_sid}&user_id={user}{extra_query}");
        let (peer, answer) = Peer::connect_answered(addr, &path, &[])
            .unwrap_or_else(|status| panic!("/frontend-stream for {call_sid} refused with {status}"));
        peer.send_json(&json!({ "event": "connect-twilio", "callSid": call_sid, "user_id": user }));
        assert!(peer.sync(), "the relay closed frontend {user}'s socket: {:?}", peer.received());
        (Self { peer }, answer)
    }

    /// Opens, sends `connect-twilio` for `call_sid`, and round-trips a ping so the relay has handled
    /// it: from then on every frame of the call reaches this socket.
    ///
    /// # Panics
    /// When the upgrade is refused or the relay closes the socket.
    pub fn connect(relay: &Relay, call_sid: &str, user: &str, extra_query: &str) -> Self {
        let f = Self::open(relay, call_sid, user, extra_query)
            .unwrap_or_else(|status| panic!("/frontend-stream for {call_sid} refused with {status}"));
        f.peer.send_json(&json!({ "event": "connect-twilio", "callSid": call_sid, "user_id": user }));
        assert!(f.peer.sync(), "the relay closed frontend {user}'s socket: {:?}", f.peer.received());
        f
    }

    /// The peer underneath.
    pub fn peer(&self) -> &Peer {
        &self.peer
    }

    /// The decoded payloads of the `audio` messages of `track` received so far.
    pub fn audio(&self, track: &str) -> Vec<Vec<u8>> {
        audio_of(&self.peer.received(), track)
    }

    /// Waits until at least `n` `audio` messages of `track` arrived; returns all so far.
    pub fn wait_audio(&self, track: &str, n: usize) -> Vec<Vec<u8>> {
        self.peer.wait_until(&format!("{n} {track} audio messages at a frontend"), |r| {
            let got = audio_of(r, track);
            (got.len() >= n).then_some(got)
        })
    }
}

/// A `/ws` event listener on its own thread.
pub struct Events {
    peer: Peer,
}

impl std::ops::Deref for Events {
    type Target = Peer;

    fn deref(&self) -> &Peer {
        &self.peer
    }
}

impl Events {
    /// Opens `/ws?sessionId=<id>` with `Authorization: Bearer <token>` (or none), and waits for its
    /// `connection_established` greeting.
    ///
    /// # Panics
    /// When the upgrade is refused or the greeting does not come.
    pub fn open(relay: &Relay, id: &str, token: Option<&str>) -> Self {
        Self::open_at(relay.addr(), id, token).0
    }

    /// As [`Self::open`] at `addr` (a relay or a balancer in front of relays); also returns the
    /// 101's header fields (names lowercased).
    ///
    /// # Panics
    /// As [`Self::open`].
    pub fn open_at(addr: SocketAddr, id: &str, token: Option<&str>) -> (Self, crate::Fields) {
        let auth = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
        let (peer, answer) = Peer::connect_answered(addr, &format!("/ws?sessionId={id}"), &headers)
            .unwrap_or_else(|status| panic!("/ws for {id} refused with {status}"));
        peer.wait_until("connection_established", |r| {
            r.iter().find(|a| a.json().is_some_and(|v| v["type"] == "connection_established")).map(|_| ())
        });
        (Self { peer }, answer)
    }

    /// The `retell_event`s received so far: `(eventType, data)` in order.
    pub fn events(&self) -> Vec<(String, Value)> {
        retell_events(&self.peer.received())
    }

    /// Waits for the first `retell_event` of `event_type` and returns its `data`.
    pub fn wait_event(&self, event_type: &str) -> Value {
        self.wait_event_where(event_type, |_| true)
    }

    /// Waits for the first `retell_event` of `event_type` whose data satisfies `pred`.
    pub fn wait_event_where(&self, event_type: &str, mut pred: impl FnMut(&Value) -> bool) -> Value {
        self.peer.wait_until(&format!("retell_event {event_type}"), |r| {
            retell_events(r).into_iter().find(|(t, d)| t == event_type && pred(d)).map(|(_, d)| d)
        })
    }
}

/// `{"event":"connected","protocol":"Call","version":"1.0.0"}`.
pub fn connected_msg() -> Value {
    json!({ "event": "connected", "protocol": "Call", "version": "1.0.0" })
}

/// Twilio's `start` message, with string `sequenceNumber` as Twilio writes it.
pub fn start_msg(sequence: u64, stream_sid: &str, account_sid: &str, call_sid: &str, params: &[(&str, &str)]) -> Value {
    let custom: serde_json::Map<String, Value> =
        params.iter().map(|(k, v)| ((*k).to_owned(), Value::String((*v).to_owned()))).collect();
    json!({
        "event": "start",
        "sequenceNumber": sequence.to_string(),
        "start": {
            "accountSid": account_sid,
            "streamSid": stream_sid,
            "callSid": call_sid,
            "tracks": ["inbound"],
            "customParameters": custom,
            "mediaFormat": { "encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1 }
        },
        "streamSid": stream_sid
    })
}

/// Twilio's inbound `media` message for `frame` (chunk from 1, timestamp in ms).
pub fn media_msg(sequence: u64, stream_sid: &str, chunk: u64, frame: &[u8]) -> Value {
    json!({
        "event": "media",
        "sequenceNumber": sequence.to_string(),
        "media": {
            "track": "inbound",
            "chunk": chunk.to_string(),
            "timestamp": ((chunk - 1) * 20).to_string(),
            "payload": b64(frame)
        },
        "streamSid": stream_sid
    })
}

fn suffix(call_sid: &str) -> String {
    call_sid.chars().filter(char::is_ascii_alphanumeric).collect()
}

fn json_of(a: &Arrival) -> Value {
    a.json().cloned().expect("an event implies JSON")
}

/// Media played to a caller: `{"event":"media","streamSid":<sid>,"media":{"payload":…}}`.
fn media_of(received: &[Arrival], stream_sid: &str) -> Vec<(Instant, Vec<u8>)> {
    received
        .iter()
        .filter(|a| a.event() == Some("media"))
        .map(|a| {
            let v = a.json().expect("media is JSON");
            assert_eq!(v["streamSid"], stream_sid, "media to the caller carries its streamSid: {v}");
            let payload = v["media"]["payload"].as_str().unwrap_or_else(|| panic!("media.payload: {v}"));
            (a.at, unb64(payload))
        })
        .collect()
}

/// Caller audio as the relay relays it to a bot: Twilio's inbound `media` shape.
fn inbound_media(received: &[Arrival]) -> Vec<Vec<u8>> {
    received
        .iter()
        .filter(|a| a.event() == Some("media"))
        .map(|a| {
            let v = a.json().expect("media is JSON");
            assert_eq!(v["media"]["track"], "inbound", "caller audio reaches the bot as track inbound: {v}");
            unb64(v["media"]["payload"].as_str().unwrap_or_else(|| panic!("media.payload: {v}")))
        })
        .collect()
}

fn marks_of(received: &[Arrival]) -> Vec<(Instant, String)> {
    received
        .iter()
        .filter(|a| a.event() == Some("mark"))
        .map(|a| {
            let v = a.json().expect("mark is JSON");
            (a.at, v["mark"]["name"].as_str().unwrap_or_else(|| panic!("mark.name: {v}")).to_owned())
        })
        .collect()
}

fn audio_of(received: &[Arrival], track: &str) -> Vec<Vec<u8>> {
    received
        .iter()
        .filter(|a| a.event() == Some("audio"))
        .filter_map(|a| {
            let v = a.json().expect("audio is JSON");
            (v["track"] == track).then(|| unb64(v["payload"].as_str().unwrap_or_else(|| panic!("audio.payload: {v}"))))
        })
        .collect()
}

fn retell_events(received: &[Arrival]) -> Vec<(String, Value)> {
    received
        .iter()
        .filter_map(|a| a.json())
        .filter(|v| v["type"] == "retell_event")
        .map(|v| (v["eventType"].as_str().unwrap_or_default().to_owned(), v["data"].clone()))
        .collect()
}

/// G.711 μ-law of one sample (the classic algorithm, written independently of the relay's tables).
pub fn ulaw(sample: i16) -> u8 {
    const BIAS: i32 = 0x84;
    let mut s = i32::from(sample);
    let sign = if s < 0 { 0x80 } else { 0 };
    if s < 0 {
        s = -s;
    }
    s = (s + BIAS).min(32635 + BIAS);
    let exponent = (7 - (s.leading_zeros() as i32 - 17)).clamp(0, 7);
    let mantissa = (s >> (exponent + 3)) & 0x0f;
    !(sign | (exponent << 4) as u8 as i32 | mantissa) as u8
}

/// The sample a G.711 μ-law code stands for.
pub fn unulaw(code: u8) -> i16 {
    let c = !code;
    let sign = c & 0x80;
    let exponent = i32::from((c >> 4) & 0x07);
    let mantissa = i32::from(c & 0x0f);
    let magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84;
    (if sign != 0 { -magnitude } else { magnitude }) as i16
}
