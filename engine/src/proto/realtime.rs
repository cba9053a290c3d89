//! The OpenAI Realtime protocol, as far as a telephony relay speaks it: the session's configuration
//! in the GA or the retired beta shape, μ-law in and out, a scripted greeting, audio deltas,
//! server VAD's `speech_started` (barge-in), truncation of what the caller did not hear,
//! transcripts, and errors (which of them are fatal).
//!
//! Invariant: pure; parsing is total (unknown events are [`ServerEvent::Other`], malformed ones an
//! error); audio payloads stay base64 (μ-law at 8 kHz, as Twilio's), copied once out of the JSON.

use bytes::Bytes;
use serde_json::{json, Value};
use tungstenite::Utf8Bytes;

/// Which interface of the Realtime API a server speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ApiShape {
    /// The generally available interface (OpenAI's current one): `session.type = "realtime"`,
    /// audio settings under `session.audio.{input,output}`, no `OpenAI-Beta` header.
    #[default]
    Ga,
    /// The retired beta interface, for providers that still speak it: `OpenAI-Beta: realtime=v1`
    /// on the upgrade, `input_audio_format`/`output_audio_format` at the top of the session.
    Beta,
}

impl ApiShape {
    /// The extra upgrade header this shape needs (name, value), if any.
    pub fn upgrade_header(self) -> Option<(&'static str, &'static str)> {
        match self {
            Self::Ga => None,
            Self::Beta => Some(("OpenAI-Beta", "realtime=v1")),
        }
    }
}

/// The transcription model asked for the caller's speech (both shapes accept it).
pub const TRANSCRIPTION_MODEL: &str = "whisper-1";

/// What one call's Realtime session is configured with.
#[derive(Debug, Clone, Copy, Default)]
pub struct SessionConfig<'a> {
    /// The interface the server speaks.
    pub shape: ApiShape,
    /// The call's briefing (the system prompt); `None` keeps the server's default.
    pub instructions: Option<&'a str>,
    /// The voice the model speaks with; `None` keeps the server's default.
    pub voice: Option<&'a str>,
    /// Function tools (`{"type":"function","name",…}`) the model may call; empty: none declared.
    pub tools: &'a [Value],
}

/// What the relay asks of the session when it connects: μ-law 8 kHz both ways (no transcoding),
/// server-side voice detection (its `speech_started` is the barge-in signal), transcripts of
/// the caller, and the call's briefing, in the interface `config.shape` names.
pub fn session_update(config: &SessionConfig<'_>) -> Utf8Bytes {
    let mut session = match config.shape {
        ApiShape::Ga => json!({
            "type": "realtime",
            // Audio, with its transcript: GA takes one output modality, not both.
            "output_modalities": ["audio"],
            "audio": {
                "input": {
                    "format": { "type": "audio/pcmu" },
                    "transcription": { "model": TRANSCRIPTION_MODEL },
                    "turn_detection": { "type": "server_vad" },
                },
                "output": { "format": { "type": "audio/pcmu" } },
            },
        }),
        ApiShape::Beta => json!({
            "modalities": ["audio", "text"],
            "input_audio_format": "g711_ulaw",
            "output_audio_format": "g711_ulaw",
            "turn_detection": { "type": "server_vad" },
            "input_audio_transcription": { "model": TRANSCRIPTION_MODEL },
        }),
    };
    if let Some(instructions) = config.instructions {
        session["instructions"] = json!(instructions);
    }
    if let Some(voice) = config.voice {
        match config.shape {
            ApiShape::Ga => session["audio"]["output"]["voice"] = json!(voice),
            ApiShape::Beta => session["voice"] = json!(voice),
        }
    }
    if !config.tools.is_empty() {
        session["tools"] = json!(config.tools);
        session["tool_choice"] = json!("auto");
    }
    Utf8Bytes::from(json!({ "type": "session.update", "session": session }).to_string())
}

/// Asks the model to speak `first_message` now, word for word: a `response.create` whose
/// instructions (which override the session's for this response only) say so. This is how the
/// Realtime guide has a session speak first; the same event in both shapes.
pub fn greeting(first_message: &str) -> Utf8Bytes {
    let instructions = format!(
        "Greet the person on the call by saying exactly the following, word for word, and nothing else: {first_message}"
    );
    Utf8Bytes::from(json!({ "type": "response.create", "response": { "instructions": instructions } }).to_string())
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
    /// `error`: something the server refused or failed at.
    Error(ServerError),
    /// Anything else (session.created, rate limits, partial transcripts, …).
    Other,
}

