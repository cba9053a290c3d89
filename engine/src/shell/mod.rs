//! The glommio shell: one pinned executor per core, the cross-core mesh, TCP and WebSocket tasks.
//!
//! Invariant: the only module that imports glommio, socket2 or reads the clock; it feeds the
//! sans-IO [`CoreState`](crate::core::CoreState) one input at a time and drains every output before awaiting again.

mod agent;
mod clock;
mod core_task;
mod dial;
mod fetch;
mod handoff;
mod mesh;
mod rtc;
mod tcp;
mod tls;
mod tools;
mod ws;

use std::future::Future;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::StatusCode;

use crate::config::EngineConfig;
use crate::core::{Credential, LegKind, PerLeg, QueueDepths};
use crate::id::{CoreId, SessionId};
use crate::proto::http::RequestHead;

pub use crate::proto::http_client::Response as FetchResponse;
pub use core_task::CoreHandle;
pub use fetch::{FetchError, FetchRequest};
pub use tls::{load_system_roots, server_config, trust_extra_roots};

/// The control plane, as the shell sees it: turns a request into a response, or into an event
/// socket for a session. One clone runs on every core.
pub trait ControlService: Clone + Send + 'static {
    /// Handles a request on the core that read it. Session commands go through `core`.
    fn handle(&self, core: &CoreHandle, request: Request) -> impl Future<Output = Outcome>;

    /// A final answer known from the head alone (no such route, no credentials), sent instead of
    /// `100 Continue` to a client waiting to send its body; the connection then closes. `None`
    /// (the default) lets the body come.
    fn early_response(&self, head: &RequestHead) -> Option<http::Response<Bytes>> {
        let _ = head;
        None
    }

    /// The response for an error the shell found itself (limits, malformed heads, busy cores).
    /// `request` holds the request's headers as far as they are known (empty when the head could
    /// not be read), so that the answer can carry what they call for, such as CORS headers.
    fn error_response(&self, status: StatusCode, message: &str, request: &http::HeaderMap) -> http::Response<Bytes>;
}

/// A whole request: head and body.
#[derive(Debug)]
pub struct Request {
    /// The parsed head.
    pub head: RequestHead,
    /// The body (`Content-Length` bytes).
    pub body: Bytes,
    /// The client's address.
    pub peer: SocketAddr,
}

/// What to do with a request.
#[derive(Debug)]
pub enum Outcome {
    /// Send this response.
    Respond(http::Response<Bytes>),
    /// Switch to WebSocket, on the session's owner core.
    Upgrade(Upgrade),
}

/// What a WebSocket is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketKind {
    /// `/ws`: session events.
    Events,
    /// `/frontend-stream`: the call's audio and transcripts.
    Frontend,
    /// `/twilio/stream`: the caller's Media Stream. Its session is named by its `start` message,
    /// so the relay answers 101 at once and moves the socket once that message arrives.
    Caller,
    /// `/llm-websocket/{call_id}`: Retell's custom-LLM socket for the call.
    Llm,
}

/// An accepted WebSocket upgrade, completed on the session's owner core.
pub struct Upgrade {
    /// What the socket is for.
    pub kind: SocketKind,
    /// The session, when the request names it (required for listeners; for callers a fallback
    /// when the `start` message names none, unless `session_fixed`).
    pub session: Option<SessionId>,
    /// A caller's session is the one its URL's path names (`/twilio/stream/{callSid}`, which a
    /// balancer routes by): a `start` that names another call is refused (1008).
    pub session_fixed: bool,
    /// What the client presented.
    pub credential: Credential,
    /// `Sec-WebSocket-Accept` for the 101 answer.
    pub accept: String,
    /// Dropped when the socket ends, wherever it then lives: releases per-user limits.
    pub guard: Option<Box<dyn std::any::Any + Send>>,
    /// Complete the handshake, then close at once with this code and reason (a limit that
    /// WebSocket clients must see as a close code, as seed 004's per-user socket cap).
    pub reject: Option<(u16, &'static str)>,
}

impl std::fmt::Debug for Upgrade {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upgrade").field("kind", &self.kind).field("session", &self.session).finish_non_exhaustive()
    }
}

