//! Opus packets of any standard duration from a WebRTC peer (RFC 7587: 10, 20, 40 and 60 ms, and a
//! `ptime` that changes mid-stream) against the real relay over loopback: a WHIP agent sends a tone
//! in such packets and the call's Twilio caller must hear it whole, with no gap longer than one
//! packet and (for a clean stream) nothing concealed; the answer states what Relay sends.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use relay_tests::ptime::Publisher;
use relay_tests::telephony::{unb64, TwilioCaller};
use relay_tests::webrtc::dominant_hz;
use relay_tests::Relay;
use serde_json::Value;

/// The tone the agent sends.
const TONE_HZ: f64 = 440.0;

/// What one call heard and counted.
struct Heard {
    /// The caller's audio, 8 kHz PCM.
    pcm: Vec<i16>,
    /// The WebRTC playout counters summed over the cores, read while the stream still ran.
    counters: Value,
}

/// Starts call `id` on `relay` with a Twilio caller, publishes a WHIP agent that sends the tone in
/// packets of `packets_ms`, and returns what the caller heard.
fn call(relay: &Relay, id: &str, packets_ms: &[u32]) -> Heard {
    assert_eq!(relay.start_call(id, "tok").status, 200);
    let caller = TwilioCaller::start(relay, id, &[]);
    let mut agent = Publisher::new();
    let r = relay.request(
        "POST",
        &format!("/whip/{id}?role=agent"),
        &[("Content-Type", "application/sdp"), ("Authorization", "Bearer tok")],
        Some(agent.offer()),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let answer = r.text();
    let audio = answer.split("\r\nm=").find(|s| s.starts_with("audio ")).expect("an audio section");
    assert!(audio.contains("\r\na=ptime:20\r\n"), "the answer states the 20 ms Relay sends: {answer}");
    assert!(audio.contains("\r\na=maxptime:120\r\n"), "and that it takes up to 120 ms: {answer}");
    agent.accept_answer(&answer);
    assert!(agent.connect(Duration::from_secs(5)), "ICE and DTLS connect");
    let progress = AtomicUsize::new(0);
    let mut counters = Value::Null;
    std::thread::scope(|s| {
        s.spawn(|| agent.send_tone(TONE_HZ, packets_ms, &progress));
        // Counters while the stream still runs: after it ends the buffer conceals until idle.
        let near_end = packets_ms.len() * 9 / 10;
        relay_tests::poll_until("most packets sent", || (progress.load(Ordering::Relaxed) >= near_end).then_some(()));
        counters = webrtc_counters(relay);
    });
    // Everything the agent sent has been played to the caller by the time the caller's stream
    // has gone quiet for a moment (the relay paces what it plays at real time).
    let total_ms: u32 = packets_ms.iter().sum();
    let want = (total_ms as usize * 8).saturating_sub(8 * 200);
    caller.wait_until("the caller heard the stream", |arrivals| {
        let samples: usize = arrivals
            .iter()
            .filter(|a| a.event() == Some("media"))
            .filter_map(|a| a.json()?["media"]["payload"].as_str().map(|p| unb64(p).len()))
            .sum();
        (samples >= want).then_some(())
    });
    Heard { pcm: caller.heard_pcm(), counters }
}

/// `lost`, `concealed`, `fecRecovered`, `late` and `decodeErrors` of `/health/detailed`, summed
/// over the cores.
fn webrtc_counters(relay: &Relay) -> Value {
    let detailed = relay.detailed();
    let cores = detailed["services"]["server"]["cores"].as_array().expect("cores").clone();
    let sum = |k: &str| cores.iter().map(|c| c["webrtc"][k].as_u64().unwrap_or(0)).sum::<u64>();
    serde_json::json!({
        "lost": sum("lost"), "concealed": sum("concealed"), "fecRecovered": sum("fecRecovered"),
        "late": sum("late"), "decodeErrors": sum("decodeErrors"),
    })
}

/// The longest run of quiet audio (2.5 ms blocks well below the tone's level) between the first
/// and the last loud block of `pcm` (8 kHz), in ms; and the length of that stretch, in ms.
fn longest_gap_ms(pcm: &[i16]) -> (f64, f64) {
    let loud: Vec<bool> = pcm.chunks(20).map(|b| relay_tests::webrtc::rms(b) > 1500.0).collect();
    let (Some(first), Some(last)) = (loud.iter().position(|l| *l), loud.iter().rposition(|l| *l)) else {
        return (f64::INFINITY, 0.0);
    };
    let mut longest = 0usize;
    let mut run = 0usize;
    for &l in &loud[first..=last] {
        run = if l { 0 } else { run + 1 };
        longest = longest.max(run);
    }
    (longest as f64 * 2.5, (last + 1 - first) as f64 * 2.5)
}

/// Checks that `heard` is the tone, for about `ms` of audio, with no quiet gap longer than
/// `max_gap_ms`.
fn assert_heard(what: &str, heard: &Heard, ms: u32, max_gap_ms: f64) {
    let hz = dominant_hz(&heard.pcm, 8000).expect("the caller heard audio");
    assert!((hz - TONE_HZ as f32).abs() <= 20.0, "{what}: the caller hears the 440 Hz tone, got {hz}");
    let (gap, span) = longest_gap_ms(&heard.pcm);
    assert!(gap <= max_gap_ms, "{what}: a {gap} ms gap in the tone (at most {max_gap_ms} ms)");
    assert!(span >= f64::from(ms) - 200.0, "{what}: {span} ms of tone heard of {ms} ms sent");
    assert_eq!(heard.counters["decodeErrors"], 0, "{what}: every packet decodes: {}", heard.counters);
    assert_eq!(heard.counters["late"], 0, "{what}: no packet is late: {}", heard.counters);
}

/// A WHIP peer sending 10, 40 or 60 ms Opus packets (or the usual 20) is heard by the caller as
/// the tone, with no gap longer than one packet; nothing is concealed for a clean stream (a few
/// frames at most on a busy machine), where Relay used to conceal every packet longer than 20 ms.
#[test]
fn standard_packet_durations_are_heard() {
    for ms in [60u32, 40, 10, 20] {
        // A relay per duration, so its counters are this stream's alone.
        let relay = Relay::start(&[]);
        let packets = vec![ms; (3000 / ms) as usize];
        let heard = call(&relay, &format!("ptime-{ms}"), &packets);
        let what = format!("{ms} ms packets");
        assert_heard(&what, &heard, 3000, f64::from(ms));
        let concealed = heard.counters["concealed"].as_u64().unwrap_or(u64::MAX);
        assert!(concealed <= 3, "{what}: concealment stays about zero: {}", heard.counters);
        assert_eq!(heard.counters["lost"], 0, "{what}: nothing lost: {}", heard.counters);
    }
}

/// A peer whose packet duration changes mid-stream (20 → 60 → 10 → 40 ms, as a sender adapting
/// its ptime) is heard throughout: every packet decodes, nothing is lost, and no gap in the tone
/// is longer than the longest packet.
#[test]
fn changing_ptime_is_heard() {
    let relay = Relay::start(&[]);
    let mut packets = vec![20u32; 40];
    packets.extend([60; 14]);
    packets.extend([10; 80]);
    packets.extend([40; 20]);
    let total: u32 = packets.iter().sum();
    let heard = call(&relay, "ptime-changing", &packets);
    assert_heard("changing ptime", &heard, total, 60.0);
    assert_eq!(heard.counters["lost"], 0, "nothing lost: {}", heard.counters);
    // Only the switches to longer packets wait for the longer packet to arrive.
    assert!(heard.counters["concealed"].as_u64().unwrap_or(0) <= 8, "{}", heard.counters);
}
