//! A client TLS stream (rustls over a glommio `TcpStream`) with the `AsyncRead`/`AsyncWrite`
//! interface the socket loop uses, plus the client configuration shared by every outbound TLS
//! connection.
//!
//! Invariant: certificates are always verified (web PKI roots plus the operator's extra CAs);
//! encrypted bytes waiting for the socket are bounded by the writer's backpressure.

use std::io::{self, Read, Write};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{ready, Context, Poll};

use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use glommio::net::TcpStream;

static EXTRA_ROOTS: OnceLock<Vec<rustls::pki_types::CertificateDer<'static>>> = OnceLock::new();

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
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            for cert in EXTRA_ROOTS.get().into_iter().flatten() {
                let _ = roots.add(cert.clone());
            }
            Arc::new(rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth())
        };
    }
    CONFIG.with(Clone::clone)
}

/// A TLS client connection over TCP.
pub(crate) struct TlsStream {
    tcp: TcpStream,
    tls: rustls::ClientConnection,
    /// Encrypted bytes produced by rustls, not yet accepted by the socket.
    out: Vec<u8>,
    /// Scratch space for encrypted bytes read from the socket.
    scratch: Box<[u8]>,
    /// Encrypted bytes read but not yet taken by rustls (it takes at most a few KiB per call).
    incoming: Vec<u8>,
}

impl TlsStream {
    /// Connects TLS to `host` over `tcp` and completes the handshake.
    ///
    /// # Errors
    /// When the name is invalid, the certificate does not verify, or the socket fails.
    pub(crate) async fn connect(mut tcp: TcpStream, host: &str) -> io::Result<Self> {
        let name = rustls::pki_types::ServerName::try_from(host.to_owned())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "invalid TLS server name"))?;
        let mut tls = rustls::ClientConnection::new(config(), name).map_err(io::Error::other)?;
        let mut scratch = vec![0u8; 16 * 1024].into_boxed_slice();
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
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the server closed during the TLS handshake"));
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
        Ok(Self { tcp, tls, out: Vec::new(), scratch, incoming: Vec::new() })
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
                let n = ready!(Pin::new(&mut this.tcp).poll_read(cx, &mut this.scratch))?;
                if n == 0 {
                    return Poll::Ready(Ok(0));
                }
                this.incoming.extend_from_slice(&this.scratch[..n]);
            }
            // rustls takes a bounded amount per call; the rest stays in `incoming` for the next
            // turn of this loop, after the plaintext it produced has been read out.
            let mut rest: &[u8] = &this.incoming;
            let taken = this.tls.read_tls(&mut rest)?;
            this.incoming.drain(..taken);
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

/// A socket the relay dialled: plain TCP or TLS.
pub(crate) enum ClientStream {
    /// `ws://`, `http://`.
    Plain(TcpStream),
    /// `wss://`, `https://`.
    Tls(Box<TlsStream>),
}

impl AsyncRead for ClientStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientStream {
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
