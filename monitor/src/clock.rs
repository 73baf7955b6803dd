//! The two clocks: the kernel stamps every record with CLOCK_MONOTONIC
//! (`bpf_ktime_get_ns()`), while people and Prometheus read wall-clock time.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns()`.
pub fn monotonic_ns() -> u64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `now` is a valid timespec to write; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

/// Seconds since the Unix epoch, now (0 if the clock is before 1970).
pub fn unix_seconds() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Converts the kernel's CLOCK_MONOTONIC timestamps to wall-clock time.
#[derive(Clone, Copy, Debug)]
pub struct WallClock {
    /// Unix-epoch ns minus monotonic ns, measured once.
    offset_ns: i128,
}

impl WallClock {
    /// Measures the offset between the two clocks now (suspend and NTP steps move it: take
    /// a new one now and then).
    pub fn now() -> Self {
        let mono_ns = i128::from(monotonic_ns());
        let wall_ns =
            SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i128).unwrap_or(0);
        WallClock { offset_ns: wall_ns - mono_ns }
    }

    /// A clock with a known offset (tests).
    pub fn with_offset(offset_ns: i128) -> Self {
        WallClock { offset_ns }
    }

    /// RFC 3339 UTC time with microseconds of a monotonic timestamp.
    pub fn format(&self, monotonic_ns: u64) -> String {
        self.rfc3339(monotonic_ns).to_string()
    }

    /// The same, to be written where it goes (no string is built).
    pub fn rfc3339(&self, monotonic_ns: u64) -> humantime::Rfc3339Timestamp {
        let time = UNIX_EPOCH + Duration::from_nanos(self.unix_ns(monotonic_ns));
        humantime::format_rfc3339_micros(time)
    }

    /// Nanoseconds since the Unix epoch of a monotonic timestamp (0 before it).
    pub fn unix_ns(&self, monotonic_ns: u64) -> u64 {
        let unix_ns = (monotonic_ns as i128 + self.offset_ns).max(0);
        unix_ns.min(u64::MAX as i128) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotonic_stamps_become_utc_times() {
        let clock = WallClock::with_offset(1_795_000_000_000_000_000);
        assert_eq!(clock.format(1_300_000_000), "2026-11-18T11:06:41.300000Z");
        // Before the epoch is clamped, never a panic.
        assert_eq!(WallClock::with_offset(i128::MIN / 2).format(0), "1970-01-01T00:00:00.000000Z");
        let (a, b) = (monotonic_ns(), monotonic_ns());
        assert!(b >= a);
        assert!(unix_seconds() > 1.7e9);
    }
}
