//! `upstream_pool::http` over HTTP/1.1 against the in-process HTTP/1.1 server
//! (`tests/support/h1_server.rs`): keep-alive reuse, the release rule (a connection goes back
//! to the pool only when its response body ended cleanly with keep-alive), framings
//! (`Content-Length`, chunked, EOF-delimited, bodiless), streamed uploads, and the retry of
//! a request whose reused connection the server closed before answering. Every case asserts
//! on what the server observed (its connection id and request number per connection).

mod http_support;
mod support;

use std::time::Duration;

use bytes::Bytes;
use http_body_util::channel::Channel;
use http_body_util::{BodyExt, Empty};
use upstream_pool::http::{HttpConnector, ResponseBody, UpstreamInfo};
use upstream_pool::{Alpn, Error, Peer};

use http_support::{http_with, STEP};
use support::certs::TestPki;
use support::h2_server::{pattern, sha256_hex, HttpServer};
use support::wait_until;

fn h1_server() -> HttpServer {
    HttpServer::builder().h1_only().start()
}

fn peer(server: &HttpServer) -> Peer {
    Peer::tls(server.addr(), "localhost")
        .with_ca(TestPki::shared().ca_a())
        .with_alpn(Alpn::H1)
}

fn req(method: &str, path: &str) -> http::Request<Empty<Bytes>> {
    http::Request::builder()
        .method(method)
        .uri(path)
        .body(Empty::new())
        .unwrap()
}

fn get(path: &str) -> http::Request<Empty<Bytes>> {
    req("GET", path)
}

/// `GET path` asking for a body of `size` pattern bytes.
fn get_sized(path: &str, size: usize) -> http::Request<Empty<Bytes>> {
    http::Request::get(path)
        .header("x-body-size", size)
        .body(Empty::new())
        .unwrap()
}

fn header<'a>(parts: &'a http::response::Parts, name: &str) -> &'a str {
    parts
        .headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_else(|| panic!("no {name} header in {parts:?}"))
}

fn info(parts: &http::response::Parts) -> &UpstreamInfo {
    parts
        .extensions
        .get::<UpstreamInfo>()
        .expect("response without UpstreamInfo")
}

/// Sends `req`; returns the response with its body unread.
async fn start<B>(
    http: &HttpConnector,
    peer: &Peer,
    req: http::Request<B>,
) -> Result<http::Response<ResponseBody>, Error>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    tokio::time::timeout(STEP, http.send(peer, req))
        .await
        .expect("send timed out")
}

/// Reads a whole body, bounded by [`STEP`].
async fn read_all(body: ResponseBody) -> Result<Bytes, Error> {
    tokio::time::timeout(STEP, body.collect())
        .await
        .expect("body timed out")
        .map(|c| c.to_bytes())
}

/// Sends `req` and reads the whole body.
async fn send<B>(
    http: &HttpConnector,
    peer: &Peer,
    req: http::Request<B>,
) -> Result<(http::response::Parts, Bytes), Error>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (parts, body) = start(http, peer, req).await?.into_parts();
    Ok((parts, read_all(body).await?))
}

/// Asserts the body is the default `conn=<conn> req=<n>\n` one.
#[track_caller]
fn assert_default_body(body: &[u8], conn: usize, n: usize) {
    assert_eq!(
        String::from_utf8_lossy(body),
        format!("conn={conn} req={n}\n"),
        "response from the wrong connection or out of sync"
    );
}

/// Waits until the pool holds `n` idle connections for `peer` (release can trail the last
/// body byte by a task switch).
async fn wait_idle(http: &HttpConnector, peer: &Peer, n: usize) {
    let ok = wait_until(STEP, || http.connector().idle_count_for(peer) == n).await;
    assert!(
        ok,
        "idle_count_for = {}, expected {n}",
        http.connector().idle_count_for(peer)
    );
}

#[tokio::test]
async fn sequential_requests_reuse_one_connection() {
    let server = h1_server();
    let http = http_with(|_| {});
    let peer = peer(&server);
    for n in 1..=5 {
        let (parts, body) = send(&http, &peer, get("/")).await.unwrap();
        assert_eq!(parts.version, http::Version::HTTP_11);
        assert_eq!(
            header(&parts, "x-authority"),
            "localhost",
            "Host from the SNI"
        );
        assert_default_body(&body, 0, n);
        assert_eq!(
            info(&parts).reused,
            n > 1,
            "UpstreamInfo::reused on request {n}"
        );
        wait_idle(&http, &peer, 1).await;
    }
    let stats = server.stats();
    assert_eq!(stats.accepted, 1, "{stats:#?}");
    assert_eq!(stats.conns[0].requests, 5);
}

