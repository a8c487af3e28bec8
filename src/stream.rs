//! A live upstream connection: [`Connection`], what was negotiated ([`SslDigest`]) and how long
//! it took ([`TimingDigest`]).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, SystemTime};

use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::ssl::{SslRef, SslVersion};
use openssl::x509::X509;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_openssl::SslStream;

use crate::connect::openssl_ext;
use crate::connect::runtime::RuntimeAlive;
use crate::connect::tcp::RawStream;
use crate::error::{Error, ErrorKind};
use crate::pool::Lease;

/// What the TLS handshake negotiated, captured once when it finished.
///
/// Connections of one `Connector` that negotiated the same (same leaf certificate, version,
/// cipher, ALPN protocol and resumption) share one digest rather than hold a copy each.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SslDigest {
    /// Protocol version, e.g. `"TLSv1.3"`.
    pub version: String,
    /// Cipher suite name in OpenSSL's spelling, e.g. `"TLS_AES_256_GCM_SHA384"`.
    pub cipher: String,
    /// The protocol the server selected with ALPN, if any.
    pub alpn: Option<Vec<u8>>,
    /// Whether this handshake resumed a cached session.
    pub session_reused: bool,
    /// SHA-256 of the server's leaf certificate (DER); empty if it sent none.
    pub cert_digest: Vec<u8>,
    /// The leaf certificate's subject organization (O), if present.
    pub organization: Option<String>,
    /// The leaf certificate's serial number in upper-case hex, if it sent one.
    pub serial_number: Option<String>,
    /// The server's leaf certificate itself.
    pub peer_certificate: Option<X509>,
}

impl SslDigest {
    pub(crate) fn from_ssl(ssl: &SslRef) -> SslDigest {
        let cert = ssl.peer_certificate();
        let cert_digest = cert
            .as_ref()
            .and_then(|c| c.digest(MessageDigest::sha256()).ok())
            .map(|d| d.to_vec())
            .unwrap_or_default();
        let organization = cert.as_ref().and_then(|c| {
            c.subject_name()
                .entries_by_nid(Nid::ORGANIZATIONNAME)
                .next()
                .and_then(|e| e.data().to_string().ok())
        });
        let serial_number = cert.as_ref().and_then(|c| {
            c.serial_number()
                .to_bn()
                .and_then(|bn| bn.to_hex_str().map(|s| s.to_string()))
                .ok()
        });
        SslDigest {
            version: ssl.version_str().to_string(),
            cipher: ssl
                .current_cipher()
                .map_or_else(String::new, |c| c.name().to_string()),
            alpn: ssl.selected_alpn_protocol().map(<[u8]>::to_vec),
            session_reused: ssl.session_reused(),
            cert_digest,
            organization,
            serial_number,
            peer_certificate: cert,
        }
    }
}

/// When the connection was established and how long each step took.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct TimingDigest {
    /// When the connection became usable (after the TLS handshake for TLS peers).
    pub established_ts: SystemTime,
    /// Duration of the TCP (or Unix socket) connect.
    pub tcp_connect: Duration,
    /// Duration of the TLS handshake; `None` for plaintext peers.
    pub tls_handshake: Option<Duration>,
}

pub(crate) enum Stream {
    Plain(RawStream),
    Tls(SslStream<RawStream>),
}

/// What a pooled connection looks like from the outside, checked without blocking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Liveness {
    /// Nothing to read and not closed: safe to hand out.
    Alive,
    /// The upstream closed it (FIN, RST or TLS close_notify) or it failed.
    Closed,
    /// Bytes arrived that nobody asked for; the stream is out of sync.
    UnexpectedData,
}

