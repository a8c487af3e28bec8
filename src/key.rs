//! [`PeerKey`]: where the pool key is computed. Security-critical.
//!
//! Two peers may share a pooled connection or a TLS session only when every setting that
//! shaped the connection is equal. The key therefore holds the full values (or SHA-256
//! fingerprints of certificates and keys) and compares all of them on lookup; the 64-bit hash
//! only picks the map bucket, so a hash collision can never hand over a connection.
//!
//! Inputs: address, TLS or plaintext, SNI, verify_cert, verify_hostname, alternative CN, CA set
//! (SHA-256 of each DER certificate), client certificate chain and key (fingerprint), ALPN
//! offer, curves, bind address, and the user's group tag. Not inputs: timeouts, keepalive,
//! nodelay, the metric name and the resumption switch, which do not change who is on the
//! other end or what was verified.

use std::fmt;
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::net::SocketAddr;
use std::sync::Arc;

use crate::peer::{hex, Alpn, PeerAddress, PeerInner};

/// The exact-match identity of a peer's connections. Cheap to clone (one `Arc`).
///
/// Equality compares every field; [`Hash`] feeds only the precomputed 64-bit hash.
#[derive(Clone)]
pub struct PeerKey {
    inner: Arc<KeyFields>,
}

#[derive(PartialEq, Eq, Hash)]
struct KeyFields {
    hash: u64,
    address: PeerAddress,
    tls: Option<TlsFields>,
    bind_to: Option<SocketAddr>,
    group: Option<String>,
}

#[derive(PartialEq, Eq, Hash)]
struct TlsFields {
    sni: String,
    verify_cert: bool,
    verify_hostname: bool,
    alternative_cn: Option<String>,
    ca: Option<Arc<[[u8; 32]]>>,
    client_cert: Option<[u8; 32]>,
    alpn: Option<Alpn>,
    curves: Option<String>,
}

impl PeerKey {
    pub(crate) fn compute(peer: &PeerInner) -> PeerKey {
        let tls = peer.sni.as_ref().map(|sni| TlsFields {
            sni: sni.clone(),
            verify_cert: peer.verify_cert,
            verify_hostname: peer.verify_hostname,
            alternative_cn: peer.alternative_cn.clone(),
            ca: peer.ca.as_ref().map(|ca| ca.fingerprints.clone()),
            client_cert: peer.client_cert.as_ref().map(|c| *c.fingerprint()),
            alpn: peer.alpn.clone(),
            curves: peer.curves.clone(),
        });
        let mut fields = KeyFields {
            hash: 0,
            address: peer.address.clone(),
            tls,
            bind_to: peer.bind_to,
            group: peer.group.clone(),
        };
        // SipHash with fixed keys: stable within the process, and the key's inputs come from
        // configuration, not from clients, so hash flooding is not a concern.
        #[allow(
            deprecated,
            reason = "SipHasher is the std SipHash with fixed keys we want"
        )]
        let mut hasher = std::hash::SipHasher::new();
        fields.hash(&mut hasher);
        fields.hash = hasher.finish();
        PeerKey {
            inner: Arc::new(fields),
        }
    }

    /// The precomputed 64-bit hash (for the map only; equality compares everything).
    pub fn hash64(&self) -> u64 {
        self.inner.hash
    }

    /// Whether connections of this key speak TLS.
    pub fn is_tls(&self) -> bool {
        self.inner.tls.is_some()
    }
}

impl PartialEq for PeerKey {
    fn eq(&self, other: &Self) -> bool {
        // Same allocation is the common case (one Peer reused for every request); otherwise
        // compare every field, hash first because it is the cheapest mismatch.
        Arc::ptr_eq(&self.inner, &other.inner) || *self.inner == *other.inner
    }
}

impl Eq for PeerKey {}

impl Hash for PeerKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.inner.hash);
    }
}

impl fmt::Debug for PeerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let k = &self.inner;
        let mut d = f.debug_struct("PeerKey");
        d.field("address", &k.address);
        if let Some(tls) = &k.tls {
            d.field("sni", &tls.sni)
                .field("verify_cert", &tls.verify_cert)
                .field("verify_hostname", &tls.verify_hostname)
                .field("alternative_cn", &tls.alternative_cn)
                .field(
                    "ca",
                    &tls.ca
                        .as_ref()
                        .map(|fps| fps.iter().map(|fp| hex(&fp[..8])).collect::<Vec<_>>()),
                )
                .field(
                    "client_cert",
                    &tls.client_cert.as_ref().map(|fp| hex(&fp[..8])),
                )
                .field("alpn", &tls.alpn)
                .field("curves", &tls.curves);
        }
        d.field("bind_to", &k.bind_to)
            .field("group", &k.group)
            .finish()
    }
}

/// A hasher that passes [`PeerKey`]'s precomputed hash through, so map lookups do not hash
/// the key a second time.
#[derive(Default, Debug)]
pub(crate) struct PrehashedHasher(u64);

impl Hasher for PrehashedHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only reached if something other than `PeerKey` is hashed with this hasher; fold the
        // bytes in so the result is still a hash.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

pub(crate) type PrehashedState = BuildHasherDefault<PrehashedHasher>;
