//! Turning `HOST:PORT` and the TLS flags into [`Peer`]s: parsing, name resolution, loading
//! PEM files, and connecting to the first address that answers.
//!
//! Every problem with what the user typed or pointed at (a missing file, a PEM without a
//! certificate, an SNI with a space) is a [`CliError::Usage`] here, before any connection is
//! attempted.

use std::fs;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use openssl::x509::X509;
use upstream_pool::{Alpn, CertKey, Connection, Connector, Error, ErrorKind, Peer};

use super::args::{AlpnArg, TlsArgs};
use super::CliError;

/// A parsed and resolved `HOST:PORT`.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    /// The host as typed, without brackets around an IPv6 literal.
    pub(crate) host: String,
    /// Every address it resolved to, in resolver order.
    pub(crate) addrs: Vec<SocketAddr>,
}

impl Target {
    /// Parses `HOST:PORT` (`[v6]:PORT` for IPv6 literals) and resolves the host.
    ///
    /// # Errors
    /// `Usage` for text that is not `HOST:PORT`; `Failed` when the name does not resolve
    /// (a runtime condition, not a typo we can prove).
    pub(crate) async fn resolve(text: &str) -> Result<Target, CliError> {
        let (host, port) = split_host_port(text).map_err(CliError::Usage)?;
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(Target {
                host,
                addrs: vec![SocketAddr::new(ip, port)],
            });
        }
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
            .await
            .map_err(|e| CliError::Failed(format!("cannot resolve {host:?}: {e}")))?
            .collect();
        if addrs.is_empty() {
            return Err(CliError::Failed(format!("{host:?} resolved to no address")));
        }
        Ok(Target { host, addrs })
    }

    /// The SNI to use: `--sni` when given, else the host when it is a name; an IP literal
    /// gets none (there is no name to send or verify).
    pub(crate) fn sni(&self, flag: Option<&str>) -> String {
        match flag {
            Some(sni) => sni.to_string(),
            None if self.host.parse::<IpAddr>().is_ok() => String::new(),
            None => self.host.clone(),
        }
    }
}

fn split_host_port(text: &str) -> Result<(String, u16), String> {
    let usage = || format!("{text:?} is not HOST:PORT (use [ADDR]:PORT for IPv6)");
    let (host, port) = text.rsplit_once(':').ok_or_else(usage)?;
    let host = match host.strip_prefix('[') {
        Some(inner) => inner.strip_suffix(']').ok_or_else(usage)?,
        // An unbracketed IPv6 literal: the last colon is ambiguous.
        None if host.contains(':') => return Err(usage()),
        None => host,
    };
    if host.is_empty() {
        return Err(usage());
    }
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|&p| p != 0)
        .ok_or_else(|| format!("bad port {port:?} in {text:?}"))?;
    Ok((host.to_string(), port))
}

/// The TLS flags, with their files read and parsed.
#[derive(Debug, Clone, Default)]
pub(crate) struct TlsSettings {
    ca: Option<Vec<X509>>,
    client_cert: Option<CertKey>,
    alpn: Option<Alpn>,
    insecure: bool,
}

impl TlsSettings {
    /// Reads `--ca`, `--cert` and `--key`.
    ///
    /// # Errors
    /// `Usage`, naming the flag and file, for unreadable or unusable PEM.
    pub(crate) fn load(args: &TlsArgs) -> Result<TlsSettings, CliError> {
        let ca = match &args.ca {
            Some(path) => Some(load_ca(path)?),
            None => None,
        };
        let client_cert = match (&args.cert, &args.key) {
            (Some(cert), Some(key)) => {
                let chain = read_file("--cert", cert)?;
                let key_pem = read_file("--key", key)?;
                Some(CertKey::from_pem(&chain, &key_pem).map_err(|e| {
                    CliError::Usage(format!(
                        "--cert {} / --key {}: {e}",
                        cert.display(),
                        key.display()
                    ))
                })?)
            }
            (None, None) => None,
            // clap's `requires` makes them come in pairs.
            _ => return Err(CliError::Usage("--cert and --key go together".into())),
        };
        Ok(TlsSettings {
            ca,
            client_cert,
            alpn: args.alpn.map(alpn_offer),
            insecure: args.insecure,
        })
    }

    /// Settings that trust exactly `ca` and nothing else (the embedded upstream).
    pub(crate) fn trusting(ca: X509, alpn: Option<AlpnArg>) -> TlsSettings {
        TlsSettings {
            ca: Some(vec![ca]),
            client_cert: None,
            alpn: alpn.map(alpn_offer),
            insecure: false,
        }
    }

