//! The keyed pool: idle connections per exact [`PeerKey`], caps, waiters and eviction.
//!
//! Layout and locking:
//! - `Pool::keys` maps each key to its [`KeyPool`]. Lookups hold the map shard's read lock
//!   while they take a slot or an idle connection, and the reaper removes an unused
//!   `KeyPool` only under the shard's write lock after checking it is empty, and marks it
//!   `forgotten` under its own lock, so nobody can take a slot in a `KeyPool` that is being
//!   removed. A peer that found its entry once keeps a link to it ([`KeyPoolLink`]) and
//!   checks out through it without the map, as long as the entry is not forgotten. Lock
//!   order: map shard, then `KeyPool::state`, then `Pool::candidates` (the keys global
//!   eviction samples); never the other way.
//! - `KeyPool::state` guards the idle list (LIFO), the connection count and the waiters of one
//!   key. Connections are never dropped while it is held: dropping one frees its slot, which
//!   takes the same lock.
//! - Gauges and the global idle count are kept by each connection's [`Lease`], under the
//!   key's lock. The idle count is striped per thread ([`IdleCount`]), so a hit writes no
//!   cache line another key's hit writes; with `batched_metrics` neither do the gauges.
//!   `KeyPool`s are 128-byte aligned for the same reason.
//! - `KeyPool::stats` are relaxed atomics outside the lock (see [`crate::stats`]).
//!
//! Operating the pool: [`Pool::reserve_warm`] takes the slots `preconnect` dials with, the
//! reaper tops keys up to their `min_idle` through the connector's [`Refill`], and
//! [`Pool::evict`] closes a key's idle connections and bumps its epoch so that the ones in use
//! are closed at release.

mod clock;
mod idle_count;
mod lease;
mod reaper;

use std::cell::Cell;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use dashmap::DashMap;
use parking_lot::Mutex;
use tokio::sync::oneshot;

pub(crate) use lease::{Handoff, Lease, LeaseState, Slot};

use self::clock::Tick;
use self::idle_count::IdleCount;
use crate::key::{PeerKey, PrehashedState};
use crate::metrics::{EvictionReason, PeerMetrics};
use crate::peer::Peer;
use crate::stats::{KeyStats, Live, PeerStats};
use crate::stream::{Connection, Liveness};

/// Keys sampled per global eviction (see [`Pool::evict_over_total`]).
const EVICTION_SAMPLE: usize = 8;
/// Up to this many candidate keys, a global eviction looks at all of them: exact LRU.
const EVICTION_EXACT_UP_TO: usize = 16;

/// Shards of the key map. A checkout takes its shard's read lock, an atomic write on the
/// shard's cache line, so two threads on different keys in one shard still take turns on
/// that line; dashmap's default (4 × cores, 8 here) puts two given keys in one shard one time
/// in eight, 64 shards one time in 64, for 8 KiB.
const MAP_SHARDS: usize = 64;

/// Below this queue length abandoned waiters are left for `release` and the reaper to skip.
const MIN_WAITER_PRUNE: usize = 16;

/// At most this many `min_idle` top-up dials start per reaper pass, across all keys, so a
/// connector with many keys (or a fleet that just came back) does not open a burst of
/// handshakes at once; with the default 250 ms interval that is 64 dials a second.
const MAX_REFILLS_PER_PASS: usize = 16;
/// A key whose top-up dial failed waits this long before the next one, doubling with each
/// further failure up to [`REFILL_BACKOFF_MAX`]; one success resets it. An upstream that is
/// down is tried a handful of times a minute, not hammered.
const REFILL_BACKOFF_MIN: Duration = Duration::from_millis(100);
const REFILL_BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Dials for the pool in the background: implemented by the connector, which owns the TLS
/// context. The pool holds it weakly (the connector owns the pool).
pub(crate) trait Refill: Send + Sync {
    /// Dials one connection to `peer` with `slot` on a task of its own and pools it; `warm`
    /// is dropped once the connection is pooled (or the dial failed, after
    /// [`Warm::failed`]).
    fn refill(self: Arc<Self>, peer: Peer, slot: Slot, warm: Warm);
}

/// The pool's limits, copied from `ConnectorOptions`.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    pub(crate) max_idle_per_peer: usize,
    pub(crate) max_idle_total: usize,
    pub(crate) max_connections_per_peer: Option<usize>,
    pub(crate) max_uses: Option<u32>,
    pub(crate) reap_interval: Duration,
    /// The connector's idle timeout, for keys whose peer sets none.
    pub(crate) idle_timeout: Duration,
    pub(crate) peer_label: bool,
    /// `ConnectorOptions::batched_metrics`: the hit path's gauge moves and reused-checkout
    /// counts are tallied per key and published by the reaper.
    pub(crate) batched_metrics: bool,
}

