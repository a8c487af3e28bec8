//! The TLS handshake: one shared `SslConnector`, per-connection settings from the peer.

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};

use dashmap::DashMap;
use openssl::asn1::Asn1Time;
use openssl::ex_data::Index;
use openssl::ssl::{
    ErrorCode, Ssl, SslConnector, SslMethod, SslSessionCacheMode, SslVerifyMode, SslVersion,
};
use openssl::x509::store::{X509Store, X509StoreBuilder};
use openssl::x509::verify::X509CheckFlags;
use openssl::x509::X509VerifyResult;
use tokio::time::Instant;
use tokio_openssl::SslStream;

use crate::connect::openssl_ext;
use crate::connect::tcp::RawStream;
use crate::error::{Error, ErrorKind, Result};
use crate::key::PeerKey;
use crate::peer::{CaSet, Peer};
use crate::session_cache::{Origin, SessionCache};
use crate::stream::SslDigest;

/// TLS 1.2 ciphers: forward-secret AEADs and CBC suites, nothing weak. TLS 1.3 suites are
/// all acceptable and keep OpenSSL's default.
const CIPHER_LIST: &str =
    "HIGH:!aNULL:!eNULL:!MD5:!SHA1:!3DES:!DES:!RC4:!IDEA:!SEED:!CAMELLIA:!aDSS:!SRP:!PSK:!kRSA";
/// Signature algorithms: no SHA-1 (nor MD5); RSA-PSS, ECDSA and EdDSA with SHA-2.
const SIGALGS: &str = "ECDSA+SHA256:ECDSA+SHA384:ECDSA+SHA512:ed25519:ed448:\
rsa_pss_rsae_sha256:rsa_pss_rsae_sha384:rsa_pss_rsae_sha512:\
rsa_pss_pss_sha256:rsa_pss_pss_sha384:rsa_pss_pss_sha512:RSA+SHA256:RSA+SHA384:RSA+SHA512";
/// `X509_V_ERR_INVALID_CALL`: the verify result was never set (no verification ran).
const X509_V_ERR_INVALID_CALL: i32 = openssl_sys::X509_V_ERR_INVALID_CALL;

/// CA sets whose verify store is kept built. Beyond it, one cached store is dropped for each
/// new one: rebuilding a store costs microseconds, while a connector fed ever-new CA sets
/// (per-tenant configuration, say) must not grow without bound.
const MAX_CA_STORES: usize = 256;

/// Distinct handshake outcomes whose [`SslDigest`] is kept for sharing. Beyond it, one is
/// dropped for each new one (connections keep theirs): a connector talking to more distinct
/// certificates than this only shares less.
const MAX_DIGESTS: usize = 1024;

/// What the new-session callback needs to know about a connection: which peer key a session
/// belongs to, and where its authentication comes from.
struct SessionTag {
    key: PeerKey,
    /// The origin of the session offered for resumption; a resumed connection's new sessions
    /// (TLS 1.3 tickets) inherit it.
    offered: Option<Origin>,
    /// When this handshake started: the origin of a full handshake's sessions.
    started: std::time::Instant,
    /// Whether the chain is verified (its expiry then bounds the sessions).
    verify_cert: bool,
}

/// Where the [`SessionTag`] is attached to each `SSL`. One index for the process: OpenSSL
/// never frees them.
fn session_tag_index() -> Result<Index<Ssl, SessionTag>> {
    static INDEX: OnceLock<std::result::Result<Index<Ssl, SessionTag>, String>> = OnceLock::new();
    INDEX
        .get_or_init(|| Ssl::new_ex_index().map_err(|e| e.to_string()))
        .clone()
        .map_err(|e| Error::internal(format!("cannot allocate SSL ex_data index: {e}")))
}

