//! Operating the pool: `Connector::preconnect`, `Peer::with_min_idle`, `stats_for` / `stats`,
//! `evict` / `evict_all`, and `max_lifetime_jitter`.
//!
//! Every test asserts on what the in-process server observed (connections accepted, resumed
//! handshakes, closes), not only on what the connector reports.

mod support;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use upstream_pool::{Connection, Connector, ConnectorOptions, ErrorKind, Peer, PeerStats};

use support::certs::TestPki;
use support::client::http_get;
use support::server::{Behaviour, TestServer};
use support::wait_until;

fn connector(configure: impl FnOnce(&mut ConnectorOptions)) -> Connector {
    let mut options = ConnectorOptions::default();
    configure(&mut options);
    Connector::new(options).unwrap()
}

fn tls_peer(addr: SocketAddr) -> Peer {
    Peer::tls(addr, "localhost").with_ca(TestPki::shared().ca_a())
}

/// A port nothing listens on.
fn refused_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// One HTTP exchange on `conn`; returns the id of the server connection that answered.
async fn exchange(conn: &mut Connection) -> usize {
    let response = http_get(conn, "localhost").await.unwrap();
    assert_eq!(response.status, 200, "{response:?}");
    response
        .conn_id()
        .expect("test server names its connection")
}

#[tokio::test]
async fn preconnect_fills_the_idle_pool_once_and_hands_out_pooled_connections() {
    let server = TestServer::start(Behaviour::Http);
    let peer = tls_peer(server.addr());
    let c = connector(|_| {});

    assert_eq!(c.preconnect(&peer, 4).await.unwrap(), 4);
    server
        .wait_for(|s| s.accepted == 4 && s.handshakes == 4)
        .await;
    assert_eq!(c.idle_count_for(&peer), 4);

    // Already warm: nothing to dial.
    assert_eq!(c.preconnect(&peer, 4).await.unwrap(), 4);
    assert_eq!(c.preconnect(&peer, 2).await.unwrap(), 4);

    let mut held = Vec::new();
    let mut answered = HashSet::new();
    for _ in 0..4 {
        let mut conn = c.get(&peer).await.unwrap();
        assert!(
            conn.reused(),
            "a preconnected connection is handed out as pooled"
        );
        answered.insert(exchange(&mut conn).await);
        held.push(conn);
    }
    assert_eq!(answered.len(), 4, "four distinct upstream connections");
    let stats = server.stats();
    assert_eq!(stats.accepted, 4, "no dial beyond the preconnected four");
    let s = c.stats_for(&peer);
    assert_eq!((s.checkouts_reused, s.checkouts_new, s.in_use), (4, 0, 4));
    assert_eq!(s.handshakes_full + s.handshakes_resumed, 4);
    assert_eq!(s.handshakes_resumed as usize, stats.resumed);
}

#[tokio::test]
async fn preconnect_stops_at_the_connection_cap_and_the_idle_cap() {
    let server = TestServer::start(Behaviour::Http);
    let peer = tls_peer(server.addr());

    let c = connector(|o| o.max_connections_per_peer = Some(2));
    assert_eq!(c.preconnect(&peer, 4).await.unwrap(), 2);
    assert_eq!(c.connection_count_for(&peer), 2);
    server.wait_for(|s| s.handshakes == 2).await;

    let c = connector(|o| o.max_idle_per_peer = 3);
    assert_eq!(c.preconnect(&peer, 10).await.unwrap(), 3);
    server.wait_for(|s| s.handshakes == 5).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(server.stats().accepted, 5, "the caps bound the dials");
}

