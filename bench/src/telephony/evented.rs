//! The event-loop generator (the default): one thread, one epoll instance, a timer heap, and every
//! socket — callers, frontends, the bot's listener and its streams — as a small state machine over
//! a non-blocking socket, with Relay's sans-IO WebSocket codec for framing.
//!
//! Why epoll and not glommio: measured on the 2-vCPU guest, a glommio executor cost 65 % of a CPU
//! at 100 calls (the threaded generator 34 %) and fell behind at ~300: each park cancels and
//! re-arms io_uring timeouts and links rings, and every completion of a socket poll interrupts the
//! running thread (task work signalled by IPI). A level-triggered epoll loop is told about
//! readiness only when it asks, so a busy generator takes no interrupts from the relay's sends.
//!
//! Invariant: senders fire on absolute due times from the schedule, never relative periods; the
//! loop never blocks on a socket (connects included) and returns by the run's hard deadline.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::io::{self, ErrorKind, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use base64::Engine as _;
use relay_engine::config::Limits;
use relay_engine::proto::http::{parse_head, Parse};
use relay_engine::proto::ws::{accept_key, write_switching_protocols, Incoming, WsCodec};
use tungstenite::Utf8Bytes;

use super::epoll::{Epoll, Event, Interest};
use super::{
    caller_path, connect_twilio_msg, echo_msg, echo_stamp, elapsed_nanos, frame_id, frames, frontend_path,
    frontend_stream, lead_in, media_msg, parse, report, start_msg, steady, stop_msg, stream_sid, Options, Received,
    Report, Schedule, Tally, CONNECTED, DECODE_BYTES, DRAIN, HANG_UP_AFTER, PERIOD,
};
use crate::stats::Recorder;

/// Client connections connecting or handshaking at once: enough to set 1000 calls up in a fraction
/// of the lead-in, few enough that no listen backlog overflows (a dropped SYN costs a one-second
/// retransmit).
const SETUP_CONCURRENCY: usize = 64;
/// Longest one connect + handshake may take.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long past the last call's drain the run may go before it is declared stuck.
const OVERRUN: Duration = Duration::from_secs(5);
/// The one read buffer every socket shares (the loop reads one socket at a time), bytes.
const READ_BYTES: usize = 64 * 1024;
/// Largest handshake head, bytes.
const MAX_HEAD_BYTES: usize = 8 * 1024;
/// Readiness events taken per wait.
const EVENTS_PER_WAIT: usize = 256;
/// A wait shorter than this polls instead of sleeping: on the 2-vCPU guest a sleep and wake-up
/// (arm the timer, halt, take the interrupt) costs ~7 µs of CPU and ~20 µs of lateness, more than
/// polling through the gap.
const SPIN_BELOW: Duration = Duration::from_micros(15);
/// Due frames are sent after every this many readiness events, so a burst of echoes cannot hold
/// the senders back by more than a few events' work.
const TIMER_CHECK_EVERY: usize = 16;
/// The loop thread's timer slack: the kernel's default (50 µs) would add itself to every send.
const TIMER_SLACK: Duration = Duration::from_micros(1);
/// The bot's listener's token (connections use their slot index).
const LISTENER: u64 = u64::MAX;

/// Runs the scenario on one thread (pinned to `opts.cpu` when given) and returns its report.
pub(super) fn run(relay: Option<SocketAddr>, opts: Options) -> anyhow::Result<Report> {
    std::thread::Builder::new()
        .name("bench-gen".to_owned())
        .spawn(move || {
            if let Some(cpu) = opts.cpu {
                crate::sampler::pin_current_thread(cpu).with_context(|| format!("pin the generator to CPU {cpu}"))?;
            }
            super::epoll::set_timer_slack(TIMER_SLACK).context("set the generator's timer slack")?;
            Loop::new(relay, opts)?.run()
        })
        .context("start the generator thread")?
        .join()
        .map_err(|_| anyhow!("the generator thread panicked"))?
}

/// A client connection still to be opened.
#[derive(Debug, Clone, Copy)]
enum Dial {
    Caller(u32),
    Frontend(u32, u32),
}

