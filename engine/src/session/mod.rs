//! One call: its configuration, control state (microphone, source), its caller and agent legs,
//! and the pacer for audio played to the caller.
//!
//! Invariant: pure state; no sockets, no clock, and nothing here knows which listeners exist (the
//! core routes what the session produces).

pub mod agent;
pub mod heard;
pub mod media;

use serde_json::{json, Value};

use crate::core::command::{CallStatus, RtcRole, StartCall, Track, TrackStatus};
use crate::id::{ConnectionId, SessionId, StreamId};
use crate::media::pacer::{Pacer, PacerConfig};
use crate::media::SampleRate;
use crate::proto::events::RetellEvent;
use crate::proto::twilio;
use crate::secret::Secret;

/// What the agent hears from the caller side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The caller's microphone (silence while muted).
    Microphone,
    /// A custom stream published with this id.
    Custom(StreamId),
}

/// The caller's leg: a Twilio Media Stream.
#[derive(Debug)]
pub struct Caller {
    /// The stream's socket.
    pub conn: ConnectionId,
    /// Its `start` message: stream, call and account ids, custom parameters.
    pub start: twilio::Start,
}

/// Caller input held for an agent that is still being dialled: the caller's first words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pending {
    /// A media frame as the agent will get it (already silence if the microphone was muted).
    Media {
        /// Base64 μ-law.
        payload: bytes::Bytes,
        /// Its length in samples.
        samples: usize,
        /// Twilio's chunk number, if the caller sent one.
        chunk: Option<u64>,
        /// Twilio's timestamp, if the caller sent one.
        timestamp_ms: Option<u64>,
    },
    /// A key press.
    Dtmf(char),
}

/// Most caller frames held while the agent is dialled: 5 s of 20 ms frames, the agent's whole
/// connect deadline.
pub const AGENT_BACKLOG: usize = 250;

/// The agent's leg: an upstream bot the relay dials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Agent {
    /// No agent for this call (none configured, or it failed).
    None,
    /// Being dialled on this connection; what the caller says meanwhile waits in `backlog`.
    Connecting {
        /// The agent's socket-to-be.
        conn: ConnectionId,
        /// Caller audio and keys that arrived while dialling, oldest first (bounded by
        /// [`AGENT_BACKLOG`]; the oldest go first past it).
        backlog: std::collections::VecDeque<Pending>,
    },
    /// The agent closed its socket normally; the call ends once its audio has played.
    Finished,
    /// A WebRTC peer (WHIP `role=agent`): its audio plays to the caller, and it hears the caller
    /// if its offer receives audio.
    Peer(crate::rtc::PeerId),
    /// Connected: Twilio-protocol messages flow both ways.
    Open {
        /// The agent's socket.
        conn: ConnectionId,
        /// Next `sequenceNumber` toward the agent.
        sequence: u64,
        /// Next `chunk` number toward the agent.
        chunk: u64,
        /// Where the next `media` toward the agent starts at the earliest, in 8 kHz samples
        /// since the stream began (its `timestamp` × 8): timestamps never go back.
        next_at: u64,
    },
}

impl Agent {
    /// The agent's connection, connecting or open.
    pub fn conn(&self) -> Option<ConnectionId> {
        match self {
            Self::None | Self::Finished | Self::Peer(_) => None,
            Self::Connecting { conn: c, .. } | Self::Open { conn: c, .. } => Some(*c),
        }
    }

    /// Takes the next sequence number, if open.
    pub fn next_sequence(&mut self) -> Option<(ConnectionId, u64)> {
        match self {
            Self::Open { conn, sequence, .. } => {
                *sequence += 1;
                Some((*conn, *sequence - 1))
            }
            _ => None,
        }
    }
}

/// Audio frames of one leg of a call (the caller's or the agent's), as `GET /calls` shows them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LegCounts {
    /// Audio frames (Twilio `media` messages, Realtime deltas, RTP packets) received from the leg.
    pub frames_in: u64,
    /// Audio frames sent to the leg.
    pub frames_out: u64,
    /// Frames toward the leg the relay could not deliver (its socket's queue full, its pacer full).
    pub dropped: u64,
}

/// A call's frame counts, by leg.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CallCounts {
    /// The caller (a Twilio stream or a WHIP `role=caller` peer).
    pub caller: LegCounts,
    /// The agent (a dialled bot or Realtime server, or a WHIP `role=agent` peer).
    pub agent: LegCounts,
}

