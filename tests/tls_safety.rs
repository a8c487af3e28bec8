//! TLS safety and hostile input (issue 14): sessions that fail, expire or outlive their
//! certificate; empty SNI; the asking peer's idle timeout; source binding.
//!
//! Every test runs real OpenSSL servers on loopback (in-process tokio-openssl acceptors from
//! `tests/support/server.rs`) and checks what the *server* observed (handshakes, resumption,
//! SNI, source address) or the exact error kind. `Duration::MAX` everywhere is in
//! `tests/extreme_durations.rs` (it installs a process-wide panic hook).

mod support;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, SystemTime};

use openssl::ssl::SslVersion;
use upstream_pool::{Connection, Connector, ConnectorOptions, ErrorKind, Peer};

use support::certs::{CertSpec, Identity, TestPki, SERVER_NAMES};
use support::client::http_get;
use support::server::{ClientAuth, TestServer};

fn pki() -> &'static TestPki {
    TestPki::shared()
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

/// One HTTP exchange; for TLS 1.3 this is also what delivers the session tickets.
async fn exchange(conn: &mut Connection) {
    let response = http_get(conn, "localhost").await.unwrap();
    assert_eq!(response.status, 200);
}

/// Dials a fresh connection, does one exchange and drops it (never pooled). Returns the
/// error kind (and whether it is retryable) if the dial failed.
async fn dial_once(connector: &Connector, peer: &Peer) -> Result<(), (ErrorKind, bool)> {
    match connector.get(peer).await {
        Ok(mut conn) => {
            assert!(!conn.reused(), "expected a fresh dial");
            exchange(&mut conn).await;
            drop(conn);
            Ok(())
        }
        Err(e) => {
            if e.kind() == ErrorKind::TlsHandshakeFailure {
                assert!(
                    e.to_string().contains("cached session"),
                    "a failed resumption should say so: {e}"
                );
            }
            Err((e.kind(), e.retryable()))
        }
    }
}

// ---------------------------------------------------------------------------------------
// Point 1: a session whose resumption fails is forgotten at once.
// ---------------------------------------------------------------------------------------

/// A TLS 1.2 server that requests client certificates without a session id context accepts
/// full handshakes and fails every resumption with a fatal alert. Before the fix the client
/// kept offering the session: [ok, fail, fail, fail]. Now the failed session is forgotten,
/// the failure is retryable (the next dial is a full handshake), and the key takes no new
/// session for a cool-down, so the sequence is [ok, fail, ok, ok] and the server sees exactly
/// one failed handshake.
#[tokio::test]
async fn a_failed_resumption_is_forgotten_and_not_retried_with_a_new_session() {
    let server = TestServer::builder()
        .version(SslVersion::TLS1_2)
        .client_auth(ClientAuth::Optional { ca: pki().ca_a() })
        .session_id_context(false)
        .start();
    let connector = connector_with(|_| {});
    let peer = trusted(server.addr());

    let mut outcomes = Vec::new();
    for _ in 0..4 {
        outcomes.push(dial_once(&connector, &peer).await);
    }
    assert_eq!(
        outcomes,
        vec![
            Ok(()),
            Err((ErrorKind::TlsHandshakeFailure, true)),
            Ok(()),
            Ok(())
        ],
        "dial outcomes (kind, retryable)"
    );

    let stats = server
        .wait_for(|s| s.handshakes + s.handshake_failures >= 4)
        .await;
    assert_eq!(stats.accepted, 4, "{stats:#?}");
    assert_eq!(stats.handshake_failures, 1, "{stats:#?}");
    assert_eq!(stats.handshakes, 3, "{stats:#?}");
    assert_eq!(stats.resumed, 0, "{stats:#?}");
    let failed = &stats.conns[1];
    assert!(!failed.handshake_done, "{failed:#?}");
    assert!(
        failed
            .error
            .as_deref()
            .is_some_and(|e| e.contains("session id context")),
        "the server should have failed the resumption itself: {failed:#?}"
    );
}

/// A server that resumes fine is unaffected: full, then resumed, resumed.
#[tokio::test]
async fn a_working_resumption_still_resumes() {
    let server = TestServer::builder().version(SslVersion::TLS1_2).start();
    let connector = connector_with(|_| {});
    let peer = trusted(server.addr());
    for _ in 0..3 {
        dial_once(&connector, &peer).await.unwrap();
    }
    let stats = server.wait_for(|s| s.handshakes >= 3).await;
    let resumed: Vec<bool> = stats.conns.iter().map(|c| c.resumed).collect();
    assert_eq!(resumed, vec![false, true, true]);
}