/// Performs client handshakes for one [`crate::Connector`].
pub(crate) struct TlsConnector {
    connector: SslConnector,
    /// Verify stores, built once per distinct CA set (by fingerprints) and shared.
    stores: DashMap<Arc<[[u8; 32]]>, Arc<X509Store>>,
    sessions: Option<Arc<SessionCache>>,
    tag_index: Index<Ssl, SessionTag>,
    /// One [`SslDigest`] per distinct outcome, shared by every connection that negotiated it:
    /// pooled connections to one upstream all hold the same digest instead of a copy each
    /// (about 300 bytes of the idle footprint per connection; BENCHMARKS.md section 4).
    digests: DashMap<DigestKey, Arc<SslDigest>>,
}

/// Everything an [`SslDigest`] is computed from, without its allocations: the leaf
/// certificate (by SHA-256; its organization and serial number follow from it), the version
/// and cipher (OpenSSL's static names), the ALPN protocol and whether the session was reused.
#[derive(Clone, PartialEq, Eq, Hash)]
struct DigestKey {
    cert: Option<[u8; 32]>,
    version: &'static str,
    cipher: &'static str,
    alpn: Option<Box<[u8]>>,
    session_reused: bool,
}

impl std::fmt::Debug for TlsConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConnector")
            .field("ca_stores", &self.stores.len())
            .field("session_cache", &self.sessions)
            .finish_non_exhaustive()
    }
}

/// A finished handshake.
pub(crate) struct Handshake {
    pub(crate) stream: SslStream<RawStream>,
    pub(crate) resumed: bool,
    /// What it negotiated, shared with earlier connections that negotiated the same.
    pub(crate) digest: Arc<SslDigest>,
}

impl TlsConnector {
    /// Builds the shared context: TLS 1.2 minimum, no weak ciphers or SHA-1 signatures, the
    /// system roots, and (when `session_cache_size > 0`) a client session cache fed by the
    /// new-session callback.
    pub(crate) fn new(
        session_cache_size: usize,
        session_max_auth_age: std::time::Duration,
    ) -> Result<TlsConnector> {
        let tls_err = |what: &str, e: openssl::error::ErrorStack| {
            Error::internal(format!("cannot build the TLS context ({what}): {e}"))
        };
        let mut builder =
            SslConnector::builder(SslMethod::tls_client()).map_err(|e| tls_err("context", e))?;
        builder
            .set_min_proto_version(Some(SslVersion::TLS1_2))
            .map_err(|e| tls_err("min version", e))?;
        builder
            .set_cipher_list(CIPHER_LIST)
            .map_err(|e| tls_err("ciphers", e))?;
        builder
            .set_sigalgs_list(SIGALGS)
            .map_err(|e| tls_err("signature algorithms", e))?;
        // Read whole records (and whatever follows) in one read instead of a 5-byte header
        // read, then the body; the liveness check accounts for the bytes this buffers.
        builder.set_read_ahead(true);
        let tag_index = session_tag_index()?;
        let sessions = if session_cache_size > 0 {
            let cache = Arc::new(SessionCache::new(session_cache_size, session_max_auth_age));
            let feed = Arc::clone(&cache);
            // CLIENT turns the callback on; NO_INTERNAL keeps OpenSSL's own (unbounded,
            // hostname-unaware) store out of the way.
            builder.set_session_cache_mode(
                SslSessionCacheMode::CLIENT | SslSessionCacheMode::NO_INTERNAL,
            );
            builder.set_new_session_callback(move |ssl, session| {
                let Some(tag) = ssl.ex_data(tag_index) else {
                    return;
                };
                let origin = if ssl.session_reused() {
                    // A ticket renewed on a resumed connection: authenticated no later than
                    // the session it renews. (We only resume what we offered.)
                    let Some(origin) = tag.offered else { return };
                    origin
                } else {
                    Origin {
                        authenticated: tag.started,
                        not_after: if tag.verify_cert {
                            chain_not_after(ssl)
                        } else {
                            None
                        },
                    }
                };
                // Cache a private copy: `session` stays attached to this connection, and
                // OpenSSL marks a connection's session not resumable on a fatal alert, which
                // must not spoil the cached one.
                if let Ok(copy) = openssl_ext::dup_session(&session) {
                    feed.put(tag.key.clone(), copy, origin);
                }
            });
            Some(cache)
        } else {
            builder.set_session_cache_mode(SslSessionCacheMode::OFF);
            None
        };
        Ok(TlsConnector {
            connector: builder.build(),
            stores: DashMap::new(),
            sessions,
            tag_index,
            digests: DashMap::new(),
        })
    }

