//! Wire formats: bytes ⇄ typed values.
//!
//! Invariant: no clocks, no sockets, no session state; every parser is total (errors, not panics).

pub mod events;
pub mod frontend;
pub mod http;
pub mod http_client;
pub mod realtime;
pub mod retell;
pub mod twilio;
pub mod ws;
