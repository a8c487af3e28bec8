//! HTTP sessions on the pool: [`HttpConnector::send`] speaks HTTP/1.1 over pooled connections
//! and multiplexes HTTP/2 streams over shared connections.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use http_body_util::{BodyExt, Empty};
//! use upstream_pool::http::{HttpConnector, UpstreamInfo};
//! use upstream_pool::{Alpn, Connector, ConnectorOptions, Peer};
//!
//! let connector = Connector::new(ConnectorOptions::default())?;
//! let http = HttpConnector::new(connector.clone());
//! let peer = Peer::tls("127.0.0.1:8443".parse()?, "backend.example").with_alpn(Alpn::H2H1);
//! let request = ::http::Request::get("/health").body(Empty::<bytes::Bytes>::new())?;
//! let response = http.send(&peer, request).await?;
//! let reused = response.extensions().get::<UpstreamInfo>().map(|i| i.reused);
//! let body = response.into_body().collect().await?.to_bytes(); // h1: back to the pool here
//! # let _ = (reused, body); Ok(()) }
//! ```
//!
//! # Protocol selection
//! By the peer's ALPN offer: `Alpn::H2` → HTTP/2 (a server that does not select `h2` is a
//! `ProtocolError`); `Alpn::H1`, no ALPN, or a plaintext peer → HTTP/1.1 (no h2c);
//! `Alpn::H2H1` (or a custom list offering `h2`) → whatever the server selects. The choice is
//! remembered per pool key, so later requests know it before dialling; while it is unknown,
//! concurrent first requests share one dial and fall back to HTTP/1.1 together if the server
//! picked it.
//!
//! # HTTP/1.1: one exchange at a time on a pooled connection
//! Our own codec (`h1/`) on `httparse`, not hyper's `client::conn::http1`: hyper's connection
//! owns its I/O until the session ends, so either every request pays a session setup
//! (`handshake` + `without_shutdown`: 30 µs of CPU per request against nginx's 14, issue 12)
//! or live sessions sit outside the pool's accounting (idle counts, liveness checks, reaper,
//! caps). With our codec the pool's [`Connection`](crate::Connection) stays the unit.
//!
//! **The release rule.** The [`ResponseBody`] owns the connection. When the body reaches its
//! end cleanly and the exchange allows keep-alive (HTTP/1.1, no `connection: close` from
//! either side, a length- or chunk-delimited body, no bytes left over) it calls
//! `Connector::release` itself; a response without a body (HEAD, 204, 304, length 0) does so
//! before `send` returns. A body dropped before its end, a body error, or a body delimited
//! by the connection's end closes the connection instead: a connection with an unread
//! response is never handed to another request. Nor is one whose request body was cut short
//! because the server answered first (a 401 or 413 to an upload, which `send` returns).
//!
//! **Retries.** A request that fails on a *reused* connection before any response byte was
//! read (the upstream closed it while it sat idle) is sent once more on a freshly dialled
//! connection when its body is empty ([`http_body::Body::is_end_stream`] or an exact size
//! of 0), and the response's [`UpstreamInfo::retried`] says so. Otherwise the error is
//! returned, with [`Error::retryable`](crate::Error::retryable) true when no response byte
//! had arrived on a reused connection.
//!
//! # HTTP/2: shared connections
//! The `h2` crate's client directly (hyper's http2 client is a layer over it that hides the
//! server's SETTINGS). Per pool key a registry of connections (`h2/registry.rs`): a request
//! takes a stream on a connection with room, else waits for a dial in progress whose
//! expected capacity covers the waiters (so concurrent first requests share one dial), else
//! starts a dial while the key is under `max_connections_per_peer` (which counts
//! connections), else waits for a stream or a connection slot up to `wait_timeout` and fails
//! with `PoolTimedout`. Streams per connection ≤ min(`max_h2_streams`, the server's
//! SETTINGS_MAX_CONCURRENT_STREAMS), learnt before the first stream: the dial sends a PING
//! after the preface and waits for the answer, by which time the server's SETTINGS (its first
//! frame) has been applied; the limit is re-read on every pick. Each connection has one
//! driver task (the `h2` connection must be polled), which also runs the optional PING
//! keepalive and the idle timeout (the peer's, else the connector's). Its pooled
//! `Connection` counts as in use for its whole life and is never pooled idle. Past
//! `max_lifetime` a connection takes no new streams and closes when its last one ends;
//! `max_uses` does not apply (streams are not checkouts).
//!
//! **GOAWAY.** A connection that received GOAWAY takes no new streams; its streams in flight
//! finish and it closes when they are done. A request that never went out because GOAWAY
//! had arrived is sent on another connection whatever its body (nothing of it was read); one
//! the server did not process (REFUSED_STREAM, or above GOAWAY's last stream id) is sent
//! again when its body is empty, else the error is `UpstreamIo` with `retryable()` true. Up
//! to 4 attempts per request.
//!
//! # Timeouts and cancellation
//! Peers have no read or write timeout, so none applies; wrap `send` or the body's polling in
//! `tokio::time::timeout` as needed. Dropping the `send` future or a [`ResponseBody`] at any
//! point leaks nothing: an HTTP/1.1 connection mid-exchange is closed, an HTTP/2 stream is
//! reset and its slot freed, a shared dial in progress finishes for the requests that still
//! wait for it.

