//! An OpenAI-Realtime-compatible agent behind Relay (`--openai-url`, `--openai-api-key`), against
//! a local stand-in speaking the Realtime protocol: the session is configured (GA shape, see
//! realtime_ga.rs for the shapes in full) for μ-law both ways,
//! caller audio reaches it as `input_audio_buffer.append`, its `response.audio.delta` plays to the
//! caller, a barge-in (`speech_started`) clears the caller and truncates the item to what was heard,
//! and transcripts reach frontends, `/ws` and the call record.

use relay_tests::telephony::{b64, frames, unb64, Events, Frontend, TwilioBot, TwilioCaller};
use relay_tests::{poll_until, Relay};
use serde_json::{json, Value};

fn start(server: &TwilioBot) -> Relay {
    Relay::start(&["--openai-url", &server.url("/v1/realtime?model=gpt-test"), "--openai-api-key", "sk-test-key"])
}

/// The Realtime messages of one type the stand-in received.
fn of_type(conn: &relay_tests::telephony::BotConn, kind: &str) -> Vec<Value> {
    conn.received().iter().filter_map(|a| a.json().cloned()).filter(|v| v["type"] == kind).collect()
}

/// Caller audio in, agent audio out, credentials and session setup as the Realtime API expects.
#[test]
fn realtime_agent_hears_and_answers() {
    let server = TwilioBot::start();
    let relay = start(&server);
    let call = "CArealtime1";
    let caller = TwilioCaller::start(&relay, call, &[]);
    let conn = server.ready(0);
    assert_eq!(conn.path, "/v1/realtime?model=gpt-test");
    assert_eq!(conn.header("authorization"), Some("Bearer sk-test-key"));
    assert_eq!(conn.header("openai-beta"), None, "the GA interface by default");
    let update = poll_until("session.update", || of_type(&conn, "session.update").into_iter().next());
    assert_eq!(update["session"]["audio"]["input"]["format"]["type"], "audio/pcmu", "{update}");
    assert_eq!(update["session"]["audio"]["output"]["format"]["type"], "audio/pcmu", "{update}");
    conn.send_json(&json!({"type": "session.created", "session": {"id": "sess_1"}}));

    let sent = frames(7, 0..10);
    caller.send_audio(&sent);
    let appended = poll_until("10 appends", || {
        let got: Vec<Vec<u8>> = of_type(&conn, "input_audio_buffer.append")
            .iter()
            .map(|v| unb64(v["audio"].as_str().unwrap_or("")))
            .collect();
        (got.len() >= 10).then_some(got)
    });
    assert_eq!(appended, sent, "the caller's audio reaches the model unchanged (μ-law, no transcoding)");

    let reply = frames(9, 0..5);
    for f in &reply {
        conn.send_json(&json!({"type": "response.audio.delta", "item_id": "item_a", "delta": b64(f)}));
    }
    let heard = caller.wait_media(5);
    let heard: Vec<Vec<u8>> = heard.into_iter().map(|(_, f)| f).collect();
    assert_eq!(heard, reply, "the model's audio plays to the caller");
    assert!(of_type(&conn, "conversation.item.truncate").is_empty(), "no barge-in, no truncation");
}

