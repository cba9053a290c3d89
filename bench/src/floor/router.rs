//! The floor's routing, sans-IO: which connection is whose caller, bot or frontend, and what each
//! text message makes it send. Relay's pass-through path, and nothing more: a caller's `media` is
//! re-encoded for its bot (Relay's envelope and numbering) and, once, for its frontends; the bot's
//! `media` goes to the caller and, once encoded, to the frontends; `stop` ends the call.
//!
//! Invariant: no I/O, no clock, no panic on any input; every table is bounded (calls, frontends
//! per call, a bot's backlog, id lengths); steady-state frames allocate nothing (they are written
//! into one reused buffer).

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;

use super::frame;
use super::json::{self, Event};

/// A connection, as the shell numbers it.
pub(crate) type Token = usize;

/// Calls (with a caller, or frontends waiting for one) at once; a caller beyond is closed 1013.
pub(crate) const MAX_CALLS: usize = 10_000;
/// Frontends per call (Relay's default `observers_per_session`); one more is refused.
pub(crate) const MAX_FRONTENDS: usize = 32;
/// Longest call or stream id, bytes (Relay's ids are at most 128).
pub(crate) const MAX_SID: usize = 128;
/// Bytes of framed messages kept for a bot still being dialled (~250 frames, Relay's
/// `AGENT_BACKLOG`); later ones are dropped and counted.
pub(crate) const MAX_BACKLOG: usize = 250 * 340;

/// A call as an output names it: its slot and the slot's generation, so an output acted on after
/// its call ended (and the slot was reused) is recognised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CallRef {
    index: u32,
    generation: u32,
}

/// What the shell is to do.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Output {
    /// Send `bytes` (a range of [`Router::bytes`]) to `to`, in one write.
    Send { to: Token, bytes: Range<usize> },
    /// Close `to` once what was sent to it is out; the router has forgotten it.
    Close { to: Token },
    /// Dial the bot of `call` at `addr` (`host` for its `Host` header) and upgrade at `path`;
    /// then call [`Router::handle_dialled`].
    Dial { call: CallRef, addr: SocketAddr, host: String, path: String },
}

/// Counts of what was refused or dropped.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stats {
    /// Messages not understood or out of order (counted, ignored).
    pub(crate) protocol_errors: u64,
    /// Caller frames dropped because a bot's backlog was full.
    pub(crate) backlog_drops: u64,
    /// Callers and frontends refused (limits, duplicate callers, unknown paths).
    pub(crate) refused: u64,
}

/// The routing state of one floor server.
pub(crate) struct Router {
    legs: Vec<Leg>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    by_sid: HashMap<Box<[u8]>, u32>,
    live: usize,
    agent_allow: Vec<IpAddr>,
    /// Every frame written since the shell last called [`Router::clear`].
    out: Vec<u8>,
    outputs: VecDeque<Output>,
    stats: Stats,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Leg {
    Free,
    /// A `/twilio/stream` socket; `call` once its `start` named one.
    Caller {
        call: Option<CallRef>,
        path_sid: Option<Box<[u8]>>,
    },
    Frontend {
        call: CallRef,
    },
    Bot {
        call: CallRef,
    },
}

#[derive(Default)]
struct Slot {
    generation: u32,
    call: Option<Call>,
}

struct Call {
    sid: Box<[u8]>,
    stream_sid: Box<[u8]>,
    caller: Option<Token>,
    bot: Bot,
    /// Frontends and whether each has said `connect-twilio` (only those hear audio).
    frontends: Vec<(Token, bool)>,
    /// The bot's `sequenceNumber`, `chunk` and next timestamp in samples, as Relay numbers them.
    sequence: u64,
    chunk: u64,
    next_at: u64,
}

enum Bot {
    None,
    /// Being dialled (`token` once the shell opened the socket); the caller's `start` and its
    /// media so far, already framed for the bot.
    Dialling {
        token: Option<Token>,
        backlog: Vec<u8>,
    },
    Open(Token),
}

impl Router {
    /// A router that dials only bots at these addresses (Relay's `--agent-allow`).
    pub(crate) fn new(agent_allow: Vec<IpAddr>) -> Self {
        Self {
            legs: Vec::new(),
            slots: Vec::new(),
            free: Vec::new(),
            by_sid: HashMap::new(),
            live: 0,
            agent_allow,
            out: Vec::with_capacity(64 * 1024),
            outputs: VecDeque::new(),
            stats: Stats::default(),
        }
    }

