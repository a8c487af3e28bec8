//! `upstream_pool::http` with the connector's operator features: `evict`/`evict_all` retiring
//! HTTP/2 connections, `PeerStats` counting HTTP/2 streams and the first `Alpn::H2H1`
//! request, HTTP/2 waits in the wait metrics and connect errors, and the per-key protocol
//! memory. Against the in-process servers of `tests/support/h2_server.rs`; every case asserts
//! on what the server observed (connections accepted, closed, requests per connection).

mod http_support;
mod support;

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use upstream_pool::http::{HttpConnector, UpstreamInfo};
use upstream_pool::{Alpn, Error, ErrorKind, Peer};

use http_support::{get, http_with, peer, STEP};
use support::certs::TestPki;
use support::h2_server::HttpServer;

fn slow_get(delay_ms: u64) -> http::Request<Empty<Bytes>> {
    http::Request::get("/slow")
        .header("x-delay-ms", delay_ms)
        .body(Empty::new())
        .unwrap()
}

/// What a test keeps of one exchange.
#[derive(Debug)]
struct Got {
    conn_id: usize,
    reused: bool,
    resumed: bool,
    version: http::Version,
}

/// Sends `req` and reads the whole body, bounded by [`STEP`].
async fn send(
    http: &HttpConnector,
    peer: &Peer,
    req: http::Request<Empty<Bytes>>,
) -> Result<Got, Error> {
    tokio::time::timeout(STEP, async {
        let resp = http.send(peer, req).await?;
        let (parts, body) = resp.into_parts();
        let info = parts.extensions.get::<UpstreamInfo>().unwrap().clone();
        body.collect().await?;
        Ok(Got {
            conn_id: parts.headers["x-conn-id"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap(),
            reused: info.reused,
            resumed: info.digest.as_ref().is_some_and(|d| d.session_reused),
            version: info.version,
        })
    })
    .await
    .expect("request timed out")
}

/// `evict` retires the key's HTTP/2 connection: a stream in flight finishes on it, no new
/// stream goes to it, the server sees it closed after that stream, and the next request
/// dials a new connection with a full handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evict_retires_http2_connections() {
    let server = HttpServer::builder().start();
    let http = http_with(|_| {});
    let connector = http.connector().clone();
    let peer = peer(&server, Alpn::H2);

    let first = send(&http, &peer, get("/")).await.unwrap();
    assert_eq!((first.conn_id, first.resumed), (0, false));
    // A second connection would resume the session the first one cached.
    let slow = {
        let (http, peer) = (http.clone(), peer.clone());
        tokio::spawn(async move { send(&http, &peer, slow_get(600)).await })
    };
    server.wait_for(|s| s.in_flight() == 1).await;

    // The connection carries a stream: retired, not closed at once.
    assert_eq!(connector.evict(&peer), 0);
    let next = send(&http, &peer, get("/")).await.unwrap();
    assert_eq!(
        next.conn_id, 1,
        "a request after evict went to the retired connection"
    );
    assert!(!next.reused);
    assert!(!next.resumed, "the evicted key's TLS session was resumed");

    // The stream in flight finishes undisturbed on the retired connection...
    let slow = slow.await.unwrap().unwrap();
    assert_eq!(slow.conn_id, 0);
    // ...which then closes: the server sees it.
    let stats = server
        .wait_for(|s| s.conns.len() == 2 && s.conns[0].closed)
        .await;
    assert!(!stats.conns[1].closed);
    assert_eq!(stats.conns[0].requests, 2);
    assert_eq!(stats.accepted, 2);

    let s = connector.stats_for(&peer);
    assert_eq!(s.evicted, 1, "{s:?}");
    assert_eq!((s.handshakes_full, s.handshakes_resumed), (2, 0), "{s:?}");

    // An HTTP/2 connection without streams closes at the call, and counts as closed.
    assert_eq!(connector.evict_all(), 1);
    server.wait_for(|s| s.conns.iter().all(|c| c.closed)).await;
    let after = send(&http, &peer, get("/")).await.unwrap();
    assert_eq!((after.conn_id, after.resumed), (2, false));
    assert_eq!(connector.stats_for(&peer).evicted, 2);
}

/// `PeerStats` counts HTTP/2 requests as the checkout metric does: the connection's first
/// stream is its dial's `new` checkout, each later stream a `reused` one; the live connection
/// is one connection in use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_count_http2_streams_as_checkouts() {
    let server = HttpServer::builder().start();
    let http = http_with(|_| {});
    let peer = peer(&server, Alpn::H2);
    for i in 0..5 {
        let g = send(&http, &peer, get("/")).await.unwrap();
        assert_eq!((g.conn_id, g.reused), (0, i > 0));
    }
    let stats = server.stats();
    assert_eq!((stats.accepted, stats.requests()), (1, 5));
    let s = http.connector().stats_for(&peer);
    assert_eq!((s.checkouts_new, s.checkouts_reused), (1, 4), "{s:?}");
    assert_eq!((s.in_use, s.idle, s.connecting), (1, 0, 0), "{s:?}");
}

