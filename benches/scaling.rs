//! How the hit path scales across cores: 1, 2 and 4 OS threads each running get + release in
//! a loop, on distinct keys (thread `t` on key `t`) and on one shared key (with one idle
//! connection per thread). Everything is on as in `benches/pool.rs` (metrics recorder,
//! caps, idle timestamps, liveness at checkout and release; `benches/common/hit.rs`), with
//! exact metrics (`scaling/distinct_keys`, `scaling/shared_key`) and with
//! `batched_metrics` (the `_batched` groups).
//!
//! Reported as throughput (criterion's `elem/s`: hits per second over all threads). One
//! iteration is one hit on every thread; the time is the wall time until the slowest thread
//! is done. The goal on a 2-core machine: ≥ 1.7× the 1-thread throughput with 2 threads on
//! distinct keys, and no collapse on one shared key; 4 threads oversubscribe the cores and
//! show that nothing degrades past the core count. Wall time, so other processes on the
//! machine show in the result: read it with the load average the header prints.
//!
//! ```text
//! cargo bench --bench scaling
//! ```

mod common;

use std::sync::atomic::Ordering;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use common::hit::Ours;
use criterion::{Criterion, Throughput};
use tokio::runtime::Runtime;

fn main() {
    common::child::run_if_child();
    common::raise_nofile_limit();
    common::install_recorder();
    common::print_header("scaling");
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(20)
        .configure_from_args();
    for (shared, batched) in [(false, false), (true, false), (false, true), (true, true)] {
        let name = match (shared, batched) {
            (true, false) => "scaling/shared_key",
            (false, false) => "scaling/distinct_keys",
            (true, true) => "scaling/shared_key_batched",
            (false, true) => "scaling/distinct_keys_batched",
        };
        let mut group = c.benchmark_group(name);
        for threads in [1usize, 2, 4] {
            if !common::selected(&format!("{name}/{threads}")) {
                continue;
            }
            group.throughput(Throughput::Elements(threads as u64));
            bench(&mut group, threads, shared, batched);
        }
        group.finish();
    }
    c.final_summary();
}

fn bench(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    threads: usize,
    shared: bool,
    batched: bool,
) {
    // Two workers drive the reactor and whatever the pool spawns (the reaper); the benchmark
    // threads poll their loops themselves in `block_on`.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (keys, per_key) = if shared { (1, threads) } else { (threads, 1) };
    let fx = Ours::new(&rt, keys, per_key, batched);
    group.bench_function(threads.to_string(), |b| {
        b.iter_custom(|iters| run(&rt, &fx, threads, shared, iters))
    });
    assert_eq!(
        fx.misses.load(Ordering::Relaxed),
        0,
        "every hit found its idle connection"
    );
    drop(fx);
    drop(rt);
}

/// `threads` OS threads, released together, each doing `iters` hits; the slowest's wall time.
fn run(rt: &Runtime, fx: &Ours, threads: usize, shared: bool, iters: u64) -> Duration {
    let barrier = Barrier::new(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let barrier = &barrier;
                let peer = &fx.peers[if shared { 0 } else { t }];
                s.spawn(move || {
                    barrier.wait();
                    let start = Instant::now();
                    rt.block_on(async {
                        for _ in 0..iters {
                            fx.hit(peer).await;
                        }
                    });
                    start.elapsed()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("benchmark thread"))
            .max()
            .unwrap_or_default()
    })
}
