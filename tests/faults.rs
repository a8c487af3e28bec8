//! Fault injection: misbehaving upstreams on loopback, one per test.
//!
//! Every case checks the [`ErrorKind`] (and `retryable()` where the contract fixes it), that
//! nothing panicked (a process-wide panic hook counts panics, including in spawned tasks),
//! that nothing hangs (each case runs under a timeout), and that the process's open file
//! descriptors return to the count before the case.
//!
//! File-descriptor counts are process-wide, so the cases run one at a time: each test takes
//! [`SERIAL`] before it builds its runtime.

mod support;

use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, Once, PoisonError};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use upstream_pool::{Connection, Connector, ConnectorOptions, Error, ErrorKind, Peer};

use support::certs::TestPki;
use support::client::http_get;
use support::server::{Behaviour, TestServer};
use support::{open_fds, wait_for_open_fds};

/// Taken by every case for its whole run, runtime included (see the module docs).
static SERIAL: Mutex<()> = Mutex::new(());

/// Panics anywhere in the process since start.
static PANICS: AtomicUsize = AtomicUsize::new(0);

/// How long one case may take before it counts as hung.
const CASE_LIMIT: Duration = Duration::from_secs(20);

fn count_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            default(info);
        }));
    });
}

/// Runs one fault case alone: fresh multi-thread runtime, warm-up, fd baseline, the case
/// under [`CASE_LIMIT`], then the fd and panic checks.
fn run_case<F, Fut>(name: &str, case: F)
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = ()>,
{
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    count_panics();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let before_warm_up = open_fds();
        warm_up().await;
        let settled = wait_for_open_fds(before_warm_up, Duration::from_secs(5)).await;
        assert!(
            settled <= before_warm_up,
            "{name}: a plain successful get leaked descriptors ({settled} > {before_warm_up})"
        );
        let baseline = open_fds();
        let panics = PANICS.load(Ordering::SeqCst);

        tokio::time::timeout(CASE_LIMIT, case())
            .await
            .unwrap_or_else(|_| panic!("{name}: hung for {CASE_LIMIT:?}"));

        let now = wait_for_open_fds(baseline, Duration::from_secs(5)).await;
        assert!(
            now <= baseline,
            "{name}: {} file descriptors still open after the case",
            now - baseline
        );
        assert_eq!(
            PANICS.load(Ordering::SeqCst),
            panics,
            "{name}: something panicked"
        );
    });
}

/// One successful TLS get through the library, so lazily initialised state (the shared PKI,
/// OpenSSL's tables, the metrics handles) exists before the baseline is taken.
async fn warm_up() {
    let server = TestServer::start(Behaviour::Http);
    let connector = Connector::new(ConnectorOptions::default()).unwrap();
    let mut conn = connector.get(&tls_peer(server.addr())).await.unwrap();
    http_get(&mut conn, "localhost").await.unwrap();
    drop(conn);
    drop(connector);
    drop(server);
}

fn tls_peer(addr: SocketAddr) -> Peer {
    Peer::tls(addr, "localhost").with_ca(TestPki::shared().ca_a())
}

fn connector() -> Connector {
    let mut options = ConnectorOptions::default();
    // The reaper must not tidy up behind a case's back; checkout and release still check.
    options.reap_interval = Duration::from_secs(3600);
    Connector::new(options).unwrap()
}

/// `get` that must fail; returns the error and how long it took.
async fn get_err(connector: &Connector, peer: &Peer) -> (Error, Duration) {
    let start = Instant::now();
    match connector.get(peer).await {
        Ok(conn) => panic!("get succeeded against a faulty upstream: {conn:?}"),
        Err(e) => (e, start.elapsed()),
    }
}

fn assert_kind(e: &Error, kinds: &[ErrorKind]) {
    assert!(
        kinds.contains(&e.kind()),
        "expected one of {kinds:?}, got {e:?} ({e})"
    );
    assert!(
        !e.reused(),
        "a fresh dial is not a reused connection: {e:?}"
    );
    assert!(e.peer().is_some(), "the error does not name the peer: {e}");
}

/// Server sets SO_LINGER 0 and closes right after accept: the client sees an RST.
///
/// The RST can beat the connect's own completion check (then it is `ConnectError`), or hit
/// the handshake (`TlsHandshakeFailure`); both are the reset, typed.
#[test]
fn rst_right_after_accept() {
    run_case("rst_right_after_accept", || async {
        let server = TestServer::start(Behaviour::RstAfterAccept);
        let connector = connector();
        let peer = tls_peer(server.addr());
        for _ in 0..5 {
            let (e, _) = get_err(&connector, &peer).await;
            assert_kind(
                &e,
                &[ErrorKind::TlsHandshakeFailure, ErrorKind::ConnectError],
            );
            assert!(e.retryable(), "a reset is the network's doing: {e:?}");
        }
        assert_eq!(server.stats().accepted, 5);
        assert_eq!(connector.connection_count_for(&peer), 0);
    });
}

