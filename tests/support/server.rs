//! In-process test servers: TLS (tokio-openssl) or plaintext, on loopback TCP (IPv4 or IPv6)
//! or a Unix socket, with a chosen [`Behaviour`] and shared, observable statistics.
//!
//! ```ignore
//! let server = TestServer::builder().behaviour(Behaviour::Http).start();
//! // ... connect to server.addr() with SNI "localhost", trusting TestPki::shared().ca_a() ...
//! let stats = server.wait_for(|s| s.handshakes == 1).await;
//! assert_eq!(stats.conns[0].sni.as_deref(), Some("localhost"));
//! ```
//!
//! The server runs on the test's tokio runtime (`tokio::spawn`); dropping the
//! [`TestServer`] aborts the accept loop and every connection task.
//!
//! Server tasks never panic on client misbehaviour: a failed handshake or I/O error is
//! recorded in [`ConnInfo::error`], logged with `UPSTREAM_POOL_TEST_LOG=1`, and the
//! connection dropped.

use std::fmt;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use openssl::error::ErrorStack;
use openssl::nid::Nid;
use openssl::pkey::{Id, PKey, Private};
use openssl::ssl::{
    AlpnError, NameType, Ssl, SslAcceptor, SslContext, SslMethod, SslOptions, SslRef,
    SslSessionCacheMode, SslVerifyMode, SslVersion,
};
use openssl::x509::{X509VerifyResult, X509};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UnixListener};
use tokio::task::{AbortHandle, JoinHandle};
use tokio_openssl::SslStream;

use super::certs::{common_name, Identity, TestPki};
use super::{client_hello, test_log, TempDir};

/// What a test server does with each accepted connection.
///
/// `Echo`, `Http`, `HttpThenStray`, `HttpClose` and `CloseAfter` run after the TLS handshake
/// (or directly on TCP for a [`TestServerBuilder::plaintext`] server). The others act on the
/// raw TCP stream and never start TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Behaviour {
    /// Echo every byte back; on EOF shut down (close_notify) and close.
    Echo,
    /// Minimal HTTP/1.1 keep-alive server: for each request (headers up to `\r\n\r\n`, plus
    /// a `Content-Length` body if any) reply `200 OK` with body `conn=<id> req=<n>\n`, where
    /// `<id>` is the server's connection id ([`ConnInfo::id`]) and `<n>` counts requests on
    /// that connection from 1. Also sets `X-Conn-Id: <id>`.
    #[default]
    Http,
    /// Like `Http`, but after each response writes [`STRAY_BYTES`] that belong to no
    /// response (an idle pooled connection then has unexpected data).
    HttpThenStray,
    /// Answer one request with `Connection: close`, then send close_notify and close.
    HttpClose,
    /// Like `Http`, but close (close_notify + FIN) a connection that has been idle for the
    /// given time, as nginx's `keepalive_timeout` does.
    CloseAfter(Duration),
    /// Accept the TCP connection and never read or write; held until the server is dropped.
    NeverAnswer,
    /// No TLS: read whatever arrives, answer `HTTP/1.1 400 Bad Request` and close.
    PlaintextHttp,
    /// Write [`GARBAGE_LEN`] random non-TLS bytes right after accept, then discard input
    /// until the client closes.
    Garbage,
    /// Set `SO_LINGER` to zero and drop the socket right after accept, so the client gets a
    /// TCP RST (Unix sockets are just closed).
    RstAfterAccept,
    /// Read the first bytes (the ClientHello) and close without answering.
    CloseAfterClientHello,
    /// Read the first bytes (the ClientHello), then close with `SO_LINGER` zero, so the
    /// client gets a TCP RST mid-handshake (Unix sockets are just closed).
    RstAfterClientHello,
}

impl Behaviour {
    /// Whether this behaviour performs a TLS handshake (on a TLS server).
    pub(crate) fn uses_tls(self) -> bool {
        matches!(
            self,
            Behaviour::Echo
                | Behaviour::Http
                | Behaviour::HttpThenStray
                | Behaviour::HttpClose
                | Behaviour::CloseAfter(_)
        )
    }
}

/// Bytes [`Behaviour::HttpThenStray`] writes after each response.
pub(crate) const STRAY_BYTES: &[u8] = b"STRAY-BYTES-AFTER-RESPONSE\r\n";

/// How many bytes [`Behaviour::Garbage`] writes. The first byte is `0xff`, never a valid TLS
/// record type.
pub(crate) const GARBAGE_LEN: usize = 64;

