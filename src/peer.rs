//! What to connect to: [`Peer`] and its settings ([`Alpn`], [`CertKey`], [`TcpKeepalive`]).
//!
//! A `Peer` is configuration only; live connections are in [`crate::Connection`]. The identity
//! used for pooling and session resumption is computed from a peer in [`crate::PeerKey`].

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use openssl::hash::MessageDigest;
use openssl::pkey::{PKey, Private};
use openssl::x509::X509;

use crate::error::{Error, Result};
use crate::key::PeerKey;
use crate::pool::KeyPoolLink;

/// Where a peer lives: a TCP socket address or a Unix-domain socket path.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PeerAddress {
    /// A TCP address, IPv4 or IPv6.
    Tcp(SocketAddr),
    /// A Unix-domain stream socket.
    Unix(PathBuf),
}

impl fmt::Display for PeerAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerAddress::Tcp(addr) => write!(f, "{addr}"),
            PeerAddress::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// The application protocols to offer in the TLS handshake (ALPN).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Alpn {
    /// Offer `http/1.1` only.
    H1,
    /// Offer `h2` only.
    H2,
    /// Offer `h2`, then `http/1.1`.
    H2H1,
    /// A caller-chosen list, already in wire format; build it with [`Alpn::from_protocols`].
    Custom(Arc<[u8]>),
}

impl Alpn {
    /// Builds an ALPN offer from protocol names, most preferred first.
    ///
    /// # Errors
    /// `InvalidConfig` when the list is empty, or a name is empty or longer than 255 bytes.
    pub fn from_protocols<I, P>(protocols: I) -> Result<Alpn>
    where
        I: IntoIterator<Item = P>,
        P: AsRef<[u8]>,
    {
        let mut wire = Vec::new();
        for proto in protocols {
            let proto = proto.as_ref();
            if proto.is_empty() || proto.len() > 255 {
                return Err(Error::config(format!(
                    "ALPN protocol name must be 1 to 255 bytes, got {} bytes",
                    proto.len()
                )));
            }
            wire.push(proto.len() as u8);
            wire.extend_from_slice(proto);
        }
        if wire.is_empty() {
            return Err(Error::config("ALPN protocol list is empty"));
        }
        // Spell a standard offer the standard way, so equal offers make equal pool keys.
        for named in [Alpn::H1, Alpn::H2, Alpn::H2H1] {
            if named.to_wire() == wire.as_slice() {
                return Ok(named);
            }
        }
        Ok(Alpn::Custom(wire.into()))
    }

    /// The offer in TLS wire format (length-prefixed names).
    pub fn to_wire(&self) -> &[u8] {
        match self {
            Alpn::H1 => b"\x08http/1.1",
            Alpn::H2 => b"\x02h2",
            Alpn::H2H1 => b"\x02h2\x08http/1.1",
            Alpn::Custom(wire) => wire,
        }
    }
}

/// A client certificate chain and its private key, for mutual TLS.
///
/// Cheap to clone. The SHA-256 fingerprint that identifies it in a [`PeerKey`] is computed
/// once, here, at construction.
#[derive(Clone)]
pub struct CertKey {
    inner: Arc<CertKeyInner>,
}

struct CertKeyInner {
    leaf: X509,
    key: PKey<Private>,
    intermediates: Vec<X509>,
    fingerprint: [u8; 32],
}

