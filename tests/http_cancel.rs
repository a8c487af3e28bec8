//! Cancel safety and bad input for `upstream_pool::http`: dropping a `send` future (before
//! the response head) or a `ResponseBody` (mid-way) leaks no HTTP/2 stream, no pool slot
//! (`connection_count_for` back to its baseline, stream slots usable again) and no file
//! descriptor, and the server sees the stream reset or the connection closed; bad requests and
//! a server speaking garbage after ALPN `h2` give typed errors, never a panic or a hang.
//!
//! Descriptor counts are process-wide: the leak test takes [`FD_LOCK`] for writing, every
//! other test for reading (each before building its runtime), so nothing opens descriptors
//! while it counts.

mod http_support;
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use tokio::sync::RwLock;
use upstream_pool::http::{HttpConnector, ResponseBody};
use upstream_pool::{Alpn, Error, ErrorKind, Peer};

use http_support::{get, http_with, peer, STEP};
use support::certs::TestPki;
use support::h2_server::{HttpServer, HttpStats};
use support::{open_fds, wait_for_open_fds, wait_until};

static FD_LOCK: RwLock<()> = RwLock::const_new(());

fn get_delayed(path: &str, delay_ms: u64) -> http::Request<Empty<Bytes>> {
    http::Request::get(path)
        .header("x-delay-ms", delay_ms)
        .body(Empty::new())
        .unwrap()
}

async fn start(
    http: &HttpConnector,
    peer: &Peer,
    req: http::Request<Empty<Bytes>>,
) -> Result<http::Response<ResponseBody>, Error> {
    tokio::time::timeout(STEP, http.send(peer, req))
        .await
        .expect("send timed out")
}

/// Sends and reads the body; returns `(x-conn-id, body)` after checking the body is the one
/// the server wrote for that request (`conn=<id> req=<n>`).
async fn send(
    http: &HttpConnector,
    peer: &Peer,
    req: http::Request<Empty<Bytes>>,
) -> Result<(usize, Bytes), Error> {
    let (parts, body) = start(http, peer, req).await?.into_parts();
    let body = tokio::time::timeout(STEP, body.collect())
        .await
        .expect("body timed out")?
        .to_bytes();
    let conn = parts
        .headers
        .get("x-conn-id")
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .expect("x-conn-id");
    let n = parts
        .headers
        .get("x-req-n")
        .and_then(|v| v.to_str().ok())
        .expect("x-req-n");
    assert_eq!(
        String::from_utf8_lossy(&body),
        format!("conn={conn} req={n}\n"),
        "response body out of sync with its head"
    );
    Ok((conn, body))
}

/// Reads the first data frame of `resp`'s body, then drops the body.
async fn read_first_frame_and_drop(resp: http::Response<ResponseBody>) {
    let mut body = resp.into_body();
    let frame = tokio::time::timeout(STEP, body.frame())
        .await
        .expect("first frame timed out")
        .expect("body ended at once")
        .expect("body error");
    assert!(frame.data_ref().is_some_and(|d| !d.is_empty()));
    drop(body);
}

async fn wait_count(http: &HttpConnector, peer: &Peer, n: usize, what: &str) {
    let ok = wait_until(STEP, || http.connector().connection_count_for(peer) == n).await;
    assert!(
        ok,
        "{what}: connection_count_for = {}, expected {n}",
        http.connector().connection_count_for(peer)
    );
}

/// Waits until the server has `n` requests in flight (the request reached it).
async fn wait_in_flight(server: &HttpServer, n: usize) -> HttpStats {
    server.wait_for(|s| s.in_flight() == n).await
}

