//! A real nginx (Debian's package) for interop suites, run unprivileged on loopback under a
//! temporary prefix (`daemon off; master_process off;`, so killing its PID stops it). The same
//! rules as `tests/nginx.rs`: without nginx a suite passes with a loud notice, unless
//! `UPSTREAM_POOL_REQUIRE_NGINX=1` (set by `.ci/run`), which makes a missing nginx a failure.

use std::fs::{self, File};
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::TempDir;

/// How long nginx may take to start accepting.
const STARTUP: Duration = Duration::from_secs(10);

/// Finds the nginx binary: `$UPSTREAM_POOL_NGINX` if set (and then only it), else `$PATH`,
/// then `/usr/sbin` and `/usr/local/sbin`. Returns `None` after printing a skip notice naming
/// `tests` skipped tests when there is none and nginx is not required; panics when
/// `UPSTREAM_POOL_REQUIRE_NGINX=1`.
pub(crate) fn nginx_or_skip(suite: &str, tests: usize) -> Option<PathBuf> {
    let candidates: Vec<PathBuf> = match std::env::var_os("UPSTREAM_POOL_NGINX") {
        Some(bin) => vec![PathBuf::from(bin)],
        None => std::env::var_os("PATH")
            .map(|p| {
                std::env::split_paths(&p)
                    .map(|dir| dir.join("nginx"))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
            .into_iter()
            .chain(["/usr/sbin/nginx", "/usr/local/sbin/nginx"].map(PathBuf::from))
            .collect(),
    };
    if let Some(found) = candidates.into_iter().find(|c| c.is_file()) {
        return Some(found);
    }
    if std::env::var("UPSTREAM_POOL_REQUIRE_NGINX").as_deref() == Ok("1") {
        panic!("nginx not installed but UPSTREAM_POOL_REQUIRE_NGINX=1: install it (apt-get install nginx)");
    }
    // Written to the real stderr, not through `eprintln!`, which the test harness captures.
    let _ = writeln!(
        std::io::stderr(),
        "\n!!!!!! nginx not installed: {tests} {suite} tests skipped \
         (apt-get install nginx, or set UPSTREAM_POOL_REQUIRE_NGINX=1 to fail instead) !!!!!!\n"
    );
    None
}

/// A running nginx, killed (by PID) and its prefix removed on drop.
#[derive(Debug)]
pub(crate) struct Nginx {
    child: Child,
    addr: SocketAddr,
    // Declared last: removed after the process is gone.
    dir: TempDir,
}

impl Nginx {
    /// Starts nginx with the configuration `config(prefix, port)` on a free loopback port
    /// and waits until it accepts connections. A port taken between probing and nginx's bind
    /// is retried with another one. The configuration should log errors to
    /// `<prefix>/error.log`.
    pub(crate) fn start(bin: &Path, config: impl Fn(&TempDir, u16) -> String) -> Nginx {
        let mut last_log = String::new();
        for _attempt in 0..8 {
            let dir = TempDir::new("nginx").expect("temporary nginx prefix");
            let port = free_port();
            fs::write(dir.join("nginx.conf"), config(&dir, port)).expect("write nginx.conf");
            let stderr = File::create(dir.join("stderr.log")).expect("create stderr.log");
            let mut child = Command::new(bin)
                .arg("-p")
                .arg(dir.path())
                .arg("-e")
                .arg(dir.join("error.log"))
                .arg("-c")
                .arg(dir.join("nginx.conf"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(stderr)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            let deadline = Instant::now() + STARTUP;
            loop {
                if let Some(status) = child.try_wait().expect("nginx status") {
                    last_log = logs(&dir);
                    if last_log.contains("Address already in use") {
                        break; // someone took the port: next attempt
                    }
                    panic!("nginx exited with {status} at startup:\n{last_log}");
                }
                if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
                    return Nginx { child, addr, dir };
                }
                if Instant::now() >= deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "nginx did not accept on {addr} within {STARTUP:?}:\n{}",
                        logs(&dir)
                    );
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        panic!("could not start nginx on a free port after 8 attempts; last log:\n{last_log}");
    }

    /// The loopback address nginx listens on.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// nginx's error log and stderr, for failure messages.
    pub(crate) fn logs(&self) -> String {
        logs(&self.dir)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn logs(dir: &TempDir) -> String {
    let read = |name| fs::read_to_string(dir.join(name)).unwrap_or_default();
    format!(
        "--- error.log\n{}--- stderr\n{}",
        read("error.log"),
        read("stderr.log")
    )
}

/// A port that was free a moment ago: bind `127.0.0.1:0`, read it, close.
fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("probe a free port")
}
