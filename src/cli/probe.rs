//! `probe HOST:PORT`: one connection through the connector, then what it negotiated and the
//! server's leaf certificate, like a terse `openssl s_client`.

use std::fmt::Write as _;
use std::time::Duration;

use openssl::nid::Nid;
use openssl::x509::{X509NameRef, X509};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use upstream_pool::{Connection, Connector, ConnectorOptions, SslDigest};

use super::args::ProbeArgs;
use super::target::{connect_first, Target, TlsSettings};
use super::{write_stdout, CliError};

/// Runs `probe`.
///
/// # Errors
/// `Usage` for bad flags or files; `Failed` (exit code 1) naming the error kind and the
/// connector's reason when the connection or handshake fails.
pub(crate) async fn run(args: ProbeArgs) -> Result<(), CliError> {
    let settings = TlsSettings::load(&args.tls)?;
    let target = Target::resolve(&args.target).await?;
    let sni = target.sni(args.tls.sni.as_deref());
    let connector = Connector::new(ConnectorOptions::default())
        .map_err(|e| CliError::Failed(format!("cannot create connector: {e}")))?;
    let (peer, mut conn) = connect_first(&connector, &settings, &target, &sni).await?;

    let report = Report::new(&conn, peer.address().to_string(), sni);
    // Leave the way a well-behaved client does; the report is already complete.
    let _ = conn.shutdown().await;
    let out = if args.json {
        format!("{}\n", report.json())
    } else {
        report.text()
    };
    write_stdout(&out)
}

/// Everything `probe` prints, gathered from one connection.
#[derive(Debug)]
struct Report {
    address: String,
    sni: String,
    tcp_connect: Duration,
    tls_handshake: Option<Duration>,
    tls: Option<Tls>,
}

#[derive(Debug)]
struct Tls {
    version: String,
    cipher: String,
    alpn: Option<String>,
    resumed: bool,
    cert: Option<Cert>,
}

#[derive(Debug)]
struct Cert {
    subject: String,
    issuer: String,
    sha256: String,
    serial: Option<String>,
    not_before: String,
    not_after: String,
    names: Vec<String>,
}

impl Report {
    fn new(conn: &Connection, address: String, sni: String) -> Report {
        Report {
            address,
            sni,
            tcp_connect: conn.timing().tcp_connect,
            tls_handshake: conn.timing().tls_handshake,
            tls: conn.digest().map(Tls::new),
        }
    }

    fn text(&self) -> String {
        let mut out = String::new();
        let sni = if self.sni.is_empty() {
            "no SNI, host name not checked".to_string()
        } else {
            format!("SNI {:?}", self.sni)
        };
        let _ = writeln!(out, "connected to {} ({sni})", self.address);
        let mut field = |name: &str, value: &str| {
            let _ = writeln!(out, "  {name:<14}{value}");
        };
        if let Some(tls) = &self.tls {
            field("version", &tls.version);
            field("cipher", &tls.cipher);
            field("alpn", tls.alpn.as_deref().unwrap_or("none"));
            field("resumed", if tls.resumed { "yes" } else { "no" });
            match &tls.cert {
                Some(cert) => {
                    field("subject", &cert.subject);
                    field("issuer", &cert.issuer);
                    field("names", &cert.names.join(", "));
                    field("sha256", &cert.sha256);
                    field("serial", cert.serial.as_deref().unwrap_or("-"));
                    field("not before", &cert.not_before);
                    field("not after", &cert.not_after);
                }
                None => field("certificate", "none sent"),
            }
        }
        field("tcp connect", &micros(self.tcp_connect));
        field(
            "tls handshake",
            &self.tls_handshake.map_or_else(|| "-".to_string(), micros),
        );
        out
    }

    fn json(&self) -> Value {
        let tls = self.tls.as_ref().map(|tls| {
            let cert = tls.cert.as_ref().map(|c| {
                json!({
                    "subject": c.subject,
                    "issuer": c.issuer,
                    "names": c.names,
                    "sha256": c.sha256,
                    "serial": c.serial,
                    "not_before": c.not_before,
                    "not_after": c.not_after,
                })
            });
            json!({
                "version": tls.version,
                "cipher": tls.cipher,
                "alpn": tls.alpn,
                "resumed": tls.resumed,
                "certificate": cert,
            })
        });
        json!({
            "address": self.address,
            "sni": self.sni,
            "tcp_connect_us": self.tcp_connect.as_micros() as u64,
            "tls_handshake_us": self.tls_handshake.map(|d| d.as_micros() as u64),
            "tls": tls,
        })
    }
}

impl Tls {
    fn new(digest: &SslDigest) -> Tls {
        Tls {
            version: digest.version.clone(),
            cipher: digest.cipher.clone(),
            alpn: digest
                .alpn
                .as_deref()
                .map(|a| String::from_utf8_lossy(a).into_owned()),
            resumed: digest.session_reused,
            cert: digest
                .peer_certificate
                .as_ref()
                .map(|c| Cert::new(c, digest)),
        }
    }
}

impl Cert {
    fn new(cert: &X509, digest: &SslDigest) -> Cert {
        Cert {
            subject: name(cert.subject_name()),
            issuer: name(cert.issuer_name()),
            sha256: hex(&digest.cert_digest),
            serial: digest.serial_number.clone(),
            not_before: cert.not_before().to_string(),
            not_after: cert.not_after().to_string(),
            names: alt_names(cert),
        }
    }
}

/// `O=Example, CN=host`: short attribute names, in certificate order.
fn name(name: &X509NameRef) -> String {
    name.entries()
        .map(|entry| {
            let key = entry.object().nid().short_name().unwrap_or("?");
            let value = entry
                .data()
                .to_string()
                .unwrap_or_else(|_| "<unprintable>".to_string());
            format!("{key}={value}")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// DNS names and IP addresses from the subjectAltName extension; the CN when there is none.
fn alt_names(cert: &X509) -> Vec<String> {
    let Some(sans) = cert.subject_alt_names() else {
        return cert
            .subject_name()
            .entries_by_nid(Nid::COMMONNAME)
            .filter_map(|e| e.data().to_string().ok())
            .collect();
    };
    sans.iter()
        .filter_map(|san| {
            if let Some(dns) = san.dnsname() {
                return Some(dns.to_string());
            }
            let ip = san.ipaddress()?;
            let ip: std::net::IpAddr = match ip.len() {
                4 => <[u8; 4]>::try_from(ip).ok()?.into(),
                16 => <[u8; 16]>::try_from(ip).ok()?.into(),
                _ => return None,
            };
            Some(ip.to_string())
        })
        .collect()
}

/// Lowercase hex without separators (what `sha256sum` prints).
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn micros(d: Duration) -> String {
    format!("{} us", d.as_micros())
}
