//! Latency summaries from raw samples (exact percentiles over every sample).
//!
//! Invariant: percentiles are computed over all samples, never sampled or averaged.

use std::time::Duration;

use serde_json::{json, Value};

/// Percentiles of one operation's latencies.
#[derive(Debug, Clone)]
pub struct Summary {
    /// Samples.
    pub count: usize,
    /// Median, µs.
    pub p50_us: f64,
    /// 90th percentile, µs.
    pub p90_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// 99.9th percentile, µs.
    pub p999_us: f64,
    /// Largest sample, µs.
    pub max_us: f64,
}

impl Summary {
    /// Summarises `samples` (sorted in place).
    pub fn of(samples: &mut [Duration]) -> Self {
        samples.sort_unstable();
        let at = |q: f64| -> f64 {
            if samples.is_empty() {
                return 0.0;
            }
            let i = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
            samples[i].as_nanos() as f64 / 1e3
        };
        Self {
            count: samples.len(),
            p50_us: at(0.5),
            p90_us: at(0.9),
            p99_us: at(0.99),
            p999_us: at(0.999),
            max_us: at(1.0),
        }
    }

    /// As JSON.
    pub fn to_json(&self) -> Value {
        json!({ "count": self.count, "p50_us": self.p50_us, "p90_us": self.p90_us, "p99_us": self.p99_us,
                "p999_us": self.p999_us, "max_us": self.max_us })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Percentiles pick the nearest-rank sample.
    #[test]
    fn nearest_rank() {
        let mut s: Vec<Duration> = (1..=1000).map(Duration::from_micros).collect();
        let x = Summary::of(&mut s);
        assert_eq!((x.count, x.p50_us, x.p99_us, x.p999_us, x.max_us), (1000, 500.0, 990.0, 999.0, 1000.0));
        assert_eq!(Summary::of(&mut []).count, 0);
    }
}
