//! Property tests over configuration input: PEM, ALPN, SNI, alternative CN, curves and whole
//! peers. Never a panic; an unusable setting is always `InvalidConfig` (and never dialled);
//! a usable one is accepted, and a peer built from usable settings really connects with them
//! (checked on what the upstream observed). Also: two peers share a pool key exactly when
//! every keyed setting is equal.
//!
//! `PROPTEST_CASES=N` changes the number of cases (CI uses the defaults below).

mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::OnceLock;
use std::time::Duration;

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use upstream_pool::{Alpn, CertKey, Connector, ConnectorOptions, ErrorKind, Peer, TcpKeepalive};

use support::certs::TestPki;
use support::server::{AlpnPolicy, ClientAuth, TestServer};

fn config(cases: u32) -> Config {
    Config {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(cases),
        // Failures print their minimal input; no regression files in the tree.
        failure_persistence: None,
        ..Config::default()
    }
}

fn addr() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, 9))
}

/// Whether the error is `InvalidConfig`; anything else (or a panic) fails the property.
fn is_invalid_config<T>(r: &Result<T, upstream_pool::Error>) -> bool {
    matches!(r, Err(e) if e.kind() == ErrorKind::InvalidConfig)
}

// --- names -----------------------------------------------------------------------------------

/// Host names a user may legitimately give: DNS names (underscores allowed, they are mapped
/// for verification), IPv4 and IPv6 literals.
fn good_hostname() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9_]([a-z0-9_-]{0,15})(\\.[a-z0-9]([a-z0-9-]{0,15}))(\\.[a-z]{2,6}){0,3}",
        "[A-Za-z0-9]{1,63}",
        any::<Ipv4Addr>().prop_map(|a| a.to_string()),
        any::<std::net::Ipv6Addr>().prop_map(|a| a.to_string()),
    ]
}

/// A byte no host name may carry: controls, space, DEL, path separators, non-ASCII.
fn bad_char() -> impl Strategy<Value = char> {
    prop_oneof![
        Just('\0'),
        Just(' '),
        Just('\t'),
        Just('\n'),
        Just('\r'),
        Just('\x7f'),
        Just('/'),
        Just('\\'),
        (0u8..0x20).prop_map(char::from),
        any::<char>().prop_filter("non-ASCII", |c| !c.is_ascii()),
    ]
}

/// A good name with one bad character inserted somewhere.
fn bad_hostname() -> impl Strategy<Value = String> {
    (good_hostname(), bad_char(), any::<prop::sample::Index>()).prop_map(|(name, bad, at)| {
        let chars: Vec<char> = name.chars().collect();
        let at = at.index(chars.len() + 1);
        chars[..at]
            .iter()
            .chain(std::iter::once(&bad))
            .chain(&chars[at..])
            .collect()
    })
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn good_sni_is_accepted(sni in good_hostname()) {
        prop_assert!(Peer::tls(addr(), sni).key().is_ok());
    }

    #[test]
    fn bad_sni_is_invalid_config(sni in bad_hostname()) {
        let peer = Peer::tls(addr(), sni);
        prop_assert!(is_invalid_config(&peer.key()));
    }

    #[test]
    fn overlong_sni_is_invalid_config(sni in "[a-z]{256,400}") {
        prop_assert!(is_invalid_config(&Peer::tls(addr(), sni).key()));
    }

    /// Anything at all: accepted or `InvalidConfig`, never a panic; and whatever is accepted
    /// holds no byte OpenSSL or a log line could misread.
    #[test]
    fn any_sni_is_accepted_or_invalid_config(sni in any::<String>()) {
        let peer = Peer::tls(addr(), sni.clone());
        let key = peer.key();
        prop_assert!(key.is_ok() || is_invalid_config(&key));
        if key.is_ok() {
            prop_assert!(sni.bytes().all(|b| b.is_ascii_graphic()), "accepted {sni:?}");
        }
    }

    #[test]
    fn alternative_cn_follows_the_same_rules(good in good_hostname(), bad in bad_hostname(), any in any::<String>()) {
        let peer = |cn: &str| Peer::tls(addr(), "localhost").with_alternative_cn(cn);
        prop_assert!(peer(&good).key().is_ok());
        prop_assert!(is_invalid_config(&peer(&bad).key()));
        let key = peer(&any).key().map(|_| ());
        prop_assert!(key.is_ok() || is_invalid_config(&key));
    }
}

