//! What other cores and the control plane ask of a session's owner core, and its answers.
//!
//! Invariant: plain `Send` data; every command gets exactly one [`Reply`] or [`CommandError`].

use crate::id::{SessionId, StreamId};
use crate::media::SampleRate;
use crate::secret::Secret;

/// A request for one session, executed on the session's owner core.
#[derive(Debug, Clone)]
pub enum Command {
    /// Create the session (`/start-call`).
    Start(StartCall),
    /// End the session (`/stop-call`).
    Stop,
    /// Mute (`false`) or unmute (`true`) the microphone toward the agent.
    SetMicrophone(bool),
    /// Make the agent hear the custom stream `StreamId` instead of the microphone.
    SendCustomStream(StreamId),
    /// Make the agent hear the microphone again.
    ResumeMicrophone,
    /// Report `/call-status`.
    CallStatus,
    /// Report `/track-status`.
    TrackStatus,
    /// Create or update the call's record (outbound initiation, webhooks, status callbacks).
    Record(Box<RecordUpdate>),
    /// Read the call's record.
    ReadRecord,
    /// A finished utterance of the call, transcribed (Twilio Real-Time Transcription, agents).
    Transcript(Box<Transcript>),
    /// A WebRTC peer's SDP offer (WHIP publishes, WHEP listens): a new leg and its answer.
    RtcOffer(Box<RtcOffer>),
    /// Trickled candidates or an ICE restart for a WebRTC leg (`PATCH` on its WHIP/WHEP resource,
    /// RFC 9725 §4.3).
    RtcPatch(Box<RtcPatch>),
    /// End the WebRTC leg `leg` (`DELETE` on its WHIP/WHEP resource).
    RtcEnd {
        /// The leg, as its resource URL names it.
        leg: u64,
        /// What the request presented.
        credential: crate::core::Credential,
    },
    /// Ask whether the owner core takes a new leg of this call: yes unless it is draining and does
    /// not know the call (no session, no record of a call still going). Asked before a leg that
    /// would begin a call is accepted (`/twilio/voice`, `/twilio/stream/{callSid}`), and only
    /// while the node drains.
    Admit,
}

/// What a WebRTC leg is to its session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RtcRole {
    /// The human side (WHIP `role=caller`).
    Caller,
    /// The agent side (WHIP `role=agent`, e.g. a human supervisor).
    Agent,
    /// A custom audio source the agent can be switched to (WHIP `role=custom&streamId=`).
    Custom(StreamId),
    /// A WHEP listener: hears the caller and the agent mixed.
    Listener,
}

impl RtcRole {
    /// The name used in URLs and events.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Caller => "caller",
            Self::Agent => "agent",
            Self::Custom(_) => "custom",
            Self::Listener => "listener",
        }
    }
}

/// A WHIP or WHEP offer.
#[derive(Debug, Clone)]
pub struct RtcOffer {
    /// What the leg will be.
    pub role: RtcRole,
    /// The SDP offer.
    pub sdp: String,
    /// What the request presented (`Authorization: Bearer`).
    pub credential: crate::core::Credential,
}

/// A trickle-ICE `PATCH` on a leg's resource.
#[derive(Debug, Clone)]
pub struct RtcPatch {
    /// The leg, as its resource URL names it.
    pub leg: u64,
    /// The `application/trickle-ice-sdpfrag` body, parsed.
    pub fragment: crate::rtc::sdpfrag::IceFragment,
    /// The request's `If-Match` (RFC 9725 §4.3.1 requires one; `None` is answered 428).
    pub if_match: Option<IfMatch>,
    /// What the request presented (`Authorization: Bearer`).
    pub credential: crate::core::Credential,
}

/// The relay's side of an ICE restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IceRestart {
    /// Its answer fragment (`application/trickle-ice-sdpfrag`): new credentials, its candidate.
    pub fragment: String,
    /// The new ICE session's entity-tag (the `ETag` later `PATCH`es must match).
    pub etag: String,
}

/// An `If-Match` precondition (RFC 9110 §13.1.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IfMatch {
    /// `*`: any current ICE session.
    Any,
    /// These strong entity-tags' opaque values (weak tags never match, so they are not kept).
    Tags(Vec<String>),
}

impl IfMatch {
    /// Whether the precondition holds for a resource whose current entity-tag is `current`
    /// (strong comparison).
    pub fn matches(&self, current: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Tags(tags) => tags.iter().any(|t| t == current),
        }
    }
}

