//! `GET /metrics`: Prometheus text exposition through the `metrics` crate.
//!
//! Invariant: nothing here runs on the media path. Cores keep their counts in plain integers and
//! publish them to per-core atomics after each input (queue depths on their 250 ms sweep); a
//! scrape reads those atomics into the `metrics` recorder and renders it. The two histograms
//! (`relay_core_input_seconds`, `relay_codec_seconds`) are recorded by the cores through handles
//! made once per core, into the exporter's lock-free buckets. So recording takes no lock on a core.

use std::sync::atomic::Ordering;
use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use relay_engine::shell::{CoreHandle, CoreStats, FrameDir};

use crate::records::StoreStats;

/// Bucket bounds of the time histograms (`relay_core_input_seconds`, `relay_codec_seconds`),
/// seconds: 1 µs to 100 ms, three per decade.
const TIME_BUCKETS: &[f64] =
    &[1e-6, 2e-6, 5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1];

/// The process-wide recorder's render handle (installed once, on first use).
fn handle() -> Option<&'static PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            // Histograms with fixed buckets, not summaries: a few counters per series whatever the
            // load (a summary's quantile sketches held ~200 KiB per series), and Prometheus can sum
            // them across cores and relays, which quantiles cannot be.
            let builder = PrometheusBuilder::new().set_buckets(TIME_BUCKETS).expect("buckets are not empty");
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok().map(|()| handle)
        })
        .as_ref()
}

/// How often histogram samples are folded into their buckets. Until then each sample is held
/// (the exporter's lock-free bucket), so without upkeep memory grows with every input a core times;
/// with it, a second's samples are held (8 bytes each: ~1.6 KiB per Twilio call with a bot). The
/// folding costs the same per sample whatever the interval.
const UPKEEP: std::time::Duration = std::time::Duration::from_secs(1);

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
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!("relay_sessions", "Sessions a core holds now");
    describe_gauge!("relay_observers", "Event and frontend sockets attached to a core's sessions");
    describe_gauge!("relay_connections", "Open TCP connections a core serves");
    describe_counter!(
        "relay_dropped_frames_total",
        "Messages dropped because a socket's queue was full, it was closing or its encoder refused them, by \
         the socket's leg kind (leg=\"other\": sockets already detached from their call)"
    );
    describe_counter!(
        "relay_frames_in_total",
        "Audio frames a core received, by leg kind (Twilio media messages, Realtime audio deltas, WebRTC RTP packets)"
    );
    describe_counter!(
        "relay_frames_out_total",
        "Audio frames a core queued for sending, by leg kind; one per socket or peer (a frame for three frontends \
         counts three; those a socket then drops also count in relay_dropped_frames_total)"
    );
    describe_counter!(
        "relay_errors_total",
        "Errors a core counted, by kind: protocol (malformed or out-of-order media-leg messages), agent (errors \
         Realtime models reported, and sessions they refused), pacer_full \
         (agent audio refused by a full pacer queue), opus_decode, opus_encode, udp_send (datagrams the kernel refused)"
    );
    describe_gauge!(
        "relay_pacer_queued_frames",
        "Agent audio waiting in callers' pacers to be released toward them, in 20 ms frames (sampled every 250 ms)"
    );
    describe_gauge!(
        "relay_agent_backlog_frames",
        "Caller frames and key presses held for agents still being dialled (sampled every 250 ms)"
    );
    describe_gauge!(
        "relay_playout_buffered_packets",
        "WebRTC packets held in playout buffers for reordering and jitter (sampled every 250 ms)"
    );
    describe_gauge!(
        "relay_mesh_pending_requests",
        "Requests a core sent to other cores and still awaits replies for (sampled every 250 ms)"
    );
    describe_gauge!(
        "relay_socket_queued_frames",
        "Frames waiting in a core's socket send queues for peers slower than their audio (sampled every 250 ms)"
    );
    describe_gauge!(
        "relay_records_queued",
        "Call-record changes waiting to be written (queued for the writer thread, or held by it while the database is down)"
    );
    describe_counter!("relay_records_written_total", "Call records committed to the records database");
    describe_counter!("relay_records_dropped_total", "Call-record changes dropped because the writer's queue was full");
    describe_gauge!(
        "relay_records_failing",
        "1 while the records database's last commit failed (its changes are retried)"
    );
    describe_histogram!(
        "relay_codec_seconds",
        Unit::Seconds,
        "Time of each codec call on a core, by op: opus_encode, opus_decode, resample (one 20 ms frame), \
         ulaw_encode, ulaw_decode (G.711 only, not the base64 around it)"
    );
    describe_counter!("relay_protocol_errors_total", "Malformed or out-of-order messages on media legs");
    describe_counter!("relay_pacer_drops_total", "Agent audio refused because a caller's pacer queue was full");
    describe_counter!("relay_tool_calls_total", "Function calls Realtime agents made");
    describe_counter!("relay_tool_call_failures_total", "Function calls answered with an error output (tools server failed, timed out or answered badly; bad arguments; too many at once)");
    describe_counter!(
        "relay_tool_calls_refused_total",
        "Function calls of tools the session did not declare (never POSTed)"
    );
    describe_gauge!("relay_webrtc_peers", "WebRTC peers on a core");
    describe_counter!("relay_webrtc_lost_total", "WebRTC frames whose packet had not arrived when due");
    describe_counter!("relay_webrtc_concealed_total", "WebRTC frames made up by Opus loss concealment");
    describe_counter!("relay_webrtc_fec_recovered_total", "WebRTC frames recovered by forward error correction");
    describe_counter!("relay_webrtc_late_total", "WebRTC packets that arrived after their frame played");
    describe_counter!("relay_webrtc_decode_errors_total", "WebRTC packets that could not be decoded");
    describe_gauge!("relay_uptime_seconds", "Seconds since the relay started");
    describe_histogram!(
        "relay_core_input_seconds",
        Unit::Seconds,
        "Time a core takes to handle one input (a frame, a datagram, a command, a timer) and apply its outputs"
    );
}

