//! One call's control state: its configuration, microphone and source selection.
//!
//! Invariant: pure state; every change returns the events it causes, and nothing here knows about
//! sockets or which connections listen.

use serde_json::{json, Value};

use crate::core::command::{CallStatus, StartCall, Track, TrackStatus};
use crate::id::{SessionId, StreamId};
use crate::media::SampleRate;
use crate::proto::events::RetellEvent;
use crate::secret::Secret;

/// What the agent hears from the caller side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The caller's microphone (silence while muted).
    Microphone,
    /// A custom stream published with this id.
    Custom(StreamId),
}

/// A live session's state.
#[derive(Debug)]
pub struct Session {
    id: SessionId,
    access_token: Secret,
    sample_rate: SampleRate,
    emit_raw_audio_samples: bool,
    /// `false` while muted: the agent gets silence in place of the microphone.
    microphone_enabled: bool,
    source: Source,
}

impl Session {
    /// A new session from `/start-call`'s parameters.
    pub fn new(id: SessionId, start: StartCall) -> Self {
        Self {
            id,
            access_token: start.access_token,
            sample_rate: start.sample_rate,
            emit_raw_audio_samples: start.emit_raw_audio_samples,
            microphone_enabled: true,
            source: Source::Microphone,
        }
    }

    /// The session's id.
    pub fn id(&self) -> &SessionId {
        &self.id
    }

    /// Whether `token` is this session's access token.
    pub fn authorizes(&self, token: &str) -> bool {
        self.access_token.matches(token)
    }

    /// Rate of raw samples on `/ws`.
    pub fn sample_rate(&self) -> SampleRate {
        self.sample_rate
    }

    /// Whether `/ws` carries raw agent samples.
    pub fn emit_raw_audio_samples(&self) -> bool {
        self.emit_raw_audio_samples
    }

    /// What the agent hears now.
    pub fn source(&self) -> &Source {
        &self.source
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
        CallStatus { is_active: true, is_connected: false, is_agent_talking: false, has_web_socket }
    }

    /// `/track-status`: the tracks that exist. Media legs add tracks; a session without media
    /// legs carries none.
    pub fn track_status(&self) -> TrackStatus {
        let tracks: Vec<Track> = Vec::new();
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
        assert!(s.track_status().microphone_enabled);
        assert_eq!(s.set_microphone(false).0, RetellEvent::Update);
        assert!(!s.track_status().microphone_enabled);
        let stream = StreamId::parse("c1").expect("valid");
        assert_eq!(s.send_custom_stream(stream.clone()).0, RetellEvent::CustomMediaStreamSent);
        assert_eq!(s.source(), &Source::Custom(stream));
        let (e, data) = s.resume_microphone();
        assert_eq!(e, RetellEvent::MicrophoneResumed);
        assert_eq!(data, json!({"previousStreamId": "c1"}));
        assert_eq!(s.source(), &Source::Microphone);
        assert!(!s.track_status().microphone_enabled, "resume switches the source, it does not unmute");
    }

    /// The token check is exact.
    #[test]
    fn token() {
        let s = session();
        assert!(s.authorizes("t"));
        assert!(!s.authorizes("T"));
    }
}
