//! TLS session resumption, keyed by the exact peer (issue 4).
//!
//! Every test runs real OpenSSL servers on loopback (in-process tokio-openssl servers with
//! a session cache and tickets on, or an `openssl s_server` child) for TLS 1.2 and TLS 1.3,
//! and checks what the *server* did (full or resumed handshake). Where the question is
//! whether the client even *offered* a session, connections go through [`Relay`], a TCP
//! relay that records each ClientHello, and the test looks for a session ticket or a
//! pre-shared key in it.
//!
//! To force a fresh dial, the first connection is dropped (never pooled) or the connector
//! keeps no idle connections (`max_idle_per_peer = 0`).

mod support;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openssl::ssl::SslVersion;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use upstream_pool::{Alpn, CertKey, Connection, Connector, ConnectorOptions, Peer};

use support::certs::TestPki;
use support::client::http_get;
use support::s_server::{openssl_cli_available, SServer, SServerOptions};
use support::server::{AlpnPolicy, ClientAuth, TestServer, TestServerBuilder};

const VERSIONS: [SslVersion; 2] = [SslVersion::TLS1_2, SslVersion::TLS1_3];

fn pki() -> &'static TestPki {
    TestPki::shared()
}

fn connector() -> Connector {
    Connector::new(ConnectorOptions::default()).unwrap()
}

fn connector_with(f: impl FnOnce(&mut ConnectorOptions)) -> Connector {
    let mut options = ConnectorOptions::default();
    f(&mut options);
    Connector::new(options).unwrap()
}

/// SNI `localhost`, trusting root A.
fn trusted(addr: SocketAddr) -> Peer {
    Peer::tls(addr, "localhost").with_ca(pki().ca_a())
}

fn client_a() -> CertKey {
    let id = &pki().client_a;
    CertKey::new(id.cert.clone(), id.key.clone(), id.intermediates.clone()).unwrap()
}

fn server(version: SslVersion) -> TestServerBuilder {
    TestServer::builder().version(version)
}

/// One HTTP exchange; for TLS 1.3 this is also what delivers the session tickets.
async fn exchange(conn: &mut Connection) {
    let response = http_get(conn, "localhost").await.unwrap();
    assert_eq!(response.status, 200);
}

/// Dials (the pool must not have an idle connection), does one exchange and drops the
/// connection without a TLS shutdown. Returns whether the client says it resumed.
async fn dial_exchange_drop(connector: &Connector, peer: &Peer) -> bool {
    let mut conn = connector.get(peer).await.unwrap();
    assert!(
        !conn.reused(),
        "expected a fresh dial, got a pooled connection"
    );
    exchange(&mut conn).await;
    let resumed = conn.digest().unwrap().session_reused;
    drop(conn);
    resumed
}

/// Waits until the server has completed `n` handshakes and returns, per handshake in
/// accept order, whether the server resumed it.
async fn server_resumed(server: &TestServer, n: usize) -> Vec<bool> {
    let stats = server.wait_for(|s| s.handshakes >= n).await;
    assert_eq!(
        stats.handshakes, n,
        "unexpected extra handshakes: {stats:#?}"
    );
    stats
        .conns
        .iter()
        .filter(|c| c.handshake_done)
        .map(|c| c.resumed)
        .collect()
}

// ---------------------------------------------------------------------------------------
// A TCP relay that records ClientHellos.
// ---------------------------------------------------------------------------------------

/// Forwards every accepted connection to the current target and records the first TLS
/// record each client sent (its ClientHello). The target can be switched, so a "restarted"
/// upstream (new session keys, same address) can be simulated.
struct Relay {
    addr: SocketAddr,
    target: Arc<Mutex<SocketAddr>>,
    hellos: Arc<Mutex<Vec<Vec<u8>>>>,
    task: JoinHandle<()>,
}