#[tokio::test]
async fn plaintext_peer_speaks_http11_and_reuses() {
    let server = HttpServer::builder().plaintext().start();
    let http = http_with(|_| {});
    let peer = Peer::tcp(server.addr());
    for n in 1..=3 {
        let req = http::Request::get("/")
            .header("host", "backend.example")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let (parts, body) = send(&http, &peer, req).await.unwrap();
        assert_eq!(parts.version, http::Version::HTTP_11);
        assert_eq!(header(&parts, "x-authority"), "backend.example");
        assert_default_body(&body, 0, n);
    }
    assert_eq!(server.stats().accepted, 1);
}

#[tokio::test]
async fn authority_comes_from_the_uri_then_the_host_header() {
    let server = h1_server();
    let http = http_with(|_| {});
    let peer = peer(&server);
    let req = http::Request::get("https://api.example:8443/x?y=1")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let (parts, _) = send(&http, &peer, req).await.unwrap();
    assert_eq!(header(&parts, "x-authority"), "api.example:8443");
    let req = http::Request::get("/x")
        .header("host", "other.example")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let (parts, _) = send(&http, &peer, req).await.unwrap();
    assert_eq!(header(&parts, "x-authority"), "other.example");
    let stats = server.stats();
    assert_eq!(stats.log[0].path, "/x?y=1", "origin-form on the wire");
    assert_eq!(stats.accepted, 1);
}

#[tokio::test]
async fn the_connection_is_pooled_only_once_the_body_is_read() {
    let server = h1_server();
    let http = http_with(|_| {});
    let peer = peer(&server);

    // 256 KiB cannot arrive with the head: the body is genuinely unread.
    let resp = start(&http, &peer, get_sized("/", 256 * 1024))
        .await
        .unwrap();
    assert_eq!(http.connector().idle_count_for(&peer), 0);
    assert_eq!(http.connector().connection_count_for(&peer), 1);
    let body = read_all(resp.into_body()).await.unwrap();
    assert!(body == pattern(256 * 1024), "body damaged");
    wait_idle(&http, &peer, 1).await;

    let (_, body) = send(&http, &peer, get("/")).await.unwrap();
    assert_default_body(&body, 0, 2);
    assert_eq!(server.stats().accepted, 1);
}