    fn store_for(&self, ca: &CaSet) -> Result<Arc<X509Store>> {
        if let Some(store) = self.stores.get(&ca.fingerprints) {
            return Ok(Arc::clone(&store));
        }
        let mut builder = X509StoreBuilder::new()
            .map_err(|e| Error::internal(format!("cannot create a verify store: {e}")))?;
        for cert in ca.certs.iter() {
            builder.add_cert(cert.clone()).map_err(|e| {
                Error::config(format!(
                    "cannot add CA certificate to the verify store: {e}"
                ))
            })?;
        }
        let store = Arc::new(builder.build());
        if self.stores.len() >= MAX_CA_STORES {
            let victim = self.stores.iter().next().map(|e| e.key().clone());
            if let Some(victim) = victim {
                self.stores.remove(&victim);
            }
        }
        Ok(Arc::clone(
            &self.stores.entry(ca.fingerprints.clone()).or_insert(store),
        ))
    }

    /// Runs the client handshake on `raw` until `deadline`.
    ///
    /// # Errors
    /// `InvalidCert` when verification failed, `TlsHandshakeTimedout` past the deadline,
    /// `TlsHandshakeFailure` for everything else; `InvalidConfig` if the peer's settings could
    /// not be applied. Messages name the peer and carry OpenSSL's reason.
    ///
    /// # Cancel safety
    /// Dropping the future drops the half-open connection; nothing is cached from it.
    pub(crate) async fn handshake(
        &self,
        raw: RawStream,
        peer: &Peer,
        key: &PeerKey,
        deadline: Instant,
        resume: bool,
    ) -> Result<Handshake> {
        let s = peer.settings();
        let sni = s.sni.as_deref().unwrap_or("");
        let config_err = |what: &str, e: openssl::error::ErrorStack| {
            Error::config(format!("cannot apply {what}: {e}")).with_peer(peer.describe())
        };
        let mut cfg = self
            .connector
            .configure()
            .map_err(|e| Error::internal(format!("cannot create SSL: {e}")))?;

        if let Some(ca) = &s.ca {
            let store = self.store_for(ca)?;
            openssl_ext::set_verify_cert_store(&mut cfg, &store)
                .map_err(|e| config_err("CA store", e))?;
        }
        if let Some(cert) = &s.client_cert {
            cfg.set_certificate(cert.leaf())
                .map_err(|e| config_err("client certificate", e))?;
            cfg.set_private_key(cert.key())
                .map_err(|e| config_err("client key", e))?;
            for intermediate in cert.intermediates() {
                cfg.add_chain_cert(intermediate.clone())
                    .map_err(|e| config_err("client intermediate certificate", e))?;
            }
        }
        if let Some(curves) = &s.curves {
            openssl_ext::set_groups_list(&mut cfg, curves).map_err(|e| config_err("curves", e))?;
        }

        if sni.is_empty() {
            // No name to send. Unlike the reference ("like nginx"), still verify the chain:
            // a host name that came out empty from configuration must not silently turn off
            // trust; only `with_verify_cert(false)` does that.
            cfg.set_use_server_name_indication(false);
        }
        if s.verify_cert {
            // With an empty SNI there is no name to check, only the chain.
            if s.verify_hostname && !sni.is_empty() {
                let param = cfg.param_mut();
                // What OpenSSL's own hostname setup would set: "f*.example.com" must not
                // match "foo.example.com".
                param.set_hostflags(X509CheckFlags::NO_PARTIAL_WILDCARDS);
                if let Ok(ip) = sni.parse::<IpAddr>() {
                    param
                        .set_ip(ip)
                        .map_err(|e| config_err("IP to verify", e))?;
                } else {
                    for host in accepted_hostnames(sni, s.alternative_cn.as_deref()) {
                        openssl_ext::add_host(param, &host)
                            .map_err(|e| config_err("hostname to verify", e))?;
                    }
                }
            }
            cfg.set_verify(SslVerifyMode::PEER);
        } else {
            cfg.set_verify(SslVerifyMode::NONE);
        }
        // Hostnames were added above; OpenSSL's own setting would replace that list with the
        // SNI alone.
        cfg.set_verify_hostname(false);

        if let Some(alpn) = &s.alpn {
            cfg.set_alpn_protos(alpn.to_wire())
                .map_err(|e| config_err("ALPN", e))?;
        }

        let mut offered = None;
        if resume {
            if let Some(cache) = &self.sessions {
                let mut tag = SessionTag {
                    key: key.clone(),
                    offered: None,
                    started: std::time::Instant::now(),
                    verify_cert: s.verify_cert,
                };
                if let Some((session, origin)) = cache.get(key) {
                    // Offer a copy, never the cached session itself: a TLS 1.3 client marks
                    // the session it resumed not resumable at the end of the handshake
                    // ("use tickets once"), which would stop every later dial (a burst
                    // included) from offering it. A session that cannot be copied or set is
                    // simply not offered.
                    let copy = openssl_ext::dup_session(&session);
                    if copy.is_ok_and(|copy| openssl_ext::set_session(&mut cfg, &copy).is_ok()) {
                        offered = Some(session);
                        tag.offered = Some(origin);
                    }
                }
                cfg.set_ex_data(self.tag_index, tag);
            }
        }

        let ssl = cfg.into_ssl(sni).map_err(|e| config_err("SNI", e))?;
        let mut stream = SslStream::new(ssl, raw)
            .map_err(|e| Error::internal(format!("cannot create TLS stream: {e}")))?;

        let outcome = tokio::time::timeout_at(deadline, Pin::new(&mut stream).connect()).await;
        if outcome.as_ref().map_or(true, |r| r.is_err()) {
            if let (Some(_), Some(cache)) = (&offered, &self.sessions) {
                // RFC 5246 §7.2.2: a session must not be resumed after a fatal alert; and a
                // reset or a timeout while resuming says nothing good about it either.
                cache.resumption_failed(key);
            }
        }
        // The next dial makes a full handshake (the session is forgotten), so a failed
        // resumption is worth retrying, unless the server declined the session and the full
        // handshake it fell back to found a bad certificate: that fails again.
        let resuming = offered.is_some();
        let failed = |err: Error| {
            let err = err.with_peer(peer.describe());
            if !resuming {
                return err;
            }
            let err = err.with_note(" (while offering a cached session, now forgotten)");
            if err.kind() == ErrorKind::InvalidCert {
                err
            } else {
                err.with_transient()
            }
        };
        match outcome {
            Err(_) => Err(failed(Error::new(
                ErrorKind::TlsHandshakeTimedout,
                "handshake did not finish within the total connection timeout",
            ))),
            Ok(Err(e)) => Err(failed(classify_failure(&stream, &e, s.verify_cert))),
            Ok(Ok(())) => {
                let resumed = stream.ssl().session_reused();
                if let (Some(session), false, Some(cache)) = (&offered, resumed, &self.sessions) {
                    cache.discard(key, session);
                }
                let digest = self.digest_for(stream.ssl());
                Ok(Handshake {
                    stream,
                    resumed,
                    digest,
                })
            }
        }
    }
}