/// Server reads the ClientHello, then resets (SO_LINGER 0 close).
#[test]
fn rst_mid_handshake() {
    run_case("rst_mid_handshake", || async {
        let server = TestServer::start(Behaviour::RstAfterClientHello);
        let connector = connector();
        let peer = tls_peer(server.addr());
        for _ in 0..3 {
            let (e, _) = get_err(&connector, &peer).await;
            assert_kind(&e, &[ErrorKind::TlsHandshakeFailure]);
            assert!(e.retryable(), "a reset mid-handshake is retryable: {e:?}");
        }
        let stats = server.stats();
        assert_eq!(stats.accepted, 3);
        assert_eq!(stats.handshakes, 0);
        assert_eq!(connector.connection_count_for(&peer), 0);
    });
}

/// Server reads the ClientHello and closes (FIN) without answering.
#[test]
fn close_after_client_hello() {
    run_case("close_after_client_hello", || async {
        let server = TestServer::start(Behaviour::CloseAfterClientHello);
        let connector = connector();
        let peer = tls_peer(server.addr());
        let (e, _) = get_err(&connector, &peer).await;
        assert_kind(&e, &[ErrorKind::TlsHandshakeFailure]);
        assert!(!e.retryable(), "{e:?}");
        assert_eq!(server.stats().accepted, 1);
    });
}

/// Server accepts and never says a word: the handshake times out within the total connection
/// timeout plus 100 ms, and says so.
#[test]
fn never_answers_times_out_on_time() {
    run_case("never_answers_times_out_on_time", || async {
        let server = TestServer::start(Behaviour::NeverAnswer);
        let connector = connector();
        let timeout = Duration::from_millis(300);
        let peer = tls_peer(server.addr()).with_total_connection_timeout(timeout);
        for _ in 0..3 {
            let (e, took) = get_err(&connector, &peer).await;
            assert_kind(&e, &[ErrorKind::TlsHandshakeTimedout]);
            assert!(e.retryable(), "{e:?}");
            assert!(
                took >= timeout - Duration::from_millis(5),
                "fired early: {took:?}"
            );
            assert!(
                took <= timeout + Duration::from_millis(100),
                "fired {took:?} after get, more than 100 ms past {timeout:?}"
            );
        }
        assert_eq!(server.stats().accepted, 3);
        assert_eq!(connector.connection_count_for(&peer), 0);
    });
}

/// A plaintext HTTP server where TLS was expected: it answers the ClientHello with
/// `HTTP/1.1 400`.
#[test]
fn plaintext_http_server_on_a_tls_peer() {
    run_case("plaintext_http_server_on_a_tls_peer", || async {
        let server = TestServer::start(Behaviour::PlaintextHttp);
        let connector = connector();
        let (e, _) = get_err(&connector, &tls_peer(server.addr())).await;
        assert_kind(&e, &[ErrorKind::TlsHandshakeFailure]);
        assert!(!e.retryable(), "a protocol mismatch fails again: {e:?}");
        assert_eq!(server.stats().accepted, 1);
    });
}

/// Random bytes (first byte 0xff, never a TLS record type) instead of a ServerHello.
#[test]
fn garbage_instead_of_server_hello() {
    run_case("garbage_instead_of_server_hello", || async {
        let server = TestServer::start(Behaviour::Garbage);
        let connector = connector();
        let (e, _) = get_err(&connector, &tls_peer(server.addr())).await;
        assert_kind(&e, &[ErrorKind::TlsHandshakeFailure]);
        assert!(!e.retryable(), "{e:?}");
        assert_eq!(server.stats().accepted, 1);
    });
}

/// Nothing listens: the kernel refuses the connect.
#[test]
fn nothing_listening_is_refused() {
    run_case("nothing_listening_is_refused", || async {
        let addr = {
            let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
            l.local_addr().unwrap()
        };
        let connector = connector();
        let (e, _) = get_err(&connector, &tls_peer(addr)).await;
        assert_kind(&e, &[ErrorKind::ConnectRefused]);
        assert!(e.retryable());
    });
}

/// A listener with `listen(1)` that never accepts, its queue filled by other connections:
/// Linux drops further SYNs, so the connect times out.
#[test]
fn full_listen_backlog_times_out_the_connect() {
    run_case("full_listen_backlog_times_out_the_connect", || async {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind((Ipv4Addr::LOCALHOST, 0).into()).unwrap();
        let listener = socket.listen(1).unwrap();
        let addr = listener.local_addr().unwrap();

        // Fill the accept queue until a connect no longer completes.
        let mut fillers = Vec::new();
        let mut full = false;
        for _ in 0..16 {
            match tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await {
                Ok(Ok(s)) => fillers.push(s),
                Ok(Err(e)) => panic!("filler connect failed: {e}"),
                Err(_) => {
                    full = true;
                    break;
                }
            }
        }
        assert!(
            full,
            "the backlog never filled ({} connections queued)",
            fillers.len()
        );

        let connector = connector();
        let timeout = Duration::from_millis(300);
        let peer = tls_peer(addr).with_connection_timeout(timeout);
        let (e, took) = get_err(&connector, &peer).await;
        assert_kind(&e, &[ErrorKind::ConnectTimedout]);
        assert!(e.retryable());
        assert!(took >= timeout - Duration::from_millis(5), "{took:?}");
        assert_eq!(connector.connection_count_for(&peer), 0);
        drop(fillers);
        drop(listener);
    });
}

