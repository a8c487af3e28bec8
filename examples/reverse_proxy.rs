//! An HTTP/1.1 reverse proxy on hyper 1.x with `upstream_pool` as its upstream layer.
//!
//! ```text
//! cargo run --release --example reverse_proxy -- --listen 127.0.0.1:8080 \
//!     --upstream 127.0.0.1:8443 --sni localhost --ca ca.pem [--insecure] [--threads N]
//! ```
//!
//! Every client request is forwarded to one TLS upstream over a connection from
//! [`Connector::get`], speaking HTTP/1.1 with `hyper::client::conn::http1` on top of the pooled
//! [`Connection`]. Each response carries `x-upstream-reused: true|false`, so pool reuse is
//! visible from the outside.
//!
//! # Design
//!
//! **Bodies are buffered, both ways** (up to [`ProxyConfig::max_body`]). The request body is
//! read completely before the upstream is contacted, so a request can be sent again after a
//! failed attempt; the response body is read completely before the client sees the response,
//! so "the exchange is over and the connection is clean" is known at one point in the code,
//! where the connection is released. The price is memory per in-flight request and no
//! streaming (a large download reaches the client only once it is complete); a proxy that
//! streams would release from the response body's end-of-stream instead. For the small
//! API-style responses this example targets, buffering is also the fastest path: one write
//! to the client per response.
//!
//! **Release rule.** A connection goes back to the pool only when the whole response was read,
//! hyper's connection task finished cleanly with no unread bytes left in its buffer, and the
//! upstream did not ask to close: no `Connection: close`, not HTTP/1.0 without
//! `keep-alive`, and a body delimited by length or chunking (not by closing the connection).
//! Anything else (an error, a timeout, a cut-off body) drops the connection, which closes it.
//!
//! **Retry rule** (the rule Go's `net/http` Transport applies). An attempt on a *reused*
//! connection that fails before any response byte arrived most likely hit a connection the
//! upstream closed while it sat idle. It is sent again if the request was not written at
//! all, or if its method is idempotent (a written `POST` may have been acted on, so it is not
//! repeated, as nginx does not by default). The next attempt asks [`Connector::get`] again:
//! either a pooled connection that has just passed the pool's liveness check or a fresh one.
//! A failure on a fresh connection is final, so a request is retried at most once on a fresh
//! connection; retries on pooled connections are bounded by the idle pool size.
//!
//! Hop-by-hop headers (`Connection` and the headers it names, `Keep-Alive`, `TE`,
//! `Transfer-Encoding`, `Upgrade`, ...) are not forwarded in either direction; `Host` is.

use std::convert::Infallible;
use std::error::Error as StdError;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::http::{request, response};
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use upstream_pool::{Connection, Connector, ConnectorOptions, Error, ErrorKind, Peer};

/// Response header telling whether the upstream connection that produced this response came
/// from the pool (`true`) or was dialled for it (`false`); after a retry, it describes the
/// connection of the successful attempt.
pub(crate) const REUSED_HEADER: &str = "x-upstream-reused";

const USAGE: &str = "usage: reverse_proxy --listen ADDR --upstream ADDR --sni NAME \
[--ca PEM_FILE] [--insecure] [--threads N]

  --listen ADDR     where clients connect (plain HTTP/1.1), e.g. 127.0.0.1:8080
  --upstream ADDR   the TLS upstream, e.g. 127.0.0.1:8443
  --sni NAME        server name sent to and verified against the upstream
  --ca PEM_FILE     trust these CA certificates instead of the system roots
  --insecure        do not verify the upstream's certificate
  --threads N       tokio worker threads; 1 (the default) runs a current-thread runtime";

/// What the proxy forwards to, and its limits.
#[derive(Debug, Clone)]
pub(crate) struct ProxyConfig {
    /// The pool every upstream connection comes from.
    pub(crate) connector: Connector,
    /// The one upstream all requests go to.
    pub(crate) upstream: Peer,
    /// How long one attempt may take, from sending the request to the end of the response
    /// body. Defaults to 60 s (nginx's `proxy_read_timeout`). A timed-out attempt is not
    /// retried: the upstream may still be working on it.
    pub(crate) response_timeout: Duration,
    /// Largest request or response body buffered. Defaults to 16 MiB; a larger request gets
    /// `413`, a larger response `502`.
    pub(crate) max_body: usize,
}