/// An established upstream connection: TCP, TLS over TCP, or a Unix-domain socket.
///
/// Read and write it like any tokio stream. Give it back with `Connector::release` when the
/// exchange on it finished cleanly; dropping it closes it instead (and never spoils the TLS
/// session other connections resume from).
///
/// I/O errors on a connection that came from the pool, before its first byte was read, carry
/// an [`Error`] with [`Error::reused`] set (recover it with [`Error::from_io`]): the upstream
/// most likely closed it while it sat idle, and the request may be retried on a fresh one.
/// An end of stream at that point (the upstream's FIN or close_notify) is reported the same
/// way, as an `UnexpectedEof` error rather than `Ok(0)`.
pub struct Connection {
    /// Boxed so that handing a connection through the pool (checkout, release, waiter
    /// hand-off) moves one pointer instead of the whole state.
    pub(crate) inner: Box<ConnectionInner>,
}

pub(crate) struct ConnectionInner {
    stream: Stream,
    digest: Option<Arc<SslDigest>>,
    timing: TimingDigest,
    reused: bool,
    /// Whether a byte has been read since this checkout; errors before that are "reused".
    read_since_checkout: bool,
    /// The runtime whose reactor drives the socket: a connection of a runtime that shut down
    /// is dead, however quiet its socket looks.
    runtime: RuntimeAlive,
    pub(crate) lease: Lease,
}

impl Connection {
    pub(crate) fn new(
        stream: Stream,
        digest: Option<Arc<SslDigest>>,
        timing: TimingDigest,
        lease: Lease,
    ) -> Connection {
        Connection {
            inner: Box::new(ConnectionInner {
                stream,
                digest,
                timing,
                reused: false,
                read_since_checkout: false,
                runtime: RuntimeAlive::current(),
                lease,
            }),
        }
    }

    /// Whether this connection came from the pool rather than a fresh dial.
    pub fn reused(&self) -> bool {
        self.inner.reused
    }

    /// What the TLS handshake negotiated; `None` for plaintext connections.
    pub fn digest(&self) -> Option<&SslDigest> {
        self.inner.digest.as_deref()
    }

    /// The shared digest, for the HTTP layer's `UpstreamInfo` (no copy per request).
    pub(crate) fn digest_arc(&self) -> Option<Arc<SslDigest>> {
        self.inner.digest.clone()
    }

    /// When and how fast the connection was established.
    pub fn timing(&self) -> &TimingDigest {
        &self.inner.timing
    }

    /// The OpenSSL connection, for inspection; `None` for plaintext connections.
    pub fn ssl(&self) -> Option<&SslRef> {
        match &self.inner.stream {
            Stream::Tls(s) => Some(s.ssl()),
            Stream::Plain(_) => None,
        }
    }

    /// How many times this connection has been handed out, including this one.
    pub fn uses(&self) -> u32 {
        self.inner.lease.uses
    }

    pub(crate) fn mark_checked_out(&mut self, reused: bool) {
        self.inner.reused = reused;
        self.inner.read_since_checkout = false;
        self.inner.lease.uses = self.inner.lease.uses.saturating_add(1);
    }

    /// Checks, without blocking, whether this idle connection is still usable.
    ///
    /// The reactor has already recorded whether the socket became readable, so the common case
    /// (nothing arrived, nothing buffered) costs one atomic load: no syscall, no waker. Only
    /// when something did arrive do we read: TLS 1.3 session tickets and other
    /// post-handshake records are consumed by OpenSSL and are not "unexpected".
    pub(crate) fn liveness(&mut self) -> Liveness {
        if !self.inner.runtime.is_alive() {
            return Liveness::Closed;
        }
        let quiet = match &self.inner.stream {
            Stream::Plain(raw) => !raw.maybe_readable(),
            // A close_notify OpenSSL already processed (say, read together with the last
            // response) leaves nothing on the socket to signal it, and one we sent means the
            // caller shut the connection down; bytes OpenSSL already read from the socket
            // (read-ahead) never show up as readiness again. So OpenSSL's state is asked
            // first, the socket's readiness only after.
            Stream::Tls(tls) => {
                !openssl_ext::is_shut_down(tls.ssl())
                    && !openssl_ext::has_pending(tls.ssl())
                    && !tls.get_ref().maybe_readable()
            }
        };
        if quiet {
            return Liveness::Alive;
        }
        poll_once_unbudgeted(|cx| self.read_to_classify(cx))
    }