impl CertKey {
    /// Builds a client identity from a leaf certificate, its key and the intermediates to send
    /// with it (leaf issuer first).
    ///
    /// # Errors
    /// `InvalidConfig` when the key does not belong to the leaf certificate.
    pub fn new(leaf: X509, key: PKey<Private>, intermediates: Vec<X509>) -> Result<CertKey> {
        let leaf_key = leaf.public_key().map_err(|e| {
            Error::config(format!("client certificate has no usable public key: {e}"))
        })?;
        if !leaf_key.public_eq(&key) {
            return Err(Error::config(
                "client private key does not match the client certificate",
            ));
        }
        let mut hasher = openssl::hash::Hasher::new(MessageDigest::sha256())
            .map_err(|e| Error::internal(format!("sha256 unavailable: {e}")))?;
        let mut feed =
            |label: &[u8], der: std::result::Result<Vec<u8>, openssl::error::ErrorStack>| {
                let der = der.map_err(|e| {
                    Error::config(format!(
                        "cannot encode client {}: {e}",
                        String::from_utf8_lossy(label)
                    ))
                })?;
                // Length-prefix every part so that different splits of the same bytes differ.
                hasher
                    .update(label)
                    .and_then(|_| hasher.update(&(der.len() as u64).to_be_bytes()))
                    .and_then(|_| hasher.update(&der))
                    .map_err(|e| Error::internal(format!("sha256 failed: {e}")))
            };
        feed(b"certificate", leaf.to_der())?;
        for cert in &intermediates {
            feed(b"intermediate", cert.to_der())?;
        }
        feed(b"key", key.private_key_to_der())?;
        let digest = hasher
            .finish()
            .map_err(|e| Error::internal(format!("sha256 failed: {e}")))?;
        let mut fingerprint = [0u8; 32];
        fingerprint.copy_from_slice(&digest);
        Ok(CertKey {
            inner: Arc::new(CertKeyInner {
                leaf,
                key,
                intermediates,
                fingerprint,
            }),
        })
    }

    /// Parses a PEM certificate chain (leaf first, then intermediates) and a PEM private key.
    ///
    /// # Errors
    /// `InvalidConfig` naming the problem: no certificate in the chain PEM, unparsable PEM, an
    /// unparsable key, or a key that does not match the leaf.
    pub fn from_pem(chain_pem: &[u8], key_pem: &[u8]) -> Result<CertKey> {
        let mut chain = X509::stack_from_pem(chain_pem)
            .map_err(|e| Error::config(format!("client certificate PEM is not valid: {e}")))?;
        if chain.is_empty() {
            return Err(Error::config("client certificate PEM holds no certificate"));
        }
        let leaf = chain.remove(0);
        let key = PKey::private_key_from_pem(key_pem)
            .map_err(|e| Error::config(format!("client private key PEM is not valid: {e}")))?;
        CertKey::new(leaf, key, chain)
    }

    /// The leaf certificate.
    pub fn leaf(&self) -> &X509 {
        &self.inner.leaf
    }

    /// The private key.
    pub fn key(&self) -> &PKey<Private> {
        &self.inner.key
    }

    /// The intermediates sent after the leaf.
    pub fn intermediates(&self) -> &[X509] {
        &self.inner.intermediates
    }

    /// SHA-256 over the leaf, the intermediates and the key: the identity used in [`PeerKey`].
    pub fn fingerprint(&self) -> &[u8; 32] {
        &self.inner.fingerprint
    }
}

impl fmt::Debug for CertKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the key.
        f.debug_struct("CertKey")
            .field("leaf_subject", &self.inner.leaf.subject_name())
            .field("intermediates", &self.inner.intermediates.len())
            .field("fingerprint", &hex(&self.inner.fingerprint))
            .finish()
    }
}

/// TCP keepalive probes for idle pooled connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TcpKeepalive {
    /// Idle time before the first probe.
    pub idle: Duration,
    /// Time between probes.
    pub interval: Duration,
    /// Unanswered probes before the connection is declared dead.
    pub count: u32,
}

/// A set of trusted CA certificates, identified by the SHA-256 of each certificate's DER.
#[derive(Clone)]
pub(crate) struct CaSet {
    pub(crate) certs: Arc<[X509]>,
    /// Sorted and deduplicated, so the same CAs in another order are the same set.
    pub(crate) fingerprints: Arc<[[u8; 32]]>,
}

