//! Hand-written WebSocket framing (RFC 6455) and the HTTP upgrade, for the floor server: frames
//! parsed and unmasked in place over the caller's buffer, frames written behind a reserved header
//! so a message is composed once, where it will be sent from.
//!
//! Invariant: no I/O and no panic on any input; a frame longer than the caller's bound is an
//! error before any of it is buffered.

use std::ops::Range;

/// Opcode of a text frame.
pub(crate) const TEXT: u8 = 0x1;
/// Opcode of a binary frame.
pub(crate) const BINARY: u8 = 0x2;
/// Opcode of a continuation frame.
pub(crate) const CONTINUATION: u8 = 0x0;
/// Opcode of a close frame.
pub(crate) const CLOSE: u8 = 0x8;
/// Opcode of a ping.
pub(crate) const PING: u8 = 0x9;
/// Opcode of a pong.
pub(crate) const PONG: u8 = 0xA;

/// Bytes [`begin`] reserves for the longest header (2 + 8 length bytes + 4 mask bytes).
const HEADER_ROOM: usize = 14;

/// One parsed frame; `payload` indexes the buffer it was parsed from, already unmasked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Frame {
    /// The last frame of its message.
    pub(crate) fin: bool,
    /// Its opcode.
    pub(crate) opcode: u8,
    /// Where its (unmasked) payload lies in the buffer.
    pub(crate) payload: Range<usize>,
    /// Bytes the whole frame took, header included.
    pub(crate) len: usize,
}

/// Why a peer's bytes are not acceptable frames; each maps to a close code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FrameError {
    /// Reserved bits, an unknown opcode, a wrong masking, or a malformed control frame (1002).
    Protocol,
    /// A frame or message over the bound (1009).
    TooLarge,
}

impl FrameError {
    /// The close code that says so.
    pub(crate) fn close_code(self) -> u16 {
        match self {
            Self::Protocol => 1002,
            Self::TooLarge => 1009,
        }
    }
}

/// Parses the frame at the start of `buf`, unmasking its payload in place: `Ok(None)` until the
/// whole frame is there. `masked` says whether the peer must mask (it is a client) or must not.
///
/// # Errors
/// [`FrameError`] for a frame the floor refuses; the connection should then close.
pub(crate) fn parse(buf: &mut [u8], masked: bool, max_payload: usize) -> Result<Option<Frame>, FrameError> {
    let [b0, b1, ..] = *buf else { return Ok(None) };
    let (fin, opcode) = (b0 & 0x80 != 0, b0 & 0x0F);
    if b0 & 0x70 != 0 || !matches!(opcode, CONTINUATION | TEXT | BINARY | CLOSE | PING | PONG) {
        return Err(FrameError::Protocol);
    }
    if (b1 & 0x80 != 0) != masked {
        return Err(FrameError::Protocol);
    }
    let (len, mut at) = match b1 & 0x7F {
        126 => match buf.get(2..4) {
            Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 4),
            None => return Ok(None),
        },
        127 => match buf.get(2..10) {
            Some(b) => (u64::from_be_bytes(b.try_into().map_err(|_| FrameError::Protocol)?), 10),
            None => return Ok(None),
        },
        n => (u64::from(n), 2),
    };
    if opcode >= CLOSE && (!fin || len > 125) {
        return Err(FrameError::Protocol);
    }
    let len = usize::try_from(len).ok().filter(|&n| n <= max_payload).ok_or(FrameError::TooLarge)?;
    let mask = if masked {
        let Some(m) = buf.get(at..at + 4) else { return Ok(None) };
        let m = [m[0], m[1], m[2], m[3]];
        at += 4;
        Some(m)
    } else {
        None
    };
    let Some(payload) = buf.get_mut(at..at + len) else { return Ok(None) };
    if let Some(m) = mask.filter(|m| *m != [0; 4]) {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= m[i & 3];
        }
    }
    Ok(Some(Frame { fin, opcode, payload: at..at + len, len: at + len }))
}

/// Reserves room for a frame header at the end of `out`; the payload is appended after it, then
/// [`finish`] writes the header. Returns where the reserved room starts.
pub(crate) fn begin(out: &mut Vec<u8>) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER_ROOM]);
    start
}

