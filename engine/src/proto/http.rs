//! HTTP/1.1 request heads from bytes (httparse) with limits, and responses into a caller's buffer.
//!
//! Invariant: no I/O, no clock; "not enough bytes yet" is [`Parse::Incomplete`], never an error, and
//! no input makes this panic.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Uri, Version};

use crate::config::Limits;

/// Most header lines the parser has room for; `Limits::max_headers` may only lower it.
pub const HEADER_SLOTS: usize = 128;

/// A parsed request head plus what the connection needs to know about its body and lifetime.
#[derive(Debug, Clone)]
pub struct RequestHead {
    /// Request method.
    pub method: Method,
    /// Request target in origin form (`/path?query`), or `*` for `OPTIONS *`.
    pub uri: Uri,
    /// HTTP/1.0 or HTTP/1.1.
    pub version: Version,
    /// Header fields, names lowercased.
    pub headers: HeaderMap,
    /// Body length from `Content-Length` (0 when absent, and for a chunked body).
    pub content_length: usize,
    /// The body is sent with the chunked transfer coding (RFC 9112 §7.1): decode it with
    /// [`ChunkedDecoder`](super::chunked::ChunkedDecoder). Never together with `Content-Length`.
    pub chunked: bool,
    /// Whether the connection stays open after the response (version default and `Connection`).
    pub keep_alive: bool,
    /// The client sent `Expect: 100-continue` and waits for a go-ahead before its body.
    pub expect_continue: bool,
}

/// Outcome of feeding the bytes received so far to [`parse_head`].
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // Consumed at once by the caller; boxing would allocate per request.
pub enum Parse {
    /// The head is not complete yet; read more and call again with the longer buffer.
    Incomplete,
    /// A whole head: the body (if any) starts at `head_len`.
    Complete {
        /// The parsed head.
        head: RequestHead,
        /// Bytes of `buf` the head used.
        head_len: usize,
    },
}

/// Why a request head is refused; each maps to one status code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    /// The head is larger than `max_head_bytes`.
    #[error("request head is larger than {limit} bytes")]
    HeadTooLarge {
        /// The limit that was crossed.
        limit: usize,
    },
    /// More header lines than `max_headers`.
    #[error("request has more than {limit} header fields")]
    TooManyHeaders {
        /// The limit that was crossed.
        limit: usize,
    },
    /// The body announced by `Content-Length` is larger than `max_body_bytes`.
    #[error("request body of {length} bytes is larger than the limit of {limit} bytes")]
    BodyTooLarge {
        /// The announced length.
        length: u64,
        /// The limit that was crossed.
        limit: usize,
    },
    /// `Transfer-Encoding` names a coding other than `chunked` (answered 501).
    #[error("only the chunked transfer coding is supported")]
    TransferEncoding,
    /// `Expect` asks for something other than `100-continue` (answered 417).
    #[error("unsupported expectation; only 100-continue is supported")]
    Expectation,
    /// The request is not well-formed HTTP/1.x.
    #[error("malformed request: {0}")]
    Malformed(&'static str),
}

impl HeadError {
    /// The status this error is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::HeadTooLarge { .. } | Self::TooManyHeaders { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::TransferEncoding => StatusCode::NOT_IMPLEMENTED,
            Self::Expectation => StatusCode::EXPECTATION_FAILED,
            Self::Malformed(_) => StatusCode::BAD_REQUEST,
        }
    }
}

