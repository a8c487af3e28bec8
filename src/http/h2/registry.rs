//! Which HTTP/2 connections each pool key has, how many streams each carries, and who waits.
//!
//! One [`H2Key`] per pool key, kept in the connector (so every `HttpConnector` built from
//! its clones shares connections). All of a key's bookkeeping sits under its one mutex:
//! connection list, per-connection stream counts, dials in flight, waiters, the protocol
//! learnt. A pick therefore sees exact counts (no "false negative" where a request misses a
//! connection with room, which Pingora's atomics accept). Lock order: an `H2Key`'s lock,
//! then the pool's key lock (`Connector::connection_count_for`); never the other way: the
//! pool never calls back into this module.
//!
//! A connection's states, from one field each: *ready* (`!draining`, in `conns`), *draining*
//! (GOAWAY received, past `max_lifetime`, or closing idle: `draining`, takes no new streams,
//! retired when its last stream ends), *gone* (retired or its driver ended: removed from
//! `conns`).

use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::conn::{self, Dialled};
use crate::connector::Connector;
use crate::error::{Error, ErrorKind, Result};
use crate::http::Offer;
use crate::key::{PeerKey, PrehashedState};
use crate::metrics::{HttpMetrics, PeerMetrics};
use crate::peer::Peer;
use crate::stream::SslDigest;

/// The HTTP layer's state of one connector: per key, its protocol and HTTP/2 connections.
///
/// Entries stay after their connections close, to remember the protocol a key speaks
/// (about 300 bytes per key ever used over HTTP/2 or `Alpn::H2H1`).
#[derive(Default)]
pub(crate) struct Shared {
    keys: DashMap<PeerKey, Arc<H2Key>, PrehashedState>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("keys", &self.keys.len())
            .finish()
    }
}

/// What a key turned out to speak (learnt from ALPN on its first TLS connection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Learnt {
    Unknown,
    H1,
    H2,
}

/// One pool key's HTTP/2 connections.
pub(crate) struct H2Key {
    state: Mutex<KeyState>,
    /// Woken (all waiters) whenever capacity may have appeared: a stream ended, a dial
    /// finished or failed, a connection went away (its pool slot is then free).
    notify: Notify,
    pub(super) metrics: HttpMetrics,
    /// `address SNI "name"`, for error messages (shared, not rebuilt per request).
    description: Arc<str>,
}

struct KeyState {
    learnt: Learnt,
    conns: Vec<ConnEntry>,
    /// Dials in flight for this key.
    dialing: usize,
    /// Requests waiting for a stream.
    waiting: usize,
    /// The stream limit of the key's last new connection: what a dial in flight is expected
    /// to bring. `None` until one connected (then `max_h2_streams` is assumed).
    learnt_limit: Option<usize>,
    /// Failed dials so far, and the last failure, for the requests that waited on them.
    failures: u64,
    last_error: Option<Error>,
    next_id: u64,
}

struct ConnEntry {
    id: u64,
    send: ::h2::client::SendRequest<Bytes>,
    digest: Option<Arc<SslDigest>>,
    pool_metrics: Arc<PeerMetrics>,
    /// Streams open now (counted from pick until the stream's lease drops).
    active: usize,
    /// GOAWAY received (or closing idle): no new streams.
    draining: bool,
    /// Streams handed out so far (a stream after the first is "reused").
    picks: u64,
    /// Streams actually sent (for `requests_per_connection`).
    sent: u64,
    /// A GOAWAY from the server was counted for this connection.
    goaway_counted: bool,
    /// Since when it has had no streams; `None` while it has some.
    idle_since: Option<Instant>,
    /// `max_lifetime` after it was established: from then on it takes no new streams and
    /// closes once its last one ends (as a pooled connection is retired at checkout).
    expires: Option<Instant>,
}

/// The right to one stream on one connection; dropping it frees the stream slot.
pub(crate) struct StreamLease {
    key: Arc<H2Key>,
    id: u64,
    pub(super) send: ::h2::client::SendRequest<Bytes>,
    /// The connection had carried a stream before this one.
    pub(super) reused: bool,
    pub(super) digest: Option<Arc<SslDigest>>,
    pool_metrics: Arc<PeerMetrics>,
}

/// The outcome of [`acquire`].
pub(crate) enum Acquired {
    Stream(StreamLease),
    /// The key speaks HTTP/1.1 (its server chose it over `h2`).
    UseH1,
}

