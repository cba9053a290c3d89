//! One core's executor: its shared state, the drive loop around [`CoreState`], and the tasks that
//! feed it (accept, mesh, ticks).
//!
//! Invariant: every call into `CoreState` goes through [`CoreShared::drive`], which drains all
//! outputs before returning and catches panics: a bug drops the session it concerns, not the core.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use event_listener::Event;
use futures::channel::oneshot;
use futures_lite::FutureExt;
use glommio::channels::channel_mesh::{Full, MeshBuilder, Senders};

use super::mesh::{CoreMessage, ReplyMessage};
use super::ws::Outbox;
use super::{agent, clock, mesh, tcp, ControlService, CoreStats, Global};
use crate::config::Limits;
use crate::core::command::{Command, CommandError, Reply};
use crate::core::{CoreState, Output};
use crate::id::{core_for, ConnectionId, CoreId, SessionId};
use crate::session::media::{CodecOp, CodecTimer};
use crate::time::Now;

/// Everything a core needs to start, handed over from the main thread.
pub(crate) struct CoreSetup {
    pub(crate) id: CoreId,
    pub(crate) cores: usize,
    pub(crate) limits: Limits,
    pub(crate) agents: crate::session::agent::AgentPolicy,
    pub(crate) stream_key: Option<crate::secret::Secret>,
    /// This node's name (see `EngineConfig::node_id`).
    pub(crate) node_id: String,
    pub(crate) listener: OwnedFd,
    /// The core's WebRTC socket and settings, when WebRTC is on.
    pub(crate) rtc: Option<super::rtc::CoreRtc>,
    /// TLS for accepted connections, when a certificate is configured.
    pub(crate) tls: Option<Arc<rustls::ServerConfig>>,
    /// Where call record changes go (see `EngineConfig::records`).
    pub(crate) records: Option<crate::config::RecordSink>,
    /// The built-in Retell responder's first words.
    pub(crate) begin_sentence: String,
    /// Realtime agents' tools and their webhook.
    pub(crate) tools: crate::config::ToolSettings,
    pub(crate) mesh: MeshBuilder<CoreMessage, Full>,
    pub(crate) replies: MeshBuilder<ReplyMessage, Full>,
    pub(crate) global: Arc<Global>,
}

/// State shared by the tasks of one core. Single-threaded: `Rc` and `RefCell`, never across cores.
pub(crate) struct CoreShared {
    pub(crate) id: CoreId,
    pub(crate) cores: usize,
    pub(crate) limits: Limits,
    pub(crate) global: Arc<Global>,
    /// Key for callers' `relaySig` (see `EngineConfig::stream_key`).
    pub(crate) stream_key: Option<crate::secret::Secret>,
    /// This node's name, written on every answer (see `EngineConfig::node_id`).
    pub(crate) node_id: String,
    /// TLS for accepted connections, when a certificate is configured.
    pub(crate) tls: Option<Arc<rustls::ServerConfig>>,
    /// Where call record changes go; the sink only queues them, never blocks (see its docs).
    records: Option<crate::config::RecordSink>,
    state: RefCell<CoreState>,
    /// The one buffer every WebSocket reader on this core receives into: borrowed only inside a
    /// single poll (the bytes go straight on to the socket's codec), so idle sockets hold none.
    pub(crate) read_scratch: RefCell<Box<[u8]>>,
    mesh_tx: Senders<CoreMessage>,
    /// Replies travel on their own mesh, sized to the bound on outstanding requests, so a reply
    /// always has room and is never shed.
    reply_tx: Senders<ReplyMessage>,
    /// Requests sent to other cores, waiting for their reply, by request number.
    pending: RefCell<HashMap<u64, oneshot::Sender<Result<Reply, CommandError>>>>,
    next_request: Cell<u64>,
    next_conn: Cell<u64>,
    /// Outgoing queues of the event sockets this core serves.
    outboxes: RefCell<HashMap<ConnectionId, Rc<Outbox>>>,
    /// A weak handle on this struct, for spawning tasks from inside `drive`.
    this: RefCell<std::rc::Weak<Self>>,
    /// Wakes the timer task when an input brings a deadline earlier than the one it sleeps until.
    timer_event: Event,
    /// The deadline the timer task sleeps until.
    timer_armed: Cell<Option<std::time::Instant>>,
    /// The time at the timer task's last wake-up (at most 50 ms old): cheap time for liveness
    /// bookkeeping, which needs no better.
    coarse: Cell<std::time::Instant>,
    /// Set once graceful shutdown began; `shutdown_event` wakes the tasks that wait on it.
    pub(crate) shutting_down: Cell<bool>,
    pub(crate) shutdown_event: Event,
    /// Connections open on this core (HTTP and WebSocket).
    pub(crate) connections: Cell<usize>,
    /// The core's WebRTC socket (non-blocking): `drive` sends datagrams on it directly, as a UDP
    /// send never waits; one the kernel refuses is dropped, as the network may drop any datagram.
    udp: Option<std::net::UdpSocket>,
    /// Datagrams the kernel refused to send.
    pub(crate) udp_send_errors: Cell<u64>,
    /// Time to handle one input and apply its outputs (`relay_core_input_seconds{core}`): what
    /// the core adds to every frame it routes. A handle made once, recorded without a lock.
    input_time: metrics::Histogram,
}

