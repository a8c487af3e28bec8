//! End to end: client → `examples/reverse_proxy.rs` → TLS upstream (in-process test servers
//! speaking HTTP/1.1 or HTTP/2, and nginx when installed). Clients speak HTTP/1.1 or h2c.
//!
//! Every check is made against what the upstream observed (which connection answered, how
//! many requests each connection carried, how many connections it accepted), and the proxy's
//! `x-upstream-reused` header is checked against that.

mod support;

// The example is compiled into this test so its `serve` can run on the test's runtime;
// `main` and the argument parsing are unused here.
#[allow(dead_code)]
#[path = "../examples/reverse_proxy.rs"]
mod reverse_proxy;

use std::collections::HashMap;
use std::fs;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpStream as StdTcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HeaderMap, HeaderValue};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use openssl::ssl::{Ssl, SslAcceptor, SslContext, SslMethod};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_openssl::SslStream;
use upstream_pool::{Alpn, Connector, ConnectorOptions, Peer};

use reverse_proxy::{ProxyConfig, REUSED_HEADER};
use support::certs::TestPki;
use support::server::{Behaviour, TestServer};
use support::TempDir;

// ---------------------------------------------------------------------------------------------
// Fixtures: the proxy under test, a client, replies.

/// The example proxy serving on a loopback port; stops when dropped.
struct Proxy {
    addr: SocketAddr,
    connector: Connector,
    upstream: Peer,
    task: JoinHandle<()>,
}

impl Proxy {
    async fn start(upstream: Peer) -> Proxy {
        let connector = Connector::new(ConnectorOptions::default()).unwrap();
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config = ProxyConfig::new(connector.clone(), upstream.clone());
        let task = tokio::spawn(reverse_proxy::serve(listener, config));
        Proxy {
            addr,
            connector,
            upstream,
            task,
        }
    }

    /// A proxy in front of a test server presenting `TestPki::shared().server`.
    async fn to(upstream: SocketAddr) -> Proxy {
        Proxy::start(Peer::tls(upstream, "localhost").with_ca(TestPki::shared().ca_a())).await
    }

    async fn client(&self) -> Client {
        Client::connect(self.addr).await
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One keep-alive HTTP/1.1 client connection to the proxy.
struct Client {
    sender: SendRequest<Full<Bytes>>,
    task: JoinHandle<()>,
}

impl Client {
    async fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        let task = tokio::spawn(async move {
            let _ = conn.await;
        });
        Client { sender, task }
    }

    async fn get(&mut self, path: &str) -> Reply {
        self.send(Method::GET, path, Bytes::new()).await
    }

    async fn send(&mut self, method: Method, path: &str, body: Bytes) -> Reply {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "proxied.test")
            .body(Full::new(body))
            .unwrap();
        self.sender.ready().await.unwrap();
        let response = tokio::time::timeout(Duration::from_secs(10), async {
            let response = self.sender.send_request(req).await.unwrap();
            let (head, body) = response.into_parts();
            let body = body.collect().await.unwrap().to_bytes();
            (head, body)
        })
        .await
        .expect("the proxy answers within 10 s");
        let (head, body) = response;
        Reply {
            status: head.status,
            reused: head
                .headers
                .get(REUSED_HEADER)
                .map(|v| v.to_str().unwrap().to_owned()),
            body: String::from_utf8(body.to_vec()).unwrap(),
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Debug)]
struct Reply {
    status: StatusCode,
    /// The `x-upstream-reused` header, if present.
    reused: Option<String>,
    body: String,
}

impl Reply {
    /// `(connection, request number on it)` from an upstream body `conn=<id> req=<n>`.
    #[track_caller]
    fn conn_req(&self) -> (usize, usize) {
        assert_eq!(self.status, StatusCode::OK, "reply: {self:?}");
        let mut conn = None;
        let mut req = None;
        for part in self.body.split_whitespace() {
            if let Some(v) = part.strip_prefix("conn=") {
                conn = v.parse().ok();
            } else if let Some(v) = part.strip_prefix("req=") {
                req = v.parse().ok();
            }
        }
        match (conn, req) {
            (Some(c), Some(r)) => (c, r),
            _ => panic!("not an upstream body: {self:?}"),
        }
    }

    /// The `x-upstream-reused` header as a bool; panics when missing or malformed.
    #[track_caller]
    fn reused(&self) -> bool {
        match self.reused.as_deref() {
            Some("true") => true,
            Some("false") => false,
            other => panic!("bad {REUSED_HEADER} header {other:?} in {self:?}"),
        }
    }
}

/// Checks a run of sequential replies against what the upstream reported in their bodies:
/// each upstream connection's requests are numbered 1, 2, 3... in order (so every exchange
/// completed before the next began), and `x-upstream-reused` is `false` exactly on a
/// connection's first request. Returns the number of distinct upstream connections.
#[track_caller]
fn check_sequence(replies: &[Reply]) -> usize {
    let mut last: HashMap<usize, usize> = HashMap::new();
    for (i, reply) in replies.iter().enumerate() {
        let (conn, req) = reply.conn_req();
        let previous = last.insert(conn, req).unwrap_or(0);
        assert_eq!(
            req,
            previous + 1,
            "reply {i}: upstream connection {conn} skipped or repeated a request: {reply:?}"
        );
        assert_eq!(
            reply.reused(),
            req > 1,
            "reply {i}: {REUSED_HEADER} disagrees with the upstream (request {req} on connection {conn})"
        );
    }
    last.len()
}

// ---------------------------------------------------------------------------------------------
// In-process upstream.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_sequential_requests_use_a_handful_of_upstream_connections() {
    let server = TestServer::start(Behaviour::Http);
    let proxy = Proxy::to(server.addr()).await;

    // Ten client connections, 100 requests each: the upstream pool outlives any client.
    let mut replies = Vec::with_capacity(1000);
    for _ in 0..10 {
        let mut client = proxy.client().await;
        for _ in 0..100 {
            replies.push(client.get("/hello").await);
        }
    }