/// All idle connections of one connector, by key.
pub(crate) struct Pool {
    /// Tells pools apart in a peer's [`KeyPoolLink`]; never reused in the process.
    id: u64,
    keys: DashMap<PeerKey, Arc<KeyPool>, PrehashedState>,
    /// Idle connections across all keys, for `max_idle_total`; shared with every `KeyPool`.
    /// Exactly the connections in the idle lists, at rest (see [`IdleCount`]).
    idle_total: Arc<IdleCount>,
    /// Held by the one release at a time that evicts beyond `max_idle_total`.
    evicting: Mutex<()>,
    /// Keys that may hold idle connections: where the global eviction samples. A key is
    /// added when a release gives it an idle connection and it is not listed yet, and removed
    /// lazily, when an eviction samples it and finds its list empty (or the reaper forgets
    /// it); so a key that goes back and forth between one and zero idle connections (every
    /// hit at one key) touches this lock only once. Lock order: `KeyPool::state`, then this.
    candidates: Mutex<Vec<Arc<KeyPool>>>,
    limits: Limits,
    reaper_started: AtomicBool,
    /// The one set of metric handles all keys share when metrics have no `peer` label:
    /// registered once, and at 10,000 keys one set of hot cache lines instead of one per key.
    /// Made with the first key (not in `new`) so it registers with the recorder in force
    /// where the pool is first used, as per-key handles do.
    unlabelled_metrics: OnceLock<Arc<PeerMetrics>>,
    /// The connector, for `min_idle` top-up dials.
    refill: Weak<dyn Refill>,
}

/// A peer's shortcut to its key's pool entry in one pool (see [`Pool::checkout`]).
#[derive(Clone)]
pub(crate) struct KeyPoolLink {
    pool_id: u64,
    key_pool: Arc<KeyPool>,
}

/// One key's connections.
///
/// Aligned to 128 bytes (two cache lines, for adjacent-line prefetchers): the key's lock,
/// its counters and its `Arc`'s reference count are written on every hit on the key, and
/// without the alignment the allocator can place another key's on the same line, so that
/// threads on two different keys would take turns on it.
#[repr(align(128))]
pub(crate) struct KeyPool {
    /// `address SNI "name"`, for error messages and traces.
    pub(crate) description: String,
    /// Shared by every key when metrics carry no `peer` label (the default).
    pub(crate) metrics: Arc<PeerMetrics>,
    /// This key's own counters, whatever the metrics share.
    pub(crate) stats: KeyStats,
    /// The peer that created the key, dialled by `min_idle` top-ups: every setting that
    /// shapes a connection is in the key, so any peer with this key dials the same.
    peer: Peer,
    /// The key's idle timeout: `min_idle` top-ups and the key itself stop this long after
    /// its last use.
    idle_timeout: Duration,
    idle_total: Arc<IdleCount>,
    /// `ConnectorOptions::batched_metrics`.
    batched_metrics: bool,
    /// This key's place in `Pool::candidates` while `KeyState::listed`; written only under
    /// the candidates' lock.
    candidate_index: AtomicUsize,
    state: Mutex<KeyState>,
}

#[derive(Default)]
pub(crate) struct KeyState {
    /// Most recently released at the back; hand out from the back so surplus connections
    /// age out at the front.
    idle: VecDeque<Idle>,
    /// Slots taken: dialling + in use + idle.
    total: usize,
    /// Oldest first. A sender whose receiver is gone is skipped when offered to.
    waiters: VecDeque<oneshot::Sender<Handoff>>,
    /// Prune abandoned waiters once the queue reaches this length, then set it to twice what
    /// is left: pruning on every enqueue would cost O(n²) under overload, this costs O(1)
    /// per enqueue amortised while still bounding the queue at twice its live waiters.
    prune_waiters_at: usize,
    /// Bumped by `evict`; a connection dialled under an older epoch is not pooled again.
    epoch: u64,
    /// The last `get` or `preconnect`, `None` before the first.
    last_used: Option<Tick>,
    /// The largest `min_idle` of the peers seen at checkout, kept while the key is used.
    min_idle: usize,
    /// Dials by `preconnect` and the top-up in progress: counted towards the idle target so
    /// that overlapping calls or passes do not dial the same deficit twice.
    warming: usize,
    /// Checkouts answered with a pooled connection (`PeerStats::checkouts_reused`): counted
    /// here, under the lock the hit path holds anyway, instead of with one more atomic.
    reused: u64,
    /// With `batched_metrics`: how much of `reused` the reaper has added to the
    /// `checkouts_total{outcome="reused"}` counter.
    reused_published: u64,
    /// With `batched_metrics`: checkouts of idle connections minus releases into the idle
    /// list that the gauges do not show yet. The published idle gauge over-reports this key
    /// by it and the active gauge under-reports by as much (the other way round when it is
    /// negative). It stays within −idle ≤ lag ≤ active (a close takes its decrement from the
    /// gauge that over-reports; see `lease::leave`), so the published gauges never go
    /// negative and are exact again at each reaper pass.
    gauge_lag: i64,
    /// Top-up dials failed in a row, and when the next may start.
    refill_failures: u32,
    refill_after: Option<Tick>,
    /// Whether the key is in `Pool::candidates`.
    listed: bool,
    /// Set by the reaper, under this lock, when it removes the key from the map: a peer's
    /// cached link to this entry must not use it any more (see [`Pool::checkout`]).
    forgotten: bool,
}