    /// A client upgraded at `path` on `token`: a caller (`/twilio/stream`, `/twilio/stream/{callSid}`)
    /// or a frontend (`/frontend-stream?callSid=`). False: not a path the floor serves, or a limit.
    pub(crate) fn handle_upgrade(&mut self, token: Token, path: &[u8]) -> bool {
        let (route, query) = match path.iter().position(|&b| b == b'?') {
            Some(q) => (&path[..q], &path[q + 1..]),
            None => (path, &b""[..]),
        };
        let leg = if route == b"/twilio/stream" {
            Leg::Caller { call: None, path_sid: None }
        } else if let Some(sid) = route.strip_prefix(b"/twilio/stream/").filter(|s| valid_sid(s)) {
            Leg::Caller { call: None, path_sid: Some(sid.into()) }
        } else if route == b"/frontend-stream" {
            let sid = query.split(|&b| b == b'&').find_map(|kv| kv.strip_prefix(b"callSid="));
            let Some(call) = sid.filter(|s| valid_sid(s)).and_then(|sid| self.call_for(sid)) else {
                self.stats.refused += 1;
                return false;
            };
            let c = self.call_mut(call).expect("call_for returns a live call");
            if c.frontends.len() >= MAX_FRONTENDS {
                self.stats.refused += 1;
                self.release_if_idle(call);
                return false;
            }
            c.frontends.push((token, false));
            Leg::Frontend { call }
        } else {
            self.stats.refused += 1;
            return false;
        };
        self.set_leg(token, leg);
        true
    }

    /// A text message from `token`.
    pub(crate) fn handle_text(&mut self, token: Token, msg: &[u8]) {
        match self.legs.get(token).cloned().unwrap_or(Leg::Free) {
            Leg::Free => {}
            Leg::Caller { call: None, path_sid } => match json::event(msg) {
                Event::Connected => {}
                Event::Start => self.started(token, path_sid.as_deref(), msg),
                _ => self.stats.protocol_errors += 1,
            },
            Leg::Caller { call: Some(call), .. } => match json::event(msg) {
                Event::Media => self.caller_media(call, msg),
                Event::Stop => self.end(call),
                Event::Mark | Event::Dtmf => self.forward_to_bot(call, msg),
                _ => self.stats.protocol_errors += 1,
            },
            Leg::Frontend { call } => {
                if json::event(msg) != Event::ConnectTwilio {
                    return;
                }
                let sid = json::string(msg, b"\"callSid\":\"");
                let Some(c) = self.call_mut(call) else { return };
                if sid == Some(&c.sid[..]) {
                    if let Some(f) = c.frontends.iter_mut().find(|(t, _)| *t == token) {
                        f.1 = true;
                    }
                } else {
                    self.stats.protocol_errors += 1;
                    self.detach(token);
                    self.close(token, false, 1008, "callSid does not match this stream");
                }
            }
            Leg::Bot { call } => match json::event(msg) {
                Event::Media => self.bot_media(call, msg),
                Event::Mark | Event::Clear => self.forward_to_caller(call, msg),
                _ => self.stats.protocol_errors += 1,
            },
        }
    }

    /// `token` is gone (end of stream, an error, or its close frame): a caller's call ends, a
    /// bot's call goes on without it, a frontend stops listening.
    pub(crate) fn handle_closed(&mut self, token: Token) {
        match self.detach(token) {
            Leg::Caller { call: Some(call), .. } => self.end(call),
            Leg::Free | Leg::Caller { call: None, .. } | Leg::Frontend { .. } | Leg::Bot { .. } => {}
        }
    }

