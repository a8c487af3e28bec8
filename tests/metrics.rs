//! Metrics and tracing (issue 5): every metric of DESIGN.md's table counts exactly the events
//! it describes, with the labels it promises, against real OpenSSL servers.
//!
//! Each test installs its own `metrics-util` `DebuggingRecorder` with
//! `metrics::with_local_recorder` (thread-local, so parallel tests do not see each other's
//! metrics) around a current-thread tokio runtime built in the test: every task the connector
//! spawns (dials, the reaper) runs on that thread, inside the closure. The connector is
//! created inside the closure too, because it resolves its metric handles per pool key.
//! Tracing is captured the same way, with a small thread-local subscriber ([`Capture`]).

mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use metrics_util::{CompositeKey, MetricKind};
use openssl::ssl::SslVersion;
use upstream_pool::http::HttpConnector;
use upstream_pool::metrics::{
    ACTIVE_CONNECTIONS, ALL_METRICS, CHECKOUTS_TOTAL, CONNECT_ERRORS_TOTAL, EVICTIONS_TOTAL,
    H2_CONNECTIONS, H2_GOAWAY_TOTAL, H2_STREAMS_ACTIVE, HTTP_REQUESTS_PER_CONNECTION,
    IDLE_CONNECTIONS, TCP_CONNECT_DURATION, TLS_HANDSHAKES_TOTAL, TLS_HANDSHAKE_DURATION,
    WAIT_DURATION,
};
use upstream_pool::{Alpn, Connection, Connector, ConnectorOptions, ErrorKind, Peer};

use support::certs::TestPki;
use support::client::http_get;
use support::h2_server::HttpServer;
use support::server::{AlpnPolicy, Behaviour, TestServer};

fn pki() -> &'static TestPki {
    TestPki::shared()
}

/// Runs `test` on a fresh current-thread runtime with `recorder` installed for this thread.
fn with_recorder<F: Future>(recorder: &DebuggingRecorder, test: impl FnOnce() -> F) -> F::Output {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    metrics::with_local_recorder(recorder, || runtime.block_on(test()))
}

async fn exchange(conn: &mut Connection) {
    let response = http_get(conn, "localhost").await.unwrap();
    assert_eq!(response.status, 200);
}

// ---------------------------------------------------------------------------------------
// Reading the debugging recorder.
// ---------------------------------------------------------------------------------------

type Labels = BTreeMap<String, String>;

/// Accumulates snapshots: the debugging recorder drains histograms on every snapshot, so
/// samples are kept here across snapshots; counters and gauges are the latest values.
struct Recorded {
    snapshotter: Snapshotter,
    histograms: HashMap<CompositeKey, Vec<f64>>,
    latest: Vec<(CompositeKey, DebugValue)>,
}

impl Recorded {
    fn new(recorder: &DebuggingRecorder) -> Recorded {
        Recorded {
            snapshotter: recorder.snapshotter(),
            histograms: HashMap::new(),
            latest: Vec::new(),
        }
    }

    fn refresh(&mut self) -> &Self {
        self.latest.clear();
        for (key, _, _, value) in self.snapshotter.snapshot().into_vec() {
            if let DebugValue::Histogram(samples) = &value {
                self.histograms
                    .entry(key.clone())
                    .or_default()
                    .extend(samples.iter().map(|s| s.into_inner()));
            }
            self.latest.push((key, value));
        }
        self
    }

    /// Every series of `name`: its labels, kind and value (histograms: all samples so far).
    fn series(&self, name: &str) -> Vec<(Labels, MetricKind, Value)> {
        self.latest
            .iter()
            .filter(|(key, _)| key.key().name() == name)
            .map(|(key, value)| {
                let labels = key
                    .key()
                    .labels()
                    .map(|l| (l.key().to_string(), l.value().to_string()))
                    .collect();
                let value = match value {
                    DebugValue::Counter(n) => Value::Counter(*n),
                    DebugValue::Gauge(g) => Value::Gauge(g.into_inner()),
                    DebugValue::Histogram(_) => {
                        Value::Histogram(self.histograms.get(key).cloned().unwrap_or_default())
                    }
                };
                (labels, key.kind(), value)
            })
            .collect()
    }