/// What a connection is for, with the state its role needs.
enum Role {
    Caller(Caller),
    Frontend {
        call: u32,
        k: u32,
    },
    /// A stream the relay (or, direct, a caller) opened to the bot.
    Bot {
        stream_sid: String,
    },
}

/// One caller's progress.
struct Caller {
    call: u32,
    stream_sid: String,
    /// The next frame to send.
    next_seq: u64,
    /// `stop` has been sent: the caller is done sending.
    hung_up: bool,
    /// The server closed the stream or the drain deadline passed: the caller is done reading.
    read_done: bool,
}

/// Where a connection's WebSocket stands.
enum Phase {
    /// Client: the non-blocking connect is under way (writable when it completes); the request
    /// for `path` with `key` goes out then.
    Connecting { path: String, key: String },
    /// Client: request sent, the 101 answer is being read.
    Answer { key: String, head: Vec<u8> },
    /// Server (bot): the upgrade request is being read.
    Request { head: Vec<u8> },
    /// Frames flow.
    Open(Box<WsCodec>),
}

struct Conn {
    stream: TcpStream,
    role: Role,
    phase: Phase,
    /// Bytes the socket pushed back, sent when it is writable again (empty nearly always).
    unsent: Vec<u8>,
}

/// What a timer does when it fires; ordered only to break ties in the heap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    /// The caller's next frame is due.
    Frame,
    /// The caller's last echoes had time to arrive: send `stop`.
    HangUp,
    /// Stop reading (caller or frontend).
    Drain,
    /// The connection had to be open by now.
    Setup,
}

struct Loop {
    epoll: Epoll,
    ready: Vec<Event>,
    listener: TcpListener,
    /// Connections by token; a closed one leaves `None` (a run opens a bounded number).
    conns: Vec<Option<Conn>>,
    /// (when, token, what): the earliest first.
    timers: BinaryHeap<Reverse<(Instant, usize, Timer)>>,
    /// Where callers connect (the relay, or the bot directly).
    target: SocketAddr,
    relay: Option<SocketAddr>,
    agent_url: String,
    dials: VecDeque<Dial>,
    in_setup: usize,
    callers_left: u32,
    opts: Options,
    schedule: Schedule,
    frames: u64,
    hard_end: Instant,
    limits: Limits,
    uplink: Tally,
    downlink: Tally,
    fanout: Tally,
    send_lag: Recorder,
    late_sends: u64,
    failures: Vec<String>,
    chunk: Vec<u8>,
    frame: [u8; DECODE_BYTES],
}

impl Loop {
    fn new(relay: Option<SocketAddr>, opts: Options) -> anyhow::Result<Self> {
        let listener = TcpListener::bind((opts.bot_ip, 0)).context("bind the bot")?;
        listener.set_nonblocking(true)?;
        let bot_addr = listener.local_addr()?;
        let epoll = Epoll::new(EVENTS_PER_WAIT).context("epoll")?;
        epoll.add(listener.as_raw_fd(), LISTENER, Interest::Read)?;
        let frames = frames(&opts);
        let schedule = Schedule { origin: Instant::now() + lead_in(&opts), calls: opts.calls, aligned: opts.aligned };
        let last_due = schedule.due(opts.calls.saturating_sub(1), frames);
        // Frontends first, so each listens before its call starts (as the threaded generator intends).
        let mut dials = VecDeque::new();
        if relay.is_some() {
            dials.extend((0..opts.calls).flat_map(|c| (0..opts.frontends).map(move |k| Dial::Frontend(c, k))));
        }
        dials.extend((0..opts.calls).map(Dial::Caller));
        Ok(Self {
            epoll,
            ready: Vec::with_capacity(EVENTS_PER_WAIT),
            listener,
            conns: Vec::new(),
            timers: BinaryHeap::new(),
            target: relay.unwrap_or(bot_addr),
            relay,
            agent_url: format!("ws://{bot_addr}/bot"),
            dials,
            in_setup: 0,
            callers_left: opts.calls,
            opts,
            schedule,
            frames,
            hard_end: last_due + HANG_UP_AFTER + DRAIN + OVERRUN,
            limits: Limits::default(),
            uplink: Tally::default(),
            downlink: Tally::default(),
            fanout: Tally::default(),
            send_lag: Recorder::new(),
            late_sends: 0,
            failures: Vec::new(),
            chunk: vec![0; READ_BYTES],
            frame: [0; DECODE_BYTES],
        })
    }

