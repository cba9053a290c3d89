//! WebSockets on the session's owner core (event and frontend listeners, caller streams, agent
//! legs): a reader that feeds frames to the core and a writer that drains the socket's bounded
//! outbox.
//!
//! Invariant: runs only on the owner core; every socket ends: a peer that stops reading, stops
//! answering pings, or ignores our close frame is dropped within a bounded time, never slowing the
//! core.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::time::{Duration, Instant};

use event_listener::Event;
use futures_lite::{AsyncRead, AsyncWrite, AsyncWriteExt};
use http::StatusCode;
use tungstenite::Utf8Bytes;

use bytes::Bytes;

use super::core_task::CoreShared;
use super::{tcp, ControlService, SocketKind, Upgrade};
use crate::core::{AttachError, ListenKind};
use crate::id::{ConnectionId, SessionId};
use crate::proto::ws::{write_switching_protocols, Incoming, WsCodec};

/// How long a closing socket waits for the peer's close frame before the TCP connection is dropped.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// The queue between the core and one socket's writer, and the socket's liveness bookkeeping.
///
/// Deadlines (idle peer, unanswered close, stalled write) are enforced by the core's periodic
/// [`Outbox::sweep`], which shuts the socket down; nothing arms a timer per frame.
pub(crate) struct Outbox {
    frames: RefCell<VecDeque<Utf8Bytes>>,
    close: Cell<Option<(u16, &'static str)>>,
    /// When the close began: the peer has until then plus [`CLOSE_WAIT`] to answer it.
    closing_since: Cell<Option<Instant>>,
    /// Wakes the writer when a frame, a close or a ping request arrives.
    event: Event,
    /// Frames that could not be queued or encoded for this socket.
    dropped: Cell<u64>,
    /// The socket, for the sweep to shut down; -1 until `run` starts.
    fd: Cell<RawFd>,
    /// Coarse time (the core's tick clock) of the last bytes from the peer.
    last_rx: Cell<Instant>,
    /// Coarse time of the last bytes written to the peer.
    last_tx: Cell<Instant>,
    /// When the write now in progress began, if one is.
    writing_since: Cell<Option<Instant>>,
    /// The sweep asks the writer for a ping.
    ping_due: Cell<bool>,
    /// Coarse time of the last ping the sweep asked for.
    last_ping: Cell<Instant>,
    /// The sweep shut the socket down; nothing more to do for it.
    killed: Cell<bool>,
    /// The peer ended the connection with a close frame (not a drop).
    peer_closed: Cell<bool>,
    /// A media leg (caller or agent): on overflow only media frames are dropped, never the
    /// protocol's control messages (`start`, marks, `clear`, `stop`).
    media_leg: Cell<bool>,
}

impl Outbox {
    /// Frames waiting for this socket's writer.
    pub(crate) fn queued(&self) -> usize {
        self.frames.borrow().len()
    }

    pub(crate) fn new(now: Instant) -> Self {
        Self {
            frames: RefCell::new(VecDeque::new()),
            close: Cell::new(None),
            closing_since: Cell::new(None),
            event: Event::new(),
            dropped: Cell::new(0),
            fd: Cell::new(-1),
            last_rx: Cell::new(now),
            last_tx: Cell::new(now),
            writing_since: Cell::new(None),
            ping_due: Cell::new(false),
            last_ping: Cell::new(now),
            killed: Cell::new(false),
            peer_closed: Cell::new(false),
            media_leg: Cell::new(false),
        }
    }

    /// Marks this socket as a media leg (see `media_leg`).
    pub(crate) fn set_media_leg(&self) {
        self.media_leg.set(true);
    }

