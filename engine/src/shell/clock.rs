//! The one place the engine reads the system clock.
//!
//! Invariant: every other module receives time as a [`Now`] argument.

use std::cell::RefCell;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::time::Now;

/// The current time.
#[allow(clippy::disallowed_methods)] // The single sanctioned clock read (STYLE: time is an input).
pub(crate) fn now() -> Now {
    let unix_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    Now { instant: Instant::now(), unix_ms }
}

/// The monotonic clock alone (for measuring how long something took).
#[allow(clippy::disallowed_methods)] // The single sanctioned clock read (STYLE: time is an input).
pub(crate) fn instant() -> Instant {
    Instant::now()
}

thread_local! {
    /// The `Date` header value of the current second, rebuilt when the second changes.
    static DATE: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

/// Runs `f` with the current IMF-fixdate (`Sat, 21 Nov 2026 10:00:00 GMT`), formatted once a second.
pub(crate) fn with_http_date<R>(now: Now, f: impl FnOnce(&str) -> R) -> R {
    DATE.with(|d| {
        let mut d = d.borrow_mut();
        let secs = now.unix_ms / 1000;
        if d.0 != secs {
            *d = (secs, httpdate::fmt_http_date(UNIX_EPOCH + std::time::Duration::from_secs(secs)));
        }
        f(&d.1)
    })
}