impl ProxyConfig {
    /// Forwards to `upstream` through `connector`, with the default limits.
    pub(crate) fn new(connector: Connector, upstream: Peer) -> ProxyConfig {
        ProxyConfig {
            connector,
            upstream,
            response_timeout: Duration::from_secs(60),
            max_body: 16 * 1024 * 1024,
        }
    }
}

/// Accepts clients on `listener` and proxies their requests, until the task is dropped.
///
/// Each client connection is served on its own task (HTTP/1.1 keep-alive, hyper's default
/// limits). Accept errors (out of file descriptors, a connection reset before it was
/// accepted) are logged and the loop goes on after a short pause.
///
/// # Cancel safety
/// Dropping the future stops accepting; connections already accepted keep being served by
/// their tasks until the client closes them or the runtime shuts down.
pub(crate) async fn serve(listener: TcpListener, config: ProxyConfig) {
    let config = Arc::new(config);
    let mut http = hyper::server::conn::http1::Builder::new();
    // The header read timeout (30 s by default) needs a timer.
    http.timer(TokioTimer::new());
    loop {
        let (stream, client) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                eprintln!("reverse_proxy: accept failed: {e}");
                // EMFILE and friends: let connections finish before trying again.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let config = Arc::clone(&config);
        let http = http.clone();
        // Built once per client connection; cloning a `HeaderValue` only bumps a refcount.
        let client_ip = HeaderValue::from_str(&client.ip().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let config = Arc::clone(&config);
                let client_ip = client_ip.clone();
                async move { Ok::<_, Infallible>(proxy(&config, req, client_ip).await) }
            });
            // Client-side errors (a reset, a malformed request) only end that client's
            // connection; there is nobody to report them to.
            let _ = http.serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

/// Handles one client request: buffer its body, forward it, build the client's response.
async fn proxy(
    config: &ProxyConfig,
    req: Request<Incoming>,
    client_ip: HeaderValue,
) -> Response<Full<Bytes>> {
    let (head, body) = req.into_parts();
    let body = match Limited::new(body, config.max_body).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<LengthLimitError>() => {
            return plain_response(StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n")
        }
        Err(e) => {
            return plain_response(
                StatusCode::BAD_REQUEST,
                format!("could not read the request body: {e}\n"),
            )
        }
    };
    let outgoing = Outgoing::new(head, body, client_ip, &config.upstream);
    match forward(config, &outgoing).await {
        Ok(response) => response,
        Err(failure) => {
            eprintln!(
                "reverse_proxy: {} {} failed: {failure}",
                outgoing.method, outgoing.uri
            );
            plain_response(failure.status(), format!("{failure}\n"))
        }
    }
}

/// The request as it goes upstream; kept so it can be sent again.
#[derive(Debug)]
struct Outgoing {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
}

impl Outgoing {
    fn new(head: request::Parts, body: Bytes, client_ip: HeaderValue, upstream: &Peer) -> Outgoing {
        let mut headers = head.headers;
        strip_hop_by_hop(&mut headers);
        // The body is already complete: there is nothing to continue, and its length is known.
        headers.remove(header::EXPECT);
        headers.remove(header::CONTENT_LENGTH);
        if !body.is_empty() || !matches!(head.method, Method::GET | Method::HEAD) {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        }
        if !headers.contains_key(header::HOST) {
            // An HTTP/1.0 client may send none; HTTP/1.1 requires one.
            let host = head
                .uri
                .authority()
                .map(|a| a.as_str().to_owned())
                .or_else(|| upstream.sni().map(str::to_owned))
                .unwrap_or_else(|| upstream.address().to_string());
            if let Ok(value) = HeaderValue::from_str(&host) {
                headers.insert(header::HOST, value);
            }
        }
        append_forwarded_for(&mut headers, client_ip);
        // Origin form: an absolute-form request URI from a client is rewritten.
        let uri = head
            .uri
            .path_and_query()
            .map_or_else(|| Uri::from_static("/"), |pq| Uri::from(pq.clone()));
        Outgoing {
            method: head.method,
            uri,
            headers,
            body,
        }
    }

    fn to_request(&self) -> Request<Full<Bytes>> {
        let mut req = Request::new(Full::new(self.body.clone()));
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = Version::HTTP_11;
        *req.headers_mut() = self.headers.clone();
        req
    }
}

/// Sends `outgoing` upstream, retrying per the module's retry rule, and returns the
/// client's response.
async fn forward(
    config: &ProxyConfig,
    outgoing: &Outgoing,
) -> Result<Response<Full<Bytes>>, ProxyError> {
    // Each failed attempt on a reused connection closes that connection, so this bound is
    // only reached if the pool keeps handing out broken connections as fast as they fail.
    let max_attempts = config.connector.options().max_idle_per_peer + 1;
    let mut attempts = 0;
    loop {
        attempts += 1;
        let conn = config
            .connector
            .get(&config.upstream)
            .await
            .map_err(ProxyError::Connect)?;
        let reused = conn.reused();
        match exchange(conn, outgoing.to_request(), config).await {
            Ok(done) => {
                if let Some(conn) = done.reusable {
                    config.connector.release(conn);
                }
                return Ok(client_response(done.head, done.body, reused));
            }
            Err(failure)
                if reused && attempts < max_attempts && failure.may_retry(&outgoing.method) => {}
            Err(failure) => return Err(ProxyError::Upstream { failure, reused }),
        }
    }
}

/// A finished exchange: the response, and the connection if it may be reused.
struct Exchanged {
    head: response::Parts,
    body: Bytes,
    reusable: Option<Connection>,
}

/// One request/response exchange on `conn`.
async fn exchange(
    conn: Connection,
    req: Request<Full<Bytes>>,
    config: &ProxyConfig,
) -> Result<Exchanged, AttemptError> {
    let method = req.method().clone();
    let progress = Arc::new(Progress::default());
    let io = TokioIo::new(Tracked {
        conn,
        progress: Arc::clone(&progress),
    });
    let failed = |cause| AttemptError {
        cause,
        request_written: progress.written.load(Ordering::Relaxed),
        response_started: progress.read.load(Ordering::Relaxed),
    };
    // No I/O happens here: hyper only sets up its state around `io`.
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| failed(Cause::Http(e)))?;

    let max_body = config.max_body;
    let request = async move {
        let response = sender.send_request(req).await.map_err(Cause::Http)?;
        let (head, body) = response.into_parts();
        let body = Limited::new(body, max_body)
            .collect()
            .await
            .map_err(Cause::Body)?
            .to_bytes();
        // `sender` is dropped here: with no more requests to come, hyper's connection task
        // finishes and hands the I/O back instead of waiting for the next request.
        Ok::<_, Cause>((head, body))
    };
    // `without_shutdown`: when it is done, give the connection back rather than close it.
    let both = async { tokio::join!(request, connection.without_shutdown()) };
    let (response, parts) = tokio::time::timeout(config.response_timeout, both)
        .await
        .map_err(|_| failed(Cause::Timeout(config.response_timeout)))?;
    let (head, body) = response.map_err(failed)?;

    let reusable = match parts {
        Ok(parts) if keeps_alive(&method, &head) => {
            let hyper::client::conn::http1::Parts { io, read_buf, .. } = parts;
            // Bytes after the response belong to no request: the stream is out of sync.
            // (hyper's connection task already fails on bytes arriving while it is idle,
            // "unexpected message"; this covers what it buffered but did not look at.)
            read_buf.is_empty().then(|| io.into_inner().conn)
        }
        _ => None,
    };
    Ok(Exchanged {
        head,
        body,
        reusable,
    })
}

