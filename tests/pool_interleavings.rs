//! Randomised interleavings of the pool's core, through the public API: checkout, dial,
//! release, hand-off to waiters, eviction (per key, global LRU, liveness, idle timeout) and
//! cancellation, with tight caps (1 to 3 connections per key) so that every path in the
//! slot/lease/waiter accounting is taken many times.
//!
//! Each round draws its settings and every task's operation sequence from a seed (printed on
//! failure; `UPSTREAM_POOL_INTERLEAVING_SEED=N` replays one round's choices, though the
//! scheduler's interleaving differs run to run). Rounds run on a current-thread runtime
//! (interleaving only at await points) and on a two-worker runtime (true parallelism).
//!
//! Checked, for every round:
//! - at every sample: connections per key ≤ cap, idle per key ≤ `max_idle_per_peer`, idle
//!   total ≤ `max_idle_total` (+ one per worker thread; see `IDLE_TOTAL_SLACK`);
//! - on the upstream: never more requests in flight for one key than the cap (exact; see
//!   `support::chaos`), and every response came from a connection made for the right key;
//! - every failure typed: `get` fails only with `PoolTimedout`; request failures on reused
//!   connections carry our error, reused and retryable;
//! - afterwards: once background dials settle, every slot still taken belongs to an idle
//!   connection (nothing leaked), the gauges agree (`active` 0, `idle` = `idle_count()`),
//!   and after the connector is dropped both gauges are 0, the upstream sees every
//!   connection closed, and the process's file descriptors are back to the start.
//!
//! This stands in for a `loom` model: the README ("Why no `loom` model (yet)") says what
//! isolating the core for loom would take.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use tokio::io::AsyncWriteExt;
use upstream_pool::{Connection, Connector, ConnectorOptions, Error, ErrorKind, Peer};

use support::certs::TestPki;
use support::chaos::{sni_of, Chaos, ChaosServer, Rng};
use support::client::read_response;
use support::{open_fds, wait_until};

const KEYS: usize = 3;
const TASKS: usize = 40;
const OPS_PER_TASK: usize = 30;
const WORKERS: usize = 2;
/// `release` adds a connection to the idle total before it evicts beyond `max_idle_total`, so
/// a concurrent sample may see one extra per thread inside `release`.
const IDLE_TOTAL_SLACK: usize = WORKERS;

static PANICS: AtomicUsize = AtomicUsize::new(0);

fn snapshotter() -> &'static Snapshotter {
    static SNAP: OnceLock<Snapshotter> = OnceLock::new();
    SNAP.get_or_init(|| {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        recorder
            .install()
            .expect("no other recorder in this binary");
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            default(info);
        }));
        snapshotter
    })
}

/// Sum of a gauge over all its label sets.
fn gauge(name: &str) -> f64 {
    snapshotter()
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(k, ..)| k.key().name() == name)
        .map(|(.., v)| match v {
            DebugValue::Gauge(g) => g.0,
            _ => 0.0,
        })
        .sum()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One round's settings, drawn from its seed.
#[derive(Debug, Clone)]
struct Round {
    seed: u64,
    multi_thread: bool,
    cap: usize,
    max_idle_per_peer: usize,
    max_idle_total: usize,
    wait_timeout: Duration,
    idle_timeout: Duration,
    reap_interval: Duration,
}

impl Round {
    fn new(seed: u64, cap: usize, multi_thread: bool) -> Round {
        let mut rng = Rng::new(seed);
        Round {
            seed,
            multi_thread,
            cap,
            max_idle_per_peer: rng.below(cap as u64 + 1) as usize,
            max_idle_total: 1 + rng.below(4) as usize,
            wait_timeout: Duration::from_millis(5 + rng.below(60)),
            idle_timeout: Duration::from_millis(50 + rng.below(500)),
            reap_interval: Duration::from_millis(5 + rng.below(50)),
        }
    }
}

