//! `/frontend-stream` messages from browsers: `parse_client` never panics and keeps ids within
//! their bound; the relay's `audio` and `transcription` messages are JSON for any content.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_engine::proto::frontend::{self, ClientMessage, FrontendTrack, MAX_FIELD_BYTES};
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(ClientMessage::ConnectTwilio { call_sid, user_id }) = frontend::parse_client(&text) {
        assert!(call_sid.len() <= MAX_FIELD_BYTES && user_id.len() <= MAX_FIELD_BYTES);
    }
    let v: Value = serde_json::from_str(&frontend::transcription(&text)).expect("transcription is JSON");
    assert_eq!(v["text"].as_str(), Some(&*text));
    let v: Value = serde_json::from_str(&frontend::audio(data, FrontendTrack::Inbound)).expect("audio is JSON");
    assert_eq!(v["track"], "inbound");
});
