//! `relay-bench`: load scenarios against Relay or any server with the same API.
//!
//! Invariant: every loop is bounded in count and time; traffic goes only to loopback or the URL
//! given.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use relay_bench::client::Conn;
use relay_bench::stats::Summary;
use relay_bench::target::Target;
use serde_json::json;

#[derive(Parser)]
#[command(name = "relay-bench", about = "Load scenarios and latency measurement for Relay")]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Control-plane throughput: C clients on keep-alive connections start then stop N sessions.
    Control {
        /// Start this relay binary on a free loopback port (instead of --url).
        #[arg(long)]
        spawn: Option<String>,
        /// An already running server, `http://127.0.0.1:8080`.
        #[arg(long)]
        url: Option<String>,
        /// Cores for a spawned relay.
        #[arg(long, default_value_t = 2)]
        cores: usize,
        /// Sessions to start and stop in all.
        #[arg(long, default_value_t = 10_000)]
        sessions: usize,
        /// Concurrent clients (threads, one connection each).
        #[arg(long, default_value_t = 8)]
        clients: usize,
        /// Where to write the JSON result.
        #[arg(long)]
        json: Option<String>,
    },
    /// Twilio-protocol calls through the relay to an echoing bot: per-frame one-way latency, loss,
    /// duplication and reordering, each way.
    Telephony {
        /// Start this relay binary on a free loopback port (instead of --url).
        #[arg(long)]
        spawn: Option<String>,
        /// An already running relay started with `--agent-allow 127.0.0.1`.
        #[arg(long)]
        url: Option<String>,
        /// No relay: callers talk to the bot directly (the loopback floor).
        #[arg(long)]
        direct: bool,
        /// Cores for a spawned relay.
        #[arg(long, default_value_t = 2)]
        cores: usize,
        /// Concurrent calls.
        #[arg(long, default_value_t = 20)]
        calls: u32,
        /// Seconds of audio per call.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Start every call's frames at the same instant (worst case) instead of staggering them.
        #[arg(long)]
        aligned: bool,
        /// Where to write the JSON result.
        #[arg(long)]
        json: Option<String>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().scenario {
        Scenario::Telephony { spawn, url, direct, cores, calls, seconds, aligned, json } => {
            let target = match (spawn, url, direct) {
                (Some(bin), None, false) => {
                    Some(Target::spawn(&bin, cores, &["--agent-allow".into(), "127.0.0.1".into()])?)
                }
                (None, Some(url), false) => Some(Target::url(&url)?),
                (None, None, true) => None,
                _ => bail!("give exactly one of --spawn, --url or --direct"),
            };
            telephony(target.as_ref(), calls, seconds, aligned, json.as_deref())
        }
        Scenario::Control { spawn, url, cores, sessions, clients, json } => {
            let target = match (spawn, url) {
                (Some(bin), None) => Target::spawn(&bin, cores, &[])?,
                (None, Some(url)) => Target::url(&url)?,
                _ => bail!("give exactly one of --spawn or --url"),
            };
            control(&target, sessions, clients.max(1), json.as_deref())
        }
    }
}