/// What happened in a round: failures (must stay empty) and counts of the paths taken.
#[derive(Debug, Default)]
struct Failures {
    list: Mutex<Vec<String>>,
    gets: AtomicUsize,
    reused: AtomicUsize,
    pool_timeouts: AtomicUsize,
    cancelled: AtomicUsize,
    reused_errors: AtomicUsize,
    fresh_errors: AtomicUsize,
}

impl Failures {
    fn note(&self, what: String) {
        let mut list = lock(&self.list);
        if list.len() < 20 {
            list.push(what);
        }
    }

    fn count(counter: &AtomicUsize) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

const COUNTS: &str = "[gets, reused, pool timeouts, cancelled gets, reused errors, fresh errors]";

/// Paths taken over all rounds, to check the test exercised what it claims to.
static TOTALS: Mutex<[usize; 6]> = Mutex::new([0; 6]);

struct Key {
    peer: Peer,
    sni: String,
}

/// What a task does with a connection it got.
async fn use_connection(
    connector: &Connector,
    key: &Key,
    mut conn: Connection,
    rng: &mut Rng,
    failures: &Failures,
) {
    Failures::count(&failures.gets);
    if conn.reused() {
        Failures::count(&failures.reused);
    }
    let fate = rng.below(100);
    if fate < 15 {
        return; // dropped unused
    }
    if fate < 30 {
        connector.release(conn); // released unused
        return;
    }
    let reused = conn.reused();
    let exchange = async {
        conn.write_all(format!("GET / HTTP/1.1\r\nHost: {}\r\n\r\n", key.sni).as_bytes())
            .await?;
        conn.flush().await?;
        read_response(&mut conn).await
    };
    match tokio::time::timeout(Duration::from_secs(10), exchange).await {
        Err(_) => failures.note(format!("{}: request hung", key.sni)),
        Ok(Err(e)) => match Error::from_io(&e) {
            Some(err) if reused && err.reused() && err.retryable() => {
                Failures::count(&failures.reused_errors);
            }
            // The upstream dropped the request on a fresh connection: a plain I/O error.
            None if !reused => Failures::count(&failures.fresh_errors),
            _ => failures.note(format!(
                "{}: untyped request failure (reused={reused}): {e:?}",
                key.sni
            )),
        },
        Ok(Ok(resp)) => {
            let body = resp.body_str();
            if sni_of(&body) != Some(key.sni.as_str()) {
                failures.note(format!("asked for {}, upstream says {body:?}", key.sni));
            }
            let close = resp
                .header("connection")
                .is_some_and(|v| v.eq_ignore_ascii_case("close"));
            if close || rng.chance(300) {
                drop(conn);
            } else {
                connector.release(conn);
            }
        }
    }
}

async fn task(connector: Connector, keys: Arc<Vec<Key>>, failures: Arc<Failures>, seed: u64) {
    let mut rng = Rng::new(seed);
    for _ in 0..OPS_PER_TASK {
        // Key 0 is hot, so its cap and queue are contended.
        let key = &keys[if rng.chance(600) {
            0
        } else {
            rng.below(KEYS as u64) as usize
        }];
        if rng.chance(150) {
            // Give up on `get` after 0–3 ms: mid-wait or mid-dial.
            let limit = Duration::from_micros(rng.below(3000));
            match tokio::time::timeout(limit, connector.get(&key.peer)).await {
                Err(_) => Failures::count(&failures.cancelled),
                Ok(Ok(conn)) => use_connection(&connector, key, conn, &mut rng, &failures).await,
                Ok(Err(e)) if e.kind() == ErrorKind::PoolTimedout => {
                    Failures::count(&failures.pool_timeouts)
                }
                Ok(Err(e)) => failures.note(format!("get: {e:?}")),
            }
        } else {
            match tokio::time::timeout(Duration::from_secs(10), connector.get(&key.peer)).await {
                Err(_) => failures.note(format!("{}: get hung", key.sni)),
                Ok(Ok(conn)) => use_connection(&connector, key, conn, &mut rng, &failures).await,
                Ok(Err(e)) if e.kind() == ErrorKind::PoolTimedout => {
                    Failures::count(&failures.pool_timeouts)
                }
                Ok(Err(e)) => failures.note(format!("get: {e:?}")),
            }
        }
        if rng.chance(200) {
            tokio::time::sleep(Duration::from_micros(rng.below(2000))).await;
        } else {
            tokio::task::yield_now().await;
        }
    }
}

async fn sample(connector: &Connector, keys: &[Key], round: &Round, failures: &Failures) {
    let idle = connector.idle_count();
    if idle > round.max_idle_total + IDLE_TOTAL_SLACK {
        failures.note(format!(
            "idle_count {idle} > max_idle_total {}",
            round.max_idle_total
        ));
    }
    for key in keys {
        let total = connector.connection_count_for(&key.peer);
        let idle = connector.idle_count_for(&key.peer);
        if total > round.cap || idle > round.max_idle_per_peer {
            failures.note(format!("{}: {total} connections, {idle} idle", key.sni));
        }
    }
}

async fn run_round(round: &Round) {
    let server = ChaosServer::start(
        Chaos {
            idle_close: Some((Duration::from_millis(20), Duration::from_millis(300))),
            polite_idle_close: 500,
            close_after_response: 50,
            drop_request: 20,
            max_delay: Duration::from_millis(1),
            ..Chaos::default()
        },
        round.seed,
    );
    let ca = TestPki::shared().ca_a();
    let keys: Arc<Vec<Key>> = Arc::new(
        (0..KEYS)
            .map(|k| {
                let sni = format!("k{k}.r{}.interleave.test", round.seed % 1000);
                let peer = Peer::tls(server.addr(), sni.clone())
                    .with_ca(ca.clone())
                    .with_alternative_cn("localhost")
                    .with_group(format!("g{k}"));
                Key { peer, sni }
            })
            .collect(),
    );
    let mut options = ConnectorOptions::default();
    options.max_connections_per_peer = Some(round.cap);
    options.max_idle_per_peer = round.max_idle_per_peer;
    options.max_idle_total = round.max_idle_total;
    options.wait_timeout = round.wait_timeout;
    options.idle_timeout = round.idle_timeout;
    options.reap_interval = round.reap_interval;
    options.total_connection_timeout = Duration::from_secs(5);
    let connector = Connector::new(options).unwrap();
    let failures = Arc::new(Failures::default());

    let mut seeds = Rng::new(round.seed ^ 0x5eed);
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            tokio::spawn(task(
                connector.clone(),
                Arc::clone(&keys),
                Arc::clone(&failures),
                seeds.next(),
            ))
        })
        .collect();
    let sampler = {
        let (connector, keys, failures, round) = (
            connector.clone(),
            Arc::clone(&keys),
            Arc::clone(&failures),
            round.clone(),
        );
        tokio::spawn(async move {
            loop {
                sample(&connector, &keys, &round, &failures).await;
                tokio::time::sleep(Duration::from_micros(500)).await;
            }
        })
    };
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("task hung")
            .expect("task panicked");
    }
    sampler.abort();

    // Background dials of cancelled gets finish (pooled or failed) within the total
    // connection timeout; then every slot left must be an idle connection.
    let settled = wait_until(Duration::from_secs(6), || {
        keys.iter()
            .all(|k| connector.connection_count_for(&k.peer) == connector.idle_count_for(&k.peer))
    })
    .await;
    let counts: Vec<_> = keys
        .iter()
        .map(|k| {
            (
                connector.connection_count_for(&k.peer),
                connector.idle_count_for(&k.peer),
            )
        })
        .collect();
    assert!(
        settled,
        "{round:?}: slots leaked: (connections, idle) per key = {counts:?}"
    );
    let idle: usize = counts.iter().map(|c| c.1).sum();
    assert_eq!(connector.idle_count(), idle, "{round:?}");
    assert!(
        idle <= round.max_idle_total,
        "{round:?}: {idle} idle at rest"
    );
    assert_eq!(
        gauge(upstream_pool::metrics::ACTIVE_CONNECTIONS),
        0.0,
        "{round:?}: active gauge"
    );
    assert_eq!(
        gauge(upstream_pool::metrics::IDLE_CONNECTIONS),
        idle as f64,
        "{round:?}: idle gauge"
    );

    let counts = [
        failures.gets.load(Ordering::Relaxed),
        failures.reused.load(Ordering::Relaxed),
        failures.pool_timeouts.load(Ordering::Relaxed),
        failures.cancelled.load(Ordering::Relaxed),
        failures.reused_errors.load(Ordering::Relaxed),
        failures.fresh_errors.load(Ordering::Relaxed),
    ];
    eprintln!(
        "{round:?}: {COUNTS} = {counts:?}, \
         upstream accepted {}",
        server.stats().accepted.load(Ordering::Relaxed)
    );
    for (total, n) in lock(&TOTALS).iter_mut().zip(counts) {
        *total += n;
    }
    let failures = lock(&failures.list).clone();
    assert!(failures.is_empty(), "{round:?}: {failures:#?}");
    let (max, sni) = server.max_in_flight();
    assert!(
        max <= round.cap,
        "{round:?}: upstream saw {max} requests in flight for {sni}"
    );
    assert!(
        server.stats().requests.load(Ordering::Relaxed) > 0,
        "{round:?}: no request made"
    );

    drop(connector);
    let closed = wait_until(Duration::from_secs(5), || {
        server.stats().open.load(Ordering::Relaxed) == 0
    })
    .await;
    assert!(
        closed,
        "{round:?}: the upstream still sees open connections after the connector went"
    );
    assert_eq!(
        gauge(upstream_pool::metrics::ACTIVE_CONNECTIONS),
        0.0,
        "{round:?}"
    );
    assert_eq!(
        gauge(upstream_pool::metrics::IDLE_CONNECTIONS),
        0.0,
        "{round:?}"
    );
}

