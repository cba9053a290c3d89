//! Each core's WebRTC socket: bound at start, then read by `udp_task` and written from `drive`.
//!
//! Invariant: the only UDP socket code; everything about peers is `crate::rtc`'s, behind `CoreState`.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::{FromRawFd, IntoRawFd};
use std::rc::Rc;

use super::shared::CoreShared;
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
/// What went wrong (`start` reports it as `StartError::Rtc`) when a port is taken or the
/// candidate address would be unusable.
pub(crate) fn bind(settings: &RtcSettings, listen_ip: IpAddr, cores: usize) -> Result<Vec<CoreRtc>, String> {
    let cert = Certificate::generate().map_err(|e| e.to_string())?;
    let public = match settings.public_ip {
        Some(ip) => ip,
        None if !listen_ip.is_unspecified() => listen_ip,
        // Listening everywhere: candidates name the address of the interface that has the default
        // route, as a browser would see it on a LAN; deployments behind NAT set --public-ip.
        None => default_route_ip(listen_ip.is_ipv6()).ok_or_else(|| {
            format!(
                "listening on {listen_ip} and no interface address was found for ICE candidates: set --public-ip (or --disable-webrtc)"
            )
        })?,
    };
    if public.is_unspecified() {
        return Err("--public-ip must be a reachable address, not 0.0.0.0 or ::".to_owned());
    }
    (0..cores)
        .map(|i| {
            let port = match settings.port_base {
                0 => 0,
                base => u16::try_from(usize::from(base) + i)
                    .map_err(|_| format!("--rtc-port-base {base} + core {i} passes port 65535"))?,
            };
            let addr = SocketAddr::new(listen_ip, port);
            let socket = UdpSocket::bind(addr).map_err(|e| format!("cannot bind UDP {addr}: {e}"))?;
            socket.set_nonblocking(true).map_err(|e| e.to_string())?;
            let bound = socket.local_addr().map_err(|e| e.to_string())?;
            Ok(CoreRtc {
                socket,
                candidate: SocketAddr::new(public, bound.port()),
                cert: cert.clone(),
                settings: settings.clone(),
            })
        })
        .collect()
}

/// The local address of the interface holding the default route, found by connecting a UDP
/// socket to a documentation address (a UDP connect sends nothing).
fn default_route_ip(v6: bool) -> Option<IpAddr> {
    let (bind, probe) = if v6 { ("[::]:0", "[2001:db8::1]:9") } else { ("0.0.0.0:0", "192.0.2.1:9") };
    let socket = UdpSocket::bind(bind).ok()?;
    socket.connect(probe).ok()?;
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_unspecified()).then_some(ip)
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

/// Keeps the core's endpoint stocked with prepared peers, built on the blocking pool so that
/// building one (about a millisecond) never stalls the core's calls.
pub(crate) async fn spares_task(shared: Rc<CoreShared>) {
    const CHECK: std::time::Duration = std::time::Duration::from_millis(50);
    loop {
        if shared.shutting_down.get() {
            return;
        }
        let wanted = shared.drive(None, |state| state.wants_spare_peer()).flatten();
        match wanted {
            Some(cert) => {
                let now = shared.now().instant;
                let spare = glommio::executor().spawn_blocking(move || crate::rtc::Prepared::new(&cert, now)).await;
                shared.drive(None, |state| state.add_spare_peer(spare));
            }
            None => glommio::timer::sleep(CHECK).await,
        }
    }
}
