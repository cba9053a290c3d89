//! Messages between cores and the task that receives them. Every request carries its reply
//! address (the sending core and a request number), as aquatic's meshes do.
//!
//! Invariant: nothing here awaits a full queue: senders use `try_send_to` and shed on full.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::rc::Rc;

use glommio::channels::shared_channel::ConnectedReceiver;

use super::core_task::CoreShared;
use super::{handoff, ws, ControlService, Observe};
use crate::core::command::{Command, CommandError, Reply};
use crate::id::{CoreId, SessionId};

/// A message from one core to another.
pub(crate) enum CoreMessage {
    /// Run `command` on `session` (owned by the receiver) and reply to `from`.
    Command { from: CoreId, request: u64, session: SessionId, command: Command },
    /// The answer to request `request`.
    Reply { request: u64, result: Result<Reply, CommandError> },
    /// A connection whose WebSocket upgrade belongs to a session the receiver owns.
    Handoff(Box<Handoff>),
    /// Stands in for a message the mesh lost in an unexpected send error.
    Dropped,
}

/// A connection moving to its session's core, with the bytes already read from it.
pub(crate) struct Handoff {
    pub(crate) fd: OwnedFd,
    pub(crate) peer: SocketAddr,
    /// Bytes the client sent after its upgrade request (early WebSocket frames).
    pub(crate) read_ahead: Vec<u8>,
    pub(crate) observe: Observe,
}

/// Receives messages from one peer core until the mesh closes.
pub(crate) async fn receive_task<S: ControlService>(
    shared: Rc<CoreShared>,
    service: Rc<S>,
    receiver: ConnectedReceiver<CoreMessage>,
) {
    while let Some(message) = receiver.recv().await {
        match message {
            CoreMessage::Command { from, request, session, command } => {
                let result = shared.command(&session, command);
                if shared.send_to_core(from, CoreMessage::Reply { request, result }).is_err() {
                    // The requester times out and answers 503; nothing waits on a full queue.
                    tracing::debug!(core = shared.id.0, to = from.0, "reply dropped: mesh queue full");
                }
            }
            CoreMessage::Reply { request, result } => shared.complete(request, result),
            CoreMessage::Dropped => {}
            CoreMessage::Handoff(h) => {
                let h = *h;
                let stream = handoff::adopt(h.fd);
                shared.connection_opened();
                let (s, svc) = (shared.clone(), service.clone());
                glommio::spawn_local(async move {
                    ws::observe_task(s.clone(), svc, stream, h.peer, h.read_ahead, h.observe).await;
                    s.connection_closed();
                })
                .detach();
            }
        }
    }
}