    /// Queues a frame. When `limit` frames are already waiting (the peer is not keeping up), the
    /// oldest is dropped to make room, so a slow listener hears the newest audio and loses only its
    /// own frames. Returns false when a frame was dropped (or the socket is closing).
    pub(crate) fn push(&self, text: Utf8Bytes, limit: usize) -> bool {
        if self.close.get().is_some() {
            return false;
        }
        let mut frames = self.frames.borrow_mut();
        let mut dropped = false;
        if frames.len() >= limit {
            if self.media_leg.get() {
                // Drop the oldest media frame; control messages must arrive, up to a hard cap of
                // twice the limit, past which the peer is plainly not reading: close the leg.
                match frames.iter().position(is_media) {
                    Some(i) => {
                        frames.remove(i);
                        dropped = true;
                    }
                    None if is_media(&text) => return false,
                    None if frames.len() >= 2 * limit.max(1) => {
                        drop(frames);
                        self.close(1008, "peer is not reading");
                        return false;
                    }
                    None => {}
                }
            } else if frames.pop_front().is_some() {
                dropped = true;
            } else {
                return false; // A zero limit: nothing can be queued.
            }
        }
        frames.push_back(text);
        drop(frames);
        self.event.notify(1);
        !dropped
    }

    /// Asks the writer to send a close frame after what is queued, then end the connection.
    pub(crate) fn close(&self, code: u16, reason: &'static str) {
        if self.close.get().is_none() {
            self.close.set(Some((code, reason)));
        }
        self.event.notify(1);
    }

    /// Enforces this socket's deadlines at (coarse) time `now`: a peer silent past `idle` is
    /// closed with 1001; a close unanswered for [`CLOSE_WAIT`] or a write stalled past
    /// `write_timeout` shuts the socket down (its reader and writer then end); a socket quiet for
    /// `ping` gets a ping.
    pub(crate) fn sweep(&self, now: Instant, idle: Duration, ping: Duration, write_timeout: Duration) {
        if self.killed.get() {
            return;
        }
        let closed_out = self.closing_since.get().is_some_and(|t| now.saturating_duration_since(t) > CLOSE_WAIT);
        let stalled = self.writing_since.get().is_some_and(|t| now.saturating_duration_since(t) > write_timeout);
        if closed_out || stalled {
            self.killed.set(true);
            let fd = self.fd.get();
            if fd >= 0 {
                // SAFETY: `fd` belongs to the live socket this outbox serves (set by `run`, which
                // removes the outbox before the socket is dropped); shutdown only changes its state.
                unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
            }
            return;
        }
        if self.close.get().is_none() && now.saturating_duration_since(self.last_rx.get()) > idle {
            self.close(1001, "idle timeout");
            return;
        }
        // Ping when the *peer* has been quiet (its pong is what proves it alive), at most once per
        // interval; a socket we stream to constantly is pinged all the same.
        if now.saturating_duration_since(self.last_rx.get()) >= ping
            && now.saturating_duration_since(self.last_ping.get()) >= ping
        {
            self.last_ping.set(now);
            self.ping_due.set(true);
            self.event.notify(1);
        }
    }
}

/// The close reason for a binary frame on a socket whose protocol carries text only.
pub(crate) const BINARY_REFUSED: &str = "this socket carries text frames only";

/// Which core input a socket's text frames feed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Feed {
    /// An event or frontend listener.
    Listener,
    /// A caller's Twilio Media Stream.
    Caller,
    /// An agent leg the relay dialled.
    Agent,
    /// Retell's custom-LLM socket.
    Llm,
}