    /// Gives OpenSSL's record buffers back (unless they hold data): the connection is about
    /// to sit idle, and an idle connection needs none (see `openssl_ext::free_buffers`).
    /// Reads that empty the buffer free it already; this covers a caller whose last read
    /// would have blocked. One call into OpenSSL per release of a TLS connection.
    pub(crate) fn free_idle_buffers(&self) {
        if let Stream::Tls(tls) = &self.inner.stream {
            openssl_ext::free_buffers(tls.ssl());
        }
    }

    /// The slow half of [`Connection::liveness`]: something may have arrived (or the
    /// connection is shut down); read to tell what.
    fn read_to_classify(&mut self, cx: &mut Context<'_>) -> Liveness {
        match &mut self.inner.stream {
            Stream::Plain(raw) => match raw.try_read(&mut [0u8; 1]) {
                Ok(0) => Liveness::Closed,
                Ok(_) => Liveness::UnexpectedData,
                // A spurious wake-up: `try_read` cleared the readiness, the next probe is fast.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Liveness::Alive,
                Err(_) => Liveness::Closed,
            },
            Stream::Tls(tls) => {
                if openssl_ext::is_shut_down(tls.ssl()) {
                    return Liveness::Closed;
                }
                let mut byte = [0u8; 1];
                let mut buf = ReadBuf::new(&mut byte);
                match Pin::new(&mut *tls).poll_read(cx, &mut buf) {
                    // OpenSSL allocated its 16.5 KiB read buffer for this read (say, to take
                    // in session tickets) and keeps it; an idle connection needs none (see
                    // `openssl_ext::free_buffers`). Reads of an exchange free it themselves
                    // (`poll_read` below) and `release` frees what a read that would have
                    // blocked left, so the fast path above has nothing to free.
                    Poll::Pending => {
                        openssl_ext::free_buffers(tls.ssl());
                        Liveness::Alive
                    }
                    Poll::Ready(Ok(())) if buf.filled().is_empty() => Liveness::Closed,
                    Poll::Ready(Ok(())) => Liveness::UnexpectedData,
                    Poll::Ready(Err(_)) => Liveness::Closed,
                }
            }
        }
    }

    /// Wraps an I/O error on a reused connection so callers can tell it is retryable.
    fn annotate(&self, err: io::Error) -> io::Error {
        if !self.inner.reused || self.inner.read_since_checkout || Error::from_io(&err).is_some() {
            return err;
        }
        let wrapped = Error::new(
            ErrorKind::ConnectError,
            format!("pooled connection failed before any response byte: {err}"),
        )
        .with_peer(self.inner.lease.peer_description())
        .with_reused(true);
        io::Error::new(err.kind(), wrapped)
    }
}

/// The connection's socket, to read or set socket options (for example with
/// `socket2::SockRef::from(&conn)`). Reading or writing it directly would bypass TLS and
/// desynchronise the stream; do not.
impl std::os::fd::AsFd for Connection {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        let raw = match &self.inner.stream {
            Stream::Plain(raw) => raw,
            Stream::Tls(tls) => tls.get_ref(),
        };
        match raw {
            RawStream::Tcp(s) => std::os::fd::AsFd::as_fd(s),
            RawStream::Unix(s) => std::os::fd::AsFd::as_fd(s),
        }
    }
}

