//! Each core's WebRTC socket: bound at start, then read by `udp_task` and written from `drive`.
//!
//! Invariant: the only UDP socket code; everything about peers is `crate::rtc`'s, behind `CoreState`.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::{FromRawFd, IntoRawFd};
use std::rc::Rc;

use super::core_task::CoreShared;
use super::StartError;
use crate::config::RtcSettings;
use crate::rtc::Certificate;

/// What one core needs to serve WebRTC.
pub(crate) struct CoreRtc {
    /// Its UDP socket (non-blocking).
    pub(crate) socket: UdpSocket,
    /// Its address as candidates name it.
    pub(crate) candidate: SocketAddr,
    /// The process's DTLS certificate.
    pub(crate) cert: Certificate,
    /// Codec and playout settings.
    pub(crate) settings: RtcSettings,
}

/// Largest datagram read; WebRTC keeps below ~1200 bytes, the rest is headroom.
const MAX_DATAGRAM: usize = 2048;

/// Binds core `i`'s socket on `listen_ip`, port `port_base + i` (any port when the base is 0).
///
/// # Errors
/// [`StartError::Rtc`] when a port is taken or the candidate address would be unusable.
pub(crate) fn bind(settings: &RtcSettings, listen_ip: IpAddr, cores: usize) -> Result<Vec<CoreRtc>, StartError> {
    let cert = Certificate::generate().map_err(|e| StartError::Rtc(e.to_string()))?;
    let public = settings.public_ip.unwrap_or(listen_ip);
    if public.is_unspecified() {
        return Err(StartError::Rtc(format!(
            "ICE candidates need a reachable address, and the listen address is {listen_ip}: set --public-ip"
        )));
    }
    (0..cores)
        .map(|i| {
            let port = match settings.port_base {
                0 => 0,
                base => u16::try_from(usize::from(base) + i)
                    .map_err(|_| StartError::Rtc(format!("--rtc-port-base {base} + core {i} passes port 65535")))?,
            };
            let addr = SocketAddr::new(listen_ip, port);
            let socket = UdpSocket::bind(addr).map_err(|e| StartError::Rtc(format!("cannot bind UDP {addr}: {e}")))?;
            socket.set_nonblocking(true).map_err(|e| StartError::Rtc(e.to_string()))?;
            let bound = socket.local_addr().map_err(|e| StartError::Rtc(e.to_string()))?;
            Ok(CoreRtc {
                socket,
                candidate: SocketAddr::new(public, bound.port()),
                cert: cert.clone(),
                settings: settings.clone(),
            })
        })
        .collect()
}

/// Reads the core's WebRTC socket and feeds every datagram to the core state.
pub(crate) async fn udp_task(shared: Rc<CoreShared>, socket: &UdpSocket) {
    let fd = match socket.try_clone() {
        Ok(s) => s.into_raw_fd(),
        Err(e) => {
            tracing::error!(core = shared.id.0, "WebRTC socket unusable: {e}");
            return;
        }
    };
    // SAFETY: `fd` is a fresh duplicate owned by nothing else; glommio takes ownership of it.
    let socket = unsafe { glommio::net::UdpSocket::from_raw_fd(fd) };
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        match socket.recv_from(&mut buf).await {
            Ok((n, source)) => {
                let now = shared.now();
                let data = &buf[..n];
                shared.drive(None, |state| state.handle_datagram(now, source, data));
            }
            Err(e) => {
                if shared.shutting_down.get() {
                    return;
                }
                tracing::debug!(core = shared.id.0, "WebRTC socket read failed: {e}");
            }
        }
    }
}
