//! `PeerKey`: equal keys exactly when every connection-shaping setting is equal.
//!
//! A property test over random pairs of peer settings (most pairs differ in a few fields
//! only, so both sides of the equivalence are exercised): keys are equal ⇔ the
//! connection-shaping settings are equal, and equal keys have equal hashes. Settings outside
//! the key (timeouts, name, nodelay, keepalive, resumption) vary freely. Certificates and
//! ALPN lists are rebuilt from bytes for every peer, so equality is by value, never by the
//! identity of a shared object.
//!
//! A 64-bit hash collision cannot be produced from outside the crate, so "equality compares
//! the full key, not the hash" is checked as: distinct settings never compare equal, over
//! many random pairs and in a map holding thousands of keys.

mod support;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use openssl::x509::X509;
use proptest::prelude::*;
use upstream_pool::{Alpn, CertKey, Peer, PeerKey, TcpKeepalive};

use support::certs::TestPki;

#[derive(Debug, Clone, Copy)]
enum Addr {
    Tcp(&'static str),
    Unix(&'static str),
}

const ADDRS: &[Addr] = &[
    Addr::Tcp("127.0.0.1:443"),
    Addr::Tcp("127.0.0.1:8443"),
    Addr::Tcp("127.0.0.2:443"),
    Addr::Tcp("[::1]:443"),
    Addr::Unix("/run/upstream-a.sock"),
    Addr::Unix("/run/upstream-b.sock"),
];
const SNIS: &[&str] = &["localhost", "a.test", "A.test", "", "127.0.0.1", "b_c.test"];
const ALT_CNS: &[&str] = &["alt.test", "other.test", "localhost"];
/// CA lists; 2 and 3 are the same set in another order, 4 is list 0 with a duplicate.
const CA_LISTS: &[&[Ca]] = &[
    &[Ca::A],
    &[Ca::B],
    &[Ca::A, Ca::B],
    &[Ca::B, Ca::A],
    &[Ca::A, Ca::A],
    &[Ca::Intermediate],
];
const CURVES: &[&str] = &["X25519", "P-256", "X25519:P-256", "P-256:X25519"];
const BINDS: &[&str] = &["127.0.0.1:0", "127.0.0.2:0", "127.0.0.1:40000", "[::1]:0"];
const GROUPS: &[&str] = &["tenant-a", "tenant-b", "Tenant-a"];
const NAMES: &[&str] = &["one", "two"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ca {
    A,
    B,
    Intermediate,
}

/// The set a CA list stands for (order and duplicates do not matter).
fn ca_set(list: usize) -> Vec<Ca> {
    let mut set: Vec<Ca> = CA_LISTS[list].to_vec();
    set.sort_by_key(|c| *c as u8);
    set.dedup();
    set
}

/// Every setting of a peer, as indices into the tables above.
#[derive(Debug, Clone)]
struct Settings {
    // In the key.
    address: usize,
    tls: bool,
    sni: usize,
    verify_cert: bool,
    verify_hostname: bool,
    alternative_cn: Option<usize>,
    ca: Option<usize>,
    /// 0: client A with its intermediate, 1: client B, 2: client A's leaf alone.
    client_cert: Option<usize>,
    /// 0: H1, 1: H2, 2: H2H1, 3: custom ["h2c"], 4: custom ["spdy/3", "http/1.1"].
    alpn: Option<usize>,
    curves: Option<usize>,
    bind_to: Option<usize>,
    group: Option<usize>,
    // Not in the key.
    name: Option<usize>,
    connection_timeout: Option<u64>,
    total_connection_timeout: Option<u64>,
    idle_timeout: Option<u64>,
    nodelay: bool,
    resumption: bool,
    keepalive: Option<u32>,
}

/// The connection-shaping part of the settings, normalised: what must decide key equality.
#[derive(Debug, PartialEq, Eq)]
struct KeyView {
    address: usize,
    tls: Option<TlsView>,
    bind_to: Option<usize>,
    group: Option<usize>,
}

#[derive(Debug, PartialEq, Eq)]
struct TlsView {
    sni: usize,
    verify_cert: bool,
    verify_hostname: bool,
    alternative_cn: Option<usize>,
    ca: Option<Vec<Ca>>,
    client_cert: Option<usize>,
    alpn: Option<usize>,
    curves: Option<usize>,
}

impl Settings {
    fn view(&self) -> KeyView {
        KeyView {
            address: self.address,
            tls: self.tls.then(|| TlsView {
                sni: self.sni,
                verify_cert: self.verify_cert,
                verify_hostname: self.verify_hostname,
                alternative_cn: self.alternative_cn,
                ca: self.ca.map(ca_set),
                client_cert: self.client_cert,
                alpn: self.alpn,
                curves: self.curves,
            }),
            bind_to: self.bind_to,
            group: self.group,
        }
    }

    /// Builds the peer from fresh objects (certificates parsed again), so that equality can
    /// only come from values.
    fn peer(&self) -> Peer {
        self.build(true)
    }

    /// `fresh == false` reuses parsed client certificates: for tests that build thousands.
    fn build(&self, fresh: bool) -> Peer {
        let f = fixtures();
        let mut peer = match (ADDRS[self.address], self.tls) {
            (Addr::Tcp(a), false) => Peer::tcp(a.parse().unwrap()),
            (Addr::Tcp(a), true) => Peer::tls(a.parse().unwrap(), SNIS[self.sni]),
            (Addr::Unix(p), false) => Peer::unix(p),
            (Addr::Unix(p), true) => Peer::unix_tls(p, SNIS[self.sni]),
        };
        peer = peer
            .with_verify_cert(self.verify_cert)
            .with_verify_hostname(self.verify_hostname);
        if let Some(i) = self.alternative_cn {
            peer = peer.with_alternative_cn(ALT_CNS[i]);
        }
        if let Some(i) = self.ca {
            let certs = CA_LISTS[i]
                .iter()
                .map(|ca| {
                    // A fresh object every time: equality must be by value.
                    let der = match ca {
                        Ca::A => &f.ca_a,
                        Ca::B => &f.ca_b,
                        Ca::Intermediate => &f.intermediate,
                    };
                    X509::from_der(der).unwrap()
                })
                .collect();
            peer = peer.with_ca(certs);
        }
        if let Some(i) = self.client_cert {
            let (chain, key) = &f.client_certs[i];
            let cert = if fresh {
                CertKey::from_pem(chain, key).unwrap()
            } else {
                f.parsed_client_certs[i].clone()
            };
            peer = peer.with_client_cert(cert);
        }
        if let Some(i) = self.alpn {
            let alpn = match i {
                0 => Alpn::H1,
                1 => Alpn::H2,
                2 => Alpn::H2H1,
                3 => Alpn::from_protocols(["h2c"]).unwrap(),
                _ => Alpn::from_protocols(["spdy/3", "http/1.1"]).unwrap(),
            };
            peer = peer.with_alpn(alpn);
        }
        if let Some(i) = self.curves {
            peer = peer.with_curves(CURVES[i]);
        }
        if let Some(i) = self.bind_to {
            peer = peer.with_bind_to(BINDS[i].parse::<SocketAddr>().unwrap());
        }
        if let Some(i) = self.group {
            peer = peer.with_group(GROUPS[i]);
        }
        if let Some(i) = self.name {
            peer = peer.with_name(NAMES[i]);
        }
        if let Some(ms) = self.connection_timeout {
            peer = peer.with_connection_timeout(Duration::from_millis(ms));
        }
        if let Some(ms) = self.total_connection_timeout {
            peer = peer.with_total_connection_timeout(Duration::from_millis(ms));
        }
        if let Some(ms) = self.idle_timeout {
            peer = peer.with_idle_timeout(Duration::from_millis(ms));
        }
        if let Some(count) = self.keepalive {
            peer = peer.with_tcp_keepalive(TcpKeepalive {
                idle: Duration::from_secs(30),
                interval: Duration::from_secs(5),
                count,
            });
        }
        peer.with_tcp_nodelay(self.nodelay)
            .with_session_resumption(self.resumption)
    }
}

struct Fixtures {
    ca_a: Vec<u8>,
    ca_b: Vec<u8>,
    intermediate: Vec<u8>,
    /// (chain PEM, key PEM) for client-cert choices 0..=2.
    client_certs: Vec<(Vec<u8>, Vec<u8>)>,
    parsed_client_certs: Vec<CertKey>,
}

fn fixtures() -> &'static Fixtures {
    static F: OnceLock<Fixtures> = OnceLock::new();
    F.get_or_init(|| {
        let pki = TestPki::shared();
        let client_certs = vec![
            (pki.client_a.chain_pem(), pki.client_a.key_pem()),
            (pki.client_b.chain_pem(), pki.client_b.key_pem()),
            (pki.client_a.cert_pem(), pki.client_a.key_pem()),
        ];
        let parsed_client_certs = client_certs
            .iter()
            .map(|(chain, key)| CertKey::from_pem(chain, key).unwrap())
            .collect();
        Fixtures {
            ca_a: pki.root_a.cert.to_der().unwrap(),
            ca_b: pki.root_b.cert.to_der().unwrap(),
            intermediate: pki.intermediate_a.cert.to_der().unwrap(),
            client_certs,
            parsed_client_certs,
        }
    })
}

fn settings() -> impl Strategy<Value = Settings> {
    let key_part = (
        0..ADDRS.len(),
        any::<bool>(),
        0..SNIS.len(),
        any::<bool>(),
        any::<bool>(),
        prop::option::of(0..ALT_CNS.len()),
        prop::option::of(0..CA_LISTS.len()),
        prop::option::of(0..3usize),
        prop::option::of(0..5usize),
        prop::option::of(0..CURVES.len()),
        prop::option::of(0..BINDS.len()),
        prop::option::of(0..GROUPS.len()),
    );
    let other_part = (
        prop::option::of(0..NAMES.len()),
        prop::option::of(1..5000u64),
        prop::option::of(1..5000u64),
        prop::option::of(1..5000u64),
        any::<bool>(),
        any::<bool>(),
        prop::option::of(1..10u32),
    );
    (key_part, other_part).prop_map(
        |(
            (
                address,
                tls,
                sni,
                verify_cert,
                verify_hostname,
                alternative_cn,
                ca,
                client_cert,
                alpn,
                curves,
                bind_to,
                group,
            ),
            (
                name,
                connection_timeout,
                total_connection_timeout,
                idle_timeout,
                nodelay,
                resumption,
                keepalive,
            ),
        )| Settings {
            address,
            tls,
            sni,
            verify_cert,
            verify_hostname,
            alternative_cn,
            ca,
            client_cert,
            alpn,
            curves,
            bind_to,
            group,
            name,
            connection_timeout,
            total_connection_timeout,
            idle_timeout,
            nodelay,
            resumption,
            keepalive,
        },
    )
}

/// `b` with each field replaced by `c`'s where `take` says so.
fn mix(a: &Settings, c: &Settings, take: &[bool]) -> Settings {
    let mut b = a.clone();
    macro_rules! maybe {
        ($($i:literal => $field:ident),* $(,)?) => {
            $( if take[$i] { b.$field = c.$field.clone(); } )*
        };
    }
    maybe!(
        0 => address, 1 => tls, 2 => sni, 3 => verify_cert, 4 => verify_hostname,
        5 => alternative_cn, 6 => ca, 7 => client_cert, 8 => alpn, 9 => curves,
        10 => bind_to, 11 => group, 12 => name, 13 => connection_timeout,
        14 => total_connection_timeout, 15 => idle_timeout, 16 => nodelay, 17 => resumption,
        18 => keepalive,
    );
    b
}

/// Pairs that are independent, or that differ in a few (possibly zero) fields.
fn pairs() -> impl Strategy<Value = (Settings, Settings)> {
    prop_oneof![
        1 => (settings(), settings()),
        4 => (
            settings(),
            settings(),
            prop::collection::vec(prop::bool::weighted(0.12), 19)
        )
            .prop_map(|(a, c, take)| {
                let b = mix(&a, &c, &take);
                (a, b)
            }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn equal_keys_iff_equal_connection_shaping_settings((a, b) in pairs()) {
        let (pa, pb) = (a.peer(), b.peer());
        let ka = pa.key().unwrap();
        let kb = pb.key().unwrap();
        let same = a.view() == b.view();
        prop_assert_eq!(ka == kb, same, "\n a: {:?}\n b: {:?}", a, b);
        prop_assert_eq!(kb == ka, same);
        if same {
            prop_assert_eq!(ka.hash64(), kb.hash64());
        }
        // A rebuilt peer with the same settings always has an equal key.
        let again = a.peer();
        prop_assert!(again.key().unwrap() == ka);
        prop_assert_eq!(again.key().unwrap().hash64(), ka.hash64());
        // Clones share the key.
        prop_assert!(pa.clone().key().unwrap() == ka);
    }
}

/// Enumerates many distinct connection-shaping settings (non-key fields left at defaults).
fn distinct_settings() -> Vec<Settings> {
    let base = Settings {
        address: 0,
        tls: true,
        sni: 0,
        verify_cert: true,
        verify_hostname: true,
        alternative_cn: None,
        ca: None,
        client_cert: None,
        alpn: None,
        curves: None,
        bind_to: None,
        group: None,
        name: None,
        connection_timeout: None,
        total_connection_timeout: None,
        idle_timeout: None,
        nodelay: true,
        resumption: true,
        keepalive: None,
    };
    let mut all = Vec::new();
    for address in 0..ADDRS.len() {
        for sni in 0..SNIS.len() {
            for ca in [None, Some(0), Some(1), Some(2), Some(5)] {
                for client_cert in [None, Some(0), Some(1), Some(2)] {
                    for alpn in [None, Some(0), Some(2), Some(3)] {
                        for (verify_cert, verify_hostname) in
                            [(true, true), (true, false), (false, true)]
                        {
                            all.push(Settings {
                                address,
                                sni,
                                ca,
                                client_cert,
                                alpn,
                                verify_cert,
                                verify_hostname,
                                ..base.clone()
                            });
                        }
                    }
                }
            }
        }
        for group in 0..GROUPS.len() {
            for bind_to in 0..BINDS.len() {
                for curves in 0..CURVES.len() {
                    for alternative_cn in 0..ALT_CNS.len() {
                        all.push(Settings {
                            address,
                            group: Some(group),
                            bind_to: Some(bind_to),
                            curves: Some(curves),
                            alternative_cn: Some(alternative_cn),
                            ..base.clone()
                        });
                    }
                }
            }
        }
        all.push(Settings {
            address,
            tls: false,
            ..base.clone()
        });
    }
    all
}

#[test]
fn thousands_of_distinct_settings_give_thousands_of_distinct_keys() {
    let settings = distinct_settings();
    let mut keys: HashMap<PeerKey, usize> = HashMap::new();
    for (i, s) in settings.iter().enumerate() {
        if let Some(j) = keys.insert(s.build(false).key().unwrap().clone(), i) {
            panic!(
                "distinct settings share a key:\n {:?}\n {:?}",
                settings[j], settings[i]
            );
        }
    }
    assert_eq!(keys.len(), settings.len());
    let hashes: HashSet<u64> = keys.keys().map(PeerKey::hash64).collect();
    assert_eq!(hashes.len(), settings.len(), "64-bit hash collision");
    // Looking up a rebuilt peer finds its own entry and no other.
    for (i, s) in settings.iter().enumerate().step_by(97) {
        assert_eq!(keys.get(s.peer().key().unwrap()), Some(&i));
    }
}

#[test]
fn keys_compare_values_not_shared_objects() {
    let pki = TestPki::shared();
    let addr: SocketAddr = "127.0.0.1:443".parse().unwrap();
    // Same CA by value, two distinct X509 objects.
    let a = Peer::tls(addr, "localhost").with_ca(pki.ca_a());
    let b =
        Peer::tls(addr, "localhost").with_ca(vec![X509::from_pem(&pki.root_a.cert_pem()).unwrap()]);
    assert!(a.key().unwrap() == b.key().unwrap());
    // Same client identity parsed twice, or built from parts: equal.
    let from_pem = CertKey::from_pem(&pki.client_a.chain_pem(), &pki.client_a.key_pem()).unwrap();
    let from_parts = CertKey::new(
        pki.client_a.cert.clone(),
        pki.client_a.key.clone(),
        pki.client_a.intermediates.clone(),
    )
    .unwrap();
    assert_eq!(from_pem.fingerprint(), from_parts.fingerprint());
    assert!(
        a.clone().with_client_cert(from_pem).key().unwrap()
            == a.clone().with_client_cert(from_parts).key().unwrap()
    );
    // A different key with the same leaf would not even be accepted; a different chain is a
    // different identity.
    let leaf_only = CertKey::from_pem(&pki.client_a.cert_pem(), &pki.client_a.key_pem()).unwrap();
    assert!(
        a.clone().with_client_cert(leaf_only).key().unwrap()
            != a.clone()
                .with_client_cert(
                    CertKey::from_pem(&pki.client_a.chain_pem(), &pki.client_a.key_pem()).unwrap()
                )
                .key()
                .unwrap()
    );
}

#[test]
fn changing_a_setting_after_the_key_was_computed_changes_the_key() {
    let addr: SocketAddr = "127.0.0.1:443".parse().unwrap();
    let peer = Peer::tls(addr, "localhost");
    let before = peer.key().unwrap().clone();
    let changed = peer.clone().with_group("x");
    assert!(changed.key().unwrap() != &before);
    assert!(
        peer.key().unwrap() == &before,
        "the original peer was modified"
    );
}
