//! Event sockets (`/ws`) on the session's owner core: the 101 answer, then a reader task that
//! feeds client frames to the core and a writer that drains the socket's bounded outbox.
//!
//! Invariant: runs only on the owner core; a socket that stops reading loses its own frames
//! (counted) and is closed, never slowing the core.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use event_listener::Event;
use futures_lite::{AsyncReadExt, AsyncWriteExt, FutureExt};
use glommio::net::TcpStream;
use http::StatusCode;
use tungstenite::Utf8Bytes;

use super::core_task::CoreShared;
use super::{tcp, ControlService, Observe};
use crate::core::AttachError;
use crate::proto::ws::{write_switching_protocols, Incoming, WsCodec};

/// How long a closing socket waits for the peer's close frame before the TCP connection is dropped.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// The queue between the core and one event socket's writer.
pub(crate) struct Outbox {
    frames: RefCell<VecDeque<Utf8Bytes>>,
    close: Cell<Option<(u16, &'static str)>>,
    /// Wakes the writer when a frame or a close arrives.
    event: Event,
}

impl Outbox {
    fn new() -> Self {
        Self { frames: RefCell::new(VecDeque::new()), close: Cell::new(None), event: Event::new() }
    }

    /// Queues a frame; false (and nothing queued) when `limit` frames are waiting already.
    pub(crate) fn push(&self, text: Utf8Bytes, limit: usize) -> bool {
        let mut frames = self.frames.borrow_mut();
        if frames.len() >= limit {
            return false;
        }
        frames.push_back(text);
        drop(frames);
        // Both the writer and the reader's close watch listen on this event: wake every listener,
        // or the one wake-up may go to the reader and leave the frame unsent.
        self.event.notify(usize::MAX);
        true
    }

    /// Asks the writer to send a close frame after what is queued, then end the connection.
    pub(crate) fn close(&self, code: u16, reason: &'static str) {
        if self.close.get().is_none() {
            self.close.set(Some((code, reason)));
        }
        self.event.notify(usize::MAX);
    }
}

/// Completes a `/ws` upgrade on the owner core: attach to the session, answer 101, then serve.
pub(crate) async fn observe_task<S: ControlService>(
    shared: Rc<CoreShared>,
    service: Rc<S>,
    mut stream: TcpStream,
    _peer: SocketAddr,
    read_ahead: Vec<u8>,
    observe: Observe,
) {
    let conn = shared.next_connection();
    let now = shared.now();
    let attached = shared.drive(|state| state.handle_attach(now, &observe.session, conn, observe.credential));
    let greeting = match attached {
        Ok(g) => g,
        Err(e) => {
            let status = match e {
                AttachError::Unauthorized => StatusCode::UNAUTHORIZED,
                AttachError::TooManyObservers { .. } => StatusCode::TOO_MANY_REQUESTS,
                AttachError::TooManyPending => StatusCode::SERVICE_UNAVAILABLE,
            };
            let resp = service.error_response(status, &e.to_string());
            tcp::respond_and_close(&mut stream, &mut Vec::new(), &resp, false).await;
            return;
        }
    };
    let outbox = Rc::new(Outbox::new());
    shared.register_outbox(conn, outbox.clone());
    let codec = Rc::new(RefCell::new(WsCodec::new_server(&shared.limits, &read_ahead)));

    let mut head = Vec::with_capacity(160);
    write_switching_protocols(&mut head, &observe.accept);
    // The greeting goes first: it was produced before any event could be queued.
    let _ = codec.borrow_mut().send_text(greeting);
    if let Some(frame) = codec.borrow_mut().poll_transmit() {
        head.extend_from_slice(&frame);
    }
    let (reader, writer) = futures_lite::io::split(stream);
    let write = writer_task(&shared, &outbox, &codec, writer, head);
    let read = reader_task(&shared, conn, &outbox, &codec, reader);
    futures_lite::future::zip(write, read).await;
    shared.remove_outbox(conn);
    shared.drive(|state| state.handle_detach(conn));
}

/// Feeds client frames to the codec and the core until the peer closes or breaks the protocol.
async fn reader_task(
    shared: &CoreShared,
    conn: crate::id::ConnectionId,
    outbox: &Outbox,
    codec: &RefCell<WsCodec>,
    mut reader: futures_lite::io::ReadHalf<TcpStream>,
) {
    let mut chunk = vec![0u8; shared.limits.ws_read_buffer_bytes.max(512)];
    loop {
        // Frames already buffered (read-ahead, or several in one read) are handled first.
        loop {
            let incoming = codec.borrow_mut().poll_incoming();
            match incoming {
                Ok(Some(Incoming::Text(text))) => {
                    let now = shared.now();
                    shared.drive(|state| state.handle_client_text(now, conn, &text));
                }
                Ok(Some(Incoming::Binary(_))) => {} // The event socket carries no binary input.
                Ok(Some(Incoming::Close)) | Err(_) => {
                    // The codec queued the answering close frame; the writer sends it and ends.
                    outbox.close(1000, "");
                    return;
                }
                Ok(None) => break,
            }
        }
        outbox.event.notify(usize::MAX); // Pongs the codec queued.
        let read = async { Some(reader.read(&mut chunk).await) };
        let closing = async {
            loop {
                let listener = outbox.event.listen();
                if outbox.close.get().is_some() {
                    break;
                }
                listener.await;
            }
            glommio::timer::sleep(CLOSE_WAIT).await;
            None
        };
        match read.or(closing).await {
            Some(Ok(n)) if n > 0 => codec.borrow_mut().handle_bytes(&chunk[..n]),
            _ => {
                outbox.close(1000, "");
                return;
            }
        }
    }
}

/// Writes the 101 answer, then queued frames as they come, then the close frame.
async fn writer_task(
    shared: &CoreShared,
    outbox: &Outbox,
    codec: &RefCell<WsCodec>,
    mut writer: futures_lite::io::WriteHalf<TcpStream>,
    mut pending: Vec<u8>,
) {
    let timeout = shared.limits.idle_timeout;
    loop {
        let listener = outbox.event.listen();
        let closing = {
            let mut codec = codec.borrow_mut();
            let frames: Vec<Utf8Bytes> = outbox.frames.borrow_mut().drain(..).collect();
            for text in frames {
                if codec.send_text(text).is_err() {
                    break;
                }
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
            let written = glommio::timer::timeout(timeout, async { Ok(writer.write_all(&pending).await) }).await;
            pending.clear();
            if !matches!(written, Ok(Ok(()))) {
                // The peer is gone or not reading: end the connection.
                outbox.close(1000, "");
                return;
            }
        }
        if closing {
            let _ = writer.close().await;
            return;
        }
        if outbox.frames.borrow().is_empty() && outbox.close.get().is_none() {
            listener.await;
        }
    }
}