#[tokio::test]
async fn preconnect_returns_the_first_error_and_pools_what_succeeded() {
    let refused = Peer::tls(refused_addr(), "localhost").with_ca(TestPki::shared().ca_a());
    let c = connector(|_| {});
    let err = c.preconnect(&refused, 3).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectRefused, "{err}");
    assert_eq!(
        c.connection_count_for(&refused),
        0,
        "failed dials free their slots"
    );
    assert_eq!(c.stats_for(&refused).connect_errors, 3);

    // One key's dials fail (untrusted certificate), another's succeed.
    let server = TestServer::start(Behaviour::Http);
    let peer = tls_peer(server.addr());
    let bad = Peer::tls(server.addr(), "localhost"); // system roots: verification fails
    assert_eq!(c.preconnect(&peer, 2).await.unwrap(), 2);
    let err = c.preconnect(&bad, 2).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidCert, "{err}");
    assert_eq!(c.connection_count_for(&bad), 0);
    assert_eq!(
        c.idle_count_for(&peer),
        2,
        "the good key keeps its connections"
    );
    let mut conn = c.get(&peer).await.unwrap();
    assert!(conn.reused());
    exchange(&mut conn).await;
    assert_eq!(server.stats().accepted, 4);
}

#[tokio::test]
async fn min_idle_tops_up_after_first_use_and_after_checkouts_without_runaway() {
    let server = TestServer::start(Behaviour::Http);
    let peer = tls_peer(server.addr()).with_min_idle(3);
    let c = connector(|o| o.reap_interval = Duration::from_millis(20));

    // Nothing before first use.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(server.stats().accepted, 0);

    let mut first = c.get(&peer).await.unwrap();
    exchange(&mut first).await;
    let used = Instant::now();
    assert!(
        wait_until(Duration::from_secs(1), || c.idle_count_for(&peer) == 3).await,
        "3 idle within a second of first use: {:?}",
        c.stats_for(&peer)
    );
    assert!(used.elapsed() < Duration::from_secs(1));
    server
        .wait_for(|s| s.accepted == 4 && s.handshakes == 4)
        .await;

    let mut a = c.get(&peer).await.unwrap();
    let mut b = c.get(&peer).await.unwrap();
    assert!(a.reused() && b.reused());
    exchange(&mut a).await;
    exchange(&mut b).await;
    assert!(
        wait_until(Duration::from_secs(1), || c.idle_count_for(&peer) == 3).await,
        "back to 3 after two checkouts: {:?}",
        c.stats_for(&peer)
    );
    // Quiet for many reaper passes: nothing more is dialled.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stats = server.stats();
    assert_eq!(stats.accepted, 6, "1 first use + 3 + 2 top-ups, no more");
    let s = c.stats_for(&peer);
    assert_eq!((s.idle, s.in_use), (3, 3));
    assert_eq!(s.handshakes_full + s.handshakes_resumed, 6);

    // Releasing brings idle above min_idle: no dial, and none are closed.
    c.release(first);
    c.release(a);
    c.release(b);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(c.idle_count_for(&peer), 6);
    assert_eq!(server.stats().accepted, 6);
}

#[tokio::test]
async fn min_idle_counts_a_released_first_connection() {
    let server = TestServer::start(Behaviour::Http);
    let peer = tls_peer(server.addr()).with_min_idle(3);
    let c = connector(|_| {}); // the default 250 ms reaper interval
    let mut conn = c.get(&peer).await.unwrap();
    exchange(&mut conn).await;
    c.release(conn);
    assert!(wait_until(Duration::from_secs(1), || c.idle_count_for(&peer) == 3).await);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(c.idle_count_for(&peer), 3);
    assert_eq!(server.stats().accepted, 3, "1 used + 2 topped up");
}

