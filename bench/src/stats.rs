//! Latency statistics in an HdrHistogram (nanoseconds, 3 significant digits, up to 60 s): exact
//! counts, percentiles to p99.99, and the percentile curve for plots.
//!
//! Invariant: every sample recorded is counted (values past 60 s are clamped, not dropped).

use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::{json, Value};

/// Records latencies.
#[derive(Clone)]
pub struct Recorder {
    hist: Histogram<u64>,
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

impl Recorder {
    /// An empty recorder.
    pub fn new() -> Self {
        // 1 ns to 60 s at 3 significant digits: bounds are constants, so construction cannot fail.
        Self { hist: Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid constant bounds") }
    }

    /// Records one latency.
    pub fn record(&mut self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).clamp(1, 60_000_000_000);
        self.hist.saturating_record(ns);
    }

    /// Adds another recorder's samples.
    pub fn merge(&mut self, other: &Self) {
        // Same bounds on both sides, so adding cannot fail.
        let _ = self.hist.add(&other.hist);
    }

    /// The percentiles.
    pub fn summary(&self) -> Summary {
        let us = |q: f64| if self.hist.is_empty() { 0.0 } else { self.hist.value_at_quantile(q) as f64 / 1e3 };
        Summary {
            count: self.hist.len() as usize,
            p50_us: us(0.5),
            p90_us: us(0.9),
            p99_us: us(0.99),
            p999_us: us(0.999),
            p9999_us: us(0.9999),
            max_us: if self.hist.is_empty() { 0.0 } else { self.hist.max() as f64 / 1e3 },
        }
    }

    /// (quantile, µs) points of the percentile curve, for plotting.
    pub fn curve(&self) -> Vec<(f64, f64)> {
        if self.hist.is_empty() {
            return Vec::new();
        }
        let mut points = Vec::new();
        let mut q: f64 = 0.0;
        while q < 0.999_99 {
            points.push((q, self.hist.value_at_quantile(q) as f64 / 1e3));
            // Ten points per decade of 1/(1-q).
            q = 1.0 - (1.0 - q) / 10f64.powf(0.1);
        }
        points.push((1.0, self.hist.max() as f64 / 1e3));
        points
    }
}

/// Percentiles of one operation's latencies.
#[derive(Debug, Clone, Copy, Default)]
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
    /// 99.99th percentile, µs.
    pub p9999_us: f64,
    /// Largest sample, µs.
    pub max_us: f64,
}

impl Summary {
    /// Summarises `samples`.
    pub fn of(samples: &[Duration]) -> Self {
        let mut r = Recorder::new();
        for s in samples {
            r.record(*s);
        }
        r.summary()
    }

    /// As JSON.
    pub fn to_json(&self) -> Value {
        json!({ "count": self.count, "p50_us": self.p50_us, "p90_us": self.p90_us, "p99_us": self.p99_us,
                "p999_us": self.p999_us, "p9999_us": self.p9999_us, "max_us": self.max_us })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Percentiles come out within HdrHistogram's 0.1 % precision, and every sample is counted.
    #[test]
    fn percentiles() {
        let s: Vec<Duration> = (1..=1000).map(Duration::from_micros).collect();
        let x = Summary::of(&s);
        assert_eq!(x.count, 1000);
        for (got, want) in [(x.p50_us, 500.0), (x.p99_us, 990.0), (x.p999_us, 999.0), (x.max_us, 1000.0)] {
            assert!((got - want).abs() <= want * 0.001 + 0.001, "{got} vs {want}");
        }
        assert_eq!(Summary::of(&[]).count, 0);
        let mut r = Recorder::new();
        r.record(Duration::from_secs(3600));
        assert_eq!(r.summary().count, 1, "out-of-range values are clamped, not lost");
    }
}
