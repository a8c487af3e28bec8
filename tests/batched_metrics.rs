//! `ConnectorOptions::batched_metrics` (issue 16): the hit path's idle/active gauge moves and
//! reused-checkout counts are tallied per key and published by the reaper.
//!
//! What must hold, checked against a `metrics-util` `DebuggingRecorder` and a real OpenSSL
//! server (whose accept and close counts say what really happened):
//! - the three hit-path series lag by at most one reaper pass and are then exact;
//! - every other change (a dial, a close, an eviction) is published at once;
//! - the published gauges never go below zero, also when a connection is closed before the
//!   reaper published how it last moved;
//! - nothing is lost: the connector's drop publishes what is pending.
//!
//! The first test runs on a current-thread runtime with a thread-local recorder, so the
//! reaper runs only where the test awaits: the lag is deterministic. The second runs a
//! concurrent workload on two worker threads with a global recorder (this binary's only
//! recorder) and samples the gauges all along.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use upstream_pool::metrics::{ACTIVE_CONNECTIONS, CHECKOUTS_TOTAL, IDLE_CONNECTIONS};
use upstream_pool::{Connection, Connector, ConnectorOptions, Peer};

use support::certs::TestPki;
use support::client::http_get;
use support::server::{Behaviour, TestServer};

const REAP: Duration = Duration::from_millis(50);

fn batched(configure: impl FnOnce(&mut ConnectorOptions)) -> Connector {
    let mut options = ConnectorOptions::default();
    options.batched_metrics = true;
    options.reap_interval = REAP;
    configure(&mut options);
    Connector::new(options).unwrap()
}

fn tls_peer(server: &TestServer) -> Peer {
    Peer::tls(server.addr(), "localhost").with_ca(TestPki::shared().ca_a())
}

async fn exchange(conn: &mut Connection) {
    let response = http_get(conn, "localhost").await.unwrap();
    assert_eq!(response.status, 200, "{response:?}");
}

/// (idle gauge, active gauge, reused-checkout counter), each summed over its series.
fn read(snapshotter: &Snapshotter) -> (f64, f64, u64) {
    let (mut idle, mut active, mut reused) = (0.0, 0.0, 0);
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let name = key.key().name();
        match value {
            DebugValue::Gauge(g) if name == IDLE_CONNECTIONS => idle += g.into_inner(),
            DebugValue::Gauge(g) if name == ACTIVE_CONNECTIONS => active += g.into_inner(),
            DebugValue::Counter(n)
                if name == CHECKOUTS_TOTAL
                    && key
                        .key()
                        .labels()
                        .any(|l| l.key() == "outcome" && l.value() == "reused") =>
            {
                reused += n;
            }
            _ => {}
        }
    }
    (idle, active, reused)
}

/// Long enough for at least one reaper pass to run after the call.
async fn one_reaper_pass() {
    tokio::time::sleep(REAP * 3).await;
}

#[test]
fn the_hit_path_series_lag_one_pass_closes_count_at_once_and_nothing_goes_negative() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    metrics::with_local_recorder(&recorder, || {
        runtime.block_on(async {
            let server = TestServer::start(Behaviour::Http);
            let peer = tls_peer(&server);
            let c = batched(|_| {});
            let m = || read(&snapshotter);

            // A dial is published at once; its release into the pool only at the next pass.
            let mut conn = c.get(&peer).await.unwrap();
            assert!(!conn.reused());
            exchange(&mut conn).await;
            assert_eq!(m(), (0.0, 1.0, 0));
            c.release(conn);
            assert_eq!(m(), (0.0, 1.0, 0), "a release is a hit-path move: it lags");
            one_reaper_pass().await;
            assert_eq!(m(), (1.0, 0.0, 0));

            // A hit: gauges and counter move at the next pass.
            let mut conn = c.get(&peer).await.unwrap();
            assert!(conn.reused());
            assert_eq!(m(), (1.0, 0.0, 0), "a checkout from the pool lags");
            exchange(&mut conn).await;
            one_reaper_pass().await;
            assert_eq!(m(), (0.0, 1.0, 1));

            // A hit, then the connection is dropped before the reaper passed: the close
            // takes its decrement from the idle gauge, which still shows it.
            c.release(conn);
            one_reaper_pass().await;
            let conn = c.get(&peer).await.unwrap();
            assert!(conn.reused());
            drop(conn);
            assert_eq!(m(), (0.0, 0.0, 1), "never -1 active");
            let stats = server.wait_for(|s| s.open == 0).await;
            assert_eq!(stats.accepted, 1);
            one_reaper_pass().await;
            assert_eq!(m(), (0.0, 0.0, 2));

            // A fresh connection released, then evicted before the reaper passed: the
            // close takes its decrement from the active gauge, which still shows it.
            let mut conn = c.get(&peer).await.unwrap();
            assert!(!conn.reused());
            exchange(&mut conn).await;
            c.release(conn);
            assert_eq!(m(), (0.0, 1.0, 2));
            assert_eq!(c.evict(&peer), 1);
            assert_eq!(m(), (0.0, 0.0, 2), "never -1 idle");
            let stats = server.wait_for(|s| s.open == 0).await;
            assert_eq!(stats.accepted, 2);

            // Pending tallies are published when the connector goes.
            let mut conn = c.get(&peer).await.unwrap();
            exchange(&mut conn).await;
            c.release(conn);
            let conn = c.get(&peer).await.unwrap();
            assert!(conn.reused());
            c.release(conn);
            let stats_reused = c.stats_for(&peer).checkouts_reused;
            assert_eq!(stats_reused, 3, "PeerStats stay exact");
            assert_eq!(m(), (0.0, 1.0, 2));
            drop(c);
            assert_eq!(m(), (0.0, 0.0, 3));
            let stats = server.wait_for(|s| s.open == 0).await;
            assert_eq!(stats.accepted, 3);
        })
    });
}

