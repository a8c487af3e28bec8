//! A plain tokio-openssl TLS client and a minimal HTTP/1.1 exchange, independent of
//! `upstream_pool`: for checking test servers themselves, and for comparing the library
//! against a straightforward client.
//!
//! OpenSSL pitfall worth knowing when resuming: freeing an `SSL` that was not shut down
//! marks its session not resumable (`SSL_free` → `SSL_CTX_remove_session` sets
//! `not_resumable` on the shared `SSL_SESSION`, even on a copy you kept). Close connections
//! whose session you want to reuse with [`close`] (which sends close_notify) instead of
//! dropping them.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};

use openssl::ssl::{SslConnector, SslMethod, SslSession, SslVerifyMode, SslVersion};
use openssl::x509::X509;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio_openssl::SslStream;

use super::certs::{Identity, TestPki};

/// A session captured from a connection of one particular [`TlsClient`]; it can only be
/// resumed through that client (OpenSSL requires the same `SSL_CTX`).
#[derive(Clone)]
pub(crate) struct ClientSession {
    client_id: usize,
    session: SslSession,
}

impl fmt::Debug for ClientSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientSession")
            .field("client_id", &self.client_id)
            .field("id_len", &self.session.id().len())
            .field("protocol", &self.session.protocol_version())
            .finish()
    }
}

impl ClientSession {
    /// The underlying OpenSSL session.
    pub(crate) fn session(&self) -> &SslSession {
        &self.session
    }
}

/// Settings for a [`TlsClient`]; start from [`TlsClient::builder`].
#[derive(Debug, Clone)]
pub(crate) struct TlsClientBuilder {
    ca: Vec<X509>,
    alpn: Vec<Vec<u8>>,
    min_version: Option<SslVersion>,
    max_version: Option<SslVersion>,
    identity: Option<Identity>,
    groups: Option<String>,
    verify: bool,
    verify_hostname: bool,
}

impl TlsClientBuilder {
    /// ALPN protocols to offer, in preference order (default: none).
    pub(crate) fn alpn(mut self, protos: &[&[u8]]) -> Self {
        self.alpn = protos.iter().map(|p| p.to_vec()).collect();
        self
    }

    /// Lowest TLS version offered (default TLS 1.2).
    pub(crate) fn min_version(mut self, v: SslVersion) -> Self {
        self.min_version = Some(v);
        self
    }

    /// Highest TLS version offered (default TLS 1.3).
    pub(crate) fn max_version(mut self, v: SslVersion) -> Self {
        self.max_version = Some(v);
        self
    }

    /// Offers exactly TLS version `v`.
    pub(crate) fn version(self, v: SslVersion) -> Self {
        self.min_version(v).max_version(v)
    }

    /// Presents `identity` (certificate, intermediates, key) when the server asks.
    pub(crate) fn client_cert(mut self, identity: &Identity) -> Self {
        self.identity = Some(identity.clone());
        self
    }

    /// Key-exchange groups to offer, OpenSSL list syntax.
    pub(crate) fn groups(mut self, groups: &str) -> Self {
        self.groups = Some(groups.to_owned());
        self
    }

    /// Whether to verify the server's chain (default true).
    pub(crate) fn verify(mut self, on: bool) -> Self {
        self.verify = on;
        self
    }

    /// Whether to check the server name against the certificate (default true).
    pub(crate) fn verify_hostname(mut self, on: bool) -> Self {
        self.verify_hostname = on;
        self
    }

    /// Builds the client (one `SSL_CTX`). Panics on invalid settings (test setup error).
    pub(crate) fn build(self) -> TlsClient {
        static NEXT_ID: AtomicUsize = AtomicUsize::new(0);
        let mut b = SslConnector::builder(SslMethod::tls_client()).expect("SslConnector::builder");
        for ca in &self.ca {
            b.cert_store_mut()
                .add_cert(ca.clone())
                .expect("add CA to client store");
        }
        b.set_min_proto_version(Some(self.min_version.unwrap_or(SslVersion::TLS1_2)))
            .expect("set client min version");
        b.set_max_proto_version(self.max_version)
            .expect("set client max version");
        if !self.alpn.is_empty() {
            let mut wire = Vec::new();
            for p in &self.alpn {
                wire.push(u8::try_from(p.len()).expect("ALPN protocol longer than 255 bytes"));
                wire.extend_from_slice(p);
            }
            b.set_alpn_protos(&wire).expect("set client ALPN");
        }
        if let Some(groups) = &self.groups {
            b.set_groups_list(groups).expect("set client groups");
        }
        if let Some(id) = &self.identity {
            b.set_certificate(&id.cert).expect("set client certificate");
            for c in &id.intermediates {
                b.add_extra_chain_cert(c.clone())
                    .expect("add client intermediate");
            }
            b.set_private_key(&id.key).expect("set client key");
        }
        if !self.verify {
            b.set_verify(SslVerifyMode::NONE);
        }
        TlsClient {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            connector: b.build(),
            verify_hostname: self.verify && self.verify_hostname,
        }
    }
}

/// A TLS client over tokio-openssl with its own `SSL_CTX`.
#[derive(Debug)]
pub(crate) struct TlsClient {
    id: usize,
    connector: SslConnector,
    verify_hostname: bool,
}

impl TlsClient {
    /// Settings trusting `ca`, TLS 1.2–1.3, no ALPN, verifying chain and hostname.
    pub(crate) fn builder(ca: Vec<X509>) -> TlsClientBuilder {
        TlsClientBuilder {
            ca,
            alpn: Vec::new(),
            min_version: None,
            max_version: None,
            identity: None,
            groups: None,
            verify: true,
            verify_hostname: true,
        }
    }