/// A live session.
#[derive(Debug)]
pub struct Session {
    id: SessionId,
    /// Bearer token for the session's listeners; `None` for calls that arrived by stream without one.
    access_token: Option<Secret>,
    sample_rate: SampleRate,
    emit_raw_audio_samples: bool,
    /// `false` while muted: the agent gets silence in place of the microphone.
    microphone_enabled: bool,
    source: Source,
    /// The caller's stream, once connected.
    pub caller: Option<Caller>,
    /// The agent leg.
    pub agent: Agent,
    /// Paces the agent's audio toward the caller (μ-law, 8 kHz: one sample per byte).
    pub pacer: Pacer<bytes::Bytes>,
    /// When the core's timer for this session is armed, so it is not armed twice.
    pub armed: Option<std::time::Instant>,
    /// WebRTC legs (caller, agent, custom streams, WHEP listeners).
    pub legs: Vec<media::RtcLeg>,
    /// The WHEP mix, while the session has WHEP listeners.
    pub mixer: Option<media::Mixer>,
    /// Voice activity on the agent's audio (`agent_start_talking`, `isAgentTalking`).
    pub vad: crate::media::vad::Vad,
    /// 20 ms framing of the caller's telephony audio, for PCM sinks.
    pub caller_framer: media::Framer,
    /// 20 ms framing of the agent's telephony audio, for PCM sinks and the VAD.
    pub agent_framer: media::Framer,
    /// Audio went to the Twilio caller since its last `clear`: the next clear must reach it (one
    /// with nothing to interrupt is not sent, so an agent's burst of clears costs the caller's
    /// queue nothing).
    pub caller_owes_clear: bool,
    /// Agent audio → the session's `sampleRate`, for raw samples on `/ws`.
    pub raw: Option<crate::media::resample::Resampler>,
    /// What the agent leg speaks (set when it is dialled).
    pub agent_protocol: agent::AgentProtocol,
    /// Barge-in bookkeeping of a Realtime agent.
    pub realtime: agent::RealtimeState,
    /// For a WebRTC caller, the Media Streams `start` a dialled Twilio-protocol bot is greeted with
    /// (as if the caller had come through Twilio).
    pub rtc_greeting: Option<twilio::Start>,
    /// When the agent's last frame played: an agent that goes quiet by sending nothing (a bot
    /// between replies, a muted browser) stops talking too.
    pub agent_heard_at: Option<std::time::Instant>,
    /// When the session began (its start command or its caller's stream), ms since the epoch.
    pub started_ms: u64,
    /// Frames in, out and dropped on the caller and agent legs.
    pub counts: CallCounts,
}

impl Session {
    /// A new session from `/start-call`'s parameters.
    pub fn new(id: SessionId, start: StartCall) -> Self {
        Self::build(id, Some(start.access_token), start.sample_rate, start.emit_raw_audio_samples)
    }

    /// A session created by a caller's stream; its access token, if any, comes from the stream's
    /// `accessToken` custom parameter.
    pub fn from_stream(id: SessionId, start: &twilio::Start) -> Self {
        let token = start.custom_parameter("accessToken").filter(|t| !t.is_empty()).map(Secret::new);
        Self::build(id, token, SampleRate::DEFAULT, false)
    }

    fn build(id: SessionId, access_token: Option<Secret>, sample_rate: SampleRate, emit_raw: bool) -> Self {
        Self {
            id,
            access_token,
            sample_rate,
            emit_raw_audio_samples: emit_raw,
            microphone_enabled: true,
            source: Source::Microphone,
            caller: None,
            agent: Agent::None,
            pacer: Pacer::new(PacerConfig::for_rate(8000)),
            armed: None,
            legs: Vec::new(),
            mixer: None,
            vad: crate::media::vad::Vad::new(),
            caller_framer: media::Framer::new(SampleRate::Hz8000),
            agent_framer: media::Framer::new(SampleRate::Hz8000),
            caller_owes_clear: false,
            raw: None,
            rtc_greeting: None,
            agent_protocol: agent::AgentProtocol::Twilio,
            realtime: agent::RealtimeState::default(),
            agent_heard_at: None,
            started_ms: 0,
            counts: CallCounts::default(),
        }
    }

    /// The session's id.
    pub fn id(&self) -> &SessionId {
        &self.id
    }

    /// The access token listeners must present, if the session has one.
    pub fn access_token(&self) -> Option<&Secret> {
        self.access_token.as_ref()
    }

    /// Rate of raw samples on `/ws`.
    pub fn sample_rate(&self) -> SampleRate {
        self.sample_rate
    }

    /// Whether `/ws` carries raw agent samples.
    pub fn emit_raw_audio_samples(&self) -> bool {
        self.emit_raw_audio_samples
    }

    /// Whether the microphone is unmuted.
    pub fn microphone_enabled(&self) -> bool {
        self.microphone_enabled
    }

    /// What the agent hears now.
    pub fn source(&self) -> &Source {
        &self.source
    }

    /// Whether the agent hears the caller's microphone now (unmuted, no custom stream).
    pub fn agent_hears_microphone(&self) -> bool {
        self.microphone_enabled && self.source == Source::Microphone
    }