/// Writes the header of a final frame of `opcode` for what was appended since [`begin`] returned
/// `start`, right before the payload, and returns the frame's bytes in `out`. A client's frame
/// (`masked`) carries the all-zero key, so its payload is sent as is.
pub(crate) fn finish(out: &mut [u8], start: usize, opcode: u8, masked: bool) -> Range<usize> {
    let payload_at = start + HEADER_ROOM;
    let len = out.len() - payload_at;
    let mut header = [0u8; HEADER_ROOM];
    header[0] = 0x80 | opcode;
    let mask_bit = if masked { 0x80 } else { 0 };
    let mut n = if len < 126 {
        header[1] = mask_bit | len as u8; // < 126: fits.
        2
    } else if let Ok(short) = u16::try_from(len) {
        header[1] = mask_bit | 126;
        header[2..4].copy_from_slice(&short.to_be_bytes());
        4
    } else {
        header[1] = mask_bit | 127;
        header[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    };
    if masked {
        n += 4; // The key: four zero bytes, already zero in `header`.
    }
    let from = payload_at - n;
    out[from..payload_at].copy_from_slice(&header[..n]);
    from..out.len()
}

/// Appends a whole final frame carrying `payload`, with no gap before its header (for buffers that
/// hold several frames back to back).
pub(crate) fn append(out: &mut Vec<u8>, opcode: u8, masked: bool, payload: &[u8]) {
    let start = out.len();
    let range = write(out, opcode, masked, payload);
    out.drain(start..range.start);
}

/// Appends a whole final frame carrying `payload`.
pub(crate) fn write(out: &mut Vec<u8>, opcode: u8, masked: bool, payload: &[u8]) -> Range<usize> {
    let start = begin(out);
    out.extend_from_slice(payload);
    finish(out, start, opcode, masked)
}

/// Appends a close frame with `code` and `reason`.
pub(crate) fn write_close(out: &mut Vec<u8>, masked: bool, code: u16, reason: &str) -> Range<usize> {
    let start = begin(out);
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(&reason.as_bytes()[..reason.len().min(123)]);
    finish(out, start, CLOSE, masked)
}

/// A complete HTTP upgrade request: its target and `Sec-WebSocket-Key`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Upgrade<'a> {
    /// The request target, query included.
    pub(crate) path: &'a [u8],
    /// The client's key.
    pub(crate) key: &'a [u8],
    /// Bytes the head took (frames may follow).
    pub(crate) head_len: usize,
}

/// Why a request head is refused; each maps to a status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HeadError {
    /// Not a `GET` WebSocket upgrade with a key (400).
    BadRequest,
    /// Longer than the bound (431).
    TooLarge,
}

/// Reads an upgrade request from `head`: `Ok(None)` until its blank line has arrived.
///
/// # Errors
/// [`HeadError`] for a request the floor does not serve.
pub(crate) fn parse_upgrade(head: &[u8], max_head: usize) -> Result<Option<Upgrade<'_>>, HeadError> {
    let Some(end) = find(head, b"\r\n\r\n") else {
        return if head.len() > max_head { Err(HeadError::TooLarge) } else { Ok(None) };
    };
    if end > max_head {
        return Err(HeadError::TooLarge);
    }
    let mut lines = head[..end].split(|&b| b == b'\n').map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let request = lines.next().ok_or(HeadError::BadRequest)?;
    let mut parts = request.split(|&b| b == b' ');
    let (Some(b"GET"), Some(path), Some(version)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(HeadError::BadRequest);
    };
    if !version.starts_with(b"HTTP/1.") || path.first() != Some(&b'/') {
        return Err(HeadError::BadRequest);
    }
    let mut key = None;
    let mut upgrade = false;
    for line in lines {
        let Some(colon) = line.iter().position(|&b| b == b':') else { return Err(HeadError::BadRequest) };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if name.eq_ignore_ascii_case(b"sec-websocket-key") {
            key = Some(value);
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            upgrade = value.eq_ignore_ascii_case(b"websocket");
        }
    }
    match key {
        Some(key) if upgrade && !key.is_empty() => Ok(Some(Upgrade { path, key, head_len: end + 4 })),
        _ => Err(HeadError::BadRequest),
    }
}

