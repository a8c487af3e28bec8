//! Slot and lease accounting: how the per-peer connection count stays exact.
//!
//! Every connection to a key, whether dialling, in use or idle, holds exactly one slot of
//! that key's `total`. A [`Slot`] is the count for a dial in progress; it becomes part of the
//! connection's [`Lease`] once the dial succeeds. Dropping either frees the slot, or hands it
//! straight to the oldest waiter, so a cancelled dial or a dropped connection can never leak
//! capacity. The lease also keeps the idle/active gauges and the global idle count exact: it
//! knows which of the two it is counted in and undoes that on drop.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;

use super::clock::Tick;
use super::KeyPool;
use crate::stream::Connection;

/// What a waiter at the per-peer cap receives.
pub(crate) enum Handoff {
    /// A released, idle connection: use it.
    Conn(Connection),
    /// A freed slot: dial with it.
    Slot(Slot),
}

/// One unit of a key's connection count, held by a dial in progress.
pub(crate) struct Slot {
    /// `None` once the slot has been passed on (to a lease or a waiter).
    key_pool: Option<Arc<KeyPool>>,
}

impl Slot {
    /// Counts against `key_pool`; the caller has already incremented `total`.
    pub(super) fn taken(key_pool: Arc<KeyPool>) -> Slot {
        Slot {
            key_pool: Some(key_pool),
        }
    }

    pub(crate) fn key_pool(&self) -> Option<&Arc<KeyPool>> {
        self.key_pool.as_ref()
    }

    /// Turns the slot into the lease of a freshly dialled connection (counted as active).
    /// `lifetime` is this connection's `max_lifetime`, jitter applied; `epoch` the key's
    /// eviction epoch when the dial started.
    pub(crate) fn into_lease(
        mut self,
        idle_timeout: Duration,
        lifetime: Option<Duration>,
        epoch: u64,
    ) -> Option<Lease> {
        let key_pool = self.key_pool.take()?;
        key_pool.metrics.active.increment(1.0);
        Some(Lease {
            key_pool,
            created: Tick::now(),
            uses: 0,
            idle_timeout,
            lifetime,
            epoch,
            state: LeaseState::Active,
        })
    }

    /// Forgets the slot without freeing it (it was passed on by value elsewhere).
    fn disarm(&mut self) -> Option<Arc<KeyPool>> {
        self.key_pool.take()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(key_pool) = self.key_pool.take() {
            free_slot(&key_pool);
        }
    }
}

/// Gives a freed slot to the oldest live waiter, or returns it to the count.
///
/// Must be called without `key_pool.state` held.
fn free_slot(key_pool: &Arc<KeyPool>) {
    let mut state = key_pool.state.lock();
    while let Some(waiter) = state.waiters.pop_front() {
        match waiter.send(Handoff::Slot(Slot::taken(Arc::clone(key_pool)))) {
            Ok(()) => return,
            Err(Handoff::Slot(mut returned)) => {
                // The waiter gave up; the slot is still ours. Disarm so dropping it here,
                // under the lock, does not recurse into `free_slot`.
                returned.disarm();
            }
            Err(Handoff::Conn(_)) => unreachable!("send returns the value it was given"),
        }
    }
    state.total -= 1;
}

/// Sends `handoff` to the oldest waiter still waiting; returns it if there is none.
pub(super) fn offer_to_waiters(
    waiters: &mut std::collections::VecDeque<oneshot::Sender<Handoff>>,
    mut handoff: Handoff,
) -> Option<Handoff> {
    while let Some(waiter) = waiters.pop_front() {
        match waiter.send(handoff) {
            Ok(()) => return None,
            Err(returned) => handoff = returned,
        }
    }
    Some(handoff)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LeaseState {
    Active,
    Idle,
    /// Taken out of the idle list to be closed: counted in no gauge and not in the idle
    /// total. Set under the key's lock, at the moment the connection leaves the list, so the
    /// idle total never counts a connection that no list holds (see `Pool::evict_over_total`).
    Closing,
}

/// A connection's membership in its key's pool: its slot, age, uses and gauge state.
pub(crate) struct Lease {
    pub(crate) key_pool: Arc<KeyPool>,
    pub(crate) created: Tick,
    pub(crate) uses: u32,
    pub(crate) idle_timeout: Duration,
    /// Closed at the first release or checkout this long after `created`, if set.
    pub(crate) lifetime: Option<Duration>,
    /// The key's eviction epoch the connection was dialled in; an older one than the key's
    /// means `evict` ran since, and the connection is closed at release.
    pub(crate) epoch: u64,
    state: LeaseState,
}

impl Lease {
    pub(crate) fn peer_description(&self) -> &str {
        &self.key_pool.description
    }

    /// Moves the connection between the idle and active gauges (and the global idle count).
    pub(crate) fn set_state(&mut self, state: LeaseState) {
        if self.state == state {
            return;
        }
        let m = &self.key_pool.metrics;
        match self.state {
            LeaseState::Active => m.active.decrement(1.0),
            LeaseState::Idle => {
                m.idle.decrement(1.0);
                self.key_pool.idle_total.fetch_sub(1, Ordering::Relaxed);
            }
            LeaseState::Closing => {}
        }
        match state {
            LeaseState::Active => m.active.increment(1.0),
            LeaseState::Idle => {
                m.idle.increment(1.0);
                self.key_pool.idle_total.fetch_add(1, Ordering::Relaxed);
            }
            LeaseState::Closing => {}
        }
        self.state = state;
    }

    /// Marks an idle connection chosen by the global eviction as closing, *without*
    /// decrementing the idle total: the evicting release already did, when it claimed the
    /// excess (see `Pool::evict_over_total`).
    pub(crate) fn close_claimed(&mut self) {
        debug_assert_eq!(self.state, LeaseState::Idle);
        if self.state == LeaseState::Idle {
            self.key_pool.metrics.idle.decrement(1.0);
            self.state = LeaseState::Closing;
        } else {
            self.set_state(LeaseState::Closing);
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        match self.state {
            LeaseState::Active => self.key_pool.metrics.active.decrement(1.0),
            LeaseState::Idle => {
                self.key_pool.metrics.idle.decrement(1.0);
                self.key_pool.idle_total.fetch_sub(1, Ordering::Relaxed);
            }
            LeaseState::Closing => {}
        }
        free_slot(&self.key_pool);
    }
}
