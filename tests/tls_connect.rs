//! Dialling one upstream: TCP (v4, v6), Unix sockets, the OpenSSL handshake on top, what
//! the connection reports (`SslDigest`, `TimingDigest`) and how failures are classified.
//!
//! Every test runs a real OpenSSL server on loopback (in-process tokio-openssl, or an
//! `openssl s_server` child) and checks what the *server* observed (SNI, ALPN, group,
//! client certificate, handshake counts), not only what the library returned.

mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant, SystemTime};

use openssl::ssl::SslVersion;
use socket2::SockRef;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use upstream_pool::{
    Alpn, CertKey, Connection, Connector, ConnectorOptions, Error, ErrorKind, Peer, TcpKeepalive,
};

use support::certs::{CertSpec, KeyType, TestPki, OTHER_HOST, SERVER_NAMES, TEST_ORG};
use support::client::http_get;
use support::s_server::{openssl_cli_available, SServer, SServerOptions};
use support::server::{AlpnPolicy, Behaviour, ClientAuth, Listen, TestServer};

const VERSIONS: [SslVersion; 2] = [SslVersion::TLS1_2, SslVersion::TLS1_3];

fn pki() -> &'static TestPki {
    TestPki::shared()
}

fn connector() -> Connector {
    Connector::new(ConnectorOptions::default()).unwrap()
}

/// A TLS peer for `addr` with SNI `localhost`, trusting root A.
fn trusted(addr: SocketAddr) -> Peer {
    Peer::tls(addr, "localhost").with_ca(pki().ca_a())
}

fn client_a() -> CertKey {
    let id = &pki().client_a;
    CertKey::new(id.cert.clone(), id.key.clone(), id.intermediates.clone()).unwrap()
}

fn version_name(v: SslVersion) -> &'static str {
    if v == SslVersion::TLS1_3 {
        "TLSv1.3"
    } else {
        "TLSv1.2"
    }
}

/// `get` must fail; returns the error.
async fn get_err(connector: &Connector, peer: &Peer) -> Error {
    match connector.get(peer).await {
        Ok(conn) => panic!("expected an error for {peer:?}, got {conn:?}"),
        Err(e) => e,
    }
}

/// `get` must fail within `limit` (checked with an outer timeout, so a missing deadline
/// fails the test instead of hanging it); returns the error and how long it took.
async fn get_err_within(connector: &Connector, peer: &Peer, limit: Duration) -> (Error, Duration) {
    let start = Instant::now();
    match tokio::time::timeout(limit, connector.get(peer)).await {
        Err(_) => panic!("get did not give up within {limit:?}"),
        Ok(Ok(conn)) => panic!("expected an error, got {conn:?}"),
        Ok(Err(e)) => (e, start.elapsed()),
    }
}

/// Asserts the error's kind, that its message names the peer address (and SNI when given)
/// and contains `reason` (case-insensitive), and that the Display text starts lowercase.
fn assert_error(err: &Error, kind: ErrorKind, addr: &str, sni: Option<&str>, reason: &str) {
    let msg = err.to_string();
    assert_eq!(err.kind(), kind, "unexpected kind; message: {msg}");
    assert!(msg.contains(addr), "message does not name {addr}: {msg}");
    if let Some(sni) = sni {
        assert!(msg.contains(sni), "message does not name SNI {sni}: {msg}");
    }
    assert!(
        msg.to_lowercase().contains(&reason.to_lowercase()),
        "message does not carry the reason {reason:?}: {msg}"
    );
    let first = msg.chars().next().unwrap();
    assert!(
        first.is_lowercase(),
        "display text must start lowercase: {msg}"
    );
    let peer = err.peer().expect("error names its peer");
    assert!(peer.contains(addr), "peer() {peer:?} does not name {addr}");
}

/// One HTTP/1.1 exchange on the connection; the body names the server's connection id.
async fn exchange(conn: &mut Connection) -> usize {
    let resp = http_get(conn, "localhost").await.unwrap();
    assert_eq!(resp.status, 200);
    resp.conn_id().expect("server names its connection")
}

#[tokio::test]
async fn trusted_chain_digest_and_timing() {
    for v in VERSIONS {
        let server = TestServer::builder().version(v).start();
        let connector = connector();
        let before = SystemTime::now();
        let mut conn = connector.get(&trusted(server.addr())).await.unwrap();
        let after = SystemTime::now();
        assert!(!conn.reused());

        let digest = conn.digest().expect("TLS connection has a digest").clone();
        assert_eq!(digest.version, version_name(v));
        assert!(!digest.session_reused);
        assert_eq!(digest.alpn, None);
        assert_eq!(digest.cert_digest, pki().server.sha256());
        assert_eq!(digest.cert_digest.len(), 32);
        assert_eq!(digest.organization.as_deref(), Some(TEST_ORG));
        assert_eq!(
            digest.serial_number.as_deref(),
            Some(pki().server.serial_hex().as_str())
        );

        let timing = conn.timing().clone();
        assert!(timing.tcp_connect > Duration::ZERO);
        assert!(timing.tls_handshake.is_some_and(|d| d > Duration::ZERO));
        assert!(timing.established_ts >= before && timing.established_ts <= after);

        assert_eq!(exchange(&mut conn).await, 0);
        let stats = server.wait_for(|s| s.handshakes == 1).await;
        assert_eq!(stats.accepted, 1);
        let seen = &stats.conns[0];
        assert_eq!(seen.sni.as_deref(), Some("localhost"));
        assert_eq!(seen.version.as_deref(), Some(digest.version.as_str()));
        assert_eq!(seen.cipher.as_deref(), Some(digest.cipher.as_str()));
        assert!(!seen.resumed);
    }
}

