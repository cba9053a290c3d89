//! Wire formats: bytes ⇄ typed values.
//!
//! Invariant: no clocks, no sockets, no session state; every parser is total (errors, not panics).

pub mod events;
pub mod frontend;
pub mod http;
pub mod http_client;
pub mod realtime;
pub mod retell;
pub mod twilio;
pub mod ws;

/// Whether `text` holds a JSON object (its first non-whitespace byte is `{`). serde's derived
/// structs also read a JSON array, fields by position (`["ping"]` as `{"type":"ping"}`), which
/// none of these protocols allows; the parsers that read such structs check this first.
pub(crate) fn is_json_object(text: &[u8]) -> bool {
    text.iter().find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r')) == Some(&b'{')
}
