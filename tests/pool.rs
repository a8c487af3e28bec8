//! The keyed pool behind `Connector::get` / `release`: exact-key reuse, liveness on checkout
//! and in the background, idle timeouts, `max_uses` / `max_lifetime`, cancelled dials that
//! finish in the background, and a `Connector` shared across tasks and clones.
//!
//! Every test asserts on what the in-process server observed (connections accepted, which
//! server connection answered, SNI, ALPN, client certificate, closes), not only on the
//! pool's own answers. Caps and waiters are in `pool_limits.rs`; descriptor leaks in
//! `pool_leaks.rs`.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use openssl::ssl::SslVersion;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use upstream_pool::{Alpn, CertKey, Connection, Connector, ConnectorOptions, Peer};

use support::certs::{Identity, TestPki};
use support::client::http_get;
use support::server::{AlpnPolicy, Behaviour, ClientAuth, ConnInfo, Listen, TestServer};
use support::wait_until;

/// Long enough that the background reaper never runs during a test that wants to observe
/// eviction at checkout.
const NO_REAPER: Duration = Duration::from_secs(3600);

fn connector(configure: impl FnOnce(&mut ConnectorOptions)) -> Connector {
    let mut options = ConnectorOptions::default();
    configure(&mut options);
    Connector::new(options).unwrap()
}

fn tls_peer(server: &TestServer) -> Peer {
    Peer::tls(server.addr(), "localhost").with_ca(TestPki::shared().ca_a())
}

/// One HTTP exchange on `conn`; returns the id of the server connection that answered.
async fn exchange(conn: &mut Connection) -> usize {
    let response = http_get(conn, "localhost").await.unwrap();
    assert_eq!(response.status, 200, "{response:?}");
    response
        .conn_id()
        .expect("test server names its connection")
}

/// get → exchange → release → get must hand back the same upstream connection.
async fn assert_get_release_get_reuses(server: &TestServer, peer: &Peer) {
    let c = connector(|_| {});
    let mut conn = c.get(peer).await.unwrap();
    assert!(!conn.reused(), "first get must dial");
    assert_eq!(conn.uses(), 1);
    let first = exchange(&mut conn).await;
    c.release(conn);
    assert_eq!(c.idle_count_for(peer), 1);
    assert_eq!(c.idle_count(), 1);
    assert_eq!(c.connection_count_for(peer), 1);

    let mut conn = c.get(peer).await.unwrap();
    assert!(conn.reused(), "second get must come from the pool");
    assert_eq!(conn.uses(), 2);
    assert_eq!(c.idle_count_for(peer), 0);
    assert_eq!(c.connection_count_for(peer), 1);
    assert_eq!(
        exchange(&mut conn).await,
        first,
        "a different connection answered"
    );
    c.release(conn);

    let stats = server.stats();
    assert_eq!(stats.accepted, 1, "the server saw more than one connection");
    assert_eq!(stats.conns[0].requests, 2);
    assert!(!stats.conns[0].closed);
}

#[tokio::test]
async fn tls_get_release_get_reuses_one_connection() {
    let server = TestServer::start(Behaviour::Http);
    let peer = tls_peer(&server);
    assert_get_release_get_reuses(&server, &peer).await;
    let stats = server.stats();
    assert_eq!(stats.handshakes, 1);
}

#[tokio::test]
async fn plaintext_tcp_get_release_get_reuses_one_connection() {
    let server = TestServer::builder().plaintext().start();
    let peer = Peer::tcp(server.addr());
    assert_get_release_get_reuses(&server, &peer).await;
}

#[tokio::test]
async fn unix_get_release_get_reuses_one_connection() {
    let server = TestServer::builder()
        .plaintext()
        .listen(Listen::Unix)
        .start();
    let peer = Peer::unix(server.unix_path().unwrap());
    assert_get_release_get_reuses(&server, &peer).await;
}

#[tokio::test]
async fn unix_tls_get_release_get_reuses_one_connection() {
    let server = TestServer::builder().listen(Listen::Unix).start();
    let peer =
        Peer::unix_tls(server.unix_path().unwrap(), "localhost").with_ca(TestPki::shared().ca_a());
    assert_get_release_get_reuses(&server, &peer).await;
    assert_eq!(server.stats().handshakes, 1);
}

#[tokio::test]
async fn equal_peer_built_separately_reuses() {
    // Full-value equality, not identity of the `Peer` object, decides reuse; settings outside
    // the key (timeouts, name, nodelay, keepalive, resumption) do not split the pool.
    let server = TestServer::start(Behaviour::Http);
    let c = connector(|_| {});
    let mut conn = c.get(&tls_peer(&server)).await.unwrap();
    let first = exchange(&mut conn).await;
    c.release(conn);

    let variants = [
        tls_peer(&server),
        tls_peer(&server).with_name("other-name"),
        tls_peer(&server).with_connection_timeout(Duration::from_millis(1234)),
        tls_peer(&server).with_total_connection_timeout(Duration::from_millis(4321)),
        tls_peer(&server).with_idle_timeout(Duration::from_secs(77)),
        tls_peer(&server).with_tcp_nodelay(false),
        tls_peer(&server).with_session_resumption(false),
        tls_peer(&server).with_tcp_keepalive(upstream_pool::TcpKeepalive {
            idle: Duration::from_secs(60),
            interval: Duration::from_secs(10),
            count: 3,
        }),
    ];
    for peer in &variants {
        let mut conn = c.get(peer).await.unwrap();
        assert!(conn.reused(), "{peer:?} did not reuse");
        assert_eq!(exchange(&mut conn).await, first);
        c.release(conn);
    }
    assert_eq!(server.stats().accepted, 1);
}

