//! Tools a Realtime model may call, and the webhook that runs them: tool declarations (parsed with
//! bounds), their `session.update` shape, the signed request Relay POSTs to `--tools-url`, and the
//! app's answer.
//!
//! Invariant: pure; every parser is total and bounded (a declaration list, an answer body); the
//! signature is HMAC-SHA256 over `"{timestamp}.{body}"`, nothing else.

use std::fmt::Write as _;

use hmac::{Hmac, Mac};
use serde_json::{json, Map, Value};
use sha2::Sha256;

/// Most tools one list may declare.
pub const MAX_TOOLS: usize = 64;
/// Largest tool list, bytes of JSON: a file for `--agent-tools` or an `/outbound-call` `tools`.
pub const MAX_TOOLS_BYTES: usize = 64 * 1024;
/// Longest tool name, bytes (OpenAI's function names: `[A-Za-z0-9_-]{1,64}`).
pub const MAX_NAME_BYTES: usize = 64;
/// Largest answer body read from the tools server, bytes.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// Longest `intent` an answer may set, bytes.
pub const MAX_INTENT_BYTES: usize = 128;
/// Header carrying the signature: `sha256=<hex>`.
pub const SIGNATURE_HEADER: &str = "X-Relay-Signature";
/// Header carrying the Unix time (seconds) the signature covers.
pub const TIMESTAMP_HEADER: &str = "X-Relay-Timestamp";

/// One declared tool: a function the model may call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tool {
    /// The function's name (`[A-Za-z0-9_-]{1,64}`), unique in its list.
    pub name: String,
    /// What it does, for the model (may be empty).
    pub description: String,
    /// Its arguments, as a JSON Schema object.
    pub parameters: Value,
}

/// Why a tool list was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ToolsError {
    /// Not JSON.
    #[error("tools are not valid JSON: {0}")]
    Json(String),
    /// Not an array of objects.
    #[error("tools must be an array of {{name, description, parameters}} objects")]
    NotAnArray,
    /// Past [`MAX_TOOLS`] or [`MAX_TOOLS_BYTES`].
    #[error("tools may declare at most {MAX_TOOLS} functions in at most {MAX_TOOLS_BYTES} bytes")]
    TooLarge,
    /// One declaration is wrong: its position and what.
    #[error("tools[{0}]: {1}")]
    Invalid(usize, &'static str),
    /// Two tools share a name.
    #[error("tools: the name {0:?} is declared twice")]
    Duplicate(String),
}

/// Parses a tool list from JSON text (the `--agent-tools` file).
///
/// # Errors
/// [`ToolsError`] for anything that is not a bounded list of valid declarations.
pub fn parse_tools_json(bytes: &[u8]) -> Result<Vec<Tool>, ToolsError> {
    if bytes.len() > MAX_TOOLS_BYTES {
        return Err(ToolsError::TooLarge);
    }
    let value: Value = serde_json::from_slice(bytes).map_err(|e| ToolsError::Json(e.to_string()))?;
    parse_tools(&value)
}

/// Parses a tool list already read as JSON (an `/outbound-call` body's `tools`).
///
/// Each entry is `{"name", "description"?, "parameters"}`; `"type": "function"` may be given too
/// (the Realtime API's own shape). Other fields are refused, so a typo is not silently dropped.
///
/// # Errors
/// [`ToolsError`] for anything that is not a bounded list of valid declarations.
pub fn parse_tools(value: &Value) -> Result<Vec<Tool>, ToolsError> {
    let Value::Array(entries) = value else { return Err(ToolsError::NotAnArray) };
    if entries.len() > MAX_TOOLS || serde_json::to_vec(value).map_or(true, |v| v.len() > MAX_TOOLS_BYTES) {
        return Err(ToolsError::TooLarge);
    }
    let mut tools: Vec<Tool> = Vec::with_capacity(entries.len());
    for (i, entry) in entries.iter().enumerate() {
        let Value::Object(fields) = entry else { return Err(ToolsError::Invalid(i, "not an object")) };
        let tool = parse_tool(fields).map_err(|what| ToolsError::Invalid(i, what))?;
        if tools.iter().any(|t| t.name == tool.name) {
            return Err(ToolsError::Duplicate(tool.name));
        }
        tools.push(tool);
    }
    Ok(tools)
}

