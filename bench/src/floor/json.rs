//! The floor's JSON: the few fields it routes by, found by byte search (Twilio and the bench write
//! compact JSON, `"key":"value"`), and the messages Relay sends, written byte for byte as Relay's
//! `proto::twilio` and `proto::frontend` write them.
//!
//! Invariant: no I/O and no panic on any input; a value is only ever copied out when it holds
//! nothing JSON would have to escape, so whatever the floor writes is JSON.

use super::frame::find;

/// A message's `event`, when it names one the floor acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Event {
    /// Twilio `connected`.
    Connected,
    /// Twilio `start`.
    Start,
    /// Twilio `media`.
    Media,
    /// Twilio `stop`.
    Stop,
    /// Twilio `mark`.
    Mark,
    /// Twilio `clear`.
    Clear,
    /// Twilio `dtmf`.
    Dtmf,
    /// A frontend's `connect-twilio`.
    ConnectTwilio,
    /// Anything else, or none.
    Other,
}

/// The first `"event"` of a message.
pub(crate) fn event(msg: &[u8]) -> Event {
    match string(msg, b"\"event\":\"") {
        Some(b"media") => Event::Media,
        Some(b"start") => Event::Start,
        Some(b"connected") => Event::Connected,
        Some(b"stop") => Event::Stop,
        Some(b"mark") => Event::Mark,
        Some(b"clear") => Event::Clear,
        Some(b"dtmf") => Event::Dtmf,
        Some(b"connect-twilio") => Event::ConnectTwilio,
        _ => Event::Other,
    }
}

/// The string after the first `pattern` (a key, its colon and the opening quote) up to its closing
/// quote; `None` when absent, unterminated, or holding a backslash or a control character (an
/// escaped string, which the floor does not unescape).
pub(crate) fn string<'a>(msg: &'a [u8], pattern: &[u8]) -> Option<&'a [u8]> {
    let from = find(msg, pattern)? + pattern.len();
    let rest = &msg[from..];
    let end = rest.iter().position(|&b| b == b'"' || b == b'\\' || b < 0x20)?;
    (rest[end] == b'"').then_some(&rest[..end])
}

/// A base64 payload: the value of `"payload"`, when every byte is of base64's alphabet (one table
/// lookup a byte, which also finds the closing quote).
pub(crate) fn payload(msg: &[u8]) -> Option<&[u8]> {
    const PATTERN: &[u8] = b"\"payload\":\"";
    let from = find(msg, PATTERN)? + PATTERN.len();
    let rest = &msg[from..];
    let end = rest.iter().position(|&b| !BASE64[usize::from(b)])?;
    (rest[end] == b'"').then_some(&rest[..end])
}

/// Which bytes are of base64's alphabet (`A–Z a–z 0–9 + / =`).
const BASE64: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric() || c == b'+' || c == b'/' || c == b'=';
        b += 1;
    }
    table
};

/// A decimal string field (`"chunk":"12"`) as a number.
pub(crate) fn number(msg: &[u8], pattern: &[u8]) -> Option<u64> {
    let digits = string(msg, pattern)?;
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| d.is_ascii_digit().then(|| n * 10 + u64::from(d - b'0')))
}

/// The body of the object that follows `pattern` (a key, its colon and the `{`), up to its
/// matching `}`: strings (escapes included) are skipped, so braces inside them do not count.
pub(crate) fn object<'a>(msg: &'a [u8], pattern: &[u8]) -> Option<&'a [u8]> {
    let from = find(msg, pattern)? + pattern.len();
    let (mut depth, mut in_string, mut escaped) = (1usize, false, false);
    for (i, &b) in msg[from..].iter().enumerate() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' => depth += 1,
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(&msg[from..from + i]);
                }
            }
            _ => {}
        }
    }
    None
}

/// What a caller's `start` says: the call it names and the bot to dial.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Start<'a> {
    /// `customParameters.callSid`, else `start.callSid`.
    pub(crate) call_sid: Option<&'a [u8]>,
    /// `start.streamSid`, else the top-level `streamSid`.
    pub(crate) stream_sid: &'a [u8],
    /// `customParameters.agentUrl`.
    pub(crate) agent_url: Option<&'a [u8]>,
}

