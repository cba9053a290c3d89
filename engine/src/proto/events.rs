//! Messages of the `/ws` event socket (seeds 000/001): what the relay sends and what clients send.
//!
//! Invariant: field names are the protocol's exactly; serialisation happens once per event, and the
//! bytes are shared by every socket that receives them.

use serde::Deserialize;
use serde_json::{json, Value};
use tungstenite::Utf8Bytes;

use crate::id::SessionId;

/// `eventType` values of `retell_event` messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetellEvent {
    /// The call started (`/start-call`).
    CallStarted,
    /// The agent's media is connected and the call can talk.
    CallReady,
    /// The call ended (`/stop-call`, caller hang-up, shutdown).
    CallEnded,
    /// Voice activity began on the agent's audio.
    AgentStartTalking,
    /// Voice activity ended on the agent's audio.
    AgentStopTalking,
    /// The agent's audio track arrived.
    AgentMediaStreamReady,
    /// The agent now hears a custom stream (`/send-custom-stream`).
    CustomMediaStreamSent,
    /// The agent hears the microphone again (`/resume-microphone`).
    MicrophoneResumed,
    /// State or transcript changed.
    Update,
    /// Data an agent pushed.
    Metadata,
    /// Something failed on this call.
    Error,
    /// 20 ms of the agent's audio as float samples (with `emitRawAudioSamples`).
    Audio,
}

impl RetellEvent {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CallStarted => "call_started",
            Self::CallReady => "call_ready",
            Self::CallEnded => "call_ended",
            Self::AgentStartTalking => "agent_start_talking",
            Self::AgentStopTalking => "agent_stop_talking",
            Self::AgentMediaStreamReady => "agent_media_stream_ready",
            Self::CustomMediaStreamSent => "custom_media_stream_sent",
            Self::MicrophoneResumed => "microphone_resumed",
            Self::Update => "update",
            Self::Metadata => "metadata",
            Self::Error => "error",
            Self::Audio => "audio",
        }
    }
}

/// `{"type":"connection_established","sessionId","status":{"isConnected","isAgentTalking"}}`.
pub fn connection_established(session: &SessionId, is_connected: bool, is_agent_talking: bool) -> Utf8Bytes {
    text(&json!({
        "type": "connection_established",
        "sessionId": session.as_str(),
        "status": { "isConnected": is_connected, "isAgentTalking": is_agent_talking },
    }))
}

/// `{"type":"pong","timestamp":"<ms>"}`.
pub fn pong(unix_ms: u64) -> Utf8Bytes {
    text(&json!({ "type": "pong", "timestamp": unix_ms.to_string() }))
}

/// `{"type":"retell_event","eventType":E,"data":…,"timestamp":"<ms>"}`.
pub fn retell_event(event: RetellEvent, data: Value, unix_ms: u64) -> Utf8Bytes {
    text(&json!({
        "type": "retell_event",
        "eventType": event.as_str(),
        "data": data,
        "timestamp": unix_ms.to_string(),
    }))
}

/// What a client sent on `/ws`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientMessage {
    /// `{"type":"ping"}`.
    Ping,
    /// Valid JSON with another or no `type`: ignored, as the seed servers do.
    Other,
}

/// Why a client message was not understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("message is not a JSON object: {0}")]
pub struct ClientMessageError(String);

/// Parses a text message a client sent on `/ws`.
///
/// # Errors
/// [`ClientMessageError`] when the text is not a JSON object.
pub fn parse_client(text: &str) -> Result<ClientMessage, ClientMessageError> {
    #[derive(Deserialize)]
    struct Wire<'a> {
        #[serde(borrow, rename = "type")]
        kind: Option<std::borrow::Cow<'a, str>>,
    }
    if !super::is_json_object(text.as_bytes()) {
        return Err(ClientMessageError("a message is a JSON object".to_owned()));
    }
    let wire: Wire<'_> = serde_json::from_str(text).map_err(|e| ClientMessageError(e.to_string()))?;
    Ok(match wire.kind.as_deref() {
        Some("ping") => ClientMessage::Ping,
        _ => ClientMessage::Other,
    })
}

fn text(v: &Value) -> Utf8Bytes {
    Utf8Bytes::from(v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The three server messages have the seed's exact shape.
    #[test]
    fn shapes() {
        let id = SessionId::parse("s-1").expect("valid");
        let v: Value = serde_json::from_str(&connection_established(&id, false, false)).expect("json");
        assert_eq!(
            v,
            json!({"type":"connection_established","sessionId":"s-1","status":{"isConnected":false,"isAgentTalking":false}})
        );
        let v: Value = serde_json::from_str(&pong(1_647_875_400_000)).expect("json");
        assert_eq!(v, json!({"type":"pong","timestamp":"1647875400000"}));
        let v: Value =
            serde_json::from_str(&retell_event(RetellEvent::AgentStartTalking, Value::Null, 5)).expect("json");
        assert_eq!(v, json!({"type":"retell_event","eventType":"agent_start_talking","data":null,"timestamp":"5"}));
    }

    /// Ping is recognised, other objects are ignored, non-objects are errors.
    #[test]
    fn client_messages() {
        assert_eq!(parse_client(r#"{"type":"ping"}"#), Ok(ClientMessage::Ping));
        assert_eq!(parse_client(r#"{"type":"other","x":[1]}"#), Ok(ClientMessage::Other));
        assert_eq!(parse_client(r#"{}"#), Ok(ClientMessage::Other));
        assert!(parse_client("[1]").is_err());
        assert!(parse_client(r#"["ping"]"#).is_err(), "an array is not a message, even one shaped like ping");
        assert!(parse_client(r#" [" {"] "#).is_err(), "fuzz/artifacts-found/events_messages");
        assert_eq!(parse_client(" \n{\"type\":\"ping\"}"), Ok(ClientMessage::Ping), "leading whitespace is JSON");
        assert!(parse_client("ping").is_err());
        assert!(parse_client(r#"{"type":5}"#).is_err());
    }
}
