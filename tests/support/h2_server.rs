//! An in-process HTTP server for the `upstream_pool::http` suites: HTTP/2 (the `h2` crate's
//! server) and HTTP/1.1 ([`super::h1_server`]) over tokio-openssl, chosen by ALPN, or over
//! plaintext TCP (HTTP/1.1, or h2c with prior knowledge). It records what a client's HTTP
//! layer did to it: connections, requests per connection, the most streams ever in flight on
//! one connection, streams the client reset, every request's authority and body.
//!
//! ```ignore
//! let server = HttpServer::builder().max_concurrent_streams(4).delay(Duration::from_millis(100)).start();
//! // ... 40 concurrent requests to server.addr() with SNI "localhost", ALPN h2 ...
//! let stats = server.stats();
//! assert!(stats.max_in_flight() <= 4);
//! ```
//!
//! Every response carries `x-conn-id` (the server's connection id, from 0), `x-req-n`
//! (requests on that connection, from 1), `x-proto` (`h2` or `http/1.1`), `x-authority` (the
//! `:authority` or `Host` the server received, empty when none), and, for a request with a
//! body, `x-req-body-len` and `x-req-body-sha256` (lowercase hex). The body is
//! `conn=<id> req=<n>\n` unless a size is asked for (builder [`HttpServerBuilder::body_size`]
//! or request header `x-body-size: N`): then it is [`pattern`]`(N)`, sent in 16 KiB pieces.
//!
//! Per-request controls, both protocols:
//! - header `x-delay-ms: N`: wait N ms before the response head (overrides the builder's
//!   [`HttpServerBuilder::delay`]); an HTTP/2 stream the client resets meanwhile ends at once
//!   and is counted in [`ConnStats::resets`].
//! - path `/stall`: send the head and the first 16 KiB of a 1 MiB body, then nothing more until
//!   the client resets the stream (HTTP/2) or closes the connection (HTTP/1.1).
//!
//! HTTP/1.1-only paths are listed in [`super::h1_server`].
//!
//! Requests are counted in flight from the moment the server has the request head until the
//! last byte of the response is handed to the connection (HTTP/2: after flow control let it
//! go), or until the stream is reset.

use std::fmt;
use std::future::poll_fn;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;
use openssl::ssl::{select_next_proto, AlpnError, Ssl, SslAcceptor, SslContext, SslMethod};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::{AbortHandle, JoinHandle};
use tokio_openssl::SslStream;

use super::certs::TestPki;
use super::{h1_server, test_log};

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Size of the pieces a sized body is written in.
pub(crate) const CHUNK: usize = 16 * 1024;

/// Length of the body a `/stall` response announces (only [`CHUNK`] of it is ever sent).
pub(crate) const STALL_BODY_LEN: usize = 1024 * 1024;

/// `n` bytes of a fixed, position-dependent pattern (byte `i` is `i % 251`), so a body that
/// lost, duplicated or reordered a piece does not compare equal.
pub(crate) fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