/// A pair of peers that differ in exactly one connection-shaping field, and what the server
/// can see of that field (`None` when the difference is client-side only).
struct Case {
    name: &'static str,
    left: Peer,
    right: Peer,
    observe: Option<fn(&ConnInfo) -> String>,
}

fn client_cert(id: &Identity) -> CertKey {
    CertKey::new(id.cert.clone(), id.key.clone(), id.intermediates.clone()).unwrap()
}

#[tokio::test]
async fn each_connection_shaping_field_alone_prevents_reuse() {
    let pki = TestPki::shared();
    let leaf = pki.leaf("localhost", &["localhost", "a.test", "b.test", "127.0.0.1"]);
    let server = TestServer::builder()
        .identity(&leaf)
        .alpn(AlpnPolicy::h2_then_h1())
        .client_auth(ClientAuth::Optional {
            ca: vec![pki.root_a.cert.clone(), pki.root_b.cert.clone()],
        })
        .start();
    let addr = server.addr();
    let base = || Peer::tls(addr, "a.test").with_ca(pki.ca_a());
    let mut ca_x_y = pki.ca_a();
    ca_x_y.push(pki.root_b.cert.clone());

    let cases = vec![
        Case {
            name: "client cert none vs A",
            left: base(),
            right: base().with_client_cert(client_cert(&pki.client_a)),
            observe: Some(|c| format!("{:?}", c.client_cert_cns)),
        },
        Case {
            name: "client cert A vs B",
            left: base().with_client_cert(client_cert(&pki.client_a)),
            right: base().with_client_cert(client_cert(&pki.client_b)),
            observe: Some(|c| format!("{:?}", c.client_cert_cns)),
        },
        Case {
            name: "CA X vs Y",
            left: base(),
            right: base().with_ca(ca_x_y.clone()),
            observe: None,
        },
        Case {
            name: "verify_cert on vs off",
            left: base(),
            right: base().with_verify_cert(false),
            observe: None,
        },
        Case {
            name: "verify_hostname on vs off",
            left: base(),
            right: base().with_verify_hostname(false),
            observe: None,
        },
        Case {
            name: "SNI",
            left: base(),
            right: Peer::tls(addr, "b.test").with_ca(pki.ca_a()),
            observe: Some(|c| format!("{:?}", c.sni)),
        },
        Case {
            name: "ALPN none vs h1",
            left: base(),
            right: base().with_alpn(Alpn::H1),
            observe: Some(|c| format!("{:?}", c.alpn)),
        },
        Case {
            name: "ALPN h1 vs h2+h1",
            left: base().with_alpn(Alpn::H1),
            right: base().with_alpn(Alpn::H2H1),
            observe: Some(|c| format!("{:?}", c.alpn)),
        },
        Case {
            name: "alternative CN",
            left: base(),
            right: base().with_alternative_cn("b.test"),
            observe: None,
        },
        Case {
            name: "curves",
            left: base().with_curves("X25519"),
            right: base().with_curves("P-256"),
            observe: Some(|c| format!("{:?}", c.group)),
        },
        Case {
            name: "bind address",
            left: base().with_bind_to("127.0.0.1:0".parse().unwrap()),
            right: base().with_bind_to("127.0.0.2:0".parse().unwrap()),
            observe: Some(|c| format!("{:?}", c.peer.map(|p| p.ip()))),
        },
        Case {
            name: "bind address none vs some",
            left: base(),
            right: base().with_bind_to("127.0.0.1:0".parse().unwrap()),
            observe: None,
        },
        Case {
            name: "group tag",
            left: base().with_group("tenant-a"),
            right: base().with_group("tenant-b"),
            observe: None,
        },
        Case {
            name: "group tag none vs some",
            left: base(),
            right: base().with_group("tenant-a"),
            observe: None,
        },
    ];

    for case in cases {
        let name = case.name;
        let c = connector(|_| {});
        let before = server.stats().accepted;

        let mut left = c
            .get(&case.left)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let left_id = exchange(&mut left).await;
        c.release(left);
        assert_eq!(c.idle_count(), 1, "{name}");

        let mut right = c
            .get(&case.right)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(
            !right.reused(),
            "{name}: the other peer's connection was reused"
        );
        let right_id = exchange(&mut right).await;
        assert_ne!(left_id, right_id, "{name}");
        c.release(right);
        assert_eq!(server.stats().accepted, before + 2, "{name}");
        assert_eq!(c.idle_count_for(&case.left), 1, "{name}");
        assert_eq!(c.idle_count_for(&case.right), 1, "{name}");

        // Each side still finds its own connection.
        for (peer, id) in [(&case.left, left_id), (&case.right, right_id)] {
            let mut conn = c.get(peer).await.unwrap();
            assert!(conn.reused(), "{name}");
            assert_eq!(exchange(&mut conn).await, id, "{name}");
            c.release(conn);
        }
        assert_eq!(server.stats().accepted, before + 2, "{name}");

        if let Some(observe) = case.observe {
            let stats = server.stats();
            assert_ne!(
                observe(&stats.conns[left_id]),
                observe(&stats.conns[right_id]),
                "{name}: the server saw no difference; the case tests nothing"
            );
        }
    }
}