    /// The one series of `name` with exactly `labels`.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Value {
        let want: Labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let all = self.series(name);
        let found: Vec<_> = all.iter().filter(|(l, _, _)| *l == want).collect();
        match found.as_slice() {
            [(_, _, value)] => value.clone(),
            _ => panic!("{name} with labels {want:?}: found {found:?}; all series: {all:#?}"),
        }
    }

    fn counter(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        match self.get(name, labels) {
            Value::Counter(n) => n,
            other => panic!("{name} is not a counter: {other:?}"),
        }
    }

    fn gauge(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        match self.get(name, labels) {
            Value::Gauge(g) => g,
            other => panic!("{name} is not a gauge: {other:?}"),
        }
    }

    fn histogram(&self, name: &str, labels: &[(&str, &str)]) -> Vec<f64> {
        match self.get(name, labels) {
            Value::Histogram(h) => h,
            other => panic!("{name} is not a histogram: {other:?}"),
        }
    }

    /// Names of everything registered so far.
    fn names(&self) -> BTreeSet<String> {
        self.latest
            .iter()
            .map(|(key, _)| key.key().name().to_string())
            .collect()
    }

    /// Sum of a counter over all its series.
    fn counter_total(&self, name: &str) -> u64 {
        self.series(name)
            .into_iter()
            .map(|(_, _, v)| match v {
                Value::Counter(n) => n,
                other => panic!("{name} is not a counter: {other:?}"),
            })
            .sum()
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Value {
    Counter(u64),
    Gauge(f64),
    Histogram(Vec<f64>),
}

fn assert_samples(what: &str, samples: &[f64], count: usize, below: f64) {
    assert_eq!(samples.len(), count, "{what}: samples {samples:?}");
    for s in samples {
        assert!(
            *s > 0.0 && *s < below,
            "{what}: implausible sample {s} (limit {below})"
        );
    }
}

// ---------------------------------------------------------------------------------------
// The scenario: a full handshake, a reuse, a resumed handshake, a wait at the cap, an
// InvalidCert failure, an idle-timeout, a stray-data and an upstream-close eviction.
// ---------------------------------------------------------------------------------------

/// What the scenario did, as the client and the servers saw it.
struct Facts {
    version: String,
    cipher: String,
    /// `peer` label values, when the label is on: main peer, InvalidCert peer.
    main_label: String,
    bad_label: String,
}

const WAIT_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs the scenario with a fresh connector (`peer_label` sets `metrics_peer_label`) and
/// returns what happened. Every step asserts what the servers saw, so the metric counts
/// checked by the callers are the true event counts.
async fn scenario(peer_label: bool, recorded: &mut Recorded) -> Facts {
    let tls13 = || {
        TestServer::builder()
            .version(SslVersion::TLS1_3)
            .alpn(AlpnPolicy::h2_then_h1())
    };
    let main = tls13().start();
    let stray = tls13().behaviour(Behaviour::HttpThenStray).start();
    let closing = tls13()
        .behaviour(Behaviour::CloseAfter(Duration::from_millis(100)))
        .start();

    let mut options = ConnectorOptions::default();
    options.max_connections_per_peer = Some(2);
    options.wait_timeout = WAIT_TIMEOUT;
    options.reap_interval = Duration::from_millis(20);
    options.metrics_peer_label = peer_label;
    let connector = Connector::new(options).unwrap();

    let peer = Peer::tls(main.addr(), "localhost")
        .with_ca(pki().ca_a())
        .with_alpn(Alpn::H1)
        .with_name("backend-a");
    let bad = Peer::tls(main.addr(), "localhost")
        .with_ca(pki().ca_b())
        .with_alpn(Alpn::H1);
    let idle = peer
        .clone()
        .with_group("idle")
        .with_idle_timeout(Duration::from_millis(100));
    let to_stray = Peer::tls(stray.addr(), "localhost")
        .with_ca(pki().ca_a())
        .with_alpn(Alpn::H1)
        .with_name("stray");
    let to_closing = Peer::tls(closing.addr(), "localhost")
        .with_ca(pki().ca_a())
        .with_alpn(Alpn::H1)
        .with_name("closing");

    // 1. A full handshake.
    let mut c1 = connector.get(&peer).await.unwrap();
    assert!(!c1.reused());
    exchange(&mut c1).await;
    let digest = c1.digest().unwrap().clone();
    assert!(!digest.session_reused);
    assert_eq!(digest.alpn.as_deref(), Some(&b"http/1.1"[..]));
    connector.release(c1);
    let r = recorded.refresh();
    assert_eq!(
        r.gauge(IDLE_CONNECTIONS, &label(peer_label, "backend-a")),
        1.0
    );
    assert_eq!(
        r.gauge(ACTIVE_CONNECTIONS, &label(peer_label, "backend-a")),
        0.0
    );

    // 2. A reuse.
    let mut c1 = connector.get(&peer).await.unwrap();
    assert!(c1.reused());
    exchange(&mut c1).await;

    // 3. A resumed handshake (c1 is checked out, so this dials).
    let mut c2 = connector.get(&peer).await.unwrap();
    assert!(!c2.reused());
    exchange(&mut c2).await;
    assert!(c2.digest().unwrap().session_reused);
    let r = recorded.refresh();
    assert_eq!(
        r.gauge(IDLE_CONNECTIONS, &label(peer_label, "backend-a")),
        0.0
    );
    assert_eq!(
        r.gauge(ACTIVE_CONNECTIONS, &label(peer_label, "backend-a")),
        2.0
    );

    // 4. A wait at the cap (2): the waiter gets c1 when it is released.
    let waiter = tokio::spawn({
        let (connector, peer) = (connector.clone(), peer.clone());
        async move {
            let mut conn = connector.get(&peer).await.unwrap();
            assert!(
                conn.reused(),
                "the waiter should get the released connection"
            );
            exchange(&mut conn).await;
            connector.release(conn);
        }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    connector.release(c1);
    waiter.await.unwrap();
    connector.release(c2);
    let stats = main.wait_for(|s| s.handshakes == 2).await;
    assert_eq!((stats.accepted, stats.resumed), (2, 1));

    // 5. InvalidCert: root B does not sign the main server's certificate.
    let err = connector.get(&bad).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidCert);
    main.wait_for(|s| s.accepted == 3 && s.handshake_failures == 1)
        .await;

    // 6. An idle-timeout eviction (its own key: a full handshake, no session).
    let mut c3 = connector.get(&idle).await.unwrap();
    exchange(&mut c3).await;
    assert!(!c3.digest().unwrap().session_reused);
    connector.release(c3);
    assert!(
        support::wait_until(Duration::from_secs(5), || connector
            .connection_count_for(&idle)
            == 0)
        .await
    );

    // 7. A stray-data eviction.
    let mut c4 = connector.get(&to_stray).await.unwrap();
    exchange(&mut c4).await;
    connector.release(c4);
    assert!(
        support::wait_until(Duration::from_secs(5), || connector
            .connection_count_for(&to_stray)
            == 0)
        .await
    );

    // 8. The upstream closes an idle connection.
    let mut c5 = connector.get(&to_closing).await.unwrap();
    exchange(&mut c5).await;
    connector.release(c5);
    assert!(
        support::wait_until(Duration::from_secs(5), || connector
            .connection_count_for(&to_closing)
            == 0)
        .await
    );

    let stats = main.wait_for(|s| s.handshakes == 3).await;
    assert_eq!((stats.accepted, stats.resumed), (4, 1), "{stats:#?}");
    assert_eq!(
        stats.conns[0].version.as_deref(),
        Some(digest.version.as_str())
    );
    assert_eq!(
        stats.conns[0].cipher.as_deref(),
        Some(digest.cipher.as_str())
    );
    for server in [&stray, &closing] {
        let stats = server.wait_for(|s| s.handshakes == 1).await;
        assert_eq!((stats.accepted, stats.resumed), (1, 0));
    }
    assert_eq!(connector.idle_count(), 2);

    // Close everything: dropping the connector closes the idle connections.
    drop(connector);
    main.wait_for(|s| s.open == 0).await;

    Facts {
        version: digest.version.clone(),
        cipher: digest.cipher.clone(),
        main_label: "backend-a".to_string(),
        bad_label: bad.name(),
    }
}

/// `[("peer", name)]` when the peer label is on, else nothing.
fn label(on: bool, name: &str) -> Vec<(&'static str, &str)> {
    if on {
        vec![("peer", name)]
    } else {
        Vec::new()
    }
}

fn with(
    base: &[(&'static str, &str)],
    extra: &[(&'static str, &'static str)],
) -> Vec<(&'static str, String)> {
    base.iter()
        .map(|(k, v)| (*k, v.to_string()))
        .chain(extra.iter().map(|(k, v)| (*k, v.to_string())))
        .collect()
}

fn refs<'a>(labels: &'a [(&'static str, String)]) -> Vec<(&'a str, &'a str)> {
    labels.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

#[test]
fn every_metric_counts_exactly_the_events_it_describes() {
    let recorder = DebuggingRecorder::new();
    let mut recorded = Recorded::new(&recorder);
    let facts = with_recorder(&recorder, || scenario(false, &mut recorded));
    let r = recorded.refresh();

    // Nothing carries a peer label unless asked to.
    for name in ALL_METRICS {
        for (labels, _, _) in r.series(name) {
            assert!(!labels.contains_key("peer"), "{name} {labels:?}");
        }
    }

    // Checkouts: 5 dials (main full, main resumed, idle, stray, closing); 2 reuses (the
    // plain reuse and the handoff to the waiter).
    assert_eq!(r.counter(CHECKOUTS_TOTAL, &[("outcome", "new")]), 5);
    assert_eq!(r.counter(CHECKOUTS_TOTAL, &[("outcome", "reused")]), 2);
    assert_eq!(r.series(CHECKOUTS_TOTAL).len(), 2);

    // TCP connect: every dial whose TCP connect succeeded, the InvalidCert one included.
    assert_samples(
        "tcp connect",
        &r.histogram(TCP_CONNECT_DURATION, &[]),
        6,
        5.0,
    );

    // Handshake durations by resumed: 4 full (main, idle, stray, closing), 1 resumed; the
    // failed handshake is not a handshake duration.
    assert_samples(
        "full handshake",
        &r.histogram(TLS_HANDSHAKE_DURATION, &[("resumed", "false")]),
        4,
        10.0,
    );
    assert_samples(
        "resumed handshake",
        &r.histogram(TLS_HANDSHAKE_DURATION, &[("resumed", "true")]),
        1,
        10.0,
    );

    // One handshake count per successful handshake, labelled from the digest.
    let hs = |resumed| {
        vec![
            ("version", facts.version.as_str()),
            ("cipher", facts.cipher.as_str()),
            ("alpn", "http/1.1"),
            ("resumed", resumed),
        ]
    };
    assert_eq!(r.counter(TLS_HANDSHAKES_TOTAL, &hs("false")), 4);
    assert_eq!(r.counter(TLS_HANDSHAKES_TOTAL, &hs("true")), 1);
    assert_eq!(r.series(TLS_HANDSHAKES_TOTAL).len(), 2);
    assert_eq!(facts.version, "TLSv1.3");

    // Exactly one error, of kind invalid_cert.
    assert_eq!(
        r.counter(CONNECT_ERRORS_TOTAL, &[("kind", "invalid_cert")]),
        1
    );
    assert_eq!(r.counter_total(CONNECT_ERRORS_TOTAL), 1);

    // Evictions by reason; dropping the connector at the end is not an eviction.
    for (reason, n) in [
        ("idle_timeout", 1),
        ("unexpected_data", 1),
        ("closed", 1),
        ("capacity", 0),
        ("max_lifetime", 0),
        ("max_uses", 0),
    ] {
        assert_eq!(
            r.counter(EVICTIONS_TOTAL, &[("reason", reason)]),
            n,
            "{reason}"
        );
    }

    // Gauges are exact: everything is closed now.
    assert_eq!(r.gauge(IDLE_CONNECTIONS, &[]), 0.0);
    assert_eq!(r.gauge(ACTIVE_CONNECTIONS, &[]), 0.0);

    // One wait at the cap, about 50 ms long.
    let waits = r.histogram(WAIT_DURATION, &[]);
    assert_samples("wait", &waits, 1, WAIT_TIMEOUT.as_secs_f64());
    assert!(waits[0] >= 0.04, "waited {}", waits[0]);

    // The pool records exactly the documented set of names, except the HTTP layer's (see
    // `http_metrics_count_streams_connections_and_goaways`).
    let documented: BTreeSet<String> = ALL_METRICS
        .iter()
        .filter(|name| !HTTP_METRICS.contains(name))
        .map(|s| s.to_string())
        .collect();
    assert_eq!(r.names(), documented);
}

/// The metrics only `upstream_pool::http` records.
const HTTP_METRICS: [&str; 4] = [
    H2_STREAMS_ACTIVE,
    H2_CONNECTIONS,
    H2_GOAWAY_TOTAL,
    HTTP_REQUESTS_PER_CONNECTION,
];

#[test]
fn http_metrics_count_streams_connections_and_goaways() {
    let recorder = DebuggingRecorder::new();
    let mut recorded = Recorded::new(&recorder);
    with_recorder(&recorder, || h2_scenario(&mut recorded, true));
}

fn get() -> http::Request<Empty<Bytes>> {
    http::Request::get("/").body(Empty::new()).unwrap()
}

/// HTTP/2 through `upstream_pool::http` against a server that sends GOAWAY after three
/// requests per connection: streams in flight, open connections, the GOAWAY, requests per
/// connection, and checkouts (a stream on an existing connection is `reused`). `check`:
/// assert the counts (only meaningful with a recorder of its own).
async fn h2_scenario(recorded: &mut Recorded, check: bool) {
    let server = HttpServer::builder().goaway_after(3).start();
    let connector = Connector::new(ConnectorOptions::default()).unwrap();
    let http = HttpConnector::new(connector.clone());
    let peer = Peer::tls(server.addr(), "localhost")
        .with_ca(pki().ca_a())
        .with_alpn(Alpn::H2);

    // Three requests on one connection; the first one's body held unread for a moment.
    for i in 0..3 {
        let response = http.send(&peer, get()).await.unwrap();
        if i == 0 {
            let r = recorded.refresh();
            assert_eq!(r.gauge(H2_STREAMS_ACTIVE, &[]), 1.0);
            assert_eq!(r.gauge(H2_CONNECTIONS, &[]), 1.0);
        }
        response.into_body().collect().await.unwrap();
    }
    // The server's GOAWAY closes the connection once its streams are done.
    assert!(
        support::wait_until(Duration::from_secs(5), || connector
            .connection_count_for(&peer)
            == 0)
        .await
    );
    let stats = server.wait_for(|s| s.open == 0).await;
    assert!(stats.conns[0].goaway_sent, "{stats:#?}");
    let r = recorded.refresh();
    assert_eq!(r.gauge(H2_CONNECTIONS, &[]), 0.0);
    assert_eq!(r.counter(H2_GOAWAY_TOTAL, &[]), 1);
    assert_eq!(r.histogram(HTTP_REQUESTS_PER_CONNECTION, &[]), vec![3.0]);

    // A fourth request dials a second connection.
    let response = http.send(&peer, get()).await.unwrap();
    response.into_body().collect().await.unwrap();
    let r = recorded.refresh();
    assert_eq!(r.gauge(H2_STREAMS_ACTIVE, &[]), 0.0);
    assert_eq!(r.gauge(H2_CONNECTIONS, &[]), 1.0);
    if check {
        assert_eq!(r.counter(CHECKOUTS_TOTAL, &[("outcome", "new")]), 2);
        assert_eq!(r.counter(CHECKOUTS_TOTAL, &[("outcome", "reused")]), 2);
    }
    // Each HTTP/2 connection is one active pool connection for its whole life.
    assert_eq!(r.gauge(ACTIVE_CONNECTIONS, &[]), 1.0);
    assert_eq!(r.gauge(IDLE_CONNECTIONS, &[]), 0.0);
    assert_eq!(server.stats().accepted, 2);

    // Dropping the connector closes the second connection.
    drop(http);
    drop(connector);
    server.wait_for(|s| s.open == 0).await;
    let r = recorded.refresh();
    assert_eq!(r.gauge(H2_CONNECTIONS, &[]), 0.0);
    assert_eq!(r.counter(H2_GOAWAY_TOTAL, &[]), 1);
    assert_eq!(
        r.histogram(HTTP_REQUESTS_PER_CONNECTION, &[]),
        vec![3.0, 1.0]
    );
    assert!(
        support::wait_until(Duration::from_secs(5), || recorded
            .refresh()
            .gauge(ACTIVE_CONNECTIONS, &[])
            == 0.0)
        .await
    );
}

#[test]
fn opt_in_peer_label_names_the_peer_on_every_metric() {
    let recorder = DebuggingRecorder::new();
    let mut recorded = Recorded::new(&recorder);
    let facts = with_recorder(&recorder, || scenario(true, &mut recorded));
    let r = recorded.refresh();

    for name in ALL_METRICS {
        for (labels, _, _) in r.series(name) {
            assert!(
                labels.contains_key("peer"),
                "{name} {labels:?} has no peer label"
            );
        }
    }
    // "backend-a" names both the main peer and the idle-timeout peer (the name is not part
    // of the key), so their series add up under one label: 3 dials, 2 reuses.
    let main = label(true, &facts.main_label);
    assert_eq!(
        r.counter(CHECKOUTS_TOTAL, &refs(&with(&main, &[("outcome", "new")]))),
        3
    );
    assert_eq!(
        r.counter(
            CHECKOUTS_TOTAL,
            &refs(&with(&main, &[("outcome", "reused")]))
        ),
        2
    );
    for name in ["stray", "closing"] {
        let l = label(true, name);
        assert_eq!(
            r.counter(CHECKOUTS_TOTAL, &refs(&with(&l, &[("outcome", "new")]))),
            1
        );
        assert_samples(name, &r.histogram(TCP_CONNECT_DURATION, &l), 1, 5.0);
        assert_eq!(r.gauge(IDLE_CONNECTIONS, &l), 0.0);
        assert_eq!(r.gauge(ACTIVE_CONNECTIONS, &l), 0.0);
    }
    assert_eq!(
        r.counter(
            EVICTIONS_TOTAL,
            &refs(&with(&main, &[("reason", "idle_timeout")]))
        ),
        1
    );
    assert_eq!(
        r.counter(
            EVICTIONS_TOTAL,
            &refs(&with(
                &label(true, "stray"),
                &[("reason", "unexpected_data")]
            ))
        ),
        1
    );
    assert_eq!(
        r.counter(
            EVICTIONS_TOTAL,
            &refs(&with(&label(true, "closing"), &[("reason", "closed")]))
        ),
        1
    );
    // A peer without a name is labelled with its address.
    assert!(
        facts.bad_label.starts_with("127.0.0.1:"),
        "{}",
        facts.bad_label
    );
    assert_eq!(
        r.counter(
            CONNECT_ERRORS_TOTAL,
            &[("kind", "invalid_cert"), ("peer", facts.bad_label.as_str())]
        ),
        1
    );
    let hs = vec![
        ("version", facts.version.as_str()),
        ("cipher", facts.cipher.as_str()),
        ("alpn", "http/1.1"),
        ("resumed", "true"),
        ("peer", facts.main_label.as_str()),
    ];
    assert_eq!(r.counter(TLS_HANDSHAKES_TOTAL, &hs), 1);
    assert_samples(
        "main tcp",
        &r.histogram(TCP_CONNECT_DURATION, &main),
        3,
        5.0,
    );
    assert_samples("main wait", &r.histogram(WAIT_DURATION, &main), 1, 2.0);
    assert_eq!(r.gauge(IDLE_CONNECTIONS, &main), 0.0);
    assert_eq!(r.gauge(ACTIVE_CONNECTIONS, &main), 0.0);
}

/// A `get` that times out at the cap counts a wait and a `pool_timedout` error.
#[test]
fn pool_timeout_records_the_wait_and_the_error() {
    let recorder = DebuggingRecorder::new();
    let mut recorded = Recorded::new(&recorder);
    with_recorder(&recorder, || async {
        let server = TestServer::builder().start();
        let mut options = ConnectorOptions::default();
        options.max_connections_per_peer = Some(1);
        options.wait_timeout = Duration::from_millis(100);
        let connector = Connector::new(options).unwrap();
        let peer = Peer::tls(server.addr(), "localhost").with_ca(pki().ca_a());
        let held = connector.get(&peer).await.unwrap();
        let err = connector.get(&peer).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::PoolTimedout);
        drop(held);
        server.wait_for(|s| s.accepted == 1 && s.open == 0).await;
    });
    let r = recorded.refresh();
    let waits = r.histogram(WAIT_DURATION, &[]);
    assert_samples("wait", &waits, 1, 1.0);
    assert!(waits[0] >= 0.09, "waited {}", waits[0]);
    assert_eq!(
        r.counter(CONNECT_ERRORS_TOTAL, &[("kind", "pool_timedout")]),
        1
    );
    assert_eq!(r.counter(CHECKOUTS_TOTAL, &[("outcome", "new")]), 1);
    assert_eq!(r.gauge(ACTIVE_CONNECTIONS, &[]), 0.0);
    assert_eq!(r.gauge(IDLE_CONNECTIONS, &[]), 0.0);
}

/// Accepts on loopback and forwards each connection to `to` after `delay`, so a dial through
/// it takes at least that long.
async fn slow_relay(to: std::net::SocketAddr, delay: Duration) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let Ok(mut upstream) = tokio::net::TcpStream::connect(to).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            });
        }
    });
    addr
}