#[tokio::test]
async fn untrusted_ca_is_invalid_cert() {
    let server = TestServer::builder().identity(&pki().server_b).start();
    let addr = server.addr();
    let err = get_err(&connector(), &trusted(addr)).await;
    // server_b is issued by root B; only root A is trusted.
    assert_error(
        &err,
        ErrorKind::InvalidCert,
        &addr.to_string(),
        Some("localhost"),
        "unable to get local issuer certificate",
    );
    assert!(!err.retryable());
    let stats = server.wait_for(|s| s.handshake_failures == 1).await;
    assert_eq!(stats.handshakes, 0);
}

#[tokio::test]
async fn system_roots_do_not_trust_the_test_root() {
    // No with_ca: the system roots are used, which know nothing of the test PKI.
    let server = TestServer::start(Behaviour::Http);
    let addr = server.addr();
    let err = get_err(&connector(), &Peer::tls(addr, "localhost")).await;
    assert_error(
        &err,
        ErrorKind::InvalidCert,
        &addr.to_string(),
        Some("localhost"),
        "issuer",
    );
}

#[tokio::test]
async fn wrong_host_is_invalid_cert() {
    let server = TestServer::builder().identity(&pki().other_host).start();
    let addr = server.addr();
    let err = get_err(&connector(), &trusted(addr)).await;
    assert_error(
        &err,
        ErrorKind::InvalidCert,
        &addr.to_string(),
        Some("localhost"),
        "hostname mismatch",
    );
    assert!(!err.retryable());

    // The right name on the same server works: the chain itself is fine.
    let ok = Peer::tls(addr, OTHER_HOST).with_ca(pki().ca_a());
    let conn = connector().get(&ok).await.unwrap();
    assert_eq!(
        conn.digest().unwrap().cert_digest,
        pki().other_host.sha256()
    );
}

#[tokio::test]
async fn expired_is_invalid_cert() {
    let server = TestServer::builder().identity(&pki().expired).start();
    let addr = server.addr();
    let err = get_err(&connector(), &trusted(addr)).await;
    assert_error(
        &err,
        ErrorKind::InvalidCert,
        &addr.to_string(),
        Some("localhost"),
        "expired",
    );
    assert!(!err.retryable());
}

#[tokio::test]
async fn verify_hostname_off_accepts_wrong_host_but_still_checks_the_chain() {
    let server = TestServer::builder().identity(&pki().other_host).start();
    let peer = trusted(server.addr()).with_verify_hostname(false);
    let mut conn = connector().get(&peer).await.unwrap();
    assert_eq!(
        conn.digest().unwrap().cert_digest,
        pki().other_host.sha256()
    );
    exchange(&mut conn).await;
    let stats = server.wait_for(|s| s.handshakes == 1).await;
    assert_eq!(stats.conns[0].sni.as_deref(), Some("localhost"));

    // Hostname checks off does not mean chain checks off.
    let untrusted = TestServer::builder().identity(&pki().server_b).start();
    let peer = trusted(untrusted.addr()).with_verify_hostname(false);
    let err = get_err(&connector(), &peer).await;
    assert_eq!(err.kind(), ErrorKind::InvalidCert, "{err}");
}

#[tokio::test]
async fn verify_cert_off_accepts_untrusted() {
    let server = TestServer::builder().identity(&pki().server_b).start();
    let peer = trusted(server.addr()).with_verify_cert(false);
    let mut conn = connector().get(&peer).await.unwrap();
    assert_eq!(conn.digest().unwrap().cert_digest, pki().server_b.sha256());
    exchange(&mut conn).await;
    let stats = server.wait_for(|s| s.handshakes == 1).await;
    assert_eq!(stats.conns[0].sni.as_deref(), Some("localhost"));

    // Also an expired certificate for another host.
    let server = TestServer::builder().identity(&pki().expired).start();
    let peer = Peer::tls(server.addr(), "nobody.test").with_verify_cert(false);
    connector().get(&peer).await.unwrap();
}

#[tokio::test]
async fn empty_sni_sends_none() {
    // An empty SNI still verifies the chain (tests/tls_safety.rs); only turning verification
    // off accepts this untrusted one.
    let server = TestServer::builder().identity(&pki().server_b).start();
    let peer = Peer::tls(server.addr(), "")
        .with_ca(pki().ca_a())
        .with_verify_cert(false);
    let mut conn = connector().get(&peer).await.unwrap();
    assert_eq!(conn.digest().unwrap().cert_digest, pki().server_b.sha256());
    exchange(&mut conn).await;
    let stats = server.wait_for(|s| s.handshakes == 1).await;
    assert!(stats.conns[0].handshake_done);
    assert_eq!(stats.conns[0].sni, None, "an empty SNI must not be sent");
}