#[tokio::test]
async fn tls_and_plaintext_to_the_same_address_do_not_share() {
    // One address, two transports: a plaintext peer must never be handed a TLS connection
    // (or the other way round). The plaintext server answers TLS with garbage, so only check
    // that the plaintext get dials its own connection.
    let server = TestServer::builder().plaintext().start();
    let c = connector(|_| {});
    let plain = Peer::tcp(server.addr());
    let mut conn = c.get(&plain).await.unwrap();
    exchange(&mut conn).await;
    c.release(conn);
    let tls = Peer::tls(server.addr(), "localhost")
        .with_ca(TestPki::shared().ca_a())
        .with_total_connection_timeout(Duration::from_secs(2));
    assert!(
        c.get(&tls).await.is_err(),
        "TLS peer got a plaintext connection"
    );
    assert_eq!(server.stats().accepted, 2);
    assert_eq!(c.idle_count_for(&plain), 1);
}

/// A task that has spent tokio's cooperative budget (128 ready operations in one poll) still
/// gets a truthful liveness check: with the budget spent, tokio answers readiness polls with
/// `Pending`, which must not make a closed connection look alive.
#[tokio::test]
async fn closed_connection_not_handed_out_when_the_task_budget_is_spent() {
    for plaintext in [false, true] {
        let server = if plaintext {
            TestServer::builder().plaintext().start()
        } else {
            TestServer::start(Behaviour::Http)
        };
        let peer = if plaintext {
            Peer::tcp(server.addr())
        } else {
            tls_peer(&server)
        };
        let c = connector(|o| o.reap_interval = NO_REAPER);
        // Released without an exchange: for TLS 1.3 the session tickets are still unread, so
        // the check at checkout has to read through OpenSSL (a budgeted poll) to see the FIN.
        let conn = c.get(&peer).await.unwrap();
        c.release(conn);
        server.wait_for(|s| s.handshakes == 1 || plaintext).await;
        server.close_connections();
        server.wait_for(|s| s.conns[0].closed).await;
        tokio::time::sleep(Duration::from_millis(50)).await;

        // Spend the budget: ready receives, one unit each, until none is left.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for i in 0..1024 {
            tx.send(i).unwrap();
        }
        while tokio::task::coop::has_budget_remaining() {
            rx.recv().await.unwrap();
        }
        let mut conn = c.get(&peer).await.unwrap();
        assert!(
            !conn.reused(),
            "plaintext={plaintext}: a closed connection was handed out with the budget spent"
        );
        assert_ne!(exchange(&mut conn).await, 0);
        assert_eq!(server.stats().accepted, 2);
    }
}

/// The server closes the idle connection; with the reaper off, the next `get` must notice at
/// checkout, dial fresh and succeed.
async fn server_close_then_get_dials_fresh(server: &TestServer, peer: &Peer, close: bool) {
    let c = connector(|o| o.reap_interval = NO_REAPER);
    let mut conn = c.get(peer).await.unwrap();
    let first = exchange(&mut conn).await;
    c.release(conn);
    assert_eq!(c.idle_count_for(peer), 1);
    if close {
        server.close_connections();
    }
    server.wait_for(|s| s.conns[first].closed).await;
    // Let the FIN (and close_notify) reach our socket.
    tokio::time::sleep(Duration::from_millis(50)).await;

    let mut conn = c.get(peer).await.unwrap();
    assert!(
        !conn.reused(),
        "a connection the server closed was handed out"
    );
    let second = exchange(&mut conn).await;
    assert_ne!(first, second);
    c.release(conn);
    assert_eq!(server.stats().accepted, 2);
    assert_eq!(c.idle_count_for(peer), 1);
    assert_eq!(c.connection_count_for(peer), 1);
}

#[tokio::test]
async fn tls_server_closes_idle_with_close_notify_next_get_dials_fresh() {
    let server = TestServer::start(Behaviour::CloseAfter(Duration::from_millis(100)));
    server_close_then_get_dials_fresh(&server, &tls_peer(&server), false).await;
}

#[tokio::test]
async fn tls_server_drops_idle_without_close_notify_next_get_dials_fresh() {
    let server = TestServer::start(Behaviour::Http);
    server_close_then_get_dials_fresh(&server, &tls_peer(&server), true).await;
}

#[tokio::test]
async fn plaintext_server_closes_idle_next_get_dials_fresh() {
    let server = TestServer::builder()
        .plaintext()
        .behaviour(Behaviour::CloseAfter(Duration::from_millis(100)))
        .start();
    server_close_then_get_dials_fresh(&server, &Peer::tcp(server.addr()), false).await;
    let server = TestServer::builder().plaintext().start();
    server_close_then_get_dials_fresh(&server, &Peer::tcp(server.addr()), true).await;
}

