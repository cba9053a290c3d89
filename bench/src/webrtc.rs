//! The `webrtc` scenario: transcoded calls through Relay. Each call is a Twilio-protocol caller
//! (μ-law 8 kHz on `/twilio/stream`) and a WebRTC agent peer (str0m with full ICE on its own
//! loopback UDP socket, Opus 48 kHz mono in 20 ms frames, published with WHIP `role=agent`); Relay
//! transcodes between them, through its playout buffer on the way to the caller.
//!
//! Opus is lossy, so a frame's identity is carried in time instead of bytes: each sender emits,
//! open loop on absolute 20 ms deadlines (call starts staggered over the period), silence with a
//! one-frame 1 kHz burst every N frames (a different phase per call and direction); each receiver
//! finds burst onsets in the audio it decodes and matches each to the burst scheduled last before
//! it (see `webrtc/burst.rs`). Latency = arrival of the frame holding the onset + the onset's
//! offset in that frame − the burst's scheduled send time.
//!
//! One thread drives every socket: an epoll loop (the telephony generator's, `telephony/epoll.rs`)
//! over the callers' non-blocking TCP streams (Relay's sans-IO WebSocket codec) and the peers'
//! non-blocking UDP sockets, with a timer heap for the frames and each peer's str0m timeout.
//!
//! Invariant: latency is measured from each burst's *scheduled* send time (no coordinated
//! omission); every loop is bounded in count and by the run's hard deadline; traffic goes only to
//! the relay under test, on loopback.

mod burst;

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::{self, BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use audiopus::coder::{Decoder, Encoder};
use audiopus::{Channels, SampleRate};
use base64::Engine as _;
use relay_engine::config::Limits;
use relay_engine::media::g711;
use relay_engine::proto::ws::{check_answer, Incoming, WsCodec};
use serde::Deserialize;
use serde_json::{json, Value};
use str0m::change::SdpAnswer;
use str0m::format::Codec;
use str0m::media::{Direction, Frequency, MediaKind, MediaTime, Mid, Pt};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, Input, Output, Rtc};
use tungstenite::Utf8Bytes;

use crate::telephony::epoll::{self, Epoll, Interest};
use burst::{burst_frame, Bursts, Matcher, OnsetDetector};
pub use burst::{codec_reference, CodecReference};

use crate::client::Conn;
use crate::sampler::{Sampler, Usage};
use crate::stats::Recorder;

/// Frame period.
const PERIOD: Duration = Duration::from_millis(20);
/// 20 ms at 48 kHz.
const FRAME_48K: usize = 960;
/// 20 ms at 8 kHz.
const FRAME_8K: usize = 160;
/// The access token every session is started with.
const TOKEN: &str = "bench-webrtc";
/// Longest any one setup request (start-call, upgrade, WHIP) may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long every peer has, after the last offer was answered, to finish ICE and DTLS.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// From the last peer connecting to the first frame.
const LEAD_IN: Duration = Duration::from_millis(300);
/// How long receivers keep listening after their call's last frame was due.
const DRAIN: Duration = Duration::from_secs(1);
/// How long past the drain the run may go before it is declared stuck.
const OVERRUN: Duration = Duration::from_secs(5);
/// Readiness events taken per wait.
const EVENTS_PER_WAIT: usize = 256;
/// Datagrams or reads taken from one socket per readiness event, so one busy socket cannot hold
/// the senders back (level-triggered: the rest is reported again).
const READS_PER_EVENT: usize = 32;
/// str0m outputs drained after one input before the peer counts as broken (a drain is a handful).
const OUTPUTS_PER_DRAIN: usize = 10_000;
/// Due frames are sent after every this many readiness events.
const TIMER_CHECK_EVERY: usize = 16;
/// A wait shorter than this polls instead of sleeping (see the telephony generator).
const SPIN_BELOW: Duration = Duration::from_micros(15);
/// The loop thread's timer slack.
const TIMER_SLACK: Duration = Duration::from_micros(1);
/// The shared read buffer, bytes.
const READ_BYTES: usize = 64 * 1024;

/// What to run.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Concurrent calls.
    pub calls: u32,
    /// Seconds of audio per call, each way.
    pub seconds: u64,
    /// A burst every this many frames in each direction (25: two a second).
    pub burst_every: u64,
    /// Opus complexity of the agents' encoders (0: the cheapest; the generator must not saturate).
    pub encoder_complexity: u8,
    /// CPU the generator thread is pinned to.
    pub cpu: Option<usize>,
}

/// One direction's results.
#[derive(Clone, Default)]
pub struct PathReport {
    /// One-way latency of each detected burst, from its scheduled send time.
    pub latency: Recorder,
    /// Bursts the senders emitted.
    pub bursts_sent: u64,
    /// Bursts whose onset the receivers found and matched.
    pub bursts_detected: u64,
    /// Onsets that matched no burst (none within half a burst period before, or a second onset).
    pub unmatched_onsets: u64,
    /// Frames the senders emitted.
    pub frames_sent: u64,
    /// What the receivers got: RTP packets (agents) or `media` messages (callers).
    pub packets_received: u64,
    /// Samples the receivers decoded, at their rate (48 kHz agents, 8 kHz callers).
    pub samples_received: u64,
}

impl PathReport {
    /// Bursts sent but never detected.
    pub fn missed(&self) -> u64 {
        self.bursts_sent.saturating_sub(self.bursts_detected)
    }