/// Shared digests.
impl TlsConnector {
    /// The digest of `ssl`'s finished handshake: the one already kept for the same outcome
    /// if there is one, else a new one, kept for the next connection.
    fn digest_for(&self, ssl: &openssl::ssl::SslRef) -> Arc<SslDigest> {
        let cert = ssl.peer_certificate().and_then(|c| {
            let digest = c.digest(openssl::hash::MessageDigest::sha256()).ok()?;
            <[u8; 32]>::try_from(&digest[..]).ok()
        });
        let key = DigestKey {
            cert,
            version: ssl.version_str(),
            cipher: ssl.current_cipher().map_or("", |c| c.name()),
            alpn: ssl.selected_alpn_protocol().map(Box::from),
            session_reused: ssl.session_reused(),
        };
        if let Some(digest) = self.digests.get(&key) {
            return Arc::clone(&digest);
        }
        let digest = Arc::new(SslDigest::from_ssl(ssl));
        if self.digests.len() >= MAX_DIGESTS {
            let victim = self.digests.iter().next().map(|e| e.key().clone());
            if let Some(victim) = victim {
                self.digests.remove(&victim);
            }
        }
        Arc::clone(&self.digests.entry(key).or_insert(digest))
    }
}

/// Forgetting sessions on demand, for `Connector::evict`.
impl TlsConnector {
    /// Forgets the session cached for `key`: its next handshake authenticates in full. A
    /// handshake already in flight may still cache the session it ends with.
    pub(crate) fn forget_session(&self, key: &PeerKey) {
        if let Some(cache) = &self.sessions {
            cache.remove(key);
        }
    }

