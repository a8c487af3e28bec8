//! The crate's one error type: an opaque [`Error`] with a [`kind()`](Error::kind).

use std::fmt;
use std::io;

/// Shorthand for `Result<T, upstream_pool::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, coarse enough to branch on.
///
/// Dashboards group `upstream_connect_errors_total` by [`ErrorKind::as_str`], so the set of
/// kinds is part of the API; new kinds may be added (the enum is `#[non_exhaustive]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The upstream refused the TCP connection (nothing listening, or a RST to the SYN).
    ConnectRefused,
    /// The TCP connect did not finish within the peer's connection timeout.
    ConnectTimedout,
    /// Any other I/O failure while dialling, or a reused connection found broken on use.
    ConnectError,
    /// The TLS handshake failed for a reason other than certificate verification: a protocol
    /// or version mismatch, a server that is not speaking TLS, a reset mid-handshake.
    TlsHandshakeFailure,
    /// TCP connect plus TLS handshake did not finish within the total connection timeout.
    TlsHandshakeTimedout,
    /// The server's certificate failed verification: untrusted chain, expired, wrong host.
    InvalidCert,
    /// A setting supplied by the caller is unusable: bad PEM, unknown curve, bad SNI, ...;
    /// also an HTTP request that cannot be sent as given (`upstream_pool::http`: no usable
    /// authority, `CONNECT`, framing headers that contradict the body), before anything
    /// was sent.
    InvalidConfig,
    /// `get` waited `wait_timeout` at the per-peer connection cap without getting a slot.
    PoolTimedout,
    /// A bug or an OpenSSL failure that is not the peer's fault.
    Internal,
    /// The upstream broke the HTTP protocol: a malformed response head or chunk, a response
    /// head or header count over the limit, an HTTP/2 protocol error, garbage after ALPN
    /// selected `h2`, or a server that did not select `h2` for a peer that requires it.
    ProtocolError,
    /// The upstream connection failed or closed after it was established, while the request
    /// was sent or the response read (reset, EOF mid-response, HTTP/2 stream reset or a
    /// stream the server refused). [`Error::retryable`] says whether the request may be sent
    /// again.
    UpstreamIo,
    /// The caller's request body returned an error; the request was abandoned (the HTTP/1.1
    /// connection closed, the HTTP/2 stream reset).
    RequestBody,
}

impl ErrorKind {
    /// The snake_case name used in metric labels and logs, e.g. `"invalid_cert"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorKind::ConnectRefused => "connect_refused",
            ErrorKind::ConnectTimedout => "connect_timedout",
            ErrorKind::ConnectError => "connect_error",
            ErrorKind::TlsHandshakeFailure => "tls_handshake_failure",
            ErrorKind::TlsHandshakeTimedout => "tls_handshake_timedout",
            ErrorKind::InvalidCert => "invalid_cert",
            ErrorKind::InvalidConfig => "invalid_config",
            ErrorKind::PoolTimedout => "pool_timedout",
            ErrorKind::Internal => "internal",
            ErrorKind::ProtocolError => "protocol_error",
            ErrorKind::UpstreamIo => "upstream_io",
            ErrorKind::RequestBody => "request_body",
        }
    }

    /// Every kind, in declaration order (for tests and dashboards).
    pub const ALL: [ErrorKind; 12] = [
        ErrorKind::ConnectRefused,
        ErrorKind::ConnectTimedout,
        ErrorKind::ConnectError,
        ErrorKind::TlsHandshakeFailure,
        ErrorKind::TlsHandshakeTimedout,
        ErrorKind::InvalidCert,
        ErrorKind::InvalidConfig,
        ErrorKind::PoolTimedout,
        ErrorKind::Internal,
        ErrorKind::ProtocolError,
        ErrorKind::UpstreamIo,
        ErrorKind::RequestBody,
    ];
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error returned by every fallible call in this crate.
///
/// Opaque on purpose: branch on [`kind()`](Error::kind) and [`retryable()`](Error::retryable).
/// The message names the peer (address and SNI) when one was involved and carries the
/// underlying reason (OpenSSL's verify or handshake reason, the OS error).
pub struct Error {
    inner: Box<Inner>,
}

struct Inner {
    kind: ErrorKind,
    context: String,
    peer: Option<String>,
    reused: bool,
    /// The failure was the network's, not the peer's configuration (a reset during the
    /// handshake), so a fresh attempt may succeed whatever the kind.
    transient: bool,
}