    /// The stream id the agent knows the caller by, once a caller is connected.
    pub fn stream_sid(&self) -> Option<&str> {
        self.greeting().map(|s| s.stream_sid.as_str())
    }

    /// The caller's `start`: the Twilio stream's own, or the one made for a WebRTC caller.
    pub fn greeting(&self) -> Option<&twilio::Start> {
        self.caller.as_ref().map(|c| &c.start).or(self.rtc_greeting.as_ref())
    }

    /// Caller audio (base64 μ-law, `samples` long) as the `media` message for an open
    /// Twilio-protocol agent, and the agent's socket; the leg's numbering moves on. `chunk` and
    /// `timestamp_ms` are the caller's own when it sent them (so its gaps show), else the leg's
    /// counts; either way they only go forward, whatever mix of sources feeds the agent (the
    /// caller, a custom stream, a WebRTC caller). `None` unless the agent is open.
    pub fn agent_media_msg(
        &mut self,
        payload: &[u8],
        samples: usize,
        chunk: Option<u64>,
        timestamp_ms: Option<u64>,
    ) -> Option<(ConnectionId, tungstenite::Utf8Bytes)> {
        // `stream_sid()` borrowed by field, so the agent can be updated beside it.
        let greeting = self.caller.as_ref().map(|c| &c.start).or(self.rtc_greeting.as_ref());
        let stream_sid = greeting.map_or("", |s| s.stream_sid.as_str());
        let Agent::Open { conn, sequence, chunk: next_chunk, next_at } = &mut self.agent else { return None };
        let chunk = chunk.map_or(*next_chunk, |c| c.max(*next_chunk));
        let floor_ms = next_at.div_ceil(8);
        let timestamp_ms = timestamp_ms.map_or(floor_ms, |t| t.max(floor_ms));
        let text = twilio::media_msg(*sequence, stream_sid, twilio::Track::Inbound, chunk, timestamp_ms, payload);
        *sequence += 1;
        *next_chunk = chunk + 1;
        *next_at = timestamp_ms * 8 + samples as u64;
        Some((*conn, text))
    }

    /// The `call_started` event's data.
    pub fn started_event(&self) -> (RetellEvent, Value) {
        (
            RetellEvent::CallStarted,
            json!({ "sessionId": self.id.as_str(), "sampleRate": self.sample_rate.hz(), "emitRawAudioSamples": self.emit_raw_audio_samples }),
        )
    }

    /// The `call_ended` event's data, with why it ended.
    pub fn ended_event(&self, reason: &str) -> (RetellEvent, Value) {
        (RetellEvent::CallEnded, json!({ "sessionId": self.id.as_str(), "reason": reason }))
    }

    /// Mutes or unmutes; the `update` event says the new state.
    pub fn set_microphone(&mut self, enabled: bool) -> (RetellEvent, Value) {
        self.microphone_enabled = enabled;
        (RetellEvent::Update, json!({ "microphoneEnabled": enabled }))
    }

    /// Switches the agent to a custom stream.
    pub fn send_custom_stream(&mut self, stream: StreamId) -> (RetellEvent, Value) {
        let data = json!({ "streamId": stream.as_str(), "kind": "audio" });
        self.source = Source::Custom(stream);
        (RetellEvent::CustomMediaStreamSent, data)
    }

    /// Switches the agent back to the microphone.
    pub fn resume_microphone(&mut self) -> (RetellEvent, Value) {
        let previous = match std::mem::replace(&mut self.source, Source::Microphone) {
            Source::Custom(s) => Value::String(s.as_str().to_owned()),
            Source::Microphone => Value::Null,
        };
        (RetellEvent::MicrophoneResumed, json!({ "previousStreamId": previous }))
    }

    /// `/call-status`, given whether event sockets are attached.
    pub fn call_status(&self, has_web_socket: bool) -> CallStatus {
        CallStatus {
            is_active: true,
            is_connected: self.is_connected(),
            is_agent_talking: self.vad.is_active(),
            has_web_socket,
        }
    }

    /// Whether a caller leg is connected: a Twilio stream, or a WebRTC caller whose ICE and DTLS are up.
    pub fn is_connected(&self) -> bool {
        self.caller.is_some() || self.legs.iter().any(|l| l.role == RtcRole::Caller && l.connected)
    }

    /// The WebRTC leg of `role` (caller or agent), if any.
    pub fn leg(&self, role: &RtcRole) -> Option<&media::RtcLeg> {
        self.legs.iter().find(|l| &l.role == role)
    }

    /// The WebRTC leg of `peer`, if it is this session's.
    pub fn leg_mut(&mut self, peer: crate::rtc::PeerId) -> Option<&mut media::RtcLeg> {
        self.legs.iter_mut().find(|l| l.peer == peer)
    }

