//! Datagrams reaching a core's WebRTC socket from anywhere, with one real peer waiting: the
//! demultiplexer (STUN ufrag, then address) and the peer's input never panic.
#![no_main]

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use relay_engine::rtc::{stun, Certificate, Endpoint, Want};

/// A browser-like offer (one Opus audio section), made once by a str0m client.
fn offer() -> &'static str {
    static OFFER: OnceLock<String> = OnceLock::new();
    OFFER.get_or_init(|| {
        let mut rtc = str0m::Rtc::builder().build(Instant::now());
        let addr: SocketAddr = "127.0.0.1:50000".parse().expect("addr");
        rtc.add_local_candidate(str0m::Candidate::host(addr, "udp").expect("candidate"));
        let mut api = rtc.sdp_api();
        api.add_media(str0m::media::MediaKind::Audio, str0m::media::Direction::SendRecv, None, None, None);
        api.apply().expect("an offer").0.to_sdp_string()
    })
}

fn cert() -> Certificate {
    static CERT: OnceLock<Certificate> = OnceLock::new();
    CERT.get_or_init(|| Certificate::generate().expect("a certificate")).clone()
}

fuzz_target!(|data: &[u8]| {
    let mut ep = Endpoint::new(cert(), "127.0.0.1:40000".parse().expect("addr"), 4);
    let mut now = Instant::now();
    assert!(ep.accept(now, offer(), Want::Receive).is_ok());
    // Each datagram: a length byte, a source port byte, then the bytes.
    let mut rest = data;
    while rest.len() >= 2 {
        let (len, port) = (usize::from(rest[0]), u16::from(rest[1]));
        let body = &rest[2..];
        let n = len.min(body.len());
        let source = SocketAddr::from(([127, 0, 0, 1], 50_000 + port));
        let _ = stun::request_ufrag(&body[..n]);
        ep.handle_datagram(now, source, &body[..n]);
        while ep.poll_transmit().is_some() {}
        while ep.poll_event().is_some() {}
        now += Duration::from_millis(u64::from(rest[1]));
        ep.handle_timeout(now);
        rest = &body[n..];
    }
});
