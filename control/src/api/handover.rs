//! The hand-over of an outbound call between nodes: what `/outbound-call` knows about a call
//! (its user, prompt, first message, project, intent and tools) travels in the query of the
//! webhook URL Relay gives Twilio, so whichever node Twilio's webhook and stream reach can brief
//! the call's agent exactly as the dialling node would.
//!
//! Twilio signs the full webhook URL, query included, so with an auth token configured the
//! hand-over cannot be forged or altered: `/twilio/voice` acts on it only after the signature
//! verified.
//!
//! Invariant: pure functions; what [`Handover::from_query`] accepts obeys the same bounds as
//! `/outbound-call`'s body, and bad input is a 400, never a panic.

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC};
use relay_engine::core::command::{Direction, RecordUpdate};
use relay_engine::proto::tools;
use serde_json::Value;

use super::params;
use crate::error::ApiError;

/// Longest webhook URL Relay gives Twilio, characters. Twilio documents 4000 characters as the
/// limit of its callback URLs (error 21609: "the URL exceeds the 4000-character limit"); a
/// hand-over that does not fit is refused.
pub const MAX_WEBHOOK_URL: usize = 4000;

/// Longest `prompt` or `first_message`, bytes.
pub const MAX_TEXT_BYTES: usize = 4096;

/// Longest `user_id`, `projectId` or `intent`, bytes.
pub const MAX_LABEL_BYTES: usize = 128;

/// Characters escaped in a query value: all but RFC 3986's unreserved ones (`+` is escaped too,
/// since query decoding reads it as a space).
const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// What the serving node needs to brief an outbound call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Handover {
    /// The user who placed the call: its presence marks the hand-over (and the call outbound).
    pub user_id: String,
    /// The agent's instructions.
    pub prompt: Option<String>,
    /// The agent's first sentence.
    pub first_message: Option<String>,
    /// The call's project.
    pub project_id: Option<String>,
    /// What the call is about.
    pub intent: Option<String>,
    /// The call's tool declarations, as the compact JSON of a list `tools::parse_tools` accepts.
    pub tools: Option<String>,
}

impl Handover {
    /// The query string (without `?`) that carries it, each value percent-encoded; fields in a
    /// fixed order, absent ones left out.
    pub fn to_query(&self) -> String {
        let mut out = String::new();
        let fields = [
            ("user_id", Some(&self.user_id)),
            ("projectId", self.project_id.as_ref()),
            ("intent", self.intent.as_ref()),
            ("prompt", self.prompt.as_ref()),
            ("first_message", self.first_message.as_ref()),
            ("tools", self.tools.as_ref()),
        ];
        for (name, value) in fields {
            let Some(value) = value else { continue };
            if !out.is_empty() {
                out.push('&');
            }
            out.push_str(name);
            out.push('=');
            out.extend(percent_encoding::utf8_percent_encode(value, QUERY_VALUE));
        }
        out
    }

    /// `{base}{path}?{query}`.
    ///
    /// # Errors
    /// 400 naming [`MAX_WEBHOOK_URL`] when the URL would be longer: Twilio would refuse it.
    pub fn url(&self, base: &str, path: &str) -> Result<String, ApiError> {
        let url = format!("{base}{path}?{}", self.to_query());
        if url.len() > MAX_WEBHOOK_URL {
            return Err(ApiError::bad_request(format!(
                "prompt, first_message and tools travel in the webhook URL Twilio calls back (so that any \
                 relay node can serve the call), which Twilio limits to {MAX_WEBHOOK_URL} characters; \
                 encoded they make it {} characters: shorten them",
                url.len()
            )));
        }
        Ok(url)
    }

    /// The hand-over a webhook's query carries, if any (`user_id` present).
    ///
    /// # Errors
    /// 400 for a field past its bound, an empty `user_id`, or `tools` that are not a valid list.
    pub fn from_query(query: Option<&str>) -> Result<Option<Self>, ApiError> {
        let Some(user_id) = params::query(query, "user_id") else { return Ok(None) };
        if user_id.is_empty() || user_id.len() > MAX_LABEL_BYTES {
            return Err(ApiError::bad_request(format!("user_id must be 1 to {MAX_LABEL_BYTES} bytes")));
        }
        let text = |name: &str| match params::query(query, name) {
            Some(v) if v.len() > MAX_TEXT_BYTES => {
                Err(ApiError::bad_request(format!("{name} must be at most {MAX_TEXT_BYTES} bytes")))
            }
            v => Ok(v),
        };
        let label = |name: &str| match params::query(query, name) {
            Some(v) if !is_label(&v) => {
                Err(ApiError::bad_request(format!("{name} must be a string of 1 to {MAX_LABEL_BYTES} bytes")))
            }
            v => Ok(v),
        };
        let tools = match params::query(query, "tools") {
            None => None,
            Some(json) => {
                tools::parse_tools_json(json.as_bytes()).map_err(|e| ApiError::bad_request(format!("tools: {e}")))?;
                Some(json)
            }
        };
        Ok(Some(Self {
            user_id,
            prompt: text("prompt")?,
            first_message: text("first_message")?,
            project_id: label("projectId")?,
            intent: label("intent")?,
            tools,
        }))
    }

