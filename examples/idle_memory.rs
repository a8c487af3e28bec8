//! Memory per idle TLS connection, ours against bare tokio-openssl: opens N (default 10,000)
//! TLS connections to an upstream in another process, optionally makes one HTTP/1.1 request
//! on each, keeps them all idle, and reports how much this process's resident set grew per
//! idle connection (`VmRSS` in `/proc/self/status`), next to glibc's heap figure (`mallinfo2`)
//! so that fragmentation shows.
//!
//! ```text
//! cargo run --release --example idle_memory                        # ours, resumption on
//! cargo run --release --example idle_memory -- 2000 --full         # ours, every handshake full
//! cargo run --release --example idle_memory -- 3000 --bare         # bare tokio-openssl
//! cargo run --release --example idle_memory -- 3000 --bare-resumed # bare, sessions reused
//! cargo run --release --example idle_memory -- 3000 --request \
//!     --upstream 127.0.0.1:8443 --ca ca.pem --sni localhost         # against nginx, one request each
//! ```
//!
//! Modes:
//! - ours (default): the library's defaults apart from the idle caps (raised to fit N) and the
//!   idle timeout (10 minutes); connections go back to the pool with `Connector::release`.
//! - `--full`: ours with session resumption off for the peer.
//! - `--bare`: an `openssl::ssl::SslConnector` (the crate's defaults plus the CA and
//!   read-ahead, as ours sets) and a `tokio_openssl::SslStream` over a `TcpStream`; the streams
//!   are kept in a `Vec`. Full handshakes.
//! - `--bare-resumed`: the same, with the newest session (from the context's new-session
//!   callback) offered to every new connection, as a client that resumes naively would.
//!
//! Without `--upstream` the upstream is this same binary re-executed as a child process
//! (`benches/common/http_upstream.rs`: TLS, two TLS 1.3 tickets per full handshake, HTTP/1.1
//! keep-alive answering `ok`): one process cannot hold both ends of 10,000 connections, and a
//! server in this process would add its own memory to the count. With `--upstream` it is any
//! TLS server (the script `benches/idle_memory_vs_bare.sh` starts nginx).
//!
//! Measurement: the client runs on a current-thread runtime (one malloc arena). The baseline
//! is taken after one connection of the mode went through the whole cycle, so one-time
//! allocations (TLS context, CA store, runtime, metric handles) are not counted. After the N
//! connections are open and idle, the example waits `--settle-ms` (default 1,500 ms): ours
//! has its reaper pass over every idle connection meanwhile, whose liveness check reads the
//! TLS 1.3 session tickets that arrived after the handshake. Bare code never reads while idle,
//! so a ticket still on the socket stays in the kernel (not RSS): the first bare figure is
//! taken as is, the second after one non-blocking read on every stream (what our reaper
//! does), which is the comparable one. With `--request` the tickets are read with the
//! response anyway. Kernel socket buffers are not part of RSS and are not counted.
//!
//! Every run checks with the server that it really holds the connections: the child's
//! `/stats` (connections accepted) or nginx's `stub_status` at `--status-path` ("Active
//! connections"), asked on a connection of its own after the measurement.
//!
//! The last line is machine-readable (`RESULT key=value ...`) for the script. The process
//! exits without closing the connections (the measurement is over, and 10,000 closes cost
//! seconds), which also makes a heap profiler's "still allocated at exit" report exactly the
//! idle state: `heaptrack target/release/examples/idle_memory 1000 --bare`.

#[path = "../benches/common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use openssl::ssl::{SslConnector, SslMethod, SslSession, SslSessionCacheMode};
use openssl::x509::X509;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio_openssl::SslStream;
use upstream_pool::{Connection, Connector, ConnectorOptions, Peer};

use common::certs::TestPki;
use common::child::{ChildUpstream, Upstream};

/// Dials in flight at once while opening the connections.
const CONCURRENCY: usize = 64;

const USAGE: &str = "usage: idle_memory [N] [--full | --bare | --bare-resumed] [--request] \
[--upstream HOST:PORT --ca CA.pem [--sni NAME] [--status-path PATH]] [--settle-ms MS]";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Ours,
    OursFull,
    Bare,
    BareResumed,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Ours => "ours-resumed",
            Mode::OursFull => "ours-full",
            Mode::Bare => "bare-full",
            Mode::BareResumed => "bare-resumed",
        }
    }
}