impl CaSet {
    fn new(certs: Vec<X509>) -> std::result::Result<CaSet, String> {
        let mut fingerprints = Vec::with_capacity(certs.len());
        for cert in &certs {
            let digest = cert
                .digest(MessageDigest::sha256())
                .map_err(|e| format!("cannot fingerprint CA certificate: {e}"))?;
            let mut fp = [0u8; 32];
            fp.copy_from_slice(&digest);
            fingerprints.push(fp);
        }
        fingerprints.sort_unstable();
        fingerprints.dedup();
        Ok(CaSet {
            certs: certs.into(),
            fingerprints: fingerprints.into(),
        })
    }
}

/// An upstream to connect to, with every setting that shapes the connection.
///
/// Cheap to clone (one `Arc`). Setters consume and return the peer; a setting that cannot be
/// used (bad SNI, unknown curve, unreadable CA) does not panic: it is reported as
/// `InvalidConfig` by [`Peer::key`] and therefore by `Connector::get`.
///
/// # Defaults
/// - TLS peers verify the certificate chain and the hostname (`with_verify_cert(true)`,
///   `with_verify_hostname(true)`) against the system roots unless [`Peer::with_ca`] is given.
/// - No ALPN, no client certificate, no alternative CN, OpenSSL's default groups.
/// - Timeouts come from the connector ([`crate::ConnectorOptions`]) unless set here.
/// - `TCP_NODELAY` on, no TCP keepalive, no bind address, session resumption on.
#[must_use]
#[derive(Clone)]
pub struct Peer {
    inner: Arc<PeerInner>,
}

#[derive(Clone)]
pub(crate) struct PeerInner {
    pub(crate) address: PeerAddress,
    /// `None` for plaintext peers; `Some("")` is TLS without SNI (the chain is still verified
    /// when `verify_cert`; only the name check is skipped).
    pub(crate) sni: Option<String>,
    pub(crate) verify_cert: bool,
    pub(crate) verify_hostname: bool,
    pub(crate) alternative_cn: Option<String>,
    pub(crate) ca: Option<CaSet>,
    pub(crate) client_cert: Option<CertKey>,
    pub(crate) alpn: Option<Alpn>,
    pub(crate) curves: Option<String>,
    pub(crate) bind_to: Option<SocketAddr>,
    pub(crate) group: Option<String>,
    pub(crate) connection_timeout: Option<Duration>,
    pub(crate) total_connection_timeout: Option<Duration>,
    pub(crate) idle_timeout: Option<Duration>,
    pub(crate) tcp_keepalive: Option<TcpKeepalive>,
    pub(crate) tcp_nodelay: bool,
    pub(crate) session_resumption: bool,
    pub(crate) min_idle: usize,
    pub(crate) name: Option<String>,
    /// The first unusable setting, reported by `key()`.
    pub(crate) invalid: Option<String>,
    key: OnceLock<Identity>,
    /// The pool entry this peer's key found in the first connector that checked it out:
    /// later checkouts there go straight to it, without the key map (see
    /// `Pool::checkout`). Shared by clones of the peer; reset by every edit.
    key_pool: OnceLock<KeyPoolLink>,
}

/// The key, computed once, and beside it what the pool's hit path reads from the peer besides
/// the key: one cache line instead of two when thousands of peers are in use.
#[derive(Clone)]
struct Identity {
    key: PeerKey,
    idle_timeout: Option<Duration>,
}

impl Peer {
    fn with_address(address: PeerAddress, sni: Option<String>) -> Peer {
        Peer {
            inner: Arc::new(PeerInner {
                address,
                sni,
                verify_cert: true,
                verify_hostname: true,
                alternative_cn: None,
                ca: None,
                client_cert: None,
                alpn: None,
                curves: None,
                bind_to: None,
                group: None,
                connection_timeout: None,
                total_connection_timeout: None,
                idle_timeout: None,
                tcp_keepalive: None,
                tcp_nodelay: true,
                session_resumption: true,
                min_idle: 0,
                name: None,
                invalid: None,
                key: OnceLock::new(),
                key_pool: OnceLock::new(),
            }),
        }
    }

