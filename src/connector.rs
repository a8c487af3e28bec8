//! [`Connector`]: the public entry point, `get` and `release`, and its [`ConnectorOptions`].

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::Instrument;

use crate::connect::{tcp, tls::TlsConnector};
use crate::error::{Error, ErrorKind, Result};
use crate::key::PeerKey;
use crate::metrics;
use crate::peer::Peer;
use crate::pool::{Checkout, Handoff, KeyPool, Limits, Pool, Slot};
use crate::stream::{Connection, SslDigest, Stream, TimingDigest};

/// Settings of a [`Connector`]: pool caps, default timeouts, session cache.
///
/// A plain struct: start from `ConnectorOptions::default()` and change what you need.
///
/// # Defaults
/// | field | default |
/// |---|---|
/// | `max_idle_per_peer` | 64 |
/// | `max_idle_total` | 10,000 |
/// | `max_connections_per_peer` | `None` (unlimited) |
/// | `wait_timeout` | 1 s |
/// | `idle_timeout` | 30 s |
/// | `max_uses` | `None` |
/// | `max_lifetime` | `None` |
/// | `connection_timeout` | 5 s |
/// | `total_connection_timeout` | 10 s |
/// | `session_cache_size` | 1,024 |
/// | `metrics_peer_label` | `false` |
/// | `reap_interval` | 250 ms |
/// | `max_h2_streams` | 100 |
/// | `h2_ping_interval` | `None` (no PING keepalive) |
/// | `h2_ping_timeout` | 20 s |
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ConnectorOptions {
    /// Idle connections kept per peer key; the oldest beyond it is closed. Defaults to 64:
    /// enough for a busy upstream's concurrency, small enough that a burst does not leave
    /// hundreds of sockets behind.
    pub max_idle_per_peer: usize,
    /// Idle connections kept across all peers; the least recently used is closed first.
    /// Defaults to 10,000 (about 200 MiB of kernel and OpenSSL state at most).
    pub max_idle_total: usize,
    /// Connections per peer key, idle + in use + dialling. At the cap, `get` waits in a FIFO
    /// queue for a released connection or a freed slot. Defaults to `None`: no cap, like
    /// nginx and Pingora; set it to protect fragile upstreams.
    pub max_connections_per_peer: Option<usize>,
    /// How long `get` waits at the per-peer cap before failing with `PoolTimedout`.
    /// Defaults to 1 s: long enough to absorb a burst, short enough to fail a request fast.
    pub wait_timeout: Duration,
    /// How long an idle connection is kept when the peer sets no idle timeout. Defaults to
    /// 30 s, below the keep-alive timeout of common servers (nginx 75 s, Go 90 s... but
    /// Apache 5 s: set the peer's to less than its server's).
    pub idle_timeout: Duration,
    /// Close a connection after this many checkouts. Defaults to `None` (unlimited).
    pub max_uses: Option<u32>,
    /// Close a connection this long after it was established, at its next release or
    /// checkout. Defaults to `None` (unlimited); set it to follow DNS or certificate changes.
    pub max_lifetime: Option<Duration>,
    /// TCP connect timeout when the peer sets none. Defaults to 5 s.
    pub connection_timeout: Duration,
    /// TCP connect plus TLS handshake timeout when the peer sets none. Defaults to 10 s.
    pub total_connection_timeout: Duration,
    /// TLS sessions kept for resumption, one per peer key; 0 turns resumption off for the
    /// whole connector. Defaults to 1,024.
    pub session_cache_size: usize,
    /// Add a `peer` label (the peer's name, else its address) to every metric. Defaults to
    /// `false`: one series per upstream can be too many for large fleets.
    pub metrics_peer_label: bool,
    /// How often the background reaper looks for expired or closed idle connections.
    /// Defaults to 250 ms, so a closed connection leaves the pool well within a second.
    pub reap_interval: Duration,
    /// Concurrent requests (streams) per HTTP/2 connection of [`crate::http::HttpConnector`];
    /// the limit used is the smaller of this and the server's SETTINGS_MAX_CONCURRENT_STREAMS.
    /// Defaults to 100: RFC 9113 recommends servers allow at least 100, nginx and Go allow
    /// 128 and 250, so 100 rarely lets a server refuse streams, and beyond about 100 a second
    /// connection shares the load better than one connection's flow-control window.
    pub max_h2_streams: usize,
    /// Send an HTTP/2 PING on every connection this often and close it when the answer does
    /// not come within `h2_ping_timeout`, to find dead upstreams (a silent network drop)
    /// before a request does. Defaults to `None`: no PINGs, like hyper; streams still fail
    /// when the kernel gives up on the socket.
    pub h2_ping_interval: Option<Duration>,
    /// How long to wait for the answer to a keepalive PING before closing the connection.
    /// Defaults to 20 s (hyper's default); only used with `h2_ping_interval`.
    pub h2_ping_timeout: Duration,
}