// ---------------------------------------------------------------------------------------
// Point 2: an empty SNI skips the name check only, never the chain.
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn empty_sni_still_verifies_the_chain() {
    // Root B's leaf is not trusted by root A: must fail, with no SNI sent.
    let untrusted = TestServer::builder().identity(&pki().server_b).start();
    let connector = connector_with(|_| {});
    let peer = Peer::tls(untrusted.addr(), "").with_ca(pki().ca_a());
    let err = connector.get(&peer).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidCert, "{err}");
    assert!(!err.retryable());
    let stats = untrusted
        .wait_for(|s| s.accepted == 1 && s.conns[0].closed)
        .await;
    assert_eq!(stats.handshakes, 0, "{stats:#?}");
    assert_eq!(stats.conns[0].sni, None, "no SNI may be sent: {stats:#?}");

    // Only turning verification off accepts it.
    let unverified = Peer::tls(untrusted.addr(), "").with_verify_cert(false);
    let conn = connector.get(&unverified).await.unwrap();
    drop(conn);

    // A trusted chain connects, still without SNI, whatever names the certificate has.
    let trusted_server = TestServer::builder().identity(&pki().other_host).start();
    let peer = Peer::tls(trusted_server.addr(), "").with_ca(pki().ca_a());
    let mut conn = connector.get(&peer).await.unwrap();
    exchange(&mut conn).await;
    let stats = trusted_server.wait_for(|s| s.handshakes == 1).await;
    assert_eq!(stats.conns[0].sni, None, "{stats:#?}");
}

// ---------------------------------------------------------------------------------------
// Point 3: resumption never outlives the certificate, nor the maximum authentication age.
// ---------------------------------------------------------------------------------------

/// A server leaf valid for a few more seconds (chained to root A through intermediate A).
fn short_lived_leaf(valid_for: Duration) -> Identity {
    let now = SystemTime::now();
    pki().intermediate_a.issue(
        &CertSpec::server("localhost", SERVER_NAMES)
            .with_validity(now - Duration::from_secs(3600), now + valid_for),
    )
}

async fn no_resumption_after_the_certificate_expired(version: SslVersion) {
    let valid_for = Duration::from_secs(3);
    let expires = tokio::time::Instant::now() + valid_for;
    let leaf = short_lived_leaf(valid_for);
    let server = TestServer::builder()
        .version(version)
        .identity(&leaf)
        .start();
    let connector = connector_with(|_| {});
    let peer = trusted(server.addr());

    dial_once(&connector, &peer).await.unwrap();
    dial_once(&connector, &peer).await.unwrap();
    let stats = server.wait_for(|s| s.handshakes == 2).await;
    assert!(
        stats.conns[1].resumed,
        "second dial should resume: {stats:#?}"
    );

    // notAfter has whole seconds: wait until it has surely passed.
    tokio::time::sleep_until(expires + Duration::from_millis(1200)).await;
    let outcome = dial_once(&connector, &peer).await;
    assert_eq!(
        outcome,
        Err((ErrorKind::InvalidCert, false)),
        "the expired certificate must be verified (and rejected), not resumed past"
    );
    let stats = server
        .wait_for(|s| s.accepted == 3 && s.conns[2].closed)
        .await;
    assert_eq!(stats.handshakes, 2, "{stats:#?}");
    assert!(!stats.conns[2].resumed, "{stats:#?}");
}

#[tokio::test]
async fn no_resumption_after_the_certificate_expired_tls12() {
    no_resumption_after_the_certificate_expired(SslVersion::TLS1_2).await;
}

#[tokio::test]
async fn no_resumption_after_the_certificate_expired_tls13() {
    no_resumption_after_the_certificate_expired(SslVersion::TLS1_3).await;
}

