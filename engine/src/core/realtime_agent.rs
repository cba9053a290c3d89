//! An OpenAI-Realtime agent leg on the core: the session configured and briefed when it opens
//! (the call's instructions, its first message spoken first), its audio deltas paced to the
//! caller with a mark after each (a pacer mark for the playout model, and for a Twilio caller a
//! `mark` whose echo says what it really heard, see `session::heard`), barge-in on the server's
//! `speech_started` (clear toward the caller, truncate the item to what was heard), the caller's
//! mark echoes, transcripts to frontends, `/ws` and the call record, and its errors reported (a
//! fatal one ends the agent leg, never the call).
//!
//! Invariant: sans-IO like the rest of the core; nothing the model sends ends the call.

use std::collections::VecDeque;

use bytes::Bytes;
use serde_json::json;

use super::command::{Direction, Speaker, Transcript};
use super::{bounded, push_split, AgentProtocol, CoreState};
use crate::id::{ConnectionId, SessionId};
use crate::proto::events::RetellEvent;
use crate::proto::realtime::{self, ServerError, ServerEvent, SessionConfig};
use crate::proto::twilio;
use crate::session::heard::Echo;
use crate::session::Pending;
use crate::time::Now;

/// Longest `prompt` or `first_message` a caller stream's parameters may brief the model with,
/// bytes (as `/outbound-call` allows).
const MAX_BRIEFING_BYTES: usize = 4096;

impl CoreState {
    /// The Realtime agent leg `conn` of `id` connected: the session is configured and briefed,
    /// asked to speak the call's first message, then hears what the caller said meanwhile.
    pub(super) fn realtime_open(&mut self, now: Now, id: &SessionId, conn: ConnectionId, backlog: VecDeque<Pending>) {
        let (instructions, first_message) = self.realtime_briefing(id);
        // The call's own tools (from `/outbound-call`), else the operator's (`--agent-tools`).
        let tools = self.realtime_tools(id, conn);
        let Some(agent) = self.agents.realtime.as_ref() else { return };
        let config = SessionConfig {
            shape: agent.shape,
            instructions: instructions.as_deref(),
            voice: agent.voice.as_deref(),
            tools: &tools,
        };
        let update = realtime::session_update(&config);
        self.send(conn, update);
        if let Some(first) = first_message.as_deref() {
            self.send(conn, realtime::greeting(first));
        }
        let mut sent = 0;
        for item in backlog {
            if let Pending::Media { payload, .. } = item {
                self.stats.frames_out.add(super::LegKind::Realtime, 1);
                self.send(conn, realtime::append(&payload));
                sent += 1;
            }
        }
        if let Some(session) = self.slots.get_mut(id).and_then(|s| s.session.as_mut()) {
            session.counts.agent.frames_out += sent;
        }
        self.broadcast(now, id, RetellEvent::CallReady, json!({ "agent": "connected" }));
    }

    /// The instructions and first message for call `id`'s Realtime session. Each comes from the
    /// first of: the call's record (`/outbound-call`'s `prompt` and `first_message`), the caller
    /// stream's parameters of the same names (bounded to [`MAX_BRIEFING_BYTES`]), the operator's
    /// setting for the relay's number on the call, the operator's default.
    fn realtime_briefing(&self, id: &SessionId) -> (Option<String>, Option<String>) {
        let record = self.records.get(id);
        let start = self.slots.get(id).and_then(|s| s.session.as_ref()).and_then(|s| s.greeting());
        let parameter = |name: &str| {
            start
                .and_then(|s| s.custom_parameter(name))
                .filter(|v| !v.is_empty())
                .map(|v| bounded(v, MAX_BRIEFING_BYTES).to_owned())
        };
        let briefing = self.agents.realtime.as_ref().map(|r| &r.briefing);
        // The relay's own number: the one called, or for an outbound call the one calling.
        let ours = match record.map(|r| r.direction) {
            Some(Direction::Outbound) => record.and_then(|r| r.from.clone()).or_else(|| parameter("from")),
            _ => record.and_then(|r| r.to.clone()).or_else(|| parameter("to")),
        };
        let instructions = record
            .and_then(|r| r.prompt.clone())
            .or_else(|| parameter("prompt"))
            .or_else(|| briefing.and_then(|b| b.instructions_for(ours.as_deref())).map(str::to_owned));
        let first_message = record
            .and_then(|r| r.first_message.clone())
            .or_else(|| parameter("first_message"))
            .or_else(|| briefing.and_then(|b| b.first_message.clone()));
        (instructions.filter(|s| !s.is_empty()), first_message.filter(|s| !s.is_empty()))
    }

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
            ServerEvent::Error(error) => self.realtime_error(now, id, conn, &error),
            ServerEvent::Other => {}
        }
    }

    /// The model reported an error: logged, counted and shown on `/ws`; a fatal one (the session
    /// refused or ended, see [`ServerError::is_fatal`]) closes the agent leg, and the call goes on
    /// without it.
    fn realtime_error(&mut self, now: Now, id: &SessionId, conn: ConnectionId, error: &ServerError) {
        self.stats.agent_errors += 1;
        let fatal = error.is_fatal();
        let ServerError { kind, code, message } = error;
        // Logged where there is a logger (the runtime build): the core itself writes nowhere.
        #[cfg(feature = "runtime")]
        if fatal {
            tracing::warn!(session = %id, kind, code, "the Realtime agent refused the session: {message}");
        } else {
            tracing::debug!(session = %id, kind, code, "the Realtime agent reported an error: {message}");
        }
        let data = json!({ "message": message, "source": "agent", "type": kind, "code": code, "fatal": fatal });
        self.broadcast(now, id, RetellEvent::Error, data);
        if fatal {
            self.close(conn, 1000, "the Realtime session failed");
            let reason = format!("the Realtime session failed ({})", if code.is_empty() { kind } else { code });
            self.handle_agent_closed(now, conn, &reason);
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
        session.counts.agent.frames_in += 1;
        if session.realtime.interrupted.as_deref() == Some(item_id.as_str()) {
            // The caller talked over this item: the rest of it, already on its way when the model
            // heard the caller, is not played (nor counted as heard).
            return;
        }
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
            session.counts.caller.dropped += 1;
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
        if let Some((item_id, _)) = &item {
            session.realtime.interrupted = Some(item_id.clone());
        }
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