    /// The shell opened `token` to dial `call`'s bot. False: the call is gone or has its bot (the
    /// shell closes the socket).
    pub(crate) fn handle_dialled(&mut self, call: CallRef, token: Token) -> bool {
        let Some(c) = self.call_mut(call) else { return false };
        let Bot::Dialling { token: t @ None, .. } = &mut c.bot else { return false };
        *t = Some(token);
        self.set_leg(token, Leg::Bot { call });
        true
    }

    /// The bot of `call` could not be dialled: the call goes on without it.
    pub(crate) fn handle_dial_failed(&mut self, call: CallRef) {
        if let Some(c) = self.call_mut(call) {
            if matches!(c.bot, Bot::Dialling { token: None, .. }) {
                c.bot = Bot::None;
            }
        }
    }

    /// `token`, a dialled bot, answered its upgrade: Twilio's greeting, the caller's `start` and the
    /// backlog go out in one write.
    pub(crate) fn handle_bot_open(&mut self, token: Token) {
        let Some(Leg::Bot { call }) = self.legs.get(token).cloned() else { return };
        let Some(c) = self.call_mut(call) else { return };
        let Bot::Dialling { token: Some(t), backlog } = std::mem::replace(&mut c.bot, Bot::Open(token)) else {
            return;
        };
        debug_assert_eq!(t, token);
        let from = self.out.len();
        self.out.extend_from_slice(&backlog);
        self.outputs.push_back(Output::Send { to: token, bytes: from..self.out.len() });
    }

    /// The next thing for the shell to do.
    pub(crate) fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// The bytes outputs refer to.
    pub(crate) fn bytes(&self, range: Range<usize>) -> &[u8] {
        self.out.get(range).unwrap_or_default()
    }

    /// Forgets the written bytes; call once every output is handled.
    pub(crate) fn clear(&mut self) {
        debug_assert!(self.outputs.is_empty());
        self.out.clear();
    }

    /// What was refused or dropped so far.
    #[cfg(test)]
    pub(crate) fn stats(&self) -> Stats {
        self.stats
    }

    /// Calls alive (with a caller, or frontends waiting).
    #[cfg(test)]
    pub(crate) fn calls(&self) -> usize {
        self.live
    }

    fn started(&mut self, token: Token, path_sid: Option<&[u8]>, msg: &[u8]) {
        let start = json::start(msg);
        let sid = match (path_sid, start.call_sid) {
            (Some(path), Some(named)) if path != named => None,
            (Some(path), _) => Some(path),
            (None, named) => named,
        };
        let Some(sid) = sid.filter(|s| valid_sid(s)) else {
            self.stats.refused += 1;
            self.detach(token);
            return self.close(token, false, 1008, "no valid callSid");
        };
        let Some(call) = self.call_for(sid) else {
            self.stats.refused += 1;
            self.detach(token);
            return self.close(token, false, 1013, "floor at capacity");
        };
        let allow = &self.agent_allow;
        let dial = start.agent_url.and_then(|url| bot_address(url, allow));
        let c = self.call_mut(call).expect("call_for returns a live call");
        if c.caller.is_some() {
            self.stats.refused += 1;
            self.detach(token);
            return self.close(token, false, 1008, "this call already has a caller stream");
        }
        c.caller = Some(token);
        c.stream_sid = start.stream_sid.iter().copied().take(MAX_SID).collect();
        if let Some((addr, host, path)) = dial {
            // The bot hears Twilio's greeting and this `start` first, as Relay greets it.
            let mut backlog = Vec::with_capacity(CONNECTED_FRAME + msg.len() + 14);
            frame::append(&mut backlog, frame::TEXT, true, json::CONNECTED);
            frame::append(&mut backlog, frame::TEXT, true, msg);
            c.bot = Bot::Dialling { token: None, backlog };
            self.outputs.push_back(Output::Dial { call, addr, host, path });
        }
        self.set_leg(token, Leg::Caller { call: Some(call), path_sid: None });
    }

