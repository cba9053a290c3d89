//! What the caller really heard of a Realtime agent: Relay sends the Twilio caller a `mark` after
//! each piece of the model's audio, and a barge-in truncates the item (`audio_end_ms` of
//! `conversation.item.truncate`) at the last mark the caller echoed; a caller that never echoes
//! gets the playout model's estimate; the echoes Twilio sends for pending marks when it gets a
//! `clear` are its flush, not playback. The caller here echoes only the marks the test chooses.

use relay_tests::telephony::{b64, frames, unb64, Arrival, BotConn, TwilioBot, TwilioCaller};
use relay_tests::{poll_until, Relay};
use serde_json::{json, Value};

/// One delta: 200 ms of μ-law at 8 kHz.
const DELTA_BYTES: usize = 1600;

fn start(server: &TwilioBot) -> Relay {
    Relay::start(&["--openai-url", &server.url("/v1/realtime?model=gpt-test"), "--openai-api-key", "sk-test-key"])
}

/// The Realtime messages of one type the stand-in received.
fn of_type(conn: &BotConn, kind: &str) -> Vec<Value> {
    conn.received().iter().filter_map(|a| a.json().cloned()).filter(|v| v["type"] == kind).collect()
}

/// `n` deltas of 200 ms each for `item`, from the model at once (faster than real time, as the
/// API sends them); returns the audio.
fn speak(conn: &BotConn, item: &str, tag: u8, n: u32) -> Vec<u8> {
    let mut all = Vec::new();
    for k in 0..n {
        let delta: Vec<u8> = frames(tag, k * 10..(k + 1) * 10).concat();
        assert_eq!(delta.len(), DELTA_BYTES);
        conn.send_json(&json!({"type": "response.output_audio.delta", "response_id": "resp_1", "item_id": item,
                               "output_index": 0, "content_index": 0, "delta": b64(&delta)}));
        all.extend(delta);
    }
    all
}

/// The μ-law bytes of every `media` in `received`, and each `mark` with the bytes before it.
fn heard_in(received: &[Arrival], stream_sid: &str) -> (Vec<u8>, Vec<(usize, String)>) {
    let mut bytes = Vec::new();
    let mut marks = Vec::new();
    for v in received.iter().filter_map(Arrival::json) {
        match v["event"].as_str() {
            Some("media") => bytes.extend(unb64(v["media"]["payload"].as_str().unwrap_or(""))),
            Some("mark") => {
                assert_eq!(v["streamSid"], stream_sid, "{v}");
                marks.push((bytes.len(), v["mark"]["name"].as_str().unwrap_or_default().to_owned()));
            }
            _ => {}
        }
    }
    (bytes, marks)
}

/// Waits until the caller received at least `bytes` of audio and `marks` marks after its `skip`
/// first messages.
fn wait_heard(caller: &TwilioCaller, skip: usize, bytes: usize, marks: usize) -> (Vec<u8>, Vec<(usize, String)>) {
    let sid = caller.stream_sid.clone();
    caller.wait_until(&format!("{bytes} bytes and {marks} marks at the caller"), |r| {
        let (b, m) = heard_in(r.get(skip..).unwrap_or_default(), &sid);
        (b.len() >= bytes && m.len() >= marks).then_some((b, m))
    })
}

/// The model's `speech_started`; returns the truncate it caused (the `n`th of the call).
fn barge_in(conn: &BotConn, n: usize) -> Value {
    conn.send_json(&json!({"type": "input_audio_buffer.speech_started", "audio_start_ms": 0, "item_id": "item_user"}));
    poll_until("a truncate", || of_type(conn, "conversation.item.truncate").into_iter().nth(n - 1))
}

/// The index, among the caller's messages, just past its `n`th `clear`.
fn wait_clear(caller: &TwilioCaller, n: usize) -> usize {
    caller.wait_until(&format!("clear number {n} at the caller"), |r| {
        r.iter().enumerate().filter(|(_, a)| a.event() == Some("clear")).nth(n - 1).map(|(i, _)| i + 1)
    })
}

