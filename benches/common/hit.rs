//! The pool hit path under test: `Connector::get` on a peer with a pooled idle connection,
//! then `Connector::release`, with everything that costs something switched on.
//!
//! - Metrics: [`super::install_recorder`] runs before the connector exists, so the checkout
//!   counter and the idle/active gauges are live atomics.
//! - Idle timestamps: always taken at release and compared at checkout (idle timeout 60 s,
//!   longer than a benchmark run, so nothing expires mid-run).
//! - Caps: `max_connections_per_peer = Some(8)`, `max_idle_per_peer = 8`, `max_idle_total`
//!   just above what the fixture pre-warms (the global count is checked on every release).
//! - Liveness: every checkout asks the socket's recorded readiness (plaintext TCP here).
//! - Two metric modes, each its own criterion function: `ours` (the default: gauges and the
//!   reused-checkout counter exact after every call) and `ours_batched`
//!   (`ConnectorOptions::batched_metrics`: the hit path tallies them per key and the reaper
//!   publishes them every `reap_interval`).
//!
//! Timing: one-task cases report the CPU time of the benchmark thread per operation
//! ([`one_task`]), two-thread cases the wall time per operation on each thread while the
//! other runs too ([`two_threads`]).
//!
//! The upstream is a child process that accepts and holds sockets ([`super::child`]), so only
//! the pool's cost is measured and 10,000 connections fit under the descriptor limit.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use tokio::runtime::Runtime;
use tokio::task::JoinSet;
use upstream_pool::{Connector, ConnectorOptions, Peer};

use super::child::{ChildUpstream, Upstream};

/// Connections dialled at once while pre-warming (well under the child's 4,096 backlog).
const WARM_BATCH: usize = 256;

/// The connector settings of every hit-path benchmark: caps on, metrics on (the recorder is
/// global), idle timestamps compared on every checkout.
pub(crate) fn options(idle_total: usize) -> ConnectorOptions {
    options_with(idle_total, false)
}

/// [`options`], with `batched_metrics` set as given.
pub(crate) fn options_with(idle_total: usize, batched_metrics: bool) -> ConnectorOptions {
    let mut o = ConnectorOptions::default();
    o.batched_metrics = batched_metrics;
    o.max_connections_per_peer = Some(8);
    o.max_idle_per_peer = 8;
    o.max_idle_total = idle_total + 1024;
    o.idle_timeout = Duration::from_secs(60);
    o
}

/// Our connector with `keys` distinct peer keys, each with `per_key` idle connections to a
/// child upstream. Create it on the runtime that will run the benchmark: the connections are
/// registered with that runtime's reactor.
#[derive(Debug)]
pub(crate) struct Ours {
    /// The connector under test.
    pub(crate) connector: Connector,
    /// One peer per key: same address, distinct `with_group` tags.
    pub(crate) peers: Vec<Peer>,
    /// Checkouts that did not find an idle connection (a dial happened instead). Must stay 0.
    pub(crate) misses: AtomicU64,
    upstream: ChildUpstream,
}

impl Ours {
    /// Starts the child upstream, creates the connector and pre-warms every key.
    pub(crate) fn new(rt: &Runtime, keys: usize, per_key: usize, batched_metrics: bool) -> Ours {
        super::install_recorder();
        let upstream = ChildUpstream::spawn(&Upstream::PlainHold).expect("child upstream");
        let connector =
            Connector::new(options_with(keys * per_key, batched_metrics)).expect("connector");
        let peers: Vec<Peer> = (0..keys)
            .map(|i| Peer::tcp(upstream.addr()).with_group(format!("key-{i}")))
            .collect();
        rt.block_on(prewarm(&connector, &peers, per_key));
        let idle = connector.idle_count();
        assert_eq!(idle, keys * per_key, "every pre-warmed connection is idle");
        Ours {
            connector,
            peers,
            misses: AtomicU64::new(0),
            upstream,
        }
    }

    /// One hit: check out `peer`'s idle connection and give it back.
    pub(crate) async fn hit(&self, peer: &Peer) {
        let conn = self.connector.get(peer).await.expect("get");
        if !conn.reused() {
            self.misses.fetch_add(1, Ordering::Relaxed);
        }
        self.connector.release(conn);
    }

    /// Pid of the child upstream (to check it is a separate process).
    pub(crate) fn upstream_pid(&self) -> u32 {
        self.upstream.pid()
    }
}

/// Opens `per_key` connections for every peer, `WARM_BATCH` at a time, and releases them all.
pub(crate) async fn prewarm(connector: &Connector, peers: &[Peer], per_key: usize) {
    let mut held = Vec::with_capacity(peers.len() * per_key);
    for chunk in peers.chunks(WARM_BATCH.div_ceil(per_key).max(1)) {
        let mut set = JoinSet::new();
        for peer in chunk {
            for _ in 0..per_key {
                let (c, p) = (connector.clone(), peer.clone());
                set.spawn(async move { c.get(&p).await });
            }
        }
        while let Some(res) = set.join_next().await {
            held.push(res.expect("join").expect("pre-warm dial"));
        }
    }
    for conn in held {
        connector.release(conn);
    }
}

