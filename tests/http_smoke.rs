//! `upstream_pool::http` behaviour the other HTTP suites do not pin down: `Alpn::H2H1`
//! learning HTTP/1.1 with one shared dial, HTTP/2 connections closed on the idle timeout,
//! the PING keepalive keeping one connection, a failed shared dial failing its waiters fast,
//! and connector clones sharing HTTP/2 connections. Each asserts on what the server saw.

mod http_support;
mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use upstream_pool::http::{HttpConnector, UpstreamInfo};
use upstream_pool::{Alpn, Connector, ConnectorOptions, ErrorKind, Peer};

use http_support::{http_with, peer, STEP};
use support::certs::TestPki;
use support::h2_server::{HttpServer, Proto};
use support::wait_until;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_request_body_is_a_request_body_error() {
    use http_body_util::channel::Channel;
    for (server, alpn) in [
        (HttpServer::builder().start(), Alpn::H2),
        (HttpServer::builder().h1_only().start(), Alpn::H1),
    ] {
        let http = http_with(|_| {});
        let p = peer(&server, alpn.clone());
        let (mut tx, body) = Channel::<Bytes, std::io::Error>::new(1);
        let request = http::Request::post("/upload").body(body).unwrap();
        let sending = tokio::spawn({
            let (http, p) = (http.clone(), p.clone());
            async move { http.send(&p, request).await }
        });
        tx.send_data(Bytes::from_static(b"first piece"))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        tx.abort(std::io::Error::other("the client went away"));
        let err = tokio::time::timeout(STEP, sending)
            .await
            .expect("hung")
            .unwrap()
            .expect_err("a request whose body failed succeeded");
        assert_eq!(err.kind(), ErrorKind::RequestBody, "{alpn:?}: {err}");
        assert!(err.to_string().contains("went away"), "{err}");
        // The server saw the request abandoned: the HTTP/2 stream reset, the HTTP/1.1
        // connection closed (never pooled with half a request on it).
        match alpn {
            Alpn::H2 => {
                server.wait_for(|s| s.resets() == 1).await;
                assert_eq!(http.connector().connection_count_for(&p), 1);
            }
            _ => {
                server.wait_for(|s| s.open == 0).await;
                assert_eq!(http.connector().connection_count_for(&p), 0);
            }
        }
        // The next request goes through.
        fetch(&http, &p).await;
        assert_eq!(server.stats().answered, 1, "{alpn:?}");
    }
}

/// A plaintext HTTP/1.1 server that answers each request with a canned byte string chosen
/// by its path (see `canned`), keeping the connection open. Returns its address and a
/// counter of accepted connections.
async fn scripted_h1_server() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(std::net::SocketAddr::from((
            std::net::Ipv4Addr::LOCALHOST,
            0,
        )))
        .unwrap();
    let listener = socket.listen(1024).unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                        buf.drain(..end + 4);
                        let path = head.split(' ').nth(1).unwrap_or("/").to_string();
                        if tcp.write_all(&canned(&path)).await.is_err() {
                            return;
                        }
                    }
                    match tcp.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    (addr, accepted)
}

