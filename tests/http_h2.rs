//! `upstream_pool::http` over HTTP/2 against an in-process `h2` server
//! (`tests/support/h2_server.rs`): shared connections, the stream limit (ours and the
//! server's), `max_connections_per_peer` counting connections, GOAWAY without failed
//! requests, bodies both ways, and protocol selection by ALPN. Every case asserts on what the
//! server observed (connections, streams in flight, requests per connection).

mod http_support;
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::channel::Channel;
use http_body_util::{BodyExt, Empty};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use tokio::sync::Barrier;
use upstream_pool::http::{HttpConnector, UpstreamInfo};
use upstream_pool::{Alpn, Error, ErrorKind, Peer};

use http_support::{get, http_with, peer, STEP};
use support::h2_server::{pattern, sha256_hex, HttpServer, Proto};
use support::wait_until;

/// What a test keeps of a response: head, whole body, and the [`UpstreamInfo`] fields.
#[derive(Debug)]
struct Got {
    parts: http::response::Parts,
    body: Bytes,
    reused: bool,
    retried: bool,
}

impl Got {
    fn header(&self, name: &str) -> &str {
        self.parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_else(|| panic!("no {name} header in {:?}", self.parts))
    }

    fn conn_id(&self) -> usize {
        self.header("x-conn-id").parse().unwrap()
    }
}

/// Sends `req` and reads the whole body, bounded by [`STEP`].
async fn send<B>(http: &HttpConnector, peer: &Peer, req: http::Request<B>) -> Result<Got, Error>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    tokio::time::timeout(STEP, async {
        let resp = http.send(peer, req).await?;
        let (parts, body) = resp.into_parts();
        let info = parts
            .extensions
            .get::<UpstreamInfo>()
            .expect("response without UpstreamInfo");
        let (reused, retried, version) = (info.reused, info.retried, info.version);
        assert_eq!(version, parts.version, "UpstreamInfo::version vs response");
        let body = body.collect().await?.to_bytes();
        Ok(Got {
            parts,
            body,
            reused,
            retried,
        })
    })
    .await
    .expect("request timed out")
}

/// Runs `n` copies of `GET path` at once (released together by a barrier) and returns the
/// results in task order.
async fn concurrent(
    http: &HttpConnector,
    peer: &Peer,
    n: usize,
    path: &'static str,
) -> Vec<Result<Got, Error>> {
    let barrier = Arc::new(Barrier::new(n));
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (http, peer, barrier) = (http.clone(), peer.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                send(&http, &peer, get(path)).await
            })
        })
        .collect();
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await.expect("request task panicked"));
    }
    out
}

