//! Load and soak: thousands of tasks over hundreds of peer keys against in-process TLS
//! upstreams that randomly delay, close and reset ([`Chaos::soak`]).
//!
//! Asserted throughout: no panic anywhere (a panic hook counts them, spawned tasks
//! included); no connection ever serves another key's request (every key has its own SNI and
//! the upstream echoes the SNI of the handshake the connection was made with); every failure
//! typed (`get` errors have an expected [`ErrorKind`]; I/O errors on reused connections carry
//! our `Error`, reused and retryable); the pool's caps hold at every sample (idle per key,
//! idle total, connections per key) and, on the upstream's side, a key never has more
//! requests in flight than `max_connections_per_peer`; file descriptors return to the
//! starting count at the midpoint and at the end, and RSS does not grow between the two.
//!
//! Runs ~16 s of load by default (CI). Longer: `UPSTREAM_POOL_SOAK_SECS=600 cargo test --release
//! --test soak -- --nocapture` (prints a summary of each half).

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once, PoisonError};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::task::JoinHandle;
use upstream_pool::{Connector, ConnectorOptions, Error, ErrorKind, Peer};

use support::certs::TestPki;
use support::chaos::{self, sni_of, Chaos, ChaosServer, Rng};
use support::client::read_response;
use support::{open_fds, wait_for_open_fds, wait_until};

const SERVERS: usize = 20;
const GROUPS_PER_SERVER: usize = 10;
const TASKS: usize = 2000;
const MAX_CONNECTIONS_PER_PEER: usize = 4;
const MAX_IDLE_PER_PEER: usize = 2;
/// Below keys × idle-per-key, so the global LRU eviction runs all the time.
const MAX_IDLE_TOTAL: usize = 100;
/// Default total run time; `UPSTREAM_POOL_SOAK_SECS` overrides.
const DEFAULT_SECS: u64 = 16;

static PANICS: AtomicUsize = AtomicUsize::new(0);

fn count_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            default(info);
        }));
    });
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One peer key: its own SNI (verified through the alternative CN `localhost`) and group tag.
#[derive(Clone)]
struct Key {
    peer: Peer,
    sni: String,
}

fn keys(servers: &[ChaosServer]) -> Vec<Key> {
    let ca = TestPki::shared().ca_a();
    let mut keys = Vec::new();
    for (s, server) in servers.iter().enumerate() {
        for g in 0..GROUPS_PER_SERVER {
            let sni = format!("g{g}.s{s}.soak.test");
            let peer = Peer::tls(server.addr(), sni.clone())
                .with_ca(ca.clone())
                .with_alternative_cn("localhost")
                .with_group(format!("tenant-{g}"));
            keys.push(Key { peer, sni });
        }
    }
    keys
}

/// Everything the load tasks count. Failures that must never happen are separate fields so
/// the final assertion names them.
#[derive(Debug, Default)]
struct Tally {
    requests_ok: AtomicU64,
    reused_ok: AtomicU64,
    get_cancelled: AtomicU64,
    fresh_io_errors: AtomicU64,
    reused_retryable_errors: AtomicU64,
    /// Per kind: how many, and the first message (for the summary).
    get_errors: Mutex<HashMap<ErrorKind, (u64, String)>>,
    // Must stay zero / empty:
    wrong_key: Mutex<Vec<String>>,
    untyped: Mutex<Vec<String>>,
    hangs: AtomicU64,
    cap_violations: Mutex<Vec<String>>,
}

impl Tally {
    fn note(list: &Mutex<Vec<String>>, what: String) {
        let mut list = lock(list);
        if list.len() < 20 {
            list.push(what);
        }
    }
}

/// `get` errors a misbehaving upstream or a full pool can cause. `Internal`, `InvalidConfig`
/// and `InvalidCert` would be bugs here.
const EXPECTED_GET_ERRORS: &[ErrorKind] = &[
    ErrorKind::ConnectError,
    ErrorKind::ConnectRefused,
    ErrorKind::ConnectTimedout,
    ErrorKind::TlsHandshakeFailure,
    ErrorKind::TlsHandshakeTimedout,
    ErrorKind::PoolTimedout,
];

/// Bound on any single step; reaching it counts as a hang.
const STEP: Duration = Duration::from_secs(15);

