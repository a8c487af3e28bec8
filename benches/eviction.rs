//! `max_idle_total` at scale: what one release costs when it must close a connection, by the
//! global cap against by the per-peer cap (issue 16's measurement).
//!
//! 5,000 keys (groups on one plaintext upstream, a child process that holds the sockets).
//!
//! - `global_cap`: `max_idle_total = 1,000`, so 1,000 keys hold an idle connection and the
//!   other 4,000 none. Each measured release returns a fresh connection of a key with none:
//!   the total goes over the cap and the release closes the least recently used connection of
//!   another key.
//! - `per_peer_cap`: `max_idle_per_peer = 1`, the global cap out of reach, every key holding
//!   one idle connection. Each measured release returns a second connection of a key, and
//!   closes the key's older one.
//!
//! Both close exactly one connection per release, so the difference is the cost of finding
//! the victim. The fresh connections are dialled before the clock starts. A sample releases at
//! most [`MAX_RELEASES`] connections (each needs a dial first, and the sockets it closes sit in
//! `TIME_WAIT`) and scales its time to the iteration count criterion asked for. Times are the
//! benchmark thread's CPU time, as in `benches/pool.rs` (the machine is shared).
//!
//! ```text
//! cargo bench --bench eviction
//! ```

mod common;

use std::time::Duration;

use common::child::{ChildUpstream, Upstream};
use common::hit::{current_thread, prewarm, thread_cpu_time};
use criterion::Criterion;
use upstream_pool::{Connector, ConnectorOptions, Peer};

const KEYS: usize = 5_000;
const GLOBAL_CAP: usize = 1_000;
/// Releases actually timed per sample (see the module docs).
const MAX_RELEASES: u64 = 300;

#[derive(Debug, Clone, Copy)]
enum Case {
    GlobalCap,
    PerPeerCap,
}

fn main() {
    common::child::run_if_child();
    common::raise_nofile_limit();
    common::install_recorder();
    common::print_header("eviction");
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2))
        .sample_size(10)
        .configure_from_args();
    let mut group = c.benchmark_group("evict/5000_keys");
    for (name, case) in [
        ("global_cap", Case::GlobalCap),
        ("per_peer_cap", Case::PerPeerCap),
    ] {
        if !common::selected(&format!("evict/5000_keys/{name}")) {
            continue;
        }
        bench_case(&mut group, name, case);
    }
    group.finish();
    c.final_summary();
}

fn bench_case(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    case: Case,
) {
    let rt = current_thread();
    let upstream = ChildUpstream::spawn(&Upstream::PlainHold).expect("child upstream");
    let mut options = ConnectorOptions::default();
    options.idle_timeout = Duration::from_secs(600);
    match case {
        Case::GlobalCap => options.max_idle_total = GLOBAL_CAP,
        Case::PerPeerCap => {
            options.max_idle_per_peer = 1;
            options.max_idle_total = 4 * KEYS;
        }
    }
    let connector = Connector::new(options).expect("connector");
    let peers: Vec<Peer> = (0..KEYS)
        .map(|i| Peer::tcp(upstream.addr()).with_group(format!("key-{i}")))
        .collect();
    rt.block_on(prewarm(&connector, &peers, 1));
    let expected_idle = match case {
        Case::GlobalCap => GLOBAL_CAP,
        Case::PerPeerCap => KEYS,
    };
    assert_eq!(connector.idle_count(), expected_idle);
    let mut cursor = 0usize;
    let mut released = 0u64;
    group.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let n = iters.min(MAX_RELEASES) as usize;
            rt.block_on(async {
                let fresh = match case {
                    Case::GlobalCap => {
                        // Keys with no idle connection: `get` dials.
                        let mut fresh = Vec::with_capacity(n);
                        while fresh.len() < n {
                            let peer = &peers[cursor % KEYS];
                            cursor += 1;
                            if connector.idle_count_for(peer) == 0 {
                                let conn = connector.get(peer).await.expect("dial");
                                assert!(!conn.reused());
                                fresh.push(conn);
                            }
                        }
                        fresh
                    }
                    Case::PerPeerCap => {
                        // Take the key's idle connection and dial a second; return the
                        // first (no eviction), keep the second for the measured release.
                        let mut fresh = Vec::with_capacity(n);
                        for _ in 0..n {
                            let peer = &peers[cursor % KEYS];
                            cursor += 1;
                            let idle = connector.get(peer).await.expect("reuse");
                            let conn = connector.get(peer).await.expect("dial");
                            assert!(!conn.reused());
                            connector.release(idle);
                            fresh.push(conn);
                        }
                        fresh
                    }
                };
                let start = thread_cpu_time();
                for conn in fresh {
                    connector.release(conn);
                }
                let spent = thread_cpu_time() - start;
                released += n as u64;
                assert_eq!(
                    connector.idle_count(),
                    expected_idle,
                    "one closed per release"
                );
                spent.mul_f64(iters as f64 / n as f64)
            })
        })
    });
    eprintln!(
        "[evict/5000_keys/{name}] {released} releases timed, {} idle at the end",
        connector.idle_count()
    );
    drop(connector);
    drop(upstream);
}
