//! A throw-away PKI generated at test time with the `openssl` crate.
//!
//! Nothing is checked in: every test binary builds its own roots, intermediates and leaves.
//! EC P-256 keys and SHA-256 signatures keep generation fast (well under a millisecond per
//! certificate), so [`TestPki::new`] is cheap enough to call per test; [`TestPki::shared`]
//! builds one per test binary for tests that do not care about isolation.
//!
//! Layout of the default PKI:
//!
//! ```text
//! Test Root A ──► Test Intermediate A ──► server (localhost, 127.0.0.1, ::1)
//!     │                              ├──► expired (same names, notAfter in the past)
//!     │                              └──► other_host (other.test)
//!     └────────► Test Client Intermediate A ──► client_a ("client-a")
//! Test Root B ──► server_b (localhost, 127.0.0.1, ::1; untrusted by root A)
//!             └──► client_b ("client-b")
//! ```

use std::fs;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use openssl::asn1::Asn1Time;
use openssl::bn::{BigNum, MsbOption};
use openssl::ec::{EcGroup, EcKey};
use openssl::error::ErrorStack;
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::rsa::Rsa;
use openssl::x509::extension::{
    AuthorityKeyIdentifier, BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAlternativeName,
    SubjectKeyIdentifier,
};
use openssl::x509::{X509Name, X509NameRef, X509};

/// Organization (`O`) put in the subject of every certificate this module issues, so tests
/// can check `SslDigest::organization`.
pub(crate) const TEST_ORG: &str = "Upstream Pool Test";

/// The names the default server leaves (`server`, `expired`, `server_b`) are valid for.
pub(crate) const SERVER_NAMES: &[&str] = &["localhost", "127.0.0.1", "::1"];

/// The only name the `other_host` leaf is valid for.
pub(crate) const OTHER_HOST: &str = "other.test";

/// Key algorithm of a generated certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum KeyType {
    /// ECDSA on NIST P-256 (fast; the default).
    #[default]
    EcP256,
    /// RSA 2048 (slow to generate, ~50 ms; use only when a test needs RSA).
    Rsa2048,
}

/// What a certificate may be used for; drives BasicConstraints, KeyUsage and ExtendedKeyUsage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CertUsage {
    /// A CA certificate; `pathlen` limits how many intermediates may follow it.
    Ca {
        /// BasicConstraints pathLenConstraint, `None` for unlimited.
        pathlen: Option<u32>,
    },
    /// A TLS server leaf (EKU serverAuth).
    Server,
    /// A TLS client leaf (EKU clientAuth).
    Client,
}

/// Everything that describes a certificate to issue. Build with [`CertSpec::server`],
/// [`CertSpec::client`] or [`CertSpec::ca`] and adjust with the `with_*` methods.
#[derive(Debug, Clone)]
pub(crate) struct CertSpec {
    /// Subject common name (`CN`).
    pub(crate) common_name: String,
    /// Subject organization (`O`); [`TEST_ORG`] by default.
    pub(crate) organization: Option<String>,
    /// Subject alternative names; entries that parse as an IP address become IP SANs, the
    /// rest DNS SANs.
    pub(crate) sans: Vec<String>,
    /// What the certificate is for.
    pub(crate) usage: CertUsage,
    /// Start of validity.
    pub(crate) not_before: SystemTime,
    /// End of validity.
    pub(crate) not_after: SystemTime,
    /// Key algorithm.
    pub(crate) key_type: KeyType,
}

impl CertSpec {
    fn base(common_name: &str, usage: CertUsage) -> Self {
        let now = SystemTime::now();
        CertSpec {
            common_name: common_name.to_owned(),
            organization: Some(TEST_ORG.to_owned()),
            sans: Vec::new(),
            usage,
            // Back-date by an hour so clock skew between "now" here and in OpenSSL never
            // makes a fresh certificate "not yet valid".
            not_before: now - Duration::from_secs(3600),
            not_after: now + Duration::from_secs(30 * 86_400),
            key_type: KeyType::EcP256,
        }
    }

    /// A server leaf with the given CN and SANs (IP literals become IP SANs), valid from an
    /// hour ago for 30 days.
    pub(crate) fn server(common_name: &str, sans: &[&str]) -> Self {
        Self::base(common_name, CertUsage::Server).with_sans(sans)
    }

    /// A client leaf with the given CN and no SANs, valid from an hour ago for 30 days.
    pub(crate) fn client(common_name: &str) -> Self {
        Self::base(common_name, CertUsage::Client)
    }

    /// A CA certificate with the given CN and path length constraint.
    pub(crate) fn ca(common_name: &str, pathlen: Option<u32>) -> Self {
        Self::base(common_name, CertUsage::Ca { pathlen })
    }

