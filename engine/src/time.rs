//! The time value every sans-IO input carries.
//!
//! Invariant: nothing outside `shell::clock` creates a [`Now`] from the system clock.

use std::time::Instant;

/// "Now", passed into every `handle_*`: a monotonic instant for deadlines and the wall clock in
/// milliseconds since the Unix epoch for timestamps clients see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    /// Monotonic time, for timers and deadlines.
    pub instant: Instant,
    /// Wall-clock milliseconds since 1970-01-01T00:00:00Z, for event timestamps.
    pub unix_ms: u64,
}