impl Error {
    pub(crate) fn new(kind: ErrorKind, context: impl Into<String>) -> Self {
        Error {
            inner: Box::new(Inner {
                kind,
                context: context.into(),
                peer: None,
                reused: false,
                transient: false,
            }),
        }
    }

    pub(crate) fn config(context: impl Into<String>) -> Self {
        Error::new(ErrorKind::InvalidConfig, context)
    }

    pub(crate) fn internal(context: impl Into<String>) -> Self {
        Error::new(ErrorKind::Internal, context)
    }

    pub(crate) fn with_peer(mut self, peer: impl Into<String>) -> Self {
        self.inner.peer = Some(peer.into());
        self
    }

    pub(crate) fn with_reused(mut self, reused: bool) -> Self {
        self.inner.reused = reused;
        self
    }

    pub(crate) fn with_transient(mut self) -> Self {
        self.inner.transient = true;
        self
    }

    /// A copy for another waiter on the same failure (HTTP/2 requests that shared one dial).
    pub(crate) fn duplicate(&self) -> Error {
        Error {
            inner: Box::new(Inner {
                kind: self.inner.kind,
                context: self.inner.context.clone(),
                peer: self.inner.peer.clone(),
                reused: self.inner.reused,
                transient: self.inner.transient,
            }),
        }
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        self.inner.kind
    }

    /// Whether trying again on a *fresh* connection may succeed.
    ///
    /// True for transport failures (refused, timed out, reset, a reused connection that turned
    /// out to be closed), for handshake timeouts, and for a `TlsHandshakeFailure` caused by the
    /// network (a reset mid-handshake, e.g. a server restarting). False where trying
    /// again would fail the same way: certificate problems, bad configuration, TLS protocol
    /// failures, an exhausted pool wait (the caller's deadline is already spent), internal
    /// errors.
    pub fn retryable(&self) -> bool {
        if self.inner.reused || self.inner.transient {
            return true;
        }
        matches!(
            self.inner.kind,
            ErrorKind::ConnectRefused
                | ErrorKind::ConnectTimedout
                | ErrorKind::ConnectError
                | ErrorKind::TlsHandshakeTimedout
        )
    }

    /// Whether the failure happened on a connection that came from the pool.
    ///
    /// A request that fails on a reused connection before any response byte arrived is safe
    /// to send again on a new one: the upstream most likely closed it while it sat idle.
    pub fn reused(&self) -> bool {
        self.inner.reused
    }

    /// The peer this error concerns, as `address` or `address (SNI "name")`, if any.
    pub fn peer(&self) -> Option<&str> {
        self.inner.peer.as_deref()
    }

    /// Recover this crate's error from an `io::Error` returned by a [`Connection`]'s
    /// read or write, if it carries one (I/O on a reused connection does).
    ///
    /// [`Connection`]: crate::Connection
    pub fn from_io(err: &io::Error) -> Option<&Error> {
        err.get_ref().and_then(|e| e.downcast_ref::<Error>())
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Error")
            .field("kind", &self.inner.kind)
            .field("context", &self.inner.context)
            .field("peer", &self.inner.peer)
            .field("reused", &self.inner.reused)
            .finish()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.inner.kind {
            ErrorKind::ConnectRefused => "connection refused",
            ErrorKind::ConnectTimedout => "connect timed out",
            ErrorKind::ConnectError => "connect error",
            ErrorKind::TlsHandshakeFailure => "tls handshake failed",
            ErrorKind::TlsHandshakeTimedout => "tls handshake timed out",
            ErrorKind::InvalidCert => "invalid certificate",
            ErrorKind::InvalidConfig => "invalid config",
            ErrorKind::PoolTimedout => "pool wait timed out",
            ErrorKind::Internal => "internal error",
            ErrorKind::ProtocolError => "upstream protocol error",
            ErrorKind::UpstreamIo => "upstream i/o error",
            ErrorKind::RequestBody => "request body error",
        };
        write!(f, "{what}")?;
        if let Some(peer) = &self.inner.peer {
            write!(f, " (peer {peer})")?;
        }
        if !self.inner.context.is_empty() {
            write!(f, ": {}", self.inner.context)?;
        }
        if self.inner.reused {
            f.write_str(" [on a reused connection]")?;
        }
        Ok(())
    }
}

/// The underlying cause (OpenSSL's reason, the OS error) is part of the message rather than a
/// `source()`, so that logging the error once shows everything without repeating it.
impl std::error::Error for Error {}
