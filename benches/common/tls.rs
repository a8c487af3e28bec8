//! An in-process OpenSSL upstream on its own OS thread (with its own current-thread runtime),
//! so the benchmark's client runtime and the server do not share a thread.
//!
//! Every connection: TLS handshake (session cache and tickets on, so clients can resume),
//! then for each request (bytes up to `\r\n\r\n`) the fixed [`RESPONSE`]. The server counts
//! handshakes, resumed handshakes and requests, so a benchmark can check that it measured
//! what it claims to (e.g. that "resumed" really resumed).

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use openssl::ssl::{Ssl, SslAcceptor, SslConnector, SslMethod, SslVersion};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_openssl::SslStream;

use super::certs::Identity;

/// The request every benchmark sends.
pub(crate) const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n";
/// The response the server sends to every request.
pub(crate) const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

/// What the server observed.
#[derive(Debug, Default)]
pub(crate) struct ServerStats {
    /// Completed handshakes, full or resumed.
    pub(crate) handshakes: AtomicU64,
    /// Completed handshakes that resumed a session.
    pub(crate) resumed: AtomicU64,
    /// Requests answered.
    pub(crate) requests: AtomicU64,
}

/// A running in-process TLS upstream; dropping it stops the server thread.
#[derive(Debug)]
pub(crate) struct TlsUpstream {
    addr: SocketAddr,
    stats: Arc<ServerStats>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl TlsUpstream {
    /// Starts a server presenting `identity` (leaf plus intermediates), limited to `version`
    /// when given (TLS 1.2 and 1.3 otherwise).
    pub(crate) fn start(identity: &Identity, version: Option<SslVersion>) -> TlsUpstream {
        let mut b =
            SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server()).expect("acceptor");
        b.set_certificate(&identity.cert).expect("certificate");
        for c in &identity.intermediates {
            b.add_extra_chain_cert(c.clone()).expect("intermediate");
        }
        b.set_private_key(&identity.key).expect("key");
        b.set_min_proto_version(Some(version.unwrap_or(SslVersion::TLS1_2)))
            .expect("min version");
        b.set_max_proto_version(version).expect("max version");
        b.set_session_id_context(b"upstream-pool-bench")
            .expect("session id context");
        let acceptor = Arc::new(b.build());

        let std_listener = {
            use socket2::{Domain, Socket, Type};
            let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
            socket.set_reuse_address(true).expect("reuseaddr");
            socket
                .bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into())
                .expect("bind");
            socket.listen(1024).expect("listen");
            socket.set_nonblocking(true).expect("nonblocking");
            std::net::TcpListener::from(socket)
        };
        let addr = std_listener.local_addr().expect("local address");
        let stats = Arc::new(ServerStats::default());
        let (tx, rx) = oneshot::channel::<()>();
        let server_stats = stats.clone();
        let thread = std::thread::Builder::new()
            .name("bench-tls-upstream".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("server runtime");
                rt.block_on(async move {
                    let listener =
                        tokio::net::TcpListener::from_std(std_listener).expect("tokio listener");
                    let accept_loop = async {
                        loop {
                            let Ok((tcp, _)) = listener.accept().await else {
                                continue;
                            };
                            let _ = tcp.set_nodelay(true);
                            tokio::spawn(serve(tcp, acceptor.clone(), server_stats.clone()));
                        }
                    };
                    tokio::select! {
                        _ = accept_loop => {}
                        _ = rx => {}
                    }
                });
            })
            .expect("spawn server thread");
        TlsUpstream {
            addr,
            stats,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    /// The address the server listens on.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What the server observed so far.
    pub(crate) fn stats(&self) -> &ServerStats {
        &self.stats
    }
}

impl Drop for TlsUpstream {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve(tcp: TcpStream, acceptor: Arc<SslAcceptor>, stats: Arc<ServerStats>) {
    let Ok(ssl) = Ssl::new(acceptor.context()) else {
        return;
    };
    let Ok(mut tls) = SslStream::new(ssl, tcp) else {
        return;
    };
    if Pin::new(&mut tls).accept().await.is_err() {
        return;
    }
    stats.handshakes.fetch_add(1, Ordering::Relaxed);
    if tls.ssl().session_reused() {
        stats.resumed.fetch_add(1, Ordering::Relaxed);
    }
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        match tls.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            buf.drain(..end + 4);
            stats.requests.fetch_add(1, Ordering::Relaxed);
            if tls.write_all(RESPONSE).await.is_err() {
                return;
            }
        }
    }
}

/// Writes [`REQUEST`] and reads exactly one [`RESPONSE`].
pub(crate) async fn exchange<S>(stream: &mut S) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    stream.write_all(REQUEST).await?;
    let mut resp = [0u8; RESPONSE.len()];
    stream.read_exact(&mut resp).await?;
    if resp != RESPONSE {
        return Err(io::Error::other("unexpected response"));
    }
    Ok(())
}

/// The check a pool makes before reusing an idle stream, done by hand: poll a one-byte read
/// once with a no-op waker (and outside tokio's cooperative budget). Returns whether the
/// stream is still clean (nothing to read, not closed). After a response was read to its
/// last byte the socket's readiness is still set, so this costs one `recv` that returns
/// `EAGAIN`, as Pingora's `test_reusable_stream` and our pool's liveness check do.
pub(crate) fn probe(stream: &mut SslStream<TcpStream>) -> bool {
    use std::future::Future;
    use std::task::{Context, Waker};
    let mut byte = [0u8; 1];
    let mut read = std::pin::pin!(tokio::task::unconstrained(stream.read(&mut byte)));
    read.as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
        .is_pending()
}

/// A plain tokio-openssl client trusting `ca`, verifying the name `localhost`: the "no pool"
/// baseline.
pub(crate) fn direct_connector(ca: &[openssl::x509::X509]) -> SslConnector {
    let mut b = SslConnector::builder(SslMethod::tls_client()).expect("client builder");
    for c in ca {
        b.cert_store_mut().add_cert(c.clone()).expect("add CA");
    }
    b.build()
}

/// Connects and handshakes a direct (unpooled) TLS stream to `addr` with SNI `localhost`.
pub(crate) async fn direct_connect(
    connector: &SslConnector,
    addr: SocketAddr,
) -> io::Result<SslStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let ssl = connector
        .configure()
        .and_then(|c| c.into_ssl("localhost"))
        .map_err(io::Error::other)?;
    let mut tls = SslStream::new(ssl, tcp).map_err(io::Error::other)?;
    Pin::new(&mut tls)
        .connect()
        .await
        .map_err(io::Error::other)?;
    Ok(tls)
}