/// How the server picks an ALPN protocol from the client's offer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) enum AlpnPolicy {
    /// No ALPN callback: the server never negotiates ALPN (the default).
    #[default]
    Off,
    /// Pick the first protocol of this list that the client offered; when none matches,
    /// continue without ALPN.
    ServerPreference(Vec<Vec<u8>>),
    /// Pick the first protocol of the client's offer that is in this list; when none
    /// matches, continue without ALPN.
    ClientPreference(Vec<Vec<u8>>),
}

impl AlpnPolicy {
    /// Server prefers `h2`, then `http/1.1` (like nginx with http2 on).
    pub(crate) fn h2_then_h1() -> Self {
        AlpnPolicy::ServerPreference(vec![b"h2".to_vec(), b"http/1.1".to_vec()])
    }

    /// Server supports only `proto`: picked when offered, otherwise no ALPN.
    pub(crate) fn fixed(proto: &[u8]) -> Self {
        AlpnPolicy::ServerPreference(vec![proto.to_vec()])
    }
}

/// Whether (and how) the server asks for a client certificate.
#[derive(Debug, Clone, Default)]
pub(crate) enum ClientAuth {
    /// Do not request a client certificate (the default).
    #[default]
    None,
    /// Request one, verify it against `ca`, but complete the handshake even when it is
    /// missing or fails verification; [`ConnInfo::client_cert_verified`] tells which.
    Optional {
        /// Trusted CAs for client certificates (also sent as acceptable CA names).
        ca: Vec<X509>,
    },
    /// Require a certificate that verifies against `ca`; otherwise the handshake fails.
    Required {
        /// Trusted CAs for client certificates (also sent as acceptable CA names).
        ca: Vec<X509>,
    },
}

/// Where the server listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Listen {
    /// `127.0.0.1:0` (the default).
    #[default]
    Ipv4,
    /// `[::1]:0`.
    Ipv6,
    /// A fresh Unix socket path in a temporary directory.
    Unix,
}

/// What the server observed about one accepted connection. `id` is also its index in
/// [`Stats::conns`].
#[derive(Debug, Clone, Default)]
pub(crate) struct ConnInfo {
    /// Connection id, counting accepted connections from 0.
    pub(crate) id: usize,
    /// Client address (`None` for Unix sockets).
    pub(crate) peer: Option<SocketAddr>,
    /// The TLS handshake completed.
    pub(crate) handshake_done: bool,
    /// The handshake resumed a session (`SSL_session_reused`).
    pub(crate) resumed: bool,
    /// SNI the client sent in this handshake, parsed from its raw ClientHello (`None` when
    /// it sent none).
    pub(crate) sni: Option<String>,
    /// What OpenSSL's `SSL_get_servername` reports after the handshake. Differs from `sni`
    /// on a resumed TLS 1.2 handshake: OpenSSL then reports the *session's* name, whatever
    /// the client sent.
    pub(crate) servername_after: Option<String>,
    /// Negotiated ALPN protocol.
    pub(crate) alpn: Option<Vec<u8>>,
    /// Negotiated protocol version, e.g. `"TLSv1.3"`.
    pub(crate) version: Option<String>,
    /// Negotiated cipher (OpenSSL name).
    pub(crate) cipher: Option<String>,
    /// Key-exchange group, e.g. `"X25519"` or `"prime256v1"`, read from the ephemeral key
    /// during the handshake (`None` on a resumed TLS 1.2 handshake, which has no key
    /// exchange).
    pub(crate) group: Option<String>,
    /// Subject CNs of the client certificate and the chain it sent (leaf first); empty when
    /// the client sent none.
    pub(crate) client_cert_cns: Vec<String>,
    /// A client certificate was presented and verified against the configured CA.
    pub(crate) client_cert_verified: bool,
    /// HTTP requests answered on this connection.
    pub(crate) requests: usize,
    /// The connection task has finished (the server side is closed).
    pub(crate) closed: bool,
    /// Why the connection ended abnormally (handshake failure, I/O error, timeout).
    pub(crate) error: Option<String>,
}

/// A snapshot of a server's statistics, from [`TestServer::stats`].
#[derive(Debug, Clone, Default)]
pub(crate) struct Stats {
    /// TCP (or Unix) connections accepted.
    pub(crate) accepted: usize,
    /// TLS handshakes completed (full + resumed).
    pub(crate) handshakes: usize,
    /// Completed handshakes that resumed a session.
    pub(crate) resumed: usize,
    /// TLS handshakes that failed or timed out.
    pub(crate) handshake_failures: usize,
    /// Connections currently open on the server side.
    pub(crate) open: usize,
    /// HTTP requests answered, all connections.
    pub(crate) requests: usize,
    /// Per-connection details, indexed by connection id.
    pub(crate) conns: Vec<ConnInfo>,
}

impl Stats {
    /// Completed handshakes that were not resumed.
    pub(crate) fn full_handshakes(&self) -> usize {
        self.handshakes - self.resumed
    }

