//! A streaming reverse proxy on hyper's server and `upstream_pool::http`.
//!
//! ```text
//! cargo run --release --example reverse_proxy -- --listen 127.0.0.1:8080 \
//!     --upstream 127.0.0.1:8443 --sni localhost --ca ca.pem [--alpn h1|h2|h2h1] \
//!     [--insecure] [--threads N]
//! ```
//!
//! **Clients** speak HTTP/1.1 or HTTP/2 over plain TCP (h2c with prior knowledge):
//! `hyper_util::server::conn::auto` looks at the first bytes of each connection and picks.
//! (For TLS towards clients, accept with `tokio-openssl` first and hand the stream to the
//! same builder; nothing below changes.)
//!
//! **Upstream**: one TLS peer, reached through [`HttpConnector::send`]. The protocol is the
//! ALPN outcome: `--alpn h1` HTTP/1.1 (a pooled connection per request in flight), `h2` HTTP/2
//! (many requests share one connection), `h2h1` (the default) whatever the upstream picks.
//! The library owns everything about connections: pooling, returning an HTTP/1.1 connection
//! to the pool when its response body ends cleanly, sharing HTTP/2 connections up to the
//! server's stream limit, and retrying, once and on a fresh connection, a request that failed
//! on a reused connection before the upstream sent a single byte, when its body is empty (so
//! nothing of it can have been acted on twice). Anything else that fails is a `502` here (a
//! `504` for a timeout): a request whose body was already streamed cannot be sent again.
//!
//! **Bodies stream both ways**: the client's request body is handed to the library as it
//! arrives, and the upstream's response body (hyper's `Incoming` and the library's
//! `ResponseBody` are both `http_body::Body`s) goes to the client frame by frame, trailers
//! included (gRPC puts its status there). Memory per request stays a few buffers whatever
//! the body size; a slow client slows the upstream read through flow control, not a buffer.
//!
//! Every response carries `x-upstream-reused: true|false` (from the library's
//! [`UpstreamInfo`]), so pool reuse is visible from the outside. Hop-by-hop headers
//! (`Connection` and the headers it names, `Keep-Alive`, `TE` except `TE: trailers`,
//! `Transfer-Encoding`, `Upgrade`, ...) are not forwarded in either direction; `Host` is, and
//! the client's address is appended to `X-Forwarded-For`.