#[tokio::test]
async fn unix_server_closes_idle_next_get_dials_fresh() {
    let server = TestServer::builder()
        .plaintext()
        .listen(Listen::Unix)
        .start();
    let peer = Peer::unix(server.unix_path().unwrap());
    server_close_then_get_dials_fresh(&server, &peer, true).await;
}

/// Without any `get`, the reaper evicts a connection the server closed within about a second.
async fn reaper_evicts_closed(server: &TestServer, peer: &Peer, close: bool) {
    let c = connector(|_| {});
    assert!(c.options().reap_interval <= Duration::from_millis(250));
    let mut conn = c.get(peer).await.unwrap();
    let first = exchange(&mut conn).await;
    c.release(conn);
    assert_eq!(c.idle_count(), 1);
    if close {
        server.close_connections();
    }
    server.wait_for(|s| s.conns[first].closed).await;
    assert!(
        wait_until(Duration::from_secs(1), || c.idle_count() == 0).await,
        "the reaper kept a closed connection for over a second"
    );
    assert_eq!(c.idle_count_for(peer), 0);
    assert_eq!(c.connection_count_for(peer), 0);
}

#[tokio::test]
async fn reaper_evicts_idle_connections_the_server_closed() {
    let server = TestServer::start(Behaviour::CloseAfter(Duration::from_millis(100)));
    reaper_evicts_closed(&server, &tls_peer(&server), false).await;
    let server = TestServer::start(Behaviour::Http);
    reaper_evicts_closed(&server, &tls_peer(&server), true).await;
    let server = TestServer::builder().plaintext().start();
    reaper_evicts_closed(&server, &Peer::tcp(server.addr()), true).await;
    let server = TestServer::builder()
        .plaintext()
        .listen(Listen::Unix)
        .start();
    reaper_evicts_closed(&server, &Peer::unix(server.unix_path().unwrap()), true).await;
}

/// One reaper pass looks at every idle connection, however many there are. (Its probes once
/// ran inside tokio's cooperative budget: after 128 ready sockets in a pass, every further
/// probe answered "alive" unexamined, so 1,000 closed connections took eight passes, 2 s.)
#[tokio::test]
async fn one_reaper_pass_evicts_a_thousand_closed_connections() {
    const N: usize = 1_000;
    let server = TestServer::builder().plaintext().start();
    let peer = Peer::tcp(server.addr());
    let c = connector(|o| {
        o.max_idle_per_peer = N;
        o.reap_interval = Duration::from_millis(250);
    });
    let mut held = Vec::with_capacity(N);
    for _ in 0..N {
        held.push(c.get(&peer).await.unwrap());
    }
    for conn in held {
        c.release(conn);
    }
    assert_eq!(c.idle_count_for(&peer), N);
    server.wait_for(|s| s.accepted == N).await;
    server.close_connections();
    server
        .wait_for(|s| s.conns.iter().all(|conn| conn.closed))
        .await;
    assert!(
        wait_until(Duration::from_millis(1_000), || c.idle_count() == 0).await,
        "{} of {N} closed connections still idle after 1 s (4 reaper intervals)",
        c.idle_count()
    );
}