    /// The most recently accepted connection.
    pub(crate) fn last(&self) -> Option<&ConnInfo> {
        self.conns.last()
    }
}

#[derive(Debug, Default)]
struct Shared {
    accepted: AtomicUsize,
    handshakes: AtomicUsize,
    resumed: AtomicUsize,
    handshake_failures: AtomicUsize,
    open: AtomicUsize,
    requests: AtomicUsize,
    conns: Mutex<Vec<ConnInfo>>,
    tasks: Mutex<Vec<AbortHandle>>,
}

/// Locks a mutex, ignoring poisoning (a panicking test thread must not cascade into the
/// server's tasks).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn update(&self, id: usize, f: impl FnOnce(&mut ConnInfo)) {
        if let Some(c) = lock(&self.conns).get_mut(id) {
            f(c);
        }
    }

    fn snapshot(&self) -> Stats {
        Stats {
            accepted: self.accepted.load(Ordering::SeqCst),
            handshakes: self.handshakes.load(Ordering::SeqCst),
            resumed: self.resumed.load(Ordering::SeqCst),
            handshake_failures: self.handshake_failures.load(Ordering::SeqCst),
            open: self.open.load(Ordering::SeqCst),
            requests: self.requests.load(Ordering::SeqCst),
            conns: lock(&self.conns).clone(),
        }
    }
}

/// Keeps [`Stats::open`] right however a connection task ends (including abort).
struct OpenGuard {
    shared: Arc<Shared>,
    id: usize,
}

