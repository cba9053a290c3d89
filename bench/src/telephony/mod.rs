//! The telephony scenario: N Twilio-protocol callers stream 20 ms μ-law frames open loop (each
//! frame sent at its scheduled instant, whatever happened before) through the relay to a
//! Twilio-protocol bot that echoes every frame back. Each frame's first bytes carry its call and
//! sequence number, so the receiver reads back exactly which frame arrived when.
//!
//! Two generators produce the same traffic and the same [`Report`]: [`Generator::Events`] (the
//! default: one thread, an epoll loop with a state machine per socket, see `evented.rs`) and
//! [`Generator::Threads`] (a thread per socket, see `threaded.rs`, kept to compare against).
//!
//! Invariant: latency is measured from each frame's *scheduled* send time (no coordinated
//! omission); every loop is bounded by the run's duration.

pub(crate) mod epoll;
mod evented;
mod threaded;

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde::Deserialize;

use crate::stats::Recorder;

/// Samples (bytes of μ-law) per 20 ms frame.
const FRAME: usize = 160;
/// Frame period.
const PERIOD: Duration = Duration::from_millis(20);
/// How long a caller waits after its last frame before hanging up (`stop`), so the last echoes
/// arrive first.
const HANG_UP_AFTER: Duration = Duration::from_millis(500);
/// How long receivers keep reading after their call's last frame was due.
const DRAIN: Duration = Duration::from_secs(2);

/// What one run measured.
pub struct Report {
    /// Caller → bot one-way latency per frame.
    pub uplink: Recorder,
    /// Bot → caller one-way latency per frame (the echo, through the relay's pacer).
    pub downlink: Recorder,
    /// Caller → frontend latency of `inbound` audio, over every frontend.
    pub fanout: Recorder,
    /// How late each frame left its caller against its schedule: the generator's own timer and
    /// queueing lag, which every uplink latency includes.
    pub send_lag: Recorder,
    /// Frames sent by callers.
    pub sent: u64,
    /// Frames the bot received (each counted once).
    pub received_by_bot: u64,
    /// Frames callers received back.
    pub received_by_callers: u64,
    /// `inbound` frames frontends received (each frontend counts its own).
    pub received_by_frontends: u64,
    /// Frontends that listened.
    pub frontends: u64,
    /// Frames that arrived twice.
    pub duplicates: u64,
    /// Frames that arrived after a later frame of the same call.
    pub reordered: u64,
    /// Frames that arrived more than `late_after` after they were due.
    pub late: u64,
    /// Frames sent more than one period after they were due (generator saturated).
    pub late_sends: u64,
    /// When the steady state began and ended (every call streaming).
    pub steady: (Instant, Instant),
}

/// Which load generator drives the sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Generator {
    /// One thread running an epoll loop, a state machine per socket (the default).
    Events,
    /// A thread per socket (the original generator; saturates one CPU at ~150 calls).
    Threads,
}

impl Generator {
    /// Its name in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Events => "events",
            Self::Threads => "threads",
        }
    }

    /// CPUs it can keep busy at most (`None`: as many as the process may use).
    pub fn cpus(self) -> Option<usize> {
        match self {
            Self::Events => Some(1),
            Self::Threads => None,
        }
    }
}

/// What to run.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Concurrent calls.
    pub calls: u32,
    /// Seconds of audio per call.
    pub seconds: u64,
    /// Start every call's frames at the same instant (worst case).
    pub aligned: bool,
    /// Frontend listeners per call.
    pub frontends: u32,
    /// A frame arriving later than this after it was due counts as late.
    pub late_after: Duration,
    /// Which generator to use.
    pub generator: Generator,
    /// CPU the event-loop generator's thread is pinned to (`None`: wherever the process may run).
    pub cpu: Option<usize>,
    /// The address the bot listens on (the relay dials it): loopback, or the generator's end of a
    /// [`crate::netns::Netns`].
    pub bot_ip: std::net::IpAddr,
    /// Callers open `/twilio/stream/{callSid}` (the form Relay's TwiML uses, which a balancer
    /// routes by the path) instead of `/twilio/stream`.
    pub keyed_path: bool,
}