/// Lowercase hex SHA-256 of `data` (what `x-req-body-sha256` carries).
pub(crate) fn sha256_hex(data: &[u8]) -> String {
    openssl::sha::sha256(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The protocol a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Proto {
    /// HTTP/1.1 ([`super::h1_server`]).
    H1,
    /// HTTP/2 (the `h2` crate).
    H2,
}

/// What the server saw of one request.
#[derive(Debug, Clone)]
pub(crate) struct RequestLog {
    /// Connection id.
    pub(crate) conn: usize,
    /// Request number on that connection, from 1.
    pub(crate) n: usize,
    /// Protocol of the connection.
    pub(crate) proto: Proto,
    /// Request method.
    pub(crate) method: String,
    /// Path and query as received.
    pub(crate) path: String,
    /// `:authority` (HTTP/2) or `Host` (HTTP/1.1); `None` when absent.
    pub(crate) authority: Option<String>,
    /// Request body bytes received.
    pub(crate) body_len: usize,
    /// SHA-256 (hex) of the request body.
    pub(crate) body_sha256: String,
    /// The server answered it (false: dropped on purpose, or reset by the client).
    pub(crate) answered: bool,
}

/// Counters of one connection, shared between its tasks.
#[derive(Debug, Default)]
struct ConnCounters {
    proto: OnceLock<Proto>,
    alpn: OnceLock<Option<Vec<u8>>>,
    requests: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    resets: AtomicUsize,
    goaway_sent: AtomicBool,
    frozen: AtomicBool,
    closed: AtomicBool,
    error: Mutex<Option<String>>,
}

/// What the server observed about one connection; `id` is its index in
/// [`HttpStats::conns`].
#[derive(Debug, Clone)]
pub(crate) struct ConnStats {
    /// Connection id, counting accepted connections from 0.
    pub(crate) id: usize,
    /// Protocol spoken (`None` until the TLS handshake and ALPN are done).
    pub(crate) proto: Option<Proto>,
    /// Negotiated ALPN protocol.
    pub(crate) alpn: Option<Vec<u8>>,
    /// Request heads received on this connection (answered or not).
    pub(crate) requests: usize,
    /// Requests in flight now.
    pub(crate) in_flight: usize,
    /// The most requests ever in flight at once on this connection.
    pub(crate) max_in_flight: usize,
    /// HTTP/2 streams the client reset (RST_STREAM) before the response was complete.
    pub(crate) resets: usize,
    /// The server sent a graceful GOAWAY on this connection.
    pub(crate) goaway_sent: bool,
    /// The server stopped serving this connection ([`HttpServerBuilder::h2_freeze_after`]).
    pub(crate) frozen: bool,
    /// The connection is closed on the server side.
    pub(crate) closed: bool,
    /// Why the connection ended abnormally, if it did.
    pub(crate) error: Option<String>,
}

/// A snapshot of the server's statistics, from [`HttpServer::stats`].
#[derive(Debug, Clone, Default)]
pub(crate) struct HttpStats {
    /// TCP connections accepted.
    pub(crate) accepted: usize,
    /// Connections open now on the server side.
    pub(crate) open: usize,
    /// Responses completed, all connections.
    pub(crate) answered: usize,
    /// Per-connection details, indexed by connection id.
    pub(crate) conns: Vec<ConnStats>,
    /// Every request that ended (answered, dropped on purpose or reset by the client), in
    /// the order they ended.
    pub(crate) log: Vec<RequestLog>,
}

impl HttpStats {
    /// The most requests ever in flight at once on any one connection.
    pub(crate) fn max_in_flight(&self) -> usize {
        self.conns
            .iter()
            .map(|c| c.max_in_flight)
            .max()
            .unwrap_or(0)
    }

    /// Requests in flight now, all connections.
    pub(crate) fn in_flight(&self) -> usize {
        self.conns.iter().map(|c| c.in_flight).sum()
    }

    /// HTTP/2 streams the client reset, all connections.
    pub(crate) fn resets(&self) -> usize {
        self.conns.iter().map(|c| c.resets).sum()
    }

    /// Connections that carried at least one request.
    pub(crate) fn used_conns(&self) -> usize {
        self.conns.iter().filter(|c| c.requests > 0).count()
    }

    /// Request heads received, all connections (including requests still in flight, which
    /// [`Self::log`] lists only once they end).
    pub(crate) fn requests(&self) -> usize {
        self.conns.iter().map(|c| c.requests).sum()
    }
}

#[derive(Debug, Default)]
pub(crate) struct Shared {
    accepted: AtomicUsize,
    open: AtomicUsize,
    answered: AtomicUsize,
    conns: Mutex<Vec<Arc<ConnCounters>>>,
    log: Mutex<Vec<RequestLog>>,
    tasks: Mutex<Vec<AbortHandle>>,
}

/// Locks a mutex, ignoring poisoning (a panicking test must not cascade into server tasks).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn snapshot(&self) -> HttpStats {
        let conns = lock(&self.conns)
            .iter()
            .enumerate()
            .map(|(id, c)| ConnStats {
                id,
                proto: c.proto.get().copied(),
                alpn: c.alpn.get().cloned().flatten(),
                requests: c.requests.load(Ordering::SeqCst),
                in_flight: c.in_flight.load(Ordering::SeqCst),
                max_in_flight: c.max_in_flight.load(Ordering::SeqCst),
                resets: c.resets.load(Ordering::SeqCst),
                goaway_sent: c.goaway_sent.load(Ordering::SeqCst),
                frozen: c.frozen.load(Ordering::SeqCst),
                closed: c.closed.load(Ordering::SeqCst),
                error: lock(&c.error).clone(),
            })
            .collect();
        HttpStats {
            accepted: self.accepted.load(Ordering::SeqCst),
            open: self.open.load(Ordering::SeqCst),
            answered: self.answered.load(Ordering::SeqCst),
            conns,
            log: lock(&self.log).clone(),
        }
    }
}