impl OpenGuard {
    fn new(shared: Arc<Shared>, id: usize) -> Self {
        shared.open.fetch_add(1, Ordering::SeqCst);
        OpenGuard { shared, id }
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.shared.update(self.id, |c| c.closed = true);
        self.shared.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Builder for [`TestServer`]; start from [`TestServer::builder`].
#[derive(Debug, Clone)]
pub(crate) struct TestServerBuilder {
    identity: Option<Identity>,
    tls: bool,
    listen: Listen,
    min_version: Option<SslVersion>,
    max_version: Option<SslVersion>,
    alpn: AlpnPolicy,
    client_auth: ClientAuth,
    groups: Option<String>,
    resumption: bool,
    tickets: bool,
    session_timeout: Option<Duration>,
    session_id_context: bool,
    behaviour: Behaviour,
    handshake_timeout: Duration,
}

impl TestServerBuilder {
    /// Presents `identity`'s certificate, intermediates and key. Default:
    /// `TestPki::shared().server` (localhost / 127.0.0.1 / ::1, chain via intermediate A).
    pub(crate) fn identity(mut self, identity: &Identity) -> Self {
        self.identity = Some(identity.clone());
        self
    }

    /// Presents `leaf` followed by `intermediates`, with `key`.
    pub(crate) fn cert_chain(
        mut self,
        leaf: X509,
        intermediates: Vec<X509>,
        key: PKey<Private>,
    ) -> Self {
        self.identity = Some(Identity::from_parts(leaf, key, intermediates));
        self
    }

    /// Serves without TLS: TLS behaviours (`Http`, `Echo`, ...) run directly on TCP.
    pub(crate) fn plaintext(mut self) -> Self {
        self.tls = false;
        self
    }

    /// Where to listen (default `127.0.0.1:0`).
    pub(crate) fn listen(mut self, listen: Listen) -> Self {
        self.listen = listen;
        self
    }

    /// Lowest TLS version accepted (default TLS 1.2).
    pub(crate) fn min_version(mut self, v: SslVersion) -> Self {
        self.min_version = Some(v);
        self
    }

    /// Highest TLS version accepted (default: the highest OpenSSL supports, TLS 1.3).
    pub(crate) fn max_version(mut self, v: SslVersion) -> Self {
        self.max_version = Some(v);
        self
    }

    /// Accepts exactly TLS version `v` (sets min and max).
    pub(crate) fn version(self, v: SslVersion) -> Self {
        self.min_version(v).max_version(v)
    }

    /// How ALPN is selected (default [`AlpnPolicy::Off`]).
    pub(crate) fn alpn(mut self, policy: AlpnPolicy) -> Self {
        self.alpn = policy;
        self
    }

    /// Client certificate policy (default [`ClientAuth::None`]).
    pub(crate) fn client_auth(mut self, auth: ClientAuth) -> Self {
        self.client_auth = auth;
        self
    }

    /// Key-exchange groups the server accepts, OpenSSL list syntax (e.g. `"P-256"`,
    /// `"X25519:P-384"`). Default: OpenSSL's.
    pub(crate) fn groups(mut self, groups: &str) -> Self {
        self.groups = Some(groups.to_owned());
        self
    }

    /// Whether sessions can be resumed at all (default true). `false` sets `NO_TICKET`,
    /// zero TLS 1.3 tickets and turns the server session cache off, so every handshake is
    /// full.
    pub(crate) fn resumption(mut self, on: bool) -> Self {
        self.resumption = on;
        self
    }

    /// Whether session tickets are issued (default true). With `false` but resumption on,
    /// TLS 1.2 resumes by session id from the server cache, and TLS 1.3 uses stateful
    /// tickets (OpenSSL's `SSL_OP_NO_TICKET` behaviour in 1.3).
    pub(crate) fn tickets(mut self, on: bool) -> Self {
        self.tickets = on;
        self
    }

    /// Lifetime of the sessions the server issues (`SSL_CTX_set_timeout`, whole seconds;
    /// also the ticket lifetime hint it sends). Default: OpenSSL's (7200 s). A session older
    /// than this is no longer resumed by the server.
    pub(crate) fn session_timeout(mut self, timeout: Duration) -> Self {
        self.session_timeout = Some(timeout);
        self
    }

    /// Whether the server sets a session id context (default true). Without one, a server
    /// that requests client certificates fails every resumption attempt with a fatal alert
    /// ("session id context uninitialized"), as misconfigured servers in the wild do.
    pub(crate) fn session_id_context(mut self, on: bool) -> Self {
        self.session_id_context = on;
        self
    }

    /// What to do with each connection (default [`Behaviour::Http`]).
    pub(crate) fn behaviour(mut self, behaviour: Behaviour) -> Self {
        self.behaviour = behaviour;
        self
    }

    /// How long a client may take to complete the handshake before the server drops it
    /// (default 10 s).
    pub(crate) fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// Binds, listens (backlog 1024) and spawns the accept loop on the current tokio
    /// runtime. Panics with a description when setup fails; use [`Self::try_start`] to
    /// handle failure (e.g. to skip when IPv6 is unavailable).
    pub(crate) fn start(self) -> TestServer {
        let listen = self.listen;
        self.try_start()
            .unwrap_or_else(|e| panic!("start test server on {listen:?}: {e}"))
    }

    /// Like [`Self::start`], returning setup errors (bind, listen, bad TLS settings).
    pub(crate) fn try_start(self) -> io::Result<TestServer> {
        let ctx = if self.tls {
            Some(self.build_context().map_err(io::Error::other)?)
        } else {
            None
        };
        let shared = Arc::new(Shared::default());
        let conf = Arc::new(ConnConfig {
            ctx,
            behaviour: self.behaviour,
            handshake_timeout: self.handshake_timeout,
        });

        let (endpoint, accept_task, unix_dir) = match self.listen {
            Listen::Ipv4 | Listen::Ipv6 => {
                let (socket, addr) = if self.listen == Listen::Ipv4 {
                    (
                        TcpSocket::new_v4()?,
                        SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
                    )
                } else {
                    (
                        TcpSocket::new_v6()?,
                        SocketAddr::from((Ipv6Addr::LOCALHOST, 0)),
                    )
                };
                socket.set_reuseaddr(true)?;
                socket.bind(addr)?;
                let listener = socket.listen(1024)?;
                let local = listener.local_addr()?;
                let task = tokio::spawn(accept_tcp(listener, shared.clone(), conf));
                (Endpoint::Tcp(local), task, None)
            }
            Listen::Unix => {
                let dir = TempDir::new("unix-server")?;
                let path = dir.join("server.sock");
                let listener = UnixListener::bind(&path)?;
                let task = tokio::spawn(accept_unix(listener, shared.clone(), conf));
                (Endpoint::Unix(path), task, Some(dir))
            }
        };
        Ok(TestServer {
            endpoint,
            shared,
            accept_task,
            _unix_dir: unix_dir,
        })
    }

    fn build_context(&self) -> Result<SslContext, ErrorStack> {
        let identity = self
            .identity
            .clone()
            .unwrap_or_else(|| TestPki::shared().server.clone());
        let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server())?;
        b.set_certificate(&identity.cert)?;
        for c in &identity.intermediates {
            b.add_extra_chain_cert(c.clone())?;
        }
        b.set_private_key(&identity.key)?;
        b.check_private_key()?;
        b.set_min_proto_version(Some(self.min_version.unwrap_or(SslVersion::TLS1_2)))?;
        b.set_max_proto_version(self.max_version)?;
        // Required for resumption whenever client certificates are requested, harmless
        // otherwise.
        if self.session_id_context {
            b.set_session_id_context(b"upstream-pool-test-server")?;
        }
        if let Some(groups) = &self.groups {
            b.set_groups_list(groups)?;
        }
        if !self.tickets {
            b.set_options(SslOptions::NO_TICKET);
        }
        if let Some(timeout) = self.session_timeout {
            set_session_timeout(&mut b, timeout);
        }
        if !self.resumption {
            b.set_options(SslOptions::NO_TICKET);
            b.set_session_cache_mode(SslSessionCacheMode::OFF);
            b.set_num_tickets(0)?;
        }

        // Accept every SNI, as nginx does. Without a callback OpenSSL does not acknowledge
        // the SNI nor store it in the session, and `servername_after` would then be `None`
        // on a resumed TLS 1.2 handshake instead of the session's name.
        b.set_servername_callback(|_ssl, _alert| Ok(()));

        match &self.alpn {
            AlpnPolicy::Off => {}
            AlpnPolicy::ServerPreference(list) => {
                let list = list.clone();
                b.set_alpn_select_callback(move |_ssl, client| {
                    list.iter()
                        .find_map(|want| alpn_protocols(client).find(|p| *p == want.as_slice()))
                        .ok_or(AlpnError::NOACK)
                });
            }
            AlpnPolicy::ClientPreference(list) => {
                let list = list.clone();
                b.set_alpn_select_callback(move |_ssl, client| {
                    alpn_protocols(client)
                        .find(|p| list.iter().any(|want| want.as_slice() == *p))
                        .ok_or(AlpnError::NOACK)
                });
            }
        }

        match &self.client_auth {
            ClientAuth::None => {}
            ClientAuth::Optional { ca } | ClientAuth::Required { ca } => {
                for c in ca {
                    b.cert_store_mut().add_cert(c.clone())?;
                    b.add_client_ca(c)?;
                }
                if matches!(self.client_auth, ClientAuth::Optional { .. }) {
                    // Accept whatever arrives; the verification result stays available via
                    // SSL_get_verify_result.
                    b.set_verify_callback(SslVerifyMode::PEER, |_preverify, _ctx| true);
                } else {
                    b.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT);
                }
            }
        }
        Ok(b.build().into_context())
    }
}