/// Runs the scenario against `relay` (`None`: the callers talk to the bot directly, the no-relay
/// floor).
///
/// # Errors
/// When a connection fails, or the run overruns its deadline.
pub fn run(relay: Option<SocketAddr>, opts: Options) -> anyhow::Result<Report> {
    match opts.generator {
        Generator::Events => evented::run(relay, opts),
        Generator::Threads => threaded::run(relay, opts),
    }
}

/// Frames each call sends.
fn frames(opts: &Options) -> u64 {
    opts.seconds * 1000 / 20
}

/// Time from start to the first frame: every socket connects and handshakes within it. 5 ms per
/// socket is what the threaded generator needed; the event loop needs far less but keeps the same
/// lead-in, so both runs have the same shape.
fn lead_in(opts: &Options) -> Duration {
    Duration::from_millis(500 + 5 * u64::from(opts.calls) * u64::from(1 + opts.frontends))
}

/// The window over which resource use is averaged: from the last call's first frame (plus half
/// a second to settle) to the first call's last frame.
fn steady(schedule: &Schedule, frames: u64) -> (Instant, Instant) {
    (schedule.due(schedule.calls.saturating_sub(1), 0) + Duration::from_millis(500), schedule.due(0, frames))
}

/// Adds up the tallies of one run.
#[allow(clippy::too_many_arguments)] // Every part of a report; a struct would only rename them.
fn report(
    opts: &Options,
    relay: bool,
    frames: u64,
    up: Tally,
    down: Tally,
    fan: Tally,
    send_lag: Recorder,
    late_sends: u64,
    steady: (Instant, Instant),
) -> Report {
    Report {
        sent: u64::from(opts.calls) * frames,
        received_by_bot: up.received,
        received_by_callers: down.received,
        received_by_frontends: fan.received,
        frontends: if relay { u64::from(opts.calls) * u64::from(opts.frontends) } else { 0 },
        duplicates: up.duplicates + down.duplicates + fan.duplicates,
        reordered: up.reordered + down.reordered + fan.reordered,
        late: up.late + down.late + fan.late,
        uplink: up.latencies,
        downlink: down.latencies,
        fanout: fan.latencies,
        send_lag,
        late_sends,
        steady,
    }
}

/// A frame's identity, written into its first 12 bytes.
fn frame_bytes(call: u32, seq: u64) -> [u8; FRAME] {
    let mut f = [0xFFu8; FRAME];
    f[..4].copy_from_slice(&call.to_le_bytes());
    f[4..12].copy_from_slice(&seq.to_le_bytes());
    f
}

fn frame_id(bytes: &[u8]) -> Option<(u32, u64)> {
    if bytes.len() < 12 {
        return None;
    }
    let call = u32::from_le_bytes(bytes[..4].try_into().ok()?);
    let seq = u64::from_le_bytes(bytes[4..12].try_into().ok()?);
    Some((call, seq))
}

/// The bot's echo time in bytes 12..20 of an echoed frame, as nanoseconds since the schedule's
/// origin.
fn echo_stamp(bytes: &[u8]) -> u64 {
    bytes.get(12..20).and_then(|b| b.try_into().ok()).map_or(0, u64::from_le_bytes)
}

fn elapsed_nanos(origin: Instant, now: Instant) -> u64 {
    u64::try_from(now.saturating_duration_since(origin).as_nanos()).unwrap_or(u64::MAX)
}

/// Shared clock origin and the per-frame schedule: frame `seq` of call `c` is due at
/// `origin + offset(c) + seq × 20 ms`.
#[derive(Clone, Copy)]
struct Schedule {
    origin: Instant,
    calls: u32,
    aligned: bool,
}

impl Schedule {
    fn due(&self, call: u32, seq: u64) -> Instant {
        // Staggered: call starts spread evenly over one period (aligned: all at once, worst case).
        let offset = if self.aligned { Duration::ZERO } else { PERIOD * call / self.calls.max(1) };
        self.origin + offset + PERIOD * u32::try_from(seq).unwrap_or(u32::MAX)
    }
}

#[derive(Default)]
struct Tally {
    latencies: Recorder,
    /// Per stream (call, or call and frontend): highest sequence seen, and every sequence seen.
    seen: HashMap<u64, (u64, Seen)>,
    received: u64,
    duplicates: u64,
    reordered: u64,
    late: u64,
}