impl Relay {
    async fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let target = Arc::new(Mutex::new(target));
        let hellos = Arc::new(Mutex::new(Vec::new()));
        let (t, h) = (target.clone(), hellos.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let to = *t.lock().unwrap();
                let slot = {
                    let mut hellos = h.lock().unwrap();
                    hellos.push(Vec::new());
                    hellos.len() - 1
                };
                tokio::spawn(relay_one(client, to, h.clone(), slot));
            }
        });
        Relay {
            addr,
            target,
            hellos,
            task,
        }
    }

    fn switch_to(&self, target: SocketAddr) {
        *self.target.lock().unwrap() = target;
    }

    /// ClientHello records seen so far, in accept order.
    fn hellos(&self) -> Vec<Vec<u8>> {
        self.hellos.lock().unwrap().clone()
    }

    /// Whether the `i`-th connection's ClientHello offered a session.
    fn offered(&self, i: usize) -> bool {
        let hellos = self.hellos();
        let hello = hellos
            .get(i)
            .unwrap_or_else(|| panic!("no connection #{i} through the relay"));
        offers_session(hello).unwrap_or_else(|| panic!("connection #{i}: no ClientHello"))
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay_one(
    mut client: TcpStream,
    to: SocketAddr,
    hellos: Arc<Mutex<Vec<Vec<u8>>>>,
    slot: usize,
) {
    let Ok(mut upstream) = TcpStream::connect(to).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    // Forward and record until the first record is complete.
    let mut first = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let complete = first.len() >= 5
            && first.len() >= 5 + (usize::from(first[3]) << 8 | usize::from(first[4]));
        if complete {
            break;
        }
        match client.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                first.extend_from_slice(&buf[..n]);
                if upstream.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
    hellos.lock().unwrap()[slot] = first;
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}

/// Whether a ClientHello record offers a session to resume: a non-empty `session_ticket`
/// extension (35, TLS 1.2 tickets) or a `pre_shared_key` extension (41, TLS 1.3). `None`
/// if the bytes are not a ClientHello. (Session-id-only TLS 1.2 offers cannot be told
/// apart from OpenSSL's random TLS 1.3 compatibility session id, so tests that ask this use
/// servers that issue tickets.)
fn offers_session(record: &[u8]) -> Option<bool> {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        if b.len() < n {
            return None;
        }
        let (head, tail) = b.split_at(n);
        *b = tail;
        Some(head)
    }
    fn u8_(b: &mut &[u8]) -> Option<usize> {
        take(b, 1).map(|x| usize::from(x[0]))
    }
    fn u16_(b: &mut &[u8]) -> Option<usize> {
        take(b, 2).map(|x| usize::from(x[0]) << 8 | usize::from(x[1]))
    }
    let mut r = record;
    if u8_(&mut r)? != 22 {
        return None;
    }
    take(&mut r, 2)?;
    let len = u16_(&mut r)?;
    let mut hs = take(&mut r, len)?;
    if u8_(&mut hs)? != 1 {
        return None;
    }
    take(&mut hs, 3)?;
    take(&mut hs, 2 + 32)?; // version, random
    let n = u8_(&mut hs)?;
    take(&mut hs, n)?; // session id
    let n = u16_(&mut hs)?;
    take(&mut hs, n)?; // cipher suites
    let n = u8_(&mut hs)?;
    take(&mut hs, n)?; // compression
    let n = u16_(&mut hs)?;
    let mut exts = take(&mut hs, n)?;
    let mut offered = false;
    while !exts.is_empty() {
        let ty = u16_(&mut exts)?;
        let n = u16_(&mut exts)?;
        take(&mut exts, n)?;
        offered |= ty == 41 || (ty == 35 && n > 0);
    }
    Some(offered)
}

// ---------------------------------------------------------------------------------------
// The second fresh connection resumes.
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn second_fresh_connection_resumes() {
    for version in VERSIONS {
        let server = server(version).start();
        let connector = connector();
        let peer = trusted(server.addr());

        assert!(
            !dial_exchange_drop(&connector, &peer).await,
            "{version:?}: first"
        );
        // One cached session serves every later dial, not just the next one.
        assert!(
            dial_exchange_drop(&connector, &peer).await,
            "{version:?}: second"
        );
        assert!(
            dial_exchange_drop(&connector, &peer).await,
            "{version:?}: third"
        );

        assert_eq!(
            server_resumed(&server, 3).await,
            [false, true, true],
            "{version:?}: server-side full/resumed per handshake"
        );
    }
}