/// One connection's handle on the shared statistics, given to the protocol handlers.
#[derive(Debug, Clone)]
pub(crate) struct ConnHandle {
    pub(crate) id: usize,
    shared: Arc<Shared>,
    counters: Arc<ConnCounters>,
}

impl ConnHandle {
    /// Records a new request head; returns its number on the connection and an in-flight
    /// guard that counts it until dropped.
    pub(crate) fn request(&self, proto: Proto) -> (usize, InFlight) {
        let n = self.counters.requests.fetch_add(1, Ordering::SeqCst) + 1;
        let now = self.counters.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.counters.max_in_flight.fetch_max(now, Ordering::SeqCst);
        let _ = self.counters.proto.set(proto);
        (
            n,
            InFlight {
                counters: self.counters.clone(),
            },
        )
    }

    /// Appends to the request log.
    pub(crate) fn log(&self, entry: RequestLog) {
        lock(&self.shared.log).push(entry);
    }

    /// Counts a completed response.
    pub(crate) fn answered(&self) {
        self.shared.answered.fetch_add(1, Ordering::SeqCst);
    }

    fn reset(&self) {
        self.counters.resets.fetch_add(1, Ordering::SeqCst);
    }
}

/// Counts one request in flight on its connection until dropped.
#[derive(Debug)]
pub(crate) struct InFlight {
    counters: Arc<ConnCounters>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.counters.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Settings every connection task reads.
#[derive(Debug, Clone)]
pub(crate) struct ServerConf {
    pub(crate) max_concurrent_streams: Option<u32>,
    pub(crate) delay: Duration,
    pub(crate) body_size: Option<usize>,
    pub(crate) goaway_after: Option<usize>,
    pub(crate) garbage_after_h2: bool,
    pub(crate) h1_idle_close: Option<Duration>,
    pub(crate) h2_freeze_after: Option<usize>,
    no_alpn_proto: Proto,
}

/// Builder for [`HttpServer`]; start from [`HttpServer::builder`].
#[derive(Debug, Clone)]
pub(crate) struct HttpServerBuilder {
    tls: bool,
    alpn: Vec<&'static [u8]>,
    conf: ServerConf,
}

impl HttpServerBuilder {
    /// ALPN protocols the server accepts, in its order of preference (`b"h2"`,
    /// `b"http/1.1"`). Default: `h2` only. A client offering none of them gets no ALPN and
    /// is served [`Self::no_alpn_proto`].
    pub(crate) fn alpn(mut self, protocols: &[&'static [u8]]) -> Self {
        self.alpn = protocols.to_vec();
        self
    }

    /// Serve HTTP/2 (h2) and fall back to HTTP/1.1: ALPN `h2`, `http/1.1` in that order.
    pub(crate) fn h2_then_h1(self) -> Self {
        self.alpn(&[b"h2", b"http/1.1"])
    }

    /// HTTP/1.1 only: ALPN `http/1.1`, and HTTP/1.1 when the client offers no ALPN.
    pub(crate) fn h1_only(self) -> Self {
        self.alpn(&[b"http/1.1"]).no_alpn_proto(Proto::H1)
    }

    /// What to speak on a TLS connection without ALPN (default HTTP/1.1).
    pub(crate) fn no_alpn_proto(mut self, proto: Proto) -> Self {
        self.conf.no_alpn_proto = proto;
        self
    }

    /// No TLS: HTTP/1.1 on plain TCP (or, with `no_alpn_proto(Proto::H2)`, h2c with prior
    /// knowledge).
    pub(crate) fn plaintext(mut self) -> Self {
        self.tls = false;
        self
    }

    /// SETTINGS_MAX_CONCURRENT_STREAMS the server announces (default: h2's, unlimited).
    pub(crate) fn max_concurrent_streams(mut self, n: u32) -> Self {
        self.conf.max_concurrent_streams = Some(n);
        self
    }

    /// Wait before each response head (default none; header `x-delay-ms` overrides).
    pub(crate) fn delay(mut self, delay: Duration) -> Self {
        self.conf.delay = delay;
        self
    }

    /// Every response body is [`pattern`]`(n)` (default: `conn=<id> req=<n>\n`).
    pub(crate) fn body_size(mut self, n: usize) -> Self {
        self.conf.body_size = Some(n);
        self
    }

    /// HTTP/2: after the `n`-th request on a connection, start a graceful shutdown (GOAWAY;
    /// streams already open finish, later ones are refused). Default: never.
    pub(crate) fn goaway_after(mut self, n: usize) -> Self {
        self.conf.goaway_after = Some(n);
        self
    }

    /// After negotiating ALPN `h2`, write bytes that are not an HTTP/2 connection preface
    /// (no SETTINGS frame), then read and discard until the client closes.
    pub(crate) fn garbage_after_h2(mut self) -> Self {
        self.conf.garbage_after_h2 = true;
        self
    }

    /// HTTP/2: once the `n`-th request on a connection is answered, stop serving that
    /// connection without closing it: nothing more is read or written (PINGs go unanswered),
    /// as with a hung upstream or a silently dropped network path. Default: never.
    pub(crate) fn h2_freeze_after(mut self, n: usize) -> Self {
        self.conf.h2_freeze_after = Some(n);
        self
    }

    /// HTTP/1.1: close (close_notify + FIN) a connection idle for `d` between requests, as
    /// nginx's `keepalive_timeout` does. Default: never.
    pub(crate) fn h1_idle_close(mut self, d: Duration) -> Self {
        self.conf.h1_idle_close = Some(d);
        self
    }

    /// Binds `127.0.0.1:0` (backlog 1024) and spawns the accept loop on the current runtime.
    pub(crate) fn start(self) -> HttpServer {
        let ctx = self.tls.then(|| tls_context(&self.alpn));
        let socket = TcpSocket::new_v4().expect("socket");
        socket.set_reuseaddr(true).expect("SO_REUSEADDR");
        socket
            .bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .expect("bind 127.0.0.1:0");
        let listener = socket.listen(1024).expect("listen");
        let addr = listener.local_addr().expect("local_addr");
        let shared = Arc::new(Shared::default());
        let conf = Arc::new(self.conf);
        let accept_task = tokio::spawn(accept_loop(listener, shared.clone(), conf, ctx));
        HttpServer {
            addr,
            shared,
            accept_task,
        }
    }
}

/// Server context: `TestPki::shared().server` (localhost, 127.0.0.1), TLS 1.2–1.3, ALPN by
/// server preference from `alpn` (no ALPN when nothing matches).
fn tls_context(alpn: &[&'static [u8]]) -> SslContext {
    let identity = &TestPki::shared().server;
    let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server()).expect("acceptor");
    b.set_certificate(&identity.cert).expect("certificate");
    for c in &identity.intermediates {
        b.add_extra_chain_cert(c.clone()).expect("chain");
    }
    b.set_private_key(&identity.key).expect("key");
    b.set_servername_callback(|_ssl, _alert| Ok(()));
    let mut wire = Vec::new();
    for p in alpn {
        wire.push(p.len() as u8);
        wire.extend_from_slice(p);
    }
    if !wire.is_empty() {
        // The callback must return a slice that outlives it: one small leak per test server.
        let wire: &'static [u8] = Box::leak(wire.into_boxed_slice());
        b.set_alpn_select_callback(move |_ssl, client| {
            select_next_proto(wire, client).ok_or(AlpnError::NOACK)
        });
    }
    b.build().into_context()
}

/// A running server; dropping it stops the accept loop and every connection.
#[derive(Debug)]
pub(crate) struct HttpServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept_task: JoinHandle<()>,
}

impl HttpServer {
    /// Defaults: TLS with `TestPki::shared().server`, ALPN `h2` only (HTTP/1.1 without
    /// ALPN), no stream limit, no delay, small bodies, no GOAWAY.
    pub(crate) fn builder() -> HttpServerBuilder {
        HttpServerBuilder {
            tls: true,
            alpn: vec![b"h2"],
            conf: ServerConf {
                max_concurrent_streams: None,
                delay: Duration::ZERO,
                body_size: None,
                goaway_after: None,
                garbage_after_h2: false,
                h1_idle_close: None,
                h2_freeze_after: None,
                no_alpn_proto: Proto::H1,
            },
        }
    }

