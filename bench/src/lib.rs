//! # relay-bench
//!
//! Load generators and measurement for Relay. Each scenario runs against a relay it starts
//! itself (`--spawn <binary>`) or any server speaking the same API (`--url`), and prints a table
//! plus a JSON file, so the same run can measure Relay and a baseline side by side.
//!
//! Scenarios so far: `control` (session start/stop throughput and latency over keep-alive HTTP)
//! and `telephony` (per-frame latency of Twilio-protocol calls through the relay to a bot and back).
//! `webrtc` measures transcoded calls: a Twilio-protocol caller and a WebRTC agent (str0m, Opus)
//! per call, one-way latency each way from tone bursts found in the decoded audio.
//! `codec` measures the CPU cost and quality of the media building blocks (μ-law, Opus settings,
//! resamplers) per 20 ms frame, single-threaded.
//! The telephony load comes from one event-loop thread driving every socket (`--threads`: the
//! original thread-per-socket generator, kept to compare against). With `--netns` a spawned server
//! runs in a network namespace of its own, reached over a veth pair ([`netns`]).
//! [`floor`] is the yardstick `compare` measures Relay against: the least a relay of this
//! protocol can do (one thread, epoll, hand-written WebSocket framing).

pub mod client;
pub mod codec;
pub mod floor;
pub mod netns;
pub mod plot;
pub mod sampler;
pub mod stats;
pub mod target;
pub mod telephony;
pub mod webrtc;
