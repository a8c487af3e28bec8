//! Bad input never panics: every unusable setting is an `InvalidConfig` error that says what
//! was wrong, reported by the constructor that sees it (`CertKey`, `Alpn`, `Connector::new`)
//! or by `Peer::key` / `Connector::get`, and an invalid peer is never dialled.

mod support;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use upstream_pool::{Alpn, CertKey, Connector, ConnectorOptions, Error, ErrorKind, Peer};

use support::certs::TestPki;
use support::server::{Behaviour, TestServer};

fn pki() -> &'static TestPki {
    TestPki::shared()
}

fn addr() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, 9))
}

/// Asserts an `InvalidConfig` error whose message contains every word of `words`
/// (case-insensitive), whose Display starts lowercase, and that is not retryable.
fn assert_config(err: &Error, words: &[&str]) {
    let msg = err.to_string();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{msg}");
    for word in words {
        assert!(
            msg.to_lowercase().contains(&word.to_lowercase()),
            "message lacks {word:?}: {msg}"
        );
    }
    assert!(msg.chars().next().unwrap().is_lowercase(), "{msg}");
    assert!(
        !msg.contains('\0'),
        "message must not carry a raw NUL: {msg:?}"
    );
    assert!(!err.retryable());
}

/// `peer.key()` fails with `InvalidConfig` containing `words`; returns the error.
fn assert_peer_invalid(peer: &Peer, words: &[&str]) -> Error {
    let err = match peer.key() {
        Ok(key) => panic!("expected InvalidConfig for {peer:?}, got key {key:?}"),
        Err(e) => e,
    };
    assert_config(&err, words);
    // Asking again gives the same answer (nothing cached half-way).
    assert_eq!(peer.key().unwrap_err().to_string(), err.to_string());
    err
}

fn unwrap_err<T: std::fmt::Debug>(r: Result<T, Error>) -> Error {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e,
    }
}

#[test]
fn malformed_pem_is_invalid_config() {
    let key = pki().client_a.key_pem();
    let chain = pki().client_a.chain_pem();
    let truncated = &chain[..chain.len() / 2];
    let corrupt_body =
        b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n";
    for bad_chain in [
        &b""[..],
        b"not a pem file at all",
        truncated,
        corrupt_body,
        b"\0\xff\xfe binary",
    ] {
        let err = unwrap_err(CertKey::from_pem(bad_chain, &key));
        assert_config(&err, &["certificate"]);
    }

    let key_truncated = &key[..key.len() / 2];
    for bad_key in [
        &b""[..],
        b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        key_truncated,
        // A certificate where the key should be.
        &pki().client_a.cert_pem(),
    ] {
        let err = unwrap_err(CertKey::from_pem(&chain, bad_key));
        assert_config(&err, &["key"]);
    }
}

#[test]
fn key_not_matching_certificate_is_invalid_config() {
    let a = &pki().client_a;
    let b = &pki().client_b;
    let err = unwrap_err(CertKey::new(
        a.cert.clone(),
        b.key.clone(),
        a.intermediates.clone(),
    ));
    assert_config(&err, &["does not match"]);

    let err = unwrap_err(CertKey::from_pem(&a.chain_pem(), &b.key_pem()));
    assert_config(&err, &["does not match"]);

    // Matching pairs are accepted, and differ in identity.
    let ka = CertKey::from_pem(&a.chain_pem(), &a.key_pem()).unwrap();
    let kb = CertKey::from_pem(&b.chain_pem(), &b.key_pem()).unwrap();
    assert_ne!(ka.fingerprint(), kb.fingerprint());
    assert_eq!(ka.intermediates().len(), 1);
    // Debug never prints the key.
    let debug = format!("{ka:?}");
    assert!(!debug.contains("PRIVATE"), "{debug}");
}

#[test]
fn unknown_curve_is_invalid_config() {
    for curves in ["NotACurve", "X25519:bogus", "", "P-256\0X25519", ":"] {
        let peer = Peer::tls(addr(), "localhost").with_curves(curves);
        assert_peer_invalid(&peer, &["curves"]);
    }
    // Known names are fine.
    Peer::tls(addr(), "localhost")
        .with_curves("X25519:P-256:P-384")
        .key()
        .unwrap();
}

#[test]
fn bad_sni_is_invalid_config() {
    let peer = Peer::tls(addr(), "local\0host");
    let err = assert_peer_invalid(&peer, &["sni", "0x00"]);
    assert!(err.to_string().contains(&addr().to_string()), "{err}");

    let long = "a".repeat(256);
    let peer = Peer::tls(addr(), long.as_str());
    assert_peer_invalid(&peer, &["sni", "256", "255"]);
    // The limit itself is accepted.
    Peer::tls(addr(), "a".repeat(255)).key().unwrap();

    for bad in [
        "has space.test",
        "slash/name",
        "caf\u{e9}.test",
        "tab\there",
        "back\\slash",
    ] {
        assert_peer_invalid(&Peer::tls(addr(), bad), &["sni"]);
    }
    // Also over a Unix socket.
    assert_peer_invalid(&Peer::unix_tls("/nonexistent.sock", "x\0y"), &["sni"]);
}

