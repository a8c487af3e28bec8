//! Interop with a real nginx (Debian's package): keep-alive reuse, `keepalive_timeout`,
//! `keepalive_requests`, mutual TLS, session resumption and ALPN, each checked on what nginx
//! itself reports in the response body (`$connection`, `$ssl_session_reused`, ...).
//!
//! Every test starts its own nginx on loopback under a temporary prefix (`daemon off;
//! master_process off;`, so killing its PID stops it). Without nginx the suite passes with a
//! loud notice, unless `UPSTREAM_POOL_REQUIRE_NGINX=1` (set by `.ci/run`), which turns a
//! missing nginx into a failure.

mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use upstream_pool::{Alpn, CertKey, Connection, Connector, ConnectorOptions, Error, Peer};

use support::certs::TestPki;
use support::client::{http_get, HttpResponse};
use support::nginx::{self as harness, Nginx};
use support::{wait_until, TempDir};

/// Number of `#[tokio::test]`s in this file, for the skip notice.
const NGINX_TESTS: usize = 10;

/// Bound on every network step of a test, so a broken nginx fails instead of hanging.
const STEP: Duration = Duration::from_secs(10);

/// The nginx binary, or `None` after the skip notice (`tests/support/nginx.rs`).
fn nginx_or_skip() -> Option<PathBuf> {
    harness::nginx_or_skip("interop", NGINX_TESTS)
}

/// The settings that differ between tests.
#[derive(Debug, Clone)]
struct NginxConf {
    /// `ssl_protocols`.
    protocols: &'static str,
    /// `keepalive_timeout`.
    keepalive_timeout: &'static str,
    /// `keepalive_requests`.
    keepalive_requests: u32,
}

impl Default for NginxConf {
    fn default() -> Self {
        NginxConf {
            protocols: "TLSv1.2 TLSv1.3",
            keepalive_timeout: "60s",
            keepalive_requests: 1000,
        }
    }
}

/// Starts nginx (`tests/support/nginx.rs`) with this file's configuration.
fn start(bin: &Path, conf: &NginxConf) -> Nginx {
    Nginx::start(bin, |dir, port| config(dir, port, conf))
}

/// The peer every test starts from: TLS with SNI `localhost`, trusting root A.
fn peer(nginx: &Nginx) -> Peer {
    Peer::tls(nginx.addr(), "localhost").with_ca(TestPki::shared().ca_a())
}

/// nginx.conf for an unprivileged single-process nginx under `dir`. The body echoes, one per
/// line, what nginx saw of the connection.
fn config(dir: &TempDir, port: u16, conf: &NginxConf) -> String {
    let pki = TestPki::shared();
    let server = pki.server.write_pem(dir.path(), "server").unwrap();
    // Client certificates chain to root A through the client intermediate (depth 2).
    fs::write(dir.join("client-ca.pem"), pki.root_a.cert_pem()).unwrap();
    for temp in ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"] {
        fs::create_dir(dir.join(temp)).unwrap();
    }
    let d = dir.path().display();
    format!(
        r#"daemon off;
master_process off;
worker_processes 1;
error_log {d}/error.log info;
pid {d}/nginx.pid;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    ssl_session_cache shared:SSL:1m;
    ssl_session_tickets on;
    server {{
        listen 127.0.0.1:{port} ssl http2;
        server_name localhost;
        ssl_certificate {chain};
        ssl_certificate_key {key};
        ssl_protocols {protocols};
        ssl_client_certificate {d}/client-ca.pem;
        ssl_verify_client optional;
        ssl_verify_depth 3;
        keepalive_timeout {keepalive_timeout};
        keepalive_requests {keepalive_requests};
        location / {{
            default_type text/plain;
            return 200 "proto=$ssl_protocol\nalpn=$ssl_alpn_protocol\nverify=$ssl_client_verify\nreused=$ssl_session_reused\nconn=$connection\nreqs=$connection_requests\n";
        }}
    }}
}}
"#,
        chain = server.chain.display(),
        key = server.key.display(),
        protocols = conf.protocols,
        keepalive_timeout = conf.keepalive_timeout,
        keepalive_requests = conf.keepalive_requests,
    )
}

/// What nginx reported about the connection a request came on.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Echo {
    proto: String,
    alpn: String,
    verify: String,
    /// `r` when the TLS session was resumed, `.` otherwise.
    reused: String,
    /// `$connection`: nginx's serial number of the connection.
    conn: u64,
    /// `$connection_requests`: requests so far on it, this one included.
    reqs: u64,
    /// The response carried `Connection: close`.
    close: bool,
}

