//! Everything one core owns: its sessions, every connection attached to them (event and frontend
//! listeners, caller streams, agent legs), media routing between them, and their timers.
//!
//! Invariant: sans-IO. Inputs arrive through `handle_*` with the time passed in; effects leave
//! through [`CoreState::poll_output`]; nothing here touches a socket, a clock or another core.

pub mod command;
mod llm;
mod realtime_agent;
mod rtc;
mod tools;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::time::Instant;

use bytes::Bytes;
use serde_json::{json, Value};
use tungstenite::Utf8Bytes;

use crate::config::Limits;
use crate::id::{ConnectionId, SessionId};
use crate::media::pacer;
use crate::proto::events::{self, ClientMessage, RetellEvent};
use crate::proto::{frontend, realtime, twilio};
use crate::secret::Secret;
use crate::session::agent::{AgentPolicy, AgentProtocol, AgentUrl};
use crate::session::media::{CodecTimer, Timing};
use crate::session::{Agent, Caller, Pending, Session, AGENT_BACKLOG};
use crate::time::Now;
use command::{Command, CommandError, Reply};
pub use tools::{ToolCall, ToolResult, ToolStats};

/// Connection ids the core hands out itself (agent legs it dials) have this bit set, so they never
/// collide with the shell's ids for accepted connections.
const CORE_CONN_BIT: u64 = 1 << 63;

/// Proof of identity a listener presented.
#[derive(Debug, Clone)]
pub enum Credential {
    /// The relay's API key (checked by the control plane): may watch any session.
    Operator,
    /// A session access token (`Authorization: Bearer` or `?accessToken=`).
    Token(Secret),
    /// Nothing: enough only for sessions without an access token (calls that arrived by stream).
    Anonymous,
}

/// What a listener receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenKind {
    /// `/ws`: `connection_established`, `pong`, `retell_event`s.
    Events,
    /// `/frontend-stream`: `audio` of both tracks and `transcription`, after `connect-twilio`.
    Frontend,
}

/// Why a listener may not attach.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttachError {
    /// No credential, or not the session's access token.
    #[error("a valid access token for this session is required")]
    Unauthorized,
    /// The session has `observers_per_session` listeners already.
    #[error("this session has its limit of {limit} listeners")]
    TooManyObservers {
        /// The configured limit.
        limit: usize,
    },
    /// The core holds `pending_sessions_per_core` not-yet-started ids with waiting sockets.
    #[error("too many sessions are waiting to start on this core")]
    TooManyPending,
    /// The relay is shutting down and takes no new sockets.
    #[error("the relay is shutting down")]
    ShuttingDown,
    /// The node is draining: a listener of a call it does not know may not wait here for it.
    #[error("this relay node is draining and takes no new calls")]
    Draining,
}

/// An effect for the shell to carry out.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Send this text message on the connection.
    Send {
        /// The socket.
        conn: ConnectionId,
        /// JSON text, shared by every socket it goes to.
        text: Utf8Bytes,
    },
    /// Send a close frame with `code` and `reason`, then close the connection.
    Close {
        /// The socket.
        conn: ConnectionId,
        /// WebSocket close code.
        code: u16,
        /// Close reason for the peer.
        reason: &'static str,
    },
    /// Dial the agent at `url` as connection `conn`, then report `handle_agent_open` or
    /// `handle_agent_closed`.
    ConnectAgent {
        /// The id the agent leg will have.
        conn: ConnectionId,
        /// The session it belongs to.
        session: SessionId,
        /// Where to dial.
        url: AgentUrl,
        /// What it speaks.
        protocol: AgentProtocol,
        /// Sent as `Authorization: Bearer` (a Realtime API key).
        bearer: Option<Secret>,
        /// One more upgrade header field the protocol needs (name, value): the Realtime beta
        /// interface's `OpenAI-Beta: realtime=v1`.
        header: Option<(&'static str, &'static str)>,
    },
    /// Send this datagram from the core's WebRTC socket.
    Datagram {
        /// Where to.
        to: std::net::SocketAddr,
        /// The bytes.
        data: Vec<u8>,
    },
    /// A call record changed: hand the whole record to the record store (boxed: records are
    /// large next to the other outputs, and travel on by pointer).
    Record(Box<command::RecordChange>),
    /// POST a Realtime agent's function call to the tools server, then report what became of it
    /// with [`CoreState::handle_tool_result`] (boxed: a call carries its body).
    CallTool(Box<ToolCall>),
}

/// Counts a core exposes to health checks and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    /// Sessions started and not stopped.
    pub active_sessions: usize,
    /// Attached listeners (event and frontend sockets), waiting ones included.
    pub observers: usize,
    /// Connected caller streams.
    pub callers: usize,
    /// Malformed or out-of-order messages received on media legs (answered by ignoring them).
    pub protocol_errors: u64,
    /// Agent audio or marks refused because the pacer queue was full.
    pub pacer_drops: u64,
    /// `error` events Realtime agents sent, fatal (their leg ended) or not, and Realtime sessions
    /// that could not be opened (refused upgrade, unreachable server, timeout).
    pub agent_errors: u64,
    /// WebRTC counters.
    pub rtc: RtcStats,
    /// Audio frames received, by the kind of leg they came from: Twilio `media` messages, Realtime
    /// audio deltas, RTP packets of WebRTC legs.
    pub frames_in: PerLeg,
    /// Audio frames sent, by the kind of leg they went to: one per socket or peer (a frame that
    /// goes to three frontends counts three).
    pub frames_out: PerLeg,
    /// Messages the shell could not queue for a socket (its queue was full, or it was closing) or
    /// its encoder refused, by the socket's kind, as reported through
    /// [`CoreState::handle_send_dropped`].
    pub dropped: PerLeg,
    /// Such messages for a socket no longer attached to a call (its kind unknown).
    pub dropped_unattached: u64,
    /// Realtime agents' function calls.
    pub tools: ToolStats,
}

/// What kind of leg a socket or peer is to its call: the `leg` label of the per-leg metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LegKind {
    /// A caller's Twilio Media Stream (`/twilio/stream`).
    Caller,
    /// A Twilio-protocol bot the relay dialled as the agent.
    Bot,
    /// An OpenAI-Realtime agent the relay dialled.
    Realtime,
    /// A WebRTC leg (WHIP caller, agent or custom stream; WHEP listener).
    Webrtc,
    /// A `/frontend-stream` listener.
    Frontend,
    /// A `/ws` event listener (audio only as raw agent samples, when the call asked for them).
    Events,
    /// Retell's custom-LLM socket (`/llm-websocket`) or the upstream LLM it is forwarded to: text only.
    Retell,
}

impl LegKind {
    /// Every kind, in the order of [`LegKind::index`].
    pub const ALL: [Self; 7] =
        [Self::Caller, Self::Bot, Self::Realtime, Self::Webrtc, Self::Frontend, Self::Events, Self::Retell];

    /// The metric label (`leg`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Caller => "caller",
            Self::Bot => "bot",
            Self::Realtime => "realtime",
            Self::Webrtc => "webrtc",
            Self::Frontend => "frontend",
            Self::Events => "events",
            Self::Retell => "retell",
        }
    }

    /// Position in [`LegKind::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// Whether the relay receives audio on legs of this kind.
    pub fn receives_audio(self) -> bool {
        matches!(self, Self::Caller | Self::Bot | Self::Realtime | Self::Webrtc)
    }

    /// Whether the relay sends audio on legs of this kind.
    pub fn sends_audio(self) -> bool {
        !matches!(self, Self::Retell)
    }

    /// Whether legs of this kind are WebSockets (whose messages the shell queues, and may drop).
    pub fn is_socket(self) -> bool {
        !matches!(self, Self::Webrtc)
    }
}

/// A count for each [`LegKind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PerLeg(pub(crate) [u64; LegKind::ALL.len()]);

impl PerLeg {
    /// The count for `kind`.
    pub fn get(&self, kind: LegKind) -> u64 {
        self.0[kind.index()]
    }

