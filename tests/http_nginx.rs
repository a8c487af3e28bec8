//! `upstream_pool::http` against a real nginx with an `http2` TLS listener: HTTP/2 sharing one
//! nginx connection between concurrent requests, and HTTP/1.1 keep-alive with the release
//! rule. nginx reports `$connection` (its serial number of the connection) and
//! `$connection_requests` in headers and body, so every case checks what nginx saw.
//!
//! Each test starts its own nginx on loopback (`tests/support/nginx.rs`); without nginx the
//! suite passes with a loud notice unless `UPSTREAM_POOL_REQUIRE_NGINX=1`.

mod support;

use std::fs;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use upstream_pool::http::{HttpConnector, ResponseBody};
use upstream_pool::{Alpn, Connector, ConnectorOptions, Error, Peer};

use support::certs::TestPki;
use support::h2_server::pattern;
use support::nginx::{nginx_or_skip, Nginx};
use support::{wait_until, TempDir};

/// Number of tests in this file, for the skip notice.
const TESTS: usize = 4;

/// Bound on every request, so a broken nginx fails the test instead of hanging it.
const STEP: Duration = Duration::from_secs(10);

/// Size of the static file `/big.bin`.
const BIG: usize = 8 * 1024 * 1024;

/// nginx.conf: `/` answers with what nginx saw of the connection; `/big.bin` is a static
/// file of [`BIG`] pattern bytes.
fn config(dir: &TempDir, port: u16) -> String {
    let server = TestPki::shared()
        .server
        .write_pem(dir.path(), "server")
        .unwrap();
    for sub in ["client_body", "proxy", "fastcgi", "uwsgi", "scgi", "www"] {
        fs::create_dir(dir.join(sub)).unwrap();
    }
    fs::write(dir.join("www/big.bin"), pattern(BIG)).unwrap();
    let d = dir.path().display();
    format!(
        r#"daemon off;
master_process off;
worker_processes 1;
error_log {d}/error.log info;
pid {d}/nginx.pid;
events {{ worker_connections 512; }}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_timeout 60s;
    keepalive_requests 10000;
    server {{
        listen 127.0.0.1:{port} ssl http2 backlog=1024;
        server_name localhost;
        ssl_certificate {chain};
        ssl_certificate_key {key};
        location = /big.bin {{
            root {d}/www;
            add_header X-Conn $connection always;
        }}
        location / {{
            default_type text/plain;
            add_header X-Conn $connection always;
            add_header X-Conn-Requests $connection_requests always;
            return 200 "conn=$connection reqs=$connection_requests proto=$server_protocol\n";
        }}
    }}
}}
"#,
        chain = server.chain.display(),
        key = server.key.display(),
    )
}

fn peer(nginx: &Nginx, alpn: Alpn) -> Peer {
    Peer::tls(nginx.addr(), "localhost")
        .with_ca(TestPki::shared().ca_a())
        .with_alpn(alpn)
}

fn http() -> HttpConnector {
    HttpConnector::new(Connector::new(ConnectorOptions::default()).unwrap())
}

fn get(path: &str) -> http::Request<Empty<Bytes>> {
    http::Request::get(path).body(Empty::new()).unwrap()
}

/// What nginx said about the connection a request came on.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Echo {
    version: http::Version,
    conn: u64,
    reqs: u64,
    proto: String,
}

async fn start(
    http: &HttpConnector,
    peer: &Peer,
    path: &str,
) -> Result<http::Response<ResponseBody>, Error> {
    tokio::time::timeout(STEP, http.send(peer, get(path)))
        .await
        .expect("request to nginx timed out")
}

async fn read_all(body: ResponseBody) -> Bytes {
    tokio::time::timeout(STEP, body.collect())
        .await
        .expect("body from nginx timed out")
        .expect("body error")
        .to_bytes()
}

fn conn_header(resp: &http::Response<ResponseBody>) -> u64 {
    resp.headers()
        .get("x-conn")
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .unwrap_or_else(|| panic!("no X-Conn header in {resp:?}"))
}

