//! Upstreams in a child process: the benchmark binary re-executes itself with
//! [`CHILD_ENV`] set, and the child serves instead of benchmarking.
//!
//! Why a child and not a thread: the hard open-file limit here is 20,000 and cannot be raised
//! without privileges, and 10,000 pooled connections with both ends in one process need
//! 20,000 descriptors plus the rest. In a child the upstream's sockets count against the
//! child's limit, and its memory does not show up in the client's RSS.
//!
//! Protocol: the child binds `127.0.0.1:0` (backlog 4,096), prints `LISTENING <port>` on
//! stdout and serves until its stdin reaches end of file, which happens when the parent exits
//! or drops the [`ChildUpstream`] (which also kills it by PID and reaps it).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

/// Set (to the mode name) in a child's environment; see the module documentation.
pub(crate) const CHILD_ENV: &str = "UPSTREAM_POOL_BENCH_CHILD";
const CHAIN_ENV: &str = "UPSTREAM_POOL_BENCH_CHAIN";
const KEY_ENV: &str = "UPSTREAM_POOL_BENCH_KEY";

/// What the child upstream does with each connection.
#[derive(Debug, Clone)]
pub(crate) enum Upstream {
    /// Plaintext TCP: accept and hold the socket, never read or write.
    PlainHold,
    /// TLS: accept, complete the handshake (session cache and tickets on), then hold the
    /// connection until the client closes it.
    TlsHold {
        /// Certificate chain PEM (leaf first).
        chain: PathBuf,
        /// Private key PEM.
        key: PathBuf,
    },
    /// TLS with ALPN (`h2`, else `http/1.1`): answers every request; see
    /// [`super::http_upstream`].
    Http {
        /// Certificate chain PEM (leaf first).
        chain: PathBuf,
        /// Private key PEM.
        key: PathBuf,
    },
}

/// A running child upstream; dropping it kills the child.
#[derive(Debug)]
pub(crate) struct ChildUpstream {
    child: Child,
    addr: SocketAddr,
}

impl ChildUpstream {
    /// Re-executes the current binary as an upstream of the given kind and waits until it
    /// listens.
    pub(crate) fn spawn(kind: &Upstream) -> io::Result<ChildUpstream> {
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        match kind {
            Upstream::PlainHold => {
                cmd.env(CHILD_ENV, "plain-hold");
            }
            Upstream::TlsHold { chain, key } => {
                cmd.env(CHILD_ENV, "tls-hold")
                    .env(CHAIN_ENV, chain)
                    .env(KEY_ENV, key);
            }
            Upstream::Http { chain, key } => {
                cmd.env(CHILD_ENV, "http")
                    .env(CHAIN_ENV, chain)
                    .env(KEY_ENV, key);
            }
        }
        let mut child = cmd.spawn()?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let port: u16 = line
            .trim()
            .strip_prefix("LISTENING ")
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| {
                let _ = child.kill();
                let _ = child.wait();
                io::Error::other(format!("child upstream did not start: {line:?}"))
            })?;
        Ok(ChildUpstream {
            child,
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        })
    }

    /// The address the child listens on.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The child's process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for ChildUpstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Call first thing in `main`: when this process is a child upstream, serve and exit;
/// otherwise return at once.
pub(crate) fn run_if_child() {
    let Ok(mode) = std::env::var(CHILD_ENV) else {
        return;
    };
    // End of file on stdin means the parent is gone (or dropped us): exit with it.
    std::thread::spawn(|| {
        let mut sink = Vec::new();
        let _ = io::stdin().read_to_end(&mut sink);
        std::process::exit(0);
    });
    super::raise_nofile_limit();
    let listener = listen().expect("child upstream: listen on 127.0.0.1");
    let port = listener.local_addr().expect("local address").port();
    match mode.as_str() {
        "plain-hold" => {
            announce(port);
            plain_hold(listener)
        }
        "tls-hold" => {
            let chain = std::env::var_os(CHAIN_ENV).expect("certificate chain path");
            let key = std::env::var_os(KEY_ENV).expect("private key path");
            tls_hold(listener, chain.into(), key.into(), port)
        }
        "http" => {
            let chain = std::env::var_os(CHAIN_ENV).expect("certificate chain path");
            let key = std::env::var_os(KEY_ENV).expect("private key path");
            super::http_upstream::serve(listener, chain.as_ref(), key.as_ref(), || announce(port))
        }
        other => panic!("unknown child upstream mode {other:?}"),
    }
    std::process::exit(0);
}

fn announce(port: u16) {
    let mut out = io::stdout().lock();
    writeln!(out, "LISTENING {port}").expect("write to parent");
    out.flush().expect("flush to parent");
}

/// `127.0.0.1:0` with a 4,096 backlog: connection bursts overflow the default 128.
fn listen() -> io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

fn plain_hold(listener: TcpListener) {
    let mut held = Vec::new();
    for stream in listener.incoming() {
        match stream {
            Ok(s) => held.push(s),
            Err(e) => eprintln!("child upstream: accept: {e}"),
        }
    }
}

fn tls_hold(listener: TcpListener, chain: PathBuf, key: PathBuf, port: u16) {
    use openssl::ssl::{SslAcceptor, SslFiletype, SslMethod};
    let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server()).expect("acceptor");
    b.set_certificate_chain_file(&chain)
        .expect("certificate chain");
    b.set_private_key_file(&key, SslFiletype::PEM)
        .expect("private key");
    b.set_session_id_context(b"upstream-pool-bench")
        .expect("session id context");
    let acceptor = std::sync::Arc::new(b.build());

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("child runtime");
    rt.block_on(async move {
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
        announce(port);
        loop {
            let (tcp, _) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("child upstream: accept: {e}");
                    continue;
                }
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(ssl) = openssl::ssl::Ssl::new(acceptor.context()) else {
                    return;
                };
                let Ok(mut tls) = tokio_openssl::SslStream::new(ssl, tcp) else {
                    return;
                };
                if std::pin::Pin::new(&mut tls).accept().await.is_err() {
                    return;
                }
                // Hold until the client closes; whatever it sends is discarded.
                let mut buf = [0u8; 512];
                while let Ok(n) = tokio::io::AsyncReadExt::read(&mut tls, &mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
            });
        }
    });
}