    /// Replaces the subject alternative names.
    pub(crate) fn with_sans(mut self, sans: &[&str]) -> Self {
        self.sans = sans.iter().map(|s| (*s).to_owned()).collect();
        self
    }

    /// Replaces (or with `None` removes) the subject organization.
    pub(crate) fn with_organization(mut self, org: Option<&str>) -> Self {
        self.organization = org.map(str::to_owned);
        self
    }

    /// Sets the validity window.
    pub(crate) fn with_validity(mut self, not_before: SystemTime, not_after: SystemTime) -> Self {
        self.not_before = not_before;
        self.not_after = not_after;
        self
    }

    /// Makes the certificate expired: valid from 30 days ago until yesterday.
    pub(crate) fn expired(self) -> Self {
        let now = SystemTime::now();
        self.with_validity(
            now - Duration::from_secs(30 * 86_400),
            now - Duration::from_secs(86_400),
        )
    }

    /// Sets the key algorithm.
    pub(crate) fn with_key_type(mut self, key_type: KeyType) -> Self {
        self.key_type = key_type;
        self
    }
}

/// A certificate, its private key, and the intermediates between it and its root (leaf
/// first order, root excluded). Cheap to clone (OpenSSL reference counts).
#[derive(Clone)]
pub(crate) struct Identity {
    /// The certificate itself.
    pub(crate) cert: X509,
    /// Its private key.
    pub(crate) key: PKey<Private>,
    /// Intermediates from the issuer of `cert` up to (not including) the self-signed root;
    /// empty for roots and for certificates issued directly by a root.
    pub(crate) intermediates: Vec<X509>,
    self_signed: bool,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("subject_cn", &common_name(self.cert.subject_name()))
            .field("issuer_cn", &common_name(self.cert.issuer_name()))
            .field("intermediates", &self.intermediates.len())
            .finish_non_exhaustive()
    }
}

/// Paths of an [`Identity`] written out as PEM files by [`Identity::write_pem`].
#[derive(Debug, Clone)]
pub(crate) struct PemFiles {
    /// The certificate alone.
    pub(crate) cert: PathBuf,
    /// The intermediates alone (an empty file when there are none); for
    /// `openssl s_server -cert_chain`.
    pub(crate) intermediates: PathBuf,
    /// Certificate followed by intermediates (nginx `ssl_certificate`).
    pub(crate) chain: PathBuf,
    /// The private key, PKCS#8 PEM.
    pub(crate) key: PathBuf,
}

impl Identity {
    /// Creates a self-signed certificate from `spec` (a root CA, or a self-signed leaf).
    pub(crate) fn self_signed(spec: &CertSpec) -> Self {
        build(spec, None).expect("generate self-signed test certificate")
    }

    /// Issues a certificate described by `spec`, signed by this identity (which should be a
    /// CA). The result's intermediates are this certificate plus its own intermediates,
    /// unless this is a self-signed root.
    pub(crate) fn issue(&self, spec: &CertSpec) -> Identity {
        build(spec, Some(self)).expect("issue test certificate")
    }

    /// Wraps an existing certificate, key and intermediates (leaf-first order, root
    /// excluded).
    pub(crate) fn from_parts(cert: X509, key: PKey<Private>, intermediates: Vec<X509>) -> Self {
        let self_signed = cert.issued(&cert) == openssl::x509::X509VerifyResult::OK;
        Identity {
            cert,
            key,
            intermediates,
            self_signed,
        }
    }

    /// The certificate's subject CN, if any.
    pub(crate) fn common_name(&self) -> Option<String> {
        common_name(self.cert.subject_name())
    }

    /// The certificate (leaf only) as PEM.
    pub(crate) fn cert_pem(&self) -> Vec<u8> {
        self.cert.to_pem().expect("encode certificate PEM")
    }

    /// The intermediates as concatenated PEM (empty when there are none).
    pub(crate) fn intermediates_pem(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for c in &self.intermediates {
            out.extend_from_slice(&c.to_pem().expect("encode certificate PEM"));
        }
        out
    }

    /// The certificate followed by its intermediates, as concatenated PEM: what a server
    /// presents, or what `CertKey::from_pem` takes as `chain_pem`.
    pub(crate) fn chain_pem(&self) -> Vec<u8> {
        let mut out = self.cert_pem();
        out.extend_from_slice(&self.intermediates_pem());
        out
    }

    /// The private key as PKCS#8 PEM.
    pub(crate) fn key_pem(&self) -> Vec<u8> {
        self.key
            .private_key_to_pem_pkcs8()
            .expect("encode private key PEM")
    }

    /// The certificate and its intermediates, leaf first, as owned values.
    pub(crate) fn chain(&self) -> Vec<X509> {
        std::iter::once(self.cert.clone())
            .chain(self.intermediates.iter().cloned())
            .collect()
    }