    /// The sum over every kind.
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    fn add(&mut self, kind: LegKind, n: u64) {
        self.0[kind.index()] += n;
    }
}

/// How much waits in a core's queues now ([`CoreState::queue_depths`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueDepths {
    /// Agent audio in callers' pacers, not yet released toward them, in 20 ms frames (8 kHz).
    pub pacer_frames: u64,
    /// Caller frames and key presses held for agents still being dialled.
    pub agent_backlog: u64,
    /// WebRTC packets held in playout buffers (reordering and jitter absorption).
    pub playout_packets: u64,
}

/// What a core's WebRTC legs saw of the audio they received.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RtcStats {
    /// WebRTC peers now.
    pub peers: u64,
    /// Frames whose packet had not arrived when they were due.
    pub lost: u64,
    /// Frames made up by Opus's loss concealment.
    pub concealed: u64,
    /// Frames recovered from the next packet's forward error correction.
    pub fec_recovered: u64,
    /// Packets that arrived after their frame was played (dropped).
    pub late: u64,
    /// Packets that could not be decoded (concealed instead).
    pub decode_errors: u64,
    /// Frames that could not be encoded toward a peer or the WHEP mix (not sent).
    pub encode_errors: u64,
}

/// A core's sessions and their connections.
pub struct CoreState {
    limits: Limits,
    agents: AgentPolicy,
    slots: HashMap<SessionId, Slot>,
    /// Which session each attached connection belongs to, and as what.
    conns: HashMap<ConnectionId, (SessionId, Role)>,
    /// Ids that have listeners but no session, in the order their wait started. All waits last the
    /// same `pending_observer_timeout`, so the queue is sorted by deadline.
    pending: VecDeque<(Instant, SessionId)>,
    /// Session timers (pacing, marks), earliest first; an entry is stale unless it equals the
    /// session's `armed` time.
    timers: BinaryHeap<Reverse<(Instant, SessionId)>>,
    outputs: VecDeque<Output>,
    next_conn: u64,
    stats: Stats,
    /// Ids whose listeners wait for a start now (the `pending` queue also holds stale entries).
    waiting: usize,
    /// Set by `handle_shutdown`: no new sessions or sockets from then on.
    shutting_down: bool,
    /// Set and cleared by `handle_drain` (the node's drain flag, which the shell shares between
    /// its cores): while set, no leg may begin a call this core does not know; its calls go on.
    draining: bool,
    /// This node's name, stored in every call record it makes ([`CoreState::with_node_id`]).
    node_id: String,
    /// Call records by call id, kept after their session ends; the oldest go first past
    /// `records_per_core`.
    records: HashMap<SessionId, command::CallRecord>,
    record_order: VecDeque<SessionId>,
    /// WebRTC, when enabled ([`CoreState::with_rtc`]).
    rtc: Option<rtc::RtcState>,
    /// Retell LLM sockets (`/llm-websocket/{call_id}`).
    llm: HashMap<ConnectionId, llm::LlmSocket>,
    /// Upstream LLM sockets, and the Retell socket each serves.
    llm_up: HashMap<ConnectionId, ConnectionId>,
    /// What the built-in Retell responder says first.
    begin_sentence: String,
    /// Times codec calls for metrics ([`CoreState::with_codec_timer`]); none: nothing is timed.
    codec_timer: Option<Box<dyn CodecTimer + Send>>,
    /// Realtime agents' tools and their webhook ([`CoreState::with_tools`]).
    tools: crate::config::ToolSettings,
    /// Each Realtime leg's declared tools and calls, by session; removed when the session ends.
    tool_calls: HashMap<SessionId, tools::SessionTools>,
}

/// What a connection is to its session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Listener,
    /// A caller stream whose `start` has not arrived yet.
    CallerPending,
    Caller,
    Agent,
}

/// One id's entry: the session once started, and the listeners watching it (before or after).
#[derive(Default)]
struct Slot {
    session: Option<Session>,
    listeners: Vec<Listener>,
    /// When the first listener started waiting for the session to start.
    waiting_since: Option<Instant>,
    /// Times the wait was extended because the call was still being placed.
    extensions: u8,
}

struct Listener {
    conn: ConnectionId,
    credential: Credential,
    kind: ListenKind,
    /// Frontends receive audio only after `connect-twilio`; event sockets at once.
    active: bool,
}

impl CoreState {
    /// An empty core that dials agents as `agents` allows.
    pub fn new(limits: Limits, agents: AgentPolicy) -> Self {
        Self {
            limits,
            agents,
            slots: HashMap::new(),
            conns: HashMap::new(),
            pending: VecDeque::new(),
            timers: BinaryHeap::new(),
            outputs: VecDeque::new(),
            next_conn: 0,
            stats: Stats::default(),
            waiting: 0,
            shutting_down: false,
            draining: false,
            node_id: String::new(),
            records: HashMap::new(),
            record_order: VecDeque::new(),
            rtc: None,
            llm: HashMap::new(),
            llm_up: HashMap::new(),
            begin_sentence: DEFAULT_BEGIN_SENTENCE.to_owned(),
            codec_timer: None,
            tools: crate::config::ToolSettings::default(),
            tool_calls: HashMap::new(),
        }
    }

    /// Times every codec call (Opus, resampling, μ-law) with `timer`.
    #[must_use]
    pub fn with_codec_timer(mut self, timer: Box<dyn CodecTimer + Send>) -> Self {
        self.codec_timer = Some(timer);
        self
    }

    /// Names the node in every call record this core makes (`EngineConfig::node_id`).
    #[must_use]
    pub fn with_node_id(mut self, node_id: String) -> Self {
        self.node_id = node_id;
        self
    }

    /// Starts (`true`) or ends (`false`) draining: while draining, a leg that would begin a call
    /// this core does not know is refused ([`CommandError::Draining`], [`AttachError::Draining`],
    /// close 1013 for a caller stream), and every leg of a call it knows is served as before.
    pub fn handle_drain(&mut self, draining: bool) {
        self.draining = draining;
    }

    /// Whether a new leg of call `id` may begin here: always, unless the core is draining and
    /// does not know the call (no session, no record of a call still going).
    ///
    /// # Errors
    /// [`CommandError::Draining`] when it may not.
    pub fn admits(&self, id: &SessionId) -> Result<(), CommandError> {
        if !self.draining || self.knows(id) {
            Ok(())
        } else {
            Err(CommandError::Draining)
        }
    }

    /// Whether `id` is a call of this core: a session, or a record of a call not yet over (a
    /// webhook or an outbound request came before its stream).
    fn knows(&self, id: &SessionId) -> bool {
        self.slots.get(id).is_some_and(|s| s.session.is_some())
            || self.records.get(id).is_some_and(|r| status_rank(&r.status) < FINAL && r.end_ms.is_none())
    }

    /// Sets what the built-in Retell responder says first (empty: nothing).
    #[must_use]
    pub fn with_begin_sentence(mut self, sentence: String) -> Self {
        self.begin_sentence = sentence;
        self
    }