    /// The record update that seeds the call on the serving node: outbound, with every field the
    /// hand-over carries (`tools` parsed again; they were checked by [`Self::from_query`]).
    pub fn record_update(&self) -> RecordUpdate {
        let tools = self.tools.as_deref().and_then(|json| tools::parse_tools_json(json.as_bytes()).ok());
        RecordUpdate {
            user_id: Some(self.user_id.clone()),
            prompt: self.prompt.clone(),
            first_message: self.first_message.clone(),
            project_id: self.project_id.clone(),
            intent: self.intent.clone(),
            direction: Some(Direction::Outbound),
            tools: tools.map(Into::into),
            ..RecordUpdate::default()
        }
    }
}

/// The compact JSON of a `tools` value `tools::parse_tools` accepted.
pub fn tools_json(value: &Value) -> String {
    value.to_string()
}

/// A short label (`projectId`, `intent`, `user_id`): 1 to [`MAX_LABEL_BYTES`] bytes, no control
/// characters.
pub fn is_label(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_LABEL_BYTES && !s.chars().any(char::is_control)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

    fn full() -> Handover {
        Handover {
            user_id: "olivia+1@example.com".into(),
            prompt: Some("Book a table for two & nothing \"else\"; 100% sure? ü".into()),
            first_message: Some("Hello! <reservation>".into()),
            project_id: Some("proj-1".into()),
            intent: Some("booking".into()),
            tools: Some(r#"[{"name":"lookup","parameters":{"type":"object"}}]"#.into()),
        }
    }

    /// Every field survives the query's encoding and decoding, `+`, `&`, `%` and non-ASCII included.
    #[test]
    fn round_trip() {
        let h = full();
        let query = h.to_query();
        assert!(
            query.starts_with("user_id=olivia%2B1%40example.com&projectId=proj-1&intent=booking&prompt="),
            "{query}"
        );
        assert_eq!(Handover::from_query(Some(&query)).expect("valid"), Some(h));
        let minimal = Handover { user_id: "u".into(), ..Handover::default() };
        assert_eq!(minimal.to_query(), "user_id=u");
        assert_eq!(Handover::from_query(Some("user_id=u")).expect("valid"), Some(minimal));
    }

    /// No `user_id`, no hand-over: an inbound call's webhook (`?projectId=` alone) is not one.
    #[test]
    fn absent() {
        assert_eq!(Handover::from_query(None).expect("ok"), None);
        assert_eq!(Handover::from_query(Some("projectId=p&agentUrl=x")).expect("ok"), None);
    }

    /// Fields past their bounds, an empty user and bad tools are 400s naming the field.
    #[test]
    fn bounds() {
        let long = "a".repeat(MAX_TEXT_BYTES + 1);
        for (query, field) in [
            ("user_id=".to_owned(), "user_id"),
            (format!("user_id={}", "u".repeat(129)), "user_id"),
            (format!("user_id=u&prompt={long}"), "prompt"),
            (format!("user_id=u&first_message={long}"), "first_message"),
            ("user_id=u&projectId=".to_owned(), "projectId"),
            ("user_id=u&intent=%01".to_owned(), "intent"),
            ("user_id=u&tools=%7B".to_owned(), "tools"),
            ("user_id=u&tools=%5B%7B%22name%22%3A1%7D%5D".to_owned(), "tools"),
        ] {
            let e = Handover::from_query(Some(&query)).expect_err(&query);
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{query}");
            assert!(e.message.contains(field), "{query}: {}", e.message);
        }
    }

    /// The seed is an outbound record with every carried field and the parsed tools.
    #[test]
    fn seed() {
        let u = full().record_update();
        assert_eq!(u.direction, Some(Direction::Outbound));
        assert_eq!(u.user_id.as_deref(), Some("olivia+1@example.com"));
        assert_eq!(u.first_message.as_deref(), Some("Hello! <reservation>"));
        assert_eq!(u.tools.as_deref().map(<[_]>::len), Some(1));
        assert_eq!(u.status, None, "the hand-over says nothing of the call's status");
    }

    /// A URL past Twilio's 4000 characters is refused with a 400 naming the limit; one at it passes.
    #[test]
    fn url_bound() {
        let base = "https://relay.example";
        let path = "/twilio/voice";
        let room = MAX_WEBHOOK_URL - format!("{base}{path}?user_id=u&prompt=").len();
        let fits = Handover { user_id: "u".into(), prompt: Some("a".repeat(room)), ..Handover::default() };
        assert_eq!(fits.url(base, path).expect("fits").len(), MAX_WEBHOOK_URL);
        let over = Handover { prompt: Some("a".repeat(room + 1)), ..fits };
        let e = over.url(base, path).expect_err("too long");
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.message.contains("4000"), "{}", e.message);
        // Escaped characters count as Twilio sees them: three each.
        let spaces = Handover { user_id: "u".into(), prompt: Some(" ".repeat(1400)), ..Handover::default() };
        assert!(spaces.url(base, path).is_err(), "1400 spaces are 4200 characters encoded");
    }
}