#[test]
fn pool_accounting_survives_random_interleavings() {
    snapshotter();
    let fixed = std::env::var("UPSTREAM_POOL_INTERLEAVING_SEED")
        .ok()
        .and_then(|s| s.parse::<u64>().ok());
    let base = fixed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    });
    // The first runtime with I/O creates tokio's process-wide signal pipe (two descriptors,
    // kept for the life of the process); count from after that.
    drop(
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap(),
    );
    let fds_start = open_fds();
    let mut rounds = 0;
    for (i, cap) in [1usize, 2, 3, 1, 2, 3].into_iter().enumerate() {
        for multi_thread in [false, true] {
            let seed = if fixed.is_some() {
                base
            } else {
                base.wrapping_add(i as u64 * 2 + multi_thread as u64)
            };
            let round = Round::new(seed, cap, multi_thread);
            let runtime = if round.multi_thread {
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(WORKERS)
                    .enable_all()
                    .build()
            } else {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
            }
            .unwrap();
            runtime.block_on(async {
                tokio::time::timeout(Duration::from_secs(90), run_round(&round))
                    .await
                    .unwrap_or_else(|_| panic!("{round:?}: round hung"));
            });
            drop(runtime);
            rounds += 1;
            let fds = open_fds();
            assert!(
                fds <= fds_start,
                "{round:?}: {} file descriptors leaked",
                fds - fds_start
            );
        }
    }
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "something panicked");
    assert_eq!(rounds, 12);
    let totals = *lock(&TOTALS);
    assert!(
        totals.iter().all(|n| *n > 0),
        "some path was never taken: {COUNTS} = {totals:?}"
    );
}
