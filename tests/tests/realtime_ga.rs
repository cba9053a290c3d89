//! A Realtime agent behind Relay against a stand-in written from OpenAI's current (GA) Realtime
//! reference: no `OpenAI-Beta` header, `session.update` with `session.type = "realtime"` and μ-law
//! as `audio/pcmu` both ways, the GA event names (`response.output_audio.delta`, …), the beta
//! interface behind `--openai-api-shape beta`, briefing (an outbound call's `prompt` as the
//! session's instructions and its `first_message` spoken first; inbound calls from the flags), and
//! the model's errors costing only its own leg.

use relay_tests::telephony::{b64, frames, unb64, BotConn, Events, Frontend, TwilioBot, TwilioCaller};
use relay_tests::twilio_rest::TwilioRest;
use relay_tests::{poll_until, Relay};
use serde_json::{json, Value};

const NUMBER: &str = "+14155550123";
const PROMPT: &str = "You are Bella's booking assistant. Confirm the table for two at 8 \"sharp\".";
const FIRST: &str = "Hi! This is Bella's calling about your <reservation>.";

/// The Realtime messages of one type the stand-in received, in order.
fn of_type(conn: &BotConn, kind: &str) -> Vec<Value> {
    conn.received().iter().filter_map(|a| a.json().cloned()).filter(|v| v["type"] == kind).collect()
}

/// The `type`s of every message the stand-in received, in order.
fn types(conn: &BotConn) -> Vec<String> {
    conn.received().iter().filter_map(|a| a.json().and_then(|v| v["type"].as_str()).map(str::to_owned)).collect()
}

/// The first `session.update`, waiting for it.
fn session_update(conn: &BotConn) -> Value {
    poll_until("session.update", || of_type(conn, "session.update").into_iter().next())
}

/// A relay whose Realtime agent is `server`, with `extra` flags.
fn start(server: &TwilioBot, extra: &[&str]) -> Relay {
    let url = server.url("/v1/realtime?model=gpt-realtime");
    let mut args = vec!["--openai-url", url.as_str(), "--openai-api-key", "sk-test-key"];
    args.extend_from_slice(extra);
    Relay::start(&args)
}

/// By default the upgrade has no beta header, the session is configured in the GA shape, and audio
/// goes both ways byte for byte under the GA event names.
#[test]
fn ga_session_shape_and_audio_both_ways() {
    let server = TwilioBot::start();
    let relay = start(&server, &[]);
    let caller = TwilioCaller::start(&relay, "CAga1", &[]);
    let conn = server.ready(0);
    assert_eq!(conn.header("authorization"), Some("Bearer sk-test-key"));
    assert_eq!(conn.header("openai-beta"), None, "the GA interface takes no OpenAI-Beta header");
    let update = session_update(&conn);
    let session = &update["session"];
    assert_eq!(session["type"], "realtime", "{update}");
    assert_eq!(session["audio"]["input"]["format"], json!({"type": "audio/pcmu"}), "{update}");
    assert_eq!(session["audio"]["output"]["format"], json!({"type": "audio/pcmu"}), "{update}");
    assert_eq!(session["audio"]["input"]["turn_detection"]["type"], "server_vad", "{update}");
    assert!(session["audio"]["input"]["transcription"]["model"].is_string(), "{update}");
    assert_eq!(session["output_modalities"], json!(["audio"]), "{update}");
    for beta in ["input_audio_format", "output_audio_format", "modalities", "input_audio_transcription"] {
        assert!(session.get(beta).is_none(), "no beta field {beta}: {update}");
    }
    assert!(session.get("instructions").is_none(), "no briefing configured: {update}");
    assert!(of_type(&conn, "response.create").is_empty(), "no first message configured");
    conn.send_json(
        &json!({"type": "session.created", "event_id": "e0", "session": {"type": "realtime", "id": "sess_1"}}),
    );
    conn.send_json(&json!({"type": "session.updated", "event_id": "e1", "session": {"type": "realtime"}}));

    let sent = frames(21, 0..10);
    caller.send_audio(&sent);
    let appended = poll_until("10 appends", || {
        let got: Vec<Vec<u8>> = of_type(&conn, "input_audio_buffer.append")
            .iter()
            .map(|v| unb64(v["audio"].as_str().unwrap_or("")))
            .collect();
        (got.len() >= 10).then_some(got)
    });
    assert_eq!(appended, sent, "the caller's audio reaches the model unchanged");

    let reply = frames(22, 0..5);
    for (i, f) in reply.iter().enumerate() {
        conn.send_json(&json!({"type": "response.output_audio.delta", "event_id": format!("d{i}"),
            "response_id": "resp_1", "item_id": "item_1", "output_index": 0, "content_index": 0, "delta": b64(f)}));
    }
    let heard: Vec<Vec<u8>> = caller.wait_media(5).into_iter().map(|(_, f)| f).collect();
    assert_eq!(heard, reply, "the model's audio plays to the caller unchanged");
}