#[tokio::test]
async fn underscore_sni_matches_dashed_certificate() {
    let leaf = pki().leaf("a-b.example.test", &["a-b.example.test"]);
    let server = TestServer::builder().identity(&leaf).start();
    let addr = server.addr();
    let peer = Peer::tls(addr, "a_b.example.test").with_ca(pki().ca_a());
    let mut conn = connector().get(&peer).await.unwrap();
    assert_eq!(conn.digest().unwrap().cert_digest, leaf.sha256());
    exchange(&mut conn).await;
    let stats = server.wait_for(|s| s.handshakes == 1).await;
    // The name is sent as given; only the verification accepts the dashed form.
    assert_eq!(stats.conns[0].sni.as_deref(), Some("a_b.example.test"));

    // Only underscores become dashes, and only that: another name still fails.
    let wrong = Peer::tls(addr, "a_c.example.test").with_ca(pki().ca_a());
    let err = get_err(&connector(), &wrong).await;
    assert_error(
        &err,
        ErrorKind::InvalidCert,
        &addr.to_string(),
        Some("a_c.example.test"),
        "hostname mismatch",
    );
}

#[tokio::test]
async fn underscore_outside_the_leftmost_label_is_not_rewritten() {
    let leaf = pki().leaf("x.a-b.test", &["x.a-b.test"]);
    let server = TestServer::builder().identity(&leaf).start();
    let peer = Peer::tls(server.addr(), "x.a_b.test").with_ca(pki().ca_a());
    let err = get_err(&connector(), &peer).await;
    assert_eq!(err.kind(), ErrorKind::InvalidCert, "{err}");
}

#[tokio::test]
async fn alternative_cn_is_accepted() {
    let server = TestServer::builder().identity(&pki().other_host).start();
    let peer = trusted(server.addr()).with_alternative_cn(OTHER_HOST);
    let mut conn = connector().get(&peer).await.unwrap();
    assert_eq!(
        conn.digest().unwrap().cert_digest,
        pki().other_host.sha256()
    );
    exchange(&mut conn).await;
    let stats = server.wait_for(|s| s.handshakes == 1).await;
    // The SNI is still the peer's; the alternative CN is only accepted in verification.
    assert_eq!(stats.conns[0].sni.as_deref(), Some("localhost"));

    // The alternative CN's underscore variant is accepted too.
    let leaf = pki().leaf("alt-name.test", &["alt-name.test"]);
    let server = TestServer::builder().identity(&leaf).start();
    let peer = trusted(server.addr()).with_alternative_cn("alt_name.test");
    connector().get(&peer).await.unwrap();

    // And an alternative CN that matches nothing does not help.
    let peer = trusted(server.addr()).with_alternative_cn("unrelated.test");
    let err = get_err(&connector(), &peer).await;
    assert_eq!(err.kind(), ErrorKind::InvalidCert, "{err}");
}

#[tokio::test]
async fn ip_literal_sni_verifies_ip_san_and_is_not_sent() {
    let server = TestServer::start(Behaviour::Http);
    let peer = Peer::tls(server.addr(), "127.0.0.1").with_ca(pki().ca_a());
    let mut conn = connector().get(&peer).await.unwrap();
    exchange(&mut conn).await;
    let stats = server.wait_for(|s| s.handshakes == 1).await;
    // RFC 6066: literal IP addresses are not permitted in server_name.
    assert_eq!(stats.conns[0].sni, None);

    // An IP the certificate does not carry fails.
    let other = pki().leaf("localhost", &["localhost", "127.0.0.9"]);
    let server = TestServer::builder().identity(&other).start();
    let peer = Peer::tls(server.addr(), "127.0.0.1").with_ca(pki().ca_a());
    let err = get_err(&connector(), &peer).await;
    assert_eq!(err.kind(), ErrorKind::InvalidCert, "{err}");
}

#[tokio::test]
async fn mtls_with_intermediate() {
    for v in VERSIONS {
        let server = TestServer::builder()
            .version(v)
            .client_auth(ClientAuth::Required { ca: pki().ca_a() })
            .start();
        let peer = trusted(server.addr()).with_client_cert(client_a());
        let mut conn = connector().get(&peer).await.unwrap();
        exchange(&mut conn).await;
        let stats = server.wait_for(|s| s.handshakes == 1).await;
        let seen = &stats.conns[0];
        assert_eq!(
            seen.client_cert_cns,
            vec![
                "client-a".to_string(),
                "Test Client Intermediate A".to_string()
            ],
            "{v:?}: server must receive the leaf and its intermediate"
        );
        assert!(seen.client_cert_verified, "{v:?}");

        // The same identity loaded from PEM.
        let from_pem =
            CertKey::from_pem(&pki().client_a.chain_pem(), &pki().client_a.key_pem()).unwrap();
        assert_eq!(from_pem.fingerprint(), client_a().fingerprint());
        let peer = trusted(server.addr()).with_client_cert(from_pem);
        let mut conn = connector().get(&peer).await.unwrap();
        exchange(&mut conn).await;
        let stats = server.wait_for(|s| s.handshakes == 2).await;
        assert!(stats.conns[1].client_cert_verified, "{v:?}");
    }
}