/// Why the relay could not start; each message says what to change.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The listen socket could not be created.
    #[error("cannot listen on {addr}: {source}{hint}")]
    Listen {
        /// The address asked for.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
        /// What to change.
        hint: &'static str,
    },
    /// `RLIMIT_MEMLOCK` is below what io_uring needs.
    #[error("io_uring needs RLIMIT_MEMLOCK of at least {need_kib} KiB, but it is {have_kib} KiB: raise it (`ulimit -l unlimited`, LimitMEMLOCK=infinity under systemd, `--ulimit memlock=-1` for containers)")]
    Memlock {
        /// Locked memory needed, KiB.
        need_kib: u64,
        /// The current limit, KiB.
        have_kib: u64,
    },
    /// An executor could not start (io_uring missing or refused).
    #[error("cannot start core {core}: {message}")]
    Executor {
        /// Which core.
        core: usize,
        /// What failed and what to change.
        message: String,
    },
    /// The kernel refuses io_uring.
    #[error("io_uring is unavailable ({source}): Relay needs Linux ≥ 5.8 with io_uring enabled (sysctl kernel.io_uring_disabled=0{disabled}) and a seccomp profile that allows io_uring_setup")]
    IoUring {
        /// The error `io_uring_setup` returned.
        source: std::io::Error,
        /// The current `kernel.io_uring_disabled` setting, when readable.
        disabled: String,
    },
    /// `--cores` is zero.
    #[error("--cores must be at least 1")]
    NoCores,
    /// A core's WebRTC socket could not be made.
    #[error("cannot serve WebRTC: {0}")]
    Rtc(String),
    /// The TLS certificate or key cannot be used.
    #[error("cannot serve TLS: {0}")]
    Tls(String),
}

/// Process-wide state every core can read: the shutdown flag and per-core gauges.
pub(crate) struct Global {
    shutdown: AtomicBool,
    /// Set with `shutdown` when the node was drained and empty: cores exit without the grace wait.
    shutdown_at_once: AtomicBool,
    /// The node drains (`POST /admin/drain`, SIGUSR1): every core refuses legs that would begin a
    /// call it does not know, and serves its calls as before. Each core reads it before each input.
    pub(crate) draining: AtomicBool,
    /// When each core's timer task last ran, ms since `started`: a core whose value stops moving
    /// is not serving (`/health/ready` answers 503).
    pub(crate) ticks: Vec<AtomicU64>,
    /// Active sessions per core; each core writes only its own slot.
    sessions: Vec<AtomicUsize>,
    /// Attached event sockets per core.
    observers: Vec<AtomicUsize>,
    /// Open connections per core.
    connections: Vec<AtomicUsize>,
    /// Protocol errors on media legs, per core.
    protocol_errors: Vec<AtomicU64>,
    agent_errors: Vec<AtomicU64>,
    /// Pacer refusals, per core.
    pacer_drops: Vec<AtomicU64>,
    /// WebRTC counters, per core.
    rtc: Vec<RtcGauges>,
    /// Frames by leg kind, shell error counts and queue depths, per core.
    media: Vec<MediaGauges>,
    /// Realtime agents' function calls, per core: made, failed, refused.
    tools: Vec<[AtomicU64; 3]>,
    started: Instant,
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

