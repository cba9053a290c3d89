//! One core's shared state ([`CoreShared`]) and the control plane's handle on it ([`CoreHandle`]):
//! `drive` feeds one input to the sans-IO [`CoreState`] and applies every output.
//!
//! Invariant: every call into `CoreState` goes through [`CoreShared::drive`], which drains all
//! outputs before returning and catches panics: a bug drops the session it concerns, not the core.
//! `drive` starts no task: media and socket outputs are written at once, work that outlives the
//! input (dials, tool calls) goes on the core's [`WorkQueue`].

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use event_listener::Event;
use futures::channel::oneshot;
use glommio::channels::channel_mesh::Senders;

use super::clock;
use super::fetch::{self, FetchError, FetchRequest};
use super::global::{CoreStats, Global};
use super::message::{CoreMessage, ReplyMessage};
use super::outbox::Outbox;
use super::work::{Dial, Work, WorkQueue};
use crate::config::Limits;
use crate::core::command::{Command, CommandError, Reply};
use crate::core::{CoreState, Output, ToolCall, ToolResult};
use crate::id::{core_for, ConnectionId, CoreId, SessionId};
use crate::proto::http_client::Response as FetchResponse;
use crate::time::Now;

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
    pub(super) records: Option<crate::config::RecordSink>,
    pub(super) state: RefCell<CoreState>,
    /// The one buffer every WebSocket reader on this core receives into: borrowed only inside a
    /// single poll (the bytes go straight on to the socket's codec), so idle sockets hold none.
    pub(crate) read_scratch: RefCell<Box<[u8]>>,
    pub(super) mesh_tx: Senders<CoreMessage>,
    /// Replies travel on their own mesh, sized to the bound on outstanding requests, so a reply
    /// always has room and is never shed.
    pub(super) reply_tx: Senders<ReplyMessage>,
    /// Requests sent to other cores, waiting for their reply, by request number.
    pub(super) pending: RefCell<HashMap<u64, oneshot::Sender<Result<Reply, CommandError>>>>,
    pub(super) next_request: Cell<u64>,
    pub(super) next_conn: Cell<u64>,
    /// Outgoing queues of the event sockets this core serves.
    pub(super) outboxes: RefCell<HashMap<ConnectionId, Rc<Outbox>>>,
    /// Work `drive` asks for that outlives the input (agent dials, tool calls), for the work
    /// task `run_core` starts.
    pub(super) work: WorkQueue,
    /// Wakes the timer task when an input brings a deadline earlier than the one it sleeps until.
    pub(super) timer_event: Event,
    /// The deadline the timer task sleeps until.
    pub(super) timer_armed: Cell<Option<std::time::Instant>>,
    /// The time at the timer task's last wake-up (at most 50 ms old): cheap time for liveness
    /// bookkeeping, which needs no better.
    pub(super) coarse: Cell<std::time::Instant>,
    /// Set once graceful shutdown began; `shutdown_event` wakes the tasks that wait on it.
    pub(crate) shutting_down: Cell<bool>,
    pub(crate) shutdown_event: Event,
    /// Connections open on this core (HTTP and WebSocket).
    pub(crate) connections: Cell<usize>,
    /// The core's WebRTC socket (non-blocking): `drive` sends datagrams on it directly, as a UDP
    /// send never waits; one the kernel refuses is dropped, as the network may drop any datagram.
    pub(super) udp: Option<std::net::UdpSocket>,
    /// Datagrams the kernel refused to send.
    pub(crate) udp_send_errors: Cell<u64>,
    /// Time to handle one input and apply its outputs (`relay_core_input_seconds{core}`): what
    /// the core adds to every frame it routes. A handle made once, recorded without a lock.
    pub(super) input_time: metrics::Histogram,
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
    /// [`FetchError`] when the request cannot complete within `timeout`.
    pub async fn fetch(&self, request: FetchRequest, timeout: Duration) -> Result<FetchResponse, FetchError> {
        fetch::fetch(request, timeout).await
    }

    /// Runs `f` on the executor's blocking thread pool and returns its result: for work that may
    /// block or take long (file or database I/O), which must never run on a core's thread.
    pub async fn blocking<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> R {
        glommio::executor().spawn_blocking(f).await
    }

    /// Every core's counts, from the shared gauges.
    pub fn stats(&self) -> Vec<CoreStats> {
        self.0.global.stats(self.0.cores)
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
        loop {
            // Refused work is rare (the core bounds dials and tool calls below the queue's size):
            // this allocates nothing unless some is refused.
            let mut refused = Vec::new();
            while let Some(output) = state.poll_output() {
                match self.apply(output) {
                    Applied::Done => {}
                    Applied::Dropped(conn) => state.handle_send_dropped(conn, 1),
                    Applied::Refused(work) => refused.push(work),
                }
            }
            if refused.is_empty() {
                break;
            }
            for work in refused {
                self.refuse_work(&mut state, work);
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
    pub(super) fn beat(&self, now: std::time::Instant) {
        let uptime_ms = now.saturating_duration_since(self.global.started).as_millis() as u64;
        self.global.ticks[self.id.0].store(uptime_ms, Ordering::Relaxed);
    }

    /// Publishes the depths of this core's queues. Measuring them visits every session, so this
    /// runs on the periodic sweep, not after every input.
    pub(super) fn publish_depths(&self) {
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
    pub(super) fn sweep(&self, now: std::time::Instant) {
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

    /// Carries out `output`: media and socket outputs at once, work (dials, tool calls) onto the
    /// work queue.
    fn apply(&self, output: Output) -> Applied {
        let outboxes = self.outboxes.borrow();
        match output {
            Output::Send { conn, text } => {
                if let Some(outbox) = outboxes.get(&conn) {
                    if !outbox.push(text, self.limits.ws_outbox_frames) {
                        return Applied::Dropped(conn);
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
                let target = Box::new(Dial { url, bearer, header });
                if let Err(work) = self.work.push(Work::Dial { conn, session, target }) {
                    return Applied::Refused(work);
                }
            }
            Output::Record(change) => {
                if let Some(sink) = &self.records {
                    sink.send(change);
                }
            }
            Output::CallTool(call) => {
                if let Err(work) = self.work.push(Work::Tool(call)) {
                    return Applied::Refused(work);
                }
            }
        }
        Applied::Done
    }

    /// Hands back to the core work the queue refused: the dial or tool call fails at once, as it
    /// would have failed on its own, so the leg or call that asked for it ends and nothing waits.
    fn refuse_work(&self, state: &mut CoreState, work: Work) {
        const FULL: &str = "the core's work queue is full";
        tracing::warn!(core = self.id.0, "{FULL}: an agent dial or tool call was refused");
        let now = clock::now();
        let (session, refused) = match work {
            Work::Dial { conn, session, .. } => {
                let refused: Box<dyn FnOnce(&mut CoreState)> =
                    Box::new(move |state| state.handle_agent_closed(now, conn, FULL));
                (session, refused)
            }
            Work::Tool(call) => {
                let ToolCall { session, conn, call_id, .. } = *call;
                let result = ToolResult { session: session.clone(), conn, call_id, outcome: Err(FULL.to_owned()) };
                let refused: Box<dyn FnOnce(&mut CoreState)> =
                    Box::new(move |state| state.handle_tool_result(now, result));
                (session, refused)
            }
        };
        if catch_unwind(AssertUnwindSafe(|| refused(state))).is_err() {
            tracing::error!(core = self.id.0, session = %session, "a core input panicked; its session was dropped");
            let _ = catch_unwind(AssertUnwindSafe(|| state.handle_panic(&session)));
        }
    }
}

/// What became of one output.
enum Applied {
    /// Carried out (or dropped as the network drops a datagram).
    Done,
    /// A message the socket's outbox could not take.
    Dropped(ConnectionId),
    /// Work the work queue could not take.
    Refused(Work),
}
