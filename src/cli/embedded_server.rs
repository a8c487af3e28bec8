//! The embedded upstream `bench` loads when no `--target` is given: a TLS server on
//! `127.0.0.1:0` speaking HTTP/2 or HTTP/1.1 (the client's ALPN offer decides; `h2` wins when
//! offered) and answering every request with a small fixed body.
//!
//! The HTTP side is hyper's server (`hyper::server::conn::http1` and `http2`), chosen per
//! connection from the negotiated ALPN, so there is no sniffing and no framing code of ours.
//! The server counts what it saw (connections accepted, the most streams in flight at once
//! on one connection) so that `bench` can report the server's view next to its own.
//!
//! It runs on the same tokio runtime as the client, so the numbers include the server's
//! share of the CPU, as they would against an upstream on the same machine.

use std::convert::Infallible;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body, Bytes, Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use openssl::ssl::{select_next_proto, AlpnError, Ssl, SslAcceptor, SslContext, SslMethod};
use openssl::x509::X509;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use tokio_openssl::SslStream;

use super::embedded_pki::{EmbeddedPki, SERVER_NAME};

/// Pending connections the kernel queues. The default of 128 overflows when `bench` opens a
/// burst of connections (reuse off at high concurrency), and each overflow costs the client
/// a one-second SYN retry that would dominate the latency numbers.
const LISTEN_BACKLOG: u32 = 1024;

/// A client that has not finished its handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The response body; short, so the bench measures connection handling rather than transfer.
const BODY: &str = "hello from upstream-pool\n";

/// ALPN protocols the server accepts, in its order of preference (wire format).
const ALPN_PREFERENCE: &[u8] = b"\x02h2\x08http/1.1";

/// The SETTINGS_MAX_CONCURRENT_STREAMS the embedded upstream announces unless told otherwise:
/// above the default `-c 16` and `-c 64`, so a bench at those concurrencies fits on one
/// HTTP/2 connection, and in the range real servers announce (nginx 128, h2o 100).
pub(crate) const DEFAULT_MAX_STREAMS: u32 = 128;

/// A running embedded upstream. Dropping it stops accepting; connections already open end
/// when their client closes them or the runtime shuts down.
#[derive(Debug)]
pub(crate) struct EmbeddedServer {
    addr: SocketAddr,
    ca: X509,
    seen: Arc<Seen>,
    accept: JoinHandle<()>,
}

/// What the server observed, all-time. Counters only go up (the in-flight peak is a maximum).
#[derive(Debug, Default)]
pub(crate) struct Seen {
    /// TLS handshakes completed (one per client connection).
    connections: AtomicU64,
    /// Of those, connections that negotiated `h2`.
    h2_connections: AtomicU64,
    /// Requests answered.
    requests: AtomicU64,
    /// The most requests in flight at once on any one connection.
    max_streams: AtomicUsize,
}

/// A snapshot of [`Seen`]; the counters are read one by one, so under load they may be a
/// few requests apart. [`SeenSnapshot::since`] turns two snapshots into one run's view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SeenSnapshot {
    /// Client connections that completed the TLS handshake.
    pub(crate) connections: u64,
    /// Of those, the HTTP/2 ones.
    pub(crate) h2_connections: u64,
    /// Requests answered.
    pub(crate) requests: u64,
    /// The most requests in flight at once on one connection.
    pub(crate) max_streams: usize,
}

impl SeenSnapshot {
    /// What happened between `earlier` and this snapshot. The in-flight peak is this
    /// snapshot's: [`EmbeddedServer::seen`] restarts it at every call, so it covers the
    /// interval already.
    pub(crate) fn since(self, earlier: SeenSnapshot) -> SeenSnapshot {
        SeenSnapshot {
            connections: self.connections - earlier.connections,
            h2_connections: self.h2_connections - earlier.h2_connections,
            requests: self.requests - earlier.requests,
            max_streams: self.max_streams,
        }
    }
}

impl Seen {
    /// Reads the counters and restarts the in-flight peak from the streams in flight now
    /// (their connections raise it again as soon as another request arrives).
    fn snapshot(&self) -> SeenSnapshot {
        SeenSnapshot {
            connections: self.connections.load(Ordering::Relaxed),
            h2_connections: self.h2_connections.load(Ordering::Relaxed),
            requests: self.requests.load(Ordering::Relaxed),
            max_streams: self.max_streams.swap(0, Ordering::Relaxed),
        }
    }
}

impl EmbeddedServer {
    /// Generates certificates, binds `127.0.0.1:0` and starts accepting on the current tokio
    /// runtime. HTTP/2 connections announce `max_streams` as SETTINGS_MAX_CONCURRENT_STREAMS.
    ///
    /// # Errors
    /// The OpenSSL or socket error, as a message.
    pub(crate) fn start(max_streams: u32) -> Result<EmbeddedServer, String> {
        let pki = EmbeddedPki::generate()
            .map_err(|e| format!("cannot generate certificates for the embedded upstream: {e}"))?;
        let ctx = tls_context(&pki)
            .map_err(|e| format!("cannot configure TLS for the embedded upstream: {e}"))?;
        let listener = listen()
            .map_err(|e| format!("cannot listen on 127.0.0.1 for the embedded upstream: {e}"))?;
        let addr = listener
            .local_addr()
            .map_err(|e| format!("embedded upstream has no local address: {e}"))?;
        let seen = Arc::new(Seen::default());
        let shared = Arc::new(Shared::new(ctx, max_streams, Arc::clone(&seen)));
        let accept = tokio::spawn(accept_loop(listener, shared));
        Ok(EmbeddedServer {
            addr,
            ca: pki.ca,
            seen,
            accept,
        })
    }