// --- ALPN ------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(256))]

    /// Valid exactly when the list is non-empty and every name is 1..=255 bytes; the wire form
    /// is the length-prefixed concatenation.
    #[test]
    fn alpn_from_protocols(protocols in vec(vec(any::<u8>(), 0..300), 0..6)) {
        let valid = !protocols.is_empty() && protocols.iter().all(|p| (1..=255).contains(&p.len()));
        match Alpn::from_protocols(&protocols) {
            Ok(alpn) => {
                prop_assert!(valid, "accepted {protocols:?}");
                let mut wire = Vec::new();
                for p in &protocols {
                    wire.push(p.len() as u8);
                    wire.extend_from_slice(p);
                }
                prop_assert_eq!(alpn.to_wire(), &wire[..]);
                // A valid offer is a valid peer setting.
                prop_assert!(Peer::tls(addr(), "localhost").with_alpn(alpn).key().is_ok());
            }
            Err(e) => {
                prop_assert!(!valid, "rejected a valid list {protocols:?}: {e}");
                prop_assert_eq!(e.kind(), ErrorKind::InvalidConfig);
            }
        }
    }
}

// --- curves ----------------------------------------------------------------------------------

/// Group names OpenSSL 3 knows, in the spellings users write.
const GROUPS: &[&str] = &[
    "X25519",
    "X448",
    "P-256",
    "P-384",
    "P-521",
    "prime256v1",
    "secp384r1",
    "secp521r1",
];

/// A list of distinct groups (OpenSSL rejects a group named twice, rightly), in any order and
/// either spelling of the NIST curves.
fn good_curves() -> impl Strategy<Value = String> {
    (
        prop::sample::subsequence(&["X25519", "X448", "P-256", "P-384", "P-521"][..], 1..5)
            .prop_shuffle(),
        any::<bool>(),
    )
        .prop_map(|(groups, openssl_spelling)| {
            let spell = |g: &'static str| {
                if openssl_spelling {
                    server_group_name(g)
                } else {
                    g
                }
            };
            groups.into_iter().map(spell).collect::<Vec<_>>().join(":")
        })
}

#[test]
fn a_group_named_twice_is_invalid_config() {
    for curves in ["P-256:P-256", "X25519:P-256:X25519", "P-256:prime256v1"] {
        let key = Peer::tls(addr(), "localhost")
            .with_curves(curves)
            .key()
            .map(|_| ());
        assert!(is_invalid_config(&key), "{curves}: {key:?}");
    }
}

proptest! {
    #![proptest_config(config(128))]

    #[test]
    fn known_curves_are_accepted(curves in good_curves()) {
        let key = Peer::tls(addr(), "localhost").with_curves(curves.clone()).key().map(|_| ());
        prop_assert!(key.is_ok(), "{curves}: {key:?}");
    }

    #[test]
    fn unknown_curve_is_invalid_config(good in good_curves(), unknown in "[A-Za-z][A-Za-z0-9_-]{0,12}") {
        prop_assume!(!GROUPS.iter().any(|g| g.eq_ignore_ascii_case(&unknown)));
        // OpenSSL knows many more names than GROUPS; skip the ones it accepts.
        prop_assume!(openssl_rejects_group(&unknown));
        let curves = format!("{good}:{unknown}");
        prop_assert!(is_invalid_config(&Peer::tls(addr(), "localhost").with_curves(curves).key()));
    }

    #[test]
    fn any_curves_string_is_accepted_or_invalid_config(curves in any::<String>()) {
        let key = Peer::tls(addr(), "localhost").with_curves(curves).key().map(|_| ());
        prop_assert!(key.is_ok() || is_invalid_config(&key));
    }
}