/// `--openai-api-shape beta` keeps the retired interface exactly: the beta header and the old
/// session shape, and its event names still play.
#[test]
fn beta_flag_keeps_the_old_interface() {
    let server = TwilioBot::start();
    let relay = start(&server, &["--openai-api-shape", "beta"]);
    let caller = TwilioCaller::start(&relay, "CAbeta1", &[]);
    let conn = server.ready(0);
    assert_eq!(conn.header("openai-beta"), Some("realtime=v1"));
    let update = session_update(&conn);
    assert_eq!(
        update,
        json!({"type": "session.update", "session": {
            "modalities": ["audio", "text"],
            "input_audio_format": "g711_ulaw",
            "output_audio_format": "g711_ulaw",
            "turn_detection": {"type": "server_vad"},
            "input_audio_transcription": {"model": "whisper-1"},
        }})
    );
    let reply = frames(23, 0..3);
    for f in &reply {
        conn.send_json(&json!({"type": "response.audio.delta", "item_id": "item_b", "delta": b64(f)}));
    }
    let heard: Vec<Vec<u8>> = caller.wait_media(3).into_iter().map(|(_, f)| f).collect();
    assert_eq!(heard, reply);
}

/// An outbound call: the session carries `/outbound-call`'s prompt as instructions, its first
/// `response.create` asks for the first message, and the callee first hears the model's answer to
/// it (tone-coded by the stand-in).
#[test]
fn outbound_call_briefs_the_model_and_speaks_first() {
    let twilio = TwilioRest::start();
    let server = TwilioBot::start();
    let url = server.url("/v1/realtime?model=gpt-realtime");
    let mut args = twilio.relay_args();
    args.extend(["--openai-url".to_owned(), url]);
    let relay = Relay::start(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let body = json!({"user_id": "olivia", "number": NUMBER, "prompt": PROMPT, "first_message": FIRST});
    let resp = relay.post("/outbound-call", &body);
    assert_eq!(resp.status, 200, "outbound-call: {}", resp.text());
    let call = twilio.next_call();
    assert_eq!(server.connections(), 0, "nothing is dialled before the callee answers");
    let (twiml, callee) = call.answer();
    assert_eq!(twiml.parameter("prompt"), Some(PROMPT), "a Twilio-protocol bot would still get it");
    let conn = server.ready(0);
    let update = session_update(&conn);
    assert_eq!(update["session"]["instructions"], PROMPT, "{update}");
    let create = poll_until("response.create", || of_type(&conn, "response.create").into_iter().next());
    let instructions = create["response"]["instructions"].as_str().unwrap_or_default();
    assert!(instructions.contains(FIRST), "the greeting asks for the first message word for word: {create}");
    let order = types(&conn);
    assert_eq!(&order[..2], ["session.update", "response.create"], "configured, then asked to speak: {order:?}");

    // The stand-in speaks the greeting as a tone; the callee hears it before anything else.
    let greeting = frames(31, 0..25);
    for chunk in greeting.chunks(5) {
        conn.send_json(&json!({"type": "response.output_audio.delta", "item_id": "item_greeting",
            "delta": b64(&chunk.concat())}));
    }
    conn.send_json(
        &json!({"type": "response.output_audio_transcript.done", "item_id": "item_greeting", "transcript": FIRST}),
    );
    // The relay re-chunks what it plays (30 ms pieces): compare the bytes the callee heard.
    let heard = callee.wait_until("the greeting at the callee", |r| {
        let bytes: Vec<u8> = r
            .iter()
            .filter(|a| a.event() == Some("media"))
            .filter_map(|a| a.json().and_then(|v| v["media"]["payload"].as_str()).map(unb64))
            .flatten()
            .collect();
        (bytes.len() >= 25 * 160).then_some(bytes)
    });
    assert_eq!(heard, greeting.concat(), "the callee's first audio is the first message");
    let transcript = poll_until("the greeting in the call record", || {
        let v = relay.get("/analytics/project/default/recent").json();
        let c = v["calls"].as_array()?.iter().find(|c| c["callSid"] == call.sid.as_str())?.clone();
        let text = c["transcriptPreview"].as_str()?.to_owned();
        text.contains("Bella's").then_some(text)
    });
    assert!(transcript.contains(FIRST), "{transcript}");
}

/// Inbound calls are briefed by the operator: `--agent-instructions-for-number` for the number
/// called, else `--agent-instructions`; `--agent-first-message` is spoken first.
#[test]
fn inbound_calls_are_briefed_from_the_flags() {
    let dir = std::env::temp_dir().join(format!("relay-ga-brief-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("acme.txt");
    std::fs::write(&file, "You answer for Acme Plumbing.\nBook visits.\n").expect("write");
    let per_number = format!("+15550009=@{}", file.display());
    let server = TwilioBot::start();
    let relay = start(
        &server,
        &[
            "--agent-instructions",
            "You are a helpful receptionist.",
            "--agent-instructions-for-number",
            &per_number,
            "--agent-first-message",
            "Thanks for calling, how can I help?",
        ],
    );
    let _acme = TwilioCaller::start(&relay, "CAin1", &[("from", "+14155550100"), ("to", "+15550009")]);
    let acme = server.ready(0);
    assert_eq!(session_update(&acme)["session"]["instructions"], "You answer for Acme Plumbing.\nBook visits.");
    let create = poll_until("response.create", || of_type(&acme, "response.create").into_iter().next());
    assert!(create["response"]["instructions"]
        .as_str()
        .is_some_and(|i| i.contains("Thanks for calling, how can I help?")));

    let _other = TwilioCaller::start(&relay, "CAin2", &[("to", "+15550001")]);
    let other = server.ready(1);
    assert_eq!(session_update(&other)["session"]["instructions"], "You are a helpful receptionist.");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The model's errors: a non-fatal one is shown and counted and the leg goes on; a refusal
/// (`beta_api_shape_disabled`) followed by the server's close ends only the agent leg: the caller
/// stays connected, its audio keeps reaching frontends, `/call-status` stays in progress, `/ws`
/// says the agent left, and `/health/detailed` counts both.
#[test]
fn model_errors_cost_only_the_agent_leg() {
    let server = TwilioBot::start();
    let relay = start(&server, &[]);
    let call = "CAerr1";
    assert_eq!(relay.start_call(call, "tok").status, 200);
    let events = Events::open(&relay, call, Some("tok"));
    let frontend = Frontend::connect(&relay, call, "u1", "&accessToken=tok");
    let caller = TwilioCaller::start(&relay, call, &[]);
    let conn = server.ready(0);
    session_update(&conn);

    conn.send_json(&json!({"type": "error", "event_id": "e1", "error": {"type": "invalid_request_error",
        "code": "invalid_value", "message": "Invalid value for audio_end_ms", "param": "audio_end_ms", "event_id": "c7"}}));
    let shown = events.wait_event_where("error", |d| d["code"] == "invalid_value");
    assert_eq!((shown["type"].as_str(), shown["fatal"].as_bool()), (Some("invalid_request_error"), Some(false)));
    caller.send_audio(&frames(41, 0..3));
    poll_until("the leg still hears the caller", || {
        (of_type(&conn, "input_audio_buffer.append").len() >= 3).then_some(())
    });

    conn.send_json(&json!({"type": "error", "event_id": "e2", "error": {"type": "invalid_request_error",
        "code": "beta_api_shape_disabled", "message": "The Realtime beta API is no longer supported.", "param": null, "event_id": null}}));
    conn.close(1000);
    let refused = events.wait_event_where("error", |d| d["code"] == "beta_api_shape_disabled");
    assert_eq!(refused["fatal"], true, "{refused}");
    assert_eq!(refused["source"], "agent", "{refused}");
    events.wait_event_where("error", |d| d["message"].as_str().is_some_and(|m| m.starts_with("agent disconnected")));
    assert!(conn.wait_closed().is_some(), "the agent leg is closed");

    let later = frames(42, 0..5);
    caller.send_audio(&later);
    let inbound = frontend.wait_audio("inbound", 8);
    assert_eq!(&inbound[3..], later, "the caller's audio still reaches the frontend");
    assert!(!caller.ended(), "the caller stays connected");
    let status = relay.get(&format!("/call-status?callSid={call}&user_id=u1")).json();
    assert_eq!(status["status"], "in-progress", "{status}");
    assert!(events.events().iter().all(|(t, _)| t != "call_ended"), "the call did not end");
    let errors = poll_until("agentErrors in /health/detailed", || {
        let v = relay.detailed();
        let cores = v["services"]["server"]["cores"].as_array()?.clone();
        let n: u64 = cores.iter().filter_map(|c| c["agentErrors"].as_u64()).sum();
        (n >= 2).then_some(n)
    });
    assert_eq!(errors, 2);
    assert_eq!(server.connections(), 1, "the agent is not redialled");
}

/// A Realtime server that refuses the session at the upgrade (401, as for a bad key) costs only
/// the agent leg too: shown on `/ws`, counted in `/health/detailed`, the caller stays connected.
#[test]
fn refused_upgrade_costs_only_the_agent_leg() {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        let Ok((mut stream, _)) = listener.accept() else { return };
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).is_ok_and(|n| n == 1) {
            head.push(byte[0]);
        }
        let body = r#"{"error":{"type":"invalid_request_error","code":"invalid_api_key","message":"Incorrect API key provided."}}"#;
        let answer = format!(
            "HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = stream.write_all(answer.as_bytes());
    });
    let url = format!("ws://{addr}/v1/realtime?model=gpt-realtime");
    let relay = Relay::start(&["--openai-url", &url, "--openai-api-key", "sk-wrong"]);
    let call = "CAerr2";
    assert_eq!(relay.start_call(call, "tok").status, 200);
    let events = Events::open(&relay, call, Some("tok"));
    let frontend = Frontend::connect(&relay, call, "u1", "&accessToken=tok");
    let caller = TwilioCaller::start(&relay, call, &[]);
    let left = events
        .wait_event_where("error", |d| d["message"].as_str().is_some_and(|m| m.starts_with("agent disconnected")));
    assert_eq!(left["source"], "agent", "{left}");
    let audio = frames(43, 0..4);
    caller.send_audio(&audio);
    assert_eq!(frontend.wait_audio("inbound", 4), audio, "the call goes on without its agent");
    assert!(!caller.ended());
    poll_until("agentErrors in /health/detailed", || {
        let v = relay.detailed();
        let n: u64 =
            v["services"]["server"]["cores"].as_array()?.iter().filter_map(|c| c["agentErrors"].as_u64()).sum();
        (n == 1).then_some(())
    });
}