/// A `get` cancelled mid-dial is not a checkout, even though its dial finishes in the
/// background and the connection is pooled: the caller who later takes it reuses it.
#[test]
fn a_cancelled_get_is_not_counted_as_a_checkout() {
    let recorder = DebuggingRecorder::new();
    let mut recorded = Recorded::new(&recorder);
    with_recorder(&recorder, || async {
        let server = TestServer::builder().start();
        let relay = slow_relay(server.addr(), Duration::from_millis(150)).await;
        let connector = Connector::new(ConnectorOptions::default()).unwrap();
        let peer = Peer::tls(relay, "localhost").with_ca(pki().ca_a());

        let cancelled = tokio::time::timeout(Duration::from_millis(30), connector.get(&peer)).await;
        assert!(cancelled.is_err(), "the dial was expected to take longer");
        assert!(
            support::wait_until(Duration::from_secs(5), || connector.idle_count_for(&peer)
                == 1)
            .await
        );
        let r = recorded.refresh();
        assert_eq!(r.counter(CHECKOUTS_TOTAL, &[("outcome", "new")]), 0);
        assert_eq!(r.counter(CHECKOUTS_TOTAL, &[("outcome", "reused")]), 0);
        assert_eq!(r.gauge(IDLE_CONNECTIONS, &[]), 1.0);
        assert_eq!(r.gauge(ACTIVE_CONNECTIONS, &[]), 0.0);

        let mut conn = connector.get(&peer).await.unwrap();
        assert!(conn.reused());
        exchange(&mut conn).await;
        let r = recorded.refresh();
        assert_eq!(r.counter(CHECKOUTS_TOTAL, &[("outcome", "new")]), 0);
        assert_eq!(r.counter(CHECKOUTS_TOTAL, &[("outcome", "reused")]), 1);
        assert_eq!(r.gauge(ACTIVE_CONNECTIONS, &[]), 1.0);
        drop(conn);
        let stats = server.wait_for(|s| s.accepted == 1 && s.open == 0).await;
        assert_eq!(stats.handshakes, 1);
    });
    let r = recorded.refresh();
    assert_samples("tcp", &r.histogram(TCP_CONNECT_DURATION, &[]), 1, 5.0);
    assert_samples(
        "handshake",
        &r.histogram(TLS_HANDSHAKE_DURATION, &[("resumed", "false")]),
        1,
        10.0,
    );
    assert_eq!(r.gauge(IDLE_CONNECTIONS, &[]), 0.0);
    assert_eq!(r.gauge(ACTIVE_CONNECTIONS, &[]), 0.0);
}