#[tokio::test]
async fn min_idle_backs_off_against_a_refused_port_and_a_resetting_server() {
    let c = connector(|o| o.reap_interval = Duration::from_millis(10));
    // Refused: attempts are counted by the connector (nothing listens).
    let refused = Peer::tls(refused_addr(), "localhost")
        .with_ca(TestPki::shared().ca_a())
        .with_min_idle(3);
    // Reset after accept: attempts are counted by the server.
    let rst = TestServer::start(Behaviour::RstAfterAccept);
    let resetting = tls_peer(rst.addr()).with_min_idle(3);

    assert!(c.get(&refused).await.is_err());
    assert!(c.get(&resetting).await.is_err());
    let start = Instant::now();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let errors = c.stats_for(&refused).connect_errors;
    let accepted = rst.stats().accepted;
    // Without a back-off, 150 passes would dial 3 each. With it: the first use, one round of
    // 3, then single probes after 400 ms, 800 ms, 1.6 s...
    assert!(start.elapsed() < Duration::from_secs(3));
    assert!(
        (4..=8).contains(&errors),
        "refused port: {errors} connect attempts in 1.5 s"
    );
    assert!(
        (4..=8).contains(&accepted),
        "resetting server: {accepted} connections in 1.5 s"
    );
    assert_eq!(c.stats_for(&resetting).connect_errors as usize, accepted);
    assert_eq!(c.connection_count_for(&refused), 0);
}

#[tokio::test]
async fn min_idle_stops_when_the_key_is_not_used_for_its_idle_timeout() {
    let server = TestServer::start(Behaviour::Http);
    let peer = tls_peer(server.addr())
        .with_min_idle(2)
        .with_idle_timeout(Duration::from_millis(300));
    let c = connector(|o| o.reap_interval = Duration::from_millis(20));
    let conn = c.get(&peer).await.unwrap();
    drop(conn);
    assert!(wait_until(Duration::from_secs(1), || c.idle_count_for(&peer) == 2).await);
    // Unused: the idle connections time out and are not replaced.
    assert!(wait_until(Duration::from_secs(2), || c.idle_count_for(&peer) == 0).await);
    let accepted = server.stats().accepted;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        server.stats().accepted,
        accepted,
        "no top-up for an unused key"
    );
    assert!(accepted <= 5, "{accepted} connections");
    assert_eq!(
        c.stats_for(&peer),
        PeerStats::default(),
        "the unused key is forgotten"
    );
}

#[tokio::test]
async fn min_idle_stays_within_max_connections_per_peer_and_never_makes_get_wait() {
    let server = TestServer::start(Behaviour::Http);
    let peer = tls_peer(server.addr()).with_min_idle(3);
    let c = connector(|o| {
        o.max_connections_per_peer = Some(2);
        o.reap_interval = Duration::from_millis(20);
        o.wait_timeout = Duration::from_millis(200);
    });
    let held = c.get(&peer).await.unwrap();
    // One slot left: the top-up takes it, and no more.
    assert!(wait_until(Duration::from_secs(1), || c.idle_count_for(&peer) == 1).await);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(c.connection_count_for(&peer), 2);
    let stats = server.wait_for(|s| s.handshakes == 2).await;
    assert_eq!(stats.accepted, 2, "the cap bounds the top-up");

    // At the cap, a third get waits (and is counted as waiting) until one is released.
    let mut taken = c.get(&peer).await.unwrap();
    assert!(taken.reused());
    exchange(&mut taken).await;
    let waiter = tokio::spawn({
        let (c, peer) = (c.clone(), peer.clone());
        async move { c.get(&peer).await.map(|conn| conn.reused()) }
    });
    assert!(wait_until(Duration::from_secs(1), || c.stats_for(&peer).waiting == 1).await);
    c.release(taken);
    assert!(
        waiter.await.unwrap().unwrap(),
        "the waiter got the released connection"
    );
    assert_eq!(c.stats_for(&peer).waiting, 0);
    assert_eq!(server.stats().accepted, 2);
    drop(held);
}