    /// As JSON.
    pub fn to_json(&self) -> Value {
        json!({
            "latency": self.latency.summary().to_json(), "bursts_sent": self.bursts_sent,
            "bursts_detected": self.bursts_detected, "bursts_missed": self.missed(),
            "unmatched_onsets": self.unmatched_onsets, "frames_sent": self.frames_sent,
            "packets_received": self.packets_received, "samples_received": self.samples_received,
        })
    }
}

/// What one run measured.
pub struct Report {
    /// Caller → agent: μ-law in, Opus out.
    pub uplink: PathReport,
    /// Agent → caller: Opus in, through Relay's playout buffer, μ-law out.
    pub downlink: PathReport,
    /// How late each frame left its sender against its schedule (both directions).
    pub send_lag: Recorder,
    /// Frames sent more than one period late (the generator fell behind).
    pub late_sends: u64,
    /// RTP datagrams the agents could not send (the socket refused).
    pub send_drops: u64,
    /// Opus packets the agents could not decode.
    pub decode_errors: u64,
    /// When the steady state began and ended (every call streaming).
    pub steady: (Instant, Instant),
}

/// Runs the scenario against the relay at `relay` on its own thread (pinned to `opts.cpu`).
///
/// # Errors
/// When a setup request fails, a peer does not connect, a caller's stream breaks, or the run
/// overruns its deadline.
pub fn run(relay: SocketAddr, opts: Options) -> anyhow::Result<Report> {
    std::thread::Builder::new()
        .name("bench-webrtc".to_owned())
        .spawn(move || {
            if let Some(cpu) = opts.cpu {
                crate::sampler::pin_current_thread(cpu).with_context(|| format!("pin the generator to CPU {cpu}"))?;
            }
            epoll::set_timer_slack(TIMER_SLACK).context("set the generator's timer slack")?;
            let mut gen = Loop::setup(relay, opts)?;
            let result = gen.measure();
            gen.teardown();
            result
        })
        .context("start the generator thread")?
        .join()
        .map_err(|_| anyhow!("the generator thread panicked"))?
}

/// A run with the relay's and the generator's resource use over its steady state.
pub struct Measurement {
    /// The traffic's results.
    pub report: Report,
    /// The relay's CPU and memory while every call streamed (`None` without a pid).
    pub server: Option<Usage>,
    /// The relay's RSS before the calls, bytes.
    pub idle_rss: u64,
    /// The generator's CPU, in cores.
    pub bench_cores: f64,
    /// Busy fraction of the generator's pinned CPU (softirq included).
    pub bench_cpu_busy: Option<f64>,
    /// The calls and their settings.
    pub opts: Options,
    /// Where libopus alone puts the bursts.
    pub reference: CodecReference,
}

/// Runs the scenario against `relay`, sampling process `pid` (pinned to `server_cpu`, watched
/// when given) and the generator itself (pinned to `opts.cpu`).
///
/// # Errors
/// As [`run`].
pub fn measure(
    relay: SocketAddr,
    pid: Option<u32>,
    server_cpu: Option<usize>,
    opts: Options,
) -> anyhow::Result<Measurement> {
    let reference = codec_reference(opts.encoder_complexity).map_err(|e| anyhow!("libopus: {e}"))?;
    let idle_rss = pid.and_then(crate::sampler::sample).map_or(0, |s| s.rss_bytes);
    let server_sampler = pid.map(|p| Sampler::start(p, server_cpu, Duration::from_millis(250)));
    let bench_sampler = Sampler::start(std::process::id(), opts.cpu, Duration::from_millis(250));
    let report = run(relay, opts);
    let server_samples = server_sampler.map(Sampler::finish);
    let bench_samples = bench_sampler.finish();
    let report = report?;
    let (from, to) = report.steady;
    let server = server_samples.map(|s| crate::sampler::usage(&s, from, to));
    let bench = crate::sampler::usage(&bench_samples, from, to);
    Ok(Measurement {
        report,
        server,
        idle_rss,
        bench_cores: bench.cores,
        bench_cpu_busy: bench.cpu_busy,
        opts,
        reference,
    })
}

impl Measurement {
    /// The generator kept its schedule and had CPU to spare (it is one thread: one CPU at most).
    pub fn valid(&self) -> bool {
        self.report.late_sends == 0 && self.bench_cores < 0.9 && self.bench_cpu_busy.is_none_or(|b| b < 0.9)
    }

    /// The relay's CPU per call, % of one core.
    pub fn cpu_per_call_pct(&self) -> Option<f64> {
        self.server.map(|u| u.cores * 100.0 / f64::from(self.opts.calls.max(1)))
    }

    /// The relay's memory per call (mean RSS over idle), KiB.
    pub fn mem_per_call_kib(&self) -> Option<f64> {
        self.server
            .map(|u| u.rss_mean_bytes.saturating_sub(self.idle_rss) as f64 / f64::from(self.opts.calls.max(1)) / 1024.0)
    }

    /// Fails the run when either direction detected no burst at all.
    ///
    /// # Errors
    /// Naming the silent direction.
    pub fn check(&self) -> anyhow::Result<()> {
        for (name, p) in [("caller → agent", &self.report.uplink), ("agent → caller", &self.report.downlink)] {
            if p.bursts_detected == 0 {
                bail!(
                    "{name}: none of {} bursts was detected ({} packets received)",
                    p.bursts_sent,
                    p.packets_received
                );
            }
        }
        Ok(())
    }

