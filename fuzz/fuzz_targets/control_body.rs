//! Control-API JSON bodies and query strings: parsing and id validation never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_control::api::params::{query, query_session, Body};

fuzz_target!(|data: &[u8]| {
    if let Ok(body) = Body::parse(data) {
        let _ = body.session_id();
        let _ = body.string("accessToken");
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = query(Some(text), "sessionId");
        let _ = query_session(Some(text), "sessionId");
    }
});
