//! Outbound HTTP(S) requests from a core (Twilio's REST API): name lookup off the core, TCP,
//! rustls for `https`, and the sans-IO response parser.
//!
//! Invariant: one overall deadline bounds every request; certificates are verified against the
//! web PKI roots plus any CA the operator configured, never skipped.

use std::time::Duration;

use bytes::Bytes;
use futures_lite::{AsyncReadExt, AsyncWriteExt};

use super::dial;
use super::tls::{Stream, TlsStream};
use crate::proto::http_client::{self, parse_response, Response, ResponseError};

/// A request to send.
#[derive(Debug, Clone)]
pub struct FetchRequest {
    /// `GET`, `POST`, …
    pub method: &'static str,
    /// `http://` or `https://` URL.
    pub url: String,
    /// Extra header fields (Host, Connection and Content-Length are set for you).
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Bytes,
}

/// Why a request failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    /// Not an `http://` or `https://` URL with a host.
    #[error("invalid URL")]
    Url,
    /// The host name did not resolve.
    #[error("cannot resolve {0}")]
    Resolve(String),
    /// TCP, TLS or I/O failed.
    #[error("{0}")]
    Transport(String),
    /// The deadline passed.
    #[error("timed out")]
    Timeout,
    /// The server's answer was not acceptable HTTP.
    #[error(transparent)]
    Response(#[from] ResponseError),
}

/// Time for the last address to accept; the whole exchange is bounded by the caller's timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Sends `request` and reads the whole response within `timeout`.
///
/// # Errors
/// [`FetchError`] for a bad URL, an unreachable host, a TLS failure, a timeout or a bad response.
pub(crate) async fn fetch(request: FetchRequest, timeout: Duration) -> Result<Response, FetchError> {
    fetch_bounded(request, timeout, http_client::MAX_BODY_BYTES).await
}

/// As [`fetch`], refusing a response whose body exceeds `max_body_bytes` as soon as more than
/// that (plus a head) has arrived, rather than reading up to the parser's own bound.
///
/// # Errors
/// As [`fetch`]; [`ResponseError::TooLarge`] past the bound.
pub(crate) async fn fetch_bounded(
    request: FetchRequest,
    timeout: Duration,
    max_body_bytes: usize,
) -> Result<Response, FetchError> {
    match glommio::timer::timeout(timeout, async { Ok(exchange(request, max_body_bytes).await) }).await {
        Ok(result) => result,
        Err(_) => Err(FetchError::Timeout),
    }
}

async fn exchange(request: FetchRequest, max_body_bytes: usize) -> Result<Response, FetchError> {
    let uri: http::Uri = request.url.parse().map_err(|_| FetchError::Url)?;
    let tls = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(FetchError::Url),
    };
    let authority = uri.authority().ok_or(FetchError::Url)?;
    let host = authority.host().trim_start_matches('[').trim_end_matches(']').to_owned();
    let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let target = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    let addrs = dial::resolve(&host, port).await.map_err(|_| FetchError::Resolve(host.clone()))?;
    let tcp =
        dial::connect(&addrs, CONNECT_TIMEOUT).await.map_err(|e| FetchError::Transport(format!("connect {e}")))?;
    let _ = tcp.set_nodelay(true);
    let mut stream = if tls {
        let tls =
            TlsStream::connect(tcp, &host).await.map_err(|e| FetchError::Transport(format!("TLS with {host}: {e}")))?;
        Stream::Tls(Box::new(tls))
    } else {
        Stream::Plain(tcp)
    };
    let mut out = Vec::with_capacity(512 + request.body.len());
    http_client::write_request(&mut out, request.method, authority.as_str(), &target, &request.headers, &request.body);
    stream.write_all(&out).await.map_err(io)?;
    stream.flush().await.map_err(io)?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).await.map_err(io)?;
        buf.extend_from_slice(&chunk[..n]);
        if let Some(response) = parse_response(&buf, n == 0)? {
            if response.body.len() > max_body_bytes {
                return Err(ResponseError::TooLarge.into());
            }
            return Ok(response);
        }
        // Chunk framing of a body at its bound fits in what the parser allows a head.
        if buf.len() > max_body_bytes + 2 * http_client::MAX_HEAD_BYTES {
            return Err(ResponseError::TooLarge.into());
        }
        if n == 0 {
            return Err(ResponseError::Truncated.into());
        }
    }
}

fn io(e: std::io::Error) -> FetchError {
    FetchError::Transport(e.to_string())
}