extern "C" {
    // In libssl since 0.9.8; openssl-sys does not declare it (and the crate has no binding).
    fn SSL_CTX_set_timeout(ctx: *mut openssl_sys::SSL_CTX, t: std::ffi::c_long)
        -> std::ffi::c_long;
}

/// `SSL_CTX_set_timeout`: the lifetime of the sessions this server context issues.
#[allow(
    unsafe_code,
    reason = "SSL_CTX_set_timeout has no binding in the openssl crate; test support only"
)]
fn set_session_timeout(b: &mut openssl::ssl::SslContextBuilder, timeout: Duration) {
    let secs = std::ffi::c_long::try_from(timeout.as_secs()).unwrap_or(std::ffi::c_long::MAX);
    // SAFETY: `b.as_ptr()` is the live SSL_CTX owned by the builder and not yet shared with
    // any other thread; SSL_CTX_set_timeout only stores the value.
    unsafe {
        SSL_CTX_set_timeout(b.as_ptr(), secs);
    }
}

/// Iterates over the protocols of an ALPN wire-format list; stops at a malformed entry.
fn alpn_protocols(wire: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = wire;
    std::iter::from_fn(move || {
        let (&len, tail) = rest.split_first()?;
        let len = usize::from(len);
        if len == 0 || tail.len() < len {
            return None;
        }
        let (proto, tail) = tail.split_at(len);
        rest = tail;
        Some(proto)
    })
}

#[derive(Debug)]
enum Endpoint {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

/// A running test server; see the module documentation. Dropping it stops the server.
#[derive(Debug)]
pub(crate) struct TestServer {
    endpoint: Endpoint,
    shared: Arc<Shared>,
    accept_task: JoinHandle<()>,
    _unix_dir: Option<TempDir>,
}

impl TestServer {
    /// A builder with the defaults: TLS with `TestPki::shared().server`, `127.0.0.1:0`,
    /// TLS 1.2–1.3, no ALPN, no client certificates, resumption and tickets on,
    /// [`Behaviour::Http`].
    pub(crate) fn builder() -> TestServerBuilder {
        TestServerBuilder {
            identity: None,
            tls: true,
            listen: Listen::Ipv4,
            min_version: None,
            max_version: None,
            alpn: AlpnPolicy::Off,
            client_auth: ClientAuth::None,
            groups: None,
            resumption: true,
            tickets: true,
            session_timeout: None,
            session_id_context: true,
            behaviour: Behaviour::Http,
            handshake_timeout: Duration::from_secs(10),
        }
    }

    /// Starts a default server ([`Self::builder`]) with the given behaviour.
    pub(crate) fn start(behaviour: Behaviour) -> TestServer {
        Self::builder().behaviour(behaviour).start()
    }