/// Appends the 101 answer to a request with `key`.
pub(crate) fn write_switching(out: &mut Vec<u8>, key: &[u8]) {
    out.extend_from_slice(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ",
    );
    out.extend_from_slice(tungstenite::handshake::derive_accept_key(key).as_bytes());
    out.extend_from_slice(b"\r\n\r\n");
}

/// Appends a refusal with `status` (and its reason phrase); the connection closes after it.
pub(crate) fn write_refusal(out: &mut Vec<u8>, status: &str) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_bytes());
    out.extend_from_slice(b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
}

/// Appends the upgrade request a client sends for `path` on `host` with `key`.
pub(crate) fn write_request(out: &mut Vec<u8>, host: &str, path: &str, key: &str) {
    for part in [
        "GET ",
        path,
        " HTTP/1.1\r\nHost: ",
        host,
        "\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: ",
        key,
        "\r\n\r\n",
    ] {
        out.extend_from_slice(part.as_bytes());
    }
}

/// Reads the answer to a client's upgrade with `key`: the head's length once it is a matching
/// 101, `Ok(None)` before it is complete.
///
/// # Errors
/// [`HeadError::BadRequest`] for any other answer, [`HeadError::TooLarge`] past the bound.
pub(crate) fn parse_answer(head: &[u8], key: &str, max_head: usize) -> Result<Option<usize>, HeadError> {
    let Some(end) = find(head, b"\r\n\r\n") else {
        return if head.len() > max_head { Err(HeadError::TooLarge) } else { Ok(None) };
    };
    if !(head.starts_with(b"HTTP/1.1 101 ") || head.starts_with(b"HTTP/1.1 101\r")) {
        return Err(HeadError::BadRequest);
    }
    let expected = tungstenite::handshake::derive_accept_key(key.as_bytes());
    let accepted = head[..end].split(|&b| b == b'\n').any(|line| {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        line.iter().position(|&b| b == b':').is_some_and(|colon| {
            line[..colon].eq_ignore_ascii_case(b"sec-websocket-accept")
                && line[colon + 1..].trim_ascii() == expected.as_bytes()
        })
    });
    if accepted {
        Ok(Some(end + 4))
    } else {
        Err(HeadError::BadRequest)
    }
}