#[tokio::test]
async fn mtls_without_the_intermediate_is_rejected_by_the_server() {
    // The server only trusts root A: without the client intermediate the chain cannot be
    // built, so the intermediates we send are what makes mtls_with_intermediate pass.
    let server = TestServer::builder()
        .version(SslVersion::TLS1_2)
        .client_auth(ClientAuth::Required { ca: pki().ca_a() })
        .start();
    let id = &pki().client_a;
    let leaf_only = CertKey::new(id.cert.clone(), id.key.clone(), Vec::new()).unwrap();
    let peer = trusted(server.addr()).with_client_cert(leaf_only);
    let err = get_err(&connector(), &peer).await;
    assert_eq!(err.kind(), ErrorKind::TlsHandshakeFailure, "{err}");
    let stats = server.wait_for(|s| s.handshake_failures == 1).await;
    assert_eq!(stats.handshakes, 0);
}

/// A required client certificate that is missing (or from the wrong CA) fails: in TLS 1.2
/// inside `get`; in TLS 1.3 the client finishes its side of the handshake before the server
/// has checked the certificate, so the failure may only surface on the first read.
#[tokio::test]
async fn required_client_cert_missing_or_untrusted_fails() {
    let client_b = {
        let id = &pki().client_b;
        CertKey::new(id.cert.clone(), id.key.clone(), id.intermediates.clone()).unwrap()
    };
    for v in VERSIONS {
        for cert in [None, Some(client_b.clone())] {
            let server = TestServer::builder()
                .version(v)
                .client_auth(ClientAuth::Required { ca: pki().ca_a() })
                .start();
            let addr = server.addr();
            let mut peer = trusted(addr);
            if let Some(cert) = &cert {
                peer = peer.with_client_cert(cert.clone());
            }
            let what = format!("{v:?}, client cert {}", cert.is_some());
            // The alert OpenSSL's server sends, as the client reports it.
            let alert = match (v == SslVersion::TLS1_3, cert.is_some()) {
                (_, true) => "alert unknown ca",
                (false, false) => "alert handshake failure",
                (true, false) => "alert certificate required",
            };
            match connector().get(&peer).await {
                Err(err) => {
                    assert_error(
                        &err,
                        ErrorKind::TlsHandshakeFailure,
                        &addr.to_string(),
                        Some("localhost"),
                        alert,
                    );
                    assert!(!err.retryable(), "{what}");
                }
                Ok(mut conn) => {
                    assert_eq!(v, SslVersion::TLS1_3, "{what}: TLS 1.2 must fail in get");
                    let write = conn
                        .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
                        .await;
                    let mut buf = [0u8; 64];
                    let read = conn.read(&mut buf).await;
                    // Either the write already fails, or the read returns the server's
                    // alert; never a response.
                    match (write, read) {
                        (Err(_), _) => {}
                        (Ok(()), Err(e)) => assert!(
                            e.to_string().contains(alert),
                            "{what}: read error does not carry the alert: {e}"
                        ),
                        (Ok(()), Ok(n)) => {
                            panic!("{what}: read {n} bytes from a server that rejected us")
                        }
                    }
                }
            }
            let stats = server.wait_for(|s| s.handshake_failures == 1).await;
            assert_eq!(stats.handshakes, 0, "{what}");
            assert_eq!(stats.requests, 0, "{what}");
        }
    }
}

#[tokio::test]
async fn alpn_negotiated_and_visible() {
    let cases: [(Alpn, AlpnPolicy, Option<&[u8]>); 5] = [
        (Alpn::H2H1, AlpnPolicy::h2_then_h1(), Some(b"h2")),
        (Alpn::H2, AlpnPolicy::h2_then_h1(), Some(b"h2")),
        (Alpn::H1, AlpnPolicy::h2_then_h1(), Some(b"http/1.1")),
        (
            Alpn::H2H1,
            AlpnPolicy::fixed(b"http/1.1"),
            Some(b"http/1.1"),
        ),
        // The server supports none of what we offer: no ALPN, still connected.
        (Alpn::H2, AlpnPolicy::fixed(b"http/1.1"), None),
    ];
    for v in VERSIONS {
        for (alpn, policy, want) in cases.clone() {
            let server = TestServer::builder()
                .version(v)
                .alpn(policy.clone())
                .behaviour(Behaviour::Echo)
                .start();
            let peer = trusted(server.addr()).with_alpn(alpn.clone());
            let mut conn = connector().get(&peer).await.unwrap();
            let what = format!("{v:?} {alpn:?} vs {policy:?}");
            assert_eq!(conn.digest().unwrap().alpn.as_deref(), want, "{what}");
            conn.write_all(b"ping").await.unwrap();
            let mut buf = [0u8; 4];
            conn.read_exact(&mut buf).await.unwrap();
            let stats = server.wait_for(|s| s.handshakes == 1).await;
            assert_eq!(stats.conns[0].alpn.as_deref(), want, "{what}");
        }
    }

    // A custom list is offered as given.
    let server = TestServer::builder()
        .alpn(AlpnPolicy::ClientPreference(vec![
            b"x-test/1".to_vec(),
            b"h2".to_vec(),
        ]))
        .start();
    let alpn = Alpn::from_protocols([&b"x-test/1"[..], b"h2"]).unwrap();
    let peer = trusted(server.addr()).with_alpn(alpn);
    let conn = connector().get(&peer).await.unwrap();
    assert_eq!(
        conn.digest().unwrap().alpn.as_deref(),
        Some(&b"x-test/1"[..])
    );
}