fn openssl_rejects_group(name: &str) -> bool {
    let mut ctx = openssl::ssl::SslContext::builder(openssl::ssl::SslMethod::tls_client()).unwrap();
    ctx.set_groups_list(name).is_err()
}

// --- PEM -------------------------------------------------------------------------------------

/// How to damage a PEM file.
#[derive(Debug, Clone)]
enum Damage {
    Truncate(prop::sample::Index),
    Flip(prop::sample::Index, u8),
    Insert(prop::sample::Index, u8),
    Remove(prop::sample::Index),
    None,
}

impl Damage {
    fn apply(&self, pem: &[u8]) -> Vec<u8> {
        let mut out = pem.to_vec();
        match self {
            Damage::Truncate(i) => out.truncate(i.index(pem.len() + 1)),
            Damage::Flip(i, x) => {
                if !out.is_empty() {
                    out[i.index(pem.len())] ^= x | 1;
                }
            }
            Damage::Insert(i, b) => out.insert(i.index(pem.len() + 1), *b),
            Damage::Remove(i) => {
                if !out.is_empty() {
                    out.remove(i.index(pem.len()));
                }
            }
            Damage::None => {}
        }
        out
    }
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        any::<prop::sample::Index>().prop_map(Damage::Truncate),
        (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, x)| Damage::Flip(i, x)),
        (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| Damage::Insert(i, b)),
        any::<prop::sample::Index>().prop_map(Damage::Remove),
        Just(Damage::None),
    ]
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn arbitrary_bytes_are_not_a_client_certificate(chain in vec(any::<u8>(), 0..4096), key in vec(any::<u8>(), 0..4096)) {
        prop_assert!(is_invalid_config(&CertKey::from_pem(&chain, &key)));
    }

    /// PEM armour around arbitrary (base64-looking or not) content.
    #[test]
    fn armoured_garbage_is_invalid_config(body in "[A-Za-z0-9+/=\\n]{0,600}", label in prop::sample::select(&["CERTIFICATE", "PRIVATE KEY", "EC PRIVATE KEY", "RSA PRIVATE KEY", "X509 CRL"][..])) {
        let pem = format!("-----BEGIN {label}-----\n{body}\n-----END {label}-----\n");
        let pki = TestPki::shared();
        prop_assert!(is_invalid_config(&CertKey::from_pem(pem.as_bytes(), &pki.client_a.key_pem())));
        prop_assert!(is_invalid_config(&CertKey::from_pem(&pki.client_a.chain_pem(), pem.as_bytes())));
    }

    /// A damaged certificate chain or key: accepted only if it still parses to a key that
    /// matches the leaf (damage in whitespace or after the END line can be harmless), else
    /// `InvalidConfig`.
    #[test]
    fn damaged_pem_is_accepted_only_if_still_consistent(chain_damage in damage(), key_damage in damage(), swap in any::<bool>()) {
        let pki = TestPki::shared();
        let (mut chain, mut key) = (chain_damage.apply(&pki.client_a.chain_pem()), key_damage.apply(&pki.client_a.key_pem()));
        if swap {
            std::mem::swap(&mut chain, &mut key);
        }
        match CertKey::from_pem(&chain, &key) {
            Ok(ck) => {
                prop_assert!(ck.leaf().public_key().unwrap().public_eq(ck.key()));
                prop_assert!(!swap);
            }
            Err(e) => prop_assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{}", e),
        }
    }

    /// A certificate with another identity's key, or a chain without a certificate.
    #[test]
    fn mismatched_or_missing_parts_are_invalid_config(which in 0..4u8) {
        let pki = TestPki::shared();
        let (chain, key) = match which {
            0 => (pki.client_a.chain_pem(), pki.client_b.key_pem()),
            1 => (pki.client_b.chain_pem(), pki.client_a.key_pem()),
            2 => (Vec::new(), pki.client_a.key_pem()),
            _ => (pki.client_a.chain_pem(), Vec::new()),
        };
        prop_assert!(is_invalid_config(&CertKey::from_pem(&chain, &key)));
    }
}

// --- the pool key ----------------------------------------------------------------------------