// ---------------------------------------------------------------------------------------
// Tracing.
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct SpanRecord {
    name: &'static str,
    fields: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
struct EventRecord {
    level: tracing::Level,
    fields: BTreeMap<String, String>,
    /// Index into `spans` of the span the event happened in.
    span: Option<usize>,
}

#[derive(Debug, Default)]
struct Captured {
    spans: Vec<SpanRecord>,
    events: Vec<EventRecord>,
    /// Entered spans, innermost last (one thread: the test's runtime).
    stack: Vec<usize>,
}

/// A minimal subscriber that records every span (with its fields as recorded later) and
/// every event (with the span it happened in).
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Captured>>);

struct FieldVisitor<'a>(&'a mut BTreeMap<String, String>);

impl tracing::field::Visit for FieldVisitor<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().to_string(), format!("{value:?}"));
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().to_string(), value.to_string());
    }
}

impl tracing::Subscriber for Capture {
    fn register_callsite(
        &self,
        _: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        tracing::subscriber::Interest::sometimes()
    }

    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }

    fn new_span(&self, attrs: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        let mut fields = BTreeMap::new();
        attrs.record(&mut FieldVisitor(&mut fields));
        let mut c = self.0.lock().unwrap();
        c.spans.push(SpanRecord {
            name: attrs.metadata().name(),
            fields,
        });
        tracing::span::Id::from_u64(c.spans.len() as u64)
    }

    fn record(&self, span: &tracing::span::Id, values: &tracing::span::Record<'_>) {
        let mut c = self.0.lock().unwrap();
        let i = span.into_u64() as usize - 1;
        values.record(&mut FieldVisitor(&mut c.spans[i].fields));
    }

    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}

    fn event(&self, event: &tracing::Event<'_>) {
        let mut fields = BTreeMap::new();
        event.record(&mut FieldVisitor(&mut fields));
        let mut c = self.0.lock().unwrap();
        let span = match event.parent() {
            Some(id) => Some(id.into_u64() as usize - 1),
            None if event.is_contextual() => c.stack.last().copied(),
            None => None,
        };
        c.events.push(EventRecord {
            level: *event.metadata().level(),
            fields,
            span,
        });
    }

    fn enter(&self, span: &tracing::span::Id) {
        self.0
            .lock()
            .unwrap()
            .stack
            .push(span.into_u64() as usize - 1);
    }

    fn exit(&self, span: &tracing::span::Id) {
        let mut c = self.0.lock().unwrap();
        let i = span.into_u64() as usize - 1;
        if let Some(pos) = c.stack.iter().rposition(|s| *s == i) {
            c.stack.remove(pos);
        }
    }
}