fn parse_tool(fields: &Map<String, Value>) -> Result<Tool, &'static str> {
    for key in fields.keys() {
        if !matches!(key.as_str(), "type" | "name" | "description" | "parameters") {
            return Err("unknown field (allowed: type, name, description, parameters)");
        }
    }
    match fields.get("type") {
        None => {}
        Some(Value::String(t)) if t == "function" => {}
        Some(_) => return Err("type must be \"function\""),
    }
    let name = match fields.get("name") {
        Some(Value::String(n)) if is_name(n) => n.clone(),
        Some(_) => return Err("name must be 1 to 64 of A-Z a-z 0-9 _ -"),
        None => return Err("name is required"),
    };
    let description = match fields.get("description") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(d)) => d.clone(),
        Some(_) => return Err("description must be a string"),
    };
    let parameters = match fields.get("parameters") {
        Some(p @ Value::Object(_)) => p.clone(),
        Some(_) => return Err("parameters must be a JSON Schema object"),
        None => return Err("parameters is required (a JSON Schema object)"),
    };
    Ok(Tool { name, description, parameters })
}

/// Whether `name` is a valid function name.
pub fn is_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_BYTES
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The tool as the Realtime session declares it (`session.tools[]`).
pub fn session_tool(tool: &Tool) -> Value {
    json!({ "type": "function", "name": tool.name, "description": tool.description, "parameters": tool.parameters })
}

/// The body Relay POSTs to the tools server: `{"callSid","callId","name","arguments"}`, with
/// `arguments` the model's arguments parsed as JSON (the model sends them as a JSON string).
pub fn request_body(call_sid: &str, call_id: &str, name: &str, arguments: &Value) -> Vec<u8> {
    let v = json!({ "callSid": call_sid, "callId": call_id, "name": name, "arguments": arguments });
    v.to_string().into_bytes()
}

/// The `X-Relay-Signature` value for `body` sent at `timestamp_s`: `sha256=` and the lowercase hex
/// HMAC-SHA256, keyed with the shared secret, of the timestamp's decimal digits, a `.`, and the
/// body's bytes.
pub fn signature(secret: &[u8], timestamp_s: u64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(timestamp_s.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256=");
    for b in digest {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// What the tools server answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The function's output for the model: the answer's `output` if a string, else its JSON text.
    pub output: String,
    /// The call's intent, when the answer set one.
    pub intent: Option<String>,
}

/// Why an answer could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnswerError {
    /// Larger than [`MAX_ANSWER_BYTES`].
    #[error("the tool's answer is larger than {MAX_ANSWER_BYTES} bytes")]
    TooLarge,
    /// Not `{"output": …}`.
    #[error("the tool's answer is not a JSON object with an output")]
    Shape,
    /// `intent` present but not a short label.
    #[error("the tool's intent must be a string of 1 to {MAX_INTENT_BYTES} bytes")]
    Intent,
}

/// Parses a 2xx answer body: `{"output": <string or any JSON>, "intent": "<optional label>"}`.
///
/// # Errors
/// [`AnswerError`] when the body is too large, not such an object, or its intent is not a label.
pub fn parse_answer(body: &[u8]) -> Result<Answer, AnswerError> {
    if body.len() > MAX_ANSWER_BYTES {
        return Err(AnswerError::TooLarge);
    }
    let Ok(Value::Object(mut fields)) = serde_json::from_slice::<Value>(body) else { return Err(AnswerError::Shape) };
    let output = match fields.remove("output") {
        None => return Err(AnswerError::Shape),
        Some(Value::String(s)) => s,
        Some(v) => v.to_string(),
    };
    let intent = match fields.remove("intent") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if !s.is_empty() && s.len() <= MAX_INTENT_BYTES => Some(s),
        Some(_) => return Err(AnswerError::Intent),
    };
    Ok(Answer { output, intent })
}

