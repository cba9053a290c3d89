//! TCP on one core: the SO_REUSEPORT accept loop and HTTP/1.1 connections (keep-alive,
//! pipelining, limits, timeouts), handing WebSocket upgrades to their session's core.
//!
//! Invariant: a connection costs only itself: every read and write has a deadline, every buffer a
//! limit, and an error closes this connection alone.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_lite::{AsyncReadExt, FutureExt};
use glommio::net::TcpListener;
use http::{HeaderMap, Method, StatusCode};

use super::message::{CoreMessage, Handoff};
use super::service::{ControlService, Outcome, Request};
use super::shared::{CoreHandle, CoreShared};
use super::socket::{close_frame, close_lingering, flush, refuse, respond_and_close, send_and_close};
use super::tls::{Stream, TlsStream};
use super::upgrade::{SocketKind, Upgrade};
use super::ws::BINARY_REFUSED;
use super::{clock, handoff, ws};
use crate::id::{core_for, SessionId};
use crate::proto::chunked::{ChunkedDecoder, Decode};
use crate::proto::http::{error_context, parse_head, write_response, Connection, Parse, CONTINUE};
use crate::proto::ws::{write_switching_protocols, Incoming, WsCodec};
use crate::proto::{release_if_large, twilio};
use crate::secret::Secret;

/// Bytes read from a socket at a time.
const READ_CHUNK: usize = 4096;
/// Buffer capacity an idle connection may keep; a larger one (left by a big request) is freed, so
/// thousands of idle keep-alive connections cost little memory.
const IDLE_BUFFER_BYTES: usize = 2 * READ_CHUNK;
/// Answers to pipelined requests held before they are written (one answer may pass it).
const PIPELINE_FLUSH_BYTES: usize = 64 * 1024;

/// Accepts connections until cancelled at shutdown.
pub(crate) async fn accept_task<S: ControlService>(shared: Rc<CoreShared>, service: Rc<S>, listener: TcpListener) {
    loop {
        let stream = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and friends: back off briefly rather than spin; the listener stays.
                tracing::warn!(core = shared.id.0, "accept failed: {e}");
                glommio::timer::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if shared.connections.get() >= shared.limits.connections_per_core {
            tracing::debug!(core = shared.id.0, "connection refused: core at its connection limit");
            drop(stream);
            continue;
        }
        let peer = stream.peer_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let _ = stream.set_nodelay(true);
        shared.connection_opened();
        let (s, svc) = (shared.clone(), service.clone());
        glommio::spawn_local(async move {
            let stream = match s.tls.clone() {
                None => Some(Stream::Plain(stream)),
                // The handshake has the header timeout, like a request head.
                Some(config) => {
                    // Boxed: rustls's handshake state would otherwise size the task for its life.
                    let handshake = async { Ok(Box::pin(TlsStream::accept(stream, config)).await) };
                    match glommio::timer::timeout(s.limits.header_timeout, handshake).await {
                        Ok(Ok(tls)) => Some(Stream::Tls(Box::new(tls))),
                        Ok(Err(e)) => {
                            tracing::debug!(core = s.id.0, %peer, "TLS handshake failed: {e}");
                            None
                        }
                        Err(_) => None,
                    }
                }
            };
            if let Some(stream) = stream {
                http_task(&s, &svc, stream, peer).await;
            }
            s.connection_closed();
        })
        .detach();
    }
}

/// How a read ended when it did not deliver bytes.
enum ReadEnd {
    Eof,
    TimedOut,
    Shutdown,
    Failed,
}