/// One `preconnect` or top-up dial's place in [`KeyState::warming`]: released on drop, after
/// the connection was pooled.
pub(crate) struct Warm {
    key_pool: Arc<KeyPool>,
    failed: bool,
}

impl Warm {
    /// Marks the dial failed: the key backs off before the next top-up.
    pub(crate) fn failed(&mut self) {
        self.failed = true;
    }
}

impl Drop for Warm {
    fn drop(&mut self) {
        let mut state = self.key_pool.state.lock();
        state.warming -= 1;
        if self.failed {
            state.refill_failures = state.refill_failures.saturating_add(1);
            let backoff = REFILL_BACKOFF_MIN
                .saturating_mul(1 << (state.refill_failures - 1).min(16))
                .min(REFILL_BACKOFF_MAX);
            state.refill_after = Some(Tick::now().plus(backoff));
        } else {
            state.refill_failures = 0;
            state.refill_after = None;
        }
    }
}

struct Idle {
    conn: Connection,
    since: Tick,
}

/// What [`Pool::release_locked`] did with a connection.
enum Released {
    /// Pushed onto the idle list.
    Pooled,
    /// Pushed, and the oldest idle connection taken out for being beyond
    /// `max_idle_per_peer`: to be closed.
    PooledOverCap(Connection),
    /// Given to a waiter.
    HandedOver,
    /// Its key was evicted since it was dialled: to be closed.
    Evicted(Connection),
}

thread_local! {
    /// The key pool this thread last released a connection into (see [`with_key_pool`]).
    static LAST_RELEASED_INTO: Cell<Option<Arc<KeyPool>>> = const { Cell::new(None) };
}