mod body;
mod h1;
mod h2;
mod request;

use std::fmt;
use std::sync::Arc;

use ::http::{Request, Response, Version};
use bytes::Bytes;

use crate::connector::Connector;
use crate::error::{Error, Result};
use crate::peer::{Alpn, Peer};
use crate::stream::SslDigest;

pub use body::ResponseBody;
pub(crate) use h2::registry::Shared;

/// Sends HTTP requests to peers over the connector's pool.
///
/// Cheap to clone; clones share everything. Two `HttpConnector`s built from clones of the
/// same [`Connector`] share its pool *and* its HTTP/2 connections (that state lives in the
/// connector). `Send + Sync`.
#[derive(Clone)]
pub struct HttpConnector {
    connector: Connector,
}

impl HttpConnector {
    /// An HTTP client over `connector`'s pool and options (`max_h2_streams`, the
    /// `h2_ping_*` options, `max_connections_per_peer`, `wait_timeout`).
    pub fn new(connector: Connector) -> HttpConnector {
        HttpConnector { connector }
    }

    /// The connector underneath, e.g. for `idle_count_for` or `stats`.
    pub fn connector(&self) -> &Connector {
        &self.connector
    }

    /// Sends `request` to `peer` and returns the response once its head arrived; the body
    /// streams from the connection as it is polled.
    ///
    /// The request URI is origin-form (`/path?q`) or absolute; the authority (HTTP/1.1
    /// `host`, HTTP/2 `:authority`) is the URI's, else the `host` header's, else the peer's
    /// SNI, else its address. The request body streams too: HTTP/1.1 frames it with
    /// `content-length` when its size is exact, else `transfer-encoding: chunked`; hop-by-hop
    /// headers that would break the framing are removed, conflicting ones refused. See the
    /// [module docs](self) for protocol selection, the release rule and retries.
    ///
    /// # Errors
    /// `InvalidConfig` for an unusable peer; `InvalidConfig` for a request that cannot be
    /// sent (bad authority, `CONNECT`, a `content-length` that contradicts the body, an
    /// unsupported `transfer-encoding`); every error of `Connector::get` while connecting;
    /// `PoolTimedout` at the per-peer cap; `ProtocolError` for a malformed or unsupported
    /// response (including a `101` upgrade); `UpstreamIo` when the connection or stream
    /// failed; `RequestBody` when the request body failed.
    ///
    /// # Cancel safety
    /// Cancel safe: dropping the future closes an HTTP/1.1 connection mid-exchange (never
    /// pools it) and resets an HTTP/2 stream, freeing its stream slot; a dial in progress
    /// finishes in the background (its connection is pooled or shared).
    pub async fn send<B>(&self, peer: &Peer, request: Request<B>) -> Result<Response<ResponseBody>>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let key = peer.key()?;
        let (parts, body) = request.into_parts();
        let prepared = request::Prepared::new(parts, &body, peer)?;
        match protocol_of(peer) {
            Offer::H1 => h1::send(&self.connector, peer, prepared, body).await,
            Offer::H2 | Offer::Either => {
                match h2::send(&self.connector, peer, key, prepared, body).await? {
                    h2::Sent::Response(response) => Ok(response),
                    h2::Sent::UseH1(prepared, body) => {
                        h1::send(&self.connector, peer, prepared, body).await
                    }
                }
            }
        }
    }
}

