//! Process-wide state every core reads and writes its own slot of: the shutdown and drain flags,
//! liveness ticks and per-core gauges, and the [`CoreStats`] the control plane reads from them.
//!
//! Invariant: atomics only, no task or socket; each core writes only its own slot.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use crate::core::{LegKind, PerLeg, QueueDepths};
use crate::id::CoreId;

/// Process-wide state every core can read: the shutdown flag and per-core gauges.
pub(crate) struct Global {
    pub(crate) shutdown: AtomicBool,
    /// Set with `shutdown` when the node was drained and empty: cores exit without the grace wait.
    pub(crate) shutdown_at_once: AtomicBool,
    /// The node drains (`POST /admin/drain`, SIGUSR1): every core refuses legs that would begin a
    /// call it does not know, and serves its calls as before. Each core reads it before each input.
    pub(crate) draining: AtomicBool,
    /// When each core's timer task last ran, ms since `started`: a core whose value stops moving
    /// is not serving (`/health/ready` answers 503).
    pub(crate) ticks: Vec<AtomicU64>,
    /// Active sessions per core; each core writes only its own slot.
    pub(crate) sessions: Vec<AtomicUsize>,
    /// Attached event sockets per core.
    pub(crate) observers: Vec<AtomicUsize>,
    /// Open connections per core.
    pub(crate) connections: Vec<AtomicUsize>,
    /// Protocol errors on media legs, per core.
    pub(crate) protocol_errors: Vec<AtomicU64>,
    pub(crate) agent_errors: Vec<AtomicU64>,
    /// Pacer refusals, per core.
    pub(crate) pacer_drops: Vec<AtomicU64>,
    /// WebRTC counters, per core.
    pub(crate) rtc: Vec<RtcGauges>,
    /// Frames by leg kind, shell error counts and queue depths, per core.
    pub(crate) media: Vec<MediaGauges>,
    /// Realtime agents' function calls, per core: made, failed, refused.
    pub(crate) tools: Vec<[AtomicU64; 3]>,
    pub(crate) started: Instant,
}

impl Global {
    /// Every core's counts (of `cores`), from the gauges.
    pub(crate) fn stats(&self, cores: usize) -> Vec<CoreStats> {
        let g = self;
        (0..cores)
            .map(|i| CoreStats {
                core: CoreId(i),
                sessions: g.sessions[i].load(Ordering::Relaxed),
                observers: g.observers[i].load(Ordering::Relaxed),
                connections: g.connections[i].load(Ordering::Relaxed),
                protocol_errors: g.protocol_errors[i].load(Ordering::Relaxed),
                agent_errors: g.agent_errors[i].load(Ordering::Relaxed),
                pacer_drops: g.pacer_drops[i].load(Ordering::Relaxed),
                rtc: g.rtc[i].load(),
                frames_in: g.media[i].frames_in.load(),
                frames_out: g.media[i].frames_out.load(),
                dropped_by_leg: g.media[i].dropped.load(),
                dropped_unattached: g.media[i].dropped_unattached.load(Ordering::Relaxed),
                udp_send_errors: g.media[i].udp_send_errors.load(Ordering::Relaxed),
                queues: QueueDepths {
                    pacer_frames: g.media[i].pacer_frames.load(Ordering::Relaxed),
                    agent_backlog: g.media[i].agent_backlog.load(Ordering::Relaxed),
                    playout_packets: g.media[i].playout_packets.load(Ordering::Relaxed),
                },
                tools: crate::core::ToolStats {
                    calls: g.tools[i][0].load(Ordering::Relaxed),
                    failed: g.tools[i][1].load(Ordering::Relaxed),
                    refused: g.tools[i][2].load(Ordering::Relaxed),
                },
                mesh_pending: g.media[i].mesh_pending.load(Ordering::Relaxed),
                outbox_frames: g.media[i].outbox_frames.load(Ordering::Relaxed),
            })
            .collect()
    }
}

/// One core's WebRTC counters, shared.
#[derive(Default)]
pub(crate) struct RtcGauges([AtomicU64; 7]);

impl RtcGauges {
    pub(crate) fn store(&self, s: &crate::core::RtcStats) {
        let values = [s.peers, s.lost, s.concealed, s.fec_recovered, s.late, s.decode_errors, s.encode_errors];
        for (gauge, value) in self.0.iter().zip(values) {
            gauge.store(value, Ordering::Relaxed);
        }
    }

    pub(crate) fn load(&self) -> crate::core::RtcStats {
        let v = self.0.each_ref().map(|g| g.load(Ordering::Relaxed));
        crate::core::RtcStats {
            peers: v[0],
            lost: v[1],
            concealed: v[2],
            fec_recovered: v[3],
            late: v[4],
            decode_errors: v[5],
            encode_errors: v[6],
        }
    }
}

/// A count per leg kind, shared.
#[derive(Default)]
pub(crate) struct LegGauges([AtomicU64; LegKind::ALL.len()]);

impl LegGauges {
    fn store(&self, counts: &PerLeg) {
        for (gauge, value) in self.0.iter().zip(counts.0) {
            gauge.store(value, Ordering::Relaxed);
        }
    }

    fn load(&self) -> PerLeg {
        PerLeg(self.0.each_ref().map(|g| g.load(Ordering::Relaxed)))
    }
}