/// How the upstream gets rid of the pooled connection in the reuse race.
#[derive(Debug, Clone, Copy)]
enum Close {
    /// TLS, connection task aborted: FIN without close_notify.
    TlsAbort,
    /// TLS, close_notify then FIN (what nginx's keepalive_timeout does).
    TlsCloseNotify,
    /// Plaintext, FIN.
    PlainFin,
}

/// The upstream closes a pooled connection after `get` handed it out but before the first
/// write. The request then fails on write or read, and the failure must carry our `Error`:
/// reused, retryable, naming the peer. EOF before any response byte counts as a failure
/// too (`UnexpectedEof`), so a caller can retry on one signal.
async fn close_between_get_and_write(close: Close) {
    let idle_close = Duration::from_millis(300);
    let server = match close {
        Close::TlsAbort => TestServer::start(Behaviour::Http),
        Close::TlsCloseNotify => TestServer::start(Behaviour::CloseAfter(idle_close)),
        Close::PlainFin => TestServer::builder().plaintext().start(),
    };
    let peer = match close {
        Close::PlainFin => Peer::tcp(server.addr()),
        _ => tls_peer(server.addr()),
    };
    let connector = connector();

    let mut conn = connector.get(&peer).await.unwrap();
    http_get(&mut conn, "localhost").await.unwrap();
    connector.release(conn);
    let mut conn: Connection = connector.get(&peer).await.unwrap();
    assert!(
        conn.reused(),
        "{close:?}: setup expected a pooled connection"
    );

    match close {
        Close::TlsAbort | Close::PlainFin => server.close_connections(),
        Close::TlsCloseNotify => {} // the server closes it after idle_close
    }
    server.wait_for(|s| s.open == 0).await;
    // Let the FIN (and close_notify) reach our socket.
    tokio::time::sleep(Duration::from_millis(50)).await;

    let result: io::Result<usize> = async {
        conn.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await?;
        conn.flush().await?;
        let mut buf = [0u8; 256];
        conn.read(&mut buf).await
    }
    .await;
    let e = match result {
        Ok(0) => {
            panic!("{close:?}: EOF on a reused connection came back as Ok(0), not as an error")
        }
        Ok(n) => panic!("{close:?}: read {n} bytes from a closed connection"),
        Err(e) => e,
    };
    let err = Error::from_io(&e).unwrap_or_else(|| {
        panic!("{close:?}: the I/O error carries no upstream_pool::Error: {e:?}")
    });
    assert!(err.reused(), "{close:?}: {err:?}");
    assert!(err.retryable(), "{close:?}: {err:?}");
    assert_eq!(err.kind(), ErrorKind::ConnectError, "{close:?}: {err:?}");
    assert!(err.peer().is_some(), "{close:?}: {err}");
    drop(conn);
    assert_eq!(connector.connection_count_for(&peer), 0);

    // The retry the error invites works, on a fresh connection.
    let mut fresh = connector.get(&peer).await.unwrap();
    assert!(!fresh.reused());
    let resp = http_get(&mut fresh, "localhost").await.unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(server.stats().accepted, 2);
}

#[test]
fn pooled_connection_aborted_after_get_tls() {
    run_case("pooled_connection_aborted_after_get_tls", || {
        close_between_get_and_write(Close::TlsAbort)
    });
}

#[test]
fn pooled_connection_close_notify_after_get_tls() {
    run_case("pooled_connection_close_notify_after_get_tls", || {
        close_between_get_and_write(Close::TlsCloseNotify)
    });
}

#[test]
fn pooled_connection_closed_after_get_plaintext() {
    run_case("pooled_connection_closed_after_get_plaintext", || {
        close_between_get_and_write(Close::PlainFin)
    });
}

/// A caller that gives up on `get` mid-handshake (its future dropped) leaves nothing behind:
/// the background dial hits its own timeout and frees its slot and socket.
#[test]
fn cancelled_get_against_silent_server_cleans_up() {
    run_case("cancelled_get_against_silent_server_cleans_up", || async {
        let server = TestServer::start(Behaviour::NeverAnswer);
        let connector = connector();
        let peer =
            tls_peer(server.addr()).with_total_connection_timeout(Duration::from_millis(300));
        for _ in 0..10 {
            let cancelled =
                tokio::time::timeout(Duration::from_millis(50), connector.get(&peer)).await;
            assert!(
                cancelled.is_err(),
                "a silent server cannot complete a handshake"
            );
        }
        let freed = support::wait_until(Duration::from_secs(3), || {
            connector.connection_count_for(&peer) == 0
        })
        .await;
        assert!(freed, "slots of cancelled dials were not freed");
        assert_eq!(server.stats().accepted, 10);
        drop(server);
    });
}