/// Who said a transcribed utterance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Speaker {
    /// The caller (Twilio's inbound track).
    User,
    /// The agent (the outbound track).
    Agent,
}

impl Speaker {
    /// Retell's role name (`user`, `agent`).
    pub fn role(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::Agent => "agent",
        }
    }
}

/// A transcribed utterance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transcript {
    /// Who said it.
    pub speaker: Speaker,
    /// What was said.
    pub text: String,
}

/// A change to a call record; `None` fields stay as they are.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecordUpdate {
    /// The user who initiated the call (seed 004's `user_id`).
    pub user_id: Option<String>,
    /// Twilio's call status (`queued`, `ringing`, `in-progress`, `completed`, `busy`, `failed`,
    /// `no-answer`, `canceled`).
    pub status: Option<String>,
    /// Call duration Twilio reports, seconds.
    pub duration_secs: Option<u64>,
    /// Caller number.
    pub from: Option<String>,
    /// Called number.
    pub to: Option<String>,
    /// The agent's instructions for an outbound call, passed to it as a stream parameter.
    pub prompt: Option<String>,
    /// The agent's first sentence for an outbound call, passed likewise.
    pub first_message: Option<String>,
    /// The project the call belongs to (`projectId` stream parameter or request field).
    pub project_id: Option<String>,
    /// What the call is about (`intent` stream parameter), when known.
    pub intent: Option<String>,
    /// Which way the call was placed; records are inbound unless an update says otherwise.
    pub direction: Option<Direction>,
    /// Tools a Realtime agent of this call declares instead of the relay's (`/outbound-call`'s
    /// `tools`, validated and bounded by the control plane).
    pub tools: Option<std::sync::Arc<[crate::proto::tools::Tool]>>,
}

/// Which way a call was placed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Direction {
    /// Someone called in (a Twilio voice webhook or a caller stream).
    #[default]
    Inbound,
    /// The relay dialled out (`/outbound-call`).
    Outbound,
}

impl Direction {
    /// The name used in records and analytics (`inbound`, `outbound`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Inbound => "inbound",
            Self::Outbound => "outbound",
        }
    }
}

/// What the relay knows about a call, from real events.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallRecord {
    /// The initiating user, for outbound calls.
    pub user_id: Option<String>,
    /// Latest status.
    pub status: String,
    /// When the caller's stream started, ms since the epoch.
    pub start_ms: Option<u64>,
    /// When the call ended, ms since the epoch.
    pub end_ms: Option<u64>,
    /// Duration Twilio reported, seconds (preferred over the stream's own times when present).
    pub duration_secs: Option<u64>,
    /// Caller number.
    pub from: Option<String>,
    /// Called number.
    pub to: Option<String>,
    /// Outbound call instructions for the agent.
    pub prompt: Option<String>,
    /// Outbound call first sentence for the agent.
    pub first_message: Option<String>,
    /// The conversation so far, one `role: text` line per utterance, bounded to
    /// [`MAX_TRANSCRIPT_BYTES`] (later utterances are dropped past it).
    pub transcript: String,
    /// When the owner core first heard of the call (webhook, outbound request or stream start),
    /// ms since the epoch: analytics date ranges and "newest first" use it.
    pub created_ms: u64,
    /// The call's project, when a stream parameter or request named one (the control plane maps
    /// the others by number or to its default project).
    pub project_id: Option<String>,
    /// What the call is about, when a stream parameter said so.
    pub intent: Option<String>,
    /// Which way the call was placed.
    pub direction: Direction,
    /// Function calls the call's agent made (each call id once, refused ones included).
    pub function_calls: u64,
    /// The call's own tools, for its Realtime agent (kept on the owner core only: a list may be
    /// 64 KiB, too large for TwiML stream parameters, and only the owner core dials the agent).
    pub tools: Option<std::sync::Arc<[crate::proto::tools::Tool]>>,
    /// The node whose core owns the call (`EngineConfig::node_id`, set when the record is made):
    /// in a cluster sharing one records store, which node served it (empty: no node name).
    pub node: String,
}

/// A call record as it is now, emitted by the owner core whenever it changes
/// ([`crate::core::Output::Record`]) so that a store outside the core can persist it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordChange {
    /// The call (session) id.
    pub id: SessionId,
    /// The whole record after the change: a later change supersedes an earlier one.
    pub record: CallRecord,
}

