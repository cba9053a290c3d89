//! Per-user limits of seed 004: concurrent frontend sockets and call initiations per minute.
//! With a shared records database ([`share`]) they are counted there, so they hold across every
//! node of a cluster; while it cannot be reached, each node falls back to its own counts.
//!
//! Invariant: touched only when a socket opens or closes or a call is initiated, never on the
//! media path; database work runs on the blocking pool or the limits thread, never on a core; the
//! maps are bounded by pruning entries that hold nothing.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use relay_engine::shell::CoreHandle;

use crate::records::postgres::Pool;

/// Call initiations a user may make per minute (seed 004).
pub const INITIATIONS_PER_MINUTE: usize = 5;
/// A node's socket places in the shared database count for this long after its last renewal:
/// the places of a node that died (`kill -9`) free themselves within it.
pub const LEASE: Duration = Duration::from_secs(30);
/// How often the limits thread renews this node's leases (and removes places it gave back).
const SWEEP_INTERVAL: Duration = Duration::from_secs(10);
/// The initiation window.
const WINDOW: Duration = Duration::from_secs(60);
/// Distinct user ids tracked before idle entries are pruned.
const PRUNE_ABOVE: usize = 10_000;

/// The process-wide per-user counters.
#[derive(Debug)]
pub struct UserLimits {
    sockets_per_user: usize,
    initiations_per_minute: usize,
    sockets: Mutex<HashMap<String, usize>>,
    initiations: Mutex<HashMap<String, VecDeque<Instant>>>,
    /// The cluster's counts, once [`share`] has been called.
    shared: OnceLock<Shared>,
}

/// What counting in the shared database needs.
struct Shared {
    pool: Arc<Pool>,
    node: String,
    /// This process's name on its rows (node, pid, start time): two relays given the same node
    /// name never renew or remove each other's places.
    instance: String,
    /// This process's socket places held in the database, by socket id: the limits thread renews
    /// their leases and removes every other row of this process.
    live: Mutex<HashSet<u64>>,
    next_socket: AtomicU64,
    /// Wakes the limits thread when a place is given back (full: it is awake anyway).
    nudge: SyncSender<()>,
    /// Whether the last database count failed (so the fallback is logged once per outage).
    falling_back: AtomicBool,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("node", &self.node).finish_non_exhaustive()
    }
}

/// Holds one of a user's socket places; dropping it gives the place back.
#[derive(Debug)]
pub struct SocketGuard {
    limits: Arc<UserLimits>,
    place: Place,
}

/// Where a socket place is counted.
#[derive(Debug)]
enum Place {
    /// In this process, for this user.
    Local(String),
    /// In the shared database, as this node's socket of this id.
    Shared(u64),
}

/// A recorded initiation, the handle for a refund.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Initiation {
    /// Counted in this process, at this instant.
    Local(Instant),
    /// Counted in the shared database, as this row.
    Shared(i64),
}