    /// Runs a control command for `id`.
    ///
    /// # Errors
    /// [`CommandError`] when the session is missing, already exists, or the core is full.
    pub fn handle_command(&mut self, now: Now, id: &SessionId, command: Command) -> Result<Reply, CommandError> {
        match command {
            Command::Record(update) => {
                let record = self.update_record(now, id, *update);
                self.emit_record(id);
                return Ok(Reply::Record(Box::new(record)));
            }
            Command::ReadRecord => {
                return self.records.get(id).map(|r| Reply::Record(Box::new(r.clone()))).ok_or(CommandError::NotFound)
            }
            Command::Transcript(t) => return self.transcript(now, id, *t),
            Command::RtcOffer(offer) => return self.rtc_offer(now, id, *offer),
            Command::RtcEnd { leg, credential } => return self.rtc_end(now, id, leg, &credential),
            Command::RtcPatch(patch) => return self.rtc_patch(now, id, &patch),
            Command::Admit => return self.admits(id).map(|()| Reply::Admitted),
            _ => {}
        }
        if let Command::Start(start) = command {
            if self.shutting_down {
                return Err(CommandError::ShuttingDown);
            }
            self.admits(id)?;
            if self.slots.get(id).is_some_and(|s| s.session.is_some()) {
                return Err(CommandError::AlreadyActive);
            }
            if self.stats.active_sessions >= self.limits.sessions_per_core {
                return Err(CommandError::CoreFull { limit: self.limits.sessions_per_core });
            }
            self.create(now, id, Session::new(id.clone(), start));
            return Ok(Reply::Started);
        }
        let slot = self.slots.get_mut(id).ok_or(CommandError::NotFound)?;
        let has_listeners = slot.listeners.iter().any(|l| l.kind == ListenKind::Events);
        let session = slot.session.as_mut().ok_or(CommandError::NotFound)?;
        let (reply, event) = match command {
            Command::Start(_)
            | Command::Record(_)
            | Command::ReadRecord
            | Command::Transcript(_)
            | Command::RtcOffer(_)
            | Command::RtcPatch(_)
            | Command::RtcEnd { .. }
            | Command::Admit => {
                unreachable!("handled above")
            }
            Command::Stop => {
                self.end(now, id, "stopped", 1000, "call ended");
                return Ok(Reply::Stopped);
            }
            Command::SetMicrophone(enabled) => (Reply::Microphone { enabled }, Some(session.set_microphone(enabled))),
            Command::SendCustomStream(stream) => {
                let event = session.send_custom_stream(stream.clone());
                (Reply::CustomStream(stream), Some(event))
            }
            Command::ResumeMicrophone => (Reply::MicrophoneResumed, Some(session.resume_microphone())),
            Command::CallStatus => (Reply::CallStatus(session.call_status(has_listeners)), None),
            Command::TrackStatus => (Reply::TrackStatus(session.track_status()), None),
        };
        if let Some((event, data)) = event {
            self.broadcast(now, id, event, data);
        }
        Ok(reply)
    }

    /// Attaches listener `conn` to `id` (started or not yet). Event sockets get their
    /// `connection_established` message back; frontends get nothing until they say `connect-twilio`.
    ///
    /// # Errors
    /// [`AttachError`] when the credential does not fit or a limit is reached.
    pub fn handle_attach(
        &mut self,
        now: Now,
        id: &SessionId,
        conn: ConnectionId,
        kind: ListenKind,
        credential: Credential,
    ) -> Result<Option<Utf8Bytes>, AttachError> {
        if self.shutting_down {
            return Err(AttachError::ShuttingDown);
        }
        match self.slots.get(id) {
            Some(slot) => {
                match &slot.session {
                    Some(session) if !authorizes(session, &credential) => return Err(AttachError::Unauthorized),
                    None if kind == ListenKind::Events && matches!(credential, Credential::Anonymous) => {
                        return Err(AttachError::Unauthorized)
                    }
                    _ => {}
                }
                if slot.listeners.len() >= self.limits.observers_per_session {
                    return Err(AttachError::TooManyObservers { limit: self.limits.observers_per_session });
                }
            }
            None => {
                // Event sockets must bring a credential to wait; frontends (seed 004) may wait
                // anonymously and are checked against the session's token when it starts.
                if kind == ListenKind::Events && matches!(credential, Credential::Anonymous) {
                    return Err(AttachError::Unauthorized);
                }
                if self.admits(id).is_err() {
                    return Err(AttachError::Draining);
                }
                if self.waiting >= self.limits.pending_sessions_per_core {
                    return Err(AttachError::TooManyPending);
                }
                self.waiting += 1;
                self.pending.push_back((now.instant, id.clone()));
                self.slots.insert(id.clone(), Slot { waiting_since: Some(now.instant), ..Slot::default() });
            }
        }
        let slot = self.slots.get_mut(id).expect("inserted or found just above");
        slot.listeners.push(Listener { conn, credential, kind, active: kind == ListenKind::Events });
        self.conns.insert(conn, (id.clone(), Role::Listener));
        self.stats.observers += 1;
        Ok(match kind {
            ListenKind::Events => {
                let is_connected = slot.session.as_ref().is_some_and(|s| s.caller.is_some());
                Some(events::connection_established(id, is_connected, false))
            }
            ListenKind::Frontend => None,
        })
    }

    /// Detaches `conn`, whatever it is (its socket closed; `peer_closed` when the peer ended it with
    /// a close frame). A caller that leaves ends its call; a Twilio-protocol agent that says goodbye
    /// ends the call once its audio has played; an agent that is lost, or a Realtime agent that
    /// closes, is reported and the call goes on.
    pub fn handle_detach(&mut self, now: Now, conn: ConnectionId, peer_closed: bool) {
        if self.llm_detach(conn) {
            return;
        }
        let Some((id, role)) = self.conns.get(&conn).cloned() else { return };
        match role {
            Role::Listener => {
                self.conns.remove(&conn);
                self.stats.observers -= 1;
                let Some(slot) = self.slots.get_mut(&id) else { return };
                slot.listeners.retain(|l| l.conn != conn);
                if slot.session.is_none() && slot.listeners.is_empty() {
                    self.slots.remove(&id);
                    self.waiting -= 1;
                }
            }
            Role::CallerPending => {
                self.conns.remove(&conn);
            }
            Role::Caller => self.end(now, &id, "caller_hangup", 1000, "call ended"),
            Role::Agent if peer_closed => self.handle_agent_hangup(now, conn),
            Role::Agent => self.handle_agent_closed(now, conn, "connection lost"),
        }
    }

    /// The open agent leg `conn` closed its socket normally: like a bot behind Twilio whose socket
    /// closes, it ends the call, after the audio it already sent has played to the caller. A
    /// Realtime leg's close ends only that leg.
    fn handle_agent_hangup(&mut self, now: Now, conn: ConnectionId) {
        let Some((id, Role::Agent)) = self.conns.get(&conn).cloned() else { return };
        let session = self.slots.get(&id).and_then(|s| s.session.as_ref());
        let open = session.is_some_and(|s| matches!(s.agent, Agent::Open { conn: c, .. } if c == conn));
        if !open {
            return self.handle_agent_closed(now, conn, "connection closed");
        }
        // A Realtime server has no way to hang up a call: its close (after a refusal, an error,
        // or its session's time limit) ends only the agent leg.
        if session.is_some_and(|s| s.agent_protocol == AgentProtocol::Realtime) {
            return self.handle_agent_closed(now, conn, "the Realtime server closed the session");
        }
        self.conns.remove(&conn);
        if let Some(session) = self.slots.get_mut(&id).and_then(|s| s.session.as_mut()) {
            session.agent = Agent::Finished;
        }
        self.schedule(now, &id);
        self.finish_if_played(now, &id);
    }

    /// Ends a call whose agent said goodbye once nothing it sent is still queued or playing.
    fn finish_if_played(&mut self, now: Now, id: &SessionId) {
        let Some(session) = self.slots.get(id).and_then(|s| s.session.as_ref()) else { return };
        if session.agent == Agent::Finished
            && session.pacer.queued_samples() == 0
            && session.pacer.in_flight_samples(now.instant) == 0
        {
            self.end(now, id, "agent_hangup", 1000, "call ended");
        }
    }

    /// A text message from listener `conn`.
    pub fn handle_listener_text(&mut self, now: Now, conn: ConnectionId, text: &str) {
        let Some((id, Role::Listener)) = self.conns.get(&conn).cloned() else { return };
        let kind = self.slots.get(&id).and_then(|s| s.listeners.iter().find(|l| l.conn == conn)).map(|l| l.kind);
        match kind {
            Some(ListenKind::Events) => match events::parse_client(text) {
                Ok(ClientMessage::Ping) => self.send(conn, events::pong(now.unix_ms)),
                Ok(ClientMessage::Other) => {}
                Err(e) => {
                    let text =
                        events::retell_event(RetellEvent::Error, json!({ "message": e.to_string() }), now.unix_ms);
                    self.send(conn, text);
                }
            },
            Some(ListenKind::Frontend) => match frontend::parse_client(text) {
                Ok(frontend::ClientMessage::ConnectTwilio { call_sid, .. }) if call_sid == id.as_str() => {
                    if let Some(l) =
                        self.slots.get_mut(&id).and_then(|s| s.listeners.iter_mut().find(|l| l.conn == conn))
                    {
                        l.active = true;
                    }
                }
                Ok(frontend::ClientMessage::ConnectTwilio { .. }) => {
                    self.stats.protocol_errors += 1;
                    self.close(conn, 1008, "callSid does not match this stream");
                }
                Ok(frontend::ClientMessage::Other) => {}
                Err(_) => self.stats.protocol_errors += 1,
            },
            None => {}
        }
    }

