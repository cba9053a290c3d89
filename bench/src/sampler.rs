//! Samples a process's CPU time and resident memory from `/proc` while a scenario runs, so the
//! bench can report CPU per call (% of one core) and memory per call for the server under test,
//! and notice when the load generator itself is saturated. When the process is pinned, the CPU's
//! idle time (`/proc/stat`) is sampled too: wall time minus idle is everything the CPU did,
//! including the softirq time of loopback TCP, which the kernel charges to no process (with IRQ
//! time accounting), so it is the truer saturation mark.
//!
//! Invariant: read-only; sampling stops when the scenario ends (the thread is joined).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One reading of a process.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// When it was taken.
    pub at: Instant,
    /// User + system CPU time so far, seconds.
    pub cpu_seconds: f64,
    /// Resident set size, bytes.
    pub rss_bytes: u64,
    /// The watched CPU's counters, when one is watched.
    pub cpu: Option<CpuTicks>,
}

/// One CPU's idle and stolen time so far, from `/proc/stat`, in clock ticks.
///
/// Only these two are used: with a tickless kernel they are measured at every idle entry and exit,
/// while user/system/softirq are sampled at ticks, which a CPU busy in short bursts (a generator
/// at low load) dodges — on the test guest they read a third of the true busy time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuTicks {
    /// idle + iowait (a CPU waiting for I/O is idle too).
    pub idle: u64,
    /// Time the hypervisor ran something else: neither busy nor available.
    pub steal: u64,
}

/// Reads `cpu`'s counters now (`None` if it does not exist).
pub fn cpu_ticks(cpu: usize) -> Option<CpuTicks> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    parse_cpu_line(&stat, cpu)
}

fn parse_cpu_line(stat: &str, cpu: usize) -> Option<CpuTicks> {
    let name = format!("cpu{cpu}");
    let line = stat.lines().find(|l| l.split_whitespace().next() == Some(name.as_str()))?;
    let f: Vec<u64> = line.split_whitespace().skip(1).map_while(|v| v.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal …
    let at = |i: usize| f.get(i).copied().unwrap_or(0);
    Some(CpuTicks { idle: at(3) + at(4), steal: at(7) })
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions; _SC_CLK_TCK is a valid name.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64
}

/// Reads `pid`'s CPU time and RSS now (`None` if the process is gone).
pub fn sample(pid: u32) -> Option<Sample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the name.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let hz = clock_ticks_per_second();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    Some(Sample { at: Instant::now(), cpu_seconds: ticks as f64 / hz, rss_bytes: rss_kib * 1024, cpu: None })
}

/// A background sampler of one process.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<Sample>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    /// Samples `pid` (and `cpu`, when given) every `every` until [`Sampler::finish`].
    pub fn start(pid: u32, cpu: Option<usize>, every: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let (s, out) = (stop.clone(), samples.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Some(mut x) = sample(pid) {
                    x.cpu = cpu.and_then(cpu_ticks);
                    out.lock().expect("no panics hold the lock").push(x);
                }
                std::thread::sleep(every);
            }
        });
        Self { stop, samples, thread: Some(thread) }
    }

    /// Stops sampling and returns every sample taken.
    pub fn finish(mut self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        std::mem::take(&mut *self.samples.lock().expect("no panics hold the lock"))
    }
}

/// Usage over a window `[from, to]` of samples.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    /// CPU used over the window, as a fraction of one core (1.0 = one core busy).
    pub cores: f64,
    /// Mean RSS over the window, bytes.
    pub rss_mean_bytes: u64,
    /// Largest RSS in the window, bytes.
    pub rss_max_bytes: u64,
    /// RSS at the window's first and last samples, bytes (a soak's memory is flat when they match).
    pub rss_first_last: (u64, u64),
    /// Samples in the window.
    pub samples: usize,
    /// Busy fraction of the watched CPU over the window (everything on it, softirq included).
    pub cpu_busy: Option<f64>,
}