    /// A plaintext TCP peer.
    pub fn tcp(addr: SocketAddr) -> Peer {
        Peer::with_address(PeerAddress::Tcp(addr), None)
    }

    /// A TLS peer over TCP. `sni` is sent as the server name and verified against the
    /// certificate. An empty `sni` sends no server name and skips the *name* check only: the
    /// chain is still verified unless [`Peer::with_verify_cert`] turns that off (the reference
    /// skips all verification here "like nginx", which silently drops trust in a peer whose
    /// host name came out empty from configuration).
    pub fn tls(addr: SocketAddr, sni: impl Into<String>) -> Peer {
        Peer::with_address(PeerAddress::Tcp(addr), Some(sni.into()))
    }

    /// A plaintext peer on a Unix-domain stream socket.
    pub fn unix(path: impl AsRef<Path>) -> Peer {
        Peer::with_address(PeerAddress::Unix(path.as_ref().to_path_buf()), None)
    }

    /// A TLS peer on a Unix-domain stream socket; `sni` as in [`Peer::tls`].
    pub fn unix_tls(path: impl AsRef<Path>, sni: impl Into<String>) -> Peer {
        Peer::with_address(
            PeerAddress::Unix(path.as_ref().to_path_buf()),
            Some(sni.into()),
        )
    }

    fn edit(mut self, f: impl FnOnce(&mut PeerInner)) -> Peer {
        let inner = Arc::make_mut(&mut self.inner);
        f(inner);
        // Any change invalidates the cached identity and pool entry.
        inner.key = OnceLock::new();
        inner.key_pool = OnceLock::new();
        self
    }

    fn edit_checked(
        self,
        f: impl FnOnce(&mut PeerInner) -> std::result::Result<(), String>,
    ) -> Peer {
        self.edit(|inner| {
            if let Err(problem) = f(inner) {
                inner.invalid.get_or_insert(problem);
            }
        })
    }

    /// Trust only these CA certificates for this peer instead of the system roots.
    ///
    /// Defaults to the system roots. The verify store is built once per distinct CA set by the
    /// connector and reused for every handshake.
    pub fn with_ca(self, cas: Vec<X509>) -> Peer {
        self.edit_checked(|inner| {
            if cas.is_empty() {
                return Err("CA list is empty".to_string());
            }
            inner.ca = Some(CaSet::new(cas)?);
            Ok(())
        })
    }

    /// Present this client certificate (mutual TLS). Defaults to none.
    pub fn with_client_cert(self, cert: CertKey) -> Peer {
        self.edit(|inner| inner.client_cert = Some(cert))
    }

    /// Offer these application protocols. Defaults to no ALPN extension.
    pub fn with_alpn(self, alpn: Alpn) -> Peer {
        self.edit(|inner| inner.alpn = Some(alpn))
    }

    /// Verify the server's certificate chain. Defaults to `true`.
    ///
    /// Turning this off accepts any certificate: only for tests and trusted networks.
    pub fn with_verify_cert(self, verify: bool) -> Peer {
        self.edit(|inner| inner.verify_cert = verify)
    }

    /// Check that the certificate names the SNI (or the alternative CN). Defaults to `true`.
    pub fn with_verify_hostname(self, verify: bool) -> Peer {
        self.edit(|inner| inner.verify_hostname = verify)
    }

    /// Also accept a certificate for this name. Defaults to none.
    pub fn with_alternative_cn(self, cn: impl Into<String>) -> Peer {
        let cn = cn.into();
        self.edit_checked(|inner| {
            check_hostname("alternative CN", &cn)?;
            inner.alternative_cn = Some(cn);
            Ok(())
        })
    }

