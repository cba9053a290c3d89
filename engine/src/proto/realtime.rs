//! The OpenAI Realtime protocol, as far as a telephony relay speaks it: μ-law in and out, audio
//! deltas, server VAD's `speech_started` (barge-in), truncation of what the caller did not hear,
//! and transcripts.
//!
//! Invariant: pure; parsing is total (unknown events are [`ServerEvent::Other`], malformed ones an
//! error); audio payloads stay base64 (μ-law at 8 kHz, as Twilio's), copied once out of the JSON.

use bytes::Bytes;
use serde_json::{json, Value};
use tungstenite::Utf8Bytes;

/// What the relay asks of the session when it connects: μ-law 8 kHz both ways (no transcoding),
/// server-side voice detection (its `speech_started` is the barge-in signal), transcripts of
/// the caller, and the functions the model may call (`tools`, each as
/// [`super::tools::session_tool`] builds it; none: no `tools` field).
pub fn session_update(tools: &[Value]) -> Utf8Bytes {
    let mut v = json!({
        "type": "session.update",
        "session": {
            "modalities": ["audio", "text"],
            "input_audio_format": "g711_ulaw",
            "output_audio_format": "g711_ulaw",
            "turn_detection": { "type": "server_vad" },
            "input_audio_transcription": { "model": "whisper-1" },
        },
    });
    if !tools.is_empty() {
        v["session"]["tools"] = Value::Array(tools.to_vec());
        v["session"]["tool_choice"] = Value::from("auto");
    }
    Utf8Bytes::from(v.to_string())
}

/// A function call's result for the model: a `function_call_output` item in the conversation.
/// [`response_create`] must follow for the model to answer with it.
pub fn function_call_output(call_id: &str, output: &str) -> Utf8Bytes {
    let v = json!({
        "type": "conversation.item.create",
        "item": { "type": "function_call_output", "call_id": call_id, "output": output },
    });
    Utf8Bytes::from(v.to_string())
}

/// Asks the model for a response (after a function call's output).
pub fn response_create() -> Utf8Bytes {
    Utf8Bytes::from_static(r#"{"type":"response.create"}"#)
}

/// Caller audio: base64 μ-law, appended to the input buffer.
pub fn append(payload: &[u8]) -> Utf8Bytes {
    let mut s = String::with_capacity(payload.len() + 48);
    s.push_str(r#"{"type":"input_audio_buffer.append","audio":""#);
    // Base64 needs no JSON escaping; anything else would not be base64 and is left out.
    if payload.iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=')) {
        s.push_str(std::str::from_utf8(payload).unwrap_or_default());
    }
    s.push_str(r#""}"#);
    Utf8Bytes::from(s)
}

/// Tells the model the caller heard only the first `audio_end_ms` of `item_id` (after a barge-in),
/// so its context matches what was really said.
pub fn truncate(item_id: &str, audio_end_ms: u64) -> Utf8Bytes {
    let v = json!({ "type": "conversation.item.truncate", "item_id": item_id, "content_index": 0, "audio_end_ms": audio_end_ms });
    Utf8Bytes::from(v.to_string())
}

/// An event from the Realtime server that the relay acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerEvent {
    /// `response.audio.delta`: base64 μ-law of the assistant item `item_id`.
    AudioDelta {
        /// The conversation item the audio belongs to.
        item_id: String,
        /// Base64 μ-law.
        delta: Bytes,
    },
    /// `input_audio_buffer.speech_started`: the caller started talking (barge-in).
    SpeechStarted,
    /// `conversation.item.input_audio_transcription.completed`: what the caller said.
    CallerTranscript(String),
    /// `response.audio_transcript.done`: what the assistant said.
    AgentTranscript(String),
    /// The model finished a call of function `name`: `response.function_call_arguments.done`
    /// (GA; the beta's lacks `name` and is ignored) or `response.output_item.done` with a
    /// completed `function_call` item (both shapes). GA servers send both for one call: the core
    /// runs each `call_id` once. (`response.done` repeats them too and is not read.)
    FunctionCall {
        /// The call's id, for its `function_call_output`.
        call_id: String,
        /// The function.
        name: String,
        /// Its arguments, as the model wrote them: JSON text.
        arguments: String,
    },
    /// `error`: the server's message.
    Error(String),
    /// Anything else (session.created, rate limits, partial transcripts, …).
    Other,
}

/// Why a server message could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Not a JSON object with a `type`.
    #[error("not a Realtime event")]
    NotAnEvent,
    /// A known event without its required field.
    #[error("{0} without {1}")]
    Missing(&'static str, &'static str),
}

