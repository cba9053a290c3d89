//! HTTP request heads: never panics; a complete head's length is within the input and the limit;
//! the headers recovered for an error answer are at most the one `Origin`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_engine::config::Limits;
use relay_engine::proto::http::{error_context, parse_head, Parse};

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    if let Ok(Parse::Complete { head, head_len }) = parse_head(data, &limits) {
        assert!(head_len <= data.len());
        assert!(head_len <= limits.max_head_bytes);
        assert!(head.content_length <= limits.max_body_bytes);
    }
    assert!(error_context(data).len() <= 1);
});