/// One cached session serves many dials even when none of them delivers a fresh session
/// (the connections are held open and never read, so no TLS 1.3 ticket reaches the cache).
/// OpenSSL marks a TLS 1.3 session "used" once it resumed a handshake, so the cache must not
/// hand out the session object itself.
#[tokio::test]
async fn one_cached_session_serves_many_dials_without_new_tickets() {
    for version in VERSIONS {
        let server = server(version).start();
        let relay = Relay::start(server.addr()).await;
        let connector = connector();
        let peer = trusted(relay.addr);
        assert!(!dial_exchange_drop(&connector, &peer).await);

        let mut held = Vec::new();
        for i in 1..=5 {
            let conn = connector.get(&peer).await.unwrap();
            assert!(!conn.reused());
            assert!(
                conn.digest().unwrap().session_reused,
                "{version:?}: dial {i}"
            );
            held.push(conn);
        }
        assert_eq!(
            server_resumed(&server, 6).await,
            [false, true, true, true, true, true]
        );
        assert!((1..=5).all(|i| relay.offered(i)), "{version:?}");
    }
}

/// The first connection is released, but the pool keeps no idle connections: it is closed
/// (capacity eviction) and the next `get` dials again and resumes.
#[tokio::test]
async fn released_but_not_pooled_connection_lets_the_next_dial_resume() {
    for version in VERSIONS {
        let server = server(version).start();
        let connector = connector_with(|o| o.max_idle_per_peer = 0);
        let peer = trusted(server.addr());

        for round in 0..3 {
            let mut conn = connector.get(&peer).await.unwrap();
            assert!(!conn.reused());
            exchange(&mut conn).await;
            assert_eq!(
                conn.digest().unwrap().session_reused,
                round > 0,
                "{version:?}: round {round}"
            );
            connector.release(conn);
            assert_eq!(connector.idle_count_for(&peer), 0);
        }
        assert_eq!(server_resumed(&server, 3).await, [false, true, true]);
    }
}

/// An idle pooled connection that the upstream closed is evicted; the replacement dial
/// resumes.
#[tokio::test]
async fn replacement_for_a_connection_closed_by_the_upstream_resumes() {
    for version in VERSIONS {
        let server = server(version).start();
        let connector = connector();
        let peer = trusted(server.addr());

        let mut conn = connector.get(&peer).await.unwrap();
        exchange(&mut conn).await;
        connector.release(conn);
        assert_eq!(connector.idle_count_for(&peer), 1);
        server.close_connections();
        server.wait_for(|s| s.open == 0).await;
        // The pool notices at checkout (or the reaper does first); either way: a new dial.
        let mut conn = connector.get(&peer).await.unwrap();
        assert!(
            !conn.reused(),
            "{version:?}: a closed connection was handed out"
        );
        exchange(&mut conn).await;
        assert!(conn.digest().unwrap().session_reused, "{version:?}");
        assert_eq!(server_resumed(&server, 2).await, [false, true]);
    }
}

// ---------------------------------------------------------------------------------------
// Dropping without a shutdown does not spoil the session.
// ---------------------------------------------------------------------------------------

/// OpenSSL marks a session not resumable when its `SSL` is freed without a shutdown; the
/// connection's `Drop` must prevent that. The first connection is dropped as a proxy would
/// drop one after an error: mid-stream, with no close_notify.
#[tokio::test]
async fn first_connection_dropped_without_shutdown_still_lets_the_second_resume() {
    for version in VERSIONS {
        let server = server(version).start();
        let connector = connector();
        let peer = trusted(server.addr());

        let mut conn = connector.get(&peer).await.unwrap();
        exchange(&mut conn).await;
        // Start a second request and drop the connection before its response arrives.
        conn.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        drop(conn);
        // Wait until the server has seen the connection end.
        server.wait_for(|s| s.open == 0).await;

        assert!(dial_exchange_drop(&connector, &peer).await, "{version:?}");
        assert_eq!(server_resumed(&server, 2).await, [false, true]);
    }
}

/// TLS 1.2: the session exists when the handshake ends, so a connection dropped right
/// after `get` (no I/O at all) still leaves a resumable session.
#[tokio::test]
async fn tls12_connection_dropped_right_after_get_leaves_a_resumable_session() {
    let server = server(SslVersion::TLS1_2).start();
    let connector = connector();
    let peer = trusted(server.addr());

    drop(connector.get(&peer).await.unwrap());
    assert!(dial_exchange_drop(&connector, &peer).await);
    assert_eq!(server_resumed(&server, 2).await, [false, true]);
}