    /// Restrict the key-exchange groups, in OpenSSL syntax (`"X25519:P-256"`).
    /// Defaults to OpenSSL's list. An unknown name is `InvalidConfig`.
    ///
    /// With TLS 1.2 the list also tells the server which curves its ECDSA certificate may use
    /// (RFC 8422), so leaving out the certificate's curve can fail the handshake.
    pub fn with_curves(self, curves: impl Into<String>) -> Peer {
        let curves = curves.into();
        self.edit_checked(|inner| {
            check_curves(&curves)?;
            inner.curves = Some(curves);
            Ok(())
        })
    }

    /// Bound on the TCP connect. Defaults to the connector's `connection_timeout`. Zero is
    /// `InvalidConfig`.
    pub fn with_connection_timeout(self, timeout: Duration) -> Peer {
        self.edit_checked(|inner| {
            check_timeout("connection timeout", timeout)?;
            inner.connection_timeout = Some(timeout);
            Ok(())
        })
    }

    /// Bound on TCP connect plus TLS handshake. Defaults to the connector's
    /// `total_connection_timeout`. Zero is `InvalidConfig`.
    pub fn with_total_connection_timeout(self, timeout: Duration) -> Peer {
        self.edit_checked(|inner| {
            check_timeout("total connection timeout", timeout)?;
            inner.total_connection_timeout = Some(timeout);
            Ok(())
        })
    }

    /// How long a connection to this peer may sit idle in the pool. Defaults to the
    /// connector's `idle_timeout`.
    ///
    /// The idle timeout is not part of the pool key, so peers with different timeouts share
    /// connections. A checkout uses the smaller of this peer's timeout and the timeout of the
    /// peer that dialled the connection: a peer whose upstream drops idle connections early
    /// never gets one idle longer than it allows (an older one is closed instead), and a
    /// longer timeout never keeps alive a connection whose dialling peer would have closed it.
    /// Any duration is accepted; `Duration::MAX` means "never idle out".
    pub fn with_idle_timeout(self, timeout: Duration) -> Peer {
        self.edit(|inner| inner.idle_timeout = Some(timeout))
    }

    /// Bind the local end of the TCP socket to this address. Defaults to none (the OS picks).
    ///
    /// With port 0 the port is chosen at connect, not reserved at bind
    /// (`IP_BIND_ADDRESS_NO_PORT` on Linux), so source ports are shared across destinations
    /// and a busy proxy does not run out of them. A bind the OS refuses (address in use, not
    /// an address of this host) or an address of the other IP family than the peer's is
    /// `InvalidConfig` at `get`, not a retryable connect error.
    pub fn with_bind_to(self, addr: SocketAddr) -> Peer {
        self.edit(|inner| inner.bind_to = Some(addr))
    }

    /// Enable TCP keepalive probes. Defaults to off. The kernel counts in whole seconds:
    /// `idle` and `interval` must be 1 to 32,767 s and `count` 1 to 127 (Linux's limits), else
    /// `InvalidConfig`.
    pub fn with_tcp_keepalive(self, keepalive: TcpKeepalive) -> Peer {
        self.edit_checked(|inner| {
            check_keepalive(&keepalive)?;
            inner.tcp_keepalive = Some(keepalive);
            Ok(())
        })
    }

    /// Set `TCP_NODELAY`. Defaults to `true`: proxies write whole requests and should not
    /// wait for Nagle's algorithm.
    pub fn with_tcp_nodelay(self, nodelay: bool) -> Peer {
        self.edit(|inner| inner.tcp_nodelay = nodelay)
    }

    /// Offer cached TLS sessions to this peer. Defaults to `true` (and the connector's
    /// `session_cache_size` must be non-zero).
    pub fn with_session_resumption(self, enabled: bool) -> Peer {
        self.edit(|inner| inner.session_resumption = enabled)
    }

