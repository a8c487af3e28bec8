//! Checks the shared test support (`tests/support`) with a raw tokio-openssl client, without
//! `upstream_pool`: if these fail, the library's integration tests cannot be trusted.

mod support;

use std::time::Duration;

use openssl::ssl::SslVersion;
use openssl::stack::Stack;
use openssl::x509::store::X509StoreBuilder;
use openssl::x509::{X509StoreContext, X509};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::RwLock;

use support::certs::{Identity, TestPki, OTHER_HOST, TEST_ORG};
use support::client::{close, http_get, read_response, TlsClient};
use support::client_hello;
use support::s_server::{openssl_cli_available, SServer, SServerMode, SServerOptions};
use support::server::{
    AlpnPolicy, Behaviour, ClientAuth, Listen, TestServer, GARBAGE_LEN, STRAY_BYTES,
};
use support::{open_fds, wait_for_open_fds, TempDir};

/// File-descriptor counts are process-wide: the fd test takes this for writing, every other
/// test for reading, so nothing opens or closes sockets while it counts.
static FD_LOCK: RwLock<()> = RwLock::const_new(());

const T: Duration = Duration::from_secs(5);

/// Verifies `leaf` with `intermediates` against `roots` the way a client would (no hostname).
fn verifies(leaf: &X509, intermediates: &[X509], roots: &[X509]) -> bool {
    let mut store = X509StoreBuilder::new().unwrap();
    for r in roots {
        store.add_cert(r.clone()).unwrap();
    }
    let store = store.build();
    let mut chain = Stack::new().unwrap();
    for c in intermediates {
        chain.push(c.clone()).unwrap();
    }
    let mut ctx = X509StoreContext::new().unwrap();
    ctx.init(&store, leaf, &chain, |c| c.verify_cert()).unwrap()
}

fn verifies_identity(id: &Identity, roots: &[X509]) -> bool {
    verifies(&id.cert, &id.intermediates, roots)
}

#[test]
fn pki_chains_verify_as_designed() {
    let pki = TestPki::new();
    let a = pki.ca_a();
    let b = pki.ca_b();
    assert!(verifies_identity(&pki.server, &a));
    assert!(verifies_identity(&pki.other_host, &a));
    assert!(verifies_identity(&pki.client_a, &a));
    assert!(verifies_identity(&pki.server_b, &b));
    assert!(verifies_identity(&pki.client_b, &b));
    assert!(
        !verifies_identity(&pki.expired, &a),
        "expired leaf must not verify"
    );
    assert!(
        !verifies_identity(&pki.server_b, &a),
        "root B leaf must not verify against A"
    );
    assert!(!verifies_identity(&pki.client_b, &a));
    // Without its intermediate the server leaf does not chain to the root.
    assert!(!verifies(&pki.server.cert, &[], &a));

    assert_eq!(pki.server.intermediates.len(), 1);
    assert_eq!(pki.client_a.intermediates.len(), 1);
    assert!(pki.client_b.intermediates.is_empty());
    assert_eq!(pki.root_a.common_name().as_deref(), Some("Test Root A"));
    assert_eq!(pki.root_b.common_name().as_deref(), Some("Test Root B"));
    let org = pki
        .server
        .cert
        .subject_name()
        .entries_by_nid(openssl::nid::Nid::ORGANIZATIONNAME)
        .next()
        .map(|e| e.data().to_string().unwrap());
    assert_eq!(org.as_deref(), Some(TEST_ORG));
    assert_eq!(pki.server.sha256().len(), 32);
    assert!(!pki.server.serial_hex().is_empty());

    // PEM round trip: the chain PEM holds leaf + intermediate.
    let parsed = X509::stack_from_pem(&pki.server.chain_pem()).unwrap();
    assert_eq!(parsed.len(), 2);
    assert!(openssl::pkey::PKey::private_key_from_pem(&pki.server.key_pem()).is_ok());

    let leaf = pki.leaf("my-host.test", &["my-host.test", "127.0.0.1"]);
    assert!(verifies_identity(&leaf, &a));
}

#[test]
fn temp_dir_and_pem_files() {
    let pki = TestPki::shared();
    let dir = TempDir::new("selftest").unwrap();
    let path = dir.path().to_owned();
    let files = pki.server.write_pem(dir.path(), "srv").unwrap();
    assert!(files.cert.exists() && files.chain.exists() && files.key.exists());
    assert!(files.intermediates.exists());
    drop(dir);
    assert!(!path.exists(), "TempDir must remove itself on drop");
}

