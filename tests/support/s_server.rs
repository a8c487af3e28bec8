//! `openssl s_server` as a child process: a TLS server that is not OpenSSL-via-Rust, for
//! cross-checking the client against the reference implementation.
//!
//! The child listens on a free loopback port, its output goes to log files in its temp dir
//! (never a pipe nobody drains), and it is killed by PID and reaped on drop.

use std::fs::{self, File};
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use openssl::ssl::SslVersion;

use super::certs::{Identity, TestPki};
use super::TempDir;

/// What `s_server` does with application data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum SServerMode {
    /// `-www`: answers `GET /` with an HTML status page (HTTP/1.0, then closes).
    #[default]
    Www,
    /// `-rev`: echoes each line back reversed.
    Rev,
}

/// Options for [`SServer::start`]. `Default` gives `-www` with `pki.server`, TLS 1.2–1.3,
/// no ALPN, tickets on.
#[derive(Debug, Clone, Default)]
pub(crate) struct SServerOptions {
    /// Certificate to present (default: the PKI's `server` leaf with intermediate A).
    pub(crate) identity: Option<Identity>,
    /// `Some(TLS1_2)` adds `-tls1_2`, `Some(TLS1_3)` adds `-tls1_3` (only that version).
    pub(crate) version: Option<SslVersion>,
    /// `-alpn` value, comma-separated (e.g. `"h2,http/1.1"`).
    pub(crate) alpn: Option<String>,
    /// `-no_ticket`.
    pub(crate) no_ticket: bool,
    /// `-www` or `-rev`.
    pub(crate) mode: SServerMode,
    /// Further arguments appended verbatim.
    pub(crate) extra_args: Vec<String>,
}

/// A running `openssl s_server`; killed and reaped on drop.
#[derive(Debug)]
pub(crate) struct SServer {
    child: Child,
    addr: SocketAddr,
    log_path: PathBuf,
    _dir: TempDir,
}

/// Whether the `openssl` command-line tool can be run.
pub(crate) fn openssl_cli_available() -> bool {
    Command::new("openssl")
        .arg("version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl SServer {
    /// Writes the certificate files, starts `openssl s_server -accept 127.0.0.1:PORT ...`
    /// on a free port and waits (up to 10 s, blocking the calling thread) until it accepts
    /// TCP connections. Retries with another port if the chosen one was taken in the
    /// meantime. Panics with the server's log if it cannot be started: this is test setup.
    pub(crate) fn start(pki: &TestPki, opts: SServerOptions) -> SServer {
        let dir = TempDir::new("s_server").expect("create s_server temp dir");
        let identity = opts.identity.clone().unwrap_or_else(|| pki.server.clone());
        let files = identity
            .write_pem(dir.path(), "server")
            .expect("write s_server certificate files");

        let mut args: Vec<String> = vec!["s_server".into()];
        let mut push = |a: &str| args.push(a.to_owned());
        push("-cert");
        push(&files.cert.to_string_lossy());
        push("-key");
        push(&files.key.to_string_lossy());
        if !identity.intermediates.is_empty() {
            push("-cert_chain");
            push(&files.intermediates.to_string_lossy());
        }
        push(match opts.mode {
            SServerMode::Www => "-www",
            SServerMode::Rev => "-rev",
        });
        match opts.version {
            Some(v) if v == SslVersion::TLS1_2 => push("-tls1_2"),
            Some(v) if v == SslVersion::TLS1_3 => push("-tls1_3"),
            Some(v) => panic!("SServer supports only TLS 1.2 or 1.3, got {v:?}"),
            None => {}
        }
        if let Some(alpn) = &opts.alpn {
            push("-alpn");
            push(alpn);
        }
        if opts.no_ticket {
            push("-no_ticket");
        }
        args.extend(opts.extra_args.iter().cloned());

        let mut last_log = String::new();
        for attempt in 0..5 {
            let port = free_port().expect("find a free loopback port");
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            let log_path = dir.join(&format!("s_server-{attempt}.log"));
            let log = File::create(&log_path).expect("create s_server log");
            let log_err = log.try_clone().expect("clone s_server log handle");
            let mut child = Command::new("openssl")
                .args(&args)
                .arg("-accept")
                .arg(addr.to_string())
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(log_err)
                .spawn()
                .expect("spawn `openssl s_server`");
            match wait_ready(&mut child, addr, Duration::from_secs(10)) {
                Ok(()) => {
                    return SServer {
                        child,
                        addr,
                        log_path,
                        _dir: dir,
                    }
                }
                Err(e) => {
                    kill(&mut child);
                    last_log = fs::read_to_string(&log_path).unwrap_or_default();
                    if !last_log.contains("in use") {
                        panic!("openssl s_server did not start: {e}\n--- log ---\n{last_log}");
                    }
                    // Port taken between probing and binding: try another one.
                }
            }
        }
        panic!("openssl s_server did not start after 5 attempts\n--- log ---\n{last_log}");
    }

    /// The address the server accepts on (`127.0.0.1:PORT`).
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Everything the server has written to stdout and stderr so far.
    pub(crate) fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The child's process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for SServer {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

/// Waits until a TCP connect to `addr` succeeds, failing early if `child` exits.
fn wait_ready(child: &mut Child, addr: SocketAddr, timeout: Duration) -> io::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Err(io::Error::other(format!("s_server exited early: {status}")));
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "s_server not accepting",
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Kills `child` by its own PID (SIGKILL via `Child::kill`) and reaps it.
fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// A loopback port that was free a moment ago (bind port 0, read it, release it).
fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}