/// Seconds a refused new call is told to wait (`Retry-After`) while its node drains: small, since
/// a balancer sends the retry to another node.
pub const DRAIN_RETRY_AFTER_SECS: u64 = 5;

/// Longest transcript kept in a call record, bytes.
pub const MAX_TRANSCRIPT_BYTES: usize = 64 * 1024;

impl CallRecord {
    /// Seconds the call has lasted: Twilio's figure, else end (or `now_ms`) minus start.
    pub fn duration_at(&self, now_ms: u64) -> Option<u64> {
        self.duration_secs.or_else(|| self.start_ms.map(|s| self.end_ms.unwrap_or(now_ms).saturating_sub(s) / 1000))
    }
}

/// Parameters of a new session.
#[derive(Debug, Clone)]
pub struct StartCall {
    /// Bearer token for the session's media legs and event sockets.
    pub access_token: Secret,
    /// Rate of raw samples sent on `/ws`.
    pub sample_rate: SampleRate,
    /// Whether `/ws` carries the agent's audio as float samples.
    pub emit_raw_audio_samples: bool,
}

/// A command's successful result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// The session exists now.
    Started,
    /// The session is gone.
    Stopped,
    /// The microphone state after `SetMicrophone`.
    Microphone {
        /// Whether the agent hears the microphone (unmuted).
        enabled: bool,
    },
    /// The custom stream the agent hears now.
    CustomStream(StreamId),
    /// The agent hears the microphone again.
    MicrophoneResumed,
    /// Answer to [`Command::CallStatus`].
    CallStatus(CallStatus),
    /// Answer to [`Command::TrackStatus`].
    TrackStatus(TrackStatus),
    /// Answer to [`Command::Record`] and [`Command::ReadRecord`] (boxed: a record is large next to
    /// the other replies).
    Record(Box<CallRecord>),
    /// The transcript reached the call's listeners and record.
    Transcribed,
    /// A WebRTC leg exists: its id (for its resource URL) and the SDP answer.
    RtcAnswer {
        /// The leg's id.
        leg: u64,
        /// The SDP answer.
        sdp: String,
        /// The entity-tag of its ICE session (the `ETag` a `PATCH` must match).
        etag: String,
    },
    /// A trickle-ICE `PATCH` was applied.
    RtcPatched {
        /// What an ICE restart answered; `None` when candidates were only added.
        restart: Option<IceRestart>,
    },
    /// The WebRTC leg is gone.
    RtcEnded,
    /// Answer to [`Command::Admit`]: the core takes legs of this call.
    Admitted,
    /// A core's live calls (the answer to a listing request, not to a session command).
    Calls(Box<CoreCalls>),
}

/// What kind of caller a live call has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallerKind {
    /// None yet (a session started by `/start-call` whose caller has not connected).
    None,
    /// A Twilio Media Stream.
    Twilio,
    /// A WebRTC peer (WHIP `role=caller`).
    Webrtc,
}

impl CallerKind {
    /// The name `GET /calls` uses (`none`, `twilio`, `webrtc`).
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Twilio => "twilio",
            Self::Webrtc => "webrtc",
        }
    }
}

/// What kind of agent a live call has, and where its leg stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentKind {
    /// No agent leg (none configured, none dialled yet, or it failed).
    None,
    /// A Twilio-protocol bot the relay dials.
    Bot,
    /// An OpenAI-Realtime server the relay dials.
    Realtime,
    /// A WebRTC peer (WHIP `role=agent`, e.g. a supervisor).
    Webrtc,
}

impl AgentKind {
    /// The name `GET /calls` uses (`none`, `bot`, `realtime`, `webrtc`).
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Bot => "bot",
            Self::Realtime => "realtime",
            Self::Webrtc => "webrtc",
        }
    }
}

/// Where a call's agent leg stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentState {
    /// No agent leg.
    None,
    /// Being dialled.
    Connecting,
    /// Connected.
    Open,
    /// Said goodbye; the call ends once its audio has played.
    Finished,
}

impl AgentState {
    /// The name `GET /calls` uses (`none`, `connecting`, `open`, `finished`).
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Connecting => "connecting",
            Self::Open => "open",
            Self::Finished => "finished",
        }
    }
}

