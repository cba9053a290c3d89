//! The telephony scenario: N Twilio-protocol callers stream 20 ms μ-law frames open loop (each
//! frame sent at its scheduled instant, whatever happened before) through the relay to a
//! Twilio-protocol bot that echoes every frame back. Each frame's first bytes carry its call and
//! sequence number, so the receiver reads back exactly which frame arrived when.
//!
//! Invariant: latency is measured from each frame's *scheduled* send time (no coordinated
//! omission); every loop is bounded by the run's duration.

use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use base64::Engine as _;
use serde_json::{json, Value};
use tungstenite::{Message, WebSocket};

use crate::stats::Recorder;

/// Samples (bytes of μ-law) per 20 ms frame.
const FRAME: usize = 160;
/// Frame period.
const PERIOD: Duration = Duration::from_millis(20);

/// What one run measured.
pub struct Report {
    /// Caller → bot one-way latency per frame.
    pub uplink: Recorder,
    /// Bot → caller one-way latency per frame (the echo, through the relay's pacer).
    pub downlink: Recorder,
    /// Caller → frontend latency of `inbound` audio, over every frontend.
    pub fanout: Recorder,
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
    /// Frames whose sender fell behind its schedule by more than one period (generator saturated).
    pub late_sends: u64,
    /// When the steady state began and ended (every call streaming).
    pub steady: (Instant, Instant),
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
    seen: HashMap<u64, (u64, std::collections::HashSet<u64>)>,
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

/// Runs the scenario against `relay` (`None`: the callers talk to the bot directly, the no-relay
/// floor).
///
/// # Errors
/// When a connection fails.
pub fn run(relay: Option<SocketAddr>, opts: Options) -> anyhow::Result<Report> {
    let bot = TcpListener::bind("127.0.0.1:0").context("bind the bot")?;
    let bot_addr = bot.local_addr()?;
    let frames = opts.seconds * 1000 / 20;
    let lead_in = Duration::from_millis(500 + 5 * u64::from(opts.calls * (1 + opts.frontends)));
    let schedule = Schedule { origin: Instant::now() + lead_in, calls: opts.calls, aligned: opts.aligned };
    let uplink = Arc::new(Mutex::new(Tally::default()));
    let downlink = Arc::new(Mutex::new(Tally::default()));
    let fanout = Arc::new(Mutex::new(Tally::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let late_after = opts.late_after;

    // The bot: one thread per accepted stream, echoing every media frame at once.
    let (bot_up, bot_stop) = (uplink.clone(), stop.clone());
    let bot_thread = std::thread::spawn(move || {
        bot.set_nonblocking(true).ok();
        let mut handlers = Vec::new();
        while !bot_stop.load(Ordering::Relaxed) {
            match bot.accept() {
                Ok((stream, _)) => {
                    stream.set_nonblocking(false).ok();
                    let (up, stop) = (bot_up.clone(), bot_stop.clone());
                    handlers.push(std::thread::spawn(move || bot_connection(stream, schedule, &up, &stop, late_after)));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(2)),
                Err(_) => break,
            }
        }
        for h in handlers {
            let _ = h.join();
        }
    });

    let mut listeners = Vec::new();
    if let Some(target) = relay {
        for call in 0..opts.calls {
            for k in 0..opts.frontends {
                let (fan, stop) = (fanout.clone(), stop.clone());
                listeners.push(std::thread::spawn(move || {
                    frontend(target, call, k, frames, schedule, &fan, &stop, late_after)
                }));
            }
        }
    }
    let late = Arc::new(Mutex::new(0u64));
    let mut callers = Vec::new();
    for call in 0..opts.calls {
        let target = relay.unwrap_or(bot_addr);
        let (down, late, stop) = (downlink.clone(), late.clone(), stop.clone());
        let agent = format!("ws://{bot_addr}/bot");
        callers.push(std::thread::spawn(move || {
            caller(target, relay.is_some(), &agent, call, frames, schedule, &down, &late, &stop, late_after)
        }));
    }
    let mut failures = Vec::new();
    for c in callers {
        match c.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failures.push(e.to_string()),
            Err(_) => failures.push("caller thread panicked".to_owned()),
        }
    }
    stop.store(true, Ordering::Relaxed);
    for l in listeners {
        if let Ok(Err(e)) = l.join() {
            failures.push(format!("frontend: {e}"));
        }
    }
    let _ = bot_thread.join();
    if let Some(first) = failures.first() {
        bail!("{} connections failed; first: {first}", failures.len());
    }
    let up = std::mem::take(&mut *uplink.lock().expect("no panics hold the lock"));
    let down = std::mem::take(&mut *downlink.lock().expect("no panics hold the lock"));
    let fan = std::mem::take(&mut *fanout.lock().expect("no panics hold the lock"));
    let late_sends = *late.lock().expect("no panics hold the lock");
    // Steady state: from the last call's first frame to the first call's last frame.
    let steady = (schedule.due(opts.calls.saturating_sub(1), 0) + Duration::from_millis(500), schedule.due(0, frames));
    Ok(Report {
        sent: u64::from(opts.calls) * frames,
        received_by_bot: up.received,
        received_by_callers: down.received,
        received_by_frontends: fan.received,
        frontends: if relay.is_some() { u64::from(opts.calls * opts.frontends) } else { 0 },
        duplicates: up.duplicates + down.duplicates + fan.duplicates,
        reordered: up.reordered + down.reordered + fan.reordered,
        late: up.late + down.late + fan.late,
        uplink: up.latencies,
        downlink: down.latencies,
        fanout: fan.latencies,
        late_sends,
        steady,
    })
}

/// A `/frontend-stream` listener of `call`: records when each of the caller's frames arrives.
#[allow(clippy::too_many_arguments)] // A thread entry point; grouping would only rename these.
fn frontend(
    target: SocketAddr,
    call: u32,
    k: u32,
    frames: u64,
    schedule: Schedule,
    fanout: &Mutex<Tally>,
    stop: &AtomicBool,
    late_after: Duration,
) -> anyhow::Result<()> {
    let call_sid = format!("CAbench{call:08}");
    let stream = TcpStream::connect(target).with_context(|| format!("connect {target}"))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_millis(200)))?;
    let url = format!("ws://{target}/frontend-stream?callSid={call_sid}&user_id=bench-{call}-{k}");
    let (mut ws, _) = tungstenite::client(url, stream).map_err(|e| anyhow::anyhow!("frontend handshake: {e}"))?;
    ws.send(Message::text(
        json!({"event":"connect-twilio","callSid":call_sid,"user_id":format!("bench-{call}-{k}")}).to_string(),
    ))?;
    let deadline = schedule.due(call, frames) + Duration::from_secs(2);
    let stream_id = (u64::from(call) << 32) | u64::from(k);
    let b64 = base64::engine::general_purpose::STANDARD;
    while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
        match ws.read() {
            Ok(Message::Text(text)) => {
                let now = Instant::now();
                let Ok(v) = serde_json::from_str::<Value>(&text) else { continue };
                if v["event"] != "audio" || v["track"] != "inbound" {
                    continue;
                }
                let Some(bytes) = v["payload"].as_str().and_then(|p| b64.decode(p).ok()) else { continue };
                if let Some((c, seq)) = frame_id(&bytes) {
                    let latency = now.saturating_duration_since(schedule.due(c, seq));
                    fanout.lock().expect("no panics hold the lock").record(stream_id, seq, latency, late_after);
                }
            }
            Ok(_) => {}
            Err(tungstenite::Error::Io(e)) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
    Ok(())
}

/// One caller: Twilio's opening messages, then `frames` media frames on schedule, then `stop`;
/// a second thread reads what comes back.
#[allow(clippy::too_many_arguments)] // A thread entry point; grouping would only rename these.
fn caller(
    target: SocketAddr,
    via_relay: bool,
    agent_url: &str,
    call: u32,
    frames: u64,
    schedule: Schedule,
    down: &Mutex<Tally>,
    late: &Mutex<u64>,
    stop: &AtomicBool,
    late_after: Duration,
) -> anyhow::Result<()> {
    let stream = TcpStream::connect(target).with_context(|| format!("connect {target}"))?;
    stream.set_nodelay(true)?;
    let path = if via_relay { "/twilio/stream" } else { "/bot" };
    let (mut ws, _) = tungstenite::client(format!("ws://{target}{path}"), stream.try_clone()?)
        .map_err(|e| anyhow::anyhow!("handshake: {e}"))?;
    let call_sid = format!("CAbench{call:08}");
    let stream_sid = format!("MZbench{call:08}");
    ws.send(Message::text(json!({"event":"connected","protocol":"Call","version":"1.0.0"}).to_string()))?;
    let start = json!({"event":"start","sequenceNumber":"1","streamSid":stream_sid,"start":{
        "accountSid":"ACbench","streamSid":stream_sid,"callSid":call_sid,"tracks":["inbound"],
        "customParameters":{"callSid":call_sid,"agentUrl":agent_url},
        "mediaFormat":{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1}}});
    ws.send(Message::text(start.to_string()))?;
    // Reading happens on a clone of the socket with its own codec: the server's frames are never
    // masked and the reader never writes, so the two halves do not interfere.
    let reader_stream = stream.try_clone()?;
    reader_stream.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut reader = WebSocket::from_raw_socket(reader_stream, tungstenite::protocol::Role::Client, None);
    std::thread::scope(|scope| -> anyhow::Result<()> {
        scope.spawn(|| read_echoes(&mut reader, schedule, down, stop, frames, call, late_after));
        let b64 = base64::engine::general_purpose::STANDARD;
        for seq in 0..frames {
            let due = schedule.due(call, seq);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            } else if now - due > PERIOD {
                *late.lock().expect("no panics hold the lock") += 1;
            }
            let payload = b64.encode(frame_bytes(call, seq));
            let msg = json!({"event":"media","sequenceNumber":(seq + 2).to_string(),"streamSid":stream_sid,
                "media":{"track":"inbound","chunk":(seq + 1).to_string(),"timestamp":(seq * 20).to_string(),"payload":payload}});
            ws.send(Message::text(msg.to_string()))?;
        }
        // Let the last echoes arrive, then hang up as Twilio does.
        std::thread::sleep(Duration::from_millis(500));
        let stop_msg = json!({"event":"stop","sequenceNumber":(frames + 2).to_string(),"streamSid":stream_sid,
            "stop":{"accountSid":"ACbench","callSid":call_sid}});
        let _ = ws.send(Message::text(stop_msg.to_string()));
        Ok(())
    })?;
    let _ = ws.close(None);
    Ok(())
}

