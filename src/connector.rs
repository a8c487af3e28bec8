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
use crate::pool::{Checkout, Handoff, KeyPool, Limits, Pool, Refill, Slot, Warm};
use crate::stats::{KeyStats, PeerStats};
use crate::stream::{Connection, Stream, TimingDigest};

/// The longest period between two reaper passes; see `ConnectorOptions::reap_interval`.
const MAX_REAP_INTERVAL: Duration = Duration::from_secs(3600);

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
/// | `max_lifetime_jitter` | 0.1 |
/// | `connection_timeout` | 5 s |
/// | `total_connection_timeout` | 10 s |
/// | `session_cache_size` | 1,024 |
/// | `session_max_auth_age` | 24 h |
/// | `metrics_peer_label` | `false` |
/// | `batched_metrics` | `false` |
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
    /// Idle connections kept across all peers; the least recently used is closed first (exactly
    /// up to 16 peer keys holding idle connections, beyond that the oldest of 8 keys sampled
    /// at random, so that an eviction costs O(1) whatever the number of keys). Exact at rest;
    /// concurrent releases never close more than the excess between them, though a checkout
    /// racing an eviction can make it close one connection more than needed.
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
    /// checkout. Defaults to `None` (unlimited). Set it to follow DNS changes, or so that
    /// connections made before a certificate rotation end within a bound. It does not bound
    /// TLS session resumption: new connections may resume a cached session until
    /// `session_max_auth_age` (or the certificate's expiry), whatever this is.
    pub max_lifetime: Option<Duration>,
    /// Shortens each connection's `max_lifetime` by a random fraction of up to this much,
    /// drawn once per connection when it is dialled, so that connections dialled together
    /// (a preconnect, a burst, a restart) do not all expire, and redial, at once. 0.0 turns
    /// it off; 1.0 allows anything from zero to the full `max_lifetime`. Defaults to 0.1
    /// (each lifetime 90% to 100% of `max_lifetime`); must be within 0.0..=1.0, else
    /// `Connector::new` returns `InvalidConfig`. No effect without `max_lifetime`.
    pub max_lifetime_jitter: f64,
    /// TCP connect timeout when the peer sets none. Defaults to 5 s.
    pub connection_timeout: Duration,
    /// TCP connect plus TLS handshake timeout when the peer sets none. Defaults to 10 s.
    pub total_connection_timeout: Duration,
    /// TLS sessions kept for resumption, one per peer key; 0 turns resumption off for the
    /// whole connector. Defaults to 1,024.
    pub session_cache_size: usize,
    /// How long after a full handshake (the one that verified the server's certificate) its
    /// session may still authenticate new connections by resumption. Counted from that
    /// handshake, however often tickets renewed the session since: a resumed handshake
    /// verifies nothing, so this bounds how stale a verification may be (a revoked or
    /// replaced certificate keeps being trusted by resumption until then). A session is also
    /// never offered once the certificate chain it was verified with has expired. Defaults
    /// to 24 h, BoringSSL's limit and RFC 8446's maximum ticket lifetime. Zero is
    /// `InvalidConfig` (set `session_cache_size` to 0 to turn resumption off).
    pub session_max_auth_age: Duration,
    /// Add a `peer` label (the peer's name, else its address) to every metric. Defaults to
    /// `false`: one series per upstream can be too many for large fleets.
    pub metrics_peer_label: bool,
    /// Publish the pool hit path's metrics from the reaper instead of at every checkout and
    /// release. Defaults to `false`: every gauge and counter is exact the moment `get` or
    /// `release` returns.
    ///
    /// When `true`, the moves of a pooled connection between idle and in use (a `get` answered
    /// from the pool, a `release` into it) and the `checkouts_total{outcome="reused"}` count
    /// they make are tallied per peer key, under the lock the pool holds there anyway, and
    /// the reaper adds them to `upstream_pool_idle_connections`,
    /// `upstream_pool_active_connections` and that counter every `reap_interval` (and when
    /// the connector is dropped). So those three series lag by up to one `reap_interval`
    /// (250 ms by default, far below any scrape interval); every other metric, and every
    /// change caused by a dial or a close, is still recorded at once, and the published
    /// gauges never go negative. [`Connector::stats_for`] stays exact.
    ///
    /// What it buys: without a `peer` label all peers share one series per gauge, so every
    /// hit on any peer writes the same few atomics, and threads serving different peers
    /// take turns on their cache lines. With this on, a hit writes no shared memory at all:
    /// about 25 ns less per hit on one core, and hits on different peers scale across cores
    /// (BENCHMARKS.md, section 8).
    pub batched_metrics: bool,
    /// How often the background reaper looks for expired or closed idle connections, and tops
    /// keys up to their `Peer::with_min_idle`. Defaults to 250 ms, so a closed connection
    /// leaves the pool, and a `min_idle` key is topped up, well within a second.
    /// Values above one hour count as one hour (idle connections are still checked at every
    /// checkout; the reaper also forgets keys nobody uses).
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
            max_lifetime_jitter: 0.1,
            connection_timeout: Duration::from_secs(5),
            total_connection_timeout: Duration::from_secs(10),
            session_cache_size: 1024,
            session_max_auth_age: Duration::from_secs(24 * 3600),
            metrics_peer_label: false,
            batched_metrics: false,
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
            ("session_max_auth_age", self.session_max_auth_age),
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
        if !(0.0..=1.0).contains(&self.max_lifetime_jitter) {
            return Err(Error::config(format!(
                "ConnectorOptions::max_lifetime_jitter must be within 0.0..=1.0, got {}",
                self.max_lifetime_jitter
            )));
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
        let tls = TlsConnector::new(options.session_cache_size, options.session_max_auth_age)?;
        let limits = Limits {
            max_idle_per_peer: options.max_idle_per_peer,
            max_idle_total: options.max_idle_total,
            max_connections_per_peer: options.max_connections_per_peer,
            max_uses: options.max_uses,
            idle_timeout: options.idle_timeout,
            // A longer period gains nothing, and tokio's interval would overflow adding
            // `Duration::MAX` to the current instant.
            reap_interval: options.reap_interval.min(MAX_REAP_INTERVAL),
            peer_label: options.metrics_peer_label,
            batched_metrics: options.batched_metrics,
        };
        // The pool reaches back to the connector (weakly) for `min_idle` top-up dials.
        let inner = Arc::new_cyclic(|me: &std::sync::Weak<Inner>| {
            let refill: std::sync::Weak<dyn Refill> = me.clone();
            Inner {
                options,
                tls,
                pool: Arc::new(Pool::new(limits, refill)),
                http: crate::http::Shared::default(),
            }
        });
        Ok(Connector { inner })
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

    /// Whether the pool still has an entry for `key`: the HTTP layer forgets what it learnt
    /// about a key once the pool has forgotten the key.
    pub(crate) fn pool_knows(&self, key: &PeerKey) -> bool {
        self.inner.pool.knows(key)
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
                    conn.inner.lease.key_pool.count_reused_checkout();
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
        conn.inner.lease.key_pool.count_reused_checkout();
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
            // A handoff that raced with the timeout is still ours to use. Close first: a value
            // sent between a bare `try_recv` and dropping `rx` would be lost with the channel
            // (a connection closed, or a slot given back only when it is dropped); once
            // closed, nothing more can be sent, so this `try_recv` sees everything.
            Err(_) => {
                rx.close();
                rx.try_recv().ok()
            }
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
            let key_pool = &conn.inner.lease.key_pool;
            key_pool.metrics.checkout_new.increment(1);
            KeyStats::bump(&key_pool.stats.checkouts_new);
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
        // Close before looking, so the dial task cannot send in between: it then gets its
        // connection back and pools it itself.
        self.rx.close();
        if let Ok(Ok(conn)) = self.rx.try_recv() {
            self.pool.release(conn);
        }
    }
}

