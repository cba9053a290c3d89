//! `GET /metrics`: Prometheus text exposition through the `metrics` crate.
//!
//! Invariant: nothing here runs on the media path. Cores keep their counts in plain integers and
//! publish them to per-core atomics after each input (as they always have for `/health/detailed`);
//! a scrape reads those atomics into the `metrics` recorder and renders it, so recording takes no
//! lock on a core.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use relay_engine::shell::CoreHandle;

/// The process-wide recorder's render handle (installed once, on first use).
fn handle() -> Option<&'static PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok().map(|()| handle)
        })
        .as_ref()
}

/// How often histogram samples are folded into their summaries. Until then each sample is held
/// (the exporter's lock-free bucket), so without upkeep memory grows with every input a core times.
const UPKEEP: std::time::Duration = std::time::Duration::from_secs(5);

/// Installs the recorder (call once at startup, so describe() calls land in it) and starts its
/// upkeep thread.
pub fn install() {
    if let Some(handle) = handle() {
        describe();
        let spawned = std::thread::Builder::new().name("metrics-upkeep".into()).spawn(move || loop {
            std::thread::sleep(UPKEEP);
            handle.run_upkeep();
        });
        if let Err(e) = spawned {
            tracing::warn!("metrics upkeep thread not started: {e}");
        }
    }
}

fn describe() {
    use metrics::{describe_counter, describe_gauge};
    describe_gauge!("relay_sessions", "Sessions a core holds now");
    describe_gauge!("relay_observers", "Event and frontend sockets attached to a core's sessions");
    describe_gauge!("relay_connections", "Open TCP connections a core serves");
    describe_counter!("relay_dropped_frames_total", "Frames dropped because a socket's queue was full");
    describe_counter!("relay_protocol_errors_total", "Malformed or out-of-order messages on media legs");
    describe_counter!("relay_pacer_drops_total", "Agent audio refused because a caller's pacer queue was full");
    describe_gauge!("relay_webrtc_peers", "WebRTC peers on a core");
    describe_counter!("relay_webrtc_lost_total", "WebRTC frames whose packet had not arrived when due");
    describe_counter!("relay_webrtc_concealed_total", "WebRTC frames made up by Opus loss concealment");
    describe_counter!("relay_webrtc_fec_recovered_total", "WebRTC frames recovered by forward error correction");
    describe_counter!("relay_webrtc_late_total", "WebRTC packets that arrived after their frame played");
    describe_counter!("relay_webrtc_decode_errors_total", "WebRTC packets that could not be decoded");
    describe_gauge!("relay_uptime_seconds", "Seconds since the relay started");
    metrics::describe_histogram!(
        "relay_core_input_seconds",
        metrics::Unit::Seconds,
        "Time a core takes to handle one input (a frame, a datagram, a command, a timer) and apply its outputs"
    );
}

/// The exposition text, with every core's counts as they are now.
pub fn render(core: &CoreHandle) -> String {
    let Some(handle) = handle() else { return String::new() };
    for s in core.stats() {
        let c = s.core.0.to_string();
        metrics::gauge!("relay_sessions", "core" => c.clone()).set(s.sessions as f64);
        metrics::gauge!("relay_observers", "core" => c.clone()).set(s.observers as f64);
        metrics::gauge!("relay_connections", "core" => c.clone()).set(s.connections as f64);
        metrics::counter!("relay_dropped_frames_total", "core" => c.clone()).absolute(s.dropped_frames);
        metrics::counter!("relay_protocol_errors_total", "core" => c.clone()).absolute(s.protocol_errors);
        metrics::counter!("relay_pacer_drops_total", "core" => c.clone()).absolute(s.pacer_drops);
        metrics::gauge!("relay_webrtc_peers", "core" => c.clone()).set(s.rtc.peers as f64);
        metrics::counter!("relay_webrtc_lost_total", "core" => c.clone()).absolute(s.rtc.lost);
        metrics::counter!("relay_webrtc_concealed_total", "core" => c.clone()).absolute(s.rtc.concealed);
        metrics::counter!("relay_webrtc_fec_recovered_total", "core" => c.clone()).absolute(s.rtc.fec_recovered);
        metrics::counter!("relay_webrtc_late_total", "core" => c.clone()).absolute(s.rtc.late);
        metrics::counter!("relay_webrtc_decode_errors_total", "core" => c).absolute(s.rtc.decode_errors);
    }
    metrics::gauge!("relay_uptime_seconds").set(core.uptime().as_secs_f64());
    handle.render()
}