    /// A default client trusting `pki`'s root A.
    pub(crate) fn trusting(pki: &TestPki) -> TlsClient {
        Self::builder(pki.ca_a()).build()
    }

    /// Connects over TCP to `addr` and performs the handshake. `sni` is both the SNI sent
    /// and the name verified (an IP literal is verified as an IP SAN and not sent as SNI);
    /// `None` sends no SNI and skips hostname verification. `session` (from
    /// [`Self::session`]) is offered for resumption. The error names the OpenSSL reason and
    /// the verification result.
    pub(crate) async fn connect(
        &self,
        addr: SocketAddr,
        sni: Option<&str>,
        session: Option<&ClientSession>,
    ) -> io::Result<SslStream<TcpStream>> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        self.handshake(tcp, sni, session).await
    }

    /// Like [`Self::connect`], over a Unix socket.
    pub(crate) async fn connect_unix(
        &self,
        path: &Path,
        sni: Option<&str>,
        session: Option<&ClientSession>,
    ) -> io::Result<SslStream<UnixStream>> {
        let stream = UnixStream::connect(path).await?;
        self.handshake(stream, sni, session).await
    }

    /// Performs the client handshake on an already connected stream.
    pub(crate) async fn handshake<S>(
        &self,
        stream: S,
        sni: Option<&str>,
        session: Option<&ClientSession>,
    ) -> io::Result<SslStream<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut config = self.connector.configure().map_err(io::Error::other)?;
        config.set_use_server_name_indication(sni.is_some());
        config.set_verify_hostname(self.verify_hostname && sni.is_some());
        let mut ssl = config
            .into_ssl(sni.unwrap_or(""))
            .map_err(io::Error::other)?;
        if let Some(s) = session {
            if s.client_id != self.id {
                return Err(io::Error::other("session belongs to another TlsClient"));
            }
            set_session(&mut ssl, &s.session)?;
        }
        let mut tls = SslStream::new(ssl, stream).map_err(io::Error::other)?;
        if let Err(e) = Pin::new(&mut tls).connect().await {
            let verify = tls.ssl().verify_result();
            return Err(io::Error::other(format!(
                "TLS handshake with SNI {sni:?} failed: {e} (verify result: {})",
                verify.error_string()
            )));
        }
        Ok(tls)
    }

    /// The session of `stream` (a connection made by this client), for resuming later.
    /// With TLS 1.3 the ticket arrives after the handshake: read application data (e.g. a
    /// response) first, or this returns the ticket-less, non-resumable session.
    pub(crate) fn session<S>(&self, stream: &SslStream<S>) -> Option<ClientSession> {
        let session = stream.ssl().session()?.to_owned();
        Some(ClientSession {
            client_id: self.id,
            session,
        })
    }
}

#[expect(
    unsafe_code,
    reason = "SSL_set_session has no safe binding; the one unsafe call in the test support"
)]
fn set_session(ssl: &mut openssl::ssl::SslRef, session: &SslSession) -> io::Result<()> {
    // SAFETY: `SslRef::set_session` requires the session to come from the same `SSL_CTX`.
    // `TlsClient::handshake` only passes sessions tagged with its own client id, and each
    // `TlsClient` owns exactly one connector (context), so the contexts match.
    unsafe { ssl.set_session(session) }.map_err(io::Error::other)
}

/// Sends close_notify and closes the stream, keeping its TLS session resumable.
pub(crate) async fn close<S>(mut stream: SslStream<S>) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    stream.shutdown().await
}

/// A parsed HTTP/1.x response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HttpResponse {
    /// Status code.
    pub(crate) status: u16,
    /// Header fields in order, names as received.
    pub(crate) headers: Vec<(String, String)>,
    /// The body.
    pub(crate) body: Vec<u8>,
}

impl HttpResponse {
    /// First header named `name` (case-insensitive).
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as (lossy) UTF-8.
    pub(crate) fn body_str(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The server connection id a `TestServer` HTTP behaviour put in the body
    /// (`conn=<id> ...`).
    pub(crate) fn conn_id(&self) -> Option<usize> {
        self.body_str()
            .split_whitespace()
            .find_map(|w| w.strip_prefix("conn="))
            .and_then(|v| v.parse().ok())
    }
}

/// Sends `GET / HTTP/1.1` with `Host: host` and reads the response with [`read_response`].
pub(crate) async fn http_get<S>(stream: &mut S, host: &str) -> io::Result<HttpResponse>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let request =
        format!("GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: upstream-pool-test\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    stream.flush().await?;
    read_response(stream).await
}

/// Reads one HTTP/1.x response without reading past it: the head byte by byte, then exactly
/// `Content-Length` body bytes (or up to EOF when there is no Content-Length). Bytes the
/// server sent after the response stay in the stream.
pub(crate) async fn read_response<S>(stream: &mut S) -> io::Result<HttpResponse>
where
    S: AsyncRead + Unpin,
{
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 64 * 1024 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "response head too large",
            ));
        }
        let mut byte = [0u8; 1];
        if stream.read(&mut byte).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("EOF in response head after {} bytes", head.len()),
            ));
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad status line {status_line:?}"),
            )
        })?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let content_length = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| {
            v.parse::<usize>()
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad Content-Length"))
        })
        .transpose()?;
    let mut body = Vec::new();
    match content_length {
        Some(n) => {
            body.resize(n, 0);
            stream.read_exact(&mut body).await?;
        }
        None => match stream.read_to_end(&mut body).await {
            Ok(_) => {}
            // A server that closes without close_notify still delimited the body by EOF.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {}
            Err(e) => return Err(e),
        },
    }
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}
