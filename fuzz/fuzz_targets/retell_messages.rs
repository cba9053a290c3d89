//! Retell custom-LLM messages (`/llm-websocket/{call_id}`): `parse` never panics; the scripted
//! responder answers any parsed transcript, as reply or reminder, with chunks that join into a
//! non-empty answer; every answer written is JSON carrying its turn's id.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_engine::proto::retell::{self, Request, Utterance};
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match retell::parse(text) {
        Ok(Request::Respond { response_id, transcript, reminder }) => {
            answer(&transcript, reminder, response_id);
            answer(&transcript, !reminder, response_id);
        }
        Ok(Request::UpdateOnly(transcript)) => answer(&transcript, false, 0),
        Ok(Request::Config { response_id }) => {
            let v: Value = serde_json::from_str(&retell::config(response_id)).expect("config is JSON");
            assert_eq!(v["response_id"].as_u64(), response_id);
        }
        Ok(Request::PingPong { timestamp, response_id }) => {
            let v: Value = serde_json::from_str(&retell::pong(timestamp, response_id, 7)).expect("pong is JSON");
            assert_eq!(v["timestamp"].as_u64(), Some(timestamp.unwrap_or(7)));
        }
        Ok(Request::CallDetails(_)) | Err(_) => {}
    }
});

fn answer(transcript: &[Utterance], reminder: bool, response_id: u64) {
    let (chunks, _end_call) = retell::scripted_answer(transcript, reminder);
    assert!(!chunks.concat().is_empty(), "an empty answer to {transcript:?}");
    let last = chunks.len() - 1;
    for (i, chunk) in chunks.iter().enumerate() {
        let v: Value = serde_json::from_str(&retell::response(response_id, chunk, i == last, false)).expect("JSON");
        assert_eq!((v["response_id"].as_u64(), v["content"].as_str()), (Some(response_id), Some(chunk.as_str())));
    }
}
