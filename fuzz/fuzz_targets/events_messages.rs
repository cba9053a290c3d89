//! `/ws` event-socket messages from clients: `parse_client` never panics; only JSON objects parse
//! (arrays did once: fuzz/artifacts-found/events_messages/); `Ping` exactly when the `type` is
//! `ping`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_engine::proto::events::{self, ClientMessage};
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(message) = events::parse_client(text) {
        // Ignored fields may hold what `Value` refuses (a number like 1e400): nothing to compare.
        let Ok(v) = serde_json::from_str::<Value>(text) else { return };
        assert!(v.is_object(), "only objects are client messages: {text:?}");
        assert_eq!(message == ClientMessage::Ping, v["type"] == "ping", "{text:?}");
    }
});