    /// Prints the human table.
    pub fn print(&self, name: &str) {
        let (r, o) = (&self.report, &self.opts);
        println!(
            "\n{name}: {} calls × {} s, a burst every {} frames each way, {} frames each way",
            o.calls, o.seconds, o.burst_every, r.uplink.frames_sent
        );
        println!(
            "{:<16} {:>6} {:>6} {:>6} {:>6} {:>8} {:>8} {:>8} {:>9} {:>8}  received",
            "path", "sent", "found", "missed", "stray", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms"
        );
        for (path, p, unit) in [("caller → agent", &r.uplink, "RTP"), ("agent → caller", &r.downlink, "media msgs")]
        {
            let s = p.latency.summary();
            println!(
                "{path:<16} {:>6} {:>6} {:>6} {:>6} {:>8.2} {:>8.2} {:>8.2} {:>9.2} {:>8.2}  {} {unit}, {:.1} s of audio per call",
                p.bursts_sent,
                p.bursts_detected,
                p.missed(),
                p.unmatched_onsets,
                s.p50_us / 1e3,
                s.p90_us / 1e3,
                s.p99_us / 1e3,
                s.p999_us / 1e3,
                s.max_us / 1e3,
                p.packets_received,
                p.samples_received as f64
                    / if unit == "RTP" { 48_000.0 } else { 8000.0 }
                    / f64::from(o.calls.max(1)),
            );
        }
        println!(
            "codec alone (libopus, no network, no buffers): caller → agent {:.2} ms, agent → caller {:.2} ms",
            self.reference.uplink_us / 1e3,
            self.reference.downlink_us / 1e3
        );
        if let Some(u) = self.server {
            println!(
                "relay: {:.1} % of one core = {:.3} % per call; RSS {:.1} MiB (idle {:.1} MiB) = {:.1} KiB per call{}",
                u.cores * 100.0,
                self.cpu_per_call_pct().unwrap_or(0.0),
                u.rss_mean_bytes as f64 / 1_048_576.0,
                self.idle_rss as f64 / 1_048_576.0,
                self.mem_per_call_kib().unwrap_or(0.0),
                busy_note(u.cpu_busy)
            );
        }
        let lag = r.send_lag.summary();
        println!(
            "generator: {:.0} % of a CPU{}; send lag p50 {:.0} µs p99 {:.0} µs max {:.0} µs; late sends {}; RTP send drops {}; decode errors {}",
            self.bench_cores * 100.0,
            busy_note(self.bench_cpu_busy),
            lag.p50_us,
            lag.p99_us,
            lag.max_us,
            r.late_sends,
            r.send_drops,
            r.decode_errors
        );
        if !self.valid() {
            println!("WARNING: the load generator was saturated (late sends or CPU); this run is INVALID");
        }
    }

    /// As JSON, named `name`, with the relay's extra flags.
    pub fn to_json(&self, name: &str, relay_args: &[String]) -> Value {
        let (r, o) = (&self.report, &self.opts);
        json!({
            "scenario": "webrtc", "name": name, "calls": o.calls, "seconds": o.seconds,
            "burst_every": o.burst_every, "encoder_complexity": o.encoder_complexity, "relay_args": relay_args,
            "uplink_caller_to_agent": r.uplink.to_json(), "downlink_agent_to_caller": r.downlink.to_json(),
            "codec_reference_us": { "uplink": self.reference.uplink_us, "downlink": self.reference.downlink_us },
            "send_lag": r.send_lag.summary().to_json(), "late_sends": r.late_sends, "send_drops": r.send_drops,
            "decode_errors": r.decode_errors,
            "server_cores": self.server.map(|u| u.cores), "server_cpu_busy": self.server.and_then(|u| u.cpu_busy),
            "cpu_per_call_pct": self.cpu_per_call_pct(), "server_rss_mean_bytes": self.server.map(|u| u.rss_mean_bytes),
            "server_idle_rss_bytes": self.idle_rss, "mem_per_call_kib": self.mem_per_call_kib(),
            "bench_cores": self.bench_cores, "bench_cpu_busy": self.bench_cpu_busy, "valid": self.valid(),
        })
    }
}

/// ` (its CPU N % busy)` when the pinned CPU was watched.
fn busy_note(busy: Option<f64>) -> String {
    busy.map_or_else(String::new, |b| format!(" (its CPU {:.0} % busy)", b * 100.0))
}

/// One call: a session, its Twilio caller and its WebRTC agent.
struct Call {
    /// The session id (also the caller's `callSid`).
    id: String,
    /// The call's start within the period (the stagger).
    offset: Duration,
    caller: Caller,
    peer: Peer,
}

/// The Twilio side: sends μ-law bursts, hears the agent's.
struct Caller {
    stream: TcpStream,
    codec: Box<WsCodec>,
    /// Bytes the socket pushed back, sent when it is writable again.
    unsent: Vec<u8>,
    stream_sid: String,
    next_seq: u64,
    /// What this caller sends.
    bursts: Bursts,
    /// What it hears: the agent's bursts.
    detector: OnsetDetector,
    matcher: Matcher,
    messages: u64,
    samples: u64,
    /// The relay closed the stream.
    closed: bool,
}

/// The WebRTC agent: sends Opus bursts, hears the caller's.
struct Peer {
    rtc: Rtc,
    socket: UdpSocket,
    local: SocketAddr,
    mid: Mid,
    /// Opus's payload type, once negotiated.
    pt: Option<Pt>,
    encoder: Encoder,
    decoder: Decoder,
    connected: bool,
    /// str0m's next timeout.
    timeout: Instant,
    next_seq: u64,
    bursts: Bursts,
    detector: OnsetDetector,
    matcher: Matcher,
    packets: u64,
    samples: u64,
    send_drops: u64,
    decode_errors: u64,
    /// Why str0m gave up, if it did.
    broken: Option<String>,
}

