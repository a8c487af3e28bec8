//! The pool's one background task: evicts idle connections that expired or that the upstream
//! closed, even for keys nobody asks for.
//!
//! One task per pool, not one per idle connection: each pass walks the idle lists and asks
//! every connection's socket for readiness the reactor already recorded, which costs no
//! syscall unless something arrived. It holds only a `Weak` to the pool and exits when the
//! pool is dropped.

use std::sync::Weak;
use std::time::Duration;

use tokio::time::MissedTickBehavior;

use super::Pool;

/// Starts the reaper on the current tokio runtime; a no-op outside one (then expiry still
/// happens lazily, at checkout).
pub(super) fn spawn(pool: Weak<Pool>, interval: Duration) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        tracing::debug!("no tokio runtime: idle connections are only evicted at checkout");
        return;
    };
    runtime.spawn(async move {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let Some(pool) = pool.upgrade() else {
                return;
            };
            pool.reap(std::time::Instant::now());
        }
    });
}