/// Reads a `/` response and checks its header and body agree.
async fn echo(resp: http::Response<ResponseBody>) -> Echo {
    assert_eq!(resp.status(), 200, "{resp:?}");
    let version = resp.version();
    let header_conn = conn_header(&resp);
    let body = read_all(resp.into_body()).await;
    let text = String::from_utf8_lossy(&body).into_owned();
    let field = |name: &str| -> String {
        text.split_whitespace()
            .find_map(|w| w.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
            .unwrap_or_else(|| panic!("no {name}= in nginx body {text:?}"))
            .to_owned()
    };
    let e = Echo {
        version,
        conn: field("conn").parse().unwrap(),
        reqs: field("reqs").parse().unwrap(),
        proto: field("proto"),
    };
    assert_eq!(
        e.conn, header_conn,
        "body and header from different connections"
    );
    e
}

async fn get_echo(http: &HttpConnector, peer: &Peer) -> Echo {
    echo(start(http, peer, "/").await.unwrap()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_and_h2h1_share_one_nginx_connection_for_50_concurrent_requests() {
    let Some(bin) = nginx_or_skip("HTTP-over-nginx", TESTS) else {
        return;
    };
    let nginx = Nginx::start(&bin, config);
    for alpn in [Alpn::H2, Alpn::H2H1] {
        let http = http();
        let p = peer(&nginx, alpn.clone());
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let (http, p) = (http.clone(), p.clone());
                tokio::spawn(async move { get_echo(&http, &p).await })
            })
            .collect();
        let mut echoes = Vec::new();
        for t in tasks {
            echoes.push(t.await.expect("request task panicked"));
        }
        let first = echoes[0].clone();
        for e in &echoes {
            assert_eq!(e.version, http::Version::HTTP_2, "{alpn:?}: {e:?}");
            assert_eq!(e.proto, "HTTP/2.0", "{alpn:?}: {e:?}");
            assert_eq!(
                e.conn, first.conn,
                "{alpn:?}: requests spread over nginx connections: {echoes:?}"
            );
        }
        let mut reqs: Vec<u64> = echoes.iter().map(|e| e.reqs).collect();
        reqs.sort_unstable();
        assert_eq!(
            reqs,
            (1..=50).collect::<Vec<_>>(),
            "{alpn:?}: nginx's request numbers on the one connection"
        );
        assert_eq!(
            http.connector().connection_count_for(&p),
            1,
            "{}",
            nginx.logs()
        );
    }
}

#[tokio::test]
async fn h1_keepalive_held_response_and_release() {
    let Some(bin) = nginx_or_skip("HTTP-over-nginx", TESTS) else {
        return;
    };
    let nginx = Nginx::start(&bin, config);
    let http = http();
    let p = peer(&nginx, Alpn::H1);

    let first = get_echo(&http, &p).await;
    assert_eq!(first.version, http::Version::HTTP_11);
    assert_eq!(first.proto, "HTTP/1.1");
    assert_eq!(first.reqs, 1);
    for n in 2..=4 {
        let e = get_echo(&http, &p).await;
        assert_eq!((e.conn, e.reqs), (first.conn, n), "not kept alive: {e:?}");
    }

    // A response held with its body unread keeps its connection: the next request needs
    // another one.
    let held = start(&http, &p, "/").await.unwrap();
    let held_conn = conn_header(&held);
    assert_eq!(held_conn, first.conn);
    let other = get_echo(&http, &p).await;
    assert_ne!(
        other.conn, held_conn,
        "a connection with an unread response was used for another request"
    );
    assert_eq!(other.reqs, 1);
    let held = echo(held).await;
    assert_eq!(held.reqs, 5);

    // Both bodies ended cleanly: both connections are back in the pool.
    let ok = wait_until(STEP, || http.connector().idle_count_for(&p) == 2).await;
    assert!(
        ok,
        "idle_count_for = {}, expected 2",
        http.connector().idle_count_for(&p)
    );
    let e = get_echo(&http, &p).await;
    assert!(
        [first.conn, other.conn].contains(&e.conn),
        "a pooled connection was not reused: {e:?}"
    );
}

#[tokio::test]
async fn h1_large_body_dropped_after_its_first_chunk_is_not_pooled() {
    let Some(bin) = nginx_or_skip("HTTP-over-nginx", TESTS) else {
        return;
    };
    let nginx = Nginx::start(&bin, config);
    let http = http();
    let p = peer(&nginx, Alpn::H1);

    let resp = start(&http, &p, "/big.bin").await.unwrap();
    let dropped_conn = conn_header(&resp);
    let mut body = resp.into_body();
    let frame = tokio::time::timeout(STEP, body.frame())
        .await
        .unwrap()
        .expect("no first frame")
        .unwrap();
    let first = frame.into_data().expect("first frame is data");
    assert!(!first.is_empty() && first.len() < BIG);
    assert_eq!(&first[..], &pattern(first.len())[..]);
    drop(body);

    let gone = wait_until(STEP, || http.connector().connection_count_for(&p) == 0).await;
    assert!(
        gone,
        "connection with {} unread bytes still counted",
        BIG - first.len()
    );
    assert_eq!(http.connector().idle_count_for(&p), 0);

    // Later requests are on a fresh connection and in sync.
    let e1 = get_echo(&http, &p).await;
    assert_ne!(e1.conn, dropped_conn, "the abandoned connection was reused");
    assert_eq!(e1.reqs, 1);
    let e2 = get_echo(&http, &p).await;
    assert_eq!((e2.conn, e2.reqs), (e1.conn, 2));
    // And a full large body still arrives intact.
    let resp = start(&http, &p, "/big.bin").await.unwrap();
    assert_eq!(conn_header(&resp), e1.conn);
    let body = read_all(resp.into_body()).await;
    assert!(
        body.len() == BIG && body == pattern(BIG),
        "static file damaged"
    );
}

/// The configuration itself, checked with the `h2` crate's client (no `upstream_pool`): one
/// HTTP/2 connection carries 50 concurrent requests and nginx reports one `$connection`, and
/// `/big.bin` is the pattern. If this fails, the cases above cannot be trusted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_config_self_check_with_the_h2_client() {
    let Some(bin) = nginx_or_skip("HTTP-over-nginx", TESTS) else {
        return;
    };
    let nginx = Nginx::start(&bin, config);
    let tls = support::client::TlsClient::builder(TestPki::shared().ca_a())
        .alpn(&[b"h2"])
        .build()
        .connect(nginx.addr(), Some("localhost"), None)
        .await
        .unwrap();
    assert_eq!(tls.ssl().selected_alpn_protocol(), Some(&b"h2"[..]));
    let (send, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(conn);
    let fetch = |path: &'static str| {
        let send = send.clone();
        async move {
            let mut send = send.ready().await.unwrap();
            let req = http::Request::get(format!("https://localhost{path}"))
                .body(())
                .unwrap();
            let (resp, _) = send.send_request(req, true).unwrap();
            let (parts, mut body) = resp.await.unwrap().into_parts();
            let mut out = Vec::new();
            while let Some(chunk) = body.data().await {
                let chunk = chunk.unwrap();
                let _ = body.flow_control().release_capacity(chunk.len());
                out.extend_from_slice(&chunk);
            }
            (parts, out)
        }
    };
    // The first request lets the client learn nginx's SETTINGS.
    let (parts, body) = fetch("/").await;
    let conn = parts.headers["x-conn"].to_str().unwrap().to_owned();
    assert!(String::from_utf8_lossy(&body).contains("proto=HTTP/2.0"));
    let tasks: Vec<_> = (0..50).map(|_| tokio::spawn(fetch("/"))).collect();
    let mut reqs = Vec::new();
    for t in tasks {
        let (parts, _) = t.await.unwrap();
        assert_eq!(parts.headers["x-conn"].to_str().unwrap(), conn);
        reqs.push(
            parts.headers["x-conn-requests"]
                .to_str()
                .unwrap()
                .parse::<u64>()
                .unwrap(),
        );
    }
    reqs.sort_unstable();
    assert_eq!(
        reqs,
        (2..=51).collect::<Vec<_>>(),
        "$connection_requests over HTTP/2"
    );
    let (_, body) = fetch("/big.bin").await;
    assert!(body == pattern(BIG), "static file damaged");
}
