//! An OpenAI-Realtime agent leg on the core: its audio deltas paced to the caller with a mark after
//! each (so the core knows how much of each item was heard), barge-in on the server's
//! `speech_started` (clear toward the caller, truncate the item to what was heard), transcripts to
//! frontends, `/ws` and the call record.
//!
//! Invariant: sans-IO like the rest of the core.

use bytes::Bytes;
use serde_json::json;

use super::command::{Speaker, Transcript};
use super::{push_split, CoreState};
use crate::id::{ConnectionId, SessionId};
use crate::proto::events::RetellEvent;
use crate::proto::realtime::{self, ServerEvent};
use crate::proto::twilio;
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
            ServerEvent::FunctionCall { call_id, name, arguments } => {
                self.realtime_function_call(now, id, conn, call_id, name, &arguments);
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
        let pushed = push_split(&mut session.pacer, now.instant, delta, samples)
            .and_then(|()| session.pacer.push_mark(now.instant, realtime::mark_name(&item_id, queued / 8)));
        if pushed.is_err() {
            self.stats.pacer_drops += 1;
        }
        self.drain_pacer(now, id);
        self.schedule(now, id);
    }

    /// The caller started talking over the agent: what has not played is dropped (`clear` toward
    /// a Twilio caller) and the model is told how much of its item the caller really heard.
    fn realtime_barge_in(&mut self, now: Now, id: &SessionId, conn: ConnectionId) {
        // Marks that played by now but that no timer has reported yet count as heard.
        if let Some(session) = self.slots.get_mut(id).and_then(|s| s.session.as_mut()) {
            session.pacer.handle_timeout(now.instant);
        }
        self.drain_pacer(now, id);
        let Some(session) = self.slots.get_mut(id).and_then(|s| s.session.as_mut()) else { return };
        let item = session.realtime.item.take();
        let heard = session.realtime.heard.take();
        let playing = session.pacer.queued_samples() > 0 || session.pacer.in_flight_samples(now.instant) > 0;
        session.pacer.handle_clear(now.instant);
        if let (Some((item_id, _)), true) = (item, playing) {
            let ms = match heard {
                Some((heard_item, ms)) if heard_item == item_id => ms,
                _ => 0,
            };
            self.send(conn, realtime::truncate(&item_id, ms));
        }
        self.drain_pacer(now, id);
        // Marks the clear released name audio that was never heard: they no longer count.
        if let Some(session) = self.slots.get_mut(id).and_then(|s| s.session.as_mut()) {
            session.realtime.heard = None;
        }
        self.schedule(now, id);
        self.broadcast(now, id, RetellEvent::Update, json!({ "bargeIn": true }));
    }
}