    /// A caller's stream socket for session `id` opened on this core; its frames follow.
    pub fn handle_caller_open(&mut self, id: &SessionId, conn: ConnectionId) {
        self.conns.insert(conn, (id.clone(), Role::CallerPending));
    }

    /// A text frame from a caller's stream (Twilio Media Streams).
    pub fn handle_caller_frame(&mut self, now: Now, conn: ConnectionId, frame: &Bytes) {
        let Some((id, role)) = self.conns.get(&conn).cloned() else { return };
        let Ok(message) = twilio::parse(frame) else {
            self.stats.protocol_errors += 1;
            return;
        };
        match (role, message) {
            (Role::CallerPending, twilio::Message::Connected) => {}
            (Role::CallerPending, twilio::Message::Start(start)) => self.caller_started(now, &id, conn, start),
            (Role::Caller, twilio::Message::Media(media)) => {
                self.stats.frames_in.add(LegKind::Caller, 1);
                if let Some(session) = self.slots.get_mut(&id).and_then(|s| s.session.as_mut()) {
                    session.counts.caller.frames_in += 1;
                }
                self.route_caller_audio(now, &id, &media);
            }
            (Role::Caller, twilio::Message::Dtmf(dtmf)) => self.route_dtmf(now, &id, dtmf.digit),
            (Role::Caller, twilio::Message::Mark(mark)) => self.caller_mark(&id, &mark.name),
            (Role::Caller, twilio::Message::Stop(_)) => self.end(now, &id, "caller_hangup", 1000, "call ended"),
            // A second start, media before start, clear from the wrong side:
            // out of order for this protocol; ignored and counted.
            _ => self.stats.protocol_errors += 1,
        }
        self.schedule(now, &id);
    }

    /// The agent leg `conn` connected: the relay greets it as Twilio would.
    ///
    /// Returns false when its session is gone (the shell then closes the connection).
    pub fn handle_agent_open(&mut self, now: Now, conn: ConnectionId) -> bool {
        if let Some(open) = self.llm_upstream_open(conn) {
            return open;
        }
        let Some((id, Role::Agent)) = self.conns.get(&conn).cloned() else { return false };
        let Some(session) = self.slots.get_mut(&id).and_then(|s| s.session.as_mut()) else { return false };
        let backlog = match &mut session.agent {
            Agent::Connecting { conn: c, backlog } if *c == conn => std::mem::take(backlog),
            _ => return false,
        };
        let Some(greeting) = session.greeting() else { return false };
        // The session's bearer token and the relay's stream signature are the relay's, not the
        // agent's: every other parameter reaches it as Twilio would pass it on.
        let forwarded: Vec<(String, String)> = greeting
            .custom_parameters
            .iter()
            .filter(|(k, _)| !RELAY_PRIVATE_PARAMETERS.contains(&k.as_str()))
            .cloned()
            .collect();
        let start = twilio::start_msg(1, &twilio::StartParams { custom_parameters: &forwarded, ..greeting.params() });
        let stream_sid = greeting.stream_sid.clone();
        session.agent = Agent::Open { conn, sequence: 2, chunk: 1, next_at: 0 };
        if session.agent_protocol == AgentProtocol::Realtime {
            self.realtime_open(now, &id, conn, backlog);
            return true;
        }
        self.send(conn, twilio::connected_msg());
        self.send(conn, start);
        // What the caller said while the agent was being dialled follows, in order.
        for item in backlog {
            let Some(session) = self.slots.get_mut(&id).and_then(|s| s.session.as_mut()) else { break };
            let text = match item {
                Pending::Media { payload, samples, chunk, timestamp_ms } => {
                    let Some((_, t)) = session.agent_media_msg(&payload, samples, chunk, timestamp_ms) else { break };
                    self.stats.frames_out.add(LegKind::Bot, 1);
                    session.counts.agent.frames_out += 1;
                    t
                }
                Pending::Dtmf(digit) => {
                    let Some((_, sequence)) = session.agent.next_sequence() else { break };
                    twilio::dtmf_msg(sequence, &stream_sid, digit)
                }
            };
            self.send(conn, text);
        }
        self.broadcast(now, &id, RetellEvent::CallReady, json!({ "agent": "connected" }));
        true
    }

    /// A text frame from an agent leg: its `media`, `mark` and `clear` drive the caller's pacer.
    pub fn handle_agent_frame(&mut self, now: Now, conn: ConnectionId, frame: &Bytes) {
        if self.llm_upstream_frame(conn, frame) {
            return;
        }
        let Some((id, Role::Agent)) = self.conns.get(&conn).cloned() else { return };
        let Some(session) = self.slots.get_mut(&id).and_then(|s| s.session.as_mut()) else { return };
        if session.agent_protocol == AgentProtocol::Realtime {
            return self.realtime_frame(now, &id, conn, frame);
        }
        let result = match twilio::parse(frame) {
            Ok(twilio::Message::Media(m)) if m.samples == 0 => {
                self.stats.protocol_errors += 1;
                return;
            }
            Ok(twilio::Message::Media(m)) => {
                self.stats.frames_in.add(LegKind::Bot, 1);
                session.counts.agent.frames_in += 1;
                push_split(&mut session.pacer, now.instant, m.payload, m.samples)
            }
            Ok(twilio::Message::Mark(m)) => session.pacer.push_mark(now.instant, m.name),
            Ok(twilio::Message::Clear) => {
                session.pacer.handle_clear(now.instant);
                Ok(())
            }
            Ok(_) | Err(_) => {
                self.stats.protocol_errors += 1;
                return;
            }
        };
        if result.is_err() {
            self.stats.pacer_drops += 1;
            session.counts.caller.dropped += 1;
        }
        self.drain_pacer(now, &id);
        self.schedule(now, &id);
    }

    /// The agent leg `conn` failed to connect or closed: the call goes on without it.
    pub fn handle_agent_closed(&mut self, now: Now, conn: ConnectionId, reason: &str) {
        if self.llm_detach(conn) {
            return;
        }
        let Some((id, Role::Agent)) = self.conns.remove(&conn) else { return };
        let Some(session) = self.slots.get_mut(&id).and_then(|s| s.session.as_mut()) else { return };
        if session.agent.conn() != Some(conn) {
            return;
        }
        let was_open = matches!(session.agent, Agent::Open { .. });
        // A Realtime session that could not be opened (upgrade refused, server unreachable) was
        // refused as surely as one refused by an `error` event.
        if !was_open && session.agent_protocol == AgentProtocol::Realtime {
            self.stats.agent_errors += 1;
        }
        session.agent = Agent::None;
        session.pacer.reset();
        session.agent_framer.reset();
        session.armed = None;
        // The caller must not keep hearing a dead agent's buffered audio.
        session.caller_owes_clear = false;
        if was_open && session.caller.is_some() {
            // Echoes of the marks sent so far are the clear's flush, not playback.
            session.realtime.heard.handle_clear();
        }
        if let (true, Some(caller)) = (was_open, &session.caller) {
            let (conn, text) = (caller.conn, twilio::clear_out(&caller.start.stream_sid));
            self.send(conn, text);
        }
        let data = json!({ "message": format!("agent disconnected: {reason}"), "source": "agent" });
        self.broadcast(now, &id, RetellEvent::Error, data);
    }

