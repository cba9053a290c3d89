//! Everything one core owns: its sessions, the event sockets attached to them, and their timers.
//!
//! Invariant: sans-IO. Inputs arrive through `handle_*` with the time passed in; effects leave
//! through [`CoreState::poll_output`]; nothing here touches a socket, a clock or another core.

pub mod command;

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use serde_json::Value;
use tungstenite::Utf8Bytes;

use crate::config::Limits;
use crate::id::{ConnectionId, SessionId};
use crate::proto::events::{self, ClientMessage, RetellEvent};
use crate::secret::Secret;
use crate::session::Session;
use crate::time::Now;
use command::{Command, CommandError, Reply};

/// Proof of identity an event socket presented.
#[derive(Debug, Clone)]
pub enum Credential {
    /// The relay's API key (checked by the control plane): may watch any session.
    Operator,
    /// A session access token (`Authorization: Bearer` or `?accessToken=`).
    Token(Secret),
    /// Nothing.
    Anonymous,
}

/// Why an event socket may not attach.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttachError {
    /// No credential, or not the session's access token.
    #[error("a valid access token for this session is required")]
    Unauthorized,
    /// The session has `observers_per_session` sockets already.
    #[error("this session has its limit of {limit} event sockets")]
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
}

/// An effect for the shell to carry out.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Send this text message on the connection.
    Send {
        /// The event socket.
        conn: ConnectionId,
        /// JSON text, shared by every socket it goes to.
        text: Utf8Bytes,
    },
    /// Send a close frame with `code` and `reason`, then close the connection.
    Close {
        /// The event socket.
        conn: ConnectionId,
        /// WebSocket close code.
        code: u16,
        /// Close reason for the peer.
        reason: &'static str,
    },
}

/// Counts a core exposes to health checks and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    /// Sessions started and not stopped.
    pub active_sessions: usize,
    /// Attached event sockets, waiting ones included.
    pub observers: usize,
}

/// A core's sessions and their event sockets.
pub struct CoreState {
    limits: Limits,
    slots: HashMap<SessionId, Slot>,
    /// Which session each attached socket watches, for detach and client messages.
    conns: HashMap<ConnectionId, SessionId>,
    /// Ids that have sockets but no session, in the order their wait started. All waits last the
    /// same `pending_observer_timeout`, so the queue is sorted by deadline.
    pending: VecDeque<(Instant, SessionId)>,
    outputs: VecDeque<Output>,
    active: usize,
    observers: usize,
    /// Ids whose sockets wait for a start now (the `pending` queue also holds stale entries).
    waiting: usize,
    /// Set by `handle_shutdown`: no new sessions or sockets from then on.
    shutting_down: bool,
}

/// One id's entry: the session once started, and the sockets watching it (before or after).
#[derive(Default)]
struct Slot {
    session: Option<Session>,
    observers: Vec<(ConnectionId, Credential)>,
    /// When the first socket started waiting for the session to start.
    waiting_since: Option<Instant>,
}