#[test]
fn every_get_has_a_span_with_peer_sni_outcome_and_error() {
    // tracing-core caches each callsite's interest globally. While only one dispatcher is
    // registered, a callsite first hit on another test's thread (which has no subscriber) is
    // cached as "never" and this test would miss it. A second, long-lived dispatcher makes
    // tracing-core ask every registered dispatcher instead, so the interest is "sometimes".
    static KEEPER: std::sync::OnceLock<tracing::Dispatch> = std::sync::OnceLock::new();
    KEEPER.get_or_init(|| tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default()));
    let capture = Capture::default();
    let dispatch = tracing::Dispatch::new(capture.clone());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let addr = tracing::dispatcher::with_default(&dispatch, || {
        runtime.block_on(async {
            let server = TestServer::builder().start();
            let mut options = ConnectorOptions::default();
            options.reap_interval = Duration::from_millis(20);
            let connector = Connector::new(options).unwrap();
            let peer = Peer::tls(server.addr(), "localhost")
                .with_ca(pki().ca_a())
                .with_idle_timeout(Duration::from_millis(100));
            // 1: new.
            let mut conn = connector.get(&peer).await.unwrap();
            exchange(&mut conn).await;
            connector.release(conn);
            // 2: reused.
            let mut conn = connector.get(&peer).await.unwrap();
            assert!(conn.reused());
            exchange(&mut conn).await;
            connector.release(conn);
            // 3: InvalidCert.
            let bad = Peer::tls(server.addr(), "localhost").with_ca(pki().ca_b());
            assert_eq!(
                connector.get(&bad).await.unwrap_err().kind(),
                ErrorKind::InvalidCert
            );
            // The idle connection times out: a debug event names the reason.
            assert!(
                support::wait_until(Duration::from_secs(5), || connector.idle_count() == 0).await
            );
            server.addr()
        })
    });

    let c = capture.0.lock().unwrap().clone_parts();
    let gets: Vec<(usize, &SpanRecord)> =
        c.0.iter()
            .enumerate()
            .filter(|(_, s)| s.name == "upstream_get")
            .collect();
    assert_eq!(gets.len(), 3, "one span per get: {:#?}", c.0);
    for (_, span) in &gets {
        assert_eq!(span.fields.get("peer"), Some(&addr.to_string()), "{span:?}");
        assert_eq!(
            span.fields.get("sni").map(String::as_str),
            Some("localhost")
        );
    }
    let field = |i: usize, f: &str| gets[i].1.fields.get(f).map(String::as_str);
    assert_eq!(field(0, "reused"), Some("false"));
    assert_eq!(field(0, "error"), None);
    assert_eq!(field(1, "reused"), Some("true"));
    assert_eq!(field(1, "error"), None);
    assert_eq!(field(2, "error"), Some("invalid_cert"));
    assert_eq!(field(2, "reused"), None);

    // Reuse is the hot path: nothing above TRACE is logged inside its span.
    let reused_span = gets[1].0;
    let noisy: Vec<_> =
        c.1.iter()
            .filter(|e| e.span == Some(reused_span) && e.level != tracing::Level::TRACE)
            .collect();
    assert!(noisy.is_empty(), "events on the reuse path: {noisy:#?}");

    // Evictions are debug events with the reason.
    let evictions: Vec<_> =
        c.1.iter()
            .filter(|e| e.fields.get("reason").map(String::as_str) == Some("idle_timeout"))
            .collect();
    assert_eq!(evictions.len(), 1, "{:#?}", c.1);
    assert_eq!(evictions[0].level, tracing::Level::DEBUG);
}

