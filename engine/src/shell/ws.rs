//! WebSockets on the session's owner core (event and frontend listeners, caller streams, agent
//! legs): a reader that feeds frames to the core and a writer that drains the socket's bounded
//! outbox.
//!
//! Invariant: runs only on the owner core; every socket ends: a peer that stops reading, stops
//! answering pings, or ignores our close frame is dropped within a bounded time, never slowing the
//! core.

use std::cell::RefCell;
use std::os::fd::RawFd;
use std::rc::Rc;

use futures_lite::{AsyncRead, AsyncWrite, AsyncWriteExt};
use http::StatusCode;
use tungstenite::Utf8Bytes;

use bytes::Bytes;

use super::outbox::Outbox;
use super::service::ControlService;
use super::shared::CoreShared;
use super::socket;
use super::tls::Stream;
use super::upgrade::{SocketKind, Upgrade};
use crate::core::{AttachError, ListenKind};
use crate::id::{ConnectionId, SessionId};
use crate::proto::ws::{write_switching_protocols, Incoming, WsCodec};

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
    mut stream: Stream,
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
                    socket::respond_and_close(&mut stream, &mut Vec::new(), &resp, false, &shared.node_id).await;
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