/// What the control plane uses on a core: its id, session commands and the relay's counts.
#[derive(Clone)]
pub struct CoreHandle(pub(crate) Rc<CoreShared>);

impl CoreHandle {
    /// This core.
    pub fn id(&self) -> CoreId {
        self.0.id
    }

    /// Number of cores.
    pub fn cores(&self) -> usize {
        self.0.cores
    }

    /// The core that owns `session`.
    pub fn owner(&self, session: &SessionId) -> CoreId {
        core_for(session, self.0.cores)
    }

    /// Runs `command` on `session`'s owner core (here, or over the mesh) and returns its answer.
    pub async fn dispatch(&self, session: SessionId, command: Command) -> Result<Reply, CommandError> {
        let owner = self.owner(&session);
        if owner == self.0.id {
            return self.0.command(&session, command);
        }
        let from = self.0.id;
        self.request(owner, |request| CoreMessage::Command { from, request, session, command }).await
    }

    /// Every core's live calls (`GET /calls`), each core's oldest `limit` at most, asked of all
    /// cores at once through the mesh and answered from each core's own state: a core that does
    /// not answer in time (its queue full, or busy past `command_timeout`) is an `Err` in its
    /// place, and the others are listed all the same.
    pub async fn calls(&self, limit: usize) -> Vec<Result<crate::core::command::CoreCalls, CommandError>> {
        let asks = (0..self.0.cores).map(CoreId).map(|core| async move {
            if core == self.0.id {
                return Ok(self.0.calls(limit));
            }
            let from = self.0.id;
            match self.request(core, |request| CoreMessage::ListCalls { from, request, limit }).await {
                Ok(Reply::Calls(calls)) => Ok(*calls),
                Ok(_) => Err(CommandError::Internal),
                Err(e) => Err(e),
            }
        });
        futures::future::join_all(asks).await
    }

    /// Sends the request `message` (made with its request number) to `core` and awaits its reply.
    async fn request(&self, core: CoreId, message: impl FnOnce(u64) -> CoreMessage) -> Result<Reply, CommandError> {
        if self.0.pending.borrow().len() >= self.0.limits.mesh_capacity {
            return Err(CommandError::Busy);
        }
        let request = self.0.next_request.get();
        self.0.next_request.set(request + 1);
        let (tx, rx) = oneshot::channel();
        self.0.pending.borrow_mut().insert(request, tx);
        if self.0.send_to_core(core, message(request)).is_err() {
            self.0.pending.borrow_mut().remove(&request);
            return Err(CommandError::Busy);
        }
        let reply = glommio::timer::timeout(self.0.limits.command_timeout, async { Ok(rx.await) }).await;
        self.0.pending.borrow_mut().remove(&request);
        match reply {
            Ok(Ok(result)) => result,
            // Timed out, or the owner dropped the request: the caller may retry.
            _ => Err(CommandError::Busy),
        }
    }