/// Parses the request head at the start of `buf`.
///
/// # Errors
/// [`HeadError`] when the head (complete or not) already breaks a limit or is malformed.
pub fn parse_head(buf: &[u8], limits: &Limits) -> Result<Parse, HeadError> {
    let mut slots = [httparse::EMPTY_HEADER; HEADER_SLOTS];
    let max_headers = limits.max_headers.min(HEADER_SLOTS);
    let mut req = httparse::Request::new(&mut slots[..max_headers]);
    let status = match req.parse(buf) {
        Ok(s) => s,
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooManyHeaders { limit: max_headers }),
        Err(e) => return Err(HeadError::Malformed(malformed_reason(e))),
    };
    let head_len = match status {
        httparse::Status::Partial => {
            if buf.len() > limits.max_head_bytes {
                return Err(HeadError::HeadTooLarge { limit: limits.max_head_bytes });
            }
            return Ok(Parse::Incomplete);
        }
        httparse::Status::Complete(n) => n,
    };
    if head_len > limits.max_head_bytes {
        return Err(HeadError::HeadTooLarge { limit: limits.max_head_bytes });
    }
    // httparse only reports Complete once method, path and version are all present.
    let (Some(method), Some(path), Some(minor)) = (req.method, req.path, req.version) else {
        return Err(HeadError::Malformed("incomplete request line"));
    };
    let method = Method::from_bytes(method.as_bytes()).map_err(|_| HeadError::Malformed("bad method"))?;
    let version = if minor == 0 { Version::HTTP_10 } else { Version::HTTP_11 };
    let (uri, authority) = parse_target(&method, path)?;

    let mut headers = HeaderMap::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| HeadError::Malformed("bad header name"))?;
        let value = HeaderValue::from_bytes(h.value).map_err(|_| HeadError::Malformed("bad header value"))?;
        headers.append(name, value);
    }

    // HTTP/1.1 requests carry exactly one Host; any request with more than one, or an invalid
    // one, is refused (RFC 9112 §3.2).
    let mut hosts = headers.get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => return Err(HeadError::Malformed("a request may carry only one Host header")),
        (None, None) if version == Version::HTTP_11 => {
            return Err(HeadError::Malformed("an HTTP/1.1 request needs a Host header"))
        }
        (Some(host), None) if !valid_host(host.as_bytes()) => {
            return Err(HeadError::Malformed("the Host header is not a valid host[:port]"))
        }
        _ => {}
    }
    // The absolute form's authority stands in for Host (RFC 9112 §3.2.2), so what handlers build
    // from Host (webhook and stream URLs) names what the client asked for.
    if let Some(authority) = authority {
        if !valid_host(authority.as_str().as_bytes()) {
            return Err(HeadError::Malformed("the request target's authority is not a valid host[:port]"));
        }
        let value =
            HeaderValue::from_str(authority.as_str()).map_err(|_| HeadError::Malformed("bad request target"))?;
        headers.insert(header::HOST, value);
    }
    let chunked = chunked(version, &headers)?;
    let content_length = content_length(&headers, limits)?;
    let keep_alive = keep_alive(version, &headers);
    let expect_continue = match headers.get(header::EXPECT) {
        None => false,
        Some(v) if v.as_bytes().eq_ignore_ascii_case(b"100-continue") => true,
        Some(_) => return Err(HeadError::Expectation),
    };

    Ok(Parse::Complete {
        head: RequestHead { method, uri, version, headers, content_length, chunked, keep_alive, expect_continue },
        head_len,
    })
}

/// The request headers an answer to a refused head still depends on (today only `Origin`, for
/// CORS), recovered from `buf` when it holds a complete, well-formed head; empty otherwise.
///
/// Used after [`parse_head`] refused a head for a limit or an unsupported feature (413, 417, 501)
/// so that a browser is shown that status rather than a CORS failure. Heads too large or with too
/// many fields to parse give an empty map.
pub fn error_context(buf: &[u8]) -> HeaderMap {
    let mut out = HeaderMap::new();
    let mut slots = [httparse::EMPTY_HEADER; HEADER_SLOTS];
    let mut req = httparse::Request::new(&mut slots);
    if let Ok(httparse::Status::Complete(_)) = req.parse(buf) {
        if let Some(h) = req.headers.iter().find(|h| h.name.eq_ignore_ascii_case("origin")) {
            if let Ok(value) = HeaderValue::from_bytes(h.value) {
                out.insert(header::ORIGIN, value);
            }
        }
    }
    out
}

/// A header's value split on commas, each token trimmed: `Connection: keep-alive, Upgrade`.
pub fn header_tokens<'a>(headers: &'a HeaderMap, name: &HeaderName) -> impl Iterator<Item = &'a str> + 'a {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// What a response says about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Connection {
    /// HTTP/1.1's default: stays open; no header.
    Default,
    /// `Connection: keep-alive`, for HTTP/1.0 clients that asked for it.
    KeepAlive,
    /// `Connection: close`: the server closes after this response.
    Close,
}

/// The header naming the node that answered (`--node-id`), on every answer and 101.
pub const NODE_HEADER: &str = "x-relay-node";