/// Runs `test` on a two-worker runtime built *after* taking [`FD_LOCK`], so no test's
/// runtime (its epoll and eventfd descriptors) comes or goes while the leak test counts.
fn run<F: std::future::Future>(exclusive: bool, test: impl FnOnce() -> F) -> F::Output {
    let (_write, _read) = if exclusive {
        (Some(FD_LOCK.blocking_write()), None)
    } else {
        (None, Some(FD_LOCK.blocking_read()))
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(test())
}

#[test]
fn dropped_sends_and_bodies_leak_no_stream_slot_or_descriptor() {
    run(true, leak_phases);
}

/// What each open descriptor points to (`/proc/self/fd`), for a failure message.
fn fd_targets() -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir("/proc/self/fd")
        .map(|dir| {
            dir.filter_map(|e| e.ok())
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .map(|t| t.display().to_string())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

async fn leak_phases() {
    let _ = TestPki::shared();
    let h1 = HttpServer::builder().h1_only().start();
    let h2 = HttpServer::builder().start();
    let baseline = open_fds();
    let baseline_fds = fd_targets();

    // --- HTTP/1.1 ---
    let http = http_with(|_| {});
    let p1 = peer(&h1, Alpn::H1);

    // (a) send dropped before the response head: the connection is closed, not pooled.
    let task = {
        let (http, p1) = (http.clone(), p1.clone());
        tokio::spawn(async move { http.send(&p1, get_delayed("/", 300)).await })
    };
    wait_in_flight(&h1, 1).await;
    task.abort();
    let _ = task.await;
    wait_count(&http, &p1, 0, "h1 send dropped before head").await;
    assert_eq!(http.connector().idle_count_for(&p1), 0);
    h1.wait_for(|s| s.conns[0].closed).await;

    // (b) body dropped mid-way: closed, not pooled.
    let resp = start(&http, &p1, get("/stall")).await.unwrap();
    read_first_frame_and_drop(resp).await;
    wait_count(&http, &p1, 0, "h1 body dropped mid-way").await;
    h1.wait_for(|s| s.conns.len() == 2 && s.conns[1].closed)
        .await;

    // (c) response dropped right after its head, body unread.
    let resp = start(&http, &p1, get("/stall")).await.unwrap();
    drop(resp);
    wait_count(&http, &p1, 0, "h1 response dropped after head").await;

    // (d) sends cancelled at varied points (dial, handshake, request, head).
    for i in 0..12u64 {
        let _ = tokio::time::timeout(
            Duration::from_micros(300 * i),
            http.send(&p1, get_delayed("/", 5)),
        )
        .await;
    }
    // A cancelled dial may finish in the background and pool its connection; nothing may
    // stay in use.
    let settled = wait_until(STEP, || {
        let c = http.connector();
        c.connection_count_for(&p1) == c.idle_count_for(&p1)
    })
    .await;
    assert!(
        settled,
        "h1 sends cancelled at varied points: {} connections, {} idle",
        http.connector().connection_count_for(&p1),
        http.connector().idle_count_for(&p1)
    );
    // The pool is in sync afterwards (`send` checks each body against its head), and a
    // connection is reused.
    let (conn, _) = send(&http, &p1, get("/")).await.unwrap();
    let (conn2, _) = send(&http, &p1, get("/")).await.unwrap();
    assert_eq!(conn2, conn);

    // --- HTTP/2: one connection, four streams, so a leaked stream slot shows up as a wait.
    let http2 = http_with(|o| {
        o.max_h2_streams = 4;
        o.max_connections_per_peer = Some(1);
        o.wait_timeout = Duration::from_secs(2);
    });
    let p2 = peer(&h2, Alpn::H2);
    let (conn, _) = send(&http2, &p2, get("/")).await.unwrap();
    assert_eq!(conn, 0);

    // (e) send dropped before the head: the server sees the stream reset.
    let task = {
        let (http2, p2) = (http2.clone(), p2.clone());
        tokio::spawn(async move { http2.send(&p2, get_delayed("/", 5_000)).await })
    };
    wait_in_flight(&h2, 1).await;
    task.abort();
    let _ = task.await;
    let stats = h2.wait_for(|s| s.resets() == 1 && s.in_flight() == 0).await;
    assert_eq!(stats.accepted, 1);

    // (f) body dropped mid-way, and (g) a response dropped right after its head.
    let resp = start(&http2, &p2, get("/stall")).await.unwrap();
    read_first_frame_and_drop(resp).await;
    h2.wait_for(|s| s.resets() == 2 && s.in_flight() == 0).await;
    let resp = start(&http2, &p2, get("/stall")).await.unwrap();
    drop(resp);
    h2.wait_for(|s| s.resets() == 3 && s.in_flight() == 0).await;

    // (h) 24 concurrent sends, cancelled at varied points.
    let tasks: Vec<_> = (0..24u64)
        .map(|i| {
            let (http2, p2) = (http2.clone(), p2.clone());
            tokio::spawn(async move {
                let _ = tokio::time::timeout(
                    Duration::from_millis(i * 3),
                    http2.send(&p2, get_delayed("/", 40)),
                )
                .await;
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    h2.wait_for(|s| s.in_flight() == 0).await;
    assert_eq!(http2.connector().connection_count_for(&p2), 1);

    // Four streams still fit at once on the one connection: no stream slot leaked.
    let started = Instant::now();
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let (http2, p2) = (http2.clone(), p2.clone());
            tokio::spawn(async move { send(&http2, &p2, get_delayed("/", 200)).await })
        })
        .collect();
    for t in tasks {
        let (conn, _) = t
            .await
            .unwrap()
            .expect("request after cancellations failed");
        assert_eq!(conn, 0);
    }
    assert!(
        started.elapsed() < Duration::from_millis(390),
        "four streams did not run at once after cancellations ({:?}): a stream slot leaked",
        started.elapsed()
    );
    let stats = h2.stats();
    assert_eq!(stats.accepted, 1, "{stats:#?}");

    // (i) Every request of a new key cancelled while the shared dial is in progress: the
    // dial finishes in the background, and the key works afterwards on that connection.
    let p3 = p2.clone().with_group("cancelled-mid-dial");
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (http2, p3) = (http2.clone(), p3.clone());
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_micros(500), http2.send(&p3, get("/")))
                    .await;
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let settled = wait_until(STEP, || http2.connector().connection_count_for(&p3) <= 1).await;
    assert!(settled, "dials cancelled mid-way left extra connections");
    let (conn, _) = send(&http2, &p3, get("/")).await.unwrap();
    assert_eq!(h2.stats().accepted, 2, "the shared dial was not shared");
    assert_eq!(conn, 1);

    // Everything closes when the connectors go.
    drop(http);
    drop(http2);
    h1.wait_for(|s| s.open == 0).await;
    h2.wait_for(|s| s.open == 0).await;
    let now = wait_for_open_fds(baseline, STEP).await;
    assert!(
        now <= baseline,
        "{now} descriptors open, baseline {baseline}\nbaseline: {baseline_fds:?}\nnow: {:?}",
        fd_targets()
    );
}

#[test]
fn an_invalid_authority_is_a_typed_error_and_sends_nothing() {
    run(false, invalid_authority);
}

async fn invalid_authority() {
    let server = HttpServer::builder().h2_then_h1().start();
    let http = http_with(|_| {});
    for alpn in [Alpn::H1, Alpn::H2] {
        let p = peer(&server, alpn.clone());
        for host in ["bad host", "[::1", "a/b"] {
            assert!(
                host.parse::<http::uri::Authority>().is_err(),
                "{host:?} parses as an authority"
            );
            let req = http::Request::get("/")
                .header("host", host)
                .body(Empty::<Bytes>::new())
                .unwrap();
            let result = tokio::time::timeout(STEP, http.send(&p, req))
                .await
                .expect("send hung on an invalid authority");
            let err = result.expect_err("a request with an invalid authority was sent");
            assert_eq!(
                err.kind(),
                ErrorKind::InvalidConfig,
                "Host {host:?} over {alpn:?}: {err}"
            );
            assert!(
                err.to_string().contains(host),
                "the error does not name the bad value {host:?}: {err}"
            );
        }
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let stats = server.stats();
    assert_eq!(
        stats.requests(),
        0,
        "an invalid request reached the server: {stats:#?}"
    );
}

#[test]
fn garbage_after_alpn_h2_is_a_typed_error_without_a_hang() {
    run(false, garbage_after_h2);
}

async fn garbage_after_h2() {
    let server = Arc::new(HttpServer::builder().garbage_after_h2().start());
    let http = http_with(|_| {});
    let p = peer(&server, Alpn::H2);
    for attempt in 0..2 {
        let started = Instant::now();
        let result = tokio::time::timeout(STEP, send(&http, &p, get("/"))).await;
        let err = result
            .unwrap_or_else(|_| panic!("attempt {attempt}: hung on a garbage HTTP/2 server"))
            .expect_err("garbage accepted as an HTTP/2 response");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "attempt {attempt}: error took {:?}",
            started.elapsed()
        );
        assert_eq!(err.kind(), ErrorKind::ProtocolError, "{err}");
        assert!(
            !err.retryable(),
            "a protocol error is not the network's doing: {err}"
        );
    }
    wait_count(&http, &p, 0, "garbage connections").await;
    assert_eq!(server.stats().answered, 0);
}
