//! The floor: the least a relay of this protocol can do, as the yardstick `relay-bench compare`
//! measures Relay against. One thread, one level-triggered epoll instance, non-blocking sockets
//! with `TCP_NODELAY`, hand-written WebSocket framing (`frame.rs`: client frames toward the bot
//! masked with the all-zero key), fields found by byte search (`json.rs`), routing as Relay's
//! pass-through path (`router.rs`), each output frame written with one `send`, no timers at all.
//!
//! It serves exactly the bench's traffic the way Relay does: Twilio-protocol callers on
//! `/twilio/stream` (or `/twilio/stream/{callSid}`) whose `start` names the bot to dial
//! (`customParameters.agentUrl`, checked against `--agent-allow`), and frontends on
//! `/frontend-stream?callSid=` that say `connect-twilio`. What it leaves out is what the bench
//! does not exercise: TLS, the control API, pacing (a bot's audio goes to its caller as it comes),
//! DNS, pings of its own, timeouts.
//!
//! Invariant: one read per readiness event and one write per output frame (a socket that pushes
//! back gets the rest queued, bounded); nothing a peer sends can panic it or grow a buffer past its
//! bound; a bad peer costs only its own connection.

pub(crate) mod frame;
pub(crate) mod json;
pub(crate) mod router;

use std::io::{self, ErrorKind, Read as _};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;

use anyhow::Context;
use base64::Engine as _;

use crate::telephony::epoll::{self, Epoll, Event, Interest};
use router::{Output, Router, Token};

/// Bytes read per `recv` (one buffer for every socket: the loop reads one at a time).
const READ_BYTES: usize = 64 * 1024;
/// Largest message (or frame) a peer may send, bytes; more is closed 1009.
const MAX_MESSAGE: usize = 64 * 1024;
/// Largest HTTP head, bytes.
const MAX_HEAD: usize = 8 * 1024;
/// Connections at once; more are closed as they are accepted.
const MAX_CONNS: usize = 30_000;
/// Readiness events taken per wait.
const EVENTS_PER_WAIT: usize = 256;
/// The listener's token (connections use their slot).
const LISTENER: u64 = u64::MAX;

/// Where the floor listens and whom it may dial.
#[derive(Debug, Clone)]
pub struct Options {
    /// The listen address (`127.0.0.1:0` for a free port).
    pub listen: SocketAddr,
    /// Addresses a caller's `agentUrl` may name (Relay's `--agent-allow`).
    pub agent_allow: Vec<IpAddr>,
}

/// A bound floor server, not yet serving.
pub struct Floor {
    listener: TcpListener,
    agent_allow: Vec<IpAddr>,
}

impl Floor {
    /// Binds the listener.
    ///
    /// # Errors
    /// When the address cannot be bound.
    pub fn bind(opts: &Options) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(opts.listen).with_context(|| format!("bind {}", opts.listen))?;
        listener.set_nonblocking(true)?;
        Ok(Self { listener, agent_allow: opts.agent_allow.clone() })
    }

    /// Where it listens.
    ///
    /// # Errors
    /// When the socket cannot say.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves on this thread until an unrecoverable error (epoll failing); it never returns
    /// otherwise.
    ///
    /// # Errors
    /// When epoll fails.
    pub fn run(self) -> anyhow::Result<()> {
        let epoll = Epoll::new(EVENTS_PER_WAIT).context("epoll")?;
        epoll.add(self.listener.as_raw_fd(), LISTENER, Interest::Read)?;
        let mut shell = Shell {
            epoll,
            listener: self.listener,
            conns: Vec::new(),
            free: Vec::new(),
            live: 0,
            router: Router::new(self.agent_allow),
            buf: vec![0; READ_BYTES],
            scratch: Vec::with_capacity(256),
            dials: 0,
        };
        let mut ready = Vec::with_capacity(EVENTS_PER_WAIT);
        loop {
            shell.epoll.wait(&mut ready, None).context("epoll wait")?;
            for event in ready.drain(..) {
                shell.handle_event(event);
            }
        }
    }
}

/// `relay-bench floor`: binds, says `floor listening on http://ADDR` on stderr (what the bench's
/// spawner waits for), and serves.
///
/// # Errors
/// When it cannot bind or epoll fails.
pub fn serve(opts: &Options) -> anyhow::Result<()> {
    let floor = Floor::bind(opts)?;
    eprintln!("floor listening on http://{}", floor.local_addr()?);
    floor.run()
}

