//! Messages between cores: commands with their reply address (the sending core and a request
//! number, as aquatic's meshes carry), replies, and connections handed to their session's core.
//!
//! Invariant: plain data; the senders (`shared`, `tcp`) and the receiver (`mesh`) import it, it
//! imports no task.

use std::os::fd::OwnedFd;

use super::tls::TlsState;
use super::upgrade::Upgrade;
use crate::core::command::{Command, CommandError, Reply};
use crate::id::{CoreId, SessionId};

/// A message from one core to another.
pub(crate) enum CoreMessage {
    /// Run `command` on `session` (owned by the receiver) and reply to `from`.
    Command { from: CoreId, request: u64, session: SessionId, command: Command },
    /// List the receiver's live calls (at most `limit`) and reply to `from` with `Reply::Calls`.
    ListCalls { from: CoreId, request: u64, limit: usize },
    /// A connection whose WebSocket upgrade belongs to a session the receiver owns.
    Handoff(Box<Handoff>),
    /// Stands in for a message the mesh lost in an unexpected send error.
    Dropped,
}

/// The answer to request `request`, on the reply mesh.
pub(crate) struct ReplyMessage {
    pub(crate) request: u64,
    pub(crate) result: Result<Reply, CommandError>,
}

/// A connection moving to its session's core, with the bytes already read from it.
pub(crate) struct Handoff {
    pub(crate) fd: OwnedFd,
    /// The connection's TLS state, when it came in over TLS.
    pub(crate) tls: Option<Box<TlsState>>,
    /// Bytes the client sent after its upgrade request (early WebSocket frames).
    pub(crate) read_ahead: Vec<u8>,
    pub(crate) upgrade: Upgrade,
    /// The session, resolved by the sending core (from the request or the first frames).
    pub(crate) session: SessionId,
    /// Whether the 101 answer was already sent (callers): `read_ahead` then holds WebSocket frames.
    pub(crate) upgraded: bool,
}
