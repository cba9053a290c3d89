//! Outbound HTTP(S) requests from a core (Twilio's REST API): name lookup off the core, TCP,
//! rustls for `https`, and the sans-IO response parser.
//!
//! Invariant: one overall deadline bounds every request; certificates are verified against the
//! web PKI roots plus any CA the operator configured, never skipped.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;

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

static EXTRA_ROOTS: OnceLock<Vec<rustls::pki_types::CertificateDer<'static>>> = OnceLock::new();

/// Trusts the PEM certificates in `pem` for outbound TLS, besides the web PKI roots. Call once at
/// startup, before any request.
///
/// # Errors
/// When the PEM holds no certificate or cannot be parsed.
pub fn trust_extra_roots(pem: &[u8]) -> Result<usize, String> {
    use rustls::pki_types::pem::PemObject;
    let certs: Vec<_> = rustls::pki_types::CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("bad PEM: {e}"))?;
    if certs.is_empty() {
        return Err("no certificate in the file".to_owned());
    }
    let n = certs.len();
    EXTRA_ROOTS.set(certs).map_err(|_| "extra roots were already set".to_owned())?;
    Ok(n)
}

fn tls_config() -> Arc<rustls::ClientConfig> {
    thread_local! {
        static CONFIG: Arc<rustls::ClientConfig> = {
            let mut roots = rustls::RootCertStore::empty();
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            for cert in EXTRA_ROOTS.get().into_iter().flatten() {
                let _ = roots.add(cert.clone());
            }
            Arc::new(rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth())
        };
    }
    CONFIG.with(Clone::clone)
}

/// Sends `request` and reads the whole response within `timeout`.
///
/// # Errors
/// [`FetchError`] for a bad URL, an unreachable host, a TLS failure, a timeout or a bad response.
pub(crate) async fn fetch(request: FetchRequest, timeout: Duration) -> Result<Response, FetchError> {
    match glommio::timer::timeout(timeout, async { Ok(exchange(request).await) }).await {
        Ok(result) => result,
        Err(_) => Err(FetchError::Timeout),
    }
}

async fn exchange(request: FetchRequest) -> Result<Response, FetchError> {
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
    let addr = resolve(&host, port).await?;
    let mut stream =
        TcpStream::connect(addr).await.map_err(|e| FetchError::Transport(format!("connect {addr}: {e}")))?;
    let _ = stream.set_nodelay(true);
    let mut plain = Vec::with_capacity(512 + request.body.len());
    http_client::write_request(
        &mut plain,
        request.method,
        authority.as_str(),
        &target,
        &request.headers,
        &request.body,
    );
    if tls {
        exchange_tls(&mut stream, &host, &plain).await
    } else {
        stream.write_all(&plain).await.map_err(io)?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = stream.read(&mut chunk).await.map_err(io)?;
            buf.extend_from_slice(&chunk[..n]);
            if let Some(response) = parse_response(&buf, n == 0)? {
                return Ok(response);
            }
        }
    }
}

/// The same exchange through rustls: plaintext in and out of the `ClientConnection`, records
/// over the socket.
async fn exchange_tls(stream: &mut TcpStream, host: &str, plain: &[u8]) -> Result<Response, FetchError> {
    let name = rustls::pki_types::ServerName::try_from(host.to_owned()).map_err(|_| FetchError::Url)?;
    let mut tls =
        rustls::ClientConnection::new(tls_config(), name).map_err(|e| FetchError::Transport(e.to_string()))?;
    tls.writer().write_all(plain).map_err(io)?;
    let mut received = Vec::new();
    let mut chunk = [0u8; 8192];
    let mut eof = false;
    loop {
        while tls.wants_write() {
            let mut records = Vec::new();
            tls.write_tls(&mut records).map_err(io)?;
            stream.write_all(&records).await.map_err(io)?;
        }
        if let Some(response) = parse_response(&received, eof)? {
            return Ok(response);
        }
        if eof {
            return Err(ResponseError::Truncated.into());
        }
        let n = stream.read(&mut chunk).await.map_err(io)?;
        if n == 0 {
            eof = true;
            continue;
        }
        tls.read_tls(&mut &chunk[..n]).map_err(io)?;
        tls.process_new_packets().map_err(|e| FetchError::Transport(format!("TLS: {e}")))?;
        loop {
            match tls.reader().read(&mut chunk) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => received.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    eof = true;
                    break;
                }
                Err(e) => return Err(io(e)),
            }
        }
    }
}

/// IP literals directly; names on glommio's blocking pool, never on the core.
async fn resolve(host: &str, port: u16) -> Result<SocketAddr, FetchError> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    let target = (host.to_owned(), port);
    let found =
        glommio::executor().spawn_blocking(move || target.to_socket_addrs().map(|mut addrs| addrs.next())).await;
    match found {
        Ok(Some(addr)) => Ok(addr),
        _ => Err(FetchError::Resolve(host.to_owned())),
    }
}

fn io(e: std::io::Error) -> FetchError {
    FetchError::Transport(e.to_string())
}