#[tokio::test]
async fn curves_restrict_the_group() {
    // An RSA certificate: in TLS 1.2 the curve of an ECDSA certificate must itself be among
    // the client's groups, which would mix certificate and key-exchange restrictions.
    let rsa = pki()
        .intermediate_a
        .issue(&CertSpec::server("localhost", SERVER_NAMES).with_key_type(KeyType::Rsa2048));
    for v in VERSIONS {
        for (curves, group) in [("X25519", "X25519"), ("P-256", "prime256v1")] {
            let server = TestServer::builder().version(v).identity(&rsa).start();
            let peer = trusted(server.addr()).with_curves(curves);
            let mut conn = connector()
                .get(&peer)
                .await
                .unwrap_or_else(|e| panic!("{v:?} {curves}: {e}"));
            exchange(&mut conn).await;
            let stats = server.wait_for(|s| s.handshakes == 1).await;
            assert_eq!(
                stats.conns[0].group.as_deref(),
                Some(group),
                "{v:?} with curves {curves}"
            );
        }

        // A server that only does P-384 against a client restricted to X25519: no common
        // group. TLS 1.3 has no other key exchange, so the handshake fails; TLS 1.2 falls
        // back to finite-field DHE (the RSA certificate allows DHE-RSA), so no EC group is
        // used at all, where an unrestricted client would have got P-384.
        let server = TestServer::builder()
            .version(v)
            .identity(&rsa)
            .groups("P-384")
            .start();
        let addr = server.addr();
        let restricted = trusted(addr).with_curves("X25519");
        if v == SslVersion::TLS1_3 {
            let err = get_err(&connector(), &restricted).await;
            assert_error(
                &err,
                ErrorKind::TlsHandshakeFailure,
                &addr.to_string(),
                Some("localhost"),
                "alert",
            );
            let stats = server.wait_for(|s| s.handshake_failures == 1).await;
            assert_eq!(stats.handshakes, 0);
        } else {
            let mut conn = connector().get(&restricted).await.unwrap();
            let cipher = conn.digest().unwrap().cipher.clone();
            assert!(cipher.starts_with("DHE-RSA-"), "{cipher}");
            exchange(&mut conn).await;
            let stats = server.wait_for(|s| s.handshakes == 1).await;
            assert_eq!(stats.conns[0].group, None);
        }
        // Control: offering P-384 as well gets P-384 from the same server.
        let peer = trusted(addr).with_curves("X25519:P-384");
        let mut conn = connector().get(&peer).await.unwrap();
        exchange(&mut conn).await;
        let stats = server
            .wait_for(|s| s.conns.len() == 2 && s.conns[1].handshake_done)
            .await;
        assert_eq!(stats.conns[1].group.as_deref(), Some("secp384r1"), "{v:?}");
    }
}

#[tokio::test]
async fn non_tls_servers_are_handshake_failures() {
    for behaviour in [
        Behaviour::PlaintextHttp,
        Behaviour::Garbage,
        Behaviour::CloseAfterClientHello,
    ] {
        let server = TestServer::builder()
            .plaintext()
            .behaviour(behaviour)
            .start();
        let addr = server.addr();
        let err = get_err(&connector(), &trusted(addr)).await;
        let msg = err.to_string();
        assert_eq!(
            err.kind(),
            ErrorKind::TlsHandshakeFailure,
            "{behaviour:?}: {msg}"
        );
        assert!(msg.contains(&addr.to_string()), "{behaviour:?}: {msg}");
        assert!(msg.contains("localhost"), "{behaviour:?}: {msg}");
        assert!(!err.retryable(), "{behaviour:?}");
        server.wait_for(|s| s.accepted == 1).await;
    }
}

/// A reset right after accept may be seen by the TCP connect (tokio reads `SO_ERROR`) or by
/// the handshake, depending on timing; either way it is a failure that names the peer and
/// says "reset". (Which kind it should be is an open question: see the report.)
#[tokio::test]
async fn reset_after_accept_fails_cleanly() {
    let server = TestServer::builder()
        .plaintext()
        .behaviour(Behaviour::RstAfterAccept)
        .start();
    let addr = server.addr();
    let err = get_err(&connector(), &trusted(addr)).await;
    let msg = err.to_string();
    assert!(
        matches!(
            err.kind(),
            ErrorKind::ConnectError | ErrorKind::TlsHandshakeFailure
        ),
        "{msg}"
    );
    assert!(msg.contains(&addr.to_string()), "{msg}");
    assert!(msg.to_lowercase().contains("reset"), "{msg}");
    server.wait_for(|s| s.accepted == 1).await;
}