    /// A TLS peer for `addr` with these settings.
    ///
    /// # Errors
    /// `Usage` when the connector would reject the peer's configuration (an SNI it cannot
    /// send, for example).
    pub(crate) fn peer(&self, addr: SocketAddr, sni: &str) -> Result<Peer, CliError> {
        let mut peer = Peer::tls(addr, sni);
        if let Some(ca) = &self.ca {
            peer = peer.with_ca(ca.clone());
        }
        if let Some(cert) = &self.client_cert {
            peer = peer.with_client_cert(cert.clone());
        }
        if let Some(alpn) = &self.alpn {
            peer = peer.with_alpn(alpn.clone());
        }
        if self.insecure {
            peer = peer.with_verify_cert(false).with_verify_hostname(false);
        }
        match peer.key() {
            Ok(_) => Ok(peer),
            Err(e) => Err(CliError::Usage(e.to_string())),
        }
    }
}

fn alpn_offer(arg: AlpnArg) -> Alpn {
    match arg {
        AlpnArg::H1 => Alpn::H1,
        AlpnArg::H2 => Alpn::H2,
        AlpnArg::H2h1 => Alpn::H2H1,
    }
}

fn read_file(flag: &str, path: &Path) -> Result<Vec<u8>, CliError> {
    fs::read(path)
        .map_err(|e| CliError::Usage(format!("cannot read {flag} file {}: {e}", path.display())))
}

fn load_ca(path: &Path) -> Result<Vec<X509>, CliError> {
    let pem = read_file("--ca", path)?;
    let certs = X509::stack_from_pem(&pem).map_err(|e| {
        CliError::Usage(format!(
            "--ca file {} is not valid PEM: {}",
            path.display(),
            one_line(&e.to_string())
        ))
    })?;
    if certs.is_empty() {
        return Err(CliError::Usage(format!(
            "--ca file {} holds no PEM certificate",
            path.display()
        )));
    }
    Ok(certs)
}

/// OpenSSL error stacks can span lines; the CLI promises one line per error.
pub(crate) fn one_line(text: &str) -> String {
    text.lines().map(str::trim).collect::<Vec<_>>().join(" ")
}

/// Connects to the first of `target`'s addresses that accepts a connection.
///
/// Only transport failures move on to the next address; a certificate or handshake failure
/// would repeat on every address of the same server and is returned at once.
///
/// # Errors
/// `Usage` for peer settings the connector rejects; `Failed` naming the error kind and the
/// connector's message for the last address tried.
pub(crate) async fn connect_first(
    connector: &Connector,
    settings: &TlsSettings,
    target: &Target,
    sni: &str,
) -> Result<(Peer, Connection), CliError> {
    let mut last = None;
    for &addr in &target.addrs {
        let peer = settings.peer(addr, sni)?;
        match connector.get(&peer).await {
            Ok(conn) => return Ok((peer, conn)),
            Err(e) if is_transport(e.kind()) => last = Some(e),
            Err(e) => return Err(connect_failure(&e)),
        }
    }
    Err(match last {
        Some(e) => connect_failure(&e),
        // `Target::resolve` never returns an empty list.
        None => CliError::Failed("no address to connect to".into()),
    })
}

fn is_transport(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::ConnectRefused | ErrorKind::ConnectTimedout | ErrorKind::ConnectError
    )
}

/// The one-line message for a failed connection: the kind first, so scripts can match it,
/// then the connector's message (peer, SNI and OpenSSL's reason).
pub(crate) fn connect_failure(e: &Error) -> CliError {
    CliError::Failed(format!("{}: {}", e.kind(), one_line(&e.to_string())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port() {
        assert_eq!(split_host_port("a.test:443"), Ok(("a.test".into(), 443)));
        assert_eq!(split_host_port("[::1]:8443"), Ok(("::1".into(), 8443)));
        for bad in [
            "a.test", ":443", "a:0", "a:x", "::1:443", "[::1:443", "a:70000",
        ] {
            assert!(split_host_port(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn default_sni() {
        let t = |host: &str| Target {
            host: host.into(),
            addrs: Vec::new(),
        };
        assert_eq!(t("example.test").sni(None), "example.test");
        assert_eq!(t("127.0.0.1").sni(None), "");
        assert_eq!(t("::1").sni(None), "");
        assert_eq!(t("127.0.0.1").sni(Some("localhost")), "localhost");
    }
}
