//! The daemon's clock: the wall clock, optionally shifted by a fixed offset for tests.
//!
//! Owns the one source of "now" for everything whose behaviour depends on the calendar: `received_at` stamps,
//! log file names, time rotation and checkpoint times. In production it is exactly `SystemTime::now()`.
//!
//! Testing aid: `TRAIL_TEST_CLOCK_OFFSET=<seconds>` (signed, fractions allowed), read once, shifts the clock so that
//! a test can put the daemon a moment before UTC midnight and watch it rotate without waiting a day. The daemon
//! logs a warning when it is set; it has no other use.

use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

/// The environment variable that shifts the clock (a testing aid).
pub const OFFSET_VAR: &str = "TRAIL_TEST_CLOCK_OFFSET";

/// The offset in nanoseconds, read from the environment once.
fn offset() -> i128 {
    static OFFSET: OnceLock<i128> = OnceLock::new();
    *OFFSET.get_or_init(|| {
        std::env::var(OFFSET_VAR)
            .ok()
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map(|s| (s * 1e9) as i128)
            .unwrap_or(0)
    })
}

/// Whether the clock is shifted (a test set [`OFFSET_VAR`]).
pub fn is_shifted() -> bool {
    offset() != 0
}

/// The current time on the daemon's clock.
pub fn now() -> SystemTime {
    let real = SystemTime::now();
    match offset() {
        0 => real,
        n if n > 0 => real + Duration::from_nanos(n as u64),
        n => real - Duration::from_nanos((-n) as u64),
    }
}

/// Seconds since the Unix epoch of `t` (0 before the epoch).
pub fn unix_secs(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
