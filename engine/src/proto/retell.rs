//! Retell's custom-LLM WebSocket protocol (seed 002, `WS /llm-websocket/{call_id}`), with the
//! relay as the LLM server, and the built-in scripted responder used when no upstream LLM is
//! configured.
//!
//! Retell names its messages with `interaction_type` (seed 002 writes `response_type`; both are
//! read). Invariant: pure; parsing is total; every answer carries the request's `response_id`.

use serde_json::{json, Value};
use tungstenite::Utf8Bytes;

/// One utterance of a Retell transcript.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Utterance {
    /// `agent` or `user`.
    pub role: String,
    /// What was said.
    pub content: String,
}

/// A message from Retell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `config` (seed 002's config request): answered with the relay's config.
    Config {
        /// Echoed.
        response_id: Option<u64>,
    },
    /// `call_details`: the call's metadata.
    CallDetails(Value),
    /// `ping_pong`: answered at once.
    PingPong {
        /// Echoed (Retell's field).
        timestamp: Option<u64>,
        /// Echoed (seed 002's field).
        response_id: Option<u64>,
    },
    /// `update_only`: the transcript so far; nothing to say.
    UpdateOnly(Vec<Utterance>),
    /// `response_required` / `reminder_required`: the LLM must answer `response_id`.
    Respond {
        /// The turn to answer.
        response_id: u64,
        /// The transcript so far.
        transcript: Vec<Utterance>,
        /// A reminder (the user has been silent), not a reply to new words.
        reminder: bool,
    },
}

/// Why a message could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Not a JSON object with a known `interaction_type` / `response_type`.
    #[error("not a Retell LLM message")]
    Unknown,
    /// A turn without its `response_id`.
    #[error("{0} without response_id")]
    NoResponseId(&'static str),
}

/// Parses one text message from Retell.
///
/// # Errors
/// [`ParseError`] for anything else.
pub fn parse(text: &str) -> Result<Request, ParseError> {
    let v: Value = serde_json::from_str(text).map_err(|_| ParseError::Unknown)?;
    let kind = v
        .get("interaction_type")
        .or_else(|| v.get("response_type"))
        .and_then(Value::as_str)
        .ok_or(ParseError::Unknown)?;
    let response_id = v.get("response_id").and_then(Value::as_u64);
    Ok(match kind {
        "config" => Request::Config { response_id },
        "call_details" => {
            Request::CallDetails(v.get("call").or_else(|| v.get("call_details")).cloned().unwrap_or(Value::Null))
        }
        "ping_pong" => Request::PingPong { timestamp: v.get("timestamp").and_then(Value::as_u64), response_id },
        "update_only" => Request::UpdateOnly(transcript(&v)),
        "response_required" | "reminder_required" => Request::Respond {
            response_id: response_id.ok_or(ParseError::NoResponseId("response_required"))?,
            transcript: transcript(&v),
            reminder: kind == "reminder_required",
        },
        _ => return Err(ParseError::Unknown),
    })
}

/// The transcript of a message: Retell's array of `{role, content}`, or seed 002's single string
/// (the user's words).
fn transcript(v: &Value) -> Vec<Utterance> {
    match v.get("transcript") {
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|u| {
                Some(Utterance {
                    role: u.get("role")?.as_str()?.to_owned(),
                    content: u.get("content")?.as_str()?.to_owned(),
                })
            })
            .collect(),
        Some(Value::String(s)) if !s.is_empty() => vec![Utterance { role: "user".to_owned(), content: s.clone() }],
        _ => Vec::new(),
    }
}

/// The relay's config: Retell reconnects on drops and sends call details.
pub fn config(response_id: Option<u64>) -> Utf8Bytes {
    let mut v = json!({ "response_type": "config", "config": { "auto_reconnect": true, "call_details": true } });
    if let Some(id) = response_id {
        v["response_id"] = json!(id);
    }
    Utf8Bytes::from(v.to_string())
}

/// The answer to a `ping_pong`.
pub fn pong(timestamp: Option<u64>, response_id: Option<u64>, now_ms: u64) -> Utf8Bytes {
    let mut v = json!({ "response_type": "ping_pong", "timestamp": timestamp.unwrap_or(now_ms) });
    if let Some(id) = response_id {
        v["response_id"] = json!(id);
    }
    Utf8Bytes::from(v.to_string())
}