impl fmt::Debug for HttpConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpConnector")
            .field("connector", &self.connector)
            .finish()
    }
}

/// What the peer's ALPN offer allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Offer {
    H1,
    H2,
    /// The server's choice decides.
    Either,
}

fn protocol_of(peer: &Peer) -> Offer {
    if !peer.is_tls() {
        return Offer::H1;
    }
    match &peer.settings().alpn {
        None | Some(Alpn::H1) => Offer::H1,
        Some(Alpn::H2) => Offer::H2,
        Some(Alpn::H2H1) => Offer::Either,
        Some(custom @ Alpn::Custom(_)) => {
            if offers_h2(custom.to_wire()) {
                Offer::Either
            } else {
                Offer::H1
            }
        }
    }
}

/// Whether a wire-format ALPN list contains `h2`.
fn offers_h2(mut wire: &[u8]) -> bool {
    while let Some((&len, rest)) = wire.split_first() {
        let len = usize::from(len);
        if rest.len() < len {
            return false;
        }
        if &rest[..len] == b"h2" {
            return true;
        }
        wire = &rest[len..];
    }
    false
}

/// How a response was obtained; in every response's extensions (`resp.extensions()`).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct UpstreamInfo {
    /// The request went over a connection that already existed: a pooled HTTP/1.1
    /// connection, or an HTTP/2 connection that had carried a stream before.
    pub reused: bool,
    /// `HTTP_11` (or `HTTP_10` for a 1.0 server) or `HTTP_2`.
    pub version: Version,
    /// What the connection's TLS handshake negotiated; `None` for plaintext peers.
    pub digest: Option<Arc<SslDigest>>,
    /// The request failed on a connection the upstream had closed (HTTP/1.1) or was not
    /// processed by the server (HTTP/2 GOAWAY or REFUSED_STREAM) and was sent again.
    pub retried: bool,
}

/// Helpers building this module's errors with the peer named.
pub(crate) fn error(kind: crate::ErrorKind, peer: &Peer, context: impl Into<String>) -> Error {
    Error::new(kind, context).with_peer(peer.describe())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds() {
        fn is_send_sync<T: Send + Sync + Clone + fmt::Debug>() {}
        is_send_sync::<HttpConnector>();
        fn is_body<T: http_body::Body + Send + Sync + Unpin + fmt::Debug>() {}
        is_body::<ResponseBody>();
    }

    /// `send`'s future can be spawned whatever the body, as long as the body is `Send`
    /// (it need not be `Sync`).
    #[allow(dead_code)]
    fn send_future_is_send(http: &HttpConnector, peer: &Peer) {
        struct SendOnly(std::cell::Cell<bool>);
        impl http_body::Body for SendOnly {
            type Data = Bytes;
            type Error = std::convert::Infallible;
            fn poll_frame(
                self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
            ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
                self.0.set(true);
                std::task::Poll::Ready(None)
            }
        }
        fn is_send<T: Send>(_: &T) {}
        let future = http.send(peer, Request::new(SendOnly(std::cell::Cell::new(false))));
        is_send(&future);
    }

    #[test]
    fn alpn_offers() {
        assert!(offers_h2(b"\x02h2\x08http/1.1"));
        assert!(offers_h2(b"\x08http/1.1\x02h2"));
        assert!(!offers_h2(b"\x08http/1.1"));
        assert!(!offers_h2(b"\x05h2"));
        assert!(!offers_h2(b""));
    }
}
