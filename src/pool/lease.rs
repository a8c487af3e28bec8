//! Slot and lease accounting: how the per-peer connection count stays exact.
//!
//! Every connection to a key, whether dialling, in use or idle, holds exactly one slot of
//! that key's `total`. A [`Slot`] is the count for a dial in progress; it becomes part of the
//! connection's [`Lease`] once the dial succeeds. Dropping either frees the slot, or hands it
//! straight to the oldest waiter, so a cancelled dial or a dropped connection can never leak
//! capacity. The lease also keeps the idle/active gauges and the global idle count: it knows
//! which of the two it is counted in, moves between them under the key's lock, and undoes
//! that on drop (under the same lock). With `batched_metrics` the moves of the hit path are
//! tallied in the key's state instead of written to the gauges (see `Lease::set_state`).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;

use super::clock::Tick;
use super::{KeyPool, KeyState};
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
    free_slot_locked(key_pool, &mut state);
}

/// [`free_slot`] under the key's lock.
fn free_slot_locked(key_pool: &Arc<KeyPool>, state: &mut KeyState) {
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

    /// Moves the connection between the idle and active gauges (and the idle count), under
    /// its key's lock (`key` is that lock's state).
    ///
    /// With `ConnectorOptions::batched_metrics`, a move between idle and active (a checkout
    /// or a release: the hit path) is only tallied in `key.gauge_lag`, which the reaper
    /// publishes; the gauges' shared atomics are not written. A close then takes its
    /// decrement from whichever gauge the tally says is over-reported, so that the published
    /// gauges never go below zero (see `KeyState::gauge_lag`).
    #[inline]
    pub(crate) fn set_state(&mut self, to: LeaseState, key: &mut KeyState) {
        let from = self.state;
        if from == to {
            return;
        }
        let key_pool = &self.key_pool;
        let m = &key_pool.metrics;
        match (from, to) {
            (LeaseState::Active, LeaseState::Idle) => {
                if key_pool.batched_metrics {
                    key.gauge_lag -= 1;
                } else {
                    m.active.decrement(1.0);
                    m.idle.increment(1.0);
                }
                key_pool.idle_total.add(1);
            }
            (LeaseState::Idle, LeaseState::Active) => {
                if key_pool.batched_metrics {
                    key.gauge_lag += 1;
                } else {
                    m.idle.decrement(1.0);
                    m.active.increment(1.0);
                }
                key_pool.idle_total.add(-1);
            }
            (from, LeaseState::Closing) => leave(key_pool, from, key),
            // Out of `Closing`: the connection is being closed (same-state moves returned above).
            _ => debug_assert!(false, "no way back from closing"),
        }
        self.state = to;
    }
}

/// Takes a connection in state `from` out of the gauges and the idle count, under its key's
/// lock: it is being closed.
fn leave(key_pool: &KeyPool, from: LeaseState, key: &mut KeyState) {
    let m = &key_pool.metrics;
    match from {
        // The published active gauge under-reports by `gauge_lag` when it is positive (and
        // the idle gauge over-reports by as much): take the close from the idle side then.
        LeaseState::Active if key.gauge_lag > 0 => {
            key.gauge_lag -= 1;
            m.idle.decrement(1.0);
        }
        LeaseState::Active => m.active.decrement(1.0),
        LeaseState::Idle => {
            if key.gauge_lag < 0 {
                key.gauge_lag += 1;
                m.active.decrement(1.0);
            } else {
                m.idle.decrement(1.0);
            }
            key_pool.idle_total.add(-1);
        }
        LeaseState::Closing => {}
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut state = self.key_pool.state.lock();
        leave(&self.key_pool, self.state, &mut state);
        free_slot_locked(&self.key_pool, &mut state);
    }
}