    /// The address the server listens on.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A snapshot of the statistics.
    pub(crate) fn stats(&self) -> HttpStats {
        self.shared.snapshot()
    }

    /// Polls the statistics until `pred` holds and returns that snapshot; panics with the
    /// last snapshot after 5 s (server-side counters trail the client).
    pub(crate) async fn wait_for(&self, pred: impl Fn(&HttpStats) -> bool) -> HttpStats {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let stats = self.stats();
            if pred(&stats) {
                return stats;
            }
            if Instant::now() >= deadline {
                panic!("HTTP test server statistics never matched; last snapshot: {stats:#?}");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Aborts every connection task: clients see a bare FIN (no GOAWAY, no close_notify).
    pub(crate) fn close_connections(&self) {
        for task in lock(&self.shared.tasks).drain(..) {
            task.abort();
        }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.accept_task.abort();
        self.close_connections();
    }
}

/// Keeps `open` and `closed` right however a connection task ends (including abort).
struct OpenGuard {
    shared: Arc<Shared>,
    counters: Arc<ConnCounters>,
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.counters.closed.store(true, Ordering::SeqCst);
        self.shared.open.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    conf: Arc<ServerConf>,
    ctx: Option<SslContext>,
) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                test_log!("HTTP test server: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let counters = Arc::new(ConnCounters::default());
        let id = {
            let mut conns = lock(&shared.conns);
            conns.push(counters.clone());
            conns.len() - 1
        };
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        shared.open.fetch_add(1, Ordering::SeqCst);
        let guard = OpenGuard {
            shared: shared.clone(),
            counters: counters.clone(),
        };
        let conn = ConnHandle {
            id,
            shared: shared.clone(),
            counters,
        };
        let (conf, ctx) = (conf.clone(), ctx.clone());
        let task = tokio::spawn(async move {
            let _guard = guard;
            if let Err(e) = handle_conn(&conn, &conf, ctx.as_ref(), stream).await {
                test_log!("HTTP test server: connection {id} ended: {e}");
                *lock(&conn.counters.error) = Some(e.to_string());
            }
        });
        let mut tasks = lock(&shared.tasks);
        tasks.retain(|t| !t.is_finished());
        tasks.push(task.abort_handle());
    }
}

async fn handle_conn(
    conn: &ConnHandle,
    conf: &ServerConf,
    ctx: Option<&SslContext>,
    tcp: TcpStream,
) -> Result<(), BoxError> {
    let Some(ctx) = ctx else {
        let _ = conn.counters.alpn.set(None);
        return match conf.no_alpn_proto {
            Proto::H1 => h1_server::serve(conn, conf, tcp).await,
            Proto::H2 => serve_h2(conn, conf, tcp).await,
        };
    };
    let mut tls = SslStream::new(Ssl::new(ctx)?, tcp)?;
    tokio::time::timeout(Duration::from_secs(10), Pin::new(&mut tls).accept())
        .await
        .map_err(|_| "TLS handshake timed out")??;
    let alpn = tls.ssl().selected_alpn_protocol().map(<[u8]>::to_vec);
    let proto = match alpn.as_deref() {
        Some(b"h2") => Proto::H2,
        Some(_) => Proto::H1,
        None => conf.no_alpn_proto,
    };
    let _ = conn.counters.alpn.set(alpn);
    let _ = conn.counters.proto.set(proto);
    match proto {
        Proto::H1 => h1_server::serve(conn, conf, tls).await,
        Proto::H2 if conf.garbage_after_h2 => {
            // Looks like an HTTP/1.1 response: as an HTTP/2 frame header that is a frame of
            // 4.7 MB, far above the 16 KiB maximum, and not the SETTINGS frame required first.
            tls.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello garbage\x00\xff\xfe")
                .await?;
            tls.flush().await?;
            let mut buf = [0u8; 4096];
            let _ = tokio::time::timeout(Duration::from_secs(10), async {
                while matches!(tls.read(&mut buf).await, Ok(n) if n > 0) {}
            })
            .await;
            Ok(())
        }
        Proto::H2 => serve_h2(conn, conf, tls).await,
    }
}

async fn serve_h2<S>(conn: &ConnHandle, conf: &ServerConf, io: S) -> Result<(), BoxError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = h2::server::Builder::new();
    if let Some(max) = conf.max_concurrent_streams {
        builder.max_concurrent_streams(max);
    }
    let mut h2 = tokio::time::timeout(Duration::from_secs(10), builder.handshake::<_, Bytes>(io))
        .await
        .map_err(|_| "h2 handshake timed out")??;
    let mut accepted = 0usize;
    while let Some(next) = h2.accept().await {
        let (req, respond) = next?;
        accepted += 1;
        let (n, in_flight) = conn.request(Proto::H2);
        let (conn2, conf2) = (conn.clone(), conf.clone());
        tokio::spawn(async move {
            if let Err(e) = h2_stream(&conn2, &conf2, n, req, respond, in_flight).await {
                test_log!("HTTP test server: h2 stream {n} on {}: {e}", conn2.id);
            }
        });
        if conf.goaway_after == Some(accepted) {
            conn.counters.goaway_sent.store(true, Ordering::SeqCst);
            h2.graceful_shutdown();
        }
        if conf.h2_freeze_after == Some(accepted) {
            // Keep the connection polled until the answer is out (and 50 ms more, so h2
            // flushes its last frames), then hold it unpolled.
            let mut flush_until = None;
            loop {
                let now = Instant::now();
                if conn.counters.in_flight.load(Ordering::SeqCst) > 0 {
                    flush_until = None;
                } else if flush_until.is_none() {
                    flush_until = Some(now + Duration::from_millis(50));
                }
                if flush_until.is_some_and(|t| now >= t) {
                    break;
                }
                tokio::select! {
                    next = h2.accept() => {
                        if next.is_none() {
                            return Ok(());
                        }
                        // A stream opened meanwhile is dropped (reset) unanswered.
                    }
                    _ = tokio::time::sleep(Duration::from_millis(2)) => {}
                }
            }
            conn.counters.frozen.store(true, Ordering::SeqCst);
            std::future::pending::<()>().await;
        }
    }
    // `accept` returned None: GOAWAY finished or the client went away; flush what is left.
    poll_fn(|cx| h2.poll_closed(cx)).await?;
    Ok(())
}

/// Waits for `fut` unless the client resets the stream first; `Err` on a reset.
async fn unless_reset<F: std::future::Future>(
    respond: &mut h2::server::SendResponse<Bytes>,
    fut: F,
) -> Result<F::Output, BoxError> {
    tokio::select! {
        out = fut => Ok(out),
        r = poll_fn(|cx| respond.poll_reset(cx)) => Err(format!("stream reset by client: {r:?}").into()),
    }
}

async fn h2_stream(
    conn: &ConnHandle,
    conf: &ServerConf,
    n: usize,
    req: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    in_flight: InFlight,
) -> Result<(), BoxError> {
    let (parts, mut body) = req.into_parts();
    let mut entry = RequestLog {
        conn: conn.id,
        n,
        proto: Proto::H2,
        method: parts.method.to_string(),
        path: parts
            .uri
            .path_and_query()
            .map_or_else(String::new, |p| p.to_string()),
        authority: parts.uri.authority().map(|a| a.to_string()),
        body_len: 0,
        body_sha256: sha256_hex(b""),
        answered: false,
    };

    // Read the whole request body (releasing flow control), unless the client resets.
    let mut received = Vec::new();
    let read = unless_reset(&mut respond, async {
        while let Some(chunk) = body.data().await {
            let chunk = chunk?;
            let _ = body.flow_control().release_capacity(chunk.len());
            received.extend_from_slice(&chunk);
        }
        Ok::<_, h2::Error>(())
    })
    .await;
    let had_body = !received.is_empty();
    entry.body_len = received.len();
    entry.body_sha256 = sha256_hex(&received);
    let result = match read {
        Ok(Ok(())) => respond_h2(conn, conf, n, &parts, had_body, &entry, &mut respond).await,
        Ok(Err(e)) => Err(e.into()),
        Err(e) => Err(e),
    };
    match &result {
        Ok(()) => {
            entry.answered = true;
            conn.answered();
        }
        Err(_) => conn.reset(),
    }
    conn.log(entry);
    drop(in_flight);
    result
}

async fn respond_h2(
    conn: &ConnHandle,
    conf: &ServerConf,
    n: usize,
    parts: &http::request::Parts,
    had_body: bool,
    entry: &RequestLog,
    respond: &mut h2::server::SendResponse<Bytes>,
) -> Result<(), BoxError> {
    let delay = header_num(&parts.headers, "x-delay-ms")
        .map_or(conf.delay, |ms| Duration::from_millis(ms as u64));
    if !delay.is_zero() {
        unless_reset(respond, tokio::time::sleep(delay)).await?;
    }
    let stall = parts.uri.path() == "/stall";
    let body: Vec<u8> = if stall {
        pattern(CHUNK)
    } else {
        match header_num(&parts.headers, "x-body-size").or(conf.body_size) {
            Some(size) => pattern(size),
            None => format!("conn={} req={n}\n", conn.id).into_bytes(),
        }
    };
    let len = if stall { STALL_BODY_LEN } else { body.len() };
    let mut head = http::Response::builder()
        .status(200)
        .header("content-length", len)
        .header("x-conn-id", conn.id)
        .header("x-req-n", n)
        .header("x-proto", "h2")
        .header("x-authority", entry.authority.as_deref().unwrap_or(""));
    if had_body {
        head = head
            .header("x-req-body-len", entry.body_len)
            .header("x-req-body-sha256", &entry.body_sha256);
    }
    let mut send = respond.send_response(head.body(())?, false)?;
    let mut rest = Bytes::from(body);
    while !rest.is_empty() {
        send.reserve_capacity(rest.len().min(CHUNK));
        let cap = poll_fn(|cx| {
            if let Poll::Ready(r) = send.poll_reset(cx) {
                return Poll::Ready(Err(format!("stream reset by client: {r:?}")));
            }
            send.poll_capacity(cx).map(|cap| match cap {
                Some(Ok(cap)) => Ok(cap),
                Some(Err(e)) => Err(e.to_string()),
                None => Err("stream closed while sending".to_owned()),
            })
        })
        .await?;
        if cap == 0 {
            continue;
        }
        let piece = rest.split_to(cap.min(rest.len()));
        let last = rest.is_empty() && !stall;
        send.send_data(piece, last)?;
    }
    if stall {
        // Never finish: wait for the client to reset the stream.
        let r = poll_fn(|cx| send.poll_reset(cx)).await;
        return Err(format!("stalled stream reset by client: {r:?}").into());
    }
    Ok(())
}

/// A header parsed as a number.
pub(crate) fn header_num(headers: &http::HeaderMap, name: &str) -> Option<usize> {
    headers.get(name)?.to_str().ok()?.trim().parse().ok()
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::H1 => "http/1.1",
            Proto::H2 => "h2",
        })
    }
}

/// Whether `io::Error` means the peer went away (used to keep logs quiet).
pub(crate) fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
    )
}