    /// `/track-status`: the tracks that exist now: the caller's microphone while its stream is
    /// connected, and the agent's audio while the agent is connected.
    pub fn track_status(&self) -> TrackStatus {
        let mut tracks = Vec::new();
        if let Some(caller) = &self.caller {
            tracks.push(Track {
                sid: format!("{}-inbound", caller.start.stream_sid),
                kind: "audio",
                name: "microphone".to_owned(),
                source: "microphone",
            });
        }
        for leg in self.legs.iter().filter(|l| l.connected && l.inbound.is_some()) {
            let (name, source) = match &leg.role {
                RtcRole::Caller => ("microphone".to_owned(), "microphone"),
                RtcRole::Agent => ("agent".to_owned(), "agent"),
                RtcRole::Custom(stream) => (stream.as_str().to_owned(), "custom"),
                RtcRole::Listener => continue,
            };
            tracks.push(Track { sid: format!("{}-rtc-{}", self.id, leg.peer), kind: "audio", name, source });
        }
        if let Agent::Open { .. } = self.agent {
            tracks.push(Track {
                sid: format!("{}-agent", self.id),
                kind: "audio",
                name: "agent".to_owned(),
                source: "agent",
            });
        }
        TrackStatus { microphone_enabled: self.microphone_enabled, tracks }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> Session {
        Session::new(
            SessionId::parse("s").expect("valid"),
            StartCall {
                access_token: Secret::new("t"),
                sample_rate: SampleRate::DEFAULT,
                emit_raw_audio_samples: false,
            },
        )
    }

    /// Mute, custom stream and resume change state and name the event each causes.
    #[test]
    fn controls() {
        let mut s = session();
        assert!(s.track_status().microphone_enabled && s.agent_hears_microphone());
        assert_eq!(s.set_microphone(false).0, RetellEvent::Update);
        assert!(!s.track_status().microphone_enabled && !s.agent_hears_microphone());
        let stream = StreamId::parse("c1").expect("valid");
        assert_eq!(s.send_custom_stream(stream.clone()).0, RetellEvent::CustomMediaStreamSent);
        assert_eq!(s.source(), &Source::Custom(stream));
        let (e, data) = s.resume_microphone();
        assert_eq!(e, RetellEvent::MicrophoneResumed);
        assert_eq!(data, json!({"previousStreamId": "c1"}));
        assert_eq!(s.source(), &Source::Microphone);
        assert!(!s.track_status().microphone_enabled, "resume switches the source, it does not unmute");
    }

    /// The access token is kept exactly, and a stream-created session takes its token parameter.
    #[test]
    fn tokens() {
        assert!(session().access_token().is_some_and(|t| t.matches("t")));
        let mut start = twilio::Start {
            sequence: None,
            stream_sid: "MZ1".into(),
            account_sid: "AC1".into(),
            call_sid: "CA1".into(),
            tracks: vec!["inbound".into()],
            custom_parameters: vec![],
            media_format: twilio::MediaFormat::default(),
        };
        let id = SessionId::parse("CA1").expect("valid");
        assert!(Session::from_stream(id.clone(), &start).access_token().is_none());
        start.custom_parameters.push(("accessToken".into(), "abc".into()));
        assert!(Session::from_stream(id, &start).access_token().is_some_and(|t| t.matches("abc")));
    }

    /// `chunk` and `timestamp` toward the agent keep the caller's own numbers (and their gaps) but
    /// never go back when other sources (a custom stream, a WebRTC caller) feed the agent between.
    #[test]
    fn agent_numbering_only_goes_forward() {
        let mut s = session();
        s.agent = Agent::Open { conn: ConnectionId(1), sequence: 2, chunk: 1, next_at: 0 };
        let sent = |s: &mut Session, chunk: Option<u64>, ts: Option<u64>| {
            let (_, text) = s.agent_media_msg(b"AAAA", 160, chunk, ts).expect("open agent");
            let v: Value = serde_json::from_str(&text).expect("json");
            let num = |f: &str| v["media"][f].as_str().and_then(|n| n.parse::<u64>().ok()).expect("a number");
            (num("chunk"), num("timestamp"))
        };
        assert_eq!(sent(&mut s, None, None), (1, 0), "the leg's own count");
        assert_eq!(sent(&mut s, Some(300), Some(6000)), (300, 6000), "the caller's, gap and all");
        assert_eq!(sent(&mut s, None, None), (301, 6020), "a custom stream's frame follows on");
        assert_eq!(sent(&mut s, Some(251), Some(5000)), (302, 6040), "never back");
        assert_eq!(sent(&mut s, Some(400), Some(8000)), (400, 8000));
    }
}
