//! The keyed pool: idle connections per exact [`PeerKey`], caps, waiters and eviction.
//!
//! Layout and locking:
//! - `Pool::keys` maps each key to its [`KeyPool`]. Lookups hold the map shard's read lock
//!   while they take a slot or an idle connection, and the reaper removes an unused
//!   `KeyPool` only under the shard's write lock after checking it is empty, so nobody can
//!   take a slot in a `KeyPool` that is being removed. Lock order: map shard, then
//!   `KeyPool::state`; never the other way.
//! - `KeyPool::state` guards the idle list (LIFO), the connection count and the waiters of one
//!   key. Connections are never dropped while it is held: dropping one frees its slot, which
//!   takes the same lock.
//! - Gauges and the global idle count are kept by each connection's [`Lease`].

mod clock;
mod lease;
mod reaper;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use dashmap::DashMap;
use parking_lot::Mutex;
use tokio::sync::oneshot;

pub(crate) use lease::{Handoff, Lease, LeaseState, Slot};

use self::clock::Tick;
use crate::key::{PeerKey, PrehashedState};
use crate::metrics::{EvictionReason, PeerMetrics};
use crate::peer::Peer;
use crate::stream::{Connection, Liveness};

/// The pool's limits, copied from `ConnectorOptions`.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    pub(crate) max_idle_per_peer: usize,
    pub(crate) max_idle_total: usize,
    pub(crate) max_connections_per_peer: Option<usize>,
    pub(crate) max_uses: Option<u32>,
    pub(crate) max_lifetime: Option<Duration>,
    pub(crate) reap_interval: Duration,
    pub(crate) peer_label: bool,
}

/// All idle connections of one connector, by key.
pub(crate) struct Pool {
    keys: DashMap<PeerKey, Arc<KeyPool>, PrehashedState>,
    /// Idle connections across all keys, for `max_idle_total`; shared with every `KeyPool`.
    idle_total: Arc<AtomicUsize>,
    limits: Limits,
    reaper_started: AtomicBool,
    /// The one set of metric handles all keys share when metrics have no `peer` label:
    /// registered once, and at 10,000 keys one set of hot cache lines instead of one per key.
    /// Made with the first key (not in `new`) so it registers with the recorder in force
    /// where the pool is first used, as per-key handles do.
    unlabelled_metrics: OnceLock<Arc<PeerMetrics>>,
}

/// One key's connections.
pub(crate) struct KeyPool {
    /// `address SNI "name"`, for error messages and traces.
    pub(crate) description: String,
    /// Shared by every key when metrics carry no `peer` label (the default).
    pub(crate) metrics: Arc<PeerMetrics>,
    idle_total: Arc<AtomicUsize>,
    state: Mutex<KeyState>,
}

#[derive(Default)]
struct KeyState {
    /// Most recently released at the back; hand out from the back so surplus connections
    /// age out at the front.
    idle: VecDeque<Idle>,
    /// Slots taken: dialling + in use + idle.
    total: usize,
    /// Oldest first. A sender whose receiver is gone is skipped when offered to.
    waiters: VecDeque<oneshot::Sender<Handoff>>,
}

struct Idle {
    conn: Connection,
    since: Tick,
}

/// The outcome of one look at a key's pool.
pub(crate) enum Checkout {
    /// An idle connection, already checked for liveness and expiry and marked active.
    Reused(Connection),
    /// No idle connection; a slot was taken for a new dial.
    Dial(Slot),
    /// At `max_connections_per_peer`; wait on this for a connection or a slot.
    Wait(oneshot::Receiver<Handoff>, Arc<KeyPool>),
}

impl Pool {
    pub(crate) fn new(limits: Limits) -> Pool {
        Pool {
            keys: DashMap::with_hasher(PrehashedState::default()),
            idle_total: Arc::new(AtomicUsize::new(0)),
            limits,
            reaper_started: AtomicBool::new(false),
            unlabelled_metrics: OnceLock::new(),
        }
    }

    /// Takes an idle connection, a dial slot, or a place in the queue for `peer`'s key.
    ///
    /// Idle connections that are closed, have unread data or have expired are evicted on the
    /// way; the common case costs no syscall.
    pub(crate) fn checkout(&self, key: &PeerKey, peer: &Peer) -> Checkout {
        // One clock read per checkout, taken before any lock.
        let now = Tick::now();
        let max = self.limits.max_connections_per_peer;
        loop {
            let (found, expired) = match self.keys.get(key) {
                Some(key_pool) => key_pool.checkout_locked(max, now),
                None => self
                    .keys
                    .entry(key.clone())
                    .or_insert_with(|| Arc::new(self.new_key_pool(peer)))
                    .checkout_locked(max, now),
            };
            // Dropped here, outside every lock.
            drop(expired);
            let Checkout::Reused(mut conn) = found else {
                return found;
            };
            if let Some(reason) = self.unusable(&mut conn, now) {
                conn.inner.lease.key_pool.metrics.evicted(reason);
                tracing::debug!(peer = %conn.inner.lease.peer_description(), reason = reason.as_str(), "evicted at checkout");
                continue;
            }
            conn.inner.lease.set_state(LeaseState::Active);
            return Checkout::Reused(conn);
        }
    }