/// Runs `f` with `conn`'s key pool and `conn`, without the two atomic read-modify-writes of
/// cloning the connection's `Arc<KeyPool>` when this thread released into the same key last
/// time.
///
/// Why a clone at all: the release locks the key and moves the connection into the key's
/// list under that lock, so the lock cannot be borrowed from the connection itself. Each
/// thread keeps the last key pool it released into (moved out of and back into a
/// thread-local, which costs no reference count), and borrows that when it is the same key,
/// which is every release on a hot upstream. The cached `Arc` keeps at most one key pool per
/// thread alive a little longer than the pool would (a forgotten key's empty entry).
fn with_key_pool<R>(conn: Connection, f: impl FnOnce(&Arc<KeyPool>, Connection) -> R) -> R {
    // `try_with`: a connection released while this thread's locals are being destroyed
    // just takes the clone.
    let cached = LAST_RELEASED_INTO.try_with(Cell::take).ok().flatten();
    let key_pool = match cached {
        Some(cached) if Arc::ptr_eq(&cached, &conn.inner.lease.key_pool) => cached,
        _ => Arc::clone(&conn.inner.lease.key_pool),
    };
    let result = f(&key_pool, conn);
    let _ = LAST_RELEASED_INTO.try_with(|last| last.set(Some(key_pool)));
    result
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
    pub(crate) fn new(limits: Limits, refill: Weak<dyn Refill>) -> Pool {
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        Pool {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            refill,
            keys: DashMap::with_hasher_and_shard_amount(PrehashedState::default(), MAP_SHARDS),
            idle_total: Arc::new(IdleCount::new()),
            evicting: Mutex::new(()),
            candidates: Mutex::new(Vec::new()),
            limits,
            reaper_started: AtomicBool::new(false),
            unlabelled_metrics: OnceLock::new(),
        }
    }

    /// Takes an idle connection, a dial slot, or a place in the queue for `peer`'s key.
    ///
    /// Idle connections that are closed, have unread data or have expired are evicted on the
    /// way; the common case costs no syscall.
    ///
    /// The idle timeout is the smaller of the asking peer's and the one the connection was
    /// dialled with: timeouts are not part of the key, and a peer that knows its upstream
    /// drops idle connections early must never get one older than that.
    pub(crate) fn checkout(self: &Arc<Self>, key: &PeerKey, peer: &Peer) -> Checkout {
        // One clock read per checkout, taken before any lock.
        let now = Tick::now();
        let max = self.limits.max_connections_per_peer;
        let idle_timeout = peer.idle_timeout().unwrap_or(self.limits.idle_timeout);
        let min_idle = peer.settings().min_idle;
        // Running from the first checkout, not the first release: `min_idle` tops up a key
        // whose first dial failed, and the reaper forgets keys nobody uses (keys whose dials
        // all fail would otherwise pile up).
        self.ensure_reaper();
        // The peer's cached link skips the key map (its shard lock is two atomic writes,
        // and the lookup compares the whole key): the entry it points to was found with this
        // peer's exact key, edits to the peer reset the link, and an entry the reaper
        // removed from the map says so under its lock, so the link is used only while it is
        // the map's entry for the key.
        let cached = peer
            .cached_key_pool()
            .filter(|link| link.pool_id == self.id)
            .and_then(|link| {
                link.key_pool
                    .checkout_locked(max, now, idle_timeout, min_idle)
            });
        let (found, unusable) = match cached {
            Some(outcome) => outcome,
            None => loop {
                let entry = match self.keys.get(key) {
                    Some(entry) => entry,
                    None => self
                        .keys
                        .entry(key.clone())
                        .or_insert_with(|| Arc::new(self.new_key_pool(peer)))
                        .downgrade(),
                };
                peer.cache_key_pool(|| KeyPoolLink {
                    pool_id: self.id,
                    key_pool: Arc::clone(entry.value()),
                });
                // Under the shard's read lock, so the reaper (which marks an entry forgotten
                // and removes it under the write lock) cannot have removed it and this is
                // `Some`. Were that invariant ever broken, the forgotten entry is replaced
                // by a new one rather than panicking or looping on it.
                if let Some(outcome) = entry.checkout_locked(max, now, idle_timeout, min_idle) {
                    break outcome;
                }
                let forgotten = Arc::clone(entry.value());
                drop(entry);
                self.keys
                    .remove_if(key, |_, kp| Arc::ptr_eq(kp, &forgotten));
            },
        };
        if !unusable.is_empty() {
            for conn in unusable {
                tracing::debug!(peer = %conn.inner.lease.peer_description(), "evicted at checkout");
                // Dropped here, outside every lock.
                drop(conn);
            }
        }
        found
    }

    /// Takes a slot for a new dial without looking at the idle list (a retry that must not
    /// land on another connection that sat idle, an HTTP/2 connection, which is never
    /// pooled). At `max_connections_per_peer` it queues like `checkout` when `queue`, else
    /// returns `None`. Not on the hit path: `checkout` is untouched by it.
    pub(crate) fn reserve_dial(
        self: &Arc<Self>,
        key: &PeerKey,
        peer: &Peer,
        queue: bool,
    ) -> Option<Checkout> {
        self.ensure_reaper();
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
            stats: KeyStats::default(),
            peer: peer.detached(),
            idle_timeout: peer
                .settings()
                .idle_timeout
                .unwrap_or(self.limits.idle_timeout),
            idle_total: Arc::clone(&self.idle_total),
            batched_metrics: self.limits.batched_metrics,
            candidate_index: AtomicUsize::new(0),
            state: Mutex::new(KeyState::default()),
        }
    }

    /// Takes slots for `preconnect`: as many as are missing for `n` idle connections of the
    /// key, counting dials already warming it, within `max_idle_per_peer`, the room left under
    /// `max_idle_total` and `max_connections_per_peer`.
    pub(crate) fn reserve_warm(
        self: &Arc<Self>,
        key: &PeerKey,
        peer: &Peer,
        n: usize,
    ) -> Vec<(Slot, Warm)> {
        let now = Tick::now();
        self.ensure_reaper();
        let key_pool = Arc::clone(
            self.keys
                .entry(key.clone())
                .or_insert_with(|| Arc::new(self.new_key_pool(peer)))
                .value(),
        );
        let room_total = self
            .limits
            .max_idle_total
            .saturating_sub(self.idle_total.sum());
        let target = n.min(self.limits.max_idle_per_peer);
        let mut state = key_pool.state.lock();
        state.last_used = Some(now);
        state.min_idle = peer.settings().min_idle;
        let missing = target
            .saturating_sub(state.idle.len() + state.warming)
            .min(room_total);
        key_pool.take_warm_slots(&mut state, missing, self.limits.max_connections_per_peer)
    }

    /// Closes every idle connection of `key` and makes the ones in use (and dials in
    /// progress) close at release. Returns how many idle connections were closed.
    pub(crate) fn evict(&self, key: &PeerKey) -> usize {
        let Some(key_pool) = self.keys.get(key).map(|kp| Arc::clone(kp.value())) else {
            return 0;
        };
        key_pool.evict()
    }

    /// [`Pool::evict`] for every key.
    pub(crate) fn evict_all(&self) -> usize {
        let key_pools: Vec<Arc<KeyPool>> =
            self.keys.iter().map(|kp| Arc::clone(kp.value())).collect();
        key_pools.iter().map(|kp| kp.evict()).sum()
    }

    /// A snapshot of one key's connections and counters.
    pub(crate) fn stats_for(&self, key: &PeerKey) -> PeerStats {
        self.keys
            .get(key)
            .map_or_else(PeerStats::default, |kp| kp.stats())
    }

    /// Every key's description and snapshot.
    pub(crate) fn stats(&self) -> Vec<(String, PeerStats)> {
        let key_pools: Vec<Arc<KeyPool>> =
            self.keys.iter().map(|kp| Arc::clone(kp.value())).collect();
        key_pools
            .iter()
            .map(|kp| (kp.description.clone(), kp.stats()))
            .collect()
    }

    /// Why an idle connection must not be handed out, if it must not.
    fn unusable(conn: &mut Connection, now: Tick) -> Option<EvictionReason> {
        // The lease's own lifetime: `max_lifetime` shortened by its jitter.
        if let Some(max) = conn.inner.lease.lifetime {
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
            _ => Pool::unusable(&mut conn, now),
        };
        if let Some(reason) = retire {
            conn.inner.lease.key_pool.metrics.evicted(reason);
            tracing::debug!(peer = %conn.inner.lease.peer_description(), reason = reason.as_str(), "not pooled at release");
            return;
        }
        conn.free_idle_buffers();
        match with_key_pool(conn, |key_pool, conn| {
            self.release_locked(key_pool, conn, now)
        }) {
            Released::Pooled => {}
            Released::HandedOver => return,
            Released::Evicted(conn) => {
                conn.inner
                    .lease
                    .key_pool
                    .evicted(EvictionReason::Evicted, 1);
                tracing::debug!(peer = %conn.inner.lease.peer_description(), "evicted at release");
                // Dropped here, outside the lock: it frees its slot under it.
                drop(conn);
                return;
            }
            Released::PooledOverCap(surplus) => {
                surplus
                    .inner
                    .lease
                    .key_pool
                    .metrics
                    .evicted(EvictionReason::Capacity);
                drop(surplus);
            }
        }
        if self.idle_total.may_exceed(self.limits.max_idle_total) {
            self.evict_over_total();
        }
        self.ensure_reaper();
    }

    /// Under `key_pool`'s lock (`conn`'s key): hands `conn` to the oldest waiter, or pushes
    /// it onto the idle list and takes the surplus beyond `max_idle_per_peer` out, or refuses
    /// it if its key was evicted since it was dialled. What must be closed is returned, to be
    /// dropped outside the lock.
    fn release_locked(&self, key_pool: &Arc<KeyPool>, mut conn: Connection, now: Tick) -> Released {
        let mut state = key_pool.state.lock();
        // Checked under the lock `evict` bumps the epoch under, so a release racing an
        // eviction cannot slip a connection into the list it just emptied.
        if conn.inner.lease.epoch != state.epoch {
            return Released::Evicted(conn);
        }
        if !state.waiters.is_empty() {
            match lease::offer_to_waiters(&mut state.waiters, Handoff::Conn(conn)) {
                None => {
                    state.reused += 1;
                    return Released::HandedOver;
                }
                Some(Handoff::Conn(back)) => conn = back,
                Some(Handoff::Slot(_)) => unreachable!("offer returns the value it was given"),
            }
        }
        conn.inner.lease.set_state(LeaseState::Idle, &mut state);
        state.idle.push_back(Idle { conn, since: now });
        if !state.listed {
            state.listed = true;
            self.list_candidate(key_pool);
        }
        if state.idle.len() <= self.limits.max_idle_per_peer {
            return Released::Pooled;
        }
        match state.idle.pop_front() {
            Some(mut surplus) => {
                surplus
                    .conn
                    .inner
                    .lease
                    .set_state(LeaseState::Closing, &mut state);
                Released::PooledOverCap(surplus.conn)
            }
            None => Released::Pooled,
        }
    }

    /// Closes idle connections, least recently released first (approximately, see below),
    /// until the idle total is within `max_idle_total`.
    ///
    /// Costs O(1) per eviction, whatever the number of keys. The choice, against the other
    /// ways to get there:
    /// - a global LRU list of idle connections (Pingora's pool) is exact, but every checkout
    ///   and release would take its lock, one cache line all cores fight over on the hit path;
    /// - a clock per shard still needs a global order across shards, or looks at every shard;
    /// - sampling (Redis's `maxmemory` LRU) costs nothing on the hit path: each key's idle
    ///   list is already in release order, so its front is the key's least recently released
    ///   connection, and an eviction only has to compare the fronts of a few keys. The price
    ///   is that the victim is the oldest of [`EVICTION_SAMPLE`] random keys' oldest, not the
    ///   oldest of all: its age ranks, in expectation, in the oldest 1/9 of the keys' fronts,
    ///   and it lies among the newest half with probability 2⁻⁸. Up to
    ///   [`EVICTION_EXACT_UP_TO`] candidate keys every one is looked at, so small pools evict
    ///   in exact LRU order.
    ///
    /// Evictions are serialised (one release at a time evicts, under `evicting`), and each
    /// one is decided on the exact count ([`IdleCount::sum`]), so concurrent releases never
    /// evict more than the excess between them, and at rest the total is within the cap
    /// exactly. A checkout that takes an idle connection while a release evicts can make that
    /// release evict one connection more than needed (the count it read still held the one
    /// taken): below the cap by at most the number of checkouts running concurrently with
    /// the eviction, and only until they release. A sample taken during a release can see
    /// one extra idle connection per thread releasing (pushed, not yet evicted).
    fn evict_over_total(&self) {
        let cap = self.limits.max_idle_total;
        let _evicting = self.evicting.lock();
        while self.idle_total.sum() > cap {
            let Some(victim) = self.take_victim() else {
                return;
            };
            victim
                .inner
                .lease
                .key_pool
                .metrics
                .evicted(EvictionReason::Capacity);
            tracing::debug!(peer = %victim.inner.lease.peer_description(), "evicted by max_idle_total");
            // Dropped here, outside every key's lock.
            drop(victim);
        }
    }

    /// Takes the least recently released idle connection of a sample of keys out of its list
    /// (counted out of the idle total). `None` once no key has an idle connection.
    ///
    /// Each round either finds a victim or drops stale candidates (keys whose list is empty)
    /// from `candidates`; each such removal is paid for by the release that listed the key,
    /// so the cost is amortised O(1) per eviction.
    fn take_victim(&self) -> Option<Connection> {
        loop {
            let sample: Vec<Arc<KeyPool>> = {
                let candidates = self.candidates.lock();
                if candidates.is_empty() {
                    return None;
                }
                if candidates.len() <= EVICTION_EXACT_UP_TO {
                    candidates.iter().map(Arc::clone).collect()
                } else {
                    (0..EVICTION_SAMPLE)
                        .map(|_| Arc::clone(&candidates[random_below(candidates.len())]))
                        .collect()
                }
            };
            let mut oldest: Option<(Tick, &Arc<KeyPool>)> = None;
            for key_pool in &sample {
                let mut state = key_pool.state.lock();
                match state.idle.front() {
                    Some(front) if oldest.is_none_or(|(since, _)| front.since < since) => {
                        oldest = Some((front.since, key_pool));
                    }
                    Some(_) => {}
                    None if state.listed => {
                        state.listed = false;
                        self.unlist_candidate(key_pool);
                    }
                    None => {}
                }
            }
            let Some((_, key_pool)) = oldest else {
                continue;
            };
            let mut state = key_pool.state.lock();
            // Emptied since it was sampled (by checkouts): sample again.
            if let Some(mut victim) = state.idle.pop_front() {
                victim
                    .conn
                    .inner
                    .lease
                    .set_state(LeaseState::Closing, &mut state);
                return Some(victim.conn);
            }
        }
    }

    /// Adds `key_pool` to the eviction candidates. Called under its state lock, with
    /// `listed` just set.
    fn list_candidate(&self, key_pool: &Arc<KeyPool>) {
        let mut candidates = self.candidates.lock();
        key_pool
            .candidate_index
            .store(candidates.len(), Ordering::Relaxed);
        candidates.push(Arc::clone(key_pool));
    }

    /// Removes `key_pool` from the eviction candidates. Called under its state lock, with
    /// `listed` just cleared.
    fn unlist_candidate(&self, key_pool: &KeyPool) {
        let mut candidates = self.candidates.lock();
        let i = key_pool.candidate_index.load(Ordering::Relaxed);
        let is_it = |c: &Arc<KeyPool>| std::ptr::eq(Arc::as_ptr(c), key_pool);
        // `candidate_index` is kept under this lock for every listed key; the search is only a
        // fallback so that a bug there cannot leave a stale entry `take_victim` spins on.
        let found = if candidates.get(i).is_some_and(is_it) {
            Some(i)
        } else {
            debug_assert!(false, "a listed key is at its candidate index");
            candidates.iter().position(is_it)
        };
        if let Some(i) = found {
            candidates.swap_remove(i);
            if let Some(moved) = candidates.get(i) {
                moved.candidate_index.store(i, Ordering::Relaxed);
            }
        }
    }

    /// Whether `conn` was created by this pool (and may be released into it).
    pub(crate) fn owns(&self, conn: &Connection) -> bool {
        Arc::ptr_eq(&conn.inner.lease.key_pool.idle_total, &self.idle_total)
    }

    /// Idle connections across all keys.
    pub(crate) fn idle_count(&self) -> usize {
        self.idle_total.sum()
    }

    /// Idle connections for one key.
    pub(crate) fn idle_count_for(&self, key: &PeerKey) -> usize {
        self.keys
            .get(key)
            .map_or(0, |kp| kp.state.lock().idle.len())
    }

    /// Whether the pool still has an entry for `key` (the reaper forgets unused ones).
    pub(crate) fn knows(&self, key: &PeerKey) -> bool {
        self.keys.contains_key(key)
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
    /// received unexpected data, tops keys up to their `min_idle`, and forgets keys with no
    /// connections left that were not used for their idle timeout.
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
                    Pool::unusable(&mut idle.conn, now)
                };
                match reason.and_then(|r| state.idle.remove(i).map(|idle| (r, idle.conn))) {
                    Some((reason, mut gone)) => {
                        gone.inner.lease.set_state(LeaseState::Closing, &mut state);
                        evicted.push((reason, gone));
                    }
                    None => i += 1,
                }
            }
            entry.publish_metrics(&mut state);
        }
        for (reason, conn) in evicted {
            conn.inner.lease.key_pool.metrics.evicted(reason);
            tracing::debug!(peer = %conn.inner.lease.peer_description(), reason = reason.as_str(), "evicted idle connection");
            drop(conn);
        }
        self.keys
            .retain(|_, key_pool| !self.forget_if_unused(key_pool, now));
        self.refill(now);
    }

    /// Whether the reaper forgets `key_pool` (see [`KeyPool::is_unused`]); if so, also drops
    /// it from the eviction candidates, which would otherwise keep it (and grow) until an
    /// eviction sampled it.
    fn forget_if_unused(&self, key_pool: &KeyPool, now: Tick) -> bool {
        let mut state = key_pool.state.lock();
        let unused = key_pool.is_unused(&mut state, now);
        state.forgotten = unused;
        if unused && state.listed {
            state.listed = false;
            self.unlist_candidate(key_pool);
        }
        unused
    }

    /// Starts top-up dials for keys below their `min_idle`, at most
    /// [`MAX_REFILLS_PER_PASS`] per pass.
    fn refill(&self, now: Tick) {
        let mut budget = MAX_REFILLS_PER_PASS;
        let room_total = self
            .limits
            .max_idle_total
            .saturating_sub(self.idle_total.sum());
        budget = budget.min(room_total);
        let mut dials = Vec::new();
        for entry in self.keys.iter() {
            if budget == 0 {
                break;
            }
            let key_pool = entry.value();
            let mut state = key_pool.state.lock();
            let used_lately = state
                .last_used
                .is_some_and(|used| !now.exceeded(used, key_pool.idle_timeout));
            if state.min_idle == 0 || !used_lately || state.refill_after.is_some_and(|t| now < t) {
                continue;
            }
            let target = state.min_idle.min(self.limits.max_idle_per_peer);
            let mut missing = target.saturating_sub(state.idle.len() + state.warming);
            // After a failure, one probe at a time until a dial succeeds again.
            if state.refill_failures > 0 {
                missing = missing.min(1usize.saturating_sub(state.warming));
            }
            let slots = key_pool.take_warm_slots(
                &mut state,
                missing.min(budget),
                self.limits.max_connections_per_peer,
            );
            budget -= slots.len();
            dials.extend(slots.into_iter().map(|s| (key_pool.peer.clone(), s)));
        }
        if dials.is_empty() {
            return;
        }
        let Some(refill) = self.refill.upgrade() else {
            return;
        };
        for (peer, (slot, warm)) in dials {
            Arc::clone(&refill).refill(peer, slot, warm);
        }
    }
}