/// Serves one HTTP/1.1 connection until it closes, times out or upgrades.
async fn http_task<S: ControlService>(shared: &Rc<CoreShared>, service: &Rc<S>, mut stream: Stream, peer: SocketAddr) {
    let limits = &shared.limits;
    let handle = CoreHandle(shared.clone());
    let mut buf: Vec<u8> = Vec::new();
    let mut out: Vec<u8> = Vec::new();
    // When the request now being received began (its first byte), for the header timeout.
    let mut request_started: Option<Instant> = None;
    loop {
        let parsed = parse_head(&buf, limits);
        let (head, head_len) = match parsed {
            Ok(Parse::Complete { head, head_len }) => (head, head_len),
            Ok(Parse::Incomplete) => {
                if !flush(&mut stream, &mut out, limits.idle_timeout).await {
                    return;
                }
                if request_started.is_none() {
                    release_if_large(&mut buf, IDLE_BUFFER_BYTES);
                    release_if_large(&mut out, IDLE_BUFFER_BYTES);
                }
                let deadline = match request_started {
                    Some(t) => t + limits.header_timeout,
                    None if shared.shutting_down.get() => return,
                    None => clock::now().instant + limits.idle_timeout,
                };
                match read_more(shared, &mut stream, &mut buf, deadline, request_started.is_none()).await {
                    Ok(()) => {
                        request_started.get_or_insert_with(|| clock::now().instant);
                        continue;
                    }
                    Err(ReadEnd::TimedOut) if request_started.is_some() => {
                        let resp = service.error_response(
                            StatusCode::REQUEST_TIMEOUT,
                            "the request was not received in time",
                            &HeaderMap::new(),
                        );
                        respond_and_close(&mut stream, &mut out, &resp, false, &shared.node_id).await;
                        return;
                    }
                    Err(_) => {
                        let _ = flush(&mut stream, &mut out, limits.idle_timeout).await;
                        return;
                    }
                }
            }
            Err(e) => {
                let resp = service.error_response(e.status(), &e.to_string(), &error_context(&buf));
                respond_and_close(&mut stream, &mut out, &resp, false, &shared.node_id).await;
                return;
            }
        };
        let started = request_started.unwrap_or_else(|| clock::now().instant);
        // The body: `Content-Length` bytes after the head, or a chunked body decoded as it
        // arrives (its wire bytes are dropped once decoded, so `buf` stays small however long
        // the chunk lines; the decoder holds the decoded size to `max_body_bytes`).
        let mut chunks = head.chunked.then(|| ChunkedDecoder::for_request(limits));
        let mut decoded = Vec::new();
        let mut first_wait = true;
        let total = loop {
            let end = match &mut chunks {
                None => Some(head_len + head.content_length).filter(|&end| buf.len() >= end),
                Some(decoder) => match decoder.decode(&buf[head_len..], &mut decoded) {
                    Ok(Decode::Complete { used }) => Some(head_len + used),
                    Ok(Decode::Incomplete) => {
                        buf.truncate(head_len);
                        None
                    }
                    Err(e) => {
                        let resp = service.error_response(e.status(), &e.to_string(), &head.headers);
                        respond_and_close(&mut stream, &mut out, &resp, false, &shared.node_id).await;
                        return;
                    }
                },
            };
            if let Some(end) = end {
                break end;
            }
            if std::mem::take(&mut first_wait) && head.expect_continue && head.version == http::Version::HTTP_11 {
                // RFC 9110 §10.1.1: a final answer may replace 100; the body may or may not
                // follow, so the connection closes after it.
                if let Some(resp) = service.early_response(&head) {
                    respond_and_close(&mut stream, &mut out, &resp, head.method == Method::HEAD, &shared.node_id).await;
                    return;
                }
                out.extend_from_slice(CONTINUE);
            }
            if !flush(&mut stream, &mut out, limits.idle_timeout).await {
                return;
            }
            if let Err(end) = read_more(shared, &mut stream, &mut buf, started + limits.header_timeout, false).await {
                if matches!(end, ReadEnd::TimedOut) {
                    let resp = service.error_response(
                        StatusCode::REQUEST_TIMEOUT,
                        "the request body was not received in time",
                        &head.headers,
                    );
                    respond_and_close(&mut stream, &mut out, &resp, false, &shared.node_id).await;
                }
                return;
            }
        };
        let body = match chunks {
            Some(_) => Bytes::from(decoded),
            None => Bytes::copy_from_slice(&buf[head_len..total]),
        };
        buf.drain(..total);
        request_started = if buf.is_empty() { None } else { Some(clock::now().instant) };

        let head_only = head.method == Method::HEAD;
        let keep_alive = head.keep_alive && !shared.shutting_down.get();
        let connection = match (keep_alive, head.version) {
            (false, _) => Connection::Close,
            (true, http::Version::HTTP_10) => Connection::KeepAlive,
            (true, _) => Connection::Default,
        };
        // A handler that panics (a bug) costs only its request: 500, and this connection closes.
        // Boxed: the largest handler (one that calls an upstream) would otherwise size every
        // connection's task, media sockets included, for their whole life.
        let handled = std::panic::AssertUnwindSafe(Box::pin(service.handle(&handle, Request { head, body, peer })));
        let Ok(outcome) = futures::FutureExt::catch_unwind(handled).await else {
            tracing::error!(core = shared.id.0, %peer, "a request handler panicked; answered 500");
            let resp = service.error_response(StatusCode::INTERNAL_SERVER_ERROR, "internal error", &HeaderMap::new());
            respond_and_close(&mut stream, &mut out, &resp, false, &shared.node_id).await;
            return;
        };
        match outcome {
            Outcome::Respond(resp) => {
                let now = clock::now();
                clock::with_http_date(now, |date| {
                    write_response(&mut out, &resp, connection, head_only, date, &shared.node_id)
                });
                if !keep_alive {
                    // Lingering, as after an error: pipelined bytes we will not read must not make
                    // the kernel reset the connection before the client has read this response.
                    close_lingering(&mut stream, &mut out).await;
                    return;
                }
                // Pipelined requests already buffered are answered together in one write, up to
                // PIPELINE_FLUSH_BYTES of answers: a client that pipelines many requests for large
                // answers and reads none cannot make the relay hold them all. Yield between
                // requests so one client's pipeline cannot starve the core.
                if out.len() >= PIPELINE_FLUSH_BYTES && !flush(&mut stream, &mut out, limits.idle_timeout).await {
                    return;
                }
                glommio::yield_if_needed().await;
            }
            Outcome::Upgrade(up) => {
                if !flush(&mut stream, &mut out, limits.idle_timeout).await {
                    return;
                }
                // Boxed for the same reason: only upgraded sockets carry the upgrade's state.
                Box::pin(upgrade(shared, service, stream, buf, up)).await;
                return;
            }
        }
    }
}