impl Shared {
    fn key(&self, key: &PeerKey, peer: &Peer, peer_label: bool) -> Arc<H2Key> {
        if let Some(k) = self.keys.get(key) {
            return Arc::clone(k.value());
        }
        Arc::clone(
            self.keys
                .entry(key.clone())
                .or_insert_with(|| {
                    Arc::new(H2Key {
                        state: Mutex::new(KeyState {
                            learnt: Learnt::Unknown,
                            conns: Vec::new(),
                            dialing: 0,
                            waiting: 0,
                            learnt_limit: None,
                            failures: 0,
                            last_error: None,
                            next_id: 0,
                        }),
                        notify: Notify::new(),
                        metrics: HttpMetrics::new(peer_label.then(|| peer.name())),
                        description: peer.describe().into(),
                    })
                })
                .value(),
        )
    }
}

/// The connector went: connections still listed close (their drivers see `h2` end them once
/// the handles here are gone) and leave the gauges now, as the pool's idle ones do.
impl Drop for H2Key {
    fn drop(&mut self) {
        let st = self.state.get_mut();
        for c in st.conns.drain(..) {
            self.metrics.connections.decrement(1.0);
            self.metrics.requests_per_connection.record(c.sent as f64);
        }
    }
}

impl Shared {
    /// Forgets that `key` speaks HTTP/1.1 (its server now selects `h2`): the next request
    /// finds out again.
    pub(crate) fn forget_protocol(&self, key: &PeerKey) {
        if let Some(k) = self.keys.get(key) {
            let mut st = k.state.lock();
            if st.learnt == Learnt::H1 {
                st.learnt = Learnt::Unknown;
            }
        }
    }
}

/// Counts a request among the key's waiters while it waits.
struct Waiting<'a>(&'a H2Key);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.state.lock().waiting -= 1;
    }
}

/// A stream on one of `peer`'s HTTP/2 connections, or the news that the key speaks HTTP/1.1.
///
/// Takes a stream on the busiest connection with room; else waits for a dial in flight
/// whose expected capacity covers the waiters; else dials (under `max_connections_per_peer`);
/// else waits up to `wait_timeout` for a stream or a connection slot.
///
/// # Errors
/// The dial's error (every waiter that counted on it gets a copy); `PoolTimedout` at the cap.
///
/// # Cancel safety
/// Cancel safe: a dropped waiter leaves the count, a dial it started finishes for the others.
pub(crate) async fn acquire(
    connector: &Connector,
    peer: &Peer,
    key: &PeerKey,
    offer: Offer,
) -> Result<Acquired> {
    let options = connector.options();
    let h2key = connector
        .http_shared()
        .key(key, peer, options.metrics_peer_label);
    let max_streams = options.max_h2_streams;
    let mut waiting: Option<Waiting<'_>> = None;
    let mut deadline: Option<Instant> = None;
    let mut seen_failures: Option<u64> = None;
    loop {
        let notified = h2key.notify.notified();
        tokio::pin!(notified);
        {
            let mut st = h2key.state.lock();
            if st.learnt == Learnt::H1 && offer == Offer::Either {
                return Ok(Acquired::UseH1);
            }
            if let Some(lease) = st.pick(&h2key, max_streams) {
                return Ok(Acquired::Stream(lease));
            }
            let seen = *seen_failures.get_or_insert(st.failures);
            if st.failures != seen {
                if let Some(e) = &st.last_error {
                    return Err(e.duplicate());
                }
            }
            let demand = st.waiting + usize::from(waiting.is_none());
            let expected = st.dialing * st.learnt_limit.unwrap_or(max_streams);
            // While the protocol is unknown, one dial finds it out; the rest wait for it.
            let may_dial = st.learnt == Learnt::H2 || st.dialing == 0;
            if expected < demand && may_dial {
                let under_cap = options
                    .max_connections_per_peer
                    .is_none_or(|cap| connector.connection_count_for(peer) < cap);
                if under_cap {
                    st.dialing += 1;
                    tokio::spawn(dial(
                        connector.clone(),
                        peer.clone(),
                        Arc::clone(&h2key),
                        offer,
                    ));
                }
            }
            if waiting.is_none() {
                st.waiting += 1;
                waiting = Some(Waiting(&h2key));
            }
            // Waiting for a dial is bounded by the dial's own timeouts; waiting at the cap
            // (nothing dialling) by `wait_timeout`, counted from the first time.
            if st.dialing == 0 && deadline.is_none() {
                deadline = Some(conn::later(Instant::now(), options.wait_timeout));
            }
            // Registered before the lock is released, so no wake-up can be missed.
            notified.as_mut().enable();
        }
        match deadline {
            Some(at) => {
                if tokio::time::timeout_at(at, notified).await.is_err() {
                    let mut st = h2key.state.lock();
                    if let Some(lease) = st.pick(&h2key, max_streams) {
                        return Ok(Acquired::Stream(lease));
                    }
                    return Err(Error::new(
                        ErrorKind::PoolTimedout,
                        format!(
                            "no HTTP/2 stream became available within {:?} (max_connections_per_peer = {}, \
                             max_h2_streams = {max_streams})",
                            options.wait_timeout,
                            options.max_connections_per_peer.unwrap_or(0),
                        ),
                    )
                    .with_peer(peer.describe()));
                }
            }
            None => notified.await,
        }
    }
}