impl KeyPool {
    /// Under this key's lock: pop the newest idle connection that is still usable, else
    /// take a slot, else queue. Returns the idle connections found unusable on the way
    /// separately, so the caller drops them unlocked.
    ///
    /// The usability check (idle timeout, lifetime, liveness) runs under the lock: in the
    /// common case it is a few loads (see [`Connection::liveness`]); only a connection
    /// something arrived on is read, which the reaper, passing every `reap_interval`,
    /// usually did first. So `reused` counts only connections actually handed out.
    fn checkout_locked(
        self: &Arc<Self>,
        cap: Option<usize>,
        now: Tick,
        idle_timeout: Duration,
        min_idle: usize,
    ) -> Option<(Checkout, Vec<Connection>)> {
        let mut unusable = Vec::new();
        let mut state = self.state.lock();
        if state.forgotten {
            return None;
        }
        state.last_used = Some(now);
        state.min_idle = min_idle;
        while let Some(idle) = state.idle.pop_back() {
            let timeout = idle.conn.inner.lease.idle_timeout.min(idle_timeout);
            let mut conn = idle.conn;
            let reason = if now.exceeded(idle.since, timeout) {
                Some(EvictionReason::IdleTimeout)
            } else {
                Pool::unusable(&mut conn, now)
            };
            if let Some(reason) = reason {
                self.metrics.evicted(reason);
                conn.inner.lease.set_state(LeaseState::Closing, &mut state);
                unusable.push(conn);
                continue;
            }
            state.reused += 1;
            // Counted active as it leaves the list, under the lock: the idle total never
            // counts a connection no list holds (see `Pool::evict_over_total`).
            conn.inner.lease.set_state(LeaseState::Active, &mut state);
            return Some((Checkout::Reused(conn), unusable));
        }
        if cap.is_none_or(|cap| state.total < cap) {
            state.total += 1;
            return Some((Checkout::Dial(Slot::taken(Arc::clone(self))), unusable));
        }
        Some((self.enqueue_waiter_locked(&mut state), unusable))
    }

