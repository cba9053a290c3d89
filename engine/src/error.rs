//! The engine's error types, gathered in one place (each is defined beside the code that returns it).

pub use crate::core::command::CommandError;
pub use crate::core::AttachError;
pub use crate::id::IdError;
pub use crate::proto::events::ClientMessageError;
pub use crate::proto::http::HeadError;
pub use crate::proto::ws::{HandshakeError, WsError};
