//! The cost of a new upstream connection with a full TLS handshake vs a resumed one (issue 4),
//! TLS 1.2 and TLS 1.3, against the in-process OpenSSL upstream of `benches/common/tls.rs`
//! (its own thread and runtime; session cache and tickets on).
//!
//! One iteration = `Connector::get` on a pool miss (TCP connect + handshake) and dropping the
//! connection (closed, never pooled). "full" uses a connector with `session_cache_size = 0`;
//! "resumed" a default connector whose cache was primed by one full handshake. After each
//! measurement the server's own counts are checked, so "resumed" really resumed.
//!
//! ```text
//! cargo bench --bench resumption -- --warm-up-time 1 --measurement-time 5
//! ```

mod common;

use std::time::Duration;

use criterion::Criterion;
use openssl::ssl::SslVersion;
use upstream_pool::{Connector, ConnectorOptions, Peer};

use common::certs::TestPki;
use common::tls::{exchange, TlsUpstream};

fn main() {
    common::print_header("resumption");
    let pki = TestPki::new();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("client runtime");
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5))
        .configure_from_args();

    for (version, name) in [
        (SslVersion::TLS1_2, "TLSv1.2"),
        (SslVersion::TLS1_3, "TLSv1.3"),
    ] {
        let upstream = TlsUpstream::start(&pki.server, Some(version));
        let peer = Peer::tls(upstream.addr(), "localhost").with_ca(pki.ca_a());
        let full = Connector::new({
            let mut o = ConnectorOptions::default();
            o.session_cache_size = 0;
            o
        })
        .expect("connector");
        let resuming = Connector::new(ConnectorOptions::default()).expect("connector");

        // Prime the cache: one full handshake and one exchange (TLS 1.3 tickets arrive after
        // the handshake), then check that the next dial resumes.
        runtime.block_on(async {
            let mut conn = resuming.get(&peer).await.expect("first connection");
            exchange(&mut conn).await.expect("exchange");
            drop(conn);
            let conn = resuming.get(&peer).await.expect("second connection");
            assert!(
                conn.digest().is_some_and(|d| d.session_reused),
                "{name}: the primed connector did not resume"
            );
        });

        // The server counts a TLS 1.3 handshake after the client is done with it: let it
        // catch up so the priming handshakes are not counted below.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while load(&upstream.stats().handshakes) < 2 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }

        let mut group = c.benchmark_group(format!("new_connection/{name}"));
        for (label, connector, expect_resumed) in
            [("full", &full, false), ("resumed", &resuming, true)]
        {
            let stats = upstream.stats();
            let before = (load(&stats.handshakes), load(&stats.resumed));
            group.bench_function(label, |b| {
                b.to_async(&runtime).iter(|| async {
                    let conn = connector.get(&peer).await.expect("get");
                    debug_assert!(!conn.reused());
                    drop(conn);
                });
            });
            // Server-side counts trail the client by the last handshake or two.
            std::thread::sleep(Duration::from_millis(100));
            let handshakes = load(&stats.handshakes) - before.0;
            let resumed = load(&stats.resumed) - before.1;
            eprintln!("[resumption] {name} {label}: server saw {handshakes} handshakes, {resumed} resumed");
            if expect_resumed {
                assert!(
                    resumed * 100 >= handshakes * 99,
                    "{name}: only {resumed} of {handshakes} handshakes resumed"
                );
            } else {
                assert_eq!(resumed, 0, "{name}: the full-handshake connector resumed");
            }
        }
        group.finish();
    }
    c.final_summary();
}

fn load(counter: &std::sync::atomic::AtomicU64) -> u64 {
    counter.load(std::sync::atomic::Ordering::Relaxed)
}
