//! What every socket task shares: writing out within a deadline, closing (TLS `close_notify`
//! first), an HTTP answer followed by a lingering close, a close frame, and refusing a connection
//! that cannot be served.
//!
//! Invariant: no task lives here and nothing here imports a task: `tcp`, `ws`, `mesh` and `agent`
//! all import it; every wait is bounded by a deadline.

use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use http::{HeaderMap, StatusCode};

use super::clock;
use super::service::ControlService;
use super::tls::Stream;
use crate::proto::http::{write_response, Connection};
use crate::proto::ws::WsCodec;

/// Size of one read while a closing connection discards what its client still sends.
const LINGER_CHUNK: usize = 16 * 1024;

/// Refuses a connection that could not be moved: 503 before the upgrade, close 1013 after it.
pub(crate) async fn refuse<S: ControlService>(
    service: &Rc<S>,
    stream: &mut Stream,
    upgraded: bool,
    message: &'static str,
    node: &str,
) {
    if upgraded {
        send_and_close(stream, close_frame(1013, message)).await;
    } else {
        let resp = service.error_response(StatusCode::SERVICE_UNAVAILABLE, message, &HeaderMap::new());
        respond_and_close(stream, &mut Vec::new(), &resp, false, node).await;
    }
}

/// A WebSocket close frame from the server, encoded.
pub(crate) fn close_frame(code: u16, reason: &str) -> Vec<u8> {
    let mut codec = WsCodec::new_server(&crate::config::Limits::default(), &[]);
    codec.close(code, reason);
    codec.poll_transmit().unwrap_or_default()
}

/// Writes `bytes` (a close frame, perhaps after a 101) within a second, then closes the connection.
pub(crate) async fn send_and_close(stream: &mut Stream, mut bytes: Vec<u8>) {
    let _ = flush(stream, &mut bytes, Duration::from_secs(1)).await;
    close(stream).await;
}

/// Writes out `out` within `timeout`; false when the peer is gone or not reading.
pub(crate) async fn flush(stream: &mut Stream, out: &mut Vec<u8>, timeout: Duration) -> bool {
    if out.is_empty() {
        return true;
    }
    // The flush matters for TLS: its last records may still wait in its buffer after `write_all`.
    let written = glommio::timer::timeout(timeout, async {
        Ok(async {
            stream.write_all(out).await?;
            stream.flush().await
        }
        .await)
    })
    .await;
    out.clear();
    matches!(written, Ok(Ok(())))
}

/// How long closing a connection may take (TLS's `close_notify` must reach the socket first): a
/// peer that stopped reading cannot hold the task past it.
const CLOSE_WITHIN: Duration = Duration::from_secs(1);

/// Closes `stream` (TLS: `close_notify`, then the TCP write side), giving up after [`CLOSE_WITHIN`].
pub(crate) async fn close(stream: &mut Stream) {
    let _ = glommio::timer::timeout(CLOSE_WITHIN, async { Ok(stream.close().await) }).await;
}

/// How long a closing connection keeps reading and discarding what its client still sends.
const LINGER: Duration = Duration::from_secs(2);
/// Most bytes a closing connection reads and discards: room for a refused body several times
/// the default body limit (a client that wrote 2 MiB before reading gets its 413), and a bound
/// on what one client can make the relay read for nothing.
const LINGER_BYTES: usize = 4 * 1024 * 1024;

/// Sends `resp` (after anything already in `out`) and closes the connection.
///
/// The close lingers (RFC 9112 §9.6, as nginx's `lingering_close`): after our FIN, what the client
/// still sends is read and discarded, up to [`LINGER_BYTES`] within [`LINGER`], so an unread
/// request body does not make the kernel reset the connection and destroy the response before
/// the client reads it. The wait is this connection's own task: it blocks no other.
pub(crate) async fn respond_and_close(
    stream: &mut Stream,
    out: &mut Vec<u8>,
    resp: &http::Response<Bytes>,
    head_only: bool,
    node: &str,
) {
    let now = clock::now();
    clock::with_http_date(now, |date| write_response(out, resp, Connection::Close, head_only, date, node));
    close_lingering(stream, out).await;
}

/// Writes out `out`, ends our side of the connection, and lingers (see [`respond_and_close`]).
pub(crate) async fn close_lingering(stream: &mut Stream, out: &mut Vec<u8>) {
    if !flush(stream, out, Duration::from_secs(5)).await {
        return;
    }
    let shut = glommio::timer::timeout(CLOSE_WITHIN, async { Ok(stream.shutdown_write().await) }).await;
    if !matches!(shut, Ok(Ok(()))) {
        return;
    }
    let mut drained = 0;
    // On the heap: this future is part of every connection's task.
    let mut chunk = vec![0u8; LINGER_CHUNK];
    let deadline = clock::now().instant + LINGER;
    while drained < LINGER_BYTES {
        let wait = deadline.saturating_duration_since(clock::now().instant);
        let read = glommio::timer::timeout(wait, async { Ok(stream.read(&mut chunk).await) }).await;
        match read {
            Ok(Ok(n)) if n > 0 => drained += n,
            _ => break,
        }
        // A client streaming at full speed must not keep this core from its other tasks.
        glommio::yield_if_needed().await;
    }
}