    /// Fires due timers, waits for readiness until the next one, handles it; until every caller is done.
    fn run(mut self) -> anyhow::Result<Report> {
        self.dial_more();
        while self.callers_left > 0 {
            let now = Instant::now();
            if now >= self.hard_end {
                bail!("{} calls did not finish by their deadline (a stuck server?)", self.callers_left);
            }
            self.fire_timers(now);
            if self.callers_left == 0 {
                break;
            }
            let next = self.timers.peek().map_or(self.hard_end, |Reverse((at, ..))| (*at).min(self.hard_end));
            let mut timeout = next.saturating_duration_since(Instant::now());
            if timeout < SPIN_BELOW {
                timeout = Duration::ZERO;
            }
            let mut ready = std::mem::take(&mut self.ready);
            self.epoll.wait(&mut ready, Some(timeout)).context("epoll wait")?;
            for (i, event) in ready.drain(..).enumerate() {
                self.handle_event(event);
                if i % TIMER_CHECK_EVERY == TIMER_CHECK_EVERY - 1 {
                    self.fire_timers(Instant::now());
                }
            }
            self.ready = ready;
        }
        if let Some(first) = self.failures.first() {
            bail!("{} connections failed; first: {first}", self.failures.len());
        }
        let steady = steady(&self.schedule, self.frames);
        Ok(report(
            &self.opts,
            self.relay.is_some(),
            self.frames,
            self.uplink,
            self.downlink,
            self.fanout,
            self.send_lag,
            self.late_sends,
            steady,
        ))
    }

    /// Opens client connections while fewer than [`SETUP_CONCURRENCY`] are in setup.
    fn dial_more(&mut self) {
        while self.in_setup < SETUP_CONCURRENCY {
            let Some(dial) = self.dials.pop_front() else { return };
            let (role, path, seed) = match dial {
                Dial::Caller(call) => {
                    let path = caller_path(call, self.relay.is_some(), self.opts.keyed_path);
                    let caller =
                        Caller { call, stream_sid: stream_sid(call), next_seq: 0, hung_up: false, read_done: false };
                    (Role::Caller(caller), path, u64::from(call))
                }
                Dial::Frontend(call, k) => {
                    (Role::Frontend { call, k }, frontend_path(call, k), (1 << 63) | frontend_stream(call, k))
                }
            };
            let key = handshake_key(seed);
            match super::epoll::connect(self.target) {
                Ok(stream) => {
                    let token =
                        self.insert(Conn { stream, role, phase: Phase::Connecting { path, key }, unsent: Vec::new() });
                    match token {
                        Ok(token) => {
                            self.in_setup += 1;
                            self.timers.push(Reverse((Instant::now() + SETUP_TIMEOUT, token, Timer::Setup)));
                        }
                        Err(e) => self.fail_role(&dial_role(dial), &format!("register: {e}")),
                    }
                }
                Err(e) => self.fail_role(&dial_role(dial), &format!("connect {}: {e}", self.target)),
            }
        }
    }

    /// Adds a connection and watches it (for writability too while it connects).
    fn insert(&mut self, conn: Conn) -> io::Result<usize> {
        let token = self.conns.len();
        let interest =
            if matches!(conn.phase, Phase::Connecting { .. }) { Interest::ReadWrite } else { Interest::Read };
        self.epoll.add(conn.stream.as_raw_fd(), token as u64, interest)?;
        self.conns.push(Some(conn));
        Ok(token)
    }

    fn fire_timers(&mut self, now: Instant) {
        while let Some(&Reverse((at, token, timer))) = self.timers.peek() {
            if at > now {
                return;
            }
            self.timers.pop();
            if self.conns.get(token).is_none_or(Option::is_none) {
                continue; // The connection ended before its timer.
            }
            match timer {
                Timer::Frame => self.send_frame(token),
                Timer::HangUp => self.hang_up(token),
                Timer::Drain => self.drain_done(token),
                Timer::Setup => {
                    if !matches!(self.conn(token).phase, Phase::Open(_)) {
                        self.fail(token, "connect and handshake timed out");
                    }
                }
            }
        }
    }