impl KeyState {
    /// Takes a stream on the busiest ready connection with room. Busiest rather than first
    /// or least loaded: streams pack onto as few connections as possible, so surplus ones
    /// fall idle and close on the idle timeout instead of each keeping a trickle alive.
    fn pick(&mut self, key: &Arc<H2Key>, max_streams: usize) -> Option<StreamLease> {
        // One clock read, and only when `max_lifetime` is set.
        if self.conns.iter().any(|c| c.expires.is_some()) {
            let now = Instant::now();
            for c in &mut self.conns {
                if c.expires.is_some_and(|at| now >= at) {
                    c.draining = true;
                }
            }
            self.retire_drained(key);
        }
        let mut best: Option<usize> = None;
        for (i, c) in self.conns.iter().enumerate() {
            if c.draining {
                continue;
            }
            // Re-read on every pick: a server may lower (or raise) its limit at any time.
            let limit = max_streams.min(c.send.current_max_send_streams());
            if c.active < limit && best.is_none_or(|b| c.active > self.conns[b].active) {
                best = Some(i);
            }
        }
        let c = &mut self.conns[best?];
        c.active += 1;
        c.picks += 1;
        // Counted as sent now, taken back in the rare case it is not (`unsent`): one lock
        // per request fewer than counting after the send.
        c.sent += 1;
        c.idle_since = None;
        let reused = c.picks > 1;
        key.metrics.streams_active.increment(1.0);
        Some(StreamLease {
            key: Arc::clone(key),
            id: c.id,
            send: c.send.clone(),
            reused,
            digest: c.digest.clone(),
            pool_metrics: Arc::clone(&c.pool_metrics),
        })
    }

    /// Retires draining connections without streams. Dropping their stream-opening handle
    /// makes `h2` close them (its driver then ends); no stream can start on them any more.
    fn retire_drained(&mut self, key: &H2Key) {
        let done: Vec<u64> = self
            .conns
            .iter()
            .filter(|c| c.draining && c.active == 0)
            .map(|c| c.id)
            .collect();
        for id in done {
            self.retire(key, id);
        }
    }

    fn retire(&mut self, key: &H2Key, id: u64) {
        if let Some(i) = self.conns.iter().position(|c| c.id == id) {
            let gone = self.conns.swap_remove(i);
            key.metrics.connections.decrement(1.0);
            key.metrics.requests_per_connection.record(gone.sent as f64);
        }
    }
}

impl StreamLease {
    /// The peer, for error messages.
    pub(super) fn peer_description(&self) -> Arc<str> {
        Arc::clone(&self.key.description)
    }

    /// The stream went out: count it as a `reused` checkout unless it is the connection's
    /// first (which its dial counted as `new`).
    pub(super) fn sent(&self) {
        if self.reused {
            self.pool_metrics.checkout_reused.increment(1);
        }
    }

    /// The stream did not go out after all: not a request of this connection.
    pub(super) fn unsent(&self) {
        let mut st = self.key.state.lock();
        if let Some(c) = st.conns.iter_mut().find(|c| c.id == self.id) {
            c.sent -= 1;
        }
    }

    /// The connection takes no new streams: the server sent GOAWAY (`goaway`), or it is
    /// closing.
    pub(super) fn mark_draining(&self, goaway: bool) {
        let mut st = self.key.state.lock();
        if let Some(c) = st.conns.iter_mut().find(|c| c.id == self.id) {
            c.draining = true;
            if goaway {
                count_goaway(&self.key, c);
            }
        }
    }
}

fn count_goaway(key: &H2Key, c: &mut ConnEntry) {
    if !c.goaway_counted {
        c.goaway_counted = true;
        key.metrics.goaway.increment(1);
    }
}