#[tokio::test]
async fn plaintext_peer_on_plaintext_server() {
    let server = TestServer::builder().plaintext().start();
    let peer = Peer::tcp(server.addr());
    let mut conn = connector().get(&peer).await.unwrap();
    assert!(conn.digest().is_none());
    assert!(conn.ssl().is_none());
    assert!(conn.timing().tls_handshake.is_none());
    assert!(conn.timing().tcp_connect > Duration::ZERO);
    assert_eq!(exchange(&mut conn).await, 0);
    assert_eq!(server.stats().requests, 1);
}

#[tokio::test]
async fn never_answering_server_times_out_within_total_timeout() {
    let total = Duration::from_millis(300);
    // Generous: this bounds a timeout, it does not measure speed.
    let margin = Duration::from_millis(1500);

    let server = TestServer::start(Behaviour::NeverAnswer);
    let addr = server.addr();
    // Set on the peer...
    let peer = trusted(addr).with_total_connection_timeout(total);
    let (err, took) = get_err_within(&connector(), &peer, total + margin).await;
    assert_error(
        &err,
        ErrorKind::TlsHandshakeTimedout,
        &addr.to_string(),
        Some("localhost"),
        "timeout",
    );
    assert!(err.retryable());
    assert!(took >= total, "gave up early: {took:?}");

    // ... or as the connector default.
    let mut options = ConnectorOptions::default();
    options.total_connection_timeout = total;
    let connector = Connector::new(options).unwrap();
    let (err, took) = get_err_within(&connector, &trusted(addr), total + margin).await;
    assert_eq!(err.kind(), ErrorKind::TlsHandshakeTimedout, "{err}");
    assert!(took >= total, "gave up early: {took:?}");

    let stats = server.wait_for(|s| s.accepted == 2).await;
    assert_eq!(stats.handshakes, 0);
}

#[tokio::test]
async fn refused_port_is_connect_refused() {
    // Bound but not listening: the kernel answers the SYN with a RST, and nobody else can
    // take the port while we hold it.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind((Ipv4Addr::LOCALHOST, 0).into()).unwrap();
    let addr = socket.local_addr().unwrap();

    for peer in [Peer::tcp(addr), trusted(addr)] {
        let err = get_err(&connector(), &peer).await;
        assert_error(
            &err,
            ErrorKind::ConnectRefused,
            &addr.to_string(),
            peer.sni(),
            "refused",
        );
        assert!(err.retryable());
    }
    drop(socket);
}

#[tokio::test]
async fn ipv6_loopback() {
    let server = match TestServer::builder().listen(Listen::Ipv6).try_start() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("SKIPPED ipv6_loopback: cannot listen on [::1]: {e}");
            return;
        }
    };
    let addr = server.addr();
    assert!(addr.is_ipv6());
    for (sni, sent) in [("localhost", Some("localhost")), ("::1", None)] {
        let peer = Peer::tls(addr, sni).with_ca(pki().ca_a());
        let mut conn = connector().get(&peer).await.unwrap();
        exchange(&mut conn).await;
        let stats = server
            .wait_for(|s| s.conns.last().is_some_and(|c| c.handshake_done))
            .await;
        let seen = stats.last().unwrap();
        assert_eq!(seen.sni.as_deref(), sent, "SNI {sni}");
        assert_eq!(seen.peer.unwrap().ip(), "::1".parse::<IpAddr>().unwrap());
    }
}

#[tokio::test]
async fn unix_socket_plaintext_and_tls() {
    let server = TestServer::builder()
        .plaintext()
        .listen(Listen::Unix)
        .start();
    let path = server.unix_path().unwrap().to_path_buf();
    let mut conn = connector().get(&Peer::unix(&path)).await.unwrap();
    assert!(conn.digest().is_none());
    assert!(conn.timing().tls_handshake.is_none());
    exchange(&mut conn).await;
    assert_eq!(server.stats().requests, 1);

    let server = TestServer::builder().listen(Listen::Unix).start();
    let path = server.unix_path().unwrap().to_path_buf();
    let peer = Peer::unix_tls(&path, "localhost").with_ca(pki().ca_a());
    let mut conn = connector().get(&peer).await.unwrap();
    let digest = conn.digest().expect("TLS over a Unix socket has a digest");
    assert_eq!(digest.cert_digest, pki().server.sha256());
    assert!(conn.timing().tls_handshake.is_some());
    exchange(&mut conn).await;
    let stats = server.wait_for(|s| s.handshakes == 1).await;
    assert_eq!(stats.conns[0].sni.as_deref(), Some("localhost"));

    // Verification applies over Unix sockets too.
    let peer = Peer::unix_tls(&path, "wrong.test").with_ca(pki().ca_a());
    let err = get_err(&connector(), &peer).await;
    assert_error(
        &err,
        ErrorKind::InvalidCert,
        &path.display().to_string(),
        Some("wrong.test"),
        "hostname mismatch",
    );

    // Nothing listening at a path: a transport error naming the path, not a panic.
    let missing = path.with_file_name("missing.sock");
    let err = get_err(&connector(), &Peer::unix(&missing)).await;
    assert!(
        matches!(
            err.kind(),
            ErrorKind::ConnectError | ErrorKind::ConnectRefused
        ),
        "{err}"
    );
    assert!(err.to_string().contains("missing.sock"), "{err}");
}

