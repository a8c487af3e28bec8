//! TLS connections through the pool against the in-process OpenSSL upstream of
//! `benches/common/tls.rs` (its own thread and runtime):
//!
//! - `pooled/<version>/reused`: `Connector::get` on a pooled idle TLS connection +
//!   `Connector::release` (the hit path over TLS: the liveness check also asks OpenSSL for
//!   buffered bytes).
//! - `request/<version>`: one request/response (`GET /`, 2-byte body) over a pooled connection
//!   (`get` + exchange + `release`) vs over a directly held `tokio-openssl` stream with no pool
//!   (`direct`), and over the direct stream followed by the one-byte non-blocking read a pool
//!   makes before reusing a connection (`direct_probed`: after a response is read to its last
//!   byte the socket still looks readable, so this is one `recv` returning `EAGAIN`). The
//!   difference is the pool's overhead per request. Then a paired run
//!   alternates the three in rounds and prints the median ratios, which is steadier on a noisy
//!   machine than two separate criterion estimates.
//!
//! New connections (full vs resumed handshakes, TLS 1.2 and 1.3) are measured by
//! `benches/resumption.rs`. Metrics are on (`common::install_recorder`) for every connector
//! here.
//!
//! ```text
//! cargo bench --bench connect
//! ```

mod common;

use std::time::{Duration, Instant};

use criterion::Criterion;
use openssl::ssl::SslVersion;
use tokio::runtime::Runtime;
use upstream_pool::{Connector, Peer};

use common::certs::TestPki;
use common::tls::{direct_connect, direct_connector, exchange, probe, TlsUpstream};

/// Rounds of the paired overhead measurement (`UPSTREAM_POOL_BENCH_ROUNDS` overrides it), and
/// exchanges per variant per round.
const PAIRED_ROUNDS: usize = 21;
const PAIRED_BATCH: u32 = 500;

fn main() {
    common::child::run_if_child();
    common::install_recorder();
    common::print_header("connect");
    let pki = TestPki::new();
    let rt = common::hit::current_thread();
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30)
        .configure_from_args();

    for (version, name) in [
        (SslVersion::TLS1_2, "TLSv1.2"),
        (SslVersion::TLS1_3, "TLSv1.3"),
    ] {
        let upstream = TlsUpstream::start(&pki.server, Some(version));
        let peer = Peer::tls(upstream.addr(), "localhost").with_ca(pki.ca_a());
        let connector =
            Connector::new(common::hit::options(1)).expect("connector with caps and metrics");
        // One pooled connection, used for one exchange first so that TLS 1.3 tickets have
        // been read and nothing is pending on it.
        rt.block_on(async {
            let mut conn = connector.get(&peer).await.expect("dial");
            exchange(&mut conn).await.expect("first exchange");
            connector.release(conn);
        });
        assert_eq!(connector.idle_count(), 1);

        if common::selected(&format!("pooled/{name}/reused")) {
            let mut group = c.benchmark_group(format!("pooled/{name}"));
            group.bench_function("reused", |b| {
                b.to_async(&rt).iter(|| async {
                    let conn = connector.get(&peer).await.expect("get");
                    assert!(conn.reused(), "the pooled connection was not reused");
                    connector.release(conn);
                })
            });
            group.finish();
        }

        if common::selected(&format!("request/{name}"))
            || common::selected(&format!("request/{name}/paired"))
        {
            request_overhead(&mut c, &rt, &pki, &upstream, &connector, &peer, name);
        }
        let stats = upstream.stats();
        eprintln!(
            "[connect] {name}: server saw {} handshakes ({} resumed) and {} requests; the \
             connector ended with {} idle",
            stats.handshakes.load(std::sync::atomic::Ordering::Relaxed),
            stats.resumed.load(std::sync::atomic::Ordering::Relaxed),
            stats.requests.load(std::sync::atomic::Ordering::Relaxed),
            connector.idle_count(),
        );
    }
    c.final_summary();
}