impl Tally {
    fn record(&mut self, stream: u64, seq: u64, latency: Duration, late_after: Duration) {
        let (highest, seen) = self.seen.entry(stream).or_default();
        if !seen.insert(seq) {
            self.duplicates += 1;
            return;
        }
        if seq < *highest {
            self.reordered += 1;
        }
        *highest = (*highest).max(seq);
        self.received += 1;
        if latency > late_after {
            self.late += 1;
        }
        self.latencies.record(latency);
    }
}

/// The sequence numbers one stream has delivered: a bitmap, since they run densely from 0 (a
/// hash set per frame cost the event loop ~3 % of its CPU at 500 calls).
#[derive(Default)]
struct Seen {
    bits: Vec<u64>,
    /// Sequence numbers too large for a bitmap (only a broken peer sends those).
    far: HashSet<u64>,
}

impl Seen {
    /// Frames per stream the bitmap covers: an hour of 20 ms frames.
    const BITMAP_LIMIT: u64 = 180_000;

    /// Adds `seq`; false when it was already there.
    fn insert(&mut self, seq: u64) -> bool {
        if seq >= Self::BITMAP_LIMIT {
            return self.far.insert(seq);
        }
        let (word, bit) = ((seq / 64) as usize, seq % 64); // < BITMAP_LIMIT / 64: fits.
        if word >= self.bits.len() {
            self.bits.resize(word + 1, 0);
        }
        let fresh = self.bits[word] & (1 << bit) == 0;
        self.bits[word] |= 1 << bit;
        fresh
    }
}

/// The frontend stream id of listener `k` of `call` in the fan-out tally.
fn frontend_stream(call: u32, k: u32) -> u64 {
    (u64::from(call) << 32) | u64::from(k)
}

/// The path a caller opens: the bot's own (no relay), `/twilio/stream/{callSid}` when `keyed`, else
/// `/twilio/stream`.
fn caller_path(call: u32, via_relay: bool, keyed: bool) -> String {
    match (via_relay, keyed) {
        (false, _) => "/bot".to_owned(),
        (true, true) => format!("/twilio/stream/{}", call_sid(call)),
        (true, false) => "/twilio/stream".to_owned(),
    }
}

fn call_sid(call: u32) -> String {
    format!("CAbench{call:08}")
}

fn stream_sid(call: u32) -> String {
    format!("MZbench{call:08}")
}

/// Twilio's first message on a stream.
const CONNECTED: &str = r#"{"event":"connected","protocol":"Call","version":"1.0.0"}"#;

/// Twilio's `start`, with the bench's bot as the agent (`customParameters.agentUrl`).
fn start_msg(call: u32, agent_url: &str) -> String {
    let (call_sid, stream_sid) = (call_sid(call), stream_sid(call));
    format!(
        r#"{{"event":"start","sequenceNumber":"1","start":{{"accountSid":"ACbench","streamSid":"{stream_sid}","callSid":"{call_sid}","tracks":["inbound"],"customParameters":{{"callSid":"{call_sid}","agentUrl":"{agent_url}"}},"mediaFormat":{{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1}}}},"streamSid":"{stream_sid}"}}"#
    )
}

/// Twilio's `media` carrying frame `seq` of `call`.
fn media_msg(call: u32, seq: u64, stream_sid: &str) -> String {
    let mut payload = [0u8; FRAME.div_ceil(3) * 4];
    let n = base64::engine::general_purpose::STANDARD
        .encode_slice(frame_bytes(call, seq), &mut payload)
        .expect("the buffer fits the base64 of one frame");
    let payload = std::str::from_utf8(&payload[..n]).expect("base64 is ASCII");
    let mut out = String::with_capacity(200 + payload.len());
    let _ = write!(
        out,
        r#"{{"event":"media","sequenceNumber":"{}","media":{{"track":"inbound","chunk":"{}","timestamp":"{}","payload":"{payload}"}},"streamSid":"{stream_sid}"}}"#,
        seq + 2,
        seq + 1,
        seq * 20
    );
    out
}

/// Twilio's `stop` after `frames` media messages.
fn stop_msg(call: u32, frames: u64) -> String {
    let (call_sid, stream_sid) = (call_sid(call), stream_sid(call));
    format!(
        r#"{{"event":"stop","sequenceNumber":"{}","streamSid":"{stream_sid}","stop":{{"accountSid":"ACbench","callSid":"{call_sid}"}}}}"#,
        frames + 2
    )
}

