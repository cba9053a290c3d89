//! `GET /metrics`: Prometheus text exposition of every core's counts: sessions, frames in and out
//! by leg kind, drops and errors by kind, queue depths, and the input and codec time histograms.

use std::time::Duration;

use relay_tests::telephony::{frames, Events, Frontend, TwilioBot, TwilioCaller};
use relay_tests::webrtc::{Peer, Send};
use relay_tests::{assert_error, ids_on_core, owner, poll_until, Relay};
use serde_json::json;
use str0m::media::Direction;

/// Value of the series `name{core="<core>"}` in an exposition.
fn series(text: &str, name: &str, core: usize) -> Option<f64> {
    labelled(text, name, &[("core", &core.to_string())])
}

/// Value of the series `name{k1="v1",k2="v2",…}` (labels in the order the relay gives them).
fn labelled(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    let prefix = format!("{name}{{{}}} ", labels.join(","));
    text.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.trim().parse().ok())
}

/// Value of the unlabelled series `name` in an exposition.
fn unlabelled(text: &str, name: &str) -> Option<f64> {
    let prefix = format!("{name} ");
    text.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.trim().parse().ok())
}

/// `relay_frames_<dir>_total{core,leg}`, asserted present.
fn frames_of(text: &str, dir: &str, core: &str, leg: &str) -> f64 {
    let name = format!("relay_frames_{dir}_total");
    labelled(text, &name, &[("core", core), ("leg", leg)]).unwrap_or_else(|| panic!("no {name} for {leg}:\n{text}"))
}

/// How many calls of codec `op` core `core` timed (the histogram's `_count`), asserted present.
fn codec_calls(text: &str, core: &str, op: &str) -> f64 {
    labelled(text, "relay_codec_seconds_count", &[("core", core), ("op", op)])
        .unwrap_or_else(|| panic!("no relay_codec_seconds for {op}:\n{text}"))
}

/// Every core's sessions, its WebRTC gauges and input times are exported, behind the API key.
#[test]
fn exposition_counts_sessions_per_core() {
    let relay = Relay::start(&["--api-key", "k"]);
    assert_error(&relay.request("GET", "/metrics", &[], None), 401);
    for id in ids_on_core("metrics", 0, 2, 2).into_iter().chain(ids_on_core("metrics", 1, 2, 1)) {
        assert_eq!(relay.start_call(&id, "tok").status, 200);
    }
    let r = relay.get("/metrics");
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").is_some_and(|t| t.starts_with("text/plain")), "{:?}", r.header("content-type"));
    let text = r.text();
    assert!(text.contains("# HELP relay_sessions"), "{text}");
    assert!(text.contains("# TYPE relay_sessions gauge"), "{text}");
    assert_eq!(series(&text, "relay_sessions", 0), Some(2.0), "{text}");
    assert_eq!(series(&text, "relay_sessions", 1), Some(1.0), "{text}");
    assert!(series(&text, "relay_webrtc_peers", 0).is_some(), "{text}");
    assert!(text.contains("relay_uptime_seconds"), "{text}");
    // Every input a core handled is timed: the start-calls above at least.
    let count = |core: usize| series(&text, "relay_core_input_seconds_count", core).unwrap_or(0.0);
    assert!(count(0) >= 2.0 && count(1) >= 1.0, "{text}");
    // Histograms with buckets (summable across cores), not summaries.
    assert!(text.contains("# TYPE relay_core_input_seconds histogram"), "{text}");
    let slowest = labelled(&text, "relay_core_input_seconds_bucket", &[("core", "0"), ("le", "+Inf")]);
    assert_eq!(slowest, Some(count(0)), "the last bucket holds every input:\n{text}");
    // Every new family is described, typed and present for each core from the start.
    for (name, kind) in [
        ("relay_frames_in_total", "counter"),
        ("relay_frames_out_total", "counter"),
        ("relay_dropped_frames_total", "counter"),
        ("relay_errors_total", "counter"),
        ("relay_pacer_queued_frames", "gauge"),
        ("relay_agent_backlog_frames", "gauge"),
        ("relay_playout_buffered_packets", "gauge"),
        ("relay_mesh_pending_requests", "gauge"),
        ("relay_socket_queued_frames", "gauge"),
        ("relay_records_queued", "gauge"),
        ("relay_records_written_total", "counter"),
        ("relay_records_dropped_total", "counter"),
        ("relay_records_failing", "gauge"),
    ] {
        assert!(text.contains(&format!("# HELP {name} ")), "{name} described:\n{text}");
        assert!(text.contains(&format!("# TYPE {name} {kind}")), "{name} is a {kind}:\n{text}");
    }
    for name in ["relay_records_written_total", "relay_records_dropped_total", "relay_records_failing"] {
        assert_eq!(unlabelled(&text, name), Some(0.0), "{name}:\n{text}");
    }
    for core in ["0", "1"] {
        assert_eq!(labelled(&text, "relay_socket_queued_frames", &[("core", core)]), Some(0.0), "{text}");
        for leg in ["caller", "bot", "realtime", "webrtc"] {
            assert_eq!(frames_of(&text, "in", core, leg), 0.0, "no audio yet");
        }
        for leg in ["caller", "bot", "realtime", "webrtc", "frontend", "events"] {
            assert_eq!(frames_of(&text, "out", core, leg), 0.0, "no audio yet");
        }
        for leg in ["caller", "bot", "realtime", "frontend", "events", "retell", "other"] {
            let dropped = labelled(&text, "relay_dropped_frames_total", &[("core", core), ("leg", leg)]);
            assert_eq!(dropped, Some(0.0), "relay_dropped_frames_total for {leg}:\n{text}");
        }
        for kind in ["protocol", "agent", "pacer_full", "opus_decode", "opus_encode", "udp_send"] {
            let errors = labelled(&text, "relay_errors_total", &[("core", core), ("kind", kind)]);
            assert_eq!(errors, Some(0.0), "relay_errors_total for {kind}:\n{text}");
        }
    }
}