/// Writes `x-relay-node: <node>` into `out`, unless `node` is empty.
pub fn write_node(out: &mut Vec<u8>, node: &str) {
    if !node.is_empty() {
        out.extend_from_slice(NODE_HEADER.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(node.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
}

/// Writes `response` as HTTP/1.1 into `out`, with `Content-Length` and the `connection` header.
/// `head_only` leaves the body out (answers to `HEAD`). `date` is an IMF-fixdate.
pub fn write_response(
    out: &mut Vec<u8>,
    response: &http::Response<Bytes>,
    connection: Connection,
    head_only: bool,
    date: &str,
    node: &str,
) {
    let status = response.status();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("Unknown").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in response.headers() {
        if name == header::CONTENT_LENGTH || name == header::CONNECTION {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !date.is_empty() {
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(date.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    write_node(out, node);
    let body = response.body();
    let bodiless = status.is_informational() || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
    if !bodiless {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(body.len().to_string().as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    match connection {
        Connection::Default => {}
        Connection::KeepAlive => out.extend_from_slice(b"connection: keep-alive\r\n"),
        Connection::Close => out.extend_from_slice(b"connection: close\r\n"),
    }
    out.extend_from_slice(b"\r\n");
    if !bodiless && !head_only {
        out.extend_from_slice(body);
    }
}

/// The interim response that tells an `Expect: 100-continue` client to send its body.
pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// The request target as origin form, and the authority of an absolute-form target.
fn parse_target(method: &Method, path: &str) -> Result<(Uri, Option<http::uri::Authority>), HeadError> {
    if path == "*" {
        return if method == Method::OPTIONS {
            Ok((Uri::from_static("*"), None))
        } else {
            Err(HeadError::Malformed("'*' target is only for OPTIONS"))
        };
    }
    if path.starts_with('/') {
        let uri = path.parse::<Uri>().map_err(|_| HeadError::Malformed("bad request target"))?;
        return Ok((uri, None));
    }
    // Absolute form (`http://host/path`), which servers must accept (RFC 9112 §3.2.2); routing
    // uses its path and query.
    let uri = path.parse::<Uri>().map_err(|_| HeadError::Malformed("bad request target"))?;
    match (uri.scheme_str(), uri.authority(), uri.path_and_query()) {
        (Some("http" | "https"), Some(authority), Some(pq)) => {
            let origin = pq.as_str().parse::<Uri>().map_err(|_| HeadError::Malformed("bad request target"))?;
            Ok((origin, Some(authority.clone())))
        }
        _ => Err(HeadError::Malformed("request target must be an absolute path or absolute URI")),
    }
}

/// Whether a `Host` value is `uri-host [":" port]` (RFC 9110 §7.2, RFC 3986 §3.2.2): an IP
/// literal in brackets or a reg-name (unreserved, sub-delims and %-escapes; an IPv4 address is
/// one), then optionally a port of up to 65535. Empty is valid (an authority-less target).
fn valid_host(value: &[u8]) -> bool {
    let (host_ok, port) = if let Some(literal) = value.strip_prefix(b"[") {
        let Some(close) = literal.iter().position(|&b| b == b']') else {
            return false;
        };
        let inside = std::str::from_utf8(&literal[..close]).unwrap_or("");
        let port = match &literal[close + 1..] {
            [] => None,
            [b':', port @ ..] => Some(port),
            _ => return false,
        };
        (inside.parse::<std::net::Ipv6Addr>().is_ok(), port)
    } else {
        let (name, port) = match value.iter().position(|&b| b == b':') {
            Some(i) => (&value[..i], Some(&value[i + 1..])),
            None => (value, None),
        };
        (valid_reg_name(name), port)
    };
    host_ok && port.is_none_or(valid_port)
}

/// RFC 3986 reg-name: unreserved, sub-delims and `%` followed by two hex digits.
fn valid_reg_name(name: &[u8]) -> bool {
    let mut i = 0;
    while i < name.len() {
        match name[i] {
            b'%' => {
                if !name.get(i + 1..i + 3).is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) {
                    return false;
                }
                i += 3;
            }
            b if b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=".contains(&b) => i += 1,
            _ => return false,
        }
    }
    true
}

/// A port: digits only (an empty port is allowed by RFC 3986 and means the default), at most 65535.
fn valid_port(port: &[u8]) -> bool {
    port.len() <= 5
        && port.iter().all(u8::is_ascii_digit)
        && port.iter().fold(0u32, |n, &d| n * 10 + u32::from(d - b'0')) <= u32::from(u16::MAX)
}

/// Whether the body is chunked, from `Transfer-Encoding` (RFC 9112 §6.1).
///
/// # Errors
/// 400 with `Content-Length` too (request smuggling: the two framings must never both be
/// believable), in HTTP/1.0, with an empty list or `chunked` twice; 501 for any other coding,
/// which the relay does not implement.
fn chunked(version: Version, headers: &HeaderMap) -> Result<bool, HeadError> {
    if !headers.contains_key(header::TRANSFER_ENCODING) {
        return Ok(false);
    }
    if headers.contains_key(header::CONTENT_LENGTH) {
        return Err(HeadError::Malformed("a request may not carry both Content-Length and Transfer-Encoding"));
    }
    if version == Version::HTTP_10 {
        return Err(HeadError::Malformed("Transfer-Encoding is not defined for HTTP/1.0"));
    }
    let mut chunked = 0;
    let mut codings = 0;
    for token in headers.get_all(header::TRANSFER_ENCODING).iter().flat_map(|v| v.as_bytes().split(|&b| b == b',')) {
        let token = token.trim_ascii();
        if token.is_empty() {
            continue;
        }
        codings += 1;
        if !token.eq_ignore_ascii_case(b"chunked") {
            return Err(HeadError::TransferEncoding);
        }
        chunked += 1;
    }
    match (codings, chunked) {
        (0, _) => Err(HeadError::Malformed("empty Transfer-Encoding")),
        (1, 1) => Ok(true),
        _ => Err(HeadError::Malformed("chunked applied more than once")),
    }
}

fn content_length(headers: &HeaderMap, limits: &Limits) -> Result<usize, HeadError> {
    let mut length: Option<u64> = None;
    for v in headers.get_all(header::CONTENT_LENGTH) {
        let bytes = v.as_bytes();
        if bytes.is_empty() || bytes.len() > 19 || !bytes.iter().all(u8::is_ascii_digit) {
            return Err(HeadError::Malformed("bad Content-Length"));
        }
        // At most 19 ASCII digits, so the parse cannot overflow a u64.
        let n: u64 = std::str::from_utf8(bytes)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or(HeadError::Malformed("bad Content-Length"))?;
        if length.is_some_and(|l| l != n) {
            return Err(HeadError::Malformed("conflicting Content-Length headers"));
        }
        length = Some(n);
    }
    let length = length.unwrap_or(0);
    if length > limits.max_body_bytes as u64 {
        return Err(HeadError::BodyTooLarge { length, limit: limits.max_body_bytes });
    }
    // Checked against a usize limit just above.
    Ok(length as usize)
}

fn keep_alive(version: Version, headers: &HeaderMap) -> bool {
    let mut close = false;
    let mut keep = false;
    for t in header_tokens(headers, &header::CONNECTION) {
        close |= t.eq_ignore_ascii_case("close");
        keep |= t.eq_ignore_ascii_case("keep-alive");
    }
    if close {
        false
    } else {
        version == Version::HTTP_11 || keep
    }
}

fn malformed_reason(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::HeaderName => "bad header name",
        httparse::Error::HeaderValue => "bad header value",
        httparse::Error::NewLine => "bad line ending",
        httparse::Error::Status => "bad status",
        httparse::Error::Token => "bad token in request line",
        httparse::Error::TooManyHeaders => "too many headers",
        httparse::Error::Version => "unsupported HTTP version",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn complete(buf: &[u8]) -> (RequestHead, usize) {
        match parse_head(buf, &Limits::default()).expect("valid head") {
            Parse::Complete { head, head_len } => (head, head_len),
            Parse::Incomplete => panic!("expected a complete head"),
        }
    }

    /// A refused head still yields its `Origin`; a partial or malformed one yields nothing.
    #[test]
    fn error_context_recovers_the_origin() {
        let limits = Limits { max_body_bytes: 10, ..Limits::default() };
        let head = b"POST /x HTTP/1.1\r\nHost: h\r\norigin: https://a.example\r\nContent-Length: 99\r\n\r\n";
        assert!(matches!(parse_head(head, &limits), Err(HeadError::BodyTooLarge { .. })));
        let ctx = error_context(head);
        assert_eq!(ctx.get(header::ORIGIN).map(HeaderValue::as_bytes), Some(&b"https://a.example"[..]));
        assert_eq!(ctx.len(), 1, "only the headers an error answer needs");
        assert!(error_context(b"POST /x HTTP/1.1\r\nOrigin: https://a.example\r\n").is_empty(), "partial head");
        assert!(error_context(b"POST /x HTTP/1.1\r\nOri gin: x\r\n\r\n").is_empty(), "malformed head");
        assert!(error_context(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n").is_empty(), "no origin");
    }

    /// A POST head gives method, path, query, body length and keep-alive.
    #[test]
    fn parses_post() {
        let raw = b"POST /start-call?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello";
        let (head, len) = complete(raw);
        assert_eq!(head.method, Method::POST);
        assert_eq!(head.uri.path(), "/start-call");
        assert_eq!(head.uri.query(), Some("x=1"));
        assert_eq!(head.content_length, 5);
        assert!(head.keep_alive);
        assert_eq!(&raw[len..], b"hello");
    }

    /// Every prefix of a valid head is Incomplete, never an error.
    #[test]
    fn prefixes_are_incomplete() {
        let raw = b"GET /health HTTP/1.1\r\nHost: a\r\nX: y\r\n\r\n";
        for n in 0..raw.len() {
            assert!(matches!(parse_head(&raw[..n], &Limits::default()), Ok(Parse::Incomplete)), "prefix {n}");
        }
    }

    /// Connection semantics: 1.1 keeps alive unless `close`; 1.0 closes unless `keep-alive`.
    #[test]
    fn keep_alive_rules() {
        assert!(!complete(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n").0.keep_alive);
        assert!(!complete(b"GET / HTTP/1.0\r\n\r\n").0.keep_alive);
        assert!(complete(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").0.keep_alive);
        assert!(complete(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade, keep-alive\r\n\r\n").0.keep_alive);
    }

    /// Oversized heads (complete or not), too many headers and big bodies get 431/431/413.
    #[test]
    fn limits() {
        let limits = Limits { max_head_bytes: 128, max_headers: 4, max_body_bytes: 10, ..Limits::default() };
        let long = format!("GET /{} HTTP/1.1\r\nHost: h\r\n", "a".repeat(200));
        let e = parse_head(long.as_bytes(), &limits).unwrap_err();
        assert_eq!(e.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
        let e = parse_head(b"GET / HTTP/1.1\r\nHost: h\r\na: 1\r\nb: 2\r\nc: 3\r\nd: 4\r\ne: 5\r\n\r\n", &limits)
            .unwrap_err();
        assert_eq!(e, HeadError::TooManyHeaders { limit: 4 });
        let e = parse_head(b"POST / HTTP/1.1\r\nHost: h\r\ncontent-length: 11\r\n\r\n", &limits).unwrap_err();
        assert_eq!(e.status(), StatusCode::PAYLOAD_TOO_LARGE);
        let e = parse_head(b"POST / HTTP/1.1\r\nHost: h\r\ncontent-length: 99999999999999999999\r\n\r\n", &limits)
            .unwrap_err();
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
    }

    /// Garbage, bad targets and conflicting lengths are refused with their status.
    #[test]
    fn malformed() {
        let l = Limits::default();
        assert_eq!(parse_head(b"\x00\x01\x02 / HTTP/1.1\r\n\r\n", &l).unwrap_err().status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            parse_head(b"GET http:x HTTP/1.1\r\nHost: h\r\n\r\n", &l).unwrap_err().status(),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            parse_head(b"GET ftp://h/x HTTP/1.1\r\nHost: h\r\n\r\n", &l).unwrap_err().status(),
            StatusCode::BAD_REQUEST
        );
        let Ok(Parse::Complete { head, .. }) = parse_head(b"GET http://h:1/a?b=c HTTP/1.1\r\nHost: h\r\n\r\n", &l)
        else {
            panic!("absolute form is accepted")
        };
        assert_eq!((head.uri.path(), head.uri.query()), ("/a", Some("b=c")));
        assert_eq!(parse_head(b"GET * HTTP/1.1\r\nHost: h\r\n\r\n", &l).unwrap_err().status(), StatusCode::BAD_REQUEST);
        assert!(parse_head(b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n", &l).is_ok());
        assert_eq!(
            parse_head(b"POST / HTTP/1.1\r\nHost: h\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n", &l)
                .unwrap_err()
                .status(),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(parse_head(b"GET / HTTP/2.0\r\n\r\n", &l).unwrap_err().status(), StatusCode::BAD_REQUEST);
    }

    /// HTTP/1.1 needs exactly one Host; HTTP/1.0 may omit it; other expectations get 417.
    #[test]
    fn host_and_expect() {
        let l = Limits::default();
        assert_eq!(parse_head(b"GET / HTTP/1.1\r\n\r\n", &l).unwrap_err().status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            parse_head(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", &l).unwrap_err().status(),
            StatusCode::BAD_REQUEST
        );
        assert!(matches!(parse_head(b"GET / HTTP/1.0\r\n\r\n", &l), Ok(Parse::Complete { .. })));
        let e = parse_head(b"POST / HTTP/1.1\r\nHost: h\r\nExpect: magic\r\n\r\n", &l).unwrap_err();
        assert_eq!(e.status(), StatusCode::EXPECTATION_FAILED);
    }

    /// `Transfer-Encoding: chunked` alone marks a chunked body; with `Content-Length`, in HTTP/1.0,
    /// empty or repeated it is 400; any other coding (even before chunked) is 501.
    #[test]
    fn transfer_encoding() {
        let l = Limits::default();
        let parse = |te: &str| {
            let raw = format!("POST / HTTP/1.1\r\nHost: h\r\n{te}\r\n");
            parse_head(raw.as_bytes(), &l).map(|p| match p {
                Parse::Complete { head, .. } => (head.chunked, head.content_length),
                Parse::Incomplete => panic!("complete head"),
            })
        };
        assert_eq!(parse("Transfer-Encoding: chunked\r\n"), Ok((true, 0)));
        assert_eq!(parse("Transfer-Encoding: CHUNKED \r\n"), Ok((true, 0)));
        assert_eq!(parse("Transfer-Encoding: ,chunked,\r\n"), Ok((true, 0)));
        assert_eq!(parse("Content-Length: 3\r\n"), Ok((false, 3)));
        for te in ["gzip", "gzip, chunked", "chunked, gzip", "identity", "chunked;q=1"] {
            assert_eq!(parse(&format!("Transfer-Encoding: {te}\r\n")), Err(HeadError::TransferEncoding), "{te}");
        }
        assert_eq!(
            parse("Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n"),
            Err(HeadError::TransferEncoding),
            "codings over several lines are one list"
        );
        for te in [
            "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
            "Content-Length: 0\r\nTransfer-Encoding: chunked\r\n",
            "Transfer-Encoding: chunked, chunked\r\n",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
            "Transfer-Encoding: \r\n",
            "Transfer-Encoding: ,\r\n",
        ] {
            assert_eq!(parse(te).map_err(|e| e.status()), Err(StatusCode::BAD_REQUEST), "{te:?}");
        }
        let e = parse_head(b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", &l).unwrap_err();
        assert_eq!(e.status(), StatusCode::BAD_REQUEST, "HTTP/1.0 has no transfer codings");
    }

    /// Host must be `host[:port]`: names, IPv4, bracketed IPv6 and empty pass; spaces, control
    /// characters, bad ports, unbracketed or broken IPv6 and userinfo are 400, in 1.0 as in 1.1;
    /// two Hosts are 400 in 1.0 too.
    #[test]
    fn host_values() {
        let l = Limits::default();
        let status = |version: &str, host: &[u8]| {
            let mut raw = format!("GET / HTTP/{version}\r\nHost: ").into_bytes();
            raw.extend_from_slice(host);
            raw.extend_from_slice(b"\r\n\r\n");
            parse_head(&raw, &l).map(|_| ()).map_err(|e| e.status())
        };
        for good in [
            &b"relay.example"[..],
            b"relay.example:443",
            b"127.0.0.1:8080",
            b"[::1]",
            b"[::1]:65535",
            b"h:",
            b"",
            b"a-b_c.~%41!$&'()*+,;=",
            b"xn--bcher-kva.example",
        ] {
            assert_eq!(status("1.1", good), Ok(()), "{:?}", String::from_utf8_lossy(good));
        }
        for bad in [
            &b"a b"[..],
            b"a\tb",
            b"h:65536",
            b"h:99999",
            b"h:123456",
            b"h:-1",
            b"h:8o",
            b"h:80:81",
            b"::1",
            b"[::1",
            b"[::1]80",
            b"[zz]",
            b"[]",
            b"user@h",
            b"a/b",
            b"h?x",
            b"%zz",
            b"%4",
            b"h\x80",
        ] {
            for version in ["1.1", "1.0"] {
                assert_eq!(status(version, bad), Err(StatusCode::BAD_REQUEST), "{:?}", String::from_utf8_lossy(bad));
            }
        }
        let e = parse_head(b"GET / HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n", &l).unwrap_err();
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
    }

    /// An absolute-form target's authority replaces Host (RFC 9112 §3.2.2), and must itself be
    /// valid; Host is still required in HTTP/1.1.
    #[test]
    fn absolute_form_authority_is_the_host() {
        let l = Limits::default();
        let (head, _) = complete(b"GET http://relay.example:8443/health HTTP/1.1\r\nHost: other\r\n\r\n");
        assert_eq!(head.headers.get(header::HOST).map(HeaderValue::as_bytes), Some(&b"relay.example:8443"[..]));
        assert_eq!(head.uri.path(), "/health");
        let (head, _) = complete(b"GET http://relay.example/ HTTP/1.0\r\n\r\n");
        assert_eq!(head.headers.get(header::HOST).map(HeaderValue::as_bytes), Some(&b"relay.example"[..]));
        let e = parse_head(b"GET http://u@h/ HTTP/1.1\r\nHost: h\r\n\r\n", &l).unwrap_err();
        assert_eq!(e.status(), StatusCode::BAD_REQUEST, "userinfo in the target");
        let e = parse_head(b"GET http://h/ HTTP/1.1\r\n\r\n", &l).unwrap_err();
        assert_eq!(e.status(), StatusCode::BAD_REQUEST, "no Host");
    }

    /// Expect: 100-continue is seen.
    #[test]
    fn expect_continue() {
        assert!(
            complete(b"POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
                .0
                .expect_continue
        );
    }

    /// Responses carry status line, headers, length, close and body; HEAD and 204 carry no body.
    #[test]
    fn writes_responses() {
        let resp = http::Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .body(Bytes::from_static(b"{}"))
            .expect("static response");
        let mut out = Vec::new();
        write_response(&mut out, &resp, Connection::Close, false, "Sat, 21 Nov 2026 00:00:00 GMT", "");
        let s = String::from_utf8(out).expect("ascii");
        assert!(s.starts_with("HTTP/1.1 200 OK\r\n"), "{s}");
        assert!(s.contains("content-type: application/json\r\n"));
        assert!(s.contains("content-length: 2\r\n"));
        assert!(s.contains("connection: close\r\n"));
        assert!(s.ends_with("\r\n\r\n{}"));
        let mut out = Vec::new();
        write_response(&mut out, &resp, Connection::Default, true, "", "");
        assert!(String::from_utf8(out).expect("ascii").ends_with("content-length: 2\r\n\r\n"));
        let resp = http::Response::builder().status(204).body(Bytes::new()).expect("static response");
        let mut out = Vec::new();
        write_response(&mut out, &resp, Connection::KeepAlive, false, "", "node-a");
        assert_eq!(out, b"HTTP/1.1 204 No Content\r\nx-relay-node: node-a\r\nconnection: keep-alive\r\n\r\n");
    }

    proptest! {
        /// No byte string makes the parser panic.
        #[test]
        fn never_panics(buf in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_head(&buf, &Limits::default());
        }

        /// Any head that fits is parsed whatever the read boundaries: a prefix is Incomplete.
        #[test]
        fn split_anywhere(path in "/[a-z0-9/]{0,40}", n in 0usize..200) {
            let raw = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
            let cut = n.min(raw.len());
            let r = parse_head(&raw.as_bytes()[..cut], &Limits::default()).expect("valid prefix");
            prop_assert_eq!(matches!(r, Parse::Complete { .. }), cut == raw.len());
        }
    }
}