impl Inner {
    /// Dials with `slot`, counting the dial in the key's stats while it runs and its failure.
    async fn dial(&self, peer: &Peer, key: &PeerKey, slot: Slot) -> Result<Connection> {
        let Some(key_pool) = slot.key_pool().cloned() else {
            return Err(Error::internal("dial started without a slot"));
        };
        let result = {
            let _connecting = key_pool.stats.connecting();
            self.establish(peer, key, slot, &key_pool).await
        };
        if result.is_err() {
            KeyStats::bump(&key_pool.stats.connect_errors);
        }
        result
    }

    async fn establish(
        &self,
        peer: &Peer,
        key: &PeerKey,
        slot: Slot,
        key_pool: &KeyPool,
    ) -> Result<Connection> {
        let settings = peer.settings();
        // Taken before the dial: a connection whose dial overlapped an `evict` is not pooled.
        let epoch = key_pool.epoch();
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
                .handshake(raw, peer, key, tcp::deadline_after(start, total), resume)
                .await?;
            let took = handshake_start.elapsed();
            let digest = handshake.digest;
            if handshake.resumed {
                m.handshake_resumed.record(took.as_secs_f64());
                KeyStats::bump(&key_pool.stats.handshakes_resumed);
            } else {
                m.handshake_full.record(took.as_secs_f64());
                KeyStats::bump(&key_pool.stats.handshakes_full);
            }
            m.handshake(&digest);
            tracing::debug!(
                version = %digest.version,
                cipher = %digest.cipher,
                resumed = handshake.resumed,
                handshake_us = took.as_micros() as u64,
                "tls handshake done"
            );
            (Stream::Tls(handshake.stream), Some(digest), Some(took))
        } else {
            (Stream::Plain(raw), None, None)
        };