impl Default for ConnectorOptions {
    fn default() -> Self {
        ConnectorOptions {
            max_idle_per_peer: 64,
            max_idle_total: 10_000,
            max_connections_per_peer: None,
            wait_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(30),
            max_uses: None,
            max_lifetime: None,
            connection_timeout: Duration::from_secs(5),
            total_connection_timeout: Duration::from_secs(10),
            session_cache_size: 1024,
            metrics_peer_label: false,
            reap_interval: Duration::from_millis(250),
            max_h2_streams: 100,
            h2_ping_interval: None,
            h2_ping_timeout: Duration::from_secs(20),
        }
    }
}

impl ConnectorOptions {
    fn validate(&self) -> Result<()> {
        let positive = [
            ("connection_timeout", self.connection_timeout),
            ("total_connection_timeout", self.total_connection_timeout),
            ("idle_timeout", self.idle_timeout),
            ("reap_interval", self.reap_interval),
            ("h2_ping_timeout", self.h2_ping_timeout),
            (
                "h2_ping_interval",
                self.h2_ping_interval.unwrap_or(Duration::MAX),
            ),
        ];
        for (name, value) in positive {
            if value.is_zero() {
                return Err(Error::config(format!(
                    "ConnectorOptions::{name} must be greater than zero"
                )));
            }
        }
        if self.max_connections_per_peer == Some(0) {
            return Err(Error::config(
                "ConnectorOptions::max_connections_per_peer must be at least 1 (or None for no cap)",
            ));
        }
        if self.max_h2_streams == 0 {
            return Err(Error::config(
                "ConnectorOptions::max_h2_streams must be at least 1",
            ));
        }
        if self.max_uses == Some(0) {
            return Err(Error::config(
                "ConnectorOptions::max_uses must be at least 1 (or None)",
            ));
        }
        Ok(())
    }
}

/// Hands out established upstream connections: pooled when an identical peer has an idle
/// one, freshly dialled otherwise.
///
/// Cheap to clone; clones share one pool, one TLS context and one session cache. `Send +
/// Sync`: use it from any number of tasks on any tokio runtime flavour.
#[derive(Clone, Debug)]
pub struct Connector {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    options: ConnectorOptions,
    tls: TlsConnector,
    pool: Arc<Pool>,
    /// The HTTP layer's per-key state (protocol learnt, shared HTTP/2 connections), here so
    /// that every `HttpConnector` built from a clone of this connector shares it.
    http: crate::http::Shared,
}

impl Connector {
    /// Creates a connector with its own pool, TLS context and session cache.
    ///
    /// # Errors
    /// `InvalidConfig` for unusable options (a zero timeout, a zero cap); `Internal` if
    /// OpenSSL cannot build a client context.
    pub fn new(options: ConnectorOptions) -> Result<Connector> {
        options.validate()?;
        let tls = TlsConnector::new(options.session_cache_size)?;
        let pool = Arc::new(Pool::new(Limits {
            max_idle_per_peer: options.max_idle_per_peer,
            max_idle_total: options.max_idle_total,
            max_connections_per_peer: options.max_connections_per_peer,
            max_uses: options.max_uses,
            max_lifetime: options.max_lifetime,
            reap_interval: options.reap_interval,
            peer_label: options.metrics_peer_label,
        }));
        Ok(Connector {
            inner: Arc::new(Inner {
                options,
                tls,
                pool,
                http: crate::http::Shared::default(),
            }),
        })
    }