    fn load(&self) -> crate::core::RtcStats {
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

/// Asks a running relay to shut down gracefully; cheap to clone and `Send`.
#[derive(Clone)]
pub struct ShutdownHandle(Arc<Global>);

impl ShutdownHandle {
    /// Starts graceful shutdown: stop accepting, end calls, close sockets, exit. A node that was
    /// drained and has no call left exits at once, without waiting for connections to close.
    pub fn shutdown(&self) {
        let drained =
            self.0.draining.load(Ordering::Acquire) && self.0.sessions.iter().all(|s| s.load(Ordering::Acquire) == 0);
        self.0.shutdown_at_once.store(drained, Ordering::Release);
        self.0.shutdown.store(true, Ordering::Release);
    }

    /// Starts draining (SIGUSR1, as `POST /admin/drain`): no new calls, live ones go on.
    pub fn drain(&self) {
        self.0.draining.store(true, Ordering::Release);
    }
}

/// A running relay.
pub struct Relay {
    local_addr: SocketAddr,
    rtc_addrs: Vec<SocketAddr>,
    global: Arc<Global>,
    exits: mpsc::Receiver<(usize, Result<(), String>)>,
    cores: usize,
}

impl Relay {
    /// The address the cores listen on (the real port when port 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Each core's WebRTC address as ICE candidates name it (empty when WebRTC is off).
    pub fn rtc_addrs(&self) -> &[SocketAddr] {
        &self.rtc_addrs
    }

    /// A handle that triggers graceful shutdown from any thread (e.g. a signal handler thread).
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.global.clone())
    }

    /// Blocks until every core has exited.
    ///
    /// # Errors
    /// When a core exits before shutdown was asked for (a core that dies ends the process).
    pub fn wait(self) -> Result<(), String> {
        for _ in 0..self.cores {
            let (core, result) = self.exits.recv().map_err(|_| "core threads vanished".to_owned())?;
            result.map_err(|e| format!("core {core} failed: {e}"))?;
            if !self.global.shutdown.load(Ordering::Acquire) {
                return Err(format!("core {core} exited unexpectedly"));
            }
        }
        Ok(())
    }
}

/// Storage I/O memory glommio pre-registers per executor, bytes. Relay does no file I/O on the
/// executors, so this stays small.
const IO_MEMORY_BYTES: usize = 256 << 10;
/// RLIMIT_MEMLOCK glommio refuses to start below (its `MemLockLimit` check, measured: 512 KiB
/// whatever the core count on kernel 6.x, which charges io_uring rings to the memory cgroup).
const MEMLOCK_NEEDED_BYTES: u64 = 512 << 10;