#[tokio::test]
async fn a_held_unread_response_forces_a_second_connection() {
    let server = h1_server();
    let http = http_with(|_| {});
    let peer = peer(&server);

    let size = 256 * 1024;
    let first = start(&http, &peer, get_sized("/", size)).await.unwrap();
    let second = start(&http, &peer, get_sized("/", size)).await.unwrap();
    let conn_of = |r: &http::Response<ResponseBody>| {
        r.headers()
            .get("x-conn-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    assert_eq!(conn_of(&first), "0");
    assert_eq!(
        conn_of(&second),
        "1",
        "a connection with an unread response was handed to another request"
    );
    assert_eq!(server.stats().accepted, 2);
    assert_eq!(http.connector().idle_count_for(&peer), 0);

    let (a, b) = (
        read_all(first.into_body()).await.unwrap(),
        read_all(second.into_body()).await.unwrap(),
    );
    assert!(a == pattern(size) && b == pattern(size), "bodies damaged");
    wait_idle(&http, &peer, 2).await;
}

#[tokio::test]
async fn a_body_dropped_after_its_first_chunk_is_not_pooled() {
    let server = h1_server();
    let http = http_with(|_| {});
    let peer = peer(&server);

    let resp = start(&http, &peer, get_sized("/", 4 * 1024 * 1024))
        .await
        .unwrap();
    let mut body = resp.into_body();
    let first = tokio::time::timeout(STEP, body.frame())
        .await
        .unwrap()
        .expect("no first frame")
        .unwrap();
    assert!(first.data_ref().is_some_and(|d| !d.is_empty()));
    drop(body);

    let gone = wait_until(STEP, || http.connector().connection_count_for(&peer) == 0).await;
    assert!(
        gone,
        "the connection with an unread body is still counted: {}",
        http.connector().connection_count_for(&peer)
    );
    assert_eq!(http.connector().idle_count_for(&peer), 0);
    server.wait_for(|s| s.conns[0].closed).await;

    // The next requests are in sync, on a new connection.
    for n in 1..=3 {
        let (_, body) = send(&http, &peer, get("/")).await.unwrap();
        assert_default_body(&body, 1, n);
    }
    assert_eq!(server.stats().accepted, 2);
}

/// `Connection: close` with the close itself 300 ms later: the header alone must keep the
/// connection out of the pool (the pool's own closed-connection check cannot see it yet).
#[tokio::test]
async fn connection_close_header_alone_keeps_the_connection_out_of_the_pool() {
    let server = h1_server();
    let http = http_with(|_| {});
    let peer = peer(&server);
    let (parts, body) = send(&http, &peer, get("/close-late")).await.unwrap();
    assert_eq!(header(&parts, "connection"), "close");
    assert_default_body(&body, 0, 1);
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        http.connector().idle_count_for(&peer),
        0,
        "a connection answered with `Connection: close` was pooled"
    );
    let (_, body) = send(&http, &peer, get("/")).await.unwrap();
    assert_default_body(&body, 1, 1);
    let stats = server.stats();
    assert!(
        !stats.conns[0].closed,
        "the server closed too early for this test"
    );
    assert_eq!(stats.accepted, 2);
}

#[tokio::test]
async fn connection_close_from_the_server_is_not_pooled() {
    let server = h1_server();
    let http = http_with(|_| {});
    let peer = peer(&server);
    let (parts, body) = send(&http, &peer, get("/close")).await.unwrap();
    assert_eq!(header(&parts, "connection"), "close");
    assert_default_body(&body, 0, 1);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(http.connector().idle_count_for(&peer), 0);
    let (_, body) = send(&http, &peer, get("/")).await.unwrap();
    assert_default_body(&body, 1, 1);
    assert_eq!(server.stats().accepted, 2);
}

#[tokio::test]
async fn an_eof_delimited_body_is_read_whole_and_not_pooled() {
    let server = h1_server();
    let http = http_with(|_| {});
    let peer = peer(&server);
    let size = 100_000;
    let (parts, body) = send(&http, &peer, get_sized("/eof", size)).await.unwrap();
    assert!(parts.headers.get("content-length").is_none());
    assert!(
        body == pattern(size),
        "EOF-delimited body damaged ({} bytes)",
        body.len()
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(http.connector().idle_count_for(&peer), 0);
    let (_, body) = send(&http, &peer, get("/")).await.unwrap();
    assert_default_body(&body, 1, 1);
}

#[tokio::test]
async fn a_chunked_response_is_read_whole_and_pooled() {
    let server = h1_server();
    let http = http_with(|_| {});
    let peer = peer(&server);
    let size = 50_000;
    let (parts, body) = send(&http, &peer, get_sized("/chunked", size))
        .await
        .unwrap();
    assert_eq!(header(&parts, "transfer-encoding"), "chunked");
    assert!(
        body == pattern(size),
        "chunked body damaged ({} bytes)",
        body.len()
    );
    wait_idle(&http, &peer, 1).await;
    let (_, body) = send(&http, &peer, get("/")).await.unwrap();
    assert_default_body(&body, 0, 2);
    assert_eq!(server.stats().accepted, 1);
}

#[tokio::test]
async fn bodiless_responses_are_released() {
    let server = h1_server();
    let http = http_with(|_| {});
    let peer = peer(&server);

    let (parts, body) = send(&http, &peer, req("HEAD", "/")).await.unwrap();
    assert_eq!(parts.status, 200);
    assert_eq!(
        header(&parts, "content-length"),
        "13",
        "HEAD keeps the GET length"
    );
    assert!(body.is_empty());
    wait_idle(&http, &peer, 1).await;

    let (parts, body) = send(&http, &peer, get("/204")).await.unwrap();
    assert_eq!(parts.status, 204);
    assert!(body.is_empty());
    wait_idle(&http, &peer, 1).await;

    let (parts, body) = send(&http, &peer, get("/304")).await.unwrap();
    assert_eq!(parts.status, 304);
    assert!(body.is_empty());
    wait_idle(&http, &peer, 1).await;

    let (_, body) = send(&http, &peer, get("/")).await.unwrap();
    assert_default_body(&body, 0, 4);
    assert_eq!(server.stats().accepted, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_upload_of_unknown_size_arrives_intact() {
    let server = h1_server();
    let http = http_with(|_| {});
    let peer = peer(&server);

    let (mut tx, body) = Channel::<Bytes, std::convert::Infallible>::new(2);
    let upload = pattern(200_000);
    let writer = {
        let upload = upload.clone();
        tokio::spawn(async move {
            for piece in upload.chunks(5_000) {
                tx.send_data(Bytes::copy_from_slice(piece)).await.unwrap();
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    let req = http::Request::post("/upload").body(body).unwrap();
    let (parts, body) = send(&http, &peer, req).await.unwrap();
    writer.await.unwrap();
    assert_eq!(header(&parts, "x-req-body-len"), "200000");
    assert_eq!(header(&parts, "x-req-body-sha256"), sha256_hex(&upload));
    assert_default_body(&body, 0, 1);
    wait_idle(&http, &peer, 1).await;
    let (_, body) = send(&http, &peer, get("/")).await.unwrap();
    assert_default_body(&body, 0, 2);
}

#[tokio::test]
async fn a_reused_connection_closed_before_the_response_is_retried_on_a_fresh_one() {
    let server = h1_server();
    // A long reap interval: the pool must not learn of the close from the reaper.
    let http = http_with(|o| o.reap_interval = Duration::from_secs(60));
    let peer = peer(&server);

    let (parts, body) = send(&http, &peer, get("/drop-if-reused")).await.unwrap();
    assert_default_body(&body, 0, 1);
    assert!(!info(&parts).retried);
    wait_idle(&http, &peer, 1).await;

    // Connection 0 reads this request and closes without answering.
    let (parts, body) = send(&http, &peer, get("/drop-if-reused"))
        .await
        .expect("an empty-bodied request on a dead reused connection was not retried");
    assert_default_body(&body, 1, 1);
    assert!(info(&parts).retried, "UpstreamInfo::retried");
    // The log entry of an answer is written after its last byte: wait for it.
    let stats = server.wait_for(|s| s.log.len() == 3).await;
    assert_eq!(stats.accepted, 2, "{stats:#?}");
    assert!(!stats.log[1].answered && stats.log[1].conn == 0);
    assert_eq!(stats.log[2].conn, 1);
}

#[tokio::test]
async fn an_idle_connection_the_server_closed_is_not_used() {
    let server = HttpServer::builder()
        .h1_only()
        .h1_idle_close(Duration::from_millis(100))
        .start();
    let http = http_with(|o| o.reap_interval = Duration::from_secs(60));
    let peer = peer(&server);
    let (_, body) = send(&http, &peer, get("/")).await.unwrap();
    assert_default_body(&body, 0, 1);
    server.wait_for(|s| s.conns[0].closed).await;
    // Either the liveness check or the retry: the request succeeds on a fresh connection.
    let (_, body) = send(&http, &peer, get("/")).await.unwrap();
    assert_default_body(&body, 1, 1);
}

#[tokio::test]
async fn a_streamed_body_is_not_replayed_after_a_reused_connection_fails() {
    let server = h1_server();
    let http = http_with(|o| o.reap_interval = Duration::from_secs(60));
    let peer = peer(&server);

    send(&http, &peer, get("/drop-if-reused")).await.unwrap();
    wait_idle(&http, &peer, 1).await;

    let (mut tx, body) = Channel::<Bytes, std::convert::Infallible>::new(4);
    tokio::spawn(async move {
        for _ in 0..4 {
            if tx
                .send_data(Bytes::from_static(b"0123456789"))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let req = http::Request::post("/drop-if-reused").body(body).unwrap();
    let err = send(&http, &peer, req)
        .await
        .expect_err("the server answered a dropped request?");
    assert!(err.retryable(), "error should say retryable(): {err}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stats = server.stats();
    assert_eq!(
        stats.accepted, 1,
        "a streamed body was replayed on a fresh connection: {stats:#?}"
    );
    assert_eq!(stats.log.len(), 2);
}

/// Many concurrent exchanges under `max_connections_per_peer = 4`: at most four
/// connections, every response body is the one its head announces (no connection carried
/// two exchanges at once or handed on an unread response), and every request succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_under_a_connection_cap_stay_in_sync() {
    let server = HttpServer::builder()
        .h1_only()
        .delay(Duration::from_millis(5))
        .start();
    let http = http_with(|o| {
        o.max_connections_per_peer = Some(4);
        o.wait_timeout = Duration::from_secs(4);
    });
    let peer = peer(&server);
    let tasks: Vec<_> = (0..30)
        .map(|i| {
            let (http, peer) = (http.clone(), peer.clone());
            tokio::spawn(async move {
                for j in 0..3 {
                    let path = if (i + j) % 3 == 0 { "/chunked" } else { "/" };
                    let (parts, body) = send(&http, &peer, get(path)).await.unwrap();
                    let conn: usize = header(&parts, "x-conn-id").parse().unwrap();
                    let n: usize = header(&parts, "x-req-n").parse().unwrap();
                    assert_default_body(&body, conn, n);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("a request task failed");
    }
    // The server counts an answer after its last write, which can trail the client.
    let stats = server.wait_for(|s| s.answered == 90).await;
    assert!(stats.accepted <= 4, "cap 4, server saw {}", stats.accepted);
}