/// Runs `f` once with a no-op waker, outside tokio's cooperative budget.
///
/// The pool's probes must see the socket as it is: once a task has spent its budget, tokio
/// answers every readiness poll with `Pending`, which would make a closed connection look
/// alive. Registering the no-op waker is harmless: an idle connection has no task to wake.
fn poll_once_unbudgeted<T>(f: impl FnOnce(&mut Context<'_>) -> T) -> T {
    let mut f = Some(f);
    let mut probe = std::pin::pin!(tokio::task::unconstrained(std::future::poll_fn(
        move |cx| match f.take() {
            Some(f) => Poll::Ready(Some(f(cx))),
            None => Poll::Ready(None),
        }
    )));
    let mut cx = Context::from_waker(Waker::noop());
    match probe.as_mut().poll(&mut cx) {
        Poll::Ready(Some(value)) => value,
        // `poll_fn` above is ready on its first poll, and this is its first poll.
        Poll::Ready(None) | Poll::Pending => unreachable!("probe is polled exactly once"),
    }
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("peer", &self.inner.lease.peer_description())
            .field("tls", &self.inner.digest.is_some())
            .field("reused", &self.inner.reused)
            .field("uses", &self.inner.lease.uses)
            .finish_non_exhaustive()
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        if let Stream::Tls(tls) = &mut self.inner.stream {
            // TLS 1.3 tickets arrive after the handshake; if they are already on the socket,
            // let OpenSSL read them so the session cache learns them before this connection
            // goes. Whatever else is read is discarded with the connection.
            if tls.ssl().version2() == Some(SslVersion::TLS1_3) {
                poll_once_unbudgeted(|cx| {
                    let mut scratch = [0u8; 256];
                    for _ in 0..4 {
                        let mut buf = ReadBuf::new(&mut scratch);
                        match Pin::new(&mut *tls).poll_read(cx, &mut buf) {
                            Poll::Ready(Ok(())) if !buf.filled().is_empty() => continue,
                            _ => break,
                        }
                    }
                });
            }
            openssl_ext::mark_shut_down(tls.ssl());
        }
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let has_room = buf.remaining() > 0;
        let result = match &mut this.inner.stream {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => {
                let result = Pin::new(&mut *s).poll_read(cx, buf);
                // Give the read buffer back once a read emptied it, as
                // `SSL_MODE_RELEASE_BUFFERS` means to (see `openssl_ext::free_buffers`): a
                // connection that finished its exchange then holds no record buffer while
                // it waits in the pool or for a caller, even before it is released. Freeing
                // only at `release` keeps heap use the same but not RSS: the buffers of a
                // burst of exchanges are then all allocated at once, and the holes they leave
                // stay resident (measured against the child server of `idle_memory`: 26.6
                // against 16.3 KiB per idle connection). Not on `Pending`: the reader is about
                // to read again, and freeing there would cost a second allocation per
                // exchange (measured: +1 % on a 20 us request).
                if result.is_ready() && !openssl_ext::has_pending(s.ssl()) {
                    openssl_ext::free_buffers(s.ssl());
                }
                result
            }
        };
        match result {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.inner.read_since_checkout = true;
                } else if has_room && this.inner.reused && !this.inner.read_since_checkout {
                    // End of stream before any byte on a pooled connection: the upstream closed
                    // it while it sat idle (FIN or close_notify racing our request). Report it
                    // like a reset, so callers have one retryable signal instead of an EOF
                    // they would have to interpret.
                    let eof = io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the upstream closed the connection before sending a byte",
                    );
                    return Poll::Ready(Err(this.annotate(eof)));
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(this.annotate(e))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = match &mut this.inner.stream {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_write(cx, buf),
        };
        match result {
            Poll::Ready(Err(e)) => Poll::Ready(Err(this.annotate(e))),
            other => other,
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = match &mut this.inner.stream {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        };
        match result {
            Poll::Ready(Err(e)) => Poll::Ready(Err(this.annotate(e))),
            other => other,
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.inner.stream {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let result = match &mut this.inner.stream {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s).poll_flush(cx),
        };
        match result {
            Poll::Ready(Err(e)) => Poll::Ready(Err(this.annotate(e))),
            other => other,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().inner.stream {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