/// With TLS 1.3 every resumed connection brings a new ticket. The authentication age still
/// counts from the original full handshake: dials at 0, 0.5 and 1 s resume, the one at 2 s
/// (past the 1.5 s limit) is a full handshake again, which starts a new age.
#[tokio::test]
async fn ticket_renewal_does_not_extend_the_authentication_age() {
    let server = TestServer::builder().version(SslVersion::TLS1_3).start();
    let connector = connector_with(|o| o.session_max_auth_age = Duration::from_millis(1500));
    let peer = trusted(server.addr());
    let start = tokio::time::Instant::now();
    for at_ms in [0u64, 500, 1000, 2000, 2300] {
        tokio::time::sleep_until(start + Duration::from_millis(at_ms)).await;
        dial_once(&connector, &peer).await.unwrap();
    }
    let stats = server.wait_for(|s| s.handshakes == 5).await;
    let resumed: Vec<bool> = stats.conns.iter().map(|c| c.resumed).collect();
    assert_eq!(resumed, vec![false, true, true, false, true], "{stats:#?}");
}

#[test]
fn a_zero_authentication_age_is_invalid_config() {
    let mut options = ConnectorOptions::default();
    options.session_max_auth_age = Duration::ZERO;
    let err = Connector::new(options).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig);
    assert!(err.to_string().contains("session_max_auth_age"), "{err}");
}

// ---------------------------------------------------------------------------------------
// Point 5: a checkout uses the smaller of the asking and the dialling peer's idle timeout.
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn the_asking_peers_shorter_idle_timeout_applies() {
    let server = TestServer::builder().start();
    let connector = connector_with(|_| {});
    let patient = trusted(server.addr());
    let hasty = trusted(server.addr()).with_idle_timeout(Duration::from_millis(200));

    let mut conn = connector.get(&patient).await.unwrap();
    exchange(&mut conn).await;
    connector.release(conn);
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Idle for 500 ms: fine for `patient` (30 s), too old for `hasty`.
    let mut conn = connector.get(&hasty).await.unwrap();
    assert!(
        !conn.reused(),
        "a connection idle for 500 ms went to a 200 ms peer"
    );
    exchange(&mut conn).await;
    connector.release(conn);
    let stats = server.wait_for(|s| s.accepted == 2).await;
    assert_eq!(stats.conns[0].requests, 1, "{stats:#?}");

    // Within both timeouts, the connection is shared.
    let mut again = connector.get(&hasty).await.unwrap();
    assert!(again.reused());
    exchange(&mut again).await;
    let stats = server.wait_for(|s| s.requests == 3).await;
    assert_eq!(stats.accepted, 2, "{stats:#?}");
    assert_eq!(stats.conns[1].requests, 2, "{stats:#?}");
}

#[tokio::test]
async fn the_dialling_peers_shorter_idle_timeout_applies() {
    let server = TestServer::builder().start();
    let connector = connector_with(|_| {});
    let hasty = trusted(server.addr()).with_idle_timeout(Duration::from_millis(200));
    let patient = trusted(server.addr()).with_idle_timeout(Duration::from_secs(60));

    let mut conn = connector.get(&hasty).await.unwrap();
    exchange(&mut conn).await;
    connector.release(conn);
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut conn = connector.get(&patient).await.unwrap();
    assert!(!conn.reused());
    exchange(&mut conn).await;
    let stats = server.wait_for(|s| s.requests == 2).await;
    assert_eq!(stats.accepted, 2, "{stats:#?}");
}