/// Reads a `start` as Relay keys it.
pub(crate) fn start(msg: &[u8]) -> Start<'_> {
    let body = object(msg, b"\"start\":{").unwrap_or_default();
    let params = object(body, b"\"customParameters\":{").unwrap_or_default();
    let call_sid = string(params, b"\"callSid\":\"").or_else(|| {
        // Outside customParameters: search the body with the parameters cut out.
        let cut = find(body, b"\"customParameters\":{").map_or(body.len(), |at| at);
        string(&body[..cut], b"\"callSid\":\"").or_else(|| string(&body[cut + params.len()..], b"\"callSid\":\""))
    });
    let stream_sid = string(body, b"\"streamSid\":\"").or_else(|| string(msg, b"\"streamSid\":\"")).unwrap_or_default();
    Start { call_sid, stream_sid, agent_url: string(params, b"\"agentUrl\":\"") }
}

/// To a Twilio-protocol bot, as Relay's `twilio::media_msg`:
/// `{"event":"media","sequenceNumber":…,"media":{"track":"inbound","chunk","timestamp","payload"},"streamSid":…}`.
pub(crate) fn bot_media(
    out: &mut Vec<u8>,
    sequence: u64,
    stream_sid: &[u8],
    chunk: u64,
    timestamp_ms: u64,
    payload: &[u8],
) {
    out.extend_from_slice(br#"{"event":"media","sequenceNumber":""#);
    push_u64(out, sequence);
    out.extend_from_slice(br#"","media":{"track":"inbound","chunk":""#);
    push_u64(out, chunk);
    out.extend_from_slice(br#"","timestamp":""#);
    push_u64(out, timestamp_ms);
    out.extend_from_slice(br#"","payload":""#);
    out.extend_from_slice(payload);
    out.extend_from_slice(br#""},"streamSid":""#);
    out.extend_from_slice(stream_sid);
    out.extend_from_slice(br#""}"#);
}

/// To a caller, as Relay's `twilio::media_out`: `{"event":"media","streamSid":…,"media":{"payload":…}}`.
pub(crate) fn caller_media(out: &mut Vec<u8>, stream_sid: &[u8], payload: &[u8]) {
    out.extend_from_slice(br#"{"event":"media","streamSid":""#);
    out.extend_from_slice(stream_sid);
    out.extend_from_slice(br#"","media":{"payload":""#);
    out.extend_from_slice(payload);
    out.extend_from_slice(br#""}}"#);
}

/// To a frontend, as Relay's `frontend::audio`: `{"event":"audio","payload":…,"track":…}`.
pub(crate) fn frontend_audio(out: &mut Vec<u8>, payload: &[u8], inbound: bool) {
    out.extend_from_slice(br#"{"event":"audio","payload":""#);
    out.extend_from_slice(payload);
    out.extend_from_slice(if inbound { br#"","track":"inbound"}"#.as_slice() } else { br#"","track":"outbound"}"# });
}

/// To a bot when its call ends, as Relay's `twilio::stop_msg`.
pub(crate) fn bot_stop(out: &mut Vec<u8>, sequence: u64, stream_sid: &[u8], call_sid: &[u8]) {
    out.extend_from_slice(br#"{"event":"stop","sequenceNumber":""#);
    push_u64(out, sequence);
    out.extend_from_slice(br#"","streamSid":""#);
    out.extend_from_slice(stream_sid);
    out.extend_from_slice(br#"","stop":{"accountSid":"","callSid":""#);
    out.extend_from_slice(call_sid);
    out.extend_from_slice(br#""}}"#);
}

/// Twilio's greeting, which Relay sends a bot before the `start`.
pub(crate) const CONNECTED: &[u8] = br#"{"event":"connected","protocol":"Call","version":"1.0.0"}"#;

/// Appends `n` in decimal.
pub(crate) fn push_u64(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8; // < 10: fits.
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bench's own messages: event, start fields, payload and numbers are found.
    #[test]
    fn reads_the_bench_messages() {
        let start = br#"{"event":"start","sequenceNumber":"1","start":{"accountSid":"ACbench","streamSid":"MZ1","callSid":"CA-outer","tracks":["inbound"],"customParameters":{"callSid":"CA1","agentUrl":"ws://127.0.0.1:9/bot"},"mediaFormat":{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1}},"streamSid":"MZ1"}"#;
        assert_eq!(event(start), Event::Start);
        let s = super::start(start);
        assert_eq!(s, Start { call_sid: Some(b"CA1"), stream_sid: b"MZ1", agent_url: Some(b"ws://127.0.0.1:9/bot") });
        let media = br#"{"event":"media","sequenceNumber":"43","media":{"track":"inbound","chunk":"42","timestamp":"820","payload":"AAEC/+8="},"streamSid":"MZ1"}"#;
        assert_eq!(event(media), Event::Media);
        assert_eq!(payload(media), Some(&b"AAEC/+8="[..]));
        assert_eq!((number(media, b"\"chunk\":\""), number(media, b"\"timestamp\":\"")), (Some(42), Some(820)));
        assert_eq!(event(br#"{"event":"connect-twilio","callSid":"CA1"}"#), Event::ConnectTwilio);
        assert_eq!(event(b"not json"), Event::Other);
    }

    /// Without customParameters.callSid the start's own names the call; braces and quotes inside
    /// parameter values do not confuse the object scan.
    #[test]
    fn start_fallbacks() {
        let msg = br#"{"event":"start","start":{"callSid":"CA9","customParameters":{"x":"} \" {"},"streamSid":"MZ9"}}"#;
        let s = start(msg);
        assert_eq!((s.call_sid, s.stream_sid, s.agent_url), (Some(&b"CA9"[..]), &b"MZ9"[..], None));
        assert_eq!(start(b"{}"), Start { call_sid: None, stream_sid: b"", agent_url: None });
        assert_eq!(object(br#""a":{"b":{"c":1}},"d""#, b"\"a\":{"), Some(&br#""b":{"c":1}"#[..]));
        assert_eq!(object(br#""a":{"b":"#, b"\"a\":{"), None, "unterminated");
    }

    /// Escaped strings, payloads outside base64 and malformed numbers are not taken.
    #[test]
    fn refuses_what_it_cannot_copy() {
        assert_eq!(string(br#""k":"a\"b""#, b"\"k\":\""), None);
        assert_eq!(string(br#""k":"ab"#, b"\"k\":\""), None, "unterminated");
        assert_eq!(payload(br#""payload":"AA<A""#), None);
        assert_eq!(number(br#""chunk":"1x""#, b"\"chunk\":\""), None);
        assert_eq!(number(br#""chunk":"""#, b"\"chunk\":\""), None);
        assert_eq!(number(br#""chunk":"99999999999999999999""#, b"\"chunk\":\""), None, "too long for u64");
    }

    /// What the floor writes is, byte for byte, what Relay's writers produce for the same values.
    #[test]
    fn writes_what_relay_writes() {
        use relay_engine::proto::{frontend, twilio};
        let mut out = Vec::new();
        bot_media(&mut out, 7, b"MZ1", 5, 80, b"AAEC");
        let relay = twilio::media_msg(7, "MZ1", twilio::Track::Inbound, 5, 80, b"AAEC");
        assert_eq!(out, relay.as_bytes());
        out.clear();
        caller_media(&mut out, b"MZ1", b"AAEC");
        assert_eq!(out, twilio::media_out("MZ1", b"AAEC").as_bytes());
        for (inbound, track) in [(true, frontend::FrontendTrack::Inbound), (false, frontend::FrontendTrack::Outbound)] {
            out.clear();
            frontend_audio(&mut out, b"AAEC", inbound);
            assert_eq!(out, frontend::audio(b"AAEC", track).as_bytes());
        }
        out.clear();
        bot_stop(&mut out, 9, b"MZ1", b"CA1");
        assert_eq!(out, twilio::stop_msg(9, "MZ1", "", "CA1").as_bytes());
        assert_eq!(CONNECTED, twilio::connected_msg().as_bytes());
        out.clear();
        push_u64(&mut out, 0);
        push_u64(&mut out, u64::MAX);
        assert_eq!(out, b"018446744073709551615");
    }
}