    /// The TCP address the server listens on. Panics for a Unix-socket server.
    pub(crate) fn addr(&self) -> SocketAddr {
        match &self.endpoint {
            Endpoint::Tcp(a) => *a,
            Endpoint::Unix(p) => panic!("test server listens on Unix socket {}", p.display()),
        }
    }

    /// The Unix socket path, for a [`Listen::Unix`] server.
    pub(crate) fn unix_path(&self) -> Option<&Path> {
        match &self.endpoint {
            Endpoint::Tcp(_) => None,
            Endpoint::Unix(p) => Some(p),
        }
    }

    /// A snapshot of the statistics.
    pub(crate) fn stats(&self) -> Stats {
        self.shared.snapshot()
    }

    /// Polls the statistics until `pred` holds and returns that snapshot. Server-side
    /// counters trail the client (a TLS 1.3 client finishes its handshake before the server
    /// has read the client's Finished), so tests should wait rather than read once. Panics
    /// with the last snapshot after 5 s.
    pub(crate) async fn wait_for(&self, pred: impl Fn(&Stats) -> bool) -> Stats {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let stats = self.stats();
            if pred(&stats) {
                return stats;
            }
            if Instant::now() >= deadline {
                panic!("test server statistics never matched; last snapshot: {stats:#?}");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Closes every open connection from the server side without TLS shutdown (the tasks
    /// are aborted, so clients see a bare FIN). The server keeps accepting.
    pub(crate) fn close_connections(&self) {
        for task in lock(&self.shared.tasks).drain(..) {
            task.abort();
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.accept_task.abort();
        self.close_connections();
    }
}

/// Per-server settings every connection task needs.
struct ConnConfig {
    ctx: Option<SslContext>,
    behaviour: Behaviour,
    handshake_timeout: Duration,
}

impl fmt::Debug for ConnConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnConfig")
            .field("tls", &self.ctx.is_some())
            .field("behaviour", &self.behaviour)
            .finish()
    }
}

/// Registers an accepted connection and returns its id.
fn register(shared: &Shared, peer: Option<SocketAddr>) -> usize {
    let mut conns = lock(&shared.conns);
    let id = conns.len();
    conns.push(ConnInfo {
        id,
        peer,
        ..ConnInfo::default()
    });
    shared.accepted.fetch_add(1, Ordering::SeqCst);
    id
}

fn spawn_conn<S>(shared: &Arc<Shared>, conf: &Arc<ConnConfig>, id: usize, stream: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let guard = OpenGuard::new(shared.clone(), id);
    let shared2 = shared.clone();
    let conf = conf.clone();
    let task = tokio::spawn(async move {
        let _guard = guard;
        if let Err(e) = handle_conn(&shared2, &conf, id, stream).await {
            test_log!("test server: connection {id} ended: {e}");
            shared2.update(id, |c| c.error = Some(e.to_string()));
        }
    });
    let mut tasks = lock(&shared.tasks);
    tasks.retain(|t| !t.is_finished());
    tasks.push(task.abort_handle());
}

async fn accept_tcp(listener: TcpListener, shared: Arc<Shared>, conf: Arc<ConnConfig>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                test_log!("test server: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let id = register(&shared, Some(peer));
        if conf.behaviour == Behaviour::RstAfterAccept {
            reset(stream);
            shared.update(id, |c| c.closed = true);
            continue;
        }
        if conf.behaviour == Behaviour::RstAfterClientHello {
            // The connection task closes it after reading; with linger 0 that close is an RST.
            if let Err(e) = stream.set_zero_linger() {
                test_log!("test server: SO_LINGER 0 failed: {e}");
            }
        }
        let _ = stream.set_nodelay(true);
        spawn_conn(&shared, &conf, id, stream);
    }
}

async fn accept_unix(listener: UnixListener, shared: Arc<Shared>, conf: Arc<ConnConfig>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                test_log!("test server: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let id = register(&shared, None);
        if conf.behaviour == Behaviour::RstAfterAccept {
            drop(stream);
            shared.update(id, |c| c.closed = true);
            continue;
        }
        spawn_conn(&shared, &conf, id, stream);
    }
}

/// Closes `stream` with an RST: `SO_LINGER` 0, then close.
fn reset(stream: TcpStream) {
    if let Err(e) = stream.set_zero_linger() {
        test_log!("test server: SO_LINGER 0 failed: {e}");
    }
    drop(stream);
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

async fn handle_conn<S>(
    shared: &Shared,
    conf: &ConnConfig,
    id: usize,
    mut stream: S,
) -> Result<(), BoxError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    match conf.behaviour {
        Behaviour::NeverAnswer => {
            std::future::pending::<()>().await;
            return Ok(());
        }
        Behaviour::PlaintextHttp => {
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf).await?;
            stream
                .write_all(
                    b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                )
                .await?;
            stream.shutdown().await?;
            drain(&mut stream).await;
            return Ok(());
        }
        Behaviour::Garbage => {
            let mut garbage = [0u8; GARBAGE_LEN];
            openssl::rand::rand_bytes(&mut garbage)?;
            garbage[0] = 0xff;
            stream.write_all(&garbage).await?;
            drain(&mut stream).await;
            return Ok(());
        }
        Behaviour::CloseAfterClientHello | Behaviour::RstAfterClientHello => {
            let mut buf = [0u8; 16 * 1024];
            let _ = stream.read(&mut buf).await?;
            return Ok(());
        }
        // Handled in the accept loop; kept for exhaustiveness.
        Behaviour::RstAfterAccept => return Ok(()),
        Behaviour::Echo
        | Behaviour::Http
        | Behaviour::HttpThenStray
        | Behaviour::HttpClose
        | Behaviour::CloseAfter(_) => {}
    }

    match &conf.ctx {
        None => serve(shared, conf.behaviour, id, stream).await,
        Some(ctx) => {
            let mut tls = SslStream::new(Ssl::new(ctx)?, Recorder::new(stream))?;
            // Drive the handshake by hand to catch the ephemeral key while OpenSSL holds it:
            // a TLS 1.2 server frees it as soon as it has processed the ClientKeyExchange.
            let mut group = None;
            let handshake = std::future::poll_fn(|cx| {
                let poll = Pin::new(&mut tls).poll_accept(cx);
                if group.is_none() {
                    group = key_exchange_group(tls.ssl());
                }
                poll
            });
            let hs = tokio::time::timeout(conf.handshake_timeout, handshake).await;
            let failure = match hs {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(format!("TLS handshake failed: {e}")),
                Err(_) => Some("TLS handshake timed out".to_owned()),
            };
            if let Some(msg) = failure {
                shared.handshake_failures.fetch_add(1, Ordering::SeqCst);
                return Err(msg.into());
            }
            let client_hello = tls.get_mut().finish();
            record_handshake(shared, id, tls.ssl(), group, &client_hello);
            serve(shared, conf.behaviour, id, tls).await
        }
    }
}

fn record_handshake(
    shared: &Shared,
    id: usize,
    ssl: &SslRef,
    group: Option<String>,
    client_hello: &[u8],
) {
    let resumed = ssl.session_reused();
    let mut client_cert_cns = Vec::new();
    let mut client_cert_verified = false;
    if let Some(leaf) = ssl.peer_certificate() {
        client_cert_cns.extend(common_name(leaf.subject_name()));
        // On the server, SSL_get_peer_cert_chain excludes the leaf.
        if let Some(chain) = ssl.peer_cert_chain() {
            client_cert_cns.extend(chain.iter().filter_map(|c| common_name(c.subject_name())));
        }
        client_cert_verified = ssl.verify_result() == X509VerifyResult::OK;
    }
    let info = ConnInfo {
        handshake_done: true,
        resumed,
        sni: client_hello::sni(client_hello),
        servername_after: ssl.servername(NameType::HOST_NAME).map(str::to_owned),
        alpn: ssl.selected_alpn_protocol().map(<[u8]>::to_vec),
        version: Some(ssl.version_str().to_owned()),
        cipher: ssl.current_cipher().map(|c| c.name().to_owned()),
        group: group.or_else(|| key_exchange_group(ssl)),
        client_cert_cns,
        client_cert_verified,
        ..ConnInfo::default()
    };
    shared.update(id, |c| {
        *c = ConnInfo {
            id: c.id,
            peer: c.peer,
            ..info
        }
    });
    shared.handshakes.fetch_add(1, Ordering::SeqCst);
    if resumed {
        shared.resumed.fetch_add(1, Ordering::SeqCst);
    }
}

/// Names the key-exchange group from the ephemeral keys OpenSSL currently holds (the crate
/// has no binding for `SSL_get_negotiated_group`).
fn key_exchange_group(ssl: &SslRef) -> Option<String> {
    fn name(id: Id, curve: Option<Nid>) -> Option<String> {
        match id {
            Id::X25519 => Some("X25519".to_owned()),
            Id::X448 => Some("X448".to_owned()),
            Id::EC => curve.and_then(|n| n.short_name().ok()).map(str::to_owned),
            _ => None,
        }
    }
    if let Ok(k) = ssl.peer_tmp_key() {
        let curve = k.ec_key().ok().and_then(|ec| ec.group().curve_name());
        return name(k.id(), curve);
    }
    if let Ok(k) = ssl.tmp_key() {
        let curve = k.ec_key().ok().and_then(|ec| ec.group().curve_name());
        return name(k.id(), curve);
    }
    None
}

/// Reads and discards until EOF, an error, or 10 s, so the peer sees our bytes (and a FIN)
/// rather than an RST caused by closing with unread input.
async fn drain<S: AsyncRead + Unpin>(stream: &mut S) {
    let mut buf = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
    })
    .await;
}