/// Binds the listen sockets, starts one executor per core and returns once all serve.
///
/// # Errors
/// [`StartError`] with a message that says what to change.
pub fn start<S: ControlService>(config: EngineConfig, service: S) -> Result<Relay, StartError> {
    if config.cores == 0 {
        return Err(StartError::NoCores);
    }
    check_memlock()?;
    raise_file_limit();
    check_io_uring()?;
    let listeners = bind_listeners(config.listen, config.cores)?;
    let local_addr =
        listeners[0].local_addr().map_err(|source| StartError::Listen { addr: config.listen, source, hint: "" })?;
    let tls = match &config.tls {
        Some(id) => Some(server_config(&id.cert_pem, &id.key_pem).map_err(StartError::Tls)?),
        None => None,
    };
    // One WebRTC socket per core, and one DTLS certificate for the process.
    let (rtc_addrs, mut rtc_cores) = match &config.rtc {
        Some(settings) => {
            let bound = rtc::bind(settings, config.listen.ip(), config.cores)?;
            let addrs = bound.iter().map(|c| c.candidate).collect();
            (addrs, bound.into_iter().map(Some).collect())
        }
        None => (Vec::new(), (0..config.cores).map(|_| None).collect::<Vec<_>>()),
    };
    let cpus = allowed_cpus();
    let global = Arc::new(Global {
        shutdown: AtomicBool::new(false),
        shutdown_at_once: AtomicBool::new(false),
        draining: AtomicBool::new(false),
        ticks: (0..config.cores).map(|_| AtomicU64::new(0)).collect(),
        sessions: (0..config.cores).map(|_| AtomicUsize::new(0)).collect(),
        observers: (0..config.cores).map(|_| AtomicUsize::new(0)).collect(),
        connections: (0..config.cores).map(|_| AtomicUsize::new(0)).collect(),
        protocol_errors: (0..config.cores).map(|_| AtomicU64::new(0)).collect(),
        agent_errors: (0..config.cores).map(|_| AtomicU64::new(0)).collect(),
        pacer_drops: (0..config.cores).map(|_| AtomicU64::new(0)).collect(),
        rtc: (0..config.cores).map(|_| RtcGauges::default()).collect(),
        media: (0..config.cores).map(|_| MediaGauges::default()).collect(),
        tools: (0..config.cores).map(|_| Default::default()).collect(),
        started: clock::now().instant,
    });
    let mesh = glommio::channels::channel_mesh::MeshBuilder::full(config.cores, config.limits.mesh_capacity);
    // Each core has at most `mesh_capacity` requests outstanding, so each reply channel needs no more.
    let replies = glommio::channels::channel_mesh::MeshBuilder::full(config.cores, config.limits.mesh_capacity);
    let (ready_tx, ready_rx) = mpsc::channel::<(usize, Result<(), String>)>();
    let (exit_tx, exit_rx) = mpsc::channel();
    for (index, listener) in listeners.into_iter().enumerate() {
        let cpu = cpus[index % cpus.len()];
        let core = core_task::CoreSetup {
            id: CoreId(index),
            cores: config.cores,
            limits: config.limits.clone(),
            agents: config.agents.clone(),
            stream_key: config.stream_key.clone(),
            node_id: config.node_id.clone(),
            listener: OwnedFd::from(listener),
            rtc: rtc_cores[index].take(),
            tls: tls.clone(),
            begin_sentence: config.begin_sentence.clone(),
            tools: config.tools.clone(),
            records: config.records.clone(),
            mesh: mesh.clone(),
            replies: replies.clone(),
            global: global.clone(),
        };
        let service = service.clone();
        let ready = ready_tx.clone();
        let exit = exit_tx.clone();
        let mut builder = glommio::LocalExecutorBuilder::new(glommio::Placement::Fixed(cpu))
            .name(&format!("core-{index:02}"))
            .io_memory(IO_MEMORY_BYTES);
        if !config.limits.spin_before_park.is_zero() {
            builder = builder.spin_before_park(config.limits.spin_before_park);
        }
        let spawned = builder.spawn(move || core_task::run_core(core, service, ready));
        let handle = spawned.map_err(|e| StartError::Executor { core: index, message: explain(&e.to_string()) })?;
        std::thread::Builder::new()
            .name(format!("core-{index:02}-join"))
            .spawn(move || {
                let result = match handle.join() {
                    Ok(r) => r,
                    Err(e) => Err(explain(&e.to_string())),
                };
                let _ = exit.send((index, result));
            })
            .map_err(|e| StartError::Executor { core: index, message: e.to_string() })?;
    }
    drop(ready_tx);
    for _ in 0..config.cores {
        match ready_rx.recv_timeout(Duration::from_secs(30)) {
            Ok((_, Ok(()))) => {}
            Ok((core, Err(message))) => return Err(StartError::Executor { core, message }),
            Err(_) => {
                // A core ended before reporting: its join result says why.
                let (core, result) = exit_rx
                    .recv_timeout(Duration::from_secs(5))
                    .unwrap_or_else(|_| (0, Err("did not start within 30 s".to_owned())));
                let message = result.err().unwrap_or_else(|| "exited during startup".to_owned());
                return Err(StartError::Executor { core, message });
            }
        }
    }
    Ok(Relay { local_addr, rtc_addrs, global, exits: exit_rx, cores: config.cores })
}

/// Turns glommio's startup errors into what the operator has to change.
fn explain(error: &str) -> String {
    let lower = error.to_ascii_lowercase();
    if lower.contains("cannot allocate memory") || lower.contains("memlock") || lower.contains("enomem") {
        format!("{error}: locked memory is too low for io_uring; raise RLIMIT_MEMLOCK (`ulimit -l unlimited`)")
    } else if lower.contains("function not implemented")
        || lower.contains("operation not permitted")
        || lower.contains("permission denied")
    {
        format!("{error}: io_uring is unavailable; Relay needs Linux ≥ 5.8 with io_uring enabled (sysctl kernel.io_uring_disabled=0, and a seccomp profile that allows io_uring_setup)")
    } else {
        error.to_owned()
    }
}