/// Peer settings drawn from small domains, so that equal draws are common.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Keyed {
    port: u16,
    /// `None`: plaintext (and every TLS setting below is ignored).
    sni: Option<&'static str>,
    verify_cert: bool,
    verify_hostname: bool,
    alternative_cn: Option<&'static str>,
    /// 0: root A, 1: root B, 2: both (given in random order).
    ca: Option<u8>,
    client_cert: Option<bool>,
    alpn: Option<Vec<&'static str>>,
    curves: Option<&'static str>,
    bind: Option<u8>,
    group: Option<&'static str>,
}

/// Settings that are not part of the key.
#[derive(Debug, Clone)]
struct Unkeyed {
    ca_reversed: bool,
    timeout_ms: u64,
    idle_ms: u64,
    nodelay: bool,
    resumption: bool,
    name: Option<String>,
    keepalive: bool,
}

impl Keyed {
    /// What must decide key equality: plaintext peers ignore TLS settings.
    fn identity(&self) -> Keyed {
        match self.sni {
            Some(_) => self.clone(),
            None => Keyed {
                sni: None,
                verify_cert: false,
                verify_hostname: false,
                alternative_cn: None,
                ca: None,
                client_cert: None,
                alpn: None,
                curves: None,
                ..self.clone()
            },
        }
    }

    fn peer(&self, extra: &Unkeyed) -> Peer {
        let pki = TestPki::shared();
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let mut peer = match self.sni {
            Some(sni) => Peer::tls(addr, sni),
            None => Peer::tcp(addr),
        };
        peer = peer
            .with_verify_cert(self.verify_cert)
            .with_verify_hostname(self.verify_hostname);
        if let Some(cn) = self.alternative_cn {
            peer = peer.with_alternative_cn(cn);
        }
        if let Some(ca) = self.ca {
            let mut cas = match ca {
                0 => pki.ca_a(),
                1 => pki.ca_b(),
                _ => [pki.ca_a(), pki.ca_b()].concat(),
            };
            if extra.ca_reversed {
                cas.reverse();
            }
            peer = peer.with_ca(cas);
        }
        if let Some(a) = self.client_cert {
            let id = if a { &pki.client_a } else { &pki.client_b };
            peer =
                peer.with_client_cert(CertKey::from_pem(&id.chain_pem(), &id.key_pem()).unwrap());
        }
        if let Some(alpn) = &self.alpn {
            peer = peer.with_alpn(Alpn::from_protocols(alpn).unwrap());
        }
        if let Some(curves) = self.curves {
            peer = peer.with_curves(curves);
        }
        if let Some(b) = self.bind {
            peer = peer.with_bind_to(SocketAddr::from((Ipv4Addr::new(127, 0, 0, b), 0)));
        }
        if let Some(group) = self.group {
            peer = peer.with_group(group);
        }
        peer = peer
            .with_connection_timeout(Duration::from_millis(extra.timeout_ms))
            .with_total_connection_timeout(Duration::from_millis(extra.timeout_ms * 2))
            .with_idle_timeout(Duration::from_millis(extra.idle_ms))
            .with_tcp_nodelay(extra.nodelay)
            .with_session_resumption(extra.resumption);
        if let Some(name) = &extra.name {
            peer = peer.with_name(name.clone());
        }
        if extra.keepalive {
            peer = peer.with_tcp_keepalive(TcpKeepalive {
                idle: Duration::from_secs(30),
                interval: Duration::from_secs(5),
                count: 3,
            });
        }
        peer
    }
}

const ALPN_LISTS: &[&[&str]] = &[
    &["h2"],
    &["http/1.1"],
    &["h2", "http/1.1"],
    &["http/1.1", "h2"],
];

