//! WebSocket frames from a client, split at fuzzer-chosen points: the codec never panics and never
//! yields a message over the configured limit. Round trips: text the relay sends as a server
//! reaches a client codec unchanged, and text it sends as a client (masked) reaches a server codec
//! unchanged, each delivered in fuzzer-sized pieces.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_engine::config::Limits;
use relay_engine::proto::ws::{Incoming, Utf8Bytes, WsCodec};

fuzz_target!(|data: &[u8]| {
    let limits = Limits { ws_max_frame_bytes: 1024, ws_max_message_bytes: 4096, ..Limits::default() };
    // The first byte picks the chunk size, so reassembly across reads is exercised.
    let chunk = usize::from(data.first().copied().unwrap_or(1)).max(1);
    let rest = data.get(1..).unwrap_or_default();

    let mut codec = WsCodec::new_server(&limits, &[]);
    'frames: for piece in rest.chunks(chunk) {
        codec.handle_bytes(piece);
        loop {
            match codec.poll_incoming() {
                Ok(Some(Incoming::Text(t))) => assert!(t.len() <= limits.ws_max_message_bytes),
                Ok(Some(Incoming::Binary(b))) => assert!(b.len() <= limits.ws_max_message_bytes),
                Ok(Some(Incoming::Close)) | Err(_) => break 'frames,
                Ok(None) => break,
            }
        }
        let _ = codec.poll_transmit();
    }

    // The same bytes as a message (UTF-8 repaired, cut to the frame limit), both ways.
    let text = String::from_utf8_lossy(rest);
    let mut end = text.len().min(limits.ws_max_frame_bytes);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let text = &text[..end];
    for (mut sender, mut receiver) in [
        (WsCodec::new_server(&limits, &[]), WsCodec::new_client(&limits, &[])),
        (WsCodec::new_client(&limits, &[]), WsCodec::new_server(&limits, &[])),
    ] {
        sender.send_text(Utf8Bytes::from(text)).expect("an open codec takes a message within the limits");
        let wire = sender.poll_transmit().expect("a queued message is transmitted");
        let mut got = None;
        for piece in wire.chunks(chunk) {
            receiver.handle_bytes(piece);
            if let Some(message) = receiver.poll_incoming().expect("the codec's own frames are valid") {
                got = Some(message);
            }
        }
        match got {
            Some(Incoming::Text(t)) => assert_eq!(t.as_str(), text, "the message arrives unchanged"),
            other => {
                panic!("expected the text back, got {}", if other.is_some() { "another message" } else { "nothing" })
            }
        }
    }
});
