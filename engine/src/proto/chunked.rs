//! The chunked transfer coding (RFC 9112 §7.1) decoded incrementally: bytes go in as they arrive,
//! split anywhere, and the body comes out, under limits on its decoded size, on each chunk-size
//! line (extensions included) and on the trailer section.
//!
//! Invariant: no I/O, no clock; "not enough bytes yet" is [`Decode::Incomplete`], never an error;
//! every input byte is examined once, only data bytes are kept, and no input makes it panic.

use http::StatusCode;

use crate::config::Limits;

/// Most bytes one chunk-size line may hold before its CRLF: the hex size and any extensions. A
/// size needs at most 16 digits; the rest is room for extensions, which the relay ignores.
pub const MAX_CHUNK_LINE_BYTES: usize = 1024;

/// Why a chunked body is refused; each maps to one status code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    /// The framing is not RFC 9112 chunked: a size that is not hex or is past 64 bits, data longer
    /// than its size, a line not ended by CRLF, a bad trailer field, an overlong size line.
    #[error("malformed chunked body: {0}")]
    Malformed(&'static str),
    /// The decoded body would be larger than the body limit.
    #[error("chunked request body is larger than the limit of {limit} bytes")]
    TooLarge {
        /// The limit that was crossed.
        limit: usize,
    },
    /// The trailer section has more bytes or fields than the limits allow.
    #[error("chunked body trailer is larger than {limit_bytes} bytes or {limit_fields} fields")]
    TrailerTooLarge {
        /// The byte limit.
        limit_bytes: usize,
        /// The field-count limit.
        limit_fields: usize,
    },
}

impl ChunkError {
    /// The status this error is answered with (the connection closes after it: the rest of the
    /// body cannot be framed).
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Malformed(_) => StatusCode::BAD_REQUEST,
            Self::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::TrailerTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        }
    }
}

/// Outcome of feeding bytes to [`ChunkedDecoder::decode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decode {
    /// Every byte given was consumed and the body goes on: feed the next bytes.
    Incomplete,
    /// The body (and its trailer section) ended after `used` bytes of the input just given;
    /// anything after them belongs to the next message.
    Complete {
        /// Bytes of the last input that belonged to the body.
        used: usize,
    },
}

/// Where in the chunked grammar the next byte falls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// The first hex digit of a chunk size.
    SizeStart,
    /// More hex digits of a chunk size.
    Size,
    /// After the size: whitespace before `;`, `;`, or CR.
    AfterSize,
    /// A chunk extension, ignored up to CR.
    Extension,
    /// The LF ending a chunk-size line.
    SizeLf,
    /// Chunk data, [`ChunkedDecoder::remaining`] bytes of it.
    Data,
    /// The CR after chunk data.
    DataCr,
    /// The LF after chunk data.
    DataLf,
    /// The start of a trailer field line, or the CR of the empty line that ends the body.
    TrailerStart,
    /// A trailer field's name, up to `:`.
    TrailerName,
    /// A trailer field's value, up to CR.
    TrailerValue,
    /// The LF ending a trailer field line.
    TrailerLf,
    /// The LF of the empty line that ends the body.
    EndLf,
    /// The body ended.
    Done,
}

/// An incremental decoder for one chunked body.
///
/// Feed it the bytes that follow the request head with [`decode`](Self::decode), as they arrive.
/// It keeps no input bytes: only its place in the grammar and the counts its limits need.
#[derive(Debug, Clone)]
pub struct ChunkedDecoder {
    state: State,
    /// The chunk size read so far on this line (digits only make it grow; past 64 bits is an error).
    size: u64,
    /// Bytes of the current chunk-size line, for [`MAX_CHUNK_LINE_BYTES`].
    line_bytes: usize,
    /// Data bytes of the current chunk still to come.
    remaining: u64,
    /// Body bytes decoded so far, against `max_body_bytes` (the decoded size, not the wire size,
    /// is what the limit means: chunk lines are framing).
    decoded: usize,
    /// Bytes of the trailer section so far, against `max_trailer_bytes`.
    trailer_bytes: usize,
    /// Trailer fields so far, against `max_trailers`.
    trailers: usize,
    max_body_bytes: usize,
    max_trailer_bytes: usize,
    max_trailers: usize,
    /// The error once one was found: the decoder answers it again rather than resynchronise.
    failed: Option<ChunkError>,
}