/// Completes a WebSocket upgrade here, or moves the connection to the session's owner core.
///
/// Listeners name their session in the request. A caller's stream names it in its `start`
/// message: the relay answers 101 here, reads until `start`, and moves the socket with every byte
/// read so far, so no frame is lost.
async fn upgrade<S: ControlService>(
    shared: &Rc<CoreShared>,
    service: &Rc<S>,
    mut stream: Stream,
    read_ahead: Vec<u8>,
    up: Upgrade,
) {
    if let Some((code, reason)) = up.reject {
        let mut out = Vec::new();
        write_switching_protocols(&mut out, &up.accept, &shared.node_id);
        out.extend(close_frame(code, reason));
        send_and_close(&mut stream, out).await;
        return;
    }
    let (session, read_ahead, upgraded) = if up.kind == SocketKind::Caller {
        let mut head = Vec::new();
        write_switching_protocols(&mut head, &up.accept, &shared.node_id);
        if !flush(&mut stream, &mut head, shared.limits.idle_timeout).await {
            return;
        }
        match caller_session(shared, &mut stream, read_ahead, up.session.clone(), up.session_fixed).await {
            Ok((session, raw)) => (session, raw, true),
            Err(close) => {
                send_and_close(&mut stream, close).await;
                return;
            }
        }
    } else {
        let Some(session) = up.session.clone() else {
            let resp =
                service.error_response(StatusCode::BAD_REQUEST, "this WebSocket needs a session id", &HeaderMap::new());
            respond_and_close(&mut stream, &mut Vec::new(), &resp, false, &shared.node_id).await;
            return;
        };
        (session, read_ahead, false)
    };
    let owner = core_for(&session, shared.cores);
    if owner == shared.id {
        ws::socket_task(shared.clone(), service.clone(), stream, read_ahead, session, up, upgraded).await;
        return;
    }
    let fd = match handoff::detach(stream.tcp()) {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!(core = shared.id.0, "cannot hand a connection over: {e}");
            let message = "cannot move the connection to its session's core";
            refuse(service, &mut stream, upgraded, message, &shared.node_id).await;
            return;
        }
    };
    // A TLS connection's state travels with its socket (everything we had to write is flushed).
    let (tcp, tls) = match stream {
        Stream::Plain(tcp) => (tcp, None),
        Stream::Tls(t) => {
            let (tcp, state) = t.into_parts();
            (tcp, Some(Box::new(state)))
        }
    };
    let message = CoreMessage::Handoff(Box::new(Handoff { fd, tls, read_ahead, session, upgrade: up, upgraded }));
    if let Err(message) = shared.send_to_core(owner, message) {
        // This core still answers the client, with its TLS state back if it had one; dropping the
        // message closes only the duplicate descriptor.
        let mut stream = match message {
            CoreMessage::Handoff(h) => match h.tls {
                Some(state) => Stream::Tls(Box::new(TlsStream::from_parts(tcp, *state))),
                None => Stream::Plain(tcp),
            },
            _ => Stream::Plain(tcp),
        };
        refuse(service, &mut stream, upgraded, "the session's core is busy; try again", &shared.node_id).await;
        return;
    }
    // The owner core now holds the socket through its duplicate; dropping ours closes only this
    // descriptor.
    drop(tcp);
}