// ---------------------------------------------------------------------------------------
// Point 6: source binding.
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn bind_to_port_zero_defers_the_port_to_connect() {
    let server = TestServer::builder().start();
    let connector = connector_with(|_| {});
    let peer = trusted(server.addr()).with_bind_to(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
    let mut conn = connector.get(&peer).await.unwrap();
    exchange(&mut conn).await;

    let no_port =
        nix::sys::socket::getsockopt(&conn, nix::sys::socket::sockopt::IpBindAddressNoPort)
            .unwrap();
    assert!(
        no_port,
        "IP_BIND_ADDRESS_NO_PORT must be set on a port-0 bind"
    );

    let local = socket2::SockRef::from(&conn)
        .local_addr()
        .unwrap()
        .as_socket()
        .unwrap();
    let stats = server.wait_for(|s| s.requests == 1).await;
    assert_eq!(stats.conns[0].peer, Some(local), "{stats:#?}");
    assert_ne!(local.port(), 0);
}

#[tokio::test]
async fn a_bind_address_in_use_is_invalid_config() {
    let server = TestServer::builder().start();
    let connector = connector_with(|_| {});
    // The server's own listening address: bind() fails with EADDRINUSE.
    let peer = trusted(server.addr()).with_bind_to(server.addr());
    let err = connector.get(&peer).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{err}");
    assert!(!err.retryable());
    assert!(err.to_string().contains("source address"), "{err}");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(server.stats().accepted, 0);
}

#[tokio::test]
async fn a_bind_address_of_the_other_family_is_invalid_config() {
    let connector = connector_with(|_| {});
    // Nothing needs to listen: the mismatch is found before any packet is sent.
    let peer = Peer::tls("[::1]:9".parse().unwrap(), "localhost")
        .with_bind_to(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
    let err = connector.get(&peer).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{err}");
    assert!(!err.retryable());
}

// ---------------------------------------------------------------------------------------
// Point 7: smaller items.
// ---------------------------------------------------------------------------------------

/// Keys whose dials all fail are forgotten by the reaper even though nothing was ever
/// released (the reaper used to start only at the first release).
#[tokio::test]
async fn keys_of_failed_dials_are_forgotten_without_any_release() {
    // A port nothing listens on: bind, read the port, close.
    let closed = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    // A key is kept for its idle timeout after its last use (its stats and `min_idle` live
    // there), so keep that short.
    let connector = connector_with(|o| {
        o.reap_interval = Duration::from_millis(50);
        o.idle_timeout = Duration::from_millis(100);
    });
    for i in 0..20 {
        let peer = Peer::tcp(addr).with_group(format!("tenant-{i}"));
        let err = connector.get(&peer).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ConnectRefused, "{err}");
    }
    let forgotten = support::wait_until(Duration::from_secs(2), || {
        format!("{connector:?}").contains("keys: 0")
    })
    .await;
    assert!(forgotten, "keys were never forgotten: {connector:?}");
}

/// OpenSSL's default host check accepts partial wildcards ("f*.example.test" for
/// "foo.example.test"); `SslConnector` turns that off, and so must our own host setup.
#[tokio::test]
async fn partial_wildcards_do_not_match() {
    let leaf = pki()
        .intermediate_a
        .issue(&CertSpec::server("wild", &["f*.example.test"]));
    let server = TestServer::builder().identity(&leaf).start();
    let connector = connector_with(|_| {});
    let peer = Peer::tls(server.addr(), "foo.example.test").with_ca(pki().ca_a());
    let err = connector.get(&peer).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidCert, "{err}");
    let stats = server
        .wait_for(|s| s.accepted == 1 && s.conns[0].closed)
        .await;
    assert_eq!(stats.handshakes, 0, "{stats:#?}");
}

/// With verification off OpenSSL still records what the chain check found (here: an
/// untrusted root); a later failure for another reason (no client certificate for a server
/// that requires one) must not be reported as `InvalidCert`.
#[tokio::test]
async fn an_unverified_chain_does_not_label_other_failures_invalid_cert() {
    let server = TestServer::builder()
        .version(SslVersion::TLS1_2)
        .identity(&pki().server_b)
        .client_auth(ClientAuth::Required { ca: pki().ca_a() })
        .start();
    let connector = connector_with(|_| {});
    let peer = Peer::tls(server.addr(), "localhost").with_verify_cert(false);
    let err = connector.get(&peer).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TlsHandshakeFailure, "{err}");
    let stats = server.wait_for(|s| s.handshake_failures == 1).await;
    assert!(
        stats.conns[0]
            .error
            .as_deref()
            .is_some_and(|e| e.contains("certificate")),
        "the server should have refused the missing client certificate: {stats:#?}"
    );
}

/// A connection whose TLS session was shut down (close_notify sent by the caller, or one
/// OpenSSL already received) is not pooled, even before the socket shows anything: the
/// liveness check asks OpenSSL's shutdown state first.
#[tokio::test]
async fn a_shut_down_connection_is_not_pooled() {
    use tokio::io::AsyncWriteExt;

    let server = TestServer::builder().start();
    let connector = connector_with(|_| {});
    let peer = trusted(server.addr());
    let mut conn = connector.get(&peer).await.unwrap();
    exchange(&mut conn).await;
    conn.shutdown().await.unwrap();
    // Released at once, before the server could answer our close_notify and FIN.
    connector.release(conn);
    assert_eq!(connector.idle_count_for(&peer), 0);

    let mut conn = connector.get(&peer).await.unwrap();
    assert!(!conn.reused());
    exchange(&mut conn).await;
    let stats = server.wait_for(|s| s.requests == 2).await;
    assert_eq!(stats.accepted, 2, "{stats:#?}");
}