/// One chunk of a streamed answer to turn `response_id`.
pub fn response(response_id: u64, content: &str, complete: bool, end_call: bool) -> Utf8Bytes {
    let v = json!({
        "response_type": "response",
        "response_id": response_id,
        "content": content,
        "content_complete": complete,
        "end_call": end_call,
    });
    Utf8Bytes::from(v.to_string())
}

/// Words that end a call in the scripted responder.
const GOODBYES: [&str; 3] = ["bye", "goodbye", "hang up"];

/// The built-in responder's answer to a turn: its chunks (streamed, the last one complete) and
/// whether it ends the call. A reminder asks whether the caller is there; words of farewell end
/// the call; anything else is acknowledged.
pub fn scripted_answer(transcript: &[Utterance], reminder: bool) -> (Vec<String>, bool) {
    let last_user = transcript.iter().rev().find(|u| u.role == "user").map(|u| u.content.trim().to_owned());
    let (text, end) = match (&last_user, reminder) {
        (_, true) => ("Are you still there? I'm here whenever you're ready.".to_owned(), false),
        (Some(words), false) if GOODBYES.iter().any(|g| words.to_ascii_lowercase().contains(g)) => {
            ("Thanks for calling. Goodbye!".to_owned(), true)
        }
        (Some(words), false) if !words.is_empty() => {
            let mut quoted: String = words.chars().take(200).collect();
            if quoted.len() < words.len() {
                quoted.push('…');
            }
            (format!("I heard you say: \"{quoted}\". How else can I help?"), false)
        }
        _ => ("How can I help you today?".to_owned(), false),
    };
    // Streamed in a few pieces, as an LLM would: split after sentence-ish boundaries.
    let mut chunks = Vec::new();
    let mut current = String::new();
    for word in text.split_inclusive(' ') {
        current.push_str(word);
        if current.len() >= 24 {
            chunks.push(std::mem::take(&mut current));
        }
    }
    if !current.is_empty() {
        chunks.push(current);
    }
    (chunks, end)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both message namings parse; turns need their id; transcripts take either shape.
    #[test]
    fn parses() {
        assert_eq!(
            parse(r#"{"response_type":"config","response_id":1}"#),
            Ok(Request::Config { response_id: Some(1) })
        );
        assert_eq!(
            parse(r#"{"interaction_type":"ping_pong","timestamp":17}"#),
            Ok(Request::PingPong { timestamp: Some(17), response_id: None })
        );
        let r = parse(
            r#"{"interaction_type":"response_required","response_id":3,"transcript":[{"role":"agent","content":"Hi"},{"role":"user","content":"my pipe burst"}]}"#,
        );
        assert!(
            matches!(&r, Ok(Request::Respond { response_id: 3, reminder: false, transcript }) if transcript.len() == 2)
        );
        let r = parse(r#"{"response_type":"response_required","response_id":4,"transcript":"hello"}"#);
        assert!(matches!(&r, Ok(Request::Respond { transcript, .. }) if transcript[0].content == "hello"));
        assert_eq!(
            parse(r#"{"interaction_type":"response_required"}"#),
            Err(ParseError::NoResponseId("response_required"))
        );
        assert_eq!(parse(r#"{"interaction_type":"dance"}"#), Err(ParseError::Unknown));
        assert_eq!(parse("nope"), Err(ParseError::Unknown));
    }

    /// The scripted responder acknowledges, reminds, and says goodbye with end_call.
    #[test]
    fn scripted() {
        let user = |s: &str| vec![Utterance { role: "user".into(), content: s.into() }];
        let (chunks, end) = scripted_answer(&user("my pipe burst"), false);
        assert!(!end && chunks.concat().contains("my pipe burst") && chunks.len() > 1);
        let (chunks, end) = scripted_answer(&user("ok bye now"), false);
        assert!(end && chunks.concat().contains("Goodbye"));
        let (chunks, end) = scripted_answer(&user("x"), true);
        assert!(!end && chunks.concat().contains("still there"));
        let v: Value = serde_json::from_str(&response(3, "Hi", true, false)).expect("json");
        assert_eq!(
            v,
            json!({"response_type":"response","response_id":3,"content":"Hi","content_complete":true,"end_call":false})
        );
    }
}
