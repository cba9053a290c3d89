//! WebSocket (RFC 6455) in sans-IO form: the upgrade handshake from a parsed head, and a frame codec
//! (tungstenite's `WebSocketContext`) fed bytes and drained of bytes.
//!
//! Invariant: no sockets and no clock; a hostile peer gets a close code, never a panic or unbounded
//! buffering.

use std::io::{self, Read, Write};

use base64::Engine as _;
use bytes::Bytes;
use http::header::{self, HeaderMap};
use http::{Method, StatusCode};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role, WebSocketConfig, WebSocketContext};
use tungstenite::Message;
/// The text type [`WsCodec`] takes and yields (tungstenite's, re-exported for its users).
pub use tungstenite::Utf8Bytes;

use crate::config::Limits;
use crate::proto::http::{header_tokens, RequestHead};

/// Why an upgrade request is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// Not a GET, or `Connection`/`Upgrade` do not ask for a WebSocket.
    #[error("not a WebSocket upgrade request")]
    NotUpgrade,
    /// `Sec-WebSocket-Version` is not 13 (answered 426 with the supported version).
    #[error("unsupported WebSocket version; this server speaks version 13")]
    Version,
    /// `Sec-WebSocket-Key` is missing or not 16 bytes of base64.
    #[error("missing or invalid Sec-WebSocket-Key")]
    Key,
}

impl HandshakeError {
    /// The HTTP status this refusal is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Version => StatusCode::UPGRADE_REQUIRED,
            Self::NotUpgrade | Self::Key => StatusCode::BAD_REQUEST,
        }
    }
}

/// Whether a head asks to switch to WebSocket (`Upgrade: websocket`), valid or not.
pub fn wants_upgrade(headers: &HeaderMap) -> bool {
    header_tokens(headers, &header::UPGRADE).any(|t| t.eq_ignore_ascii_case("websocket"))
}

/// Checks an upgrade request and returns the `Sec-WebSocket-Accept` value for its answer.
///
/// # Errors
/// [`HandshakeError`] naming what is wrong with the request.
pub fn accept_key(head: &RequestHead) -> Result<String, HandshakeError> {
    let connection_upgrade =
        header_tokens(&head.headers, &header::CONNECTION).any(|t| t.eq_ignore_ascii_case("upgrade"));
    let http11 = head.version == http::Version::HTTP_11;
    if head.method != Method::GET || !http11 || !connection_upgrade || !wants_upgrade(&head.headers) {
        return Err(HandshakeError::NotUpgrade);
    }
    if head.headers.get(header::SEC_WEBSOCKET_VERSION).map(|v| v.as_bytes()) != Some(b"13") {
        return Err(HandshakeError::Version);
    }
    let key = head.headers.get(header::SEC_WEBSOCKET_KEY).ok_or(HandshakeError::Key)?;
    match base64::engine::general_purpose::STANDARD.decode(key.as_bytes()) {
        Ok(raw) if raw.len() == 16 => Ok(tungstenite::handshake::derive_accept_key(key.as_bytes())),
        _ => Err(HandshakeError::Key),
    }
}

/// Writes the `101 Switching Protocols` answer for `accept` into `out`, naming `node` (when not
/// empty) in `x-relay-node`.
pub fn write_switching_protocols(out: &mut Vec<u8>, accept: &str, node: &str) {
    out.extend_from_slice(
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: ",
    );
    out.extend_from_slice(accept.as_bytes());
    out.extend_from_slice(b"\r\n");
    super::http::write_node(out, node);
    out.extend_from_slice(b"\r\n");
}

/// Largest 101 answer head a client accepts, bytes.
pub const MAX_ANSWER_HEAD_BYTES: usize = 8 * 1024;

/// Why a server's answer to a client upgrade was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnswerError {
    /// The server answered another status (it refused the upgrade).
    #[error("the server answered {0} instead of switching protocols")]
    Status(u16),
    /// `Sec-WebSocket-Accept` is missing or does not match the key sent.
    #[error("the server's Sec-WebSocket-Accept does not match")]
    Accept,
    /// The answer head is over [`MAX_ANSWER_HEAD_BYTES`].
    #[error("the server's handshake answer is too large")]
    TooLarge,
    /// Not an HTTP/1.1 response.
    #[error("the server's handshake answer is malformed")]
    Malformed,
}