/// Completes a WebSocket on the session's owner core: attach (listeners) or open (callers), answer
/// 101 unless the accepting core already did, then serve until the socket ends.
pub(crate) async fn socket_task<S: ControlService>(
    shared: Rc<CoreShared>,
    service: Rc<S>,
    mut stream: super::tls::Stream,
    read_ahead: Vec<u8>,
    session: SessionId,
    upgrade: Upgrade,
    upgraded: bool,
) {
    let conn = shared.next_connection();
    let now = shared.now();
    let Upgrade { kind, credential, accept, guard, .. } = upgrade;
    // Registered before any input about `conn`, so nothing the core sends it can be lost.
    let outbox = Rc::new(Outbox::new(shared.coarse_now()));
    let fd = stream.raw_fd();
    shared.register_outbox(conn, outbox.clone());
    let (greeting, feed) = match kind {
        SocketKind::Events | SocketKind::Frontend => {
            let listen = if kind == SocketKind::Events { ListenKind::Events } else { ListenKind::Frontend };
            let attached = shared
                .drive(Some(&session), |state| state.handle_attach(now, &session, conn, listen, credential))
                .unwrap_or(Err(AttachError::ShuttingDown));
            match attached {
                Ok(greeting) => (greeting, Feed::Listener),
                Err(e) => {
                    shared.remove_outbox(conn);
                    let status = match e {
                        AttachError::Unauthorized => StatusCode::UNAUTHORIZED,
                        AttachError::TooManyObservers { .. } => StatusCode::TOO_MANY_REQUESTS,
                        AttachError::TooManyPending | AttachError::ShuttingDown | AttachError::Draining => {
                            StatusCode::SERVICE_UNAVAILABLE
                        }
                    };
                    let mut resp = service.error_response(status, &e.to_string(), &http::HeaderMap::new());
                    if e == AttachError::Draining {
                        // Another node takes the call; a balancer retries there soon.
                        resp.headers_mut()
                            .insert(http::header::RETRY_AFTER, crate::core::command::DRAIN_RETRY_AFTER_SECS.into());
                    }
                    tcp::respond_and_close(&mut stream, &mut Vec::new(), &resp, false, &shared.node_id).await;
                    return;
                }
            }
        }
        SocketKind::Caller => {
            outbox.set_media_leg();
            shared.drive(Some(&session), |state| state.handle_caller_open(&session, conn));
            (None, Feed::Caller)
        }
        SocketKind::Llm => {
            // Queued now, written after the 101: the relay's config and begin sentence.
            shared.drive(Some(&session), |state| state.handle_llm_open(now, &session, conn));
            (None, Feed::Llm)
        }
    };
    let mut head = Vec::with_capacity(160);
    if !upgraded {
        write_switching_protocols(&mut head, &accept, &shared.node_id);
    }
    let codec = WsCodec::new_server(&shared.limits, &read_ahead);
    // The codec copied it; freed now rather than kept for the socket's whole life.
    drop(read_ahead);
    run(&shared, conn, outbox, fd, stream, codec, head, greeting, feed).await;
    drop(guard);
}

/// Serves an open WebSocket (server or client side) until it ends, then detaches it from the core.
///
/// `outbox` must already be registered for `conn` (before the core could send to it).
#[allow(clippy::too_many_arguments)] // One socket's parts; a struct would only be unpacked here.
pub(crate) async fn run<T: AsyncRead + AsyncWrite + Unpin>(
    shared: &Rc<CoreShared>,
    conn: ConnectionId,
    outbox: Rc<Outbox>,
    fd: RawFd,
    stream: T,
    codec: WsCodec,
    mut head: Vec<u8>,
    greeting: Option<Utf8Bytes>,
    feed: Feed,
) {
    outbox.fd.set(fd);
    let codec = RefCell::new(codec);
    // The greeting goes first: it was produced before any event could be queued.
    if let Some(greeting) = greeting {
        let _ = codec.borrow_mut().send_text(greeting);
    }
    if let Some(frame) = codec.borrow_mut().poll_transmit() {
        head.extend_from_slice(&frame);
    }
    let (reader, writer) = futures_lite::io::split(stream);
    let write = writer_task(shared, &outbox, &codec, writer, head);
    let read = reader_task(shared, conn, &outbox, &codec, reader, feed);
    futures_lite::future::zip(write, read).await;
    shared.remove_outbox(conn);
    let refused = outbox.dropped.get();
    let blame = shared.session_of(conn);
    let now = shared.now();
    let peer_closed = outbox.peer_closed.get();
    shared.drive(blame.as_ref(), |state| {
        if refused > 0 {
            // Counted by leg while the socket is still attached.
            state.handle_send_dropped(conn, refused);
        }
        state.handle_detach(now, conn, peer_closed);
    });
}

