//! Dialling the transport: TCP (with socket options) or a Unix-domain socket.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpSocket, TcpStream, UnixStream};
use tokio::time::Instant;

use crate::error::{Error, ErrorKind, Result};
use crate::peer::{Peer, PeerAddress};

/// The byte stream under TLS (or used directly for plaintext peers).
#[derive(Debug)]
pub(crate) enum RawStream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl RawStream {
    /// Readiness as the reactor last saw it; `Pending` costs no syscall.
    pub(crate) fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            RawStream::Tcp(s) => s.poll_read_ready(cx),
            RawStream::Unix(s) => s.poll_read_ready(cx),
        }
    }

    /// A non-blocking read, for liveness probes of plaintext connections.
    pub(crate) fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            RawStream::Tcp(s) => s.try_read(buf),
            RawStream::Unix(s) => s.try_read(buf),
        }
    }
}

impl AsyncRead for RawStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            RawStream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            RawStream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for RawStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            RawStream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            RawStream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            RawStream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            RawStream::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            RawStream::Tcp(s) => Pin::new(s).poll_flush(cx),
            RawStream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            RawStream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            RawStream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Dials the peer's transport within `timeout` (the smaller of the TCP connect timeout and
/// what is left of the total budget) and applies the socket options.
///
/// # Errors
/// `ConnectRefused`, `ConnectTimedout`, or `ConnectError` for every other I/O failure; all
/// name the peer.
pub(crate) async fn dial(peer: &Peer, timeout: Duration) -> Result<RawStream> {
    let settings = peer.settings();
    let deadline = Instant::now() + timeout;
    let attempt = async {
        match &settings.address {
            PeerAddress::Tcp(addr) => {
                let socket = if addr.is_ipv4() {
                    TcpSocket::new_v4()?
                } else {
                    TcpSocket::new_v6()?
                };
                if let Some(bind) = settings.bind_to {
                    socket.bind(bind)?;
                }
                let stream = socket.connect(*addr).await?;
                stream.set_nodelay(settings.tcp_nodelay)?;
                if let Some(ka) = settings.tcp_keepalive {
                    let params = socket2::TcpKeepalive::new()
                        .with_time(ka.idle)
                        .with_interval(ka.interval)
                        .with_retries(ka.count);
                    SockRef::from(&stream).set_tcp_keepalive(&params)?;
                }
                Ok(RawStream::Tcp(stream))
            }
            PeerAddress::Unix(path) => Ok(RawStream::Unix(UnixStream::connect(path).await?)),
        }
    };
    match tokio::time::timeout_at(deadline, attempt).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => Err(io_error(peer, &e)),
        Err(_) => Err(Error::new(
            ErrorKind::ConnectTimedout,
            format!("no connection within {timeout:?}"),
        )
        .with_peer(peer.describe())),
    }
}

fn io_error(peer: &Peer, e: &io::Error) -> Error {
    let kind = match e.kind() {
        io::ErrorKind::ConnectionRefused => ErrorKind::ConnectRefused,
        io::ErrorKind::TimedOut => ErrorKind::ConnectTimedout,
        _ => ErrorKind::ConnectError,
    };
    let what = if kind == ErrorKind::ConnectError && e.kind() == io::ErrorKind::AddrNotAvailable {
        "cannot bind or route the local address"
    } else {
        "dial failed"
    };
    Error::new(kind, format!("{what}: {e}")).with_peer(peer.describe())
}