    /// Takes a slot for a new dial without looking at the idle list (a retry that must not
    /// land on another connection that sat idle, an HTTP/2 connection, which is never
    /// pooled). At `max_connections_per_peer` it queues like `checkout` when `queue`, else
    /// returns `None`. Not on the hit path: `checkout` is untouched by it.
    pub(crate) fn reserve_dial(&self, key: &PeerKey, peer: &Peer, queue: bool) -> Option<Checkout> {
        // The map shard's lock is held while the slot is taken (see the module docs).
        match self.keys.get(key) {
            Some(key_pool) => key_pool.reserve_locked(self.limits.max_connections_per_peer, queue),
            None => self
                .keys
                .entry(key.clone())
                .or_insert_with(|| Arc::new(self.new_key_pool(peer)))
                .reserve_locked(self.limits.max_connections_per_peer, queue),
        }
    }

    fn new_key_pool(&self, peer: &Peer) -> KeyPool {
        KeyPool {
            description: peer.describe(),
            metrics: if self.limits.peer_label {
                Arc::new(PeerMetrics::new(Some(peer.name())))
            } else {
                Arc::clone(
                    self.unlabelled_metrics
                        .get_or_init(|| Arc::new(PeerMetrics::new(None))),
                )
            },
            idle_total: Arc::clone(&self.idle_total),
            state: Mutex::new(KeyState::default()),
        }
    }

    /// Why an idle connection must not be handed out, if it must not.
    fn unusable(&self, conn: &mut Connection, now: Tick) -> Option<EvictionReason> {
        if let Some(max) = self.limits.max_lifetime {
            if now.exceeded(conn.inner.lease.created, max) {
                return Some(EvictionReason::MaxLifetime);
            }
        }
        match conn.liveness() {
            Liveness::Alive => None,
            Liveness::Closed => Some(EvictionReason::Closed),
            Liveness::UnexpectedData => Some(EvictionReason::UnexpectedData),
        }
    }

    /// Returns a connection: to the oldest waiter for its key, else to the idle list, unless
    /// it is no longer reusable. Evicts beyond the idle caps.
    pub(crate) fn release(self: &Arc<Self>, mut conn: Connection) {
        let now = Tick::now();
        let retire = match self.limits.max_uses {
            Some(max) if conn.inner.lease.uses >= max => Some(EvictionReason::MaxUses),
            _ => self.unusable(&mut conn, now),
        };
        if let Some(reason) = retire {
            conn.inner.lease.key_pool.metrics.evicted(reason);
            tracing::debug!(peer = %conn.inner.lease.peer_description(), reason = reason.as_str(), "not pooled at release");
            return;
        }
        let key_pool = Arc::clone(&conn.inner.lease.key_pool);
        let surplus = {
            let mut state = key_pool.state.lock();
            if !state.waiters.is_empty() {
                match lease::offer_to_waiters(&mut state.waiters, Handoff::Conn(conn)) {
                    None => return,
                    Some(Handoff::Conn(back)) => conn = back,
                    Some(Handoff::Slot(_)) => unreachable!("offer returns the value it was given"),
                }
            }
            conn.inner.lease.set_state(LeaseState::Idle);
            state.idle.push_back(Idle { conn, since: now });
            if state.idle.len() > self.limits.max_idle_per_peer {
                state.idle.pop_front()
            } else {
                None
            }
        };
        if let Some(surplus) = surplus {
            key_pool.metrics.evicted(EvictionReason::Capacity);
            drop(surplus);
        }
        if self.idle_total.load(Ordering::Relaxed) > self.limits.max_idle_total {
            self.evict_least_recently_used();
        }
        self.ensure_reaper();
    }

    /// Closes the least recently released idle connections across all keys until the total is
    /// within `max_idle_total`.
    ///
    /// Scans every key with idle connections, so it costs O(keys); it only runs when the total
    /// cap is exceeded, never on a plain checkout or release.
    fn evict_least_recently_used(&self) {
        while self.idle_total.load(Ordering::Relaxed) > self.limits.max_idle_total {
            let mut oldest: Option<(Tick, Arc<KeyPool>)> = None;
            for entry in self.keys.iter() {
                let state = entry.state.lock();
                if let Some(front) = state.idle.front() {
                    if oldest
                        .as_ref()
                        .is_none_or(|(since, _)| front.since < *since)
                    {
                        oldest = Some((front.since, Arc::clone(entry.value())));
                    }
                }
            }
            let Some((_, key_pool)) = oldest else { return };
            let victim = key_pool.state.lock().idle.pop_front();
            if let Some(victim) = victim {
                key_pool.metrics.evicted(EvictionReason::Capacity);
                drop(victim);
            }
        }
    }