/// Feeds peer frames to the codec and the core until the peer closes, breaks the protocol, or the
/// sweep shuts the socket down (idle peer, unanswered close).
async fn reader_task<T: AsyncRead + AsyncWrite + Unpin>(
    shared: &CoreShared,
    conn: ConnectionId,
    outbox: &Outbox,
    codec: &RefCell<WsCodec>,
    mut reader: futures_lite::io::ReadHalf<T>,
    feed: Feed,
) {
    loop {
        // Frames already buffered (read-ahead, or several in one read) are handled first.
        loop {
            let incoming = codec.borrow_mut().poll_incoming();
            match incoming {
                // After our close frame only the peer's close answer matters.
                Ok(Some(Incoming::Text(_))) if outbox.close.get().is_some() => {}
                Ok(Some(Incoming::Text(text))) => {
                    let now = shared.now();
                    let blame = shared.session_of(conn);
                    shared.drive(blame.as_ref(), |state| match feed {
                        Feed::Listener => state.handle_listener_text(now, conn, &text),
                        Feed::Caller => state.handle_caller_frame(now, conn, &Bytes::from(text)),
                        Feed::Agent => state.handle_agent_frame(now, conn, &Bytes::from(text)),
                        Feed::Llm => state.handle_llm_text(now, conn, &text),
                    });
                }
                // Agents' protocols are text too; a stray binary frame from a bot is ignored rather
                // than cost the call its agent.
                Ok(Some(Incoming::Binary(_))) if feed == Feed::Agent => {}
                // The sockets the relay serves carry text only: a binary frame is data the protocol
                // cannot carry (RFC 6455 §7.4.1: 1003), and costs only the socket that sent it.
                Ok(Some(Incoming::Binary(_))) => {
                    outbox.close(1003, BINARY_REFUSED);
                }
                Ok(Some(Incoming::Close)) => {
                    // A close the peer started (not its answer to ours); the codec queued the
                    // answering close frame, which the writer sends before it ends.
                    outbox.peer_closed.set(outbox.close.get().is_none());
                    outbox.close(1000, "");
                    return;
                }
                Err(_) => {
                    outbox.close(1000, "");
                    return;
                }
                Ok(None) => break,
            }
        }
        if codec.borrow_mut().has_output() {
            outbox.event.notify(1); // Pongs the codec queued.
        }
        // Received into the core's shared buffer within one poll and handed to the codec at once,
        // so no socket keeps a receive buffer of its own while it waits.
        let received = std::future::poll_fn(|cx| {
            let mut scratch = shared.read_scratch.borrow_mut();
            let polled = std::pin::Pin::new(&mut reader).poll_read(cx, &mut scratch);
            if let std::task::Poll::Ready(Ok(n)) = polled {
                codec.borrow_mut().handle_bytes(&scratch[..n]);
            }
            polled
        })
        .await;
        match received {
            Ok(n) if n > 0 => {
                outbox.last_rx.set(shared.coarse_now());
            }
            _ => {
                outbox.close(1000, "");
                return;
            }
        }
        glommio::yield_if_needed().await;
    }
}

/// Writes the 101 answer, then queued frames as they come (and pings the sweep asks for), then the
/// close frame.
async fn writer_task<T: AsyncRead + AsyncWrite + Unpin>(
    shared: &CoreShared,
    outbox: &Outbox,
    codec: &RefCell<WsCodec>,
    mut writer: futures_lite::io::WriteHalf<T>,
    mut pending: Vec<u8>,
) {
    loop {
        let listener = outbox.event.listen();
        let closing = {
            let mut codec = codec.borrow_mut();
            let mut frames = outbox.frames.borrow_mut();
            for text in frames.drain(..) {
                if codec.send_text(text).is_err() {
                    outbox.dropped.set(outbox.dropped.get() + 1);
                }
            }
            drop(frames);
            if outbox.ping_due.take() {
                codec.send_ping();
            }
            let close = outbox.close.get();
            if let Some((code, reason)) = close {
                codec.close(code, reason);
            }
            if let Some(bytes) = codec.poll_transmit() {
                pending.extend_from_slice(&bytes);
            }
            close.is_some() || !codec.can_send()
        };
        if !pending.is_empty() {
            outbox.writing_since.set(Some(shared.coarse_now()));
            // The flush matters for TLS, whose records may wait in its buffer; for TCP it is free.
            let written = async {
                writer.write_all(&pending).await?;
                writer.flush().await
            }
            .await;
            outbox.writing_since.set(None);
            outbox.last_tx.set(shared.coarse_now());
            pending.clear();
            if written.is_err() {
                // The peer is gone, or the sweep shut a stalled socket down: end the connection.
                outbox.close(1000, "");
                return;
            }
        }
        if closing {
            // The peer's time to answer starts now that our close frame reached the socket.
            outbox.closing_since.set(Some(shared.coarse_now()));
            let _ = writer.close().await;
            return;
        }
        let idle = outbox.frames.borrow().is_empty() && outbox.close.get().is_none() && !outbox.ping_due.get();
        if idle {
            listener.await;
        }
    }
}