fn read_echoes(
    ws: &mut WebSocket<TcpStream>,
    schedule: Schedule,
    down: &Mutex<Tally>,
    stop: &AtomicBool,
    frames: u64,
    call: u32,
    late_after: Duration,
) {
    let deadline = schedule.due(call, frames) + Duration::from_secs(2);
    while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
        match ws.read() {
            Ok(Message::Text(text)) => {
                let now = Instant::now();
                let Ok(v) = serde_json::from_str::<Value>(&text) else { continue };
                if v["event"] != "media" {
                    continue;
                }
                let Some(bytes) = v["media"]["payload"]
                    .as_str()
                    .and_then(|p| base64::engine::general_purpose::STANDARD.decode(p).ok())
                else {
                    continue;
                };
                if let Some((c, seq)) = frame_id(&bytes) {
                    // The bot echoes at once, so the frame left the bot about when it reached it;
                    // the round trip minus the uplink is not knowable here, so the downlink is
                    // measured from the bot's echo time carried in bytes 12..20.
                    let sent_at = u64::from_le_bytes(bytes[12..20].try_into().unwrap_or_default());
                    let latency = Duration::from_nanos(elapsed_nanos(schedule.origin, now).saturating_sub(sent_at));
                    down.lock().expect("no panics hold the lock").record(u64::from(c), seq, latency, late_after);
                }
            }
            Ok(_) => {}
            Err(tungstenite::Error::Io(e)) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
}

fn elapsed_nanos(origin: Instant, now: Instant) -> u64 {
    u64::try_from(now.saturating_duration_since(origin).as_nanos()).unwrap_or(u64::MAX)
}

/// The bot side of one stream: records each frame's arrival against its schedule and echoes it
/// with its own send time stamped into bytes 12..20.
fn bot_connection(stream: TcpStream, schedule: Schedule, up: &Mutex<Tally>, stop: &AtomicBool, late_after: Duration) {
    stream.set_nodelay(true).ok();
    stream.set_read_timeout(Some(Duration::from_millis(200))).ok();
    let Ok(mut ws) = tungstenite::accept(stream) else { return };
    let mut stream_sid = String::new();
    let b64 = base64::engine::general_purpose::STANDARD;
    while !stop.load(Ordering::Relaxed) {
        match ws.read() {
            Ok(Message::Text(text)) => {
                let now = Instant::now();
                let Ok(v) = serde_json::from_str::<Value>(&text) else { continue };
                match v["event"].as_str() {
                    Some("start") => stream_sid = v["start"]["streamSid"].as_str().unwrap_or_default().to_owned(),
                    Some("media") => {
                        let Some(mut bytes) = v["media"]["payload"].as_str().and_then(|p| b64.decode(p).ok()) else {
                            continue;
                        };
                        let Some((call, seq)) = frame_id(&bytes) else { continue };
                        let latency = now.saturating_duration_since(schedule.due(call, seq));
                        up.lock().expect("no panics hold the lock").record(u64::from(call), seq, latency, late_after);
                        if bytes.len() >= 20 {
                            bytes[12..20]
                                .copy_from_slice(&elapsed_nanos(schedule.origin, Instant::now()).to_le_bytes());
                        }
                        let echo =
                            json!({"event":"media","streamSid":stream_sid,"media":{"payload":b64.encode(&bytes)}});
                        if ws.send(Message::text(echo.to_string())).is_err() {
                            return;
                        }
                    }
                    Some("stop") => return,
                    _ => {}
                }
            }
            Ok(_) => {}
            Err(tungstenite::Error::Io(e)) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}

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
        assert_eq!((t.received, t.duplicates, t.reordered, t.late), (5, 1, 1, 1));
        assert_eq!(t.latencies.summary().count, 5, "every received frame has one latency");
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
}