fn keyed() -> impl Strategy<Value = Keyed> {
    (
        prop::sample::select(&[8443u16, 8444][..]),
        prop::option::of(prop::sample::select(
            &["localhost", "a.test", "a_b.test", ""][..],
        )),
        any::<bool>(),
        any::<bool>(),
        prop::option::of(prop::sample::select(&["localhost", "alt.test"][..])),
        prop::option::of(0..3u8),
        prop::option::of(any::<bool>()),
        prop::option::of(prop::sample::select(ALPN_LISTS)).prop_map(|a| a.map(<[&str]>::to_vec)),
        prop::option::of(prop::sample::select(
            &["X25519", "P-256", "X25519:P-256"][..],
        )),
        prop::option::of(1..3u8),
        prop::option::of(prop::sample::select(&["", "tenant-a", "tenant-b"][..])),
    )
        .prop_map(
            |(
                port,
                sni,
                verify_cert,
                verify_hostname,
                alternative_cn,
                ca,
                client_cert,
                alpn,
                curves,
                bind,
                group,
            )| {
                Keyed {
                    port,
                    sni,
                    verify_cert,
                    verify_hostname,
                    alternative_cn,
                    ca,
                    client_cert,
                    alpn,
                    curves,
                    bind,
                    group,
                }
            },
        )
}

fn unkeyed() -> impl Strategy<Value = Unkeyed> {
    (
        any::<bool>(),
        1..10_000u64,
        1..100_000u64,
        any::<bool>(),
        any::<bool>(),
        prop::option::of("[a-z]{1,8}"),
        any::<bool>(),
    )
        .prop_map(
            |(ca_reversed, timeout_ms, idle_ms, nodelay, resumption, name, keepalive)| Unkeyed {
                ca_reversed,
                timeout_ms,
                idle_ms,
                nodelay,
                resumption,
                name,
                keepalive,
            },
        )
}

proptest! {
    #![proptest_config(config(512))]

    /// Security-critical: two peers get the same key (share connections and sessions)
    /// exactly when every keyed setting is equal; unkeyed settings never matter; equal keys
    /// have equal hashes.
    #[test]
    fn keys_are_equal_exactly_when_keyed_settings_are(
        a in keyed(), b in keyed(), xa in unkeyed(), xb in unkeyed(), same in any::<bool>()
    ) {
        // Half the time compare a draw with itself under different unkeyed settings.
        let b = if same { a.clone() } else { b };
        let (pa, pb) = (a.peer(&xa), b.peer(&xb));
        let (ka, kb) = (pa.key().unwrap(), pb.key().unwrap());
        prop_assert_eq!(ka == kb, a.identity() == b.identity(), "{:?} vs {:?}", a, b);
        if ka == kb {
            prop_assert_eq!(ka.hash64(), kb.hash64());
        }
    }
}

// --- whole peers against a real upstream -----------------------------------------------------

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    })
}

/// Usable settings for a TLS peer of the test upstream (certificate for localhost, root A).
#[derive(Debug, Clone)]
struct Usable {
    /// `None`: SNI `localhost`; `Some(name)`: SNI `name`, verified through the alternative
    /// CN `localhost`.
    other_sni: Option<String>,
    ip_sni: bool,
    alpn: Option<Vec<Vec<u8>>>,
    curves: Option<Vec<&'static str>>,
    client_cert: bool,
    bind: Option<u8>,
    keepalive: Option<(u64, u64, u32)>,
    group: Option<String>,
    timeout_ms: u64,
}

/// One setting made unusable.
#[derive(Debug, Clone)]
enum Broken {
    Sni(String),
    AlternativeCn(String),
    Curves(String),
    EmptyCa,
    ZeroConnectTimeout,
    ZeroTotalTimeout,
    KeepaliveZeroCount,
    KeepaliveSubSecond,
    KeepaliveTooManyProbes(u32),
}

fn usable() -> impl Strategy<Value = Usable> {
    (
        prop::option::of("[a-z][a-z0-9_-]{0,10}\\.[a-z]{2,5}"),
        any::<bool>(),
        prop::option::of(vec(
            prop_oneof![
                Just(b"h2".to_vec()),
                Just(b"http/1.1".to_vec()),
                vec(any::<u8>(), 1..20),
            ],
            1..4,
        )),
        prop::option::of(
            prop::sample::subsequence(&["X25519", "P-256", "P-384", "P-521", "X448"][..], 1..4)
                .prop_shuffle(),
        ),
        any::<bool>(),
        prop::option::of(1..255u8),
        prop::option::of((1..7200u64, 1..120u64, 1..=127u32)),
        prop::option::of(any::<String>()),
        500..3000u64,
    )
        .prop_map(
            |(other_sni, ip_sni, alpn, curves, client_cert, bind, keepalive, group, timeout_ms)| {
                Usable {
                    other_sni,
                    ip_sni,
                    alpn,
                    curves,
                    client_cert,
                    bind,
                    keepalive,
                    group,
                    timeout_ms,
                }
            },
        )
}