    fn conn(&mut self, token: usize) -> &mut Conn {
        self.conns[token].as_mut().expect("callers check the slot is live")
    }

    fn handle_event(&mut self, event: Event) {
        if event.token == LISTENER {
            self.accept_all();
            return;
        }
        let token = usize::try_from(event.token).unwrap_or(usize::MAX);
        if self.conns.get(token).is_none_or(Option::is_none) {
            return;
        }
        if matches!(self.conn(token).phase, Phase::Connecting { .. }) {
            if event.writable || event.readable {
                self.connected(token);
            }
            return;
        }
        if event.writable {
            if let Err(e) = self.flush_unsent(token) {
                self.broken(token, &format!("write: {e}"));
                return;
            }
        }
        if event.readable {
            self.readable(token);
        }
    }

    /// Accepts every stream waiting at the bot's listener.
    fn accept_all(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    if let Err(e) = stream.set_nonblocking(true) {
                        self.failures.push(format!("bot stream: {e}"));
                        continue;
                    }
                    let conn = Conn {
                        stream,
                        role: Role::Bot { stream_sid: String::new() },
                        phase: Phase::Request { head: Vec::new() },
                        unsent: Vec::new(),
                    };
                    if let Err(e) = self.insert(conn) {
                        self.failures.push(format!("bot stream: {e}"));
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    // Out of descriptors, say: stop accepting (a level-triggered listener would
                    // report the same error at every wait); the relay's dials fail and show it.
                    self.failures.push(format!("bot accept: {e}"));
                    let _ = self.epoll.delete(self.listener.as_raw_fd());
                    return;
                }
            }
        }
    }

    /// A client's connect finished: send the upgrade request.
    fn connected(&mut self, token: usize) {
        let conn = self.conns[token].as_mut().expect("checked by the caller");
        // A failed connect reports writable too: SO_ERROR, or no peer, says so.
        let error = match conn.stream.take_error() {
            Ok(Some(e)) | Err(e) => Some(e),
            Ok(None) => conn.stream.peer_addr().err(),
        };
        if let Some(e) = error {
            return self.fail(token, &format!("connect {}: {e}", self.target));
        }
        let Phase::Connecting { path, key } = std::mem::replace(&mut conn.phase, Phase::Request { head: Vec::new() })
        else {
            unreachable!("checked by the caller");
        };
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n",
            self.target
        );
        conn.phase = Phase::Answer { key, head: Vec::new() };
        let _ = conn.stream.set_nodelay(true);
        let sent = self
            .epoll
            .modify(conn.stream.as_raw_fd(), token as u64, Interest::Read)
            .and_then(|()| send(&self.epoll, token, conn, request.as_bytes()));
        if let Err(e) = sent {
            self.fail(token, &format!("send the handshake: {e}"));
        }
    }

    /// Reads once (level-triggered: what is left is reported again) and acts on what came.
    fn readable(&mut self, token: usize) {
        let conn = self.conns[token].as_mut().expect("checked by the caller");
        let n = match conn.stream.read(&mut self.chunk) {
            Ok(0) => return self.eof(token),
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => return,
            Err(_) => return self.eof(token),
        };
        // Every message in this read had arrived by now; parsing them is the generator's time.
        let now = Instant::now();
        match &mut conn.phase {
            Phase::Answer { key, head } => {
                head.extend_from_slice(&self.chunk[..n]);
                match read_answer(head, key) {
                    Ok(Some(head_len)) => {
                        let codec = WsCodec::new_client(&self.limits, &head[head_len..]);
                        conn.phase = Phase::Open(Box::new(codec));
                        self.in_setup -= 1;
                        self.opened(token);
                        self.dial_more();
                        self.messages(token, now);
                    }
                    Ok(None) => {}
                    Err(e) => self.fail(token, &format!("{e:#}")),
                }
            }
            Phase::Request { head } => {
                head.extend_from_slice(&self.chunk[..n]);
                match parse_head(head, &self.limits) {
                    Ok(Parse::Incomplete) if head.len() < MAX_HEAD_BYTES => {}
                    Ok(Parse::Complete { head: request, head_len }) => match accept_key(&request) {
                        Ok(accept) => {
                            let codec = WsCodec::new_server(&self.limits, &head[head_len..]);
                            conn.phase = Phase::Open(Box::new(codec));
                            let mut answer = Vec::with_capacity(160);
                            write_switching_protocols(&mut answer, &accept, "");
                            if send(&self.epoll, token, conn, &answer).is_err() {
                                return self.close(token);
                            }
                            self.messages(token, now);
                        }
                        Err(_) => self.close(token),
                    },
                    Ok(Parse::Incomplete) | Err(_) => self.close(token),
                }
            }
            Phase::Open(codec) => {
                codec.handle_bytes(&self.chunk[..n]);
                self.messages(token, now);
            }
            Phase::Connecting { .. } => {}
        }
    }

    /// A client's WebSocket is open: callers announce the call and start the clock, frontends subscribe.
    fn opened(&mut self, token: usize) {
        let conn = self.conns[token].as_mut().expect("live");
        let Phase::Open(codec) = &mut conn.phase else { return };
        let (sent, first_frame, drain_at) = match &conn.role {
            Role::Caller(c) => (
                codec
                    .send_text(Utf8Bytes::from_static(CONNECTED))
                    .and_then(|()| codec.send_text(Utf8Bytes::from(start_msg(c.call, &self.agent_url)))),
                Some(self.schedule.due(c.call, 0)),
                self.schedule.due(c.call, self.frames) + DRAIN,
            ),
            Role::Frontend { call, k } => (
                codec.send_text(Utf8Bytes::from(connect_twilio_msg(*call, *k))),
                None,
                self.schedule.due(*call, self.frames) + DRAIN,
            ),
            Role::Bot { .. } => return,
        };
        if let Some(at) = first_frame {
            self.timers.push(Reverse((at, token, Timer::Frame)));
        }
        self.timers.push(Reverse((drain_at, token, Timer::Drain)));
        if let Err(e) = sent.map_err(io::Error::other).and_then(|()| self.transmit(token)) {
            self.fail(token, &format!("send the opening messages: {e}"));
        }
    }

    /// Handles every whole message the codec holds, then sends what that produced (echoes, pongs).
    fn messages(&mut self, token: usize, now: Instant) {
        let late_after = self.opts.late_after;
        let origin = self.schedule.origin;
        loop {
            let conn = self.conns[token].as_mut().expect("live");
            let Phase::Open(codec) = &mut conn.phase else { return };
            let text = match codec.poll_incoming() {
                Ok(Some(Incoming::Text(text))) => text,
                Ok(Some(Incoming::Binary(_))) => continue,
                Ok(Some(Incoming::Close)) | Err(_) => {
                    let _ = self.transmit(token); // The codec's close answer.
                    return self.eof(token);
                }
                Ok(None) => break,
            };
            match (&mut conn.role, parse(&text, &mut self.frame)) {
                (Role::Caller(_), Received::Frame(bytes)) => {
                    if let Some((c, seq)) = frame_id(bytes) {
                        // The downlink is measured from the bot's echo time carried in bytes 12..20.
                        let at = elapsed_nanos(origin, now);
                        let latency = Duration::from_nanos(at.saturating_sub(echo_stamp(bytes)));
                        self.downlink.record(u64::from(c), seq, latency, late_after);
                    }
                }
                (Role::Frontend { call, k }, Received::Frame(bytes)) => {
                    if let Some((c, seq)) = frame_id(bytes) {
                        let latency = now.saturating_duration_since(self.schedule.due(c, seq));
                        self.fanout.record(frontend_stream(*call, *k), seq, latency, late_after);
                    }
                }
                (Role::Bot { stream_sid }, Received::Frame(bytes)) => {
                    let Some((call, seq)) = frame_id(bytes) else { continue };
                    let latency = now.saturating_duration_since(self.schedule.due(call, seq));
                    self.uplink.record(u64::from(call), seq, latency, late_after);
                    if bytes.len() >= 20 {
                        bytes[12..20].copy_from_slice(&elapsed_nanos(origin, Instant::now()).to_le_bytes());
                    }
                    if codec.send_text(Utf8Bytes::from(echo_msg(stream_sid, bytes))).is_err() {
                        return self.close(token);
                    }
                }
                (Role::Bot { stream_sid }, Received::Start(sid)) => *stream_sid = sid,
                (Role::Bot { .. }, Received::Stop) => {
                    let _ = self.transmit(token);
                    return self.close(token);
                }
                _ => {}
            }
        }
        if let Err(e) = self.transmit(token) {
            self.broken(token, &format!("write: {e}"));
        }
    }

    /// Sends frame `next_seq` of a caller and arms the next timer.
    fn send_frame(&mut self, token: usize) {
        let conn = self.conns[token].as_mut().expect("live");
        let (Role::Caller(c), Phase::Open(codec)) = (&mut conn.role, &mut conn.phase) else { return };
        if c.read_done {
            return;
        }
        let seq = c.next_seq;
        let due = self.schedule.due(c.call, seq);
        // Lateness is judged when the frame actually leaves: timer slack and a busy loop both count.
        let behind = Instant::now().saturating_duration_since(due);
        if behind > PERIOD {
            self.late_sends += 1;
        }
        self.send_lag.record(behind);
        let sent = codec.send_text(Utf8Bytes::from(media_msg(c.call, seq, &c.stream_sid)));
        c.next_seq += 1;
        let next = if c.next_seq < self.frames {
            (self.schedule.due(c.call, c.next_seq), Timer::Frame)
        } else {
            (due + HANG_UP_AFTER, Timer::HangUp)
        };
        self.timers.push(Reverse((next.0, token, next.1)));
        if let Err(e) = sent.map_err(io::Error::other).and_then(|()| self.transmit(token)) {
            self.fail(token, &format!("send frame {seq}: {e}"));
        }
    }

    /// Twilio's hang-up: `stop`, after the last echoes had time to arrive.
    fn hang_up(&mut self, token: usize) {
        let conn = self.conns[token].as_mut().expect("live");
        let (Role::Caller(c), Phase::Open(codec)) = (&mut conn.role, &mut conn.phase) else { return };
        c.hung_up = true;
        if !c.read_done && codec.send_text(Utf8Bytes::from(stop_msg(c.call, self.frames))).is_ok() {
            let _ = self.transmit(token);
        }
        self.caller_progress(token);
    }

    /// The reading window of a caller or frontend closed.
    fn drain_done(&mut self, token: usize) {
        match &mut self.conn(token).role {
            Role::Caller(c) => {
                c.read_done = true;
                self.caller_progress(token);
            }
            Role::Frontend { .. } => self.close(token),
            Role::Bot { .. } => {}
        }
    }

    /// The peer closed (EOF, close frame, reset, or a protocol error).
    fn eof(&mut self, token: usize) {
        match &mut self.conn(token).role {
            Role::Caller(c) => {
                c.read_done = true;
                if !c.hung_up {
                    let (call, seq) = (c.call, c.next_seq);
                    return self.fail(token, &format!("the server closed call {call}'s stream before frame {seq}"));
                }
                self.caller_progress(token);
            }
            Role::Frontend { .. } | Role::Bot { .. } => self.close(token),
        }
    }

    /// A caller that has hung up and stopped reading is done: close politely and count it.
    fn caller_progress(&mut self, token: usize) {
        let conn = self.conn(token);
        let Role::Caller(c) = &conn.role else { return };
        if !(c.hung_up && c.read_done) {
            return;
        }
        if let Phase::Open(codec) = &mut conn.phase {
            codec.close(1000, "");
            let _ = self.transmit(token);
        }
        self.callers_left -= 1;
        self.close(token);
    }

    /// A write failed: a caller or frontend fails the run, a bot stream just ends.
    fn broken(&mut self, token: usize, why: &str) {
        match self.conn(token).role {
            Role::Caller(_) | Role::Frontend { .. } => self.fail(token, why),
            Role::Bot { .. } => self.close(token),
        }
    }

    /// Records a failed caller or frontend and drops it.
    fn fail(&mut self, token: usize, why: &str) {
        let conn = self.remove(token);
        self.fail_role(&conn.role, why);
    }

    fn fail_role(&mut self, role: &Role, why: &str) {
        match role {
            Role::Caller(c) => {
                self.failures.push(format!("call {}: {why}", c.call));
                self.callers_left -= 1;
            }
            Role::Frontend { call, k } => self.failures.push(format!("frontend {k} of call {call}: {why}")),
            Role::Bot { .. } => {}
        }
    }

    /// Drops a connection (closing its socket removes it from epoll).
    fn close(&mut self, token: usize) {
        self.remove(token);
    }

    /// Takes a connection out; one that was still in setup frees its place for the next dial.
    fn remove(&mut self, token: usize) -> Conn {
        let conn = self.conns[token].take().expect("callers check the slot is live");
        if matches!(conn.phase, Phase::Connecting { .. } | Phase::Answer { .. }) {
            self.in_setup -= 1;
            self.dial_more();
        }
        conn
    }

    /// Sends what the codec has queued.
    fn transmit(&mut self, token: usize) -> io::Result<()> {
        let conn = self.conns[token].as_mut().expect("live");
        let Phase::Open(codec) = &mut conn.phase else { return Ok(()) };
        match codec.poll_transmit() {
            Some(bytes) => send(&self.epoll, token, conn, &bytes),
            None => Ok(()),
        }
    }

    /// Writes what the socket pushed back earlier; stops watching for room once it is all out.
    fn flush_unsent(&mut self, token: usize) -> io::Result<()> {
        let conn = self.conns[token].as_mut().expect("live");
        super::epoll::flush_unsent(&self.epoll, token as u64, &mut conn.stream, &mut conn.unsent)
    }
}