fn canned(path: &str) -> Vec<u8> {
    match path {
        "/interim" => b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec(),
        "/trailers" => b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-sum\r\n\r\n2\r\nok\r\n0\r\nx-sum: 42\r\n\r\n".to_vec(),
        "/upgrade" => b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n".to_vec(),
        "/garbage" => b"HELLO THERE\r\n\r\n".to_vec(),
        "/many-headers" => {
            let mut r = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n".to_vec();
            for i in 0..200 {
                r.extend_from_slice(format!("x-h{i}: v\r\n").as_bytes());
            }
            r.extend_from_slice(b"\r\n");
            r
        }
        "/leftover" => b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n".to_vec(),
        _ => b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nplain".to_vec(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http11_interim_responses_trailers_and_bad_heads() {
    use std::sync::atomic::Ordering;
    let (addr, accepted) = scripted_h1_server().await;
    let http = http_with(|_| {});
    let p = Peer::tcp(addr);
    let send = |path: &'static str| {
        let (http, p) = (http.clone(), p.clone());
        async move {
            let req = http::Request::get(path)
                .body(Empty::<Bytes>::new())
                .unwrap();
            tokio::time::timeout(STEP, http.send(&p, req))
                .await
                .expect("hung")
        }
    };

    // 100 and 103 precede the final response; the connection is pooled after it.
    let response = send("/interim").await.unwrap();
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"ok");
    assert_eq!(http.connector().idle_count_for(&p), 1);

    // Trailers of a chunked body come through as a trailers frame; pooled again, same
    // connection.
    let response = send("/trailers").await.unwrap();
    assert!(response.extensions().get::<UpstreamInfo>().unwrap().reused);
    let collected = response.into_body().collect().await.unwrap();
    assert_eq!(collected.trailers().unwrap()["x-sum"], "42");
    assert_eq!(&collected.to_bytes()[..], b"ok");
    assert_eq!(http.connector().idle_count_for(&p), 1);
    assert_eq!(accepted.load(Ordering::SeqCst), 1);

    // Bytes beyond the response: the body is right, the connection is not pooled.
    let response = send("/leftover").await.unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"ok");
    assert_eq!(http.connector().idle_count_for(&p), 0);

    // Typed errors, and the connection is closed, never pooled.
    for path in ["/upgrade", "/garbage", "/many-headers"] {
        let err = send(path).await.expect_err(path);
        assert_eq!(err.kind(), ErrorKind::ProtocolError, "{path}: {err}");
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
        assert_eq!(http.connector().idle_count_for(&p), 0, "{path}");
        assert_eq!(http.connector().connection_count_for(&p), 0, "{path}");
    }
    // One connection for the first three exchanges (closed for its leftover bytes), then one
    // per failed case: each failure cost its connection.
    assert_eq!(accepted.load(Ordering::SeqCst), 4);
    let response = send("/").await.unwrap();
    assert_eq!(
        response.into_body().collect().await.unwrap().to_bytes(),
        "plain"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http11_response_before_the_upload_ends_is_returned() {
    use http_body_util::channel::Channel;
    // The scripted server answers as soon as it has a request head, as a server refusing
    // an upload (401, 413) does.
    let (addr, _) = scripted_h1_server().await;
    let http = http_with(|_| {});
    let p = Peer::tcp(addr);
    let (mut tx, body) = Channel::<Bytes, std::io::Error>::new(1);
    tx.send_data(Bytes::from_static(b"first piece"))
        .await
        .unwrap();
    let request = http::Request::post("/upload").body(body).unwrap();
    // The body never ends while the response is awaited.
    let response = tokio::time::timeout(STEP, http.send(&p, request))
        .await
        .expect("waited for the rest of the upload instead of reading the response")
        .unwrap();
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"plain");
    // Half a request went out: the connection is never pooled.
    assert_eq!(http.connector().idle_count_for(&p), 0);
    assert_eq!(http.connector().connection_count_for(&p), 0);
    drop(tx);
}

/// An option's name and a change that makes it unusable.
type BreakOption = (&'static str, fn(&mut ConnectorOptions));

#[test]
fn unusable_http_options_are_invalid_config() {
    let cases: [BreakOption; 3] = [
        ("max_h2_streams", |o| o.max_h2_streams = 0),
        ("h2_ping_interval", |o| {
            o.h2_ping_interval = Some(Duration::ZERO)
        }),
        ("h2_ping_timeout", |o| o.h2_ping_timeout = Duration::ZERO),
    ];
    for (name, break_it) in cases {
        let mut options = ConnectorOptions::default();
        break_it(&mut options);
        let err = Connector::new(options).expect_err(name);
        assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{name}: {err}");
        assert!(err.to_string().contains(name), "{name}: {err}");
    }
    let defaults = ConnectorOptions::default();
    assert_eq!(defaults.max_h2_streams, 100);
    assert_eq!(defaults.h2_ping_interval, None);
    assert_eq!(defaults.h2_ping_timeout, Duration::from_secs(20));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_connection_past_max_lifetime_takes_no_new_streams_and_closes() {
    let server = HttpServer::builder().start();
    let http = http_with(|o| o.max_lifetime = Some(Duration::from_millis(200)));
    let p = peer(&server, Alpn::H2);
    assert_eq!(fetch(&http, &p).await, (http::Version::HTTP_2, false));
    assert_eq!(fetch(&http, &p).await, (http::Version::HTTP_2, true));
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Expired: the next request dials a new connection, and the old one is closed.
    assert_eq!(fetch(&http, &p).await, (http::Version::HTTP_2, false));
    let stats = server.wait_for(|s| s.open == 1).await;
    assert_eq!(stats.accepted, 2);
    assert_eq!(stats.conns[0].requests, 2);
    assert!(stats.conns[0].closed, "{stats:#?}");
    // The upstream sees the close (the TLS shutdown, or the socket's drop) a moment before
    // the connection's slot is freed (its lease is dropped after its stream): wait for it.
    assert!(
        wait_until(STEP, || http.connector().connection_count_for(&p) == 1).await,
        "the expired connection's slot was freed: {}",
        http.connector().connection_count_for(&p)
    );
    // Huge durations everywhere are "never", not an overflow panic.
    let http = http_with(|o| {
        o.max_lifetime = Some(Duration::MAX);
        o.wait_timeout = Duration::MAX;
        o.h2_ping_interval = Some(Duration::MAX);
        o.h2_ping_timeout = Duration::MAX;
    });
    let p = p.with_idle_timeout(Duration::MAX);
    assert_eq!(fetch(&http, &p).await, (http::Version::HTTP_2, false));
    assert_eq!(fetch(&http, &p).await, (http::Version::HTTP_2, true));
}