#[tokio::test]
async fn tls_chain_hostname_sni_and_alpn_are_observed() {
    let _g = FD_LOCK.read().await;
    let pki = TestPki::shared();
    let server = TestServer::builder().alpn(AlpnPolicy::h2_then_h1()).start();
    let client = TlsClient::builder(pki.ca_a())
        .alpn(&[b"http/1.1", b"h2"])
        .build();

    let mut s = client
        .connect(server.addr(), Some("localhost"), None)
        .await
        .unwrap();
    // The client received leaf + intermediate.
    assert_eq!(s.ssl().peer_cert_chain().map(|c| c.len()), Some(2));
    assert_eq!(
        s.ssl().selected_alpn_protocol(),
        Some(&b"h2"[..]),
        "server preference"
    );
    let resp = http_get(&mut s, "localhost").await.unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(resp.conn_id(), Some(0));
    let resp = http_get(&mut s, "localhost").await.unwrap();
    assert_eq!(resp.body_str(), "conn=0 req=2\n");
    close(s).await.unwrap();

    let stats = server.wait_for(|s| s.handshakes == 1 && s.open == 0).await;
    let c = &stats.conns[0];
    assert_eq!(c.sni.as_deref(), Some("localhost"));
    assert_eq!(c.alpn.as_deref(), Some(&b"h2"[..]));
    assert_eq!(c.version.as_deref(), Some("TLSv1.3"));
    assert!(!c.resumed);
    assert_eq!(c.requests, 2);
    assert!(c.group.is_some(), "group should be observable: {c:?}");
    assert!(c.client_cert_cns.is_empty());
    assert_eq!(stats.requests, 2);

    // IP literal: verified against the IP SAN, no SNI sent.
    let s = client
        .connect(server.addr(), Some("127.0.0.1"), None)
        .await
        .unwrap();
    close(s).await.unwrap();
    let stats = server.wait_for(|s| s.handshakes == 2).await;
    assert_eq!(stats.conns[1].sni, None);

    // Wrong name: hostname verification fails.
    let err = client
        .connect(server.addr(), Some(OTHER_HOST), None)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("certificate verify failed"),
        "{err}"
    );
    // Untrusted and expired chains fail too.
    for id in [&pki.server_b, &pki.expired] {
        let bad = TestServer::builder().identity(id).start();
        let err = client
            .connect(bad.addr(), Some("localhost"), None)
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("certificate verify failed"),
            "{err}"
        );
        bad.wait_for(|s| s.handshake_failures == 1).await;
    }
}

#[tokio::test]
async fn alpn_client_preference_and_no_overlap() {
    let _g = FD_LOCK.read().await;
    let pki = TestPki::shared();
    let server = TestServer::builder()
        .alpn(AlpnPolicy::ClientPreference(vec![
            b"h2".to_vec(),
            b"http/1.1".to_vec(),
        ]))
        .start();
    let client = TlsClient::builder(pki.ca_a())
        .alpn(&[b"http/1.1", b"h2"])
        .build();
    let s = client
        .connect(server.addr(), Some("localhost"), None)
        .await
        .unwrap();
    assert_eq!(s.ssl().selected_alpn_protocol(), Some(&b"http/1.1"[..]));
    close(s).await.unwrap();

    let client = TlsClient::builder(pki.ca_a()).alpn(&[b"spdy/3"]).build();
    let s = client
        .connect(server.addr(), Some("localhost"), None)
        .await
        .unwrap();
    assert_eq!(s.ssl().selected_alpn_protocol(), None);
    close(s).await.unwrap();
}

async fn check_resumption(version: SslVersion, name: &str) {
    check_resumption_with(TestServer::builder().version(version).start(), name).await;
}