/// Parses one text message from the server.
///
/// # Errors
/// [`ParseError`] for anything that is not a JSON event, or a known event missing its fields.
pub fn parse(text: &str) -> Result<ServerEvent, ParseError> {
    let v: Value = serde_json::from_str(text).map_err(|_| ParseError::NotAnEvent)?;
    let kind = v.get("type").and_then(Value::as_str).ok_or(ParseError::NotAnEvent)?;
    let string = |field: &'static str, event: &'static str| {
        v.get(field).and_then(Value::as_str).map(str::to_owned).ok_or(ParseError::Missing(event, field))
    };
    Ok(match kind {
        "response.audio.delta" | "response.output_audio.delta" => {
            let delta = string("delta", "response.audio.delta")?;
            let item_id = v.get("item_id").and_then(Value::as_str).unwrap_or_default().to_owned();
            ServerEvent::AudioDelta { item_id, delta: Bytes::from(delta) }
        }
        "input_audio_buffer.speech_started" => ServerEvent::SpeechStarted,
        "conversation.item.input_audio_transcription.completed" => {
            ServerEvent::CallerTranscript(string("transcript", "input_audio_transcription.completed")?)
        }
        "response.audio_transcript.done" | "response.output_audio_transcript.done" => {
            ServerEvent::AgentTranscript(string("transcript", "response.audio_transcript.done")?)
        }
        "response.function_call_arguments.done" if v.get("name").is_some() => ServerEvent::FunctionCall {
            call_id: string("call_id", "response.function_call_arguments.done")?,
            name: string("name", "response.function_call_arguments.done")?,
            arguments: string("arguments", "response.function_call_arguments.done")?,
        },
        "response.output_item.done" => function_call_item(v.get("item")).unwrap_or(ServerEvent::Other),
        "error" => ServerEvent::Error(
            v.pointer("/error/message").and_then(Value::as_str).unwrap_or("error without a message").to_owned(),
        ),
        _ => ServerEvent::Other,
    })
}

/// A finished `function_call` item (`response.output_item.done`) as a call; `None` for other
/// items and for calls an interrupted response left incomplete.
fn function_call_item(item: Option<&Value>) -> Option<ServerEvent> {
    let item = item?;
    if item.get("type")? != "function_call" || item.get("status").is_some_and(|s| s != "completed") {
        return None;
    }
    let field = |name: &str| item.get(name).and_then(Value::as_str).map(str::to_owned);
    Some(ServerEvent::FunctionCall { call_id: field("call_id")?, name: field("name")?, arguments: field("arguments")? })
}

/// The name of the pacer mark placed after each audio delta: the item and how far into it (ms) the
/// caller has heard once the mark plays.
pub fn mark_name(item_id: &str, end_ms: u64) -> String {
    format!("rt\u{1f}{item_id}\u{1f}{end_ms}")
}

