//! Wire formats: bytes ⇄ typed values.
//!
//! Invariant: no clocks, no sockets, no session state; every parser is total (errors, not panics).

pub mod chunked;
pub mod events;
pub mod frontend;
pub mod http;
pub mod http_client;
pub mod realtime;
pub mod retell;
pub mod tools;
pub mod twilio;
pub mod ws;

/// Frees `buf`'s allocation when it is empty and holds more than `keep` bytes: a buffer a burst
/// made large is given back rather than kept for the life of an idle connection.
pub(crate) fn release_if_large(buf: &mut Vec<u8>, keep: usize) {
    if buf.is_empty() && buf.capacity() > keep {
        *buf = Vec::new();
    }
}

/// Whether `text` holds a JSON object (its first non-whitespace byte is `{`). serde's derived
/// structs also read a JSON array, fields by position (`["ping"]` as `{"type":"ping"}`), which
/// none of these protocols allows; the parsers that read such structs check this first.
pub(crate) fn is_json_object(text: &[u8]) -> bool {
    text.iter().find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r')) == Some(&b'{')
}