#[tokio::test]
async fn stats_count_what_the_server_saw_per_key() {
    let server = TestServer::start(Behaviour::Http);
    let peer = tls_peer(server.addr());
    let c = connector(|_| {});
    assert_eq!(c.stats_for(&peer), PeerStats::default(), "unknown key");

    // Two new connections: the first a full handshake, the second resumes its session
    // (the exchange on the first reads the TLS 1.3 ticket).
    let mut a = c.get(&peer).await.unwrap();
    exchange(&mut a).await;
    let mut b = c.get(&peer).await.unwrap();
    exchange(&mut b).await;
    let held = c.stats_for(&peer);
    assert_eq!((held.in_use, held.idle, held.waiting), (2, 0, 0));
    c.release(a);
    c.release(b);
    for _ in 0..5 {
        let mut conn = c.get(&peer).await.unwrap();
        assert!(conn.reused());
        exchange(&mut conn).await;
        c.release(conn);
    }
    let server_stats = server.wait_for(|s| s.handshakes == 2).await;
    assert_eq!((server_stats.accepted, server_stats.resumed), (2, 1));
    let s = c.stats_for(&peer);
    assert_eq!(s.checkouts_reused, 5);
    assert_eq!(s.checkouts_new, 2);
    assert_eq!(s.handshakes_full, 1);
    assert_eq!(s.handshakes_resumed, 1);
    assert_eq!(s.connect_errors, 0);
    assert_eq!((s.idle, s.in_use, s.connecting), (2, 0, 0));

    // Another key (same address, another group) counts apart.
    let other = peer.clone().with_group("other");
    let mut conn = c.get(&other).await.unwrap();
    exchange(&mut conn).await;
    let o = c.stats_for(&other);
    assert_eq!(
        (o.checkouts_new, o.checkouts_reused, o.handshakes_full),
        (1, 0, 1)
    );
    assert_eq!(o.in_use, 1);
    assert_eq!(
        c.stats_for(&peer).checkouts_new,
        2,
        "unchanged by the other key"
    );
    server.wait_for(|s| s.accepted == 3).await;

    // A refused connect is counted for its key.
    let refused = Peer::tls(refused_addr(), "localhost").with_ca(TestPki::shared().ca_a());
    assert_eq!(
        c.get(&refused).await.unwrap_err().kind(),
        ErrorKind::ConnectRefused
    );
    let r = c.stats_for(&refused);
    assert_eq!((r.connect_errors, r.checkouts_new, r.in_use), (1, 0, 0));

    let all = c.stats();
    assert_eq!(all.len(), 3, "{all:?}");
    assert!(all
        .iter()
        .any(|(name, s)| name.contains(&server.addr().to_string()) && s.checkouts_reused == 5));
    drop(conn);
}

#[tokio::test]
async fn evict_closes_idle_connections_forgets_the_session_and_closes_in_use_ones_at_release() {
    let server = TestServer::start(Behaviour::Http);
    let peer = tls_peer(server.addr());
    let c = connector(|_| {});

    let mut a = c.get(&peer).await.unwrap();
    let id_a = exchange(&mut a).await;
    let mut b = c.get(&peer).await.unwrap();
    let id_b = exchange(&mut b).await;
    let mut held = c.get(&peer).await.unwrap();
    let id_held = exchange(&mut held).await;
    c.release(a);
    c.release(b);
    server
        .wait_for(|s| s.handshakes == 3 && s.resumed == 2)
        .await;

    assert_eq!(c.evict(&peer), 2);
    assert_eq!(c.idle_count_for(&peer), 0);
    server
        .wait_for(|s| s.conns[id_a].closed && s.conns[id_b].closed)
        .await;
    assert!(!server.stats().conns[id_held].closed);

    // The next connection authenticates in full: the session was forgotten.
    let mut fresh = c.get(&peer).await.unwrap();
    assert!(!fresh.reused());
    let id_fresh = exchange(&mut fresh).await;
    assert!(!fresh.digest().unwrap().session_reused);
    let stats = server
        .wait_for(|s| s.conns.len() > id_fresh && s.conns[id_fresh].handshake_done)
        .await;
    assert!(!stats.conns[id_fresh].resumed, "resumed after evict");

    // The one in use during the eviction is closed at release, not pooled.
    c.release(held);
    server.wait_for(|s| s.conns[id_held].closed).await;
    assert_eq!(c.idle_count_for(&peer), 0);
    // One dialled after the eviction is pooled as usual.
    c.release(fresh);
    assert_eq!(c.idle_count_for(&peer), 1);
    assert_eq!(c.stats_for(&peer).evicted, 3);

    // evict_all: every key, every session.
    let other = peer.clone().with_group("other");
    let mut o = c.get(&other).await.unwrap();
    exchange(&mut o).await;
    c.release(o);
    assert_eq!(c.evict_all(), 2);
    assert_eq!(c.idle_count(), 0);
    let mut again = c.get(&other).await.unwrap();
    assert!(!again.digest().unwrap().session_reused);
    exchange(&mut again).await;
    assert_eq!(c.evict(&Peer::tcp(refused_addr())), 0, "unknown key");
}

