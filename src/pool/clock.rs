//! The pool's clock: when a connection went idle, and whether it has been idle (or alive) too
//! long.
//!
//! Every checkout and every release reads the clock, and on a virtual machine
//! `Instant::now()` (`CLOCK_MONOTONIC`) costs about 25 ns, an eighth of the whole hit path. On
//! Linux the pool reads `CLOCK_MONOTONIC_COARSE` instead: about 6 ns, the time of the last
//! scheduler tick, so it trails the real time by less than its resolution (typically 4 ms).
//! Idle timeouts and lifetimes are seconds, so that is precise enough, provided the checks
//! err on the safe side: [`Tick::exceeded`] counts a connection as expired once it *may*
//! have reached its limit, so one is never handed out after its real idle time passed the
//! timeout, at the price of retiring it up to two resolutions early.

use std::sync::OnceLock;
use std::time::Duration;

/// A reading of the pool's monotonic clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Tick(Duration);

impl Tick {
    pub(crate) fn now() -> Tick {
        Tick(read())
    }

    /// The reading `d` later than this one.
    pub(crate) fn plus(self, d: Duration) -> Tick {
        Tick(self.0.saturating_add(d))
    }

    /// Whether more than `limit` may have passed since `earlier`: both readings can trail the
    /// real time by up to one resolution, so the measured span can fall short of the real one
    /// by that much.
    pub(crate) fn exceeded(self, earlier: Tick, limit: Duration) -> bool {
        self.0.saturating_sub(earlier.0) + resolution() >= limit
    }
}

#[cfg(target_os = "linux")]
fn read() -> Duration {
    from_timespec(rustix::time::clock_gettime(
        rustix::time::ClockId::MonotonicCoarse,
    ))
}

#[cfg(target_os = "linux")]
fn resolution() -> Duration {
    static RESOLUTION: OnceLock<Duration> = OnceLock::new();
    *RESOLUTION.get_or_init(|| {
        from_timespec(rustix::time::clock_getres(
            rustix::time::ClockId::MonotonicCoarse,
        ))
    })
}

#[cfg(target_os = "linux")]
fn from_timespec(ts: rustix::time::Timespec) -> Duration {
    // The kernel keeps both fields in range for a monotonic clock and its resolution.
    Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    )
}

/// Elsewhere: the standard monotonic clock, counted from the first reading.
#[cfg(not(target_os = "linux"))]
fn read() -> Duration {
    static EPOCH: OnceLock<std::time::Instant> = OnceLock::new();
    EPOCH.get_or_init(std::time::Instant::now).elapsed()
}

#[cfg(not(target_os = "linux"))]
fn resolution() -> Duration {
    Duration::ZERO
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_moves_forward_and_expiry_errs_on_the_safe_side() {
        let start = Tick::now();
        std::thread::sleep(Duration::from_millis(30));
        let later = Tick::now();
        assert!(later > start);
        assert!(later.exceeded(start, Duration::from_millis(20)));
        assert!(!later.exceeded(start, Duration::from_secs(1)));
        // A limit within one resolution of zero counts as reached at once.
        assert!(start.exceeded(start, resolution()));
        assert!(
            resolution() < Duration::from_millis(20),
            "{:?}",
            resolution()
        );
    }
}
