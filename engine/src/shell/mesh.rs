//! Messages between cores and the task that receives them. Every request carries its reply
//! address (the sending core and a request number), as aquatic's meshes do.
//!
//! Invariant: nothing here awaits a full queue: senders use `try_send_to` and shed on full.

use std::os::fd::OwnedFd;
use std::rc::Rc;

use glommio::channels::shared_channel::ConnectedReceiver;

use super::core_task::CoreShared;

use super::tls::{Stream, TlsStream};
use super::{handoff, tcp, ws, ControlService, Upgrade};
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
    pub(crate) tls: Option<Box<super::tls::TlsState>>,
    /// Bytes the client sent after its upgrade request (early WebSocket frames).
    pub(crate) read_ahead: Vec<u8>,
    pub(crate) upgrade: Upgrade,
    /// The session, resolved by the sending core (from the request or the first frames).
    pub(crate) session: SessionId,
    /// Whether the 101 answer was already sent (callers): `read_ahead` then holds WebSocket frames.
    pub(crate) upgraded: bool,
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
                shared.reply_to_core(from, ReplyMessage { request, result });
            }
            CoreMessage::ListCalls { from, request, limit } => {
                let result = Ok(Reply::Calls(Box::new(shared.calls(limit))));
                shared.reply_to_core(from, ReplyMessage { request, result });
            }
            CoreMessage::Dropped => {}
            CoreMessage::Handoff(h) => {
                let h = *h;
                let tcp = handoff::adopt(h.fd);
                let mut stream = match h.tls {
                    Some(state) => Stream::Tls(Box::new(TlsStream::from_parts(tcp, *state))),
                    None => Stream::Plain(tcp),
                };
                if shared.connections.get() >= shared.limits.connections_per_core {
                    // A caller's socket was already answered 101: it gets a close frame, not HTTP.
                    let (service, upgraded, node) = (service.clone(), h.upgraded, shared.node_id.clone());
                    glommio::spawn_local(async move {
                        let message = "this relay core is at its connection limit";
                        tcp::refuse(&service, &mut stream, upgraded, message, &node).await;
                    })
                    .detach();
                    continue;
                }
                shared.connection_opened();
                let (s, svc) = (shared.clone(), service.clone());
                glommio::spawn_local(async move {
                    ws::socket_task(s.clone(), svc, stream, h.read_ahead, h.session, h.upgrade, h.upgraded).await;
                    s.connection_closed();
                })
                .detach();
            }
        }
        // One message per turn: a flood from another core cannot starve this core's own tasks.
        glommio::yield_if_needed().await;
    }
}

/// Receives replies from one peer core and completes the waiting requests.
pub(crate) async fn reply_task(shared: Rc<CoreShared>, receiver: ConnectedReceiver<ReplyMessage>) {
    while let Some(ReplyMessage { request, result }) = receiver.recv().await {
        shared.complete(request, result);
        glommio::yield_if_needed().await;
    }
}
