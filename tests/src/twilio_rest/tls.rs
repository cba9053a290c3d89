//! TLS for the stand-ins: a self-signed certificate for `localhost` and `127.0.0.1` (rcgen) with
//! its PEM in a temp file for `--upstream-ca-file`, the server side of a handshake (rustls), and a
//! TLS front that terminates `wss://` and hands the plaintext WebSocket to a plain server behind
//! it (a [`TwilioBot`](crate::telephony::TwilioBot)), so a `wss://` bot is the same tungstenite bot.
//!
//! Invariant: handshakes are bounded by [`TIMEOUT`]; a failed handshake is counted, never retried.

use std::io::{self, Read, Write};
use std::net::{Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::{temp_dir, TIMEOUT};

/// How long the front blocks reading one side before it looks at the other.
const PUMP_SLICE: Duration = Duration::from_millis(2);

/// Most plaintext the front gathers from its backend into one TLS flight, bytes.
const MAX_FLIGHT: usize = 64 * 1024;

/// Longest a fronted connection lives (a bound on its pump loop).
const MAX_LIFETIME: Duration = Duration::from_secs(120);

/// A self-signed certificate for `localhost` and `127.0.0.1`, its key, and its PEM in a temp file
/// (removed when dropped).
pub struct TestCert {
    cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
    dir: PathBuf,
    pem_file: PathBuf,
    key_file: PathBuf,
}

impl TestCert {
    /// Generates a fresh key pair and self-signed certificate with the subject alternative names
    /// `localhost` (DNS) and `127.0.0.1` (IP).
    ///
    /// # Panics
    /// When generation or writing the PEM file fails.
    pub fn localhost() -> Self {
        Self::with_names(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
    }

    /// As [`Self::localhost`], padded with `extra` more DNS names (`pad-<i>.relay-test.invalid`) so
    /// the certificate, and the server's handshake flight, grow past a few kilobytes as real
    /// chains do.
    pub fn localhost_padded(extra: usize) -> Self {
        let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        names.extend((0..extra).map(|i| format!("pad-{i:04}.relay-test.invalid")));
        Self::with_names(names)
    }

    /// A self-signed certificate for `names` (IP literals become IP addresses).
    ///
    /// # Panics
    /// When generation or writing the PEM file fails.
    pub fn with_names(names: Vec<String>) -> Self {
        let certified = rcgen::generate_simple_self_signed(names).expect("generate a self-signed certificate");
        let dir = temp_dir("tls");
        let pem_file = dir.join("ca.pem");
        std::fs::write(&pem_file, certified.cert.pem()).expect("write the certificate PEM");
        let key_file = dir.join("key.pem");
        std::fs::write(&key_file, certified.signing_key.serialize_pem()).expect("write the key PEM");
        Self {
            cert: certified.cert.der().clone(),
            key: PrivatePkcs8KeyDer::from(certified.signing_key.serialize_der()),
            dir,
            pem_file,
            key_file,
        }
    }

    /// The certificate's DER encoding.
    pub fn der(&self) -> &[u8] {
        &self.cert
    }

    /// The PEM file holding the certificate (what `--upstream-ca-file` names).
    pub fn pem_file(&self) -> &Path {
        &self.pem_file
    }

    /// The PEM file holding the private key (what `--tls-key` names).
    pub fn key_file(&self) -> &Path {
        &self.key_file
    }

    /// A rustls client configuration trusting only this certificate.
    ///
    /// # Panics
    /// When rustls rejects the certificate as a root.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert.clone()).expect("a usable root");
        Arc::new(rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth())
    }

    /// A TLS client connection to `addr` (named `localhost`) trusting this certificate.
    ///
    /// # Panics
    /// When the connection or handshake fails.
    pub fn connect(&self, addr: SocketAddr) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
        let tcp = TcpStream::connect(addr).expect("connect");
        tcp.set_read_timeout(Some(TIMEOUT)).expect("timeout");
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        let conn = rustls::ClientConnection::new(self.client_config(), name).expect("client");
        let mut stream = rustls::StreamOwned::new(conn, tcp);
        while stream.conn.is_handshaking() {
            stream.conn.complete_io(&mut stream.sock).expect("TLS handshake with the relay");
        }
        stream
    }

    /// A rustls server configuration presenting this certificate.
    ///
    /// # Panics
    /// When rustls rejects the key.
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        let key = PrivateKeyDer::Pkcs8(self.key.clone_key());
        let config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![self.cert.clone()], key)
            .expect("a valid certificate and key");
        Arc::new(config)
    }
}