    /// The options this connector was built with.
    pub fn options(&self) -> &ConnectorOptions {
        &self.inner.options
    }

    /// Returns an established connection to `peer`.
    ///
    /// Tries the newest idle connection with exactly the same [`PeerKey`] first; one that the
    /// upstream closed, that has unread bytes, or that expired is closed and the next one
    /// tried. Otherwise dials: TCP within the connection timeout, then the TLS handshake (with
    /// a cached session when allowed) within the total connection timeout. At
    /// `max_connections_per_peer` it waits, first come first served, up to `wait_timeout`.
    ///
    /// # Errors
    /// `InvalidConfig` for an unusable peer setting; `ConnectRefused`, `ConnectTimedout`,
    /// `ConnectError` for transport failures; `InvalidCert`, `TlsHandshakeFailure`,
    /// `TlsHandshakeTimedout` for the handshake; `PoolTimedout` after waiting at the cap.
    ///
    /// # Cancel safety
    /// Cancel safe. Dropping the future while it waits at the cap gives up its place (nothing
    /// leaks). Dropping it mid-dial does not abort the dial: it finishes in the background,
    /// bounded by the total connection timeout, and a successful connection goes to the pool
    /// (or to a waiter) instead of being thrown away; a failed one frees its slot.
    pub async fn get(&self, peer: &Peer) -> Result<Connection> {
        let key = match peer.key() {
            Ok(key) => key,
            Err(e) => {
                metrics::connect_error(e.kind(), self.peer_label(peer).as_deref());
                return Err(e);
            }
        };
        let span = tracing::debug_span!(
            "upstream_get",
            peer = %peer.address(),
            sni = peer.sni().unwrap_or(""),
            reused = tracing::field::Empty,
            error = tracing::field::Empty,
        );
        // With no subscriber interested, skip instrumenting: entering and leaving even a
        // disabled span is a measurable share of a pool hit.
        let result = if span.is_disabled() {
            self.checkout(peer, key).await
        } else {
            self.checkout(peer, key).instrument(span.clone()).await
        };
        match &result {
            Ok(conn) => {
                span.record("reused", conn.reused());
            }
            Err(e) => {
                span.record("error", e.kind().as_str());
                metrics::connect_error(e.kind(), self.peer_label(peer).as_deref());
            }
        }
        result
    }

    /// The HTTP layer's state shared by all clones of this connector.
    pub(crate) fn http_shared(&self) -> &crate::http::Shared {
        &self.inner.http
    }

    /// A connection that did not sit idle in the pool: a new dial, or, at
    /// `max_connections_per_peer` and only when `queue`, whatever `get` would wait for there
    /// (a freed slot to dial with, or a connection released just now, which has just finished
    /// an exchange). `Ok(None)` at the cap when not `queue`.
    ///
    /// For the HTTP layer: an HTTP/1.1 retry after a pooled connection turned out dead, and
    /// HTTP/2 connections, which are never pooled idle. Counted like `get`.
    ///
    /// # Cancel safety
    /// As `get`.
    pub(crate) async fn get_fresh(&self, peer: &Peer, queue: bool) -> Result<Option<Connection>> {
        let key = peer.key()?;
        let result = match self.inner.pool.reserve_dial(key, peer, queue) {
            None => return Ok(None),
            Some(Checkout::Dial(slot)) => self.dial_in_background(peer, key, slot).await,
            Some(Checkout::Reused(conn)) => Ok(conn),
            Some(Checkout::Wait(rx, key_pool)) => match self.wait(rx, &key_pool, peer).await {
                Ok(Handoff::Slot(slot)) => self.dial_in_background(peer, key, slot).await,
                Ok(Handoff::Conn(mut conn)) => {
                    conn.mark_checked_out(true);
                    conn.inner
                        .lease
                        .key_pool
                        .metrics
                        .checkout_reused
                        .increment(1);
                    Ok(conn)
                }
                Err(e) => Err(e),
            },
        };
        if let Err(e) = &result {
            metrics::connect_error(e.kind(), self.peer_label(peer).as_deref());
        }
        result.map(Some)
    }