/// The `error` object of an `error` event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerError {
    /// `error.type`, e.g. `invalid_request_error` (empty when absent).
    pub kind: String,
    /// `error.code`, e.g. `beta_api_shape_disabled`, `invalid_api_key` (empty when absent).
    pub code: String,
    /// `error.message`.
    pub message: String,
}

/// Error codes after which the session is of no further use: the server refused the session
/// (wrong interface, key, model, quota) or ended it. Every other error (an invalid client event,
/// a truncate past the audio, a response already in progress, a rate limit) leaves the session
/// usable and is only reported.
pub const FATAL_ERROR_CODES: [&str; 7] = [
    "beta_api_shape_disabled",
    "invalid_api_key",
    "insufficient_quota",
    "model_not_found",
    "session_expired",
    "session_not_found",
    "unsupported_model",
];

/// Error types that are fatal whatever their code: the server does not accept the caller.
pub const FATAL_ERROR_TYPES: [&str; 2] = ["authentication_error", "permission_error"];

impl ServerError {
    /// Whether the session is unusable after this error (see [`FATAL_ERROR_CODES`]): the relay
    /// then ends the call's agent leg, and only that.
    pub fn is_fatal(&self) -> bool {
        FATAL_ERROR_CODES.contains(&self.code.as_str()) || FATAL_ERROR_TYPES.contains(&self.kind.as_str())
    }
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
        "error" => {
            // Fields are bounded: the text reaches logs and every `/ws` listener.
            let field = |name: &str, limit: usize| {
                let s = v.pointer(&format!("/error/{name}")).and_then(Value::as_str).unwrap_or_default();
                let mut end = s.len().min(limit);
                while !s.is_char_boundary(end) {
                    end -= 1;
                }
                s[..end].to_owned()
            };
            let message = field("message", MAX_ERROR_MESSAGE_BYTES);
            ServerEvent::Error(ServerError {
                kind: field("type", MAX_ERROR_LABEL_BYTES),
                code: field("code", MAX_ERROR_LABEL_BYTES),
                message: if message.is_empty() { "error without a message".to_owned() } else { message },
            })
        }
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

/// Longest `error.message` kept, bytes.
const MAX_ERROR_MESSAGE_BYTES: usize = 1024;
/// Longest `error.type` or `error.code` kept, bytes.
const MAX_ERROR_LABEL_BYTES: usize = 64;

#[cfg(test)]
mod tests {
    use super::*;