/// The item and offset of a mark made by [`mark_name`].
pub fn parse_mark(name: &str) -> Option<(&str, u64)> {
    let rest = name.strip_prefix("rt\u{1f}")?;
    let (item, ms) = rest.rsplit_once('\u{1f}')?;
    Some((item, ms.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builders produce the documented shapes.
    #[test]
    fn builders() {
        let v: Value = serde_json::from_str(&session_update(&[])).expect("json");
        assert_eq!(v["session"]["input_audio_format"], "g711_ulaw");
        assert_eq!(v["session"]["output_audio_format"], "g711_ulaw");
        assert!(v["session"].get("tools").is_none(), "no tools, no field");
        let v: Value = serde_json::from_str(&append(b"AAEC/w==")).expect("json");
        assert_eq!(v, json!({"type": "input_audio_buffer.append", "audio": "AAEC/w=="}));
        let v: Value = serde_json::from_str(&append(b"\"}injected")).expect("json");
        assert_eq!(v["audio"], "", "non-base64 never reaches the JSON");
        let v: Value = serde_json::from_str(&truncate("item_1", 480)).expect("json");
        assert_eq!(v["item_id"], "item_1");
        assert_eq!(v["audio_end_ms"], 480);
        assert_eq!(parse_mark(&mark_name("item_1", 480)), Some(("item_1", 480)));
        assert_eq!(parse_mark("user-mark"), None);
    }

    /// Tools go into the session with `tool_choice: auto`; a call's output is an item, then a
    /// response is asked for.
    #[test]
    fn tool_builders() {
        let tool = json!({"type": "function", "name": "f", "description": "", "parameters": {}});
        let v: Value = serde_json::from_str(&session_update(std::slice::from_ref(&tool))).expect("json");
        assert_eq!(v["session"]["tools"], json!([tool]));
        assert_eq!(v["session"]["tool_choice"], "auto");
        let v: Value = serde_json::from_str(&function_call_output("call_1", "{\"ok\":true}")).expect("json");
        assert_eq!(
            v,
            json!({"type": "conversation.item.create",
                   "item": {"type": "function_call_output", "call_id": "call_1", "output": "{\"ok\":true}"}})
        );
        let v: Value = serde_json::from_str(&response_create()).expect("json");
        assert_eq!(v, json!({"type": "response.create"}));
    }

    /// A finished function call is read from `response.function_call_arguments.done`; one
    /// without its fields is an error.
    #[test]
    fn function_call_event() {
        let done = r#"{"type":"response.function_call_arguments.done","response_id":"r","item_id":"i",
                       "output_index":0,"call_id":"call_1","name":"book","arguments":"{\"n\":2}"}"#;
        assert_eq!(
            parse(done),
            Ok(ServerEvent::FunctionCall {
                call_id: "call_1".into(),
                name: "book".into(),
                arguments: r#"{"n":2}"#.into()
            })
        );
        // The beta's event has no name: the item that follows carries the call.
        assert_eq!(
            parse(r#"{"type":"response.function_call_arguments.done","call_id":"c","arguments":"{}"}"#),
            Ok(ServerEvent::Other)
        );
        assert_eq!(
            parse(r#"{"type":"response.function_call_arguments.done","call_id":"c","name":"f"}"#),
            Err(ParseError::Missing("response.function_call_arguments.done", "arguments"))
        );
        let item = |status: &str| {
            format!(
                r#"{{"type":"response.output_item.done","response_id":"r","output_index":0,"item":{{"id":"i",
                   "type":"function_call","status":"{status}","call_id":"c","name":"f","arguments":"{{}}"}}}}"#
            )
        };
        assert_eq!(
            parse(&item("completed")),
            Ok(ServerEvent::FunctionCall { call_id: "c".into(), name: "f".into(), arguments: "{}".into() })
        );
        assert_eq!(parse(&item("incomplete")), Ok(ServerEvent::Other), "an interrupted call is not run");
        let message = r#"{"type":"response.output_item.done","item":{"type":"message","status":"completed"}}"#;
        assert_eq!(parse(message), Ok(ServerEvent::Other));
    }

    /// Server events are recognised; others pass; malformed ones are errors.
    #[test]
    fn server_events() {
        let delta = r#"{"type":"response.audio.delta","item_id":"i1","delta":"AAA="}"#;
        assert_eq!(parse(delta), Ok(ServerEvent::AudioDelta { item_id: "i1".into(), delta: Bytes::from("AAA=") }));
        assert_eq!(parse(r#"{"type":"input_audio_buffer.speech_started"}"#), Ok(ServerEvent::SpeechStarted));
        assert_eq!(
            parse(r#"{"type":"conversation.item.input_audio_transcription.completed","transcript":"hi"}"#),
            Ok(ServerEvent::CallerTranscript("hi".into()))
        );
        assert_eq!(
            parse(r#"{"type":"response.audio_transcript.done","transcript":"hello"}"#),
            Ok(ServerEvent::AgentTranscript("hello".into()))
        );
        assert_eq!(parse(r#"{"type":"error","error":{"message":"bad"}}"#), Ok(ServerEvent::Error("bad".into())));
        assert_eq!(parse(r#"{"type":"session.created"}"#), Ok(ServerEvent::Other));
        assert_eq!(parse("[]"), Err(ParseError::NotAnEvent));
        assert_eq!(
            parse(r#"{"type":"response.audio.delta"}"#),
            Err(ParseError::Missing("response.audio.delta", "delta"))
        );
    }
}