    fn peer_label(&self, peer: &Peer) -> Option<String> {
        self.inner.options.metrics_peer_label.then(|| peer.name())
    }

    async fn checkout(&self, peer: &Peer, key: &PeerKey) -> Result<Connection> {
        let mut conn = match self.inner.pool.checkout(key, peer) {
            Checkout::Reused(conn) => conn,
            Checkout::Dial(slot) => return self.dial_in_background(peer, key, slot).await,
            Checkout::Wait(rx, key_pool) => match self.wait(rx, &key_pool, peer).await? {
                Handoff::Conn(conn) => conn,
                Handoff::Slot(slot) => return self.dial_in_background(peer, key, slot).await,
            },
        };
        conn.mark_checked_out(true);
        conn.inner
            .lease
            .key_pool
            .metrics
            .checkout_reused
            .increment(1);
        Ok(conn)
    }

    /// Waits at the per-peer cap for a released connection or a freed slot.
    async fn wait(
        &self,
        mut rx: oneshot::Receiver<Handoff>,
        key_pool: &KeyPool,
        peer: &Peer,
    ) -> Result<Handoff> {
        let start = Instant::now();
        let outcome = tokio::time::timeout(self.inner.options.wait_timeout, &mut rx).await;
        key_pool.metrics.wait.record(start.elapsed().as_secs_f64());
        let handoff = match outcome {
            Ok(Ok(handoff)) => Some(handoff),
            // A handoff that raced with the timeout is still ours to use.
            Err(_) => rx.try_recv().ok(),
            // The pool was dropped: nothing will ever arrive.
            Ok(Err(_)) => None,
        };
        handoff.ok_or_else(|| {
            Error::new(
                ErrorKind::PoolTimedout,
                format!(
                    "no connection became available within {:?} at max_connections_per_peer = {}",
                    self.inner.options.wait_timeout,
                    self.inner.options.max_connections_per_peer.unwrap_or(0)
                ),
            )
            .with_peer(peer.describe())
        })
    }

    /// Dials on a spawned task so that a cancelled `get` does not waste a half-done
    /// handshake: the finished connection is pooled instead.
    async fn dial_in_background(
        &self,
        peer: &Peer,
        key: &PeerKey,
        slot: Slot,
    ) -> Result<Connection> {
        let (tx, rx) = oneshot::channel();
        let inner = Arc::clone(&self.inner);
        let (peer, key) = (peer.clone(), key.clone());
        tokio::spawn(
            async move {
                let result = inner.dial(&peer, &key, slot).await;
                if let Err(Ok(conn)) = tx.send(result) {
                    // The caller went away; keep the connection for the next one.
                    inner.pool.release(conn);
                }
            }
            .in_current_span(),
        );
        let mut pending = PendingDial {
            rx,
            pool: Arc::clone(&self.inner.pool),
        };
        let result = (&mut pending.rx)
            .await
            .unwrap_or_else(|_| Err(Error::internal("the dial task ended without a result")));
        // Counted here, not in the dial: a dial whose caller went away pools its connection
        // and is not a checkout (the caller who takes it later counts as `reused`).
        if let Ok(conn) = &result {
            conn.inner.lease.key_pool.metrics.checkout_new.increment(1);
        }
        result
    }
}

