//! Certificates for the embedded upstream, generated at start so nothing secret is checked in
//! and nothing expires in the repository.
//!
//! EC P-256 keys: generating them takes well under a millisecond, and ECDSA handshakes are
//! what modern upstreams serve, so the handshake costs `bench` reports are realistic.

use std::time::{SystemTime, UNIX_EPOCH};

use openssl::asn1::Asn1Time;
use openssl::bn::{BigNum, MsbOption};
use openssl::ec::{EcGroup, EcKey};
use openssl::error::ErrorStack;
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::x509::extension::{
    BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAlternativeName, SubjectKeyIdentifier,
};
use openssl::x509::{X509Name, X509};

/// The name the leaf certificate is issued for (also as IP SANs 127.0.0.1 and ::1).
pub(crate) const SERVER_NAME: &str = "localhost";

/// A throw-away CA and the server leaf it signed.
pub(crate) struct EmbeddedPki {
    /// Self-signed CA certificate: the only thing the bench client trusts.
    pub(crate) ca: X509,
    /// Server leaf for [`SERVER_NAME`], signed by `ca`.
    pub(crate) leaf: X509,
    /// The leaf's private key.
    pub(crate) leaf_key: PKey<Private>,
}

impl std::fmt::Debug for EmbeddedPki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("EmbeddedPki")
            .field("leaf_subject", &self.leaf.subject_name())
            .finish_non_exhaustive()
    }
}

impl EmbeddedPki {
    /// Generates a CA valid for a day and a leaf for `localhost` signed by it.
    ///
    /// # Errors
    /// Only if OpenSSL itself fails (no EC support, out of memory).
    pub(crate) fn generate() -> Result<EmbeddedPki, ErrorStack> {
        let ca_key = ec_key()?;
        let ca = {
            let name = name("upstream-pool bench CA")?;
            let mut b = cert_builder(&name, &name, &ca_key)?;
            b.append_extension(BasicConstraints::new().critical().ca().build()?)?;
            b.append_extension(
                KeyUsage::new()
                    .critical()
                    .key_cert_sign()
                    .crl_sign()
                    .build()?,
            )?;
            let ski = SubjectKeyIdentifier::new().build(&b.x509v3_context(None, None))?;
            b.append_extension(ski)?;
            b.sign(&ca_key, MessageDigest::sha256())?;
            b.build()
        };

        let leaf_key = ec_key()?;
        let leaf = {
            let name = name(SERVER_NAME)?;
            let mut b = cert_builder(&name, ca.subject_name(), &leaf_key)?;
            b.append_extension(BasicConstraints::new().critical().build()?)?;
            b.append_extension(KeyUsage::new().critical().digital_signature().build()?)?;
            b.append_extension(ExtendedKeyUsage::new().server_auth().build()?)?;
            let san = SubjectAlternativeName::new()
                .dns(SERVER_NAME)
                .ip("127.0.0.1")
                .ip("::1")
                .build(&b.x509v3_context(Some(&ca), None))?;
            b.append_extension(san)?;
            b.sign(&ca_key, MessageDigest::sha256())?;
            b.build()
        };
        Ok(EmbeddedPki { ca, leaf, leaf_key })
    }
}

fn ec_key() -> Result<PKey<Private>, ErrorStack> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1)?;
    PKey::from_ec_key(EcKey::generate(&group)?)
}

fn name(common_name: &str) -> Result<X509Name, ErrorStack> {
    let mut b = X509Name::builder()?;
    b.append_entry_by_nid(Nid::ORGANIZATIONNAME, "upstream-pool bench")?;
    b.append_entry_by_nid(Nid::COMMONNAME, common_name)?;
    Ok(b.build())
}

/// A v3 certificate builder with a random serial, valid from an hour ago (clock skew) for a
/// day (longer than any bench run).
fn cert_builder(
    subject: &X509Name,
    issuer: &openssl::x509::X509NameRef,
    key: &PKey<Private>,
) -> Result<openssl::x509::X509Builder, ErrorStack> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let mut serial = BigNum::new()?;
    serial.rand(127, MsbOption::MAYBE_ZERO, false)?;
    let mut b = X509::builder()?;
    b.set_version(2)?;
    let serial = serial.to_asn1_integer()?;
    b.set_serial_number(&serial)?;
    b.set_subject_name(subject)?;
    b.set_issuer_name(issuer)?;
    b.set_pubkey(key)?;
    let (not_before, not_after) = (
        Asn1Time::from_unix((now - 3600) as _)?,
        Asn1Time::from_unix((now + 86_400) as _)?,
    );
    b.set_not_before(&not_before)?;
    b.set_not_after(&not_after)?;
    Ok(b)
}