/// Which sender a timer is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Side {
    Caller,
    Peer,
}

struct Loop {
    epoll: Epoll,
    ready: Vec<epoll::Event>,
    calls: Vec<Call>,
    /// (due, call, sender): the earliest first.
    timers: BinaryHeap<Reverse<(Instant, usize, Side)>>,
    opts: Options,
    frames: u64,
    /// Frame 0 of call 0 is due here; set once every peer is connected.
    origin: Option<Instant>,
    send_lag: Recorder,
    late_sends: u64,
    uplink: Recorder,
    downlink: Recorder,
    chunk: Vec<u8>,
    pcm: Vec<i16>,
    onsets: Vec<i64>,
    silence_b64: String,
    burst_b64: String,
    silence_48k: Vec<i16>,
    burst_48k: Vec<i16>,
    relay: SocketAddr,
}

/// What the bench reads of a message to the caller.
#[derive(Deserialize)]
struct Wire<'a> {
    event: Option<&'a str>,
    #[serde(borrow)]
    media: Option<WireMedia<'a>>,
}

#[derive(Deserialize)]
struct WireMedia<'a> {
    payload: Option<&'a str>,
}

impl Loop {
    /// Starts every call (one at a time, blocking with timeouts): session, caller stream, WHIP
    /// offer and answer; then drives ICE and DTLS until every peer is connected.
    fn setup(relay: SocketAddr, opts: Options) -> anyhow::Result<Self> {
        let b64 = |frame: &[i16]| {
            let mut ulaw = vec![0u8; frame.len()];
            g711::encode_into(frame, &mut ulaw);
            base64::engine::general_purpose::STANDARD.encode(ulaw)
        };
        let frames = opts.seconds * 50;
        let mut gen = Self {
            epoll: Epoll::new(EVENTS_PER_WAIT).context("epoll")?,
            ready: Vec::with_capacity(EVENTS_PER_WAIT),
            calls: Vec::new(),
            timers: BinaryHeap::new(),
            opts,
            frames,
            origin: None,
            send_lag: Recorder::new(),
            late_sends: 0,
            uplink: Recorder::new(),
            downlink: Recorder::new(),
            chunk: vec![0; READ_BYTES],
            pcm: vec![0; FRAME_48K * 6],
            onsets: Vec::new(),
            silence_b64: b64(&[0; FRAME_8K]),
            burst_b64: b64(&burst_frame(8000)),
            silence_48k: vec![0; FRAME_48K],
            burst_48k: burst_frame(48_000),
            relay,
        };
        let mut http = Conn::connect(relay).context("connect for /start-call")?;
        let run = std::process::id();
        for c in 0..opts.calls {
            let call = gen.start_call(&mut http, run, c).with_context(|| format!("set up call {c}"))?;
            let token = gen.calls.len() as u64;
            gen.epoll.add(call.caller.stream.as_raw_fd(), 2 * token, Interest::Read)?;
            gen.epoll.add(call.peer.socket.as_raw_fd(), 2 * token + 1, Interest::Read)?;
            gen.calls.push(call);
            // Keep the peers set up so far alive (ICE, DTLS) while the next call is made.
            gen.turn(Instant::now())?;
        }
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        let mut turns = 0u64;
        while !gen.calls.iter().all(|c| c.peer.connected) {
            if Instant::now() >= deadline || turns > 10_000_000 {
                let waiting = gen.calls.iter().filter(|c| !c.peer.connected).count();
                bail!("{waiting} WebRTC peers did not connect within {CONNECT_TIMEOUT:?}");
            }
            gen.turn(deadline.min(Instant::now() + Duration::from_millis(20)))?;
            turns += 1;
        }
        Ok(gen)
    }

