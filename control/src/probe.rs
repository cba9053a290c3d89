//! The data-directory and records-database health probe, run on a background thread so
//! `/health/detailed` never does file or database I/O on a core.
//!
//! Invariant: cores only read two atomics; the probe thread is the only writer and only touches
//! a file name of its own (and opens read transactions on the records database).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often the data directory is checked.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// How long one reachability check may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// An upstream the relay dials, checked by a TCP connect from the probe thread.
#[derive(Debug)]
pub struct Upstream {
    /// The service's name in `/health/detailed` (`openai`, `agent`, `llm`).
    pub name: &'static str,
    /// `host:port` to connect to.
    pub authority: String,
    /// 0 unknown, 1 reachable, 2 unreachable.
    state: std::sync::atomic::AtomicU8,
    latency_us: AtomicU64,
}

impl Upstream {
    /// An upstream named `name` at `authority` (`host:port`), not checked yet.
    pub fn new(name: &'static str, authority: String) -> Self {
        Self { name, authority, state: std::sync::atomic::AtomicU8::new(0), latency_us: AtomicU64::new(0) }
    }

    /// `up`, `down` or `unchecked` (not checked yet, or checks are off), and the last connect's
    /// latency in ms.
    pub fn status(&self) -> (&'static str, f64) {
        let status = match self.state.load(Ordering::Relaxed) {
            1 => "up",
            2 => "down",
            _ => "unchecked",
        };
        (status, self.latency_us.load(Ordering::Relaxed) as f64 / 1000.0)
    }

    fn check(&self) {
        use std::net::ToSocketAddrs;
        let start = Instant::now();
        let reachable = self
            .authority
            .to_socket_addrs()
            .ok()
            .and_then(|mut addrs| addrs.next())
            .is_some_and(|addr| std::net::TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).is_ok());
        self.latency_us.store(start.elapsed().as_micros() as u64, Ordering::Relaxed);
        self.state.store(if reachable { 1 } else { 2 }, Ordering::Relaxed);
    }
}

/// The last probe's result.
#[derive(Debug, Default)]
pub struct DataDirHealth {
    up: AtomicBool,
    latency_us: AtomicU64,
    /// Whether the records are in a shared database (`--records-url`): one that is down makes the
    /// relay degraded, not unhealthy (its records queue; its calls go on).
    shared: AtomicBool,
    /// Configured upstreams and their reachability.
    pub upstreams: Vec<Upstream>,
}

impl DataDirHealth {
    /// Whether the last probe could write and remove a file in the data directory, read the
    /// records database, and whether the records writer's last commit succeeded; and how long the
    /// database's read transaction took (ms, with microseconds; without a database, the file's
    /// write and removal).
    ///
    /// With a shared database, the data directory plays no part: only the database's answer and
    /// the writer's last commit count.
    pub fn read(&self) -> (bool, f64) {
        (self.up.load(Ordering::Relaxed), self.latency_us.load(Ordering::Relaxed) as f64 / 1000.0)
    }

    /// Whether the records are in a shared (PostgreSQL) database.
    pub fn shared(&self) -> bool {
        self.shared.load(Ordering::Relaxed)
    }

    fn probe(&self, dir: &std::path::Path, records: Option<&Records>) {
        let start = Instant::now();
        let shared = records.is_some_and(|(r, _)| r.shared().is_some());
        self.shared.store(shared, Ordering::Relaxed);
        let dir_up = shared || {
            let file = dir.join(format!(".health-probe-{}", std::process::id()));
            std::fs::write(&file, b"ok").is_ok() && std::fs::remove_file(&file).is_ok()
        };
        let (up, latency) = match records {
            Some((records, stats)) => match records.check() {
                Ok(latency) => (dir_up && !stats.failing.load(Ordering::Relaxed), latency),
                Err(e) => {
                    // Once per outage for the shared database (the writer logs it too).
                    if !shared || self.up.load(Ordering::Relaxed) {
                        tracing::warn!("records database check failed: {e}");
                    }
                    (false, start.elapsed())
                }
            },
            None => (dir_up, start.elapsed()),
        };
        self.latency_us.store(latency.as_micros() as u64, Ordering::Relaxed);
        self.up.store(up, Ordering::Relaxed);
    }
}

/// The records database to probe, and its writer's counters.
pub type Records = (crate::records::Records, Arc<crate::records::StoreStats>);

/// Probes `dir` (and the records database) once now, then every [`INTERVAL`] on a background
/// thread, for the process's life.
///
/// # Errors
/// When the thread cannot be started.
pub fn start(
    dir: PathBuf,
    records: Option<Records>,
    upstreams: Vec<Upstream>,
    upstream_interval: Duration,
) -> std::io::Result<Arc<DataDirHealth>> {
    // A zero interval turns the reachability checks off (upstreams then report `unchecked`).
    let checking = !upstream_interval.is_zero();
    let health = Arc::new(DataDirHealth { upstreams, ..DataDirHealth::default() });
    health.probe(&dir, records.as_ref());
    let h = health.clone();
    std::thread::Builder::new().name("data-dir-probe".into()).spawn(move || {
        let mut last_upstream: Option<Instant> = None;
        loop {
            if checking && last_upstream.is_none_or(|t| t.elapsed() >= upstream_interval) {
                last_upstream = Some(Instant::now());
                for u in &h.upstreams {
                    u.check();
                }
            }
            std::thread::sleep(INTERVAL);
            h.probe(&dir, records.as_ref());
        }
    })?;
    Ok(health)
}