fn all_ok(results: Vec<Result<Got, Error>>) -> Vec<Got> {
    let failed: Vec<String> = results
        .iter()
        .filter_map(|r| r.as_ref().err())
        .map(|e| format!("{:?}: {e}", e.kind()))
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {failed:?}",
        failed.len(),
        results.len()
    );
    results.into_iter().map(Result::unwrap).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_first_requests_share_one_connection() {
    let server = HttpServer::builder()
        .delay(Duration::from_millis(50))
        .start();
    let http = http_with(|_| {});
    let peer = peer(&server, Alpn::H2);

    let started = Instant::now();
    let got = all_ok(concurrent(&http, &peer, 50, "/").await);
    let elapsed = started.elapsed();
    for g in &got {
        assert_eq!(g.parts.status, 200);
        assert_eq!(g.parts.version, http::Version::HTTP_2);
        assert_eq!(g.header("x-proto"), "h2");
        assert_eq!(
            g.header("x-authority"),
            "localhost",
            "authority from the SNI"
        );
        assert_eq!(g.conn_id(), 0);
        assert_eq!(
            g.body,
            format!("conn=0 req={}\n", g.header("x-req-n")).as_bytes()
        );
    }
    let stats = server.wait_for(|s| s.answered == 50).await;
    assert_eq!(
        stats.accepted, 1,
        "concurrent first requests dialled more than once: {stats:#?}"
    );
    assert!(
        stats.max_in_flight() > 1,
        "requests were serialised: {stats:#?}"
    );
    // Serial would take 50 × 50 ms.
    assert!(
        elapsed < Duration::from_millis(1250),
        "50 requests took {elapsed:?}"
    );
    assert_eq!(http.connector().connection_count_for(&peer), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_stream_limit_spreads_slow_requests_over_more_connections() {
    let delay = Duration::from_millis(100);
    let server = HttpServer::builder()
        .max_concurrent_streams(4)
        .delay(delay)
        .start();
    let http = http_with(|_| {});
    let peer = peer(&server, Alpn::H2);

    let started = Instant::now();
    let got = all_ok(concurrent(&http, &peer, 40, "/").await);
    let elapsed = started.elapsed();
    assert!(got.iter().all(|g| g.parts.version == http::Version::HTTP_2));
    let stats = server.wait_for(|s| s.answered == 40).await;
    assert!(
        stats.max_in_flight() <= 4,
        "more than SETTINGS_MAX_CONCURRENT_STREAMS=4 streams on one connection: {stats:#?}"
    );
    assert!(
        (10..=14).contains(&stats.accepted),
        "expected about 40 / 4 = 10 connections, server saw {}: {stats:#?}",
        stats.accepted
    );
    // Serial: 4 s. Ten connections of four streams: one delay plus the handshakes.
    assert!(
        elapsed < 10 * delay,
        "40 requests took {elapsed:?} (serial would be {:?})",
        40 * delay
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_h2_streams_below_the_server_limit_is_honoured() {
    let server = HttpServer::builder()
        .max_concurrent_streams(100)
        .delay(Duration::from_millis(80))
        .start();
    let http = http_with(|o| o.max_h2_streams = 3);
    let peer = peer(&server, Alpn::H2);

    all_ok(concurrent(&http, &peer, 12, "/").await);
    let stats = server.wait_for(|s| s.answered == 12).await;
    assert!(
        stats.max_in_flight() <= 3,
        "max_h2_streams = 3 not honoured: {stats:#?}"
    );
    assert!(
        (4..=6).contains(&stats.accepted),
        "expected about 12 / 3 = 4 connections, server saw {}: {stats:#?}",
        stats.accepted
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_per_peer_counts_connections() {
    let server = HttpServer::builder()
        .max_concurrent_streams(4)
        .delay(Duration::from_millis(50))
        .start();
    let http = http_with(|o| {
        o.max_connections_per_peer = Some(2);
        o.wait_timeout = Duration::from_secs(4);
    });
    let peer = peer(&server, Alpn::H2);

    all_ok(concurrent(&http, &peer, 40, "/").await);
    let stats = server.wait_for(|s| s.answered == 40).await;
    assert!(
        stats.accepted <= 2,
        "max_connections_per_peer = 2 but the server saw {} connections: {stats:#?}",
        stats.accepted
    );
    assert!(stats.max_in_flight() <= 4, "{stats:#?}");
    assert!(http.connector().connection_count_for(&peer) <= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_connection_cap_a_full_connection_times_out_the_wait() {
    let server = HttpServer::builder().max_concurrent_streams(1).start();
    let wait = Duration::from_millis(100);
    let http = http_with(|o| {
        o.max_connections_per_peer = Some(1);
        o.wait_timeout = wait;
    });
    let peer = peer(&server, Alpn::H2);

    // Learn the server's limit of one stream, then hold that stream open.
    send(&http, &peer, get("/")).await.unwrap();
    let held = tokio::time::timeout(STEP, http.send(&peer, get("/stall")))
        .await
        .unwrap()
        .unwrap();
    server.wait_for(|s| s.in_flight() == 1).await;

    let started = Instant::now();
    let err = send(&http, &peer, get("/"))
        .await
        .expect_err("a second stream at the connection cap and stream limit succeeded");
    let waited = started.elapsed();
    assert_eq!(err.kind(), ErrorKind::PoolTimedout, "{err}");
    assert!(
        waited >= wait && waited < wait + Duration::from_millis(900),
        "failed after {waited:?}, wait_timeout {wait:?}"
    );
    let stats = server.stats();
    assert_eq!(stats.accepted, 1, "{stats:#?}");
    assert_eq!(
        stats.requests(),
        2,
        "the timed-out request reached the server"
    );

    // The stream is freed by dropping the held response; the next request uses it.
    drop(held);
    server.wait_for(|s| s.in_flight() == 0).await;
    let g = send(&http, &peer, get("/")).await.unwrap();
    assert_eq!(g.conn_id(), 0);
    assert!(g.reused);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn goaway_every_seven_requests_fails_no_sequential_request() {
    let server = HttpServer::builder().goaway_after(7).start();
    let http = http_with(|_| {});
    let peer = peer(&server, Alpn::H2);

    let mut failed = Vec::new();
    for i in 0..60 {
        match send(&http, &peer, get("/")).await {
            Ok(g) => assert_eq!(
                g.body,
                format!("conn={} req={}\n", g.conn_id(), g.header("x-req-n")).as_bytes()
            ),
            Err(e) => failed.push(format!("request {i}: {:?}: {e}", e.kind())),
        }
    }
    assert!(
        failed.is_empty(),
        "requests failed across GOAWAY: {failed:?}"
    );
    // The server counts an answer once its last frame is queued, which can trail the client.
    let stats = server.wait_for(|s| s.answered == 60).await;
    assert!(
        stats.accepted >= 6,
        "GOAWAY after 7 requests, yet 60 requests used only {} connections",
        stats.accepted
    );
    assert!(stats.conns.iter().filter(|c| c.goaway_sent).count() >= 5);
    // Drained connections leave the pool once their streams end: at most the newest, not
    // yet rotated, connection stays.
    let left = wait_until(STEP, || http.connector().connection_count_for(&peer) <= 1).await;
    assert!(
        left,
        "drained connections still counted: {}",
        http.connector().connection_count_for(&peer)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn goaway_every_five_requests_fails_no_concurrent_request() {
    let server = HttpServer::builder()
        .goaway_after(5)
        .delay(Duration::from_millis(5))
        .start();
    let http = http_with(|_| {});
    let peer = peer(&server, Alpn::H2);

    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let (http, peer) = (http.clone(), peer.clone());
            tokio::spawn(async move {
                let mut results = Vec::new();
                for _ in 0..5 {
                    results.push(send(&http, &peer, get("/")).await);
                }
                results
            })
        })
        .collect();
    let mut results = Vec::new();
    for t in tasks {
        results.extend(t.await.unwrap());
    }
    assert_eq!(results.len(), 100);
    all_ok(results);
    let stats = server.wait_for(|s| s.answered == 100).await;
    assert!(
        stats.accepted >= 5,
        "GOAWAY after 5 requests, yet 100 requests used only {} connections",
        stats.accepted
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_request_body_and_large_response_body_arrive_intact() {
    let server = HttpServer::builder().start();
    let http = http_with(|_| {});
    let peer = peer(&server, Alpn::H2);

    // Request body from a channel, unknown length, written while the request is in flight.
    let (mut tx, body) = Channel::<Bytes, std::convert::Infallible>::new(4);
    let upload = pattern(300_000);
    let writer = {
        let upload = upload.clone();
        tokio::spawn(async move {
            for piece in upload.chunks(7_000) {
                tx.send_data(Bytes::copy_from_slice(piece)).await.unwrap();
                tokio::task::yield_now().await;
            }
        })
    };
    let req = http::Request::post("/upload").body(body).unwrap();
    let g = send(&http, &peer, req).await.unwrap();
    writer.await.unwrap();
    assert_eq!(g.parts.version, http::Version::HTTP_2);
    assert_eq!(g.header("x-req-body-len"), "300000");
    assert_eq!(g.header("x-req-body-sha256"), sha256_hex(&upload));

    // A 5 MiB response body, larger than any flow-control window.
    let size = 5 * 1024 * 1024;
    let req = http::Request::get("/big")
        .header("x-body-size", size)
        .body(Empty::<Bytes>::new())
        .unwrap();
    let g = send(&http, &peer, req).await.unwrap();
    assert_eq!(g.body.len(), size);
    assert!(g.body == pattern(size), "response body damaged");
    assert_eq!(g.conn_id(), 0);
    let stats = server.wait_for(|s| s.log.len() == 2).await;
    assert_eq!(stats.accepted, 1);
    assert_eq!(stats.log[0].body_len, 300_000);
}

#[test]
fn requests_on_an_existing_connection_are_reused() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    metrics::with_local_recorder(&recorder, || {
        runtime.block_on(async {
            let server = HttpServer::builder().start();
            let http = http_with(|_| {});
            let peer = peer(&server, Alpn::H2);
            for i in 0..5 {
                let g = send(&http, &peer, get("/")).await.unwrap();
                assert_eq!(g.conn_id(), 0);
                assert_eq!(g.header("x-req-n"), (i + 1).to_string());
                assert_eq!(g.reused, i > 0, "UpstreamInfo::reused on request {i}");
                assert!(!g.retried);
            }
            assert_eq!(server.stats().accepted, 1);
        })
    });
    let counter = |outcome: &str| -> u64 {
        snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .filter(|(k, ..)| {
                k.key().name() == upstream_pool::metrics::CHECKOUTS_TOTAL
                    && k.key()
                        .labels()
                        .any(|l| l.key() == "outcome" && l.value() == outcome)
            })
            .map(|(.., v)| match v {
                DebugValue::Counter(c) => c,
                _ => 0,
            })
            .sum()
    };
    assert_eq!(counter("new"), 1, "checkouts_total{{outcome=new}}");
    assert_eq!(counter("reused"), 4, "checkouts_total{{outcome=reused}}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_selects_the_protocol() {
    // Alpn::H2H1 against a server preferring h2: HTTP/2.
    let h2_server = HttpServer::builder().h2_then_h1().start();
    let http = http_with(|_| {});
    let p = peer(&h2_server, Alpn::H2H1);
    for _ in 0..2 {
        let g = send(&http, &p, get("/")).await.unwrap();
        assert_eq!(g.parts.version, http::Version::HTTP_2);
        assert_eq!(g.header("x-proto"), "h2");
    }
    // Alpn::H1 against the same server: HTTP/1.1.
    let p = peer(&h2_server, Alpn::H1);
    let g = send(&http, &p, get("/")).await.unwrap();
    assert_eq!(g.parts.version, http::Version::HTTP_11);
    assert_eq!(g.header("x-proto"), "http/1.1");
    let stats = h2_server.stats();
    assert_eq!(stats.accepted, 2, "{stats:#?}");
    assert_eq!(stats.conns[0].proto, Some(Proto::H2));
    assert_eq!(stats.conns[1].proto, Some(Proto::H1));

    // Alpn::H2H1 against an HTTP/1.1-only server: the server's choice, HTTP/1.1, also for
    // the requests after the first (the protocol is remembered per key).
    let h1_server = HttpServer::builder().h1_only().start();
    let p = peer(&h1_server, Alpn::H2H1);
    for n in 1..=3 {
        let g = send(&http, &p, get("/")).await.unwrap();
        assert_eq!(g.parts.version, http::Version::HTTP_11);
        assert_eq!(g.body, format!("conn=0 req={n}\n").as_bytes());
    }
    let stats = h1_server.stats();
    assert_eq!(stats.accepted, 1);
    assert_eq!(stats.conns[0].alpn.as_deref(), Some(&b"http/1.1"[..]));
}

/// A server that stops answering (PINGs included) without closing: the PING keepalive
/// notices, the connection leaves the pool, and the next request gets a fresh one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_keepalive_retires_a_connection_whose_server_hung() {
    let server = HttpServer::builder().h2_freeze_after(1).start();
    let http = http_with(|o| {
        o.h2_ping_interval = Some(Duration::from_millis(100));
        o.h2_ping_timeout = Duration::from_millis(200);
    });
    let peer = peer(&server, Alpn::H2);
    let g = send(&http, &peer, get("/")).await.unwrap();
    assert_eq!(g.conn_id(), 0);
    server.wait_for(|s| s.conns[0].frozen).await;
    let started = Instant::now();
    let gone = wait_until(Duration::from_secs(3), || {
        http.connector().connection_count_for(&peer) == 0
    })
    .await;
    assert!(
        gone,
        "a connection whose server stopped answering PINGs is still counted after {:?}",
        started.elapsed()
    );
    let g = send(&http, &peer, get("/")).await.unwrap();
    assert_eq!(g.conn_id(), 1);
    assert_eq!(server.stats().accepted, 2);
}

/// An HTTP/2 connection with no open stream closes after the peer's idle timeout; the
/// server sees it closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_h2_connection_closes_after_the_idle_timeout() {
    let server = HttpServer::builder().start();
    let http = http_with(|_| {});
    let peer = peer(&server, Alpn::H2).with_idle_timeout(Duration::from_millis(200));
    let started = Instant::now();
    send(&http, &peer, get("/")).await.unwrap();
    server.wait_for(|s| s.conns[0].closed).await;
    assert!(
        started.elapsed() >= Duration::from_millis(190),
        "closed before the idle timeout: {:?}",
        started.elapsed()
    );
    assert!(wait_until(STEP, || http.connector().connection_count_for(&peer) == 0).await);
    let g = send(&http, &peer, get("/")).await.unwrap();
    assert_eq!(g.conn_id(), 1);
}

/// The server drops the connection (bare FIN, no GOAWAY): it leaves the pool and the next
/// request goes on a fresh one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_the_server_dropped_is_retired_and_replaced() {
    let server = HttpServer::builder().start();
    let http = http_with(|_| {});
    let peer = peer(&server, Alpn::H2);
    send(&http, &peer, get("/")).await.unwrap();
    server.close_connections();
    let gone = wait_until(Duration::from_secs(2), || {
        http.connector().connection_count_for(&peer) == 0
    })
    .await;
    assert!(gone, "a closed HTTP/2 connection is still counted");
    for n in 1..=3 {
        let g = send(&http, &peer, get("/")).await.unwrap();
        assert_eq!((g.conn_id(), g.header("x-req-n")), (1, &*n.to_string()));
    }
    assert_eq!(server.stats().accepted, 2);
}

/// GOAWAY while streams are in flight: those streams finish on the draining connection,
/// and a request made after the GOAWAY arrived goes on a new connection, not the draining
/// one (h2's graceful shutdown still accepts streams until its second GOAWAY, so the server
/// would have served it on the old connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_connection_finishes_its_streams_and_takes_no_new_ones() {
    let server = HttpServer::builder()
        .goaway_after(3)
        .delay(Duration::from_millis(300))
        .start();
    let http = http_with(|_| {});
    let peer = peer(&server, Alpn::H2);
    let slow: Vec<_> = (0..3)
        .map(|_| {
            let (http, peer) = (http.clone(), peer.clone());
            tokio::spawn(async move { send(&http, &peer, get("/")).await })
        })
        .collect();
    server
        .wait_for(|s| s.conns.first().is_some_and(|c| c.goaway_sent))
        .await;
    // Let the GOAWAY reach the client.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let later = send(&http, &peer, get("/")).await.unwrap();
    assert_eq!(
        later.conn_id(),
        1,
        "a request after GOAWAY went on the draining connection"
    );
    for t in slow {
        let g = t
            .await
            .unwrap()
            .expect("a stream in flight at GOAWAY failed");
        assert_eq!(g.conn_id(), 0);
        assert!(!g.retried);
    }
    let stats = server.stats();
    assert_eq!(stats.conns[0].requests, 3, "{stats:#?}");
    assert_eq!(stats.accepted, 2);
}

/// The default `max_h2_streams` (100) applies when the server sets no limit: 150 concurrent
/// slow requests need a second connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_stream_cap_is_100_per_connection() {
    let server = HttpServer::builder()
        .delay(Duration::from_millis(200))
        .start();
    let http = http_with(|_| {});
    assert_eq!(http.connector().options().max_h2_streams, 100);
    let peer = peer(&server, Alpn::H2);
    all_ok(concurrent(&http, &peer, 150, "/").await);
    let stats = server.wait_for(|s| s.answered == 150).await;
    assert!(stats.max_in_flight() <= 100, "{stats:#?}");
    assert!(
        (2..=3).contains(&stats.accepted),
        "150 streams at 100 per connection: {stats:#?}"
    );
}

/// `Alpn::H2H1` to a server that picks HTTP/1.1: concurrent first requests (which wait for
/// one dial to learn the protocol) all fall back to HTTP/1.1 and succeed, each on its own
/// connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_requests_fall_back_to_http11_together() {
    let server = HttpServer::builder()
        .h1_only()
        .delay(Duration::from_millis(50))
        .start();
    let http = http_with(|_| {});
    let peer = peer(&server, Alpn::H2H1);
    let got = all_ok(concurrent(&http, &peer, 10, "/").await);
    for g in &got {
        assert_eq!(g.parts.version, http::Version::HTTP_11);
        assert_eq!(g.header("x-proto"), "http/1.1");
    }
    let mut conns: Vec<usize> = got.iter().map(Got::conn_id).collect();
    conns.sort_unstable();
    conns.dedup();
    assert_eq!(
        conns.len(),
        10,
        "two HTTP/1.1 exchanges shared a connection at once"
    );
    let stats = server.stats();
    assert_eq!(stats.accepted, 10, "{stats:#?}");
    assert!(stats.conns.iter().all(|c| c.proto == Some(Proto::H1)));
    // All ten are pooled after their bodies, and reused.
    assert!(wait_until(STEP, || http.connector().idle_count_for(&peer) == 10).await);
    let g = send(&http, &peer, get("/")).await.unwrap();
    assert!(g.reused);
}

/// Many large responses at once on one connection: flow control (per stream and for the
/// connection) is released as bodies are read, so all of them complete intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_large_bodies_on_one_connection_arrive_intact() {
    let server = HttpServer::builder().start();
    let http = http_with(|_| {});
    let peer = peer(&server, Alpn::H2);
    send(&http, &peer, get("/")).await.unwrap();
    let size = 512 * 1024;
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let (http, peer) = (http.clone(), peer.clone());
            tokio::spawn(async move {
                let req = http::Request::get("/big")
                    .header("x-body-size", size)
                    .body(Empty::<Bytes>::new())
                    .unwrap();
                send(&http, &peer, req).await
            })
        })
        .collect();
    let expected = pattern(size);
    for t in tasks {
        let g = t.await.unwrap().unwrap();
        assert_eq!(g.conn_id(), 0);
        assert!(g.body == expected, "a body was damaged");
    }
    assert_eq!(server.stats().accepted, 1);
}

/// A response whose body nobody reads must not stall the other streams of its connection
/// (a slow client of a proxy would otherwise block every request sharing the connection):
/// its unread data may not hold the connection's flow-control window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unread_body_does_not_block_other_streams() {
    let server = HttpServer::builder().start();
    let http = http_with(|_| {});
    let peer = peer(&server, Alpn::H2);
    let big = http::Request::get("/big")
        .header("x-body-size", 4 * 1024 * 1024)
        .body(Empty::<Bytes>::new())
        .unwrap();
    let held = tokio::time::timeout(STEP, http.send(&peer, big))
        .await
        .unwrap()
        .unwrap();
    for n in 0..3 {
        let req = http::Request::get("/big")
            .header("x-body-size", 256 * 1024)
            .body(Empty::<Bytes>::new())
            .unwrap();
        let g = send(&http, &peer, req)
            .await
            .unwrap_or_else(|e| panic!("request {n} behind an unread body failed: {e}"));
        assert_eq!(g.conn_id(), 0);
        assert_eq!(g.body.len(), 256 * 1024);
    }
    let body = tokio::time::timeout(STEP, held.into_body().collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    assert!(body == pattern(4 * 1024 * 1024), "held body damaged");
}

/// An absolute URI gives the `:authority` and an origin `:path`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authority_and_path_from_an_absolute_uri() {
    let server = HttpServer::builder().start();
    let http = http_with(|_| {});
    let peer = peer(&server, Alpn::H2);
    let g = send(&http, &peer, get("https://api.example:8443/x?y=1"))
        .await
        .unwrap();
    assert_eq!(g.header("x-authority"), "api.example:8443");
    let g = send(
        &http,
        &peer,
        http::Request::get("/z")
            .header("host", "other.example")
            .body(Empty::<Bytes>::new())
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(g.header("x-authority"), "other.example");
    let stats = server.wait_for(|s| s.log.len() == 2).await;
    let paths: Vec<&str> = stats.log.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(paths, ["/x?y=1", "/z"]);
}