/// Runs `f(thread, iters)` on two OS threads at once, each in `rt.block_on`, released
/// together by a barrier, and returns the longer of the two wall times.
///
/// `rt` should be a multi-thread runtime: `block_on` polls the future on the calling thread
/// (so the two threads really run in parallel), while the runtime's workers drive the reactor
/// and timers and run whatever the code under test spawns. Divided by `iters` this is the
/// time per operation *on each thread* while the other one runs the same loop.
pub(crate) fn two_threads<F, Fut>(rt: &Runtime, iters: u64, f: F) -> Duration
where
    F: Fn(usize, u64) -> Fut + Sync,
    Fut: Future<Output = ()>,
{
    let barrier = Barrier::new(2);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|t| {
                let (f, barrier) = (&f, &barrier);
                s.spawn(move || {
                    let fut = f(t, iters);
                    barrier.wait();
                    let start = Instant::now();
                    rt.block_on(fut);
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

/// CPU time consumed by the calling thread so far (`CLOCK_THREAD_CPUTIME_ID`).
#[allow(
    unsafe_code,
    reason = "clock_gettime has no safe wrapper in our dependencies"
)]
pub(crate) fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable `timespec`; clock_gettime only writes into it.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Runs `op(0..iters)` one after the other in `rt.block_on` (a current-thread runtime, so
/// everything the code under test spawns runs on this thread too) and returns the CPU time
/// this thread spent: on an idle machine the same as the wall time, but not inflated when
/// other processes take the CPU away mid-run (this machine is shared).
pub(crate) fn one_task<F, Fut>(rt: &Runtime, iters: u64, mut op: F) -> Duration
where
    F: FnMut(u64) -> Fut,
    Fut: Future<Output = ()>,
{
    rt.block_on(async {
        let start = thread_cpu_time();
        for j in 0..iters {
            op(j).await;
        }
        thread_cpu_time() - start
    })
}

/// A current-thread runtime (the single-task cases).
pub(crate) fn current_thread() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("current-thread runtime")
}

/// A two-worker multi-thread runtime (the two-thread cases).
pub(crate) fn two_workers() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("multi-thread runtime")
}

/// How many threads drive the hit path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Threads {
    /// One task on a current-thread runtime.
    One,
    /// Two OS threads at once ([`two_threads`]) on a two-worker runtime.
    Two,
}

/// The hit-path scenarios: (threads, keys). One criterion group each, named by
/// [`group_name`], so the peer comparison lines up with `benches/pool.rs`.
pub(crate) const SCENARIOS: [(Threads, usize); 5] = [
    (Threads::One, 1),
    (Threads::One, 1_000),
    (Threads::One, 10_000),
    (Threads::Two, 1),
    (Threads::Two, 10_000),
];

/// `hit/one_task/1_key`, `hit/two_threads/10000_keys`, ...
pub(crate) fn group_name(threads: Threads, keys: usize) -> String {
    let t = match threads {
        Threads::One => "one_task",
        Threads::Two => "two_threads",
    };
    let k = if keys == 1 {
        "1_key".to_string()
    } else {
        format!("{keys}_keys")
    };
    format!("hit/{t}/{k}")
}

/// Idle connections per key a scenario needs: with two threads on one key both may hold one
/// at the same time; with many keys each thread works on its own half of the keys.
pub(crate) fn per_key(threads: Threads, keys: usize) -> usize {
    if threads == Threads::Two && keys == 1 {
        2
    } else {
        1
    }
}

/// The key index operation `j` of thread `t` uses: round-robin over all keys with one
/// thread; with two threads, thread `t` cycles over the keys `k` with `k % 2 == t` (or both
/// share key 0 when there is only one).
pub(crate) fn key_index(threads: Threads, keys: usize, t: usize, j: u64) -> usize {
    match threads {
        Threads::One => (j % keys as u64) as usize,
        Threads::Two if keys == 1 => 0,
        Threads::Two => {
            let half = (keys / 2) as u64;
            t + 2 * (j % half) as usize
        }
    }
}

/// Benchmarks our hit path for one scenario as the functions `ours` (exact metrics) and
/// `ours_batched` (`batched_metrics`) of `group`; builds each fixture (runtime, child
/// upstream, pre-warmed pool) first and tears it down after.
pub(crate) fn bench_ours(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    threads: Threads,
    keys: usize,
) {
    for (name, batched) in [("ours", false), ("ours_batched", true)] {
        bench_ours_mode(group, threads, keys, name, batched);
    }
}

fn bench_ours_mode(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    threads: Threads,
    keys: usize,
    name: &str,
    batched: bool,
) {
    if !super::selected(&format!("{}/{name}", group_name(threads, keys))) {
        return;
    }
    let rt = match threads {
        Threads::One => current_thread(),
        Threads::Two => two_workers(),
    };
    let fx = Ours::new(&rt, keys, per_key(threads, keys), batched);
    let reused_before = super::checkouts("reused");
    let mut ops = 0u64;
    group.bench_function(name, |b| match threads {
        Threads::One => b.iter_custom(|iters| {
            ops += iters;
            let fx = &fx;
            one_task(&rt, iters, |j| {
                fx.hit(&fx.peers[key_index(threads, keys, 0, j)])
            })
        }),
        Threads::Two => b.iter_custom(|iters| {
            ops += 2 * iters;
            two_threads(&rt, iters, |t, iters| {
                let fx = &fx;
                async move {
                    for j in 0..iters {
                        fx.hit(&fx.peers[key_index(threads, keys, t, j)]).await;
                    }
                }
            })
        }),
    });
    let misses = fx.misses.load(Ordering::Relaxed);
    let idle = fx.connector.idle_count();
    let pid = fx.upstream_pid();
    // Batched tallies are published when the connector goes (or at a reaper pass).
    drop(fx);
    let recorded = super::checkouts("reused") - reused_before;
    eprintln!(
        "[{}] {name}: {ops} checkouts, {misses} misses (dials), {recorded} counted by the \
         metrics recorder, {idle} idle at the end, upstream pid {pid}",
        group_name(threads, keys),
    );
    drop(rt);
}