impl Drop for TestCert {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Completes the server side of a TLS handshake on `tcp`; `None` when it fails (e.g. the client
/// does not trust the certificate and sends an alert) or stalls past [`TIMEOUT`].
pub fn accept(tcp: &mut TcpStream, config: Arc<rustls::ServerConfig>) -> Option<rustls::ServerConnection> {
    let _ = tcp.set_read_timeout(Some(TIMEOUT));
    let _ = tcp.set_write_timeout(Some(TIMEOUT));
    let mut conn = rustls::ServerConnection::new(config).ok()?;
    let deadline = Instant::now() + TIMEOUT;
    while conn.is_handshaking() {
        if Instant::now() >= deadline {
            return None;
        }
        match conn.complete_io(tcp) {
            Ok((0, 0)) if conn.is_handshaking() => return None,
            Ok(_) => {}
            Err(_) => {
                // Send our alert, if any, before giving up.
                let _ = conn.write_tls(tcp);
                return None;
            }
        }
    }
    Some(conn)
}

/// A TLS front on 127.0.0.1 (and `[::1]` on the same port when available): terminates TLS with a
/// [`TestCert`] and relays the plaintext, both ways, to `backend`. Stops accepting when dropped.
pub struct TlsFront {
    addr: SocketAddr,
    cert: TestCert,
    handshakes: Arc<AtomicUsize>,
    failures: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl TlsFront {
    /// Listens on 127.0.0.1:0 with a fresh [`TestCert`], fronting `backend`.
    pub fn start(backend: SocketAddr) -> Self {
        let cert = TestCert::localhost();
        let config = cert.server_config();
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the TLS front");
        let addr = listener.local_addr().expect("TLS front address");
        let handshakes = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut listeners = vec![listener];
        // `localhost` may resolve to ::1 first; serve it too when the port is free there.
        if let Ok(v6) = TcpListener::bind((Ipv6Addr::LOCALHOST, addr.port())) {
            listeners.push(v6);
        }
        for listener in listeners {
            let (config, ok, failed, stop) = (config.clone(), handshakes.clone(), failures.clone(), stop.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::Acquire) {
                        return;
                    }
                    let Ok(mut client) = stream else { continue };
                    let (config, ok, failed) = (config.clone(), ok.clone(), failed.clone());
                    std::thread::spawn(move || {
                        let Some(conn) = accept(&mut client, config) else {
                            failed.fetch_add(1, Ordering::AcqRel);
                            return;
                        };
                        ok.fetch_add(1, Ordering::AcqRel);
                        let Ok(backend) = TcpStream::connect_timeout(&backend, TIMEOUT) else { return };
                        pump(conn, client, backend);
                    });
                }
            });
        }
        Self { addr, cert, handshakes, failures, stop }
    }

    /// `wss://localhost:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("wss://localhost:{}{path}", self.addr.port())
    }

    /// The PEM file of the certificate it presents (for `--upstream-ca-file`).
    pub fn ca_file(&self) -> &Path {
        self.cert.pem_file()
    }

    /// TLS handshakes completed so far.
    pub fn handshakes(&self) -> usize {
        self.handshakes.load(Ordering::Acquire)
    }

    /// TLS handshakes that failed so far.
    pub fn failures(&self) -> usize {
        self.failures.load(Ordering::Acquire)
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the accept loops so they see the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
        let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, self.addr.port()));
        let _ = TcpStream::connect_timeout(&v6, Duration::from_millis(200));
    }
}

/// Relays plaintext between a TLS client and a plain backend until either side ends.
fn pump(mut conn: rustls::ServerConnection, mut client: TcpStream, mut backend: TcpStream) {
    conn.set_buffer_limit(None);
    let _ = client.set_read_timeout(Some(PUMP_SLICE));
    let _ = backend.set_read_timeout(Some(PUMP_SLICE));
    let _ = client.set_nodelay(true);
    let _ = backend.set_nodelay(true);
    let _ = backend.set_write_timeout(Some(TIMEOUT));
    let _ = client.set_write_timeout(Some(TIMEOUT));
    let mut buf = vec![0u8; 16 * 1024];
    let end = Instant::now() + MAX_LIFETIME;
    'pump: while Instant::now() < end {
        // Client → backend. The handshake may already have buffered plaintext (a request sent
        // right behind the client's Finished), so the reader is drained on every turn.
        match conn.read_tls(&mut client) {
            Ok(0) => break,
            Ok(_) => {
                if conn.process_new_packets().is_err() {
                    let _ = conn.write_tls(&mut client);
                    break;
                }
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
        loop {
            match conn.reader().read(&mut buf) {
                // close_notify: the client is done.
                Ok(0) => break 'pump,
                Ok(n) => {
                    if backend.write_all(&buf[..n]).is_err() {
                        break 'pump;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => break 'pump,
            }
        }
        // Backend → client: what the backend writes within one slice goes out as one TLS flight,
        // as a TLS-terminating proxy delivers a burst (up to [`MAX_FLIGHT`]).
        let mut flight = 0;
        while flight < MAX_FLIGHT {
            match backend.read(&mut buf) {
                Ok(0) => {
                    let _ = conn.writer().flush();
                    conn.send_close_notify();
                    while conn.wants_write() && conn.write_tls(&mut client).is_ok() {}
                    break 'pump;
                }
                Ok(n) => {
                    if conn.writer().write_all(&buf[..n]).is_err() {
                        break 'pump;
                    }
                    flight += n;
                }
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => break,
                Err(_) => break 'pump,
            }
        }
        while conn.wants_write() {
            if conn.write_tls(&mut client).is_err() {
                break 'pump;
            }
        }
    }
    let _ = backend.shutdown(std::net::Shutdown::Both);
    let _ = client.shutdown(std::net::Shutdown::Both);
}