async fn check_resumption_with(server: TestServer, name: &str) {
    let pki = TestPki::shared();
    let client = TlsClient::builder(pki.ca_a()).build();

    let mut s = client
        .connect(server.addr(), Some("localhost"), None)
        .await
        .unwrap();
    assert_eq!(s.ssl().version_str(), name);
    // Read application data so a TLS 1.3 ticket (sent after the handshake) is processed.
    http_get(&mut s, "localhost").await.unwrap();
    let session = client.session(&s).expect("session after first connection");
    close(s).await.unwrap();

    let mut s = client
        .connect(server.addr(), Some("localhost"), Some(&session))
        .await
        .unwrap();
    assert!(s.ssl().session_reused(), "{name}: client did not resume");
    http_get(&mut s, "localhost").await.unwrap();
    close(s).await.unwrap();

    let stats = server.wait_for(|s| s.handshakes == 2).await;
    assert_eq!(stats.resumed, 1, "{name}: {stats:#?}");
    assert_eq!(stats.full_handshakes(), 1);
    assert!(!stats.conns[0].resumed && stats.conns[1].resumed);
    // The SNI callback sees the name the client sent on the resumed handshake too.
    assert_eq!(stats.conns[1].sni.as_deref(), Some("localhost"), "{name}");
}

#[tokio::test]
async fn tls12_session_resumes() {
    let _g = FD_LOCK.read().await;
    check_resumption(SslVersion::TLS1_2, "TLSv1.2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls13_session_resumes() {
    let _g = FD_LOCK.read().await;
    check_resumption(SslVersion::TLS1_3, "TLSv1.3").await;
}

#[tokio::test]
async fn stateful_resumption_without_tickets() {
    let _g = FD_LOCK.read().await;
    for (version, name) in [
        (SslVersion::TLS1_2, "TLSv1.2"),
        (SslVersion::TLS1_3, "TLSv1.3"),
    ] {
        let server = TestServer::builder()
            .version(version)
            .tickets(false)
            .start();
        check_resumption_with(server, name).await;
    }
}

#[tokio::test]
async fn resumption_can_be_disabled() {
    let _g = FD_LOCK.read().await;
    let pki = TestPki::shared();
    for version in [SslVersion::TLS1_2, SslVersion::TLS1_3] {
        let server = TestServer::builder()
            .version(version)
            .resumption(false)
            .start();
        let client = TlsClient::builder(pki.ca_a()).build();
        let mut s = client
            .connect(server.addr(), Some("localhost"), None)
            .await
            .unwrap();
        http_get(&mut s, "localhost").await.unwrap();
        let session = client.session(&s).unwrap();
        close(s).await.unwrap();
        let s = client
            .connect(server.addr(), Some("localhost"), Some(&session))
            .await
            .unwrap();
        assert!(!s.ssl().session_reused(), "{version:?}");
        close(s).await.unwrap();
        let stats = server.wait_for(|s| s.handshakes == 2).await;
        assert_eq!(stats.resumed, 0);
    }
}

#[tokio::test]
async fn sni_is_what_the_client_sent_even_on_tls12_resumption() {
    // OpenSSL resumes a TLS 1.2 session offered under another name, and then reports the
    // session's name from SSL_get_servername; the server records the real SNI separately.
    let _g = FD_LOCK.read().await;
    let pki = TestPki::shared();
    let server = TestServer::builder().version(SslVersion::TLS1_2).start();
    let client = TlsClient::builder(pki.ca_a()).verify(false).build();
    let mut s = client
        .connect(server.addr(), Some("localhost"), None)
        .await
        .unwrap();
    http_get(&mut s, "localhost").await.unwrap();
    let session = client.session(&s).unwrap();
    close(s).await.unwrap();
    let s = client
        .connect(server.addr(), Some(OTHER_HOST), Some(&session))
        .await
        .unwrap();
    assert!(
        s.ssl().session_reused(),
        "OpenSSL does not tie the session to the SNI"
    );
    close(s).await.unwrap();
    let stats = server.wait_for(|s| s.handshakes == 2).await;
    let c = &stats.conns[1];
    assert!(c.resumed);
    assert_eq!(c.sni.as_deref(), Some(OTHER_HOST));
    assert_eq!(c.servername_after.as_deref(), Some("localhost"));
}

#[tokio::test]
async fn client_hello_parser_finds_sni_and_never_panics() {
    let pki = TestPki::shared();
    let (a, mut b) = tokio::io::duplex(64 * 1024);
    let client = TlsClient::trusting(pki);
    let handshake = tokio::spawn(async move {
        let _ = client.handshake(a, Some("x.test"), None).await;
    });
    let mut raw = Vec::new();
    while client_hello::sni(&raw).is_none() {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(T, b.read(&mut chunk))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "client closed before a full ClientHello");
        raw.extend_from_slice(&chunk[..n]);
    }
    assert_eq!(client_hello::sni(&raw).as_deref(), Some("x.test"));
    for i in 0..raw.len() {
        let _ = client_hello::sni(&raw[..i]);
        let mut flipped = raw.clone();
        flipped[i] ^= 0xff;
        let _ = client_hello::sni(&flipped);
    }
    assert_eq!(client_hello::sni(b"GET / HTTP/1.1\r\n\r\n"), None);
    handshake.abort();
}