    /// Runs due timers: listeners that waited too long, session pacing and media, WebRTC peers.
    pub fn handle_timeout(&mut self, now: Now) {
        if self.rtc_poll_timeout().is_some_and(|at| at <= now.instant) {
            self.rtc_timeout(now);
        }
        while let Some((since, _)) = self.pending.front() {
            if now.instant.saturating_duration_since(*since) < self.limits.pending_observer_timeout {
                break;
            }
            let (since, id) = self.pending.pop_front().expect("front exists");
            let Some(slot) = self.slots.get(&id) else { continue };
            if slot.session.is_some() || slot.waiting_since != Some(since) {
                continue;
            }
            // An outbound call still ringing (Twilio rings for up to a minute) keeps its listeners
            // waiting, a few timeouts at most.
            let ringing = self.records.get(&id).is_some_and(|r| status_rank(&r.status) < FINAL);
            if ringing && slot.extensions < MAX_WAIT_EXTENSIONS {
                let slot = self.slots.get_mut(&id).expect("checked above");
                slot.extensions += 1;
                slot.waiting_since = Some(now.instant);
                self.pending.push_back((now.instant, id));
                continue;
            }
            let slot = self.slots.remove(&id).expect("checked above");
            self.waiting -= 1;
            for l in slot.listeners {
                self.conns.remove(&l.conn);
                self.stats.observers -= 1;
                self.close(l.conn, 1008, "session was not started");
            }
        }
        while let Some(Reverse((at, _))) = self.timers.peek() {
            if *at > now.instant {
                break;
            }
            let Reverse((at, id)) = self.timers.pop().expect("peeked");
            let Some(session) = self.slots.get_mut(&id).and_then(|s| s.session.as_mut()) else { continue };
            if session.armed != Some(at) {
                continue;
            }
            session.armed = None;
            session.pacer.handle_timeout(now.instant);
            self.drain_pacer(now, &id);
            self.rtc_tick(now, &id);
            self.check_agent_quiet(now, &id);
            self.schedule(now, &id);
            self.finish_if_played(now, &id);
        }
    }

    /// Ends every session (`call_ended` with reason `shutdown`) and closes every socket.
    pub fn handle_shutdown(&mut self, now: Now) {
        self.shutting_down = true;
        let ids: Vec<SessionId> = self.slots.keys().cloned().collect();
        for id in ids {
            if self.slots.get(&id).is_some_and(|s| s.session.is_some()) {
                self.end(now, &id, "shutdown", 1001, "relay shutting down");
            } else if let Some(slot) = self.slots.remove(&id) {
                self.waiting -= 1;
                for l in slot.listeners {
                    self.conns.remove(&l.conn);
                    self.stats.observers -= 1;
                    self.close(l.conn, 1001, "relay shutting down");
                }
            }
        }
        let upstream: Vec<ConnectionId> = self.llm_up.drain().map(|(c, _)| c).collect();
        for conn in upstream {
            self.close(conn, 1001, "relay shutting down");
        }
        let llm: Vec<ConnectionId> = self.llm.drain().map(|(c, _)| c).collect();
        for conn in llm {
            self.close(conn, 1001, "relay shutting down");
        }
        let pending: Vec<ConnectionId> = self.conns.keys().copied().collect();
        for conn in pending {
            self.conns.remove(&conn);
            self.close(conn, 1001, "relay shutting down");
        }
        self.pending.clear();
    }

    /// Discards session `id` after a bug surfaced while handling it, closing its sockets with 1011.
    pub fn handle_panic(&mut self, id: &SessionId) {
        self.close_peers_of(id);
        self.tool_calls.remove(id);
        let Some(slot) = self.slots.remove(id) else { return };
        if let Some(session) = &slot.session {
            self.stats.active_sessions -= 1;
            if session.caller.is_some() {
                self.stats.callers -= 1;
            }
        } else {
            self.waiting -= 1;
        }
        self.stats.observers -= slot.listeners.len();
        let conns: Vec<ConnectionId> = self.conns.iter().filter(|(_, (s, _))| s == id).map(|(c, _)| *c).collect();
        for conn in conns {
            self.conns.remove(&conn);
            self.close(conn, 1011, "internal error");
        }
    }