/// The first `Alpn::H2H1` request to a server that selects HTTP/1.1 is one `new` checkout on
/// the connection its dial made (not `new` + `reused`), and later requests reuse that
/// connection from the pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_h2h1_request_that_finds_http1_is_one_checkout() {
    let server = HttpServer::builder().h1_only().start();
    let http = http_with(|_| {});
    let peer = peer(&server, Alpn::H2H1);

    let first = send(&http, &peer, get("/")).await.unwrap();
    assert_eq!(first.version, http::Version::HTTP_11);
    assert_eq!((first.conn_id, first.reused), (0, false));
    let s = http.connector().stats_for(&peer);
    assert_eq!((s.checkouts_new, s.checkouts_reused), (1, 0), "{s:?}");

    let second = send(&http, &peer, get("/")).await.unwrap();
    assert_eq!((second.conn_id, second.reused), (0, true));
    let stats = server.stats();
    assert_eq!((stats.accepted, stats.requests()), (1, 2));
    let s = http.connector().stats_for(&peer);
    assert_eq!((s.checkouts_new, s.checkouts_reused), (1, 1), "{s:?}");
    assert_eq!((s.idle, s.in_use), (1, 0), "{s:?}");
}

/// An HTTP/2 request that waits at `max_connections_per_peer` for a stream and gives up with
/// `PoolTimedout` is counted as `get`'s are: `upstream_connect_errors_total{kind=
/// "pool_timedout"}` and a sample of `upstream_pool_wait_duration_seconds`.
#[test]
fn http2_pool_timeouts_are_counted_and_their_waits_recorded() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let stats = metrics::with_local_recorder(&recorder, || {
        runtime.block_on(async {
            let server = HttpServer::builder().max_concurrent_streams(1).start();
            let http = http_with(|o| {
                o.max_connections_per_peer = Some(1);
                o.wait_timeout = Duration::from_millis(100);
            });
            let peer = peer(&server, Alpn::H2);
            let slow = {
                let (http, peer) = (http.clone(), peer.clone());
                tokio::spawn(async move { send(&http, &peer, slow_get(800)).await })
            };
            server.wait_for(|s| s.in_flight() == 1).await;
            let err = send(&http, &peer, get("/")).await.unwrap_err();
            assert_eq!(err.kind(), ErrorKind::PoolTimedout, "{err:?}");
            slow.await.unwrap().unwrap();
            let stats = server.stats();
            // The second request never reached the server, nor made it dial.
            assert_eq!((stats.accepted, stats.requests()), (1, 1));
            let s = http.connector().stats_for(&peer);
            assert_eq!(s.connect_errors, 0, "a wait is not a failed dial: {s:?}");
            stats
        })
    });
    assert_eq!(stats.accepted, 1);
    let snapshot = snapshotter.snapshot().into_vec();
    let timedout: u64 = snapshot
        .iter()
        .filter(|(k, ..)| {
            k.key().name() == upstream_pool::metrics::CONNECT_ERRORS_TOTAL
                && k.key()
                    .labels()
                    .any(|l| l.key() == "kind" && l.value() == "pool_timedout")
        })
        .map(|(.., v)| match v {
            DebugValue::Counter(c) => *c,
            _ => 0,
        })
        .sum();
    assert_eq!(timedout, 1, "connect_errors_total{{kind=pool_timedout}}");
    let waits: Vec<f64> = snapshot
        .iter()
        .filter(|(k, ..)| k.key().name() == upstream_pool::metrics::WAIT_DURATION)
        .flat_map(|(.., v)| match v {
            DebugValue::Histogram(samples) => samples.iter().map(|s| s.0).collect(),
            _ => Vec::new(),
        })
        .collect();
    assert_eq!(waits.len(), 1, "wait samples: {waits:?}");
    assert!(
        (0.09..2.0).contains(&waits[0]),
        "waited {}s for a 100 ms wait_timeout",
        waits[0]
    );
}

/// `HttpConnector::preconnect` dials HTTP/2 connections into the shared registry (the pool's
/// idle byte streams would never carry HTTP/2): requests then use them without dialling, and
/// a second call dials nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_preconnect_warms_http2_connections() {
    let server = HttpServer::builder().start();
    let http = http_with(|_| {});
    let peer = peer(&server, Alpn::H2);
    assert_eq!(http.preconnect(&peer, 2).await.unwrap(), 2);
    server.wait_for(|s| s.accepted == 2).await;
    assert_eq!(http.preconnect(&peer, 2).await.unwrap(), 2);
    // Concurrent requests find ready connections: none dials a third.
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let (http, peer) = (http.clone(), peer.clone());
            tokio::spawn(async move { send(&http, &peer, get("/")).await })
        })
        .collect();
    for t in tasks {
        let g = t.await.unwrap().unwrap();
        assert!(g.conn_id < 2, "{g:?}");
        assert_eq!(g.version, http::Version::HTTP_2);
    }
    let stats = server.stats();
    assert_eq!((stats.accepted, stats.requests()), (2, 4));
    // The pool holds no idle byte stream the HTTP/2 layer would never use.
    let s = http.connector().stats_for(&peer);
    assert_eq!((s.idle, s.in_use), (0, 2), "{s:?}");

    // An HTTP/1.1 server behind `Alpn::H2H1`: learnt, then the pool is warmed.
    let h1 = HttpServer::builder().h1_only().start();
    let h1_peer = Peer::tls(h1.addr(), "localhost")
        .with_ca(TestPki::shared().ca_a())
        .with_alpn(Alpn::H2H1);
    assert_eq!(http.preconnect(&h1_peer, 2).await.unwrap(), 2);
    h1.wait_for(|s| s.accepted == 2).await;
    let g = send(&http, &h1_peer, get("/")).await.unwrap();
    assert_eq!((g.version, g.reused), (http::Version::HTTP_11, true));
    assert_eq!(h1.stats().accepted, 2);
}