    /// Forgets every cached session.
    pub(crate) fn forget_all_sessions(&self) {
        if let Some(cache) = &self.sessions {
            cache.clear();
        }
    }
}

/// A failed chain or hostname check is `InvalidCert`; every other failure is a handshake
/// failure (a reset or EOF mid-handshake included: the server is not speaking TLS to us).
///
/// The verify result only counts when verification was on: with it off, OpenSSL still
/// records what the chain check found (an untrusted root, say), and a later, unrelated
/// failure would be mislabelled `InvalidCert`.
fn classify_failure(
    stream: &SslStream<RawStream>,
    e: &openssl::ssl::Error,
    verifying: bool,
) -> Error {
    let verify = stream.ssl().verify_result();
    let verify_failed =
        verifying && verify != X509VerifyResult::OK && verify.as_raw() != X509_V_ERR_INVALID_CALL;
    if e.code() == ErrorCode::SSL && verify_failed {
        return Error::new(ErrorKind::InvalidCert, verify.error_string().to_string());
    }
    let (reason, transient) = match (e.ssl_error(), e.io_error()) {
        (Some(stack), _) => (stack.to_string(), false),
        (None, Some(io)) => (format!("I/O error during handshake: {io}"), true),
        // A clean close mid-handshake is usually deliberate (a server refusing our offer),
        // so unlike a reset it is not worth retrying.
        (None, None) if e.code() == ErrorCode::SYSCALL => (
            "the server closed the connection during the handshake".to_string(),
            false,
        ),
        (None, None) => (e.to_string(), false),
    };
    let err = Error::new(ErrorKind::TlsHandshakeFailure, reason);
    // A reset mid-handshake is the network's doing (a server restarting, a load
    // balancer dropping the connection), so a fresh attempt may well succeed.
    if transient {
        err.with_transient()
    } else {
        err
    }
}

/// Unix time of the earliest notAfter in the verified chain (leaf and issuers): a session
/// authenticated by that chain must not outlive any link of it. `None` if there is no chain.
fn chain_not_after(ssl: &openssl::ssl::SslRef) -> Option<i64> {
    let epoch = Asn1Time::from_unix(0).ok()?;
    let unix = |t: &openssl::asn1::Asn1TimeRef| {
        epoch
            .diff(t)
            .ok()
            .map(|d| i64::from(d.days) * 86_400 + i64::from(d.secs))
    };
    match ssl.verified_chain() {
        Some(chain) if !chain.is_empty() => chain.iter().filter_map(|c| unix(c.not_after())).min(),
        _ => ssl.peer_certificate().and_then(|c| unix(c.not_after())),
    }
}