/// Checks the server's answer to a client upgrade sent with `key`, from the bytes read so far:
/// the answer head's length once it is a complete, matching 101; `Ok(None)` while incomplete.
///
/// # Errors
/// [`AnswerError`] when the answer refuses the upgrade or cannot be one.
pub fn check_answer(buf: &[u8], key: &str) -> Result<Option<usize>, AnswerError> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    match response.parse(buf) {
        Ok(httparse::Status::Complete(head_len)) => {
            if response.code != Some(101) {
                return Err(AnswerError::Status(response.code.unwrap_or(0)));
            }
            let expected = tungstenite::handshake::derive_accept_key(key.as_bytes());
            let accepted = response
                .headers
                .iter()
                .any(|h| h.name.eq_ignore_ascii_case("sec-websocket-accept") && h.value == expected.as_bytes());
            if accepted {
                Ok(Some(head_len))
            } else {
                Err(AnswerError::Accept)
            }
        }
        Ok(httparse::Status::Partial) if buf.len() < MAX_ANSWER_HEAD_BYTES => Ok(None),
        Ok(httparse::Status::Partial) => Err(AnswerError::TooLarge),
        Err(_) => Err(AnswerError::Malformed),
    }
}

/// A message read from a peer, with control frames already answered by the codec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// A text message (valid UTF-8).
    Text(Utf8Bytes),
    /// A binary message.
    Binary(Bytes),
    /// The peer closed; the codec has queued the answering close frame.
    Close,
}

/// Why the codec stopped: the close code already queued toward the peer says the same.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WsError {
    /// A frame or message broke `ws_max_frame_bytes` / `ws_max_message_bytes` (closed with 1009).
    #[error("message too big")]
    TooBig,
    /// The peer broke the protocol (closed with 1002), e.g. an unmasked or reserved-bit frame.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A text message was not UTF-8 (closed with 1007).
    #[error("invalid UTF-8 in a text message")]
    Utf8,
    /// The connection is already closed; nothing more can be read or sent.
    #[error("connection closed")]
    Closed,
    /// More than `ws_max_write_buffer_bytes` are waiting for the peer to read.
    #[error("peer is not reading")]
    WriteBufferFull,
}

/// A server-side WebSocket connection without I/O: feed received bytes with [`Self::handle_bytes`],
/// read messages with [`Self::poll_incoming`], queue messages, then drain [`Self::poll_transmit`].
pub struct WsCodec {
    ctx: WebSocketContext,
    io: MemIo,
    max_write_buffer: usize,
}

impl WsCodec {
    /// A codec for a socket that just switched protocols; `read_ahead` holds frames the client sent
    /// right behind its upgrade request.
    pub fn new_server(limits: &Limits, read_ahead: &[u8]) -> Self {
        Self::new(Role::Server, limits, read_ahead)
    }

    /// A codec for a connection the relay dialled (frames it sends are masked); `read_ahead` holds
    /// frames the server sent right behind its 101 answer.
    pub fn new_client(limits: &Limits, read_ahead: &[u8]) -> Self {
        Self::new(Role::Client, limits, read_ahead)
    }

    fn new(role: Role, limits: &Limits, read_ahead: &[u8]) -> Self {
        let config = WebSocketConfig::default()
            .read_buffer_size(limits.ws_read_buffer_bytes)
            .write_buffer_size(0)
            .max_write_buffer_size(limits.ws_max_write_buffer_bytes)
            .max_frame_size(Some(limits.ws_max_frame_bytes))
            .max_message_size(Some(limits.ws_max_message_bytes));
        let mut io = MemIo::default();
        io.input.extend_from_slice(read_ahead);
        Self { ctx: WebSocketContext::new(role, Some(config)), io, max_write_buffer: limits.ws_max_write_buffer_bytes }
    }

    /// Adds bytes received from the peer.
    pub fn handle_bytes(&mut self, data: &[u8]) {
        self.io.compact();
        self.io.input.extend_from_slice(data);
    }