/// The caller's end of a background dial. If the caller goes away after the dial sent its
/// connection but before it was received, the connection would be dropped with the channel;
/// pool it instead, as the dial task does when it finds the caller already gone.
struct PendingDial {
    rx: oneshot::Receiver<Result<Connection>>,
    pool: Arc<Pool>,
}

impl Drop for PendingDial {
    fn drop(&mut self) {
        if let Ok(Ok(conn)) = self.rx.try_recv() {
            self.pool.release(conn);
        }
    }
}

impl Inner {
    async fn dial(&self, peer: &Peer, key: &PeerKey, slot: Slot) -> Result<Connection> {
        let settings = peer.settings();
        let Some(key_pool) = slot.key_pool().cloned() else {
            return Err(Error::internal("dial started without a slot"));
        };
        let m = &key_pool.metrics;
        let total = settings
            .total_connection_timeout
            .unwrap_or(self.options.total_connection_timeout);
        let connect_timeout = settings
            .connection_timeout
            .unwrap_or(self.options.connection_timeout)
            .min(total);
        let start = Instant::now();
        let raw = tcp::dial(peer, connect_timeout).await?;
        let tcp_connect = start.elapsed();
        m.tcp_connect.record(tcp_connect.as_secs_f64());

        let (stream, digest, tls_handshake) = if key.is_tls() {
            let resume = settings.session_resumption && self.options.session_cache_size > 0;
            let handshake_start = Instant::now();
            let handshake = self
                .tls
                .handshake(raw, peer, key, start + total, resume)
                .await?;
            let took = handshake_start.elapsed();
            let digest = SslDigest::from_ssl(handshake.stream.ssl());
            if handshake.resumed {
                m.handshake_resumed.record(took.as_secs_f64());
            } else {
                m.handshake_full.record(took.as_secs_f64());
            }
            m.handshake(&digest);
            tracing::debug!(
                version = %digest.version,
                cipher = %digest.cipher,
                resumed = handshake.resumed,
                handshake_us = took.as_micros() as u64,
                "tls handshake done"
            );
            (
                Stream::Tls(handshake.stream),
                Some(Arc::new(digest)),
                Some(took),
            )
        } else {
            (Stream::Plain(raw), None, None)
        };

        let idle_timeout = settings.idle_timeout.unwrap_or(self.options.idle_timeout);
        let lease = slot
            .into_lease(idle_timeout)
            .ok_or_else(|| Error::internal("dial slot was already used"))?;
        let timing = TimingDigest {
            established_ts: SystemTime::now(),
            tcp_connect,
            tls_handshake,
        };
        let mut conn = Connection::new(stream, digest, timing, lease);
        conn.mark_checked_out(false);
        Ok(conn)
    }
}

impl Connector {
    /// Gives a connection back for reuse.
    ///
    /// Call it only after a complete exchange (request written, response fully read) when the
    /// upstream did not ask to close. The connection goes to the oldest task waiting for this
    /// peer, else into the idle pool; it is closed instead when it has unread bytes, was
    /// closed by the upstream, reached `max_uses` or `max_lifetime`, when the pool for its peer
    /// is full (the oldest idle one is closed), or when it belongs to another connector.
    pub fn release(&self, conn: Connection) {
        if !self.inner.pool.owns(&conn) {
            tracing::debug!(
                "connection released to a connector that did not create it; closing it"
            );
            return;
        }
        self.inner.pool.release(conn);
    }

    /// Idle connections across all peers (a snapshot; it may change as soon as it is read).
    pub fn idle_count(&self) -> usize {
        self.inner.pool.idle_count()
    }

    /// Idle connections for this peer's exact key (a snapshot).
    pub fn idle_count_for(&self, peer: &Peer) -> usize {
        peer.key()
            .map_or(0, |key| self.inner.pool.idle_count_for(key))
    }

    /// Connections for this peer's exact key: dialling, in use and idle (a snapshot).
    pub fn connection_count_for(&self, peer: &Peer) -> usize {
        peer.key()
            .map_or(0, |key| self.inner.pool.connection_count_for(key))
    }
}