/// Creates and closes a one-entry ring, so a kernel without io_uring is reported here rather than
/// as a panic inside glommio's executor setup.
fn check_io_uring() -> Result<(), StartError> {
    // struct io_uring_params is 120 bytes of u32 fields; zeroed asks for the defaults.
    let mut params = [0u32; 30];
    // SAFETY: io_uring_setup reads and writes only the params struct we pass, sized as the kernel
    // expects; on success it returns a new descriptor that we own and close right away.
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 1u32, params.as_mut_ptr()) };
    if fd < 0 {
        let source = std::io::Error::last_os_error();
        let disabled = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
            .map(|v| format!("; it is {}", v.trim()))
            .unwrap_or_default();
        return Err(StartError::IoUring { source, disabled });
    }
    // SAFETY: `fd` is the descriptor io_uring_setup just returned; nothing else refers to it.
    unsafe { libc::close(fd as libc::c_int) };
    Ok(())
}

fn check_memlock() -> Result<(), StartError> {
    let need = MEMLOCK_NEEDED_BYTES;
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we pass and reads nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) } != 0 {
        return Ok(()); // Cannot tell; let the executors report what fails.
    }
    if lim.rlim_cur == libc::RLIM_INFINITY || lim.rlim_cur >= need {
        return Ok(());
    }
    if lim.rlim_max == libc::RLIM_INFINITY || lim.rlim_max >= need {
        let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
        // SAFETY: setrlimit reads the struct we pass; raising the soft limit up to the hard limit
        // is always permitted.
        if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &raised) } == 0 {
            return Ok(());
        }
    }
    Err(StartError::Memlock { need_kib: need / 1024, have_kib: lim.rlim_cur / 1024 })
}

/// Raises the soft limit on open files to the hard limit: every connection, agent leg and WebRTC
/// socket is a descriptor, and distributions start processes at 1024. Returns the limit in force.
pub fn raise_file_limit() -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we pass and reads nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 0;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
        // SAFETY: setrlimit reads the struct we pass; raising the soft limit up to the hard limit
        // is always permitted.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return lim.rlim_max;
        }
    }
    lim.rlim_cur
}

fn bind_listeners(addr: SocketAddr, cores: usize) -> Result<Vec<StdListener>, StartError> {
    let mut listeners = Vec::with_capacity(cores);
    let mut bound = addr;
    for _ in 0..cores {
        let listener = bind_one(bound).map_err(|source| {
            let hint = match source.kind() {
                std::io::ErrorKind::AddrInUse => ": the port is taken; choose another with --listen / RELAY_LISTEN",
                std::io::ErrorKind::PermissionDenied => ": ports below 1024 need privileges; choose a port ≥ 1024",
                std::io::ErrorKind::AddrNotAvailable => ": that address is not on this machine",
                _ => "",
            };
            StartError::Listen { addr, source, hint }
        })?;
        if bound.port() == 0 {
            // Port 0: the first core's socket picked a port, every other core joins that port.
            bound = listener.local_addr().map_err(|source| StartError::Listen { addr, source, hint: "" })?;
        }
        listeners.push(listener);
    }
    Ok(listeners)
}

fn bind_one(addr: SocketAddr) -> std::io::Result<StdListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM.cloexec(), Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// CPUs this process may run on (its affinity mask), in order.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; zeroed is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: sched_getaffinity writes at most size_of::<cpu_set_t>() bytes into `set`.
    let ok = unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) } == 0;
    let cpus: Vec<usize> = if ok {
        // SAFETY: CPU_ISSET reads the set we own; the index is below CPU_SETSIZE.
        (0..libc::CPU_SETSIZE as usize).filter(|&c| unsafe { libc::CPU_ISSET(c, &set) }).collect()
    } else {
        Vec::new()
    };
    if cpus.is_empty() {
        vec![0]
    } else {
        cpus
    }
}

/// CPUs this process may use: the default for `--cores`.
pub fn available_cores() -> usize {
    allowed_cpus().len()
}