    /// The next whole message, `Ok(None)` when more bytes are needed.
    ///
    /// Pings are answered and pongs absorbed inside. On an error the matching close frame is queued;
    /// send what [`Self::poll_transmit`] returns, then close the socket.
    ///
    /// # Errors
    /// [`WsError`] when the peer broke a limit or the protocol, or the connection is closed.
    pub fn poll_incoming(&mut self) -> Result<Option<Incoming>, WsError> {
        loop {
            match self.ctx.read(&mut self.io) {
                Ok(Message::Text(t)) => return Ok(Some(Incoming::Text(t))),
                Ok(Message::Binary(b)) => return Ok(Some(Incoming::Binary(b))),
                Ok(Message::Ping(_)) if self.io.output.len() > self.max_write_buffer => {
                    // Each ping's pong is queued in memory: a peer that sends pings but does not
                    // read the pongs would grow the queue without bound.
                    return Err(WsError::WriteBufferFull);
                }
                Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => continue,
                Ok(Message::Close(_)) => return Ok(Some(Incoming::Close)),
                Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) => return Err(self.fail(e)),
            }
        }
    }

    /// Queues a text message whose bytes are already valid UTF-8 (JSON from the relay).
    ///
    /// # Errors
    /// [`WsError::Closed`] after a close, [`WsError::WriteBufferFull`] when the peer stopped reading.
    pub fn send_text(&mut self, text: Utf8Bytes) -> Result<(), WsError> {
        self.send(Message::Text(text))
    }

    /// Queues a ping (the peer's pong proves it is alive; pongs are absorbed by [`Self::poll_incoming`]).
    pub fn send_ping(&mut self) {
        let _ = self.send(Message::Ping(Bytes::new()));
    }

    /// Queues a close frame with `code` and `reason` (a no-op if a close was already sent).
    pub fn close(&mut self, code: u16, reason: &str) {
        let frame = CloseFrame { code: CloseCode::from(code), reason: reason.into() };
        let _ = self.ctx.close(&mut self.io, Some(frame));
    }

    /// Bytes to send to the peer, if any (the caller writes them all before calling again).
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        // Flushing into memory cannot block; an error here only means the socket is closed, and
        // whatever was queued before is still in `output` to send.
        let _ = self.ctx.flush(&mut self.io);
        if self.io.output.is_empty() {
            None
        } else {
            Some(std::mem::take(&mut self.io.output))
        }
    }

    /// Moves frames the codec queued on its own (pongs, close answers) to the output; true when
    /// there are bytes to send.
    pub fn has_output(&mut self) -> bool {
        let _ = self.ctx.flush(&mut self.io);
        !self.io.output.is_empty()
    }

    /// Whether more messages may still be sent (no close frame sent or received).
    pub fn can_send(&self) -> bool {
        self.ctx.can_write()
    }

    fn send(&mut self, msg: Message) -> Result<(), WsError> {
        if self.io.output.len() > self.max_write_buffer {
            return Err(WsError::WriteBufferFull);
        }
        match self.ctx.write(&mut self.io, msg) {
            Ok(()) => Ok(()),
            Err(tungstenite::Error::WriteBufferFull(_)) => Err(WsError::WriteBufferFull),
            Err(_) => Err(WsError::Closed),
        }
    }

    fn fail(&mut self, e: tungstenite::Error) -> WsError {
        let (code, err) = match e {
            tungstenite::Error::Capacity(_) => (1009, WsError::TooBig),
            tungstenite::Error::Utf8(_) => (1007, WsError::Utf8),
            tungstenite::Error::Protocol(p) => (1002, WsError::Protocol(p.to_string())),
            tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => return WsError::Closed,
            other => (1011, WsError::Protocol(other.to_string())),
        };
        self.close(code, "");
        err
    }
}

/// Input a socket's codec keeps between reads once all of it was taken; more is freed.
const IDLE_INPUT_BYTES: usize = 2 * 1024;

/// The codec's "socket": reads drain `input`, writes append to `output`.
#[derive(Default)]
struct MemIo {
    input: Vec<u8>,
    pos: usize,
    output: Vec<u8>,
}

impl MemIo {
    fn compact(&mut self) {
        if self.pos > 0 {
            self.input.drain(..self.pos);
            self.pos = 0;
        }
    }
}

