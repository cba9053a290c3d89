//! Messages of the `/frontend-stream` socket (seed 004): `connect-twilio` from the browser, and
//! `audio` and `transcription` from the relay.
//!
//! Invariant: no I/O and no panic on any input; writers fill one pre-sized buffer, no `Value`.

use serde::Deserialize;
use tungstenite::Utf8Bytes;

use super::twilio::{push_json_str, push_payload, JsonStr};

/// What a browser sent on `/frontend-stream`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientMessage {
    /// `{"event":"connect-twilio","callSid","user_id"}`: listen to this call.
    ConnectTwilio {
        /// `callSid`: the call to listen to.
        call_sid: String,
        /// `user_id`: who asks, checked against the call's owner and per-user limits.
        user_id: String,
    },
    /// A JSON object with another or no `event`: ignored, as the seed server does.
    Other,
}

/// Which side of the call an `audio` message carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrontendTrack {
    /// The caller (`inbound`).
    Inbound,
    /// The agent, as played to the caller (`outbound`).
    Outbound,
}

impl FrontendTrack {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Inbound => "inbound",
            Self::Outbound => "outbound",
        }
    }
}

/// Why a client message was not understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Not JSON, not an object, or a known field of the wrong JSON type.
    #[error("malformed frontend message: {0}")]
    Json(String),
    /// `connect-twilio` without one of its fields.
    #[error("connect-twilio lacks {0}")]
    Missing(&'static str),
    /// A field longer than [`MAX_FIELD_BYTES`].
    #[error("connect-twilio has too large a {0}")]
    TooLarge(&'static str),
}

/// Parses a text message a browser sent on `/frontend-stream`.
///
/// # Errors
/// [`ParseError`] when the text is not a JSON object, or is a `connect-twilio` without a bounded
/// `callSid` and `user_id`.
pub fn parse_client(text: &str) -> Result<ClientMessage, ParseError> {
    #[derive(Deserialize)]
    struct Wire<'a> {
        #[serde(borrow)]
        event: Option<JsonStr<'a>>,
        #[serde(borrow, rename = "callSid")]
        call_sid: Option<JsonStr<'a>>,
        #[serde(borrow)]
        user_id: Option<JsonStr<'a>>,
    }
    if !super::is_json_object(text.as_bytes()) {
        return Err(ParseError::Json("a message is a JSON object".to_owned()));
    }
    let wire: Wire<'_> = serde_json::from_str(text).map_err(|e| ParseError::Json(e.to_string()))?;
    if wire.event.as_ref().map(JsonStr::as_str) != Some("connect-twilio") {
        return Ok(ClientMessage::Other);
    }
    let call_sid = wire.call_sid.ok_or(ParseError::Missing("callSid"))?;
    let user_id = wire.user_id.ok_or(ParseError::Missing("user_id"))?;
    Ok(ClientMessage::ConnectTwilio {
        call_sid: call_sid.bounded(MAX_FIELD_BYTES, "callSid").map_err(ParseError::TooLarge)?,
        user_id: user_id.bounded(MAX_FIELD_BYTES, "user_id").map_err(ParseError::TooLarge)?,
    })
}

