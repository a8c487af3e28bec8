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
//! A stripe belongs to exactly one thread at a time: a thread takes a number when it first
//! touches any pool and gives it back when it exits, and thread number `i` owns stripe `i` of
//! every pool. Its owner updates it with a plain load and store, no read-modify-write (a
//! locked instruction costs more than the rest of the update); other threads only read it. A
//! number given back keeps its stripes' values, which the next owner continues from (the
//! hand-over goes through a mutex, so the new owner sees the last value). Threads beyond the
//! [`STRIPES`] numbers (more than that many alive at once) add to the shared total directly,
//! exact and a little slower.
//!
//! The price is that the shared total alone is only approximate, off by less than
//! [`IdleCount::slack`] ([`FOLD_AT`] per thread that has a stripe). The release path reads
//! only the shared total while it is that far below `max_idle_total`, and adds the stripes up
//! only near the cap; [`IdleCount::sum`] is exact whenever no update runs concurrently (at
//! rest).

use parking_lot::Mutex;
use std::sync::atomic::{AtomicIsize, AtomicUsize, Ordering};

/// A stripe moves into the shared total once it holds this much (either sign).
const FOLD_AT: isize = 16;

/// Stripes per pool, so threads numbered 0 to 63 have one each: 8 KiB per connector.
const STRIPES: usize = 64;

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
        IdleCount {
            shared: Padded::default(),
            stripes: (0..STRIPES).map(|_| Padded::default()).collect(),
        }
    }

    /// Adds `delta` (±1) on this thread's stripe.
    pub(crate) fn add(&self, delta: isize) {
        let Some(own) = thread_index().and_then(|i| self.stripes.get(i)) else {
            self.shared.0.fetch_add(delta, Ordering::Relaxed);
            return;
        };
        // Only this thread writes its stripe, so load + store cannot lose an update.
        let now = own.0.load(Ordering::Relaxed) + delta;
        if now.abs() >= FOLD_AT {
            own.0.store(0, Ordering::Relaxed);
            self.shared.0.fetch_add(now, Ordering::Relaxed);
        } else {
            own.0.store(now, Ordering::Relaxed);
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
    /// moment (and a fold is two writes), so it may be off by the updates running meanwhile.
    pub(crate) fn sum(&self) -> usize {
        let stripes: isize = self.stripes[..threads_with_stripes()]
            .iter()
            .map(|s| s.0.load(Ordering::Relaxed))
            .sum();
        let total = self.shared.0.load(Ordering::Relaxed) + stripes;
        usize::try_from(total).unwrap_or(0)
    }

    /// How far the shared total can be from the count: less than [`FOLD_AT`] per stripe in
    /// use.
    fn slack(&self) -> isize {
        threads_with_stripes() as isize * (FOLD_AT - 1)
    }
}

/// Numbers handed out so far: the stripes that can be non-zero are below it.
static NUMBERED: AtomicUsize = AtomicUsize::new(0);

/// Numbers of threads that exited, for the next threads to take.
static RETURNED: Mutex<Vec<usize>> = Mutex::new(Vec::new());

/// A thread's number, given back when the thread exits.
struct ThreadNumber(usize);

impl Drop for ThreadNumber {
    fn drop(&mut self) {
        RETURNED.lock().push(self.0);
    }
}

/// This thread's number, and so its stripe; `None` while the thread is exiting (its
/// thread-locals are being destroyed), when the caller uses the shared total.
fn thread_index() -> Option<usize> {
    thread_local! {
        static NUMBER: ThreadNumber = ThreadNumber(
            RETURNED
                .lock()
                .pop()
                .unwrap_or_else(|| NUMBERED.fetch_add(1, Ordering::AcqRel)),
        );
    }
    NUMBER.try_with(|n| n.0).ok()
}

/// How many stripes may hold something: the numbers handed out so far, at most [`STRIPES`].
fn threads_with_stripes() -> usize {
    NUMBERED.load(Ordering::Acquire).min(STRIPES)
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
    fn threads_that_come_and_go_reuse_stripes_and_lose_nothing() {
        let count = IdleCount::new();
        for _ in 0..200 {
            std::thread::scope(|s| {
                s.spawn(|| {
                    count.add(1);
                    count.add(1);
                    count.add(-1);
                });
            });
        }
        assert_eq!(count.sum(), 200);
        assert!(
            threads_with_stripes() < STRIPES,
            "200 threads one after the other took {} numbers",
            NUMBERED.load(Ordering::Relaxed)
        );
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
