//! The threaded generator (`--threads`): a thread per socket — caller writer, caller reader, bot
//! connection, frontend — with blocking tungstenite sockets. Simple, but one CPU saturates at
//! ~150 calls, from context switches; kept to compare against the event loop.
//!
//! Invariant: every thread ends by the run's deadline (read timeouts plus a stop flag).

use std::io::ErrorKind;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tungstenite::{Message, WebSocket};

use super::{
    caller_path, connect_twilio_msg, echo_msg, echo_stamp, elapsed_nanos, frame_id, frames, frontend_path,
    frontend_stream, lead_in, media_msg, parse, report, start_msg, steady, stop_msg, stream_sid, Options, Received,
    Report, Schedule, Tally, CONNECTED, DECODE_BYTES, DRAIN, HANG_UP_AFTER, PERIOD,
};
use crate::stats::Recorder;

/// What the callers' sending threads add up: frames sent late, and every frame's send lag.
#[derive(Default)]
struct Sends {
    late: u64,
    lag: Recorder,
}

/// Runs the scenario with a thread per socket.
pub(super) fn run(relay: Option<SocketAddr>, opts: Options) -> anyhow::Result<Report> {
    let bot = TcpListener::bind((opts.bot_ip, 0)).context("bind the bot")?;
    let bot_addr = bot.local_addr()?;
    let frames = frames(&opts);
    let schedule = Schedule { origin: Instant::now() + lead_in(&opts), calls: opts.calls, aligned: opts.aligned };
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
    let sends = Arc::new(Mutex::new(Sends::default()));
    let mut callers = Vec::new();
    for call in 0..opts.calls {
        let target = relay.unwrap_or(bot_addr);
        let (down, sends, stop) = (downlink.clone(), sends.clone(), stop.clone());
        let agent = format!("ws://{bot_addr}/bot");
        let path = caller_path(call, relay.is_some(), opts.keyed_path);
        callers.push(std::thread::spawn(move || {
            caller(target, &path, &agent, call, frames, schedule, &down, &sends, &stop, late_after)
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
    let take = |t: &Mutex<Tally>| std::mem::take(&mut *t.lock().expect("no panics hold the lock"));
    let sends = std::mem::take(&mut *sends.lock().expect("no panics hold the lock"));
    Ok(report(
        &opts,
        relay.is_some(),
        frames,
        take(&uplink),
        take(&downlink),
        take(&fanout),
        sends.lag,
        sends.late,
        steady(&schedule, frames),
    ))
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
    let stream = TcpStream::connect(target).with_context(|| format!("connect {target}"))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_millis(200)))?;
    let url = format!("ws://{target}{}", frontend_path(call, k));
    let (mut ws, _) = tungstenite::client(url, stream).map_err(|e| anyhow::anyhow!("frontend handshake: {e}"))?;
    ws.send(Message::text(connect_twilio_msg(call, k)))?;
    read_frames(&mut ws, schedule.due(call, frames) + DRAIN, stop, |_, c, seq, now| {
        let latency = now.saturating_duration_since(schedule.due(c, seq));
        let mut fanout = fanout.lock().expect("no panics hold the lock");
        fanout.record(frontend_stream(call, k), seq, latency, late_after);
    });
    Ok(())
}

/// One caller: Twilio's opening messages, then `frames` media frames on schedule, then `stop`;
/// a second thread reads what comes back.
#[allow(clippy::too_many_arguments)] // A thread entry point; grouping would only rename these.
fn caller(
    target: SocketAddr,
    path: &str,
    agent_url: &str,
    call: u32,
    frames: u64,
    schedule: Schedule,
    down: &Mutex<Tally>,
    sends: &Mutex<Sends>,
    stop: &AtomicBool,
    late_after: Duration,
) -> anyhow::Result<()> {
    let stream = TcpStream::connect(target).with_context(|| format!("connect {target}"))?;
    stream.set_nodelay(true)?;
    let (mut ws, _) = tungstenite::client(format!("ws://{target}{path}"), stream.try_clone()?)
        .map_err(|e| anyhow::anyhow!("handshake: {e}"))?;
    let stream_sid = stream_sid(call);
    ws.send(Message::text(CONNECTED))?;
    ws.send(Message::text(start_msg(call, agent_url)))?;
    // Reading happens on a clone of the socket with its own codec: the server's frames are never
    // masked and the reader never writes, so the two halves do not interfere.
    let reader_stream = stream.try_clone()?;
    reader_stream.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut reader = WebSocket::from_raw_socket(reader_stream, tungstenite::protocol::Role::Client, None);
    std::thread::scope(|scope| -> anyhow::Result<()> {
        scope.spawn(|| read_echoes(&mut reader, schedule, down, stop, frames, call, late_after));
        let mut mine = Sends::default();
        for seq in 0..frames {
            let due = schedule.due(call, seq);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            // Lateness is judged when the frame actually leaves, after any oversleep.
            let lag = Instant::now().saturating_duration_since(due);
            if lag > PERIOD {
                mine.late += 1;
            }
            mine.lag.record(lag);
            ws.send(Message::text(media_msg(call, seq, &stream_sid)))?;
        }
        {
            let mut sends = sends.lock().expect("no panics hold the lock");
            sends.late += mine.late;
            sends.lag.merge(&mine.lag);
        }
        // Let the last echoes arrive, then hang up as Twilio does.
        std::thread::sleep(HANG_UP_AFTER);
        let _ = ws.send(Message::text(stop_msg(call, frames)));
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
    read_frames(ws, schedule.due(call, frames) + DRAIN, stop, |bytes, c, seq, now| {
        // The downlink is measured from the bot's echo time carried in bytes 12..20.
        let sent_at = echo_stamp(bytes);
        let latency = Duration::from_nanos(elapsed_nanos(schedule.origin, now).saturating_sub(sent_at));
        down.lock().expect("no panics hold the lock").record(u64::from(c), seq, latency, late_after);
    });
}

/// Reads media frames until `deadline`, `stop` or the socket ends, calling `on_frame` with each
/// frame's audio bytes, the call and sequence in them, and the arrival time.
fn read_frames(
    ws: &mut WebSocket<TcpStream>,
    deadline: Instant,
    stop: &AtomicBool,
    mut on_frame: impl FnMut(&[u8], u32, u64, Instant),
) {
    let mut buf = [0u8; DECODE_BYTES];
    while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
        match ws.read() {
            Ok(Message::Text(text)) => {
                let now = Instant::now();
                if let Received::Frame(bytes) = parse(&text, &mut buf) {
                    if let Some((c, seq)) = frame_id(bytes) {
                        on_frame(bytes, c, seq, now);
                    }
                }
            }
            Ok(_) => {}
            Err(tungstenite::Error::Io(e)) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
}

/// The bot side of one stream: records each frame's arrival against its schedule and echoes it
/// with its own send time stamped into bytes 12..20.
fn bot_connection(stream: TcpStream, schedule: Schedule, up: &Mutex<Tally>, stop: &AtomicBool, late_after: Duration) {
    stream.set_nodelay(true).ok();
    stream.set_read_timeout(Some(Duration::from_millis(200))).ok();
    let Ok(mut ws) = tungstenite::accept(stream) else { return };
    let mut stream_sid = String::new();
    let mut buf = [0u8; DECODE_BYTES];
    while !stop.load(Ordering::Relaxed) {
        match ws.read() {
            Ok(Message::Text(text)) => {
                let now = Instant::now();
                match parse(&text, &mut buf) {
                    Received::Start(sid) => stream_sid = sid,
                    Received::Frame(bytes) => {
                        let Some((call, seq)) = frame_id(bytes) else { continue };
                        let latency = now.saturating_duration_since(schedule.due(call, seq));
                        up.lock().expect("no panics hold the lock").record(u64::from(call), seq, latency, late_after);
                        if bytes.len() >= 20 {
                            bytes[12..20]
                                .copy_from_slice(&elapsed_nanos(schedule.origin, Instant::now()).to_le_bytes());
                        }
                        if ws.send(Message::text(echo_msg(&stream_sid, bytes))).is_err() {
                            return;
                        }
                    }
                    Received::Stop => return,
                    Received::Other => {}
                }
            }
            Ok(_) => {}
            Err(tungstenite::Error::Io(e)) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}