/// A Twilio call with a bot and a frontend: every frame is counted by leg kind both ways, agent
/// audio sent at once shows as pacer depth until it has played, a bad message counts as a
/// protocol error, and each μ-law decode is timed.
#[test]
fn a_twilio_call_is_counted_by_leg() {
    let bot = TwilioBot::start();
    let relay = Relay::start(&["--agent-url", &bot.url("/metrics")]);
    let id = "CA-metrics";
    let core = owner(id, relay.cores()).to_string();
    let front = Frontend::connect(&relay, id, "watcher", "");
    let caller = TwilioCaller::start(&relay, id, &[]);
    let agent = bot.ready(0);

    let up = frames(1, 0..50);
    caller.send_audio(&up);
    agent.wait_media(up.len());
    front.wait_audio("inbound", up.len());
    let down = frames(2, 0..150);
    agent.send_audio(&down);
    // 3 s of audio sent at once waits in the pacer; the core's sweep publishes the depth.
    let queued = poll_until("agent audio queued in the pacer", || {
        let text = relay.get("/metrics").text();
        labelled(&text, "relay_pacer_queued_frames", &[("core", &core)]).filter(|n| *n > 0.0)
    });
    assert!(queued <= 150.0, "at most what the bot sent is queued: {queued}");
    caller.wait_media(down.len());
    front.wait_audio("outbound", down.len());
    caller.send_text("not a Twilio message");
    assert!(caller.sync(), "the relay keeps the caller after a bad message");

    let text = relay.get("/metrics").text();
    assert_eq!(frames_of(&text, "in", &core, "caller"), 50.0);
    assert_eq!(frames_of(&text, "out", &core, "bot"), 50.0);
    assert_eq!(frames_of(&text, "in", &core, "bot"), 150.0);
    assert_eq!(frames_of(&text, "out", &core, "caller"), 150.0);
    assert_eq!(frames_of(&text, "out", &core, "frontend"), 200.0, "both tracks to the one frontend");
    assert_eq!(frames_of(&text, "in", &core, "webrtc"), 0.0);
    let errors = labelled(&text, "relay_errors_total", &[("core", &core), ("kind", "protocol")]);
    assert_eq!(errors, Some(1.0), "{text}");
    assert_eq!(series(&text, "relay_protocol_errors_total", owner(id, relay.cores())), Some(1.0), "{text}");
    // Played agent audio is decoded once per frame (for voice activity); nothing else here needs PCM.
    assert_eq!(codec_calls(&text, &core, "ulaw_decode"), 150.0, "{text}");
    assert_eq!(codec_calls(&text, &core, "opus_encode"), 0.0, "{text}");
    let dropped = labelled(&text, "relay_dropped_frames_total", &[("core", &core), ("leg", "caller")]);
    assert_eq!(dropped, Some(0.0), "{text}");
    // /health/detailed shows the same counts for the call's core.
    let detailed = relay.detailed();
    let frames = &detailed["services"]["server"]["cores"][owner(id, relay.cores())]["frames"];
    assert_eq!(frames["in"], json!({"caller": 50, "bot": 150, "realtime": 0, "webrtc": 0}), "{detailed}");
    assert_eq!(frames["out"]["frontend"], 200, "{detailed}");
    assert_eq!((&frames["out"]["caller"], &frames["out"]["bot"]), (&json!(150), &json!(50)), "{detailed}");
    assert_eq!(frames["dropped"]["caller"], 0, "{detailed}");
    assert_eq!(frames["dropped"]["other"], 0, "{detailed}");
    assert!(frames["dropped"].get("webrtc").is_none(), "WebRTC legs have no socket queue: {detailed}");
    // Once played, nothing waits any more.
    poll_until("the pacer to drain", || {
        let text = relay.get("/metrics").text();
        labelled(&text, "relay_pacer_queued_frames", &[("core", &core)]).filter(|n| *n == 0.0)
    });
    // The call's record is committed within a second of its end, and nothing stays queued.
    caller.stop();
    poll_until("the call record written", || {
        let text = relay.get("/metrics").text();
        unlabelled(&text, "relay_records_written_total").filter(|n| *n >= 1.0).map(|_| text)
    });
    let text = relay.get("/metrics").text();
    assert_eq!(unlabelled(&text, "relay_records_dropped_total"), Some(0.0), "{text}");
    poll_until("the records queue to drain", || {
        let text = relay.get("/metrics").text();
        unlabelled(&text, "relay_records_queued").filter(|n| *n == 0.0)
    });
}