/// Runs the control scenario; fails when any request fails or the relay's count is off afterwards.
fn control(target: &Target, sessions: usize, clients: usize, json_path: Option<&str>) -> anyhow::Result<()> {
    let run = format!("b{}", std::process::id());
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..clients)
        .map(|_| {
            let (next, run, addr) = (next.clone(), run.clone(), target.addr);
            std::thread::spawn(move || -> anyhow::Result<(Vec<Duration>, Vec<Duration>)> {
                let mut conn = Conn::connect(addr)?;
                let (mut starts, mut stops) = (Vec::new(), Vec::new());
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= sessions {
                        break;
                    }
                    let id = format!("{run}-{i}");
                    let body = format!(r#"{{"sessionId":"{id}","accessToken":"t"}}"#);
                    starts.push(timed(|| expect(conn.request("POST", "/start-call", Some(&body)), 200))?);
                    let body = format!(r#"{{"sessionId":"{id}"}}"#);
                    stops.push(timed(|| expect(conn.request("POST", "/stop-call", Some(&body)), 200))?);
                }
                Ok((starts, stops))
            })
        })
        .collect();
    let (mut starts, mut stops) = (Vec::new(), Vec::new());
    for w in workers {
        let (a, b) = w.join().map_err(|_| anyhow::anyhow!("client thread panicked"))??;
        starts.extend(a);
        stops.extend(b);
    }
    let elapsed = started.elapsed();
    let mut conn = Conn::connect(target.addr)?;
    let health: serde_json::Value = serde_json::from_slice(&expect(conn.request("GET", "/health", None), 200)?.body)?;
    let active = health["activeSessions"].as_u64().context("activeSessions")?;
    let (start, stop) = (Summary::of(&mut starts), Summary::of(&mut stops));
    let ops = (start.count + stop.count) as f64 / elapsed.as_secs_f64();
    println!("control scenario: {sessions} sessions, {clients} clients, {:.2} s", elapsed.as_secs_f64());
    println!(
        "{:<12} {:>8} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "op", "count", "p50 µs", "p90 µs", "p99 µs", "p99.9 µs", "max µs"
    );
    for (name, s) in [("start-call", &start), ("stop-call", &stop)] {
        println!(
            "{name:<12} {:>8} {:>10.0} {:>10.0} {:>10.0} {:>10.0} {:>10.0}",
            s.count, s.p50_us, s.p90_us, s.p99_us, s.p999_us, s.max_us
        );
    }
    println!("throughput: {ops:.0} requests/s; sessions active afterwards: {active}");
    if let Some(path) = json_path {
        let doc = json!({
            "scenario": "control", "sessions": sessions, "clients": clients, "seconds": elapsed.as_secs_f64(),
            "requests_per_second": ops, "start_call": start.to_json(), "stop_call": stop.to_json(),
            "active_after": active, "relay_pid": target.pid(),
        });
        std::fs::write(path, serde_json::to_vec_pretty(&doc)?).with_context(|| format!("write {path}"))?;
    }
    if start.count != sessions || stop.count != sessions {
        bail!("counted {} starts and {} stops for {sessions} sessions", start.count, stop.count);
    }
    if active != 0 {
        bail!("the server reports {active} active sessions after every session was stopped");
    }
    Ok(())
}

/// Runs the telephony scenario; fails unless every frame arrived exactly once each way.
fn telephony(
    target: Option<&Target>,
    calls: u32,
    seconds: u64,
    aligned: bool,
    json_path: Option<&str>,
) -> anyhow::Result<()> {
    let r = relay_bench::telephony::run(target.map(|t| t.addr), calls, seconds, aligned)?;
    let via = if target.is_some() { "through the relay" } else { "direct (no relay)" };
    println!("telephony scenario {via}: {calls} calls × {seconds} s, {} frames each way", r.sent);
    println!(
        "{:<10} {:>8} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "path", "frames", "p50 µs", "p90 µs", "p99 µs", "p99.9 µs", "max µs"
    );
    for (name, s) in [("uplink", &r.uplink), ("downlink", &r.downlink)] {
        println!(
            "{name:<10} {:>8} {:>10.0} {:>10.0} {:>10.0} {:>10.0} {:>10.0}",
            s.count, s.p50_us, s.p90_us, s.p99_us, s.p999_us, s.max_us
        );
    }
    println!(
        "lost up {} down {}, duplicates {}, reordered {}, late sends {}",
        r.sent - r.received_by_bot,
        r.sent - r.received_by_callers,
        r.duplicates,
        r.reordered,
        r.late_sends
    );
    if r.late_sends > 0 {
        println!("WARNING: the generator fell behind its schedule {} times; this run is invalid", r.late_sends);
    }
    if let Some(path) = json_path {
        let doc = json!({
            "scenario": "telephony", "via_relay": target.is_some(), "calls": calls, "seconds": seconds, "aligned": aligned,
            "frames_each_way": r.sent, "uplink": r.uplink.to_json(), "downlink": r.downlink.to_json(),
            "lost_up": r.sent - r.received_by_bot, "lost_down": r.sent - r.received_by_callers,
            "duplicates": r.duplicates, "reordered": r.reordered, "late_sends": r.late_sends,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&doc)?).with_context(|| format!("write {path}"))?;
    }
    if r.received_by_bot != r.sent || r.received_by_callers != r.sent || r.duplicates > 0 || r.reordered > 0 {
        bail!("frames were lost, duplicated or reordered");
    }
    Ok(())
}

fn timed(f: impl FnOnce() -> anyhow::Result<relay_bench::client::Response>) -> anyhow::Result<Duration> {
    let t = Instant::now();
    f()?;
    Ok(t.elapsed())
}

fn expect(
    r: anyhow::Result<relay_bench::client::Response>,
    status: u16,
) -> anyhow::Result<relay_bench::client::Response> {
    let r = r?;
    if r.status != status {
        bail!("expected {status}, got {}: {}", r.status, String::from_utf8_lossy(&r.body));
    }
    Ok(r)
}