/// Runs the post-handshake behaviours on an established (TLS or plain) stream.
async fn serve<S>(
    shared: &Shared,
    behaviour: Behaviour,
    id: usize,
    mut stream: S,
) -> Result<(), BoxError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if behaviour == Behaviour::Echo {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                stream.shutdown().await?;
                return Ok(());
            }
            stream.write_all(&buf[..n]).await?;
        }
    }

    let idle_limit = match behaviour {
        Behaviour::CloseAfter(d) => Some(d),
        _ => None,
    };
    let mut buf = Vec::with_capacity(4096);
    let mut served = 0usize;
    loop {
        let request = match idle_limit {
            None => read_request(&mut stream, &mut buf).await?,
            Some(limit) => {
                match tokio::time::timeout(limit, read_request(&mut stream, &mut buf)).await {
                    Ok(r) => r?,
                    Err(_) => {
                        // Idle too long: close politely, like nginx's keepalive_timeout.
                        stream.shutdown().await?;
                        return Ok(());
                    }
                }
            }
        };
        if !request {
            // Client closed between requests: answer its close_notify with ours.
            let _ = stream.shutdown().await;
            return Ok(());
        }
        served += 1;
        shared.requests.fetch_add(1, Ordering::SeqCst);
        shared.update(id, |c| c.requests = served);

        let close = behaviour == Behaviour::HttpClose;
        let body = format!("conn={id} req={served}\n");
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nX-Conn-Id: {id}\r\n{}\r\n{body}",
            body.len(),
            if close { "Connection: close\r\n" } else { "" },
        );
        stream.write_all(response.as_bytes()).await?;
        if behaviour == Behaviour::HttpThenStray {
            stream.write_all(STRAY_BYTES).await?;
        }
        stream.flush().await?;
        if close {
            stream.shutdown().await?;
            return Ok(());
        }
    }
}