    /// The next effect to carry out.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front().or_else(|| self.poll_datagram())
    }

    /// When [`Self::handle_timeout`] next has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let pending = self.pending.front().map(|(since, _)| *since + self.limits.pending_observer_timeout);
        let timer = self.timers.peek().map(|Reverse((at, _))| *at);
        [pending, timer, self.rtc_poll_timeout()].into_iter().flatten().min()
    }

    /// Current counts.
    pub fn stats(&self) -> Stats {
        let mut stats = self.stats;
        stats.rtc.peers = self.rtc.as_ref().map_or(0, |r| r.endpoint.stats().peers as u64);
        stats
    }

    /// The shell could not deliver `count` messages to socket `conn` (its queue was full, it was
    /// closing, or its encoder refused them): counted by the socket's leg kind ([`Stats::dropped`]),
    /// or as unattached when it is no longer part of a call.
    pub fn handle_send_dropped(&mut self, conn: ConnectionId, count: u64) {
        match self.leg_kind(conn) {
            Some(kind) => self.stats.dropped.add(kind, count),
            None => self.stats.dropped_unattached += count,
        }
        if let Some((id, role)) = self.conns.get(&conn) {
            if let Some(session) = self.slots.get_mut(id).and_then(|s| s.session.as_mut()) {
                match role {
                    Role::Caller | Role::CallerPending => session.counts.caller.dropped += count,
                    Role::Agent => session.counts.agent.dropped += count,
                    Role::Listener => {}
                }
            }
        }
    }

    /// What socket `conn` is to its call, if it is attached.
    pub fn leg_kind(&self, conn: ConnectionId) -> Option<LegKind> {
        if self.llm.contains_key(&conn) || self.llm_up.contains_key(&conn) {
            return Some(LegKind::Retell);
        }
        let (id, role) = self.conns.get(&conn)?;
        let slot = self.slots.get(id);
        Some(match role {
            Role::Caller | Role::CallerPending => LegKind::Caller,
            Role::Agent => match slot.and_then(|s| s.session.as_ref()).map(|s| s.agent_protocol) {
                Some(AgentProtocol::Realtime) => LegKind::Realtime,
                _ => LegKind::Bot,
            },
            Role::Listener => match slot.and_then(|s| s.listeners.iter().find(|l| l.conn == conn)).map(|l| l.kind) {
                Some(ListenKind::Frontend) => LegKind::Frontend,
                _ => LegKind::Events,
            },
        })
    }

    /// This core's live calls for `GET /calls`: the oldest `limit` (by start time, then id) and how
    /// many there are. Visits every session once; allocates only for the calls listed.
    pub fn calls(&self, limit: usize) -> (Vec<command::CallSummary>, usize) {
        use command::{AgentKind, AgentState, CallSummary, CallerKind};
        let mut live: Vec<(u64, &SessionId, &Slot)> = self
            .slots
            .iter()
            .filter_map(|(id, slot)| slot.session.as_ref().map(|s| (s.started_ms, id, slot)))
            .collect();
        let total = live.len();
        if limit < live.len() {
            live.select_nth_unstable_by(limit, |a, b| (a.0, a.1).cmp(&(b.0, b.1)));
            live.truncate(limit);
        }
        live.sort_unstable_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        let calls = live
            .into_iter()
            .filter_map(|(_, id, slot)| {
                let session = slot.session.as_ref()?;
                let caller = if session.caller.is_some() {
                    CallerKind::Twilio
                } else if session.leg(&command::RtcRole::Caller).is_some() {
                    CallerKind::Webrtc
                } else {
                    CallerKind::None
                };
                let (agent, agent_state) = match &session.agent {
                    Agent::None => (AgentKind::None, AgentState::None),
                    Agent::Peer(_) => (AgentKind::Webrtc, AgentState::Open),
                    other => {
                        let kind = match session.agent_protocol {
                            AgentProtocol::Realtime => AgentKind::Realtime,
                            AgentProtocol::Twilio | AgentProtocol::RetellLlm => AgentKind::Bot,
                        };
                        let state = match other {
                            Agent::Connecting { .. } => AgentState::Connecting,
                            Agent::Finished => AgentState::Finished,
                            _ => AgentState::Open,
                        };
                        (kind, state)
                    }
                };
                Some(CallSummary {
                    id: id.clone(),
                    caller,
                    connected: session.is_connected(),
                    agent,
                    agent_state,
                    started_ms: session.started_ms,
                    counts: session.counts,
                    microphone_enabled: session.microphone_enabled(),
                    custom_stream: match session.source() {
                        crate::session::Source::Custom(s) => Some(s.clone()),
                        crate::session::Source::Microphone => None,
                    },
                    listeners: slot.listeners.len(),
                    webrtc_legs: session.legs.len(),
                })
            })
            .collect();
        (calls, total)
    }

    /// How much waits in this core's queues now. Visits every session: for a periodic gauge, not
    /// for every input.
    pub fn queue_depths(&self) -> QueueDepths {
        let mut depths = QueueDepths::default();
        let mut pacer_samples = 0;
        for session in self.slots.values().filter_map(|s| s.session.as_ref()) {
            pacer_samples += session.pacer.queued_samples();
            if let Agent::Connecting { backlog, .. } = &session.agent {
                depths.agent_backlog += backlog.len() as u64;
            }
            let playout = session.legs.iter().filter_map(|l| l.inbound.as_ref()).map(|i| i.playout.buffered() as u64);
            depths.playout_packets += playout.sum::<u64>();
        }
        depths.pacer_frames = pacer_samples / crate::session::media::FRAME_8K as u64;
        depths
    }

    /// The session a connection belongs to, if any.
    pub fn session_of(&self, conn: ConnectionId) -> Option<&SessionId> {
        self.conns.get(&conn).map(|(id, _)| id)
    }

    fn create(&mut self, now: Now, id: &SessionId, mut session: Session) {
        session.started_ms = now.unix_ms;
        let slot = self.slots.entry(id.clone()).or_default();
        if slot.waiting_since.take().is_some() {
            self.waiting -= 1;
        }
        // Listeners that attached before the start are checked against the session's token now.
        let mut refused = Vec::new();
        slot.listeners.retain(|l| {
            let ok = authorizes(&session, &l.credential);
            if !ok {
                refused.push(l.conn);
            }
            ok
        });
        let (event, data) = session.started_event();
        slot.session = Some(session);
        self.stats.active_sessions += 1;
        for conn in refused {
            self.conns.remove(&conn);
            self.stats.observers -= 1;
            self.close(conn, 1008, "invalid access token");
        }
        self.broadcast(now, id, event, data);
    }

    fn caller_started(&mut self, now: Now, id: &SessionId, conn: ConnectionId, mut start: twilio::Start) {
        if start.call_sid.is_empty() {
            // Named by the stream's URL: the agent and the records see the call by that name.
            start.call_sid = id.as_str().to_owned();
        }
        let exists = self.slots.get(id).is_some_and(|s| s.session.is_some());
        if !exists {
            if self.shutting_down || self.stats.active_sessions >= self.limits.sessions_per_core {
                self.conns.remove(&conn);
                self.close(conn, 1013, "relay at capacity");
                return;
            }
            if self.admits(id).is_err() {
                self.conns.remove(&conn);
                self.close(conn, 1013, "relay node draining");
                return;
            }
            self.create(now, id, Session::from_stream(id.clone(), &start));
        }
        let session = self.slots.get_mut(id).and_then(|s| s.session.as_mut()).expect("exists or created above");
        if session.caller.is_some() || session.leg(&command::RtcRole::Caller).is_some() {
            self.conns.remove(&conn);
            self.stats.protocol_errors += 1;
            self.close(conn, 1008, "this call already has a caller stream");
            return;
        }
        let requested = start.custom_parameter("agentUrl").map(str::to_owned);
        let parameter = |name: &str, limit: usize| {
            start.custom_parameter(name).filter(|v| !v.is_empty()).map(|v| bounded(v, limit).to_owned())
        };
        let update = command::RecordUpdate {
            status: Some("in-progress".into()),
            from: parameter("from", MAX_NUMBER_BYTES),
            to: parameter("to", MAX_NUMBER_BYTES),
            project_id: parameter("projectId", MAX_LABEL_BYTES),
            intent: parameter("intent", MAX_LABEL_BYTES),
            ..Default::default()
        };
        session.caller = Some(Caller { conn, start });
        let record = self.update_record(now, id, update);
        if record.start_ms.is_none() {
            if let Some(r) = self.records.get_mut(id) {
                r.start_ms = Some(now.unix_ms);
            }
        }
        self.emit_record(id);
        self.stats.callers += 1;
        self.conns.insert(conn, (id.clone(), Role::Caller));
        self.broadcast(now, id, RetellEvent::Update, json!({ "isConnected": true }));
        self.dial_agent(now, id, requested.as_deref());
    }

    /// Dials the agent for the caller that just connected to session `id`: the `requested` URL (a
    /// stream parameter, checked against the allow-list) or the default, unless the call already
    /// has an agent.
    fn dial_agent(&mut self, now: Now, id: &SessionId, requested: Option<&str>) {
        let has_agent = self.slots.get(id).and_then(|s| s.session.as_ref()).is_some_and(|s| s.agent != Agent::None);
        // A Twilio-protocol agent (the call's own, or the default) first, else the Realtime upstream.
        let target = match self.agents.resolve(requested) {
            Ok(Some(url)) => Some((url, AgentProtocol::Twilio, None, None)),
            Ok(None) => self
                .agents
                .realtime
                .as_ref()
                .map(|r| (r.url.clone(), AgentProtocol::Realtime, r.api_key.clone(), r.shape.upgrade_header())),
            Err(e) => {
                self.broadcast(now, id, RetellEvent::Error, json!({ "message": e.to_string(), "source": "agent" }));
                None
            }
        };
        // A WebRTC agent already on the call: nothing is dialled.
        let Some((url, protocol, bearer, header)) = target.filter(|_| !has_agent) else { return };
        let agent_conn = ConnectionId(CORE_CONN_BIT | self.next_conn);
        self.next_conn += 1;
        let Some(session) = self.slots.get_mut(id).and_then(|s| s.session.as_mut()) else { return };
        session.agent = Agent::Connecting { conn: agent_conn, backlog: VecDeque::new() };
        session.agent_protocol = protocol;
        self.conns.insert(agent_conn, (id.clone(), Role::Agent));
        let connect = Output::ConnectAgent { conn: agent_conn, session: id.clone(), url, protocol, bearer, header };
        self.outputs.push_back(connect);
    }

    /// Caller audio: to every connected frontend (once encoded, shared) and to the agent (silence
    /// while muted or while a custom stream replaces the microphone).
    fn route_caller_audio(&mut self, now: Now, id: &SessionId, media: &twilio::Media) {
        if media.track == Some(twilio::Track::Outbound) {
            return;
        }
        let Some(slot) = self.slots.get_mut(id) else { return };
        let Some(session) = slot.session.as_mut() else { return };
        to_frontends(
            &mut self.outputs,
            &mut self.stats.frames_out,
            &slot.listeners,
            &media.payload,
            frontend::FrontendTrack::Inbound,
        );
        // PCM sinks (an agent peer, the WHEP mix) get the caller's audio in 20 ms frames.
        let pcm_sinks = matches!(session.agent, Agent::Peer(_)) || session.mixer.is_some();
        if pcm_sinks {
            let timing = codec_timing(&self.codec_timer);
            if let Some(pcm) = crate::session::media::ulaw_b64_to_pcm(&media.payload, timing) {
                let frames = session.caller_framer.push(&pcm.samples);
                let id = id.clone();
                for frame in frames {
                    self.caller_pcm(now, &id, frame);
                }
            }
        }
        let Some(session) = self.slots.get_mut(id).and_then(|s| s.session.as_mut()) else { return };
        // A custom stream being published replaces the caller toward the agent.
        if Self::custom_source_live(session) {
            return;
        }
        let payload = if session.agent_hears_microphone() {
            media.payload.clone()
        } else {
            twilio::silence_payload(media.samples)
        };
        self.send_to_bot(id, payload, media.samples, media.chunk, media.timestamp_ms);
    }

    fn route_dtmf(&mut self, now: Now, id: &SessionId, digit: char) {
        let Some(session) = self.slots.get_mut(id).and_then(|s| s.session.as_mut()) else { return };
        let stream_sid = session.stream_sid().unwrap_or_default().to_owned();
        if let Agent::Connecting { backlog, .. } = &mut session.agent {
            if backlog.len() < AGENT_BACKLOG {
                backlog.push_back(Pending::Dtmf(digit));
            }
        } else if session.agent_protocol == AgentProtocol::Twilio {
            if let Some((conn, sequence)) = session.agent.next_sequence() {
                self.send(conn, twilio::dtmf_msg(sequence, &stream_sid, digit));
            }
        }
        self.broadcast(now, id, RetellEvent::Update, json!({ "dtmf": { "digit": digit.to_string() } }));
    }

    /// Carries out what the session's pacer released: audio and `clear` to the caller (and the
    /// agent's audio to frontends), played marks back to the agent.
    fn drain_pacer(&mut self, now: Now, id: &SessionId) {
        let Some(slot) = self.slots.get_mut(id) else { return };
        let Some(session) = slot.session.as_mut() else { return };
        let mut played = Vec::new();
        let timing = codec_timing(&self.codec_timer);
        while let Some(output) = session.pacer.poll_output() {
            let caller_conn = session.caller.as_ref().map(|c| c.conn);
            let clear_caller = match &output {
                pacer::Output::Transmit { payload, .. } => {
                    if let Some(pcm) = crate::session::media::ulaw_b64_to_pcm(payload, timing) {
                        played.extend(session.agent_framer.push(&pcm.samples));
                    }
                    session.caller_owes_clear |= caller_conn.is_some();
                    false
                }
                pacer::Output::Clear => {
                    // Audio framed but not yet 20 ms long was cut off by the barge-in too.
                    session.agent_framer.reset();
                    std::mem::take(&mut session.caller_owes_clear)
                }
                pacer::Output::MarkPlayed(_) => false,
            };
            let stream_sid = session.stream_sid().unwrap_or_default();
            match output {
                pacer::Output::Transmit { payload, .. } => {
                    agent_audio_out(
                        &mut self.outputs,
                        &mut self.stats.frames_out,
                        caller_conn.map(|conn| (conn, stream_sid)),
                        &slot.listeners,
                        &payload,
                    );
                    if caller_conn.is_some() {
                        session.counts.caller.frames_out += 1;
                    }
                    // A Realtime agent's delta fully released: the caller gets its mark after it.
                    if let Some(caller) = &session.caller {
                        while let Some(name) = session.realtime.heard.poll_mark(session.pacer.released_samples()) {
                            let text = twilio::mark_out(&caller.start.stream_sid, &name);
                            self.outputs.push_back(Output::Send { conn: caller.conn, text });
                        }
                    }
                }
                pacer::Output::Clear => {
                    if let Some(conn) = caller_conn.filter(|_| clear_caller) {
                        self.outputs.push_back(Output::Send { conn, text: twilio::clear_out(stream_sid) });
                    }
                }
                pacer::Output::MarkPlayed(name) if session.agent_protocol == AgentProtocol::Realtime => {
                    if let Some((item, ms)) = realtime::parse_mark(&name) {
                        session.realtime.heard.handle_modelled(item, ms);
                    }
                }
                pacer::Output::MarkPlayed(name) => {
                    let stream_sid = stream_sid.to_owned();
                    if let Some((conn, sequence)) = session.agent.next_sequence() {
                        let text = twilio::mark_echo_msg(sequence, &stream_sid, &name);
                        self.outputs.push_back(Output::Send { conn, text });
                    }
                }
            }
        }
        // What played also goes, as PCM, to a WebRTC caller, the mix, the VAD and raw samples.
        for frame in played {
            self.agent_pcm(now, id, frame);
        }
    }

    /// Arms the session's timer at its pacer's next deadline, unless already armed earlier.
    fn schedule(&mut self, now: Now, id: &SessionId) {
        let Some(session) = self.slots.get_mut(id).and_then(|s| s.session.as_mut()) else { return };
        let media = Self::rtc_session_timeout(session);
        let pacer = match (session.pacer.poll_timeout(), media) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let at = match pacer {
            Some(at) => at,
            // An agent that said goodbye: wake when the audio in flight has played (8 kHz: 125 µs a
            // sample, plus a millisecond so playout has surely passed the end).
            None if session.agent == Agent::Finished => {
                let samples = session.pacer.in_flight_samples(now.instant);
                now.instant + std::time::Duration::from_micros(samples * 125 + 1_000)
            }
            None => return,
        };
        let at = at.max(now.instant);
        if session.armed.is_some_and(|armed| armed <= at) {
            return;
        }
        session.armed = Some(at);
        self.timers.push(Reverse((at, id.clone())));
    }

    /// Ends session `id`: `call_ended` to event listeners, `stop` to the agent, every socket closed.
    fn end(&mut self, now: Now, id: &SessionId, reason: &str, code: u16, close_reason: &'static str) {
        let Some(session) = self.slots.get(id).and_then(|s| s.session.as_ref()) else { return };
        let (event, data) = session.ended_event(reason);
        self.broadcast(now, id, event, data);
        let mut slot = self.slots.remove(id).expect("found above");
        let mut session = slot.session.take().expect("found above");
        self.tool_calls.remove(id);
        self.stats.active_sessions -= 1;
        if session.greeting().is_some() {
            if let Some(r) = self.records.get_mut(id) {
                r.end_ms.get_or_insert(now.unix_ms);
                if r.status == "in-progress" {
                    r.status = "completed".to_owned();
                }
                self.emit_record(id);
            }
        }
        if let Some(start) = session.greeting().filter(|_| session.agent_protocol == AgentProtocol::Twilio) {
            let stop = (start.stream_sid.clone(), start.account_sid.clone(), start.call_sid.clone());
            if let Some((conn, sequence)) = session.agent.next_sequence() {
                self.send(conn, twilio::stop_msg(sequence, &stop.0, &stop.1, &stop.2));
            }
        }
        if let Some(caller) = &session.caller {
            self.stats.callers -= 1;
            self.conns.remove(&caller.conn);
            self.close(caller.conn, code, close_reason);
        }
        if let Some(conn) = session.agent.conn() {
            self.conns.remove(&conn);
            self.close(conn, code, close_reason);
        }
        let legs = std::mem::take(&mut session.legs);
        self.close_legs(&legs);
        for l in slot.listeners {
            self.conns.remove(&l.conn);
            self.stats.observers -= 1;
            self.close(l.conn, code, close_reason);
        }
    }

    /// A transcribed utterance: `transcription` to connected frontends, an `update` with Retell's
    /// transcript shape to event listeners, and a line in the call's record.
    fn transcript(&mut self, now: Now, id: &SessionId, t: command::Transcript) -> Result<Reply, CommandError> {
        let known = self.slots.get(id).is_some_and(|s| s.session.is_some()) || self.records.contains_key(id);
        if !known {
            return Err(CommandError::NotFound);
        }
        if let Some(r) = self.records.get_mut(id) {
            let line = format!("{}: {}\n", t.speaker.role(), t.text);
            if r.transcript.len() + line.len() <= command::MAX_TRANSCRIPT_BYTES {
                r.transcript.push_str(&line);
                self.emit_record(id);
            }
        }
        if let Some(slot) = self.slots.get(id) {
            let mut shared = None;
            for l in slot.listeners.iter().filter(|l| l.active && l.kind == ListenKind::Frontend) {
                let text = shared.get_or_insert_with(|| frontend::transcription(&t.text)).clone();
                self.outputs.push_back(Output::Send { conn: l.conn, text });
            }
        }
        let data = json!({ "transcript": [{ "role": t.speaker.role(), "content": t.text }] });
        self.broadcast(now, id, RetellEvent::Update, data);
        Ok(Reply::Transcribed)
    }

    /// Creates or updates the record of call `id` and returns it. The caller emits the change
    /// ([`Self::emit_record`]) once it has made all of its own.
    fn update_record(&mut self, now: Now, id: &SessionId, update: command::RecordUpdate) -> command::CallRecord {
        if !self.records.contains_key(id) {
            while self.records.len() >= self.limits.records_per_core.max(1) {
                let Some(oldest) = self.record_order.pop_front() else { break };
                self.records.remove(&oldest);
            }
            self.record_order.push_back(id.clone());
            let record = command::CallRecord {
                status: "queued".to_owned(),
                created_ms: now.unix_ms,
                node: self.node_id.clone(),
                ..Default::default()
            };
            self.records.insert(id.clone(), record);
        }
        let r = self.records.get_mut(id).expect("inserted above");
        // Statuses only move forward (callbacks can arrive late or out of order); a final status
        // stays, except that Twilio's own final word may replace the relay's `completed`.
        if let Some(status) = update.status {
            let (old, new) = (status_rank(&r.status), status_rank(&status));
            if new > old || (old == FINAL && new == FINAL && r.status == "completed") {
                r.status = status;
            }
        }
        let command::RecordUpdate {
            user_id,
            duration_secs,
            from,
            to,
            prompt,
            first_message,
            project_id,
            intent,
            direction,
            tools,
            ..
        } = update;
        r.tools = tools.or_else(|| r.tools.take());
        r.project_id = project_id.or_else(|| r.project_id.take());
        r.intent = intent.or_else(|| r.intent.take());
        r.direction = direction.unwrap_or(r.direction);
        r.user_id = user_id.or_else(|| r.user_id.take());
        r.duration_secs = duration_secs.or(r.duration_secs);
        r.from = from.or_else(|| r.from.take());
        r.to = to.or_else(|| r.to.take());
        r.prompt = prompt.or_else(|| r.prompt.take());
        r.first_message = first_message.or_else(|| r.first_message.take());
        r.clone()
    }

    /// Hands the record of `id`, as it is now, to the shell for the record store.
    fn emit_record(&mut self, id: &SessionId) {
        if let Some(record) = self.records.get(id) {
            let change = command::RecordChange { id: id.clone(), record: record.clone() };
            self.outputs.push_back(Output::Record(Box::new(change)));
        }
    }

    fn broadcast(&mut self, now: Now, id: &SessionId, event: RetellEvent, data: Value) {
        let Some(slot) = self.slots.get(id) else { return };
        let mut text = None;
        for l in slot.listeners.iter().filter(|l| l.kind == ListenKind::Events) {
            let text = text.get_or_insert_with(|| events::retell_event(event, data.clone(), now.unix_ms)).clone();
            self.outputs.push_back(Output::Send { conn: l.conn, text });
        }
    }

    fn send(&mut self, conn: ConnectionId, text: Utf8Bytes) {
        self.outputs.push_back(Output::Send { conn, text });
    }

    fn close(&mut self, conn: ConnectionId, code: u16, reason: &'static str) {
        self.outputs.push_back(Output::Close { conn, code, reason });
    }
}

