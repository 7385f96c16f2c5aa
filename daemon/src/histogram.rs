//! Histograms for hot paths: fixed buckets of atomic counters, recorded without a lock or an allocation, read at
//! scrape time by [`crate::metrics`] and by `trail status`.
//!
//! Owns only counting: it imports nothing else of the daemon, so the journal writer and the connections can record
//! into it while `metrics`, which reads their typed reports, sits above them. Values are whole numbers in the
//! histogram's own unit (nanoseconds, events), so the sum is an atomic add too; [`Histogram::scale`] turns them into
//! the exposed unit (seconds). One [`Histogram::observe_n`] records a figure shared by many events (a group's or a
//! read's) at once, so a group of a thousand events costs two atomic adds, not two thousand.

use std::sync::atomic::{AtomicU64, Ordering};

/// Upper bounds of latency buckets, in nanoseconds: 10 µs to 10 s in a 1-2.5-5 series.
pub const LATENCY_NS: &[u64] = &[
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// Upper bounds of group-size buckets, in events: powers of two up to 65536.
pub const GROUP_EVENTS: &[u64] = &[
    1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536,
];

/// A histogram over fixed upper bounds (and +Inf), in whole units.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [u64],
    /// One more than `bounds`: the last counts values above every bound.
    counts: Box<[AtomicU64]>,
    sum: AtomicU64,
    /// What one unit is in the exposed unit (1e-9 for nanoseconds exposed as seconds).
    scale: f64,
}

/// What a histogram held at one moment; differences of two give what was recorded between them.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// Count per bucket (not cumulative), the last one above every bound.
    pub counts: Vec<u64>,
    /// Sum of the values, in whole units.
    pub sum: u64,
}

impl Histogram {
    /// An empty histogram over `bounds` (ascending), whose unit is `scale` of the exposed unit.
    pub fn new(bounds: &'static [u64], scale: f64) -> Histogram {
        debug_assert!(bounds.windows(2).all(|w| w[0] < w[1]));
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
            scale,
        }
    }

    /// A latency histogram in nanoseconds, exposed in seconds.
    pub fn latency() -> Histogram {
        Histogram::new(LATENCY_NS, 1e-9)
    }

    /// Records `value` once.
    pub fn observe(&self, value: u64) {
        self.observe_n(value, 1);
    }

    /// Records `value` for `n` events at once (two atomic adds whatever `n` is).
    pub fn observe_n(&self, value: u64, n: u64) {
        if n == 0 {
            return;
        }
        let bucket = self.bounds.partition_point(|&b| b < value);
        self.counts[bucket].fetch_add(n, Ordering::Relaxed);
        self.sum
            .fetch_add(value.saturating_mul(n), Ordering::Relaxed);
    }

    /// Records a duration (for a histogram in nanoseconds).
    pub fn observe_duration(&self, elapsed: std::time::Duration, n: u64) {
        self.observe_n(u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX), n);
    }

    /// The upper bounds, in whole units.
    pub fn bounds(&self) -> &'static [u64] {
        self.bounds
    }

    /// What one unit is in the exposed unit.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// The counts and the sum now (the counts are read one by one: a value recorded meanwhile may be in the sum
    /// and not yet in a count, which scrapes tolerate).
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            counts: self
                .counts
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .collect(),
            sum: self.sum.load(Ordering::Relaxed),
        }
    }
}

impl Snapshot {
    /// Values recorded.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// What was recorded after `earlier` (a snapshot of the same histogram).
    pub fn since(&self, earlier: &Snapshot) -> Snapshot {
        Snapshot {
            counts: self
                .counts
                .iter()
                .zip(&earlier.counts)
                .map(|(now, then)| now.saturating_sub(*then))
                .collect(),
            sum: self.sum.saturating_sub(earlier.sum),
        }
    }

    /// The `q` quantile (0..=1) in whole units, estimated as Prometheus's `histogram_quantile` does: linear
    /// interpolation inside the bucket that holds it (the lowest bucket from zero; in the +Inf bucket, the
    /// highest bound). `None` when nothing was recorded.
    pub fn quantile(&self, bounds: &[u64], q: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * total as f64;
        let mut below = 0u64;
        for (i, &n) in self.counts.iter().enumerate() {
            if n > 0 && (below + n) as f64 >= rank {
                let Some(&upper) = bounds.get(i) else {
                    return bounds.last().map(|&b| b as f64);
                };
                let lower = if i == 0 { 0 } else { bounds[i - 1] };
                let within = (rank - below as f64) / n as f64;
                return Some(lower as f64 + (upper - lower) as f64 * within);
            }
            below += n;
        }
        bounds.last().map(|&b| b as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_counts_and_quantiles() {
        let h = Histogram::new(&[10, 20, 40], 1.0);
        let check = |value: u64, n: u64, bucket: usize| {
            let before = h.snapshot();
            h.observe_n(value, n);
            let added = h.snapshot().since(&before);
            assert_eq!(added.counts[bucket], n, "{value} x{n}");
            assert_eq!(added.sum, value * n);
        };
        check(0, 1, 0);
        check(10, 3, 0);
        check(11, 1, 1);
        check(40, 2, 2);
        check(41, 1, 3);
        check(5, 0, 0);
        let s = h.snapshot();
        assert_eq!(s.counts, vec![4, 1, 2, 1]);
        assert_eq!(s.count(), 8);
        // Half of 8 = 4: all in the first bucket, whose top is 10.
        assert_eq!(s.quantile(h.bounds(), 0.5), Some(10.0));
        // 0.99 of 8 = 7.92: in the +Inf bucket, reported as the highest bound.
        assert_eq!(s.quantile(h.bounds(), 0.99), Some(40.0));
        // 0.25 of 8 = 2: half-way into the first bucket.
        assert_eq!(s.quantile(h.bounds(), 0.25), Some(5.0));
        assert_eq!(h.snapshot().since(&s).quantile(h.bounds(), 0.5), None);
    }
}