/// Counts `limits` in the shared database of `pool` from now on, as node `node`, and starts the
/// thread that keeps this node's socket places there current (renewed leases, returned places
/// removed). What an earlier life of the node left is removed at start (`postgres::prepare`).
///
/// # Errors
/// When the thread cannot be started.
pub fn share(limits: &Arc<UserLimits>, pool: Arc<Pool>, node: String) -> std::io::Result<()> {
    let (nudge, rx) = mpsc::sync_channel(1);
    let started = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let instance = format!("{node}:{}:{}", std::process::id(), started.as_nanos());
    let shared = Shared {
        pool,
        node,
        instance,
        live: Mutex::new(HashSet::new()),
        next_socket: AtomicU64::new(1),
        nudge,
        falling_back: AtomicBool::new(false),
    };
    if limits.shared.set(shared).is_err() {
        return Ok(());
    }
    let limits = limits.clone();
    std::thread::Builder::new().name("user-limits".into()).spawn(move || {
        let shared = limits.shared.get().expect("set above");
        loop {
            let live: Vec<u64> = shared.live.lock().unwrap_or_else(PoisonError::into_inner).iter().copied().collect();
            if let Err(e) = shared.pool.sweep(&shared.instance, &live, LEASE, WINDOW) {
                tracing::debug!("user limits: cannot renew this node's places: {e}");
            }
            match rx.recv_timeout(SWEEP_INTERVAL) {
                Ok(()) | Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    })?;
    Ok(())
}

/// Takes a socket place for `user`: in the shared database when there is one (on the blocking
/// pool), else, or while it cannot be reached, in this process. `None` when the user has all of
/// theirs.
pub async fn acquire_socket(core: &CoreHandle, limits: &Arc<UserLimits>, user: &str) -> Option<SocketGuard> {
    let Some(shared) = limits.shared.get() else { return limits.acquire_socket(user) };
    let id = shared.next_socket.fetch_add(1, Ordering::Relaxed);
    // Live before the row exists, so that a sweep in between does not remove the row.
    shared.live.lock().unwrap_or_else(PoisonError::into_inner).insert(id);
    let (pool, node, instance) = (shared.pool.clone(), shared.node.clone(), shared.instance.clone());
    let (user_owned, limit) = (user.to_owned(), limits.sockets_per_user);
    let taken = core.blocking(move || pool.acquire_socket(&user_owned, (&node, &instance), id, limit, LEASE)).await;
    match taken {
        Ok(true) => {
            shared.falling_back.store(false, Ordering::Relaxed);
            Some(SocketGuard { limits: limits.clone(), place: Place::Shared(id) })
        }
        Ok(false) => {
            shared.live.lock().unwrap_or_else(PoisonError::into_inner).remove(&id);
            None
        }
        Err(e) => {
            shared.live.lock().unwrap_or_else(PoisonError::into_inner).remove(&id);
            shared.fall_back(&e);
            limits.acquire_socket(user)
        }
    }
}

/// Records an initiation for `user` (in the shared database when there is one, else, or while it
/// cannot be reached, in this process), or says how long until one is allowed again.
///
/// # Errors
/// The time until the oldest initiation in the last minute expires.
pub async fn try_initiate(core: &CoreHandle, limits: &Arc<UserLimits>, user: &str) -> Result<Initiation, Duration> {
    let Some(shared) = limits.shared.get() else {
        return limits.try_initiate(user, Instant::now()).map(Initiation::Local);
    };
    let (pool, user_owned, limit) = (shared.pool.clone(), user.to_owned(), limits.initiations_per_minute);
    match core.blocking(move || pool.try_initiate(&user_owned, limit, WINDOW)).await {
        Ok(answer) => {
            shared.falling_back.store(false, Ordering::Relaxed);
            answer.map(Initiation::Shared)
        }
        Err(e) => {
            shared.fall_back(&e);
            limits.try_initiate(user, Instant::now()).map(Initiation::Local)
        }
    }
}

/// Gives back `initiation` of `user` (Twilio refused the call).
pub async fn refund(core: &CoreHandle, limits: &Arc<UserLimits>, user: &str, initiation: Initiation) {
    match (initiation, limits.shared.get()) {
        (Initiation::Local(at), _) => limits.refund(user, at),
        (Initiation::Shared(id), Some(shared)) => {
            let pool = shared.pool.clone();
            if let Err(e) = core.blocking(move || pool.refund(id)).await {
                // The row ages out of the window within a minute anyway.
                tracing::debug!("user limits: cannot refund an initiation: {e}");
            }
        }
        (Initiation::Shared(_), None) => {}
    }
}

impl Shared {
    fn fall_back(&self, e: &crate::records::Error) {
        if !self.falling_back.swap(true, Ordering::Relaxed) {
            tracing::warn!("user limits: the shared database cannot be reached, counting on this node only: {e}");
        }
    }
}

impl UserLimits {
    /// Limits of `sockets_per_user` concurrent sockets and `initiations_per_minute` initiations.
    pub fn new(sockets_per_user: usize, initiations_per_minute: usize) -> Arc<Self> {
        Arc::new(Self {
            sockets_per_user,
            initiations_per_minute,
            sockets: Mutex::new(HashMap::new()),
            initiations: Mutex::new(HashMap::new()),
            shared: OnceLock::new(),
        })
    }

    /// Takes a socket place for `user`, or `None` when the user has all of theirs.
    pub fn acquire_socket(self: &Arc<Self>, user: &str) -> Option<SocketGuard> {
        // A poisoned lock only means another thread panicked mid-update of a counter; the counts
        // are still integers, so go on with them.
        let mut sockets = self.sockets.lock().unwrap_or_else(PoisonError::into_inner);
        let count = sockets.entry(user.to_owned()).or_insert(0);
        if *count >= self.sockets_per_user {
            return None;
        }
        *count += 1;
        Some(SocketGuard { limits: self.clone(), place: Place::Local(user.to_owned()) })
    }

    /// Gives back the initiation recorded at `at` for `user` (Twilio refused the call).
    pub fn refund(&self, user: &str, at: Instant) {
        let mut all = self.initiations.lock().unwrap_or_else(PoisonError::into_inner);
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
        let mut all = self.initiations.lock().unwrap_or_else(PoisonError::into_inner);
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
        match &self.place {
            Place::Local(user) => {
                let mut sockets = self.limits.sockets.lock().unwrap_or_else(PoisonError::into_inner);
                if let Some(count) = sockets.get_mut(user) {
                    *count -= 1;
                    if *count == 0 {
                        sockets.remove(user);
                    }
                }
            }
            Place::Shared(id) => {
                // Runs on a core: no database here. The limits thread removes the row.
                if let Some(shared) = self.limits.shared.get() {
                    shared.live.lock().unwrap_or_else(PoisonError::into_inner).remove(id);
                    let _ = shared.nudge.try_send(());
                }
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