        let idle_timeout = settings.idle_timeout.unwrap_or(self.options.idle_timeout);
        let lifetime = self
            .options
            .max_lifetime
            .map(|max| jittered(max, self.options.max_lifetime_jitter));
        let lease = slot
            .into_lease(idle_timeout, lifetime, epoch)
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
    /// is full (the oldest idle one is closed), when its peer was evicted (`evict`,
    /// `evict_all`) since it was dialled, or when it belongs to another connector.
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

/// Operating the pool: warming, stats, eviction.
impl Connector {
    /// Dials until `n` idle connections exist for `peer`'s exact key, and returns how many
    /// are idle then.
    ///
    /// Dials what is missing concurrently (a connection already idle, or a dial of another
    /// `preconnect` or of the `min_idle` top-up in progress, counts towards `n`), capped by
    /// `max_idle_per_peer`, the room left under `max_idle_total` and
    /// `max_connections_per_peer` (at the cap it stops there: it never waits). The
    /// connections go to the idle pool, so a later `get` hands them out with `reused()` true
    /// (or to a `get` already waiting at the cap). A second call with the same `n` dials
    /// nothing. Counts as a use of the key (for [`Peer::with_min_idle`]).
    ///
    /// Cost: one TCP connect and TLS handshake per missing connection (the first full, the
    /// others resuming its session when they start after it was cached).
    ///
    /// It warms byte-stream connections, which serve `get` and HTTP/1.1 requests of
    /// [`crate::http::HttpConnector`]; the HTTP/2 layer never takes idle pool connections.
    /// For a peer used over HTTP/2 call [`crate::http::HttpConnector::preconnect`], which
    /// dials HTTP/2 connections into its shared registry (and falls back to this for an
    /// HTTP/1.1 key).
    ///
    /// # Errors
    /// `InvalidConfig` for an unusable peer; otherwise the first error of the dials (as
    /// [`Connector::get`] reports them). The dials that succeeded are pooled all the same.
    ///
    /// # Cancel safety
    /// Cancel safe: the dials run on tasks of their own; dropping the future leaves them to
    /// finish and pool their connections, bounded by the total connection timeout.
    pub async fn preconnect(&self, peer: &Peer, n: usize) -> Result<usize> {
        let key = peer.key()?;
        let reserved = self.inner.pool.reserve_warm(key, peer, n);
        let dials: Vec<_> = reserved
            .into_iter()
            .map(|(slot, warm)| {
                let inner = Arc::clone(&self.inner);
                let (peer, key) = (peer.clone(), key.clone());
                tokio::spawn(
                    async move { inner.warm(&peer, &key, slot, warm).await }.in_current_span(),
                )
            })
            .collect();
        let mut first_error = None;
        for dial in dials {
            let outcome = dial
                .await
                .unwrap_or_else(|e| Err(Error::internal(format!("preconnect dial task: {e}"))));
            if let Err(e) = outcome {
                first_error.get_or_insert(e);
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(self.inner.pool.idle_count_for(key)),
        }
    }

    /// A snapshot of `peer`'s exact key: connections now and all-time counters (see
    /// [`PeerStats`] for what each counts and how long they live). `PeerStats::default()` for
    /// a key never used, forgotten, or an unusable peer.
    ///
    /// Cost: one map lookup and one short lock of the key; counting is always on and costs
    /// the hit path one relaxed atomic add.
    pub fn stats_for(&self, peer: &Peer) -> PeerStats {
        peer.key().map_or_else(
            |_| PeerStats::default(),
            |key| self.inner.pool.stats_for(key),
        )
    }

    /// Every key's snapshot, with its description (`address` or `address SNI "name"`; peers
    /// differing only in other settings have equal descriptions, one entry each), in no
    /// particular order.
    ///
    /// Cost: one short lock per key; O(keys).
    pub fn stats(&self) -> Vec<(String, PeerStats)> {
        self.inner.pool.stats()
    }

    /// Closes every idle connection of `peer`'s exact key and forgets its cached TLS session,
    /// for an upstream removed from configuration or one that rotated its certificate.
    /// Returns how many idle connections were closed: pooled ones, and HTTP/2 connections of
    /// [`crate::http::HttpConnector`] that carried no stream.
    ///
    /// Connections in use, and dials in progress, are closed when released instead of pooled
    /// (counted in `PeerStats::evicted` then); the next dial authenticates in full (unless a
    /// handshake already in flight during the call caches its new session first). Metrics
    /// count each as `upstream_pool_evictions_total{reason="evicted"}`.
    ///
    /// The key's HTTP/2 connections are retired: from the call on they take no new stream,
    /// their streams in flight finish undisturbed, and each closes after its last stream
    /// (counted in `PeerStats::evicted` at the call); an HTTP/2 dial in progress is closed
    /// when it finishes. The next request dials a new connection. The protocol an
    /// `Alpn::H2H1` key learnt is forgotten too, and learnt again by the next request.
    pub fn evict(&self, peer: &Peer) -> usize {
        let Ok(key) = peer.key() else {
            return 0;
        };
        self.inner.tls.forget_session(key);
        self.inner.http.evict(key) + self.inner.pool.evict(key)
    }

    /// [`Connector::evict`] for every key (HTTP/2 connections included), and forgets every
    /// cached TLS session. Returns how many idle connections were closed. Cost: O(keys).
    pub fn evict_all(&self) -> usize {
        self.inner.tls.forget_all_sessions();
        self.inner.http.evict_all() + self.inner.pool.evict_all()
    }
}

impl Inner {
    /// One `preconnect` or top-up dial: pools the connection, then releases its warming
    /// place (so the key never looks short in between).
    async fn warm(&self, peer: &Peer, key: &PeerKey, slot: Slot, mut warm: Warm) -> Result<()> {
        match self.dial(peer, key, slot).await {
            Ok(conn) => {
                self.pool.release(conn);
                drop(warm);
                Ok(())
            }
            Err(e) => {
                warm.failed();
                drop(warm);
                metrics::connect_error(
                    e.kind(),
                    self.options
                        .metrics_peer_label
                        .then(|| peer.name())
                        .as_deref(),
                );
                tracing::debug!(peer = %peer.describe(), error = %e, "warming dial failed");
                Err(e)
            }
        }
    }
}

impl Refill for Inner {
    fn refill(self: Arc<Self>, peer: Peer, slot: Slot, warm: Warm) {
        let Ok(key) = peer.key().cloned() else {
            // The key came from this peer; it cannot fail now. Dropping frees the slot.
            return;
        };
        tokio::spawn(async move {
            // The error is counted in the stats and metrics, and backs the key off.
            let _ = self.warm(&peer, &key, slot, warm).await;
        });
    }
}

/// `max` shortened by a random fraction of up to `jitter` (in 0.0..=1.0).
///
/// The random bits come from `RandomState`, whose keys are seeded per process and stepped for
/// every instance: no dependency, and a dial is rare enough for its cost (tens of ns).
fn jittered(max: Duration, jitter: f64) -> Duration {
    use std::hash::BuildHasher;
    if jitter <= 0.0 {
        return max;
    }
    let bits = std::collections::hash_map::RandomState::new().hash_one(0u8);
    // The top 53 bits as a fraction in [0, 1).
    let unit = (bits >> 11) as f64 / (1u64 << 53) as f64;
    max.mul_f64(1.0 - jitter * unit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_shortens_by_at_most_the_fraction_and_spreads() {
        let max = Duration::from_secs(100);
        assert_eq!(jittered(max, 0.0), max);
        let draws: Vec<Duration> = (0..1000).map(|_| jittered(max, 0.2)).collect();
        assert!(draws
            .iter()
            .all(|d| *d <= max && *d >= Duration::from_secs(80)));
        let (lo, hi) = (draws.iter().min().unwrap(), draws.iter().max().unwrap());
        // 1,000 uniform draws over 20 s: the extremes lie within a few hundred ms of the ends.
        assert!(
            *lo < Duration::from_secs(81) && *hi > Duration::from_secs(99),
            "{lo:?}..{hi:?}"
        );
        assert!(jittered(max, 1.0) <= max);
    }
}