struct Conn {
    stream: TcpStream,
    phase: Phase,
    /// The floor dialled it (a bot): the floor's frames are masked, the peer's are not.
    client: bool,
    /// The start of a frame whose end has not arrived.
    partial: Vec<u8>,
    /// A fragmented message so far, and its opcode (rare: the bench never fragments).
    message: Vec<u8>,
    fragmented: Option<u8>,
    /// Bytes the socket pushed back, sent when it has room.
    unsent: Vec<u8>,
    /// Closed by the floor: flush `unsent`, then drop; nothing more is read.
    closing: bool,
}

enum Phase {
    /// Server: the upgrade request so far.
    Request(Vec<u8>),
    /// Client: connecting; the request goes out when the socket is writable.
    Connecting {
        host: String,
        path: String,
        key: String,
    },
    /// Client: the 101 so far.
    Answer {
        head: Vec<u8>,
        key: String,
    },
    Open,
}

struct Shell {
    epoll: Epoll,
    listener: TcpListener,
    conns: Vec<Option<Conn>>,
    free: Vec<Token>,
    live: usize,
    router: Router,
    buf: Vec<u8>,
    scratch: Vec<u8>,
    dials: u64,
}

impl Shell {
    fn handle_event(&mut self, event: Event) {
        if event.token == LISTENER {
            return self.accept_all();
        }
        let token = usize::try_from(event.token).unwrap_or(usize::MAX);
        let Some(conn) = self.conns.get_mut(token).and_then(Option::as_mut) else { return };
        if let Phase::Connecting { .. } = conn.phase {
            if event.writable || event.readable {
                self.connected(token);
            }
            return;
        }
        if event.writable {
            let closing = conn.closing;
            match epoll::flush_unsent(&self.epoll, token as u64, &mut conn.stream, &mut conn.unsent) {
                Ok(()) if closing && conn.unsent.is_empty() => return self.drop_conn(token),
                Ok(()) => {}
                Err(_) => return self.gone(token),
            }
        }
        if event.readable {
            self.readable(token);
        }
    }

