//! One core's life: [`run_core`] joins the mesh, builds the core's [`CoreShared`], starts every
//! task of the core (mesh receivers, accept, UDP, spare WebRTC peers, the work task) and runs the
//! timer task until shutdown, then drains.
//!
//! Invariant: the only module that starts a core's long-lived tasks; it imports the tasks it
//! starts, and none of them imports it (the work the core asks for while it runs reaches
//! [`work_task`] through the core's `WorkQueue`).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use event_listener::Event;
use futures_lite::FutureExt;
use glommio::channels::channel_mesh::{Full, MeshBuilder};

use super::global::Global;
use super::message::{CoreMessage, ReplyMessage};
use super::rtc::CoreRtc;
use super::service::ControlService;
use super::shared::CoreShared;
use super::work::{Work, WorkQueue};
use super::{agent, clock, mesh, rtc, tcp, tools};
use crate::config::Limits;
use crate::core::CoreState;
use crate::id::CoreId;
use crate::session::media::{CodecOp, CodecTimer};

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
    pub(crate) rtc: Option<CoreRtc>,
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
    let work_capacity = work_capacity(&setup.limits, &setup.tools);
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
        work: WorkQueue::new(work_capacity),
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
    let service = Rc::new(service);
    for (_, receiver) in mesh_rx.streams() {
        glommio::spawn_local(mesh::receive_task(shared.clone(), service.clone(), receiver)).detach();
    }
    for (_, receiver) in reply_rx.streams() {
        glommio::spawn_local(mesh::reply_task(shared.clone(), receiver)).detach();
    }
    // Detached: work queued during the shutdown grace period (a dial a late command asked for)
    // is still carried out, as the connections it would join are.
    glommio::spawn_local(work_task(shared.clone())).detach();
    let accept = glommio::spawn_local(tcp::accept_task(shared.clone(), service.clone(), listener));
    let udp = shared.udp.as_ref().map(|_| {
        let shared = shared.clone();
        glommio::spawn_local(async move {
            if let Some(socket) = shared.udp.as_ref() {
                rtc::udp_task(shared.clone(), socket).await;
            }
        })
    });
    let spares = shared.udp.as_ref().map(|_| glommio::spawn_local(rtc::spares_task(shared.clone())));
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

/// Room in a core's work queue: every session's agent dial and its tool calls at once. The core
/// bounds both (one agent leg per session, `concurrent_per_session` tool calls), so the queue
/// refuses nothing a core asks for within its limits.
fn work_capacity(limits: &Limits, tools: &crate::config::ToolSettings) -> usize {
    limits.sessions_per_core.saturating_mul(1 + tools.concurrent_per_session)
}

/// Empties the core's work queue, spawning one task per item; sleeps until the next push into
/// an empty queue. Runs for the core's life.
async fn work_task(shared: Rc<CoreShared>) {
    loop {
        let listener = shared.work.listen();
        while let Some(work) = shared.work.pop() {
            match work {
                Work::Dial { conn, session, target } => {
                    glommio::spawn_local(agent::agent_task(shared.clone(), conn, session, *target)).detach();
                }
                Work::Tool(call) => {
                    glommio::spawn_local(tools::tool_task(shared.clone(), *call)).detach();
                }
            }
        }
        listener.await;
    }
}
