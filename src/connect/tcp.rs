//! Dialling the transport: TCP (with socket options) or a Unix-domain socket.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
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
    /// Whether the reactor has recorded the socket readable (or closed) since a read last
    /// found it empty: one atomic load, no syscall, no waker registered.
    ///
    /// Cheaper than tokio's `poll_read_ready`, which also stores a waker under the socket's
    /// waiter lock when the answer is "not ready": the pool asks at every checkout and every
    /// release, and an idle connection has nobody to wake.
    #[inline]
    pub(crate) fn maybe_readable(&self) -> bool {
        // `try_io` runs the closure only when the readiness bits are set; `Ok` leaves them
        // set for the read that follows.
        let readiness_set = || Ok(());
        match self {
            RawStream::Tcp(s) => s.try_io(Interest::READABLE, readiness_set).is_ok(),
            RawStream::Unix(s) => s.try_io(Interest::READABLE, readiness_set).is_ok(),
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
    let deadline = deadline_after(Instant::now(), timeout);
    let attempt = async {
        match &settings.address {
            PeerAddress::Tcp(addr) => {
                if let Some(bind) = settings.bind_to.filter(|b| b.is_ipv4() != addr.is_ipv4()) {
                    return Err(DialError::Config(
                        Error::config(format!(
                            "source address {bind} and peer address {addr} are of different IP families"
                        ))
                        .with_peer(peer.describe()),
                    ));
                }
                let socket = if addr.is_ipv4() {
                    TcpSocket::new_v4()?
                } else {
                    TcpSocket::new_v6()?
                };
                if let Some(bind) = settings.bind_to {
                    bind_source(&socket, bind).map_err(|e| bind_error(peer, bind, &e))?;
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
                Ok::<_, DialError>(RawStream::Tcp(stream))
            }
            PeerAddress::Unix(path) => Ok(RawStream::Unix(UnixStream::connect(path).await?)),
        }
    };
    match tokio::time::timeout_at(deadline, attempt).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(DialError::Config(e))) => Err(e),
        Ok(Err(DialError::Io(e))) => Err(io_error(peer, &e)),
        Err(_) => Err(Error::new(
            ErrorKind::ConnectTimedout,
            format!("no connection within {timeout:?}"),
        )
        .with_peer(peer.describe())),
    }
}

/// `start + timeout`, or a deadline decades away when that overflows: a timeout of
/// `Duration::MAX` means "no timeout", not a panic in the dial task.
pub(crate) fn deadline_after(start: Instant, timeout: Duration) -> Instant {
    // What tokio itself uses as "never" (about 30 years).
    const FAR_FUTURE: Duration = Duration::from_secs(86_400 * 365 * 30);
    start
        .checked_add(timeout)
        .or_else(|| start.checked_add(FAR_FUTURE))
        // Unreachable on any real clock (it would have to be 30 years from overflowing);
        // still no panic.
        .unwrap_or(start)
}

/// A dial step's failure: a configuration mistake found by the OS, or any other I/O error.
enum DialError {
    Config(Error),
    Io(io::Error),
}

impl From<io::Error> for DialError {
    fn from(e: io::Error) -> Self {
        DialError::Io(e)
    }
}

/// Binds the socket's source address. With port 0, `IP_BIND_ADDRESS_NO_PORT` makes the kernel
/// pick the port at `connect` instead of reserving one at `bind`: a port reserved at bind can
/// serve no other connection, whatever its destination, so a busy proxy with a source address
/// would run out of its ~28,000 ephemeral ports; chosen at connect, a port is shared by every
/// connection whose 4-tuple differs (Pingora and Envoy do the same).
fn bind_source(socket: &TcpSocket, bind: SocketAddr) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    if bind.port() == 0 {
        nix::sys::socket::setsockopt(
            socket,
            nix::sys::socket::sockopt::IpBindAddressNoPort,
            &true,
        )
        .map_err(io::Error::from)?;
    }
    socket.bind(bind)
}

/// A bind that fails because the address is taken or is not this host's will fail the same
/// way on every dial: a configuration mistake, not a retryable connect error. (Port exhaustion
/// shows up at `connect` with `IP_BIND_ADDRESS_NO_PORT`, and stays a connect error.)
fn bind_error(peer: &Peer, bind: SocketAddr, e: &io::Error) -> DialError {
    match e.kind() {
        io::ErrorKind::AddrInUse
        | io::ErrorKind::AddrNotAvailable
        | io::ErrorKind::InvalidInput => DialError::Config(
            Error::config(format!("cannot bind the source address {bind}: {e}"))
                .with_peer(peer.describe()),
        ),
        _ => DialError::Io(io::Error::new(e.kind(), format!("bind {bind}: {e}"))),
    }
}

fn io_error(peer: &Peer, e: &io::Error) -> Error {
    let kind = match e.kind() {
        io::ErrorKind::ConnectionRefused => ErrorKind::ConnectRefused,
        io::ErrorKind::TimedOut => ErrorKind::ConnectTimedout,
        _ => ErrorKind::ConnectError,
    };
    let what = if kind == ErrorKind::ConnectError && e.kind() == io::ErrorKind::AddrNotAvailable {
        // At connect (the bind itself is checked above): no source port left, or no route.
        "no free source port or no route from the local address"
    } else {
        "dial failed"
    };
    Error::new(kind, format!("{what}: {e}")).with_peer(peer.describe())
}