fn global_snapshotter() -> &'static Snapshotter {
    static SNAP: OnceLock<Snapshotter> = OnceLock::new();
    SNAP.get_or_init(|| {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        recorder
            .install()
            .expect("no other recorder in this binary");
        snapshotter
    })
}

/// Many tasks on two worker threads get, use and release connections of four keys, drop
/// some instead of releasing them, and evict keys, while the upstream closes connections
/// that sit idle for a few milliseconds and a sampler reads the gauges without pause. No
/// sample may be negative; at rest, after a reaper pass, the gauges equal the pool's counts,
/// and the counter equals the reused checkouts the pool counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_concurrent_churn_the_gauges_never_go_negative_and_settle_exactly() {
    let snapshotter = global_snapshotter();
    let server = TestServer::start(Behaviour::CloseAfter(Duration::from_millis(15)));
    let peers: Vec<Peer> = (0..4)
        .map(|i| tls_peer(&server).with_group(format!("g{i}")))
        .collect();
    let c = batched(|o| {
        o.max_idle_per_peer = 2;
        o.max_idle_total = 5;
    });

    let stop = Arc::new(AtomicBool::new(false));
    let samples = Arc::new(AtomicUsize::new(0));
    let sampler = std::thread::spawn({
        let (stop, samples) = (Arc::clone(&stop), Arc::clone(&samples));
        move || {
            let mut lowest = (0.0f64, 0.0f64);
            while !stop.load(Ordering::Relaxed) {
                let (idle, active, _) = read(snapshotter);
                lowest = (lowest.0.min(idle), lowest.1.min(active));
                samples.fetch_add(1, Ordering::Relaxed);
            }
            lowest
        }
    });

    let gets = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for t in 0..16usize {
        let (c, peers, gets) = (c.clone(), peers.clone(), Arc::clone(&gets));
        tasks.push(tokio::spawn(async move {
            for i in 0..40usize {
                let peer = &peers[(t + i) % peers.len()];
                let Ok(mut conn) = c.get(peer).await else {
                    continue;
                };
                gets.fetch_add(1, Ordering::Relaxed);
                if http_get(&mut conn, "localhost").await.is_err() {
                    continue; // closed by the upstream while idle: dropped
                }
                match (t * 7 + i) % 10 {
                    0 => drop(conn),
                    1 => {
                        c.release(conn);
                        c.evict(peer);
                    }
                    2 => {
                        c.release(conn);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    _ => c.release(conn),
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    one_reaper_pass().await;
    stop.store(true, Ordering::Relaxed);
    let lowest = sampler.join().unwrap();
    assert!(samples.load(Ordering::Relaxed) > 100, "the sampler ran");
    assert!(
        lowest.0 >= 0.0 && lowest.1 >= 0.0,
        "a published gauge went negative: lowest (idle, active) = {lowest:?}"
    );
    assert!(gets.load(Ordering::Relaxed) > 300);

    // At rest the gauges settle on the pool's counts. Waited for rather than read once: the
    // upstream keeps closing idle connections, which the reaper then evicts.
    let settled = support::wait_until(Duration::from_secs(5), || {
        let (idle, active, _) = read(snapshotter);
        active == 0.0 && idle == c.idle_count() as f64
    })
    .await;
    assert!(
        settled,
        "gauges {:?} against {} idle",
        read(snapshotter),
        c.idle_count()
    );
    let counted: u64 = peers.iter().map(|p| c.stats_for(p).checkouts_reused).sum();
    assert_eq!(read(snapshotter).2, counted);
    assert!(counted > 0, "some checkouts were hits");

    let open_in_pool: usize = peers.iter().map(|p| c.connection_count_for(p)).sum();
    assert_eq!(open_in_pool, c.idle_count(), "nothing in use at rest");
    // The upstream sees what the pool holds (closes it initiated itself may still be in
    // the pool until the reaper's next pass notices them).
    server.wait_for(|s| s.open <= open_in_pool).await;
    drop(c);
    // The pool goes when the last reference does (a reaper pass in progress holds one).
    assert!(
        support::wait_until(Duration::from_secs(5), || {
            let (idle, active, _) = read(snapshotter);
            idle == 0.0 && active == 0.0
        })
        .await,
        "gauges after the connector went: {:?}",
        read(snapshotter)
    );
    server.wait_for(|s| s.open == 0).await;
}
