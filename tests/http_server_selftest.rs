//! Checks the HTTP test server (`tests/support/h2_server.rs`, `h1_server.rs`) with clients
//! that do not involve `upstream_pool`: the `h2` crate's client and hyper's HTTP/1.1 client
//! over a plain tokio-openssl stream. If these fail, the `http_*` suites cannot be trusted.

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_openssl::SslStream;

use support::certs::TestPki;
use support::client::TlsClient;
use support::h2_server::{pattern, sha256_hex, HttpServer, Proto, STALL_BODY_LEN};

const T: Duration = Duration::from_secs(5);

async fn tls(server: &HttpServer, alpn: &[&[u8]]) -> SslStream<TcpStream> {
    let client = TlsClient::builder(TestPki::shared().ca_a())
        .alpn(alpn)
        .build();
    client
        .connect(server.addr(), Some("localhost"), None)
        .await
        .unwrap()
}

/// An h2 client connection (its driver spawned).
async fn h2_client(server: &HttpServer) -> h2::client::SendRequest<Bytes> {
    let io = tls(server, &[b"h2"]).await;
    assert_eq!(io.ssl().selected_alpn_protocol(), Some(&b"h2"[..]));
    let (send, conn) = h2::client::handshake(io).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

fn get(path: &str) -> http::Request<()> {
    http::Request::get(format!("https://localhost{path}"))
        .body(())
        .unwrap()
}

/// Sends `req` (no body) and reads the whole response.
async fn h2_send(
    send: &h2::client::SendRequest<Bytes>,
    req: http::Request<()>,
) -> Result<(http::response::Parts, Vec<u8>), h2::Error> {
    let mut send = send.clone().ready().await?;
    let (resp, _) = send.send_request(req, true)?;
    let (parts, mut body) = resp.await?.into_parts();
    let mut out = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        out.extend_from_slice(&chunk);
    }
    Ok((parts, out))
}

