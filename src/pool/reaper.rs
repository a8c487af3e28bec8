//! The pool's one background task: evicts idle connections that expired or that the upstream
//! closed, even for keys nobody asks for, and tops keys up to their `min_idle`.
//!
//! One task per pool, not one per idle connection: each pass walks the idle lists and asks
//! every connection's socket for readiness the reactor already recorded, which costs no
//! syscall unless something arrived. It holds only a `Weak` to the pool and exits when the
//! pool is dropped.

use std::sync::atomic::Ordering;
use std::sync::Weak;
use std::time::Duration;

use tokio::time::MissedTickBehavior;

use super::Pool;

/// Starts the reaper on the current tokio runtime. Returns `false` outside one (then expiry
/// still happens lazily, at checkout, and the next release tries again).
pub(super) fn spawn(pool: Weak<Pool>, interval: Duration) -> bool {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        tracing::debug!("no tokio runtime: idle connections are only evicted at checkout");
        return false;
    };
    // The task also ends when its runtime shuts down while the pool lives on (a connector
    // shared by several runtimes), possibly before its first poll: the guard is moved in
    // unstarted so that dropping the task clears the flag either way, and the next release
    // starts a reaper on a live runtime.
    let running = Running(pool.clone());
    runtime.spawn(async move {
        let _running = running;
        // First pass one interval after the start, not at once: the reaper starts at a key's
        // first checkout, and an immediate pass would top up `min_idle` while that checkout's
        // own dial is still in flight, leaving one idle connection more than asked for once
        // it is released.
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let Some(pool) = pool.upgrade() else {
                return;
            };
            pool.reap(super::clock::Tick::now());
        }
    });
    true
}

/// Clears `Pool::reaper_started` when the reaper task ends or is dropped.
struct Running(Weak<Pool>);

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(pool) = self.0.upgrade() {
            pool.reaper_started.store(false, Ordering::Release);
        }
    }
}
