//! An HTTP upstream for the HTTP-layer benchmarks (`benches/http.rs`, the HTTP/2 rows of
//! `benches/peers`), run in a child process ([`super::child::Upstream::Http`]) so that its CPU
//! time is not spent on the benchmark's thread.
//!
//! TLS (session cache and tickets on) with ALPN: `h2` when the client offers it, else
//! `http/1.1` (also when the client offers no ALPN). HTTP/2 through the `h2` crate's server
//! (up to [`MAX_STREAMS`] concurrent streams), HTTP/1.1 through a minimal keep-alive loop for
//! requests without a body. Every request gets `200`, `content-length: 2`, body `ok`, and the
//! headers `x-conn-id` (the server's connection number, from 0) and `x-req-n` (requests on
//! that connection, from 1), so a benchmark can check which connection served it and that no
//! request was lost or sent twice.
//!
//! `GET /stats` answers with what the server observed so far, as the body
//! `connections=<n> h2=<n> h1=<n> requests=<n>` (the `/stats` request itself not counted).
//! The server answers each HTTP/2 request inline, in the connection's accept loop: it never
//! holds a stream open, so the client's concurrency is bounded by the client alone.

use std::io;
use std::net::TcpListener;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use openssl::ssl::{select_next_proto, AlpnError, Ssl, SslAcceptor, SslFiletype, SslMethod};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_openssl::SslStream;

/// SETTINGS_MAX_CONCURRENT_STREAMS the HTTP/2 server announces: above the client's default
/// `max_h2_streams` (100), so the client's own limit is the one that applies.
pub(crate) const MAX_STREAMS: u32 = 128;

static CONNECTIONS: AtomicU64 = AtomicU64::new(0);
static H2_CONNECTIONS: AtomicU64 = AtomicU64::new(0);
static H1_CONNECTIONS: AtomicU64 = AtomicU64::new(0);
static REQUESTS: AtomicU64 = AtomicU64::new(0);

/// Serves `listener` forever (in the child process); `announce` is called once it accepts.
pub(crate) fn serve(listener: TcpListener, chain: &Path, key: &Path, announce: impl FnOnce()) {
    let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server()).expect("acceptor");
    b.set_certificate_chain_file(chain)
        .expect("certificate chain");
    b.set_private_key_file(key, SslFiletype::PEM)
        .expect("private key");
    b.set_session_id_context(b"upstream-pool-bench-http")
        .expect("session id context");
    b.set_alpn_select_callback(|_, offered| {
        select_next_proto(b"\x02h2\x08http/1.1", offered).ok_or(AlpnError::NOACK)
    });
    let acceptor = Arc::new(b.build());

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("child runtime");
    rt.block_on(async move {
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
        announce();
        loop {
            let (tcp, _) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("child upstream: accept: {e}");
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(ssl) = Ssl::new(acceptor.context()) else {
                    return;
                };
                let Ok(mut tls) = SslStream::new(ssl, tcp) else {
                    return;
                };
                if Pin::new(&mut tls).accept().await.is_err() {
                    return;
                }
                let id = CONNECTIONS.fetch_add(1, Ordering::Relaxed);
                if tls.ssl().selected_alpn_protocol() == Some(b"h2") {
                    H2_CONNECTIONS.fetch_add(1, Ordering::Relaxed);
                    let _ = serve_h2(tls, id).await;
                } else {
                    H1_CONNECTIONS.fetch_add(1, Ordering::Relaxed);
                    let _ = serve_h1(tls, id).await;
                }
            });
        }
    });
}

fn stats_body() -> String {
    format!(
        "connections={} h2={} h1={} requests={}",
        CONNECTIONS.load(Ordering::Relaxed),
        H2_CONNECTIONS.load(Ordering::Relaxed),
        H1_CONNECTIONS.load(Ordering::Relaxed),
        REQUESTS.load(Ordering::Relaxed),
    )
}