/// The caller talking over the agent: `clear` toward the caller, the item truncated to what the
/// caller's echoed marks say it heard, and nothing more of that item played after the clear (not
/// even deltas the model had already sent), while the next item plays.
#[test]
fn barge_in_clears_and_truncates() {
    let server = TwilioBot::start();
    let relay = start(&server);
    let call = "CArealtime2";
    let caller = TwilioCaller::start(&relay, call, &[]);
    let conn = server.ready(0);
    // Three seconds of agent speech at once, as the API sends it (faster than real time), in
    // deltas of 200 ms: a mark follows each.
    let speech = frames(3, 0..150);
    for chunk in speech.chunks(10) {
        let delta: Vec<u8> = chunk.concat();
        conn.send_json(&json!({"type": "response.audio.delta", "item_id": "item_long", "delta": b64(&delta)}));
    }
    let marks: Vec<String> = caller.peer().wait_until("two marks at the caller", |r| {
        let names: Vec<String> = r
            .iter()
            .filter(|a| a.event() == Some("mark"))
            .filter_map(|a| a.json().and_then(|v| v["mark"]["name"].as_str().map(str::to_owned)))
            .collect();
        (names.len() >= 2).then_some(names)
    });
    // The caller's playback reached the second mark (400 ms), then the caller talks.
    caller.echo_mark(&marks[0]);
    caller.echo_mark(&marks[1]);
    caller.send_audio(&frames(4, 0..1));
    poll_until("the caller's audio at the model", || {
        (!of_type(&conn, "input_audio_buffer.append").is_empty()).then_some(())
    });
    conn.send_json(
        &json!({"type": "input_audio_buffer.speech_started", "audio_start_ms": 400, "item_id": "item_user"}),
    );
    caller.wait_until("clear at the caller", |r| r.iter().any(|a| a.event() == Some("clear")).then_some(()));
    let truncate = poll_until("truncate", || of_type(&conn, "conversation.item.truncate").into_iter().next());
    assert_eq!(truncate["item_id"], "item_long", "{truncate}");
    assert_eq!(truncate["content_index"], 0);
    assert_eq!(truncate["audio_end_ms"], 400, "what the caller's echoes say it heard: {truncate}");
    // A delta of the interrupted item still in flight, then the model's next item.
    conn.send_json(
        &json!({"type": "response.audio.delta", "item_id": "item_long", "delta": b64(&frames(3, 150..160).concat())}),
    );
    conn.send_json(
        &json!({"type": "response.audio.delta", "item_id": "item_next", "delta": b64(&frames(5, 0..5).concat())}),
    );
    let after: Vec<Vec<u8>> = caller.peer().wait_until("the next item at the caller", |r| {
        let after: Vec<Vec<u8>> = r
            .iter()
            .skip_while(|a| a.event() != Some("clear"))
            .filter(|a| a.event() == Some("media"))
            .filter_map(|a| a.json().and_then(|v| v["media"]["payload"].as_str().map(unb64)))
            .collect();
        after.concat().len().ge(&(5 * 160)).then_some(after)
    });
    assert_eq!(after.concat(), frames(5, 0..5).concat(), "only the next item plays after the clear");
    assert!(caller.events_named("media").len() < 100, "most of the 3 s were never played");
}

/// Transcripts from the model feed frontends (`transcription`), `/ws` (`update`) and the call record.
#[test]
fn transcripts_reach_listeners() {
    let server = TwilioBot::start();
    let relay = start(&server);
    let call = "CArealtime3";
    assert_eq!(relay.start_call(call, "tok").status, 200);
    let events = Events::open(&relay, call, Some("tok"));
    let frontend = Frontend::connect(&relay, call, "u1", "&accessToken=tok");
    let caller = TwilioCaller::start(&relay, call, &[]);
    let conn = server.ready(0);
    assert!(!caller.ended());
    conn.send_json(&json!({"type": "conversation.item.input_audio_transcription.completed", "item_id": "i1", "content_index": 0, "transcript": "my pipe burst"}));
    conn.send_json(
        &json!({"type": "response.audio_transcript.done", "item_id": "i2", "transcript": "I can send a plumber"}),
    );
    let texts = poll_until("two transcriptions at the frontend", || {
        let t: Vec<String> = frontend
            .peer()
            .received()
            .iter()
            .filter_map(|a| a.json().cloned())
            .filter(|v| v["event"] == "transcription")
            .map(|v| v["text"].as_str().unwrap_or_default().to_owned())
            .collect();
        (t.len() >= 2).then_some(t)
    });
    assert_eq!(texts, vec!["my pipe burst".to_owned(), "I can send a plumber".to_owned()]);
    let said = events.wait_event_where("update", |d| d["transcript"][0]["content"] == "I can send a plumber");
    assert_eq!(said["transcript"][0]["role"], "agent", "{said}");
    let heard = events.wait_event_where("update", |d| d["transcript"][0]["content"] == "my pipe burst");
    assert_eq!(heard["transcript"][0]["role"], "user", "{heard}");
    // And the call's record (written to the database within a second) holds them.
    let preview = poll_until("the transcript in the call record", || {
        let v = relay.get("/analytics/project/default/recent").json();
        let call = v["calls"].as_array()?.iter().find(|c| c["callSid"] == call)?.clone();
        let text = call["transcriptPreview"].as_str()?.to_owned();
        text.contains("plumber").then_some(text)
    });
    assert!(preview.contains("my pipe burst"), "{preview}");
}