/// TLS 1.3: tickets arrive after the handshake. A connection dropped before reading
/// anything can only leave a session if the tickets are already on its socket when it is
/// dropped; `Connection::drop` then lets OpenSSL read them. Here they are (the server has
/// finished its side of the handshake, which includes writing the tickets, and the test
/// yields to the reactor so it sees the socket readable).
#[tokio::test]
async fn tls13_connection_dropped_without_reading_keeps_tickets_already_received() {
    let server = server(SslVersion::TLS1_3).start();
    let connector = connector();
    let peer = trusted(server.addr());

    let conn = connector.get(&peer).await.unwrap();
    server.wait_for(|s| s.handshakes == 1).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    drop(conn);
    assert!(dial_exchange_drop(&connector, &peer).await);
    assert_eq!(server_resumed(&server, 2).await, [false, true]);
}

// ---------------------------------------------------------------------------------------
// Peers that differ in any connection-shaping setting never share a session.
// ---------------------------------------------------------------------------------------

/// The server of the isolation tests: a certificate also valid for `alt.test`, ALPN, and an
/// optional client certificate, so every peer variant below can complete a handshake, and
/// OpenSSL would happily resume any session it is offered.
fn permissive_server(version: SslVersion) -> TestServer {
    let identity = pki().leaf("localhost", &["localhost", "alt.test", "127.0.0.1"]);
    server(version)
        .identity(&identity)
        .alpn(AlpnPolicy::h2_then_h1())
        .client_auth(ClientAuth::Optional { ca: pki().ca_a() })
        .start()
}

/// `(what differs, base peer, variant)`: each variant differs from its base in exactly one
/// connection-shaping setting.
fn variants(addr: SocketAddr) -> Vec<(&'static str, Peer, Peer)> {
    let base = trusted(addr);
    let both_roots = vec![pki().root_a.cert.clone(), pki().root_b.cert.clone()];
    vec![
        ("CA set", base.clone(), base.clone().with_ca(both_roots)),
        (
            "client certificate",
            base.clone(),
            base.clone().with_client_cert(client_a()),
        ),
        (
            "SNI",
            base.clone(),
            Peer::tls(addr, "alt.test").with_ca(pki().ca_a()),
        ),
        (
            "no SNI",
            base.clone(),
            Peer::tls(addr, "").with_ca(pki().ca_a()),
        ),
        ("ALPN", base.clone(), base.clone().with_alpn(Alpn::H1)),
        (
            "ALPN list",
            base.clone().with_alpn(Alpn::H1),
            base.clone().with_alpn(Alpn::H2H1),
        ),
        (
            "verify_cert",
            base.clone(),
            base.clone().with_verify_cert(false),
        ),
        (
            "verify_hostname",
            base.clone(),
            base.clone().with_verify_hostname(false),
        ),
        (
            "alternative CN",
            base.clone(),
            base.clone().with_alternative_cn("alt.test"),
        ),
        ("curves", base.clone(), base.clone().with_curves("P-256")),
        ("group", base.clone(), base.clone().with_group("tenant-b")),
    ]
}

/// For every variant, in both directions (so an unverified session is never resumed by a
/// verifying peer, nor the reverse): `a` dials twice (full, then resumed: the server does
/// resume sessions it is offered), then `b` dials: the client must not offer `a`'s session
/// and the server must do a full handshake; `b`'s second dial resumes its own session.
#[tokio::test]
async fn peer_differing_in_one_setting_never_resumes_anothers_session() {
    for version in VERSIONS {
        let server = permissive_server(version);
        let relay = Relay::start(server.addr()).await;
        let mut n = 0;
        for (what, base, variant) in variants(relay.addr) {
            for (a, b, dir) in [
                (&base, &variant, "base→variant"),
                (&variant, &base, "variant→base"),
            ] {
                let ctx = format!("{version:?} {what} {dir}");
                let connector = connector();
                assert!(!dial_exchange_drop(&connector, a).await, "{ctx}: a #1");
                assert!(dial_exchange_drop(&connector, a).await, "{ctx}: a #2");
                assert!(!dial_exchange_drop(&connector, b).await, "{ctx}: b #1");
                assert!(dial_exchange_drop(&connector, b).await, "{ctx}: b #2");
                let resumed = server_resumed(&server, n + 4).await;
                assert_eq!(
                    resumed[n..],
                    [false, true, false, true],
                    "{ctx}: server side"
                );
                assert!(relay.offered(n + 1), "{ctx}: a #2 offered nothing");
                assert!(!relay.offered(n + 2), "{ctx}: b #1 offered a's session");
                n += 4;
            }
        }
    }
}