/// The names a certificate may carry for this peer: the SNI, the alternative CN, and for each
/// the variant with underscores in the leftmost label replaced by `-` (underscores are not
/// valid in DNS hostnames, so certificates are issued for the dashed form).
pub(crate) fn accepted_hostnames(sni: &str, alternative_cn: Option<&str>) -> Vec<String> {
    let mut names = Vec::with_capacity(4);
    for name in std::iter::once(sni).chain(alternative_cn) {
        if name.is_empty() {
            continue;
        }
        names.push(name.to_string());
        if let Some(dashed) = replace_leftmost_underscores(name) {
            names.push(dashed);
        }
    }
    names
}

fn replace_leftmost_underscores(name: &str) -> Option<String> {
    let (first, rest) = name.split_once('.').unwrap_or((name, ""));
    if !first.contains('_') {
        return None;
    }
    let first = first.replace('_', "-");
    Some(if rest.is_empty() && !name.contains('.') {
        first
    } else {
        format!("{first}.{rest}")
    })
}

#[cfg(test)]
mod tests {
    use openssl::x509::X509;

    use super::*;

    /// A self-signed CA certificate with its own serial, so each makes a distinct CA set.
    fn ca_cert(key: &openssl::pkey::PKey<openssl::pkey::Private>, serial: u32) -> X509 {
        let mut name = openssl::x509::X509NameBuilder::new().unwrap();
        name.append_entry_by_text("CN", &format!("ca-{serial}"))
            .unwrap();
        let name = name.build();
        let mut b = openssl::x509::X509Builder::new().unwrap();
        b.set_version(2).unwrap();
        let serial = openssl::bn::BigNum::from_u32(serial).unwrap();
        b.set_serial_number(&serial.to_asn1_integer().unwrap())
            .unwrap();
        b.set_subject_name(&name).unwrap();
        b.set_issuer_name(&name).unwrap();
        b.set_pubkey(key).unwrap();
        b.set_not_before(&Asn1Time::days_from_now(0).unwrap())
            .unwrap();
        b.set_not_after(&Asn1Time::days_from_now(1).unwrap())
            .unwrap();
        b.sign(key, openssl::hash::MessageDigest::sha256()).unwrap();
        b.build()
    }

    #[test]
    fn the_ca_store_cache_is_bounded() {
        let group =
            openssl::ec::EcGroup::from_curve_name(openssl::nid::Nid::X9_62_PRIME256V1).unwrap();
        let key = openssl::pkey::PKey::from_ec_key(openssl::ec::EcKey::generate(&group).unwrap())
            .unwrap();
        let tls = TlsConnector::new(0, std::time::Duration::from_secs(1)).unwrap();
        let addr = "127.0.0.1:1".parse().unwrap();
        for serial in 0..(MAX_CA_STORES as u32 + 50) {
            let peer = Peer::tls(addr, "x").with_ca(vec![ca_cert(&key, serial)]);
            let ca = peer.settings().ca.clone().unwrap();
            tls.store_for(&ca).unwrap();
            assert!(tls.stores.len() <= MAX_CA_STORES);
        }
        assert_eq!(tls.stores.len(), MAX_CA_STORES);
    }

    #[test]
    fn underscore_variant_only_touches_leftmost_label() {
        assert_eq!(
            accepted_hostnames("a_b.c_d.test", Some("x_y")),
            vec!["a_b.c_d.test", "a-b.c_d.test", "x_y", "x-y"]
        );
        assert_eq!(accepted_hostnames("plain.test", None), vec!["plain.test"]);
    }
}