fn broken() -> impl Strategy<Value = Broken> {
    prop_oneof![
        bad_hostname().prop_map(Broken::Sni),
        bad_hostname().prop_map(Broken::AlternativeCn),
        "[A-Z]{3,8}-[0-9]{1,3}"
            .prop_filter("unknown to OpenSSL", |c| openssl_rejects_group(c))
            .prop_map(Broken::Curves),
        Just(Broken::EmptyCa),
        Just(Broken::ZeroConnectTimeout),
        Just(Broken::ZeroTotalTimeout),
        Just(Broken::KeepaliveZeroCount),
        Just(Broken::KeepaliveSubSecond),
        (128..100_000u32).prop_map(Broken::KeepaliveTooManyProbes),
    ]
}

impl Usable {
    fn sni(&self) -> String {
        match (&self.other_sni, self.ip_sni) {
            (Some(name), _) => name.clone(),
            (None, true) => "127.0.0.1".to_owned(),
            (None, false) => "localhost".to_owned(),
        }
    }

    fn peer(&self, server: SocketAddr, broken: Option<&Broken>) -> Peer {
        let pki = TestPki::shared();
        let sni = match broken {
            Some(Broken::Sni(bad)) => bad.clone(),
            _ => self.sni(),
        };
        let mut peer = Peer::tls(server, sni).with_ca(pki.ca_a());
        if self.other_sni.is_some() {
            peer = peer.with_alternative_cn("localhost");
        }
        if let Some(alpn) = &self.alpn {
            peer = peer.with_alpn(Alpn::from_protocols(alpn).unwrap());
        }
        if let Some(curves) = &self.curves {
            peer = peer.with_curves(curves.join(":"));
        }
        if self.client_cert {
            let id = &pki.client_a;
            peer =
                peer.with_client_cert(CertKey::from_pem(&id.chain_pem(), &id.key_pem()).unwrap());
        }
        if let Some(b) = self.bind {
            peer = peer.with_bind_to(SocketAddr::from((Ipv4Addr::new(127, 0, 0, b), 0)));
        }
        if let Some((idle, interval, count)) = self.keepalive {
            peer = peer.with_tcp_keepalive(TcpKeepalive {
                idle: Duration::from_secs(idle),
                interval: Duration::from_secs(interval),
                count,
            });
        }
        if let Some(group) = &self.group {
            peer = peer.with_group(group.clone());
        }
        peer = peer
            .with_connection_timeout(Duration::from_millis(self.timeout_ms))
            .with_total_connection_timeout(Duration::from_millis(self.timeout_ms * 2));
        // The broken setting goes last, so it is not hidden by a later valid one.
        let keepalive = |idle, interval, count| TcpKeepalive {
            idle,
            interval,
            count,
        };
        let s = Duration::from_secs;
        match broken {
            None | Some(Broken::Sni(_)) => peer,
            Some(Broken::AlternativeCn(bad)) => peer.with_alternative_cn(bad.clone()),
            Some(Broken::Curves(bad)) => peer.with_curves(bad.clone()),
            Some(Broken::EmptyCa) => peer.with_ca(Vec::new()),
            Some(Broken::ZeroConnectTimeout) => peer.with_connection_timeout(Duration::ZERO),
            Some(Broken::ZeroTotalTimeout) => peer.with_total_connection_timeout(Duration::ZERO),
            Some(Broken::KeepaliveZeroCount) => peer.with_tcp_keepalive(keepalive(s(30), s(5), 0)),
            Some(Broken::KeepaliveSubSecond) => {
                peer.with_tcp_keepalive(keepalive(Duration::from_millis(500), s(5), 3))
            }
            Some(Broken::KeepaliveTooManyProbes(n)) => {
                peer.with_tcp_keepalive(keepalive(s(30), s(5), *n))
            }
        }
    }
}