    /// Whether `conn` was created by this pool (and may be released into it).
    pub(crate) fn owns(&self, conn: &Connection) -> bool {
        Arc::ptr_eq(&conn.inner.lease.key_pool.idle_total, &self.idle_total)
    }

    /// Idle connections across all keys.
    pub(crate) fn idle_count(&self) -> usize {
        self.idle_total.load(Ordering::Relaxed)
    }

    /// Idle connections for one key.
    pub(crate) fn idle_count_for(&self, key: &PeerKey) -> usize {
        self.keys
            .get(key)
            .map_or(0, |kp| kp.state.lock().idle.len())
    }

    /// Connections of one key: dialling, in use and idle.
    pub(crate) fn connection_count_for(&self, key: &PeerKey) -> usize {
        self.keys.get(key).map_or(0, |kp| kp.state.lock().total)
    }

    fn ensure_reaper(self: &Arc<Self>) {
        if self.reaper_started.load(Ordering::Relaxed)
            || self.reaper_started.swap(true, Ordering::AcqRel)
        {
            return;
        }
        if !reaper::spawn(Arc::downgrade(self), self.limits.reap_interval) {
            self.reaper_started.store(false, Ordering::Release);
        }
    }

    /// One reaper pass: evicts idle connections that expired, were closed by the upstream or
    /// received unexpected data, and forgets keys with no connections left.
    pub(crate) fn reap(&self, now: Tick) {
        let mut evicted: Vec<(EvictionReason, Connection)> = Vec::new();
        for entry in self.keys.iter() {
            let mut state = entry.state.lock();
            let mut i = 0;
            while i < state.idle.len() {
                let idle = &mut state.idle[i];
                let reason = if now.exceeded(idle.since, idle.conn.inner.lease.idle_timeout) {
                    Some(EvictionReason::IdleTimeout)
                } else {
                    self.unusable(&mut idle.conn, now)
                };
                match reason.and_then(|r| state.idle.remove(i).map(|idle| (r, idle.conn))) {
                    Some(gone) => evicted.push(gone),
                    None => i += 1,
                }
            }
        }
        for (reason, conn) in evicted {
            conn.inner.lease.key_pool.metrics.evicted(reason);
            tracing::debug!(peer = %conn.inner.lease.peer_description(), reason = reason.as_str(), "evicted idle connection");
            drop(conn);
        }
        self.keys.retain(|_, key_pool| !key_pool.is_unused());
    }
}

impl KeyPool {
    /// Under this key's lock: pop the newest idle connection, else take a slot, else queue.
    /// Returns expired idle connections separately so the caller drops them unlocked.
    fn checkout_locked(
        self: &Arc<Self>,
        cap: Option<usize>,
        now: Tick,
    ) -> (Checkout, Vec<Connection>) {
        let mut expired = Vec::new();
        let mut state = self.state.lock();
        while let Some(idle) = state.idle.pop_back() {
            if now.exceeded(idle.since, idle.conn.inner.lease.idle_timeout) {
                self.metrics.evicted(EvictionReason::IdleTimeout);
                expired.push(idle.conn);
                continue;
            }
            return (Checkout::Reused(idle.conn), expired);
        }
        if cap.is_none_or(|cap| state.total < cap) {
            state.total += 1;
            return (Checkout::Dial(Slot::taken(Arc::clone(self))), expired);
        }
        // Waiters that gave up would otherwise pile up while nothing is released.
        state.waiters.retain(|w| !w.is_closed());
        let (tx, rx) = oneshot::channel();
        state.waiters.push_back(tx);
        (Checkout::Wait(rx, Arc::clone(self)), expired)
    }

    /// Under this key's lock: take a slot, else queue (when `queue`), never an idle one.
    fn reserve_locked(self: &Arc<Self>, cap: Option<usize>, queue: bool) -> Option<Checkout> {
        let mut state = self.state.lock();
        if cap.is_none_or(|cap| state.total < cap) {
            state.total += 1;
            return Some(Checkout::Dial(Slot::taken(Arc::clone(self))));
        }
        if !queue {
            return None;
        }
        state.waiters.retain(|w| !w.is_closed());
        let (tx, rx) = oneshot::channel();
        state.waiters.push_back(tx);
        Some(Checkout::Wait(rx, Arc::clone(self)))
    }

    fn is_unused(&self) -> bool {
        let mut state = self.state.lock();
        state.waiters.retain(|w| !w.is_closed());
        state.total == 0 && state.idle.is_empty() && state.waiters.is_empty()
    }
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("keys", &self.keys.len())
            .field("idle_total", &self.idle_total.load(Ordering::Relaxed))
            .field("limits", &self.limits)
            .finish()
    }
}

/// Idle connections hold their `KeyPool` (through their lease) and the `KeyPool` holds them:
/// break that cycle when the pool goes, closing every idle connection.
impl Drop for Pool {
    fn drop(&mut self) {
        let mut idle = Vec::new();
        for entry in self.keys.iter() {
            let mut state = entry.state.lock();
            idle.extend(state.idle.drain(..).map(|i| i.conn));
            state.waiters.clear();
        }
        drop(idle);
    }
}