    /// Once this peer's key has been used (a `get` or `preconnect`), keep at least `n` idle
    /// connections for it, dialled in the background. Defaults to 0 (none). Not part of the
    /// pool key.
    ///
    /// The connector's one background task (the reaper) tops the key up every
    /// `reap_interval` after checkouts took idle connections away, dialling at most 16
    /// connections per pass across all keys. The target is capped by `max_idle_per_peer`,
    /// and the dials count against `max_connections_per_peer` (top-ups stop at the cap: they
    /// never make a `get` wait) and stop while `max_idle_total` is reached. After a failed
    /// dial the key waits 100 ms before trying again, doubling up to 10 s, and dials one
    /// connection at a time until one succeeds: an upstream that is down is not hammered.
    /// Topping up stops once the key has not been used for its idle timeout (the idle
    /// connections then expire as usual). When peers with different `min_idle` share a key,
    /// the one of the latest `get` counts.
    ///
    /// Cost: one TCP connect and TLS handshake per connection topped up, on the connector's
    /// runtime, even if no request ever uses it.
    ///
    /// Idle pool connections are byte streams: they serve `get` and HTTP/1.1 requests of
    /// [`crate::http::HttpConnector`], never HTTP/2, whose connections are shared outside the
    /// idle pool. Do not set it on a peer used over HTTP/2 (`Alpn::H2`, or `Alpn::H2H1` with
    /// a server selecting `h2`): its top-ups would be wasted handshakes (and the server's
    /// SETTINGS on them would close them as unexpected data); use
    /// `HttpConnector::preconnect` to warm HTTP/2 connections instead.
    pub fn with_min_idle(self, n: usize) -> Peer {
        self.edit(|inner| inner.min_idle = n)
    }

    /// Keep this peer's connections apart from every other peer's, even with equal settings
    /// (for example one pool per tenant). Defaults to none.
    pub fn with_group(self, group: impl Into<String>) -> Peer {
        self.edit(|inner| inner.group = Some(group.into()))
    }

    /// A name for the `peer` metric label (when the connector enables it). Defaults to the
    /// address. Not part of the pool key.
    pub fn with_name(self, name: impl Into<String>) -> Peer {
        self.edit(|inner| inner.name = Some(name.into()))
    }

    /// The address.
    pub fn address(&self) -> &PeerAddress {
        &self.inner.address
    }

    /// The SNI, `None` for plaintext peers.
    pub fn sni(&self) -> Option<&str> {
        self.inner.sni.as_deref()
    }

    /// Whether this peer speaks TLS.
    pub fn is_tls(&self) -> bool {
        self.inner.sni.is_some()
    }

    /// The name used for the `peer` metric label: the one given, else the address.
    pub fn name(&self) -> String {
        match &self.inner.name {
            Some(name) => name.clone(),
            None => self.inner.address.to_string(),
        }
    }

    pub(crate) fn settings(&self) -> &PeerInner {
        &self.inner
    }

    /// The exact-match identity of this peer's connections, computed once and cached.
    ///
    /// # Errors
    /// `InvalidConfig` naming the first unusable setting.
    pub fn key(&self) -> Result<&PeerKey> {
        if let Some(identity) = self.inner.key.get() {
            return Ok(&identity.key);
        }
        if let Some(problem) = &self.inner.invalid {
            return Err(Error::config(problem.clone()).with_peer(self.describe()));
        }
        if let Some(sni) = &self.inner.sni {
            if !sni.is_empty() {
                check_hostname("SNI", sni)
                    .map_err(|p| Error::config(p).with_peer(self.describe()))?;
            }
        }
        let identity = self.inner.key.get_or_init(|| Identity {
            key: PeerKey::compute(&self.inner),
            idle_timeout: self.inner.idle_timeout,
        });
        Ok(&identity.key)
    }

    /// The pool entry cached by [`Peer::cache_key_pool`], if any.
    pub(crate) fn cached_key_pool(&self) -> Option<&KeyPoolLink> {
        self.inner.key_pool.get()
    }

    /// Remembers the pool entry of this peer's key, unless one is remembered already (the
    /// first connector's stays).
    pub(crate) fn cache_key_pool(&self, link: impl FnOnce() -> KeyPoolLink) {
        if self.inner.key_pool.get().is_none() {
            let _ = self.inner.key_pool.set(link());
        }
    }

