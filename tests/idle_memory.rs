//! Idle pooled TLS connections hold no OpenSSL record buffers (BENCHMARKS.md section 4).
//!
//! OpenSSL's `SSL_MODE_RELEASE_BUFFERS` leaves the 16.5 KiB read buffer allocated after a
//! read that found nothing to return (the liveness probe reading TLS 1.3 tickets) and, with
//! read-ahead, after reading a response; the connection then keeps it for as long as it sits
//! in the pool. This file counts OpenSSL's own allocations (`CRYPTO_set_mem_functions`, which
//! must run before OpenSSL allocates anything, hence one test in a file of its own) and checks
//! that a pooled connection holds no allocation of record-buffer size once it is idle.
//!
//! The upstream is `openssl s_server -rev` in another process (so its buffers are not
//! counted); it serves one connection at a time, so an echo on a checked-out connection after
//! the measurement also proves the pool handed back the same, still working connection.

mod support;

use std::collections::BTreeMap;
use std::ffi::{c_char, c_int, c_void};
use std::sync::Mutex;
use std::time::Duration;

use openssl::ssl::SslVersion;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use upstream_pool::{Connection, Connector, ConnectorOptions, Peer};

use support::certs::TestPki;
use support::s_server::{openssl_cli_available, SServer, SServerMode, SServerOptions};

/// Allocations at least this large are record buffers (16 KiB of plaintext plus the record
/// overhead); nothing else OpenSSL allocates per client connection comes close.
const RECORD_BUFFER: usize = 16 * 1024;

/// Live OpenSSL allocations of at least [`RECORD_BUFFER`] bytes: address → size.
static BIG: Mutex<BTreeMap<usize, usize>> = Mutex::new(BTreeMap::new());

fn big() -> std::sync::MutexGuard<'static, BTreeMap<usize, usize>> {
    // A panic while holding the lock cannot leave the map inconsistent (each operation is a
    // single insert or remove), so a poisoned lock is still usable.
    BIG.lock().unwrap_or_else(|e| e.into_inner())
}

/// Bytes in live OpenSSL allocations of record-buffer size.
fn big_live() -> usize {
    big().values().sum()
}

extern "C" {
    // In libcrypto since 1.1.0 (this signature since 3.0); openssl-sys does not declare it.
    fn CRYPTO_set_mem_functions(
        m: extern "C" fn(usize, *const c_char, c_int) -> *mut c_void,
        r: extern "C" fn(*mut c_void, usize, *const c_char, c_int) -> *mut c_void,
        f: extern "C" fn(*mut c_void, *const c_char, c_int),
    ) -> c_int;
}

#[allow(unsafe_code, reason = "an allocator hook for OpenSSL is plain FFI")]
extern "C" fn counting_malloc(n: usize, _file: *const c_char, _line: c_int) -> *mut c_void {
    // SAFETY: malloc has no preconditions; OpenSSL frees the result through counting_free.
    let p = unsafe { libc::malloc(n) };
    if n >= RECORD_BUFFER && !p.is_null() {
        big().insert(p as usize, n);
    }
    p
}

#[allow(unsafe_code, reason = "an allocator hook for OpenSSL is plain FFI")]
extern "C" fn counting_realloc(
    p: *mut c_void,
    n: usize,
    _file: *const c_char,
    _line: c_int,
) -> *mut c_void {
    let old = big().remove(&(p as usize));
    // SAFETY: `p` is null or came from counting_malloc/counting_realloc (libc's allocator),
    // as OpenSSL passes back only what these hooks returned.
    let q = unsafe { libc::realloc(p, n) };
    if q.is_null() {
        // Failed: `p` is still allocated as it was.
        if let Some(size) = old {
            big().insert(p as usize, size);
        }
    } else if n >= RECORD_BUFFER {
        big().insert(q as usize, n);
    }
    q
}