#[derive(Debug)]
struct Args {
    n: usize,
    mode: Mode,
    request: bool,
    upstream: Option<SocketAddr>,
    ca: Option<PathBuf>,
    sni: String,
    status_path: String,
    settle: Duration,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        n: 10_000,
        mode: Mode::Ours,
        request: false,
        upstream: None,
        ca: None,
        sni: "localhost".to_string(),
        status_path: "/status".to_string(),
        settle: Duration::from_millis(1500),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--full" => args.mode = Mode::OursFull,
            "--bare" => args.mode = Mode::Bare,
            "--bare-resumed" => args.mode = Mode::BareResumed,
            "--request" => args.request = true,
            "--upstream" => {
                let v = value("--upstream")?;
                args.upstream = Some(v.parse().map_err(|e| format!("--upstream {v}: {e}"))?);
            }
            "--ca" => args.ca = Some(value("--ca")?.into()),
            "--sni" => args.sni = value("--sni")?,
            "--status-path" => args.status_path = value("--status-path")?,
            "--settle-ms" => {
                let v = value("--settle-ms")?;
                let ms = v.parse().map_err(|e| format!("--settle-ms {v}: {e}"))?;
                args.settle = Duration::from_millis(ms);
            }
            other => {
                args.n = other
                    .parse()
                    .map_err(|_| format!("unknown argument {other}"))?
            }
        }
    }
    if args.upstream.is_some() != args.ca.is_some() {
        return Err("--upstream and --ca go together".to_string());
    }
    Ok(args)
}

fn main() {
    common::child::run_if_child();
    let args = parse_args().unwrap_or_else(|e| {
        eprintln!("idle_memory: {e}\n{USAGE}");
        std::process::exit(2);
    });
    let n = args.n;
    let limit = common::raise_nofile_limit();
    if (limit as usize) < n + 256 {
        eprintln!("the open-file limit is {limit}; {n} connections need about {n} + 256");
        std::process::exit(1);
    }

    // The upstream: the given one (nginx), or a child process of our own.
    let pki = TestPki::new();
    let dir = common::certs_dir();
    let (addr, ca, _child): (SocketAddr, Vec<X509>, Option<ChildUpstream>) =
        match (&args.upstream, &args.ca) {
            (Some(addr), Some(ca)) => {
                let pem = std::fs::read(ca).unwrap_or_else(|e| {
                    eprintln!("idle_memory: cannot read {}: {e}", ca.display());
                    std::process::exit(2);
                });
                let certs = X509::stack_from_pem(&pem).unwrap_or_else(|e| {
                    eprintln!(
                        "idle_memory: {} holds no PEM certificate: {e}",
                        ca.display()
                    );
                    std::process::exit(2);
                });
                (*addr, certs, None)
            }
            _ => {
                let files = pki
                    .server
                    .write_pem(dir.path(), "server")
                    .expect("write the server certificate");
                let child = ChildUpstream::spawn(&Upstream::Http {
                    chain: files.chain,
                    key: files.key,
                })
                .expect("start the child upstream");
                (child.addr(), pki.ca_a(), Some(child))
            }
        };

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let result = rt.block_on(async {
        match args.mode {
            Mode::Ours | Mode::OursFull => run_ours(&args, addr, &ca).await,
            Mode::Bare | Mode::BareResumed => run_bare(&args, addr, &ca).await,
        }
    });

    // What the server observed: it must hold (at least) every connection we count.
    let observed = rt.block_on(server_connections(&args, addr, &ca));
    let upstream = if args.upstream.is_some() {
        "external"
    } else {
        "child"
    };
    println!(
        "idle_memory: {} {n} idle TLS connections to the {upstream} upstream ({} resumed, {} \
         request each, opened in {:.1} s; server: {observed}): VmRSS {} KiB -> {} KiB, {:.1} \
         KiB per idle connection{}; glibc heap in use {:.1} KiB per connection",
        args.mode.name(),
        result.resumed,
        if args.request { "one" } else { "no" },
        result.opened.as_secs_f64(),
        result.before_kib,
        result.after_kib,
        result.per_kib(result.after_kib),
        result
            .drained_kib
            .map(|d| format!(
                " ({:.1} KiB after reading what was pending on each)",
                result.per_kib(d)
            ))
            .unwrap_or_default(),
        result.heap_per_kib,
    );
    // Ours reads the pending tickets in the reaper; for bare, the comparable figure is the one
    // after the explicit read.
    let comparable = result.drained_kib.unwrap_or(result.after_kib);
    println!(
        "RESULT mode={} upstream={upstream} n={n} request={} resumed={} rss_per_kib={:.2} \
         rss_as_is_per_kib={:.2} heap_per_kib={:.2} server={}",
        args.mode.name(),
        args.request,
        result.resumed,
        result.per_kib(comparable),
        result.per_kib(result.after_kib),
        result.heap_per_kib,
        observed.replace(' ', "_"),
    );
    if args.mode == Mode::BareResumed && result.resumed <= n / 2 {
        // Bare code learns a TLS 1.3 session only when it reads the server's tickets; without a
        // request it never reads, so against a server that sends them after the handshake (the
        // child; nginx's arrive within it) there is nothing to resume.
        eprintln!(
            "idle_memory: bare-resumed resumed {} of {n}: it never read the tickets",
            result.resumed
        );
    } else {
        let expected_resumed = matches!(args.mode, Mode::Ours | Mode::BareResumed);
        assert!(
            (result.resumed > n / 2) == expected_resumed,
            "{}: {} of {n} handshakes resumed",
            args.mode.name(),
            result.resumed
        );
    }
    // Exit with everything still open: see the module documentation.
    std::process::exit(0);
}