/// One live call as a core sees it (`GET /calls`): no secret, only state and counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallSummary {
    /// The call (session) id.
    pub id: SessionId,
    /// Its caller.
    pub caller: CallerKind,
    /// Whether the caller is connected (a Twilio stream, or a WebRTC caller whose ICE and DTLS are up).
    pub connected: bool,
    /// Its agent.
    pub agent: AgentKind,
    /// Where the agent leg stands.
    pub agent_state: AgentState,
    /// When the session began, ms since the epoch.
    pub started_ms: u64,
    /// Frames in, out and dropped on the caller and agent legs.
    pub counts: crate::session::CallCounts,
    /// Whether the microphone is unmuted.
    pub microphone_enabled: bool,
    /// The custom stream the agent hears instead of the microphone, if any.
    pub custom_stream: Option<StreamId>,
    /// Listeners attached (`/ws`, `/frontend-stream`).
    pub listeners: usize,
    /// WebRTC legs (WHIP and WHEP peers).
    pub webrtc_legs: usize,
}

/// One core's live calls: the oldest first, at most the limit asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoreCalls {
    /// The core.
    pub core: crate::id::CoreId,
    /// Live calls on the core, listed or not.
    pub total: usize,
    /// The calls listed (the oldest `limit`, by start time then id).
    pub calls: Vec<CallSummary>,
}

/// `/call-status` fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallStatus {
    /// The session exists and has not been stopped.
    pub is_active: bool,
    /// A caller leg is connected.
    pub is_connected: bool,
    /// Voice activity on the agent's audio now.
    pub is_agent_talking: bool,
    /// At least one `/ws` event socket is attached.
    pub has_web_socket: bool,
}

/// `/track-status` fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackStatus {
    /// Whether the microphone is unmuted.
    pub microphone_enabled: bool,
    /// The audio tracks the session really carries.
    pub tracks: Vec<Track>,
}

/// One audio track of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Track {
    /// Track id, unique in the session.
    pub sid: String,
    /// Media kind (`audio`).
    pub kind: &'static str,
    /// Human name (`microphone`, the custom stream id, `agent`).
    pub name: String,
    /// What produces it (`microphone`, `custom`, `agent`).
    pub source: &'static str,
}

/// Why a command failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// No active session has this id.
    #[error("session not found")]
    NotFound,
    /// `Start` for a session that is already active.
    #[error("session is already active")]
    AlreadyActive,
    /// The owner core holds `sessions_per_core` sessions already.
    #[error("this relay core is at its limit of {limit} sessions")]
    CoreFull {
        /// The configured limit.
        limit: usize,
    },
    /// The owner core could not be reached in time (queue full or no reply). The command may
    /// still have run, so a retry can meet its effect (409 after a start, 404 after a stop).
    #[error("the session's core did not answer in time; the command may have been applied, check before retrying")]
    Busy,
    /// The relay is shutting down and starts no new sessions.
    #[error("the relay is shutting down")]
    ShuttingDown,
    /// The node is draining (`POST /admin/drain`, SIGUSR1): it serves the calls it has but begins
    /// none, so a balancer sends new calls to another node.
    #[error("this relay node is draining and takes no new calls; retry, another node will take the call")]
    Draining,
    /// The credential does not open this session's media legs.
    #[error("a valid access token for this session is required: send Authorization: Bearer <accessToken>")]
    Unauthorized,
    /// The session already has what the command would add (a caller, an agent, a stream id).
    #[error("{0}")]
    Conflict(String),
    /// The SDP offer cannot be accepted.
    #[error("{0}")]
    BadOffer(String),
    /// The session has no WebRTC leg with this id.
    #[error("no such WebRTC leg in this session")]
    LegNotFound,
    /// A trickle-ICE `PATCH` without `If-Match` (RFC 9725 §4.3.1).
    #[error("send If-Match with the ETag of the ICE session (or * for an ICE restart)")]
    PreconditionRequired,
    /// A trickle-ICE `PATCH` whose `If-Match` names another ICE session (an ICE restart came
    /// between).
    #[error("If-Match does not match the ETag of the leg's ICE session")]
    PreconditionFailed,
    /// A trickle-ICE fragment that does not fit the leg's session.
    #[error("{0}")]
    BadFragment(String),
    /// A bound on what one session or core may hold was reached.
    #[error("{0}")]
    Limit(String),
    /// WebRTC is not available on this relay.
    #[error("WebRTC is not enabled on this relay")]
    RtcDisabled,
    /// The command hit a bug; the session was dropped so the core could go on.
    #[error("internal error; the session was closed")]
    Internal,
}