#[allow(unsafe_code, reason = "an allocator hook for OpenSSL is plain FFI")]
extern "C" fn counting_free(p: *mut c_void, _file: *const c_char, _line: c_int) {
    if !p.is_null() {
        big().remove(&(p as usize));
    }
    // SAFETY: as in counting_realloc, `p` is null or from libc's allocator via these hooks.
    unsafe { libc::free(p) }
}

/// One line through `s_server -rev` (it answers with the line reversed).
async fn echo(conn: &mut Connection, line: &str) {
    conn.write_all(format!("{line}\n").as_bytes())
        .await
        .expect("write to s_server");
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while !got.ends_with(b"\n") {
        let n = conn.read(&mut byte).await.expect("read from s_server");
        assert!(n > 0, "s_server closed the connection");
        got.push(byte[0]);
    }
    let reversed: String = line.chars().rev().collect();
    assert_eq!(String::from_utf8_lossy(&got).trim_end(), reversed);
}

#[test]
fn idle_pooled_tls_connections_hold_no_record_buffers() {
    #[allow(
        unsafe_code,
        reason = "installing OpenSSL's allocator hooks is plain FFI"
    )]
    // SAFETY: called before anything in this process used OpenSSL (this file's only test,
    // first statement); the hooks are plain C-ABI functions over libc's allocator.
    let installed =
        unsafe { CRYPTO_set_mem_functions(counting_malloc, counting_realloc, counting_free) };
    assert_eq!(
        installed, 1,
        "CRYPTO_set_mem_functions refused: OpenSSL allocated before the test started"
    );
    if !openssl_cli_available() {
        eprintln!("openssl CLI not available: idle memory test skipped");
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let pki = TestPki::shared();
    for version in [SslVersion::TLS1_3, SslVersion::TLS1_2] {
        for exchange_first in [true, false] {
            rt.block_on(check(pki, version, exchange_first));
        }
    }
}

/// A pooled connection (after an exchange, or straight after the handshake so that the
/// reaper's probe reads the TLS 1.3 tickets) holds no record buffer once idle, and still
/// works.
async fn check(pki: &TestPki, version: SslVersion, exchange_first: bool) {
    let what = format!("{version:?}, exchange before release: {exchange_first}");
    let server = SServer::start(
        pki,
        SServerOptions {
            version: Some(version),
            mode: SServerMode::Rev,
            ..SServerOptions::default()
        },
    );
    let mut options = ConnectorOptions::default();
    options.reap_interval = Duration::from_millis(20);
    let connector = Connector::new(options).expect("connector");
    let peer = Peer::tls(server.addr(), "localhost").with_ca(pki.ca_a());

    // Warm up one-time state (providers, DRBG, the verify store) on a connection that is
    // then closed, so that the baseline holds only what stays.
    let mut warm = connector.get(&peer).await.expect("warm-up connection");
    echo(&mut warm, "warm up").await;
    drop(warm);
    let baseline = big_live();

    let mut conn = connector.get(&peer).await.expect("connection");
    assert!(!conn.reused(), "{what}: the warm-up connection was closed");
    if exchange_first {
        echo(&mut conn, "hello").await;
    }
    connector.release(conn);
    // Several reaper passes: the TLS 1.3 tickets are read by then.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        connector.idle_count(),
        1,
        "{what}: the connection is pooled"
    );
    let held = big_live().saturating_sub(baseline);
    assert!(
        held < RECORD_BUFFER,
        "{what}: an idle pooled connection holds {held} bytes in OpenSSL allocations of \
         record-buffer size (a read or write buffer kept while idle)"
    );

    // The same connection, still usable: s_server serves one connection at a time, so a
    // new one could not get an answer while the pooled one is open.
    let mut again = connector.get(&peer).await.expect("pooled connection");
    assert!(again.reused(), "{what}: served from the pool");
    echo(&mut again, "still there").await;
    let stats = connector.stats_for(&peer);
    assert_eq!(
        stats.handshakes_full + stats.handshakes_resumed,
        2,
        "{what}: one handshake for the warm-up, one for the pooled connection"
    );
}