impl Read for MemIo {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let available = &self.input[self.pos..];
        if available.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = available.len().min(buf.len());
        buf[..n].copy_from_slice(&available[..n]);
        self.pos += n;
        if self.pos == self.input.len() {
            // All taken: a buffer a burst made large is given back rather than kept per socket.
            self.input.clear();
            super::release_if_large(&mut self.input, IDLE_INPUT_BYTES);
            self.pos = 0;
        }
        Ok(n)
    }
}

impl Write for MemIo {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::http::{parse_head, Parse};

    fn head(raw: &str) -> RequestHead {
        match parse_head(raw.as_bytes(), &Limits::default()).expect("valid head") {
            Parse::Complete { head, .. } => head,
            Parse::Incomplete => panic!("incomplete"),
        }
    }

    /// A client frame: masked with a fixed key, FIN set, `opcode`, short payload.
    fn client_frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mask = [1u8, 2, 3, 4];
        let mut f = vec![(if fin { 0x80 } else { 0 }) | opcode];
        if payload.len() < 126 {
            f.push(0x80 | payload.len() as u8);
        } else {
            f.push(0x80 | 126);
            f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        }
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        f
    }

    /// RFC 6455's sample key gives its sample accept value.
    #[test]
    fn handshake_rfc_sample() {
        let h = head("GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n");
        assert_eq!(accept_key(&h).expect("valid"), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    /// Wrong version gets 426, a bad key or a missing Connection token gets 400.
    #[test]
    fn handshake_refusals() {
        let base = "GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n";
        let e = accept_key(&head(&format!(
            "{base}Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n"
        )))
        .unwrap_err();
        assert_eq!(e.status(), StatusCode::UPGRADE_REQUIRED);
        let e = accept_key(&head(&format!("{base}Sec-WebSocket-Key: c2hvcnQ=\r\nSec-WebSocket-Version: 13\r\n\r\n")))
            .unwrap_err();
        assert_eq!(e, HandshakeError::Key);
        let e = accept_key(&head("GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")).unwrap_err();
        assert_eq!(e, HandshakeError::NotUpgrade);
    }

    /// Fragmented text reassembles; a ping in between is answered with a pong.
    #[test]
    fn fragments_and_ping() {
        let mut c = WsCodec::new_server(&Limits::default(), &client_frame(0x1, false, b"hel"));
        c.handle_bytes(&client_frame(0x9, true, b"p"));
        c.handle_bytes(&client_frame(0x0, true, b"lo"));
        assert_eq!(c.poll_incoming().expect("ok"), Some(Incoming::Text("hello".into())));
        assert_eq!(c.poll_incoming().expect("ok"), None);
        let out = c.poll_transmit().expect("pong queued");
        assert_eq!(out, vec![0x8a, 0x01, b'p']);
    }

    /// A peer that floods pings and reads none of the pongs is cut off once the pongs waiting
    /// for it pass the write buffer limit: memory stays bounded.
    #[test]
    fn unread_pongs_are_bounded() {
        let limits = Limits { ws_max_write_buffer_bytes: 4096, ..Limits::default() };
        let mut c = WsCodec::new_server(&limits, &[]);
        let ping = client_frame(0x9, true, &[b'p'; 100]);
        let mut result = Ok(None);
        for _ in 0..1000 {
            c.handle_bytes(&ping);
            result = c.poll_incoming();
            if result.is_err() {
                break;
            }
        }
        assert!(matches!(result, Err(WsError::WriteBufferFull)), "{result:?}");
        assert!(c.io.output.len() <= 4096 + 2 * 102, "pongs held: {}", c.io.output.len());
    }

    /// Bytes split at every boundary still give the one message.
    #[test]
    fn byte_at_a_time() {
        let frame = client_frame(0x2, true, &[7u8; 200]);
        let mut c = WsCodec::new_server(&Limits::default(), &[]);
        for (i, b) in frame.iter().enumerate() {
            c.handle_bytes(&[*b]);
            let m = c.poll_incoming().expect("ok");
            assert_eq!(m.is_some(), i == frame.len() - 1);
        }
    }

    /// A burst of frames received at once is all delivered, and the large input buffer it needed
    /// is given back once taken, so an idle socket does not keep it.
    #[test]
    fn burst_buffer_is_released() {
        let frame = client_frame(0x1, true, &[b'a'; 300]);
        let burst: Vec<u8> = frame.iter().copied().cycle().take(frame.len() * 100).collect();
        let mut c = WsCodec::new_server(&Limits::default(), &[]);
        c.handle_bytes(&burst);
        assert!(c.io.input.capacity() >= burst.len());
        let mut got = 0;
        while let Some(m) = c.poll_incoming().expect("ok") {
            assert_eq!(m, Incoming::Text("a".repeat(300).into()));
            got += 1;
        }
        assert_eq!(got, 100);
        assert!(c.io.input.capacity() <= IDLE_INPUT_BYTES, "kept {} bytes", c.io.input.capacity());
    }

    /// Oversized frames close with 1009, unmasked frames with 1002, bad UTF-8 with 1007.
    #[test]
    fn violations_close_with_codes() {
        let limits = Limits { ws_max_frame_bytes: 100, ws_max_message_bytes: 150, ..Limits::default() };
        let mut c = WsCodec::new_server(&limits, &client_frame(0x2, true, &[0u8; 120]));
        assert_eq!(c.poll_incoming(), Err(WsError::TooBig));
        let out = c.poll_transmit().expect("close queued");
        assert_eq!(&out[..4], &[0x88, 0x02, 0x03, 0xf1]);

        let mut c = WsCodec::new_server(&limits, &client_frame(0x1, false, &[b'a'; 90]));
        c.handle_bytes(&client_frame(0x0, true, &[b'a'; 90]));
        assert_eq!(c.poll_incoming(), Err(WsError::TooBig));

        let mut c = WsCodec::new_server(&limits, &[0x81, 0x01, b'a']);
        assert!(matches!(c.poll_incoming(), Err(WsError::Protocol(_))));
        assert_eq!(&c.poll_transmit().expect("close queued")[2..4], &1002u16.to_be_bytes());

        let mut c = WsCodec::new_server(&limits, &client_frame(0x1, true, &[0xff, 0xfe]));
        assert_eq!(c.poll_incoming(), Err(WsError::Utf8));
        assert_eq!(&c.poll_transmit().expect("close queued")[2..4], &1007u16.to_be_bytes());
    }

    /// A client close is answered with the same code and reported once; sending after it fails.
    #[test]
    fn close_handshake() {
        let mut c = WsCodec::new_server(&Limits::default(), &client_frame(0x8, true, &1000u16.to_be_bytes()));
        assert_eq!(c.poll_incoming().expect("ok"), Some(Incoming::Close));
        assert_eq!(c.poll_transmit().expect("close reply"), vec![0x88, 0x02, 0x03, 0xe8]);
        assert!(!c.can_send());
        assert_eq!(c.send_text("x".into()), Err(WsError::Closed));
    }

    /// A client reads the server's answer: a matching 101 opens, a partial head waits, a refusal or
    /// a wrong accept value fails.
    #[test]
    fn client_checks_the_answer() {
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let ok = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\nrest";
        assert_eq!(check_answer(ok, key), Ok(Some(ok.len() - 4)));
        assert_eq!(check_answer(&ok[..40], key), Ok(None));
        assert_eq!(check_answer(b"HTTP/1.1 403 Forbidden\r\n\r\n", key), Err(AnswerError::Status(403)));
        assert_eq!(check_answer(ok, "c2hvcnQ="), Err(AnswerError::Accept));
        assert_eq!(check_answer(b"\x00\x01 nonsense\r\n\r\n", key), Err(AnswerError::Malformed));
    }

    /// Server frames are unmasked text frames with the payload as given.
    #[test]
    fn sends_text() {
        let mut c = WsCodec::new_server(&Limits::default(), &[]);
        c.send_text(r#"{"type":"pong"}"#.into()).expect("open");
        let out = c.poll_transmit().expect("frame");
        assert_eq!(out[0], 0x81);
        assert_eq!(out[1] as usize, 15);
        assert_eq!(&out[2..], br#"{"type":"pong"}"#);
    }
}