impl Echo {
    fn parse(resp: &HttpResponse) -> Echo {
        assert_eq!(resp.status, 200, "nginx answered {resp:?}");
        let body = resp.body_str();
        let field = |name: &str| -> String {
            body.lines()
                .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
                .unwrap_or_else(|| panic!("no {name}= in nginx body {body:?}"))
                .to_owned()
        };
        Echo {
            proto: field("proto"),
            alpn: field("alpn"),
            verify: field("verify"),
            reused: field("reused"),
            conn: field("conn").parse().unwrap(),
            reqs: field("reqs").parse().unwrap(),
            close: resp
                .header("connection")
                .is_some_and(|v| v.eq_ignore_ascii_case("close")),
        }
    }
}

/// One `GET /` on `conn`, bounded by [`STEP`].
async fn request(conn: &mut Connection) -> std::io::Result<Echo> {
    let resp = tokio::time::timeout(STEP, http_get(conn, "localhost"))
        .await
        .expect("nginx request timed out")?;
    Ok(Echo::parse(&resp))
}

async fn get(connector: &Connector, peer: &Peer) -> Connection {
    tokio::time::timeout(STEP, connector.get(peer))
        .await
        .expect("get timed out")
        .unwrap_or_else(|e| panic!("get failed: {e}"))
}

fn connector_with(f: impl FnOnce(&mut ConnectorOptions)) -> Connector {
    let mut options = ConnectorOptions::default();
    f(&mut options);
    Connector::new(options).unwrap()
}

#[tokio::test]
async fn keepalive_reuses_one_nginx_connection() {
    let Some(bin) = nginx_or_skip() else { return };
    let nginx = start(&bin, &NginxConf::default());
    let connector = connector_with(|_| {});
    let peer = peer(&nginx);

    let mut conn = get(&connector, &peer).await;
    assert!(!conn.reused());
    let first = request(&mut conn).await.unwrap();
    assert_eq!(first.reqs, 1, "{first:?}");
    assert_eq!(first.proto, "TLSv1.3");
    assert_eq!(first.alpn, "", "no ALPN offered, none negotiated");
    assert_eq!(first.verify, "NONE", "no client certificate was sent");
    assert!(!first.close);
    connector.release(conn);
    assert_eq!(connector.idle_count_for(&peer), 1);

    for n in 2..=4 {
        let mut conn = get(&connector, &peer).await;
        assert!(
            conn.reused(),
            "request {n} should reuse the pooled connection"
        );
        let echo = request(&mut conn).await.unwrap();
        assert_eq!(
            echo.conn, first.conn,
            "nginx saw another connection: {echo:?}"
        );
        assert_eq!(echo.reqs, n);
        connector.release(conn);
    }
    assert_eq!(connector.connection_count_for(&peer), 1);
}

/// `keepalive_timeout 1s`: nginx closes the idle connection (close_notify + FIN); the
/// reaper notices and evicts it, and the next request goes on a fresh connection.
#[tokio::test]
async fn keepalive_timeout_close_is_reaped() {
    let Some(bin) = nginx_or_skip() else { return };
    let conf = NginxConf {
        keepalive_timeout: "1s",
        ..NginxConf::default()
    };
    let nginx = start(&bin, &conf);
    let connector = connector_with(|o| o.reap_interval = Duration::from_millis(100));
    let peer = peer(&nginx);

    let mut conn = get(&connector, &peer).await;
    let first = request(&mut conn).await.unwrap();
    connector.release(conn);
    assert_eq!(connector.idle_count_for(&peer), 1);

    // nginx closes after 1 s idle; the reaper runs every 100 ms.
    let evicted = wait_until(Duration::from_secs(5), || {
        connector.idle_count_for(&peer) == 0
    })
    .await;
    assert!(
        evicted,
        "the connection nginx closed stayed in the pool\n{}",
        nginx.logs()
    );
    assert_eq!(connector.connection_count_for(&peer), 0);

    let mut conn = get(&connector, &peer).await;
    assert!(!conn.reused(), "a closed connection was handed out");
    let second = request(&mut conn).await.unwrap();
    assert_ne!(second.conn, first.conn);
    assert_eq!(second.reqs, 1);
}

/// Same, but the reaper never runs in time: the closed connection is still in the pool when
/// `get` is called, and `get` must notice (liveness check) and dial instead of handing it out.
#[tokio::test]
async fn keepalive_timeout_close_is_caught_at_checkout() {
    let Some(bin) = nginx_or_skip() else { return };
    let conf = NginxConf {
        keepalive_timeout: "1s",
        ..NginxConf::default()
    };
    let nginx = start(&bin, &conf);
    let connector = connector_with(|o| o.reap_interval = Duration::from_secs(3600));
    let peer = peer(&nginx);

    let mut conn = get(&connector, &peer).await;
    let first = request(&mut conn).await.unwrap();
    connector.release(conn);
    // Long enough for nginx's 1 s keepalive_timeout (its timers are coarse) plus delivery.
    tokio::time::sleep(Duration::from_millis(1800)).await;
    assert_eq!(
        connector.idle_count_for(&peer),
        1,
        "nothing should have reaped it yet (reap_interval is an hour)"
    );

    let mut conn = get(&connector, &peer).await;
    assert!(!conn.reused(), "the connection nginx closed was handed out");
    let second = request(&mut conn).await.unwrap();
    assert_ne!(second.conn, first.conn);
    assert_eq!(second.reqs, 1);
    assert_eq!(connector.idle_count_for(&peer), 0);
}