/// Whether the upstream left the connection open for another request after this response.
fn keeps_alive(method: &Method, head: &response::Parts) -> bool {
    if connection_tokens(&head.headers).any(|t| t.eq_ignore_ascii_case("close")) {
        return false;
    }
    if head.version == Version::HTTP_10
        && !connection_tokens(&head.headers).any(|t| t.eq_ignore_ascii_case("keep-alive"))
    {
        return false;
    }
    if head.version != Version::HTTP_10 && head.version != Version::HTTP_11 {
        return false;
    }
    // A body without a length or chunked framing ends when the upstream closes.
    let bodyless = *method == Method::HEAD
        || head.status.is_informational()
        || head.status == StatusCode::NO_CONTENT
        || head.status == StatusCode::NOT_MODIFIED;
    let chunked = head
        .headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .next_back()
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.rsplit(',').next())
        .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
    let has_te = head.headers.contains_key(header::TRANSFER_ENCODING);
    bodyless || chunked || (!has_te && head.headers.contains_key(header::CONTENT_LENGTH))
}

/// Builds the client's response from the upstream's, without hop-by-hop headers.
fn client_response(head: response::Parts, body: Bytes, reused: bool) -> Response<Full<Bytes>> {
    let mut headers = head.headers;
    strip_hop_by_hop(&mut headers);
    headers.insert(
        HeaderName::from_static(REUSED_HEADER),
        HeaderValue::from_static(if reused { "true" } else { "false" }),
    );
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = head.status;
    *response.headers_mut() = headers;
    response
}

