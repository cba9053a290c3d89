//! Twilio Media Streams frames (caller streams and agent bots both send them): `parse` never
//! panics; a parsed `media` payload is base64 of exactly `samples` bytes; `base64_samples` agrees
//! with a real base64 decoder; `media`, `mark` and `start` messages built by the writers parse back
//! to what was written (or, past a bound, to `TooLarge`); every parsed `start` is one
//! `names_start` recognises.
#![no_main]

use arbitrary::Unstructured;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use base64::Engine as _;
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use relay_engine::proto::twilio::{self, Message, ParseError, Track};

fuzz_target!(|data: &[u8]| {
    // The input as a frame.
    let frame = Bytes::copy_from_slice(data);
    let parsed = twilio::parse(&frame);
    if let Ok(Message::Media(m)) = &parsed {
        assert_eq!(
            twilio::base64_samples(&m.payload),
            Some(m.samples),
            "a parsed payload is base64 of `samples` bytes"
        );
    }
    if let Ok(Message::Start(_)) = &parsed {
        assert!(twilio::names_start(data), "a parsed start names itself a start");
    }

    // The input as a payload: counted without decoding, exactly as the base64 crate decodes.
    let decoded = STANDARD.decode(data).or_else(|_| STANDARD_NO_PAD.decode(data)).ok();
    assert_eq!(
        twilio::base64_samples(data),
        decoded.as_ref().map(Vec::len),
        "payload {:?}",
        String::from_utf8_lossy(data)
    );

    // The input as the fields of messages the writers build.
    let mut u = Unstructured::new(data);
    let sid: String = u.arbitrary().unwrap_or_default();
    let (sequence, chunk, timestamp): (u64, u64, u64) = u.arbitrary().unwrap_or_default();
    let track = if u.arbitrary().unwrap_or(false) { Track::Outbound } else { Track::Inbound };
    let name: String = u.arbitrary().unwrap_or_default();
    let start = arbitrary_start(&mut u, &sid);
    let audio = u.take_rest();
    let payload = STANDARD.encode(audio);

    let msg = twilio::media_msg(sequence, &sid, track, chunk, timestamp, payload.as_bytes());
    match parse(msg.as_bytes()) {
        Ok(Message::Media(m)) => {
            assert_eq!(m.payload, payload.as_bytes());
            assert_eq!(m.samples, audio.len());
            assert_eq!(
                (m.sequence, m.chunk, m.timestamp_ms, m.track),
                (Some(sequence), Some(chunk), Some(timestamp), Some(track))
            );
        }
        other => panic!("media_msg did not parse back: {other:?}"),
    }
    match parse(twilio::media_out(&sid, payload.as_bytes()).as_bytes()) {
        Ok(Message::Media(m)) => {
            assert_eq!((m.payload.as_ref(), m.samples, m.sequence), (payload.as_bytes(), audio.len(), None))
        }
        other => panic!("media_out did not parse back: {other:?}"),
    }

    for msg in [twilio::mark_out(&sid, &name), twilio::mark_echo_msg(sequence, &sid, &name)] {
        match parse(msg.as_bytes()) {
            Ok(Message::Mark(m)) => assert_eq!(m.name, name),
            Err(ParseError::TooLarge("mark.name")) => assert!(name.len() > twilio::MAX_MARK_NAME_BYTES),
            other => panic!("a mark did not parse back: {other:?}"),
        }
    }

    if let Some(start) = start {
        match parse(twilio::start_msg(sequence, &start.params()).as_bytes()) {
            Ok(Message::Start(parsed)) => assert_eq!(parsed, twilio::Start { sequence: Some(sequence), ..start }),
            Err(ParseError::TooLarge(_)) => {}
            other => panic!("start_msg did not parse back: {other:?}"),
        }
    }
});

fn parse(text: &[u8]) -> Result<Message, ParseError> {
    twilio::parse(&Bytes::copy_from_slice(text))
}

/// A `start` from fuzzer-chosen fields (any strings; bounds are the parser's business).
fn arbitrary_start(u: &mut Unstructured<'_>, stream_sid: &str) -> Option<twilio::Start> {
    let tracks: Vec<String> = u.arbitrary().ok()?;
    let custom_parameters: Vec<(String, String)> = u.arbitrary().ok()?;
    Some(twilio::Start {
        sequence: None,
        stream_sid: stream_sid.to_owned(),
        account_sid: u.arbitrary().ok()?,
        call_sid: u.arbitrary().ok()?,
        tracks: tracks.into_iter().take(10).collect(),
        custom_parameters: custom_parameters.into_iter().take(70).collect(),
        media_format: twilio::MediaFormat {
            encoding: u.arbitrary().ok()?,
            sample_rate: u.arbitrary().ok()?,
            channels: u.arbitrary().ok()?,
        },
    })
}