/// `reason` cut to what a close frame can carry (123 bytes of UTF-8, RFC 6455 §5.5.1).
fn close_reason(mut reason: String) -> Cow<'static, str> {
    if reason.len() > 123 {
        let mut end = 123;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
    }
    Cow::Owned(reason)
}

/// Reads a caller's stream until its `start` message and returns the session it names
/// (`customParameters.callSid`, else `start.callSid`, else the request's `?callSid=`) with every
/// byte read since the 101, for the owner core to replay.
///
/// # Errors
/// The close frame to send when no usable `start` arrives within the limits: the codec's own
/// answer when the peer closed (its code echoed) or broke the protocol, else the relay's reason.
async fn caller_session(
    shared: &CoreShared,
    stream: &mut Stream,
    read_ahead: Vec<u8>,
    fallback: Option<SessionId>,
    fixed: bool,
) -> Result<(SessionId, Vec<u8>), Vec<u8>> {
    let mut raw = read_ahead;
    let mut codec = WsCodec::new_server(&shared.limits, &raw);
    match read_start(shared, stream, &mut raw, &mut codec, fallback, fixed).await {
        Ok(id) => Ok((id, raw)),
        Err(refusal) => {
            if let Some((code, reason)) = refusal {
                codec.close(code, &reason);
            }
            Err(codec.poll_transmit().unwrap_or_default())
        }
    }
}