#[test]
fn bad_alternative_cn_is_invalid_config() {
    let peer = Peer::tls(addr(), "localhost").with_alternative_cn("alt\0name");
    assert_peer_invalid(&peer, &["alternative cn"]);
    let peer = Peer::tls(addr(), "localhost").with_alternative_cn("x".repeat(300));
    assert_peer_invalid(&peer, &["alternative cn", "255"]);
}

#[test]
fn bad_alpn_is_invalid_config() {
    let err = unwrap_err(Alpn::from_protocols(Vec::<&[u8]>::new()));
    assert_config(&err, &["alpn", "empty"]);
    let err = unwrap_err(Alpn::from_protocols([&b""[..]]));
    assert_config(&err, &["alpn", "0 bytes"]);
    let long = vec![b'x'; 256];
    let err = unwrap_err(Alpn::from_protocols([&b"h2"[..], &long]));
    assert_config(&err, &["alpn", "256 bytes"]);

    let ok = Alpn::from_protocols(["h2", "http/1.1"]).unwrap();
    assert_eq!(ok.to_wire(), Alpn::H2H1.to_wire());
}

#[test]
fn empty_ca_list_is_invalid_config() {
    let peer = Peer::tls(addr(), "localhost").with_ca(Vec::new());
    assert_peer_invalid(&peer, &["ca", "empty"]);
}

#[test]
fn first_problem_is_reported_and_later_settings_do_not_hide_it() {
    let peer = Peer::tls(addr(), "localhost")
        .with_curves("bogus")
        .with_ca(Vec::new())
        .with_ca(pki().ca_a())
        .with_curves("X25519");
    assert_peer_invalid(&peer, &["curves", "bogus"]);
}

#[test]
fn zero_options_are_invalid_config() {
    type Edit = fn(&mut ConnectorOptions);
    let cases: [(&str, Edit); 6] = [
        ("connection_timeout", |o| {
            o.connection_timeout = Duration::ZERO
        }),
        ("total_connection_timeout", |o| {
            o.total_connection_timeout = Duration::ZERO
        }),
        ("idle_timeout", |o| o.idle_timeout = Duration::ZERO),
        ("reap_interval", |o| o.reap_interval = Duration::ZERO),
        ("max_connections_per_peer", |o| {
            o.max_connections_per_peer = Some(0)
        }),
        ("max_uses", |o| o.max_uses = Some(0)),
    ];
    for (field, edit) in cases {
        let mut options = ConnectorOptions::default();
        edit(&mut options);
        let err = unwrap_err(Connector::new(options));
        assert_config(&err, &[field]);
    }
    Connector::new(ConnectorOptions::default()).unwrap();
}

#[tokio::test]
async fn zero_peer_timeouts_are_invalid_config() {
    let server = TestServer::start(Behaviour::Http);
    let connector = Connector::new(ConnectorOptions::default()).unwrap();
    for (peer, word) in [
        (
            Peer::tls(server.addr(), "localhost").with_connection_timeout(Duration::ZERO),
            "connection timeout",
        ),
        (
            Peer::tls(server.addr(), "localhost").with_total_connection_timeout(Duration::ZERO),
            "total connection timeout",
        ),
    ] {
        assert_peer_invalid(&peer, &[word]);
        let err = connector.get(&peer).await.unwrap_err();
        assert_config(&err, &[word]);
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(server.stats().accepted, 0);
}

/// `Connector::get` reports the same error as `Peer::key` and never dials an invalid peer.
#[tokio::test]
async fn get_rejects_invalid_peers_without_dialling() {
    let server = TestServer::start(Behaviour::Http);
    let a = server.addr();
    let connector = Connector::new(ConnectorOptions::default()).unwrap();
    let bad_peers = [
        Peer::tls(a, "bad\0sni").with_ca(pki().ca_a()),
        Peer::tls(a, "x".repeat(300)).with_ca(pki().ca_a()),
        Peer::tls(a, "localhost").with_ca(Vec::new()),
        Peer::tls(a, "localhost")
            .with_ca(pki().ca_a())
            .with_curves("NoSuchGroup"),
        Peer::tls(a, "localhost")
            .with_ca(pki().ca_a())
            .with_alternative_cn("bad\0cn"),
        Peer::tcp(a).with_curves("NoSuchGroup"),
    ];
    for peer in &bad_peers {
        let from_key = peer.key().unwrap_err();
        let from_get = connector.get(peer).await.unwrap_err();
        assert_config(&from_get, &[]);
        assert_eq!(from_get.kind(), from_key.kind());
        assert_eq!(from_get.to_string(), from_key.to_string());
        assert!(from_get.to_string().contains(&a.to_string()), "{from_get}");
        assert_eq!(connector.connection_count_for(peer), 0);
        assert_eq!(connector.idle_count_for(peer), 0);
    }
    // Give a (wrong) dial every chance to reach the server.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(server.stats().accepted, 0);

    // Control: a valid peer to the same server is dialled.
    let good = Peer::tls(a, "localhost").with_ca(pki().ca_a());
    connector.get(&good).await.unwrap();
    assert_eq!(server.stats().accepted, 1);
}