fn header<'a>(parts: &'a http::response::Parts, name: &str) -> &'a str {
    parts
        .headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_else(|| panic!("no {name} in {parts:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_concurrent_streams_are_counted_on_one_connection() {
    let server = HttpServer::builder()
        .delay(Duration::from_millis(100))
        .start();
    let send = h2_client(&server).await;
    let started = Instant::now();
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let send = send.clone();
            tokio::spawn(async move { h2_send(&send, get("/")).await.unwrap() })
        })
        .collect();
    let mut req_ns = Vec::new();
    for t in tasks {
        let (parts, body) = t.await.unwrap();
        assert_eq!(header(&parts, "x-conn-id"), "0");
        assert_eq!(header(&parts, "x-proto"), "h2");
        assert_eq!(header(&parts, "x-authority"), "localhost");
        let n: usize = header(&parts, "x-req-n").parse().unwrap();
        assert_eq!(body, format!("conn=0 req={n}\n").as_bytes());
        req_ns.push(n);
    }
    assert!(started.elapsed() < Duration::from_secs(1), "not concurrent");
    req_ns.sort_unstable();
    assert_eq!(req_ns, (1..=20).collect::<Vec<_>>());
    let stats = server.wait_for(|s| s.answered == 20).await;
    assert_eq!(stats.accepted, 1);
    assert_eq!(stats.conns[0].proto, Some(Proto::H2));
    assert!(stats.max_in_flight() > 10, "{stats:#?}");
    assert_eq!(stats.in_flight(), 0);
    assert_eq!(stats.log.len(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_max_concurrent_streams_is_announced_and_observed() {
    let server = HttpServer::builder()
        .max_concurrent_streams(3)
        .delay(Duration::from_millis(30))
        .start();
    let send = h2_client(&server).await;
    // The client only knows the limit once the server's SETTINGS arrived: before that it
    // may open more streams, which the server refuses.
    h2_send(&send, get("/")).await.unwrap();
    let tasks: Vec<_> = (0..12)
        .map(|_| {
            let send = send.clone();
            tokio::spawn(async move { h2_send(&send, get("/")).await.unwrap() })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let stats = server.wait_for(|s| s.answered == 13).await;
    // The h2 client honours the limit: the server's count reaches it and never passes it.
    assert_eq!(stats.max_in_flight(), 3, "{stats:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_goaway_after_n_refuses_later_streams() {
    let server = HttpServer::builder().goaway_after(3).start();
    let send = h2_client(&server).await;
    for n in 1..=3 {
        let (parts, _) = h2_send(&send, get("/")).await.unwrap();
        assert_eq!(header(&parts, "x-req-n"), n.to_string());
    }
    server.wait_for(|s| s.conns[0].goaway_sent).await;
    // Let the GOAWAY arrive, then the connection refuses new streams.
    let failed = tokio::time::timeout(T, async {
        loop {
            if h2_send(&send, get("/")).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(
        failed.is_ok(),
        "the connection kept taking streams after GOAWAY"
    );
    let stats = server.wait_for(|s| s.conns[0].closed).await;
    assert_eq!(stats.conns[0].requests, 3, "{stats:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_bodies_both_ways_and_resets_are_seen() {
    let server = HttpServer::builder().start();
    let send = h2_client(&server).await;

    // Large response body, intact.
    let mut req = get("/");
    req.headers_mut()
        .insert("x-body-size", "300000".parse().unwrap());
    let (parts, body) = h2_send(&send, req).await.unwrap();
    assert_eq!(header(&parts, "content-length"), "300000");
    assert!(body == pattern(300_000), "response body damaged");

    // Request body: the server reports its length and digest.
    let upload = pattern(70_000);
    let mut ready = send.clone().ready().await.unwrap();
    let (resp, mut stream) = ready
        .send_request(
            http::Request::post("https://localhost/up")
                .body(())
                .unwrap(),
            false,
        )
        .unwrap();
    stream.send_data(Bytes::from(upload.clone()), true).unwrap();
    let parts = resp.await.unwrap().into_parts().0;
    assert_eq!(header(&parts, "x-req-body-len"), "70000");
    assert_eq!(header(&parts, "x-req-body-sha256"), sha256_hex(&upload));

    // A stalled response the client abandons: the server sees the reset, nothing in flight.
    let mut ready = send.clone().ready().await.unwrap();
    let (resp, _) = ready.send_request(get("/stall"), true).unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(
        header(&resp.into_parts().0, "content-length"),
        STALL_BODY_LEN.to_string()
    );
    // Dropping the response (and its body) resets the stream.
    let stats = server
        .wait_for(|s| s.resets() == 1 && s.in_flight() == 0)
        .await;
    assert_eq!(stats.accepted, 1);
    assert!(!stats.log.last().unwrap().answered);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_garbage_mode_breaks_the_handshake() {
    let server = HttpServer::builder().garbage_after_h2().start();
    let io = tls(&server, &[b"h2"]).await;
    let result = tokio::time::timeout(T, async {
        let (send, conn) = h2::client::handshake(io).await?;
        let driver = tokio::spawn(conn);
        let r = h2_send(&send, get("/")).await;
        drop(driver);
        r
    })
    .await
    .expect("h2 client hung on garbage");
    assert!(result.is_err(), "garbage accepted: {result:?}");
    assert_eq!(server.stats().answered, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_plaintext_and_alpn_fallback_to_h1() {
    // h2c with prior knowledge.
    let server = HttpServer::builder()
        .plaintext()
        .no_alpn_proto(Proto::H2)
        .start();
    let tcp = TcpStream::connect(server.addr()).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let (parts, _) = h2_send(&send, get("/")).await.unwrap();
    assert_eq!(header(&parts, "x-proto"), "h2");

    // h2 + http/1.1 server, client offering only http/1.1: HTTP/1.1.
    let server = HttpServer::builder().h2_then_h1().start();
    let io = tls(&server, &[b"http/1.1"]).await;
    assert_eq!(io.ssl().selected_alpn_protocol(), Some(&b"http/1.1"[..]));
    let mut h1 = H1::new(io).await;
    let (parts, body) = h1.send("GET", "/", Empty::new()).await;
    assert_eq!(header(&parts, "x-proto"), "http/1.1");
    assert_eq!(body, b"conn=0 req=1\n");
    assert_eq!(
        server.stats().conns[0].alpn.as_deref(),
        Some(&b"http/1.1"[..])
    );
}

/// hyper's HTTP/1.1 client on one connection.
struct H1 {
    send: hyper::client::conn::http1::SendRequest<
        http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>,
    >,
}

impl H1 {
    async fn new(io: SslStream<TcpStream>) -> H1 {
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        H1 { send }
    }

    async fn send<B>(
        &mut self,
        method: &str,
        path: &str,
        body: B,
    ) -> (http::response::Parts, Vec<u8>)
    where
        B: http_body::Body<Data = Bytes, Error = std::convert::Infallible> + Send + Sync + 'static,
    {
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "localhost")
            .body(body.boxed())
            .unwrap();
        tokio::time::timeout(T, self.send.ready())
            .await
            .expect("connection never ready")
            .unwrap();
        let resp = tokio::time::timeout(T, self.send.send_request(req))
            .await
            .expect("response timed out")
            .unwrap();
        let (parts, body) = resp.into_parts();
        let body = tokio::time::timeout(T, body.collect())
            .await
            .expect("body timed out")
            .unwrap()
            .to_bytes()
            .to_vec();
        (parts, body)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h1_framings_keep_one_connection_in_sync() {
    let server = HttpServer::builder().h1_only().start();
    let mut h1 = H1::new(tls(&server, &[]).await).await;
    let (_, b) = h1.send("GET", "/", Empty::new()).await;
    assert_eq!(b, b"conn=0 req=1\n");
    let (p, b) = h1.send("GET", "/chunked", Empty::new()).await;
    assert_eq!(header(&p, "transfer-encoding"), "chunked");
    assert_eq!(b, b"conn=0 req=2\n");
    let (p, b) = h1.send("HEAD", "/", Empty::new()).await;
    assert_eq!(header(&p, "content-length"), "13");
    assert!(b.is_empty());
    let (p, b) = h1.send("GET", "/204", Empty::new()).await;
    assert_eq!(p.status, 204);
    assert!(b.is_empty());
    let (p, b) = h1.send("GET", "/304", Empty::new()).await;
    assert_eq!(p.status, 304);
    assert!(b.is_empty());
    let upload = pattern(50_000);
    let (p, b) = h1
        .send("POST", "/up", Full::new(Bytes::from(upload.clone())))
        .await;
    assert_eq!(header(&p, "x-req-body-sha256"), sha256_hex(&upload));
    assert_eq!(b, b"conn=0 req=6\n");
    let (p, b) = h1.send("GET", "/eof", Empty::new()).await;
    assert!(p.headers.get("content-length").is_none());
    assert_eq!(b, b"conn=0 req=7\n");
    let stats = server.wait_for(|s| s.conns[0].closed).await;
    assert_eq!(stats.accepted, 1);
    assert_eq!(stats.answered, 7);

    // `/close`: Connection: close, then the server closes.
    let mut h1 = H1::new(tls(&server, &[]).await).await;
    let (p, _) = h1.send("GET", "/close", Empty::new()).await;
    assert_eq!(header(&p, "connection"), "close");
    server
        .wait_for(|s| s.conns.len() == 2 && s.conns[1].closed)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h1_drop_if_reused_and_idle_close() {
    let server = HttpServer::builder()
        .h1_only()
        .h1_idle_close(Duration::from_millis(100))
        .start();
    let mut h1 = H1::new(tls(&server, &[]).await).await;
    let (_, b) = h1.send("GET", "/drop-if-reused", Empty::new()).await;
    assert_eq!(b, b"conn=0 req=1\n");
    let req = http::Request::get("/drop-if-reused")
        .header("host", "localhost")
        .body(Empty::new().boxed())
        .unwrap();
    tokio::time::timeout(T, h1.send.ready())
        .await
        .unwrap()
        .unwrap();
    let r = tokio::time::timeout(T, h1.send.send_request(req))
        .await
        .unwrap();
    assert!(r.is_err(), "the second request was answered: {r:?}");
    let stats = server.wait_for(|s| s.conns[0].closed).await;
    assert_eq!(stats.log.len(), 2);
    assert!(!stats.log[1].answered);

    // Idle close after 100 ms.
    let _h1 = H1::new(tls(&server, &[]).await).await;
    server
        .wait_for(|s| s.conns.len() == 2 && s.conns[1].closed)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_freeze_stops_answering_without_closing() {
    let server = HttpServer::builder().h2_freeze_after(1).start();
    let send = h2_client(&server).await;
    let (parts, _) = h2_send(&send, get("/")).await.unwrap();
    assert_eq!(header(&parts, "x-req-n"), "1");
    server.wait_for(|s| s.conns[0].frozen).await;
    let second = tokio::time::timeout(Duration::from_millis(300), h2_send(&send, get("/"))).await;
    assert!(second.is_err(), "a frozen connection answered: {second:?}");
    let stats = server.stats();
    assert!(!stats.conns[0].closed);
    assert_eq!(stats.answered, 1);
}