impl CoreState {
    /// An empty core.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            slots: HashMap::new(),
            conns: HashMap::new(),
            pending: VecDeque::new(),
            outputs: VecDeque::new(),
            active: 0,
            observers: 0,
            waiting: 0,
            shutting_down: false,
        }
    }

    /// Runs a command for `id`.
    ///
    /// # Errors
    /// [`CommandError`] when the session is missing, already exists, or the core is full.
    pub fn handle_command(&mut self, now: Now, id: &SessionId, command: Command) -> Result<Reply, CommandError> {
        if let Command::Start(start) = command {
            return self.start(now, id, start);
        }
        let slot = self.slots.get_mut(id).ok_or(CommandError::NotFound)?;
        let session = slot.session.as_mut().ok_or(CommandError::NotFound)?;
        let (reply, event) = match command {
            Command::Start(_) => unreachable!("handled above"),
            Command::Stop => {
                let event = session.ended_event("stopped");
                self.end(now, id, event, 1000, "call ended");
                return Ok(Reply::Stopped);
            }
            Command::SetMicrophone(enabled) => (Reply::Microphone { enabled }, Some(session.set_microphone(enabled))),
            Command::SendCustomStream(stream) => {
                let event = session.send_custom_stream(stream.clone());
                (Reply::CustomStream(stream), Some(event))
            }
            Command::ResumeMicrophone => (Reply::MicrophoneResumed, Some(session.resume_microphone())),
            Command::CallStatus => (Reply::CallStatus(session.call_status(!slot.observers.is_empty())), None),
            Command::TrackStatus => (Reply::TrackStatus(session.track_status()), None),
        };
        if let Some((event, data)) = event {
            self.broadcast(now, id, event, data);
        }
        Ok(reply)
    }

    /// Attaches event socket `conn` to `id` (started or not yet) and returns its
    /// `connection_established` message.
    ///
    /// # Errors
    /// [`AttachError`] when the credential does not fit or a limit is reached.
    pub fn handle_attach(
        &mut self,
        now: Now,
        id: &SessionId,
        conn: ConnectionId,
        credential: Credential,
    ) -> Result<Utf8Bytes, AttachError> {
        if self.shutting_down {
            return Err(AttachError::ShuttingDown);
        }
        if let Some(slot) = self.slots.get(id) {
            if let Some(session) = &slot.session {
                if !authorizes(session, &credential) {
                    return Err(AttachError::Unauthorized);
                }
            } else if matches!(credential, Credential::Anonymous) {
                return Err(AttachError::Unauthorized);
            }
            if slot.observers.len() >= self.limits.observers_per_session {
                return Err(AttachError::TooManyObservers { limit: self.limits.observers_per_session });
            }
        } else {
            if matches!(credential, Credential::Anonymous) {
                return Err(AttachError::Unauthorized);
            }
            if self.waiting >= self.limits.pending_sessions_per_core {
                return Err(AttachError::TooManyPending);
            }
            self.waiting += 1;
            self.pending.push_back((now.instant, id.clone()));
            self.slots.insert(id.clone(), Slot { waiting_since: Some(now.instant), ..Slot::default() });
        }
        let slot = self.slots.get_mut(id).expect("inserted or found just above");
        slot.observers.push((conn, credential));
        self.conns.insert(conn, id.clone());
        self.observers += 1;
        let is_connected = slot.session.as_ref().is_some_and(|s| s.call_status(true).is_connected);
        Ok(events::connection_established(id, is_connected, false))
    }

    /// Detaches `conn` (its socket closed).
    pub fn handle_detach(&mut self, conn: ConnectionId) {
        let Some(id) = self.conns.remove(&conn) else { return };
        self.observers -= 1;
        let Some(slot) = self.slots.get_mut(&id) else { return };
        slot.observers.retain(|(c, _)| *c != conn);
        if slot.session.is_none() && slot.observers.is_empty() {
            self.slots.remove(&id);
            self.waiting -= 1;
        }
    }

    /// A text message from event socket `conn`.
    pub fn handle_client_text(&mut self, now: Now, conn: ConnectionId, text: &str) {
        match events::parse_client(text) {
            Ok(ClientMessage::Ping) => self.outputs.push_back(Output::Send { conn, text: events::pong(now.unix_ms) }),
            Ok(ClientMessage::Other) => {}
            Err(e) => {
                let data = serde_json::json!({ "message": e.to_string() });
                let text = events::retell_event(RetellEvent::Error, data, now.unix_ms);
                self.outputs.push_back(Output::Send { conn, text });
            }
        }
    }

    /// Expires sockets that waited too long for their session to start.
    pub fn handle_timeout(&mut self, now: Now) {
        while let Some((since, _)) = self.pending.front() {
            if now.instant.saturating_duration_since(*since) < self.limits.pending_observer_timeout {
                break;
            }
            let (since, id) = self.pending.pop_front().expect("front exists");
            let Some(slot) = self.slots.get(&id) else { continue };
            if slot.session.is_some() || slot.waiting_since != Some(since) {
                continue;
            }
            let slot = self.slots.remove(&id).expect("checked above");
            self.waiting -= 1;
            for (conn, _) in slot.observers {
                self.conns.remove(&conn);
                self.observers -= 1;
                self.outputs.push_back(Output::Close { conn, code: 1008, reason: "session was not started" });
            }
        }
    }

    /// Ends every session (`call_ended` with reason `shutdown`) and closes every event socket.
    pub fn handle_shutdown(&mut self, now: Now) {
        self.shutting_down = true;
        let ids: Vec<SessionId> = self.slots.keys().cloned().collect();
        for id in ids {
            let event = self.slots.get(&id).and_then(|s| s.session.as_ref()).map(|s| s.ended_event("shutdown"));
            match event {
                Some(event) => self.end(now, &id, event, 1001, "relay shutting down"),
                None => {
                    let slot = self.slots.remove(&id).expect("id from keys");
                    self.waiting -= 1;
                    for (conn, _) in slot.observers {
                        self.conns.remove(&conn);
                        self.observers -= 1;
                        self.outputs.push_back(Output::Close { conn, code: 1001, reason: "relay shutting down" });
                    }
                }
            }
        }
        self.pending.clear();
    }

    /// Discards session `id` after a bug surfaced while handling it, closing its sockets with 1011.
    pub fn handle_panic(&mut self, id: &SessionId) {
        let Some(slot) = self.slots.remove(id) else { return };
        if slot.session.is_some() {
            self.active -= 1;
        } else {
            self.waiting -= 1;
        }
        for (conn, _) in slot.observers {
            self.conns.remove(&conn);
            self.observers -= 1;
            self.outputs.push_back(Output::Close { conn, code: 1011, reason: "internal error" });
        }
    }

    /// The next effect to carry out.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// When [`Self::handle_timeout`] next has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.pending.front().map(|(since, _)| *since + self.limits.pending_observer_timeout)
    }

    /// Current counts.
    pub fn stats(&self) -> Stats {
        Stats { active_sessions: self.active, observers: self.observers }
    }

    /// The session a connection watches, if any.
    pub fn session_of(&self, conn: ConnectionId) -> Option<&SessionId> {
        self.conns.get(&conn)
    }

    fn start(&mut self, now: Now, id: &SessionId, start: command::StartCall) -> Result<Reply, CommandError> {
        if self.shutting_down {
            return Err(CommandError::ShuttingDown);
        }
        if self.slots.get(id).is_some_and(|s| s.session.is_some()) {
            return Err(CommandError::AlreadyActive);
        }
        if self.active >= self.limits.sessions_per_core {
            return Err(CommandError::CoreFull { limit: self.limits.sessions_per_core });
        }
        let session = Session::new(id.clone(), start);
        let slot = self.slots.entry(id.clone()).or_default();
        if slot.waiting_since.take().is_some() {
            self.waiting -= 1;
        }
        // Sockets that attached before the start presented a token; only those holding this
        // session's token (or the operator key) may stay.
        let mut kept = Vec::with_capacity(slot.observers.len());
        for (conn, credential) in slot.observers.drain(..) {
            if authorizes(&session, &credential) {
                kept.push((conn, credential));
            } else {
                self.conns.remove(&conn);
                self.observers -= 1;
                self.outputs.push_back(Output::Close { conn, code: 1008, reason: "invalid access token" });
            }
        }
        slot.observers = kept;
        let (event, data) = session.started_event();
        slot.session = Some(session);
        self.active += 1;
        self.broadcast(now, id, event, data);
        Ok(Reply::Started)
    }

    fn end(&mut self, now: Now, id: &SessionId, (event, data): (RetellEvent, Value), code: u16, reason: &'static str) {
        self.broadcast(now, id, event, data);
        let slot = self.slots.remove(id).expect("caller found the slot");
        self.active -= 1;
        for (conn, _) in slot.observers {
            self.conns.remove(&conn);
            self.observers -= 1;
            self.outputs.push_back(Output::Close { conn, code, reason });
        }
    }

    fn broadcast(&mut self, now: Now, id: &SessionId, event: RetellEvent, data: Value) {
        let Some(slot) = self.slots.get(id) else { return };
        if slot.observers.is_empty() {
            return;
        }
        let text = events::retell_event(event, data, now.unix_ms);
        for (conn, _) in &slot.observers {
            self.outputs.push_back(Output::Send { conn: *conn, text: text.clone() });
        }
    }
}

fn authorizes(session: &Session, credential: &Credential) -> bool {
    match credential {
        Credential::Operator => true,
        Credential::Token(t) => session.authorizes(t.expose()),
        Credential::Anonymous => false,
    }
}

#[cfg(test)]
mod tests;