async fn serve_h2(
    tls: SslStream<tokio::net::TcpStream>,
    id: u64,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut conn = h2::server::Builder::new()
        .max_concurrent_streams(MAX_STREAMS)
        .handshake::<_, Bytes>(tls)
        .await?;
    let mut n = 0u64;
    while let Some(accepted) = conn.accept().await {
        let (request, mut respond) = accepted?;
        let body = if request.uri().path() == "/stats" {
            Bytes::from(stats_body())
        } else {
            REQUESTS.fetch_add(1, Ordering::Relaxed);
            n += 1;
            Bytes::from_static(b"ok")
        };
        let response = http::Response::builder()
            .status(200)
            .header("content-length", body.len())
            .header("x-conn-id", id)
            .header("x-req-n", n)
            .body(())?;
        let mut send = respond.send_response(response, false)?;
        send.send_data(body, true)?;
    }
    Ok(())
}

async fn serve_h1(mut tls: SslStream<tokio::net::TcpStream>, id: u64) -> io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let mut n = 0u64;
    loop {
        match tls.read(&mut chunk).await? {
            0 => return Ok(()),
            read => buf.extend_from_slice(&chunk[..read]),
        }
        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let stats = buf.starts_with(b"GET /stats ");
            buf.drain(..end + 4);
            let body = if stats {
                stats_body()
            } else {
                REQUESTS.fetch_add(1, Ordering::Relaxed);
                n += 1;
                "ok".to_string()
            };
            let response = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nx-conn-id: {id}\r\nx-req-n: {n}\r\n\r\n{body}",
                body.len()
            );
            tls.write_all(response.as_bytes()).await?;
        }
    }
}

// ------------------------------------------------------------------ the benchmarks' side

/// What the server observed so far; see [`stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ServerStats {
    /// TLS connections accepted (handshake completed), both protocols.
    pub(crate) connections: u64,
    /// Of which HTTP/2.
    pub(crate) h2: u64,
    /// Of which HTTP/1.1.
    pub(crate) h1: u64,
    /// Requests answered (`/stats` not counted).
    pub(crate) requests: u64,
}

impl std::fmt::Display for ServerStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} connections ({} HTTP/2, {} HTTP/1.1), {} requests",
            self.connections, self.h2, self.h1, self.requests
        )
    }
}

/// A `tokio-openssl` client stream to `addr` offering `alpn` (wire format), verifying
/// `localhost` against `ca`: the bare baselines' transport.
pub(crate) async fn client_tls(
    addr: std::net::SocketAddr,
    ca: &[openssl::x509::X509],
    alpn: &[u8],
) -> SslStream<tokio::net::TcpStream> {
    let mut b =
        openssl::ssl::SslConnector::builder(SslMethod::tls_client()).expect("client builder");
    for c in ca {
        b.cert_store_mut().add_cert(c.clone()).expect("add CA");
    }
    b.set_alpn_protos(alpn).expect("ALPN");
    // As our connector does (src/connect/tls.rs): whole records in one read. Without it the
    // bare baselines make two or three reads per record and look slower than they are.
    b.set_read_ahead(true);
    let connector = b.build();
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    tcp.set_nodelay(true).expect("nodelay");
    let ssl = connector
        .configure()
        .and_then(|c| c.into_ssl("localhost"))
        .expect("ssl");
    let mut tls = SslStream::new(ssl, tcp).expect("ssl stream");
    Pin::new(&mut tls).connect().await.expect("TLS handshake");
    tls
}

/// Asks the server what it observed (`GET /stats` over HTTP/1.1 on a connection of its own,
/// which the returned count includes).
pub(crate) async fn stats(addr: std::net::SocketAddr, ca: &[openssl::x509::X509]) -> ServerStats {
    let mut tls = client_tls(addr, ca, b"\x08http/1.1").await;
    tls.write_all(b"GET /stats HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .await
        .expect("stats: write");
    let mut response = Vec::new();
    // The server keeps the connection open: read until the announced body is complete.
    let mut chunk = [0u8; 1024];
    let text = loop {
        let n = tls.read(&mut chunk).await.expect("stats: read");
        assert!(n > 0, "stats: the server closed the connection");
        response.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&response).into_owned();
        let Some((head, body)) = text.split_once("\r\n\r\n") else {
            continue;
        };
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .and_then(|v| v.parse().ok())
            .expect("stats: content-length");
        if body.len() >= len {
            break body.to_string();
        }
    };
    let field = |name: &str| -> u64 {
        text.split(' ')
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("stats: no {name} in {text:?}"))
    };
    ServerStats {
        connections: field("connections"),
        h2: field("h2"),
        h1: field("h1"),
        requests: field("requests"),
    }
}
