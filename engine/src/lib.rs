//! # relay-engine
//!
//! The data plane of Relay, a thread-per-core media relay for voice-AI calls.
//!
//! ## What it is
//!
//! * **Sans-IO cores** ([`proto`], [`session`], [`core`], [`media`]): protocol parsers and state
//!   machines that take bytes and time as input and return effects as values. They never touch a
//!   socket, a thread or the clock, so every behaviour can be replayed in a test.
//! * **The shell** (`shell`, feature `runtime`): one glommio executor pinned per core, each
//!   accepting on the same port (SO_REUSEPORT), a channel mesh between cores, and the tasks that
//!   move bytes between sockets and the sans-IO cores.
//!
//! ## What it never does
//!
//! * Share a session between cores: session `id` lives on `core_for(id, cores)`
//!   ([`id::core_for`], FNV-1a 64 modulo the core count). Other cores reach it only by message.
//! * Block or lock on the media path, or await a full queue: queues are bounded and shed.
//! * Panic on input: bad input is an error value that costs only its sender.
//!
//! ## The drive contract
//!
//! For [`core::CoreState`] (and every sans-IO machine in this crate):
//!
//! 1. Feed one input with a `handle_*` method, passing the current [`time::Now`].
//! 2. Drain `poll_output` until it returns `None`, carrying out each output in order.
//! 3. Ask `poll_timeout` when to call `handle_timeout` next, then wait for that or the next input.
//!
//! ## Time model
//!
//! Wall time is read once per input, in the shell's clock module, and passed in as a
//! [`time::Now`] (a monotonic instant for deadlines, Unix milliseconds for timestamps).
//! Measurement is the one exception: a core times its codec calls through the
//! [`session::media::CodecTimer`] the shell gives it ([`core::CoreState::with_codec_timer`]), whose
//! clock is the shell's; no behaviour depends on what it measures, and without one nothing is timed.
//!
//! ## Errors and panics
//!
//! Input errors are typed (`thiserror`) and answered with the protocol's own signal: an HTTP
//! status, a WebSocket close code. A panic is a bug: the shell calls into a session through
//! `catch_unwind` and drops that session alone; the core and its other sessions go on.
//!
//! ## Example
//!
//! ```no_run
//! # #[cfg(feature = "runtime")]
//! # fn main() {
//! use relay_engine::config::{EngineConfig, Limits};
//! use relay_engine::shell::{self, ControlService, CoreHandle, Outcome, Request};
//!
//! #[derive(Clone)]
//! struct Hello;
//!
//! impl ControlService for Hello {
//!     async fn handle(&self, _core: &CoreHandle, _request: Request) -> Outcome {
//!         Outcome::Respond(http::Response::new(bytes::Bytes::from_static(b"hello")))
//!     }
//!     fn error_response(
//!         &self,
//!         status: http::StatusCode,
//!         message: &str,
//!         _request: &http::HeaderMap,
//!     ) -> http::Response<bytes::Bytes> {
//!         let mut r = http::Response::new(bytes::Bytes::from(message.to_owned()));
//!         *r.status_mut() = status;
//!         r
//!     }
//! }
//!
//! let config = EngineConfig {
//!     listen: "127.0.0.1:8080".parse().unwrap(),
//!     cores: 2,
//!     limits: Limits::default(),
//!     agents: Default::default(),
//!     stream_key: None,
//!     rtc: Some(Default::default()),
//!     tls: None,
//!     records: None,
//!     begin_sentence: String::new(),
//!     tools: Default::default(),
//!     node_id: "node-a".to_owned(),
//! };
//! let relay = shell::start(config, Hello).expect("relay starts");
//! relay.wait().expect("clean exit");
//! # }
//! # #[cfg(not(feature = "runtime"))]
//! # fn main() {}
//! ```

#![forbid(unsafe_op_in_unsafe_fn)]

pub mod config;
pub mod core;
pub mod error;
pub mod id;
pub mod media;
pub mod proto;
pub mod rtc;
pub mod secret;
pub mod session;
pub mod time;

#[cfg(feature = "runtime")]
pub mod shell;