    /// Starts call `c`: `/start-call`, the caller's stream (`connected`, `start`), the WHIP offer.
    fn start_call(&mut self, http: &mut Conn, run: u32, c: u32) -> anyhow::Result<Call> {
        let id = format!("wrtc-{run}-{c}");
        let body = format!(r#"{{"sessionId":"{id}","accessToken":"{TOKEN}"}}"#);
        let r = http.request("POST", "/start-call", Some(&body))?;
        if r.status != 200 {
            bail!("/start-call: {} {}", r.status, String::from_utf8_lossy(&r.body));
        }
        let stream_sid = format!("MZ{id}");
        let (stream, codec) = open_caller(self.relay, &id, &stream_sid)?;
        let every = self.opts.burst_every.max(2);
        let offset = PERIOD * c / self.opts.calls.max(1);
        let offset_ns = i64::try_from(offset.as_nanos()).unwrap_or(0);
        let up = Bursts::new(offset_ns, u64::from(c) % every, every, self.frames);
        let down = Bursts::new(offset_ns, (u64::from(c) + every / 2) % every, every, self.frames);
        let caller = Caller {
            stream,
            codec,
            unsent: Vec::new(),
            stream_sid,
            next_seq: 0,
            bursts: up,
            detector: OnsetDetector::new(8000),
            matcher: Matcher::new(down),
            messages: 0,
            samples: 0,
            closed: false,
        };
        let peer = Peer::publish(self.relay, &id, self.opts.encoder_complexity, down, up)?;
        Ok(Call { id, offset, caller, peer })
    }

    /// Streams every call for its length, then listens for [`DRAIN`] more.
    fn measure(&mut self) -> anyhow::Result<Report> {
        let origin = Instant::now() + LEAD_IN;
        self.origin = Some(origin);
        for (i, call) in self.calls.iter().enumerate() {
            self.timers.push(Reverse((origin + call.offset, i, Side::Caller)));
            self.timers.push(Reverse((origin + call.offset, i, Side::Peer)));
        }
        let last_due = origin + PERIOD * u32::try_from(self.frames).unwrap_or(u32::MAX);
        let end = last_due + PERIOD + DRAIN;
        let hard_end = end + OVERRUN;
        let mut turns = 0u64;
        loop {
            let now = Instant::now();
            if now >= end {
                break;
            }
            if now >= hard_end || turns > 1_000_000_000 {
                bail!("the run overran its deadline");
            }
            self.turn(end)?;
            turns += 1;
        }
        let steady_from = origin + self.calls.last().map_or(Duration::ZERO, |c| c.offset) + Duration::from_millis(500);
        let mut report = Report {
            uplink: PathReport { latency: std::mem::take(&mut self.uplink), ..PathReport::default() },
            downlink: PathReport { latency: std::mem::take(&mut self.downlink), ..PathReport::default() },
            send_lag: std::mem::take(&mut self.send_lag),
            late_sends: self.late_sends,
            send_drops: 0,
            decode_errors: 0,
            steady: (steady_from, last_due),
        };
        for call in &self.calls {
            let (up, down) = (&mut report.uplink, &mut report.downlink);
            up.frames_sent += call.caller.next_seq;
            up.bursts_sent += call.peer.matcher.sent();
            up.bursts_detected += call.peer.matcher.detected;
            up.unmatched_onsets += call.peer.matcher.unmatched;
            up.packets_received += call.peer.packets;
            up.samples_received += call.peer.samples;
            down.frames_sent += call.peer.next_seq;
            down.bursts_sent += call.caller.matcher.sent();
            down.bursts_detected += call.caller.matcher.detected;
            down.unmatched_onsets += call.caller.matcher.unmatched;
            down.packets_received += call.caller.messages;
            down.samples_received += call.caller.samples;
            report.send_drops += call.peer.send_drops;
            report.decode_errors += call.peer.decode_errors;
        }
        Ok(report)
    }

    /// Hangs every call up: Twilio `stop`, the peer's DTLS close, `/stop-call`. Best effort.
    fn teardown(&mut self) {
        for (i, call) in self.calls.iter_mut().enumerate() {
            let c = &mut call.caller;
            let stop = format!(
                r#"{{"event":"stop","sequenceNumber":"{}","streamSid":"{}","stop":{{"accountSid":"ACbench","callSid":"{}"}}}}"#,
                c.next_seq + 3,
                c.stream_sid,
                call.id
            );
            if c.codec.send_text(Utf8Bytes::from(stop)).is_ok() {
                let _ = transmit(&self.epoll, 2 * i, c);
            }
            let _ = self.epoll.delete(c.stream.as_raw_fd());
            call.peer.rtc.disconnect();
            call.peer.drain(Instant::now(), None, &mut self.pcm, &mut self.onsets, &mut self.uplink);
        }
        if let Ok(mut http) = Conn::connect(self.relay) {
            for call in &self.calls {
                let body = format!(r#"{{"sessionId":"{}"}}"#, call.id);
                if http.request("POST", "/stop-call", Some(&body)).is_err() {
                    break;
                }
            }
        }
    }

    /// One turn of the loop: due frames and str0m timeouts, then one wait (until the next timer,
    /// a peer's timeout or `wake_by`) and the readiness it reports.
    fn turn(&mut self, wake_by: Instant) -> anyhow::Result<()> {
        self.fire_timers();
        let mut next = wake_by;
        if let Some(Reverse((at, ..))) = self.timers.peek() {
            next = next.min(*at);
        }
        for call in &self.calls {
            next = next.min(call.peer.timeout);
        }
        let mut timeout = next.saturating_duration_since(Instant::now());
        if timeout < SPIN_BELOW {
            timeout = Duration::ZERO;
        }
        let mut ready = std::mem::take(&mut self.ready);
        self.epoll.wait(&mut ready, Some(timeout)).context("epoll wait")?;
        for (i, event) in ready.drain(..).enumerate() {
            let call = usize::try_from(event.token / 2).unwrap_or(usize::MAX);
            if call >= self.calls.len() {
                continue;
            }
            if event.token % 2 == 1 {
                self.peer_readable(call);
            } else {
                if event.writable {
                    let c = &mut self.calls[call].caller;
                    flush_unsent(&self.epoll, 2 * call, c).with_context(|| format!("call {call}: write"))?;
                }
                if event.readable {
                    self.caller_readable(call)?;
                }
            }
            if i % TIMER_CHECK_EVERY == TIMER_CHECK_EVERY - 1 {
                self.fire_timers();
            }
        }
        self.ready = ready;
        if let Some((i, why)) =
            self.calls.iter().enumerate().find_map(|(i, c)| c.peer.broken.as_ref().map(|w| (i, w.clone())))
        {
            bail!("call {i}'s WebRTC peer failed: {why}");
        }
        Ok(())
    }

    /// Sends every due frame and serves every expired str0m timeout.
    fn fire_timers(&mut self) {
        let now = Instant::now();
        while let Some(&Reverse((at, call, side))) = self.timers.peek() {
            if at > now {
                break;
            }
            self.timers.pop();
            match side {
                Side::Caller => self.send_caller_frame(call),
                Side::Peer => self.send_peer_frame(call),
            }
        }
        let now = Instant::now();
        for call in &mut self.calls {
            let p = &mut call.peer;
            if p.timeout <= now && p.broken.is_none() {
                if let Err(e) = p.rtc.handle_input(Input::Timeout(now)) {
                    p.broken = Some(format!("timeout: {e}"));
                    continue;
                }
                p.drain(now, self.origin, &mut self.pcm, &mut self.onsets, &mut self.uplink);
            }
        }
    }

    /// Records how late a frame due at `due` leaves now.
    fn lag(&mut self, due: Instant) {
        let behind = Instant::now().saturating_duration_since(due);
        if behind > PERIOD {
            self.late_sends += 1;
        }
        self.send_lag.record(behind);
    }

    fn due(&self, call: usize, seq: u64) -> Instant {
        let origin = self.origin.expect("frames are scheduled only after the origin is set");
        origin + self.calls[call].offset + PERIOD * u32::try_from(seq).unwrap_or(u32::MAX)
    }

    /// Sends the caller's next `media` and arms its next frame.
    fn send_caller_frame(&mut self, i: usize) {
        let seq = self.calls[i].caller.next_seq;
        let due = self.due(i, seq);
        self.lag(due);
        let c = &mut self.calls[i].caller;
        if c.closed {
            return;
        }
        let payload = if c.bursts.is_burst(seq) { &self.burst_b64 } else { &self.silence_b64 };
        let msg = format!(
            r#"{{"event":"media","sequenceNumber":"{}","media":{{"track":"inbound","chunk":"{}","timestamp":"{}","payload":"{payload}"}},"streamSid":"{}"}}"#,
            seq + 3,
            seq + 1,
            seq * 20,
            c.stream_sid
        );
        c.next_seq += 1;
        if c.codec.send_text(Utf8Bytes::from(msg)).is_ok() && transmit(&self.epoll, 2 * i, c).is_err() {
            c.closed = true;
        }
        if c.next_seq < self.frames {
            let next = self.due(i, seq + 1);
            self.timers.push(Reverse((next, i, Side::Caller)));
        }
    }

    /// Encodes and sends the agent's next Opus frame and arms its next frame.
    fn send_peer_frame(&mut self, i: usize) {
        let seq = self.calls[i].peer.next_seq;
        let due = self.due(i, seq);
        self.lag(due);
        let p = &mut self.calls[i].peer;
        let pcm = if p.bursts.is_burst(seq) { &self.burst_48k } else { &self.silence_48k };
        p.next_seq += 1;
        let mut packet = [0u8; 1500];
        let now = Instant::now();
        match (p.encoder.encode(pcm, &mut packet), p.pt) {
            (Ok(n), Some(pt)) => {
                let time = MediaTime::new(seq * FRAME_48K as u64, Frequency::FORTY_EIGHT_KHZ);
                if let Some(w) = p.rtc.writer(p.mid) {
                    if let Err(e) = w.write(pt, now, time, packet[..n].to_vec()) {
                        p.broken = Some(format!("write frame {seq}: {e}"));
                    }
                }
                p.drain(now, self.origin, &mut self.pcm, &mut self.onsets, &mut self.uplink);
            }
            (Err(e), _) => p.broken = Some(format!("encode frame {seq}: {e}")),
            (_, None) => p.broken = Some("no Opus payload type was negotiated".to_owned()),
        }
        if p.next_seq < self.frames {
            let next = self.due(i, seq + 1);
            self.timers.push(Reverse((next, i, Side::Peer)));
        }
    }

    /// Takes the datagrams waiting at peer `i`'s socket into its str0m instance.
    fn peer_readable(&mut self, i: usize) {
        let p = &mut self.calls[i].peer;
        for _ in 0..READS_PER_EVENT {
            let (n, source) = match p.socket.recv_from(&mut self.chunk) {
                Ok(x) => x,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => return,
                Err(e) => {
                    p.broken = Some(format!("receive: {e}"));
                    return;
                }
            };
            let now = Instant::now();
            // A datagram str0m cannot classify is not ours (nothing else sends here): skip it.
            let Ok(r) = Receive::new(Protocol::Udp, source, p.local, &self.chunk[..n]) else { continue };
            if let Err(e) = p.rtc.handle_input(Input::Receive(now, r)) {
                p.broken = Some(format!("input: {e}"));
                return;
            }
            p.drain(now, self.origin, &mut self.pcm, &mut self.onsets, &mut self.uplink);
        }
    }

    /// Reads what the relay sent caller `i` and handles every whole message.
    fn caller_readable(&mut self, i: usize) -> anyhow::Result<()> {
        let origin = self.origin;
        let c = &mut self.calls[i].caller;
        for _ in 0..READS_PER_EVENT {
            let n = match c.stream.read(&mut self.chunk) {
                Ok(0) => {
                    return self.caller_closed(i);
                }
                Ok(n) => n,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => break,
                Err(_) => return self.caller_closed(i),
            };
            // Every message in this read had arrived by now.
            let now = Instant::now();
            c.codec.handle_bytes(&self.chunk[..n]);
            loop {
                let text = match c.codec.poll_incoming() {
                    Ok(Some(Incoming::Text(text))) => text,
                    Ok(Some(Incoming::Binary(_))) => continue,
                    Ok(Some(Incoming::Close)) | Err(_) => {
                        let _ = transmit(&self.epoll, 2 * i, c);
                        return self.caller_closed(i);
                    }
                    Ok(None) => break,
                };
                let Ok(wire) = serde_json::from_str::<Wire<'_>>(&text) else { continue };
                let Some(payload) = wire.media.and_then(|m| m.payload).filter(|_| wire.event == Some("media")) else {
                    continue;
                };
                let mut ulaw = [0u8; 2048];
                let Ok(n) = base64::engine::general_purpose::STANDARD.decode_slice(payload, &mut ulaw) else {
                    continue;
                };
                c.messages += 1;
                c.samples += n as u64;
                let Some(origin) = origin else { continue };
                let pcm = &mut self.pcm[..n];
                g711::decode_into(&ulaw[..n], pcm);
                c.detector.push(pcm, signed_nanos(origin, now), &mut self.onsets);
                for at in self.onsets.drain(..) {
                    if let Some(latency) = c.matcher.onset(at) {
                        self.downlink.record(Duration::from_nanos(u64::try_from(latency).unwrap_or(0)));
                    }
                }
            }
            let _ = transmit(&self.epoll, 2 * i, c);
        }
        Ok(())
    }

    /// The relay closed caller `i`'s stream: a failure while the call should be running.
    fn caller_closed(&mut self, i: usize) -> anyhow::Result<()> {
        let c = &mut self.calls[i].caller;
        c.closed = true;
        let _ = self.epoll.delete(c.stream.as_raw_fd());
        bail!("the relay closed call {i}'s caller stream after {} frames", c.next_seq)
    }
}

impl Peer {
    /// A sendrecv audio peer for session `id`, published with WHIP `role=agent`; sends `sends`,
    /// listens for `hears`.
    fn publish(relay: SocketAddr, id: &str, complexity: u8, sends: Bursts, hears: Bursts) -> anyhow::Result<Self> {
        let socket = UdpSocket::bind("127.0.0.1:0").context("bind the peer's UDP socket")?;
        let local = socket.local_addr()?;
        let now = Instant::now();
        let mut rtc = Rtc::builder().clear_codecs().enable_opus(true, false).build(now);
        rtc.add_local_candidate(Candidate::host(local, Protocol::Udp).context("host candidate")?);
        let mut api = rtc.sdp_api();
        let mid = api.add_media(MediaKind::Audio, Direction::SendRecv, None, None, None);
        let (offer, pending) = api.apply().context("an SDP offer")?;
        let path = format!("/whip/{id}?role=agent");
        let (status, answer) = post_sdp(relay, &path, TOKEN, &offer.to_sdp_string())?;
        if status != 201 {
            bail!("{path}: {status} {answer}");
        }
        if !answer.lines().any(|l| l.starts_with("a=candidate:")) {
            bail!("{path}: the answer names no candidate");
        }
        let answer = SdpAnswer::from_sdp_string(&answer).context("the answer is not SDP")?;
        rtc.sdp_api().accept_answer(pending, answer).context("accept the answer")?;
        socket.set_nonblocking(true)?;
        let pt =
            rtc.writer(mid).and_then(|w| w.payload_params().find(|p| p.spec().codec == Codec::Opus).map(|p| p.pt()));
        let mut peer = Self {
            rtc,
            socket,
            local,
            mid,
            pt,
            encoder: burst::generator_encoder(complexity).map_err(|e| anyhow!("Opus encoder: {e}"))?,
            decoder: Decoder::new(SampleRate::Hz48000, Channels::Mono).map_err(|e| anyhow!("Opus decoder: {e}"))?,
            connected: false,
            timeout: now,
            next_seq: 0,
            bursts: sends,
            detector: OnsetDetector::new(48_000),
            matcher: Matcher::new(hears),
            packets: 0,
            samples: 0,
            send_drops: 0,
            decode_errors: 0,
            broken: None,
        };
        peer.drain(now, None, &mut vec![0; FRAME_48K * 6], &mut Vec::new(), &mut Recorder::new());
        Ok(peer)
    }

    /// Takes every output str0m has after an input: datagrams out, connection, media decoded and
    /// searched for onsets (once the origin is set), and the next timeout.
    fn drain(
        &mut self,
        now: Instant,
        origin: Option<Instant>,
        pcm: &mut [i16],
        onsets: &mut Vec<i64>,
        latencies: &mut Recorder,
    ) {
        for _ in 0..OUTPUTS_PER_DRAIN {
            match self.rtc.poll_output() {
                Ok(Output::Timeout(t)) => {
                    self.timeout = t;
                    return;
                }
                Err(e) => {
                    self.broken = Some(format!("poll: {e}"));
                    return;
                }
                Ok(Output::Transmit(t)) => {
                    if self.socket.send_to(&t.contents, t.destination).is_err() {
                        self.send_drops += 1;
                    }
                }
                Ok(Output::Event(Event::Connected)) => {
                    self.connected = true;
                    if self.pt.is_none() {
                        self.pt = self
                            .rtc
                            .writer(self.mid)
                            .and_then(|w| w.payload_params().find(|p| p.spec().codec == Codec::Opus).map(|p| p.pt()));
                    }
                }
                Ok(Output::Event(Event::MediaData(d))) => {
                    self.packets += 1;
                    let Ok(n) = self.decoder.decode(Some(&d.data[..]), &mut pcm[..], false) else {
                        self.decode_errors += 1;
                        continue;
                    };
                    self.samples += n as u64;
                    let Some(origin) = origin else { continue };
                    // The arrival of the datagram that completed this frame.
                    self.detector.push(&pcm[..n], signed_nanos(origin, d.network_time), onsets);
                    for at in onsets.drain(..) {
                        if let Some(latency) = self.matcher.onset(at) {
                            latencies.record(Duration::from_nanos(u64::try_from(latency).unwrap_or(0)));
                        }
                    }
                }
                Ok(Output::Event(_)) => {}
            }
        }
        self.broken = Some(format!("more than {OUTPUTS_PER_DRAIN} outputs after one input at {now:?}"));
    }
}

/// Nanoseconds from `origin` to `t` (negative before it).
fn signed_nanos(origin: Instant, t: Instant) -> i64 {
    match t.checked_duration_since(origin) {
        Some(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
        None => -i64::try_from(origin.duration_since(t).as_nanos()).unwrap_or(i64::MAX),
    }
}

/// Opens `/twilio/stream` (blocking, with timeouts), says `connected` and `start` for session
/// `id`, and returns the stream non-blocking with its codec.
fn open_caller(relay: SocketAddr, id: &str, stream_sid: &str) -> anyhow::Result<(TcpStream, Box<WsCodec>)> {
    let mut stream = TcpStream::connect_timeout(&relay, REQUEST_TIMEOUT).context("connect /twilio/stream")?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    let mut nonce = [0u8; 16];
    nonce[..4].copy_from_slice(&std::process::id().to_le_bytes());
    nonce[4..4 + id.len().min(12)].copy_from_slice(&id.as_bytes()[id.len().saturating_sub(12)..]);
    let key = base64::engine::general_purpose::STANDARD.encode(nonce);
    write!(
        stream,
        "GET /twilio/stream HTTP/1.1\r\nHost: {relay}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )?;
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    let head_len = loop {
        if head.len() > 16 * 1024 {
            bail!("/twilio/stream: the upgrade answer is too long");
        }
        let n = stream.read(&mut buf).context("read the upgrade answer")?;
        if n == 0 {
            bail!("/twilio/stream: closed during the upgrade");
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(len) = check_answer(&head, &key).map_err(|e| anyhow!("/twilio/stream upgrade: {e}"))? {
            break len;
        }
    };
    let mut codec = Box::new(WsCodec::new_client(&Limits::default(), &head[head_len..]));
    let start = format!(
        r#"{{"event":"start","sequenceNumber":"2","start":{{"accountSid":"ACbench","streamSid":"{stream_sid}","callSid":"{id}","tracks":["inbound"],"customParameters":{{"callSid":"{id}"}},"mediaFormat":{{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1}}}},"streamSid":"{stream_sid}"}}"#
    );
    let connected = r#"{"event":"connected","protocol":"Call","version":"1.0.0"}"#;
    codec.send_text(Utf8Bytes::from_static(connected)).map_err(|e| anyhow!("{e}"))?;
    codec.send_text(Utf8Bytes::from(start)).map_err(|e| anyhow!("{e}"))?;
    if let Some(bytes) = codec.poll_transmit() {
        stream.write_all(&bytes).context("send connected and start")?;
    }
    stream.set_nonblocking(true)?;
    Ok((stream, codec))
}

/// Sends what caller `c`'s codec has queued (token `token`).
fn transmit(epoll: &Epoll, token: usize, c: &mut Caller) -> io::Result<()> {
    match c.codec.poll_transmit() {
        Some(bytes) => epoll::send_or_queue(epoll, token as u64, &mut c.stream, &mut c.unsent, &bytes),
        None => Ok(()),
    }
}

/// Writes what caller `c`'s socket pushed back earlier; stops watching for room once it is out.
fn flush_unsent(epoll: &Epoll, token: usize, c: &mut Caller) -> io::Result<()> {
    epoll::flush_unsent(epoll, token as u64, &mut c.stream, &mut c.unsent)
}

/// `POST path` with an SDP body and a bearer token (blocking, with timeouts); the status and body.
fn post_sdp(relay: SocketAddr, path: &str, token: &str, sdp: &str) -> anyhow::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&relay, REQUEST_TIMEOUT).with_context(|| format!("connect {path}"))?;
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    stream.set_nodelay(true)?;
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: {relay}\r\nContent-Type: application/sdp\r\nAuthorization: Bearer {token}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{sdp}",
        sdp.len()
    )?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let status: u16 =
        line.split(' ').nth(1).and_then(|s| s.parse().ok()).with_context(|| format!("{path}: bad status line"))?;
    let mut length = 0usize;
    for _ in 0..128 {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            bail!("{path}: closed in the headers");
        }
        let l = line.trim_end();
        if l.is_empty() {
            let mut body = vec![0; length.min(1 << 20)];
            reader.read_exact(&mut body)?;
            return Ok((status, String::from_utf8_lossy(&body).into_owned()));
        }
        if let Some((k, v)) = l.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse().with_context(|| format!("{path}: content-length"))?;
            }
        }
    }
    bail!("{path}: too many headers")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Times before the origin come out negative, after it positive.
    #[test]
    fn signed_times() {
        let origin = Instant::now() + Duration::from_millis(5);
        assert!(signed_nanos(origin, origin - Duration::from_millis(1)) == -1_000_000);
        assert_eq!(signed_nanos(origin, origin + Duration::from_micros(3)), 3000);
    }
}
