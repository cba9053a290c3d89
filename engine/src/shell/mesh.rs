//! The tasks that receive messages from other cores (see `message.rs`): commands run here and
//! answered, connections handed over and served, replies matched to their requests.
//!
//! Invariant: nothing here awaits a full queue: senders use `try_send_to` and shed on full.

use std::rc::Rc;

use glommio::channels::shared_channel::ConnectedReceiver;

use super::message::{CoreMessage, ReplyMessage};
use super::service::ControlService;
use super::shared::CoreShared;
use super::tls::{Stream, TlsStream};
use super::{handoff, socket, ws};
use crate::core::command::Reply;

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
                        socket::refuse(&service, &mut stream, upgraded, message, &node).await;
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