    /// With `batched_metrics`: publishes what the hit path only tallied (see
    /// `KeyState::gauge_lag`) to the gauges and the reused-checkout counter. Under the key's
    /// lock, so that no close decides against a tally half published.
    fn publish_metrics(&self, state: &mut KeyState) {
        if !self.batched_metrics {
            return;
        }
        if state.gauge_lag != 0 {
            let lag = state.gauge_lag as f64;
            self.metrics.idle.decrement(lag);
            self.metrics.active.increment(lag);
            state.gauge_lag = 0;
        }
        if state.reused > state.reused_published {
            self.metrics
                .checkout_reused
                .increment(state.reused - state.reused_published);
            state.reused_published = state.reused;
        }
    }

    /// Counts a reused checkout in `checkouts_total`, unless the reaper publishes it from
    /// `KeyState::reused` (`batched_metrics`).
    #[inline]
    pub(crate) fn count_reused_checkout(&self) {
        if !self.batched_metrics {
            self.metrics.checkout_reused.increment(1);
        }
    }

    /// Under this key's lock: take a slot, else queue (when `queue`), never an idle one.
    fn reserve_locked(self: &Arc<Self>, cap: Option<usize>, queue: bool) -> Option<Checkout> {
        let mut state = self.state.lock();
        // A use like any checkout: keeps the key (its stats, `min_idle`) alive.
        state.last_used = Some(Tick::now());
        if cap.is_none_or(|cap| state.total < cap) {
            state.total += 1;
            return Some(Checkout::Dial(Slot::taken(Arc::clone(self))));
        }
        queue.then(|| self.enqueue_waiter_locked(&mut state))
    }

