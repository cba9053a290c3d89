//! Twilio Media Streams messages: [`parse`] reads any of them from a WebSocket text frame, and the
//! writers produce Twilio's exact shapes, both those Twilio receives (`*_out`) and those it sends
//! (`*_msg`, which the relay plays toward bots that speak the protocol).
//!
//! Invariant: no I/O and no panic on any input; a media payload is a slice of the received frame
//! (copied only when its JSON string held escapes), and each writer fills one pre-sized buffer.

use std::borrow::Cow;
use std::fmt;

use bytes::Bytes;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;
use tungstenite::Utf8Bytes;

/// One Media Streams message, in either direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// `connected`: the first message of a stream.
    Connected,
    /// `start`: stream and call metadata, once, before any media.
    Start(Start),
    /// `media`: one chunk of base64 μ-law audio.
    Media(Media),
    /// `dtmf`: a key the caller pressed.
    Dtmf(Dtmf),
    /// `mark`: a label in the outbound audio (to Twilio), or its echo once played (from Twilio).
    Mark(Mark),
    /// `stop`: the stream ended.
    Stop(Stop),
    /// `clear`: drop the outbound audio Twilio has buffered (barge-in).
    Clear,
}

/// Which side of the call audio or a key press belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Track {
    /// The caller's audio (`inbound`, `inbound_track`).
    Inbound,
    /// Audio played to the caller (`outbound`, `outbound_track`).
    Outbound,
}

impl Track {
    /// The name `media` messages use.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Inbound => "inbound",
            Self::Outbound => "outbound",
        }
    }

    /// Reads both spellings Twilio uses (`inbound` in `media`, `inbound_track` in `dtmf`).
    fn parse(name: &str) -> Option<Self> {
        match name {
            "inbound" | "inbound_track" => Some(Self::Inbound),
            "outbound" | "outbound_track" => Some(Self::Outbound),
            _ => None,
        }
    }
}

/// A `start` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Start {
    /// `sequenceNumber`, when present.
    pub sequence: Option<u64>,
    /// `start.streamSid` (or the top-level `streamSid`): echoed in every message sent to Twilio.
    pub stream_sid: String,
    /// `start.accountSid`.
    pub account_sid: String,
    /// `start.callSid`; empty when the start had none (the call is then named by the stream's URL).
    pub call_sid: String,
    /// `start.tracks` as sent (`inbound`, `outbound`); at most [`MAX_TRACKS`].
    pub tracks: Vec<String>,
    /// `start.customParameters` in the order received; non-string values as their JSON text.
    /// Bounded by [`MAX_CUSTOM_PARAMETERS`] because `<Parameter>`s are caller-controlled.
    pub custom_parameters: Vec<(String, String)>,
    /// `start.mediaFormat`, or Twilio's only format when absent.
    pub media_format: MediaFormat,
}

impl Start {
    /// The borrowed form [`start_msg`] writes.
    pub fn params(&self) -> StartParams<'_> {
        StartParams {
            stream_sid: &self.stream_sid,
            account_sid: &self.account_sid,
            call_sid: &self.call_sid,
            tracks: &self.tracks,
            custom_parameters: &self.custom_parameters,
            media_format: &self.media_format,
        }
    }

    /// The first custom parameter named `key`.
    pub fn custom_parameter(&self, key: &str) -> Option<&str> {
        self.custom_parameters.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

/// What [`start_msg`] writes; [`Start::params`] borrows one from a parsed `start`.
#[derive(Debug, Clone, Copy)]
pub struct StartParams<'a> {
    /// `streamSid`, written both inside `start` and at the top level, as Twilio does.
    pub stream_sid: &'a str,
    /// `accountSid`.
    pub account_sid: &'a str,
    /// `callSid`.
    pub call_sid: &'a str,
    /// `tracks`.
    pub tracks: &'a [String],
    /// `customParameters`, written in this order.
    pub custom_parameters: &'a [(String, String)],
    /// `mediaFormat`.
    pub media_format: &'a MediaFormat,
}

/// `start.mediaFormat`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaFormat {
    /// `encoding`; Twilio sends `audio/x-mulaw`.
    pub encoding: String,
    /// `sampleRate` in Hz; Twilio sends 8000.
    pub sample_rate: u32,
    /// `channels`; Twilio sends 1.
    pub channels: u16,
}

impl Default for MediaFormat {
    /// Twilio's only format: μ-law, 8 kHz, mono.
    fn default() -> Self {
        Self { encoding: MULAW.to_owned(), sample_rate: 8000, channels: 1 }
    }
}

/// A `media` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Media {
    /// `sequenceNumber`, when present (Twilio sends it; bots need not).
    pub sequence: Option<u64>,
    /// `media.track`; absent in audio sent to Twilio, `None` for names this crate does not know.
    pub track: Option<Track>,
    /// `media.chunk`: Twilio's per-track chunk counter, starting at 1.
    pub chunk: Option<u64>,
    /// `media.timestamp`: milliseconds since the stream started.
    pub timestamp_ms: Option<u64>,
    /// `media.payload`, still base64 (validated): a slice of the received frame, so forwarding it
    /// to a peer that speaks base64 costs no copy and no decode.
    pub payload: Bytes,
    /// Decoded length of `payload` in bytes, which is samples for μ-law.
    pub samples: usize,
}

/// A `dtmf` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dtmf {
    /// `sequenceNumber`, when present.
    pub sequence: Option<u64>,
    /// `dtmf.track` (`inbound_track`), when present and known.
    pub track: Option<Track>,
    /// `dtmf.digit`: one of `0`–`9`, `*`, `#`, `A`–`D`, `w`.
    pub digit: char,
}

/// A `mark` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mark {
    /// `sequenceNumber`, when present (Twilio's echo has it; marks sent to Twilio do not).
    pub sequence: Option<u64>,
    /// `mark.name`: at most [`MAX_MARK_NAME_BYTES`], since marks are held until played.
    pub name: String,
}

/// A `stop` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stop {
    /// `sequenceNumber`, when present.
    pub sequence: Option<u64>,
    /// `stop.accountSid`, when present.
    pub account_sid: Option<String>,
    /// `stop.callSid`, when present.
    pub call_sid: Option<String>,
}