    /// Where it listens.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The CA that signed its certificate (for [`SERVER_NAME`]).
    pub(crate) fn ca(&self) -> &X509 {
        &self.ca
    }

    /// The name its certificate is valid for.
    pub(crate) fn server_name(&self) -> &'static str {
        SERVER_NAME
    }

    /// What it has observed so far; the in-flight peak is the one since the previous call.
    pub(crate) fn seen(&self) -> SeenSnapshot {
        self.seen.snapshot()
    }
}

impl Drop for EmbeddedServer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// What every connection task needs.
struct Shared {
    ctx: SslContext,
    http1: hyper::server::conn::http1::Builder,
    http2: hyper::server::conn::http2::Builder<TokioExecutor>,
    seen: Arc<Seen>,
}

impl Shared {
    fn new(ctx: SslContext, max_streams: u32, seen: Arc<Seen>) -> Shared {
        let mut http1 = hyper::server::conn::http1::Builder::new();
        // Reading the next request head is bounded by hyper's header read timeout (30 s),
        // which needs a timer; a keep-alive client pauses far less between requests.
        http1.timer(TokioTimer::new());
        let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        http2.timer(TokioTimer::new());
        http2.max_concurrent_streams(max_streams);
        Shared {
            ctx,
            http1,
            http2,
            seen,
        }
    }
}

fn tls_context(pki: &EmbeddedPki) -> Result<SslContext, openssl::error::ErrorStack> {
    let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server())?;
    b.set_certificate(&pki.leaf)?;
    b.set_private_key(&pki.leaf_key)?;
    b.check_private_key()?;
    // Stateful TLS 1.2 resumption needs a session id context; tickets (the default) work
    // without it, but clients that disable tickets should resume too.
    b.set_session_id_context(b"upstream-pool-embedded")?;
    // The server's preference decides: h2 when offered, else http/1.1; an offer with neither
    // continues without ALPN (and gets HTTP/1.1), as from a server that knows no ALPN.
    b.set_alpn_select_callback(|_ssl, offer| {
        select_next_proto(ALPN_PREFERENCE, offer).ok_or(AlpnError::NOACK)
    });
    Ok(b.build().into_context())
}

fn listen() -> io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?;
    socket.listen(LISTEN_BACKLOG)
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        match listener.accept().await {
            Ok((tcp, _)) => {
                tokio::spawn(serve(tcp, Arc::clone(&shared)));
            }
            // Out of file descriptors and the like: back off instead of spinning; the
            // client will see connect timeouts and report them.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// Serves one connection until the client closes it or it misbehaves. Failures are the
/// client's to report, so they end the connection silently.
async fn serve(tcp: TcpStream, shared: Arc<Shared>) {
    let _ = tcp.set_nodelay(true);
    let Ok(ssl) = Ssl::new(&shared.ctx) else {
        return;
    };
    let Ok(mut tls) = SslStream::new(ssl, tcp) else {
        return;
    };
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, Pin::new(&mut tls).accept()).await {
        Ok(Ok(())) => {}
        _ => return,
    }
    shared.seen.connections.fetch_add(1, Ordering::Relaxed);
    let h2 = tls.ssl().selected_alpn_protocol() == Some(b"h2".as_slice());
    let conn = Arc::new(ConnStreams {
        in_flight: AtomicUsize::new(0),
        seen: Arc::clone(&shared.seen),
    });
    let service = hyper::service::service_fn(move |_req: Request<Incoming>| {
        let body = CountedBody::new(Arc::clone(&conn));
        async move { Ok::<_, Infallible>(respond(body)) }
    });
    let io = TokioIo::new(tls);
    // hyper sends close_notify and FIN when the connection ends cleanly, and handles
    // `Connection: close` and HTTP/1.0 keep-alive itself.
    if h2 {
        shared.seen.h2_connections.fetch_add(1, Ordering::Relaxed);
        let _ = shared.http2.serve_connection(io, service).await;
    } else {
        let _ = shared.http1.serve_connection(io, service).await;
    }
}

fn respond(body: CountedBody) -> Response<CountedBody> {
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(
        hyper::header::SERVER,
        hyper::header::HeaderValue::from_static("upstream-pool-embedded"),
    );
    headers.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain"),
    );
    response
}

/// Requests in flight on one connection.
struct ConnStreams {
    in_flight: AtomicUsize,
    seen: Arc<Seen>,
}

/// The response body [`BODY`]. It counts as a request in flight on its connection from the
/// moment the request is handled until hyper has sent (or dropped) the body, which is when
/// the stream ends on the wire.
struct CountedBody {
    data: Option<Bytes>,
    conn: Arc<ConnStreams>,
}

impl CountedBody {
    fn new(conn: Arc<ConnStreams>) -> CountedBody {
        let now = conn.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        conn.seen.max_streams.fetch_max(now, Ordering::Relaxed);
        conn.seen.requests.fetch_add(1, Ordering::Relaxed);
        CountedBody {
            data: Some(Bytes::from_static(BODY.as_bytes())),
            conn,
        }
    }
}

impl Drop for CountedBody {
    fn drop(&mut self) {
        self.conn.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Body for CountedBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.data.take().map(|data| Ok(Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        // An exact size gives HTTP/1.1 a `Content-Length` (not chunked) and HTTP/2 a
        // `content-length` header.
        hyper::body::SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
    }
}