/// What the built-in Retell responder says when Retell connects, unless configured otherwise.
pub const DEFAULT_BEGIN_SENTENCE: &str = "Hello! How can I help you today?";

/// Custom parameters of a caller's `start` that are not passed on to its agent: the session's
/// bearer token (`accessToken`) and the relay's stream signature (`relaySig`).
const RELAY_PRIVATE_PARAMETERS: [&str; 2] = ["accessToken", "relaySig"];

/// How many times a wait for a call still being placed is extended by `pending_observer_timeout`.
const MAX_WAIT_EXTENSIONS: u8 = 4;

/// Longest phone number (or client name) a stream parameter may put in a record, bytes.
const MAX_NUMBER_BYTES: usize = 64;
/// Longest project id or intent a stream parameter may put in a record, bytes.
const MAX_LABEL_BYTES: usize = 128;

/// `s` cut to at most `limit` bytes, on a character boundary.
fn bounded(s: &str, limit: usize) -> &str {
    let mut end = s.len().min(limit);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Rank of a Twilio call status: later states never give way to earlier ones.
const FINAL: u8 = 4;
fn status_rank(status: &str) -> u8 {
    match status {
        "queued" => 0,
        "initiated" => 1,
        "ringing" => 2,
        "in-progress" | "answered" => 3,
        "completed" | "busy" | "failed" | "no-answer" | "canceled" => FINAL,
        _ => 0,
    }
}

/// Agent chunks longer than this many samples are split before pacing, so the lead, `clear` and
/// marks work at a fine grain whatever size the bot sends (240 μ-law bytes = 320 base64 characters
/// exactly, so the pieces need no re-encoding).
const PIECE_SAMPLES: usize = 240;

/// Pushes a base64 μ-law payload to the pacer, in zero-copy pieces of [`PIECE_SAMPLES`].
fn push_split(
    pacer: &mut pacer::Pacer<Bytes>,
    now: Instant,
    payload: Bytes,
    samples: usize,
) -> Result<(), pacer::PacerError> {
    const PIECE_CHARS: usize = PIECE_SAMPLES / 3 * 4;
    let mut offset = 0;
    let mut left = samples;
    while left > PIECE_SAMPLES && offset + PIECE_CHARS < payload.len() {
        pacer.push_audio(now, payload.slice(offset..offset + PIECE_CHARS), PIECE_SAMPLES as u32)?;
        offset += PIECE_CHARS;
        left -= PIECE_SAMPLES;
    }
    pacer.push_audio(now, payload.slice(offset..), u32::try_from(left).unwrap_or(u32::MAX))
}

/// One frame of `track` audio (base64 μ-law) to every connected frontend: encoded once, shared,
/// and counted in `frames_out`.
fn to_frontends(
    outputs: &mut VecDeque<Output>,
    frames_out: &mut PerLeg,
    listeners: &[Listener],
    payload: &[u8],
    track: frontend::FrontendTrack,
) {
    let mut shared = None;
    for l in listeners.iter().filter(|l| l.active && l.kind == ListenKind::Frontend) {
        let text = shared.get_or_insert_with(|| frontend::audio(payload, track)).clone();
        outputs.push_back(Output::Send { conn: l.conn, text });
        frames_out.add(LegKind::Frontend, 1);
    }
}

/// One frame of agent audio (base64 μ-law) to the Twilio caller, when there is one, and to every
/// frontend as the outbound track; each counted in `frames_out`.
fn agent_audio_out(
    outputs: &mut VecDeque<Output>,
    frames_out: &mut PerLeg,
    caller: Option<(ConnectionId, &str)>,
    listeners: &[Listener],
    payload: &[u8],
) {
    if let Some((conn, stream_sid)) = caller {
        frames_out.add(LegKind::Caller, 1);
        outputs.push_back(Output::Send { conn, text: twilio::media_out(stream_sid, payload) });
    }
    to_frontends(outputs, frames_out, listeners, payload, frontend::FrontendTrack::Outbound);
}

/// The core's codec timer as the media code takes it (borrowing only that field, so the caller
/// may hold a session mutably beside it).
fn codec_timing(timer: &Option<Box<dyn CodecTimer + Send>>) -> Timing<'_> {
    Timing::new(timer.as_deref().map(|t| t as &dyn CodecTimer))
}

fn authorizes(session: &Session, credential: &Credential) -> bool {
    match credential {
        Credential::Operator => true,
        Credential::Token(t) => session.access_token().is_some_and(|s| s.matches(t.expose())),
        Credential::Anonymous => session.access_token().is_none(),
    }
}

#[cfg(test)]
mod telephony_tests;
#[cfg(test)]
mod tests;
