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
//!
//! Because resumption skips verification, a session is only offered while
//! - it has not expired (its own timeout and the server's ticket lifetime hint),
//! - the certificate chain it was verified with has not expired (its earliest notAfter,
//!   remembered from the full handshake), and
//! - its full handshake is younger than the maximum authentication age. A TLS 1.3 ticket
//!   received on a resumed connection is a new session to OpenSSL, but it inherits the
//!   [`Origin`] of the session that was resumed, so renewing tickets never extends either
//!   limit.
//!
//! A session whose resumption attempt failed (fatal alert, reset, timeout) is forgotten at
//! once (RFC 5246 §7.2.2), and the key takes no new session for [`RESUMPTION_COOLDOWN`]: a
//! server that fails every resumption (one that requests client certificates without a
//! session id context, say) would otherwise fail every second dial, as each full handshake
//! hands us a fresh session to fail with.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use foreign_types_shared::{ForeignType, ForeignTypeRef};
use openssl::ssl::{SslSession, SslSessionRef};
use parking_lot::Mutex;

use crate::connect::openssl_ext;
use crate::key::{PeerKey, PrehashedState};

/// How long a key whose resumption attempt failed gets full handshakes only. Long enough that
/// a server failing every resumption costs one failed dial a minute, short enough that a key
/// whose failure was a one-off (a server restarting mid-handshake) resumes again soon.
pub(crate) const RESUMPTION_COOLDOWN: Duration = Duration::from_secs(60);

/// Where a session's authentication comes from: the full handshake that verified the server.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Origin {
    /// When that handshake started (erring early: the age limit may end a little sooner).
    pub(crate) authenticated: Instant,
    /// Unix time of the earliest notAfter in the chain it verified; `None` when the chain was
    /// not verified (`verify_cert` off), so there is no validity to outlive.
    pub(crate) not_after: Option<i64>,
}

/// A bounded LRU map from peer key to its latest TLS session.
#[derive(Debug)]
pub(crate) struct SessionCache {
    capacity: usize,
    max_auth_age: Duration,
    lru: Mutex<Lru>,
}

enum Entry {
    Session(SslSession, Origin),
    /// A resumption attempt failed: offer nothing and keep nothing until then.
    CoolingDown(Instant),
}

#[derive(Default)]
struct Lru {
    entries: HashMap<PeerKey, (Entry, u64), PrehashedState>,
    /// Use stamp → key; the first entry is the least recently used.
    order: BTreeMap<u64, PeerKey>,
    next_stamp: u64,
}

impl SessionCache {
    pub(crate) fn new(capacity: usize, max_auth_age: Duration) -> SessionCache {
        SessionCache {
            capacity,
            max_auth_age,
            lru: Mutex::new(Lru::default()),
        }
    }

    /// The session to offer `key` and where its authentication comes from, if one is cached
    /// and may still be offered (see the module documentation).
    pub(crate) fn get(&self, key: &PeerKey) -> Option<(SslSession, Origin)> {
        let mut lru = self.lru.lock();
        let stamp = lru.bump();
        let lru = &mut *lru;
        let (entry, old_stamp) = lru.entries.get_mut(key)?;
        let offer = match entry {
            Entry::Session(session, origin) => {
                (!self.is_stale(session, origin)).then(|| (session.clone(), *origin))
            }
            Entry::CoolingDown(until) if Instant::now() < *until => return None,
            Entry::CoolingDown(_) => None,
        };
        let Some(offer) = offer else {
            // Expired, or a cool-down that is over: forget the key.
            let old = *old_stamp;
            lru.entries.remove(key);
            lru.order.remove(&old);
            return None;
        };
        let old = std::mem::replace(old_stamp, stamp);
        if let Some(k) = lru.order.remove(&old) {
            lru.order.insert(stamp, k);
        }
        Some(offer)
    }

    /// Stores the newest session for `key`, replacing any older one; ignored while the key
    /// cools down after a failed resumption.
    pub(crate) fn put(&self, key: PeerKey, session: SslSession, origin: Origin) {
        if self.capacity == 0 {
            return;
        }
        let mut lru = self.lru.lock();
        if let Some((Entry::CoolingDown(until), _)) = lru.entries.get(&key) {
            if Instant::now() < *until {
                return;
            }
        }
        self.insert(&mut lru, key, Entry::Session(session, origin));
    }

    /// Forgets `key`'s session after a resumption attempt failed, and takes no new one for
    /// [`RESUMPTION_COOLDOWN`]. Whatever the cached session is now (a concurrent dial may
    /// have replaced the one that failed), the server just showed it fails resumption.
    pub(crate) fn resumption_failed(&self, key: &PeerKey) {
        if self.capacity == 0 {
            return;
        }
        let until = Instant::now() + RESUMPTION_COOLDOWN;
        let mut lru = self.lru.lock();
        self.insert(&mut lru, key.clone(), Entry::CoolingDown(until));
    }

    fn insert(&self, lru: &mut Lru, key: PeerKey, entry: Entry) {
        let stamp = lru.bump();
        if let Some((_, old)) = lru.entries.insert(key.clone(), (entry, stamp)) {
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
        let same = lru.entries.get(key).is_some_and(|(entry, _)| {
            matches!(entry, Entry::Session(s, _) if std::ptr::eq(s.as_ptr(), offered.as_ptr()))
        });
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

impl SessionCache {
    /// Whether the session may no longer be offered: past its authentication age, past the
    /// expiry of the chain it was verified with, or expired itself.
    fn is_stale(&self, session: &SslSessionRef, origin: &Origin) -> bool {
        if origin.authenticated.elapsed() >= self.max_auth_age {
            return true;
        }
        let now = unix_now();
        origin.not_after.is_some_and(|not_after| now >= not_after) || is_expired(session, now)
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Past the session's own timeout, or past the lifetime the server gave its ticket: OpenSSL
/// keeps the two apart and would offer a TLS 1.2 ticket the server already considers expired.
fn is_expired(session: &SslSessionRef, now: i64) -> bool {
    let mut lifetime = session.timeout();
    let hint = openssl_ext::ticket_lifetime_hint(session);
    if hint > 0 {
        lifetime = lifetime.min(i64::try_from(hint).unwrap_or(i64::MAX));
    }
    session.time().saturating_add(lifetime) <= now
}
