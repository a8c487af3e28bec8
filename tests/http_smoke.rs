//! `upstream_pool::http` behaviour the other HTTP suites do not pin down: `Alpn::H2H1`
//! learning HTTP/1.1 with one shared dial, HTTP/2 connections closed on the idle timeout,
//! the PING keepalive keeping one connection, a failed shared dial failing its waiters fast,
//! and connector clones sharing HTTP/2 connections. Each asserts on what the server saw.

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use upstream_pool::http::{HttpConnector, UpstreamInfo};
use upstream_pool::{Alpn, Connector, ConnectorOptions, ErrorKind, Peer};

use support::certs::TestPki;
use support::h2_server::{HttpServer, Proto};
use support::wait_until;

const STEP: Duration = Duration::from_secs(5);

fn http_with(configure: impl FnOnce(&mut ConnectorOptions)) -> HttpConnector {
    let mut options = ConnectorOptions::default();
    configure(&mut options);
    HttpConnector::new(Connector::new(options).unwrap())
}

fn peer(server: &HttpServer, alpn: Alpn) -> Peer {
    Peer::tls(server.addr(), "localhost")
        .with_ca(TestPki::shared().ca_a())
        .with_alpn(alpn)
}

fn get() -> http::Request<Empty<Bytes>> {
    http::Request::get("/").body(Empty::new()).unwrap()
}