    fn caller_media(&mut self, call: CallRef, msg: &[u8]) {
        let Some(payload) = json::payload(msg) else {
            self.stats.protocol_errors += 1;
            return;
        };
        let (chunk, timestamp) = (json::number(msg, b"\"chunk\":\""), json::number(msg, b"\"timestamp\":\""));
        let samples = base64_len(payload);
        let Some(c) = call_in(&mut self.slots, call) else { return };
        // Relay's numbering (`Session::agent_media_msg`): the caller's chunk and timestamp, never
        // going back.
        let chunk = chunk.map_or(c.chunk, |n| n.max(c.chunk));
        let floor_ms = c.next_at.div_ceil(8);
        let timestamp = timestamp.map_or(floor_ms, |t| t.max(floor_ms));
        match &mut c.bot {
            Bot::Open(bot) => {
                let start = frame::begin(&mut self.out);
                json::bot_media(&mut self.out, c.sequence, &c.stream_sid, chunk, timestamp, payload);
                let bytes = frame::finish(&mut self.out, start, frame::TEXT, true);
                self.outputs.push_back(Output::Send { to: *bot, bytes });
            }
            Bot::Dialling { backlog, .. } if backlog.len() < MAX_BACKLOG => {
                let start = frame::begin(backlog);
                json::bot_media(backlog, c.sequence, &c.stream_sid, chunk, timestamp, payload);
                let bytes = frame::finish(backlog, start, frame::TEXT, true);
                // The reserved header room in front of the frame is dropped.
                backlog.drain(start..bytes.start);
            }
            Bot::Dialling { .. } => {
                self.stats.backlog_drops += 1;
                return self.fan_out(call, payload, true);
            }
            Bot::None => return self.fan_out(call, payload, true),
        }
        c.sequence += 1;
        c.chunk = chunk + 1;
        c.next_at = timestamp * 8 + samples;
        self.fan_out(call, payload, true);
    }

    fn bot_media(&mut self, call: CallRef, msg: &[u8]) {
        let Some(payload) = json::payload(msg).filter(|p| !p.is_empty()) else {
            self.stats.protocol_errors += 1;
            return;
        };
        let Some(c) = call_in(&mut self.slots, call) else { return };
        if let Some(caller) = c.caller {
            let start = frame::begin(&mut self.out);
            json::caller_media(&mut self.out, &c.stream_sid, payload);
            let bytes = frame::finish(&mut self.out, start, frame::TEXT, false);
            self.outputs.push_back(Output::Send { to: caller, bytes });
        }
        self.fan_out(call, payload, false);
    }

    /// One `audio` message, encoded once, to every frontend that said `connect-twilio`.
    fn fan_out(&mut self, call: CallRef, payload: &[u8], inbound: bool) {
        let Some(c) = call_in(&mut self.slots, call) else { return };
        let mut shared = None;
        for &(to, active) in &c.frontends {
            if !active {
                continue;
            }
            let bytes = shared
                .get_or_insert_with(|| {
                    let start = frame::begin(&mut self.out);
                    json::frontend_audio(&mut self.out, payload, inbound);
                    frame::finish(&mut self.out, start, frame::TEXT, false)
                })
                .clone();
            self.outputs.push_back(Output::Send { to, bytes });
        }
    }

    /// A caller's `mark` or `dtmf`, as it came, to an open bot.
    fn forward_to_bot(&mut self, call: CallRef, msg: &[u8]) {
        if std::str::from_utf8(msg).is_err() {
            self.stats.protocol_errors += 1;
            return;
        }
        let Some(Call { bot: Bot::Open(bot), .. }) = call_in(&mut self.slots, call) else { return };
        let to = *bot;
        let bytes = frame::write(&mut self.out, frame::TEXT, true, msg);
        self.outputs.push_back(Output::Send { to, bytes });
    }

    /// A bot's `mark` or `clear`, as it came, to the caller (the floor does not pace).
    fn forward_to_caller(&mut self, call: CallRef, msg: &[u8]) {
        if std::str::from_utf8(msg).is_err() {
            self.stats.protocol_errors += 1;
            return;
        }
        let Some(Call { caller: Some(to), .. }) = call_in(&mut self.slots, call) else { return };
        let to = *to;
        let bytes = frame::write(&mut self.out, frame::TEXT, false, msg);
        self.outputs.push_back(Output::Send { to, bytes });
    }