impl ChunkedDecoder {
    /// A decoder for a body of at most `max_body_bytes` decoded bytes, whose trailer section may
    /// have at most `max_trailer_bytes` bytes and `max_trailers` fields.
    pub fn new(max_body_bytes: usize, max_trailer_bytes: usize, max_trailers: usize) -> Self {
        Self {
            state: State::SizeStart,
            size: 0,
            line_bytes: 0,
            remaining: 0,
            decoded: 0,
            trailer_bytes: 0,
            trailers: 0,
            max_body_bytes,
            max_trailer_bytes,
            max_trailers,
            failed: None,
        }
    }

    /// A decoder for a request body: `max_body_bytes` for the body, and the head's limits
    /// (`max_head_bytes`, `max_headers`) for the trailer section, whose fields are header fields.
    pub fn for_request(limits: &Limits) -> Self {
        Self::new(limits.max_body_bytes, limits.max_head_bytes, limits.max_headers)
    }

    /// Body bytes decoded so far.
    pub fn decoded(&self) -> usize {
        self.decoded
    }

    /// Whether the last (zero-size) chunk has been read: the whole body is decoded, and only the
    /// trailer section and the final CRLF (or nothing) remain.
    pub fn last_chunk_seen(&self) -> bool {
        matches!(
            self.state,
            State::TrailerStart
                | State::TrailerName
                | State::TrailerValue
                | State::TrailerLf
                | State::EndLf
                | State::Done
        )
    }

