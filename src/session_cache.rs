//! The client TLS session cache: which session may be offered to which peer.
//!
//! Resuming a session skips certificate verification, so a session may only be offered to a
//! peer whose every connection-shaping setting equals the one that created it. The cache is
//! therefore keyed by the full [`PeerKey`] (address, SNI, verify flags, alternative CN, CA set,
//! client certificate, ALPN, curves, bind address, group) and never by hostname alone: a
//! store shared across verifier settings would let a session established without verification
//! resume as a verified one. Each [`crate::Connector`] owns one cache and one `SSL_CTX`, so
//! every cached session also comes from the context it will be offered on.
//!
//! One session per key, least recently used evicted first; a session serves any number of
//! new connections (as nginx and Envoy do), so a burst of dials resumes too.

use std::collections::{BTreeMap, HashMap};
use std::time::{SystemTime, UNIX_EPOCH};

use foreign_types_shared::{ForeignType, ForeignTypeRef};
use openssl::ssl::{SslSession, SslSessionRef};
use parking_lot::Mutex;

use crate::connect::openssl_ext;
use crate::key::{PeerKey, PrehashedState};

/// A bounded LRU map from peer key to its latest TLS session.
#[derive(Debug)]
pub(crate) struct SessionCache {
    capacity: usize,
    lru: Mutex<Lru>,
}

#[derive(Default)]
struct Lru {
    entries: HashMap<PeerKey, (SslSession, u64), PrehashedState>,
    /// Use stamp → key; the first entry is the least recently used.
    order: BTreeMap<u64, PeerKey>,
    next_stamp: u64,
}

impl SessionCache {
    pub(crate) fn new(capacity: usize) -> SessionCache {
        SessionCache {
            capacity,
            lru: Mutex::new(Lru::default()),
        }
    }

    /// The session to offer `key`, if one is cached and not expired.
    pub(crate) fn get(&self, key: &PeerKey) -> Option<SslSession> {
        let mut lru = self.lru.lock();
        let stamp = lru.bump();
        let lru = &mut *lru;
        let (session, old_stamp) = lru.entries.get_mut(key)?;
        if is_expired(session) {
            let old = *old_stamp;
            lru.entries.remove(key);
            lru.order.remove(&old);
            return None;
        }
        let session = session.clone();
        let old = std::mem::replace(old_stamp, stamp);
        if let Some(k) = lru.order.remove(&old) {
            lru.order.insert(stamp, k);
        }
        Some(session)
    }

    /// Stores the newest session for `key`, replacing any older one.
    pub(crate) fn put(&self, key: PeerKey, session: SslSession) {
        if self.capacity == 0 {
            return;
        }
        let mut lru = self.lru.lock();
        let stamp = lru.bump();
        let lru = &mut *lru;
        if let Some((_, old)) = lru.entries.insert(key.clone(), (session, stamp)) {
            lru.order.remove(&old);
        }
        lru.order.insert(stamp, key);
        while lru.entries.len() > self.capacity {
            let Some((_, victim)) = lru.order.pop_first() else {
                break;
            };
            lru.entries.remove(&victim);
        }
    }

    /// Forgets `offered` for `key` after the server declined to resume it, unless a newer
    /// session has already replaced it.
    pub(crate) fn discard(&self, key: &PeerKey, offered: &SslSessionRef) {
        let mut lru = self.lru.lock();
        let lru = &mut *lru;
        let same = lru
            .entries
            .get(key)
            .is_some_and(|(s, _)| std::ptr::eq(s.as_ptr(), offered.as_ptr()));
        if same {
            if let Some((_, stamp)) = lru.entries.remove(key) {
                lru.order.remove(&stamp);
            }
        }
    }
}

/// Forgetting on demand (`Connector::evict`): an upstream that was removed or rotated its
/// certificate must authenticate in full again.
impl SessionCache {
    /// Forgets the session cached for `key`, if any.
    pub(crate) fn remove(&self, key: &PeerKey) {
        let mut lru = self.lru.lock();
        if let Some((_, stamp)) = lru.entries.remove(key) {
            lru.order.remove(&stamp);
        }
    }

    /// Forgets every session.
    pub(crate) fn clear(&self) {
        let mut lru = self.lru.lock();
        lru.entries.clear();
        lru.order.clear();
    }
}

impl std::fmt::Debug for Lru {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lru")
            .field("sessions", &self.entries.len())
            .finish()
    }
}

impl Lru {
    fn bump(&mut self) -> u64 {
        self.next_stamp += 1;
        self.next_stamp
    }
}

/// Past the session's own timeout, or past the lifetime the server gave its ticket: OpenSSL
/// keeps the two apart and would offer a TLS 1.2 ticket the server already considers expired.
fn is_expired(session: &SslSessionRef) -> bool {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let mut lifetime = session.timeout();
    let hint = openssl_ext::ticket_lifetime_hint(session);
    if hint > 0 {
        lifetime = lifetime.min(i64::try_from(hint).unwrap_or(i64::MAX));
    }
    session.time().saturating_add(lifetime) <= now
}
