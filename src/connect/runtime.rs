//! Whether the tokio runtime a socket is registered with is still running.
//!
//! A connection's socket belongs to the reactor of the runtime it was dialled on. When that
//! runtime shuts down (a connector kept in a global and used from a new runtime later, or
//! shared by several runtimes), the socket can no longer be read or written, yet nothing on it
//! changes: tokio only marks its registration as shut down, and reports that from
//! `poll_read_ready`, the one call the pool's liveness probe no longer makes on its fast path
//! (it reads the readiness bits instead, which cost no waker registration; see
//! [`crate::stream::Connection`]'s liveness). So each connection holds a [`RuntimeAlive`]
//! flag of its runtime, cleared when the runtime drops its tasks, and the probe reads it:
//! one load of a cache line written once.
//!
//! The flag is cleared by a sentinel task per runtime (not per pool or connection) that never
//! wakes: a runtime that shuts down drops every task, and the sentinel's drop clears the flag.
//! It is spawned by the first dial on the runtime, shared by every pool dialling there after.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use tokio::runtime::{Handle, Id};

/// Cleared once the runtime it was taken on has shut down.
#[derive(Debug, Clone)]
pub(crate) struct RuntimeAlive(Arc<AtomicBool>);

/// The runtimes dials happened on, with their flags; entries of runtimes that are gone are
/// pruned at the next dial on a new runtime. Usually one entry.
static RUNTIMES: Mutex<Vec<(Id, Weak<AtomicBool>)>> = Mutex::new(Vec::new());

impl RuntimeAlive {
    /// The flag of the runtime this is called on. Not on the hit path: once per dial.
    pub(crate) fn current() -> RuntimeAlive {
        let Ok(handle) = Handle::try_current() else {
            // Outside a runtime no socket can be registered: nothing to watch.
            return RuntimeAlive(Arc::new(AtomicBool::new(true)));
        };
        let id = handle.id();
        let mut runtimes = RUNTIMES.lock();
        if let Some(flag) = runtimes
            .iter()
            .find(|(known, _)| *known == id)
            .and_then(|(_, flag)| flag.upgrade())
            .filter(|flag| flag.load(Ordering::Acquire))
        {
            return RuntimeAlive(flag);
        }
        runtimes.retain(|(_, flag)| flag.upgrade().is_some_and(|f| f.load(Ordering::Acquire)));
        let flag = Arc::new(AtomicBool::new(true));
        runtimes.push((id, Arc::downgrade(&flag)));
        drop(runtimes);
        // The sentinel holds the flag (the registry only a `Weak`), so the flag lives exactly
        // as long as the runtime keeps the task, plus the connections that hold it.
        let sentinel = Sentinel(Arc::clone(&flag));
        drop(handle.spawn(async move {
            let _sentinel = sentinel;
            std::future::pending::<()>().await;
        }));
        RuntimeAlive(flag)
    }

    /// Whether the runtime still runs (and so can still drive the socket).
    pub(crate) fn is_alive(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// Clears the flag when its task is dropped: at the runtime's shutdown.
struct Sentinel(Arc<AtomicBool>);

impl Drop for Sentinel {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}
