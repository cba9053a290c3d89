//! WHIP/WHEP SDP offers: accepting any text never panics; an accepted offer gives an answer that
//! names the endpoint's candidate.
#![no_main]

use std::sync::OnceLock;
use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use relay_engine::rtc::{Certificate, Endpoint, Want};

fn cert() -> Certificate {
    static CERT: OnceLock<Certificate> = OnceLock::new();
    CERT.get_or_init(|| Certificate::generate().expect("a certificate")).clone()
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut ep = Endpoint::new(cert(), "127.0.0.1:40000".parse().expect("addr"), 4);
    let want = if text.len() % 2 == 0 { Want::Receive } else { Want::Send };
    if let Ok((_, answer, _)) = ep.accept(Instant::now(), text, want) {
        assert!(answer.contains("127.0.0.1 40000"));
    }
});