/// Records, for each server connection, when the server first saw it closed.
async fn close_times(server: &TestServer, n: usize, within: Duration) -> Vec<Duration> {
    let start = Instant::now();
    let mut closed: Vec<Option<Duration>> = vec![None; n];
    while start.elapsed() < within && closed.iter().any(Option::is_none) {
        for (i, conn) in server.stats().conns.iter().enumerate().take(n) {
            if conn.closed && closed[i].is_none() {
                closed[i] = Some(start.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    closed
        .into_iter()
        .map(|t| t.expect("every connection reaches its max_lifetime"))
        .collect()
}

fn spread(times: &[Duration]) -> Duration {
    times
        .iter()
        .max()
        .unwrap()
        .saturating_sub(*times.iter().min().unwrap())
}

#[tokio::test]
async fn max_lifetime_jitter_spreads_a_cohort_s_expiry() {
    const COHORT: usize = 16;
    let lifetime = Duration::from_millis(1200);
    let jittered_server = TestServer::start(Behaviour::Http);
    let plain_server = TestServer::start(Behaviour::Http);
    let jittered = connector(|o| {
        o.max_lifetime = Some(lifetime);
        o.max_lifetime_jitter = 0.5;
        o.reap_interval = Duration::from_millis(10);
    });
    let plain = connector(|o| {
        o.max_lifetime = Some(lifetime);
        o.max_lifetime_jitter = 0.0;
        o.reap_interval = Duration::from_millis(10);
    });
    let (jp, pp) = (
        tls_peer(jittered_server.addr()),
        tls_peer(plain_server.addr()),
    );
    // Each cohort dialled together.
    let (a, b) = tokio::join!(
        jittered.preconnect(&jp, COHORT),
        plain.preconnect(&pp, COHORT)
    );
    assert_eq!((a.unwrap(), b.unwrap()), (COHORT, COHORT));
    let (j, p) = tokio::join!(
        close_times(&jittered_server, COHORT, Duration::from_secs(4)),
        close_times(&plain_server, COHORT, Duration::from_secs(4)),
    );
    // Lifetimes uniform in 600..1200 ms: 16 of them span far more than 200 ms (the chance
    // they all fall in one 200 ms window is below 1e-10); without jitter the reaper closes
    // the whole cohort in one pass.
    assert!(spread(&j) >= Duration::from_millis(200), "jittered: {j:?}");
    assert!(spread(&p) < spread(&j), "plain {p:?} vs jittered {j:?}");
    assert!(
        j.iter().all(|t| *t < lifetime + Duration::from_millis(500)),
        "never beyond max_lifetime: {j:?}"
    );
}

#[tokio::test]
async fn max_lifetime_jitter_outside_zero_to_one_is_invalid_config() {
    for bad in [-0.1, 1.5, f64::NAN] {
        let mut options = ConnectorOptions::default();
        options.max_lifetime_jitter = bad;
        let err = Connector::new(options).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidConfig);
        assert!(err.to_string().contains("max_lifetime_jitter"), "{err}");
    }
    for good in [0.0, 1.0] {
        let mut options = ConnectorOptions::default();
        options.max_lifetime_jitter = good;
        assert!(Connector::new(options).is_ok());
    }
}

#[test]
fn peer_stats_bounds() {
    fn assert_bounds<T: std::fmt::Debug + Clone + Default + Send + Sync>() {}
    assert_bounds::<PeerStats>();
}