fn plain_response(status: StatusCode, text: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(text.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Hop-by-hop headers (RFC 9110 §7.6.1, plus the legacy ones proxies still strip).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = connection_tokens(headers)
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
}

/// The comma-separated tokens of every `Connection` header.
fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Appends the client's address to `X-Forwarded-For`.
fn append_forwarded_for(headers: &mut HeaderMap, client_ip: HeaderValue) {
    const XFF: &str = "x-forwarded-for";
    if !headers.contains_key(XFF) {
        headers.insert(XFF, client_ip);
        return;
    }
    let mut chain: Vec<&[u8]> = headers
        .get_all(XFF)
        .iter()
        .map(HeaderValue::as_bytes)
        .collect();
    chain.push(client_ip.as_bytes());
    if let Ok(value) = HeaderValue::from_bytes(&chain.join(&b", "[..])) {
        headers.insert(XFF, value);
    }
}

/// Whether a method may be sent twice with the effect of once (RFC 9110 §9.2.2).
fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Why one attempt failed, and how far it got.
#[derive(Debug)]
struct AttemptError {
    cause: Cause,
    /// At least one request byte was handed to the connection.
    request_written: bool,
    /// At least one response byte arrived.
    response_started: bool,
}

#[derive(Debug)]
enum Cause {
    Http(hyper::Error),
    Body(Box<dyn StdError + Send + Sync>),
    Timeout(Duration),
}

impl AttemptError {
    /// Whether this failure, on a reused connection, allows sending the request again.
    fn may_retry(&self, method: &Method) -> bool {
        if self.response_started {
            return false;
        }
        let Cause::Http(e) = &self.cause else {
            return false;
        };
        if !connection_failed(e) {
            return false;
        }
        // Nothing written: the upstream cannot have seen the request, whatever its method.
        !self.request_written || is_idempotent(method)
    }
}

/// Whether hyper's error means the connection broke (closed, reset), as opposed to a
/// malformed response or a local problem.
fn connection_failed(e: &hyper::Error) -> bool {
    // `is_canceled`: the connection closed before the request was sent;
    // `is_incomplete_message`: it closed before a complete response arrived.
    if e.is_canceled() || e.is_incomplete_message() {
        return true;
    }
    let mut source = e.source();
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<io::Error>() {
            // The pool marks I/O errors on a reused connection before its first response
            // byte; other I/O errors (no pool error inside) are plain transport failures.
            return Error::from_io(io).is_none_or(|pool_err| pool_err.retryable());
        }
        source = err.source();
    }
    false
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cause::Http(e) => match e.source() {
                Some(source) => write!(f, "{e}: {source}"),
                None => write!(f, "{e}"),
            },
            Cause::Body(e) if e.is::<LengthLimitError>() => f.write_str("response body too large"),
            Cause::Body(e) => write!(f, "reading the response body: {e}"),
            Cause::Timeout(d) => write!(f, "no complete response within {d:?}"),
        }
    }
}

/// Why a request could not be proxied.
#[derive(Debug)]
enum ProxyError {
    /// `Connector::get` failed.
    Connect(Error),
    /// The last attempt failed on the connection.
    Upstream { failure: AttemptError, reused: bool },
}

