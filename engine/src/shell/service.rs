//! What the shell asks of the control plane: [`ControlService`], the request it is given and the
//! [`Outcome`] it returns.
//!
//! Invariant: types only; the shell's tasks call the service, the service calls back only
//! through the [`CoreHandle`] it is given.

use std::future::Future;
use std::net::SocketAddr;

use bytes::Bytes;
use http::StatusCode;

use super::shared::CoreHandle;
use super::upgrade::Upgrade;
use crate::proto::http::RequestHead;

/// The control plane, as the shell sees it: turns a request into a response, or into an event
/// socket for a session. One clone runs on every core.
pub trait ControlService: Clone + Send + 'static {
    /// Handles a request on the core that read it. Session commands go through `core`.
    fn handle(&self, core: &CoreHandle, request: Request) -> impl Future<Output = Outcome>;

    /// A final answer known from the head alone (no such route, no credentials), sent instead of
    /// `100 Continue` to a client waiting to send its body; the connection then closes. `None`
    /// (the default) lets the body come.
    fn early_response(&self, head: &RequestHead) -> Option<http::Response<Bytes>> {
        let _ = head;
        None
    }

    /// The response for an error the shell found itself (limits, malformed heads, busy cores).
    /// `request` holds the request's headers as far as they are known (empty when the head could
    /// not be read), so that the answer can carry what they call for, such as CORS headers.
    fn error_response(&self, status: StatusCode, message: &str, request: &http::HeaderMap) -> http::Response<Bytes>;
}

/// A whole request: head and body.
#[derive(Debug)]
pub struct Request {
    /// The parsed head.
    pub head: RequestHead,
    /// The body (`Content-Length` bytes).
    pub body: Bytes,
    /// The client's address.
    pub peer: SocketAddr,
}

/// What to do with a request.
#[derive(Debug)]
pub enum Outcome {
    /// Send this response.
    Respond(http::Response<Bytes>),
    /// Switch to WebSocket, on the session's owner core.
    Upgrade(Upgrade),
}