/// The bot's answer to a `media`: the same frame with the bot's echo time in bytes 12..20.
fn echo_msg(stream_sid: &str, frame: &[u8]) -> String {
    let mut out = String::with_capacity(64 + stream_sid.len() + frame.len().div_ceil(3) * 4);
    let _ = write!(out, r#"{{"event":"media","streamSid":"{stream_sid}","media":{{"payload":""#);
    base64::engine::general_purpose::STANDARD.encode_string(frame, &mut out);
    out.push_str(r#""}}"#);
    out
}

/// Path of frontend `k` of `call`.
fn frontend_path(call: u32, k: u32) -> String {
    format!("/frontend-stream?callSid={}&user_id=bench-{call}-{k}", call_sid(call))
}

/// A frontend's subscription to its call.
fn connect_twilio_msg(call: u32, k: u32) -> String {
    format!(r#"{{"event":"connect-twilio","callSid":"{}","user_id":"bench-{call}-{k}"}}"#, call_sid(call))
}

/// The fields of a received message the bench reads: Twilio's `media` and `start`, and the
/// frontend stream's `audio`.
///
/// Strings are borrowed from the frame: the relay and the bench never escape event names, sids
/// or base64, and a message that did would fail to parse and show up as a lost frame.
#[derive(Deserialize)]
struct Wire<'a> {
    event: Option<&'a str>,
    /// Frontend `audio`: which side of the call.
    track: Option<&'a str>,
    /// Frontend `audio`: base64 μ-law.
    payload: Option<&'a str>,
    #[serde(borrow)]
    media: Option<WireMedia<'a>>,
    start: Option<WireStart>,
}

#[derive(Deserialize)]
struct WireMedia<'a> {
    payload: Option<&'a str>,
}

#[derive(Deserialize)]
struct WireStart {
    #[serde(rename = "streamSid")]
    stream_sid: Option<String>,
}

/// What a receiver does with one message.
enum Received<'a> {
    /// Twilio `media` (or frontend `audio` on the inbound track): the decoded frame.
    Frame(&'a mut [u8]),
    /// Twilio `start`: its stream sid.
    Start(String),
    /// Twilio `stop`.
    Stop,
    /// Anything else.
    Other,
}

/// Reads one message into `buf` (the decoded frame lives there).
fn parse<'b>(text: &str, buf: &'b mut [u8]) -> Received<'b> {
    let Ok(wire) = serde_json::from_str::<Wire<'_>>(text) else { return Received::Other };
    let payload = match wire.event {
        Some("media") => wire.media.and_then(|m| m.payload),
        Some("audio") if wire.track == Some("inbound") => wire.payload,
        Some("start") => {
            let sid = wire.start.and_then(|s| s.stream_sid).unwrap_or_default();
            return Received::Start(sid);
        }
        Some("stop") => return Received::Stop,
        _ => None,
    };
    let Some(payload) = payload else { return Received::Other };
    match base64::engine::general_purpose::STANDARD.decode_slice(payload, buf) {
        Ok(n) => Received::Frame(&mut buf[..n]),
        Err(_) => Received::Other,
    }
}