/// The output the model gets for a call that could not be run: `{"error": message}`.
pub fn error_output(message: &str) -> String {
    json!({ "error": message }).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A valid list parses; each kind of mistake is refused with its position.
    #[test]
    fn declarations() {
        let ok = br#"[{"name":"book_table","description":"Books","parameters":{"type":"object"}},
                       {"type":"function","name":"hang-up","parameters":{}}]"#;
        let tools = parse_tools_json(ok).expect("valid");
        assert_eq!(tools.len(), 2);
        assert_eq!(tools[1].description, "");
        assert_eq!(
            session_tool(&tools[0]),
            json!({"type":"function","name":"book_table","description":"Books","parameters":{"type":"object"}})
        );
        assert!(matches!(parse_tools_json(b"{}"), Err(ToolsError::NotAnArray)));
        assert!(matches!(parse_tools_json(b"[1"), Err(ToolsError::Json(_))));
        assert_eq!(parse_tools(&json!([{"parameters": {}}])), Err(ToolsError::Invalid(0, "name is required")));
        assert!(matches!(parse_tools(&json!([{"name": "a b", "parameters": {}}])), Err(ToolsError::Invalid(0, _))));
        assert!(matches!(parse_tools(&json!([{"name": "a"}])), Err(ToolsError::Invalid(0, _))));
        assert!(matches!(
            parse_tools(&json!([{"name": "a", "parameters": {}, "x": 1}])),
            Err(ToolsError::Invalid(0, _))
        ));
        assert!(matches!(parse_tools(&json!([{"name": "a", "parameters": []}])), Err(ToolsError::Invalid(0, _))));
        assert_eq!(
            parse_tools(&json!([{"name": "a", "parameters": {}}, {"name": "a", "parameters": {}}])),
            Err(ToolsError::Duplicate("a".into()))
        );
        assert!(!is_name(&"x".repeat(65)));
    }

    /// More than 64 tools, or more than 64 KiB, is refused.
    #[test]
    fn bounds() {
        let many: Vec<Value> = (0..=MAX_TOOLS).map(|i| json!({"name": format!("t{i}"), "parameters": {}})).collect();
        assert_eq!(parse_tools(&Value::Array(many)), Err(ToolsError::TooLarge));
        let big = json!([{"name": "a", "description": "d".repeat(MAX_TOOLS_BYTES), "parameters": {}}]);
        assert_eq!(parse_tools(&big), Err(ToolsError::TooLarge));
        assert_eq!(parse_tools_json(&vec![b' '; MAX_TOOLS_BYTES + 1]), Err(ToolsError::TooLarge));
    }

    /// The signature is HMAC-SHA256 of "timestamp.body", hex, as an independent implementation
    /// (Python's hmac module) computes it.
    #[test]
    fn signature_vector() {
        // python3 -c 'import hmac,hashlib;print(hmac.new(b"s3cret",b"1700000000.{\"a\":1}",hashlib.sha256).hexdigest())'
        assert_eq!(
            signature(b"s3cret", 1_700_000_000, br#"{"a":1}"#),
            "sha256=1698a50bc74d1ff1db85c4e0a5297c2ad9fdba245d5737cdb789e4cc6e098940"
        );
    }

    /// The request body carries the call, the function and its parsed arguments.
    #[test]
    fn request() {
        let body = request_body("CA1", "call_7", "book", &json!({"people": 2}));
        let v: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(v, json!({"callSid": "CA1", "callId": "call_7", "name": "book", "arguments": {"people": 2}}));
    }

    /// Answers: a string or JSON output, an optional intent; anything else is an error.
    #[test]
    fn answers() {
        assert_eq!(parse_answer(br#"{"output":"done"}"#), Ok(Answer { output: "done".into(), intent: None }));
        assert_eq!(
            parse_answer(br#"{"output":{"ok":true},"intent":"booking"}"#),
            Ok(Answer { output: r#"{"ok":true}"#.into(), intent: Some("booking".into()) })
        );
        assert_eq!(parse_answer(b"[]"), Err(AnswerError::Shape));
        assert_eq!(parse_answer(br#"{"result":1}"#), Err(AnswerError::Shape));
        assert_eq!(parse_answer(br#"{"output":"x","intent":7}"#), Err(AnswerError::Intent));
        assert_eq!(parse_answer(&vec![b' '; MAX_ANSWER_BYTES + 1]), Err(AnswerError::TooLarge));
        assert_eq!(error_output("timed out"), r#"{"error":"timed out"}"#);
    }
}