    fn accept_all(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.live >= MAX_CONNS || stream.set_nonblocking(true).is_err() {
                        continue; // Dropped: closed at once.
                    }
                    let _ = stream.set_nodelay(true);
                    self.insert(stream, Phase::Request(Vec::new()), false, Interest::Read);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                // WouldBlock: all taken. Anything else (out of descriptors): try on the next event.
                Err(_) => return,
            }
        }
    }

    fn insert(&mut self, stream: TcpStream, phase: Phase, client: bool, interest: Interest) -> Option<Token> {
        let token = self.free.pop().unwrap_or(self.conns.len());
        if self.epoll.add(stream.as_raw_fd(), token as u64, interest).is_err() {
            if token < self.conns.len() {
                self.free.push(token);
            }
            return None;
        }
        let conn = Conn {
            stream,
            phase,
            client,
            partial: Vec::new(),
            message: Vec::new(),
            fragmented: None,
            unsent: Vec::new(),
            closing: false,
        };
        if token == self.conns.len() {
            self.conns.push(Some(conn));
        } else {
            self.conns[token] = Some(conn);
        }
        self.live += 1;
        Some(token)
    }

    /// One `recv`, then whatever it completes.
    fn readable(&mut self, token: Token) {
        let mut buf = std::mem::take(&mut self.buf);
        let Some(conn) = self.conns[token].as_mut().filter(|c| !c.closing) else {
            self.buf = buf;
            return;
        };
        let n = match conn.stream.read(&mut buf) {
            Ok(0) => {
                self.buf = buf;
                return self.gone(token);
            }
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                self.buf = buf;
                return;
            }
            Err(_) => {
                self.buf = buf;
                return self.gone(token);
            }
        };
        match &mut conn.phase {
            Phase::Open if conn.partial.is_empty() => {
                let used = self.frames(token, &mut buf[..n]);
                if let Some(conn) = self.conns[token].as_mut().filter(|c| !c.closing) {
                    conn.partial.extend_from_slice(&buf[used..n]);
                }
            }
            Phase::Open => {
                let mut partial = std::mem::take(&mut conn.partial);
                partial.extend_from_slice(&buf[..n]);
                let used = self.frames(token, &mut partial);
                if let Some(conn) = self.conns[token].as_mut().filter(|c| !c.closing) {
                    partial.drain(..used);
                    conn.partial = partial;
                }
            }
            Phase::Request(head) => {
                head.extend_from_slice(&buf[..n]);
                let head = std::mem::take(head);
                self.request(token, head);
            }
            Phase::Answer { head, key } => {
                head.extend_from_slice(&buf[..n]);
                match frame::parse_answer(head, key, MAX_HEAD) {
                    Ok(None) => {}
                    Ok(Some(len)) => {
                        let mut rest = head.split_off(len);
                        conn.phase = Phase::Open;
                        self.router.handle_bot_open(token);
                        self.execute();
                        self.more_frames(token, &mut rest);
                    }
                    Err(_) => self.gone(token),
                }
            }
            Phase::Connecting { .. } => {}
        }
        self.buf = buf;
    }

    /// A complete (or growing) upgrade request.
    fn request(&mut self, token: Token, mut head: Vec<u8>) {
        let mut answer = std::mem::take(&mut self.scratch);
        answer.clear();
        let (open, rest) = match frame::parse_upgrade(&head, MAX_HEAD) {
            Ok(None) => {
                if let Some(conn) = self.conns[token].as_mut() {
                    conn.phase = Phase::Request(head);
                }
                self.scratch = answer;
                return;
            }
            Ok(Some(up)) if self.router.handle_upgrade(token, up.path) => {
                frame::write_switching(&mut answer, up.key);
                let len = up.head_len;
                (true, head.split_off(len))
            }
            Ok(Some(_)) => {
                frame::write_refusal(&mut answer, "404 Not Found");
                (false, Vec::new())
            }
            Err(frame::HeadError::TooLarge) => {
                frame::write_refusal(&mut answer, "431 Request Header Fields Too Large");
                (false, Vec::new())
            }
            Err(frame::HeadError::BadRequest) => {
                frame::write_refusal(&mut answer, "400 Bad Request");
                (false, Vec::new())
            }
        };
        if let Some(conn) = self.conns[token].as_mut() {
            conn.phase = Phase::Open;
        }
        self.send(token, &answer);
        self.scratch = answer;
        if open {
            head = rest;
            self.more_frames(token, &mut head);
        } else {
            self.close_conn(token);
        }
    }

    /// Frames that came with a head: handled, and what is left kept for the next read.
    fn more_frames(&mut self, token: Token, bytes: &mut [u8]) {
        if bytes.is_empty() {
            return;
        }
        let used = self.frames(token, bytes);
        if let Some(conn) = self.conns[token].as_mut().filter(|c| !c.closing) {
            conn.partial.extend_from_slice(&bytes[used..]);
        }
    }

    /// Handles every whole frame at the start of `data`; returns the bytes they took.
    fn frames(&mut self, token: Token, data: &mut [u8]) -> usize {
        let mut at = 0;
        loop {
            let Some(conn) = self.conns[token].as_mut().filter(|c| !c.closing) else { return at };
            let f = match frame::parse(&mut data[at..], !conn.client, MAX_MESSAGE) {
                Ok(Some(f)) => f,
                Ok(None) => return at,
                Err(e) => {
                    self.fail(token, e.close_code());
                    return at;
                }
            };
            let payload = at + f.payload.start..at + f.payload.end;
            at += f.len;
            match (f.opcode, conn.fragmented) {
                (frame::TEXT, None) if f.fin => {
                    self.router.handle_text(token, &data[payload]);
                    self.execute();
                }
                (frame::BINARY, None) if f.fin => {}
                (frame::TEXT | frame::BINARY, None) => {
                    conn.fragmented = Some(f.opcode);
                    conn.message.clear();
                    conn.message.extend_from_slice(&data[payload]);
                }
                (frame::CONTINUATION, Some(opcode)) => {
                    if conn.message.len() + payload.len() > MAX_MESSAGE {
                        self.fail(token, 1009);
                        return at;
                    }
                    conn.message.extend_from_slice(&data[payload]);
                    if f.fin {
                        conn.fragmented = None;
                        let message = std::mem::take(&mut conn.message);
                        if opcode == frame::TEXT {
                            self.router.handle_text(token, &message);
                            self.execute();
                        }
                    }
                }
                (frame::PING, _) => {
                    let mut pong = std::mem::take(&mut self.scratch);
                    pong.clear();
                    frame::write(&mut pong, frame::PONG, conn.client, &data[payload]);
                    self.send(token, &pong);
                    self.scratch = pong;
                }
                (frame::PONG, _) => {}
                (frame::CLOSE, _) => {
                    // Answer with the peer's code (or 1000), then it is gone.
                    let code =
                        data.get(payload.start..payload.start + 2).map_or(1000, |c| u16::from_be_bytes([c[0], c[1]]));
                    self.fail(token, code);
                    return at;
                }
                // A data frame inside a fragmented message, or a continuation of nothing.
                _ => {
                    self.fail(token, 1002);
                    return at;
                }
            }
        }
    }

    /// Closes `token` with a close frame of `code` (a protocol error's, or the peer's own echoed);
    /// its call hears it is gone.
    fn fail(&mut self, token: Token, code: u16) {
        if let Some(conn) = self.conns[token].as_ref() {
            let mut close = std::mem::take(&mut self.scratch);
            close.clear();
            frame::write_close(&mut close, conn.client, code, "");
            self.send(token, &close);
            self.scratch = close;
        }
        self.router.handle_closed(token);
        self.execute();
        self.close_conn(token);
    }

    /// Carries out what the router asked for.
    fn execute(&mut self) {
        while let Some(output) = self.router.poll_output() {
            match output {
                Output::Send { to, bytes } => {
                    let Some(conn) = self.conns.get_mut(to).and_then(Option::as_mut) else { continue };
                    let bytes = self.router.bytes(bytes);
                    if epoll::send_or_queue(&self.epoll, to as u64, &mut conn.stream, &mut conn.unsent, bytes).is_err()
                    {
                        self.router.handle_closed(to);
                        self.drop_conn(to);
                    }
                }
                Output::Close { to } => self.close_conn(to),
                Output::Dial { call, addr, host, path } => match epoll::connect(addr) {
                    Ok(stream) => {
                        self.dials += 1;
                        let key = dial_key(self.dials);
                        let phase = Phase::Connecting { host, path, key };
                        match self.insert(stream, phase, true, Interest::ReadWrite) {
                            Some(token) if self.router.handle_dialled(call, token) => {}
                            Some(token) => self.drop_conn(token),
                            None => self.router.handle_dial_failed(call),
                        }
                    }
                    Err(_) => self.router.handle_dial_failed(call),
                },
            }
        }
        self.router.clear();
    }

    /// A dialled bot's connect finished: send the upgrade request.
    fn connected(&mut self, token: Token) {
        let Some(conn) = self.conns[token].as_mut() else { return };
        if !matches!(conn.stream.take_error(), Ok(None)) {
            return self.gone(token);
        }
        let Phase::Connecting { host, path, key } = std::mem::replace(&mut conn.phase, Phase::Open) else { return };
        let _ = conn.stream.set_nodelay(true);
        let mut request = std::mem::take(&mut self.scratch);
        request.clear();
        frame::write_request(&mut request, &host, &path, &key);
        conn.phase = Phase::Answer { head: Vec::new(), key };
        let result = self.epoll.modify(conn.stream.as_raw_fd(), token as u64, Interest::Read).and_then(|()| {
            epoll::send_or_queue(&self.epoll, token as u64, &mut conn.stream, &mut conn.unsent, &request)
        });
        self.scratch = request;
        if result.is_err() {
            self.gone(token);
        }
    }

    /// Sends bytes the shell itself wrote (a 101, a pong, a close); a failure drops the connection
    /// at its next event.
    fn send(&mut self, token: Token, bytes: &[u8]) {
        if let Some(conn) = self.conns[token].as_mut() {
            let _ = epoll::send_or_queue(&self.epoll, token as u64, &mut conn.stream, &mut conn.unsent, bytes);
        }
    }

    /// The peer is gone (end of stream or an error): its call hears it, the socket closes.
    fn gone(&mut self, token: Token) {
        self.router.handle_closed(token);
        self.execute();
        self.drop_conn(token);
    }

    /// Closes `token` once what was queued for it is out.
    fn close_conn(&mut self, token: Token) {
        match self.conns.get_mut(token).and_then(Option::as_mut) {
            Some(conn) if conn.unsent.is_empty() => self.drop_conn(token),
            Some(conn) => conn.closing = true,
            None => {}
        }
    }

    /// Frees `token` (closing the socket takes it out of epoll).
    fn drop_conn(&mut self, token: Token) {
        if self.conns.get_mut(token).and_then(Option::take).is_some() {
            self.free.push(token);
            self.live -= 1;
        }
    }
}

