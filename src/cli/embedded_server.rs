//! The embedded upstream `bench` loads when no `--target` is given: a TLS HTTP/1.1 keep-alive
//! server on `127.0.0.1:0` answering every request with a small fixed body.
//!
//! It runs on the same tokio runtime as the client, so the numbers include the server's
//! share of the CPU, as they would against an upstream on the same machine.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use openssl::ssl::{AlpnError, Ssl, SslAcceptor, SslContext, SslMethod};
use openssl::x509::X509;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use tokio_openssl::SslStream;

use super::embedded_pki::{EmbeddedPki, SERVER_NAME};
use super::http::RequestReader;

/// Pending connections the kernel queues. The default of 128 overflows when `bench` opens a
/// burst of connections (reuse off at high concurrency), and each overflow costs the client
/// a one-second SYN retry that would dominate the latency numbers.
const LISTEN_BACKLOG: u32 = 1024;

/// A client that has not finished its handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Keep-alive timeout between requests, longer than any pause a `bench` worker takes.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The response body; short, so the bench measures connection handling rather than transfer.
const BODY: &str = "hello from upstream-pool\n";

/// A running embedded upstream. Dropping it stops accepting; connections already open end
/// when their client closes them or the runtime shuts down.
#[derive(Debug)]
pub(crate) struct EmbeddedServer {
    addr: SocketAddr,
    ca: X509,
    accept: JoinHandle<()>,
}

impl EmbeddedServer {
    /// Generates certificates, binds `127.0.0.1:0` and starts accepting on the current tokio
    /// runtime.
    ///
    /// # Errors
    /// The OpenSSL or socket error, as a message.
    pub(crate) fn start() -> Result<EmbeddedServer, String> {
        let pki = EmbeddedPki::generate()
            .map_err(|e| format!("cannot generate certificates for the embedded upstream: {e}"))?;
        let ctx = tls_context(&pki)
            .map_err(|e| format!("cannot configure TLS for the embedded upstream: {e}"))?;
        let listener = listen()
            .map_err(|e| format!("cannot listen on 127.0.0.1 for the embedded upstream: {e}"))?;
        let addr = listener
            .local_addr()
            .map_err(|e| format!("embedded upstream has no local address: {e}"))?;
        let accept = tokio::spawn(accept_loop(listener, Arc::new(Shared::new(ctx))));
        Ok(EmbeddedServer {
            addr,
            ca: pki.ca,
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
}

impl Drop for EmbeddedServer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// What every connection task needs.
struct Shared {
    ctx: SslContext,
    keep_alive: Vec<u8>,
    close: Vec<u8>,
}

impl Shared {
    fn new(ctx: SslContext) -> Shared {
        let response = |extra: &str| {
            format!(
                "HTTP/1.1 200 OK\r\nServer: upstream-pool-embedded\r\nContent-Type: text/plain\r\n\
                 Content-Length: {}\r\n{extra}\r\n{BODY}",
                BODY.len()
            )
            .into_bytes()
        };
        Shared {
            ctx,
            keep_alive: response(""),
            close: response("Connection: close\r\n"),
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
    // Speak only HTTP/1.1: select it when offered, otherwise continue without ALPN (an
    // `h2`-only offer then still gets HTTP/1.1, as from a server without h2 support).
    b.set_alpn_select_callback(|_ssl, offer| {
        let mut rest = offer;
        while let Some((&len, tail)) = rest.split_first() {
            let len = usize::from(len);
            let Some(proto) = tail.get(..len) else { break };
            if proto == b"http/1.1" {
                return Ok(proto);
            }
            rest = &tail[len..];
        }
        Err(AlpnError::NOACK)
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

/// Serves one connection until the client closes it, it misbehaves, or it idles too long.
/// Failures are the client's to report, so they end the connection silently.
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
    let _ = exchange(&mut tls, &shared).await;
}

async fn exchange<S>(stream: &mut S, shared: &Shared) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut requests = RequestReader::default();
    loop {
        let request = match tokio::time::timeout(IDLE_TIMEOUT, requests.next(stream)).await {
            Ok(Ok(Some(request))) => request,
            // Clean close, idle timeout, or a broken request: stop either way.
            _ => break,
        };
        if request.close {
            stream.write_all(&shared.close).await?;
            break;
        }
        stream.write_all(&shared.keep_alive).await?;
    }
    // close_notify, then FIN.
    stream.shutdown().await
}
