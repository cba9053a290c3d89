//! HTTP/1.1 as a client speaks it: a request writer and an incremental response parser
//! (`Content-Length`, chunked, or read-to-close bodies) with size limits.
//!
//! Invariant: no I/O; "need more bytes" is a value, and no input makes the parser panic or grow
//! past its limits.

use bytes::Bytes;

use super::chunked::{ChunkError, ChunkedDecoder, Decode};

/// Largest response head accepted, bytes.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Largest response body accepted, bytes.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// Writes a request with `Host`, `Content-Length` (when there is a body) and `Connection: close`.
pub fn write_request(
    out: &mut Vec<u8>,
    method: &str,
    host: &str,
    target: &str,
    headers: &[(String, String)],
    body: &[u8],
) {
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(host.as_bytes());
    out.extend_from_slice(b"\r\nconnection: close\r\n");
    for (name, value) in headers {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !body.is_empty() || method == "POST" || method == "PUT" {
        out.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
}

/// A complete response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Header fields, names lowercased, in order.
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked.
    pub body: Bytes,
}

impl Response {
    /// The first value of header `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// Why a response was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    /// Not HTTP/1.x, or a malformed head, length or chunk.
    #[error("malformed response: {0}")]
    Malformed(&'static str),
    /// Head or body over the limits.
    #[error("response too large")]
    TooLarge,
    /// The connection closed before the response was complete.
    #[error("connection closed mid-response")]
    Truncated,
}

/// Parses the response at the start of `buf`. `eof` says the peer closed, so a body without a
/// length ends here. Returns `Ok(None)` when more bytes are needed.
///
/// # Errors
/// [`ResponseError`] when the bytes can never form an acceptable response.
pub fn parse_response(buf: &[u8], eof: bool) -> Result<Option<Response>, ResponseError> {
    let mut slots = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Response::new(&mut slots);
    let head_len = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD_BYTES => return Err(ResponseError::TooLarge),
        Ok(httparse::Status::Partial) if eof => return Err(ResponseError::Truncated),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(ResponseError::Malformed("bad head")),
    };
    if head_len > MAX_HEAD_BYTES {
        return Err(ResponseError::TooLarge);
    }
    let status = parsed.code.ok_or(ResponseError::Malformed("no status"))?;
    let headers: Vec<(String, String)> = parsed
        .headers
        .iter()
        .map(|h| (h.name.to_ascii_lowercase(), String::from_utf8_lossy(h.value).trim().to_owned()))
        .collect();
    let find = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    let rest = &buf[head_len..];
    let chunked = find("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    let body = if status == 204 || status == 304 || (100..200).contains(&status) {
        Some(Bytes::new())
    } else if chunked {
        dechunk(rest, eof)?
    } else if let Some(length) = find("content-length") {
        let length: usize = length.parse().map_err(|_| ResponseError::Malformed("bad content-length"))?;
        if length > MAX_BODY_BYTES {
            return Err(ResponseError::TooLarge);
        }
        match rest.len() {
            n if n >= length => Some(Bytes::copy_from_slice(&rest[..length])),
            _ if eof => return Err(ResponseError::Truncated),
            _ => None,
        }
    } else if rest.len() > MAX_BODY_BYTES {
        return Err(ResponseError::TooLarge);
    } else if eof {
        Some(Bytes::copy_from_slice(rest))
    } else {
        None
    };
    Ok(body.map(|body| Response { status, headers, body }))
}

/// Decodes a chunked body (the same decoder as request bodies); `Ok(None)` while incomplete.
fn dechunk(rest: &[u8], eof: bool) -> Result<Option<Bytes>, ResponseError> {
    let mut decoder = ChunkedDecoder::new(MAX_BODY_BYTES, MAX_HEAD_BYTES, 64);
    let mut body = Vec::new();
    match decoder.decode(rest, &mut body) {
        Ok(Decode::Complete { .. }) => Ok(Some(Bytes::from(body))),
        // A server that closes after its last chunk, without the final CRLF, sent the whole body.
        Ok(Decode::Incomplete) if eof && decoder.last_chunk_seen() => Ok(Some(Bytes::from(body))),
        Ok(Decode::Incomplete) if eof => Err(ResponseError::Truncated),
        Ok(Decode::Incomplete) => Ok(None),
        Err(ChunkError::Malformed(reason)) => Err(ResponseError::Malformed(reason)),
        Err(ChunkError::TooLarge { .. } | ChunkError::TrailerTooLarge { .. }) => Err(ResponseError::TooLarge),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Requests carry host, close, headers and length.
    #[test]
    fn writes_requests() {
        let mut out = Vec::new();
        write_request(
            &mut out,
            "POST",
            "api.example:443",
            "/x",
            &[("authorization".into(), "Basic abc".into())],
            b"a=1",
        );
        assert_eq!(
            String::from_utf8(out).expect("ascii"),
            "POST /x HTTP/1.1\r\nhost: api.example:443\r\nconnection: close\r\nauthorization: Basic abc\r\ncontent-length: 3\r\n\r\na=1"
        );
    }

    /// Content-Length, chunked and read-to-close bodies, each split anywhere.
    #[test]
    fn bodies() {
        let cases: [(&[u8], bool, &[u8]); 3] = [
            (b"HTTP/1.1 201 Created\r\nContent-Length: 5\r\n\r\nhello", false, b"hello"),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhel\r\n2;x=y\r\nlo\r\n0\r\n\r\n",
                false,
                b"hello",
            ),
            (b"HTTP/1.0 200 OK\r\n\r\nhello", true, b"hello"),
        ];
        for (raw, needs_eof, body) in cases {
            for cut in 0..raw.len() {
                assert!(matches!(parse_response(&raw[..cut], false), Ok(None)), "prefix {cut} of {raw:?}");
            }
            let done = parse_response(raw, needs_eof).expect("valid").expect("complete");
            assert_eq!(&done.body[..], body);
        }
        let r = parse_response(
            b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
            false,
        )
        .expect("valid")
        .expect("complete");
        assert_eq!((r.status, r.header("content-type")), (201, Some("application/json")));
    }

    /// Truncation, garbage and oversize are errors.
    #[test]
    fn errors() {
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc", true),
            Err(ResponseError::Truncated)
        );
        assert!(matches!(parse_response(b"garbage\r\n\r\n", false), Err(ResponseError::Malformed(_))));
        let big = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", MAX_BODY_BYTES + 1);
        assert_eq!(parse_response(big.as_bytes(), false), Err(ResponseError::TooLarge));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", false).is_err());
        let huge = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nffffffffffffffff\r\nx";
        assert_eq!(parse_response(huge, false), Err(ResponseError::TooLarge));
    }

    proptest! {
        /// Chunked bodies with any chunk sizes (huge ones included) never panic.
        #[test]
        fn chunk_sizes_never_panic(sizes in proptest::collection::vec(any::<u64>(), 0..4), eof in any::<bool>()) {
            let mut raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            for s in sizes {
                raw.extend_from_slice(format!("{s:x}\r\nabc\r\n").as_bytes());
            }
            let _ = parse_response(&raw, eof);
        }

        /// No byte string makes the parser panic, at EOF or not.
        #[test]
        fn never_panics(buf in proptest::collection::vec(any::<u8>(), 0..512), eof in any::<bool>()) {
            let _ = parse_response(&buf, eof);
        }
    }
}