/// CPU and memory over the samples taken between `from` and `to`.
pub fn usage(samples: &[Sample], from: Instant, to: Instant) -> Usage {
    let window: Vec<&Sample> = samples.iter().filter(|s| s.at >= from && s.at <= to).collect();
    let (Some(first), Some(last)) = (window.first(), window.last()) else { return Usage::default() };
    let wall = last.at.saturating_duration_since(first.at).as_secs_f64();
    let cores = if wall > 0.0 { (last.cpu_seconds - first.cpu_seconds) / wall } else { 0.0 };
    let rss_mean_bytes = window.iter().map(|s| s.rss_bytes).sum::<u64>() / window.len() as u64;
    let rss_max_bytes = window.iter().map(|s| s.rss_bytes).max().unwrap_or(0);
    let cpu_busy = match (first.cpu, last.cpu) {
        (Some(a), Some(b)) if wall > 0.0 => {
            let hz = clock_ticks_per_second();
            let available = wall - b.steal.saturating_sub(a.steal) as f64 / hz;
            let idle = b.idle.saturating_sub(a.idle) as f64 / hz;
            (available > 0.0).then(|| (1.0 - idle / available).clamp(0.0, 1.0))
        }
        _ => None,
    };
    let rss_first_last = (first.rss_bytes, last.rss_bytes);
    Usage { cores, rss_mean_bytes, rss_max_bytes, rss_first_last, samples: window.len(), cpu_busy }
}

/// Pins the calling thread (and threads it creates later) to `cpu`.
///
/// # Errors
/// When the CPU does not exist or is not allowed.
pub fn pin_current_thread(cpu: usize) -> std::io::Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_SET writes inside the set; sched_setaffinity reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bench can read its own process: CPU grows with work, RSS is non-zero.
    #[test]
    fn samples_self() {
        let pid = std::process::id();
        let a = sample(pid).expect("own /proc");
        let mut x = 0u64;
        let until = Instant::now() + Duration::from_millis(50);
        while Instant::now() < until {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        let b = sample(pid).expect("own /proc");
        assert!(b.cpu_seconds >= a.cpu_seconds);
        assert!(b.rss_bytes > 0);
        let u = usage(&[a, b], a.at, b.at);
        assert_eq!(u.samples, 2);
        assert_eq!(u.cpu_busy, None, "no CPU watched");
    }

    /// A `/proc/stat` CPU line gives idle (iowait included) and steal; the busy fraction is the
    /// rest of the available wall time.
    #[test]
    fn cpu_line() {
        let stat = "cpu  9 9 9 9 9 9 9 9 0 0\ncpu0 10 1 20 300 4 5 6 7 0 0\ncpu1 1 0 1 1 0 0 0 0 0 0\n";
        assert_eq!(parse_cpu_line(stat, 0), Some(CpuTicks { idle: 304, steal: 7 }));
        assert_eq!(parse_cpu_line(stat, 1), Some(CpuTicks { idle: 1, steal: 0 }));
        assert_eq!(parse_cpu_line(stat, 2), None);
        assert!(cpu_ticks(0).is_some(), "this machine has a CPU 0");
        let hz = clock_ticks_per_second();
        let at = Instant::now();
        let a = Sample { at, cpu_seconds: 0.0, rss_bytes: 1, cpu: Some(CpuTicks { idle: 0, steal: 0 }) };
        // Over 2 s: a quarter second stolen, 0.7 s idle → 1 - 0.7 / 1.75 = 60 % busy.
        let idle = (0.7 * hz) as u64;
        let steal = (0.25 * hz) as u64;
        let b = Sample { at: at + Duration::from_secs(2), cpu: Some(CpuTicks { idle, steal }), ..a };
        let busy = usage(&[a, b], a.at, b.at).cpu_busy.expect("watched");
        let want = 1.0 - (idle as f64 / hz) / (2.0 - steal as f64 / hz);
        assert!((busy - want).abs() < 1e-9, "{busy} vs {want}");
    }
}