impl Captured {
    fn clone_parts(&self) -> (Vec<SpanRecord>, Vec<EventRecord>) {
        (self.spans.clone(), self.events.clone())
    }
}

// ---------------------------------------------------------------------------------------
// The documented table.
// ---------------------------------------------------------------------------------------

/// `(name, type, labels cell)` for each row of a Markdown table whose first cell is a
/// backticked `upstream_*` name.
fn metric_rows(doc: &str) -> Vec<(String, String, String)> {
    doc.lines()
        .filter_map(|line| {
            let cells: Vec<&str> = line.trim().strip_prefix('|')?.split(" | ").collect();
            let name = cells.first()?.trim().strip_prefix('`')?.strip_suffix('`')?;
            if !name.starts_with("upstream_") {
                return None;
            }
            Some((
                name.to_string(),
                cells.get(1)?.trim().to_string(),
                cells.get(2)?.trim().to_string(),
            ))
        })
        .collect()
}

/// Checks a document's metrics table against what the code records: the same names as
/// `ALL_METRICS`, each once, with the recorded kind and every recorded label key.
fn check_table(what: &str, doc: &str, recorded: &Recorded) {
    let rows = metric_rows(doc);
    let names: Vec<&str> = rows.iter().map(|(n, _, _)| n.as_str()).collect();
    let mut sorted = names.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(
        sorted.len(),
        names.len(),
        "{what}: a metric is listed twice: {names:?}"
    );
    let mut all: Vec<&str> = ALL_METRICS.to_vec();
    all.sort_unstable();
    assert_eq!(
        sorted, all,
        "{what}: the table does not list exactly ALL_METRICS"
    );
    for (name, kind, labels) in &rows {
        let series = recorded.series(name);
        assert!(!series.is_empty(), "{name} was never recorded");
        let want = match series[0].1 {
            MetricKind::Counter => "counter",
            MetricKind::Gauge => "gauge",
            MetricKind::Histogram => "histogram",
        };
        assert_eq!(kind, want, "{what}: type of {name}");
        let keys: BTreeSet<&String> = series
            .iter()
            .flat_map(|(l, _, _)| l.keys())
            .filter(|k| *k != "peer")
            .collect();
        for key in keys {
            assert!(
                labels.contains(&format!("`{key}`")),
                "{what}: label `{key}` of {name} is not documented in {labels:?}"
            );
        }
    }
}

#[test]
fn documented_metrics_table_matches_what_is_recorded() {
    let recorder = DebuggingRecorder::new();
    let mut recorded = Recorded::new(&recorder);
    with_recorder(&recorder, || scenario(false, &mut recorded));
    with_recorder(&recorder, || h2_scenario(&mut recorded, false));
    recorded.refresh();

    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    assert!(
        !metric_rows(&readme).is_empty(),
        "README.md must hold the metrics table"
    );
    check_table("README.md", &readme, &recorded);
    assert!(readme.contains("metrics-exporter-prometheus"));
}