#[tokio::test]
async fn tls13_session_tickets_after_the_handshake_are_not_unexpected_data() {
    let server = TestServer::builder().version(SslVersion::TLS1_3).start();
    let peer = tls_peer(&server);
    let c = connector(|_| {});
    let conn = c.get(&peer).await.unwrap();
    assert_eq!(conn.digest().unwrap().version, "TLSv1.3");
    // Released before any request: the server's tickets arrive while it sits idle.
    c.release(conn);
    assert_eq!(c.idle_count_for(&peer), 1);
    server.wait_for(|s| s.handshakes == 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The reaper has looked at it at least once with the tickets readable.
    assert_eq!(
        c.idle_count_for(&peer),
        1,
        "tickets counted as unexpected data"
    );

    let mut conn = c.get(&peer).await.unwrap();
    assert!(
        conn.reused(),
        "tickets counted as unexpected data at checkout"
    );
    let first = exchange(&mut conn).await;

    // The tickets were consumed (not discarded): a second connection resumes with one.
    let mut other = c.get(&peer).await.unwrap();
    assert!(!other.reused());
    assert!(other.digest().unwrap().session_reused);
    let second = exchange(&mut other).await;
    assert_ne!(first, second);
    let stats = server.wait_for(|s| s.handshakes == 2).await;
    assert_eq!(stats.accepted, 2);
    assert_eq!(
        stats.resumed, 1,
        "the pooled connection's tickets were lost"
    );
    c.release(conn);
    c.release(other);
    assert_eq!(c.idle_count_for(&peer), 2);
}

#[tokio::test]
async fn tls12_idle_connection_is_reused() {
    let server = TestServer::builder().version(SslVersion::TLS1_2).start();
    let peer = tls_peer(&server);
    assert_get_release_get_reuses(&server, &peer).await;
}

/// Stray bytes after a response make the connection unusable: never handed out again, and
/// evicted by the reaper if they arrive after the release.
async fn stray_bytes_never_reused(server: &TestServer, peer: &Peer) {
    let c = connector(|_| {});
    for round in 0..5 {
        let mut conn = c.get(peer).await.unwrap();
        assert!(
            !conn.reused(),
            "round {round}: a connection with stray bytes was reused"
        );
        let id = exchange(&mut conn).await;
        assert_eq!(id, round);
        // Released right after the response: the stray bytes may or may not be here yet.
        c.release(conn);
        assert!(
            wait_until(Duration::from_secs(1), || c.idle_count_for(peer) == 0).await,
            "round {round}: a connection with unread bytes stayed in the pool"
        );
    }
    assert_eq!(server.stats().accepted, 5);
    assert_eq!(c.connection_count_for(peer), 0);
}

#[tokio::test]
async fn tls_stray_bytes_after_response_connection_never_reused() {
    let server = TestServer::start(Behaviour::HttpThenStray);
    stray_bytes_never_reused(&server, &tls_peer(&server)).await;
}

#[tokio::test]
async fn plaintext_stray_bytes_after_response_connection_never_reused() {
    let server = TestServer::builder()
        .plaintext()
        .behaviour(Behaviour::HttpThenStray)
        .start();
    stray_bytes_never_reused(&server, &Peer::tcp(server.addr())).await;
}

#[tokio::test]
async fn stray_bytes_seen_at_checkout_without_reaper() {
    let server = TestServer::start(Behaviour::HttpThenStray);
    let peer = tls_peer(&server);
    let c = connector(|o| o.reap_interval = NO_REAPER);
    let mut conn = c.get(&peer).await.unwrap();
    exchange(&mut conn).await;
    c.release(conn);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut conn = c.get(&peer).await.unwrap();
    assert!(!conn.reused());
    assert_eq!(exchange(&mut conn).await, 1);
    assert_eq!(server.stats().accepted, 2);
}

#[tokio::test]
async fn peer_idle_timeout_evicts_in_the_background() {
    let server = TestServer::start(Behaviour::Http);
    let peer = tls_peer(&server).with_idle_timeout(Duration::from_millis(300));
    let c = connector(|_| {});
    let mut conn = c.get(&peer).await.unwrap();
    let id = exchange(&mut conn).await;
    c.release(conn);
    assert_eq!(c.idle_count_for(&peer), 1);
    assert!(wait_until(Duration::from_secs(2), || c.idle_count_for(&peer) == 0).await);
    // The pool closed it: the server sees the close.
    server.wait_for(|s| s.conns[id].closed).await;
    let mut conn = c.get(&peer).await.unwrap();
    assert!(!conn.reused());
    exchange(&mut conn).await;
    assert_eq!(server.stats().accepted, 2);
}

#[tokio::test]
async fn connector_default_idle_timeout_evicts_at_checkout() {
    let server = TestServer::start(Behaviour::Http);
    let peer = tls_peer(&server);
    let c = connector(|o| {
        o.idle_timeout = Duration::from_millis(200);
        o.reap_interval = NO_REAPER;
    });
    let mut conn = c.get(&peer).await.unwrap();
    let id = exchange(&mut conn).await;
    c.release(conn);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut conn = c.get(&peer).await.unwrap();
    assert!(!conn.reused(), "an expired connection was handed out");
    assert_ne!(exchange(&mut conn).await, id);
    server.wait_for(|s| s.conns[id].closed).await;
    assert_eq!(server.stats().accepted, 2);
}

#[tokio::test]
async fn connector_default_idle_timeout_evicts_in_the_background() {
    let server = TestServer::start(Behaviour::Http);
    let peer = tls_peer(&server);
    let c = connector(|o| o.idle_timeout = Duration::from_millis(300));
    let mut conn = c.get(&peer).await.unwrap();
    let id = exchange(&mut conn).await;
    c.release(conn);
    assert!(wait_until(Duration::from_secs(2), || c.idle_count() == 0).await);
    server.wait_for(|s| s.conns[id].closed).await;
}

#[tokio::test]
async fn peer_idle_timeout_overrides_the_connector_default() {
    let server = TestServer::start(Behaviour::Http);
    let peer = tls_peer(&server).with_idle_timeout(Duration::from_secs(30));
    let c = connector(|o| o.idle_timeout = Duration::from_millis(100));
    let mut conn = c.get(&peer).await.unwrap();
    let id = exchange(&mut conn).await;
    c.release(conn);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let mut conn = c.get(&peer).await.unwrap();
    assert!(
        conn.reused(),
        "the connector default replaced the peer's idle timeout"
    );
    assert_eq!(exchange(&mut conn).await, id);
    assert_eq!(server.stats().accepted, 1);
}

#[tokio::test]
async fn idle_connections_are_handed_out_newest_first() {
    let server = TestServer::start(Behaviour::Http);
    let peer = tls_peer(&server);
    let c = connector(|_| {});
    let mut conns = Vec::new();
    for _ in 0..3 {
        let mut conn = c.get(&peer).await.unwrap();
        let id = exchange(&mut conn).await;
        conns.push((id, conn));
    }
    let ids: Vec<usize> = conns.iter().map(|(id, _)| *id).collect();
    for (_, conn) in conns {
        c.release(conn);
    }
    assert_eq!(c.idle_count_for(&peer), 3);
    // Newest released first; hold each so the next get sees the next one.
    let mut held = Vec::new();
    for expected in ids.iter().rev() {
        let mut conn = c.get(&peer).await.unwrap();
        assert!(conn.reused());
        assert_eq!(exchange(&mut conn).await, *expected, "not LIFO");
        held.push(conn);
    }
    assert_eq!(server.stats().accepted, 3);

    // Under light load only the newest keeps being used; the others age out. `held` is
    // newest first, so ids[0] is released last.
    for conn in held {
        c.release(conn);
    }
    for _ in 0..5 {
        let mut conn = c.get(&peer).await.unwrap();
        assert_eq!(exchange(&mut conn).await, ids[0]);
        c.release(conn);
    }
}

#[tokio::test]
async fn max_uses_retires_a_connection() {
    let server = TestServer::start(Behaviour::Http);
    let peer = tls_peer(&server);
    let c = connector(|o| o.max_uses = Some(2));
    let mut conn = c.get(&peer).await.unwrap();
    let id = exchange(&mut conn).await;
    c.release(conn);
    let mut conn = c.get(&peer).await.unwrap();
    assert!(conn.reused());
    assert_eq!(conn.uses(), 2);
    assert_eq!(exchange(&mut conn).await, id);
    c.release(conn);
    assert_eq!(
        c.idle_count_for(&peer),
        0,
        "a connection past max_uses was pooled"
    );
    server.wait_for(|s| s.conns[id].closed).await;
    let mut conn = c.get(&peer).await.unwrap();
    assert!(!conn.reused());
    assert_ne!(exchange(&mut conn).await, id);
    assert_eq!(server.stats().accepted, 2);
}

#[tokio::test]
async fn max_lifetime_retires_a_connection_at_checkout_and_in_the_background() {
    let server = TestServer::start(Behaviour::Http);
    let peer = tls_peer(&server);

    let c = connector(|o| {
        o.max_lifetime = Some(Duration::from_millis(300));
        o.reap_interval = NO_REAPER;
    });
    let mut conn = c.get(&peer).await.unwrap();
    let id = exchange(&mut conn).await;
    c.release(conn);
    let mut conn = c.get(&peer).await.unwrap();
    assert!(conn.reused(), "retired before max_lifetime");
    exchange(&mut conn).await;
    c.release(conn);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let mut conn = c.get(&peer).await.unwrap();
    assert!(
        !conn.reused(),
        "a connection past max_lifetime was handed out"
    );
    assert_ne!(exchange(&mut conn).await, id);
    server.wait_for(|s| s.conns[id].closed).await;
    drop(conn);

    let c = connector(|o| o.max_lifetime = Some(Duration::from_millis(300)));
    let mut conn = c.get(&peer).await.unwrap();
    let id = exchange(&mut conn).await;
    c.release(conn);
    assert!(wait_until(Duration::from_secs(2), || c.idle_count() == 0).await);
    server.wait_for(|s| s.conns[id].closed).await;

    // Released after its lifetime: closed instead of pooled.
    let mut conn = c.get(&peer).await.unwrap();
    let id = exchange(&mut conn).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    c.release(conn);
    assert_eq!(c.idle_count(), 0);
    server.wait_for(|s| s.conns[id].closed).await;
}

#[tokio::test]
async fn a_connection_released_to_another_connector_is_closed() {
    let server = TestServer::start(Behaviour::Http);
    let peer = tls_peer(&server);
    let a = connector(|_| {});
    let b = connector(|_| {});
    let mut conn = a.get(&peer).await.unwrap();
    let id = exchange(&mut conn).await;
    b.release(conn);
    assert_eq!(a.idle_count(), 0);
    assert_eq!(b.idle_count(), 0);
    assert_eq!(a.connection_count_for(&peer), 0);
    server.wait_for(|s| s.conns[id].closed).await;
}

#[tokio::test]
async fn dropping_instead_of_releasing_closes_and_frees() {
    let server = TestServer::start(Behaviour::Http);
    let peer = tls_peer(&server);
    let c = connector(|_| {});
    let mut conn = c.get(&peer).await.unwrap();
    let id = exchange(&mut conn).await;
    assert_eq!(c.connection_count_for(&peer), 1);
    drop(conn);
    assert_eq!(c.connection_count_for(&peer), 0);
    assert_eq!(c.idle_count(), 0);
    server.wait_for(|s| s.conns[id].closed).await;
}

#[tokio::test]
async fn clones_share_one_pool() {
    let server = TestServer::start(Behaviour::Http);
    let peer = tls_peer(&server);
    let a = connector(|_| {});
    let b = a.clone();
    let mut conn = a.get(&peer).await.unwrap();
    let id = exchange(&mut conn).await;
    b.release(conn);
    assert_eq!(a.idle_count_for(&peer), 1);
    assert_eq!(b.idle_count_for(&peer), 1);
    let mut conn = b.get(&peer).await.unwrap();
    assert!(conn.reused());
    assert_eq!(exchange(&mut conn).await, id);
    drop(a);
    b.release(conn);
    assert_eq!(b.idle_count(), 1);
    assert_eq!(server.stats().accepted, 1);
}

#[test]
fn connector_and_connection_are_send_and_sync() {
    fn send_sync<T: Send + Sync + Clone + 'static>() {}
    fn send<T: Send + 'static>() {}
    send_sync::<Connector>();
    send::<Connection>();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_tasks_share_a_connector_on_a_multi_thread_runtime() {
    const TASKS: usize = 32;
    const ROUNDS: usize = 20;
    let server = TestServer::start(Behaviour::Http);
    let peer = tls_peer(&server);
    let c = connector(|_| {});
    let in_use = Arc::new(AtomicUsize::new(0));
    let most_in_use = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<JoinHandle<usize>> = (0..TASKS)
        .map(|_| {
            let (c, peer) = (c.clone(), peer.clone());
            let (in_use, most_in_use) = (in_use.clone(), most_in_use.clone());
            tokio::spawn(async move {
                let mut reused = 0;
                for _ in 0..ROUNDS {
                    let mut conn = c.get(&peer).await.unwrap();
                    let n = in_use.fetch_add(1, Ordering::SeqCst) + 1;
                    most_in_use.fetch_max(n, Ordering::SeqCst);
                    reused += usize::from(conn.reused());
                    exchange(&mut conn).await;
                    in_use.fetch_sub(1, Ordering::SeqCst);
                    c.release(conn);
                    tokio::task::yield_now().await;
                }
                reused
            })
        })
        .collect();
    let mut reused = 0;
    for task in tasks {
        reused += task.await.unwrap();
    }
    let stats = server.stats();
    assert_eq!(stats.requests, TASKS * ROUNDS);
    // Every connection the pool dialled was needed: a dial happens only when every existing
    // connection is checked out.
    let most = most_in_use.load(Ordering::SeqCst);
    assert!(
        stats.accepted <= TASKS,
        "{} connections for {TASKS} tasks",
        stats.accepted
    );
    assert_eq!(reused + stats.accepted, TASKS * ROUNDS);
    assert_eq!(c.idle_count_for(&peer), stats.accepted);
    assert_eq!(c.connection_count_for(&peer), stats.accepted);
    assert!(most <= TASKS);
}

/// A TCP relay that holds each accepted connection for `delay` before connecting it to
/// `upstream`: a server whose handshake is slow, so a `get` can be cancelled mid-handshake.
async fn delay_proxy(upstream: SocketAddr, delay: Duration) -> (SocketAddr, JoinHandle<()>) {
    // tokio's bind listens with a backlog of 1024.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                if let Ok(mut outbound) = TcpStream::connect(upstream).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    (addr, task)
}

#[tokio::test]
async fn a_dial_cancelled_mid_handshake_finishes_in_the_background_and_is_pooled() {
    let server = TestServer::start(Behaviour::Http);
    let (proxy, proxy_task) = delay_proxy(server.addr(), Duration::from_millis(300)).await;
    let peer = Peer::tls(proxy, "localhost").with_ca(TestPki::shared().ca_a());
    let c = connector(|_| {});

    let cancelled = tokio::time::timeout(Duration::from_millis(100), c.get(&peer)).await;
    assert!(
        cancelled.is_err(),
        "the get finished despite the slow server"
    );
    // The dial still holds its slot; nothing reached the server yet.
    assert_eq!(c.connection_count_for(&peer), 1);
    assert_eq!(server.stats().handshakes, 0);

    assert!(
        wait_until(Duration::from_secs(3), || c.idle_count_for(&peer) == 1).await,
        "the background dial was not pooled"
    );
    server.wait_for(|s| s.handshakes == 1).await;
    let mut conn = c.get(&peer).await.unwrap();
    assert!(conn.reused());
    assert_eq!(exchange(&mut conn).await, 0);
    assert_eq!(server.stats().accepted, 1);
    proxy_task.abort();
}

#[tokio::test]
async fn a_cancelled_dial_that_fails_frees_its_slot() {
    let server = TestServer::start(Behaviour::NeverAnswer);
    let peer = tls_peer(&server).with_total_connection_timeout(Duration::from_millis(300));
    let c = connector(|o| o.max_connections_per_peer = Some(1));
    let cancelled = tokio::time::timeout(Duration::from_millis(50), c.get(&peer)).await;
    assert!(cancelled.is_err());
    assert_eq!(c.connection_count_for(&peer), 1);
    server.wait_for(|s| s.accepted == 1).await;
    assert!(
        wait_until(Duration::from_secs(2), || c.connection_count_for(&peer)
            == 0)
        .await
    );
    // The slot is usable again: this get dials (and times out the same way) instead of
    // waiting at the cap.
    let err = c.get(&peer).await.unwrap_err();
    assert_eq!(
        err.kind(),
        upstream_pool::ErrorKind::TlsHandshakeTimedout,
        "{err}"
    );
    assert_eq!(server.stats().accepted, 2);
    assert_eq!(c.connection_count_for(&peer), 0);
}

#[tokio::test]
async fn dropping_the_last_connector_closes_idle_connections() {
    let server = TestServer::start(Behaviour::Http);
    let peer = tls_peer(&server);
    let c = connector(|_| {});
    let mut conn = c.get(&peer).await.unwrap();
    let id = exchange(&mut conn).await;
    c.release(conn);
    let clone = c.clone();
    drop(c);
    assert_eq!(clone.idle_count(), 1, "a clone still holds the pool");
    drop(clone);
    server.wait_for(|s| s.conns[id].closed).await;
}

#[test]
fn the_reaper_outlives_the_runtime_that_started_it() {
    // A connector that outlives a runtime (a global, or one shared by several runtimes) must
    // keep evicting in the background on the next runtime it is used from.
    let server_rt = tokio::runtime::Runtime::new().unwrap();
    let server = server_rt.block_on(async { TestServer::start(Behaviour::Http) });
    let peer = tls_peer(&server);
    let c = connector(|_| {});

    let first = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    first.block_on(async {
        let mut conn = c.get(&peer).await.unwrap();
        exchange(&mut conn).await;
        c.release(conn);
    });
    drop(first);

    let second = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    second.block_on(async {
        let mut conn = c.get(&peer).await.unwrap();
        assert!(
            !conn.reused(),
            "a connection of a dead runtime was handed out"
        );
        let id = exchange(&mut conn).await;
        c.release(conn);
        assert_eq!(c.idle_count(), 1);
        server.close_connections();
        server.wait_for(|s| s.conns[id].closed).await;
        assert!(
            wait_until(Duration::from_secs(1), || c.idle_count() == 0).await,
            "no reaper on the second runtime"
        );
    });
    drop(server_rt);
}

#[tokio::test]
async fn a_release_outside_any_runtime_does_not_disable_the_reaper() {
    let server = TestServer::start(Behaviour::Http);
    let peer = tls_peer(&server);
    let c = connector(|_| {});
    let mut conn = c.get(&peer).await.unwrap();
    let id = exchange(&mut conn).await;
    let c2 = c.clone();
    std::thread::spawn(move || c2.release(conn)).join().unwrap();
    assert_eq!(c.idle_count(), 1);

    let mut conn = c.get(&peer).await.unwrap();
    assert!(conn.reused());
    assert_eq!(exchange(&mut conn).await, id);
    c.release(conn);
    server.close_connections();
    server.wait_for(|s| s.conns[id].closed).await;
    assert!(
        wait_until(Duration::from_secs(1), || c.idle_count() == 0).await,
        "no reaper after a release outside the runtime"
    );
}

/// A peer caches its key's pool entry for the hit path (no map lookup). The cache must never
/// outlive the map's entry: once the reaper forgot the key, the same peer object and a peer
/// built anew with an equal key must share one new entry (one connection count, one cap, one
/// idle list), and an edited peer must never use the entry of the peer it was edited from.
#[tokio::test]
async fn a_peer_s_cached_pool_entry_follows_the_map_after_the_key_is_forgotten() {
    let server = TestServer::start(Behaviour::Http);
    let peer = tls_peer(&server);
    let c = connector(|o| {
        o.idle_timeout = Duration::from_millis(300);
        o.reap_interval = Duration::from_millis(20);
        o.max_connections_per_peer = Some(1);
        o.wait_timeout = Duration::from_millis(100);
    });
    let mut conn = c.get(&peer).await.unwrap();
    exchange(&mut conn).await;
    c.release(conn);
    let conn = c.get(&peer).await.unwrap();
    assert!(
        conn.reused(),
        "the second get goes through the cached entry"
    );
    drop(conn);
    // Unused for its idle timeout with no connections: the reaper forgets the key.
    assert!(
        support::wait_until(Duration::from_secs(3), || {
            c.stats_for(&peer) == upstream_pool::PeerStats::default()
        })
        .await,
        "the key was forgotten"
    );

    // The same peer object dials into a new entry, which a rebuilt peer finds in the map.
    let mut held = c.get(&peer).await.unwrap();
    assert!(!held.reused());
    exchange(&mut held).await;
    assert_eq!(server.stats().accepted, 2);
    let rebuilt = tls_peer(&server);
    assert_eq!(c.connection_count_for(&rebuilt), 1, "one entry for the key");
    assert_eq!(c.stats_for(&rebuilt).checkouts_new, 1, "counted from zero");
    let waited = c.get(&rebuilt).await.unwrap_err();
    assert_eq!(
        waited.kind(),
        upstream_pool::ErrorKind::PoolTimedout,
        "the cap of 1 is shared by the cached peer and the rebuilt one"
    );
    c.release(held);
    let conn = c.get(&rebuilt).await.unwrap();
    assert!(
        conn.reused(),
        "the rebuilt peer gets what the cached one released"
    );
    c.release(conn);
    let conn = c.get(&peer).await.unwrap();
    assert!(conn.reused());
    c.release(conn);
    assert_eq!(server.stats().accepted, 2);

    // An edited clone is another key: it never takes the original's connection.
    let other = peer.clone().with_group("other");
    let conn = c.get(&other).await.unwrap();
    assert!(!conn.reused());
    assert_eq!(server.stats().accepted, 3);
    assert_eq!(c.idle_count_for(&peer), 1);
    drop(conn);
}