#[tokio::test]
async fn dropping_without_shutdown_spoils_the_session() {
    // Documents the OpenSSL behaviour the library's session cache must work around.
    let _g = FD_LOCK.read().await;
    let pki = TestPki::shared();
    let server = TestServer::builder().version(SslVersion::TLS1_2).start();
    let client = TlsClient::builder(pki.ca_a()).build();
    let mut s = client
        .connect(server.addr(), Some("localhost"), None)
        .await
        .unwrap();
    http_get(&mut s, "localhost").await.unwrap();
    let session = client.session(&s).unwrap();
    drop(s); // no close_notify
    let s = client
        .connect(server.addr(), Some("localhost"), Some(&session))
        .await
        .unwrap();
    assert!(
        !s.ssl().session_reused(),
        "SSL_free marked the shared session not resumable"
    );
    close(s).await.unwrap();
}

#[tokio::test]
async fn client_certificates_are_observed() {
    let _g = FD_LOCK.read().await;
    let pki = TestPki::shared();

    let required = TestServer::builder()
        .client_auth(ClientAuth::Required { ca: pki.ca_a() })
        .start();
    let with_a = TlsClient::builder(pki.ca_a())
        .client_cert(&pki.client_a)
        .build();
    let mut s = with_a
        .connect(required.addr(), Some("localhost"), None)
        .await
        .unwrap();
    http_get(&mut s, "localhost").await.unwrap();
    close(s).await.unwrap();
    let stats = required.wait_for(|s| s.handshakes == 1).await;
    assert_eq!(
        stats.conns[0].client_cert_cns,
        ["client-a", "Test Client Intermediate A"]
    );
    assert!(stats.conns[0].client_cert_verified);

    // No certificate: a required server rejects. (With TLS 1.3 the client may only learn
    // it when it reads, after its side of the handshake completed.)
    let without = TlsClient::trusting(pki);
    let rejected = match without
        .connect(required.addr(), Some("localhost"), None)
        .await
    {
        Err(_) => true,
        Ok(mut s) => http_get(&mut s, "localhost").await.is_err(),
    };
    assert!(rejected);
    required.wait_for(|s| s.handshake_failures == 1).await;

    let optional = TestServer::builder()
        .client_auth(ClientAuth::Optional { ca: pki.ca_a() })
        .start();
    let with_b = TlsClient::builder(pki.ca_a())
        .client_cert(&pki.client_b)
        .build();
    for client in [&with_b, &without] {
        let mut s = client
            .connect(optional.addr(), Some("localhost"), None)
            .await
            .unwrap();
        http_get(&mut s, "localhost").await.unwrap();
        close(s).await.unwrap();
    }
    let stats = optional.wait_for(|s| s.handshakes == 2).await;
    assert_eq!(stats.conns[0].client_cert_cns, ["client-b"]);
    assert!(!stats.conns[0].client_cert_verified);
    assert!(stats.conns[1].client_cert_cns.is_empty());
    assert!(!stats.conns[1].client_cert_verified);
}