    /// SHA-256 of the certificate's DER encoding (what `SslDigest::cert_digest` holds).
    pub(crate) fn sha256(&self) -> Vec<u8> {
        self.cert
            .digest(MessageDigest::sha256())
            .expect("digest certificate")
            .to_vec()
    }

    /// The serial number as upper-case hex without leading zeros (OpenSSL's `BN_bn2hex`).
    pub(crate) fn serial_hex(&self) -> String {
        self.cert
            .serial_number()
            .to_bn()
            .and_then(|bn| bn.to_hex_str().map(|s| s.to_string()))
            .expect("serial number to hex")
    }

    /// Writes `<name>.crt` (leaf), `<name>.intermediates.pem`, `<name>.chain.pem` and
    /// `<name>.key` into `dir` and returns their paths.
    pub(crate) fn write_pem(&self, dir: &Path, name: &str) -> io::Result<PemFiles> {
        let files = PemFiles {
            cert: dir.join(format!("{name}.crt")),
            intermediates: dir.join(format!("{name}.intermediates.pem")),
            chain: dir.join(format!("{name}.chain.pem")),
            key: dir.join(format!("{name}.key")),
        };
        fs::write(&files.cert, self.cert_pem())?;
        fs::write(&files.intermediates, self.intermediates_pem())?;
        fs::write(&files.chain, self.chain_pem())?;
        fs::write(&files.key, self.key_pem())?;
        Ok(files)
    }
}

/// The full test PKI: two independent roots, intermediates, and a set of leaves. See the
/// module documentation for the layout.
#[derive(Debug, Clone)]
pub(crate) struct TestPki {
    /// Self-signed "Test Root A": the CA tests trust.
    pub(crate) root_a: Identity,
    /// "Test Intermediate A", signed by root A; issues the server leaves.
    pub(crate) intermediate_a: Identity,
    /// "Test Client Intermediate A", signed by root A; issues `client_a`.
    pub(crate) client_intermediate_a: Identity,
    /// Self-signed "Test Root B", unrelated to root A.
    pub(crate) root_b: Identity,
    /// Server leaf for [`SERVER_NAMES`] (CN `localhost`, O [`TEST_ORG`]), issued by
    /// intermediate A; its `intermediates` hold intermediate A.
    pub(crate) server: Identity,
    /// Like `server` but expired (notAfter yesterday).
    pub(crate) expired: Identity,
    /// Server leaf valid only for [`OTHER_HOST`], issued by intermediate A.
    pub(crate) other_host: Identity,
    /// Server leaf for [`SERVER_NAMES`] issued directly by root B (fails verification against
    /// root A).
    pub(crate) server_b: Identity,
    /// Client leaf "client-a", issued by the client intermediate of root A (chain with one
    /// intermediate).
    pub(crate) client_a: Identity,
    /// Client leaf "client-b", issued directly by root B.
    pub(crate) client_b: Identity,
}

impl TestPki {
    /// Generates a fresh PKI (ten EC P-256 keys and certificates; a few milliseconds).
    pub(crate) fn new() -> Self {
        let root_a = Identity::self_signed(&CertSpec::ca("Test Root A", None));
        let intermediate_a = root_a.issue(&CertSpec::ca("Test Intermediate A", Some(0)));
        let client_intermediate_a =
            root_a.issue(&CertSpec::ca("Test Client Intermediate A", Some(0)));
        let root_b = Identity::self_signed(&CertSpec::ca("Test Root B", None));

        let server = intermediate_a.issue(&CertSpec::server("localhost", SERVER_NAMES));
        let expired = intermediate_a.issue(&CertSpec::server("localhost", SERVER_NAMES).expired());
        let other_host = intermediate_a.issue(&CertSpec::server(OTHER_HOST, &[OTHER_HOST]));
        let server_b = root_b.issue(&CertSpec::server("localhost", SERVER_NAMES));
        let client_a = client_intermediate_a.issue(&CertSpec::client("client-a"));
        let client_b = root_b.issue(&CertSpec::client("client-b"));

        TestPki {
            root_a,
            intermediate_a,
            client_intermediate_a,
            root_b,
            server,
            expired,
            other_host,
            server_b,
            client_a,
            client_b,
        }
    }

    /// One PKI per test binary, generated on first use. Tests that need isolation (or mutate
    /// nothing but want distinct keys) should use [`TestPki::new`].
    pub(crate) fn shared() -> &'static TestPki {
        static PKI: OnceLock<TestPki> = OnceLock::new();
        PKI.get_or_init(TestPki::new)
    }

    /// Issues a fresh server leaf from intermediate A with CN `common_name` and the given
    /// SANs (IP literals become IP SANs); the server presents it with intermediate A.
    pub(crate) fn leaf(&self, common_name: &str, sans: &[&str]) -> Identity {
        self.intermediate_a
            .issue(&CertSpec::server(common_name, sans))
    }

    /// Root A as a one-element CA list (what a peer trusting root A passes as `with_ca`).
    pub(crate) fn ca_a(&self) -> Vec<X509> {
        vec![self.root_a.cert.clone()]
    }

    /// Root B as a one-element CA list.
    pub(crate) fn ca_b(&self) -> Vec<X509> {
        vec![self.root_b.cert.clone()]
    }
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}

