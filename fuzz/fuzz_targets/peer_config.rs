//! Arbitrary bytes into every configuration entry point that takes user input: PEM
//! (`CertKey::from_pem`), ALPN names (`Alpn::from_protocols`), SNI, alternative CN, curves
//! and group tag (`Peer::tls(..).with_*`), then `Peer::key`.
//!
//! Invariants: nothing panics; every rejection is `InvalidConfig`; an accepted client
//! certificate's key matches its leaf; an accepted SNI or alternative CN holds only printable
//! ASCII; a valid ALPN list encodes to its length-prefixed wire form; a peer's key is stable
//! (computing it twice, or on a clone, gives equal keys with equal hashes).

#![no_main]

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use upstream_pool::{Alpn, CertKey, ErrorKind, Peer};

#[derive(Debug, Arbitrary)]
struct Input<'a> {
    chain_pem: &'a [u8],
    key_pem: &'a [u8],
    alpn: Vec<&'a [u8]>,
    /// Raw bytes, converted lossily: SNI and CN are strings in the API.
    sni: &'a [u8],
    alternative_cn: Option<&'a [u8]>,
    curves: Option<&'a [u8]>,
    group: Option<&'a str>,
    ipv6: bool,
    port: u16,
}

fn rejected(what: &str, kind: ErrorKind) {
    assert_eq!(
        kind,
        ErrorKind::InvalidConfig,
        "{what} rejected with {kind:?}"
    );
}

fuzz_target!(|input: Input<'_>| {
    let cert = match CertKey::from_pem(input.chain_pem, input.key_pem) {
        Ok(cert) => {
            let leaf_key = cert
                .leaf()
                .public_key()
                .expect("accepted leaf has a public key");
            assert!(
                leaf_key.public_eq(cert.key()),
                "accepted a key that does not match"
            );
            Some(cert)
        }
        Err(e) => {
            rejected("PEM", e.kind());
            None
        }
    };

    let alpn = match Alpn::from_protocols(&input.alpn) {
        Ok(alpn) => {
            assert!(!input.alpn.is_empty());
            let mut wire = Vec::new();
            for p in &input.alpn {
                assert!(
                    (1..=255).contains(&p.len()),
                    "accepted ALPN name of {} bytes",
                    p.len()
                );
                wire.push(p.len() as u8);
                wire.extend_from_slice(p);
            }
            assert_eq!(alpn.to_wire(), &wire[..]);
            Some(alpn)
        }
        Err(e) => {
            rejected("ALPN", e.kind());
            None
        }
    };

    let addr = if input.ipv6 {
        SocketAddr::from((Ipv6Addr::LOCALHOST, input.port))
    } else {
        SocketAddr::from((Ipv4Addr::LOCALHOST, input.port))
    };
    let sni = String::from_utf8_lossy(input.sni).into_owned();
    let mut peer = Peer::tls(addr, sni.clone());
    let cn = input
        .alternative_cn
        .map(|cn| String::from_utf8_lossy(cn).into_owned());
    if let Some(cn) = &cn {
        peer = peer.with_alternative_cn(cn.clone());
    }
    if let Some(curves) = input.curves {
        peer = peer.with_curves(String::from_utf8_lossy(curves).into_owned());
    }
    if let Some(group) = input.group {
        peer = peer.with_group(group);
    }
    if let Some(alpn) = alpn {
        peer = peer.with_alpn(alpn);
    }
    if let Some(cert) = cert {
        peer = peer.with_client_cert(cert);
    }

    match peer.key() {
        Ok(key) => {
            for name in std::iter::once(&sni).chain(cn.as_ref()) {
                assert!(
                    name.bytes().all(|b| b.is_ascii_graphic()),
                    "accepted host name {name:?}"
                );
            }
            let again = peer.clone().with_name("fuzz");
            let other = again
                .key()
                .expect("an unkeyed change cannot invalidate a peer");
            assert!(key == other && key.hash64() == other.hash64());
        }
        Err(e) => rejected("peer", e.kind()),
    }
});