/// Writes `bytes` now, or keeps what the socket will not take and watches for room.
fn send(epoll: &Epoll, token: usize, conn: &mut Conn, bytes: &[u8]) -> io::Result<()> {
    super::epoll::send_or_queue(epoll, token as u64, &mut conn.stream, &mut conn.unsent, bytes)
}

/// The role a dial would have had, to report its failure.
fn dial_role(dial: Dial) -> Role {
    match dial {
        Dial::Caller(call) => {
            Role::Caller(Caller { call, stream_sid: String::new(), next_seq: 0, hung_up: false, read_done: false })
        }
        Dial::Frontend(call, k) => Role::Frontend { call, k },
    }
}

/// A `Sec-WebSocket-Key`: RFC 6455 asks for a per-connection nonce; it guards caches, not secrets.
fn handshake_key(seed: u64) -> String {
    let mut nonce = [0u8; 16];
    nonce[..8].copy_from_slice(&seed.to_le_bytes());
    nonce[8..12].copy_from_slice(&std::process::id().to_le_bytes());
    base64::engine::general_purpose::STANDARD.encode(nonce)
}

/// Reads a 101 answer for `key` from `head`: the head's length once complete, `None` before.
///
/// # Errors
/// When the answer is not a matching 101, is malformed, or is too large.
fn read_answer(head: &[u8], key: &str) -> anyhow::Result<Option<usize>> {
    relay_engine::proto::ws::check_answer(head, key).map_err(anyhow::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 101 with the matching accept value opens; a partial head waits; a refusal or a wrong key fails.
    #[test]
    fn handshake_answers() {
        let key = handshake_key(3);
        let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
        let mut ok = format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n").into_bytes();
        let head_len = ok.len();
        ok.extend_from_slice(&[0x81, 0x00]); // An empty text frame right behind the head.
        assert_eq!(read_answer(&ok, &key).expect("valid"), Some(head_len), "frames after the head are kept");
        assert_eq!(read_answer(&ok[..20], &key).expect("partial"), None);
        assert!(read_answer(b"HTTP/1.1 404 Not Found\r\n\r\n", &key).is_err());
        assert!(read_answer(&ok, &handshake_key(4)).is_err(), "another connection's key");
    }
}