/// The OpenSSL name of a group as the server reports it.
fn server_group_name(client_name: &'static str) -> &'static str {
    match client_name {
        "P-256" => "prime256v1",
        "P-384" => "secp384r1",
        "P-521" => "secp521r1",
        other => other,
    }
}

/// Usable settings connect, and the upstream sees them: SNI, ALPN choice, key-exchange group
/// among those offered, client certificate, source address.
#[test]
fn usable_peers_connect_with_their_settings() {
    let rt = runtime();
    let pki = TestPki::shared();
    let server = rt.block_on(async {
        TestServer::builder()
            .alpn(AlpnPolicy::h2_then_h1())
            .client_auth(ClientAuth::Optional { ca: pki.ca_a() })
            .start()
    });
    let connector = Connector::new(ConnectorOptions::default()).unwrap();
    let mut runner = TestRunner::new(config(48));
    runner
        .run(&usable(), |u| {
            let peer = u.peer(server.addr(), None);
            let handshakes = server.stats().handshakes + 1;
            let conn = rt
                .block_on(async {
                    tokio::time::timeout(Duration::from_secs(10), connector.get(&peer)).await
                })
                .expect("get hung");
            let conn = match conn {
                Ok(conn) => conn,
                Err(e) => return Err(TestCaseError::fail(format!("usable peer failed: {e}"))),
            };
            prop_assert!(
                !conn.reused(),
                "each draw is a new key (dropped, never released)"
            );
            let stats = rt.block_on(server.wait_for(|s| s.handshakes == handshakes));
            let seen = stats.last().unwrap();
            let sni = u.sni();
            let expected_sni = if sni.parse::<IpAddr>().is_ok() {
                None
            } else {
                Some(sni)
            };
            prop_assert_eq!(&seen.sni, &expected_sni);
            let offered = u.alpn.clone().unwrap_or_default();
            let expected_alpn = [b"h2".to_vec(), b"http/1.1".to_vec()]
                .into_iter()
                .find(|p| offered.contains(p));
            prop_assert_eq!(&seen.alpn, &expected_alpn);
            prop_assert_eq!(conn.digest().unwrap().alpn.clone(), expected_alpn);
            if let Some(curves) = &u.curves {
                let group = seen.group.as_deref().unwrap_or("<none>");
                prop_assert!(
                    curves.iter().any(|c| server_group_name(c) == group),
                    "group {} not among {:?}",
                    group,
                    curves
                );
            }
            prop_assert_eq!(seen.client_cert_verified, u.client_cert);
            if let Some(b) = u.bind {
                prop_assert_eq!(
                    seen.peer.unwrap().ip(),
                    IpAddr::from(Ipv4Addr::new(127, 0, 0, b))
                );
            }
            drop(conn);
            Ok(())
        })
        .unwrap();
}

/// One unusable setting among usable ones: `InvalidConfig` from `Peer::key` and from `get`,
/// and the upstream never sees a connection.
#[test]
fn unusable_peers_are_invalid_config_and_never_dialled() {
    let rt = runtime();
    let server = rt.block_on(async { TestServer::builder().start() });
    let connector = Connector::new(ConnectorOptions::default()).unwrap();
    let mut runner = TestRunner::new(config(128));
    runner
        .run(&(usable(), broken()), |(u, b)| {
            let peer = u.peer(server.addr(), Some(&b));
            let key = peer.key().map(|_| ());
            prop_assert!(is_invalid_config(&key), "{b:?}: key() gave {key:?}");
            let got = rt
                .block_on(async {
                    tokio::time::timeout(Duration::from_secs(10), connector.get(&peer)).await
                })
                .expect("get hung");
            prop_assert!(is_invalid_config(&got), "{b:?}: get gave {got:?}");
            Ok(())
        })
        .unwrap();
    rt.block_on(async { tokio::time::sleep(Duration::from_millis(50)).await });
    assert_eq!(server.stats().accepted, 0, "an invalid peer was dialled");
}
