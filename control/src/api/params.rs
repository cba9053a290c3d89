//! Request inputs: JSON bodies and query strings, turned into typed values with exact errors.
//!
//! Invariant: every error names the field and what it must be.

use relay_engine::id::{SessionId, StreamId, MAX_ID_LEN};
use serde_json::{Map, Value};

use crate::error::ApiError;

/// A JSON object body.
pub struct Body(Map<String, Value>);

impl Body {
    /// Parses `bytes` as a JSON object.
    ///
    /// # Errors
    /// 400 when the body is empty, not JSON, or not an object.
    pub fn parse(bytes: &[u8]) -> Result<Self, ApiError> {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(ApiError::bad_request("request body must be a JSON object"));
        }
        match serde_json::from_slice::<Value>(bytes) {
            Ok(Value::Object(map)) => Ok(Self(map)),
            Ok(_) => Err(ApiError::bad_request("request body must be a JSON object")),
            Err(e) => Err(ApiError::bad_request(format!("request body is not valid JSON: {e}"))),
        }
    }

    /// A field, treating `null` as absent.
    pub fn field(&self, name: &str) -> Option<&Value> {
        self.0.get(name).filter(|v| !v.is_null())
    }

    /// A required string field.
    ///
    /// # Errors
    /// 400 when missing, empty or not a string.
    pub fn string(&self, name: &str) -> Result<&str, ApiError> {
        match self.field(name) {
            None => Err(ApiError::bad_request(format!("{name} is required"))),
            Some(Value::String(s)) if s.is_empty() => Err(ApiError::bad_request(format!("{name} must not be empty"))),
            Some(Value::String(s)) => Ok(s),
            Some(_) => Err(ApiError::bad_request(format!("{name} must be a string"))),
        }
    }

    /// The required `sessionId`.
    ///
    /// # Errors
    /// 400 when missing or not a valid id.
    pub fn session_id(&self) -> Result<SessionId, ApiError> {
        session_id(self.string("sessionId")?, "sessionId")
    }
}

/// Validates `s` as a session id named `field`.
///
/// # Errors
/// 400 naming the rule that failed.
pub fn session_id(s: &str, field: &str) -> Result<SessionId, ApiError> {
    SessionId::parse(s).map_err(|e| id_error(field, e))
}

/// Validates `s` as a stream id named `field`.
///
/// # Errors
/// 400 naming the rule that failed.
pub fn stream_id(s: &str, field: &str) -> Result<StreamId, ApiError> {
    StreamId::parse(s).map_err(|e| id_error(field, e))
}

fn id_error(field: &str, e: relay_engine::id::IdError) -> ApiError {
    ApiError::bad_request(format!("{field} {e} (ids are 1–{MAX_ID_LEN} characters of A-Z a-z 0-9 . _ : -)"))
}

/// The first value of query parameter `name`, percent-decoded (`+` is a space).
pub fn query(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (decode(k) == name).then(|| decode(v))
    })
}

/// The required session id from query parameter `name`.
///
/// # Errors
/// 400 when missing or invalid.
pub fn query_session(q: Option<&str>, name: &str) -> Result<SessionId, ApiError> {
    match query(q, name) {
        None => Err(ApiError::bad_request(format!("query parameter {name} is required"))),
        Some(s) if s.is_empty() => Err(ApiError::bad_request(format!("query parameter {name} is required"))),
        Some(s) => session_id(&s, name),
    }
}

/// Decodes one `application/x-www-form-urlencoded` component: `+` is a space, then percent escapes
/// (invalid UTF-8 becomes U+FFFD). Shared by query strings and form bodies.
pub fn decode(s: &str) -> String {
    let plus = s.replace('+', " ");
    percent_encoding::percent_decode_str(&plus).decode_utf8_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

    /// Bodies must be JSON objects; fields are typed with named errors.
    #[test]
    fn bodies() {
        assert!(Body::parse(b"").is_err());
        assert!(Body::parse(b"[1]").is_err());
        assert!(Body::parse(b"{").is_err());
        let b = Body::parse(br#"{"sessionId":"s-1","n":5,"e":""}"#).expect("object");
        assert_eq!(b.session_id().expect("valid").as_str(), "s-1");
        assert_eq!(b.string("n").unwrap_err().message, "n must be a string");
        assert_eq!(b.string("e").unwrap_err().message, "e must not be empty");
        assert_eq!(b.string("x").unwrap_err().status, StatusCode::BAD_REQUEST);
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert!(Body::parse(deep.as_bytes()).is_err(), "nesting bombs are refused, not recursed");
    }

    /// Query parameters are found and decoded.
    #[test]
    fn queries() {
        assert_eq!(query(Some("a=1&sessionId=s%2D1&b"), "sessionId").as_deref(), Some("s-1"));
        assert_eq!(query(Some("b"), "b").as_deref(), Some(""));
        assert_eq!(query(Some("x=a+b"), "x").as_deref(), Some("a b"));
        assert_eq!(query(None, "x"), None);
        assert!(query_session(Some("sessionId="), "sessionId").is_err());
        assert!(query_session(Some("sessionId=a%20b"), "sessionId").is_err());
        assert!(query_session(Some("sessionId=ok"), "sessionId").is_ok());
    }
}
