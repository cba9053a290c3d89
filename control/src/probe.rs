//! The data-directory health probe, run on a background thread so `/health/detailed` never does
//! file I/O on a core.
//!
//! Invariant: cores only read two atomics; the probe thread is the only writer and only touches
//! a file name of its own.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often the data directory is checked.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// The last probe's result.
#[derive(Debug, Default)]
pub struct DataDirHealth {
    up: AtomicBool,
    latency_ms: AtomicU64,
}

impl DataDirHealth {
    /// Whether the last probe could write and remove a file, and how long it took (ms).
    pub fn read(&self) -> (bool, u64) {
        (self.up.load(Ordering::Relaxed), self.latency_ms.load(Ordering::Relaxed))
    }

    fn probe(&self, dir: &std::path::Path) {
        let start = Instant::now();
        let file = dir.join(format!(".health-probe-{}", std::process::id()));
        let up = std::fs::write(&file, b"ok").is_ok() && std::fs::remove_file(&file).is_ok();
        self.latency_ms.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
        self.up.store(up, Ordering::Relaxed);
    }
}

/// Probes `dir` once now, then every [`INTERVAL`] on a background thread, for the process's life.
///
/// # Errors
/// When the thread cannot be started.
pub fn start(dir: PathBuf) -> std::io::Result<Arc<DataDirHealth>> {
    let health = Arc::new(DataDirHealth::default());
    health.probe(&dir);
    let h = health.clone();
    std::thread::Builder::new().name("data-dir-probe".into()).spawn(move || loop {
        std::thread::sleep(INTERVAL);
        h.probe(&dir);
    })?;
    Ok(health)
}