/// Whether a queued frame is a Twilio `media` message (the writers put `event` first).
fn is_media(text: &Utf8Bytes) -> bool {
    text.as_bytes().starts_with(br#"{"event":"media""#)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A full outbox drops its oldest frame for each new one and says so; a closing one takes none.
    #[test]
    fn full_outbox_drops_oldest() {
        #[allow(clippy::disallowed_methods)] // A test's clock origin.
        let outbox = Outbox::new(Instant::now());
        for i in 0..3 {
            assert!(outbox.push(Utf8Bytes::from(format!("{i}")), 3));
        }
        assert!(!outbox.push(Utf8Bytes::from("3".to_owned()), 3));
        assert!(!outbox.push(Utf8Bytes::from("4".to_owned()), 3));
        let kept: Vec<String> = outbox.frames.borrow().iter().map(|t| t.as_str().to_owned()).collect();
        assert_eq!(kept, ["2", "3", "4"]);
        outbox.close(1000, "");
        assert!(!outbox.push(Utf8Bytes::from("5".to_owned()), 3));
        assert_eq!(outbox.frames.borrow().len(), 3);
    }

    /// On a media leg, overflow drops the oldest media frame, never a control message.
    #[test]
    fn media_leg_keeps_control_messages() {
        #[allow(clippy::disallowed_methods)] // A test's clock origin.
        let outbox = Outbox::new(Instant::now());
        outbox.set_media_leg();
        let media = |i: u8| Utf8Bytes::from(format!(r#"{{"event":"media","n":{i}}}"#));
        let control = |name: &str| Utf8Bytes::from(format!(r#"{{"event":"{name}"}}"#));
        assert!(outbox.push(control("connected"), 3));
        assert!(outbox.push(control("start"), 3));
        assert!(outbox.push(media(1), 3));
        assert!(!outbox.push(media(2), 3), "media 1 makes room for media 2");
        assert!(!outbox.push(control("mark"), 3), "media 2 makes room for the mark");
        assert!(!outbox.push(media(3), 3), "only control left: the new media frame is dropped");
        assert!(outbox.push(control("stop"), 3), "control past the limit is kept, nothing dropped");
        let kept: Vec<String> = outbox.frames.borrow().iter().map(|t| t.as_str().to_owned()).collect();
        assert_eq!(
            kept,
            [r#"{"event":"connected"}"#, r#"{"event":"start"}"#, r#"{"event":"mark"}"#, r#"{"event":"stop"}"#]
        );
        assert!(outbox.push(control("clear"), 3));
        assert!(outbox.push(control("clear"), 3));
        assert!(!outbox.push(control("clear"), 3), "twice the limit of control frames: the leg closes");
        assert_eq!(outbox.close.get(), Some((1008, "peer is not reading")));
    }

    /// The sweep pings a peer that has been quiet, even while we stream to it, once per interval;
    /// it closes a peer silent past the idle timeout, and kills a socket whose close went unanswered.
    #[test]
    fn sweep_pings_quiet_peers() {
        #[allow(clippy::disallowed_methods)] // A test's clock origin.
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let outbox = Outbox::new(t0);
        outbox.last_tx.set(t0 + s(25)); // We wrote a moment ago: it does not matter.
        outbox.sweep(t0 + s(21), s(60), s(20), s(60));
        assert!(outbox.ping_due.take(), "the peer was quiet for 21 s");
        outbox.sweep(t0 + s(22), s(60), s(20), s(60));
        assert!(!outbox.ping_due.get(), "not twice in one interval");
        outbox.last_rx.set(t0 + s(30)); // Its pong.
        outbox.sweep(t0 + s(45), s(60), s(20), s(60));
        assert!(!outbox.ping_due.get(), "the pong counts as activity");
        outbox.sweep(t0 + s(91), s(60), s(20), s(60));
        assert_eq!(outbox.close.get(), Some((1001, "idle timeout")));
        outbox.closing_since.set(Some(t0 + s(91)));
        outbox.sweep(t0 + s(94), s(60), s(20), s(60));
        assert!(outbox.killed.get(), "the close went unanswered for over 2 s");
    }
}
