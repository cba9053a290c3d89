//! TLS streams (rustls over a glommio `TcpStream`, client or server side) with the
//! `AsyncRead`/`AsyncWrite` interface the socket loops use; the client configuration shared by
//! every outbound TLS connection; the server configuration from the operator's PEM files.
//!
//! Invariant: outbound certificates are always verified (the system's trust store, or the
//! built-in web PKI roots where it has none, plus the operator's extra CAs); encrypted bytes waiting for the socket are bounded by the writer's backpressure; a server
//! connection's TLS state can move to another core with its socket (`into_parts`/`from_parts`).

use std::io::{self, Read, Write};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{ready, Context, Poll};

use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use glommio::net::TcpStream;

static EXTRA_ROOTS: OnceLock<Vec<rustls::pki_types::CertificateDer<'static>>> = OnceLock::new();

/// The system's trust store (`/etc/ssl/certs` and friends, or `SSL_CERT_FILE`/`SSL_CERT_DIR`),
/// loaded once; empty when the system has none.
static SYSTEM_ROOTS: OnceLock<Vec<rustls::pki_types::CertificateDer<'static>>> = OnceLock::new();

/// Loads the system's trust store for outbound TLS; returns how many certificates it holds. Called
/// once at startup (it reads files); a system without one falls back to the built-in web PKI roots.
pub fn load_system_roots() -> usize {
    SYSTEM_ROOTS.get_or_init(|| rustls_native_certs::load_native_certs().certs).len()
}

/// Trusts the PEM certificates in `pem` for outbound TLS, besides the web PKI roots. Call once at
/// startup, before any connection.
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

/// The client configuration, built once per core.
pub(crate) fn config() -> Arc<rustls::ClientConfig> {
    thread_local! {
        static CONFIG: Arc<rustls::ClientConfig> = {
            let mut roots = rustls::RootCertStore::empty();
            let system = SYSTEM_ROOTS.get().map(Vec::as_slice).unwrap_or_default();
            let (added, _) = roots.add_parsable_certificates(system.iter().cloned());
            if added == 0 {
                roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            }
            for cert in EXTRA_ROOTS.get().into_iter().flatten() {
                let _ = roots.add(cert.clone());
            }
            Arc::new(rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth())
        };
    }
    CONFIG.with(Clone::clone)
}

/// The server configuration for `--tls-cert`/`--tls-key` (PEM: the certificate chain, and its
/// private key), offering HTTP/1.1 by ALPN.
///
/// # Errors
/// When either file holds nothing usable or the key does not match the certificate.
pub fn server_config(cert_pem: &[u8], key_pem: &[u8]) -> Result<Arc<rustls::ServerConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    let certs: Vec<_> = rustls::pki_types::CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("the certificate file is not PEM: {e}"))?;
    if certs.is_empty() {
        return Err("the certificate file holds no certificate".to_owned());
    }
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| format!("the key file holds no private key: {e}"))?;
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("the certificate and key do not go together: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A TLS connection's state apart from its socket, to move it to another core.
pub(crate) struct TlsState {
    tls: rustls::Connection,
    /// Encrypted bytes read from the socket and not yet taken by rustls.
    incoming: Vec<u8>,
    /// Encrypted bytes not yet written to the socket (empty when the caller flushed first).
    out: Vec<u8>,
}

/// A TLS connection over TCP, either side.
pub(crate) struct TlsStream {
    tcp: TcpStream,
    tls: rustls::Connection,
    /// Encrypted bytes produced by rustls, not yet accepted by the socket.
    out: Vec<u8>,
    /// Encrypted bytes read but not yet taken by rustls (it takes at most a few KiB per call).
    incoming: Vec<u8>,
}

/// Largest encrypted read, bytes: one TLS record and its header.
const READ_BYTES: usize = 16 * 1024 + 64;
/// Encrypted input a connection keeps between reads once rustls took all of it; more is freed.
const IDLE_INCOMING_BYTES: usize = 2 * 1024;

thread_local! {
    /// Where every TLS connection on this thread (one core) receives encrypted bytes: used within
    /// one poll and copied to the connection's `incoming` at once, so idle connections hold none.
    static SCRATCH: std::cell::RefCell<Box<[u8]>> = std::cell::RefCell::new(vec![0u8; READ_BYTES].into_boxed_slice());
}

impl TlsStream {
    /// Connects TLS to `host` over `tcp` and completes the handshake.
    ///
    /// # Errors
    /// When the name is invalid, the certificate does not verify, or the socket fails.
    pub(crate) async fn connect(tcp: TcpStream, host: &str) -> io::Result<Self> {
        let name = rustls::pki_types::ServerName::try_from(host.to_owned())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "invalid TLS server name"))?;
        let tls = rustls::ClientConnection::new(config(), name).map_err(io::Error::other)?;
        Self::handshake(tcp, tls.into()).await
    }

    /// Accepts TLS from a client on `tcp` with `config` and completes the handshake.
    ///
    /// # Errors
    /// When the client does not speak TLS, offers nothing we accept, or the socket fails.
    pub(crate) async fn accept(tcp: TcpStream, config: Arc<rustls::ServerConfig>) -> io::Result<Self> {
        let tls = rustls::ServerConnection::new(config).map_err(io::Error::other)?;
        Self::handshake(tcp, tls.into()).await
    }

    /// The state to move to another core, and the socket (whose descriptor moves separately).
    /// Records not yet written move too, and go out first on the new core.
    pub(crate) fn into_parts(self) -> (TcpStream, TlsState) {
        (self.tcp, TlsState { tls: self.tls, incoming: self.incoming, out: self.out })
    }

    /// A connection moved here: its socket, adopted, and its state.
    pub(crate) fn from_parts(tcp: TcpStream, state: TlsState) -> Self {
        Self { tcp, tls: state.tls, out: state.out, incoming: state.incoming }
    }

    async fn handshake(mut tcp: TcpStream, mut tls: rustls::Connection) -> io::Result<Self> {
        let mut scratch = vec![0u8; READ_BYTES].into_boxed_slice();
        while tls.is_handshaking() {
            while tls.wants_write() {
                let mut records = Vec::new();
                tls.write_tls(&mut records)?;
                tcp.write_all(&records).await?;
            }
            if !tls.is_handshaking() {
                break;
            }
            let n = tcp.read(&mut scratch).await?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the peer closed during the TLS handshake"));
            }
            // Feed every byte: one read_tls call may take only part of them.
            let mut rest = &scratch[..n];
            while !rest.is_empty() {
                if tls.read_tls(&mut rest)? == 0 {
                    break;
                }
                tls.process_new_packets().map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            }
            if !rest.is_empty() {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "TLS handshake data overflowed rustls"));
            }
        }
        while tls.wants_write() {
            let mut records = Vec::new();
            tls.write_tls(&mut records)?;
            tcp.write_all(&records).await?;
        }
        Ok(Self { tcp, tls, out: Vec::new(), incoming: Vec::new() })
    }

    /// Writes as much of `out` as the socket takes now; `Ready` once it is empty.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.out.is_empty() {
            let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, &self.out))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out.drain(..n);
        }
        Poll::Ready(Ok(()))
    }

    fn encrypt_pending(&mut self) -> io::Result<()> {
        while self.tls.wants_write() {
            self.tls.write_tls(&mut self.out)?;
        }
        Ok(())
    }
}

