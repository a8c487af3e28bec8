//! The pool's idle-connection count across all keys, for `max_idle_total`: a striped counter
//! that threads on different keys can update without sharing a cache line.
//!
//! Every checkout of an idle connection and every release into the idle list changes the
//! count. A single atomic is one cache line that every core writes on every hit; with two
//! threads on two different keys it moves between the cores twice per hit (it was the
//! largest shared write left on the hit path). So, like the kernel's `percpu_counter`, each
//! thread adds to a stripe of its own (a cache line per stripe) and moves the stripe into
//! the shared total only once it has drifted by [`FOLD_AT`]: the shared line is written once
//! per [`FOLD_AT`] net changes instead of on every one, and a hit (−1, then +1) never writes
//! it at all.
//!
//! The price is that the shared total alone is only approximate, off by less than
//! [`IdleCount::slack`] (stripes × [`FOLD_AT`]). The release path reads only the shared total
//! while it is that far below `max_idle_total`, and adds the stripes up only near the cap;
//! [`IdleCount::sum`] is exact whenever no update runs concurrently (at rest).

use std::cell::Cell;
use std::sync::atomic::{AtomicIsize, AtomicUsize, Ordering};

/// A stripe moves into the shared total once it holds this much (either sign).
const FOLD_AT: isize = 16;

/// One cache line (two, for adjacent-line prefetchers) per stripe, so stripes do not share.
#[repr(align(128))]
#[derive(Debug, Default)]
struct Padded(AtomicIsize);

#[derive(Debug)]
pub(crate) struct IdleCount {
    shared: Padded,
    stripes: Box<[Padded]>,
}

impl IdleCount {
    pub(crate) fn new() -> IdleCount {
        // Twice the cores, so that threads rarely share a stripe; a power of two for the mask.
        let cores = std::thread::available_parallelism().map_or(4, |n| n.get());
        let n = (cores * 2).clamp(4, 64).next_power_of_two();
        IdleCount {
            shared: Padded::default(),
            stripes: (0..n).map(|_| Padded::default()).collect(),
        }
    }

    /// Adds `delta` (±1) on this thread's stripe.
    pub(crate) fn add(&self, delta: isize) {
        let stripe = &self.stripes[thread_index() & (self.stripes.len() - 1)].0;
        let now = stripe.fetch_add(delta, Ordering::Relaxed) + delta;
        if now.abs() >= FOLD_AT {
            // Moves what this thread saw; a concurrent add on the same stripe (another thread
            // with the same index) stays in the stripe, so nothing is counted twice or lost.
            stripe.fetch_sub(now, Ordering::Relaxed);
            self.shared.0.fetch_add(now, Ordering::Relaxed);
        }
    }

    /// Whether the count may exceed `cap`: `false` only when it certainly does not. One load
    /// of the shared line while the count is well below the cap.
    pub(crate) fn may_exceed(&self, cap: usize) -> bool {
        let shared = self.shared.0.load(Ordering::Relaxed);
        shared.saturating_add(self.slack()) > isize::try_from(cap).unwrap_or(isize::MAX)
            && self.sum() > cap
    }

    /// The count: exact at rest; while updates run, each stripe is read at a different
    /// moment, so it may be off by the updates running meanwhile.
    pub(crate) fn sum(&self) -> usize {
        let stripes: isize = self
            .stripes
            .iter()
            .map(|s| s.0.load(Ordering::Relaxed))
            .sum();
        let total = self.shared.0.load(Ordering::Relaxed) + stripes;
        usize::try_from(total).unwrap_or(0)
    }

    /// How far the shared total can be from the count.
    fn slack(&self) -> isize {
        self.stripes.len() as isize * (FOLD_AT - 1)
    }
}

/// This thread's stripe index: threads are numbered in the order they first touch any pool.
fn thread_index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static INDEX: Cell<usize> = Cell::new(NEXT.fetch_add(1, Ordering::Relaxed));
    }
    INDEX.with(Cell::get)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sum_is_exact_at_rest_and_the_shared_total_within_the_slack() {
        let count = IdleCount::new();
        std::thread::scope(|s| {
            for t in 0..4 {
                let count = &count;
                s.spawn(move || {
                    for i in 0..10_000 {
                        count.add(1);
                        if i % 3 == t % 3 {
                            count.add(-1);
                        }
                    }
                });
            }
        });
        let expected: usize = (0..4)
            .map(|t| 10_000 - (0..10_000).filter(|i| i % 3 == t % 3).count())
            .sum();
        assert_eq!(count.sum(), expected);
        let shared = count.shared.0.load(Ordering::Relaxed);
        assert!((expected as isize - shared).abs() <= count.slack());
        assert!(count.may_exceed(expected - 1));
        assert!(!count.may_exceed(expected));
    }

    #[test]
    fn a_hit_never_writes_the_shared_total() {
        let count = IdleCount::new();
        count.add(1);
        for _ in 0..1_000 {
            count.add(-1);
            count.add(1);
        }
        assert_eq!(count.shared.0.load(Ordering::Relaxed), 0);
        assert_eq!(count.sum(), 1);
    }
}