#[tokio::test]
async fn tcp_nodelay_on_by_default() {
    let server = TestServer::start(Behaviour::Http);
    let conn = connector().get(&trusted(server.addr())).await.unwrap();
    assert!(SockRef::from(&conn).nodelay().unwrap());

    // Control: the setting is really applied (and can be turned off).
    let peer = trusted(server.addr()).with_tcp_nodelay(false);
    let conn = connector().get(&peer).await.unwrap();
    assert!(!SockRef::from(&conn).nodelay().unwrap());

    let plain = TestServer::builder().plaintext().start();
    let conn = connector().get(&Peer::tcp(plain.addr())).await.unwrap();
    assert!(SockRef::from(&conn).nodelay().unwrap());
}

#[tokio::test]
async fn bind_address_is_used() {
    let server = TestServer::start(Behaviour::Http);
    // 127.0.0.2 is loopback too on Linux; seeing it proves the bind happened.
    for local in ["127.0.0.1", "127.0.0.2"] {
        let ip: IpAddr = local.parse().unwrap();
        let peer = trusted(server.addr()).with_bind_to(SocketAddr::new(ip, 0));
        let mut conn = connector().get(&peer).await.unwrap();
        let id = exchange(&mut conn).await;
        let stats = server.stats();
        let seen = stats.conns[id].peer.unwrap();
        assert_eq!(seen.ip(), ip);
        let local_addr = SockRef::from(&conn)
            .local_addr()
            .unwrap()
            .as_socket()
            .unwrap();
        assert_eq!(local_addr, seen, "server sees our socket's local address");
    }

    // A bind address that is not ours: a configuration error naming the peer, not a panic
    // (and not retryable: every dial would fail the same way).
    let peer = trusted(server.addr()).with_bind_to("192.0.2.1:0".parse().unwrap());
    let err = get_err(&connector(), &peer).await;
    assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{err}");
    assert!(!err.retryable());
    assert!(
        err.to_string().contains(&server.addr().to_string()),
        "{err}"
    );
}

#[tokio::test]
async fn tcp_keepalive_is_applied() {
    let server = TestServer::start(Behaviour::Http);
    let keepalive = TcpKeepalive {
        idle: Duration::from_secs(37),
        interval: Duration::from_secs(7),
        count: 4,
    };
    let peer = trusted(server.addr()).with_tcp_keepalive(keepalive);
    let mut conn = connector().get(&peer).await.unwrap();
    exchange(&mut conn).await;
    let sock = SockRef::from(&conn);
    assert!(sock.keepalive().unwrap());
    assert_eq!(sock.keepalive_time().unwrap(), keepalive.idle);
    assert_eq!(sock.keepalive_interval().unwrap(), keepalive.interval);
    assert_eq!(sock.keepalive_retries().unwrap(), keepalive.count);

    // Off by default.
    let conn = connector().get(&trusted(server.addr())).await.unwrap();
    assert!(!SockRef::from(&conn).keepalive().unwrap());
}

#[tokio::test]
async fn openssl_s_server() {
    if !openssl_cli_available() {
        panic!("the openssl CLI is required for this test (it is part of the machine setup)");
    }
    for v in VERSIONS {
        let server = SServer::start(
            pki(),
            SServerOptions {
                version: Some(v),
                alpn: Some("http/1.1".into()),
                ..SServerOptions::default()
            },
        );
        let pid = server.pid();
        let peer = trusted(server.addr()).with_alpn(Alpn::H2H1);
        let mut conn = connector().get(&peer).await.unwrap();
        let digest = conn.digest().unwrap().clone();
        assert_eq!(digest.version, version_name(v));
        assert_eq!(digest.alpn.as_deref(), Some(&b"http/1.1"[..]));
        assert_eq!(digest.cert_digest, pki().server.sha256());

        conn.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
        let mut page = Vec::new();
        // s_server -www closes after the page; a missing close_notify is fine here.
        let _ = tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut page)).await;
        let page = String::from_utf8_lossy(&page);
        assert!(
            page.starts_with("HTTP/1.0 200"),
            "{page}\n--- log ---\n{}",
            server.log()
        );
        // The status page reports what s_server negotiated.
        let line = format!("{}, Cipher is {}", digest.version, digest.cipher);
        assert!(page.contains(&line), "page lacks {line:?}:\n{page}");

        drop(conn);
        drop(server);
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "s_server {pid} still running after the test"
        );
    }
}

