//! Per-user limits of seed 004: concurrent frontend sockets and call initiations per minute.
//!
//! Invariant: touched only when a socket opens or closes or a call is initiated, never on the
//! media path; the maps are bounded by pruning entries that hold nothing.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Distinct user ids tracked before idle entries are pruned.
const PRUNE_ABOVE: usize = 10_000;

/// The process-wide per-user counters.
#[derive(Debug)]
pub struct UserLimits {
    sockets_per_user: usize,
    initiations_per_minute: usize,
    sockets: Mutex<HashMap<String, usize>>,
    initiations: Mutex<HashMap<String, VecDeque<Instant>>>,
}

/// Holds one of a user's socket places; dropping it gives the place back.
#[derive(Debug)]
pub struct SocketGuard {
    limits: Arc<UserLimits>,
    user: String,
}

impl UserLimits {
    /// Limits of `sockets_per_user` concurrent sockets and `initiations_per_minute` initiations.
    pub fn new(sockets_per_user: usize, initiations_per_minute: usize) -> Arc<Self> {
        Arc::new(Self {
            sockets_per_user,
            initiations_per_minute,
            sockets: Mutex::new(HashMap::new()),
            initiations: Mutex::new(HashMap::new()),
        })
    }

    /// Takes a socket place for `user`, or `None` when the user has all of theirs.
    pub fn acquire_socket(self: &Arc<Self>, user: &str) -> Option<SocketGuard> {
        // A poisoned lock only means another thread panicked mid-update of a counter; the counts
        // are still integers, so go on with them.
        let mut sockets = self.sockets.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let count = sockets.entry(user.to_owned()).or_insert(0);
        if *count >= self.sockets_per_user {
            return None;
        }
        *count += 1;
        Some(SocketGuard { limits: self.clone(), user: user.to_owned() })
    }

    /// Gives back the initiation recorded at `at` for `user` (Twilio refused the call).
    pub fn refund(&self, user: &str, at: Instant) {
        let mut all = self.initiations.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(times) = all.get_mut(user) {
            if let Some(i) = times.iter().rposition(|t| *t == at) {
                times.remove(i);
            }
        }
    }

    /// Records an initiation for `user` at `now` (returning `now`, the handle for a refund), or says
    /// how long until one is allowed again.
    ///
    /// # Errors
    /// The time until the oldest initiation in the last minute expires.
    pub fn try_initiate(&self, user: &str, now: Instant) -> Result<Instant, Duration> {
        const WINDOW: Duration = Duration::from_secs(60);
        let mut all = self.initiations.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if all.len() > PRUNE_ABOVE {
            all.retain(|_, times| times.back().is_some_and(|t| now.saturating_duration_since(*t) < WINDOW));
        }
        let times = all.entry(user.to_owned()).or_default();
        while times.front().is_some_and(|t| now.saturating_duration_since(*t) >= WINDOW) {
            times.pop_front();
        }
        if times.len() >= self.initiations_per_minute {
            let oldest = *times.front().expect("at the limit, so not empty");
            return Err(WINDOW.saturating_sub(now.saturating_duration_since(oldest)));
        }
        times.push_back(now);
        Ok(now)
    }
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        let mut sockets = self.limits.sockets.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(count) = sockets.get_mut(&self.user) {
            *count -= 1;
            if *count == 0 {
                sockets.remove(&self.user);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three sockets per user; a dropped guard frees its place; users are independent.
    #[test]
    fn sockets() {
        let l = UserLimits::new(3, 5);
        let guards: Vec<_> = (0..3).map(|_| l.acquire_socket("u").expect("room")).collect();
        assert!(l.acquire_socket("u").is_none());
        assert!(l.acquire_socket("v").is_some());
        drop(guards);
        assert!(l.acquire_socket("u").is_some());
        assert!(l.sockets.lock().expect("lock").get("u").is_none(), "entries go when their last guard does");
    }

    /// Five initiations a minute per user, sliding.
    #[test]
    fn initiations() {
        let l = UserLimits::new(3, 5);
        let t0 = Instant::now();
        for i in 0..5 {
            l.try_initiate("u", t0 + Duration::from_secs(i)).expect("room");
        }
        let wait = l.try_initiate("u", t0 + Duration::from_secs(10)).unwrap_err();
        assert_eq!(wait, Duration::from_secs(50));
        l.try_initiate("v", t0).expect("other users are independent");
        l.try_initiate("u", t0 + Duration::from_secs(60)).expect("the oldest expired");
    }
}