fn request_overhead(
    c: &mut Criterion,
    rt: &Runtime,
    pki: &TestPki,
    upstream: &TlsUpstream,
    connector: &Connector,
    peer: &Peer,
    name: &str,
) {
    let direct_tls = direct_connector(&pki.ca_a());
    let mut direct = rt
        .block_on(direct_connect(&direct_tls, upstream.addr()))
        .expect("direct connection");
    rt.block_on(exchange(&mut direct))
        .expect("first direct exchange");

    let mut group = c.benchmark_group(format!("request/{name}"));
    group.bench_function("direct", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    exchange(&mut direct).await.expect("direct exchange");
                }
                start.elapsed()
            })
        })
    });
    group.bench_function("direct_probed", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    exchange(&mut direct).await.expect("direct exchange");
                    assert!(probe(&mut direct), "the direct stream is not clean");
                }
                start.elapsed()
            })
        })
    });
    group.bench_function("pooled", |b| {
        b.iter_custom(|iters| rt.block_on(pooled_exchanges(connector, peer, iters)))
    });
    group.finish();

    if !common::selected(&format!("request/{name}/paired")) {
        return;
    }
    // Paired: the three variants in rounds, the order rotating from round to round, so all
    // see the same machine load; medians of the per-round ratios.
    let rounds = std::env::var("UPSTREAM_POOL_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(PAIRED_ROUNDS);
    let mut pooled_direct = Vec::with_capacity(rounds);
    let mut probed_direct = Vec::with_capacity(rounds);
    let mut direct_us = Vec::with_capacity(rounds);
    for round in 0..rounds {
        let mut took = [Duration::ZERO; 3];
        for k in 0..3 {
            let variant = (round + k) % 3;
            took[variant] = rt.block_on(async {
                let start = Instant::now();
                for _ in 0..PAIRED_BATCH {
                    match variant {
                        0 => exchange(&mut direct).await.expect("direct exchange"),
                        1 => {
                            exchange(&mut direct).await.expect("direct exchange");
                            assert!(probe(&mut direct), "the direct stream is not clean");
                        }
                        _ => {
                            let mut conn = connector.get(peer).await.expect("get");
                            exchange(&mut conn).await.expect("pooled exchange");
                            connector.release(conn);
                        }
                    }
                }
                start.elapsed()
            });
        }
        let [d, probed, pooled] = took.map(|t| t.as_secs_f64());
        pooled_direct.push(pooled / d);
        direct_us.push(d * 1e6 / f64::from(PAIRED_BATCH));
        probed_direct.push(probed / d);
    }
    direct_us.sort_by(f64::total_cmp);
    let rtt = direct_us[direct_us.len() / 2];
    for (label, ratios) in [
        ("pooled/direct", &mut pooled_direct),
        ("direct_probed/direct", &mut probed_direct),
    ] {
        ratios.sort_by(f64::total_cmp);
        let median = ratios[ratios.len() / 2];
        eprintln!(
            "[connect] request/{name} paired: {label} median {median:.4} ({:+.2}%, {:+.2} us on a \
             {rtt:.1} us exchange), quartiles {:.4}..{:.4} over {rounds} rounds of \
             {PAIRED_BATCH} exchanges each",
            (median - 1.0) * 100.0,
            (median - 1.0) * rtt,
            ratios[ratios.len() / 4],
            ratios[ratios.len() * 3 / 4],
        );
    }
    assert_eq!(connector.idle_count(), 1, "the pooled connection was lost");
}

/// `iters` times: get the pooled connection, one exchange, release it. Returns the time.
async fn pooled_exchanges(connector: &Connector, peer: &Peer, iters: u64) -> Duration {
    let start = Instant::now();
    for _ in 0..iters {
        let mut conn = connector.get(peer).await.expect("get");
        exchange(&mut conn).await.expect("pooled exchange");
        connector.release(conn);
    }
    let took = start.elapsed();
    assert_eq!(connector.idle_count(), 1, "the pooled connection was lost");
    took
}
