//! Operational endpoints: `/health` (every seed's shape at once), `/health/detailed`, the
//! balancer's `/health/ready`, and drain (`/admin/drain`, `/admin/undrain`).
//!
//! Invariant: never exposes a secret; reads only counters and the data directory. Readiness never
//! depends on the records database: a database down for every node must not take every node out
//! of the balancer at once.

use std::sync::atomic::Ordering;
use std::time::SystemTime;

use bytes::Bytes;
use http::{Response, StatusCode};
use relay_engine::shell::{CoreHandle, CoreStats};
use serde_json::{json, Value};

use crate::error::json_response;
use crate::probe::DataDirHealth;
use crate::records::StoreStats;

/// The crate version reported by `/health`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// `GET /health`: the superset of seeds 000/001 and 003.
pub fn health(core: &CoreHandle) -> Response<Bytes> {
    let active: usize = core.stats().iter().map(|s| s.sessions).sum();
    json_response(
        StatusCode::OK,
        &json!({
            "success": true,
            "message": "Relay is running",
            "status": "ok",
            "timestamp": timestamp(),
            "uptime": core.uptime().as_secs(),
            "activeSessions": active,
            "node": core.node_id(),
            "data": { "activeSessions": active, "version": VERSION, "node": core.node_id() },
        }),
    )
}

/// `GET /health/ready`: 200 while the node takes new calls; 404 while it drains (HAProxy's
/// `http-check disable-on-404` then sends it no new call but keeps its live ones); 503 when it
/// cannot serve calls (a core stalled or gone, or shutting down).
pub fn ready(core: &CoreHandle) -> Response<Bytes> {
    let active: usize = core.stats().iter().map(|s| s.sessions).sum();
    let stalled: Vec<usize> = core.stalled_cores().into_iter().map(|c| c.0).collect();
    let (status, body) = if core.shutting_down() || !stalled.is_empty() {
        let reason = if stalled.is_empty() { "shutting down" } else { "a core is not serving" };
        (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({ "status": "unavailable", "node": core.node_id(), "reason": reason, "stalledCores": stalled,
                    "activeSessions": active }),
        )
    } else if core.draining() {
        (StatusCode::NOT_FOUND, json!({ "status": "draining", "node": core.node_id(), "activeSessions": active }))
    } else {
        (StatusCode::OK, json!({ "status": "ready", "node": core.node_id(), "activeSessions": active }))
    };
    json_response(status, &body)
}

/// `POST /admin/drain` (`draining` true) and `POST /admin/undrain` (false): sets the node's drain
/// state and answers it with the calls still live.
pub fn drain(core: &CoreHandle, draining: bool) -> Response<Bytes> {
    core.set_draining(draining);
    if draining {
        tracing::info!(node = core.node_id(), "draining: new calls are refused, live calls go on");
    } else {
        tracing::info!(node = core.node_id(), "undrained: taking new calls");
    }
    let active: usize = core.stats().iter().map(|s| s.sessions).sum();
    json_response(
        StatusCode::OK,
        &json!({ "success": true, "draining": draining, "node": core.node_id(), "activeSessions": active }),
    )
}

/// `GET /health/detailed` (seed 003): services, memory, and sessions per core. 503 when the
/// data directory or the embedded records database is unusable; a shared (PostgreSQL) records
/// database that is down only degrades the node: its records queue (`database.queued`) and are
/// written when it is back, and its calls go on.
pub fn health_detailed(
    core: &CoreHandle,
    data_dir: &DataDirHealth,
    store: &StoreStats,
    twilio_configured: bool,
) -> Response<Bytes> {
    let stats = core.stats();
    let active: usize = stats.iter().map(|s| s.sessions).sum();
    let (db_up, db_latency_ms) = data_dir.read();
    let shared = data_dir.shared();
    let cores: Vec<Value> = stats
        .iter()
        .map(|s| {
            json!({ "id": s.core.0, "sessions": s.sessions, "observers": s.observers,
                    "connections": s.connections, "droppedFrames": s.dropped_frames(),
                    "protocolErrors": s.protocol_errors, "pacerDrops": s.pacer_drops,
                    "agentErrors": s.agent_errors,
                    "toolCalls": { "calls": s.tools.calls, "failed": s.tools.failed, "refused": s.tools.refused },
                    "webrtc": { "peers": s.rtc.peers, "lost": s.rtc.lost, "concealed": s.rtc.concealed,
                                "fecRecovered": s.rtc.fec_recovered, "late": s.rtc.late,
                                "decodeErrors": s.rtc.decode_errors },
                    "frames": frames_by_leg(s) })
        })
        .collect();
    // An upstream that does not answer degrades the relay (calls that need it fail); an unusable
    // database makes it unhealthy.
    let upstream_down = data_dir.upstreams.iter().any(|u| u.status().0 == "down");
    let unhealthy = !db_up && !shared;
    let status = match (unhealthy, db_up && !upstream_down) {
        (true, _) => "unhealthy",
        (false, false) => "degraded",
        (false, true) => "healthy",
    };
    let upstream = |name: &str| match data_dir.upstreams.iter().find(|u| u.name == name) {
        Some(u) => {
            let (status, latency) = u.status();
            json!({ "status": status, "latency": (latency * 1000.0).round() / 1000.0 })
        }
        None => json!({ "status": "not_configured" }),
    };
    let body = json!({
        "status": status,
        "timestamp": timestamp(),
        "services": {
            "database": {
                "status": if db_up { "up" } else { "down" },
                "latency": (db_latency_ms * 1000.0).round() / 1000.0,
                "backend": if shared { "postgresql" } else { "redb" },
                "queued": store.queued.load(Ordering::Relaxed) + store.pending.load(Ordering::Relaxed),
                "dropped": store.dropped.load(Ordering::Relaxed),
            },
            "openai": upstream("openai"),
            "agent": upstream("agent"),
            "llm": upstream("llm"),
            "twilio": { "status": if twilio_configured { "configured" } else { "not_configured" } },
            "server": {
                "status": "up",
                "node": core.node_id(),
                "draining": core.draining(),
                "uptime": core.uptime().as_secs(),
                "activeSessions": active,
                "memoryUsage": { "rss": rss_bytes() },
                "cores": cores,
            },
        },
    });
    json_response(if unhealthy { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK }, &body)
}

/// `{"in": {leg: n}, "out": {…}, "dropped": {…, "other": n}}`: what `/metrics` exports as
/// `relay_frames_in_total`, `relay_frames_out_total` and `relay_dropped_frames_total` for a core.
fn frames_by_leg(s: &CoreStats) -> Value {
    let mut out = json!({ "in": {}, "out": {}, "dropped": {} });
    for (dir, leg, n) in s.leg_counts() {
        out[dir.name()][leg] = json!(n);
    }
    out
}

/// Resident set size of this process, bytes (0 if /proc is unreadable).
fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

fn timestamp() -> String {
    let now = SystemTime::now();
    humantime::format_rfc3339_seconds(now).to_string()
}