/// Sends a GET and reads the body; returns the version and `UpstreamInfo::reused`.
async fn fetch(http: &HttpConnector, peer: &Peer) -> (http::Version, bool) {
    tokio::time::timeout(STEP, async {
        let response = http.send(peer, get()).await.unwrap();
        assert_eq!(response.status(), 200);
        let version = response.version();
        let reused = response.extensions().get::<UpstreamInfo>().unwrap().reused;
        response.into_body().collect().await.unwrap();
        (version, reused)
    })
    .await
    .expect("request hung")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2h1_learns_http11_with_one_dial_and_remembers_it() {
    let server = HttpServer::builder().h1_only().start();
    let http = http_with(|_| {});
    let p = peer(&server, Alpn::H2H1);

    // Ten concurrent first requests: one dial finds out the server speaks HTTP/1.1, then
    // everyone goes HTTP/1.1 (one connection each: HTTP/1.1 is one exchange at a time).
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let (http, p) = (http.clone(), p.clone());
        tasks.push(tokio::spawn(async move { fetch(&http, &p).await }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap().0, http::Version::HTTP_11);
    }
    let first_round = server.stats().accepted;
    assert!(
        first_round <= 10,
        "{first_round} connections for 10 requests"
    );
    assert!(server
        .stats()
        .conns
        .iter()
        .all(|c| c.proto == Some(Proto::H1)));

    // Later requests know it before dialling: they reuse the pooled HTTP/1.1 connections.
    for _ in 0..5 {
        let (version, reused) = fetch(&http, &p).await;
        assert_eq!(version, http::Version::HTTP_11);
        assert!(reused);
    }
    assert_eq!(server.stats().accepted, first_round);
    assert!(http.connector().idle_count_for(&p) >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_h2_connection_closes_on_the_peer_idle_timeout() {
    let server = HttpServer::builder().start();
    let http = http_with(|_| {});
    let p = peer(&server, Alpn::H2).with_idle_timeout(Duration::from_millis(150));
    assert_eq!(fetch(&http, &p).await, (http::Version::HTTP_2, false));
    assert_eq!(http.connector().connection_count_for(&p), 1);
    let stats = server.wait_for(|s| s.open == 0).await;
    assert_eq!(stats.accepted, 1);
    assert!(
        wait_until(STEP, || http.connector().connection_count_for(&p) == 0).await,
        "the pool still counts the closed HTTP/2 connection"
    );
    // The next request dials a new one.
    assert_eq!(fetch(&http, &p).await, (http::Version::HTTP_2, false));
    assert_eq!(server.stats().accepted, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_keepalive_keeps_one_connection_across_intervals() {
    let server = HttpServer::builder().start();
    let http = http_with(|o| {
        o.h2_ping_interval = Some(Duration::from_millis(30));
        // Shorter than the pause below: unanswered PINGs would close the connection.
        o.h2_ping_timeout = Duration::from_millis(100);
    });
    let p = peer(&server, Alpn::H2);
    assert_eq!(fetch(&http, &p).await, (http::Version::HTTP_2, false));
    // Several PING rounds while idle: answered, so the connection stays.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(fetch(&http, &p).await, (http::Version::HTTP_2, true));
    let stats = server.stats();
    assert_eq!((stats.accepted, stats.open), (1, 1), "{stats:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_shared_dial_fails_every_waiter_fast() {
    // A port nobody listens on: bind, learn it, close.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let http = http_with(|o| o.wait_timeout = Duration::from_secs(30));
    let p = Peer::tls(addr, "localhost")
        .with_ca(TestPki::shared().ca_a())
        .with_alpn(Alpn::H2);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (http, p) = (http.clone(), p.clone());
        tasks.push(tokio::spawn(async move { http.send(&p, get()).await }));
    }
    for task in tasks {
        let err = task.await.unwrap().expect_err("a refused dial succeeded");
        assert_eq!(err.kind(), ErrorKind::ConnectRefused, "{err}");
        assert!(err.retryable());
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "waiters took {:?}",
        started.elapsed()
    );
    assert_eq!(http.connector().connection_count_for(&p), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connector_clones_share_h2_connections() {
    let server = HttpServer::builder().start();
    let connector = Connector::new(ConnectorOptions::default()).unwrap();
    let a = HttpConnector::new(connector.clone());
    let b = HttpConnector::new(connector.clone());
    let p = peer(&server, Alpn::H2);
    assert_eq!(fetch(&a, &p).await, (http::Version::HTTP_2, false));
    assert_eq!(fetch(&b, &p).await, (http::Version::HTTP_2, true));
    assert_eq!(server.stats().accepted, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_selects_http11_is_an_error_for_alpn_h2() {
    let server = HttpServer::builder().h1_only().start();
    let http = http_with(|_| {});
    // The h1-only server selects no ALPN for an `h2`-only offer (or rejects it): either way
    // not HTTP/2, and a typed error, not a hang.
    let p = peer(&server, Alpn::H2);
    let err = tokio::time::timeout(STEP, http.send(&p, get()))
        .await
        .expect("hung")
        .expect_err("HTTP/2 request to an HTTP/1.1-only server succeeded");
    assert!(
        matches!(
            err.kind(),
            ErrorKind::ProtocolError | ErrorKind::TlsHandshakeFailure
        ),
        "{err}"
    );
    assert_eq!(server.stats().requests(), 0);
}

/// An HTTP/2 server that answers one request, keeps serving for `serve_for`, then stops
/// reading its connection without closing it (a hung peer: PINGs go unanswered). Returns
/// its address; the task ends when the test's runtime does.
async fn hanging_h2_server(serve_for: Duration) -> std::net::SocketAddr {
    use openssl::ssl::{select_next_proto, AlpnError, Ssl, SslAcceptor, SslMethod};
    let identity = &TestPki::shared().server;
    let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server()).unwrap();
    b.set_certificate(&identity.cert).unwrap();
    for c in &identity.intermediates {
        b.add_extra_chain_cert(c.clone()).unwrap();
    }
    b.set_private_key(&identity.key).unwrap();
    b.set_alpn_select_callback(|_, client| {
        select_next_proto(b"\x02h2", client).ok_or(AlpnError::NOACK)
    });
    let ctx = b.build().into_context();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(std::net::SocketAddr::from((
            std::net::Ipv4Addr::LOCALHOST,
            0,
        )))
        .unwrap();
    let listener = socket.listen(1024).unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = tokio_openssl::SslStream::new(Ssl::new(&ctx).unwrap(), tcp).unwrap();
        std::pin::Pin::new(&mut tls).accept().await.unwrap();
        let mut conn = h2::server::handshake(tls).await.unwrap();
        let serving = async {
            while let Some(Ok((_, mut respond))) = conn.accept().await {
                let response = http::Response::new(());
                respond.send_response(response, true).unwrap();
            }
        };
        let _ = tokio::time::timeout(serve_for, serving).await;
        // Hold the connection open, unpolled.
        tokio::time::sleep(Duration::from_secs(3600)).await;
        drop(conn);
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_ping_closes_the_connection() {
    let addr = hanging_h2_server(Duration::from_millis(50)).await;
    let http = http_with(|o| {
        o.h2_ping_interval = Some(Duration::from_millis(30));
        o.h2_ping_timeout = Duration::from_millis(100);
    });
    let p = Peer::tls(addr, "localhost")
        .with_ca(TestPki::shared().ca_a())
        .with_alpn(Alpn::H2);
    assert_eq!(fetch(&http, &p).await, (http::Version::HTTP_2, false));
    assert_eq!(http.connector().connection_count_for(&p), 1);
    // The server stops answering after 50 ms; a PING goes unanswered for 100 ms and the
    // connection is closed (the server never closes it).
    let started = Instant::now();
    assert!(
        wait_until(STEP, || http.connector().connection_count_for(&p) == 0).await,
        "a connection whose PINGs go unanswered was kept"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(50),
        "closed after {:?}, before the server stopped answering",
        started.elapsed()
    );
}
