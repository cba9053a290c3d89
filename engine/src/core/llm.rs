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
    /// The upstream LLM socket it is forwarded to, when one is configured.
    upstream: Option<Upstream>,
}

/// The forwarding state toward an upstream LLM.
struct Upstream {
    conn: ConnectionId,
    open: bool,
    /// What Retell said while the upstream was being dialled (bounded).
    backlog: Vec<tungstenite::Utf8Bytes>,
}

/// Messages held for an upstream LLM still being dialled.
const UPSTREAM_BACKLOG: usize = 64;

impl CoreState {
    /// Retell connected for call `id` on `conn`: the relay's config, then the begin sentence.
    pub fn handle_llm_open(&mut self, now: Now, id: &SessionId, conn: ConnectionId) {
        if self.shutting_down {
            self.close(conn, 1001, "relay shutting down");
            return;
        }
        if let Some(url) = self.agents.llm_upstream.clone() {
            // Forwarded: the upstream speaks first (its own config and begin sentence).
            let up = ConnectionId(super::CORE_CONN_BIT | self.next_conn);
            self.next_conn += 1;
            let mut url = url;
            let path = url.path.trim_end_matches('/').to_owned();
            let (base, query) = path.split_once('?').map_or((path.as_str(), ""), |(b, q)| (b, q));
            url.path = if query.is_empty() { format!("{base}/{id}") } else { format!("{base}/{id}?{query}") };
            self.llm_up.insert(up, conn);
            let upstream = Some(Upstream { conn: up, open: false, backlog: Vec::new() });
            self.llm.insert(conn, LlmSocket { call: id.clone(), reported: 0, upstream });
            self.outputs.push_back(super::Output::ConnectAgent {
                conn: up,
                session: id.clone(),
                url,
                protocol: crate::session::agent::AgentProtocol::RetellLlm,
                bearer: None,
                header: None,
            });
            self.broadcast(now, id, RetellEvent::Update, json!({ "llm": "connected" }));
            return;
        }
        self.llm.insert(conn, LlmSocket { call: id.clone(), reported: 0, upstream: None });
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
        let request = retell::parse(text);
        if let Some(up) = self.llm.get_mut(&conn).and_then(|s| s.upstream.as_mut()) {
            // Forwarded as is; the relay only reads the transcripts on the way.
            let message = tungstenite::Utf8Bytes::from(text.to_owned());
            if up.open {
                let to = up.conn;
                self.send(to, message);
            } else if up.backlog.len() < UPSTREAM_BACKLOG {
                up.backlog.push(message);
            }
            match request {
                Ok(Request::UpdateOnly(t)) => self.llm_transcript(now, conn, &call, &t, false),
                Ok(Request::Respond { transcript, .. }) => self.llm_transcript(now, conn, &call, &transcript, true),
                _ => {}
            }
            return;
        }
        let Ok(request) = request else {
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

    /// Forgets a Retell socket or an upstream LLM socket that closed; true if `conn` was one. The
    /// other side of a forwarded pair is closed with it (Retell reconnects on its own).
    pub(super) fn llm_detach(&mut self, conn: ConnectionId) -> bool {
        if let Some(socket) = self.llm.remove(&conn) {
            if let Some(up) = socket.upstream {
                self.llm_up.remove(&up.conn);
                self.close(up.conn, 1000, "call ended");
            }
            return true;
        }
        if let Some(retell) = self.llm_up.remove(&conn) {
            self.llm.remove(&retell);
            self.close(retell, 1011, "the upstream LLM closed");
            return true;
        }
        false
    }

    /// The upstream LLM socket `conn` connected: what Retell said meanwhile follows. Returns
    /// whether `conn` is one (then the shell serves it), `None` when it is not an LLM socket.
    pub(super) fn llm_upstream_open(&mut self, conn: ConnectionId) -> Option<bool> {
        let retell = *self.llm_up.get(&conn)?;
        let Some(up) = self.llm.get_mut(&retell).and_then(|s| s.upstream.as_mut()) else { return Some(false) };
        up.open = true;
        let backlog = std::mem::take(&mut up.backlog);
        for message in backlog {
            self.send(conn, message);
        }
        Some(true)
    }

    /// A message from an upstream LLM: to its Retell socket. Returns false if `conn` is not one.
    pub(super) fn llm_upstream_frame(&mut self, conn: ConnectionId, frame: &bytes::Bytes) -> bool {
        let Some(retell) = self.llm_up.get(&conn).copied() else { return false };
        match std::str::from_utf8(frame) {
            Ok(text) => self.send(retell, tungstenite::Utf8Bytes::from(text.to_owned())),
            Err(_) => self.stats.protocol_errors += 1,
        }
        true
    }
}