impl Drop for StreamLease {
    fn drop(&mut self) {
        let waiting = {
            let mut st = self.key.state.lock();
            if let Some(c) = st.conns.iter_mut().find(|c| c.id == self.id) {
                c.active -= 1;
                if c.active == 0 {
                    c.idle_since = Some(Instant::now());
                    if c.draining {
                        // Its last stream: close it now rather than at its idle timeout.
                        st.retire(&self.key, self.id);
                    }
                }
            }
            st.waiting
        };
        self.key.metrics.streams_active.decrement(1.0);
        // A waiter registers under the lock read above, so with none counted there is
        // nobody to wake (a later one finds the freed slot in its own pick).
        if waiting > 0 {
            self.key.notify.notify_waiters();
        }
    }
}

/// Decrements `dialing` and wakes the waiters however the dial ends (also if its task is
/// dropped with the runtime).
struct DialGuard(Arc<H2Key>);

impl Drop for DialGuard {
    fn drop(&mut self) {
        self.0.state.lock().dialing -= 1;
        self.0.notify.notify_waiters();
    }
}

/// Dials a connection for `key` and shares it (HTTP/2), or hands it to the pool (the server
/// chose HTTP/1.1). Runs on its own task: the requests waiting for it may all go away.
async fn dial(connector: Connector, peer: Peer, key: Arc<H2Key>, offer: Offer) {
    let guard = DialGuard(Arc::clone(&key));
    let options = connector.options();
    let result = conn::connect(&connector, &peer, offer).await;
    match result {
        Ok(Dialled::H2(ready)) => {
            let id = {
                let mut st = key.state.lock();
                st.learnt = Learnt::H2;
                let limit = options.max_h2_streams.min(ready.server_limit);
                st.learnt_limit = Some(limit.max(1));
                let id = st.next_id;
                st.next_id += 1;
                st.conns.push(ConnEntry {
                    id,
                    send: ready.send.clone(),
                    digest: ready.digest.clone(),
                    pool_metrics: Arc::clone(&ready.pool_metrics),
                    active: 0,
                    draining: false,
                    picks: 0,
                    sent: 0,
                    goaway_counted: false,
                    idle_since: Some(Instant::now()),
                    // `checked_add`: a huge `max_lifetime` means never, not a panic.
                    expires: options
                        .max_lifetime
                        .and_then(|life| Instant::now().checked_add(life)),
                });
                key.metrics.connections.increment(1.0);
                id
            };
            let timers = conn::Timers {
                idle: ready.idle_timeout,
                ping_interval: options.h2_ping_interval,
                ping_timeout: options.h2_ping_timeout,
            };
            tokio::spawn(drive(ready, Arc::downgrade(&key), id, timers));
        }
        Ok(Dialled::H1(pooled)) => {
            key.state.lock().learnt = Learnt::H1;
            connector.release(pooled);
        }
        Ok(Dialled::AtCap) => {}
        Err(e) => {
            tracing::debug!(error = %e, "HTTP/2 dial failed");
            let mut st = key.state.lock();
            st.failures += 1;
            st.last_error = Some(e);
        }
    }
    drop(guard);
}

/// Runs one connection to its end, then retires it.
///
/// Holds the key weakly: when the connector goes, the key and with it the last handle that
/// opens streams go too, and `h2` then closes the idle connection by itself.
async fn drive(ready: Box<conn::Ready>, key: Weak<H2Key>, id: u64, timers: conn::Timers) {
    let check_idle = {
        let key = Weak::clone(&key);
        move |now: Instant, idle: Duration| -> Option<Instant> {
            let key = key.upgrade()?;
            let mut st = key.state.lock();
            let c = st.conns.iter_mut().find(|c| c.id == id)?;
            match c.idle_since {
                Some(since) if now >= conn::later(since, idle) => {
                    // Closing: no stream may start on it from here on.
                    c.draining = true;
                    st.retire(&key, id);
                    None
                }
                Some(since) => Some(conn::later(since, idle)),
                None => Some(conn::later(now, idle)),
            }
        }
    };
    // Consumes the connection: when this returns the pooled connection has been dropped and
    // its pool slot freed, so waiters woken below can dial with it.
    let goaway = conn::run(ready, timers, check_idle).await;
    if let Some(key) = key.upgrade() {
        let mut st = key.state.lock();
        if goaway {
            if let Some(c) = st.conns.iter_mut().find(|c| c.id == id) {
                count_goaway(&key, c);
            }
        }
        st.retire(&key, id);
        drop(st);
        key.notify.notify_waiters();
    }
}