impl ProxyError {
    /// The status the client gets: 504 for timeouts, 502 otherwise (as nginx answers).
    fn status(&self) -> StatusCode {
        let timed_out = match self {
            ProxyError::Connect(e) => matches!(
                e.kind(),
                ErrorKind::ConnectTimedout | ErrorKind::TlsHandshakeTimedout
            ),
            ProxyError::Upstream { failure, .. } => matches!(failure.cause, Cause::Timeout(_)),
        };
        if timed_out {
            StatusCode::GATEWAY_TIMEOUT
        } else {
            StatusCode::BAD_GATEWAY
        }
    }
}

impl std::fmt::Display for ProxyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProxyError::Connect(e) => write!(f, "upstream connect failed: {e}"),
            ProxyError::Upstream { failure, reused } => write!(
                f,
                "upstream exchange failed on a {} connection: {}",
                if *reused { "reused" } else { "new" },
                failure.cause
            ),
        }
    }
}

/// What happened on a [`Tracked`] connection, readable after hyper has consumed it.
#[derive(Debug, Default)]
struct Progress {
    read: AtomicBool,
    written: AtomicBool,
}

/// A pooled connection that records whether any byte was written to or read from it.
///
/// The pool marks *errors* on a reused connection before the first response byte, but a
/// connection the upstream closed cleanly gives EOF, not an error; this tells the two apart
/// from "the response had started".
struct Tracked {
    conn: Connection,
    progress: Arc<Progress>,
}

impl AsyncRead for Tracked {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.conn).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.progress.read.store(true, Ordering::Relaxed);
        }
        poll
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.conn).poll_write(cx, buf);
        if matches!(poll, Poll::Ready(Ok(n)) if n > 0) {
            this.progress.written.store(true, Ordering::Relaxed);
        }
        poll
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.conn).poll_write_vectored(cx, bufs);
        if matches!(poll, Poll::Ready(Ok(n)) if n > 0) {
            this.progress.written.store(true, Ordering::Relaxed);
        }
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.conn.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().conn).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().conn).poll_shutdown(cx)
    }
}

/// Command-line settings.
#[derive(Debug)]
struct Args {
    listen: SocketAddr,
    upstream: SocketAddr,
    sni: String,
    ca: Option<PathBuf>,
    insecure: bool,
    threads: usize,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let (mut listen, mut upstream, mut sni, mut ca) = (None, None, None, None);
    let (mut insecure, mut threads) = (false, 1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--listen" => listen = Some(parse_addr(&value()?)?),
            "--upstream" => upstream = Some(parse_addr(&value()?)?),
            "--sni" => sni = Some(value()?),
            "--ca" => ca = Some(PathBuf::from(value()?)),
            "--insecure" => insecure = true,
            "--threads" => {
                threads = value()?
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or("--threads needs a positive number")?;
            }
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(Args {
        listen: listen.ok_or("--listen is required")?,
        upstream: upstream.ok_or("--upstream is required")?,
        sni: sni.ok_or("--sni is required")?,
        ca,
        insecure,
        threads,
    })
}

fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse()
        .map_err(|e| format!("{s:?} is not an IP:port address: {e}"))
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(problem) => {
            if !problem.is_empty() {
                eprintln!("reverse_proxy: {problem}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let runtime = if args.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()
    };
    let result = runtime
        .map_err(|e| -> Box<dyn StdError> { Box::new(e) })
        .and_then(|rt| rt.block_on(run(args)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("reverse_proxy: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), Box<dyn StdError>> {
    let mut upstream = Peer::tls(args.upstream, args.sni);
    if let Some(path) = &args.ca {
        let pem = std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        let cas = openssl::x509::X509::stack_from_pem(&pem)
            .map_err(|e| format!("parsing {}: {e}", path.display()))?;
        upstream = upstream.with_ca(cas);
    }
    if args.insecure {
        upstream = upstream.with_verify_cert(false).with_verify_hostname(false);
    }
    // Report a bad setting now rather than on the first request.
    upstream.key()?;
    let connector = Connector::new(ConnectorOptions::default())?;
    let listener = TcpListener::bind(args.listen).await?;
    eprintln!(
        "reverse_proxy: listening on http://{} -> https://{} ({} thread{})",
        listener.local_addr()?,
        args.upstream,
        args.threads,
        if args.threads == 1 { "" } else { "s" }
    );
    serve(listener, ProxyConfig::new(connector, upstream)).await;
    Ok(())
}