/// A `Sec-WebSocket-Key`: a per-connection nonce (it guards caches, not secrets).
fn dial_key(n: u64) -> String {
    let mut nonce = [0u8; 16];
    nonce[..8].copy_from_slice(&n.to_le_bytes());
    nonce[8..12].copy_from_slice(&std::process::id().to_le_bytes());
    base64::engine::general_purpose::STANDARD.encode(nonce)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telephony::{self, Generator};
    use std::time::Duration;

    /// The bench's own callers, bot and frontends through the floor: every frame arrives once, in
    /// order, on every path (caller → bot, bot → caller, caller → frontend).
    #[test]
    fn serves_the_bench() {
        let floor = Floor::bind(&Options {
            listen: "127.0.0.1:0".parse().expect("addr"),
            agent_allow: vec!["127.0.0.1".parse().expect("ip")],
        })
        .expect("bind");
        let addr = floor.local_addr().expect("addr");
        // Serves until the test process exits.
        std::thread::spawn(move || floor.run());
        let opts = telephony::Options {
            calls: 3,
            seconds: 1,
            aligned: false,
            frontends: 2,
            late_after: Duration::from_secs(60),
            generator: Generator::Events,
            cpu: None,
            bot_ip: std::net::Ipv4Addr::LOCALHOST.into(),
            keyed_path: false,
        };
        let r = telephony::run(Some(addr), opts).expect("a run through the floor");
        assert_eq!(r.sent, 3 * 50);
        assert_eq!((r.received_by_bot, r.received_by_callers), (r.sent, r.sent));
        assert_eq!(r.received_by_frontends, r.sent * 2, "each of the two frontends hears every caller frame");
        assert_eq!((r.duplicates, r.reordered), (0, 0));
    }

    /// Garbage, an unknown path, a bad frame and an oversized frame each cost only their own
    /// connection; the floor still serves a call afterwards.
    #[test]
    fn bad_peers_cost_only_themselves() {
        use std::io::Write as _;
        let floor = Floor::bind(&Options { listen: "127.0.0.1:0".parse().expect("addr"), agent_allow: Vec::new() })
            .expect("bind");
        let addr = floor.local_addr().expect("addr");
        std::thread::spawn(move || floor.run());
        let answer = |bytes: &[u8]| -> Vec<u8> {
            let mut s = TcpStream::connect(addr).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
            s.write_all(bytes).expect("write");
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out); // Until the floor closes it.
            out
        };
        assert!(answer(b"\x00\x01garbage\r\n\r\n").starts_with(b"HTTP/1.1 400"));
        let upgrade = |path: &str| {
            let mut r = Vec::new();
            frame::write_request(&mut r, "x", path, "dGhlIHNhbXBsZSBub25jZQ==");
            r
        };
        assert!(answer(&upgrade("/elsewhere")).starts_with(b"HTTP/1.1 404"));
        let mut unmasked = upgrade("/twilio/stream");
        unmasked.extend_from_slice(&[0x81, 0x01, b'x']);
        let out = answer(&unmasked);
        assert!(out.starts_with(b"HTTP/1.1 101"));
        assert!(out.ends_with(&[0x88, 0x02, 0x03, 0xEA]), "closed 1002: {out:?}");
        let mut huge = upgrade("/twilio/stream");
        huge.extend_from_slice(&[0x81, 0xFF, 0, 0, 0, 0, 0x7F, 0, 0, 0, 0, 0, 0, 0]);
        assert!(answer(&huge).ends_with(&[0x88, 0x02, 0x03, 0xF1]), "closed 1009");
        let mut big_head = b"GET / HTTP/1.1\r\n".to_vec();
        big_head.resize(MAX_HEAD + 100, b'a');
        assert!(answer(&big_head).starts_with(b"HTTP/1.1 431"));
        // Still serving: a caller's upgrade is answered.
        let mut s = TcpStream::connect(addr).expect("connect");
        s.write_all(&upgrade("/twilio/stream")).expect("write");
        let mut head = [0u8; 12];
        s.read_exact(&mut head).expect("answer");
        assert_eq!(&head, b"HTTP/1.1 101");
    }
}
