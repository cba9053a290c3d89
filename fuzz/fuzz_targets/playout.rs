//! The playout (jitter) buffer of a WebRTC leg, driven by fuzzer-chosen packet arrivals (any
//! timestamps and durations: reordered, duplicated, late, overlapping, wrapping, jumping), polls
//! and clock steps, with a fuzzer-chosen configuration: never panics (time may even step back);
//! while time only moves forward it never releases more than one frame per 20 ms since the first
//! packet, plus one, plus one per underrun (the delay it added and may give back); the audio released before each frame covers every frame so far, and runs at
//! most one packet ahead; no packet is played twice; every packet is accounted for.
#![no_main]

use std::collections::HashSet;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use relay_engine::media::playout::{Playout, PlayoutBuffer, PlayoutConfig, FRAME_SAMPLES, MAX_PACKET_SAMPLES};

/// Opus's packet durations at 48 kHz (2.5 to 120 ms).
const SIZES: [u32; 9] = [120, 240, 480, 960, 1920, 2880, 3840, 4800, 5760];

#[derive(Arbitrary, Debug)]
struct Input {
    /// Target delay, ms.
    target_delay_ms: u8,
    capacity_frames: u8,
    /// Maximum delay, in 10 ms steps.
    max_delay: u8,
    /// Idle timeout, in 10 ms steps.
    idle_after: u8,
    resync_frames: u8,
    /// The first timestamp.
    start: u32,
    steps: Vec<Step>,
}

#[derive(Arbitrary, Debug)]
enum Step {
    /// The clock moves `gap_ms`, then the next packet of the schedule arrives, `offset` frames
    /// away from its place, its duration chosen by `size` (a standard Opus duration, or any).
    Push { gap_ms: u8, offset: i8, size: u16 },
    /// The clock moves `gap_ms`, then a packet with any timestamp and duration arrives.
    PushAny { gap_ms: u8, ts: u32, samples: u32 },
    /// The clock moves `gap_ms`, then everything due is polled.
    Poll { gap_ms: u8 },
    /// A long stall (`tens_ms` × 10 ms), then everything due is polled.
    Stall { tens_ms: u8 },
    /// The clock steps back (never in a real shell; only "no panic" holds after it).
    Back { ms: u8 },
}

fn origin() -> Instant {
    static T0: OnceLock<Instant> = OnceLock::new();
    // Far from the process start so that stepping back cannot underflow an `Instant`.
    *T0.get_or_init(|| Instant::now() + Duration::from_secs(3600))
}

fuzz_target!(|input: Input| {
    let config = PlayoutConfig {
        target_delay: Duration::from_millis(input.target_delay_ms.into()),
        capacity_frames: input.capacity_frames.into(),
        // Any pair, including a target over `max_delay` (once an underflow: the regression
        // corpus is fuzz/corpus/playout/crash-*).
        max_delay: Duration::from_millis(u64::from(input.max_delay) * 10),
        idle_after: Duration::from_millis(u64::from(input.idle_after) * 10),
        resync_frames: input.resync_frames.into(),
    };
    let mut p = PlayoutBuffer::new(config);
    let capacity = p.config().capacity_frames;
    let t0 = origin();
    // Virtual time in ms from t0 (never below 0 after a step back: clamped).
    let mut now_ms: u64 = 10_000;
    let mut monotonic = true;
    let mut first_push: Option<u64> = None;
    let (mut next, mut id) = (input.start, 0u32);
    let (mut frames, mut pieces, mut audio) = (0u64, 0u64, 0u64);
    let mut played = HashSet::new();
    for step in input.steps.into_iter().take(2000) {
        let mut push = |now_ms: u64, ts: u32, samples: u32, p: &mut PlayoutBuffer| {
            first_push.get_or_insert(now_ms);
            // Payload: a unique id.
            let b = id.to_be_bytes().to_vec();
            // Sequence numbers in push order: a timestamp gap with none missing is a pause.
            let seq = id as u16;
            id += 1;
            p.push(t0 + Duration::from_millis(now_ms), seq, ts, samples, Bytes::from(b));
        };
        let poll_after = match step {
            Step::Push { gap_ms, offset, size } => {
                now_ms += u64::from(gap_ms);
                let samples = SIZES.get(usize::from(size)).copied().unwrap_or(u32::from(size));
                let ts = next.wrapping_add((i32::from(offset) * FRAME_SAMPLES as i32) as u32);
                push(now_ms, ts, samples, &mut p);
                next = next.wrapping_add(samples);
                false
            }
            Step::PushAny { gap_ms, ts, samples } => {
                now_ms += u64::from(gap_ms);
                push(now_ms, ts, samples, &mut p);
                false
            }
            Step::Poll { gap_ms } => {
                now_ms += u64::from(gap_ms);
                true
            }
            Step::Stall { tens_ms } => {
                now_ms += u64::from(tens_ms) * 10;
                true
            }
            Step::Back { ms } => {
                now_ms = now_ms.saturating_sub(ms.into());
                monotonic = false;
                true
            }
        };
        if poll_after {
            let now = t0 + Duration::from_millis(now_ms);
            let mut guard = 0;
            while let Some(out) = p.poll(now) {
                guard += 1;
                assert!(guard <= 100_000, "poll never runs dry");
                match out {
                    Playout::Frame => {
                        frames += 1;
                        if monotonic {
                            // A resync never brings the next release forward (it once did: the
                            // regression corpus is fuzz/corpus/playout/crash-*).
                            // Giving back delay never outruns it either: only the frames that
                            // underruns added (once it did: packets that came faster than real
                            // time looked like delay to give back; crash-9c7d1fb42072).
                            let elapsed = now_ms - first_push.unwrap_or(now_ms);
                            let added = p.stats().underruns;
                            assert!(
                                frames <= elapsed / 20 + 1 + added,
                                "{frames} frames released {elapsed} ms after the first packet, {added} underruns"
                            );
                        }
                        assert!(audio >= frames * u64::from(FRAME_SAMPLES), "frame {frames} not covered: {audio}");
                    }
                    Playout::Packet { payload, samples } => {
                        pieces += 1;
                        audio += u64::from(samples);
                        let pid = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                        assert!(played.insert(pid), "packet {pid} played twice");
                    }
                    Playout::Fec { samples, .. } | Playout::Conceal { samples } => {
                        assert!(samples > 0 && samples <= FRAME_SAMPLES, "a piece of {samples}");
                        pieces += 1;
                        audio += u64::from(samples);
                    }
                }
            }
            let ahead = u64::from(MAX_PACKET_SAMPLES);
            assert!(audio < frames * u64::from(FRAME_SAMPLES) + ahead, "{audio} released for {frames} frames");
        }
        assert!(p.buffered() <= capacity);
        if let Some(at) = p.poll_timeout() {
            // A timeout in the past is allowed (poll now), but it must be a real instant.
            let _ = at.saturating_duration_since(t0);
        }
    }
    let s = p.stats();
    assert_eq!(s.played, played.len() as u64);
    assert_eq!(s.received, s.played + s.late + s.duplicates + s.overflow_dropped + p.buffered() as u64, "{s:?}");
    assert_eq!(s.concealed + s.fec_recovered + s.played, pieces, "{s:?}");
});