/// The exposition text, with every core's counts as they are now.
pub fn render(core: &CoreHandle, records: &StoreStats) -> String {
    let Some(handle) = handle() else { return String::new() };
    for s in core.stats() {
        let c = s.core.0.to_string();
        metrics::gauge!("relay_sessions", "core" => c.clone()).set(s.sessions as f64);
        metrics::gauge!("relay_observers", "core" => c.clone()).set(s.observers as f64);
        metrics::gauge!("relay_connections", "core" => c.clone()).set(s.connections as f64);
        metrics::counter!("relay_protocol_errors_total", "core" => c.clone()).absolute(s.protocol_errors);
        metrics::counter!("relay_pacer_drops_total", "core" => c.clone()).absolute(s.pacer_drops);
        metrics::counter!("relay_tool_calls_total", "core" => c.clone()).absolute(s.tools.calls);
        metrics::counter!("relay_tool_call_failures_total", "core" => c.clone()).absolute(s.tools.failed);
        metrics::counter!("relay_tool_calls_refused_total", "core" => c.clone()).absolute(s.tools.refused);
        metrics::gauge!("relay_webrtc_peers", "core" => c.clone()).set(s.rtc.peers as f64);
        metrics::counter!("relay_webrtc_lost_total", "core" => c.clone()).absolute(s.rtc.lost);
        metrics::counter!("relay_webrtc_concealed_total", "core" => c.clone()).absolute(s.rtc.concealed);
        metrics::counter!("relay_webrtc_fec_recovered_total", "core" => c.clone()).absolute(s.rtc.fec_recovered);
        metrics::counter!("relay_webrtc_late_total", "core" => c.clone()).absolute(s.rtc.late);
        metrics::counter!("relay_webrtc_decode_errors_total", "core" => c.clone()).absolute(s.rtc.decode_errors);
        metrics::gauge!("relay_pacer_queued_frames", "core" => c.clone()).set(s.queues.pacer_frames as f64);
        metrics::gauge!("relay_agent_backlog_frames", "core" => c.clone()).set(s.queues.agent_backlog as f64);
        metrics::gauge!("relay_playout_buffered_packets", "core" => c.clone()).set(s.queues.playout_packets as f64);
        metrics::gauge!("relay_mesh_pending_requests", "core" => c.clone()).set(s.mesh_pending as f64);
        metrics::gauge!("relay_socket_queued_frames", "core" => c.clone()).set(s.outbox_frames as f64);
        per_leg(&s, &c);
        for (kind, count) in errors(&s) {
            metrics::counter!("relay_errors_total", "core" => c.clone(), "kind" => kind).absolute(count);
        }
    }
    metrics::gauge!("relay_uptime_seconds").set(core.uptime().as_secs_f64());
    metrics::gauge!("relay_records_queued")
        .set((records.queued.load(Ordering::Relaxed) + records.pending.load(Ordering::Relaxed)) as f64);
    metrics::counter!("relay_records_written_total").absolute(records.written.load(Ordering::Relaxed));
    metrics::counter!("relay_records_dropped_total").absolute(records.dropped.load(Ordering::Relaxed));
    metrics::gauge!("relay_records_failing").set(f64::from(u8::from(records.failing.load(Ordering::Relaxed))));
    handle.render()
}

/// A core's frames in and out and its socket drops, by leg kind (`core` is its label value).
/// Drops for sockets already detached from their call have `leg="other"`: a counter of its own (not
/// the total minus the rest, which a scrape between two stores would overshoot).
fn per_leg(s: &CoreStats, core: &str) {
    for (dir, leg, n) in s.leg_counts() {
        let core = core.to_owned();
        match dir {
            FrameDir::In => metrics::counter!("relay_frames_in_total", "core" => core, "leg" => leg).absolute(n),
            FrameDir::Out => metrics::counter!("relay_frames_out_total", "core" => core, "leg" => leg).absolute(n),
            FrameDir::Dropped => {
                metrics::counter!("relay_dropped_frames_total", "core" => core, "leg" => leg).absolute(n);
            }
        }
    }
}

/// A core's error counts by `kind` label.
fn errors(s: &CoreStats) -> [(&'static str, u64); 6] {
    [
        ("protocol", s.protocol_errors),
        ("agent", s.agent_errors),
        ("pacer_full", s.pacer_drops),
        ("opus_decode", s.rtc.decode_errors),
        ("opus_encode", s.rtc.encode_errors),
        ("udp_send", s.udp_send_errors),
    ]
}