/// Same, with both peers' sessions cached at once in one connector: each keeps resuming its
/// own.
#[tokio::test]
async fn sessions_of_different_peers_coexist() {
    for version in VERSIONS {
        let server = permissive_server(version);
        let connector = connector();
        let plain = trusted(server.addr());
        let unverified = plain.clone().with_verify_cert(false);
        let with_cert = plain.clone().with_client_cert(client_a());
        for peer in [&plain, &unverified, &with_cert] {
            assert!(
                !dial_exchange_drop(&connector, peer).await,
                "{version:?} {peer:?}"
            );
        }
        for peer in [&with_cert, &plain, &unverified] {
            assert!(
                dial_exchange_drop(&connector, peer).await,
                "{version:?} {peer:?}"
            );
        }
        let stats = server.wait_for(|s| s.handshakes == 6).await;
        assert_eq!(stats.resumed, 3);
        // The resumed client-certificate session is the one that carried the certificate.
        assert_eq!(
            stats.conns[3].client_cert_cns.first().map(String::as_str),
            Some("client-a")
        );
        assert!(stats.conns[3].resumed);
    }
}

// ---------------------------------------------------------------------------------------
// Servers that reject resumption; expired sessions.
// ---------------------------------------------------------------------------------------

/// The upstream "restarts" (same address, new ticket keys): the old session is offered
/// once, rejected, the connection still completes with a full handshake, and the new
/// session replaces it. Then it restarts without resumption at all: the rejected session is
/// offered once and then never again.
#[tokio::test]
async fn rejected_session_still_connects_and_is_replaced_or_dropped() {
    for version in VERSIONS {
        let first = server(version).start();
        let restarted = server(version).start();
        let no_resumption = server(version).resumption(false).start();
        let relay = Relay::start(first.addr()).await;
        let connector = connector();
        let peer = trusted(relay.addr);

        assert!(!dial_exchange_drop(&connector, &peer).await);
        assert!(dial_exchange_drop(&connector, &peer).await);
        assert_eq!(server_resumed(&first, 2).await, [false, true]);

        relay.switch_to(restarted.addr());
        assert!(!dial_exchange_drop(&connector, &peer).await, "{version:?}");
        assert!(
            relay.offered(2),
            "{version:?}: the old session was not offered"
        );
        assert!(
            dial_exchange_drop(&connector, &peer).await,
            "{version:?}: not replaced"
        );
        assert_eq!(server_resumed(&restarted, 2).await, [false, true]);

        relay.switch_to(no_resumption.addr());
        for i in 0..3 {
            assert!(
                !dial_exchange_drop(&connector, &peer).await,
                "{version:?} #{i}"
            );
        }
        assert_eq!(
            server_resumed(&no_resumption, 3).await,
            [false, false, false]
        );
        assert!(
            relay.offered(4),
            "{version:?}: the last session was not offered"
        );
        assert!(
            !relay.offered(5),
            "{version:?}: rejected session offered again"
        );
        assert!(
            !relay.offered(6),
            "{version:?}: rejected session offered again"
        );
    }
}

/// A server whose sessions live one second: after that the client does not offer the
/// session any more (the server would reject it anyway).
#[tokio::test]
async fn expired_session_is_not_offered() {
    for version in VERSIONS {
        let server = server(version)
            .session_timeout(Duration::from_secs(1))
            .start();
        let relay = Relay::start(server.addr()).await;
        let connector = connector();
        let peer = trusted(relay.addr);

        assert!(!dial_exchange_drop(&connector, &peer).await);
        assert!(
            dial_exchange_drop(&connector, &peer).await,
            "{version:?}: fresh session"
        );
        // Session times have a one-second resolution: wait well past the lifetime.
        tokio::time::sleep(Duration::from_millis(2_500)).await;
        assert!(!dial_exchange_drop(&connector, &peer).await, "{version:?}");
        assert!(relay.offered(1));
        assert!(
            !relay.offered(2),
            "{version:?}: an expired session was offered"
        );
        assert_eq!(server_resumed(&server, 3).await, [false, true, false]);
    }
}

// ---------------------------------------------------------------------------------------
// Turning resumption off.
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn session_cache_size_zero_disables_resumption() {
    for version in VERSIONS {
        let server = server(version).start();
        let relay = Relay::start(server.addr()).await;
        let connector = connector_with(|o| o.session_cache_size = 0);
        let peer = trusted(relay.addr);
        for i in 0..3 {
            assert!(
                !dial_exchange_drop(&connector, &peer).await,
                "{version:?} #{i}"
            );
            assert!(!relay.offered(i), "{version:?} #{i}: offered a session");
        }
        assert_eq!(server_resumed(&server, 3).await, [false, false, false]);
    }
}