    let used = check_sequence(&replies);
    let stats = server.stats();
    assert_eq!(
        stats.requests, 1000,
        "the upstream answered every request once"
    );
    assert_eq!(
        stats.accepted, used,
        "every accepted upstream connection answered"
    );
    assert!(
        stats.accepted <= 4,
        "1,000 sequential requests took {} upstream connections",
        stats.accepted
    );
    let fresh = replies.iter().filter(|r| !r.reused()).count();
    assert_eq!(
        fresh, stats.accepted,
        "one `reused: false` per new connection"
    );
    assert_eq!(
        proxy.connector.idle_count_for(&proxy.upstream),
        stats.accepted
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_after_the_upstream_keepalive_timeout_succeeds() {
    let server = TestServer::start(Behaviour::CloseAfter(Duration::from_millis(300)));
    let proxy = Proxy::to(server.addr()).await;
    let mut client = proxy.client().await;

    let first = client.get("/").await;
    let second = client.get("/").await;
    assert_eq!(first.conn_req(), (0, 1));
    assert_eq!(
        second.conn_req(),
        (0, 2),
        "reused within the keep-alive timeout"
    );

    // The upstream closes its idle connection (close_notify + FIN).
    server.wait_for(|s| s.conns[0].closed).await;
    tokio::time::sleep(Duration::from_millis(50)).await;

    let third = client.get("/").await;
    let fourth = client.get("/").await;
    assert_eq!(third.conn_req(), (1, 1), "answered on a new connection");
    assert_eq!(fourth.conn_req(), (1, 2));
    check_sequence(&[first, second, third, fourth]);
    let stats = server.stats();
    assert_eq!(stats.accepted, 2);
    assert_eq!(stats.requests, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_closing_after_every_response_still_works() {
    let server = TestServer::start(Behaviour::HttpClose);
    let proxy = Proxy::to(server.addr()).await;
    let mut client = proxy.client().await;

    for i in 0..50 {
        let reply = client.get("/").await;
        assert_eq!(
            reply.conn_req(),
            (i, 1),
            "a new upstream connection per request"
        );
        assert!(!reply.reused(), "reply {i}: {reply:?}");
    }
    let stats = server.stats();
    assert_eq!(stats.accepted, 50);
    assert_eq!(stats.requests, 50);
    assert_eq!(
        proxy.connector.idle_count_for(&proxy.upstream),
        0,
        "a connection the upstream asked to close is never pooled"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_bytes_after_a_response_keep_the_connection_out_of_the_pool() {
    let server = TestServer::start(Behaviour::HttpThenStray);
    let proxy = Proxy::to(server.addr()).await;
    let mut client = proxy.client().await;

    for i in 0..5 {
        let reply = client.get("/").await;
        assert_eq!(reply.conn_req(), (i, 1));
        assert!(!reply.reused());
        // The stray bytes are a separate write that can arrive after the response, and even
        // after the connection was released: nothing can see them before they arrive. Wait
        // until they have (the pool's reaper or checkout then drops the connection) so the
        // next request's outcome does not depend on that race.
        let gone = support::wait_until(Duration::from_secs(2), || {
            proxy.connector.idle_count_for(&proxy.upstream) == 0
        })
        .await;
        assert!(gone, "a connection with unread bytes stayed in the pool");
    }
    assert_eq!(server.stats().accepted, 5);
}

// ---------------------------------------------------------------------------------------------
// A scripted upstream, for what the test servers in `support` do not do.

/// What [`ScriptedServer`] does on each connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Script {
    /// Answer the first request (`conn=<id> req=1`); read the second, then close
    /// (close_notify + FIN) without answering. The race in which an idle pooled connection
    /// passes the pool's liveness check and the upstream closes it while the request is on
    /// its way.
    CloseOnSecond,
    /// Like `CloseOnSecond`, but reset the TCP connection instead of closing it.
    ResetOnSecond,
    /// Answer every request with `Connection: close` but keep the connection open (and
    /// answering) for a while, as a lingering server may: only the header says "do not reuse".
    CloseHeaderThenLinger,
    /// Answer with `HTTP/1.0 200 OK`, with `Connection: keep-alive` or without it (then the
    /// connection must not be reused, though the server lingers as above).
    Http10 { keep_alive: bool },
    /// Answer every request with the response and stray bytes in the same write (one TLS
    /// record), so the stray bytes reach hyper's read buffer rather than staying in the
    /// socket where the pool would see them.
    StrayInSameRecord,
    /// Answer every request with its own head (request line and headers) as the body.
    EchoHead,
}

impl Script {
    /// Whether the response tells the client not to reuse the connection.
    fn says_close(self) -> bool {
        matches!(
            self,
            Script::CloseHeaderThenLinger | Script::Http10 { keep_alive: false }
        )
    }

    fn response_head(self, len: usize) -> String {
        let (version, connection) = match self {
            Script::CloseHeaderThenLinger => ("HTTP/1.1", "Connection: close\r\n"),
            Script::Http10 { keep_alive: true } => ("HTTP/1.0", "Connection: keep-alive\r\n"),
            Script::Http10 { keep_alive: false } => ("HTTP/1.0", ""),
            _ => ("HTTP/1.1", ""),
        };
        format!("{version} 200 OK\r\nContent-Length: {len}\r\n{connection}\r\n")
    }
}

/// A TLS HTTP/1.1 upstream following a [`Script`], counting what it saw.
struct ScriptedServer {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    /// Requests read, answered or not.
    received: Arc<AtomicUsize>,
    /// Requests that arrived on a connection after it had answered `Connection: close`.
    after_close: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

#[derive(Clone)]
struct Counters {
    received: Arc<AtomicUsize>,
    after_close: Arc<AtomicUsize>,
}

impl ScriptedServer {
    async fn start(script: Script) -> ScriptedServer {
        let pki = TestPki::shared();
        let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server()).unwrap();
        b.set_certificate(&pki.server.cert).unwrap();
        for c in &pki.server.intermediates {
            b.add_extra_chain_cert(c.clone()).unwrap();
        }
        b.set_private_key(&pki.server.key).unwrap();
        let ctx = b.build().into_context();
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counters = Counters {
            received: Arc::new(AtomicUsize::new(0)),
            after_close: Arc::new(AtomicUsize::new(0)),
        };
        let (a, c) = (accepted.clone(), counters.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let id = a.fetch_add(1, Ordering::SeqCst);
                let (ctx, c) = (ctx.clone(), c.clone());
                tokio::spawn(async move {
                    let _ = scripted_conn(ctx, stream, id, script, c).await;
                });
            }
        });
        ScriptedServer {
            addr,
            accepted,
            received: counters.received,
            after_close: counters.after_close,
            task,
        }
    }
}

impl Drop for ScriptedServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn scripted_conn(
    ctx: SslContext,
    stream: TcpStream,
    id: usize,
    script: Script,
    counters: Counters,
) -> std::io::Result<()> {
    let mut tls = SslStream::new(Ssl::new(&ctx)?, stream)?;
    std::pin::Pin::new(&mut tls)
        .accept()
        .await
        .map_err(std::io::Error::other)?;
    let mut buf = Vec::new();
    for n in 1.. {
        let request = if script.says_close() {
            match tokio::time::timeout(Duration::from_secs(1), read_request(&mut tls, &mut buf))
                .await
            {
                Ok(r) => r?,
                Err(_) => None,
            }
        } else {
            read_request(&mut tls, &mut buf).await?
        };
        let Some(head) = request else {
            let _ = tls.shutdown().await;
            return Ok(());
        };
        counters.received.fetch_add(1, Ordering::SeqCst);
        match script {
            Script::CloseOnSecond if n > 1 => {
                tls.shutdown().await?;
                return Ok(());
            }
            Script::ResetOnSecond if n > 1 => {
                tls.get_ref().set_zero_linger()?;
                return Ok(());
            }
            _ if script.says_close() && n > 1 => {
                counters.after_close.fetch_add(1, Ordering::SeqCst);
            }
            _ => {}
        }
        let body = if script == Script::EchoHead {
            head
        } else {
            format!("conn={id} req={n}\n")
        };
        let mut response = script.response_head(body.len()) + &body;
        if script == Script::StrayInSameRecord {
            response.push_str("STRAY");
        }
        tls.write_all(response.as_bytes()).await?;
        tls.flush().await?;
    }
    Ok(())
}

/// Reads one request head plus its `Content-Length` body and returns the head; `None` on
/// EOF before one starts.
async fn read_request(
    stream: &mut SslStream<TcpStream>,
    buf: &mut Vec<u8>,
) -> std::io::Result<Option<String>> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let len = head
                .to_ascii_lowercase()
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse::<usize>().unwrap());
            while buf.len() < end + 4 + len {
                let n = stream.read(&mut chunk).await?;
                if n == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            buf.drain(..end + 4 + len);
            return Ok(Some(head));
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn not_pooled_after(script: Script) {
    let server = ScriptedServer::start(script).await;
    let proxy = Proxy::to(server.addr).await;
    let mut client = proxy.client().await;
    for i in 0..5 {
        let reply = client.get("/").await;
        assert_eq!(
            reply.conn_req(),
            (i, 1),
            "a new upstream connection per request"
        );
        assert!(!reply.reused());
    }
    assert_eq!(server.accepted.load(Ordering::SeqCst), 5);
    assert_eq!(
        server.after_close.load(Ordering::SeqCst),
        0,
        "no request was sent on a connection after it said close ({script:?})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_close_header_keeps_the_connection_out_of_the_pool() {
    not_pooled_after(Script::CloseHeaderThenLinger).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http10_response_without_keep_alive_keeps_the_connection_out_of_the_pool() {
    not_pooled_after(Script::Http10 { keep_alive: false }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http10_response_with_keep_alive_is_not_pooled_either() {
    // `upstream_pool::http` keeps only HTTP/1.1 exchanges alive (src/http/h1/mod.rs), a
    // conservative reading of RFC 9112 §9.3 for a 1.0 server that may not mean it.
    not_pooled_after(Script::Http10 { keep_alive: true }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stray_bytes_in_the_response_record_keep_the_connection_out_of_the_pool() {
    let server = ScriptedServer::start(Script::StrayInSameRecord).await;
    let proxy = Proxy::to(server.addr).await;
    let mut client = proxy.client().await;
    for i in 0..5 {
        let reply = client.get("/").await;
        assert_eq!(
            reply.conn_req(),
            (i, 1),
            "a new upstream connection per request"
        );
        assert!(!reply.reused());
    }
    assert_eq!(server.accepted.load(Ordering::SeqCst), 5);
    assert_eq!(server.received.load(Ordering::SeqCst), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_are_not_forwarded_and_the_client_is_appended_to_x_forwarded_for() {
    let server = ScriptedServer::start(Script::EchoHead).await;
    let proxy = Proxy::to(server.addr).await;
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    let task = tokio::spawn(conn);
    let req = Request::builder()
        .uri("/path?q=1")
        .header("host", "proxied.test")
        .header("connection", "x-private, keep-alive")
        .header("x-private", "only for the proxy")
        .header("keep-alive", "timeout=5")
        .header("te", "deflate")
        .header("x-forwarded-for", "192.0.2.7")
        .header("x-end-to-end", "kept")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = sender.send_request(req).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let seen = response.into_body().collect().await.unwrap().to_bytes();
    let seen = String::from_utf8_lossy(&seen).to_ascii_lowercase();
    task.abort();

    let mut lines = seen.lines();
    assert_eq!(lines.next(), Some("get /path?q=1 http/1.1"), "{seen}");
    let headers: Vec<(&str, &str)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim(), v.trim()))
        .collect();
    let get = |name: &str| -> Vec<&str> {
        headers
            .iter()
            .filter(|(k, _)| *k == name)
            .map(|(_, v)| *v)
            .collect()
    };
    for hop in ["connection", "x-private", "keep-alive", "te"] {
        assert!(get(hop).is_empty(), "{hop} was forwarded:\n{seen}");
    }
    assert_eq!(get("host"), ["proxied.test"], "{seen}");
    assert_eq!(get("x-end-to-end"), ["kept"], "{seen}");
    assert_eq!(get("x-forwarded-for"), ["192.0.2.7, 127.0.0.1"], "{seen}");
}

// ---------------------------------------------------------------------------------------------
// Retry on a reused connection that breaks before the response.

async fn retried_on_a_fresh_connection(script: Script) {
    let server = ScriptedServer::start(script).await;
    let proxy = Proxy::to(server.addr).await;
    let mut client = proxy.client().await;

    let first = client.get("/").await;
    assert_eq!(first.conn_req(), (0, 1));
    assert!(!first.reused());
    assert_eq!(proxy.connector.idle_count_for(&proxy.upstream), 1);

    // Goes to the pooled connection, which breaks; the proxy sends it again on a new one.
    let second = client.get("/").await;
    assert_eq!(second.conn_req(), (1, 1), "answered by a second connection");
    assert!(!second.reused(), "the retry ran on a fresh connection");
    assert_eq!(server.accepted.load(Ordering::SeqCst), 2);
    assert_eq!(
        server.received.load(Ordering::SeqCst),
        3,
        "the broken connection did receive the request before it failed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_on_a_pooled_connection_closed_by_the_upstream_is_retried() {
    retried_on_a_fresh_connection(Script::CloseOnSecond).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_on_a_pooled_connection_reset_by_the_upstream_is_retried() {
    retried_on_a_fresh_connection(Script::ResetOnSecond).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_already_written_to_a_broken_pooled_connection_is_not_retried() {
    let server = ScriptedServer::start(Script::CloseOnSecond).await;
    let proxy = Proxy::to(server.addr).await;
    let mut client = proxy.client().await;

    assert_eq!(client.get("/").await.conn_req(), (0, 1));
    let post = client
        .send(Method::POST, "/orders", Bytes::from_static(b"{\"n\":1}"))
        .await;
    assert_eq!(post.status, StatusCode::BAD_GATEWAY, "{post:?}");
    assert!(
        post.body.contains("reused"),
        "the error names the reused connection: {post:?}"
    );
    assert_eq!(
        server.accepted.load(Ordering::SeqCst),
        1,
        "a POST the upstream may have seen is not sent again"
    );
    // The broken connection was not pooled again: the next request dials.
    let next = client.get("/").await;
    assert_eq!(next.conn_req(), (1, 1));
    assert!(!next.reused());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_on_a_fresh_connection_is_not_retried() {
    // The upstream accepts TCP and never answers the TLS handshake; a refused port would do
    // as well, but this shows the attempt count on the server side.
    let server = TestServer::start(Behaviour::CloseAfterClientHello);
    let proxy = Proxy::to(server.addr()).await;
    let mut client = proxy.client().await;
    let reply = client.get("/").await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{reply:?}");
    assert_eq!(reply.reused, None);
    assert_eq!(server.stats().accepted, 1, "one dial, no retry");
}

// ---------------------------------------------------------------------------------------------
// nginx as the upstream.

/// nginx serving `conn=$connection req=$connection_requests` over TLS on a loopback port, in
/// the foreground (`daemon off; master_process off;`), killed by PID when dropped.
struct Nginx {
    child: Child,
    /// The HTTP/1.1 TLS listener.
    addr: SocketAddr,
    /// The `ssl http2` listener (HTTP/2 by ALPN).
    h2_addr: SocketAddr,
    dir: TempDir,
}

impl Nginx {
    /// `None` when nginx is not installed; panics instead when `UPSTREAM_POOL_REQUIRE_NGINX=1`
    /// (as CI sets). The binary is `$UPSTREAM_POOL_NGINX` if set, else `nginx` on `$PATH`, then
    /// `/usr/sbin/nginx` (Debian's location, often not on a user's `PATH`), as in
    /// `tests/nginx.rs`.
    fn start(keepalive_timeout: &str) -> Option<Nginx> {
        let candidates: Vec<PathBuf> = match std::env::var_os("UPSTREAM_POOL_NGINX") {
            Some(bin) => vec![PathBuf::from(bin)],
            None => std::env::var_os("PATH")
                .map(|p| {
                    std::env::split_paths(&p)
                        .map(|dir| dir.join("nginx"))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
                .into_iter()
                .chain(["/usr/sbin/nginx", "/usr/local/sbin/nginx"].map(PathBuf::from))
                .collect(),
        };
        let Some(bin) = candidates.into_iter().find(|c| c.is_file()) else {
            assert!(
                std::env::var("UPSTREAM_POOL_REQUIRE_NGINX").as_deref() != Ok("1"),
                "nginx not installed but UPSTREAM_POOL_REQUIRE_NGINX=1: install it (apt-get install nginx)"
            );
            // The real stderr: the test harness captures `eprintln!`.
            let _ = writeln!(
                std::io::stderr(),
                "\n!!!!!! nginx not installed: the reverse-proxy-to-nginx tests are skipped \
                 (apt-get install nginx, or set UPSTREAM_POOL_REQUIRE_NGINX=1 to fail instead) !!!!!!\n"
            );
            return None;
        };
        let dir = TempDir::new("reverse-proxy-nginx").unwrap();
        let pem = TestPki::shared()
            .server
            .write_pem(dir.path(), "server")
            .unwrap();
        // Static files for `/big/<n>`: the pattern the streaming checks expect.
        for len in [65536, TEN_MIB] {
            let mut data = Vec::with_capacity(len);
            let mut at = 0;
            while at < len {
                let n = FRAME.min(len - at);
                data.extend_from_slice(&pattern(at, n));
                at += n;
            }
            fs::write(dir.join(&format!("big-{len}")), data).unwrap();
        }
        let free_port = || {
            std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        };
        let mut last_log = String::new();
        for attempt in 0..5 {
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
            let h2_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
            let conf = format!(
                "daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_timeout {keepalive_timeout};
    keepalive_requests 100000;
    server {{
        listen {addr} ssl backlog=1024;
        ssl_certificate {chain};
        ssl_certificate_key {key};
        location / {{ return 200 \"conn=$connection req=$connection_requests\\n\"; }}
        location ~ ^/big/([0-9]+)$ {{ alias {dir}/big-$1; }}
    }}
    server {{
        listen {h2_addr} ssl http2 backlog=1024;
        ssl_certificate {chain};
        ssl_certificate_key {key};
        location / {{ return 200 \"conn=$connection req=$connection_requests\\n\"; }}
        location ~ ^/big/([0-9]+)$ {{ alias {dir}/big-$1; }}
    }}
}}
",
                dir = dir.path().display(),
                chain = pem.chain.display(),
                key = pem.key.display(),
            );
            let conf_path = dir.join("nginx.conf");
            fs::write(&conf_path, conf).unwrap();
            let log_path = dir.join(&format!("stderr-{attempt}.log"));
            let log = fs::File::create(&log_path).unwrap();
            let mut child = Command::new(&bin)
                .arg("-p")
                .arg(dir.path())
                .arg("-c")
                .arg(&conf_path)
                .arg("-e")
                .arg(dir.join("error.log"))
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("spawn nginx");
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if child.try_wait().unwrap().is_some() {
                    break;
                }
                if StdTcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                    return Some(Nginx {
                        child,
                        addr,
                        h2_addr,
                        dir,
                    });
                }
                if Instant::now() >= deadline {
                    let _ = child.kill();
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.wait();
            last_log = fs::read_to_string(&log_path).unwrap_or_default()
                + &fs::read_to_string(dir.join("error.log")).unwrap_or_default();
            if !last_log.contains("in use") {
                break;
            }
        }
        panic!("nginx did not start\n--- log ---\n{last_log}");
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_nginx_upstream_sequential_requests_reuse_connections() {
    let Some(nginx) = Nginx::start("75s") else {
        return;
    };
    let proxy = Proxy::to(nginx.addr).await;
    let mut replies = Vec::with_capacity(1000);
    for _ in 0..4 {
        let mut client = proxy.client().await;
        for _ in 0..250 {
            replies.push(client.get("/").await);
        }
    }
    let used = check_sequence(&replies);
    assert!(
        used <= 4,
        "1,000 sequential requests took {used} nginx connections\n{}",
        nginx.log()
    );
    assert_eq!(
        replies.iter().filter(|r| !r.reused()).count(),
        used,
        "one `reused: false` per new connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_nginx_upstream_request_after_keepalive_timeout_succeeds() {
    let Some(nginx) = Nginx::start("1s") else {
        return;
    };
    let proxy = Proxy::to(nginx.addr).await;
    let mut client = proxy.client().await;
    let first = client.get("/").await;
    let second = client.get("/").await;
    assert_eq!(second.conn_req().0, first.conn_req().0);
    assert_eq!(second.conn_req().1, 2);

    // nginx closes the idle connection after 1 s.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let third = client.get("/").await;
    assert_ne!(
        third.conn_req().0,
        first.conn_req().0,
        "a new nginx connection"
    );
    check_sequence(&[first, second, third]);
}

// ---------------------------------------------------------------------------------------------
// Streaming and HTTP/2: an in-process hyper upstream speaking HTTP/1.1 and/or HTTP/2.

/// Which protocols [`HyperUpstream`] offers by ALPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Offer {
    H1,
    H2,
}

/// What [`HyperUpstream`] observed.
#[derive(Debug, Default)]
struct UpstreamSeen {
    /// TLS connections accepted, by protocol.
    h1_conns: AtomicUsize,
    h2_conns: AtomicUsize,
    /// Requests received.
    requests: AtomicUsize,
    /// The most requests in flight at once on one connection.
    max_in_flight: AtomicUsize,
    /// Opened by the test to let `/gate` send the rest of its body.
    gate: tokio::sync::Notify,
    /// Signalled by `/upload` when the first request body bytes arrived.
    upload_started: tokio::sync::Notify,
    /// Headers of every `/grpc` request.
    grpc_headers: parking_lot::Mutex<Vec<HeaderMap>>,
}

/// A TLS upstream on hyper's server: `/` answers `conn=<id> req=<n> proto=<h1|h2>`,
/// `/slow` the same after 100 ms, `/big/<n>` streams `n` pattern bytes in 64 KiB frames,
/// `/gate` sends one frame and the rest only after `seen.gate` is notified, `/upload` reads a
/// streamed request body and answers `bytes=<n> sha=<hex>`, `/grpc` answers like a gRPC
/// server (`application/grpc`, the request message echoed, `grpc-status` in trailers).
struct HyperUpstream {
    addr: SocketAddr,
    seen: Arc<UpstreamSeen>,
    task: JoinHandle<()>,
}

/// A frame-by-frame body fed from a channel; `_guard` ends the request's "in flight" when
/// the body is done or dropped.
struct ChannelBody {
    rx: tokio::sync::mpsc::Receiver<Frame<Bytes>>,
    _guard: Option<InFlightGuard>,
}

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.rx.poll_recv(cx).map(|frame| frame.map(Ok))
    }
}

/// A body of frames sent into the returned sender.
fn channel_body(
    guard: Option<InFlightGuard>,
) -> (tokio::sync::mpsc::Sender<Frame<Bytes>>, ChannelBody) {
    // Room for two frames: a producer faster than the consumer waits (backpressure).
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    (tx, ChannelBody { rx, _guard: guard })
}

struct InFlightGuard(Arc<AtomicUsize>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// `len` bytes of a pattern that no shifted copy of itself matches, starting at `offset`.
fn pattern(offset: usize, len: usize) -> Bytes {
    (offset..offset + len)
        .map(|i| (i % 251) as u8 ^ (i / 251 % 256) as u8)
        .collect::<Vec<u8>>()
        .into()
}

const FRAME: usize = 64 * 1024;

fn sha_hex(hasher: openssl::sha::Sha256) -> String {
    hasher.finish().iter().map(|b| format!("{b:02x}")).collect()
}

fn pattern_sha(len: usize) -> String {
    let mut hasher = openssl::sha::Sha256::new();
    let mut at = 0;
    while at < len {
        let n = FRAME.min(len - at);
        hasher.update(&pattern(at, n));
        at += n;
    }
    sha_hex(hasher)
}

impl HyperUpstream {
    async fn start(offer: Offer) -> HyperUpstream {
        let pki = TestPki::shared();
        let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server()).unwrap();
        b.set_certificate(&pki.server.cert).unwrap();
        for c in &pki.server.intermediates {
            b.add_extra_chain_cert(c.clone()).unwrap();
        }
        b.set_private_key(&pki.server.key).unwrap();
        // ALPN wire format: a length byte before each protocol.
        let offered: &'static [u8] = match offer {
            Offer::H1 => b"\x08http/1.1",
            Offer::H2 => b"\x02h2",
        };
        b.set_alpn_select_callback(move |_, client| {
            openssl::ssl::select_next_proto(offered, client).ok_or(openssl::ssl::AlpnError::NOACK)
        });
        let ctx = b.build().into_context();
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(UpstreamSeen::default());
        let task = tokio::spawn(upstream_accept(listener, ctx, Arc::clone(&seen)));
        HyperUpstream { addr, seen, task }
    }

    fn peer(&self, alpn: Alpn) -> Peer {
        Peer::tls(self.addr, "localhost")
            .with_ca(TestPki::shared().ca_a())
            .with_alpn(alpn)
    }

    fn conns(&self) -> (usize, usize) {
        (
            self.seen.h1_conns.load(Ordering::SeqCst),
            self.seen.h2_conns.load(Ordering::SeqCst),
        )
    }
}

impl Drop for HyperUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn upstream_accept(listener: TcpListener, ctx: SslContext, seen: Arc<UpstreamSeen>) {
    let mut next_id = 0;
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let id = next_id;
        next_id += 1;
        let (ctx, seen) = (ctx.clone(), Arc::clone(&seen));
        tokio::spawn(async move {
            let mut tls = SslStream::new(Ssl::new(&ctx).unwrap(), tcp).unwrap();
            if std::pin::Pin::new(&mut tls).accept().await.is_err() {
                return;
            }
            let h2 = tls.ssl().selected_alpn_protocol() == Some(b"h2".as_slice());
            let counter = if h2 { &seen.h2_conns } else { &seen.h1_conns };
            counter.fetch_add(1, Ordering::SeqCst);
            let in_flight = Arc::new(AtomicUsize::new(0));
            let nth = Arc::new(AtomicUsize::new(0));
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let seen = Arc::clone(&seen);
                let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                seen.max_in_flight.fetch_max(now, Ordering::SeqCst);
                seen.requests.fetch_add(1, Ordering::SeqCst);
                let guard = InFlightGuard(Arc::clone(&in_flight));
                let n = nth.fetch_add(1, Ordering::SeqCst) + 1;
                async move {
                    Ok::<_, std::convert::Infallible>(
                        upstream_route(req, seen, guard, id, n, h2).await,
                    )
                }
            });
            let io = TokioIo::new(tls);
            if h2 {
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(io, service)
                    .await;
            } else {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await;
            }
        });
    }
}

async fn upstream_route(
    req: Request<Incoming>,
    seen: Arc<UpstreamSeen>,
    guard: InFlightGuard,
    id: usize,
    n: usize,
    h2: bool,
) -> hyper::Response<ChannelBody> {
    let (tx, body) = channel_body(Some(guard));
    let mut response = hyper::Response::new(body);
    let path = req.uri().path().to_owned();
    let proto = if h2 { "h2" } else { "h1" };
    match path.as_str() {
        "/" | "/slow" => {
            if path == "/slow" {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let text = format!("conn={id} req={n} proto={proto}\n");
            let _ = tx.try_send(Frame::data(Bytes::from(text)));
        }
        "/gate" => {
            tokio::spawn(async move {
                let _ = tx.send(Frame::data(pattern(0, FRAME))).await;
                seen.gate.notified().await;
                let _ = tx.send(Frame::data(pattern(FRAME, FRAME))).await;
            });
        }
        "/upload" => {
            let mut body = req.into_body();
            let mut hasher = openssl::sha::Sha256::new();
            let mut bytes = 0;
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame else { break };
                if let Ok(data) = frame.into_data() {
                    if bytes == 0 && !data.is_empty() {
                        seen.upload_started.notify_one();
                    }
                    bytes += data.len();
                    hasher.update(&data);
                }
            }
            let text = format!("bytes={bytes} sha={}", sha_hex(hasher));
            let _ = tx.try_send(Frame::data(Bytes::from(text)));
        }
        "/grpc" => {
            seen.grpc_headers.lock().push(req.headers().clone());
            let message = req.into_body().collect().await.unwrap().to_bytes();
            response
                .headers_mut()
                .insert("content-type", HeaderValue::from_static("application/grpc"));
            tokio::spawn(async move {
                let _ = tx.send(Frame::data(message)).await;
                let mut trailers = HeaderMap::new();
                trailers.insert("grpc-status", HeaderValue::from_static("0"));
                trailers.insert("grpc-message", HeaderValue::from_static("echoed"));
                let _ = tx.send(Frame::trailers(trailers)).await;
            });
        }
        big if big.starts_with("/big/") => {
            let len: usize = big["/big/".len()..].parse().unwrap();
            response
                .headers_mut()
                .insert("content-length", HeaderValue::from(len));
            tokio::spawn(async move {
                let mut at = 0;
                while at < len {
                    let n = FRAME.min(len - at);
                    if tx.send(Frame::data(pattern(at, n))).await.is_err() {
                        return;
                    }
                    at += n;
                }
            });
        }
        _ => *response.status_mut() = StatusCode::NOT_FOUND,
    }
    response
}

/// A client connection to the proxy speaking HTTP/2 without TLS (prior knowledge).
async fn h2c_client(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<ChannelBody> {
    let stream = TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    sender
}

/// A client connection to the proxy speaking HTTP/1.1, with streamed request bodies.
async fn h1_stream_client(
    addr: SocketAddr,
) -> hyper::client::conn::http1::SendRequest<ChannelBody> {
    let stream = TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

fn empty_body() -> ChannelBody {
    channel_body(None).1
}

/// Reads `body` to its end: bytes, SHA-256 and the trailers, if any.
async fn drain(mut body: Incoming) -> (usize, String, Option<HeaderMap>) {
    let mut hasher = openssl::sha::Sha256::new();
    let (mut bytes, mut trailers) = (0, None);
    while let Some(frame) = body.frame().await {
        let frame = frame.expect("the body arrives intact");
        match frame.into_data() {
            Ok(data) => {
                bytes += data.len();
                hasher.update(&data);
            }
            Err(frame) => trailers = frame.into_trailers().ok(),
        }
    }
    (bytes, sha_hex(hasher), trailers)
}

fn body_field<'a>(body: &'a str, name: &str) -> Option<&'a str> {
    body.split_whitespace()
        .find_map(|part| part.strip_prefix(name)?.strip_prefix('='))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_upstream_serves_concurrent_requests_on_one_connection() {
    let upstream = HyperUpstream::start(Offer::H2).await;
    let proxy = Proxy::start(upstream.peer(Alpn::H2)).await;
    // 50 requests at once over one h2c client connection, each held 100 ms upstream.
    let client = h2c_client(proxy.addr).await;
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let mut client = client.clone();
        tasks.push(tokio::spawn(async move {
            let req = Request::builder()
                .uri(format!("http://{}/slow", "proxied.test"))
                .body(empty_body())
                .unwrap();
            let response = client.send_request(req).await.unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            let reused = response.headers()[REUSED_HEADER]
                .to_str()
                .unwrap()
                .to_owned();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            (reused, String::from_utf8(body.to_vec()).unwrap())
        }));
    }
    let started = Instant::now();
    let mut bodies = Vec::new();
    for task in tasks {
        bodies.push(task.await.unwrap());
    }
    let took = started.elapsed();
    for (reused, body) in &bodies {
        assert_eq!(body_field(body, "proto"), Some("h2"), "{body}");
        assert_eq!(
            body_field(body, "conn"),
            Some("0"),
            "one upstream connection: {body}"
        );
        assert!(reused == "true" || reused == "false", "{reused}");
    }
    assert_eq!(
        upstream.conns(),
        (0, 1),
        "one HTTP/2 connection, no HTTP/1.1"
    );
    let peak = upstream.seen.max_in_flight.load(Ordering::SeqCst);
    assert!(
        peak >= 10,
        "requests were not multiplexed: at most {peak} in flight"
    );
    assert!(
        took < Duration::from_secs(3),
        "50 requests of 100 ms took {took:?}: not concurrent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_reaches_the_client_while_the_upstream_is_still_sending() {
    for (offer, alpn) in [(Offer::H1, Alpn::H1), (Offer::H2, Alpn::H2)] {
        let upstream = HyperUpstream::start(offer).await;
        let proxy = Proxy::start(upstream.peer(alpn)).await;
        let mut client = h1_stream_client(proxy.addr).await;
        let req = Request::builder()
            .uri("/gate")
            .header("host", "proxied.test")
            .body(empty_body())
            .unwrap();
        let response = tokio::time::timeout(Duration::from_secs(5), client.send_request(req))
            .await
            .expect("the response head arrives before the body is complete")
            .unwrap();
        let mut body = response.into_body();
        // The upstream holds the second frame back until the first reached the client: a
        // proxy that buffered the body would never deliver it.
        let mut got = 0;
        while got < FRAME {
            let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
                .await
                .unwrap_or_else(|_| panic!("{offer:?}: the first frame did not stream through"))
                .unwrap()
                .unwrap();
            got += frame.into_data().map_or(0, |d| d.len());
        }
        upstream.seen.gate.notify_one();
        let (rest, _, _) = drain(body).await;
        assert_eq!(got + rest, 2 * FRAME, "{offer:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_reaches_the_upstream_while_the_client_is_still_sending() {
    for (offer, alpn) in [(Offer::H1, Alpn::H1), (Offer::H2, Alpn::H2)] {
        let upstream = HyperUpstream::start(offer).await;
        let proxy = Proxy::start(upstream.peer(alpn)).await;
        let mut client = h1_stream_client(proxy.addr).await;
        let (tx, body) = channel_body(None);
        let req = Request::builder()
            .method(Method::POST)
            .uri("/upload")
            .header("host", "proxied.test")
            .body(body)
            .unwrap();
        let response = tokio::spawn(async move { client.send_request(req).await });
        tx.send(Frame::data(pattern(0, FRAME))).await.unwrap();
        // The rest is sent only once the upstream has the first frame.
        tokio::time::timeout(
            Duration::from_secs(5),
            upstream.seen.upload_started.notified(),
        )
        .await
        .unwrap_or_else(|_| panic!("{offer:?}: the request body was not streamed"));
        tx.send(Frame::data(pattern(FRAME, FRAME))).await.unwrap();
        drop(tx);
        let response = response.await.unwrap().unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let text = response.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8_lossy(&text).into_owned();
        assert_eq!(
            body_field(&text, "bytes"),
            Some(&*(2 * FRAME).to_string()),
            "{text}"
        );
        assert_eq!(
            body_field(&text, "sha"),
            Some(&*pattern_sha(2 * FRAME)),
            "{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_style_http2_upstream_trailers_reach_an_http2_client() {
    let upstream = HyperUpstream::start(Offer::H2).await;
    let proxy = Proxy::start(upstream.peer(Alpn::H2)).await;
    let mut client = h2c_client(proxy.addr).await;
    // A gRPC message: compressed flag, 4-byte length, payload.
    let payload = b"\x0a\x05hello";
    let mut message = vec![0u8];
    message.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    message.extend_from_slice(payload);
    for _ in 0..3 {
        let (tx, body) = channel_body(None);
        tx.send(Frame::data(Bytes::from(message.clone())))
            .await
            .unwrap();
        drop(tx);
        let req = Request::builder()
            .method(Method::POST)
            .uri("http://proxied.test/grpc")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(body)
            .unwrap();
        let response = client.send_request(req).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["content-type"], "application/grpc");
        let (bytes, sha, trailers) = drain(response.into_body()).await;
        assert_eq!(bytes, message.len());
        let mut expected = openssl::sha::Sha256::new();
        expected.update(&message);
        assert_eq!(sha, sha_hex(expected), "the message came back intact");
        let trailers = trailers.expect("the upstream's trailers reach the client");
        assert_eq!(trailers["grpc-status"], "0");
        assert_eq!(trailers["grpc-message"], "echoed");
    }
    let seen = upstream.seen.grpc_headers.lock().clone();
    assert_eq!(seen.len(), 3);
    for headers in seen {
        assert_eq!(headers["content-type"], "application/grpc");
        assert_eq!(headers["te"], "trailers", "TE: trailers is forwarded");
    }
    assert_eq!(upstream.conns(), (0, 1));
}

// ---------------------------------------------------------------------------------------------
// The example as its own process: 10 MiB each way, and its memory.

/// `target/<profile>/examples/reverse_proxy`, next to this test's own binary (`cargo test`
/// builds the examples); built with `cargo build --example` when missing.
fn example_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/reverse_proxy-<hash>
    let profile_dir = exe.parent().and_then(|deps| deps.parent()).unwrap();
    let bin = profile_dir.join("examples").join("reverse_proxy");
    if !bin.is_file() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "--example", "reverse_proxy"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("run cargo build --example reverse_proxy");
        assert!(
            status.success(),
            "cargo build --example reverse_proxy failed"
        );
    }
    assert!(bin.is_file(), "{} missing", bin.display());
    bin
}

/// The example process, killed when dropped.
struct ExampleProcess {
    child: Child,
    addr: SocketAddr,
    /// What it wrote to stderr after its first line (read by a thread, so that the pipe
    /// never fills or closes under it).
    log: Arc<parking_lot::Mutex<String>>,
}

impl ExampleProcess {
    fn start(upstream: SocketAddr, alpn: &str, ca: &std::path::Path) -> ExampleProcess {
        let mut child = Command::new(example_binary())
            .args(["--listen", "127.0.0.1:0", "--upstream"])
            .arg(upstream.to_string())
            .args(["--sni", "localhost", "--alpn", alpn, "--ca"])
            .arg(ca)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the example");
        // "reverse_proxy: listening on http://127.0.0.1:PORT -> ..."
        let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        std::io::BufRead::read_line(&mut stderr, &mut line).unwrap();
        let log = Arc::new(parking_lot::Mutex::new(String::new()));
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in std::io::BufRead::lines(stderr).map_while(Result::ok) {
                let mut log = sink.lock();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let addr = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("http://"))
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no listening address in {line:?}"));
        ExampleProcess { child, addr, log }
    }

    /// `VmRSS` and `VmHWM` (peak) of the process, in KiB.
    fn memory_kib(&self) -> (u64, u64) {
        let status = fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {name} in /proc status"))
        };
        (field("VmRSS:"), field("VmHWM:"))
    }
}

impl Drop for ExampleProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const TEN_MIB: usize = 10 * 1024 * 1024;

/// Downloads and uploads 10 MiB through `proxy` and checks that both arrived intact and that
/// the proxy's peak RSS grew by less than half the body.
async fn ten_mib_each_way(proxy: &ExampleProcess, download_path: &str, upload: bool) {
    let mut client = h1_stream_client(proxy.addr).await;
    // Warm up: the first request dials the upstream and grows the allocator's arenas.
    for _ in 0..3 {
        let req = Request::builder()
            .uri(download_path.replace("10485760", "65536"))
            .header("host", "proxied.test")
            .body(empty_body())
            .unwrap();
        client.ready().await.unwrap();
        let response = client.send_request(req).await.unwrap();
        drain(response.into_body()).await;
    }
    let (_, before) = proxy.memory_kib();

    let req = Request::builder()
        .uri(download_path)
        .header("host", "proxied.test")
        .body(empty_body())
        .unwrap();
    client.ready().await.unwrap();
    let response = client.send_request(req).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let (bytes, sha, _) = drain(response.into_body()).await;
    assert_eq!(bytes, TEN_MIB, "the whole download arrived");
    assert_eq!(sha, pattern_sha(TEN_MIB), "the download arrived intact");

    if upload {
        let (tx, body) = channel_body(None);
        let req = Request::builder()
            .method(Method::POST)
            .uri("/upload")
            .header("host", "proxied.test")
            .header("content-length", TEN_MIB)
            .body(body)
            .unwrap();
        let sent = tokio::spawn(async move {
            let mut at = 0;
            while at < TEN_MIB {
                tx.send(Frame::data(pattern(at, FRAME))).await.unwrap();
                at += FRAME;
            }
        });
        client.ready().await.unwrap();
        let response = client.send_request(req).await.unwrap();
        sent.await.unwrap();
        let text = response.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8_lossy(&text).into_owned();
        assert_eq!(
            body_field(&text, "bytes"),
            Some(&*TEN_MIB.to_string()),
            "{text}"
        );
        assert_eq!(
            body_field(&text, "sha"),
            Some(&*pattern_sha(TEN_MIB)),
            "{text}"
        );
    }

    let (rss, peak) = proxy.memory_kib();
    let grew = peak.saturating_sub(before);
    // Half the body: flow control legitimately lets a few MiB wait in the proxy (the
    // library's HTTP/2 stream window is 2 MiB; 2-3 MiB of growth seen), a proxy that buffers
    // the body holds all of it (20 MiB seen: the body plus the copy it is collected into).
    assert!(
        grew < TEN_MIB as u64 / 1024 / 2,
        "the proxy's peak RSS grew by {grew} KiB (from {before} to {peak}, now {rss}) moving \
         10 MiB: it buffers bodies\n{}",
        proxy.log.lock()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_mib_stream_through_the_example_process_without_growing_its_memory() {
    let dir = TempDir::new("reverse-proxy-rss").unwrap();
    let ca = dir.join("ca.pem");
    let ca_pem: Vec<u8> = TestPki::shared()
        .ca_a()
        .iter()
        .flat_map(|c| c.to_pem().unwrap())
        .collect();
    fs::write(&ca, ca_pem).unwrap();
    for (offer, alpn) in [(Offer::H1, "h1"), (Offer::H2, "h2")] {
        let upstream = HyperUpstream::start(offer).await;
        let proxy = ExampleProcess::start(upstream.addr, alpn, &ca);
        ten_mib_each_way(&proxy, "/big/10485760", true).await;
        let expect = if offer == Offer::H2 { (0, 1) } else { (1, 0) };
        assert_eq!(
            upstream.conns(),
            expect,
            "{alpn}: one upstream connection throughout"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// nginx's HTTP/2 listener as the upstream.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_nginx_http2_upstream_concurrent_requests_share_one_connection() {
    let Some(nginx) = Nginx::start("75s") else {
        return;
    };
    let peer = Peer::tls(nginx.h2_addr, "localhost")
        .with_ca(TestPki::shared().ca_a())
        .with_alpn(Alpn::H2);
    let proxy = Proxy::start(peer).await;
    let client = h2c_client(proxy.addr).await;
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let mut client = client.clone();
        tasks.push(tokio::spawn(async move {
            let req = Request::builder()
                .uri("http://proxied.test/")
                .body(empty_body())
                .unwrap();
            let response = client.send_request(req).await.unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            let body = response.into_body().collect().await.unwrap().to_bytes();
            String::from_utf8(body.to_vec()).unwrap()
        }));
    }
    let mut conns = std::collections::HashSet::new();
    for task in tasks {
        let body = task.await.unwrap();
        conns.insert(body_field(&body, "conn").unwrap().to_owned());
    }
    assert_eq!(
        conns.len(),
        1,
        "50 concurrent requests used nginx connections {conns:?}\n{}",
        nginx.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_nginx_ten_mib_stream_through_the_example_process() {
    let Some(nginx) = Nginx::start("75s") else {
        return;
    };
    let ca = nginx.dir.join("ca.pem");
    let ca_pem: Vec<u8> = TestPki::shared()
        .ca_a()
        .iter()
        .flat_map(|c| c.to_pem().unwrap())
        .collect();
    fs::write(&ca, ca_pem).unwrap();
    for (addr, alpn) in [(nginx.addr, "h1"), (nginx.h2_addr, "h2")] {
        let proxy = ExampleProcess::start(addr, alpn, &ca);
        ten_mib_each_way(&proxy, "/big/10485760", false).await;
    }
}