/// What one run measured.
#[derive(Debug)]
struct Measured {
    n: usize,
    resumed: usize,
    opened: Duration,
    before_kib: u64,
    after_kib: u64,
    /// Bare only: after one non-blocking read on every stream.
    drained_kib: Option<u64>,
    heap_per_kib: f64,
}

impl Measured {
    fn per_kib(&self, after: u64) -> f64 {
        after.saturating_sub(self.before_kib) as f64 / self.n.max(1) as f64
    }
}

async fn run_ours(args: &Args, addr: SocketAddr, ca: &[X509]) -> Measured {
    let n = args.n;
    let mut options = ConnectorOptions::default();
    options.max_idle_per_peer = n;
    options.max_idle_total = n;
    options.idle_timeout = Duration::from_secs(600);
    let connector = Connector::new(options).expect("connector");
    let peer = Peer::tls(addr, args.sni.as_str())
        .with_ca(ca.to_vec())
        .with_session_resumption(args.mode == Mode::Ours);

    async fn one(
        connector: Connector,
        peer: Peer,
        request: bool,
        host: String,
    ) -> Result<Connection, String> {
        let mut conn = connector.get(&peer).await.map_err(|e| e.to_string())?;
        if request {
            exchange(&mut conn, &host)
                .await
                .map_err(|e| format!("request: {e}"))?;
        }
        Ok(conn)
    }

    // Warm up: one connection through the whole cycle, then settle.
    let conn = one(
        connector.clone(),
        peer.clone(),
        args.request,
        args.sni.clone(),
    )
    .await
    .expect("first connection");
    connector.release(conn);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let before_kib = common::rss_kib();
    let heap_before = heap_in_use();

    let start = Instant::now();
    let mut held = Vec::with_capacity(n);
    let mut set = JoinSet::new();
    let mut started = 0;
    while held.len() < n {
        while started < n && set.len() < CONCURRENCY {
            let task = one(
                connector.clone(),
                peer.clone(),
                args.request,
                args.sni.clone(),
            );
            set.spawn(task);
            started += 1;
        }
        let conn = set
            .join_next()
            .await
            .expect("a dial is in flight")
            .expect("join")
            .expect("dial");
        held.push(conn);
    }
    let opened = start.elapsed();
    let resumed = held
        .iter()
        .filter(|c| c.digest().is_some_and(|d| d.session_reused))
        .count();
    // The first `get` takes the warm-up connection back out of the pool; the baseline
    // already holds that one.
    let new = held.iter().filter(|c| !c.reused()).count();
    for conn in held {
        connector.release(conn);
    }
    // Let the reaper pass over every idle connection (it reads TLS 1.3 tickets that arrived
    // after the handshake, after which OpenSSL releases the read buffer).
    tokio::time::sleep(args.settle).await;
    let idle = connector.idle_count();
    assert_eq!(idle, n, "every connection is idle in the pool");
    let after_kib = common::rss_kib();
    let heap_per_kib = heap_in_use().saturating_sub(heap_before) as f64 / 1024.0 / new as f64;
    // Keep the connector (and its pool) alive past the measurement.
    std::mem::forget(connector);
    Measured {
        n: new,
        resumed,
        opened,
        before_kib,
        after_kib,
        drained_kib: None,
        heap_per_kib,
    }
}

