//! An OpenAI-Realtime agent leg on the core: its audio deltas paced to the caller with a mark after
//! each (a pacer mark for the playout model, and for a Twilio caller a `mark` whose echo says what
//! it really heard, see `session::heard`), barge-in on the server's `speech_started` (clear toward
//! the caller, truncate the item to what was heard), the caller's mark echoes, transcripts to
//! frontends, `/ws` and the call record.
//!
//! Invariant: sans-IO like the rest of the core.

use bytes::Bytes;
use serde_json::json;

use super::command::{Speaker, Transcript};
use super::{push_split, AgentProtocol, CoreState};
use crate::id::{ConnectionId, SessionId};
use crate::proto::events::RetellEvent;
use crate::proto::realtime::{self, ServerEvent};
use crate::proto::twilio;
use crate::session::heard::Echo;
use crate::time::Now;

impl CoreState {
    /// A text frame from a Realtime agent leg.
    pub(super) fn realtime_frame(&mut self, now: Now, id: &SessionId, conn: ConnectionId, frame: &Bytes) {
        let event = std::str::from_utf8(frame).ok().and_then(|t| realtime::parse(t).ok());
        let Some(event) = event else {
            self.stats.protocol_errors += 1;
            return;
        };
        match event {
            ServerEvent::AudioDelta { item_id, delta } => self.realtime_audio(now, id, item_id, delta),
            ServerEvent::SpeechStarted => self.realtime_barge_in(now, id, conn),
            ServerEvent::CallerTranscript(text) => {
                let _ = self.transcript(now, id, Transcript { speaker: Speaker::User, text });
            }
            ServerEvent::AgentTranscript(text) => {
                let _ = self.transcript(now, id, Transcript { speaker: Speaker::Agent, text });
            }
            ServerEvent::Error(message) => {
                self.broadcast(now, id, RetellEvent::Error, json!({ "message": message, "source": "agent" }));
            }
            ServerEvent::Other => {}
        }
    }

    /// Queues a delta for the caller, then a mark saying how far into its item the caller will
    /// have heard once it plays.
    fn realtime_audio(&mut self, now: Now, id: &SessionId, item_id: String, delta: Bytes) {
        let Some(samples) = twilio::base64_samples(&delta).filter(|n| *n > 0) else {
            self.stats.protocol_errors += 1;
            return;
        };
        let Some(session) = self.slots.get_mut(id).and_then(|s| s.session.as_mut()) else { return };
        self.stats.frames_in.add(super::LegKind::Realtime, 1);
        let queued = match &mut session.realtime.item {
            Some((item, n)) if *item == item_id => {
                *n += samples as u64;
                *n
            }
            _ => {
                session.realtime.item = Some((item_id.clone(), samples as u64));
                samples as u64
            }
        };
        let end_ms = queued / 8;
        let pushed = push_split(&mut session.pacer, now.instant, delta, samples);
        if pushed.is_ok() && session.caller.is_some() {
            // A Twilio caller gets a mark of its own once this delta's last piece is released.
            session.realtime.heard.queued(session.pacer.end_samples(), &item_id, end_ms);
        }
        let pushed = pushed.and_then(|()| session.pacer.push_mark(now.instant, realtime::mark_name(&item_id, end_ms)));
        if pushed.is_err() {
            self.stats.pacer_drops += 1;
        }
        self.drain_pacer(now, id);
        self.schedule(now, id);
    }

    /// The caller started talking over the agent: what has not played is dropped (`clear` toward
    /// a Twilio caller) and the model is told how much of its item the caller really heard: up
    /// to the last mark the caller echoed, or, for a caller that has not echoed marks (or a WebRTC
    /// caller), what the playout model says played.
    fn realtime_barge_in(&mut self, now: Now, id: &SessionId, conn: ConnectionId) {
        // Marks that played by now but that no timer has reported yet count as heard.
        if let Some(session) = self.slots.get_mut(id).and_then(|s| s.session.as_mut()) {
            session.pacer.handle_timeout(now.instant);
        }
        self.drain_pacer(now, id);
        let Some(session) = self.slots.get_mut(id).and_then(|s| s.session.as_mut()) else { return };
        let item = session.realtime.item.take();
        let heard = &session.realtime.heard;
        let playing = session.pacer.queued_samples() > 0
            || session.pacer.in_flight_samples(now.instant) > 0
            || (heard.trusts_echoes() && heard.unconfirmed());
        let truncate = item.filter(|_| playing).map(|(item_id, _)| {
            let ms = heard.heard_ms(&item_id);
            realtime::truncate(&item_id, ms)
        });
        session.pacer.handle_clear(now.instant);
        if let Some(text) = truncate {
            self.send(conn, text);
        }
        self.drain_pacer(now, id);
        // The caller is told to clear: the marks it has not echoed are flushed (their echoes are
        // not playback), and the model's marks the clear released name audio never heard.
        if let Some(session) = self.slots.get_mut(id).and_then(|s| s.session.as_mut()) {
            session.realtime.heard.handle_clear();
        }
        self.schedule(now, id);
        self.broadcast(now, id, RetellEvent::Update, json!({ "bargeIn": true }));
    }

    /// A `mark` echoed by a Twilio caller: one of the marks sent after a Realtime agent's audio
    /// (playback reached it), or Twilio's flush of them after a `clear`; any other name is a
    /// protocol error.
    pub(super) fn caller_mark(&mut self, id: &SessionId, name: &str) {
        let echo = match self.slots.get_mut(id).and_then(|s| s.session.as_mut()) {
            Some(session) if session.agent_protocol == AgentProtocol::Realtime => {
                session.realtime.heard.handle_echo(name)
            }
            _ => Echo::Unknown,
        };
        if echo == Echo::Unknown {
            self.stats.protocol_errors += 1;
        }
    }
}