/// `keepalive_requests 3`: the third response on a connection carries `Connection: close`
/// and nginx closes it. A client that drops such a connection gets a fresh one next; the
/// counts cycle 1, 2, 3 per nginx connection.
#[tokio::test]
async fn keepalive_requests_limit_is_followed() {
    let Some(bin) = nginx_or_skip() else { return };
    let conf = NginxConf {
        keepalive_requests: 3,
        ..NginxConf::default()
    };
    let nginx = start(&bin, &conf);
    let connector = connector_with(|_| {});
    let peer = peer(&nginx);

    let mut seen = Vec::new();
    for i in 0..9u64 {
        let mut conn = get(&connector, &peer).await;
        let echo = request(&mut conn).await.unwrap();
        assert_eq!(echo.reqs, i % 3 + 1, "{echo:?}");
        assert_eq!(conn.reused(), i % 3 != 0, "request {i}");
        assert_eq!(
            echo.close,
            echo.reqs == 3,
            "Connection: close exactly on the 3rd: {echo:?}"
        );
        if echo.close {
            drop(conn);
        } else {
            connector.release(conn);
        }
        seen.push(echo.conn);
    }
    for chunk in seen.chunks(3) {
        assert!(
            chunk.iter().all(|c| *c == chunk[0]),
            "one nginx connection per 3 requests: {seen:?}"
        );
    }
    assert!(seen[0] != seen[3] && seen[3] != seen[6], "{seen:?}");
    assert_eq!(connector.connection_count_for(&peer), 0);
}

/// A client that (wrongly) releases the connection nginx is closing: the pool must not hand
/// it out again. It is refused at release or evicted once nginx's close arrives.
#[tokio::test]
async fn connection_nginx_closes_after_limit_is_not_reused() {
    let Some(bin) = nginx_or_skip() else { return };
    let conf = NginxConf {
        keepalive_requests: 1,
        ..NginxConf::default()
    };
    let nginx = start(&bin, &conf);
    let connector = connector_with(|o| o.reap_interval = Duration::from_millis(50));
    let peer = peer(&nginx);

    let mut conn = get(&connector, &peer).await;
    let first = request(&mut conn).await.unwrap();
    assert!(
        first.close,
        "keepalive_requests 1 closes after the first: {first:?}"
    );
    connector.release(conn);
    let gone = wait_until(Duration::from_secs(5), || {
        connector.idle_count_for(&peer) == 0
    })
    .await;
    assert!(gone, "the connection nginx closed stayed in the pool");

    let mut conn = get(&connector, &peer).await;
    assert!(!conn.reused());
    let second = request(&mut conn).await.unwrap();
    assert_ne!(second.conn, first.conn);
    assert_eq!(second.reqs, 1);
}

/// nginx's `keepalive_timeout` fires while the caller holds a pooled connection it has not
/// written to yet (the race every proxy meets): the request fails with an error that says the
/// connection was reused and is retryable, and the retry on a fresh connection succeeds.
#[tokio::test]
async fn keepalive_close_between_get_and_write_is_retryable() {
    let Some(bin) = nginx_or_skip() else { return };
    let conf = NginxConf {
        keepalive_timeout: "1s",
        ..NginxConf::default()
    };
    let nginx = start(&bin, &conf);
    let connector = connector_with(|o| o.reap_interval = Duration::from_secs(3600));
    let peer = peer(&nginx);

    let mut conn = get(&connector, &peer).await;
    let first = request(&mut conn).await.unwrap();
    connector.release(conn);
    let mut conn = get(&connector, &peer).await;
    assert!(conn.reused());
    // nginx closes it (close_notify + FIN) while we hold it.
    tokio::time::sleep(Duration::from_millis(1800)).await;
    let e = request(&mut conn)
        .await
        .expect_err("nginx closed this connection; the request cannot succeed");
    let err = Error::from_io(&e)
        .unwrap_or_else(|| panic!("the I/O error carries no upstream_pool::Error: {e:?}"));
    assert!(err.reused() && err.retryable(), "{err:?}");
    drop(conn);

    let mut conn = get(&connector, &peer).await;
    assert!(!conn.reused());
    let retried = request(&mut conn).await.unwrap();
    assert_ne!(retried.conn, first.conn);
    assert_eq!(retried.reqs, 1);
}