/// A Twilio caller and a WHIP agent with raw samples on `/ws`: WebRTC frames are counted both
/// ways and every codec on the path is timed (Opus both ways, μ-law both ways, the resampler to
/// the session's 16 kHz).
#[test]
fn a_webrtc_call_times_its_codecs() {
    let relay = Relay::start(&[]);
    let id = "rtc-metrics";
    let core = owner(id, relay.cores()).to_string();
    let body = json!({ "sessionId": id, "accessToken": "tok", "sampleRate": 16000, "emitRawAudioSamples": true });
    assert_eq!(relay.post("/start-call", &body).status, 200);
    let events = Events::open(&relay, id, Some("tok"));
    let caller = TwilioCaller::start(&relay, id, &[]);
    let mut agent = Peer::new(Direction::SendRecv);
    let r = relay.request(
        "POST",
        &format!("/whip/{id}?role=agent"),
        &[("Content-Type", "application/sdp"), ("Authorization", "Bearer tok")],
        Some(agent.offer()),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    agent.accept_answer(&r.text());
    assert!(agent.connect(Duration::from_secs(5)), "ICE and DTLS connect");
    caller.send_audio(&frames(3, 0..50));
    agent.run(Duration::from_secs(1), Send::Tone(440.0));
    caller.wait_sent();
    events.wait_event("audio");

    let text = relay.get("/metrics").text();
    assert!(frames_of(&text, "in", &core, "webrtc") > 0.0, "the agent's packets:\n{text}");
    assert!(frames_of(&text, "out", &core, "webrtc") > 0.0, "the caller's audio to the agent:\n{text}");
    assert!(frames_of(&text, "out", &core, "caller") > 0.0, "the agent's audio to the caller:\n{text}");
    assert!(frames_of(&text, "out", &core, "events") > 0.0, "raw samples on /ws:\n{text}");
    assert_eq!(frames_of(&text, "in", &core, "caller"), 50.0);
    for op in ["opus_encode", "opus_decode", "resample", "ulaw_encode", "ulaw_decode"] {
        assert!(codec_calls(&text, &core, op) > 0.0, "{op} was timed:\n{text}");
    }
    let sum = labelled(&text, "relay_codec_seconds_sum", &[("core", &core), ("op", "opus_encode")]);
    assert!(sum.is_some_and(|s| s > 0.0), "Opus encoding takes time:\n{text}");
}