    /// Decodes `input`, appending body bytes to `body`. Chunk sizes, extensions, CRLFs and
    /// trailers may be split anywhere across calls.
    ///
    /// # Errors
    /// [`ChunkError`] once the bytes so far cannot be a chunked body within the limits; every
    /// later call returns the same error.
    pub fn decode(&mut self, input: &[u8], body: &mut Vec<u8>) -> Result<Decode, ChunkError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        match self.run(input, body) {
            Ok(d) => Ok(d),
            Err(e) => {
                self.failed = Some(e.clone());
                Err(e)
            }
        }
    }

    fn run(&mut self, input: &[u8], body: &mut Vec<u8>) -> Result<Decode, ChunkError> {
        let mut i = 0;
        while i < input.len() {
            if self.state == State::Done {
                return Ok(Decode::Complete { used: i });
            }
            if self.state == State::Data {
                // Bounded by `remaining`, which was checked against the body limit.
                let n = usize::try_from(self.remaining).unwrap_or(usize::MAX).min(input.len() - i);
                body.extend_from_slice(&input[i..i + n]);
                self.decoded += n;
                self.remaining -= n as u64;
                i += n;
                if self.remaining == 0 {
                    self.state = State::DataCr;
                }
                continue;
            }
            self.byte(input[i])?;
            i += 1;
        }
        Ok(if self.state == State::Done { Decode::Complete { used: i } } else { Decode::Incomplete })
    }

    /// Advances over one byte outside chunk data.
    fn byte(&mut self, b: u8) -> Result<(), ChunkError> {
        match self.state {
            State::SizeStart | State::Size | State::AfterSize | State::Extension if b != b'\r' => {
                self.line_bytes += 1;
                if self.line_bytes > MAX_CHUNK_LINE_BYTES {
                    return Err(ChunkError::Malformed("chunk-size line too long"));
                }
            }
            State::TrailerStart | State::TrailerName | State::TrailerValue | State::TrailerLf | State::EndLf => {
                self.trailer_bytes += 1;
                if self.trailer_bytes > self.max_trailer_bytes {
                    return Err(self.trailer_too_large());
                }
            }
            _ => {}
        }
        self.state = match (self.state, b) {
            (State::Size, _) => match hex_value(b) {
                Some(d) => {
                    self.size = self
                        .size
                        .checked_mul(16)
                        .and_then(|s| s.checked_add(u64::from(d)))
                        .ok_or(ChunkError::Malformed("chunk size past 64 bits"))?;
                    State::Size
                }
                None => return self.after_size(b),
            },
            (State::SizeStart, _) => match hex_value(b) {
                Some(d) => {
                    self.size = u64::from(d);
                    State::Size
                }
                None => return Err(ChunkError::Malformed("chunk size is not hexadecimal")),
            },
            (State::AfterSize, _) => return self.after_size(b),
            (State::Extension, b'\r') => State::SizeLf,
            (State::Extension, b) if b == b'\t' || (b >= 0x20 && b != 0x7f) => State::Extension,
            (State::Extension, _) => return Err(ChunkError::Malformed("control character in a chunk extension")),
            (State::SizeLf, b'\n') => self.start_chunk()?,
            (State::SizeLf, _) => return Err(ChunkError::Malformed("chunk-size line not ended by CRLF")),
            (State::DataCr, b'\r') => State::DataLf,
            (State::DataCr, _) => return Err(ChunkError::Malformed("chunk data longer than its size")),
            (State::DataLf, b'\n') => {
                self.line_bytes = 0;
                State::SizeStart
            }
            (State::DataLf, _) => return Err(ChunkError::Malformed("chunk data not followed by CRLF")),
            (State::TrailerStart, b'\r') => State::EndLf,
            (State::TrailerStart, b) if is_tchar(b) => {
                self.trailers += 1;
                if self.trailers > self.max_trailers {
                    return Err(self.trailer_too_large());
                }
                State::TrailerName
            }
            (State::TrailerStart, _) => return Err(ChunkError::Malformed("bad trailer field name")),
            (State::TrailerName, b':') => State::TrailerValue,
            (State::TrailerName, b) if is_tchar(b) => State::TrailerName,
            (State::TrailerName, _) => return Err(ChunkError::Malformed("bad trailer field name")),
            (State::TrailerValue, b'\r') => State::TrailerLf,
            (State::TrailerValue, b) if b == b'\t' || (b >= 0x20 && b != 0x7f) => State::TrailerValue,
            (State::TrailerValue, _) => return Err(ChunkError::Malformed("bad trailer field value")),
            (State::TrailerLf, b'\n') => State::TrailerStart,
            (State::TrailerLf, _) => return Err(ChunkError::Malformed("trailer line not ended by CRLF")),
            (State::EndLf, b'\n') => State::Done,
            (State::EndLf, _) => return Err(ChunkError::Malformed("chunked body not ended by CRLF")),
            // `run` handles data and stops at Done before calling here.
            (State::Data | State::Done, _) => self.state,
        };
        Ok(())
    }

    /// A byte after the size's digits: whitespace before an extension, `;`, or CR.
    fn after_size(&mut self, b: u8) -> Result<(), ChunkError> {
        self.state = match b {
            b' ' | b'\t' => State::AfterSize,
            b';' => State::Extension,
            b'\r' if self.state == State::Size => State::SizeLf,
            b'\r' => return Err(ChunkError::Malformed("whitespace after a chunk size without an extension")),
            _ => return Err(ChunkError::Malformed("chunk size is not hexadecimal")),
        };
        Ok(())
    }

    /// A chunk-size line ended: the last chunk starts the trailer section; any other is checked
    /// against the body limit before a byte of it is taken.
    fn start_chunk(&mut self) -> Result<State, ChunkError> {
        if self.size == 0 {
            return Ok(State::TrailerStart);
        }
        let room = (self.max_body_bytes - self.decoded) as u64;
        if self.size > room {
            return Err(ChunkError::TooLarge { limit: self.max_body_bytes });
        }
        self.remaining = self.size;
        Ok(State::Data)
    }

    fn trailer_too_large(&self) -> ChunkError {
        ChunkError::TrailerTooLarge { limit_bytes: self.max_trailer_bytes, limit_fields: self.max_trailers }
    }
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// RFC 9110 §5.6.2 `tchar`: the bytes of a field name.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Encodes `body` as chunks of the given sizes (cycled; a zero is skipped), each size line with
/// `extension` after a `;` when it is not empty, then the last chunk, `trailers` and the final CRLF.
/// For tests and the fuzz target's round trip.
pub fn encode(body: &[u8], sizes: &[usize], extension: &str, trailers: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 64);
    let mut rest = body;
    let mut cycle = sizes.iter().copied().filter(|&s| s > 0).cycle();
    while !rest.is_empty() {
        let n = cycle.next().unwrap_or(rest.len()).min(rest.len());
        out.extend_from_slice(format!("{n:x}").as_bytes());
        if !extension.is_empty() {
            out.push(b';');
            out.extend_from_slice(extension.as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&rest[..n]);
        out.extend_from_slice(b"\r\n");
        rest = &rest[n..];
    }
    out.extend_from_slice(b"0\r\n");
    for (name, value) in trailers {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decoder() -> ChunkedDecoder {
        ChunkedDecoder::new(1000, 200, 4)
    }

    /// Feeds `input` whole; the outcome and the body.
    fn whole(input: &[u8]) -> (Result<Decode, ChunkError>, Vec<u8>) {
        let mut body = Vec::new();
        let r = decoder().decode(input, &mut body);
        (r, body)
    }

    /// A body with extensions (quoted ones included), upper- and lower-case sizes, leading zeros and
    /// trailers decodes, and the bytes after it are left for the next request.
    #[test]
    fn decodes_and_stops_at_the_end() {
        let raw =
            b"5;a=b;q=\"x;y\"\r\nhello\r\n0006 ;ext\r\n world\r\n00A\r\n0123456789\r\n0\r\nX-T: 1\r\nY:\r\n\r\nGET /";
        let (r, body) = whole(raw);
        assert_eq!(r, Ok(Decode::Complete { used: raw.len() - 5 }));
        assert_eq!(body, b"hello world0123456789");
    }

    /// Every split of a valid body into two reads gives the same body and the same end.
    #[test]
    fn split_anywhere() {
        let raw = encode(b"the quick brown fox", &[3, 1, 7], "e=1", &[("x-sum", "abc")]);
        for cut in 0..=raw.len() {
            let mut d = decoder();
            let mut body = Vec::new();
            let first = d.decode(&raw[..cut], &mut body).expect("valid prefix");
            let end = if cut == raw.len() {
                first
            } else {
                assert_eq!(first, Decode::Incomplete, "cut {cut}");
                d.decode(&raw[cut..], &mut body).expect("valid rest")
            };
            let used = if cut == raw.len() { raw.len() } else { raw.len() - cut };
            assert_eq!(end, Decode::Complete { used }, "cut {cut}");
            assert_eq!(body, b"the quick brown fox", "cut {cut}");
        }
    }

    /// Sizes that are not hex, negative, prefixed, empty or past 64 bits are 400s.
    #[test]
    fn bad_sizes() {
        for raw in [
            &b"zz\r\n"[..],
            b"-5\r\n",
            b"0x5\r\n",
            b"+5\r\n",
            b"\r\n",
            b" 5\r\n",
            b"10000000000000000\r\n",
            b"1ffffffffffffffff\r\n",
            b"5 \r\n",
            b"5\n",
        ] {
            let (r, _) = whole(raw);
            let e = r.expect_err("refused");
            assert_eq!(e.status(), StatusCode::BAD_REQUEST, "{raw:?}: {e}");
        }
    }

    /// Data longer than its size, or not followed by CRLF, is a 400.
    #[test]
    fn data_longer_than_its_size() {
        assert!(matches!(whole(b"3\r\nhello\r\n0\r\n\r\n").0, Err(ChunkError::Malformed(_))));
        assert!(matches!(whole(b"5\r\nhello\n0\r\n\r\n").0, Err(ChunkError::Malformed(_))));
        assert!(matches!(whole(b"5\r\nhello\r\r").0, Err(ChunkError::Malformed(_))));
    }

    /// The body limit counts decoded bytes: it is refused (413) at the size line that would pass
    /// it, before its data; framing and extensions do not count.
    #[test]
    fn body_limit_counts_decoded_bytes() {
        let mut d = ChunkedDecoder::new(10, 100, 4);
        let mut body = Vec::new();
        assert_eq!(d.decode(b"a\r\n0123456789\r\n", &mut body), Ok(Decode::Incomplete));
        assert_eq!(d.decode(b"1\r\n", &mut body), Err(ChunkError::TooLarge { limit: 10 }));
        assert_eq!(d.decode(b"", &mut body), Err(ChunkError::TooLarge { limit: 10 }), "the error stays");
        let raw = encode(b"0123456789", &[1], "padding-padding-padding", &[]);
        let mut body = Vec::new();
        assert!(matches!(ChunkedDecoder::new(10, 100, 4).decode(&raw, &mut body), Ok(Decode::Complete { .. })));
        assert_eq!(body, b"0123456789");
        let e = ChunkedDecoder::new(10, 100, 4).decode(b"ffffffffffffffff\r\n", &mut Vec::new());
        assert_eq!(e.expect_err("huge").status(), StatusCode::PAYLOAD_TOO_LARGE);
    }

    /// A size line with endless extensions is refused once past its bound, without its CRLF.
    #[test]
    fn size_line_is_bounded() {
        let mut raw = b"5;".to_vec();
        raw.extend(vec![b'e'; MAX_CHUNK_LINE_BYTES]);
        assert_eq!(whole(&raw).0, Err(ChunkError::Malformed("chunk-size line too long")));
        let mut ok = b"5;".to_vec();
        ok.extend(vec![b'e'; MAX_CHUNK_LINE_BYTES - 2]);
        ok.extend(b"\r\nhello\r\n");
        assert_eq!(whole(&ok).0, Ok(Decode::Incomplete));
    }

    /// Trailers past the byte or field limit are 431; malformed trailer lines are 400.
    #[test]
    fn trailers_are_bounded_and_checked() {
        let five: Vec<(&str, &str)> = vec![("a", "1"), ("b", "2"), ("c", "3"), ("d", "4"), ("e", "5")];
        let e = whole(&encode(b"x", &[1], "", &five)).0.expect_err("five trailers");
        assert_eq!(e.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
        let long = "v".repeat(300);
        let e = whole(&encode(b"x", &[1], "", &[("a", &long)])).0.expect_err("long trailer");
        assert_eq!(e.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
        assert!(whole(&encode(b"x", &[1], "", &five[..4])).0.is_ok());
        for raw in [
            &b"0\r\n: v\r\n\r\n"[..],
            b"0\r\n folded\r\n\r\n",
            b"0\r\nna me: v\r\n\r\n",
            b"0\r\nx: \x01\r\n\r\n",
            b"0\r\n\r\r",
        ] {
            assert!(matches!(whole(raw).0, Err(ChunkError::Malformed(_))), "{raw:?}");
        }
    }

    /// An empty body is just the last chunk and the final CRLF.
    #[test]
    fn empty_body() {
        assert_eq!(whole(b"0\r\n\r\n"), (Ok(Decode::Complete { used: 5 }), Vec::new()));
        assert_eq!(whole(b"000;x\r\n\r\n").0, Ok(Decode::Complete { used: 9 }));
    }

    proptest! {
        /// Round trip: any body, chunked with any sizes, extension and trailers and fed in any
        /// pieces, decodes to itself and ends exactly where its encoding ends.
        #[test]
        fn round_trip(
            body in proptest::collection::vec(any::<u8>(), 0..600),
            sizes in proptest::collection::vec(0usize..80, 0..6),
            ext in "[a-z=;\"]{0,12}",
            pieces in proptest::collection::vec(1usize..40, 1..8),
            trailing in proptest::collection::vec(any::<u8>(), 0..8),
        ) {
            let mut raw = encode(&body, &sizes, &ext, &[("x-a", "1 2"), ("y", "")]);
            let end = raw.len();
            raw.extend_from_slice(&trailing);
            let mut d = decoder();
            let mut out = Vec::new();
            let mut at = 0;
            let mut piece = pieces.iter().cycle();
            loop {
                let n = (*piece.next().expect("cycle")).min(raw.len() - at);
                match d.decode(&raw[at..at + n], &mut out).expect("valid") {
                    Decode::Incomplete => {
                        prop_assert!(at + n < end, "incomplete past the end");
                        at += n;
                    }
                    Decode::Complete { used } => {
                        prop_assert_eq!(at + used, end);
                        break;
                    }
                }
            }
            prop_assert_eq!(out, body);
        }

        /// Any bytes fed in any pieces give the same outcome as fed whole, and never panic.
        #[test]
        fn pieces_agree_with_whole(raw in proptest::collection::vec(any::<u8>(), 0..300), cut in 0usize..300) {
            let cut = cut.min(raw.len());
            let (whole_r, whole_body) = whole(&raw);
            let mut d = decoder();
            let mut body = Vec::new();
            let r = match d.decode(&raw[..cut], &mut body) {
                Ok(Decode::Incomplete) => d.decode(&raw[cut..], &mut body).map(|r| match r {
                    Decode::Complete { used } => Decode::Complete { used: used + cut },
                    Decode::Incomplete => Decode::Incomplete,
                }),
                other => other,
            };
            prop_assert_eq!(r.is_ok(), whole_r.is_ok());
            if let (Ok(a), Ok(b)) = (&r, &whole_r) {
                prop_assert_eq!(a, b);
                prop_assert_eq!(&body, &whole_body);
            }
        }
    }
}