async fn run_bare(args: &Args, addr: SocketAddr, ca: &[X509]) -> Measured {
    let n = args.n;
    let mut b = SslConnector::builder(SslMethod::tls_client()).expect("client builder");
    for c in ca {
        b.cert_store_mut().add_cert(c.clone()).expect("add CA");
    }
    // As our connector does (src/connect/tls.rs).
    b.set_read_ahead(true);
    let latest: Arc<Mutex<Option<SslSession>>> = Arc::default();
    if args.mode == Mode::BareResumed {
        let feed = Arc::clone(&latest);
        b.set_session_cache_mode(SslSessionCacheMode::CLIENT | SslSessionCacheMode::NO_INTERNAL);
        b.set_new_session_callback(move |_, session| {
            *feed.lock().expect("session slot") = Some(session);
        });
    }
    let connector = Arc::new(b.build());

    async fn one(
        connector: Arc<SslConnector>,
        latest: Arc<Mutex<Option<SslSession>>>,
        addr: SocketAddr,
        sni: String,
        request: bool,
    ) -> std::io::Result<SslStream<TcpStream>> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let mut ssl = connector
            .configure()
            .and_then(|c| c.into_ssl(&sni))
            .map_err(std::io::Error::other)?;
        let offer = latest.lock().expect("session slot").clone();
        if let Some(session) = offer {
            // SAFETY: every session in `latest` came from this connector's new-session
            // callback, so from the same SSL_CTX as `ssl`, which is what `set_session`
            // requires.
            #[allow(unsafe_code, reason = "the openssl crate's set_session is unsafe")]
            unsafe {
                ssl.set_session(&session).map_err(std::io::Error::other)?;
            }
        }
        let mut tls = SslStream::new(ssl, tcp).map_err(std::io::Error::other)?;
        Pin::new(&mut tls)
            .connect()
            .await
            .map_err(std::io::Error::other)?;
        if request {
            exchange(&mut tls, &sni).await?;
        }
        Ok(tls)
    }

    let first = one(
        connector.clone(),
        latest.clone(),
        addr,
        args.sni.clone(),
        args.request,
    )
    .await
    .expect("first connection");
    tokio::time::sleep(Duration::from_millis(600)).await;
    let before_kib = common::rss_kib();
    let heap_before = heap_in_use();

    let start = Instant::now();
    let mut held = Vec::with_capacity(n + 1);
    held.push(first);
    let mut set = JoinSet::new();
    let mut started = 0;
    while held.len() < n + 1 {
        while started < n && set.len() < CONCURRENCY {
            set.spawn(one(
                connector.clone(),
                latest.clone(),
                addr,
                args.sni.clone(),
                args.request,
            ));
            started += 1;
        }
        let tls = set
            .join_next()
            .await
            .expect("a dial is in flight")
            .expect("join")
            .expect("dial");
        held.push(tls);
    }
    let opened = start.elapsed();
    let resumed = held[1..]
        .iter()
        .filter(|s| s.ssl().session_reused())
        .count();
    tokio::time::sleep(args.settle).await;
    let after_kib = common::rss_kib();
    // One non-blocking read on each, as our reaper's liveness check does: OpenSSL processes
    // the tickets waiting on the socket, builds their sessions, and releases its read buffer.
    let mut unexpected = 0;
    for tls in &mut held {
        if read_pending(tls).await {
            unexpected += 1;
        }
    }
    assert_eq!(
        unexpected, 0,
        "no application data arrives on an idle stream"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let drained_kib = common::rss_kib();
    let heap_per_kib = heap_in_use().saturating_sub(heap_before) as f64 / 1024.0 / n as f64;
    std::mem::forget(held);
    std::mem::forget(connector);
    Measured {
        n,
        resumed,
        opened,
        before_kib,
        after_kib,
        drained_kib: Some(drained_kib),
        heap_per_kib,
    }
}