/// The first CN entry of an X.509 name, if any.
pub(crate) fn common_name(name: &X509NameRef) -> Option<String> {
    name.entries_by_nid(Nid::COMMONNAME)
        .next()
        .and_then(|e| e.data().to_string().ok())
}

fn generate_key(key_type: KeyType) -> Result<PKey<Private>, ErrorStack> {
    match key_type {
        KeyType::EcP256 => {
            let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1)?;
            PKey::from_ec_key(EcKey::generate(&group)?)
        }
        KeyType::Rsa2048 => PKey::from_rsa(Rsa::generate(2048)?),
    }
}

fn asn1_time(t: SystemTime) -> Result<Asn1Time, ErrorStack> {
    let secs = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    };
    Asn1Time::from_unix(secs as _)
}

fn build(spec: &CertSpec, issuer: Option<&Identity>) -> Result<Identity, ErrorStack> {
    let key = generate_key(spec.key_type)?;

    let mut name = X509Name::builder()?;
    if let Some(org) = &spec.organization {
        name.append_entry_by_nid(Nid::ORGANIZATIONNAME, org)?;
    }
    name.append_entry_by_nid(Nid::COMMONNAME, &spec.common_name)?;
    let name = name.build();

    let mut serial = BigNum::new()?;
    // 127 random bits: positive, fits the 20-octet limit, practically unique.
    serial.rand(127, MsbOption::MAYBE_ZERO, false)?;

    let mut b = X509::builder()?;
    b.set_version(2)?;
    let serial = serial.to_asn1_integer()?;
    b.set_serial_number(&serial)?;
    b.set_subject_name(&name)?;
    b.set_issuer_name(issuer.map_or(&*name, |i| i.cert.subject_name()))?;
    b.set_pubkey(&key)?;
    let (not_before, not_after) = (asn1_time(spec.not_before)?, asn1_time(spec.not_after)?);
    b.set_not_before(&not_before)?;
    b.set_not_after(&not_after)?;

    match spec.usage {
        CertUsage::Ca { pathlen } => {
            let mut bc = BasicConstraints::new();
            bc.critical().ca();
            if let Some(p) = pathlen {
                bc.pathlen(p);
            }
            b.append_extension(bc.build()?)?;
            b.append_extension(
                KeyUsage::new()
                    .critical()
                    .key_cert_sign()
                    .crl_sign()
                    .build()?,
            )?;
        }
        CertUsage::Server | CertUsage::Client => {
            b.append_extension(BasicConstraints::new().critical().build()?)?;
            let mut ku = KeyUsage::new();
            ku.critical().digital_signature();
            if spec.key_type == KeyType::Rsa2048 {
                ku.key_encipherment();
            }
            b.append_extension(ku.build()?)?;
            let mut eku = ExtendedKeyUsage::new();
            if spec.usage == CertUsage::Server {
                eku.server_auth();
            } else {
                eku.client_auth();
            }
            b.append_extension(eku.build()?)?;
        }
    }

    // Extensions that need an X509v3 context (issuer's key id, our own public key) are built
    // first, then appended once the context's borrow of the builder has ended.
    let mut ctx_exts = Vec::new();
    {
        let ctx = b.x509v3_context(issuer.map(|i| &*i.cert), None);
        ctx_exts.push(SubjectKeyIdentifier::new().build(&ctx)?);
        if issuer.is_some() {
            ctx_exts.push(AuthorityKeyIdentifier::new().keyid(false).build(&ctx)?);
        }
        if !spec.sans.is_empty() {
            let mut san = SubjectAlternativeName::new();
            for s in &spec.sans {
                if s.parse::<IpAddr>().is_ok() {
                    san.ip(s);
                } else {
                    san.dns(s);
                }
            }
            ctx_exts.push(san.build(&ctx)?);
        }
    }
    for ext in ctx_exts {
        b.append_extension(ext)?;
    }

    let signing_key = issuer.map_or(&key, |i| &i.key);
    b.sign(signing_key, MessageDigest::sha256())?;
    let cert = b.build();

    let intermediates = match issuer {
        None => Vec::new(),
        Some(i) if i.self_signed => Vec::new(),
        Some(i) => std::iter::once(i.cert.clone())
            .chain(i.intermediates.iter().cloned())
            .collect(),
    };
    Ok(Identity {
        cert,
        key,
        intermediates,
        self_signed: issuer.is_none(),
    })
}
