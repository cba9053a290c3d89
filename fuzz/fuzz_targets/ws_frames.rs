//! WebSocket frames from a client, split at fuzzer-chosen points: the codec never panics and never
//! yields a message over the configured limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_engine::config::Limits;
use relay_engine::proto::ws::{Incoming, WsCodec};

fuzz_target!(|data: &[u8]| {
    let limits = Limits { ws_max_frame_bytes: 1024, ws_max_message_bytes: 4096, ..Limits::default() };
    let mut codec = WsCodec::new_server(&limits, &[]);
    // The first byte picks the chunk size, so reassembly across reads is exercised.
    let chunk = usize::from(data.first().copied().unwrap_or(1)).max(1);
    for piece in data.get(1..).unwrap_or_default().chunks(chunk) {
        codec.handle_bytes(piece);
        loop {
            match codec.poll_incoming() {
                Ok(Some(Incoming::Text(t))) => assert!(t.len() <= limits.ws_max_message_bytes),
                Ok(Some(Incoming::Binary(b))) => assert!(b.len() <= limits.ws_max_message_bytes),
                Ok(Some(Incoming::Close)) | Err(_) => return,
                Ok(None) => break,
            }
        }
        let _ = codec.poll_transmit();
    }
});