/// Largest request head accepted.
const MAX_HEAD: usize = 64 * 1024;

/// Reads one request (head and `Content-Length` body) and consumes it from `buf`, which
/// carries pipelined bytes across calls. `Ok(false)` on a clean EOF before a request starts.
async fn read_request<S: AsyncRead + Unpin>(stream: &mut S, buf: &mut Vec<u8>) -> io::Result<bool> {
    let head_end = loop {
        if let Some(pos) = find(buf, b"\r\n\r\n") {
            break pos + 4;
        }
        if buf.len() > MAX_HEAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "request head too large",
            ));
        }
        if read_more(stream, buf).await? == 0 {
            return if buf.is_empty() {
                Ok(false)
            } else {
                Err(io::ErrorKind::UnexpectedEof.into())
            };
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]);
    let body_len = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| v.trim().parse::<usize>())
        .transpose()
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad Content-Length"))?
        .unwrap_or(0);
    while buf.len() < head_end + body_len {
        if read_more(stream, buf).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
    buf.drain(..head_end + body_len);
    Ok(true)
}

async fn read_more<S: AsyncRead + Unpin>(stream: &mut S, buf: &mut Vec<u8>) -> io::Result<usize> {
    let mut chunk = [0u8; 4096];
    let n = stream.read(&mut chunk).await?;
    buf.extend_from_slice(&chunk[..n]);
    Ok(n)
}

/// Position of `needle` in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Most bytes [`Recorder`] keeps: far more than any ClientHello OpenSSL 3 sends.
const RECORD_LIMIT: usize = 16 * 1024;

/// Passes I/O through while keeping a copy of the first bytes the client sends (its
/// ClientHello), so the server can report the SNI the client actually sent.
#[derive(Debug)]
struct Recorder<S> {
    inner: S,
    captured: Vec<u8>,
    capturing: bool,
}

impl<S> Recorder<S> {
    fn new(inner: S) -> Self {
        Recorder {
            inner,
            captured: Vec::new(),
            capturing: true,
        }
    }

    /// Stops recording and returns what was captured.
    fn finish(&mut self) -> Vec<u8> {
        self.capturing = false;
        std::mem::take(&mut self.captured)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Recorder<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        if this.capturing {
            if let Poll::Ready(Ok(())) = poll {
                let new = &buf.filled()[before..];
                let room = RECORD_LIMIT.saturating_sub(this.captured.len());
                this.captured.extend_from_slice(&new[..new.len().min(room)]);
                this.capturing = this.captured.len() < RECORD_LIMIT;
            }
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Recorder<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
