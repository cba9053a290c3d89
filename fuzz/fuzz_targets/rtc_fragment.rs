//! WHIP/WHEP trickle-ICE fragments (`PATCH`): parsing any text never panics and stays within its
//! bounds; applying a parsed fragment to a live peer (trickle or ICE restart) never panics, and
//! the peer keeps an ICE session tag either way.
#![no_main]

use std::sync::OnceLock;
use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use relay_engine::rtc::sdpfrag::{IceFragment, MAX_CANDIDATES};
use relay_engine::rtc::{Certificate, Endpoint, Want};
use str0m::media::{Direction, MediaKind};
use str0m::Rtc;

fn cert() -> Certificate {
    static CERT: OnceLock<Certificate> = OnceLock::new();
    CERT.get_or_init(|| Certificate::generate().expect("a certificate")).clone()
}

/// One client offer, made once.
fn offer() -> &'static str {
    static OFFER: OnceLock<String> = OnceLock::new();
    OFFER.get_or_init(|| {
        let mut rtc = Rtc::new(Instant::now());
        let mut api = rtc.sdp_api();
        api.add_media(MediaKind::Audio, Direction::SendRecv, None, None, None);
        api.apply().expect("an offer").0.to_sdp_string()
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(fragment) = IceFragment::parse(text) else { return };
    assert!(fragment.candidates.len() <= MAX_CANDIDATES);
    assert!(fragment.candidates.iter().all(|c| c.starts_with("candidate:")));
    let mut ep = Endpoint::new(cert(), "127.0.0.1:40000".parse().expect("addr"), 4);
    let (peer, _, _) = ep.accept(Instant::now(), offer(), Want::Receive).expect("the offer is accepted");
    let _ = ep.handle_ice_fragment(Instant::now(), peer, &fragment);
    assert!(ep.ice_tag(peer).is_some(), "the peer keeps an ICE session");
});