    /// A copy of this peer that shares nothing with it, for the pool entry to keep: an entry
    /// holding a peer whose cache holds the entry would never be freed.
    pub(crate) fn detached(&self) -> Peer {
        let mut inner = (*self.inner).clone();
        inner.key_pool = OnceLock::new();
        Peer {
            inner: Arc::new(inner),
        }
    }

    /// The idle timeout set on this peer, if any (read next to the cached key once `key()` ran).
    pub(crate) fn idle_timeout(&self) -> Option<Duration> {
        self.inner
            .key
            .get()
            .map_or(self.inner.idle_timeout, |identity| identity.idle_timeout)
    }

    /// `address` or `address (SNI "name")`, for messages.
    pub(crate) fn describe(&self) -> String {
        match &self.inner.sni {
            Some(sni) => format!("{} SNI {:?}", self.inner.address, sni),
            None => self.inner.address.to_string(),
        }
    }
}

impl fmt::Debug for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.inner;
        f.debug_struct("Peer")
            .field("address", &s.address)
            .field("sni", &s.sni)
            .field("verify_cert", &s.verify_cert)
            .field("verify_hostname", &s.verify_hostname)
            .field("alternative_cn", &s.alternative_cn)
            .field("ca", &s.ca.as_ref().map(|c| c.fingerprints.len()))
            .field("client_cert", &s.client_cert)
            .field("alpn", &s.alpn)
            .field("curves", &s.curves)
            .field("group", &s.group)
            .finish_non_exhaustive()
    }
}

/// Rejects names OpenSSL would choke on or that cannot be a DNS name or IP literal.
fn check_hostname(what: &str, name: &str) -> std::result::Result<(), String> {
    if name.len() > 255 {
        return Err(format!(
            "{what} is {} bytes long; at most 255 allowed",
            name.len()
        ));
    }
    if let Some(bad) = name
        .bytes()
        .find(|b| !b.is_ascii_graphic() || *b == b'/' || *b == b'\\')
    {
        return Err(format!(
            "{what} {name:?} contains byte 0x{bad:02x}; only printable ASCII without '/' is allowed (use punycode for IDNs)"
        ));
    }
    Ok(())
}

/// A zero dial timeout can never succeed; worse, it would fail as a (retryable) timeout.
fn check_timeout(what: &str, timeout: Duration) -> std::result::Result<(), String> {
    if timeout.is_zero() {
        return Err(format!("{what} must be greater than zero"));
    }
    Ok(())
}

/// Linux refuses keepalive values outside these ranges with `EINVAL` at every dial, which
/// would surface as a (retryable) connect error instead of a configuration mistake.
fn check_keepalive(ka: &TcpKeepalive) -> std::result::Result<(), String> {
    const MAX_SECS: u64 = 32_767;
    for (what, d) in [("idle", ka.idle), ("interval", ka.interval)] {
        if !(1..=MAX_SECS).contains(&d.as_secs()) {
            return Err(format!(
                "TCP keepalive {what} {d:?} must be 1 to {MAX_SECS} whole seconds"
            ));
        }
    }
    if !(1..=127).contains(&ka.count) {
        return Err(format!("TCP keepalive count {} must be 1 to 127", ka.count));
    }
    Ok(())
}

/// Validates a groups list once, at configuration time, so a typo fails with a message naming
/// the list instead of failing every handshake.
fn check_curves(curves: &str) -> std::result::Result<(), String> {
    if curves.is_empty() || curves.contains('\0') {
        return Err(format!("curves {curves:?}: list is empty or contains NUL"));
    }
    let mut ctx = openssl::ssl::SslContext::builder(openssl::ssl::SslMethod::tls_client())
        .map_err(|e| format!("cannot create an SSL context to check curves: {e}"))?;
    ctx.set_groups_list(curves)
        .map_err(|e| format!("curves {curves:?} not recognised by OpenSSL: {e}"))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}
