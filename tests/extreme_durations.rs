//! `Duration::MAX` (and other huge durations) in every timeout and interval (issue 14, point
//! 4): each gives either a working connector or `InvalidConfig`, never a panic (on any thread:
//! the dial task and the reaper run on runtime workers) nor an `Internal` error.
//!
//! In a binary of its own because it installs a process-wide panic hook.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use upstream_pool::{Connector, ConnectorOptions, ErrorKind, Peer};

use support::certs::TestPki;
use support::client::http_get;
use support::server::TestServer;

static PANICS: AtomicUsize = AtomicUsize::new(0);

fn count_panics() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        previous(info);
    }));
}

type Case = (&'static str, fn(&mut ConnectorOptions), fn(Peer) -> Peer);

fn cases() -> Vec<Case> {
    const MAX: Duration = Duration::MAX;
    vec![
        ("connection_timeout", |o| o.connection_timeout = MAX, |p| p),
        (
            "total_connection_timeout",
            |o| o.total_connection_timeout = MAX,
            |p| p,
        ),
        ("idle_timeout", |o| o.idle_timeout = MAX, |p| p),
        ("reap_interval", |o| o.reap_interval = MAX, |p| p),
        ("max_lifetime", |o| o.max_lifetime = Some(MAX), |p| p),
        (
            "wait_timeout",
            |o| {
                o.wait_timeout = MAX;
                o.max_connections_per_peer = Some(1);
            },
            |p| p,
        ),
        (
            "session_max_auth_age",
            |o| o.session_max_auth_age = MAX,
            |p| p,
        ),
        (
            "peer connection timeout",
            |_| {},
            |p| p.with_connection_timeout(MAX),
        ),
        (
            "peer total connection timeout",
            |_| {},
            |p| p.with_total_connection_timeout(MAX),
        ),
        ("peer idle timeout", |_| {}, |p| p.with_idle_timeout(MAX)),
        (
            "everything at once",
            |o| {
                o.connection_timeout = MAX;
                o.total_connection_timeout = MAX;
                o.idle_timeout = MAX;
                o.reap_interval = MAX;
                o.max_lifetime = Some(MAX);
                o.wait_timeout = MAX;
                o.session_max_auth_age = MAX;
            },
            |p| {
                p.with_connection_timeout(MAX)
                    .with_total_connection_timeout(MAX)
                    .with_idle_timeout(MAX)
            },
        ),
    ]
}

/// get, release, get (reused), with a waiter at the cap when there is one; the server must
/// see one connection and two requests.
async fn exercise(name: &str, connector: &Connector, peer: &Peer, server: &TestServer) {
    let mut conn = connector
        .get(peer)
        .await
        .unwrap_or_else(|e| panic!("{name}: first get failed: {e} ({:?})", e.kind()));
    let response = http_get(&mut conn, "localhost").await.unwrap();
    assert_eq!(response.status, 200, "{name}");
    // A second get while the first connection is out: with a cap of 1 it waits (with
    // `wait_timeout = MAX`) until the release below hands the connection over.
    let waiter = connector.options().max_connections_per_peer.map(|_| {
        let (connector, peer) = (connector.clone(), peer.clone());
        tokio::spawn(async move { connector.get(&peer).await })
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    connector.release(conn);
    let mut conn = match waiter {
        Some(waiter) => waiter.await.unwrap().unwrap(),
        None => connector.get(peer).await.unwrap(),
    };
    assert!(
        conn.reused(),
        "{name}: the released connection was not reused"
    );
    let response = http_get(&mut conn, "localhost").await.unwrap();
    assert_eq!(response.status, 200, "{name}");
    connector.release(conn);
    let stats = server.wait_for(|s| s.requests == 2).await;
    assert_eq!(stats.accepted, 1, "{name}: {stats:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duration_max_never_panics() {
    count_panics();
    let pki = TestPki::shared();
    for (name, options, peer_settings) in cases() {
        let server = TestServer::builder().start();
        let mut opts = ConnectorOptions::default();
        options(&mut opts);
        let connector = match Connector::new(opts) {
            Ok(connector) => connector,
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{name}: {e}");
                continue;
            }
        };
        let addr: SocketAddr = server.addr();
        let peer = peer_settings(Peer::tls(addr, "localhost").with_ca(pki.ca_a()));
        exercise(name, &connector, &peer, &server).await;
        // Let the reaper run a few passes (default interval 250 ms; the first runs at once).
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            PANICS.load(Ordering::SeqCst),
            0,
            "{name}: a thread panicked"
        );
        drop(connector);
    }
    // A plaintext peer takes the same path through the dial, without the handshake.
    let plain = TestServer::builder().plaintext().start();
    let mut opts = ConnectorOptions::default();
    opts.connection_timeout = Duration::MAX;
    opts.total_connection_timeout = Duration::MAX;
    let connector = Connector::new(opts).unwrap();
    let conn = connector.get(&Peer::tcp(plain.addr())).await.unwrap();
    connector.release(conn);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "a thread panicked");
}
