//! Per-key statistics a program can read without a metrics recorder: [`PeerStats`].
//!
//! The `metrics` facade is for scraping; these counters answer "how many connections do I
//! have to this upstream and how often are they reused" from inside the process. They live in
//! the key's pool entry: the hit path's one count (a reused checkout) is a plain add under
//! the key's lock it already holds; the rest (dials, handshakes, errors, evictions) are
//! relaxed atomics outside the lock.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// A snapshot of one pool key's connections and its all-time counters.
///
/// From [`crate::Connector::stats_for`] and [`crate::Connector::stats`]. The fields are read
/// one after the other, not under one lock, so under load they are not consistent with each
/// other (for example `checkouts_new` may already count a dial that `in_use` does not show
/// yet); each field on its own is exact at the moment it was read.
///
/// The counters cover the life of the key's pool entry: they start at zero when the first
/// `get` or `preconnect` for the key creates it, and vanish with it when the key has had no
/// connections and no use for its idle timeout (then a later use starts again from zero).
/// A key that was never used, or was forgotten, reports `PeerStats::default()`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PeerStats {
    /// Idle connections in the pool now.
    pub idle: usize,
    /// Connections handed out and not yet released or dropped, now. A live HTTP/2
    /// connection of [`crate::http::HttpConnector`] counts as one in use for its whole life,
    /// however many streams it carries (none included): it is never pooled idle.
    pub in_use: usize,
    /// Dials in progress now (for `get`, `preconnect` or the `min_idle` top-up).
    pub connecting: usize,
    /// `get` calls waiting at `max_connections_per_peer` now.
    pub waiting: usize,
    /// `get` calls answered with a pooled connection (including ones handed over by a
    /// release while waiting, and preconnected ones), and HTTP/2 requests sent as a stream
    /// on a connection that had carried one before (as the
    /// `upstream_pool_checkouts_total{outcome="reused"}` metric counts them).
    pub checkouts_reused: u64,
    /// `get` calls answered with a connection dialled for them, including the HTTP layer's
    /// dials: an HTTP/2 connection counts once here (for its first stream), and the first
    /// `Alpn::H2H1` request that finds HTTP/1.1 counts once here and not again in
    /// `checkouts_reused`.
    pub checkouts_new: u64,
    /// TLS handshakes that authenticated the upstream in full (any dial: `get`, `preconnect`,
    /// `min_idle`).
    pub handshakes_full: u64,
    /// TLS handshakes that resumed a cached session.
    pub handshakes_resumed: u64,
    /// Dials that failed (TCP connect or TLS handshake, any dial); `get` calls that timed out
    /// waiting at the cap are not dials and are not counted.
    pub connect_errors: u64,
    /// Connections closed by [`crate::Connector::evict`] or `evict_all`, idle ones at the call
    /// and in-use ones at their release.
    pub evicted: u64,
}

/// What `KeyStats::snapshot` needs from under the key's lock.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Live {
    pub(crate) idle: usize,
    /// Slots: dialling + in use + idle.
    pub(crate) total: usize,
    pub(crate) waiting: usize,
    /// Reused checkouts, counted under the lock the hit path holds anyway (an atomic add
    /// outside it measured a few ns on a 150 ns hit).
    pub(crate) reused: u64,
}

/// The all-time counters of one key, bumped where the event happens (reused checkouts are
/// counted in the key's locked state instead, see [`Live::reused`]).
#[derive(Debug, Default)]
pub(crate) struct KeyStats {
    pub(crate) checkouts_new: AtomicU64,
    pub(crate) handshakes_full: AtomicU64,
    pub(crate) handshakes_resumed: AtomicU64,
    pub(crate) connect_errors: AtomicU64,
    pub(crate) evicted: AtomicU64,
    /// HTTP/2 streams sent on a connection that had carried one before: reused checkouts of
    /// the HTTP layer, added to `checkouts_reused` (the connection's first stream is the
    /// `new` checkout its dial counted).
    pub(crate) streams_reused: AtomicU64,
    /// Dials in progress; the slot count alone cannot tell them from connections in use.
    pub(crate) connecting: AtomicUsize,
}

impl KeyStats {
    /// Relaxed: the counters order nothing, they are only read for reporting.
    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters, with what the caller read under the key's lock.
    pub(crate) fn snapshot(&self, live: Live) -> PeerStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let connecting = self.connecting.load(Ordering::Relaxed);
        PeerStats {
            idle: live.idle,
            // `total` counts dials, connections in use and idle ones.
            in_use: live
                .total
                .saturating_sub(live.idle)
                .saturating_sub(connecting),
            connecting,
            waiting: live.waiting,
            checkouts_reused: live.reused.saturating_add(get(&self.streams_reused)),
            checkouts_new: get(&self.checkouts_new),
            handshakes_full: get(&self.handshakes_full),
            handshakes_resumed: get(&self.handshakes_resumed),
            connect_errors: get(&self.connect_errors),
            evicted: get(&self.evicted),
        }
    }

    /// Counts one dial in progress until the returned guard is dropped (also when the dial's
    /// future is dropped half-way).
    pub(crate) fn connecting(&self) -> Connecting<'_> {
        self.connecting.fetch_add(1, Ordering::Relaxed);
        Connecting(&self.connecting)
    }
}

/// See [`KeyStats::connecting`].
pub(crate) struct Connecting<'a>(&'a AtomicUsize);

impl Drop for Connecting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