    /// Ends `call`: `stop` to its bot, every socket of it closed with 1000.
    fn end(&mut self, call: CallRef) {
        if call_in(&mut self.slots, call).is_none() {
            return;
        }
        let Some(c) = self.slots[call.index as usize].call.take() else { return };
        self.release(call, &c.sid);
        match c.bot {
            Bot::Open(bot) => {
                let start = frame::begin(&mut self.out);
                json::bot_stop(&mut self.out, c.sequence, &c.stream_sid, &c.sid);
                let bytes = frame::finish(&mut self.out, start, frame::TEXT, true);
                self.outputs.push_back(Output::Send { to: bot, bytes });
                self.forget(bot);
                self.close(bot, true, 1000, "call ended");
            }
            Bot::Dialling { token: Some(bot), .. } => {
                self.forget(bot);
                self.outputs.push_back(Output::Close { to: bot });
            }
            Bot::Dialling { token: None, .. } | Bot::None => {}
        }
        for to in c.caller.into_iter().chain(c.frontends.iter().map(|(t, _)| *t)) {
            self.forget(to);
            self.close(to, false, 1000, "call ended");
        }
    }

    /// Takes `token` out of its call (a call left with nobody is released) and forgets it.
    fn detach(&mut self, token: Token) -> Leg {
        let leg = self.legs.get_mut(token).map(|l| std::mem::replace(l, Leg::Free)).unwrap_or(Leg::Free);
        match &leg {
            Leg::Frontend { call } => {
                if let Some(c) = self.call_mut(*call) {
                    c.frontends.retain(|(t, _)| *t != token);
                }
                self.release_if_idle(*call);
            }
            Leg::Bot { call } => {
                if let Some(c) = self.call_mut(*call) {
                    c.bot = Bot::None;
                }
            }
            Leg::Caller { .. } | Leg::Free => {}
        }
        leg
    }

    /// A close frame to `to`, then its socket closed.
    fn close(&mut self, to: Token, masked: bool, code: u16, reason: &str) {
        let bytes = frame::write_close(&mut self.out, masked, code, reason);
        self.outputs.push_back(Output::Send { to, bytes });
        self.outputs.push_back(Output::Close { to });
    }

    fn forget(&mut self, token: Token) {
        if let Some(l) = self.legs.get_mut(token) {
            *l = Leg::Free;
        }
    }

    fn set_leg(&mut self, token: Token, leg: Leg) {
        if self.legs.len() <= token {
            self.legs.resize(token + 1, Leg::Free);
        }
        self.legs[token] = leg;
    }

    /// The call named `sid`, made (with nobody on it yet) when there is none; `None` at the limit.
    fn call_for(&mut self, sid: &[u8]) -> Option<CallRef> {
        if let Some(&index) = self.by_sid.get(sid) {
            return Some(CallRef { index, generation: self.slots[index as usize].generation });
        }
        if self.live >= MAX_CALLS {
            return None;
        }
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(Slot::default());
                u32::try_from(self.slots.len() - 1).ok()?
            }
        };
        let slot = &mut self.slots[index as usize];
        slot.call = Some(Call {
            sid: sid.into(),
            stream_sid: Box::default(),
            caller: None,
            bot: Bot::None,
            frontends: Vec::new(),
            sequence: 2,
            chunk: 1,
            next_at: 0,
        });
        self.by_sid.insert(sid.into(), index);
        self.live += 1;
        Some(CallRef { index, generation: slot.generation })
    }

    fn call_mut(&mut self, call: CallRef) -> Option<&mut Call> {
        call_in(&mut self.slots, call)
    }

    /// Frees a call nobody is on (frontends that left before any caller came).
    fn release_if_idle(&mut self, call: CallRef) {
        let idle = self.call_mut(call).is_some_and(|c| c.caller.is_none() && c.frontends.is_empty());
        if idle {
            if let Some(c) = self.slots[call.index as usize].call.take() {
                self.release(call, &c.sid);
            }
        }
    }

    /// Returns the slot of a call already taken out of it.
    fn release(&mut self, call: CallRef, sid: &[u8]) {
        let slot = &mut self.slots[call.index as usize];
        slot.generation = slot.generation.wrapping_add(1);
        self.by_sid.remove(sid);
        self.free.push(call.index);
        self.live -= 1;
    }
}