/// Why a frame is not a Media Streams message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Not JSON, not an object, or a field of the wrong JSON type.
    #[error("malformed Twilio message: {0}")]
    Json(String),
    /// An `event` this crate does not know (its first 64 characters).
    #[error("unknown Twilio event {0:?}")]
    UnknownEvent(String),
    /// A required field is absent (named by its JSON path).
    #[error("Twilio message lacks {0}")]
    Missing(&'static str),
    /// A field has a value out of its range (named by its JSON path).
    #[error("Twilio message has an invalid {0}")]
    Invalid(&'static str),
    /// A field or list is over its bound (named by its JSON path).
    #[error("Twilio message has too large a {0}")]
    TooLarge(&'static str),
    /// `media.payload` is not base64.
    #[error("Twilio media payload is not base64")]
    Payload,
}

/// Parses one text frame.
///
/// `sequenceNumber`, `chunk` and `timestamp` may be JSON strings (as Twilio sends them) or
/// numbers; unknown fields are ignored.
///
/// # Errors
/// [`ParseError`] for anything but a well-formed message within the bounds above.
pub fn parse(frame: &Bytes) -> Result<Message, ParseError> {
    if !super::is_json_object(frame) {
        return Err(ParseError::Json("a message is a JSON object".to_owned()));
    }
    let wire: Wire<'_> = serde_json::from_slice(frame).map_err(|e| ParseError::Json(e.to_string()))?;
    let event = wire.event.ok_or(ParseError::Missing("event"))?;
    let sequence = number(wire.sequence_number, "sequenceNumber")?;
    match event.as_str() {
        "media" => {
            let media = wire.media.ok_or(ParseError::Missing("media"))?;
            let payload = media.payload.ok_or(ParseError::Missing("media.payload"))?;
            let samples = base64_samples(payload.as_str().as_bytes()).ok_or(ParseError::Payload)?;
            Ok(Message::Media(Media {
                sequence,
                track: media.track.and_then(|t| Track::parse(t.as_str())),
                chunk: number(media.chunk, "media.chunk")?,
                timestamp_ms: number(media.timestamp, "media.timestamp")?,
                payload: payload_bytes(frame, payload),
                samples,
            }))
        }
        "mark" => {
            let name = wire.mark.and_then(|m| m.name).ok_or(ParseError::Missing("mark.name"))?;
            Ok(Message::Mark(Mark { sequence, name: bounded(name, MAX_MARK_NAME_BYTES, "mark.name")? }))
        }
        "clear" => Ok(Message::Clear),
        "connected" => Ok(Message::Connected),
        "start" => {
            let body = match wire.start {
                Some(body) => body,
                // Flat: Twilio nests these in `start`; seed 003's clients send them beside `event`.
                None if wire.account_sid.is_some() || wire.call_sid.is_some() => WireStart {
                    account_sid: wire.account_sid,
                    stream_sid: None,
                    call_sid: wire.call_sid,
                    tracks: wire.tracks,
                    custom_parameters: wire.custom_parameters,
                    media_format: wire.media_format,
                },
                None => return Err(ParseError::Missing("start")),
            };
            start(sequence, body, wire.stream_sid).map(Message::Start)
        }
        "dtmf" => {
            let dtmf = wire.dtmf.ok_or(ParseError::Missing("dtmf"))?;
            let digit = dtmf.digit.ok_or(ParseError::Missing("dtmf.digit"))?;
            let mut chars = digit.as_str().chars();
            let digit = match (chars.next(), chars.next()) {
                (Some(c), None) if is_dtmf_digit(c) => c,
                _ => return Err(ParseError::Invalid("dtmf.digit")),
            };
            Ok(Message::Dtmf(Dtmf { sequence, track: dtmf.track.and_then(|t| Track::parse(t.as_str())), digit }))
        }
        "stop" => {
            let (account_sid, call_sid) = wire.stop.map_or((None, None), |s| (s.account_sid, s.call_sid));
            Ok(Message::Stop(Stop {
                sequence,
                account_sid: account_sid.map(|s| bounded(s, MAX_SID_BYTES, "stop.accountSid")).transpose()?,
                call_sid: call_sid.map(|s| bounded(s, MAX_SID_BYTES, "stop.callSid")).transpose()?,
            }))
        }
        other => Err(ParseError::UnknownEvent(other.chars().take(64).collect())),
    }
}

/// Whether `frame` is a JSON object whose `event` is `start`, whatever else it holds: tells a
/// `start` that [`parse`] refused (a field over its bound, a wrong type) from other messages.
pub fn names_start(frame: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct EventOnly<'a> {
        #[serde(borrow)]
        event: Option<JsonStr<'a>>,
    }
    super::is_json_object(frame)
        && serde_json::from_slice::<EventOnly<'_>>(frame).is_ok_and(|w| w.event.is_some_and(|e| e.as_str() == "start"))
}

/// Decoded length of a base64 `payload` (standard alphabet, padded or not), without decoding it.
///
/// Returns `None` unless `payload` is what base64's `STANDARD` or `STANDARD_NO_PAD` engines
/// The per-call stream signature the relay's TwiML passes as the `relaySig` parameter:
/// base64(HMAC-SHA1(key, call_sid)). A stream whose `start` carries it was started by that TwiML
/// for that very call; the stream upgrade's own X-Twilio-Signature covers only the URL, which is
/// the same for every call.
pub fn stream_signature(key: &crate::secret::Secret, call_sid: &str) -> String {
    use base64::Engine as _;
    use hmac::{Hmac, Mac};
    // HMAC takes keys of any length, so construction cannot fail.
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(key.expose().as_bytes()).expect("HMAC accepts any key length");
    mac.update(call_sid.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// accept: alphabet characters only, `=` only as complete padding, no stray trailing bits.
pub fn base64_samples(payload: &[u8]) -> Option<usize> {
    let body = match payload {
        [body @ .., b'=', b'='] | [body @ .., b'='] if payload.len() % 4 == 0 => body,
        [.., b'='] => return None,
        _ => payload,
    };
    let rem = body.len() % 4;
    let mut last = 0;
    for &c in body {
        last = BASE64_VALUE[usize::from(c)];
        if last == NOT_BASE64 {
            return None;
        }
    }
    // The bits of the last character beyond the final whole byte must be zero (canonical form).
    let (tail_bytes, stray_bits) = match rem {
        0 => (0, 0),
        2 => (1, 0x0F),
        3 => (2, 0x03),
        _ => return None,
    };
    (last & stray_bits == 0).then_some(body.len() / 4 * 3 + tail_bytes)
}

/// Base64 of `samples` bytes of μ-law silence ([`g711::SILENCE`](crate::media::g711::SILENCE)).
///
/// The 20 ms frame ([`FRAME_20MS_SAMPLES`]) is a static built at compile time; other lengths allocate.
pub fn silence_payload(samples: usize) -> Bytes {
    if samples == FRAME_20MS_SAMPLES {
        return Bytes::from_static(&SILENCE_20MS);
    }
    silence_base64(samples)
}

/// To Twilio: `{"event":"media","streamSid":…,"media":{"payload":…}}`.
///
/// `payload` is base64 and is inserted verbatim; anything else is escaped (invalid UTF-8 replaced)
/// so the frame is still JSON, and the receiver refuses the payload.
pub fn media_out(stream_sid: &str, payload: &[u8]) -> Utf8Bytes {
    let mut out = String::with_capacity(64 + stream_sid.len() + payload.len());
    out.push_str(r#"{"event":"media","streamSid":"#);
    push_json_str(&mut out, stream_sid);
    out.push_str(r#","media":{"payload":"#);
    push_payload(&mut out, payload);
    out.push_str("}}");
    Utf8Bytes::from(out)
}

/// To Twilio: `{"event":"mark","streamSid":…,"mark":{"name":…}}`.
pub fn mark_out(stream_sid: &str, name: &str) -> Utf8Bytes {
    let mut out = String::with_capacity(56 + stream_sid.len() + name.len());
    out.push_str(r#"{"event":"mark","streamSid":"#);
    push_json_str(&mut out, stream_sid);
    out.push_str(r#","mark":{"name":"#);
    push_json_str(&mut out, name);
    out.push_str("}}");
    Utf8Bytes::from(out)
}

/// To Twilio: `{"event":"clear","streamSid":…}`.
pub fn clear_out(stream_sid: &str) -> Utf8Bytes {
    let mut out = String::with_capacity(40 + stream_sid.len());
    out.push_str(r#"{"event":"clear","streamSid":"#);
    push_json_str(&mut out, stream_sid);
    out.push('}');
    Utf8Bytes::from(out)
}

/// As Twilio: `{"event":"connected","protocol":"Call","version":"1.0.0"}`.
pub fn connected_msg() -> Utf8Bytes {
    Utf8Bytes::from_static(r#"{"event":"connected","protocol":"Call","version":"1.0.0"}"#)
}

/// As Twilio: `{"event":"start","sequenceNumber":…,"start":{…},"streamSid":…}`.
pub fn start_msg(sequence: u64, start: &StartParams<'_>) -> Utf8Bytes {
    let strings = start.tracks.iter().map(|t| t.len() + 3).sum::<usize>()
        + start.custom_parameters.iter().map(|(k, v)| k.len() + v.len() + 6).sum::<usize>();
    let mut out = String::with_capacity(
        256 + 2 * start.stream_sid.len()
            + start.account_sid.len()
            + start.call_sid.len()
            + start.media_format.encoding.len()
            + strings,
    );
    out.push_str(r#"{"event":"start","sequenceNumber":"#);
    push_u64_str(&mut out, sequence);
    out.push_str(r#","start":{"accountSid":"#);
    push_json_str(&mut out, start.account_sid);
    out.push_str(r#","streamSid":"#);
    push_json_str(&mut out, start.stream_sid);
    out.push_str(r#","callSid":"#);
    push_json_str(&mut out, start.call_sid);
    out.push_str(r#","tracks":["#);
    for (i, track) in start.tracks.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_json_str(&mut out, track);
    }
    out.push_str(r#"],"customParameters":{"#);
    for (i, (key, value)) in start.custom_parameters.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_json_str(&mut out, key);
        out.push(':');
        push_json_str(&mut out, value);
    }
    out.push_str(r#"},"mediaFormat":{"encoding":"#);
    push_json_str(&mut out, &start.media_format.encoding);
    out.push_str(r#","sampleRate":"#);
    push_u64(&mut out, u64::from(start.media_format.sample_rate));
    out.push_str(r#","channels":"#);
    push_u64(&mut out, u64::from(start.media_format.channels));
    out.push_str(r#"}},"streamSid":"#);
    push_json_str(&mut out, start.stream_sid);
    out.push('}');
    Utf8Bytes::from(out)
}

/// As Twilio: `{"event":"media","sequenceNumber":…,"media":{"track","chunk","timestamp","payload"},"streamSid":…}`.
///
/// `payload` is base64, inserted as [`media_out`] does.
pub fn media_msg(
    sequence: u64,
    stream_sid: &str,
    track: Track,
    chunk: u64,
    timestamp_ms: u64,
    payload: &[u8],
) -> Utf8Bytes {
    let mut out = String::with_capacity(160 + stream_sid.len() + payload.len());
    out.push_str(r#"{"event":"media","sequenceNumber":"#);
    push_u64_str(&mut out, sequence);
    out.push_str(r#","media":{"track":""#);
    out.push_str(track.as_str());
    out.push_str(r#"","chunk":"#);
    push_u64_str(&mut out, chunk);
    out.push_str(r#","timestamp":"#);
    push_u64_str(&mut out, timestamp_ms);
    out.push_str(r#","payload":"#);
    push_payload(&mut out, payload);
    out.push_str(r#"},"streamSid":"#);
    push_json_str(&mut out, stream_sid);
    out.push('}');
    Utf8Bytes::from(out)
}

/// As Twilio: `{"event":"dtmf","streamSid":…,"sequenceNumber":…,"dtmf":{"track":"inbound_track","digit":…}}`.
pub fn dtmf_msg(sequence: u64, stream_sid: &str, digit: char) -> Utf8Bytes {
    let mut out = String::with_capacity(120 + stream_sid.len());
    out.push_str(r#"{"event":"dtmf","streamSid":"#);
    push_json_str(&mut out, stream_sid);
    out.push_str(r#","sequenceNumber":"#);
    push_u64_str(&mut out, sequence);
    out.push_str(r#","dtmf":{"track":"inbound_track","digit":"#);
    push_json_str(&mut out, digit.encode_utf8(&mut [0; 4]));
    out.push_str("}}");
    Utf8Bytes::from(out)
}

/// As Twilio, echoing a played mark: `{"event":"mark","sequenceNumber":…,"streamSid":…,"mark":{"name":…}}`.
pub fn mark_echo_msg(sequence: u64, stream_sid: &str, name: &str) -> Utf8Bytes {
    let mut out = String::with_capacity(96 + stream_sid.len() + name.len());
    out.push_str(r#"{"event":"mark","sequenceNumber":"#);
    push_u64_str(&mut out, sequence);
    out.push_str(r#","streamSid":"#);
    push_json_str(&mut out, stream_sid);
    out.push_str(r#","mark":{"name":"#);
    push_json_str(&mut out, name);
    out.push_str("}}");
    Utf8Bytes::from(out)
}

/// As Twilio: `{"event":"stop","sequenceNumber":…,"streamSid":…,"stop":{"accountSid":…,"callSid":…}}`.
pub fn stop_msg(sequence: u64, stream_sid: &str, account_sid: &str, call_sid: &str) -> Utf8Bytes {
    let mut out = String::with_capacity(112 + stream_sid.len() + account_sid.len() + call_sid.len());
    out.push_str(r#"{"event":"stop","sequenceNumber":"#);
    push_u64_str(&mut out, sequence);
    out.push_str(r#","streamSid":"#);
    push_json_str(&mut out, stream_sid);
    out.push_str(r#","stop":{"accountSid":"#);
    push_json_str(&mut out, account_sid);
    out.push_str(r#","callSid":"#);
    push_json_str(&mut out, call_sid);
    out.push_str("}}");
    Utf8Bytes::from(out)
}

/// Appends `s` as a JSON string literal, quotes included, escaping only what JSON requires.
pub(crate) fn push_json_str(out: &mut String, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push('"');
    let mut clean = 0;
    for (i, &b) in s.as_bytes().iter().enumerate() {
        let escape = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x00..=0x1F => "",
            _ => continue,
        };
        // `i` is at an ASCII byte, which is always a char boundary, so the slice cannot panic.
        out.push_str(&s[clean..i]);
        if escape.is_empty() {
            out.push_str("\\u00");
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0x0F)]));
        } else {
            out.push_str(escape);
        }
        clean = i + 1;
    }
    out.push_str(&s[clean..]);
    out.push('"');
}

/// Appends a base64 payload as a JSON string; it needs no escaping, but other bytes are made safe.
pub(crate) fn push_payload(out: &mut String, payload: &[u8]) {
    match std::str::from_utf8(payload) {
        Ok(text) => push_json_str(out, text),
        Err(_) => push_json_str(out, &String::from_utf8_lossy(payload)),
    }
}

/// A JSON string borrowed from the input when it had no escapes, owned otherwise.
///
/// Needed because serde's own `Cow<str>` only borrows as a bare `#[serde(borrow)]` field, never
/// inside an `Option`.
#[derive(Debug)]
pub(crate) struct JsonStr<'a>(Cow<'a, str>);

impl JsonStr<'_> {
    /// The string's text.
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }

    /// The text as an owned `String`, refused when longer than `max` bytes.
    pub(crate) fn bounded(self, max: usize, what: &'static str) -> Result<String, &'static str> {
        if self.0.len() > max {
            Err(what)
        } else {
            Ok(self.0.into_owned())
        }
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for JsonStr<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct StrVisitor;
        impl<'de> Visitor<'de> for StrVisitor {
            type Value = JsonStr<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }

            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(JsonStr(Cow::Borrowed(v)))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(JsonStr(Cow::Owned(v.to_owned())))
            }

            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(JsonStr(Cow::Owned(v)))
            }
        }
        deserializer.deserialize_str(StrVisitor)
    }
}

/// Every field any message has; one pass over the frame, no intermediate `Value`.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Wire<'a> {
    #[serde(borrow)]
    event: Option<JsonStr<'a>>,
    sequence_number: Option<Num>,
    #[serde(borrow)]
    stream_sid: Option<JsonStr<'a>>,
    #[serde(borrow)]
    start: Option<WireStart<'a>>,
    #[serde(borrow)]
    media: Option<WireMedia<'a>>,
    #[serde(borrow)]
    dtmf: Option<WireDtmf<'a>>,
    #[serde(borrow)]
    mark: Option<WireMark<'a>>,
    #[serde(borrow)]
    stop: Option<WireStop<'a>>,
    // A `start` written flat (its fields at the top level, as seed 003 documents it): `WireStart`'s
    // fields again rather than `#[serde(flatten)]`, which would buffer every message (media too).
    #[serde(borrow)]
    account_sid: Option<JsonStr<'a>>,
    #[serde(borrow)]
    call_sid: Option<JsonStr<'a>>,
    #[serde(borrow)]
    tracks: Option<Vec<JsonStr<'a>>>,
    custom_parameters: Option<Params>,
    #[serde(borrow)]
    media_format: Option<WireFormat<'a>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireStart<'a> {
    #[serde(borrow)]
    account_sid: Option<JsonStr<'a>>,
    #[serde(borrow)]
    stream_sid: Option<JsonStr<'a>>,
    #[serde(borrow)]
    call_sid: Option<JsonStr<'a>>,
    #[serde(borrow)]
    tracks: Option<Vec<JsonStr<'a>>>,
    custom_parameters: Option<Params>,
    #[serde(borrow)]
    media_format: Option<WireFormat<'a>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireFormat<'a> {
    #[serde(borrow)]
    encoding: Option<JsonStr<'a>>,
    sample_rate: Option<Num>,
    channels: Option<Num>,
}

#[derive(Deserialize)]
struct WireMedia<'a> {
    #[serde(borrow)]
    track: Option<JsonStr<'a>>,
    chunk: Option<Num>,
    timestamp: Option<Num>,
    #[serde(borrow)]
    payload: Option<JsonStr<'a>>,
}

#[derive(Deserialize)]
struct WireDtmf<'a> {
    #[serde(borrow)]
    track: Option<JsonStr<'a>>,
    #[serde(borrow)]
    digit: Option<JsonStr<'a>>,
}

#[derive(Deserialize)]
struct WireMark<'a> {
    #[serde(borrow)]
    name: Option<JsonStr<'a>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireStop<'a> {
    #[serde(borrow)]
    account_sid: Option<JsonStr<'a>>,
    #[serde(borrow)]
    call_sid: Option<JsonStr<'a>>,
}

/// A count Twilio writes as a string (`"3"`) and others as a number; range is checked later so
/// the error can name the field.
enum Num {
    /// A non-negative integer, from either form.
    Value(u64),
    /// A negative, fractional, too large or non-numeric value.
    Invalid,
}

impl<'de> Deserialize<'de> for Num {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct NumVisitor;
        impl Visitor<'_> for NumVisitor {
            type Value = Num;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a non-negative integer or a string of one")
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Num, E> {
                Ok(Num::Value(v))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Num, E> {
                Ok(u64::try_from(v).map_or(Num::Invalid, Num::Value))
            }

            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Num, E> {
                Ok(Num::Invalid)
            }

            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Num, E> {
                Ok(Num::Invalid)
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Num, E> {
                let digits = !v.is_empty() && v.len() <= 20 && v.bytes().all(|b| b.is_ascii_digit());
                Ok(if digits { v.parse().map_or(Num::Invalid, Num::Value) } else { Num::Invalid })
            }
        }
        deserializer.deserialize_any(NumVisitor)
    }
}

/// `customParameters`, bounded while it is read: past a bound the rest is skipped, not stored.
struct Params {
    entries: Vec<(String, String)>,
    /// The first bound crossed, reported as [`ParseError::TooLarge`].
    too_large: Option<&'static str>,
}

impl<'de> Deserialize<'de> for Params {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ParamsVisitor;
        impl<'de> Visitor<'de> for ParamsVisitor {
            type Value = Params;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object of parameters")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Params, A::Error> {
                let mut params = Params {
                    entries: Vec::with_capacity(map.size_hint().unwrap_or(0).min(MAX_CUSTOM_PARAMETERS)),
                    too_large: None,
                };
                while let Some(key) = map.next_key::<JsonStr<'de>>()? {
                    if params.too_large.is_some() {
                        map.next_value::<IgnoredAny>()?;
                        continue;
                    }
                    if params.entries.len() == MAX_CUSTOM_PARAMETERS {
                        params.too_large = Some("start.customParameters");
                        map.next_value::<IgnoredAny>()?;
                        continue;
                    }
                    let value = match map.next_value::<serde_json::Value>()? {
                        serde_json::Value::String(s) => s,
                        other => other.to_string(),
                    };
                    match (key.bounded(MAX_PARAMETER_KEY_BYTES, "start.customParameters key"), value.len()) {
                        (Err(what), _) => params.too_large = Some(what),
                        (Ok(_), n) if n > MAX_PARAMETER_VALUE_BYTES => {
                            params.too_large = Some("start.customParameters value");
                        }
                        (Ok(key), _) => params.entries.push((key, value)),
                    }
                }
                Ok(params)
            }
        }
        deserializer.deserialize_map(ParamsVisitor)
    }
}

fn start(sequence: Option<u64>, wire: WireStart<'_>, top_stream_sid: Option<JsonStr<'_>>) -> Result<Start, ParseError> {
    let stream_sid = wire.stream_sid.or(top_stream_sid).ok_or(ParseError::Missing("start.streamSid"))?;
    let account_sid = wire.account_sid.ok_or(ParseError::Missing("start.accountSid"))?;
    // Empty when absent: the stream's URL (`?callSid=`) or its session names the call instead.
    let call_sid = wire.call_sid.unwrap_or(JsonStr(Cow::Borrowed("")));
    let tracks = wire.tracks.unwrap_or_default();
    if tracks.len() > MAX_TRACKS {
        return Err(ParseError::TooLarge("start.tracks"));
    }
    let params = wire.custom_parameters.unwrap_or(Params { entries: Vec::new(), too_large: None });
    if let Some(what) = params.too_large {
        return Err(ParseError::TooLarge(what));
    }
    let media_format = match wire.media_format {
        None => MediaFormat::default(),
        Some(f) => MediaFormat {
            encoding: match f.encoding {
                Some(e) => bounded(e, MAX_FIELD_BYTES, "start.mediaFormat.encoding")?,
                None => MULAW.to_owned(),
            },
            sample_rate: match number(f.sample_rate, "start.mediaFormat.sampleRate")? {
                Some(n) => u32::try_from(n).map_err(|_| ParseError::Invalid("start.mediaFormat.sampleRate"))?,
                None => 8000,
            },
            channels: match number(f.channels, "start.mediaFormat.channels")? {
                Some(n) => u16::try_from(n).map_err(|_| ParseError::Invalid("start.mediaFormat.channels"))?,
                None => 1,
            },
        },
    };
    Ok(Start {
        sequence,
        stream_sid: bounded(stream_sid, MAX_SID_BYTES, "start.streamSid")?,
        account_sid: bounded(account_sid, MAX_SID_BYTES, "start.accountSid")?,
        call_sid: bounded(call_sid, MAX_SID_BYTES, "start.callSid")?,
        tracks: tracks.into_iter().map(|t| bounded(t, MAX_FIELD_BYTES, "start.tracks")).collect::<Result<_, _>>()?,
        custom_parameters: params.entries,
        media_format,
    })
}

/// The payload as a slice of `frame` when serde borrowed it from there, else its unescaped copy.
fn payload_bytes(frame: &Bytes, payload: JsonStr<'_>) -> Bytes {
    match payload.0 {
        Cow::Borrowed(text) => {
            let start = text.as_ptr().addr().wrapping_sub(frame.as_ptr().addr());
            match start.checked_add(text.len()) {
                Some(end) if start <= frame.len() && end <= frame.len() => frame.slice(start..end),
                _ => Bytes::copy_from_slice(text.as_bytes()),
            }
        }
        Cow::Owned(text) => Bytes::from(text.into_bytes()),
    }
}

fn bounded(s: JsonStr<'_>, max: usize, what: &'static str) -> Result<String, ParseError> {
    s.bounded(max, what).map_err(ParseError::TooLarge)
}

fn number(n: Option<Num>, what: &'static str) -> Result<Option<u64>, ParseError> {
    match n {
        None => Ok(None),
        Some(Num::Value(v)) => Ok(Some(v)),
        Some(Num::Invalid) => Err(ParseError::Invalid(what)),
    }
}

fn is_dtmf_digit(c: char) -> bool {
    matches!(c, '0'..='9' | '*' | '#' | 'A'..='D' | 'w')
}

fn silence_base64(samples: usize) -> Bytes {
    let mut out = Vec::with_capacity(samples.div_ceil(3) * 4);
    for _ in 0..samples / 3 {
        // Three 0xFF bytes are 24 one-bits: four `/` (63).
        out.extend_from_slice(b"////");
    }
    match samples % 3 {
        1 => out.extend_from_slice(b"/w=="),
        2 => out.extend_from_slice(b"//8="),
        _ => {}
    }
    Bytes::from(out)
}

/// Appends `n` in decimal.
fn push_u64(out: &mut String, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    loop {
        start -= 1;
        // `n % 10` is a single digit.
        digits[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for &d in &digits[start..] {
        out.push(char::from(d));
    }
}

/// Appends `n` in decimal inside quotes, as Twilio writes its counters.
fn push_u64_str(out: &mut String, n: u64) {
    out.push('"');
    push_u64(out, n);
    out.push('"');
}

/// Base64 value of each byte, or [`NOT_BASE64`].
const BASE64_VALUE: [u8; 256] = base64_values();

const fn base64_values() -> [u8; 256] {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut table = [NOT_BASE64; 256];
    let mut i = 0;
    while i < 64 {
        // `i < 64`, so the cast is lossless.
        table[ALPHABET[i] as usize] = i as u8;
        i += 1;
    }
    table
}

/// Marks a byte outside the base64 alphabet in [`BASE64_VALUE`].
const NOT_BASE64: u8 = 0xFF;

/// Base64 of one 20 ms frame of silence, built at compile time: a static `Bytes` clones without
/// touching a reference count, so cores never share a cache line over it.
static SILENCE_20MS: [u8; FRAME_20MS_SAMPLES.div_ceil(3) * 4] = silence_20ms();

const fn silence_20ms() -> [u8; FRAME_20MS_SAMPLES.div_ceil(3) * 4] {
    let mut out = [b'/'; FRAME_20MS_SAMPLES.div_ceil(3) * 4];
    let last = out.len() - 1;
    match FRAME_20MS_SAMPLES % 3 {
        1 => {
            out[last - 2] = b'w';
            out[last - 1] = b'=';
            out[last] = b'=';
        }
        2 => {
            out[last - 1] = b'8';
            out[last] = b'=';
        }
        _ => {}
    }
    out
}

/// Twilio's media encoding, the default when `mediaFormat` is absent.
const MULAW: &str = "audio/x-mulaw";

/// Samples in one 20 ms μ-law frame at 8 kHz, the size Twilio sends.
pub const FRAME_20MS_SAMPLES: usize = 160;

/// Most `customParameters` a `start` may carry (`<Parameter>` elements in TwiML).
pub const MAX_CUSTOM_PARAMETERS: usize = 64;

/// Longest `customParameters` name, in bytes.
pub const MAX_PARAMETER_KEY_BYTES: usize = 256;

/// Longest `customParameters` value, in bytes (non-strings measured as their JSON text).
pub const MAX_PARAMETER_VALUE_BYTES: usize = 4096;

/// Longest `mark.name`, in bytes.
pub const MAX_MARK_NAME_BYTES: usize = 256;

/// Longest SID (`streamSid`, `accountSid`, `callSid`), in bytes; Twilio's are 34.
pub const MAX_SID_BYTES: usize = 128;

/// Most entries in `start.tracks`; Twilio sends at most two.
pub const MAX_TRACKS: usize = 8;

/// Longest other short text field (a track name, `mediaFormat.encoding`), in bytes.
pub const MAX_FIELD_BYTES: usize = 64;

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
    use base64::Engine as _;
    use proptest::prelude::*;
    use serde_json::{json, Value};

    /// A `start` that `parse` refuses (a field past its bound, a wrong type) is still known as a
    /// start; other messages and non-JSON are not.
    #[test]
    fn names_start_tells_refused_starts_from_other_messages() {
        let long = "C".repeat(MAX_SID_BYTES + 1);
        let start = json!({"callSid": long, "streamSid": "MZ1", "accountSid": "AC1", "tracks": ["inbound"]});
        let oversized = json!({"event": "start", "start": start}).to_string();
        assert_eq!(parse_str(&oversized), Err(ParseError::TooLarge("start.callSid")));
        assert!(names_start(oversized.as_bytes()));
        assert!(names_start(br#"{"start": 5, "event": "start"}"#));
        assert!(!names_start(br#"{"event": "media", "media": {"payload": ""}}"#));
        assert!(!names_start(br#"{"event": "connected"}"#));
        assert!(!names_start(b"start"));
        assert!(!names_start(br#"["event", "start"]"#));
    }

    /// Parses a string frame.
    fn parse_str(text: &str) -> Result<Message, ParseError> {
        parse(&Bytes::copy_from_slice(text.as_bytes()))
    }

    /// Parses a frame that must be `media`.
    fn media(text: &str) -> Media {
        match parse_str(text) {
            Ok(Message::Media(m)) => m,
            other => panic!("expected media, got {other:?}"),
        }
    }

    /// Parses a frame that must be `start`.
    fn start_of(text: &str) -> Start {
        match parse_str(text) {
            Ok(Message::Start(s)) => s,
            other => panic!("expected start, got {other:?}"),
        }
    }

    /// Writer output as a JSON value.
    fn json_of(text: &Utf8Bytes) -> Value {
        serde_json::from_str(text).expect("writer output is JSON")
    }

    /// A `start` like Twilio's, with a `callSid` parameter.
    fn sample_start() -> Start {
        Start {
            sequence: Some(1),
            stream_sid: "MZ18ad3ab5a668481ce02b83e7395059f0".into(),
            account_sid: "AC123".into(),
            call_sid: "CA456".into(),
            tracks: vec!["inbound".into(), "outbound".into()],
            custom_parameters: vec![("k".into(), "v".into()), ("callSid".into(), "CA456".into())],
            media_format: MediaFormat::default(),
        }
    }

    /// A `start` written flat, as seed 003 documents it, parses like Twilio's nested one; a start
    /// without `callSid` parses with an empty one (the stream's URL then names the call).
    #[test]
    fn flat_start_and_missing_call_sid() {
        let flat = start_of(
            r#"{"event":"start","streamSid":"MZ1","accountSid":"AC1","callSid":"CA1","tracks":["inbound","outbound"]}"#,
        );
        assert_eq!(
            flat,
            Start {
                sequence: None,
                stream_sid: "MZ1".into(),
                account_sid: "AC1".into(),
                call_sid: "CA1".into(),
                tracks: vec!["inbound".into(), "outbound".into()],
                custom_parameters: Vec::new(),
                media_format: MediaFormat::default(),
            }
        );
        let with_params =
            start_of(r#"{"event":"start","streamSid":"M","accountSid":"A","customParameters":{"k":"v"}}"#);
        assert_eq!(
            (with_params.call_sid.as_str(), &with_params.custom_parameters[..]),
            ("", &[("k".into(), "v".into())][..])
        );
        let nested = start_of(r#"{"event":"start","start":{"streamSid":"M","accountSid":"A"}}"#);
        assert_eq!(nested.call_sid, "");
        // The nested object wins when both are there.
        let both = start_of(
            r#"{"event":"start","callSid":"flat","start":{"streamSid":"M","accountSid":"A","callSid":"nested"}}"#,
        );
        assert_eq!(both.call_sid, "nested");
        assert_eq!(parse_str(r#"{"event":"start","streamSid":"M"}"#), Err(ParseError::Missing("start")));
        assert_eq!(parse_str(r#"{"event":"start","callSid":"C"}"#), Err(ParseError::Missing("start.streamSid")));
    }

    /// Each of Twilio's documented examples parses to the values it carries.
    #[test]
    fn documented_examples_parse() {
        assert_eq!(parse_str(r#"{"event":"connected","protocol":"Call","version":"1.0.0"}"#), Ok(Message::Connected));
        let start = start_of(
            r#"{"event":"start","sequenceNumber":"1","start":{"accountSid":"AC1","streamSid":"MZ1","callSid":"CA1","tracks":["inbound","outbound"],"customParameters":{"k":"v"},"mediaFormat":{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1}},"streamSid":"MZ1"}"#,
        );
        assert_eq!(
            start,
            Start {
                sequence: Some(1),
                stream_sid: "MZ1".into(),
                account_sid: "AC1".into(),
                call_sid: "CA1".into(),
                tracks: vec!["inbound".into(), "outbound".into()],
                custom_parameters: vec![("k".into(), "v".into())],
                media_format: MediaFormat { encoding: "audio/x-mulaw".into(), sample_rate: 8000, channels: 1 },
            }
        );
        assert_eq!(start.custom_parameter("k"), Some("v"));
        assert_eq!(start.custom_parameter("x"), None);
        let m = media(
            r#"{"event":"media","sequenceNumber":"3","media":{"track":"inbound","chunk":"1","timestamp":"5","payload":"//8="},"streamSid":"MZ1"}"#,
        );
        assert_eq!((m.sequence, m.track, m.chunk, m.timestamp_ms), (Some(3), Some(Track::Inbound), Some(1), Some(5)));
        assert_eq!((&m.payload[..], m.samples), (&b"//8="[..], 2));
        assert_eq!(
            parse_str(
                r#"{"event":"dtmf","streamSid":"MZ1","sequenceNumber":"5","dtmf":{"track":"inbound_track","digit":"1"}}"#
            ),
            Ok(Message::Dtmf(Dtmf { sequence: Some(5), track: Some(Track::Inbound), digit: '1' }))
        );
        assert_eq!(
            parse_str(r#"{"event":"mark","sequenceNumber":"4","streamSid":"MZ1","mark":{"name":"my label"}}"#),
            Ok(Message::Mark(Mark { sequence: Some(4), name: "my label".into() }))
        );
        assert_eq!(
            parse_str(
                r#"{"event":"stop","sequenceNumber":"5","streamSid":"MZ1","stop":{"accountSid":"AC1","callSid":"CA1"}}"#
            ),
            Ok(Message::Stop(Stop {
                sequence: Some(5),
                account_sid: Some("AC1".into()),
                call_sid: Some("CA1".into())
            }))
        );
        // The three messages Twilio receives, as a bot sends them.
        let m = media(r#"{"event":"media","streamSid":"MZ1","media":{"payload":"AAAA"}}"#);
        assert_eq!((m.sequence, m.track, m.chunk, m.timestamp_ms, m.samples), (None, None, None, None, 3));
        assert_eq!(
            parse_str(r#"{"event":"mark","streamSid":"MZ1","mark":{"name":"n"}}"#),
            Ok(Message::Mark(Mark { sequence: None, name: "n".into() }))
        );
        assert_eq!(parse_str(r#"{"event":"clear","streamSid":"MZ1"}"#), Ok(Message::Clear));
    }

    /// Optional parts: `start` defaults, top-level `streamSid` fallback, empty `stop`, key order.
    #[test]
    fn optional_parts() {
        let s = start_of(r#"{"streamSid":"MZ9","start":{"callSid":"CA","accountSid":"AC"},"event":"start"}"#);
        assert_eq!((s.sequence, s.stream_sid.as_str()), (None, "MZ9"));
        assert!(s.tracks.is_empty() && s.custom_parameters.is_empty());
        assert_eq!(s.media_format, MediaFormat { encoding: "audio/x-mulaw".into(), sample_rate: 8000, channels: 1 });
        let s = start_of(
            r#"{"event":"start","start":{"streamSid":"MZ","callSid":"CA","accountSid":"AC","mediaFormat":{"sampleRate":"16000"}}}"#,
        );
        assert_eq!(s.media_format, MediaFormat { encoding: "audio/x-mulaw".into(), sample_rate: 16000, channels: 1 });
        assert_eq!(
            parse_str(r#"{"event":"stop"}"#),
            Ok(Message::Stop(Stop { sequence: None, account_sid: None, call_sid: None }))
        );
        let m = media(r#"{"media":{"payload":"","track":"outbound_track"},"event":"media","extra":{"a":[1,2]}}"#);
        assert_eq!((m.track, m.samples, m.payload.len()), (Some(Track::Outbound), 0, 0));
        assert_eq!(media(r#"{"event":"media","media":{"payload":"AAAA","track":"both"}}"#).track, None);
    }

    /// Custom parameters keep their order and duplicates; non-string values become JSON text.
    #[test]
    fn custom_parameters() {
        let s = start_of(
            r#"{"event":"start","start":{"streamSid":"MZ","callSid":"CA","accountSid":"AC","customParameters":{"z":"1","a":2,"m":true,"n":null,"o":{"x":[1]},"z":"again","e":"\u00e9\"q"}}}"#,
        );
        let got: Vec<(&str, &str)> = s.custom_parameters.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(
            got,
            [
                ("z", "1"),
                ("a", "2"),
                ("m", "true"),
                ("n", "null"),
                ("o", r#"{"x":[1]}"#),
                ("z", "again"),
                ("e", "é\"q")
            ]
        );
        assert_eq!(s.custom_parameter("z"), Some("1"));
    }

    /// Counters are accepted as JSON strings or numbers; anything else is refused by name.
    #[test]
    fn numbers_as_strings_or_numbers() {
        let both = [
            r#"{"event":"media","sequenceNumber":"7","media":{"chunk":"8","timestamp":"9","payload":"AAAA"}}"#,
            r#"{"event":"media","sequenceNumber":7,"media":{"chunk":8,"timestamp":9,"payload":"AAAA"}}"#,
        ];
        for text in both {
            let m = media(text);
            assert_eq!((m.sequence, m.chunk, m.timestamp_ms), (Some(7), Some(8), Some(9)), "{text}");
        }
        let m = media(r#"{"event":"media","sequenceNumber":"18446744073709551615","media":{"payload":"AAAA"}}"#);
        assert_eq!(m.sequence, Some(u64::MAX));
        for (value, _) in [("-1", 0), ("1.5", 0), (r#""-1""#, 0), (r#""""#, 0), (r#""1x""#, 0), (r#""+1""#, 0)] {
            let text = format!(r#"{{"event":"mark","sequenceNumber":{value},"mark":{{"name":"n"}}}}"#);
            assert_eq!(parse_str(&text), Err(ParseError::Invalid("sequenceNumber")), "{value}");
        }
        for value in [r#""18446744073709551616""#, "18446744073709551616", "true"] {
            let text = format!(r#"{{"event":"media","media":{{"chunk":{value},"payload":"AAAA"}}}}"#);
            assert_eq!(parse_str(&text), Err(ParseError::Invalid("media.chunk")), "{value}");
        }
        let text = r#"{"event":"media","media":{"timestamp":"x","payload":"AAAA"}}"#;
        assert_eq!(parse_str(text), Err(ParseError::Invalid("media.timestamp")));
        let text = r#"{"event":"start","start":{"streamSid":"M","callSid":"C","accountSid":"A","mediaFormat":{"channels":65536}}}"#;
        assert_eq!(parse_str(text), Err(ParseError::Invalid("start.mediaFormat.channels")));
        let text = r#"{"event":"start","start":{"streamSid":"M","callSid":"C","accountSid":"A","mediaFormat":{"sampleRate":4294967296}}}"#;
        assert_eq!(parse_str(text), Err(ParseError::Invalid("start.mediaFormat.sampleRate")));
        assert!(matches!(parse_str(r#"{"event":"stop","sequenceNumber":[1]}"#), Err(ParseError::Json(_))));
    }

    /// A payload without escapes is a slice of the frame's own allocation, not a copy.
    #[test]
    fn payload_is_zero_copy() {
        let payload = STANDARD.encode([0x7Fu8; 160]);
        let frame = Bytes::from(format!(r#"{{"event":"media","media":{{"track":"inbound","payload":"{payload}"}}}}"#));
        let Ok(Message::Media(m)) = parse(&frame) else { panic!("media parses") };
        assert_eq!(m.payload, payload.as_bytes());
        assert_eq!(m.samples, 160);
        let frame_range = frame.as_ptr_range();
        let payload_range = m.payload.as_ptr_range();
        assert!(frame_range.start <= payload_range.start && payload_range.end <= frame_range.end);
        let offset = frame.windows(payload.len()).position(|w| w == payload.as_bytes()).expect("payload in frame");
        assert_eq!(payload_range.start, frame[offset..].as_ptr());
    }

    /// A payload with JSON escapes (`\/`, `\u0041`) is unescaped into its own buffer.
    #[test]
    fn escaped_payload_is_copied_and_unescaped() {
        let frame = Bytes::from_static(br#"{"event":"media","media":{"payload":"\/\/\/\/\u0041AA\/"}}"#);
        let Ok(Message::Media(m)) = parse(&frame) else { panic!("media parses") };
        assert_eq!((&m.payload[..], m.samples), (&b"////AAA/"[..], 6));
        let frame_range = frame.as_ptr_range();
        assert!(!frame_range.contains(&m.payload.as_ptr()));
        let frame = Bytes::from_static(br#"{"event":"media","media":{"payload":"\/\/8="}}"#);
        let Ok(Message::Media(m)) = parse(&frame) else { panic!("media parses") };
        assert_eq!((&m.payload[..], m.samples), (&b"//8="[..], 2));
        let frame = Bytes::from_static(br#"{"event":"media","media":{"payload":"AA\nA"}}"#);
        assert_eq!(parse(&frame), Err(ParseError::Payload));
    }

    /// Unknown, missing and malformed messages get the matching error.
    #[test]
    fn errors() {
        for text in ["", "nope", "[]", "\"media\"", "{", r#"{"event":5}"#, r#"{"event":"media","media":"x"}"#] {
            assert!(matches!(parse_str(text), Err(ParseError::Json(_))), "{text}");
        }
        assert!(matches!(parse(&Bytes::from_static(b"{\"event\":\"\xff\"}")), Err(ParseError::Json(_))));
        // serde would read an array as the message struct, fields by position.
        assert!(matches!(parse_str(r#"["connected"]"#), Err(ParseError::Json(_))));
        assert!(matches!(parse_str(r#"["clear", 1]"#), Err(ParseError::Json(_))));
        assert_eq!(parse_str("{}"), Err(ParseError::Missing("event")));
        assert_eq!(parse_str(r#"{"event":"Media"}"#), Err(ParseError::UnknownEvent("Media".into())));
        let long = "é".repeat(100);
        let Err(ParseError::UnknownEvent(name)) = parse_str(&json!({ "event": long }).to_string()) else {
            panic!("unknown event")
        };
        assert_eq!(name, "é".repeat(64));
        let missing = [
            (r#"{"event":"media"}"#, "media"),
            (r#"{"event":"media","media":{"track":"inbound"}}"#, "media.payload"),
            (r#"{"event":"mark"}"#, "mark.name"),
            (r#"{"event":"mark","mark":{}}"#, "mark.name"),
            (r#"{"event":"dtmf"}"#, "dtmf"),
            (r#"{"event":"dtmf","dtmf":{"track":"inbound_track"}}"#, "dtmf.digit"),
            (r#"{"event":"start"}"#, "start"),
            (r#"{"event":"start","start":{"accountSid":"A","callSid":"C"}}"#, "start.streamSid"),
            (r#"{"event":"start","start":{"streamSid":"M","callSid":"C"}}"#, "start.accountSid"),
        ];
        for (text, field) in missing {
            assert_eq!(parse_str(text), Err(ParseError::Missing(field)), "{text}");
        }
        for payload in ["A", "AAAAA", "AA=A", "A===", "AB==", "AAB=", "AA=", "AAAA====", "AA A", "AA-_"] {
            let text = json!({"event":"media","media":{"payload":payload}}).to_string();
            assert_eq!(parse_str(&text), Err(ParseError::Payload), "{payload}");
        }
    }

    /// DTMF digits are exactly Twilio's set.
    #[test]
    fn dtmf_digits() {
        for digit in "0123456789*#ABCDw".chars() {
            let text = json!({"event":"dtmf","dtmf":{"digit":digit.to_string()}}).to_string();
            assert_eq!(parse_str(&text), Ok(Message::Dtmf(Dtmf { sequence: None, track: None, digit })));
        }
        for digit in ["", "11", "E", "a", "W", " ", "é", "1 "] {
            let text = json!({"event":"dtmf","dtmf":{"digit":digit}}).to_string();
            assert_eq!(parse_str(&text), Err(ParseError::Invalid("dtmf.digit")), "{digit:?}");
        }
    }

    /// Every client-controlled size is bounded: parameters, names, SIDs, tracks, encoding.
    #[test]
    fn bounds() {
        let start_with = |extra: Value| {
            let mut start = json!({"streamSid":"MZ","accountSid":"AC","callSid":"CA"});
            if let (Some(s), Some(e)) = (start.as_object_mut(), extra.as_object()) {
                s.extend(e.clone());
            }
            parse_str(&json!({"event":"start","start":start}).to_string())
        };
        let params = |n: usize| (0..n).map(|i| (format!("k{i}"), json!("v"))).collect::<serde_json::Map<_, _>>();
        let s = start_with(json!({"customParameters": params(MAX_CUSTOM_PARAMETERS)}));
        assert!(matches!(s, Ok(Message::Start(s)) if s.custom_parameters.len() == MAX_CUSTOM_PARAMETERS));
        let s = start_with(json!({"customParameters": params(MAX_CUSTOM_PARAMETERS + 1)}));
        assert_eq!(s, Err(ParseError::TooLarge("start.customParameters")));
        let key = "k".repeat(MAX_PARAMETER_KEY_BYTES);
        assert!(start_with(json!({"customParameters": {key: "v"}})).is_ok());
        let key = "k".repeat(MAX_PARAMETER_KEY_BYTES + 1);
        let s = start_with(json!({"customParameters": {key: "v"}}));
        assert_eq!(s, Err(ParseError::TooLarge("start.customParameters key")));
        let value = "v".repeat(MAX_PARAMETER_VALUE_BYTES);
        assert!(start_with(json!({"customParameters": {"k": value}})).is_ok());
        let value = "v".repeat(MAX_PARAMETER_VALUE_BYTES + 1);
        let s = start_with(json!({"customParameters": {"k": value, "later": [1, 2]}}));
        assert_eq!(s, Err(ParseError::TooLarge("start.customParameters value")));
        let s = start_with(json!({"customParameters": {"k": vec![0; MAX_PARAMETER_VALUE_BYTES]}}));
        assert_eq!(s, Err(ParseError::TooLarge("start.customParameters value")));
        let s = start_with(json!({"tracks": vec!["inbound"; MAX_TRACKS + 1]}));
        assert_eq!(s, Err(ParseError::TooLarge("start.tracks")));
        let s = start_with(json!({"tracks": ["t".repeat(MAX_FIELD_BYTES + 1)]}));
        assert_eq!(s, Err(ParseError::TooLarge("start.tracks")));
        let s = start_with(json!({"mediaFormat": {"encoding": "e".repeat(MAX_FIELD_BYTES + 1)}}));
        assert_eq!(s, Err(ParseError::TooLarge("start.mediaFormat.encoding")));
        let s = start_with(json!({"callSid": "C".repeat(MAX_SID_BYTES + 1)}));
        assert_eq!(s, Err(ParseError::TooLarge("start.callSid")));
        let name = "n".repeat(MAX_MARK_NAME_BYTES);
        assert!(parse_str(&json!({"event":"mark","mark":{"name":name}}).to_string()).is_ok());
        let name = "n".repeat(MAX_MARK_NAME_BYTES + 1);
        let m = parse_str(&json!({"event":"mark","mark":{"name":name}}).to_string());
        assert_eq!(m, Err(ParseError::TooLarge("mark.name")));
        let stop = json!({"event":"stop","stop":{"callSid":"C".repeat(MAX_SID_BYTES + 1)}}).to_string();
        assert_eq!(parse_str(&stop), Err(ParseError::TooLarge("stop.callSid")));
    }

    /// The writers produce Twilio's documented shapes byte for byte (key order included).
    #[test]
    fn writer_shapes() {
        assert_eq!(connected_msg().as_str(), r#"{"event":"connected","protocol":"Call","version":"1.0.0"}"#);
        let start = StartParams {
            stream_sid: "MZ1",
            account_sid: "AC1",
            call_sid: "CA1",
            tracks: &["inbound".into(), "outbound".into()],
            custom_parameters: &[("k".into(), "v".into())],
            media_format: &MediaFormat::default(),
        };
        assert_eq!(
            start_msg(1, &start).as_str(),
            r#"{"event":"start","sequenceNumber":"1","start":{"accountSid":"AC1","streamSid":"MZ1","callSid":"CA1","tracks":["inbound","outbound"],"customParameters":{"k":"v"},"mediaFormat":{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1}},"streamSid":"MZ1"}"#
        );
        assert_eq!(
            media_msg(3, "MZ1", Track::Inbound, 1, 5, b"//8=").as_str(),
            r#"{"event":"media","sequenceNumber":"3","media":{"track":"inbound","chunk":"1","timestamp":"5","payload":"//8="},"streamSid":"MZ1"}"#
        );
        assert_eq!(
            dtmf_msg(5, "MZ1", '1').as_str(),
            r#"{"event":"dtmf","streamSid":"MZ1","sequenceNumber":"5","dtmf":{"track":"inbound_track","digit":"1"}}"#
        );
        assert_eq!(
            mark_echo_msg(4, "MZ1", "my label").as_str(),
            r#"{"event":"mark","sequenceNumber":"4","streamSid":"MZ1","mark":{"name":"my label"}}"#
        );
        assert_eq!(
            stop_msg(5, "MZ1", "AC1", "CA1").as_str(),
            r#"{"event":"stop","sequenceNumber":"5","streamSid":"MZ1","stop":{"accountSid":"AC1","callSid":"CA1"}}"#
        );
        assert_eq!(
            media_out("MZ1", b"AAAA").as_str(),
            r#"{"event":"media","streamSid":"MZ1","media":{"payload":"AAAA"}}"#
        );
        assert_eq!(mark_out("MZ1", "n").as_str(), r#"{"event":"mark","streamSid":"MZ1","mark":{"name":"n"}}"#);
        assert_eq!(clear_out("MZ1").as_str(), r#"{"event":"clear","streamSid":"MZ1"}"#);
        assert_eq!(
            json_of(&media_msg(u64::MAX, "", Track::Outbound, 0, 0, b""))["sequenceNumber"],
            json!("18446744073709551615")
        );
    }

    /// Every writer's output parses back to the values written, with strings that need escaping.
    #[test]
    fn writers_round_trip() {
        let sid = "MZ\"quoted\\\n\u{1}é";
        let start = sample_start();
        assert_eq!(parse(&start_msg(1, &start.params()).into()), Ok(Message::Start(start.clone())));
        let odd = Start {
            stream_sid: sid.into(),
            custom_parameters: vec![("a\"b".into(), "line\nbreak\t🎧".into()), ("".into(), "".into())],
            tracks: vec![],
            media_format: MediaFormat { encoding: "audio/l16".into(), sample_rate: 16000, channels: 2 },
            ..start
        };
        assert_eq!(parse(&start_msg(1, &odd.params()).into()), Ok(Message::Start(odd)));
        let payload = STANDARD.encode([1u8, 2, 3, 4, 5]);
        let expected = Media {
            sequence: Some(9),
            track: Some(Track::Outbound),
            chunk: Some(2),
            timestamp_ms: Some(40),
            payload: Bytes::from(payload.clone()),
            samples: 5,
        };
        let sent = media_msg(9, sid, Track::Outbound, 2, 40, payload.as_bytes());
        assert_eq!(parse(&sent.into()), Ok(Message::Media(expected)));
        let sent = media_out(sid, payload.as_bytes());
        let Ok(Message::Media(m)) = parse(&sent.into()) else { panic!("media parses") };
        assert_eq!((m.sequence, m.track, &m.payload[..], m.samples), (None, None, payload.as_bytes(), 5));
        assert_eq!(
            parse(&dtmf_msg(5, sid, '#').into()),
            Ok(Message::Dtmf(Dtmf { sequence: Some(5), track: Some(Track::Inbound), digit: '#' }))
        );
        let name = "end of \"turn\" 3";
        assert_eq!(
            parse(&mark_echo_msg(4, sid, name).into()),
            Ok(Message::Mark(Mark { sequence: Some(4), name: name.into() }))
        );
        assert_eq!(parse(&mark_out(sid, name).into()), Ok(Message::Mark(Mark { sequence: None, name: name.into() })));
        assert_eq!(parse(&clear_out(sid).into()), Ok(Message::Clear));
        assert_eq!(parse(&connected_msg().into()), Ok(Message::Connected));
        assert_eq!(
            parse(&stop_msg(6, sid, "AC", "CA").into()),
            Ok(Message::Stop(Stop { sequence: Some(6), account_sid: Some("AC".into()), call_sid: Some("CA".into()) }))
        );
        assert_eq!(json_of(&stop_msg(6, sid, "AC", "CA"))["streamSid"], json!(sid));
    }

    /// A payload that is not base64 still gives a JSON frame, which the parser then refuses.
    #[test]
    fn writer_with_bad_payload_stays_json() {
        let sent = media_out("MZ", b"\"}\xff");
        assert_eq!(json_of(&sent)["media"]["payload"], json!("\"}\u{fffd}"));
        assert_eq!(parse(&sent.into()), Err(ParseError::Payload));
    }

    /// Decoded lengths for padded, unpadded and malformed base64.
    #[test]
    fn base64_lengths() {
        let cases: [(&[u8], Option<usize>); 16] = [
            (b"", Some(0)),
            (b"/w==", Some(1)),
            (b"/w", Some(1)),
            (b"//8=", Some(2)),
            (b"//8", Some(2)),
            (b"////", Some(3)),
            (b"////AA==", Some(4)),
            (b"=", None),
            (b"==", None),
            (b"/x==", None),
            (b"//9=", None),
            (b"/w=", None),
            (b"A", None),
            (b"AAAA=", None),
            (b"AA==AA==", None),
            (b"AA\r\nAA", None),
        ];
        for (payload, expected) in cases {
            assert_eq!(base64_samples(payload), expected, "{:?}", String::from_utf8_lossy(payload));
        }
    }

    /// Silence payloads are base64 of 0xFF bytes; the 20 ms one is a shared static.
    #[test]
    fn silence() {
        for samples in 0..400 {
            let payload = silence_payload(samples);
            assert_eq!(payload, STANDARD.encode(vec![crate::media::g711::SILENCE; samples]).as_bytes(), "{samples}");
            assert_eq!(base64_samples(&payload), Some(samples));
        }
        assert_eq!(silence_payload(FRAME_20MS_SAMPLES).as_ptr(), silence_payload(FRAME_20MS_SAMPLES).as_ptr());
    }

    proptest! {
        /// `parse` never panics on arbitrary bytes.
        #[test]
        fn parse_never_panics_on_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse(&Bytes::from(bytes));
        }

        /// `parse` never panics on near-miss messages: real event names, fields and odd values.
        #[test]
        fn parse_never_panics_on_near_misses(
            event in prop::sample::select(vec!["connected", "start", "media", "dtmf", "mark", "stop", "clear", "x"]),
            field in prop::sample::select(vec!["start", "media", "dtmf", "mark", "stop", "sequenceNumber", "streamSid"]),
            value in r#"(\{("[a-zA-Z]{0,12}":("[^"\\]{0,16}"|-?[0-9]{1,22}(\.[0-9])?|true|null|\[\]|\{\}),?){0,4}\}|"[ -~]{0,8}"|[0-9]{1,3})"#,
        ) {
            let text = format!(r#"{{"event":"{event}","{field}":{value}}}"#);
            let _ = parse(&Bytes::from(text));
        }

        /// `base64_samples` is the decoded length of any bytes encoded with or without padding.
        #[test]
        fn base64_samples_is_decoded_length(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            prop_assert_eq!(base64_samples(STANDARD.encode(&bytes).as_bytes()), Some(bytes.len()));
            prop_assert_eq!(base64_samples(STANDARD_NO_PAD.encode(&bytes).as_bytes()), Some(bytes.len()));
        }

        /// `base64_samples` accepts exactly what the padded or unpadded standard engines decode.
        #[test]
        fn base64_samples_agrees_with_decoders(text in "[A-Za-z0-9+/=]{0,12}") {
            let decoded = STANDARD.decode(&text).or_else(|_| STANDARD_NO_PAD.decode(&text)).ok().map(|d| d.len());
            prop_assert_eq!(base64_samples(text.as_bytes()), decoded);
        }

        /// Media and mark round-trip for any ids, counters and names.
        #[test]
        fn media_and_mark_round_trip(
            sid in any::<String>(),
            name in ".{0,64}",
            sequence in any::<u64>(),
            chunk in any::<u64>(),
            timestamp_ms in any::<u64>(),
            bytes in proptest::collection::vec(any::<u8>(), 0..400),
        ) {
            let payload = STANDARD.encode(&bytes);
            let sent = media_msg(sequence, &sid, Track::Inbound, chunk, timestamp_ms, payload.as_bytes());
            let expected = Media {
                sequence: Some(sequence),
                track: Some(Track::Inbound),
                chunk: Some(chunk),
                timestamp_ms: Some(timestamp_ms),
                payload: Bytes::from(payload),
                samples: bytes.len(),
            };
            prop_assert_eq!(parse(&sent.into()), Ok(Message::Media(expected)));
            let sent = mark_echo_msg(sequence, &sid, &name);
            prop_assert_eq!(parse(&sent.into()), Ok(Message::Mark(Mark { sequence: Some(sequence), name })));
        }

        /// `start` round-trips for any SIDs and parameters within the bounds.
        #[test]
        fn start_round_trips(
            sids in proptest::array::uniform3(".{0,32}"),
            params in proptest::collection::vec((".{0,32}", ".{0,64}"), 0..MAX_CUSTOM_PARAMETERS),
            sequence in any::<u64>(),
        ) {
            let [stream_sid, account_sid, call_sid] = sids;
            let start = Start {
                sequence: Some(sequence),
                stream_sid,
                account_sid,
                call_sid,
                tracks: vec!["inbound".into()],
                custom_parameters: params,
                media_format: MediaFormat::default(),
            };
            prop_assert_eq!(parse(&start_msg(sequence, &start.params()).into()), Ok(Message::Start(start)));
        }
    }
}
