//! Agent legs: the relay dials an upstream bot's WebSocket (as Twilio would dial a Media Streams
//! server) and then serves it like any other socket on the session's core.
//!
//! Invariant: every step (name lookup, connect, handshake) has a deadline; a bot that is down or
//! slow ends its own leg with `handle_agent_closed`, nothing else.

use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::time::Duration;

use base64::Engine as _;
use futures_lite::{AsyncReadExt, AsyncWriteExt};

use super::outbox::Outbox;
use super::shared::CoreShared;
use super::tls::{Stream, TlsStream};
use super::work::Dial;
use super::{clock, dial, socket, ws};
use crate::id::{ConnectionId, SessionId};
use crate::proto::ws::{check_answer, WsCodec};

/// Dials `target` for agent leg `conn` of `session`, then serves it until it ends.
pub(crate) async fn agent_task(shared: Rc<CoreShared>, conn: ConnectionId, session: SessionId, target: Dial) {
    let limits = &shared.limits;
    // Boxed: dialling (DNS, TCP, TLS handshake, upgrade) would otherwise size the leg's task for
    // its whole life.
    let dialled =
        glommio::timer::timeout(limits.agent_connect_timeout, async { Ok(Box::pin(dial(conn, &target)).await) }).await;
    let (stream, fd, read_ahead) = match dialled {
        Ok(Ok(pair)) => pair,
        Ok(Err(reason)) => return fail(&shared, conn, &session, &reason),
        Err(_) => return fail(&shared, conn, &session, "timed out connecting"),
    };
    shared.connection_opened();
    let now = shared.now();
    // The outbox is registered before the open, so the greeting the core sends on open (and the
    // caller audio held while dialling) reaches the socket.
    let outbox = Rc::new(Outbox::new(shared.coarse_now()));
    outbox.set_media_leg();
    shared.register_outbox(conn, outbox.clone());
    let opened = shared.drive(Some(&session), |state| state.handle_agent_open(now, conn)).unwrap_or(false);
    if opened {
        let codec = WsCodec::new_client(limits, &read_ahead);
        ws::run(&shared, conn, outbox, fd, stream, codec, Vec::new(), None, ws::Feed::Agent).await;
    } else {
        shared.remove_outbox(conn);
        let mut stream = stream;
        socket::close(&mut stream).await;
    }
    shared.connection_closed();
}

fn fail(shared: &CoreShared, conn: ConnectionId, session: &SessionId, reason: &str) {
    tracing::info!(core = shared.id.0, session = %session, "agent leg failed: {reason}");
    let now = shared.now();
    shared.drive(Some(session), |state| state.handle_agent_closed(now, conn, reason));
}

/// Connects and performs the client handshake; returns the socket and any bytes after the 101.
async fn dial(conn: ConnectionId, target: &Dial) -> Result<(Stream, RawFd, Vec<u8>), String> {
    let url = &target.url;
    let addrs = dial::resolve(&url.host, url.port).await?;
    let tcp =
        dial::connect(&addrs, Duration::from_secs(10)).await.map_err(|e| format!("cannot connect to {url}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let fd = tcp.as_raw_fd();
    let mut stream = if url.tls {
        let tls = TlsStream::connect(tcp, &url.host).await.map_err(|e| format!("TLS with {}: {e}", url.host))?;
        Stream::Tls(Box::new(tls))
    } else {
        Stream::Plain(tcp)
    };
    let key = handshake_key(conn);
    let mut extra = String::new();
    if let Some(bearer) = &target.bearer {
        extra.push_str(&format!("Authorization: Bearer {}\r\n", bearer.expose()));
    }
    if let Some((name, value)) = target.header {
        extra.push_str(&format!("{name}: {value}\r\n"));
    }
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nUser-Agent: relay/{}\r\n{extra}\r\n",
        url.path,
        url.host_header(),
        env!("CARGO_PKG_VERSION"),
    );
    stream.write_all(request.as_bytes()).await.map_err(|e| format!("cannot send the handshake: {e}"))?;
    stream.flush().await.map_err(|e| format!("cannot send the handshake: {e}"))?;
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await.map_err(|e| format!("handshake read failed: {e}"))?;
        if n == 0 {
            return Err("the agent closed the connection during the handshake".to_owned());
        }
        buf.extend_from_slice(&chunk[..n]);
        match check_answer(&buf, &key) {
            Ok(Some(head_len)) => return Ok((stream, fd, buf[head_len..].to_vec())),
            Ok(None) => {}
            Err(e) => return Err(format!("agent handshake: {e}")),
        }
    }
}

/// A `Sec-WebSocket-Key`: 16 bytes that differ per connection and per run (RFC 6455 asks for a
/// nonce; it guards against caching proxies, not attackers).
fn handshake_key(conn: ConnectionId) -> String {
    let now = clock::now();
    let mut nonce = [0u8; 16];
    nonce[..8].copy_from_slice(&now.unix_ms.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes());
    nonce[8..].copy_from_slice(&(conn.0 ^ u64::from(std::process::id()).rotate_left(32)).to_le_bytes());
    base64::engine::general_purpose::STANDARD.encode(nonce)
}
