//! Shared integration-test support for `upstream-pool`.
//!
//! Every test file includes this with `mod support;`. It deliberately does not depend on the
//! `upstream_pool` crate, so it can check the library from the outside (and keep compiling
//! while the library changes). Contents:
//!
//! - [`certs`]: a PKI generated at test time ([`certs::TestPki`]).
//! - [`server`]: in-process TLS / plaintext servers with observable statistics
//!   ([`server::TestServer`]).
//! - [`client`]: a plain tokio-openssl client and a tiny HTTP/1.1 reader, for driving test
//!   servers (or streams handed out by the pool) without `upstream_pool`.
//! - [`nginx`]: a real nginx under a temporary prefix ([`nginx::Nginx`]) and the
//!   skip-unless-required rule.
//! - [`s_server`]: an `openssl s_server` child process ([`s_server::SServer`]).
//! - [`chaos`]: a randomly misbehaving TLS upstream for load and soak tests
//!   ([`chaos::ChaosServer`]).
//! - [`client_hello`]: the SNI of a raw ClientHello (what test servers report as SNI).
//! - [`h2_server`]: an in-process HTTP/2 and HTTP/1.1 server ([`h2_server::HttpServer`],
//!   HTTP/1.1 framing in [`h1_server`]) recording connections, streams in flight, resets and
//!   every request, for the `upstream_pool::http` suites.
//! - Here: [`TempDir`], [`open_fds`] and [`wait_for_open_fds`].
//!
//! Items are `pub(crate)` (not `pub`) because the crate lints `unreachable_pub`, and there are
//! no re-exports because an unused re-export warns in every test binary that does not use it.
//! Set `UPSTREAM_POOL_TEST_LOG=1` to see why a test server dropped a connection.

// Each test binary compiles this whole module but uses only a subset of it; without this,
// every binary would warn about the helpers it does not call.
#![allow(dead_code)]

pub(crate) mod certs;
pub(crate) mod chaos;
pub(crate) mod client;
pub(crate) mod client_hello;
pub(crate) mod h1_server;
pub(crate) mod h2_server;
pub(crate) mod nginx;
pub(crate) mod s_server;
pub(crate) mod server;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Prints to stderr when `UPSTREAM_POOL_TEST_LOG` is set; test servers use it to report
/// dropped connections without failing (or spamming) the test.
macro_rules! test_log {
    ($($arg:tt)*) => {
        if std::env::var_os("UPSTREAM_POOL_TEST_LOG").is_some() {
            eprintln!("[support] {}", format_args!($($arg)*));
        }
    };
}
pub(crate) use test_log;

/// A directory under [`std::env::temp_dir`] with a unique name, removed (recursively) when
/// dropped.
#[derive(Debug)]
pub(crate) struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `$TMPDIR/upstream-pool-<prefix>-<pid>-<nanos>-<n>`.
    pub(crate) fn new(prefix: &str) -> io::Result<TempDir> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "upstream-pool-{prefix}-{}-{nanos}-{n}",
            std::process::id()
        ));
        fs::create_dir(&path)?;
        Ok(TempDir { path })
    }

    /// The directory's path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// `self.path().join(name)`.
    pub(crate) fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// Number of file descriptors this process has open (entries of `/proc/self/fd`, not
/// counting the one used to list the directory).
///
/// The count is process-wide: tests in the same binary run on parallel threads, so a leak
/// test must be alone in its binary (or run with `--test-threads=1`) to compare counts.
pub(crate) fn open_fds() -> usize {
    match fs::read_dir("/proc/self/fd") {
        // The directory handle being read shows up in its own listing.
        Ok(dir) => dir.count().saturating_sub(1),
        Err(e) => panic!("cannot list /proc/self/fd: {e}"),
    }
}

/// Polls [`open_fds`] every 10 ms until it is at most `baseline`, for up to `timeout`, and
/// returns the last count (so the caller can `assert!(n <= baseline)`). Async so the
/// runtime can keep closing connections while it waits.
pub(crate) async fn wait_for_open_fds(baseline: usize, timeout: Duration) -> usize {
    let deadline = Instant::now() + timeout;
    loop {
        let n = open_fds();
        if n <= baseline || Instant::now() >= deadline {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Polls `cond` every 5 ms for up to `timeout`; returns whether it became true. For
/// conditions the test cannot await directly (server-side counters, pool sizes).
pub(crate) async fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