#[tokio::test]
async fn error_kinds_and_display() {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind((Ipv4Addr::LOCALHOST, 0).into()).unwrap();
    let refused_addr = socket.local_addr().unwrap();
    let refused = get_err(&connector(), &Peer::tcp(refused_addr)).await;
    assert_eq!(refused.kind(), ErrorKind::ConnectRefused);
    assert!(refused.retryable());
    assert!(!refused.reused());

    let untrusted = TestServer::builder().identity(&pki().server_b).start();
    let invalid = get_err(&connector(), &trusted(untrusted.addr())).await;
    assert_eq!(invalid.kind(), ErrorKind::InvalidCert);
    assert!(!invalid.retryable());

    let bad = Peer::tls(refused_addr, "bad\0name");
    let config = get_err(&connector(), &bad).await;
    assert_eq!(config.kind(), ErrorKind::InvalidConfig);
    assert!(!config.retryable());

    for (err, addr) in [
        (&refused, refused_addr),
        (&invalid, untrusted.addr()),
        (&config, refused_addr),
    ] {
        let msg = err.to_string();
        assert!(msg.chars().next().unwrap().is_lowercase(), "{msg}");
        assert!(msg.contains(&addr.to_string()), "{msg}");
        // Debug shows the kind; the error can travel across threads and be boxed.
        assert!(format!("{err:?}").contains(&format!("{:?}", err.kind())));
    }
    let boxed: Box<dyn std::error::Error + Send + Sync> = Box::new(refused);
    assert!(boxed.to_string().starts_with("connection refused"));

    // Kinds have stable snake_case names (metric labels).
    assert_eq!(ErrorKind::InvalidCert.as_str(), "invalid_cert");
    assert_eq!(ErrorKind::ConnectRefused.to_string(), "connect_refused");
    for kind in ErrorKind::ALL {
        let name = kind.as_str();
        assert!(
            name.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
            "{name}"
        );
    }
}

#[test]
fn bounds() {
    fn send_sync<T: Send + Sync + 'static>() {}
    fn clone<T: Clone>() {}
    fn stream<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static>() {}
    send_sync::<Connector>();
    send_sync::<Peer>();
    send_sync::<CertKey>();
    send_sync::<Connection>();
    send_sync::<Error>();
    send_sync::<ConnectorOptions>();
    stream::<Connection>();
    clone::<Connector>();
    clone::<Peer>();
    clone::<CertKey>();
    clone::<ConnectorOptions>();
}

#[tokio::test]
async fn connector_clones_share_state_and_futures_are_send() {
    let server = TestServer::start(Behaviour::Http);
    let connector = connector();
    let peer = trusted(server.addr());
    // `get` can run on a spawned task (its future is Send).
    let task = {
        let (connector, peer) = (connector.clone(), peer.clone());
        tokio::spawn(async move { connector.get(&peer).await })
    };
    let mut conn = task.await.unwrap().unwrap();
    exchange(&mut conn).await;
    // Released to the original, visible from the clone: one pool.
    connector.release(conn);
    let clone = connector.clone();
    assert_eq!(clone.idle_count_for(&peer), 1);
    let conn = clone.get(&peer).await.unwrap();
    assert!(conn.reused());
    assert_eq!(server.stats().accepted, 1);
}

/// Connections that negotiated the same thing share one `SslDigest` (the idle footprint of a
/// pooled connection; BENCHMARKS.md section 4); a different certificate or a resumed session
/// gets a digest of its own, with its own values.
#[tokio::test]
async fn connections_with_the_same_outcome_share_one_digest() {
    let server = TestServer::start(Behaviour::Http);
    let other = TestServer::builder().identity(&pki().server_b).start();
    let connector = connector();
    let full = trusted(server.addr()).with_session_resumption(false);
    let a = connector.get(&full).await.unwrap();
    let b = connector.get(&full).await.unwrap();
    let (da, db) = (a.digest().unwrap(), b.digest().unwrap());
    assert!(std::ptr::eq(da, db), "two full handshakes, one digest");
    assert!(!da.session_reused);

    // A resumed handshake differs in `session_reused`: a digest of its own.
    let resuming = trusted(server.addr());
    let first = connector.get(&resuming).await.unwrap();
    let mut resumed = None;
    for _ in 0..10 {
        let conn = connector.get(&resuming).await.unwrap();
        if conn.digest().unwrap().session_reused {
            resumed = Some(conn);
            break;
        }
        // The tickets of `first` may still be in flight; try again with what it left.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let resumed = resumed.expect("a resumed handshake within ten dials");
    assert!(!std::ptr::eq(da, resumed.digest().unwrap()));
    assert!(
        std::ptr::eq(da, first.digest().unwrap()),
        "full again: shared"
    );

    // Another certificate: another digest, with that certificate's fingerprint.
    let c = connector
        .get(&Peer::tls(other.addr(), "localhost").with_ca(pki().ca_b()))
        .await
        .unwrap();
    let dc = c.digest().unwrap();
    assert!(!std::ptr::eq(da, dc));
    assert_ne!(dc.cert_digest, da.cert_digest);
    let b_fingerprint = pki()
        .server_b
        .cert
        .digest(openssl::hash::MessageDigest::sha256())
        .unwrap();
    assert_eq!(dc.cert_digest, b_fingerprint.to_vec());

    // What the servers saw: every dial was its own connection.
    let seen = server.wait_for(|s| s.handshakes >= 4).await;
    assert_eq!(seen.accepted, seen.handshakes);
    assert!(seen.resumed >= 1, "{seen:#?}");
    assert_eq!(other.wait_for(|s| s.handshakes == 1).await.accepted, 1);
}