/// `with_session_resumption(false)` does not offer (nor store) sessions for that peer, even
/// when an otherwise identical peer has one cached; that other peer still resumes.
#[tokio::test]
async fn per_peer_switch_disables_resumption() {
    for version in VERSIONS {
        let server = server(version).start();
        let relay = Relay::start(server.addr()).await;
        let connector = connector();
        let on = trusted(relay.addr);
        let off = on.clone().with_session_resumption(false);

        assert!(!dial_exchange_drop(&connector, &off).await, "{version:?}");
        assert!(!dial_exchange_drop(&connector, &off).await, "{version:?}");
        // `off` stored nothing: `on` starts with a full handshake.
        assert!(!dial_exchange_drop(&connector, &on).await, "{version:?}");
        assert!(dial_exchange_drop(&connector, &on).await, "{version:?}");
        assert!(!dial_exchange_drop(&connector, &off).await, "{version:?}");
        assert!(dial_exchange_drop(&connector, &on).await, "{version:?}");

        assert_eq!(
            server_resumed(&server, 6).await,
            [false, false, false, true, false, true]
        );
        let offered: Vec<bool> = (0..6).map(|i| relay.offered(i)).collect();
        assert_eq!(
            offered,
            [false, false, false, true, false, true],
            "{version:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Bursts.
// ---------------------------------------------------------------------------------------

/// After one full handshake, 32 concurrent dials all resume from the one cached session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_of_concurrent_dials_all_resume() {
    const BURST: usize = 32;
    for version in VERSIONS {
        let server = server(version).start();
        let relay = Relay::start(server.addr()).await;
        let connector = connector();
        let peer = trusted(relay.addr);
        assert!(!dial_exchange_drop(&connector, &peer).await);
        server.wait_for(|s| s.open == 0).await;

        let barrier = Arc::new(tokio::sync::Barrier::new(BURST));
        let tasks: Vec<_> = (0..BURST)
            .map(|_| {
                let (connector, peer, barrier) = (connector.clone(), peer.clone(), barrier.clone());
                tokio::spawn(async move {
                    let mut conn = connector.get(&peer).await.unwrap();
                    // Hold every connection until all are established: 32 distinct dials.
                    barrier.wait().await;
                    exchange(&mut conn).await;
                    (conn.reused(), conn.digest().unwrap().session_reused)
                })
            })
            .collect();
        for task in tasks {
            let (reused, resumed) = task.await.unwrap();
            assert!(!reused, "{version:?}");
            assert!(resumed, "{version:?}: a burst dial did not resume");
        }
        for i in 1..=BURST {
            assert!(
                relay.offered(i),
                "{version:?}: burst dial {i} offered no session"
            );
        }
        let stats = server.wait_for(|s| s.handshakes == BURST + 1).await;
        assert_eq!(stats.accepted, BURST + 1, "{version:?}");
        assert_eq!(
            stats.resumed, BURST,
            "{version:?}: server-side resumed count"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Cross-check with `openssl s_server`.
// ---------------------------------------------------------------------------------------

/// `s_server -www` reports on its status page whether the handshake was "New" or
/// "Reused".
#[tokio::test]
async fn resumes_against_openssl_s_server() {
    if !openssl_cli_available() {
        eprintln!("SKIPPED: the openssl command-line tool is not installed");
        return;
    }
    for version in VERSIONS {
        let s_server = SServer::start(
            pki(),
            SServerOptions {
                version: Some(version),
                ..SServerOptions::default()
            },
        );
        let connector = connector();
        let peer = trusted(s_server.addr());
        let mut pages = Vec::new();
        let mut client_says = Vec::new();
        for _ in 0..2 {
            let mut conn = connector.get(&peer).await.unwrap();
            conn.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
            let mut page = Vec::new();
            // -www closes after the page, sometimes without close_notify.
            let _ = conn.read_to_end(&mut page).await;
            pages.push(String::from_utf8_lossy(&page).into_owned());
            client_says.push(conn.digest().unwrap().session_reused);
        }
        assert_eq!(client_says, [false, true], "{version:?}");
        assert!(
            pages[0].contains("New, TLSv1."),
            "{version:?}: {}",
            pages[0]
        );
        assert!(
            pages[1].contains("Reused, TLSv1."),
            "{version:?}: {}",
            pages[1]
        );
    }
}