    /// Sends an HTTP(S) request from this core (e.g. to Twilio's REST API) and returns the response.
    ///
    /// # Errors
    /// [`super::FetchError`] when the request cannot complete within `timeout`.
    pub async fn fetch(
        &self,
        request: super::FetchRequest,
        timeout: Duration,
    ) -> Result<super::FetchResponse, super::FetchError> {
        super::fetch::fetch(request, timeout).await
    }

    /// Runs `f` on the executor's blocking thread pool and returns its result: for work that may
    /// block or take long (file or database I/O), which must never run on a core's thread.
    pub async fn blocking<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> R {
        glommio::executor().spawn_blocking(f).await
    }

    /// Every core's counts, from the shared gauges.
    pub fn stats(&self) -> Vec<CoreStats> {
        let g = &self.0.global;
        (0..self.0.cores)
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
                queues: crate::core::QueueDepths {
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

    /// This node's name (`--node-id`; empty when none).
    pub fn node_id(&self) -> &str {
        &self.0.node_id
    }

    /// Seconds since the relay started.
    pub fn uptime(&self) -> Duration {
        clock::now().instant.saturating_duration_since(self.0.global.started)
    }

    /// Whether graceful shutdown has begun.
    pub fn shutting_down(&self) -> bool {
        self.0.shutting_down.get()
    }

    /// Whether the node is draining: it takes no new calls and serves the calls it has.
    pub fn draining(&self) -> bool {
        self.0.global.draining.load(Ordering::Acquire)
    }

    /// Starts (`true`) or ends (`false`) draining, on every core (each reads the flag before its
    /// next input).
    pub fn set_draining(&self, draining: bool) {
        self.0.global.draining.store(draining, Ordering::Release);
    }

    /// Cores whose timer task has not run for 2 s (`STALLED_AFTER`): stuck, or gone. A core's timer
    /// task wakes at least every 50 ms while it serves.
    pub fn stalled_cores(&self) -> Vec<CoreId> {
        let now_ms = self.uptime().as_millis() as u64;
        let stalled_ms = STALLED_AFTER.as_millis() as u64;
        let ticks = &self.0.global.ticks;
        (0..self.0.cores)
            .filter(|&i| now_ms.saturating_sub(ticks[i].load(Ordering::Relaxed)) > stalled_ms)
            .map(CoreId)
            .collect()
    }
}

/// How long a core's timer task may go without running before the core counts as not serving
/// (`/health/ready` 503): forty of its 50 ms ticks, so a busy moment does not flap the node.
const STALLED_AFTER: Duration = Duration::from_secs(2);

impl CoreShared {
    /// Runs a command for a session this core owns, isolating panics to that session.
    pub(crate) fn command(&self, session: &SessionId, command: Command) -> Result<Reply, CommandError> {
        let now = clock::now();
        self.drive(Some(session), |state| state.handle_command(now, session, command))
            .unwrap_or(Err(CommandError::Internal))
    }

    /// This core's live calls, the oldest `limit` at most: a read of its state, no input.
    pub(crate) fn calls(&self, limit: usize) -> crate::core::command::CoreCalls {
        let (calls, total) = self.state.borrow().calls(limit);
        crate::core::command::CoreCalls { core: self.id, total, calls }
    }

    /// Feeds one input to the core state, then drains and applies every output.
    ///
    /// A panic inside the input is a bug: it is caught, and the session `blame` names (the one the
    /// input concerned) is discarded with its sockets closed, so the core and every other session go
    /// on. Returns `None` after a panic.
    pub(crate) fn drive<R>(&self, blame: Option<&SessionId>, input: impl FnOnce(&mut CoreState) -> R) -> Option<R> {
        let started = clock::instant();
        let result = self.drive_inner(blame, input);
        self.input_time.record(clock::instant().saturating_duration_since(started).as_secs_f64());
        result
    }

    fn drive_inner<R>(&self, blame: Option<&SessionId>, input: impl FnOnce(&mut CoreState) -> R) -> Option<R> {
        let mut state = self.state.borrow_mut();
        state.handle_drain(self.global.draining.load(Ordering::Relaxed));
        let result = catch_unwind(AssertUnwindSafe(|| input(&mut state))).ok();
        if result.is_none() {
            tracing::error!(core = self.id.0, session = ?blame, "a core input panicked; its session was dropped");
            if let Some(id) = blame {
                // The state may be half-updated for this session only; discarding it restores the
                // invariants for everything else.
                let _ = catch_unwind(AssertUnwindSafe(|| state.handle_panic(id)));
            }
        }
        while let Some(output) = state.poll_output() {
            if let Some(conn) = self.apply(output) {
                state.handle_send_dropped(conn, 1);
            }
        }
        if let Some(next) = state.poll_timeout() {
            if self.timer_armed.get().is_none_or(|armed| next < armed) {
                self.timer_armed.set(Some(next));
                self.timer_event.notify(1);
            }
        }
        let stats = state.stats();
        self.global.sessions[self.id.0].store(stats.active_sessions, Ordering::Relaxed);
        self.global.observers[self.id.0].store(stats.observers, Ordering::Relaxed);
        self.global.protocol_errors[self.id.0].store(stats.protocol_errors, Ordering::Relaxed);
        self.global.agent_errors[self.id.0].store(stats.agent_errors, Ordering::Relaxed);
        self.global.pacer_drops[self.id.0].store(stats.pacer_drops, Ordering::Relaxed);
        self.global.rtc[self.id.0].store(&stats.rtc);
        let tools = &self.global.tools[self.id.0];
        tools[0].store(stats.tools.calls, Ordering::Relaxed);
        tools[1].store(stats.tools.failed, Ordering::Relaxed);
        tools[2].store(stats.tools.refused, Ordering::Relaxed);
        self.global.media[self.id.0].store_counts(&stats, self.udp_send_errors.get());
        result
    }

    /// Records that this core's timer task is running (see `CoreHandle::stalled_cores`).
    fn beat(&self, now: std::time::Instant) {
        let uptime_ms = now.saturating_duration_since(self.global.started).as_millis() as u64;
        self.global.ticks[self.id.0].store(uptime_ms, Ordering::Relaxed);
    }

    /// Publishes the depths of this core's queues. Measuring them visits every session, so this
    /// runs on the periodic sweep, not after every input.
    fn publish_depths(&self) {
        let depths = self.state.borrow().queue_depths();
        self.global.media[self.id.0].store_depths(&depths, self.pending.borrow().len());
    }

    /// The session connection `conn` belongs to, to blame it if an input about `conn` panics.
    pub(crate) fn session_of(&self, conn: ConnectionId) -> Option<SessionId> {
        self.state.borrow().session_of(conn).cloned()
    }

    pub(crate) fn now(&self) -> Now {
        clock::now()
    }

    /// The time at the timer task's last wake-up: no clock read.
    pub(crate) fn coarse_now(&self) -> std::time::Instant {
        self.coarse.get()
    }

    /// Enforces every socket's liveness deadlines (see `Outbox::sweep`).
    fn sweep(&self, now: std::time::Instant) {
        let limits = &self.limits;
        let mut queued = 0;
        for outbox in self.outboxes.borrow().values() {
            outbox.sweep(now, limits.ws_idle_timeout, limits.ws_ping_interval, limits.idle_timeout);
            queued += outbox.queued() as u64;
        }
        self.global.media[self.id.0].store_outbox_frames(queued);
    }

    pub(crate) fn next_connection(&self) -> ConnectionId {
        let id = self.next_conn.get();
        self.next_conn.set(id + 1);
        ConnectionId(id)
    }

    pub(crate) fn register_outbox(&self, conn: ConnectionId, outbox: Rc<Outbox>) {
        self.outboxes.borrow_mut().insert(conn, outbox);
    }

    pub(crate) fn remove_outbox(&self, conn: ConnectionId) {
        self.outboxes.borrow_mut().remove(&conn);
    }

    /// Sends a reply; the reply mesh has room for every outstanding request, so this only fails if
    /// the requesting core is gone.
    pub(crate) fn reply_to_core(&self, core: CoreId, reply: ReplyMessage) {
        if self.reply_tx.try_send_to(core.0, reply).is_err() {
            tracing::warn!(core = self.id.0, to = core.0, "reply not delivered: the requesting core is gone");
        }
    }

    pub(crate) fn send_to_core(&self, core: CoreId, message: CoreMessage) -> Result<(), CoreMessage> {
        use glommio::{GlommioError, ResourceType};
        match self.mesh_tx.try_send_to(core.0, message) {
            Ok(()) => Ok(()),
            Err(
                GlommioError::WouldBlock(ResourceType::Channel(m)) | GlommioError::Closed(ResourceType::Channel(m)),
            ) => Err(m),
            // try_send_to only fails with the message inside; anything else had nowhere to go.
            Err(e) => {
                tracing::error!(core = self.id.0, "mesh send failed: {e}");
                Err(CoreMessage::Dropped)
            }
        }
    }

    pub(crate) fn complete(&self, request: u64, result: Result<Reply, CommandError>) {
        if let Some(tx) = self.pending.borrow_mut().remove(&request) {
            let _ = tx.send(result);
        }
    }

    pub(crate) fn connection_opened(&self) {
        self.connections.set(self.connections.get() + 1);
        self.global.connections[self.id.0].store(self.connections.get(), Ordering::Relaxed);
    }

    pub(crate) fn connection_closed(&self) {
        self.connections.set(self.connections.get() - 1);
        self.global.connections[self.id.0].store(self.connections.get(), Ordering::Relaxed);
        if self.shutting_down.get() && self.connections.get() == 0 {
            self.shutdown_event.notify(usize::MAX);
        }
    }

    /// Carries out `output`; returns the socket a message could not be queued for, if it was dropped.
    fn apply(&self, output: Output) -> Option<ConnectionId> {
        let outboxes = self.outboxes.borrow();
        match output {
            Output::Send { conn, text } => {
                if let Some(outbox) = outboxes.get(&conn) {
                    if !outbox.push(text, self.limits.ws_outbox_frames) {
                        return Some(conn);
                    }
                }
            }
            Output::Close { conn, code, reason } => {
                if let Some(outbox) = outboxes.get(&conn) {
                    outbox.close(code, reason);
                }
            }
            Output::Datagram { to, data } => {
                let sent = self.udp.as_ref().is_some_and(|socket| socket.send_to(&data, to).is_ok());
                if !sent {
                    self.udp_send_errors.set(self.udp_send_errors.get() + 1);
                }
            }
            Output::ConnectAgent { conn, session, url, bearer, header, .. } => {
                if let Some(this) = self.this.borrow().upgrade() {
                    let dial = agent::Dial { url, bearer, header };
                    glommio::spawn_local(agent::agent_task(this, conn, session, dial)).detach();
                }
            }
            Output::Record(change) => {
                if let Some(sink) = &self.records {
                    sink.send(change);
                }
            }
            Output::CallTool(call) => {
                if let Some(this) = self.this.borrow().upgrade() {
                    glommio::spawn_local(super::tools::tool_task(this, *call)).detach();
                }
            }
        }
        None
    }
}

/// Time of each codec call on a core (`relay_codec_seconds{core,op}`): one handle per operation,
/// made once, so that timing a frame takes no lock and no registry lookup.
struct CodecHistograms([metrics::Histogram; CodecOp::ALL.len()]);

impl CodecHistograms {
    fn new(core: CoreId) -> Self {
        Self(
            CodecOp::ALL
                .map(|op| metrics::histogram!("relay_codec_seconds", "core" => core.0.to_string(), "op" => op.name())),
        )
    }
}

impl CodecTimer for CodecHistograms {
    fn start(&self) -> std::time::Instant {
        clock::instant()
    }

    fn finish(&self, op: CodecOp, started: std::time::Instant) {
        self.0[op.index()].record(clock::instant().saturating_duration_since(started).as_secs_f64());
    }
}

/// The executor's main future: joins the mesh, starts the core's tasks, runs until shutdown.
pub(crate) async fn run_core<S: ControlService>(
    setup: CoreSetup,
    service: S,
    ready: mpsc::Sender<(usize, Result<(), String>)>,
) -> Result<(), String> {
    let (Ok((mesh_tx, mut mesh_rx)), Ok((reply_tx, mut reply_rx))) =
        (setup.mesh.join().await, setup.replies.join().await)
    else {
        let _ = ready.send((setup.id.0, Err("could not join the core mesh".to_owned())));
        return Err("could not join the core mesh".to_owned());
    };

    // Mesh peers are numbered by executor creation order, which is core order; check it, since
    // every cross-core message is addressed by that number.
    if mesh_tx.peer_id() != setup.id.0 || reply_tx.peer_id() != setup.id.0 {
        let message = format!("mesh peer {} does not match core {}", mesh_tx.peer_id(), setup.id.0);
        let _ = ready.send((setup.id.0, Err(message.clone())));
        return Err(message);
    }
    // SAFETY: the main thread bound this listening socket and gave up ownership with the OwnedFd.
    let listener = unsafe { glommio::net::TcpListener::from_raw_fd(setup.listener.into_raw_fd()) };
    let mut state = CoreState::new(setup.limits.clone(), setup.agents)
        .with_node_id(setup.node_id.clone())
        .with_begin_sentence(setup.begin_sentence)
        .with_tools(setup.tools);
    let mut udp = None;
    if let Some(rtc) = setup.rtc {
        let endpoint = crate::rtc::Endpoint::new(rtc.cert, rtc.candidate, setup.limits.rtc_peers_per_core);
        state = state.with_rtc(endpoint, rtc.settings.opus, rtc.settings.playout);
        udp = Some(rtc.socket);
    }
    state = state.with_codec_timer(Box::new(CodecHistograms::new(setup.id)));
    let shared = Rc::new(CoreShared {
        id: setup.id,
        cores: setup.cores,
        state: RefCell::new(state),
        read_scratch: RefCell::new(vec![0u8; limits_read_bytes(&setup.limits)].into_boxed_slice()),
        this: RefCell::new(std::rc::Weak::new()),
        timer_event: Event::new(),
        timer_armed: Cell::new(None),
        coarse: Cell::new(clock::now().instant),
        limits: setup.limits,
        global: setup.global,
        stream_key: setup.stream_key,
        node_id: setup.node_id,
        tls: setup.tls,
        records: setup.records,
        mesh_tx,
        reply_tx,
        pending: RefCell::new(HashMap::new()),
        next_request: Cell::new(0),
        next_conn: Cell::new(0),
        outboxes: RefCell::new(HashMap::new()),
        shutting_down: Cell::new(false),
        shutdown_event: Event::new(),
        connections: Cell::new(0),
        udp,
        udp_send_errors: Cell::new(0),
        input_time: metrics::histogram!("relay_core_input_seconds", "core" => setup.id.0.to_string()),
    });
    *shared.this.borrow_mut() = Rc::downgrade(&shared);
    let service = Rc::new(service);
    for (_, receiver) in mesh_rx.streams() {
        glommio::spawn_local(mesh::receive_task(shared.clone(), service.clone(), receiver)).detach();
    }
    for (_, receiver) in reply_rx.streams() {
        glommio::spawn_local(mesh::reply_task(shared.clone(), receiver)).detach();
    }
    let accept = glommio::spawn_local(tcp::accept_task(shared.clone(), service.clone(), listener));
    let udp = shared.udp.as_ref().map(|_| {
        let shared = shared.clone();
        glommio::spawn_local(async move {
            if let Some(socket) = shared.udp.as_ref() {
                super::rtc::udp_task(shared.clone(), socket).await;
            }
        })
    });
    let spares = shared.udp.as_ref().map(|_| glommio::spawn_local(super::rtc::spares_task(shared.clone())));
    // Serving from now on: a readiness check may come before the timer task first runs.
    shared.beat(shared.now().instant);
    let _ = ready.send((shared.id.0, Ok(())));
    tracing::debug!(core = shared.id.0, "core serving");

    tick_task(&shared).await;

    // Graceful shutdown: stop accepting, end sessions (call_ended, close frames), let connections
    // finish within the grace period.
    accept.cancel().await;
    if let Some(udp) = udp {
        udp.cancel().await;
    }
    if let Some(spares) = spares {
        spares.cancel().await;
    }
    let now = shared.now();
    shared.drive(None, |state| state.handle_shutdown(now));
    // A drained node with no call left has nothing to wait for: it exits at once.
    let grace = if shared.global.shutdown_at_once.load(Ordering::Acquire) {
        Duration::ZERO
    } else {
        shared.limits.shutdown_grace
    };
    let drained = glommio::timer::timeout(grace, async {
        while shared.connections.get() > 0 {
            let listener = shared.shutdown_event.listen();
            if shared.connections.get() == 0 {
                break;
            }
            // Keep enforcing socket deadlines while draining: a peer that ignores our close is
            // dropped after the close wait, not at the end of the grace period.
            let tick = async {
                glommio::timer::sleep(Duration::from_millis(250)).await;
            };
            tick.or(listener).await;
            let now = shared.now().instant;
            shared.coarse.set(now);
            shared.sweep(now);
        }
        Ok(())
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            core = shared.id.0,
            open = shared.connections.get(),
            "connections still open after the shutdown grace period"
        );
    }
    Ok(())
}

/// Runs timers and watches the process-wide shutdown flag; returns when shutdown begins.
async fn tick_task(shared: &Rc<CoreShared>) {
    // The longest sleep: how soon the process-wide shutdown flag is noticed.
    const TICK: Duration = Duration::from_millis(50);
    // How often socket deadlines are swept; they are seconds long, so this is precise enough.
    const SWEEP: Duration = Duration::from_millis(250);
    let mut last_sweep = shared.now().instant;
    loop {
        let listener = shared.timer_event.listen();
        let now = shared.now();
        shared.beat(now.instant);
        let next = shared.state.borrow().poll_timeout();
        shared.timer_armed.set(next);
        let wait = next.map_or(TICK, |t| t.saturating_duration_since(now.instant).min(TICK));
        if !wait.is_zero() {
            // An input that brings a deadline earlier than `next` wakes us through the listener.
            let sleep = async {
                glommio::timer::sleep(wait).await;
            };
            sleep.or(listener).await;
        }
        if shared.global.shutdown.load(Ordering::Acquire) {
            shared.shutting_down.set(true);
            shared.shutdown_event.notify(usize::MAX);
            return;
        }
        let now = shared.now();
        shared.coarse.set(now.instant);
        if now.instant.saturating_duration_since(last_sweep) >= SWEEP {
            last_sweep = now.instant;
            shared.sweep(now.instant);
            shared.publish_depths();
        }
        let due = shared.state.borrow().poll_timeout().is_some_and(|t| t <= now.instant);
        if due {
            shared.drive(None, |state| state.handle_timeout(now));
        }
    }
}

/// Size of a core's shared WebSocket receive buffer: one read's worth.
fn limits_read_bytes(limits: &Limits) -> usize {
    limits.ws_receive_bytes.max(512)
}