    /// Under this key's lock: joins the FIFO of tasks waiting at the connection cap.
    fn enqueue_waiter_locked(self: &Arc<Self>, state: &mut KeyState) -> Checkout {
        // Waiters that gave up would otherwise pile up while nothing is released.
        if state.waiters.len() >= state.prune_waiters_at {
            state.waiters.retain(|w| !w.is_closed());
            state.prune_waiters_at = (state.waiters.len() * 2).max(MIN_WAITER_PRUNE);
        }
        let (tx, rx) = oneshot::channel();
        state.waiters.push_back(tx);
        Checkout::Wait(rx, Arc::clone(self))
    }

    /// Whether the key can be forgotten: no connections, no waiters, and no use within its
    /// idle timeout (kept that long so that its stats survive a moment without connections
    /// and `min_idle` can top it up after a failed dial).
    fn is_unused(&self, state: &mut KeyState, now: Tick) -> bool {
        state.waiters.retain(|w| !w.is_closed());
        state.total == 0
            && state.idle.is_empty()
            && state.waiters.is_empty()
            && state
                .last_used
                .is_none_or(|used| now.exceeded(used, self.idle_timeout))
    }

    /// Takes up to `n` slots for warming dials, within the connection cap.
    fn take_warm_slots(
        self: &Arc<Self>,
        state: &mut KeyState,
        n: usize,
        cap: Option<usize>,
    ) -> Vec<(Slot, Warm)> {
        let mut slots = Vec::new();
        while slots.len() < n && cap.is_none_or(|cap| state.total < cap) {
            state.total += 1;
            state.warming += 1;
            slots.push((
                Slot::taken(Arc::clone(self)),
                Warm {
                    key_pool: Arc::clone(self),
                    failed: false,
                },
            ));
        }
        slots
    }