/// [`caller_session`]'s reading: `Err(None)` when the codec already queued its close frame.
async fn read_start(
    shared: &CoreShared,
    stream: &mut Stream,
    raw: &mut Vec<u8>,
    codec: &mut WsCodec,
    fallback: Option<SessionId>,
    fixed: bool,
) -> Result<SessionId, Option<(u16, Cow<'static, str>)>> {
    let limits = &shared.limits;
    let deadline = clock::now().instant + limits.header_timeout;
    loop {
        loop {
            match codec.poll_incoming() {
                Ok(Some(Incoming::Text(text))) => {
                    let frame = Bytes::from(text);
                    let parsed = twilio::parse(&frame);
                    if let Err(e) = &parsed {
                        // A `start` that cannot be used will not be followed by a better one:
                        // refuse the stream now, saying why, rather than wait out the deadline.
                        if twilio::names_start(&frame) {
                            return Err(Some((1008, close_reason(format!("invalid start: {e}")))));
                        }
                    }
                    if let Ok(twilio::Message::Start(start)) = parsed {
                        let named = start.custom_parameter("callSid").filter(|s| !s.is_empty()).map(str::to_owned);
                        let key = named.or_else(|| (!start.call_sid.is_empty()).then(|| start.call_sid.clone()));
                        let id = match key {
                            Some(k) => SessionId::parse(&k)
                                .map_err(|_| Some((1008, "the stream's callSid is not a valid id".into())))?,
                            None => fallback
                                .clone()
                                .ok_or_else(|| Some((1008, "the stream's start names no callSid".into())))?,
                        };
                        // Named by its URL's path, the stream belongs to that call: the node and
                        // core a balancer chose by the path are the call's.
                        if fixed && fallback.as_ref() != Some(&id) {
                            return Err(Some((1008, "the stream's start names another call than its URL".into())));
                        }
                        if let Some(stream_key) = &shared.stream_key {
                            let expected = Secret::new(twilio::stream_signature(stream_key, id.as_str()));
                            if !start.custom_parameter("relaySig").is_some_and(|s| expected.matches(s)) {
                                return Err(Some((
                                    1008,
                                    "this stream was not started by the relay's TwiML for this call".into(),
                                )));
                            }
                        }
                        return Ok(id);
                    }
                }
                // Media Streams carry text frames only (RFC 6455 §7.4.1: 1003, data it cannot accept).
                Ok(Some(Incoming::Binary(_))) => return Err(Some((1003, BINARY_REFUSED.into()))),
                // The codec queued the answer: the peer's own close code echoed, or 1002/1007/1009.
                Ok(Some(Incoming::Close)) | Err(_) => return Err(None),
                Ok(None) => break,
            }
        }
        // A real `connected` + `start` is a few KiB even with long parameters (an outbound call's
        // prompt and first message); 64 KiB leaves room for media sent early, and no more.
        if raw.len() > 64 * 1024 {
            return Err(Some((1008, "no start message within the size limit".into())));
        }
        let before = raw.len();
        read_more(shared, stream, raw, deadline, false)
            .await
            .map_err(|_| Some((1008, "no start message in time".into())))?;
        codec.handle_bytes(&raw[before..]);
    }
}

/// Reads at least one byte into `buf`, before `deadline`. `idle` means between requests, where
/// shutdown may interrupt.
async fn read_more(
    shared: &CoreShared,
    stream: &mut Stream,
    buf: &mut Vec<u8>,
    deadline: Instant,
    idle: bool,
) -> Result<(), ReadEnd> {
    // Read straight into `buf` (no buffer in this future: a connection's task holds its largest
    // state for its whole life).
    let start = buf.len();
    buf.resize(start + READ_CHUNK, 0);
    let wait = deadline.saturating_duration_since(clock::now().instant);
    let room = &mut buf[start..];
    let read = async { Ok::<_, ReadEnd>(stream.read(room).await) };
    let timer = async {
        glommio::timer::sleep(wait).await;
        Err(ReadEnd::TimedOut)
    };
    let shutdown = async {
        if !idle {
            return std::future::pending().await;
        }
        let listener = shared.shutdown_event.listen();
        if !shared.shutting_down.get() {
            listener.await;
        }
        Err(ReadEnd::Shutdown)
    };
    let outcome = read.or(timer).or(shutdown).await;
    let filled = match &outcome {
        Ok(Ok(n)) => *n,
        _ => 0,
    };
    buf.truncate(start + filled);
    match outcome? {
        Ok(0) => Err(ReadEnd::Eof),
        Ok(_) => Ok(()),
        Err(_) => Err(ReadEnd::Failed),
    }
}
