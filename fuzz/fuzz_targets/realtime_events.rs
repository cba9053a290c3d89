//! OpenAI Realtime server events (an upstream the relay dials, so untrusted text): `parse` never
//! panics; `append` of any bytes is JSON whose `audio` is the payload when it is base64 (else
//! empty); a pacer mark name gives back its item and offset; tool lists (an `--agent-tools` file,
//! an `/outbound-call` body's `tools`) and tools servers' answers parse within their bounds, and a
//! function call's output is always JSON carrying it.
#![no_main]

use arbitrary::Unstructured;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use libfuzzer_sys::fuzz_target;
use relay_engine::proto::realtime::{self, ServerEvent};
use relay_engine::proto::{tools, twilio};
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(ServerEvent::AudioDelta { delta, .. }) = realtime::parse(text) {
            // Deltas are forwarded as they are; their counting must not panic whatever they hold.
            let _ = twilio::base64_samples(&delta);
        }
    }

    // Any bytes as a caller payload: always JSON; kept only when base64.
    let v: Value = serde_json::from_str(&realtime::append(data)).expect("append is always JSON");
    assert_eq!(v["type"], "input_audio_buffer.append");
    if twilio::base64_samples(data).is_some() {
        assert_eq!(v["audio"].as_str().map(str::as_bytes), Some(data));
    }
    // Real base64 always round-trips.
    let payload = STANDARD.encode(data);
    let v: Value = serde_json::from_str(&realtime::append(payload.as_bytes())).expect("append is always JSON");
    assert_eq!(v["audio"].as_str(), Some(payload.as_str()));

    if let Ok(list) = tools::parse_tools_json(data) {
        assert!(list.len() <= tools::MAX_TOOLS);
        // What the session declares parses back to the same list (when the added `type` fields
        // leave it within the size bound).
        let declared = Value::Array(list.iter().map(tools::session_tool).collect());
        if declared.to_string().len() <= tools::MAX_TOOLS_BYTES {
            assert_eq!(tools::parse_tools(&declared).ok(), Some(list));
        }
    }
    if let Ok(answer) = tools::parse_answer(data) {
        assert!(answer.intent.is_none_or(|i| !i.is_empty() && i.len() <= tools::MAX_INTENT_BYTES));
    }
    let output = String::from_utf8_lossy(data);
    let v: Value = serde_json::from_str(&realtime::function_call_output("call", &output)).expect("output is JSON");
    assert_eq!(v["item"]["output"].as_str(), Some(output.as_ref()));

    let mut u = Unstructured::new(data);
    let item: String = u.arbitrary().unwrap_or_default();
    let ms: u64 = u.arbitrary().unwrap_or_default();
    assert_eq!(realtime::parse_mark(&realtime::mark_name(&item, ms)), Some((item.as_str(), ms)));
    let v: Value = serde_json::from_str(&realtime::truncate(&item, ms)).expect("truncate is JSON");
    assert_eq!((v["item_id"].as_str(), v["audio_end_ms"].as_u64()), (Some(item.as_str()), Some(ms)));
});