/// One core's frames by leg kind, shell error counts and queue depths, shared. Cache-line
/// aligned, so cores publishing side by side do not write to one line.
#[derive(Default)]
#[repr(align(64))]
pub(crate) struct MediaGauges {
    frames_in: LegGauges,
    frames_out: LegGauges,
    dropped: LegGauges,
    dropped_unattached: AtomicU64,
    udp_send_errors: AtomicU64,
    /// [`QueueDepths`] and the mesh requests awaiting replies, as of the core's last sweep.
    pacer_frames: AtomicU64,
    agent_backlog: AtomicU64,
    playout_packets: AtomicU64,
    mesh_pending: AtomicU64,
    /// Frames waiting in the core's socket send queues, as of its last sweep.
    outbox_frames: AtomicU64,
}

impl MediaGauges {
    /// Publishes the counts a core keeps (after every input).
    pub(crate) fn store_counts(&self, stats: &crate::core::Stats, udp_send_errors: u64) {
        self.frames_in.store(&stats.frames_in);
        self.frames_out.store(&stats.frames_out);
        self.dropped.store(&stats.dropped);
        self.dropped_unattached.store(stats.dropped_unattached, Ordering::Relaxed);
        self.udp_send_errors.store(udp_send_errors, Ordering::Relaxed);
    }

    /// Publishes queue depths (on the core's periodic sweep: measuring them visits every session).
    pub(crate) fn store_depths(&self, depths: &QueueDepths, mesh_pending: usize) {
        self.pacer_frames.store(depths.pacer_frames, Ordering::Relaxed);
        self.agent_backlog.store(depths.agent_backlog, Ordering::Relaxed);
        self.playout_packets.store(depths.playout_packets, Ordering::Relaxed);
        self.mesh_pending.store(mesh_pending as u64, Ordering::Relaxed);
    }

    /// Publishes the frames waiting in the core's socket send queues (on its sweep).
    pub(crate) fn store_outbox_frames(&self, frames: u64) {
        self.outbox_frames.store(frames, Ordering::Relaxed);
    }
}

/// A core's counts, read from the shared gauges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CoreStats {
    /// The core.
    pub core: CoreId,
    /// Active sessions it owns.
    pub sessions: usize,
    /// Event sockets attached to its sessions.
    pub observers: usize,
    /// Open TCP connections it serves.
    pub connections: usize,
    /// Malformed or out-of-order messages received on media legs.
    pub protocol_errors: u64,
    /// `error` events Realtime agents sent, fatal or not, and Realtime sessions that could not be
    /// opened.
    pub agent_errors: u64,
    /// Agent audio refused because a caller's pacer queue was full.
    pub pacer_drops: u64,
    /// WebRTC peers and what their playout saw.
    pub rtc: crate::core::RtcStats,
    /// Audio frames received, by the kind of leg they came from.
    pub frames_in: PerLeg,
    /// Audio frames sent, by the kind of leg they went to (one per socket or peer).
    pub frames_out: PerLeg,
    /// Messages dropped because a socket's queue was full, it was closing or its encoder refused
    /// them, by the kind of socket they were for (counted where they happen)...
    pub dropped_by_leg: PerLeg,
    /// ...and those for sockets already detached from their call.
    pub dropped_unattached: u64,
    /// Datagrams the kernel refused to send from the core's WebRTC socket.
    pub udp_send_errors: u64,
    /// What waited in the core's queues at its last sweep (every 250 ms).
    pub queues: QueueDepths,
    /// Realtime agents' function calls: made, failed (error output), refused (undeclared tool).
    pub tools: crate::core::ToolStats,
    /// Requests this core sent to other cores and awaited replies for, at its last sweep.
    pub mesh_pending: u64,
    /// Frames waiting in the core's socket send queues (sockets slower than their audio), at its
    /// last sweep.
    pub outbox_frames: u64,
}

/// Which way a per-leg frame count goes ([`CoreStats::leg_counts`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameDir {
    /// Received from legs of the kind.
    In,
    /// Sent (queued) to legs of the kind.
    Out,
    /// Dropped on their way to legs of the kind.
    Dropped,
}

impl FrameDir {
    /// Its name in `/health/detailed` and in metric names.
    pub fn name(self) -> &'static str {
        match self {
            Self::In => "in",
            Self::Out => "out",
            Self::Dropped => "dropped",
        }
    }
}

impl CoreStats {
    /// Every message dropped on its way to a socket: `dropped_by_leg` summed, plus
    /// `dropped_unattached`.
    pub fn dropped_frames(&self) -> u64 {
        self.dropped_by_leg.total() + self.dropped_unattached
    }

    /// Every per-leg frame count that applies, as (direction, leg name, count): a kind appears only
    /// in the directions it has (no audio comes from listeners, WebRTC has no socket queue to drop
    /// from), and drops for sockets already detached from their call under the leg `other`.
    pub fn leg_counts(&self) -> impl Iterator<Item = (FrameDir, &'static str, u64)> + '_ {
        LegKind::ALL
            .into_iter()
            .flat_map(move |kind| {
                [
                    (kind.receives_audio(), FrameDir::In, &self.frames_in),
                    (kind.sends_audio(), FrameDir::Out, &self.frames_out),
                    (kind.is_socket(), FrameDir::Dropped, &self.dropped_by_leg),
                ]
                .into_iter()
                .filter(|(applies, _, _)| *applies)
                .map(move |(_, dir, counts)| (dir, kind.name(), counts.get(kind)))
            })
            .chain(std::iter::once((FrameDir::Dropped, "other", self.dropped_unattached)))
    }
}
