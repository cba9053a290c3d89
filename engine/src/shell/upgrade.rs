//! What an accepted WebSocket upgrade is for, decided by the control plane and carried to the
//! session's owner core (across cores inside a hand-off).
//!
//! Invariant: plain data; imports nothing from the shell.

use crate::core::Credential;
use crate::id::SessionId;

/// What a WebSocket is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketKind {
    /// `/ws`: session events.
    Events,
    /// `/frontend-stream`: the call's audio and transcripts.
    Frontend,
    /// `/twilio/stream`: the caller's Media Stream. Its session is named by its `start` message,
    /// so the relay answers 101 at once and moves the socket once that message arrives.
    Caller,
    /// `/llm-websocket/{call_id}`: Retell's custom-LLM socket for the call.
    Llm,
}

/// An accepted WebSocket upgrade, completed on the session's owner core.
pub struct Upgrade {
    /// What the socket is for.
    pub kind: SocketKind,
    /// The session, when the request names it (required for listeners; for callers a fallback
    /// when the `start` message names none, unless `session_fixed`).
    pub session: Option<SessionId>,
    /// A caller's session is the one its URL's path names (`/twilio/stream/{callSid}`, which a
    /// balancer routes by): a `start` that names another call is refused (1008).
    pub session_fixed: bool,
    /// What the client presented.
    pub credential: Credential,
    /// `Sec-WebSocket-Accept` for the 101 answer.
    pub accept: String,
    /// Dropped when the socket ends, wherever it then lives: releases per-user limits.
    pub guard: Option<Box<dyn std::any::Any + Send>>,
    /// Complete the handshake, then close at once with this code and reason (a limit that
    /// WebSocket clients must see as a close code, as seed 004's per-user socket cap).
    pub reject: Option<(u16, &'static str)>,
}

impl std::fmt::Debug for Upgrade {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upgrade").field("kind", &self.kind).field("session", &self.session).finish_non_exhaustive()
    }
}