impl AsyncRead for TlsStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        loop {
            match this.tls.reader().read(buf) {
                Ok(n) => return Poll::Ready(Ok(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Poll::Ready(Ok(0)),
                Err(e) => return Poll::Ready(Err(e)),
            }
            if this.incoming.is_empty() {
                let (tcp, incoming) = (&mut this.tcp, &mut this.incoming);
                let n = ready!(SCRATCH.with(|scratch| {
                    let mut scratch = scratch.borrow_mut();
                    let polled = Pin::new(tcp).poll_read(cx, &mut scratch);
                    if let Poll::Ready(Ok(n)) = polled {
                        incoming.extend_from_slice(&scratch[..n]);
                    }
                    polled
                }))?;
                if n == 0 {
                    return Poll::Ready(Ok(0));
                }
            }
            // rustls takes a bounded amount per call; the rest stays in `incoming` for the next
            // turn of this loop, after the plaintext it produced has been read out.
            let mut rest: &[u8] = &this.incoming;
            let taken = this.tls.read_tls(&mut rest)?;
            this.incoming.drain(..taken);
            crate::proto::release_if_large(&mut this.incoming, IDLE_INCOMING_BYTES);
            this.tls.process_new_packets().map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            // Alerts and key updates the peer's records call for go out with the next write.
            this.encrypt_pending()?;
            if taken == 0 && !this.incoming.is_empty() {
                // rustls took nothing although its plaintext was read out: it would never progress.
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, "TLS input not accepted")));
            }
        }
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        // Backpressure: take new plaintext only once earlier records reached the socket.
        ready!(this.poll_drain(cx))?;
        let n = this.tls.writer().write(buf)?;
        this.encrypt_pending()?;
        // Push what we can now; the rest goes on the next write or flush.
        let _ = this.poll_drain(cx)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.encrypt_pending()?;
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.tls.send_close_notify();
        this.encrypt_pending()?;
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.tcp).poll_close(cx)
    }
}

/// A connection, plain TCP or TLS: one the relay dialled (`ws://` / `wss://`, `http://` /
/// `https://`) or one it accepted (TLS when `--tls-cert` is set).
pub(crate) enum Stream {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP.
    Tls(Box<TlsStream>),
}

impl Stream {
    /// The TCP socket's descriptor (for shutting it down from the liveness sweep).
    pub(crate) fn raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        match self {
            Self::Plain(s) => s.as_raw_fd(),
            Self::Tls(s) => s.tcp.as_raw_fd(),
        }
    }

    /// The TCP socket underneath.
    pub(crate) fn tcp(&self) -> &TcpStream {
        match self {
            Self::Plain(s) => s,
            Self::Tls(s) => &s.tcp,
        }
    }

    /// Ends our side: TLS says `close_notify` first, then the TCP write side shuts down.
    pub(crate) async fn shutdown_write(&mut self) -> io::Result<()> {
        if let Self::Tls(s) = self {
            s.tls.send_close_notify();
            s.encrypt_pending()?;
            futures_lite::future::poll_fn(|cx| s.poll_drain(cx)).await?;
        }
        self.tcp().shutdown(std::net::Shutdown::Write).await.map_err(io::Error::from)
    }
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_close(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_close(cx),
        }
    }
}