fn call_in(slots: &mut [Slot], call: CallRef) -> Option<&mut Call> {
    slots.get_mut(call.index as usize).filter(|s| s.generation == call.generation)?.call.as_mut()
}

/// Bytes of Twilio's greeting as a client frame.
const CONNECTED_FRAME: usize = 6 + json::CONNECTED.len();

/// A call id the floor accepts: 1–128 bytes, nothing JSON would escape.
fn valid_sid(sid: &[u8]) -> bool {
    !sid.is_empty() && sid.len() <= MAX_SID && sid.iter().all(|&b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
}

/// Decoded bytes (μ-law samples) of a base64 payload.
fn base64_len(payload: &[u8]) -> u64 {
    let pad = payload.iter().rev().take_while(|&&b| b == b'=').count();
    ((payload.len() / 4 * 3).saturating_sub(pad)) as u64
}

/// The address, `Host` value and path of `ws://IP:PORT/path`, when its address is allowed.
fn bot_address(url: &[u8], allow: &[IpAddr]) -> Option<(SocketAddr, String, String)> {
    let url = std::str::from_utf8(url).ok()?.strip_prefix("ws://")?;
    let (host, path) = url.find('/').map_or((url, "/"), |i| (&url[..i], &url[i..]));
    let addr: SocketAddr = host.parse().ok()?;
    allow.contains(&addr.ip()).then(|| (addr, host.to_owned(), path.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CALLER: Token = 1;
    const FRONTEND: Token = 2;
    const BOT: Token = 3;

    fn start(call_sid: &str) -> String {
        format!(
            r#"{{"event":"start","sequenceNumber":"1","start":{{"streamSid":"MZ1","callSid":"x","customParameters":{{"callSid":"{call_sid}","agentUrl":"ws://127.0.0.1:9/bot"}}}},"streamSid":"MZ1"}}"#
        )
    }

    fn media(chunk: u64) -> String {
        format!(
            r#"{{"event":"media","sequenceNumber":"{}","media":{{"track":"inbound","chunk":"{chunk}","timestamp":"{}","payload":"/////w=="}},"streamSid":"MZ1"}}"#,
            chunk + 1,
            (chunk - 1) * 20
        )
    }

    /// Every output so far, with the text of each frame sent, unmasked (the floor's key is zero).
    fn drain(r: &mut Router) -> Vec<(Token, String)> {
        let mut sent = Vec::new();
        while let Some(o) = r.poll_output() {
            match o {
                Output::Send { to, bytes } => {
                    let mut data = r.bytes(bytes).to_vec();
                    let mut at = 0;
                    while at < data.len() {
                        let masked = data[at + 1] & 0x80 != 0;
                        let f = frame::parse(&mut data[at..], masked, 1 << 20).expect("valid").expect("whole");
                        let text = String::from_utf8_lossy(&data[at..][f.payload.clone()]).into_owned();
                        sent.push((to, if f.opcode == frame::CLOSE { format!("close {text}") } else { text }));
                        at += f.len;
                    }
                }
                Output::Close { to } => sent.push((to, "CLOSE".to_owned())),
                Output::Dial { addr, path, .. } => sent.push((usize::MAX, format!("dial {addr}{path}"))),
            }
        }
        r.clear();
        sent
    }

    /// A router with a frontend listening to call CA1, its caller started and its bot open.
    fn open_call() -> (Router, CallRef) {
        let mut r = Router::new(vec!["127.0.0.1".parse().expect("ip")]);
        assert!(r.handle_upgrade(FRONTEND, b"/frontend-stream?callSid=CA1&user_id=u"));
        r.handle_text(FRONTEND, br#"{"event":"connect-twilio","callSid":"CA1","user_id":"u"}"#);
        assert!(r.handle_upgrade(CALLER, b"/twilio/stream"));
        r.handle_text(CALLER, br#"{"event":"connected","protocol":"Call","version":"1.0.0"}"#);
        r.handle_text(CALLER, start("CA1").as_bytes());
        let call = match r.poll_output() {
            Some(Output::Dial { call, addr, host, path }) => {
                assert_eq!(
                    (addr.to_string(), host.as_str(), path.as_str()),
                    ("127.0.0.1:9".into(), "127.0.0.1:9", "/bot")
                );
                call
            }
            other => panic!("a dial, not {other:?}"),
        };
        assert!(r.handle_dialled(call, BOT));
        (r, call)
    }

    /// Caller media reaches the bot in Relay's envelope and numbering and the frontend as
    /// `inbound` audio; what the caller said while the bot was dialled follows the greeting in order.
    #[test]
    fn caller_media_to_bot_and_frontend() {
        let (mut r, _) = open_call();
        r.handle_text(CALLER, media(1).as_bytes());
        let sent = drain(&mut r);
        assert_eq!(sent, vec![(FRONTEND, r#"{"event":"audio","payload":"/////w==","track":"inbound"}"#.to_owned())]);
        r.handle_bot_open(BOT);
        r.handle_text(CALLER, media(2).as_bytes());
        let sent = drain(&mut r);
        let texts: Vec<&str> = sent.iter().filter(|(t, _)| *t == BOT).map(|(_, s)| s.as_str()).collect();
        assert_eq!(texts.len(), 4, "{sent:?}");
        assert!(texts[0].contains(r#""event":"connected""#));
        assert_eq!(texts[1], start("CA1"));
        assert_eq!(
            texts[2],
            r#"{"event":"media","sequenceNumber":"2","media":{"track":"inbound","chunk":"1","timestamp":"0","payload":"/////w=="},"streamSid":"MZ1"}"#
        );
        assert!(texts[3].contains(r#""sequenceNumber":"3""#) && texts[3].contains(r#""chunk":"2""#), "{}", texts[3]);
        assert_eq!(sent.iter().filter(|(t, _)| *t == FRONTEND).count(), 1);
    }

    /// The bot's media reaches the caller with the caller's stream id and the frontend as `outbound`.
    #[test]
    fn bot_media_to_caller_and_frontend() {
        let (mut r, _) = open_call();
        r.handle_bot_open(BOT);
        drain(&mut r);
        r.handle_text(BOT, br#"{"event":"media","streamSid":"whatever","media":{"payload":"AAAA"}}"#);
        assert_eq!(
            drain(&mut r),
            vec![
                (CALLER, r#"{"event":"media","streamSid":"MZ1","media":{"payload":"AAAA"}}"#.to_owned()),
                (FRONTEND, r#"{"event":"audio","payload":"AAAA","track":"outbound"}"#.to_owned()),
            ]
        );
    }

    /// `stop` ends the call: `stop` to the bot, a close to each socket; later frames go nowhere.
    #[test]
    fn stop_ends_the_call() {
        let (mut r, _) = open_call();
        r.handle_bot_open(BOT);
        drain(&mut r);
        r.handle_text(CALLER, br#"{"event":"stop","sequenceNumber":"9","streamSid":"MZ1"}"#);
        let sent = drain(&mut r);
        assert!(
            sent.contains(&(
                BOT,
                r#"{"event":"stop","sequenceNumber":"2","streamSid":"MZ1","stop":{"accountSid":"","callSid":"CA1"}}"#
                    .to_owned()
            )),
            "{sent:?}"
        );
        for t in [CALLER, FRONTEND, BOT] {
            assert!(sent.contains(&(t, "CLOSE".to_owned())), "{t} closed: {sent:?}");
        }
        assert_eq!(r.calls(), 0);
        r.handle_text(BOT, br#"{"event":"media","media":{"payload":"AAAA"}}"#);
        r.handle_closed(CALLER);
        assert!(drain(&mut r).is_empty());
    }

    /// A frontend hears nothing before `connect-twilio`; one naming another call is closed 1008;
    /// a frontend leaving before any caller frees its call.
    #[test]
    fn frontends() {
        let mut r = Router::new(Vec::new());
        assert!(r.handle_upgrade(FRONTEND, b"/frontend-stream?user_id=u&callSid=CA1"));
        assert!(r.handle_upgrade(4, b"/frontend-stream?callSid=CA1"));
        assert_eq!(r.calls(), 1);
        assert!(r.handle_upgrade(CALLER, b"/twilio/stream/CA1"));
        r.handle_text(CALLER, start("CA1").as_bytes());
        r.handle_text(CALLER, media(1).as_bytes());
        assert!(drain(&mut r).is_empty(), "no bot allowed, no frontend connected yet");
        r.handle_text(4, br#"{"event":"connect-twilio","callSid":"CA2"}"#);
        let sent = drain(&mut r);
        assert_eq!(sent[0].0, 4);
        assert!(sent[0].1.contains("callSid does not match"));
        r.handle_closed(FRONTEND);
        r.handle_closed(CALLER);
        assert_eq!(r.calls(), 0);
        assert!(r.handle_upgrade(FRONTEND, b"/frontend-stream?callSid=CA3"));
        r.handle_closed(FRONTEND);
        assert_eq!(r.calls(), 0, "a frontend alone does not keep a call");
    }

    /// Unknown paths, a second caller, a path naming another call than the start, and a start
    /// without a call id are refused; garbage costs nothing but a count.
    #[test]
    fn refusals() {
        let mut r = Router::new(Vec::new());
        assert!(!r.handle_upgrade(1, b"/nope"));
        assert!(!r.handle_upgrade(1, b"/frontend-stream"));
        assert!(r.handle_upgrade(1, b"/twilio/stream"));
        r.handle_text(1, start("CA1").as_bytes());
        assert!(r.handle_upgrade(2, b"/twilio/stream"));
        r.handle_text(2, start("CA1").as_bytes());
        assert!(drain(&mut r).iter().any(|(t, s)| *t == 2 && s.contains("already has a caller")));
        assert!(r.handle_upgrade(3, b"/twilio/stream/CA9"));
        r.handle_text(3, start("CA1").as_bytes());
        assert!(drain(&mut r).iter().any(|(t, s)| *t == 3 && s.contains("no valid callSid")));
        assert!(r.handle_upgrade(5, b"/twilio/stream"));
        r.handle_text(5, br#"{"event":"start","start":{}}"#);
        assert!(drain(&mut r).iter().any(|(t, s)| *t == 5 && s == "CLOSE"));
        for junk in [&b"\xff\xfe"[..], b"{", br#"{"event":"media","media":{"payload":"#, br#"{"event":"media"}"#] {
            r.handle_text(1, junk);
            r.handle_text(99, junk);
        }
        assert!(drain(&mut r).is_empty());
        assert!(r.stats().protocol_errors >= 4);
        assert_eq!(r.calls(), 1);
    }

    /// A bot's backlog stops growing at its bound; the frontends still hear the caller.
    #[test]
    fn backlog_is_bounded() {
        let (mut r, _) = open_call();
        drain(&mut r);
        for chunk in 1..=1000 {
            r.handle_text(CALLER, media(chunk).as_bytes());
        }
        assert!(r.stats().backlog_drops > 0);
        assert_eq!(drain(&mut r).len(), 1000, "one frontend message per caller frame");
        r.handle_bot_open(BOT);
        let sent = drain(&mut r);
        assert_eq!(sent.len(), 2 + 1000 - r.stats().backlog_drops as usize);
    }

    /// Only `ws://IP:PORT` bots on the allow-list are dialled.
    #[test]
    fn bot_addresses() {
        let allow = ["127.0.0.1".parse().expect("ip")];
        assert!(bot_address(b"ws://127.0.0.1:80/bot", &allow).is_some());
        assert_eq!(bot_address(b"ws://127.0.0.1:80", &allow).map(|b| b.2), Some("/".to_owned()));
        assert!(bot_address(b"ws://10.0.0.1:80/bot", &allow).is_none());
        assert!(bot_address(b"wss://127.0.0.1:80/bot", &allow).is_none());
        assert!(bot_address(b"ws://localhost:80/bot", &allow).is_none());
        assert_eq!(base64_len(b"/////w=="), 4);
        assert_eq!(base64_len(b"AAAA"), 3);
    }
}