use std::convert::Infallible;
use std::error::Error as StdError;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{Either, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use upstream_pool::http::{HttpConnector, ResponseBody, UpstreamInfo};
use upstream_pool::{Alpn, Connector, ConnectorOptions, ErrorKind, Peer};

/// Response header telling whether the upstream connection that produced this response
/// already existed (`true`: a pooled HTTP/1.1 connection or an open HTTP/2 one) or was dialled
/// for it (`false`); after a retry, it describes the connection of the successful attempt.
pub(crate) const REUSED_HEADER: &str = "x-upstream-reused";

const USAGE: &str = "usage: reverse_proxy --listen ADDR --upstream ADDR --sni NAME \
[--ca PEM_FILE] [--alpn h1|h2|h2h1] [--insecure] [--threads N]

  --listen ADDR     where clients connect (HTTP/1.1 or h2c), e.g. 127.0.0.1:8080
  --upstream ADDR   the TLS upstream, e.g. 127.0.0.1:8443
  --sni NAME        server name sent to and verified against the upstream
  --ca PEM_FILE     trust these CA certificates instead of the system roots
  --alpn PROTO      upstream protocol: h1, h2, or h2h1 (the upstream picks; the default)
  --insecure        do not verify the upstream's certificate
  --threads N       tokio worker threads; 1 (the default) runs a current-thread runtime";

/// The body of every response the proxy sends: the upstream's, streamed, or a short error
/// of its own.
type ProxyBody = Either<ResponseBody, Full<Bytes>>;

/// What the proxy forwards to, and its limits.
#[derive(Debug, Clone)]
pub(crate) struct ProxyConfig {
    /// The HTTP client every upstream request goes through (shares `connector`'s pool).
    pub(crate) http: HttpConnector,
    /// The one upstream all requests go to.
    pub(crate) upstream: Peer,
    /// How long `send` may take: until the upstream's response head, from when the request
    /// is handed over. Over HTTP/1.1 that includes streaming the request body, which the
    /// library sends in full before it reads the response. Defaults to 60 s (nginx's
    /// `proxy_read_timeout`). The response body is not timed: a long download is fine as
    /// long as it moves, and a client that gives up drops it, which closes (HTTP/1.1) or
    /// resets (HTTP/2) the upstream side.
    pub(crate) response_timeout: Duration,
}

impl ProxyConfig {
    /// Forwards to `upstream` through `connector`, with the default limits.
    pub(crate) fn new(connector: Connector, upstream: Peer) -> ProxyConfig {
        ProxyConfig {
            http: HttpConnector::new(connector),
            upstream,
            response_timeout: Duration::from_secs(60),
        }
    }
}

/// Accepts clients on `listener` and proxies their requests, until the task is dropped.
///
/// Each client connection is served on its own task. Accept errors (out of file
/// descriptors, a connection reset before it was accepted) are logged and the loop goes on
/// after a short pause.
///
/// # Cancel safety
/// Dropping the future stops accepting; connections already accepted keep being served by
/// their tasks until the client closes them or the runtime shuts down.
pub(crate) async fn serve(listener: TcpListener, config: ProxyConfig) {
    let config = Arc::new(config);
    let mut server = auto::Builder::new(TokioExecutor::new());
    // The HTTP/1.1 header read timeout (30 s by default) needs a timer.
    server.http1().timer(TokioTimer::new());
    server.http2().timer(TokioTimer::new());
    let server = Arc::new(server);
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
        let server = Arc::clone(&server);
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
            let _ = server.serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

/// Handles one client request: rewrite the head, send it with its body still streaming,
/// and hand the upstream's response (body still streaming) to the client.
async fn proxy(
    config: &ProxyConfig,
    req: Request<Incoming>,
    client_ip: HeaderValue,
) -> Response<ProxyBody> {
    let (mut head, body) = req.into_parts();
    upstream_headers(&mut head, client_ip);
    // For the error log; both clones only bump reference counts.
    let (method, path) = (head.method.clone(), head.uri.clone());
    let request = Request::from_parts(head, body);

    let sent = tokio::time::timeout(
        config.response_timeout,
        config.http.send(&config.upstream, request),
    )
    .await;
    match sent {
        Ok(Ok(response)) => client_response(response),
        Ok(Err(e)) => {
            eprintln!("reverse_proxy: {method} {path} failed: {e}");
            let status = if is_timeout(e.kind()) {
                StatusCode::GATEWAY_TIMEOUT
            } else {
                StatusCode::BAD_GATEWAY
            };
            plain_response(status, format!("upstream request failed: {e}\n"))
        }
        Err(_) => {
            // Dropping the `send` future closed (HTTP/1.1) or reset (HTTP/2) the upstream
            // request; the connection is not reused.
            eprintln!(
                "reverse_proxy: {method} {path}: no response head within {:?}",
                config.response_timeout
            );
            plain_response(
                StatusCode::GATEWAY_TIMEOUT,
                "upstream did not respond in time\n",
            )
        }
    }
}

/// Turns the client's request head into the upstream's, in place.
fn upstream_headers(head: &mut hyper::http::request::Parts, client_ip: HeaderValue) {
    // `TE: trailers` is the one TE an HTTP/2 peer accepts, and gRPC servers require it.
    let te_trailers = head
        .headers
        .get(header::TE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    strip_hop_by_hop(&mut head.headers);
    if te_trailers {
        head.headers
            .insert(header::TE, HeaderValue::from_static("trailers"));
    }
    // HTTP/2 clients send the authority in the URI (`:authority`), not in `Host`; keep it
    // as `Host`, which is what the library forwards (as `Host` or `:authority`).
    if !head.headers.contains_key(header::HOST) {
        if let Some(value) = head
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            head.headers.insert(header::HOST, value);
        }
    }
    append_forwarded_for(&mut head.headers, client_ip);
    // Origin form: the upstream gets the path and query, whatever form the client used.
    head.uri = head
        .uri
        .path_and_query()
        .map_or_else(|| Uri::from_static("/"), |pq| Uri::from(pq.clone()));
    // The library speaks whichever version the upstream negotiated.
    head.version = hyper::Version::HTTP_11;
}

/// The client's response: the upstream's status, headers without hop-by-hop ones, and its
/// body as it arrives.
fn client_response(response: Response<ResponseBody>) -> Response<ProxyBody> {
    let reused = response
        .extensions()
        .get::<UpstreamInfo>()
        .is_some_and(|info| info.reused);
    let (mut head, body) = response.into_parts();
    strip_hop_by_hop(&mut head.headers);
    const REUSED: HeaderName = HeaderName::from_static(REUSED_HEADER);
    head.headers.insert(
        REUSED,
        HeaderValue::from_static(if reused { "true" } else { "false" }),
    );
    // hyper's server picks the client's version itself.
    head.version = hyper::Version::HTTP_11;
    Response::from_parts(head, Either::Left(body))
}

fn plain_response(status: StatusCode, text: impl Into<Bytes>) -> Response<ProxyBody> {
    let mut response = Response::new(Either::Right(Full::new(text.into())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Timeouts the client should see as `504 Gateway Timeout`, as nginx answers them.
fn is_timeout(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::ConnectTimedout | ErrorKind::TlsHandshakeTimedout | ErrorKind::PoolTimedout
    )
}

/// Hop-by-hop headers (RFC 9110 §7.6.1, plus the legacy ones proxies still strip).
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
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

/// Command-line settings.
#[derive(Debug)]
struct Args {
    listen: SocketAddr,
    upstream: SocketAddr,
    sni: String,
    ca: Option<PathBuf>,
    alpn: Alpn,
    insecure: bool,
    threads: usize,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let (mut listen, mut upstream, mut sni, mut ca) = (None, None, None, None);
    let (mut alpn, mut insecure, mut threads) = (Alpn::H2H1, false, 1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--listen" => listen = Some(parse_addr(&value()?)?),
            "--upstream" => upstream = Some(parse_addr(&value()?)?),
            "--sni" => sni = Some(value()?),
            "--ca" => ca = Some(PathBuf::from(value()?)),
            "--alpn" => {
                alpn = match value()?.as_str() {
                    "h1" => Alpn::H1,
                    "h2" => Alpn::H2,
                    "h2h1" => Alpn::H2H1,
                    other => return Err(format!("--alpn {other:?}: use h1, h2 or h2h1")),
                }
            }
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
        alpn,
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
    let mut upstream = Peer::tls(args.upstream, args.sni).with_alpn(args.alpn);
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
    // A proxy serving many requests on several cores: let the reaper publish the pool's
    // hit-path gauges (a lag of up to `reap_interval`) so that hits on different cores never
    // write the same cache line (README, "Batched metrics").
    let mut options = ConnectorOptions::default();
    options.batched_metrics = true;
    let connector = Connector::new(options)?;
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