/// Polls one read on `tls` without waiting; true if application data (or EOF) came back.
async fn read_pending(tls: &mut SslStream<TcpStream>) -> bool {
    tokio::task::unconstrained(std::future::poll_fn(|cx| {
        let mut byte = [0u8; 1];
        let mut buf = ReadBuf::new(&mut byte);
        Poll::Ready(Pin::new(&mut *tls).poll_read(cx, &mut buf).is_ready())
    }))
    .await
}

/// One HTTP/1.1 GET and its whole response (the body announced by `content-length`).
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, host: &str) -> std::io::Result<()> {
    let request = format!("GET / HTTP/1.1\r\nhost: {host}\r\n\r\n");
    s.write_all(request.as_bytes()).await?;
    let body = read_response(s).await?;
    if body.is_empty() {
        return Err(std::io::Error::other("empty response body"));
    }
    Ok(())
}

/// Reads one response with a `content-length` body; returns the body.
async fn read_response<S: AsyncRead + Unpin>(s: &mut S) -> std::io::Result<Vec<u8>> {
    let mut response = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::other("the server closed mid-response"));
        }
        response.extend_from_slice(&chunk[..n]);
        let Some(end) = response.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&response[..end]).to_ascii_lowercase();
        if !head.starts_with("http/1.1 200") {
            return Err(std::io::Error::other(format!(
                "unexpected response: {head}"
            )));
        }
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| std::io::Error::other("response without content-length"))?;
        if response.len() >= end + 4 + length {
            return Ok(response[end + 4..end + 4 + length].to_vec());
        }
    }
}

/// What the server says it holds: the child's `/stats` or nginx's `stub_status`, asked on a
/// connection of its own.
async fn server_connections(args: &Args, addr: SocketAddr, ca: &[X509]) -> String {
    let path = if args.upstream.is_some() {
        args.status_path.as_str()
    } else {
        "/stats"
    };
    let mut b = SslConnector::builder(SslMethod::tls_client()).expect("client builder");
    for c in ca {
        b.cert_store_mut().add_cert(c.clone()).expect("add CA");
    }
    let connector = b.build();
    let tcp = TcpStream::connect(addr).await.expect("status: connect");
    let ssl = connector
        .configure()
        .and_then(|c| c.into_ssl(&args.sni))
        .expect("status: ssl");
    let mut tls = SslStream::new(ssl, tcp).expect("status: stream");
    Pin::new(&mut tls)
        .connect()
        .await
        .expect("status: handshake");
    let request = format!("GET {path} HTTP/1.1\r\nhost: {}\r\n\r\n", args.sni);
    tls.write_all(request.as_bytes())
        .await
        .expect("status: write");
    let body = read_response(&mut tls).await.expect("status: response");
    let body = String::from_utf8_lossy(&body).to_string();
    // The child counts handshakes completed (the warm-up and this one included); nginx counts
    // connections open now (this one included).
    let (label, held) = if let Some(rest) = body
        .split_whitespace()
        .find_map(|w| w.strip_prefix("connections="))
    {
        ("accepted", rest.parse::<usize>().unwrap_or(0))
    } else if let Some(rest) = body.strip_prefix("Active connections:") {
        (
            "active",
            rest.split_whitespace()
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
        )
    } else {
        panic!("status: unexpected body {body:?}");
    };
    assert!(
        held > args.n,
        "the server holds {held} connections ({label}), fewer than the {} counted plus ours",
        args.n
    );
    format!("{held} {label}")
}

/// Bytes glibc's allocator has handed out and not got back (`mallinfo2().uordblks`, main
/// arena plus mmapped chunks): the heap the program uses, against RSS, which also counts the
/// free holes malloc cannot return to the kernel.
#[allow(
    unsafe_code,
    reason = "mallinfo2 has no safe wrapper in our dependencies"
)]
fn heap_in_use() -> usize {
    // SAFETY: mallinfo2 takes no arguments and returns a plain struct by value; it only reads
    // the allocator's statistics.
    let info = unsafe { libc::mallinfo2() };
    info.uordblks + info.hblkhd
}