    /// The epoch a dial starting now belongs to.
    pub(crate) fn epoch(&self) -> u64 {
        self.state.lock().epoch
    }

    /// Counts evictions in the metrics and this key's stats.
    fn evicted(&self, reason: EvictionReason, n: u64) {
        for _ in 0..n {
            self.metrics.evicted(reason);
        }
        if reason == EvictionReason::Evicted {
            self.stats.evicted.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// See [`Pool::evict`].
    fn evict(&self) -> usize {
        let idle: Vec<Connection> = {
            let mut state = self.state.lock();
            state.epoch += 1;
            let drained: Vec<Idle> = state.idle.drain(..).collect();
            drained
                .into_iter()
                .map(|mut i| {
                    i.conn
                        .inner
                        .lease
                        .set_state(LeaseState::Closing, &mut state);
                    i.conn
                })
                .collect()
        };
        let n = idle.len();
        self.evicted(EvictionReason::Evicted, n as u64);
        tracing::debug!(peer = %self.description, closed = n, "evicted");
        // Dropped here, outside the lock: each frees its slot under it.
        drop(idle);
        n
    }

    fn stats(&self) -> PeerStats {
        let live = {
            let state = self.state.lock();
            Live {
                idle: state.idle.len(),
                total: state.total,
                waiting: state.waiters.iter().filter(|w| !w.is_closed()).count(),
                reused: state.reused,
            }
        };
        self.stats.snapshot(live)
    }
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("keys", &self.keys.len())
            .field("idle_total", &self.idle_total.sum())
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
            // What the reaper had not published yet; the connections closed below (and the
            // ones still in use, when they go) then count down the gauges exactly.
            entry.publish_metrics(&mut state);
            idle.extend(state.idle.drain(..).map(|i| i.conn));
            state.waiters.clear();
        }
        drop(idle);
    }
}

/// A uniformly random index below `n` (`n > 0`), from a per-thread xorshift generator: the
/// eviction sample needs no cryptographic quality, only keys that differ between evictions.
fn random_below(n: usize) -> usize {
    use std::cell::Cell;
    use std::hash::BuildHasher;
    thread_local! {
        // `RandomState` is seeded randomly per process; the thread id tells threads apart.
        // `| 1`: xorshift never leaves zero.
        static STATE: Cell<u64> = Cell::new(
            std::collections::hash_map::RandomState::new().hash_one(std::thread::current().id()) | 1,
        );
    }
    STATE.with(|state| {
        let mut x = state.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        state.set(x);
        // Multiply-shift: unbiased enough for n far below 2^32, and no division.
        ((u128::from(x) * n as u128) >> 64) as usize
    })
}