/// `{"event":"audio","payload":…,"track":…}` with a base64 μ-law `payload`, inserted verbatim
/// (anything that is not base64 is escaped so the frame stays JSON).
pub fn audio(payload: &[u8], track: FrontendTrack) -> Utf8Bytes {
    let mut out = String::with_capacity(48 + payload.len());
    out.push_str(r#"{"event":"audio","payload":"#);
    push_payload(&mut out, payload);
    out.push_str(r#","track":""#);
    out.push_str(track.as_str());
    out.push_str(r#""}"#);
    Utf8Bytes::from(out)
}

/// `{"event":"transcription","text":…}`.
pub fn transcription(text: &str) -> Utf8Bytes {
    let mut out = String::with_capacity(40 + text.len());
    out.push_str(r#"{"event":"transcription","text":"#);
    push_json_str(&mut out, text);
    out.push('}');
    Utf8Bytes::from(out)
}

/// Longest `callSid` or `user_id` accepted, in bytes (ids in the API are at most 128 characters).
pub const MAX_FIELD_BYTES: usize = 128;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::{json, Value};

    /// Seed 004's `connect-twilio` parses; other objects are `Other`; non-objects are errors.
    #[test]
    fn client_messages() {
        assert_eq!(
            parse_client(r#"{"event":"connect-twilio","callSid":"CA123456789","user_id":"user123"}"#),
            Ok(ClientMessage::ConnectTwilio { call_sid: "CA123456789".into(), user_id: "user123".into() })
        );
        assert_eq!(
            parse_client(r#"{"user_id":"u\"1","extra":[1,{}],"callSid":"CA\u0031","event":"connect-twilio"}"#),
            Ok(ClientMessage::ConnectTwilio { call_sid: "CA1".into(), user_id: "u\"1".into() })
        );
        assert_eq!(parse_client(r#"{"event":"ping"}"#), Ok(ClientMessage::Other));
        assert_eq!(parse_client(r#"{}"#), Ok(ClientMessage::Other));
        // An array is refused even when serde could read it as the message, fields by position.
        for bad in ["[1]", "\"connect-twilio\"", "null", "", "{", r#"{"event":5}"#, r#"["connect-twilio","CA1","u1"]"#]
        {
            assert!(matches!(parse_client(bad), Err(ParseError::Json(_))), "{bad}");
        }
    }

    /// `connect-twilio` needs both ids, each within the bound.
    #[test]
    fn connect_twilio_fields() {
        assert_eq!(parse_client(r#"{"event":"connect-twilio","user_id":"u"}"#), Err(ParseError::Missing("callSid")));
        assert_eq!(parse_client(r#"{"event":"connect-twilio","callSid":"CA"}"#), Err(ParseError::Missing("user_id")));
        let long = "x".repeat(MAX_FIELD_BYTES + 1);
        let text = json!({"event":"connect-twilio","callSid":long,"user_id":"u"}).to_string();
        assert_eq!(parse_client(&text), Err(ParseError::TooLarge("callSid")));
        let text = json!({"event":"connect-twilio","callSid":"CA","user_id":long}).to_string();
        assert_eq!(parse_client(&text), Err(ParseError::TooLarge("user_id")));
    }

    /// The server messages have the documented shapes, exactly.
    #[test]
    fn server_shapes() {
        assert_eq!(
            audio(b"//8=", FrontendTrack::Inbound).as_str(),
            r#"{"event":"audio","payload":"//8=","track":"inbound"}"#
        );
        assert_eq!(
            audio(b"AAAA", FrontendTrack::Outbound).as_str(),
            r#"{"event":"audio","payload":"AAAA","track":"outbound"}"#
        );
        assert_eq!(transcription("hello").as_str(), r#"{"event":"transcription","text":"hello"}"#);
    }

    /// Text with quotes, backslashes, control characters and non-ASCII survives escaping.
    #[test]
    fn transcription_escapes() {
        let text = "she said \"hi\" \\ then\n\ttab \u{1} — ünïcödé 🎧";
        let v: Value = serde_json::from_str(&transcription(text)).expect("valid JSON");
        assert_eq!(v, json!({"event":"transcription","text":text}));
    }

    /// A payload that is not base64 (even invalid UTF-8) still yields valid JSON.
    #[test]
    fn audio_with_bad_payload_is_still_json() {
        let v: Value = serde_json::from_str(&audio(b"a\"b\xff\n", FrontendTrack::Inbound)).expect("valid JSON");
        assert_eq!(v["payload"], json!("a\"b\u{fffd}\n"));
    }

    proptest! {
        /// `parse_client` never panics, whatever the text.
        #[test]
        fn parse_client_never_panics(text in any::<String>()) {
            let _ = parse_client(&text);
        }

        /// Any transcription text round-trips through JSON.
        #[test]
        fn transcription_round_trips(text in any::<String>()) {
            let v: Value = serde_json::from_str(&transcription(&text)).expect("valid JSON");
            prop_assert_eq!(v, json!({"event":"transcription","text":text}));
        }

        /// Ids round-trip through a `connect-twilio` built by serde_json.
        #[test]
        fn connect_twilio_round_trips(call_sid in ".{0,32}", user_id in ".{0,32}") {
            let text = json!({"event":"connect-twilio","callSid":call_sid,"user_id":user_id}).to_string();
            prop_assert_eq!(parse_client(&text), Ok(ClientMessage::ConnectTwilio { call_sid, user_id }));
        }
    }
}
