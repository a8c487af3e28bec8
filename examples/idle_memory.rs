//! Memory per idle pooled TLS connection: opens N (default 10,000) TLS connections to an
//! upstream in another process, puts them all in the pool, and reports how much this
//! process's resident set grew per idle connection (`VmRSS` in `/proc/self/status`).
//!
//! ```text
//! cargo run --release --example idle_memory                  # 10,000 connections, resumption on
//! cargo run --release --example idle_memory -- 2000 --full   # 2,000, every handshake full
//! ```
//!
//! The upstream is this same binary re-executed as a child process (`benches/common/child.rs`)
//! that completes the TLS handshake and holds the connection: an `openssl s_server` cannot
//! hold 10,000 connections, and a server in this process would add its own memory to the
//! count. The client uses a current-thread runtime (one malloc arena) and the library's
//! defaults apart from the idle caps, which are raised to fit N, and the idle timeout (10
//! minutes). The baseline is taken after one connection was opened, used and pooled, so
//! one-time allocations (TLS context, CA store, runtime, metric handles) are not counted.
//! Kernel socket buffers are not part of RSS and are not counted either.

#[path = "../benches/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use upstream_pool::{Connector, ConnectorOptions, Peer};

use common::certs::TestPki;
use common::child::{ChildUpstream, Upstream};

/// Dials in flight at once while opening the connections.
const CONCURRENCY: usize = 64;

fn main() {
    common::child::run_if_child();
    let mut n = 10_000usize;
    let mut full = false;
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--full" => full = true,
            other => match other.parse() {
                Ok(v) => n = v,
                Err(_) => {
                    eprintln!("usage: idle_memory [N] [--full]");
                    std::process::exit(2);
                }
            },
        }
    }
    let limit = common::raise_nofile_limit();
    if (limit as usize) < n + 256 {
        eprintln!("the open-file limit is {limit}; {n} connections need about {n} + 256");
        std::process::exit(1);
    }

    let pki = TestPki::new();
    let dir = common::certs_dir();
    let files = pki
        .server
        .write_pem(dir.path(), "server")
        .expect("write the server certificate");
    let upstream = ChildUpstream::spawn(&Upstream::TlsHold {
        chain: files.chain,
        key: files.key,
    })
    .expect("start the child upstream");

    let mut options = ConnectorOptions::default();
    options.max_idle_per_peer = n;
    options.max_idle_total = n;
    options.idle_timeout = Duration::from_secs(600);
    let connector = Connector::new(options).expect("connector");
    let peer = Peer::tls(upstream.addr(), "localhost")
        .with_ca(pki.ca_a())
        .with_session_resumption(!full);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        // Warm up: one connection through the whole cycle, then settle.
        let conn = connector.get(&peer).await.expect("first connection");
        connector.release(conn);
        tokio::time::sleep(Duration::from_millis(600)).await;
        let before = common::rss_kib();

        let start = Instant::now();
        let mut held = Vec::with_capacity(n);
        let mut set = JoinSet::new();
        let mut started = 0;
        while held.len() < n {
            while started < n && set.len() < CONCURRENCY {
                let (c, p) = (connector.clone(), peer.clone());
                set.spawn(async move { c.get(&p).await });
                started += 1;
            }
            let conn = set
                .join_next()
                .await
                .expect("a dial is in flight")
                .expect("join")
                .expect("dial");
            held.push(conn);
        }
        let resumed = held
            .iter()
            .filter(|c| c.digest().is_some_and(|d| d.session_reused))
            .count();
        // The first `get` takes the warm-up connection back out of the pool; the baseline
        // already holds that one.
        let new = held.iter().filter(|c| !c.reused()).count();
        let opened = start.elapsed();
        for conn in held {
            connector.release(conn);
        }
        // Let the reaper pass over every idle connection (it reads TLS 1.3 tickets that
        // arrived after the handshake, after which OpenSSL releases the read buffer).
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let idle = connector.idle_count();
        let after = common::rss_kib();
        let per = (after.saturating_sub(before)) as f64 / new.max(1) as f64;
        println!(
            "idle_memory: {idle} idle TLS connections ({new} new, {resumed} of them resumed, \
             opened in {:.1} s, upstream pid {}): VmRSS {before} KiB -> {after} KiB, {per:.1} \
             KiB per idle connection (target <= 16 KiB)",
            opened.as_secs_f64(),
            upstream.pid(),
        );
        assert_eq!(idle, n, "every connection is idle in the pool");
    });
}
