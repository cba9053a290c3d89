//! `WS /llm-websocket/{call_id}`: the relay as Retell's custom LLM (seed 002), answering with the
//! built-in scripted responder. Completed utterances of Retell's transcripts feed the call's
//! `transcription` events, `/ws` updates and record.
//!
//! Invariant: sans-IO like the rest of the core; a socket's state is dropped when it detaches.

use serde_json::json;

use super::command::{Speaker, Transcript};
use super::CoreState;
use crate::id::{ConnectionId, SessionId};
use crate::proto::events::RetellEvent;
use crate::proto::retell::{self, Request, Utterance};
use crate::time::Now;

/// One Retell LLM socket.
pub(super) struct LlmSocket {
    call: SessionId,
    /// Transcript entries already reported.
    reported: usize,
}

impl CoreState {
    /// Retell connected for call `id` on `conn`: the relay's config, then the begin sentence.
    pub fn handle_llm_open(&mut self, now: Now, id: &SessionId, conn: ConnectionId) {
        if self.shutting_down {
            self.close(conn, 1001, "relay shutting down");
            return;
        }
        self.llm.insert(conn, LlmSocket { call: id.clone(), reported: 0 });
        self.send(conn, retell::config(None));
        let begin = self.begin_sentence.clone();
        if !begin.is_empty() {
            self.send(conn, retell::response(0, &begin, true, false));
        }
        self.broadcast(now, id, RetellEvent::Update, json!({ "llm": "connected" }));
    }

    /// A text message from Retell on `conn`.
    pub fn handle_llm_text(&mut self, now: Now, conn: ConnectionId, text: &str) {
        let Some(call) = self.llm.get(&conn).map(|s| s.call.clone()) else { return };
        let Ok(request) = retell::parse(text) else {
            self.stats.protocol_errors += 1;
            return;
        };
        match request {
            Request::Config { response_id } => self.send(conn, retell::config(response_id)),
            Request::PingPong { timestamp, response_id } => {
                self.send(conn, retell::pong(timestamp, response_id, now.unix_ms));
            }
            Request::CallDetails(details) => {
                self.broadcast(now, &call, RetellEvent::Metadata, json!({ "call_details": details }))
            }
            Request::UpdateOnly(transcript) => self.llm_transcript(now, conn, &call, &transcript, false),
            Request::Respond { response_id, transcript, reminder } => {
                self.llm_transcript(now, conn, &call, &transcript, true);
                let (chunks, end_call) = retell::scripted_answer(&transcript, reminder);
                let last = chunks.len().saturating_sub(1);
                for (i, chunk) in chunks.iter().enumerate() {
                    let done = i == last;
                    self.send(conn, retell::response(response_id, chunk, done, done && end_call));
                }
            }
        }
    }

    /// Reports transcript entries not reported yet: all of them when the turn is complete, else
    /// all but the last (the caller may still be speaking it).
    fn llm_transcript(&mut self, now: Now, conn: ConnectionId, call: &SessionId, t: &[Utterance], complete: bool) {
        let Some(socket) = self.llm.get_mut(&conn) else { return };
        if t.len() < socket.reported {
            socket.reported = 0; // Retell started a new transcript.
        }
        let upto = if complete { t.len() } else { t.len().saturating_sub(1) };
        let from = socket.reported.min(upto);
        socket.reported = socket.reported.max(upto);
        for u in &t[from..upto] {
            let speaker = if u.role == "agent" { Speaker::Agent } else { Speaker::User };
            let _ = self.transcript(now, call, Transcript { speaker, text: u.content.clone() });
        }
    }

    /// Forgets a Retell socket that closed; true if `conn` was one.
    pub(super) fn llm_detach(&mut self, conn: ConnectionId) -> bool {
        self.llm.remove(&conn).is_some()
    }
}