#[tokio::test]
async fn groups_are_restricted_and_observed() {
    let _g = FD_LOCK.read().await;
    let pki = TestPki::shared();
    for (version, groups, expect) in [
        (SslVersion::TLS1_3, "P-256", "prime256v1"),
        (SslVersion::TLS1_2, "P-384", "secp384r1"),
        (SslVersion::TLS1_3, "X25519", "X25519"),
    ] {
        let server = TestServer::builder()
            .version(version)
            .groups(groups)
            .start();
        let client = TlsClient::trusting(pki);
        let mut s = client
            .connect(server.addr(), Some("localhost"), None)
            .await
            .unwrap();
        http_get(&mut s, "localhost").await.unwrap();
        close(s).await.unwrap();
        let stats = server.wait_for(|s| s.handshakes == 1).await;
        assert_eq!(
            stats.conns[0].group.as_deref(),
            Some(expect),
            "{version:?} {groups}"
        );
    }
    // A client that shares no group with the server cannot connect.
    let server = TestServer::builder().groups("P-384").start();
    let client = TlsClient::builder(pki.ca_a()).groups("X25519").build();
    assert!(client
        .connect(server.addr(), Some("localhost"), None)
        .await
        .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_handshake_behaviours() {
    let _g = FD_LOCK.read().await;
    let pki = TestPki::shared();
    let client = TlsClient::trusting(pki);

    // Echo.
    let server = TestServer::start(Behaviour::Echo);
    let mut s = client
        .connect(server.addr(), Some("localhost"), None)
        .await
        .unwrap();
    s.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
    close(s).await.unwrap();

    // Stray bytes after the response stay in the stream.
    let server = TestServer::start(Behaviour::HttpThenStray);
    let mut s = client
        .connect(server.addr(), Some("localhost"), None)
        .await
        .unwrap();
    assert_eq!(http_get(&mut s, "localhost").await.unwrap().status, 200);
    let mut stray = vec![0u8; STRAY_BYTES.len()];
    s.read_exact(&mut stray).await.unwrap();
    assert_eq!(stray, STRAY_BYTES);
    close(s).await.unwrap();

    // Connection: close, then close_notify: a clean EOF.
    let server = TestServer::start(Behaviour::HttpClose);
    let mut s = client
        .connect(server.addr(), Some("localhost"), None)
        .await
        .unwrap();
    let resp = http_get(&mut s, "localhost").await.unwrap();
    assert_eq!(resp.header("connection"), Some("close"));
    assert_eq!(s.read(&mut [0u8; 16]).await.unwrap(), 0);
    server.wait_for(|s| s.open == 0).await;

    // Idle close after the given time.
    let server = TestServer::start(Behaviour::CloseAfter(Duration::from_millis(100)));
    let mut s = client
        .connect(server.addr(), Some("localhost"), None)
        .await
        .unwrap();
    http_get(&mut s, "localhost").await.unwrap();
    let n = tokio::time::timeout(T, s.read(&mut [0u8; 16]))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n, 0, "server should close the idle connection");

    // close_connections: server-side abort, the client sees EOF (no close_notify).
    let server = TestServer::start(Behaviour::Http);
    let mut s = client
        .connect(server.addr(), Some("localhost"), None)
        .await
        .unwrap();
    http_get(&mut s, "localhost").await.unwrap();
    server.wait_for(|s| s.open == 1).await;
    server.close_connections();
    server.wait_for(|s| s.open == 0).await;
    let r = tokio::time::timeout(T, s.read(&mut [0u8; 16]))
        .await
        .unwrap();
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
}

#[tokio::test]
async fn pre_tls_behaviours_fail_the_handshake() {
    let _g = FD_LOCK.read().await;
    let pki = TestPki::shared();
    let client = TlsClient::trusting(pki);

    for behaviour in [
        Behaviour::PlaintextHttp,
        Behaviour::Garbage,
        Behaviour::RstAfterAccept,
        Behaviour::CloseAfterClientHello,
    ] {
        let server = TestServer::start(behaviour);
        let r = tokio::time::timeout(T, client.connect(server.addr(), Some("localhost"), None))
            .await
            .unwrap_or_else(|_| panic!("{behaviour:?}: handshake hung"));
        assert!(r.is_err(), "{behaviour:?}: handshake should fail");
        let stats = server.wait_for(|s| s.accepted == 1).await;
        assert_eq!(stats.handshakes, 0);
    }

    // NeverAnswer: the handshake hangs until the client gives up.
    let server = TestServer::start(Behaviour::NeverAnswer);
    let r = tokio::time::timeout(
        Duration::from_millis(200),
        client.connect(server.addr(), Some("localhost"), None),
    )
    .await;
    assert!(r.is_err(), "handshake should time out");
    assert_eq!(server.wait_for(|s| s.accepted == 1).await.open, 1);

    // Raw views of PlaintextHttp and Garbage.
    let server = TestServer::start(Behaviour::PlaintextHttp);
    let mut tcp = TcpStream::connect(server.addr()).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    assert_eq!(read_response(&mut tcp).await.unwrap().status, 400);

    let server = TestServer::start(Behaviour::Garbage);
    let mut tcp = TcpStream::connect(server.addr()).await.unwrap();
    let mut garbage = [0u8; GARBAGE_LEN];
    tcp.read_exact(&mut garbage).await.unwrap();
    assert_eq!(garbage[0], 0xff);
}

#[tokio::test]
async fn plaintext_unix_and_ipv6_servers() {
    let _g = FD_LOCK.read().await;
    let pki = TestPki::shared();

    let server = TestServer::builder().plaintext().start();
    let mut tcp = TcpStream::connect(server.addr()).await.unwrap();
    let resp = http_get(&mut tcp, "localhost").await.unwrap();
    assert_eq!(resp.body_str(), "conn=0 req=1\n");
    assert_eq!(server.stats().handshakes, 0);

    let server = TestServer::builder().listen(Listen::Unix).start();
    let client = TlsClient::trusting(pki);
    let path = server.unix_path().unwrap().to_owned();
    let mut s = client
        .connect_unix(&path, Some("localhost"), None)
        .await
        .unwrap();
    assert_eq!(http_get(&mut s, "localhost").await.unwrap().status, 200);
    close(s).await.unwrap();
    let stats = server.wait_for(|s| s.handshakes == 1).await;
    assert_eq!(stats.conns[0].peer, None);
    drop(server);
    assert!(!path.exists(), "socket directory removed with the server");

    match TestServer::builder().listen(Listen::Ipv6).try_start() {
        Ok(server) => {
            assert!(server.addr().is_ipv6());
            let mut s = client
                .connect(server.addr(), Some("::1"), None)
                .await
                .unwrap();
            assert_eq!(http_get(&mut s, "localhost").await.unwrap().status, 200);
            close(s).await.unwrap();
        }
        Err(e) => eprintln!("NOTICE: skipping IPv6 check, [::1] unavailable: {e}"),
    }
}

#[tokio::test]
async fn openssl_s_server_accepts_tls() {
    let _g = FD_LOCK.read().await;
    if !openssl_cli_available() {
        eprintln!("NOTICE: skipping s_server check, no `openssl` binary");
        return;
    }
    let pki = TestPki::shared();
    let server = SServer::start(pki, SServerOptions::default());
    let client = TlsClient::builder(pki.ca_a())
        .alpn(&[b"h2", b"http/1.1"])
        .build();
    let mut s = client
        .connect(server.addr(), Some("localhost"), None)
        .await
        .unwrap();
    assert_eq!(s.ssl().peer_cert_chain().map(|c| c.len()), Some(2));
    assert_eq!(s.ssl().selected_alpn_protocol(), None);
    let resp = http_get(&mut s, "localhost").await.unwrap();
    assert_eq!(resp.status, 200, "{}", server.log());

    let server = SServer::start(
        pki,
        SServerOptions {
            version: Some(SslVersion::TLS1_2),
            alpn: Some("http/1.1".into()),
            mode: SServerMode::Rev,
            ..SServerOptions::default()
        },
    );
    let mut s = client
        .connect(server.addr(), Some("localhost"), None)
        .await
        .unwrap();
    assert_eq!(s.ssl().version_str(), "TLSv1.2");
    assert_eq!(s.ssl().selected_alpn_protocol(), Some(&b"http/1.1"[..]));
    s.write_all(b"abc\n").await.unwrap();
    let mut buf = [0u8; 3];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"cba");
}

#[tokio::test]
async fn open_fds_counts_and_settles() {
    let _g = FD_LOCK.write().await;
    // Let runtimes of tests that just finished close their sockets.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let baseline = open_fds();
    assert!(baseline >= 3, "stdin/stdout/stderr at least: {baseline}");
    let server = TestServer::start(Behaviour::Http);
    let client = TlsClient::trusting(TestPki::shared());
    let mut conns = Vec::new();
    for _ in 0..5 {
        let mut s = client
            .connect(server.addr(), Some("localhost"), None)
            .await
            .unwrap();
        http_get(&mut s, "localhost").await.unwrap();
        conns.push(s);
    }
    server.wait_for(|s| s.open == 5).await;
    // Five client sockets, five server sockets, the listener (plus epoll bookkeeping).
    assert!(open_fds() >= baseline + 11, "{} vs {baseline}", open_fds());
    for s in conns {
        close(s).await.unwrap();
    }
    drop(server);
    let after = wait_for_open_fds(baseline, Duration::from_secs(2)).await;
    assert!(after <= baseline, "fds leaked: {after} > {baseline}");
}