/// The caller gets a mark right after each delta's audio: one per delta, in order, each after
/// exactly the audio of the deltas before it and its own; the audio itself is unchanged.
#[test]
fn caller_gets_a_mark_after_each_delta() {
    let server = TwilioBot::start();
    let relay = start(&server);
    let caller = TwilioCaller::start(&relay, "CAmarks1", &[]);
    let conn = server.ready(0);
    let said = speak(&conn, "item_a", 9, 3);
    let (heard, marks) = wait_heard(&caller, 0, said.len(), 3);
    assert_eq!(heard, said, "the model's audio plays to the caller byte for byte");
    let after: Vec<usize> = marks.iter().map(|(at, _)| *at).collect();
    assert_eq!(after, [DELTA_BYTES, 2 * DELTA_BYTES, 3 * DELTA_BYTES], "{marks:?}");
    let mut names: Vec<&String> = marks.iter().map(|(_, n)| n).collect();
    names.dedup();
    assert_eq!(names.len(), 3, "every mark has its own name: {marks:?}");
    assert!(of_type(&conn, "conversation.item.truncate").is_empty(), "no barge-in, no truncation");
}

/// Barge-in after the caller echoed the marks of the first 600 ms: the truncate says exactly 600,
/// although the relay had released (and its playout model played) well over a second.
#[test]
fn truncate_is_at_the_last_echoed_mark() {
    let server = TwilioBot::start();
    let relay = start(&server);
    let caller = TwilioCaller::start(&relay, "CAmarks2", &[]);
    let conn = server.ready(0);
    speak(&conn, "item_long", 3, 15);
    // 1.2 s released: with at most 200 ms in flight, the model has played at least 1 s.
    let (_, marks) = wait_heard(&caller, 0, 6 * DELTA_BYTES, 6);
    for (_, name) in &marks[..3] {
        caller.echo_mark(name);
    }
    assert!(caller.sync(), "the relay has read the echoes");
    let truncate = barge_in(&conn, 1);
    assert_eq!(truncate["item_id"], "item_long", "{truncate}");
    assert_eq!(truncate["content_index"], 0);
    assert_eq!(truncate["audio_end_ms"], 600, "what the caller's echoes say it heard: {truncate}");
    wait_clear(&caller, 1);
}

/// A caller that never echoes: the truncate is the playout model's estimate, between what the
/// pacer's lead guarantees had played and what had been sent.
#[test]
fn a_caller_that_never_echoes_gets_the_model() {
    let server = TwilioBot::start();
    let relay = start(&server);
    let caller = TwilioCaller::start(&relay, "CAmarks3", &[]);
    let conn = server.ready(0);
    speak(&conn, "item_long", 4, 15);
    wait_heard(&caller, 0, 6 * DELTA_BYTES, 6);
    let truncate = barge_in(&conn, 1);
    let cleared_at = wait_clear(&caller, 1);
    let sent_before_clear = heard_in(&caller.received()[..cleared_at], &caller.stream_sid).0.len();
    let ms = truncate["audio_end_ms"].as_u64().expect("audio_end_ms");
    assert!(ms >= 1000, "at least 1.2 s sent, at most 200 ms of it unplayed: {truncate}");
    assert!(ms * 8 <= sent_before_clear as u64, "no more than was sent: {ms} ms, {sent_before_clear} bytes");
    assert_eq!(ms % 200, 0, "a delta's end: {truncate}");
}

/// Twilio echoes every pending mark when it gets a `clear`: those echoes are not playback, so a
/// caller that echoed nothing while listening still gets the model's estimate for the next item.
#[test]
fn marks_echoed_after_the_clear_do_not_count() {
    let server = TwilioBot::start();
    let relay = start(&server);
    let caller = TwilioCaller::start(&relay, "CAmarks4", &[]);
    let conn = server.ready(0);
    speak(&conn, "item_first", 5, 15);
    wait_heard(&caller, 0, 6 * DELTA_BYTES, 6);
    let first = barge_in(&conn, 1);
    assert_eq!(first["item_id"], "item_first");
    let cleared_at = wait_clear(&caller, 1);
    // As Twilio does on clear: every mark not yet echoed comes back at once.
    for name in caller.marks() {
        caller.echo_mark(&name);
    }
    assert!(caller.sync(), "the relay has read the flushed echoes");

    speak(&conn, "item_second", 6, 15);
    wait_heard(&caller, cleared_at, 6 * DELTA_BYTES, 6);
    let second = barge_in(&conn, 2);
    assert_eq!(second["item_id"], "item_second", "{second}");
    let ms = second["audio_end_ms"].as_u64().expect("audio_end_ms");
    assert!(ms >= 1000, "the model's estimate, not 0 from echoes that never came: {second}");
}