async fn load_task(
    connector: Connector,
    keys: Arc<Vec<Key>>,
    tally: Arc<Tally>,
    seed: u64,
    until: Instant,
) {
    let mut rng = Rng::new(seed);
    while Instant::now() < until {
        // A few hot keys get a fifth of the traffic, so their caps and wait queues are busy.
        let k = if rng.chance(200) {
            rng.below(5) as usize
        } else {
            rng.below(keys.len() as u64) as usize
        };
        let key = &keys[k];

        // Now and then a caller gives up on `get` almost at once (mid-dial or mid-wait).
        let limit = if rng.chance(20) {
            Duration::from_millis(1)
        } else {
            STEP
        };
        let mut conn = match tokio::time::timeout(limit, connector.get(&key.peer)).await {
            Err(_) if limit < STEP => {
                tally.get_cancelled.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            Err(_) => {
                tally.hangs.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            Ok(Err(e)) => {
                if EXPECTED_GET_ERRORS.contains(&e.kind()) {
                    let mut errors = lock(&tally.get_errors);
                    let entry = errors.entry(e.kind()).or_insert_with(|| (0, e.to_string()));
                    entry.0 += 1;
                } else {
                    Tally::note(&tally.untyped, format!("get: {e:?}"));
                }
                continue;
            }
            Ok(Ok(conn)) => conn,
        };
        let reused = conn.reused();
        let exchange = async {
            conn.write_all(format!("GET / HTTP/1.1\r\nHost: {}\r\n\r\n", key.sni).as_bytes())
                .await?;
            conn.flush().await?;
            read_response(&mut conn).await
        };
        let resp = match tokio::time::timeout(STEP, exchange).await {
            Err(_) => {
                tally.hangs.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            Ok(Err(e)) => {
                match Error::from_io(&e) {
                    Some(err) if reused && err.reused() && err.retryable() => {
                        tally
                            .reused_retryable_errors
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    // A reused connection's failure before any byte must say so.
                    _ if reused => Tally::note(&tally.untyped, format!("reused I/O: {e:?}")),
                    // A fresh connection the upstream dropped: a plain I/O error.
                    _ => {
                        tally.fresh_io_errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                continue;
            }
            Ok(Ok(resp)) => resp,
        };
        let body = resp.body_str();
        let sni_seen = sni_of(&body).unwrap_or("<none>");
        if resp.status != 200 || sni_seen != key.sni {
            Tally::note(
                &tally.wrong_key,
                format!(
                    "asked for {} (reused={reused}), upstream says {body:?}",
                    key.sni
                ),
            );
        }
        tally.requests_ok.fetch_add(1, Ordering::Relaxed);
        if reused {
            tally.reused_ok.fetch_add(1, Ordering::Relaxed);
        }
        let close = resp
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"));
        if close || rng.chance(100) {
            drop(conn);
        } else {
            connector.release(conn);
        }
        if rng.chance(300) {
            tokio::time::sleep(Duration::from_millis(rng.below(5))).await;
        }
    }
}

/// Samples the pool's counts every 10 ms until `until`; records any cap exceeded. Returns the
/// largest idle total seen.
async fn sampler(
    connector: Connector,
    keys: Arc<Vec<Key>>,
    tally: Arc<Tally>,
    until: Instant,
) -> usize {
    let mut max_idle_total = 0;
    while Instant::now() < until {
        let idle = connector.idle_count();
        max_idle_total = max_idle_total.max(idle);
        if idle > MAX_IDLE_TOTAL + IDLE_TOTAL_SLACK {
            Tally::note(
                &tally.cap_violations,
                format!("idle_count {idle} > {MAX_IDLE_TOTAL}"),
            );
        }
        for key in keys.iter() {
            let total = connector.connection_count_for(&key.peer);
            let idle = connector.idle_count_for(&key.peer);
            if total > MAX_CONNECTIONS_PER_PEER || idle > MAX_IDLE_PER_PEER {
                Tally::note(
                    &tally.cap_violations,
                    format!("{}: {total} connections, {idle} idle", key.sni),
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    max_idle_total
}

/// `release` pushes a connection before it evicts the least recently used one beyond
/// `max_idle_total`, so a sample can see one extra idle connection per thread releasing at
/// that instant (the runtime's worker threads). Checked exactly once the load stops.
const IDLE_TOTAL_SLACK: usize = WORKERS;
const WORKERS: usize = 2;

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Waits until nothing is idle in the pool and no upstream has a connection open.
async fn quiesce(connector: &Connector, servers: &[ChaosServer]) {
    let idle = wait_until(Duration::from_secs(20), || connector.idle_count() == 0).await;
    assert!(
        idle,
        "idle connections never expired: {}",
        connector.idle_count()
    );
    let closed = wait_until(Duration::from_secs(20), || {
        servers
            .iter()
            .all(|s| s.stats().open.load(Ordering::Relaxed) == 0)
    })
    .await;
    assert!(
        closed,
        "upstreams still see open connections after the pool emptied"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_many_tasks_many_keys_chaotic_upstreams() {
    count_panics();
    let total_secs = std::env::var("UPSTREAM_POOL_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(DEFAULT_SECS)
        .max(2);
    let half = Duration::from_secs(total_secs) / 2;
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    println!(
        "soak: {total_secs} s, seed {seed}, {TASKS} tasks, {} keys",
        SERVERS * GROUPS_PER_SERVER
    );

    let ctx = chaos::context();
    let servers: Vec<ChaosServer> = (0..SERVERS)
        .map(|i| ChaosServer::start_with(ctx.clone(), Chaos::soak(), seed ^ (i as u64 + 1)))
        .collect();
    let keys = Arc::new(keys(&servers));
    let mut options = ConnectorOptions::default();
    options.max_connections_per_peer = Some(MAX_CONNECTIONS_PER_PEER);
    options.max_idle_per_peer = MAX_IDLE_PER_PEER;
    options.max_idle_total = MAX_IDLE_TOTAL;
    options.wait_timeout = Duration::from_secs(2);
    options.idle_timeout = Duration::from_secs(1);
    options.reap_interval = Duration::from_millis(100);
    let connector = Connector::new(options).unwrap();
    let tally = Arc::new(Tally::default());

    // Baseline with servers listening and the PKI built, before any connection.
    let fds_start = open_fds();
    let mut rss = Vec::new();
    let mut phase_seed = seed;
    for phase in ["first half", "second half"] {
        let until = Instant::now() + half;
        let started = Instant::now();
        let sampler = tokio::spawn(sampler(
            connector.clone(),
            Arc::clone(&keys),
            Arc::clone(&tally),
            until,
        ));
        let tasks: Vec<JoinHandle<()>> = (0..TASKS)
            .map(|_| {
                phase_seed = Rng::new(phase_seed).next();
                tokio::spawn(load_task(
                    connector.clone(),
                    Arc::clone(&keys),
                    Arc::clone(&tally),
                    phase_seed,
                    until,
                ))
            })
            .collect();
        for task in tasks {
            // Each task stops starting work at `until`; its last step is bounded by STEP.
            let deadline = tokio::time::Instant::from_std(until) + STEP * 2;
            if let Err(e) = tokio::time::timeout_at(deadline, task)
                .await
                .expect("load task hung")
            {
                panic!("load task failed: {e}");
            }
        }
        let max_idle_seen = sampler.await.unwrap();
        let under_load = started.elapsed();

        // At rest the caps hold exactly.
        assert!(
            connector.idle_count() <= MAX_IDLE_TOTAL,
            "{}",
            connector.idle_count()
        );
        quiesce(&connector, &servers).await;
        let fds = wait_for_open_fds(fds_start, Duration::from_secs(10)).await;
        rss.push(rss_kib());
        println!(
            "soak {phase}: {under_load:?}, {} ok ({} on reused), {} cancelled gets, get errors {:?}, \
             {} fresh I/O errors, {} retryable reused errors, max idle seen {max_idle_seen}, \
             fds {fds} (start {fds_start}), rss {} KiB, upstreams: {} accepted, {} handshakes, {} requests",
            tally.requests_ok.load(Ordering::Relaxed),
            tally.reused_ok.load(Ordering::Relaxed),
            tally.get_cancelled.load(Ordering::Relaxed),
            lock(&tally.get_errors),
            tally.fresh_io_errors.load(Ordering::Relaxed),
            tally.reused_retryable_errors.load(Ordering::Relaxed),
            rss.last().unwrap(),
            servers.iter().map(|s| s.stats().accepted.load(Ordering::Relaxed)).sum::<usize>(),
            servers.iter().map(|s| s.stats().handshakes.load(Ordering::Relaxed)).sum::<usize>(),
            servers.iter().map(|s| s.stats().requests.load(Ordering::Relaxed)).sum::<usize>(),
        );
        assert!(
            fds <= fds_start,
            "{phase}: {} descriptors leaked",
            fds - fds_start
        );
        for key in keys.iter() {
            assert_eq!(
                connector.connection_count_for(&key.peer),
                0,
                "{}: slots leaked",
                key.sni
            );
        }
    }

    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "something panicked");
    assert_eq!(
        tally.hangs.load(Ordering::Relaxed),
        0,
        "steps hung for {STEP:?}"
    );
    assert!(
        lock(&tally.wrong_key).is_empty(),
        "wrong-key reuse: {:#?}",
        lock(&tally.wrong_key)
    );
    assert!(
        lock(&tally.untyped).is_empty(),
        "untyped errors: {:#?}",
        lock(&tally.untyped)
    );
    assert!(
        lock(&tally.cap_violations).is_empty(),
        "caps exceeded: {:#?}",
        lock(&tally.cap_violations)
    );
    for server in &servers {
        let (max, sni) = server.max_in_flight();
        assert!(
            max <= MAX_CONNECTIONS_PER_PEER,
            "upstream saw {max} concurrent requests for {sni} (cap {MAX_CONNECTIONS_PER_PEER})"
        );
    }
    // The load must have done something worth asserting about.
    let ok = tally.requests_ok.load(Ordering::Relaxed);
    assert!(ok >= 1000, "only {ok} requests succeeded");
    assert!(
        tally.reused_ok.load(Ordering::Relaxed) > 0,
        "nothing was reused"
    );
    assert!(
        tally.reused_retryable_errors.load(Ordering::Relaxed)
            + tally.fresh_io_errors.load(Ordering::Relaxed)
            > 0,
        "no fault was hit"
    );
    // Memory: the second half may not grow the process beyond noise (allocator caches,
    // session-cache churn).
    let (mid, end) = (rss[0], rss[1]);
    assert!(
        end <= mid + mid / 10 + 16 * 1024,
        "RSS grew from {mid} KiB at the midpoint to {end} KiB at the end"
    );
}