/// Where `needle` first occurs in `haystack`.
pub(crate) fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    let (&first, rest) = needle.split_first()?;
    let mut from = 0;
    while let Some(i) = haystack.get(from..)?.iter().position(|&b| b == first) {
        let at = from + i;
        if haystack.get(at + 1..at + needle.len()) == Some(rest) {
            return Some(at);
        }
        from = at + 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A written server frame parses back; a masked client frame is unmasked in place; partial
    /// frames wait; each length form round-trips.
    #[test]
    fn frames_round_trip() {
        for len in [0usize, 5, 125, 126, 300, 65_535, 65_536] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            for masked in [false, true] {
                let mut out = vec![9, 9]; // Whatever came before stays put.
                let range = write(&mut out, TEXT, masked, &payload);
                assert_eq!(range.end, out.len());
                let mut bytes = out[range].to_vec();
                let total = bytes.len();
                assert_eq!(parse(&mut bytes[..total - 1], masked, 1 << 20), Ok(None), "len {len}: incomplete");
                let f = parse(&mut bytes, masked, 1 << 20).expect("valid").expect("complete");
                assert_eq!((f.fin, f.opcode, f.len), (true, TEXT, total));
                assert_eq!(&bytes[f.payload], &payload[..], "len {len} masked {masked}");
            }
        }
    }

    /// A client's frame with a real key is unmasked in place.
    #[test]
    fn unmasks_a_client_frame() {
        let key = [0x37, 0xfa, 0x21, 0x3d];
        let mut bytes = vec![0x81, 0x85, key[0], key[1], key[2], key[3]];
        bytes.extend(b"Hello".iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        let f = parse(&mut bytes, true, 100).expect("valid").expect("complete");
        assert_eq!(&bytes[f.payload], b"Hello");
    }

    /// Wrong masking, reserved bits, unknown opcodes, fragmented or long control frames and
    /// oversized frames are refused with the right close code.
    #[test]
    fn refuses_bad_frames() {
        let cases: [(&[u8], bool, FrameError); 6] = [
            (&[0x81, 0x00], true, FrameError::Protocol), // unmasked from a client
            (&[0x81, 0x80, 0, 0, 0, 0], false, FrameError::Protocol), // masked from a server
            (&[0xC1, 0x00], false, FrameError::Protocol), // RSV1
            (&[0x83, 0x00], false, FrameError::Protocol), // opcode 3
            (&[0x09, 0x00], false, FrameError::Protocol), // fragmented ping
            (&[0x89, 0x7E, 0x00, 0x7E], false, FrameError::Protocol), // ping of 126 bytes
        ];
        for (bytes, masked, error) in cases {
            assert_eq!(parse(&mut bytes.to_vec(), masked, 1000), Err(error), "{bytes:?}");
        }
        let mut big = vec![0x81, 0x7F, 0, 0, 0, 1, 0, 0, 0, 0];
        assert_eq!(parse(&mut big, false, 1 << 20), Err(FrameError::TooLarge), "known too large from its header");
        assert_eq!(FrameError::TooLarge.close_code(), 1009);
    }

    /// A close frame carries its code and reason.
    #[test]
    fn close_frames() {
        let mut out = Vec::new();
        let range = write_close(&mut out, false, 1000, "call ended");
        let mut bytes = out[range].to_vec();
        let f = parse(&mut bytes, false, 200).expect("valid").expect("complete");
        assert_eq!(f.opcode, CLOSE);
        assert_eq!(&bytes[f.payload], b"\x03\xe8call ended");
    }

    /// An upgrade request yields its path and key; a partial head waits; others are refused; the
    /// client's request is accepted by the server side and its answer checked against the key.
    #[test]
    fn handshakes() {
        let mut request = Vec::new();
        write_request(&mut request, "127.0.0.1:9", "/twilio/stream", "dGhlIHNhbXBsZSBub25jZQ==");
        request.extend_from_slice(&[0x81, 0x80]); // A frame right behind the head.
        let up = parse_upgrade(&request, 8192).expect("valid").expect("complete");
        assert_eq!((up.path, up.key), (&b"/twilio/stream"[..], &b"dGhlIHNhbXBsZSBub25jZQ=="[..]));
        assert_eq!(up.head_len, request.len() - 2);
        assert_eq!(parse_upgrade(&request[..30], 8192), Ok(None));
        assert_eq!(parse_upgrade(&request[..30], 10), Err(HeadError::TooLarge));
        assert_eq!(parse_upgrade(b"POST / HTTP/1.1\r\n\r\n", 8192), Err(HeadError::BadRequest));
        assert_eq!(parse_upgrade(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 8192), Err(HeadError::BadRequest));
        let mut answer = Vec::new();
        write_switching(&mut answer, up.key);
        assert!(String::from_utf8_lossy(&answer).contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "RFC 6455's example");
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        assert_eq!(parse_answer(&answer, key, 8192), Ok(Some(answer.len())));
        assert_eq!(parse_answer(&answer[..20], key, 8192), Ok(None));
        assert_eq!(parse_answer(&answer, "AAAAAAAAAAAAAAAAAAAAAA==", 8192), Err(HeadError::BadRequest));
        let mut refusal = Vec::new();
        write_refusal(&mut refusal, "404 Not Found");
        assert_eq!(parse_answer(&refusal, key, 8192), Err(HeadError::BadRequest));
    }

    /// Frames appended back to back parse one after the other.
    #[test]
    fn appended_frames_are_contiguous() {
        let mut out = Vec::new();
        append(&mut out, TEXT, true, b"one");
        append(&mut out, TEXT, true, b"two");
        let first = parse(&mut out, true, 100).expect("valid").expect("whole");
        assert_eq!((&out[first.payload.clone()], first.len), (&b"one"[..], 9));
        let second = parse(&mut out[first.len..], true, 100).expect("valid").expect("whole");
        assert_eq!(second.len, 9);
    }

    /// Byte search finds the first occurrence, or none.
    #[test]
    fn finds() {
        assert_eq!(find(b"aab", b"ab"), Some(1));
        assert_eq!(find(b"abab", b"ba"), Some(1));
        assert_eq!(find(b"aaa", b"ab"), None);
        assert_eq!(find(b"", b"a"), None);
        assert_eq!(find(b"a", b""), None);
    }
}