    /// Builders produce the documented shapes.
    #[test]
    fn builders() {
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
        let config = SessionConfig { tools: std::slice::from_ref(&tool), ..SessionConfig::default() };
        let v: Value = serde_json::from_str(&session_update(&config)).expect("json");
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

    /// Server events are recognised under both namings (GA and beta); others pass; malformed ones
    /// are errors.
    #[test]
    fn server_events() {
        let delta = r#"{"type":"response.audio.delta","item_id":"i1","delta":"AAA="}"#;
        assert_eq!(parse(delta), Ok(ServerEvent::AudioDelta { item_id: "i1".into(), delta: Bytes::from("AAA=") }));
        let ga = r#"{"type":"response.output_audio.delta","event_id":"e","response_id":"r","item_id":"i2","output_index":0,"content_index":0,"delta":"AAA="}"#;
        assert_eq!(parse(ga), Ok(ServerEvent::AudioDelta { item_id: "i2".into(), delta: Bytes::from("AAA=") }));
        assert_eq!(
            parse(r#"{"type":"response.output_audio_transcript.done","item_id":"i2","transcript":"hi"}"#),
            Ok(ServerEvent::AgentTranscript("hi".into()))
        );
        assert_eq!(parse(r#"{"type":"session.updated","session":{"type":"realtime"}}"#), Ok(ServerEvent::Other));
        assert_eq!(parse(r#"{"type":"input_audio_buffer.speech_started"}"#), Ok(ServerEvent::SpeechStarted));
        assert_eq!(
            parse(r#"{"type":"conversation.item.input_audio_transcription.completed","transcript":"hi"}"#),
            Ok(ServerEvent::CallerTranscript("hi".into()))
        );
        assert_eq!(
            parse(r#"{"type":"response.audio_transcript.done","transcript":"hello"}"#),
            Ok(ServerEvent::AgentTranscript("hello".into()))
        );
        let error = |kind: &str, code: &str, message: &str| {
            ServerEvent::Error(ServerError { kind: kind.into(), code: code.into(), message: message.into() })
        };
        assert_eq!(parse(r#"{"type":"error","error":{"message":"bad"}}"#), Ok(error("", "", "bad")));
        let refused = r#"{"type":"error","event_id":"e1","error":{"type":"invalid_request_error","code":"beta_api_shape_disabled","message":"gone","param":null,"event_id":null}}"#;
        assert_eq!(parse(refused), Ok(error("invalid_request_error", "beta_api_shape_disabled", "gone")));
        assert_eq!(parse(r#"{"type":"error"}"#), Ok(error("", "", "error without a message")));
        assert_eq!(
            parse(&format!(r#"{{"type":"error","error":{{"code":"{}"}}}}"#, "é".repeat(100))),
            Ok(error("", &"é".repeat(32), "error without a message")),
            "bounded on a character boundary"
        );
        assert_eq!(parse(r#"{"type":"session.created"}"#), Ok(ServerEvent::Other));
        assert_eq!(parse("[]"), Err(ParseError::NotAnEvent));
        assert_eq!(
            parse(r#"{"type":"response.audio.delta"}"#),
            Err(ParseError::Missing("response.audio.delta", "delta"))
        );
    }

    /// The GA shape: `type: realtime`, μ-law under `audio.input/output.format`, transcription and
    /// server VAD under `audio.input`, one output modality; briefing, voice and tools when given;
    /// none of the beta fields.
    #[test]
    fn ga_session_update() {
        let v: Value = serde_json::from_str(&session_update(&SessionConfig::default())).expect("json");
        assert_eq!(
            v,
            json!({"type": "session.update", "session": {
                "type": "realtime",
                "output_modalities": ["audio"],
                "audio": {
                    "input": {"format": {"type": "audio/pcmu"}, "transcription": {"model": "whisper-1"},
                              "turn_detection": {"type": "server_vad"}},
                    "output": {"format": {"type": "audio/pcmu"}},
                },
            }})
        );
        let tools = [json!({"type": "function", "name": "book", "parameters": {"type": "object"}})];
        let config = SessionConfig {
            shape: ApiShape::Ga,
            instructions: Some("Be \"brief\"."),
            voice: Some("marin"),
            tools: &tools,
        };
        let v: Value = serde_json::from_str(&session_update(&config)).expect("json");
        assert_eq!(v["session"]["instructions"], "Be \"brief\".");
        assert_eq!(v["session"]["audio"]["output"]["voice"], "marin");
        assert_eq!(v["session"]["tools"][0]["name"], "book");
        assert!(v["session"].get("voice").is_none() && v["session"].get("input_audio_format").is_none());
        assert_eq!(ApiShape::Ga.upgrade_header(), None, "no OpenAI-Beta header");
    }

    /// The beta shape is today's exactly (with the briefing and voice at the session's top level).
    #[test]
    fn beta_session_update() {
        let config = SessionConfig { shape: ApiShape::Beta, ..SessionConfig::default() };
        let v: Value = serde_json::from_str(&session_update(&config)).expect("json");
        assert_eq!(
            v,
            json!({"type": "session.update", "session": {
                "modalities": ["audio", "text"],
                "input_audio_format": "g711_ulaw",
                "output_audio_format": "g711_ulaw",
                "turn_detection": {"type": "server_vad"},
                "input_audio_transcription": {"model": "whisper-1"},
            }})
        );
        let config = SessionConfig { instructions: Some("hi"), voice: Some("alloy"), ..config };
        let v: Value = serde_json::from_str(&session_update(&config)).expect("json");
        assert_eq!(
            (v["session"]["instructions"].as_str(), v["session"]["voice"].as_str()),
            (Some("hi"), Some("alloy"))
        );
        assert_eq!(ApiShape::Beta.upgrade_header(), Some(("OpenAI-Beta", "realtime=v1")));
    }

    /// The scripted greeting is a `response.create` whose instructions quote the message exactly.
    #[test]
    fn greeting_quotes_the_first_message() {
        let v: Value = serde_json::from_str(&greeting("Hi \"Ann\", it's Bob.")).expect("json");
        assert_eq!(v["type"], "response.create");
        let instructions = v["response"]["instructions"].as_str().expect("instructions");
        assert!(instructions.ends_with("Hi \"Ann\", it's Bob."), "{instructions}");
    }

    /// Session refusals are fatal; errors about one client event are not.
    #[test]
    fn fatal_errors() {
        let e = |kind: &str, code: &str| ServerError { kind: kind.into(), code: code.into(), message: String::new() };
        assert!(e("invalid_request_error", "beta_api_shape_disabled").is_fatal());
        assert!(e("invalid_request_error", "invalid_api_key").is_fatal());
        assert!(e("authentication_error", "").is_fatal());
        assert!(!e("invalid_request_error", "invalid_value").is_fatal());
        assert!(!e("invalid_request_error", "conversation_already_has_active_response").is_fatal());
        assert!(!e("", "").is_fatal());
    }
}