/// `ssl_verify_client optional`: nginx verifies the client certificate (sent with its
/// intermediate) against root A and reports `SUCCESS`; without one it reports `NONE`; and the
/// two peers never share a connection.
#[tokio::test]
async fn client_certificate_is_verified_by_nginx() {
    let Some(bin) = nginx_or_skip() else { return };
    let nginx = start(&bin, &NginxConf::default());
    let pki = TestPki::shared();
    let connector = connector_with(|_| {});
    let anonymous = peer(&nginx);
    let cert = CertKey::from_pem(&pki.client_a.chain_pem(), &pki.client_a.key_pem()).unwrap();
    let mtls = peer(&nginx).with_client_cert(cert);

    let mut conn = get(&connector, &anonymous).await;
    let plain = request(&mut conn).await.unwrap();
    assert_eq!(plain.verify, "NONE");
    connector.release(conn);

    let mut conn = get(&connector, &mtls).await;
    assert!(
        !conn.reused(),
        "a connection without client certificate was reused for mTLS"
    );
    let verified = request(&mut conn).await.unwrap();
    assert_eq!(verified.verify, "SUCCESS", "{verified:?}\n{}", nginx.logs());
    assert_ne!(verified.conn, plain.conn);
    connector.release(conn);

    // And back: each peer gets its own pooled connection.
    let mut conn = get(&connector, &anonymous).await;
    assert!(conn.reused());
    assert_eq!(request(&mut conn).await.unwrap().conn, plain.conn);

    // A certificate from an untrusted root: the handshake completes (optional) and nginx
    // refuses the request with 400.
    let untrusted = CertKey::from_pem(&pki.client_b.chain_pem(), &pki.client_b.key_pem()).unwrap();
    let mut conn = get(&connector, &peer(&nginx).with_client_cert(untrusted)).await;
    let resp = tokio::time::timeout(STEP, http_get(&mut conn, "localhost"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        resp.status, 400,
        "nginx accepted an untrusted client certificate: {resp:?}"
    );
}

async fn check_resumption(bin: &Path, protocols: &'static str, version: &str) {
    let conf = NginxConf {
        protocols,
        ..NginxConf::default()
    };
    let nginx = start(bin, &conf);
    let connector = connector_with(|_| {});
    let peer = peer(&nginx);

    let mut conn = get(&connector, &peer).await;
    assert!(!conn.digest().unwrap().session_reused);
    // Reading the full response also reads a TLS 1.3 ticket that preceded it.
    let first = request(&mut conn).await.unwrap();
    assert_eq!(first.proto, version);
    assert_eq!(first.reused, ".");
    drop(conn); // not released: the next get must dial

    for _ in 0..2 {
        let mut conn = get(&connector, &peer).await;
        assert!(!conn.reused());
        assert!(
            conn.digest().unwrap().session_reused,
            "{version}: the handshake did not resume"
        );
        let echo = request(&mut conn).await.unwrap();
        assert_eq!(echo.proto, version);
        assert_eq!(
            echo.reused, "r",
            "nginx did not see a resumed session: {echo:?}"
        );
        assert_ne!(echo.conn, first.conn);
        drop(conn);
    }
}

#[tokio::test]
async fn tls13_session_resumption_seen_by_nginx() {
    let Some(bin) = nginx_or_skip() else { return };
    check_resumption(&bin, "TLSv1.2 TLSv1.3", "TLSv1.3").await;
}

#[tokio::test]
async fn tls12_session_resumption_seen_by_nginx() {
    let Some(bin) = nginx_or_skip() else { return };
    check_resumption(&bin, "TLSv1.2", "TLSv1.2").await;
}

/// nginx (http2 on the listener) picks `h2` when offered, `http/1.1` otherwise. (The h2
/// connection is not released: nginx sends its SETTINGS frame unasked, which an HTTP/1 pool
/// rightly treats as unexpected data.)
#[tokio::test]
async fn alpn_h2_is_negotiated_with_nginx() {
    let Some(bin) = nginx_or_skip() else { return };
    let nginx = start(&bin, &NginxConf::default());
    let connector = connector_with(|_| {});
    let h2h1 = peer(&nginx).with_alpn(Alpn::H2H1);
    let h1 = peer(&nginx).with_alpn(Alpn::H1);

    let h2 = get(&connector, &h2h1).await;
    assert_eq!(h2.digest().unwrap().alpn.as_deref(), Some(&b"h2"[..]));

    let mut conn = get(&connector, &h1).await;
    assert!(!conn.reused());
    assert_eq!(
        conn.digest().unwrap().alpn.as_deref(),
        Some(&b"http/1.1"[..])
    );
    let echo = request(&mut conn).await.unwrap();
    assert_eq!(echo.alpn, "http/1.1");
}