/// Room for a decoded frame: relayed frames are 160 bytes; anything over this is not the bench's.
const DECODE_BYTES: usize = 1024;

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame's identity survives the trip through its bytes.
    #[test]
    fn frame_identity() {
        let f = frame_bytes(7, 123_456);
        assert_eq!(frame_id(&f), Some((7, 123_456)));
        assert_eq!(frame_id(&f[..11]), None);
        assert!(f[20..].iter().all(|b| *b == 0xFF), "the rest is μ-law silence");
    }

    /// The tally counts each frame once, and sees duplicates, reordering and lateness.
    #[test]
    fn tally_accounting() {
        let late = Duration::from_millis(60);
        let mut t = Tally::default();
        let ms = Duration::from_millis;
        t.record(1, 0, ms(1), late);
        t.record(1, 2, ms(1), late);
        t.record(1, 1, ms(1), late); // arrives after 2: reordered
        t.record(1, 2, ms(1), late); // again: duplicate, not counted
        t.record(1, 3, ms(61), late); // late
        t.record(2, 0, ms(1), late); // another stream: independent order
        t.record(2, 1 << 40, ms(1), late); // beyond the bitmap: still counted once
        t.record(2, 1 << 40, ms(1), late);
        assert_eq!((t.received, t.duplicates, t.reordered, t.late), (6, 2, 1, 1));
        assert_eq!(t.latencies.summary().count, 6, "every received frame has one latency");
    }

    /// Staggered calls spread their first frames over one period; aligned calls share instants.
    #[test]
    fn schedule() {
        let origin = Instant::now();
        let s = Schedule { origin, calls: 4, aligned: false };
        assert_eq!(s.due(2, 0) - origin, Duration::from_millis(10));
        assert_eq!(s.due(0, 3) - origin, Duration::from_millis(60));
        let a = Schedule { aligned: true, ..s };
        assert_eq!(a.due(3, 1), a.due(0, 1));
    }

    /// Both generators, run against their own bot (no relay), deliver every frame exactly once,
    /// in order, both ways, and count every send.
    #[test]
    fn generators_deliver_every_frame() {
        for generator in [Generator::Events, Generator::Threads] {
            let opts = Options {
                calls: 3,
                seconds: 1,
                aligned: false,
                frontends: 0,
                late_after: Duration::from_secs(60),
                generator,
                cpu: None,
                bot_ip: std::net::Ipv4Addr::LOCALHOST.into(),
                keyed_path: false,
            };
            let r = run(None, opts).expect("a direct run");
            assert_eq!(r.sent, 3 * 50, "{generator:?}");
            assert_eq!((r.received_by_bot, r.received_by_callers), (r.sent, r.sent), "{generator:?}");
            assert_eq!((r.duplicates, r.reordered, r.frontends), (0, 0, 0), "{generator:?}");
            assert_eq!(r.uplink.summary().count as u64, r.sent, "{generator:?}");
            assert_eq!(r.send_lag.summary().count as u64, r.sent, "{generator:?}: one lag per frame sent");
        }
    }

    /// The messages are JSON of Twilio's shapes, and what the callers send parses back to its frame.
    #[test]
    fn messages_round_trip() {
        for text in [CONNECTED.to_owned(), start_msg(3, "ws://127.0.0.1:1/bot"), stop_msg(3, 50)] {
            serde_json::from_str::<serde_json::Value>(&text).expect("valid JSON");
        }
        let start: serde_json::Value = serde_json::from_str(&start_msg(3, "ws://x/bot")).expect("JSON");
        assert_eq!(start["start"]["customParameters"]["agentUrl"], "ws://x/bot");
        assert_eq!(start["start"]["customParameters"]["callSid"], "CAbench00000003");
        let mut buf = [0u8; DECODE_BYTES];
        let media = media_msg(3, 41, "MZbench00000003");
        let v: serde_json::Value = serde_json::from_str(&media).expect("JSON");
        assert_eq!((v["sequenceNumber"].as_str(), v["media"]["chunk"].as_str()), (Some("43"), Some("42")));
        let Received::Frame(frame) = parse(&media, &mut buf) else { panic!("a media frame") };
        assert_eq!(frame.len(), FRAME);
        assert_eq!(frame_id(frame), Some((3, 41)));
        frame[12..20].copy_from_slice(&77u64.to_le_bytes());
        let echo = echo_msg("MZbench00000003", frame);
        let mut buf2 = [0u8; DECODE_BYTES];
        let Received::Frame(back) = parse(&echo, &mut buf2) else { panic!("an echo frame") };
        assert_eq!((frame_id(back), echo_stamp(back)), (Some((3, 41)), 77));
        let b64 = base64::engine::general_purpose::STANDARD.encode(frame_bytes(5, 9));
        let audio = format!(r#"{{"event":"audio","payload":"{b64}","track":"inbound"}}"#);
        assert!(matches!(parse(&audio, &mut buf), Received::Frame(f) if frame_id(f) == Some((5, 9))));
        let outbound = r#"{"event":"audio","payload":"AAAA","track":"outbound"}"#;
        assert!(matches!(parse(outbound, &mut buf), Received::Other), "only inbound audio counts");
        assert!(matches!(parse(&start_msg(3, "ws://x/bot"), &mut buf), Received::Start(s) if s == "MZbench00000003"));
        assert!(matches!(parse(&stop_msg(3, 50), &mut buf), Received::Stop));
        assert!(matches!(parse("not json", &mut buf), Received::Other));
    }
}
